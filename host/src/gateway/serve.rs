//! Serving the gateway: one accept loop hands each connection to one of N worker
//! threads, each running its own single-threaded executor, so a request is parsed, its
//! guest run and its response written on one thread without cross-thread wake-ups.
//!
//! A guest never holds its worker for long: it yields at every epoch tick (see
//! [`crate::runtime`]), so the other connections of that worker keep being served.

use std::future::Future;
use std::thread::JoinHandle;
use std::time::Duration;

use axum::Router;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use hyper_util::service::TowerToHyperService;
use tokio::sync::{mpsc, watch};

/// How long open connections get to finish their requests at shutdown.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

/// Why serving stopped early.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// A worker thread or its executor could not be started.
    #[error("starting gateway worker {index}: {source}")]
    Worker {
        /// Worker number.
        index: usize,
        /// What failed.
        source: std::io::Error,
    },
    /// Every worker thread has stopped (each one's failure is in the log).
    #[error("every gateway worker has stopped")]
    NoWorkers,
}

struct Worker {
    connections: mpsc::UnboundedSender<std::net::TcpStream>,
    thread: JoinHandle<()>,
}

/// The number of workers: one per available core.
pub fn default_workers() -> usize {
    std::thread::available_parallelism().map_or(2, |n| n.get())
}

/// Serves `app` on `listener` with `workers` worker threads until `shutdown` resolves,
/// then lets open connections finish their current requests (within a grace period).
pub async fn serve(
    listener: tokio::net::TcpListener,
    app: Router,
    workers: usize,
    shutdown: impl Future<Output = ()>,
) -> Result<(), ServeError> {
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut pool = Vec::new();
    for index in 0..workers.max(1) {
        pool.push(start_worker(index, app.clone(), stop_rx.clone())?);
    }
    tokio::pin!(shutdown);
    let mut next = 0usize;
    loop {
        tokio::select! {
            () = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => {
                    let stream = match stream.into_std() {
                        Ok(stream) => stream,
                        Err(err) => {
                            tracing::warn!(%peer, error = %err, "dropping a connection");
                            continue;
                        }
                    };
                    next = hand_off(&pool, next, stream)?.wrapping_add(1);
                }
                // Out of file descriptors and the like: back off instead of spinning.
                Err(err) => {
                    tracing::warn!(error = %err, "accepting a connection");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
        }
    }
    drop(listener);
    let _ = stop_tx.send(true);
    let threads: Vec<_> = pool.into_iter().map(|w| w.thread).collect();
    // Joining blocks; do it off the async threads.
    let _ = tokio::task::spawn_blocking(move || {
        for thread in threads {
            let _ = thread.join();
        }
    })
    .await;
    Ok(())
}

/// Gives `stream` to the first live worker from `start` on (round-robin); returns the
/// worker that took it. A worker whose thread has died is skipped.
fn hand_off(
    pool: &[Worker],
    start: usize,
    mut stream: std::net::TcpStream,
) -> Result<usize, ServeError> {
    for offset in 0..pool.len() {
        let index = (start + offset) % pool.len();
        match pool[index].connections.send(stream) {
            Ok(()) => return Ok(index),
            Err(returned) => stream = returned.0,
        }
    }
    Err(ServeError::NoWorkers)
}

fn start_worker(
    index: usize,
    app: Router,
    mut stop: watch::Receiver<bool>,
) -> Result<Worker, ServeError> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|source| ServeError::Worker { index, source })?;
    let (tx, mut rx) = mpsc::unbounded_channel::<std::net::TcpStream>();
    let thread = std::thread::Builder::new()
        .name(format!("wafer-http-{index}"))
        .spawn(move || {
            runtime.block_on(async move {
                let graceful = hyper_util::server::graceful::GracefulShutdown::new();
                let builder = auto::Builder::new(TokioExecutor::new());
                loop {
                    tokio::select! {
                        _ = stop.wait_for(|stopped| *stopped) => break,
                        received = rx.recv() => {
                            let Some(stream) = received else { break };
                            let stream = match tokio::net::TcpStream::from_std(stream) {
                                Ok(stream) => stream,
                                Err(err) => {
                                    tracing::warn!(error = %err, "registering a connection");
                                    continue;
                                }
                            };
                            let _ = stream.set_nodelay(true);
                            let service = TowerToHyperService::new(app.clone());
                            let conn = builder
                                .serve_connection_with_upgrades(TokioIo::new(stream), service)
                                .into_owned();
                            let conn = graceful.watch(conn);
                            tokio::spawn(async move {
                                if let Err(err) = conn.await {
                                    tracing::debug!(error = %err, "connection ended");
                                }
                            });
                        }
                    }
                }
                let _ = tokio::time::timeout(SHUTDOWN_GRACE, graceful.shutdown()).await;
            });
        })
        .map_err(|source| ServeError::Worker { index, source })?;
    Ok(Worker {
        connections: tx,
        thread,
    })
}
