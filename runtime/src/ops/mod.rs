//! Kernel families: for each, the dispatch code beside a CPU reference that tests compare
//! against on random inputs of odd shapes.
//!
//! Every op records into a [`Recorder`](crate::recorder::Recorder); nothing here waits for the
//! device. Shapes are checked before a dispatch, so a bad shape is an error, not a wrong result.

pub mod argmax;
pub mod attention;
pub mod elementwise;
pub mod embedding;
pub mod linear;
pub mod rmsnorm;
pub mod rope;
pub mod softmax;
pub mod stats;

pub use argmax::argmax;
pub use attention::{attention, AttentionParams};
pub use elementwise::{add, fill, swiglu};
pub use embedding::embedding;
pub use linear::{
    gate_up_swiglu, linear, linear_qkv, linear_rope, linear_swiglu, matvec_fused, matvec_qkv,
    rmsnorm_gate_up_swiglu, rmsnorm_qkv, Fusion, LinearOut, Normed, Projection,
};
pub use rmsnorm::rmsnorm;
pub use rope::{rope, RopeLayout, RopeParams};
pub use softmax::softmax;
pub use stats::{channel_stats, gram};

use crate::error::{Result, RuntimeError};
use crate::gpu::Gpu;
use crate::pipeline::PipelineKey;
use crate::tensor::{DType, Tensor};

/// The key of a kernel of `family` that reads weights of `dtype`: their GGML type, the bytes of
/// a block, and whether the device loads them as 64-bit words ([`Gpu::wide_weight_loads`]).
pub(crate) fn weight_kernel(gpu: &Gpu, family: &'static str, dtype: DType) -> PipelineKey {
    PipelineKey::new(family, "main")
        .define("WTYPE", dtype.ggml_id())
        .define("BLOCK_BYTES", dtype.wgsl_block_bytes())
        .define("W64", gpu.wide_weight_loads() as u32)
}

/// Fails unless `t` holds at least `len` elements.
pub(crate) fn check_len(what: &str, t: &Tensor, len: usize) -> Result<()> {
    if t.len() < len {
        return Err(RuntimeError::Shape(format!(
            "{what}: tensor of shape {:?} holds {} elements, {len} needed",
            t.shape(),
            t.len()
        )));
    }
    Ok(())
}

/// The largest power of two not above `n` (and at least 1).
pub(crate) fn pow2_floor(n: u32) -> u32 {
    if n == 0 {
        1
    } else {
        1 << (31 - n.leading_zeros())
    }
}

#[cfg(test)]
pub(crate) mod test_util {
    use std::sync::OnceLock;

    use crate::gpu::{Gpu, GpuOptions, KernelLayout};

    /// The device every kernel test runs on; tests fail (not skip) when there is none.
    pub fn gpu() -> &'static Gpu {
        static GPU: OnceLock<Gpu> = OnceLock::new();
        GPU.get_or_init(|| open(None))
    }

    /// The device opened once per kernel layout, so both layouts are tested on any device.
    pub fn gpus() -> [&'static Gpu; 2] {
        static COOPERATIVE: OnceLock<Gpu> = OnceLock::new();
        static ROWS: OnceLock<Gpu> = OnceLock::new();
        [
            COOPERATIVE.get_or_init(|| open(Some(KernelLayout::Cooperative))),
            ROWS.get_or_init(|| open(Some(KernelLayout::LanePerRow))),
        ]
    }

    /// The lane-per-row layout without 64-bit integers, weight textures or x in workgroup
    /// memory: weights loaded from buffers as 32-bit words and x from its uniform binding, as on
    /// devices that lack all three.
    pub fn narrow_rows() -> &'static Gpu {
        static NARROW: OnceLock<Gpu> = OnceLock::new();
        NARROW.get_or_init(|| {
            open_with(GpuOptions {
                layout: Some(KernelLayout::LanePerRow),
                no_int64: true,
                no_weight_textures: true,
                no_shared_x: true,
                ..Default::default()
            })
        })
    }

    pub fn open(layout: Option<KernelLayout>) -> Gpu {
        open_with(GpuOptions {
            layout,
            ..Default::default()
        })
    }

    /// Opens the test device (`TESSERA_DEVICE`, else the default one) with `options`.
    fn open_with(options: GpuOptions) -> Gpu {
        let options = GpuOptions {
            selector: std::env::var("TESSERA_DEVICE")
                .ok()
                .and_then(|s| s.parse().ok())
                .unwrap_or_default(),
            ..options
        };
        Gpu::new(&options).expect("kernel tests need a GPU adapter (lavapipe will do)")
    }

    pub use crate::testing::max_rel_err;
}
