//! Checkpoints: a folder per saved step that is also a Hugging Face llama checkpoint.
//!
//! `step-NNNNNN/` holds config.json, model.safetensors (HF tensor names; q and k rows in HF's
//! rotate-half order, which the GGUF conversion permutes back), a byte-level tokenizer.json
//! with tokenizer_config.json, optimizer.safetensors (AdamW's moments under the GGUF names) and
//! trainer.json (the model and training settings, the step and the loss history). The folder is
//! written under a temporary name and renamed into place, so a checkpoint is whole or absent.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde_json::json;
use tessera_runtime::Gpu;

use super::lm::{LmConfig, LmModel};
use super::trainer::{StepStats, TrainConfig, Trainer};
use super::{Result, TrainError};
use crate::hf::{hf_row_for, HfConfig};

/// Everything a checkpoint holds, read back.
pub struct Checkpoint {
    pub path: PathBuf,
    pub lm: LmConfig,
    pub train: TrainConfig,
    pub step: u64,
    pub history: Vec<StepStats>,
    /// Parameter values by GGUF name, in `LmConfig::param_shapes` order.
    pub values: Vec<(String, Vec<f32>)>,
    /// The optimizer's buffers by name, and its step count.
    pub optimizer: Vec<(String, Vec<f32>)>,
    pub optimizer_step: u64,
}

#[derive(serde::Serialize, serde::Deserialize)]
struct TrainerFile {
    format: u32,
    lm: LmConfig,
    train: TrainConfig,
    step: u64,
    optimizer_step: u64,
    history: Vec<StepStats>,
}

const FORMAT: u32 = 1;

/// The HF config of a model of this shape (what `hf::HfConfig` reads back).
pub fn hf_config_json(c: &LmConfig) -> serde_json::Value {
    json!({
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": c.dim,
        "intermediate_size": c.ffn,
        "num_attention_heads": c.n_heads,
        "num_key_value_heads": c.n_kv_heads,
        "num_hidden_layers": c.n_layers,
        "vocab_size": c.vocab,
        "rms_norm_eps": c.eps,
        "rope_theta": c.rope_theta,
        "max_position_embeddings": c.ctx,
        "tie_word_embeddings": false,
        "hidden_act": "silu",
        "torch_dtype": "float32",
    })
}

/// GPT-2's map from bytes to printable characters, which byte-level BPE vocabularies spell
/// tokens in.
fn byte_chars() -> Vec<char> {
    let printable = |b: u32| {
        (b'!' as u32..=b'~' as u32).contains(&b)
            || (0xA1..=0xAC).contains(&b)
            || (0xAE..=0xFF).contains(&b)
    };
    let mut next = 256u32;
    (0..256u32)
        .map(|b| {
            if printable(b) {
                char::from_u32(b).unwrap()
            } else {
                let c = char::from_u32(next).unwrap();
                next += 1;
                c
            }
        })
        .collect()
}

/// A byte-level BPE tokenizer.json with no merges: token i is byte i.
pub fn byte_tokenizer_json(vocab: usize) -> serde_json::Value {
    let chars = byte_chars();
    let vocab: serde_json::Map<String, serde_json::Value> = (0..vocab)
        .map(|i| (chars[i].to_string(), json!(i)))
        .collect();
    json!({
        "version": "1.0",
        "added_tokens": [],
        "normalizer": null,
        "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true,
                          "use_regex": true},
        "post_processor": null,
        "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true,
                    "use_regex": true},
        "model": {"type": "BPE", "dropout": null, "unk_token": null,
                  "continuing_subword_prefix": null, "end_of_word_suffix": null,
                  "fuse_unk": false, "byte_fallback": false, "ignore_merges": false,
                  "vocab": vocab, "merges": []},
    })
}

/// For each GGUF tensor of `c`: its HF name and, for q and k, the head size whose rows are
/// reordered between the two layouts.
fn hf_names(c: &LmConfig) -> Result<Vec<(String, String, Option<usize>)>> {
    let hf = HfConfig::parse(&hf_config_json(c))
        .map_err(|e| TrainError::Config(format!("the model's config.json: {e}")))?;
    Ok(crate::hf::expected_tensor_names(&hf))
}

fn io(what: String) -> impl FnOnce(std::io::Error) -> TrainError {
    move |source| TrainError::Io { what, source }
}

/// The folder name of a step's checkpoint.
pub fn step_dir(root: &Path, step: u64) -> PathBuf {
    root.join(format!("step-{step:06}"))
}

/// Saves the trainer as `root/step-NNNNNN` and returns that path.
pub fn save_checkpoint(gpu: &Gpu, root: &Path, trainer: &Trainer) -> Result<PathBuf> {
    std::fs::create_dir_all(root).map_err(io(format!("creating {}", root.display())))?;
    let dest = step_dir(root, trainer.step);
    let tmp = root.join(format!(
        ".step-{:06}.tmp-{}",
        trainer.step,
        std::process::id()
    ));
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir(&tmp).map_err(io(format!("creating {}", tmp.display())))?;
    let result = write_all(gpu, &tmp, trainer);
    if let Err(e) = result {
        let _ = std::fs::remove_dir_all(&tmp);
        return Err(e);
    }
    if dest.exists() {
        std::fs::remove_dir_all(&dest).map_err(io(format!("replacing {}", dest.display())))?;
    }
    std::fs::rename(&tmp, &dest).map_err(io(format!("renaming into {}", dest.display())))?;
    Ok(dest)
}

fn write_json(path: &Path, v: &impl serde::Serialize) -> Result<()> {
    let text = serde_json::to_string_pretty(v).expect("JSON of plain data");
    std::fs::write(path, text).map_err(io(format!("writing {}", path.display())))
}

fn f32_bytes(v: &[f32]) -> Vec<u8> {
    bytemuck::cast_slice(v).to_vec()
}

fn write_safetensors(path: &Path, tensors: Vec<(String, Vec<usize>, Vec<u8>)>) -> Result<()> {
    let views: Vec<(String, safetensors::tensor::TensorView)> = tensors
        .iter()
        .map(|(name, shape, bytes)| {
            let view =
                safetensors::tensor::TensorView::new(safetensors::Dtype::F32, shape.clone(), bytes)
                    .expect("shape and bytes agree");
            (name.clone(), view)
        })
        .collect();
    let bytes = safetensors::tensor::serialize(views, None)
        .map_err(|e| TrainError::Config(format!("serializing {}: {e}", path.display())))?;
    std::fs::write(path, bytes).map_err(io(format!("writing {}", path.display())))
}

fn write_all(gpu: &Gpu, dir: &Path, t: &Trainer) -> Result<()> {
    let c = &t.model.config;
    write_json(&dir.join("config.json"), &hf_config_json(c))?;
    write_json(&dir.join("tokenizer.json"), &byte_tokenizer_json(c.vocab))?;
    write_json(
        &dir.join("tokenizer_config.json"),
        &json!({"add_bos_token": false, "add_eos_token": false,
                "model_max_length": c.ctx, "tokenizer_class": "PreTrainedTokenizerFast"}),
    )?;
    let names = hf_names(c)?;
    let mut tensors = Vec::new();
    for (p, (gguf, hf, permute)) in t.model.params.iter().zip(&names) {
        debug_assert_eq!(&p.name, gguf);
        let mut data = gpu.read(&p.value)?;
        if let Some(hd) = permute {
            data = reorder_rows(&data, p.shape()[1], |g| hf_row_for(g, *hd), true);
        }
        tensors.push((hf.clone(), p.shape().to_vec(), f32_bytes(&data)));
    }
    write_safetensors(&dir.join("model.safetensors"), tensors)?;
    let mut opt = Vec::new();
    for (name, tensor) in t.opt.state() {
        opt.push((name, tensor.shape().to_vec(), f32_bytes(&gpu.read(tensor)?)));
    }
    write_safetensors(&dir.join("optimizer.safetensors"), opt)?;
    write_json(
        &dir.join("trainer.json"),
        &TrainerFile {
            format: FORMAT,
            lm: c.clone(),
            train: t.config.clone(),
            step: t.step,
            optimizer_step: t.opt.steps(),
            history: t.history.clone(),
        },
    )
}

/// Moves rows: with `scatter`, row g of `data` goes to row `map(g)`; otherwise row g is taken
/// from row `map(g)`.
fn reorder_rows(data: &[f32], k: usize, map: impl Fn(usize) -> usize, scatter: bool) -> Vec<f32> {
    let mut out = vec![0.0; data.len()];
    for g in 0..data.len() / k {
        let (dst, src) = if scatter { (map(g), g) } else { (g, map(g)) };
        out[dst * k..(dst + 1) * k].copy_from_slice(&data[src * k..(src + 1) * k]);
    }
    out
}

/// The numbered checkpoint folders (`step-NNNNNN`) of a run folder, oldest first, whole or
/// not.
pub fn step_dirs(run: &Path) -> Vec<(u64, PathBuf)> {
    let mut steps: Vec<(u64, PathBuf)> = std::fs::read_dir(run)
        .into_iter()
        .flatten()
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            let n = name.strip_prefix("step-")?.parse().ok()?;
            Some((n, e.path()))
        })
        .collect();
    steps.sort();
    steps
}

/// The newest whole checkpoint under `path`: `path` itself when it is one, else its
/// highest-numbered `step-*` folder that holds a trainer.json.
pub fn latest_checkpoint(path: &Path) -> Option<PathBuf> {
    if path.join("trainer.json").is_file() {
        return Some(path.to_path_buf());
    }
    step_dirs(path)
        .into_iter()
        .rev()
        .map(|(_, p)| p)
        .find(|p| p.join("trainer.json").is_file())
}

fn read_safetensors(path: &Path) -> Result<BTreeMap<String, Vec<f32>>> {
    let bad = |why: String| TrainError::Checkpoint {
        path: path.display().to_string(),
        why,
    };
    let bytes = std::fs::read(path).map_err(|e| bad(e.to_string()))?;
    let file = safetensors::SafeTensors::deserialize(&bytes).map_err(|e| bad(e.to_string()))?;
    let mut out = BTreeMap::new();
    for (name, view) in file.tensors() {
        if view.dtype() != safetensors::Dtype::F32 {
            return Err(bad(format!("{name} is {:?}, not F32", view.dtype())));
        }
        out.insert(name, bytemuck::pod_collect_to_vec(view.data()));
    }
    Ok(out)
}

/// Reads a checkpoint folder written by [`save_checkpoint`].
pub fn load_checkpoint(dir: &Path) -> Result<Checkpoint> {
    let bad = |why: String| TrainError::Checkpoint {
        path: dir.display().to_string(),
        why,
    };
    let text = std::fs::read_to_string(dir.join("trainer.json")).map_err(|e| {
        bad(format!(
            "no readable trainer.json ({e}); pass a folder written by `tessera train lm`"
        ))
    })?;
    let meta: TrainerFile =
        serde_json::from_str(&text).map_err(|e| bad(format!("trainer.json: {e}")))?;
    if meta.format != FORMAT {
        return Err(bad(format!(
            "trainer.json has format {}, this Tessera reads {FORMAT}",
            meta.format
        )));
    }
    meta.lm.check()?;
    let mut hf = read_safetensors(&dir.join("model.safetensors"))?;
    let mut values = Vec::new();
    for ((gguf, shape), (_, hf_name, permute)) in
        meta.lm.param_shapes().into_iter().zip(hf_names(&meta.lm)?)
    {
        let data = hf
            .remove(&hf_name)
            .ok_or_else(|| bad(format!("model.safetensors has no {hf_name}")))?;
        if data.len() != shape.iter().product::<usize>() {
            return Err(bad(format!(
                "{hf_name} has {} values, not {shape:?}",
                data.len()
            )));
        }
        let data = match permute {
            Some(hd) => reorder_rows(&data, shape[1], |g| hf_row_for(g, hd), false),
            None => data,
        };
        values.push((gguf, data));
    }
    let optimizer = read_safetensors(&dir.join("optimizer.safetensors"))?
        .into_iter()
        .collect();
    Ok(Checkpoint {
        path: dir.to_path_buf(),
        lm: meta.lm,
        train: meta.train,
        step: meta.step,
        history: meta.history,
        values,
        optimizer,
        optimizer_step: meta.optimizer_step,
    })
}

impl Checkpoint {
    /// A trainer that continues from this checkpoint, with `train` (the saved settings, or new
    /// ones such as more steps).
    pub fn into_trainer(self, gpu: &Gpu, train: TrainConfig) -> Result<Trainer> {
        let model = LmModel::from_values(gpu, self.lm, self.values)?;
        let mut trainer = Trainer::new(gpu, model, train)?;
        let values: Vec<(&str, &[f32])> = self
            .optimizer
            .iter()
            .map(|(n, v)| (n.as_str(), v.as_slice()))
            .collect();
        trainer.opt.load_state(gpu, self.optimizer_step, &values)?;
        trainer.step = self.step;
        trainer.history = self.history;
        Ok(trainer)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_byte_tokenizer_spells_every_byte_once() {
        let chars = byte_chars();
        let mut seen = chars.clone();
        seen.sort();
        seen.dedup();
        assert_eq!(seen.len(), 256);
        assert_eq!(chars[b'A' as usize], 'A');
        assert_eq!(chars[b' ' as usize], '\u{120}');
        assert_eq!(chars[b'\n' as usize], '\u{10A}');
    }

    #[test]
    fn row_reordering_round_trips() {
        let data: Vec<f32> = (0..8 * 3).map(|i| i as f32).collect();
        let hf = reorder_rows(&data, 3, |g| hf_row_for(g, 4), true);
        assert_ne!(hf, data);
        assert_eq!(reorder_rows(&hf, 3, |g| hf_row_for(g, 4), false), data);
    }
}
