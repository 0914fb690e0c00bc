//! Matrix products: `matmul` (x B) and `linear` (x W^T, W stored `[out, in]` as in GGUF), with
//! their backward passes, all through one strided kernel (`train_matmul.wgsl`).

use crate::autograd::{Backward, Grads, Tape, Var};
use crate::error::{Result, RuntimeError};
use crate::gpu::KernelLayout;
use crate::pipeline::PipelineKey;
use crate::recorder::{Binding, Recorder};
use crate::tensor::Tensor;

/// One operand of [`gemm`]. Element (outer index o, reduction index l) is read at
/// `off + o * os + l * ls`, plus `bs` per batch; the outer index is A's row or B's column.
#[derive(Clone, Copy)]
pub struct Strided<'a> {
    pub t: &'a Tensor,
    pub off: usize,
    pub os: usize,
    pub ls: usize,
    pub bs: usize,
}

impl<'a> Strided<'a> {
    /// A matrix stored row-major as `[outer, reduction]` (x `[m, k]` as A, W `[n, k]` as B).
    pub fn outer_major(t: &'a Tensor, red: usize) -> Self {
        Strided {
            t,
            off: 0,
            os: red,
            ls: 1,
            bs: 0,
        }
    }

    /// A matrix stored row-major as `[reduction, outer]` (B `[k, n]`, or x `[m, k]` read as
    /// x^T).
    pub fn red_major(t: &'a Tensor, outer: usize) -> Self {
        Strided {
            t,
            off: 0,
            os: 1,
            ls: outer,
            bs: 0,
        }
    }

    fn check(&self, what: &str, outer: usize, red: usize, batch: usize) -> Result<()> {
        let last = self.off + (outer - 1) * self.os + (red - 1) * self.ls + (batch - 1) * self.bs;
        if last >= self.t.len() {
            return Err(RuntimeError::Shape(format!(
                "gemm: operand {what} of shape {:?} is read up to element {last}",
                self.t.shape()
            )));
        }
        Ok(())
    }
}

/// Sizes of a [`gemm`]: C `[m, n]` over a reduction of `k`, `batch` times.
#[derive(Clone, Copy, Debug)]
pub struct GemmShape {
    pub m: usize,
    pub n: usize,
    pub k: usize,
    pub batch: usize,
}

/// Records `C = alpha * A B`, or `C += alpha * A B` with `accumulate`. C is row-major with row
/// stride `c_rs`, from element `c_off`, batches `c_bs` apart.
#[allow(clippy::too_many_arguments)]
pub fn gemm(
    rec: &mut Recorder,
    s: GemmShape,
    alpha: f32,
    a: Strided,
    b: Strided,
    c: &Tensor,
    (c_off, c_rs, c_bs): (usize, usize, usize),
    accumulate: bool,
) -> Result<()> {
    if s.m == 0 || s.n == 0 || s.batch == 0 {
        return Ok(());
    }
    if s.k == 0 {
        return Err(RuntimeError::Shape("gemm: a reduction of length 0".into()));
    }
    a.check("A", s.m, s.k, s.batch)?;
    b.check("B", s.n, s.k, s.batch)?;
    let c_last = c_off + (s.m - 1) * c_rs + (s.n - 1) + (s.batch - 1) * c_bs;
    if c_last >= c.len() {
        return Err(RuntimeError::Shape(format!(
            "gemm: output of shape {:?} is written up to element {c_last}",
            c.shape()
        )));
    }
    if rec.gpu().kernel_layout() == KernelLayout::LanePerRow
        && gemm_rows(rec, s, alpha, a, b, c, (c_off, c_rs, c_bs), accumulate)?
    {
        return Ok(());
    }
    let u = |v: usize| v as u32;
    let params = [
        u(s.m),
        u(s.n),
        u(s.k),
        accumulate as u32,
        u(a.off),
        u(a.os),
        u(a.ls),
        u(a.bs),
        u(b.off),
        u(b.ls),
        u(b.os),
        u(b.bs),
        u(c_off),
        u(c_rs),
        u(c_bs),
        alpha.to_bits(),
    ];
    let groups = [u(s.n.div_ceil(32)), u(s.m.div_ceil(32)), u(s.batch)];
    let max = rec.gpu().limits().max_compute_workgroups_per_dimension as usize;
    if groups.iter().any(|&g| g as usize > max) {
        return Err(RuntimeError::Shape(format!(
            "gemm of {s:?} needs more than {max} workgroups in one dimension"
        )));
    }
    rec.dispatch(
        &PipelineKey::new("train_matmul", "main"),
        &params,
        &[a.t.bind(), b.t.bind(), c.bind()],
        groups,
    )
}

/// The lane-per-column gemm of CPU devices (`train_matmul_rows.wgsl`): A through uniform
/// windows, B by vec4 loads. Returns `false`, recording nothing, where the operands' layout or
/// the device's limits do not suit it.
#[allow(clippy::too_many_arguments)]
pub(crate) fn gemm_rows(
    rec: &mut Recorder,
    s: GemmShape,
    alpha: f32,
    a: Strided,
    b: Strided,
    c: &Tensor,
    (c_off, c_rs, c_bs): (usize, usize, usize),
    accumulate: bool,
) -> Result<bool> {
    let aligned = |v: usize| v.is_multiple_of(4);
    let variant = if a.ls == 1
        && b.ls == 1
        && [s.k, a.os, a.off, a.bs, b.os, b.off, b.bs]
            .into_iter()
            .all(aligned)
    {
        0
    } else if b.os == 1 && [b.ls, b.off, b.bs].into_iter().all(aligned) {
        1
    } else {
        return Ok(false);
    };
    let limits = rec.gpu().limits();
    let limit = (limits.max_uniform_buffer_binding_size as usize).min(1 << 16) / 4;
    let align = (limits.min_uniform_buffer_offset_alignment as usize / 4).max(4);
    if !a.t.buffer().usage().contains(wgpu::BufferUsages::UNIFORM) || !align.is_multiple_of(4) {
        return Ok(false);
    }
    // Windows of A: by rows when each row's reduction is contiguous-ish, else by reduction
    // steps (accumulated over dispatches). Each window spans at most `limit - align` floats.
    let room = limit.saturating_sub(align + 1);
    let by_rows = a.ls <= a.os;
    let (rows_per, steps_per) = if by_rows {
        let need = (s.k - 1) * a.ls;
        if need > room {
            return Ok(false);
        }
        let rows = (room - need) / a.os.max(1) + 1;
        (if rows >= 8 { rows / 8 * 8 } else { rows }, s.k)
    } else {
        let need = (s.m - 1) * a.os;
        if need > room {
            return Ok(false);
        }
        let steps = (room - need) / a.ls + 1;
        (s.m, if variant == 0 { steps / 4 * 4 } else { steps })
    };
    if rows_per == 0 || steps_per == 0 {
        return Ok(false);
    }
    let max_groups = limits.max_compute_workgroups_per_dimension as usize;
    let cols = if variant == 0 { s.n } else { s.n.div_ceil(4) };
    if cols.div_ceil(64) > max_groups || rows_per.div_ceil(8) > max_groups {
        return Ok(false);
    }
    let buffer_floats = a.t.buffer().size() as usize / 4;
    let u = |v: usize| v as u32;
    for z in 0..s.batch {
        let a_off = a.off + z * a.bs;
        for i_lo in (0..s.m).step_by(rows_per) {
            let rows = rows_per.min(s.m - i_lo);
            for (n_step, l_lo) in (0..s.k).step_by(steps_per).enumerate() {
                let steps = steps_per.min(s.k - l_lo);
                let first = a_off + i_lo * a.os + l_lo * a.ls;
                let end = first + (rows - 1) * a.os + (steps - 1) * a.ls + 1;
                let start = first / align * align;
                // Window lengths rounded up to 1 KiB where the buffer allows, so few sizes
                // (pipelines) occur.
                let mut len = (end - start).div_ceil(4) * 4;
                if start + len.div_ceil(256) * 256 <= buffer_floats.min(start + limit) {
                    len = len.div_ceil(256) * 256;
                }
                let params = [
                    u(rows),
                    u(s.n),
                    u(steps),
                    (accumulate || n_step > 0) as u32,
                    u(first - start),
                    u(a.os),
                    u(a.ls),
                    u(i_lo),
                    u(b.off + z * b.bs),
                    u(b.os),
                    u(b.ls),
                    u(l_lo),
                    u(c_off + z * c_bs),
                    u(c_rs),
                    alpha.to_bits(),
                    0,
                ];
                let key = PipelineKey::new("train_matmul_rows", "main")
                    .define("VARIANT", variant)
                    .define("AV", u(len / 4));
                let bindings = [
                    Binding::range(a.t, start as u64 * 4, len as u64 * 4),
                    b.t.bind(),
                    c.bind(),
                ];
                let groups = [u(cols.div_ceil(64)), u(rows.div_ceil(8)), 1];
                rec.dispatch(&key, &params, &bindings, groups)?;
            }
        }
    }
    Ok(true)
}

/// Splits a shape `[.., k]` into (rows, k).
pub(super) fn rows_of(shape: &[usize]) -> (usize, usize) {
    let k = shape.last().copied().unwrap_or(1);
    (shape.iter().product::<usize>() / k.max(1), k)
}

struct MatmulBackward {
    x: Var,
    w: Var,
    m: usize,
    n: usize,
    k: usize,
    /// W is `[n, k]` (linear) rather than `[k, n]`.
    trans: bool,
    /// A `[m, n]` tensor that must hold dy after the backward pass (`linear_factors`): the
    /// output's gradient buffer itself, unless `backward_from` seeded the output.
    capture: Option<Tensor>,
}

impl<'g> Tape<'g> {
    /// `x W^T` for x `[.., k]` and a weight W `[n, k]` (a linear layer without bias): `[.., n]`.
    pub fn linear(&mut self, x: Var, w: Var) -> Result<Var> {
        self.product(x, w, true, None)
    }

    /// `x B` for x `[.., k]` and B `[k, n]`: `[.., n]`.
    pub fn matmul(&mut self, x: Var, b: Var) -> Result<Var> {
        self.product(x, b, false, None)
    }

    /// [`linear`](Self::linear) whose backward pass leaves the output's gradient in `capture`
    /// (`[.., n]`, as many values as the output; see `per_example`).
    pub(super) fn linear_capturing(&mut self, x: Var, w: Var, capture: Tensor) -> Result<Var> {
        self.product(x, w, true, Some(capture))
    }

    fn product(&mut self, x: Var, w: Var, trans: bool, capture: Option<Tensor>) -> Result<Var> {
        let (m, k) = rows_of(self.shape(x));
        let ws = self.shape(w).to_vec();
        let (wk, n) = match (ws.as_slice(), trans) {
            (&[n, k], true) => (k, n),
            (&[k, n], false) => (k, n),
            _ => (0, 0),
        };
        if wk != k || k == 0 {
            return Err(RuntimeError::Shape(format!(
                "{}: input {:?} and weight {ws:?} do not fit",
                if trans { "linear" } else { "matmul" },
                self.shape(x)
            )));
        }
        if capture.as_ref().is_some_and(|c| c.len() != m * n) {
            return Err(RuntimeError::Shape(format!(
                "linear: a gradient capture of shape {:?} for an output of {m} x {n}",
                capture.as_ref().map(|c| c.shape().to_vec())
            )));
        }
        let mut shape = self.shape(x).to_vec();
        *shape.last_mut().unwrap() = n;
        let y = self.alloc(&shape)?;
        let (xt, wt) = (self.value(x).clone(), self.value(w).clone());
        let b = if trans {
            Strided::outer_major(&wt, k)
        } else {
            Strided::red_major(&wt, n)
        };
        let s = GemmShape { m, n, k, batch: 1 };
        let a = Strided::outer_major(&xt, k);
        gemm(&mut self.rec, s, 1.0, a, b, &y, (0, n, 0), false)?;
        Ok(self.push(y, &[x, w], || MatmulBackward {
            x,
            w,
            m,
            n,
            k,
            trans,
            capture,
        }))
    }
}

impl Backward for MatmulBackward {
    fn backward(&self, g: &mut Grads, dy: &Tensor) -> Result<()> {
        let (m, n, k) = (self.m, self.n, self.k);
        let (x, w) = (g.value(self.x), g.value(self.w));
        if let Some(c) = &self.capture {
            if !std::sync::Arc::ptr_eq(&c.buf, &dy.buf) {
                g.rec().copy(dy, 0, c, 0, m * n);
            }
        }
        if let Some(dx) = g.grad_of(self.x)? {
            // dx [m, k] += dy [m, n] W^T, with W^T [n, k] (linear) or [k, n] read transposed.
            let wb = if self.trans {
                Strided::red_major(&w, k)
            } else {
                Strided::outer_major(&w, n)
            };
            let s = GemmShape {
                m,
                n: k,
                k: n,
                batch: 1,
            };
            let a = Strided::outer_major(dy, n);
            gemm(g.rec(), s, 1.0, a, wb, &dx, (0, k, 0), true)?;
        }
        if let Some(dw) = g.grad_of(self.w)? {
            if self.trans {
                // dW [n, k] += dy^T x
                let s = GemmShape {
                    m: n,
                    n: k,
                    k: m,
                    batch: 1,
                };
                let (a, b) = (Strided::red_major(dy, n), Strided::red_major(&x, k));
                gemm(g.rec(), s, 1.0, a, b, &dw, (0, k, 0), true)?;
            } else {
                // dB [k, n] += x^T dy
                let s = GemmShape {
                    m: k,
                    n,
                    k: m,
                    batch: 1,
                };
                let (a, b) = (Strided::red_major(&x, k), Strided::red_major(dy, n));
                gemm(g.rec(), s, 1.0, a, b, &dw, (0, n, 0), true)?;
            }
        }
        Ok(())
    }
}

/// CPU reference: `x W^T` (`trans`, W `[n, k]`) or `x B` (B `[k, n]`), x `[m, k]`.
pub fn product_ref(x: &[f64], w: &[f64], m: usize, k: usize, n: usize, trans: bool) -> Vec<f64> {
    let mut y = vec![0.0; m * n];
    for i in 0..m {
        for j in 0..n {
            y[i * n + j] = (0..k)
                .map(|l| x[i * k + l] * if trans { w[j * k + l] } else { w[l * n + j] })
                .sum();
        }
    }
    y
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::autograd::check::{assert_close, finite_diff, probe_loss, to_f64};
    use crate::ops::test_util::gpu;
    use crate::testing::random_f32;

    #[test]
    fn gemm_matches_the_reference_on_odd_shapes_and_strides() {
        let gpu = gpu();
        for (m, n, k, batch) in [
            (1, 1, 1, 1),
            (33, 17, 45, 1),
            (5, 70, 3, 3),
            (64, 64, 64, 2),
        ] {
            let a = random_f32(batch * m * k, 1);
            let b = random_f32(batch * n * k, 2);
            let c0 = random_f32(batch * m * n, 3);
            let (at, bt) = (
                gpu.tensor_from(&[a.len()], &a).unwrap(),
                gpu.tensor_from(&[b.len()], &b).unwrap(),
            );
            let ct = gpu.tensor_from(&[c0.len()], &c0).unwrap();
            let mut rec = Recorder::new(gpu);
            // A read transposed ([k, m] in memory), B as [n, k] read transposed; C accumulated.
            let sa = Strided {
                t: &at,
                off: 0,
                os: 1,
                ls: m,
                bs: m * k,
            };
            let sb = Strided {
                t: &bt,
                off: 0,
                os: k,
                ls: 1,
                bs: n * k,
            };
            let s = GemmShape { m, n, k, batch };
            gemm(&mut rec, s, 0.5, sa, sb, &ct, (0, n, m * n), true).unwrap();
            rec.submit().unwrap();
            let got = gpu.read(&ct).unwrap();
            let mut want = vec![0.0f64; batch * m * n];
            for z in 0..batch {
                for i in 0..m {
                    for j in 0..n {
                        let dot: f64 = (0..k)
                            .map(|l| {
                                a[z * m * k + l * m + i] as f64 * b[z * n * k + j * k + l] as f64
                            })
                            .sum();
                        want[z * m * n + i * n + j] = c0[z * m * n + i * n + j] as f64 + 0.5 * dot;
                    }
                }
            }
            assert_close(&format!("gemm {m}x{n}x{k}x{batch}"), &got, &want, 1e-5);
        }
    }

    #[test]
    fn gemm_rejects_operands_read_past_their_end() {
        let gpu = gpu();
        let t = gpu.tensor(&[10]).unwrap();
        let mut rec = Recorder::new(gpu);
        let s = GemmShape {
            m: 3,
            n: 3,
            k: 4,
            batch: 1,
        };
        let err = gemm(
            &mut rec,
            s,
            1.0,
            Strided::outer_major(&t, 4),
            Strided::red_major(&t, 3),
            &t,
            (0, 3, 0),
            false,
        );
        assert!(err.is_err());
    }

    #[test]
    fn linear_and_matmul_backward_match_finite_differences() {
        let gpu = gpu();
        for (m, k, n, trans) in [(3, 5, 7, true), (9, 33, 2, true), (4, 6, 35, false)] {
            let x = random_f32(m * k, 10);
            let w = random_f32(n * k, 11);
            let probe = random_f32(m * n, 12);
            let mut tape = Tape::new(gpu);
            let xv = tape.leaf(gpu.tensor_from(&[m, k], &x).unwrap());
            let wshape = if trans { [n, k] } else { [k, n] };
            let wv = tape.leaf(gpu.tensor_from(&wshape, &w).unwrap());
            let y = if trans {
                tape.linear(xv, wv)
            } else {
                tape.matmul(xv, wv)
            }
            .unwrap();
            assert_eq!(tape.shape(y), &[m, n]);
            let seed = gpu.tensor_from(&[m * n], &probe).unwrap();
            tape.backward_from(y, seed).unwrap();
            let (yt, dx, dw) = (
                tape.value(y).clone(),
                tape.grad(xv).unwrap().clone(),
                tape.grad(wv).unwrap().clone(),
            );
            tape.submit().unwrap();
            let (x64, w64) = (to_f64(&x), to_f64(&w));
            let want_y = product_ref(&x64, &w64, m, k, n, trans);
            assert_close("y", &gpu.read(&yt).unwrap(), &want_y, 1e-5);
            let fx = finite_diff(&x64, |x| {
                probe_loss(&product_ref(x, &w64, m, k, n, trans), &probe)
            });
            let fw = finite_diff(&w64, |w| {
                probe_loss(&product_ref(&x64, w, m, k, n, trans), &probe)
            });
            assert_close("dx", &gpu.read(&dx).unwrap(), &fx, 1e-4);
            assert_close("dw", &gpu.read(&dw).unwrap(), &fw, 1e-4);
        }
    }

    #[test]
    fn a_value_used_twice_gets_both_gradients_and_params_accumulate() {
        let gpu = gpu();
        let p = crate::autograd::Param::new(gpu, "w", &[2, 3], &random_f32(6, 5)).unwrap();
        let x = random_f32(4 * 3, 6);
        let probe = random_f32(4 * 2, 7);
        for _ in 0..2 {
            let mut tape = Tape::new(gpu);
            let xv = tape.upload(&[4, 3], &x).unwrap();
            let wv = tape.param(&p);
            let y1 = tape.linear(xv, wv).unwrap();
            let _ = tape.linear(xv, wv).unwrap();
            let seed = gpu.tensor_from(&[8], &probe).unwrap();
            tape.backward_from(y1, seed).unwrap();
            tape.submit().unwrap();
        }
        // Two tapes, each with one seeded output: dW = 2 probe^T x.
        let mut want = vec![0.0f64; 6];
        for j in 0..2 {
            for l in 0..3 {
                want[j * 3 + l] = 2.0
                    * (0..4)
                        .map(|i| probe[i * 2 + j] as f64 * x[i * 3 + l] as f64)
                        .sum::<f64>();
            }
        }
        assert_close("accumulated dW", &gpu.read(&p.grad).unwrap(), &want, 1e-5);
    }
}
