//! The right edge of a Merkle tree: one perfect-subtree hash per set bit of the size. Enough to
//! append leaves and compute the root, in O(log n) memory.

use super::{Hash, empty_root, node_hash};

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CompactRange {
    size: u64,
    /// Perfect subtree hashes, largest (leftmost) first; `nodes.len() == size.count_ones()`.
    nodes: Vec<Hash>,
}

impl CompactRange {
    pub fn new() -> Self {
        Self::default()
    }

    /// Rebuilds a range from a stored right edge; `None` if the node count does not fit `size`.
    pub fn from_parts(size: u64, nodes: Vec<Hash>) -> Option<Self> {
        (nodes.len() == size.count_ones() as usize).then_some(CompactRange { size, nodes })
    }

    pub fn size(&self) -> u64 {
        self.size
    }

    pub fn nodes(&self) -> &[Hash] {
        &self.nodes
    }

    /// `(level, index, hash)` of each right-edge node: the subtree over leaves
    /// `[index << level, (index + 1) << level)`.
    pub fn positioned_nodes(&self) -> Vec<(u8, u64, Hash)> {
        let mut out = Vec::with_capacity(self.nodes.len());
        let mut start = 0u64;
        let mut i = 0;
        for level in (0..64u8).rev() {
            if self.size & (1u64 << level) != 0 {
                out.push((level, start >> level, self.nodes[i]));
                start += 1u64 << level;
                i += 1;
            }
        }
        out
    }

    /// Appends a leaf. `on_node(level, index, hash)` sees every perfect subtree the append
    /// completes (level >= 1).
    pub fn push_with(&mut self, leaf: Hash, mut on_node: impl FnMut(u8, u64, &Hash)) {
        let mut h = leaf;
        let mut level = 0u8;
        let mut index = self.size;
        while (self.size >> level) & 1 == 1 {
            let left = self.nodes.pop().expect("a set bit has a node");
            h = node_hash(&left, &h);
            level += 1;
            index >>= 1;
            on_node(level, index, &h);
        }
        self.nodes.push(h);
        self.size += 1;
    }

    pub fn push(&mut self, leaf: Hash) {
        self.push_with(leaf, |_, _, _| {});
    }

    pub fn root(&self) -> Hash {
        let mut it = self.nodes.iter().rev();
        match it.next() {
            None => empty_root(),
            Some(last) => it.fold(*last, |acc, left| node_hash(left, &acc)),
        }
    }
}
