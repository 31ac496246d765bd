//! Prometheus metrics of a node: invocations, errors, durations, module cache, live
//! instances and this node's Raft state, rendered in the text exposition format at
//! `/metrics`.

use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

use crate::cluster::ClusterStatus;
use crate::runtime::RuntimeMetrics;

/// Labels of an invocation count.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct InvocationLabels {
    /// Function name.
    pub function: String,
    /// HTTP status returned.
    pub status: u16,
}

/// What went wrong in a failed invocation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, EncodeLabelValue)]
pub enum ErrorKind {
    /// Wall-clock limit.
    Timeout,
    /// Memory limit.
    MemoryLimit,
    /// Trap.
    Trap,
    /// Non-zero exit without a response.
    ExitStatus,
    /// Response over its limit.
    ResponseTooLarge,
    /// Request over its limit.
    RequestTooLarge,
    /// The client stopped sending the request's body.
    ClientTimeout,
    /// The guest used all of its fuel.
    FuelExhausted,
    /// No instance slot free.
    Busy,
    /// Instantiation failed.
    Instantiate,
}

/// Labels of an error count.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct ErrorLabels {
    /// Function name.
    pub function: String,
    /// Kind of failure.
    pub kind: ErrorKind,
}

/// Labels of a per-function metric.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct FunctionLabels {
    /// Function name.
    pub function: String,
}

type HistogramFamily = Family<FunctionLabels, Histogram, fn() -> Histogram>;

/// One function's hot-path series, looked up once and then updated without a label
/// lookup per request.
#[derive(Debug, Clone)]
pub struct FunctionStats {
    /// Invocations answered 200.
    pub ok: Counter,
    /// Guest run time, seconds.
    pub duration: Histogram,
}

/// Every metric the node exports.
pub struct Metrics {
    registry: Registry,
    /// Invocations by function and status.
    pub invocations: Family<InvocationLabels, Counter>,
    /// Failed invocations by function and kind.
    pub errors: Family<ErrorLabels, Counter>,
    /// Guest run time by function, seconds.
    pub duration: HistogramFamily,
    /// Invocations and server errors of every function together (for the console).
    pub totals: Totals,
    raft: RaftGauges,
}

/// Invocations of every function together, and those answered with a 5xx status.
#[derive(Debug, Default)]
pub struct Totals {
    invocations: std::sync::atomic::AtomicU64,
    errors: std::sync::atomic::AtomicU64,
}

impl Totals {
    /// Invocations and 5xx answers so far.
    pub fn get(&self) -> (u64, u64) {
        use std::sync::atomic::Ordering::Relaxed;
        (self.invocations.load(Relaxed), self.errors.load(Relaxed))
    }
}

/// This node's Raft state, set from [`ClusterStatus`] when metrics are rendered.
#[derive(Default)]
struct RaftGauges {
    term: Gauge,
    is_leader: Gauge,
    last_log_index: Gauge,
    applied_index: Gauge,
    snapshot_index: Gauge,
    voters: Gauge,
}

fn duration_histogram() -> Histogram {
    // 50 µs .. ~26 s.
    Histogram::new(exponential_buckets(0.000_05, 2.0, 20))
}

impl Metrics {
    /// Registers the gateway's metrics and the runtime's counters.
    pub fn new(runtime: &RuntimeMetrics) -> Metrics {
        let mut registry = Registry::with_prefix("wafer");
        let invocations = Family::<InvocationLabels, Counter>::default();
        let errors = Family::<ErrorLabels, Counter>::default();
        let duration: HistogramFamily = Family::new_with_constructor(duration_histogram);
        registry.register(
            "invocations",
            "Function invocations by status",
            invocations.clone(),
        );
        registry.register(
            "invocation_errors",
            "Failed invocations by kind",
            errors.clone(),
        );
        registry.register(
            "invocation_duration_seconds",
            "Time a function instance ran, from instantiation to exit",
            duration.clone(),
        );
        registry.register(
            "module_cache_hits",
            "Modules loaded from the precompiled-code cache",
            runtime.cache_hits.clone(),
        );
        registry.register(
            "module_cache_misses",
            "Modules not found in the precompiled-code cache",
            runtime.cache_misses.clone(),
        );
        registry.register(
            "module_compilations",
            "Modules compiled from wasm",
            runtime.compilations.clone(),
        );
        registry.register(
            "live_instances",
            "Function instances alive now",
            runtime.live_instances.clone(),
        );
        registry.register(
            "warm_slots",
            "Unused instance slots kept warm for the module that last used them",
            runtime.warm_slots.clone(),
        );
        registry.register(
            "warm_resident_bytes",
            "Guest memory kept resident in unused instance slots, bytes",
            runtime.warm_resident_bytes.clone(),
        );
        let raft = RaftGauges::default();
        registry.register("raft_term", "Current Raft term", raft.term.clone());
        registry.register(
            "raft_is_leader",
            "1 if this node is the leader",
            raft.is_leader.clone(),
        );
        registry.register(
            "raft_last_log_index",
            "Index of the last entry in this node's log",
            raft.last_log_index.clone(),
        );
        registry.register(
            "raft_applied_index",
            "Index of the last entry applied to this node's state",
            raft.applied_index.clone(),
        );
        registry.register(
            "raft_snapshot_index",
            "Index covered by this node's latest snapshot",
            raft.snapshot_index.clone(),
        );
        registry.register(
            "raft_voters",
            "Voting members of the cluster, as this node sees it",
            raft.voters.clone(),
        );
        Metrics {
            registry,
            invocations,
            errors,
            duration,
            totals: Totals::default(),
            raft,
        }
    }

    /// The series of `function` that every invocation updates.
    pub fn function_stats(&self, function: &str) -> FunctionStats {
        FunctionStats {
            ok: self
                .invocations
                .get_or_create(&InvocationLabels {
                    function: function.to_string(),
                    status: 200,
                })
                .clone(),
            duration: self
                .duration
                .get_or_create(&FunctionLabels {
                    function: function.to_string(),
                })
                .clone(),
        }
    }

    /// Counts an invocation that `function` answered with `status`.
    pub fn invocation(&self, stats: &FunctionStats, function: &str, status: u16) {
        use std::sync::atomic::Ordering::Relaxed;
        self.totals.invocations.fetch_add(1, Relaxed);
        if status >= 500 {
            self.totals.errors.fetch_add(1, Relaxed);
        }
        if status == 200 {
            stats.ok.inc();
        } else {
            self.invocations
                .get_or_create(&InvocationLabels {
                    function: function.to_string(),
                    status,
                })
                .inc();
        }
    }

    /// Counts a failure.
    pub fn error(&self, function: &str, kind: ErrorKind) {
        self.errors
            .get_or_create(&ErrorLabels {
                function: function.to_string(),
                kind,
            })
            .inc();
    }

    /// Adds the scheduler's series.
    pub fn with_scheduler(mut self, scheduler: &crate::scheduler::SchedulerMetrics) -> Metrics {
        scheduler.register(&mut self.registry);
        self
    }

    /// Records this node's view of the cluster (before rendering).
    pub fn observe_cluster(&self, status: &ClusterStatus) {
        let index = |i: Option<u64>| i.map_or(0, |i| i64::try_from(i).unwrap_or(i64::MAX));
        self.raft
            .term
            .set(i64::try_from(status.term).unwrap_or(i64::MAX));
        self.raft
            .is_leader
            .set(i64::from(status.leader_id == Some(status.id)));
        self.raft.last_log_index.set(index(status.last_log_index));
        self.raft.applied_index.set(index(status.applied_index));
        self.raft.snapshot_index.set(index(status.snapshot_index));
        self.raft
            .voters
            .set(status.members.iter().filter(|m| m.voter).count() as i64);
    }

    /// The metrics in Prometheus text format.
    pub fn render(&self) -> String {
        let mut out = String::new();
        // Writing to a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}
