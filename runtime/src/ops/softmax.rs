//! Softmax over rows, in place.

use crate::error::Result;
use crate::ops::{check_len, pow2_floor};
use crate::pipeline::PipelineKey;
use crate::recorder::Recorder;
use crate::tensor::Tensor;

/// Records a softmax of each of `rows` rows of length `k`.
pub fn softmax(rec: &mut Recorder, x: &Tensor, rows: usize, k: usize) -> Result<()> {
    check_len("softmax", x, rows * k)?;
    let wg = pow2_floor(
        rec.gpu()
            .limits()
            .max_compute_invocations_per_workgroup
            .min(256),
    );
    let key = PipelineKey::new("softmax", "main").define("WG", wg);
    rec.dispatch(&key, &[k as u32], &[x.bind()], [rows as u32, 1, 1])
}

/// CPU reference.
pub fn softmax_ref(x: &[f32], k: usize) -> Vec<f32> {
    x.chunks(k)
        .flat_map(|row| {
            let m = row.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b)) as f64;
            let sum: f64 = row.iter().map(|&v| (v as f64 - m).exp()).sum();
            row.iter()
                .map(move |&v| ((v as f64 - m).exp() / sum) as f32)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::test_util::{gpu, max_rel_err};
    use crate::testing::random_f32;

    #[test]
    fn softmax_matches_cpu_reference_and_survives_large_logits() {
        let gpu = gpu();
        for (rows, k) in [(1, 49152), (5, 3), (3, 1)] {
            let x: Vec<f32> = random_f32(rows * k, 4).iter().map(|v| v * 80.0).collect();
            let xt = gpu.tensor_from(&[rows, k], &x).unwrap();
            let mut rec = Recorder::new(gpu);
            softmax(&mut rec, &xt, rows, k).unwrap();
            rec.submit().unwrap();
            let got = gpu.read(&xt).unwrap();
            assert!(got.iter().all(|v| v.is_finite()));
            assert!(
                max_rel_err(&got, &softmax_ref(&x, k)) < 1e-5,
                "rows={rows} k={k}"
            );
        }
    }
}
