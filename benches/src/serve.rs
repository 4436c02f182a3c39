//! `serve`: a load generator over real HTTP against `edgelorad serve`, beside the same engine's
//! in-process decode at the same batch size measured in the same run (the HTTP + scheduling
//! overhead ratio).
//!
//! C clients each send N streaming completions (token-id prompts, greedy, `ignore_eos`, a fixed
//! number of tokens) one after another; the time to first token is taken when the first SSE chunk
//! carrying a token arrives.

use std::io::{BufRead, BufReader, Write};
use std::net::TcpStream;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail};
use clap::Args;
use edgelora_daemon::adapters::LoraAdapter;

use crate::common::{ModelArgs, init_threads, model_label, resolve_threads, text_tokens};
use crate::decode::run_once;
use crate::report::{Context, Report, Row};

#[derive(Args, Debug)]
pub struct ServeBenchArgs {
    #[command(flatten)]
    pub m: ModelArgs,
    /// Concurrent clients, one measurement each.
    #[arg(long, value_delimiter = ',', default_value = "1,8,32,128")]
    pub clients: Vec<usize>,
    /// Requests each client sends, one after another.
    #[arg(long, default_value_t = 3)]
    pub requests: usize,
    /// Generated tokens per request.
    #[arg(long, default_value_t = 32)]
    pub max_tokens: usize,
    /// Prompt tokens per request.
    #[arg(long, default_value_t = 16)]
    pub prompt: usize,
    /// Compute threads of the server and of the in-process yardstick.
    #[arg(long)]
    pub threads: Option<usize>,
    /// The edgelorad binary (default: next to this one).
    #[arg(long)]
    pub edgelorad: Option<std::path::PathBuf>,
    #[arg(long)]
    pub json: bool,
}

struct Server(Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The status of a GET on the local server (`None` while it does not answer).
pub fn get_status(port: u16, path: &str) -> Option<u16> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).ok()?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut line = String::new();
    BufReader::new(s).read_line(&mut line).ok()?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// What one streaming completion took.
pub struct Streamed {
    /// Until the first chunk carrying a token (`None`: none did).
    pub ttft: Option<Duration>,
    pub tokens: usize,
    pub total: Duration,
}

/// One streaming completion of `body`, read to its end.
pub fn stream_once(port: u16, body: &str) -> Result<Streamed> {
    let t0 = Instant::now();
    let mut s = TcpStream::connect(("127.0.0.1", port))?;
    s.set_read_timeout(Some(Duration::from_secs(600)))?;
    s.set_nodelay(true)?;
    write!(
        s,
        "POST /v1/completions HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )?;
    let mut r = BufReader::new(s);
    let mut line = String::new();
    r.read_line(&mut line)?;
    if !line.contains(" 200 ") {
        let mut rest = String::new();
        let _ = std::io::Read::read_to_string(&mut r, &mut rest);
        bail!("server answered {}: {}", line.trim(), rest.trim());
    }
    let (mut ttft, mut tokens) = (None, 0usize);
    loop {
        line.clear();
        if r.read_line(&mut line)? == 0 {
            break;
        }
        let Some(data) = line.trim().strip_prefix("data: ") else {
            continue;
        };
        if data == "[DONE]" {
            break;
        }
        let v: serde_json::Value = serde_json::from_str(data)?;
        let n = v["choices"][0]["token_ids"]
            .as_array()
            .map_or(0, |a| a.len());
        if n > 0 && ttft.is_none() {
            ttft = Some(t0.elapsed());
        }
        tokens += n;
    }
    Ok(Streamed {
        ttft,
        tokens,
        total: t0.elapsed(),
    })
}

/// The `edgelorad` binary: `given`, else the one next to this bench binary.
pub fn edgelorad_bin(given: Option<&std::path::Path>) -> Result<std::path::PathBuf> {
    Ok(match given {
        Some(p) => p.to_path_buf(),
        None => std::env::current_exe()?
            .parent()
            .context("bench binary folder")?
            .join("edgelorad"),
    })
}

fn percentile(v: &mut [f64], p: f64) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    v.sort_by(f64::total_cmp);
    v[((v.len() - 1) as f64 * p).round() as usize]
}

pub fn run(a: ServeBenchArgs) -> Result<()> {
    let threads = resolve_threads(a.threads);
    init_threads(threads);
    let path = a.m.path()?;
    let bin = edgelorad_bin(a.edgelorad.as_deref())?;
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let max_c = a.clients.iter().copied().max().unwrap_or(1);
    let kv_tokens = max_c * (a.prompt + a.max_tokens + 32);
    eprintln!("starting {} serve on port {port} ...", bin.display());
    let _server = Server(
        Command::new(&bin)
            .arg("serve")
            .arg("--model")
            .arg(&path)
            .args(["--listen", &format!("127.0.0.1:{port}")])
            .args(["--threads", &threads.to_string()])
            .args(["--act", &format!("{:?}", a.m.act).to_lowercase()])
            .args(["--kv", &a.m.kv.to_string()])
            .args(["--kv-tokens", &kv_tokens.to_string()])
            .args(["--max-running", &max_c.to_string()])
            .args(["--device", "cpu"])
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .with_context(|| format!("spawning {}", bin.display()))?,
    );
    let t0 = Instant::now();
    while get_status(port, "/health") != Some(200) {
        if t0.elapsed() > Duration::from_secs(300) {
            bail!("the server never became ready");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    // The same model in this process, for the in-process decode yardstick.
    let l = a.m.load()?;
    let model = &l.model;
    let prompt = text_tokens(model, a.prompt.max(1))?;
    let model_id = path
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default();
    let body = serde_json::json!({
        "model": model_id, "prompt": prompt, "max_tokens": a.max_tokens, "temperature": 0,
        "ignore_eos": true, "stream": true, "return_token_ids": true,
    })
    .to_string();
    let mut report = Report::new(
        a.json,
        Context {
            threads,
            batch: None,
            model: Some(model_label(&path)),
        },
    );
    for &c in &a.clients {
        eprintln!("{c} clients x {} requests ...", a.requests);
        let t0 = Instant::now();
        let results: Vec<Result<Vec<Streamed>>> = std::thread::scope(|s| {
            let hs: Vec<_> = (0..c)
                .map(|_| {
                    s.spawn(|| {
                        (0..a.requests)
                            .map(|_| stream_once(port, &body))
                            .collect::<Result<Vec<_>>>()
                    })
                })
                .collect();
            hs.into_iter()
                .map(|h| h.join().expect("client thread"))
                .collect()
        });
        let wall = t0.elapsed().as_secs_f64();
        let mut ttft = Vec::new();
        let mut tokens = 0usize;
        for r in results {
            for st in r? {
                ttft.push(st.ttft.unwrap_or(st.total).as_secs_f64() * 1e3);
                tokens += st.tokens;
            }
        }
        let n_req = ttft.len();
        // The yardstick: the engine decoding `c` sequences in this process, same threads.
        let mut pool = a.m.pool(model, c, a.prompt + 4 + a.max_tokens + 1)?;
        let none: Vec<Option<&LoraAdapter>> = vec![None; c];
        let engine = run_once(model, &mut pool, &none, a.prompt, 4, a.max_tokens, &l.opts)?;
        let tps = tokens as f64 / wall;
        report.push(
            Row::new("serve", format!("{c} clients: tokens/s"), tps, "tok/s")
                .vs(format!("in-process decode, batch {c}"), engine)
                .note(format!(
                    "{n_req} requests of {} prompt + {} generated tokens, streamed",
                    a.prompt, a.max_tokens
                )),
        );
        report.push(Row::new(
            "serve",
            format!("{c} clients: requests/s"),
            n_req as f64 / wall,
            "req/s",
        ));
        report.push(Row::new(
            "serve",
            format!("{c} clients: TTFT p50"),
            percentile(&mut ttft, 0.5),
            "ms",
        ));
        report.push(Row::new(
            "serve",
            format!("{c} clients: TTFT p99"),
            percentile(&mut ttft, 0.99),
            "ms",
        ));
    }
    report.print();
    Ok(())
}
