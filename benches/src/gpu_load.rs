//! `gpu adapter-load`: what bringing a cold LoRA adapter from disk into VRAM costs, beside a raw
//! read of the same bytes measured in the same run.
//!
//! A random model of a `synth` shape (default llama-1b) is built in memory and uploaded, so that
//! a [`CudaBackend`] exists to take adapters; `--adapters` random adapters of that shape
//! (`--rank`, `--targets`) are written as f16 packs (`pack::write_pack`, which fsyncs) into a
//! fresh folder on the disk to measure. Then, in each of `--repeat` rounds, over every pack:
//!
//! - the yardstick: a raw read of the pack through the adapter loader's own reader
//!   (`FileReader::read_file_staged`: io_uring or pread, `O_DIRECT`);
//! - the cold path, as the residency loader and the CUDA backend run it: the same read, then
//!   `pack::decode` (header and payload checks, f16 → f32, Q8_0 copies) into a `LoraAdapter`,
//!   then `CudaBackend::prefetch_adapter` (pinned staging, copies on the upload stream) and a wait
//!   until `adapters_in_flight()` is 0: the adapter is on the device;
//! - the upload alone: a `LoraAdapter` already decoded in host memory, uploaded and waited for,
//!   beside a plain pinned host-to-device copy of as many bytes.
//!
//! Every device copy is evicted (`evict_adapter`) before the next load, so each upload is a real
//! one. Before every read the pack's pages are dropped from the page cache
//! (`posix_fadvise(DONTNEED)`), so that a filesystem refusing `O_DIRECT` (read buffered then)
//! still reads from the device. The two read passes swap order from round to round.

use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail};
use clap::Args;
use cudarc::driver::CudaSlice;
use edgelora_daemon::adapters::LoraAdapter;
use edgelora_daemon::adapters::pack::{self, PackDtype, PackInfo};
use edgelora_daemon::engine::KvDtype;
use edgelora_daemon::engine::cuda::CudaBackend;
use edgelora_daemon::model::{LoadOptions, ModelConfig, Proj};
use edgelora_hal::storage::{FileReader, ReaderConfig};
use edgelora_kernels::cuda::Gpu;

use crate::gpu::{synth_model, time_events};
use crate::report::{Report, Row};
use crate::swap::{
    bench_dir, best, fs_name, in_memory_fs, manifest, median, parse_targets, random_adapter,
    shape_name, targets_label,
};
use crate::synth::{self, Shape};

/// The longest an upload may take before the bench gives up on it.
const UPLOAD_TIMEOUT: Duration = Duration::from_secs(60);

#[derive(Args, Debug)]
pub struct AdapterLoadArgs {
    /// Base model shape: the random model the backend holds, and the adapters' shape.
    #[arg(long, value_enum, default_value = "llama-1b")]
    pub shape: Shape,
    /// Adapter packs written and loaded (distinct random adapters).
    #[arg(long, default_value_t = 8)]
    pub adapters: usize,
    /// LoRA rank.
    #[arg(long, default_value_t = 16)]
    pub rank: usize,
    /// Adapted projections: `all`, or a comma list of q,k,v,o,gate,up,down.
    #[arg(long, default_value = "all")]
    pub targets: String,
    /// Rounds over every pack (medians and bests over all loads).
    #[arg(long, default_value_t = 3)]
    pub repeat: usize,
    /// Folder for the packs, on the disk to measure; a subfolder is made and removed (default:
    /// under the edgelora cache folder, or /var/tmp when that is tmpfs).
    #[arg(long)]
    pub dir: Option<PathBuf>,
    /// Tokenizer folder of the in-memory model (default: the tiny-llama fixture, under
    /// $EDGELORA_FIXTURES when set).
    #[arg(long)]
    pub tokenizer: Option<PathBuf>,
}

/// A folder removed when dropped.
struct Scratch(PathBuf);

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// One pack on disk.
struct Pack {
    path: PathBuf,
    info: PackInfo,
    len: u64,
}

/// Seconds per adapter of every timed load.
#[derive(Default)]
struct Samples {
    /// The yardstick: the reader alone.
    raw: Vec<f64>,
    /// The cold path and its parts.
    read: Vec<f64>,
    decode: Vec<f64>,
    upload: Vec<f64>,
    cold: Vec<f64>,
    /// A decoded adapter to the device.
    upload_only: Vec<f64>,
}

/// Drops `path`'s pages from the page cache (the data is on disk: `write_pack` fsyncs).
fn drop_cache(path: &Path) -> std::io::Result<()> {
    let f = std::fs::File::open(path)?;
    // SAFETY: advice on a descriptor this function owns; no memory is passed.
    let rc = unsafe { libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
    if rc != 0 {
        return Err(std::io::Error::from_raw_os_error(rc));
    }
    Ok(())
}

/// Drops a pack's cached pages before a read when `on` (advice: the reads are `O_DIRECT` where
/// the filesystem allows, and `run` turns this off with a warning where the call fails).
fn before_read(p: &Pack, on: bool) {
    if on {
        let _ = drop_cache(&p.path);
    }
}

/// Waits (spinning: uploads take milliseconds) until no adapter upload is in flight.
fn wait_uploaded(be: &CudaBackend) -> Result<()> {
    let t0 = Instant::now();
    while be.adapters_in_flight() > 0 {
        if t0.elapsed() > UPLOAD_TIMEOUT {
            bail!("an adapter upload was not done after {UPLOAD_TIMEOUT:?}");
        }
        std::hint::spin_loop();
    }
    Ok(())
}

/// Host-to-device bytes per second from one pinned buffer of `bytes` (best of 5): the rate the
/// upload's copies could reach at most.
fn pinned_h2d(gpu: &Gpu, bytes: usize) -> Result<f64> {
    let n = bytes.div_ceil(4).max(1);
    // SAFETY: the buffer is filled below before any copy reads it.
    let mut host = unsafe { gpu.context().alloc_pinned::<f32>(n)? };
    host.as_mut_slice()?.fill(0.0);
    let s = gpu.stream();
    let mut dev: CudaSlice<f32> = s.alloc_zeros(n)?;
    let mut best = 0f64;
    for _ in 0..5 {
        let t = time_events(gpu, 10, || {
            s.memcpy_htod(&host, &mut dev)?;
            Ok(())
        })?;
        best = best.max((n * 4) as f64 / t);
    }
    Ok(best)
}

/// Writes `n` random adapters of `config`'s shape as f16 packs into `dir`.
fn write_packs(
    dir: &Path,
    config: &ModelConfig,
    a: &AdapterLoadArgs,
    targets: &[Proj],
) -> Result<Vec<Pack>> {
    let fp = pack::fingerprint(config);
    (0..a.adapters)
        .map(|i| {
            let id = format!("gpu-load-{i}");
            let ad = random_adapter(config, a.rank, targets, i as u64, &id);
            let path = dir.join(format!("{id}.{}", pack::PACK_EXT));
            let len = pack::write_pack(&path, &ad, PackDtype::F16, &fp, &manifest(&id))?;
            let info = pack::read_info(&path, &fp)?;
            Ok(Pack { path, info, len })
        })
        .collect()
}

/// One cold read of `p` through `reader`; seconds.
fn raw_read(reader: &mut FileReader, p: &Pack, uncache: bool) -> Result<f64> {
    before_read(p, uncache);
    let t0 = Instant::now();
    let n = reader.read_file_staged(&p.path)?.len();
    let s = t0.elapsed().as_secs_f64();
    if n as u64 != p.len {
        bail!("read {n} of {} bytes of {}", p.len, p.path.display());
    }
    Ok(s)
}

/// The cold path of `p`: read, decode, upload, wait; seconds of each part. The device copy is
/// evicted afterwards.
fn cold_load(
    reader: &mut FileReader,
    be: &mut CudaBackend,
    config: &ModelConfig,
    p: &Pack,
    uncache: bool,
) -> Result<[f64; 3]> {
    before_read(p, uncache);
    let t0 = Instant::now();
    let bytes = reader.read_file_staged(&p.path)?;
    let t1 = Instant::now();
    let ad = pack::decode(&p.info, bytes, config)?;
    let t2 = Instant::now();
    be.prefetch_adapter(&ad)?;
    wait_uploaded(be)?;
    let t3 = Instant::now();
    be.evict_adapter(&ad)?;
    Ok([t1 - t0, t2 - t1, t3 - t2].map(|d| d.as_secs_f64()))
}

/// A decoded adapter to the device and back out; seconds of the upload and wait.
fn upload_only(be: &mut CudaBackend, ad: &LoraAdapter) -> Result<f64> {
    let t0 = Instant::now();
    be.prefetch_adapter(ad)?;
    wait_uploaded(be)?;
    let s = t0.elapsed().as_secs_f64();
    be.evict_adapter(ad)?;
    Ok(s)
}

pub fn run(gpu: &Arc<Gpu>, a: &AdapterLoadArgs, report: &mut Report) -> Result<()> {
    if a.rank == 0 || a.adapters == 0 {
        bail!("--rank and --adapters must be at least 1");
    }
    let targets = parse_targets(&a.targets)?;
    let shape = shape_name(a.shape);
    let tok = a
        .tokenizer
        .clone()
        .unwrap_or_else(synth::fixture_tokenizer_dir);
    // The serving defaults: INT4 projections, Q8_0 embedding and head.
    let model = synth_model(a.shape, &LoadOptions::default(), &tok)?;
    let config = &model.config;
    let t0 = Instant::now();
    let mut be = CudaBackend::new(gpu.clone(), &model, KvDtype::F32, 16, 16)?;
    eprintln!(
        "uploaded the model ({:.1} MB) in {:.1}s",
        be.weight_bytes() as f64 / 1e6,
        t0.elapsed().as_secs_f64()
    );

    let root = a.dir.clone().unwrap_or_else(|| bench_dir("bench-gpu-load"));
    let work = Scratch(root.join(format!("run-{}", std::process::id())));
    std::fs::create_dir_all(&work.0).with_context(|| format!("creating {}", work.0.display()))?;
    let fs = fs_name(&work.0);
    if in_memory_fs(&fs) {
        eprintln!(
            "warning: {} is on {fs}: reads come from memory, not a device (pass --dir on a disk)",
            work.0.display()
        );
    }
    eprintln!(
        "writing {} rank-{} adapters of the {shape} shape on {} into {} ({fs}) ...",
        a.adapters,
        a.rank,
        targets_label(&targets),
        work.0.display()
    );
    let packs = write_packs(&work.0, config, a, &targets)?;
    // The upload-only inputs: the same adapters, decoded once.
    let decoded = packs
        .iter()
        .map(|p| {
            let bytes = std::fs::read(&p.path)?;
            Ok(pack::decode(&p.info, &bytes, config)?)
        })
        .collect::<Result<Vec<LoraAdapter>>>()?;
    let pack_bytes = packs.iter().map(|p| p.len as f64).sum::<f64>() / packs.len() as f64;
    let f32_bytes = packs[0].info.f32_bytes();
    let h2d = pinned_h2d(gpu, f32_bytes as usize)?;

    let uncache = match drop_cache(&packs[0].path) {
        Ok(()) => true,
        Err(e) => {
            eprintln!(
                "warning: posix_fadvise(DONTNEED) failed ({e}): reads that the filesystem does \
                 not let bypass the page cache may be warm"
            );
            false
        }
    };
    let mut reader = FileReader::new(ReaderConfig::default());
    // Untimed: code paths, the reader's staging buffer, the first pinned allocations.
    raw_read(&mut reader, &packs[0], uncache)?;
    cold_load(&mut reader, &mut be, config, &packs[0], uncache)?;
    upload_only(&mut be, &decoded[0])?;

    let repeat = a.repeat.max(1);
    let mut s = Samples::default();
    for r in 0..repeat {
        eprintln!(
            "round {}/{repeat}: raw reads, cold loads, uploads of {} adapters ...",
            r + 1,
            packs.len()
        );
        for pass in [r % 2, 1 - r % 2] {
            for p in &packs {
                if pass == 0 {
                    s.raw.push(raw_read(&mut reader, p, uncache)?);
                } else {
                    let [read, dec, up] = cold_load(&mut reader, &mut be, config, p, uncache)?;
                    s.read.push(read);
                    s.decode.push(dec);
                    s.upload.push(up);
                    s.cold.push(read + dec + up);
                }
            }
        }
        for ad in &decoded {
            s.upload_only.push(upload_only(&mut be, ad)?);
        }
    }

    let gbs = |bytes: f64, secs: f64| bytes / secs / 1e9;
    let ms = |secs: f64| secs * 1e3;
    let loads = packs.len() * repeat;
    let kind = reader.kind();
    let (raw_m, cold_m) = (median(&s.raw), median(&s.cold));
    report.ctx.model = Some(format!(
        "synth {shape} (random weights) on {} ({})",
        gpu.info().name,
        gpu.info().arch
    ));
    report.push(
        Row::new("gpu", "adapter pack", pack_bytes / 1e6, "MB").note(format!(
            "rank {}, targets {}, f16, {} tensors, {:.1} MB as f32 on the device; {} packs in \
             {} ({fs}); reader: {}",
            a.rank,
            targets_label(&targets),
            packs[0].info.tensors.len(),
            f32_bytes as f64 / 1e6,
            packs.len(),
            work.0.display(),
            reader.why()
        )),
    );
    report.push(
        Row::new(
            "gpu",
            format!("cold read, {kind} (median)"),
            gbs(pack_bytes, raw_m),
            "GB/s",
        )
        .note(format!(
            "the yardstick: FileReader::read_file_staged of each pack, one at a time{}; {:.2} ms, \
             best {:.2} GB/s; {loads} reads",
            if uncache {
                ", each after posix_fadvise(DONTNEED)"
            } else {
                " (page cache not dropped: fadvise failed)"
            },
            ms(raw_m),
            gbs(pack_bytes, best(&s.raw))
        )),
    );
    report.push(
        Row::new(
            "gpu",
            "cold load disk -> VRAM (median)",
            gbs(pack_bytes, cold_m),
            "GB/s",
        )
        .vs("cold read (median)", gbs(pack_bytes, raw_m))
        .note(format!(
            "GB/s of pack bytes: the same read, pack::decode, CudaBackend::prefetch_adapter, \
             wait until adapters_in_flight() == 0; best {:.2} GB/s; {loads} loads",
            gbs(pack_bytes, best(&s.cold))
        )),
    );
    report.push(
        Row::new(
            "gpu",
            "cold load disk -> VRAM per adapter (median)",
            ms(cold_m),
            "ms",
        )
        .vs("cold read (median)", ms(raw_m))
        .note(format!("best {:.2} ms", ms(best(&s.cold)))),
    );
    for (part, v, what) in [
        ("read", &s.read, "FileReader::read_file_staged"),
        (
            "decode",
            &s.decode,
            "pack::decode: checks (blake3), f16 -> f32, Q8_0 copies",
        ),
        (
            "upload",
            &s.upload,
            "prefetch_adapter (A and B into reused pinned staging, one copy on the upload stream) and \
             the wait",
        ),
    ] {
        report.push(
            Row::new(
                "gpu",
                format!("cold load, {part} part (median)"),
                ms(median(v)),
                "ms",
            )
            .vs("cold load (median)", ms(cold_m))
            .note(what),
        );
    }
    let up_m = median(&s.upload_only);
    report.push(
        Row::new(
            "gpu",
            "upload only, host adapter -> VRAM (median)",
            ms(up_m),
            "ms",
        )
        .vs("cold load (median)", ms(cold_m))
        .note(format!(
            "a decoded LoraAdapter already in memory: prefetch_adapter and the wait; best {:.2} \
             ms; {} uploads",
            ms(best(&s.upload_only)),
            s.upload_only.len()
        )),
    );
    report.push(
        Row::new(
            "gpu",
            "upload only (median)",
            gbs(f32_bytes as f64, up_m),
            "GB/s",
        )
        .vs("pinned H2D copy", h2d / 1e9)
        .note(format!(
            "{:.1} MB of f32 A and B per adapter; the yardstick: one pinned buffer of as many \
             bytes copied to the device, best of 5",
            f32_bytes as f64 / 1e6
        )),
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The host side of a load (packs written, dropped from the cache, read back whole through
    /// the reader, decoded into the adapter that was written); the device side needs a GPU.
    #[test]
    fn packs_round_trip_through_the_reader() {
        let a = AdapterLoadArgs {
            shape: Shape::Smollm2,
            adapters: 2,
            rank: 2,
            targets: "q,v".into(),
            repeat: 1,
            dir: None,
            tokenizer: None,
        };
        let config = synth::model_config(a.shape).unwrap();
        let targets = parse_targets(&a.targets).unwrap();
        let work = Scratch(
            std::env::temp_dir().join(format!("edgelora-gpu-load-test-{}", std::process::id())),
        );
        std::fs::create_dir_all(&work.0).unwrap();
        let packs = write_packs(&work.0, &config, &a, &targets).unwrap();
        assert_eq!(packs.len(), 2);
        let mut reader = FileReader::new(ReaderConfig::default());
        for (i, p) in packs.iter().enumerate() {
            drop_cache(&p.path).unwrap();
            assert!(raw_read(&mut reader, p, true).unwrap() > 0.0);
            let ad =
                pack::decode(&p.info, reader.read_file_staged(&p.path).unwrap(), &config).unwrap();
            let want = random_adapter(&config, a.rank, &targets, i as u64, p.info.id());
            assert_eq!(ad.name, want.name);
            assert_eq!(ad.layers.len(), config.n_layers);
            for (l, w) in ad.layers.iter().zip(&want.layers) {
                for (x, y) in l.iter().zip(w) {
                    assert_eq!(x.as_ref().map(|p| p.a.len()), y.as_ref().map(|p| p.a.len()));
                }
            }
        }
    }
}
