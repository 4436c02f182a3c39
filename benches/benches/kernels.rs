//! Criterion micro-benchmarks of the kernels: `cargo bench -p edgelora-bench` (a few minutes).
//!
//! Shapes are SmolLM2-135M's (hidden 576, intermediate 1536, vocab 49152, 9 heads over 3 KV heads
//! of 64). Products run on the global thread pool (`EDGELORA_THREADS`, default every core; set it to
//! 1 for single-core figures). Throughputs are in weight bytes (GEMV) or elements, so criterion
//! prints GB/s or Melem/s beside the times.

use std::hint::black_box;
use std::time::Duration;

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use edgelora_kernels::cpu::act::ActQ8;
use edgelora_kernels::cpu::attention::{SparseConfig, paged_attention};
use edgelora_kernels::cpu::kv::{KvDtype, KvGeometry, KvPool, PageId};
use edgelora_kernels::cpu::lora::{AdapterBits, LoraA, LoraB, LoraSegmentQ8, lora_axpy, sgmv_q8};
use edgelora_kernels::cpu::qdot::available_isas;
use edgelora_kernels::{BlockQ8, Q4Matrix, Q8Matrix, Weight};
use half::f16;

struct Lcg(u64);
impl Lcg {
    fn next(&mut self) -> f32 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((self.0 >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    }
    fn vec(&mut self, n: usize) -> Vec<f32> {
        (0..n).map(|_| self.next()).collect()
    }
}

fn q4(rows: usize, cols: usize, g: &mut Lcg) -> Weight {
    Weight::Q4(Q4Matrix::quantize(&g.vec(rows * cols), rows, cols, 32).expect("shape"))
}

fn q8(rows: usize, cols: usize, g: &mut Lcg) -> Weight {
    let blocks = (0..rows * cols.div_ceil(32))
        .map(|_| {
            let mut qs = [0i8; 32];
            for q in &mut qs {
                *q = (g.next() * 127.0) as i8;
            }
            BlockQ8 {
                d: f16::from_f32(g.next().abs() * 0.02 + 1e-3).to_bits(),
                qs,
            }
        })
        .collect();
    Weight::Q8(Q8Matrix::from_blocks(rows, cols, blocks).expect("shape"))
}

fn gemv(c: &mut Criterion) {
    let mut g = Lcg(1);
    let mut group = c.benchmark_group("q4q8_gemv");
    for (rows, cols) in [(1536, 576), (576, 1536)] {
        let w = q4(rows, cols, &mut g);
        let x = ActQ8::quantize(&g.vec(cols), 1, cols);
        let mut out = vec![0f32; rows];
        group.throughput(Throughput::Bytes(w.nbytes() as u64));
        for isa in available_isas() {
            group.bench_function(
                BenchmarkId::new(isa.name(), format!("{rows}x{cols}")),
                |b| b.iter(|| w.matmul_q8(black_box(&x), isa, &mut out)),
            );
        }
    }
    group.finish();

    let mut group = c.benchmark_group("q8q8_gemv");
    group.sample_size(10);
    let (rows, cols) = (49152, 576);
    let w = q8(rows, cols, &mut g);
    let x = ActQ8::quantize(&g.vec(cols), 1, cols);
    let mut out = vec![0f32; rows];
    group.throughput(Throughput::Bytes(w.nbytes() as u64));
    for isa in available_isas() {
        group.bench_function(
            BenchmarkId::new(isa.name(), format!("{rows}x{cols}")),
            |b| b.iter(|| w.matmul_q8(black_box(&x), isa, &mut out)),
        );
    }
    group.finish();

    let mut group = c.benchmark_group("q4_exact_f32");
    let (rows, cols) = (1536, 576);
    let w = q4(rows, cols, &mut g);
    let x = g.vec(cols);
    let mut out = vec![0f32; rows];
    group.throughput(Throughput::Bytes(w.nbytes() as u64));
    group.bench_function(format!("{rows}x{cols}"), |b| {
        b.iter(|| w.matmul(black_box(&x), 1, &mut out))
    });
    group.finish();
}

fn act_quant(c: &mut Criterion) {
    let mut g = Lcg(2);
    let mut group = c.benchmark_group("act_quantize");
    for (rows, cols) in [(1, 1536), (64, 576)] {
        let x = g.vec(rows * cols);
        let mut q = ActQ8::new();
        group.throughput(Throughput::Elements((rows * cols) as u64));
        group.bench_function(format!("{rows}x{cols}"), |b| {
            b.iter(|| q.quantize_from(black_box(&x), rows, cols))
        });
    }
    group.finish();
}

fn attention(c: &mut Criterion) {
    const TOKENS: usize = 512;
    let (n_heads, n_kv, hd, ps) = (9, 3, 64, 16);
    let geom = KvGeometry {
        page_size: ps,
        n_layers: 1,
        n_kv_heads: n_kv,
        head_dim: hd,
    };
    let mut g = Lcg(3);
    let mut group = c.benchmark_group("paged_attention_512");
    group.throughput(Throughput::Elements(TOKENS as u64));
    for dtype in [KvDtype::F32, KvDtype::F16, KvDtype::Int4] {
        let mut pool = KvPool::new(geom, dtype, TOKENS / ps).expect("pool");
        let pages: Vec<PageId> = (0..TOKENS / ps)
            .map(|_| pool.alloc().expect("page"))
            .collect();
        for t in 0..TOKENS {
            let (k, v) = (g.vec(n_kv * hd), g.vec(n_kv * hd));
            let page = pages[t / ps];
            pool.write(0, page, t % ps, &k, &v);
            if t % ps == ps - 1 {
                pool.seal(0, page);
            }
        }
        let q = g.vec(n_heads * hd);
        let mut out = vec![0f32; n_heads * hd];
        let scale = 1.0 / (hd as f32).sqrt();
        group.bench_function(BenchmarkId::new("dense", dtype.as_str()), |b| {
            b.iter(|| {
                paged_attention(
                    &pool,
                    0,
                    &pages,
                    TOKENS,
                    black_box(&q),
                    n_heads,
                    scale,
                    None,
                    &mut out,
                )
            })
        });
        let sparse = SparseConfig::new(128);
        group.bench_function(BenchmarkId::new("sparse-128", dtype.as_str()), |b| {
            b.iter(|| {
                paged_attention(
                    &pool,
                    0,
                    &pages,
                    TOKENS,
                    black_box(&q),
                    n_heads,
                    scale,
                    Some(&sparse),
                    &mut out,
                )
            })
        });
    }
    group.finish();
}

/// The LoRA kernels at SmolLM2's width, rank 16: the expand's micro-kernel (one row, 576
/// outputs) on each ISA, and a batch of 16 rows with 16 distinct adapters (one-row segments: the
/// mixed-adapter case) through the threaded shrink and expand. Throughput in multiply-adds.
fn lora(c: &mut Criterion) {
    let (dim, rank, rows) = (576, 16, 16);
    let mut g = Lcg(7);
    let mut group = c.benchmark_group("lora-expand");
    let bv = g.vec(dim * rank);
    let t: Vec<i8> = (0..rank).map(|i| (i as i8 - 8) * 13).collect();
    let mut out = vec![0f32; dim];
    group.throughput(Throughput::Elements((dim * rank) as u64));
    for bits in [AdapterBits::Int8, AdapterBits::Int4] {
        let b = LoraB::quantize_bits(&bv, dim, rank, bits).unwrap();
        for isa in available_isas() {
            group.bench_function(format!("{}x{rank}/int{bits}/{}", dim, isa.name()), |bch| {
                bch.iter(|| lora_axpy(isa, &b, 0..dim / 8, black_box(&t), 0.5, &mut out))
            });
        }
    }
    group.finish();
    let mut group = c.benchmark_group("lora-sgmv");
    let adapters: Vec<(LoraA, LoraB)> = (0..rows)
        .map(|_| {
            (
                LoraA::Q8(Q8Matrix::quantize(&g.vec(rank * dim), rank, dim).unwrap()),
                LoraB::quantize(&g.vec(dim * rank), dim, rank).unwrap(),
            )
        })
        .collect();
    let segs: Vec<LoraSegmentQ8<'_>> = adapters
        .iter()
        .enumerate()
        .map(|(r, (a, b))| LoraSegmentQ8 {
            rows: r..r + 1,
            a,
            b,
            scaling: 2.0,
        })
        .collect();
    let x = ActQ8::quantize(&g.vec(rows * dim), rows, dim);
    let mut out = vec![0f32; rows * dim];
    group.throughput(Throughput::Elements((rows * 2 * dim * rank) as u64));
    for isa in available_isas() {
        group.bench_function(
            format!("{rows}-distinct-{dim}x{rank}/{}", isa.name()),
            |bch| bch.iter(|| sgmv_q8(black_box(&x), &mut out, dim, &segs, isa)),
        );
    }
    group.finish();
}

fn config() -> Criterion {
    Criterion::default()
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2))
        .sample_size(30)
}

criterion_group! {
    name = kernels;
    config = config();
    targets = gemv, act_quant, attention, lora
}
criterion_main!(kernels);
