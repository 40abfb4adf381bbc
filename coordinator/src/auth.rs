//! Who may call what. Every handler asks here first, with the identity the TLS handshake
//! proved (`venom_tls::ConnInfo`, attached by the listener to every request).
//!
//! | RPC | roles |
//! |---|---|
//! | `SubmitWave`, `GetWave`, `ListWaves`, `WatchWave`, `ListTasks`, `GetLogs`, `ListNodes` | client, admin |
//! | `CancelWave` | the wave's owner (client), or admin |
//! | `ClusterStatus` | client, admin, member |
//! | `DrainNode`, `AddMember`, `RemoveMember` | admin |
//! | `WorkerService.Connect` | worker, registering under its certificate's name |
//! | `RaftService.Send` | member, sending as its certificate's id |
//!
//! A plaintext connection (loopback, or a coordinator started `--insecure`) carries no
//! identity: its caller may do everything and owns its waves anonymously.

// `tonic::Status` is large, and it is what every handler returns.
#![allow(clippy::result_large_err)]

use std::sync::Arc;

use tonic::{Request, Status};
use venom_tls::{ConnInfo, Peer, Role};

/// Roles that may read and submit.
pub const USERS: &[Role] = &[Role::Client, Role::Admin];
/// Roles that may read the cluster's membership.
pub const STATUS_READERS: &[Role] = &[Role::Client, Role::Admin, Role::Member];
/// Roles that may change the cluster.
pub const ADMINS: &[Role] = &[Role::Admin];

/// The caller of one request.
#[derive(Debug, Clone)]
pub enum Caller {
    /// Plaintext: nobody in particular, allowed everything.
    Anonymous,
    /// Proven by a certificate of the cluster CA.
    Peer(Arc<Peer>),
}

impl Caller {
    /// The caller of `request`.
    pub fn of<T>(request: &Request<T>) -> Result<Self, Status> {
        match request.extensions().get::<ConnInfo>() {
            Some(ConnInfo {
                tls: true,
                peer: Some(peer),
                ..
            }) => Ok(Caller::Peer(peer.clone())),
            Some(ConnInfo {
                tls: true,
                peer: None,
                ..
            }) => Err(Status::permission_denied(
                "the client certificate names no Venom identity (issue one with `venomctl tls issue`)",
            )),
            // A connection the listener accepted in plaintext, or a service called without
            // the listener (in-process tests).
            Some(ConnInfo { tls: false, .. }) | None => Ok(Caller::Anonymous),
        }
    }

    /// The caller of `request`, if its role is one of `roles`.
    pub fn require<T>(request: &Request<T>, roles: &[Role], rpc: &str) -> Result<Self, Status> {
        let caller = Self::of(request)?;
        caller.check(roles, rpc)?;
        Ok(caller)
    }

    /// Refuses a caller whose role is not one of `roles`.
    pub fn check(&self, roles: &[Role], rpc: &str) -> Result<(), Status> {
        match self {
            Caller::Anonymous => Ok(()),
            Caller::Peer(peer) if roles.contains(&peer.role) => Ok(()),
            Caller::Peer(peer) => Err(Status::permission_denied(format!(
                "{rpc} needs a certificate of role {}; this one is {peer}",
                roles
                    .iter()
                    .map(|r| r.as_str())
                    .collect::<Vec<_>>()
                    .join(" or ")
            ))),
        }
    }

    /// Who a wave submitted by this caller belongs to ("" when anonymous).
    pub fn owner(&self) -> String {
        match self {
            Caller::Anonymous => String::new(),
            Caller::Peer(peer) => peer.name.clone(),
        }
    }

    /// Whether this caller may cancel a wave owned by `owner`: admins and anonymous
    /// callers any, clients their own.
    pub fn may_cancel(&self, owner: &str) -> bool {
        match self {
            Caller::Anonymous => true,
            Caller::Peer(peer) => match peer.role {
                Role::Admin => true,
                Role::Client => peer.name == owner,
                Role::Member | Role::Worker => false,
            },
        }
    }

    /// Refuses a worker registering under a name its certificate does not carry.
    pub fn check_worker_name(&self, name: &str) -> Result<(), Status> {
        match self {
            Caller::Peer(peer) if peer.role == Role::Worker && peer.name != name => {
                Err(Status::permission_denied(format!(
                    "this worker certificate is for node `{}`, not `{name}`",
                    peer.name
                )))
            }
            _ => Ok(()),
        }
    }

    /// Refuses a member sending raft messages as another member.
    pub fn check_member_id(&self, from: u64) -> Result<(), Status> {
        match self {
            Caller::Peer(peer) if peer.member_id() != Some(from) => {
                Err(Status::permission_denied(format!(
                    "raft messages from member {from} need member {from}'s certificate; this one is {peer}"
                )))
            }
            _ => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn peer(role: Role, name: &str) -> Caller {
        Caller::Peer(Arc::new(Peer::new(role, name).expect("peer")))
    }

    #[test]
    fn roles_owners_and_names() {
        assert!(peer(Role::Client, "a").check(USERS, "SubmitWave").is_ok());
        let denied = peer(Role::Worker, "n").check(USERS, "SubmitWave");
        assert_eq!(
            denied.expect_err("worker").code(),
            tonic::Code::PermissionDenied
        );
        assert!(peer(Role::Client, "a").check(ADMINS, "AddMember").is_err());
        assert!(Caller::Anonymous.check(ADMINS, "AddMember").is_ok());

        assert!(peer(Role::Client, "a").may_cancel("a"));
        assert!(!peer(Role::Client, "a").may_cancel("b"));
        assert!(peer(Role::Admin, "root").may_cancel("b"));
        assert!(!peer(Role::Worker, "a").may_cancel("a"));

        assert!(peer(Role::Worker, "n1").check_worker_name("n1").is_ok());
        assert!(peer(Role::Worker, "n1").check_worker_name("n2").is_err());
        assert!(peer(Role::Member, "2").check_member_id(2).is_ok());
        assert!(peer(Role::Member, "2").check_member_id(3).is_err());
        assert!(peer(Role::Client, "2").check_member_id(2).is_err());
    }

    #[test]
    fn tls_without_an_identity_is_refused_and_plaintext_is_anonymous() {
        let mut request = Request::new(());
        request.extensions_mut().insert(ConnInfo {
            remote: None,
            tls: true,
            peer: None,
        });
        assert!(Caller::of(&request).is_err());
        let mut request = Request::new(());
        request.extensions_mut().insert(ConnInfo {
            remote: None,
            tls: false,
            peer: None,
        });
        assert!(matches!(Caller::of(&request), Ok(Caller::Anonymous)));
    }
}
