//! How far this node's Raft log is on disk, and the thread that flushes the leader's own
//! appends.
//!
//! A leader appends its new entries without an fsync and hands them to the followers at
//! once, while a background thread flushes them (Raft thesis §10.2.1; etcd does the
//! same), so its fsync overlaps the followers' instead of preceding them. openraft 0.9
//! counts the leader's copy as soon as the append returns, so an entry may be
//! *committed* in the leader's memory before it is on the leader's disk; nothing acts on
//! that before the flush:
//! - the state machine applies an entry (and so answers its client and tells the
//!   node's observers) only once it is durable here ([`DurableLog::wait_for`]);
//! - followers learn of a commit index only as far as it is durable here (the network
//!   lowers `leader_commit`, [`DurableLog::clamp`]), so no follower applies an entry the
//!   leader could still lose.
//!
//! If the leader dies before the flush, the entry was acknowledged to nobody and lives on
//! in at most the followers' logs, exactly as if it had died before sending it. Every
//! other write of the log (a follower's appends, entries changing the membership, the
//! vote, truncations, purges) is durable when it returns, and a durable redb commit
//! persists the commits before it, so a node that stops leading (which saves a new vote
//! first) has everything it appended on disk before it answers another leader.

use std::sync::mpsc;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use redb::{Database, Durability};
use tokio::sync::watch;

use super::{LogId, StorageError};

/// How far the log is on disk, and why it cannot get further if a flush failed.
#[derive(Debug, Clone, PartialEq)]
pub struct Flushed {
    /// Every entry up to this one (none: no entry) is durable.
    pub upto: Option<LogId>,
    /// The last entry in the log, durable or not.
    pub appended: Option<LogId>,
    /// Why a flush failed: the log cannot be trusted to get further.
    pub failed: Option<String>,
}

/// The log's write side: serialises the log's write transactions with the flusher's,
/// and knows the last entry appended.
#[derive(Debug)]
pub(super) struct Writes {
    /// The last entry in the log (after appends and truncations), durable or not.
    pub(super) appended: Option<LogId>,
}

/// State shared by the log store, the flusher thread and the readers of the marks.
struct Shared {
    db: Arc<Database>,
    writes: Mutex<Writes>,
    flushed: watch::Sender<Flushed>,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Writes> {
        self.writes
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Makes every entry appended so far durable (no-op when it is).
    fn flush(&self) {
        let writes = self.lock();
        {
            let flushed = self.flushed.borrow();
            if flushed.upto == writes.appended || flushed.failed.is_some() {
                return;
            }
        }
        match durable_barrier(&self.db) {
            Ok(()) => self.mark_durable(&writes),
            Err(e) => {
                tracing::error!(error = %e, "flushing the Raft log failed");
                self.flushed.send_modify(|flushed| {
                    flushed.failed = Some(format!("flushing the Raft log: {e}"));
                });
            }
        }
    }

    /// Records that everything appended is durable (called with the write lock held,
    /// right after a durable commit).
    fn mark_durable(&self, writes: &Writes) {
        self.flushed.send_if_modified(|flushed| {
            let changed = flushed.upto != writes.appended || flushed.appended != writes.appended;
            flushed.upto = writes.appended;
            flushed.appended = writes.appended;
            changed
        });
    }
}

/// Makes every commit so far durable: an empty commit with immediate durability
/// persists the non-durable commits before it.
pub(super) fn durable_barrier(db: &Database) -> Result<(), redb::Error> {
    let mut txn = db.begin_write()?;
    txn.set_durability(Durability::Immediate).map_err(|e| {
        redb::Error::from(redb::StorageError::Io(std::io::Error::other(e.to_string())))
    })?;
    txn.commit()?;
    Ok(())
}

/// The log store's side: takes the write lock, and asks the flusher thread for flushes.
/// The thread ends once the log store and every [`DurableLog`] view of it are gone.
#[derive(Clone)]
pub(super) struct Flusher {
    shared: Arc<Shared>,
    wake: Arc<Mutex<mpsc::Sender<()>>>,
}

impl Flusher {
    /// Starts the flusher thread of the log in `db`, whose last entry (all durable, as
    /// on opening) is `appended`.
    pub(super) fn start(
        db: Arc<Database>,
        appended: Option<LogId>,
    ) -> Result<Flusher, std::io::Error> {
        let (flushed, _) = watch::channel(Flushed {
            upto: appended,
            appended,
            failed: None,
        });
        let shared = Arc::new(Shared {
            db,
            writes: Mutex::new(Writes { appended }),
            flushed,
        });
        let (wake, requests) = mpsc::channel::<()>();
        let thread_shared = shared.clone();
        std::thread::Builder::new()
            .name("raft-log-flush".into())
            .spawn(move || {
                while requests.recv().is_ok() {
                    // Requests that came meanwhile are served by this flush.
                    while requests.try_recv().is_ok() {}
                    let flushed = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                        thread_shared.flush()
                    }));
                    if flushed.is_err() {
                        // Waiters get an error instead of waiting for ever.
                        thread_shared.flushed.send_modify(|flushed| {
                            flushed.failed = Some("flushing the Raft log panicked".into());
                        });
                    }
                }
            })?;
        Ok(Flusher {
            shared,
            wake: Arc::new(Mutex::new(wake)),
        })
    }

    /// Takes the log's write lock: hold it across a write transaction of the log.
    pub(super) fn lock(&self) -> MutexGuard<'_, Writes> {
        self.shared.lock()
    }

    /// After a durable commit made under `writes`: everything appended is on disk.
    pub(super) fn durable(&self, writes: &Writes) {
        self.shared.mark_durable(writes);
    }

    /// After a commit without an fsync made under `writes`: asks the thread to flush it.
    pub(super) fn appended(&self, writes: &Writes) {
        self.shared
            .flushed
            .send_modify(|flushed| flushed.appended = writes.appended);
        request(&self.wake);
    }

    /// The readers' view.
    pub(super) fn view(&self) -> DurableLog {
        DurableLog {
            flushed: self.shared.flushed.subscribe(),
            wake: self.wake.clone(),
        }
    }
}

fn request(wake: &Mutex<mpsc::Sender<()>>) {
    let wake = wake.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    // A stopped thread means the log store is gone: nothing is left to flush.
    let _ = wake.send(());
}

/// How long a heartbeat (a request without entries) waits for the leader's flush before
/// it carries a lower commit index instead: a flush takes well under a millisecond to a
/// few, and a heartbeat held much longer could let followers time out the leader.
const COMMIT_WAIT: Duration = Duration::from_millis(20);

/// A reader's view of how far the log is durable. Cheap to clone.
#[derive(Clone)]
pub struct DurableLog {
    flushed: watch::Receiver<Flushed>,
    wake: Arc<Mutex<mpsc::Sender<()>>>,
}

impl DurableLog {
    /// The last entry known to be durable.
    pub fn upto(&self) -> Option<LogId> {
        self.flushed.borrow().upto
    }

    /// Waits until the entry at `index` is durable (asking for a flush if it is not).
    /// An index past the end of the log has nothing to wait for.
    pub async fn wait_for(&self, index: u64) -> Result<(), StorageError> {
        let done = |flushed: &Flushed| {
            flushed.failed.is_some()
                || flushed.upto.is_some_and(|d| d.index >= index)
                || flushed.appended.is_none_or(|a| a.index < index)
        };
        let mut flushed = self.flushed.clone();
        if !done(&flushed.borrow()) {
            request(&self.wake);
        }
        let outcome = flushed.wait_for(done).await.map(|f| f.clone());
        match outcome {
            Ok(f) if f.upto.is_some_and(|d| d.index >= index) => Ok(()),
            Ok(Flushed {
                failed: Some(why), ..
            }) => Err(storage_error(why)),
            Ok(_) => Ok(()),
            Err(_) => Err(storage_error("the Raft log is closed".into())),
        }
    }

    /// The commit index a message to a follower may carry: `commit`, lowered to what is
    /// durable here. `wait`: the message has no entries to deliver, so it may wait (a
    /// while) for the flush rather than carry a lower index.
    pub async fn clamp(&self, commit: Option<LogId>, wait: bool) -> Option<LogId> {
        let covered = |flushed: &Flushed| flushed.failed.is_some() || flushed.upto >= commit;
        let mut flushed = self.flushed.clone();
        if !covered(&flushed.borrow()) && wait {
            request(&self.wake);
            let _ = tokio::time::timeout(COMMIT_WAIT, flushed.wait_for(covered)).await;
        }
        let upto = flushed.borrow().upto;
        commit.min(upto)
    }
}

fn storage_error(why: String) -> StorageError {
    openraft::StorageIOError::write_logs(&std::io::Error::other(why)).into()
}
