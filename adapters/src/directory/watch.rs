//! Prompt wake-ups from filesystem events, shared by the file sources.
//!
//! Events only say "look again": the sources never trust them for correctness, because
//! inotify misses changes made on another host of an NFS/CIFS mount and drops events
//! when its queue overflows. Every source also polls or rescans on a timer, and a
//! watch that cannot be started is a warning, not an error.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use notify::event::{AccessKind, AccessMode};
use notify::{EventKind, RecursiveMode, Watcher};
use tokio::sync::Notify;

/// A non-recursive watch on one directory that wakes a task on any change in it.
pub(crate) struct DirWatch {
    dir: PathBuf,
    wake: Arc<Notify>,
    // Dropping the watcher stops the watch, so it lives as long as this value.
    watcher: Option<notify::RecommendedWatcher>,
    warned: bool,
    last_try: Option<Instant>,
}

/// Starting a watcher costs a thread and an inotify instance: a failing one (e.g.
/// `fs.inotify.max_user_instances` reached) is not retried at every poll.
const RETRY_EVERY: Duration = Duration::from_secs(30);

impl DirWatch {
    /// Starts watching `dir`; on failure logs a warning once and leaves the caller to
    /// its timer. `what` names the config key for the log.
    pub(crate) fn start(dir: &Path, what: &str) -> Self {
        let mut w = DirWatch {
            dir: dir.to_path_buf(),
            wake: Arc::new(Notify::new()),
            watcher: None,
            warned: false,
            last_try: None,
        };
        w.retry(what);
        w
    }

    /// Tries again to start a watch that failed (its directory may exist by now).
    pub(crate) fn retry(&mut self, what: &str) {
        if self.watcher.is_some() || self.last_try.is_some_and(|t| t.elapsed() < RETRY_EVERY) {
            return;
        }
        self.last_try = Some(Instant::now());
        match self.try_start() {
            Ok(w) => {
                if self.warned {
                    tracing::info!(dir = %self.dir.display(), key = what, "filesystem watch started");
                }
                self.watcher = Some(w);
            }
            Err(e) => {
                if !self.warned {
                    tracing::warn!(
                        dir = %self.dir.display(),
                        key = what,
                        error = %e,
                        "cannot watch the directory for changes; relying on periodic rescans"
                    );
                    self.warned = true;
                }
            }
        }
    }

    pub(crate) fn is_active(&self) -> bool {
        self.watcher.is_some()
    }

    fn try_start(&self) -> notify::Result<notify::RecommendedWatcher> {
        let wake = Arc::clone(&self.wake);
        let mut watcher =
            notify::recommended_watcher(move |res: notify::Result<notify::Event>| {
                match res {
                    // Our own opens and reads of the watched files would otherwise wake us
                    // in a loop; only a close after writing says something changed.
                    Ok(ev) => match ev.kind {
                        EventKind::Access(AccessKind::Close(AccessMode::Write)) => {
                            wake.notify_one()
                        }
                        EventKind::Access(_) => {}
                        _ => wake.notify_one(),
                    },
                    // An error (e.g. queue overflow) means events were lost: look again.
                    Err(_) => wake.notify_one(),
                }
            })?;
        watcher.watch(&self.dir, RecursiveMode::NonRecursive)?;
        Ok(watcher)
    }

    /// Resolves after the next change (or immediately if one happened since the last
    /// call: `Notify` keeps one permit).
    pub(crate) async fn changed(&self) {
        self.wake.notified().await;
    }
}
