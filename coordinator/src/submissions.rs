//! The submissions the state machine remembers, so that a retried `SubmitWave` finds the
//! wave it already created instead of creating a second one.
//!
//! A client names each submission with an id of its own (`venomctl` draws 16 random bytes
//! per invocation, or takes `--submission-id`) and sends the same id on every retry. A
//! submit can be committed and still look failed to its client — the leader crashed or
//! lost its leadership before answering — so only the state machine, at the point of the
//! log where the retry applies, can tell whether it is new. Ids are scoped to the owner
//! (the name on the caller's certificate): one user's id never answers another's wave.
//!
//! Bounded, like everything: at most [`MAX_SUBMISSIONS`] ids, none kept longer than
//! [`SUBMISSION_TTL_MS`] by the `now_ms` of the submits that follow it. Both bounds apply
//! while applying a command, so every replica forgets the same ids at the same index.
//! Pure like the rest of the state machine: no clock, no randomness, ordered maps only.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use venom_core::WaveId;

/// Most submission ids remembered; beyond it the oldest is forgotten.
pub const MAX_SUBMISSIONS: usize = 100_000;
/// How long a submission id is remembered (by the leader time stamped in later submits).
pub const SUBMISSION_TTL_MS: u64 = 24 * 60 * 60 * 1_000;
/// Longest submission id accepted.
pub const MAX_SUBMISSION_ID_BYTES: usize = 64;

/// Why a submission id is refused (the gRPC handler answers `INVALID_ARGUMENT`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SubmissionIdError {
    #[error(
        "field `submission_id`: {n_bytes} bytes, at most {MAX_SUBMISSION_ID_BYTES} are \
         allowed (32 hex characters are plenty)"
    )]
    TooLong { n_bytes: usize },
    #[error(
        "field `submission_id`: byte {position} is not printable ASCII (use letters, digits \
         and punctuation, no spaces)"
    )]
    NotPrintable { position: usize },
}

/// Checks a client's submission id: empty (not idempotent), or at most
/// [`MAX_SUBMISSION_ID_BYTES`] bytes of printable ASCII without spaces.
pub fn check_submission_id(id: &str) -> Result<(), SubmissionIdError> {
    if id.len() > MAX_SUBMISSION_ID_BYTES {
        return Err(SubmissionIdError::TooLong { n_bytes: id.len() });
    }
    match id.bytes().position(|b| !b.is_ascii_graphic()) {
        Some(position) => Err(SubmissionIdError::NotPrintable { position }),
        None => Ok(()),
    }
}

/// One remembered submission: who sent which id, and what it created.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Submission {
    /// Who submitted it: the name on their certificate ("" when anonymous).
    pub owner: String,
    /// The client's id for this submission (never empty).
    pub id: String,
    /// The wave it created.
    pub wave_id: WaveId,
    /// Micro-tasks of that wave (a retry is answered exactly as the first submit was).
    pub n_micro_tasks: u64,
    /// Leader time of the submit that created the wave.
    pub submitted_ms: u64,
}

/// The remembered submissions, oldest first.
#[derive(Debug, Default)]
pub struct Submissions {
    /// Every remembered submission by the wave it created. Wave ids only grow, so the
    /// first entry is the oldest: forgetting is a pop from the front.
    by_wave: BTreeMap<WaveId, Submission>,
    /// (owner, id) → the wave (an index over `by_wave`, rebuilt on load).
    by_key: BTreeMap<(String, String), WaveId>,
}

impl Submissions {
    /// How many submissions are remembered.
    pub fn len(&self) -> usize {
        self.by_wave.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_wave.is_empty()
    }

    /// The submission `owner` named `id`, if it is remembered.
    pub fn find(&self, owner: &str, id: &str) -> Option<&Submission> {
        let wave_id = self.by_key.get(&(owner.to_owned(), id.to_owned()))?;
        self.by_wave.get(wave_id)
    }

    /// The submission that created `wave_id`, if it is remembered.
    pub fn get(&self, wave_id: WaveId) -> Option<&Submission> {
        self.by_wave.get(&wave_id)
    }

    /// Every remembered submission, oldest first.
    pub fn iter(&self) -> impl Iterator<Item = &Submission> {
        self.by_wave.values()
    }

    /// Remembers `submission` (replacing one of the same owner and id), then forgets the
    /// oldest beyond [`MAX_SUBMISSIONS`]. Returns the waves whose submissions changed
    /// (added or forgotten), for the dirty set.
    pub fn insert(&mut self, submission: Submission) -> Vec<WaveId> {
        let mut changed = vec![submission.wave_id];
        let key = (submission.owner.clone(), submission.id.clone());
        if let Some(previous) = self.by_key.insert(key, submission.wave_id) {
            if previous != submission.wave_id {
                self.by_wave.remove(&previous);
                changed.push(previous);
            }
        }
        self.by_wave.insert(submission.wave_id, submission);
        while self.by_wave.len() > MAX_SUBMISSIONS {
            match self.pop_oldest() {
                Some(wave_id) => changed.push(wave_id),
                None => break,
            }
        }
        changed
    }

    /// Forgets every submission more than [`SUBMISSION_TTL_MS`] older than `now_ms`
    /// (a leader whose clock is behind forgets nothing early). Returns the waves whose
    /// submissions were forgotten.
    pub fn expire(&mut self, now_ms: u64) -> Vec<WaveId> {
        let mut forgotten = Vec::new();
        while let Some(oldest) = self.by_wave.values().next() {
            if now_ms.saturating_sub(oldest.submitted_ms) <= SUBMISSION_TTL_MS {
                break;
            }
            match self.pop_oldest() {
                Some(wave_id) => forgotten.push(wave_id),
                None => break,
            }
        }
        forgotten
    }

    /// Replaces everything with `submissions` (from a snapshot or the disk), keeping at
    /// most [`MAX_SUBMISSIONS`] of the newest.
    pub fn restore(&mut self, submissions: impl IntoIterator<Item = Submission>) {
        *self = Self::default();
        for submission in submissions {
            self.insert(submission);
        }
    }

    fn pop_oldest(&mut self) -> Option<WaveId> {
        let (wave_id, oldest) = self.by_wave.pop_first()?;
        let key = (oldest.owner, oldest.id);
        if self.by_key.get(&key) == Some(&wave_id) {
            self.by_key.remove(&key);
        }
        Some(wave_id)
    }
}

#[cfg(test)]
mod tests {
    use venom_core::wave::{parse_wave, Format, WaveLimits};

    use super::*;
    use crate::state::{Command, Outcome, State};
    use crate::storage::Store;

    const WAVE: &str = "name = \"w\"\n[[task]]\nid = \"a\"\narray = 3\nrun = \"true\"\n";

    /// Applies a submit of [`WAVE`] by `owner` as `id` at `now_ms`; returns the wave id.
    fn submit(state: &mut State, owner: &str, id: &str, now_ms: u64) -> WaveId {
        let spec = parse_wave(WAVE.as_bytes(), Format::Toml, &WaveLimits::default())
            .expect("a valid wave");
        match state.apply(Command::SubmitWave {
            owner: owner.to_owned(),
            spec,
            traceparent: String::new(),
            submission_id: id.to_owned(),
            now_ms,
        }) {
            Outcome::WaveSubmitted {
                wave_id,
                n_micro_tasks,
            } => {
                assert_eq!(n_micro_tasks, 3, "a retry is answered as the first submit");
                wave_id
            }
            other => panic!("submit failed: {other:?}"),
        }
    }

    fn submission(wave_id: WaveId, id: &str, submitted_ms: u64) -> Submission {
        Submission {
            owner: "alice".to_owned(),
            id: id.to_owned(),
            wave_id,
            n_micro_tasks: 1,
            submitted_ms,
        }
    }

    #[test]
    fn a_known_submission_id_answers_its_wave_and_creates_nothing() {
        let mut state = State::new(WaveLimits::default());
        let first = submit(&mut state, "alice", "0123abcd", 10);
        state.dirty = Default::default();
        state.effects.clear();
        let again = submit(&mut state, "alice", "0123abcd", 20);
        assert_eq!(again, first);
        assert_eq!(state.waves.len(), 1);
        assert_eq!(state.next_wave_id, first + 1, "no wave id was used");
        assert!(state.dirty.waves.is_empty() && state.dirty.tasks.is_empty());
        assert!(state.dirty.submissions.is_empty(), "nothing new to persist");
        assert!(state.effects.is_empty());
        assert_eq!(state.submissions.len(), 1);
    }

    #[test]
    fn other_ids_other_owners_and_empty_ids_create_waves() {
        let mut state = State::new(WaveLimits::default());
        let a = submit(&mut state, "alice", "a", 1);
        let b = submit(&mut state, "alice", "b", 2);
        // Ids are the owner's: bob's "a" is not alice's.
        let bobs = submit(&mut state, "bob", "a", 3);
        // No id: not idempotent, and nothing remembered.
        let plain = submit(&mut state, "alice", "", 4);
        let plain_again = submit(&mut state, "alice", "", 5);
        let ids = [a, b, bobs, plain, plain_again];
        assert_eq!(ids, [1, 2, 3, 4, 5]);
        assert_eq!(state.waves.len(), 5);
        assert_eq!(state.submissions.len(), 3);
        assert_eq!(submit(&mut state, "bob", "a", 6), bobs);
        assert_eq!(submit(&mut state, "alice", "a", 7), a);
        assert_eq!(state.waves.len(), 5);
    }

    #[test]
    fn an_id_is_forgotten_after_its_time_to_live() {
        let mut state = State::new(WaveLimits::default());
        let first = submit(&mut state, "alice", "daily", 1_000);
        assert_eq!(
            submit(&mut state, "alice", "daily", 1_000 + SUBMISSION_TTL_MS),
            first
        );
        state.dirty = Default::default();
        // Any later submit forgets it, and the checkpoint deletes its key.
        let other = submit(&mut state, "alice", "other", 1_001 + SUBMISSION_TTL_MS);
        assert!(state.submissions.get(first).is_none());
        assert!(state.dirty.submissions.contains(&first));
        let second = submit(&mut state, "alice", "daily", 1_002 + SUBMISSION_TTL_MS);
        assert_ne!(second, first);
        assert_eq!(state.submissions.len(), 2);
        assert!(state.submissions.get(other).is_some());
        // A leader whose clock is behind forgets nothing.
        assert!(state.submissions.expire(0).is_empty());
    }

    #[test]
    fn at_most_max_submissions_are_remembered_the_oldest_forgotten_first() {
        let mut submissions = Submissions::default();
        for wave_id in 1..=MAX_SUBMISSIONS as u64 {
            let changed = submissions.insert(submission(wave_id, &format!("id-{wave_id}"), 0));
            assert_eq!(changed, [wave_id]);
        }
        assert_eq!(submissions.len(), MAX_SUBMISSIONS);
        let newest = MAX_SUBMISSIONS as u64 + 1;
        let changed = submissions.insert(submission(newest, "newest", 0));
        assert_eq!(changed, [newest, 1], "the oldest is forgotten");
        assert_eq!(submissions.len(), MAX_SUBMISSIONS);
        assert!(submissions.find("alice", "id-1").is_none());
        assert_eq!(
            submissions.find("alice", "id-2").map(|s| s.wave_id),
            Some(2)
        );
        assert_eq!(
            submissions.find("alice", "newest").map(|s| s.wave_id),
            Some(newest)
        );
        assert_eq!(submissions.iter().next().map(|s| s.wave_id), Some(2));
    }

    #[test]
    fn remembered_submissions_survive_a_checkpoint_a_restart_and_a_snapshot() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut state = State::new(WaveLimits::default());
        let forgotten = submit(&mut state, "bob", "forgotten", 1);
        let kept = submit(&mut state, "alice", "kept", 10);
        {
            let store = Store::open(dir.path()).expect("open");
            store.persist_state(&mut state, 10).expect("persist");
            // A day later, bob's id is forgotten and so is its key.
            submit(&mut state, "carol", "later", 2 + SUBMISSION_TTL_MS);
            store.persist_state(&mut state, 11).expect("persist");
            store.flush().expect("flush");
        }
        let store = Store::open(dir.path()).expect("reopen");
        let mut loaded = State::new(WaveLimits::default());
        assert_eq!(store.load_state(&mut loaded).expect("load"), 11);
        let remembered: Vec<_> = loaded.submissions.iter().cloned().collect();
        assert_eq!(
            remembered,
            state.submissions.iter().cloned().collect::<Vec<_>>()
        );
        assert_eq!(
            remembered.iter().map(|s| s.id.as_str()).collect::<Vec<_>>(),
            ["kept", "later"]
        );
        assert!(loaded.submissions.get(forgotten).is_none());
        // The restarted member still answers a retry with the wave it created.
        assert_eq!(
            submit(&mut loaded, "alice", "kept", 4 + SUBMISSION_TTL_MS),
            kept
        );
        assert_eq!(loaded.waves.len(), 3);
        // A follower installing a snapshot knows them too.
        let mut follower = State::new(WaveLimits::default());
        follower.restore(std::mem::take(&mut loaded).into_snapshot());
        assert_eq!(
            follower.submissions.iter().cloned().collect::<Vec<_>>(),
            remembered
        );
        assert_eq!(
            submit(&mut follower, "alice", "kept", 5 + SUBMISSION_TTL_MS),
            kept
        );
    }

    #[test]
    fn submission_ids_are_checked() {
        assert_eq!(check_submission_id(""), Ok(()));
        assert_eq!(check_submission_id(&"f".repeat(64)), Ok(()));
        assert_eq!(check_submission_id("retry-7/nightly:ETL"), Ok(()));
        assert_eq!(
            check_submission_id(&"f".repeat(65)),
            Err(SubmissionIdError::TooLong { n_bytes: 65 })
        );
        assert_eq!(
            check_submission_id("a b"),
            Err(SubmissionIdError::NotPrintable { position: 1 })
        );
        assert_eq!(
            check_submission_id("é"),
            Err(SubmissionIdError::NotPrintable { position: 0 })
        );
        let text = check_submission_id("\n")
            .expect_err("a newline")
            .to_string();
        assert!(text.contains("submission_id"), "{text}");
    }
}
