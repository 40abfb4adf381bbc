//! "Not the leader": the refusal a follower answers writes with, and where it points.
//!
//! The refusal is `UNAVAILABLE` with a `google.rpc.ErrorInfo` detail (the gRPC richer error
//! model): reason [`NOT_LEADER`], domain [`DOMAIN`], and the leader's client URL under the
//! metadata key `leader` when the member knows it. Clients follow the detail, never the
//! message text, which is for people.

use std::collections::HashMap;

use tonic::{Code, Status};
use tonic_types::{ErrorDetails, StatusExt};

/// `ErrorInfo.domain` of Venom's own error details.
pub const DOMAIN: &str = "venom.dev";
/// `ErrorInfo.reason` of a refusal by a member that is not the leader.
pub const NOT_LEADER: &str = "NOT_LEADER";
/// The metadata key that holds the leader's URL.
const LEADER_KEY: &str = "leader";

/// The refusal of a member that is not the leader; `leader` is the leader's client URL
/// when known.
pub fn not_leader(leader: Option<&str>) -> Status {
    let mut metadata = HashMap::new();
    if let Some(url) = leader.filter(|url| !url.is_empty()) {
        metadata.insert(LEADER_KEY.to_owned(), url.to_owned());
    }
    Status::with_error_details(
        Code::Unavailable,
        format!("not leader: leader={}", leader.unwrap_or("unknown")),
        ErrorDetails::with_error_info(NOT_LEADER, DOMAIN, metadata),
    )
}

/// Whether `status` is a not-leader refusal.
pub fn is_not_leader(status: &Status) -> bool {
    status
        .get_details_error_info()
        .is_some_and(|info| info.domain == DOMAIN && info.reason == NOT_LEADER)
}

/// The leader's URL a not-leader refusal names, if it names one.
pub fn leader_hint(status: &Status) -> Option<String> {
    let info = status.get_details_error_info()?;
    if info.domain != DOMAIN || info.reason != NOT_LEADER {
        return None;
    }
    info.metadata
        .get(LEADER_KEY)
        .filter(|url| !url.is_empty())
        .cloned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_leader_travels_as_a_detail() {
        let status = not_leader(Some("http://10.0.0.2:7070"));
        assert_eq!(status.code(), Code::Unavailable);
        assert!(is_not_leader(&status));
        assert_eq!(
            leader_hint(&status).as_deref(),
            Some("http://10.0.0.2:7070")
        );
        assert_eq!(status.message(), "not leader: leader=http://10.0.0.2:7070");

        let unknown = not_leader(None);
        assert!(is_not_leader(&unknown));
        assert_eq!(leader_hint(&unknown), None);
    }

    #[test]
    fn text_alone_is_not_a_refusal() {
        let status = Status::unavailable("not leader: leader=http://10.0.0.2:7070");
        assert!(!is_not_leader(&status));
        assert_eq!(leader_hint(&status), None);
    }

    #[test]
    fn the_detail_survives_the_wire_encoding() {
        let status = not_leader(Some("http://c2:7070"));
        let response = status.into_http();
        let back = Status::from_header_map(response.headers()).expect("decodes");
        assert_eq!(leader_hint(&back).as_deref(), Some("http://c2:7070"));
    }
}
