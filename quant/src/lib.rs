//! Tessera's post-training quantization toolkit (calibration statistics and quantizers).
//!
//! Nothing is exported yet: the quantizers arrive with the `quant calibrate` work.
