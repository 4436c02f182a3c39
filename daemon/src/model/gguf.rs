//! PLACEHOLDER until the GGUF module lands.
#[derive(Debug, thiserror::Error)]
pub enum GgufError {
    #[error("{0}")]
    Other(String),
}
