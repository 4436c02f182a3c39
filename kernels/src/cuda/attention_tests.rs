//! GPU pool and attention against the CPU pool and attention on identical content.
//!
//! Every test builds the same pages in a CPU [`KvPool`] and a [`GpuKvPool`] (same allocation order,
//! same random keys and values, same seals) and compares. Pool contents must match bit for bit
//! (the device mirrors the CPU's f16 rounding and INT4 quantization exactly). Attention outputs
//! are compared with `|gpu - cpu| <= TOL · (1 + |cpu|)`, `TOL = 1e-4`: both sides read identical
//! decoded keys and values and, under sparsity, select identical pages (bounds are computed in the
//! CPU's order), so the only differences are float summation order (dot products, the softmax sum
//! and accumulator across pages and split-K partials) and `expf` vs Rust's `exp` (about 1 ulp each).
//! Those are ~1e-6 relative on outputs that are convex combinations of values in [-1, 1]; 1e-4
//! leaves two orders of margin while any real indexing or selection error (a wrong page, token, or
//! quantization code) moves outputs by 1e-2 or more.

use super::*;
use crate::cpu::attention::paged_attention_rows as cpu_rows;
use crate::cpu::attention::{Query, paged_attention_reference};
use crate::cpu::kv::tests::Rng;
use crate::cpu::kv::{KvDtype, KvGeometry, KvPool};
use crate::cuda::testing::gpu_or_skip;

const TOL: f32 = 1e-4;
const LAYERS: usize = 2;

struct Built {
    cpu: KvPool,
    gpu: GpuKvPool,
    tables: Vec<Vec<PageId>>,
    lens: Vec<usize>,
}

#[derive(Clone, Copy, PartialEq)]
enum Seal {
    /// As the engine: pages 1.. once two newer pages have begun and they are full.
    Engine,
    /// Every page, the partial last one included (INT4: quantizes partial pages too).
    All,
}

/// Sequences of `lens` tokens with random keys (per-channel offsets, so softmax is neither flat
/// nor one-hot and page bounds differ) and values in both layers, written to both pools.
#[allow(clippy::too_many_arguments)]
fn build(
    gpu: &Gpu,
    dtype: KvDtype,
    ps: usize,
    n_kv: usize,
    d: usize,
    lens: &[usize],
    seal: Seal,
    seed: u64,
) -> Built {
    let geom = KvGeometry {
        page_size: ps,
        n_layers: LAYERS,
        n_kv_heads: n_kv,
        head_dim: d,
    };
    let total_pages: usize = lens.iter().map(|n| n.div_ceil(ps)).sum();
    let n_pages = total_pages + 2;
    let mut cpu = KvPool::new(geom, dtype, n_pages).unwrap();
    let mut gpool = GpuKvPool::new(gpu, geom, dtype, n_pages).unwrap();
    // Sequences do not start at page 0.
    assert_eq!(cpu.alloc(), gpool.alloc());
    let mut tables = Vec::new();
    for &n in lens {
        let t: Vec<PageId> = (0..n.div_ceil(ps))
            .map(|_| {
                let (a, b) = (cpu.alloc().unwrap(), gpool.alloc().unwrap());
                assert_eq!(a, b);
                a
            })
            .collect();
        tables.push(t);
    }
    let w = n_kv * d;
    let mut rng = Rng::new(seed);
    let s = gpu.stream();
    for layer in 0..LAYERS {
        let offsets: Vec<f32> = rng.vec(w).iter().map(|x| x * 2.0).collect();
        let (mut ks, mut vs, mut pages, mut slots) =
            (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        for (t, &n) in tables.iter().zip(lens) {
            for pos in 0..n {
                let k: Vec<f32> = offsets.iter().map(|o| o + 2.0 * rng.f32()).collect();
                let v = rng.vec(w);
                cpu.write(layer, t[pos / ps], pos % ps, &k, &v);
                ks.extend_from_slice(&k);
                vs.extend_from_slice(&v);
                pages.push(t[pos / ps]);
                slots.push(pos % ps);
            }
        }
        // Two calls, so the second writes into pages the first left open.
        let rows = pages.len();
        let dk = s.clone_htod(&ks).unwrap();
        let dv = s.clone_htod(&vs).unwrap();
        let cut = rows / 2;
        for range in [0..cut, cut..rows] {
            gpool
                .write_rows(
                    gpu,
                    layer,
                    &dk.slice(range.start * w..range.end * w),
                    &dv.slice(range.start * w..range.end * w),
                    &pages[range.clone()],
                    &slots[range],
                )
                .unwrap();
        }
        for (t, &n) in tables.iter().zip(lens) {
            for (p, &page) in t.iter().enumerate() {
                let full = (p + 1) * ps <= n;
                let sealed = match seal {
                    Seal::All => true,
                    Seal::Engine => p >= 1 && full && (p + 3) * ps <= n,
                };
                if sealed {
                    cpu.seal(layer, page);
                    gpool.seal(gpu, layer, page).unwrap();
                }
            }
        }
    }
    Built {
        cpu,
        gpu: gpool,
        tables,
        lens: lens.to_vec(),
    }
}

/// Rows: every sequence's last token, plus two prefill rows (earlier positions) for sequences
/// longer than 2 tokens. Returns (table index, n_tokens) per row.
fn rows_for(b: &Built) -> Vec<(usize, usize)> {
    let mut rows = Vec::new();
    for (i, &n) in b.lens.iter().enumerate() {
        rows.push((i, n));
        if n > 2 {
            rows.push((i, n - 1));
            rows.push((i, n / 2 + 1));
        }
    }
    rows
}

#[allow(clippy::too_many_arguments)]
fn run_both(
    gpu: &Gpu,
    b: &Built,
    layer: usize,
    rows: &[(usize, usize)],
    n_heads: usize,
    q: &[f32],
    sparse: Option<&SparseConfig>,
    plan: SplitPlan,
) -> (Vec<f32>, Vec<f32>) {
    let d = b.cpu.geometry().head_dim;
    let scale = 1.0 / (d as f32).sqrt();
    let cq: Vec<Query<'_>> = rows
        .iter()
        .map(|&(t, n)| Query {
            pages: &b.tables[t],
            n_tokens: n,
        })
        .collect();
    let gq: Vec<GpuQuery<'_>> = rows
        .iter()
        .map(|&(t, n)| GpuQuery {
            pages: &b.tables[t],
            n_tokens: n,
        })
        .collect();
    let mut want = vec![f32::NAN; rows.len() * n_heads * d];
    cpu_rows(&b.cpu, layer, &cq, q, n_heads, scale, sparse, &mut want);
    let s = gpu.stream();
    let dq = s.clone_htod(q).unwrap();
    let mut dout = s.clone_htod(&vec![f32::NAN; want.len()]).unwrap();
    paged_attention_rows_with(
        gpu,
        &b.gpu,
        layer,
        &gq,
        &dq.as_view(),
        n_heads,
        scale,
        sparse,
        &mut dout.as_view_mut(),
        plan,
    )
    .unwrap();
    (s.clone_dtoh(&dout).unwrap(), want)
}

/// Largest `|got - want| / (1 + |want|)`; NaN counts as infinite.
fn rel_err(got: &[f32], want: &[f32]) -> f32 {
    assert_eq!(got.len(), want.len());
    got.iter()
        .zip(want)
        .map(|(g, w)| {
            let e = (g - w).abs() / (1.0 + w.abs());
            if e.is_nan() { f32::INFINITY } else { e }
        })
        .fold(0.0, f32::max)
}

fn random_lens(rng: &mut Rng, ps: usize) -> Vec<usize> {
    // One token, a partial page, a few pages, 40 pages (over every sparse budget used) and two
    // random ragged contexts up to ~3000 tokens.
    let mut lens = vec![1, ps + 1, 5 * ps + 3, 40 * ps + 5];
    for _ in 0..2 {
        let x = (rng.f32().abs() * 3000.0) as usize;
        lens.push(x.max(2 * ps + 1) | 1); // odd: never a multiple of the page size
    }
    lens
}

/// (n_kv, n_heads): GQA ratios 1, 3 and 4.
const HEADS: [(usize, usize); 3] = [(2, 2), (2, 6), (2, 8)];

#[test]
fn pool_contents_match_cpu_bitwise() {
    let Some(gpu) = gpu_or_skip("attention::pool_contents_match_cpu_bitwise") else {
        return;
    };
    for dtype in [KvDtype::F32, KvDtype::F16, KvDtype::Int4] {
        for (ps, d, seal) in [
            (4, 64, Seal::All),
            (16, 128, Seal::Engine),
            (16, 64, Seal::All),
        ] {
            let b = build(&gpu, dtype, ps, 3, d, &[1, 7, 70], seal, 11);
            for layer in 0..LAYERS {
                for (t, &n) in b.tables.iter().zip(&b.lens) {
                    for pos in 0..n {
                        let (page, slot) = (t[pos / ps], pos % ps);
                        let (mut k, mut v) = (vec![0.0; 3 * d], vec![0.0; 3 * d]);
                        b.cpu.read_token(layer, page, slot, &mut k, &mut v);
                        let (gk, gv) = b.gpu.read_token(&gpu, layer, page, slot).unwrap();
                        let same = |a: &[f32], b: &[f32]| {
                            a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits())
                        };
                        assert!(
                            same(&k, &gk) && same(&v, &gv),
                            "{dtype} ps={ps} d={d} layer {layer} pos {pos}: token differs"
                        );
                    }
                    for &page in t {
                        assert_eq!(b.cpu.is_sealed(layer, page), b.gpu.is_sealed(layer, page));
                        assert_eq!(b.cpu.filled(layer, page), b.gpu.filled(layer, page));
                        for kvh in 0..3 {
                            let (lo, hi) = b.cpu.key_bounds(layer, page, kvh);
                            let (glo, ghi) = b.gpu.key_bounds(layer, page, kvh).unwrap();
                            assert_eq!((lo, hi), (&glo[..], &ghi[..]), "{dtype} bounds");
                        }
                    }
                }
            }
        }
    }
}

#[test]
fn reopen_and_free_match_cpu() {
    let Some(gpu) = gpu_or_skip("attention::reopen_and_free_match_cpu") else {
        return;
    };
    for dtype in [KvDtype::F16, KvDtype::Int4] {
        let geom = KvGeometry {
            page_size: 4,
            n_layers: 2,
            n_kv_heads: 2,
            head_dim: 64,
        };
        let mut cpu = KvPool::new(geom, dtype, 3).unwrap();
        let mut gp = GpuKvPool::new(&gpu, geom, dtype, 3).unwrap();
        let p = cpu.alloc().unwrap();
        assert_eq!(gp.alloc(), Some(p));
        let mut rng = Rng::new(9);
        let s = gpu.stream();
        let mut write = |cpu: &mut KvPool, gp: &mut GpuKvPool, slot: usize| {
            let (k, v) = (rng.vec(128), rng.vec(128));
            cpu.write(1, p, slot, &k, &v);
            let (dk, dv) = (s.clone_htod(&k).unwrap(), s.clone_htod(&v).unwrap());
            gp.write_rows(&gpu, 1, &dk.as_view(), &dv.as_view(), &[p], &[slot])
                .unwrap();
        };
        for slot in 0..4 {
            write(&mut cpu, &mut gp, slot);
        }
        cpu.seal(1, p);
        gp.seal(&gpu, 1, p).unwrap();
        write(&mut cpu, &mut gp, 2); // reopens an INT4 page
        assert_eq!(cpu.is_sealed(1, p), gp.is_sealed(1, p));
        let check = |cpu: &KvPool, gp: &GpuKvPool, what: &str| {
            for slot in 0..4 {
                let (mut k, mut v) = (vec![0.0; 128], vec![0.0; 128]);
                cpu.read_token(1, p, slot, &mut k, &mut v);
                let (gk, gv) = gp.read_token(&gpu, 1, p, slot).unwrap();
                assert_eq!((k, v), (gk, gv), "{dtype} {what} slot {slot}");
            }
        };
        check(&cpu, &gp, "reopened");
        cpu.seal(1, p);
        gp.seal(&gpu, 1, p).unwrap();
        check(&cpu, &gp, "resealed");
        cpu.free(p);
        gp.free(p);
        assert_eq!(
            (cpu.free_count(), cpu.alloc()),
            (gp.free_count(), gp.alloc())
        );
        check(&cpu, &gp, "freed");
        let (lo, hi) = gp.key_bounds(1, p, 1).unwrap();
        assert!(
            lo.iter().all(|&x| x == f32::INFINITY) && hi.iter().all(|&x| x == f32::NEG_INFINITY)
        );
        assert!(!gp.is_sealed(1, p) && gp.filled(1, p) == 0);
    }
}

#[test]
fn dense_matches_cpu() {
    let Some(gpu) = gpu_or_skip("attention::dense_matches_cpu") else {
        return;
    };
    let mut rng = Rng::new(1);
    let mut case = 0u64;
    for dtype in [KvDtype::F16, KvDtype::Int4] {
        for ps in [4, 16] {
            for d in [64, 128] {
                for (n_kv, n_heads) in HEADS {
                    case += 1;
                    let lens = random_lens(&mut rng, ps);
                    let b = build(&gpu, dtype, ps, n_kv, d, &lens, Seal::Engine, 100 + case);
                    let rows = rows_for(&b);
                    let q = Rng::new(200 + case).vec(rows.len() * n_heads * d);
                    for plan in [None, Some(3)] {
                        let plan = SplitPlan {
                            entries_per_split: plan,
                        };
                        let (got, want) = run_both(&gpu, &b, 1, &rows, n_heads, &q, None, plan);
                        let err = rel_err(&got, &want);
                        assert!(
                            err <= TOL,
                            "{dtype} ps={ps} d={d} heads {n_heads}/{n_kv} lens {lens:?} {plan:?}: err {err}"
                        );
                    }
                }
            }
        }
    }
}

#[test]
fn dense_matches_plain_reference_f32_and_layer0() {
    let Some(gpu) = gpu_or_skip("attention::dense_matches_plain_reference_f32_and_layer0") else {
        return;
    };
    for dtype in [KvDtype::F32, KvDtype::F16, KvDtype::Int4] {
        let (ps, n_kv, n_heads, d) = (16, 3, 12, 64);
        let b = build(&gpu, dtype, ps, n_kv, d, &[37, 300, 1], Seal::All, 5);
        let rows = rows_for(&b);
        let q = Rng::new(6).vec(rows.len() * n_heads * d);
        for layer in 0..LAYERS {
            let (got, _) = run_both(
                &gpu,
                &b,
                layer,
                &rows,
                n_heads,
                &q,
                None,
                SplitPlan::default(),
            );
            let scale = 1.0 / (d as f32).sqrt();
            let w = n_heads * d;
            for (r, &(t, n)) in rows.iter().enumerate() {
                let mut want = vec![0.0; w];
                paged_attention_reference(
                    &b.cpu,
                    layer,
                    &b.tables[t],
                    n,
                    &q[r * w..(r + 1) * w],
                    n_heads,
                    scale,
                    &mut want,
                );
                let err = rel_err(&got[r * w..(r + 1) * w], &want);
                assert!(
                    err <= TOL,
                    "{dtype} layer {layer} row {r} (n={n}): err {err}"
                );
            }
        }
    }
}

#[test]
fn sparse_matches_cpu() {
    let Some(gpu) = gpu_or_skip("attention::sparse_matches_cpu") else {
        return;
    };
    let mut rng = Rng::new(2);
    let mut case = 0u64;
    for dtype in [KvDtype::F16, KvDtype::Int4] {
        for ps in [4, 16] {
            for d in [64, 128] {
                for (n_kv, n_heads) in HEADS {
                    case += 1;
                    let lens = random_lens(&mut rng, ps);
                    let b = build(&gpu, dtype, ps, n_kv, d, &lens, Seal::Engine, 300 + case);
                    let rows = rows_for(&b);
                    let q = Rng::new(400 + case).vec(rows.len() * n_heads * d);
                    for cfg in [
                        SparseConfig {
                            budget_tokens: 6 * ps,
                            recent_pages: 1,
                            group_shared: false,
                        },
                        SparseConfig {
                            budget_tokens: 20 * ps + 1,
                            recent_pages: 2,
                            group_shared: false,
                        },
                        SparseConfig::new(512),
                        SparseConfig::new(6 * ps).shared_by_group(),
                        SparseConfig {
                            budget_tokens: 20 * ps + 1,
                            recent_pages: 2,
                            group_shared: true,
                        },
                    ] {
                        for plan in [None, Some(2)] {
                            let plan = SplitPlan {
                                entries_per_split: plan,
                            };
                            let (got, want) =
                                run_both(&gpu, &b, 1, &rows, n_heads, &q, Some(&cfg), plan);
                            let err = rel_err(&got, &want);
                            assert!(
                                err <= TOL,
                                "{dtype} ps={ps} d={d} heads {n_heads}/{n_kv} lens {lens:?} {cfg:?} {plan:?}: err {err}"
                            );
                        }
                    }
                    // Non-vacuous: a small budget changes the long rows' outputs.
                    let cfg = SparseConfig::new(6 * ps);
                    let plan = SplitPlan::default();
                    let (dense, _) = run_both(&gpu, &b, 1, &rows, n_heads, &q, None, plan);
                    let (sparse, _) = run_both(&gpu, &b, 1, &rows, n_heads, &q, Some(&cfg), plan);
                    assert!(
                        rel_err(&sparse, &dense) > 1e-3,
                        "{dtype}: sparse equals dense"
                    );
                }
            }
        }
    }
}

/// Head dims the other sparse tests do not reach: 256 stages each page's bounds in two chunks, and
/// 66 (not a multiple of 4) by scalar loads with a tail past the last 8 channels; groups of 1, 3
/// and 12 query heads (12: two chain slots of 32 lanes per page).
#[test]
fn sparse_matches_cpu_on_wide_and_odd_head_dims() {
    let Some(gpu) = gpu_or_skip("attention::sparse_matches_cpu_on_wide_and_odd_head_dims") else {
        return;
    };
    let mut rng = Rng::new(41);
    let ps = 16;
    for (case, (d, n_kv, n_heads)) in [(256, 2, 2), (256, 1, 3), (66, 2, 6), (66, 1, 12)]
        .into_iter()
        .enumerate()
    {
        let case = case as u64;
        let lens = random_lens(&mut rng, ps);
        let b = build(
            &gpu,
            KvDtype::F16,
            ps,
            n_kv,
            d,
            &lens,
            Seal::Engine,
            500 + case,
        );
        let rows = rows_for(&b);
        let q = Rng::new(600 + case).vec(rows.len() * n_heads * d);
        for cfg in [
            SparseConfig::new(6 * ps),
            SparseConfig::new(6 * ps).shared_by_group(),
        ] {
            let (got, want) = run_both(
                &gpu,
                &b,
                1,
                &rows,
                n_heads,
                &q,
                Some(&cfg),
                SplitPlan::default(),
            );
            let err = rel_err(&got, &want);
            assert!(
                err <= TOL,
                "d={d} heads {n_heads}/{n_kv} lens {lens:?} {cfg:?}: err {err}"
            );
        }
    }
}

/// Page bounds that tie exactly (identical pages) must be broken toward the lower page, as the CPU.
#[test]
fn sparse_ties_match_cpu() {
    let Some(gpu) = gpu_or_skip("attention::sparse_ties_match_cpu") else {
        return;
    };
    let (ps, n_kv, n_heads, d) = (4, 1, 4, 64);
    let geom = KvGeometry {
        page_size: ps,
        n_layers: 1,
        n_kv_heads: n_kv,
        head_dim: d,
    };
    for dtype in [KvDtype::F16, KvDtype::Int4] {
        let mut cpu = KvPool::new(geom, dtype, 40).unwrap();
        let mut gp = GpuKvPool::new(&gpu, geom, dtype, 40).unwrap();
        let pages: Vec<PageId> = (0..40).map(|_| cpu.alloc().unwrap()).collect();
        for _ in 0..40 {
            gp.alloc().unwrap();
        }
        // Pages come in 4 distinct contents, repeated: many exact ties.
        let mut rng = Rng::new(77);
        let protos: Vec<Vec<Vec<f32>>> = (0..4)
            .map(|_| (0..ps).map(|_| rng.vec(d)).collect())
            .collect();
        let (mut ks, mut vs, mut ps_, mut ss) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        for (i, &p) in pages.iter().enumerate() {
            for (slot, k) in protos[i % 4].iter().enumerate() {
                let v = rng.vec(d);
                cpu.write(0, p, slot, k, &v);
                ks.extend_from_slice(k);
                vs.extend_from_slice(&v);
                ps_.push(p);
                ss.push(slot);
            }
        }
        let s = gpu.stream();
        let (dk, dv) = (s.clone_htod(&ks).unwrap(), s.clone_htod(&vs).unwrap());
        gp.write_rows(&gpu, 0, &dk.as_view(), &dv.as_view(), &ps_, &ss)
            .unwrap();
        for &p in &pages[1..37] {
            cpu.seal(0, p);
            gp.seal(&gpu, 0, p).unwrap();
        }
        let b = Built {
            cpu,
            gpu: gp,
            tables: vec![pages],
            lens: vec![40 * ps - 1],
        };
        let rows = rows_for(&b);
        let q = Rng::new(78).vec(rows.len() * n_heads * d);
        for budget in [2 * ps, 5 * ps, 11 * ps] {
            let cfg = SparseConfig::new(budget);
            let (got, want) = run_both(
                &gpu,
                &b,
                0,
                &rows,
                n_heads,
                &q,
                Some(&cfg),
                SplitPlan::default(),
            );
            let err = rel_err(&got, &want);
            assert!(err <= TOL, "{dtype} budget {budget}: err {err}");
        }
    }
}

/// One long sequence, so the automatic plan splits it over many blocks (split-K), and forced
/// splits of one and seven pages; dense and sparse.
#[test]
fn split_k_long_context_matches_cpu() {
    let Some(gpu) = gpu_or_skip("attention::split_k_long_context_matches_cpu") else {
        return;
    };
    for dtype in [KvDtype::F16, KvDtype::Int4] {
        let (ps, n_kv, n_heads, d) = (16, 2, 8, 128);
        let b = build(&gpu, dtype, ps, n_kv, d, &[3001], Seal::Engine, 31);
        let rows = vec![(0usize, 3001usize)];
        let q = Rng::new(32).vec(n_heads * d);
        for sparse in [
            None,
            Some(SparseConfig::new(1024)),
            Some(SparseConfig::new(1024).shared_by_group()),
        ] {
            for plan in [None, Some(1), Some(7)] {
                let plan = SplitPlan {
                    entries_per_split: plan,
                };
                let (got, want) = run_both(&gpu, &b, 1, &rows, n_heads, &q, sparse.as_ref(), plan);
                let err = rel_err(&got, &want);
                assert!(err <= TOL, "{dtype} {sparse:?} {plan:?}: err {err}");
            }
        }
    }
}

/// A random query for `n_heads` heads of `d` on the device, and an output buffer of its size.
fn device_query(
    gpu: &Gpu,
    n_heads: usize,
    d: usize,
    seed: u64,
) -> (CudaSlice<f32>, CudaSlice<f32>) {
    let s = gpu.stream();
    let q = Rng::new(seed).vec(n_heads * d);
    (
        s.clone_htod(&q).unwrap(),
        s.alloc_zeros(n_heads * d).unwrap(),
    )
}

/// Runs `plan` on layer 1 (scale 0.125) and returns the output.
fn run_planned(
    gpu: &Gpu,
    b: &Built,
    plan: &AttentionPlan,
    dq: &CudaSlice<f32>,
    out: &mut CudaSlice<f32>,
) -> Vec<f32> {
    paged_attention_planned(
        gpu,
        &b.gpu,
        plan,
        1,
        &dq.as_view(),
        0.125,
        &mut out.as_view_mut(),
    )
    .unwrap();
    gpu.stream().clone_dtoh(out).unwrap()
}

/// Split rows leave partials that a second launch merges: runs of one plan, with the output
/// cleared between them, must each write every head (a merge that skipped a head would leave
/// zeros) and agree bit for bit (no order in the merge depends on scheduling), dense, per-head and
/// group-shared sparse.
#[test]
fn split_merge_repeats_bit_for_bit_under_one_plan() {
    let Some(gpu) = gpu_or_skip("attention::split_merge_repeats_bit_for_bit_under_one_plan") else {
        return;
    };
    let (ps, n_kv, n_heads, d) = (16, 2, 8, 128);
    let b = build(&gpu, KvDtype::Int4, ps, n_kv, d, &[3001], Seal::Engine, 35);
    let (dq, mut out) = device_query(&gpu, n_heads, d, 36);
    let s = gpu.stream();
    let queries = [GpuQuery {
        pages: &b.tables[0],
        n_tokens: 3001,
    }];
    let split = SplitPlan {
        entries_per_split: Some(3),
    };
    for sparse in [
        None,
        Some(SparseConfig::new(1024)),
        Some(SparseConfig::new(1024).shared_by_group()),
    ] {
        let plan =
            attention_plan_with(&gpu, &b.gpu, &queries, n_heads, sparse.as_ref(), split).unwrap();
        assert!(plan.work_items() > 1, "the row is split");
        let mut first: Option<Vec<f32>> = None;
        for _ in 0..4 {
            s.memset_zeros(&mut out).unwrap();
            let got = run_planned(&gpu, &b, &plan, &dq, &mut out);
            assert!(
                got.chunks(d).all(|h| h.iter().any(|&x| x != 0.0)),
                "{sparse:?}: a head was not written"
            );
            match &first {
                None => first = Some(got),
                Some(f) => assert!(
                    f.iter().zip(&got).all(|(a, b)| a.to_bits() == b.to_bits()),
                    "{sparse:?}: runs differ"
                ),
            }
        }
    }
}

/// A shared selection reads exactly the budget per KV head; per-head selection reads the union of
/// the group's pages (more, on random queries).
#[test]
fn group_shared_lists_hold_exactly_the_budget() {
    let Some(gpu) = gpu_or_skip("attention::group_shared_lists_hold_exactly_the_budget") else {
        return;
    };
    let (ps, n_kv, n_heads, d) = (16, 2, 8, 64);
    let b = build(&gpu, KvDtype::Int4, ps, n_kv, d, &[4000], Seal::Engine, 33);
    let (dq, mut out) = device_query(&gpu, n_heads, d, 34);
    let s = gpu.stream();
    let queries = [GpuQuery {
        pages: &b.tables[0],
        n_tokens: 4000,
    }];
    let budget = SparseConfig::new(512);
    let pages = budget.budget_pages(ps);
    let mut counts = Vec::new();
    for cfg in [budget.shared_by_group(), budget] {
        let plan = attention_plan(&gpu, &b.gpu, &queries, n_heads, Some(&cfg)).unwrap();
        run_planned(&gpu, &b, &plan, &dq, &mut out);
        counts.push(s.clone_dtoh(&plan.counts).unwrap());
    }
    assert_eq!(
        counts[0],
        vec![pages as i32; n_kv],
        "shared: the budget per kv head"
    );
    assert!(
        counts[1].iter().all(|&c| c as usize > pages),
        "per head: the union of 4 heads' pages, got {:?}",
        counts[1]
    );
}

#[test]
fn empty_context_and_shape_errors() {
    let Some(gpu) = gpu_or_skip("attention::empty_context_and_shape_errors") else {
        return;
    };
    let b = build(&gpu, KvDtype::Int4, 4, 2, 64, &[9], Seal::All, 3);
    let (n_heads, d) = (4, 64);
    let s = gpu.stream();
    let q = s.clone_htod(&Rng::new(4).vec(2 * n_heads * d)).unwrap();
    let mut out = s.clone_htod(&vec![f32::NAN; 2 * n_heads * d]).unwrap();
    let queries = [
        GpuQuery {
            pages: &[],
            n_tokens: 0,
        },
        GpuQuery {
            pages: &b.tables[0],
            n_tokens: 0,
        },
    ];
    paged_attention_rows(
        &gpu,
        &b.gpu,
        1,
        &queries,
        &q.as_view(),
        n_heads,
        0.125,
        Some(&SparseConfig::new(4)),
        &mut out.as_view_mut(),
    )
    .unwrap();
    assert!(s.clone_dtoh(&out).unwrap().iter().all(|&x| x == 0.0));
    let bad = |queries: &[GpuQuery<'_>], heads: usize, layer: usize| {
        let mut out = s.alloc_zeros::<f32>(2 * n_heads * d).unwrap();
        paged_attention_rows(
            &gpu,
            &b.gpu,
            layer,
            queries,
            &q.as_view(),
            heads,
            0.125,
            None,
            &mut out.as_view_mut(),
        )
    };
    let long = [GpuQuery {
        pages: &b.tables[0],
        n_tokens: 13, // 4 pages needed, table has 3
    }; 2];
    assert!(matches!(bad(&long, n_heads, 1), Err(CudaError::Shape(_))));
    let ok = [GpuQuery {
        pages: &b.tables[0],
        n_tokens: 9,
    }; 2];
    assert!(
        matches!(bad(&ok, 3, 1), Err(CudaError::Shape(_))),
        "3 heads over 2 kv heads"
    );
    assert!(
        matches!(bad(&ok, n_heads, 2), Err(CudaError::Shape(_))),
        "layer 2 of 2"
    );
    assert!(
        matches!(bad(&ok[..1], n_heads, 1), Err(CudaError::Shape(_))),
        "q rows"
    );
    bad(&ok, n_heads, 1).unwrap();
    let far = [999 as PageId, 1, 2];
    let oob = [GpuQuery {
        pages: &far,
        n_tokens: 9,
    }; 2];
    assert!(
        matches!(bad(&oob, n_heads, 1), Err(CudaError::Shape(_))),
        "page id"
    );
}

/// Prints device time per call for one sequence at 4K and 32K context (INT4, 16-token pages, 8 KV
/// heads × 4 query heads each, head_dim 128, one layer), dense and sparse with a 2K budget. Run
/// with `--nocapture` to see the numbers.
#[test]
fn bench_attention_one_sequence() {
    let Some(gpu) = gpu_or_skip("attention::bench_attention_one_sequence") else {
        return;
    };
    let (ps, n_kv, n_heads, d) = (16, 8, 32, 128);
    let geom = KvGeometry {
        page_size: ps,
        n_layers: 1,
        n_kv_heads: n_kv,
        head_dim: d,
    };
    let w = n_kv * d;
    let s = gpu.stream();
    // One block of random rows, written over and over (content does not matter for timing).
    let block = 4096;
    let mut rng = Rng::new(12);
    let offsets: Vec<f32> = rng.vec(w).iter().map(|x| x * 2.0).collect();
    let ks: Vec<f32> = (0..block * w)
        .map(|i| offsets[i % w] + 2.0 * rng.f32())
        .collect();
    let dk = s.clone_htod(&ks).unwrap();
    let dv = s.clone_htod(&rng.vec(block * w)).unwrap();
    for ctx in [4096usize, 32768] {
        let n_pages = ctx / ps;
        let mut pool = GpuKvPool::new(&gpu, geom, KvDtype::Int4, n_pages).unwrap();
        let pages: Vec<PageId> = (0..n_pages).map(|_| pool.alloc().unwrap()).collect();
        for b0 in (0..ctx).step_by(block) {
            let pg: Vec<PageId> = (b0..b0 + block).map(|t| pages[t / ps]).collect();
            let sl: Vec<usize> = (b0..b0 + block).map(|t| t % ps).collect();
            pool.write_rows(&gpu, 0, &dk.as_view(), &dv.as_view(), &pg, &sl)
                .unwrap();
            // As the engine: all but the sink page and the two newest are sealed (INT4).
            let sealable = (b0 / ps).max(1)..((b0 + block) / ps).min(n_pages - 2);
            for &p in &pages[sealable] {
                pool.seal(&gpu, 0, p).unwrap();
            }
        }
        let q = s.clone_htod(&rng.vec(n_heads * d)).unwrap();
        let mut out = s.alloc_zeros::<f32>(n_heads * d).unwrap();
        let queries = [GpuQuery {
            pages: &pages,
            n_tokens: ctx,
        }];
        let scale = 1.0 / (d as f32).sqrt();
        let budget = SparseConfig::new(2048);
        for (name, sparse) in [("dense", None), ("sparse 2K", Some(&budget))] {
            let secs = time_attention(
                &gpu,
                &pool,
                0,
                &queries,
                &q.as_view(),
                n_heads,
                scale,
                sparse,
                &mut out.as_view_mut(),
                50,
            )
            .unwrap();
            let res = s.clone_dtoh(&out).unwrap();
            assert!(res.iter().all(|x| x.is_finite()));
            println!(
                "attention {} ctx {ctx} {name}: {:.1} us/call ({} SMs)",
                gpu.info().name,
                secs * 1e6,
                pool.sm_count()
            );
        }
    }
}

/// One [`AttentionPlan`] per step serves every layer while, as the engine does, each layer first
/// writes the step's rows, then seals the pages that just filled, then attends: prefill and decode
/// steps of two sequences over three layers, INT4 (staging slots taken and released between
/// layers) and F16, dense and sparse, each layer against the CPU.
#[test]
fn plan_serves_every_layer_with_writes_and_seals_between() {
    let Some(gpu) = gpu_or_skip("attention::plan_serves_every_layer_with_writes_and_seals_between")
    else {
        return;
    };
    let (ps, n_layers, n_kv, n_heads, d) = (4, 3, 2, 8, 64);
    let geom = KvGeometry {
        page_size: ps,
        n_layers,
        n_kv_heads: n_kv,
        head_dim: d,
    };
    let w = n_kv * d;
    let scale = 1.0 / (d as f32).sqrt();
    for dtype in [KvDtype::Int4, KvDtype::F16] {
        for sparse in [None, Some(SparseConfig::new(5 * ps))] {
            let mut cpu = KvPool::new(geom, dtype, 64).unwrap();
            let mut gp = GpuKvPool::new(&gpu, geom, dtype, 64).unwrap();
            assert_eq!(cpu.alloc(), gp.alloc()); // tables do not start at page 0
            let mut tables: Vec<Vec<PageId>> = vec![Vec::new(), Vec::new()];
            let mut lens = [0usize; 2];
            let mut rng = Rng::new(55);
            let s = gpu.stream();
            // Step 0: prefill 45 and 30 tokens; then 7 decode steps of one token each.
            let mut steps: Vec<[usize; 2]> = vec![[45, 30]];
            steps.extend(std::iter::repeat_n([1, 1], 7));
            for (step, add) in steps.iter().enumerate() {
                // Rows of this step: (sequence, position).
                let mut rows = Vec::new();
                for (sq, &n) in add.iter().enumerate() {
                    for pos in lens[sq]..lens[sq] + n {
                        if pos % ps == 0 {
                            let (a, b) = (cpu.alloc().unwrap(), gp.alloc().unwrap());
                            assert_eq!(a, b);
                            tables[sq].push(a);
                        }
                        rows.push((sq, pos));
                    }
                }
                for (sq, &n) in add.iter().enumerate() {
                    lens[sq] += n;
                }
                let pages: Vec<PageId> = rows.iter().map(|&(sq, p)| tables[sq][p / ps]).collect();
                let slots: Vec<usize> = rows.iter().map(|&(_, p)| p % ps).collect();
                // As the engine: a row that fills a page seals the page before it (one recent
                // page stays open), never the sink page.
                let seal: Vec<PageId> = rows
                    .iter()
                    .filter(|&&(_, p)| p % ps == ps - 1 && p / ps >= 2)
                    .map(|&(sq, p)| tables[sq][p / ps - 1])
                    .collect();
                let gq: Vec<GpuQuery<'_>> = rows
                    .iter()
                    .map(|&(sq, p)| GpuQuery {
                        pages: &tables[sq],
                        n_tokens: p + 1,
                    })
                    .collect();
                let cq: Vec<Query<'_>> = rows
                    .iter()
                    .map(|&(sq, p)| Query {
                        pages: &tables[sq],
                        n_tokens: p + 1,
                    })
                    .collect();
                // Built before any of the step's writes, as the engine may.
                let plan = attention_plan_with(
                    &gpu,
                    &gp,
                    &gq,
                    n_heads,
                    sparse.as_ref(),
                    SplitPlan {
                        entries_per_split: if step % 2 == 0 { None } else { Some(2) },
                    },
                )
                .unwrap();
                assert_eq!(plan.rows(), rows.len());
                let n = rows.len();
                let q = Rng::new(600 + step as u64).vec(n * n_heads * d);
                let dq = s.clone_htod(&q).unwrap();
                for layer in 0..n_layers {
                    let (k, v) = (rng.vec(n * w), rng.vec(n * w));
                    for (r, (&p, &sl)) in pages.iter().zip(&slots).enumerate() {
                        cpu.write(layer, p, sl, &k[r * w..(r + 1) * w], &v[r * w..(r + 1) * w]);
                    }
                    let (dk, dv) = (s.clone_htod(&k).unwrap(), s.clone_htod(&v).unwrap());
                    gp.write_rows(&gpu, layer, &dk.as_view(), &dv.as_view(), &pages, &slots)
                        .unwrap();
                    for &p in &seal {
                        cpu.seal(layer, p);
                        gp.seal(&gpu, layer, p).unwrap();
                    }
                    let mut want = vec![f32::NAN; n * n_heads * d];
                    cpu_rows(
                        &cpu,
                        layer,
                        &cq,
                        &q,
                        n_heads,
                        scale,
                        sparse.as_ref(),
                        &mut want,
                    );
                    let mut dout = s.clone_htod(&vec![f32::NAN; want.len()]).unwrap();
                    paged_attention_planned(
                        &gpu,
                        &gp,
                        &plan,
                        layer,
                        &dq.as_view(),
                        scale,
                        &mut dout.as_view_mut(),
                    )
                    .unwrap();
                    let got = s.clone_dtoh(&dout).unwrap();
                    let err = rel_err(&got, &want);
                    assert!(
                        err <= TOL,
                        "{dtype} {sparse:?} step {step} layer {layer}: err {err}"
                    );
                }
            }
        }
    }
}

/// A plan is tied to its pool's geometry and to its row count.
#[test]
fn plan_rejects_other_pools_and_shapes() {
    let Some(gpu) = gpu_or_skip("attention::plan_rejects_other_pools_and_shapes") else {
        return;
    };
    let b = build(&gpu, KvDtype::Int4, 4, 2, 64, &[9], Seal::All, 3);
    let other = build(&gpu, KvDtype::Int4, 4, 2, 64, &[9, 9], Seal::All, 3);
    let (n_heads, d) = (4, 64);
    let s = gpu.stream();
    let queries = [GpuQuery {
        pages: &b.tables[0],
        n_tokens: 9,
    }];
    let plan = attention_plan(&gpu, &b.gpu, &queries, n_heads, None).unwrap();
    let q = s.clone_htod(&Rng::new(4).vec(n_heads * d)).unwrap();
    let mut out = s.alloc_zeros::<f32>(n_heads * d).unwrap();
    let mut run = |pool: &GpuKvPool, layer: usize| {
        paged_attention_planned(
            &gpu,
            pool,
            &plan,
            layer,
            &q.as_view(),
            0.125,
            &mut out.as_view_mut(),
        )
    };
    run(&b.gpu, 1).unwrap();
    assert!(matches!(run(&other.gpu, 1), Err(CudaError::Shape(_))));
    assert!(matches!(run(&b.gpu, LAYERS), Err(CudaError::Shape(_))));
}
