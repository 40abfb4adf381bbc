//! The cluster as one member sees it (`ClusterStatus`), and as every member sees itself
//! (`all_members`: each other member is asked for its own row, concurrently).

use std::collections::BTreeMap;
use std::time::Duration;

use raft::StateRole;
use venom_core::mobius;
use venom_proto::v1 as pb;

use crate::replica::Handle;
use crate::state::{Node, NodeState};

/// This member's view of the cluster: its own row first-hand, the others as far as it
/// knows them (the leader knows each follower's matched index).
/// A raft role on the wire.
fn member_role(role: StateRole) -> pb::MemberRole {
    match role {
        StateRole::Leader => pb::MemberRole::Leader,
        StateRole::Follower => pb::MemberRole::Follower,
        StateRole::Candidate => pb::MemberRole::Candidate,
        StateRole::PreCandidate => pb::MemberRole::PreCandidate,
    }
}

pub fn own_view(handle: &Handle) -> pb::ClusterStatusResponse {
    let status = handle.status();
    let state = handle.read_state();
    let inputs: Vec<mobius::NodeModelInput> = state
        .nodes
        .values()
        .filter(|n| n.state == NodeState::Ready)
        .map(Node::model_input)
        .collect();
    let started = state.members_started.clone();
    drop(state);
    let model = mobius::cluster_model(&inputs);
    let leader_matched = status.matched.clone();
    let members = status
        .members
        .iter()
        .map(|(&id, addr)| {
            let is_self = id == status.id;
            let matched = leader_matched.get(&id).copied();
            pb::ClusterMember {
                id,
                address: addr.clone(),
                role: if is_self {
                    member_role(status.role)
                } else if id == status.leader_id {
                    pb::MemberRole::Leader
                } else {
                    pb::MemberRole::Follower
                }
                .into(),
                term: status.term,
                commit_index: if is_self { status.commit } else { 0 },
                applied_index: if is_self {
                    status.applied
                } else {
                    matched.unwrap_or(0)
                },
                lag: if is_self {
                    status.commit.saturating_sub(status.applied)
                } else {
                    matched.map_or(0, |m| status.last_index.saturating_sub(m))
                },
                reported: is_self,
                leader_id: if is_self { status.leader_id } else { 0 },
                started: started.contains(&id),
            }
        })
        .collect();
    pb::ClusterStatusResponse {
        leader_id: status.leader_id,
        term: status.term,
        members,
        theta_cluster: model.map_or(0.0, |m| m.theta),
        lambda_cluster: model.map_or(0.0, |m| m.lambda),
        n_cluster: model.map_or(0, |m| m.n),
        s_total_cluster: model.map_or(0.0, |m| m.s_total),
        n_nodes_ready: inputs.len() as u32,
        commit_index: status.commit,
        applied_index: status.applied,
        cluster_id: status.cluster_id,
    }
}

/// How long `ClusterStatus { all_members }` waits for each member's own view.
const MEMBER_VIEW_TIMEOUT: Duration = Duration::from_millis(800);

/// Replaces every other member's row with the member's own view (asked concurrently);
/// a member that does not answer is shown `unreachable`. Lag is then measured against
/// the highest commit index any member reported.
pub async fn gather_member_views(view: &mut pb::ClusterStatusResponse, dialer: &venom_tls::Dialer) {
    let asks = view
        .members
        .iter()
        .filter(|m| !m.reported)
        .map(|m| {
            let (id, address) = (m.id, m.address.clone());
            async move { (id, ask_member(&address, dialer).await) }
        })
        .collect::<Vec<_>>();
    let answers: BTreeMap<u64, Option<pb::ClusterMember>> =
        futures::future::join_all(asks).await.into_iter().collect();
    for row in &mut view.members {
        match answers.get(&row.id) {
            Some(Some(own)) if own.id == row.id => {
                *row = pb::ClusterMember {
                    address: row.address.clone(),
                    started: row.started,
                    ..own.clone()
                };
            }
            Some(_) => {
                row.role = pb::MemberRole::Unreachable.into();
                row.reported = false;
            }
            None => {}
        }
    }
    let commit = view
        .members
        .iter()
        .filter(|m| m.reported)
        .map(|m| m.commit_index)
        .max()
        .unwrap_or(0);
    for row in view.members.iter_mut().filter(|m| m.reported) {
        row.lag = commit.saturating_sub(row.applied_index);
    }
}

/// One member's own row, or `None` when it does not answer in time.
async fn ask_member(address: &str, dialer: &venom_tls::Dialer) -> Option<pb::ClusterMember> {
    let view = member_view(address, MEMBER_VIEW_TIMEOUT, dialer).await?;
    view.members.into_iter().find(|m| m.reported)
}

/// A coordinator's own view of the cluster (`ClusterStatus` without asking the others),
/// or `None` when it does not answer within `timeout` (connecting included).
pub async fn member_view(
    address: &str,
    timeout: Duration,
    dialer: &venom_tls::Dialer,
) -> Option<pb::ClusterStatusResponse> {
    let endpoint = dialer
        .endpoint(address)
        .ok()?
        .connect_timeout(timeout)
        .timeout(timeout);
    let ask = async {
        let channel = endpoint.connect().await.ok()?;
        let mut client = venom_proto::v1::client_service_client::ClientServiceClient::new(channel);
        let reply = client
            .cluster_status(pb::ClusterStatusRequest { all_members: false })
            .await
            .ok()?;
        Some(reply.into_inner())
    };
    tokio::time::timeout(timeout, ask).await.ok().flatten()
}
