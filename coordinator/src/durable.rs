//! What reaches the disk before the coordinator relies on it.
//!
//! A write is durable only once `fsync`/`fdatasync` of the file holding it has returned, and
//! a file's name only once its directory has been synced after the file was created,
//! renamed or removed. Everything the coordinator acknowledges rests on these calls, so
//! they live here, in one place, with the one database-specific part: [`SledFiles`].
//!
//! sled 0.34 "flushes" with `sync_file_range`, which writes the dirty pages but commits
//! neither the file's size nor its metadata and does not flush the device's write cache;
//! the blob files it writes for large values and the `conf` file it writes at creation
//! are never synced, nor are the directories holding them. [`SledFiles::sync`], called
//! right after sled's flush, syncs every one of those files and directories, so when it
//! returns, everything sled had written is on the disk.

use std::collections::{BTreeMap, BTreeSet};
use std::ffi::OsString;
use std::fs::File;
use std::io;
use std::os::unix::fs::MetadataExt as _;
use std::path::{Path, PathBuf};

/// Syncs a directory, so that entries created, renamed or removed in it survive a power cut.
pub fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(non_empty(dir))?.sync_all()
}

/// `"."` for the empty path a relative file name has as its parent.
fn non_empty(dir: &Path) -> &Path {
    if dir.as_os_str().is_empty() {
        Path::new(".")
    } else {
        dir
    }
}

/// Creates `dir` and any missing parents so that they survive a power cut: the parent of
/// every directory created here is synced after it.
pub fn create_dir_all(dir: &Path) -> io::Result<()> {
    let mut missing = Vec::new();
    let mut cursor = Some(dir);
    while let Some(path) = cursor {
        if path.as_os_str().is_empty() || path.exists() {
            break;
        }
        missing.push(path);
        cursor = path.parent();
    }
    std::fs::create_dir_all(dir)?;
    for created in missing.iter().rev() {
        sync_dir(created.parent().unwrap_or(Path::new(".")))?;
    }
    Ok(())
}

/// Replaces `path` with `bytes` atomically and durably: a temporary file beside it is
/// written and synced, renamed over `path`, and the directory synced. A power cut at any
/// point leaves either the old file or the new one, never a mix.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> io::Result<()> {
    use std::io::Write as _;

    let dir = non_empty(path.parent().unwrap_or(Path::new(".")));
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(".tmp");
    let tmp = dir.join(name);
    {
        let mut file = File::create(&tmp)?;
        file.write_all(bytes)?;
        file.sync_data()?;
    }
    std::fs::rename(&tmp, path)?;
    sync_dir(dir)
}

/// The prefix of the files the coordinator keeps in a data dir beside sled's (identity,
/// commit record, damage marker). Each is replaced with [`write_atomic`], which syncs the
/// directory itself, so [`SledFiles`] leaves their names out of its directory comparison.
pub const OWN_FILE_PREFIX: &str = "venom-";

/// What one [`SledFiles::sync`] had to do beyond syncing the data file.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct SyncReport {
    /// Blob files synced for the first time.
    pub n_blobs: usize,
    /// Directories synced because their entries changed.
    pub n_dirs: usize,
}

/// The files of one sled database, kept durable.
///
/// sled keeps its log in `db`, writes each value too large for a log segment to its own
/// file in `blobs/` (written once, deleted when superseded), its settings to `conf` once,
/// and from time to time a `snap.*` file that it renames into place. `sync` syncs `db`,
/// every blob not synced yet, and each of the two directories whose entries changed
/// since the last sync (compared by name and inode, so a rename over an existing name
/// counts).
#[derive(Debug)]
pub struct SledFiles {
    dir: PathBuf,
    /// `db`, kept open: syncing an open descriptor is one system call.
    db: File,
    /// Blob files already synced.
    synced_blobs: BTreeSet<OsString>,
    /// Entries (name → inode) of the database directory and of `blobs/` as last synced.
    dir_entries: BTreeMap<OsString, u64>,
    blob_entries: BTreeMap<OsString, u64>,
}

impl SledFiles {
    /// Takes charge of the sled database sled has just opened in `dir`: syncs everything
    /// it holds now (the files sled created when it made the database among them) and the
    /// directory above it.
    pub fn open(dir: &Path) -> io::Result<Self> {
        let db = File::open(dir.join("db"))?;
        let mut files = Self {
            dir: dir.to_path_buf(),
            db,
            synced_blobs: BTreeSet::new(),
            dir_entries: BTreeMap::new(),
            blob_entries: BTreeMap::new(),
        };
        for entry in std::fs::read_dir(dir)? {
            let entry = entry?;
            if entry.file_type()?.is_file() {
                File::open(entry.path())?.sync_all()?;
            }
        }
        files.sync()?;
        sync_dir(dir)?;
        sync_dir(dir.parent().unwrap_or(Path::new(".")))?;
        Ok(files)
    }

    /// Makes everything sled has written so far durable. Call it after sled's own flush.
    pub fn sync(&mut self) -> io::Result<SyncReport> {
        let mut report = SyncReport::default();
        // Blobs first: a log record that names a blob must never be on the disk without it.
        let blobs_dir = self.dir.join("blobs");
        let blob_entries = entries(&blobs_dir)?;
        for name in blob_entries.keys() {
            if !self.synced_blobs.contains(name) {
                match File::open(blobs_dir.join(name)) {
                    Ok(file) => file.sync_data()?,
                    // Superseded and deleted since it was listed.
                    Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                    Err(e) => return Err(e),
                }
                self.synced_blobs.insert(name.clone());
                report.n_blobs += 1;
            }
        }
        if blob_entries != self.blob_entries {
            sync_dir(&blobs_dir)?;
            self.synced_blobs
                .retain(|name| blob_entries.contains_key(name));
            self.blob_entries = blob_entries;
            report.n_dirs += 1;
        }
        self.db.sync_data()?;
        let mut dir_entries = entries(&self.dir)?;
        dir_entries.retain(|name, _| !name.to_string_lossy().starts_with(OWN_FILE_PREFIX));
        if dir_entries != self.dir_entries {
            // A `snap.*` file sled renamed into place is synced by sled itself.
            sync_dir(&self.dir)?;
            self.dir_entries = dir_entries;
            report.n_dirs += 1;
        }
        Ok(report)
    }
}

/// A directory's entries as name → inode (empty when it does not exist).
fn entries(dir: &Path) -> io::Result<BTreeMap<OsString, u64>> {
    let mut out = BTreeMap::new();
    let read = match std::fs::read_dir(dir) {
        Ok(read) => read,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(out),
        Err(e) => return Err(e),
    };
    for entry in read {
        let entry = entry?;
        match entry.metadata() {
            Ok(meta) => {
                out.insert(entry.file_name(), meta.ino());
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn create_dir_all_makes_every_missing_level() {
        let root = tempfile::tempdir().expect("tempdir");
        let deep = root.path().join("a/b/c");
        create_dir_all(&deep).expect("create");
        assert!(deep.is_dir());
        // Again on an existing directory: nothing to do, no error.
        create_dir_all(&deep).expect("create again");
    }

    #[test]
    fn write_atomic_replaces_the_file_and_leaves_no_temporary() {
        let root = tempfile::tempdir().expect("tempdir");
        let path = root.path().join("identity");
        write_atomic(&path, b"one").expect("write");
        write_atomic(&path, b"two").expect("rewrite");
        assert_eq!(std::fs::read(&path).expect("read"), b"two");
        let names: Vec<_> = std::fs::read_dir(root.path())
            .expect("list")
            .map(|e| e.expect("entry").file_name())
            .collect();
        assert_eq!(names, vec![OsString::from("identity")]);
    }

    #[test]
    fn sled_files_sync_new_blobs_once_and_directories_only_when_they_change() {
        let root = tempfile::tempdir().expect("tempdir");
        let db = sled::Config::new()
            .path(root.path())
            .flush_every_ms(None)
            .open()
            .expect("sled");
        let mut files = SledFiles::open(root.path()).expect("files");
        // Nothing changed since open: only the data file.
        assert_eq!(files.sync().expect("sync"), SyncReport::default());
        // A value too large for a log segment becomes a blob file.
        db.insert(b"big", vec![7u8; 1 << 20]).expect("insert");
        db.flush().expect("flush");
        let report = files.sync().expect("sync");
        assert_eq!(report.n_blobs, 1, "{report:?}");
        assert!(report.n_dirs >= 1, "{report:?}");
        assert_eq!(files.sync().expect("sync"), SyncReport::default());
        // Small values stay in the log: nothing but the data file to sync.
        db.insert(b"small", b"x".to_vec()).expect("insert");
        db.flush().expect("flush");
        assert_eq!(files.sync().expect("sync"), SyncReport::default());
    }
}
