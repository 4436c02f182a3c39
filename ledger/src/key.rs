//! The device's ledger signing key (Ed25519) and its public half.
//!
//! Key names, key hashes and the verifier-key string follow Go's `golang.org/x/mod/sumdb/note`:
//! key hash = first 4 bytes (big-endian) of SHA-256(name || "\n" || 0x01 || public key), and a
//! verifier key is written `<name>+<hash, 8 hex digits>+<base64(0x01 || public key)>`.

use std::fs;
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::Path;

use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use ed25519_dalek::{Signature, Signer, SigningKey, Verifier, VerifyingKey};
use sha2::{Digest, Sha256};

use crate::error::KeyError;

/// The algorithm byte of an Ed25519 key in the note format.
const ALG_ED25519: u8 = 1;

/// A note key name: non-empty, no whitespace, no '+'.
pub fn check_key_name(name: &str) -> Result<(), KeyError> {
    if name.is_empty() || name.contains('+') || name.chars().any(char::is_whitespace) {
        return Err(KeyError::BadName(name.to_string()));
    }
    Ok(())
}

/// The private signing key, named. `Debug` never prints the seed.
#[derive(Clone)]
pub struct LedgerKey {
    name: String,
    signing: SigningKey,
}

impl std::fmt::Debug for LedgerKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LedgerKey")
            .field("name", &self.name)
            .field("public", &self.public_key().to_verifier_string())
            .finish_non_exhaustive()
    }
}

impl LedgerKey {
    pub fn from_seed(name: &str, seed: [u8; 32]) -> Result<LedgerKey, KeyError> {
        check_key_name(name)?;
        Ok(LedgerKey {
            name: name.to_string(),
            signing: SigningKey::from_bytes(&seed),
        })
    }

    /// A fresh key from the operating system's random source.
    pub fn generate(name: &str) -> Result<LedgerKey, KeyError> {
        let mut seed = [0u8; 32];
        getrandom::fill(&mut seed).map_err(|e| KeyError::Random(e.to_string()))?;
        LedgerKey::from_seed(name, seed)
    }

    /// Loads the 32-byte seed at `path`, or creates one (mode 0600, written to a temporary file,
    /// fsynced and renamed into place so a crash never leaves a half-written key).
    pub fn load_or_create(path: &Path, name: &str) -> Result<LedgerKey, KeyError> {
        check_key_name(name)?;
        match fs::read(path) {
            Ok(bytes) => {
                let seed: [u8; 32] =
                    bytes
                        .as_slice()
                        .try_into()
                        .map_err(|_| KeyError::BadSeedLength {
                            path: path.to_path_buf(),
                            len: bytes.len(),
                        })?;
                if let Ok(meta) = fs::metadata(path)
                    && meta.permissions().mode() & 0o077 != 0
                {
                    tracing::warn!(
                        path = %path.display(),
                        mode = format!("{:o}", meta.permissions().mode() & 0o777),
                        "ledger key file is readable by group or others; chmod 600 it"
                    );
                }
                LedgerKey::from_seed(name, seed)
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let key = LedgerKey::generate(name)?;
                let tmp = path.with_extension("key-tmp");
                let _ = fs::remove_file(&tmp);
                let mut f = fs::OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .mode(0o600)
                    .open(&tmp)
                    .map_err(|e| KeyError::io(&tmp, e))?;
                f.write_all(&key.signing.to_bytes())
                    .and_then(|_| f.sync_all())
                    .map_err(|e| KeyError::io(&tmp, e))?;
                fs::rename(&tmp, path).map_err(|e| KeyError::io(path, e))?;
                if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
                    fs::File::open(dir)
                        .and_then(|d| d.sync_all())
                        .map_err(|e| KeyError::io(dir, e))?;
                }
                Ok(key)
            }
            Err(e) => Err(KeyError::io(path, e)),
        }
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn public_key(&self) -> PublicKey {
        PublicKey {
            name: self.name.clone(),
            key: self.signing.verifying_key(),
        }
    }

    pub fn sign(&self, msg: &[u8]) -> [u8; 64] {
        self.signing.sign(msg).to_bytes()
    }
}

/// The public half of a `LedgerKey`, with its name: all `verify` needs.
#[derive(Clone, PartialEq, Eq)]
pub struct PublicKey {
    name: String,
    key: VerifyingKey,
}

impl std::fmt::Debug for PublicKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "PublicKey({})", self.to_verifier_string())
    }
}

impl PublicKey {
    pub fn new(name: &str, key: [u8; 32]) -> Result<PublicKey, KeyError> {
        check_key_name(name)?;
        let key = VerifyingKey::from_bytes(&key)
            .map_err(|_| KeyError::BadVerifierKey(name.to_string(), "not an Ed25519 point"))?;
        Ok(PublicKey {
            name: name.to_string(),
            key,
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn to_bytes(&self) -> [u8; 32] {
        self.key.to_bytes()
    }

    /// The 4-byte key hash that prefixes every signature by this key.
    pub fn key_hash(&self) -> u32 {
        let mut h = Sha256::new();
        h.update(self.name.as_bytes());
        h.update(b"\n");
        h.update([ALG_ED25519]);
        h.update(self.key.as_bytes());
        let d = h.finalize();
        u32::from_be_bytes([d[0], d[1], d[2], d[3]])
    }

    /// `<name>+<hash hex>+<base64(0x01 || key)>`, as Go's `note.NewVerifier` reads it.
    pub fn to_verifier_string(&self) -> String {
        let mut k = Vec::with_capacity(33);
        k.push(ALG_ED25519);
        k.extend_from_slice(self.key.as_bytes());
        format!("{}+{:08x}+{}", self.name, self.key_hash(), B64.encode(k))
    }

    pub fn from_verifier_string(s: &str) -> Result<PublicKey, KeyError> {
        let bad = |why| KeyError::BadVerifierKey(s.to_string(), why);
        let mut parts = s.trim().splitn(3, '+');
        let (Some(name), Some(hash), Some(key)) = (parts.next(), parts.next(), parts.next()) else {
            return Err(bad("expected name+hash+key"));
        };
        let hash = u32::from_str_radix(hash, 16).map_err(|_| bad("hash is not hex"))?;
        let key = B64.decode(key).map_err(|_| bad("key is not base64"))?;
        if key.len() != 33 || key[0] != ALG_ED25519 {
            return Err(bad("not an Ed25519 key"));
        }
        let pk = PublicKey::new(name, key[1..].try_into().expect("32 bytes"))?;
        if pk.key_hash() != hash {
            return Err(bad("key hash does not match name and key"));
        }
        Ok(pk)
    }

    /// Reads a verifier-key file such as `<ledger dir>/ledger.pub`.
    pub fn load(path: &Path) -> Result<PublicKey, KeyError> {
        let s = fs::read_to_string(path).map_err(|e| KeyError::io(path, e))?;
        PublicKey::from_verifier_string(&s)
    }

    pub fn verify(&self, msg: &[u8], sig: &[u8; 64]) -> bool {
        self.key.verify(msg, &Signature::from_bytes(sig)).is_ok()
    }
}
