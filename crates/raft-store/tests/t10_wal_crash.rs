//! Crash test: a child process appends to the write-ahead log and is killed with SIGKILL at a
//! random point, twenty times on the same directory; after each kill the log MUST hold every
//! acknowledged record, as a gap-free, duplicate-free sequence from 0.
//!
//! The child is this same test binary re-executed as
//! `<exe> --exact crash_child --nocapture --test-threads=1` with `WAL_CRASH_DIR=<dir>`. Run
//! standalone (without `WAL_CRASH_DIR`), `crash_child` does nothing and passes.

#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]
use starling_raft_store::{Wal, WalOptions};

use std::io::{self, BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

const DIR_ENV: &str = "WAL_CRASH_DIR";
const ROUNDS: usize = 20;
const MAX_ACKS_PER_ROUND: u64 = 3000;
/// Upper bound on any one wait of the parent.
const ROUND_TIMEOUT: Duration = Duration::from_secs(60);
/// The child stops by itself after this, in case the parent died without killing it.
const CHILD_LIFETIME: Duration = Duration::from_secs(120);
/// Appends the child keeps in flight, so batches (group commit) are exercised.
const CHILD_WINDOW: usize = 32;
/// The child compacts (to the same content) every this many records, so kills also land
/// during compaction.
const COMPACT_EVERY: u64 = 1499;

/// Small segments, so kills also land around rotation.
fn options() -> WalOptions {
    WalOptions::default().segment_size(64 * 1024)
}

/// Record `seq`: its number (u64 LE) and a filler whose length and bytes derive from it.
fn encode(seq: u64) -> Vec<u8> {
    let mut record = seq.to_le_bytes().to_vec();
    record.extend(std::iter::repeat_n(filler_byte(seq), (seq % 97) as usize));
    record
}

fn filler_byte(seq: u64) -> u8 {
    (seq as u8) ^ 0xa5
}

/// The sequence number of a well-formed record, or `None`.
fn decode(record: &[u8]) -> Option<u64> {
    let (number, filler) = record.split_first_chunk::<8>()?;
    let seq = u64::from_le_bytes(*number);
    let well_formed =
        filler.len() as u64 == seq % 97 && filler.iter().all(|&b| b == filler_byte(seq));
    well_formed.then_some(seq)
}

/// Checks the log is records 0, 1, 2, ... and returns how many there are.
fn check_contiguous(records: &[Vec<u8>], context: &str) -> u64 {
    for (index, record) in records.iter().enumerate() {
        match decode(record) {
            Some(seq) => assert_eq!(
                seq, index as u64,
                "{context}: record at position {index} has sequence {seq} (gap or duplicate)"
            ),
            None => panic!("{context}: record at position {index} is malformed: {record:?}"),
        }
    }
    records.len() as u64
}

/// The child role. A no-op unless `WAL_CRASH_DIR` is set (see the module docs).
#[test]
fn crash_child() {
    let Some(dir) = std::env::var_os(DIR_ENV) else {
        return;
    };
    let (wal, mut all) = Wal::open(Path::new(&dir), options()).expect("child: open");
    let mut next = check_contiguous(&all, "child replay");
    let (tx, rx) = mpsc::channel::<(u64, io::Result<()>)>();
    let stdout = io::stdout();
    let mut out = stdout.lock();
    let deadline = Instant::now() + CHILD_LIFETIME;
    let mut in_flight = 0;
    while Instant::now() < deadline {
        while in_flight < CHILD_WINDOW {
            let record = encode(next);
            all.push(record.clone());
            let tx = tx.clone();
            let seq = next;
            wal.append(
                record,
                Box::new(move |result| {
                    let _ = tx.send((seq, result));
                }),
            );
            next += 1;
            in_flight += 1;
            if next.is_multiple_of(COMPACT_EVERY) {
                // Same content, rewritten as a BASE segment: ordered after the appends above.
                wal.compact(all.clone()).expect("child: compact");
            }
        }
        let (seq, result) = rx
            .recv_timeout(ROUND_TIMEOUT)
            .expect("child: append callback in time");
        result.expect("child: append failed");
        // The parent reads these lines; "ACK " may follow libtest's own "test crash_child ... ".
        writeln!(out, "ACK {seq}")
            .and_then(|()| out.flush())
            .expect("child: write ack");
        in_flight -= 1;
    }
}

/// xorshift64 with a fixed seed, so a failing round reproduces.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

fn parse_ack(line: &str) -> Option<u64> {
    let at = line.find("ACK ")?;
    line[at + 4..].trim().parse().ok()
}

#[test]
fn crash_kill9_twenty_times() {
    if std::env::var_os(DIR_ENV).is_some() {
        return;
    }
    let dir = tempfile::tempdir().expect("temp dir");
    let exe = std::env::current_exe().expect("current test binary");
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let mut max_acked: Option<u64> = None;

    for round in 0..ROUNDS {
        let target = 1 + rng.next() % MAX_ACKS_PER_ROUND;
        let mut child = Command::new(&exe)
            .args(["--exact", "crash_child", "--nocapture", "--test-threads=1"])
            .env(DIR_ENV, dir.path())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn child");
        let stdout = child.stdout.take().expect("child stdout is piped");
        let (tx, rx) = mpsc::channel();
        let reader = thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if let Some(seq) = parse_ack(&line)
                    && tx.send(seq).is_err()
                {
                    break;
                }
            }
        });

        let started = Instant::now();
        let mut acks = 0;
        let mut last_ack: Option<u64> = None;
        let mut record_ack = |seq: u64, last_ack: &mut Option<u64>| {
            if let Some(previous) = *last_ack {
                assert_eq!(seq, previous + 1, "round {round}: acks out of order");
            }
            *last_ack = Some(seq);
            max_acked = max_acked.max(Some(seq));
        };
        while acks < target {
            let remaining = ROUND_TIMEOUT.saturating_sub(started.elapsed());
            match rx.recv_timeout(remaining) {
                Ok(seq) => {
                    record_ack(seq, &mut last_ack);
                    acks += 1;
                }
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    let _ = child.kill();
                    let _ = child.wait();
                    panic!("round {round}: only {acks} of {target} acks within {ROUND_TIMEOUT:?}");
                }
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    let status = child.wait();
                    panic!("round {round}: child exited after {acks} of {target} acks: {status:?}");
                }
            }
        }
        child.kill().expect("SIGKILL the child");
        child.wait().expect("reap the child");
        // The pipe is closed once the child is dead, so the reader ends; acks printed between
        // reaching the target and the kill count too.
        reader.join().expect("stdout reader");
        for seq in rx.try_iter() {
            record_ack(seq, &mut last_ack);
        }

        let (wal, records) = Wal::open(dir.path(), options()).expect("parent: reopen after kill");
        let len = check_contiguous(&records, &format!("round {round}"));
        if let Some(max) = max_acked {
            assert!(
                len > max,
                "round {round}: acknowledged record {max} lost; the log holds 0..{len}"
            );
        }
        wal.close().expect("parent: close");
        eprintln!(
            "round {round}: target {target} acks, last ack {last_ack:?}, log holds {len} records"
        );
    }
}
