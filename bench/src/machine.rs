//! The machine a run happened on: cores, load, and how long an fdatasync takes on the disk
//! that holds both systems' data (the floor under every durable write).

use std::io::{Seek, Write};
use std::path::Path;
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
        let path = dir.join("fdatasync-probe");
        let block = vec![0x5au8; 4096];
        let probe = |f: &mut std::fs::File| -> std::io::Result<(u64, u64)> {
            let mut times = Vec::with_capacity(samples);
            for _ in 0..samples {
                f.write_all(&block)?;
                let t = Instant::now();
                f.sync_data()?;
                times.push(t.elapsed().as_micros() as u64);
            }
            times.sort_unstable();
            let at = |q: f64| times[((times.len() - 1) as f64 * q) as usize];
            Ok((at(0.5), at(0.99)))
        };
        let mut f = std::fs::File::create(&path)?;
        let fdatasync_us = probe(&mut f)?;
        // The same writes again over the bytes written: the file keeps its size and blocks.
        f.sync_all()?;
        f.rewind()?;
        let fdatasync_in_place_us = probe(&mut f)?;
        drop(f);
        let _ = std::fs::remove_file(&path);
        Ok(Machine {
            cores,
            load,
            fdatasync_us,
            fdatasync_in_place_us,
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
             size and blocks unchanged): p50 {} µs, p99 {} µs.\n",
            self.cores,
            self.kernel,
            self.load,
            self.fdatasync_us.0,
            self.fdatasync_us.1,
            self.fdatasync_in_place_us.0,
            self.fdatasync_in_place_us.1
        )
    }
}

/// Resident memory of this process (KiB), from /proc (0 when it cannot be read).
pub fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| crate::memory::Resident::parse(&s).ok())
        .map_or(0, |r| r.total)
}
