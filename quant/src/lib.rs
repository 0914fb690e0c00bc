//! Tessera's post-training quantization toolkit: GGUF block codecs, calibration statistics and
//! the quantizers (`quant calibrate`).

pub mod codec;
pub mod imatrix;
