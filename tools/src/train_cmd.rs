//! `tessera train`: train a small byte-level llama from scratch (`lm`), and export a
//! checkpoint to GGUF (`export`).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand};
use indicatif::{ProgressBar, ProgressStyle};
use tessera_models::hf;
use tessera_models::llm::sampler::SamplerConfig;
use tessera_models::llm::{LoadedModel, Session};
use tessera_models::train::{self, Corpus, LmConfig, LmModel, StepStats, TrainConfig, Trainer};
use tessera_runtime::{DeviceSelector, Gpu};

use crate::progress::bytes_bar;
use crate::{note, open_gpu, out};

#[derive(Subcommand)]
pub(crate) enum TrainCommand {
    /// Train a small llama-family language model over bytes, from scratch.
    Lm(Box<LmArgs>),
    /// Write a checkpoint (or a run's newest one) as a GGUF file that Tessera and llama.cpp run.
    Export(ExportArgs),
}

#[derive(Args)]
pub(crate) struct LmArgs {
    /// Training text: a file (its last 10% is held out for validation), or `tinyshakespeare`
    /// (built in: the first 256 KiB of tinyshakespeare, validated on its last 10%) [default:
    /// tinyshakespeare; when resuming, the run's own].
    #[arg(long)]
    data: Option<String>,

    /// Model size: tiny (~43K parameters), 1m (~0.92M), 4m (~4.1M) [default: 1m].
    #[arg(long)]
    size: Option<String>,

    /// Optimizer steps in all, counting those a resumed run has done [default: 600; when
    /// resuming, the run's own].
    #[arg(long)]
    steps: Option<u64>,

    /// Sequences per step [default: 16].
    #[arg(long)]
    batch: Option<usize>,

    /// Sequences per submit (the step's gradient accumulates over batch / micro-batch of them);
    /// defaults to the whole batch.
    #[arg(long)]
    micro_batch: Option<usize>,

    /// Bytes per sequence, and the model's context (2 to 8192) [default: 128].
    #[arg(long)]
    seq_len: Option<usize>,

    /// Peak learning rate (AdamW), reached after the warmup [default: 3e-3].
    #[arg(long, allow_negative_numbers = true)]
    lr: Option<f32>,

    /// Learning rate at the last step (cosine decay from the peak) [default: 3e-4].
    #[arg(long, allow_negative_numbers = true)]
    min_lr: Option<f32>,

    /// Warmup steps (linear from 0 to the peak) [default: 50].
    #[arg(long)]
    warmup: Option<u64>,

    /// Decoupled weight decay, on matrices only [default: 0.1].
    #[arg(long, allow_negative_numbers = true)]
    weight_decay: Option<f32>,

    /// Clip gradients to this global L2 norm [default: 1.0].
    #[arg(long, allow_negative_numbers = true)]
    clip: Option<f32>,

    /// Seed of the initial weights and of the batches [default: 42].
    #[arg(long)]
    seed: Option<u64>,

    /// Evaluate on the held-out text every N steps (and after the last) [default: 100].
    #[arg(long)]
    eval_every: Option<u64>,

    /// Held-out batches per evaluation [default: 8].
    #[arg(long)]
    eval_batches: Option<usize>,

    /// Save a checkpoint every N steps (0: only after the last) [default: 100; when
    /// resuming, the run's own].
    #[arg(long)]
    save_every: Option<u64>,

    /// Keep the newest N checkpoints of the run, removing older ones after each save (0: keep
    /// all).
    #[arg(long, default_value_t = 3)]
    keep: usize,

    /// Output folder: checkpoints (step-NNNNNN/), loss.svg and loss.csv [default: runs/lm; when
    /// resuming, the resumed run's folder].
    #[arg(long, short = 'o')]
    out: Option<PathBuf>,

    /// Continue from a checkpoint (or a run folder's newest one): the model, the data and the
    /// settings come from it; only --steps (to train further), --save-every, --keep and --out
    /// may be given.
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
        TrainCommand::Lm(args) => lm(*args),
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

/// The flags a resumed run takes from its checkpoint; giving one is an error.
fn fixed_on_resume(args: &LmArgs) -> Vec<&'static str> {
    let given = [
        ("--data", args.data.is_some()),
        ("--size", args.size.is_some()),
        ("--batch", args.batch.is_some()),
        ("--micro-batch", args.micro_batch.is_some()),
        ("--seq-len", args.seq_len.is_some()),
        ("--lr", args.lr.is_some()),
        ("--min-lr", args.min_lr.is_some()),
        ("--warmup", args.warmup.is_some()),
        ("--weight-decay", args.weight_decay.is_some()),
        ("--clip", args.clip.is_some()),
        ("--seed", args.seed.is_some()),
        ("--eval-every", args.eval_every.is_some()),
        ("--eval-batches", args.eval_batches.is_some()),
    ];
    given.iter().filter(|g| g.1).map(|g| g.0).collect()
}

/// Prepares the output folder: creates it, checks that it can be written, removes temporary
/// folders an interrupted save left, and refuses to mix two runs' checkpoints.
fn prepare_out(out: &Path, resumed_at: Option<u64>) -> Result<()> {
    std::fs::create_dir_all(out)
        .with_context(|| format!("creating the output folder {}", out.display()))?;
    tempfile::NamedTempFile::new_in(out).with_context(|| {
        format!(
            "the output folder {} cannot be written; choose another --out",
            out.display()
        )
    })?;
    for entry in std::fs::read_dir(out)?.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.starts_with(".step-") && name.contains(".tmp-") {
            note(format!(
                "removing {}, left by an interrupted save",
                entry.path().display()
            ));
            let _ = std::fs::remove_dir_all(entry.path());
        }
    }
    let steps = train::step_dirs(out);
    match resumed_at {
        None if !steps.is_empty() => bail!(
            "{} already holds a run's checkpoints; continue it with --resume {}, or choose \
             another --out",
            out.display(),
            out.display()
        ),
        Some(at) => {
            let later: Vec<String> = steps
                .iter()
                .filter(|(n, _)| *n > at)
                .map(|(_, p)| p.display().to_string())
                .collect();
            if !later.is_empty() {
                bail!(
                    "{} holds checkpoints newer than step {at} ({}); resuming there would mix two \
                     runs: remove them, or pass another --out",
                    out.display(),
                    later.join(", ")
                );
            }
        }
        None => {}
    }
    Ok(())
}

/// A new run's trainer from the flags, or a resumed one from its checkpoint; with the output
/// folder and the training text.
fn setup(args: &LmArgs) -> Result<(Trainer, Arc<Gpu>, PathBuf, String)> {
    let Some(from) = &args.resume else {
        let d = TrainConfig::default();
        let data = args.data.clone().unwrap_or_else(|| d.data.clone());
        let lm = LmConfig::preset(
            args.size.as_deref().unwrap_or("1m"),
            args.seq_len.unwrap_or(128),
        )?;
        let batch = args.batch.unwrap_or(d.batch);
        let config = TrainConfig {
            steps: args.steps.unwrap_or(d.steps),
            batch,
            micro_batch: args.micro_batch.unwrap_or(batch),
            lr: args.lr.unwrap_or(d.lr),
            min_lr: args.min_lr.unwrap_or(d.min_lr),
            warmup: args.warmup.unwrap_or(d.warmup),
            weight_decay: args.weight_decay.unwrap_or(d.weight_decay),
            clip: args.clip.unwrap_or(d.clip),
            seed: args.seed.unwrap_or(d.seed),
            eval_every: args.eval_every.unwrap_or(d.eval_every),
            eval_batches: args.eval_batches.unwrap_or(d.eval_batches),
            data: data.clone(),
            save_every: args.save_every.unwrap_or(d.save_every),
            ..d
        };
        config.check()?;
        check_size(&lm, &config)?;
        let out = args.out.clone().unwrap_or_else(|| "runs/lm".into());
        prepare_out(&out, None)?;
        let gpu = open_gpu(&args.device)?;
        let model = LmModel::init(&gpu, lm, config.seed)?;
        return Ok((Trainer::new(&gpu, model, config)?, gpu, out, data));
    };
    let fixed = fixed_on_resume(args);
    if !fixed.is_empty() {
        bail!(
            "{} cannot change when resuming: a resumed run keeps its checkpoint's model, data \
             and settings (only --steps, --save-every, --keep and --out may be given); start a \
             new run with another --out instead",
            fixed.join(", ")
        );
    }
    let dir = train::latest_checkpoint(from).with_context(|| {
        format!(
            "--resume {}: no checkpoint there (a step-NNNNNN folder with trainer.json)",
            from.display()
        )
    })?;
    let ckpt = train::load_checkpoint(&dir)?;
    let mut config = ckpt.train.clone();
    if let Some(steps) = args.steps {
        config.steps = steps;
    }
    if let Some(every) = args.save_every {
        config.save_every = every;
    }
    if config.steps <= ckpt.step {
        bail!(
            "{} is at step {} of {}; pass --steps above {} to train further",
            dir.display(),
            ckpt.step,
            config.steps,
            ckpt.step
        );
    }
    if config.data.is_empty() {
        config.data = TrainConfig::default().data;
    }
    let data = config.data.clone();
    let run = dir.parent().map(Path::to_path_buf).unwrap_or_default();
    let out = args.out.clone().unwrap_or(run);
    prepare_out(&out, Some(ckpt.step))?;
    let gpu = open_gpu(&args.device)?;
    note(format!("resuming {} at step {}", dir.display(), ckpt.step));
    let trainer = ckpt
        .into_trainer(&gpu, config)
        .with_context(|| format!("resuming from {}", dir.display()))?;
    Ok((trainer, gpu, out, data))
}

/// Tokens one submit may hold: beyond this a step's activations outgrow what a CPU device (or a
/// small GPU) can hold, long before the binding limits say so.
const MAX_SUBMIT_TOKENS: usize = 1 << 16;

fn check_size(lm: &LmConfig, c: &TrainConfig) -> Result<()> {
    let tokens = c.micro_batch * lm.ctx;
    if tokens > MAX_SUBMIT_TOKENS {
        bail!(
            "--micro-batch {} x --seq-len {} is {tokens} tokens a submit, more than \
             {MAX_SUBMIT_TOKENS}; pass a smaller --micro-batch (the step's gradient accumulates \
             over micro-batches) or a shorter --seq-len",
            c.micro_batch,
            lm.ctx
        );
    }
    Ok(())
}

/// Removes all but the newest `keep` checkpoints of a run (0 keeps all).
fn prune(out: &Path, keep: usize) {
    let steps = train::step_dirs(out);
    if keep == 0 || steps.len() <= keep {
        return;
    }
    for (_, path) in &steps[..steps.len() - keep] {
        if let Err(e) = std::fs::remove_dir_all(path) {
            note(format!(
                "could not remove the old checkpoint {}: {e}",
                path.display()
            ));
        }
    }
}

fn lm(args: LmArgs) -> Result<()> {
    let (mut trainer, gpu, out_dir, data) = setup(&args)?;
    let corpus = corpus(&data)?;
    let seq = trainer.model.config.ctx;
    corpus.check(seq, &format!("--data {data}"))?;
    let c = trainer.config.clone();
    note(format!(
        "training a model of {} parameters (dim {}, {} layers, {} heads, ffn {}) on {} bytes of \
         {data}, validating on {}; {} steps of {} x {} bytes on {}",
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

    let bar = ProgressBar::new(c.steps);
    bar.set_style(
        ProgressStyle::with_template(
            "{spinner} step {pos}/{len} [{bar:30}] {msg} ({elapsed} elapsed, {eta} left)",
        )
        .expect("a valid template")
        .progress_chars("=> "),
    );
    bar.set_position(trainer.step);
    // A hidden bar (stderr is not a terminal) prints nothing: lines go to stderr directly.
    let say = |line: String| {
        if bar.is_hidden() {
            note(line);
        } else {
            bar.println(line);
        }
    };
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
            say(format!(
                "step {:>5}: train loss {:.4}, held-out loss {:.4} nats/byte, grad norm {:.3}, \
                 {:.0} ms/step",
                s.step,
                s.loss,
                v,
                s.grad_norm,
                s.seconds * 1e3
            ));
        } else if bar.is_hidden() && s.step.is_multiple_of(10) {
            say(format!(
                "step {:>5}: train loss {:.4}, {:.0} ms/step",
                s.step,
                s.loss,
                s.seconds * 1e3
            ));
        }
        let every = c.save_every;
        if (every > 0 && s.step.is_multiple_of(every)) || s.step == c.steps {
            let dir = train::save_checkpoint(&gpu, &out_dir, &trainer)?;
            write_curve(&out_dir, &trainer.history)?;
            prune(&out_dir, args.keep);
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
            "checkpoint {} (run it: tessera generate -m {} -c {seq}); curve {}",
            dir.display(),
            out_dir.display(),
            out_dir.join("loss.svg").display()
        ))?;
        if args.sample > 0 {
            // The checkpoint is saved: a failure to sample is reported, not fatal.
            match sample(dir, &args.device, args.sample, c.seed) {
                Ok(text) => out(format!(
                    "sample ({} bytes, temperature 0.8; raw bytes, so an undertrained model \
                     may print invalid UTF-8):\n{text}",
                    args.sample
                ))?,
                Err(e) => note(format!("could not sample from {}: {e:#}", dir.display())),
            }
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
