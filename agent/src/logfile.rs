//! `--log-file PATH`: the agent's log in a file of its own, for hosts without
//! systemd's journal.
//!
//! logrotate renames the file and then signals the agent (SIGUSR1 or SIGHUP, see
//! `packaging/logrotate/ferry-agent`); the agent opens a new file at the same path
//! and writes there from then on. Until the signal arrives it keeps writing to the
//! renamed file, so no line is lost; after it, the renamed file no longer grows
//! and logrotate may compress it.
//!
//! Every log line is one `write_all` under one lock (the fmt layer formats a whole
//! event before it writes), so a reopen falls between lines, never inside one.

use std::fs::{File, OpenOptions, Permissions};
use std::io::{self, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use tracing_subscriber::fmt::MakeWriter;

/// A new log file is readable by the agent's group (an operator group, say) and
/// by nobody else: log lines name paths, tables and hosts.
const MODE: u32 = 0o640;

/// An append-only log file that can be reopened at its path. Clones share it.
#[derive(Clone)]
pub struct LogFile {
    path: Arc<PathBuf>,
    // A std mutex, not tokio's: it is held only for one write(2) of one line,
    // from whichever thread logs, inside and outside the runtime.
    file: Arc<Mutex<File>>,
}

impl LogFile {
    /// Opens (creating it if needed) the file at `path`, made absolute first so a
    /// reopen after `--daemon` changed the working directory finds the same place.
    pub fn open(path: &Path) -> io::Result<LogFile> {
        let path = std::path::absolute(path)?;
        let file = open_append(&path)?;
        Ok(LogFile {
            path: Arc::new(path),
            file: Arc::new(Mutex::new(file)),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Opens the file at the path anew (after logrotate renamed the old one) and
    /// swaps it in. If that fails, logging goes on into the old file.
    pub fn reopen(&self) -> io::Result<()> {
        let fresh = open_append(&self.path)?;
        *self.lock() = fresh;
        Ok(())
    }

    fn lock(&self) -> MutexGuard<'_, File> {
        // A panic while writing a line leaves the file itself usable.
        self.file.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// Appends to `path`; a file it creates gets [`MODE`] whatever the umask.
fn open_append(path: &Path) -> io::Result<File> {
    match OpenOptions::new()
        .append(true)
        .create_new(true)
        .mode(MODE)
        .open(path)
    {
        Ok(f) => {
            f.set_permissions(Permissions::from_mode(MODE))?;
            Ok(f)
        }
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
            OpenOptions::new().append(true).open(path)
        }
        Err(e) => Err(e),
    }
}

/// One log line's writer: the current file, locked per write.
pub struct LogWriter<'a>(&'a LogFile);

impl Write for LogWriter<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.lock().write(buf)
    }

    fn write_all(&mut self, buf: &[u8]) -> io::Result<()> {
        // One lock for the whole line: a reopen cannot split it between files.
        self.0.lock().write_all(buf)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.0.lock().flush()
    }
}

impl<'a> MakeWriter<'a> for LogFile {
    type Writer = LogWriter<'a>;

    fn make_writer(&'a self) -> Self::Writer {
        LogWriter(self)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn reopen_after_rename_writes_to_a_new_file_at_the_path() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("agent.log");
        let log = LogFile::open(&path).unwrap();
        assert_eq!(
            std::fs::metadata(&path).unwrap().permissions().mode() & 0o777,
            MODE
        );
        log.make_writer().write_all(b"first\n").unwrap();

        let rotated = dir.path().join("agent.log.1");
        std::fs::rename(&path, &rotated).unwrap();
        // Until the reopen, lines still reach the renamed file.
        log.make_writer().write_all(b"second\n").unwrap();
        log.reopen().unwrap();
        log.make_writer().write_all(b"third\n").unwrap();

        assert_eq!(
            std::fs::read_to_string(&rotated).unwrap(),
            "first\nsecond\n"
        );
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "third\n");
        assert_eq!(
            std::fs::metadata(&path).unwrap().permissions().mode() & 0o777,
            MODE
        );
    }

    #[test]
    fn an_existing_file_is_appended_to() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("agent.log");
        std::fs::write(&path, "old\n").unwrap();
        let log = LogFile::open(&path).unwrap();
        log.make_writer().write_all(b"new\n").unwrap();
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "old\nnew\n");
    }
}
