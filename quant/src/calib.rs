//! Calibration data: the sets built into the binary, text and JSON-lines files, and the token
//! windows a calibration run evaluates.
//!
//! Windows are cut from each source's tokens without overlap (the first token of each replaced
//! by BOS when the model adds one, as llama-imatrix does), then drawn at random with the seed,
//! so `--samples` and `--seed` pick the same windows on every machine.

use rand::seq::SliceRandom;
use rand::SeedableRng;
use sha2::{Digest, Sha256};
use tessera_models::llm::tokenizer::Tokenizer;

use crate::QuantError;

/// The built-in sets: name, description, text.
pub const BUILTIN: [(&str, &str); 3] = [
    (
        "prose-en",
        "English verse drama: the first 256 KiB of tinyshakespeare",
    ),
    ("code", "Python source: CPython standard-library modules"),
    ("punct", "random punctuation from a fixed seed"),
];

/// The held-out evaluation text (the last 10% of tinyshakespeare), never calibrated on.
pub const HELDOUT_EN: &str = include_str!("../calibration/heldout-en.txt");
const PROSE_EN: &str = include_str!("../calibration/prose-en.txt");
const CODE: &str = include_str!("../calibration/code-python.txt");

/// One calibration source, read and ready to tokenize.
#[derive(Clone, Debug)]
pub struct Source {
    /// The name it was given by (a built-in name or the path as given).
    pub name: String,
    /// Its documents (one for plain text, one per line for JSON lines).
    pub documents: Vec<String>,
}

impl Source {
    /// A built-in set by name, or a file: JSON lines when the file's name ends in `.jsonl` or
    /// its first non-empty line is a JSON object, plain text otherwise.
    pub fn load(spec: &str) -> Result<Source, QuantError> {
        let documents = match spec {
            "prose-en" => vec![PROSE_EN.to_string()],
            "code" => vec![CODE.to_string()],
            "punct" => vec![random_punctuation(64 * 1024, 0x5eed)],
            "heldout-en" => vec![HELDOUT_EN.to_string()],
            path => read_file(path)?,
        };
        let source = Source {
            name: spec.to_string(),
            documents,
        };
        if source.documents.iter().all(|d| d.trim().is_empty()) {
            return Err(QuantError::Data(format!(
                "calibration data `{spec}` holds no text: give a file with text in it (plain \
                 text, or JSON lines with a \"text\" field)"
            )));
        }
        Ok(source)
    }

    /// Bytes of text in all documents.
    pub fn len(&self) -> usize {
        self.documents.iter().map(String::len).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

fn read_file(path: &str) -> Result<Vec<String>, QuantError> {
    let meta = std::fs::metadata(path).map_err(|e| {
        QuantError::Data(format!(
            "cannot read calibration data `{path}`: {e} (built-in sets: {})",
            BUILTIN.map(|b| b.0).join(", ")
        ))
    })?;
    if !meta.is_file() {
        return Err(QuantError::Data(format!(
            "calibration data `{path}` is not a regular file"
        )));
    }
    if meta.len() > 1 << 30 {
        return Err(QuantError::Data(format!(
            "calibration data `{path}` is {} bytes; more than 1 GiB is not read (a calibration \
             set needs only --samples x --seq-len tokens)",
            meta.len()
        )));
    }
    let bytes =
        std::fs::read(path).map_err(|e| QuantError::Data(format!("cannot read `{path}`: {e}")))?;
    let text = String::from_utf8(bytes).map_err(|e| {
        QuantError::Data(format!(
            "calibration data `{path}` is not UTF-8 text (first bad byte at {})",
            e.utf8_error().valid_up_to()
        ))
    })?;
    let first = text.lines().find(|l| !l.trim().is_empty()).unwrap_or("");
    let jsonl = path.ends_with(".jsonl") || first.trim_start().starts_with('{');
    if !jsonl {
        return Ok(vec![text]);
    }
    let mut docs = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let value: serde_json::Value = serde_json::from_str(line)
            .map_err(|e| QuantError::Data(format!("`{path}` line {}: not JSON ({e})", i + 1)))?;
        let text = value
            .get("text")
            .and_then(|t| t.as_str())
            .or_else(|| value.as_object()?.values().find_map(|v| v.as_str()));
        match text {
            Some(t) => docs.push(t.to_string()),
            None => {
                return Err(QuantError::Data(format!(
                    "`{path}` line {}: no \"text\" field (and no other string field)",
                    i + 1
                )))
            }
        }
    }
    Ok(docs)
}

/// `len` bytes of ASCII punctuation, spaces and newlines, from `seed`: a calibration set with
/// no words in it.
pub fn random_punctuation(len: usize, seed: u64) -> String {
    const MARKS: &[u8] = b"!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~";
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut out = String::with_capacity(len);
    while out.len() < len {
        let r: u32 = rand::Rng::random_range(&mut rng, 0..100);
        let c = match r {
            0..=11 => ' ',
            12..=13 => '\n',
            _ => MARKS[(r as usize) % MARKS.len()] as char,
        };
        out.push(c);
    }
    out
}

/// Token windows drawn from some sources, and what identifies them.
#[derive(Clone, Debug)]
pub struct Windows {
    pub windows: Vec<Vec<u32>>,
    /// Windows the sources held in all (before drawing `samples` of them).
    pub available: usize,
    /// sha256 of the text of every source, in order (the provenance of a calibration).
    pub data_hash: String,
    /// The sources' names, in order.
    pub names: Vec<String>,
}

impl Windows {
    pub fn tokens(&self) -> usize {
        self.windows.iter().map(Vec::len).sum()
    }
}

/// Cuts every source into windows of `seq_len` tokens and draws `samples` of them with `seed`
/// (all of them, in a seeded order, when fewer are available).
pub fn windows(
    tokenizer: &Tokenizer,
    sources: &[Source],
    seq_len: usize,
    samples: usize,
    seed: u64,
) -> Result<Windows, QuantError> {
    if seq_len < 2 {
        return Err(QuantError::Data(format!(
            "--seq-len {seq_len} is too short: a window needs at least 2 tokens"
        )));
    }
    if samples == 0 {
        return Err(QuantError::Data("--samples must be at least 1".into()));
    }
    let mut hash = Sha256::new();
    let mut all = Vec::new();
    for source in sources {
        let before = all.len();
        let mut tokens_in_source = 0;
        for doc in &source.documents {
            hash.update(doc.as_bytes());
            let tokens = tokenizer.encode(doc, false, false);
            tokens_in_source += tokens.len();
            for chunk in tokens.chunks_exact(seq_len) {
                let mut w = chunk.to_vec();
                if let (true, Some(bos)) = (tokenizer.add_bos(), tokenizer.bos_id()) {
                    w[0] = bos;
                }
                all.push(w);
            }
        }
        if all.len() == before {
            return Err(QuantError::Data(format!(
                "calibration data `{}` is too short: {tokens_in_source} tokens, and one window \
                 takes --seq-len {seq_len}; give more text or a smaller --seq-len",
                source.name
            )));
        }
    }
    let available = all.len();
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    all.shuffle(&mut rng);
    all.truncate(samples);
    Ok(Windows {
        windows: all,
        available,
        data_hash: format!("{:x}", hash.finalize()),
        names: sources.iter().map(|s| s.name.clone()).collect(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builtin_sets_load_and_punctuation_is_seeded() {
        for (name, _) in BUILTIN {
            let s = Source::load(name).unwrap();
            assert!(s.len() > 60_000, "{name}: {}", s.len());
        }
        let a = random_punctuation(1000, 1);
        assert_eq!(a, random_punctuation(1000, 1));
        assert_ne!(a, random_punctuation(1000, 2));
        assert!(a
            .chars()
            .all(|c| c.is_ascii_punctuation() || c == ' ' || c == '\n'));
        assert!(!HELDOUT_EN.is_empty() && !PROSE_EN.contains(&HELDOUT_EN[..200]));
    }

    #[test]
    fn files_plain_jsonl_and_bad_ones() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("a.jsonl");
        std::fs::write(
            &p,
            "{\"text\": \"one\"}\n\n{\"id\": 3, \"body\": \"two\"}\n",
        )
        .unwrap();
        let s = Source::load(p.to_str().unwrap()).unwrap();
        assert_eq!(s.documents, ["one", "two"]);
        std::fs::write(&p, "{\"text\": \"one\"}\n{\"n\": 1}\n").unwrap();
        let e = Source::load(p.to_str().unwrap()).unwrap_err().to_string();
        assert!(e.contains("line 2") && e.contains("text"), "{e}");
        let p = dir.path().join("empty.txt");
        std::fs::write(&p, " \n\n").unwrap();
        let e = Source::load(p.to_str().unwrap()).unwrap_err().to_string();
        assert!(e.contains("no text"), "{e}");
        std::fs::write(&p, [0xffu8, 0xfe, 0x41]).unwrap();
        let e = Source::load(p.to_str().unwrap()).unwrap_err().to_string();
        assert!(e.contains("not UTF-8"), "{e}");
        let e = Source::load("/nonexistent/x.txt").unwrap_err().to_string();
        assert!(e.contains("prose-en"), "{e}");
        let e = Source::load(dir.path().to_str().unwrap())
            .unwrap_err()
            .to_string();
        assert!(e.contains("not a regular file"), "{e}");
    }
}
