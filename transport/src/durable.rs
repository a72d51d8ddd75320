//! Making sled's writes durable.
//!
//! sled 0.34's `Db::flush()` writes its log and calls `sync_file_range`, which
//! neither flushes the device write cache nor persists the file's size, and it
//! never syncs the files it writes under `blobs/` (values too large for a log
//! segment). After `flush()` this fdatasyncs the log file and every blob file not
//! yet synced, and fsyncs `blobs/` when new blobs appeared, so a power cut cannot
//! take back a commit the agent already confirmed.

use std::collections::HashSet;
use std::ffi::OsString;
use std::fs::File;
use std::io;
use std::path::{Path, PathBuf};

pub struct Syncer {
    dir: PathBuf,
    log: File,
    synced_blobs: HashSet<OsString>,
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
            synced_blobs: HashSet::new(),
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
        let mut present = HashSet::new();
        let mut new = false;
        for entry in entries {
            let entry = entry?;
            let name = entry.file_name();
            if !self.synced_blobs.contains(&name) {
                match File::open(entry.path()) {
                    Ok(f) => f.sync_data()?,
                    // sled removes blobs whose value was overwritten or deleted.
                    Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                    Err(e) => return Err(e),
                }
                new = true;
            }
            present.insert(name);
        }
        if new {
            sync_dir(&blobs)?;
        }
        // Forget blobs sled deleted, so the set stays as small as the directory.
        self.synced_blobs = present;
        Ok(())
    }
}
