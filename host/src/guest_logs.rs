//! Recent guest logs per function (stderr and `wafer.log` lines of each invocation),
//! kept in memory on the node whose gateway took the invocation, for
//! `GET /v1/functions/{name}/logs` and `wafer logs`.
//!
//! Bounded: per function the newest [`RECORDS_PER_FUNCTION`] records and
//! [`BYTES_PER_FUNCTION`] bytes; at most [`FUNCTIONS`] functions, the one written least
//! recently giving way. Recording holds one short lock and copies nothing (the record
//! shares the captured log's buffer).

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;

use bytes::Bytes;

use crate::state::FunctionName;

/// Records kept per function.
pub const RECORDS_PER_FUNCTION: usize = 1000;
/// Log bytes kept per function.
pub const BYTES_PER_FUNCTION: usize = 256 << 10;
/// Functions whose logs are kept.
pub const FUNCTIONS: usize = 1024;

/// The log of one invocation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogRecord {
    /// Increases by one per record on this node, across functions: a cursor for
    /// following (`after`).
    pub seq: u64,
    /// When the invocation ended, ms since the Unix epoch.
    pub at_ms: u64,
    /// The function's version that ran.
    pub version: u64,
    /// The HTTP status it was answered with.
    pub status: u16,
    /// The agent that ran it, when not this node.
    pub agent: Option<String>,
    /// Captured stderr and `wafer.log` lines.
    pub log: Bytes,
    /// Bytes the guest logged beyond its log limit (not kept).
    pub dropped: u64,
}

/// A page of one function's records.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogPage {
    /// Oldest first.
    pub records: Vec<LogRecord>,
    /// The cursor to pass as `after` for the records that come next.
    pub next: u64,
}

/// The logs this node keeps.
#[derive(Debug, Default)]
pub struct GuestLogs {
    inner: Mutex<Inner>,
}

#[derive(Debug, Default)]
struct Inner {
    /// The last `seq` given out.
    last: u64,
    functions: HashMap<FunctionName, Ring>,
}

#[derive(Debug, Default)]
struct Ring {
    records: VecDeque<LogRecord>,
    bytes: usize,
}

impl GuestLogs {
    /// Keeps `record` (its `seq` is assigned here) as `function`'s newest; an empty log
    /// with nothing dropped is not kept.
    pub fn record(&self, function: &FunctionName, mut record: LogRecord) {
        if record.log.is_empty() && record.dropped == 0 {
            return;
        }
        let mut inner = match self.inner.lock() {
            Ok(inner) => inner,
            Err(poisoned) => poisoned.into_inner(),
        };
        inner.last += 1;
        record.seq = inner.last;
        if !inner.functions.contains_key(function) {
            if inner.functions.len() >= FUNCTIONS {
                // The function written least recently gives way.
                let stalest = inner
                    .functions
                    .iter()
                    .min_by_key(|(_, ring)| ring.records.back().map_or(0, |r| r.seq))
                    .map(|(name, _)| name.clone());
                if let Some(name) = stalest {
                    inner.functions.remove(&name);
                }
            }
            inner.functions.insert(function.clone(), Ring::default());
        }
        // Present: inserted above when it was not (no name copied per record).
        let Some(ring) = inner.functions.get_mut(function) else {
            return;
        };
        ring.bytes += record.log.len();
        ring.records.push_back(record);
        while ring.records.len() > RECORDS_PER_FUNCTION
            || (ring.bytes > BYTES_PER_FUNCTION && ring.records.len() > 1)
        {
            if let Some(old) = ring.records.pop_front() {
                ring.bytes -= old.log.len();
            }
        }
    }

    /// `function`'s records after cursor `after`, oldest first, at most `limit`: the
    /// first ones after the cursor, or without one the newest `limit`.
    pub fn read(&self, function: &FunctionName, after: Option<u64>, limit: usize) -> LogPage {
        let inner = match self.inner.lock() {
            Ok(inner) => inner,
            Err(poisoned) => poisoned.into_inner(),
        };
        let records: Vec<LogRecord> = match inner.functions.get(function) {
            None => Vec::new(),
            Some(ring) => match after {
                Some(after) => ring
                    .records
                    .iter()
                    .filter(|r| r.seq > after)
                    .take(limit)
                    .cloned()
                    .collect(),
                None => {
                    let skip = ring.records.len().saturating_sub(limit);
                    ring.records.iter().skip(skip).cloned().collect()
                }
            },
        };
        // Following from here must neither repeat nor skip records: after the last one
        // returned, or (none) after everything recorded so far.
        let next = match (records.last(), after) {
            (Some(last), _) => last.seq,
            (None, Some(after)) => after,
            (None, None) => inner.last,
        };
        LogPage { records, next }
    }

    /// Forgets `function`'s logs (it was removed).
    pub fn forget(&self, function: &FunctionName) {
        if let Ok(mut inner) = self.inner.lock() {
            inner.functions.remove(function);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(text: &str) -> LogRecord {
        LogRecord {
            seq: 0,
            at_ms: 1,
            version: 1,
            status: 200,
            agent: None,
            log: Bytes::copy_from_slice(text.as_bytes()),
            dropped: 0,
        }
    }

    fn texts(page: &LogPage) -> Vec<String> {
        page.records
            .iter()
            .map(|r| String::from_utf8_lossy(&r.log).into_owned())
            .collect()
    }

    #[test]
    fn records_are_paged_and_followed_without_repeats_or_gaps() {
        let logs = GuestLogs::default();
        let f: FunctionName = "f".parse().expect("name");
        let g: FunctionName = "g".parse().expect("name");
        let empty = logs.read(&f, None, 10);
        assert!(empty.records.is_empty());
        assert_eq!(empty.next, 0);
        logs.record(&f, record("one"));
        logs.record(&g, record("other"));
        logs.record(&f, record(""));
        logs.record(&f, record("two"));
        logs.record(&f, record("three"));
        let tail = logs.read(&f, None, 2);
        assert_eq!(texts(&tail), ["two", "three"]);
        let first = logs.read(&f, Some(0), 2);
        assert_eq!(texts(&first), ["one", "two"]);
        let rest = logs.read(&f, Some(first.next), 10);
        assert_eq!(texts(&rest), ["three"]);
        let none = logs.read(&f, Some(rest.next), 10);
        assert!(none.records.is_empty());
        assert_eq!(none.next, rest.next);
        logs.record(&f, record("four"));
        assert_eq!(texts(&logs.read(&f, Some(none.next), 10)), ["four"]);
        // A function without records: following starts after everything so far.
        let h: FunctionName = "h".parse().expect("name");
        assert_eq!(logs.read(&h, None, 10).next, 5);
        logs.forget(&f);
        assert!(logs.read(&f, None, 10).records.is_empty());
    }

    #[test]
    fn each_function_keeps_its_newest_records_within_bounds() {
        let logs = GuestLogs::default();
        let f: FunctionName = "f".parse().expect("name");
        for i in 0..RECORDS_PER_FUNCTION + 5 {
            logs.record(&f, record(&format!("line {i}")));
        }
        let page = logs.read(&f, Some(0), usize::MAX);
        assert_eq!(page.records.len(), RECORDS_PER_FUNCTION);
        assert_eq!(texts(&page)[0], "line 5");
        let big = "x".repeat(BYTES_PER_FUNCTION / 2 + 1);
        logs.record(&f, record(&big));
        logs.record(&f, record(&big));
        let page = logs.read(&f, Some(0), usize::MAX);
        assert_eq!(page.records.len(), 1, "only the newest big record fits");
        for i in 0..FUNCTIONS + 1 {
            let name: FunctionName = format!("fn-{i}").parse().expect("name");
            logs.record(&name, record("hi"));
        }
        assert!(
            logs.read(&f, None, 10).records.is_empty(),
            "f was the stalest"
        );
        let newest: FunctionName = format!("fn-{FUNCTIONS}").parse().expect("name");
        assert_eq!(logs.read(&newest, None, 10).records.len(), 1);
    }
}
