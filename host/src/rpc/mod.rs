//! Cap'n Proto RPC: one thread runs every capnp-rpc connection of the node (capnp-rpc
//! objects are `!Send` and live on a `LocalSet`), reached from the rest of the node
//! through a `Send` [`RpcHandle`]. It serves the node's `Node` interface (`--listen`;
//! an agent serves `Executor`) and keeps one client connection per peer address. A
//! server's Raft runs on it too ([`RpcHandle::run`] starts it there).

pub mod api;
pub mod door;
pub mod framework;
pub mod remote;
mod server;

use std::cell::RefCell;
use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::rc::Rc;
use std::time::Duration;

use capnp_rpc::{rpc_twoparty_capnp, twoparty, RpcSystem};
use futures_util::AsyncReadExt;
use tokio::sync::{mpsc, oneshot};
use wafer_proto::node_capnp::{door as wire_door, executor, node};
use wafer_proto::raft_capnp::raft;

pub use door::{ClusterSecret, InvalidSecret};
pub use server::{
    read_agent_info, read_failure, read_launch, read_node_info, write_agent_info, write_failure,
    write_launch, write_node_info, AgentInfo, NodeService,
};

use crate::state::reader_options;

/// How long connecting to a peer may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);

/// What an RPC can fail with.
#[derive(Debug, thiserror::Error)]
pub enum RpcError {
    /// The peer could not be reached (refused, timed out, connection lost).
    #[error("cannot reach {addr}: {message}")]
    Unreachable {
        /// The peer.
        addr: String,
        /// Why.
        message: String,
    },
    /// The peer answered with something malformed, or the call failed remotely.
    #[error("RPC to {addr} failed: {message}")]
    Failed {
        /// The peer.
        addr: String,
        /// Why.
        message: String,
    },
    /// The RPC thread has stopped.
    #[error("the RPC thread has stopped")]
    Stopped,
}

impl RpcError {
    /// Classifies a capnp error of a call to `addr`.
    pub fn from_capnp(addr: &str, e: capnp::Error) -> RpcError {
        match e.kind {
            capnp::ErrorKind::Disconnected | capnp::ErrorKind::Overloaded => {
                RpcError::Unreachable {
                    addr: addr.to_string(),
                    message: e.to_string(),
                }
            }
            _ => RpcError::Failed {
                addr: addr.to_string(),
                message: e.to_string(),
            },
        }
    }
}

type Job = Box<dyn FnOnce(Rc<Peers>) -> Pin<Box<dyn Future<Output = ()>>> + Send>;

/// A `Send` handle to the RPC thread.
#[derive(Clone)]
pub struct RpcHandle {
    jobs: mpsc::UnboundedSender<Job>,
}

impl RpcHandle {
    /// Starts the RPC thread; its connections to peers present `secret`.
    pub fn start(secret: ClusterSecret) -> std::io::Result<RpcHandle> {
        let (jobs, mut rx) = mpsc::unbounded_channel::<Job>();
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        std::thread::Builder::new()
            .name("wafer-rpc".into())
            .spawn(move || {
                let local = tokio::task::LocalSet::new();
                let peers = Rc::new(Peers::new(secret));
                local.block_on(&runtime, async move {
                    while let Some(job) = rx.recv().await {
                        tokio::task::spawn_local(job(peers.clone()));
                    }
                });
            })?;
        Ok(RpcHandle { jobs })
    }

    /// Runs `f` on the RPC thread and returns its output.
    pub async fn run<F, Fut, T>(&self, f: F) -> Result<T, RpcError>
    where
        F: FnOnce(Rc<Peers>) -> Fut + Send + 'static,
        Fut: Future<Output = T> + 'static,
        T: Send + 'static,
    {
        let (tx, rx) = oneshot::channel();
        let job: Job = Box::new(move |peers| {
            Box::pin(async move {
                let _ = tx.send(f(peers).await);
            })
        });
        self.jobs.send(job).map_err(|_| RpcError::Stopped)?;
        rx.await.map_err(|_| RpcError::Stopped)
    }

    /// Runs `future` on the RPC thread, without waiting for it.
    pub fn spawn<Fut>(&self, future: Fut) -> Result<(), RpcError>
    where
        Fut: Future<Output = ()> + Send + 'static,
    {
        let job: Job = Box::new(move |_| Box::pin(future));
        self.jobs.send(job).map_err(|_| RpcError::Stopped)
    }

    /// Serves `service` on `listener`, behind a `Door` that admits peers presenting
    /// `secret`, until the process ends.
    pub async fn serve(
        &self,
        listener: std::net::TcpListener,
        service: NodeService,
        secret: ClusterSecret,
    ) -> Result<(), RpcError> {
        self.serve_with(listener, reader_options(), move || {
            let node = capnp_rpc::new_client::<node::Client, _>(service);
            move |peer| door::DoorService::server(node.clone(), secret.clone(), peer).client
        })
        .await
    }

    /// Serves on `listener` until the process ends: `make` runs once on the RPC thread
    /// and returns the function that gives each connection (from a peer address) its
    /// bootstrap capability.
    pub async fn serve_with<F, M>(
        &self,
        listener: std::net::TcpListener,
        options: capnp::message::ReaderOptions,
        make: F,
    ) -> Result<(), RpcError>
    where
        F: FnOnce() -> M + Send + 'static,
        M: FnMut(std::net::SocketAddr) -> capnp::capability::Client + 'static,
    {
        self.run(move |_| async move {
            let listener = match tokio::net::TcpListener::from_std(listener) {
                Ok(l) => l,
                Err(e) => {
                    tracing::error!(error = %e, "cannot serve RPC");
                    return;
                }
            };
            let mut bootstrap = make();
            loop {
                let (stream, peer) = match listener.accept().await {
                    Ok(accepted) => accepted,
                    Err(e) => {
                        tracing::warn!(error = %e, "accepting an RPC connection");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                let (reader, writer) = buffered(stream);
                let network = twoparty::VatNetwork::new(
                    reader,
                    writer,
                    rpc_twoparty_capnp::Side::Server,
                    options,
                );
                let system = RpcSystem::new(Box::new(network), Some(bootstrap(peer)));
                tokio::task::spawn_local(async move {
                    if let Err(e) = system.await {
                        tracing::debug!(%peer, error = %e, "RPC connection ended");
                    }
                });
            }
        })
        .await
    }
}

/// Bytes buffered on each side of a connection: room for the usual message (Raft
/// appends, proposals, API calls) while a server with many connections stays small;
/// larger reads and writes bypass the buffer.
const IO_BUFFER: usize = 8 << 10;

/// The two halves of a capnp connection over `stream`, buffered: capnp writes a
/// message's segment table and each segment separately and flushes after the message,
/// so without a buffer every message costs two or more `send`s (and as many TCP
/// segments, each waking the peer); with it, one. Reads likewise take what has arrived
/// in one call instead of the header and the body apart.
fn buffered(
    stream: tokio::net::TcpStream,
) -> (
    futures_util::io::BufReader<impl futures_util::AsyncRead + Unpin>,
    futures_util::io::BufWriter<impl futures_util::AsyncWrite + Unpin>,
) {
    let _ = stream.set_nodelay(true);
    let (reader, writer) = tokio_util::compat::TokioAsyncReadCompatExt::compat(stream).split();
    (
        futures_util::io::BufReader::with_capacity(IO_BUFFER, reader),
        futures_util::io::BufWriter::with_capacity(IO_BUFFER, writer),
    )
}

/// The RPC thread's client connections, one per peer address.
pub struct Peers {
    secret: ClusterSecret,
    nodes: RefCell<HashMap<String, (node::Client, raft::Client)>>,
    executors: RefCell<HashMap<String, executor::Client>>,
    accels: RefCell<HashMap<String, wafer_proto::accel_capnp::accel::Client>>,
}

impl Peers {
    fn new(secret: ClusterSecret) -> Peers {
        Peers {
            secret,
            nodes: RefCell::default(),
            executors: RefCell::default(),
            accels: RefCell::default(),
        }
    }

    /// The `Node` and `Raft` capabilities of the server at `addr`, connecting when there
    /// is no connection yet.
    pub async fn get(&self, addr: &str) -> Result<(node::Client, raft::Client), RpcError> {
        if let Some(clients) = self.nodes.borrow().get(addr) {
            return Ok(clients.clone());
        }
        let door: wire_door::Client = connect(addr).await?;
        let mut request = door.node_request();
        request.get().set_secret(self.secret.as_bytes());
        let node = request.send().pipeline.get_node();
        let raft = node.raft_request().send().pipeline.get_raft();
        // Another task may have connected meanwhile; keep the first connection.
        let clients = self
            .nodes
            .borrow_mut()
            .entry(addr.to_string())
            .or_insert((node, raft))
            .clone();
        Ok(clients)
    }

    /// The `Executor` capability of the agent at `addr`, connecting when there is no
    /// connection yet.
    pub async fn executor(&self, addr: &str) -> Result<executor::Client, RpcError> {
        if let Some(client) = self.executors.borrow().get(addr) {
            return Ok(client.clone());
        }
        let door: wire_door::Client = connect(addr).await?;
        let mut request = door.executor_request();
        request.get().set_secret(self.secret.as_bytes());
        let client = request.send().pipeline.get_executor();
        Ok(self
            .executors
            .borrow_mut()
            .entry(addr.to_string())
            .or_insert(client)
            .clone())
    }

    /// The `Accel` capability of the accelerator backend at `addr`, connecting when
    /// there is no connection yet.
    pub async fn accel(
        &self,
        addr: &str,
    ) -> Result<wafer_proto::accel_capnp::accel::Client, RpcError> {
        if let Some(client) = self.accels.borrow().get(addr) {
            return Ok(client.clone());
        }
        let door: wire_door::Client = connect(addr).await?;
        let mut request = door.accel_request();
        request.get().set_secret(self.secret.as_bytes());
        let client = request.send().pipeline.get_accel();
        self.accels
            .borrow_mut()
            .insert(addr.to_string(), client.clone());
        Ok(client)
    }

    /// Forgets the connection to `addr` (after it failed), so that the next call
    /// reconnects.
    pub fn forget(&self, addr: &str) {
        self.nodes.borrow_mut().remove(addr);
        self.executors.borrow_mut().remove(addr);
        self.accels.borrow_mut().remove(addr);
    }
}

/// Connects to `addr` and returns its bootstrap capability (the connection runs on
/// the current `LocalSet`: the RPC thread's, in the daemons).
pub async fn connect<C: capnp::capability::FromClientHook>(addr: &str) -> Result<C, RpcError> {
    let unreachable = |message: String| RpcError::Unreachable {
        addr: addr.to_string(),
        message,
    };
    let stream = tokio::time::timeout(CONNECT_TIMEOUT, tokio::net::TcpStream::connect(addr))
        .await
        .map_err(|_| unreachable("connect timed out".into()))?
        .map_err(|e| unreachable(e.to_string()))?;
    let (reader, writer) = buffered(stream);
    let network = Box::new(twoparty::VatNetwork::new(
        reader,
        writer,
        rpc_twoparty_capnp::Side::Client,
        reader_options(),
    ));
    let mut system = RpcSystem::new(network, None);
    let client: C = system.bootstrap(rpc_twoparty_capnp::Side::Server);
    tokio::task::spawn_local(system);
    Ok(client)
}
