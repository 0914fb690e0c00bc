//! Hugging Face llama checkpoints (a folder of config.json, safetensors weights and
//! tokenizer.json) converted to a GGUF file as llama.cpp's `convert_hf_to_gguf.py` writes it:
//! the `llama.*` and `tokenizer.ggml.*` keys, GGUF tensor names, q and k rows permuted for
//! GGML's adjacent-pair RoPE, weights as F32 (F16 where the checkpoint is F16).
//!
//! Everything is checked before the file is written (the architecture, every tensor's name,
//! shape and dtype, the tokenizer), and the file is written atomically with tensors streamed
//! from the mapped checkpoint, so memory stays small whatever the model's size.

mod config;
mod tokenizer;
mod weights;

use std::cell::Cell;
use std::path::{Path, PathBuf};
use std::time::Instant;

use tessera_runtime::io::gguf::MetaValue;
use tessera_runtime::io::gguf_write::{GgufWriteError, GgufWriter, TensorData};

pub use config::{HfConfig, SUPPORTED_MODEL_TYPES};
pub use tokenizer::{read_tokenizer, HfTokenizer};
pub use weights::hf_row_for;
use weights::Checkpoint;

/// Why a folder cannot be converted; each message names the file at fault and the way out.
#[derive(Debug, thiserror::Error)]
pub enum HfError {
    #[error(
        "{} is not a model folder: it has no config.json; pass a GGUF file, or a Hugging Face \
         folder with config.json, tokenizer.json and *.safetensors",
        dir.display()
    )]
    NoConfig { dir: PathBuf },

    #[error("{} is missing: {hint}", path.display())]
    MissingFile { path: PathBuf, hint: String },

    #[error("cannot read {}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    #[error("{} is not valid JSON: {source}", path.display())]
    Json {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },

    #[error("config.json: {0}")]
    Config(String),

    #[error(
        "config.json: model_type `{found}` is not one Tessera converts (it converts: {}); \
         convert this model with llama.cpp's convert_hf_to_gguf.py if llama.cpp supports it",
        SUPPORTED_MODEL_TYPES.join(", ")
    )]
    UnknownModelType { found: String },

    #[error(
        "{} is not a readable safetensors file ({reason}); it may be truncated or damaged: \
         download it again",
        path.display()
    )]
    Safetensors { path: PathBuf, reason: String },

    #[error(
        "the checkpoint has no tensor `{name}` ({why}); the download may be incomplete, or the \
         model is not a plain llama"
    )]
    MissingTensor { name: String, why: String },

    #[error("tensor `{name}` is stored twice, in {} and in {}", first.display(), second.display())]
    DuplicateTensor {
        name: String,
        first: PathBuf,
        second: PathBuf,
    },

    #[error("tensor `{name}` has shape {found:?}, but config.json ({why}) gives {expected:?}")]
    Shape {
        name: String,
        found: Vec<usize>,
        expected: Vec<usize>,
        why: String,
    },

    #[error(
        "tensor `{name}` is {dtype}; Tessera converts F32, F16 and BF16 checkpoints only (a \
         quantized checkpoint must be dequantized first, e.g. saved again in bfloat16)"
    )]
    DType { name: String, dtype: String },

    #[error(
        "tensor `{name}` ({}) is not part of the llama graph Tessera runs (token embedding, \
         attention and MLP projections, RMS norms, output); models with biases or extra \
         modules cannot be converted",
        path.display()
    )]
    UnexpectedTensor { name: String, path: PathBuf },

    #[error("tokenizer.json: {0}")]
    Tokenizer(String),

    #[error(transparent)]
    Write(#[from] GgufWriteError),
}

/// What a conversion read and wrote.
#[derive(Clone, Debug, serde::Serialize)]
pub struct ConvertReport {
    /// The checkpoint's tensor dtypes (F32, F16, BF16), in order of first appearance.
    pub source_dtypes: Vec<String>,
    /// The safetensors files read.
    pub files: usize,
    pub tensors: usize,
    pub params: u64,
    /// `tokenizer.ggml.pre` chosen from tokenizer.json's pre-tokenizer.
    pub pre_tokenizer: String,
    /// Bytes of the GGUF file written.
    pub bytes: u64,
    pub seconds: f64,
}

/// For each tensor of a checkpoint of `config`, in GGUF order: its GGUF name, its HF name and,
/// for q and k, the head size whose rows the conversion reorders.
pub fn expected_tensor_names(config: &HfConfig) -> Vec<(String, String, Option<usize>)> {
    weights::expected_tensors(config)
        .into_iter()
        .map(|(hf, gguf, _, permute)| (gguf, hf, permute))
        .collect()
}

/// Whether `path` should be read as a Hugging Face folder rather than a GGUF file.
pub fn is_hf_folder(path: &Path) -> bool {
    path.is_dir()
}

/// Converts the checkpoint folder `dir` into the GGUF file `out` (written atomically).
/// `progress(done, total)` is called in bytes of tensor data as the file is written.
pub fn convert(
    dir: &Path,
    out: &Path,
    progress: &dyn Fn(u64, u64),
) -> Result<ConvertReport, HfError> {
    let start = Instant::now();

    // 1. The hyperparameters, the tokenizer and the tensor table, all checked before writing.
    let config = HfConfig::read(dir)?;
    let tokenizer = read_tokenizer(dir, &config)?;
    let checkpoint = Checkpoint::open(dir)?;
    let plan = weights::plan(&checkpoint, &config)?;

    // 2. Metadata in the order llama.cpp's converter writes it. The writer will hold the
    //    tensors' readers, which borrow the byte counter, so the counter is declared first.
    let total: u64 = plan.iter().map(|t| t.out_bytes()).sum();
    let done = Cell::new(0u64);
    let report_bytes = |n: u64| {
        done.set(done.get() + n);
        progress(done.get(), total);
    };
    let mut writer = GgufWriter::new();
    let all_f32 = plan.iter().all(|t| t.out_ggml_type() == 0);
    let name = dir
        .canonicalize()
        .ok()
        .and_then(|d| d.file_name().map(|n| n.to_string_lossy().into_owned()))
        .unwrap_or_else(|| "model".to_string());
    writer.set("general.architecture", MetaValue::String("llama".into()));
    writer.set("general.type", MetaValue::String("model".into()));
    writer.set("general.name", MetaValue::String(name));
    for (key, value) in config.gguf_metadata() {
        writer.set(key, value);
    }
    // LLAMA_FTYPE_ALL_F32 or LLAMA_FTYPE_MOSTLY_F16.
    writer.set("general.file_type", MetaValue::U32(u32::from(!all_f32)));
    for (key, value) in tokenizer.gguf_metadata() {
        writer.set(key, value);
    }

    // 3. Tensors, streamed from the mapped files as the writer asks for them.
    let mut source_dtypes: Vec<String> = Vec::new();
    let mut params = 0u64;
    for t in &plan {
        let dtype = t.source_dtype_name();
        if !source_dtypes.iter().any(|d| d == dtype) {
            source_dtypes.push(dtype.to_string());
        }
        params += t.elements();
        let reader = t.reader(&checkpoint, &report_bytes);
        writer.add_tensor(
            t.gguf_name.clone(),
            &t.gguf_dims(),
            t.out_ggml_type(),
            TensorData::Reader(Box::new(reader)),
        )?;
    }
    let bytes = writer.write(out)?;
    Ok(ConvertReport {
        source_dtypes,
        files: checkpoint.file_count(),
        tensors: plan.len(),
        params,
        pre_tokenizer: tokenizer.spec.pre.clone(),
        bytes,
        seconds: start.elapsed().as_secs_f64(),
    })
}

/// Reads and parses a JSON file of the folder.
fn read_json(path: &Path) -> Result<serde_json::Value, HfError> {
    let text = std::fs::read_to_string(path).map_err(|source| HfError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    serde_json::from_str(&text).map_err(|source| HfError::Json {
        path: path.to_path_buf(),
        source,
    })
}
