//! Inclusion and consistency proofs: generation by the recursive definitions of RFC 6962
//! §2.1.1–2.1.2 over any source of subtree hashes, verification by the iterative algorithms of
//! RFC 9162 §2.1.3.2 and §2.1.4.2.

use super::{Hash, node_hash, split_point};

/// Why a proof did not verify.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProofError {
    #[error("leaf index {index} is not below tree size {size}")]
    IndexOutOfRange { index: u64, size: u64 },
    #[error("old tree size {old} exceeds new tree size {new}")]
    SizesOutOfOrder { old: u64, new: u64 },
    #[error("proof has the wrong number of hashes")]
    WrongLength,
    #[error("recomputed root does not match")]
    RootMismatch,
}

/// The audit path of leaf `m` in the tree of size `n`; `mth(a, b)` must return the hash of the
/// subtree over leaves `[a, b)`. Empty for a one-leaf tree.
pub fn inclusion_proof(m: u64, n: u64, mth: &mut impl FnMut(u64, u64) -> Hash) -> Vec<Hash> {
    fn path(m: u64, a: u64, b: u64, mth: &mut impl FnMut(u64, u64) -> Hash, out: &mut Vec<Hash>) {
        let n = b - a;
        if n <= 1 {
            return;
        }
        let k = split_point(n);
        if m < k {
            path(m, a, a + k, mth, out);
            out.push(mth(a + k, b));
        } else {
            path(m - k, a + k, b, mth, out);
            out.push(mth(a, a + k));
        }
    }
    assert!(m < n, "leaf {m} outside tree of size {n}");
    let mut out = Vec::new();
    path(m, 0, n, mth, &mut out);
    out
}

/// The consistency proof between the trees of sizes `m` and `n` (`m <= n`). Empty when `m == 0`
/// or `m == n`.
pub fn consistency_proof(m: u64, n: u64, mth: &mut impl FnMut(u64, u64) -> Hash) -> Vec<Hash> {
    fn sub(
        m: u64,
        a: u64,
        b: u64,
        whole: bool,
        mth: &mut impl FnMut(u64, u64) -> Hash,
        out: &mut Vec<Hash>,
    ) {
        let n = b - a;
        if m == n {
            if !whole {
                out.push(mth(a, b));
            }
            return;
        }
        let k = split_point(n);
        if m <= k {
            sub(m, a, a + k, whole, mth, out);
            out.push(mth(a + k, b));
        } else {
            sub(m - k, a + k, b, false, mth, out);
            out.push(mth(a, a + k));
        }
    }
    assert!(m <= n, "old size {m} above new size {n}");
    let mut out = Vec::new();
    if m > 0 && m < n {
        sub(m, 0, n, true, mth, &mut out);
    }
    out
}

/// The root that `proof` implies for leaf `index` with hash `leaf` in a tree of `size` leaves.
pub fn root_from_inclusion(
    index: u64,
    size: u64,
    leaf: &Hash,
    proof: &[Hash],
) -> Result<Hash, ProofError> {
    if index >= size {
        return Err(ProofError::IndexOutOfRange { index, size });
    }
    let (mut f, mut s) = (index, size - 1);
    let mut r = *leaf;
    for p in proof {
        if s == 0 {
            return Err(ProofError::WrongLength);
        }
        if f & 1 == 1 || f == s {
            r = node_hash(p, &r);
            while f & 1 == 0 && f != 0 {
                f >>= 1;
                s >>= 1;
            }
        } else {
            r = node_hash(&r, p);
        }
        f >>= 1;
        s >>= 1;
    }
    if s != 0 {
        return Err(ProofError::WrongLength);
    }
    Ok(r)
}

/// RFC 9162 §2.1.3.2: does `proof` show leaf `index` (hash `leaf`) is in the tree of `size`
/// leaves with root `root`?
pub fn verify_inclusion(
    index: u64,
    size: u64,
    leaf: &Hash,
    proof: &[Hash],
    root: &Hash,
) -> Result<(), ProofError> {
    if root_from_inclusion(index, size, leaf, proof)? == *root {
        Ok(())
    } else {
        Err(ProofError::RootMismatch)
    }
}

/// RFC 9162 §2.1.4.2: does `proof` show the tree of `old_size` leaves with root `old_root` is a
/// prefix of the tree of `new_size` leaves with root `new_root`? An empty old tree is consistent
/// with every tree (and needs an empty proof).
pub fn verify_consistency(
    old_size: u64,
    new_size: u64,
    old_root: &Hash,
    new_root: &Hash,
    proof: &[Hash],
) -> Result<(), ProofError> {
    if old_size > new_size {
        return Err(ProofError::SizesOutOfOrder {
            old: old_size,
            new: new_size,
        });
    }
    if old_size == new_size || old_size == 0 {
        if !proof.is_empty() {
            return Err(ProofError::WrongLength);
        }
        return if old_size == 0 || old_root == new_root {
            Ok(())
        } else {
            Err(ProofError::RootMismatch)
        };
    }
    if proof.is_empty() {
        return Err(ProofError::WrongLength);
    }
    let mut path: Vec<Hash> = Vec::with_capacity(proof.len() + 1);
    if old_size.is_power_of_two() {
        path.push(*old_root);
    }
    path.extend_from_slice(proof);
    let (mut f, mut s) = (old_size - 1, new_size - 1);
    while f & 1 == 1 {
        f >>= 1;
        s >>= 1;
    }
    let (mut fr, mut sr) = (path[0], path[0]);
    for c in &path[1..] {
        if s == 0 {
            return Err(ProofError::WrongLength);
        }
        if f & 1 == 1 || f == s {
            fr = node_hash(c, &fr);
            sr = node_hash(c, &sr);
            while f & 1 == 0 && f != 0 {
                f >>= 1;
                s >>= 1;
            }
        } else {
            sr = node_hash(&sr, c);
        }
        f >>= 1;
        s >>= 1;
    }
    if s != 0 {
        return Err(ProofError::WrongLength);
    }
    if fr == *old_root && sr == *new_root {
        Ok(())
    } else {
        Err(ProofError::RootMismatch)
    }
}
