//! The leader's side of worker leases: when it last granted each node a lease, on its own
//! monotonic clock, and which nodes' leases have run out.
//!
//! A worker may run and start attempts only while it holds a lease. The leader grants one
//! when a worker's registration or heartbeat is committed (`Effect::Lease`); the worker counts
//! it from when it *sent* that message, the leader from when it granted it, which is later. A
//! worker whose lease ends kills its attempts and starts nothing (it is fenced); the leader
//! re-dispatches a node's attempts only once `lease + margin` has passed since its last grant.
//!
//! Timing assumption: clocks need not agree on the time, but their rates differ by at most 1%
//! (ρ = 0.01), and a fenced worker's process groups are dead within 1 s of its lease's end.
//! Then the leader's wait, `lease + margin` with `margin = lease / 10 + 1 s`, is longer in
//! real time than the worker's `lease` plus the kill, since `lease / 10 ≥ 2ρ·lease / (1 − ρ)`:
//! no attempt is dispatched again while its previous one may still run.
//!
//! A new leader knows no grant of its predecessor's; every node's lease counts from its
//! election at the earliest (a grant needs a commit, and after the election nothing of the
//! old term commits).

use std::collections::{BTreeSet, HashMap};

/// The leader's extra wait beyond a lease before it re-dispatches a node's attempts.
pub const fn margin_ms(lease_ms: u64) -> u64 {
    lease_ms / 10 + 1_000
}

/// When this leader granted each node's lease (monotonic milliseconds).
#[derive(Debug)]
pub struct Leases {
    lease_ms: u64,
    /// When this member became leader: no lease counts from earlier.
    since_ms: u64,
    granted_ms: HashMap<String, u64>,
}

impl Leases {
    pub fn new(lease_ms: u64) -> Self {
        Self {
            lease_ms,
            since_ms: 0,
            granted_ms: HashMap::new(),
        }
    }

    /// How long a grant lets a worker run, in milliseconds.
    pub fn lease_ms(&self) -> u64 {
        self.lease_ms
    }

    /// This member became leader at `now_ms`: every node's lease counts from now.
    pub fn reset(&mut self, now_ms: u64) {
        self.since_ms = now_ms;
        self.granted_ms.clear();
    }

    /// `node` was granted a lease at `now_ms`.
    pub fn granted(&mut self, node: &str, now_ms: u64) {
        let since = self.since_ms;
        let at = self.granted_ms.entry(node.to_owned()).or_insert(since);
        *at = (*at).max(now_ms);
    }

    /// How long `node` has gone without a grant at `now_ms`.
    pub fn silent_ms(&self, node: &str, now_ms: u64) -> u64 {
        let granted = self.granted_ms.get(node).copied().unwrap_or(self.since_ms);
        now_ms.saturating_sub(granted.max(self.since_ms))
    }

    /// Those of `nodes` whose lease and margin have run out at `now_ms`.
    pub fn expired<'a>(
        &self,
        nodes: impl IntoIterator<Item = &'a str>,
        now_ms: u64,
    ) -> BTreeSet<String> {
        let wait = self.lease_ms.saturating_add(margin_ms(self.lease_ms));
        nodes
            .into_iter()
            .filter(|node| self.silent_ms(node, now_ms) > wait)
            .map(str::to_owned)
            .collect()
    }

    /// Forgets a node (its stream is gone for good or it was removed).
    pub fn forget(&mut self, node: &str) {
        self.granted_ms.remove(node);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_margin_covers_one_percent_rate_drift_and_a_second_to_kill() {
        for lease_ms in [1_000, 10_000, 60_000, 3_600_000] {
            let rho = 0.01_f64;
            let needed = 2.0 * rho * lease_ms as f64 / (1.0 - rho) + 1_000.0;
            assert!(margin_ms(lease_ms) as f64 >= needed, "lease {lease_ms}");
        }
    }

    #[test]
    fn a_lease_expires_after_lease_plus_margin_from_the_last_grant_or_the_election() {
        let mut leases = Leases::new(10_000);
        let wait = 10_000 + margin_ms(10_000);
        leases.reset(1_000);
        // Unheard-of nodes count from the election.
        assert!(leases.expired(["a"], 1_000 + wait).is_empty());
        assert_eq!(
            leases.expired(["a"], 1_001 + wait),
            BTreeSet::from(["a".to_owned()])
        );
        leases.granted("a", 5_000);
        assert!(leases.expired(["a"], 5_000 + wait).is_empty());
        assert_eq!(leases.expired(["a"], 5_001 + wait).len(), 1);
        // An older grant never moves it back.
        leases.granted("a", 4_000);
        assert_eq!(leases.silent_ms("a", 6_000), 1_000);
        // A new term forgets every grant of the old one but gives a full lease again.
        leases.reset(100_000);
        assert_eq!(leases.silent_ms("a", 100_500), 500);
        assert!(leases.expired(["a", "b"], 100_000 + wait).is_empty());
        leases.forget("a");
        assert_eq!(leases.silent_ms("a", 100_500), 500);
    }
}
