//! llama.cpp's encodings of fixed inputs, for the byte-exactness tests (made by
//! `quant/tests/data/codec/make_codec_fixtures.c`; see the README there).

use std::path::PathBuf;

/// Elements per fixture row, and rows.
pub const N_PER_ROW: usize = 512;
pub const N_ROWS: usize = 10;
/// Rows of `decoded` (llama.cpp's dequantisation of the reference encoding).
pub const N_DECODED_ROWS: usize = 2;

fn read(name: &str) -> Vec<u8> {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/data/codec")
        .join(name);
    std::fs::read(&path).unwrap_or_else(|e| panic!("fixture {}: {e}", path.display()))
}

fn floats(bytes: Vec<u8>) -> Vec<f32> {
    bytes
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect()
}

/// The input rows, `N_ROWS * N_PER_ROW` values.
pub fn input() -> Vec<f32> {
    floats(read("input.f32"))
}

/// The importance weights used for every row of the `imatrix` encodings.
pub fn importance() -> Vec<f32> {
    floats(read("importance.f32"))
}

/// llama.cpp's encoding of [`input`] as `ggml_name` (e.g. "q4_K"): without an importance
/// matrix (`weighted == false`, its reference quantizer) or with [`importance`].
pub fn encoded(ggml_name: &str, weighted: bool) -> Vec<u8> {
    read(&format!(
        "{ggml_name}.{}.bin",
        if weighted { "imatrix" } else { "ref" }
    ))
}

/// llama.cpp's dequantisation of the first `N_DECODED_ROWS` rows of the reference encoding.
pub fn decoded(ggml_name: &str) -> Vec<f32> {
    floats(read(&format!("{ggml_name}.decoded.f32")))
}
