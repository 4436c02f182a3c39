//! The adapter registry: every `<id>.elpack` in one folder, indexed from headers only. A pack that
//! cannot be used (another base model, damaged, unknown version) stays listed as unavailable with
//! its error; it never stops the daemon from starting.

use std::collections::BTreeMap;
use std::fs::File;
use std::path::{Path, PathBuf};

use super::pack::{self, ImportRequest, PACK_EXT, PackError, PackInfo};
use crate::model::ModelConfig;

/// Longest adapter id.
pub const MAX_ID_LEN: usize = 64;

/// An adapter id: 1 to 64 of `[A-Za-z0-9._-]`, starting with a letter or digit, without `..`.
/// (It names a file, a model in the API and an attribution record.)
pub fn validate_id(id: &str) -> Result<(), String> {
    validate_named_id("adapter", id)
}

/// The id rules of everything the appliance stores by name (adapters, prompt templates): the
/// error starts with `what`.
pub fn validate_named_id(what: &str, id: &str) -> Result<(), String> {
    if id.is_empty() {
        return Err(format!("a {what} id must not be empty"));
    }
    if id.len() > MAX_ID_LEN {
        return Err(format!(
            "{what} id {id:?} is {} characters long (at most {MAX_ID_LEN})",
            id.len()
        ));
    }
    if let Some(c) = id
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')))
    {
        return Err(format!(
            "{what} id {id:?} contains {c:?} (only letters, digits, '.', '_' and '-')"
        ));
    }
    if !id.as_bytes()[0].is_ascii_alphanumeric() {
        return Err(format!(
            "{what} id {id:?} must start with a letter or digit"
        ));
    }
    if id.contains("..") {
        return Err(format!("{what} id {id:?} must not contain \"..\""));
    }
    Ok(())
}

/// `$EDGELORA_DATA`, else `$XDG_DATA_HOME/edgelora`, else `~/.local/share/edgelora`.
pub fn default_data_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("EDGELORA_DATA").filter(|d| !d.is_empty()) {
        return PathBuf::from(d);
    }
    if let Some(d) = std::env::var_os("XDG_DATA_HOME").filter(|d| !d.is_empty()) {
        return PathBuf::from(d).join("edgelora");
    }
    let home = std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("."));
    home.join(".local").join("share").join("edgelora")
}

/// `<data dir>/adapters`.
pub fn default_adapters_dir() -> PathBuf {
    default_data_dir().join("adapters")
}

/// Deletes `<dir>/<id>.elpack` and syncs the folder, without indexing the folder. A missing file
/// is an error unless `known` (the caller had it listed).
pub fn remove_pack(dir: &Path, id: &str, known: bool) -> Result<(), PackError> {
    validate_id(id).map_err(|msg| PackError::Invalid {
        adapter: id.to_string(),
        msg,
    })?;
    let path = dir.join(format!("{id}.{PACK_EXT}"));
    match std::fs::remove_file(&path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound && known => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(PackError::Invalid {
                adapter: id.to_string(),
                msg: format!("no such adapter in {}", dir.display()),
            });
        }
        Err(e) => {
            return Err(PackError::Io {
                adapter: id.to_string(),
                path,
                source: e,
            });
        }
    }
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| PackError::Io {
            adapter: id.to_string(),
            path: dir.to_path_buf(),
            source: e,
        })
}

#[derive(Clone, Debug, PartialEq)]
pub enum EntryState {
    Available,
    /// The error's text and its [`PackError::kind`].
    Unavailable(String, &'static str),
}

impl EntryState {
    pub fn is_available(&self) -> bool {
        matches!(self, EntryState::Available)
    }
    /// "available" or the error kind.
    pub fn label(&self) -> &'static str {
        match self {
            EntryState::Available => "available",
            EntryState::Unavailable(_, kind) => kind,
        }
    }
}

#[derive(Clone, Debug)]
pub struct RegistryEntry {
    /// `None` when the header or metadata could not be read.
    pub info: Option<PackInfo>,
    pub path: PathBuf,
    pub state: EntryState,
}

impl RegistryEntry {
    /// What `open` makes of one file.
    fn index(path: PathBuf, fingerprint: &[u8; 32]) -> (String, RegistryEntry) {
        let id = path
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default();
        let (info, err) = match validate_id(&id) {
            Err(msg) => (
                None,
                Some(PackError::Invalid {
                    adapter: id.clone(),
                    msg: format!("bad file name: {msg}"),
                }),
            ),
            Ok(()) => match pack::read_head(&path) {
                Ok((info, disk_len)) => {
                    let err = pack::check_fit(&info, disk_len, fingerprint).err();
                    (Some(info), err)
                }
                Err(e) => (None, Some(e)),
            },
        };
        let state = match err {
            None => EntryState::Available,
            Some(e) => {
                tracing::warn!(adapter = %id, path = %path.display(), kind = e.kind(), "adapter unavailable: {e}");
                EntryState::Unavailable(e.to_string(), e.kind())
            }
        };
        (id, RegistryEntry { info, path, state })
    }
}

/// The packs of one folder, by id.
#[derive(Debug)]
pub struct Registry {
    dir: PathBuf,
    /// `dir`, canonical (for [`Registry::resolve_in_dir`]).
    canon_dir: PathBuf,
    fingerprint: [u8; 32],
    entries: BTreeMap<String, RegistryEntry>,
}

/// The conversion half of [`Registry::import`]: checks the id and that `config` is the
/// registry's base model, and writes the pack into `dir`. It touches no registry, so a server can
/// run it without holding the registry's lock.
pub fn convert(
    dir: &Path,
    fingerprint: &[u8; 32],
    peft_dir: &Path,
    req: &ImportRequest,
    config: &ModelConfig,
) -> Result<PackInfo, PackError> {
    validate_id(&req.id).map_err(|msg| PackError::Invalid {
        adapter: req.id.clone(),
        msg,
    })?;
    let fp = pack::fingerprint(config);
    if &fp != fingerprint {
        return Err(PackError::WrongBase {
            adapter: req.id.clone(),
            expected: pack::fingerprint_short(fingerprint),
            found: pack::fingerprint_short(&fp),
        });
    }
    pack::import_peft(peft_dir, dir, req, config)
}

impl Registry {
    /// Indexes every `*.elpack` in `dir` (creating `dir` when missing), reading headers and
    /// metadata only, on a few threads. Bad packs are kept as unavailable with their error.
    pub fn open(dir: &Path, fingerprint: [u8; 32]) -> std::io::Result<Self> {
        std::fs::create_dir_all(dir)?;
        let canon_dir = dir.canonicalize()?;
        let mut paths = Vec::new();
        for e in std::fs::read_dir(dir)? {
            let e = e?;
            let name = e.file_name();
            let name = name.to_string_lossy();
            // Temp files of an import in progress start with '.'.
            if name.starts_with('.') || !name.ends_with(&format!(".{PACK_EXT}")) {
                continue;
            }
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                continue;
            }
            paths.push(e.path());
        }
        paths.sort();
        let threads = std::thread::available_parallelism()
            .map_or(1, |n| n.get())
            .clamp(1, 8)
            .min(paths.len().div_ceil(256).max(1));
        let chunk = paths.len().div_ceil(threads).max(1);
        let mut entries = BTreeMap::new();
        std::thread::scope(|s| {
            let handles: Vec<_> = paths
                .chunks(chunk)
                .map(|ps| {
                    s.spawn(move || {
                        ps.iter()
                            .map(|p| RegistryEntry::index(p.clone(), &fingerprint))
                            .collect::<Vec<_>>()
                    })
                })
                .collect();
            for h in handles {
                entries.extend(h.join().expect("indexing thread"));
            }
        });
        Ok(Self {
            dir: dir.to_path_buf(),
            canon_dir,
            fingerprint,
            entries,
        })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }
    pub fn fingerprint(&self) -> &[u8; 32] {
        &self.fingerprint
    }
    pub fn get(&self, id: &str) -> Option<&RegistryEntry> {
        self.entries.get(id)
    }
    /// Ids in sorted order.
    pub fn ids(&self) -> impl Iterator<Item = &str> {
        self.entries.keys().map(String::as_str)
    }
    /// (id, entry) in id order.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &RegistryEntry)> {
        self.entries.iter().map(|(k, v)| (k.as_str(), v))
    }
    pub fn len(&self) -> usize {
        self.entries.len()
    }
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
    /// Where the pack of `id` lives (whether or not it exists).
    pub fn path_for(&self, id: &str) -> PathBuf {
        self.dir.join(format!("{id}.{PACK_EXT}"))
    }

    /// Imports a PEFT folder as `<id>.elpack` and lists it. `config` must be this registry's base
    /// model.
    pub fn import(
        &mut self,
        peft_dir: &Path,
        req: &ImportRequest,
        config: &ModelConfig,
    ) -> Result<&RegistryEntry, PackError> {
        let info = convert(&self.dir, &self.fingerprint, peft_dir, req, config)?;
        Ok(self.insert(info))
    }

    /// Registers a pack [`convert`] wrote into this registry's folder (replacing an entry of
    /// the same id).
    pub fn insert(&mut self, info: PackInfo) -> &RegistryEntry {
        let id = info.id().to_string();
        let entry = RegistryEntry {
            path: info.path.clone(),
            info: Some(info),
            state: EntryState::Available,
        };
        self.entries.insert(id.clone(), entry);
        &self.entries[&id]
    }

    /// Deletes the pack file (and syncs the folder) and forgets the entry.
    pub fn remove(&mut self, id: &str) -> Result<(), PackError> {
        remove_pack(&self.dir, id, self.entries.contains_key(id))?;
        self.entries.remove(id);
        Ok(())
    }

    /// Marks an entry unusable (a load found it damaged); it stays listed with the error.
    pub fn mark_unavailable(&mut self, id: &str, err: &PackError) {
        if let Some(e) = self.entries.get_mut(id) {
            tracing::warn!(adapter = %id, kind = err.kind(), "adapter marked unavailable: {err}");
            e.state = EntryState::Unavailable(err.to_string(), err.kind());
        }
    }

    /// Canonicalizes `p` (relative paths are taken from the registry folder) and refuses anything
    /// that is not inside the folder, symbolic links pointing out included.
    pub fn resolve_in_dir(&self, p: &Path) -> Result<PathBuf, String> {
        let full = if p.is_absolute() {
            p.to_path_buf()
        } else {
            self.dir.join(p)
        };
        let canon = full
            .canonicalize()
            .map_err(|e| format!("{}: {e}", p.display()))?;
        if canon == self.canon_dir || !canon.starts_with(&self.canon_dir) {
            return Err(format!(
                "{} is outside the adapters folder {}",
                p.display(),
                self.dir.display()
            ));
        }
        Ok(canon)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::adapters::pack::tests::{manifest, synthetic, tiny_config};
    use crate::adapters::pack::{PackDtype, fingerprint, write_pack};
    use crate::model::Proj;

    #[test]
    fn validate_id_table() {
        for good in [
            "a",
            "A",
            "0",
            "alpha-qv",
            "beta_attn.v2",
            "x.y-z_1",
            "a-",
            "a.",
            &"a".repeat(64),
        ] {
            assert_eq!(validate_id(good), Ok(()), "{good:?}");
        }
        for (bad, why) in [
            ("", "empty"),
            (".", "start"),
            ("..", "start"),
            (".hidden", "start"),
            ("-x", "start"),
            ("_x", "start"),
            ("a..b", ".."),
            ("a/b", "'/'"),
            ("../x", "'/'"),
            ("a b", "' '"),
            ("é", "'é'"),
            ("a\0", "'\\0'"),
            ("a\\b", "'\\\\'"),
            (&"a".repeat(65), "at most 64"),
        ] {
            let e = validate_id(bad).unwrap_err();
            assert!(e.contains(why), "{bad:?}: {e}");
        }
    }

    #[test]
    fn default_data_dir_prefers_edgelora_data() {
        // Read-only check of the rule without touching the environment (tests run in parallel).
        let d = default_data_dir();
        if let Some(v) = std::env::var_os("EDGELORA_DATA").filter(|v| !v.is_empty()) {
            assert_eq!(d, PathBuf::from(v));
        } else {
            assert!(d.ends_with("edgelora"), "{}", d.display());
        }
        assert!(default_adapters_dir().ends_with("adapters"));
    }

    #[test]
    fn open_lists_good_and_bad_packs_and_remove_deletes() {
        let dir = tempfile::tempdir().unwrap();
        let c = tiny_config();
        let fp = fingerprint(&c);
        let ad = synthetic(&c, 2, &[Proj::Q], 5);
        for id in ["good1", "good2"] {
            write_pack(
                &dir.path().join(format!("{id}.elpack")),
                &ad,
                PackDtype::F32,
                &fp,
                &manifest(id),
            )
            .unwrap();
        }
        write_pack(
            &dir.path().join("other-base.elpack"),
            &ad,
            PackDtype::F32,
            &[1; 32],
            &manifest("other-base"),
        )
        .unwrap();
        std::fs::write(dir.path().join("junk.elpack"), b"not a pack at all").unwrap();
        std::fs::write(dir.path().join("bad name.elpack"), b"x").unwrap();
        std::fs::write(dir.path().join("ignored.txt"), b"x").unwrap();
        std::fs::write(dir.path().join(".tmp-import.elpack"), b"x").unwrap();
        let good = std::fs::read(dir.path().join("good1.elpack")).unwrap();
        // good1's bytes under another name: manifest id mismatch.
        std::fs::write(dir.path().join("renamed.elpack"), &good).unwrap();

        let mut r = Registry::open(dir.path(), fp).unwrap();
        let states: Vec<(&str, &str)> = r.iter().map(|(id, e)| (id, e.state.label())).collect();
        assert_eq!(
            states,
            [
                ("bad name", "invalid"),
                ("good1", "available"),
                ("good2", "available"),
                ("junk", "not_a_pack"),
                ("other-base", "wrong_base"),
                ("renamed", "invalid"),
            ]
        );
        assert!(r.get("other-base").unwrap().info.is_some());
        assert!(r.get("junk").unwrap().info.is_none());
        if let EntryState::Unavailable(msg, _) = &r.get("junk").unwrap().state {
            assert!(msg.contains("junk"), "{msg}");
        }
        r.remove("good1").unwrap();
        assert!(r.get("good1").is_none());
        assert!(!dir.path().join("good1.elpack").exists());
        assert_eq!(r.remove("good1").unwrap_err().kind(), "invalid");
        assert_eq!(r.remove("../x").unwrap_err().kind(), "invalid");
        r.mark_unavailable(
            "good2",
            &PackError::Digest {
                adapter: "good2".into(),
            },
        );
        assert_eq!(r.get("good2").unwrap().state.label(), "digest_mismatch");
    }

    #[test]
    fn truncated_pack_is_listed_as_truncated() {
        let dir = tempfile::tempdir().unwrap();
        let c = tiny_config();
        let fp = fingerprint(&c);
        let ad = synthetic(&c, 2, &[Proj::Q, Proj::Down], 5);
        let p = dir.path().join("t.elpack");
        write_pack(&p, &ad, PackDtype::F32, &fp, &manifest("t")).unwrap();
        let bytes = std::fs::read(&p).unwrap();
        std::fs::write(&p, &bytes[..bytes.len() - 1]).unwrap();
        let r = Registry::open(dir.path(), fp).unwrap();
        let e = r.get("t").unwrap();
        assert_eq!(e.state.label(), "truncated");
        assert!(e.info.is_some());
    }

    #[cfg(unix)]
    #[test]
    fn resolve_in_dir_refuses_escapes() {
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join("adapters");
        let r = Registry::open(&dir, [0; 32]).unwrap();
        assert!(dir.is_dir());
        std::fs::create_dir(dir.join("inside")).unwrap();
        std::fs::write(root.path().join("secret"), b"x").unwrap();
        std::os::unix::fs::symlink(root.path().join("secret"), dir.join("link-out")).unwrap();
        std::os::unix::fs::symlink(dir.join("inside"), dir.join("link-in")).unwrap();
        let canon = dir.canonicalize().unwrap();
        assert_eq!(
            r.resolve_in_dir(Path::new("inside")).unwrap(),
            canon.join("inside")
        );
        assert_eq!(
            r.resolve_in_dir(&dir.join("link-in")).unwrap(),
            canon.join("inside")
        );
        for bad in [
            PathBuf::from("../secret"),
            PathBuf::from("inside/../../secret"),
            PathBuf::from("link-out"),
            root.path().join("secret"),
            PathBuf::from("."),
            PathBuf::from("missing"),
            PathBuf::from("/"),
        ] {
            assert!(r.resolve_in_dir(&bad).is_err(), "{}", bad.display());
        }
    }
}
