//! llama.cpp importance matrices: the per-input-channel sums of squared activations that
//! `llama-imatrix` collects and `llama-quantize --imatrix` weighs quantization errors with.
//! Reads the GGUF form and the legacy `.dat` form, writes the GGUF form atomically, and gives
//! each weight's importance (mean x_j^2 per input channel) as llama-quantize computes it.
//!
//! ## The GGUF form (facts from llama.cpp's `tools/imatrix/imatrix.cpp`, `common/imatrix-loader`)
//!
//! `general.type` = "imatrix", `imatrix.datasets` (array of string: the text files used),
//! `imatrix.chunk_count` and `imatrix.chunk_size` (u32: chunks processed, tokens per chunk). Per
//! weight `W`, sorted by name, two F32 tensors: `W.in_sum2` with dims `[n_in, n_expert]` holding
//! the raw sums of x_j^2 over every token routed to each expert, and `W.counts` with dims
//! `[1, n_expert]` holding those token counts (as floats). Dense weights have one expert; ggml
//! drops trailing dims of 1, so theirs are `[n_in]` and `[1]`.
//!
//! ## The legacy `.dat` form
//!
//! Little-endian: i32 entry count; per entry an i32 name length, the name, i32 `ncall`, i32
//! value count and that many f32 values, each `(sum / count) * ncall`; then optionally an i32
//! chunk count and an i32-length-prefixed dataset name. Read here as sums `values` with the one
//! count `ncall`, which gives the same importance (`values / ncall`) llama-quantize uses.

use std::collections::BTreeMap;
use std::io::Read;
use std::path::{Path, PathBuf};

use tessera_runtime::io::gguf::{GgmlType, GgufError, GgufFile, MetaValue, ValueType};
use tessera_runtime::io::gguf_write::{GgufWriteError, GgufWriter, TensorData};

/// `general.type` of an importance matrix.
pub const IMATRIX_TYPE: &str = "imatrix";
/// Metadata keys, from llama.cpp's `imatrix-loader.h`.
pub const KEY_GENERAL_TYPE: &str = "general.type";
pub const KEY_DATASETS: &str = "imatrix.datasets";
pub const KEY_CHUNK_COUNT: &str = "imatrix.chunk_count";
pub const KEY_CHUNK_SIZE: &str = "imatrix.chunk_size";
/// Tensor name suffixes: the sums of squares and the token counts of weight `W`.
pub const SUFFIX_SUM_SQ: &str = ".in_sum2";
pub const SUFFIX_COUNTS: &str = ".counts";

const GGUF_MAGIC: &[u8; 4] = b"GGUF";

/// Everything that can go wrong reading or writing an importance matrix.
#[derive(thiserror::Error, Debug)]
pub enum ImatrixError {
    /// The OS error is the source.
    #[error("cannot read importance matrix {}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "{} is neither a GGUF file (it starts with {found:02x?}) nor a legacy imatrix .dat file \
         ({legacy}); pass the file llama-imatrix wrote",
        path.display()
    )]
    NotGguf {
        path: PathBuf,
        found: Vec<u8>,
        /// Why the legacy reader refused it.
        legacy: String,
    },
    #[error("cannot read {} as GGUF", path.display())]
    Gguf {
        path: PathBuf,
        #[source]
        source: GgufError,
    },
    #[error(
        "{} is a GGUF file but not an importance matrix ({found}); pass the .gguf that \
         llama-imatrix wrote, not a model",
        path.display()
    )]
    NotImatrix { path: PathBuf, found: String },
    #[error(
        "importance matrix entry '{entry}' has {found} but no {missing} tensor; the file is \
         incomplete, compute it again"
    )]
    Unpaired {
        entry: String,
        found: String,
        missing: String,
    },
    #[error("importance matrix tensor '{tensor}' is {found}, but must be F32")]
    NotF32 { tensor: String, found: GgmlType },
    #[error(
        "importance matrix entry '{entry}' has {sums} sums, not a nonzero multiple of its \
         {counts} expert counts"
    )]
    MismatchedLengths {
        entry: String,
        sums: usize,
        counts: usize,
    },
    #[error("importance matrix entry '{entry}' has token count {value}, not a whole number >= 0")]
    BadCount { entry: String, value: f32 },
    #[error("metadata key '{key}' of importance matrix {} should be {expected}", path.display())]
    BadMetadata {
        path: PathBuf,
        key: &'static str,
        expected: &'static str,
    },
    #[error("importance matrix {} holds no entries; compute it again", path.display())]
    NoEntries { path: PathBuf },
    #[error(transparent)]
    Write(#[from] GgufWriteError),
}

/// One weight's statistics.
#[derive(Debug, Clone, PartialEq)]
pub struct ImatrixEntry {
    /// Sums of x_j^2 over the tokens seen, expert-major: `counts.len()` rows of
    /// `sum_sq.len() / counts.len()` input channels.
    pub sum_sq: Vec<f32>,
    /// Tokens seen, one count per expert (a single count for dense weights).
    pub counts: Vec<u64>,
}

impl ImatrixEntry {
    /// A dense weight's entry: sums per input channel over `count` tokens.
    pub fn dense(sum_sq: Vec<f32>, count: u64) -> Self {
        Self {
            sum_sq,
            counts: vec![count],
        }
    }

    /// Input channels per expert.
    pub fn n_in(&self) -> usize {
        self.sum_sq.len() / self.counts.len().max(1)
    }

    /// Mean x_j^2 per input channel and expert (sum / count); 1 for an expert that saw no
    /// tokens, as llama-quantize does.
    pub fn importance(&self) -> Vec<f32> {
        let n_in = self.n_in().max(1);
        self.sum_sq
            .chunks(n_in)
            .zip(&self.counts)
            .flat_map(|(sums, &count)| {
                sums.iter()
                    .map(move |&s| if count > 0 { s / count as f32 } else { 1.0 })
            })
            .collect()
    }

    fn check(&self, entry: &str) -> Result<(), ImatrixError> {
        let (sums, counts) = (self.sum_sq.len(), self.counts.len());
        if counts == 0 || sums == 0 || !sums.is_multiple_of(counts) {
            return Err(ImatrixError::MismatchedLengths {
                entry: entry.to_string(),
                sums,
                counts,
            });
        }
        Ok(())
    }
}

/// An importance matrix: entries by weight name, and how it was computed.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Imatrix {
    pub entries: BTreeMap<String, ImatrixEntry>,
    /// Text files the statistics came from.
    pub datasets: Vec<String>,
    /// Chunks processed.
    pub chunk_count: u32,
    /// Tokens per chunk (0 when unknown, as in legacy files).
    pub chunk_size: u32,
}

impl Imatrix {
    /// Reads a GGUF importance matrix, or a legacy `.dat` one (anything not starting "GGUF").
    pub fn read(path: &Path) -> Result<Self, ImatrixError> {
        let io_err = |source| ImatrixError::Io {
            path: path.to_path_buf(),
            source,
        };
        let mut head = Vec::with_capacity(4);
        std::fs::File::open(path)
            .and_then(|f| f.take(4).read_to_end(&mut head))
            .map_err(io_err)?;
        if head == GGUF_MAGIC {
            let file = GgufFile::open(path).map_err(|source| ImatrixError::Gguf {
                path: path.to_path_buf(),
                source,
            })?;
            return Self::from_gguf(&file, path);
        }
        let bytes = std::fs::read(path).map_err(io_err)?;
        read_legacy(&bytes).map_err(|legacy| ImatrixError::NotGguf {
            path: path.to_path_buf(),
            found: head,
            legacy,
        })
    }

    /// The importance matrix in an opened GGUF file; `path` names it in errors.
    pub fn from_gguf(file: &GgufFile, path: &Path) -> Result<Self, ImatrixError> {
        let not_imatrix = |found: String| ImatrixError::NotImatrix {
            path: path.to_path_buf(),
            found,
        };
        let bad = |key, expected| ImatrixError::BadMetadata {
            path: path.to_path_buf(),
            key,
            expected,
        };

        // 1. The file type: "imatrix", or absent in a file that has imatrix tensors.
        match file.get(KEY_GENERAL_TYPE) {
            Some(MetaValue::String(t)) if t == IMATRIX_TYPE => {}
            Some(MetaValue::String(t)) => {
                return Err(not_imatrix(format!("its {KEY_GENERAL_TYPE} is '{t}'")))
            }
            Some(_) => return Err(bad(KEY_GENERAL_TYPE, "a string")),
            None => {}
        }

        // 2. Metadata, each optional as in llama.cpp's loader.
        let datasets = match file.get(KEY_DATASETS) {
            None => Vec::new(),
            Some(MetaValue::Array {
                elem_type: ValueType::String,
                items,
            }) => items
                .iter()
                .filter_map(|v| v.as_str().map(str::to_string))
                .collect(),
            Some(_) => return Err(bad(KEY_DATASETS, "an array of string")),
        };
        let chunk_count = file
            .get_u32_opt(KEY_CHUNK_COUNT)
            .map_err(|_| bad(KEY_CHUNK_COUNT, "a u32"))?
            .unwrap_or(0);
        let chunk_size = file
            .get_u32_opt(KEY_CHUNK_SIZE)
            .map_err(|_| bad(KEY_CHUNK_SIZE, "a u32"))?
            .unwrap_or(0);

        // 3. Pair `W.in_sum2` with `W.counts`; other tensors are ignored, as llama.cpp does.
        let mut pairs: BTreeMap<&str, SumsAndCounts> = BTreeMap::new();
        for t in file.tensors() {
            let (entry, is_sum) = if let Some(e) = t.name().strip_suffix(SUFFIX_SUM_SQ) {
                (e, true)
            } else if let Some(e) = t.name().strip_suffix(SUFFIX_COUNTS) {
                (e, false)
            } else {
                continue;
            };
            if t.ggml_type() != GgmlType::F32 {
                return Err(ImatrixError::NotF32 {
                    tensor: t.name().to_string(),
                    found: t.ggml_type(),
                });
            }
            let values = f32s(file.tensor_data(t));
            let slot = pairs.entry(entry).or_default();
            if is_sum {
                slot.0 = Some(values);
            } else {
                slot.1 = Some(values);
            }
        }
        if pairs.is_empty() {
            if file.get(KEY_GENERAL_TYPE).is_none() {
                return Err(not_imatrix(format!(
                    "no {KEY_GENERAL_TYPE} and no '{SUFFIX_SUM_SQ}' tensors"
                )));
            }
            return Err(ImatrixError::NoEntries {
                path: path.to_path_buf(),
            });
        }

        // 4. Build and check each entry.
        let mut entries = BTreeMap::new();
        for (name, pair) in pairs {
            let unpaired = |found: &str, missing: &str| ImatrixError::Unpaired {
                entry: name.to_string(),
                found: format!("{name}{found}"),
                missing: format!("{name}{missing}"),
            };
            let (sum_sq, raw_counts) = match pair {
                (Some(s), Some(c)) => (s, c),
                (Some(_), None) => return Err(unpaired(SUFFIX_SUM_SQ, SUFFIX_COUNTS)),
                (None, _) => return Err(unpaired(SUFFIX_COUNTS, SUFFIX_SUM_SQ)),
            };
            let counts = raw_counts
                .iter()
                .map(|&c| count_from_f32(name, c))
                .collect::<Result<Vec<_>, _>>()?;
            let entry = ImatrixEntry { sum_sq, counts };
            entry.check(name)?;
            entries.insert(name.to_string(), entry);
        }
        Ok(Self {
            entries,
            datasets,
            chunk_count,
            chunk_size,
        })
    }

    /// Writes the GGUF form atomically, laid out as llama-imatrix lays it out; returns the file
    /// length. Counts are stored as f32, exact up to 2^24 tokens per expert.
    pub fn write(&self, path: &Path) -> Result<u64, ImatrixError> {
        let mut w = GgufWriter::new();
        w.set(
            KEY_GENERAL_TYPE,
            MetaValue::String(IMATRIX_TYPE.to_string()),
        );
        let datasets = self.datasets.iter().cloned().map(MetaValue::String);
        w.set(
            KEY_DATASETS,
            MetaValue::Array {
                elem_type: ValueType::String,
                items: datasets.collect(),
            },
        );
        w.set(KEY_CHUNK_COUNT, MetaValue::U32(self.chunk_count));
        w.set(KEY_CHUNK_SIZE, MetaValue::U32(self.chunk_size));
        for (name, e) in &self.entries {
            e.check(name)?;
            let n_expert = e.counts.len() as u64;
            let sum_dims = ggml_dims(&[e.n_in() as u64, n_expert]);
            let sums = TensorData::Reader(Box::new(F32Reader::new(&e.sum_sq)));
            w.add_tensor(
                format!("{name}{SUFFIX_SUM_SQ}"),
                &sum_dims,
                GgmlType::F32.id(),
                sums,
            )?;
            let counts: Vec<u8> = e
                .counts
                .iter()
                .flat_map(|&c| (c as f32).to_le_bytes())
                .collect();
            w.add_tensor(
                format!("{name}{SUFFIX_COUNTS}"),
                &ggml_dims(&[1, n_expert]),
                GgmlType::F32.id(),
                counts,
            )?;
        }
        Ok(w.write(path)?)
    }

    /// Mean x_j^2 per input channel (and expert, expert-major) of the weight `tensor_name`,
    /// as llama-quantize weighs it; `None` when the matrix has no entry for it.
    pub fn importance(&self, tensor_name: &str) -> Option<Vec<f32>> {
        self.entries.get(tensor_name).map(ImatrixEntry::importance)
    }
}

/// An entry's `in_sum2` and `counts` values, as far as they were found.
type SumsAndCounts = (Option<Vec<f32>>, Option<Vec<f32>>);

/// Dims as ggml records them: trailing dims of 1 dropped, at least one kept (`ggml_n_dims`).
fn ggml_dims(dims: &[u64]) -> Vec<u64> {
    let n = dims.iter().rposition(|&d| d != 1).map_or(1, |i| i + 1);
    dims[..n].to_vec()
}

/// A token count stored as f32, rounded as llama.cpp rounds it (`lround`).
fn count_from_f32(entry: &str, value: f32) -> Result<u64, ImatrixError> {
    let rounded = value.round();
    if !rounded.is_finite() || rounded < 0.0 || rounded >= u64::MAX as f32 {
        return Err(ImatrixError::BadCount {
            entry: entry.to_string(),
            value,
        });
    }
    Ok(rounded as u64)
}

/// Little-endian f32s; a trailing partial value (impossible for a checked F32 tensor) is dropped.
fn f32s(bytes: &[u8]) -> Vec<f32> {
    bytes
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect()
}

/// Streams f32s as little-endian bytes, so writing copies no tensor whole.
struct F32Reader<'a> {
    values: &'a [f32],
    /// Byte position in the encoded stream.
    pos: usize,
}

impl<'a> F32Reader<'a> {
    fn new(values: &'a [f32]) -> Self {
        Self { values, pos: 0 }
    }
}

impl Read for F32Reader<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let mut n = 0;
        while n < buf.len() {
            let Some(v) = self.values.get(self.pos / 4) else {
                break;
            };
            let byte = v.to_le_bytes()[self.pos % 4];
            buf[n] = byte;
            n += 1;
            self.pos += 1;
        }
        Ok(n)
    }
}

/// A bounds-checked cursor over a legacy file; errors are plain messages for `NotGguf`.
struct LegacyCursor<'a> {
    bytes: &'a [u8],
    pos: usize,
}

impl LegacyCursor<'_> {
    fn take(&mut self, n: usize, what: &str) -> Result<&[u8], String> {
        let end = self.pos.checked_add(n).filter(|&e| e <= self.bytes.len());
        let Some(end) = end else {
            return Err(format!(
                "{what} at byte {} needs {n} bytes, the file has {}",
                self.pos,
                self.bytes.len()
            ));
        };
        let out = &self.bytes[self.pos..end];
        self.pos = end;
        Ok(out)
    }

    fn i32(&mut self, what: &str) -> Result<i32, String> {
        let b = self.take(4, what)?;
        Ok(i32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }

    /// A length or count: an i32 that must be >= `min`.
    fn len(&mut self, what: &str, min: i32) -> Result<usize, String> {
        let v = self.i32(what)?;
        if v < min {
            return Err(format!("{what} is {v}"));
        }
        Ok(v as usize)
    }

    fn at_end(&self) -> bool {
        self.pos >= self.bytes.len()
    }
}

/// Parses the legacy `.dat` form; the error says what did not fit.
fn read_legacy(bytes: &[u8]) -> Result<Imatrix, String> {
    let mut c = LegacyCursor { bytes, pos: 0 };
    let n_entries = c.len("the entry count", 1)?;
    let mut m = Imatrix::default();
    for i in 0..n_entries {
        let len = c.len(&format!("name length of entry {i}"), 0)?;
        let name = std::str::from_utf8(c.take(len, &format!("name of entry {i}"))?)
            .map_err(|_| format!("name of entry {i} is not UTF-8"))?
            .to_string();
        let ncall = c.i32(&format!("call count of '{name}'"))?;
        let nval = c.len(&format!("value count of '{name}'"), 1)?;
        let values = nval
            .checked_mul(4)
            .ok_or_else(|| format!("value count of '{name}' is {nval}"))?;
        let sum_sq = f32s(c.take(values, &format!("values of '{name}'"))?);
        // `values / ncall` is the importance llama-quantize uses; it uses the values as they
        // are when ncall is not positive, which a count of 1 reproduces.
        let count = u64::try_from(ncall).ok().filter(|&n| n > 0).unwrap_or(1);
        if m.entries
            .insert(name.clone(), ImatrixEntry::dense(sum_sq, count))
            .is_some()
        {
            return Err(format!("entry '{name}' appears twice"));
        }
    }
    // The trailing chunk count and dataset name are optional.
    if !c.at_end() {
        m.chunk_count = u32::try_from(c.i32("the chunk count")?).unwrap_or(0);
        if !c.at_end() {
            let len = c.len("the dataset name length", 0)?;
            let name = c.take(len, "the dataset name")?;
            if len > 0 {
                m.datasets.push(String::from_utf8_lossy(name).into_owned());
            }
        }
    }
    if !c.at_end() {
        return Err(format!(
            "{} unexpected bytes at the end",
            bytes.len() - c.pos
        ));
    }
    Ok(m)
}

#[cfg(test)]
mod tests {
    use super::*;

    const FIXTURE_DIR: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/data/imatrix");
    /// The three entries the fixtures keep (see tests/data/imatrix/README.md).
    const FIXTURE_ENTRIES: [(&str, usize); 3] = [
        ("blk.0.attn_q.weight", 576),
        ("blk.0.ffn_down.weight", 1536),
        ("blk.29.ffn_gate.weight", 576),
    ];

    fn fixture(ext: &str) -> PathBuf {
        Path::new(FIXTURE_DIR).join(format!("smollm2-3.imatrix.{ext}"))
    }

    fn sample() -> Imatrix {
        let mut entries = BTreeMap::new();
        entries.insert(
            "blk.0.attn_q.weight".to_string(),
            ImatrixEntry::dense(vec![2.0, 4.5, 0.0, 8.0], 4),
        );
        // Three experts of 2 channels; the last one saw no tokens.
        entries.insert(
            "blk.0.ffn_up_exps.weight".to_string(),
            ImatrixEntry {
                sum_sq: vec![1.0, 3.0, 10.0, 20.0, 0.0, 0.0],
                counts: vec![2, 5, 0],
            },
        );
        Imatrix {
            entries,
            datasets: vec!["a.txt".into(), "b ✓.txt".into()],
            chunk_count: 7,
            chunk_size: 512,
        }
    }

    fn listing(dir: &Path) -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    }

    #[test]
    fn imatrix_round_trips_through_gguf_with_experts_and_datasets() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("out.imatrix.gguf");
        let m = sample();
        m.write(&path).unwrap();
        assert_eq!(listing(dir.path()), ["out.imatrix.gguf"]);
        assert_eq!(Imatrix::read(&path).unwrap(), m);
        // The layout llama-imatrix uses: 2-d sums and counts, trailing 1s dropped.
        let f = GgufFile::open(&path).unwrap();
        let dims = |n: &str| f.tensor(n).unwrap().dims().to_vec();
        assert_eq!(dims("blk.0.ffn_up_exps.weight.in_sum2"), [2, 3]);
        assert_eq!(dims("blk.0.ffn_up_exps.weight.counts"), [1, 3]);
        assert_eq!(dims("blk.0.attn_q.weight.in_sum2"), [4]);
        assert_eq!(dims("blk.0.attn_q.weight.counts"), [1]);
        assert_eq!(f.get_str(KEY_GENERAL_TYPE).unwrap(), "imatrix");
    }

    #[test]
    fn imatrix_importance_is_sum_over_count_per_expert_and_one_where_unseen() {
        let m = sample();
        assert_eq!(
            m.importance("blk.0.attn_q.weight").unwrap(),
            [0.5, 1.125, 0.0, 2.0]
        );
        assert_eq!(
            m.importance("blk.0.ffn_up_exps.weight").unwrap(),
            [0.5, 1.5, 2.0, 4.0, 1.0, 1.0]
        );
        assert_eq!(m.importance("output.weight"), None);
    }

    #[test]
    fn imatrix_reads_the_file_llama_imatrix_wrote() {
        let m = Imatrix::read(&fixture("gguf")).unwrap();
        assert_eq!(m.datasets, ["train.txt"]);
        assert_eq!((m.chunk_count, m.chunk_size), (2, 128));
        let names: Vec<&str> = m.entries.keys().map(String::as_str).collect();
        assert_eq!(names, FIXTURE_ENTRIES.map(|(n, _)| n));
        for (name, n_in) in FIXTURE_ENTRIES {
            let e = &m.entries[name];
            // 2 chunks of 128 tokens, every token seen by every dense weight.
            assert_eq!(e.counts, [256], "{name}");
            assert_eq!(e.sum_sq.len(), n_in, "{name}");
            assert!(
                e.sum_sq.iter().all(|x| x.is_finite() && *x >= 0.0),
                "{name}"
            );
            assert!(e.sum_sq.iter().any(|&x| x > 0.0), "{name}");
        }
        // Values as gguf-py printed them from the file.
        let q = &m.entries["blk.0.attn_q.weight"].sum_sq;
        assert!((q[0] - 0.058_646_98).abs() < 1e-7 && (q[1] - 0.098_879_79).abs() < 1e-7);
        let imp = m.importance("blk.0.ffn_down.weight").unwrap();
        assert!((imp[2] - 9.276_673 / 256.0).abs() < 1e-6);
    }

    #[test]
    fn imatrix_legacy_dat_from_the_same_run_gives_the_same_importance() {
        let gguf = Imatrix::read(&fixture("gguf")).unwrap();
        let dat = Imatrix::read(&fixture("dat")).unwrap();
        assert_eq!(dat.datasets, ["train.txt"]);
        assert_eq!((dat.chunk_count, dat.chunk_size), (2, 0));
        assert_eq!(dat.entries.len(), 3);
        for (name, _) in FIXTURE_ENTRIES {
            // ncall: 256 tokens in chunks of 128.
            assert_eq!(dat.entries[name].counts, [2], "{name}");
            let (a, b) = (
                gguf.importance(name).unwrap(),
                dat.importance(name).unwrap(),
            );
            assert_eq!(a.len(), b.len());
            for (x, y) in a.iter().zip(&b) {
                assert!(
                    (x - y).abs() <= 1e-6 * x.abs().max(1e-3),
                    "{name}: {x} vs {y}"
                );
            }
        }
    }

    #[test]
    fn imatrix_written_back_matches_the_llama_cpp_layout_byte_for_byte() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("again.gguf");
        Imatrix::read(&fixture("gguf"))
            .unwrap()
            .write(&path)
            .unwrap();
        assert_eq!(
            std::fs::read(path).unwrap(),
            std::fs::read(fixture("gguf")).unwrap()
        );
    }

    /// Writes a GGUF file with `meta` and F32 tensors `(name, dims, values)`.
    fn craft(
        dir: &Path,
        meta: &[(&str, MetaValue)],
        tensors: &[(&str, &[u64], &[f32])],
    ) -> PathBuf {
        let mut w = GgufWriter::new();
        for (k, v) in meta {
            w.set(*k, v.clone());
        }
        for (name, dims, values) in tensors {
            let bytes: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
            w.add_tensor(*name, dims, 0, bytes).unwrap();
        }
        let path = dir.join(format!("crafted-{}.gguf", listing(dir).len()));
        w.write(&path).unwrap();
        path
    }

    #[test]
    fn imatrix_read_names_what_is_wrong_with_other_files() {
        let dir = tempfile::tempdir().unwrap();
        let imatrix = || ("general.type", MetaValue::String("imatrix".into()));

        let model = craft(
            dir.path(),
            &[("general.type", MetaValue::String("model".into()))],
            &[("w", &[4], &[0.0; 4])],
        );
        let err = Imatrix::read(&model).unwrap_err();
        assert!(matches!(err, ImatrixError::NotImatrix { .. }), "{err}");
        assert!(err.to_string().contains("'model'"), "{err}");
        let untyped = craft(dir.path(), &[], &[("w", &[4], &[0.0; 4])]);
        assert!(matches!(
            Imatrix::read(&untyped),
            Err(ImatrixError::NotImatrix { .. })
        ));
        let empty = craft(dir.path(), &[imatrix()], &[]);
        assert!(matches!(
            Imatrix::read(&empty),
            Err(ImatrixError::NoEntries { .. })
        ));

        let text = dir.path().join("notes.txt");
        std::fs::write(&text, "hello, this is not an importance matrix").unwrap();
        let err = Imatrix::read(&text).unwrap_err();
        assert!(matches!(err, ImatrixError::NotGguf { .. }), "{err}");
        assert!(err.to_string().contains("legacy imatrix .dat"), "{err}");
        let err = Imatrix::read(&dir.path().join("absent.gguf")).unwrap_err();
        assert!(matches!(err, ImatrixError::Io { .. }), "{err}");

        let unpaired = craft(dir.path(), &[imatrix()], &[("w.in_sum2", &[4], &[1.0; 4])]);
        let err = Imatrix::read(&unpaired).unwrap_err();
        assert!(
            matches!(err, ImatrixError::Unpaired { ref missing, .. } if missing == "w.counts"),
            "{err}"
        );
        let mismatched = craft(
            dir.path(),
            &[imatrix()],
            &[
                ("w.in_sum2", &[5], &[1.0; 5]),
                ("w.counts", &[1, 2], &[3.0, 3.0]),
            ],
        );
        let err = Imatrix::read(&mismatched).unwrap_err();
        assert!(
            matches!(
                err,
                ImatrixError::MismatchedLengths {
                    sums: 5,
                    counts: 2,
                    ..
                }
            ),
            "{err}"
        );
        let negative = craft(
            dir.path(),
            &[imatrix()],
            &[("w.in_sum2", &[2], &[1.0; 2]), ("w.counts", &[1], &[-4.0])],
        );
        assert!(matches!(
            Imatrix::read(&negative),
            Err(ImatrixError::BadCount { .. })
        ));

        let mut w = GgufWriter::new();
        w.set("general.type", MetaValue::String("imatrix".into()));
        w.add_tensor("w.in_sum2", &[2], GgmlType::F16.id(), vec![0u8; 4])
            .unwrap();
        w.add_tensor("w.counts", &[1], 0, 1f32.to_le_bytes().to_vec())
            .unwrap();
        let f16 = dir.path().join("f16.gguf");
        w.write(&f16).unwrap();
        let err = Imatrix::read(&f16).unwrap_err();
        assert!(
            matches!(
                err,
                ImatrixError::NotF32 {
                    found: GgmlType::F16,
                    ..
                }
            ),
            "{err}"
        );
    }

    #[test]
    fn imatrix_legacy_reader_rejects_truncated_and_padded_files() {
        let good = std::fs::read(fixture("dat")).unwrap();
        assert!(read_legacy(&good).is_ok());
        for cut in [0, 3, 4, 30, good.len() / 2, good.len() - 1] {
            assert!(read_legacy(&good[..cut]).is_err(), "cut at {cut}");
        }
        let mut padded = good.clone();
        padded.push(0);
        assert!(read_legacy(&padded)
            .unwrap_err()
            .contains("unexpected bytes"));
    }

    #[test]
    fn imatrix_write_rejects_mismatched_lengths_and_leaves_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let mut m = sample();
        m.entries.insert(
            "bad".into(),
            ImatrixEntry {
                sum_sq: vec![1.0; 5],
                counts: vec![1, 1],
            },
        );
        let err = m.write(&dir.path().join("x.gguf")).unwrap_err();
        assert!(matches!(err, ImatrixError::MismatchedLengths { ref entry, .. } if entry == "bad"));
        m.entries.get_mut("bad").unwrap().counts.clear();
        assert!(matches!(
            m.write(&dir.path().join("x.gguf")),
            Err(ImatrixError::MismatchedLengths { counts: 0, .. })
        ));
        assert!(listing(dir.path()).is_empty());
    }
}
