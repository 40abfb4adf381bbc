//! Prints this machine's hardware profile and one θ sample as JSON.
//!
//! `cargo run -p venom-worker --example scan`

fn main() -> anyhow::Result<()> {
    let profile = venom_worker::scan::scan();
    let theta = venom_worker::theta::ThetaSampler::new().sample();
    let report = serde_json::json!({ "profile": profile, "theta": theta });
    println!("{}", serde_json::to_string_pretty(&report)?);
    Ok(())
}
