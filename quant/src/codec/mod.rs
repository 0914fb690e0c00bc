//! Block codecs: f32 rows to GGUF's quantized block layouts, written from the formats and the
//! published reference algorithms, and byte-identical to llama.cpp's quantizer on the same input
//! (with and without an importance matrix; each codec module tests this against fixtures made by
//! llama.cpp, `quant/tests/data/codec`).
//!
//! Decoding is the runtime's (`tessera_runtime::dequantize_row`), the same reference the GPU
//! kernels are tested against. What the quantizers need beyond encoding is the grid of one
//! element of an encoded block ([`Grid`]) and a way to overwrite its code: GPTQ fixes a block's
//! scales, then rounds its columns one by one onto that grid.

#[cfg(test)]
pub(crate) mod fixtures;
mod kquants;
mod legacy;

use tessera_runtime::DType;

pub use kquants::{Q2K, Q3K, Q4K, Q5K, Q6K};
pub use legacy::{Iq4Nl, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0};

/// ggml's `nearest_int`: round half to even by adding 1.5 * 2^23 and reading the mantissa.
/// Exact for |x| < 2^22; beyond that it returns the same wrapped value as ggml does, which the
/// callers clamp, so out-of-range inputs still encode identically.
pub(super) fn nearest_int(x: f32) -> i32 {
    let biased = x + 12_582_912.0;
    (biased.to_bits() & 0x007f_ffff) as i32 - 0x0040_0000
}

/// The element of largest magnitude (the first one on ties) and that magnitude.
pub(super) fn signed_max(x: &[f32]) -> (f32, f32) {
    let (mut max, mut amax) = (0.0f32, 0.0f32);
    for &v in x {
        if v.abs() > amax {
            amax = v.abs();
            max = v;
        }
    }
    (max, amax)
}

/// The values one element of an encoded block can take.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Grid {
    /// `scale * q + offset` for integer codes `qmin ..= qmax`.
    Affine {
        scale: f32,
        offset: f32,
        qmin: i32,
        qmax: i32,
    },
    /// `scale * levels[q]`: a non-uniform grid (IQ4_NL).
    Table { scale: f32, levels: &'static [i8] },
}

impl Grid {
    /// The value of code `q`.
    pub fn value(&self, q: i32) -> f32 {
        match *self {
            Grid::Affine { scale, offset, .. } => scale * q as f32 + offset,
            Grid::Table { scale, levels } => scale * f32::from(levels[q as usize]),
        }
    }

    /// The code whose value is nearest to `x`.
    pub fn nearest(&self, x: f32) -> i32 {
        match *self {
            Grid::Affine {
                scale,
                offset,
                qmin,
                qmax,
            } => {
                if scale == 0.0 {
                    return qmin.max(0).min(qmax);
                }
                (((x - offset) / scale).round() as i32).clamp(qmin, qmax)
            }
            Grid::Table { scale, levels } => {
                let mut best = 0;
                for q in 1..levels.len() {
                    let d = (scale * f32::from(levels[q]) - x).abs();
                    if d < (scale * f32::from(levels[best]) - x).abs() {
                        best = q;
                    }
                }
                best as i32
            }
        }
    }
}

/// One GGUF block type.
pub trait BlockCodec {
    /// Elements per block.
    const BLOCK: usize;
    /// Bytes per block.
    const BYTES: usize;

    /// Encodes a row (a whole number of blocks) into `out` (`x.len() / BLOCK * BYTES` bytes).
    /// `importance`, one weight per element of the row (an importance matrix's mean x_j^2 for
    /// the row's input channels), turns on llama.cpp's weighted scale search; without it the
    /// result is llama.cpp's reference quantizer's.
    fn quantize_row(x: &[f32], importance: Option<&[f32]>, out: &mut [u8]);

    /// The grid of element `i` of the encoded block `block` (`BYTES` long).
    fn grid(block: &[u8], i: usize) -> Grid;

    /// Sets the code of element `i` of `block` to `q`, a code of its [`BlockCodec::grid`].
    fn set_quant(block: &mut [u8], i: usize, q: i32);
}

/// A codec chosen at run time: the functions of one [`BlockCodec`].
#[derive(Clone, Copy)]
pub struct DynCodec {
    pub dtype: DType,
    pub block: usize,
    pub bytes: usize,
    pub quantize_row: fn(&[f32], Option<&[f32]>, &mut [u8]),
    pub grid: fn(&[u8], usize) -> Grid,
    pub set_quant: fn(&mut [u8], usize, i32),
}

impl DynCodec {
    fn of<C: BlockCodec>(dtype: DType) -> DynCodec {
        DynCodec {
            dtype,
            block: C::BLOCK,
            bytes: C::BYTES,
            quantize_row: C::quantize_row,
            grid: C::grid,
            set_quant: C::set_quant,
        }
    }

    /// Encodes `rows` rows of `x` (`[rows, k]`) into `out`, on all cores, each row with
    /// `importance` when given.
    pub fn quantize_rows(&self, x: &[f32], k: usize, importance: Option<&[f32]>, out: &mut [u8]) {
        let row_bytes = k / self.block * self.bytes;
        let threads = std::thread::available_parallelism().map_or(1, |t| t.get());
        let rows = x.len() / k.max(1);
        let per = rows.div_ceil(threads).max(1);
        std::thread::scope(|s| {
            for (xc, oc) in x.chunks(per * k).zip(out.chunks_mut(per * row_bytes)) {
                s.spawn(move || {
                    for (xr, or) in xc.chunks_exact(k).zip(oc.chunks_exact_mut(row_bytes)) {
                        (self.quantize_row)(xr, importance, or);
                    }
                });
            }
        });
    }
}

/// The codec of a quantized type; None for F32 and F16, which are written as they are.
pub fn for_type(dtype: DType) -> Option<DynCodec> {
    Some(match dtype {
        DType::Q4_0 => DynCodec::of::<Q4_0>(dtype),
        DType::Q4_1 => DynCodec::of::<Q4_1>(dtype),
        DType::Q5_0 => DynCodec::of::<Q5_0>(dtype),
        DType::Q5_1 => DynCodec::of::<Q5_1>(dtype),
        DType::Q8_0 => DynCodec::of::<Q8_0>(dtype),
        DType::Q2_K => DynCodec::of::<Q2K>(dtype),
        DType::Q3_K => DynCodec::of::<Q3K>(dtype),
        DType::Q4_K => DynCodec::of::<Q4K>(dtype),
        DType::Q5_K => DynCodec::of::<Q5K>(dtype),
        DType::Q6_K => DynCodec::of::<Q6K>(dtype),
        DType::IQ4_NL => DynCodec::of::<Iq4Nl>(dtype),
        DType::F32 | DType::F16 => return None,
    })
}
