//! Memory read bandwidth: the yardstick of decode, which streams every weight once per step.
//!
//! A buffer much larger than the last-level cache is filled (a non-zero pattern: a zeroed
//! allocation would map every page to the kernel's shared zero page, which sits in cache), then
//! read with sixteen independent accumulators in 256-bit loads where the CPU has them, so the read
//! path, not the adder chain, is the limit. Single-threaded, and with the buffer split across
//! `threads` threads started together behind a barrier. Best of `reps`.

use std::sync::Barrier;
use std::time::Instant;

use edgelora_kernels::cpu::mem::HugeVec;

#[derive(Clone, Copy, Debug)]
pub struct Membw {
    /// GB/s (1e9 bytes) read by one thread.
    pub single_gbs: f64,
    /// GB/s read by `threads` threads together.
    pub all_gbs: f64,
    pub bytes: usize,
}

#[inline(always)]
fn sum_lanes(x: &[u64]) -> u64 {
    let mut acc = [0u64; 16];
    let chunks = x.chunks_exact(16);
    let tail = chunks.remainder();
    for c in chunks {
        for (a, &v) in acc.iter_mut().zip(c) {
            *a = a.wrapping_add(v);
        }
    }
    let mut s = tail.iter().fold(0u64, |s, &v| s.wrapping_add(v));
    for a in acc {
        s = s.wrapping_add(a);
    }
    s
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn sum_avx2(x: &[u64]) -> u64 {
    sum_lanes(x)
}

/// Wrapping sum of `x`, vectorized as wide as the CPU allows.
pub fn read_sum(x: &[u64]) -> u64 {
    #[cfg(target_arch = "x86_64")]
    if is_x86_feature_detected!("avx2") {
        // SAFETY: the CPU has AVX2.
        return unsafe { sum_avx2(x) };
    }
    sum_lanes(x)
}

/// A buffer of `bytes` bytes, every page written, on huge pages where the engine puts its
/// weights there (see `edgelora_kernels::cpu::mem`), so that yardstick and weights stream through
/// the same kind of pages.
pub fn touched_buffer(bytes: usize) -> HugeVec<u64> {
    let mut buf = HugeVec::zeroed((bytes / 8).max(16));
    for (i, v) in buf.iter_mut().enumerate() {
        *v = (i as u64).wrapping_mul(0x9E37_79B9) | 1;
    }
    buf
}

/// Seconds for `threads` threads to read their equal parts of `buf` together.
fn timed_read(buf: &[u64], threads: usize) -> f64 {
    if threads <= 1 {
        let t0 = Instant::now();
        std::hint::black_box(read_sum(std::hint::black_box(buf)));
        return t0.elapsed().as_secs_f64();
    }
    let per = buf.len().div_ceil(threads);
    let start = Barrier::new(threads + 1);
    std::thread::scope(|s| {
        let handles: Vec<_> = buf
            .chunks(per)
            .map(|part| {
                let start = &start;
                s.spawn(move || {
                    start.wait();
                    std::hint::black_box(read_sum(std::hint::black_box(part)))
                })
            })
            .collect();
        start.wait();
        let t0 = Instant::now();
        for h in handles {
            let _ = h.join();
        }
        t0.elapsed().as_secs_f64()
    })
}

/// Measures single- and `threads`-thread read bandwidth over a `bytes` buffer, best of `reps`.
pub fn measure(bytes: usize, threads: usize, reps: usize) -> Membw {
    let buf = touched_buffer(bytes);
    let nbytes = buf.len() * 8;
    let best = |t: usize| {
        // One untimed pass first (TLB, frequency).
        timed_read(&buf, t);
        (0..reps.max(1))
            .map(|_| timed_read(&buf, t))
            .fold(f64::INFINITY, f64::min)
    };
    let single = best(1);
    let all = if threads > 1 { best(threads) } else { single };
    Membw {
        single_gbs: nbytes as f64 / single / 1e9,
        all_gbs: nbytes as f64 / all / 1e9,
        bytes: nbytes,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn read_sum_is_the_wrapping_sum() {
        let v: Vec<u64> = (0..1003u64).map(|i| i * 0x1234_5678_9ABC).collect();
        let want = v.iter().fold(0u64, |s, &x| s.wrapping_add(x));
        assert_eq!(read_sum(&v), want);
    }
}
