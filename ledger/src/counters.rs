//! Per-contributor counters, derived from the log.
//!
//! Rule: each event adds, for every distinct `(contributor, kind)` it names, one request and the
//! event's prompt and completion tokens. A contributor with two chunks in one answer is credited
//! one data request, not two; a contributor who supplied both the adapter and a chunk is credited
//! under both kinds. Client-reported chunks and tools count like the others (the event keeps the
//! flag for whoever wants to weigh them differently).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::event::EventBody;

/// What a contributor supplied.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum ContributionKind {
    Base,
    Adapter,
    Prompt,
    Data,
    Tool,
}

impl ContributionKind {
    pub const ALL: [ContributionKind; 5] = [
        ContributionKind::Base,
        ContributionKind::Adapter,
        ContributionKind::Prompt,
        ContributionKind::Data,
        ContributionKind::Tool,
    ];

    pub fn name(self) -> &'static str {
        match self {
            ContributionKind::Base => "base",
            ContributionKind::Adapter => "adapter",
            ContributionKind::Prompt => "prompt",
            ContributionKind::Data => "data",
            ContributionKind::Tool => "tool",
        }
    }
}

/// Every distinct `(contributor, kind)` the event names, sorted: what one event credits under the
/// rule above. `Counters::apply` uses it, and so does anyone who stores credits row by row (the
/// fleet collector), so both count the same way.
pub fn credits(body: &EventBody) -> Vec<(&str, ContributionKind)> {
    let mut seen: Vec<(&str, ContributionKind)> =
        Vec::with_capacity(3 + body.data_chunks.len() + body.tools.len());
    seen.push((&body.base_model.contributor, ContributionKind::Base));
    if let Some(a) = &body.adapter {
        seen.push((&a.contributor, ContributionKind::Adapter));
    }
    if let Some(p) = &body.prompt_template {
        seen.push((&p.contributor, ContributionKind::Prompt));
    }
    for c in &body.data_chunks {
        seen.push((&c.contributor, ContributionKind::Data));
    }
    for t in &body.tools {
        seen.push((&t.contributor, ContributionKind::Tool));
    }
    seen.sort_unstable();
    seen.dedup();
    seen
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Counter {
    pub requests: u64,
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
}

impl Counter {
    fn add(&mut self, prompt: u32, completion: u32) {
        self.requests = self.requests.saturating_add(1);
        self.prompt_tokens = self.prompt_tokens.saturating_add(prompt as u64);
        self.completion_tokens = self.completion_tokens.saturating_add(completion as u64);
    }
}

/// One row of a counters snapshot frame.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CounterRow {
    pub contributor: String,
    pub kind: ContributionKind,
    pub counter: Counter,
}

/// Counters for every `(contributor, kind)` seen.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Counters {
    by_contributor: BTreeMap<String, [Counter; 5]>,
}

impl Counters {
    pub fn new() -> Self {
        Self::default()
    }

    /// The counter for `(contributor, kind)`; zero if never seen.
    pub fn get(&self, contributor: &str, kind: ContributionKind) -> Counter {
        self.by_contributor
            .get(contributor)
            .map(|c| c[kind as usize])
            .unwrap_or_default()
    }

    /// Non-zero counters in (contributor, kind) order.
    pub fn iter(&self) -> impl Iterator<Item = (&str, ContributionKind, Counter)> + '_ {
        self.by_contributor.iter().flat_map(|(name, cs)| {
            ContributionKind::ALL
                .iter()
                .filter(move |k| cs[**k as usize] != Counter::default())
                .map(move |k| (name.as_str(), *k, cs[*k as usize]))
        })
    }

    /// Number of contributors with any counter.
    pub fn contributors(&self) -> usize {
        self.by_contributor.len()
    }

    /// Adds one event: one request and its tokens for each of `credits(body)`.
    pub fn apply(&mut self, body: &EventBody) {
        for (name, kind) in credits(body) {
            let row = match self.by_contributor.get_mut(name) {
                Some(r) => r,
                None => self.by_contributor.entry(name.to_string()).or_default(),
            };
            row[kind as usize].add(body.prompt_tokens, body.completion_tokens);
        }
    }

    pub(crate) fn to_rows(&self) -> Vec<CounterRow> {
        self.iter()
            .map(|(c, kind, counter)| CounterRow {
                contributor: c.to_string(),
                kind,
                counter,
            })
            .collect()
    }

    pub(crate) fn from_rows(rows: Vec<CounterRow>) -> Self {
        let mut c = Counters::new();
        for r in rows {
            c.by_contributor.entry(r.contributor).or_default()[r.kind as usize] = r.counter;
        }
        c
    }
}
