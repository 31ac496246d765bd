//! Stopping the daemons (`dev`, `server`, `agent`, `accel`) on SIGINT and SIGTERM:
//! once a daemon serves, the first signal stops it gracefully (requests in flight are
//! answered) and a second one ends it at once; before it serves, a signal ends it at
//! once, as by default.
//!
//! The handlers must be installed before anything loads OpenCL. PoCL's LLVM installs
//! its own handlers for these signals, which restore whatever was there before it and
//! raise the signal again; tokio's handler also calls the handler it replaced. So with
//! LLVM's installed first, a SIGTERM reached tokio, then LLVM, which put back the
//! default and killed the process mid-request. Installed first, tokio's handler is what
//! LLVM puts back, and the raised signal lands there.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::OnceLock;

use tokio::sync::watch;

/// Set once a stop was asked for.
static STOP: OnceLock<watch::Sender<bool>> = OnceLock::new();
/// Whether something waits in [`stopped`] (then a first signal is a graceful stop).
static SERVING: AtomicBool = AtomicBool::new(false);

/// Takes over SIGINT and SIGTERM for the rest of the process. Call it first thing
/// inside the async runtime; a second call does nothing.
pub fn install() -> std::io::Result<()> {
    if STOP.get().is_some() {
        return Ok(());
    }
    let (tx, _) = watch::channel(false);
    let wait = watch_signals()?;
    if STOP.set(tx.clone()).is_err() {
        return Ok(());
    }
    tokio::spawn(async move {
        let mut wait = wait;
        let mut asked = false;
        loop {
            let signal = wait.next().await;
            if asked || !SERVING.load(Ordering::SeqCst) {
                // Not serving yet, or told twice: no graceful stop to wait for.
                die_of(signal);
            }
            asked = true;
            tracing::info!("stopping (signal again to stop at once)");
            tx.send_replace(true);
        }
    });
    Ok(())
}

/// Resolves once the process is told to stop (SIGINT or SIGTERM). From the first call
/// on, a first signal is a graceful stop. Without [`install`], it waits on signals
/// itself.
pub async fn stopped() {
    SERVING.store(true, Ordering::SeqCst);
    match STOP.get() {
        Some(stop) => {
            let mut stop = stop.subscribe();
            let _ = stop.wait_for(|stopped| *stopped).await;
        }
        None => match watch_signals() {
            Ok(mut wait) => {
                wait.next().await;
            }
            Err(err) => {
                tracing::warn!(error = %err, "cannot watch for SIGTERM; stopping on Ctrl-C only");
                let _ = tokio::signal::ctrl_c().await;
            }
        },
    }
}

/// The signals that stop a daemon, being watched.
struct Signals {
    #[cfg(unix)]
    interrupt: tokio::signal::unix::Signal,
    #[cfg(unix)]
    terminate: tokio::signal::unix::Signal,
}

/// Starts watching: the handlers are in place when this returns.
fn watch_signals() -> std::io::Result<Signals> {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        Ok(Signals {
            interrupt: signal(SignalKind::interrupt())?,
            terminate: signal(SignalKind::terminate())?,
        })
    }
    #[cfg(not(unix))]
    {
        Ok(Signals {})
    }
}

impl Signals {
    /// Waits for the next signal; its number.
    async fn next(&mut self) -> i32 {
        #[cfg(unix)]
        {
            tokio::select! {
                _ = self.interrupt.recv() => libc::SIGINT,
                _ = self.terminate.recv() => libc::SIGTERM,
            }
        }
        #[cfg(not(unix))]
        {
            let _ = tokio::signal::ctrl_c().await;
            2
        }
    }
}

/// Ends the process as `signal` does by default (no exit handlers run while other
/// threads, OpenCL's among them, are still at work).
fn die_of(signal: i32) -> ! {
    #[cfg(unix)]
    // SAFETY: `signal` and `raise` take no pointers; setting the default disposition
    // and raising the signal ends the process, as if these handlers were never set.
    unsafe {
        libc::signal(signal, libc::SIG_DFL);
        libc::raise(signal);
    }
    std::process::exit(128 + signal)
}
