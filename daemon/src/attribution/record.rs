//! One attribution event per finished request: who contributed (base model, adapter, prompt
//! template, client-reported data chunks and tools) and what it cost (tokens, latency, outcome).
//!
//! The HTTP layer builds a [`RequestAttribution`] when it accepts a request and calls
//! [`RequestAttribution::record`] before it sends the answer's last bytes: in strict durability
//! the answer waits for the event's fsync, so an answered request is always counted. A request
//! whose client went away is recorded as cancelled, with the tokens it had generated, when its
//! guard drops; one that failed (an adapter that could not load) is not recorded.

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Instant;

use edgelora_ledger::{Attribution, DataChunk, EventBody, LedgerHandle, Outcome, ToolUse};

use crate::api::types::AttributionInput;

/// Who contributed to one request, and its token counts so far.
pub struct RequestAttribution {
    ledger: Option<LedgerHandle>,
    body: EventBody,
    started: Instant,
    /// Tokens generated so far (read by the drop guard of a cancelled request).
    pub completion_tokens: Arc<AtomicU32>,
    recorded: bool,
}

impl RequestAttribution {
    /// `request` is the raw request body (its blake3 digest is the event's request digest).
    /// Client-reported contributions are checked here, before anything runs: a bad one is an
    /// error naming it.
    pub fn new(
        ledger: Option<LedgerHandle>,
        request: &[u8],
        base: (&str, &str),
        adapter: Option<(&str, &str)>,
        template: Option<(String, String)>,
        client: Option<&AttributionInput>,
    ) -> Result<Self, String> {
        let data_chunks = client
            .map(|c| {
                c.data
                    .iter()
                    .map(|d| DataChunk {
                        datanet: d.datanet.clone(),
                        chunk: d.chunk.clone(),
                        contributor: d.contributor.clone(),
                        score: d.score.unwrap_or(0.0),
                        client_reported: true,
                    })
                    .collect()
            })
            .unwrap_or_default();
        let tools = client
            .map(|c| {
                c.tools
                    .iter()
                    .map(|t| ToolUse {
                        id: t.id.clone(),
                        contributor: t.contributor.clone(),
                        client_reported: true,
                    })
                    .collect()
            })
            .unwrap_or_default();
        let body = EventBody {
            time_ms: 0,
            request_digest: *blake3::hash(request).as_bytes(),
            base_model: Attribution::new(base.0, base.1),
            adapter: adapter.map(|(id, c)| Attribution::new(id, c)),
            prompt_template: template.map(|(id, c)| Attribution::new(id, c)),
            data_chunks,
            tools,
            prompt_tokens: 0,
            completion_tokens: 0,
            latency_ms: 0,
            outcome: Outcome::Stop,
        };
        body.validate().map_err(|e| e.to_string())?;
        Ok(Self {
            ledger,
            body,
            started: Instant::now(),
            completion_tokens: Arc::default(),
            recorded: false,
        })
    }

    fn event(&self, prompt_tokens: usize, completion_tokens: usize, outcome: Outcome) -> EventBody {
        let mut b = self.body.clone();
        b.time_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        b.prompt_tokens = prompt_tokens.min(u32::MAX as usize) as u32;
        b.completion_tokens = completion_tokens.min(u32::MAX as usize) as u32;
        b.latency_ms = self.started.elapsed().as_millis().min(u32::MAX as u128) as u32;
        b.outcome = outcome;
        b
    }

    /// Appends the request's event and waits until it is durable (strict) or written (relaxed).
    /// Returns its sequence number (`None` without a ledger).
    pub async fn record(
        &mut self,
        prompt_tokens: usize,
        completion_tokens: usize,
        outcome: Outcome,
    ) -> Result<Option<u64>, String> {
        self.recorded = true;
        let Some(ledger) = &self.ledger else {
            return Ok(None);
        };
        let ticket = ledger.append(self.event(prompt_tokens, completion_tokens, outcome));
        tokio::task::spawn_blocking(move || ticket.wait())
            .await
            .map_err(|e| format!("attribution ledger: {e}"))?
            .map(Some)
            .map_err(|e| format!("attribution ledger: {e}"))
    }

    /// The request failed (its adapter could not load, the engine errored): nothing was
    /// answered, so nothing is recorded.
    pub fn discard(&mut self) {
        self.recorded = true;
    }

    /// Records the prompt tokens a cancelled request had, for its drop.
    pub fn set_prompt_tokens(&mut self, n: usize) {
        self.body.prompt_tokens = n.min(u32::MAX as usize) as u32;
    }
}

impl Drop for RequestAttribution {
    /// A request that never recorded (its client went away mid-answer) is counted as cancelled
    /// with the tokens it generated; nobody waits for that event.
    fn drop(&mut self) {
        if self.recorded {
            return;
        }
        if let Some(ledger) = &self.ledger {
            let done = self.completion_tokens.load(Ordering::Relaxed) as usize;
            let ev = self.event(self.body.prompt_tokens as usize, done, Outcome::Cancelled);
            drop(ledger.append(ev));
        }
    }
}

/// The outcome of a finish reason as the API reports it.
pub fn outcome_of(finish: Option<&str>) -> Outcome {
    match finish {
        Some("stop") => Outcome::Stop,
        Some("length") => Outcome::Length,
        Some(_) => Outcome::Error,
        None => Outcome::Cancelled,
    }
}
