//! The backend's own tokio runtime, on threads of its own.
//!
//! The store's methods block (the committer thread, `spawn_blocking`, the
//! command line), and some callers are themselves inside a runtime (the server
//! opens the store under `block_in_place`; an offline report calls it from an
//! async function). The NATS client therefore lives on a runtime that belongs to
//! the backend, and [`Runtime::block`] drives a future to completion from any
//! thread. The runtime is built, run and dropped on a thread of its own, so
//! dropping the backend inside an async context never drops a runtime there
//! (which tokio forbids).

use std::future::Future;
use std::time::Duration;

pub(super) struct Runtime {
    handle: tokio::runtime::Handle,
    /// Dropped with the runtime: its thread then shuts the runtime down.
    _stop: tokio::sync::oneshot::Sender<()>,
}

impl Runtime {
    /// Starts a runtime with two worker threads (the NATS connection and the
    /// background watcher need little; the work runs on the callers' threads).
    pub fn start() -> std::io::Result<Runtime> {
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        std::thread::Builder::new()
            .name("jetstream-runtime".into())
            .spawn(move || {
                let rt = match tokio::runtime::Builder::new_multi_thread()
                    .worker_threads(2)
                    .thread_name("jetstream")
                    .enable_all()
                    .build()
                {
                    Ok(rt) => rt,
                    Err(e) => {
                        let _ = ready_tx.send(Err(e));
                        return;
                    }
                };
                let _ = ready_tx.send(Ok(rt.handle().clone()));
                rt.block_on(async {
                    let _ = stop_rx.await;
                });
                rt.shutdown_timeout(Duration::from_secs(2));
            })?;
        let handle = ready_rx
            .recv()
            .map_err(|_| std::io::Error::other("the JetStream runtime thread ended at start"))??;
        Ok(Runtime {
            handle,
            _stop: stop_tx,
        })
    }

    pub fn handle(&self) -> &tokio::runtime::Handle {
        &self.handle
    }

    /// Runs `f` to completion on this runtime and returns its output, from any
    /// thread. A thread inside some runtime cannot block on another one, so
    /// there the future is driven from a short-lived scoped thread.
    pub fn block<F>(&self, f: F) -> F::Output
    where
        F: Future + Send,
        F::Output: Send,
    {
        if tokio::runtime::Handle::try_current().is_err() {
            return self.handle.block_on(f);
        }
        std::thread::scope(|s| match s.spawn(|| self.handle.block_on(f)).join() {
            Ok(v) => v,
            Err(panic) => std::panic::resume_unwind(panic),
        })
    }
}
