//! Continuous batching: requests join and leave the running batch between steps.
//!
//! Each call of [`Scheduler::step`] runs one forward over every running sequence: decoding ones
//! contribute their last token, prefilling ones the next chunk of their prompt (at most
//! `max_step_tokens` rows in all, decode first), so long prompts never stall decoding. Requests
//! are admitted when the KV pool has pages for their prompt; when a step needs pages the pool no
//! longer has, the newest running sequence is preempted — its pages freed, its prompt and
//! generated tokens kept — and recomputed later, never failed. Sequences are ordered by adapter
//! so each adapter is one SGMV segment; admission takes the adapter that waited longest first,
//! so no adapter starves behind a busy one. A cancelled request (its client went away) is
//! dropped at the next step.
//!
//! Adapters from the registry (a request's `pack`) go through the [`Residency`] manager: a
//! waiting request whose adapter is not resident starts its load and stays queued while the
//! batch runs on; queued requests' adapters are prefetched; running sequences pin theirs; when
//! KV pages run short, idle adapters are evicted before any sequence is preempted.

use std::collections::{HashSet, VecDeque};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use super::generate::FinishReason;
use super::metrics::{EngineMetrics, FinishLabel, ModelLabel};
use super::sampler::{Sampler, SamplingParams, log_softmax_at, top_logprobs};
use super::{Backend, EngineError, ForwardOptions, SeqKv, SeqStep};
use crate::adapters::LoraAdapter;
use crate::adapters::pack::PackInfo;
use crate::adapters::residency::{Acquire, AdapterKey, Residency, ResidencyConfig, key_of};
use crate::model::Model;

/// What a request asks the engine for (already validated by the API layer).
pub struct GenRequest {
    pub prompt: Vec<u32>,
    /// An adapter already in memory (the CLI, tests).
    pub adapter: Option<Arc<LoraAdapter>>,
    /// An adapter from the registry: loaded into the pool when the request needs it.
    pub pack: Option<Arc<PackInfo>>,
    pub sampling: SamplingParams,
    pub max_tokens: usize,
    /// Token ids that end the generation (not emitted).
    pub stop_ids: Vec<u32>,
    /// Top-N alternatives per generated token (0: only the chosen token's log-probability
    /// when `want_logprobs`).
    pub top_logprobs: usize,
    pub want_logprobs: bool,
    /// Log-probabilities of the prompt tokens (`echo` with `logprobs`).
    pub prompt_logprobs: bool,
    /// Set by the API layer when the client disconnects.
    pub cancelled: Arc<AtomicBool>,
    pub events: tokio::sync::mpsc::UnboundedSender<Event>,
}

impl GenRequest {
    /// A greedy request for the base model with no stop ids and no log-probabilities, whose
    /// events go to `events`; set the other fields as needed.
    pub fn greedy(
        prompt: Vec<u32>,
        max_tokens: usize,
        events: tokio::sync::mpsc::UnboundedSender<Event>,
    ) -> Self {
        Self {
            prompt,
            adapter: None,
            pack: None,
            sampling: SamplingParams::default(),
            max_tokens,
            stop_ids: Vec::new(),
            top_logprobs: 0,
            want_logprobs: false,
            prompt_logprobs: false,
            cancelled: Arc::new(AtomicBool::new(false)),
            events,
        }
    }
}

/// One generated token and, when asked, its log-probabilities.
#[derive(Clone, Debug, PartialEq)]
pub struct TokenEvent {
    pub id: u32,
    pub logprob: Option<f32>,
    pub top: Vec<(u32, f32)>,
}

#[derive(Clone, Debug, PartialEq)]
pub enum Event {
    /// Log-probabilities of the prompt tokens (the first is `None`), sent once before any token.
    PromptLogprobs(Vec<Option<TokenEvent>>),
    Token(TokenEvent),
    Done {
        finish: FinishReason,
        prompt_tokens: usize,
        completion_tokens: usize,
    },
    Error(String),
    /// The request's adapter could not be loaded (corrupt pack, I/O error, no room).
    AdapterFailed(String),
}

/// Batch limits.
#[derive(Clone, Debug)]
pub struct Limits {
    /// Rows (tokens) per forward step, prefill chunks included.
    pub max_step_tokens: usize,
    /// Sequences running at once.
    pub max_running: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_step_tokens: 512,
            max_running: 64,
        }
    }
}

struct Seq {
    id: u64,
    req: GenRequest,
    sampler: Sampler,
    kv: SeqKv,
    /// Prompt, then every token generated so far: what the KV must hold before the next token.
    tokens: Vec<u32>,
    /// Tokens of `tokens` already in the KV cache.
    done: usize,
    generated: usize,
    /// Logits that sampled the pending token: set when the prompt (or a recompute) finished.
    logits: Option<Vec<f32>>,
    prompt_logprobs: Vec<Option<TokenEvent>>,
    /// Metrics label: the adapter's name, or the base model's.
    label: ModelLabel,
    submitted: Instant,
    last_token: Option<Instant>,
    /// The adapter this sequence runs with: `req.adapter`, or the pack's resident copy once
    /// acquired (pinned until the sequence leaves the batch).
    lora: Option<Arc<LoraAdapter>>,
}

impl Seq {
    /// Groups sequences by adapter: the same before and after a pack is resident.
    fn adapter_key(&self) -> usize {
        if let Some(p) = &self.req.pack {
            let mut b = [0u8; 8];
            b.copy_from_slice(&p.payload_digest[..8]);
            return usize::from_le_bytes(b) | 1;
        }
        self.req
            .adapter
            .as_ref()
            .map_or(0, |a| Arc::as_ptr(a) as usize & !1)
    }

    /// A registry adapter not acquired yet.
    fn pending_pack(&self) -> Option<&Arc<PackInfo>> {
        self.req.pack.as_ref().filter(|_| self.lora.is_none())
    }
}

/// Counters the metrics endpoint reads.
#[derive(Clone, Debug, Default)]
pub struct SchedStats {
    pub steps: u64,
    pub preemptions: u64,
    pub prompt_tokens: u64,
    pub generated_tokens: u64,
    /// Requests dropped because their client went away.
    pub cancelled: u64,
}

pub struct Scheduler<B: Backend + ?Sized> {
    pub model: Arc<Model>,
    pub backend: Box<B>,
    pub opts: ForwardOptions,
    pub limits: Limits,
    waiting: VecDeque<Seq>,
    running: Vec<Seq>,
    next_id: u64,
    pub stats: SchedStats,
    /// Prometheus metrics, when the server exports them.
    pub metrics: Option<EngineMetrics>,
    /// Registry adapters in the pool; created on the first request that names a pack.
    residency: Option<Residency>,
}

impl<B: Backend + ?Sized> Scheduler<B> {
    pub fn new(model: Arc<Model>, backend: Box<B>, opts: ForwardOptions, limits: Limits) -> Self {
        Self {
            model,
            backend,
            opts,
            limits,
            waiting: VecDeque::new(),
            running: Vec::new(),
            next_id: 0,
            stats: SchedStats::default(),
            metrics: None,
            residency: None,
        }
    }

    /// Sets how registry adapters are held (created with defaults otherwise).
    pub fn set_residency(&mut self, cfg: ResidencyConfig) {
        let mut r = Residency::new(cfg, self.model.config.clone());
        if let Some(m) = &self.metrics {
            r.set_metrics(m.clone());
        }
        self.residency = Some(r);
    }

    pub fn residency(&self) -> Option<&Residency> {
        self.residency.as_ref()
    }

    fn residency_mut(&mut self) -> &mut Residency {
        if self.residency.is_none() {
            self.set_residency(ResidencyConfig::default());
        }
        self.residency.as_mut().expect("just set")
    }

    /// Drops idle pool copies of adapter `id` (removed or replaced in the registry).
    pub fn forget_adapter(&mut self, id: &str) {
        if let Some(r) = self.residency.as_mut() {
            r.forget(id, self.backend.as_mut());
        }
    }

    /// Blocks up to `timeout` when every queued request waits for an adapter load.
    pub fn wait_for_loads(&mut self, timeout: std::time::Duration) {
        match self.residency.as_mut() {
            Some(r) if r.loading() > 0 => r.wait(timeout),
            _ => std::thread::sleep(timeout.min(std::time::Duration::from_millis(1))),
        }
    }

    /// Queues a request. Its sampling parameters were validated by the caller; a failure here
    /// is reported on its event channel.
    pub fn submit(&mut self, req: GenRequest) {
        let sampler = match Sampler::new(req.sampling.clone()) {
            Ok(s) => s,
            Err(e) => {
                let _ = req.events.send(Event::Error(e.to_string()));
                return;
            }
        };
        self.next_id += 1;
        let tokens = req.prompt.clone();
        let label = EngineMetrics::label(match (&req.pack, &req.adapter) {
            (Some(p), _) => p.id(),
            (None, Some(a)) => &a.name,
            (None, None) => &self.model.name,
        });
        let lora = req.adapter.clone();
        if let Some(p) = &req.pack {
            // A hit: resident when the request arrived.
            self.residency_mut().count_request(p);
        }
        self.waiting.push_back(Seq {
            lora,
            label,
            submitted: Instant::now(),
            last_token: None,
            id: self.next_id,
            req,
            sampler,
            kv: SeqKv::new(),
            tokens,
            done: 0,
            generated: 0,
            logits: None,
            prompt_logprobs: Vec::new(),
        });
    }

    pub fn waiting(&self) -> usize {
        self.waiting.len()
    }
    pub fn running(&self) -> usize {
        self.running.len()
    }
    pub fn is_idle(&self) -> bool {
        self.waiting.is_empty() && self.running.is_empty()
    }

    /// Pages a sequence needs to hold `n` tokens.
    fn pages_for(&self, n: usize, page_size: usize) -> usize {
        n.div_ceil(page_size)
    }

    /// Drops cancelled sequences, admits waiting ones while pages last, runs one forward and
    /// samples. Returns whether any work was done.
    pub fn step(&mut self) -> Result<bool, EngineError> {
        self.poll_loads();
        self.drop_cancelled();
        self.admit();
        self.prefetch();
        if self.running.is_empty() {
            return Ok(false);
        }
        // Rows of this step: decoders first (one token each), then prefill chunks.
        let page_size = self.backend_page_size();
        let mut budget = self.limits.max_step_tokens.max(1);
        let mut plan: Vec<(usize, usize)> = Vec::new(); // (running index, tokens this step)
        for (i, s) in self.running.iter().enumerate() {
            if s.logits.is_none() && s.tokens.len() - s.done == 1 && budget > 0 {
                plan.push((i, 1));
                budget -= 1;
            }
        }
        for (i, s) in self.running.iter().enumerate() {
            let left = s.tokens.len() - s.done;
            if s.logits.is_none() && left > 1 && budget > 0 {
                let n = left.min(budget);
                plan.push((i, n));
                budget -= n;
            }
        }
        // Pages: preempt the newest sequences until the step fits.
        loop {
            let need: usize = plan
                .iter()
                .map(|&(i, n)| {
                    let s = &self.running[i];
                    self.pages_for(s.done + n, page_size)
                        .saturating_sub(s.kv.pages.len())
                })
                .sum();
            if need <= self.backend_free_pages() {
                break;
            }
            // Idle adapters give their pages back before any sequence is preempted.
            if let Some(r) = self.residency.as_mut() {
                let wanted = wanted_keys(&self.waiting);
                if r.evict_for_pages(need, self.backend.as_mut(), &wanted, false) {
                    break;
                }
            }
            if self.running.len() <= 1 {
                // Adapter loads in flight hold the pages the last sequence needs: it waits in
                // the queue until they land (then idle adapters can be evicted for it).
                if self.residency.as_ref().is_some_and(|r| r.loading() > 0) {
                    self.preempt(0);
                    return Ok(false);
                }
                break;
            }
            let victim = self.running.len() - 1;
            self.preempt(victim);
            plan.retain(|&(i, _)| i != victim);
        }
        if plan.is_empty() {
            return Ok(self.sample_ready());
        }
        // Sequences sharing an adapter adjacent: one SGMV segment each.
        plan.sort_by_key(|&(i, _)| (self.running[i].adapter_key(), i));
        let want_all: Vec<bool> = plan
            .iter()
            .map(|&(i, _)| {
                let s = &self.running[i];
                s.req.prompt_logprobs && s.generated == 0 && s.done < s.req.prompt.len()
            })
            .collect();
        let chunks: Vec<Vec<u32>> = plan
            .iter()
            .map(|&(i, n)| {
                let s = &self.running[i];
                s.tokens[s.done..s.done + n].to_vec()
            })
            .collect();
        let logits = {
            // Take the page tables out so the steps can borrow them mutably beside the adapters.
            let mut kvs: Vec<SeqKv> = plan
                .iter()
                .map(|&(i, _)| std::mem::take(&mut self.running[i].kv))
                .collect();
            let adapters: Vec<Option<Arc<LoraAdapter>>> = plan
                .iter()
                .map(|&(i, _)| self.running[i].lora.clone())
                .collect();
            let mut steps: Vec<SeqStep<'_>> = kvs
                .iter_mut()
                .zip(&chunks)
                .zip(&adapters)
                .zip(&want_all)
                .map(|(((kv, t), a), &all)| SeqStep {
                    tokens: t,
                    kv,
                    adapter: a.as_deref(),
                    all_logits: all,
                })
                .collect();
            let r = self.backend.step(&self.model, &mut steps, &self.opts);
            drop(steps);
            for (&(i, _), kv) in plan.iter().zip(kvs) {
                self.running[i].kv = kv;
            }
            r
        };
        let logits = match logits {
            Ok(l) => l,
            Err(e) => {
                // A failed step changed nothing; fail the sequences in it rather than loop.
                let msg = e.to_string();
                let mut idx: Vec<usize> = plan.iter().map(|&(i, _)| i).collect();
                idx.sort_unstable_by(|a, b| b.cmp(a));
                for i in idx {
                    let mut s = self.running.remove(i);
                    let _ = s.req.events.send(Event::Error(msg.clone()));
                    self.retire(&mut s);
                }
                return Ok(true);
            }
        };
        self.stats.steps += 1;
        let vocab = self.model.config.vocab_size;
        for ((&(i, n), l), &all) in plan.iter().zip(logits).zip(&want_all) {
            let s = &mut self.running[i];
            let prompt_len = s.req.prompt.len();
            if all {
                // Log-probability of each next prompt token under the rows of this chunk.
                for r in 0..n {
                    let pos = s.done + r + 1;
                    if pos < prompt_len {
                        let row = &l[r * vocab..(r + 1) * vocab];
                        s.prompt_logprobs.push(Some(token_event(
                            row,
                            s.tokens[pos],
                            s.req.top_logprobs,
                        )));
                    }
                }
            }
            if s.done < prompt_len {
                let fresh = n.min(prompt_len - s.done) as u64;
                self.stats.prompt_tokens += fresh;
                if let Some(m) = &self.metrics {
                    m.prompt_tokens.get_or_create(&s.label).inc_by(fresh);
                }
            }
            s.done += n;
            if s.done == s.tokens.len() {
                let last = if all {
                    l[(n - 1) * vocab..].to_vec()
                } else {
                    l
                };
                s.logits = Some(last);
            }
        }
        self.sample_ready();
        if let Some(m) = &self.metrics {
            m.steps.inc();
        }
        self.update_gauges();
        Ok(true)
    }

    /// Samples the next token of every sequence whose logits are ready; finishes sequences.
    fn sample_ready(&mut self) -> bool {
        let mut any = false;
        let mut i = 0;
        while i < self.running.len() {
            let s = &mut self.running[i];
            let Some(logits) = s.logits.take() else {
                i += 1;
                continue;
            };
            any = true;
            if s.req.max_tokens == 0 {
                // Nothing to generate (echo/logprobs scoring): report the prompt and finish.
                if s.req.prompt_logprobs {
                    let mut v = vec![None];
                    v.append(&mut s.prompt_logprobs);
                    let _ = s.req.events.send(Event::PromptLogprobs(v));
                }
                let mut s = self.running.remove(i);
                self.retire(&mut s);
                self.update_gauges();
                let _ = s.req.events.send(Event::Done {
                    finish: FinishReason::Length,
                    prompt_tokens: s.req.prompt.len(),
                    completion_tokens: 0,
                });
                continue;
            }
            if s.generated == 0
                && s.req.prompt_logprobs
                && s.prompt_logprobs.len() < s.req.prompt.len()
            {
                let mut v = vec![None];
                v.append(&mut s.prompt_logprobs);
                let _ = s.req.events.send(Event::PromptLogprobs(v));
            }
            let tok = s.sampler.sample(&logits, &s.tokens);
            let finish = if s.req.stop_ids.contains(&tok) {
                Some(FinishReason::Stop)
            } else {
                let ev = TokenEvent {
                    id: tok,
                    logprob: s.req.want_logprobs.then(|| log_softmax_at(&logits, tok)),
                    top: if s.req.want_logprobs && s.req.top_logprobs > 0 {
                        top_logprobs(&logits, s.req.top_logprobs)
                    } else {
                        Vec::new()
                    },
                };
                let _ = s.req.events.send(Event::Token(ev));
                s.tokens.push(tok);
                s.generated += 1;
                self.stats.generated_tokens += 1;
                if let Some(m) = &self.metrics {
                    let now = Instant::now();
                    match s.last_token {
                        None => m
                            .ttft
                            .get_or_create(&s.label)
                            .observe((now - s.submitted).as_secs_f64()),
                        Some(t) => m
                            .itl
                            .get_or_create(&s.label)
                            .observe((now - t).as_secs_f64()),
                    }
                    m.generated_tokens.get_or_create(&s.label).inc();
                    s.last_token = Some(now);
                }
                (s.generated >= s.req.max_tokens).then_some(FinishReason::Length)
            };
            if let Some(finish) = finish {
                let mut s = self.running.remove(i);
                if let Some(m) = &self.metrics {
                    m.requests
                        .get_or_create(&FinishLabel {
                            model: s.label.model.clone(),
                            finish: finish.as_str().to_string(),
                        })
                        .inc();
                }
                // Pages and gauges first: a client that reads /metrics right after its answer
                // sees its request accounted for.
                self.retire(&mut s);
                self.update_gauges();
                let _ = s.req.events.send(Event::Done {
                    finish,
                    prompt_tokens: s.req.prompt.len(),
                    completion_tokens: s.generated,
                });
            } else {
                i += 1;
            }
        }
        any
    }

    fn drop_cancelled(&mut self) {
        let mut i = 0;
        while i < self.running.len() {
            if self.running[i].req.cancelled.load(Ordering::Relaxed) {
                let mut s = self.running.remove(i);
                self.retire(&mut s);
                self.stats.cancelled += 1;
            } else {
                i += 1;
            }
        }
        let mut i = 0;
        while i < self.waiting.len() {
            if self.waiting[i].req.cancelled.load(Ordering::Relaxed) {
                let mut s = self.waiting.remove(i).expect("index in range");
                self.retire(&mut s);
                self.stats.cancelled += 1;
            } else {
                i += 1;
            }
        }
    }

    /// A sequence leaves the engine (or goes back to the queue): its pages and its adapter pin
    /// are returned.
    fn retire(&mut self, s: &mut Seq) {
        self.backend.release(&mut s.kv);
        if s.req.pack.is_some()
            && let Some(a) = s.lora.take()
            && let Some(r) = self.residency.as_mut()
        {
            r.release(&a);
        }
    }

    /// Applies finished adapter loads; requests for an adapter that failed to load get its
    /// error and leave the queue.
    fn poll_loads(&mut self) {
        let Some(r) = self.residency.as_mut() else {
            return;
        };
        let failed = r.poll(self.backend.as_mut());
        for (key, msg) in failed {
            let mut i = 0;
            while i < self.waiting.len() {
                if self.waiting[i].req.pack.as_deref().map(key_of).as_ref() == Some(&key) {
                    let s = self.waiting.remove(i).expect("index in range");
                    let _ = s.req.events.send(Event::AdapterFailed(msg.clone()));
                } else {
                    i += 1;
                }
            }
        }
    }

    /// Starts loads for queued requests' adapters while the pool has room without evicting
    /// anything a queued request wants.
    fn prefetch(&mut self) {
        let Some(r) = self.residency.as_mut() else {
            return;
        };
        if self.waiting.iter().all(|s| s.pending_pack().is_none()) {
            return;
        }
        let wanted = wanted_keys(&self.waiting);
        let reserve = reserve_pages(&self.running, self.backend.page_size());
        let mut seen = HashSet::new();
        for s in &self.waiting {
            if let Some(p) = s.pending_pack()
                && seen.insert(key_of(p))
                && !r.prefetch(p, self.backend.as_mut(), &wanted, reserve)
            {
                break;
            }
        }
    }

    /// Admits waiting sequences while their pages fit and the batch has room, taking first the
    /// sequence whose adapter has waited longest among adapters not yet running.
    fn admit(&mut self) {
        let page_size = self.backend_page_size();
        // Requests whose adapter is still loading are passed over this step.
        let mut blocked: HashSet<u64> = HashSet::new();
        // Adapters the queue wants, as of the step's start (a superset as requests leave it).
        let wanted = wanted_keys(&self.waiting);
        while self.running.len() < self.limits.max_running {
            // Prefer an adapter that is not running yet (fairness), else the oldest request.
            let running_keys: Vec<usize> = self.running.iter().map(Seq::adapter_key).collect();
            let open = |s: &Seq| !blocked.contains(&s.id);
            let Some(pick) = self
                .waiting
                .iter()
                .position(|s| open(s) && !running_keys.contains(&s.adapter_key()))
                .or_else(|| self.waiting.iter().position(open))
            else {
                break;
            };
            let committed = reserve_pages(&self.running, page_size);
            if self.waiting[pick].pending_pack().is_some() {
                let id = self.waiting[pick].id;
                if !self.acquire(pick, committed, &wanted) {
                    // Loading, or failed and gone from the queue.
                    blocked.insert(id);
                    continue;
                }
            }
            let need = self.pages_for(self.waiting[pick].tokens.len() + 1, page_size);
            if need + committed > self.backend_free_pages() && !self.running.is_empty() {
                let room = self.residency.as_mut().is_some_and(|r| {
                    r.evict_for_pages(need + committed, self.backend.as_mut(), &wanted, true)
                });
                if !room {
                    // Not admitted: it must not keep its adapter pinned while it waits.
                    let s = &mut self.waiting[pick];
                    if s.req.pack.is_some()
                        && let Some(a) = s.lora.take()
                        && let Some(r) = self.residency.as_mut()
                    {
                        r.release(&a);
                    }
                    break;
                }
            }
            let s = self.waiting.remove(pick).expect("index in range");
            self.running.push(s);
        }
    }

    /// Pins the adapter of waiting sequence `pick`, starting its load on a miss. Returns
    /// whether it is resident now; a sequence whose adapter failed leaves the queue with the
    /// error.
    fn acquire(&mut self, pick: usize, committed: usize, wanted: &HashSet<AdapterKey>) -> bool {
        let running_empty = self.running.is_empty();
        let r = self.residency.as_mut().expect("set at submit");
        let s = &mut self.waiting[pick];
        let info = s.req.pack.clone().expect("pending pack");
        // With nothing running and nothing loading, this load must start, even if it evicts
        // adapters other queued requests want.
        let must_progress = running_empty && r.loading() == 0;
        match r.acquire(
            &info,
            self.backend.as_mut(),
            wanted,
            committed,
            must_progress,
        ) {
            Acquire::Ready(a) => {
                s.lora = Some(a);
                true
            }
            Acquire::Pending => {
                // Nothing runs, nothing loads, and still no room: the pool is too small for it.
                if running_empty && r.loading() == 0 && !r.known(&info) {
                    let need =
                        crate::adapters::residency::pages_for(&info, self.backend.page_bytes());
                    let msg = format!(
                        "adapter {} needs {need} pool pages but only {} are free with nothing \
                         running (raise the KV budget or lower the pool's adapter count)",
                        info.id(),
                        self.backend.free_pages()
                    );
                    let s = self.waiting.remove(pick).expect("index in range");
                    let _ = s.req.events.send(Event::AdapterFailed(msg));
                }
                false
            }
            Acquire::Failed(msg) => {
                let s = self.waiting.remove(pick).expect("index in range");
                let _ = s.req.events.send(Event::AdapterFailed(msg));
                false
            }
        }
    }

    /// Frees a running sequence's pages and puts it back at the head of the queue; it resumes
    /// by recomputing its prompt and generated tokens.
    fn preempt(&mut self, i: usize) {
        let mut s = self.running.remove(i);
        self.retire(&mut s);
        s.done = 0;
        s.logits = None;
        s.prompt_logprobs.clear();
        self.stats.preemptions += 1;
        if let Some(m) = &self.metrics {
            m.preemptions.inc();
        }
        self.waiting.push_front(s);
    }

    /// Queue depth, running sequences and KV pages, as of now.
    pub fn update_gauges(&self) {
        if let Some(m) = &self.metrics {
            m.queue_depth.set(self.waiting.len() as i64);
            m.running.set(self.running.len() as i64);
            m.kv_pages_free.set(self.backend.free_pages() as i64);
            let used: usize = self.running.iter().map(|s| s.kv.pages.len()).sum();
            m.kv_pages_used.set(used as i64);
            m.pool_pages
                .get_or_create(&EngineMetrics::pool("kv"))
                .set(used as i64);
            m.pool_pages
                .get_or_create(&EngineMetrics::pool("free"))
                .set(self.backend.free_pages() as i64);
        }
    }

    fn backend_page_size(&self) -> usize {
        self.backend.page_size()
    }

    fn backend_free_pages(&self) -> usize {
        self.backend.free_pages()
    }

    /// Ids of the sequences running now (tests).
    pub fn running_ids(&self) -> Vec<u64> {
        self.running.iter().map(|s| s.id).collect()
    }
}

/// Adapters queued requests still wait for: evicted only when nothing else is idle.
fn wanted_keys(waiting: &VecDeque<Seq>) -> HashSet<AdapterKey> {
    waiting
        .iter()
        .filter_map(|s| s.req.pack.as_deref().map(key_of))
        .collect()
}

/// Pages the running sequences need for their next token: never handed to an adapter load.
fn reserve_pages(running: &[Seq], page_size: usize) -> usize {
    running
        .iter()
        .map(|s| {
            (s.tokens.len() + 1)
                .div_ceil(page_size)
                .saturating_sub(s.kv.pages.len())
        })
        .sum()
}

fn token_event(row: &[f32], tok: u32, top: usize) -> TokenEvent {
    TokenEvent {
        id: tok,
        logprob: Some(log_softmax_at(row, tok)),
        top: if top > 0 {
            top_logprobs(row, top)
        } else {
            Vec::new()
        },
    }
}
