//! Merkle roots and proofs against brute force, and the ledger's own proofs.

mod common;

use edgelora_ledger::merkle::{
    CompactRange, Hash, consistency_proof, empty_root, inclusion_proof, leaf_hash,
    leaf_hash_of_event, node_hash, root_of, verify_consistency, verify_inclusion,
};
use sha2_free::brute_root;

/// An independent brute force: hash level by level, carrying an odd last node up unchanged
/// (equivalent to RFC 6962's largest-power-of-two split).
mod sha2_free {
    use super::*;
    pub fn brute_root(leaves: &[Hash]) -> Hash {
        if leaves.is_empty() {
            return empty_root();
        }
        let mut level = leaves.to_vec();
        while level.len() > 1 {
            level = level
                .chunks(2)
                .map(|p| {
                    if p.len() == 2 {
                        node_hash(&p[0], &p[1])
                    } else {
                        p[0]
                    }
                })
                .collect();
        }
        level[0]
    }
}

fn leaves(n: usize) -> Vec<Hash> {
    (0..n)
        .map(|i| leaf_hash(format!("leaf {i}").as_bytes()))
        .collect()
}

fn mth(l: &[Hash]) -> impl FnMut(u64, u64) -> Hash + '_ {
    move |a, b| root_of(&l[a as usize..b as usize])
}

#[test]
fn roots_match_brute_force_for_sizes_1_to_70() {
    let all = leaves(70);
    let mut range = CompactRange::new();
    assert_eq!(range.root(), empty_root());
    for n in 1..=70 {
        range.push(all[n - 1]);
        let expected = brute_root(&all[..n]);
        assert_eq!(root_of(&all[..n]), expected, "recursive root, size {n}");
        assert_eq!(range.root(), expected, "compact range root, size {n}");
        assert_eq!(range.nodes().len(), n.count_ones() as usize);
        let rebuilt = CompactRange::from_parts(n as u64, range.nodes().to_vec()).unwrap();
        assert_eq!(rebuilt.root(), expected);
    }
}

#[test]
fn inclusion_proofs_verify_for_every_leaf_of_every_size_up_to_40_and_fail_when_tampered() {
    let all = leaves(40);
    for n in 1..=40u64 {
        let l = &all[..n as usize];
        let root = brute_root(l);
        for m in 0..n {
            let proof = inclusion_proof(m, n, &mut mth(l));
            verify_inclusion(m, n, &l[m as usize], &proof, &root).unwrap();
            // Wrong leaf, wrong index, wrong size, tampered or truncated path: all fail.
            let other = leaf_hash(b"not a leaf");
            assert!(verify_inclusion(m, n, &other, &proof, &root).is_err());
            if n > 1 {
                assert!(verify_inclusion((m + 1) % n, n, &l[m as usize], &proof, &root).is_err());
                let mut bad = proof.clone();
                bad[0][0] ^= 1;
                assert!(verify_inclusion(m, n, &l[m as usize], &bad, &root).is_err());
                assert!(verify_inclusion(m, n, &l[m as usize], &proof[1..], &root).is_err());
            }
            // (A wrong tree size is not always detectable from the path alone, e.g. leaf 0 of
            // 6 vs 7 leaves share a path shape; the signed checkpoint binds the size.)
            assert!(verify_inclusion(m, n + 40, &l[m as usize], &proof, &root).is_err());
        }
    }
}

#[test]
fn consistency_proofs_verify_for_every_pair_up_to_40_and_fail_when_tampered() {
    let all = leaves(40);
    for n in 1..=40u64 {
        let new_root = brute_root(&all[..n as usize]);
        for m in 0..=n {
            let old_root = brute_root(&all[..m as usize]);
            let proof = consistency_proof(m, n, &mut mth(&all[..n as usize]));
            verify_consistency(m, n, &old_root, &new_root, &proof).unwrap();
            if m > 0 && m < n {
                let mut bad = proof.clone();
                let last = bad.len() - 1;
                bad[last][5] ^= 0x80;
                assert!(verify_consistency(m, n, &old_root, &new_root, &bad).is_err());
                let mut wrong_old = old_root;
                wrong_old[0] ^= 1;
                assert!(verify_consistency(m, n, &wrong_old, &new_root, &proof).is_err());
                assert!(
                    verify_consistency(m, n, &old_root, &new_root, &proof[..proof.len() - 1])
                        .is_err()
                );
                // A proof for other sizes does not verify these.
                if m + 1 < n {
                    assert!(
                        verify_consistency(
                            m + 1,
                            n,
                            &brute_root(&all[..m as usize + 1]),
                            &new_root,
                            &proof
                        )
                        .is_err()
                    );
                }
            }
        }
    }
    assert!(verify_consistency(5, 3, &empty_root(), &empty_root(), &[]).is_err());
}

#[test]
fn ledger_proofs_match_brute_force_before_and_after_reopen() {
    let dir = tempfile::tempdir().unwrap();
    // 700 events: several 256-leaf chunks, so proofs must read chunks back from disk.
    let events = common::build(dir.path(), 700);
    let leaves: Vec<Hash> = events.iter().map(leaf_hash_of_event).collect();
    let (ledger, report) = common::open(dir.path());
    assert_eq!(report.events, 700);
    // Open replays only what follows the last snapshot; proofs still work.
    assert!(report.replayed_events < 700);
    let cp = ledger.latest_checkpoint().unwrap();
    assert_eq!(cp.tree_size, 700);
    assert_eq!(cp.root, root_of(&leaves));
    let pk = ledger.public_key().clone();
    for seq in [0u64, 1, 255, 256, 300, 511, 512, 699] {
        let p = ledger.inclusion_proof(seq).unwrap();
        p.verify(&pk).unwrap();
        assert_eq!(p.path, inclusion_proof(seq, 700, &mut mth(&leaves)));
    }
    for (m, n) in [
        (0, 700),
        (1, 700),
        (256, 700),
        (300, 512),
        (513, 699),
        (700, 700),
    ] {
        let c = ledger.consistency_proof(m, n).unwrap();
        assert_eq!(c.old_root, root_of(&leaves[..m as usize]));
        assert_eq!(c.new_root, root_of(&leaves[..n as usize]));
        verify_consistency(m, n, &c.old_root, &c.new_root, &c.path).unwrap();
    }
    // Any size, not only checkpointed ones.
    for (seq, size) in [(0u64, 1u64), (10, 11), (257, 600), (699, 700)] {
        let path = ledger.inclusion_path(seq, size).unwrap();
        let root = ledger.root_at(size).unwrap();
        assert_eq!(root, root_of(&leaves[..size as usize]));
        verify_inclusion(seq, size, &leaves[seq as usize], &path, &root).unwrap();
    }
    assert!(ledger.inclusion_path(10, 10).is_err());
    // New events extend the same tree.
    let more = common::append_all(&ledger, common::bodies(40, 9));
    let cp2 = ledger.checkpoint_now().unwrap();
    assert_eq!(cp2.tree_size, 740);
    let mut all = leaves.clone();
    all.extend(more.iter().map(leaf_hash_of_event));
    assert_eq!(cp2.root, root_of(&all));
    let c = ledger
        .consistency_proof(cp.tree_size, cp2.tree_size)
        .unwrap();
    verify_consistency(cp.tree_size, cp2.tree_size, &cp.root, &cp2.root, &c.path).unwrap();
    // A tampered event does not verify.
    let mut p = ledger.inclusion_proof(5).unwrap();
    p.event.body.prompt_tokens += 1;
    assert!(p.verify(&pk).is_err());
    ledger.close().unwrap();
    // The offline proof (files only) agrees.
    let off = edgelora_ledger::inspect::prove(dir.path(), &pk, 600).unwrap();
    off.verify(&pk).unwrap();
    assert_eq!(off.checkpoint.tree_size, 740);
}
