//! `tessera train`: train a small byte-level llama from scratch (`lm`), and export a
//! checkpoint to GGUF (`export`).

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand};
use indicatif::{ProgressBar, ProgressStyle};
use tessera_models::hf;
use tessera_models::llm::sampler::SamplerConfig;
use tessera_models::llm::{LoadedModel, Session};
use tessera_models::train::{self, Corpus, LmConfig, LmModel, StepStats, TrainConfig, Trainer};
use tessera_runtime::DeviceSelector;

use crate::progress::bytes_bar;
use crate::{note, open_gpu, out};

#[derive(Subcommand)]
pub(crate) enum TrainCommand {
    /// Train a small llama-family language model over bytes, from scratch.
    Lm(LmArgs),
    /// Write a checkpoint (or a run's newest one) as a GGUF file that Tessera and llama.cpp run.
    Export(ExportArgs),
}

#[derive(Args)]
pub(crate) struct LmArgs {
    /// Training text: a file (its last 10% is held out for validation), or `tinyshakespeare`
    /// (built in: the first 256 KiB of tinyshakespeare, validated on its last 10%).
    #[arg(long, default_value = "tinyshakespeare")]
    data: String,

    /// Model size: tiny (~30K parameters), 1m (~0.92M), 4m (~4.6M).
    #[arg(long, default_value = "1m")]
    size: String,

    /// Optimizer steps in all (a resumed run counts the steps already done).
    #[arg(long, default_value_t = 600)]
    steps: u64,

    /// Sequences per step.
    #[arg(long, default_value_t = 16)]
    batch: usize,

    /// Sequences per submit (the step's gradient accumulates over batch / micro-batch of them);
    /// defaults to the whole batch.
    #[arg(long)]
    micro_batch: Option<usize>,

    /// Bytes per sequence, and the model's context.
    #[arg(long, default_value_t = 128)]
    seq_len: usize,

    /// Peak learning rate (AdamW), reached after the warmup.
    #[arg(long, default_value_t = 3e-3)]
    lr: f32,

    /// Learning rate at the last step (cosine decay from the peak).
    #[arg(long, default_value_t = 3e-4)]
    min_lr: f32,

    /// Warmup steps (linear from 0 to the peak).
    #[arg(long, default_value_t = 50)]
    warmup: u64,

    /// Decoupled weight decay, on matrices only.
    #[arg(long, default_value_t = 0.1)]
    weight_decay: f32,

    /// Clip gradients to this global L2 norm.
    #[arg(long, default_value_t = 1.0)]
    clip: f32,

    /// Seed of the initial weights and of the batches.
    #[arg(long, default_value_t = 42)]
    seed: u64,

    /// Evaluate on the held-out text every N steps (and after the last).
    #[arg(long, default_value_t = 100)]
    eval_every: u64,

    /// Held-out batches per evaluation.
    #[arg(long, default_value_t = 8)]
    eval_batches: usize,

    /// Save a checkpoint every N steps (0: only after the last).
    #[arg(long, default_value_t = 100)]
    save_every: u64,

    /// Output folder: checkpoints (step-NNNNNN/), loss.svg and loss.csv.
    #[arg(long, short = 'o', default_value = "runs/lm")]
    out: PathBuf,

    /// Continue from a checkpoint (or a run folder's newest one); the model and the other
    /// settings come from it, --steps may be raised.
    #[arg(long)]
    resume: Option<PathBuf>,

    /// Bytes to sample from the trained model at the end, through the inference path (0: none).
    #[arg(long, default_value_t = 300)]
    sample: usize,

    /// Adapter to run on: an index or a name from `tessera devices`, or `auto`.
    #[arg(long, env = "TESSERA_DEVICE", default_value = "auto")]
    device: DeviceSelector,
}

#[derive(Args)]
pub(crate) struct ExportArgs {
    /// A checkpoint folder, or a run folder (its newest checkpoint).
    checkpoint: PathBuf,

    /// The GGUF file to write.
    #[arg(short = 'o', long)]
    output: PathBuf,
}

pub(crate) fn run(cmd: TrainCommand) -> Result<()> {
    match cmd {
        TrainCommand::Lm(args) => lm(args),
        TrainCommand::Export(args) => export(args),
    }
}

fn corpus(data: &str) -> Result<Corpus> {
    if data == "tinyshakespeare" {
        let train = tessera_quant::calib::Source::load("prose-en")?
            .documents
            .concat();
        let val = tessera_quant::calib::HELDOUT_EN;
        return Ok(Corpus {
            train: train.into_bytes(),
            val: val.as_bytes().to_vec(),
        });
    }
    let path = Path::new(data);
    let meta = std::fs::metadata(path).with_context(|| {
        format!("reading --data {data}: give a text file, or `tinyshakespeare` (built in)")
    })?;
    if !meta.is_file() {
        bail!("--data {data} is not a regular file; give a text file");
    }
    Ok(Corpus::from_file(path)?)
}

fn lm(args: LmArgs) -> Result<()> {
    let gpu = open_gpu(&args.device)?;
    let corpus = corpus(&args.data)?;
    let mut trainer = match &args.resume {
        Some(from) => {
            let dir = train::latest_checkpoint(from).with_context(|| {
                format!(
                    "--resume {}: no checkpoint there (a step-NNNNNN folder with trainer.json)",
                    from.display()
                )
            })?;
            let ckpt = train::load_checkpoint(&dir)?;
            let mut config = ckpt.train.clone();
            config.steps = args.steps;
            note(format!("resuming {} at step {}", dir.display(), ckpt.step));
            ckpt.into_trainer(&gpu, config)?
        }
        None => {
            let lm = LmConfig::preset(&args.size, args.seq_len)?;
            let config = TrainConfig {
                steps: args.steps,
                batch: args.batch,
                micro_batch: args.micro_batch.unwrap_or(args.batch),
                lr: args.lr,
                min_lr: args.min_lr,
                warmup: args.warmup,
                weight_decay: args.weight_decay,
                clip: args.clip,
                seed: args.seed,
                eval_every: args.eval_every,
                eval_batches: args.eval_batches,
                ..TrainConfig::default()
            };
            let model = LmModel::init(&gpu, lm, args.seed)?;
            Trainer::new(&gpu, model, config)?
        }
    };
    let seq = trainer.model.config.ctx;
    corpus.check(seq, &format!("--data {}", args.data))?;
    let c = trainer.config.clone();
    note(format!(
        "training a {} model ({} parameters: dim {}, {} layers, {} heads, ffn {}) on {} bytes, \
         validating on {}; {} steps of {} x {} bytes on {}",
        args.size,
        trainer.model.config.n_params(),
        trainer.model.config.dim,
        trainer.model.config.n_layers,
        trainer.model.config.n_heads,
        trainer.model.config.ffn,
        corpus.train.len(),
        corpus.val.len(),
        c.steps,
        c.batch,
        seq,
        gpu.name()
    ));
    std::fs::create_dir_all(&args.out)
        .with_context(|| format!("creating the output folder {}", args.out.display()))?;

    let bar = ProgressBar::new(c.steps);
    bar.set_style(
        ProgressStyle::with_template(
            "{spinner} step {pos}/{len} [{bar:30}] {msg} ({elapsed} elapsed, {eta} left)",
        )
        .expect("a valid template")
        .progress_chars("=> "),
    );
    bar.set_position(trainer.step);
    let start = Instant::now();
    let mut last_saved = None;
    while trainer.step < c.steps {
        let s = trainer.step(&gpu, &corpus)?;
        let tokens_per_s = (c.batch * seq) as f64 / s.seconds;
        bar.set_position(s.step);
        bar.set_message(format!(
            "loss {:.3}, {:.0} tokens/s, lr {:.2e}",
            s.loss, tokens_per_s, s.lr
        ));
        if let Some(v) = s.val_loss {
            let line = format!(
                "step {:>5}: train loss {:.4}, held-out loss {:.4} nats/byte, grad norm {:.3}, \
                 {:.0} ms/step",
                s.step,
                s.loss,
                v,
                s.grad_norm,
                s.seconds * 1e3
            );
            // A hidden bar (stderr is not a terminal) prints nothing, so the line goes to
            // stderr directly.
            if bar.is_hidden() {
                note(line);
            } else {
                bar.println(line);
            }
        }
        let save_now = (args.save_every > 0 && s.step % args.save_every == 0) || s.step == c.steps;
        if save_now {
            let dir = train::save_checkpoint(&gpu, &args.out, &trainer)?;
            write_curve(&args.out, &trainer.history)?;
            last_saved = Some(dir);
        }
    }
    bar.finish_and_clear();
    let elapsed = start.elapsed().as_secs_f64();
    let last = trainer.history.last();
    let val = trainer.history.iter().rev().find_map(|s| s.val_loss);
    let ms: Vec<f64> = trainer.history.iter().map(|s| s.seconds * 1e3).collect();
    out(format!(
        "trained to step {} in {:.1} s: train loss {}, held-out loss {}, median {:.0} ms/step",
        trainer.step,
        elapsed,
        last.map_or("-".into(), |s| format!("{:.4}", s.loss)),
        val.map_or("-".into(), |v| format!("{v:.4}")),
        median(&ms)
    ))?;
    if let Some(dir) = &last_saved {
        out(format!(
            "checkpoint {} (run it: tessera generate -m {}); curve {}",
            dir.display(),
            args.out.display(),
            args.out.join("loss.svg").display()
        ))?;
        if args.sample > 0 {
            let text = sample(dir, &args.device, args.sample, args.seed)?;
            out(format!(
                "sample ({} bytes, temperature 0.8):\n{text}",
                args.sample
            ))?;
        }
    }
    Ok(())
}

fn median(v: &[f64]) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    s[s.len() / 2]
}

/// Samples from a checkpoint through the inference path: converted to GGUF, loaded as any
/// model is, decoded with the sampler.
fn sample(dir: &Path, device: &DeviceSelector, n: usize, seed: u64) -> Result<String> {
    let input = crate::ModelInput::open(dir, None)?;
    let gpu = open_gpu(device)?;
    let loaded = LoadedModel::open(&input.gguf, gpu)?;
    let n_ctx = loaded.model.config.n_ctx_train;
    let mut session = Session::new(&loaded.model, n_ctx)?;
    let sampler = SamplerConfig {
        temperature: 0.8,
        seed: Some(seed),
        ..Default::default()
    };
    let prompt = loaded.tokenizer.encode("\n", false, false);
    // The context is the training length: sample in pieces that each restart from the last
    // half-context of text.
    let mut text = String::new();
    let mut ids = prompt;
    for piece_seed in seed.. {
        if text.len() >= n {
            break;
        }
        session.reset();
        let want = (n - text.len()).min(n_ctx - ids.len() - 1) as i64;
        let mut piece = String::new();
        tessera_models::llm::generate::generate(
            &mut session,
            &loaded.tokenizer,
            &ids,
            want,
            SamplerConfig {
                seed: Some(piece_seed),
                ..sampler.clone()
            },
            &mut |t: &str| {
                piece.push_str(t);
                true
            },
        )?;
        if piece.is_empty() {
            break;
        }
        text.push_str(&piece);
        let tail: Vec<u32> = loaded.tokenizer.encode(&text, false, false);
        ids = tail[tail.len().saturating_sub(n_ctx / 2)..].to_vec();
    }
    Ok(text)
}

/// Writes loss.csv and loss.svg (training loss per step, held-out loss where evaluated).
fn write_curve(dir: &Path, history: &[StepStats]) -> Result<()> {
    let mut csv = String::from("step,loss,val_loss,lr,grad_norm,ms\n");
    for s in history {
        csv += &format!(
            "{},{},{},{},{},{:.1}\n",
            s.step,
            s.loss,
            s.val_loss.map_or(String::new(), |v| v.to_string()),
            s.lr,
            s.grad_norm,
            s.seconds * 1e3
        );
    }
    crate::write_file_atomic(&dir.join("loss.csv"), csv.as_bytes())?;
    let train: Vec<(f64, f64)> = history
        .iter()
        .map(|s| (s.step as f64, s.loss as f64))
        .collect();
    let val: Vec<(f64, f64)> = history
        .iter()
        .filter_map(|s| s.val_loss.map(|v| (s.step as f64, v as f64)))
        .collect();
    let svg = loss_svg(&train, &val).map_err(anyhow::Error::msg)?;
    crate::write_file_atomic(&dir.join("loss.svg"), svg.as_bytes())
}

/// The loss curve: training loss per step and held-out loss at each evaluation, nats per byte.
fn loss_svg(train: &[(f64, f64)], val: &[(f64, f64)]) -> Result<String, String> {
    use plotters::prelude::*;
    let err = |e: &dyn std::fmt::Display| e.to_string();
    let mut svg = String::new();
    {
        let area = SVGBackend::with_string(&mut svg, (800, 480)).into_drawing_area();
        area.fill(&WHITE).map_err(|e| err(&e))?;
        let steps = train.iter().chain(val).map(|p| p.0).fold(1.0, f64::max);
        let top = train.iter().chain(val).map(|p| p.1).fold(0.5, f64::max);
        let mut chart = ChartBuilder::on(&area)
            .caption("training loss (nats per byte)", ("sans-serif", 18))
            .margin(10)
            .x_label_area_size(30)
            .y_label_area_size(50)
            .build_cartesian_2d(0f64..steps, 0f64..top * 1.05)
            .map_err(|e| err(&e))?;
        chart
            .configure_mesh()
            .x_desc("step")
            .y_desc("loss")
            .draw()
            .map_err(|e| err(&e))?;
        chart
            .draw_series(LineSeries::new(train.iter().copied(), &BLUE))
            .map_err(|e| err(&e))?
            .label("training batch")
            .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], BLUE));
        chart
            .draw_series(PointSeries::of_element(
                val.iter().copied(),
                4,
                &RED,
                &|c, s, st| Circle::new(c, s, st.filled()),
            ))
            .map_err(|e| err(&e))?
            .label("held out")
            .legend(|(x, y)| Circle::new((x + 10, y), 4, RED.filled()));
        chart
            .configure_series_labels()
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .draw()
            .map_err(|e| err(&e))?;
        area.present().map_err(|e| err(&e))?;
    }
    Ok(svg)
}

fn export(args: ExportArgs) -> Result<()> {
    let dir = train::latest_checkpoint(&args.checkpoint)
        .or_else(|| {
            args.checkpoint
                .join("config.json")
                .is_file()
                .then(|| args.checkpoint.clone())
        })
        .with_context(|| {
            format!(
                "{} holds no checkpoint (a folder with config.json and model.safetensors)",
                args.checkpoint.display()
            )
        })?;
    let b = bytes_bar(0, "exporting");
    let report = hf::convert(&dir, &args.output, &|done, total| {
        b.set_length(total);
        b.set_position(done);
    })
    .with_context(|| format!("exporting {}", dir.display()))?;
    b.finish_and_clear();
    out(format!(
        "wrote {} ({} tensors, {} parameters, {} bytes) from {}",
        args.output.display(),
        report.tensors,
        report.params,
        report.bytes,
        dir.display()
    ))
}
