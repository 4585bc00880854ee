//! Compact stats snapshots that relays and signaling nodes attach to their directory
//! heartbeats, for the operators' fleet console (`/console` on the directory).
//!
//! Why heartbeats and not scraping: the directory already hears from every relay and node every
//! few seconds, whatever network sits between them; a snapshot riding on that heartbeat is
//! stored in the registry (in memory, or in Redis where every replica reads the same), so each
//! replica shows the same fleet without reaching into relays' metrics ports (which may be bound
//! to a private interface, and which a directory replica should not fetch from addresses anyone
//! with the cluster token can register).
//!
//! Every snapshot holds cumulative counters (since the sender started) and its own uptime, so
//! the reader derives rates from two snapshots on the sender's clock, and is robust to a lost
//! heartbeat. The relay's forwarding latency travels as a [`LatencyHistogram`]: sparse counts
//! over one fixed log-linear bucketing ([`bucket_of`]) that every relay shares, so the directory
//! sums relays exactly into a fleet-wide distribution and subtracts two snapshots of one relay
//! into the distribution of the time between them. Sizes are bounded ([`MAX_LATENCY_BUCKETS`]
//! entries, a few KiB at worst) and [`RelayStatsSnapshot::validate`] /
//! [`NodeStatsSnapshot::validate`] refuse anything malformed with a [`SnapshotError`].

use serde::{Deserialize, Serialize};

/// Sub-buckets per power of two: values are kept to within 1/32 (about 3 %).
pub const SUB_BUCKETS: u64 = 32;
/// log2 of [`SUB_BUCKETS`].
const SUB_BITS: u32 = 5;
/// Number of distinct bucket indices over the whole `u64` range.
pub const BUCKET_INDICES: u32 = (64 - SUB_BITS + 1) * SUB_BUCKETS as u32;
/// Most non-empty buckets one histogram may carry. Latencies from 1 µs to 60 s span 26 powers
/// of two, i.e. at most 26 x 32 = 832 buckets; 1024 leaves room and bounds a heartbeat.
pub const MAX_LATENCY_BUCKETS: usize = 1024;

/// The bucket index of `v`: exact below [`SUB_BUCKETS`], then [`SUB_BUCKETS`] buckets per
/// power of two.
pub fn bucket_of(v: u64) -> u32 {
    if v < SUB_BUCKETS {
        return v as u32;
    }
    let e = 63 - v.leading_zeros(); // >= SUB_BITS
    let shift = e - SUB_BITS;
    let mantissa = (v >> shift) - SUB_BUCKETS; // 0..SUB_BUCKETS
    (e - SUB_BITS + 1) * SUB_BUCKETS as u32 + mantissa as u32
}

/// The smallest and largest value of bucket `index` (`None` past [`BUCKET_INDICES`]).
pub fn bucket_range(index: u32) -> Option<(u64, u64)> {
    if index >= BUCKET_INDICES {
        return None;
    }
    let sub = SUB_BUCKETS as u32;
    if index < sub {
        return Some((u64::from(index), u64::from(index)));
    }
    let shift = index / sub - 1;
    let mantissa = u64::from(index % sub) + SUB_BUCKETS;
    let low = mantissa << shift;
    let high = low + ((1u64 << shift) - 1);
    Some((low, high))
}

/// Why a snapshot was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SnapshotError {
    /// More buckets than [`MAX_LATENCY_BUCKETS`].
    TooManyBuckets(usize),
    /// A bucket index past [`BUCKET_INDICES`].
    BadIndex(u32),
    /// Indices not strictly ascending.
    Unordered(u32),
    /// A bucket with no samples (empty buckets are left out).
    EmptyBucket(u32),
    /// The bucket counts overflow a `u64`.
    Overflow,
    /// `max` does not lie in the highest non-empty bucket.
    BadMax(u64),
}

impl std::fmt::Display for SnapshotError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::TooManyBuckets(n) => write!(
                f,
                "latency histogram has {n} buckets; at most {MAX_LATENCY_BUCKETS}"
            ),
            Self::BadIndex(i) => write!(
                f,
                "latency bucket index {i} out of range (< {BUCKET_INDICES})"
            ),
            Self::Unordered(i) => write!(
                f,
                "latency bucket indices must be strictly ascending (index {i})"
            ),
            Self::EmptyBucket(i) => {
                write!(f, "latency bucket {i} is empty; leave empty buckets out")
            }
            Self::Overflow => f.write_str("latency bucket counts overflow"),
            Self::BadMax(m) => write!(f, "latency max {m} is not in the highest bucket"),
        }
    }
}

impl std::error::Error for SnapshotError {}

/// A latency distribution (µs) as sparse bucket counts over [`bucket_of`]'s bucketing.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LatencyHistogram {
    /// `[bucket index, samples]`, indices strictly ascending, no empty bucket.
    pub buckets: Vec<(u32, u64)>,
    /// Largest sample recorded (0 when empty).
    #[serde(default)]
    pub max: u64,
}

impl LatencyHistogram {
    /// An empty histogram.
    pub fn new() -> Self {
        Self::default()
    }

    /// Build from `(value, count)` pairs in any order (e.g. an HdrHistogram's recorded
    /// values); values over the same bucket add up.
    pub fn from_values(values: impl IntoIterator<Item = (u64, u64)>) -> Self {
        let mut buckets: Vec<(u32, u64)> = Vec::new();
        let mut max = 0;
        for (v, n) in values {
            if n == 0 {
                continue;
            }
            max = max.max(v);
            buckets.push((bucket_of(v), n));
        }
        buckets.sort_unstable_by_key(|b| b.0);
        let mut out: Vec<(u32, u64)> = Vec::with_capacity(buckets.len());
        for (i, n) in buckets {
            match out.last_mut() {
                Some(last) if last.0 == i => last.1 = last.1.saturating_add(n),
                _ => out.push((i, n)),
            }
        }
        Self { buckets: out, max }
    }

    /// Samples in total (saturating).
    pub fn count(&self) -> u64 {
        self.buckets
            .iter()
            .fold(0u64, |a, &(_, n)| a.saturating_add(n))
    }

    /// Check the invariants (see the fields); network input must pass this before use.
    pub fn validate(&self) -> Result<(), SnapshotError> {
        if self.buckets.len() > MAX_LATENCY_BUCKETS {
            return Err(SnapshotError::TooManyBuckets(self.buckets.len()));
        }
        let mut prev: Option<u32> = None;
        let mut total = 0u64;
        for &(i, n) in &self.buckets {
            if i >= BUCKET_INDICES {
                return Err(SnapshotError::BadIndex(i));
            }
            if prev.is_some_and(|p| p >= i) {
                return Err(SnapshotError::Unordered(i));
            }
            if n == 0 {
                return Err(SnapshotError::EmptyBucket(i));
            }
            total = total.checked_add(n).ok_or(SnapshotError::Overflow)?;
            prev = Some(i);
        }
        match self.buckets.last() {
            None if self.max != 0 => Err(SnapshotError::BadMax(self.max)),
            Some(&(i, _)) if bucket_of(self.max) != i => Err(SnapshotError::BadMax(self.max)),
            _ => Ok(()),
        }
    }

    /// Add `other`'s samples (both valid).
    pub fn merge(&mut self, other: &LatencyHistogram) {
        let mut out = Vec::with_capacity(self.buckets.len().max(other.buckets.len()));
        let (mut a, mut b) = (
            self.buckets.iter().peekable(),
            other.buckets.iter().peekable(),
        );
        loop {
            let next = match (a.peek(), b.peek()) {
                (Some(&&(ia, na)), Some(&&(ib, nb))) => {
                    if ia == ib {
                        a.next();
                        b.next();
                        (ia, na.saturating_add(nb))
                    } else if ia < ib {
                        a.next();
                        (ia, na)
                    } else {
                        b.next();
                        (ib, nb)
                    }
                }
                (Some(&&x), None) => {
                    a.next();
                    x
                }
                (None, Some(&&x)) => {
                    b.next();
                    x
                }
                (None, None) => break,
            };
            out.push(next);
        }
        self.buckets = out;
        self.max = self.max.max(other.max);
    }

    /// The samples of `self` that `earlier` (an older snapshot of the same cumulative
    /// histogram) did not have; `None` when `earlier` is not contained in `self` (the sender
    /// restarted). The max of the difference is the upper end of its highest bucket, clipped
    /// to `self.max`.
    pub fn since(&self, earlier: &LatencyHistogram) -> Option<LatencyHistogram> {
        let mut out = Vec::new();
        let mut old = earlier.buckets.iter().peekable();
        for &(i, n) in &self.buckets {
            let mut had = 0;
            if let Some(&&(j, m)) = old.peek() {
                if j < i {
                    return None; // a bucket vanished
                }
                if j == i {
                    had = m;
                    old.next();
                }
            }
            if had > n {
                return None;
            }
            if n > had {
                out.push((i, n - had));
            }
        }
        if old.next().is_some() {
            return None;
        }
        let max = match out.last() {
            Some(&(i, _)) => bucket_range(i).map_or(0, |(_, hi)| hi.min(self.max)),
            None => 0,
        };
        Some(LatencyHistogram { buckets: out, max })
    }

    /// The value at quantile `q` (0..=1): the upper end of the bucket holding that rank,
    /// clipped to the max (as HdrHistogram reports "highest equivalent value"); 0 when empty.
    pub fn value_at_quantile(&self, q: f64) -> u64 {
        let total = self.count();
        if total == 0 {
            return 0;
        }
        let q = if q.is_finite() {
            q.clamp(0.0, 1.0)
        } else {
            1.0
        };
        // Rank of the sample: at least 1, at most total.
        let rank = ((q * total as f64).ceil() as u64).clamp(1, total);
        let mut seen = 0u64;
        for &(i, n) in &self.buckets {
            seen = seen.saturating_add(n);
            if seen >= rank {
                let hi = bucket_range(i).map_or(self.max, |(_, hi)| hi);
                return hi.min(self.max.max(bucket_range(i).map_or(0, |r| r.0)));
            }
        }
        self.max
    }
}

/// What a relay reports with each heartbeat (all counters cumulative since it started).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RelayStatsSnapshot {
    /// Milliseconds since the relay started (the clock rates are measured on).
    pub uptime_ms: u64,
    /// Datagrams forwarded (every direction).
    pub packets_forwarded: u64,
    /// Bytes forwarded (every direction).
    pub bytes_forwarded: u64,
    /// Requests refused for bad or missing credentials.
    pub auth_failures: u64,
    /// Allocations created.
    pub allocations_created: u64,
    /// In-relay forwarding latency (µs), since start.
    pub latency_us: LatencyHistogram,
}

impl RelayStatsSnapshot {
    /// Check a received snapshot.
    pub fn validate(&self) -> Result<(), SnapshotError> {
        self.latency_us.validate()
    }
}

/// What a signaling node reports with each heartbeat (counters cumulative since it started).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeStatsSnapshot {
    /// Milliseconds since the node started (the clock rates are measured on).
    pub uptime_ms: u64,
    /// WebSocket sessions open now.
    pub sessions_open: u64,
    /// Call invitations placed (calls started).
    pub invites: u64,
    /// Errors: frames answered with an error, failed forwards to other nodes, failed message
    /// stores, refused upgrades.
    pub errors: u64,
    /// Failed logins.
    pub login_failures: u64,
}

impl NodeStatsSnapshot {
    /// Check a received snapshot (every field is a plain count: nothing can be malformed
    /// beyond what the JSON parser refuses).
    pub fn validate(&self) -> Result<(), SnapshotError> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_cover_values_in_order_within_a_thirty_second() {
        let mut prev = 0;
        for v in (0..5000u64).chain([59_999_999, 60_000_000, u64::MAX / 3, u64::MAX]) {
            let i = bucket_of(v);
            assert!(i >= prev, "{v}");
            prev = i;
            let (lo, hi) = bucket_range(i).unwrap();
            assert!(lo <= v && v <= hi, "{v} in {lo}..={hi}");
            assert!(
                (hi - lo) as f64 <= lo as f64 / 32.0 + 1.0,
                "{v}: {lo}..={hi}"
            );
        }
        assert_eq!(bucket_of(u64::MAX), BUCKET_INDICES - 1);
        assert_eq!(bucket_range(BUCKET_INDICES), None);
        // Adjacent buckets leave no gap.
        for i in 1..BUCKET_INDICES {
            assert_eq!(
                bucket_range(i - 1).unwrap().1 + 1,
                bucket_range(i).unwrap().0
            );
        }
    }

    #[test]
    fn quantiles_merge_and_difference() {
        let a = LatencyHistogram::from_values((1..=100).map(|v| (v * 10, 1)));
        a.validate().unwrap();
        assert_eq!(a.count(), 100);
        assert_eq!(a.max, 1000);
        let p50 = a.value_at_quantile(0.5);
        assert!((500..=515).contains(&p50), "{p50}");
        assert_eq!(a.value_at_quantile(1.0), 1000);
        assert_eq!(a.value_at_quantile(0.0), 10);
        let b = LatencyHistogram::from_values([(5_000, 100)]);
        let mut m = a.clone();
        m.merge(&b);
        m.validate().unwrap();
        assert_eq!(m.count(), 200);
        assert_eq!(m.max, 5_000);
        assert!(m.value_at_quantile(0.99) >= 4_900);
        // The difference of two cumulative snapshots is what came in between.
        let d = m.since(&a).unwrap();
        d.validate().unwrap();
        assert_eq!(d.count(), 100);
        assert_eq!(d.value_at_quantile(0.5), 5_000);
        assert_eq!(a.since(&a).unwrap().count(), 0);
        // A snapshot that is not a superset (a restart) has no difference.
        assert_eq!(a.since(&m), None);
        assert_eq!(b.since(&a), None);
        assert_eq!(LatencyHistogram::new().value_at_quantile(0.5), 0);
    }

    #[test]
    fn malformed_histograms_are_refused() {
        let h = |buckets: Vec<(u32, u64)>, max| LatencyHistogram { buckets, max };
        assert_eq!(h(vec![], 0).validate(), Ok(()));
        assert_eq!(h(vec![], 5).validate(), Err(SnapshotError::BadMax(5)));
        assert_eq!(
            h(vec![(3, 1), (3, 1)], 3).validate(),
            Err(SnapshotError::Unordered(3))
        );
        assert_eq!(
            h(vec![(4, 1), (3, 1)], 4).validate(),
            Err(SnapshotError::Unordered(3))
        );
        assert_eq!(
            h(vec![(3, 0)], 3).validate(),
            Err(SnapshotError::EmptyBucket(3))
        );
        assert_eq!(
            h(vec![(BUCKET_INDICES, 1)], 3).validate(),
            Err(SnapshotError::BadIndex(BUCKET_INDICES))
        );
        assert_eq!(
            h(vec![(1, u64::MAX), (2, 1)], 2).validate(),
            Err(SnapshotError::Overflow)
        );
        assert_eq!(h(vec![(3, 1)], 9).validate(), Err(SnapshotError::BadMax(9)));
        let many = (0..=MAX_LATENCY_BUCKETS as u32).map(|i| (i, 1)).collect();
        assert_eq!(
            h(many, 0).validate(),
            Err(SnapshotError::TooManyBuckets(MAX_LATENCY_BUCKETS + 1))
        );
        // Garbage JSON is the parser's error, never a panic.
        assert!(
            serde_json::from_str::<RelayStatsSnapshot>(r#"{"latency_us":{"buckets":[[1]]}}"#)
                .is_err()
        );
    }
}
