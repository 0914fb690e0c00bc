//! Activation statistics of the inputs of a model's linear layers, as gathered by the forward
//! pass's hooks, and what the quantizers and the outlier study read from them.
//!
//! A *site* is one distinct linear input: per layer, the attention norm's output (read by
//! attn_q, attn_k and attn_v), the attention output (attn_output), the FFN norm's output
//! (ffn_gate, ffn_up) and the SwiGLU output (ffn_down).

use std::collections::BTreeMap;

/// Statistics of one site over every calibration token.
#[derive(Clone, Debug, Default)]
pub struct SiteStats {
    pub layer: usize,
    /// The site's short name: `attn_norm`, `attention`, `ffn_norm` or `swiglu`.
    pub site: String,
    /// The GGUF names of the weight matrices that read this input.
    pub tensors: Vec<String>,
    /// Input channels.
    pub k: usize,
    /// Tokens seen.
    pub count: u64,
    pub sum: Vec<f64>,
    pub sum_sq: Vec<f64>,
    pub sum_abs: Vec<f64>,
    pub sum_cube: Vec<f64>,
    pub sum_quad: Vec<f64>,
    pub abs_max: Vec<f32>,
    /// sum over tokens of x x^T (`[k, k]`), when asked for.
    pub gram: Option<Vec<f32>>,
    /// The first input rows (`[rows, k]`), when asked for.
    pub rows: Vec<f32>,
}

impl SiteStats {
    /// Mean x_j^2 per channel: the importance matrix of llama.cpp's quantizer.
    pub fn mean_sq(&self) -> Vec<f32> {
        let n = self.count.max(1) as f64;
        self.sum_sq.iter().map(|&s| (s / n) as f32).collect()
    }

    /// Mean |x_j| per channel (AWQ's activation scale).
    pub fn mean_abs(&self) -> Vec<f32> {
        let n = self.count.max(1) as f64;
        self.sum_abs.iter().map(|&s| (s / n) as f32).collect()
    }

    /// Kurtosis (fourth standardized moment, 3 for a normal distribution) of each channel's
    /// values over the tokens. It is computed from raw power sums, so for a channel whose
    /// spread is tiny next to its mean the central moments cancel away: such channels (standard
    /// deviation under 1% of the root mean square), and channels that never varied, get NaN.
    pub fn kurtosis(&self) -> Vec<f64> {
        let n = self.count.max(1) as f64;
        (0..self.k)
            .map(|j| {
                let m1 = self.sum[j] / n;
                let m2 = self.sum_sq[j] / n;
                let m3 = self.sum_cube[j] / n;
                let m4 = self.sum_quad[j] / n;
                let var = m2 - m1 * m1;
                let c4 = m4 - 4.0 * m1 * m3 + 6.0 * m1 * m1 * m2 - 3.0 * m1.powi(4);
                if var <= 1e-4 * m2 || var <= 0.0 {
                    f64::NAN
                } else {
                    // Kurtosis is at least 1; below that is rounding.
                    (c4 / (var * var)).max(1.0)
                }
            })
            .collect()
    }

    /// Channels whose largest |x| is past `threshold` (LLM.int8's outlier features use 6.0).
    pub fn outliers(&self, threshold: f32) -> usize {
        self.abs_max.iter().filter(|&&a| a > threshold).count()
    }

    /// Adds another run's statistics of the same site.
    pub fn merge(&mut self, other: &SiteStats) {
        if self.k == 0 {
            *self = other.clone();
            return;
        }
        self.count += other.count;
        for (a, b) in [
            (&mut self.sum, &other.sum),
            (&mut self.sum_sq, &other.sum_sq),
            (&mut self.sum_abs, &other.sum_abs),
            (&mut self.sum_cube, &other.sum_cube),
            (&mut self.sum_quad, &other.sum_quad),
        ] {
            for (x, y) in a.iter_mut().zip(b) {
                *x += y;
            }
        }
        for (x, y) in self.abs_max.iter_mut().zip(&other.abs_max) {
            *x = x.max(*y);
        }
        if let (Some(g), Some(h)) = (&mut self.gram, &other.gram) {
            for (x, y) in g.iter_mut().zip(h) {
                *x += y;
            }
        }
    }
}

/// Every site of a model, and a lookup from a weight's name to its input's site.
#[derive(Clone, Debug, Default)]
pub struct ModelStats {
    pub sites: Vec<SiteStats>,
    by_tensor: BTreeMap<String, usize>,
}

impl ModelStats {
    pub fn new(sites: Vec<SiteStats>) -> Self {
        let mut by_tensor = BTreeMap::new();
        for (i, s) in sites.iter().enumerate() {
            for t in &s.tensors {
                by_tensor.insert(t.clone(), i);
            }
        }
        ModelStats { sites, by_tensor }
    }

    /// The index in `sites` of the input of weight `tensor`.
    pub fn site_index(&self, tensor: &str) -> Option<usize> {
        self.by_tensor.get(tensor).copied()
    }

    /// The statistics of the input of weight `tensor`.
    pub fn for_tensor(&self, tensor: &str) -> Option<&SiteStats> {
        self.by_tensor.get(tensor).map(|&i| &self.sites[i])
    }

    /// Tokens seen (the same at every site).
    pub fn tokens(&self) -> u64 {
        self.sites.first().map_or(0, |s| s.count)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn site_of(values: &[&[f64]]) -> SiteStats {
        let k = values[0].len();
        let mut s = SiteStats {
            k,
            sum: vec![0.0; k],
            sum_sq: vec![0.0; k],
            sum_abs: vec![0.0; k],
            sum_cube: vec![0.0; k],
            sum_quad: vec![0.0; k],
            abs_max: vec![0.0; k],
            ..Default::default()
        };
        for row in values {
            s.count += 1;
            for (j, &x) in row.iter().enumerate() {
                s.sum[j] += x;
                s.sum_sq[j] += x * x;
                s.sum_abs[j] += x.abs();
                s.sum_cube[j] += x * x * x;
                s.sum_quad[j] += x.powi(4);
                s.abs_max[j] = s.abs_max[j].max(x.abs() as f32);
            }
        }
        s
    }

    #[test]
    fn moments_kurtosis_and_outliers() {
        // Channel 0: +-1 (kurtosis 1); channel 1: constant (NaN); channel 2: one spike.
        let rows: Vec<[f64; 3]> = (0..100)
            .map(|i| {
                let spike = if i == 7 {
                    50.0
                } else {
                    0.1 * ((i % 3) as f64 - 1.0)
                };
                [if i % 2 == 0 { 1.0 } else { -1.0 }, 2.0, spike]
            })
            .collect();
        let refs: Vec<&[f64]> = rows.iter().map(|r| &r[..]).collect();
        let s = site_of(&refs);
        let k = s.kurtosis();
        assert!((k[0] - 1.0).abs() < 1e-9, "{}", k[0]);
        assert!(k[1].is_nan());
        assert!(k[2] > 50.0, "{}", k[2]);
        assert_eq!(s.outliers(6.0), 1);
        assert_eq!(s.mean_sq()[1], 4.0);
        assert_eq!(s.mean_abs()[0], 1.0);
        let mut m = s.clone();
        m.merge(&s);
        assert_eq!(m.count, 200);
        assert_eq!(m.mean_sq(), s.mean_sq());
        assert_eq!(m.kurtosis()[2].to_bits(), k[2].to_bits());
    }
}
