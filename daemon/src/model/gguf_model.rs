//! PLACEHOLDER until the GGUF module lands.
use super::*;
use std::path::Path;
pub fn load_gguf(
    path: &Path,
    _opts: &LoadOptions,
) -> Result<(ModelConfig, ModelWeights, TextTokenizer), ModelError> {
    Err(ModelError::Unsupported(format!(
        "{}: GGUF not yet",
        path.display()
    )))
}
