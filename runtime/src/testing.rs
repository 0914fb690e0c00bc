//! Random inputs for tests and benchmarks: weights in any runtime type with valid GGUF blocks.

use half::f16;
use rand::{Rng, SeedableRng};

use crate::tensor::DType;

/// Bytes of a `[rows, cols]` weight in `dtype` with random blocks: scales are finite f16 of
/// moderate size (super-block scales of K-quants smaller, as their sub-block scales multiply
/// them), codes and packed sub-block scales take every bit pattern.
pub fn random_weight(dtype: DType, rows: usize, cols: usize, seed: u64) -> Vec<u8> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut out = Vec::new();
    let half = |rng: &mut rand::rngs::StdRng, lo: f32, hi: f32| {
        f16::from_f32(rng.random_range(lo..hi)).to_le_bytes()
    };
    // Byte offsets of the f16 scale and (for types with one) the f16 min or dmin in a block.
    let (scale_at, min_at) = match dtype {
        DType::F32 | DType::F16 => (0, None),
        DType::Q4_0 | DType::Q5_0 | DType::Q8_0 | DType::IQ4_NL => (0, None),
        DType::Q4_1 | DType::Q5_1 | DType::Q4_K | DType::Q5_K => (0, Some(2)),
        DType::Q2_K => (80, Some(82)),
        DType::Q3_K => (108, None),
        DType::Q6_K => (208, None),
    };
    let (scale_range, min_range) = if dtype.block_size() == 256 {
        ((0.0005, 0.005), (0.0, 0.01))
    } else {
        ((0.001, 0.1), (-0.5, 0.5))
    };
    for _ in 0..rows {
        match dtype {
            DType::F32 => {
                for _ in 0..cols {
                    out.extend_from_slice(&rng.random_range(-1.0f32..1.0).to_le_bytes());
                }
            }
            DType::F16 => {
                for _ in 0..cols {
                    out.extend_from_slice(&half(&mut rng, -1.0, 1.0));
                }
            }
            _ => {
                for _ in 0..cols / dtype.block_size() {
                    let mut block: Vec<u8> =
                        (0..dtype.block_bytes()).map(|_| rng.random()).collect();
                    let d = half(&mut rng, scale_range.0, scale_range.1);
                    block[scale_at..scale_at + 2].copy_from_slice(&d);
                    if let Some(at) = min_at {
                        let m = half(&mut rng, min_range.0, min_range.1);
                        block[at..at + 2].copy_from_slice(&m);
                    }
                    out.extend_from_slice(&block);
                }
            }
        }
    }
    out
}

/// `n` values uniform in [-1, 1).
pub fn random_f32(n: usize, seed: u64) -> Vec<f32> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    (0..n).map(|_| rng.random_range(-1.0f32..1.0)).collect()
}

/// Largest absolute difference, scaled by the larger of 1 and the reference's magnitude.
pub fn max_rel_err(got: &[f32], want: &[f32]) -> f32 {
    assert_eq!(got.len(), want.len());
    let scale = want.iter().fold(1.0f32, |a, &b| a.max(b.abs()));
    got.iter()
        .zip(want)
        .fold(0.0f32, |a, (g, w)| a.max((g - w).abs()))
        / scale
}
