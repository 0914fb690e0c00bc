//! The runtime's typed errors. Each message says what went wrong and, where there is one, the
//! way out.

use crate::io::gguf::GgufError;

/// Errors from the GPU runtime.
#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    /// wgpu found no adapter at all.
    #[error(
        "no GPU adapter found: wgpu saw no Vulkan, Metal, DX12 or OpenGL device. {}",
        no_adapter_hint()
    )]
    NoAdapter,

    /// The adapter the user asked for is not there.
    #[error("no adapter matches `{requested}`; adapters found:\n{available}")]
    AdapterNotFound {
        requested: String,
        available: String,
    },

    /// More than one adapter matches the name the user gave.
    #[error(
        "`{requested}` matches more than one adapter; pick one by index (or by backend name, \
         e.g. `vulkan`):\n{available}"
    )]
    AmbiguousAdapter {
        requested: String,
        available: String,
    },

    /// The adapter refused to create a device.
    #[error("could not open the device on adapter `{adapter}`: {source}")]
    RequestDevice {
        adapter: String,
        #[source]
        source: wgpu::RequestDeviceError,
    },

    /// A kernel failed to compile or validate on this device.
    #[error("kernel `{kernel}` failed to build: {message}")]
    Shader { kernel: String, message: String },

    /// A buffer is larger than the device allows.
    #[error(
        "{what} needs {bytes} bytes in one buffer, more than this device's limit of {limit} \
         bytes; try a smaller --ctx-size"
    )]
    BufferTooLarge {
        what: String,
        bytes: u64,
        limit: u64,
    },

    /// Reading results back from the device failed.
    #[error("reading back from the GPU failed: {0}")]
    Readback(String),

    /// The device reported an error while running work (out of memory, lost device, ...).
    #[error("the GPU reported an error: {0}")]
    Device(String),

    /// A tensor has a shape or type a kernel cannot run.
    #[error("{0}")]
    Shape(String),

    /// The tensor type is known to GGUF but has no kernel here yet.
    #[error(
        "tensor `{tensor}` has type {dtype}, which Tessera cannot run yet (supported: F32, F16, \
         Q4_0, Q4_1, Q8_0)"
    )]
    UnsupportedType { tensor: String, dtype: String },

    /// A model file could not be read.
    #[error(transparent)]
    Gguf(#[from] GgufError),
}

/// The way out when no adapter is found: the environment may be narrowing the search;
/// otherwise a driver is missing.
fn no_adapter_hint() -> String {
    let install = "Install a driver (on Debian/Ubuntu without a GPU: `apt-get install \
                   mesa-vulkan-drivers libvulkan1` gives the lavapipe CPU device), then check \
                   with `tessera devices`";
    let narrowing: Vec<String> = ["WGPU_BACKEND", "VK_ICD_FILENAMES", "VK_DRIVER_FILES"]
        .iter()
        .filter_map(|k| std::env::var(k).ok().map(|v| format!("{k}={v:?}")))
        .collect();
    if narrowing.is_empty() {
        return install.to_string();
    }
    format!(
        "The environment limits the search ({}): unset it or check its value. {install}",
        narrowing.join(", ")
    )
}

/// Shorthand for results in this crate.
pub type Result<T, E = RuntimeError> = std::result::Result<T, E>;
