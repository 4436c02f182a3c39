//! Checkpoint notes and keys.

use std::os::unix::fs::PermissionsExt;

use edgelora_ledger::{Checkpoint, LedgerKey, NoteError, PublicKey, epoch_of_origin, origin_for};

fn key(name: &str, seed: u8) -> LedgerKey {
    LedgerKey::from_seed(name, [seed; 32]).unwrap()
}

#[test]
fn checkpoint_note_has_the_tlog_layout_and_round_trips() {
    let k = key("box-1", 1);
    let root = [0xabu8; 32];
    let cp = Checkpoint::sign("box-1", 12345, root, 1_700_000_000_000, 0, &k);
    let note = cp.note();
    let lines: Vec<&str> = note.split('\n').collect();
    assert_eq!(lines[0], "box-1");
    assert_eq!(lines[1], "12345");
    assert_eq!(lines[2], "q6urq6urq6urq6urq6urq6urq6urq6urq6urq6urq6s=");
    assert_eq!(lines[3], "time 1700000000000");
    assert_eq!(lines[4], "first-seq 0");
    assert_eq!(lines[5], "");
    assert!(lines[6].starts_with("\u{2014} box-1 "));
    assert_eq!(lines[7], "");
    assert_eq!(cp.body(), &note[..note.find("\n\n").unwrap() + 1]);
    let parsed = Checkpoint::parse(note).unwrap();
    assert_eq!(parsed, cp);
    parsed.verify(&k.public_key()).unwrap();
}

#[test]
fn signature_line_carries_the_key_hash_then_the_signature() {
    use base64::Engine;
    let k = key("box-1", 1);
    let cp = Checkpoint::sign("box-1", 1, [0; 32], 5, 0, &k);
    let sig_line = cp.note().lines().last().unwrap();
    let b64 = sig_line.rsplit(' ').next().unwrap();
    let blob = base64::engine::general_purpose::STANDARD
        .decode(b64)
        .unwrap();
    assert_eq!(blob.len(), 68);
    assert_eq!(
        u32::from_be_bytes(blob[..4].try_into().unwrap()),
        k.public_key().key_hash()
    );
}

#[test]
fn wrong_key_or_tampered_body_fails_verification() {
    let k = key("box-1", 1);
    let cp = Checkpoint::sign("box-1", 10, [1; 32], 99, 0, &k);
    // Same name, different key: the key hash differs, so no signature by this key is found.
    let imposter = key("box-1", 2).public_key();
    assert!(matches!(
        cp.verify(&imposter),
        Err(NoteError::NoSignatureByKey(_))
    ));
    let other_name = key("box-2", 1).public_key();
    assert!(cp.verify(&other_name).is_err());
    let tampered = cp.note().replacen("\n10\n", "\n11\n", 1);
    let t = Checkpoint::parse(&tampered).unwrap();
    assert_eq!(t.tree_size, 11);
    assert!(matches!(
        t.verify(&k.public_key()),
        Err(NoteError::BadSignature(_))
    ));
}

#[test]
fn malformed_notes_are_refused() {
    let k = key("box-1", 1);
    let good = Checkpoint::sign("box-1", 10, [1; 32], 99, 0, &k)
        .note()
        .to_string();
    for bad in [
        good.replace("time ", "when "),
        good.replace("\n10\n", "\n010\n"),
        good.replace("first-seq 0\n", "first-seq 0\nextra line\n"),
        good.trim_end().to_string(),
        good.replace("\u{2014} ", "- "),
        good.replacen("\n\n", "\n", 1),
    ] {
        assert!(Checkpoint::parse(&bad).is_err(), "accepted: {bad:?}");
    }
}

#[test]
fn epochs_get_their_own_origin() {
    assert_eq!(origin_for("box-1", 0), "box-1");
    assert_eq!(origin_for("box-1", 3), "box-1/epoch-3");
    assert_eq!(epoch_of_origin("box-1"), Some(0));
    assert_eq!(epoch_of_origin("box-1/epoch-3"), Some(3));
    assert_eq!(epoch_of_origin("box-1/epoch-03"), None);
    assert_eq!(epoch_of_origin("box-1/epoch-0"), None);
}

#[test]
fn verifier_key_string_round_trips_and_checks_its_hash() {
    let pk = key("box-1", 4).public_key();
    let s = pk.to_verifier_string();
    assert!(s.starts_with("box-1+"));
    assert_eq!(PublicKey::from_verifier_string(&s).unwrap(), pk);
    let mut parts: Vec<String> = s.split('+').map(String::from).collect();
    parts[1] = "00000000".into();
    assert!(PublicKey::from_verifier_string(&parts.join("+")).is_err());
    assert!(LedgerKey::from_seed("has space", [0; 32]).is_err());
    assert!(LedgerKey::from_seed("has+plus", [0; 32]).is_err());
}

#[test]
fn key_file_is_created_once_with_mode_0600_and_reloaded() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ledger.key");
    let a = LedgerKey::load_or_create(&path, "box-1").unwrap();
    let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    assert_eq!(std::fs::read(&path).unwrap().len(), 32);
    let b = LedgerKey::load_or_create(&path, "box-1").unwrap();
    assert_eq!(a.public_key(), b.public_key());
    std::fs::write(&path, [1u8; 31]).unwrap();
    assert!(LedgerKey::load_or_create(&path, "box-1").is_err());
}
