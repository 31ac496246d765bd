//! Prometheus metrics of a node: invocations, errors, durations, module cache and live
//! instances, rendered in the text exposition format at `/metrics`.

use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

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
        Metrics {
            registry,
            invocations,
            errors,
            duration,
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

    /// The metrics in Prometheus text format.
    pub fn render(&self) -> String {
        let mut out = String::new();
        // Writing to a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}
