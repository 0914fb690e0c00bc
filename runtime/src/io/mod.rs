//! Model file I/O: GGUF over mmap.

pub mod gguf;
