//! `edgelorad serve` end to end: the real binary on the tiny-llama fixture and its adapters,
//! spoken to over plain HTTP/1.1.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use edgelora_tests::*;
use serde_json::{Value, json};

struct Server {
    child: Child,
    port: u16,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The fixture's three PEFT adapters imported into packs (once per test process), as a user
/// does with `edgelorad adapters import`.
fn fixture_packs() -> &'static std::path::Path {
    static DIR: std::sync::OnceLock<std::path::PathBuf> = std::sync::OnceLock::new();
    DIR.get_or_init(|| {
        let dir = tmp_dir("serve-packs");
        import_fixture_adapters(&dir);
        dir
    })
}

fn import_fixture_adapters(dir: &std::path::Path) {
    let tiny_s = tiny().display().to_string();
    let dir_s = dir.display().to_string();
    for name in ["alpha-qv", "beta-attn", "gamma-all"] {
        let src = tiny().join("adapters").join(name).display().to_string();
        let (ok, _, err) = run_edgelorad(&[
            "adapters",
            "import",
            &src,
            "--id",
            name,
            "--contributor",
            "fixture",
            "--adapters",
            &dir_s,
            "--model",
            &tiny_s,
            "--replace",
        ]);
        assert!(ok, "importing {name}: {err}");
    }
}

fn start(extra: &[&str]) -> Server {
    start_with(fixture_packs(), extra)
}

fn start_with(adapters_dir: &std::path::Path, extra: &[&str]) -> Server {
    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    let tiny_s = tiny().display().to_string();
    let adapters = adapters_dir.display().to_string();
    let mut args = vec![
        "serve",
        "--model",
        &tiny_s,
        "--adapters-dir",
        &adapters,
        "--listen",
        &listen,
        "--device",
        "cpu",
    ];
    args.extend(extra);
    // Each server its own data dir (its own attribution ledger), unless the test names one.
    static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let data = tmp_dir(&format!(
        "serve-data-{}",
        N.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    ))
    .display()
    .to_string();
    if !extra.contains(&"--data-dir") {
        args.extend(["--data-dir", data.as_str()]);
    }
    let child = Command::new(edgelorad())
        .args(&args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawning edgelorad serve");
    let mut server = Server { child, port };
    let t0 = Instant::now();
    loop {
        if let Ok((200, _)) = request_on(port, "GET", "/health", None, &[]) {
            return server;
        }
        if let Ok(Some(st)) = server.child.try_wait() {
            panic!("edgelorad serve exited early: {st}");
        }
        assert!(
            t0.elapsed() < Duration::from_secs(60),
            "server never became ready"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

impl Server {
    /// Sends SIGTERM and waits (at most 30 s) for a clean exit.
    fn sigterm_and_wait(&mut self) {
        let st = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(st.success());
        let t0 = Instant::now();
        loop {
            if let Some(st) = self.child.try_wait().unwrap() {
                assert!(st.success(), "exit status after SIGTERM: {st}");
                return;
            }
            assert!(
                t0.elapsed() < Duration::from_secs(30),
                "still running after SIGTERM"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn post(&self, path: &str, body: &Value) -> (u16, Value) {
        self.post_raw(path, body.to_string().as_bytes(), &[])
    }

    fn post_raw(&self, path: &str, body: &[u8], headers: &[(&str, &str)]) -> (u16, Value) {
        let (st, b) = request_on(self.port, "POST", path, Some(body), headers).unwrap();
        let v = serde_json::from_slice(&b)
            .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&b)));
        (st, v)
    }

    fn health(&self) -> Value {
        let (st, b) = request_on(self.port, "GET", "/health", None, &[]).unwrap();
        assert_eq!(st, 200);
        serde_json::from_slice(&b).unwrap()
    }

    /// A streaming request: the `data:` payloads before `[DONE]` (asserted present).
    fn stream(&self, path: &str, body: &Value) -> Vec<Value> {
        let (st, b) = request_on(
            self.port,
            "POST",
            path,
            Some(body.to_string().as_bytes()),
            &[],
        )
        .unwrap();
        assert_eq!(st, 200, "{}", String::from_utf8_lossy(&b));
        let text = String::from_utf8(b).unwrap();
        let datas: Vec<&str> = text
            .split("\n\n")
            .filter_map(|e| e.trim().strip_prefix("data: "))
            .collect();
        assert_eq!(datas.last(), Some(&"[DONE]"), "stream ends with [DONE]");
        datas[..datas.len() - 1]
            .iter()
            .map(|d| serde_json::from_str(d).unwrap())
            .collect()
    }
}

fn ids(v: &Value) -> Vec<u32> {
    v.as_array()
        .unwrap_or_else(|| panic!("not an array: {v}"))
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

/// The served model name of a golden key's adapter.
fn model_name(adapter: Option<&str>) -> String {
    adapter.unwrap_or("tiny-llama").to_string()
}

#[test]
fn token_prompts_reproduce_the_golden_greedy_tokens_and_logprobs_for_every_model() {
    for quant in [false, true] {
        let dtype = if quant { "int4" } else { "f32" };
        let server = start(&["--dtype", dtype, "--act", "f32"]);
        for (key, adapter, q) in MODEL_KEYS {
            if q != quant {
                continue;
            }
            for p in 0..4 {
                let (st, v) = server.post(
                    "/v1/completions",
                    &json!({"model": model_name(adapter), "prompt": prompt(p), "max_tokens": 16,
                            "temperature": 0, "ignore_eos": true, "logprobs": 1,
                            "return_token_ids": true}),
                );
                assert_eq!(st, 200, "{key} p{p}: {v}");
                let ch = &v["choices"][0];
                let got = ids(&ch["token_ids"]);
                let want = golden_tensor(&format!("{key}_greedy_p{p}")).ids();
                assert_eq!(got, want, "{key} p{p}");
                assert_eq!(ids(&ch["prompt_token_ids"]), prompt(p));
                assert_eq!(v["usage"]["completion_tokens"], 16);
                let g = golden_tensor(&format!("{key}_genlogits_p{p}"));
                let vocab = g.shape[1];
                let lps = ch["logprobs"]["token_logprobs"].as_array().unwrap();
                assert_eq!(lps.len(), 16);
                for (i, lp) in lps.iter().enumerate() {
                    let row = &g.data[i * vocab..(i + 1) * vocab];
                    let want = row[want[i] as usize] as f64 - logsumexp(row);
                    let d = (lp.as_f64().unwrap() - want).abs();
                    assert!(d <= 1e-4, "{key} p{p} token {i}: logprob off by {d}");
                }
            }
        }
        // "<base>:<adapter>" names the same adapter.
        let (st, v) = server.post(
            "/v1/completions",
            &json!({"model": "tiny-llama:gamma-all", "prompt": prompt(1), "max_tokens": 16,
                    "temperature": 0, "ignore_eos": true, "return_token_ids": true}),
        );
        assert_eq!(st, 200, "{v}");
        let key = if quant {
            "quant_gamma_all"
        } else {
            "gamma_all"
        };
        assert_eq!(
            ids(&v["choices"][0]["token_ids"]),
            golden_tensor(&format!("{key}_greedy_p1")).ids()
        );
    }
}

#[test]
fn sixty_four_concurrent_streams_over_four_models_each_get_their_tokens_alone() {
    // A small KV budget, so the concurrent requests may preempt one another.
    let server = start(&[
        "--dtype",
        "f32",
        "--act",
        "f32",
        "--page-size",
        "4",
        "--kv-tokens",
        "400",
        "--max-step-tokens",
        "64",
    ]);
    let models = ["tiny-llama", "alpha-qv", "beta-attn", "gamma-all"];
    let body = |i: usize, stream: bool| {
        json!({"model": models[i % 4], "prompt": prompt((i / 4) % 4), "max_tokens": 12,
               "temperature": 0, "ignore_eos": true, "return_token_ids": true,
               "stream": stream, "stream_options": if stream { json!({"include_usage": true}) } else { Value::Null }})
    };
    let alone: Vec<Vec<u32>> = (0..16)
        .map(|i| {
            let (st, v) = server.post("/v1/completions", &body(i, false));
            assert_eq!(st, 200, "{v}");
            ids(&v["choices"][0]["token_ids"])
        })
        .collect();
    let server = std::sync::Arc::new(server);
    let handles: Vec<_> = (0..64)
        .map(|i| {
            let server = server.clone();
            let b = body(i % 16, true);
            std::thread::spawn(move || {
                let chunks = server.stream("/v1/completions", &b);
                let mut toks = Vec::new();
                let mut finish = None;
                for c in &chunks[..chunks.len() - 1] {
                    let ch = &c["choices"][0];
                    toks.extend(ids(&ch["token_ids"]));
                    if !ch["finish_reason"].is_null() {
                        finish = Some(ch["finish_reason"].as_str().unwrap().to_string());
                    }
                }
                let usage = &chunks.last().unwrap()["usage"];
                assert_eq!(usage["completion_tokens"], 12, "{usage}");
                (toks, finish)
            })
        })
        .collect();
    for (i, h) in handles.into_iter().enumerate() {
        let (toks, finish) = h.join().unwrap();
        assert_eq!(toks, alone[i % 16], "request {i}");
        assert_eq!(finish.as_deref(), Some("length"), "request {i}");
    }
    // Whether the small KV budget forced a preemption depends on how the 32 clients' arrivals
    // overlapped; the scheduler's unit test (tests/engine.rs) forces it deterministically.
    let h = server.health();
    eprintln!(
        "preemptions during the concurrent run: {}",
        h["preemptions"]
    );
    assert_eq!(h["running"], 0);
    // /health names the compute device and why it was chosen.
    assert_eq!(h["device"], "cpu", "{h}");
    assert_eq!(h["device_why"], "--device cpu", "{h}");
}

#[test]
fn a_client_that_goes_away_frees_its_sequence() {
    let server = start(&["--dtype", "f32", "--act", "f32"]);
    let body = json!({"model": "beta-attn", "prompt": prompt(0), "max_tokens": 500,
                      "temperature": 0, "ignore_eos": true, "stream": true})
    .to_string();
    let mut s = TcpStream::connect(("127.0.0.1", server.port)).unwrap();
    write!(
        s,
        "POST /v1/completions HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut seen = Vec::new();
    let mut buf = [0u8; 256];
    while !String::from_utf8_lossy(&seen).contains("data: ") {
        let n = s.read(&mut buf).unwrap();
        assert!(n > 0, "the stream started");
        seen.extend_from_slice(&buf[..n]);
    }
    drop(s);
    let t0 = Instant::now();
    loop {
        let h = server.health();
        if h["running"] == 0 && h["waiting"] == 0 && h["cancelled"] == 1 {
            let generated = h["generated_tokens"].as_u64().unwrap();
            assert!(generated < 500, "the sequence stopped early: {h}");
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(20),
            "never cancelled: {h}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn bad_input_gets_openai_errors_and_auth_and_body_limits_hold() {
    let server = start(&["--api-key", "sekrit", "--max-body-bytes", "4000"]);
    let auth = [("Authorization", "Bearer sekrit")];
    let long: Vec<u32> = (0..600).map(|i| i % 500).collect();
    let cases: Vec<(&str, String, u16, &str)> = vec![
        ("/v1/completions", "{not json".into(), 400, "invalid_request_error"),
        ("/v1/completions", json!({"model": "tiny-llama", "prompt": 5}).to_string(), 400, "invalid_request_error"),
        ("/v1/completions", json!({"model": "tiny-llama", "prompt": "a", "max_tokens": -1}).to_string(), 400, "invalid_request_error"),
        ("/v1/completions", json!({"model": "tiny-llama", "prompt": "a", "max_tokens": 1_000_000_000u64}).to_string(), 400, "invalid_request_error"),
        ("/v1/completions", json!({"model": "tiny-llama", "prompt": "a", "max_tokens": "ten"}).to_string(), 400, "invalid_request_error"),
        ("/v1/completions", json!({"model": "tiny-llama", "prompt": long}).to_string(), 400, "invalid_request_error"),
        ("/v1/completions", json!({"model": "tiny-llama", "prompt": "a", "bogus": 1}).to_string(), 400, "invalid_request_error"),
        ("/v1/completions", json!({"model": "nope", "prompt": "a"}).to_string(), 404, "invalid_request_error"),
        ("/v1/completions", json!({"model": "tiny-llama", "prompt": "a", "n": 2}).to_string(), 400, "invalid_request_error"),
        ("/v1/completions", json!({"model": "tiny-llama", "prompt": "a", "temperature": 7}).to_string(), 400, "invalid_request_error"),
        ("/v1/completions", json!({"model": "tiny-llama", "prompt": [0, 99999]}).to_string(), 400, "invalid_request_error"),
        ("/v1/completions", json!({"model": "tiny-llama", "prompt": []}).to_string(), 400, "invalid_request_error"),
        ("/v1/completions", json!({"model": "tiny-llama", "prompt": "a", "logprobs": 50}).to_string(), 400, "invalid_request_error"),
        ("/v1/completions", json!({"model": "tiny-llama"}).to_string(), 400, "invalid_request_error"),
        ("/v1/chat/completions", json!({"model": "tiny-llama", "messages": []}).to_string(), 400, "invalid_request_error"),
        ("/v1/chat/completions", json!({"model": "tiny-llama", "messages": [{"role": "user", "content": "hi"}], "extra": true}).to_string(), 400, "invalid_request_error"),
        ("/v1/chat/completions", json!({"model": "tiny-llama", "messages": [{"role": "wizard", "content": "hi"}]}).to_string(), 400, "invalid_request_error"),
        ("/v1/chat/completions", json!({"model": "alpha-qv:x", "messages": [{"role": "user", "content": "hi"}]}).to_string(), 404, "invalid_request_error"),
        ("/v1/completions", format!("{{\"model\": \"tiny-llama\", \"prompt\": \"{}\"}}", "a".repeat(5000)), 413, "invalid_request_error"),
    ];
    for (path, body, status, kind) in &cases {
        let (st, v) = server.post_raw(path, body.as_bytes(), &auth);
        assert_eq!(st, *status, "{body:.200}: {v}");
        let e = &v["error"];
        assert_eq!(e["type"], *kind, "{body:.200}: {v}");
        assert!(e["message"].as_str().is_some_and(|m| !m.is_empty()), "{v}");
        assert!(e.get("param").is_some() && e.get("code").is_some(), "{v}");
    }
    // Authentication: none or a wrong key is 401; /health stays open.
    let ok = json!({"model": "beta-attn", "prompt": "You may", "max_tokens": 2}).to_string();
    for h in [vec![], vec![("Authorization", "Bearer wrong")]] {
        let (st, v) = server.post_raw("/v1/completions", ok.as_bytes(), &h);
        assert_eq!(st, 401, "{v}");
        assert_eq!(v["error"]["code"], "invalid_api_key");
    }
    let (st, v) = server.post_raw("/v1/completions", ok.as_bytes(), &auth);
    assert_eq!(st, 200, "{v}");
    let (st, _) = request_on(server.port, "GET", "/v1/models", None, &[]).unwrap();
    assert_eq!(st, 401);
    let (st, b) = request_on(server.port, "GET", "/v1/models", None, &auth).unwrap();
    assert_eq!(st, 200);
    let v: Value = serde_json::from_slice(&b).unwrap();
    let names: Vec<&str> = v["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["tiny-llama", "alpha-qv", "beta-attn", "gamma-all"]);
    // Chat through the template, streamed, with usage.
    let chunks = {
        let body = json!({"model": "gamma-all", "messages": [{"role": "user", "content": "hi"}],
                          "max_tokens": 4, "stream": true, "temperature": 0,
                          "stream_options": {"include_usage": true}});
        let (st, b) = request_on(
            server.port,
            "POST",
            "/v1/chat/completions",
            Some(body.to_string().as_bytes()),
            &auth,
        )
        .unwrap();
        assert_eq!(st, 200);
        String::from_utf8(b).unwrap()
    };
    assert!(
        chunks.contains("chat.completion.chunk") && chunks.trim_end().ends_with("data: [DONE]")
    );
    assert!(chunks.contains("\"usage\""), "{chunks}");
}

#[test]
fn a_public_address_without_a_key_is_refused() {
    let (ok, _, err) = run_edgelorad(&[
        "serve",
        "--model",
        &tiny().display().to_string(),
        "--listen",
        "0.0.0.0:0",
    ]);
    assert!(!ok);
    assert!(err.contains("API key"), "{err}");
}

#[test]
fn a_stop_string_ends_the_text_before_it_and_sigterm_exits_cleanly() {
    let mut server = start(&["--dtype", "f32", "--act", "f32"]);
    let body = |stop: Value| {
        json!({"model": "alpha-qv", "prompt": prompt(3), "max_tokens": 16, "temperature": 0,
               "ignore_eos": true, "stop": stop})
    };
    let (st, v) = server.post("/v1/completions", &body(Value::Null));
    assert_eq!(st, 200, "{v}");
    let full = v["choices"][0]["text"].as_str().unwrap().to_string();
    // A short ASCII piece from the middle of the text as the stop string.
    let chars: Vec<(usize, char)> = full.char_indices().collect();
    let start = chars
        .iter()
        .enumerate()
        .skip(chars.len() / 3)
        .find(|(k, (_, c))| {
            c.is_ascii_alphanumeric()
                && chars
                    .get(k + 1)
                    .is_some_and(|(_, c)| c.is_ascii_alphanumeric())
        })
        .map(|(_, &(b, _))| b)
        .unwrap_or_else(|| panic!("no ASCII pair in {full:?}"));
    let stop = &full[start..start + 2];
    let want = &full[..full.find(stop).unwrap()];
    let (st, v) = server.post("/v1/completions", &body(json!([stop])));
    assert_eq!(st, 200, "{v}");
    assert_eq!(v["choices"][0]["text"], want, "stop {stop:?} in {full:?}");
    assert_eq!(v["choices"][0]["finish_reason"], "stop");
    // Streamed, the same text arrives and nothing past the stop string.
    let chunks = server.stream("/v1/completions", &{
        let mut b = body(json!(stop));
        b["stream"] = json!(true);
        b
    });
    let text: String = chunks
        .iter()
        .map(|c| c["choices"][0]["text"].as_str().unwrap_or(""))
        .collect();
    assert_eq!(text, want);
    server.sigterm_and_wait();
}

#[test]
fn metrics_count_tokens_and_latencies_per_adapter() {
    let server = start(&["--dtype", "f32", "--act", "f32"]);
    let (st, v) = server.post(
        "/v1/completions",
        &json!({"model": "alpha-qv", "prompt": prompt(2), "max_tokens": 5, "temperature": 0,
                "ignore_eos": true}),
    );
    assert_eq!(st, 200, "{v}");
    let (st, body) = request_on(server.port, "GET", "/metrics", None, &[]).unwrap();
    assert_eq!(st, 200);
    let text = String::from_utf8(body).unwrap();
    let has = |line: &str| {
        assert!(
            text.lines().any(|l| l == line),
            "missing `{line}` in:\n{text}"
        )
    };
    has("edgelora_generated_tokens_total{model=\"alpha-qv\"} 5");
    has(&format!(
        "edgelora_prompt_tokens_total{{model=\"alpha-qv\"}} {}",
        prompt(2).len()
    ));
    has("edgelora_requests_total{model=\"alpha-qv\",finish=\"length\"} 1");
    has("edgelora_time_to_first_token_seconds_count{model=\"alpha-qv\"} 1");
    has("edgelora_inter_token_latency_seconds_count{model=\"alpha-qv\"} 4");
    has("edgelora_queue_depth 0");
    has("edgelora_running_sequences 0");
    has("edgelora_kv_pages_used 0");
    // The base model has served nothing: no series for it yet.
    assert!(!text.contains("model=\"tiny-llama\""), "{text}");
}

#[test]
fn admin_routes_import_list_and_delete_adapters_behind_the_admin_token() {
    let dir = tmp_dir("serve-admin");
    import_fixture_adapters(&dir);
    // A pack from a future format: listed as refused, never served.
    let beta = dir.join("beta-attn.elpack");
    let mut bytes = std::fs::read(&beta).unwrap();
    bytes[8..12].copy_from_slice(&7u32.to_le_bytes());
    std::fs::write(&beta, &bytes).unwrap();
    // A PEFT folder copied onto the box, under the adapters directory.
    let incoming = dir.join("incoming").join("gamma");
    std::fs::create_dir_all(&incoming).unwrap();
    for f in ["adapter_config.json", "adapter_model.safetensors"] {
        std::fs::copy(tiny().join("adapters/gamma-all").join(f), incoming.join(f)).unwrap();
    }
    let server = start_with(
        &dir,
        &[
            "--dtype",
            "f32",
            "--act",
            "f32",
            "--api-key",
            "user-key",
            "--admin-token",
            "admin-key",
            "--pool-adapters",
            "2",
        ],
    );
    let user = [("Authorization", "Bearer user-key")];
    let admin = [("Authorization", "Bearer admin-key")];
    let call = |method: &str, path: &str, body: Option<&Value>, h: &[(&str, &str)]| {
        let b = body.map(|b| b.to_string().into_bytes());
        let (st, out) = request_on(server.port, method, path, b.as_deref(), h).unwrap();
        let v: Value = serde_json::from_slice(&out).unwrap_or(Value::Null);
        (st, v)
    };
    // Admin routes: the user key is forbidden, no key is unauthorized.
    let (st, v) = call("GET", "/v1/adapters", None, &user);
    assert_eq!(st, 403, "{v}");
    assert_eq!(v["error"]["type"], "permission_error");
    assert_eq!(call("GET", "/v1/adapters", None, &[]).0, 401);
    let (st, v) = call("GET", "/v1/adapters", None, &admin);
    assert_eq!(st, 200, "{v}");
    let list = v["data"].as_array().unwrap();
    let by_id = |id: &str| list.iter().find(|e| e["id"] == id).cloned().unwrap();
    assert_eq!(list.len(), 3);
    assert_eq!(by_id("alpha-qv")["state"], "available");
    assert_eq!(by_id("alpha-qv")["residency"], "cold");
    assert_eq!(by_id("alpha-qv")["contributor"], "fixture");
    assert_eq!(by_id("beta-attn")["state"], "unavailable");
    assert_eq!(by_id("beta-attn")["error"]["kind"], "unknown_version");
    // The refused pack answers with its reason; the others serve.
    let ask = |model: &str| {
        call(
            "POST",
            "/v1/completions",
            Some(
                &json!({"model": model, "prompt": prompt(3), "max_tokens": 6,
                         "temperature": 0, "ignore_eos": true, "return_token_ids": true}),
            ),
            &user,
        )
    };
    let (st, v) = ask("beta-attn");
    assert_eq!(st, 500, "{v}");
    assert_eq!(v["error"]["code"], "adapter_unavailable");
    assert!(
        v["error"]["message"].as_str().unwrap().contains("version"),
        "{v}"
    );
    let (st, gamma) = ask("gamma-all");
    assert_eq!(st, 200, "{gamma}");
    // Import: ids and paths are checked, then the pack serves like the original.
    let imp = |body: Value| call("POST", "/v1/adapters", Some(&body), &admin);
    let (st, v) = imp(json!({"path": "/etc", "id": "x", "contributor": "c"}));
    assert_eq!(
        (st, v["error"]["param"].as_str()),
        (400, Some("path")),
        "{v}"
    );
    let (st, v) = imp(json!({"path": incoming.display().to_string(), "id": "../x",
                             "contributor": "c"}));
    assert_eq!((st, v["error"]["param"].as_str()), (400, Some("id")), "{v}");
    let (st, v) = imp(
        json!({"path": incoming.display().to_string(), "id": "gamma-all",
                             "contributor": "c"}),
    );
    assert_eq!(st, 409, "an existing id needs replace: {v}");
    let (st, v) = imp(json!({"path": "incoming/gamma", "id": "gamma-2",
                             "contributor": "Ada", "license": "MIT"}));
    assert_eq!(st, 201, "{v}");
    assert_eq!(v["contributor"], "Ada");
    let (_, models) = call("GET", "/v1/models", None, &user);
    assert!(
        models["data"]
            .as_array()
            .unwrap()
            .iter()
            .any(|m| m["id"] == "gamma-2")
    );
    let (st, v) = ask("gamma-2");
    assert_eq!(st, 200, "{v}");
    assert_eq!(
        ids(&v["choices"][0]["token_ids"]),
        ids(&gamma["choices"][0]["token_ids"]),
        "the imported copy serves as the original"
    );
    let (_, v) = call("GET", "/v1/adapters/gamma-2", None, &admin);
    assert_eq!(v["residency"], "resident", "{v}");
    // Delete: refused while a request uses it, done once it finished.
    // Sixteen long streams: seconds of work, so the delete lands while they run.
    let port = server.port;
    let streams: Vec<_> = (0..16)
        .map(|_| {
            std::thread::spawn(move || {
                request_on(
                    port,
                    "POST",
                    "/v1/completions",
                    Some(
                        json!({"model": "alpha-qv", "prompt": prompt(1), "max_tokens": 400,
                               "temperature": 0, "ignore_eos": true, "stream": true})
                        .to_string()
                        .as_bytes(),
                    ),
                    &[("Authorization", "Bearer user-key")],
                )
            })
        })
        .collect();
    let t0 = Instant::now();
    loop {
        let (_, v) = call("GET", "/v1/adapters/alpha-qv", None, &admin);
        if v["requests_in_flight"].as_u64().unwrap_or(0) >= 8 {
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "never in flight: {v}"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    let (st, v) = call("DELETE", "/v1/adapters/alpha-qv", None, &admin);
    assert_eq!(st, 409, "{v}");
    assert_eq!(v["error"]["code"], "adapter_in_use");
    for t in streams {
        assert_eq!(t.join().unwrap().unwrap().0, 200);
    }
    let (st, v) = call("DELETE", "/v1/adapters/alpha-qv", None, &admin);
    assert_eq!(st, 200, "{v}");
    assert!(!dir.join("alpha-qv.elpack").exists());
    assert_eq!(ask("alpha-qv").0, 404);
    assert_eq!(call("DELETE", "/v1/adapters/alpha-qv", None, &admin).0, 404);
    // The pool's story in /metrics: misses, hits, the reader.
    let (st, body) = request_on(server.port, "GET", "/metrics", None, &user).unwrap();
    assert_eq!(st, 200);
    let text = String::from_utf8(body).unwrap();
    assert!(
        text.contains("edgelora_adapter_misses_total{adapter=\"gamma-2\"} 1"),
        "{text}"
    );
    assert!(
        text.contains("edgelora_adapter_read_bytes_total{adapter=\"gamma-2\"}"),
        "{text}"
    );
    assert!(
        text.contains("edgelora_pool_pages{held_by=\"adapters\"}"),
        "{text}"
    );
    assert!(
        text.contains("edgelora_storage_reader{reader=\"io_uring\"} 1")
            || text.contains("edgelora_storage_reader{reader=\"pread\"} 1"),
        "{text}"
    );
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn every_answered_request_leaves_one_attribution_event_and_counters_add_up() {
    let dir = tmp_dir("serve-ledger");
    let packs = dir.join("adapters");
    import_fixture_adapters(&packs);
    // A pack whose payload is damaged: its request fails and leaves no event.
    let (ok, _, err) = run_edgelorad(&[
        "adapters",
        "import",
        &tiny().join("adapters/alpha-qv").display().to_string(),
        "--id",
        "broken",
        "--contributor",
        "fixture",
        "--adapters",
        &packs.display().to_string(),
        "--model",
        &tiny().display().to_string(),
    ]);
    assert!(ok, "{err}");
    let broken = packs.join("broken.elpack");
    let fp = edgelora_daemon::adapters::pack::fingerprint(
        &edgelora_daemon::model::probe::probe_config(&tiny()).unwrap(),
    );
    let info = edgelora_daemon::adapters::pack::read_info(&broken, &fp).unwrap();
    let mut bytes = std::fs::read(&broken).unwrap();
    bytes[(info.payload_offset + info.tensors[0].offset) as usize + 5] ^= 0x01;
    std::fs::write(&broken, &bytes).unwrap();
    let data = dir.display().to_string();
    let mut server = start_with(
        &packs,
        &[
            "--data-dir",
            &data,
            "--admin-token",
            "adm",
            "--base-contributor",
            "TinyCo",
        ],
    );
    let admin = [("Authorization", "Bearer adm")];
    let call = |method: &str, path: &str, body: Option<&Value>, h: &[(&str, &str)]| {
        let b = body.map(|b| b.to_string().into_bytes());
        let (st, out) = request_on(server.port, method, path, b.as_deref(), h).unwrap();
        (
            st,
            serde_json::from_slice::<Value>(&out).unwrap_or(Value::Null),
        )
    };
    let (st, v) = call(
        "POST",
        "/v1/prompts",
        Some(
            &json!({"id": "greet", "template": "Dear {{ name }}, once upon a time",
                     "contributor": "Poet"}),
        ),
        &admin,
    );
    assert_eq!(st, 201, "{v}");
    // Bad input changes nothing: no event.
    let (st, v) = call(
        "POST",
        "/v1/completions",
        Some(
            &json!({"model": "tiny-llama", "prompt": "x", "max_tokens": 2,
                     "attribution": {"data": [{"datanet": "", "chunk": "c", "contributor": "z"}]}}),
        ),
        &[],
    );
    assert_eq!(
        (st, v["error"]["param"].as_str()),
        (400, Some("attribution")),
        "{v}"
    );
    let (st, v) = call(
        "POST",
        "/v1/completions",
        Some(
            &json!({"model": "tiny-llama", "prompt_id": "greet", "prompt_vars": {}, "max_tokens": 2}),
        ),
        &[],
    );
    assert_eq!(
        (st, v["error"]["param"].as_str()),
        (400, Some("prompt_id")),
        "{v}"
    );
    let (st, v) = call(
        "POST",
        "/v1/completions",
        Some(&json!({"model": "broken", "prompt": "x", "max_tokens": 2})),
        &[],
    );
    assert_eq!(
        (st, v["error"]["code"].as_str()),
        (500, Some("adapter_unavailable")),
        "{v}"
    );
    // Twelve answered requests: models, templates, client-reported data, streaming and chat.
    let models = ["tiny-llama", "alpha-qv", "gamma-all"];
    let (mut prompt_sum, mut completion_sum) = (0u64, 0u64);
    let mut by_model = std::collections::HashMap::<&str, u64>::new();
    let (mut templated, mut with_data) = (0u64, 0u64);
    for i in 0..12 {
        let model = models[i % 3];
        let mut body = json!({"model": model, "max_tokens": 3 + i % 4, "temperature": 0,
                              "ignore_eos": true});
        if i % 4 == 1 {
            body["prompt_id"] = json!("greet");
            body["prompt_vars"] = json!({"name": format!("reader {i}")});
            templated += 1;
        } else {
            body["prompt"] = json!(format!("Story number {i}:"));
        }
        if i % 3 == 2 {
            body["attribution"] = json!({"data": [{"datanet": "kjv", "chunk": format!("gen-{i}"),
                                                   "contributor": "Lib", "score": 0.5}],
                                         "tools": [{"id": "search", "contributor": "ToolCo"}]});
            with_data += 1;
        }
        let usage = if i % 5 == 4 {
            body["stream"] = json!(true);
            body["stream_options"] = json!({"include_usage": true});
            let chunks = server.stream("/v1/completions", &body);
            chunks.last().unwrap()["usage"].clone()
        } else if i == 6 {
            let mut chat = body.clone();
            chat.as_object_mut().unwrap().remove("prompt");
            chat["messages"] = json!([{"role": "user", "content": "Hi"}]);
            let (st, v) = call("POST", "/v1/chat/completions", Some(&chat), &[]);
            assert_eq!(st, 200, "{v}");
            v["usage"].clone()
        } else {
            let (st, v) = call("POST", "/v1/completions", Some(&body), &[]);
            assert_eq!(st, 200, "{v}");
            v["usage"].clone()
        };
        prompt_sum += usage["prompt_tokens"].as_u64().unwrap();
        completion_sum += usage["completion_tokens"].as_u64().unwrap();
        *by_model.entry(model).or_default() += 1;
    }
    let (st, v) = call(
        "GET",
        "/v1/attribution/events?since=0&limit=1000",
        None,
        &admin,
    );
    assert_eq!(st, 200, "{v}");
    let events = v["data"].as_array().unwrap();
    assert_eq!(
        events.len(),
        12,
        "exactly one event per answered request: {v}"
    );
    let (st, v) = call("GET", "/v1/attribution/counters", None, &admin);
    assert_eq!(st, 200, "{v}");
    let row = |who: &str, kind: &str| {
        v["data"]
            .as_array()
            .unwrap()
            .iter()
            .find(|r| r["contributor"] == who && r["kind"] == kind)
            .cloned()
            .unwrap_or_else(|| panic!("no {who}/{kind} row in {v}"))
    };
    let base = row("TinyCo", "base");
    assert_eq!(base["requests"], 12);
    assert_eq!(base["prompt_tokens"], prompt_sum);
    assert_eq!(base["completion_tokens"], completion_sum);
    assert_eq!(
        row("fixture", "adapter")["requests"],
        by_model["alpha-qv"] + by_model["gamma-all"]
    );
    assert_eq!(row("Poet", "prompt")["requests"], templated);
    assert_eq!(row("Lib", "data")["requests"], with_data);
    assert_eq!(row("ToolCo", "tool")["requests"], with_data);
    // A proof for one event; without the admin token the ledger is closed.
    let (st, p) = call("GET", "/v1/attribution/proof?seq=3", None, &admin);
    assert_eq!(st, 200, "{p}");
    assert_eq!(p["event"]["seq"], 3);
    assert_eq!(call("GET", "/v1/attribution/counters", None, &[]).0, 401);
    server.sigterm_and_wait();
    // Offline, from the files: the log verifies and its counters are the same.
    let (ok, out, err) = run_edgelorad(&["ledger", "verify", "--data", &data]);
    assert!(ok, "{out}{err}");
    assert!(out.contains("12 events"), "{out}");
    let (ok, out, err) = run_edgelorad(&["ledger", "counters", "--data", &data, "--json"]);
    assert!(ok, "{err}");
    let rows: Value = serde_json::from_str(&out).unwrap();
    assert!(
        rows.as_array()
            .unwrap()
            .iter()
            .any(|r| r["contributor"] == "TinyCo"
                && r["kind"] == "base"
                && r["completion_tokens"] == completion_sum)
    );
    let (ok, out, err) = run_edgelorad(&["ledger", "proof", "--data", &data, "--seq", "11"]);
    assert!(ok, "{err}");
    assert!(out.contains("\"verified\":true"), "{out}");
    // Damage inside the sealed part of the log: verify names it, and the daemon reports it
    // loudly (/health, /metrics) while it keeps serving and appending to a new segment.
    let seg = std::fs::read_dir(dir.join("ledger"))
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|x| x == "log"))
        .unwrap();
    let mut bytes = std::fs::read(&seg).unwrap();
    let mid = bytes.len() / 3;
    bytes[mid] ^= 0x40;
    std::fs::write(&seg, &bytes).unwrap();
    let (ok, out, err) = run_edgelorad(&["ledger", "verify", "--data", &data]);
    assert!(!ok, "verify must fail on a flipped bit: {out}");
    assert!(err.contains(".log"), "the error names the segment: {err}");
    let server = start_with(&packs, &["--data-dir", &data, "--admin-token", "adm"]);
    let h = server.health();
    assert_eq!(
        h["ledger"]["damage"].as_array().map(Vec::len),
        Some(1),
        "{h}"
    );
    let (st, v) = server.post(
        "/v1/completions",
        &json!({"model": "tiny-llama", "prompt": "After the damage", "max_tokens": 2}),
    );
    assert_eq!(st, 200, "{v}");
    let (_, body) = request_on(server.port, "GET", "/metrics", None, &[]).unwrap();
    let text = String::from_utf8(body).unwrap();
    assert!(text.contains("edgelora_ledger_damage 1"), "{text}");
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn the_watchdog_is_petted_while_serving_and_disarmed_on_sigterm() {
    // A regular file stands in for /dev/watchdog: a pet writes a NUL byte, the magic close a 'V'.
    let dir = tmp_dir("watchdog");
    let dev = dir.join("watchdog");
    std::fs::write(&dev, b"").unwrap();
    let dev_s = dev.display().to_string();
    let mut server = start(&["--watchdog", &dev_s]);
    let t0 = Instant::now();
    while std::fs::read(&dev).unwrap().is_empty() {
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "never petted while idle"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    server.sigterm_and_wait();
    let bytes = std::fs::read(&dev).unwrap();
    assert_eq!(
        bytes.last(),
        Some(&b'V'),
        "disarmed with the magic close: {bytes:?}"
    );
    assert!(
        bytes[..bytes.len() - 1].iter().all(|&b| b == 0),
        "{bytes:?}"
    );
}

/// The Python interpreter of the venv the test command installs the official `openai` package
/// into, or `$EDGELORA_OPENAI_PYTHON`.
fn openai_python() -> Option<std::path::PathBuf> {
    if let Some(p) = std::env::var_os("EDGELORA_OPENAI_PYTHON") {
        return Some(p.into());
    }
    let p = edgelora_daemon::default_model::cache_dir().join("openai-venv/bin/python");
    p.is_file().then_some(p)
}

#[test]
fn the_official_openai_client_drives_the_server_unmodified() {
    let Some(python) = openai_python() else {
        if std::env::var_os("EDGELORA_REQUIRE_OPENAI").is_some_and(|v| v == "1") {
            panic!("EDGELORA_REQUIRE_OPENAI=1 but the openai venv is missing");
        }
        eprintln!(
            "\n!!! SKIPPED: no venv with the `openai` package (scripts/test.sh installs it) !!!\n"
        );
        return;
    };
    let server = start(&["--dtype", "f32", "--act", "f32"]);
    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/openai_client.py");
    let ids = serde_json::to_string(&prompt(1)).unwrap();
    let out = Command::new(&python)
        .arg(&script)
        .arg(format!("http://127.0.0.1:{}/v1", server.port))
        .args(["tiny-llama", "beta-attn", &ids])
        .output()
        .expect("running python");
    assert!(
        out.status.success(),
        "openai client failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    let models: Vec<&str> = v["models"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m.as_str().unwrap())
        .collect();
    for m in ["tiny-llama", "alpha-qv", "beta-attn", "gamma-all"] {
        assert!(models.contains(&m), "{m} missing from {models:?}");
    }
    // What the client got equals what the server answers a plain HTTP request.
    let (_, direct) = server.post(
        "/v1/completions",
        &json!({"model": "beta-attn", "prompt": prompt(1), "max_tokens": 8, "temperature": 0,
                "ignore_eos": true, "return_token_ids": true}),
    );
    let c = &v["completion"];
    assert_eq!(c["token_ids"], direct["choices"][0]["token_ids"], "{v}");
    assert_eq!(c["text"], direct["choices"][0]["text"]);
    assert_eq!(c["finish_reason"], "length");
    assert_eq!(c["n_logprobs"], 8);
    assert_eq!(c["usage"]["completion_tokens"], 8);
    assert_eq!(c["usage"]["prompt_tokens"], prompt(1).len());
    for (key, model) in [("chat", "tiny-llama"), ("chat_stream", "beta-attn")] {
        let (_, d) = server.post(
            "/v1/chat/completions",
            &json!({"model": model, "messages": [{"role": "user", "content": "Hello there"}],
                    "max_tokens": 6, "temperature": 0}),
        );
        assert_eq!(
            v[key]["content"], d["choices"][0]["message"]["content"],
            "{key}: {v}"
        );
        assert_eq!(
            v[key]["usage"]["completion_tokens"],
            d["usage"]["completion_tokens"]
        );
    }
    assert_eq!(v["chat"]["role"], "assistant");
    assert!(v["chat_stream"]["finish_reason"].is_string(), "{v}");
    assert_eq!(v["unknown_model"]["status"], 404, "{v}");
    assert_eq!(v["unknown_model"]["code"], "model_not_found", "{v}");
}

#[test]
fn thousands_of_mutated_bodies_never_break_the_server() {
    let server = start(&["--dtype", "f32", "--act", "f32"]);
    let seeds: [&[u8]; 2] = [
        br#"{"model":"alpha-qv","prompt":"Once upon","max_tokens":2,"temperature":0,"stop":["x"],"logprobs":1}"#,
        br#"{"model":"tiny-llama","messages":[{"role":"user","content":"Hi"}],"max_tokens":2,"stream":false}"#,
    ];
    let paths = ["/v1/completions", "/v1/chat/completions"];
    let junk: &[&[u8]] = &[
        b"null",
        b"-1",
        b"1e309",
        b"\"\"",
        b"[]",
        b"{}",
        b"true",
        b"\"\\u0000\"",
        b"99999999999",
        b"[[1,2],[3]]",
        b"\xff\xfe",
    ];
    let mut state = 0x9e37_79b9_7f4a_7c15u64;
    let mut rnd = |n: usize| {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        (state % n as u64) as usize
    };
    let mut statuses = std::collections::BTreeMap::new();
    for i in 0..2000 {
        let which = i % 2;
        let mut b = seeds[which].to_vec();
        for _ in 0..1 + rnd(3) {
            let at = rnd(b.len().max(1));
            match rnd(5) {
                0 => b[at] = rnd(256) as u8,
                1 => b.truncate(at),
                2 => {
                    let j = junk[rnd(junk.len())];
                    b.splice(at..at, j.iter().copied());
                }
                3 => {
                    // Replace a value after a colon with junk.
                    if let Some(c) = b[at..].iter().position(|&x| x == b':') {
                        let s = at + c + 1;
                        let e = b[s..]
                            .iter()
                            .position(|&x| x == b',' || x == b'}')
                            .map_or(b.len(), |p| s + p);
                        let j = junk[rnd(junk.len())];
                        b.splice(s..e, j.iter().copied());
                    }
                }
                _ => {
                    let d = b.len().min(at + 1 + rnd(8));
                    b.drain(at..d);
                }
            }
        }
        let (st, body) = request_on(server.port, "POST", paths[which], Some(&b), &[]).unwrap();
        assert!(
            st < 500,
            "status {st} for {:?}: {}",
            String::from_utf8_lossy(&b),
            String::from_utf8_lossy(&body)
        );
        let v: Value = serde_json::from_slice(&body).unwrap_or_else(|e| {
            panic!(
                "non-JSON answer ({e}) for {:?}: {:?}",
                String::from_utf8_lossy(&b),
                String::from_utf8_lossy(&body)
            )
        });
        if st != 200 {
            assert!(v["error"]["type"].is_string(), "{v}");
        }
        *statuses.entry(st).or_insert(0) += 1;
    }
    eprintln!("statuses over 2000 mutated bodies: {statuses:?}");
    assert!(
        statuses.len() > 1,
        "mutations produced one outcome only: {statuses:?}"
    );
    assert_eq!(server.health()["status"], "ok");
    let (st, _) = server.post(
        "/v1/completions",
        &json!({"model": "tiny-llama", "prompt": prompt(0), "max_tokens": 3, "temperature": 0}),
    );
    assert_eq!(st, 200, "still serving");
}

#[test]
fn the_appliance_is_found_on_the_lan_over_dns_sd() {
    use mdns_sd::{ServiceDaemon, ServiceEvent};
    let server = start(&["--mdns"]);
    let browser = match ServiceDaemon::new() {
        Ok(d) => d,
        Err(e) => {
            eprintln!("\n!!! SKIPPED: no multicast here ({e}) !!!\n");
            return;
        }
    };
    let rx = browser.browse("_edgelora._tcp.local.").unwrap();
    let t0 = Instant::now();
    let mut searched = false;
    while t0.elapsed() < Duration::from_secs(15) {
        let Ok(ev) = rx.recv_timeout(Duration::from_millis(250)) else {
            continue;
        };
        match ev {
            ServiceEvent::SearchStarted(_) => searched = true,
            ServiceEvent::ServiceResolved(info) if info.get_port() == server.port => {
                let prop = |k: &str| info.get_property_val_str(k).map(str::to_string);
                assert_eq!(prop("model").as_deref(), Some("tiny-llama"));
                assert_eq!(prop("adapters").as_deref(), Some("3"));
                assert_eq!(prop("auth").as_deref(), Some("none"));
                let _ = browser.shutdown();
                return;
            }
            _ => {}
        }
    }
    let _ = browser.shutdown();
    if !searched {
        eprintln!("\n!!! SKIPPED: mDNS browsing never started (no multicast interface) !!!\n");
        return;
    }
    panic!("the server's _edgelora._tcp advertisement was not resolved within 15 s");
}

/// `serve --adapter-bits 4`: the pool's loader decodes each pack at four bits, and what the
/// server answers is what the library computes with the same adapter at four bits (greedy tokens
/// equal); its log-probabilities differ from a server at eight bits, so the flag took effect.
#[test]
fn int4_adapters_are_served_as_the_library_computes_them() {
    use edgelora_daemon::adapters::LoraAdapter;
    use edgelora_daemon::engine::forward::ActMode;
    use edgelora_daemon::engine::generate::{GenerateParams, generate};
    use edgelora_daemon::engine::{ForwardOptions, KvDtype, KvPool};
    use edgelora_daemon::model::{LoadOptions, Model, WeightDtype};
    use edgelora_kernels::cpu::lora::AdapterBits;
    // As the server loads it by default: INT4 weights, int8 activations and so a Q8_0 head.
    let m = Model::load(
        &tiny(),
        &LoadOptions {
            q8_embeddings: true,
            ..LoadOptions::reference(WeightDtype::Int4)
        },
    )
    .unwrap();
    let opts = ForwardOptions {
        act: ActMode::Int8,
        ..ForwardOptions::exact()
    };
    let c = &m.config;
    let mut pool = KvPool::new(c.kv_geometry(16), KvDtype::F32, 64).unwrap();
    let four = start(&["--adapter-bits", "4"]);
    let eight = start(&[]);
    let body = |name: &str, p: usize| {
        json!({"model": name, "prompt": prompt(p), "max_tokens": 12, "temperature": 0,
               "ignore_eos": true, "logprobs": 1, "return_token_ids": true})
    };
    let mut differs = 0f64;
    for name in ["alpha-qv", "beta-attn", "gamma-all"] {
        let dir = tiny().join("adapters").join(name);
        let a4 = LoraAdapter::load_peft_with(&dir, c, AdapterBits::Int4).unwrap();
        for p in 0..4 {
            let (st, v4) = four.post("/v1/completions", &body(name, p));
            assert_eq!(st, 200, "{name} p{p}: {v4}");
            let want = generate(
                &m,
                &mut pool,
                Some(&a4),
                &prompt(p),
                &GenerateParams {
                    max_tokens: 12,
                    ..GenerateParams::default()
                },
                &opts,
                |_| {},
            )
            .unwrap()
            .tokens;
            assert_eq!(ids(&v4["choices"][0]["token_ids"]), want, "{name} p{p}");
            let (st, v8) = eight.post("/v1/completions", &body(name, p));
            assert_eq!(st, 200, "{name} p{p}: {v8}");
            let lp = |v: &Value| -> Vec<f64> {
                v["choices"][0]["logprobs"]["token_logprobs"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|x| x.as_f64().unwrap())
                    .collect()
            };
            let (l4, l8) = (lp(&v4), lp(&v8));
            // Where the greedy paths agree, the same token's log-probability at both widths.
            let same = ids(&v4["choices"][0]["token_ids"])
                .iter()
                .zip(ids(&v8["choices"][0]["token_ids"]))
                .take_while(|(a, b)| **a == *b)
                .count();
            for i in 0..same {
                differs = differs.max((l4[i] - l8[i]).abs());
            }
        }
    }
    assert!(
        differs > 1e-3,
        "the int4 server's log-probabilities equal the int8 server's ({differs})"
    );
}
