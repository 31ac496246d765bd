//! The WebAssembly runtime: a wasmtime engine (pooling allocator, epoch interruption),
//! module validation and compilation with an on-disk cache, and invocations that each
//! run in a fresh instance under the function's limits. Functions with a fuel limit run
//! in a second engine, started when the first one is prepared, whose code counts fuel
//! (so the others never pay for the counting).
//!
//! Guests run as futures on the caller's async executor (wasmtime's async support, on a
//! fiber stack): at every epoch tick a running guest yields to the executor, and once
//! its wall-clock deadline has passed it is interrupted. So a long-running guest never
//! holds an executor thread for more than one tick at a time, and no thread hand-off is
//! paid per invocation.

pub mod cache;
mod environ;
mod imports;
pub mod limits;
mod stdio;
mod validate;

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use wasmtime::{
    Config, Engine, Extern, InstanceAllocationStrategy, InstancePre, Linker, Module, ModuleExport,
    PoolConcurrencyLimitError, PoolingAllocationConfig, Store, Trap, UpdateDeadline, WasmBacktrace,
};
use wasmtime_wasi::p1::WasiP1Ctx;
use wasmtime_wasi::p2::pipe::MemoryInputPipe;
use wasmtime_wasi::{I32Exit, WasiCtxBuilder};

use crate::digest::Digest;
use cache::ModuleCache;
pub use environ::Environ;
pub use limits::Limits;
use limits::MemoryLimiter;
use stdio::{LogPipe, ResponsePipe};
pub use validate::{to_binary, ALLOWED_IMPORT_MODULES};

/// How often the epoch advances; the granularity of wall-clock timeouts.
const EPOCH_TICK: Duration = Duration::from_millis(2);

/// Dirty bytes per slot reset in place (memset) rather than decommitted.
const KEEP_RESIDENT_BYTES: usize = 2 << 20;

/// Bytes of each fiber stack kept resident between instances.
const ASYNC_STACK_KEEP_RESIDENT_BYTES: usize = 64 << 10;

/// How the runtime's engine is set up.
#[derive(Debug, Clone)]
pub struct RuntimeConfig {
    /// Use wasmtime's pooling instance allocator (pre-reserved slots) instead of
    /// allocating each instance's memory with mmap on demand.
    pub pooling: bool,
    /// Most instances alive at once: the node's total, and each engine's pool size.
    pub max_instances: u32,
    /// Highest memory limit a function may ask for, MiB.
    pub max_memory_mb: u64,
    /// Folder for precompiled code; `None` compiles every time.
    pub cache_dir: Option<PathBuf>,
}

impl Default for RuntimeConfig {
    fn default() -> RuntimeConfig {
        RuntimeConfig {
            pooling: true,
            max_instances: 1000,
            max_memory_mb: 4096,
            cache_dir: None,
        }
    }
}

/// What a deploy-time operation on a module can fail with.
#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    /// The engine could not be set up.
    #[error("setting up the wasm engine: {0}")]
    Engine(String),
    /// The bytes are not a valid WebAssembly module.
    #[error("malformed wasm module: {0}")]
    Malformed(String),
    /// The module imports something the host does not provide.
    #[error(
        "module imports {kind} `{module}::{name}`, which wafer does not provide \
         (guests may import WASI preview 1 `wasi_snapshot_preview1` functions, preview 0 \
         `wasi_unstable` ones and the \
         `wafer` module's `log` and `accel_*` functions)"
    )]
    ForbiddenImport {
        /// Import module name.
        module: String,
        /// Import field name.
        name: String,
        /// Function, memory, table, global or tag.
        kind: &'static str,
    },
    /// The module is valid WebAssembly that this node will not run (it exceeds the
    /// instance pool's limits or uses a disabled feature).
    #[error("module not supported by this node: {0}")]
    Unsupported(String),
    /// The module has no `_start` function.
    #[error("module is not a WASI command: it exports no `_start` function")]
    NotACommand,
    /// The module's `_start` takes parameters or returns results.
    #[error(
        "module is not a WASI command: its `_start` must take no parameters and return \
         nothing, but its type is {0}"
    )]
    StartSignature(String),
    /// The module's initial memory is larger than its memory limit.
    #[error(
        "module needs {} of memory at start, above its memory limit of {} \
         (raise `memory_mb`, or build the guest with a smaller initial memory)",
        limits::human_bytes(*needed),
        limits::human_bytes(*limit)
    )]
    InitialMemoryTooLarge {
        /// Initial memory, bytes.
        needed: u64,
        /// The function's limit, bytes.
        limit: u64,
    },
    /// The requested memory limit is above what this node allows.
    #[error("memory limit of {requested} MiB is above this node's maximum of {max} MiB")]
    MemoryLimitTooHigh {
        /// Requested limit, MiB.
        requested: u64,
        /// Node maximum, MiB.
        max: u64,
    },
    /// Linking the module against the host failed.
    #[error("linking the module: {0}")]
    Link(String),
}

/// Why an invocation could not be started (a guest's own failure is an [`Exit`]).
#[derive(Debug, thiserror::Error)]
pub enum InvokeError {
    /// Every instance slot is in use.
    #[error("too many concurrent instances: {0}")]
    Busy(String),
    /// Instantiation failed for another reason.
    #[error("instantiating the module: {0}")]
    Instantiate(String),
}

/// How a guest's run ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Exit {
    /// `_start` returned (0) or the guest called `proc_exit(code)`.
    Code(i32),
    /// The wall-clock limit interrupted the guest.
    Timeout,
    /// The guest trapped after a memory growth was refused by its limit.
    MemoryLimit,
    /// The guest wrote more than its response limit to stdout.
    ResponseTooLarge,
    /// The guest used all of its fuel.
    OutOfFuel,
    /// The guest trapped (unreachable, out-of-bounds access, ...).
    Trap(String),
}

/// Where an invocation's stdio goes.
#[derive(Debug, Clone)]
pub enum Stdio {
    /// Stdin from these bytes; stdout and stderr captured in the [`Outcome`].
    Captured(Bytes),
    /// The host process's own stdin, stdout and stderr (`wafer run`).
    Inherit,
}

/// One run of a function.
#[derive(Debug, Clone)]
pub struct Invocation {
    /// `argv`, starting with the program name.
    pub args: Vec<String>,
    /// Environment variables.
    pub env: Environ,
    /// Stdio wiring.
    pub stdio: Stdio,
}

/// What a finished invocation produced.
#[derive(Debug, Clone)]
pub struct Outcome {
    /// How it ended.
    pub exit: Exit,
    /// Captured stdout (empty for [`Stdio::Inherit`]).
    pub stdout: Bytes,
    /// Captured stderr and `wafer.log` lines, up to the log limit.
    pub log: Bytes,
    /// Log bytes dropped beyond the limit.
    pub log_dropped: u64,
    /// Whether the memory limit refused a growth during the run (the guest may have
    /// coped, or failed in its own way).
    pub memory_refused: bool,
    /// Time from instantiation to exit.
    pub duration: Duration,
    /// Fuel the run used, when it counted fuel.
    pub fuel_used: Option<u64>,
}

/// Counters the runtime keeps; the gateway exports them.
#[derive(Debug, Clone, Default)]
pub struct RuntimeMetrics {
    /// Modules loaded from the precompiled cache.
    pub cache_hits: Counter,
    /// Modules not found in the precompiled cache.
    pub cache_misses: Counter,
    /// Modules compiled from wasm.
    pub compilations: Counter,
    /// Instances alive now.
    pub live_instances: Gauge,
    /// Unused memory slots that a module used before (warm for it), both engines.
    pub warm_slots: Gauge,
    /// Bytes of guest memory kept resident in unused slots, both engines.
    pub warm_resident_bytes: Gauge,
}

/// Per-instance host state.
pub struct InstanceState {
    wasi: WasiP1Ctx,
    /// The environment variables (served by [`environ`], not by `wasi`).
    environ: environ::Environ,
    limiter: MemoryLimiter,
    log: LogPipe,
    /// The accelerator grant's session (none: not granted).
    accel: Option<crate::accel::client::GuestAccel>,
    /// The message of the last failed accelerator call.
    accel_error: String,
}

/// A module ready to instantiate: validated, compiled (or loaded) and linked. Cheap to
/// clone (the compiled code is shared).
#[derive(Clone)]
pub struct Prepared {
    pre: InstancePre<InstanceState>,
    /// `_start`, found once so that each run skips the lookup by name.
    start: ModuleExport,
    digest: Digest,
    from_cache: bool,
    /// Compiled by the engine that counts fuel.
    metered: bool,
}

impl Prepared {
    /// The module's digest.
    pub fn digest(&self) -> &Digest {
        &self.digest
    }

    /// Whether the code came from the precompiled cache.
    pub fn from_cache(&self) -> bool {
        self.from_cache
    }
}

/// Ticks the epoch thread goes on with after the last guest ended before it parks: under
/// load the count of running guests touches zero between requests all the time, and
/// parking there would make the next invocation pay a futex wake-up and the thread a
/// needless wake-up for each such gap (50 ms of 2 ms ticks: 25 wake-ups once the node
/// goes idle).
const IDLE_TICKS_BEFORE_PARKING: u32 = 25;

/// What the runtime and its epoch thread share.
#[derive(Default)]
struct TickerShared {
    stop: AtomicBool,
    /// Invocations in progress; the thread ticks only while there are some.
    running: AtomicUsize,
}

/// The epoch thread: advances the engine's epoch every [`EPOCH_TICK`] while guests
/// run, and sleeps (parked) once none have run for a while, so an idle node costs no
/// wake-ups. Stops
/// when the runtime goes away.
struct EpochTicker {
    shared: Arc<TickerShared>,
    thread: std::thread::Thread,
}

impl EpochTicker {
    fn start(engine: Engine) -> std::io::Result<EpochTicker> {
        let shared = Arc::new(TickerShared::default());
        let state = shared.clone();
        let handle = std::thread::Builder::new()
            .name("wafer-epoch".into())
            .spawn(move || {
                let mut idle_ticks = 0;
                while !state.stop.load(Ordering::Acquire) {
                    if state.running.load(Ordering::Acquire) == 0 {
                        if idle_ticks >= IDLE_TICKS_BEFORE_PARKING {
                            // Woken by the next invocation (or by drop); a wake-up that
                            // came first makes this return at once.
                            std::thread::park();
                            idle_ticks = 0;
                            continue;
                        }
                        idle_ticks += 1;
                    } else {
                        idle_ticks = 0;
                    }
                    std::thread::sleep(EPOCH_TICK);
                    engine.increment_epoch();
                }
            })?;
        Ok(EpochTicker {
            shared,
            thread: handle.thread().clone(),
        })
    }

    /// Marks an invocation as running until the guard drops.
    fn enter(&self) -> RunningGuard<'_> {
        if self.shared.running.fetch_add(1, Ordering::AcqRel) == 0 {
            self.thread.unpark();
        }
        RunningGuard(&self.shared.running)
    }
}

impl Drop for EpochTicker {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::Release);
        self.thread.unpark();
    }
}

struct RunningGuard<'a>(&'a AtomicUsize);

impl Drop for RunningGuard<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// One wasmtime engine and what is tied to it: its linker, its precompiled-code cache
/// and its epoch thread.
struct EngineSet {
    engine: Engine,
    linker: Linker<InstanceState>,
    cache: Option<ModuleCache>,
    ticker: EpochTicker,
}

impl EngineSet {
    /// Builds an engine for `config`; `metered`: its code counts fuel.
    fn start(config: &RuntimeConfig, metered: bool) -> Result<EngineSet, RuntimeError> {
        let mut wasm_config = Config::new();
        wasm_config.epoch_interruption(true);
        wasm_config.consume_fuel(metered);
        if config.pooling {
            let mut pool = PoolingAllocationConfig::default();
            pool.total_core_instances(config.max_instances)
                .total_memories(config.max_instances)
                .total_tables(config.max_instances)
                .total_stacks(config.max_instances)
                .total_component_instances(0)
                .max_memories_per_module(1)
                .max_tables_per_module(4)
                .table_elements(1 << 16)
                .max_memory_size(usize::try_from(config.max_memory_mb << 20).unwrap_or(usize::MAX))
                // Reset the pages an instance dirtied with memset (found with the
                // PAGEMAP_SCAN ioctl where the kernel has it) instead of madvise, so the
                // next instance in the slot takes no page faults on them.
                .linear_memory_keep_resident(KEEP_RESIDENT_BYTES)
                .table_keep_resident(KEEP_RESIDENT_BYTES / 8)
                .async_stack_keep_resident(ASYNC_STACK_KEEP_RESIDENT_BYTES)
                .pagemap_scan(wasmtime::Enabled::Auto)
                // Every freed memory slot stays warm for the module that last used it
                // (wasmtime's default keeps 100): with many functions in turn, a slot
                // taken from another module costs an image remap, its page faults and
                // TLB shoot-downs (-16 % CPU per request with 300 functions, see
                // docs/benchmarks.md). The price: more slots keep the pages their last
                // guest dirtied, up to KEEP_RESIDENT_BYTES each (at worst
                // max_instances x 2 MiB; 300 `hello` functions added ~17 MB).
                .max_unused_warm_slots(config.max_instances);
            wasm_config.allocation_strategy(InstanceAllocationStrategy::Pooling(pool));
        }
        let engine = Engine::new(&wasm_config).map_err(engine_error)?;
        let mut linker: Linker<InstanceState> = Linker::new(&engine);
        wasmtime_wasi::p1::add_to_linker_async(&mut linker, |s| &mut s.wasi)
            .map_err(engine_error)?;
        // Older toolchains' `wasi_unstable`, adapted onto the same preview 1 context.
        wasmtime_wasi::p0::add_to_linker_async(&mut linker, |s| &mut s.wasi)
            .map_err(engine_error)?;
        environ::add_to_linker(&mut linker).map_err(engine_error)?;
        imports::add_to_linker(&mut linker).map_err(engine_error)?;
        imports::add_accel_to_linker(&mut linker).map_err(engine_error)?;
        // The cache's file names carry the engine's configuration, so the two engines'
        // code for one module sit side by side.
        let cache = match &config.cache_dir {
            Some(dir) => Some(ModuleCache::open(dir, &engine).map_err(|e| {
                RuntimeError::Engine(format!("module cache {}: {e}", dir.display()))
            })?),
            None => None,
        };
        let ticker = EpochTicker::start(engine.clone())
            .map_err(|e| RuntimeError::Engine(format!("starting the epoch thread: {e}")))?;
        Ok(EngineSet {
            engine,
            linker,
            cache,
            ticker,
        })
    }
}

/// The engines, linkers and module caches of one node.
pub struct Runtime {
    /// Functions without a fuel limit.
    plain: EngineSet,
    /// Functions with one: started when the first is prepared.
    metered: std::sync::OnceLock<EngineSet>,
    /// Instances alive in either engine: `max_instances` bounds the two together.
    slots: Slots,
    config: RuntimeConfig,
    provided: BTreeSet<(String, String)>,
    metrics: RuntimeMetrics,
    /// The node's accelerator backends, once its agent has them.
    accel: std::sync::OnceLock<crate::accel::client::AccelLink>,
}

impl std::fmt::Debug for Runtime {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Runtime").finish_non_exhaustive()
    }
}

impl Runtime {
    /// Builds the engine and linker for functions without a fuel limit.
    pub fn new(config: &RuntimeConfig) -> Result<Runtime, RuntimeError> {
        let plain = EngineSet::start(config, false)?;
        let provided = provided_imports(&plain.engine, &plain.linker);
        Ok(Runtime {
            plain,
            metered: std::sync::OnceLock::new(),
            slots: Slots::new(config.max_instances),
            config: config.clone(),
            provided,
            metrics: RuntimeMetrics::default(),
            accel: std::sync::OnceLock::new(),
        })
    }

    /// The engine for functions with (`metered`) or without a fuel limit; the metered
    /// one is started on first use.
    fn engines(&self, metered: bool) -> Result<&EngineSet, RuntimeError> {
        if !metered {
            return Ok(&self.plain);
        }
        if let Some(set) = self.metered.get() {
            return Ok(set);
        }
        let started = EngineSet::start(&self.config, true)?;
        // Two first preparations at once: one engine wins, the other is dropped.
        Ok(self.metered.get_or_init(|| started))
    }

    /// Gives granted guests the node's accelerator backends (once; later calls are
    /// ignored).
    pub fn set_accel(&self, link: crate::accel::client::AccelLink) {
        let _ = self.accel.set(link);
    }

    /// The node's accelerator backends, if its agent has them.
    pub fn accel(&self) -> Option<&crate::accel::client::AccelLink> {
        self.accel.get()
    }

    /// Counts a serverless invocation under `limits` as one granted a device, while
    /// the answer lives (none when `limits` grant no device or no agent runs here).
    pub fn count_invocation(
        &self,
        limits: &Limits,
    ) -> Option<crate::accel::client::InvocationCount> {
        (limits.accel > 0)
            .then(|| self.accel().map(|link| link.invocation()))
            .flatten()
    }

    /// The runtime's counters.
    pub fn metrics(&self) -> &RuntimeMetrics {
        &self.metrics
    }

    /// Brings the pool gauges ([`RuntimeMetrics::warm_slots`] and
    /// [`RuntimeMetrics::warm_resident_bytes`]) up to date: they take the pools' locks,
    /// so they are read when scraped rather than on every invocation.
    pub fn observe_pools(&self) {
        let (mut slots, mut bytes) = (0u64, 0u64);
        for set in std::iter::once(&self.plain).chain(self.metered.get()) {
            if let Some(pool) = set.engine.pooling_allocator_metrics() {
                slots += u64::from(pool.unused_warm_memories());
                bytes += pool.unused_memory_bytes_resident() as u64;
            }
        }
        let gauge = |n: u64| i64::try_from(n).unwrap_or(i64::MAX);
        self.metrics.warm_slots.set(gauge(slots));
        self.metrics.warm_resident_bytes.set(gauge(bytes));
    }

    /// Validates `wasm` (a binary: see [`to_binary`] for uploads) under `limits`, then
    /// loads its precompiled code from the cache or compiles it (and fills the cache),
    /// and links it.
    pub fn prepare(&self, wasm: &[u8], limits: &Limits) -> Result<Prepared, RuntimeError> {
        self.check_limits(limits)?;
        let metered = limits.fuel > 0;
        let set = self.engines(metered)?;
        let digest = Digest::of(wasm);
        let cached = set
            .cache
            .as_ref()
            .and_then(|c| c.load(&set.engine, &digest));
        let from_cache = cached.is_some();
        let module = match cached {
            Some(module) => {
                self.metrics.cache_hits.inc();
                module
            }
            None => {
                if set.cache.is_some() {
                    self.metrics.cache_misses.inc();
                }
                // Validation alone tells a malformed module from a valid one that this
                // engine will not take (pool limits such as table size or memory count).
                Module::validate(&set.engine, wasm)
                    .map_err(|e| RuntimeError::Malformed(format!("{e:#}")))?;
                let module = Module::new(&set.engine, wasm)
                    .map_err(|e| RuntimeError::Unsupported(format!("{e:#}")))?;
                self.metrics.compilations.inc();
                module
            }
        };
        validate::check_module(&module, &self.provided, limits.memory_bytes())?;
        if let (Some(cache), false) = (&set.cache, from_cache) {
            if let Err(err) = cache.store(&digest, &module) {
                tracing::warn!(%digest, error = %err, "could not store precompiled module");
            }
        }
        let start = module
            .get_export_index("_start")
            .ok_or(RuntimeError::NotACommand)?;
        let pre = set
            .linker
            .instantiate_pre(&module)
            .map_err(|e| RuntimeError::Link(format!("{e:#}")))?;
        Ok(Prepared {
            pre,
            start,
            digest,
            from_cache,
            metered,
        })
    }

    /// Checks that `limits` are within what this node allows.
    pub fn check_limits(&self, limits: &Limits) -> Result<(), RuntimeError> {
        if limits.memory_mb > self.config.max_memory_mb {
            return Err(RuntimeError::MemoryLimitTooHigh {
                requested: limits.memory_mb,
                max: self.config.max_memory_mb,
            });
        }
        Ok(())
    }

    /// Runs `prepared` once in a fresh instance under `limits`, on the current tokio
    /// runtime; the future yields at every epoch tick and ends by the timeout.
    pub async fn invoke(
        &self,
        prepared: &Prepared,
        limits: &Limits,
        invocation: Invocation,
    ) -> Result<Outcome, InvokeError> {
        let log = LogPipe::new(usize::try_from(limits.max_log_bytes).unwrap_or(usize::MAX));
        let max_response = usize::try_from(limits.max_response_bytes).unwrap_or(usize::MAX);
        let mut builder = WasiCtxBuilder::new();
        builder.args(&invocation.args);
        let stdout = match invocation.stdio {
            Stdio::Captured(input) => {
                let out = ResponsePipe::new(max_response);
                builder
                    .stdin(MemoryInputPipe::new(input))
                    .stdout(out.clone())
                    .stderr(log.clone());
                Some(out)
            }
            Stdio::Inherit => {
                builder.inherit_stdio();
                None
            }
        };
        let deadline = Instant::now() + Duration::from_millis(limits.timeout_ms);
        let accel = (limits.accel > 0).then(|| {
            crate::accel::client::GuestAccel::new(
                self.accel.get().cloned(),
                crate::accel::client::Grant {
                    memory_bytes: limits.accel_memory_mb.saturating_mul(1 << 20),
                    kind: limits.accel_type,
                },
                deadline,
            )
        });
        let state = InstanceState {
            wasi: builder.build_p1(),
            environ: invocation.env,
            limiter: MemoryLimiter::new(limits.memory_bytes()),
            log: log.clone(),
            accel,
            accel_error: String::new(),
        };
        let set = match (prepared.metered, self.metered.get()) {
            (false, _) if limits.fuel == 0 => &self.plain,
            (true, Some(metered)) => metered,
            _ => {
                return Err(InvokeError::Instantiate(format!(
                    "module {} was prepared for {} fuel limit",
                    prepared.digest.short(),
                    if prepared.metered { "a" } else { "no" }
                )))
            }
        };
        let Some(_slot) = self.slots.take() else {
            return Err(InvokeError::Busy(format!(
                "all {} instance slots of this node are in use",
                self.config.max_instances
            )));
        };
        let mut store = Store::new(&set.engine, state);
        // (Preparation follows the limits, so a metered module comes with a fuel limit;
        // without one it would get all the fuel there is.)
        let fuel = prepared.metered.then_some(if limits.fuel > 0 {
            limits.fuel
        } else {
            u64::MAX
        });
        if let Some(fuel) = fuel {
            store
                .set_fuel(fuel)
                .map_err(|e| InvokeError::Instantiate(format!("setting fuel: {e:#}")))?;
        }
        store.limiter(|s| &mut s.limiter);
        store.epoch_deadline_callback(move |_| {
            Ok(if Instant::now() >= deadline {
                UpdateDeadline::Interrupt
            } else {
                // `yield_now` lets tokio poll its I/O driver before the guest resumes.
                // A plain wake would requeue the guest at once: a worker with several
                // running guests would then poll for I/O only every 61 tasks (61 ticks),
                // leaving its other connections unserved for ~300 ms at a time.
                UpdateDeadline::YieldCustom(1, Box::pin(tokio::task::yield_now()))
            })
        });
        store.set_epoch_deadline(1);

        let started = Instant::now();
        let _running = set.ticker.enter();
        self.metrics.live_instances.inc();
        let _live = LiveGuard(&self.metrics.live_instances);
        let run = async {
            match prepared.pre.instantiate_async(&mut store).await {
                Ok(instance) => {
                    let start = instance
                        .get_module_export(&mut store, &prepared.start)
                        .and_then(Extern::into_func)
                        .ok_or_else(|| {
                            InvokeError::Instantiate("the module exports no `_start`".into())
                        })
                        .and_then(|f| {
                            f.typed::<(), ()>(&store)
                                .map_err(|e| InvokeError::Instantiate(format!("`_start`: {e:#}")))
                        });
                    match start {
                        Ok(start) => Ok(start.call_async(&mut store, ()).await),
                        Err(e) => Err(e),
                    }
                }
                Err(e) if e.downcast_ref::<PoolConcurrencyLimitError>().is_some() => {
                    Err(InvokeError::Busy(format!("{e:#}")))
                }
                Err(e) => Ok(Err(e)),
            }
        };
        // The epoch callback interrupts running wasm at the deadline; this timer also
        // ends a guest that is parked in a host call (a long `poll_oneoff` sleep), by
        // dropping the call, which wasmtime supports at any await point.
        let backstop = Duration::from_millis(limits.timeout_ms) + 2 * EPOCH_TICK;
        let result = tokio::time::timeout(backstop, run).await;
        let duration = started.elapsed();
        let mut exit = match result {
            Err(_elapsed) => Exit::Timeout,
            Ok(Err(start_error)) => return Err(start_error),
            Ok(Ok(Ok(()))) => Exit::Code(0),
            Ok(Ok(Err(e))) => {
                if let Some(code) = e.downcast_ref::<I32Exit>() {
                    Exit::Code(code.0)
                } else if store.data().limiter.refused() {
                    Exit::MemoryLimit
                } else if matches!(e.downcast_ref::<Trap>(), Some(Trap::Interrupt)) {
                    Exit::Timeout
                } else if matches!(e.downcast_ref::<Trap>(), Some(Trap::OutOfFuel)) {
                    Exit::OutOfFuel
                } else if let Some(trap) = e.downcast_ref::<Trap>() {
                    // The trap itself ("wasm trap: call stack exhausted"); the wasm
                    // backtrace goes to the node's debug log, not to the caller.
                    tracing::debug!(error = ?e, "guest trapped");
                    Exit::Trap(trap.to_string())
                } else {
                    // A host call's error or an exception nothing caught.
                    tracing::debug!(error = ?e, "guest failed");
                    Exit::Trap(without_backtrace(&e))
                }
            }
        };
        let memory_refused = store.data().limiter.refused();
        let fuel_used = fuel.map(|given| given.saturating_sub(store.get_fuel().unwrap_or(0)));
        drop(store);
        let stdout = match stdout {
            Some(out) if out.overflowed() => {
                exit = Exit::ResponseTooLarge;
                Bytes::new()
            }
            Some(out) => out.take(),
            None => Bytes::new(),
        };
        let (log, log_dropped) = log.contents();
        Ok(Outcome {
            exit,
            stdout,
            log,
            log_dropped,
            memory_refused,
            duration,
            fuel_used,
        })
    }
}

/// `e`'s causes, outermost first, without the wasm backtrace wasmtime adds as context
/// (it names the guest's internals and goes to the node's debug log instead).
fn without_backtrace(e: &wasmtime::Error) -> String {
    let backtrace = e.downcast_ref::<WasmBacktrace>().map(|b| b.to_string());
    let causes: Vec<String> = e
        .chain()
        .map(|cause| cause.to_string())
        .filter(|cause| Some(cause) != backtrace.as_ref())
        .collect();
    causes.join(": ")
}

fn engine_error(e: wasmtime::Error) -> RuntimeError {
    RuntimeError::Engine(format!("{e:#}"))
}

struct LiveGuard<'a>(&'a Gauge);

/// A count of the instances alive, bounded: each engine's pool has `max_instances`
/// slots, and this keeps the node as a whole to that many too.
struct Slots {
    used: AtomicU32,
    max: u32,
}

impl Slots {
    fn new(max: u32) -> Slots {
        Slots {
            used: AtomicU32::new(0),
            max,
        }
    }

    /// One slot, given back when the guard drops; `None` when all are taken.
    fn take(&self) -> Option<SlotGuard<'_>> {
        self.used
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < self.max).then_some(n + 1)
            })
            .ok()
            .map(|_| SlotGuard(&self.used))
    }
}

struct SlotGuard<'a>(&'a AtomicU32);

impl Drop for SlotGuard<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Drop for LiveGuard<'_> {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// Every `(module, name)` the linker defines.
fn provided_imports(engine: &Engine, linker: &Linker<InstanceState>) -> BTreeSet<(String, String)> {
    let state = InstanceState {
        wasi: WasiCtxBuilder::new().build_p1(),
        environ: environ::Environ::default(),
        limiter: MemoryLimiter::new(0),
        log: LogPipe::new(0),
        accel: None,
        accel_error: String::new(),
    };
    let mut store = Store::new(engine, state);
    linker
        .iter(&mut store)
        .map(|(module, name, _)| (module.to_string(), name.to_string()))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const SPIN: &str = r#"(module (memory (export "memory") 1)
        (func (export "_start") (loop $l (br $l))))"#;
    const EMPTY: &str = r#"(module (memory (export "memory") 1) (func (export "_start")))"#;

    fn run() -> Invocation {
        Invocation {
            args: vec!["t".into()],
            env: Environ::default(),
            stdio: Stdio::Captured(Bytes::new()),
        }
    }

    /// A guest that asks for its environment: writes the pointers, then the block (one
    /// `fd_write` each: wasmtime-wasi writes one buffer per call).
    fn environ_guest(module: &str, pointers_at: u32) -> Vec<u8> {
        wat::parse_str(format!(
            r#"(module
                (import "{module}" "environ_sizes_get" (func $sizes (param i32 i32) (result i32)))
                (import "{module}" "environ_get" (func $get (param i32 i32) (result i32)))
                (import "{module}" "fd_write" (func $write (param i32 i32 i32 i32) (result i32)))
                (memory (export "memory") 1)
                (func (export "_start")
                    (drop (call $sizes (i32.const 0) (i32.const 4)))
                    (drop (call $get (i32.const {pointers_at}) (i32.const 256)))
                    (i32.store (i32.const 1024) (i32.const 16))
                    (i32.store (i32.const 1028) (i32.mul (i32.load (i32.const 0)) (i32.const 4)))
                    (i32.store (i32.const 1032) (i32.const 256))
                    (i32.store (i32.const 1036) (i32.load (i32.const 4)))
                    (drop (call $write (i32.const 1) (i32.const 1024) (i32.const 1) (i32.const 1100)))
                    (drop (call $write (i32.const 1) (i32.const 1032) (i32.const 1) (i32.const 1100)))))"#
        ))
        .expect("wat")
    }

    /// A module whose initial memory is above its limit is refused when it is prepared
    /// (deployed), whether it exports that memory or not, instead of failing every call.
    #[test]
    fn initial_memory_above_the_limit_is_refused_at_prepare() {
        let runtime = Runtime::new(&RuntimeConfig::default()).expect("runtime");
        let limits = Limits {
            memory_mb: 2,
            ..Limits::default()
        };
        for memory in [r#"(memory (export "memory") 33)"#, "(memory 33)"] {
            let wasm = wat::parse_str(format!(r#"(module {memory} (func (export "_start")))"#))
                .expect("wat");
            match runtime.prepare(&wasm, &limits) {
                Err(RuntimeError::InitialMemoryTooLarge { needed, limit }) => {
                    assert_eq!((needed, limit), (33 << 16, 2 << 20), "{memory}");
                    let message = RuntimeError::InitialMemoryTooLarge { needed, limit }.to_string();
                    assert!(
                        message.contains("2.1 MiB") && message.contains("limit of 2.0 MiB"),
                        "{message}"
                    );
                }
                Err(other) => panic!("{memory}: {other}"),
                Ok(_) => panic!("{memory}: prepared"),
            }
            let fits = wat::parse_str(format!(
                r#"(module {} (func (export "_start")))"#,
                memory.replace("33", "32")
            ))
            .expect("wat");
            runtime
                .prepare(&fits, &limits)
                .expect("32 pages fit in 2 MiB");
        }
    }

    /// Both WASI modules hand out the variables in order, `KEY=VALUE\0` each with a
    /// pointer to it; a misaligned pointer traps.
    #[tokio::test]
    async fn guests_read_their_environment_in_order() {
        let runtime = Runtime::new(&RuntimeConfig::default()).expect("runtime");
        let limits = Limits::default();
        let env: Environ = [("B", "2"), ("A", "x=y z"), ("EMPTY", "")]
            .into_iter()
            .collect();
        let mut expected = Vec::new();
        for pointer in [256u32, 260, 268] {
            expected.extend_from_slice(&pointer.to_le_bytes());
        }
        expected.extend_from_slice(b"B=2\0A=x=y z\0EMPTY=\0");
        for module in ["wasi_snapshot_preview1", "wasi_unstable"] {
            let prepared = runtime
                .prepare(&environ_guest(module, 16), &limits)
                .expect("prepare");
            let invocation = Invocation {
                env: env.clone(),
                ..run()
            };
            let outcome = runtime
                .invoke(&prepared, &limits, invocation)
                .await
                .expect("invoke");
            assert_eq!(outcome.exit, Exit::Code(0), "{module}");
            assert_eq!(outcome.stdout, expected, "{module}");
        }
        let misaligned = runtime
            .prepare(&environ_guest("wasi_snapshot_preview1", 18), &limits)
            .expect("prepare");
        let invocation = Invocation { env, ..run() };
        let outcome = runtime
            .invoke(&misaligned, &limits, invocation)
            .await
            .expect("invoke");
        assert!(
            matches!(&outcome.exit, Exit::Trap(why) if why.contains("not aligned")),
            "{:?}",
            outcome.exit
        );
    }

    /// `max_instances` bounds the node, not each engine: with two slots, a plain and
    /// a metered guest alive leave none for a third call, which is refused as busy at
    /// once; when they end, calls run again.
    #[tokio::test]
    async fn max_instances_bounds_plain_and_metered_guests_together() {
        let runtime = Arc::new(
            Runtime::new(&RuntimeConfig {
                max_instances: 2,
                ..RuntimeConfig::default()
            })
            .expect("runtime"),
        );
        let spin = wat::parse_str(SPIN).expect("wat");
        let plain_limits = Limits {
            timeout_ms: 60_000,
            ..Limits::default()
        };
        let metered_limits = Limits {
            fuel: u64::MAX / 2,
            ..plain_limits
        };
        let plain = runtime.prepare(&spin, &plain_limits).expect("prepare");
        let metered = runtime.prepare(&spin, &metered_limits).expect("prepare");
        let spinners: Vec<_> = [(plain, plain_limits), (metered, metered_limits)]
            .into_iter()
            .map(|(prepared, limits)| {
                let runtime = runtime.clone();
                tokio::spawn(async move { runtime.invoke(&prepared, &limits, run()).await })
            })
            .collect();
        let deadline = Instant::now() + Duration::from_secs(20);
        while runtime.metrics().live_instances.get() < 2 {
            assert!(
                Instant::now() < deadline,
                "the spinning guests never started"
            );
            tokio::task::yield_now().await;
        }

        let empty = wat::parse_str(EMPTY).expect("wat");
        let limits = Limits::default();
        let prepared = runtime.prepare(&empty, &limits).expect("prepare");
        match runtime.invoke(&prepared, &limits, run()).await {
            Err(InvokeError::Busy(why)) => {
                assert!(why.contains("all 2 instance slots"), "{why}")
            }
            other => panic!("expected busy, got {other:?}"),
        }

        for spinner in &spinners {
            spinner.abort();
        }
        for spinner in spinners {
            let _ = spinner.await;
        }
        assert_eq!(runtime.metrics().live_instances.get(), 0);
        let outcome = runtime
            .invoke(&prepared, &limits, run())
            .await
            .expect("a slot is free again");
        assert_eq!(outcome.exit, Exit::Code(0));
    }
}
