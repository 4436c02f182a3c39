//! The interned, on-disk form of events.
//!
//! Strings are interned per segment: the first time a segment needs a string (or an
//! `(id, contributor)` pair) a `Define` frame gives it the next symbol id, and event frames refer to
//! symbols by id (postcard varints: one byte below 128, two below 16384). Per-segment tables keep
//! every segment self-contained: a quarantined segment never makes a later one unreadable, and a
//! sealed segment can be shipped or verified alone. The cost is re-defining the few hundred live
//! strings once per segment (64 MiB by default).
//!
//! An event's time is stored as a zig-zag delta from the previous event in the same segment (the
//! first from the header's `created_ms`), usually one or two bytes instead of six.

use std::collections::HashMap;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::event::{Attribution, DataChunk, Event, EventBody, Outcome, ToolUse};

/// Payload of a `Define` frame. `id` must equal the number of symbols defined before it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Def {
    pub id: u32,
    pub sym: SymbolDef,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum SymbolDef {
    Str(String),
    /// `(id symbol, contributor symbol)`, both earlier `Str` symbols.
    Pair(u32, u32),
}

/// Payload of an `Event` frame.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WireEvent {
    pub seq: u64,
    pub time_delta: i64,
    pub digest: [u8; 32],
    /// Pair symbols.
    pub base: u32,
    pub adapter: Option<u32>,
    pub prompt: Option<u32>,
    pub chunks: Vec<WireChunk>,
    pub tools: Vec<WireTool>,
    pub prompt_tokens: u32,
    pub completion_tokens: u32,
    pub latency_ms: u32,
    pub outcome: Outcome,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WireChunk {
    pub datanet: u32,
    pub chunk: u32,
    pub contributor: u32,
    pub score: f32,
    pub client_reported: bool,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WireTool {
    /// Pair symbol.
    pub tool: u32,
    pub client_reported: bool,
}

/// Why a payload is not a valid frame of its kind (its CRC was fine).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WireFault(pub String);

impl std::fmt::Display for WireFault {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// Decodes a postcard payload, refusing trailing bytes.
pub fn decode_exact<'a, T: Deserialize<'a>>(payload: &'a [u8], what: &str) -> Result<T, WireFault> {
    match postcard::take_from_bytes::<T>(payload) {
        Ok((v, [])) => Ok(v),
        Ok((_, rest)) => Err(WireFault(format!("{what}: {} trailing bytes", rest.len()))),
        Err(e) => Err(WireFault(format!("{what}: {e}"))),
    }
}

pub fn encode<T: Serialize>(v: &T) -> Vec<u8> {
    postcard::to_allocvec(v).expect("postcard encoding into a Vec cannot fail")
}

#[derive(Debug, Clone)]
pub enum Symbol {
    Str(Arc<str>),
    Pair(u32, u32),
}

/// The symbols of one segment, in definition order.
#[derive(Debug, Clone, Default)]
pub struct SymbolTable {
    syms: Vec<Symbol>,
}

impl SymbolTable {
    pub fn len(&self) -> usize {
        self.syms.len()
    }

    pub fn is_empty(&self) -> bool {
        self.syms.is_empty()
    }

    /// Adds a definition read from the log, checking that it is the next id and that a pair
    /// refers to earlier strings.
    pub fn define(&mut self, def: Def) -> Result<(), WireFault> {
        if def.id as usize != self.syms.len() {
            return Err(WireFault(format!(
                "definition of symbol {} where symbol {} was expected",
                def.id,
                self.syms.len()
            )));
        }
        let sym = match def.sym {
            SymbolDef::Str(s) => Symbol::Str(Arc::from(s)),
            SymbolDef::Pair(a, b) => {
                self.str(a)?;
                self.str(b)?;
                Symbol::Pair(a, b)
            }
        };
        self.syms.push(sym);
        Ok(())
    }

    pub fn str(&self, id: u32) -> Result<&Arc<str>, WireFault> {
        match self.syms.get(id as usize) {
            Some(Symbol::Str(s)) => Ok(s),
            Some(Symbol::Pair(..)) => {
                Err(WireFault(format!("symbol {id} is a pair, not a string")))
            }
            None => Err(WireFault(format!("symbol {id} is not defined"))),
        }
    }

    pub fn pair(&self, id: u32) -> Result<(&Arc<str>, &Arc<str>), WireFault> {
        match self.syms.get(id as usize) {
            Some(Symbol::Pair(a, b)) => Ok((self.str(*a)?, self.str(*b)?)),
            Some(Symbol::Str(_)) => Err(WireFault(format!("symbol {id} is a string, not a pair"))),
            None => Err(WireFault(format!("symbol {id} is not defined"))),
        }
    }

    fn attribution(&self, id: u32) -> Result<Attribution, WireFault> {
        let (a, b) = self.pair(id)?;
        Ok(Attribution::new(a.as_ref(), b.as_ref()))
    }

    /// Checks that every symbol an event names exists and has the right type.
    pub fn check(&self, ev: &WireEvent) -> Result<(), WireFault> {
        self.pair(ev.base)?;
        if let Some(a) = ev.adapter {
            self.pair(a)?;
        }
        if let Some(p) = ev.prompt {
            self.pair(p)?;
        }
        for c in &ev.chunks {
            self.str(c.datanet)?;
            self.str(c.chunk)?;
            self.str(c.contributor)?;
        }
        for t in &ev.tools {
            self.pair(t.tool)?;
        }
        Ok(())
    }

    /// The string form of `ev`; `prev_time_ms` is the previous event's time in the segment.
    pub fn resolve(&self, ev: &WireEvent, prev_time_ms: u64) -> Result<Event, WireFault> {
        let chunks = ev
            .chunks
            .iter()
            .map(|c| {
                Ok(DataChunk {
                    datanet: self.str(c.datanet)?.to_string(),
                    chunk: self.str(c.chunk)?.to_string(),
                    contributor: self.str(c.contributor)?.to_string(),
                    score: c.score,
                    client_reported: c.client_reported,
                })
            })
            .collect::<Result<Vec<_>, WireFault>>()?;
        let tools = ev
            .tools
            .iter()
            .map(|t| {
                let a = self.attribution(t.tool)?;
                Ok(ToolUse {
                    id: a.id,
                    contributor: a.contributor,
                    client_reported: t.client_reported,
                })
            })
            .collect::<Result<Vec<_>, WireFault>>()?;
        Ok(Event {
            seq: ev.seq,
            body: EventBody {
                time_ms: apply_delta(prev_time_ms, ev.time_delta),
                request_digest: ev.digest,
                base_model: self.attribution(ev.base)?,
                adapter: ev.adapter.map(|a| self.attribution(a)).transpose()?,
                prompt_template: ev.prompt.map(|p| self.attribution(p)).transpose()?,
                data_chunks: chunks,
                tools,
                prompt_tokens: ev.prompt_tokens,
                completion_tokens: ev.completion_tokens,
                latency_ms: ev.latency_ms,
                outcome: ev.outcome,
            },
        })
    }
}

pub fn time_delta(prev_time_ms: u64, time_ms: u64) -> i64 {
    (time_ms as i64).wrapping_sub(prev_time_ms as i64)
}

pub fn apply_delta(prev_time_ms: u64, delta: i64) -> u64 {
    (prev_time_ms as i64).wrapping_add(delta) as u64
}

/// The writer's side of a segment's symbol table: string → id lookups.
#[derive(Debug, Default)]
pub struct Interner {
    next: u32,
    strs: HashMap<Arc<str>, u32>,
    pairs: HashMap<(u32, u32), u32>,
}

impl Interner {
    /// Rebuilds the lookups for a segment being continued after open.
    pub fn from_table(table: &SymbolTable) -> Interner {
        let mut i = Interner {
            next: table.len() as u32,
            ..Interner::default()
        };
        for (id, sym) in table.syms.iter().enumerate() {
            match sym {
                Symbol::Str(s) => {
                    i.strs.insert(s.clone(), id as u32);
                }
                Symbol::Pair(a, b) => {
                    i.pairs.insert((*a, *b), id as u32);
                }
            }
        }
        i
    }

    pub fn len(&self) -> usize {
        self.next as usize
    }

    pub fn is_empty(&self) -> bool {
        self.next == 0
    }

    fn str_id(&mut self, s: &str, defs: &mut Vec<Def>) -> u32 {
        if let Some(&id) = self.strs.get(s) {
            return id;
        }
        let id = self.next;
        self.next += 1;
        self.strs.insert(Arc::from(s), id);
        defs.push(Def {
            id,
            sym: SymbolDef::Str(s.to_string()),
        });
        id
    }

    fn pair_id(&mut self, a: &str, b: &str, defs: &mut Vec<Def>) -> u32 {
        let a = self.str_id(a, defs);
        let b = self.str_id(b, defs);
        if let Some(&id) = self.pairs.get(&(a, b)) {
            return id;
        }
        let id = self.next;
        self.next += 1;
        self.pairs.insert((a, b), id);
        defs.push(Def {
            id,
            sym: SymbolDef::Pair(a, b),
        });
        id
    }

    /// The wire form of `ev`; definitions for symbols it uses for the first time are pushed to
    /// `defs` (they must be written before the event frame).
    pub fn encode_event(
        &mut self,
        ev: &Event,
        prev_time_ms: u64,
        defs: &mut Vec<Def>,
    ) -> WireEvent {
        let b = &ev.body;
        let attr =
            |s: &mut Self, a: &Attribution, d: &mut Vec<Def>| s.pair_id(&a.id, &a.contributor, d);
        let base = attr(self, &b.base_model, defs);
        let adapter = b.adapter.as_ref().map(|a| attr(self, a, defs));
        let prompt = b.prompt_template.as_ref().map(|a| attr(self, a, defs));
        let chunks = b
            .data_chunks
            .iter()
            .map(|c| WireChunk {
                datanet: self.str_id(&c.datanet, defs),
                chunk: self.str_id(&c.chunk, defs),
                contributor: self.str_id(&c.contributor, defs),
                score: c.score,
                client_reported: c.client_reported,
            })
            .collect();
        let tools = b
            .tools
            .iter()
            .map(|t| WireTool {
                tool: self.pair_id(&t.id, &t.contributor, defs),
                client_reported: t.client_reported,
            })
            .collect();
        WireEvent {
            seq: ev.seq,
            time_delta: time_delta(prev_time_ms, b.time_ms),
            digest: b.request_digest,
            base,
            adapter,
            prompt,
            chunks,
            tools,
            prompt_tokens: b.prompt_tokens,
            completion_tokens: b.completion_tokens,
            latency_ms: b.latency_ms,
            outcome: b.outcome,
        }
    }
}
