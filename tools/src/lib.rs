//! Tessera's command-line tools: argument parsing, progress bars and output; the work itself
//! happens in `tessera-models` and `tessera-runtime`.
//!
//! Flags follow llama.cpp's tools (`-m`, `-p`, `-f`, `-n`, `-c`, `--temp`, ...), so a
//! llama.cpp user's habits carry over.

mod bench;
mod progress;
mod quant;
mod train_cmd;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand};
use tessera_models::fetch;
use tessera_models::hf::{self, ConvertReport};
use tessera_models::llm::chat::ChatMessage;
use tessera_models::llm::generate::generate;
use tessera_models::llm::perplexity::perplexity;
use tessera_models::llm::sampler::SamplerConfig;
use tessera_models::llm::{LoadedModel, Session};
use tessera_models::train;
use tessera_runtime::{enumerate_adapters, DeviceSelector, Gpu, GpuOptions};

use crate::progress::bytes_bar;

#[derive(Parser)]
#[command(
    name = "tessera",
    version,
    about = "LLM inference on any GPU through wgpu and WGSL"
)]
struct Cli {
    /// Log more (-v: info, -vv: debug); RUST_LOG overrides.
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    verbose: u8,

    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// List every adapter wgpu finds: backend, type, driver, limits and features.
    Devices,
    /// Generate text from a prompt (the completion goes to stdout, a summary to stderr).
    Generate(GenerateArgs),
    /// Perplexity of a text, by llama-perplexity's method.
    Perplexity(PerplexityArgs),
    /// Show how a text is tokenized.
    Tokenize(TokenizeArgs),
    /// Download the default model into the cache now (otherwise done on first use) and print
    /// its path.
    Fetch,
    /// Post-training quantization: calibrate, eval, stats, sweep (also the `quant` program).
    #[command(subcommand)]
    Quant(quant::QuantCommand),
    /// Prompt-processing and generation speed as llama-bench measures it (pp512, tg128), with
    /// each run's weight bandwidth against the device's copy bandwidth; on a model file or a
    /// synthetic model of a published shape, on one device or all.
    Bench(bench::BenchArgs),
    /// Training on the runtime's kernels: a small byte-level llama from scratch (`lm`), and a
    /// checkpoint exported to GGUF (`export`).
    #[command(subcommand)]
    Train(train_cmd::TrainCommand),
}

/// The `quant` program: `tessera quant` under its own name.
#[derive(Parser)]
#[command(
    name = "quant",
    version,
    about = "Post-training quantization of GGUF models with calibration data"
)]
struct QuantCli {
    /// Log more (-v: info, -vv: debug); RUST_LOG overrides.
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    verbose: u8,

    #[command(subcommand)]
    command: quant::QuantCommand,
}

/// Runs the `quant` command line.
pub fn run_quant() -> Result<()> {
    let cli = QuantCli::parse();
    init_logging(cli.verbose);
    quant::run(cli.command)
}

#[derive(Args)]
pub(crate) struct ModelArgs {
    /// GGUF model file, or a folder: a Hugging Face llama checkpoint (safetensors) or the output
    /// of `tessera train lm` (its newest checkpoint), converted to GGUF on the way in; without
    /// it, the default model (SmolLM2-135M-Instruct) is fetched once into the cache directory.
    #[arg(short = 'm', long = "model")]
    pub(crate) model: Option<PathBuf>,

    /// Adapter to run on: an index or a name from `tessera devices`, or `auto`.
    #[arg(long, env = "TESSERA_DEVICE", default_value = "auto")]
    pub(crate) device: DeviceSelector,
}

#[derive(Args)]
struct GenerateArgs {
    #[command(flatten)]
    model: ModelArgs,

    /// The prompt.
    #[arg(short = 'p', long = "prompt", conflicts_with = "file")]
    prompt: Option<String>,

    /// Read the prompt from a file.
    #[arg(short = 'f', long = "file")]
    file: Option<PathBuf>,

    /// Tokens to generate; -1 means until the model stops or the context is full.
    #[arg(
        short = 'n',
        long = "n-predict",
        default_value_t = 128,
        allow_negative_numbers = true,
        value_parser = clap::value_parser!(i64).range(-1..)
    )]
    n_predict: i64,

    /// Context size in tokens; 0 means the model's training context.
    #[arg(short = 'c', long = "ctx-size", default_value_t = 4096)]
    ctx_size: usize,

    /// Sampling temperature; 0 is greedy.
    #[arg(long = "temp", allow_negative_numbers = true, default_value_t = 0.8)]
    temperature: f32,

    /// Keep only the K most likely tokens (0 disables).
    #[arg(long = "top-k", default_value_t = 40)]
    top_k: usize,

    /// Keep the smallest set of tokens whose probability reaches P (1.0 disables).
    #[arg(long = "top-p", allow_negative_numbers = true, default_value_t = 0.95)]
    top_p: f32,

    /// Drop tokens less likely than P times the most likely one (0.0 disables).
    #[arg(long = "min-p", allow_negative_numbers = true, default_value_t = 0.05)]
    min_p: f32,

    /// Penalise tokens among the last 64 (1.0 disables).
    #[arg(
        long = "repeat-penalty",
        allow_negative_numbers = true,
        default_value_t = 1.0
    )]
    repeat_penalty: f32,

    /// Random seed; the same seed, prompt and settings give the same text (-1: a random one).
    #[arg(long, allow_negative_numbers = true, value_parser = parse_seed)]
    seed: Option<Seed>,

    /// Wrap the prompt in the model's chat template as a user message.
    #[arg(long)]
    chat: bool,
}

#[derive(Args)]
struct PerplexityArgs {
    #[command(flatten)]
    model: ModelArgs,

    /// Text file to score.
    #[arg(short = 'f', long = "file")]
    file: PathBuf,

    /// Window size in tokens.
    #[arg(short = 'c', long = "ctx-size", default_value_t = 512)]
    ctx_size: usize,

    /// Score only the first N tokens of the text (0: all of it).
    #[arg(long = "max-tokens", default_value_t = 0)]
    max_tokens: usize,

    /// Print the result as JSON.
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
struct TokenizeArgs {
    /// GGUF model file (default: the fetched default model).
    #[arg(short = 'm', long = "model")]
    model: Option<PathBuf>,

    /// Text to tokenize; special tokens in it are parsed as such.
    #[arg(short = 'p', long = "prompt")]
    prompt: String,

    /// Print only the ids, as a list.
    #[arg(long)]
    ids: bool,
}

/// Runs the `tessera` command line.
pub fn run() -> Result<()> {
    let cli = Cli::parse();
    init_logging(cli.verbose);
    match cli.command {
        Command::Devices => devices(),
        Command::Generate(args) => generate_command(args),
        Command::Perplexity(args) => perplexity_command(args),
        Command::Tokenize(args) => tokenize_command(args),
        Command::Fetch => out(model_path(&None)?.display()),
        Command::Quant(cmd) => quant::run(cmd),
        Command::Bench(args) => bench::run(args),
        Command::Train(cmd) => train_cmd::run(cmd),
    }
}

fn init_logging(verbose: u8) {
    let level = match verbose {
        0 => "warn",
        1 => "info",
        _ => "debug",
    };
    // wgpu and naga are noisy at info; keep them at warn unless asked through RUST_LOG.
    let filter = format!("{level},wgpu_core=warn,wgpu_hal=warn,naga=warn");
    let env = env_logger::Env::default().default_filter_or(filter);
    let _ = env_logger::Builder::from_env(env)
        .format_timestamp(None)
        .try_init();
}

fn devices() -> Result<()> {
    let adapters = enumerate_adapters();
    if adapters.is_empty() {
        return Err(tessera_runtime::RuntimeError::NoAdapter.into());
    }
    let mut text = String::new();
    for a in adapters {
        let default = if a.preferred {
            "  (the default choice)"
        } else {
            ""
        };
        text += &format!("{}: {}{default}\n", a.index, a.name);
        text += &format!(
            "   backend {}, type {}, vendor 0x{:04x}\n",
            a.backend, a.device_type, a.vendor
        );
        let driver = format!("{} {}", a.driver, a.driver_info);
        text += &format!("   driver {}\n", driver.trim());
        // wgpu reports a size range even for adapters without subgroups; it means nothing there.
        let subgroups = if a.subgroup {
            format!(
                "yes (size {}..{})",
                a.subgroup_min_size, a.subgroup_max_size
            )
        } else {
            "no".to_string()
        };
        text += &format!(
            "   shader-f16 {}, subgroups {subgroups}, timestamps {}\n",
            yes(a.shader_f16),
            yes(a.timestamp_query)
        );
        text += &format!(
            "   max storage binding {} MiB, uniform binding {} KiB, max buffer {} MiB, \
             workgroup memory {} KiB, {} invocations/workgroup\n",
            a.max_storage_buffer_binding_size >> 20,
            a.max_uniform_buffer_binding_size >> 10,
            a.max_buffer_size >> 20,
            a.max_compute_workgroup_storage_size >> 10,
            a.max_compute_invocations_per_workgroup
        );
    }
    out(text.trim_end())
}

/// Writes a line to stdout; a closed pipe or a full disk is an error, never a panic.
pub(crate) fn out(line: impl std::fmt::Display) -> Result<()> {
    let mut stdout = std::io::stdout().lock();
    writeln!(stdout, "{line}")
        .and_then(|_| stdout.flush())
        .context("writing to stdout")
}

fn yes(b: bool) -> &'static str {
    if b {
        "yes"
    } else {
        "no"
    }
}

/// The model path given, or the default model, fetched on first use.
pub(crate) fn model_path(model: &Option<PathBuf>) -> Result<PathBuf> {
    if let Some(path) = model {
        return Ok(path.clone());
    }
    let mut bar = progress::FetchProgress::default();
    let path = fetch::ensure_default_model(&mut |e| bar.update(e))?;
    bar.finish();
    Ok(path)
}

pub(crate) fn open_gpu(selector: &DeviceSelector) -> Result<Arc<Gpu>> {
    let options = GpuOptions {
        selector: selector.clone(),
        pipeline_cache_dir: fetch::cache_dir().ok().map(|d| d.join("pipelines")),
        ..Default::default()
    };
    Ok(Arc::new(Gpu::new(&options)?))
}

/// Opens the model of `args`: a GGUF file, or a folder (a Hugging Face llama checkpoint or a
/// training run's checkpoints) converted to GGUF first, so both run through the same code.
fn load(args: &ModelArgs) -> Result<(LoadedModel, Arc<Gpu>, ModelInput)> {
    let path = model_path(&args.model)?;
    let gpu = open_gpu(&args.device)?;
    let input = ModelInput::open(&path, None)?;
    let loaded = LoadedModel::open(&input.gguf, gpu.clone())
        .with_context(|| format!("loading model {}", path.display()))?;
    Ok((loaded, gpu, input))
}

/// A line for the person at the terminal (stderr), never mixed into results on stdout.
pub(crate) fn note(line: impl std::fmt::Display) {
    let _ = writeln!(std::io::stderr(), "{line}");
}

/// A model named on the command line, as a GGUF file to open: the file itself, or a safetensors
/// folder converted into a temporary folder that is removed when this value is dropped.
pub(crate) struct ModelInput {
    pub(crate) gguf: PathBuf,
    pub(crate) converted: Option<ConvertReport>,
    _scratch: Option<tempfile::TempDir>,
}

impl ModelInput {
    /// Takes `path` as it is when it is a file; converts a folder into a temporary folder
    /// inside `scratch` (the system's temporary folder when `None`). A folder of training
    /// checkpoints (`tessera train lm --out`) stands for its newest checkpoint.
    pub(crate) fn open(path: &Path, scratch: Option<&Path>) -> Result<Self> {
        if !hf::is_hf_folder(path) {
            return Ok(ModelInput {
                gguf: path.to_path_buf(),
                converted: None,
                _scratch: None,
            });
        }
        let latest;
        let path = if path.join("config.json").is_file() {
            path
        } else {
            latest = train::latest_checkpoint(path);
            latest.as_deref().unwrap_or(path)
        };
        let builder = {
            let mut b = tempfile::Builder::new();
            b.prefix(".tessera-convert-");
            b
        };
        let tmp = match scratch {
            Some(dir) => builder.tempdir_in(dir),
            None => builder.tempdir(),
        }
        .with_context(|| {
            format!(
                "cannot make a temporary folder for the converted model in {}",
                scratch
                    .map_or_else(std::env::temp_dir, Path::to_path_buf)
                    .display()
            )
        })?;
        let gguf = tmp.path().join("model.gguf");
        let b = bytes_bar(0, "converting");
        let report = hf::convert(path, &gguf, &|done, total| {
            b.set_length(total);
            b.set_position(done);
        })
        .with_context(|| format!("converting the safetensors folder {}", path.display()))?;
        b.finish_and_clear();
        note(format!(
            "converted {} ({} in {} safetensors file(s), pre-tokenizer {}) to GGUF in {:.1} s",
            path.display(),
            report.source_dtypes.join(", "),
            report.files,
            report.pre_tokenizer,
            report.seconds
        ));
        Ok(ModelInput {
            gguf,
            converted: Some(report),
            _scratch: Some(tmp),
        })
    }
}

/// Writes a file atomically (temp file in the same folder, then rename).
pub(crate) fn write_file_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let mut tmp = tempfile::NamedTempFile::new_in(dir)
        .with_context(|| format!("writing in {}", dir.display()))?;
    tmp.write_all(bytes)
        .and_then(|_| tmp.as_file().sync_all())
        .with_context(|| format!("writing {}", path.display()))?;
    // Temporary files start private (0600); a result file is as readable as any other.
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let _ = tmp
            .as_file()
            .set_permissions(std::fs::Permissions::from_mode(0o644));
    }
    tmp.persist(path)
        .with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}

/// Text files larger than this are refused rather than read whole.
const MAX_TEXT_BYTES: u64 = 1 << 30;

/// Reads a UTF-8 text file given on the command line, refusing what is not a regular file
/// (a FIFO would block, /dev/zero would never end).
pub(crate) fn read_text(path: &Path) -> Result<String> {
    let meta = std::fs::metadata(path).with_context(|| format!("reading {}", path.display()))?;
    if !meta.is_file() {
        bail!(
            "{} is not a regular file; pass the path of a text file",
            path.display()
        );
    }
    if meta.len() > MAX_TEXT_BYTES {
        bail!(
            "{} is {} bytes, more than the 1 GiB a text input may be",
            path.display(),
            meta.len()
        );
    }
    let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    String::from_utf8(bytes).map_err(|e| {
        anyhow::anyhow!(
            "{} is not UTF-8 text (invalid byte at offset {}); convert it to UTF-8 first",
            path.display(),
            e.utf8_error().valid_up_to()
        )
    })
}

fn generate_command(args: GenerateArgs) -> Result<()> {
    let prompt = match (&args.prompt, &args.file) {
        (Some(p), _) => p.clone(),
        // As llama.cpp does, one trailing newline of a prompt file is not part of the prompt.
        (None, Some(f)) => {
            let text = read_text(f)?;
            text.strip_suffix('\n').map(str::to_owned).unwrap_or(text)
        }
        (None, None) => bail!("give a prompt with -p TEXT or -f FILE"),
    };
    check_sampling(&args)?;
    let start = Instant::now();
    let (loaded, gpu, _input) = load(&args.model)?;
    let loaded_after = start.elapsed();
    let text = if args.chat {
        let Some(template) = loaded.chat_template.as_ref() else {
            match &loaded.chat_template_error {
                Some(e) => bail!("--chat: the model's chat template is unusable: {e}"),
                None => bail!("--chat: this model has no chat template (tokenizer.chat_template)"),
            }
        };
        template.render(&[ChatMessage::new("user", prompt)], true)?
    } else {
        prompt
    };
    let tokens = loaded.tokenizer.encode(&text, true, true);
    let n_ctx_train = loaded.model.config.n_ctx_train;
    let n_ctx = if args.ctx_size == 0 {
        n_ctx_train
    } else {
        args.ctx_size
    };
    if n_ctx > n_ctx_train {
        log::warn!(
            "--ctx-size {n_ctx} is past the {n_ctx_train} tokens this model was trained on; \
             expect worse text beyond that"
        );
    }
    let mut session = Session::new(&loaded.model, n_ctx)?;
    let sampler = SamplerConfig {
        temperature: args.temperature,
        top_k: args.top_k,
        top_p: args.top_p,
        min_p: args.min_p,
        repeat_penalty: args.repeat_penalty,
        seed: args.seed.and_then(|s| s.0),
        ..Default::default()
    };
    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    let mut write_error = None;
    let mut first_text = None;
    let mut on_text = |s: &str| match out.write_all(s.as_bytes()).and_then(|_| out.flush()) {
        Ok(()) => {
            if !s.is_empty() {
                first_text.get_or_insert_with(|| start.elapsed());
            }
            true
        }
        Err(e) => {
            // Nobody reads the text any more (or the disk is full): stop generating.
            write_error = Some(e);
            false
        }
    };
    let stats = generate(
        &mut session,
        &loaded.tokenizer,
        &tokens,
        args.n_predict,
        sampler,
        &mut on_text,
    )?;
    if let Some(e) = write_error {
        return Err(e).context("writing to stdout");
    }
    let _ = writeln!(out);
    // The summary is best effort: a closed stderr must not fail a finished generation.
    let _ = writeln!(
        std::io::stderr(),
        "\n{} prompt tokens, {} generated (stopped: {}); prefill {:.1} tokens/s (with any kernel \
         compiling), decode {:.1} tokens/s; device: {} ({}); {} (model loaded in {:.2} s)",
        stats.prompt_tokens,
        stats.generated.len(),
        stats.stop,
        stats.prefill_tps(),
        stats.decode_tps(),
        gpu.name(),
        gpu.backend(),
        match first_text {
            Some(t) => format!("first text {:.2} s after start", t.as_secs_f64()),
            None => "no text".to_string(),
        },
        loaded_after.as_secs_f64()
    );
    Ok(())
}

/// A `--seed` value: a number, or -1 for a random seed (llama.cpp's convention).
#[derive(Clone, Copy, Debug)]
struct Seed(Option<u64>);

fn parse_seed(s: &str) -> Result<Seed, String> {
    if s.trim() == "-1" {
        return Ok(Seed(None));
    }
    s.trim().parse().map(|v| Seed(Some(v))).map_err(|_| {
        format!(
            "`{s}` is not a seed: give a number from 0 to {}, or -1",
            u64::MAX
        )
    })
}

/// Rejects sampling settings that have no meaning, naming the flag.
fn check_sampling(args: &GenerateArgs) -> Result<()> {
    let in_unit = |v: f32| (0.0..=1.0).contains(&v);
    if !args.temperature.is_finite() {
        bail!(
            "--temp must be a finite number (0 or less is greedy), not {}",
            args.temperature
        );
    }
    if !in_unit(args.top_p) {
        bail!(
            "--top-p must be between 0 and 1 (1 disables it), not {}",
            args.top_p
        );
    }
    if !in_unit(args.min_p) {
        bail!(
            "--min-p must be between 0 and 1 (0 disables it), not {}",
            args.min_p
        );
    }
    if !(args.repeat_penalty.is_finite() && args.repeat_penalty > 0.0) {
        bail!(
            "--repeat-penalty must be a positive number (1 disables it), not {}",
            args.repeat_penalty
        );
    }
    Ok(())
}

fn perplexity_command(args: PerplexityArgs) -> Result<()> {
    let text = read_text(&args.file)?;
    let (loaded, gpu, _input) = load(&args.model)?;
    let mut tokens = loaded.tokenizer.encode(&text, true, false);
    if args.max_tokens > 0 {
        tokens.truncate(args.max_tokens);
    }
    let mut session = Session::new(&loaded.model, args.ctx_size)?;
    let bos = if loaded.tokenizer.add_bos() {
        loaded.tokenizer.bos_id()
    } else {
        None
    };
    let start = Instant::now();
    let bar = progress::chunks_bar(tokens.len() / args.ctx_size.max(1));
    // Running values as llama-perplexity prints them, when no bar can be drawn (a log file).
    let mut progress = |done: usize, _: usize, ppl: f64| {
        if bar.is_hidden() {
            let _ = write!(std::io::stderr(), "[{done}]{ppl:.4},");
        }
        bar.set_position(done as u64);
        bar.set_message(format!("ppl {ppl:.4}"));
    };
    let report = perplexity(&mut session, &tokens, args.ctx_size, bos, &mut progress)?;
    if bar.is_hidden() {
        let _ = writeln!(std::io::stderr());
    }
    bar.finish_and_clear();
    if args.json {
        let mut value = serde_json::to_value(&report)?;
        value["device"] = gpu.name().into();
        value["seconds"] = start.elapsed().as_secs_f64().into();
        out(serde_json::to_string_pretty(&value)?)?;
    } else {
        out(format!(
            "Final estimate: PPL = {:.4} over {} chunks of {} tokens ({} tokens scored, {:.1} s \
             on {})",
            report.perplexity,
            report.chunks,
            report.n_ctx,
            report.scored,
            start.elapsed().as_secs_f64(),
            gpu.name()
        ))?;
    }
    Ok(())
}

fn tokenize_command(args: TokenizeArgs) -> Result<()> {
    let path = model_path(&args.model)?;
    let file = tessera_runtime::io::gguf::GgufFile::open(&path)
        .with_context(|| format!("opening {}", path.display()))?;
    let tokenizer = tessera_models::llm::load::tokenizer_from_gguf(&file)?;
    let ids = tokenizer.encode(&args.prompt, true, true);
    if args.ids {
        let list: Vec<String> = ids.iter().map(u32::to_string).collect();
        out(format!("[{}]", list.join(", ")))
    } else {
        let mut text = String::new();
        for id in ids {
            let piece = String::from_utf8_lossy(tokenizer.token_to_piece(id, true)).into_owned();
            text += &format!("{id:6} -> '{piece}'\n");
        }
        out(text.trim_end())
    }
}

/// The process exit code for a command's result, with the error printed to stderr. A reader
/// of our output that went away (`| head`) is not an error, as for other Unix tools.
pub fn exit_code(result: Result<()>) -> std::process::ExitCode {
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(err) if is_broken_pipe(&err) => std::process::ExitCode::SUCCESS,
        Err(err) => {
            let _ = writeln!(std::io::stderr(), "error: {err:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn is_broken_pipe(err: &anyhow::Error) -> bool {
    err.chain().any(|e| {
        e.downcast_ref::<std::io::Error>()
            .is_some_and(|e| e.kind() == std::io::ErrorKind::BrokenPipe)
    })
}
