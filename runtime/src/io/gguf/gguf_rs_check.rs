//! Runs gguf-rs 0.1.8 on the files `super::tests` crafts and on the real model: asserts that both
//! parsers agree on valid files, and that gguf-rs's measured shortcomings (the table in the module
//! doc of `gguf.rs`) still hold. Cases that would make gguf-rs allocate a large buffer (a string
//! length up to its 1 GiB cap) are read from its source, not run.

use super::tests::{fixture, model_path, Builder};
use super::*;
use gguf_rs::{ByteOrder, GGUFContainer, GGUFModel};
use serde_json::Value;
use std::io::{BufReader, Cursor, Read};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::time::{Duration, Instant};

/// What gguf-rs did with a file.
enum Rs {
    Accepted(Box<GGUFModel>),
    Rejected(String),
    Panicked(String),
}

impl Rs {
    fn accepted(self, what: &str) -> GGUFModel {
        match self {
            Rs::Accepted(m) => *m,
            Rs::Rejected(e) => panic!("{what}: gguf-rs rejected it: {e}"),
            Rs::Panicked(p) => panic!("{what}: gguf-rs panicked: {p}"),
        }
    }

    fn rejected(self, what: &str) -> String {
        match self {
            Rs::Rejected(e) => e,
            Rs::Accepted(_) => panic!("{what}: gguf-rs accepted it"),
            Rs::Panicked(p) => panic!("{what}: gguf-rs panicked: {p}"),
        }
    }

    fn kind(&self) -> &'static str {
        match self {
            Rs::Accepted(_) => "accepted",
            Rs::Rejected(_) => "rejected",
            Rs::Panicked(_) => "panicked",
        }
    }
}

fn panic_text(p: Box<dyn std::any::Any + Send>) -> String {
    p.downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| p.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "non-string panic".to_string())
}

/// Decodes `bytes` the way `gguf_rs::get_gguf_container_array_size(path, u64::MAX)` does (which
/// reads the magic, then hands the rest of the file to a `GGUFContainer`), catching panics.
fn rs_decode(bytes: &[u8]) -> Rs {
    let bytes = bytes.to_vec();
    let run = AssertUnwindSafe(move || -> Result<GGUFModel, String> {
        if bytes.len() >= 4 && bytes[..4] == GGUF_MAGIC {
            let rest = Cursor::new(bytes[4..].to_vec());
            let mut c = GGUFContainer::new(ByteOrder::LE, Box::new(rest), u64::MAX);
            c.decode().map_err(|e| e.to_string())
        } else {
            let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
            let path = dir.path().join("f.gguf");
            std::fs::write(&path, &bytes).map_err(|e| e.to_string())?;
            let path = path.to_str().ok_or("temp path is not UTF-8")?;
            let mut c = gguf_rs::get_gguf_container_array_size(path, u64::MAX)
                .map_err(|e| e.to_string())?;
            c.decode().map_err(|e| e.to_string())
        }
    });
    match catch_unwind(run) {
        Ok(Ok(m)) => Rs::Accepted(Box::new(m)),
        Ok(Err(e)) => Rs::Rejected(e),
        Err(p) => Rs::Panicked(panic_text(p)),
    }
}

/// Whether gguf-rs's JSON value holds the same data as ours.
fn same_value(ours: &MetaValue, theirs: &Value) -> bool {
    if let Some(n) = ours.as_i128() {
        let t = theirs
            .as_u64()
            .map(i128::from)
            .or_else(|| theirs.as_i64().map(i128::from));
        return t == Some(n);
    }
    match ours {
        // gguf-rs keeps an f32 as its shortest decimal form, so compare f32s as f32.
        MetaValue::F32(x) => theirs.as_f64().map(|t| t as f32) == Some(*x),
        MetaValue::F64(x) => theirs.as_f64() == Some(*x),
        MetaValue::Bool(b) => theirs.as_bool() == Some(*b),
        MetaValue::String(s) => theirs.as_str() == Some(s.as_str()),
        MetaValue::Array { items, .. } => theirs.as_array().is_some_and(|t| {
            t.len() == items.len() && items.iter().zip(t).all(|(o, t)| same_value(o, t))
        }),
        _ => false,
    }
}

/// Asserts both parsers agree on tensor names, dims, types, offsets, the data offset, the
/// alignment, metadata keys and values. Returns the tensors whose byte sizes differ.
fn assert_agree(ours: &GgufFile, theirs: &GGUFModel) -> Vec<String> {
    assert_eq!(theirs.num_tensor(), ours.tensor_count() as u64);
    assert_eq!(theirs.tensors().len(), ours.tensor_count());
    let mut size_differs = Vec::new();
    for (o, t) in ours.tensors().zip(theirs.tensors()) {
        assert_eq!(t.name, o.name());
        assert_eq!(t.shape, o.dims(), "{}", o.name());
        assert_eq!(t.kind, o.ggml_type().id(), "{}", o.name());
        assert_eq!(t.offset, o.offset(), "{}", o.name());
        if t.size != o.size_bytes() {
            size_differs.push(o.name().to_string());
        }
    }
    assert_eq!(theirs.data_offset(), ours.data_offset());
    assert_eq!(theirs.alignment(), ours.alignment());
    assert_eq!(theirs.num_kv(), ours.metadata_len() as u64);
    let mut our_keys: Vec<&str> = ours.metadata().map(|(k, _)| k).collect();
    our_keys.sort_unstable();
    let their_keys: Vec<&str> = theirs.metadata().keys().map(|k| k.as_str()).collect();
    assert_eq!(our_keys, their_keys);
    for (key, value) in ours.metadata() {
        assert!(same_value(value, &theirs.metadata()[key]), "value of {key}");
    }
    size_differs
}

#[test]
fn gguf_rs_agrees_on_crafted_v2_and_v3_files_except_bf16_byte_size() {
    for version in [2, 3] {
        // Without the nested array, which gguf-rs cannot read (see below).
        let built = fixture(version, false);
        let ours = GgufFile::from_bytes(built.bytes.clone()).unwrap();
        let theirs = rs_decode(&built.bytes).accepted("crafted file");
        assert_eq!(theirs.get_version(), format!("v{version}"));
        assert_eq!(assert_agree(&ours, &theirs), ["t.bf16"]);
    }
}

#[test]
fn gguf_rs_agrees_on_the_real_model() {
    let Some(path) = model_path() else { return };
    let ours = GgufFile::open(&path).unwrap();
    let mut file = BufReader::new(std::fs::File::open(&path).unwrap());
    let mut magic = [0u8; 4];
    file.read_exact(&mut magic).unwrap();
    assert_eq!(magic, GGUF_MAGIC);
    let theirs = GGUFContainer::new(ByteOrder::LE, Box::new(file), u64::MAX)
        .decode()
        .unwrap();
    assert_eq!(assert_agree(&ours, &theirs), Vec::<String>::new());
    assert_eq!(theirs.model_family(), "llama");
}

#[test]
fn gguf_rs_rejects_valid_nested_arrays_so_depth_bombs_fail_early() {
    let err = rs_decode(&fixture(3, true).bytes).rejected("array of arrays");
    assert!(err.contains("Unsupport item value type: Array"), "{err}");
    let mut bomb = Vec::new();
    for _ in 0..100_000 {
        bomb.extend_from_slice(&9u32.to_le_bytes());
        bomb.extend_from_slice(&1u64.to_le_bytes());
    }
    let bytes = Builder::new(3).kv_raw(b"deep", 9, &bomb).build().bytes;
    rs_decode(&bytes).rejected("depth bomb");
}

#[test]
fn gguf_rs_accepts_alignment_0_48_and_12() {
    for (a, theirs) in [(0u32, 32u64), (48, 48), (12, 32)] {
        let b = Builder::new(3)
            .alignment(a)
            .tensor("w", &[8], GgmlType::F32);
        let m = rs_decode(&b.build().bytes).accepted("bad alignment");
        assert_eq!(m.alignment(), theirs, "general.alignment = {a}");
    }
}

#[test]
fn gguf_rs_accepts_tensor_data_past_the_end_and_misaligned_offsets() {
    for offset in [1 << 20, 4, u64::MAX - 31] {
        let b = Builder::new(3).tensor_raw(b"w", &[8], 0, 32, Some(offset));
        let m = rs_decode(&b.build().bytes).accepted("bad offset");
        assert_eq!(m.tensors()[0].offset, offset);
    }
}

#[test]
fn gguf_rs_accepts_cuts_in_the_data_section_and_rejects_header_cuts_without_panicking() {
    let built = fixture(3, false);
    for cut in 0..built.min_len {
        let rs = rs_decode(&built.bytes[..cut]);
        match (&rs, cut < built.infos_end) {
            (Rs::Rejected(_), true) | (Rs::Accepted(_), false) => {}
            _ => panic!(
                "cut at {cut} (infos end {}): gguf-rs {}",
                built.infos_end,
                rs.kind()
            ),
        }
    }
}

#[test]
fn gguf_rs_rejects_absurd_counts_and_lengths_quickly() {
    let quick = |bytes: Vec<u8>, what: &str| {
        let start = Instant::now();
        let err = rs_decode(&bytes).rejected(what);
        assert!(
            start.elapsed() < Duration::from_secs(1),
            "{what}: {:?}",
            start.elapsed()
        );
        err
    };
    let mut b = Builder::new(3).kv("a", MetaValue::U32(1));
    b.n_tensors = Some(1 << 62);
    quick(b.build().bytes, "tensor count 2^62");
    let mut b = Builder::new(3).kv("a", MetaValue::U32(1));
    b.n_kv = Some(1 << 62);
    quick(b.build().bytes, "metadata count 2^62");
    let bytes = Builder::new(3)
        .kv_raw(b"k", 8, &(1u64 << 63).to_le_bytes())
        .build()
        .bytes;
    let err = quick(bytes, "string length 2^63");
    assert!(err.contains("exceeds maximum"), "{err}");
    for elem in [0u32, 8] {
        let mut payload = elem.to_le_bytes().to_vec();
        payload.extend_from_slice(&(1u64 << 60).to_le_bytes());
        let bytes = Builder::new(3).kv_raw(b"big", 9, &payload).build().bytes;
        quick(bytes, "array length 2^60");
    }
}

#[test]
fn gguf_rs_panics_on_nvfp4_and_rejects_q1_0_and_q2_0() {
    let b = Builder::new(3).tensor("w", &[64], GgmlType::NVFP4);
    assert!(matches!(rs_decode(&b.build().bytes), Rs::Panicked(_)));
    for t in [GgmlType::Q1_0, GgmlType::Q2_0] {
        let b = Builder::new(3).tensor("w", &[128], t);
        let err = rs_decode(&b.build().bytes).rejected(t.name());
        assert!(err.contains("invalid GGML type"), "{err}");
    }
}

#[test]
fn gguf_rs_accepts_removed_types_with_size_0_and_rejects_unknown_types_without_naming_them() {
    for id in [31, 32, 33, 36, 37, 38] {
        let b = Builder::new(3).tensor_raw(b"w", &[32], id, 32, None);
        let m = rs_decode(&b.build().bytes).accepted("removed type");
        assert_eq!(m.tensors()[0].size, 0, "type {id}");
    }
    for id in [4, 5, 99] {
        let b = Builder::new(3).tensor_raw(b"blk.7.w", &[32], id, 32, None);
        let err = rs_decode(&b.build().bytes).rejected("unknown type");
        assert!(!err.contains("blk.7.w"), "{err}");
    }
}

#[test]
fn gguf_rs_byte_sizes_are_wrong_for_bf16_ints_f64_iq4_nl_q8_1_and_mxfp4() {
    use GgmlType::*;
    let wrong = [BF16, I8, I16, I32, I64, F64, IQ4_NL, Q8_1, MXFP4];
    let right = [
        F32, F16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q2_K, Q3_K, Q4_K, Q5_K, Q6_K, Q8_K,
    ];
    let right_iq = [
        IQ2_XXS, IQ2_XS, IQ3_XXS, IQ1_S, IQ3_S, IQ2_S, IQ4_XS, IQ1_M, TQ1_0, TQ2_0,
    ];
    let mut b = Builder::new(3);
    for t in wrong.iter().chain(&right).chain(&right_iq) {
        b = b.tensor(t.name(), &[256, 2], *t);
    }
    let built = b.build();
    let ours = GgufFile::from_bytes(built.bytes.clone()).unwrap();
    let theirs = rs_decode(&built.bytes).accepted("every type");
    let differ = assert_agree(&ours, &theirs);
    let wrong_names: Vec<&str> = wrong.iter().map(|t| t.name()).collect();
    assert_eq!(differ, wrong_names);
}

#[test]
fn gguf_rs_accepts_partial_blocks_and_zero_dims_but_rejects_overflowing_dims() {
    let b = Builder::new(3).tensor_raw(b"w", &[48, 2], GgmlType::Q4_K.id(), 64, None);
    let m = rs_decode(&b.build().bytes).accepted("partial block");
    assert_eq!(m.tensors()[0].size, 96 * 144 / 256);
    let b = Builder::new(3).tensor_raw(b"w", &[], 0, 32, None);
    let m = rs_decode(&b.build().bytes).accepted("0 dims");
    assert_eq!(m.tensors()[0].n_dimensions, 0);
    let b = Builder::new(3).tensor_raw(b"w", &[1 << 32, 1 << 32, 2], 0, 32, None);
    rs_decode(&b.build().bytes).rejected("dims overflow");
}

#[test]
fn gguf_rs_accepts_duplicates_and_replaces_invalid_utf8() {
    let b = Builder::new(3)
        .tensor("w", &[8], GgmlType::F32)
        .tensor("w", &[8], GgmlType::F32);
    let m = rs_decode(&b.build().bytes).accepted("duplicate tensors");
    assert_eq!(m.tensors().len(), 2);
    let b = Builder::new(3)
        .kv("k", MetaValue::U8(1))
        .kv("k", MetaValue::U8(2));
    let m = rs_decode(&b.build().bytes).accepted("duplicate keys");
    assert_eq!(m.metadata().len(), 1);
    assert_eq!(m.metadata()["k"].as_u64(), Some(2));
    let b = Builder::new(3).kv_raw(b"bad\xffkey", 4, &1u32.to_le_bytes());
    let m = rs_decode(&b.build().bytes).accepted("invalid UTF-8 key");
    assert!(m.metadata().contains_key("bad\u{fffd}key"));
}

#[test]
fn gguf_rs_accepts_v1_and_does_not_recognise_big_endian_files() {
    let m = rs_decode(&Builder::new(1).build().bytes).accepted("version 1");
    assert_eq!(m.get_version(), "v1");
    let mut bytes = GGUF_MAGIC.to_vec();
    bytes.extend_from_slice(&3u32.to_be_bytes());
    bytes.extend_from_slice(&[0; 16]);
    let err = rs_decode(&bytes).rejected("big-endian");
    assert!(
        err.contains("invalid version 50331648") && !err.contains("endian"),
        "{err}"
    );
}

#[test]
fn gguf_rs_file_type_panics_when_general_file_type_is_a_string() {
    let b = Builder::new(3).kv("general.file_type", MetaValue::String("Q4_1".into()));
    let m = rs_decode(&b.build().bytes).accepted("string file type");
    assert!(catch_unwind(AssertUnwindSafe(|| m.file_type())).is_err());
}
