//! Tessera's post-training quantization toolkit: GGUF block codecs, calibration data and
//! activation statistics, the quantizers behind `quant calibrate` (round to nearest, importance
//! matrix, GPTQ, AWQ), and the evaluation of a quantized model against its base.

pub mod awq;
pub mod calib;
pub mod calibrate;
pub mod codec;
pub mod eval;
pub mod gather;
pub mod gptq;
pub mod imatrix;
pub mod mix;
pub mod report;
pub mod stats;

use tessera_models::llm::LlmError;
use tessera_runtime::RuntimeError;

/// Errors of the quantization toolkit.
#[derive(Debug, thiserror::Error)]
pub enum QuantError {
    /// Calibration or evaluation data that cannot be used.
    #[error("{0}")]
    Data(String),
    /// A tensor whose shape the method or type cannot take.
    #[error("{0}")]
    Shape(String),
    /// GPTQ's Cholesky factorization failed at every damping tried.
    #[error("{0}")]
    Cholesky(String),
    /// A model file that cannot be quantized (unsupported type, missing tensor, ...).
    #[error("{0}")]
    Model(String),
    #[error(transparent)]
    Llm(#[from] LlmError),
    #[error(transparent)]
    Runtime(#[from] RuntimeError),
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
}
