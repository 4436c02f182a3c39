//! RFC 6962 / RFC 9162 Merkle trees over event leaves.
//!
//! leaf hash = SHA-256(0x00 || postcard(Event)), node hash = SHA-256(0x01 || left || right), the
//! empty tree's root = SHA-256(""). The leaf commits to the event in its string form (with its
//! sequence number), never to symbol ids, so a collector can check an event it received as
//! strings without knowing how the device interned them.

mod compact;
mod proof;
mod store;

use sha2::{Digest, Sha256};

pub use compact::CompactRange;
pub use proof::{
    ProofError, consistency_proof, inclusion_proof, root_from_inclusion, verify_consistency,
    verify_inclusion,
};
pub(crate) use store::{CHUNK_LEAVES, ChunkCache, Missing, TreeStore};

use crate::event::Event;

/// A SHA-256 digest.
pub type Hash = [u8; 32];

pub fn leaf_hash(data: &[u8]) -> Hash {
    let mut h = Sha256::new();
    h.update([0u8]);
    h.update(data);
    h.finalize().into()
}

pub fn node_hash(left: &Hash, right: &Hash) -> Hash {
    let mut h = Sha256::new();
    h.update([1u8]);
    h.update(left);
    h.update(right);
    h.finalize().into()
}

pub fn empty_root() -> Hash {
    Sha256::digest([]).into()
}

/// The leaf hash of `event`: SHA-256(0x00 || postcard(event)).
pub fn leaf_hash_of_event(event: &Event) -> Hash {
    let mut buf = Vec::with_capacity(256);
    leaf_hash_of_event_with(event, &mut buf)
}

/// As `leaf_hash_of_event`, reusing `buf` for the encoding.
pub fn leaf_hash_of_event_with(event: &Event, buf: &mut Vec<u8>) -> Hash {
    buf.clear();
    buf.push(0);
    let taken = std::mem::take(buf);
    *buf = postcard::to_extend(event, taken).expect("postcard encoding into a Vec cannot fail");
    Sha256::digest(&buf[..]).into()
}

/// The largest power of two strictly below `n` (n >= 2): RFC 6962's split point.
pub(crate) fn split_point(n: u64) -> u64 {
    debug_assert!(n >= 2);
    1u64 << (63 - (n - 1).leading_zeros())
}

/// The root of the tree over `leaves`, by the RFC 6962 recursive definition. A reference for
/// tests; `CompactRange` computes the same in O(log n) memory.
pub fn root_of(leaves: &[Hash]) -> Hash {
    match leaves.len() {
        0 => empty_root(),
        1 => leaves[0],
        n => {
            let k = split_point(n as u64) as usize;
            node_hash(&root_of(&leaves[..k]), &root_of(&leaves[k..]))
        }
    }
}
