//! `tessera bench`: prompt-processing and generation speed measured as llama-bench measures
//! them, on a model file or on a synthetic model of a published shape, on one device or all.
//!
//! `pp N` evaluates a prompt of N random tokens from an empty cache; `tg N` runs N single-token
//! decode steps from an empty cache, each reading back its greedy token and feeding it on. Each
//! test runs once untimed (a whole prompt for pp, one token for tg, as llama-bench warms up),
//! then `-r` times. Beside tokens/s each row reports the effective weight bandwidth (weight
//! bytes read per token times tokens/s) and its share of the device's copy bandwidth, measured
//! first. Progress goes to stderr; results to stdout as a markdown table, JSON, JSON lines or
//! CSV, with llama-bench's field names where a field means the same.

use std::path::PathBuf;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context, Result};
use clap::{Args, ValueEnum};
use indicatif::ProgressBar;
use rand::{Rng, SeedableRng};
use serde_json::{json, Value};
use tessera_models::llm::chat::strftime;
use tessera_models::llm::model::UBATCH;
use tessera_models::llm::presets::{self, Preset};
use tessera_models::llm::{LlamaModel, Logits, Session};
use tessera_quant::mix::fallback;
use tessera_runtime::bandwidth::{copy_bandwidth, CopyBandwidth, DEFAULT_COPY_BYTES};
use tessera_runtime::io::gguf::GgufFile;
use tessera_runtime::{enumerate_adapters, DType, DeviceSelector, Gpu, RuntimeError};

use crate::{model_path, open_gpu, out, progress};

#[derive(Args)]
pub struct BenchArgs {
    /// GGUF model file; without it (and without --synthetic), the default model.
    #[arg(short = 'm', long = "model", conflicts_with = "synthetic")]
    model: Option<PathBuf>,

    /// Benchmark a model of a published shape with random weights made on the device, nothing
    /// downloaded: smollm2-135m, llama-1b (Llama 3.2 1B), llama-3b (Llama 3.2 3B) or llama-8b
    /// (Llama 3.1 8B).
    #[arg(long, value_name = "ARCH")]
    synthetic: Option<String>,

    /// The synthetic model's weight type (F32, F16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q2_K ... Q6_K,
    /// IQ4_NL; default Q4_0). Rows a type's blocks do not divide fall back as in llama-quantize.
    #[arg(long = "type", value_name = "TYPE")]
    weight_type: Option<String>,

    /// Prompt lengths to test (pp N): comma-separated, repeatable; 0 runs no prompt test.
    #[arg(
        short = 'p',
        long = "n-prompt",
        value_delimiter = ',',
        default_value = "512"
    )]
    n_prompt: Vec<usize>,

    /// Generation lengths to test (tg N): comma-separated, repeatable; 0 runs no generation test.
    #[arg(
        short = 'n',
        long = "n-gen",
        value_delimiter = ',',
        default_value = "128"
    )]
    n_gen: Vec<usize>,

    /// Timed repetitions of each test, after one untimed warm-up run.
    #[arg(
        short = 'r',
        long = "repetitions",
        default_value_t = 5,
        value_parser = clap::value_parser!(u32).range(1..)
    )]
    repetitions: u32,

    /// Adapter to run on: `all`, an index, a name or a backend (`vulkan`, `gl`, ...) from
    /// `tessera devices`, or `auto`.
    #[arg(long, env = "TESSERA_DEVICE", default_value = "auto")]
    device: String,

    /// Output format: md (a markdown table), json, jsonl (one object a line) or csv.
    #[arg(short = 'o', long = "output", value_enum, default_value_t = Format::Md)]
    output: Format,

    /// The same as `-o json`.
    #[arg(long, conflicts_with_all = ["output", "csv"])]
    json: bool,

    /// The same as `-o csv`.
    #[arg(long, conflicts_with = "output")]
    csv: bool,

    /// Only measure each device's copy bandwidth (256 MiB buffer to buffer, best of 5).
    #[arg(long, conflicts_with_all = [
        "model", "synthetic", "weight_type", "n_prompt", "n_gen", "repetitions", "seed",
    ])]
    memcpy: bool,

    /// Seed of the synthetic weights and the random prompt tokens.
    #[arg(long, default_value_t = 42)]
    seed: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Format {
    Md,
    Json,
    Jsonl,
    Csv,
}

/// Timed copies per bandwidth measurement.
const COPY_REPEATS: usize = 5;

/// Where the weights come from.
enum Source {
    /// A GGUF file, opened (and its header read) once for every device.
    File {
        path: PathBuf,
        file: GgufFile,
    },
    Synthetic {
        preset: Preset,
        dtype: DType,
    },
}

/// One test: a prompt of `n_prompt` tokens, or `n_gen` decode steps.
#[derive(Clone, Copy)]
struct Test {
    n_prompt: usize,
    n_gen: usize,
}

impl Test {
    fn name(self) -> String {
        if self.n_gen == 0 {
            format!("pp{}", self.n_prompt)
        } else {
            format!("tg{}", self.n_gen)
        }
    }

    fn tokens(self) -> usize {
        self.n_prompt + self.n_gen
    }
}

/// Runs `tessera bench`.
pub fn run(args: BenchArgs) -> Result<()> {
    let format = match (args.json, args.csv) {
        (true, _) => Format::Json,
        (_, true) => Format::Csv,
        _ => args.output,
    };
    let devices = selectors(&args.device)?;
    if args.memcpy {
        return memcpy(&devices, format);
    }
    let source = source(&args)?;
    let tests: Vec<Test> = (args.n_prompt.iter().filter(|&&p| p > 0))
        .map(|&n_prompt| Test { n_prompt, n_gen: 0 })
        .chain((args.n_gen.iter().filter(|&&n| n > 0)).map(|&n_gen| Test { n_prompt: 0, n_gen }))
        .collect();
    if tests.is_empty() {
        bail!("nothing to run: every -p and -n is 0; give a prompt or generation length");
    }
    // Every test starts from an empty cache: the context holds the longest test.
    let longest = |v: &[usize]| v.iter().copied().max().unwrap_or(0);
    let n_ctx = longest(&args.n_prompt).max(longest(&args.n_gen));
    if let Source::Synthetic { preset, .. } = &source {
        check_context(n_ctx, preset.config.n_ctx_train)?;
    }

    let mut printer = Printer::new(format, BENCH_COLUMNS);
    let mut copies = Vec::new();
    for selector in devices {
        let plan = Plan {
            source: &source,
            tests: &tests,
            n_ctx,
            repetitions: args.repetitions,
            seed: args.seed,
        };
        match bench_device(&selector, &plan, &mut printer) {
            Ok(copy) => copies.push(copy),
            Err(e) => {
                // What was measured stays readable: the JSON array is closed before the error.
                // With nothing measured nothing is printed, so that no empty result looks like
                // one.
                if printer.records > 0 {
                    let _ = printer.finish();
                }
                return Err(e);
            }
        }
    }
    printer.finish()?;
    if format == Format::Md {
        let mut notes = String::from(
            "\neff GB/s: weight bytes a decode step reads x t/s (for pp rows the weights are \
             read once per batch of up to 512 tokens: this shows their reuse, not traffic).\n\
             copy share: eff GB/s over the device's copy bandwidth (bytes read + written per \
             second, best of 5 copies of 256 MiB):",
        );
        for (device, copy) in &copies {
            notes += &format!("\n  {device}: {:.2} GB/s", copy.best_gbs());
        }
        out(notes)?;
    }
    Ok(())
}

/// What runs on each device.
struct Plan<'a> {
    source: &'a Source,
    tests: &'a [Test],
    n_ctx: usize,
    repetitions: u32,
    seed: u64,
}

/// Measures the device's copy bandwidth, loads the model and runs every test on it, printing
/// a record per test; returns the device's label and copy bandwidth for the notes.
fn bench_device(
    selector: &DeviceSelector,
    plan: &Plan,
    printer: &mut Printer,
) -> Result<(String, CopyBandwidth)> {
    let gpu = open_gpu(selector)?;
    let runs = plan.tests.len() * plan.repetitions as usize;
    let bar = progress::bench_bar(runs, gpu.name());
    bar.set_message("measuring the copy bandwidth");
    let copy = copy_bandwidth(&gpu, DEFAULT_COPY_BYTES, COPY_REPEATS)
        .with_context(|| format!("measuring the copy bandwidth of {}", gpu.name()))?;

    bar.set_message("loading the model");
    let model = load(plan.source, &gpu, plan.seed)?;
    check_context(plan.n_ctx, model.config.n_ctx_train)?;
    let mut session = Session::new(&model, plan.n_ctx).with_context(|| {
        format!(
            "making a KV cache of {} tokens (the longest -p or -n) on {}",
            plan.n_ctx,
            gpu.name()
        )
    })?;
    let about = About::new(&gpu, plan.source, &model, &copy);

    let mut rng = rand::rngs::StdRng::seed_from_u64(plan.seed);
    for &test in plan.tests {
        let test_time = strftime("%Y-%m-%dT%H:%M:%SZ", unix_now());
        let samples_ns = time_test(&mut session, test, plan.repetitions, &mut rng, &bar)
            .with_context(|| format!("running {} on {}", test.name(), gpu.name()))?;
        let row = Row {
            about: &about,
            test,
            n_ubatch: UBATCH.min(plan.n_ctx),
            test_time,
            samples_ns,
        };
        bar.suspend(|| printer.record(&row.fields(), &row.cells()))?;
    }
    bar.finish_and_clear();
    Ok((format!("{} ({})", gpu.name(), gpu.backend()), copy))
}

/// Adapters to run on: every one for `all`, else the one the selector names.
fn selectors(device: &str) -> Result<Vec<DeviceSelector>> {
    if device.trim().eq_ignore_ascii_case("all") {
        let count = enumerate_adapters().len();
        if count == 0 {
            return Err(RuntimeError::NoAdapter.into());
        }
        return Ok((0..count).map(DeviceSelector::Index).collect());
    }
    let Ok(selector) = device.parse::<DeviceSelector>();
    Ok(vec![selector])
}

fn source(args: &BenchArgs) -> Result<Source> {
    let Some(arch) = &args.synthetic else {
        if args.weight_type.is_some() {
            bail!("--type sets the weights of a --synthetic model; a model file has its own types");
        }
        let path = model_path(&args.model)?;
        // A file that is no GGUF model is named before any device is opened and measured.
        let file = GgufFile::open(&path).with_context(|| format!("opening {}", path.display()))?;
        return Ok(Source::File { path, file });
    };
    let Some(preset) = presets::preset(arch) else {
        bail!(
            "unknown --synthetic architecture `{arch}`; known: {}",
            presets::preset_names()
        );
    };
    let name = args.weight_type.as_deref().unwrap_or("Q4_0");
    let Some(dtype) = DType::ALL
        .into_iter()
        .find(|d| d.name().eq_ignore_ascii_case(name.trim()))
    else {
        let names: Vec<&str> = DType::ALL.iter().map(|d| d.name()).collect();
        bail!(
            "unknown --type `{name}`; the weight types are {}",
            names.join(", ")
        );
    };
    Ok(Source::Synthetic { preset, dtype })
}

fn check_context(n_ctx: usize, n_ctx_train: usize) -> Result<()> {
    if n_ctx > n_ctx_train {
        bail!(
            "the longest test (-p or -n) is {n_ctx} tokens, more than the {n_ctx_train} the \
             model was trained for; give shorter tests"
        );
    }
    Ok(())
}

fn load(source: &Source, gpu: &std::sync::Arc<Gpu>, seed: u64) -> Result<LlamaModel> {
    Ok(match source {
        Source::File { path, file } => LlamaModel::load(gpu.clone(), file)
            .with_context(|| format!("loading model {}", path.display()))?,
        Source::Synthetic { preset, dtype } => {
            let dtype = *dtype;
            let dtype_of = move |_: &str, cols: usize| fallback(dtype, cols as u64).dtype;
            let config = preset.config.clone();
            LlamaModel::synthetic(gpu.clone(), config, preset.tied_output, seed, dtype_of)
                .with_context(|| {
                    format!("making the synthetic {} on {}", preset.name, gpu.name())
                })?
        }
    })
}

/// One warm-up run of `test`, then `repetitions` timed ones; their durations in ns.
fn time_test(
    session: &mut Session,
    test: Test,
    repetitions: u32,
    rng: &mut impl Rng,
    bar: &ProgressBar,
) -> Result<Vec<u64>> {
    let name = test.name();
    let n_vocab = session.model().config.n_vocab as u32;
    let mut run = |n_prompt: usize, n_gen: usize| -> Result<u64> {
        session.reset();
        let prompt: Vec<u32> = (0..n_prompt)
            .map(|_| rng.random_range(0..n_vocab))
            .collect();
        let mut token = rng.random_range(0..n_vocab);
        let start = Instant::now();
        if n_prompt > 0 {
            session.eval(&prompt, Logits::Last)?;
        }
        for _ in 0..n_gen {
            token = session.eval_greedy(&[token])?;
        }
        Ok(start.elapsed().as_nanos().max(1) as u64)
    };
    bar.set_message(format!("{name} warm-up"));
    run(test.n_prompt, test.n_gen.min(1))?;
    let mut samples = Vec::new();
    for rep in 1..=repetitions {
        bar.set_message(format!("{name} {rep}/{repetitions}"));
        samples.push(run(test.n_prompt, test.n_gen)?);
        bar.inc(1);
    }
    Ok(samples)
}

fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

/// What every row of one device and model shares.
struct About {
    cpu_info: String,
    device: String,
    backend: String,
    driver: String,
    model_filename: String,
    model_type: String,
    synthetic: bool,
    model_size: usize,
    model_n_params: usize,
    n_gpu_layers: usize,
    weight_bytes_per_token: usize,
    copy_bw_gbs: f64,
    /// Settings that change decode speed on CPU devices, recorded so that runs compare like
    /// with like: weights read through textures, driver threads pinned, and the row length (in
    /// groups of 32) up to which the decode mat-vec is unrolled.
    weight_textures: bool,
    pinned_threads: usize,
    matvec_unroll: usize,
}

impl About {
    fn new(gpu: &Gpu, source: &Source, model: &LlamaModel, copy: &CopyBandwidth) -> About {
        let sizes = model.tensor_sizes();
        let model_size = sizes.iter().map(|t| t.bytes).sum();
        let model_n_params: usize = sizes.iter().map(|t| t.elements).sum();
        // The type holding most matrix bytes, as llama-bench names a model by its file type.
        let mut by_type: Vec<(DType, usize)> = Vec::new();
        for t in sizes.iter().filter(|t| t.is_matrix) {
            match by_type.iter_mut().find(|(d, _)| *d == t.dtype) {
                Some((_, bytes)) => *bytes += t.bytes,
                None => by_type.push((t.dtype, t.bytes)),
            }
        }
        let main_type = by_type
            .iter()
            .max_by_key(|(_, b)| *b)
            .map_or("?", |(d, _)| d.name());
        let mostly = if by_type.len() > 1 { "mostly " } else { "" };
        let (model_filename, synthetic) = match source {
            Source::File { path, .. } => (path.display().to_string(), false),
            Source::Synthetic { preset, .. } => (format!("synthetic:{}", preset.name), true),
        };
        let info = gpu.info();
        About {
            cpu_info: cpu_info(),
            device: gpu.name().to_string(),
            backend: gpu.backend(),
            driver: format!("{} {}", info.driver, info.driver_info)
                .trim()
                .to_string(),
            model_filename,
            model_type: format!(
                "{} {} {mostly}{main_type}",
                model.config.architecture,
                short_count(model_n_params as f64)
            ),
            synthetic,
            model_size,
            model_n_params,
            n_gpu_layers: model.config.n_layer + 1,
            weight_bytes_per_token: model.decode_weight_bytes(),
            copy_bw_gbs: copy.best_gbs(),
            weight_textures: gpu.weight_textures(),
            pinned_threads: gpu.pinned_threads().len(),
            matvec_unroll: tessera_runtime::ops::linear::max_unrolled_groups(),
        }
    }
}

/// The CPU's model name, from /proc/cpuinfo where there is one.
fn cpu_info() -> String {
    let text = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    text.lines()
        .find_map(|l| l.strip_prefix("model name"))
        .and_then(|rest| rest.split_once(':'))
        .map_or(String::new(), |(_, name)| name.trim().to_string())
}

/// 134515008 -> "135M", 1235814400 -> "1B", as llama.cpp names model sizes.
fn short_count(n: f64) -> String {
    if n >= 1e9 {
        format!("{:.0}B", n / 1e9)
    } else {
        format!("{:.0}M", n / 1e6)
    }
}

/// One test's result on one device.
struct Row<'a> {
    about: &'a About,
    test: Test,
    n_ubatch: usize,
    test_time: String,
    samples_ns: Vec<u64>,
}

/// Mean and sample standard deviation (n - 1), as llama-bench computes them; 0 for one sample.
fn mean_stddev(values: &[f64]) -> (f64, f64) {
    let n = values.len() as f64;
    let mean = values.iter().sum::<f64>() / n.max(1.0);
    if values.len() < 2 {
        return (mean, 0.0);
    }
    let var = values.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / (n - 1.0);
    (mean, var.sqrt())
}

impl Row<'_> {
    fn samples_ts(&self) -> Vec<f64> {
        let tokens = self.test.tokens() as f64;
        self.samples_ns
            .iter()
            .map(|&ns| 1e9 * tokens / ns as f64)
            .collect()
    }

    fn eff_bw_gbs(&self) -> f64 {
        let (avg_ts, _) = mean_stddev(&self.samples_ts());
        self.about.weight_bytes_per_token as f64 * avg_ts / 1e9
    }

    fn bw_share(&self) -> f64 {
        self.eff_bw_gbs() / self.about.copy_bw_gbs
    }

    /// Every field, in order; llama-bench's names first, then Tessera's.
    fn fields(&self) -> Vec<(&'static str, Value)> {
        let a = self.about;
        let ns: Vec<f64> = self.samples_ns.iter().map(|&v| v as f64).collect();
        let (avg_ns, stddev_ns) = mean_stddev(&ns);
        let (avg_ts, stddev_ts) = mean_stddev(&self.samples_ts());
        vec![
            (
                "build_commit",
                json!(concat!("tessera-", env!("CARGO_PKG_VERSION"))),
            ),
            ("cpu_info", json!(a.cpu_info)),
            ("gpu_info", json!(a.device)),
            ("backends", json!(a.backend)),
            ("model_filename", json!(a.model_filename)),
            ("model_type", json!(a.model_type)),
            ("model_size", json!(a.model_size)),
            ("model_n_params", json!(a.model_n_params)),
            ("n_batch", json!(self.n_ubatch)),
            ("n_ubatch", json!(self.n_ubatch)),
            ("type_k", json!("f32")),
            ("type_v", json!("f32")),
            ("n_gpu_layers", json!(a.n_gpu_layers)),
            ("n_prompt", json!(self.test.n_prompt)),
            ("n_gen", json!(self.test.n_gen)),
            ("n_depth", json!(0)),
            ("test_time", json!(self.test_time)),
            ("avg_ns", json!(avg_ns.round() as u64)),
            ("stddev_ns", json!(stddev_ns.round() as u64)),
            ("avg_ts", json!(avg_ts)),
            ("stddev_ts", json!(stddev_ts)),
            ("backend", json!(a.backend)),
            ("device", json!(a.device)),
            ("driver", json!(a.driver)),
            ("synthetic", json!(a.synthetic)),
            ("weight_bytes_per_token", json!(a.weight_bytes_per_token)),
            ("eff_bw_gbs", json!(self.eff_bw_gbs())),
            ("copy_bw_gbs", json!(a.copy_bw_gbs)),
            ("bw_share", json!(self.bw_share())),
            ("weight_textures", json!(a.weight_textures)),
            ("pinned_threads", json!(a.pinned_threads)),
            ("matvec_unroll", json!(a.matvec_unroll)),
            ("samples_ns", json!(self.samples_ns)),
            ("samples_ts", json!(self.samples_ts())),
        ]
    }

    /// The markdown table's cells, in [`BENCH_COLUMNS`] order.
    fn cells(&self) -> Vec<String> {
        let a = self.about;
        let (avg_ts, stddev_ts) = mean_stddev(&self.samples_ts());
        let synthetic = if a.synthetic { " (synthetic)" } else { "" };
        vec![
            format!("{}{synthetic}", a.model_type),
            binary_size(a.model_size as f64),
            match a.model_n_params as f64 {
                n if n >= 1e9 => format!("{:.2} B", n / 1e9),
                n => format!("{:.2} M", n / 1e6),
            },
            a.backend.clone(),
            a.device.clone(),
            a.driver.clone(),
            self.test.name(),
            format!("{avg_ts:.2} ± {stddev_ts:.2}"),
            format!("{:.2}", self.eff_bw_gbs()),
            format!("{:.0}%", 100.0 * self.bw_share()),
        ]
    }
}

/// Bytes as llama-bench shows model sizes: MiB below 1 GiB, else GiB.
fn binary_size(bytes: f64) -> String {
    if bytes < (1u64 << 30) as f64 {
        format!("{:.2} MiB", bytes / (1u64 << 20) as f64)
    } else {
        format!("{:.2} GiB", bytes / (1u64 << 30) as f64)
    }
}

/// A markdown column: its header, the width it is padded to, and whether it holds numbers
/// (right-aligned).
struct Column(&'static str, usize, bool);

const BENCH_COLUMNS: &[Column] = &[
    Column("model", 28, false),
    Column("size", 10, true),
    Column("params", 10, true),
    Column("backend", 7, false),
    Column("device", 32, false),
    Column("driver", 34, false),
    Column("test", 7, true),
    Column("t/s", 18, true),
    Column("eff GB/s", 8, true),
    Column("copy share", 10, true),
];

/// Writes records to stdout as they come, in one format.
struct Printer {
    format: Format,
    columns: &'static [Column],
    records: usize,
}

impl Printer {
    fn new(format: Format, columns: &'static [Column]) -> Printer {
        Printer {
            format,
            columns,
            records: 0,
        }
    }

    /// Prints one record: `fields` for the data formats, `cells` for the markdown table.
    fn record(&mut self, fields: &[(&'static str, Value)], cells: &[String]) -> Result<()> {
        let first = self.records == 0;
        self.records += 1;
        match self.format {
            Format::Md => {
                if first {
                    let rule = |c: &Column| {
                        let dashes = "-".repeat(c.1.max(c.0.chars().count()) - 1);
                        if c.2 {
                            format!("{dashes}:")
                        } else {
                            format!("{dashes}-")
                        }
                    };
                    out(self.markdown_line(|c| c.0.to_string()))?;
                    out(self.markdown_line(rule))?;
                }
                let mut cells = cells.iter();
                out(self.markdown_line(|_| cells.next().cloned().unwrap_or_default()))
            }
            Format::Json => {
                let body: Vec<String> = fields
                    .iter()
                    .map(|(k, v)| format!("    \"{k}\": {v}"))
                    .collect();
                let open = if first { "[\n" } else { "" };
                // The comma of the previous record goes before this one, so records stream.
                let sep = if first { "" } else { ",\n" };
                write_raw(&format!("{sep}{open}  {{\n{}\n  }}", body.join(",\n")))
            }
            Format::Jsonl => {
                let body: Vec<String> = fields
                    .iter()
                    .map(|(k, v)| format!("\"{k}\": {v}"))
                    .collect();
                out(format!("{{{}}}", body.join(", ")))
            }
            Format::Csv => {
                // Arrays (the samples) stay out of CSV, as in llama-bench.
                let scalars: Vec<&(&str, Value)> =
                    fields.iter().filter(|(_, v)| !v.is_array()).collect();
                if first {
                    let names: Vec<&str> = scalars.iter().map(|(k, _)| *k).collect();
                    out(names.join(","))?;
                }
                let values: Vec<String> = scalars
                    .iter()
                    .map(|(_, v)| {
                        let text = match v {
                            Value::String(s) => s.clone(),
                            other => other.to_string(),
                        };
                        format!("\"{}\"", text.replace('"', "\"\""))
                    })
                    .collect();
                out(values.join(","))
            }
        }
    }

    fn markdown_line(&self, mut cell: impl FnMut(&Column) -> String) -> String {
        let mut line = String::from("|");
        for c in self.columns {
            let text = cell(c);
            let width = c.1.max(c.0.chars().count());
            if c.2 {
                line += &format!(" {text:>width$} |");
            } else {
                line += &format!(" {text:<width$} |");
            }
        }
        line
    }

    /// Closes the JSON array (an empty one when nothing was recorded).
    fn finish(&mut self) -> Result<()> {
        match (self.format, self.records) {
            (Format::Json, 0) => out("[]"),
            (Format::Json, _) => out("\n]"),
            _ => Ok(()),
        }
    }
}

/// Writes text to stdout without a newline.
fn write_raw(text: &str) -> Result<()> {
    use std::io::Write;
    let mut stdout = std::io::stdout().lock();
    stdout
        .write_all(text.as_bytes())
        .and_then(|_| stdout.flush())
        .context("writing to stdout")
}

const MEMCPY_COLUMNS: &[Column] = &[
    Column("device", 32, false),
    Column("backend", 7, false),
    Column("driver", 34, false),
    Column("copied", 10, true),
    Column("best GB/s", 9, true),
    Column("median GB/s", 11, true),
];

/// `--memcpy`: each device's copy bandwidth alone.
fn memcpy(devices: &[DeviceSelector], format: Format) -> Result<()> {
    let mut printer = Printer::new(format, MEMCPY_COLUMNS);
    for selector in devices {
        let gpu = open_gpu(selector)?;
        let bar = progress::bench_bar(1, gpu.name());
        bar.set_message("measuring the copy bandwidth");
        let copy = copy_bandwidth(&gpu, DEFAULT_COPY_BYTES, COPY_REPEATS)
            .with_context(|| format!("measuring the copy bandwidth of {}", gpu.name()))?;
        bar.finish_and_clear();
        let info = gpu.info();
        let driver = format!("{} {}", info.driver, info.driver_info)
            .trim()
            .to_string();
        let fields = vec![
            ("gpu_info", json!(gpu.name())),
            ("backend", json!(gpu.backend())),
            ("driver", json!(driver)),
            ("copy_bytes", json!(copy.bytes)),
            ("copy_bw_gbs", json!(copy.best_gbs())),
            ("copy_bw_median_gbs", json!(copy.median_gbs())),
            ("samples_s", json!(copy.samples_s)),
        ];
        let cells = vec![
            gpu.name().to_string(),
            gpu.backend(),
            driver,
            binary_size(copy.bytes as f64),
            format!("{:.2}", copy.best_gbs()),
            format!("{:.2}", copy.median_gbs()),
        ];
        printer.record(&fields, &cells)?;
    }
    printer.finish()?;
    if format == Format::Md {
        out(format!(
            "\nGB/s: bytes read plus bytes written per second (as STREAM's Copy), one \
             buffer-to-buffer copy per submit, timed to the end of the wait; best and median of \
             {COPY_REPEATS} after a warm-up"
        ))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mean_and_sample_stddev_follow_llama_bench() {
        let (mean, sd) = mean_stddev(&[2.0, 4.0, 6.0]);
        assert_eq!(mean, 4.0);
        assert_eq!(sd, 2.0);
        assert_eq!(mean_stddev(&[5.0]), (5.0, 0.0));
    }

    #[test]
    fn sizes_read_as_llama_bench_prints_them() {
        assert_eq!(short_count(134_515_008.0), "135M");
        assert_eq!(short_count(8_030_261_248.0), "8B");
        assert_eq!(binary_size((3u64 << 29) as f64), "1.50 GiB");
        assert_eq!(binary_size((75u64 << 20) as f64), "75.00 MiB");
        assert_eq!(
            Test {
                n_prompt: 512,
                n_gen: 0
            }
            .name(),
            "pp512"
        );
        assert_eq!(
            Test {
                n_prompt: 0,
                n_gen: 128
            }
            .name(),
            "tg128"
        );
    }
}
