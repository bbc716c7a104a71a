//! Task logs on the node: the index that gives every line a time, the size cap, and the
//! reader that answers a manager's [`LogsRequest`] (the backlog, then new lines when it
//! follows).
//!
//! A task's process writes straight into `stdout.log` and `stderr.log` (so it keeps writing
//! while the agent restarts). Every [`INDEX_TICK`] the agent appends `(time, length)` to
//! `<stream>.idx` when the file grew; a line's time is the first entry that covers its end.
//! Over [`LOG_CAP`] a file's content moves to `<stream>.log.1` and its index to
//! `<stream>.idx.1`, replacing the older ones.

use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

use starling_api::logs::{INDEX_TICK, LogStream, LogsFrame, LogsRequest, MAX_LINE, TaskLine};
use starling_api::unix_ms;
use tokio::sync::mpsc;

/// Each log file is cut to this size (the older part moves to `<name>.1`).
pub const LOG_CAP: u64 = 8 << 20;

/// Bytes of one index entry: time (ms) and length, both u64 little-endian.
const ENTRY: u64 = 16;

/// At most this many lines go in one frame.
const BATCH: usize = 1000;

/// A follow with nothing new says so this often (so a gone reader is noticed).
const HEARTBEAT: Duration = Duration::from_secs(2);

fn log_path(dir: &Path, s: LogStream) -> PathBuf {
    dir.join(format!("{}.log", s.name()))
}

fn idx_path(dir: &Path, s: LogStream) -> PathBuf {
    dir.join(format!("{}.idx", s.name()))
}

fn older(p: &Path) -> PathBuf {
    let mut s = p.as_os_str().to_owned();
    s.push(".1");
    PathBuf::from(s)
}

/// The last entry of the index at `path`.
fn last_entry(path: &Path) -> Option<(u64, u64)> {
    let mut f = std::fs::File::open(path).ok()?;
    let len = f.metadata().ok()?.len();
    if len < ENTRY {
        return None;
    }
    f.seek(SeekFrom::Start(len - len % ENTRY - ENTRY)).ok()?;
    let mut b = [0u8; ENTRY as usize];
    f.read_exact(&mut b).ok()?;
    Some(split_entry(&b))
}

fn split_entry(b: &[u8]) -> (u64, u64) {
    let mut t = [0u8; 8];
    let mut l = [0u8; 8];
    t.copy_from_slice(&b[..8]);
    l.copy_from_slice(&b[8..16]);
    (u64::from_le_bytes(t), u64::from_le_bytes(l))
}

/// Every entry of the index at `path` (a torn last entry is ignored).
fn entries(path: &Path) -> Vec<(u64, u64)> {
    std::fs::read(path)
        .map(|b| b.chunks_exact(ENTRY as usize).map(split_entry).collect())
        .unwrap_or_default()
}

/// Indexes the task in `dir` at `now` (each stream whose file length changed gets an entry),
/// then cuts a file over [`LOG_CAP`]. Called every [`INDEX_TICK`] for running tasks and once
/// more when a task ended.
pub fn maintain(dir: &Path, now: u64) {
    for s in LogStream::ALL {
        let log = log_path(dir, s);
        let Ok(len) = std::fs::metadata(&log).map(|m| m.len()) else {
            continue;
        };
        let idx = idx_path(dir, s);
        if last_entry(&idx).map(|(_, l)| l) != Some(len) && (len > 0 || last_entry(&idx).is_some())
        {
            let mut e = [0u8; ENTRY as usize];
            e[..8].copy_from_slice(&now.to_le_bytes());
            e[8..].copy_from_slice(&len.to_le_bytes());
            if let Ok(mut f) = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&idx)
            {
                let _ = f.write_all(&e);
            }
        }
        if len > LOG_CAP {
            // The copy holds what the index covers; the process appends, so it writes on at
            // the new end of the emptied file.
            if std::fs::copy(&log, older(&log)).is_ok() {
                let _ = std::fs::rename(&idx, older(&idx));
                if let Ok(f) = std::fs::OpenOptions::new().write(true).open(&log) {
                    let _ = f.set_len(0);
                }
            }
        }
    }
}

/// A log file's bytes from an offset, with the index that times them.
struct Segment {
    data: Vec<u8>,
    /// Offset of `data[0]` in the file.
    start: u64,
    index: Vec<(u64, u64)>,
    /// The time of bytes past the index (the file's modification time).
    mtime: u64,
}

impl Segment {
    fn read(log: &Path, idx: &Path, from: u64) -> Option<Segment> {
        let mut f = std::fs::File::open(log).ok()?;
        let meta = f.metadata().ok()?;
        let mtime = meta
            .modified()
            .ok()
            .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
            .map_or(0, |d| d.as_millis() as u64);
        let from = from.min(meta.len());
        f.seek(SeekFrom::Start(from)).ok()?;
        let mut data = Vec::new();
        f.take(LOG_CAP * 2).read_to_end(&mut data).ok()?;
        Some(Segment {
            data,
            start: from,
            index: entries(idx),
            mtime,
        })
    }

    /// The file length the index covers.
    fn covered(&self) -> u64 {
        self.index.last().map_or(0, |e| e.1)
    }

    /// The time of the byte ending at file offset `end` (exclusive).
    fn time_of(&self, end: u64) -> Option<u64> {
        let i = self.index.partition_point(|e| e.1 < end);
        self.index.get(i).map(|e| e.0)
    }

    /// Its lines, with their time and the file offset after each. With `settled`, only
    /// what the index covers, and a last line without its newline only once the index's
    /// last entry is older than a second (the task wrote nothing since); otherwise
    /// everything, timing the unindexed end by the file's modification time.
    fn lines(&self, settled: bool, now: u64) -> Vec<(u64, u64, String)> {
        let limit = if settled {
            self.covered()
                .saturating_sub(self.start)
                .min(self.data.len() as u64) as usize
        } else {
            self.data.len()
        };
        let quiet = self
            .index
            .last()
            .is_some_and(|e| now.saturating_sub(e.0) >= 1000);
        let mut out = Vec::new();
        let mut at = 0usize;
        while at < limit {
            let rest = &self.data[at..limit];
            let (piece, used, whole) =
                match rest.iter().take(MAX_LINE + 1).position(|b| *b == b'\n') {
                    Some(n) if n <= MAX_LINE => (&rest[..n], n + 1, true),
                    _ if rest.len() > MAX_LINE => (&rest[..MAX_LINE], MAX_LINE, true),
                    _ => (rest, rest.len(), false),
                };
            if !whole && settled && !quiet {
                break;
            }
            let end = self.start + (at + used) as u64;
            let time = self.time_of(end).unwrap_or(self.mtime);
            let text = String::from_utf8_lossy(piece);
            out.push((time, end, text.trim_end_matches('\r').to_owned()));
            at += used;
        }
        out
    }
}

/// Where a follow has got to in one stream of one task.
#[derive(Clone, Copy, Debug, Default)]
struct Cursor {
    /// Offset in the current file up to which lines were sent.
    offset: u64,
}

/// Reads one stream's lines from `cursor` on (through a cut: the rest of `.1` first) and
/// moves the cursor past them.
fn read_on(
    dir: &Path,
    s: LogStream,
    cursor: &mut Cursor,
    settled: bool,
    now: u64,
) -> Vec<(u64, String)> {
    let log = log_path(dir, s);
    let idx = idx_path(dir, s);
    let Ok(len) = std::fs::metadata(&log).map(|m| m.len()) else {
        return Vec::new();
    };
    let mut out = Vec::new();
    if len < cursor.offset {
        // Cut since the last read: what was left moved to `.1`.
        if let Some(seg) = Segment::read(&older(&log), &older(&idx), cursor.offset) {
            out.extend(seg.lines(false, now).into_iter().map(|(t, _, l)| (t, l)));
        }
        cursor.offset = 0;
    }
    if let Some(seg) = Segment::read(&log, &idx, cursor.offset) {
        for (t, end, l) in seg.lines(settled, now) {
            out.push((t, l));
            cursor.offset = end;
        }
    }
    out
}

/// A task's backlog: both streams, the older cut parts first, merged by time (stdout first
/// at the same time), filtered by `since` and cut to the last `tail`; with the cursors a
/// follow goes on from.
fn backlog(dir: &Path, task: &str, req: &LogsRequest, now: u64) -> (Vec<TaskLine>, [Cursor; 2]) {
    let mut cursors = [Cursor::default(); 2];
    let mut lines: Vec<TaskLine> = Vec::new();
    for (i, s) in LogStream::ALL.into_iter().enumerate() {
        let log = log_path(dir, s);
        let idx = idx_path(dir, s);
        if let Some(seg) = Segment::read(&older(&log), &older(&idx), 0) {
            lines.extend(
                seg.lines(false, now)
                    .into_iter()
                    .map(|(t, _, l)| line(task, s, t, l)),
            );
        }
        lines.extend(
            read_on(dir, s, &mut cursors[i], req.follow, now)
                .into_iter()
                .map(|(t, l)| line(task, s, t, l)),
        );
    }
    lines.sort_by_key(|l| (l.time_ms, l.stream));
    if let Some(since) = req.since_ms {
        lines.retain(|l| l.time_ms >= since);
    }
    if let Some(n) = req.tail {
        let n = usize::try_from(n).unwrap_or(usize::MAX);
        let cut = lines.len().saturating_sub(n);
        lines.drain(..cut);
    }
    (lines, cursors)
}

fn line(task: &str, stream: LogStream, time_ms: u64, line: String) -> TaskLine {
    TaskLine {
        task: task.to_owned(),
        stream,
        time_ms,
        line,
    }
}

async fn send_lines(tx: &mpsc::Sender<LogsFrame>, lines: Vec<TaskLine>) -> Result<(), ()> {
    let mut lines = lines.into_iter().peekable();
    while lines.peek().is_some() {
        let batch: Vec<TaskLine> = lines.by_ref().take(BATCH).collect();
        tx.send(LogsFrame::Lines(batch)).await.map_err(|_| ())?;
    }
    Ok(())
}

/// Answers `req` for the tasks under `tasks_dir` into `tx`: each task's backlog (or why it
/// has none), [`LogsFrame::CaughtUp`], then — when it follows — new lines as the index
/// covers them, until `tx` is closed. A task whose directory goes (reaped) is followed no
/// more.
pub async fn stream(tasks_dir: PathBuf, req: LogsRequest, tx: mpsc::Sender<LogsFrame>) {
    let mut followed: Vec<(String, PathBuf, [Cursor; 2])> = Vec::new();
    for task in &req.tasks {
        let dir = tasks_dir.join(task);
        let missing = if !starling_api::logs::valid_task_id(task) {
            Some("not a task id")
        } else if !dir.is_dir() {
            Some("this node has no logs of it (never started here, or reaped)")
        } else {
            None
        };
        if let Some(why) = missing {
            let frame = LogsFrame::Missing {
                task: task.clone(),
                why: why.to_owned(),
            };
            if tx.send(frame).await.is_err() {
                return;
            }
            continue;
        }
        let (d, r, t) = (dir.clone(), req.clone(), task.clone());
        let Ok((lines, cursors)) =
            tokio::task::spawn_blocking(move || backlog(&d, &t, &r, unix_ms())).await
        else {
            return;
        };
        if send_lines(&tx, lines).await.is_err() {
            return;
        }
        followed.push((task.clone(), dir, cursors));
    }
    if tx.send(LogsFrame::CaughtUp).await.is_err() || !req.follow {
        return;
    }
    let mut quiet_since = tokio::time::Instant::now();
    while !followed.is_empty() {
        tokio::time::sleep(INDEX_TICK).await;
        if tx.is_closed() {
            return;
        }
        let moved = std::mem::take(&mut followed);
        let Ok((kept, lines)) = tokio::task::spawn_blocking(move || {
            let now = unix_ms();
            let mut kept = Vec::new();
            let mut lines = Vec::new();
            for (task, dir, mut cursors) in moved {
                if !dir.is_dir() {
                    continue;
                }
                let mut new: Vec<TaskLine> = Vec::new();
                for (i, s) in LogStream::ALL.into_iter().enumerate() {
                    new.extend(
                        read_on(&dir, s, &mut cursors[i], true, now)
                            .into_iter()
                            .map(|(t, l)| line(&task, s, t, l)),
                    );
                }
                new.sort_by_key(|l| (l.time_ms, l.stream));
                lines.extend(new);
                kept.push((task, dir, cursors));
            }
            (kept, lines)
        })
        .await
        else {
            return;
        };
        followed = kept;
        if lines.is_empty() {
            if quiet_since.elapsed() >= HEARTBEAT {
                if tx.send(LogsFrame::Heartbeat).await.is_err() {
                    return;
                }
                quiet_since = tokio::time::Instant::now();
            }
            continue;
        }
        quiet_since = tokio::time::Instant::now();
        if send_lines(&tx, lines).await.is_err() {
            return;
        }
    }
}

/// Serves the logs protocol on one stream: the request, then frames until the reader goes
/// or (without follow) the backlog is sent. A malformed request ends the stream.
pub async fn answer<S>(io: S, tasks_dir: PathBuf)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + 'static,
{
    use starling_api::dispatch::{read_message, write_message};
    let (mut rx, mut wire) = tokio::io::split(io);
    let req = match read_message::<LogsRequest>(&mut rx).await {
        Ok(Some(req)) if req.tasks.len() <= 100_000 => req,
        Ok(_) => return,
        Err(e) => {
            tracing::debug!(error = %e, "bad logs request");
            return;
        }
    };
    let (tx, mut frames) = mpsc::channel::<LogsFrame>(16);
    let producer = tokio::spawn(stream(tasks_dir, req, tx));
    while let Some(frame) = frames.recv().await {
        if write_message(&mut wire, &frame).await.is_err() {
            break;
        }
    }
    drop(frames);
    let _ = producer.await;
    let _ = tokio::io::AsyncWriteExt::shutdown(&mut wire).await;
}

/// Serves every manager that asks for logs on `listener` (the node's [`LOGS_ALPN`]
/// protocol), each request on its own stream.
///
/// [`LOGS_ALPN`]: starling_api::logs::LOGS_ALPN
pub async fn serve(mut listener: starling_transport::Listener, tasks_dir: PathBuf) {
    while let Some(conn) = listener.accept().await {
        let dir = tasks_dir.clone();
        tokio::spawn(async move {
            while let Ok(stream) = conn.accept_stream().await {
                tokio::spawn(answer(stream, dir.clone()));
            }
        });
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn write(dir: &Path, s: LogStream, text: &str) {
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log_path(dir, s))
            .unwrap();
        f.write_all(text.as_bytes()).unwrap();
    }

    fn req(tail: Option<u64>, since_ms: Option<u64>, follow: bool) -> LogsRequest {
        LogsRequest {
            tasks: vec!["t1".into()],
            tail,
            since_ms,
            follow,
        }
    }

    fn texts(lines: &[TaskLine]) -> Vec<(u64, &str)> {
        lines.iter().map(|l| (l.time_ms, l.line.as_str())).collect()
    }

    #[test]
    fn lines_get_the_time_of_the_tick_that_saw_them_and_merge_by_it() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        write(d, LogStream::Stdout, "a\nb\n");
        maintain(d, 1000);
        write(d, LogStream::Stderr, "oops\n");
        write(d, LogStream::Stdout, "c\npartial");
        maintain(d, 2000);
        maintain(d, 2250); // nothing grew: no entry
        assert_eq!(entries(&idx_path(d, LogStream::Stdout)).len(), 2);
        let (lines, _) = backlog(d, "t1", &req(None, None, false), 9000);
        assert_eq!(
            texts(&lines),
            [
                (1000, "a"),
                (1000, "b"),
                (2000, "c"),
                (2000, "partial"),
                (2000, "oops")
            ]
        );
        assert_eq!(lines[4].stream, LogStream::Stderr);
        let (lines, _) = backlog(d, "t1", &req(Some(2), None, false), 9000);
        assert_eq!(texts(&lines), [(2000, "partial"), (2000, "oops")]);
        let (lines, _) = backlog(d, "t1", &req(None, Some(1500), false), 9000);
        assert_eq!(lines.len(), 3);
        // Following, a line without its newline waits while the task may still write it…
        let (lines, mut cursors) = backlog(d, "t1", &req(None, None, true), 2500);
        assert_eq!(lines.len(), 4);
        write(d, LogStream::Stdout, " line\nd\n");
        assert!(read_on(d, LogStream::Stdout, &mut cursors[0], true, 2600).is_empty());
        // …and goes out whole once the index covers it.
        maintain(d, 2750);
        let more = read_on(d, LogStream::Stdout, &mut cursors[0], true, 2800);
        assert_eq!(more, [(2750, "partial line".into()), (2750, "d".into())]);
        assert!(read_on(d, LogStream::Stdout, &mut cursors[0], true, 9000).is_empty());
    }

    #[test]
    fn a_cut_file_keeps_its_lines_and_a_follow_reads_through_the_cut() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let big = "x".repeat(1000) + "\n";
        let n = (LOG_CAP / big.len() as u64) + 1;
        for _ in 0..n {
            write(d, LogStream::Stdout, &big);
        }
        maintain(d, 1000);
        let (lines, mut cursors) = backlog(d, "t1", &req(Some(1), None, true), 5000);
        assert_eq!(lines.len(), 1);
        // The cut happened at that tick: the live file is empty, `.1` has it all.
        assert_eq!(
            std::fs::metadata(log_path(d, LogStream::Stdout))
                .unwrap()
                .len(),
            0
        );
        let (all, _) = backlog(d, "t1", &req(None, None, false), 5000);
        assert_eq!(all.len() as u64, n);
        write(d, LogStream::Stdout, "after\n");
        maintain(d, 2000);
        let more = read_on(d, LogStream::Stdout, &mut cursors[0], true, 5000);
        assert_eq!(more, [(2000, "after".into())]);
        // A follow that stood in the old file when it was cut reads the rest of `.1`.
        let mut c = Cursor {
            offset: LOG_CAP - big.len() as u64 + 1,
        };
        let more = read_on(d, LogStream::Stdout, &mut c, true, 5000);
        assert!(more.len() >= 2, "{}", more.len());
        assert_eq!(more.last().unwrap().1, "after");
    }

    #[test]
    fn long_lines_are_cut_and_bad_bytes_replaced() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let long = "y".repeat(MAX_LINE * 2 + 5);
        write(d, LogStream::Stdout, &format!("{long}\n"));
        std::fs::OpenOptions::new()
            .append(true)
            .open(log_path(d, LogStream::Stdout))
            .unwrap()
            .write_all(b"\xff\xfeok\n")
            .unwrap();
        maintain(d, 10);
        let (lines, _) = backlog(d, "t1", &req(None, None, false), 50);
        let lens: Vec<usize> = lines.iter().map(|l| l.line.len()).collect();
        assert_eq!(lens[..3], [MAX_LINE, MAX_LINE, 5]);
        assert!(lines[3].line.ends_with("ok") && lines[3].line.contains('\u{fffd}'));
    }

    #[tokio::test]
    async fn the_stream_reports_missing_tasks_and_follows_new_lines() {
        let root = tempfile::tempdir().unwrap();
        let d = root.path().join("t1");
        std::fs::create_dir(&d).unwrap();
        write(&d, LogStream::Stdout, "one\n");
        maintain(&d, unix_ms());
        let req = LogsRequest {
            tasks: vec!["t1".into(), "gone".into(), "../etc".into()],
            tail: None,
            since_ms: None,
            follow: true,
        };
        let (tx, mut rx) = mpsc::channel(16);
        let task = tokio::spawn(stream(root.path().to_owned(), req, tx));
        let mut got = Vec::new();
        while let Some(f) = rx.recv().await {
            let done = f == LogsFrame::CaughtUp;
            got.push(f);
            if done {
                break;
            }
        }
        assert!(matches!(&got[0], LogsFrame::Lines(l) if l[0].line == "one"));
        assert!(matches!(&got[1], LogsFrame::Missing { task, .. } if task == "gone"));
        assert!(
            matches!(&got[2], LogsFrame::Missing { task, why } if task == "../etc" && why == "not a task id")
        );
        write(&d, LogStream::Stderr, "two\n");
        maintain(&d, unix_ms());
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            match tokio::time::timeout_at(deadline, rx.recv()).await.unwrap() {
                Some(LogsFrame::Lines(l)) => {
                    assert_eq!(
                        (l[0].line.as_str(), l[0].stream),
                        ("two", LogStream::Stderr)
                    );
                    break;
                }
                Some(LogsFrame::Heartbeat) => {}
                other => panic!("{other:?}"),
            }
        }
        // The reader going ends the follow.
        drop(rx);
        tokio::time::timeout(Duration::from_secs(10), task)
            .await
            .unwrap()
            .unwrap();
    }
}
