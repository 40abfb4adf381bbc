//! Who the members are: role changes, raft conf changes one member at a time (adding a
//! coordinator, removing one — the leader itself included), which members have started,
//! and stopping a member that lost acknowledged entries.

use super::*;

/// One membership change.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MemberChange {
    Add { id: u64, address: String },
    Remove { id: u64 },
}

/// A leader that applied its own removal (it won an election while the change, proposed
/// by an earlier leader, was still uncommitted, then committed it) steps down at once,
/// before raft sees anything else: raft-rs would keep it leading a configuration
/// without it, and panic as soon as it looks up its own progress (persisted entries,
/// an append response). The members elect a leader among themselves; this replica, no
/// longer promotable, never campaigns again.
pub(super) fn step_down_if_removed(raw: &mut RawNode<Store>, id: u64) {
    let raft = &mut raw.raft;
    if raft.state == StateRole::Leader && !raft.prs().conf().voters().contains(id) {
        tracing::warn!("removed from the cluster while leading; stepping down");
        let term = raft.term;
        raft.become_follower(term, raft::INVALID_ID);
    }
}

impl<T: Transport> Replica<T> {
    pub(super) fn track_role(&mut self) {
        let is_leader = self.raw.raft.state == StateRole::Leader;
        if self.was_leader && !is_leader {
            let err = self.not_leader();
            self.fail_pending(err);
            self.workers.clear();
            self.registering.clear();
            self.started_proposed.clear();
        }
        if !self.was_leader && is_leader {
            self.leases.reset(self.clock.monotonic_ms());
            if self.cluster_id == 0 {
                // The first leader names the cluster; a random id from this life's nonce
                // and the clock (never 0).
                let cluster_id = (self.boot_nonce ^ self.clock.now_us().rotate_left(29)) | 1;
                self.propose(Command::SetClusterId { cluster_id }, vec![None]);
            }
        }
        self.was_leader = is_leader;
    }

    /// On the leader: records in the replicated state every member that has made the log
    /// durable past the founding point, so that one found later with an empty data dir
    /// is known to have lost its data (it refuses to found the cluster again).
    pub(super) fn propose_members_started(&mut self) {
        let ids: Vec<u64> = {
            let Ok(state) = self.shared.state.read() else {
                return;
            };
            self.raw
                .raft
                .prs()
                .iter()
                .filter(|(id, pr)| {
                    pr.matched > BOOTSTRAP_INDEX
                        && state.members.contains_key(*id)
                        && !state.members_started.contains(*id)
                        && !self.started_proposed.contains(*id)
                })
                .map(|(id, _)| *id)
                .collect()
        };
        if ids.is_empty() {
            return;
        }
        self.started_proposed.extend(ids.iter().copied());
        let mut ids = ids;
        ids.sort_unstable();
        self.propose(Command::MembersStarted { ids }, vec![None]);
    }

    /// A heartbeat's commit index is at most what this member acknowledged to its sender.
    /// One beyond this member's last log index means the data dir lost entries it had made
    /// durable (a restored backup, a disk that did not keep its writes): raft-rs would
    /// panic on it, and taking part would let this member vote without them.
    pub(super) fn check_acknowledged_log(&mut self, m: &RaftMessage) -> Option<DataDirError> {
        use raft::eraftpb::MessageType;
        let last_index = self.raw.raft.raft_log.last_index();
        if m.get_msg_type() != MessageType::MsgHeartbeat || m.commit <= last_index {
            return None;
        }
        Some(DataDirError::Behind {
            dir: self.store.dir().to_path_buf(),
            member_id: self.config.id,
            peer: m.from,
            acknowledged: m.commit,
            last_index,
        })
    }

    /// On the leader: whether `m` is a follower's rejection showing that its log ends below
    /// committed entries it acknowledged (a restored backup, a disk that lost writes). Such a
    /// rejection is not stepped, so raft does not send the entries again and let the follower
    /// carry on as if it had never lost them: the next heartbeat names a commit index beyond
    /// its log and stops it (`check_acknowledged_log`). A stale rejection (sent before the
    /// follower acknowledged) is harmless to drop, as raft itself drops stale ones.
    pub(super) fn follower_lost_acknowledged(&mut self, m: &RaftMessage) -> bool {
        use raft::eraftpb::MessageType;
        let raft = &self.raw.raft;
        if raft.state != StateRole::Leader
            || m.get_msg_type() != MessageType::MsgAppendResponse
            || !m.reject
            || m.term != raft.term
        {
            return false;
        }
        let Some(progress) = raft.prs().get(m.from) else {
            return false;
        };
        let acknowledged = progress.matched.min(raft.raft_log.committed);
        if m.reject_hint >= acknowledged {
            return false;
        }
        if self.lost_data_warned.insert((m.from, raft.term)) {
            tracing::warn!(
                member = m.from,
                log_ends_at = m.reject_hint,
                acknowledged,
                "a member's log ends below committed entries it acknowledged: it lost writes \
                 it had made durable; not sending them again (its next heartbeat stops it)"
            );
        }
        true
    }

    /// Takes the members' addresses from the replicated state after a conf change or a
    /// snapshot, and tells the transport; a cluster id seen for the first time is also
    /// recorded in the data directory's identity file.
    pub(super) fn refresh_members(&mut self) -> Result<(), ReplicaError> {
        let (members, cluster_id) = {
            let state = self.shared.read_state();
            (state.members.clone(), state.cluster_id)
        };
        if cluster_id != self.cluster_id {
            self.cluster_id = cluster_id;
            self.transport.set_cluster_id(cluster_id);
            blocking(|| self.store.record_cluster_id(self.config.id, cluster_id))?;
        }
        if !members.is_empty() && members != self.members {
            self.members = members;
            self.transport.set_members(&self.members);
        }
        Ok(())
    }

    /// Proposes one membership change (raft's simple, one-member-at-a-time conf change:
    /// any two successive memberships share a majority, so no joint phase is needed).
    /// Refused when another change is still uncommitted, when it would do nothing, or when
    /// it would leave no member. Removing the leader itself first hands leadership to the
    /// most up-to-date follower and answers "not leader", so the client retries there.
    pub(super) fn propose_member_change(&mut self, change: MemberChange, reply: Reply) {
        if self.raw.raft.state != StateRole::Leader {
            let _ = reply.send(Err(self.not_leader()));
            return;
        }
        if self.raw.raft.lead_transferee.is_some() {
            // Leadership is moving; the client waits a moment and asks again.
            let _ = reply.send(Err(ProposeError::NotLeader { leader_addr: None }));
            return;
        }
        let voters: BTreeSet<u64> = self.raw.raft.prs().conf().voters().ids().iter().collect();
        let refuse = |reply: Reply, why: String| {
            let _ = reply.send(Err(ProposeError::Invalid(why)));
        };
        if self.raw.raft.has_pending_conf() {
            return refuse(
                reply,
                "another membership change is still being committed; retry in a moment".into(),
            );
        }
        let mut cc = ConfChange::default();
        match &change {
            MemberChange::Add { id, address } => {
                if *id == 0 {
                    return refuse(reply, "id: coordinator ids start at 1".into());
                }
                if voters.contains(id) {
                    return refuse(reply, format!("id: coordinator {id} is already a member"));
                }
                if let Some((other, _)) = self.members.iter().find(|(_, a)| *a == address) {
                    return refuse(
                        reply,
                        format!("address: {address} already belongs to coordinator {other}"),
                    );
                }
                cc.set_change_type(ConfChangeType::AddNode);
                cc.node_id = *id;
                cc.context = address.clone().into_bytes().into();
            }
            MemberChange::Remove { id } => {
                if !voters.contains(id) {
                    return refuse(reply, format!("id: coordinator {id} is not a member"));
                }
                if voters.len() == 1 {
                    return refuse(reply, format!("id: coordinator {id} is the last member"));
                }
                if *id == self.config.id {
                    let target = self
                        .raw
                        .raft
                        .prs()
                        .iter()
                        .filter(|(pid, _)| **pid != self.config.id && voters.contains(*pid))
                        .max_by_key(|(pid, pr)| (pr.matched, std::cmp::Reverse(**pid)))
                        .map(|(pid, _)| *pid);
                    if let Some(target) = target {
                        tracing::info!(to = target, "handing leadership over before leaving");
                        self.raw.transfer_leader(target);
                        let _ = reply.send(Err(ProposeError::NotLeader { leader_addr: None }));
                        return;
                    }
                }
                cc.set_change_type(ConfChangeType::RemoveNode);
                cc.node_id = *id;
            }
        }
        let (id, ctx) = self.next_context();
        match self.raw.propose_conf_change(ctx, cc) {
            Ok(()) => {
                self.pending.insert(
                    id,
                    Pending {
                        replies: vec![Some(reply)],
                    },
                );
            }
            Err(e) => {
                let err = match e {
                    raft::Error::ProposalDropped => self.not_leader(),
                    other => ProposeError::Raft(other.to_string()),
                };
                let _ = reply.send(Err(err));
            }
        }
    }
}
