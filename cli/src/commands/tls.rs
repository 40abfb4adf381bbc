//! `venomctl tls init` and `venomctl tls issue`: the cluster CA and certificates per role.

use std::path::Path;

use anyhow::Context as _;
use serde::Serialize;
use venom_tls::issue::{self, Validity};
use venom_tls::{Peer, Role};

use crate::args::TlsAction;
use crate::commands::Context;
use crate::output::print_json;

/// One certificate written.
#[derive(Debug, Serialize)]
struct Written {
    role: String,
    name: String,
    cert: String,
    key: String,
}

pub fn run(ctx: &Context, action: TlsAction) -> anyhow::Result<u8> {
    let written = match action {
        TlsAction::Init {
            dir,
            members,
            workers,
            clients,
            admins,
            days,
            ca_days,
        } => init(&dir, &members, &workers, &clients, &admins, days, ca_days)?,
        TlsAction::Issue {
            role,
            name,
            dir,
            sans,
            days,
            replace,
        } => {
            let peer = Peer::new(role, name)?;
            let (cert, key) = issue::issue_into(&dir, &peer, &sans, Validity::days(days), replace)?;
            vec![written(&peer, &cert, &key)]
        }
    };
    if ctx.json() {
        print_json(&written)?;
    } else {
        for w in &written {
            println!("{:<7} {:<20} {}  {}", w.role, w.name, w.cert, w.key);
        }
    }
    Ok(0)
}

fn written(peer: &Peer, cert: &Path, key: &Path) -> Written {
    Written {
        role: peer.role.to_string(),
        name: peer.name.clone(),
        cert: cert.display().to_string(),
        key: key.display().to_string(),
    }
}

/// `--member ID[=HOST,HOST…]`.
fn parse_member(text: &str) -> anyhow::Result<(Peer, Vec<String>)> {
    let (id, hosts) = match text.split_once('=') {
        Some((id, hosts)) => (id, hosts),
        None => (text, ""),
    };
    let peer = Peer::new(Role::Member, id.trim()).with_context(|| format!("--member {text}"))?;
    let sans = hosts
        .split(',')
        .map(str::trim)
        .filter(|h| !h.is_empty())
        .map(str::to_owned)
        .collect();
    Ok((peer, sans))
}

fn init(
    dir: &Path,
    members: &[String],
    workers: &[String],
    clients: &[String],
    admins: &[String],
    days: u32,
    ca_days: u32,
) -> anyhow::Result<Vec<Written>> {
    // Every name is checked before anything is written.
    let mut wanted: Vec<(Peer, Vec<String>)> = Vec::new();
    for member in members {
        wanted.push(parse_member(member)?);
    }
    for (role, names, flag) in [
        (Role::Worker, workers, "--worker"),
        (Role::Client, clients, "--client"),
        (Role::Admin, admins, "--admin"),
    ] {
        for name in names {
            let peer = Peer::new(role, name.trim()).with_context(|| format!("{flag} {name}"))?;
            wanted.push((peer, Vec::new()));
        }
    }
    let ca = issue::init(dir, Validity::days(ca_days))?;
    let mut written_list = vec![Written {
        role: "ca".into(),
        name: "cluster CA".into(),
        cert: dir.join(issue::CA_CERT).display().to_string(),
        key: dir.join(issue::CA_KEY).display().to_string(),
    }];
    for (peer, sans) in wanted {
        let issued = ca.issue(&peer, &sans, Validity::days(days))?;
        let (cert, key) = issue::paths(dir, &peer);
        issue::write_file(&key, issued.key_pem.as_bytes(), 0o600, false)?;
        issue::write_file(&cert, issued.cert_pem.as_bytes(), 0o644, false)?;
        written_list.push(written(&peer, &cert, &key));
    }
    Ok(written_list)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn members_name_their_hosts() {
        let (peer, sans) = parse_member("2=10.0.0.2, coord-2").expect("valid");
        assert_eq!(peer.member_id(), Some(2));
        assert_eq!(sans, ["10.0.0.2", "coord-2"]);
        assert!(parse_member("0").is_err());
        assert!(parse_member("x=host").is_err());
        assert_eq!(parse_member("3").expect("valid").1, Vec::<String>::new());
    }
}
