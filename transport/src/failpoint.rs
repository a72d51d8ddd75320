//! Named crash and error windows, for tests.
//!
//! Random `kill -9` finds the places where a crash matters by luck; a failpoint
//! names one, so an end-to-end test can stop a process exactly there, or make
//! the I/O there fail, and check that nothing was lost, nothing stored twice and
//! no gap reported that was not declared lost. ARCHITECTURE.md lists every
//! window and what must hold at it.
//!
//! Compiled in only with the `failpoints` feature (the `fail` crate); without it
//! [`hit`] is an empty inline function. With it, the environment variable
//! `FERRY_FAILPOINTS` arms windows at process start:
//! `FERRY_FAILPOINTS="agent-after-apply-before-sync=1*return(eio);exchange-after-sync-before-ack=return(crash)"`.
//! The `fail` crate's actions apply (`N*`, `P%`, `sleep(ms)`, `off`); the value
//! of `return(...)` says what happens: `crash` aborts the process on the spot
//! (like `kill -9` there), `eio` and `enospc` make the I/O fail with that errno.

/// Every named window (ARCHITECTURE.md says what must hold at each).
pub const WINDOWS: &[&str] = &[
    "agent-before-segment-append",
    "agent-after-apply-before-sync",
    "agent-after-sync-before-answer",
    "agent-after-ack-before-delete",
    "exchange-file-chunk-write",
    "exchange-after-apply-before-sync",
    "exchange-after-sync-before-ack",
    "postgres-after-commit-before-confirm",
    "directory-after-move-before-record",
    "delivery-after-write-before-checkpoint",
];

/// Whether any window was armed: when none was (every production run of a test
/// build), [`hit`] costs one atomic load.
#[cfg(feature = "failpoints")]
static ARMED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Arms the windows named in `FERRY_FAILPOINTS`; returns the setting if any.
#[cfg(feature = "failpoints")]
pub fn setup() -> Option<String> {
    let spec = std::env::var("FERRY_FAILPOINTS").ok()?;
    ARMED.store(true, std::sync::atomic::Ordering::SeqCst);
    for part in spec.split(';').filter(|p| !p.trim().is_empty()) {
        let Some((name, action)) = part.split_once('=') else {
            tracing::error!(setting = %part, "FERRY_FAILPOINTS: expected NAME=ACTION");
            continue;
        };
        if !WINDOWS.contains(&name.trim()) {
            tracing::error!(window = %name, "FERRY_FAILPOINTS: no such window");
            continue;
        }
        if let Err(e) = fail::cfg(name.trim(), action.trim()) {
            tracing::error!(window = %name, error = %e, "FERRY_FAILPOINTS: bad action");
        }
    }
    tracing::warn!(failpoints = %spec, "failpoints armed (a test build)");
    Some(spec)
}

#[cfg(not(feature = "failpoints"))]
pub fn setup() -> Option<String> {
    None
}

/// Passes through window `name`: nothing unless a test armed it.
#[cfg(feature = "failpoints")]
pub fn hit(name: &str) -> std::io::Result<()> {
    if !ARMED.load(std::sync::atomic::Ordering::Relaxed) {
        return Ok(());
    }
    let outcome = fail::eval(name, |arg| arg.unwrap_or_default());
    match outcome.as_deref() {
        None => Ok(()),
        Some("crash") => {
            tracing::error!(window = name, "failpoint: crashing here");
            std::process::abort()
        }
        Some("enospc") => Err(std::io::Error::from_raw_os_error(28)),
        Some("eio") => Err(std::io::Error::from_raw_os_error(5)),
        Some(_) => Err(std::io::Error::other(format!(
            "failpoint {name}: injected I/O error"
        ))),
    }
}

#[cfg(not(feature = "failpoints"))]
#[inline(always)]
pub fn hit(_name: &str) -> std::io::Result<()> {
    Ok(())
}
