//! Tessera's runtime: the one layer that talks to wgpu.
//!
//! It chooses an adapter and reads its limits, owns buffers and compute pipelines, records
//! dispatches into command buffers, and holds every kernel family (WGSL from `shaders/`, its
//! dispatch code and a CPU reference). It also reads model files (GGUF over mmap) and measures
//! the device's copy bandwidth.

mod affinity;
pub mod autograd;
pub mod bandwidth;
pub mod error;
pub mod gpu;
pub mod io;
pub mod ops;
pub mod optim;
pub mod pipeline;
mod pool;
pub mod recorder;
pub mod shaders;
pub mod tensor;
pub mod testing;

pub use error::{Result, RuntimeError};
pub use gpu::{enumerate_adapters, AdapterReport, DeviceSelector, Gpu, GpuOptions, KernelLayout};
pub use recorder::{ReadId, Recorder};
pub use tensor::{dequantize_row, synthetic_pattern, DType, Tensor, Weight};
