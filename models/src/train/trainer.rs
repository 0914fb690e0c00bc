//! The training loop: batches of bytes through the model on a tape, the backward pass,
//! clipping by global norm and an AdamW step, all recorded into one submit per micro-batch
//! group; the loss and gradient norm are the only values read back.

use std::time::Instant;

use tessera_runtime::autograd::Tape;
use tessera_runtime::optim::{grad_norm, AdamW, AdamWConfig, CosineSchedule};
use tessera_runtime::Gpu;

use super::data::Corpus;
use super::lm::LmModel;
use super::{Result, TrainError};

/// How to train.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct TrainConfig {
    pub steps: u64,
    /// Sequences per step.
    pub batch: usize,
    /// Sequences per submit; the step's gradient accumulates over `batch / micro_batch` of them.
    pub micro_batch: usize,
    pub lr: f32,
    pub min_lr: f32,
    pub warmup: u64,
    pub weight_decay: f32,
    pub beta1: f32,
    pub beta2: f32,
    pub eps: f32,
    /// Clip gradients to this global L2 norm.
    pub clip: f32,
    pub seed: u64,
    pub eval_every: u64,
    pub eval_batches: usize,
    /// The training text as given (`--data`), so a resumed run reads the same one.
    #[serde(default)]
    pub data: String,
    /// Save a checkpoint every N steps (0: after the last only).
    #[serde(default)]
    pub save_every: u64,
}

impl Default for TrainConfig {
    fn default() -> Self {
        TrainConfig {
            steps: 600,
            batch: 16,
            micro_batch: 16,
            lr: 3e-3,
            min_lr: 3e-4,
            warmup: 50,
            weight_decay: 0.1,
            beta1: 0.9,
            beta2: 0.95,
            eps: 1e-8,
            clip: 1.0,
            seed: 42,
            eval_every: 100,
            eval_batches: 8,
            data: "tinyshakespeare".into(),
            save_every: 100,
        }
    }
}

impl TrainConfig {
    pub fn check(&self) -> Result<()> {
        let bad = |m: &str| Err(TrainError::Config(m.to_string()));
        if self.batch == 0 || self.micro_batch == 0 || !self.batch.is_multiple_of(self.micro_batch)
        {
            return bad("--batch must be a positive multiple of --micro-batch");
        }
        if !(self.lr > 0.0 && self.lr.is_finite() && self.min_lr >= 0.0 && self.min_lr <= self.lr) {
            return bad("the learning rate must be positive and finite, with 0 <= min <= peak");
        }
        let positive = |v: f32| v.is_finite() && v > 0.0;
        if !(positive(self.clip) && self.weight_decay.is_finite() && self.weight_decay >= 0.0) {
            return bad("--clip must be positive and --weight-decay at least 0");
        }
        if self.eval_batches == 0 {
            return bad("--eval-batches must be at least 1");
        }
        if self.steps == 0 {
            return bad("--steps must be at least 1");
        }
        if self.batch > 4096 {
            return bad("--batch is at most 4096 sequences");
        }
        Ok(())
    }

    pub fn schedule(&self) -> CosineSchedule {
        CosineSchedule {
            warmup: self.warmup,
            total: self.steps,
            peak: self.lr,
            min: self.min_lr,
        }
    }
}

/// One step's figures.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct StepStats {
    /// Steps done after this one.
    pub step: u64,
    /// Mean cross-entropy of the step's batch, nats per byte.
    pub loss: f32,
    /// Global gradient norm before clipping.
    pub grad_norm: f32,
    pub lr: f32,
    /// Held-out loss, when evaluated after this step.
    pub val_loss: Option<f32>,
    pub seconds: f64,
}

/// A model, its optimizer and where training stands.
pub struct Trainer {
    pub model: LmModel,
    pub opt: AdamW,
    pub config: TrainConfig,
    /// Steps done.
    pub step: u64,
    pub history: Vec<StepStats>,
}

impl Trainer {
    pub fn new(gpu: &Gpu, model: LmModel, config: TrainConfig) -> Result<Trainer> {
        config.check()?;
        let opt = AdamW::new(
            gpu,
            &model.param_refs(),
            AdamWConfig {
                beta1: config.beta1,
                beta2: config.beta2,
                eps: config.eps,
                weight_decay: config.weight_decay,
            },
        )?;
        Ok(Trainer {
            model,
            opt,
            config,
            step: 0,
            history: Vec::new(),
        })
    }

    /// Runs one optimizer step on the batch of step `self.step`.
    pub fn step(&mut self, gpu: &Gpu, corpus: &Corpus) -> Result<StepStats> {
        let start = Instant::now();
        let c = &self.config;
        let seq = self.model.config.ctx;
        let batch = corpus.train_batch(c.seed, self.step, c.batch, seq);
        let lr = c.schedule().lr(self.step);
        let per = c.micro_batch * seq;
        let scale = 1.0 / (c.batch * seq) as f32;
        let groups = c.batch / c.micro_batch;
        let (mut loss, mut norm) = (0.0f32, 0.0f32);
        for g in 0..groups {
            let range = g * per..(g + 1) * per;
            let mut tape = Tape::new(gpu);
            let l = self.model.loss(
                &mut tape,
                &batch.inputs[range.clone()],
                &batch.targets[range],
                c.micro_batch,
                seq,
                scale,
            )?;
            tape.backward(l)?;
            let loss_read = tape.read(l);
            let mut norm_read = None;
            if g + 1 == groups {
                let params = self.model.param_refs();
                let gn = grad_norm(tape.recorder(), &params, c.clip)?;
                norm_read = Some(tape.recorder().read(gn.norm(), 0, 1));
                self.opt.step(tape.recorder(), &params, lr, Some(&gn))?;
            }
            let out = tape.submit()?;
            loss += f32_of(&out[loss_read.index()]);
            if let Some(r) = norm_read {
                norm = f32_of(&out[r.index()]);
            }
        }
        if !loss.is_finite() || !norm.is_finite() {
            return Err(TrainError::Data(format!(
                "training diverged at step {}: loss {loss}, gradient norm {norm}; nothing of \
                 this step is saved; lower --lr or --weight-decay, or raise --warmup",
                self.step
            )));
        }
        self.step += 1;
        let mut stats = StepStats {
            step: self.step,
            loss,
            grad_norm: norm,
            lr,
            val_loss: None,
            seconds: start.elapsed().as_secs_f64(),
        };
        let c = &self.config;
        if c.eval_every > 0 && (self.step.is_multiple_of(c.eval_every) || self.step == c.steps) {
            let val = self.evaluate(gpu, corpus)?;
            if !val.is_finite() {
                return Err(TrainError::Data(format!(
                    "the held-out loss is {val} at step {}: the weights are no longer finite; \
                     lower --lr or --weight-decay, or raise --warmup",
                    self.step
                )));
            }
            stats.val_loss = Some(val);
        }
        self.history.push(stats.clone());
        Ok(stats)
    }

    /// Mean cross-entropy over the fixed held-out batches, nats per byte.
    pub fn evaluate(&self, gpu: &Gpu, corpus: &Corpus) -> Result<f32> {
        let c = &self.config;
        let seq = self.model.config.ctx;
        let n = c.eval_batches;
        let mut total = 0.0f64;
        for i in 0..n {
            let b = corpus.val_batch(i, n, c.micro_batch, seq);
            let mut tape = Tape::no_grad(gpu);
            let scale = 1.0 / (c.micro_batch * seq) as f32;
            let l = self
                .model
                .loss(&mut tape, &b.inputs, &b.targets, c.micro_batch, seq, scale)?;
            let r = tape.read(l);
            total += f32_of(&tape.submit()?[r.index()]) as f64;
        }
        Ok((total / n as f64) as f32)
    }
}

fn f32_of(bytes: &[u8]) -> f32 {
    f32::from_le_bytes(bytes[..4].try_into().expect("a read of one f32"))
}
