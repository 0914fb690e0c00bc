//! config.json of a llama checkpoint: the hyperparameters, checked so that no later step divides
//! by zero or overflows, and the `llama.*` GGUF keys llama.cpp's converter writes for them.

use std::path::Path;

use serde_json::Value;
use tessera_runtime::io::gguf::MetaValue;

use super::{read_json, HfError};

/// `model_type` values (and their `architectures` class) this converter reads.
pub const SUPPORTED_MODEL_TYPES: &[&str] = &["llama (LlamaForCausalLM)"];

/// Largest value accepted for a size in config.json (GGUF stores sizes as u32).
const MAX_SIZE: u64 = u32::MAX as u64;

/// The hyperparameters of a llama checkpoint, with Hugging Face's defaults applied.
#[derive(Clone, Debug, PartialEq)]
pub struct HfConfig {
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub n_head: usize,
    pub n_head_kv: usize,
    pub n_layer: usize,
    pub head_dim: usize,
    /// True when config.json gives `head_dim` other than hidden_size / heads.
    pub head_dim_explicit: bool,
    pub vocab_size: usize,
    pub rms_norm_eps: f32,
    pub rope_theta: f32,
    pub context_length: usize,
    pub tie_word_embeddings: bool,
    /// config.json's `bos_token_id` / `eos_token_id` (the first, where it is a list).
    pub bos_token_id: Option<u32>,
    pub eos_token_id: Option<u32>,
}

impl HfConfig {
    /// Reads `dir/config.json`.
    pub fn read(dir: &Path) -> Result<Self, HfError> {
        let path = dir.join("config.json");
        if !path.is_file() {
            return Err(HfError::NoConfig {
                dir: dir.to_path_buf(),
            });
        }
        Self::parse(&read_json(&path)?)
    }

    /// Checks and reads a parsed config.json.
    pub fn parse(v: &Value) -> Result<Self, HfError> {
        let bad = |msg: String| HfError::Config(msg);
        if !v.is_object() {
            return Err(bad("expected a JSON object".into()));
        }

        // 1. The architecture: model_type, else the class in `architectures`.
        let model_type = v.get("model_type").and_then(Value::as_str);
        let class = v
            .get("architectures")
            .and_then(Value::as_array)
            .and_then(|a| a.first())
            .and_then(Value::as_str);
        match (model_type, class) {
            (Some("llama"), _) | (None, Some("LlamaForCausalLM")) => {}
            (Some(other), _) => {
                return Err(HfError::UnknownModelType {
                    found: other.to_string(),
                })
            }
            (None, Some(other)) => {
                return Err(HfError::UnknownModelType {
                    found: format!("(none; architectures: {other})"),
                })
            }
            (None, None) => {
                return Err(bad(
                    "no `model_type` (nor `architectures`): this does not look like a \
                     transformers model config"
                        .into(),
                ))
            }
        }

        // 2. What the llama graph Tessera runs cannot express.
        if let Some(act) = v.get("hidden_act").and_then(Value::as_str) {
            if act != "silu" {
                return Err(bad(format!(
                    "`hidden_act` is `{act}`; Tessera's llama graph runs SiLU (SwiGLU) only"
                )));
            }
        }
        for key in ["attention_bias", "mlp_bias"] {
            if v.get(key).and_then(Value::as_bool) == Some(true) {
                return Err(bad(format!(
                    "`{key}` is true; Tessera's llama graph has no biases"
                )));
            }
        }
        if let Some(scaling) = v.get("rope_scaling").filter(|s| !s.is_null()) {
            let kind = scaling
                .get("rope_type")
                .or_else(|| scaling.get("type"))
                .and_then(Value::as_str)
                .unwrap_or("?");
            if kind != "default" {
                return Err(bad(format!(
                    "`rope_scaling` is `{kind}`; Tessera runs plain RoPE only, so this model's \
                     long-context scaling would be lost"
                )));
            }
        }

        // 3. Sizes, with Hugging Face's LlamaConfig defaults where it has them.
        let hidden_size = size(v, "hidden_size", None)?;
        let n_head = size(v, "num_attention_heads", None)?;
        let n_head_kv = size(v, "num_key_value_heads", Some(n_head))?;
        let default_head_dim = hidden_size / n_head;
        let head_dim = match v.get("head_dim").filter(|h| !h.is_null()) {
            None => {
                if !hidden_size.is_multiple_of(n_head) {
                    return Err(bad(format!(
                        "`hidden_size` {hidden_size} is not a multiple of `num_attention_heads` \
                         {n_head}, and there is no `head_dim`"
                    )));
                }
                default_head_dim
            }
            Some(_) => size(v, "head_dim", None)?,
        };
        if !n_head.is_multiple_of(n_head_kv) {
            return Err(bad(format!(
                "`num_attention_heads` {n_head} is not a multiple of `num_key_value_heads` \
                 {n_head_kv}"
            )));
        }
        if !head_dim.is_multiple_of(2) {
            return Err(bad(format!(
                "the head size {head_dim} is odd; rotary embeddings need pairs"
            )));
        }
        let config = HfConfig {
            hidden_size,
            intermediate_size: size(v, "intermediate_size", None)?,
            n_head,
            n_head_kv,
            n_layer: size(v, "num_hidden_layers", None)?,
            head_dim,
            head_dim_explicit: head_dim != default_head_dim,
            vocab_size: size(v, "vocab_size", None)?,
            rms_norm_eps: number(v, "rms_norm_eps", 1e-6)?,
            rope_theta: number(v, "rope_theta", 10000.0)?,
            context_length: size(v, "max_position_embeddings", Some(2048))?,
            tie_word_embeddings: match v.get("tie_word_embeddings") {
                None | Some(Value::Null) => false,
                Some(Value::Bool(b)) => *b,
                Some(other) => {
                    return Err(bad(format!(
                        "`tie_word_embeddings` is {other}, not true or false"
                    )))
                }
            },
            bos_token_id: token_id(v, "bos_token_id"),
            eos_token_id: token_id(v, "eos_token_id"),
        };
        Ok(config)
    }

    /// The `llama.*` keys, in the order llama.cpp's converter writes them.
    pub fn gguf_metadata(&self) -> Vec<(String, MetaValue)> {
        let u = |n: usize| MetaValue::U32(n as u32);
        let mut keys = vec![
            ("llama.block_count", u(self.n_layer)),
            ("llama.context_length", u(self.context_length)),
            ("llama.embedding_length", u(self.hidden_size)),
            ("llama.feed_forward_length", u(self.intermediate_size)),
            ("llama.attention.head_count", u(self.n_head)),
            ("llama.attention.head_count_kv", u(self.n_head_kv)),
            ("llama.rope.freq_base", MetaValue::F32(self.rope_theta)),
            (
                "llama.attention.layer_norm_rms_epsilon",
                MetaValue::F32(self.rms_norm_eps),
            ),
        ];
        if self.head_dim_explicit {
            keys.push(("llama.attention.key_length", u(self.head_dim)));
            keys.push(("llama.attention.value_length", u(self.head_dim)));
        }
        keys.push(("llama.vocab_size", u(self.vocab_size)));
        keys.push(("llama.rope.dimension_count", u(self.head_dim)));
        keys.into_iter().map(|(k, v)| (k.to_string(), v)).collect()
    }
}

/// A positive integer key (or `default` when absent), at most u32::MAX.
fn size(v: &Value, key: &str, default: Option<usize>) -> Result<usize, HfError> {
    let value = match (v.get(key).filter(|x| !x.is_null()), default) {
        (None, Some(d)) => return Ok(d),
        (None, None) => return Err(HfError::Config(format!("`{key}` is missing"))),
        (Some(x), _) => x,
    };
    match value.as_u64() {
        Some(n) if (1..=MAX_SIZE).contains(&n) => Ok(n as usize),
        _ => Err(HfError::Config(format!(
            "`{key}` is {value}; it must be a whole number from 1 to {MAX_SIZE}"
        ))),
    }
}

/// A finite non-negative number key, or `default` when absent.
fn number(v: &Value, key: &str, default: f32) -> Result<f32, HfError> {
    let Some(value) = v.get(key).filter(|x| !x.is_null()) else {
        return Ok(default);
    };
    match value.as_f64() {
        Some(x) if x.is_finite() && x >= 0.0 && (x as f32).is_finite() => Ok(x as f32),
        _ => Err(HfError::Config(format!(
            "`{key}` is {value}; it must be a finite number of 0 or more"
        ))),
    }
}

/// A token id key: a number, or the first of a list (Llama 3.1 lists several EOS ids).
fn token_id(v: &Value, key: &str) -> Option<u32> {
    let value = v.get(key)?;
    let first = value
        .as_array()
        .map_or(Some(value), |a| a.first())?
        .as_u64()?;
    u32::try_from(first).ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn smollm2() -> Value {
        json!({
            "architectures": ["LlamaForCausalLM"], "model_type": "llama",
            "hidden_size": 576, "intermediate_size": 1536, "num_attention_heads": 9,
            "num_key_value_heads": 3, "num_hidden_layers": 30, "rms_norm_eps": 1e-5,
            "rope_theta": 100000, "max_position_embeddings": 8192, "vocab_size": 49152,
            "tie_word_embeddings": true, "hidden_act": "silu", "rope_scaling": null,
            "bos_token_id": 1, "eos_token_id": [2, 0]
        })
    }

    #[test]
    fn smollm2s_config_gives_the_keys_of_its_llama_cpp_gguf() {
        let c = HfConfig::parse(&smollm2()).unwrap();
        assert_eq!((c.head_dim, c.head_dim_explicit), (64, false));
        assert_eq!((c.bos_token_id, c.eos_token_id), (Some(1), Some(2)));
        let keys = c.gguf_metadata();
        let get = |k: &str| keys.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone());
        assert_eq!(get("llama.rope.freq_base"), Some(MetaValue::F32(100000.0)));
        assert_eq!(
            get("llama.attention.head_count_kv"),
            Some(MetaValue::U32(3))
        );
        assert_eq!(get("llama.rope.dimension_count"), Some(MetaValue::U32(64)));
        assert_eq!(get("llama.attention.key_length"), None);
    }

    #[test]
    fn configs_tessera_cannot_run_are_named() {
        let cases: [(&str, Value, &str); 7] = [
            ("model_type", json!("mistral"), "mistral"),
            ("hidden_size", json!(0), "hidden_size"),
            ("num_key_value_heads", json!(4), "num_key_value_heads"),
            ("hidden_size", json!(-3), "hidden_size"),
            ("attention_bias", json!(true), "biases"),
            ("rope_scaling", json!({"rope_type": "llama3"}), "llama3"),
            ("rms_norm_eps", json!("small"), "rms_norm_eps"),
        ];
        for (key, value, needle) in cases {
            let mut v = smollm2();
            v[key] = value;
            let e = HfConfig::parse(&v).unwrap_err().to_string();
            assert!(e.contains(needle), "{key}: {e}");
        }
        let mut v = smollm2();
        v.as_object_mut().unwrap().remove("num_hidden_layers");
        let e = HfConfig::parse(&v).unwrap_err().to_string();
        assert!(
            e.contains("num_hidden_layers") && e.contains("missing"),
            "{e}"
        );
    }
}
