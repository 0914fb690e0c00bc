//! Tessera's command-line tools: argument parsing, progress bars and output; the work itself
//! happens in `tessera-models` and `tessera-runtime`.
//!
//! Flags follow llama.cpp's tools (`-m`, `-p`, `-f`, `-n`, `-c`, `--temp`, ...), so a
//! llama.cpp user's habits carry over.

mod progress;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand};
use tessera_models::fetch;
use tessera_models::llm::chat::ChatMessage;
use tessera_models::llm::generate::generate;
use tessera_models::llm::perplexity::perplexity;
use tessera_models::llm::sampler::SamplerConfig;
use tessera_models::llm::{LoadedModel, Session};
use tessera_runtime::{enumerate_adapters, DeviceSelector, Gpu, GpuOptions};

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
}

#[derive(Args)]
struct ModelArgs {
    /// GGUF model file; without it, the default model (SmolLM2-135M-Instruct) is fetched once
    /// into the cache directory.
    #[arg(short = 'm', long = "model")]
    model: Option<PathBuf>,

    /// Adapter to run on: an index or a name from `tessera devices`, or `auto`.
    #[arg(long, env = "TESSERA_DEVICE", default_value = "auto")]
    device: DeviceSelector,
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
        allow_negative_numbers = true
    )]
    n_predict: i64,

    /// Context size in tokens; 0 means the model's training context.
    #[arg(short = 'c', long = "ctx-size", default_value_t = 4096)]
    ctx_size: usize,

    /// Sampling temperature; 0 is greedy.
    #[arg(long = "temp", default_value_t = 0.8)]
    temperature: f32,

    /// Keep only the K most likely tokens (0 disables).
    #[arg(long = "top-k", default_value_t = 40)]
    top_k: usize,

    /// Keep the smallest set of tokens whose probability reaches P (1.0 disables).
    #[arg(long = "top-p", default_value_t = 0.95)]
    top_p: f32,

    /// Drop tokens less likely than P times the most likely one (0.0 disables).
    #[arg(long = "min-p", default_value_t = 0.05)]
    min_p: f32,

    /// Penalise tokens among the last 64 (1.0 disables).
    #[arg(long = "repeat-penalty", default_value_t = 1.0)]
    repeat_penalty: f32,

    /// Random seed; the same seed, prompt and settings give the same text.
    #[arg(long)]
    seed: Option<u64>,

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
        Command::Fetch => {
            println!("{}", model_path(&None)?.display());
            Ok(())
        }
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
    for a in adapters {
        println!("{}: {}", a.index, a.name);
        println!(
            "   backend {}, type {}, vendor 0x{:04x}",
            a.backend, a.device_type, a.vendor
        );
        println!("   driver {} {}", a.driver, a.driver_info);
        println!(
            "   shader-f16 {}, subgroups {} (size {}..{}), timestamps {}",
            yes(a.shader_f16),
            yes(a.subgroup),
            a.subgroup_min_size,
            a.subgroup_max_size,
            yes(a.timestamp_query)
        );
        println!(
            "   max storage binding {} MiB, max buffer {} MiB, workgroup memory {} KiB, \
             {} invocations/workgroup",
            a.max_storage_buffer_binding_size >> 20,
            a.max_buffer_size >> 20,
            a.max_compute_workgroup_storage_size >> 10,
            a.max_compute_invocations_per_workgroup
        );
    }
    Ok(())
}

fn yes(b: bool) -> &'static str {
    if b {
        "yes"
    } else {
        "no"
    }
}

/// The model path given, or the default model, fetched on first use.
fn model_path(model: &Option<PathBuf>) -> Result<PathBuf> {
    if let Some(path) = model {
        return Ok(path.clone());
    }
    let mut bar = progress::FetchProgress::default();
    let path = fetch::ensure_default_model(&mut |e| bar.update(e))?;
    bar.finish();
    Ok(path)
}

fn open_gpu(selector: &DeviceSelector) -> Result<Arc<Gpu>> {
    let options = GpuOptions {
        selector: selector.clone(),
        ..Default::default()
    };
    Ok(Arc::new(Gpu::new(&options)?))
}

fn load(args: &ModelArgs) -> Result<(LoadedModel, Arc<Gpu>)> {
    let path = model_path(&args.model)?;
    let gpu = open_gpu(&args.device)?;
    let loaded = LoadedModel::open(&path, gpu.clone())
        .with_context(|| format!("loading model {}", path.display()))?;
    Ok((loaded, gpu))
}

fn read_text(path: &Path) -> Result<String> {
    std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))
}

fn generate_command(args: GenerateArgs) -> Result<()> {
    let prompt = match (&args.prompt, &args.file) {
        (Some(p), _) => p.clone(),
        (None, Some(f)) => read_text(f)?,
        (None, None) => bail!("give a prompt with -p TEXT or -f FILE"),
    };
    let (loaded, gpu) = load(&args.model)?;
    let text = if args.chat {
        let template = loaded
            .chat_template
            .as_ref()
            .context("--chat: this model has no chat template (tokenizer.chat_template)")?;
        template.render(&[ChatMessage::new("user", prompt)], true)?
    } else {
        prompt
    };
    let tokens = loaded.tokenizer.encode(&text, true, true);
    let n_ctx = if args.ctx_size == 0 {
        loaded.model.config.n_ctx_train
    } else {
        args.ctx_size
    };
    let mut session = Session::new(&loaded.model, n_ctx)?;
    let sampler = SamplerConfig {
        temperature: args.temperature,
        top_k: args.top_k,
        top_p: args.top_p,
        min_p: args.min_p,
        repeat_penalty: args.repeat_penalty,
        seed: args.seed,
        ..Default::default()
    };
    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    let mut write_error = None;
    let stats = generate(
        &mut session,
        &loaded.tokenizer,
        &tokens,
        args.n_predict,
        sampler,
        &mut |s| {
            if write_error.is_none() {
                if let Err(e) = out.write_all(s.as_bytes()).and_then(|_| out.flush()) {
                    write_error = Some(e);
                }
            }
        },
    )?;
    if let Some(e) = write_error {
        if e.kind() != std::io::ErrorKind::BrokenPipe {
            return Err(e).context("writing to stdout");
        }
    }
    let _ = writeln!(out);
    eprintln!(
        "\n{} prompt tokens, {} generated ({:?}); prefill {:.1} tokens/s, decode {:.1} tokens/s; \
         device: {} ({})",
        stats.prompt_tokens,
        stats.generated.len(),
        stats.stop,
        stats.prefill_tps(),
        stats.decode_tps(),
        gpu.name(),
        gpu.backend()
    );
    Ok(())
}

fn perplexity_command(args: PerplexityArgs) -> Result<()> {
    let text = read_text(&args.file)?;
    let (loaded, gpu) = load(&args.model)?;
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
    let report = perplexity(
        &mut session,
        &tokens,
        args.ctx_size,
        bos,
        &mut |done, _, ppl| {
            bar.set_position(done as u64);
            bar.set_message(format!("ppl {ppl:.4}"));
        },
    )?;
    bar.finish_and_clear();
    if args.json {
        let mut value = serde_json::to_value(&report)?;
        value["device"] = gpu.name().into();
        value["seconds"] = start.elapsed().as_secs_f64().into();
        println!("{}", serde_json::to_string_pretty(&value)?);
    } else {
        println!(
            "Final estimate: PPL = {:.4} over {} chunks of {} tokens ({} tokens scored, {:.1} s \
             on {})",
            report.perplexity,
            report.chunks,
            report.n_ctx,
            report.scored,
            start.elapsed().as_secs_f64(),
            gpu.name()
        );
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
        println!("[{}]", list.join(", "));
    } else {
        for id in ids {
            let piece = String::from_utf8_lossy(tokenizer.token_to_piece(id, true)).into_owned();
            println!("{id:6} -> '{piece}'");
        }
    }
    Ok(())
}
