//! The engine through its library API on the tiny-llama goldens: mixed-adapter batches, chunked
//! prefill, KV element types, page sparsity, the INT4 quantizer's intermediate values.

use edgelora_daemon::adapters::LoraAdapter;
use edgelora_daemon::engine::generate::all_logits;
use edgelora_daemon::engine::{
    ForwardOptions, KvDtype, KvPool, SeqKv, SeqStep, SparseConfig, forward,
};
use edgelora_daemon::model::{LoadOptions, Model, WeightDtype};
use edgelora_kernels::Q4Matrix;
use edgelora_tests::*;

fn model(dtype: WeightDtype) -> Model {
    Model::load(&tiny(), &LoadOptions::reference(dtype)).expect("tiny model loads")
}

fn adapter(m: &Model, name: &str) -> LoraAdapter {
    LoraAdapter::load_peft(&tiny().join("adapters").join(name), &m.config).expect("adapter loads")
}

fn pool(m: &Model, dtype: KvDtype, page_size: usize, pages: usize) -> KvPool {
    let c = &m.config;
    KvPool::new(c.kv_geometry(page_size), dtype, pages).unwrap()
}

/// One forward step with every sequence `i` adding `tokens[i]` to `kvs[i]` under `adapters[i]`.
fn batch_forward(
    m: &Model,
    p: &mut KvPool,
    kvs: &mut [SeqKv],
    tokens: &[Vec<u32>],
    adapters: &[Option<LoraAdapter>],
    all_logits: bool,
    opts: &ForwardOptions,
) -> Vec<Vec<f32>> {
    let mut steps: Vec<SeqStep<'_>> = kvs
        .iter_mut()
        .enumerate()
        .map(|(i, kv)| SeqStep {
            tokens: &tokens[i],
            kv,
            adapter: adapters[i].as_ref(),
            all_logits,
        })
        .collect();
    forward(m, p, &mut steps, opts).unwrap()
}

#[test]
fn a_mixed_adapter_batch_equals_each_sequence_alone() {
    let m = model(WeightDtype::F32);
    let adapters = [
        None,
        Some(adapter(&m, "alpha-qv")),
        Some(adapter(&m, "beta-attn")),
        Some(adapter(&m, "gamma-all")),
    ];
    let prompts: Vec<Vec<u32>> = (0..4).map(prompt).collect(); // lengths 1, 7, 24, 60
    let mut p = pool(&m, KvDtype::F32, 16, 64);
    let opts = ForwardOptions::exact();
    let alone: Vec<Vec<f32>> = (0..4)
        .map(|i| all_logits(&m, &mut p, adapters[i].as_ref(), &prompts[i], &opts).unwrap())
        .collect();
    // Whole prompts in one batch, then one more decode step for all four together.
    let mut kvs: Vec<SeqKv> = (0..4).map(|_| SeqKv::new()).collect();
    let together = batch_forward(&m, &mut p, &mut kvs, &prompts, &adapters, true, &opts);
    for i in 0..4 {
        let d = max_abs_diff(&together[i], &alone[i]);
        assert!(d <= 1e-5, "sequence {i}: batched logits differ by {d}");
        let key = ["base", "alpha_qv", "beta_attn", "gamma_all"][i];
        let g = max_abs_diff(
            &together[i],
            &golden_tensor(&format!("{key}_logits_p{i}")).data,
        );
        assert!(g <= 1e-4, "sequence {i}: {g} from the golden");
    }
    // One decode step for all four, each continuing with its golden greedy token.
    let next: Vec<Vec<u32>> = (0..4)
        .map(|i| {
            let key = ["base", "alpha_qv", "beta_attn", "gamma_all"][i];
            vec![golden_tensor(&format!("{key}_greedy_p{i}")).ids()[0]]
        })
        .collect();
    let step_logits = batch_forward(&m, &mut p, &mut kvs, &next, &adapters, false, &opts);
    for i in 0..4 {
        let key = ["base", "alpha_qv", "beta_attn", "gamma_all"][i];
        let g = golden_tensor(&format!("{key}_genlogits_p{i}"));
        let vocab = m.config.vocab_size;
        let d = max_abs_diff(&step_logits[i], &g.data[vocab..2 * vocab]);
        assert!(
            d <= 1e-4,
            "sequence {i}: batched decode step differs from the golden by {d}"
        );
    }
    for mut kv in kvs {
        kv.release(&mut p);
    }
    assert_eq!(p.free_count(), p.capacity(), "every page returned");
}

#[test]
fn chunked_prefill_equals_one_forward() {
    let m = model(WeightDtype::F32);
    let a = adapter(&m, "gamma-all");
    let toks = prompt(3);
    let mut p = pool(&m, KvDtype::F32, 8, 32);
    let opts = ForwardOptions::exact();
    let whole = all_logits(&m, &mut p, Some(&a), &toks, &opts).unwrap();
    let vocab = m.config.vocab_size;
    let mut kv = SeqKv::new();
    let mut rows = Vec::new();
    for chunk in toks.chunks(7) {
        let mut s = [SeqStep {
            tokens: chunk,
            kv: &mut kv,
            adapter: Some(&a),
            all_logits: true,
        }];
        rows.extend(forward(&m, &mut p, &mut s, &opts).unwrap().pop().unwrap());
    }
    assert_eq!(rows.len(), toks.len() * vocab);
    let d = max_abs_diff(&rows, &whole);
    assert!(d <= 1e-5, "chunked prefill differs by {d}");
}

/// Max |logit - golden| over the four prompts for a KV element type (page size 4, so INT4 pages
/// are sealed and quantized well inside every prompt but p0).
fn kv_error(m: &Model, dtype: KvDtype) -> (f32, f32) {
    let (mut worst, mut sum, mut n) = (0f32, 0f64, 0usize);
    for i in 0..4 {
        let mut p = pool(m, dtype, 4, 32);
        let l = all_logits(m, &mut p, None, &prompt(i), &ForwardOptions::exact()).unwrap();
        let g = &golden_tensor(&format!("base_logits_p{i}")).data;
        worst = worst.max(max_abs_diff(&l, g));
        sum += l
            .iter()
            .zip(g)
            .map(|(a, b)| (a - b).abs() as f64)
            .sum::<f64>();
        n += l.len();
    }
    (worst, (sum / n as f64) as f32)
}

#[test]
fn f16_and_int4_kv_stay_within_stated_tolerances_of_the_goldens() {
    let m = model(WeightDtype::F32);
    let (f32_err, _) = kv_error(&m, KvDtype::F32);
    let (f16_err, f16_mean) = kv_error(&m, KvDtype::F16);
    let (int4_err, int4_mean) = kv_error(&m, KvDtype::Int4);
    eprintln!(
        "|logit - golden| max/mean: f32 KV {f32_err:.2e}, f16 KV {f16_err:.2e}/{f16_mean:.2e}, \
         int4 KV {int4_err:.2e}/{int4_mean:.2e}"
    );
    assert!(f32_err <= 1e-4);
    // Stated tolerances on this random model (logits span about ±11; INT4 *weights* move them by
    // up to 1.64 in transformers itself): f16 KV max 1e-2; INT4 KV with 4-token pages max 1.0,
    // mean 0.1.
    assert!(f16_err <= 1e-2, "f16 KV error {f16_err}");
    assert!(
        int4_err <= 1.0 && int4_mean <= 0.1,
        "int4 KV error max {int4_err} mean {int4_mean}"
    );
    // INT4 must actually quantize (a path that silently kept f32 would be exact).
    assert!(
        int4_err > f16_err,
        "int4 KV error {int4_err} not above f16's {f16_err}: nothing was quantized?"
    );
}

#[test]
fn sparse_attention_with_a_budget_covering_the_context_equals_dense() {
    let m = model(WeightDtype::F32);
    let toks = prompt(3); // 60 tokens = 15 pages of 4
    for dtype in [KvDtype::F32, KvDtype::Int4] {
        let mut p = pool(&m, dtype, 4, 32);
        let dense = all_logits(&m, &mut p, None, &toks, &ForwardOptions::exact()).unwrap();
        let covering = ForwardOptions {
            sparse: Some(SparseConfig {
                budget_tokens: 60,
                recent_pages: 1,
                group_shared: false,
            }),
            ..ForwardOptions::exact()
        };
        let same = all_logits(&m, &mut p, None, &toks, &covering).unwrap();
        assert_eq!(
            dense, same,
            "{dtype:?}: a covering budget must give exactly the dense result"
        );
        let small = ForwardOptions {
            sparse: Some(SparseConfig {
                budget_tokens: 16,
                recent_pages: 1,
                group_shared: false,
            }),
            ..ForwardOptions::exact()
        };
        let sparse = all_logits(&m, &mut p, None, &toks, &small).unwrap();
        let d = max_abs_diff(&sparse, &dense);
        assert!(
            d > 0.0,
            "{dtype:?}: a 16-token budget over 60 tokens must change something"
        );
        // Early positions see fewer pages than the budget and must be untouched.
        let vocab = m.config.vocab_size;
        assert_eq!(sparse[..16 * vocab], dense[..16 * vocab]);
        // One selection per GQA group: a covering budget is dense again; a small one differs
        // from dense and (the group's heads agreeing on pages) from per-head selection.
        let shared = |b| ForwardOptions {
            sparse: Some(SparseConfig::new(b).shared_by_group()),
            ..ForwardOptions::exact()
        };
        let same = all_logits(&m, &mut p, None, &toks, &shared(60)).unwrap();
        assert_eq!(dense, same, "{dtype:?}: group-shared covering budget");
        let grouped = all_logits(&m, &mut p, None, &toks, &shared(16)).unwrap();
        assert!(
            max_abs_diff(&grouped, &dense) > 0.0,
            "{dtype:?}: group-shared budget"
        );
        assert_eq!(grouped[..16 * vocab], dense[..16 * vocab]);
        if m.config.n_heads > m.config.n_kv_heads {
            assert!(
                max_abs_diff(&grouped, &sparse) > 0.0,
                "{dtype:?}: one selection per group equals one per head"
            );
        }
    }
}

#[test]
fn quantizer_reproduces_the_golden_codes_zeros_and_scales() {
    let st = read_safetensors(&tiny().join("model.safetensors"));
    for (weight, tag) in [
        (
            "model.layers.0.self_attn.q_proj.weight",
            "l0_self_attn_q_proj",
        ),
        ("model.layers.0.mlp.down_proj.weight", "l0_mlp_down_proj"),
    ] {
        let w = &st[weight];
        let (rows, cols) = (w.shape[0], w.shape[1]);
        let q = Q4Matrix::quantize(&w.data, rows, cols, 32).unwrap();
        let codes = golden_tensor(&format!("qdebug_{tag}_q"));
        let zeros = golden_tensor(&format!("qdebug_{tag}_zero"));
        let scales = golden_tensor(&format!("qdebug_{tag}_scale"));
        let groups = cols.div_ceil(32);
        assert_eq!(codes.shape, vec![rows, cols]);
        for n in 0..rows {
            let blocks = q.row_blocks(n);
            for (g, b) in blocks.iter().enumerate().take(groups) {
                assert_eq!(
                    b.m as f32,
                    zeros.data[n * groups + g],
                    "{tag} zero [{n}, {g}]"
                );
                assert_eq!(
                    b.scale(),
                    scales.data[n * groups + g],
                    "{tag} scale [{n}, {g}]"
                );
                for j in 0..32.min(cols - 32 * g) {
                    assert_eq!(
                        b.code(j) as f32,
                        codes.data[n * cols + 32 * g + j],
                        "{tag} q [{n}, {}]",
                        32 * g + j
                    );
                }
            }
        }
    }
}

#[test]
fn gptq_folder_and_quantize_at_load_give_identical_int4_weights() {
    let a = Model::load(&tiny(), &LoadOptions::default()).unwrap();
    let b = Model::load(&tiny().join("tiny-llama-gptq"), &LoadOptions::default()).unwrap();
    for (la, lb) in a.weights.layers.iter().zip(&b.weights.layers) {
        for (pa, pb) in la.proj.iter().zip(&lb.proj) {
            let (edgelora_kernels::Weight::Q4(qa), edgelora_kernels::Weight::Q4(qb)) =
                (&pa.weight, &pb.weight)
            else {
                panic!("both must be INT4");
            };
            assert_eq!(qa.dequantize(), qb.dequantize());
        }
    }
}

#[test]
fn perplexity_scores_the_second_half_of_each_window_like_llama_perplexity() {
    use edgelora_daemon::engine::perplexity::{PerplexityParams, perplexity};
    let m = model(WeightDtype::F32);
    let text: Vec<u32> = prompt(3).into_iter().chain(prompt(2)).collect(); // 84 tokens
    let ctx = 20;
    let mut p = pool(&m, KvDtype::F32, 16, 16);
    let bos = Some(0);
    let params = PerplexityParams {
        ctx,
        max_chunks: None,
        bos,
    };
    let report = perplexity(
        &m,
        &mut p,
        &text,
        params,
        &ForwardOptions::exact(),
        |_, _, _| {},
    )
    .unwrap();
    assert_eq!(report.chunks, 4, "84 tokens hold four whole windows of 20");
    assert_eq!(report.tokens_scored, 4 * (ctx - ctx / 2 - 1));
    // Independent computation: each window with its first token replaced by BOS, one forward,
    // positions ctx/2 .. ctx-2 predicting the next token.
    let vocab = m.config.vocab_size;
    let (mut nll, mut n) = (0f64, 0);
    for w in 0..4 {
        let mut win = text[w * ctx..(w + 1) * ctx].to_vec();
        win[0] = 0;
        let l = all_logits(&m, &mut p, None, &win, &ForwardOptions::exact()).unwrap();
        for i in ctx / 2..ctx - 1 {
            let row = &l[i * vocab..(i + 1) * vocab];
            let lse = logsumexp(row);
            nll += lse - row[win[i + 1] as usize] as f64;
            n += 1;
        }
    }
    let want = (nll / n as f64).exp();
    assert!(
        (report.ppl - want).abs() < 1e-6 * want,
        "{} vs {want}",
        report.ppl
    );
    assert!(
        perplexity(
            &m,
            &mut p,
            &text[..10],
            params,
            &ForwardOptions::exact(),
            |_, _, _| {}
        )
        .is_err()
    );
}

#[test]
fn int8_fast_path_mixed_batch_equals_alone_and_stays_near_the_int4_goldens() {
    use edgelora_daemon::engine::forward::ActMode;
    let m = model(WeightDtype::Int4);
    let adapters = [
        None,
        Some(adapter(&m, "alpha-qv")),
        Some(adapter(&m, "beta-attn")),
        Some(adapter(&m, "gamma-all")),
    ];
    let prompts: Vec<Vec<u32>> = (0..4).map(prompt).collect();
    let opts = ForwardOptions {
        act: ActMode::Int8,
        ..ForwardOptions::exact()
    };
    let mut p = pool(&m, KvDtype::F32, 16, 64);
    let alone: Vec<Vec<f32>> = (0..4)
        .map(|i| all_logits(&m, &mut p, adapters[i].as_ref(), &prompts[i], &opts).unwrap())
        .collect();
    let mut kvs: Vec<SeqKv> = (0..4).map(|_| SeqKv::new()).collect();
    let together = batch_forward(&m, &mut p, &mut kvs, &prompts, &adapters, true, &opts);
    for i in 0..4 {
        let d = max_abs_diff(&together[i], &alone[i]);
        assert!(d <= 1e-5, "sequence {i}: batched int8 logits differ by {d}");
    }
    // quant_gamma_all is the INT4 base + gamma-all in float32: int8 activations stay within 0.3
    // (logits span ±11; INT4 weights alone move them by 1.64).
    let g = golden_tensor("quant_gamma_all_logits_p3");
    let mut kv = pool(&m, KvDtype::F32, 16, 64);
    let l = all_logits(&m, &mut kv, adapters[3].as_ref(), &prompts[3], &opts).unwrap();
    let d = max_abs_diff(&l, &g.data);
    assert!(d <= 0.3, "int8 + gamma-all vs golden: {d}");
    assert!(d > 0.0);
}

mod scheduler {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};

    use edgelora_daemon::engine::generate::{FinishReason, GenerateParams, generate};
    use edgelora_daemon::engine::scheduler::{Event, GenRequest, Limits, Scheduler};
    use tokio::sync::mpsc::{UnboundedReceiver, unbounded_channel};

    use super::*;

    fn request(
        prompt: Vec<u32>,
        adapter: Option<Arc<LoraAdapter>>,
        max_tokens: usize,
    ) -> (GenRequest, UnboundedReceiver<Event>, Arc<AtomicBool>) {
        let (tx, rx) = unbounded_channel();
        let cancelled = Arc::new(AtomicBool::new(false));
        let req = GenRequest {
            adapter,
            cancelled: cancelled.clone(),
            ..GenRequest::greedy(prompt, max_tokens, tx)
        };
        (req, rx, cancelled)
    }

    fn tokens_of(rx: &mut UnboundedReceiver<Event>) -> (Vec<u32>, Option<FinishReason>) {
        let mut toks = Vec::new();
        let mut finish = None;
        while let Ok(ev) = rx.try_recv() {
            match ev {
                Event::Token(t) => toks.push(t.id),
                Event::Done { finish: f, .. } => finish = Some(f),
                Event::Error(e) | Event::AdapterFailed(e) => panic!("request failed: {e}"),
                Event::PromptLogprobs(_) => {}
            }
        }
        (toks, finish)
    }

    #[test]
    fn staggered_requests_through_a_small_pool_each_yield_what_generate_gives_alone() {
        let m = Arc::new(model(WeightDtype::F32));
        let names = [None, Some("alpha-qv"), Some("beta-attn"), Some("gamma-all")];
        let adapters: Vec<Option<Arc<LoraAdapter>>> = names
            .iter()
            .map(|n| n.map(|n| Arc::new(adapter(&m, n))))
            .collect();
        let opts = ForwardOptions::exact();
        let max_tokens = 12;
        // (prompt, adapter, step at which it is submitted)
        let reqs: Vec<(Vec<u32>, usize, usize)> = vec![
            (prompt(3), 0, 0),
            (prompt(1), 1, 0),
            (prompt(2), 2, 1),
            (prompt(3), 3, 3),
            (prompt(0), 1, 5),
            (prompt(2), 0, 9),
        ];
        let mut alone_pool = pool(&m, KvDtype::F32, 4, 64);
        let want: Vec<Vec<u32>> = reqs
            .iter()
            .map(|(p, a, _)| {
                let params = GenerateParams {
                    max_tokens,
                    ..GenerateParams::default()
                };
                generate(
                    &m,
                    &mut alone_pool,
                    adapters[*a].as_deref(),
                    p,
                    &params,
                    &opts,
                    |_| {},
                )
                .unwrap()
                .tokens
            })
            .collect();
        // 30 pages of 4 tokens: the longest sequence needs 18, all six together about 70.
        let p = pool(&m, KvDtype::F32, 4, 30);
        let capacity = p.capacity();
        let mut sched = Scheduler::new(
            m.clone(),
            Box::new(p),
            opts,
            Limits {
                max_step_tokens: 16,
                max_running: 8,
            },
        );
        let mut rxs = Vec::new();
        let mut step = 0;
        loop {
            for (p, a, at) in &reqs {
                if *at == step {
                    let (r, rx, _) = request(p.clone(), adapters[*a].clone(), max_tokens);
                    sched.submit(r);
                    rxs.push(rx);
                }
            }
            sched.step().unwrap();
            step += 1;
            if sched.is_idle() && rxs.len() == reqs.len() {
                break;
            }
            assert!(step < 10_000, "the scheduler makes progress");
        }
        for (i, rx) in rxs.iter_mut().enumerate() {
            let (got, finish) = tokens_of(rx);
            assert_eq!(got, want[i], "request {i}");
            assert_eq!(finish, Some(FinishReason::Length), "request {i}");
        }
        assert!(
            sched.stats.preemptions > 0,
            "the pool is small enough that some sequence was preempted"
        );
        assert_eq!(sched.backend.free_count(), capacity, "every page returned");
    }

    #[test]
    fn a_cancelled_request_frees_its_pages_and_the_others_go_on() {
        let m = Arc::new(model(WeightDtype::F32));
        let opts = ForwardOptions::exact();
        let p = pool(&m, KvDtype::F32, 4, 64);
        let capacity = p.capacity();
        let mut sched = Scheduler::new(m.clone(), Box::new(p), opts, Limits::default());
        let (a, mut rx_a, cancel_a) = request(prompt(3), None, 40);
        let (b, mut rx_b, _) = request(prompt(1), None, 5);
        sched.submit(a);
        sched.submit(b);
        for _ in 0..3 {
            sched.step().unwrap();
        }
        assert!(sched.backend.free_count() < capacity);
        cancel_a.store(true, Ordering::Relaxed);
        while !sched.is_idle() {
            sched.step().unwrap();
        }
        assert_eq!(sched.backend.free_count(), capacity, "every page returned");
        let (got_a, finish_a) = tokens_of(&mut rx_a);
        assert!(finish_a.is_none() && got_a.len() < 40, "a stopped early");
        assert!(rx_a.is_closed() || rx_a.try_recv().is_err());
        let (got_b, finish_b) = tokens_of(&mut rx_b);
        assert_eq!(got_b.len(), 5);
        assert_eq!(finish_b, Some(FinishReason::Length));
    }
}

/// Int4 adapters (`--adapter-bits 4`) on the int8 path: a mixed batch still equals each sequence
/// alone, and the coarser adapter's error stays a bounded part of what the adapter does. Measured
/// on these adapters: 11-15% of the adapter's effect (RMS over the logits, against the same
/// adapter at int8), the quality that `--adapter-bits 4` trades for its bytes (BENCHMARKS.md); a
/// wrong int4 kernel is off by the whole effect.
#[test]
fn int4_adapters_keep_batches_exact_and_stay_close_to_the_adapters_effect() {
    use edgelora_daemon::engine::forward::ActMode;
    use edgelora_kernels::cpu::lora::AdapterBits;
    let m = model(WeightDtype::Int4);
    let load = |name: &str, bits| {
        LoraAdapter::load_peft_with(&tiny().join("adapters").join(name), &m.config, bits)
            .expect("adapter loads")
    };
    let opts = ForwardOptions {
        act: ActMode::Int8,
        ..ForwardOptions::exact()
    };
    let names = ["alpha-qv", "beta-attn", "gamma-all"];
    let a4: Vec<Option<LoraAdapter>> = names
        .iter()
        .map(|n| Some(load(n, AdapterBits::Int4)))
        .collect();
    let prompts: Vec<Vec<u32>> = (0..3).map(prompt).collect();
    let mut p = pool(&m, KvDtype::F32, 16, 64);
    let alone: Vec<Vec<f32>> = (0..3)
        .map(|i| all_logits(&m, &mut p, a4[i].as_ref(), &prompts[i], &opts).unwrap())
        .collect();
    let mut kvs: Vec<SeqKv> = (0..3).map(|_| SeqKv::new()).collect();
    let together = batch_forward(&m, &mut p, &mut kvs, &prompts, &a4, true, &opts);
    for i in 0..3 {
        let d = max_abs_diff(&together[i], &alone[i]);
        assert!(
            d <= 1e-5,
            "{}: batched int4-adapter logits differ by {d}",
            names[i]
        );
    }
    for (i, name) in names.iter().enumerate() {
        let a8 = load(name, AdapterBits::Int8);
        let base = all_logits(&m, &mut p, None, &prompts[i], &opts).unwrap();
        let l8 = all_logits(&m, &mut p, Some(&a8), &prompts[i], &opts).unwrap();
        let rms = |a: &[f32], b: &[f32]| {
            (a.iter().zip(b).map(|(x, y)| (x - y) * (x - y)).sum::<f32>() / a.len() as f32).sqrt()
        };
        let (effect, e4) = (rms(&l8, &base), rms(&alone[i], &l8));
        let (effect_max, e4_max) = (max_abs_diff(&l8, &base), max_abs_diff(&alone[i], &l8));
        eprintln!(
            "{name}: adapter effect rms {effect:.4} (max {effect_max:.4}), int4 vs int8 adapter \
             rms {e4:.4} (max {e4_max:.4}), ratio {:.3}",
            e4 / effect
        );
        assert!(
            effect > 0.05,
            "{name}: the adapter changes the logits ({effect})"
        );
        assert!(
            e4 > 0.0 && e4 < 0.2 * effect,
            "{name}: int4 adapter moves the logits by {e4} rms, against an effect of {effect}"
        );
        // The adapter's own rounding, apart from the activations': on the exact path, the f32
        // adapter against the values its int8 and int4 codes stand for.
        let exact = ForwardOptions::exact();
        let rounded = |p: &mut KvPool, bits| {
            let mut a = load(name, bits);
            for pair in a.layers.iter_mut().flatten().flatten() {
                pair.a = pair.a_q.dequantize();
                pair.b = pair.b_q.dequantize();
            }
            all_logits(&m, p, Some(&a), &prompts[i], &exact).unwrap()
        };
        let f = all_logits(&m, &mut p, Some(&a8), &prompts[i], &exact).unwrap();
        let (r8, r4) = (
            rms(&rounded(&mut p, AdapterBits::Int8), &f),
            rms(&rounded(&mut p, AdapterBits::Int4), &f),
        );
        eprintln!(
            "{name}: exact path, f32 adapter vs its int8 codes rms {r8:.5} ({:.4} of the effect), \
             vs its int4 codes rms {r4:.5} ({:.4})",
            r8 / effect,
            r4 / effect
        );
        assert!(
            r8 > 0.0 && r8 < 0.02 * effect,
            "{name}: int8 codes move the logits by {r8}"
        );
        assert!(
            r4 > 4.0 * r8 && r4 < 0.2 * effect,
            "{name}: int4 codes move them by {r4}"
        );
    }
}
