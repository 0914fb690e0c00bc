//! Optimizers for the autograd layer: AdamW and SGD with momentum, the global gradient norm
//! with its clip scale, and a cosine learning-rate schedule.
//!
//! Everything runs on the device and is recorded into the step's [`Recorder`]: the norm is
//! reduced in a fixed order (no atomics, so a run is repeatable bit for bit), the clip scale
//! stays in a device buffer that the update kernels read, and each update zeroes its
//! parameter's gradient so that the next tapes accumulate from zero. Optimizer state can be
//! saved and loaded so that a resumed run reproduces the uninterrupted one (`shaders/optim.wgsl`).

use std::f64::consts::PI;

use crate::autograd::Param;
use crate::error::{Result, RuntimeError};
use crate::gpu::Gpu;
use crate::pipeline::PipelineKey;
use crate::recorder::{split_groups, Recorder};
use crate::tensor::Tensor;

/// Threads per workgroup of every optimizer kernel (`WG` in `optim.wgsl`).
const WG: usize = 256;

/// Gradient elements reduced to one partial sum by a workgroup of `sum_squares`
/// (`WG * ITEMS` in `optim.wgsl`).
const CHUNK: usize = WG * 16;

/// Whether a parameter gets weight decay when the optimizer is made with `new`: matrices
/// (rank 2 and up) decay, vectors (norm gains, biases) do not. Embedding tables are matrices;
/// to leave them undecayed, make the optimizer with `with_decay`.
pub fn decays_by_rank(p: &Param) -> bool {
    p.shape().len() >= 2
}

/// The global L2 norm of a set of gradients and the scale that clips it, both on the device.
///
/// Keep it until the recorder it was recorded into is submitted: its tensors are the outputs
/// and scratch of recorded kernels.
pub struct GradNorm {
    norm: Tensor,
    scale: Tensor,
    _partials: Tensor,
}

impl GradNorm {
    /// `[1]`: the norm of all gradients, before clipping (read it back with the step's loss).
    pub fn norm(&self) -> &Tensor {
        &self.norm
    }

    /// `[1]`: `min(1, max_norm / (norm + 1e-6))`, which the optimizer multiplies gradients by.
    pub fn scale(&self) -> &Tensor {
        &self.scale
    }
}

/// Records the global L2 norm of the gradients of `params` and the clip scale
/// `min(1, max_norm / (norm + 1e-6))`; pass the result to an optimizer's `step` to clip.
///
/// One dispatch per non-empty parameter writes partial sums of squares, one more adds them in
/// a fixed order; nothing is read back.
pub fn grad_norm(rec: &mut Recorder, params: &[&Param], max_norm: f32) -> Result<GradNorm> {
    if max_norm.is_nan() || max_norm <= 0.0 {
        return Err(RuntimeError::Shape(format!(
            "grad_norm: the largest norm must be positive, not {max_norm}"
        )));
    }
    let gpu = rec.gpu();
    let total: usize = params.iter().map(|p| p.len().div_ceil(CHUNK)).sum();
    let partials = gpu.tensor(&[total.max(1)])?;
    let norm = gpu.tensor(&[1])?;
    let scale = gpu.tensor(&[1])?;
    let u = |v: usize| v as u32;
    let mut first = 0;
    for p in params {
        let chunks = p.len().div_ceil(CHUNK);
        if chunks == 0 {
            continue;
        }
        rec.dispatch(
            &PipelineKey::new("optim", "sum_squares"),
            &[u(p.len()), u(first), 0],
            &[p.grad.bind(), partials.bind()],
            split_groups(gpu, u(chunks), 1),
        )?;
        first += chunks;
    }
    rec.dispatch(
        &PipelineKey::new("optim", "clip_scale"),
        &[u(total), 0, max_norm.to_bits()],
        &[partials.bind(), norm.bind(), scale.bind()],
        [1, 1, 1],
    )?;
    Ok(GradNorm {
        norm,
        scale,
        _partials: partials,
    })
}

/// Hyperparameters of [`AdamW`].
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AdamWConfig {
    pub beta1: f32,
    pub beta2: f32,
    pub eps: f32,
    /// Decoupled weight decay, applied to the parameters that decay (see [`AdamW::new`]).
    pub weight_decay: f32,
}

impl Default for AdamWConfig {
    /// PyTorch's defaults: betas (0.9, 0.999), eps 1e-8, weight decay 0.01.
    fn default() -> Self {
        AdamWConfig {
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.01,
        }
    }
}

/// Hyperparameters of [`Sgd`].
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct SgdConfig {
    /// Heavy-ball momentum (0 for plain SGD).
    pub momentum: f32,
    /// Decoupled weight decay, applied to the parameters that decay (see [`Sgd::new`]).
    pub weight_decay: f32,
}

/// One parameter's optimizer state.
struct Slot {
    name: String,
    len: usize,
    decay: bool,
    /// The state tensors, named `<param>.<suffix>` in checkpoints.
    tensors: Vec<Tensor>,
}

/// The state every optimizer keeps: one slot per parameter, in order, and the step count.
struct State {
    slots: Vec<Slot>,
    suffixes: &'static [&'static str],
    steps: u64,
    /// `[1]` holding 1: the clip scale of a step without clipping.
    one: Tensor,
}

impl State {
    fn new(
        gpu: &Gpu,
        params: &[&Param],
        suffixes: &'static [&'static str],
        decay: impl Fn(&Param) -> bool,
    ) -> Result<State> {
        let mut slots: Vec<Slot> = Vec::with_capacity(params.len());
        for p in params {
            if slots.iter().any(|s| s.name == p.name) {
                return Err(RuntimeError::Shape(format!(
                    "optimizer: two parameters are named `{}`; their state would share names",
                    p.name
                )));
            }
            // An empty parameter still gets one element: a buffer cannot hold no bytes.
            let zeros = vec![0.0; p.len().max(1)];
            let tensors = suffixes
                .iter()
                .map(|_| gpu.tensor_from(&[zeros.len()], &zeros))
                .collect::<Result<_>>()?;
            slots.push(Slot {
                name: p.name.clone(),
                len: p.len(),
                decay: decay(p),
                tensors,
            });
        }
        Ok(State {
            slots,
            suffixes,
            steps: 0,
            one: gpu.tensor_from(&[1], &[1.0])?,
        })
    }

    /// Fails unless `params` are the parameters the optimizer was made for, in order.
    fn check(&self, params: &[&Param]) -> Result<()> {
        let same = params.len() == self.slots.len()
            && params
                .iter()
                .zip(&self.slots)
                .all(|(p, s)| p.name == s.name && p.len() == s.len);
        if same {
            return Ok(());
        }
        let names = |it: &mut dyn Iterator<Item = &str>| it.collect::<Vec<_>>().join(", ");
        Err(RuntimeError::Shape(format!(
            "optimizer step: parameters [{}] are not the ones it was made for, [{}]",
            names(&mut params.iter().map(|p| p.name.as_str())),
            names(&mut self.slots.iter().map(|s| s.name.as_str()))
        )))
    }

    fn named(&self) -> Vec<(String, &Tensor)> {
        self.slots
            .iter()
            .flat_map(|s| {
                self.suffixes
                    .iter()
                    .zip(&s.tensors)
                    .map(move |(suffix, t)| (format!("{}.{suffix}", s.name), t))
            })
            .collect()
    }

    fn load(&mut self, gpu: &Gpu, steps: u64, values: &[(&str, &[f32])]) -> Result<()> {
        let named = self.named();
        for (name, _) in values {
            if !named.iter().any(|(n, _)| n == name) {
                return Err(RuntimeError::Shape(format!(
                    "optimizer state: no tensor named `{name}`"
                )));
            }
        }
        // Check everything before writing anything, so a failed load leaves the state as it was.
        let mut writes = Vec::with_capacity(named.len());
        for ((name, t), slot_len) in named.iter().zip(self.slot_lens()) {
            let mut given = values.iter().filter(|(n, _)| n == name);
            let (Some((_, data)), None) = (given.next(), given.next()) else {
                return Err(RuntimeError::Shape(format!(
                    "optimizer state: `{name}` must be given exactly once"
                )));
            };
            if data.len() != slot_len {
                return Err(RuntimeError::Shape(format!(
                    "optimizer state: `{name}` has {} values, its parameter {slot_len}",
                    data.len()
                )));
            }
            writes.push(((*t).clone(), *data));
        }
        for (t, data) in writes {
            gpu.write(&t, data)?;
        }
        self.steps = steps;
        Ok(())
    }

    /// The parameter length of each entry of `named`, in the same order.
    fn slot_lens(&self) -> Vec<usize> {
        self.slots
            .iter()
            .flat_map(|s| self.suffixes.iter().map(move |_| s.len))
            .collect()
    }
}

/// AdamW (Loshchilov & Hutter, "Decoupled Weight Decay Regularization"), as PyTorch's `AdamW`:
/// `p -= lr * (m_hat / (sqrt(v_hat) + eps) + wd * p)` with bias-corrected moments `m_hat`,
/// `v_hat`. The moments live on the device, one pair per parameter, and start at zero.
pub struct AdamW {
    config: AdamWConfig,
    state: State,
}

impl AdamW {
    /// An optimizer for `params` (names must be unique), decaying by [`decays_by_rank`].
    pub fn new(gpu: &Gpu, params: &[&Param], config: AdamWConfig) -> Result<AdamW> {
        Self::with_decay(gpu, params, config, decays_by_rank)
    }

    /// An optimizer for `params` in which `decay` chooses the parameters that get weight decay.
    pub fn with_decay(
        gpu: &Gpu,
        params: &[&Param],
        config: AdamWConfig,
        decay: impl Fn(&Param) -> bool,
    ) -> Result<AdamW> {
        Ok(AdamW {
            config,
            state: State::new(gpu, params, &["m", "v"], decay)?,
        })
    }

    /// Records one update of every parameter at rate `lr`, its gradients multiplied by
    /// `clip`'s scale when given, and zeroes the gradients. `params` must be the parameters
    /// the optimizer was made for, in the same order. The step count (for bias correction)
    /// advances when the step is recorded.
    pub fn step(
        &mut self,
        rec: &mut Recorder,
        params: &[&Param],
        lr: f32,
        clip: Option<&GradNorm>,
    ) -> Result<()> {
        self.state.check(params)?;
        self.state.steps += 1;
        let c = self.config;
        let t = self.state.steps as f64;
        let bias1 = 1.0 - (c.beta1 as f64).powf(t);
        let bias2 = 1.0 - (c.beta2 as f64).powf(t);
        let step_size = (lr as f64 / bias1) as f32;
        let v_scale = (1.0 / bias2.sqrt()) as f32;
        let scale = clip.map_or(&self.state.one, |g| &g.scale);
        for (p, slot) in params.iter().zip(&self.state.slots) {
            if p.is_empty() {
                continue;
            }
            let weight_decay = if slot.decay { c.weight_decay } else { 0.0 };
            let words = [
                p.len() as u32,
                lr.to_bits(),
                weight_decay.to_bits(),
                c.beta1.to_bits(),
                c.beta2.to_bits(),
                c.eps.to_bits(),
                step_size.to_bits(),
                v_scale.to_bits(),
            ];
            let (m, v) = (&slot.tensors[0], &slot.tensors[1]);
            rec.dispatch(
                &PipelineKey::new("optim", "adamw"),
                &words,
                &[
                    scale.bind(),
                    p.value.bind(),
                    p.grad.bind(),
                    m.bind(),
                    v.bind(),
                ],
                split_groups(rec.gpu(), p.len().div_ceil(WG) as u32, 1),
            )?;
        }
        Ok(())
    }

    /// Steps recorded so far (or loaded with [`load_state`](Self::load_state)).
    pub fn steps(&self) -> u64 {
        self.state.steps
    }

    /// The state tensors for a checkpoint, named `<param>.m` and `<param>.v`; save
    /// [`steps`](Self::steps) beside them.
    pub fn state(&self) -> Vec<(String, &Tensor)> {
        self.state.named()
    }

    /// Loads every tensor of [`state`](Self::state) (by name, each exactly once) and the step
    /// count. The writes reach the device before the next submit, so call this between submits.
    pub fn load_state(&mut self, gpu: &Gpu, steps: u64, values: &[(&str, &[f32])]) -> Result<()> {
        self.state.load(gpu, steps, values)
    }
}

/// SGD with heavy-ball momentum and decoupled weight decay: `b = momentum * b + g`,
/// `p -= lr * (b + wd * p)`. The momentum buffers live on the device, one per parameter, and
/// start at zero.
pub struct Sgd {
    config: SgdConfig,
    state: State,
}

impl Sgd {
    /// An optimizer for `params` (names must be unique), decaying by [`decays_by_rank`].
    pub fn new(gpu: &Gpu, params: &[&Param], config: SgdConfig) -> Result<Sgd> {
        Self::with_decay(gpu, params, config, decays_by_rank)
    }

    /// An optimizer for `params` in which `decay` chooses the parameters that get weight decay.
    pub fn with_decay(
        gpu: &Gpu,
        params: &[&Param],
        config: SgdConfig,
        decay: impl Fn(&Param) -> bool,
    ) -> Result<Sgd> {
        Ok(Sgd {
            config,
            state: State::new(gpu, params, &["momentum"], decay)?,
        })
    }

    /// Records one update of every parameter at rate `lr`, its gradients multiplied by
    /// `clip`'s scale when given, and zeroes the gradients. `params` must be the parameters
    /// the optimizer was made for, in the same order.
    pub fn step(
        &mut self,
        rec: &mut Recorder,
        params: &[&Param],
        lr: f32,
        clip: Option<&GradNorm>,
    ) -> Result<()> {
        self.state.check(params)?;
        self.state.steps += 1;
        let c = self.config;
        let scale = clip.map_or(&self.state.one, |g| &g.scale);
        for (p, slot) in params.iter().zip(&self.state.slots) {
            if p.is_empty() {
                continue;
            }
            let weight_decay = if slot.decay { c.weight_decay } else { 0.0 };
            let words = [
                p.len() as u32,
                lr.to_bits(),
                weight_decay.to_bits(),
                c.momentum.to_bits(),
            ];
            rec.dispatch(
                &PipelineKey::new("optim", "sgd"),
                &words,
                &[
                    scale.bind(),
                    p.value.bind(),
                    p.grad.bind(),
                    slot.tensors[0].bind(),
                ],
                split_groups(rec.gpu(), p.len().div_ceil(WG) as u32, 1),
            )?;
        }
        Ok(())
    }

    /// Steps recorded so far (or loaded with [`load_state`](Self::load_state)).
    pub fn steps(&self) -> u64 {
        self.state.steps
    }

    /// The state tensors for a checkpoint, named `<param>.momentum`; save
    /// [`steps`](Self::steps) beside them.
    pub fn state(&self) -> Vec<(String, &Tensor)> {
        self.state.named()
    }

    /// Loads every tensor of [`state`](Self::state) (by name, each exactly once) and the step
    /// count. The writes reach the device before the next submit, so call this between submits.
    pub fn load_state(&mut self, gpu: &Gpu, steps: u64, values: &[(&str, &[f32])]) -> Result<()> {
        self.state.load(gpu, steps, values)
    }
}

/// Linear warmup to `peak`, then cosine decay to `min` at step `total`, `min` after it.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct CosineSchedule {
    pub warmup: u64,
    pub total: u64,
    pub peak: f32,
    pub min: f32,
}

impl CosineSchedule {
    /// The rate of step `step` (counted from 0): `peak * (step + 1) / warmup` during the warmup
    /// (from `peak / warmup` up to `peak` at its last step), then
    /// `min + (peak - min) * (1 + cos(pi * s)) / 2` where `s` goes from 0 at step `warmup` to 1
    /// at step `total`.
    pub fn lr(&self, step: u64) -> f32 {
        if step < self.warmup {
            return (self.peak as f64 * (step + 1) as f64 / self.warmup as f64) as f32;
        }
        let span = self.total.saturating_sub(self.warmup);
        let s = if span == 0 {
            1.0
        } else {
            ((step - self.warmup) as f64 / span as f64).min(1.0)
        };
        let (peak, min) = (self.peak as f64, self.min as f64);
        (min + (peak - min) * 0.5 * (1.0 + (PI * s).cos())) as f32
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::autograd::check::assert_close;
    use crate::ops::test_util::gpu;
    use crate::testing::random_f32;

    /// A CPU copy of parameters and optimizer state, updated in f64.
    struct Reference {
        values: Vec<Vec<f64>>,
        moment1: Vec<Vec<f64>>,
        moment2: Vec<Vec<f64>>,
        steps: u64,
    }

    impl Reference {
        fn new(values: &[Vec<f32>]) -> Self {
            let zeros: Vec<Vec<f64>> = values.iter().map(|v| vec![0.0; v.len()]).collect();
            Reference {
                values: values
                    .iter()
                    .map(|v| v.iter().map(|&x| x as f64).collect())
                    .collect(),
                moment1: zeros.clone(),
                moment2: zeros,
                steps: 0,
            }
        }

        fn adamw(&mut self, c: AdamWConfig, decay: &[bool], grads: &[Vec<f32>], lr: f64, s: f64) {
            self.steps += 1;
            let t = self.steps as f64;
            let (b1, b2, eps) = (c.beta1 as f64, c.beta2 as f64, c.eps as f64);
            for (i, grad) in grads.iter().enumerate() {
                let wd = if decay[i] { c.weight_decay as f64 } else { 0.0 };
                for (j, &g) in grad.iter().enumerate() {
                    let g = g as f64 * s;
                    let m = b1 * self.moment1[i][j] + (1.0 - b1) * g;
                    let v = b2 * self.moment2[i][j] + (1.0 - b2) * g * g;
                    self.moment1[i][j] = m;
                    self.moment2[i][j] = v;
                    let (m_hat, v_hat) = (m / (1.0 - b1.powf(t)), v / (1.0 - b2.powf(t)));
                    let p = &mut self.values[i][j];
                    *p -= lr * (m_hat / (v_hat.sqrt() + eps) + wd * *p);
                }
            }
        }

        fn sgd(&mut self, c: SgdConfig, decay: &[bool], grads: &[Vec<f32>], lr: f64, s: f64) {
            for (i, grad) in grads.iter().enumerate() {
                let wd = if decay[i] { c.weight_decay as f64 } else { 0.0 };
                for (j, &g) in grad.iter().enumerate() {
                    let b = c.momentum as f64 * self.moment1[i][j] + g as f64 * s;
                    self.moment1[i][j] = b;
                    let p = &mut self.values[i][j];
                    *p -= lr * (b + wd * *p);
                }
            }
        }
    }

    fn norm_ref(grads: &[Vec<f32>]) -> f64 {
        grads
            .iter()
            .flatten()
            .map(|&g| g as f64 * g as f64)
            .sum::<f64>()
            .sqrt()
    }

    fn clip_ref(grads: &[Vec<f32>], max_norm: Option<f32>) -> f64 {
        max_norm.map_or(1.0, |c| (c as f64 / (norm_ref(grads) + 1e-6)).min(1.0))
    }

    /// A matrix that decays by rank, a vector that does not, and an odd-sized matrix.
    fn make_params(seed: u64) -> Vec<Param> {
        let gpu = gpu();
        [
            ("w", vec![7, 9]),
            ("gain", vec![13]),
            ("embed", vec![3, 301]),
        ]
        .iter()
        .enumerate()
        .map(|(i, (name, shape))| {
            let n = shape.iter().product();
            Param::new(gpu, name, shape, &random_f32(n, seed + i as u64)).unwrap()
        })
        .collect()
    }

    fn random_grads(params: &[&Param], seed: u64) -> Vec<Vec<f32>> {
        params
            .iter()
            .enumerate()
            .map(|(i, p)| random_f32(p.len(), seed * 31 + i as u64))
            .collect()
    }

    /// Chooses the parameters that get weight decay.
    type Decay = fn(&Param) -> bool;

    enum Opt {
        AdamW(AdamW),
        Sgd(Sgd),
    }

    impl Opt {
        fn step(
            &mut self,
            rec: &mut Recorder,
            params: &[&Param],
            lr: f32,
            clip: Option<&GradNorm>,
        ) {
            match self {
                Opt::AdamW(o) => o.step(rec, params, lr, clip),
                Opt::Sgd(o) => o.step(rec, params, lr, clip),
            }
            .unwrap()
        }

        fn state(&self) -> Vec<(String, &Tensor)> {
            match self {
                Opt::AdamW(o) => o.state(),
                Opt::Sgd(o) => o.state(),
            }
        }
    }

    /// Writes `grads`, records the norm (when clipping) and one step; returns the norm.
    fn run_step(
        opt: &mut Opt,
        params: &[&Param],
        grads: &[Vec<f32>],
        lr: f32,
        max_norm: Option<f32>,
    ) -> Option<f32> {
        let gpu = gpu();
        for (p, g) in params.iter().zip(grads) {
            gpu.write(&p.grad, g).unwrap();
        }
        let mut rec = Recorder::new(gpu);
        let clip = max_norm.map(|c| grad_norm(&mut rec, params, c).unwrap());
        opt.step(&mut rec, params, lr, clip.as_ref());
        rec.submit().unwrap();
        clip.map(|c| gpu.read(c.norm()).unwrap()[0])
    }

    #[test]
    fn adamw_and_sgd_match_the_reference_over_several_steps() {
        let gpu = gpu();
        let schedule = CosineSchedule {
            warmup: 2,
            total: 5,
            peak: 0.05,
            min: 0.005,
        };
        // No decay, decay by rank, decay chosen by name; no clip, one that does not bind
        // (the norm is about 18) and one that does.
        let cases: [(f32, Option<Decay>, Option<f32>); 5] = [
            (0.0, None, None),
            (0.1, None, None),
            (0.1, Some(|p| p.name != "embed"), None),
            (0.1, None, Some(1e6)),
            (0.3, Some(|p| p.name != "w"), Some(0.5)),
        ];
        for adam in [true, false] {
            for (case, &(weight_decay, decay_fn, max_norm)) in cases.iter().enumerate() {
                let owned = make_params(100 + case as u64);
                let params: Vec<&Param> = owned.iter().collect();
                let decay_fn = decay_fn.unwrap_or(decays_by_rank);
                let decay: Vec<bool> = params.iter().map(|p| decay_fn(p)).collect();
                let mut reference = Reference::new(
                    &params
                        .iter()
                        .map(|p| gpu.read(&p.value).unwrap())
                        .collect::<Vec<_>>(),
                );
                // Betas and momentum vary too, so a kernel that ignored them would fail.
                let adam_config = AdamWConfig {
                    weight_decay,
                    beta1: [0.9, 0.8, 0.9, 0.5, 0.9][case],
                    beta2: [0.999, 0.99, 0.999, 0.9, 0.999][case],
                    ..AdamWConfig::default()
                };
                let sgd_config = SgdConfig {
                    momentum: [0.9, 0.0, 0.5, 0.9, 0.7][case],
                    weight_decay,
                };
                let mut opt = if adam {
                    Opt::AdamW(AdamW::with_decay(gpu, &params, adam_config, decay_fn).unwrap())
                } else {
                    Opt::Sgd(Sgd::with_decay(gpu, &params, sgd_config, decay_fn).unwrap())
                };
                for step in 0..4 {
                    let grads = random_grads(&params, step * 7 + case as u64);
                    let lr = schedule.lr(step);
                    let norm = run_step(&mut opt, &params, &grads, lr, max_norm);
                    let scale = clip_ref(&grads, max_norm);
                    if let Some(norm) = norm {
                        assert_close("norm", &[norm], &[norm_ref(&grads)], 1e-5);
                    }
                    if adam {
                        reference.adamw(adam_config, &decay, &grads, lr as f64, scale);
                    } else {
                        reference.sgd(sgd_config, &decay, &grads, lr as f64, scale);
                    }
                    let what = format!("adam {adam}, case {case}, step {step}");
                    for (i, p) in params.iter().enumerate() {
                        let got = gpu.read(&p.value).unwrap();
                        assert_close(
                            &format!("{what}: {}", p.name),
                            &got,
                            &reference.values[i],
                            1e-5,
                        );
                        let grad = gpu.read(&p.grad).unwrap();
                        assert!(grad.iter().all(|&g| g == 0.0), "{what}: grad not cleared");
                    }
                }
                if let Opt::AdamW(o) = &opt {
                    assert_eq!(o.steps(), 4);
                    let state = o.state();
                    assert_eq!(state[1].0, "w.v");
                    assert_close(
                        "w.v",
                        &gpu.read(state[1].1).unwrap(),
                        &reference.moment2[0],
                        1e-5,
                    );
                }
            }
        }
    }

    #[test]
    fn grad_norm_matches_the_cpu_norm_over_odd_sizes_and_repeats_bit_for_bit() {
        let gpu = gpu();
        let owned: Vec<Param> = [1usize, 7, 1000, 70001]
            .iter()
            .enumerate()
            .map(|(i, &n)| Param::new(gpu, &format!("p{i}"), &[n], &vec![0.0; n]).unwrap())
            .collect();
        let params: Vec<&Param> = owned.iter().collect();
        let grads = random_grads(&params, 9);
        for (p, g) in params.iter().zip(&grads) {
            gpu.write(&p.grad, g).unwrap();
        }
        let want = norm_ref(&grads);
        let mut seen = Vec::new();
        for max_norm in [1e6, 10.0, 10.0] {
            let mut rec = Recorder::new(gpu);
            let gn = grad_norm(&mut rec, &params, max_norm).unwrap();
            rec.submit().unwrap();
            let (norm, scale) = (gpu.read(gn.norm()).unwrap(), gpu.read(gn.scale()).unwrap());
            assert_close("norm", &norm, &[want], 1e-5);
            assert_close("scale", &scale, &[clip_ref(&grads, Some(max_norm))], 1e-6);
            seen.push(norm[0].to_bits());
        }
        assert!(want > 10.0, "the second clip must bind");
        assert!(
            seen.iter().all(|&b| b == seen[0]),
            "norms differ between runs"
        );
        for (p, g) in params.iter().zip(&grads) {
            assert_eq!(
                &gpu.read(&p.grad).unwrap(),
                g,
                "grad_norm changed a gradient"
            );
        }
        let mut rec = Recorder::new(gpu);
        assert!(grad_norm(&mut rec, &params, 0.0).is_err());
        assert!(grad_norm(&mut rec, &params, f32::NAN).is_err());
    }

    #[test]
    fn a_loaded_state_reproduces_the_next_step_bit_for_bit() {
        let gpu = gpu();
        for adam in [true, false] {
            let make = |params: &[&Param]| {
                if adam {
                    Opt::AdamW(AdamW::new(gpu, params, AdamWConfig::default()).unwrap())
                } else {
                    let c = SgdConfig {
                        momentum: 0.9,
                        weight_decay: 0.05,
                    };
                    Opt::Sgd(Sgd::new(gpu, params, c).unwrap())
                }
            };
            let owned = make_params(7);
            let params: Vec<&Param> = owned.iter().collect();
            let mut first = make(&params);
            for step in 0..3 {
                run_step(
                    &mut first,
                    &params,
                    &random_grads(&params, step),
                    0.01,
                    Some(2.0),
                );
            }

            // A checkpoint: parameter values, state tensors and the step count.
            let values: Vec<Vec<f32>> =
                params.iter().map(|p| gpu.read(&p.value).unwrap()).collect();
            let saved: Vec<(String, Vec<f32>)> = first
                .state()
                .into_iter()
                .map(|(name, t)| (name, gpu.read(t).unwrap()))
                .collect();
            let restored: Vec<Param> = params
                .iter()
                .zip(&values)
                .map(|(p, v)| Param::new(gpu, &p.name, p.shape(), v).unwrap())
                .collect();
            let restored: Vec<&Param> = restored.iter().collect();
            let loaded: Vec<(&str, &[f32])> = saved
                .iter()
                .map(|(n, v)| (n.as_str(), v.as_slice()))
                .collect();
            let mut second = make(&restored);
            let mut fresh = make(&restored);
            match &mut second {
                Opt::AdamW(o) => o.load_state(gpu, 3, &loaded).unwrap(),
                Opt::Sgd(o) => o.load_state(gpu, 3, &loaded).unwrap(),
            }

            let grads = random_grads(&params, 99);
            run_step(&mut first, &params, &grads, 0.01, Some(2.0));
            let want: Vec<Vec<f32>> = params.iter().map(|p| gpu.read(&p.value).unwrap()).collect();
            run_step(&mut second, &restored, &grads, 0.01, Some(2.0));
            let got: Vec<Vec<f32>> = restored
                .iter()
                .map(|p| gpu.read(&p.value).unwrap())
                .collect();
            assert_eq!(got, want, "adam {adam}: resumed step differs");
            for ((name, a), (_, b)) in first.state().into_iter().zip(second.state()) {
                assert_eq!(gpu.read(a).unwrap(), gpu.read(b).unwrap(), "{name}");
            }

            // Without the state the same step lands elsewhere, so the comparison can fail.
            for (p, v) in restored.iter().zip(&values) {
                gpu.write(&p.value, v).unwrap();
            }
            run_step(&mut fresh, &restored, &grads, 0.01, Some(2.0));
            let other: Vec<Vec<f32>> = restored
                .iter()
                .map(|p| gpu.read(&p.value).unwrap())
                .collect();
            assert_ne!(other, want, "adam {adam}: state made no difference");
        }
    }

    #[test]
    fn steps_and_loads_reject_parameters_and_state_that_do_not_fit() {
        let gpu = gpu();
        let owned = make_params(1);
        let params: Vec<&Param> = owned.iter().collect();
        let mut opt = AdamW::new(gpu, &params, AdamWConfig::default()).unwrap();
        let mut rec = Recorder::new(gpu);
        let reversed: Vec<&Param> = params.iter().rev().copied().collect();
        assert!(opt.step(&mut rec, &reversed, 0.1, None).is_err());
        assert!(opt.step(&mut rec, &params[..2], 0.1, None).is_err());
        assert_eq!(opt.steps(), 0);

        let names: Vec<String> = opt.state().into_iter().map(|(n, _)| n).collect();
        assert_eq!(
            names,
            ["w.m", "w.v", "gain.m", "gain.v", "embed.m", "embed.v"]
        );
        let zeros: Vec<Vec<f32>> = opt
            .state()
            .iter()
            .map(|(_, t)| vec![0.0; t.len()])
            .collect();
        let full: Vec<(&str, &[f32])> = names
            .iter()
            .zip(&zeros)
            .map(|(n, z)| (n.as_str(), z.as_slice()))
            .collect();
        assert!(
            opt.load_state(gpu, 5, &full[1..]).is_err(),
            "a missing tensor"
        );
        let mut unknown = full.clone();
        unknown.push(("w.x", &zeros[0]));
        assert!(
            opt.load_state(gpu, 5, &unknown).is_err(),
            "an unknown tensor"
        );
        let mut short = full.clone();
        short[0].1 = &zeros[0][1..];
        assert!(opt.load_state(gpu, 5, &short).is_err(), "a wrong length");
        assert_eq!(opt.steps(), 0);
        opt.load_state(gpu, 5, &full).unwrap();
        assert_eq!(opt.steps(), 5);

        let twice = [&owned[0], &owned[0]];
        assert!(Sgd::new(
            gpu,
            &twice,
            SgdConfig {
                momentum: 0.0,
                weight_decay: 0.0
            }
        )
        .is_err());
    }

    #[test]
    fn cosine_schedule_warms_up_then_decays_to_its_minimum() {
        let s = CosineSchedule {
            warmup: 10,
            total: 110,
            peak: 1e-3,
            min: 1e-4,
        };
        let close = |a: f32, b: f64| (a as f64 - b).abs() <= 1e-9;
        assert!(close(s.lr(0), 1e-4), "first warmup step: {}", s.lr(0));
        assert!(close(s.lr(4), 5e-4));
        assert!(close(s.lr(9), 1e-3), "last warmup step: {}", s.lr(9));
        assert!(close(s.lr(10), 1e-3), "decay start: {}", s.lr(10));
        assert!(close(s.lr(60), 5.5e-4), "middle: {}", s.lr(60));
        assert!(close(
            s.lr(35),
            1e-4 + 9e-4 * (1.0 + (PI / 4.0).cos()) / 2.0
        ));
        assert!(close(s.lr(110), 1e-4), "end: {}", s.lr(110));
        assert!(close(s.lr(500), 1e-4), "after the end: {}", s.lr(500));
        assert!((10..110).all(|t| s.lr(t + 1) <= s.lr(t)));
    }
}
