//! The durable Raft log: openraft's `RaftLogStorage` over the [`Wal`](crate::wal::Wal).
//!
//! Every change is one WAL record (vote, entry batch, truncation, purge, commit mark) in one
//! queue, so they reach the disk in the order openraft issued them (openraft's
//! `docs/protocol/io_ordering.md`). Entries are readable as soon as `append` returns and
//! acknowledged (the `IOFlushed` callback) only after the group commit's fsync. The vote is
//! on disk before `save_vote` returns. The commit mark is written without a sync of its own
//! (`Wal::append_unsynced`): it goes to disk with the next record that is synced. The log is
//! also kept in memory; after a purge the WAL is compacted now and then so it does not grow
//! without bound.

use std::collections::BTreeMap;
use std::fmt::Debug;
use std::io;
use std::ops::RangeBounds;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use openraft::storage::{IOFlushed, RaftLogStorage};
use openraft::{LogState, RaftLogReader};
use serde::{Deserialize, Serialize};

use crate::types::{Entry, LogId, TypeConfig, Vote, decode, encode};
use crate::wal::{Wal, WalError, WalOptions};

/// Purged entries after which the WAL is rewritten without them.
const COMPACT_AFTER_PURGED: u64 = 10_000;
/// Entries in one append of the leader's own from which it is a burst whose sync may be
/// gathered with the next ones (see `append`). One client's writes come one entry at a time.
const GATHER_FROM_ENTRIES: usize = 8;

#[derive(Serialize, Deserialize)]
enum LogRecord {
    Vote(Vote),
    Entries(Vec<Entry>),
    TruncateAfter(Option<LogId>),
    Purge(LogId),
    Committed(Option<LogId>),
}

/// Whether `bytes` decode as a log record (for the fuzz target).
pub(crate) fn decode_record(bytes: &[u8]) -> bool {
    decode::<LogRecord>(bytes).is_ok()
}

#[derive(Default)]
struct Inner {
    vote: Option<Vote>,
    committed: Option<LogId>,
    last_purged: Option<LogId>,
    log: BTreeMap<u64, Entry>,
    purged_since_compaction: u64,
}

impl Inner {
    fn replay(&mut self, record: LogRecord) {
        match record {
            LogRecord::Vote(v) => self.vote = Some(v),
            LogRecord::Entries(entries) => {
                for e in entries {
                    self.log.insert(e.log_id.index, e);
                }
            }
            LogRecord::TruncateAfter(after) => {
                let from = after.map_or(0, |l| l.index + 1);
                self.log.split_off(&from);
            }
            LogRecord::Purge(upto) => {
                let keep = self.log.split_off(&(upto.index + 1));
                self.purged_since_compaction += self.log.len() as u64;
                self.log = keep;
                if self.last_purged.as_ref() < Some(&upto) {
                    self.last_purged = Some(upto);
                }
            }
            LogRecord::Committed(c) => self.committed = c,
        }
    }

    /// The records that rebuild this state from nothing.
    fn image(&self) -> io::Result<Vec<Vec<u8>>> {
        let mut out = Vec::new();
        if let Some(v) = &self.vote {
            out.push(encode(&LogRecord::Vote(*v))?);
        }
        if let Some(p) = &self.last_purged {
            out.push(encode(&LogRecord::Purge(*p))?);
        }
        let entries: Vec<Entry> = self.log.values().cloned().collect();
        for chunk in entries.chunks(1024) {
            out.push(encode(&LogRecord::Entries(chunk.to_vec()))?);
        }
        out.push(encode(&LogRecord::Committed(self.committed))?);
        Ok(out)
    }
}

/// The durable Raft log of one manager.
#[derive(Clone)]
pub(crate) struct LogStore {
    inner: Arc<Mutex<Inner>>,
    wal: Arc<Wal>,
    /// This member's Raft id, when it runs in a cluster (see `append`).
    raft_id: Option<u64>,
    /// Set while every quorum of the membership can form without this member (see
    /// [`LogStore::quorum_without_me`]).
    quorum_without_me: Arc<AtomicBool>,
}

impl std::fmt::Debug for LogStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LogStore").finish_non_exhaustive()
    }
}

impl LogStore {
    /// Opens (or creates) the log in `dir`, replaying the WAL. A torn tail from a crash is
    /// cut; corruption anywhere else is an error.
    pub(crate) fn open(dir: &Path) -> io::Result<Self> {
        Self::open_with(dir, WalOptions::default())
    }

    /// [`LogStore::open`] with the write-ahead log tuned by `options`.
    pub(crate) fn open_with(dir: &Path, options: WalOptions) -> io::Result<Self> {
        let (wal, records) = Wal::open(dir, options).map_err(|e| match e {
            // Another open log holds the directory: maybe this process's previous store,
            // still closing (the caller may wait for it).
            WalError::Locked { .. } => io::Error::new(io::ErrorKind::WouldBlock, e.to_string()),
            e => io::Error::other(e.to_string()),
        })?;
        let mut inner = Inner::default();
        for bytes in records {
            inner.replay(decode::<LogRecord>(&bytes)?);
        }
        Ok(LogStore {
            inner: Arc::new(Mutex::new(inner)),
            wal: Arc::new(wal),
            raft_id: None,
            quorum_without_me: Arc::default(),
        })
    }

    /// Tells the store this member's Raft id, so entries another member proposed (this member
    /// follows) are synced on the caller's thread when the WAL is idle (see `append`).
    pub(crate) fn of_member(mut self, raft_id: u64) -> Self {
        self.raft_id = Some(raft_id);
        self
    }

    /// The flag to set while every quorum of the membership can form without this member,
    /// as with three voters or more: a burst of this member's own entries (it leads) is then
    /// committed by followers without waiting on its sync, which the log may gather with the
    /// next bursts' into one (see `append`). Unset, every own append is synced at once.
    pub(crate) fn quorum_without_me(&self) -> Arc<AtomicBool> {
        Arc::clone(&self.quorum_without_me)
    }

    /// A handle that stops upgrading once the last holder of the log dropped it (and with
    /// it the directory's lock).
    pub(crate) fn closed_when_dropped(&self) -> std::sync::Weak<Wal> {
        Arc::downgrade(&self.wal)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Queues a record; `done` runs after it is on disk.
    fn write(
        &self,
        record: &LogRecord,
        done: impl FnOnce(io::Result<()>) + Send + 'static,
    ) -> io::Result<()> {
        let bytes = encode(record)?;
        self.wal.append(bytes, Box::new(done));
        Ok(())
    }

    /// Purges the log up to `log_id` and waits until that is on disk (for the offline
    /// recovery, which opens the log again right after).
    pub(crate) async fn purge_durably(&mut self, log_id: LogId) -> io::Result<()> {
        let record = LogRecord::Purge(log_id);
        self.write_durable(&record).await?;
        self.lock().replay(record);
        Ok(())
    }

    /// Queues a record and waits until it is on disk.
    async fn write_durable(&self, record: &LogRecord) -> io::Result<()> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.write(record, move |r| {
            let _ = tx.send(r);
        })?;
        rx.await
            .map_err(|_| io::Error::other("the WAL writer stopped"))?
    }
}

impl RaftLogReader<TypeConfig> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + Send>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry>, io::Error> {
        let inner = self.lock();
        Ok(inner.log.range(range).map(|(_, e)| e.clone()).collect())
    }

    async fn read_vote(&mut self) -> Result<Option<Vote>, io::Error> {
        Ok(self.lock().vote)
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = Self;

    async fn get_log_state(&mut self) -> Result<LogState<TypeConfig>, io::Error> {
        let inner = self.lock();
        let last = inner
            .log
            .values()
            .next_back()
            .map(|e| e.log_id)
            .or_else(|| inner.last_purged);
        Ok(LogState {
            last_purged_log_id: inner.last_purged,
            last_log_id: last,
        })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote) -> Result<(), io::Error> {
        self.write_durable(&LogRecord::Vote(*vote)).await?;
        self.lock().vote = Some(*vote);
        Ok(())
    }

    async fn save_committed(&mut self, committed: Option<LogId>) -> Result<(), io::Error> {
        // Not synced for: a lost commit mark only means re-applying fewer entries at start,
        // and a sync of its own would hold the disk from the next append (at one client,
        // every write would pay two syncs per member). The next entries' sync takes it along.
        self.wal
            .append_unsynced(encode(&LogRecord::Committed(committed))?);
        self.lock().committed = committed;
        Ok(())
    }

    async fn read_committed(&mut self) -> Result<Option<LogId>, io::Error> {
        Ok(self.lock().committed)
    }

    async fn append<I>(
        &mut self,
        entries: I,
        callback: IOFlushed<TypeConfig>,
    ) -> Result<(), io::Error>
    where
        I: IntoIterator<Item = Entry> + Send,
        I::IntoIter: Send,
    {
        let entries: Vec<Entry> = entries.into_iter().collect();
        // A follower's append is what the leader waits for, and nothing runs beside it:
        // synced right here when the WAL is idle, it skips two thread hand-offs (to the
        // writer and back). The leader's own entries go to the writer thread, so openraft
        // sends them to the followers while they are synced. A burst of them, when followers
        // alone make a quorum, may wait for the next bursts and share one sync: under load
        // the leader then syncs a few hundred times a second instead of back to back, and
        // the CPU and disk go to the followers' syncs, which commit the writes. (With a
        // follower down, the leader's sync is in the quorum again and such a burst can
        // wait up to the WAL's gather window, 3 ms, longer.)
        let followed = match (self.raft_id, entries.first()) {
            (Some(me), Some(first)) => first.log_id.leader_id.node_id != me,
            _ => false,
        };
        let gathered = !followed
            && entries.len() >= GATHER_FROM_ENTRIES
            && self.quorum_without_me.load(Ordering::Relaxed);
        let record = LogRecord::Entries(entries);
        let bytes = encode(&record)?;
        let mut inner = self.lock();
        // Readable before the callback can run, and queued (or written) while holding the
        // lock so WAL order equals the in-memory order.
        if let LogRecord::Entries(entries) = record {
            for e in entries {
                inner.log.insert(e.log_id.index, e);
            }
        }
        let done: crate::wal::AppendCallback = Box::new(move |r| callback.io_completed(r));
        if followed {
            self.wal.append_or_write(bytes, done);
        } else if gathered {
            self.wal.append_gathered(bytes, done);
        } else {
            self.wal.append(bytes, done);
        }
        Ok(())
    }

    async fn truncate_after(&mut self, last_log_id: Option<LogId>) -> Result<(), io::Error> {
        let mut inner = self.lock();
        // Ordered before any later append by the WAL's single queue.
        self.write(&LogRecord::TruncateAfter(last_log_id), |_| {})?;
        inner.replay(LogRecord::TruncateAfter(last_log_id));
        Ok(())
    }

    async fn purge(&mut self, log_id: LogId) -> Result<(), io::Error> {
        let mut inner = self.lock();
        self.write(&LogRecord::Purge(log_id), |_| {})?;
        inner.replay(LogRecord::Purge(log_id));
        if inner.purged_since_compaction >= COMPACT_AFTER_PURGED {
            inner.purged_since_compaction = 0;
            // Rewrite the WAL with the records that rebuild the current state. The lock is
            // held so no append slips in between taking the image and queueing the
            // compaction (which goes through the same queue, after everything before it).
            // Not waited for: appends queued after it land in the new segment.
            let image = inner.image()?;
            self.wal.compact_then(
                image,
                Box::new(|r| {
                    if let Err(e) = r {
                        tracing::warn!(error = %e, "raft log compaction failed");
                    }
                }),
            );
        }
        Ok(())
    }
}
