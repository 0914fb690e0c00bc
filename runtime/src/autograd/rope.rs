//! Rotary position embedding on the tape: GGML's "normal" (llama) layout, which turns the
//! adjacent pairs (2i, 2i+1) of each head, with one position per row (`train_rope.wgsl`).

use crate::autograd::{Backward, Grads, Tape, Var};
use crate::error::{Result, RuntimeError};
use crate::pipeline::PipelineKey;
use crate::recorder::{split_groups, Recorder};
use crate::tensor::Tensor;

/// What one RoPE dispatch turns: `rows` rows of `width` values, heads of `head_dim`.
#[derive(Clone, Copy)]
struct RopeShape {
    rows: usize,
    width: usize,
    head_dim: usize,
    theta: f32,
}

/// Records `dst = rotate(src)` or, for the backward pass, `dst += rotate(src, -angle)`.
fn record(
    rec: &mut Recorder,
    s: RopeShape,
    pos: &Tensor,
    src: &Tensor,
    dst: &Tensor,
    backward: bool,
) -> Result<()> {
    let pairs = s.rows * s.width / 2;
    let groups = split_groups(rec.gpu(), pairs.div_ceil(256) as u32, 1);
    let params = [
        pairs as u32,
        s.width as u32,
        s.head_dim as u32,
        s.theta.to_bits(),
        backward as u32,
    ];
    rec.dispatch(
        &PipelineKey::new("train_rope", "main"),
        &params,
        &[pos.bind(), src.bind(), dst.bind()],
        groups,
    )
}

struct RopeBackward {
    x: Var,
    shape: RopeShape,
    pos: Tensor,
}

impl<'g> Tape<'g> {
    /// Rotary position embedding of x `[rows, n_heads * head_dim]` (any leading dimensions
    /// make the rows), row r at position `positions[r]`: each head's pair (2i, 2i+1) turns by
    /// `positions[r] * theta^(-2i / head_dim)`, as [`ops::rope`](crate::ops::rope) does for
    /// llama models. Out of place.
    pub fn rope(&mut self, x: Var, head_dim: usize, positions: &[u32], theta: f32) -> Result<Var> {
        let shape = self.shape(x).to_vec();
        let width = shape.last().copied().unwrap_or(0);
        let rows = self.value(x).len().checked_div(width).unwrap_or(0);
        if head_dim == 0 || !head_dim.is_multiple_of(2) || !width.is_multiple_of(head_dim) {
            return Err(RuntimeError::Shape(format!(
                "rope: rows of {width} values do not split into heads of an even size \
                 {head_dim}"
            )));
        }
        if rows == 0 || positions.len() != rows {
            return Err(RuntimeError::Shape(format!(
                "rope: {} positions for an input of shape {shape:?} ({rows} rows)",
                positions.len()
            )));
        }
        if !(theta.is_finite() && theta > 0.0) {
            return Err(RuntimeError::Shape(format!(
                "rope: frequency base {theta} is not a positive number"
            )));
        }
        let pos = self.alloc(&[rows])?;
        self.gpu().write_u32(&pos, positions)?;
        let y = self.alloc(&shape)?;
        let s = RopeShape {
            rows,
            width,
            head_dim,
            theta,
        };
        let xt = self.value(x).clone();
        record(&mut self.rec, s, &pos, &xt, &y, false)?;
        Ok(self.push(y, &[x], || RopeBackward { x, shape: s, pos }))
    }
}

impl Backward for RopeBackward {
    fn backward(&self, g: &mut Grads, dy: &Tensor) -> Result<()> {
        if let Some(dx) = g.grad_of(self.x)? {
            record(g.rec(), self.shape, &self.pos, dy, &dx, true)?;
        }
        Ok(())
    }
}

/// CPU reference: x `[rows, width]` turned as [`Tape::rope`] does, in f64.
pub fn rope_ref(
    x: &[f64],
    width: usize,
    head_dim: usize,
    positions: &[u32],
    theta: f32,
) -> Vec<f64> {
    let mut y = x.to_vec();
    for (r, &pos) in positions.iter().enumerate() {
        for h in 0..width / head_dim {
            for i in 0..head_dim / 2 {
                let angle = pos as f64 * (theta as f64).powf(-2.0 * i as f64 / head_dim as f64);
                let a = r * width + h * head_dim + 2 * i;
                let (x0, x1) = (x[a], x[a + 1]);
                y[a] = x0 * angle.cos() - x1 * angle.sin();
                y[a + 1] = x0 * angle.sin() + x1 * angle.cos();
            }
        }
    }
    y
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::autograd::check::{assert_close, finite_diff, probe_loss, to_f64};
    use crate::ops::test_util::gpu;
    use crate::ops::{RopeLayout, RopeParams};
    use crate::testing::random_f32;

    #[test]
    fn rope_forward_and_backward_match_the_reference() {
        let gpu = gpu();
        for (rows, heads, head_dim, theta) in
            [(1, 3, 2, 10000.0), (5, 2, 6, 500.0), (7, 3, 32, 10000.0)]
        {
            let width = heads * head_dim;
            let x = random_f32(rows * width, 20);
            let probe = random_f32(rows * width, 21);
            // Positions out of order and repeated, as packed sequences give.
            let positions: Vec<u32> = (0..rows as u32).map(|r| (r * 7 + 3) % 11).collect();
            let mut tape = Tape::new(gpu);
            let xv = tape.leaf(gpu.tensor_from(&[rows, width], &x).unwrap());
            let y = tape.rope(xv, head_dim, &positions, theta).unwrap();
            assert_eq!(tape.shape(y), &[rows, width]);
            let seed = gpu.tensor_from(&[rows * width], &probe).unwrap();
            tape.backward_from(y, seed).unwrap();
            let (yt, dx) = (tape.value(y).clone(), tape.grad(xv).unwrap().clone());
            tape.submit().unwrap();
            let x64 = to_f64(&x);
            let want = rope_ref(&x64, width, head_dim, &positions, theta);
            let what = format!("rope {rows}x{heads}x{head_dim}");
            assert_close(&what, &gpu.read(&yt).unwrap(), &want, 1e-5);
            let fd = finite_diff(&x64, |x| {
                probe_loss(&rope_ref(x, width, head_dim, &positions, theta), &probe)
            });
            assert_close(&format!("{what} dx"), &gpu.read(&dx).unwrap(), &fd, 1e-4);
        }
    }

    #[test]
    fn rope_agrees_with_the_inference_kernel() {
        let gpu = gpu();
        let (rows, heads, head_dim, pos0) = (9, 3, 32, 1000);
        let width = heads * head_dim;
        let x = random_f32(rows * width, 22);
        let positions: Vec<u32> = (pos0..pos0 + rows as u32).collect();
        let mut tape = Tape::no_grad(gpu);
        let xv = tape.upload(&[rows, width], &x).unwrap();
        let y = tape.rope(xv, head_dim, &positions, 10000.0).unwrap();
        let yt = tape.value(y).clone();
        tape.submit().unwrap();

        let inplace = gpu.tensor_from(&[rows, width], &x).unwrap();
        let mut rec = Recorder::new(gpu);
        let p = RopeParams {
            heads,
            head_dim,
            n_rot: head_dim,
            layout: RopeLayout::Normal,
            base: 10000.0,
            pos0: pos0 as usize,
            tokens: rows,
            offset: 0,
            stride: width,
        };
        crate::ops::rope(&mut rec, &inplace, &p).unwrap();
        rec.submit().unwrap();
        let (got, want) = (gpu.read(&yt).unwrap(), gpu.read(&inplace).unwrap());
        // The same f32 expressions on the same device: equal up to the compiler's freedom to
        // contract a product and a sum.
        let worst = got
            .iter()
            .zip(&want)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0f32, f32::max);
        assert!(
            worst <= 1e-6,
            "training and inference RoPE differ by {worst}"
        );
    }

    #[test]
    fn rope_rejects_bad_shapes() {
        let gpu = gpu();
        let mut tape = Tape::new(gpu);
        let x = tape.leaf(gpu.tensor(&[3, 12]).unwrap());
        assert!(tape.rope(x, 5, &[0, 1, 2], 1e4).is_err(), "odd head size");
        assert!(
            tape.rope(x, 8, &[0, 1, 2], 1e4).is_err(),
            "width not a multiple"
        );
        assert!(tape.rope(x, 0, &[0, 1, 2], 1e4).is_err(), "head size 0");
        assert!(tape.rope(x, 6, &[0, 1], 1e4).is_err(), "too few positions");
        assert!(tape.rope(x, 6, &[0, 1, 2], 0.0).is_err(), "base 0");
        assert!(tape.rope(x, 6, &[0, 1, 2], 1e4).is_ok());
    }
}
