//! Reductions of a whole tensor to one value: `sum` and `mean`, with their backward passes
//! (`train_reduce.wgsl`).
//!
//! The sum is taken in a fixed order (chunks per workgroup, then the chunks' values), so a run
//! repeats bit for bit: one dispatch for small tensors, two for large ones.

use crate::autograd::{Backward, Grads, Tape, Var};
use crate::error::{Result, RuntimeError};
use crate::ops::pow2_floor;
use crate::pipeline::PipelineKey;
use crate::recorder::{split_groups, Recorder};
use crate::tensor::Tensor;

/// Elements a workgroup sums, at least, before a second dispatch is worth it.
const CHUNK: usize = 4096;

/// Workgroups of the first dispatch, at most (the second sums their values in one).
const MAX_CHUNKS: usize = 256;

/// Records `out[0] = scale * sum(x)`, over `partials` (a scratch of [`MAX_CHUNKS`] values)
/// when `x` is large.
fn record_sum(
    rec: &mut Recorder,
    x: &Tensor,
    out: &Tensor,
    partials: Option<&Tensor>,
    scale: f32,
) -> Result<()> {
    let wg = pow2_floor(
        rec.gpu()
            .limits()
            .max_compute_invocations_per_workgroup
            .min(256),
    );
    let key = PipelineKey::new("train_reduce", "sum").define("WG", wg);
    let len = x.len();
    let pass =
        |rec: &mut Recorder, src: &Tensor, dst: &Tensor, len: usize, chunks: usize, s: f32| {
            let chunk = len.div_ceil(chunks) as u32;
            let params = [len as u32, chunk, s.to_bits(), 0];
            let groups = [chunks as u32, 1, 1];
            rec.dispatch(&key, &params, &[dst.bind(), src.bind()], groups)
        };
    match partials {
        Some(partials) => {
            let chunks = len.div_ceil(CHUNK).min(MAX_CHUNKS);
            pass(rec, x, partials, len, chunks, 1.0)?;
            pass(rec, partials, out, chunks, 1, scale)
        }
        None => pass(rec, x, out, len, 1, scale),
    }
}

struct SumBackward {
    x: Var,
    scale: f32,
}

impl Backward for SumBackward {
    fn backward(&self, g: &mut Grads, dy: &Tensor) -> Result<()> {
        let Some(dx) = g.grad_of(self.x)? else {
            return Ok(());
        };
        let len = dx.len();
        let params = [len as u32, 0, self.scale.to_bits(), 0];
        let groups = split_groups(g.rec().gpu(), (len as u32).div_ceil(256), 1);
        // WG sizes `sum`'s workgroup memory only; this entry runs workgroups of 256.
        let key = PipelineKey::new("train_reduce", "sum_grad").define("WG", 1);
        g.rec()
            .dispatch(&key, &params, &[dx.bind(), dy.bind()], groups)
    }
}

impl<'g> Tape<'g> {
    /// The sum of all of `x`'s elements, as a tensor `[1]` (0 for an empty `x`).
    pub fn sum(&mut self, x: Var) -> Result<Var> {
        self.reduce(x, 1.0)
    }

    /// The mean of all of `x`'s elements, as a tensor `[1]`; an empty `x` is an error.
    pub fn mean(&mut self, x: Var) -> Result<Var> {
        let len = self.value(x).len();
        if len == 0 {
            return Err(RuntimeError::Shape(format!(
                "mean: the input of shape {:?} is empty",
                self.shape(x)
            )));
        }
        self.reduce(x, 1.0 / len as f32)
    }

    fn reduce(&mut self, x: Var, scale: f32) -> Result<Var> {
        let xt = self.value(x).clone();
        let y = if xt.is_empty() {
            self.zeros(&[1])?
        } else {
            let y = self.alloc(&[1])?;
            let partials = if xt.len() > 2 * CHUNK {
                Some(self.alloc(&[MAX_CHUNKS])?)
            } else {
                None
            };
            record_sum(&mut self.rec, &xt, &y, partials.as_ref(), scale)?;
            y
        };
        Ok(self.push(y, &[x], || SumBackward { x, scale }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::autograd::check::{assert_close, finite_diff, probe_loss, to_f64};
    use crate::autograd::elementwise::gelu_ref;
    use crate::autograd::elementwise::harness::{assert_adds, run};
    use crate::autograd::embedding::embedding_ref;
    use crate::autograd::matmul::product_ref;
    use crate::autograd::norm::norm_ref;
    use crate::autograd::Param;
    use crate::ops::test_util::gpu;
    use crate::testing::random_f32;

    #[test]
    fn sum_and_mean_match_references_and_finite_differences() {
        let gpu = gpu();
        for shape in [vec![1], vec![5], vec![7, 33], vec![3, 130]] {
            let n: usize = shape.iter().product();
            let x = random_f32(n, 1);
            for mean in [false, true] {
                let r = run(gpu, &[(&shape, &x, true)], 2, |t, v| {
                    if mean {
                        t.mean(v[0])
                    } else {
                        t.sum(v[0])
                    }
                });
                assert_eq!(r.shape, [1]);
                let f = |x: &[f64]| x.iter().sum::<f64>() / if mean { n as f64 } else { 1.0 };
                let x64 = to_f64(&x);
                assert_close(&format!("{shape:?} {mean}"), &r.y, &[f(&x64)], 1e-5);
                let fd = finite_diff(&x64, |x| probe_loss(&[f(x)], &r.probe));
                assert_close("dx", r.grads[0].as_ref().unwrap(), &fd, 1e-4);
            }
        }
    }

    #[test]
    fn the_gradient_adds_to_the_other_uses_of_the_input() {
        // out = 2 x + sum(x): the sum's backward runs after the scale's, into the same dx.
        let gpu = gpu();
        let x = random_f32(7 * 5, 20);
        let r = run(gpu, &[(&[7, 5], &x, true)], 21, |t, v| {
            let s = t.sum(v[0])?;
            let z = t.scale(v[0], 2.0)?;
            t.add(z, s)
        });
        let x64 = to_f64(&x);
        let f = |x: &[f64]| -> Vec<f64> {
            let s: f64 = x.iter().sum();
            x.iter().map(|v| 2.0 * v + s).collect()
        };
        assert_close("2 x + sum(x)", &r.y, &f(&x64), 1e-5);
        let fd = finite_diff(&x64, |x| probe_loss(&f(x), &r.probe));
        assert_close("dx", r.grads[0].as_ref().unwrap(), &fd, 1e-4);
    }

    #[test]
    fn large_sums_take_two_passes_and_repeat_bit_for_bit() {
        let gpu = gpu();
        for n in [2 * CHUNK + 1, 100_003, MAX_CHUNKS * CHUNK * 2 + 7] {
            let x = random_f32(n, 3);
            let r = run(gpu, &[(&[n], &x, true)], 4, |t, v| t.mean(v[0]));
            let want = x.iter().map(|&v| v as f64).sum::<f64>() / n as f64;
            assert_close(&format!("mean of {n}"), &r.y, &[want], 1e-6);
            let dx = r.grads[0].as_ref().unwrap();
            let slope = (1.0 / n as f32) * r.probe[0];
            assert!(dx.iter().all(|&v| v == slope), "mean's gradient of {n}");
            let again = run(gpu, &[(&[n], &x, false)], 4, |t, v| t.mean(v[0]));
            assert_eq!(again.y[0].to_bits(), r.y[0].to_bits());
        }
    }

    #[test]
    fn an_empty_tensor_sums_to_zero_and_has_no_mean() {
        let gpu = gpu();
        let mut tape = Tape::new(gpu);
        let x = tape.upload(&[0, 3], &[]).unwrap();
        let s = tape.sum(x).unwrap();
        let read = tape.read(s);
        match tape.mean(x) {
            Err(RuntimeError::Shape(m)) => assert!(m.contains("mean"), "{m}"),
            _ => panic!("the mean of nothing was accepted"),
        }
        let bytes = tape.submit().unwrap();
        assert_eq!(bytemuck::cast_slice::<u8, f32>(&bytes[read.index()]), [0.0]);
    }

    #[test]
    fn gradients_through_a_small_network_match_finite_differences() {
        // sum(gelu(rmsnorm(embedding(table, ids), g) W^T) * s), from the scalar seed 1.
        let gpu = gpu();
        let (vocab, d, n, out) = (11, 6, 7, 5);
        let ids = [4u32, 0, 4, 9, 2, 4, 10];
        let data = [
            random_f32(vocab * d, 5),
            random_f32(d, 6),
            random_f32(out * d, 7),
            random_f32(out, 8),
        ];
        let shapes: [&[usize]; 4] = [&[vocab, d], &[d], &[out, d], &[out]];
        let params: Vec<Param> = ["table", "g", "w", "s"]
            .iter()
            .zip(shapes.iter().zip(&data))
            .map(|(name, (shape, v))| Param::new(gpu, name, shape, v).unwrap())
            .collect();
        let mut tape = Tape::new(gpu);
        let p: Vec<Var> = params.iter().map(|p| tape.param(p)).collect();
        let h = tape.embedding(p[0], &ids).unwrap();
        let h = tape.rmsnorm(h, p[1], 1e-5).unwrap();
        let z = tape.linear(h, p[2]).unwrap();
        let a = tape.gelu(z).unwrap();
        let r = tape.mul(a, p[3]).unwrap();
        let loss = tape.sum(r).unwrap();
        tape.backward(loss).unwrap();
        let read = tape.read(loss);
        let bytes = tape.submit().unwrap();

        let reference = |v: &[Vec<f64>]| {
            let h = norm_ref(&embedding_ref(&v[0], d, &ids), &v[1], None, d, 1e-5);
            let z = product_ref(&h, &v[2], n, d, out, true);
            z.iter()
                .enumerate()
                .map(|(i, &z)| gelu_ref(z) * v[3][i % out])
                .sum::<f64>()
        };
        let v64: Vec<Vec<f64>> = data.iter().map(|v| to_f64(v)).collect();
        let got: &[f32] = bytemuck::cast_slice(&bytes[read.index()]);
        assert_close("loss", got, &[reference(&v64)], 1e-6);
        for (i, param) in params.iter().enumerate() {
            let fd = finite_diff(&v64[i], |x| {
                let mut v = v64.clone();
                v[i] = x.to_vec();
                reference(&v)
            });
            assert_close(&param.name, &gpu.read(&param.grad).unwrap(), &fd, 1e-4);
        }
    }

    #[test]
    fn gradients_add_into_what_they_already_hold() {
        let gpu = gpu();
        for n in [33, 3 * CHUNK] {
            let x = random_f32(n, 22);
            assert_adds(gpu, &[(&[n], &x, true)], |t, v| t.sum(v[0]));
            assert_adds(gpu, &[(&[n], &x, true)], |t, v| t.mean(v[0]));
        }
    }
}
