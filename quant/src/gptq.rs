//! GPTQ (Frantar et al., 2022, "GPTQ: Accurate Post-Training Quantization for Generative
//! Pre-trained Transformers"): quantize a weight matrix column by column, each column's rounding
//! error spread over the columns not yet quantized through the inverse Hessian of the layer's
//! reconstruction error, H = (2/N) sum x x^T over the calibration inputs.
//!
//! Tessera's version writes standard GGUF blocks. A block's scales (and mins) are chosen when
//! the walk reaches its first column, from the weights as the updates have left them, by the
//! type's own scale search weighted by diag(H); the block's columns are then rounded one by one
//! onto that grid. With act-order the columns are walked in order of decreasing diag(H), and the
//! block grids are fixed up front from the original weights ("static groups"), since a GGUF
//! block is a run of consecutive columns.
//!
//! Updates are lazy, in column blocks of 128: inside a block each rounding updates the block's
//! later columns; the columns after the block get the block's accumulated errors at once, as a
//! small matrix product. Rows are independent given H, so they are processed in tiles of rows on
//! all cores.

use crate::codec::DynCodec;
use crate::QuantError;

/// GPTQ's settings.
#[derive(Clone, Copy, Debug)]
pub struct GptqOptions {
    /// Dampening: lambda = damp * mean(diag H) is added to the diagonal.
    pub damp: f64,
    /// Walk columns in order of decreasing diag(H).
    pub act_order: bool,
    /// Columns per lazy-update block.
    pub block: usize,
}

impl Default for GptqOptions {
    fn default() -> Self {
        GptqOptions {
            damp: 0.01,
            act_order: false,
            block: 128,
        }
    }
}

/// What a GPTQ run did, for the log.
#[derive(Clone, Debug, Default)]
pub struct GptqReport {
    /// Columns whose diag(H) was zero (never active): their weights were set to zero.
    pub dead: usize,
    /// The damping that was used in the end (raised when the factorization failed).
    pub damp: f64,
    /// sum over rows of (w - q)^T H (w - q) / rows: the expected increase in the layer's
    /// squared output error per row.
    pub loss: f64,
}

/// Lower Cholesky factor of the `k x k` symmetric matrix `a` (row-major), or None when `a` is
/// not positive definite.
pub fn cholesky(a: &[f64], k: usize) -> Option<Vec<f64>> {
    let mut l = vec![0.0f64; k * k];
    for i in 0..k {
        for j in 0..=i {
            let mut s = a[i * k + j];
            let (li, lj) = (&l[i * k..i * k + j], &l[j * k..j * k + j]);
            s -= li.iter().zip(lj).map(|(x, y)| x * y).sum::<f64>();
            if i == j {
                if s <= 0.0 || !s.is_finite() {
                    return None;
                }
                l[i * k + i] = s.sqrt();
            } else {
                l[i * k + j] = s / l[j * k + j];
            }
        }
    }
    Some(l)
}

/// The upper Cholesky factor U of H^-1 (H^-1 = U^T U), from H's lower factor L. Every loop
/// runs along rows, so the k^3 work streams through memory.
fn upper_factor_of_inverse(l: &[f64], k: usize) -> Option<Vec<f64>> {
    // X = L^-1, row by row: X[r] = (e_r - sum_{m<r} L[r][m] X[m]) / L[r][r].
    let mut x = vec![0.0f64; k * k];
    for r in 0..k {
        let (done, rest) = x.split_at_mut(r * k);
        let xr = &mut rest[..k];
        xr[r] = 1.0;
        for m in 0..r {
            let f = l[r * k + m];
            if f != 0.0 {
                for (a, b) in xr[..=m].iter_mut().zip(&done[m * k..m * k + m + 1]) {
                    *a -= f * b;
                }
            }
        }
        let d = l[r * k + r];
        for v in &mut xr[..=r] {
            *v /= d;
        }
    }
    // H^-1 = X^T X, lower half, as a sum of the rank-1 updates X[m]^T X[m].
    let mut hinv = vec![0.0f64; k * k];
    for m in 0..k {
        let row = &x[m * k..m * k + m + 1];
        for i in 0..=m {
            let f = row[i];
            for (a, b) in hinv[i * k..i * k + i + 1].iter_mut().zip(&row[..=i]) {
                *a += f * b;
            }
        }
    }
    for i in 0..k {
        for j in 0..i {
            hinv[j * k + i] = hinv[i * k + j];
        }
    }
    let lower = cholesky(&hinv, k)?;
    let mut u = vec![0.0f64; k * k];
    for i in 0..k {
        for j in 0..=i {
            u[j * k + i] = lower[i * k + j];
        }
    }
    Some(u)
}

/// The part of GPTQ that depends only on a layer input's Hessian, shared by every matrix that
/// reads that input (attn_q, attn_k and attn_v; ffn_gate and ffn_up).
pub struct Factor {
    k: usize,
    /// Upper Cholesky factor of the damped H^-1, in walk order.
    u: Vec<f32>,
    perm: Vec<usize>,
    /// Mean x_j^2 (diag H / 2), for the block-scale search.
    importance: Vec<f32>,
    dead: Vec<usize>,
    /// The damping used in the end.
    pub damp: f64,
}

impl Factor {
    /// Factors H = (2 / count) h_sum, raising the damping tenfold (from `opts.damp`, up to 10)
    /// while the factorization fails.
    pub fn new(
        h_sum: &[f32],
        count: u64,
        k: usize,
        opts: GptqOptions,
    ) -> Result<Factor, QuantError> {
        if h_sum.len() != k * k || count == 0 {
            return Err(QuantError::Data(format!(
                "GPTQ needs the Hessian of {k} input channels over at least one token"
            )));
        }
        let scale = 2.0 / count as f64;
        let mut h: Vec<f64> = h_sum.iter().map(|&v| v as f64 * scale).collect();
        let mut dead = Vec::new();
        for i in 0..k {
            if h[i * k + i] == 0.0 {
                h[i * k + i] = 1.0;
                dead.push(i);
            }
        }
        let importance: Vec<f32> = (0..k).map(|i| (h[i * k + i] / 2.0) as f32).collect();
        let perm: Vec<usize> = if opts.act_order {
            let mut p: Vec<usize> = (0..k).collect();
            p.sort_by(|&a, &b| h[b * k + b].total_cmp(&h[a * k + a]));
            p
        } else {
            (0..k).collect()
        };
        let hp: Vec<f64> = (0..k * k)
            .map(|e| h[perm[e / k] * k + perm[e % k]])
            .collect();
        let mean_diag = (0..k).map(|i| hp[i * k + i]).sum::<f64>() / k as f64;
        let mut damp = opts.damp;
        let u = loop {
            let mut hd = hp.clone();
            for i in 0..k {
                hd[i * k + i] += damp * mean_diag;
            }
            if let Some(u) = cholesky(&hd, k).and_then(|l| upper_factor_of_inverse(&l, k)) {
                break u;
            }
            if !(damp.is_finite() && damp > 0.0 && damp < 10.0) {
                return Err(QuantError::Cholesky(format!(
                    "GPTQ: the Hessian of a layer input ({k} channels) is not positive definite \
                     even with damping {damp}: its calibration inputs may be degenerate (NaN or \
                     all-equal); use more or other --data, or --method imatrix"
                )));
            }
            damp *= 10.0;
            log::info!("GPTQ: Cholesky factorization failed; damping raised to {damp}");
        };
        Ok(Factor {
            k,
            u: u.iter().map(|&v| v as f32).collect(),
            perm,
            importance,
            dead,
            damp,
        })
    }
}

/// Quantizes `w` (`[n, k]` row-major) into `out` (`n` rows of `codec`'s bytes) by GPTQ with
/// `h_sum` = sum of x x^T over `count` calibration rows (`[k, k]`).
#[allow(clippy::too_many_arguments)]
pub fn quantize(
    w: &[f32],
    n: usize,
    k: usize,
    h_sum: &[f32],
    count: u64,
    codec: &DynCodec,
    opts: GptqOptions,
    out: &mut [u8],
) -> Result<GptqReport, QuantError> {
    let factor = Factor::new(h_sum, count, k, opts)?;
    quantize_with(&factor, w, n, codec, opts, out)
}

/// Quantizes `w` (`[n, k]`) with a factored Hessian.
pub fn quantize_with(
    factor: &Factor,
    w: &[f32],
    n: usize,
    codec: &DynCodec,
    opts: GptqOptions,
    out: &mut [u8],
) -> Result<GptqReport, QuantError> {
    let k = factor.k;
    let row_bytes = k / codec.block * codec.bytes;
    if !k.is_multiple_of(codec.block) || out.len() != n * row_bytes || w.len() != n * k {
        return Err(QuantError::Shape(format!(
            "GPTQ: a [{n}, {k}] matrix does not fit {}-element blocks",
            codec.block
        )));
    }
    let mut w = w.to_vec();
    for &i in &factor.dead {
        for r in 0..n {
            w[r * k + i] = 0.0;
        }
    }
    let (u, perm, importance) = (&factor.u, &factor.perm, &factor.importance);

    // Static groups for act-order: every block's grid from the original weights.
    if opts.act_order {
        for (r, row) in w.chunks_exact(k).enumerate() {
            (codec.quantize_row)(
                row,
                Some(importance),
                &mut out[r * row_bytes..][..row_bytes],
            );
        }
    }
    let threads = std::thread::available_parallelism()
        .map_or(1, |t| t.get())
        .min(8);
    const TILE: usize = 8;
    let tiles: Vec<(usize, &mut [f32], &mut [u8])> = w
        .chunks_mut(TILE * k)
        .zip(out.chunks_mut(TILE * row_bytes))
        .enumerate()
        .map(|(t, (wt, ot))| (t, wt, ot))
        .collect();
    let per_thread = tiles.len().div_ceil(threads);
    let mut losses = vec![0.0f64; tiles.len()];
    let mut tiles = tiles;
    std::thread::scope(|s| {
        let mut rest_losses: &mut [f64] = &mut losses;
        let mut rest_tiles: &mut [(usize, &mut [f32], &mut [u8])] = &mut tiles;
        while !rest_tiles.is_empty() {
            let take = per_thread.min(rest_tiles.len());
            let (mine, others) = rest_tiles.split_at_mut(take);
            let (my_losses, other_losses) = rest_losses.split_at_mut(take);
            rest_tiles = others;
            rest_losses = other_losses;
            s.spawn(move || {
                for ((_, wt, ot), loss) in mine.iter_mut().zip(my_losses.iter_mut()) {
                    *loss = quantize_tile(wt, ot, k, row_bytes, u, perm, importance, codec, opts);
                }
            });
        }
    });
    Ok(GptqReport {
        dead: factor.dead.len(),
        damp: factor.damp,
        loss: losses.iter().sum::<f64>() / n as f64,
    })
}

/// GPTQ on a few rows (`wt`: rows x k, permuted on the fly by `perm`); returns the sum over the
/// rows of sum_i err_i^2 (GPTQ's loss, err = (w - q) / U_ii).
#[allow(clippy::too_many_arguments)]
fn quantize_tile(
    wt: &mut [f32],
    ot: &mut [u8],
    k: usize,
    row_bytes: usize,
    u: &[f32],
    perm: &[usize],
    importance: &[f32],
    codec: &DynCodec,
    opts: GptqOptions,
) -> f64 {
    let rows = wt.len() / k;
    // The rows in walk order.
    let mut wp: Vec<f32> = Vec::with_capacity(rows * k);
    for r in 0..rows {
        wp.extend(perm.iter().map(|&c| wt[r * k + c]));
    }
    let bs = opts.block.max(1);
    let mut err = vec![0.0f32; rows * bs];
    let mut loss = 0.0f64;
    let mut natural = vec![0.0f32; codec.block];
    for i1 in (0..k).step_by(bs) {
        let i2 = (i1 + bs).min(k);
        for i in i1..i2 {
            let c = perm[i];
            let d = u[i * k + i];
            for r in 0..rows {
                let block = c / codec.block;
                let bytes = &mut ot[r * row_bytes + block * codec.bytes..][..codec.bytes];
                if !opts.act_order && c.is_multiple_of(codec.block) {
                    // The block's grid from its current weights (natural order: perm is the
                    // identity without act-order).
                    natural.copy_from_slice(&wp[r * k + c..r * k + c + codec.block]);
                    (codec.quantize_row)(&natural, Some(&importance[c..c + codec.block]), bytes);
                }
                let x = wp[r * k + i];
                let grid = (codec.grid)(bytes, c % codec.block);
                let q = grid.nearest(x);
                (codec.set_quant)(bytes, c % codec.block, q);
                let e = (x - grid.value(q)) / d;
                loss += (e as f64) * (e as f64);
                err[r * bs + (i - i1)] = e;
                let urow = &u[i * k + i + 1..i * k + i2];
                let wrow = &mut wp[r * k + i + 1..r * k + i2];
                for (wv, &uv) in wrow.iter_mut().zip(urow) {
                    *wv -= e * uv;
                }
            }
        }
        // The lazy update of the columns after the block.
        for r in 0..rows {
            let wrow = &mut wp[r * k..(r + 1) * k];
            for i in i1..i2 {
                let e = err[r * bs + (i - i1)];
                let urow = &u[i * k + i2..(i + 1) * k];
                for (wv, &uv) in wrow[i2..].iter_mut().zip(urow) {
                    *wv -= e * uv;
                }
            }
        }
    }
    loss
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec;
    use rand::{Rng, SeedableRng};
    use tessera_runtime::{dequantize_row, DType};

    #[test]
    fn cholesky_and_inverse_factor_reconstruct() {
        let k = 7;
        let mut rng = rand::rngs::StdRng::seed_from_u64(1);
        let x: Vec<f64> = (0..k * 20).map(|_| rng.random_range(-1.0..1.0)).collect();
        let mut h = vec![0.0; k * k];
        for r in 0..20 {
            for i in 0..k {
                for j in 0..k {
                    h[i * k + j] += x[r * k + i] * x[r * k + j];
                }
            }
        }
        let l = cholesky(&h, k).unwrap();
        let u = upper_factor_of_inverse(&l, k).unwrap();
        // (U^T U) H = I.
        for i in 0..k {
            for j in 0..k {
                let mut s = 0.0;
                for m in 0..k {
                    let uu: f64 = (0..k).map(|t| u[t * k + i] * u[t * k + m]).sum();
                    s += uu * h[m * k + j];
                }
                assert!((s - (i == j) as u8 as f64).abs() < 1e-9, "{i},{j}: {s}");
            }
        }
        let mut bad = h.clone();
        bad[0] = -1.0;
        assert!(cholesky(&bad, k).is_none());
    }

    /// Output error ||X W^T - X Q^T||^2 over the calibration rows.
    fn output_error(x: &[f32], w: &[f32], q: &[f32], m: usize, n: usize, k: usize) -> f64 {
        let mut e = 0.0;
        for r in 0..m {
            for o in 0..n {
                let (mut a, mut b) = (0.0f64, 0.0f64);
                for j in 0..k {
                    a += x[r * k + j] as f64 * w[o * k + j] as f64;
                    b += x[r * k + j] as f64 * q[o * k + j] as f64;
                }
                e += (a - b) * (a - b);
            }
        }
        e
    }

    #[test]
    fn gptq_beats_round_to_nearest_on_correlated_inputs() {
        let (m, n, k) = (256, 24, 256);
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        // Correlated inputs with a few loud channels, as in transformer activations.
        let base: Vec<f32> = (0..m * 8).map(|_| rng.random_range(-1.0..1.0)).collect();
        let x: Vec<f32> = (0..m * k)
            .map(|e| {
                let (r, j) = (e / k, e % k);
                let loud = if j % 37 == 0 { 8.0 } else { 1.0 };
                loud * (base[r * 8 + j % 8] + 0.3 * rng.random_range(-1.0f32..1.0))
            })
            .collect();
        let w: Vec<f32> = (0..n * k).map(|_| rng.random_range(-0.05..0.05)).collect();
        let mut h = vec![0.0f32; k * k];
        for r in 0..m {
            for i in 0..k {
                for j in 0..k {
                    h[i * k + j] += x[r * k + i] * x[r * k + j];
                }
            }
        }
        for dtype in [DType::Q4_0, DType::Q4_K] {
            let c = codec::for_type(dtype).unwrap();
            let row_bytes = k / c.block * c.bytes;
            let decode = |bytes: &[u8]| {
                let mut q = vec![0.0f32; n * k];
                for r in 0..n {
                    dequantize_row(
                        dtype,
                        &bytes[r * row_bytes..(r + 1) * row_bytes],
                        &mut q[r * k..(r + 1) * k],
                    );
                }
                q
            };
            let mut rtn = vec![0u8; n * row_bytes];
            for r in 0..n {
                (c.quantize_row)(
                    &w[r * k..(r + 1) * k],
                    None,
                    &mut rtn[r * row_bytes..(r + 1) * row_bytes],
                );
            }
            let e_rtn = output_error(&x, &w, &decode(&rtn), m, n, k);
            for act_order in [false, true] {
                let mut out = vec![0u8; n * row_bytes];
                let opts = GptqOptions {
                    act_order,
                    ..Default::default()
                };
                let rep = quantize(&w, n, k, &h, m as u64, &c, opts, &mut out).unwrap();
                let e = output_error(&x, &w, &decode(&out), m, n, k);
                assert!(
                    e < 0.8 * e_rtn,
                    "{dtype:?} act_order {act_order}: {e} vs rtn {e_rtn}"
                );
                assert_eq!(rep.dead, 0);
            }
        }
    }

    #[test]
    fn dead_columns_and_degenerate_hessians() {
        let (n, k) = (4, 32);
        let w = vec![0.5f32; n * k];
        let mut h = vec![0.0f32; k * k];
        for i in 1..k {
            h[i * k + i] = 1.0;
        }
        let c = codec::for_type(DType::Q8_0).unwrap();
        let mut out = vec![0u8; n * c.bytes];
        let rep = quantize(&w, n, k, &h, 10, &c, GptqOptions::default(), &mut out).unwrap();
        assert_eq!(rep.dead, 1);
        let mut q = vec![0.0f32; k];
        dequantize_row(DType::Q8_0, &out[..c.bytes], &mut q);
        assert_eq!(q[0], 0.0);
        assert!((q[1] - 0.5).abs() < 0.01);
        let nan = vec![f32::NAN; k * k];
        let e = quantize(&w, n, k, &nan, 10, &c, GptqOptions::default(), &mut out).unwrap_err();
        assert!(e.to_string().contains("not positive definite"), "{e}");
    }
}
