//! `tessera quant ...` (also installed as `quant ...`): calibrate, eval, stats and sweep, the
//! command-line face of `tessera-quant`. Each takes a GGUF file or a Hugging Face safetensors
//! folder, converted first to a temporary GGUF that is removed when the command ends.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand};
use indicatif::{ProgressBar, ProgressStyle};
use tessera_models::hf::{self, ConvertReport};
use tessera_models::llm::{LoadedModel, Session};
use tessera_quant::calib::{self, Source, Windows};
use tessera_quant::calibrate::{self, CalibrateReport, Method, Plan, Provenance};
use tessera_quant::eval::{self, EvalReport, Reference};
use tessera_quant::gather::{self, GatherOptions};
use tessera_quant::gptq::GptqOptions;
use tessera_quant::mix::Target;
use tessera_quant::report;
use tessera_quant::stats::ModelStats;
use tessera_runtime::io::gguf::GgufFile;
use tessera_runtime::{DType, Gpu};

use crate::{model_path, note, open_gpu, out, read_text, ModelArgs, ModelInput};

#[derive(Subcommand)]
pub enum QuantCommand {
    /// Quantize a model with calibration data, then compare it with the base.
    Calibrate(CalibrateArgs),
    /// Compare a quantized model with its base: perplexity, KL divergence, top-1 agreement.
    Eval(EvalArgs),
    /// Activation statistics and outliers of every linear layer's input, per calibration set.
    Stats(StatsArgs),
    /// Quantize with every set and method given and tabulate the cost of each.
    Sweep(SweepArgs),
}

#[derive(Args, Clone)]
pub struct DataArgs {
    /// Calibration data: a built-in set (prose-en, code, punct) or a file (plain text, or JSON
    /// lines with a "text" field). Repeatable.
    #[arg(long = "data", default_value = "prose-en")]
    data: Vec<String>,

    /// Calibration windows to draw.
    #[arg(long, default_value_t = 128)]
    samples: usize,

    /// Tokens per calibration window.
    #[arg(long = "seq-len", default_value_t = 512)]
    seq_len: usize,

    /// Seed for drawing the windows.
    #[arg(long, default_value_t = 42)]
    seed: u64,
}

#[derive(Args, Clone)]
pub struct EvalTextArgs {
    /// Held-out text to evaluate on: `heldout-en` (built in) or a file.
    #[arg(long = "eval-text", default_value = "heldout-en")]
    eval_text: String,

    /// Evaluation window in tokens.
    #[arg(short = 'c', long = "ctx-size", default_value_t = 512)]
    ctx_size: usize,

    /// Evaluate on the first N windows only (0: all of the text).
    #[arg(long = "eval-chunks", default_value_t = 4)]
    eval_chunks: usize,
}

#[derive(Args)]
pub struct CalibrateArgs {
    #[command(flatten)]
    model: ModelArgs,

    #[command(flatten)]
    data: DataArgs,

    /// rtn, imatrix, gptq or awq.
    #[arg(long, default_value = "imatrix")]
    method: String,

    /// A llama-quantize preset (Q2_K, Q3_K_M, Q4_K_S, Q4_K_M, Q5_K_M, Q6_K, Q8_0) or a single
    /// type for every matrix (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q2_K..Q6_K, IQ4_NL, F16, F32).
    #[arg(long = "type", default_value = "Q4_K_M")]
    qtype: String,

    /// Per-tensor type: a regular expression searched in tensor names, `=`, a type. Repeatable;
    /// the first match wins.
    #[arg(long = "tensor-type")]
    tensor_type: Vec<String>,

    /// Output file (default: the input's name with the type, in the current directory).
    #[arg(short = 'o', long = "output")]
    output: Option<PathBuf>,

    /// Use this importance matrix (llama.cpp's GGUF imatrix format) instead of gathering one.
    #[arg(long = "imatrix")]
    imatrix: Option<PathBuf>,

    /// Also write the gathered importance matrix here, in llama.cpp's format.
    #[arg(long = "imatrix-out")]
    imatrix_out: Option<PathBuf>,

    /// GPTQ dampening, as a fraction of the mean diagonal of the Hessian.
    #[arg(long, default_value_t = 0.01)]
    damp: f64,

    /// GPTQ: quantize columns in order of decreasing activation energy.
    #[arg(long = "act-order")]
    act_order: bool,

    #[command(flatten)]
    eval: EvalTextArgs,

    /// Skip the comparison with the base after writing the file.
    #[arg(long = "no-eval")]
    no_eval: bool,

    /// Print the report as JSON on stdout.
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
pub struct EvalArgs {
    /// The quantized model.
    #[arg(short = 'm', long = "model")]
    model: PathBuf,

    /// The base model it was made from: a GGUF file, or a safetensors folder (converted to a
    /// temporary GGUF in the system's temporary folder, TMPDIR).
    #[arg(long)]
    base: PathBuf,

    /// Text to evaluate on (a file, or `heldout-en`).
    #[arg(short = 'f', long = "file", default_value = "heldout-en")]
    file: String,

    /// Window size in tokens.
    #[arg(short = 'c', long = "ctx-size", default_value_t = 512)]
    ctx_size: usize,

    /// Evaluate on the first N windows only (0: all).
    #[arg(long = "chunks", default_value_t = 0)]
    chunks: usize,

    /// Adapter to run on.
    #[arg(long, env = "TESSERA_DEVICE", default_value = "auto")]
    device: tessera_runtime::DeviceSelector,

    /// Print the result as JSON.
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
pub struct StatsArgs {
    #[command(flatten)]
    model: ModelArgs,

    #[command(flatten)]
    data: DataArgs,

    /// |x| past which a channel counts as an outlier (LLM.int8's 6.0).
    #[arg(long, default_value_t = 6.0)]
    threshold: f32,

    /// Folder for the report (stats.md, stats.json) and plots (one SVG per set, compare.svg).
    #[arg(long = "out", default_value = "quant-stats")]
    out_dir: PathBuf,
}

#[derive(Args)]
pub struct SweepArgs {
    #[command(flatten)]
    model: ModelArgs,

    #[command(flatten)]
    data: DataArgs,

    /// Methods to compare, comma-separated.
    #[arg(long, default_value = "rtn,imatrix,gptq,awq", value_delimiter = ',')]
    methods: Vec<String>,

    /// Types or presets to compare, comma-separated.
    #[arg(long = "types", default_value = "Q4_K_M", value_delimiter = ',')]
    types: Vec<String>,

    #[command(flatten)]
    eval: EvalTextArgs,

    /// Folder for the quantized files and the table (sweep.md, sweep.json).
    #[arg(long = "out", default_value = "quant-sweep")]
    out_dir: PathBuf,

    /// Keep the quantized files (otherwise each is deleted once evaluated).
    #[arg(long)]
    keep: bool,
}

pub fn run(cmd: QuantCommand) -> Result<()> {
    match cmd {
        QuantCommand::Calibrate(a) => calibrate_command(a),
        QuantCommand::Eval(a) => eval_command(a),
        QuantCommand::Stats(a) => stats_command(a),
        QuantCommand::Sweep(a) => sweep_command(a),
    }
}

fn bar(total: usize, what: &str) -> ProgressBar {
    let b = ProgressBar::new(total as u64);
    let style = ProgressStyle::with_template(&format!(
        "[{{elapsed_precise}}] [{{bar:40}}] {{pos}}/{{len}} {what} {{msg}}"
    ))
    .unwrap_or_else(|_| ProgressStyle::default_bar());
    b.set_style(style.progress_chars("=> "));
    b
}

fn parse_method(s: &str) -> Result<Method> {
    Method::parse(s).with_context(|| format!("unknown method `{s}`: use rtn, imatrix, gptq or awq"))
}

fn parse_target(s: &str) -> Result<Target> {
    Target::parse(s).with_context(|| format!("unknown type `{s}`: use one of {}", Target::names()))
}

fn parse_overrides(list: &[String]) -> Result<Vec<(String, DType)>> {
    list.iter()
        .map(|o| {
            let (pat, ty) = o.rsplit_once('=').with_context(|| {
                format!("--tensor-type `{o}`: expected PATTERN=TYPE, e.g. ffn_down=Q6_K")
            })?;
            match Target::parse(ty) {
                Some(Target::Pure(d)) => Ok((pat.to_string(), d)),
                Some(Target::Preset(p)) => Ok((pat.to_string(), p.base_type())),
                None => bail!(
                    "--tensor-type `{o}`: unknown type `{ty}` ({})",
                    Target::names()
                ),
            }
        })
        .collect()
}

/// Refuses to write `output` over one of `inputs` (the same file by any path).
fn check_not_input(output: &Path, inputs: &[&Path], what: &str) -> Result<()> {
    let Ok(out) = std::fs::canonicalize(output) else {
        return Ok(());
    };
    for input in inputs {
        if std::fs::canonicalize(input).is_ok_and(|i| i == out) {
            bail!(
                "{what} {} is also an input of this command: it would be overwritten; choose \
                 another path",
                output.display()
            );
        }
    }
    Ok(())
}

/// Checks that `path` can be written before the long work starts.
fn check_writable(path: &Path) -> Result<()> {
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    if !dir.is_dir() {
        bail!(
            "cannot write {}: the folder {} does not exist; create it or choose another -o",
            path.display(),
            dir.display()
        );
    }
    if path.is_dir() {
        bail!(
            "cannot write {}: it is a folder; give a file name with -o",
            path.display()
        );
    }
    if path.exists() && !path.is_file() {
        bail!(
            "cannot write {}: it is not a regular file (a device, a pipe or a socket); give the \
             path of a file",
            path.display()
        );
    }
    let probe = tempfile::NamedTempFile::new_in(&dir).with_context(|| {
        format!(
            "cannot write in {} (permission denied or read-only); choose another -o",
            dir.display()
        )
    })?;
    drop(probe);
    Ok(())
}

fn load_sources(data: &DataArgs) -> Result<Vec<Source>> {
    data.data
        .iter()
        .map(|d| Source::load(d).map_err(anyhow::Error::from))
        .collect()
}

fn draw_windows(loaded: &LoadedModel, sources: &[Source], data: &DataArgs) -> Result<Windows> {
    let w = calib::windows(
        &loaded.tokenizer,
        sources,
        data.seq_len,
        data.samples,
        data.seed,
    )?;
    if w.windows.len() < data.samples {
        note(format!(
            "note: the calibration data holds {} windows of {} tokens; using all of them",
            w.available, data.seq_len
        ));
    }
    Ok(w)
}

/// Runs the calibration windows through the model with the hooks on.
fn gather_stats(
    loaded: &LoadedModel,
    windows: &Windows,
    opts: GatherOptions,
    label: &str,
) -> Result<ModelStats> {
    let b = bar(windows.windows.len(), &format!("windows ({label})"));
    let stats = gather::gather(&loaded.model, &windows.windows, opts, &mut |done, _| {
        b.set_position(done as u64)
    })?;
    b.finish_and_clear();
    Ok(stats)
}

fn eval_text(spec: &str) -> Result<String> {
    if spec == "heldout-en" {
        Ok(calib::HELDOUT_EN.to_string())
    } else {
        read_text(Path::new(spec))
    }
}

fn reference_for(base: &LoadedModel, text: &str, n_ctx: usize, chunks: usize) -> Result<Reference> {
    let tokens = base.tokenizer.encode(text, false, false);
    let bos = base
        .tokenizer
        .add_bos()
        .then(|| base.tokenizer.bos_id())
        .flatten();
    let max = (chunks > 0).then_some(chunks);
    let windows = eval::eval_windows(&tokens, n_ctx, max, bos)?;
    let mut session = Session::new(&base.model, n_ctx)?;
    let b = bar(windows.len(), "windows (base)");
    let r = eval::reference(&mut session, windows, &mut |d, _| b.set_position(d as u64))?;
    b.finish_and_clear();
    Ok(r)
}

fn compare_with(path: &Path, gpu: &Arc<Gpu>, reference: &Reference) -> Result<EvalReport> {
    let q = LoadedModel::open(path, gpu.clone())
        .with_context(|| format!("loading the quantized model {}", path.display()))?;
    let mut session = Session::new(&q.model, reference.n_ctx)?;
    let b = bar(reference.chunks(), "windows (quantized)");
    let r = eval::compare(&mut session, reference, &mut |d, _| {
        b.set_position(d as u64)
    })?;
    b.finish_and_clear();
    Ok(r)
}

fn default_output(input: &Path, target: &Target) -> PathBuf {
    // A folder such as `.` is named by its canonical path.
    let input = match input.is_dir().then(|| input.canonicalize()) {
        Some(Ok(canonical)) => canonical,
        _ => input.to_path_buf(),
    };
    let stem = input
        .file_stem()
        .and_then(|s| s.to_str())
        .unwrap_or("model")
        .to_string();
    // SmolLM2-135M-Instruct.Q4_1 -> SmolLM2-135M-Instruct.Q4_K_M
    let stem = match stem.rsplit_once('.') {
        Some((head, tail)) if Target::parse(tail).is_some() || tail.starts_with('Q') => head,
        _ => stem.as_str(),
    };
    PathBuf::from(format!("{stem}.{target}.gguf"))
}

fn options_for(method: Method) -> GatherOptions {
    GatherOptions {
        gram: method == Method::Gptq,
        capture_rows: if method == Method::Awq { 64 } else { 0 },
    }
}

struct Calibrated {
    report: CalibrateReport,
    stats_tokens: u64,
    gather_seconds: f64,
}

#[allow(clippy::too_many_arguments)]
fn calibrate_one(
    file: &GgufFile,
    stats: Option<&ModelStats>,
    windows: Option<&Windows>,
    data: &DataArgs,
    method: Method,
    target: Target,
    overrides: Vec<(String, DType)>,
    gptq: GptqOptions,
    imatrix_file: Option<String>,
    converted_from: Option<&ConvertReport>,
    output: &Path,
) -> Result<Calibrated> {
    let converted_from = converted_from.cloned();
    let provenance = match windows {
        Some(w) => Provenance {
            datasets: w.names.clone(),
            data_hash: w.data_hash.clone(),
            samples: w.windows.len(),
            seq_len: data.seq_len,
            seed: data.seed,
            imatrix_file,
            converted_from,
        },
        None => Provenance {
            imatrix_file,
            converted_from,
            ..Default::default()
        },
    };
    let plan = Plan {
        method,
        target,
        overrides,
        gptq,
        provenance,
    };
    let b = bar(file.tensor_count(), "tensors");
    let report = calibrate::quantize_model(
        file,
        stats,
        &plan,
        output,
        &mut |done, total, what| {
            b.set_length(total as u64);
            b.set_position(done as u64);
            b.set_message(what.to_string());
        },
        &mut |line| b.suspend(|| log::info!("{line}")),
    )?;
    b.finish_and_clear();
    Ok(Calibrated {
        report,
        stats_tokens: stats.map_or(0, |s| s.tokens()),
        gather_seconds: 0.0,
    })
}

fn calibrate_command(args: CalibrateArgs) -> Result<()> {
    let start = Instant::now();
    let method = parse_method(&args.method)?;
    let target = parse_target(&args.qtype)?;
    let overrides = parse_overrides(&args.tensor_type)?;
    let input = model_path(&args.model.model)?;
    let output = args
        .output
        .clone()
        .unwrap_or_else(|| default_output(&input, &target));
    check_writable(&output)?;
    let mut inputs: Vec<&Path> = vec![&input];
    if let Some(p) = &args.imatrix {
        inputs.push(p);
        if !p.is_file() {
            bail!("--imatrix {}: not a regular file", p.display());
        }
    }
    check_not_input(&output, &inputs, "the output")?;
    if let Some(p) = &args.imatrix_out {
        check_writable(p)?;
        inputs.push(&output);
        check_not_input(p, &inputs, "--imatrix-out")?;
        if args.imatrix.is_some() || !method.needs_data() {
            bail!("--imatrix-out needs a method that gathers statistics (imatrix, gptq, awq)");
        }
    }
    if args.imatrix.is_some() && method != Method::Imatrix {
        bail!("--imatrix is for --method imatrix (gptq and awq gather their own statistics)");
    }
    if !(args.damp.is_finite() && args.damp > 0.0) {
        bail!(
            "--damp {} must be a positive number (the default is 0.01)",
            args.damp
        );
    }
    for (pat, _) in &overrides {
        fancy_regex::Regex::new(pat).with_context(|| {
            format!("--tensor-type pattern `{pat}` is not a regular expression")
        })?;
    }
    // The evaluation text is read now, so a bad one fails before any work.
    let eval_text_now = if args.no_eval {
        None
    } else {
        Some(eval_text(&args.eval.eval_text)?)
    };
    if !args.no_eval && args.eval.ctx_size < 4 {
        bail!(
            "-c {} is too small for the evaluation: pass -c 4 or more",
            args.eval.ctx_size
        );
    }
    // A safetensors folder is converted beside the output, before the GPU is opened.
    let scratch = match output.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    let source = ModelInput::open(&input, Some(scratch))?;
    let gpu = open_gpu(&args.model.device)?;
    let loaded = LoadedModel::open(&source.gguf, gpu.clone())
        .with_context(|| format!("loading model {}", input.display()))?;
    let file = &loaded.file;

    let sources = if method.needs_data() && args.imatrix.is_none() {
        load_sources(&args.data)?
    } else {
        Vec::new()
    };
    let mut windows = None;
    let mut gather_seconds = 0.0;
    let stats = if let Some(path) = &args.imatrix {
        let im = tessera_quant::imatrix::Imatrix::read(path)
            .with_context(|| format!("reading the importance matrix {}", path.display()))?;
        Some(gather::stats_from_imatrix(&im, file)?)
    } else if method.needs_data() {
        let w = draw_windows(&loaded, &sources, &args.data)?;
        note(format!(
            "calibrating: {} windows of {} tokens from {} ({} windows available)",
            w.windows.len(),
            args.data.seq_len,
            w.names.join(", "),
            w.available
        ));
        let t = Instant::now();
        let s = gather_stats(&loaded, &w, options_for(method), "calibration")?;
        gather_seconds = t.elapsed().as_secs_f64();
        windows = Some(w);
        Some(s)
    } else {
        None
    };
    if let (Some(p), Some(s), Some(w)) = (&args.imatrix_out, &stats, &windows) {
        gather::imatrix_from_stats(s, &w.names, args.data.seq_len)
            .write(p)
            .with_context(|| format!("writing {}", p.display()))?;
        note(format!("importance matrix written to {}", p.display()));
    }
    let gptq = GptqOptions {
        damp: args.damp,
        act_order: args.act_order,
        ..Default::default()
    };
    let imatrix_file = args.imatrix.as_ref().map(|p| p.display().to_string());
    let mut done = calibrate_one(
        file,
        stats.as_ref(),
        windows.as_ref(),
        &args.data,
        method,
        target,
        overrides,
        gptq,
        imatrix_file,
        source.converted.as_ref(),
        &output,
    )?;
    done.gather_seconds = gather_seconds;
    let eval = match &eval_text_now {
        None => None,
        Some(text) => {
            let reference =
                reference_for(&loaded, text, args.eval.ctx_size, args.eval.eval_chunks)?;
            Some(compare_with(&output, &gpu, &reference)?)
        }
    };
    let summary = report::CalibrateSummary {
        input: input.display().to_string(),
        output: output.display().to_string(),
        calibration: done.report,
        tokens: done.stats_tokens,
        gather_seconds: done.gather_seconds,
        eval,
        seconds: start.elapsed().as_secs_f64(),
    };
    if args.json {
        out(serde_json::to_string_pretty(&summary)?)
    } else {
        out(summary.to_text())
    }
}

fn eval_command(args: EvalArgs) -> Result<()> {
    if !args.model.is_file() {
        bail!("-m {}: no such model file", args.model.display());
    }
    if !args.base.is_file() && !hf::is_hf_folder(&args.base) {
        bail!(
            "--base {}: no such model file or safetensors folder",
            args.base.display()
        );
    }
    GgufFile::open(&args.model)
        .with_context(|| format!("reading the quantized model {}", args.model.display()))?;
    let text = eval_text(&args.file)?;
    let base_input = ModelInput::open(&args.base, None)?;
    let gpu = open_gpu(&args.device)?;
    let base = LoadedModel::open(&base_input.gguf, gpu.clone())
        .with_context(|| format!("loading the base model {}", args.base.display()))?;
    let reference = reference_for(&base, &text, args.ctx_size, args.chunks)?;
    drop(base);
    drop(base_input);
    let r = compare_with(&args.model, &gpu, &reference)?;
    if args.json {
        out(serde_json::to_string_pretty(&r)?)
    } else {
        out(report::eval_text(&r))
    }
}

fn stats_command(args: StatsArgs) -> Result<()> {
    if !(args.threshold.is_finite() && args.threshold > 0.0) {
        bail!(
            "--threshold {} must be a positive number (LLM.int8's is 6)",
            args.threshold
        );
    }
    let sources = load_sources(&args.data)?;
    let input = model_path(&args.model.model)?;
    std::fs::create_dir_all(&args.out_dir)
        .with_context(|| format!("creating {}", args.out_dir.display()))?;
    let source = ModelInput::open(&input, Some(&args.out_dir))?;
    let gpu = open_gpu(&args.model.device)?;
    let loaded = LoadedModel::open(&source.gguf, gpu.clone())
        .with_context(|| format!("loading model {}", input.display()))?;
    let mut sets = Vec::new();
    for source in &sources {
        let w = draw_windows(&loaded, std::slice::from_ref(source), &args.data)?;
        let s = gather_stats(&loaded, &w, GatherOptions::default(), &source.name)?;
        sets.push((source.name.clone(), s));
    }
    let study = report::Study::new(&sets, args.threshold);
    let md = study.markdown();
    crate::write_file_atomic(&args.out_dir.join("stats.md"), md.as_bytes())?;
    crate::write_file_atomic(
        &args.out_dir.join("stats.json"),
        serde_json::to_string(&study)?.as_bytes(),
    )?;
    for (name, svg) in study
        .plots()
        .map_err(|e| anyhow::anyhow!("drawing the plots: {e}"))?
    {
        crate::write_file_atomic(&args.out_dir.join(name), svg.as_bytes())?;
    }
    out(md.trim_end())?;
    note(format!(
        "report and plots written to {}",
        args.out_dir.display()
    ));
    Ok(())
}

fn sweep_command(args: SweepArgs) -> Result<()> {
    let methods: Vec<Method> = args
        .methods
        .iter()
        .map(|m| parse_method(m))
        .collect::<Result<_>>()?;
    let targets: Vec<Target> = args
        .types
        .iter()
        .map(|t| parse_target(t))
        .collect::<Result<_>>()?;
    let sources = load_sources(&args.data)?;
    let eval_source = eval_text(&args.eval.eval_text)?;
    let input = model_path(&args.model.model)?;
    std::fs::create_dir_all(&args.out_dir)
        .with_context(|| format!("creating {}", args.out_dir.display()))?;
    let source = ModelInput::open(&input, Some(&args.out_dir))?;
    let gpu = open_gpu(&args.model.device)?;
    let loaded = LoadedModel::open(&source.gguf, gpu.clone())
        .with_context(|| format!("loading model {}", input.display()))?;
    let file = &loaded.file;
    let reference = reference_for(
        &loaded,
        &eval_source,
        args.eval.ctx_size,
        args.eval.eval_chunks,
    )?;
    let opts = GatherOptions {
        gram: methods.contains(&Method::Gptq),
        capture_rows: if methods.contains(&Method::Awq) {
            128
        } else {
            0
        },
    };
    let mut rows = Vec::new();
    let mut run = |set: &str,
                   stats: Option<&ModelStats>,
                   w: Option<&Windows>,
                   m: Method,
                   t: Target|
     -> Result<()> {
        let path = args
            .out_dir
            .join(format!("{}.{}.{t}.gguf", report::file_safe(set), m.name()));
        note(format!("sweep: {set} {} {t}", m.name()));
        let c = calibrate_one(
            file,
            stats,
            w,
            &args.data,
            m,
            t,
            Vec::new(),
            GptqOptions::default(),
            None,
            source.converted.as_ref(),
            &path,
        )?;
        let e = compare_with(&path, &gpu, &reference)?;
        if !args.keep {
            let _ = std::fs::remove_file(&path);
        }
        rows.push(report::SweepRow {
            set: set.to_string(),
            method: m.name().to_string(),
            target: t.to_string(),
            bytes: c.report.bytes_after,
            bpw: c.report.bpw,
            eval: e,
        });
        Ok(())
    };
    for &t in &targets {
        if methods.contains(&Method::Rtn) {
            run("-", None, None, Method::Rtn, t)?;
        }
    }
    for source in &sources {
        let w = draw_windows(&loaded, std::slice::from_ref(source), &args.data)?;
        let s = gather_stats(&loaded, &w, opts, &source.name)?;
        for &t in &targets {
            for &m in methods.iter().filter(|m| m.needs_data()) {
                run(&source.name, Some(&s), Some(&w), m, t)?;
            }
        }
    }
    let md = report::sweep_markdown(&rows, reference.scored());
    crate::write_file_atomic(&args.out_dir.join("sweep.md"), md.as_bytes())?;
    crate::write_file_atomic(
        &args.out_dir.join("sweep.json"),
        serde_json::to_string_pretty(&rows)?.as_bytes(),
    )?;
    out(md.trim_end())
}
