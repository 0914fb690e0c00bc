//! Row normalisations: `rmsnorm` and `layernorm` over the last dimension, with their backward
//! passes (`train_norm.wgsl`).
//!
//! The forward pass keeps each row's mean and reciprocal standard deviation for the backward
//! pass, which takes one dispatch for the input's gradient (per row) and one for the weight's
//! and bias's (per column, summing the rows in order: repeatable without atomics).

use crate::autograd::elementwise::{add_into, same_storage};
use crate::autograd::{Backward, Grads, Tape, Var};
use crate::error::{Result, RuntimeError};
use crate::gpu::{Gpu, KernelLayout};
use crate::ops::pow2_floor;
use crate::pipeline::PipelineKey;
use crate::recorder::{split_groups, Binding, Recorder};
use crate::tensor::Tensor;

/// Threads per workgroup of the row entries, at most.
const ROW_WG: u32 = 64;

/// The sizes of one normalisation.
#[derive(Clone, Copy)]
struct Rows {
    rows: usize,
    d: usize,
    /// LayerNorm rather than RMSNorm.
    layer: bool,
    eps: f32,
}

impl Rows {
    fn params(&self) -> [u32; 4] {
        [self.rows as u32, self.d as u32, self.eps.to_bits(), 0]
    }

    /// The pipeline of `entry` and the rows a workgroup of its row entries holds. Each row
    /// belongs to TPR threads of a workgroup of WG, TPR = 1 on devices that run a row per lane.
    fn key(&self, gpu: &Gpu, entry: &'static str) -> (PipelineKey, u32) {
        let wg = pow2_floor(
            gpu.limits()
                .max_compute_invocations_per_workgroup
                .min(ROW_WG),
        );
        let tpr = match gpu.kernel_layout() {
            KernelLayout::LanePerRow => 1,
            KernelLayout::Cooperative => (self.d as u32).next_power_of_two().min(wg),
        };
        let key = PipelineKey::new("train_norm", entry)
            .define("WG", wg)
            .define("TPR", tpr)
            .define("LAYER", self.layer as u32);
        (key, wg / tpr)
    }

    /// Records a row entry (`norm`, `norm_grad_x`).
    fn record_rows(&self, rec: &mut Recorder, entry: &'static str, bufs: &[&Tensor]) -> Result<()> {
        let (key, rows_per_group) = self.key(rec.gpu(), entry);
        let groups = split_groups(rec.gpu(), (self.rows as u32).div_ceil(rows_per_group), 1);
        let bufs: Vec<Binding> = bufs.iter().map(|t| t.bind()).collect();
        rec.dispatch(&key, &self.params(), &bufs, groups)
    }
}

struct NormBackward {
    x: Var,
    w: Var,
    /// LayerNorm's bias.
    b: Option<Var>,
    /// Each row's (mean, 1 / standard deviation); mean 0 for RMSNorm.
    stats: Tensor,
    shape: Rows,
}

impl Backward for NormBackward {
    fn backward(&self, g: &mut Grads, dy: &Tensor) -> Result<()> {
        let (x, w) = (g.value(self.x), g.value(self.w));
        let s = self.shape;
        if let Some(dx) = g.grad_of(self.x)? {
            s.record_rows(g.rec(), "norm_grad_x", &[&dx, &x, &w, &self.stats, dy])?;
        }
        let dw = g.grad_of(self.w)?;
        let db = match self.b {
            Some(b) => g.grad_of(b)?,
            None => None,
        };
        if dw.is_none() && db.is_none() {
            return Ok(());
        }
        // The entry writes both; what is not wanted (or would alias the other) goes to
        // scratch, added in afterwards when it is wanted.
        let dw_out = match dw {
            Some(t) => t,
            None => g.alloc(&[s.d])?,
        };
        let (db_out, db_later) = match db {
            Some(t) if same_storage(&t, &dw_out) => {
                let scratch = g.alloc(&[s.d])?;
                g.rec().clear(&scratch);
                (scratch, Some(t))
            }
            Some(t) => (t, None),
            None => (g.alloc(&[s.d])?, None),
        };
        let groups = split_groups(g.rec().gpu(), (s.d as u32).div_ceil(64), 1);
        let (key, _) = s.key(g.rec().gpu(), "norm_grad_wb");
        let bufs = [&dw_out, &x, &self.stats, &db_out, dy].map(|t| t.bind());
        g.rec().dispatch(&key, &s.params(), &bufs, groups)?;
        match db_later {
            Some(db) => add_into(g.rec(), &db, &db_out),
            None => Ok(()),
        }
    }
}

impl<'g> Tape<'g> {
    /// RMSNorm over the last dimension: for x `[.., d]` and w `[d]`,
    /// `y = x / sqrt(mean(x^2) + eps) * w` per row.
    pub fn rmsnorm(&mut self, x: Var, w: Var, eps: f32) -> Result<Var> {
        self.norm(x, w, None, eps, "rmsnorm")
    }

    /// LayerNorm over the last dimension: for x `[.., d]` and w, b `[d]`,
    /// `y = (x - mean(x)) / sqrt(var(x) + eps) * w + b` per row (the biased variance).
    pub fn layernorm(&mut self, x: Var, w: Var, b: Var, eps: f32) -> Result<Var> {
        self.norm(x, w, Some(b), eps, "layernorm")
    }

    fn norm(&mut self, x: Var, w: Var, b: Option<Var>, eps: f32, op: &str) -> Result<Var> {
        let xs = self.shape(x).to_vec();
        let d = xs.last().copied().unwrap_or(0);
        let fits = |v: Var| self.shape(v) == [d];
        if d == 0 || !fits(w) || !b.is_none_or(fits) {
            let bias = match b {
                Some(b) => format!(", bias {:?}", self.shape(b)),
                None => String::new(),
            };
            return Err(RuntimeError::Shape(format!(
                "{op}: input {xs:?} and weight {:?}{bias} do not fit (the weight must be \
                 [d] for an input [.., d])",
                self.shape(w)
            )));
        }
        let s = Rows {
            rows: self.value(x).len() / d,
            d,
            layer: b.is_some(),
            eps,
        };
        let y = self.alloc(&xs)?;
        let stats = self.alloc(&[s.rows, 2])?;
        let (xt, wt) = (self.value(x).clone(), self.value(w).clone());
        // RMSNorm has no bias: the weight fills its binding, unread.
        let bt = self.value(b.unwrap_or(w)).clone();
        s.record_rows(&mut self.rec, "norm", &[&y, &xt, &wt, &stats, &bt])?;
        let inputs: Vec<Var> = [x, w].into_iter().chain(b).collect();
        Ok(self.push(y, &inputs, || NormBackward {
            x,
            w,
            b,
            stats,
            shape: s,
        }))
    }
}

/// CPU reference of RMSNorm (`b` = None) or LayerNorm over rows of `d`.
pub fn norm_ref(x: &[f64], w: &[f64], b: Option<&[f64]>, d: usize, eps: f64) -> Vec<f64> {
    x.chunks(d)
        .flat_map(|row| {
            let mean = match b {
                Some(_) => row.iter().sum::<f64>() / d as f64,
                None => 0.0,
            };
            let var = row.iter().map(|v| (v - mean) * (v - mean)).sum::<f64>() / d as f64;
            let rstd = 1.0 / (var + eps).sqrt();
            (0..d).map(move |c| (row[c] - mean) * rstd * w[c] + b.map_or(0.0, |b| b[c]))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::autograd::check::{assert_close, finite_diff, probe_loss, to_f64};
    use crate::autograd::elementwise::harness::{assert_adds, run};
    use crate::ops::test_util::gpus;
    use crate::testing::random_f32;

    /// Checks y, dx, dw (and db) of one normalisation against the reference.
    fn check(gpu: &Gpu, rows: usize, d: usize, layer: bool, grads: [bool; 3]) {
        let eps = 1e-5;
        // Rows off centre, so that LayerNorm's mean matters.
        let x: Vec<f32> = random_f32(rows * d, 1).iter().map(|v| v + 0.3).collect();
        let (w, b) = (random_f32(d, 2), random_f32(d, 3));
        let (xs, ws) = ([rows, d], [d]);
        let mut inputs = vec![(&xs[..], &x[..], grads[0]), (&ws[..], &w[..], grads[1])];
        if layer {
            inputs.push((&ws[..], &b[..], grads[2]));
        }
        let r = run(gpu, &inputs, 4, |t, v| {
            if layer {
                t.layernorm(v[0], v[1], v[2], eps as f32)
            } else {
                t.rmsnorm(v[0], v[1], eps as f32)
            }
        });
        let (x64, w64, b64) = (to_f64(&x), to_f64(&w), to_f64(&b));
        let bias = layer.then_some(&b64[..]);
        let what = format!(
            "{} rows {rows} d {d} on {:?}",
            if layer { "layernorm" } else { "rmsnorm" },
            gpu.kernel_layout()
        );
        assert_eq!(r.shape, xs);
        assert_close(&what, &r.y, &norm_ref(&x64, &w64, bias, d, eps), 1e-5);
        let loss = |x: &[f64], w: &[f64], b: &[f64]| {
            probe_loss(&norm_ref(x, w, layer.then_some(b), d, eps), &r.probe)
        };
        let want = [
            finite_diff(&x64, |x| loss(x, &w64, &b64)),
            finite_diff(&w64, |w| loss(&x64, w, &b64)),
            finite_diff(&b64, |b| loss(&x64, &w64, b)),
        ];
        for (i, name) in ["dx", "dw", "db"].iter().enumerate().take(r.grads.len()) {
            assert_eq!(r.grads[i].is_some(), grads[i], "{name} {what}");
            if let Some(got) = &r.grads[i] {
                assert_close(&format!("{name} {what}"), got, &want[i], 1e-4);
            }
        }
    }

    #[test]
    fn rmsnorm_and_layernorm_match_references_and_finite_differences() {
        for gpu in gpus() {
            for rows in [1, 3, 7] {
                for d in [1, 5, 33, 130] {
                    for layer in [false, true] {
                        check(gpu, rows, d, layer, [true; 3]);
                    }
                }
            }
        }
    }

    #[test]
    fn each_gradient_is_computed_alone() {
        for gpu in gpus() {
            for grads in [
                [true, false, false],
                [false, true, false],
                [false, false, true],
            ] {
                check(gpu, 3, 33, true, grads);
            }
            check(gpu, 7, 5, false, [false, true, false]);
        }
    }

    #[test]
    fn many_rows_in_one_dispatch() {
        // More rows than one workgroup holds in either layout, and a wide row.
        let gpu = gpus()[0];
        check(gpu, 130, 7, true, [true; 3]);
        check(gpu, 2, 700, false, [true; 3]);
    }

    #[test]
    fn a_shared_weight_and_bias_get_both_gradients() {
        let gpu = gpus()[0];
        let (rows, d) = (3, 5);
        let x = random_f32(rows * d, 5);
        let w = random_f32(d, 6);
        let inputs = [(&[rows, d][..], &x[..], false), (&[d][..], &w[..], true)];
        let r = run(gpu, &inputs, 7, |t, v| t.layernorm(v[0], v[1], v[1], 1e-5));
        let (x64, w64) = (to_f64(&x), to_f64(&w));
        let fd = finite_diff(&w64, |w| {
            probe_loss(&norm_ref(&x64, w, Some(w), d, 1e-5), &r.probe)
        });
        assert_close("dw + db", r.grads[1].as_ref().unwrap(), &fd, 1e-4);
    }

    #[test]
    fn weights_that_do_not_fit_are_errors() {
        let gpu = gpus()[0];
        let mut tape = Tape::new(gpu);
        let x = tape.upload(&[3, 5], &[0.0; 15]).unwrap();
        let w4 = tape.upload(&[4], &[0.0; 4]).unwrap();
        let w5 = tape.upload(&[5], &[0.0; 5]).unwrap();
        let w15 = tape.upload(&[3, 5], &[0.0; 15]).unwrap();
        let scalar = tape.upload(&[], &[0.0]).unwrap();
        for (r, op) in [
            (tape.rmsnorm(x, w4, 1e-5), "rmsnorm"),
            (tape.rmsnorm(x, w15, 1e-5), "rmsnorm"),
            (tape.rmsnorm(scalar, w5, 1e-5), "rmsnorm"),
            (tape.layernorm(x, w5, w4, 1e-5), "layernorm"),
            (tape.layernorm(x, w4, w5, 1e-5), "layernorm"),
        ] {
            match r {
                Err(RuntimeError::Shape(m)) => assert!(m.contains(op), "{m}"),
                Err(e) => panic!("not a shape error: {e}"),
                Ok(_) => panic!("{op} accepted a weight that does not fit"),
            }
        }
    }

    #[test]
    fn gradients_add_into_what_they_already_hold() {
        for gpu in gpus() {
            let (x, w, b) = (random_f32(3 * 33, 8), random_f32(33, 9), random_f32(33, 10));
            let (xs, ws) = ([3, 33], [33]);
            let inputs = [(&xs[..], &x[..], true), (&ws[..], &w[..], true)];
            assert_adds(gpu, &inputs, |t, v| t.rmsnorm(v[0], v[1], 1e-5));
            let inputs = [
                (&xs[..], &x[..], true),
                (&ws[..], &w[..], true),
                (&ws[..], &b[..], true),
            ];
            assert_adds(gpu, &inputs, |t, v| t.layernorm(v[0], v[1], v[2], 1e-5));
            assert_adds(gpu, &inputs[..2], |t, v| {
                t.layernorm(v[0], v[1], v[1], 1e-5)
            });
        }
    }
}
