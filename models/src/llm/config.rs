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
                "`{arch}.attention.head_count` = {n_head} heads cannot share \
                 `{arch}.attention.head_count_kv` = {n_head_kv} KV heads"
            )));
        }
        let head_dim = match file.get_u32_opt(&key("attention.key_length"))? {
            Some(v) => v as usize,
            None if n_embd.is_multiple_of(n_head) => n_embd / n_head,
            None => {
                return Err(LlmError::BadConfig(format!(
                    "`{arch}.embedding_length` = {n_embd} is not a multiple of {n_head} heads"
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
        config.validate()?;
        Ok(config)
    }

    /// Checks the values no tensor shape would catch, naming the GGUF key at fault.
    pub(crate) fn validate(&self) -> Result<(), LlmError> {
        let arch = &self.architecture;
        let bad = |key: &str, value: String, rule: &str| {
            Err(LlmError::BadConfig(format!(
                "`{arch}.{key}` = {value}: {rule}"
            )))
        };
        if self.n_layer == 0 {
            return bad(
                "block_count",
                "0".into(),
                "a model needs at least one layer",
            );
        }
        if self.n_embd == 0 || self.n_ff == 0 {
            let (key, v) = if self.n_embd == 0 {
                ("embedding_length", self.n_embd)
            } else {
                ("feed_forward_length", self.n_ff)
            };
            return bad(key, v.to_string(), "must be positive");
        }
        if self.n_rot == 0 || self.n_rot > self.head_dim || !self.n_rot.is_multiple_of(2) {
            let rule = format!(
                "must be even and between 2 and the head size {}",
                self.head_dim
            );
            return bad("rope.dimension_count", self.n_rot.to_string(), &rule);
        }
        if self.head_dim == 0 || !self.head_dim.is_multiple_of(4) {
            let rule = "Tessera's attention kernels need a head size that is a multiple of 4";
            return bad("attention.key_length", self.head_dim.to_string(), rule);
        }
        if !(self.rope_base.is_finite() && self.rope_base > 0.0) {
            return bad(
                "rope.freq_base",
                self.rope_base.to_string(),
                "must be a positive number",
            );
        }
        if self.n_ctx_train == 0 {
            let rule = "a model is trained on at least one token of context; fix the file's \
                        metadata (llama.cpp's gguf_set_metadata.py) or convert the model again";
            return bad("context_length", "0".into(), rule);
        }
        if !(self.rms_eps.is_finite() && self.rms_eps >= 0.0) {
            let rule = "must be a number of 0 or more";
            return bad(
                "attention.layer_norm_rms_epsilon",
                self.rms_eps.to_string(),
                rule,
            );
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_no_tensor_shape_catches_are_refused_naming_their_key() {
        let good = crate::llm::presets::preset("smollm2-135m").unwrap().config;
        good.validate().unwrap();
        type Spoil = fn(&mut LlamaConfig);
        let cases: [(&str, Spoil); 5] = [
            ("block_count", |c| c.n_layer = 0),
            ("feed_forward_length", |c| c.n_ff = 0),
            ("rope.dimension_count", |c| c.n_rot = 3),
            ("rope.freq_base", |c| c.rope_base = f32::NAN),
            ("context_length", |c| c.n_ctx_train = 0),
        ];
        for (key, spoil) in cases {
            let mut config = good.clone();
            spoil(&mut config);
            let err = config.validate().unwrap_err().to_string();
            assert!(err.contains(&format!("llama.{key}`")), "{key}: {err}");
        }
    }
}
