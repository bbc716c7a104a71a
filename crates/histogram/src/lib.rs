//! A log-linear histogram of `u64` values: the API of `base2histogram` 0.2 that openraft uses,
//! without lookup tables (see README.md for why this crate replaces the registry one).
//!
//! Values below 8 have a bucket each; above, every power of two `[2^k, 2^(k+1))` is split in
//! four equal buckets, so a bucket's width is at most a quarter of its lower bound and a
//! percentile read from the buckets is within 25 % of the true value (linear interpolation
//! inside the bucket usually does much better). 252 buckets cover the whole `u64` range.
//!
//! ```
//! use base2histogram::Histogram;
//!
//! let mut h = Histogram::<()>::new();
//! for v in 1..=1000 {
//!     h.record(v);
//! }
//! let stats = h.percentile_stats();
//! assert_eq!(stats.samples, 1000);
//! assert!((450..=550).contains(&stats.p50));
//! // Within its bucket (896..=1023): at most a quarter of the value off.
//! assert!((896..=1023).contains(&stats.p99));
//! ```

use std::fmt;
use std::marker::PhantomData;

/// Buckets: 8 exact ones for 0..8, then 4 per power of two from 2^3 to 2^63.
const BUCKETS: usize = 8 + 4 * 61;

/// The bucket a value falls in.
fn bucket_of(value: u64) -> usize {
    if value < 8 {
        return value as usize;
    }
    let msb = 63 - value.leading_zeros() as usize;
    let shift = msb - 2;
    (shift + 1) * 4 + ((value >> shift) & 3) as usize
}

/// The smallest value of a bucket.
fn bucket_low(index: usize) -> u64 {
    if index < 8 {
        return index as u64;
    }
    let shift = index / 4 - 1;
    (4 + (index % 4) as u64) << shift
}

/// The largest value of a bucket.
fn bucket_high(index: usize) -> u64 {
    if index + 1 >= BUCKETS {
        u64::MAX
    } else {
        bucket_low(index + 1) - 1
    }
}

/// Percentiles of a histogram, as openraft's runtime statistics show them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct PercentileStats {
    /// Number of values recorded.
    pub samples: u64,
    /// 0.1th percentile.
    pub p0_1: u64,
    /// 1st percentile.
    pub p1: u64,
    /// 5th percentile.
    pub p5: u64,
    /// 10th percentile.
    pub p10: u64,
    /// Median.
    pub p50: u64,
    /// 90th percentile.
    pub p90: u64,
    /// 99th percentile.
    pub p99: u64,
    /// 99.9th percentile.
    pub p99_9: u64,
}

impl fmt::Display for PercentileStats {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "[samples: {}, P0.1: {}, P1: {}, P5: {}, P10: {}, P50: {}, P90: {}, P99: {}, P99.9: {}]",
            self.samples,
            self.p0_1,
            self.p1,
            self.p5,
            self.p10,
            self.p50,
            self.p90,
            self.p99,
            self.p99_9
        )
    }
}

/// Counts of recorded values per bucket. `T` is kept for API compatibility (the registry
/// crate attaches it to time slots, which openraft does not use); it is never stored.
pub struct Histogram<T = ()> {
    /// Empty until the first value is recorded, then one counter per bucket.
    counts: Vec<u64>,
    total: u64,
    _slot_data: PhantomData<fn() -> T>,
}

impl<T> Histogram<T> {
    /// An empty histogram (no memory until the first value).
    pub fn new() -> Self {
        Self {
            counts: Vec::new(),
            total: 0,
            _slot_data: PhantomData,
        }
    }

    /// Records one value.
    pub fn record(&mut self, value: u64) {
        self.record_n(value, 1);
    }

    /// Records a value `count` times.
    pub fn record_n(&mut self, value: u64, count: u64) {
        if count == 0 {
            return;
        }
        if self.counts.is_empty() {
            self.counts = vec![0; BUCKETS];
        }
        let slot = &mut self.counts[bucket_of(value)];
        *slot = slot.saturating_add(count);
        self.total = self.total.saturating_add(count);
    }

    /// Number of values recorded.
    pub fn total(&self) -> u64 {
        self.total
    }

    /// Forgets every value.
    pub fn clear(&mut self) {
        self.counts.clear();
        self.total = 0;
    }

    /// The value at fraction `p` (0.0–1.0) of the recorded ones, interpolated inside its
    /// bucket; 0 when nothing was recorded.
    pub fn percentile(&self, p: f64) -> u64 {
        if self.total == 0 {
            return 0;
        }
        let p = if p.is_nan() { 0.0 } else { p.clamp(0.0, 1.0) };
        let rank = ((self.total as f64 * p).ceil() as u64).clamp(1, self.total);
        let mut below = 0u64;
        for (index, &count) in self.counts.iter().enumerate() {
            if count == 0 {
                continue;
            }
            if below.saturating_add(count) >= rank {
                let low = bucket_low(index);
                let span = bucket_high(index) - low;
                // The rank's position within this bucket, spread evenly over its values.
                let within = (rank - below) as f64 / count as f64;
                return low + ((span as f64 * within) as u64).min(span);
            }
            below = below.saturating_add(count);
        }
        bucket_high(BUCKETS - 1)
    }

    /// Samples, P0.1, P1, P5, P10, P50, P90, P99 and P99.9.
    pub fn percentile_stats(&self) -> PercentileStats {
        PercentileStats {
            samples: self.total,
            p0_1: self.percentile(0.001),
            p1: self.percentile(0.01),
            p5: self.percentile(0.05),
            p10: self.percentile(0.10),
            p50: self.percentile(0.50),
            p90: self.percentile(0.90),
            p99: self.percentile(0.99),
            p99_9: self.percentile(0.999),
        }
    }

    /// Adds every value of another histogram to this one.
    pub fn merge(&mut self, other: &Histogram<T>) {
        for (index, &count) in other.counts.iter().enumerate() {
            if count > 0 {
                self.record_n(bucket_low(index), count);
            }
        }
    }

    /// The non-empty buckets: `(lowest value, highest value, count)`.
    pub fn buckets(&self) -> impl Iterator<Item = (u64, u64, u64)> + '_ {
        self.counts
            .iter()
            .enumerate()
            .filter(|(_, count)| **count > 0)
            .map(|(index, &count)| (bucket_low(index), bucket_high(index), count))
    }
}

impl<T> Default for Histogram<T> {
    fn default() -> Self {
        Self::new()
    }
}

impl<T> Clone for Histogram<T> {
    fn clone(&self) -> Self {
        Self {
            counts: self.counts.clone(),
            total: self.total,
            _slot_data: PhantomData,
        }
    }
}

impl<T> PartialEq for Histogram<T> {
    fn eq(&self, other: &Self) -> bool {
        // An empty histogram equals one whose counters are allocated but zero.
        self.total == other.total && self.buckets().eq(other.buckets())
    }
}

impl<T> Eq for Histogram<T> {}

impl<T> fmt::Debug for Histogram<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Histogram")
            .field("total", &self.total)
            .field("buckets", &self.buckets().collect::<Vec<_>>())
            .finish()
    }
}

/// Named histograms drawn as text bars, one block per histogram.
pub struct AsciiChart<T = ()> {
    series: Vec<(String, Histogram<T>)>,
}

impl<T> AsciiChart<T> {
    /// An empty chart.
    pub fn new() -> Self {
        Self { series: Vec::new() }
    }

    /// Adds a histogram under a name.
    pub fn add(mut self, name: &str, histogram: Histogram<T>) -> Self {
        self.series.push((name.to_string(), histogram));
        self
    }

    /// Every non-empty bucket of every histogram as a bar.
    pub fn detailed(&self) -> DetailedChart<'_, T> {
        DetailedChart { chart: self }
    }
}

impl<T> Default for AsciiChart<T> {
    fn default() -> Self {
        Self::new()
    }
}

impl<T> fmt::Display for AsciiChart<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.detailed().fmt(f)
    }
}

/// The drawing of an [`AsciiChart`], made when formatted.
pub struct DetailedChart<'a, T> {
    chart: &'a AsciiChart<T>,
}

impl<T> fmt::Display for DetailedChart<'_, T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        const BAR: usize = 40;
        for (name, histogram) in &self.chart.series {
            writeln!(f, "{name} {}", histogram.percentile_stats())?;
            let largest = histogram.buckets().map(|(_, _, c)| c).max().unwrap_or(0);
            for (low, high, count) in histogram.buckets() {
                let width =
                    ((count as u128 * BAR as u128).div_ceil(largest.max(1) as u128)) as usize;
                writeln!(
                    f,
                    "  {low:>20}..={high:<20} {count:>10} {}",
                    "#".repeat(width)
                )?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_tile_the_whole_range_in_order() {
        assert_eq!(bucket_of(0), 0);
        assert_eq!(bucket_of(u64::MAX), BUCKETS - 1);
        for index in 0..BUCKETS {
            let (low, high) = (bucket_low(index), bucket_high(index));
            assert!(low <= high, "bucket {index}");
            assert_eq!(bucket_of(low), index, "low of {index}");
            assert_eq!(bucket_of(high), index, "high of {index}");
            if index + 1 < BUCKETS {
                assert_eq!(high + 1, bucket_low(index + 1));
            }
            // A bucket is at most a quarter of its lower bound wide.
            if low >= 8 {
                assert!(high - low < low / 4, "bucket {index}: {low}..={high}");
            }
        }
    }

    #[test]
    fn percentiles_are_within_their_bucket_of_the_truth() {
        let mut h = Histogram::<()>::new();
        for v in 0..100_000u64 {
            h.record(v * 7);
        }
        for (p, truth) in [(0.5, 350_000.0), (0.9, 630_000.0), (0.999, 699_300.0)] {
            let got = h.percentile(p) as f64;
            // Within the bucket bound: a bucket is at most a quarter of its lower bound wide.
            assert!((got - truth).abs() / truth < 0.25, "p{p}: {got} vs {truth}");
        }
        assert_eq!(h.percentile_stats().samples, 100_000);
    }

    #[test]
    fn empty_and_edge_inputs_do_not_panic() {
        let mut h = Histogram::<()>::new();
        assert_eq!(h.percentile_stats(), PercentileStats::default());
        assert_eq!(h, Histogram::new());
        h.record_n(u64::MAX, u64::MAX);
        h.record(u64::MAX);
        assert_eq!(h.total(), u64::MAX);
        assert_eq!(h.percentile(f64::NAN), h.percentile(0.0));
        assert_eq!(h.percentile(2.0), u64::MAX);
        let mut g = h.clone();
        g.merge(&h);
        assert_eq!(g.total(), u64::MAX);
        h.clear();
        assert_eq!(h, Histogram::new());
        let chart = AsciiChart::new().add("a", g).add("b", Histogram::new());
        assert!(chart.detailed().to_string().contains('#'));
    }
}
