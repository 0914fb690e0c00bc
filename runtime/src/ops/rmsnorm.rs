//! RMSNorm over rows: `y = x / sqrt(mean(x^2) + eps) * w`.

use crate::error::Result;
use crate::gpu::KernelLayout;
use crate::ops::{check_len, pow2_floor};
use crate::pipeline::PipelineKey;
use crate::recorder::Recorder;
use crate::tensor::Tensor;

/// Records RMSNorm of `rows` rows of length `k` from `x` into `y` (which may be `x`'s twin,
/// not `x` itself), scaled by `w` (`[k]`).
pub fn rmsnorm(
    rec: &mut Recorder,
    x: &Tensor,
    w: &Tensor,
    y: &Tensor,
    rows: usize,
    k: usize,
    eps: f32,
) -> Result<()> {
    check_len("rmsnorm input", x, rows * k)?;
    check_len("rmsnorm weight", w, k)?;
    check_len("rmsnorm output", y, rows * k)?;
    // On CPU devices a workgroup's invocations take turns at each barrier of the reduction:
    // fewer of them are faster (lavapipe, one row of 576: 41 -> 33 us a dispatch with 64).
    let most = match rec.gpu().kernel_layout() {
        KernelLayout::LanePerRow => 64,
        KernelLayout::Cooperative => 256,
    };
    let wg = pow2_floor(
        rec.gpu()
            .limits()
            .max_compute_invocations_per_workgroup
            .min(most),
    );
    let key = PipelineKey::new("rmsnorm", "main").define("WG", wg);
    rec.dispatch(
        &key,
        &[k as u32, eps.to_bits()],
        &[x.bind(), w.bind(), y.bind()],
        [rows as u32, 1, 1],
    )
}

/// CPU reference.
pub fn rmsnorm_ref(x: &[f32], w: &[f32], k: usize, eps: f32) -> Vec<f32> {
    x.chunks(k)
        .flat_map(|row| {
            let ms = row.iter().map(|&v| v as f64 * v as f64).sum::<f64>() / k as f64;
            let scale = 1.0 / (ms + eps as f64).sqrt();
            row.iter()
                .zip(w)
                .map(move |(&v, &g)| (v as f64 * scale * g as f64) as f32)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::test_util::{gpu, max_rel_err};
    use crate::testing::random_f32;

    #[test]
    fn rmsnorm_matches_cpu_reference_on_odd_shapes() {
        let gpu = gpu();
        for (rows, k) in [(1, 576), (7, 33), (3, 1), (2, 1000)] {
            let x = random_f32(rows * k, 1);
            let w = random_f32(k, 2);
            let (xt, wt, yt) = (
                gpu.tensor_from(&[rows, k], &x).unwrap(),
                gpu.tensor_from(&[k], &w).unwrap(),
                gpu.tensor(&[rows, k]).unwrap(),
            );
            let mut rec = Recorder::new(gpu);
            rmsnorm(&mut rec, &xt, &wt, &yt, rows, k, 1e-5).unwrap();
            rec.submit().unwrap();
            let err = max_rel_err(&gpu.read(&yt).unwrap(), &rmsnorm_ref(&x, &w, k, 1e-5));
            assert!(err < 1e-5, "rows={rows} k={k}: {err}");
        }
    }
}
