//! Making sled's writes durable.
//!
//! sled 0.34's `Db::flush()` writes its log and calls `sync_file_range`, which
//! neither flushes the device write cache nor persists the file's size, and it
//! never syncs the files it writes under `blobs/` (values too large for a log
//! segment). After `flush()` this fdatasyncs the log file and every blob file not
//! yet synced at its current length, and fsyncs `blobs/` when new blobs appeared,
//! so a power cut cannot take back a commit the agent already confirmed. A blob is
//! remembered with the length it had when synced: sled writes one in several
//! steps while other threads write, so one seen half written is synced again once
//! it has grown.

use std::collections::HashMap;
use std::ffi::OsString;
use std::fs::File;
use std::io;
use std::path::{Path, PathBuf};

pub struct Syncer {
    dir: PathBuf,
    log: File,
    /// Blob file name → its length when it was last synced.
    synced_blobs: HashMap<OsString, u64>,
}

fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

impl Syncer {
    /// Call after sled opened `dir` (so its log file exists).
    pub fn open(dir: &Path) -> io::Result<Self> {
        let log = File::open(dir.join("db"))?;
        // The log file itself must survive a power cut: sync the directory entry.
        sync_dir(dir)?;
        if let Some(parent) = dir.parent() {
            sync_dir(parent)?;
        }
        Ok(Self {
            dir: dir.to_path_buf(),
            log,
            synced_blobs: HashMap::new(),
        })
    }

    pub fn sync(&mut self, db: &sled::Db) -> io::Result<()> {
        db.flush().map_err(io::Error::other)?;
        self.log.sync_data()?;
        let blobs = self.dir.join("blobs");
        let entries = match std::fs::read_dir(&blobs) {
            Ok(e) => e,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(e),
        };
        let mut present = HashMap::new();
        let mut new = false;
        for entry in entries {
            let entry = entry?;
            let name = entry.file_name();
            let synced = self.synced_blobs.get(&name).copied();
            // Opened before its length is read: what is synced is at least that long.
            let file = match File::open(entry.path()) {
                Ok(f) => f,
                // sled removes blobs whose value was overwritten or deleted.
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(e) => return Err(e),
            };
            let len = file.metadata()?.len();
            if synced != Some(len) {
                file.sync_data()?;
                new |= synced.is_none();
            }
            present.insert(name, len);
        }
        if new {
            sync_dir(&blobs)?;
        }
        // Forget blobs sled deleted, so the set stays as small as the directory.
        self.synced_blobs = present;
        Ok(())
    }
}

/// The lock file in a sled directory (see [`DirLock`]).
pub const LOCK_FILE: &str = "ferry.lock";

/// The lock of the process that owns a sled directory: an exclusive lock on
/// its [`LOCK_FILE`], taken before its torn snapshots are cleared and held as
/// long as the database is open (keep it beside the `sled::Db`). sled takes its
/// own lock only when it opens, after the clearing, so without this one a
/// second process opening the directory (an offline `ferry-exchange records`
/// while the exchange starts) removed the `.generating` snapshot the owner was
/// writing, and the owner failed with "No such file or directory".
#[derive(Debug)]
pub struct DirLock {
    _file: File,
}

/// How long an opener waits for a lock another handle holds.
const LOCK_WAIT: std::time::Duration = std::time::Duration::from_secs(3);

/// Whether to try a held lock again: after a 20 ms pause while `deadline`
/// (now + [`LOCK_WAIT`] at the first try) has not passed, else `false`.
fn again(deadline: std::time::Instant) -> bool {
    if std::time::Instant::now() >= deadline {
        return false;
    }
    std::thread::sleep(std::time::Duration::from_millis(20));
    true
}

/// Makes this process `dir`'s owner: takes its [`DirLock`] (creating `dir` if
/// need be; waiting up to 3 s as [`open_sled`] does for sled's lock, then an
/// error naming the directory), then clears the torn snapshots a crash left
/// there (see [`clear_torn_snapshots`]), whose names it returns.
pub fn own_dir(dir: &Path) -> io::Result<(DirLock, Vec<String>)> {
    std::fs::create_dir_all(dir)?;
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(dir.join(LOCK_FILE))?;
    let deadline = std::time::Instant::now() + LOCK_WAIT;
    loop {
        match file.try_lock() {
            Ok(()) => break,
            Err(std::fs::TryLockError::WouldBlock) if again(deadline) => {}
            Err(std::fs::TryLockError::WouldBlock) => {
                return Err(io::Error::new(
                    io::ErrorKind::WouldBlock,
                    format!(
                        "{} is in use by another process (it holds {LOCK_FILE})",
                        dir.display()
                    ),
                ))
            }
            Err(std::fs::TryLockError::Error(e)) => return Err(e),
        }
    }
    let lock = DirLock { _file: file };
    let removed = clear_torn_snapshots(dir, &lock)?;
    Ok((lock, removed))
}

/// Removes what a crash can leave in sled's directory that sled 0.34 itself
/// would mistake for data, before opening it; only under its [`DirLock`]
/// (the only proof that no other process is writing a snapshot there), as
/// [`own_dir`] does.
///
/// sled writes a snapshot as `snap.<lsn>.generating`, syncs it and renames it to
/// `snap.<lsn>`, but when it looks for the newest snapshot at open it skips only
/// `.in___motion` files: a process killed mid-snapshot leaves a torn `.generating`
/// file that sorts last, and sled then refuses to open ("empty/corrupt snapshot
/// file found", measured under repeated `kill -9`). Such a file is never a
/// finished snapshot (the rename is what finishes it), so removing it loses
/// nothing: sled recovers from the previous snapshot and its log. Returns the
/// names removed.
fn clear_torn_snapshots(dir: &Path, _owner: &DirLock) -> io::Result<Vec<String>> {
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e),
    };
    let mut removed = Vec::new();
    for entry in entries {
        let entry = entry?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.starts_with("snap.") && name.ends_with(".generating") {
            std::fs::remove_file(entry.path())?;
            removed.push(name);
        }
    }
    if !removed.is_empty() {
        sync_dir(dir)?;
    }
    Ok(removed)
}

/// Opens a sled database, waiting up to 3 s for its file lock. sled releases
/// the lock from its own I/O threads shortly after the last handle is dropped,
/// so a database closed and opened again in one process (a component that
/// restarts, a test) can find it still held for a moment; one that another
/// process holds still fails, after the wait, with sled's error.
pub fn open_sled(config: &sled::Config) -> sled::Result<sled::Db> {
    let deadline = std::time::Instant::now() + LOCK_WAIT;
    loop {
        match config.open() {
            Err(sled::Error::Io(e))
                if e.to_string().contains("could not acquire lock") && again(deadline) => {}
            r => return r,
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    /// A blob seen half written (sled writes it in steps while other threads
    /// write) is synced again once it grew, not taken as synced for good.
    #[test]
    fn a_blob_that_grew_since_its_sync_is_synced_again() {
        use std::io::Write;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("db");
        let db = sled::Config::new().path(&path).open().unwrap();
        let mut syncer = Syncer::open(&path).unwrap();
        std::fs::create_dir_all(path.join("blobs")).unwrap();
        let blob = path.join("blobs").join("42");
        std::fs::write(&blob, b"half").unwrap();
        syncer.sync(&db).unwrap();
        assert_eq!(
            syncer.synced_blobs.get(std::ffi::OsStr::new("42")),
            Some(&4)
        );
        std::fs::OpenOptions::new()
            .append(true)
            .open(&blob)
            .unwrap()
            .write_all(b" and the rest")
            .unwrap();
        syncer.sync(&db).unwrap();
        assert_eq!(
            syncer.synced_blobs.get(std::ffi::OsStr::new("42")),
            Some(&17)
        );
        std::fs::remove_file(&blob).unwrap();
        syncer.sync(&db).unwrap();
        assert!(syncer.synced_blobs.is_empty());
    }

    #[test]
    fn a_reopen_waits_for_the_lock_a_dropped_handle_still_holds() {
        let dir = tempfile::tempdir().unwrap();
        let config = sled::Config::new().path(dir.path().join("db"));
        let held = config.open().unwrap();
        let started = std::time::Instant::now();
        // Held throughout: refused, after the wait.
        let e = open_sled(&config).unwrap_err();
        assert!(e.to_string().contains("could not acquire lock"), "{e}");
        assert!(started.elapsed() >= std::time::Duration::from_secs(2));
        // Released a moment later: opened.
        let release = std::thread::spawn(move || {
            std::thread::sleep(std::time::Duration::from_millis(300));
            drop(held);
        });
        let db = open_sled(&config).unwrap();
        release.join().unwrap();
        db.insert(b"k", b"v").unwrap();
    }

    #[test]
    fn a_torn_snapshot_no_longer_stops_sled_from_opening() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("db");
        {
            let db = sled::Config::new().path(&path).open().unwrap();
            db.insert(b"k", b"v").unwrap();
            db.flush().unwrap();
        }
        // What a kill in the middle of sled's snapshot write leaves behind.
        std::fs::write(path.join("snap.00000000FFFFFFFF.generating"), b"torn").unwrap();
        assert!(sled::Config::new().path(&path).open().is_err());
        let (_owner, removed) = own_dir(&path).unwrap();
        assert_eq!(
            removed,
            vec!["snap.00000000FFFFFFFF.generating".to_string()]
        );
        let db = sled::Config::new().path(&path).open().unwrap();
        assert_eq!(db.get(b"k").unwrap().unwrap(), b"v");
    }
}
