//! How far this node's Raft log is on disk, and the queue of the leader's own appends
//! that a background thread writes and flushes.
//!
//! A leader appends its new entries to an in-memory queue and hands them to the
//! followers at once, while a background thread writes everything queued in one
//! transaction and flushes it (Raft thesis §10.2.1; etcd does the same), so its fsync
//! overlaps the followers' instead of preceding them, and entries proposed during one
//! flush go into the next right after it (group commit). Readers of the log see queued
//! entries as if they were written. openraft 0.9 counts the leader's copy as soon as
//! the append returns, so an entry may be *committed* in the leader's memory before it
//! is on the leader's disk; nothing acts on that before the flush:
//! - the state machine applies an entry (and so answers its client and tells the
//!   node's observers) only once it is durable here ([`DurableLog::wait_for`]);
//! - followers learn of a commit index only as far as it is durable here (the network
//!   lowers `leader_commit`, [`DurableLog::clamp`]), so no follower applies an entry the
//!   leader could still lose.
//!
//! If the leader dies before the flush, the entry was acknowledged to nobody and lives on
//! in at most the followers' logs, exactly as if it had died before sending it. Every
//! other write of the log (a follower's appends, entries changing the membership, the
//! vote, truncations, purges) writes the queue first and is durable when it returns, so
//! a node that stops leading (which saves a new vote first) has everything it appended
//! on disk before it answers another leader.
//!
//! Appends (the queue's, and a follower's) are made durable through the log's
//! write-ahead file ([`super::wal`]); every other write is a durable redb commit.

use std::collections::VecDeque;
use std::sync::mpsc;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use redb::{Database, Durability};
use tokio::sync::watch;

use super::wal::{self, Wal};
use super::{Entry, LogId, StorageError};

/// How far the log is on disk, and why it cannot get further if a flush failed.
#[derive(Debug, Clone, PartialEq)]
pub struct Flushed {
    /// Every entry up to this one (none: no entry) is durable.
    pub upto: Option<LogId>,
    /// The last entry in the log, durable or not.
    pub appended: Option<LogId>,
    /// The last entry being written: taken from the queue by a transaction not yet
    /// durable, or durable.
    pub taken: Option<LogId>,
    /// Why a flush failed: the log cannot be trusted to get further.
    pub failed: Option<String>,
}

/// An entry of the leader's waiting to be written: readable from the queue meanwhile.
#[derive(Clone)]
pub(super) struct Queued {
    pub(super) entry: Entry,
    /// Its encoding, as the log table stores it.
    pub(super) bytes: Arc<[u8]>,
}

/// What waits to be written with the next transaction of the log.
#[derive(Default)]
pub(super) struct Queue {
    /// The leader's own entries, in index order, following the entries written.
    pub(super) entries: VecDeque<Queued>,
    /// The committed log id, a restart hint, when it changed since last written.
    pub(super) committed: Option<Option<LogId>>,
    /// When the committed log id was last written.
    committed_written: super::Paced,
}

/// How often the committed log id (a restart hint: a stale one only means openraft
/// learns the commit again from the cluster) is written with the log's writes. Each
/// write of it adds pages to a flush, whose `fdatasync` costs more the more scattered
/// pages it writes.
const COMMITTED_EVERY: Duration = Duration::from_secs(1);

/// How often appends are checkpointed into the redb file (a durable commit, after which
/// the write-ahead file starts over) even when the file has room: redb reuses the pages
/// that non-durable commits free only after a durable one.
const CHECKPOINT_EVERY: Duration = Duration::from_secs(1);

/// The writer's side of the log, under [`Shared`]'s write lock.
pub(super) struct Writer {
    wal: Wal,
    checkpointed: super::Paced,
}

/// What one transaction took from the queue to write.
struct Taken {
    entries: Vec<(LogId, Arc<[u8]>)>,
    committed: Option<Option<LogId>>,
}

impl Taken {
    /// The last entry taken, if any.
    fn last(&self) -> Option<LogId> {
        self.entries.last().map(|(id, _)| *id)
    }
}

/// State shared by the log store, the flusher thread and the readers of the marks.
pub(super) struct Shared {
    pub(super) db: Arc<Database>,
    /// Held across every write transaction of the log, so that the queue is written
    /// in order: the write-ahead file, and when the log was last checkpointed.
    txn: Mutex<Writer>,
    queue: Mutex<Queue>,
    flushed: watch::Sender<Flushed>,
}

fn locked<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl Shared {
    /// The queue (never held across I/O).
    pub(super) fn queue(&self) -> MutexGuard<'_, Queue> {
        locked(&self.queue)
    }

    /// What is queued, to be written by a transaction made under the write lock (the
    /// committed log id at most every [`COMMITTED_EVERY`]).
    fn take(&self) -> Taken {
        let mut queue = self.queue();
        let committed = if queue.committed.is_some() && queue.committed_written.due(COMMITTED_EVERY)
        {
            queue.committed.take()
        } else {
            None
        };
        Taken {
            entries: queue
                .entries
                .iter()
                .map(|q| (q.entry.log_id, q.bytes.clone()))
                .collect(),
            committed,
        }
    }

    /// After the durable commit of a transaction that wrote `taken` (under the write
    /// lock) and then, maybe, entries of its own up to `own`: drops the written entries
    /// from the queue and records how far the log is durable.
    fn written(&self, taken: &Taken, own: Option<LogId>) {
        if let Some(last) = taken.last() {
            let mut queue = self.queue();
            while queue
                .entries
                .front()
                .is_some_and(|q| q.entry.log_id.index <= last.index)
            {
                queue.entries.pop_front();
            }
        }
        let Some(upto) = own.or(taken.last()) else {
            return;
        };
        self.flushed.send_if_modified(|flushed| {
            let changed = flushed.upto != Some(upto);
            flushed.upto = Some(upto);
            changed
        });
    }

    /// Takes what is queued, to be written under the write lock.
    fn take_marked(&self) -> Taken {
        let taken = self.take();
        if let Some(last) = taken.last() {
            self.flushed.send_if_modified(|flushed| {
                let changed = flushed.taken < Some(last);
                flushed.taken = flushed.taken.max(Some(last));
                changed
            });
        }
        taken
    }

    /// Writes what is queued and `write`'s changes in one durable transaction under the
    /// log's write lock (the write-ahead file starts over after it), then drops the
    /// written entries from the queue and records how far the log is durable.
    pub(super) fn write(
        &self,
        write: impl FnOnce(&redb::WriteTransaction) -> Result<(), redb::Error>,
    ) -> Result<(), redb::Error> {
        let mut writer = locked(&self.txn);
        let taken = self.take_marked();
        self.commit_durably(&mut writer, &taken, write)?;
        self.written(&taken, None);
        Ok(())
    }

    /// A durable commit of `taken` and `write`'s changes, which starts the next
    /// generation of the write-ahead file.
    fn commit_durably(
        &self,
        writer: &mut Writer,
        taken: &Taken,
        write: impl FnOnce(&redb::WriteTransaction) -> Result<(), redb::Error>,
    ) -> Result<(), redb::Error> {
        let generation = writer.wal.next_generation();
        let mut txn = self.db.begin_write()?;
        set_immediate(&mut txn)?;
        write_taken(&txn, taken)?;
        write(&txn)?;
        wal::store_generation(&txn, generation)?;
        txn.commit()?;
        writer.wal.restart(generation);
        writer.checkpointed.mark();
        Ok(())
    }

    /// Appends what is queued and then `entries` (index, encoding; ending with entry
    /// `own`, if any) under the log's write lock, durably: one record of the
    /// write-ahead file and a non-durable redb commit, or a checkpoint (a durable redb
    /// commit) when the file is full or one is due. Then drops the written entries from
    /// the queue and records how far the log is durable. With `skip_if_idle`, does
    /// nothing when nothing is queued.
    pub(super) fn append(
        &self,
        own: Option<LogId>,
        skip_if_idle: bool,
        entries: &[(u64, Vec<u8>)],
    ) -> Result<(), redb::Error> {
        let mut writer = locked(&self.txn);
        let taken = self.take_marked();
        if skip_if_idle && taken.entries.is_empty() && taken.committed.is_none() {
            return Ok(());
        }
        let records = || {
            taken
                .entries
                .iter()
                .map(|(id, bytes)| (id.index, &bytes[..]))
                .chain(entries.iter().map(|(index, bytes)| (*index, &bytes[..])))
        };
        let insert = |txn: &redb::WriteTransaction| -> Result<(), redb::Error> {
            let mut table = txn.open_table(super::log_store::LOG)?;
            for (index, bytes) in entries {
                table.insert(*index, bytes.as_slice())?;
            }
            Ok(())
        };
        let fits = writer.wal.fits(records().map(|(_, bytes)| bytes.len()));
        if !fits || writer.checkpointed.due(CHECKPOINT_EVERY) {
            self.commit_durably(&mut writer, &taken, insert)?;
        } else {
            // Nothing to make durable without entries: the committed log id is a hint.
            // The record goes first, so that the disk writes it during the redb commit.
            let durable = records().next().is_some();
            if durable {
                writer.wal.write(records())?;
            }
            let mut txn = self.db.begin_write()?;
            set_durability(&mut txn, Durability::None)?;
            write_taken(&txn, &taken)?;
            insert(&txn)?;
            txn.commit()?;
            if durable {
                writer.wal.sync()?;
            }
        }
        self.written(&taken, own);
        Ok(())
    }

    /// Writes what is queued and makes it durable (no-op when nothing is queued).
    fn flush(&self) {
        if self.flushed.borrow().failed.is_some() {
            return;
        }
        if let Err(e) = self.append(None, true, &[]) {
            tracing::error!(error = %e, "flushing the Raft log failed");
            self.flushed.send_modify(|flushed| {
                flushed.failed = Some(format!("flushing the Raft log: {e}"));
            });
        }
    }

    /// Records `appended` as the log's last entry (after an append or a truncation).
    pub(super) fn set_appended(&self, appended: Option<LogId>) {
        self.flushed
            .send_modify(|flushed| flushed.appended = appended);
    }

    /// Records that the whole log, up to `appended`, is durable.
    pub(super) fn set_all_durable(&self, appended: Option<LogId>) {
        self.flushed.send_if_modified(|flushed| {
            let changed = flushed.upto != appended
                || flushed.appended != appended
                || flushed.taken != appended;
            flushed.upto = appended;
            flushed.appended = appended;
            flushed.taken = appended;
            changed
        });
    }
}

/// Sets `txn` to commit with an fsync.
pub(super) fn set_immediate(txn: &mut redb::WriteTransaction) -> Result<(), redb::Error> {
    set_durability(txn, Durability::Immediate)
}

fn set_durability(
    txn: &mut redb::WriteTransaction,
    durability: Durability,
) -> Result<(), redb::Error> {
    txn.set_durability(durability).map_err(|e| {
        redb::Error::from(redb::StorageError::Io(std::io::Error::other(e.to_string())))
    })
}

/// Writes `taken` into the log's tables in `txn`.
fn write_taken(txn: &redb::WriteTransaction, taken: &Taken) -> Result<(), redb::Error> {
    if let Some(committed) = &taken.committed {
        let bytes = serde_json::to_vec(committed)
            .map_err(|e| redb::StorageError::Io(std::io::Error::other(e)))?;
        txn.open_table(super::log_store::META)?
            .insert(super::log_store::COMMITTED, bytes.as_slice())?;
    }
    if !taken.entries.is_empty() {
        let mut table = txn.open_table(super::log_store::LOG)?;
        for (id, bytes) in &taken.entries {
            table.insert(id.index, &bytes[..])?;
        }
    }
    Ok(())
}

/// Makes every commit of `db` so far durable: an empty commit with immediate
/// durability persists the non-durable commits before it.
pub(super) fn durable_barrier(db: &Database) -> Result<(), redb::Error> {
    let mut txn = db.begin_write()?;
    set_immediate(&mut txn)?;
    txn.commit()?;
    Ok(())
}

/// The log store's side: the shared state, and a way to ask the flusher thread for a
/// flush. The thread ends once the log store and every [`DurableLog`] view of it are
/// gone.
#[derive(Clone)]
pub(super) struct Flusher {
    pub(super) shared: Arc<Shared>,
    wake: Arc<Mutex<mpsc::Sender<()>>>,
}

impl Flusher {
    /// Starts the flusher thread of the log in `db` with its write-ahead file `wal`,
    /// whose last entry (all durable, as on opening) is `appended`.
    pub(super) fn start(
        db: Arc<Database>,
        wal: Wal,
        appended: Option<LogId>,
    ) -> Result<Flusher, std::io::Error> {
        let (flushed, _) = watch::channel(Flushed {
            upto: appended,
            appended,
            taken: appended,
            failed: None,
        });
        let shared = Arc::new(Shared {
            db,
            txn: Mutex::new(Writer {
                wal,
                // Opening the write-ahead file was a durable commit.
                checkpointed: {
                    let mut now = super::Paced::default();
                    now.mark();
                    now
                },
            }),
            queue: Mutex::new(Queue::default()),
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

    /// Queues the leader's own `entries` (following the log's last entry) to be written
    /// and flushed in the background.
    pub(super) fn enqueue(&self, entries: Vec<Queued>) {
        let Some(last) = entries.last().map(|q| q.entry.log_id) else {
            return;
        };
        self.shared.queue().entries.extend(entries);
        self.shared.set_appended(Some(last));
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
    // A stopped thread means the log store is gone: nothing is left to flush.
    let _ = locked(wake).send(());
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

    /// The index of the last entry appended, durable or not (0: none).
    pub fn appended_index(&self) -> u64 {
        self.flushed.borrow().appended.map_or(0, |a| a.index)
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

    /// Waits until an entry at `index` or later is being written (or durable), or the
    /// log failed or closed. Unlike [`DurableLog::wait_for`], the entry need not be
    /// appended yet.
    pub async fn wait_taken(&self, index: u64) {
        let mut flushed = self.flushed.clone();
        let _ = flushed
            .wait_for(|f| {
                f.failed.is_some()
                    || f.upto.is_some_and(|d| d.index >= index)
                    || f.taken.is_some_and(|d| d.index >= index)
            })
            .await;
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
