//! What a volume's views have served: operations, bytes, errors and a
//! latency histogram per kind of request, counted where every frontend
//! meets the engine (so ublk, NBD, copy jobs and replication are counted
//! alike), and the chunks preserved for snapshots.
//!
//! Counters only ever grow (Prometheus counters, `snapblk top` rates); they
//! start at zero when the volume opens. Recording is a few relaxed atomic
//! adds: it must never take a lock or allocate in the I/O path.

use serde::Serialize;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

/// Upper bounds of the latency buckets, in microseconds (a last bucket
/// holds everything slower). From a page-cache hit to a stalled disk.
pub const LATENCY_BOUNDS_US: [u64; 15] = [
    25, 50, 100, 250, 500, 1_000, 2_500, 5_000, 10_000, 25_000, 50_000, 100_000, 250_000,
    1_000_000, 5_000_000,
];

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IoKind {
    Read,
    Write,
    Flush,
    /// Discard and write-zeroes.
    Zero,
}

impl IoKind {
    const ALL: [IoKind; 4] = [IoKind::Read, IoKind::Write, IoKind::Flush, IoKind::Zero];
}

#[derive(Default)]
struct KindCounters {
    ops: AtomicU64,
    bytes: AtomicU64,
    errors: AtomicU64,
    latency_sum_ns: AtomicU64,
    /// Per bucket of [`LATENCY_BOUNDS_US`], plus the one above them all
    /// (not cumulative: the reader sums).
    latency: [AtomicU64; LATENCY_BOUNDS_US.len() + 1],
}

/// A volume's counters; see the module doc.
#[derive(Default)]
pub struct IoStats {
    kinds: [KindCounters; 4],
}

/// The monotonic clock in nanoseconds. Every request reads it twice;
/// `Instant` and `Duration` cost about twice the instructions for the same
/// answer (normalized timespecs, checked and 128-bit arithmetic).
pub fn now_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: fills the timespec we pass; CLOCK_MONOTONIC always exists.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

impl IoStats {
    /// Counts one finished request of `bytes` that began at `started_ns`
    /// ([`now_ns`]).
    pub fn record<T, E>(&self, kind: IoKind, bytes: u64, started_ns: u64, result: &Result<T, E>) {
        let c = &self.kinds[kind as usize];
        let took_ns = now_ns().saturating_sub(started_ns);
        c.ops.fetch_add(1, Relaxed);
        if result.is_ok() {
            c.bytes.fetch_add(bytes, Relaxed);
        } else {
            c.errors.fetch_add(1, Relaxed);
        }
        let us = took_ns / 1000;
        let bucket = LATENCY_BOUNDS_US.partition_point(|&b| b < us);
        c.latency[bucket].fetch_add(1, Relaxed);
        c.latency_sum_ns.fetch_add(took_ns, Relaxed);
    }

    pub fn snapshot(&self) -> IoStatsSnapshot {
        let [read, write, flush, zero] = IoKind::ALL.map(|k| {
            let c = &self.kinds[k as usize];
            KindSnapshot {
                ops: c.ops.load(Relaxed),
                bytes: c.bytes.load(Relaxed),
                errors: c.errors.load(Relaxed),
                latency_sum_s: c.latency_sum_ns.load(Relaxed) as f64 / 1e9,
                latency_buckets: c.latency.iter().map(|b| b.load(Relaxed)).collect(),
            }
        });
        IoStatsSnapshot {
            read,
            write,
            flush,
            zero,
        }
    }
}

/// One kind's counters as read at one moment.
#[derive(Clone, Debug, Default, Serialize)]
pub struct KindSnapshot {
    pub ops: u64,
    /// Bytes of the requests that succeeded (none for flushes).
    pub bytes: u64,
    pub errors: u64,
    pub latency_sum_s: f64,
    /// Requests per bucket: the i-th took at most
    /// `latency_bounds_us[i]`, the last one longer than all of them.
    pub latency_buckets: Vec<u64>,
}

/// [`IoStats`] as `volume info` reports them.
#[derive(Clone, Debug, Default, Serialize)]
pub struct IoStatsSnapshot {
    pub read: KindSnapshot,
    pub write: KindSnapshot,
    pub flush: KindSnapshot,
    /// Discards and write-zeroes.
    pub zero: KindSnapshot,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_request_lands_in_the_bucket_of_its_latency_and_errors_carry_no_bytes() {
        let stats = IoStats::default();
        let ok: Result<(), ()> = Ok(());
        let failed: Result<(), ()> = Err(());
        let long_ago = now_ns() - 30_000_000;
        stats.record(IoKind::Write, 4096, now_ns(), &ok);
        stats.record(IoKind::Write, 4096, long_ago, &failed);
        let s = stats.snapshot();
        assert_eq!((s.write.ops, s.write.bytes, s.write.errors), (2, 4096, 1));
        assert_eq!(s.read.ops, 0);
        // 30 ms is above the 25 ms bound and within the 50 ms one.
        let at_50ms = LATENCY_BOUNDS_US.iter().position(|&b| b == 50_000).unwrap();
        assert_eq!(s.write.latency_buckets[at_50ms], 1);
        assert_eq!(s.write.latency_buckets.iter().sum::<u64>(), 2);
        assert!(s.write.latency_sum_s >= 0.03);
    }
}
