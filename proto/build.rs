//! Compiles `proto/venom/v1/venom.proto` with protox (pure Rust, no system `protoc`)
//! and writes the descriptor set used by gRPC reflection.

use std::path::PathBuf;

use prost::Message;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let out_dir = PathBuf::from(std::env::var("OUT_DIR")?);
    println!("cargo:rerun-if-changed=proto");
    let fds = protox::compile(["venom/v1/venom.proto"], ["proto"])?;
    std::fs::write(out_dir.join("venom_descriptor.bin"), fds.encode_to_vec())?;
    tonic_build::configure()
        .build_server(true)
        .build_client(true)
        .compile_fds(fds)?;
    Ok(())
}
