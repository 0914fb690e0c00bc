//! Training a small llama-family language model from scratch on Tessera's autograd tape.
//!
//! `lm`: the model (byte vocabulary; RMSNorm, RoPE, attention, SwiGLU as in the inference
//! graph, with GGUF's tensor names and layouts). `data`: a text split into training bytes and
//! held-out bytes, and the batches drawn from them. `trainer`: the loop (AdamW, warmup and
//! cosine decay, clipping by global norm, evaluation). `checkpoint`: a checkpoint is a Hugging
//! Face llama folder (config.json, model.safetensors, a byte-level tokenizer.json) plus the
//! optimizer's state and the trainer's JSON, so `quant`, `generate` and llama.cpp's converter
//! read it as they read any llama checkpoint.

pub mod checkpoint;
pub mod data;
pub mod lm;
pub mod trainer;

pub use checkpoint::{latest_checkpoint, load_checkpoint, save_checkpoint, step_dirs, Checkpoint};
pub use data::Corpus;
pub use lm::{LmConfig, LmModel};
pub use trainer::{StepStats, TrainConfig, Trainer};

/// Why training cannot go on; each message names the problem and the way out.
#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    #[error(transparent)]
    Runtime(#[from] tessera_runtime::RuntimeError),

    #[error("{what}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },

    #[error("{0}")]
    Data(String),

    #[error("{0}")]
    Config(String),

    #[error("checkpoint {path}: {why}")]
    Checkpoint { path: String, why: String },
}

pub type Result<T, E = TrainError> = std::result::Result<T, E>;
