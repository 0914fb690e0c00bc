//! The `tessera` command line on bad input: each failure names the problem and the way out,
//! and nothing panics.

mod common;

use std::process::Command;

use common::{assert_clean_failure, stderr, tessera};

/// A minimal GGUF v3 file with string metadata and no tensors.
fn gguf_with_metadata(pairs: &[(&str, &str)]) -> Vec<u8> {
    let mut b = b"GGUF".to_vec();
    b.extend_from_slice(&3u32.to_le_bytes());
    b.extend_from_slice(&0u64.to_le_bytes());
    b.extend_from_slice(&(pairs.len() as u64).to_le_bytes());
    for (k, v) in pairs {
        b.extend_from_slice(&(k.len() as u64).to_le_bytes());
        b.extend_from_slice(k.as_bytes());
        b.extend_from_slice(&8u32.to_le_bytes());
        b.extend_from_slice(&(v.len() as u64).to_le_bytes());
        b.extend_from_slice(v.as_bytes());
    }
    b
}

#[test]
fn devices_lists_at_least_one_adapter_with_its_limits() {
    let out = tessera(&["devices"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("backend")
            && text.contains("max storage binding")
            && text.contains("uniform binding"),
        "{text}"
    );
    // A subgroup size is shown only for adapters that have subgroups.
    for line in text.lines().filter(|l| l.contains("subgroups no")) {
        assert!(!line.contains("size"), "{line}");
    }
}

#[test]
fn a_missing_model_file_is_named() {
    let out = tessera(&["generate", "-m", "/nonexistent/model.gguf", "-p", "hi"]);
    assert_clean_failure(&out, &["/nonexistent/model.gguf"]);
}

#[test]
fn a_truncated_model_says_to_download_again() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("cut.gguf");
    let bytes = std::fs::read(common::model_path()).unwrap();
    std::fs::write(&path, &bytes[..1_000_000]).unwrap();
    let out = tessera(&["generate", "-m", path.to_str().unwrap(), "-p", "hi"]);
    assert_clean_failure(&out, &["again"]);
}

#[test]
fn a_file_that_is_not_gguf_is_rejected() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("x.gguf");
    std::fs::write(&path, b"PK\x03\x04 this is a zip, not a model").unwrap();
    let out = tessera(&["generate", "-m", path.to_str().unwrap(), "-p", "hi"]);
    assert_clean_failure(&out, &["gguf"]);
}

#[test]
fn an_unknown_architecture_lists_the_supported_ones() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("mamba.gguf");
    std::fs::write(
        &path,
        gguf_with_metadata(&[("general.architecture", "mamba9")]),
    )
    .unwrap();
    let out = tessera(&["generate", "-m", path.to_str().unwrap(), "-p", "hi"]);
    assert_clean_failure(&out, &["mamba9", "llama"]);
}

#[test]
fn a_prompt_longer_than_the_context_says_how_to_fit_it() {
    let model = common::model_path();
    let prompt = "word ".repeat(100);
    let out = tessera(&[
        "generate",
        "-m",
        model.to_str().unwrap(),
        "-c",
        "32",
        "-p",
        &prompt,
    ]);
    assert_clean_failure(&out, &["context", "--ctx-size"]);
}

#[test]
fn no_vulkan_driver_says_how_to_install_one() {
    let model = common::model_path();
    let out = Command::new(env!("CARGO_BIN_EXE_tessera"))
        .args(["generate", "-m", model.to_str().unwrap(), "-p", "hi"])
        .env("WGPU_BACKEND", "vulkan")
        .env("VK_DRIVER_FILES", "/nonexistent/icd.json")
        .env("VK_ICD_FILENAMES", "/nonexistent/icd.json")
        .output()
        .unwrap();
    assert_clean_failure(&out, &["mesa-vulkan-drivers"]);
}

#[test]
fn an_unknown_device_lists_the_adapters_found() {
    let model = common::model_path();
    let out = tessera(&[
        "generate",
        "-m",
        model.to_str().unwrap(),
        "-p",
        "hi",
        "--device",
        "nosuchgpu",
    ]);
    assert_clean_failure(&out, &["nosuchgpu", "adapters found"]);
}

#[test]
fn tokenize_prints_ids_as_a_list() {
    let model = common::model_path();
    let out = tessera(&[
        "tokenize",
        "-m",
        model.to_str().unwrap(),
        "-p",
        "Hello world",
        "--ids",
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "[19556, 905]");
}

#[test]
fn greedy_generation_streams_only_the_completion_to_stdout() {
    let model = common::model_path();
    let out = tessera(&[
        "generate",
        "-m",
        model.to_str().unwrap(),
        "-p",
        "The capital of France is",
        "-n",
        "4",
        "--temp",
        "0",
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.starts_with(" Paris"), "{text:?}");
    assert!(!text.contains("capital"), "the prompt was echoed: {text:?}");
    assert!(stderr(&out).contains("tokens/s"));
}

fn model_arg() -> String {
    common::model_path()
        .to_str()
        .expect("a UTF-8 path")
        .to_string()
}

#[test]
fn the_same_seed_gives_the_same_text() {
    let model = model_arg();
    let run = |seed: &str| {
        let out = tessera(&[
            "generate",
            "-m",
            &model,
            "-p",
            "Once upon a time",
            "-n",
            "12",
            "--temp",
            "1.0",
            "--seed",
            seed,
        ]);
        assert!(out.status.success(), "{}", stderr(&out));
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let (a, b) = (run("7"), run("7"));
    assert_eq!(a, b, "seed 7 twice gave different text");
    assert!(!a.trim().is_empty());
}

#[test]
fn chat_wraps_the_prompt_in_the_template_and_prints_only_the_answer() {
    let out = tessera(&[
        "generate",
        "-m",
        &model_arg(),
        "--chat",
        "-p",
        "What is 2+2?",
        "-n",
        "12",
        "--temp",
        "0",
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        !text.contains("<|im_start|>") && !text.contains("What is 2+2"),
        "{text:?}"
    );
    assert!(text.contains('4'), "{text:?}");
}

#[test]
fn perplexity_json_reports_windows_and_the_final_estimate() {
    let text = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/data/tinyshakespeare-head.txt"
    );
    let out = tessera(&[
        "perplexity",
        "-m",
        &model_arg(),
        "-f",
        text,
        "-c",
        "64",
        "--max-tokens",
        "128",
        "--json",
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON on stdout");
    assert_eq!(v["chunks"], 2);
    assert_eq!(v["scored"], 2 * 31);
    let ppl = v["perplexity"].as_f64().unwrap();
    assert!(ppl > 1.0 && ppl < 1000.0, "{ppl}");
}

#[test]
fn tokenize_shows_each_piece_with_special_tokens_parsed() {
    let out = tessera(&["tokenize", "-m", &model_arg(), "-p", "<|im_start|>user"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.lines()
            .next()
            .unwrap_or("")
            .contains("1 -> '<|im_start|>'"),
        "{text}"
    );
}

#[test]
fn a_closed_pipe_or_a_full_disk_on_stdout_is_not_a_panic() {
    let mut child = Command::new(env!("CARGO_BIN_EXE_tessera"))
        .args([
            "tokenize",
            "-m",
            &model_arg(),
            "-p",
            &"hello world ".repeat(3000),
        ])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    drop(child.stdout.take()); // the reader goes away at once, as `| head -c 0` would
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "{}", stderr(&out));

    let full = std::fs::OpenOptions::new()
        .write(true)
        .open("/dev/full")
        .unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_tessera"))
        .args(["devices"])
        .stdout(full)
        .output()
        .unwrap();
    assert_clean_failure(&out, &["writing to stdout"]);
}

#[test]
fn inputs_that_are_not_text_files_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let out = tessera(&[
        "generate",
        "-m",
        &model_arg(),
        "-f",
        dir.path().to_str().unwrap(),
    ]);
    assert_clean_failure(&out, &["not a regular file"]);
    let bad = dir.path().join("latin1.txt");
    std::fs::write(&bad, b"caf\xe9").unwrap();
    let out = tessera(&["generate", "-m", &model_arg(), "-f", bad.to_str().unwrap()]);
    assert_clean_failure(&out, &["not UTF-8", "offset 3"]);
}

#[test]
fn meaningless_settings_name_the_flag() {
    let model = model_arg();
    let out = tessera(&["generate", "-m", &model, "-p", "hi", "--top-p", "2"]);
    assert_clean_failure(&out, &["--top-p"]);
    let out = tessera(&["generate", "-m", &model, "-p", "hi", "-n", "-5"]);
    assert_clean_failure(&out, &["-5"]);
    let out = tessera(&["generate", "-m", &model, "-p", ""]);
    assert_clean_failure(&out, &["prompt is empty", "-p"]);
    let text = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/data/tinyshakespeare-head.txt"
    );
    let out = tessera(&["perplexity", "-m", &model, "-f", text, "-c", "2"]);
    assert_clean_failure(&out, &["--ctx-size 4"]);
}

#[test]
fn a_device_name_that_matches_several_adapters_asks_for_an_index() {
    // Count the adapters sharing the first one's name; the check applies where names repeat.
    let listing = tessera(&["devices"]);
    let text = String::from_utf8_lossy(&listing.stdout).into_owned();
    let names: Vec<&str> = text
        .lines()
        .filter(|l| !l.starts_with(' '))
        .filter_map(|l| {
            l.split_once(": ")
                .map(|(_, n)| n.trim_end_matches("  (the default choice)"))
        })
        .collect();
    let first = names.first().expect("an adapter").to_string();
    let out = tessera(&[
        "generate",
        "-m",
        &model_arg(),
        "-p",
        "hi",
        "-n",
        "1",
        "--device",
        &first,
    ]);
    if names.iter().filter(|n| **n == first).count() > 1 {
        assert_clean_failure(&out, &["more than one adapter", "index"]);
    } else {
        assert!(out.status.success(), "{}", stderr(&out));
    }
}
