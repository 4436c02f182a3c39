//! A model's hyper-parameters without its weights: `config.json` of a Hugging Face or GPTQ folder,
//! or the metadata of a GGUF file (memory-mapped; tensor data is never read). Enough for the
//! adapter registry's base fingerprint, in milliseconds instead of a full load.

use std::path::Path;

use serde_json::Value;

use super::ModelError;
use super::config::{ModelConfig, token_id_list};
use super::gguf::GgufFile;
use super::hf::read_json;

/// The config [`super::Model::load`] would build for `path`, without loading tensors.
pub fn probe_config(path: &Path) -> Result<ModelConfig, ModelError> {
    let meta = std::fs::metadata(path).map_err(|e| ModelError::io(path, e))?;
    if meta.is_dir() {
        let mut config = ModelConfig::from_hf_json(&read_json(&path.join("config.json"))?)?;
        // As hf::load_folder: generation_config.json overrides the special tokens.
        let gen_path = path.join("generation_config.json");
        if gen_path.exists() {
            let g = read_json(&gen_path)?;
            let ids = token_id_list(g.get("eos_token_id"));
            if !ids.is_empty() {
                config.eos_token_ids = ids;
            }
            if let Some(b) = g.get("bos_token_id").and_then(Value::as_u64) {
                config.bos_token_id = Some(b as u32);
            }
        }
        Ok(config)
    } else {
        gguf_config(&GgufFile::open(path)?)
    }
}

/// The config from `{arch}.*` metadata, as the GGUF loader builds it.
pub fn gguf_config(f: &GgufFile) -> Result<ModelConfig, ModelError> {
    super::gguf_model::config_from(f)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::adapters::pack::fingerprint;
    use crate::model::gguf_tests::fixture_path;
    use crate::model::{LoadOptions, Model, WeightDtype};

    fn same(a: &ModelConfig, b: &ModelConfig) {
        assert_eq!(format!("{a:?}"), format!("{b:?}"));
        assert_eq!(fingerprint(a), fingerprint(b));
    }

    #[test]
    fn probe_matches_the_loader_on_hf_and_gptq_folders() {
        for rel in ["tiny-llama", "tiny-llama/tiny-llama-gptq"] {
            let p = fixture_path(rel);
            let loaded = Model::load(&p, &LoadOptions::reference(WeightDtype::F32)).unwrap();
            same(&probe_config(&p).unwrap(), &loaded.config);
        }
    }

    #[test]
    fn probe_matches_the_loader_on_smollm2() {
        let path = crate::default_model::model_path();
        if !path.exists() {
            eprintln!("SKIPPED: SmolLM2 GGUF not found at {}", path.display());
            return;
        }
        let loaded = Model::load(&path, &LoadOptions::default()).unwrap();
        same(&probe_config(&path).unwrap(), &loaded.config);
    }

    #[test]
    fn probe_errors_name_the_path() {
        let e = probe_config(Path::new("/no/such/model.gguf")).unwrap_err();
        assert!(e.to_string().contains("/no/such/model.gguf"), "{e}");
    }
}
