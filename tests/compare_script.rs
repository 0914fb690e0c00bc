//! `tools/scripts/compare_llamacpp_bench.sh` refuses bad settings before any benchmark runs,
//! names a llama-bench whose output is not llama-bench's JSON, and leaves no result file for a
//! program that failed. Stand-in programs (shell scripts) replace `tessera` and llama-bench, so
//! these tests need neither a device nor a llama.cpp build.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

const SCRIPT: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/tools/scripts/compare_llamacpp_bench.sh"
);

/// One llama-bench record of a decode test.
const RECORD: &str = r#"[{"n_prompt": 0, "n_gen": 4, "avg_ts": 10.0, "stddev_ts": 0.5}]"#;

/// An executable shell script `name` in `dir` with `body`.
fn program(dir: &Path, name: &str, body: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, format!("#!/bin/sh\n{body}\n")).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
    path
}

/// The script on a model file that need not be a model (the programs are stand-ins), with the
/// results in `dir/out`.
fn compare(dir: &Path, env: &[(&str, &Path)], rounds: &str) -> Output {
    let mut cmd = Command::new("bash");
    cmd.arg(SCRIPT)
        .arg(dir.join("model.gguf"))
        .env("OUT", dir.join("out"))
        .env("ROUNDS", rounds)
        .env("P", "0")
        .env("N", "4")
        .env_remove("LLAMA_BENCH_CPU")
        .env_remove("LLAMA_BENCH_VK");
    for (name, value) in env {
        cmd.env(name, value);
    }
    cmd.output().unwrap()
}

/// A stand-in `tessera` in `dir` that leaves a file `ran` behind when it runs, and that file.
fn marking_tessera(dir: &Path) -> (PathBuf, PathBuf) {
    let ran = dir.join("ran");
    let body = format!("touch {}; echo '[]'", ran.display());
    (program(dir, "tessera", &body), ran)
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn rounds_outside_1_to_999_are_refused_before_anything_runs() {
    let dir = tempfile::tempdir().unwrap();
    let (tessera, ran) = marking_tessera(dir.path());
    for rounds in ["abc", "0", "1.5", "1000", "99999999999999999999"] {
        let out = compare(dir.path(), &[("TESSERA", &tessera)], rounds);
        assert!(!out.status.success(), "ROUNDS={rounds} accepted");
        let err = stderr(&out);
        assert!(err.contains(&format!("ROUNDS={rounds}")), "{rounds}: {err}");
        assert!(err.contains("1 to 999"), "{rounds}: {err}");
        assert!(!ran.exists(), "ROUNDS={rounds}: tessera ran");
    }
}

#[test]
fn a_llama_bench_that_is_not_a_program_is_named_before_tessera_runs() {
    let dir = tempfile::tempdir().unwrap();
    let (tessera, ran) = marking_tessera(dir.path());
    let missing = dir.path().join("no-such-llama-bench");
    for (var, path) in [
        ("LLAMA_BENCH_CPU", &missing),
        ("LLAMA_BENCH_VK", &dir.path().into()),
    ] {
        let out = compare(dir.path(), &[("TESSERA", &tessera), (var, path)], "1");
        assert!(!out.status.success(), "{var}={}", path.display());
        let err = stderr(&out);
        assert!(
            err.contains(var) && err.contains("not an executable file"),
            "{err}"
        );
        assert!(!ran.exists(), "tessera ran before {var} was checked");
    }
}

#[test]
fn output_that_is_not_llama_bench_json_is_named_without_a_traceback() {
    let dir = tempfile::tempdir().unwrap();
    let tessera = program(dir.path(), "tessera", &format!("echo '{RECORD}'"));
    for (body, why) in [
        ("echo 'no json here'", "Expecting value"),
        (r#"echo '[{"n_prompt": 2}]'"#, "without n_gen"),
        ("echo '{}'", "not a list"),
    ] {
        let llama = program(dir.path(), "llama-bench", body);
        let env = [("TESSERA", tessera.as_path()), ("LLAMA_BENCH_CPU", &llama)];
        let out = compare(dir.path(), &env, "1");
        assert!(!out.status.success(), "{body}: accepted");
        let err = stderr(&out);
        assert!(
            err.contains("llama-cpu.json is not llama-bench's JSON"),
            "{err}"
        );
        assert!(err.contains(why), "{body}: {err}");
        assert!(!err.contains("Traceback"), "{err}");
    }
    // Good records from both give the table and the ratio.
    let llama = program(dir.path(), "llama-bench", &format!("echo '{RECORD}'"));
    let env = [("TESSERA", tessera.as_path()), ("LLAMA_BENCH_CPU", &llama)];
    let out = compare(dir.path(), &env, "1");
    assert!(out.status.success(), "{}", stderr(&out));
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(
        table.contains("tg4: Tessera ? / llama.cpp CPU = 1.00x"),
        "{table}"
    );
}

#[test]
fn a_program_that_fails_leaves_no_result_file() {
    let dir = tempfile::tempdir().unwrap();
    let tessera = program(dir.path(), "tessera", "echo '[]'; exit 1");
    let out = compare(dir.path(), &[("TESSERA", &tessera)], "1");
    assert!(!out.status.success());
    assert!(!dir.path().join("out/tessera.json").exists());

    let tessera = program(dir.path(), "tessera", &format!("echo '{RECORD}'"));
    // (The Vulkan build is told to see lavapipe: llama.cpp skips CPU devices otherwise.)
    let body = "echo '[]'; echo broken vk=$GGML_VK_VISIBLE_DEVICES >&2; exit 3";
    let llama = program(dir.path(), "llama-bench", body);
    let env = [("TESSERA", tessera.as_path()), ("LLAMA_BENCH_VK", &llama)];
    let out = compare(dir.path(), &env, "1");
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(
        err.contains("failed (its log:") && err.contains("broken vk=0"),
        "{err}"
    );
    assert!(dir.path().join("out/tessera.json").exists());
    assert!(!dir.path().join("out/llama-vulkan.json").exists());
}
