//! Scaled dot-product attention on the tape: grouped-query heads, causal or bidirectional, with
//! an online-softmax forward that saves each query row's log-sum-exp and a FlashAttention-2
//! style backward that recomputes the probabilities from it (`train_attention.wgsl`). No
//! `[seq, seq]` score matrix is ever stored, so the memory is linear in the sequence.

use crate::autograd::{Backward, Grads, Tape, Var};
use crate::error::{Result, RuntimeError};
use crate::pipeline::PipelineKey;
use crate::recorder::Recorder;
use crate::tensor::Tensor;

/// Sizes of one [`Tape::attention`]: q is `[batch * seq, heads * head_dim]`, k and v are
/// `[batch * seq, kv_heads * head_dim]`, rows ordered by sequence, then position.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AttentionShape {
    pub batch: usize,
    pub seq: usize,
    pub heads: usize,
    /// Key/value heads; `heads / kv_heads` query heads share each (grouped-query attention).
    pub kv_heads: usize,
    pub head_dim: usize,
    /// Whether position i sees only the keys at positions up to i.
    pub causal: bool,
}

/// Rows (queries or keys) owned by the lanes of one workgroup.
const WG: u32 = 32;
/// Keys whose scores the forward keeps at once.
const BK: u32 = 16;
/// Largest head size: each lane keeps a few rows of `head_dim` values in registers.
pub const MAX_HEAD_DIM: usize = 256;
/// Storage buffers the backward kernels bind.
const BACKWARD_BUFFERS: u32 = 8;

impl AttentionShape {
    fn check(&self, what: &str, shape: &[usize], heads: usize) -> Result<()> {
        let len: usize = shape.iter().product();
        let width = heads * self.head_dim;
        if shape.last() != Some(&width) || len != self.batch * self.seq * width {
            return Err(RuntimeError::Shape(format!(
                "attention: {what} of shape {shape:?} is not [{} * {}, {heads} * {}] for {self:?}",
                self.batch, self.seq, self.head_dim
            )));
        }
        Ok(())
    }

    fn validate(&self) -> Result<()> {
        let sizes = [
            self.batch,
            self.seq,
            self.heads,
            self.kv_heads,
            self.head_dim,
        ];
        if sizes.contains(&0) || !self.heads.is_multiple_of(self.kv_heads) {
            return Err(RuntimeError::Shape(format!(
                "attention: {self:?} needs sizes above 0 and kv_heads dividing heads"
            )));
        }
        if self.head_dim > MAX_HEAD_DIM {
            return Err(RuntimeError::Shape(format!(
                "attention: head size {} is above the largest the kernels keep in registers, \
                 {MAX_HEAD_DIM}",
                self.head_dim
            )));
        }
        Ok(())
    }

    fn params(&self) -> [u32; 5] {
        [
            self.seq as u32,
            self.heads as u32,
            self.kv_heads as u32,
            self.causal as u32,
            (1.0 / (self.head_dim as f32).sqrt()).to_bits(),
        ]
    }

    /// Workgroups of a kernel whose lanes own rows of `heads` heads.
    fn groups(&self, rec: &Recorder, heads: usize) -> Result<[u32; 3]> {
        let groups = [self.seq.div_ceil(WG as usize), heads, self.batch];
        let max = rec.gpu().limits().max_compute_workgroups_per_dimension as usize;
        if groups.iter().any(|&g| g > max) {
            return Err(RuntimeError::Shape(format!(
                "attention of {self:?} needs more than {max} workgroups in one dimension"
            )));
        }
        Ok(groups.map(|g| g as u32))
    }

    fn key(&self, entry: &'static str) -> PipelineKey {
        PipelineKey::new("train_attention", entry)
            .define("HD", self.head_dim as u32)
            .define("WG", WG)
            .define("BK", BK)
    }
}

struct AttentionBackward {
    q: Var,
    k: Var,
    v: Var,
    out: Tensor,
    /// Log-sum-exp of each query row's scaled scores, `[batch, heads, seq]`.
    lse: Tensor,
    s: AttentionShape,
}

impl<'g> Tape<'g> {
    /// `softmax(q k^T / sqrt(head_dim)) v` per sequence and head, with query head h reading
    /// kv head `h / (heads / kv_heads)`, causal or bidirectional as `s` says. The output is
    /// shaped like q.
    pub fn attention(&mut self, q: Var, k: Var, v: Var, s: AttentionShape) -> Result<Var> {
        s.validate()?;
        s.check("q", self.shape(q), s.heads)?;
        s.check("k", self.shape(k), s.kv_heads)?;
        s.check("v", self.shape(v), s.kv_heads)?;
        let groups = s.groups(&self.rec, s.heads)?;
        let shape = self.shape(q).to_vec();
        let out = self.alloc(&shape)?;
        let lse = self.alloc(&[s.batch * s.heads * s.seq])?;
        let [qt, kt, vt] = [q, k, v].map(|x| self.value(x).clone());
        let buffers = [qt.bind(), kt.bind(), vt.bind(), out.bind(), lse.bind()];
        let (key, params) = (s.key("forward"), s.params());
        self.rec.dispatch(&key, &params, &buffers, groups)?;
        let saved = out.clone();
        Ok(self.push(out, &[q, k, v], || AttentionBackward {
            q,
            k,
            v,
            out: saved,
            lse,
            s,
        }))
    }
}

impl Backward for AttentionBackward {
    fn backward(&self, g: &mut Grads, d_out: &Tensor) -> Result<()> {
        let s = self.s;
        let allowed = g.rec().gpu().limits().max_storage_buffers_per_shader_stage;
        if allowed < BACKWARD_BUFFERS {
            return Err(RuntimeError::Device(format!(
                "attention's backward binds {BACKWARD_BUFFERS} storage buffers in one kernel; \
                 this device allows {allowed}"
            )));
        }
        let (dq, dk, dv) = (g.grad_of(self.q)?, g.grad_of(self.k)?, g.grad_of(self.v)?);
        let (q, k, v) = (g.value(self.q), g.value(self.k), g.value(self.v));
        let wants_kv = dk.is_some() || dv.is_some();
        if dq.is_none() && !wants_kv {
            return Ok(());
        }
        // backward_q also computes delta, which backward_kv reads: it runs even when q needs
        // no gradient, adding into a scratch tensor then.
        let dq = match dq {
            Some(t) => t,
            None => g.alloc(q.shape())?,
        };
        let delta = g.alloc(&[s.batch * s.heads * s.seq])?;
        let params = s.params();
        let buffers = [
            q.bind(),
            k.bind(),
            v.bind(),
            self.out.bind(),
            self.lse.bind(),
            d_out.bind(),
            delta.bind(),
            dq.bind(),
        ];
        let groups = s.groups(g.rec(), s.heads)?;
        g.rec()
            .dispatch(&s.key("backward_q"), &params, &buffers, groups)?;
        if !wants_kv {
            return Ok(());
        }
        let dk = match dk {
            Some(t) => t,
            None => g.alloc(k.shape())?,
        };
        let dv = match dv {
            Some(t) => t,
            None => g.alloc(v.shape())?,
        };
        let buffers = [
            q.bind(),
            k.bind(),
            v.bind(),
            dk.bind(),
            self.lse.bind(),
            d_out.bind(),
            delta.bind(),
            dv.bind(),
        ];
        let groups = s.groups(g.rec(), s.kv_heads)?;
        g.rec()
            .dispatch(&s.key("backward_kv"), &params, &buffers, groups)
    }
}

/// CPU reference of [`Tape::attention`] in f64.
pub fn attention_ref(q: &[f64], k: &[f64], v: &[f64], s: AttentionShape) -> Vec<f64> {
    let hd = s.head_dim;
    let group = s.heads / s.kv_heads;
    let scale = 1.0 / (hd as f64).sqrt();
    let mut out = vec![0.0; q.len()];
    for b in 0..s.batch {
        for h in 0..s.heads {
            let kvh = h / group;
            let kv = |j: usize| ((b * s.seq + j) * s.kv_heads + kvh) * hd;
            for i in 0..s.seq {
                let qi = ((b * s.seq + i) * s.heads + h) * hd;
                let n_keys = if s.causal { i + 1 } else { s.seq };
                let scores: Vec<f64> = (0..n_keys)
                    .map(|j| (0..hd).map(|d| q[qi + d] * k[kv(j) + d]).sum::<f64>() * scale)
                    .collect();
                let m = scores.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                let w: Vec<f64> = scores.iter().map(|x| (x - m).exp()).collect();
                let sum: f64 = w.iter().sum();
                for d in 0..hd {
                    out[qi + d] = (0..n_keys).map(|j| w[j] * v[kv(j) + d]).sum::<f64>() / sum;
                }
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::autograd::check::{assert_close, finite_diff, probe_loss, to_f64};
    use crate::ops::test_util::gpu;
    use crate::testing::random_f32;

    /// Inputs of one test: q scaled up so that the softmax is far from uniform.
    fn inputs(s: AttentionShape, seed: u64) -> [Vec<f32>; 4] {
        let rows = s.batch * s.seq;
        let q = random_f32(rows * s.heads * s.head_dim, seed)
            .iter()
            .map(|x| 3.0 * x)
            .collect();
        let k = random_f32(rows * s.kv_heads * s.head_dim, seed + 1);
        let v = random_f32(rows * s.kv_heads * s.head_dim, seed + 2);
        let probe = random_f32(rows * s.heads * s.head_dim, seed + 3);
        [q, k, v, probe]
    }

    /// Runs the forward and a backward seeded with `probe`; `grads` picks which of q, k, v
    /// are leaves (the others are constants). Returns the output and the leaves' gradients.
    fn run(s: AttentionShape, data: &[Vec<f32>; 4], grads: [bool; 3]) -> Vec<Vec<f32>> {
        let gpu = gpu();
        let rows = s.batch * s.seq;
        let mut tape = Tape::new(gpu);
        let widths = [s.heads, s.kv_heads, s.kv_heads].map(|h| h * s.head_dim);
        let vars: Vec<Var> = (0..3)
            .map(|i| {
                let t = gpu.tensor_from(&[rows, widths[i]], &data[i]).unwrap();
                if grads[i] {
                    tape.leaf(t)
                } else {
                    tape.constant(t)
                }
            })
            .collect();
        let y = tape.attention(vars[0], vars[1], vars[2], s).unwrap();
        assert_eq!(tape.shape(y), &[rows, widths[0]]);
        let seed = gpu.tensor_from(&[data[3].len()], &data[3]).unwrap();
        tape.backward_from(y, seed).unwrap();
        let mut wanted = vec![tape.value(y).clone()];
        for (i, &v) in vars.iter().enumerate() {
            assert_eq!(tape.grad(v).is_some(), grads[i]);
            wanted.extend(tape.grad(v).cloned());
        }
        tape.submit().unwrap();
        wanted.iter().map(|t| gpu.read(t).unwrap()).collect()
    }

    fn check(s: AttentionShape) {
        let data = inputs(s, 40);
        let got = run(s, &data, [true; 3]);
        let [q, k, v] = [0, 1, 2].map(|i| to_f64(&data[i]));
        let probe = &data[3];
        let what = format!("{s:?}");
        assert_close(&what, &got[0], &attention_ref(&q, &k, &v, s), 1e-5);
        let fq = finite_diff(&q, |q| probe_loss(&attention_ref(q, &k, &v, s), probe));
        let fk = finite_diff(&k, |k| probe_loss(&attention_ref(&q, k, &v, s), probe));
        let fv = finite_diff(&v, |v| probe_loss(&attention_ref(&q, &k, v, s), probe));
        assert_close(&format!("{what} dq"), &got[1], &fq, 1e-4);
        assert_close(&format!("{what} dk"), &got[2], &fk, 1e-4);
        assert_close(&format!("{what} dv"), &got[3], &fv, 1e-4);
    }

    #[test]
    fn attention_matches_the_reference_and_finite_differences() {
        // seq 37 spans two query workgroups and three key blocks, the last one partial.
        for seq in [1, 5, 37] {
            for head_dim in [4, 16] {
                for kv_heads in [1, 2] {
                    for causal in [true, false] {
                        check(AttentionShape {
                            batch: 2,
                            seq,
                            heads: 2,
                            kv_heads,
                            head_dim,
                            causal,
                        });
                    }
                }
            }
        }
    }

    #[test]
    fn attention_gradients_of_some_inputs_only() {
        let s = AttentionShape {
            batch: 2,
            seq: 37,
            heads: 4,
            kv_heads: 2,
            head_dim: 6,
            causal: true,
        };
        let data = inputs(s, 50);
        let all = run(s, &data, [true; 3]);
        // Without dq (a scratch takes it) and without dk and dv (backward_kv is skipped), the
        // other gradients are the same bits.
        let kv_only = run(s, &data, [false, true, true]);
        assert_eq!(kv_only[1], all[2]);
        assert_eq!(kv_only[2], all[3]);
        let q_only = run(s, &data, [true, false, false]);
        assert_eq!(q_only[1], all[1]);
        let v_only = run(s, &data, [false, false, true]);
        assert_eq!(v_only[1], all[3]);
        // And a second run repeats the first bit for bit.
        assert_eq!(run(s, &data, [true; 3]), all);
    }

    #[test]
    fn attention_rejects_bad_shapes() {
        let gpu = gpu();
        let s = AttentionShape {
            batch: 2,
            seq: 3,
            heads: 4,
            kv_heads: 2,
            head_dim: 8,
            causal: true,
        };
        let mut tape = Tape::new(gpu);
        let q = tape.leaf(gpu.tensor(&[6, 32]).unwrap());
        let kv = tape.leaf(gpu.tensor(&[6, 16]).unwrap());
        assert!(tape.attention(q, kv, kv, s).is_ok());
        let bad = [
            AttentionShape { kv_heads: 3, ..s },
            AttentionShape { kv_heads: 0, ..s },
            AttentionShape { seq: 0, ..s },
            AttentionShape { batch: 3, ..s },
            AttentionShape { head_dim: 4, ..s },
            AttentionShape {
                heads: 2,
                head_dim: 16,
                ..s
            },
        ];
        for b in bad {
            assert!(tape.attention(q, kv, kv, b).is_err(), "{b:?}");
        }
        // k and v swapped with q: widths of the wrong heads.
        assert!(tape.attention(kv, q, q, s).is_err());
        let big = AttentionShape {
            head_dim: MAX_HEAD_DIM + 2,
            heads: 1,
            kv_heads: 1,
            batch: 1,
            seq: 1,
            causal: false,
        };
        let x = tape.leaf(gpu.tensor(&[1, MAX_HEAD_DIM + 2]).unwrap());
        assert!(tape.attention(x, x, x, big).is_err());
    }
}
