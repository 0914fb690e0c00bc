//! Elementwise ops: activations (`silu`, `gelu`, `swiglu`), `scale`, `add` and `mul` with numpy
//! broadcasting, and `reshape`, with their backward passes (`train_elementwise.wgsl`).
//!
//! The gradient of a broadcast operand is summed over the dimensions it was broadcast along by
//! one thread per element of that operand, in a fixed order, so runs repeat bit for bit.

use std::sync::Arc;

use crate::autograd::{Backward, Grads, Tape, Var};
use crate::error::{Result, RuntimeError};
use crate::pipeline::PipelineKey;
use crate::recorder::{split_groups, Binding, Recorder};
use crate::tensor::Tensor;

/// Operations of `train_elementwise.wgsl` (its OP define).
const OP_SILU: u32 = 0;
const OP_GELU: u32 = 1;
const OP_SCALE: u32 = 2;
const OP_ADD: u32 = 3;
const OP_MUL: u32 = 4;

/// The uniform words of `train_elementwise.wgsl`, and the rank its broadcast index is split
/// over (a define).
#[derive(Clone, Copy)]
struct Params {
    dims: [u32; 4],
    s1: [u32; 4],
    s2: [u32; 4],
    red: [u32; 4],
    len: usize,
    s: f32,
    rank: u32,
}

impl Params {
    /// Parameters of an entry that reads and writes elements at the same flat index.
    fn flat(len: usize, s: f32) -> Params {
        Params {
            dims: [1, 1, 1, len as u32],
            s1: [0, 0, 0, 1],
            s2: [0, 0, 0, 1],
            red: [1; 4],
            len,
            s,
            rank: 1,
        }
    }
}

/// Records one dispatch of `entry` for operation `op` over `p.len` threads with `buffers`
/// bound in order.
fn record(
    rec: &mut Recorder,
    entry: &'static str,
    op: u32,
    p: &Params,
    buffers: &[&Tensor],
) -> Result<()> {
    let mut words = Vec::with_capacity(18);
    for v in [p.dims, p.s1, p.s2, p.red] {
        words.extend_from_slice(&v);
    }
    words.extend_from_slice(&[p.len as u32, p.s.to_bits()]);
    let buffers: Vec<Binding> = buffers.iter().map(|t| t.bind()).collect();
    let groups = split_groups(rec.gpu(), (p.len as u32).div_ceil(256), 1);
    let key = PipelineKey::new("train_elementwise", entry)
        .define("OP", op)
        .define("RANK", p.rank);
    rec.dispatch(&key, &words, &buffers, groups)
}

/// Records `dst += src` over all of `dst` (`src` must hold as many elements).
pub(crate) fn add_into(rec: &mut Recorder, dst: &Tensor, src: &Tensor) -> Result<()> {
    if src.len() != dst.len() {
        return Err(RuntimeError::Shape(format!(
            "adding a gradient of shape {:?} into one of shape {:?}",
            src.shape(),
            dst.shape()
        )));
    }
    let p = Params::flat(dst.len(), 1.0);
    record(rec, "unary_grad", OP_SCALE, &p, &[dst, src, src])
}

/// Whether two tensors share their storage (a kernel must not write one while reading or
/// writing the other through another binding).
pub(crate) fn same_storage(a: &Tensor, b: &Tensor) -> bool {
    Arc::ptr_eq(&a.buf, &b.buf)
}

/// Two shapes broadcast against each other as numpy does, with runs of dimensions that
/// broadcast alike merged, so that any pair of ranks up to 4 fits four dimensions (outermost
/// first, padded with 1 in front).
#[derive(Clone, Debug, PartialEq)]
struct Broadcast {
    out: [usize; 4],
    /// The operands' extents: equal to `out`'s, or 1 where the operand is broadcast.
    a: [usize; 4],
    b: [usize; 4],
    /// The merged dimensions in use (the last `rank` of the four; at least 1).
    rank: u32,
}

impl Broadcast {
    /// The output shape of `op(a, b)` and its merged plan.
    fn new(op: &str, a: &[usize], b: &[usize]) -> Result<(Vec<usize>, Broadcast)> {
        let fail = |why: &str| {
            RuntimeError::Shape(format!(
                "{op}: shapes {a:?} and {b:?} do not broadcast ({why})"
            ))
        };
        let rank = a.len().max(b.len());
        let padded = |s: &[usize]| {
            let mut v = vec![1; rank - s.len()];
            v.extend_from_slice(s);
            v
        };
        let (pa, pb) = (padded(a), padded(b));
        let mut out = Vec::with_capacity(rank);
        for (&x, &y) in pa.iter().zip(&pb) {
            out.push(match (x, y) {
                _ if x == y => x,
                (1, _) => y,
                (_, 1) => x,
                _ => return Err(fail("a dimension differs and neither is 1")),
            });
        }

        // Merge neighbouring dimensions where each operand is either whole or broadcast in
        // both; dimensions of extent 1 drop out.
        let mut merged: Vec<[usize; 3]> = Vec::new();
        let mut last_kind = None;
        for d in 0..rank {
            if out[d] == 1 {
                continue;
            }
            let kind = (pa[d] == out[d], pb[d] == out[d]);
            match merged.last_mut() {
                Some(m) if last_kind == Some(kind) => {
                    m[0] *= out[d];
                    m[1] *= pa[d];
                    m[2] *= pb[d];
                }
                _ => merged.push([out[d], pa[d], pb[d]]),
            }
            last_kind = Some(kind);
        }
        if merged.len() > 4 {
            return Err(fail("more than 4 dimensions after merging"));
        }
        let mut plan = Broadcast {
            out: [1; 4],
            a: [1; 4],
            b: [1; 4],
            rank: merged.len().max(1) as u32,
        };
        let skip = 4 - merged.len();
        for (d, m) in merged.iter().enumerate() {
            plan.out[skip + d] = m[0];
            plan.a[skip + d] = m[1];
            plan.b[skip + d] = m[2];
        }
        Ok((out, plan))
    }

    /// Whether neither operand is broadcast.
    fn is_flat(&self) -> bool {
        self.a == self.out && self.b == self.out
    }

    /// Row-major strides of an array of extents `dims`, 0 on dimensions of extent 1 (so a
    /// broadcast operand reads the same element along them).
    fn strides(dims: &[usize; 4]) -> [u32; 4] {
        let mut s = [0; 4];
        let mut step = 1;
        for d in (0..4).rev() {
            if dims[d] != 1 {
                s[d] = step as u32;
            }
            step *= dims[d];
        }
        s
    }

    /// The forward entry and its parameters.
    fn forward(&self) -> (&'static str, Params) {
        let p = Params {
            dims: self.out.map(|x| x as u32),
            s1: Self::strides(&self.a),
            s2: Self::strides(&self.b),
            red: [1; 4],
            len: self.out.iter().product(),
            s: 1.0,
            rank: self.rank,
        };
        (
            if self.is_flat() {
                "binary_flat"
            } else {
                "binary"
            },
            p,
        )
    }

    /// The entry and parameters for the gradient of the operand of extents `mine`, the other
    /// having extents `other`.
    fn grad(&self, op: u32, mine: &[usize; 4], other: &[usize; 4]) -> (&'static str, Params) {
        let mut red = [1; 4];
        for d in 0..4 {
            if mine[d] == 1 {
                red[d] = self.out[d] as u32;
            }
        }
        let p = Params {
            dims: mine.map(|x| x as u32),
            s1: Self::strides(&self.out),
            s2: Self::strides(other),
            red,
            len: mine.iter().product(),
            s: 1.0,
            rank: self.rank,
        };
        let entry = match (*mine == self.out, *other == self.out) {
            (true, true) => "binary_grad_flat",
            (true, false) if op == OP_ADD => "binary_grad_flat",
            (true, false) => "binary_grad_mul",
            (false, _) => "binary_grad",
        };
        (entry, p)
    }
}

struct UnaryBackward {
    x: Var,
    op: u32,
    s: f32,
}

impl Backward for UnaryBackward {
    fn backward(&self, g: &mut Grads, dy: &Tensor) -> Result<()> {
        let Some(dx) = g.grad_of(self.x)? else {
            return Ok(());
        };
        let p = Params::flat(dx.len(), self.s);
        // scale's gradient does not read x; dy stands in for it.
        let x = if self.op == OP_SCALE {
            dy.clone()
        } else {
            g.value(self.x)
        };
        record(g.rec(), "unary_grad", self.op, &p, &[&dx, dy, &x])
    }
}

struct SwigluBackward {
    gate: Var,
    up: Var,
}

impl Backward for SwigluBackward {
    fn backward(&self, g: &mut Grads, dy: &Tensor) -> Result<()> {
        let (gate, up) = (g.value(self.gate), g.value(self.up));
        let p = Params::flat(gate.len(), 1.0);
        let rec = |g: &mut Grads, entry, bufs: &[&Tensor]| record(g.rec(), entry, 0, &p, bufs);
        match (g.grad_of(self.gate)?, g.grad_of(self.up)?) {
            (Some(dg), Some(du)) if !same_storage(&dg, &du) => {
                rec(g, "swiglu_grad", &[&dg, dy, &gate, &up, &du])
            }
            (dg, du) => {
                if let Some(dg) = dg {
                    rec(g, "swiglu_grad_gate", &[&dg, dy, &gate, &up])?;
                }
                if let Some(du) = du {
                    rec(g, "swiglu_grad_up", &[&du, dy, &gate])?;
                }
                Ok(())
            }
        }
    }
}

struct BinaryBackward {
    a: Var,
    b: Var,
    op: u32,
    plan: Broadcast,
}

impl Backward for BinaryBackward {
    fn backward(&self, g: &mut Grads, dy: &Tensor) -> Result<()> {
        let (a, b) = (g.value(self.a), g.value(self.b));
        let plan = &self.plan;
        match (g.grad_of(self.a)?, g.grad_of(self.b)?) {
            (Some(da), Some(db)) if plan.is_flat() && !same_storage(&da, &db) => {
                let p = Params::flat(da.len(), 1.0);
                let bufs = [&da, dy, &a, &b, &db];
                record(g.rec(), "binary_grad_both", self.op, &p, &bufs)
            }
            (da, db) => {
                if let Some(da) = da {
                    let (entry, p) = plan.grad(self.op, &plan.a, &plan.b);
                    record(g.rec(), entry, self.op, &p, &[&da, dy, &b])?;
                }
                if let Some(db) = db {
                    let (entry, p) = plan.grad(self.op, &plan.b, &plan.a);
                    record(g.rec(), entry, self.op, &p, &[&db, dy, &a])?;
                }
                Ok(())
            }
        }
    }
}

struct ReshapeBackward {
    x: Var,
}

impl Backward for ReshapeBackward {
    fn backward(&self, g: &mut Grads, dy: &Tensor) -> Result<()> {
        match g.grad_of(self.x)? {
            Some(dx) => add_into(g.rec(), &dx, dy),
            None => Ok(()),
        }
    }
}

impl<'g> Tape<'g> {
    /// `x * sigmoid(x)`, elementwise.
    pub fn silu(&mut self, x: Var) -> Result<Var> {
        self.unary(x, OP_SILU, 1.0)
    }

    /// GELU in the tanh approximation GPT-2 uses, elementwise:
    /// `0.5 x (1 + tanh(sqrt(2 / pi) (x + 0.044715 x^3)))` (not the exact erf form).
    pub fn gelu(&mut self, x: Var) -> Result<Var> {
        self.unary(x, OP_GELU, 1.0)
    }

    /// `s * x`, elementwise.
    pub fn scale(&mut self, x: Var, s: f32) -> Result<Var> {
        self.unary(x, OP_SCALE, s)
    }

    fn unary(&mut self, x: Var, op: u32, s: f32) -> Result<Var> {
        let shape = self.shape(x).to_vec();
        let y = self.alloc(&shape)?;
        let xt = self.value(x).clone();
        let p = Params::flat(y.len(), s);
        record(&mut self.rec, "unary", op, &p, &[&y, &xt])?;
        Ok(self.push(y, &[x], || UnaryBackward { x, op, s }))
    }

    /// `silu(gate) * up`, elementwise, for two values of the same shape.
    pub fn swiglu(&mut self, gate: Var, up: Var) -> Result<Var> {
        if self.shape(gate) != self.shape(up) {
            return Err(RuntimeError::Shape(format!(
                "swiglu: gate {:?} and up {:?} differ in shape",
                self.shape(gate),
                self.shape(up)
            )));
        }
        let shape = self.shape(gate).to_vec();
        let y = self.alloc(&shape)?;
        let (gt, ut) = (self.value(gate).clone(), self.value(up).clone());
        let p = Params::flat(y.len(), 1.0);
        record(&mut self.rec, "swiglu", 0, &p, &[&y, &gt, &ut])?;
        Ok(self.push(y, &[gate, up], || SwigluBackward { gate, up }))
    }

    /// `a + b` with numpy broadcasting (ranks up to 4 once dimensions that broadcast alike are
    /// merged; either operand may broadcast).
    pub fn add(&mut self, a: Var, b: Var) -> Result<Var> {
        self.binary(a, b, OP_ADD, "add")
    }

    /// `a * b`, elementwise, with numpy broadcasting as [`add`](Self::add).
    pub fn mul(&mut self, a: Var, b: Var) -> Result<Var> {
        self.binary(a, b, OP_MUL, "mul")
    }

    fn binary(&mut self, a: Var, b: Var, op: u32, name: &str) -> Result<Var> {
        let (shape, plan) = Broadcast::new(name, self.shape(a), self.shape(b))?;
        let y = self.alloc(&shape)?;
        let (at, bt) = (self.value(a).clone(), self.value(b).clone());
        let (entry, p) = plan.forward();
        record(&mut self.rec, entry, op, &p, &[&y, &at, &bt])?;
        Ok(self.push(y, &[a, b], || BinaryBackward { a, b, op, plan }))
    }

    /// `x` seen with another shape of the same number of elements; the value shares `x`'s
    /// storage.
    pub fn reshape(&mut self, x: Var, shape: &[usize]) -> Result<Var> {
        let len: usize = shape.iter().product();
        if len != self.value(x).len() {
            return Err(RuntimeError::Shape(format!(
                "reshape: {:?} has {} elements, {shape:?} would have {len}",
                self.shape(x),
                self.value(x).len()
            )));
        }
        let y = self.value(x).view(shape)?;
        Ok(self.push(y, &[x], || ReshapeBackward { x }))
    }
}

/// CPU reference of SiLU.
pub fn silu_ref(x: f64) -> f64 {
    x / (1.0 + (-x).exp())
}

/// CPU reference of GELU in GPT-2's tanh approximation.
pub fn gelu_ref(x: f64) -> f64 {
    let c = (2.0 / std::f64::consts::PI).sqrt();
    0.5 * x * (1.0 + (c * (x + 0.044715 * x * x * x)).tanh())
}

/// CPU reference of a broadcast binary op `f(a, b)` on shapes of any rank, following numpy's
/// rule directly (trailing dimensions aligned, extent 1 repeated): the output shape and values.
pub fn broadcast_ref(
    a: &[f64],
    a_shape: &[usize],
    b: &[f64],
    b_shape: &[usize],
    f: impl Fn(f64, f64) -> f64,
) -> (Vec<usize>, Vec<f64>) {
    let rank = a_shape.len().max(b_shape.len());
    let dim = |s: &[usize], d: usize| (d + s.len()).checked_sub(rank).map_or(1, |i| s[i]);
    let shape: Vec<usize> = (0..rank)
        .map(|d| dim(a_shape, d).max(dim(b_shape, d)))
        .collect();
    let len = shape.iter().product();
    let flat = |s: &[usize], idx: &[usize]| {
        (0..rank).fold(0, |acc, d| {
            let n = dim(s, d);
            acc * n + if n == 1 { 0 } else { idx[d] }
        })
    };
    let mut idx = vec![0; rank];
    let mut out = Vec::with_capacity(len);
    for mut j in 0..len {
        for d in (0..rank).rev() {
            idx[d] = j % shape[d];
            j /= shape[d];
        }
        out.push(f(a[flat(a_shape, &idx)], b[flat(b_shape, &idx)]));
    }
    (shape, out)
}

/// Test harness shared by the autograd op tests.
#[cfg(test)]
pub(crate) mod harness {
    use crate::autograd::check::{assert_close, to_f64};
    use crate::autograd::{Param, Tape, Var};
    use crate::error::Result;
    use crate::gpu::Gpu;
    use crate::testing::random_f32;

    /// What [`run`] read back.
    pub struct Run {
        pub shape: Vec<usize>,
        pub y: Vec<f32>,
        /// The random gradient the backward pass was seeded with.
        pub probe: Vec<f32>,
        /// Each input's gradient; `None` for inputs given as constants.
        pub grads: Vec<Option<Vec<f32>>>,
    }

    /// Runs `op` on `inputs` (shape, data, whether it needs a gradient) on a fresh tape, seeds
    /// the backward pass from its output with a random probe (from `seed`), submits, and reads
    /// back the output and the gradients.
    pub fn run(
        gpu: &Gpu,
        inputs: &[(&[usize], &[f32], bool)],
        seed: u64,
        op: impl FnOnce(&mut Tape, &[Var]) -> Result<Var>,
    ) -> Run {
        run_from(gpu, inputs, seed, false, op)
    }

    /// As [`run`], with the inputs that need gradients given as parameters whose gradients
    /// hold `start` (random values from `seed`) before the backward pass when `from_start`.
    fn run_from(
        gpu: &Gpu,
        inputs: &[(&[usize], &[f32], bool)],
        seed: u64,
        from_start: bool,
        op: impl FnOnce(&mut Tape, &[Var]) -> Result<Var>,
    ) -> Run {
        let mut tape = Tape::new(gpu);
        let mut params = Vec::new();
        let vars: Vec<Var> = inputs
            .iter()
            .map(|&(shape, data, grad)| match (grad, from_start) {
                (true, true) => {
                    let p = Param::new(gpu, "input", shape, data).unwrap();
                    gpu.write(&p.grad, &start(data.len(), seed)).unwrap();
                    let v = tape.param(&p);
                    params.push(p);
                    v
                }
                (true, false) => tape.leaf(gpu.tensor_from(shape, data).unwrap()),
                (false, _) => tape.constant(gpu.tensor_from(shape, data).unwrap()),
            })
            .collect();
        let y = op(&mut tape, &vars).unwrap();
        let shape = tape.shape(y).to_vec();
        let probe = random_f32(tape.value(y).len(), seed);
        let seed = gpu.tensor_from(&[probe.len()], &probe).unwrap();
        tape.backward_from(y, seed).unwrap();
        let yt = tape.value(y).clone();
        let grads: Vec<_> = vars.iter().map(|&v| tape.grad(v).cloned()).collect();
        tape.submit().unwrap();
        Run {
            shape,
            y: gpu.read(&yt).unwrap(),
            probe,
            grads: grads
                .iter()
                .map(|g| g.as_ref().map(|t| gpu.read(t).unwrap()))
                .collect(),
        }
    }

    /// The values a gradient holds before the backward pass in [`assert_adds`].
    fn start(len: usize, seed: u64) -> Vec<f32> {
        random_f32(len, seed + 1000)
    }

    /// Fails unless `op`'s backward kernels add into gradients that already hold values (a
    /// parameter's over micro-batches) rather than overwrite them.
    pub fn assert_adds(
        gpu: &Gpu,
        inputs: &[(&[usize], &[f32], bool)],
        op: impl Fn(&mut Tape, &[Var]) -> Result<Var>,
    ) {
        let fresh = run_from(gpu, inputs, 1, false, &op);
        let added = run_from(gpu, inputs, 1, true, &op);
        for (i, (f, a)) in fresh.grads.iter().zip(&added.grads).enumerate() {
            let (Some(f), Some(a)) = (f, a) else {
                continue;
            };
            let want: Vec<f64> = to_f64(&start(f.len(), 1))
                .iter()
                .zip(f)
                .map(|(s, &g)| s + g as f64)
                .collect();
            assert_close(
                &format!("input {i} after a second gradient"),
                a,
                &want,
                1e-6,
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::harness::{assert_adds, run};
    use super::*;
    use crate::autograd::check::{assert_close, finite_diff, probe_loss, to_f64};
    use crate::ops::test_util::gpu;
    use crate::testing::random_f32;

    /// Inputs spread over [-4, 4), where the activations bend.
    fn spread(n: usize, seed: u64) -> Vec<f32> {
        random_f32(n, seed).iter().map(|v| 4.0 * v).collect()
    }

    #[test]
    fn activations_and_scale_match_references_and_finite_differences() {
        let gpu = gpu();
        type Op = fn(&mut Tape, Var) -> Result<Var>;
        type Reference = fn(f64) -> f64;
        let ops: [(&str, Op, Reference); 3] = [
            ("silu", |t, x| t.silu(x), silu_ref),
            ("gelu", |t, x| t.gelu(x), gelu_ref),
            ("scale", |t, x| t.scale(x, -1.75), |x| -1.75 * x),
        ];
        for (name, op, f) in ops {
            for shape in [vec![1], vec![3, 5], vec![7, 33], vec![2, 1, 130]] {
                let n = shape.iter().product();
                let x = spread(n, 1);
                let r = run(gpu, &[(&shape, &x, true)], 2, |t, v| op(t, v[0]));
                assert_eq!(r.shape, shape);
                let x64 = to_f64(&x);
                let want: Vec<f64> = x64.iter().map(|&v| f(v)).collect();
                assert_close(&format!("{name} {shape:?}"), &r.y, &want, 1e-5);
                let fd = finite_diff(&x64, |x| {
                    probe_loss(&x.iter().map(|&v| f(v)).collect::<Vec<_>>(), &r.probe)
                });
                let dx = r.grads[0].as_ref().unwrap();
                assert_close(&format!("d{name} {shape:?}"), dx, &fd, 1e-4);
            }
        }
    }

    #[test]
    fn gelu_and_silu_stay_finite_far_from_zero() {
        let gpu = gpu();
        let x = [-200.0f32, -90.0, 90.0, 200.0];
        for (name, f) in [("silu", silu_ref as fn(f64) -> f64), ("gelu", gelu_ref)] {
            let r = run(gpu, &[(&[4], &x, true)], 3, |t, v| match name {
                "silu" => t.silu(v[0]),
                _ => t.gelu(v[0]),
            });
            let want: Vec<f64> = x.iter().map(|&v| f(v as f64)).collect();
            assert_close(name, &r.y, &want, 1e-6);
            let dx = r.grads[0].as_ref().unwrap();
            // The slope is 0 far left and 1 far right.
            let want: Vec<f64> = r
                .probe
                .iter()
                .zip(x)
                .map(|(&p, v)| if v < 0.0 { 0.0 } else { p as f64 })
                .collect();
            assert_close(&format!("d{name}"), dx, &want, 1e-6);
        }
    }

    #[test]
    fn swiglu_matches_reference_with_either_or_both_gradients() {
        let gpu = gpu();
        let f = |g: &[f64], u: &[f64]| -> Vec<f64> {
            g.iter().zip(u).map(|(&g, &u)| silu_ref(g) * u).collect()
        };
        for (shape, gate_grad, up_grad) in [
            (vec![7, 33], true, true),
            (vec![3, 5], true, false),
            (vec![1, 130], false, true),
            (vec![1], true, true),
        ] {
            let n = shape.iter().product();
            let (g, u) = (spread(n, 4), spread(n, 5));
            let inputs = [
                (&shape[..], &g[..], gate_grad),
                (&shape[..], &u[..], up_grad),
            ];
            let r = run(gpu, &inputs, 6, |t, v| t.swiglu(v[0], v[1]));
            let (g64, u64) = (to_f64(&g), to_f64(&u));
            assert_close("swiglu", &r.y, &f(&g64, &u64), 1e-5);
            let fg = finite_diff(&g64, |g| probe_loss(&f(g, &u64), &r.probe));
            let fu = finite_diff(&u64, |u| probe_loss(&f(&g64, u), &r.probe));
            assert_eq!(r.grads[0].is_some(), gate_grad);
            assert_eq!(r.grads[1].is_some(), up_grad);
            if let Some(dg) = &r.grads[0] {
                assert_close("dgate", dg, &fg, 1e-4);
            }
            if let Some(du) = &r.grads[1] {
                assert_close("dup", du, &fu, 1e-4);
            }
        }
    }

    #[test]
    fn add_and_mul_broadcast_as_numpy_with_summed_gradients() {
        let gpu = gpu();
        let cases: [(&[usize], &[usize]); 9] = [
            (&[7, 5], &[7, 5]),
            (&[3, 1, 5], &[4, 1]),
            (&[7, 5], &[5]),
            (&[1], &[3, 5]),
            (&[7, 33], &[1]),
            (&[2, 3, 1, 4], &[3, 5, 1]),
            (&[5, 1, 3], &[5, 2, 1]),
            (&[1, 1, 6], &[2, 3, 1]),
            (&[1], &[1]),
        ];
        for (a_shape, b_shape) in cases {
            for (name, mul) in [("add", false), ("mul", true)] {
                let a = random_f32(a_shape.iter().product(), 7);
                let b = random_f32(b_shape.iter().product(), 8);
                let inputs = [(a_shape, &a[..], true), (b_shape, &b[..], true)];
                let r = run(gpu, &inputs, 9, |t, v| {
                    if mul {
                        t.mul(v[0], v[1])
                    } else {
                        t.add(v[0], v[1])
                    }
                });
                let f = move |x: f64, y: f64| if mul { x * y } else { x + y };
                let (a64, b64) = (to_f64(&a), to_f64(&b));
                let (shape, want) = broadcast_ref(&a64, a_shape, &b64, b_shape, f);
                let what = format!("{name} {a_shape:?} {b_shape:?}");
                assert_eq!(r.shape, shape, "{what}");
                assert_close(&what, &r.y, &want, 1e-6);
                let fa = finite_diff(&a64, |a| {
                    probe_loss(&broadcast_ref(a, a_shape, &b64, b_shape, f).1, &r.probe)
                });
                let fb = finite_diff(&b64, |b| {
                    probe_loss(&broadcast_ref(&a64, a_shape, b, b_shape, f).1, &r.probe)
                });
                assert_close(
                    &format!("da {what}"),
                    r.grads[0].as_ref().unwrap(),
                    &fa,
                    1e-4,
                );
                assert_close(
                    &format!("db {what}"),
                    r.grads[1].as_ref().unwrap(),
                    &fb,
                    1e-4,
                );
            }
        }
    }

    #[test]
    fn a_broadcast_operand_alone_gets_its_gradient() {
        // The bias of a linear layer: only the broadcast operand needs a gradient.
        let gpu = gpu();
        let (x, bias) = (random_f32(9 * 130, 10), random_f32(130, 11));
        let inputs = [
            (&[9, 130][..], &x[..], false),
            (&[130][..], &bias[..], true),
        ];
        let r = run(gpu, &inputs, 12, |t, v| t.add(v[0], v[1]));
        assert!(r.grads[0].is_none());
        let want: Vec<f64> = (0..130)
            .map(|c| (0..9).map(|i| r.probe[i * 130 + c] as f64).sum())
            .collect();
        assert_close("dbias", r.grads[1].as_ref().unwrap(), &want, 1e-5);
    }

    #[test]
    fn an_operand_used_twice_gets_both_gradients() {
        let gpu = gpu();
        let a = random_f32(7 * 5, 13);
        for mul in [false, true] {
            let r = run(gpu, &[(&[7, 5], &a, true)], 14, |t, v| {
                if mul {
                    t.mul(v[0], v[0])
                } else {
                    t.add(v[0], v[0])
                }
            });
            let want: Vec<f64> = a
                .iter()
                .zip(&r.probe)
                .map(|(&x, &p)| 2.0 * p as f64 * if mul { x as f64 } else { 1.0 })
                .collect();
            assert_close("da", r.grads[0].as_ref().unwrap(), &want, 1e-6);
        }
        let r = run(gpu, &[(&[3, 5], &a[..15], true)], 15, |t, v| {
            t.swiglu(v[0], v[0])
        });
        let fd = finite_diff(&to_f64(&a[..15]), |x| {
            let y: Vec<f64> = x.iter().map(|&v| silu_ref(v) * v).collect();
            probe_loss(&y, &r.probe)
        });
        assert_close("swiglu(x, x)", r.grads[0].as_ref().unwrap(), &fd, 1e-4);
    }

    #[test]
    fn reshape_shares_the_values_and_passes_the_gradient_through() {
        let gpu = gpu();
        let (x, w) = (random_f32(3 * 10, 16), random_f32(5, 17));
        let inputs = [(&[3, 10][..], &x[..], true), (&[5][..], &w[..], false)];
        // [3, 10] seen as [6, 5], scaled per column, so the gradient is not the identity.
        let r = run(gpu, &inputs, 18, |t, v| {
            let y = t.reshape(v[0], &[6, 5])?;
            t.mul(y, v[1])
        });
        assert_eq!(r.shape, vec![6, 5]);
        let want: Vec<f64> = (0..30).map(|i| x[i] as f64 * w[i % 5] as f64).collect();
        assert_close("reshaped product", &r.y, &want, 1e-6);
        let want: Vec<f64> = (0..30)
            .map(|i| r.probe[i] as f64 * w[i % 5] as f64)
            .collect();
        assert_close("dx", r.grads[0].as_ref().unwrap(), &want, 1e-6);
    }

    #[test]
    fn merged_plans_keep_four_dimensions_and_reject_what_cannot_broadcast() {
        let (shape, plan) = Broadcast::new("add", &[2, 3, 4, 5, 6], &[2, 3, 4, 5, 6]).unwrap();
        assert_eq!(shape, [2, 3, 4, 5, 6]);
        assert_eq!(plan.out, [1, 1, 1, 720]);
        let (_, plan) = Broadcast::new("add", &[7, 5], &[5]).unwrap();
        assert_eq!((plan.out, plan.b), ([1, 1, 7, 5], [1, 1, 1, 5]));
        let (shape, plan) = Broadcast::new("add", &[3, 1, 5], &[4, 1]).unwrap();
        assert_eq!(shape, [3, 4, 5]);
        assert_eq!((plan.a, plan.b), ([1, 3, 1, 5], [1, 1, 4, 1]));
        assert!(Broadcast::new("add", &[2, 1, 2, 1, 2], &[1, 2, 1, 2, 1]).is_err());
        assert_eq!(Broadcast::strides(&[1, 3, 1, 5]), [0, 5, 0, 1]);
    }

    #[test]
    fn bad_shapes_are_errors_that_name_the_op() {
        let gpu = gpu();
        let mut tape = Tape::new(gpu);
        let a = tape.upload(&[3, 4], &[0.0; 12]).unwrap();
        let b = tape.upload(&[5], &[0.0; 5]).unwrap();
        let c = tape.upload(&[4, 3], &[0.0; 12]).unwrap();
        let five = tape
            .upload(&[2, 1, 2, 1, 2], &[0.0; 8])
            .and_then(|x| Ok((x, tape.upload(&[1, 2, 1, 2, 1], &[0.0; 4])?)))
            .unwrap();
        let message = |r: Result<Var>| match r {
            Err(RuntimeError::Shape(m)) => m,
            Err(e) => panic!("not a shape error: {e}"),
            Ok(_) => panic!("accepted"),
        };
        assert!(message(tape.add(a, b)).contains("add"));
        assert!(message(tape.mul(a, c)).contains("mul"));
        assert!(message(tape.add(five.0, five.1)).contains("[2, 1, 2, 1, 2]"));
        assert!(message(tape.swiglu(a, c)).contains("swiglu"));
        assert!(message(tape.reshape(a, &[5, 2])).contains("reshape"));
    }

    #[test]
    fn a_no_grad_tape_runs_the_forward_pass_alone() {
        let gpu = gpu();
        let x = random_f32(33, 19);
        let mut tape = Tape::no_grad(gpu);
        let xv = tape.upload(&[33], &x).unwrap();
        let y = tape.gelu(xv).unwrap();
        let y = tape.scale(y, 2.0).unwrap();
        assert!(!tape.requires_grad(y));
        let read = tape.read(y);
        let bytes = tape.submit().unwrap();
        let got: Vec<f32> = bytemuck::cast_slice(&bytes[read.index()]).to_vec();
        let want: Vec<f64> = x.iter().map(|&v| 2.0 * gelu_ref(v as f64)).collect();
        assert_close("no_grad", &got, &want, 1e-5);
    }

    #[test]
    fn gradients_add_into_what_they_already_hold() {
        let gpu = gpu();
        let (a, b, c) = (random_f32(35, 30), random_f32(5, 31), random_f32(35, 32));
        let (a_shape, b_shape) = (&[7, 5][..], &[5][..]);
        type Op = fn(&mut Tape, Var) -> Result<Var>;
        let unary: [Op; 4] = [
            |t, x| t.silu(x),
            |t, x| t.gelu(x),
            |t, x| t.scale(x, 3.0),
            |t, x| t.reshape(x, &[35]),
        ];
        for op in unary {
            assert_adds(gpu, &[(a_shape, &a, true)], |t, v| op(t, v[0]));
        }
        for grads in [[true, true], [true, false], [false, true]] {
            let inputs = [(a_shape, &a[..], grads[0]), (a_shape, &c[..], grads[1])];
            assert_adds(gpu, &inputs, |t, v| t.swiglu(v[0], v[1]));
            assert_adds(gpu, &inputs, |t, v| t.mul(v[0], v[1]));
            assert_adds(gpu, &inputs, |t, v| t.add(v[0], v[1]));
        }
        let inputs = [(a_shape, &a[..], true), (b_shape, &b[..], true)];
        assert_adds(gpu, &inputs, |t, v| t.mul(v[0], v[1]));
        assert_adds(gpu, &inputs, |t, v| t.add(v[0], v[1]));
    }
}
