//! The llama family of language models: the graph built from GGUF metadata, its KV-cache
//! session, tokenizer, chat template, sampler, and the generate and perplexity loops; published
//! shapes for benchmarks with synthetic weights.

pub mod chat;
pub mod config;
pub mod generate;
pub mod load;
pub mod model;
pub mod observe;
pub mod perplexity;
pub mod presets;
pub mod sampler;
pub mod tokenizer;

pub use config::{LlamaConfig, SUPPORTED_ARCHITECTURES};
pub use load::LoadedModel;
pub use model::{LlamaModel, Logits, Session, TensorSize};
pub use observe::{Observations, ObserveOptions, Site, SiteObservation};

use tessera_runtime::io::gguf::GgufError;
use tessera_runtime::RuntimeError;

/// Errors from loading or running a language model.
#[derive(Debug, thiserror::Error)]
pub enum LlmError {
    #[error(transparent)]
    Gguf(#[from] GgufError),

    #[error(transparent)]
    Runtime(#[from] RuntimeError),

    #[error("unknown model architecture `{found}`; Tessera runs: {supported}")]
    UnsupportedArchitecture { found: String, supported: String },

    #[error("the model's hyperparameters do not fit together: {0}")]
    BadConfig(String),

    #[error("the model file has no tensor `{0}`; it may be truncated or not a llama-family model")]
    MissingTensor(String),

    #[error("tensor `{name}` has shape {found:?}, expected {expected:?}")]
    TensorShape {
        name: String,
        expected: Vec<u64>,
        found: Vec<u64>,
    },

    #[error(
        "tensor `{name}` has type {dtype}, which Tessera cannot run yet (it runs F32, F16, Q4_0, \
         Q4_1 and Q8_0); convert the model with llama-quantize to one of those"
    )]
    UnsupportedTensorType { name: String, dtype: String },

    #[error(
        "{tokens} tokens do not fit in the context of {n_ctx} ({n_past} already used); pass a \
         larger --ctx-size (this model was trained with {n_ctx_train}) or a shorter prompt"
    )]
    ContextFull {
        tokens: usize,
        n_past: usize,
        n_ctx: usize,
        n_ctx_train: usize,
    },

    #[error(
        "the prompt has {prompt} tokens, which with a generated token do not fit in the context \
         of {n_ctx}; pass a larger --ctx-size (this model was trained with {n_ctx_train}) or a \
         shorter prompt"
    )]
    PromptTooLong {
        prompt: usize,
        n_ctx: usize,
        n_ctx_train: usize,
    },

    #[error("the prompt is empty: give some text with -p TEXT or -f FILE")]
    EmptyPrompt,

    #[error("{0}")]
    BadInput(String),

    #[error("token id {id} is outside the vocabulary of {n_vocab}")]
    BadToken { id: u32, n_vocab: usize },

    #[error(transparent)]
    Tokenizer(#[from] tokenizer::TokenizerError),

    #[error(transparent)]
    Chat(#[from] chat::ChatError),
}
