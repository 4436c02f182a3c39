//! Element-wise and row-wise operations of the forward pass on the GPU (`ops.cu`): RMSNorm,
//! NeoX RoPE, SwiGLU, residual adds and bias rows. They round as [`crate::cpu::ops`] does; only
//! RMSNorm's sum of squares is summed in another order, and `sincosf` / `expf` differ from the
//! host's libm by an ulp or two.
//!
//! Every function uses the first `rows · cols` (or `n`) elements of its views, which may be longer.

use cudarc::driver::{CudaView, CudaViewMut, LaunchConfig, PushKernelArg};

use super::{CudaError, Gpu, KernelModule, as_i32, blocks_for, shape};

pub const MODULE: KernelModule = KernelModule {
    name: "ops",
    source: include_str!("../../cuda/ops.cu"),
    functions: &[
        "rms_norm_rows",
        "add_rms_norm_rows",
        "rope_rows",
        "swiglu",
        "add_assign",
        "add_bias_rows",
    ],
};

const THREADS: u32 = 256;
/// Element-wise kernels stride over the data; more blocks than this only add scheduling.
const MAX_BLOCKS: u32 = 16_384;

fn need(what: &str, have: usize, want: usize) -> Result<(), CudaError> {
    if have < want {
        return Err(shape(format!(
            "{what}: needs {want} elements, the view has {have}"
        )));
    }
    Ok(())
}

fn elementwise_cfg(n: usize) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (blocks_for(n, THREADS).min(MAX_BLOCKS), 1, 1),
        block_dim: (THREADS, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// `out[r] = x[r] · rsqrt(mean(x[r]²) + eps) · w` for each of `rows` rows of `cols`.
pub fn rms_norm_rows(
    gpu: &Gpu,
    x: &CudaView<'_, f32>,
    w: &CudaView<'_, f32>,
    rows: usize,
    cols: usize,
    eps: f32,
    out: &mut CudaViewMut<'_, f32>,
) -> Result<(), CudaError> {
    need("rms_norm_rows x", x.len(), rows * cols)?;
    need("rms_norm_rows w", w.len(), cols)?;
    need("rms_norm_rows out", out.len(), rows * cols)?;
    as_i32(rows * cols, "rows · cols")?;
    if rows == 0 || cols == 0 {
        return Ok(());
    }
    let c = cols as i32;
    let cfg = LaunchConfig {
        grid_dim: (rows as u32, 1, 1),
        block_dim: (THREADS, 1, 1),
        shared_mem_bytes: 0,
    };
    let f = gpu.function(MODULE.name, "rms_norm_rows")?;
    // SAFETY: (x, w, out, cols, eps) as the kernel; block r touches x/out[r·cols .. (r+1)·cols]
    // and w[..cols], all within the checked lengths.
    unsafe {
        gpu.stream()
            .launch_builder(f)
            .arg(x)
            .arg(w)
            .arg(out)
            .arg(&c)
            .arg(&eps)
            .launch(cfg)?;
    }
    Ok(())
}

/// The residual add and the next RMSNorm in one launch: `x[r] += y[r]`, then
/// `out[r] = x[r] · rsqrt(mean(x[r]²) + eps) · w` for each of `rows` rows of `cols`.
#[allow(clippy::too_many_arguments)]
pub fn add_rms_norm_rows(
    gpu: &Gpu,
    x: &mut CudaViewMut<'_, f32>,
    y: &CudaView<'_, f32>,
    w: &CudaView<'_, f32>,
    rows: usize,
    cols: usize,
    eps: f32,
    out: &mut CudaViewMut<'_, f32>,
) -> Result<(), CudaError> {
    need("add_rms_norm_rows x", x.len(), rows * cols)?;
    need("add_rms_norm_rows y", y.len(), rows * cols)?;
    need("add_rms_norm_rows w", w.len(), cols)?;
    need("add_rms_norm_rows out", out.len(), rows * cols)?;
    as_i32(rows * cols, "rows · cols")?;
    if rows == 0 || cols == 0 {
        return Ok(());
    }
    let c = cols as i32;
    let cfg = LaunchConfig {
        grid_dim: (rows as u32, 1, 1),
        block_dim: (THREADS, 1, 1),
        shared_mem_bytes: 0,
    };
    let f = gpu.function(MODULE.name, "add_rms_norm_rows")?;
    // SAFETY: (x, y, w, out, cols, eps) as the kernel; block r touches x/y/out[r·cols ..
    // (r+1)·cols] and w[..cols], all within the checked lengths; x and out are distinct
    // (two mutable views cannot alias).
    unsafe {
        gpu.stream()
            .launch_builder(f)
            .arg(x)
            .arg(y)
            .arg(w)
            .arg(out)
            .arg(&c)
            .arg(&eps)
            .launch(cfg)?;
    }
    Ok(())
}

/// NeoX RoPE in place on `rows × (n_heads × head_dim)`: row `r` rotated at position `pos[r]`;
/// `inv_freq` has `head_dim / 2` entries; `mscale` multiplies cos and sin as in
/// [`crate::cpu::ops::Rope`].
#[allow(clippy::too_many_arguments)]
pub fn rope_rows(
    gpu: &Gpu,
    x: &mut CudaViewMut<'_, f32>,
    rows: usize,
    n_heads: usize,
    head_dim: usize,
    pos: &CudaView<'_, u32>,
    inv_freq: &CudaView<'_, f32>,
    mscale: f32,
) -> Result<(), CudaError> {
    if !head_dim.is_multiple_of(2) {
        return Err(shape(format!("rope_rows: head_dim {head_dim} is odd")));
    }
    need("rope_rows x", x.len(), rows * n_heads * head_dim)?;
    need("rope_rows pos", pos.len(), rows)?;
    need("rope_rows inv_freq", inv_freq.len(), head_dim / 2)?;
    as_i32(rows * n_heads * head_dim, "rows · n_heads · head_dim")?;
    let pairs = n_heads * head_dim / 2;
    if rows == 0 || pairs == 0 {
        return Ok(());
    }
    let grid_y = blocks_for(pairs, THREADS);
    if grid_y > 65_535 {
        return Err(shape(format!(
            "rope_rows: {n_heads} heads of {head_dim} is too wide"
        )));
    }
    let (nh, hd) = (n_heads as i32, head_dim as i32);
    let cfg = LaunchConfig {
        grid_dim: (rows as u32, grid_y, 1),
        block_dim: (THREADS, 1, 1),
        shared_mem_bytes: 0,
    };
    let f = gpu.function(MODULE.name, "rope_rows")?;
    // SAFETY: (x, pos, inv_freq, n_heads, head_dim, mscale) as the kernel; block (r, y) reads
    // pos[r] and inv_freq[< head_dim/2] and rewrites pairs of row r only; lengths checked.
    unsafe {
        gpu.stream()
            .launch_builder(f)
            .arg(x)
            .arg(pos)
            .arg(inv_freq)
            .arg(&nh)
            .arg(&hd)
            .arg(&mscale)
            .launch(cfg)?;
    }
    Ok(())
}

/// `gate[i] = silu(gate[i]) · up[i]` for `i < n`.
pub fn swiglu(
    gpu: &Gpu,
    gate: &mut CudaViewMut<'_, f32>,
    up: &CudaView<'_, f32>,
    n: usize,
) -> Result<(), CudaError> {
    binary_in_place(gpu, "swiglu", gate, up, n)
}

/// `x[i] += y[i]` for `i < n`.
pub fn add_assign(
    gpu: &Gpu,
    x: &mut CudaViewMut<'_, f32>,
    y: &CudaView<'_, f32>,
    n: usize,
) -> Result<(), CudaError> {
    binary_in_place(gpu, "add_assign", x, y, n)
}

/// Launches the element-wise kernel `name(x, y, n)` that updates `x[i]` from `y[i]`, `i < n`.
fn binary_in_place(
    gpu: &Gpu,
    name: &str,
    x: &mut CudaViewMut<'_, f32>,
    y: &CudaView<'_, f32>,
    n: usize,
) -> Result<(), CudaError> {
    need(name, x.len(), n)?;
    need(name, y.len(), n)?;
    let ni = as_i32(n, "n")?;
    if n == 0 {
        return Ok(());
    }
    let f = gpu.function(MODULE.name, name)?;
    // SAFETY: (x, y, n) as the kernel; indices < n ≤ both lengths.
    unsafe {
        gpu.stream()
            .launch_builder(f)
            .arg(x)
            .arg(y)
            .arg(&ni)
            .launch(elementwise_cfg(n))?;
    }
    Ok(())
}

/// `x[r × cols + c] += bias[c]` for `rows` rows.
pub fn add_bias_rows(
    gpu: &Gpu,
    x: &mut CudaViewMut<'_, f32>,
    bias: &CudaView<'_, f32>,
    rows: usize,
    cols: usize,
) -> Result<(), CudaError> {
    need("add_bias_rows x", x.len(), rows * cols)?;
    need("add_bias_rows bias", bias.len(), cols)?;
    let n = as_i32(rows * cols, "rows · cols")?;
    if rows == 0 || cols == 0 {
        return Ok(());
    }
    let c = cols as i32;
    let f = gpu.function(MODULE.name, "add_bias_rows")?;
    // SAFETY: (x, bias, n, cols) as the kernel; indices < rows·cols, bias index < cols.
    unsafe {
        gpu.stream()
            .launch_builder(f)
            .arg(x)
            .arg(bias)
            .arg(&n)
            .arg(&c)
            .launch(elementwise_cfg(rows * cols))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cpu::ops as cpu;
    use crate::cuda::testing::{TestRng as Rng, gpu_or_skip};

    /// |got - want| ≤ rel · |want| + abs, with a message naming the element.
    fn close(label: &str, got: &[f32], want: &[f32], rel: f32, abs: f32) {
        assert_eq!(got.len(), want.len(), "{label}: lengths");
        for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
            assert!(
                (g - w).abs() <= rel * w.abs() + abs,
                "{label}: element {i}: gpu {g} cpu {w}"
            );
        }
    }

    #[test]
    fn rms_norm_rows_matches_the_cpu() {
        let Some(gpu) = gpu_or_skip("ops::rms_norm_rows_matches_the_cpu") else {
            return;
        };
        let s = gpu.stream();
        let mut rng = Rng(0x1234_5678_9abc_def1);
        for (rows, cols) in [(1, 4096), (3, 70), (17, 1), (5, 8192), (2, 300)] {
            let x = rng.vec(rows * cols, 3.0);
            let w = rng.vec(cols, 1.5);
            let mut want = vec![0f32; rows * cols];
            cpu::rms_norm_rows(&x, &w, 1e-5, &mut want);
            let (dx, dw) = (s.clone_htod(&x).unwrap(), s.clone_htod(&w).unwrap());
            let mut dout = s.clone_htod(&vec![f32::NAN; rows * cols]).unwrap();
            rms_norm_rows(
                &gpu,
                &dx.as_view(),
                &dw.as_view(),
                rows,
                cols,
                1e-5,
                &mut dout.as_view_mut(),
            )
            .unwrap();
            let got = s.clone_dtoh(&dout).unwrap();
            // Only the sum of squares is summed in another order: a relative error of a few
            // 1e-7 in the mean, half of it in the inverse root; 1e-5 relative leaves a margin.
            close(
                &format!("rms_norm [{rows}, {cols}]"),
                &got,
                &want,
                1e-5,
                1e-30,
            );
        }
    }

    #[test]
    fn add_rms_norm_rows_matches_an_add_then_the_cpu_norm() {
        let Some(gpu) = gpu_or_skip("ops::add_rms_norm_rows_matches_an_add_then_the_cpu_norm")
        else {
            return;
        };
        let s = gpu.stream();
        let mut rng = Rng(0x2234_5678_9abc_def3);
        for (rows, cols) in [(1, 4096), (3, 70), (17, 1), (5, 8192), (16, 576)] {
            let x = rng.vec(rows * cols, 3.0);
            let y = rng.vec(rows * cols, 2.0);
            let w = rng.vec(cols, 1.5);
            let sum: Vec<f32> = x.iter().zip(&y).map(|(a, b)| a + b).collect();
            let mut want = vec![0f32; rows * cols];
            cpu::rms_norm_rows(&sum, &w, 1e-5, &mut want);
            let (mut dx, dy, dw) = (
                s.clone_htod(&x).unwrap(),
                s.clone_htod(&y).unwrap(),
                s.clone_htod(&w).unwrap(),
            );
            let mut dout = s.clone_htod(&vec![f32::NAN; rows * cols]).unwrap();
            add_rms_norm_rows(
                &gpu,
                &mut dx.as_view_mut(),
                &dy.as_view(),
                &dw.as_view(),
                rows,
                cols,
                1e-5,
                &mut dout.as_view_mut(),
            )
            .unwrap();
            // The add is one rounding on both sides: bit for bit.
            let got_x = s.clone_dtoh(&dx).unwrap();
            assert!(
                got_x
                    .iter()
                    .zip(&sum)
                    .all(|(g, w)| g.to_bits() == w.to_bits()),
                "add [{rows}, {cols}]"
            );
            let got = s.clone_dtoh(&dout).unwrap();
            close(
                &format!("add_rms_norm [{rows}, {cols}]"),
                &got,
                &want,
                1e-5,
                1e-30,
            );
        }
    }

    #[test]
    fn rope_rows_matches_the_cpu_at_each_rows_position() {
        let Some(gpu) = gpu_or_skip("ops::rope_rows_matches_the_cpu_at_each_rows_position") else {
            return;
        };
        let s = gpu.stream();
        let mut rng = Rng(0x0dd_ba11_cafe_f00d);
        for (rows, n_heads, head_dim, mscale) in [
            (1, 32, 128, 1.0f32),
            (5, 3, 64, 1.2),
            (9, 8, 6, 1.0),
            (2, 1, 256, 0.7),
        ] {
            let half = head_dim / 2;
            let inv_freq: Vec<f32> = (0..half)
                .map(|i| 500_000f32.powf(-((2 * i) as f32) / head_dim as f32))
                .collect();
            let pos: Vec<u32> = (0..rows as u32)
                .map(|r| [0, 1, 17, 4095, 131_071][r as usize % 5] + r)
                .collect();
            let x = rng.vec(rows * n_heads * head_dim, 2.0);
            let rope = cpu::Rope {
                inv_freq: inv_freq.clone(),
                head_dim,
                mscale,
            };
            let width = n_heads * head_dim;
            let mut want = x.clone();
            for r in 0..rows {
                rope.apply(
                    &mut want[r * width..(r + 1) * width],
                    n_heads,
                    pos[r] as usize,
                );
            }
            let mut dx = s.clone_htod(&x).unwrap();
            let (dpos, dfreq) = (
                s.clone_htod(&pos).unwrap(),
                s.clone_htod(&inv_freq).unwrap(),
            );
            rope_rows(
                &gpu,
                &mut dx.as_view_mut(),
                rows,
                n_heads,
                head_dim,
                &dpos.as_view(),
                &dfreq.as_view(),
                mscale,
            )
            .unwrap();
            let got = s.clone_dtoh(&dx).unwrap();
            // Same f32 angle on both sides; sincosf and the host's sinf/cosf differ by ≤ 2 ulp
            // each, so an output differs by ≤ ~4 ulp of (|a| + |b|)·mscale: allow 4e-6 of that.
            for r in 0..rows {
                for h in 0..n_heads {
                    for i in 0..half {
                        let base = r * width + h * head_dim;
                        let bound = 4e-6 * (x[base + i].abs() + x[base + i + half].abs()) * mscale;
                        for j in [base + i, base + i + half] {
                            assert!(
                                (got[j] - want[j]).abs() <= bound + 1e-30,
                                "rope rows={rows} heads={n_heads} d={head_dim}: row {r} head {h} dim {}: gpu {} cpu {}",
                                j - base,
                                got[j],
                                want[j]
                            );
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn swiglu_and_adds_match_the_cpu() {
        let Some(gpu) = gpu_or_skip("ops::swiglu_and_adds_match_the_cpu") else {
            return;
        };
        let s = gpu.stream();
        let mut rng = Rng(0xfeed_beef_1234_5678);
        for n in [1usize, 255, 256, 257, 100_003] {
            let gate = rng.vec(n, 12.0);
            let up = rng.vec(n, 2.0);
            let mut want = gate.clone();
            cpu::swiglu(&mut want, &up);
            let mut dg = s.clone_htod(&gate).unwrap();
            let du = s.clone_htod(&up).unwrap();
            swiglu(&gpu, &mut dg.as_view_mut(), &du.as_view(), n).unwrap();
            let got = s.clone_dtoh(&dg).unwrap();
            // expf vs the host's expf: ≤ 2 ulp each, then one division and one product.
            close(&format!("swiglu n={n}"), &got, &want, 2e-6, 1e-30);

            let y = rng.vec(n, 1.0);
            let mut want = gate.clone();
            for (a, b) in want.iter_mut().zip(&y) {
                *a += b;
            }
            let mut dx = s.clone_htod(&gate).unwrap();
            let dy = s.clone_htod(&y).unwrap();
            add_assign(&gpu, &mut dx.as_view_mut(), &dy.as_view(), n).unwrap();
            assert_eq!(s.clone_dtoh(&dx).unwrap(), want, "add_assign n={n}");
        }
        // Only the first n elements change.
        let mut dx = s.clone_htod(&[1.0f32, 2.0, 3.0]).unwrap();
        let dy = s.clone_htod(&[10.0f32, 10.0, 10.0]).unwrap();
        add_assign(&gpu, &mut dx.as_view_mut(), &dy.as_view(), 2).unwrap();
        assert_eq!(s.clone_dtoh(&dx).unwrap(), vec![11.0, 12.0, 3.0]);
        assert!(matches!(
            add_assign(&gpu, &mut dx.as_view_mut(), &dy.as_view(), 4),
            Err(CudaError::Shape(_))
        ));

        for (rows, cols) in [(1, 5), (7, 4096), (3, 1)] {
            let x = rng.vec(rows * cols, 1.0);
            let bias = rng.vec(cols, 1.0);
            let want: Vec<f32> = x
                .iter()
                .enumerate()
                .map(|(i, &v)| v + bias[i % cols])
                .collect();
            let mut dx = s.clone_htod(&x).unwrap();
            let db = s.clone_htod(&bias).unwrap();
            add_bias_rows(&gpu, &mut dx.as_view_mut(), &db.as_view(), rows, cols).unwrap();
            assert_eq!(
                s.clone_dtoh(&dx).unwrap(),
                want,
                "add_bias_rows [{rows}, {cols}]"
            );
        }
    }
}
