//! Elementwise kernels: residual add, SwiGLU and fill.

use crate::error::Result;
use crate::ops::check_len;
use crate::pipeline::PipelineKey;
use crate::recorder::{split_groups, Recorder};
use crate::tensor::Tensor;

fn record(
    rec: &mut Recorder,
    entry: &'static str,
    a: &Tensor,
    b: &Tensor,
    len: usize,
) -> Result<()> {
    check_len(entry, a, len)?;
    check_len(entry, b, len)?;
    let groups = split_groups(rec.gpu(), (len as u32).div_ceil(256), 1);
    rec.dispatch(
        &PipelineKey::new("elementwise", entry),
        &[len as u32],
        &[a.bind(), b.bind()],
        groups,
    )
}

/// Records `a += b` over the first `len` elements.
pub fn add(rec: &mut Recorder, a: &Tensor, b: &Tensor, len: usize) -> Result<()> {
    record(rec, "add", a, b, len)
}

/// Records `gate = silu(gate) * up` over the first `len` elements.
pub fn swiglu(rec: &mut Recorder, gate: &Tensor, up: &Tensor, len: usize) -> Result<()> {
    record(rec, "swiglu", gate, up, len)
}

/// Records setting the first `len` elements of `a` to `value`.
pub fn fill(rec: &mut Recorder, a: &Tensor, value: f32, len: usize) -> Result<()> {
    check_len("fill", a, len)?;
    let groups = split_groups(rec.gpu(), (len as u32).div_ceil(256), 1);
    // The entry uses only binding 1, so its derived layout has no second operand.
    rec.dispatch(
        &PipelineKey::new("elementwise", "fill"),
        &[len as u32, value.to_bits()],
        &[a.bind()],
        groups,
    )
}

/// CPU reference of SwiGLU.
pub fn swiglu_ref(gate: &[f32], up: &[f32]) -> Vec<f32> {
    gate.iter()
        .zip(up)
        .map(|(&g, &u)| (g as f64 / (1.0 + (-g as f64).exp()) * u as f64) as f32)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::test_util::{gpu, max_rel_err};
    use crate::testing::random_f32;

    #[test]
    fn add_and_swiglu_match_cpu_reference() {
        let gpu = gpu();
        for len in [1, 255, 257, 10_001] {
            let (a, b) = (random_f32(len, 1), random_f32(len, 2));
            let at = gpu.tensor_from(&[len], &a).unwrap();
            let bt = gpu.tensor_from(&[len], &b).unwrap();
            let mut rec = Recorder::new(gpu);
            add(&mut rec, &at, &bt, len).unwrap();
            rec.submit().unwrap();
            let want: Vec<f32> = a.iter().zip(&b).map(|(x, y)| x + y).collect();
            assert_eq!(gpu.read(&at).unwrap(), want);

            let gt = gpu.tensor_from(&[len], &a).unwrap();
            let mut rec = Recorder::new(gpu);
            swiglu(&mut rec, &gt, &bt, len).unwrap();
            rec.submit().unwrap();
            let swiglu_out = gpu.read(&gt).unwrap();
            assert!(max_rel_err(&swiglu_out, &swiglu_ref(&a, &b)) < 1e-6);

            let mut rec = Recorder::new(gpu);
            fill(&mut rec, &gt, -2.5, len - len / 2).unwrap();
            rec.clear(&at);
            rec.submit().unwrap();
            let got = gpu.read(&gt).unwrap();
            assert!(got[..len - len / 2].iter().all(|&v| v == -2.5));
            assert_eq!(got[len - len / 2..], swiglu_out[len - len / 2..]);
            assert!(gpu.read(&at).unwrap().iter().all(|&v| v == 0.0));
        }
    }
}
