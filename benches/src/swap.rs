//! `swap`: what bringing a cold LoRA adapter into memory costs, beside the disk's own speed
//! measured in the same run.
//!
//! A random adapter of a real model's shape (`--shape`, the dims `synth` writes) is written as an
//! f16 pack. Then, alternating in each of `--repeat` rounds:
//!
//! - the yardstick: a raw sequential `O_DIRECT` read of the same file, one 1 MiB read in flight
//!   (`fio --direct=1 --ioengine=psync --bs=1M` when fio is installed, else
//!   `edgelora_hal::storage::raw_direct_read`);
//! - `FileReader::read_file` through io_uring (the adapter loader's reader) and through the forced
//!   pread fallback;
//! - `pack::decode` of the bytes read (checks, f16 → f32, Q8_0 copies): the runtime adapter.
//!
//! `O_DIRECT` bypasses the page cache, so every read goes to the device: each one is cold.
//!
//! Then time to first token through the real server: K adapters of the TTFT model's shape are
//! written into a fresh adapters folder, `edgelorad serve` is started on it, and each adapter's
//! first request (its pack must be read and decoded) is timed against its next two (resident),
//! with the base model's TTFT as the yardstick.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail};
use clap::{Args, ValueEnum};
use edgelora_daemon::adapters::pack::{self, Manifest, PackDtype};
use edgelora_daemon::adapters::{LoraAdapter, LoraPair};
use edgelora_daemon::model::probe::probe_config;
use edgelora_daemon::model::{ModelConfig, Proj};
use edgelora_hal::storage::{FileReader, ReaderConfig, raw_direct_read};
use serde_json::{Value, json};

use crate::common::{init_threads, model_label, resolve_threads};
use crate::report::{Context, Report, Row};
use crate::rng::{Rng, seed_of};
use crate::serve::{edgelorad_bin, get_status, stream_once};
use crate::synth::Shape;

#[derive(Args, Debug)]
pub struct SwapArgs {
    /// The base model shape the adapter is made for (the dims `synth` uses).
    #[arg(long, value_enum, default_value = "llama-1b")]
    pub shape: Shape,
    /// LoRA rank.
    #[arg(long, default_value_t = 16)]
    pub rank: usize,
    /// Adapted projections: `all`, or a comma list of q,k,v,o,gate,up,down.
    #[arg(long, default_value = "all")]
    pub targets: String,
    /// Folder for the pack, on the disk to measure (default: under the edgelora cache folder, or
    /// /var/tmp when that is tmpfs).
    #[arg(long)]
    pub dir: Option<PathBuf>,
    /// Rounds of every read (best and median reported).
    #[arg(long, default_value_t = 5)]
    pub repeat: usize,
    /// Model of the TTFT measurement through `edgelorad serve` (default: the SmolLM2 GGUF when
    /// fetched; otherwise the TTFT part is skipped).
    #[arg(long)]
    pub ttft_model: Option<PathBuf>,
    /// Skip the TTFT measurement.
    #[arg(long)]
    pub no_ttft: bool,
    /// Adapters of the TTFT measurement (each: one cold request, then two warm ones).
    #[arg(long, default_value_t = 4)]
    pub ttft_adapters: usize,
    /// Tokens generated per TTFT request.
    #[arg(long, default_value_t = 2)]
    pub ttft_tokens: usize,
    /// The edgelorad binary (default: next to this one).
    #[arg(long)]
    pub edgelorad: Option<PathBuf>,
    /// Compute threads of the server (default: every core).
    #[arg(long)]
    pub threads: Option<usize>,
    #[arg(long)]
    pub json: bool,
}

/// The shape's name as on the command line.
pub fn shape_name(shape: Shape) -> String {
    shape
        .to_possible_value()
        .map(|v| v.get_name().to_string())
        .unwrap_or_else(|| format!("{shape:?}"))
}

/// `all`, or a comma list of projection names (`q` or `q_proj`, ...), in `Proj::ALL` order.
pub fn parse_targets(s: &str) -> Result<Vec<Proj>> {
    if s.trim().eq_ignore_ascii_case("all") {
        return Ok(Proj::ALL.to_vec());
    }
    let mut v = Vec::new();
    for t in s.split(',').map(str::trim).filter(|t| !t.is_empty()) {
        let name = if t.ends_with("_proj") {
            t.to_string()
        } else {
            format!("{t}_proj")
        };
        let p = Proj::from_hf_name(&name)
            .with_context(|| format!("unknown target {t:?} (q,k,v,o,gate,up,down or all)"))?;
        if !v.contains(&p) {
            v.push(p);
        }
    }
    if v.is_empty() {
        bail!("--targets names no projection");
    }
    v.sort_by_key(|p| p.index());
    Ok(v)
}

/// A short label: `all` or `q,v`.
pub fn targets_label(t: &[Proj]) -> String {
    if t.len() == Proj::ALL.len() {
        return "all".into();
    }
    t.iter()
        .map(|p| p.hf_name().trim_end_matches("_proj"))
        .collect::<Vec<_>>()
        .join(",")
}

/// A random LoRA adapter on `targets` of every layer (scaling 1), deterministic in `index`:
/// A uniform with std about `1/sqrt(in)`, B small, as `common::synth_adapter`.
pub fn random_adapter(
    c: &ModelConfig,
    rank: usize,
    targets: &[Proj],
    index: u64,
    name: &str,
) -> LoraAdapter {
    let layers = (0..c.n_layers)
        .map(|l| {
            let mut slot: [Option<LoraPair>; 7] = Default::default();
            for &p in targets {
                let (out, inp) = p.shape(c);
                let mut g = Rng::new(seed_of(&[0x5A9, index, l as u64, p.index() as u64]));
                let sa = (3.0 / inp as f32).sqrt();
                let a = (0..rank * inp).map(|_| g.symmetric(sa)).collect();
                let b = (0..out * rank).map(|_| g.symmetric(0.01)).collect();
                slot[p.index()] = Some(LoraPair::new(rank, a, b).expect("consistent LoRA shapes"));
            }
            slot
        })
        .collect();
    LoraAdapter {
        name: name.to_string(),
        rank,
        alpha: rank as f32,
        use_rslora: false,
        scaling: 1.0,
        layers,
        targets: targets.to_vec(),
    }
}

pub fn manifest(id: &str) -> Manifest {
    Manifest {
        id: id.to_string(),
        display_name: id.to_string(),
        contributor: "edgelora-bench".into(),
        license: None,
        source_digest: String::new(),
        created: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs()),
        source: "synthetic".into(),
    }
}

/// The filesystem holding `path` (or its nearest existing ancestor): a name for the common ones,
/// else the statfs magic in hex.
#[cfg(target_os = "linux")]
pub fn fs_name(path: &Path) -> String {
    use std::os::unix::ffi::OsStrExt;
    let mut p = path;
    while !p.exists() {
        match p.parent() {
            Some(q) => p = q,
            None => return "unknown".into(),
        }
    }
    let Ok(c) = std::ffi::CString::new(p.as_os_str().as_bytes()) else {
        return "unknown".into();
    };
    // SAFETY: an all-zero statfs is a valid value of this plain C struct.
    let mut s: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: `c` is a NUL-terminated path and `s` a statfs the call fills in.
    if unsafe { libc::statfs(c.as_ptr(), &mut s) } != 0 {
        return "unknown".into();
    }
    #[allow(clippy::unnecessary_cast)]
    let magic = s.f_type as i64 as u64 & 0xffff_ffff;
    match magic {
        0xEF53 => "ext4".into(),
        0x5846_5342 => "xfs".into(),
        0x9123_683E => "btrfs".into(),
        0xF2F5_2010 => "f2fs".into(),
        0x2FC1_2FC1 => "zfs".into(),
        0x0102_1994 => "tmpfs".into(),
        0x8584_58F6 => "ramfs".into(),
        0x794C_7630 => "overlayfs".into(),
        0x6969 => "nfs".into(),
        m => format!("fs magic {m:#x}"),
    }
}

#[cfg(not(target_os = "linux"))]
pub fn fs_name(_path: &Path) -> String {
    "unknown".into()
}

/// Whether reads from this filesystem go through memory anyway (no device behind it).
pub fn in_memory_fs(name: &str) -> bool {
    matches!(name, "tmpfs" | "ramfs")
}

/// `<edgelora cache>/<sub>` on a real disk: /var/tmp/edgelora-<sub> when the cache is in memory.
pub fn bench_dir(sub: &str) -> PathBuf {
    let d = edgelora_daemon::default_model::cache_dir().join(sub);
    if in_memory_fs(&fs_name(&d)) {
        PathBuf::from("/var/tmp").join(format!("edgelora-{sub}"))
    } else {
        d
    }
}

pub fn median(v: &[f64]) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    let n = s.len();
    if n % 2 == 1 {
        s[n / 2]
    } else {
        (s[n / 2 - 1] + s[n / 2]) / 2.0
    }
}

pub fn best(v: &[f64]) -> f64 {
    v.iter().copied().fold(f64::INFINITY, f64::min)
}

/// fio's version string when fio runs here.
fn fio_version() -> Option<String> {
    let out = Command::new("fio").arg("--version").output().ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// Read bandwidth in bytes/s from fio's `--output-format=json` (text before the JSON, such as
/// warnings, is skipped): `bw_bytes` of the first job, else `bw` (KiB/s).
fn parse_fio_bw(out: &str) -> Option<f64> {
    let v: Value = serde_json::from_str(&out[out.find('{')?..]).ok()?;
    let read = &v["jobs"][0]["read"];
    read["bw_bytes"]
        .as_f64()
        .filter(|&b| b > 0.0)
        .or_else(|| read["bw"].as_f64().map(|k| k * 1024.0))
        .filter(|&b| b > 0.0)
}

/// Seconds of one raw sequential O_DIRECT read of `path` (`len` bytes), 1 MiB per read, one in
/// flight: fio's figure when `fio` is set, else a timed `raw_direct_read`.
fn raw_read_secs(path: &Path, len: u64, fio: bool) -> Result<f64> {
    if fio {
        let out = Command::new("fio")
            .args([
                "--name=raw",
                "--readonly",
                "--rw=read",
                "--bs=1M",
                "--direct=1",
                "--ioengine=psync",
                "--iodepth=1",
                "--numjobs=1",
                "--output-format=json",
            ])
            .arg(format!("--filename={}", path.display()))
            .arg(format!("--size={len}"))
            .output()
            .context("running fio")?;
        let text = String::from_utf8_lossy(&out.stdout);
        let bw = parse_fio_bw(&text).with_context(|| {
            format!(
                "fio gave no read bandwidth: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            )
        })?;
        return Ok(len as f64 / bw);
    }
    let t0 = Instant::now();
    let n = raw_direct_read(path, 1 << 20)?;
    let s = t0.elapsed().as_secs_f64();
    if n != len {
        bail!(
            "raw read of {} gave {n} bytes, expected {len}",
            path.display()
        );
    }
    Ok(s)
}

pub fn run(a: SwapArgs) -> Result<()> {
    if a.rank == 0 {
        bail!("--rank must be at least 1");
    }
    let threads = resolve_threads(a.threads);
    init_threads(threads);
    let targets = parse_targets(&a.targets)?;
    let config = crate::synth::model_config(a.shape)?;
    let fp = pack::fingerprint(&config);
    let dir = a.dir.clone().unwrap_or_else(|| bench_dir("bench-swap"));
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let fs = fs_name(&dir);
    if in_memory_fs(&fs) {
        eprintln!(
            "warning: {} is on {fs}: reads come from memory, not a device (pass --dir on a disk)",
            dir.display()
        );
    }
    let shape = shape_name(a.shape);
    let tlabel = targets_label(&targets);
    let id = format!("swap-{shape}-r{}-{}", a.rank, tlabel.replace(',', "-"));
    let path = dir.join(format!("{id}.{}", pack::PACK_EXT));
    eprintln!(
        "synthesizing a rank-{} adapter of the {shape} shape on {tlabel} ...",
        a.rank
    );
    let adapter = random_adapter(&config, a.rank, &targets, 0, &id);
    let file_len = pack::write_pack(&path, &adapter, PackDtype::F16, &fp, &manifest(&id))?;
    drop(adapter);
    let info = pack::read_info(&path, &fp)?;
    let mb = file_len as f64 / 1e6;
    eprintln!("wrote {} ({mb:.1} MB, {fs})", path.display());

    let fio = fio_version();
    let mut uring = FileReader::new(ReaderConfig::default());
    let mut pread = FileReader::new(ReaderConfig {
        force_pread: true,
        ..ReaderConfig::default()
    });
    // One untimed pass of each: code paths, the ring, the staging buffers' first growth.
    raw_read_secs(&path, file_len, fio.is_some())?;
    uring.read_file_staged(&path)?;
    drop(uring.read_file(&path)?);
    pread.read_file_staged(&path)?;
    let repeat = a.repeat.max(1);
    let check = |n: usize, what: &str| {
        if n as u64 != file_len {
            bail!("{what} read {n} of {file_len} bytes");
        }
        Ok(())
    };
    let (mut raw, mut staged, mut owned, mut pr, mut dec, mut ready, mut fill) = (
        Vec::new(),
        Vec::new(),
        Vec::new(),
        Vec::new(),
        Vec::new(),
        Vec::new(),
        Vec::new(),
    );
    for r in 0..repeat {
        eprintln!(
            "round {}/{repeat}: raw read; io_uring staged + decode; io_uring owned; pread staged ...",
            r + 1
        );
        raw.push(raw_read_secs(&path, file_len, fio.is_some())?);
        let t0 = Instant::now();
        let bytes = uring.read_file_staged(&path)?;
        let t1 = Instant::now();
        let ad = pack::decode(&info, bytes, &config)?;
        let t2 = Instant::now();
        check(bytes.len(), "io_uring staged")?;
        std::hint::black_box(&ad);
        drop(ad);
        staged.push((t1 - t0).as_secs_f64());
        dec.push((t2 - t1).as_secs_f64());
        ready.push((t2 - t0).as_secs_f64());
        let t0 = Instant::now();
        let buf = uring.read_file(&path)?;
        owned.push(t0.elapsed().as_secs_f64());
        check(buf.len(), "io_uring owned")?;
        drop(buf);
        let t0 = Instant::now();
        let n = pread.read_file_staged(&path)?.len();
        pr.push(t0.elapsed().as_secs_f64());
        check(n, "pread staged")?;
        // What a fresh destination costs by itself: allocating and touching every page.
        let t0 = Instant::now();
        let mut v = vec![0u8; file_len as usize];
        for i in (0..v.len()).step_by(4096) {
            v[i] = 1;
        }
        std::hint::black_box(&v);
        fill.push(t0.elapsed().as_secs_f64());
    }

    let mut report = Report::new(
        a.json,
        Context {
            threads,
            batch: None,
            model: Some(format!("{shape} shape")),
        },
    );
    let mbs = |s: f64| mb / s;
    let ms = |s: f64| s * 1e3;
    let raw_how = match &fio {
        Some(v) => {
            format!("{v} --rw=read --bs=1M --direct=1 --ioengine=psync (one read in flight)")
        }
        None => "raw_direct_read: O_DIRECT pread loop into one reused 1 MiB buffer, one read in \
                 flight (fio not installed)"
            .to_string(),
    };
    report.push(Row::new("swap", "pack size", mb, "MB").note(format!(
        "rank {}, targets {tlabel}, f16, {} tensors ({:.1} MB as f32); {} on {fs}; O_DIRECT \
         bypasses the page cache, so every read below is cold (from the device)",
        a.rank,
        info.tensors.len(),
        info.f32_bytes() as f64 / 1e6,
        path.display(),
    )));
    report.push(
        Row::new("swap", "raw O_DIRECT read (best)", mbs(best(&raw)), "MB/s").note(format!(
            "the yardstick: {raw_how}; best of {repeat}, median {:.0} MB/s, {:.2} ms",
            mbs(median(&raw)),
            ms(median(&raw))
        )),
    );
    let kind = uring.kind();
    let reads: [(String, &Vec<f64>, String); 3] = [
        (
            format!("cold read, {kind} staged"),
            &staged,
            format!(
                "FileReader::read_file_staged (the reader's reused buffer): {}",
                uring.why()
            ),
        ),
        (
            format!("cold read, {kind} owned"),
            &owned,
            format!(
                "FileReader::read_file (fresh memory each call; allocating and touching {mb:.1} MB \
                 alone takes {:.2} ms, median)",
                ms(median(&fill))
            ),
        ),
        (
            "cold read, pread staged".to_string(),
            &pr,
            format!("FileReader::read_file_staged: {}", pread.why()),
        ),
    ];
    for (name, v, note) in reads {
        report.push(
            Row::new("swap", format!("{name} (best)"), mbs(best(v)), "MB/s")
                .vs("raw O_DIRECT read (best)", mbs(best(&raw)))
                .note(note),
        );
        report.push(
            Row::new("swap", format!("{name} (median)"), mbs(median(v)), "MB/s")
                .vs("raw O_DIRECT read (median)", mbs(median(&raw))),
        );
    }
    report.push(
        Row::new("swap", "decode (median)", ms(median(&dec)), "ms")
            .vs(format!("{kind} staged read (median)"), ms(median(&staged)))
            .note(format!(
                "pack::decode: header and payload checks (blake3), f16 -> f32, Q8_0 copies; \
                 best {:.2} ms",
                ms(best(&dec))
            )),
    );
    report.push(
        Row::new(
            "swap",
            "ready = staged read + decode (median)",
            ms(median(&ready)),
            "ms",
        )
        .vs("raw O_DIRECT read time (median)", ms(median(&raw)))
        .note(format!(
            "read and decode back to back, as a loader thread does on a miss; best {:.2} ms, \
             i.e. {:.0} MB/s of pack",
            ms(best(&ready)),
            mbs(best(&ready))
        )),
    );

    if a.no_ttft {
        eprintln!("skipping TTFT (--no-ttft)");
    } else {
        ttft(&a, threads, &targets, &dir, &mut report)?;
    }
    report.print();
    Ok(())
}

/// The server process, killed when dropped.
struct Server(Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A folder removed when dropped.
struct Scratch(PathBuf);

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Seconds from sending a streaming completion to the first chunk carrying a token, and the
/// tokens of the whole stream.
fn ttft_once(port: u16, body: &str) -> Result<(f64, usize)> {
    let st = stream_once(port, body)?;
    let t = st.ttft.context("the stream carried no token")?;
    Ok((t.as_secs_f64(), st.tokens))
}

const TTFT_PROMPT: &str = "The history of the region begins with small farming villages";

fn ttft(
    a: &SwapArgs,
    threads: usize,
    targets: &[Proj],
    dir: &Path,
    report: &mut Report,
) -> Result<()> {
    let model = match &a.ttft_model {
        Some(p) => p.clone(),
        None => {
            let p = edgelora_daemon::default_model::model_path();
            if !p.is_file() {
                eprintln!(
                    "skipping TTFT: the default model {} is not fetched (`edgelorad model fetch`, \
                     or pass --ttft-model)",
                    p.display()
                );
                return Ok(());
            }
            p
        }
    };
    let bin = edgelorad_bin(a.edgelorad.as_deref())?;
    if !bin.is_file() {
        eprintln!(
            "skipping TTFT: {} not found (`cargo build --release -p edgelora-daemon`, or pass \
             --edgelorad)",
            bin.display()
        );
        return Ok(());
    }
    let config = probe_config(&model).with_context(|| format!("reading {}", model.display()))?;
    let fp = pack::fingerprint(&config);
    let work = Scratch(dir.join(format!("ttft-{}", std::process::id())));
    let adir = work.0.join("adapters");
    std::fs::create_dir_all(&adir)?;
    let k = a.ttft_adapters.max(1);
    let ids: Vec<String> = (0..k).map(|i| format!("ttft-{i}")).collect();
    eprintln!(
        "TTFT: writing {k} rank-{} adapters of {} into {} ...",
        a.rank,
        model_label(&model),
        adir.display()
    );
    let mut paths = Vec::new();
    for (i, id) in ids.iter().enumerate() {
        let ad = random_adapter(&config, a.rank, targets, 1000 + i as u64, id);
        let p = adir.join(format!("{id}.{}", pack::PACK_EXT));
        pack::write_pack(&p, &ad, PackDtype::F16, &fp, &manifest(id))?;
        paths.push(p);
    }
    let pack_mb = std::fs::metadata(&paths[0])?.len() as f64 / 1e6;
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    eprintln!("TTFT: starting {} serve on port {port} ...", bin.display());
    let mut server = Server(
        Command::new(&bin)
            .arg("serve")
            .arg("--model")
            .arg(&model)
            .arg("--adapters-dir")
            .arg(&adir)
            .arg("--data-dir")
            .arg(&work.0)
            .args(["--listen", &format!("127.0.0.1:{port}")])
            .args(["--threads", &threads.to_string()])
            .args(["--device", "cpu"])
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .with_context(|| format!("spawning {}", bin.display()))?,
    );
    let t0 = Instant::now();
    while get_status(port, "/health") != Some(200) {
        if let Some(st) = server.0.try_wait()? {
            bail!("edgelorad exited before it was ready ({st})");
        }
        if t0.elapsed() > Duration::from_secs(300) {
            bail!("the server never became ready");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let base_id = model
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default();
    let body = |m: &str| {
        json!({
            "model": m, "prompt": TTFT_PROMPT, "max_tokens": a.ttft_tokens.max(1),
            "temperature": 0, "ignore_eos": true, "stream": true, "return_token_ids": true,
        })
        .to_string()
    };
    // Untimed: the first requests warm the server (allocations, caches).
    for _ in 0..2 {
        ttft_once(port, &body(&base_id))?;
    }
    let (mut base, mut cold, mut warm) = (Vec::new(), Vec::new(), Vec::new());
    for id in &ids {
        eprintln!("TTFT: base, then {id} cold and warm twice ...");
        base.push(ttft_once(port, &body(&base_id))?.0);
        cold.push(ttft_once(port, &body(id))?.0);
        for _ in 0..2 {
            warm.push(ttft_once(port, &body(id))?.0);
        }
    }
    base.push(ttft_once(port, &body(&base_id))?.0);
    drop(server);
    // The yardstick of the difference: what the loader does for these packs, in this process
    // (the server is gone, so nothing competes for the cores).
    let mut reader = FileReader::new(ReaderConfig::default());
    let mut ready = Vec::new();
    for p in &paths {
        let info = pack::read_info(p, &fp)?;
        let t0 = Instant::now();
        let bytes = reader.read_file_staged(p)?;
        let ad = pack::decode(&info, bytes, &config)?;
        ready.push(t0.elapsed().as_secs_f64());
        std::hint::black_box(&ad);
    }
    let ms = |s: f64| s * 1e3;
    let (b, c, w) = (median(&base), median(&cold), median(&warm));
    let label = model_label(&model);
    report.push(
        Row::new("swap", "TTFT base model (median)", ms(b), "ms").note(format!(
            "edgelorad serve --device cpu --threads {threads} on {label}; streaming completions of \
             a {}-character prompt, max_tokens {}, one at a time; {} requests",
            TTFT_PROMPT.len(),
            a.ttft_tokens.max(1),
            base.len()
        )),
    );
    report.push(
        Row::new("swap", "TTFT adapter, warm (median)", ms(w), "ms")
            .vs("base model", ms(b))
            .note(format!(
                "the 2nd and 3rd request of each of {k} adapters (rank {}, {}, f16 packs of \
                 {pack_mb:.1} MB): resident",
                a.rank,
                targets_label(targets)
            )),
    );
    report.push(
        Row::new("swap", "TTFT adapter, cold (median)", ms(c), "ms")
            .vs("adapter, warm", ms(w))
            .note("each adapter's 1st request: its pack is read and decoded first"),
    );
    report.push(
        Row::new("swap", "cold - warm (= load cost)", ms(c - w), "ms")
            .vs("read + decode in process (median)", ms(median(&ready)))
            .note(format!(
                "in-process: FileReader::read_file_staged ({}) + pack::decode of the same {k} \
                 packs, after the server stopped",
                reader.why()
            )),
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn llama_1b_all_rank_16_is_about_22_mb_of_f16() {
        let c = crate::synth::model_config(Shape::Llama1b).unwrap();
        assert_eq!((c.hidden_size, c.n_layers, c.head_dim), (2048, 16, 64));
        let elems: usize = Proj::ALL
            .iter()
            .map(|p| {
                let (o, i) = p.shape(&c);
                16 * (o + i)
            })
            .sum::<usize>()
            * c.n_layers;
        assert_eq!(elems * 2, 22_544_384);
    }

    /// The hand-kept numbers give the fingerprint of a folder `synth` wrote, where one exists
    /// (`edgelora-bench synth --shape S --out ~/.cache/edgelora/synth/S`).
    #[test]
    fn shape_configs_match_synthesized_folders() {
        let root = edgelora_daemon::default_model::cache_dir().join("synth");
        for shape in [Shape::Llama1b, Shape::Llama8b, Shape::Smollm2] {
            let dir = root.join(shape_name(shape));
            if !dir.join("config.json").is_file() {
                eprintln!("SKIP {}: no synthesized folder", dir.display());
                continue;
            }
            let probed = probe_config(&dir).unwrap();
            let ours = crate::synth::model_config(shape).unwrap();
            assert_eq!(
                pack::fingerprint(&probed),
                pack::fingerprint(&ours),
                "{shape:?}"
            );
        }
    }

    #[test]
    fn targets_parse() {
        assert_eq!(parse_targets("all").unwrap().len(), 7);
        assert_eq!(parse_targets("v,q_proj").unwrap(), vec![Proj::Q, Proj::V]);
        assert_eq!(targets_label(&parse_targets("q,v").unwrap()), "q,v");
        assert!(parse_targets("qq").is_err());
    }

    #[test]
    fn fio_json_bandwidth() {
        let out = "fio: some warning\n{\"fio version\": \"fio-3.36\", \"jobs\": [{\"jobname\": \
                   \"raw\", \"read\": {\"io_bytes\": 22544384, \"bw_bytes\": 1500000000, \
                   \"bw\": 1464843}}]}";
        assert_eq!(parse_fio_bw(out), Some(1.5e9));
        let old = "{\"jobs\": [{\"read\": {\"bw\": 1000}}]}";
        assert_eq!(parse_fio_bw(old), Some(1_024_000.0));
        assert_eq!(parse_fio_bw("nothing"), None);
    }

    #[test]
    fn medians() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&[4.0, 1.0, 2.0, 3.0]), 2.5);
        assert_eq!(best(&[4.0, 1.0]), 1.0);
    }
}
