//! Model graphs built from Tessera's runtime ops; no wgpu types appear here.

pub mod fetch;
pub mod llm;
