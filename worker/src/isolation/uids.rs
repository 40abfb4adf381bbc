//! `--run-as-uids FIRST-LAST`: a range of ids that nobody on the machine uses, from which every
//! wave's tasks get a uid of their own, so that waves are kept from each other the way
//! `--run-as` keeps tasks from the worker.
//!
//! **Mapping.** An attempt of wave `w` runs as uid `FIRST + (w mod (LAST − FIRST + 1))`, with
//! the gid of the same number and no supplementary groups ([`UidRange::ids_for_wave`]; std's
//! `Command::uid` calls `setgroups(0, NULL)`, see [`super::user`]). Wave ids grow by one per
//! submitted wave, so two waves share a uid only when their ids are congruent modulo the
//! range's size: make the range larger than the number of waves alive at once (waves whose
//! failed attempts' directories are still kept count as alive).
//!
//! **Bounds.** FIRST ≥ [`UidRange::MIN_UID`] (1000: below are the system accounts of most
//! distributions) and LAST ≤ [`UidRange::MAX_UID`] (4294967294: 4294967295 is `(uid_t) -1`,
//! which `setresuid` and `chown` read as "leave unchanged"). Checked when the flag is parsed.
//!
//! **Nobody else's ids.** A task must not become someone: at start the worker refuses a range
//! that holds ([`find_taken`]) the uid or the primary gid of an account of the passwd
//! database, the gid of a group of the group database, or any id of a subordinate range in
//! `/etc/subuid` or `/etc/subgid` (rootless containers run their processes as those ids). The
//! databases are enumerated through NSS with glibc's `getpwent_r` and `getgrent_r` rather than
//! by reading `/etc/passwd` and `/etc/group`: that also sees what `nsswitch.conf` adds and
//! lets be enumerated (systemd's dynamic users, an LDAP directory when sssd enumerates). What a
//! source does not enumerate (sssd's default, `enumerate = false`) cannot be seen: choose a
//! range that the directory does not hand out either. Files that already belong to ids of the
//! range (say, a container image unpacked with them) cannot be found either; the range is
//! meant to be reserved for Venom. The enumeration uses the C library's one iterator per
//! database (`setpwent`, `getpwent_r`, `endpwent`): it runs once, at start, and nothing else
//! in the worker enumerates.

use std::ffi::CStr;
use std::fmt;
use std::ops::ControlFlow;
use std::path::{Path, PathBuf};
use std::str::FromStr;

/// Largest buffer tried for one passwd or group entry (`ERANGE` while it is too small).
const MAX_ENTRY_BUFFER_BYTES: usize = 1 << 20;
/// The subordinate id files of shadow-utils (`newuidmap`, `newgidmap`).
const SUBORDINATE_ID_FILES: [&str; 2] = ["/etc/subuid", "/etc/subgid"];

/// A range of uids (and gids of the same numbers) for `--run-as-uids`: `FIRST-LAST`, both
/// included, within [`UidRange::MIN_UID`]`..=`[`UidRange::MAX_UID`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UidRange {
    first: u32,
    last: u32,
}

/// Why a text is not a usable `--run-as-uids` range.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UidRangeError {
    #[error("`{text}` is not of the form FIRST-LAST (two uids, like 200000-200999)")]
    NotARange { text: String },
    #[error("`{text}` is not a uid (a number up to 4294967294)")]
    NotAUid { text: String },
    #[error(
        "{first}-{last} reaches outside {min}-{max}: below {min} are the system's own accounts, \
         and 4294967295 is (uid_t) -1",
        min = UidRange::MIN_UID,
        max = UidRange::MAX_UID
    )]
    OutOfBounds { first: u32, last: u32 },
    #[error("FIRST ({first}) is greater than LAST ({last})")]
    Reversed { first: u32, last: u32 },
}

impl UidRange {
    /// The smallest uid a range may hold.
    pub const MIN_UID: u32 = 1000;
    /// The largest uid a range may hold: `(uid_t) -1` means "unchanged" to the kernel.
    pub const MAX_UID: u32 = u32::MAX - 1;

    /// `first..=last`, checked.
    pub fn new(first: u32, last: u32) -> Result<UidRange, UidRangeError> {
        if first > last {
            return Err(UidRangeError::Reversed { first, last });
        }
        if first < UidRange::MIN_UID || last > UidRange::MAX_UID {
            return Err(UidRangeError::OutOfBounds { first, last });
        }
        Ok(UidRange { first, last })
    }

    pub fn first(&self) -> u32 {
        self.first
    }

    pub fn last(&self) -> u32 {
        self.last
    }

    /// How many uids the range holds: how many waves may be alive at once without two of
    /// them sharing a uid.
    pub fn n_uids(&self) -> u64 {
        u64::from(self.last - self.first) + 1
    }

    /// Whether `first..=last` shares an id with the range.
    pub fn overlaps(&self, first: u32, last: u32) -> bool {
        first <= self.last && last >= self.first
    }

    /// The uid, and gid of the same number, that the attempts of `wave_id` run as:
    /// `FIRST + (wave_id mod n_uids)`.
    pub fn ids_for_wave(&self, wave_id: u64) -> (u32, u32) {
        let offset = u32::try_from(wave_id % self.n_uids())
            .expect("the remainder is below n_uids, which is at most 2^32 - 1000");
        let id = self.first + offset;
        (id, id)
    }
}

impl FromStr for UidRange {
    type Err = UidRangeError;

    /// `FIRST-LAST`, as `--run-as-uids` takes it.
    fn from_str(text: &str) -> Result<UidRange, UidRangeError> {
        let not_a_range = || UidRangeError::NotARange {
            text: text.to_owned(),
        };
        let (first, last) = text.trim().split_once('-').ok_or_else(not_a_range)?;
        let uid = |part: &str| {
            let part = part.trim();
            if part.is_empty() {
                return Err(not_a_range());
            }
            part.parse::<u32>().map_err(|_| UidRangeError::NotAUid {
                text: part.to_owned(),
            })
        };
        UidRange::new(uid(first)?, uid(last)?)
    }
}

impl fmt::Display for UidRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}-{}", self.first, self.last)
    }
}

/// Whose ids a [`TakenIds`] are.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Holder {
    /// An account's uid.
    AccountUid { account: String },
    /// An account's primary gid.
    AccountGid { account: String },
    /// A group's gid.
    Group { group: String },
    /// A line of `/etc/subuid` or `/etc/subgid`.
    Subordinate { file: PathBuf, owner: String },
}

/// Ids the machine has given someone: `first..=last` (one id but for subordinate ranges).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TakenIds {
    pub holder: Holder,
    pub first: u32,
    pub last: u32,
}

impl fmt::Display for TakenIds {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.holder {
            Holder::AccountUid { account } => {
                write!(f, "account `{account}` has uid {}", self.first)
            }
            Holder::AccountGid { account } => {
                write!(f, "account `{account}` has primary gid {}", self.first)
            }
            Holder::Group { group } => write!(f, "group `{group}` has gid {}", self.first),
            Holder::Subordinate { file, owner } => write!(
                f,
                "{} gives `{owner}` the ids {}-{}",
                file.display(),
                self.first,
                self.last
            ),
        }
    }
}

/// The first ids of `range` that an account, a group or a subordinate id range holds, in that
/// order of search; `None` when the range is free.
pub fn find_taken(range: UidRange) -> std::io::Result<Option<TakenIds>> {
    let mut taken = None;
    let mut check = |ids: TakenIds| {
        if range.overlaps(ids.first, ids.last) {
            taken = Some(ids);
            ControlFlow::Break(())
        } else {
            ControlFlow::Continue(())
        }
    };
    if for_each_account(&mut check)?.is_continue() && for_each_group(&mut check)?.is_continue() {
        for file in SUBORDINATE_ID_FILES {
            let text = match std::fs::read_to_string(file) {
                Ok(text) => text,
                Err(error) if error.kind() == std::io::ErrorKind::NotFound => continue,
                Err(error) => return Err(error),
            };
            if subordinate_ranges(Path::new(file), &text)
                .try_for_each(&mut check)
                .is_break()
            {
                break;
            }
        }
    }
    Ok(taken)
}

/// The ranges of a subordinate id file's text (`owner:first:count` per line, as `subuid(5)`
/// describes; empty counts and lines that are not of that form are passed over, as
/// `newuidmap` does).
pub fn subordinate_ranges<'a>(
    file: &'a Path,
    text: &'a str,
) -> impl Iterator<Item = TakenIds> + 'a {
    text.lines().filter_map(move |line| {
        let mut fields = line.trim().split(':');
        let owner = fields.next()?;
        let first: u32 = fields.next()?.trim().parse().ok()?;
        let count: u32 = fields.next()?.trim().parse().ok()?;
        if owner.is_empty() || owner.starts_with('#') || count == 0 || fields.next().is_some() {
            return None;
        }
        Some(TakenIds {
            holder: Holder::Subordinate {
                file: file.to_owned(),
                owner: owner.to_owned(),
            },
            first,
            last: first.saturating_add(count - 1),
        })
    })
}

/// Calls `visit` with the uid and the primary gid of every account of the passwd database
/// (NSS), until it breaks.
#[allow(unsafe_code)]
pub fn for_each_account(
    mut visit: impl FnMut(TakenIds) -> ControlFlow<()>,
) -> std::io::Result<ControlFlow<()>> {
    let mut buffer: Vec<libc::c_char> = vec![0; 1024];
    // SAFETY: setpwent(3) rewinds the passwd database's iterator; it takes nothing, and
    // nothing else in the worker uses that iterator (see the module docs).
    unsafe { libc::setpwent() };
    let flow = loop {
        // SAFETY: `passwd` is a plain C struct of integers and pointers, for which all zeros
        // is a valid value (null pointers); getpwent_r overwrites it before we read it.
        let mut entry: libc::passwd = unsafe { std::mem::zeroed() };
        let mut found: *mut libc::passwd = std::ptr::null_mut();
        // SAFETY: `entry` and `found` are live locals and `buffer` a live allocation of
        // `buffer.len()` bytes, which getpwent_r fills and points `entry`'s strings into.
        let rc =
            unsafe { libc::getpwent_r(&mut entry, buffer.as_mut_ptr(), buffer.len(), &mut found) };
        match next_entry(rc, found.is_null(), &mut buffer) {
            Next::Retry => continue,
            Next::End => break Ok(ControlFlow::Continue(())),
            Next::Failed(error) => break Err(error),
            Next::Entry => {}
        }
        // SAFETY: on success `pw_name` points at a NUL-terminated string inside `buffer`,
        // which is alive and not written to before this line is done with it.
        let account = unsafe { entry_name(entry.pw_name) };
        let uid = TakenIds {
            holder: Holder::AccountUid {
                account: account.clone(),
            },
            first: entry.pw_uid,
            last: entry.pw_uid,
        };
        let gid = TakenIds {
            holder: Holder::AccountGid { account },
            first: entry.pw_gid,
            last: entry.pw_gid,
        };
        if visit(uid).is_break() || visit(gid).is_break() {
            break Ok(ControlFlow::Break(()));
        }
    };
    // SAFETY: endpwent(3) closes the iterator setpwent opened; it takes nothing.
    unsafe { libc::endpwent() };
    flow
}

/// Calls `visit` with the gid of every group of the group database (NSS), until it breaks.
#[allow(unsafe_code)]
pub fn for_each_group(
    mut visit: impl FnMut(TakenIds) -> ControlFlow<()>,
) -> std::io::Result<ControlFlow<()>> {
    let mut buffer: Vec<libc::c_char> = vec![0; 1024];
    // SAFETY: setgrent(3) rewinds the group database's iterator; it takes nothing, and nothing
    // else in the worker uses that iterator (see the module docs).
    unsafe { libc::setgrent() };
    let flow = loop {
        // SAFETY: `group` is a plain C struct of integers and pointers, for which all zeros is
        // a valid value (null pointers); getgrent_r overwrites it before we read it.
        let mut entry: libc::group = unsafe { std::mem::zeroed() };
        let mut found: *mut libc::group = std::ptr::null_mut();
        // SAFETY: `entry` and `found` are live locals and `buffer` a live allocation of
        // `buffer.len()` bytes, which getgrent_r fills and points `entry`'s strings into.
        let rc =
            unsafe { libc::getgrent_r(&mut entry, buffer.as_mut_ptr(), buffer.len(), &mut found) };
        match next_entry(rc, found.is_null(), &mut buffer) {
            Next::Retry => continue,
            Next::End => break Ok(ControlFlow::Continue(())),
            Next::Failed(error) => break Err(error),
            Next::Entry => {}
        }
        // SAFETY: on success `gr_name` points at a NUL-terminated string inside `buffer`,
        // which is alive and not written to before this line is done with it.
        let group = unsafe { entry_name(entry.gr_name) };
        let gid = TakenIds {
            holder: Holder::Group { group },
            first: entry.gr_gid,
            last: entry.gr_gid,
        };
        if visit(gid).is_break() {
            break Ok(ControlFlow::Break(()));
        }
    };
    // SAFETY: endgrent(3) closes the iterator setgrent opened; it takes nothing.
    unsafe { libc::endgrent() };
    flow
}

/// What one `get*ent_r` call means for the enumeration.
enum Next {
    /// An entry was read.
    Entry,
    /// The buffer was too small and has been made larger: call again (glibc gives the same
    /// entry again).
    Retry,
    /// No more entries.
    End,
    Failed(std::io::Error),
}

/// Reads the answer of `getpwent_r`/`getgrent_r`: `rc`, and whether the result pointer is
/// null; grows `buffer` on `ERANGE`.
fn next_entry(rc: libc::c_int, found_null: bool, buffer: &mut Vec<libc::c_char>) -> Next {
    match rc {
        0 if found_null => Next::End,
        0 => Next::Entry,
        libc::ENOENT => Next::End,
        libc::ERANGE if buffer.len() < MAX_ENTRY_BUFFER_BYTES => {
            buffer.resize(buffer.len() * 2, 0);
            Next::Retry
        }
        rc => Next::Failed(std::io::Error::from_raw_os_error(rc)),
    }
}

/// The string at `pointer`, lossily UTF-8; empty for a null pointer.
///
/// # Safety
/// `pointer` is null or points at a NUL-terminated string that stays alive and unchanged for
/// the call.
#[allow(unsafe_code)]
unsafe fn entry_name(pointer: *const libc::c_char) -> String {
    if pointer.is_null() {
        return String::new();
    }
    // SAFETY: the caller promises a live NUL-terminated string.
    unsafe { CStr::from_ptr(pointer) }
        .to_string_lossy()
        .into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_parse_within_bounds_only() {
        let range: UidRange = "200000-200999".parse().expect("a range");
        assert_eq!((range.first(), range.last()), (200_000, 200_999));
        assert_eq!(range.n_uids(), 1000);
        assert_eq!(range.to_string(), "200000-200999");
        assert_eq!(
            " 1000 - 1000 "
                .parse::<UidRange>()
                .expect("one uid")
                .n_uids(),
            1
        );
        let widest: UidRange = "1000-4294967294".parse().expect("the widest range");
        assert_eq!(widest.n_uids(), 4_294_966_295);

        for (text, error) in [
            (
                "200000",
                "`200000` is not of the form FIRST-LAST (two uids, like 200000-200999)",
            ),
            (
                "-5",
                "`-5` is not of the form FIRST-LAST (two uids, like 200000-200999)",
            ),
            (
                "5-",
                "`5-` is not of the form FIRST-LAST (two uids, like 200000-200999)",
            ),
            ("a-b", "`a` is not a uid (a number up to 4294967294)"),
            (
                "1000-2000-3000",
                "`2000-3000` is not a uid (a number up to 4294967294)",
            ),
            (
                "1000-4294967296",
                "`4294967296` is not a uid (a number up to 4294967294)",
            ),
            (
                "999-2000",
                "999-2000 reaches outside 1000-4294967294: below 1000 are the system's own \
                 accounts, and 4294967295 is (uid_t) -1",
            ),
            (
                "0-0",
                "0-0 reaches outside 1000-4294967294: below 1000 are the system's own \
                 accounts, and 4294967295 is (uid_t) -1",
            ),
            (
                "1000-4294967295",
                "1000-4294967295 reaches outside 1000-4294967294: below 1000 are the system's \
                 own accounts, and 4294967295 is (uid_t) -1",
            ),
            ("2000-1999", "FIRST (2000) is greater than LAST (1999)"),
        ] {
            let parsed = text.parse::<UidRange>();
            assert_eq!(
                parsed.map_err(|error| error.to_string()),
                Err(error.to_owned()),
                "{text}"
            );
        }
    }

    #[test]
    fn each_wave_maps_to_first_plus_its_id_modulo_the_size() {
        let range = UidRange::new(200_000, 200_999).expect("a range");
        assert_eq!(range.ids_for_wave(0), (200_000, 200_000));
        assert_eq!(range.ids_for_wave(1), (200_001, 200_001));
        assert_eq!(range.ids_for_wave(999), (200_999, 200_999));
        // Congruent ids share a uid: the documented limit.
        assert_eq!(range.ids_for_wave(1000), (200_000, 200_000));
        assert_eq!(range.ids_for_wave(1007), range.ids_for_wave(7));
        assert_ne!(range.ids_for_wave(8), range.ids_for_wave(7));
        assert_eq!(range.ids_for_wave(u64::MAX), (200_615, 200_615)); // 2^64 - 1 ≡ 615 (mod 1000)

        let one = UidRange::new(5000, 5000).expect("one uid");
        assert_eq!(one.ids_for_wave(123_456), (5000, 5000));
        let widest = UidRange::new(UidRange::MIN_UID, UidRange::MAX_UID).expect("widest");
        assert_eq!(widest.ids_for_wave(0), (1000, 1000));
        assert_eq!(
            widest.ids_for_wave(4_294_966_294),
            (u32::MAX - 1, u32::MAX - 1)
        );
        assert_eq!(widest.ids_for_wave(4_294_966_295), (1000, 1000));
        for wave_id in [0, 1, 17, 4_294_966_294, u64::MAX / 3, u64::MAX] {
            let (uid, gid) = widest.ids_for_wave(wave_id);
            assert_eq!(uid, gid);
            assert!((widest.first()..=widest.last()).contains(&uid), "{wave_id}");
        }
    }

    #[test]
    fn overlaps_are_inclusive_at_both_ends() {
        let range = UidRange::new(2000, 2999).expect("a range");
        assert!(range.overlaps(2000, 2000));
        assert!(range.overlaps(2999, 2999));
        assert!(range.overlaps(1000, 2000));
        assert!(range.overlaps(2999, 5000));
        assert!(range.overlaps(0, u32::MAX));
        assert!(!range.overlaps(1999, 1999));
        assert!(!range.overlaps(3000, 3000));
        assert!(!range.overlaps(100, 1999));
    }

    #[test]
    fn subordinate_files_are_read_like_newuidmap_reads_them() {
        let file = Path::new("/etc/subuid");
        let text = "alice:100000:65536\n# a comment\n\nbob:165536:65536\n1001:231072:10\n\
                    broken line\nzero:300000:0\nfour:1:2:3\nhigh:4294967290:100\n";
        let ranges: Vec<(String, u32, u32)> = subordinate_ranges(file, text)
            .map(|taken| {
                let Holder::Subordinate { owner, .. } = taken.holder else {
                    panic!("a subordinate range");
                };
                (owner, taken.first, taken.last)
            })
            .collect();
        assert_eq!(
            ranges,
            [
                ("alice".to_owned(), 100_000, 165_535),
                ("bob".to_owned(), 165_536, 231_071),
                ("1001".to_owned(), 231_072, 231_081),
                ("high".to_owned(), 4_294_967_290, u32::MAX),
            ]
        );
        let bob = subordinate_ranges(file, text).nth(1).expect("bob");
        assert_eq!(
            bob.to_string(),
            "/etc/subuid gives `bob` the ids 165536-231071"
        );
    }

    #[test]
    fn the_databases_are_enumerated_and_a_range_with_an_account_is_taken() {
        let mut accounts = Vec::new();
        let flow = for_each_account(|taken| {
            accounts.push(taken);
            ControlFlow::Continue(())
        })
        .expect("the passwd database can be read");
        assert!(flow.is_continue());
        let root_uid = TakenIds {
            holder: Holder::AccountUid {
                account: "root".to_owned(),
            },
            first: 0,
            last: 0,
        };
        assert!(accounts.contains(&root_uid), "{accounts:?}");
        assert_eq!(root_uid.to_string(), "account `root` has uid 0");

        let mut groups = Vec::new();
        let flow = for_each_group(|taken| {
            groups.push(taken);
            ControlFlow::Continue(())
        })
        .expect("the group database can be read");
        assert!(flow.is_continue());
        assert!(
            groups.iter().any(|taken| taken.first == 0),
            "group 0 exists: {groups:?}"
        );

        // Stopping early stops.
        let mut n_visited = 0;
        let flow = for_each_account(|_| {
            n_visited += 1;
            ControlFlow::Break(())
        })
        .expect("readable");
        assert!(flow.is_break());
        assert_eq!(n_visited, 1);

        // Every account with a uid of 1000 or more makes a range around it taken.
        let account_uid = accounts.iter().find(|taken| {
            matches!(taken.holder, Holder::AccountUid { .. })
                && taken.first >= UidRange::MIN_UID
                && taken.first < UidRange::MAX_UID
        });
        if let Some(account) = account_uid {
            let range = UidRange::new(account.first, account.first).expect("in bounds");
            let taken = find_taken(range).expect("readable").expect("taken");
            assert_eq!(taken.first, account.first, "{taken}");
        }
        // Nobody on a test machine uses these.
        let free = UidRange::new(3_999_000_000, 3_999_000_999).expect("a range");
        assert_eq!(find_taken(free).expect("readable"), None);
    }
}
