//! Model graphs built from Tessera's runtime ops, and the model formats they are read from
//! (GGUF, Hugging Face safetensors folders converted to GGUF); no wgpu types appear here.

pub mod fetch;
pub mod hf;
pub mod llm;
pub mod train;
