//! What reaches sled between turns: checkpoints of the applied state, log compaction up to
//! (never past) the checkpoint, installing a snapshot, and re-sending lost snapshots.

use super::*;

/// How often applied state is checkpointed to sled. Between checkpoints the raft log
/// (flushed on every `Ready`) is the durable record; a restart re-applies the entries
/// after the checkpoint's applied index.
pub(super) const PERSIST_INTERVAL_US: u64 = 200_000;

/// Checkpoint early when this many micro-tasks are waiting to be written.
pub(super) const PERSIST_MAX_DIRTY_TASKS: usize = 100_000;

/// Applied entries a compaction keeps (at most half the compaction threshold), so a
/// follower that lags a little catches up from the log rather than by snapshot.
pub(super) const COMPACT_KEEP_ENTRIES: u64 = 1_000;

/// A follower still waiting for its snapshot after this long is assumed to have lost it
/// (the transport drops messages silently) and is sent a fresh one.
pub(super) const SNAPSHOT_RETRY_US: u64 = 10_000_000;

/// Runs blocking disk work without stalling a multi-threaded runtime.
pub(super) fn blocking<R>(f: impl FnOnce() -> R) -> R {
    match tokio::runtime::Handle::try_current() {
        Ok(h) if h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread => {
            tokio::task::block_in_place(f)
        }
        _ => f(),
    }
}

impl<T: Transport> Replica<T> {
    /// Installs a snapshot from the leader: the state machine, its checkpoint and the log
    /// are replaced (made durable by the flush that follows in `on_ready`).
    pub(super) fn apply_snapshot(
        &mut self,
        snapshot: &raft::eraftpb::Snapshot,
    ) -> Result<(), ReplicaError> {
        let index = snapshot.get_metadata().index;
        {
            let mut state = match self.shared.state.write() {
                Ok(s) => s,
                Err(poisoned) => poisoned.into_inner(),
            };
            blocking(|| self.store.apply_snapshot(snapshot, &mut state))?;
        }
        tracing::info!(
            index,
            bytes = snapshot.get_data().len(),
            "caught up by snapshot: installed the leader's state-machine snapshot"
        );
        self.applied = index;
        self.persisted_applied = index;
        self.last_persist_us = self.clock.now_us();
        self.refresh_members()?;
        self.shared.applied.send_replace(index);
        Ok(())
    }

    /// raft-rs sends nothing more to a follower that is waiting for a snapshot until the
    /// snapshot is reported; the transport cannot tell whether it arrived, so one still
    /// pending after `SNAPSHOT_RETRY` is reported lost and raft sends another.
    pub(super) fn retry_lost_snapshots(&mut self) {
        let now = self.clock.now_us();
        let mut lost = Vec::new();
        let mut waiting = BTreeMap::new();
        for (id, pr) in self.raw.raft.prs().iter() {
            if pr.state == ProgressState::Snapshot {
                if !self.snapshot_since_us.contains_key(id) {
                    tracing::info!(
                        peer = id,
                        matched = pr.matched,
                        "member too far behind the log: catching it up by snapshot"
                    );
                }
                let since = self.snapshot_since_us.get(id).copied().unwrap_or(now);
                if now.saturating_sub(since) >= SNAPSHOT_RETRY_US {
                    lost.push(*id);
                } else {
                    waiting.insert(*id, since);
                }
            }
        }
        lost.sort_unstable();
        self.snapshot_since_us = waiting;
        for id in lost {
            tracing::warn!(peer = id, "snapshot not acknowledged, sending another");
            self.raw.report_snapshot(id, SnapshotStatus::Failure);
        }
    }

    /// After a checkpoint: compacts the log when it holds more than
    /// `compact_after_entries` entries at or below the checkpoint, keeping the last
    /// applied ones for followers that lag a little. The checkpoint is flushed first, so
    /// the log is never shorter on disk than the state it would be replayed onto.
    pub(super) fn maybe_compact(&mut self) -> Result<(), ReplicaError> {
        let threshold = self.config.compact_after_entries.max(1);
        let first = self.store.first_log_index()?;
        let below = (self.persisted_applied + 1).saturating_sub(first);
        if below <= threshold {
            return Ok(());
        }
        let keep = COMPACT_KEEP_ENTRIES.min(threshold / 2);
        let to_index = self.persisted_applied.saturating_sub(keep);
        blocking(|| -> Result<(), StoreError> {
            self.store.flush()?;
            let snapshot_index = self.store.compact(to_index)?;
            tracing::debug!(snapshot_index, "raft log compacted");
            Ok(())
        })?;
        Ok(())
    }

    /// Writes the state changed since the last checkpoint, with its applied index, in one
    /// atomic batch (made durable by the next flush).
    ///
    /// Runs between turns, never inside `on_ready`: by then the hard state with the commit
    /// index covering `applied` has been written, so a checkpoint can never reach the disk
    /// ahead of the commit index it depends on.
    pub(super) fn checkpoint(&mut self, force: bool) -> Result<(), ReplicaError> {
        if self.persisted_applied == self.applied {
            return Ok(());
        }
        let mut state = match self.shared.state.write() {
            Ok(s) => s,
            Err(poisoned) => poisoned.into_inner(),
        };
        if !force
            && self.clock.now_us().saturating_sub(self.last_persist_us) < PERSIST_INTERVAL_US
            && state.dirty.tasks.len() < PERSIST_MAX_DIRTY_TASKS
        {
            return Ok(());
        }
        self.store.persist_state(&mut state, self.applied)?;
        drop(state);
        self.persisted_applied = self.applied;
        self.last_persist_us = self.clock.now_us();
        self.maybe_compact()
    }
}
