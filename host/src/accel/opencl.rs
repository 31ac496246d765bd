//! The OpenCL side of a backend, through `ocl`'s core API: device discovery, one thread
//! per device that owns its in-order command queue (every write, read, fill and kernel
//! run of the device goes through it, in arrival order), program builds, kernel
//! parameters and the checks made before a run.

use std::collections::HashMap;
use std::ffi::CString;
use std::sync::atomic::{AtomicU32, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ocl::core::{
    self, ArgVal, CommandQueue, CommandQueueProperties, Context, DeviceId, DeviceInfo,
    DeviceInfoResult, Event, KernelArgAddressQualifier, KernelArgInfo, KernelArgInfoResult,
    KernelInfo, KernelInfoResult, KernelWorkGroupInfo, KernelWorkGroupInfoResult, Mem, MemFlags,
    PlatformInfo, ProfilingInfo, ProgramBuildInfo, ProgramBuildInfoResult,
};
use tokio::sync::oneshot;

use super::{AccelError, ErrorKind};
use crate::digest::Digest;

/// What kind of device.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DeviceType {
    /// The host processor (PoCL's device, for one).
    Cpu,
    /// A GPU.
    Gpu,
    /// Another dedicated accelerator.
    Accelerator,
    /// Anything else.
    Other,
}

impl DeviceType {
    /// The name used in attributes and constraints: `cpu`, `gpu`, `accelerator`, `other`.
    pub fn as_str(self) -> &'static str {
        match self {
            DeviceType::Cpu => "cpu",
            DeviceType::Gpu => "gpu",
            DeviceType::Accelerator => "accelerator",
            DeviceType::Other => "other",
        }
    }
}

impl std::str::FromStr for DeviceType {
    type Err = String;

    fn from_str(s: &str) -> Result<DeviceType, String> {
        match s {
            "cpu" => Ok(DeviceType::Cpu),
            "gpu" => Ok(DeviceType::Gpu),
            "accelerator" => Ok(DeviceType::Accelerator),
            "other" => Ok(DeviceType::Other),
            _ => Err(format!(
                "unknown device type {s:?}: use cpu, gpu, accelerator or other"
            )),
        }
    }
}

/// What a device is, as `Accel.devices()` reports it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct DeviceInfoSummary {
    /// Position in the backend's device list.
    pub index: u32,
    /// `CL_DEVICE_NAME`.
    pub name: String,
    /// `CL_DEVICE_VENDOR`.
    pub vendor: String,
    /// CPU, GPU, ...
    #[serde(rename = "type")]
    pub kind: DeviceType,
    /// `CL_DEVICE_MAX_COMPUTE_UNITS`.
    pub compute_units: u32,
    /// Global memory, bytes.
    pub global_memory: u64,
    /// `CL_DEVICE_MAX_WORK_GROUP_SIZE`.
    pub max_work_group_size: u64,
    /// `CL_DEVICE_MAX_WORK_ITEM_SIZES`.
    pub max_work_item_sizes: Vec<u64>,
    /// The platform's name.
    pub platform: String,
    /// `CL_DEVICE_MAX_MEM_ALLOC_SIZE`.
    pub max_alloc: u64,
}

type Job = Box<dyn FnOnce(&CommandQueue) + Send>;

/// States of one device call (see [`Device::exec`]).
const RUNNING: u8 = 0;
const DONE: u8 = 1;
const LATE: u8 = 2;

/// One OpenCL device and the thread that owns its queue.
pub struct Device {
    /// What it is.
    pub info: DeviceInfoSummary,
    id: DeviceId,
    context: Context,
    jobs: Mutex<std::sync::mpsc::Sender<Job>>,
    /// Kernel runs past their deadline that still occupy the device.
    late_runs: Arc<AtomicU32>,
    /// Bytes held by buffers now.
    allocated: AtomicU64,
    /// Sessions open now.
    sessions: AtomicU32,
    /// Built programs by digest of source and options (failed builds too: their log).
    programs: Mutex<HashMap<Digest, Result<core::Program, String>>>,
}

impl std::fmt::Debug for Device {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Device").field("info", &self.info).finish()
    }
}

fn device_error(what: &str, e: impl std::fmt::Display) -> AccelError {
    AccelError::new(ErrorKind::Device, format!("{what}: {e}"))
}

/// Every device of every OpenCL platform on this machine (none when there is no ICD).
pub fn discover() -> Result<Vec<Arc<Device>>, AccelError> {
    let platforms = match core::get_platform_ids() {
        Ok(p) => p,
        // No ICD installed, or none that loads: no devices, not an error.
        Err(e) => {
            tracing::info!(error = %e, "no OpenCL platform");
            return Ok(Vec::new());
        }
    };
    let mut devices = Vec::new();
    for platform in platforms {
        let platform_name = match core::get_platform_info(platform, PlatformInfo::Name) {
            Ok(name) => name.to_string(),
            Err(e) => {
                tracing::warn!(error = %e, "skipping an OpenCL platform without a name");
                continue;
            }
        };
        let ids = match core::get_device_ids(platform, Some(core::DeviceType::ALL), None) {
            Ok(ids) => ids,
            Err(e) => {
                tracing::warn!(platform = %platform_name, error = %e, "listing devices");
                continue;
            }
        };
        for id in ids {
            let index = devices.len() as u32;
            match Device::open(index, &platform_name, platform, id) {
                Ok(device) => devices.push(Arc::new(device)),
                Err(e) => {
                    tracing::warn!(platform = %platform_name, error = %e, "skipping a device")
                }
            }
        }
    }
    Ok(devices)
}

fn info(id: DeviceId, what: DeviceInfo) -> Result<DeviceInfoResult, AccelError> {
    core::get_device_info(id, what).map_err(|e| device_error("querying a device", e))
}

impl Device {
    fn open(
        index: u32,
        platform_name: &str,
        platform: core::PlatformId,
        id: DeviceId,
    ) -> Result<Device, AccelError> {
        let kind = match info(id, DeviceInfo::Type)? {
            DeviceInfoResult::Type(t) if t.contains(core::DeviceType::GPU) => DeviceType::Gpu,
            DeviceInfoResult::Type(t) if t.contains(core::DeviceType::CPU) => DeviceType::Cpu,
            DeviceInfoResult::Type(t) if t.contains(core::DeviceType::ACCELERATOR) => {
                DeviceType::Accelerator
            }
            _ => DeviceType::Other,
        };
        let number = |what| -> Result<u64, AccelError> {
            Ok(match info(id, what)? {
                DeviceInfoResult::MaxComputeUnits(n) => n as u64,
                DeviceInfoResult::GlobalMemSize(n) => n,
                DeviceInfoResult::MaxWorkGroupSize(n) => n as u64,
                DeviceInfoResult::MaxMemAllocSize(n) => n,
                other => {
                    return Err(device_error(
                        "querying a device",
                        format!("unexpected answer {other:?}"),
                    ))
                }
            })
        };
        let max_work_item_sizes = match info(id, DeviceInfo::MaxWorkItemSizes)? {
            DeviceInfoResult::MaxWorkItemSizes(sizes) => sizes.iter().map(|s| *s as u64).collect(),
            _ => Vec::new(),
        };
        let summary = DeviceInfoSummary {
            index,
            name: info(id, DeviceInfo::Name)?.to_string().trim().to_string(),
            vendor: info(id, DeviceInfo::Vendor)?.to_string().trim().to_string(),
            kind,
            compute_units: number(DeviceInfo::MaxComputeUnits)? as u32,
            global_memory: number(DeviceInfo::GlobalMemSize)?,
            max_work_group_size: number(DeviceInfo::MaxWorkGroupSize)?,
            max_work_item_sizes,
            platform: platform_name.trim().to_string(),
            max_alloc: number(DeviceInfo::MaxMemAllocSize)?,
        };
        let properties = core::ContextProperties::new().platform(platform);
        let context = core::create_context(Some(&properties), &[id], None, None)
            .map_err(|e| device_error("creating a context", e))?;
        let queue = core::create_command_queue(
            &context,
            id,
            Some(CommandQueueProperties::PROFILING_ENABLE),
        )
        .map_err(|e| device_error("creating a command queue", e))?;
        let (jobs, rx) = std::sync::mpsc::channel::<Job>();
        std::thread::Builder::new()
            .name(format!("wafer-accel-{index}"))
            .spawn(move || {
                while let Ok(job) = rx.recv() {
                    job(&queue);
                }
            })
            .map_err(|e| device_error("starting the device thread", e))?;
        Ok(Device {
            info: summary,
            id,
            context,
            jobs: Mutex::new(jobs),
            late_runs: Arc::new(AtomicU32::new(0)),
            allocated: AtomicU64::new(0),
            sessions: AtomicU32::new(0),
            programs: Mutex::new(HashMap::new()),
        })
    }

    /// Whether a kernel past its deadline still occupies the device.
    pub fn busy(&self) -> bool {
        self.late_runs.load(Ordering::Acquire) > 0
    }

    /// Bytes held by buffers now.
    pub fn allocated(&self) -> u64 {
        self.allocated.load(Ordering::Relaxed)
    }

    /// Sessions open now.
    pub fn sessions(&self) -> u32 {
        self.sessions.load(Ordering::Relaxed)
    }

    /// Counts a session in (`true`) or out.
    pub fn count_session(&self, open: bool) {
        if open {
            self.sessions.fetch_add(1, Ordering::Relaxed);
        } else {
            self.sessions.fetch_sub(1, Ordering::Relaxed);
        }
    }

    /// Runs `f` on the device thread (after everything queued before it) and waits at
    /// most `deadline` for its answer. Past the deadline the call fails with `timeout`;
    /// `f` still runs to its end, and while a kernel run (`is_run`) is past its deadline
    /// the device refuses new runs (`busy`).
    pub async fn exec<T, F>(&self, deadline: Duration, is_run: bool, f: F) -> Result<T, AccelError>
    where
        T: Send + 'static,
        F: FnOnce(&CommandQueue) -> Result<T, AccelError> + Send + 'static,
    {
        let (tx, rx) = oneshot::channel();
        // RUNNING until the job ends (DONE) or its caller gives up first (LATE); the
        // one that moves it on second settles the late count, so a run that ends just
        // as its deadline passes is never counted as still running.
        let call = Arc::new(AtomicU8::new(RUNNING));
        let job_call = call.clone();
        let late_runs = self.late_runs.clone();
        let job: Job = Box::new(move |queue| {
            let _ = tx.send(f(queue));
            if job_call.swap(DONE, Ordering::AcqRel) == LATE {
                late_runs.fetch_sub(1, Ordering::AcqRel);
            }
        });
        self.jobs
            .lock()
            .map_err(|_| device_error("the device thread", "poisoned"))?
            .send(job)
            .map_err(|_| device_error("the device thread", "stopped"))?;
        match tokio::time::timeout(deadline, rx).await {
            Ok(Ok(result)) => result,
            Ok(Err(_)) => Err(device_error("the device thread", "dropped a call")),
            Err(_) => {
                if is_run
                    && call
                        .compare_exchange(RUNNING, LATE, Ordering::AcqRel, Ordering::Acquire)
                        .is_ok()
                {
                    self.late_runs.fetch_add(1, Ordering::AcqRel);
                }
                Err(AccelError::new(
                    ErrorKind::Timeout,
                    format!(
                        "the call ran past its deadline of {} ms on device {} ({})",
                        deadline.as_millis(),
                        self.info.index,
                        self.info.name
                    ),
                ))
            }
        }
    }

    /// Builds `source` with `options` for this device, or answers from the cache.
    /// Blocks (run it off the RPC thread).
    pub fn build(&self, source: &str, options: &str) -> Result<core::Program, AccelError> {
        check_source(source)?;
        let options = check_options(options)?;
        let digest = Digest::of(&[source.as_bytes(), b"\0", options.as_bytes()].concat());
        if let Some(built) = self.cached(&digest) {
            return built;
        }
        let built = self.build_uncached(source, &options);
        let result = match &built {
            Ok(program) => Ok(program.clone()),
            Err(e) if e.kind == ErrorKind::Compile => Err(e.message.clone()),
            // A driver failure is not the program's fault: do not cache it.
            Err(_) => return built,
        };
        if let Ok(mut programs) = self.programs.lock() {
            programs.insert(digest, result);
        }
        built
    }

    fn cached(&self, digest: &Digest) -> Option<Result<core::Program, AccelError>> {
        let programs = self.programs.lock().ok()?;
        programs.get(digest).map(|built| match built {
            Ok(program) => Ok(program.clone()),
            Err(log) => Err(AccelError::new(ErrorKind::Compile, log.clone())),
        })
    }

    fn build_uncached(&self, source: &str, options: &str) -> Result<core::Program, AccelError> {
        let text = CString::new(source)
            .map_err(|_| AccelError::new(ErrorKind::Invalid, "the source contains a NUL byte"))?;
        let program = core::create_program_with_source(&self.context, &[text])
            .map_err(|e| device_error("creating a program", e))?;
        let all_options = CString::new(format!("{options} -cl-kernel-arg-info"))
            .map_err(|_| AccelError::new(ErrorKind::Invalid, "the options contain a NUL byte"))?;
        let built = core::build_program(&program, Some(&[self.id]), &all_options, None, None);
        let log = match core::get_program_build_info(&program, self.id, ProgramBuildInfo::BuildLog)
        {
            Ok(ProgramBuildInfoResult::BuildLog(log)) => log.trim().to_string(),
            _ => String::new(),
        };
        match built {
            Ok(()) => Ok(program),
            Err(e) => Err(AccelError::new(
                ErrorKind::Compile,
                if log.is_empty() {
                    format!("the program did not build: {e}")
                } else {
                    log
                },
            )),
        }
    }

    /// The build log of `program` (warnings).
    pub fn build_log(&self, program: &core::Program) -> String {
        match core::get_program_build_info(program, self.id, ProgramBuildInfo::BuildLog) {
            Ok(ProgramBuildInfoResult::BuildLog(log)) => log.trim().to_string(),
            _ => String::new(),
        }
    }

    /// The kernel `name` of `program` and its parameters.
    pub fn kernel(
        &self,
        program: &core::Program,
        name: &str,
    ) -> Result<(core::Kernel, Vec<Param>, u64), AccelError> {
        let kernel = core::create_kernel(program, name).map_err(|e| {
            AccelError::new(
                ErrorKind::UnknownKernel,
                format!("the program has no kernel {name:?} ({})", first_line(&e)),
            )
        })?;
        let count = match core::get_kernel_info(&kernel, KernelInfo::NumArgs) {
            Ok(KernelInfoResult::NumArgs(n)) => n,
            other => {
                return Err(device_error(
                    "counting kernel parameters",
                    format!("{other:?}"),
                ))
            }
        };
        let mut params = Vec::with_capacity(count as usize);
        for i in 0..count {
            let arg = |what| core::get_kernel_arg_info(&kernel, i, what, None);
            let space = match arg(KernelArgInfo::AddressQualifier) {
                Ok(KernelArgInfoResult::AddressQualifier(q)) => match q {
                    KernelArgAddressQualifier::Global => AddressSpace::Global,
                    KernelArgAddressQualifier::Constant => AddressSpace::Constant,
                    KernelArgAddressQualifier::Local => AddressSpace::Local,
                    KernelArgAddressQualifier::Private => AddressSpace::Private,
                },
                other => {
                    return Err(device_error(
                        "reading kernel parameters",
                        format!("{other:?}"),
                    ))
                }
            };
            let type_name = match arg(KernelArgInfo::TypeName) {
                Ok(KernelArgInfoResult::TypeName(t)) => t.trim_end_matches('\0').to_string(),
                _ => String::new(),
            };
            let param_name = match arg(KernelArgInfo::Name) {
                Ok(KernelArgInfoResult::Name(n)) => n.trim_end_matches('\0').to_string(),
                _ => format!("arg{i}"),
            };
            params.push(Param {
                name: param_name,
                type_name,
                space,
            });
        }
        let group_limit = match core::get_kernel_work_group_info(
            &kernel,
            self.id,
            KernelWorkGroupInfo::WorkGroupSize,
        ) {
            Ok(KernelWorkGroupInfoResult::WorkGroupSize(n)) => n as u64,
            _ => self.info.max_work_group_size,
        };
        Ok((kernel, params, group_limit))
    }

    /// A zero-filled buffer of `bytes` (the caller checks the session's limit first).
    pub async fn alloc(&self, bytes: u64, deadline: Duration) -> Result<Mem, AccelError> {
        if bytes == 0 || bytes > self.info.max_alloc {
            return Err(AccelError::new(
                ErrorKind::Invalid,
                format!(
                    "a buffer has 1 to {} bytes on this device, not {bytes}",
                    self.info.max_alloc
                ),
            ));
        }
        let len = usize::try_from(bytes)
            .map_err(|_| AccelError::new(ErrorKind::Invalid, "buffer too large for this host"))?;
        // SAFETY: no host pointer is passed; the driver allocates `len` bytes.
        let mem =
            unsafe { core::create_buffer::<_, u8>(&self.context, MemFlags::READ_WRITE, len, None) }
                .map_err(|e| device_error("allocating a buffer", e))?;
        let fill = mem.clone();
        self.exec(deadline, false, move |queue| {
            core::enqueue_fill_buffer(
                queue,
                &fill,
                0u8,
                0,
                len,
                None::<Event>,
                None::<&mut Event>,
                None,
            )
            .and_then(|()| core::finish(queue))
            .map_err(|e| device_error("zeroing a buffer", e))
        })
        .await?;
        self.allocated.fetch_add(bytes, Ordering::Relaxed);
        Ok(mem)
    }

    /// Counts `bytes` of a dropped buffer out.
    pub fn release(&self, bytes: u64) {
        self.allocated.fetch_sub(bytes, Ordering::Relaxed);
    }

    /// Copies `data` into `mem` at `offset` (bounds checked by the caller).
    pub async fn write(
        &self,
        mem: Mem,
        offset: u64,
        data: Vec<u8>,
        deadline: Duration,
    ) -> Result<(), AccelError> {
        self.exec(deadline, false, move |queue| {
            // SAFETY: blocking write; `data` outlives it.
            unsafe {
                core::enqueue_write_buffer(
                    queue,
                    &mem,
                    true,
                    offset as usize,
                    &data,
                    None::<Event>,
                    None::<&mut Event>,
                )
            }
            .map_err(|e| device_error("writing a buffer", e))
        })
        .await
    }

    /// Copies `len` bytes out of `mem` from `offset` (bounds checked by the caller).
    pub async fn read(
        &self,
        mem: Mem,
        offset: u64,
        len: usize,
        deadline: Duration,
    ) -> Result<Vec<u8>, AccelError> {
        self.exec(deadline, false, move |queue| {
            let mut data = vec![0u8; len];
            // SAFETY: blocking read into `data`, which outlives it.
            unsafe {
                core::enqueue_read_buffer(
                    queue,
                    &mem,
                    true,
                    offset as usize,
                    &mut data,
                    None::<Event>,
                    None::<&mut Event>,
                )
            }
            .map_err(|e| device_error("reading a buffer", e))?;
            Ok(data)
        })
        .await
    }

    /// Runs `launches` one after another (in the device's queue order), waiting at most
    /// `deadline` for the last to end. Answers the device time from the first one's
    /// start to the last one's end, ns (only those two carry an event). When one cannot
    /// be enqueued, the runs before it still end before the error is answered.
    pub async fn run_all(
        &self,
        launches: Vec<Launch>,
        deadline: Duration,
    ) -> Result<u64, AccelError> {
        if self.busy() {
            return Err(AccelError::new(
                ErrorKind::Busy,
                format!(
                    "device {} ({}) still runs a kernel that passed its deadline; try again later",
                    self.info.index, self.info.name
                ),
            ));
        }
        self.exec(deadline, true, move |queue| {
            let count = launches.len();
            let (mut first, mut last) = (None, None);
            for (n, launch) in launches.iter().enumerate() {
                let timed = n == 0 || n + 1 == count;
                match enqueue(queue, launch, timed) {
                    Ok(event) if n == 0 => first = event,
                    Ok(event) => last = event,
                    Err(e) => {
                        // Let the runs already enqueued end before their buffers may go.
                        let _ = core::finish(queue);
                        return Err(if count > 1 {
                            e.prefixed(&format!("run {} of {count}", n + 1))
                        } else {
                            e
                        });
                    }
                }
            }
            let Some(first) = first else {
                return Ok(0);
            };
            let last = last.unwrap_or_else(|| first.clone());
            core::wait_for_event(&last)
                .map_err(|e| device_error("running the kernel", first_line(&e)))?;
            let time = |event: &Event, what| {
                core::get_event_profiling_info(event, what)
                    .and_then(|t| t.time())
                    .unwrap_or(0)
            };
            Ok(time(&last, ProfilingInfo::End).saturating_sub(time(&first, ProfilingInfo::Start)))
        })
        .await
    }
}

/// A checked kernel run, ready to enqueue.
#[derive(Debug)]
pub struct Launch {
    /// The kernel (its arguments are set from `values` on the device thread).
    pub kernel: core::Kernel,
    /// One value per parameter.
    pub values: Vec<Value>,
    /// Global work size, padded to 3 dimensions.
    pub global: [usize; 3],
    /// Local work size, padded to 3 dimensions; `None`: the driver chooses.
    pub local: Option<[usize; 3]>,
    /// Dimensions used (1 to 3).
    pub dims: u32,
}

/// Sets `launch`'s arguments and enqueues it on `queue`; answers its event when `timed`.
fn enqueue(
    queue: &CommandQueue,
    launch: &Launch,
    timed: bool,
) -> Result<Option<Event>, AccelError> {
    let kernel = &launch.kernel;
    for (i, arg) in launch.values.iter().enumerate() {
        let i = i as u32;
        let set = match arg {
            Value::Buffer(mem) => core::set_kernel_arg(kernel, i, ArgVal::mem(mem)),
            Value::Bytes(bytes) => {
                // SAFETY: a private argument of exactly the parameter's size.
                let (size, ptr) = (bytes.len(), bytes.as_ptr());
                let err =
                    unsafe { ocl::ffi::clSetKernelArg(kernel.as_ptr(), i, size, ptr as *const _) };
                if err == 0 {
                    Ok(())
                } else {
                    return Err(device_error(
                        "setting an argument",
                        format!("OpenCL status {err}"),
                    ));
                }
            }
            Value::Local(bytes) => core::set_kernel_arg(kernel, i, ArgVal::local::<u8>(bytes)),
        };
        set.map_err(|e| device_error("setting an argument", first_line(&e)))?;
    }
    let mut event = Event::null();
    // SAFETY: every argument is set, with buffers that live as long as the kernel.
    unsafe {
        core::enqueue_kernel(
            queue,
            kernel,
            launch.dims,
            None,
            &launch.global,
            launch.local,
            None::<Event>,
            timed.then_some(&mut event),
        )
    }
    .map_err(|e| classify_enqueue(&e))?;
    Ok(timed.then_some(event))
}

fn classify_enqueue(e: &ocl::core::Error) -> AccelError {
    let text = first_line(e);
    if text.contains("WORK_GROUP_SIZE")
        || text.contains("WORK_ITEM_SIZE")
        || text.contains("GLOBAL_WORK_SIZE")
    {
        AccelError::new(ErrorKind::WorkSize, text)
    } else {
        device_error("enqueueing the kernel", text)
    }
}

fn first_line(e: &impl std::fmt::Display) -> String {
    let text = e.to_string();
    text.lines()
        .map(str::trim)
        .find(|l| !l.is_empty())
        .unwrap_or("")
        .to_string()
}

/// Where a kernel parameter points.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AddressSpace {
    /// A value, not a pointer.
    Private,
    /// Global memory: a buffer.
    Global,
    /// Constant memory: a buffer.
    Constant,
    /// Work-group local memory: a size.
    Local,
}

/// A kernel parameter as compiled.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Param {
    /// Its name.
    pub name: String,
    /// Its type as written (`float*`, `uint`).
    pub type_name: String,
    /// Where it points.
    pub space: AddressSpace,
}

/// An argument given to a run, before it is checked.
#[derive(Debug, Clone)]
pub enum Arg {
    /// A buffer of `bytes` bytes.
    Buffer(Mem, u64),
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
    /// Bytes of local memory.
    Local(u64),
}

impl Arg {
    fn kind(&self) -> &'static str {
        match self {
            Arg::Buffer(..) => "a buffer",
            Arg::Int(_) => "an int",
            Arg::Uint(_) => "a uint",
            Arg::Long(_) => "a long",
            Arg::Ulong(_) => "a ulong",
            Arg::Float(_) => "a float",
            Arg::Double(_) => "a double",
            Arg::Local(_) => "a local size",
        }
    }
}

/// An argument as set on the kernel.
#[derive(Debug, Clone)]
pub enum Value {
    /// A buffer.
    Buffer(Mem),
    /// A private value's bytes.
    Bytes(Vec<u8>),
    /// Local memory, bytes.
    Local(usize),
}

/// The size of one element of a pointer parameter's type, or of a value parameter.
fn type_size(type_name: &str) -> Option<usize> {
    let base: String = type_name
        .replace(['*'], " ")
        .split_whitespace()
        .filter(|w| {
            !matches!(
                *w,
                "const"
                    | "restrict"
                    | "volatile"
                    | "__global"
                    | "global"
                    | "__constant"
                    | "constant"
                    | "__local"
                    | "local"
                    | "unsigned"
                    | "signed"
            )
        })
        .collect::<Vec<_>>()
        .join(" ");
    let unsigned_prefix = type_name.contains("unsigned");
    let (scalar, width) = match base.find(|c: char| c.is_ascii_digit()) {
        Some(at) => (&base[..at], base[at..].parse::<usize>().ok()?),
        None => (base.as_str(), 1),
    };
    let size = match scalar {
        "char" | "uchar" | "bool" => 1,
        "short" | "ushort" | "half" => 2,
        "int" | "uint" | "float" => 4,
        "long" | "ulong" | "double" | "size_t" | "ptrdiff_t" | "intptr_t" | "uintptr_t" => 8,
        "" if unsigned_prefix => 4,
        _ => return None,
    };
    let width = match width {
        1 | 2 | 4 | 8 | 16 => width,
        3 => 4,
        _ => return None,
    };
    Some(size * width)
}

/// Checks `args` against `params` and the work sizes against the device, and turns
/// them into a run of `kernel` ready to enqueue.
pub fn check_run(
    device: &DeviceInfoSummary,
    kernel_group_limit: u64,
    params: &[Param],
    kernel: core::Kernel,
    args: Vec<Arg>,
    global: &[u64],
    local: &[u64],
) -> Result<Launch, AccelError> {
    if args.len() != params.len() {
        return Err(AccelError::new(
            ErrorKind::ArgCount,
            format!(
                "the kernel takes {} arguments, the run gave {}",
                params.len(),
                args.len()
            ),
        ));
    }
    let work_size = |message: String| AccelError::new(ErrorKind::WorkSize, message);
    if global.is_empty() || global.len() > 3 {
        return Err(work_size(format!(
            "a run has 1 to 3 global dimensions, not {}",
            global.len()
        )));
    }
    if !local.is_empty() && local.len() != global.len() {
        return Err(work_size(format!(
            "local sizes have as many dimensions as global ones ({}), not {}",
            global.len(),
            local.len()
        )));
    }
    let mut global_dims = [1usize; 3];
    let mut items: u64 = 1;
    for (d, &g) in global.iter().enumerate() {
        if g == 0 {
            return Err(work_size(format!("global size {d} is 0")));
        }
        items = items
            .checked_mul(g)
            .filter(|n| *n <= 1 << 40)
            .ok_or_else(|| work_size("the global work size is too large".to_string()))?;
        global_dims[d] = g as usize;
    }
    let local_dims = if local.is_empty() {
        None
    } else {
        let mut dims = [1usize; 3];
        let mut group: u64 = 1;
        for (d, &l) in local.iter().enumerate() {
            let limit = device
                .max_work_item_sizes
                .get(d)
                .copied()
                .unwrap_or(u64::MAX);
            if l == 0 || l > limit {
                return Err(work_size(format!(
                    "local size {d} is {l}; this device allows 1 to {limit}"
                )));
            }
            if !global[d].is_multiple_of(l) {
                return Err(work_size(format!(
                    "local size {d} ({l}) does not divide global size {d} ({})",
                    global[d]
                )));
            }
            group = group.saturating_mul(l);
            dims[d] = l as usize;
        }
        let limit = kernel_group_limit.min(device.max_work_group_size);
        if group > limit {
            return Err(work_size(format!(
                "a work-group of {group} items is more than this kernel allows on this device ({limit})"
            )));
        }
        Some(dims)
    };
    let mut values = Vec::with_capacity(args.len());
    for (i, (param, arg)) in params.iter().zip(args).enumerate() {
        let wrong = |arg: &Arg| {
            AccelError::new(
                ErrorKind::ArgType,
                format!(
                    "argument {i} ({} {}) cannot take {}",
                    param.type_name,
                    param.name,
                    arg.kind()
                ),
            )
        };
        let value = match (param.space, &arg) {
            (AddressSpace::Global | AddressSpace::Constant, Arg::Buffer(mem, bytes)) => {
                let element = type_size(&param.type_name).unwrap_or(1) as u64;
                let needed = element.saturating_mul(items);
                if *bytes < needed {
                    return Err(AccelError::new(
                        ErrorKind::BufferTooSmall,
                        format!(
                            "argument {i} ({} {}) is a buffer of {bytes} bytes; {items} work-items need at least {needed} ({element} bytes each)",
                            param.type_name, param.name
                        ),
                    ));
                }
                Value::Buffer(mem.clone())
            }
            (AddressSpace::Local, Arg::Local(bytes)) if *bytes > 0 => Value::Local(*bytes as usize),
            (AddressSpace::Private, _) => {
                let size = type_size(&param.type_name).ok_or_else(|| wrong(&arg))?;
                let is_float = param.type_name.contains("float")
                    || param.type_name.contains("double")
                    || param.type_name.contains("half");
                let bytes: Vec<u8> = match (&arg, is_float, size) {
                    (Arg::Float(v), true, 4) => v.to_le_bytes().to_vec(),
                    (Arg::Double(v), true, 8) => v.to_le_bytes().to_vec(),
                    (Arg::Int(v), false, 1 | 2 | 4) => {
                        int_bytes(i64::from(*v), size, &arg, &wrong)?
                    }
                    (Arg::Uint(v), false, 1 | 2 | 4) => {
                        int_bytes(i64::from(*v), size, &arg, &wrong)?
                    }
                    (Arg::Long(v), false, 8) => v.to_le_bytes().to_vec(),
                    (Arg::Ulong(v), false, 8) => v.to_le_bytes().to_vec(),
                    _ => return Err(wrong(&arg)),
                };
                Value::Bytes(bytes)
            }
            _ => return Err(wrong(&arg)),
        };
        values.push(value);
    }
    Ok(Launch {
        kernel,
        values,
        global: global_dims,
        local: local_dims,
        dims: global.len() as u32,
    })
}

fn int_bytes(
    v: i64,
    size: usize,
    arg: &Arg,
    wrong: &dyn Fn(&Arg) -> AccelError,
) -> Result<Vec<u8>, AccelError> {
    let fits = match size {
        1 => (-128..=255).contains(&v),
        2 => (-32768..=65535).contains(&v),
        _ => true,
    };
    if !fits {
        return Err(wrong(arg));
    }
    Ok(v.to_le_bytes()[..size].to_vec())
}

/// Longest program source accepted (compiling is not bounded by a run's deadline).
pub const MAX_SOURCE_BYTES: usize = 1 << 20;

/// Refuses sources that include files: a backend compiles what any granted guest sends,
/// and an `#include` could read the backend's files into a build log.
fn check_source(source: &str) -> Result<(), AccelError> {
    if source.len() > MAX_SOURCE_BYTES {
        return Err(AccelError::new(
            ErrorKind::Invalid,
            format!(
                "a program's source has at most {MAX_SOURCE_BYTES} bytes, this one {}",
                source.len()
            ),
        ));
    }
    // Join continued lines, then look for the directive (and its digraph spelling).
    let joined = source.replace("\\\r\n", "").replace("\\\n", "");
    let mentions_include = joined.lines().any(|line| {
        let line = line.trim_start();
        let rest = line
            .strip_prefix('#')
            .or_else(|| line.strip_prefix("%:"))
            .or_else(|| line.strip_prefix("??="));
        rest.is_some_and(|r| {
            let r = r.trim_start();
            r.starts_with("include") || r.starts_with("import") || r.starts_with("embed")
        })
    });
    if mentions_include {
        return Err(AccelError::new(
            ErrorKind::Compile,
            "programs are one self-contained source: #include is not allowed",
        ));
    }
    Ok(())
}

/// Keeps the compiler options a guest may pass: macros (`-D`), `-cl-*` switches and
/// warning switches. Anything that reaches files (`-I`, `-include`) is refused.
fn check_options(options: &str) -> Result<String, AccelError> {
    let mut kept = Vec::new();
    let mut words = options.split_whitespace();
    while let Some(word) = words.next() {
        let ok = word.starts_with("-cl-")
            || word.starts_with("-W")
            || word == "-w"
            || word.starts_with("-D");
        if !ok {
            return Err(AccelError::new(
                ErrorKind::Compile,
                format!("compiler option {word:?} is not allowed (use -D, -cl-*, -w or -W*)"),
            ));
        }
        if word == "-D" {
            match words.next() {
                Some(def) => kept.push(format!("-D{def}")),
                None => return Err(AccelError::new(ErrorKind::Compile, "-D needs a macro")),
            }
            continue;
        }
        kept.push(word.to_string());
    }
    Ok(kept.join(" "))
}

/// How long a device call may take when nothing else bounds it.
pub const DEFAULT_DEADLINE: Duration = Duration::from_secs(10);

/// When a call started, for `RunInfo.totalNs`.
pub fn elapsed_ns(since: Instant) -> u64 {
    since.elapsed().as_nanos().min(u64::MAX as u128) as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn type_sizes() {
        assert_eq!(type_size("float*"), Some(4));
        assert_eq!(type_size("const float*"), Some(4));
        assert_eq!(type_size("uchar4*"), Some(4));
        assert_eq!(type_size("float3*"), Some(16));
        assert_eq!(type_size("double"), Some(8));
        assert_eq!(type_size("uint"), Some(4));
        assert_eq!(type_size("struct point*"), None);
    }

    #[test]
    fn includes_and_file_options_are_refused() {
        assert!(check_source("#include \"/etc/passwd\"\n__kernel void k() {}").is_err());
        assert!(check_source("  #  inc\\\nlude <x>").is_err());
        assert!(check_source("%:include <x>").is_err());
        assert!(check_source(&" ".repeat(MAX_SOURCE_BYTES + 1)).is_err());
        assert!(check_source("__kernel void k(__global float* a) { a[0] = 1; }").is_ok());
        assert_eq!(
            check_options("-D N=4 -cl-fast-relaxed-math -w")
                .ok()
                .as_deref(),
            Some("-DN=4 -cl-fast-relaxed-math -w")
        );
        assert!(check_options("-I /etc").is_err());
        assert!(check_options("-include /etc/passwd").is_err());
    }
}
