//! The machine a run happened on: cores, load, and how long an fdatasync takes on the disk
//! that holds both systems' data (the floor under every durable write).

use std::fs::File;
use std::io::{Seek, Write};
use std::path::Path;
use std::sync::Barrier;
use std::time::Instant;

/// Facts about the machine, measured at the start of a run.
#[derive(Debug, Clone)]
pub struct Machine {
    /// Logical cores.
    pub cores: usize,
    /// The 1, 5 and 15 minute load averages.
    pub load: String,
    /// fdatasync of a 4 KiB append (the file grows): median and 99th percentile, in
    /// microseconds.
    pub fdatasync_us: (u64, u64),
    /// fdatasync of a 4 KiB write inside a file already written to its full length (no size
    /// or block allocation to record: how Starling's write-ahead log and etcd's preallocated
    /// one sync): median and 99th percentile, in microseconds.
    pub fdatasync_in_place_us: (u64, u64),
    /// fdatasync of a 4 KiB write in place, three at once on the same disk, each in its own
    /// file and thread, started together: what each member's sync costs when a write reaches
    /// the three members of a cluster on this one machine (the leader's and two followers').
    /// Median and 99th percentile over the three, in microseconds.
    pub fdatasync_three_us: (u64, u64),
    /// The kernel.
    pub kernel: String,
}

impl Machine {
    /// Measures the machine; the fdatasync probe writes `samples` appends in `dir`.
    pub fn measure(dir: &Path, samples: usize) -> anyhow::Result<Machine> {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        let load = std::fs::read_to_string("/proc/loadavg")
            .unwrap_or_default()
            .split_whitespace()
            .take(3)
            .collect::<Vec<_>>()
            .join(" ");
        let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
            .unwrap_or_default()
            .trim()
            .to_owned();
        let samples = samples.max(1);
        let block = [0x5au8; 4096];
        let path = dir.join("fdatasync-probe");
        let mut f = File::create(&path)?;
        let fdatasync_us = percentiles(sync_times(&mut f, &block, samples, None)?);
        // The same writes again over the bytes written: the file keeps its size and blocks.
        f.sync_all()?;
        f.rewind()?;
        let fdatasync_in_place_us = percentiles(sync_times(&mut f, &block, samples, None)?);
        drop(f);
        let _ = std::fs::remove_file(&path);
        let fdatasync_three_us = percentiles(three_at_once(dir, &block, samples)?);
        Ok(Machine {
            cores,
            load,
            fdatasync_us,
            fdatasync_in_place_us,
            fdatasync_three_us,
            kernel,
        })
    }

    /// The fastest durable write this disk offers: fdatasync p50 in place, or of an append if
    /// that is faster.
    pub fn fdatasync_floor_us(&self) -> u64 {
        self.fdatasync_in_place_us.0.min(self.fdatasync_us.0)
    }

    /// One markdown paragraph.
    pub fn markdown(&self) -> String {
        format!(
            "Machine: {} cores, Linux {}, load average {} at the start; fdatasync on the data \
             disk of a 4 KiB append: p50 {} µs, p99 {} µs; of a 4 KiB write in place (the file's \
             size and blocks unchanged): p50 {} µs, p99 {} µs; of the same, three at once (each \
             in its own file and thread, as the three members of a cluster on this disk): p50 {} \
             µs, p99 {} µs.\n",
            self.cores,
            self.kernel,
            self.load,
            self.fdatasync_us.0,
            self.fdatasync_us.1,
            self.fdatasync_in_place_us.0,
            self.fdatasync_in_place_us.1,
            self.fdatasync_three_us.0,
            self.fdatasync_three_us.1
        )
    }
}

/// Writes `block` `samples` times at the file's position, timing each `fdatasync` (µs).
/// With `start`, each write first waits for the other threads at the barrier; a thread whose
/// write fails keeps meeting the barrier for the rounds left, so the others do not wait
/// forever, and returns the error at the end.
fn sync_times(
    f: &mut File,
    block: &[u8],
    samples: usize,
    start: Option<&Barrier>,
) -> std::io::Result<Vec<u64>> {
    let mut times = Vec::with_capacity(samples);
    let mut failed = None;
    for _ in 0..samples {
        if let Some(b) = start {
            b.wait();
        }
        if failed.is_some() {
            continue;
        }
        let synced = f.write_all(block).and_then(|()| {
            let t = Instant::now();
            f.sync_data()?;
            Ok(t.elapsed().as_micros() as u64)
        });
        match synced {
            Ok(us) => times.push(us),
            Err(e) if start.is_some() => failed = Some(e),
            Err(e) => return Err(e),
        }
    }
    failed.map_or(Ok(times), Err)
}

/// Three threads, each writing in place in a file of its own, their syncs started together.
fn three_at_once(dir: &Path, block: &[u8], samples: usize) -> std::io::Result<Vec<u64>> {
    let start = Barrier::new(3);
    let mut files = Vec::new();
    for i in 0..3 {
        let path = dir.join(format!("fdatasync-probe-{i}"));
        let mut f = File::create(&path)?;
        for _ in 0..samples {
            f.write_all(block)?;
        }
        f.sync_all()?;
        f.rewind()?;
        files.push((path, f));
    }
    let times = std::thread::scope(|s| {
        let runs: Vec<_> = files
            .iter_mut()
            .map(|(_, f)| s.spawn(|| sync_times(f, block, samples, Some(&start))))
            .collect();
        let mut all = Vec::new();
        for r in runs {
            all.extend(
                r.join()
                    .map_err(|_| std::io::Error::other("probe thread panicked"))??,
            );
        }
        Ok::<_, std::io::Error>(all)
    });
    for (path, _) in &files {
        let _ = std::fs::remove_file(path);
    }
    times
}

/// Median and 99th percentile.
fn percentiles(mut times: Vec<u64>) -> (u64, u64) {
    times.sort_unstable();
    let at = |q: f64| times[((times.len() - 1) as f64 * q) as usize];
    (at(0.5), at(0.99))
}

/// Resident memory of this process (KiB), from /proc (0 when it cannot be read).
pub fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| crate::memory::Resident::parse(&s).ok())
        .map_or(0, |r| r.total)
}
