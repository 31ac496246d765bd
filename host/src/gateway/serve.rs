//! Serving the gateway: one accept loop hands each connection to one of N worker
//! threads, each running its own single-threaded executor, so a request is parsed, its
//! guest run and its response written on one thread without cross-thread wake-ups.
//!
//! A guest never holds its worker for long: it yields at every epoch tick (see
//! [`crate::runtime`]), so the other connections of that worker keep being served.
//!
//! Slow or silent clients cannot hold connections open for ever: one that sends nothing
//! for the client timeout after connecting, or takes longer than that to send a
//! request's headers, is disconnected, and so is a connection left idle that long
//! between requests (HTTP/1: hyper times the wait for the next request; HTTP/2: see
//! [`super::activity`]). (A body that stalls is the handlers' to refuse: see
//! [`super::read_body`].)

use std::future::Future;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use axum::Router;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulConnection;
use hyper_util::service::TowerToHyperService;
use tokio::sync::{mpsc, watch};

use super::activity::{Activity, Tracked};

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

/// The HTTP version a client speaks, told from its first bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Protocol {
    Http1,
    /// HTTP/2 with prior knowledge ("h2c"; this server has no TLS to negotiate it).
    Http2,
}

/// Waits, at most `timeout`, until `stream` has sent enough to tell HTTP/1 from
/// HTTP/2: a byte that leaves the HTTP/2 preface, or the whole preface. Hyper's own
/// header timeout starts only once it knows the protocol, so without this a client
/// that connects and says nothing would hold its connection for ever. `None`: the
/// client closed, or did not get that far in time.
async fn sniff_protocol(stream: &tokio::net::TcpStream, timeout: Duration) -> Option<Protocol> {
    let sniff = async {
        let mut head = [0u8; H2_PREFACE.len()];
        loop {
            let n = match stream.peek(&mut head).await {
                Ok(0) | Err(_) => return None,
                Ok(n) => n,
            };
            if head[..n] != H2_PREFACE[..n] {
                return Some(Protocol::Http1);
            }
            if n == H2_PREFACE.len() {
                return Some(Protocol::Http2);
            }
            // Part of the preface: wait for the rest (peeking again at once would
            // spin, since the bytes already there keep the socket readable).
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    };
    tokio::time::timeout(timeout, sniff).await.ok().flatten()
}

/// Serves one connection until it ends. When the server stops, it finishes the
/// requests in flight and closes (graceful shutdown). An HTTP/2 connection is also
/// closed that way once it has had no request in flight for `client_timeout`, and
/// dropped if its client then takes longer than that to let it close.
async fn serve_connection(
    stream: tokio::net::TcpStream,
    app: Router,
    builder: &auto::Builder<TokioExecutor>,
    client_timeout: Duration,
    mut stop: watch::Receiver<bool>,
) {
    let protocol = tokio::select! {
        () = server_stopping(&mut stop) => return,
        protocol = sniff_protocol(&stream, client_timeout) => protocol,
    };
    let Some(protocol) = protocol else {
        tracing::debug!("a client sent no request in time");
        return;
    };
    let io = TokioIo::new(stream);
    let service = TowerToHyperService::new(app);
    let ended = if protocol == Protocol::Http2 {
        let activity = Activity::new();
        let service = Tracked::new(service, activity.clone());
        let conn = builder.serve_connection_with_upgrades(io, service);
        drive(conn, stop, Some((&activity, client_timeout))).await
    } else {
        let conn = builder.serve_connection_with_upgrades(io, service);
        drive(conn, stop, None).await
    };
    if let Err(err) = ended {
        tracing::debug!(error = %err, "connection ended");
    }
}

/// Drives `conn` to its end (see [`serve_connection`]); `idle`: the connection's
/// activity and how long it may stay idle.
async fn drive<C>(
    conn: C,
    mut stop: watch::Receiver<bool>,
    idle: Option<(&Activity, Duration)>,
) -> Result<(), C::Error>
where
    C: GracefulConnection,
{
    tokio::pin!(conn);
    let mut check = idle.map(|(_, timeout)| Instant::now() + timeout);
    loop {
        tokio::select! {
            ended = conn.as_mut() => return ended,
            () = server_stopping(&mut stop) => {
                conn.as_mut().graceful_shutdown();
                // The worker bounds how long this may take.
                return conn.await;
            }
            () = sleep_until_some(check) => {
                let Some((activity, timeout)) = idle else { continue };
                match activity.idle_since() {
                    Some(since) if since.elapsed() >= timeout => {
                        tracing::debug!("closing an idle HTTP/2 connection");
                        conn.as_mut().graceful_shutdown();
                        return match tokio::time::timeout(timeout, conn).await {
                            Ok(ended) => ended,
                            Err(_) => Ok(()),
                        };
                    }
                    Some(since) => check = Some(since + timeout),
                    None => check = Some(Instant::now() + timeout),
                }
            }
        }
    }
}

/// Returns once the server stops (or has gone).
async fn server_stopping(stop: &mut watch::Receiver<bool>) {
    let _ = stop.wait_for(|stopped| *stopped).await;
}

/// Sleeps until `deadline`; for ever if there is none.
async fn sleep_until_some(deadline: Option<Instant>) {
    match deadline {
        Some(deadline) => tokio::time::sleep_until(deadline.into()).await,
        None => std::future::pending().await,
    }
}

fn start_worker(
    index: usize,
    app: Router,
    client_timeout: Duration,
    stop: watch::Receiver<bool>,
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
                // Every connection's task holds a sender: once all are dropped, every
                // connection has ended.
                let (open_tx, mut open_rx) = mpsc::channel::<()>(1);
                let mut worker_stop = stop.clone();
                loop {
                    tokio::select! {
                        () = server_stopping(&mut worker_stop) => break,
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
                            let (app, builder, stop) = (app.clone(), builder.clone(), stop.clone());
                            let open = open_tx.clone();
                            tokio::spawn(async move {
                                serve_connection(stream, app, &builder, client_timeout, stop).await;
                                drop(open);
                            });
                        }
                    }
                }
                drop(open_tx);
                let _ = tokio::time::timeout(SHUTDOWN_GRACE, open_rx.recv()).await;
            });
        })
        .map_err(|source| ServeError::Worker { index, source })?;
    Ok(Worker {
        connections: tx,
        thread,
    })
}
