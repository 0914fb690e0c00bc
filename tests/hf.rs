//! Hugging Face safetensors folders, made at test time from the default GGUF model (its
//! tensors dequantized to F32, the q/k permutation undone, HF names, config.json and
//! tokenizer.json from its metadata): converting them back must give the dequantized tensors,
//! the same tokenizer and the same logits; `quant calibrate -m DIR` must take them; and
//! damaged folders must fail with the problem named.

mod common;

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;

use safetensors::{Dtype, View};
use serde_json::{json, Value};
use tessera::models::hf;
use tessera::models::llm::load::tokenizer_from_gguf;
use tessera::models::llm::{LoadedModel, Logits, Session};
use tessera::quant::calibrate::tensor_f32;
use tessera::runtime::io::gguf::{GgufFile, MetaValue};
use tessera::runtime::io::gguf_write::GgufWriter;

/// A tensor to write into a safetensors file.
struct Raw {
    dtype: Dtype,
    shape: Vec<usize>,
    data: Vec<u8>,
}

impl View for &Raw {
    fn dtype(&self) -> Dtype {
        self.dtype
    }
    fn shape(&self) -> &[usize] {
        &self.shape
    }
    fn data(&self) -> Cow<'_, [u8]> {
        Cow::Borrowed(&self.data)
    }
    fn data_len(&self) -> usize {
        self.data.len()
    }
}

fn f32_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

fn bf16_bytes(v: &[f32]) -> Vec<u8> {
    v.iter()
        .flat_map(|&x| half::bf16::from_f32(x).to_le_bytes())
        .collect()
}

fn write_json(path: &Path, v: &Value) {
    std::fs::write(path, serde_json::to_string_pretty(v).unwrap()).unwrap();
}

/// Writes `tensors` as `dir/file`.
fn write_safetensors(dir: &Path, file: &str, tensors: &BTreeMap<String, Raw>) {
    safetensors::serialize_to_file(tensors.iter(), None, &dir.join(file)).unwrap();
}

/// HF's q/k layout from GGUF's: within each head, GGUF row 2i + j holds HF row j * d/2 + i
/// (llama.cpp's converter reshapes to (heads, 2, d/2) and swaps the last two axes).
fn unpermute_rows(w: &[f32], rows: usize, k: usize, heads: usize) -> Vec<f32> {
    let d = rows / heads;
    let mut out = vec![0.0; w.len()];
    for h in 0..heads {
        for j in 0..2 {
            for i in 0..d / 2 {
                let (hf, gguf) = (h * d + j * (d / 2) + i, h * d + 2 * i + j);
                out[hf * k..(hf + 1) * k].copy_from_slice(&w[gguf * k..(gguf + 1) * k]);
            }
        }
    }
    out
}

/// The HF name of a GGUF llama tensor.
fn hf_name(gguf: &str) -> String {
    const LAYER: [(&str, &str); 9] = [
        ("attn_norm", "input_layernorm"),
        ("attn_q", "self_attn.q_proj"),
        ("attn_k", "self_attn.k_proj"),
        ("attn_v", "self_attn.v_proj"),
        ("attn_output", "self_attn.o_proj"),
        ("ffn_norm", "post_attention_layernorm"),
        ("ffn_gate", "mlp.gate_proj"),
        ("ffn_up", "mlp.up_proj"),
        ("ffn_down", "mlp.down_proj"),
    ];
    match gguf {
        "token_embd.weight" => "model.embed_tokens.weight".into(),
        "output_norm.weight" => "model.norm.weight".into(),
        "output.weight" => "lm_head.weight".into(),
        _ => {
            let rest = gguf.strip_prefix("blk.").expect("a layer tensor");
            let (layer, rest) = rest.split_once('.').unwrap();
            let part = rest.strip_suffix(".weight").unwrap();
            let (_, hf) = LAYER.iter().find(|(g, _)| *g == part).unwrap();
            format!("model.layers.{layer}.{hf}.weight")
        }
    }
}

/// The files made once per test binary.
struct Fixture {
    _dir: tempfile::TempDir,
    /// The default model with every tensor dequantized to F32: what conversion must give back.
    reference: PathBuf,
    /// The F32 folder (one model.safetensors) and the BF16 one (two shards and an index).
    hf_f32: PathBuf,
    hf_bf16: PathBuf,
    /// `hf_f32` converted by `hf::convert`.
    converted: OnceLock<PathBuf>,
}

fn fixture() -> &'static Fixture {
    static FIXTURE: OnceLock<Fixture> = OnceLock::new();
    FIXTURE.get_or_init(make_fixture)
}

fn make_fixture() -> Fixture {
    let src = GgufFile::open(&common::model_path()).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let u = |k: &str| src.get_u32(k).unwrap();
    let (heads, kv_heads) = (
        u("llama.attention.head_count") as usize,
        u("llama.attention.head_count_kv") as usize,
    );

    // 1. Every tensor as F32: the reference GGUF, and the HF tensors (HF names and layout).
    let mut reference = GgufWriter::with_metadata_of(&src);
    let mut f32s = BTreeMap::new();
    let mut bf16s = BTreeMap::new();
    for t in src.tensors() {
        let values = tensor_f32(&src, t).unwrap();
        reference
            .add_tensor(t.name(), t.dims(), 0, f32_bytes(&values))
            .unwrap();
        let shape: Vec<usize> = t.dims().iter().rev().map(|&d| d as usize).collect();
        let (rows, k) = (shape[0], *shape.last().unwrap());
        let values = match t.name() {
            n if n.ends_with("attn_q.weight") => unpermute_rows(&values, rows, k, heads),
            n if n.ends_with("attn_k.weight") => unpermute_rows(&values, rows, k, kv_heads),
            _ => values,
        };
        let name = hf_name(t.name());
        let raw = |dtype, data| Raw {
            dtype,
            shape: shape.clone(),
            data,
        };
        bf16s.insert(name.clone(), raw(Dtype::BF16, bf16_bytes(&values)));
        f32s.insert(name, raw(Dtype::F32, f32_bytes(&values)));
    }
    let reference_path = dir.path().join("reference.gguf");
    reference.write(&reference_path).unwrap();

    // 2. config.json, tokenizer.json and tokenizer_config.json from the metadata.
    let tokens = src.get_str_array("tokenizer.ggml.tokens").unwrap();
    let types = src.get_i32_array("tokenizer.ggml.token_type").unwrap();
    let merges = src.get_str_array("tokenizer.ggml.merges").unwrap();
    let vocab: serde_json::Map<String, Value> = tokens
        .iter()
        .enumerate()
        .map(|(i, t)| (t.to_string(), json!(i)))
        .collect();
    let added: Vec<Value> = (0..tokens.len())
        .filter(|&i| types[i] == 3 || types[i] == 4)
        .map(|i| json!({"id": i, "content": tokens[i], "special": types[i] == 3}))
        .collect();
    let tokenizer = json!({
        "version": "1.0",
        "added_tokens": added,
        "normalizer": null,
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
            {"type": "Digits", "individual_digits": true},
            {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true,
             "use_regex": true}
        ]},
        "post_processor": {"type": "ByteLevel", "add_prefix_space": true,
                           "trim_offsets": false, "use_regex": true},
        "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true,
                    "use_regex": true},
        "model": {"type": "BPE", "dropout": null, "unk_token": null, "fuse_unk": false,
                  "byte_fallback": false, "ignore_merges": false, "vocab": vocab,
                  "merges": merges}
    });
    let token = |key: &str| tokens[u(key) as usize];
    let tokenizer_config = json!({
        "bos_token": token("tokenizer.ggml.bos_token_id"),
        "eos_token": token("tokenizer.ggml.eos_token_id"),
        "unk_token": token("tokenizer.ggml.unknown_token_id"),
        "pad_token": token("tokenizer.ggml.padding_token_id"),
        "chat_template": src.get_str("tokenizer.chat_template").unwrap(),
        "tokenizer_class": "GPT2Tokenizer"
    });
    let config = json!({
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": u("llama.embedding_length"),
        "intermediate_size": u("llama.feed_forward_length"),
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "num_hidden_layers": u("llama.block_count"),
        "rms_norm_eps": src.get_f32("llama.attention.layer_norm_rms_epsilon").unwrap(),
        "rope_theta": src.get_f32("llama.rope.freq_base").unwrap(),
        "max_position_embeddings": u("llama.context_length"),
        "vocab_size": tokens.len(),
        "tie_word_embeddings": src.tensor("output.weight").is_none(),
        "hidden_act": "silu",
        "rope_scaling": null,
        "bos_token_id": u("tokenizer.ggml.bos_token_id"),
        "eos_token_id": u("tokenizer.ggml.eos_token_id"),
        "torch_dtype": "float32"
    });

    // 3. The folders: F32 in one file; BF16 in two shards named by an index.
    let hf_f32 = dir.path().join("SmolLM2-f32");
    let hf_bf16 = dir.path().join("SmolLM2-bf16");
    for folder in [&hf_f32, &hf_bf16] {
        std::fs::create_dir(folder).unwrap();
        write_json(&folder.join("config.json"), &config);
        write_json(&folder.join("tokenizer.json"), &tokenizer);
        write_json(&folder.join("tokenizer_config.json"), &tokenizer_config);
    }
    write_safetensors(&hf_f32, "model.safetensors", &f32s);
    drop(f32s);
    let second = bf16s.split_off("model.layers.2");
    let mut weight_map = serde_json::Map::new();
    for (file, part) in [
        ("model-00001-of-00002.safetensors", &bf16s),
        ("model-00002-of-00002.safetensors", &second),
    ] {
        write_safetensors(&hf_bf16, file, part);
        for name in part.keys() {
            weight_map.insert(name.clone(), json!(file));
        }
    }
    write_json(
        &hf_bf16.join("model.safetensors.index.json"),
        &json!({"metadata": {}, "weight_map": weight_map}),
    );
    Fixture {
        _dir: dir,
        reference: reference_path,
        hf_f32,
        hf_bf16,
        converted: OnceLock::new(),
    }
}

fn converted() -> &'static Path {
    let f = fixture();
    f.converted.get_or_init(|| {
        let out = f.hf_f32.with_extension("gguf");
        hf::convert(&f.hf_f32, &out, &|_, _| {}).unwrap();
        out
    })
}

#[test]
fn an_f32_folder_converts_back_to_the_dequantized_tensors_and_the_same_tokenizer() {
    let reference = GgufFile::open(&fixture().reference).unwrap();
    let ours = GgufFile::open(converted()).unwrap();

    // Every tensor, byte for byte, and no other.
    assert_eq!(ours.tensor_count(), reference.tensor_count());
    for want in reference.tensors() {
        let got = ours
            .tensor(want.name())
            .unwrap_or_else(|| panic!("{} missing", want.name()));
        assert_eq!(got.dims(), want.dims(), "{}", want.name());
        assert_eq!(got.ggml_type().name(), "F32", "{}", want.name());
        assert!(
            ours.tensor_data(got) == reference.tensor_data(want),
            "{} differs",
            want.name()
        );
    }

    // The llama.* and tokenizer keys llama.cpp wrote into the original.
    let original = GgufFile::open(&common::model_path()).unwrap();
    for (key, value) in original.metadata() {
        let wanted = key.starts_with("llama.")
            || (key.starts_with("tokenizer.") && key != "tokenizer.ggml.add_space_prefix")
            || key == "general.architecture";
        if wanted {
            assert_eq!(ours.get(key), Some(value), "{key}");
        }
    }
    assert_eq!(ours.get("general.file_type"), Some(&MetaValue::U32(0)));

    // The tokenizers agree on awkward text, with and without special tokens.
    let a = tokenizer_from_gguf(&original).unwrap();
    let b = tokenizer_from_gguf(&ours).unwrap();
    let texts = [
        "Hello world",
        "  two leading spaces,\ttabs\n\nand blank lines  ",
        "3.14159 + 1234567 = 12,345.6",
        "<|im_start|>user\nWhat's 2+2?<|im_end|>\n<|im_start|>assistant\n",
        "Ünïcödé, 中文, русский, emoji 🦙🦙 and ZWJ 😶\u{200d}🌫️",
        "I've been 'told he's there, 'RE you sure?",
        "def f(x):\n    return x**2  # square",
    ];
    for text in texts {
        for special in [false, true] {
            assert_eq!(
                b.encode(text, special, special),
                a.encode(text, special, special),
                "{text:?}"
            );
        }
    }
}

#[test]
fn a_sharded_bf16_folder_converts_to_the_widened_values() {
    let reference = GgufFile::open(&fixture().reference).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("bf16.gguf");
    let report = hf::convert(&fixture().hf_bf16, &out, &|_, _| {}).unwrap();
    assert_eq!(report.files, 2);
    assert_eq!(report.source_dtypes, ["BF16"]);
    let ours = GgufFile::open(&out).unwrap();
    for want in reference.tensors() {
        let got = ours.tensor(want.name()).unwrap();
        assert_eq!(got.ggml_type().name(), "F32");
        // BF16 widened to f32 is exact: the reference rounded to BF16, bit for bit.
        let values = tensor_f32(&reference, want).unwrap();
        let rounded: Vec<u8> = values
            .iter()
            .flat_map(|&x| half::bf16::from_f32(x).to_f32().to_le_bytes())
            .collect();
        assert!(ours.tensor_data(got) == rounded, "{} differs", want.name());
    }
}

#[test]
fn the_converted_model_gives_the_logits_of_the_dequantized_original() {
    let gpu = common::gpu();
    let reference = LoadedModel::open(&fixture().reference, gpu.clone()).unwrap();
    let ours = LoadedModel::open(converted(), gpu).unwrap();
    let tokens =
        reference
            .tokenizer
            .encode("The capital of France is Paris, and 2+2=4.", false, false);
    let logits = |m: &LoadedModel| {
        let mut s = Session::new(&m.model, 64).unwrap();
        s.eval(&tokens, Logits::All).unwrap()
    };
    let (want, got) = (logits(&reference), logits(&ours));
    assert_eq!(got.len(), want.len());
    let worst = want
        .iter()
        .zip(&got)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0f32, f32::max);
    assert!(worst <= 1e-4, "largest logit difference {worst}");
}

fn quant(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_quant"))
        .args(args)
        .output()
        .expect("quant runs")
}

/// Files whose names start with `.tessera-convert-` left in `dir`.
fn leftovers(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with(".tessera-convert-"))
        .collect()
}

#[test]
fn calibrate_takes_a_safetensors_folder() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("q8.gguf");
    let run = quant(&[
        "calibrate",
        "-m",
        fixture().hf_f32.to_str().unwrap(),
        "--method",
        "rtn",
        "--type",
        "Q8_0",
        "--samples",
        "2",
        "--seq-len",
        "64",
        "--no-eval",
        "-o",
        out.to_str().unwrap(),
        "--json",
    ]);
    let err = common::stderr(&run);
    assert!(run.status.success() && !err.contains("panicked"), "{err}");
    let report: Value = serde_json::from_slice(&run.stdout).unwrap();
    let c = &report["calibration"];
    assert_eq!(c["converted_from"]["source_dtypes"], json!(["F32"]));
    assert_eq!(c["source_was_quantized"], false);
    assert_eq!(leftovers(dir.path()), Vec::<String>::new());

    let q = LoadedModel::open(&out, common::gpu()).unwrap();
    assert_eq!(
        q.file.get_str("quantize.source.format").unwrap(),
        "safetensors"
    );
    assert_eq!(
        q.file
            .tensor("blk.0.attn_q.weight")
            .unwrap()
            .ggml_type()
            .name(),
        "Q8_0"
    );
}

/// A one-layer llama folder small enough to build per case: hidden 32, two heads of 16 (one
/// KV head), MLP 64, vocabulary 8.
fn tiny_folder(dir: &Path) -> PathBuf {
    let folder = dir.join("tiny");
    std::fs::create_dir(&folder).unwrap();
    write_json(
        &folder.join("config.json"),
        &json!({
            "model_type": "llama", "hidden_size": 32, "intermediate_size": 64,
            "num_attention_heads": 2, "num_key_value_heads": 1, "num_hidden_layers": 1,
            "vocab_size": 8, "tie_word_embeddings": true
        }),
    );
    write_json(
        &folder.join("tokenizer.json"),
        &json!({
            "added_tokens": [{"id": 0, "content": "<|endoftext|>", "special": true}],
            "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": false},
            "model": {"type": "BPE", "vocab": {"<|endoftext|>": 0, "a": 1, "b": 2, "ab": 3,
                      "\u{120}": 4, "c": 5, "d": 6, "e": 7}, "merges": ["a b"]}
        }),
    );
    let mut tensors = BTreeMap::new();
    let mut add = |name: &str, shape: &[usize]| {
        let n: usize = shape.iter().product();
        let values: Vec<f32> = (0..n).map(|i| (i as f32 * 0.1).sin()).collect();
        let raw = Raw {
            dtype: Dtype::F32,
            shape: shape.to_vec(),
            data: f32_bytes(&values),
        };
        tensors.insert(name.to_string(), raw);
    };
    add("model.embed_tokens.weight", &[8, 32]);
    add("model.norm.weight", &[32]);
    for (part, shape) in [
        ("input_layernorm", &[32][..]),
        ("post_attention_layernorm", &[32]),
        ("self_attn.q_proj", &[32, 32]),
        ("self_attn.k_proj", &[16, 32]),
        ("self_attn.v_proj", &[16, 32]),
        ("self_attn.o_proj", &[32, 32]),
        ("mlp.gate_proj", &[64, 32]),
        ("mlp.up_proj", &[64, 32]),
        ("mlp.down_proj", &[32, 64]),
    ] {
        add(&format!("model.layers.0.{part}.weight"), shape);
    }
    write_safetensors(&folder, "model.safetensors", &tensors);
    folder
}

fn edit_json(path: &Path, edit: impl FnOnce(&mut Value)) {
    let mut v: Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    edit(&mut v);
    write_json(path, &v);
}

/// Rewrites the tensors of the tiny folder's model.safetensors.
fn edit_tensors(folder: &Path, edit: impl FnOnce(&mut BTreeMap<String, Raw>)) {
    let path = folder.join("model.safetensors");
    let bytes = std::fs::read(&path).unwrap();
    let file = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut tensors: BTreeMap<String, Raw> = file
        .tensors()
        .into_iter()
        .map(|(n, t)| {
            let raw = Raw {
                dtype: t.dtype(),
                shape: t.shape().to_vec(),
                data: t.data().to_vec(),
            };
            (n, raw)
        })
        .collect();
    edit(&mut tensors);
    write_safetensors(folder, "model.safetensors", &tensors);
}

#[test]
fn an_f16_folder_keeps_f16_matrices_and_widens_its_norms() {
    let dir = tempfile::tempdir().unwrap();
    let folder = tiny_folder(dir.path());
    edit_tensors(&folder, |tensors| {
        for t in tensors.values_mut() {
            let values: Vec<u8> = t
                .data
                .chunks_exact(4)
                .flat_map(|b| {
                    let x = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
                    half::f16::from_f32(x).to_le_bytes()
                })
                .collect();
            (t.dtype, t.data) = (Dtype::F16, values);
        }
    });
    let source = std::fs::read(folder.join("model.safetensors")).unwrap();
    let source = safetensors::SafeTensors::deserialize(&source).unwrap();
    let out = dir.path().join("f16.gguf");
    let report = hf::convert(&folder, &out, &|_, _| {}).unwrap();
    assert_eq!(report.source_dtypes, ["F16"]);
    let ours = GgufFile::open(&out).unwrap();
    assert_eq!(ours.get("general.file_type"), Some(&MetaValue::U32(1)));

    let up = ours.tensor("blk.0.ffn_up.weight").unwrap();
    assert_eq!(up.ggml_type().name(), "F16");
    let hf_up = source.tensor("model.layers.0.mlp.up_proj.weight").unwrap();
    assert!(ours.tensor_data(up) == hf_up.data());

    let norm = ours.tensor("blk.0.ffn_norm.weight").unwrap();
    assert_eq!(norm.ggml_type().name(), "F32");
    let hf_norm = source
        .tensor("model.layers.0.post_attention_layernorm.weight")
        .unwrap();
    let widened: Vec<u8> = hf_norm
        .data()
        .chunks_exact(2)
        .flat_map(|h| {
            half::f16::from_le_bytes([h[0], h[1]])
                .to_f32()
                .to_le_bytes()
        })
        .collect();
    assert!(ours.tensor_data(norm) == widened);
}

#[test]
fn bad_folders_fail_with_the_problem_named() {
    type Damage = fn(&Path);
    let cases: [(&str, Damage, &[&str]); 10] = [
        (
            "no config",
            |f| std::fs::remove_file(f.join("config.json")).unwrap(),
            &["no config.json"],
        ),
        (
            "unknown model type",
            |f| {
                edit_json(&f.join("config.json"), |v| {
                    v["model_type"] = json!("gpt_neox")
                })
            },
            &["model_type `gpt_neox`", "llama"],
        ),
        (
            "missing tensor",
            |f| {
                edit_tensors(f, |t| {
                    t.remove("model.layers.0.mlp.up_proj.weight");
                })
            },
            &[
                "no tensor `model.layers.0.mlp.up_proj.weight`",
                "incomplete",
            ],
        ),
        (
            "shape mismatch",
            |f| {
                edit_tensors(f, |t| {
                    let up = t.get_mut("model.layers.0.mlp.up_proj.weight").unwrap();
                    up.shape = vec![32, 64];
                })
            },
            &["up_proj.weight", "[32, 64]", "[64, 32]"],
        ),
        (
            "unsupported dtype",
            |f| {
                edit_tensors(f, |t| {
                    t.get_mut("model.norm.weight").unwrap().dtype = Dtype::I32
                })
            },
            &["model.norm.weight", "I32", "F32, F16 and BF16"],
        ),
        (
            "truncated weights",
            |f| {
                let path = f.join("model.safetensors");
                let bytes = std::fs::read(&path).unwrap();
                std::fs::write(&path, &bytes[..bytes.len() - 100]).unwrap();
            },
            &["model.safetensors", "truncated"],
        ),
        (
            "tokenizer not BPE",
            |f| {
                edit_json(&f.join("tokenizer.json"), |v| {
                    v["model"]["type"] = json!("WordPiece")
                })
            },
            &["tokenizer.json", "WordPiece", "BPE"],
        ),
        (
            "unknown pre-tokenizer",
            |f| {
                edit_json(&f.join("tokenizer.json"), |v| {
                    v["pre_tokenizer"] = json!({"type": "Metaspace", "replacement": "_"})
                })
            },
            &["pre-tokenizer", "Metaspace"],
        ),
        (
            "extra tensor",
            |f| {
                edit_tensors(f, |t| {
                    let bias = Raw {
                        dtype: Dtype::F32,
                        shape: vec![32],
                        data: vec![0; 128],
                    };
                    t.insert("model.layers.0.self_attn.q_proj.bias".into(), bias);
                })
            },
            &["q_proj.bias", "not part of the llama graph"],
        ),
        (
            "missing shard",
            |f| {
                let shard = "model-00002-of-00002.safetensors";
                let index = json!({"weight_map": {"model.norm.weight": shard}});
                write_json(&f.join("model.safetensors.index.json"), &index)
            },
            &["model-00002-of-00002.safetensors", "incomplete"],
        ),
    ];

    // The undamaged folder converts, so each failure below is its damage's.
    let dir = tempfile::tempdir().unwrap();
    let good = tiny_folder(dir.path());
    hf::convert(&good, &dir.path().join("tiny.gguf"), &|_, _| {}).unwrap();

    for (what, damage, needles) in cases {
        let dir = tempfile::tempdir().unwrap();
        let folder = tiny_folder(dir.path());
        damage(&folder);
        let out = dir.path().join("out.gguf");
        let run = quant(&[
            "calibrate",
            "-m",
            folder.to_str().unwrap(),
            "--method",
            "rtn",
            "--type",
            "Q8_0",
            "--no-eval",
            "-o",
            out.to_str().unwrap(),
        ]);
        common::assert_clean_failure(&run, needles);
        assert!(!out.exists(), "{what}: an output was written");
        assert_eq!(leftovers(dir.path()), Vec::<String>::new(), "{what}");
    }
}
