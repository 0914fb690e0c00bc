//! Random inputs for tests and benchmarks: weights in any runtime type with valid GGUF blocks.

use half::f16;
use rand::{Rng, SeedableRng};

use crate::tensor::DType;

/// Bytes of a `[rows, cols]` weight in `dtype` with random blocks: scales are finite f16 of
/// moderate size, quants take every bit pattern.
pub fn random_weight(dtype: DType, rows: usize, cols: usize, seed: u64) -> Vec<u8> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut out = Vec::new();
    let half = |rng: &mut rand::rngs::StdRng, lo: f32, hi: f32| {
        f16::from_f32(rng.random_range(lo..hi)).to_le_bytes()
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
            DType::Q8_0 | DType::Q4_0 | DType::Q4_1 => {
                for _ in 0..cols / 32 {
                    out.extend_from_slice(&half(&mut rng, 0.001, 0.1));
                    if dtype == DType::Q4_1 {
                        out.extend_from_slice(&half(&mut rng, -0.5, 0.5));
                    }
                    let quants = if dtype == DType::Q8_0 { 32 } else { 16 };
                    for _ in 0..quants {
                        out.push(rng.random());
                    }
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
