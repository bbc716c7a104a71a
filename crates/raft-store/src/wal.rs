//! Write-ahead log of opaque records with group commit, for the Raft log store.
//!
//! The caller (the openraft adapter) encodes votes, entry batches, truncations and purges as
//! records; this module only promises that a record whose completion callback got `Ok(())` is on
//! disk and comes back, in append order, from the next [`Wal::open`].
//!
//! ```text
//!  callers (any thread)                          writer thread "starling-wal"
//!  --------------------                          ---------------------------------------------
//!  append(rec, done) ----+                       take the first command, then everything queued
//!  append_sync(rec) -----+--> one FIFO queue -->  (up to max_batch_records / max_batch_bytes)
//!  append_unsynced(rec) -+                       write_at(frames) -> sync_data() -> done(Ok) x N
//!  append_gathered(rec) -+                       (no sync_data when only unsynced records;
//!  compact(records) -----+                        a batch of gathered appends first waits for
//!                                                 more, up to gather_window after the last sync)
//!                                                compact: .tmp -> fsync -> rename -> fsync dir
//!                                                         -> delete older segments
//!  append_or_write(rec, done): nothing queued -> write_at + sync_data + done on the caller's
//!                              thread (under the same lock on the files); else queued
//!  dir/
//!    LOCK                           exclusive lock, held while a Wal is open
//!    wal-00000000000000000007.log   BASE segment (written by compact)
//!    wal-00000000000000000008.log   CONTINUATION segment (rotation), the active one
//! ```
//!
//! # On-disk format
//!
//! A segment file is named `wal-<20-digit zero-padded sequence>.log` and starts with a 16-byte
//! header: the magic and version `b"STRLWAL1"`, one kind byte (`0` = CONTINUATION, `1` = BASE)
//! and seven zero bytes. Records follow, each framed as
//! `u32 LE length | u32 LE crc32 | payload`. The CRC (crc32fast, IEEE) covers the four length
//! bytes followed by the payload: covering the length means a zero-filled tail (length 0, CRC 0)
//! never parses as an empty record, because the CRC of four zero bytes is not zero.
//!
//! The log's content is the records of the newest BASE segment (or of the oldest segment if there
//! is no BASE) followed by those of every newer segment, in sequence order.
//!
//! The active (last) segment is preallocated to the segment size (Linux `fallocate`, as etcd
//! does) and written in place: a sync then has no file size or block allocation to record, only
//! the data (on this project's ext4 test machine, a 350-byte write and `fdatasync` takes ~110 µs
//! at the median inside reserved space against ~170 µs when it grows the file). Its records are
//! followed by zeros up to the end. A segment is cut back to its records when the writer moves to
//! the next one, so only the last segment ends in zeros.
//!
//! # Recovery rules (`Wal::open`)
//!
//! * Leftover `wal-*.log.tmp` files (an unfinished compaction) are deleted.
//! * Segments older than the newest BASE segment were superseded by a compaction that completed
//!   its rename, and are deleted.
//! * Zeros from the end of the last good record to the end of the LAST segment are its reserved
//!   space: nothing is wrong, and appends go on from there.
//! * A torn tail in the LAST segment (a truncated frame, a CRC mismatch, zero-filled or random
//!   garbage before the reserved zeros) is the remains of a write that was never acknowledged:
//!   it is logged with `tracing::warn!`, and the file is truncated to the end of the last good
//!   record and fsynced (and reserved again when the writer opens it).
//!   A last segment whose header is shorter than 16 bytes or all zero (a crash during rotation)
//!   is deleted the same way.
//! * Damage anywhere else is [`WalError::Corrupt`]: records after it were acknowledged, so
//!   dropping them silently would lose committed data.
//!
//! # Async callers
//!
//! The module depends on no runtime. An async caller wraps [`Wal::append`] with a oneshot
//! channel, for example with tokio:
//!
//! ```text
//! let (tx, rx) = tokio::sync::oneshot::channel();
//! wal.append(record, Box::new(move |result| { let _ = tx.send(result); }));
//! rx.await.map_err(|_| io::Error::other("wal writer stopped"))??;
//! ```

use std::fs::{self, File, OpenOptions, TryLockError};
use std::io::{self, BufReader, Read, Seek, Write};
use std::os::unix::fs::{FileExt, OpenOptionsExt, PermissionsExt};
use std::panic::{self, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError, mpsc};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use crate::poll::{PollBeforeSleep, Sleeps};

/// Magic and format version at the start of every segment file.
const MAGIC: &[u8; 8] = b"STRLWAL1";
/// Segment header: magic (8), kind (1), reserved zero bytes (7).
const HEADER_LEN: usize = 16;
/// Frame header: length (4) and CRC (4).
const FRAME_HEADER_LEN: usize = 8;
const KIND_CONTINUATION: u8 = 0;
const KIND_BASE: u8 = 1;
const LOCK_FILE_NAME: &str = "LOCK";
const SEGMENT_PREFIX: &str = "wal-";
const SEGMENT_SUFFIX: &str = ".log";
const TMP_SUFFIX: &str = ".log.tmp";
const SEQUENCE_DIGITS: usize = 20;
/// A sync slower than this sends appends to the writer thread (see [`Wal::append_or_write`]).
const SLOW_SYNC: Duration = Duration::from_millis(20);

/// Completion callback of [`Wal::append`].
///
/// It is called exactly once, with `Ok(())` once the record is durable, or with the error that
/// prevented it. An `Err` means the record MAY or may not be in the log after the next
/// [`Wal::open`]; it is never reported durable when it is not. Callbacks run on the writer
/// thread (or on the caller's thread when the append is refused up front), so they MUST be quick
/// and MUST NOT call back into the same [`Wal`] synchronously (e.g. `append_sync`), which would
/// deadlock the writer.
pub type AppendCallback = Box<dyn FnOnce(io::Result<()>) + Send>;

/// Tuning of a [`Wal`]. Build with [`WalOptions::default`] and the chainable setters.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WalOptions {
    segment_size: u64,
    max_batch_bytes: usize,
    max_batch_records: usize,
    gather_window: Duration,
    poll_before_sleep: PollBeforeSleep,
}

impl Default for WalOptions {
    fn default() -> Self {
        Self {
            segment_size: 64 * 1024 * 1024,
            max_batch_bytes: 4 * 1024 * 1024,
            max_batch_records: 4096,
            gather_window: Duration::from_millis(3),
            poll_before_sleep: PollBeforeSleep::default(),
        }
    }
}

impl WalOptions {
    /// Size in bytes after which the writer starts a new segment file (default 64 MiB). The
    /// active segment is reserved on disk at this size up front.
    ///
    /// A record is never split, so a segment exceeds this only when a single record (plus the
    /// header) is larger than it.
    #[must_use]
    pub fn segment_size(mut self, bytes: u64) -> Self {
        self.segment_size = bytes;
        self
    }

    /// Most payload bytes the writer takes into one write + sync (default 4 MiB). The batch
    /// always takes at least one record, however large.
    #[must_use]
    pub fn max_batch_bytes(mut self, bytes: usize) -> Self {
        self.max_batch_bytes = bytes;
        self
    }

    /// Most records the writer takes into one write + sync (default 4096; 0 is treated as 1).
    #[must_use]
    pub fn max_batch_records(mut self, records: usize) -> Self {
        self.max_batch_records = records;
        self
    }

    /// How long after the start of the last sync a batch of [`Wal::append_gathered`] records
    /// may wait for more before its own sync (default 3 ms; zero: no wait).
    #[must_use]
    pub fn gather_window(mut self, window: Duration) -> Self {
        self.gather_window = window;
        self
    }

    /// Whether the writer thread, with its queue empty, polls it for a while before it
    /// sleeps (default: never). A record queued while it polls needs no wake-up through the
    /// kernel; see [`PollBeforeSleep`].
    #[must_use]
    pub fn poll_before_sleep(mut self, poll: PollBeforeSleep) -> Self {
        self.poll_before_sleep = poll;
        self
    }
}

/// Errors of [`Wal::open`].
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum WalError {
    /// Another open [`Wal`], in this process or another, holds the directory's `LOCK` file.
    ///
    /// Nothing on disk was changed.
    #[error("write-ahead log directory {dir} is locked by another open log")]
    Locked {
        /// The log directory.
        dir: PathBuf,
    },
    /// A segment that holds acknowledged records is damaged: a bad header, or a bad frame in a
    /// segment that is not the last one. Opening would lose acknowledged data, so it refuses.
    ///
    /// Nothing on disk was changed (beyond creating the directory and `LOCK` file if missing);
    /// the damaged file is left for inspection or repair.
    #[error("write-ahead log segment {file} is corrupt at byte offset {offset}")]
    Corrupt {
        /// The damaged segment file.
        file: PathBuf,
        /// Byte offset of the bad header (0) or of the first bad frame.
        offset: u64,
    },
    /// An I/O operation failed.
    ///
    /// Open may already have done some of its recovery steps (deleting leftover `.tmp` files and
    /// superseded segments, truncating a torn tail); each of them is one the next open would
    /// also do, and none removes an acknowledged record.
    #[error("write-ahead log I/O error on {path} while {action}")]
    Io {
        /// The file or directory the operation was on.
        path: PathBuf,
        /// What open was doing.
        action: &'static str,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
}

/// Counters since the [`Wal`] was opened, for tests and benchmarks.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct WalStats {
    /// Records written to segment files (appends and compaction content).
    pub records_written: u64,
    /// Bytes written to segment files: frames and segment headers.
    pub bytes_written: u64,
    /// `sync_data`/`sync_all` calls on segment files (directory fsyncs are not counted).
    pub syncs: u64,
}

#[derive(Debug, Default)]
struct Counters {
    records_written: AtomicU64,
    bytes_written: AtomicU64,
    syncs: AtomicU64,
}

impl Counters {
    fn snapshot(&self) -> WalStats {
        WalStats {
            records_written: self.records_written.load(Ordering::Relaxed),
            bytes_written: self.bytes_written.load(Ordering::Relaxed),
            syncs: self.syncs.load(Ordering::Relaxed),
        }
    }
}

/// A write-ahead log open on one directory.
///
/// All methods take `&self`; share it between threads with `Arc<Wal>`. Appends and compactions
/// go through ONE queue to one writer thread, so they reach the disk in the order they were
/// called, whichever thread called them; [`Wal::append_or_write`] writes on its caller's
/// thread only when that queue is empty, which keeps the order.
#[derive(Debug)]
pub struct Wal {
    sender: Option<mpsc::Sender<Command>>,
    /// Taken by every appender while it queues (or writes on its own thread), so nothing is
    /// queued between [`Wal::append_or_write`]'s look at the queue and its write.
    order: Mutex<()>,
    /// The files, written by the writer thread or (see [`Wal::append_or_write`]) the caller.
    shared: Arc<Shared>,
    writer: Option<JoinHandle<()>>,
    failed: Arc<AtomicBool>,
    counters: Arc<Counters>,
    /// Held (and locked) for the life of the log; the OS releases the lock when it is closed.
    _lock: File,
}

enum Command {
    Append {
        record: Vec<u8>,
        done: AppendCallback,
        /// False for [`Wal::append_unsynced`]: written, made durable by the next sync.
        sync: bool,
        /// True for [`Wal::append_gathered`]: its sync may wait for more records.
        gather: bool,
    },
    Compact {
        records: Vec<Vec<u8>>,
        done: AppendCallback,
    },
}

impl Command {
    fn fail(self, error: io::Error) {
        match self {
            Command::Append { done, .. } | Command::Compact { done, .. } => {
                complete(done, Err(error));
            }
        }
    }
}

impl Wal {
    /// Opens (creating if missing) the log in `dir`, recovers it, and returns it with every
    /// record it holds, oldest first.
    ///
    /// Takes an exclusive lock on `dir/LOCK` for the life of the returned [`Wal`]. See the module
    /// docs for the recovery rules; a torn tail in the last segment is truncated away, damage
    /// anywhere else is [`WalError::Corrupt`].
    pub fn open(dir: &Path, options: WalOptions) -> Result<(Wal, Vec<Vec<u8>>), WalError> {
        fs::create_dir_all(dir).map_err(io_error(dir, "creating the log directory"))?;
        // The log holds the cluster's CA key and join secrets: owner only.
        fs::set_permissions(dir, fs::Permissions::from_mode(0o700))
            .map_err(io_error(dir, "restricting the log directory"))?;
        let lock_path = dir.join(LOCK_FILE_NAME);
        let lock = OpenOptions::new()
            .mode(0o600)
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(io_error(&lock_path, "opening the lock file"))?;
        match lock.try_lock() {
            Ok(()) => {}
            Err(TryLockError::WouldBlock) => {
                return Err(WalError::Locked {
                    dir: dir.to_path_buf(),
                });
            }
            Err(TryLockError::Error(source)) => {
                return Err(WalError::Io {
                    path: lock_path,
                    action: "locking the lock file",
                    source,
                });
            }
        }

        let recovered = recover(dir, options.max_batch_bytes)?;
        let counters = Arc::new(Counters::default());
        let (active, active_seq, active_len) = match recovered.live.last() {
            Some(&seq) => {
                let path = segment_path(dir, seq);
                let file = OpenOptions::new()
                    .mode(0o600)
                    .write(true)
                    .open(&path)
                    .map_err(io_error(&path, "opening the active segment"))?;
                preallocate(&file, options.segment_size);
                (file, seq, recovered.active_len)
            }
            None => {
                let seq = recovered.next_seq;
                let path = segment_path(dir, seq);
                let file = create_segment(dir, seq, KIND_CONTINUATION, &options, &counters)
                    .map_err(io_error(&path, "creating the first segment"))?;
                (file, seq, HEADER_LEN as u64)
            }
        };
        let live = if recovered.live.is_empty() {
            vec![active_seq]
        } else {
            recovered.live
        };

        let failed = Arc::new(AtomicBool::new(false));
        let (sender, receiver) = mpsc::channel();
        let writer = Writer {
            dir: dir.to_path_buf(),
            options,
            active,
            active_seq,
            active_len,
            dirty: false,
            last_sync: Duration::ZERO,
            last_sync_at: None,
            segments: live,
            failed: Arc::clone(&failed),
            failure: None,
            counters: Arc::clone(&counters),
            buf: Vec::new(),
        };
        let shared = Arc::new(Shared {
            writer: Mutex::new(writer),
            queued: AtomicUsize::new(0),
        });
        let handle = {
            let shared = Arc::clone(&shared);
            thread::Builder::new()
                .name("starling-wal".to_owned())
                .spawn(move || run(&receiver, &shared))
                .map_err(io_error(dir, "starting the writer thread"))?
        };
        let wal = Wal {
            sender: Some(sender),
            order: Mutex::new(()),
            shared,
            writer: Some(handle),
            failed,
            counters,
            _lock: lock,
        };
        Ok((wal, recovered.records))
    }

    /// Queues `record` and returns at once; `done` is called once the record is durable (after
    /// the `sync_data` of the batch that carried it) or failed.
    ///
    /// Callbacks of successful appends run in append order. A record longer than `u32::MAX`
    /// bytes is refused with [`io::ErrorKind::InvalidInput`]. After any write or sync error the
    /// log is FAILED: every later append is refused (on the caller's thread) because the state of
    /// the disk is no longer known; reopen the log to recover.
    pub fn append(&self, record: Vec<u8>, done: AppendCallback) {
        self.queue_synced(record, done, false);
    }

    /// Like [`Wal::append`], but the writer may hold the sync back to gather more records
    /// into it: when the last sync started less than [`WalOptions::gather_window`] ago, the
    /// batch waits until that window has passed, taking whatever is appended meanwhile, and
    /// then everything is written and synced together. An append that may not wait
    /// ([`Wal::append`], [`Wal::append_or_write`], [`Wal::append_sync`]) or a compaction
    /// ends the wait at once. `done` is called as for [`Wal::append`], once the record is
    /// durable.
    ///
    /// For records whose sync nobody waits on while it is held back, such as a Raft leader's
    /// own entries in a burst when a quorum of followers can commit them without it: fewer,
    /// larger syncs cost less CPU and leave the disk to the followers' syncs, which the
    /// writes do wait on.
    pub fn append_gathered(&self, record: Vec<u8>, done: AppendCallback) {
        self.queue_synced(record, done, true);
    }

    /// Queues a synced append for the writer thread.
    fn queue_synced(&self, record: Vec<u8>, done: AppendCallback, gather: bool) {
        if u32::try_from(record.len()).is_err() {
            complete(done, Err(record_too_large(record.len())));
            return;
        }
        self.submit(Command::Append {
            record,
            done,
            sync: true,
            gather,
        });
    }

    /// Appends `record` in order with every other append without syncing for it: written at
    /// once (so it outlives the process being killed) — on the caller's thread when nothing is
    /// queued for the writer thread, which is then not woken for it, else by the writer — and
    /// durable with the next sync: the next synced append's, a segment rotation's or
    /// [`Wal::close`]'s. A machine crash before then may lose it (and any unsynced record after
    /// it), never a record acknowledged before it.
    ///
    /// For records whose loss to a machine crash only costs work after a restart, such as
    /// Raft's commit mark: a sync of its own would hold the disk (and the next durable append)
    /// for nothing.
    pub fn append_unsynced(&self, record: Vec<u8>) {
        let done: AppendCallback = Box::new(|result| {
            if let Err(error) = result {
                tracing::warn!(%error, "unsynced write-ahead log record not written");
            }
        });
        self.write_here_or_queue(record, done, false);
    }

    /// Like [`Wal::append`], but when nothing is queued for the writer thread, writes and syncs
    /// `record` on the caller's thread and calls `done` before returning: no hand-off to the
    /// writer and back, at the price of blocking the caller for the sync. Otherwise it is
    /// queued like [`Wal::append`]. Callbacks still run in append order: a record is written
    /// here only once every earlier one's callback ran. After a sync slower than 20 ms,
    /// appends go to the writer thread until one is fast again: a stalling disk does not stall
    /// the caller (a Raft follower still answers heartbeats).
    pub fn append_or_write(&self, record: Vec<u8>, done: AppendCallback) {
        self.write_here_or_queue(record, done, true);
    }

    /// Writes `record` (and syncs, if `sync`) on the caller's thread when nothing is queued
    /// for the writer thread and the last sync was not slow (when syncing), else queues it.
    fn write_here_or_queue(&self, record: Vec<u8>, done: AppendCallback, sync: bool) {
        if u32::try_from(record.len()).is_err() {
            complete(done, Err(record_too_large(record.len())));
            return;
        }
        if self.failed.load(Ordering::Acquire) {
            complete(done, Err(failed_error()));
            return;
        }
        // Every other appender takes this lock before queueing, so nothing is queued between
        // the check and the write.
        let order = self.order();
        if self.shared.queued.load(Ordering::Acquire) == 0 {
            let mut writer = self.shared.lock();
            if !sync || writer.last_sync <= SLOW_SYNC {
                let result = writer.write_batch(std::slice::from_ref(&record), sync);
                drop(writer);
                drop(order);
                complete(done, result);
                return;
            }
        }
        self.send(Command::Append {
            record,
            done,
            sync,
            gather: false,
        });
    }

    fn order(&self) -> std::sync::MutexGuard<'_, ()> {
        // It guards no data: a panic elsewhere cannot leave anything half-done.
        self.order.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Appends `record` through the same queue as [`Wal::append`] and blocks until it is durable.
    ///
    /// Meant for votes, which MUST be on disk before `save_vote` returns. Do not call it from a
    /// completion callback.
    pub fn append_sync(&self, record: Vec<u8>) -> io::Result<()> {
        let (tx, rx) = mpsc::sync_channel(1);
        self.append(
            record,
            Box::new(move |result| {
                // The receiver only goes away if the caller's thread died; nothing to report to.
                let _ = tx.send(result);
            }),
        );
        rx.recv().unwrap_or_else(|_| Err(writer_gone()))
    }

    /// Replaces the whole content of the log with `records`, ordered with appends (everything
    /// appended before this call is written first and then superseded), and blocks until done.
    ///
    /// The records are written to `wal-<seq>.log.tmp`, fsynced, renamed to a BASE segment with a
    /// sequence above every other, the directory is fsynced, and older segments are deleted. A
    /// crash at any point leaves either the old or the new content for [`Wal::open`]. Later
    /// appends go after the new content. Do not call it from a completion callback.
    pub fn compact(&self, records: Vec<Vec<u8>>) -> io::Result<()> {
        let (tx, rx) = mpsc::sync_channel(1);
        self.compact_then(
            records,
            Box::new(move |result| {
                // See `append_sync`.
                let _ = tx.send(result);
            }),
        );
        rx.recv().unwrap_or_else(|_| Err(writer_gone()))
    }

    /// [`Wal::compact`] without waiting: queues the compaction (ordered with appends like
    /// everything else) and calls `done` when it is on disk.
    pub fn compact_then(&self, records: Vec<Vec<u8>>, done: AppendCallback) {
        if let Some(record) = records.iter().find(|r| u32::try_from(r.len()).is_err()) {
            done(Err(record_too_large(record.len())));
            return;
        }
        self.submit(Command::Compact { records, done });
    }

    /// Counters since this log was opened.
    pub fn stats(&self) -> WalStats {
        self.counters.snapshot()
    }

    /// Writes everything queued, completes every pending callback, stops the writer thread and
    /// releases the lock.
    ///
    /// Returns an error if the log is FAILED (some earlier write or sync failed) or the writer
    /// thread panicked. Dropping a [`Wal`] does the same and ignores the result.
    pub fn close(mut self) -> io::Result<()> {
        self.shutdown()
    }

    fn submit(&self, command: Command) {
        if self.failed.load(Ordering::Acquire) {
            command.fail(failed_error());
            return;
        }
        let _order = self.order();
        self.send(command);
    }

    /// Queues `command` (the caller holds the order lock).
    fn send(&self, command: Command) {
        self.shared.queued.fetch_add(1, Ordering::AcqRel);
        let unsent = match &self.sender {
            Some(sender) => sender.send(command).err().map(|mpsc::SendError(c)| c),
            None => Some(command),
        };
        if let Some(command) = unsent {
            self.shared.queued.fetch_sub(1, Ordering::AcqRel);
            command.fail(writer_gone());
        }
    }

    fn shutdown(&mut self) -> io::Result<()> {
        // Dropping the only sender lets the writer drain the queue, sync what it wrote
        // unsynced and return.
        drop(self.sender.take());
        if let Some(handle) = self.writer.take()
            && handle.join().is_err()
        {
            return Err(io::Error::other("write-ahead log writer thread panicked"));
        }
        if self.failed.load(Ordering::Acquire) {
            return Err(failed_error());
        }
        Ok(())
    }
}

impl Drop for Wal {
    fn drop(&mut self) {
        // After `close` there is nothing left to do, and its caller already got the result.
        if self.writer.is_none() {
            return;
        }
        if let Err(error) = self.shutdown() {
            tracing::warn!(%error, "write-ahead log closed after a failure");
        }
    }
}

/// The files and the count of commands queued for the writer thread and not yet done.
#[derive(Debug)]
struct Shared {
    writer: Mutex<Writer>,
    /// Raised before a command is sent, lowered once it is written and its callback ran.
    queued: AtomicUsize,
}

impl Shared {
    fn lock(&self) -> std::sync::MutexGuard<'_, Writer> {
        // A panic while writing leaves the log's state unknown: FAILED says so, and the
        // files' state is still what the next write must start from.
        self.writer.lock().unwrap_or_else(|poisoned| {
            let mut writer = poisoned.into_inner();
            writer.enter_failed(&io::Error::other("a write-ahead log write panicked"));
            writer
        })
    }
}

/// Takes the next command, polling the queue first while the writer is busy.
fn next_command(
    receiver: &mpsc::Receiver<Command>,
    poll: PollBeforeSleep,
    sleeps: &mut Sleeps,
) -> Result<Command, mpsc::RecvError> {
    let start = Instant::now();
    let poll_for = poll.poll_for(sleeps);
    let command = loop {
        match receiver.try_recv() {
            Ok(command) => break Ok(command),
            Err(mpsc::TryRecvError::Disconnected) => break Err(mpsc::RecvError),
            Err(mpsc::TryRecvError::Empty) if start.elapsed() < poll_for => thread::yield_now(),
            Err(mpsc::TryRecvError::Empty) => break receiver.recv(),
        }
    };
    poll.record(sleeps, start.elapsed());
    command
}

/// The writer thread: takes the commands in queue order, appends in group-commit batches.
fn run(receiver: &mpsc::Receiver<Command>, shared: &Shared) {
    let (max_records, max_bytes, poll) = {
        let writer = shared.lock();
        (
            writer.options.max_batch_records.max(1),
            writer.options.max_batch_bytes,
            writer.options.poll_before_sleep,
        )
    };
    let mut sleeps = Sleeps::default();
    let mut batch = Vec::new();
    let mut dones = Vec::new();
    let mut next = None;
    loop {
        let command = match next.take() {
            Some(command) => command,
            None => match next_command(receiver, poll, &mut sleeps) {
                Ok(command) => command,
                // Every sender is gone and the queue is empty: closed.
                Err(mpsc::RecvError) => {
                    shared.lock().sync_if_dirty();
                    return;
                }
            },
        };
        match command {
            Command::Compact { records, done } => {
                let result = shared.lock().compact(&records);
                complete(done, result);
                shared.queued.fetch_sub(1, Ordering::AcqRel);
            }
            Command::Append {
                record,
                done,
                sync,
                gather,
            } => {
                let mut batch_bytes = record.len();
                let mut batch_sync = sync;
                batch.push(record);
                dones.push(done);
                // A gathered append waits for more until the window after the last sync
                // has passed, as long as every synced record taken may wait too.
                let mut until = if gather {
                    shared.lock().gather_until()
                } else {
                    None
                };
                // Group commit: take whatever else is already queued (or comes while the
                // batch may wait), up to the limits; a compaction ends the batch so it stays
                // ordered after these appends.
                while batch.len() < max_records && batch_bytes < max_bytes {
                    let left = until.and_then(|u| u.checked_duration_since(Instant::now()));
                    let received = match left {
                        Some(left) if !left.is_zero() => receiver.recv_timeout(left).ok(),
                        _ => receiver.try_recv().ok(),
                    };
                    match received {
                        Some(Command::Append {
                            record,
                            done,
                            sync,
                            gather,
                        }) => {
                            if sync && !gather {
                                until = None;
                            }
                            batch_sync |= sync;
                            batch_bytes += record.len();
                            batch.push(record);
                            dones.push(done);
                        }
                        Some(compact @ Command::Compact { .. }) => {
                            next = Some(compact);
                            break;
                        }
                        None => break,
                    }
                }
                let result = shared.lock().write_batch(&batch, batch_sync);
                // Callbacks outside the lock, and before the count drops: an append written
                // on its caller's thread comes after them.
                for done in dones.drain(..) {
                    complete(done, result.as_ref().map(|_| ()).map_err(copy_error));
                }
                shared.queued.fetch_sub(batch.len(), Ordering::AcqRel);
                batch.clear();
            }
        }
    }
}

/// The log's files and where the writing stands. Written under [`Shared`]'s lock by the
/// writer thread, or by a caller when nothing is queued.
#[derive(Debug)]
struct Writer {
    dir: PathBuf,
    options: WalOptions,
    active: File,
    active_seq: u64,
    /// Bytes in the active segment, header included.
    active_len: u64,
    /// Records written to the active segment since its last sync (unsynced appends).
    dirty: bool,
    /// How long the last sync of the active segment took.
    last_sync: Duration,
    /// When the last sync of the active segment started.
    last_sync_at: Option<Instant>,
    /// Sequences of the live segments, ascending; the last is the active one.
    segments: Vec<u64>,
    failed: Arc<AtomicBool>,
    /// Kind and text of the first I/O error; set together with `failed`.
    failure: Option<(io::ErrorKind, String)>,
    counters: Arc<Counters>,
    /// Frames of the batch being written, reused between batches.
    buf: Vec<u8>,
}

impl Writer {
    /// Writes a batch of appends (syncing if `sync`), entering the FAILED state on an error.
    fn write_batch(&mut self, records: &[Vec<u8>], sync: bool) -> io::Result<()> {
        if let Some(error) = self.failure_error() {
            return Err(error);
        }
        let result = self.write_records(records, sync);
        if let Err(error) = &result {
            self.enter_failed(error);
        }
        result
    }

    /// Runs a compaction, entering the FAILED state on an error.
    fn compact(&mut self, records: &[Vec<u8>]) -> io::Result<()> {
        if let Some(error) = self.failure_error() {
            return Err(error);
        }
        let result = self.write_base(records);
        if let Err(error) = &result {
            self.enter_failed(error);
        }
        result
    }

    /// Until when a batch of gathered appends may wait: the window after the last sync
    /// started, if that is still ahead.
    fn gather_until(&self) -> Option<Instant> {
        let until = self.last_sync_at? + self.options.gather_window;
        (until > Instant::now()).then_some(until)
    }

    /// At close: what was written unsynced is made durable.
    fn sync_if_dirty(&mut self) {
        if self.dirty
            && self.failure.is_none()
            && let Err(error) = self.sync_active()
        {
            self.enter_failed(&error);
        }
    }

    /// Writes `records` to the active segment, rotating before a frame that would take it past
    /// `segment_size`, and syncs every segment written to (the active one only if `sync`; a
    /// segment left behind is always synced).
    fn write_records(&mut self, records: &[Vec<u8>], sync: bool) -> io::Result<()> {
        self.buf.clear();
        for record in records {
            let segment_len = self.active_len + self.buf.len() as u64;
            let frame_len = (FRAME_HEADER_LEN + record.len()) as u64;
            if segment_len > HEADER_LEN as u64
                && segment_len + frame_len > self.options.segment_size
            {
                // `rotate` syncs the segment it leaves.
                self.flush_buf(false)?;
                self.rotate()?;
            }
            encode_frame(record, &mut self.buf)?;
        }
        self.counters
            .records_written
            .fetch_add(records.len() as u64, Ordering::Relaxed);
        self.flush_buf(sync)
    }

    fn flush_buf(&mut self, sync: bool) -> io::Result<()> {
        if self.buf.is_empty() {
            return Ok(());
        }
        // In place: the segment is reserved beyond its records (and a file opened to append
        // would ignore the offset).
        self.active.write_all_at(&self.buf, self.active_len)?;
        self.dirty = true;
        if sync {
            self.sync_active()?;
        }
        self.active_len += self.buf.len() as u64;
        self.counters
            .bytes_written
            .fetch_add(self.buf.len() as u64, Ordering::Relaxed);
        self.buf.clear();
        Ok(())
    }

    fn sync_active(&mut self) -> io::Result<()> {
        let started = Instant::now();
        self.active.sync_data()?;
        self.last_sync = started.elapsed();
        self.last_sync_at = Some(started);
        self.dirty = false;
        self.counters.syncs.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    fn rotate(&mut self) -> io::Result<()> {
        // The segment ends at its last record: reserved zeros are only ever in the last one,
        // so damage to any other still reads as corruption.
        self.active.set_len(self.active_len)?;
        self.sync_active()?;
        let seq = self.next_seq()?;
        self.active = create_segment(
            &self.dir,
            seq,
            KIND_CONTINUATION,
            &self.options,
            &self.counters,
        )?;
        self.active_seq = seq;
        self.active_len = HEADER_LEN as u64;
        self.segments.push(seq);
        Ok(())
    }

    fn next_seq(&self) -> io::Result<u64> {
        self.active_seq
            .checked_add(1)
            .ok_or_else(|| io::Error::other("write-ahead log segment sequence exhausted"))
    }

    /// Writes `records` as a new BASE segment and deletes every older segment.
    fn write_base(&mut self, records: &[Vec<u8>]) -> io::Result<()> {
        let seq = self.next_seq()?;
        let tmp = tmp_path(&self.dir, seq);
        let path = segment_path(&self.dir, seq);
        self.buf.clear();
        self.buf.extend_from_slice(&segment_header(KIND_BASE));
        for record in records {
            encode_frame(record, &mut self.buf)?;
        }
        // A stale temp file can only be left by an earlier failed attempt; it holds nothing.
        match fs::remove_file(&tmp) {
            Err(error) if error.kind() != io::ErrorKind::NotFound => return Err(error),
            _ => {}
        }
        let mut file = OpenOptions::new()
            .mode(0o600)
            .create_new(true)
            .write(true)
            .open(&tmp)?;
        file.write_all(&self.buf)?;
        preallocate(&file, self.options.segment_size);
        file.sync_all()?;
        self.counters
            .bytes_written
            .fetch_add(self.buf.len() as u64, Ordering::Relaxed);
        self.counters
            .records_written
            .fetch_add(records.len() as u64, Ordering::Relaxed);
        self.counters.syncs.fetch_add(1, Ordering::Relaxed);
        // The rename is the commit point: before it, open sees the old content (and deletes the
        // temp file); after it, open sees the BASE segment and ignores everything older.
        fs::rename(&tmp, &path)?;
        sync_dir(&self.dir)?;

        self.active = file;
        self.active_seq = seq;
        self.active_len = self.buf.len() as u64;
        // What the old segments held unsynced is superseded by the synced BASE.
        self.dirty = false;
        self.buf.clear();
        let old = std::mem::replace(&mut self.segments, vec![seq]);
        // From here the compaction is durable; failing to delete superseded segments loses
        // nothing, and the next open deletes them.
        for old_seq in old {
            let old_path = segment_path(&self.dir, old_seq);
            if let Err(error) = fs::remove_file(&old_path) {
                tracing::warn!(file = %old_path.display(), %error,
                    "could not delete a segment superseded by compaction; open will retry");
            }
        }
        if let Err(error) = sync_dir(&self.dir) {
            tracing::warn!(dir = %self.dir.display(), %error,
                "could not fsync the log directory after deleting superseded segments");
        }
        Ok(())
    }

    fn failure_error(&self) -> Option<io::Error> {
        self.failure.as_ref().map(|(kind, message)| {
            io::Error::new(
                *kind,
                format!("write-ahead log failed earlier and accepts no more writes: {message}"),
            )
        })
    }

    fn enter_failed(&mut self, error: &io::Error) {
        if self.failure.is_none() {
            tracing::error!(%error, "write-ahead log write failed; refusing further writes");
            self.failure = Some((error.kind(), error.to_string()));
            self.failed.store(true, Ordering::Release);
        }
    }
}

/// What [`recover`] found and did.
struct Recovered {
    records: Vec<Vec<u8>>,
    /// Live segment sequences, ascending (empty if the directory held none).
    live: Vec<u64>,
    /// Length of the last live segment after truncation.
    active_len: u64,
    /// Sequence for a new first segment when `live` is empty.
    next_seq: u64,
}

/// Reads every live segment, then (only if nothing is corrupt) applies the recovery steps.
fn recover(dir: &Path, max_batch_bytes: usize) -> Result<Recovered, WalError> {
    let listing = list_dir(dir)?;
    let segments = listing.segments;

    // Walk from the newest segment down to the newest BASE one; everything older is superseded.
    let mut first_live = 0;
    let mut drop_torn_last = false;
    for (index, &seq) in segments.iter().enumerate().rev() {
        let path = segment_path(dir, seq);
        match read_header(&path).map_err(io_error(&path, "reading a segment header"))? {
            HeaderState::Valid(KIND_BASE) => {
                first_live = index;
                break;
            }
            HeaderState::Valid(_) => {}
            HeaderState::Torn if index + 1 == segments.len() => drop_torn_last = true,
            HeaderState::Torn | HeaderState::Bad => {
                return Err(WalError::Corrupt {
                    file: path,
                    offset: 0,
                });
            }
        }
    }
    let superseded = &segments[..first_live];
    let live_end = segments.len() - usize::from(drop_torn_last);
    let live = segments[first_live..live_end].to_vec();

    let mut records = Vec::new();
    let mut active_len = HEADER_LEN as u64;
    let mut torn_tail = None;
    for (index, &seq) in live.iter().enumerate() {
        let path = segment_path(dir, seq);
        let scan =
            scan_segment(&path, &mut records).map_err(io_error(&path, "reading a segment"))?;
        let last = index + 1 == live.len();
        if let Some(torn) = scan.torn
            // Only zeros after the last record of the last segment: its reserved space.
            && !(last && scan.written_end == torn.offset)
        {
            // A crash can only tear the last batch, which was never acknowledged. Damage
            // further from the end of what was written than two batches is media corruption
            // of acknowledged records: refuse to start rather than drop them.
            let slack = 2 * max_batch_bytes as u64;
            let far_from_end = scan.written_end.saturating_sub(torn.offset) > slack;
            if !last || (torn.reason == "checksum mismatch" && far_from_end) {
                return Err(WalError::Corrupt {
                    file: path,
                    offset: torn.offset,
                });
            }
            torn_tail = Some((path, scan.written_end, torn));
        }
        active_len = scan.valid_len;
    }

    // Nothing is corrupt: apply the recovery steps. Each is idempotent, so a crash between
    // them is repaired by the next open.
    let mut removed_any = false;
    for tmp in &listing.tmp_files {
        tracing::warn!(file = %tmp.display(), "deleting the temp file of an unfinished compaction");
        fs::remove_file(tmp).map_err(io_error(tmp, "deleting a leftover temp file"))?;
        removed_any = true;
    }
    for &seq in superseded {
        let path = segment_path(dir, seq);
        tracing::info!(file = %path.display(), "deleting a segment superseded by compaction");
        fs::remove_file(&path).map_err(io_error(&path, "deleting a superseded segment"))?;
        removed_any = true;
    }
    if drop_torn_last && let Some(&seq) = segments.last() {
        let path = segment_path(dir, seq);
        tracing::warn!(file = %path.display(),
            "last segment has a torn header (crash while creating it); deleting it");
        fs::remove_file(&path).map_err(io_error(&path, "deleting a torn segment"))?;
        removed_any = true;
    }
    if removed_any {
        sync_dir(dir).map_err(io_error(dir, "syncing the log directory"))?;
    }
    if let Some((path, written_end, torn)) = torn_tail {
        tracing::warn!(
            file = %path.display(),
            offset = torn.offset,
            dropped_bytes = written_end - torn.offset,
            reason = torn.reason,
            "torn tail in the last write-ahead log segment; truncating to the last good record"
        );
        let file = OpenOptions::new()
            .mode(0o600)
            .write(true)
            .open(&path)
            .map_err(io_error(&path, "opening a segment to truncate it"))?;
        file.set_len(torn.offset)
            .and_then(|()| file.sync_all())
            .map_err(io_error(&path, "truncating a torn tail"))?;
    }

    let next_seq = match segments.last() {
        Some(&seq) => seq.checked_add(1).ok_or_else(|| WalError::Corrupt {
            file: segment_path(dir, seq),
            offset: 0,
        })?,
        None => 0,
    };
    Ok(Recovered {
        records,
        live,
        active_len,
        next_seq,
    })
}

struct Listing {
    /// Segment sequences, ascending.
    segments: Vec<u64>,
    tmp_files: Vec<PathBuf>,
}

fn list_dir(dir: &Path) -> Result<Listing, WalError> {
    let mut segments = Vec::new();
    let mut tmp_files = Vec::new();
    let entries = fs::read_dir(dir).map_err(io_error(dir, "listing the log directory"))?;
    for entry in entries {
        let entry = entry.map_err(io_error(dir, "listing the log directory"))?;
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        if let Some(stem) = name.strip_suffix(TMP_SUFFIX) {
            if parse_sequence(stem).is_some() {
                tmp_files.push(entry.path());
            }
        } else if let Some(seq) = name.strip_suffix(SEGMENT_SUFFIX).and_then(parse_sequence) {
            segments.push(seq);
        }
    }
    segments.sort_unstable();
    Ok(Listing {
        segments,
        tmp_files,
    })
}

/// Parses `wal-<20 digits>` into its sequence.
fn parse_sequence(stem: &str) -> Option<u64> {
    let digits = stem.strip_prefix(SEGMENT_PREFIX)?;
    if digits.len() != SEQUENCE_DIGITS || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

fn segment_path(dir: &Path, seq: u64) -> PathBuf {
    dir.join(format!("{SEGMENT_PREFIX}{seq:020}{SEGMENT_SUFFIX}"))
}

fn tmp_path(dir: &Path, seq: u64) -> PathBuf {
    dir.join(format!("{SEGMENT_PREFIX}{seq:020}{TMP_SUFFIX}"))
}

fn segment_header(kind: u8) -> [u8; HEADER_LEN] {
    let mut header = [0u8; HEADER_LEN];
    header[..MAGIC.len()].copy_from_slice(MAGIC);
    header[MAGIC.len()] = kind;
    header
}

enum HeaderState {
    Valid(u8),
    /// Shorter than a header, or all zero: a segment whose creation never became durable.
    Torn,
    Bad,
}

fn read_header(path: &Path) -> io::Result<HeaderState> {
    let mut bytes = Vec::with_capacity(HEADER_LEN);
    File::open(path)?
        .take(HEADER_LEN as u64)
        .read_to_end(&mut bytes)?;
    Ok(classify_header(&bytes))
}

fn classify_header(bytes: &[u8]) -> HeaderState {
    if bytes.len() < HEADER_LEN || bytes.iter().all(|&b| b == 0) {
        return HeaderState::Torn;
    }
    let (magic, rest) = bytes.split_at(MAGIC.len());
    let reserved_zero = rest.iter().skip(1).all(|&b| b == 0);
    match rest.first() {
        Some(&kind)
            if magic == MAGIC
                && reserved_zero
                && (kind == KIND_BASE || kind == KIND_CONTINUATION) =>
        {
            HeaderState::Valid(kind)
        }
        _ => HeaderState::Bad,
    }
}

fn frame_crc(payload: &[u8], len: u32) -> u32 {
    let mut hasher = crc32fast::Hasher::new();
    hasher.update(&len.to_le_bytes());
    hasher.update(payload);
    hasher.finalize()
}

fn encode_frame(record: &[u8], buf: &mut Vec<u8>) -> io::Result<()> {
    let len = u32::try_from(record.len()).map_err(|_| record_too_large(record.len()))?;
    buf.extend_from_slice(&len.to_le_bytes());
    buf.extend_from_slice(&frame_crc(record, len).to_le_bytes());
    buf.extend_from_slice(record);
    Ok(())
}

struct TornTail {
    offset: u64,
    reason: &'static str,
}

struct SegmentScan {
    /// End of the last good frame.
    valid_len: u64,
    /// End of the last byte that is not zero (at least `valid_len`): what follows is
    /// reserved space, or was never written.
    written_end: u64,
    torn: Option<TornTail>,
}

/// Appends the segment's good records to `out`, stopping at the first bad frame.
fn scan_segment(path: &Path, out: &mut Vec<Vec<u8>>) -> io::Result<SegmentScan> {
    let file = File::open(path)?;
    let file_len = file.metadata()?.len();
    let mut reader = BufReader::with_capacity(256 * 1024, file);
    // The header was validated by `recover`.
    let mut header = [0u8; HEADER_LEN];
    reader.read_exact(&mut header)?;
    let mut pos = HEADER_LEN as u64;
    let reason = loop {
        let remaining = file_len - pos;
        if remaining == 0 {
            return Ok(SegmentScan {
                valid_len: pos,
                written_end: pos,
                torn: None,
            });
        }
        if remaining < FRAME_HEADER_LEN as u64 {
            break "truncated frame header";
        }
        let mut frame_header = [0u8; FRAME_HEADER_LEN];
        reader.read_exact(&mut frame_header)?;
        let [l0, l1, l2, l3, c0, c1, c2, c3] = frame_header;
        let len = u32::from_le_bytes([l0, l1, l2, l3]);
        let crc = u32::from_le_bytes([c0, c1, c2, c3]);
        if frame_header == [0; FRAME_HEADER_LEN] {
            break "zero-filled bytes";
        }
        // Checked before allocating, so a garbage length cannot make us allocate gigabytes.
        if u64::from(len) > remaining - FRAME_HEADER_LEN as u64 {
            break "frame length runs past the end of the file";
        }
        let mut payload = vec![0u8; len as usize];
        reader.read_exact(&mut payload)?;
        if frame_crc(&payload, len) != crc {
            break "checksum mismatch";
        }
        out.push(payload);
        pos += FRAME_HEADER_LEN as u64 + u64::from(len);
    };
    // Where the bytes after the last good frame stop being zero. Reserved space reads as a
    // hole where the file system tracks it (ext4, xfs): only the data regions are read.
    let mut file = reader.into_inner();
    let mut written_end = pos;
    let mut chunk = vec![0u8; 256 * 1024];
    let zeros = vec![0u8; chunk.len()];
    let mut from = pos;
    while let Some((start, end)) = data_region(&file, from, file_len) {
        file.seek(io::SeekFrom::Start(start))?;
        let mut at = start;
        while at < end {
            let want = usize::try_from(end - at).map_or(chunk.len(), |n| n.min(chunk.len()));
            let n = file.read(&mut chunk[..want])?;
            if n == 0 {
                break;
            }
            // Compared as slices (memcmp) first: mostly zeros.
            if chunk[..n] != zeros[..n]
                && let Some(i) = chunk[..n].iter().rposition(|&b| b != 0)
            {
                written_end = at + i as u64 + 1;
            }
            at += n as u64;
        }
        from = end;
    }
    Ok(SegmentScan {
        valid_len: pos,
        written_end,
        torn: Some(TornTail {
            offset: pos,
            reason,
        }),
    })
}

/// The next stretch of the file at or after `from` that may hold data, as `(start, end)`, or
/// `None` if only holes (reserved space) follow. Where the system cannot tell, all of what is
/// left.
fn data_region(file: &File, from: u64, file_len: u64) -> Option<(u64, u64)> {
    if from >= file_len {
        return None;
    }
    #[cfg(target_os = "linux")]
    {
        use nix::unistd::{Whence, lseek};
        let Ok(offset) = i64::try_from(from) else {
            return Some((from, file_len));
        };
        let start = match lseek(file, offset, Whence::SeekData) {
            Ok(at) => u64::try_from(at).map_or(from, |at| at.clamp(from, file_len)),
            Err(nix::errno::Errno::ENXIO) => return None,
            Err(_) => return Some((from, file_len)),
        };
        let end = i64::try_from(start)
            .ok()
            .and_then(|start| lseek(file, start, Whence::SeekHole).ok())
            .and_then(|at| u64::try_from(at).ok())
            .map_or(file_len, |at| at.clamp(start, file_len));
        // A region of no length would not move the search on: read the rest instead.
        if end <= start {
            return Some((start, file_len));
        }
        Some((start, end))
    }
    #[cfg(not(target_os = "linux"))]
    {
        let _ = file;
        Some((from, file_len))
    }
}

/// Creates segment `seq` with its header, reserves it, syncs it and the directory.
fn create_segment(
    dir: &Path,
    seq: u64,
    kind: u8,
    options: &WalOptions,
    counters: &Counters,
) -> io::Result<File> {
    let mut file = OpenOptions::new()
        .mode(0o600)
        .create_new(true)
        .write(true)
        .open(segment_path(dir, seq))?;
    file.write_all(&segment_header(kind))?;
    preallocate(&file, options.segment_size);
    file.sync_data()?;
    counters
        .bytes_written
        .fetch_add(HEADER_LEN as u64, Ordering::Relaxed);
    counters.syncs.fetch_add(1, Ordering::Relaxed);
    // The new name must be durable before records in it are acknowledged.
    sync_dir(dir)?;
    Ok(file)
}

/// Reserves `len` bytes for `file` on disk (zeros, the file's size set to `len` unless it is
/// longer), so that writes inside it change neither the size nor the block allocation. Where
/// the file system cannot (or off Linux) the file grows as it is written, as before.
fn preallocate(file: &File, len: u64) {
    #[cfg(target_os = "linux")]
    {
        let Ok(len) = i64::try_from(len) else { return };
        if let Err(error) = nix::fcntl::fallocate(file, nix::fcntl::FallocateFlags::empty(), 0, len)
        {
            tracing::debug!(%error, "cannot reserve a write-ahead log segment; it grows as written");
        }
    }
    #[cfg(not(target_os = "linux"))]
    let _ = (file, len);
}

fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

/// Calls a completion callback; a panicking callback must not take the writer thread down.
fn complete(done: AppendCallback, result: io::Result<()>) {
    if panic::catch_unwind(AssertUnwindSafe(move || done(result))).is_err() {
        tracing::error!("a write-ahead log completion callback panicked");
    }
}

fn copy_error(error: &io::Error) -> io::Error {
    io::Error::new(error.kind(), error.to_string())
}

fn record_too_large(len: usize) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidInput,
        format!("write-ahead log record of {len} bytes exceeds the u32 frame length"),
    )
}

fn failed_error() -> io::Error {
    io::Error::other("write-ahead log failed earlier and accepts no more writes; reopen it")
}

fn writer_gone() -> io::Error {
    io::Error::other("write-ahead log writer thread has stopped")
}

fn io_error(path: &Path, action: &'static str) -> impl FnOnce(io::Error) -> WalError {
    let path = path.to_path_buf();
    move |source| WalError::Io {
        path,
        action,
        source,
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::sync::Mutex;
    use std::time::{Duration, Instant};

    const WAIT: Duration = Duration::from_secs(60);

    /// xorshift64*, seeded, so failures reproduce.
    struct Rng(u64);

    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
        }

        fn below(&mut self, n: u64) -> u64 {
            self.next() % n
        }

        fn bytes(&mut self, len: usize) -> Vec<u8> {
            (0..len).map(|_| self.next() as u8).collect()
        }
    }

    fn records(rng: &mut Rng, count: usize, max_len: u64) -> Vec<Vec<u8>> {
        (0..count)
            .map(|_| {
                let len = rng.below(max_len + 1) as usize;
                rng.bytes(len)
            })
            .collect()
    }

    /// Appends all records with pipelined `append` calls and waits (bounded) for every callback.
    fn append_all(wal: &Wal, records: &[Vec<u8>]) {
        let (tx, rx) = mpsc::channel();
        for (index, record) in records.iter().enumerate() {
            let tx = tx.clone();
            wal.append(
                record.clone(),
                Box::new(move |result| {
                    let _ = tx.send((index, result.map_err(|e| e.to_string())));
                }),
            );
        }
        let deadline = Instant::now() + WAIT;
        for expected in 0..records.len() {
            let timeout = deadline.saturating_duration_since(Instant::now());
            let (index, result) = rx.recv_timeout(timeout).expect("append callback in time");
            assert_eq!(index, expected, "callbacks must run in append order");
            result.expect("append succeeds");
        }
    }

    fn segments_in(dir: &Path) -> Vec<PathBuf> {
        let mut files: Vec<PathBuf> = fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.extension().is_some_and(|e| e == "log"))
            .collect();
        files.sort();
        files
    }

    fn tmp_files_in(dir: &Path) -> Vec<PathBuf> {
        fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.to_string_lossy().ends_with(".tmp"))
            .collect()
    }

    fn open(dir: &Path) -> (Wal, Vec<Vec<u8>>) {
        Wal::open(dir, WalOptions::default()).unwrap()
    }

    fn frame_len(record: &[u8]) -> u64 {
        (FRAME_HEADER_LEN + record.len()) as u64
    }

    #[test]
    fn round_trip_thousand_records_of_varied_sizes() {
        let dir = tempfile::tempdir().unwrap();
        let mut rng = Rng(0x0123_4567_89ab_cdef);
        let mut written = records(&mut rng, 1000, 100 * 1024);
        written[0].clear();
        let (wal, replayed) = open(dir.path());
        assert!(replayed.is_empty());
        append_all(&wal, &written);
        let stats = wal.stats();
        assert_eq!(stats.records_written, 1000);
        wal.close().unwrap();

        let (wal, replayed) = open(dir.path());
        assert_eq!(replayed.len(), written.len());
        assert!(replayed == written, "replayed records differ from written");
        wal.close().unwrap();
    }

    #[test]
    fn group_commit_uses_fewer_syncs_than_appends() {
        let dir = tempfile::tempdir().unwrap();
        let (wal, _) = open(dir.path());
        let syncs_before = wal.stats().syncs;
        let (tx, rx) = mpsc::channel();
        thread::scope(|scope| {
            for t in 0..8u32 {
                let tx = tx.clone();
                let wal = &wal;
                scope.spawn(move || {
                    for i in 0..500u32 {
                        let tx = tx.clone();
                        let record = [t.to_le_bytes(), i.to_le_bytes()].concat();
                        wal.append(
                            record,
                            Box::new(move |r| {
                                let _ = tx.send(r.is_ok());
                            }),
                        );
                    }
                });
            }
        });
        let deadline = Instant::now() + WAIT;
        for _ in 0..4000 {
            let timeout = deadline.saturating_duration_since(Instant::now());
            assert!(rx.recv_timeout(timeout).expect("callback in time"));
        }
        let stats = wal.stats();
        let syncs = stats.syncs - syncs_before;
        assert_eq!(stats.records_written, 4000);
        assert!(
            syncs < 4000,
            "group commit used {syncs} syncs for 4000 appends"
        );
        eprintln!("group commit: 4000 appends from 8 threads took {syncs} syncs");
        wal.close().unwrap();

        // Per-thread order is preserved in the single queue.
        let (wal, replayed) = open(dir.path());
        assert_eq!(replayed.len(), 4000);
        let mut next = [0u32; 8];
        for record in &replayed {
            let t = u32::from_le_bytes(record[0..4].try_into().unwrap()) as usize;
            let i = u32::from_le_bytes(record[4..8].try_into().unwrap());
            assert_eq!(i, next[t]);
            next[t] += 1;
        }
        wal.close().unwrap();
    }

    #[test]
    fn unsynced_appends_are_written_in_order_and_synced_by_the_next_append() {
        let dir = tempfile::tempdir().unwrap();
        let (wal, _) = open(dir.path());
        let before = wal.stats();
        let mut expected: Vec<Vec<u8>> = (0..10u32).map(|i| i.to_le_bytes().to_vec()).collect();
        for record in &expected {
            wal.append_unsynced(record.clone());
        }
        // Written at once (they outlive the process), without a sync.
        let frames: u64 = expected.iter().map(|r| frame_len(r)).sum();
        wait_written(&wal, before.bytes_written + frames);
        assert_eq!(
            wal.stats().syncs,
            before.syncs,
            "unsynced records were synced"
        );
        expected.push(b"durable".to_vec());
        wal.append_sync(b"durable".to_vec()).unwrap();
        let after = wal.stats();
        assert_eq!(after.records_written - before.records_written, 11);
        assert_eq!(
            after.syncs - before.syncs,
            1,
            "ten unsynced records and one synced one take one sync"
        );
        // One more left unsynced: close makes it durable, and it comes back in order.
        wal.append_unsynced(b"last".to_vec());
        expected.push(b"last".to_vec());
        wal.close().unwrap();
        let (wal, replayed) = open(dir.path());
        assert_eq!(replayed, expected);
        wal.close().unwrap();
    }

    /// An append callback that reports on a channel.
    fn reporting(tx: &mpsc::Sender<u32>, n: u32) -> AppendCallback {
        let tx = tx.clone();
        Box::new(move |result| {
            result.unwrap();
            tx.send(n).unwrap();
        })
    }

    fn open_gathering(dir: &Path, window: Duration) -> (Wal, Vec<Vec<u8>>) {
        Wal::open(dir, WalOptions::default().gather_window(window)).unwrap()
    }

    #[test]
    fn gathered_appends_wait_within_the_window_and_share_one_sync() {
        let dir = tempfile::tempdir().unwrap();
        let (wal, _) = open_gathering(dir.path(), Duration::from_secs(3600));
        wal.append_sync(b"first".to_vec()).unwrap();
        let before = wal.stats();
        let (tx, rx) = mpsc::channel();
        wal.append_gathered(b"one".to_vec(), reporting(&tx, 1));
        wal.append_gathered(b"two".to_vec(), reporting(&tx, 2));
        // The last sync started just now: the batch waits for more (an hour here).
        assert!(
            rx.recv_timeout(Duration::from_millis(200)).is_err(),
            "a gathered append was synced inside the window"
        );
        assert_eq!(wal.stats().syncs, before.syncs);
        // An append that may not wait ends the wait; all three share its sync, in order.
        wal.append(b"three".to_vec(), reporting(&tx, 3));
        let order: Vec<u32> = (0..3).map(|_| rx.recv_timeout(WAIT).unwrap()).collect();
        assert_eq!(order, [1, 2, 3]);
        let after = wal.stats();
        assert_eq!(after.records_written - before.records_written, 3);
        assert_eq!(after.syncs - before.syncs, 1, "three appends, one sync");
        wal.close().unwrap();
        let (wal, replayed) = open(dir.path());
        assert_eq!(replayed, [&b"first"[..], b"one", b"two", b"three"]);
        wal.close().unwrap();
    }

    #[test]
    fn a_gathered_append_after_the_window_is_synced_at_once() {
        let dir = tempfile::tempdir().unwrap();
        // Nothing synced yet: no window is open, so nothing waits (an hour, if it did).
        let (wal, _) = open_gathering(dir.path(), Duration::from_secs(3600));
        let (tx, rx) = mpsc::channel();
        wal.append_gathered(b"alone".to_vec(), reporting(&tx, 1));
        assert_eq!(rx.recv_timeout(WAIT).unwrap(), 1);
        wal.close().unwrap();
        // A zero window never waits, even right after a sync.
        let (wal, _) = open_gathering(dir.path(), Duration::ZERO);
        wal.append_sync(b"sync".to_vec()).unwrap();
        wal.append_gathered(b"next".to_vec(), reporting(&tx, 2));
        assert_eq!(rx.recv_timeout(WAIT).unwrap(), 2);
        wal.close().unwrap();
    }

    #[test]
    fn a_polling_writer_takes_each_record_and_close_ends_its_poll() {
        let dir = tempfile::tempdir().unwrap();
        // Once busy, the writer polls its queue for up to an hour before each sleep.
        let poll = PollBeforeSleep::new(Duration::from_secs(3600));
        let (wal, _) =
            Wal::open(dir.path(), WalOptions::default().poll_before_sleep(poll)).unwrap();
        let (tx, rx) = mpsc::channel();
        for i in 0..20 {
            wal.append(vec![i], reporting(&tx, u32::from(i)));
            assert_eq!(rx.recv_timeout(WAIT).unwrap(), u32::from(i));
        }
        // The writer is polling now: closing must end that at once, not in an hour.
        let (closed_tx, closed_rx) = mpsc::channel();
        thread::spawn(move || closed_tx.send(wal.close()).unwrap());
        closed_rx.recv_timeout(WAIT).unwrap().unwrap();
        let (wal, replayed) = open(dir.path());
        assert_eq!(replayed, (0..20).map(|i| vec![i]).collect::<Vec<_>>());
        wal.close().unwrap();
    }

    #[test]
    fn close_ends_a_gathering_wait_and_the_records_are_durable() {
        let dir = tempfile::tempdir().unwrap();
        let (wal, _) = open_gathering(dir.path(), Duration::from_secs(3600));
        wal.append_sync(b"first".to_vec()).unwrap();
        let (tx, rx) = mpsc::channel();
        wal.append_gathered(b"held".to_vec(), reporting(&tx, 1));
        let (closed_tx, closed_rx) = mpsc::channel();
        thread::spawn(move || closed_tx.send(wal.close()).unwrap());
        closed_rx.recv_timeout(WAIT).unwrap().unwrap();
        assert_eq!(rx.recv_timeout(WAIT).unwrap(), 1);
        let (wal, replayed) = open(dir.path());
        assert_eq!(replayed, [&b"first"[..], b"held"]);
        wal.close().unwrap();
    }

    /// Waits until the log has written `bytes` bytes since it was opened.
    fn wait_written(wal: &Wal, bytes: u64) {
        let deadline = Instant::now() + WAIT;
        while wal.stats().bytes_written < bytes {
            assert!(Instant::now() < deadline, "records not written in time");
            thread::sleep(Duration::from_millis(1));
        }
    }

    #[test]
    fn append_or_write_on_an_idle_log_syncs_on_the_callers_thread() {
        let dir = tempfile::tempdir().unwrap();
        let (wal, _) = open(dir.path());
        let start = wal.stats();
        wal.append_unsynced(b"unsynced".to_vec());
        wait_written(&wal, start.bytes_written + frame_len(b"unsynced"));
        // The count of queued commands drops only after its callback ran: wait for that too.
        let deadline = Instant::now() + WAIT;
        while wal.shared.queued.load(Ordering::Acquire) > 0 {
            assert!(Instant::now() < deadline, "the writer kept its command");
            thread::sleep(Duration::from_millis(1));
        }
        let before = wal.stats();
        let ran_on = Arc::new(Mutex::new(None));
        let seen = Arc::clone(&ran_on);
        wal.append_or_write(
            b"here".to_vec(),
            Box::new(move |r| {
                *seen.lock().unwrap() = Some((thread::current().id(), r.is_ok()));
            }),
        );
        // Done before the call returned, on this thread, in one sync (taking the unsynced
        // record along).
        assert_eq!(
            *ran_on.lock().unwrap(),
            Some((thread::current().id(), true))
        );
        let after = wal.stats();
        assert_eq!(after.records_written - before.records_written, 1);
        assert_eq!(after.syncs - before.syncs, 1);
        wal.close().unwrap();
        let (wal, replayed) = open(dir.path());
        assert_eq!(replayed, vec![b"unsynced".to_vec(), b"here".to_vec()]);
        wal.close().unwrap();
    }

    #[test]
    fn after_a_slow_sync_append_or_write_queues_until_a_sync_is_fast() {
        let dir = tempfile::tempdir().unwrap();
        let (wal, _) = open(dir.path());
        let ran_on = |wal: &Wal, record: &[u8]| {
            let (tx, rx) = mpsc::channel();
            wal.append_or_write(
                record.to_vec(),
                Box::new(move |r| {
                    let _ = tx.send((thread::current().name().map(str::to_owned), r.is_ok()));
                }),
            );
            rx.recv_timeout(WAIT).expect("callback in time")
        };
        wal.shared.lock().last_sync = Duration::from_secs(1);
        // The disk looks stalled: the writer thread takes it.
        assert_eq!(ran_on(&wal, b"0"), (Some("starling-wal".to_owned()), true));
        // Its sync (fast on any working disk, but a loaded machine may stall one) lets the
        // caller write again.
        let here = (thread::current().name().map(str::to_owned), true);
        let mut expected = vec![b"0".to_vec()];
        for i in 1..=100u32 {
            let record = i.to_string().into_bytes();
            let ran = ran_on(&wal, &record);
            expected.push(record);
            if ran == here {
                break;
            }
            assert!(i < 100, "100 appends in a row went to the writer thread");
        }
        wal.close().unwrap();
        let (wal, replayed) = open(dir.path());
        assert_eq!(replayed, expected);
        wal.close().unwrap();
    }

    #[test]
    fn appends_written_here_or_queued_keep_their_order_and_callback_order() {
        let dir = tempfile::tempdir().unwrap();
        let (wal, _) = open(dir.path());
        let done_order = Arc::new(Mutex::new(Vec::new()));
        thread::scope(|scope| {
            for t in 0..4u32 {
                let wal = &wal;
                let done_order = &done_order;
                scope.spawn(move || {
                    for i in 0..300u32 {
                        let record = [t.to_le_bytes(), i.to_le_bytes()].concat();
                        let order = Arc::clone(done_order);
                        let done: AppendCallback = Box::new(move |r| {
                            assert!(r.is_ok());
                            order.lock().unwrap().push((t, i));
                        });
                        if i % 2 == 0 {
                            wal.append_or_write(record, done);
                        } else {
                            wal.append(record, done);
                        }
                    }
                });
            }
        });
        wal.close().unwrap();
        let check = |pairs: &mut dyn Iterator<Item = (u32, u32)>, what: &str| {
            let mut next = [0u32; 4];
            for (t, i) in pairs {
                assert_eq!(i, next[t as usize], "{what}: thread {t} out of order");
                next[t as usize] += 1;
            }
            assert_eq!(next, [300; 4], "{what}: records missing");
        };
        check(&mut done_order.lock().unwrap().iter().copied(), "callbacks");
        let (wal, replayed) = open(dir.path());
        check(
            &mut replayed.iter().map(|r| {
                (
                    u32::from_le_bytes(r[0..4].try_into().unwrap()),
                    u32::from_le_bytes(r[4..8].try_into().unwrap()),
                )
            }),
            "log",
        );
        wal.close().unwrap();
    }

    /// Writes 20 records (the last one 50 bytes) to a fresh log and returns them with the
    /// segment's bytes and the offset where the last frame starts.
    fn torn_tail_fixture(dir: &Path) -> (Vec<Vec<u8>>, PathBuf, Vec<u8>, u64) {
        let mut rng = Rng(42);
        let mut written = records(&mut rng, 19, 300);
        written.push(rng.bytes(50));
        let (wal, _) = open(dir);
        append_all(&wal, &written);
        wal.close().unwrap();
        let segments = segments_in(dir);
        assert_eq!(segments.len(), 1);
        let original = records_of(&segments[0], &written);
        let last_start = original.len() as u64 - frame_len(&written[19]);
        (written, segments[0].clone(), original, last_start)
    }

    /// The bytes of `segment` up to the end of `records` (its header and their frames),
    /// checking that only zeros (its reserved space) follow them.
    fn records_of(segment: &Path, records: &[Vec<u8>]) -> Vec<u8> {
        let mut bytes = fs::read(segment).unwrap();
        let end = HEADER_LEN + records.iter().map(|r| frame_len(r) as usize).sum::<usize>();
        assert!(
            bytes[end..] == vec![0; bytes.len() - end][..],
            "not zeros after the records"
        );
        bytes.truncate(end);
        bytes
    }

    /// Reopens after damage, checks the replay and that the segment holds the good records
    /// (`expected_len` bytes) followed only by zeros, then checks that the log still takes
    /// appends that survive another reopen.
    fn check_recovery(dir: &Path, segment: &Path, expected: &[Vec<u8>], expected_len: u64) {
        let (wal, replayed) = open(dir);
        assert!(replayed == expected, "replay is not the intact prefix");
        assert_eq!(records_of(segment, expected).len() as u64, expected_len);
        wal.append_sync(b"after recovery".to_vec()).unwrap();
        wal.close().unwrap();
        let (wal, replayed) = open(dir);
        let mut want = expected.to_vec();
        want.push(b"after recovery".to_vec());
        assert!(
            replayed == want,
            "append after recovery did not survive reopen"
        );
        wal.close().unwrap();
    }

    #[test]
    fn torn_tail_truncated_frame_is_cut_back() {
        let dir = tempfile::tempdir().unwrap();
        let (written, segment, original, last_start) = torn_tail_fixture(dir.path());
        for k in 1..=frame_len(&written[19]) as usize {
            fs::write(&segment, &original[..original.len() - k]).unwrap();
            check_recovery(dir.path(), &segment, &written[..19], last_start);
        }
    }

    #[test]
    fn torn_tail_random_garbage_is_cut_back() {
        let dir = tempfile::tempdir().unwrap();
        let (written, segment, original, _) = torn_tail_fixture(dir.path());
        let mut damaged = original.clone();
        damaged.extend(Rng(7).bytes(100));
        fs::write(&segment, &damaged).unwrap();
        check_recovery(dir.path(), &segment, &written, original.len() as u64);
    }

    #[test]
    fn torn_tail_flipped_payload_byte_is_cut_back() {
        let dir = tempfile::tempdir().unwrap();
        let (written, segment, original, last_start) = torn_tail_fixture(dir.path());
        let mut damaged = original.clone();
        damaged[last_start as usize + FRAME_HEADER_LEN + 20] ^= 0x01;
        fs::write(&segment, &damaged).unwrap();
        check_recovery(dir.path(), &segment, &written[..19], last_start);
    }

    /// Zeros after the last record are the segment's reserved space, not damage.
    #[test]
    fn zeros_after_the_last_record_are_room_for_more() {
        let dir = tempfile::tempdir().unwrap();
        let (written, segment, original, _) = torn_tail_fixture(dir.path());
        let mut damaged = original.clone();
        damaged.extend(std::iter::repeat_n(0u8, 4096));
        fs::write(&segment, &damaged).unwrap();
        check_recovery(dir.path(), &segment, &written, original.len() as u64);
    }

    /// The active segment is reserved at the segment size, written in place, and what was
    /// written comes back after reopening (twice: the reserved space is taken up again).
    #[cfg(target_os = "linux")]
    #[test]
    fn the_active_segment_is_reserved_and_written_in_place() {
        let dir = tempfile::tempdir().unwrap();
        let options = WalOptions::default().segment_size(1 << 20);
        let mut rng = Rng(5);
        let mut written = records(&mut rng, 50, 300);
        let (wal, _) = Wal::open(dir.path(), options.clone()).unwrap();
        append_all(&wal, &written);
        let segment = segments_in(dir.path()).remove(0);
        assert_eq!(fs::metadata(&segment).unwrap().len(), 1 << 20);
        wal.close().unwrap();
        for round in 0..2 {
            let (wal, replayed) = Wal::open(dir.path(), options.clone()).unwrap();
            assert!(replayed == written, "round {round}: replay differs");
            let more = records(&mut rng, 10, 300);
            append_all(&wal, &more);
            written.extend(more);
            wal.close().unwrap();
            assert_eq!(segments_in(dir.path()), vec![segment.clone()]);
            records_of(&segment, &written);
        }
    }

    /// The data regions found in a reserved file cover every byte that is not zero (what
    /// they skip is reserved space or holes), and the search ends.
    #[test]
    fn data_regions_cover_every_written_byte() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("regions");
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&path)
            .unwrap();
        preallocate(&file, 1 << 20);
        for (at, len) in [(0u64, 5000usize), (300_000, 10), (700_001, 70_000)] {
            file.write_all_at(&Rng(at + 1).bytes(len), at).unwrap();
        }
        file.sync_all().unwrap();
        let bytes = fs::read(&path).unwrap();
        let len = bytes.len() as u64;
        let mut covered = vec![false; bytes.len()];
        let mut from = 0;
        let mut regions = 0;
        while let Some((start, end)) = data_region(&file, from, len) {
            assert!(
                start >= from && end > start && end <= len,
                "{from}: {start}..{end}"
            );
            covered[start as usize..end as usize].fill(true);
            from = end;
            regions += 1;
            assert!(regions < 1000, "the search does not end");
        }
        let missed = bytes.iter().zip(&covered).position(|(&b, &c)| b != 0 && !c);
        assert_eq!(missed, None, "a written byte outside every region");
    }

    /// A write torn inside the reserved space (garbage, then the reserved zeros) is cut back
    /// like a torn tail, and so is a damaged last record: what counts for "far from the end"
    /// is the end of what was written, not the reserved file's length.
    #[cfg(target_os = "linux")]
    #[test]
    fn a_torn_write_inside_the_reserved_space_is_cut_back() {
        let dir = tempfile::tempdir().unwrap();
        let (written, segment, original, last_start) = torn_tail_fixture(dir.path());
        // The fixture's log was reserved at the default 64 MiB: damage it in place.
        let reserved = fs::metadata(&segment).unwrap().len();
        assert_eq!(reserved, 64 << 20);
        let file = OpenOptions::new().write(true).open(&segment).unwrap();
        file.write_all_at(&Rng(3).bytes(100), original.len() as u64)
            .unwrap();
        drop(file);
        check_recovery(dir.path(), &segment, &written, original.len() as u64);

        let dir = tempfile::tempdir().unwrap();
        let (written, segment, _, _) = torn_tail_fixture(dir.path());
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(&segment)
            .unwrap();
        let at = last_start + FRAME_HEADER_LEN as u64 + 20;
        let mut byte = [0u8];
        file.read_exact_at(&mut byte, at).unwrap();
        file.write_all_at(&[byte[0] ^ 0x01], at).unwrap();
        drop(file);
        check_recovery(dir.path(), &segment, &written[..19], last_start);
    }

    #[test]
    fn torn_header_of_last_segment_is_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let (written, segment, _, _) = torn_tail_fixture(dir.path());
        // A crash right after creating the next segment, before its header was durable.
        let next = segment_path(dir.path(), 1);
        fs::write(&next, [0u8; 7]).unwrap();
        let (wal, replayed) = open(dir.path());
        assert!(replayed == written);
        assert!(!next.exists());
        assert!(segment.exists());
        wal.close().unwrap();
    }

    fn multi_segment_log(dir: &Path, count: usize) -> Vec<Vec<u8>> {
        let mut rng = Rng(99);
        let written = records(&mut rng, count, 200);
        let (wal, _) = Wal::open(dir, WalOptions::default().segment_size(4096)).unwrap();
        append_all(&wal, &written);
        wal.close().unwrap();
        written
    }

    #[test]
    fn corruption_in_a_non_last_segment_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        multi_segment_log(dir.path(), 200);
        let segments = segments_in(dir.path());
        assert!(segments.len() >= 3);
        let before: Vec<Vec<u8>> = segments.iter().map(|p| fs::read(p).unwrap()).collect();

        // A flipped payload byte in the second frame of the first segment.
        let mut damaged = before[0].clone();
        let first_len = u32::from_le_bytes(damaged[16..20].try_into().unwrap()) as usize;
        let second = HEADER_LEN + FRAME_HEADER_LEN + first_len;
        let second_len = u32::from_le_bytes(damaged[second..second + 4].try_into().unwrap());
        let flip_at = if second_len > 0 {
            second + 8
        } else {
            second + 4
        };
        damaged[flip_at] ^= 0x80;
        fs::write(&segments[0], &damaged).unwrap();
        match Wal::open(dir.path(), WalOptions::default()) {
            Err(WalError::Corrupt { file, offset }) => {
                assert_eq!(file, segments[0]);
                assert_eq!(offset, second as u64);
            }
            other => panic!("expected Corrupt, got {:?}", other.map(|(_, r)| r.len())),
        }
        // Nothing was changed on disk.
        assert_eq!(fs::read(&segments[0]).unwrap(), damaged);
        for (path, bytes) in segments.iter().zip(&before).skip(1) {
            assert_eq!(&fs::read(path).unwrap(), bytes);
        }

        // A bad header in a middle segment is corrupt too.
        fs::write(&segments[0], &before[0]).unwrap();
        let mut bad_header = before[1].clone();
        bad_header[3] ^= 0xff;
        fs::write(&segments[1], &bad_header).unwrap();
        match Wal::open(dir.path(), WalOptions::default()) {
            Err(WalError::Corrupt { file, offset: 0 }) => assert_eq!(file, segments[1]),
            other => panic!("expected Corrupt, got {:?}", other.map(|(_, r)| r.len())),
        }
    }

    #[test]
    fn rotation_with_tiny_segments_keeps_every_record() {
        let dir = tempfile::tempdir().unwrap();
        let written = multi_segment_log(dir.path(), 2000);
        let segments = segments_in(dir.path());
        assert!(segments.len() > 10, "only {} segments", segments.len());
        for path in &segments {
            assert!(fs::metadata(path).unwrap().len() <= 4096);
        }
        let (wal, replayed) =
            Wal::open(dir.path(), WalOptions::default().segment_size(4096)).unwrap();
        assert!(replayed == written);
        wal.close().unwrap();
    }

    #[test]
    fn compaction_replaces_content_and_later_appends_follow() {
        let dir = tempfile::tempdir().unwrap();
        let mut rng = Rng(5);
        let options = WalOptions::default().segment_size(16 * 1024);
        let (wal, _) = Wal::open(dir.path(), options.clone()).unwrap();
        append_all(&wal, &records(&mut rng, 500, 200));
        assert!(segments_in(dir.path()).len() > 1);
        let base = records(&mut rng, 10, 200);
        wal.compact(base.clone()).unwrap();
        assert_eq!(segments_in(dir.path()).len(), 1, "older segments deleted");
        let tail = records(&mut rng, 5, 200);
        append_all(&wal, &tail);
        wal.close().unwrap();

        let (wal, replayed) = Wal::open(dir.path(), options).unwrap();
        assert!(replayed == [base, tail].concat());
        wal.close().unwrap();
    }

    #[test]
    fn crash_before_compaction_rename_keeps_old_content() {
        let dir = tempfile::tempdir().unwrap();
        let written = multi_segment_log(dir.path(), 200);
        let segments = segments_in(dir.path());
        // A complete but unrenamed compaction, and a half-written one.
        let mut base = segment_header(KIND_BASE).to_vec();
        encode_frame(b"new content", &mut base).unwrap();
        let next = segments.len() as u64;
        fs::write(tmp_path(dir.path(), next), &base).unwrap();
        fs::write(tmp_path(dir.path(), next + 1), &base[..10]).unwrap();

        let (wal, replayed) = open(dir.path());
        assert!(replayed == written);
        assert!(tmp_files_in(dir.path()).is_empty(), "temp files deleted");
        wal.close().unwrap();
    }

    #[test]
    fn crash_before_deleting_old_segments_keeps_new_content() {
        let dir = tempfile::tempdir().unwrap();
        let options = WalOptions::default().segment_size(4096);
        multi_segment_log(dir.path(), 200);
        let old: Vec<(PathBuf, Vec<u8>)> = segments_in(dir.path())
            .into_iter()
            .map(|p| {
                let bytes = fs::read(&p).unwrap();
                (p, bytes)
            })
            .collect();
        let (wal, _) = Wal::open(dir.path(), options.clone()).unwrap();
        let base = records(&mut Rng(11), 10, 100);
        wal.compact(base.clone()).unwrap();
        wal.close().unwrap();
        let base_segment = segments_in(dir.path());
        assert_eq!(base_segment.len(), 1);

        // Put the superseded segments back, one with a damaged header: it must not matter.
        for (index, (path, bytes)) in old.iter().enumerate() {
            let mut bytes = bytes.clone();
            if index == 1 {
                bytes[0] ^= 0xff;
            }
            fs::write(path, bytes).unwrap();
        }
        let (wal, replayed) = Wal::open(dir.path(), options).unwrap();
        assert!(replayed == base);
        assert_eq!(
            segments_in(dir.path()),
            base_segment,
            "superseded segments deleted"
        );
        wal.close().unwrap();
    }

    #[test]
    fn second_open_of_a_locked_directory_fails() {
        let dir = tempfile::tempdir().unwrap();
        let (wal, _) = open(dir.path());
        match Wal::open(dir.path(), WalOptions::default()) {
            Err(WalError::Locked { dir: locked }) => assert_eq!(locked, dir.path()),
            other => panic!("expected Locked, got {:?}", other.map(|(_, r)| r.len())),
        }
        wal.close().unwrap();
        let (wal, _) = open(dir.path());
        wal.close().unwrap();
    }

    #[test]
    fn panicking_callback_does_not_stop_the_writer() {
        let dir = tempfile::tempdir().unwrap();
        let (wal, _) = open(dir.path());
        let called = Arc::new(Mutex::new(false));
        let flag = Arc::clone(&called);
        wal.append(
            b"one".to_vec(),
            Box::new(move |_| {
                *flag.lock().unwrap() = true;
                panic!("callback bug");
            }),
        );
        wal.append_sync(b"two".to_vec()).unwrap();
        assert!(*called.lock().unwrap());
        wal.close().unwrap();
        let (wal, replayed) = open(dir.path());
        assert_eq!(replayed, vec![b"one".to_vec(), b"two".to_vec()]);
        wal.close().unwrap();
    }

    #[test]
    fn write_error_fails_the_log_and_later_appends() {
        let dir = tempfile::tempdir().unwrap();
        let (wal, _) = Wal::open(dir.path(), WalOptions::default().segment_size(64)).unwrap();
        wal.append_sync(vec![1; 50]).unwrap();
        // The next append must rotate, and the next segment's name is taken: creating it fails.
        let blocker = segment_path(dir.path(), 1);
        fs::write(&blocker, b"").unwrap();
        let error = wal.append_sync(vec![2; 50]).unwrap_err();
        assert_eq!(error.kind(), io::ErrorKind::AlreadyExists);
        // FAILED: later appends and compactions are refused, close reports it.
        assert!(wal.append_sync(vec![3]).is_err());
        assert!(wal.compact(vec![vec![4]]).is_err());
        assert!(wal.close().is_err());

        // Reopen recovers: the empty blocker is a torn last segment and is deleted.
        let (wal, replayed) = open(dir.path());
        assert_eq!(replayed, vec![vec![1; 50]]);
        assert!(!blocker.exists());
        wal.close().unwrap();
    }

    #[test]
    fn header_classification() {
        assert!(matches!(
            classify_header(&segment_header(KIND_BASE)),
            HeaderState::Valid(KIND_BASE)
        ));
        assert!(matches!(classify_header(&[0; 16]), HeaderState::Torn));
        assert!(matches!(classify_header(b"STRLWAL1"), HeaderState::Torn));
        let mut header = segment_header(KIND_CONTINUATION);
        header[8] = 7;
        assert!(matches!(classify_header(&header), HeaderState::Bad));
        let mut header = segment_header(KIND_CONTINUATION);
        header[15] = 1;
        assert!(matches!(classify_header(&header), HeaderState::Bad));
        // A zero frame header never passes the CRC, so zero fill is never an empty record.
        assert_ne!(frame_crc(&[], 0), 0);
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(32))]

        #[test]
        fn any_record_lengths_round_trip(
            lens in proptest::collection::vec(0usize..3000, 0..40),
        ) {
            let dir = tempfile::tempdir().unwrap();
            let written: Vec<Vec<u8>> =
                lens.iter().enumerate().map(|(i, &len)| vec![i as u8; len]).collect();
            let (wal, _) = open(dir.path());
            append_all(&wal, &written);
            wal.close().unwrap();
            let (wal, replayed) = open(dir.path());
            prop_assert_eq!(replayed, written);
            wal.close().unwrap();
        }

        #[test]
        fn any_truncation_of_the_last_segment_yields_a_prefix(
            lens in proptest::collection::vec(0usize..500, 1..20),
            cut in any::<proptest::sample::Index>(),
        ) {
            let dir = tempfile::tempdir().unwrap();
            let written: Vec<Vec<u8>> =
                lens.iter().enumerate().map(|(i, &len)| vec![i as u8 ^ 0x5a; len]).collect();
            let (wal, _) = open(dir.path());
            append_all(&wal, &written);
            wal.close().unwrap();
            let segment = segments_in(dir.path()).remove(0);
            let bytes = records_of(&segment, &written);
            let cut = cut.index(bytes.len() + 1);
            fs::write(&segment, &bytes[..cut]).unwrap();

            // The records whose frames end at or before the cut survive.
            let mut end = HEADER_LEN as u64;
            let mut survivors = 0;
            for record in &written {
                end += frame_len(record);
                if end > cut as u64 {
                    break;
                }
                survivors += 1;
            }
            let (wal, replayed) = open(dir.path());
            prop_assert_eq!(&replayed[..], &written[..survivors]);
            wal.close().unwrap();
        }
    }
}
