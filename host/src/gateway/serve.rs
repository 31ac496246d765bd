//! Serving the gateway: one accept loop hands each connection to one of N worker
//! threads, each running its own single-threaded executor, so a request is parsed, its
//! guest run and its response written on one thread without cross-thread wake-ups.
//!
//! A guest never holds its worker for long: it yields at every epoch tick (see
//! [`crate::runtime`]), so the other connections of that worker keep being served.
//!
//! Slow or silent clients cannot hold connections open for ever: one that sends nothing
//! for the client timeout after connecting, or takes longer than that to send a
//! request's headers, is disconnected, and so is an HTTP/1 connection left idle that
//! long between requests. (A body that stalls is the handlers' to refuse: see
//! [`super::read_body`].)

use std::future::Future;
use std::thread::JoinHandle;
use std::time::Duration;

use axum::Router;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
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
/// `client_timeout` bounds how long a client may stay silent (see the module's doc).
pub async fn serve(
    listener: tokio::net::TcpListener,
    app: Router,
    workers: usize,
    client_timeout: Duration,
    shutdown: impl Future<Output = ()>,
) -> Result<(), ServeError> {
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut pool = Vec::new();
    for index in 0..workers.max(1) {
        pool.push(start_worker(
            index,
            app.clone(),
            client_timeout,
            stop_rx.clone(),
        )?);
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

/// The first bytes an HTTP/2 client with prior knowledge ("h2c") sends.
const H2_PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// Waits, at most `timeout`, until `stream` has sent enough for hyper to tell HTTP/1
/// from HTTP/2: a byte that leaves the HTTP/2 preface, or the whole preface. Hyper's
/// own header timeout starts only once it knows the protocol, so without this a client
/// that connects and says nothing would hold its connection for ever. False: the
/// client closed, or did not get that far in time.
async fn protocol_known(stream: &tokio::net::TcpStream, timeout: Duration) -> bool {
    let sniff = async {
        let mut head = [0u8; H2_PREFACE.len()];
        loop {
            let n = match stream.peek(&mut head).await {
                Ok(0) | Err(_) => return false,
                Ok(n) => n,
            };
            if n == H2_PREFACE.len() || head[..n] != H2_PREFACE[..n] {
                return true;
            }
            // Part of the preface: wait for the rest (peeking again at once would
            // spin, since the bytes already there keep the socket readable).
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    };
    tokio::time::timeout(timeout, sniff).await.unwrap_or(false)
}

fn start_worker(
    index: usize,
    app: Router,
    client_timeout: Duration,
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
                let mut builder = auto::Builder::new(TokioExecutor::new());
                // Also closes HTTP/1 connections idle that long between requests: the
                // wait for the next request's headers is timed too.
                builder
                    .http1()
                    .timer(TokioTimer::new())
                    .header_read_timeout(client_timeout);
                // HTTP/2 connections are pinged when idle, so dead peers are dropped.
                builder
                    .http2()
                    .timer(TokioTimer::new())
                    .keep_alive_interval(client_timeout);
                let builder = std::sync::Arc::new(builder);
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
                            let (builder, watcher) = (builder.clone(), graceful.watcher());
                            tokio::spawn(async move {
                                if !protocol_known(&stream, client_timeout).await {
                                    tracing::debug!("a client sent no request in time");
                                    return;
                                }
                                let conn = builder
                                    .serve_connection_with_upgrades(TokioIo::new(stream), service)
                                    .into_owned();
                                if let Err(err) = watcher.watch(conn).await {
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
