//! Model file I/O: GGUF read over mmap, GGUF written atomically.

pub mod gguf;
pub mod gguf_write;
