//! Reverse-mode automatic differentiation over the runtime's WGSL kernels.
//!
//! A [`Tape`] records a forward pass. Each op dispatches its forward kernel into the tape's
//! [`Recorder`] and, when gradients are wanted, keeps what its backward kernels will need.
//! [`Tape::backward`] then records those backward kernels in the reverse order of the forward,
//! so one submit runs the forward pass, the backward pass and (when recorded on the same tape)
//! the optimizer step. Gradients stay on the device.
//!
//! Rules every op keeps:
//! - backward kernels *add* into gradient buffers, which start at zero, so a value used twice
//!   receives both contributions and a [`Param`]'s gradient accumulates over tapes
//!   (micro-batches) until the optimizer clears it;
//! - no atomics: every output element of every kernel has one owner, so a run is repeatable
//!   bit for bit on one device (resumed training reproduces the uninterrupted losses);
//! - every op has a CPU reference in f64, and the tests compare its backward kernels with
//!   central finite differences of that reference on small odd shapes (`check`).
//!
//! Ops live one family per module (`matmul`, `norm`, `elementwise`, `reduce`, `embedding`,
//! `rope`, `attention`, `loss`; `per_example` for per-sequence gradients of linear layers) as
//! `impl Tape` blocks, each beside its reference.

pub mod attention;
pub mod elementwise;
pub mod embedding;
pub mod loss;
pub mod matmul;
pub mod norm;
pub mod per_example;
pub mod reduce;
pub mod rope;

#[cfg(test)]
pub(crate) mod check;

use crate::error::{Result, RuntimeError};
use crate::gpu::Gpu;
use crate::recorder::{ReadId, Recorder};
use crate::tensor::Tensor;

/// A trained tensor: its value and the gradient that tapes accumulate into.
pub struct Param {
    pub name: String,
    pub value: Tensor,
    pub grad: Tensor,
}

impl Param {
    /// A parameter holding `data`, with a zero gradient.
    pub fn new(gpu: &Gpu, name: &str, shape: &[usize], data: &[f32]) -> Result<Param> {
        let value = gpu.tensor_from(shape, data)?;
        let grad = gpu.tensor_from(shape, &vec![0.0; data.len()])?;
        Ok(Param {
            name: name.to_string(),
            value,
            grad,
        })
    }

    pub fn shape(&self) -> &[usize] {
        self.value.shape()
    }

    pub fn len(&self) -> usize {
        self.value.len()
    }

    pub fn is_empty(&self) -> bool {
        self.value.is_empty()
    }
}

/// A value on a tape: the output of an op, a constant or a parameter.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Var(usize);

/// The backward half of an op: records kernels that add the gradients of the op's inputs,
/// given the gradient of its output.
pub(crate) trait Backward {
    fn backward(&self, g: &mut Grads<'_, '_>, out_grad: &Tensor) -> Result<()>;
}

struct Node {
    value: Tensor,
    requires_grad: bool,
    grad: Option<Tensor>,
    op: Option<Box<dyn Backward>>,
}

/// A recorded forward pass and, after [`backward`](Tape::backward), its backward pass.
pub struct Tape<'g> {
    rec: Recorder<'g>,
    nodes: Vec<Node>,
    grad_enabled: bool,
}

impl<'g> Tape<'g> {
    /// A tape that records what the backward pass needs.
    pub fn new(gpu: &'g Gpu) -> Self {
        Tape {
            rec: Recorder::new(gpu),
            nodes: Vec::new(),
            grad_enabled: true,
        }
    }

    /// A tape for inference: ops run their forward kernels only and keep nothing for a
    /// backward pass.
    pub fn no_grad(gpu: &'g Gpu) -> Self {
        Tape {
            grad_enabled: false,
            ..Tape::new(gpu)
        }
    }

    pub fn gpu(&self) -> &'g Gpu {
        self.rec.gpu()
    }

    pub fn grad_enabled(&self) -> bool {
        self.grad_enabled
    }

    /// The recorder the tape's kernels go into (an optimizer step is recorded here too).
    pub fn recorder(&mut self) -> &mut Recorder<'g> {
        &mut self.rec
    }

    /// A new tensor; its contents are unspecified. The recorder holds what its work names until
    /// the submit.
    pub fn alloc(&mut self, shape: &[usize]) -> Result<Tensor> {
        self.gpu().tensor(shape)
    }

    /// A new tensor cleared to zero (by a recorded clear, so it is ordered with the tape's
    /// other work).
    pub fn zeros(&mut self, shape: &[usize]) -> Result<Tensor> {
        let t = self.alloc(shape)?;
        self.rec.clear(&t);
        Ok(t)
    }

    /// Uploads `data` as a tensor that needs no gradient (inputs, targets).
    pub fn upload(&mut self, shape: &[usize], data: &[f32]) -> Result<Var> {
        // A fresh buffer can only come from the pool if its last owner was dropped, and every
        // recorder holds the tensors its work names until it submits, so the write cannot race
        // recorded work.
        let t = self.gpu().tensor_from(shape, data)?;
        Ok(self.constant(t))
    }

    /// A value that needs no gradient.
    pub fn constant(&mut self, value: Tensor) -> Var {
        self.nodes.push(Node {
            value,
            requires_grad: false,
            grad: None,
            op: None,
        });
        Var(self.nodes.len() - 1)
    }

    /// A parameter: with gradients enabled, the backward pass adds into `p.grad`.
    pub fn param(&mut self, p: &Param) -> Var {
        self.nodes.push(Node {
            value: p.value.clone(),
            requires_grad: self.grad_enabled,
            grad: self.grad_enabled.then(|| p.grad.clone()),
            op: None,
        });
        Var(self.nodes.len() - 1)
    }

    /// A value whose gradient the backward pass computes even though no parameter feeds it
    /// (tests take gradients of inputs this way).
    pub fn leaf(&mut self, value: Tensor) -> Var {
        self.nodes.push(Node {
            value,
            requires_grad: self.grad_enabled,
            grad: None,
            op: None,
        });
        Var(self.nodes.len() - 1)
    }

    pub fn value(&self, v: Var) -> &Tensor {
        &self.nodes[v.0].value
    }

    pub fn shape(&self, v: Var) -> &[usize] {
        self.nodes[v.0].value.shape()
    }

    /// Whether the backward pass will compute a gradient for `v`.
    pub fn requires_grad(&self, v: Var) -> bool {
        self.nodes[v.0].requires_grad
    }

    /// The gradient of `v` after [`backward`](Tape::backward), if it has one.
    pub fn grad(&self, v: Var) -> Option<&Tensor> {
        self.nodes[v.0].grad.as_ref()
    }

    /// Adds the output of an op. `op` is called (and its result kept) only when gradients are
    /// enabled and one of `inputs` needs a gradient.
    pub(crate) fn push<B: Backward + 'static>(
        &mut self,
        value: Tensor,
        inputs: &[Var],
        op: impl FnOnce() -> B,
    ) -> Var {
        let requires_grad = self.grad_enabled && inputs.iter().any(|&v| self.requires_grad(v));
        self.nodes.push(Node {
            value,
            requires_grad,
            grad: None,
            op: requires_grad.then(|| Box::new(op()) as Box<dyn Backward>),
        });
        Var(self.nodes.len() - 1)
    }

    /// Records the backward pass from a scalar `loss` (seeded with 1).
    pub fn backward(&mut self, loss: Var) -> Result<()> {
        if self.value(loss).len() != 1 {
            return Err(RuntimeError::Shape(format!(
                "backward needs a scalar loss, not a tensor of shape {:?}",
                self.shape(loss)
            )));
        }
        let seed = self.alloc(&[1])?;
        crate::ops::fill(&mut self.rec, &seed, 1.0, 1)?;
        self.backward_from(loss, seed)
    }

    /// Records the backward pass from `out` with `seed` as its gradient (the vector of a
    /// vector-Jacobian product).
    pub fn backward_from(&mut self, out: Var, seed: Tensor) -> Result<()> {
        if !self.grad_enabled {
            return Err(RuntimeError::Shape(
                "backward on a tape made with no_grad".into(),
            ));
        }
        if seed.len() != self.value(out).len() {
            return Err(RuntimeError::Shape(format!(
                "the seed of backward has {} values for an output of shape {:?}",
                seed.len(),
                self.shape(out)
            )));
        }
        if !self.requires_grad(out) {
            return Ok(());
        }
        self.nodes[out.0].grad = Some(seed);
        for i in (0..=out.0).rev() {
            let Some(op) = self.nodes[i].op.take() else {
                continue;
            };
            let Some(out_grad) = self.nodes[i].grad.clone() else {
                continue;
            };
            op.backward(&mut Grads { tape: self }, &out_grad)?;
        }
        Ok(())
    }

    /// Asks for `v`'s value to be read back after the submit.
    pub fn read(&mut self, v: Var) -> ReadId {
        let t = self.nodes[v.0].value.clone();
        self.rec.read(&t, 0, t.len())
    }

    /// Submits everything recorded; returns the reads' bytes (see [`Recorder::submit`]).
    pub fn submit(self) -> Result<Vec<Vec<u8>>> {
        self.rec.submit()
    }
}

/// What a [`Backward`] sees: the recorder, values, and the gradients of the op's inputs.
pub(crate) struct Grads<'t, 'g> {
    tape: &'t mut Tape<'g>,
}

impl<'g> Grads<'_, 'g> {
    pub fn rec(&mut self) -> &mut Recorder<'g> {
        &mut self.tape.rec
    }

    pub fn value(&self, v: Var) -> Tensor {
        self.tape.value(v).clone()
    }

    /// A scratch tensor that lives until the submit.
    pub fn alloc(&mut self, shape: &[usize]) -> Result<Tensor> {
        self.tape.alloc(shape)
    }

    /// The gradient buffer of `v` to add into, made (cleared) on first use; `None` when `v`
    /// needs no gradient.
    pub fn grad_of(&mut self, v: Var) -> Result<Option<Tensor>> {
        if !self.tape.requires_grad(v) {
            return Ok(None);
        }
        if let Some(g) = &self.tape.nodes[v.0].grad {
            return Ok(Some(g.clone()));
        }
        let shape = self.tape.shape(v).to_vec();
        let g = self.tape.zeros(&shape)?;
        self.tape.nodes[v.0].grad = Some(g.clone());
        Ok(Some(g))
    }
}
