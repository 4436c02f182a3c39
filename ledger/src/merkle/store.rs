//! The tree an open ledger keeps in memory for one epoch.
//!
//! It holds the right edge (for roots), every perfect subtree of `CHUNK_LEAVES` leaves or more
//! (about n/128 hashes: 0.5 MB per million events), the leaves of the last, incomplete chunk,
//! and whatever right-edge nodes a snapshot supplied. Leaves of completed chunks are not kept:
//! a proof that needs them reads the chunk's events back from the log (`missing` tells the
//! caller which chunks), hashes them, and the chunk's root is cached from then on.

use std::collections::{BTreeSet, HashMap};

use super::{CompactRange, Hash, node_hash, split_point};

/// log2 of the leaves per chunk.
const CHUNK_LEVEL: u8 = 8;
/// Leaves per chunk: the granularity at which leaf hashes are read back from disk.
pub(crate) const CHUNK_LEAVES: u64 = 1 << CHUNK_LEVEL;

/// Leaf hashes loaded for one proof computation, by chunk number.
pub(crate) type ChunkCache = HashMap<u64, Vec<Hash>>;

/// Chunks a computation needed but did not have.
#[derive(Debug, Default)]
pub(crate) struct Missing {
    pub chunks: BTreeSet<u64>,
    /// Placeholders used (counts repeats, unlike `chunks`).
    uses: u64,
}

impl Missing {
    fn note(&mut self, chunk: u64) -> Hash {
        self.chunks.insert(chunk);
        self.uses += 1;
        [0; 32]
    }

    pub fn is_empty(&self) -> bool {
        self.uses == 0
    }
}

#[derive(Debug, Clone)]
pub(crate) struct TreeStore {
    compact: CompactRange,
    known: HashMap<(u8, u64), Hash>,
    tail_start: u64,
    tail: Vec<Hash>,
}

impl TreeStore {
    pub fn new() -> Self {
        TreeStore {
            compact: CompactRange::new(),
            known: HashMap::new(),
            tail_start: 0,
            tail: Vec::new(),
        }
    }

    /// A tree continued from a snapshot's right edge; leaves before `range.size()` are not in
    /// memory (proofs read them back from the log).
    pub fn from_compact(range: CompactRange) -> Self {
        let mut known = HashMap::new();
        for (level, index, h) in range.positioned_nodes() {
            known.insert((level, index), h);
        }
        TreeStore {
            tail_start: range.size(),
            compact: range,
            known,
            tail: Vec::new(),
        }
    }

    pub fn size(&self) -> u64 {
        self.compact.size()
    }

    pub fn compact(&self) -> &CompactRange {
        &self.compact
    }

    pub fn push(&mut self, leaf: Hash) {
        let known = &mut self.known;
        self.compact.push_with(leaf, |level, index, h| {
            if level >= CHUNK_LEVEL {
                known.insert((level, index), *h);
            }
        });
        self.tail.push(leaf);
        if self.compact.size().is_multiple_of(CHUNK_LEAVES) {
            self.tail.clear();
            self.tail_start = self.compact.size();
        }
    }

    fn leaf(&self, i: u64, cache: &ChunkCache, missing: &mut Missing) -> Hash {
        if i >= self.tail_start && i < self.size() {
            return self.tail[(i - self.tail_start) as usize];
        }
        let chunk = i / CHUNK_LEAVES;
        if let Some(leaves) = cache.get(&chunk)
            && let Some(h) = leaves.get((i % CHUNK_LEAVES) as usize)
        {
            return *h;
        }
        missing.note(chunk)
    }

    /// The hash of the subtree over leaves `[a, b)` (`a < b <= size`). Chunks whose leaves are
    /// needed but neither in memory nor in `cache` are added to `missing` and a placeholder is
    /// used: the result is meaningful only if `missing` stayed empty. Perfect subtrees of a chunk
    /// or more that were computed completely are remembered.
    pub fn mth(&mut self, a: u64, b: u64, cache: &ChunkCache, missing: &mut Missing) -> Hash {
        debug_assert!(a < b && b <= self.size());
        let n = b - a;
        if n == 1 {
            return self.leaf(a, cache, missing);
        }
        let perfect = n.is_power_of_two() && a.is_multiple_of(n);
        if perfect {
            let level = n.trailing_zeros() as u8;
            if let Some(h) = self.known.get(&(level, a >> level)) {
                return *h;
            }
            if level == CHUNK_LEVEL {
                let chunk = a / CHUNK_LEAVES;
                let in_tail = a >= self.tail_start;
                if !in_tail && !cache.contains_key(&chunk) {
                    return missing.note(chunk);
                }
            }
        }
        let before = missing.uses;
        let k = split_point(n);
        let l = self.mth(a, a + k, cache, missing);
        let r = self.mth(a + k, b, cache, missing);
        let h = node_hash(&l, &r);
        if perfect && missing.uses == before {
            let level = n.trailing_zeros() as u8;
            if level >= CHUNK_LEVEL {
                self.known.insert((level, a >> level), h);
            }
        }
        h
    }
}
