//! `tessera bench`: its JSON, CSV and markdown carry llama-bench's fields with values that
//! agree with each other and with the model's shape; `--memcpy` measures a bandwidth; bad
//! input is a clear error, never a panic. Tests are small (pp8, tg4) to stay fast on lavapipe.

mod common;

use std::process::{Command, Output};

use common::{assert_clean_failure, stderr, tessera};
use serde_json::Value;

fn stdout(out: &Output) -> String {
    assert!(out.status.success(), "{}", stderr(out));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// llama-bench's fields Tessera fills, then Tessera's own.
const FIELDS: &[&str] = &[
    "build_commit",
    "cpu_info",
    "gpu_info",
    "backends",
    "model_filename",
    "model_type",
    "model_size",
    "model_n_params",
    "n_batch",
    "n_ubatch",
    "n_prompt",
    "n_gen",
    "test_time",
    "avg_ns",
    "stddev_ns",
    "avg_ts",
    "stddev_ts",
    "backend",
    "device",
    "driver",
    "weight_bytes_per_token",
    "eff_bw_gbs",
    "copy_bw_gbs",
    "bw_share",
    "weight_textures",
    "pinned_threads",
    "matvec_unroll",
];

fn number(row: &Value, field: &str) -> f64 {
    row[field]
        .as_f64()
        .unwrap_or_else(|| panic!("{field} is not a number: {row}"))
}

/// Checks one JSON record: every field present, the timings consistent with each other, and
/// the bandwidth columns consistent with the timings.
fn check_record(row: &Value, n_prompt: u64, n_gen: u64, repetitions: usize) {
    for field in FIELDS {
        assert!(row.get(field).is_some(), "{field} missing: {row}");
    }
    assert_eq!(row["n_prompt"], n_prompt);
    assert_eq!(row["n_gen"], n_gen);
    let samples_ns = row["samples_ns"].as_array().expect("samples_ns");
    let samples_ts = row["samples_ts"].as_array().expect("samples_ts");
    assert_eq!(samples_ns.len(), repetitions);
    assert_eq!(samples_ts.len(), repetitions);
    let tokens = (n_prompt + n_gen) as f64;
    for (ns, ts) in samples_ns.iter().zip(samples_ts) {
        let (ns, ts) = (ns.as_f64().unwrap(), ts.as_f64().unwrap());
        assert!(
            ns > 0.0 && (ts - tokens * 1e9 / ns).abs() <= 1e-6 * ts,
            "{row}"
        );
    }
    let avg_ts = number(row, "avg_ts");
    let mean = samples_ts.iter().map(|v| v.as_f64().unwrap()).sum::<f64>() / repetitions as f64;
    assert!(
        avg_ts > 0.0 && (avg_ts - mean).abs() <= 1e-6 * mean,
        "{row}"
    );
    let eff = number(row, "eff_bw_gbs");
    let want = number(row, "weight_bytes_per_token") * avg_ts / 1e9;
    assert!(eff > 0.0 && (eff - want).abs() <= 1e-6 * want, "{row}");
    let share = number(row, "bw_share");
    assert!(share > 0.0 && share < 10.0, "{row}");
    let copy = number(row, "copy_bw_gbs");
    assert!((share - eff / copy).abs() <= 1e-6 * share, "{row}");
    assert!(row["test_time"].as_str().unwrap().ends_with('Z'), "{row}");
    assert!(row["weight_textures"].is_boolean(), "{row}");
    assert!(row["pinned_threads"].is_u64(), "{row}");
    // The decode mat-vec's unrolled length: its default where the test's environment leaves it.
    if std::env::var_os("TESSERA_MATVEC_UNROLL").is_none() {
        assert_eq!(row["matvec_unroll"], 32, "{row}");
    }
}

#[test]
fn json_has_llama_bench_fields_and_the_synthetic_model_has_smollm2_shapes() {
    let args = [
        "bench",
        "--synthetic",
        "smollm2-135m",
        "-p",
        "8",
        "-n",
        "4",
        "-r",
        "2",
        "--json",
    ];
    let rows: Value = serde_json::from_str(&stdout(&tessera(&args))).expect("JSON on stdout");
    let rows = rows.as_array().expect("an array of tests");
    assert_eq!(rows.len(), 2, "pp8 and tg4");
    check_record(&rows[0], 8, 0, 2);
    check_record(&rows[1], 0, 4, 2);
    // SmolLM2-135M's published parameter count; Q4_0 matrices (18 bytes per 32 weights), F32
    // norms; a decode step reads every matrix once, the tied output included.
    let norms = 30 * 2 * 576 + 576;
    let matrices = 134_515_008 - norms;
    for row in rows {
        assert_eq!(row["model_n_params"], 134_515_008);
        assert_eq!(row["model_size"], matrices / 32 * 18 + 4 * norms);
        assert_eq!(row["weight_bytes_per_token"], matrices / 32 * 18);
        assert_eq!(row["model_type"], "llama 135M Q4_0");
        assert_eq!(row["model_filename"], "synthetic:smollm2-135m");
    }
}

#[test]
fn csv_has_a_header_of_field_names_and_a_line_per_test() {
    let args = [
        "bench",
        "--synthetic",
        "smollm2-135m",
        "--type",
        "q8_0",
        "-p",
        "4,8",
        "-p",
        "6",
        "-n",
        "0",
        "-r",
        "1",
        "--csv",
    ];
    // With the settings a run records turned off: no pinned threads, nothing unrolled.
    let out = Command::new(env!("CARGO_BIN_EXE_tessera"))
        .args(args)
        .env("TESSERA_PIN_THREADS", "0")
        .env("TESSERA_MATVEC_UNROLL", "0")
        .output()
        .expect("tessera runs");
    let text = stdout(&out);
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 4, "a header and pp4, pp8, pp6: {text}");
    let header: Vec<&str> = lines[0].split(',').collect();
    for field in FIELDS {
        assert!(header.contains(field), "{field} not in {header:?}");
    }
    let column = |name: &str| header.iter().position(|h| *h == name).unwrap();
    for (line, n_prompt) in lines[1..].iter().zip(["4", "8", "6"]) {
        let cells: Vec<&str> = line.split("\",\"").map(|c| c.trim_matches('"')).collect();
        assert_eq!(cells.len(), header.len(), "{line}");
        assert_eq!(cells[column("n_prompt")], n_prompt);
        assert_eq!(cells[column("n_gen")], "0");
        assert!(cells[column("model_type")].ends_with("Q8_0"), "{line}");
        assert_eq!(cells[column("pinned_threads")], "0", "{line}");
        assert_eq!(cells[column("matvec_unroll")], "0", "{line}");
    }
}

#[test]
fn markdown_is_a_table_with_a_row_per_test() {
    let args = [
        "bench",
        "--synthetic",
        "smollm2-135m",
        "-p",
        "0",
        "-n",
        "2",
        "-r",
        "1",
    ];
    let text = stdout(&tessera(&args));
    let lines: Vec<&str> = text.lines().collect();
    let header: Vec<&str> = lines[0].split('|').map(str::trim).collect();
    for column in [
        "model", "size", "params", "backend", "device", "driver", "test", "t/s",
    ] {
        assert!(header.contains(&column), "{column} not in {}", lines[0]);
    }
    assert!(
        lines[1].starts_with("| ---") && lines[1].contains(": |"),
        "{text}"
    );
    assert!(
        lines[2].contains("tg2") && lines[2].contains(" ± "),
        "{text}"
    );
    let rows = lines.iter().filter(|l| l.starts_with('|')).count();
    assert_eq!(
        rows, 3,
        "a header, its rule and tg2 (-p 0 runs no prompt test): {text}"
    );
}

#[test]
fn memcpy_prints_a_positive_bandwidth() {
    let text = stdout(&tessera(&["bench", "--memcpy"]));
    let lines: Vec<&str> = text.lines().collect();
    let header: Vec<&str> = lines[0].split('|').map(str::trim).collect();
    let best = header
        .iter()
        .position(|h| *h == "best GB/s")
        .expect(lines[0]);
    let cells: Vec<&str> = lines[2].split('|').map(str::trim).collect();
    let gbs: f64 = cells[best].parse().expect(lines[2]);
    assert!(gbs > 0.0 && gbs.is_finite(), "{text}");
}

#[test]
fn bad_input_is_a_clear_error() {
    let out = tessera(&["bench", "--synthetic", "nope"]);
    assert_clean_failure(
        &out,
        &["nope", "smollm2-135m, llama-1b, llama-3b, llama-8b"],
    );
    let out = tessera(&["bench", "--synthetic", "llama-1b", "-r", "0"]);
    assert_clean_failure(&out, &["--repetitions", "0"]);
    let out = tessera(&["bench", "-m", "x.gguf", "--synthetic", "llama-1b"]);
    assert_clean_failure(&out, &["--synthetic", "cannot be used with"]);
    let out = tessera(&["bench", "--synthetic", "llama-1b", "-p", "0", "-n", "0"]);
    assert_clean_failure(&out, &["nothing to run"]);
    let out = tessera(&["bench", "--synthetic", "llama-1b", "--type", "Q9_9"]);
    assert_clean_failure(&out, &["Q9_9", "IQ4_NL"]);
    let out = tessera(&[
        "bench",
        "--synthetic",
        "smollm2-135m",
        "-p",
        "8193",
        "-n",
        "1",
    ]);
    assert_clean_failure(&out, &["8193", "8192"]);
    let out = tessera(&["bench", "-m", "/nonexistent/model.gguf"]);
    assert_clean_failure(&out, &["/nonexistent/model.gguf"]);
    let out = tessera(&["bench", "-m", "/nonexistent/model.gguf", "--type", "Q4_0"]);
    assert_clean_failure(&out, &["--type"]);
    // A file that is no model fails before any device is measured, and JSON output then prints
    // nothing that could pass for a result.
    let dir = tempfile::tempdir().unwrap();
    let text = dir.path().join("notes.gguf");
    std::fs::write(&text, "not a model").unwrap();
    let out = tessera(&["bench", "-m", text.to_str().unwrap(), "-o", "json"]);
    assert_clean_failure(&out, &["notes.gguf", "not a GGUF file"]);
    assert!(
        out.stdout.is_empty(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    assert!(!stderr(&out).contains("copy"), "{}", stderr(&out));
    // --memcpy measures nothing else, so a model or test length beside it is a mistake.
    for extra in [
        &["-p", "0"][..],
        &["--synthetic", "llama-1b"],
        &["-m", "x.gguf"],
    ] {
        let out = tessera(&[&["bench", "--memcpy"][..], extra].concat());
        assert_clean_failure(&out, &["--memcpy", "cannot be used with"]);
    }
}

#[test]
fn a_model_file_is_benchmarked_with_its_own_sizes() {
    let model = common::model_path();
    let path = model.to_str().expect("a UTF-8 path");
    let args = [
        "bench", "-m", path, "-p", "8", "-n", "2", "-r", "1", "-o", "jsonl",
    ];
    let text = stdout(&tessera(&args));
    let rows: Vec<Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).expect("a JSON object a line"))
        .collect();
    assert_eq!(rows.len(), 2, "{text}");
    let file_bytes = std::fs::metadata(&model).unwrap().len() as f64;
    for row in &rows {
        assert_eq!(row["model_filename"], path);
        assert_eq!(row["model_n_params"], 134_515_008);
        // The tensors are most of the file; the rest is the vocabulary and metadata.
        let size = number(row, "model_size");
        assert!(
            size < file_bytes && size > 0.9 * file_bytes,
            "{size} of {file_bytes}"
        );
    }
    check_record(&rows[1], 0, 2, 1);
}
