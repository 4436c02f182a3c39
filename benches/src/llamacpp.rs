//! llama.cpp as a yardstick, through the PyPI package `llama-cpp-python` built for this CPU into the
//! bench's own virtual environment (`$EDGELORA_CACHE/llamacpp-venv`, built once and cached; never
//! vendored). A small Python script, embedded here, loads the same GGUF with the same threads and
//! prints its decode and prefill speeds as JSON, from llama.cpp's own timers (`llama_perf_context`)
//! and from the wall clock.

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant, SystemTime};

use anyhow::{Context, Result, bail};
use serde_json::{Value, json};

/// What `pip install` gets: pinned so that figures from different days compare.
pub const DEFAULT_SPEC: &str = "llama-cpp-python==0.3.36";

const SCRIPT: &str = r#"
import json, sys, time
import numpy as np
import llama_cpp
from llama_cpp import Llama

a = json.loads(sys.argv[1])
t = a["threads"]
llm = Llama(model_path=a["model"], n_threads=t, n_threads_batch=t, n_ctx=a["n_ctx"],
            n_batch=512, n_ubatch=512, verbose=False)
ctx = llm.ctx
n_vocab = llm.n_vocab()

def next_token():
    p = llama_cpp.llama_get_logits_ith(ctx, -1)
    return int(np.ctypeslib.as_array(p, shape=(n_vocab,)).argmax())

out = {"version": llama_cpp.__version__,
       "system_info": llama_cpp.llama_print_system_info().decode(errors="replace").strip()}
d = a.get("decode")
if d:
    llm.reset()
    llm.eval(d["prompt"])
    tok = next_token()
    for _ in range(d["warmup"]):
        llm.eval([tok])
        tok = next_token()
    llama_cpp.llama_perf_context_reset(ctx)
    t0 = time.perf_counter()
    for _ in range(d["steps"]):
        llm.eval([tok])
        tok = next_token()
    wall = time.perf_counter() - t0
    perf = llama_cpp.llama_perf_context(ctx)
    out["decode"] = {"steps": d["steps"], "wall_s": wall,
                     "perf_ms": perf.t_eval_ms, "perf_n": perf.n_eval}
p = a.get("prefill")
if p:
    toks = p["tokens"]
    llm.reset()
    llm.eval(toks)  # warm-up
    llm.reset()
    llama_cpp.llama_perf_context_reset(ctx)
    t0 = time.perf_counter()
    llm.eval(toks)
    wall = time.perf_counter() - t0
    perf = llama_cpp.llama_perf_context(ctx)
    out["prefill"] = {"tokens": len(toks), "wall_s": wall,
                      "perf_ms": perf.t_p_eval_ms, "perf_n": perf.n_p_eval}
print(json.dumps(out))
"#;

/// A ready llama-cpp-python environment.
pub struct LlamaCpp {
    python: PathBuf,
    script: PathBuf,
}

/// One measurement: tokens/s by llama.cpp's own timers (preferred) and by the wall clock.
#[derive(Clone, Copy, Debug)]
pub struct Speed {
    pub tps: f64,
    pub wall_tps: f64,
}

#[derive(Clone, Debug, Default)]
pub struct Measured {
    pub decode: Option<Speed>,
    pub prefill: Option<Speed>,
    pub version: String,
    pub system_info: String,
}

pub struct Request<'a> {
    pub model: &'a Path,
    pub threads: usize,
    pub n_ctx: usize,
    /// (prompt, warm-up steps, timed steps)
    pub decode: Option<(&'a [u32], usize, usize)>,
    pub prefill: Option<&'a [u32]>,
}

pub fn venv_dir() -> PathBuf {
    match std::env::var_os("EDGELORA_LLAMACPP_VENV") {
        Some(d) => PathBuf::from(d),
        None => edgelora_daemon::default_model::cache_dir().join("llamacpp-venv"),
    }
}

fn importable(python: &Path) -> bool {
    python.is_file()
        && Command::new(python)
            .args(["-c", "import llama_cpp"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
}

/// Removes the build lock when the build ends, however it ends.
struct LockGuard(PathBuf);
impl Drop for LockGuard {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

impl LlamaCpp {
    /// llama.cpp for a `--vs-llamacpp` comparison on `model`, when asked for.
    pub fn for_model(asked: bool, model: &edgelora_daemon::model::Model) -> Result<Option<Self>> {
        if !asked {
            return Ok(None);
        }
        if model.format != edgelora_daemon::model::ModelFormat::Gguf {
            bail!("--vs-llamacpp needs a GGUF model (llama.cpp reads only GGUF)");
        }
        Self::ensure().map(Some)
    }

    /// The cached environment, building it first when `import llama_cpp` fails there (about eight
    /// minutes on two cores). A build another process holds the lock for is waited for.
    pub fn ensure() -> Result<Self> {
        let venv = venv_dir();
        let python = venv.join("bin").join("python");
        let parent = venv.parent().unwrap_or(Path::new(".")).to_path_buf();
        std::fs::create_dir_all(&parent)
            .with_context(|| format!("creating {}", parent.display()))?;
        let lock = parent.join("llamacpp-build.lock");
        let log = parent.join("llamacpp-build.log");
        let t0 = Instant::now();
        let _guard = loop {
            if importable(&python) {
                return Self::ready(python);
            }
            match std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(&lock)
            {
                Ok(mut f) => {
                    let _ = writeln!(f, "{}", std::process::id());
                    break LockGuard(lock.clone());
                }
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                    let age = std::fs::metadata(&lock)
                        .and_then(|m| m.modified())
                        .ok()
                        .and_then(|m| SystemTime::now().duration_since(m).ok())
                        .unwrap_or_default();
                    if age > Duration::from_secs(90 * 60) {
                        eprintln!("[llama.cpp] removing a stale build lock {}", lock.display());
                        let _ = std::fs::remove_file(&lock);
                        continue;
                    }
                    eprintln!(
                        "[llama.cpp] another process is building {} (lock {}, log {}); waiting ({:.0} min so far)",
                        venv.display(),
                        lock.display(),
                        log.display(),
                        t0.elapsed().as_secs_f64() / 60.0
                    );
                    std::thread::sleep(Duration::from_secs(30));
                }
                Err(e) => return Err(e).with_context(|| format!("creating {}", lock.display())),
            }
        };
        // Someone may have finished between our check and taking the lock.
        if importable(&python) {
            return Self::ready(python);
        }
        build(&venv, &python, &log)?;
        if !importable(&python) {
            bail!(
                "llama-cpp-python was installed into {} but `import llama_cpp` still fails (see {})",
                venv.display(),
                log.display()
            );
        }
        Self::ready(python)
    }

    fn ready(python: PathBuf) -> Result<Self> {
        let script =
            std::env::temp_dir().join(format!("edgelora-llamacpp-{}.py", std::process::id()));
        std::fs::write(&script, SCRIPT).with_context(|| format!("writing {}", script.display()))?;
        Ok(Self { python, script })
    }

    /// Runs one measurement in a fresh Python process.
    pub fn measure(&self, req: &Request<'_>) -> Result<Measured> {
        let mut arg = json!({
            "model": req.model,
            "threads": req.threads,
            "n_ctx": req.n_ctx,
        });
        if let Some((prompt, warmup, steps)) = req.decode {
            arg["decode"] = json!({"prompt": prompt, "warmup": warmup, "steps": steps});
        }
        if let Some(tokens) = req.prefill {
            arg["prefill"] = json!({ "tokens": tokens });
        }
        let out = Command::new(&self.python)
            .arg(&self.script)
            .arg(arg.to_string())
            .output()
            .with_context(|| format!("running {}", self.python.display()))?;
        let stdout = String::from_utf8_lossy(&out.stdout);
        if !out.status.success() {
            bail!(
                "the llama.cpp script failed ({}):\n{}\n{}",
                out.status,
                stdout.trim(),
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        let line = stdout
            .lines()
            .rev()
            .find(|l| l.trim_start().starts_with('{'))
            .context("the llama.cpp script printed no JSON")?;
        let v: Value = serde_json::from_str(line).context("parsing the llama.cpp script's JSON")?;
        let speed = |k: &str| -> Option<Speed> {
            let o = v.get(k)?;
            let n = o.get("perf_n")?.as_f64()?;
            let ms = o.get("perf_ms")?.as_f64()?;
            let wall = o.get("wall_s")?.as_f64()?;
            let count = o
                .get("steps")
                .or_else(|| o.get("tokens"))
                .and_then(Value::as_f64)?;
            Some(Speed {
                // Fall back to the wall clock if the timers did not see the calls.
                tps: if n > 0.0 && ms > 0.0 {
                    n / (ms / 1e3)
                } else {
                    count / wall
                },
                wall_tps: count / wall,
            })
        };
        Ok(Measured {
            decode: speed("decode"),
            prefill: speed("prefill"),
            version: v["version"].as_str().unwrap_or("?").to_string(),
            system_info: v["system_info"].as_str().unwrap_or("").to_string(),
        })
    }
}

impl Drop for LlamaCpp {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.script);
    }
}

/// `python3 -m venv` + `pip install` with `CMAKE_ARGS=-DGGML_NATIVE=ON`, echoing pip's lines and a
/// heartbeat every minute (the compile is quiet for minutes at a time); everything goes to `log`.
fn build(venv: &Path, python: &Path, log: &Path) -> Result<()> {
    let spec = std::env::var("EDGELORA_LLAMACPP_SPEC").unwrap_or_else(|_| DEFAULT_SPEC.into());
    let cmake_args = std::env::var("CMAKE_ARGS").unwrap_or_else(|_| "-DGGML_NATIVE=ON".to_string());
    eprintln!(
        "[llama.cpp] building {spec} for this CPU into {} (CMAKE_ARGS={cmake_args}); this takes \
         about 8 minutes on 2 cores, once; log: {}",
        venv.display(),
        log.display()
    );
    let log_file = std::sync::Mutex::new(
        std::fs::File::create(log).with_context(|| format!("creating {}", log.display()))?,
    );
    let t0 = Instant::now();
    let run = |cmd: &mut Command, what: &str| -> Result<()> {
        let mut child = cmd
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("starting {what}"))?;
        let done = AtomicBool::new(false);
        let status = std::thread::scope(|s| {
            let echo = |r: Box<dyn std::io::Read + Send>| {
                let log_file = &log_file;
                move || {
                    for line in BufReader::new(r).lines().map_while(Result::ok) {
                        if let Ok(mut f) = log_file.lock() {
                            let _ = writeln!(f, "{line}");
                        }
                        let l = line.trim();
                        if !l.is_empty() {
                            eprintln!("[llama.cpp {:>4.0}s] {l}", t0.elapsed().as_secs_f64());
                        }
                    }
                }
            };
            let out = child.stdout.take().map(|o| s.spawn(echo(Box::new(o))));
            let err = child.stderr.take().map(|e| s.spawn(echo(Box::new(e))));
            let done = &done;
            s.spawn(move || {
                let mut last = Instant::now();
                while !done.load(Ordering::Relaxed) {
                    std::thread::sleep(Duration::from_millis(500));
                    if last.elapsed() >= Duration::from_secs(60) {
                        last = Instant::now();
                        eprintln!(
                            "[llama.cpp {:>4.0}s] still building ...",
                            t0.elapsed().as_secs_f64()
                        );
                    }
                }
            });
            let status = child.wait();
            for h in [out, err].into_iter().flatten() {
                let _ = h.join();
            }
            done.store(true, Ordering::Relaxed);
            status
        })
        .with_context(|| format!("waiting for {what}"))?;
        if let Ok(mut f) = log_file.lock() {
            let _ = writeln!(f, "exit {}", status.code().unwrap_or(-1));
        }
        if !status.success() {
            bail!("{what} failed ({status}); see {}", log.display());
        }
        Ok(())
    };
    if !python.is_file() {
        let host = std::env::var("PYTHON").unwrap_or_else(|_| "python3".into());
        run(
            Command::new(&host).args(["-m", "venv"]).arg(venv),
            "creating the virtual environment",
        )?;
    }
    run(
        Command::new(python)
            .args(["-m", "pip", "install", "--progress-bar", "off", &spec])
            .env("CMAKE_ARGS", &cmake_args),
        "pip install",
    )?;
    eprintln!(
        "[llama.cpp] built in {:.1} min",
        t0.elapsed().as_secs_f64() / 60.0
    );
    Ok(())
}
