//! AWQ (Lin et al., 2023, "AWQ: Activation-aware Weight Quantization for LLM Compression and
//! Acceleration"): scale each input channel of a layer's weights up by s_j = mean|x_j|^alpha
//! before rounding, so that the channels that carry large activations lose less to rounding, and
//! divide the same s_j out of whatever produced the input, so the unquantized model computes
//! exactly what it did before.
//!
//! alpha is searched on a grid per site (all the matrices that read one input share one s):
//! each candidate is scored by the squared output error of those matrices, rounded to nearest
//! in their target types, on input rows captured during calibration. The divisor is folded into
//! the attention or FFN norm's weight, into ffn_up's rows for ffn_down's input, and into
//! attn_v's rows for attn_output's input when every query head has its own value head (with
//! grouped-query attention that fold is not exact, so that site is left unscaled).

use tessera_runtime::dequantize_row;

use crate::codec;
use crate::mix::{Choice, TensorShape};
use crate::stats::{ModelStats, SiteStats};
use crate::QuantError;

/// The alpha grid.
pub const GRID: [f32; 11] = [0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0];

/// The scaling applied at one site.
#[derive(Clone, Debug)]
pub struct Fold {
    pub layer: usize,
    pub site: String,
    pub alpha: f32,
    /// The matrices whose columns were scaled, and the tensor the divisor went into.
    pub tensors: Vec<String>,
    pub into: String,
    /// Output error at alpha = 0 (plain rounding) and at the chosen alpha.
    pub err_rtn: f64,
    pub err_best: f64,
}

impl Fold {
    pub fn describe(&self) -> String {
        format!(
            "awq: layer {} {}: alpha {:.1}, output error {:.4e} -> {:.4e} ({:+.1}%), divisor \
             folded into {}",
            self.layer,
            self.site,
            self.alpha,
            self.err_rtn,
            self.err_best,
            100.0 * (self.err_best / self.err_rtn.max(f64::MIN_POSITIVE) - 1.0),
            self.into
        )
    }
}

/// Rows of captured input used for the search, at most.
const MAX_ROWS: usize = 64;

/// Searches alpha at every site whose divisor can be folded, and rewrites `values` (every
/// tensor as f32, indexed like `shapes`) in place.
pub fn search_and_fold(
    shapes: &[TensorShape],
    values: &mut [Vec<f32>],
    choices: &[Option<Choice>],
    stats: &ModelStats,
    n_gqa: usize,
    index: &dyn Fn(&str) -> Option<usize>,
    progress: &mut dyn FnMut(usize, usize, &str),
) -> Result<Vec<Fold>, QuantError> {
    let mut folds = Vec::new();
    // ffn_down's input before the FFN input: the first rescales ffn_up's rows, which the second
    // then searches over as they are.
    let mut order: Vec<&SiteStats> = stats.sites.iter().collect();
    let rank = |s: &str| match s {
        "swiglu" => 0,
        "ffn_norm" => 1,
        "attention" => 2,
        _ => 3,
    };
    order.sort_by_key(|s| (s.layer, rank(&s.site)));
    for (done, site) in order.iter().enumerate() {
        progress(
            done,
            order.len(),
            &format!("awq layer {} {}", site.layer, site.site),
        );
        let into = match site.site.as_str() {
            "attn_norm" => format!("blk.{}.attn_norm.weight", site.layer),
            "ffn_norm" => format!("blk.{}.ffn_norm.weight", site.layer),
            "swiglu" => format!("blk.{}.ffn_up.weight", site.layer),
            "attention" if n_gqa == 1 => format!("blk.{}.attn_v.weight", site.layer),
            _ => continue,
        };
        let Some(into_i) = index(&into) else { continue };
        let consumers: Vec<(usize, codec::DynCodec)> = site
            .tensors
            .iter()
            .filter_map(|t| {
                let i = index(t)?;
                let dtype = choices[i]?.dtype;
                Some((i, codec::for_type(dtype)?))
            })
            .collect();
        let k = site.k;
        let m = (site.rows.len() / k.max(1)).min(MAX_ROWS);
        if consumers.is_empty() || m == 0 {
            continue;
        }
        let x = &site.rows[..m * k];
        let mean_abs = site.mean_abs();
        let mut best = (f64::INFINITY, 0.0f32);
        let mut err_rtn = 0.0;
        for &alpha in &GRID {
            let s = scales(&mean_abs, alpha);
            let mut err = 0.0;
            for &(i, c) in &consumers {
                err += scaled_error(&values[i], shapes[i].dims[0] as usize, &s, x, m, c);
            }
            if alpha == 0.0 {
                err_rtn = err;
            }
            if err < best.0 {
                best = (err, alpha);
            }
        }
        let (err_best, alpha) = best;
        if alpha == 0.0 {
            continue;
        }
        let s = scales(&mean_abs, alpha);
        for &(i, _) in &consumers {
            for row in values[i].chunks_exact_mut(k) {
                for (w, sj) in row.iter_mut().zip(&s) {
                    *w *= sj;
                }
            }
        }
        let target = &mut values[into_i];
        if site.site == "attn_norm" || site.site == "ffn_norm" {
            for (g, sj) in target.iter_mut().zip(&s) {
                *g /= sj;
            }
        } else {
            // Row j of ffn_up (or attn_v) produces input channel j.
            let cols = shapes[into_i].dims[0] as usize;
            for (row, sj) in target.chunks_exact_mut(cols).zip(&s) {
                for w in row {
                    *w /= sj;
                }
            }
        }
        folds.push(Fold {
            layer: site.layer,
            site: site.site.clone(),
            alpha,
            tensors: consumers
                .iter()
                .map(|&(i, _)| shapes[i].name.clone())
                .collect(),
            into,
            err_rtn,
            err_best,
        });
    }
    progress(order.len(), order.len(), "awq done");
    Ok(folds)
}

/// s_j = mean|x_j|^alpha, normalised so that max(s) * min(s) = 1; channels never active get 1.
pub fn scales(mean_abs: &[f32], alpha: f32) -> Vec<f32> {
    let mut s: Vec<f32> = mean_abs
        .iter()
        .map(|&a| if a > 0.0 { a.powf(alpha) } else { 1.0 })
        .collect();
    let (lo, hi) = s.iter().fold((f32::INFINITY, 0.0f32), |(lo, hi), &v| {
        (lo.min(v), hi.max(v))
    });
    let norm = (lo * hi).sqrt();
    if norm > 0.0 && norm.is_finite() {
        for v in &mut s {
            *v /= norm;
        }
    }
    s
}

/// Output rows of each matrix scored per alpha, at most: a strided sample of the matrix.
const MAX_OUT_ROWS: usize = 256;

/// ||X (W - Q(W diag s) diag(1/s))^T||^2 over a strided sample of the rows of `w` (`[n, k]`),
/// scaled up to all `n` rows.
fn scaled_error(w: &[f32], k: usize, s: &[f32], x: &[f32], m: usize, c: codec::DynCodec) -> f64 {
    let n = w.len() / k;
    let stride = n.div_ceil(MAX_OUT_ROWS).max(1);
    let rows: Vec<usize> = (0..n).step_by(stride).collect();
    let row_bytes = k / c.block * c.bytes;
    let threads = std::thread::available_parallelism().map_or(1, |t| t.get());
    let per = rows.len().div_ceil(threads).max(1);
    let sum: f64 = std::thread::scope(|scope| {
        let handles: Vec<_> = rows
            .chunks(per)
            .map(|mine| {
                scope.spawn(move || {
                    let mut scaled = vec![0.0f32; k];
                    let mut q = vec![0u8; row_bytes];
                    let mut deq = vec![0.0f32; k];
                    let mut delta = vec![0.0f32; k];
                    let mut err = 0.0f64;
                    for &r in mine {
                        let row = &w[r * k..(r + 1) * k];
                        for ((d, a), b) in scaled.iter_mut().zip(row).zip(s) {
                            *d = a * b;
                        }
                        (c.quantize_row)(&scaled, None, &mut q);
                        dequantize_row(c.dtype, &q, &mut deq);
                        for j in 0..k {
                            delta[j] = row[j] - deq[j] / s[j];
                        }
                        for xr in x.chunks_exact(k).take(m) {
                            let e: f32 = xr.iter().zip(&delta).map(|(a, b)| a * b).sum();
                            err += (e as f64) * (e as f64);
                        }
                    }
                    err
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap_or(0.0)).sum()
    });
    sum * n as f64 / rows.len().max(1) as f64
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};
    use tessera_runtime::DType;

    #[test]
    fn scales_are_normalised_and_alpha_zero_is_identity() {
        let s = scales(&[1.0, 4.0, 0.0, 16.0], 0.5);
        assert!(
            (s.iter().cloned().fold(0.0, f32::max) * s.iter().cloned().fold(9.0, f32::min) - 1.0)
                .abs()
                < 1e-6
        );
        assert!((s[1] / s[0] - 2.0).abs() < 1e-6);
        assert!(scales(&[1.0, 4.0, 16.0], 0.0).iter().all(|&v| v == 1.0));
    }

    #[test]
    fn scaling_salient_channels_lowers_the_output_error() {
        let (m, n, k) = (64, 16, 64);
        let mut rng = rand::rngs::StdRng::seed_from_u64(3);
        let loud: Vec<f32> = (0..k)
            .map(|j| if j % 9 == 0 { 20.0 } else { 1.0 })
            .collect();
        let x: Vec<f32> = (0..m * k)
            .map(|e| loud[e % k] * rng.random_range(-1.0f32..1.0))
            .collect();
        let w: Vec<f32> = (0..n * k).map(|_| rng.random_range(-0.1f32..0.1)).collect();
        let mean_abs: Vec<f32> = (0..k)
            .map(|j| (0..m).map(|r| x[r * k + j].abs()).sum::<f32>() / m as f32)
            .collect();
        let c = codec::for_type(DType::Q4_0).unwrap();
        let e0 = scaled_error(&w, k, &scales(&mean_abs, 0.0), &x, m, c);
        let e5 = scaled_error(&w, k, &scales(&mean_abs, 0.5), &x, m, c);
        assert!(e5 < e0, "{e5} vs {e0}");
    }
}
