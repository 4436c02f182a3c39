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

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use super::generate::FinishReason;
use super::metrics::{EngineMetrics, FinishLabel, ModelLabel};
use super::sampler::{Sampler, SamplingParams, log_softmax_at, top_logprobs};
use super::{Backend, EngineError, ForwardOptions, SeqKv, SeqStep};
use crate::adapters::LoraAdapter;
use crate::model::Model;

/// What a request asks the engine for (already validated by the API layer).
pub struct GenRequest {
    pub prompt: Vec<u32>,
    pub adapter: Option<Arc<LoraAdapter>>,
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
}

impl Seq {
    fn adapter_key(&self) -> usize {
        self.req
            .adapter
            .as_ref()
            .map_or(0, |a| Arc::as_ptr(a) as usize)
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
        let label = EngineMetrics::label(match &req.adapter {
            Some(a) => &a.name,
            None => &self.model.name,
        });
        self.waiting.push_back(Seq {
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
        self.drop_cancelled();
        self.admit();
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
            if need <= self.backend_free_pages() || self.running.len() <= 1 {
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
                .map(|&(i, _)| self.running[i].req.adapter.clone())
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
                    self.backend.release(&mut s.kv);
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
                self.backend.release(&mut s.kv);
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
                self.backend.release(&mut s.kv);
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
                self.backend.release(&mut s.kv);
                self.stats.cancelled += 1;
            } else {
                i += 1;
            }
        }
        let before = self.waiting.len();
        self.waiting
            .retain(|s| !s.req.cancelled.load(Ordering::Relaxed));
        self.stats.cancelled += (before - self.waiting.len()) as u64;
    }

    /// Admits waiting sequences while their pages fit and the batch has room, taking first the
    /// sequence whose adapter has waited longest among adapters not yet running.
    fn admit(&mut self) {
        let page_size = self.backend_page_size();
        while self.running.len() < self.limits.max_running && !self.waiting.is_empty() {
            // Prefer an adapter that is not running yet (fairness), else the oldest request.
            let running_keys: Vec<usize> = self.running.iter().map(Seq::adapter_key).collect();
            let pick = self
                .waiting
                .iter()
                .position(|s| !running_keys.contains(&s.adapter_key()))
                .unwrap_or(0);
            let need = self.pages_for(self.waiting[pick].tokens.len() + 1, page_size);
            let committed: usize = self
                .running
                .iter()
                .map(|s| {
                    self.pages_for(s.tokens.len() + 1, page_size)
                        .saturating_sub(s.kv.pages.len())
                })
                .sum();
            if need + committed > self.backend_free_pages() && !self.running.is_empty() {
                break;
            }
            let s = self.waiting.remove(pick).expect("index in range");
            self.running.push(s);
        }
    }

    /// Frees a running sequence's pages and puts it back at the head of the queue; it resumes
    /// by recomputing its prompt and generated tokens.
    fn preempt(&mut self, i: usize) {
        let mut s = self.running.remove(i);
        self.backend.release(&mut s.kv);
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
