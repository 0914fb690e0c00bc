//! Shared by the integration tests: the real model, opened once per test binary.

#![allow(dead_code)]

pub mod reference;

use std::path::PathBuf;
use std::process::{Command, Output};
use std::sync::{Arc, OnceLock};

use tessera::models::llm::LoadedModel;
use tessera::runtime::{Gpu, GpuOptions};

/// The default model: `$TESSERA_MODEL`, or the cached download (fetched if missing).
pub fn model_path() -> PathBuf {
    static PATH: OnceLock<PathBuf> = OnceLock::new();
    PATH.get_or_init(|| {
        if let Some(path) = std::env::var_os("TESSERA_MODEL") {
            return PathBuf::from(path);
        }
        tessera::models::fetch::ensure_default_model(&mut |_| {}).expect(
            "the model tests need SmolLM2-135M-Instruct: run tools/test.sh, or set TESSERA_MODEL",
        )
    })
    .clone()
}

pub fn gpu() -> Arc<Gpu> {
    static GPU: OnceLock<Arc<Gpu>> = OnceLock::new();
    GPU.get_or_init(|| {
        Arc::new(Gpu::new(&GpuOptions::default()).expect("a GPU adapter (lavapipe)"))
    })
    .clone()
}

pub fn model() -> &'static LoadedModel {
    static MODEL: OnceLock<LoadedModel> = OnceLock::new();
    MODEL.get_or_init(|| LoadedModel::open(&model_path(), gpu()).expect("the model loads"))
}

/// Reads a fixture from `tests/data`.
pub fn fixture(name: &str) -> serde_json::Value {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/data")
        .join(name);
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).expect("fixture is JSON")
}

/// Runs the `tessera` binary with `args`.
pub fn tessera(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_tessera"))
        .args(args)
        .output()
        .expect("tessera runs")
}

pub fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Checks that a run failed without a panic and that its stderr names each of `needles`
/// (case-insensitively).
pub fn assert_clean_failure(out: &Output, needles: &[&str]) {
    let err = stderr(out);
    assert!(!out.status.success(), "expected failure, stderr: {err}");
    assert!(!err.contains("panicked"), "panicked: {err}");
    for needle in needles {
        assert!(
            err.to_lowercase().contains(&needle.to_lowercase()),
            "{needle:?} not in: {err}"
        );
    }
}
