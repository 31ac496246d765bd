//! `wafer accel`: serves the machine's OpenCL devices as `capnp/accel.capnp` behind the
//! cluster-secret door. Sessions, programs, kernels and buffers are capability objects
//! on the RPC thread; device work goes to each device's own thread (`opencl.rs`).
//! Buffers and kernels handed back in runs are recognised through `CapabilityServerSet`s,
//! so a run can use only objects of its own session.

use std::cell::{Cell, RefCell};
use std::net::SocketAddr;
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use capnp_rpc::CapabilityServerSet;
use ocl::core;
use wafer_proto::accel_capnp::{
    accel, arg, buffer, done, kernel, program, session, AddressSpace as WireSpace,
    DeviceType as WireType,
};

use super::opencl::{self, AddressSpace, Arg, Device, Launch, Param};
use super::{AccelError, DeviceInfoSummary, ErrorKind};
use crate::rpc::{door::DoorService, ClusterSecret, RpcHandle};

/// Largest piece of a buffer one `write` or `read` carries (a capnp `Data` holds less
/// than 512 MiB).
pub const MAX_TRANSFER: u64 = 256 << 20;

/// Most runs one `Session.runAll` carries.
pub const MAX_RUNS: u32 = 4096;

/// Limits a backend applies to every session.
#[derive(Debug, Clone)]
pub struct BackendConfig {
    /// Device memory of a session that asks for no particular amount.
    pub default_session_memory: u64,
    /// Most device memory one session may hold.
    pub max_session_memory: u64,
    /// Deadline of a run when the session asks for none.
    pub default_timeout: Duration,
    /// Longest deadline a session may ask for.
    pub max_timeout: Duration,
}

impl Default for BackendConfig {
    fn default() -> BackendConfig {
        BackendConfig {
            default_session_memory: 256 << 20,
            max_session_memory: 4 << 30,
            default_timeout: opencl::DEFAULT_DEADLINE,
            max_timeout: Duration::from_secs(300),
        }
    }
}

/// The devices a backend serves and its limits.
#[derive(Debug)]
pub struct Backend {
    devices: Vec<Arc<Device>>,
    config: BackendConfig,
}

impl Backend {
    /// A backend over every OpenCL device of this machine.
    pub fn discover(config: BackendConfig) -> Result<Backend, AccelError> {
        Ok(Backend {
            devices: opencl::discover()?,
            config,
        })
    }

    /// What the devices are.
    pub fn devices(&self) -> Vec<DeviceInfoSummary> {
        self.devices.iter().map(|d| d.info.clone()).collect()
    }

    /// Starts serving on `listen` (its own RPC thread) and answers the address it
    /// listens on.
    pub async fn start(
        self: Arc<Self>,
        listen: SocketAddr,
        secret: ClusterSecret,
    ) -> anyhow::Result<SocketAddr> {
        use anyhow::Context as _;
        let listener = std::net::TcpListener::bind(listen)
            .with_context(|| format!("binding the accelerator address {listen}"))?;
        listener.set_nonblocking(true)?;
        let addr = listener.local_addr()?;
        let rpc = RpcHandle::start(secret.clone()).context("starting the RPC thread")?;
        tokio::spawn(async move {
            if let Err(e) = self.serve(&rpc, listener, secret).await {
                tracing::error!(error = %e, "the accelerator RPC server stopped");
            }
        });
        Ok(addr)
    }

    /// Serves the backend on `listener` through `rpc`, behind a door that admits peers
    /// presenting `secret`, until the process ends.
    pub async fn serve(
        self: Arc<Self>,
        rpc: &RpcHandle,
        listener: std::net::TcpListener,
        secret: ClusterSecret,
    ) -> Result<(), crate::rpc::RpcError> {
        rpc.serve_with(listener, crate::state::reader_options(), move || {
            let accel: accel::Client = capnp_rpc::new_client(AccelService {
                backend: self,
                servers: Rc::new(Servers::default()),
            });
            move |peer: SocketAddr| DoorService::accel(accel.clone(), secret.clone(), peer).client
        })
        .await
    }
}

/// Servers of one kind whose clients can be recognised when they come back in a call.
struct ServerSet<S, C: capnp::capability::FromServer<S>> {
    set: RefCell<CapabilityServerSet<S, C>>,
    made: Cell<u64>,
}

impl<S, C: capnp::capability::FromServer<S>> Default for ServerSet<S, C> {
    fn default() -> Self {
        ServerSet {
            set: RefCell::new(CapabilityServerSet::new()),
            made: Cell::new(0),
        }
    }
}

impl<S, C> ServerSet<S, C>
where
    C: capnp::capability::FromServer<S> + capnp::capability::FromClientHook,
{
    /// A client of `server`, recognisable later.
    fn add(&self, server: S) -> C {
        let mut set = self.set.borrow_mut();
        // The set keeps weak references: drop those of freed servers now and then.
        let made = self.made.get() + 1;
        self.made.set(made);
        if made.is_multiple_of(1024) {
            set.gc();
        }
        set.new_client(server)
    }

    /// The server behind `client` when it is one of this set's, with the resolved client.
    async fn local(&self, client: C) -> (Option<Rc<S>>, C) {
        let resolved = capnp::capability::get_resolved_cap(client).await;
        let server = self.set.borrow().get_local_server_of_resolved(&resolved);
        (server, resolved)
    }
}

/// The objects served on one RPC thread that calls hand back: buffers (run arguments)
/// and kernels (`Session.runAll`).
#[derive(Default)]
struct Servers {
    buffers: ServerSet<BufferService, buffer::Client>,
    kernels: ServerSet<KernelService, kernel::Client>,
}

struct AccelService {
    backend: Arc<Backend>,
    servers: Rc<Servers>,
}

fn write_device(w: wafer_proto::accel_capnp::device::Builder<'_>, device: &Device) {
    let usage = DeviceUse {
        sessions: device.sessions(),
        allocated: device.allocated(),
        busy: device.busy(),
    };
    write_device_info(w, &device.info, usage);
}

/// Writes a `Device` struct.
pub fn write_device_info(
    mut w: wafer_proto::accel_capnp::device::Builder<'_>,
    info: &DeviceInfoSummary,
    usage: DeviceUse,
) {
    w.set_index(info.index);
    w.set_name(&info.name);
    w.set_vendor(&info.vendor);
    w.set_type(match info.kind {
        opencl::DeviceType::Cpu => WireType::Cpu,
        opencl::DeviceType::Gpu => WireType::Gpu,
        opencl::DeviceType::Accelerator => WireType::Accelerator,
        opencl::DeviceType::Other => WireType::Other,
    });
    w.set_compute_units(info.compute_units);
    w.set_global_memory(info.global_memory);
    w.set_max_work_group_size(info.max_work_group_size);
    let mut sizes = w
        .reborrow()
        .init_max_work_item_sizes(info.max_work_item_sizes.len() as u32);
    for (i, s) in info.max_work_item_sizes.iter().enumerate() {
        sizes.set(i as u32, *s);
    }
    w.set_platform(&info.platform);
    w.set_max_alloc(info.max_alloc);
    w.set_sessions(usage.sessions);
    w.set_allocated(usage.allocated);
    w.set_busy(usage.busy);
}

/// Reads a `Device` struct back (clients).
pub fn read_device(
    r: wafer_proto::accel_capnp::device::Reader<'_>,
) -> capnp::Result<(DeviceInfoSummary, DeviceUse)> {
    let text = |t: capnp::Result<capnp::text::Reader<'_>>| -> capnp::Result<String> {
        Ok(t?.to_str()?.to_string())
    };
    let info = DeviceInfoSummary {
        index: r.get_index(),
        name: text(r.get_name())?,
        vendor: text(r.get_vendor())?,
        kind: match r.get_type()? {
            WireType::Cpu => opencl::DeviceType::Cpu,
            WireType::Gpu => opencl::DeviceType::Gpu,
            WireType::Accelerator => opencl::DeviceType::Accelerator,
            WireType::Other => opencl::DeviceType::Other,
        },
        compute_units: r.get_compute_units(),
        global_memory: r.get_global_memory(),
        max_work_group_size: r.get_max_work_group_size(),
        max_work_item_sizes: r.get_max_work_item_sizes()?.iter().collect(),
        platform: text(r.get_platform())?,
        max_alloc: r.get_max_alloc(),
    };
    let usage = DeviceUse {
        sessions: r.get_sessions(),
        allocated: r.get_allocated(),
        busy: r.get_busy(),
    };
    Ok((info, usage))
}

/// How a device is used now.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct DeviceUse {
    /// Open sessions.
    pub sessions: u32,
    /// Bytes in buffers.
    pub allocated: u64,
    /// Occupied by a kernel past its deadline.
    pub busy: bool,
}

impl accel::Server for AccelService {
    async fn devices(
        self: Rc<Self>,
        _: accel::DevicesParams,
        mut results: accel::DevicesResults,
    ) -> Result<(), capnp::Error> {
        let devices = &self.backend.devices;
        let mut list = results.get().init_devices(devices.len() as u32);
        for (i, device) in devices.iter().enumerate() {
            write_device(list.reborrow().get(i as u32), device);
        }
        Ok(())
    }

    async fn open(
        self: Rc<Self>,
        params: accel::OpenParams,
        mut results: accel::OpenResults,
    ) -> Result<(), capnp::Error> {
        let p = params.get()?;
        let index = p.get_device();
        let device = self
            .backend
            .devices
            .get(index as usize)
            .cloned()
            .ok_or_else(|| {
                AccelError::new(
                    ErrorKind::Invalid,
                    format!(
                        "no device {index}: this backend has {}",
                        self.backend.devices.len()
                    ),
                )
                .to_capnp()
            })?;
        let config = &self.backend.config;
        let limit = match p.get_memory_limit() {
            0 => config.default_session_memory.min(config.max_session_memory),
            n => n,
        };
        if limit > config.max_session_memory {
            return Err(AccelError::new(
                ErrorKind::MemoryLimit,
                format!(
                    "a session may hold at most {} MiB of device memory, not {} MiB",
                    config.max_session_memory >> 20,
                    limit >> 20
                ),
            )
            .to_capnp());
        }
        let timeout = match p.get_timeout_ms() {
            0 => config.default_timeout,
            ms => Duration::from_millis(ms).min(config.max_timeout),
        };
        device.count_session(true);
        let state = Rc::new(SessionState {
            device,
            limit,
            allocated: Cell::new(0),
            timeout,
        });
        results
            .get()
            .set_session(capnp_rpc::new_client(SessionService {
                state,
                servers: self.servers.clone(),
            }));
        Ok(())
    }
}

struct SessionState {
    device: Arc<Device>,
    limit: u64,
    allocated: Cell<u64>,
    timeout: Duration,
}

impl Drop for SessionState {
    fn drop(&mut self) {
        self.device.count_session(false);
    }
}

struct SessionService {
    state: Rc<SessionState>,
    servers: Rc<Servers>,
}

impl session::Server for SessionService {
    async fn compile(
        self: Rc<Self>,
        params: session::CompileParams,
        mut results: session::CompileResults,
    ) -> Result<(), capnp::Error> {
        let p = params.get()?;
        let source = p.get_source()?.to_string()?;
        let options = p.get_options()?.to_string()?;
        let device = self.state.device.clone();
        let program = tokio::task::spawn_blocking(move || device.build(&source, &options))
            .await
            .map_err(|e| capnp::Error::failed(format!("the compiler thread failed: {e}")))?
            .map_err(|e| e.to_capnp())?;
        results
            .get()
            .set_program(capnp_rpc::new_client(ProgramService {
                state: self.state.clone(),
                servers: self.servers.clone(),
                program,
            }));
        Ok(())
    }

    async fn alloc(
        self: Rc<Self>,
        params: session::AllocParams,
        mut results: session::AllocResults,
    ) -> Result<(), capnp::Error> {
        let bytes = params.get()?.get_bytes();
        let state = &self.state;
        let after = state.allocated.get().saturating_add(bytes);
        if after > state.limit {
            return Err(AccelError::new(
                ErrorKind::MemoryLimit,
                format!(
                    "allocating {bytes} bytes would hold {after} bytes of device memory; this grant allows {}",
                    state.limit
                ),
            )
            .to_capnp());
        }
        // Count the bytes before waiting for the device, so that concurrent allocs
        // cannot pass the limit together.
        state.allocated.set(after);
        let mem = match state.device.alloc(bytes, state.timeout).await {
            Ok(mem) => mem,
            Err(e) => {
                state
                    .allocated
                    .set(state.allocated.get().saturating_sub(bytes));
                return Err(e.to_capnp());
            }
        };
        let buffer = self.servers.buffers.add(BufferService {
            state: state.clone(),
            mem,
            bytes,
        });
        results.get().set_buffer(buffer);
        Ok(())
    }

    async fn usage(
        self: Rc<Self>,
        _: session::UsageParams,
        mut results: session::UsageResults,
    ) -> Result<(), capnp::Error> {
        let mut r = results.get();
        r.set_allocated(self.state.allocated.get());
        r.set_limit(self.state.limit);
        Ok(())
    }

    async fn device(
        self: Rc<Self>,
        _: session::DeviceParams,
        mut results: session::DeviceResults,
    ) -> Result<(), capnp::Error> {
        write_device(results.get().init_device(), &self.state.device);
        Ok(())
    }

    async fn run_all(
        self: Rc<Self>,
        params: session::RunAllParams,
        mut results: session::RunAllResults,
    ) -> Result<(), capnp::Error> {
        let started = Instant::now();
        let runs = params.get()?.get_runs()?;
        let count = runs.len();
        if count > MAX_RUNS {
            return Err(AccelError::new(
                ErrorKind::Invalid,
                format!("one call carries at most {MAX_RUNS} runs, not {count}"),
            )
            .to_capnp());
        }
        let mut launches = Vec::with_capacity(count as usize);
        let mut kept = Vec::with_capacity(count as usize);
        for (i, run) in runs.iter().enumerate() {
            let numbered = |e: AccelError| {
                if count > 1 {
                    e.prefixed(&format!("run {} of {count}", i + 1))
                } else {
                    e
                }
                .to_capnp()
            };
            let (server, _) = self.servers.kernels.local(run.get_kernel()?).await;
            let kernel = match server {
                Some(kernel) if Rc::ptr_eq(&kernel.state, &self.state) => kernel,
                _ => {
                    return Err(numbered(AccelError::new(
                        ErrorKind::Invalid,
                        "the kernel is not one of this session",
                    )))
                }
            };
            let args = read_args(run.get_args()?)?;
            let global: Vec<u64> = run.get_global()?.iter().collect();
            let local: Vec<u64> = run.get_local()?.iter().collect();
            let (launch, buffers) = kernel
                .check(args, &global, &local)
                .await
                .map_err(numbered)?;
            launches.push(launch);
            kept.push(buffers);
        }
        let device_ns = self
            .state
            .device
            .run_all(launches, self.state.timeout)
            .await
            .map_err(|e| e.to_capnp())?;
        drop(kept);
        let mut info = results.get().init_info();
        info.set_device_ns(device_ns);
        info.set_total_ns(opencl::elapsed_ns(started));
        Ok(())
    }
}

/// A run argument as received: a buffer still to be recognised, or a value.
enum WireArg {
    Buffer(buffer::Client),
    Value(Arg),
}

fn read_args(list: capnp::struct_list::Reader<'_, arg::Owned>) -> capnp::Result<Vec<WireArg>> {
    use wafer_proto::accel_capnp::arg::Which;
    list.iter()
        .map(|arg| {
            Ok(match arg.which()? {
                Which::Buffer(client) => WireArg::Buffer(client?),
                Which::Int(v) => WireArg::Value(Arg::Int(v)),
                Which::Uint(v) => WireArg::Value(Arg::Uint(v)),
                Which::Long(v) => WireArg::Value(Arg::Long(v)),
                Which::Ulong(v) => WireArg::Value(Arg::Ulong(v)),
                Which::Float(v) => WireArg::Value(Arg::Float(v)),
                Which::Double(v) => WireArg::Value(Arg::Double(v)),
                Which::Local(v) => WireArg::Value(Arg::Local(v)),
            })
        })
        .collect()
}

struct ProgramService {
    state: Rc<SessionState>,
    servers: Rc<Servers>,
    program: core::Program,
}

impl program::Server for ProgramService {
    async fn kernel(
        self: Rc<Self>,
        params: program::KernelParams,
        mut results: program::KernelResults,
    ) -> Result<(), capnp::Error> {
        let name = params.get()?.get_name()?.to_string()?;
        let (kernel, params, group_limit) = self
            .state
            .device
            .kernel(&self.program, &name)
            .map_err(|e| e.to_capnp())?;
        let kernel = self.servers.kernels.add(KernelService {
            state: self.state.clone(),
            servers: self.servers.clone(),
            kernel,
            params,
            group_limit,
        });
        results.get().set_kernel(kernel);
        Ok(())
    }

    async fn build_log(
        self: Rc<Self>,
        _: program::BuildLogParams,
        mut results: program::BuildLogResults,
    ) -> Result<(), capnp::Error> {
        results
            .get()
            .set_log(self.state.device.build_log(&self.program));
        Ok(())
    }
}

struct KernelService {
    state: Rc<SessionState>,
    servers: Rc<Servers>,
    kernel: core::Kernel,
    params: Vec<Param>,
    group_limit: u64,
}

impl KernelService {
    /// Checks a run of this kernel: its buffers must be the session's own, its
    /// arguments fit the parameters and its work sizes the device. Answers the run
    /// ready to enqueue and the buffer arguments (to keep them until it ends).
    async fn check(
        &self,
        args: Vec<WireArg>,
        global: &[u64],
        local: &[u64],
    ) -> Result<(Launch, Vec<Option<buffer::Client>>), AccelError> {
        let mut values = Vec::with_capacity(args.len());
        let mut kept = Vec::with_capacity(args.len());
        for (i, arg) in args.into_iter().enumerate() {
            match arg {
                WireArg::Buffer(client) => {
                    let (server, client) = self.servers.buffers.local(client).await;
                    match server {
                        Some(server) if Rc::ptr_eq(&server.state, &self.state) => {
                            values.push(Arg::Buffer(server.mem.clone(), server.bytes));
                            kept.push(Some(client));
                        }
                        _ => {
                            return Err(AccelError::new(
                                ErrorKind::Invalid,
                                format!("argument {i} is not a buffer of this session"),
                            ))
                        }
                    }
                }
                WireArg::Value(value) => {
                    values.push(value);
                    kept.push(None);
                }
            }
        }
        let launch = opencl::check_run(
            &self.state.device.info,
            self.group_limit,
            &self.params,
            self.kernel.clone(),
            values,
            global,
            local,
        )?;
        Ok((launch, kept))
    }
}

impl kernel::Server for KernelService {
    async fn run(
        self: Rc<Self>,
        params: kernel::RunParams,
        mut results: kernel::RunResults,
    ) -> Result<(), capnp::Error> {
        let started = Instant::now();
        let p = params.get()?;
        let args = read_args(p.get_args()?)?;
        let global: Vec<u64> = p.get_global()?.iter().collect();
        let local: Vec<u64> = p.get_local()?.iter().collect();
        let (launch, kept) = self
            .check(args, &global, &local)
            .await
            .map_err(|e| e.to_capnp())?;
        let device_ns = self
            .state
            .device
            .run_all(vec![launch], self.state.timeout)
            .await
            .map_err(|e| e.to_capnp())?;
        let mut r = results.get();
        let mut info = r.reborrow().init_info();
        info.set_device_ns(device_ns);
        info.set_total_ns(opencl::elapsed_ns(started));
        r.set_done(capnp_rpc::new_client(DoneService { args: kept }));
        Ok(())
    }

    async fn params(
        self: Rc<Self>,
        _: kernel::ParamsParams,
        mut results: kernel::ParamsResults,
    ) -> Result<(), capnp::Error> {
        let mut list = results.get().init_params(self.params.len() as u32);
        for (i, param) in self.params.iter().enumerate() {
            let mut w = list.reborrow().get(i as u32);
            w.set_name(&param.name);
            w.set_type_name(&param.type_name);
            w.set_address_space(match param.space {
                AddressSpace::Private => WireSpace::Private,
                AddressSpace::Global => WireSpace::Global,
                AddressSpace::Constant => WireSpace::Constant,
                AddressSpace::Local => WireSpace::Local,
            });
        }
        Ok(())
    }
}

struct DoneService {
    args: Vec<Option<buffer::Client>>,
}

impl done::Server for DoneService {
    async fn buffer(
        self: Rc<Self>,
        params: done::BufferParams,
        mut results: done::BufferResults,
    ) -> Result<(), capnp::Error> {
        let index = params.get()?.get_index();
        match self.args.get(index as usize) {
            Some(Some(buffer)) => {
                results.get().set_buffer(buffer.clone());
                Ok(())
            }
            _ => Err(AccelError::new(
                ErrorKind::Invalid,
                format!("argument {index} of the run is not a buffer"),
            )
            .to_capnp()),
        }
    }
}

struct BufferService {
    state: Rc<SessionState>,
    mem: core::Mem,
    bytes: u64,
}

impl Drop for BufferService {
    fn drop(&mut self) {
        let state = &self.state;
        state
            .allocated
            .set(state.allocated.get().saturating_sub(self.bytes));
        state.device.release(self.bytes);
    }
}

impl BufferService {
    fn check_range(&self, offset: u64, length: u64) -> Result<(), AccelError> {
        if length > MAX_TRANSFER {
            return Err(AccelError::new(
                ErrorKind::Invalid,
                format!("one transfer carries at most {MAX_TRANSFER} bytes, not {length}"),
            ));
        }
        match offset.checked_add(length) {
            Some(end) if end <= self.bytes => Ok(()),
            _ => Err(AccelError::new(
                ErrorKind::Invalid,
                format!(
                    "bytes {offset}..{} are outside the buffer of {} bytes",
                    offset.saturating_add(length),
                    self.bytes
                ),
            )),
        }
    }
}

impl buffer::Server for BufferService {
    async fn write(
        self: Rc<Self>,
        params: buffer::WriteParams,
        _: buffer::WriteResults,
    ) -> Result<(), capnp::Error> {
        let p = params.get()?;
        let offset = p.get_offset();
        let data = p.get_data()?;
        self.check_range(offset, data.len() as u64)
            .map_err(|e| e.to_capnp())?;
        if data.is_empty() {
            return Ok(());
        }
        let data = data.to_vec();
        drop(params);
        self.state
            .device
            .write(self.mem.clone(), offset, data, self.state.timeout)
            .await
            .map_err(|e| e.to_capnp())
    }

    async fn read(
        self: Rc<Self>,
        params: buffer::ReadParams,
        mut results: buffer::ReadResults,
    ) -> Result<(), capnp::Error> {
        let p = params.get()?;
        let (offset, length) = (p.get_offset(), p.get_length());
        self.check_range(offset, length).map_err(|e| e.to_capnp())?;
        if length == 0 {
            return Ok(());
        }
        let data = self
            .state
            .device
            .read(
                self.mem.clone(),
                offset,
                length as usize,
                self.state.timeout,
            )
            .await
            .map_err(|e| e.to_capnp())?;
        results.get().set_data(&data);
        Ok(())
    }

    async fn size(
        self: Rc<Self>,
        _: buffer::SizeParams,
        mut results: buffer::SizeResults,
    ) -> Result<(), capnp::Error> {
        results.get().set_bytes(self.bytes);
        Ok(())
    }
}

/// How often a backend renews its attachment to its agent.
pub const ATTACH_EVERY: Duration = Duration::from_secs(2);

/// Settings of `wafer accel`.
#[derive(Debug, Clone)]
pub struct AccelConfig {
    /// Address to serve on.
    pub listen: SocketAddr,
    /// Address the agent reaches this backend at (default: the bound `listen` address).
    pub advertise: Option<String>,
    /// The agent's executor address to attach to (none: serve direct clients only).
    pub agent: Option<String>,
    /// The cluster secret.
    pub secret: ClusterSecret,
    /// Session limits.
    pub backend: BackendConfig,
}

/// Attaches `devices` at `addr` to the agent at `agent` now and every
/// [`ATTACH_EVERY`], for as long as the process runs; a lost agent is retried.
pub fn keep_attached(rpc: RpcHandle, agent: String, addr: String, devices: Vec<DeviceInfoSummary>) {
    tokio::spawn(async move {
        let mut attached = false;
        loop {
            let (agent_addr, addr, devices) = (agent.clone(), addr.clone(), devices.clone());
            let result = rpc
                .run(move |peers| async move {
                    let executor = peers.executor(&agent_addr).await?;
                    let mut request = executor.attach_accel_request();
                    request.get().set_address(addr.as_str());
                    let mut list = request.get().init_devices(devices.len() as u32);
                    for (i, d) in devices.iter().enumerate() {
                        write_device_info(list.reborrow().get(i as u32), d, DeviceUse::default());
                    }
                    request.send().promise.await.map(|_| ()).map_err(|e| {
                        peers.forget(&agent_addr);
                        crate::rpc::RpcError::from_capnp(&agent_addr, e)
                    })
                })
                .await;
            match result {
                Ok(Ok(())) if !attached => {
                    tracing::info!(agent, "attached to the agent");
                    attached = true;
                }
                Ok(Ok(())) => {}
                Ok(Err(e)) | Err(e) => {
                    if attached {
                        tracing::warn!(agent, error = %e, "lost the agent; attaching again");
                    }
                    attached = false;
                }
            }
            tokio::time::sleep(ATTACH_EVERY).await;
        }
    });
}

/// `wafer accel`: discovers the devices, serves them, attaches to the agent, prints its
/// ready line and runs until SIGINT or SIGTERM.
pub async fn run(config: AccelConfig) -> anyhow::Result<()> {
    use anyhow::Context as _;
    let backend_config = config.backend.clone();
    let backend = tokio::task::spawn_blocking(move || Backend::discover(backend_config))
        .await?
        .context("discovering OpenCL devices")?;
    let devices = backend.devices();
    if devices.is_empty() {
        anyhow::bail!(
            "no OpenCL device found: install an ICD (Debian: pocl-opencl-icd for the CPU, or your GPU vendor's)"
        );
    }
    let backend = Arc::new(backend);
    let addr = backend
        .clone()
        .start(config.listen, config.secret.clone())
        .await?;
    let advertised = config.advertise.clone().unwrap_or_else(|| addr.to_string());
    if let Some(agent) = &config.agent {
        let rpc = RpcHandle::start(config.secret.clone()).context("starting the RPC thread")?;
        keep_attached(rpc, agent.clone(), advertised.clone(), devices.clone());
    }
    // The first line on stdout is machine-readable: tests and scripts wait for it.
    say!("wafer accel: {} devices; rpc {addr}", devices.len());
    for d in &devices {
        say!(
            "  device {}: {} ({}, {}, {} compute units, {} MiB) on {}",
            d.index,
            d.name,
            d.vendor,
            d.kind.as_str(),
            d.compute_units,
            d.global_memory >> 20,
            d.platform
        );
    }
    if let Some(agent) = &config.agent {
        say!("  attaching to agent {agent} as {advertised}");
    }
    tracing::info!(%addr, devices = devices.len(), "wafer accel ready");
    crate::signals::stopped().await;
    tracing::info!("wafer accel stopped");
    Ok(())
}
