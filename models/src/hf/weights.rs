//! The safetensors side of a checkpoint: one `model.safetensors` or the shards a
//! `model.safetensors.index.json` names, mapped read-only; the llama tensor names mapped to
//! GGUF's, shapes and dtypes checked against config.json; and the rows streamed out in GGUF's
//! order and type (q and k permuted, BF16 widened to F32).

use std::collections::{BTreeSet, HashMap};
use std::io::Read;
use std::path::{Path, PathBuf};

use safetensors::{Dtype, SafeTensors};

use super::config::HfConfig;
use super::{read_json, HfError};

/// One tensor of the checkpoint: where its bytes are and what they hold.
#[derive(Clone, Debug)]
struct Entry {
    file: usize,
    dtype: Dtype,
    shape: Vec<usize>,
    /// Byte range in the mapped file.
    start: usize,
    end: usize,
}

/// The mapped safetensors files of a folder and the tensors they hold.
pub struct Checkpoint {
    paths: Vec<PathBuf>,
    maps: Vec<memmap2::Mmap>,
    tensors: HashMap<String, Entry>,
}

impl Checkpoint {
    /// Maps `dir`'s weights: the shards of model.safetensors.index.json, else model.safetensors.
    pub fn open(dir: &Path) -> Result<Self, HfError> {
        let index = dir.join("model.safetensors.index.json");
        let names: Vec<String> = if index.is_file() {
            let v = read_json(&index)?;
            let map = v
                .get("weight_map")
                .and_then(|m| m.as_object())
                .ok_or_else(|| HfError::Safetensors {
                    path: index.clone(),
                    reason: "it has no `weight_map` object".into(),
                })?;
            let mut files = BTreeSet::new();
            for (tensor, file) in map {
                let file = file.as_str().ok_or_else(|| HfError::Safetensors {
                    path: index.clone(),
                    reason: format!("the file of `{tensor}` is {file}, not a file name"),
                })?;
                files.insert(file.to_string());
            }
            files.into_iter().collect()
        } else if dir.join("model.safetensors").is_file() {
            vec!["model.safetensors".to_string()]
        } else {
            let bin = dir.join("pytorch_model.bin").is_file();
            return Err(HfError::MissingFile {
                path: dir.join("model.safetensors"),
                hint: format!(
                    "the folder has neither model.safetensors nor model.safetensors.index.json{}",
                    if bin {
                        "; it holds PyTorch .bin weights, which must be saved as safetensors \
                         first"
                    } else {
                        ""
                    }
                ),
            });
        };

        let mut checkpoint = Checkpoint {
            paths: Vec::new(),
            maps: Vec::new(),
            tensors: HashMap::new(),
        };
        for name in names {
            // A name from the index stays inside the folder.
            let path = dir.join(&name);
            if Path::new(&name).file_name() != Some(name.as_ref()) || !path.is_file() {
                return Err(HfError::MissingFile {
                    path,
                    hint: "model.safetensors.index.json names it, but the folder does not hold \
                           it; the download is incomplete"
                        .into(),
                });
            }
            checkpoint.add_file(path)?;
        }
        Ok(checkpoint)
    }

    fn add_file(&mut self, path: PathBuf) -> Result<(), HfError> {
        let io = |source| HfError::Io {
            path: path.clone(),
            source,
        };
        let file = std::fs::File::open(&path).map_err(io)?;
        // SAFETY: the map is read-only and private to this value; as with every mmap-based
        // loader, the file must not be truncated or rewritten while it is converted.
        let map = unsafe { memmap2::Mmap::map(&file) }.map_err(io)?;
        let broken = |reason: String| HfError::Safetensors {
            path: path.clone(),
            reason,
        };
        // `read_metadata` checks the header and that the offsets cover the file exactly.
        let (header, metadata) =
            SafeTensors::read_metadata(&map).map_err(|e| broken(e.to_string()))?;
        let data_start = 8 + header;
        let index = self.paths.len();
        for (name, info) in metadata.tensors() {
            let (start, end) = info.data_offsets;
            let entry = Entry {
                file: index,
                dtype: info.dtype,
                shape: info.shape.clone(),
                start: data_start + start,
                end: data_start + end,
            };
            if let Some(first) = self.tensors.insert(name.clone(), entry) {
                return Err(HfError::DuplicateTensor {
                    name,
                    first: self.paths[first.file].clone(),
                    second: path.clone(),
                });
            }
        }
        self.paths.push(path);
        self.maps.push(map);
        Ok(())
    }

    pub fn file_count(&self) -> usize {
        self.paths.len()
    }

    fn bytes(&self, e: &Entry) -> &[u8] {
        &self.maps[e.file][e.start..e.end]
    }
}

/// For GGUF row `row` of a q or k projection with heads of `head_dim` rows, the HF row it comes
/// from. HF rotates row i of a head with row i + head_dim/2 (rotate_half); GGML's llama RoPE
/// rotates adjacent rows 2i and 2i + 1, so llama.cpp's converter interleaves the two halves of
/// every head.
pub fn hf_row_for(row: usize, head_dim: usize) -> usize {
    let (head, within) = (row / head_dim, row % head_dim);
    head * head_dim + (within % 2) * (head_dim / 2) + within / 2
}

/// One GGUF tensor to write, and where it comes from.
pub(super) struct Planned {
    pub gguf_name: String,
    source: Entry,
    /// Rows and row length, HF's `[rows, k]` (a vector is one row).
    rows: usize,
    k: usize,
    /// Write F16 (the source is F16 and this is a matrix) rather than F32.
    out_f16: bool,
    /// Rows per head, for q and k.
    permute_head_dim: Option<usize>,
}

impl Planned {
    /// GGML's dims: row length first.
    pub fn gguf_dims(&self) -> Vec<u64> {
        if self.source.shape.len() == 1 {
            vec![self.k as u64]
        } else {
            vec![self.k as u64, self.rows as u64]
        }
    }

    /// GGML type id: 0 (F32) or 1 (F16).
    pub fn out_ggml_type(&self) -> u32 {
        u32::from(self.out_f16)
    }

    pub fn elements(&self) -> u64 {
        (self.rows * self.k) as u64
    }

    pub fn out_bytes(&self) -> u64 {
        self.elements() * if self.out_f16 { 2 } else { 4 }
    }

    pub fn source_dtype_name(&self) -> &'static str {
        match self.source.dtype {
            Dtype::F16 => "F16",
            Dtype::BF16 => "BF16",
            _ => "F32",
        }
    }

    /// A reader of the tensor's GGUF bytes, calling `on_bytes` with each row's size.
    pub fn reader<'a>(
        &'a self,
        checkpoint: &'a Checkpoint,
        on_bytes: &'a dyn Fn(u64),
    ) -> RowReader<'a> {
        RowReader {
            tensor: self,
            src: checkpoint.bytes(&self.source),
            row: 0,
            buf: Vec::new(),
            pos: 0,
            on_bytes,
        }
    }
}

/// Streams a [`Planned`] tensor one converted row at a time.
pub(super) struct RowReader<'a> {
    tensor: &'a Planned,
    src: &'a [u8],
    row: usize,
    buf: Vec<u8>,
    pos: usize,
    on_bytes: &'a dyn Fn(u64),
}

impl RowReader<'_> {
    fn fill(&mut self) {
        let t = self.tensor;
        let from = match t.permute_head_dim {
            Some(head_dim) => hf_row_for(self.row, head_dim),
            None => self.row,
        };
        let width = t.source.dtype.bitsize() / 8;
        let src = &self.src[from * t.k * width..(from + 1) * t.k * width];
        self.buf.clear();
        match (t.source.dtype, t.out_f16) {
            (Dtype::F32, _) | (Dtype::F16, true) => self.buf.extend_from_slice(src),
            (Dtype::F16, false) => {
                for h in src.chunks_exact(2) {
                    let v = half::f16::from_le_bytes([h[0], h[1]]).to_f32();
                    self.buf.extend_from_slice(&v.to_le_bytes());
                }
            }
            // BF16 is the high half of an f32: widening is exact.
            _ => {
                for h in src.chunks_exact(2) {
                    self.buf.extend_from_slice(&[0, 0, h[0], h[1]]);
                }
            }
        }
        self.row += 1;
        self.pos = 0;
        (self.on_bytes)(self.buf.len() as u64);
    }
}

impl Read for RowReader<'_> {
    fn read(&mut self, out: &mut [u8]) -> std::io::Result<usize> {
        if self.pos == self.buf.len() {
            if self.row == self.tensor.rows {
                return Ok(0);
            }
            self.fill();
        }
        let n = out.len().min(self.buf.len() - self.pos);
        out[..n].copy_from_slice(&self.buf[self.pos..self.pos + n]);
        self.pos += n;
        Ok(n)
    }
}

/// HF names to GGUF names with the shape config.json implies, for every tensor of the model.
pub(crate) fn expected_tensors(c: &HfConfig) -> Vec<(String, String, Vec<usize>, Option<usize>)> {
    let (d, ff, q, kv) = (
        c.hidden_size,
        c.intermediate_size,
        c.n_head * c.head_dim,
        c.n_head_kv * c.head_dim,
    );
    let mut list = vec![(
        "model.embed_tokens.weight".to_string(),
        "token_embd.weight".to_string(),
        vec![c.vocab_size, d],
        None,
    )];
    for i in 0..c.n_layer {
        let layer = |hf: &str, gguf: &str, shape: Vec<usize>, permute: Option<usize>| {
            (
                format!("model.layers.{i}.{hf}.weight"),
                format!("blk.{i}.{gguf}.weight"),
                shape,
                permute,
            )
        };
        list.extend([
            layer("input_layernorm", "attn_norm", vec![d], None),
            layer("self_attn.q_proj", "attn_q", vec![q, d], Some(c.head_dim)),
            layer("self_attn.k_proj", "attn_k", vec![kv, d], Some(c.head_dim)),
            layer("self_attn.v_proj", "attn_v", vec![kv, d], None),
            layer("self_attn.o_proj", "attn_output", vec![d, q], None),
            layer("post_attention_layernorm", "ffn_norm", vec![d], None),
            layer("mlp.gate_proj", "ffn_gate", vec![ff, d], None),
            layer("mlp.up_proj", "ffn_up", vec![ff, d], None),
            layer("mlp.down_proj", "ffn_down", vec![d, ff], None),
        ]);
    }
    list.push((
        "model.norm.weight".into(),
        "output_norm.weight".into(),
        vec![d],
        None,
    ));
    if !c.tie_word_embeddings {
        list.push((
            "lm_head.weight".into(),
            "output.weight".into(),
            vec![c.vocab_size, d],
            None,
        ));
    }
    list
}

/// Maps and checks every tensor; any tensor left over is an error, so nothing is dropped
/// silently.
pub(super) fn plan(checkpoint: &Checkpoint, c: &HfConfig) -> Result<Vec<Planned>, HfError> {
    let why = format!(
        "hidden_size {}, intermediate_size {}, {} heads of {}, {} KV heads, vocab_size {}",
        c.hidden_size, c.intermediate_size, c.n_head, c.head_dim, c.n_head_kv, c.vocab_size
    );
    let mut used: BTreeSet<&str> = BTreeSet::new();
    let mut out = Vec::new();
    for (hf, gguf, shape, permute) in expected_tensors(c) {
        let Some((key, entry)) = checkpoint.tensors.get_key_value(&hf) else {
            let why = if hf == "lm_head.weight" {
                "config.json says tie_word_embeddings is false; set it to true if the output \
                 layer shares the token embedding"
                    .to_string()
            } else {
                format!("config.json's num_hidden_layers is {}", c.n_layer)
            };
            return Err(HfError::MissingTensor { name: hf, why });
        };
        used.insert(key);
        if !matches!(entry.dtype, Dtype::F32 | Dtype::F16 | Dtype::BF16) {
            return Err(HfError::DType {
                name: hf,
                dtype: entry.dtype.to_string(),
            });
        }
        if entry.shape != shape {
            return Err(HfError::Shape {
                name: hf,
                found: entry.shape.clone(),
                expected: shape,
                why: why.clone(),
            });
        }
        // Every expected shape is [k] or [rows, k].
        let k = shape.last().copied().unwrap_or(1);
        let rows = if shape.len() == 2 { shape[0] } else { 1 };
        out.push(Planned {
            gguf_name: gguf,
            source: entry.clone(),
            rows,
            k,
            out_f16: entry.dtype == Dtype::F16 && shape.len() == 2,
            permute_head_dim: permute,
        });
    }
    // A tied checkpoint may still store lm_head (a copy of the embedding); HF ignores it too.
    let ignorable = |name: &str| {
        name.ends_with(".rotary_emb.inv_freq")
            || (c.tie_word_embeddings && name == "lm_head.weight")
    };
    let mut extra: Vec<&String> = checkpoint
        .tensors
        .keys()
        .filter(|n| !used.contains(n.as_str()) && !ignorable(n))
        .collect();
    extra.sort();
    if let Some(name) = extra.first() {
        return Err(HfError::UnexpectedTensor {
            name: name.to_string(),
            path: checkpoint.paths[checkpoint.tensors[*name].file].clone(),
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn q_and_k_rows_are_interleaved_per_head() {
        // Two heads of 4 rows: HF [a0 a1 b0 b1 | c0 c1 d0 d1] (a pairs with b) becomes
        // GGUF [a0 b0 a1 b1 | c0 d0 c1 d1].
        let order: Vec<usize> = (0..8).map(|r| hf_row_for(r, 4)).collect();
        assert_eq!(order, [0, 2, 1, 3, 4, 6, 5, 7]);
    }

    /// RoPE as HF applies it (rotate_half: element i pairs with i + d/2) and as GGML's normal
    /// mode does (2i pairs with 2i + 1); the angle of pair i is pos * base^(-2i/d) in both.
    fn rope(x: &[f64], pos: f64, interleaved: bool) -> Vec<f64> {
        let d = x.len();
        let mut y = x.to_vec();
        for i in 0..d / 2 {
            let theta = pos * 10000f64.powf(-2.0 * i as f64 / d as f64);
            let (a, b) = if interleaved {
                (2 * i, 2 * i + 1)
            } else {
                (i, i + d / 2)
            };
            y[a] = x[a] * theta.cos() - x[b] * theta.sin();
            y[b] = x[a] * theta.sin() + x[b] * theta.cos();
        }
        y
    }

    #[test]
    fn permuted_rows_under_ggml_rope_give_hfs_rotated_query() {
        // One head of 8: project with HF's rows and rotate as HF does, project with the
        // permuted rows and rotate as GGML does; the results are the same numbers, permuted.
        let (d, k) = (8, 3);
        let w: Vec<Vec<f64>> = (0..d)
            .map(|r| {
                (0..k)
                    .map(|c| ((r * 7 + c * 3) as f64 * 0.37).sin())
                    .collect()
            })
            .collect();
        let x = [0.3, -1.2, 0.7];
        let project = |rows: &[Vec<f64>]| -> Vec<f64> {
            rows.iter()
                .map(|row| row.iter().zip(&x).map(|(a, b)| a * b).sum())
                .collect()
        };
        let permuted: Vec<Vec<f64>> = (0..d).map(|r| w[hf_row_for(r, d)].clone()).collect();
        let hf = rope(&project(&w), 5.0, false);
        let ggml = rope(&project(&permuted), 5.0, true);
        for r in 0..d {
            assert!((ggml[r] - hf[hf_row_for(r, d)]).abs() < 1e-12, "row {r}");
        }
    }
}
