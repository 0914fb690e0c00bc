//! Tessera: one GPU compute runtime on wgpu, with WGSL kernels, for LLM inference,
//! quantization and training. This crate re-exports the workspace's public API.

pub use tessera_models as models;
pub use tessera_quant as quant;
pub use tessera_runtime as runtime;
