//! Published llama-family shapes, for benchmarks with synthetic weights
//! ([`LlamaModel::synthetic`](crate::llm::LlamaModel::synthetic)): the speed of a model of
//! that size on any device, without downloading it.
//!
//! Values are those of each model's `config.json` on the Hugging Face Hub
//! (HuggingFaceTB/SmolLM2-135M, meta-llama/Llama-3.2-1B, meta-llama/Llama-3.2-3B,
//! meta-llama/Llama-3.1-8B). Llama 3's RoPE frequency scaling (`rope_scaling`, type `llama3`)
//! is not modelled: it changes the numbers, not the work.

use tessera_runtime::ops::RopeLayout;

use crate::llm::LlamaConfig;

/// One named shape.
#[derive(Clone, Debug)]
pub struct Preset {
    /// The name `--synthetic` takes, e.g. `llama-1b`.
    pub name: &'static str,
    /// The model whose shape this is.
    pub model: &'static str,
    pub config: LlamaConfig,
    /// Whether the output projection is the token embedding (`tie_word_embeddings`).
    pub tied_output: bool,
}

/// The shape's numbers, in `config.json`'s order.
struct Shape {
    hidden_size: usize,
    intermediate_size: usize,
    num_attention_heads: usize,
    num_key_value_heads: usize,
    num_hidden_layers: usize,
    vocab_size: usize,
    rope_theta: f32,
    max_position_embeddings: usize,
}

impl Shape {
    fn config(&self) -> LlamaConfig {
        let head_dim = self.hidden_size / self.num_attention_heads;
        LlamaConfig {
            architecture: "llama".into(),
            n_layer: self.num_hidden_layers,
            n_embd: self.hidden_size,
            n_ff: self.intermediate_size,
            n_head: self.num_attention_heads,
            n_head_kv: self.num_key_value_heads,
            head_dim,
            n_rot: head_dim,
            rope_base: self.rope_theta,
            rope_layout: RopeLayout::Normal,
            rms_eps: 1e-5,
            n_ctx_train: self.max_position_embeddings,
            n_vocab: self.vocab_size,
        }
    }
}

/// Every preset, smallest first.
pub fn presets() -> Vec<Preset> {
    let llama3 = |hidden_size, intermediate_size, heads, layers| Shape {
        hidden_size,
        intermediate_size,
        num_attention_heads: heads,
        num_key_value_heads: 8,
        num_hidden_layers: layers,
        vocab_size: 128_256,
        rope_theta: 500_000.0,
        max_position_embeddings: 131_072,
    };
    let smollm2 = Shape {
        hidden_size: 576,
        intermediate_size: 1536,
        num_attention_heads: 9,
        num_key_value_heads: 3,
        num_hidden_layers: 30,
        vocab_size: 49_152,
        rope_theta: 100_000.0,
        max_position_embeddings: 8192,
    };
    let preset = |name, model, shape: Shape, tied_output| Preset {
        name,
        model,
        config: shape.config(),
        tied_output,
    };
    vec![
        preset("smollm2-135m", "SmolLM2-135M", smollm2, true),
        preset("llama-1b", "Llama 3.2 1B", llama3(2048, 8192, 32, 16), true),
        preset("llama-3b", "Llama 3.2 3B", llama3(3072, 8192, 24, 28), true),
        preset(
            "llama-8b",
            "Llama 3.1 8B",
            llama3(4096, 14_336, 32, 32),
            false,
        ),
    ]
}

/// The preset called `name` (case-insensitive).
pub fn preset(name: &str) -> Option<Preset> {
    presets()
        .into_iter()
        .find(|p| p.name.eq_ignore_ascii_case(name.trim()))
}

/// The presets' names, for error messages.
pub fn preset_names() -> String {
    presets()
        .iter()
        .map(|p| p.name)
        .collect::<Vec<_>>()
        .join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Parameter counts as published: 135M, 1.24B, 3.21B, 8.03B.
    #[test]
    fn presets_have_their_published_parameter_counts() {
        let want = [
            ("smollm2-135m", 134.5e6),
            ("llama-1b", 1.236e9),
            ("llama-3b", 3.213e9),
            ("llama-8b", 8.030e9),
        ];
        for (name, params) in want {
            let p = preset(name).unwrap();
            let c = &p.config;
            let (dq, dkv) = (c.n_head * c.head_dim, c.n_head_kv * c.head_dim);
            let layer = c.n_embd * (2 * dq + 2 * dkv) + 3 * c.n_embd * c.n_ff + 2 * c.n_embd;
            let embeddings = c.n_vocab * c.n_embd * if p.tied_output { 1 } else { 2 };
            let total = (c.n_layer * layer + embeddings + c.n_embd) as f64;
            assert!((total / params - 1.0).abs() < 0.002, "{name}: {total}");
            assert!(c.validate().is_ok(), "{name}");
        }
        assert!(preset("LLAMA-1B").is_some());
        assert!(preset("nope").is_none());
        assert_eq!(preset_names(), "smollm2-135m, llama-1b, llama-3b, llama-8b");
    }
}
