//! Thousands of adapters through the real scheduler: packs on disk, a pool that holds only a few
//! at a time, loads that run while other sequences decode, and refusals that fail only the
//! requests for the bad pack.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use edgelora_daemon::adapters::pack::{Manifest, PackDtype, PackInfo, encode_pack, fingerprint};
use edgelora_daemon::adapters::registry::{EntryState, Registry};
use edgelora_daemon::adapters::residency::ResidencyConfig;
use edgelora_daemon::adapters::{LoraAdapter, LoraPair};
use edgelora_daemon::engine::generate::{GenerateParams, generate};
use edgelora_daemon::engine::scheduler::{Event, GenRequest, Limits, Scheduler};
use edgelora_daemon::engine::{ForwardOptions, KvDtype, KvPool};
use edgelora_daemon::model::{LoadOptions, Model, Proj, WeightDtype};
use edgelora_tests::*;
use tokio::sync::mpsc::{UnboundedReceiver, unbounded_channel};

/// A small deterministic generator (xorshift64*): the test needs no crate for randomness.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
    fn uniform(&mut self) -> f32 {
        (self.next() >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0
    }
}

fn model() -> Arc<Model> {
    Arc::new(Model::load(&tiny(), &LoadOptions::reference(WeightDtype::F32)).expect("tiny model"))
}

fn kv_pool(m: &Model, pages: usize) -> KvPool {
    let c = &m.config;
    KvPool::new(c.kv_geometry(16), KvDtype::F32, pages).unwrap()
}

/// An adapter with random weights, a random rank in 1..=16 and a random non-empty subset of the
/// seven projections, strong enough to change the greedy tokens.
fn random_adapter(m: &Model, name: &str, rng: &mut Rng) -> LoraAdapter {
    let rank = 1 + rng.below(16);
    let mut mask = rng.below(127) + 1;
    if rng.below(4) == 0 {
        mask = 127;
    }
    let targets: Vec<Proj> = Proj::ALL
        .into_iter()
        .filter(|p| mask & (1 << p.index()) != 0)
        .collect();
    let layers = (0..m.config.n_layers)
        .map(|_| {
            let mut slot: [Option<LoraPair>; 7] = Default::default();
            for &p in &targets {
                let (out, inp) = p.shape(&m.config);
                let a = (0..rank * inp).map(|_| rng.uniform() * 0.5).collect();
                let b = (0..out * rank).map(|_| rng.uniform() * 0.5).collect();
                slot[p.index()] = Some(LoraPair::new(rank, a, b).unwrap());
            }
            slot
        })
        .collect();
    let alpha = 2.0 * rank as f32;
    LoraAdapter {
        name: name.to_string(),
        rank,
        alpha,
        use_rslora: false,
        scaling: alpha / rank as f32,
        layers,
        targets,
    }
}

fn manifest(id: &str) -> Manifest {
    Manifest {
        id: id.to_string(),
        display_name: id.to_string(),
        contributor: "test".into(),
        license: Some("Apache-2.0".into()),
        source_digest: String::new(),
        created: 0,
        source: "synthetic".into(),
    }
}

/// Writes `<dir>/<id>.elpack` (no fsync: a test's scratch files).
fn write(dir: &Path, a: &LoraAdapter, fp: &[u8; 32]) -> PathBuf {
    let bytes = encode_pack(a, PackDtype::F32, fp, &manifest(&a.name)).unwrap();
    let p = dir.join(format!("{}.elpack", a.name));
    std::fs::write(&p, bytes).unwrap();
    p
}

fn request(
    prompt: Vec<u32>,
    pack: Arc<PackInfo>,
    max_tokens: usize,
) -> (GenRequest, UnboundedReceiver<Event>) {
    let (tx, rx) = unbounded_channel();
    let req = GenRequest {
        pack: Some(pack),
        ..GenRequest::greedy(prompt, max_tokens, tx)
    };
    (req, rx)
}

/// Tokens, or the error the request ended with.
fn outcome(rx: &mut UnboundedReceiver<Event>) -> Result<Vec<u32>, String> {
    let mut toks = Vec::new();
    while let Ok(ev) = rx.try_recv() {
        match ev {
            Event::Token(t) => toks.push(t.id),
            Event::Done { .. } => return Ok(toks),
            Event::Error(e) => return Err(format!("error: {e}")),
            Event::AdapterFailed(e) => return Err(e),
            Event::PromptLogprobs(_) => {}
        }
    }
    Err("no Done event".into())
}

fn info(reg: &Registry, id: &str) -> Arc<PackInfo> {
    let e = reg.get(id).unwrap_or_else(|| panic!("{id} registered"));
    assert!(
        matches!(e.state, EntryState::Available),
        "{id}: {:?}",
        e.state
    );
    Arc::new(e.info.clone().expect("header read"))
}

/// The real scheduler over `pages` KV pages of 16 tokens, exact activations, with a residency
/// manager holding at most `max_adapters` adapters (0: as many as the pages hold).
fn scheduler(
    m: &Arc<Model>,
    pages: usize,
    limits: Limits,
    max_adapters: usize,
) -> Scheduler<KvPool> {
    let mut sched = Scheduler::new(
        m.clone(),
        Box::new(kv_pool(m, pages)),
        ForwardOptions::exact(),
        limits,
    );
    sched.set_residency(ResidencyConfig {
        max_adapters,
        ..ResidencyConfig::default()
    });
    sched
}

/// Steps until idle, checking after every step that the pool never holds more than `cap`.
fn run(sched: &mut Scheduler<KvPool>, cap: usize) -> usize {
    let mut steps = 0;
    while !sched.is_idle() {
        let worked = sched.step().unwrap();
        if !worked {
            sched.wait_for_loads(Duration::from_millis(20));
        }
        if let Some(r) = sched.residency() {
            assert!(
                r.resident() + r.loading() <= cap,
                "{} resident + {} loading > {cap}",
                r.resident(),
                r.loading()
            );
        }
        steps += 1;
        assert!(steps < 200_000, "the scheduler stopped making progress");
    }
    steps
}

#[test]
fn a_thousand_adapters_through_a_pool_of_eight_each_match_the_adapter_alone() {
    let m = model();
    let fp = fingerprint(&m.config);
    let dir = tmp_dir("adapter-pool-1000");
    let opts = ForwardOptions::exact();
    let max_tokens = 5;
    let mut rng = Rng(0x5EED_1000);
    // Each adapter's expected tokens, computed alone with the in-memory adapter, before it is
    // dropped: the served copy comes only from its pack.
    let mut alone_pool = kv_pool(&m, 8);
    let mut cases: Vec<(String, Vec<u32>, Vec<u32>)> = Vec::new();
    let mut base_differs = 0;
    for i in 0..1000 {
        let id = format!("skill-{i:04}");
        let a = random_adapter(&m, &id, &mut rng);
        write(&dir, &a, &fp);
        let len = 2 + rng.below(10);
        let prompt: Vec<u32> = (0..len).map(|_| 5 + rng.below(500) as u32).collect();
        let params = GenerateParams {
            max_tokens,
            ..GenerateParams::default()
        };
        let want = generate(
            &m,
            &mut alone_pool,
            Some(&a),
            &prompt,
            &params,
            &opts,
            |_| {},
        )
        .unwrap()
        .tokens;
        let base = generate(&m, &mut alone_pool, None, &prompt, &params, &opts, |_| {})
            .unwrap()
            .tokens;
        base_differs += usize::from(base != want);
        cases.push((id, prompt, want));
    }
    // The adapters matter: most change the greedy tokens (else the test could not fail).
    assert!(
        base_differs > 900,
        "only {base_differs} adapters change the output"
    );

    let t0 = std::time::Instant::now();
    let reg = Registry::open(&dir, fp).unwrap();
    eprintln!("indexed {} packs in {:?}", reg.len(), t0.elapsed());
    assert_eq!(reg.len(), 1000);

    let cap = 8;
    let limits = Limits {
        max_step_tokens: 64,
        max_running: 16,
    };
    let mut sched = scheduler(&m, 400, limits, cap);
    // Random order, some adapters asked for twice, submitted in waves while others run.
    let mut order: Vec<usize> = (0..1000).chain((0..200).map(|i| i * 5)).collect();
    for i in (1..order.len()).rev() {
        order.swap(i, rng.below(i + 1));
    }
    let mut rxs = Vec::new();
    for wave in order.chunks(100) {
        for &i in wave {
            let (id, prompt, _) = &cases[i];
            let (req, rx) = request(prompt.clone(), info(&reg, id), max_tokens);
            sched.submit(req);
            rxs.push((i, rx));
        }
        for _ in 0..20 {
            sched.step().unwrap();
        }
    }
    run(&mut sched, cap);
    for (i, rx) in &mut rxs {
        let (id, _, want) = &cases[*i];
        let got = outcome(rx).unwrap_or_else(|e| panic!("{id}: {e}"));
        assert_eq!(&got, want, "{id}: served through the pool vs alone");
    }
    let st = sched.residency().unwrap().stats.clone();
    eprintln!("{st:?}");
    assert!(
        st.loads >= 1000,
        "every adapter loaded at least once: {st:?}"
    );
    assert!(st.evictions >= 1000 - cap as u64, "{st:?}");
    assert_eq!(st.failures, 0);
    assert_eq!(st.hits + st.misses, 1200, "one lookup counted per request");
    // Everything goes back: no pinned adapter, the pool's pages are all free or held by idle
    // adapters.
    let r = sched.residency().unwrap();
    assert!(r.resident() <= cap);
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn bad_packs_are_refused_with_their_error_while_the_others_keep_serving() {
    let m = model();
    let fp = fingerprint(&m.config);
    let dir = tmp_dir("adapter-pool-bad");
    let mut rng = Rng(0xBAD_5EED);
    let mut adapters = HashMap::new();
    for id in [
        "good-1",
        "good-2",
        "corrupt",
        "truncated",
        "wrong-base",
        "wrong-version",
        "vanished",
    ] {
        let a = random_adapter(&m, id, &mut rng);
        let p = if id == "wrong-base" {
            let mut other = fp;
            other[0] ^= 0xff;
            write(&dir, &a, &other)
        } else {
            write(&dir, &a, &fp)
        };
        let mut bytes = std::fs::read(&p).unwrap();
        match id {
            // A flipped bit in the first tensor's data: only the payload digest can tell.
            "corrupt" => {
                let i = edgelora_daemon::adapters::pack::read_info(&p, &fp).unwrap();
                bytes[(i.payload_offset + i.tensors[0].offset) as usize + 3] ^= 0x10;
            }
            "truncated" => bytes.truncate(bytes.len() - 4096),
            // The version field follows the 8-byte magic.
            "wrong-version" => bytes[8..12].copy_from_slice(&2u32.to_le_bytes()),
            _ => {}
        }
        std::fs::write(&p, &bytes).unwrap();
        adapters.insert(id, a);
    }
    let reg = Registry::open(&dir, fp).unwrap();
    // Refused at index time, from the header alone.
    for (id, kind) in [
        ("truncated", "truncated"),
        ("wrong-base", "wrong_base"),
        ("wrong-version", "unknown_version"),
    ] {
        match &reg.get(id).unwrap().state {
            EntryState::Unavailable(msg, k) => {
                assert_eq!(*k, kind, "{id}: {msg}");
                assert!(msg.contains(id), "the error names the adapter: {msg}");
            }
            s => panic!("{id} should be refused, is {s:?}"),
        }
    }
    let mut sched = scheduler(&m, 200, Limits::default(), 4);
    let vanished = info(&reg, "vanished");
    std::fs::remove_file(&vanished.path).unwrap();
    let prompt: Vec<u32> = vec![1, 40, 41, 42, 43];
    let mut rxs = Vec::new();
    for id in [
        "good-1", "corrupt", "good-2", "vanished", "corrupt", "good-1",
    ] {
        let pack = if id == "vanished" {
            vanished.clone()
        } else {
            info(&reg, id)
        };
        let (req, rx) = request(prompt.clone(), pack, 6);
        sched.submit(req);
        rxs.push((id, rx));
    }
    run(&mut sched, 4);
    let mut alone = kv_pool(&m, 8);
    for (id, rx) in &mut rxs {
        let got = outcome(rx);
        match *id {
            "corrupt" => {
                let e = got.expect_err("a corrupt pack fails its requests");
                assert!(e.contains("corrupt") && e.contains("checksum"), "{e}");
            }
            "vanished" => {
                let e = got.expect_err("an unreadable pack fails its requests");
                assert!(e.contains("vanished"), "{e}");
            }
            _ => {
                let params = GenerateParams {
                    max_tokens: 6,
                    ..GenerateParams::default()
                };
                let want = generate(
                    &m,
                    &mut alone,
                    Some(&adapters[id]),
                    &prompt,
                    &params,
                    &ForwardOptions::exact(),
                    |_| {},
                )
                .unwrap()
                .tokens;
                assert_eq!(got.unwrap(), want, "{id}");
            }
        }
    }
    // A later request for the corrupt pack fails at once (no second read), the good ones hit.
    let st0 = sched.residency().unwrap().stats.clone();
    let (req, mut rx) = request(prompt.clone(), info(&reg, "corrupt"), 2);
    sched.submit(req);
    let (req, mut rx_good) = request(prompt.clone(), info(&reg, "good-2"), 2);
    sched.submit(req);
    run(&mut sched, 4);
    assert!(outcome(&mut rx).is_err());
    assert!(outcome(&mut rx_good).is_ok());
    let st = sched.residency().unwrap().stats.clone();
    assert_eq!(st.loads, st0.loads, "nothing reloaded: {st:?}");
    assert_eq!(st.failures, 2, "corrupt and vanished: {st:?}");
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn one_load_serves_every_request_for_a_cold_adapter_and_pinned_adapters_stay() {
    let m = model();
    let fp = fingerprint(&m.config);
    let dir = tmp_dir("adapter-pool-share");
    let mut rng = Rng(0x5_4A4E);
    let a = random_adapter(&m, "shared", &mut rng);
    let b = random_adapter(&m, "other", &mut rng);
    write(&dir, &a, &fp);
    write(&dir, &b, &fp);
    let reg = Registry::open(&dir, fp).unwrap();
    // Room for one adapter: "other" must wait until every "shared" sequence is done.
    let mut sched = scheduler(&m, 200, Limits::default(), 1);
    let prompt: Vec<u32> = vec![1, 7, 8, 9];
    let mut rxs = Vec::new();
    for id in ["shared", "shared", "shared", "other", "shared"] {
        let (req, rx) = request(prompt.clone(), info(&reg, id), 4);
        sched.submit(req);
        rxs.push((id, rx));
    }
    run(&mut sched, 1);
    for (id, rx) in &mut rxs {
        assert!(outcome(rx).is_ok(), "{id}");
    }
    let st = sched.residency().unwrap().stats.clone();
    // Four requests for "shared" shared one read; "other" evicted it only once it was idle.
    assert_eq!(st.loads, 2, "{st:?}");
    assert_eq!(st.evictions, 1, "{st:?}");
    assert_eq!(st.misses, 5, "{st:?}");
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn adapters_and_kv_share_one_page_pool() {
    let m = model();
    let fp = fingerprint(&m.config);
    let dir = tmp_dir("adapter-pool-pages");
    // A large one: rank 16 on every projection.
    let mut rng = Rng(0xFA6E5);
    let a = loop {
        let x = random_adapter(&m, "big", &mut rng);
        if x.rank == 16 && x.targets.len() == 7 {
            break x;
        }
    };
    write(&dir, &a, &fp);
    let reg = Registry::open(&dir, fp).unwrap();
    let big = info(&reg, "big");
    let page_bytes = kv_pool(&m, 1).bytes_per_page();
    let need = edgelora_daemon::adapters::residency::pages_for(&big, page_bytes);
    assert!(need > 10 && need < 30, "the adapter takes {need} pages");
    let mut sched = scheduler(&m, 40, Limits::default(), 0);
    use edgelora_daemon::engine::Backend;
    let free0 = 40;
    let (req, mut rx) = request(vec![1, 2, 3], big.clone(), 2);
    sched.submit(req);
    run(&mut sched, usize::MAX);
    assert!(outcome(&mut rx).is_ok());
    // Resident and idle: its pages are out of the KV's reach until someone needs them.
    assert_eq!(sched.residency().unwrap().pages_held(), need);
    assert_eq!(sched.backend.free_pages(), free0 - need);
    // A long base-model request needs more pages than are free: the idle adapter gives its
    // pages back, and nothing is preempted.
    let long: Vec<u32> = (0..(free0 - need + 5) * 16 - 8)
        .map(|i| 5 + (i % 400) as u32)
        .collect();
    let (tx, mut rx) = unbounded_channel();
    sched.submit(GenRequest::greedy(long, 2, tx));
    run(&mut sched, usize::MAX);
    assert!(outcome(&mut rx).is_ok());
    let r = sched.residency().unwrap();
    assert_eq!(r.stats.evictions, 1, "{:?}", r.stats);
    assert_eq!(r.pages_held(), 0);
    assert_eq!(sched.stats.preemptions, 0);
    assert_eq!(sched.backend.free_pages(), free0);
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn a_pool_barely_larger_than_one_adapter_and_its_sequence_never_fails_a_request() {
    let m = model();
    let fp = fingerprint(&m.config);
    let dir = tmp_dir("adapter-pool-tight");
    let mut rng = Rng(0x7167_4711);
    let opts = ForwardOptions::exact();
    let mut alone = kv_pool(&m, 8);
    let mut cases = Vec::new();
    let mut biggest = 0;
    for i in 0..12 {
        let a = random_adapter(&m, &format!("tight-{i}"), &mut rng);
        let p = write(&dir, &a, &fp);
        let len = 20 + rng.below(30);
        let prompt: Vec<u32> = (0..len).map(|_| 5 + rng.below(500) as u32).collect();
        let params = GenerateParams {
            max_tokens: 6,
            ..GenerateParams::default()
        };
        let want = generate(&m, &mut alone, Some(&a), &prompt, &params, &opts, |_| {})
            .unwrap()
            .tokens;
        biggest = biggest.max(std::fs::metadata(&p).unwrap().len());
        cases.push((a.name.clone(), prompt, want));
    }
    let reg = Registry::open(&dir, fp).unwrap();
    let pool = kv_pool(&m, 1);
    let page_bytes = pool.bytes_per_page();
    let largest = cases
        .iter()
        .map(|(id, _, _)| {
            edgelora_daemon::adapters::residency::pages_for(&info(&reg, id), page_bytes)
        })
        .max()
        .unwrap();
    // Room for the largest adapter, one sequence of 56 tokens and a little more: adapters and
    // sequences must take turns, evicting and preempting, and no request may fail.
    let limits = Limits {
        max_step_tokens: 16,
        max_running: 8,
    };
    let mut sched = scheduler(&m, largest + 6, limits, 0);
    let mut rxs = Vec::new();
    for k in 0..36 {
        let i = (k * 7) % cases.len();
        let (id, prompt, _) = &cases[i];
        let (req, rx) = request(prompt.clone(), info(&reg, id), 6);
        sched.submit(req);
        rxs.push((i, rx));
    }
    run(&mut sched, usize::MAX);
    for (i, rx) in &mut rxs {
        let (id, _, want) = &cases[*i];
        assert_eq!(
            outcome(rx).unwrap_or_else(|e| panic!("{id}: {e}")),
            *want,
            "{id}"
        );
    }
    let st = sched.residency().unwrap().stats.clone();
    assert!(st.evictions > 0, "{st:?}");
    std::fs::remove_dir_all(&dir).ok();
}
