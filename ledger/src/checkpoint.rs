//! Signed checkpoints in the tlog-checkpoint / Go sumdb note format.
//!
//! ```text
//! <origin>\n
//! <tree size, decimal>\n
//! <base64 root hash>\n
//! time <unix ms>\n
//! first-seq <sequence number of leaf 0>\n
//! \n
//! — <key name> <base64(4-byte key hash || 64-byte Ed25519 signature)>\n
//! ```
//!
//! The signature covers the body (the first five lines, each with its newline). The origin is
//! the device id for epoch 0 and `<device id>/epoch-<n>` for later epochs: each epoch is its own
//! tree, so it gets its own origin. Readers refuse unknown extension lines.

use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;

use crate::key::{LedgerKey, PublicKey};
use crate::merkle::Hash;

/// The em dash that starts a note signature line.
const SIG_PREFIX: &str = "\u{2014} ";

/// Why a checkpoint note was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NoteError {
    #[error("malformed checkpoint note: {0}")]
    Malformed(String),
    #[error("checkpoint note has no signature by key {0}")]
    NoSignatureByKey(String),
    #[error("checkpoint signature by key {0} does not verify")]
    BadSignature(String),
}

fn malformed(s: impl Into<String>) -> NoteError {
    NoteError::Malformed(s.into())
}

/// A signed statement: "the log `origin` had `tree_size` leaves with root `root` at `time_ms`".
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Checkpoint {
    pub origin: String,
    pub tree_size: u64,
    pub root: Hash,
    pub time_ms: u64,
    /// Sequence number of leaf 0 (the epoch's first event).
    pub first_seq: u64,
    note: String,
}

/// The origin of `device_id`'s tree in `epoch`.
pub fn origin_for(device_id: &str, epoch: u32) -> String {
    if epoch == 0 {
        device_id.to_string()
    } else {
        format!("{device_id}/epoch-{epoch}")
    }
}

/// The epoch an origin names (0 when it has no `/epoch-<n>` suffix).
pub fn epoch_of_origin(origin: &str) -> Option<u32> {
    match origin.rsplit_once("/epoch-") {
        None => Some(0),
        Some((_, n)) => n
            .parse::<u32>()
            .ok()
            .filter(|&e| e > 0 && n == e.to_string()),
    }
}

fn body_text(origin: &str, tree_size: u64, root: &Hash, time_ms: u64, first_seq: u64) -> String {
    format!(
        "{origin}\n{tree_size}\n{}\ntime {time_ms}\nfirst-seq {first_seq}\n",
        B64.encode(root)
    )
}

fn parse_decimal(s: &str, what: &str) -> Result<u64, NoteError> {
    if s.is_empty() || (s.len() > 1 && s.starts_with('0')) || !s.bytes().all(|b| b.is_ascii_digit())
    {
        return Err(malformed(format!(
            "{what} {s:?} is not a canonical decimal"
        )));
    }
    s.parse()
        .map_err(|_| malformed(format!("{what} {s:?} overflows")))
}

impl Checkpoint {
    /// Signs a checkpoint with `key`.
    pub fn sign(
        origin: &str,
        tree_size: u64,
        root: Hash,
        time_ms: u64,
        first_seq: u64,
        key: &LedgerKey,
    ) -> Checkpoint {
        let body = body_text(origin, tree_size, &root, time_ms, first_seq);
        let sig = key.sign(body.as_bytes());
        let mut blob = Vec::with_capacity(68);
        blob.extend_from_slice(&key.public_key().key_hash().to_be_bytes());
        blob.extend_from_slice(&sig);
        let note = format!("{body}\n{SIG_PREFIX}{} {}\n", key.name(), B64.encode(blob));
        Checkpoint {
            origin: origin.to_string(),
            tree_size,
            root,
            time_ms,
            first_seq,
            note,
        }
    }

    /// The full signed note, as stored in the log and sent to collectors.
    pub fn note(&self) -> &str {
        &self.note
    }

    /// The signed part of the note.
    pub fn body(&self) -> &str {
        let split = self
            .note
            .rfind("\n\n")
            .expect("a parsed note has a blank line");
        &self.note[..split + 1]
    }

    /// The epoch this checkpoint's origin names.
    pub fn epoch(&self) -> u32 {
        epoch_of_origin(&self.origin).unwrap_or(0)
    }

    /// Parses a note's structure; the signature is not checked (see `verify`).
    pub fn parse(note: &str) -> Result<Checkpoint, NoteError> {
        if !note.ends_with('\n') {
            return Err(malformed("note does not end with a newline"));
        }
        let split = note
            .rfind("\n\n")
            .ok_or_else(|| malformed("no blank line before the signatures"))?;
        let body = &note[..split + 1];
        let sigs = &note[split + 2..];
        if sigs.is_empty() {
            return Err(malformed("no signature lines"));
        }
        for line in sigs.lines() {
            if !line.starts_with(SIG_PREFIX) {
                return Err(malformed(format!(
                    "signature line {line:?} does not start with '— '"
                )));
            }
        }
        let lines: Vec<&str> = body
            .strip_suffix('\n')
            .unwrap_or(body)
            .split('\n')
            .collect();
        let [origin, size, root, time, first] = lines.as_slice() else {
            return Err(malformed(format!(
                "expected 5 body lines, found {}",
                lines.len()
            )));
        };
        if origin.is_empty() || epoch_of_origin(origin).is_none() {
            return Err(malformed(format!("bad origin {origin:?}")));
        }
        let tree_size = parse_decimal(size, "tree size")?;
        let root_bytes = B64
            .decode(root)
            .map_err(|_| malformed("root is not base64"))?;
        let root: Hash = root_bytes
            .as_slice()
            .try_into()
            .map_err(|_| malformed("root is not 32 bytes"))?;
        let time_ms = parse_decimal(
            time.strip_prefix("time ")
                .ok_or_else(|| malformed(format!("expected 'time <ms>', found {time:?}")))?,
            "time",
        )?;
        let first_seq = parse_decimal(
            first
                .strip_prefix("first-seq ")
                .ok_or_else(|| malformed(format!("expected 'first-seq <n>', found {first:?}")))?,
            "first-seq",
        )?;
        let cp = Checkpoint {
            origin: origin.to_string(),
            tree_size,
            root,
            time_ms,
            first_seq,
            note: note.to_string(),
        };
        if cp.body() != body_text(origin, tree_size, &root, time_ms, first_seq) {
            return Err(malformed("body is not in canonical form"));
        }
        Ok(cp)
    }

    /// Checks that the note carries a valid signature by `key` (other keys' lines are ignored,
    /// as in Go's `note.Open`).
    pub fn verify(&self, key: &PublicKey) -> Result<(), NoteError> {
        let body = self.body();
        let sigs = &self.note[body.len() + 1..];
        for line in sigs.lines() {
            let rest = &line[SIG_PREFIX.len()..];
            let Some((name, b64)) = rest.split_once(' ') else {
                return Err(malformed(format!(
                    "signature line {line:?} has no key name"
                )));
            };
            if name != key.name() {
                continue;
            }
            let blob = B64
                .decode(b64)
                .map_err(|_| malformed("signature is not base64"))?;
            if blob.len() != 68 {
                return Err(malformed("signature is not 4 + 64 bytes"));
            }
            if u32::from_be_bytes([blob[0], blob[1], blob[2], blob[3]]) != key.key_hash() {
                continue;
            }
            let sig: [u8; 64] = blob[4..].try_into().expect("64 bytes");
            return if key.verify(body.as_bytes(), &sig) {
                Ok(())
            } else {
                Err(NoteError::BadSignature(key.name().to_string()))
            };
        }
        Err(NoteError::NoSignatureByKey(key.name().to_string()))
    }
}
