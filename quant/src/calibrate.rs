//! `quant calibrate`: a GGUF model in, a quantized GGUF model out, by one of four methods.
//!
//! - `rtn`: every block rounded to nearest (llama.cpp's reference quantizer).
//! - `imatrix`: block scales searched to minimise the error weighted by each input channel's
//!   mean x^2 over the calibration tokens (llama.cpp's quantizer with an importance matrix).
//! - `gptq`: [`crate::gptq`], with the Hessian of each layer's inputs.
//! - `awq`: [`crate::awq`], per-channel scales folded into the preceding norm or linear, then
//!   rounded to nearest.
//!
//! The source's weights are dequantized to f32 first (a quantized source is reported as such).
//! The output keeps every metadata key of the source, records its provenance under
//! `quantize.*` (with the source's format: a GGUF file, or a safetensors folder converted to
//! one), and is written atomically.

use std::collections::HashMap;
use std::path::Path;
use std::time::Instant;

use tessera_models::hf::ConvertReport;
use tessera_runtime::io::gguf::{GgufFile, MetaValue, TensorInfo, ValueType};
use tessera_runtime::io::gguf_write::GgufWriter;
use tessera_runtime::{dequantize_row, DType};

use crate::awq;
use crate::codec;
use crate::gptq::{self, GptqOptions};
use crate::mix::{self, Choice, Target, TensorShape};
use crate::stats::ModelStats;
use crate::QuantError;

/// The quantization method.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Method {
    Rtn,
    Imatrix,
    Gptq,
    Awq,
}

impl Method {
    pub fn name(self) -> &'static str {
        match self {
            Method::Rtn => "rtn",
            Method::Imatrix => "imatrix",
            Method::Gptq => "gptq",
            Method::Awq => "awq",
        }
    }

    pub fn parse(s: &str) -> Option<Method> {
        [Method::Rtn, Method::Imatrix, Method::Gptq, Method::Awq]
            .into_iter()
            .find(|m| m.name() == s.to_ascii_lowercase())
    }

    /// Whether the method reads calibration statistics.
    pub fn needs_data(self) -> bool {
        self != Method::Rtn
    }
}

/// Where the calibration came from, recorded in the output file.
#[derive(Clone, Debug, Default)]
pub struct Provenance {
    pub datasets: Vec<String>,
    pub data_hash: String,
    pub samples: usize,
    pub seq_len: usize,
    pub seed: u64,
    /// An importance-matrix file the statistics came from instead, if any.
    pub imatrix_file: Option<String>,
    /// The conversion, when the model given was a safetensors folder.
    pub converted_from: Option<ConvertReport>,
}

/// Everything `quantize_model` needs besides the model and its statistics.
#[derive(Clone, Debug)]
pub struct Plan {
    pub method: Method,
    pub target: Target,
    pub overrides: Vec<(String, DType)>,
    pub gptq: GptqOptions,
    pub provenance: Provenance,
}

/// One tensor's outcome, for the report.
#[derive(Clone, Debug, serde::Serialize)]
pub struct TensorReport {
    pub name: String,
    pub from: String,
    pub to: String,
    pub fallback_from: Option<String>,
    pub note: Option<String>,
}

/// What a calibration produced.
#[derive(Clone, Debug, serde::Serialize)]
pub struct CalibrateReport {
    pub method: String,
    pub target: String,
    pub source_types: Vec<String>,
    /// True when the source's weights were quantized (they were dequantized first).
    pub source_was_quantized: bool,
    /// The conversion, when the source was a safetensors folder.
    pub converted_from: Option<ConvertReport>,
    pub bytes_before: u64,
    pub bytes_after: u64,
    /// Weight parameters in the matrices and vectors of the model.
    pub params: u64,
    /// Bits per weight of the output's tensor data.
    pub bpw: f64,
    pub tensors: Vec<TensorReport>,
    pub seconds: f64,
}

/// Dequantizes a tensor of any runtime type to f32.
pub fn tensor_f32(file: &GgufFile, info: &TensorInfo) -> Result<Vec<f32>, QuantError> {
    let id = info.ggml_type().id();
    let dtype = DType::from_ggml_id(id).ok_or_else(|| {
        QuantError::Model(format!(
            "tensor `{}` has type {}, which Tessera cannot decode; convert the model to F16, \
             F32 or a type in: {}",
            info.name(),
            info.ggml_type().name(),
            mix::WRITABLE.map(|d| d.name()).join(", ")
        ))
    })?;
    let n = info.n_elements() as usize;
    let k = info.dims().first().copied().unwrap_or(1) as usize;
    let row_bytes = dtype.row_bytes(k)?;
    let data = file.tensor_data(info);
    let mut out = vec![0.0f32; n];
    for (r, row) in out.chunks_exact_mut(k.max(1)).enumerate() {
        dequantize_row(dtype, &data[r * row_bytes..(r + 1) * row_bytes], row);
    }
    Ok(out)
}

/// Encodes an f32 tensor (`[rows, k]`) as `dtype`.
fn encode_plain(values: &[f32], dtype: DType) -> Vec<u8> {
    match dtype {
        DType::F32 => bytemuck_f32(values),
        _ => values
            .iter()
            .flat_map(|&v| half::f16::from_f32(v).to_le_bytes())
            .collect(),
    }
}

fn bytemuck_f32(values: &[f32]) -> Vec<u8> {
    values.iter().flat_map(|v| v.to_le_bytes()).collect()
}

/// Quantizes `file` as `plan` says into `out`, with `stats` from the calibration (None for
/// `rtn`). `log` receives one line per notable event (fallbacks, skipped folds, damping).
pub fn quantize_model(
    file: &GgufFile,
    stats: Option<&ModelStats>,
    plan: &Plan,
    out: &Path,
    progress: &mut dyn FnMut(usize, usize, &str),
    log: &mut dyn FnMut(String),
) -> Result<CalibrateReport, QuantError> {
    let start = Instant::now();
    let infos: Vec<&TensorInfo> = file.tensors().collect();
    let shapes: Vec<TensorShape> = infos
        .iter()
        .map(|t| TensorShape {
            name: t.name().to_string(),
            dims: t.dims().to_vec(),
        })
        .collect();
    let n_layer = file
        .get_u32_opt(&format!(
            "{}.block_count",
            file.architecture().unwrap_or("llama")
        ))
        .ok()
        .flatten()
        .unwrap_or(0) as usize;
    let arch = file.architecture().unwrap_or("llama").to_string();
    let heads = file
        .get_u32_opt(&format!("{arch}.attention.head_count"))
        .ok()
        .flatten();
    let kv_heads = file
        .get_u32_opt(&format!("{arch}.attention.head_count_kv"))
        .ok()
        .flatten()
        .or(heads);
    let n_gqa = match (heads, kv_heads) {
        (Some(h), Some(kv)) if kv > 0 => (h / kv) as usize,
        _ => 1,
    };
    let overrides = plan
        .overrides
        .iter()
        .map(|(p, d)| {
            fancy_regex::Regex::new(p)
                .map(|re| (re, *d))
                .map_err(|e| QuantError::Data(format!("--tensor-type pattern `{p}`: {e}")))
        })
        .collect::<Result<Vec<_>, _>>()?;
    let choices = mix::choose(&shapes, plan.target, n_layer, n_gqa, &overrides);
    if let Target::Pure(wanted) = plan.target {
        let chosen: Vec<&Choice> = choices.iter().flatten().collect();
        let none_fit = chosen
            .iter()
            .all(|c| c.fallback_from.is_some() && c.dtype == DType::F16);
        if wanted.block_size() > 1 && !chosen.is_empty() && none_fit {
            return Err(QuantError::Shape(format!(
                "no weight matrix of this model can take {}: their rows are not multiples of {}                  (nor of 32, for a fallback type); write F16 or F32 instead",
                wanted.name(),
                wanted.block_size()
            )));
        }
    }

    let mut source_types: Vec<String> = Vec::new();
    let mut source_was_quantized = false;
    for t in &infos {
        let name = t.ggml_type().name().to_string();
        if !matches!(name.as_str(), "F32" | "F16" | "BF16") {
            source_was_quantized = true;
        }
        if !source_types.contains(&name) {
            source_types.push(name);
        }
    }
    if source_was_quantized {
        log(format!(
            "the source is already quantized ({}): its weights are dequantized to f32 first, and \
             that is the base this quantization approximates",
            source_types.join(", ")
        ));
    }

    // Every tensor as f32 (the AWQ fold rewrites some before they are encoded).
    let mut values: Vec<Vec<f32>> = Vec::with_capacity(infos.len());
    for t in &infos {
        values.push(tensor_f32(file, t)?);
    }
    let mut notes: Vec<Option<String>> = vec![None; infos.len()];
    if plan.method == Method::Awq {
        let stats = stats.ok_or_else(|| QuantError::Data("AWQ needs calibration data".into()))?;
        let index = |name: &str| infos.iter().position(|t| t.name() == name);
        let folds = awq::search_and_fold(
            &shapes,
            &mut values,
            &choices,
            stats,
            n_gqa,
            &index,
            progress,
        )?;
        for f in folds {
            log(f.describe());
            for t in &f.tensors {
                if let Some(i) = index(t) {
                    notes[i] = Some(format!("awq alpha {:.1}", f.alpha));
                }
            }
            // The divisor's tensor changed too: a norm vector must be written from `values`.
            if let Some(i) = index(&f.into) {
                let note = notes[i].take().map_or(String::new(), |n| n + "; ");
                notes[i] = Some(format!("{note}awq divisor of {} {}", f.layer, f.site));
            }
        }
    }

    let mut writer = GgufWriter::with_metadata_of(file);
    set_provenance(&mut writer, plan, stats, source_was_quantized);
    let mut tensors = Vec::with_capacity(infos.len());
    let mut factors: HashMap<usize, gptq::Factor> = HashMap::new();
    let mut bytes_after = 0u64;
    let mut params = 0u64;
    let total = infos.len();
    for (i, t) in infos.iter().enumerate() {
        progress(i, total, t.name());
        params += t.n_elements();
        let k = t.dims()[0] as usize;
        let rows = (t.n_elements() as usize) / k.max(1);
        let (dtype, bytes, fallback_from) = match choices[i] {
            None => {
                // Not a matrix: kept in its source type, or as f32 when AWQ rewrote it.
                if notes[i].is_some() || DType::from_ggml_id(t.ggml_type().id()).is_none() {
                    (DType::F32, bytemuck_f32(&values[i]), None)
                } else {
                    let d = DType::from_ggml_id(t.ggml_type().id()).unwrap_or(DType::F32);
                    (d, file.tensor_data(t).to_vec(), None)
                }
            }
            Some(Choice {
                dtype,
                fallback_from,
            }) => {
                if let Some(from) = fallback_from {
                    log(format!(
                        "{}: rows of {k} do not fit {}'s blocks of {}; using {}",
                        t.name(),
                        from.name(),
                        from.block_size(),
                        dtype.name()
                    ));
                }
                let bytes = encode_tensor(
                    t.name(),
                    &values[i],
                    rows,
                    k,
                    dtype,
                    plan,
                    stats,
                    &mut factors,
                    log,
                )?;
                (dtype, bytes, fallback_from)
            }
        };
        bytes_after += bytes.len() as u64;
        tensors.push(TensorReport {
            name: t.name().to_string(),
            from: t.ggml_type().name().to_string(),
            to: dtype.name().to_string(),
            fallback_from: fallback_from.map(|d| d.name().to_string()),
            note: notes[i].clone(),
        });
        writer
            .add_tensor(t.name(), t.dims(), dtype.ggml_id(), bytes)
            .map_err(|e| QuantError::Model(e.to_string()))?;
        values[i] = Vec::new();
    }
    progress(total, total, "writing");
    writer
        .write(out)
        .map_err(|e| QuantError::Model(e.to_string()))?;
    let bytes_before: u64 = infos.iter().map(|t| t.size_bytes()).sum();
    Ok(CalibrateReport {
        method: plan.method.name().to_string(),
        target: plan.target.to_string(),
        source_types,
        source_was_quantized,
        converted_from: plan.provenance.converted_from.clone(),
        bytes_before,
        bytes_after,
        params,
        bpw: bytes_after as f64 * 8.0 / params.max(1) as f64,
        tensors,
        seconds: start.elapsed().as_secs_f64(),
    })
}

/// Encodes one weight matrix by the plan's method.
#[allow(clippy::too_many_arguments)]
fn encode_tensor(
    name: &str,
    w: &[f32],
    rows: usize,
    k: usize,
    dtype: DType,
    plan: &Plan,
    stats: Option<&ModelStats>,
    factors: &mut HashMap<usize, gptq::Factor>,
    log: &mut dyn FnMut(String),
) -> Result<Vec<u8>, QuantError> {
    let Some(codec) = codec::for_type(dtype) else {
        return Ok(encode_plain(w, dtype));
    };
    let mut out = vec![0u8; rows * (k / codec.block) * codec.bytes];
    let site = stats.and_then(|s| s.for_tensor(name));
    match (plan.method, site) {
        (Method::Rtn, _) | (Method::Awq, _) => codec.quantize_rows(w, k, None, &mut out),
        (Method::Imatrix, Some(site)) => codec.quantize_rows(w, k, Some(&site.mean_sq()), &mut out),
        (Method::Gptq, Some(site)) if site.gram.is_some() => {
            let index = stats.and_then(|s| s.site_index(name)).unwrap_or(usize::MAX);
            if let std::collections::hash_map::Entry::Vacant(e) = factors.entry(index) {
                let h = site.gram.as_deref().unwrap_or_default();
                let f = gptq::Factor::new(h, site.count, k, plan.gptq)?;
                if f.damp != plan.gptq.damp {
                    log(format!("{name}: GPTQ damping raised to {}", f.damp));
                }
                e.insert(f);
            }
            let factor = &factors[&index];
            let rep = gptq::quantize_with(factor, w, rows, &codec, plan.gptq, &mut out)?;
            if rep.dead > 0 {
                log(format!(
                    "{name}: {} input channels never active; zeroed",
                    rep.dead
                ));
            }
        }
        (Method::Gptq, Some(site)) => {
            log(format!(
                "{name}: no Hessian gathered; importance-weighted rounding instead"
            ));
            codec.quantize_rows(w, k, Some(&site.mean_sq()), &mut out)
        }
        (_, None) => {
            log(format!(
                "{name}: no calibration statistics for this tensor's input; rounded to nearest"
            ));
            codec.quantize_rows(w, k, None, &mut out)
        }
    }
    Ok(out)
}

fn set_provenance(
    w: &mut GgufWriter,
    plan: &Plan,
    stats: Option<&ModelStats>,
    source_was_quantized: bool,
) {
    let s = |v: &str| MetaValue::String(v.to_string());
    w.set("general.file_type", MetaValue::U32(plan.target.file_type()));
    w.set("general.quantization_version", MetaValue::U32(2));
    w.set("quantize.tool", s("tessera quant calibrate"));
    w.set("quantize.method", s(plan.method.name()));
    w.set("quantize.type", s(&plan.target.to_string()));
    w.set(
        "quantize.source_dequantized",
        MetaValue::Bool(source_was_quantized),
    );
    let p = &plan.provenance;
    match &p.converted_from {
        None => w.set("quantize.source.format", s("gguf")),
        Some(c) => {
            w.set("quantize.source.format", s("safetensors"));
            w.set(
                "quantize.source.dtypes",
                MetaValue::Array {
                    elem_type: ValueType::String,
                    items: c.source_dtypes.iter().map(|d| s(d)).collect(),
                },
            );
        }
    }
    if plan.method.needs_data() {
        w.set(
            "quantize.calibration.datasets",
            MetaValue::Array {
                elem_type: ValueType::String,
                items: p.datasets.iter().map(|d| s(d)).collect(),
            },
        );
        w.set("quantize.calibration.sha256", s(&p.data_hash));
        w.set(
            "quantize.calibration.samples",
            MetaValue::U32(p.samples as u32),
        );
        w.set(
            "quantize.calibration.seq_len",
            MetaValue::U32(p.seq_len as u32),
        );
        w.set("quantize.calibration.seed", MetaValue::U64(p.seed));
        if let Some(stats) = stats {
            w.set(
                "quantize.calibration.tokens",
                MetaValue::U64(stats.tokens()),
            );
        }
        if let Some(f) = &p.imatrix_file {
            w.set("quantize.imatrix.file", s(f));
        }
    }
    if plan.method == Method::Gptq {
        w.set("quantize.gptq.damp", MetaValue::F32(plan.gptq.damp as f32));
        w.set(
            "quantize.gptq.act_order",
            MetaValue::Bool(plan.gptq.act_order),
        );
        w.set(
            "quantize.gptq.block",
            MetaValue::U32(plan.gptq.block as u32),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A one-layer GGUF holding an F32 `[rows, cols]` matrix and a norm vector.
    fn tiny_model(dir: &Path, cols: u64, rows: u64) -> GgufFile {
        let mut w = GgufWriter::new();
        w.set("general.architecture", MetaValue::String("llama".into()));
        w.set("llama.block_count", MetaValue::U32(1));
        let m: Vec<u8> = (0..cols * rows)
            .flat_map(|i| ((i as f32 * 0.37).sin() * 0.1).to_le_bytes())
            .collect();
        w.add_tensor("blk.0.ffn_down.weight", &[cols, rows], 0, m)
            .unwrap();
        let v: Vec<u8> = (0..cols).flat_map(|_| 1.0f32.to_le_bytes()).collect();
        w.add_tensor("blk.0.ffn_norm.weight", &[cols], 0, v)
            .unwrap();
        let path = dir.join("tiny.gguf");
        w.write(&path).unwrap();
        GgufFile::open(&path).unwrap()
    }

    fn plan(target: &str) -> Plan {
        Plan {
            method: Method::Rtn,
            target: Target::parse(target).unwrap(),
            overrides: Vec::new(),
            gptq: GptqOptions::default(),
            provenance: Provenance::default(),
        }
    }

    #[test]
    fn rtn_writes_each_type_and_keeps_vectors() {
        let dir = tempfile::tempdir().unwrap();
        let file = tiny_model(dir.path(), 256, 3);
        let src = tensor_f32(&file, file.tensor("blk.0.ffn_down.weight").unwrap()).unwrap();
        for ty in ["Q8_0", "Q4_K", "IQ4_NL", "F16"] {
            let out = dir.path().join(format!("{ty}.gguf"));
            let r = quantize_model(&file, None, &plan(ty), &out, &mut |_, _, _| {}, &mut |_| {})
                .unwrap();
            assert!(!r.source_was_quantized);
            let q = GgufFile::open(&out).unwrap();
            let t = q.tensor("blk.0.ffn_down.weight").unwrap();
            assert_eq!(t.ggml_type().name(), ty);
            let back = tensor_f32(&q, t).unwrap();
            let err = src
                .iter()
                .zip(&back)
                .map(|(a, b)| (a - b).abs())
                .fold(0.0, f32::max);
            assert!(err < 0.02, "{ty}: {err}");
            let norm = q.tensor("blk.0.ffn_norm.weight").unwrap();
            assert_eq!(norm.ggml_type().name(), "F32");
            assert_eq!(q.get_str("quantize.method").unwrap(), "rtn");
        }
    }

    #[test]
    fn a_type_no_matrix_can_take_is_an_error_and_writes_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let file = tiny_model(dir.path(), 100, 2);
        let out = dir.path().join("q.gguf");
        let e = quantize_model(
            &file,
            None,
            &plan("Q4_0"),
            &out,
            &mut |_, _, _| {},
            &mut |_| {},
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("Q4_0") && e.contains("F16"), "{e}");
        assert!(!out.exists());
        // A preset falls back per tensor (to F16 here), as llama-quantize does.
        let mut log = Vec::new();
        quantize_model(
            &file,
            None,
            &plan("Q4_K_M"),
            &out,
            &mut |_, _, _| {},
            &mut |l| log.push(l),
        )
        .unwrap();
        assert!(log.iter().any(|l| l.contains("F16")), "{log:?}");
    }
}
