//! Prompt templates contributed by someone: registered by id with a minijinja template and a
//! contributor, used by a request through `prompt_id` + `prompt_vars`, and credited in the
//! request's attribution event.
//!
//! Each template is one JSON file `<data dir>/prompts/<id>.json`, written atomically (temporary
//! file, fsync, rename, fsync of the folder); the store reads them all at start.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use minijinja::Environment;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::adapters::registry::validate_named_id;

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PromptTemplate {
    pub id: String,
    pub template: String,
    pub contributor: String,
    /// Unix seconds.
    pub created: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum PromptError {
    #[error("{0}")]
    Invalid(String),
    #[error("prompt template {id}: {msg}")]
    Render { id: String, msg: String },
    #[error("prompt template store {}: {source}", path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// Every registered template, by id.
pub struct PromptStore {
    dir: PathBuf,
    templates: BTreeMap<String, PromptTemplate>,
}

/// Templates are small; a request's variables must not make them huge either.
const MAX_TEMPLATE_BYTES: usize = 64 << 10;
const MAX_RENDERED_BYTES: usize = 1 << 20;

fn env_for(t: &str) -> Result<Environment<'static>, String> {
    let mut env = Environment::new();
    env.set_undefined_behavior(minijinja::UndefinedBehavior::Strict);
    env.add_template_owned("t".to_string(), t.to_string())
        .map_err(|e| e.to_string())?;
    Ok(env)
}

impl PromptStore {
    /// Reads every `*.json` template in `dir` (created if missing). A file that does not parse
    /// is skipped with a warning naming it.
    pub fn open(dir: &Path) -> Result<Self, PromptError> {
        let io = |source| PromptError::Io {
            path: dir.to_path_buf(),
            source,
        };
        std::fs::create_dir_all(dir).map_err(io)?;
        let mut templates = BTreeMap::new();
        for e in std::fs::read_dir(dir).map_err(io)?.flatten() {
            let p = e.path();
            if p.extension().and_then(|x| x.to_str()) != Some("json") {
                continue;
            }
            match std::fs::read(&p).map_err(|e| e.to_string()).and_then(|b| {
                serde_json::from_slice::<PromptTemplate>(&b).map_err(|e| e.to_string())
            }) {
                Ok(t) if p.file_stem().and_then(|s| s.to_str()) == Some(t.id.as_str()) => {
                    templates.insert(t.id.clone(), t);
                }
                Ok(t) => {
                    tracing::warn!(path = %p.display(), "prompt template id {:?} does not match its file name; skipped", t.id)
                }
                Err(e) => {
                    tracing::warn!(path = %p.display(), "unreadable prompt template skipped: {e}")
                }
            }
        }
        Ok(Self {
            dir: dir.to_path_buf(),
            templates,
        })
    }

    pub fn get(&self, id: &str) -> Option<&PromptTemplate> {
        self.templates.get(id)
    }

    pub fn list(&self) -> impl Iterator<Item = &PromptTemplate> {
        self.templates.values()
    }

    /// Registers (or with `replace`, replaces) a template after checking its id, contributor and
    /// syntax; durable when it returns.
    pub fn register(
        &mut self,
        id: &str,
        template: &str,
        contributor: &str,
        replace: bool,
    ) -> Result<&PromptTemplate, PromptError> {
        validate_named_id("prompt template", id).map_err(PromptError::Invalid)?;
        if contributor.trim().is_empty() {
            return Err(PromptError::Invalid(format!(
                "prompt template {id}: the contributor is empty"
            )));
        }
        if template.len() > MAX_TEMPLATE_BYTES {
            return Err(PromptError::Invalid(format!(
                "prompt template {id}: {} bytes (at most {MAX_TEMPLATE_BYTES})",
                template.len()
            )));
        }
        if !replace && self.templates.contains_key(id) {
            return Err(PromptError::Invalid(format!(
                "prompt template {id} exists (replace it explicitly)"
            )));
        }
        env_for(template)
            .map_err(|e| PromptError::Invalid(format!("prompt template {id}: {e}")))?;
        let t = PromptTemplate {
            id: id.to_string(),
            template: template.to_string(),
            contributor: contributor.to_string(),
            created: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs()),
        };
        let path = self.dir.join(format!("{id}.json"));
        write_atomic(&path, &serde_json::to_vec_pretty(&t).expect("serializable"))
            .map_err(|source| PromptError::Io { path, source })?;
        self.templates.insert(id.to_string(), t);
        Ok(&self.templates[id])
    }

    /// Removes a template; returns whether it existed.
    pub fn remove(&mut self, id: &str) -> Result<bool, PromptError> {
        if self.templates.remove(id).is_none() {
            return Ok(false);
        }
        let path = self.dir.join(format!("{id}.json"));
        std::fs::remove_file(&path).map_err(|source| PromptError::Io { path, source })?;
        Ok(true)
    }

    /// Renders template `id` with `vars` (a JSON object); a variable the template uses but the
    /// request did not give is an error naming it.
    pub fn render(&self, id: &str, vars: &Value) -> Result<(String, &PromptTemplate), PromptError> {
        let t = self.templates.get(id).ok_or_else(|| {
            PromptError::Invalid(format!("no prompt template {id:?} is registered"))
        })?;
        if !(vars.is_object() || vars.is_null()) {
            return Err(PromptError::Invalid(
                "prompt_vars must be a JSON object".into(),
            ));
        }
        let render = |e: String| PromptError::Render {
            id: id.to_string(),
            msg: e,
        };
        let env = env_for(&t.template).map_err(render)?;
        let text = env
            .get_template("t")
            .and_then(|tpl| tpl.render(crate::model::chat::json_to_value(vars)))
            .map_err(|e| render(e.to_string()))?;
        if text.len() > MAX_RENDERED_BYTES {
            return Err(render(format!(
                "rendered to {} bytes (at most {MAX_RENDERED_BYTES})",
                text.len()
            )));
        }
        Ok((text, t))
    }
}

/// Temporary file, fsync, rename, fsync of the folder.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let tmp = dir.join(format!(
        ".{}.tmp-{}",
        path.file_name().and_then(|n| n.to_str()).unwrap_or("file"),
        std::process::id()
    ));
    {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
    }
    std::fs::rename(&tmp, path)?;
    std::fs::File::open(dir)?.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn templates_register_render_persist_and_refuse_bad_input() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = PromptStore::open(dir.path()).unwrap();
        s.register(
            "summarize",
            "Summarize for {{ who }}:\n{{ text }}",
            "Ada",
            false,
        )
        .unwrap();
        let (text, t) = s
            .render("summarize", &json!({"who": "kids", "text": "The sky."}))
            .unwrap();
        assert_eq!(text, "Summarize for kids:\nThe sky.");
        assert_eq!(t.contributor, "Ada");
        // A missing variable is named; unknown ids, bad ids and bad syntax are refused.
        let e = s.render("summarize", &json!({"who": "x"})).unwrap_err();
        assert!(e.to_string().contains("summarize"), "{e}");
        assert!(s.render("nope", &json!({})).is_err());
        assert!(s.render("summarize", &json!([1])).is_err());
        assert!(s.register("../x", "t", "c", false).is_err());
        assert!(s.register("bad", "{{ unclosed", "c", false).is_err());
        assert!(s.register("summarize", "x", "c", false).is_err());
        assert!(s.register("empty-contrib", "x", " ", false).is_err());
        // Durable: a fresh store reads it back.
        let s2 = PromptStore::open(dir.path()).unwrap();
        assert_eq!(s2.get("summarize"), s.get("summarize"));
        assert_eq!(s2.list().count(), 1);
        let mut s2 = s2;
        assert!(s2.remove("summarize").unwrap());
        assert!(
            PromptStore::open(dir.path())
                .unwrap()
                .get("summarize")
                .is_none()
        );
    }
}
