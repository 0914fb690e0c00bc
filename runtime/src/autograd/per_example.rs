//! Per-example gradients of linear layers, for influence functions and EK-FAC.
//!
//! The weight gradient of `y = x W^T` is a sum over tokens of outer products, dW = sum_t
//! dy_t^T x_t, so a layer that keeps its input x `[tokens, in]` and its output gradient dy
//! `[tokens, out]` (the two Kronecker factors) can form the gradient of any one sequence on
//! demand, with one strided `gemm` over that sequence's tokens, instead of a backward pass per
//! sequence.

use std::ops::Range;

use crate::autograd::matmul::{gemm, rows_of, GemmShape, Strided};
use crate::autograd::{Tape, Var};
use crate::error::{Result, RuntimeError};
use crate::recorder::Recorder;
use crate::tensor::Tensor;

/// The per-token factors of one linear layer: its input and, once the backward pass has run,
/// its output gradient.
#[derive(Clone)]
pub struct LinearFactors {
    x: Tensor,
    dy: Tensor,
}

impl<'g> Tape<'g> {
    /// `x W^T` as [`linear`](Tape::linear), also returning the layer's [`LinearFactors`]: x
    /// (flattened to `[tokens, in]`) and a `[tokens, out]` tensor that holds the output's
    /// gradient after the backward pass (zero where no gradient reaches the output).
    ///
    /// The output's gradient buffer *is* the factor, so keeping it costs no copy (one copy when
    /// `backward_from` seeds this output directly).
    pub fn linear_factors(&mut self, x: Var, w: Var) -> Result<(Var, LinearFactors)> {
        let (tokens, inputs) = rows_of(self.shape(x));
        let outputs = match self.shape(w) {
            &[n, _] => n,
            s => {
                return Err(RuntimeError::Shape(format!(
                    "linear_factors: the weight must be [out, in], not {s:?}"
                )))
            }
        };
        let dy = self.zeros(&[tokens, outputs])?;
        let y = self.linear_capturing(x, w, dy.clone())?;
        if self.requires_grad(y) {
            self.nodes[y.0].grad = Some(dy.clone());
        }
        let x = self.value(x).view(&[tokens, inputs])?;
        Ok((y, LinearFactors { x, dy }))
    }
}

impl LinearFactors {
    /// The layer's input, `[tokens, in]`.
    pub fn x(&self) -> &Tensor {
        &self.x
    }

    /// The gradient of the layer's output, `[tokens, out]` (valid after the backward pass has
    /// been submitted).
    pub fn dy(&self) -> &Tensor {
        &self.dy
    }

    pub fn tokens(&self) -> usize {
        self.x.shape()[0]
    }

    /// Records the weight gradient of the tokens in `tokens` (one sequence of the batch):
    /// `sum_t dy_t^T x_t`, `[out, in]`.
    pub fn sequence_grad(&self, rec: &mut Recorder, tokens: Range<usize>) -> Result<Tensor> {
        let out = rec.gpu().tensor(&[self.dy.shape()[1], self.x.shape()[1]])?;
        self.sequence_grad_into(rec, tokens, &out, false)?;
        Ok(out)
    }

    /// As [`sequence_grad`](Self::sequence_grad), written into `out` (`[out, in]`), or added to
    /// it with `accumulate`.
    pub fn sequence_grad_into(
        &self,
        rec: &mut Recorder,
        tokens: Range<usize>,
        out: &Tensor,
        accumulate: bool,
    ) -> Result<()> {
        let (n, k) = (self.dy.shape()[1], self.x.shape()[1]);
        if tokens.start > tokens.end || tokens.end > self.tokens() {
            return Err(RuntimeError::Shape(format!(
                "sequence_grad: tokens {tokens:?} of a layer that saw {}",
                self.tokens()
            )));
        }
        if out.len() != n * k {
            return Err(RuntimeError::Shape(format!(
                "sequence_grad: an output of shape {:?} for a weight of {n} x {k}",
                out.shape()
            )));
        }
        if tokens.is_empty() {
            if !accumulate {
                rec.clear(out);
            }
            return Ok(());
        }
        // dW [n, k] = dy[tokens]^T x[tokens]: both read token-major from the range's first row.
        let s = GemmShape {
            m: n,
            n: k,
            k: tokens.len(),
            batch: 1,
        };
        let a = Strided {
            off: tokens.start * n,
            ..Strided::red_major(&self.dy, n)
        };
        let b = Strided {
            off: tokens.start * k,
            ..Strided::red_major(&self.x, k)
        };
        gemm(rec, s, 1.0, a, b, out, (0, k, 0), accumulate)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::autograd::check::{assert_close, to_f64};
    use crate::autograd::matmul::product_ref;
    use crate::autograd::Param;
    use crate::ops::test_util::gpu;
    use crate::testing::random_f32;

    /// Sequences of odd lengths, concatenated into one batch.
    const LENGTHS: [usize; 3] = [3, 5, 7];
    const IN: usize = 5;
    const OUT: usize = 7;
    const HEAD: usize = 3;

    fn ranges() -> Vec<Range<usize>> {
        let mut start = 0;
        LENGTHS
            .iter()
            .map(|&len| {
                start += len;
                start - len..start
            })
            .collect()
    }

    /// The gradient of W1 for the tokens `x` (`[len, IN]`): with `head`, of
    /// `sum(probe * (x W1^T) W2^T)`, else of `sum(probe * x W1^T)`, on its own tape.
    fn alone(w1: &[f32], w2: &[f32], x: &[f32], probe: &[f32], head: bool) -> Vec<f32> {
        let gpu = gpu();
        let len = x.len() / IN;
        let p = Param::new(gpu, "w1", &[OUT, IN], w1).unwrap();
        let mut tape = Tape::new(gpu);
        let xv = tape.upload(&[len, IN], x).unwrap();
        let wv = tape.param(&p);
        let mut y = tape.linear(xv, wv).unwrap();
        if head {
            let w2v = tape.upload(&[HEAD, OUT], w2).unwrap();
            y = tape.linear(y, w2v).unwrap();
        }
        let seed = gpu.tensor_from(&[probe.len()], probe).unwrap();
        tape.backward_from(y, seed).unwrap();
        tape.submit().unwrap();
        gpu.read(&p.grad).unwrap()
    }

    #[test]
    fn each_sequence_gradient_equals_its_own_backward_pass_and_they_sum_to_the_batch() {
        let gpu = gpu();
        let tokens: usize = LENGTHS.iter().sum();
        let x = random_f32(tokens * IN, 40);
        let w1 = random_f32(OUT * IN, 41);
        let w2 = random_f32(HEAD * OUT, 42);
        // With a layer after it, dy comes from that layer's backward; without, from the seed.
        for head in [true, false] {
            let width = if head { HEAD } else { OUT };
            let probe = random_f32(tokens * width, 43);
            let p = Param::new(gpu, "w1", &[OUT, IN], &w1).unwrap();
            let mut tape = Tape::new(gpu);
            let xv = tape.upload(&[tokens, IN], &x).unwrap();
            let wv = tape.param(&p);
            let (mut y, factors) = tape.linear_factors(xv, wv).unwrap();
            let want_y = product_ref(&to_f64(&x), &to_f64(&w1), tokens, IN, OUT, true);
            let y1 = tape.value(y).clone();
            if head {
                let w2v = tape.upload(&[HEAD, OUT], &w2).unwrap();
                y = tape.linear(y, w2v).unwrap();
            }
            let seed = gpu.tensor_from(&[probe.len()], &probe).unwrap();
            tape.backward_from(y, seed).unwrap();
            tape.submit().unwrap();
            assert_close("y", &gpu.read(&y1).unwrap(), &want_y, 1e-5);

            let mut rec = Recorder::new(gpu);
            let grads: Vec<Tensor> = ranges()
                .into_iter()
                .map(|r| factors.sequence_grad(&mut rec, r).unwrap())
                .collect();
            let sum = gpu.tensor(&[OUT, IN]).unwrap();
            rec.clear(&sum);
            for r in ranges() {
                factors.sequence_grad_into(&mut rec, r, &sum, true).unwrap();
            }
            rec.submit().unwrap();

            let mut total = vec![0.0f64; OUT * IN];
            for (r, g) in ranges().into_iter().zip(&grads) {
                let xs = &x[r.start * IN..r.end * IN];
                let ps = &probe[r.start * width..r.end * width];
                let want = alone(&w1, &w2, xs, ps, head);
                let got = gpu.read(g).unwrap();
                assert_close(&format!("dW of {r:?}"), &got, &to_f64(&want), 1e-5);
                for (t, &w) in total.iter_mut().zip(&want) {
                    *t += w as f64;
                }
            }
            let batch = gpu.read(&p.grad).unwrap();
            assert_close("batch dW", &batch, &total, 1e-5);
            assert_close("accumulated dW", &gpu.read(&sum).unwrap(), &total, 1e-5);
        }
    }

    #[test]
    fn factors_are_zero_without_a_gradient_and_ranges_are_checked() {
        let gpu = gpu();
        let p = Param::new(gpu, "w", &[OUT, IN], &random_f32(OUT * IN, 1)).unwrap();
        let mut tape = Tape::new(gpu);
        let xv = tape.upload(&[4, IN], &random_f32(4 * IN, 2)).unwrap();
        let wv = tape.param(&p);
        let (_, factors) = tape.linear_factors(xv, wv).unwrap();
        // Another output is seeded; this layer's output gets no gradient.
        let other = tape.linear(xv, wv).unwrap();
        let seed = gpu
            .tensor_from(&[4 * OUT], &random_f32(4 * OUT, 3))
            .unwrap();
        tape.backward_from(other, seed).unwrap();
        tape.submit().unwrap();
        assert!(gpu.read(factors.dy()).unwrap().iter().all(|&v| v == 0.0));
        assert_eq!(factors.tokens(), 4);

        let mut rec = Recorder::new(gpu);
        assert!(factors.sequence_grad(&mut rec, 2..5).is_err());
        let wrong = gpu.tensor(&[IN, IN]).unwrap();
        assert!(factors
            .sequence_grad_into(&mut rec, 0..2, &wrong, false)
            .is_err());
        let empty = factors.sequence_grad(&mut rec, 3..3).unwrap();
        rec.submit().unwrap();
        assert!(gpu.read(&empty).unwrap().iter().all(|&v| v == 0.0));
    }
}
