//! Hyperparameters of a llama-family model, read from GGUF metadata; nothing about a particular
//! model is written in code.

use tessera_runtime::io::gguf::{GgufError, GgufFile};
use tessera_runtime::ops::RopeLayout;

use crate::llm::LlmError;

/// Architectures whose graph this module builds (GGUF's `general.architecture`).
pub const SUPPORTED_ARCHITECTURES: &[&str] = &["llama"];

/// The shapes and constants of one model.
#[derive(Clone, Debug, PartialEq)]
pub struct LlamaConfig {
    pub architecture: String,
    pub n_layer: usize,
    pub n_embd: usize,
    pub n_ff: usize,
    pub n_head: usize,
    pub n_head_kv: usize,
    pub head_dim: usize,
    pub n_rot: usize,
    pub rope_base: f32,
    pub rope_layout: RopeLayout,
    pub rms_eps: f32,
    pub n_ctx_train: usize,
    pub n_vocab: usize,
}

impl LlamaConfig {
    /// Reads the `{arch}.*` keys; an unknown architecture is an error that lists the known ones.
    pub fn from_gguf(file: &GgufFile) -> Result<Self, LlmError> {
        let arch = file.architecture()?.to_string();
        if !SUPPORTED_ARCHITECTURES.contains(&arch.as_str()) {
            return Err(LlmError::UnsupportedArchitecture {
                found: arch,
                supported: SUPPORTED_ARCHITECTURES.join(", "),
            });
        }
        let key = |k: &str| format!("{arch}.{k}");
        let usize_of =
            |k: &str| -> Result<usize, GgufError> { Ok(file.get_u32(&key(k))? as usize) };
        let n_embd = usize_of("embedding_length")?;
        let n_head = usize_of("attention.head_count")?;
        let n_head_kv = file
            .get_u32_opt(&key("attention.head_count_kv"))?
            .map_or(n_head, |v| v as usize);
        if n_head == 0 || n_head_kv == 0 || !n_head.is_multiple_of(n_head_kv) {
            return Err(LlmError::BadConfig(format!(
                "{n_head} attention heads cannot share {n_head_kv} KV heads"
            )));
        }
        let head_dim = match file.get_u32_opt(&key("attention.key_length"))? {
            Some(v) => v as usize,
            None if n_embd.is_multiple_of(n_head) => n_embd / n_head,
            None => {
                return Err(LlmError::BadConfig(format!(
                    "embedding length {n_embd} is not a multiple of {n_head} heads"
                )))
            }
        };
        let n_rot = file
            .get_u32_opt(&key("rope.dimension_count"))?
            .map_or(head_dim, |v| v as usize);
        let n_vocab = match file.get_u32_opt(&key("vocab_size"))? {
            Some(v) => v as usize,
            None => file.get_str_array("tokenizer.ggml.tokens")?.len(),
        };
        let config = LlamaConfig {
            n_layer: usize_of("block_count")?,
            n_embd,
            n_ff: usize_of("feed_forward_length")?,
            n_head,
            n_head_kv,
            head_dim,
            n_rot,
            rope_base: file.get_f32_opt(&key("rope.freq_base"))?.unwrap_or(10000.0),
            // GGUF's llama tensors are stored permuted for GGML's normal (adjacent-pair) RoPE.
            rope_layout: RopeLayout::Normal,
            rms_eps: file
                .get_f32_opt(&key("attention.layer_norm_rms_epsilon"))?
                .unwrap_or(1e-5),
            n_ctx_train: file
                .get_u32_opt(&key("context_length"))?
                .map_or(2048, |v| v as usize),
            n_vocab,
            architecture: arch,
        };
        if config.n_rot > config.head_dim || !config.n_rot.is_multiple_of(2) || config.n_layer == 0
        {
            return Err(LlmError::BadConfig(format!(
                "inconsistent hyperparameters: {config:?}"
            )));
        }
        Ok(config)
    }
}
