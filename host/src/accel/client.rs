//! The host's side of accelerators. An agent keeps an [`AccelLink`]: the backends that
//! attached to it (`Executor.attachAccel`) and their devices. A guest granted a device
//! gets a [`GuestAccel`]: a session on one device, opened at its first call, with the
//! guest's programs, kernels and buffers as small numbers (handles) that only that
//! guest's instance can use. The capnp objects live on the agent's RPC thread, in a
//! table keyed by session; the guest's calls reach them through the `Send` RPC handle.
//!
//! Kernel runs go to the backend in batches (`Session.runAll`): a guest may queue runs
//! ([`GuestAccel::enqueue`]) that are sent together with the next call that must come
//! after them, so a chain of kernels costs one round trip.

use std::cell::RefCell;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use wafer_proto::accel_capnp::{accel, buffer, kernel, program, run, session};

use super::backend::MAX_TRANSFER;
use super::{AccelError, DeviceInfoSummary, DeviceType, ErrorKind};
use crate::rpc::RpcHandle;

/// How long opening a session waits for a backend to become reachable.
pub const REATTACH_WAIT: Duration = Duration::from_secs(5);

/// How long an attached backend stays attached without renewing.
pub const ATTACH_TTL: Duration = Duration::from_secs(6);

/// A backend attached to this agent.
#[derive(Debug, Clone)]
pub struct Attached {
    /// Where the agent reaches it.
    pub addr: String,
    /// Its devices.
    pub devices: Vec<DeviceInfoSummary>,
    /// When it last renewed its attachment.
    pub renewed: Instant,
}

/// An agent's accelerator backends (at most one at a time: the last that attached).
#[derive(Clone)]
pub struct AccelLink {
    rpc: RpcHandle,
    attached: Arc<RwLock<Option<Attached>>>,
    /// Sessions opened per device index, to spread grants over devices.
    opened: Arc<RwLock<HashMap<u32, u64>>>,
    /// Invocations granted a device running now, and the most at once since the last
    /// heartbeat.
    invocations: Arc<Invocations>,
}

#[derive(Debug, Default)]
struct Invocations {
    now: AtomicU32,
    peak: AtomicU32,
}

/// One invocation granted a device, counted until it is dropped
/// ([`AccelLink::invocation`]).
#[derive(Debug)]
pub struct InvocationCount(Arc<Invocations>);

impl Drop for InvocationCount {
    fn drop(&mut self) {
        self.0.now.fetch_sub(1, Ordering::Relaxed);
    }
}

impl std::fmt::Debug for AccelLink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AccelLink")
            .field("attached", &self.attached())
            .finish()
    }
}

impl AccelLink {
    /// A link without backends; calls go through `rpc` (which presents the cluster
    /// secret to backends).
    pub fn new(rpc: RpcHandle) -> AccelLink {
        AccelLink {
            rpc,
            attached: Arc::default(),
            opened: Arc::default(),
            invocations: Arc::default(),
        }
    }

    /// Counts a serverless invocation granted a device while the answer lives. Job
    /// attempts are not counted: their task's allocation holds their device. The
    /// agent's heartbeat reports the most at once ([`Self::take_invocation_peak`]), and
    /// the serverless framework leases devices for them.
    pub fn invocation(&self) -> InvocationCount {
        let running = self.invocations.now.fetch_add(1, Ordering::Relaxed) + 1;
        self.invocations.peak.fetch_max(running, Ordering::Relaxed);
        InvocationCount(self.invocations.clone())
    }

    /// The most invocations granted a device that ran at once since the last call.
    pub fn take_invocation_peak(&self) -> u32 {
        let now = self.invocations.now.load(Ordering::Relaxed);
        self.invocations.peak.swap(now, Ordering::Relaxed).max(now)
    }

    /// Records that the backend at `addr` with `devices` is attached (now). Answers
    /// whether the set of devices changed, or the backend comes back after its
    /// attachment lapsed (so the agent registers again).
    pub fn attach(&self, addr: String, devices: Vec<DeviceInfoSummary>) -> bool {
        let Ok(mut attached) = self.attached.write() else {
            return false;
        };
        let changed = attached.as_ref().is_none_or(|a| {
            a.addr != addr || a.devices != devices || a.renewed.elapsed() >= ATTACH_TTL
        });
        if changed {
            tracing::info!(
                backend = addr,
                devices = devices.len(),
                "an accelerator backend attached"
            );
        }
        *attached = Some(Attached {
            addr,
            devices,
            renewed: Instant::now(),
        });
        changed
    }

    /// The attached backend, if it renewed within [`ATTACH_TTL`].
    pub fn attached(&self) -> Option<Attached> {
        let attached = self.attached.read().ok()?;
        attached
            .as_ref()
            .filter(|a| a.renewed.elapsed() < ATTACH_TTL)
            .cloned()
    }

    /// The devices of the attached backend (empty without one).
    pub fn devices(&self) -> Vec<DeviceInfoSummary> {
        self.attached().map(|a| a.devices).unwrap_or_default()
    }

    /// Picks a device for a grant: of `kind` when given, else any; the one with the
    /// fewest sessions opened through this link.
    fn pick(&self, kind: Option<DeviceType>) -> Result<(String, u32), AccelError> {
        let attached = self.attached().ok_or_else(|| {
            AccelError::new(
                ErrorKind::Unavailable,
                "no accelerator backend is attached to this agent (is `wafer accel` running?)",
            )
        })?;
        let opened = self.opened.read().map(|o| o.clone()).unwrap_or_default();
        attached
            .devices
            .iter()
            .filter(|d| kind.is_none_or(|k| d.kind == k))
            .min_by_key(|d| opened.get(&d.index).copied().unwrap_or(0))
            .map(|d| (attached.addr.clone(), d.index))
            .ok_or_else(|| {
                // Not worth waiting for: the grant asks for what this node lacks.
                AccelError::new(
                    ErrorKind::NotGranted,
                    format!(
                        "no accelerator granted: this node has no {} device",
                        kind.map_or("", DeviceType::as_str)
                    ),
                )
            })
    }
}

/// What a guest was granted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Grant {
    /// Device memory its buffers may hold, bytes.
    pub memory_bytes: u64,
    /// The device type it asked for, if any.
    pub kind: Option<DeviceType>,
}

/// One argument of a guest's run.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum GuestArg {
    /// A buffer handle.
    Buffer(u32),
    /// `int`.
    Int(i32),
    /// `uint`.
    Uint(u32),
    /// `long`.
    Long(i64),
    /// `ulong`.
    Ulong(u64),
    /// `float`.
    Float(f32),
    /// `double`.
    Double(f64),
    /// Local memory, bytes.
    Local(u64),
}

/// A kernel run as a guest asked for it, in handles.
#[derive(Debug, Clone, PartialEq)]
pub struct GuestRun {
    /// The kernel's handle.
    pub kernel: u32,
    /// One argument per kernel parameter.
    pub args: Vec<GuestArg>,
    /// Global work size, 1 to 3 dimensions.
    pub global: Vec<u64>,
    /// Local work size (empty: the driver chooses).
    pub local: Vec<u64>,
}

impl GuestRun {
    /// Whether the run uses the object behind `handle`.
    fn uses(&self, handle: u32) -> bool {
        self.kernel == handle
            || self
                .args
                .iter()
                .any(|a| matches!(a, GuestArg::Buffer(b) if *b == handle))
    }
}

/// Most runs a guest queues before they are sent without waiting for a later call.
pub const MAX_QUEUED: usize = 256;

/// A guest instance's accelerator access: its grant (if any) and its session.
pub struct GuestAccel {
    link: Option<AccelLink>,
    grant: Grant,
    deadline: Instant,
    session: Option<u64>,
    /// Runs queued by the guest and not yet sent.
    queued: Vec<GuestRun>,
    /// The message of the last failed call, for `wafer.accel_error`.
    pub last_error: String,
}

static NEXT_SESSION: AtomicU64 = AtomicU64::new(1);

/// The guest sessions of the RPC thread.
#[derive(Default)]
struct GuestSession {
    session: Option<session::Client>,
    programs: HashMap<u32, program::Client>,
    kernels: HashMap<u32, kernel::Client>,
    buffers: HashMap<u32, (buffer::Client, u64)>,
    next: u32,
    device: u32,
}

thread_local! {
    static SESSIONS: RefCell<HashMap<u64, GuestSession>> = RefCell::default();
}

fn unknown(what: &str, handle: u32) -> AccelError {
    AccelError::new(
        ErrorKind::Invalid,
        format!("no {what} with handle {handle}"),
    )
}

impl GuestSession {
    /// Buffer `handle` and its size in bytes.
    fn buffer(&self, handle: u32) -> Result<(buffer::Client, u64), AccelError> {
        self.buffers
            .get(&handle)
            .cloned()
            .ok_or_else(|| unknown("buffer", handle))
    }
}

fn with_session<T>(
    id: u64,
    f: impl FnOnce(&mut GuestSession) -> Result<T, AccelError>,
) -> Result<T, AccelError> {
    SESSIONS.with(|sessions| {
        let mut sessions = sessions.borrow_mut();
        let session = sessions
            .get_mut(&id)
            .ok_or_else(|| AccelError::new(ErrorKind::Unavailable, "the session is closed"))?;
        f(session)
    })
}

/// Most programs, kernels and buffers one guest session holds at once.
pub const MAX_HANDLES: usize = 4096;

/// Keeps `value` under a new handle, unless the session holds too many objects.
fn insert<V>(
    count: usize,
    map: &mut HashMap<u32, V>,
    next: &mut u32,
    value: V,
) -> Result<u32, AccelError> {
    if count >= MAX_HANDLES {
        return Err(AccelError::new(
            ErrorKind::Invalid,
            format!("a guest holds at most {MAX_HANDLES} programs, kernels and buffers at once"),
        ));
    }
    *next = next.wrapping_add(1).max(1);
    map.insert(*next, value);
    Ok(*next)
}

impl GuestSession {
    fn held(&self) -> usize {
        self.programs.len() + self.kernels.len() + self.buffers.len()
    }
}

/// Writes `guest` as a `Run` of session `s` (its handles replaced by capabilities).
fn write_run(
    s: &GuestSession,
    mut w: run::Builder<'_>,
    guest: &GuestRun,
) -> Result<(), AccelError> {
    let kernel = s
        .kernels
        .get(&guest.kernel)
        .ok_or_else(|| unknown("kernel", guest.kernel))?;
    w.set_kernel(kernel.clone());
    let mut list = w.reborrow().init_args(guest.args.len() as u32);
    for (i, arg) in guest.args.iter().enumerate() {
        let mut a = list.reborrow().get(i as u32);
        match *arg {
            GuestArg::Buffer(b) => a.set_buffer(s.buffer(b)?.0),
            GuestArg::Int(v) => a.set_int(v),
            GuestArg::Uint(v) => a.set_uint(v),
            GuestArg::Long(v) => a.set_long(v),
            GuestArg::Ulong(v) => a.set_ulong(v),
            GuestArg::Float(v) => a.set_float(v),
            GuestArg::Double(v) => a.set_double(v),
            GuestArg::Local(v) => a.set_local(v),
        }
    }
    let mut g = w.reborrow().init_global(guest.global.len() as u32);
    for (i, v) in guest.global.iter().enumerate() {
        g.set(i as u32, *v);
    }
    let mut l = w.init_local(guest.local.len() as u32);
    for (i, v) in guest.local.iter().enumerate() {
        l.set(i as u32, *v);
    }
    Ok(())
}

fn session_client(id: u64) -> Result<session::Client, AccelError> {
    with_session(id, |s| {
        s.session
            .clone()
            .ok_or_else(|| AccelError::new(ErrorKind::Unavailable, "the session is closed"))
    })
}

impl GuestAccel {
    /// Access for a guest granted `grant` through `link` (none: this node has no
    /// accelerators, and every call says so), whose run ends at `deadline`.
    pub fn new(link: Option<AccelLink>, grant: Grant, deadline: Instant) -> GuestAccel {
        GuestAccel {
            link,
            grant,
            deadline,
            session: None,
            queued: Vec::new(),
            last_error: String::new(),
        }
    }

    fn link(&self) -> Result<&AccelLink, AccelError> {
        self.link.as_ref().ok_or_else(|| {
            AccelError::new(
                ErrorKind::Unavailable,
                "this node runs no agent with accelerators",
            )
        })
    }

    fn remaining(&self) -> Duration {
        self.deadline.saturating_duration_since(Instant::now())
    }

    /// Runs `f` on the RPC thread within the guest's deadline.
    async fn call<T, F, Fut>(&self, f: F) -> Result<T, AccelError>
    where
        F: FnOnce(std::rc::Rc<crate::rpc::Peers>) -> Fut + Send + 'static,
        Fut: std::future::Future<Output = Result<T, AccelError>> + 'static,
        T: Send + 'static,
    {
        let remaining = self.remaining();
        let call = self.link()?.rpc.run(f);
        match tokio::time::timeout(remaining, call).await {
            Ok(Ok(result)) => result,
            Ok(Err(e)) => Err(AccelError::new(ErrorKind::Unavailable, e.to_string())),
            Err(_) => Err(AccelError::new(
                ErrorKind::Timeout,
                "the invocation's deadline passed during an accelerator call",
            )),
        }
    }

    /// The session, opening it on first use. While no backend is reachable (one that
    /// restarts attaches again within seconds), it keeps trying for up to
    /// [`REATTACH_WAIT`], within the guest's deadline.
    async fn session(&mut self) -> Result<u64, AccelError> {
        if let Some(id) = self.session {
            return Ok(id);
        }
        // No link at all (a node without an agent): nothing to wait for.
        self.link()?;
        let until = Instant::now() + REATTACH_WAIT.min(self.remaining());
        loop {
            match self.open_session().await {
                Err(e) if e.kind == ErrorKind::Unavailable && Instant::now() < until => {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                other => return other,
            }
        }
    }

    async fn open_session(&mut self) -> Result<u64, AccelError> {
        let (addr, device) = self.link()?.pick(self.grant.kind)?;
        let id = NEXT_SESSION.fetch_add(1, Ordering::Relaxed);
        let memory = self.grant.memory_bytes;
        let timeout_ms = self.remaining().as_millis().max(1) as u64;
        self.call(move |peers| async move {
            let accel = peers
                .accel(&addr)
                .await
                .map_err(|e| AccelError::new(ErrorKind::Unavailable, e.to_string()))?;
            let mut request = accel.open_request();
            request.get().set_device(device);
            request.get().set_memory_limit(memory);
            request.get().set_timeout_ms(timeout_ms);
            let session = request.send().pipeline.get_session();
            // Check the session now, so that a bad grant fails here; after a lost
            // connection, the next session connects anew.
            if let Err(e) = session.usage_request().send().promise.await {
                let e = AccelError::from_capnp(&e);
                if e.kind == ErrorKind::Unavailable {
                    peers.forget(&addr);
                }
                return Err(e);
            }
            SESSIONS.with(|s| {
                s.borrow_mut().insert(
                    id,
                    GuestSession {
                        session: Some(session),
                        device,
                        ..GuestSession::default()
                    },
                )
            });
            Ok(())
        })
        .await?;
        if let Ok(mut opened) = self.link()?.opened.write() {
            *opened.entry(device).or_default() += 1;
        }
        self.session = Some(id);
        Ok(id)
    }

    /// The device of the session, as JSON (opens the session).
    pub async fn device(&mut self) -> Result<String, AccelError> {
        let id = self.session().await?;
        let index = self
            .call(move |_| async move { with_session(id, |s| Ok(s.device)) })
            .await?;
        let device = self
            .link()?
            .devices()
            .into_iter()
            .find(|d| d.index == index)
            .ok_or_else(|| AccelError::new(ErrorKind::Unavailable, "the device is gone"))?;
        serde_json::to_string(&device)
            .map_err(|e| AccelError::new(ErrorKind::Device, e.to_string()))
    }

    /// Compiles a program; answers its handle.
    pub async fn compile(&mut self, source: String, options: String) -> Result<u32, AccelError> {
        let id = self.session().await?;
        self.call(move |_| async move {
            let session = session_client(id)?;
            let mut request = session.compile_request();
            request.get().set_source(source.as_str());
            request.get().set_options(options.as_str());
            let reply = request.send().promise.await?;
            let program = reply.get()?.get_program()?;
            with_session(id, |s| {
                insert(s.held(), &mut s.programs, &mut s.next, program)
            })
        })
        .await
    }

    /// The kernel `name` of program `program`; answers its handle.
    pub async fn kernel(&mut self, program: u32, name: String) -> Result<u32, AccelError> {
        let id = self.session().await?;
        self.call(move |_| async move {
            let program = with_session(id, |s| {
                s.programs
                    .get(&program)
                    .cloned()
                    .ok_or_else(|| unknown("program", program))
            })?;
            let mut request = program.kernel_request();
            request.get().set_name(name.as_str());
            let reply = request.send().promise.await?;
            let kernel = reply.get()?.get_kernel()?;
            with_session(id, |s| {
                insert(s.held(), &mut s.kernels, &mut s.next, kernel)
            })
        })
        .await
    }

    /// A buffer of `bytes`; answers its handle.
    pub async fn alloc(&mut self, bytes: u64) -> Result<u32, AccelError> {
        let id = self.session().await?;
        self.call(move |_| async move {
            let session = session_client(id)?;
            let mut request = session.alloc_request();
            request.get().set_bytes(bytes);
            let reply = request.send().promise.await?;
            let buffer = reply.get()?.get_buffer()?;
            with_session(id, |s| {
                insert(s.held(), &mut s.buffers, &mut s.next, (buffer, bytes))
            })
        })
        .await
    }

    /// The size of buffer `handle`.
    pub async fn buffer_size(&mut self, handle: u32) -> Result<u64, AccelError> {
        let id = self.session().await?;
        self.call(move |_| async move { with_session(id, |s| Ok(s.buffer(handle)?.1)) })
            .await
    }

    /// Writes `data` into buffer `handle` at `offset`.
    pub async fn write(
        &mut self,
        handle: u32,
        offset: u64,
        data: Vec<u8>,
    ) -> Result<(), AccelError> {
        self.flush().await?;
        let id = self.session().await?;
        self.call(move |_| async move {
            let buffer = with_session(id, |s| Ok(s.buffer(handle)?.0))?;
            // Large writes go in pieces, all sent before the first answer.
            let mut pending = Vec::new();
            for (i, piece) in data.chunks(MAX_TRANSFER as usize).enumerate() {
                let mut request = buffer.write_request();
                request.get().set_offset(offset + i as u64 * MAX_TRANSFER);
                request.get().set_data(piece);
                pending.push(request.send().promise);
            }
            for reply in pending {
                reply.await?;
            }
            Ok(())
        })
        .await
    }

    /// Reads `len` bytes of buffer `handle` from `offset`.
    pub async fn read(
        &mut self,
        handle: u32,
        offset: u64,
        len: u64,
    ) -> Result<Vec<u8>, AccelError> {
        self.flush().await?;
        let id = self.session().await?;
        self.call(move |_| async move {
            let buffer = with_session(id, |s| Ok(s.buffer(handle)?.0))?;
            let mut pending = Vec::new();
            let mut at = 0;
            while at < len {
                let piece = (len - at).min(MAX_TRANSFER);
                let mut request = buffer.read_request();
                request.get().set_offset(offset + at);
                request.get().set_length(piece);
                pending.push(request.send().promise);
                at += piece;
            }
            let mut data = Vec::with_capacity(len as usize);
            for reply in pending {
                data.extend_from_slice(reply.await?.get()?.get_data()?);
            }
            Ok(data)
        })
        .await
    }

    /// Runs `run` after the queued runs and waits for it; answers the device time in ns
    /// (from the first queued run's start when there were some). An error of a queued
    /// run before it is answered here.
    pub async fn run(&mut self, run: GuestRun) -> Result<u64, AccelError> {
        self.queued.push(run);
        self.flush().await
    }

    /// Queues `run` without waiting: it is sent with the next call that must come after
    /// it (a read, write, run, [`finish`](Self::finish), or the release of an object it
    /// uses), or at once when [`MAX_QUEUED`] runs wait. Its errors are answered by that
    /// call. Queued runs that no later call sends never run.
    pub async fn enqueue(&mut self, run: GuestRun) -> Result<(), AccelError> {
        self.queued.push(run);
        if self.queued.len() >= MAX_QUEUED {
            self.flush().await?;
        }
        Ok(())
    }

    /// Sends the queued runs and waits for them; answers their device time in ns, from
    /// the first one's start to the last one's end (0 when none was queued).
    pub async fn finish(&mut self) -> Result<u64, AccelError> {
        self.flush().await
    }

    /// Sends the queued runs in one `Session.runAll` and waits for the last; answers
    /// their device time in ns.
    async fn flush(&mut self) -> Result<u64, AccelError> {
        if self.queued.is_empty() {
            return Ok(0);
        }
        let runs = std::mem::take(&mut self.queued);
        let id = self.session().await?;
        self.call(move |_| async move {
            let count = runs.len();
            let session = session_client(id)?;
            let mut request = session.run_all_request();
            with_session(id, |s| {
                let mut list = request.get().init_runs(count as u32);
                for (i, guest) in runs.iter().enumerate() {
                    write_run(s, list.reborrow().get(i as u32), guest).map_err(|e| {
                        if count > 1 {
                            e.prefixed(&format!("run {} of {count}", i + 1))
                        } else {
                            e
                        }
                    })?;
                }
                Ok(())
            })?;
            let reply = request.send().promise.await?;
            Ok(reply.get()?.get_info()?.get_device_ns())
        })
        .await
    }

    /// Drops the object behind `handle` (a program, kernel or buffer).
    pub async fn release(&mut self, handle: u32) -> Result<(), AccelError> {
        if self.queued.iter().any(|run| run.uses(handle)) {
            self.flush().await?;
        }
        let id = self.session().await?;
        self.call(move |_| async move {
            with_session(id, |s| {
                let found = s.programs.remove(&handle).is_some()
                    || s.kernels.remove(&handle).is_some()
                    || s.buffers.remove(&handle).is_some();
                if found {
                    Ok(())
                } else {
                    Err(unknown("program, kernel or buffer", handle))
                }
            })
        })
        .await
    }
}

impl Drop for GuestAccel {
    fn drop(&mut self) {
        if let (Some(id), Some(link)) = (self.session.take(), &self.link) {
            let opened = link.opened.clone();
            let rpc = link.rpc.clone();
            // Closing drops the capabilities, which frees the session's buffers on the
            // backend.
            let Ok(runtime) = tokio::runtime::Handle::try_current() else {
                return;
            };
            runtime.spawn(async move {
                let device = rpc
                    .run(move |_| async move {
                        SESSIONS.with(|s| s.borrow_mut().remove(&id).map(|s| s.device))
                    })
                    .await;
                if let (Ok(Some(device)), Ok(mut opened)) = (device, opened.write()) {
                    if let Some(n) = opened.get_mut(&device) {
                        *n = n.saturating_sub(1);
                    }
                }
            });
        }
    }
}

/// Connects to the backend at `addr` (on the current `LocalSet`), presenting `secret`.
pub async fn connect(
    addr: &str,
    secret: &crate::rpc::ClusterSecret,
) -> Result<accel::Client, AccelError> {
    let door: wafer_proto::node_capnp::door::Client = crate::rpc::connect(addr)
        .await
        .map_err(|e| AccelError::new(ErrorKind::Unavailable, e.to_string()))?;
    let mut request = door.accel_request();
    request.get().set_secret(secret.as_bytes());
    Ok(request.send().pipeline.get_accel())
}
