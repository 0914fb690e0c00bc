//! Burn's half of the Tessera-vs-Burn training comparison.
//!
//! Trains the same ~0.92M-parameter byte-level llama model that `tessera train lm` trains (same
//! shapes, initialisation, batches, optimiser and schedule; see README.md) with Burn's wgpu
//! backend, printing the loss and the wall time of every step and a closing JSON line with the
//! figures to compare. A measurement tool, not part of the product.

use std::f64::consts::PI;
use std::path::PathBuf;
use std::time::Instant;

use burn::module::{Module, ModuleVisitor, Param, ParamGroup, ParamId};
use burn::nn::loss::CrossEntropyLossConfig;
use burn::nn::{
    Embedding, EmbeddingConfig, Initializer, Linear, LinearConfig, RmsNorm, RmsNormConfig,
    RotaryEncoding, RotaryEncodingConfig,
};
use burn::optim::{AdamWConfig, GradientsParams, ModuleOptimizer};
use burn::prelude::*;
use burn::tensor::activation::silu;
use burn::tensor::module::attention;
use burn::tensor::ops::AttentionModuleOptions;

/// Vocabulary: raw bytes.
const VOCAB: usize = 256;
/// Model width.
const D_MODEL: usize = 128;
/// Attention heads.
const N_HEADS: usize = 4;
/// Width of one head.
const HEAD_DIM: usize = D_MODEL / N_HEADS;
/// Hidden width of the SwiGLU MLP.
const D_FF: usize = 384;
/// Transformer blocks.
const N_LAYERS: usize = 4;
/// RMSNorm epsilon.
const NORM_EPS: f64 = 1e-5;
/// RoPE base.
const ROPE_THETA: f32 = 10_000.0;
/// Standard deviation of the normal initialisation of every weight matrix and the embedding.
const INIT_STD: f64 = 0.02;

/// Sequences per batch.
const BATCH: usize = 16;
/// Input bytes per sequence (the targets are the same window shifted by one byte).
const SEQ: usize = 128;
/// Batches in the fixed validation set.
const VAL_BATCHES: usize = 8;

/// Peak learning rate, reached at the last warmup step.
const LR_PEAK: f64 = 3e-3;
/// Learning rate at the last step.
const LR_MIN: f64 = 3e-4;
/// Linear warmup steps.
const WARMUP: usize = 50;
/// AdamW first-moment decay.
const BETA1: f32 = 0.9;
/// AdamW second-moment decay.
const BETA2: f32 = 0.95;
/// AdamW epsilon (added to the square root of the second moment).
const ADAM_EPS: f32 = 1e-8;
/// Decoupled weight decay, applied to the 2-D weights (matrices and embedding) only.
const WEIGHT_DECAY: f32 = 0.1;
/// Largest global L2 norm of the gradient; larger gradients are scaled down to it.
const CLIP_NORM: f64 = 1.0;

/// Command-line settings.
struct Args {
    data: PathBuf,
    steps: usize,
    eval_every: usize,
    seed: u64,
}

impl Args {
    fn parse() -> Result<Self, String> {
        let mut data = None;
        let mut steps = 600;
        let mut eval_every = 100;
        let mut seed = 0;
        let mut it = std::env::args().skip(1);
        while let Some(flag) = it.next() {
            let mut value = || it.next().ok_or_else(|| format!("{flag} needs a value"));
            match flag.as_str() {
                "--data" => data = Some(PathBuf::from(value()?)),
                "--steps" => steps = parse_num(&flag, &value()?)?,
                "--eval-every" => eval_every = parse_num(&flag, &value()?)?,
                "--seed" => seed = parse_num(&flag, &value()?)?,
                "-h" | "--help" => {
                    println!(
                        "usage: burn-compare --data FILE [--steps N (600)] \
                         [--eval-every N (100)] [--seed N (0)]"
                    );
                    std::process::exit(0);
                }
                other => return Err(format!("unknown argument {other:?} (see --help)")),
            }
        }
        let data = data.ok_or("--data FILE is required (tinyshakespeare.txt)")?;
        if steps == 0 || eval_every == 0 {
            return Err("--steps and --eval-every must be positive".into());
        }
        Ok(Self {
            data,
            steps,
            eval_every,
            seed,
        })
    }
}

fn parse_num<T: std::str::FromStr>(flag: &str, text: &str) -> Result<T, String> {
    text.parse()
        .map_err(|_| format!("{flag}: not a number: {text:?}"))
}

/// SplitMix64: a small, well-mixed generator for the batch offsets.
struct SplitMix64(u64);

impl SplitMix64 {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n` (the modulo bias is below 2^-40 for the sizes used here).
    fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n as u64) as usize
    }
}

/// One batch as row-major `[BATCH, SEQ]` inputs and targets (the next byte of each input).
struct Batch {
    inputs: Vec<i64>,
    targets: Vec<i64>,
}

impl Batch {
    /// Cuts `BATCH` windows of `SEQ + 1` bytes starting at `offsets`.
    fn from_offsets(split: &[u8], offsets: &[usize]) -> Self {
        let mut inputs = Vec::with_capacity(BATCH * SEQ);
        let mut targets = Vec::with_capacity(BATCH * SEQ);
        for &at in offsets {
            let window = &split[at..at + SEQ + 1];
            inputs.extend(window[..SEQ].iter().map(|&b| i64::from(b)));
            targets.extend(window[1..].iter().map(|&b| i64::from(b)));
        }
        Self { inputs, targets }
    }

    /// Uploads the batch: `[BATCH, SEQ]` inputs and flat `[BATCH * SEQ]` targets.
    fn to_device(&self, device: &Device) -> (Tensor<2, Int>, Tensor<1, Int>) {
        let inputs = Tensor::from_data(TensorData::new(self.inputs.clone(), [BATCH, SEQ]), device);
        let targets =
            Tensor::from_data(TensorData::new(self.targets.clone(), [BATCH * SEQ]), device);
        (inputs, targets)
    }
}

/// A bias-free linear layer with normal(0, `std`) weights.
fn linear(d_in: usize, d_out: usize, std: f64, device: &Device) -> Linear {
    LinearConfig::new(d_in, d_out)
        .with_bias(false)
        .with_initializer(Initializer::Normal { mean: 0.0, std })
        .init(device)
}

/// One pre-norm llama block: attention and SwiGLU MLP, each around a residual.
#[derive(Module, Debug)]
struct Block {
    attn_norm: RmsNorm,
    wq: Linear,
    wk: Linear,
    wv: Linear,
    wo: Linear,
    mlp_norm: RmsNorm,
    gate: Linear,
    up: Linear,
    down: Linear,
}

impl Block {
    fn new(device: &Device) -> Self {
        // GPT-2's scaling of the projections that write into the residual stream.
        let out_std = INIT_STD / ((2 * N_LAYERS) as f64).sqrt();
        let norm = || {
            RmsNormConfig::new(D_MODEL)
                .with_epsilon(NORM_EPS)
                .init(device)
        };
        Self {
            attn_norm: norm(),
            wq: linear(D_MODEL, D_MODEL, INIT_STD, device),
            wk: linear(D_MODEL, D_MODEL, INIT_STD, device),
            wv: linear(D_MODEL, D_MODEL, INIT_STD, device),
            wo: linear(D_MODEL, D_MODEL, out_std, device),
            mlp_norm: norm(),
            gate: linear(D_MODEL, D_FF, INIT_STD, device),
            up: linear(D_MODEL, D_FF, INIT_STD, device),
            down: linear(D_FF, D_MODEL, out_std, device),
        }
    }

    fn forward(&self, x: Tensor<3>, rope: &RotaryEncoding) -> Tensor<3> {
        let [b, t, _] = x.dims();
        let heads = |y: Tensor<3>| y.reshape([b, t, N_HEADS, HEAD_DIM]).swap_dims(1, 2);
        let h = self.attn_norm.forward(x.clone());
        let q = rope.forward(heads(self.wq.forward(h.clone())));
        let k = rope.forward(heads(self.wk.forward(h.clone())));
        let v = heads(self.wv.forward(h));
        let causal = AttentionModuleOptions {
            scale: None,
            softcap: None,
            is_causal: true,
        };
        let a = attention(q, k, v, None, None, causal)
            .swap_dims(1, 2)
            .reshape([b, t, D_MODEL]);
        let x = x + self.wo.forward(a);
        let h = self.mlp_norm.forward(x.clone());
        let m = silu(self.gate.forward(h.clone())) * self.up.forward(h);
        x + self.down.forward(m)
    }
}

/// The whole language model: embedding, blocks, final norm, untied output projection.
#[derive(Module, Debug)]
struct Lm {
    embed: Embedding,
    blocks: Vec<Block>,
    norm: RmsNorm,
    output: Linear,
}

impl Lm {
    fn new(device: &Device) -> Self {
        Self {
            embed: EmbeddingConfig::new(VOCAB, D_MODEL)
                .with_initializer(Initializer::Normal {
                    mean: 0.0,
                    std: INIT_STD,
                })
                .init(device),
            blocks: (0..N_LAYERS).map(|_| Block::new(device)).collect(),
            norm: RmsNormConfig::new(D_MODEL)
                .with_epsilon(NORM_EPS)
                .init(device),
            output: linear(D_MODEL, VOCAB, INIT_STD, device),
        }
    }

    /// Logits `[b, t, VOCAB]` for input bytes `[b, t]`.
    fn forward(&self, tokens: Tensor<2, Int>, rope: &RotaryEncoding) -> Tensor<3> {
        let mut x = self.embed.forward(tokens);
        for block in &self.blocks {
            x = block.forward(x, rope);
        }
        self.output.forward(self.norm.forward(x))
    }

    /// Mean cross-entropy in nats of predicting `targets` (flat `[b * t]`).
    fn loss(
        &self,
        tokens: Tensor<2, Int>,
        targets: Tensor<1, Int>,
        rope: &RotaryEncoding,
    ) -> Tensor<1> {
        let logits = self.forward(tokens, rope);
        let [b, t, v] = logits.dims();
        let device = logits.device();
        CrossEntropyLossConfig::new()
            .init(&device)
            .forward(logits.reshape([b * t, v]), targets)
    }

    /// The RMSNorm gains: the 1-D parameters, trained without weight decay.
    fn gain_ids(&self) -> Vec<ParamId> {
        let blocks = self
            .blocks
            .iter()
            .flat_map(|b| [b.attn_norm.gamma.id, b.mlp_norm.gamma.id]);
        blocks.chain([self.norm.gamma.id]).collect()
    }
}

/// Adds up the squared gradient of every parameter (on the device, no read-back).
struct SquaredNorm<'a> {
    grads: &'a GradientsParams,
    total: Option<Tensor<1>>,
}

impl ModuleVisitor for SquaredNorm<'_> {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        if let Some(grad) = self.grads.get::<D>(param.id) {
            let sum = grad.square().sum();
            self.total = Some(match self.total.take() {
                Some(total) => total + sum,
                None => sum,
            });
        }
    }
}

/// Multiplies every parameter's gradient by a one-element device tensor.
struct ScaleGrads<'a> {
    grads: &'a mut GradientsParams,
    scale: Tensor<1>,
}

impl ModuleVisitor for ScaleGrads<'_> {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        if let Some(grad) = self.grads.remove::<D>(param.id) {
            let scale = self.scale.clone().unsqueeze::<D>();
            self.grads.register(param.id, grad * scale);
        }
    }
}

/// Clips the gradient to a global L2 norm of `CLIP_NORM`, as PyTorch's `clip_grad_norm_`
/// does: every gradient is multiplied by `min(1, CLIP_NORM / (norm + 1e-6))`. (Burn's own
/// `GradientClipping::Norm` clips each parameter's gradient separately, which is a different
/// rule.) Returns the norm before clipping, still on the device.
fn clip_global_norm(model: &Lm, grads: &mut GradientsParams) -> Tensor<1> {
    let mut squared = SquaredNorm { grads, total: None };
    model.visit(&mut squared);
    let norm = squared
        .total
        .expect("the model has parameters with gradients")
        .sqrt();
    let scale = (norm.clone() + 1e-6)
        .recip()
        .mul_scalar(CLIP_NORM)
        .clamp_max(1.0);
    model.visit(&mut ScaleGrads { grads, scale });
    norm
}

/// Learning rate of 0-based step `step` of `steps`: linear warmup to `LR_PEAK` over the first
/// `WARMUP` steps (step `WARMUP - 1` uses the peak), then a half cosine from the peak to `LR_MIN`
/// at the last step, `steps - 1`.
fn learning_rate(step: usize, steps: usize) -> f64 {
    if step < WARMUP {
        return LR_PEAK * (step + 1) as f64 / WARMUP as f64;
    }
    let span = steps - WARMUP; // > 0 because step >= WARMUP and step < steps
    let progress = (step + 1 - WARMUP) as f64 / span as f64;
    LR_MIN + 0.5 * (LR_PEAK - LR_MIN) * (1.0 + (PI * progress).cos())
}

/// Mean validation loss over the fixed validation batches, without autodiff.
fn validate(model: &Lm, batches: &[Batch], rope: &RotaryEncoding, device: &Device) -> f64 {
    let model = model.valid();
    let mut total = 0.0;
    for batch in batches {
        let (inputs, targets) = batch.to_device(device);
        total += f64::from(model.loss(inputs, targets, rope).into_scalar::<f32>());
    }
    total / batches.len() as f64
}

/// CPU time used so far by the whole process (all threads, lavapipe's included) in
/// milliseconds, from `/proc/self/stat` (utime + stime, in the kernel's fixed 100 Hz `USER_HZ`);
/// `None` where that file is missing. On a shared machine this is less disturbed by other
/// processes than the wall time.
fn process_cpu_ms() -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // The fields after the parenthesised command name; utime and stime are fields 14 and 15.
    let rest = &stat[stat.rfind(')')? + 2..];
    let mut fields = rest.split_whitespace().skip(11);
    let utime: f64 = fields.next()?.parse().ok()?;
    let stime: f64 = fields.next()?.parse().ok()?;
    Some((utime + stime) * 10.0)
}

fn median(values: &[f64]) -> f64 {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    let n = sorted.len();
    if n % 2 == 1 {
        sorted[n / 2]
    } else {
        0.5 * (sorted[n / 2 - 1] + sorted[n / 2])
    }
}

/// A JSON string literal.
fn json_str(text: &str) -> String {
    let mut out = String::from("\"");
    for c in text.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// A JSON number (non-finite values, which JSON lacks, become null).
fn json_num(x: f64) -> String {
    if x.is_finite() {
        format!("{x}")
    } else {
        "null".into()
    }
}

fn main() {
    let args = Args::parse().unwrap_or_else(|e| {
        eprintln!("burn-compare: {e}");
        std::process::exit(2);
    });
    let text = std::fs::read(&args.data).unwrap_or_else(|e| {
        eprintln!("burn-compare: cannot read {}: {e}", args.data.display());
        std::process::exit(1);
    });
    let split_at = text.len() * 9 / 10;
    let (train, val) = text.split_at(split_at);
    if val.len() < SEQ + 1 + BATCH * VAL_BATCHES {
        eprintln!(
            "burn-compare: {} is too small ({} bytes)",
            args.data.display(),
            text.len()
        );
        std::process::exit(1);
    }

    let (device, setup) = Device::wgpu_options()
        .init_with_setup()
        .unwrap_or_else(|e| {
            eprintln!("burn-compare: no wgpu device: {e}");
            std::process::exit(1);
        });
    let info = setup.adapter.get_info();
    let adapter = format!(
        "{} ({:?}, {:?}, {})",
        info.name, info.backend, info.device_type, info.driver_info
    );
    println!("burn {} on {adapter}", env!("BURN_VERSION"));
    println!(
        "data {}: {} bytes, train {} / val {}",
        args.data.display(),
        text.len(),
        train.len(),
        val.len()
    );
    device.seed(args.seed);
    let plain = device.clone();
    let device = device.autodiff();

    let rope_train = RotaryEncodingConfig::new(SEQ, HEAD_DIM)
        .with_theta(ROPE_THETA)
        .init(&device);
    let rope_eval = RotaryEncodingConfig::new(SEQ, HEAD_DIM)
        .with_theta(ROPE_THETA)
        .init(&plain);
    let mut model = Lm::new(&device);
    println!("model: {} parameters", model.num_params());

    let decayed = AdamWConfig::new()
        .with_beta_1(BETA1)
        .with_beta_2(BETA2)
        .with_epsilon(ADAM_EPS)
        .with_weight_decay(WEIGHT_DECAY);
    let undecayed = AdamWConfig::new()
        .with_beta_1(BETA1)
        .with_beta_2(BETA2)
        .with_epsilon(ADAM_EPS)
        .with_weight_decay(0.0);
    let mut optim: ModuleOptimizer = decayed.init().with_group(
        ParamGroup::from_ids(model.gain_ids()),
        undecayed.build(),
        None,
    );

    // The validation set: VAL_BATCHES * BATCH windows spread evenly over the held-out bytes.
    let windows = VAL_BATCHES * BATCH;
    let last_start = val.len() - (SEQ + 1);
    let val_offsets: Vec<usize> = (0..windows)
        .map(|i| i * last_start / (windows - 1))
        .collect();
    let val_batches: Vec<Batch> = val_offsets
        .chunks(BATCH)
        .map(|offs| Batch::from_offsets(val, offs))
        .collect();

    let mut rng = SplitMix64(args.seed);
    let mut step_ms = Vec::with_capacity(args.steps);
    let mut step_cpu_ms = Vec::with_capacity(args.steps);
    let mut last_loss = f64::NAN;
    let mut val_loss = f64::NAN;
    let mut val_at = 0;
    let run_start = Instant::now();
    for step in 0..args.steps {
        let start = Instant::now();
        let cpu_start = process_cpu_ms();
        let offsets: Vec<usize> = (0..BATCH).map(|_| rng.below(train.len() - SEQ)).collect();
        let (inputs, targets) = Batch::from_offsets(train, &offsets).to_device(&device);
        let lr = learning_rate(step, args.steps);

        let loss = model.loss(inputs, targets, &rope_train);
        let mut grads = GradientsParams::from_grads(loss.backward(), &model);
        let norm = clip_global_norm(&model, &mut grads);
        model = optim.step(lr, model, grads);
        device.sync().expect("training step failed on the device");
        let loss = f64::from(loss.into_scalar::<f32>());
        let norm = f64::from(norm.into_scalar::<f32>());
        let ms = start.elapsed().as_secs_f64() * 1e3;
        let cpu_ms = process_cpu_ms()
            .zip(cpu_start)
            .map_or(f64::NAN, |(end, start)| end - start);
        step_ms.push(ms);
        step_cpu_ms.push(cpu_ms);
        last_loss = loss;
        println!(
            "step {:4} loss {loss:.4} lr {lr:.3e} grad_norm {norm:.3} {ms:.1} ms \
             (cpu {cpu_ms:.0} ms)",
            step + 1
        );

        if (step + 1) % args.eval_every == 0 || step + 1 == args.steps {
            val_loss = validate(&model, &val_batches, &rope_eval, &plain);
            val_at = step + 1;
            println!("step {:4} val_loss {val_loss:.4}", step + 1);
        }
    }
    let wall_s = run_start.elapsed().as_secs_f64();

    let mean = step_ms.iter().sum::<f64>() / step_ms.len() as f64;
    println!(
        "{{\"steps\":{},\"final_train_loss\":{},\"val_loss\":{},\"val_loss_at_step\":{},\
         \"ms_per_step_median\":{},\"ms_per_step_mean\":{},\"first_step_ms\":{},\
         \"cpu_ms_per_step_median\":{},\"wall_s\":{},\"params\":{},\"device\":{},\
         \"backend\":{},\"burn_version\":{}}}",
        args.steps,
        json_num(last_loss),
        json_num(val_loss),
        val_at,
        json_num(median(&step_ms)),
        json_num(mean),
        json_num(step_ms[0]),
        json_num(median(&step_cpu_ms)),
        json_num(wall_s),
        model.num_params(),
        json_str(&adapter),
        json_str(&format!("burn wgpu ({:?})", setup.backend)),
        json_str(env!("BURN_VERSION")),
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schedule_warms_up_to_the_peak_then_decays_to_the_floor_at_the_last_step() {
        let steps = 600;
        assert!((learning_rate(0, steps) - LR_PEAK / WARMUP as f64).abs() < 1e-15);
        assert!((learning_rate(WARMUP - 1, steps) - LR_PEAK).abs() < 1e-15);
        assert!((learning_rate(steps - 1, steps) - LR_MIN).abs() < 1e-15);
        let mut prev = learning_rate(WARMUP - 1, steps);
        for step in WARMUP..steps {
            let lr = learning_rate(step, steps);
            assert!(lr < prev, "step {step}: {lr} not below {prev}");
            prev = lr;
        }
    }

    #[test]
    fn batches_pair_each_byte_with_the_next() {
        let split: Vec<u8> = (0..=255).collect();
        let offsets: Vec<usize> = (0..BATCH).map(|i| i * 7).collect();
        let batch = Batch::from_offsets(&split, &offsets);
        assert_eq!(batch.inputs.len(), BATCH * SEQ);
        for (i, &at) in offsets.iter().enumerate() {
            assert_eq!(batch.inputs[i * SEQ], at as i64);
            assert_eq!(batch.targets[i * SEQ + SEQ - 1], (at + SEQ) as i64);
        }
    }

    #[test]
    fn json_strings_escape_quotes_backslashes_and_controls() {
        assert_eq!(json_str("a\"b\\c\n"), "\"a\\\"b\\\\c\\u000a\"");
        assert_eq!(json_num(f64::NAN), "null");
        assert_eq!(json_num(2.5), "2.5");
    }

    #[test]
    fn process_cpu_time_grows_with_work() {
        let before = process_cpu_ms().expect("/proc/self/stat is readable on Linux");
        let mut x = 0u64;
        let start = Instant::now();
        while start.elapsed().as_millis() < 100 {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(std::hint::black_box(1));
        }
        std::hint::black_box(x);
        let after = process_cpu_ms().unwrap();
        assert!(after >= before, "{after} < {before}");
        assert!(
            after - before <= 1000.0,
            "{} ms of CPU for 100 ms of wall",
            after - before
        );
    }

    #[test]
    fn median_of_odd_and_even_counts() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&[4.0, 1.0, 3.0, 2.0]), 2.5);
    }
}
