//! tokenizer.json (a byte-level BPE: vocabulary, merges, added tokens, pre-tokenizer) and
//! tokenizer_config.json (special tokens, chat template) as GGUF `tokenizer.ggml.*` keys, with
//! token types and special ids chosen as llama.cpp's converter chooses them. The result is
//! built into a [`Tokenizer`] before anything is written, so what cannot be run is an error here.

use std::collections::HashMap;
use std::path::Path;

use serde_json::Value;
use tessera_runtime::io::gguf::{MetaValue, ValueType};

use super::config::HfConfig;
use super::{read_json, HfError};
use crate::llm::tokenizer::{Tokenizer, TokenizerSpec};

// GGUF token types (llama.cpp's llama_token_type).
const NORMAL: i32 = 1;
const CONTROL: i32 = 3;
const USER_DEFINED: i32 = 4;
const UNUSED: i32 = 5;

/// Llama 3's pre-tokenizer regex as tokenizer.json spells it.
const LLAMA3_SPLIT: &str = concat!(
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+",
    r"[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
);

/// The pre-tokenizers recognised, as `tokenizer.ggml.pre` names them, for error messages.
const KNOWN_PRE: &str = "ByteLevel (gpt2), Digits(individual) + ByteLevel (smollm), Llama 3's \
                         Split regex + ByteLevel (llama-bpe)";

/// A checkpoint's tokenizer as GGUF describes it.
#[derive(Clone, Debug)]
pub struct HfTokenizer {
    pub spec: TokenizerSpec,
    pub unknown_id: Option<u32>,
    pub padding_id: Option<u32>,
    pub chat_template: Option<String>,
}

/// Reads tokenizer.json, tokenizer_config.json (optional) and chat_template.jinja (optional)
/// from `dir`; the vocabulary is padded to config.json's `vocab_size` with unused tokens.
pub fn read_tokenizer(dir: &Path, config: &HfConfig) -> Result<HfTokenizer, HfError> {
    let path = dir.join("tokenizer.json");
    if !path.is_file() {
        return Err(HfError::MissingFile {
            path,
            hint: "Tessera reads the tokenizer from tokenizer.json (a byte-level BPE); a \
                   sentencepiece tokenizer.model alone is not read"
                .into(),
        });
    }
    let tokenizer = read_json(&path)?;
    let config_path = dir.join("tokenizer_config.json");
    let tokenizer_config = if config_path.is_file() {
        read_json(&config_path)?
    } else {
        Value::Null
    };
    let jinja = dir.join("chat_template.jinja");
    let jinja = if jinja.is_file() {
        Some(
            std::fs::read_to_string(&jinja).map_err(|source| HfError::Io {
                path: jinja,
                source,
            })?,
        )
    } else {
        None
    };
    from_json(&tokenizer, &tokenizer_config, jinja, config)
}

/// Builds the GGUF tokenizer from parsed files.
pub(super) fn from_json(
    tokenizer: &Value,
    tokenizer_config: &Value,
    chat_template_file: Option<String>,
    config: &HfConfig,
) -> Result<HfTokenizer, HfError> {
    let bad = |msg: String| HfError::Tokenizer(msg);

    // 1. The model must be a byte-level BPE.
    let model = tokenizer
        .get("model")
        .ok_or_else(|| bad("no `model` section".into()))?;
    let kind = model
        .get("type")
        .and_then(Value::as_str)
        .unwrap_or("(none)");
    if kind != "BPE" {
        return Err(bad(format!(
            "the model is `{kind}`, not BPE; Tessera reads byte-level BPE tokenizers (GPT-2, \
             Llama 3, SmolLM style) only"
        )));
    }
    if model.get("byte_fallback").and_then(Value::as_bool) == Some(true) {
        return Err(bad(
            "the BPE has `byte_fallback` (a sentencepiece-style vocabulary, as in Llama 2); \
             Tessera reads byte-level BPE tokenizers only"
                .into(),
        ));
    }
    let pre = pre_tokenizer_name(tokenizer.get("pre_tokenizer").unwrap_or(&Value::Null))?;

    // 2. Tokens: the vocabulary, then the added tokens over it, padded to vocab_size.
    let n = config.vocab_size;
    let mut tokens: Vec<Option<String>> = vec![None; n];
    let mut types = vec![UNUSED; n];
    let vocab = model
        .get("vocab")
        .and_then(Value::as_object)
        .ok_or_else(|| bad("`model.vocab` is missing or not an object".into()))?;
    let mut ids: HashMap<&str, u32> = HashMap::with_capacity(vocab.len());
    for (text, id) in vocab {
        let id = slot(id, text, n)?;
        tokens[id] = Some(text.clone());
        types[id] = NORMAL;
        ids.insert(text, id as u32);
    }
    let added = match tokenizer.get("added_tokens") {
        None | Some(Value::Null) => &[][..],
        Some(Value::Array(a)) => a.as_slice(),
        Some(_) => return Err(bad("`added_tokens` is not a list".into())),
    };
    for token in added {
        let text = token
            .get("content")
            .and_then(Value::as_str)
            .ok_or_else(|| bad(format!("an added token has no `content`: {token}")))?;
        let id = slot(token.get("id").unwrap_or(&Value::Null), text, n)?;
        let special = token.get("special").and_then(Value::as_bool) == Some(true);
        if special || looks_special(text) {
            tokens[id] = Some(text.to_string());
            types[id] = CONTROL;
        } else {
            // llama.cpp expects user-defined tokens pre-normalized: sentencepiece spaces as ' '.
            tokens[id] = Some(text.replace('\u{2581}', " "));
            types[id] = USER_DEFINED;
        }
        ids.insert(text, id as u32);
    }
    let tokens: Vec<String> = tokens
        .into_iter()
        .enumerate()
        .map(|(i, t)| t.unwrap_or_else(|| format!("[PAD{i}]")))
        .collect();

    // 3. Merges: "a b" strings, or [a, b] pairs in newer files.
    let merges = match model.get("merges") {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::Array(list)) => list
            .iter()
            .map(|m| match m {
                Value::String(s) => Ok(s.clone()),
                Value::Array(pair) if pair.len() == 2 => match (pair[0].as_str(), pair[1].as_str())
                {
                    (Some(a), Some(b)) => Ok(format!("{a} {b}")),
                    _ => Err(bad(format!("merge {m} is not two strings"))),
                },
                _ => Err(bad(format!(
                    "merge {m} is neither \"a b\" nor [\"a\", \"b\"]"
                ))),
            })
            .collect::<Result<_, _>>()?,
        Some(_) => return Err(bad("`model.merges` is not a list".into())),
    };

    // 4. Special tokens: tokenizer_config.json's texts, else config.json's ids.
    let special = |name: &str| -> Option<u32> {
        let text = match tokenizer_config.get(format!("{name}_token"))? {
            Value::String(s) => s.as_str(),
            v => v.get("content")?.as_str()?,
        };
        let id = ids.get(text).copied();
        if id.is_none() {
            log::warn!("tokenizer_config.json: {name}_token `{text}` is not in the vocabulary");
        }
        id
    };
    let bos_id = special("bos").or(config.bos_token_id);
    let eos_id = special("eos").or(config.eos_token_id);
    let (template_bos, template_eos) = template_adds(tokenizer, &tokens, bos_id, eos_id);
    let flag = |key: &str| tokenizer_config.get(key).and_then(Value::as_bool);
    let spec = TokenizerSpec {
        model: "gpt2".into(),
        pre: pre.into(),
        tokens,
        token_types: types,
        merges,
        bos_id,
        eos_id,
        eot_id: None,
        add_bos: flag("add_bos_token").unwrap_or(template_bos),
        add_eos: flag("add_eos_token").unwrap_or(template_eos),
    };

    // 5. The chat template: tokenizer_config.json's, else chat_template.jinja.
    let chat_template = match tokenizer_config.get("chat_template") {
        Some(Value::String(s)) => Some(s.clone()),
        Some(Value::Array(named)) => named
            .iter()
            .find(|t| t.get("name").and_then(Value::as_str) == Some("default"))
            .or_else(|| named.first())
            .and_then(|t| t.get("template"))
            .and_then(Value::as_str)
            .map(str::to_string),
        _ => None,
    }
    .or(chat_template_file);

    // 6. What Tessera cannot run fails now, not after the weights are written.
    Tokenizer::new(spec.clone()).map_err(|e| bad(e.to_string()))?;
    Ok(HfTokenizer {
        spec,
        unknown_id: special("unk"),
        padding_id: special("pad"),
        chat_template,
    })
}

impl HfTokenizer {
    /// The `tokenizer.*` keys, in the order llama.cpp's converter writes them.
    pub fn gguf_metadata(&self) -> Vec<(String, MetaValue)> {
        let s = |v: &str| MetaValue::String(v.to_string());
        let strings = |items: &[String]| MetaValue::Array {
            elem_type: ValueType::String,
            items: items.iter().map(|t| s(t)).collect(),
        };
        let spec = &self.spec;
        let mut keys = vec![
            ("tokenizer.ggml.model", s(&spec.model)),
            ("tokenizer.ggml.pre", s(&spec.pre)),
            ("tokenizer.ggml.tokens", strings(&spec.tokens)),
            (
                "tokenizer.ggml.token_type",
                MetaValue::Array {
                    elem_type: ValueType::I32,
                    items: spec
                        .token_types
                        .iter()
                        .map(|&t| MetaValue::I32(t))
                        .collect(),
                },
            ),
            ("tokenizer.ggml.merges", strings(&spec.merges)),
        ];
        let ids = [
            ("tokenizer.ggml.bos_token_id", spec.bos_id),
            ("tokenizer.ggml.eos_token_id", spec.eos_id),
            ("tokenizer.ggml.unknown_token_id", self.unknown_id),
            ("tokenizer.ggml.padding_token_id", self.padding_id),
        ];
        for (key, id) in ids {
            if let Some(id) = id {
                keys.push((key, MetaValue::U32(id)));
            }
        }
        keys.push((
            "tokenizer.ggml.add_bos_token",
            MetaValue::Bool(spec.add_bos),
        ));
        keys.push((
            "tokenizer.ggml.add_eos_token",
            MetaValue::Bool(spec.add_eos),
        ));
        if let Some(t) = &self.chat_template {
            keys.push(("tokenizer.chat_template", s(t)));
        }
        keys.into_iter().map(|(k, v)| (k.to_string(), v)).collect()
    }
}

/// A token id from the JSON, checked against the vocabulary size.
fn slot(id: &Value, text: &str, n: usize) -> Result<usize, HfError> {
    match id.as_u64() {
        Some(i) if (i as usize) < n && i <= u64::from(u32::MAX) => Ok(i as usize),
        Some(i) => Err(HfError::Tokenizer(format!(
            "token `{text}` has id {i}, past config.json's vocab_size {n}"
        ))),
        None => Err(HfError::Tokenizer(format!(
            "token `{text}` has id {id}, not a whole number"
        ))),
    }
}

/// llama.cpp's converter marks these added tokens as control even when not flagged special.
fn looks_special(text: &str) -> bool {
    matches!(text, "<pad>" | "<mask>" | "<2mass>" | "[@BOS@]")
        || (text.starts_with("<|") && text.ends_with("|>"))
        || (text.starts_with("<\u{ff5c}") && text.ends_with("\u{ff5c}>"))
        || (text.starts_with("<unused") && text.ends_with('>'))
}

/// `tokenizer.ggml.pre` for a tokenizer.json pre-tokenizer, recognised by its structure (the
/// regexes it implies), or an error that describes it.
fn pre_tokenizer_name(pre: &Value) -> Result<&'static str, HfError> {
    let kind = |v: &Value| {
        v.get("type")
            .and_then(Value::as_str)
            .unwrap_or("?")
            .to_string()
    };
    let byte_level = |v: &Value, regex: bool| {
        kind(v) == "ByteLevel"
            && v.get("use_regex").and_then(Value::as_bool).unwrap_or(true) == regex
            && v.get("add_prefix_space").and_then(Value::as_bool) != Some(true)
    };
    let steps: Vec<&Value> = match kind(pre).as_str() {
        "Sequence" => pre
            .get("pretokenizers")
            .and_then(Value::as_array)
            .map(|a| a.iter().collect())
            .unwrap_or_default(),
        _ => vec![pre],
    };
    let found = match steps.as_slice() {
        [b] if byte_level(b, true) => Some("gpt2"),
        [d, b]
            if kind(d) == "Digits"
                && d.get("individual_digits").and_then(Value::as_bool) == Some(true)
                && byte_level(b, true) =>
        {
            Some("smollm")
        }
        [s, b]
            if kind(s) == "Split"
                && s.pointer("/pattern/Regex").and_then(Value::as_str) == Some(LLAMA3_SPLIT)
                && s.get("behavior").and_then(Value::as_str) == Some("Isolated")
                && byte_level(b, false) =>
        {
            Some("llama-bpe")
        }
        _ => None,
    };
    found.ok_or_else(|| {
        let described: Vec<String> = steps.iter().map(|s| describe(s)).collect();
        HfError::Tokenizer(format!(
            "the pre-tokenizer [{}] is not one Tessera knows ({KNOWN_PRE}); convert the model \
             with llama.cpp's convert_hf_to_gguf.py if llama.cpp knows it",
            described.join(", ")
        ))
    })
}

/// One pre-tokenizer step in a line: its type and its settings.
fn describe(step: &Value) -> String {
    let Some(obj) = step.as_object() else {
        return step.to_string();
    };
    let kind = obj.get("type").and_then(Value::as_str).unwrap_or("?");
    let settings: Vec<String> = obj
        .iter()
        .filter(|(k, _)| *k != "type")
        .map(|(k, v)| format!("{k}={v}"))
        .collect();
    format!("{kind}({})", settings.join(" "))
}

/// Whether tokenizer.json's post-processor template starts with BOS and ends with EOS.
fn template_adds(
    tokenizer: &Value,
    tokens: &[String],
    bos: Option<u32>,
    eos: Option<u32>,
) -> (bool, bool) {
    let post = tokenizer.get("post_processor").unwrap_or(&Value::Null);
    let processors: Vec<&Value> = match post.get("processors").and_then(Value::as_array) {
        Some(list) => list.iter().collect(),
        None => vec![post],
    };
    let Some(single) = processors
        .iter()
        .find(|p| p.get("type").and_then(Value::as_str) == Some("TemplateProcessing"))
        .and_then(|p| p.get("single"))
        .and_then(Value::as_array)
    else {
        return (false, false);
    };
    let special_text = |item: Option<&Value>| {
        item.and_then(|v| v.pointer("/SpecialToken/id"))
            .and_then(Value::as_str)
            .map(str::to_string)
    };
    let is = |text: Option<String>, id: Option<u32>| match (text, id) {
        (Some(t), Some(i)) => tokens.get(i as usize) == Some(&t),
        _ => false,
    };
    (
        is(special_text(single.first()), bos),
        is(special_text(single.last()), eos),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn config(vocab_size: usize) -> HfConfig {
        HfConfig::parse(&json!({
            "model_type": "llama", "hidden_size": 32, "intermediate_size": 64,
            "num_attention_heads": 2, "num_hidden_layers": 1, "vocab_size": vocab_size
        }))
        .unwrap()
    }

    fn tokenizer(pre: Value) -> Value {
        json!({
            "added_tokens": [
                {"id": 0, "content": "<|endoftext|>", "special": true},
                {"id": 1, "content": "<|im_start|>", "special": false},
                {"id": 2, "content": "<tool>", "special": false}
            ],
            "pre_tokenizer": pre,
            "model": {"type": "BPE", "vocab": {"a": 3, "b": 4, "ab": 5}, "merges": [["a", "b"]]}
        })
    }

    fn digits_byte_level() -> Value {
        json!({"type": "Sequence", "pretokenizers": [
            {"type": "Digits", "individual_digits": true},
            {"type": "ByteLevel", "add_prefix_space": false, "use_regex": true}
        ]})
    }

    #[test]
    fn tokens_are_typed_and_padded_as_llama_cpp_does() {
        let tc = json!({"bos_token": "<|im_start|>", "eos_token": {"content": "<|endoftext|>"},
                        "chat_template": "{{ messages }}"});
        let t = from_json(&tokenizer(digits_byte_level()), &tc, None, &config(8)).unwrap();
        assert_eq!(t.spec.pre, "smollm");
        assert_eq!(t.spec.tokens[6..], ["[PAD6]", "[PAD7]"]);
        // Special, special-looking, user-defined, normal, unused.
        assert_eq!(t.spec.token_types, [3, 3, 4, 1, 1, 1, 5, 5]);
        assert_eq!(t.spec.merges, ["a b"]);
        assert_eq!((t.spec.bos_id, t.spec.eos_id), (Some(1), Some(0)));
        assert_eq!(t.chat_template.as_deref(), Some("{{ messages }}"));
    }

    #[test]
    fn pre_tokenizers_map_by_structure_and_unknown_ones_are_described() {
        let gpt2 = json!({"type": "ByteLevel", "add_prefix_space": false});
        let llama3 = json!({"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": LLAMA3_SPLIT}, "behavior": "Isolated"},
            {"type": "ByteLevel", "use_regex": false}
        ]});
        for (pre, want) in [(gpt2, "gpt2"), (llama3, "llama-bpe")] {
            assert_eq!(pre_tokenizer_name(&pre).unwrap(), want);
        }
        let odd = json!({"type": "Whitespace"});
        let e = from_json(&tokenizer(odd), &Value::Null, None, &config(8))
            .unwrap_err()
            .to_string();
        assert!(e.contains("Whitespace") && e.contains("smollm"), "{e}");
    }

    #[test]
    fn tokenizers_that_are_not_byte_level_bpe_are_refused() {
        let mut unigram = tokenizer(digits_byte_level());
        unigram["model"]["type"] = json!("Unigram");
        let mut fallback = tokenizer(digits_byte_level());
        fallback["model"]["byte_fallback"] = json!(true);
        for (t, needle) in [(unigram, "Unigram"), (fallback, "byte_fallback")] {
            let e = from_json(&t, &Value::Null, None, &config(8))
                .unwrap_err()
                .to_string();
            assert!(e.contains(needle), "{e}");
        }
        let e = from_json(
            &tokenizer(digits_byte_level()),
            &Value::Null,
            None,
            &config(4),
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("vocab_size 4"), "{e}");
    }
}
