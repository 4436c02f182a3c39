//! Greedy and top-k selection over rows of logits on the GPU (`sample.cu`), in the CPU sampler's
//! order: descending by value, ties to the lower index, NaN ranked as -inf. Only the winners come
//! back to the host.

use cudarc::driver::{CudaView, LaunchConfig, PushKernelArg};

use super::{CudaError, Gpu, KernelModule};

pub const MODULE: KernelModule = KernelModule {
    name: "sample",
    source: include_str!("../../cuda/sample.cu"),
    functions: &["argmax_rows", "topk_chunk"],
};

const ARGMAX_THREADS: u32 = 1024;
const TOPK_THREADS: u32 = 256;
/// Candidates one top-k block ranks (`TOPK_CHUNK` in `sample.cu`).
const TOPK_CHUNK: usize = 256 * 16;
/// The largest k [`topk_rows`] takes.
pub const MAX_TOP_K: usize = 64;

fn check(
    what: &str,
    logits: &CudaView<'_, f32>,
    rows: usize,
    vocab: usize,
) -> Result<(), CudaError> {
    if logits.len() < rows * vocab || i32::try_from(vocab).is_err() {
        return Err(CudaError::Shape(format!(
            "{what}: {rows} rows of {vocab} logits, the view has {}",
            logits.len()
        )));
    }
    if rows > 65_535 {
        return Err(CudaError::Shape(format!(
            "{what}: {rows} rows exceed one launch"
        )));
    }
    Ok(())
}

/// Index of the largest logit of each row; ties go to the lowest index and a row with nothing
/// above -inf gives 0, like the CPU sampler's `argmax`.
pub fn argmax_rows(
    gpu: &Gpu,
    logits: &CudaView<'_, f32>,
    rows: usize,
    vocab: usize,
) -> Result<Vec<u32>, CudaError> {
    check("argmax_rows", logits, rows, vocab)?;
    if rows == 0 || vocab == 0 {
        return Ok(vec![0; rows]);
    }
    let s = gpu.stream();
    let mut out = s.alloc_zeros::<u32>(rows)?;
    let v = vocab as i32;
    let cfg = LaunchConfig {
        grid_dim: (rows as u32, 1, 1),
        block_dim: (ARGMAX_THREADS, 1, 1),
        shared_mem_bytes: 0,
    };
    let f = gpu.function(MODULE.name, "argmax_rows")?;
    // SAFETY: (logits, out, vocab) as the kernel; block r reads logits[r·vocab .. (r+1)·vocab]
    // (rows·vocab ≤ len checked) and writes out[r].
    unsafe {
        s.launch_builder(f)
            .arg(logits)
            .arg(&mut out)
            .arg(&v)
            .launch(cfg)?;
    }
    Ok(s.clone_dtoh(&out)?)
}

/// The `k` best `(index, logit)` of each row, descending by value, ties to the lower index (NaN
/// ranks as -inf but is returned as NaN). `1 ≤ k ≤ 64`; a row has `min(k, vocab)` entries.
pub fn topk_rows(
    gpu: &Gpu,
    logits: &CudaView<'_, f32>,
    rows: usize,
    vocab: usize,
    k: usize,
) -> Result<Vec<Vec<(u32, f32)>>, CudaError> {
    check("topk_rows", logits, rows, vocab)?;
    if !(1..=MAX_TOP_K).contains(&k) {
        return Err(CudaError::Shape(format!(
            "topk_rows: k = {k}, must be 1..={MAX_TOP_K}"
        )));
    }
    if rows == 0 || vocab == 0 {
        return Ok(vec![Vec::new(); rows]);
    }
    let s = gpu.stream();
    let f = gpu.function(MODULE.name, "topk_chunk")?;
    // Passes: each cuts its candidates into chunks of TOPK_CHUNK and keeps k per chunk, until one
    // chunk remains. Candidate lists ping-pong between two buffers of the first pass's size.
    let first = vocab.div_ceil(TOPK_CHUNK) * k;
    let mut bufs = [
        s.alloc_zeros::<u32>(rows * first)?,
        s.alloc_zeros::<u32>(rows * first)?,
    ];
    let mut vals = s.alloc_zeros::<f32>(rows * first)?;
    let (v, ki) = (vocab as i32, k as i32);
    let mut n_in = vocab;
    let mut pass = 0usize;
    loop {
        let chunks = n_in.div_ceil(TOPK_CHUNK);
        let ni = n_in as i32;
        let cfg = LaunchConfig {
            grid_dim: (chunks as u32, rows as u32, 1),
            block_dim: (TOPK_THREADS, 1, 1),
            shared_mem_bytes: 0,
        };
        let (lo, hi) = bufs.split_at_mut(1);
        let (src, dst) = if pass.is_multiple_of(2) {
            (&lo[0], &mut hi[0])
        } else {
            (&hi[0], &mut lo[0])
        };
        // SAFETY: (logits, vocab, cand_in, n_in, idx_out, val_out, k) as the kernel. It reads
        // cand_in[row·n_in + p] for p < n_in (the previous pass wrote rows·n_in entries; the
        // first pass passes a null pointer and reads no list), logits at indices < vocab, and
        // writes rows·chunks·k ≤ rows·first entries of idx_out and val_out.
        unsafe {
            let mut b = s.launch_builder(f);
            b.arg(logits).arg(&v);
            if pass == 0 {
                b.arg(&0u64);
            } else {
                b.arg(src);
            }
            b.arg(&ni).arg(dst).arg(&mut vals).arg(&ki).launch(cfg)?;
        }
        pass += 1;
        if chunks == 1 {
            break;
        }
        n_in = chunks * k;
    }
    // The last pass (index pass - 1) wrote bufs[1] when its index was even.
    let winners = if pass.is_multiple_of(2) {
        &bufs[0]
    } else {
        &bufs[1]
    };
    let idx = s.clone_dtoh(&winners.slice(..rows * k))?;
    let val = s.clone_dtoh(&vals.slice(..rows * k))?;
    let keep = k.min(vocab);
    Ok((0..rows)
        .map(|r| {
            (0..keep)
                .map(|j| (idx[r * k + j], val[r * k + j]))
                .collect()
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cuda::testing::{TestRng as Rng, gpu_or_skip};

    /// The CPU order: descending, NaN as -inf, ties (-0.0 == 0.0 too) to the lower index.
    fn key(v: f32) -> f32 {
        if v.is_nan() { f32::NEG_INFINITY } else { v }
    }

    fn cpu_argmax(row: &[f32]) -> u32 {
        // The daemon sampler's argmax: first strictly greater value wins, NaN never does.
        let (mut bi, mut bv) = (0usize, f32::NEG_INFINITY);
        for (i, &v) in row.iter().enumerate() {
            if v > bv {
                bv = v;
                bi = i;
            }
        }
        bi as u32
    }

    fn cpu_topk(row: &[f32], k: usize) -> Vec<(u32, f32)> {
        let mut c: Vec<(u32, f32)> = row
            .iter()
            .enumerate()
            .map(|(i, &v)| (i as u32, v))
            .collect();
        c.sort_by(|a, b| key(b.1).partial_cmp(&key(a.1)).unwrap().then(a.0.cmp(&b.0)));
        c.truncate(k);
        c
    }

    /// Rows with ties, duplicates of the maximum, NaN, ±inf, -0.0 / 0.0, all -inf.
    fn test_rows(rows: usize, vocab: usize, rng: &mut Rng) -> Vec<f32> {
        let mut l = vec![0f32; rows * vocab];
        for r in 0..rows {
            let row = &mut l[r * vocab..(r + 1) * vocab];
            match r % 6 {
                // Coarse values: many exact ties.
                0 => row.iter_mut().for_each(|v| *v = (rng.f32() * 8.0).round()),
                1 => row.iter_mut().for_each(|v| *v = rng.f32() * 30.0),
                2 => {
                    row.iter_mut().for_each(|v| *v = rng.f32());
                    for _ in 0..5 {
                        let i = (rng.next_u64() % vocab as u64) as usize;
                        row[i] = f32::NAN;
                    }
                    let i = (rng.next_u64() % vocab as u64) as usize;
                    row[i] = 3.0;
                    let j = (rng.next_u64() % vocab as u64) as usize;
                    row[j] = 3.0;
                }
                3 => row.iter_mut().for_each(|v| *v = f32::NEG_INFINITY),
                4 => {
                    row.iter_mut()
                        .enumerate()
                        .for_each(|(i, v)| *v = if i % 2 == 0 { -0.0 } else { 0.0 });
                    let i = (rng.next_u64() % vocab as u64) as usize;
                    row[i] = f32::NAN;
                }
                _ => {
                    row.iter_mut().for_each(|v| *v = rng.f32() - 100.0);
                    row[vocab - 1] = f32::INFINITY;
                    if vocab > 2 {
                        row[vocab / 2] = f32::INFINITY;
                    }
                }
            }
        }
        l
    }

    #[test]
    fn argmax_rows_matches_the_cpu_including_ties_nan_and_inf() {
        let Some(gpu) =
            gpu_or_skip("sample::argmax_rows_matches_the_cpu_including_ties_nan_and_inf")
        else {
            return;
        };
        let s = gpu.stream();
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
        for (rows, vocab) in [(6, 1), (12, 7), (6, 1000), (7, 32_000), (6, 128_256)] {
            let l = test_rows(rows, vocab, &mut rng);
            let dl = s.clone_htod(&l).unwrap();
            let got = argmax_rows(&gpu, &dl.as_view(), rows, vocab).unwrap();
            for r in 0..rows {
                assert_eq!(
                    got[r],
                    cpu_argmax(&l[r * vocab..(r + 1) * vocab]),
                    "rows={rows} vocab={vocab} row {r}"
                );
            }
        }
    }

    #[test]
    fn topk_rows_matches_a_full_sort() {
        let Some(gpu) = gpu_or_skip("sample::topk_rows_matches_a_full_sort") else {
            return;
        };
        let s = gpu.stream();
        let mut rng = Rng(0x0123_4567_89ab_cdef);
        // One chunk, several chunks, several passes (152k / 4096 · 64 > 4096 candidates).
        for (rows, vocab, k) in [
            (6, 5, 8),
            (6, 1000, 1),
            (6, 4096, 64),
            (7, 10_000, 40),
            (6, 152_064, 64),
            (6, 300_000, 50),
        ] {
            let l = test_rows(rows, vocab, &mut rng);
            let dl = s.clone_htod(&l).unwrap();
            let got = topk_rows(&gpu, &dl.as_view(), rows, vocab, k).unwrap();
            assert_eq!(got.len(), rows);
            for r in 0..rows {
                let want = cpu_topk(&l[r * vocab..(r + 1) * vocab], k);
                let g = &got[r];
                assert_eq!(
                    g.len(),
                    want.len(),
                    "rows={rows} vocab={vocab} k={k} row {r}"
                );
                for (j, (a, b)) in g.iter().zip(&want).enumerate() {
                    assert!(
                        a.0 == b.0 && a.1.to_bits() == b.1.to_bits(),
                        "vocab={vocab} k={k} row {r} rank {j}: gpu {a:?} cpu {b:?}"
                    );
                }
            }
        }
        let dl = s.clone_htod(&[1.0f32; 4]).unwrap();
        assert!(topk_rows(&gpu, &dl.as_view(), 1, 4, 0).is_err());
        assert!(topk_rows(&gpu, &dl.as_view(), 1, 4, 65).is_err());
        assert!(topk_rows(&gpu, &dl.as_view(), 2, 4, 1).is_err());
    }
}
