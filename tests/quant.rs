//! `quant` on the real model: the preset mix against llama-quantize's, each method end to end
//! through the command line (small calibrations: CI runs on lavapipe), the evaluation, the
//! study, and bad input.

mod common;

use std::path::Path;
use std::process::{Command, Output};

use tessera::quant::mix::{self, Target, TensorShape};
use tessera::runtime::io::gguf::GgufFile;

fn quant(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_quant"))
        .args(args)
        .env("TESSERA_MODEL", common::model_path())
        .output()
        .expect("quant runs")
}

fn model_arg() -> String {
    common::model_path().display().to_string()
}

fn ok(out: &Output) -> String {
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "failed: {err}");
    assert!(!err.contains("panicked"), "{err}");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn fails_with(out: &Output, needles: &[&str]) {
    let err = String::from_utf8_lossy(&out.stderr).to_lowercase();
    assert!(!out.status.success(), "expected a failure: {err}");
    assert!(!err.contains("panicked"), "{err}");
    for n in needles {
        assert!(err.contains(&n.to_lowercase()), "{n:?} not in: {err}");
    }
}

#[test]
fn presets_give_llama_quantizes_types_and_sizes() {
    let fixture = common::fixture("quant_mix.json");
    let file = GgufFile::open(&common::model_path()).unwrap();
    let shapes: Vec<TensorShape> = file
        .tensors()
        .map(|t| TensorShape {
            name: t.name().to_string(),
            dims: t.dims().to_vec(),
        })
        .collect();
    let names: Vec<&str> = fixture["names"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n.as_str().unwrap())
        .collect();
    for (preset, want) in fixture["presets"].as_object().unwrap() {
        let target = Target::parse(preset).unwrap();
        let choices = mix::choose(&shapes, target, 30, 3, &[]);
        let mut bytes = 0u64;
        for (shape, choice) in shapes.iter().zip(&choices) {
            let i = names.iter().position(|n| *n == shape.name).unwrap();
            let theirs = want["types"][i].as_str().unwrap();
            let ours = choice.map_or("F32", |c| c.dtype.name());
            assert_eq!(ours, theirs, "{preset}: {}", shape.name);
            let dtype = choice.map_or(tessera::runtime::DType::F32, |c| c.dtype);
            let rows: u64 = shape.dims[1..].iter().product();
            bytes += rows * dtype.row_bytes(shape.dims[0] as usize).unwrap() as u64;
        }
        assert_eq!(bytes, want["tensor_bytes"].as_u64().unwrap(), "{preset}");
    }
}

fn json(out: &Output) -> serde_json::Value {
    serde_json::from_str(&ok(out)).expect("JSON on stdout")
}

fn meta_str(path: &Path, key: &str) -> Option<String> {
    let f = GgufFile::open(path).unwrap();
    f.get(key).and_then(|v| v.as_str()).map(str::to_string)
}

#[test]
fn each_method_writes_a_model_that_loads_and_stays_close_to_the_base() {
    let dir = tempfile::tempdir().unwrap();
    let fixture = common::fixture("quant_mix.json");
    for (method, qtype) in [("imatrix", "Q4_K_M"), ("gptq", "Q4_K_M"), ("awq", "Q4_0")] {
        let out = dir.path().join(format!("{method}.gguf"));
        let o = out.to_str().unwrap();
        let r = json(&quant(&[
            "calibrate",
            "-m",
            &model_arg(),
            "--method",
            method,
            "--type",
            qtype,
            "--samples",
            "2",
            "--seq-len",
            "128",
            "-c",
            "128",
            "--eval-chunks",
            "1",
            "-o",
            o,
            "--json",
        ]));
        let c = &r["calibration"];
        assert_eq!(c["method"], method);
        assert_eq!(c["source_was_quantized"], true);
        if qtype == "Q4_K_M" {
            // The same types as llama-quantize's Q4_K_M, so the same size.
            let want = fixture["presets"]["Q4_K_M"]["tensor_bytes"]
                .as_u64()
                .unwrap();
            assert_eq!(c["bytes_after"].as_u64().unwrap(), want, "{method}");
        }
        let e = &r["eval"];
        let kld = e["kld_mean"].as_f64().unwrap();
        assert!(kld > 0.0 && kld < 0.5, "{method}: KL {kld}");
        assert!(e["same_top"].as_f64().unwrap() > 0.6, "{method}: {e}");
        assert_eq!(meta_str(&out, "quantize.method").as_deref(), Some(method));
        assert_eq!(
            meta_str(&out, "general.architecture").as_deref(),
            Some("llama"),
            "metadata is kept"
        );
        let hash = meta_str(&out, "quantize.calibration.sha256").unwrap();
        assert_eq!(hash.len(), 64);
        // It loads in Tessera and generates.
        let loaded =
            tessera::models::llm::LoadedModel::open(&out, common::gpu()).expect("output loads");
        let mut s = tessera::models::llm::Session::new(&loaded.model, 64).unwrap();
        let ids = loaded.tokenizer.encode("The king said", true, false);
        assert!((s.eval_greedy(&ids).unwrap() as usize) < loaded.model.config.n_vocab);
    }
}

#[test]
fn rtn_needs_no_data_and_an_imatrix_file_round_trips() {
    let dir = tempfile::tempdir().unwrap();
    let q8 = dir.path().join("q8.gguf");
    let im = dir.path().join("im.gguf");
    let r = json(&quant(&[
        "calibrate",
        "-m",
        &model_arg(),
        "--method",
        "rtn",
        "--type",
        "Q8_0",
        "--no-eval",
        "-o",
        q8.to_str().unwrap(),
        "--json",
    ]));
    assert_eq!(r["tokens"], 0);
    assert!(r["eval"].is_null());
    assert_eq!(meta_str(&q8, "quantize.calibration.sha256"), None);
    // Gather once and write the importance matrix; then quantize from the file.
    let a = dir.path().join("a.gguf");
    ok(&quant(&[
        "calibrate",
        "-m",
        &model_arg(),
        "--samples",
        "1",
        "--seq-len",
        "64",
        "--no-eval",
        "--type",
        "Q4_0",
        "--imatrix-out",
        im.to_str().unwrap(),
        "-o",
        a.to_str().unwrap(),
    ]));
    let b = dir.path().join("b.gguf");
    ok(&quant(&[
        "calibrate",
        "-m",
        &model_arg(),
        "--imatrix",
        im.to_str().unwrap(),
        "--no-eval",
        "--type",
        "Q4_0",
        "-o",
        b.to_str().unwrap(),
    ]));
    assert!(meta_str(&b, "quantize.imatrix.file").is_some());
    // Both used the same importance (up to its f32 storage): nearly all blocks agree.
    let (fa, fb) = (GgufFile::open(&a).unwrap(), GgufFile::open(&b).unwrap());
    let t = "blk.3.ffn_down.weight";
    let (da, db) = (
        fa.tensor_data(fa.tensor(t).unwrap()),
        fb.tensor_data(fb.tensor(t).unwrap()),
    );
    let same = da
        .chunks(18)
        .zip(db.chunks(18))
        .filter(|(x, y)| x == y)
        .count();
    assert!(
        same * 100 >= 95 * da.len() / 18,
        "{same} of {}",
        da.len() / 18
    );
}

#[test]
fn eval_of_a_model_against_itself_is_zero() {
    let m = model_arg();
    let r = json(&quant(&[
        "eval", "-m", &m, "--base", &m, "-c", "128", "--chunks", "1", "--json",
    ]));
    assert_eq!(r["kld_mean"].as_f64().unwrap(), 0.0);
    assert_eq!(r["same_top"].as_f64().unwrap(), 1.0);
    assert_eq!(r["ppl_base"], r["ppl_quant"]);
    assert_eq!(r["scored"].as_u64().unwrap(), 63);
}

#[test]
fn stats_reports_every_set_with_plots() {
    let dir = tempfile::tempdir().unwrap();
    let out = ok(&quant(&[
        "stats",
        "-m",
        &model_arg(),
        "--data",
        "prose-en",
        "--data",
        "punct",
        "--samples",
        "1",
        "--seq-len",
        "64",
        "--out",
        dir.path().to_str().unwrap(),
    ]));
    assert!(
        out.contains("| prose-en |") && out.contains("| punct |"),
        "{out}"
    );
    let js: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.path().join("stats.json")).unwrap())
            .unwrap();
    let sets = js["sets"].as_array().unwrap();
    assert_eq!(sets.len(), 2);
    // 30 layers x 4 sites, each with 576 or 1536 channels.
    let sites = sets[0][2].as_array().unwrap();
    assert_eq!(sites.len(), 120);
    assert_eq!(sites[0]["channels_abs_max"].as_array().unwrap().len(), 576);
    for f in ["prose-en.svg", "punct.svg", "compare.svg"] {
        let svg = std::fs::read_to_string(dir.path().join(f)).unwrap();
        assert!(svg.starts_with("<svg") && svg.contains("layer"), "{f}");
    }
}

#[test]
fn bad_input_is_named_with_the_way_out() {
    let dir = tempfile::tempdir().unwrap();
    let m = model_arg();
    let o = dir.path().join("o.gguf");
    let o = o.to_str().unwrap();
    let empty = dir.path().join("empty.txt");
    std::fs::write(&empty, "\n\n").unwrap();
    fails_with(
        &quant(&[
            "calibrate",
            "-m",
            &m,
            "--data",
            empty.to_str().unwrap(),
            "-o",
            o,
        ]),
        &["no text"],
    );
    let short = dir.path().join("short.txt");
    std::fs::write(&short, "To be, or not to be.").unwrap();
    fails_with(
        &quant(&[
            "calibrate",
            "-m",
            &m,
            "--data",
            short.to_str().unwrap(),
            "-o",
            o,
        ]),
        &["too short", "--seq-len"],
    );
    fails_with(
        &quant(&["calibrate", "-m", &m, "--type", "Q7_K", "-o", o]),
        &["unknown type", "Q4_K_M"],
    );
    fails_with(
        &quant(&["calibrate", "-m", &m, "--method", "magic", "-o", o]),
        &["unknown method", "gptq"],
    );
    fails_with(
        &quant(&[
            "calibrate",
            "-m",
            &m,
            "--method",
            "rtn",
            "-o",
            "/nonexistent/dir/x.gguf",
        ]),
        &["does not exist"],
    );
    let file = dir.path().join("plain");
    std::fs::write(&file, "x").unwrap();
    let through_file = file.join("x.gguf");
    fails_with(
        &quant(&[
            "calibrate",
            "-m",
            &m,
            "--method",
            "rtn",
            "-o",
            through_file.to_str().unwrap(),
        ]),
        &["cannot write"],
    );
    fails_with(
        &quant(&["calibrate", "-m", &m, "--tensor-type", "ffn_down", "-o", o]),
        &["PATTERN=TYPE"],
    );
    fails_with(
        &quant(&[
            "calibrate",
            "-m",
            &m,
            "--method",
            "gptq",
            "--damp",
            "0",
            "-o",
            o,
        ]),
        &["--damp", "positive"],
    );
    fails_with(
        &quant(&[
            "calibrate",
            "-m",
            &m,
            "--eval-text",
            "/nonexistent.txt",
            "-o",
            o,
        ]),
        &["/nonexistent.txt"],
    );
    // The output may not be an input, nor a device or a pipe.
    let copy = dir.path().join("model.gguf");
    std::fs::copy(common::model_path(), &copy).unwrap();
    let before = std::fs::metadata(&copy).unwrap().len();
    let c = copy.to_str().unwrap();
    fails_with(
        &quant(&[
            "calibrate",
            "-m",
            c,
            "--method",
            "rtn",
            "--no-eval",
            "-o",
            c,
        ]),
        &["also an input"],
    );
    assert_eq!(std::fs::metadata(&copy).unwrap().len(), before);
    let fifo = dir.path().join("fifo");
    assert!(Command::new("mkfifo")
        .arg(&fifo)
        .status()
        .unwrap()
        .success());
    fails_with(
        &quant(&[
            "calibrate",
            "-m",
            &m,
            "--method",
            "rtn",
            "-o",
            fifo.to_str().unwrap(),
        ]),
        &["not a regular file"],
    );
    fails_with(
        &quant(&["eval", "-m", "/nonexistent.gguf", "--base", &m]),
        &["no such model file"],
    );
    // Nothing was left behind by the failures.
    let left: Vec<_> = std::fs::read_dir(dir.path()).unwrap().collect();
    assert_eq!(left.len(), 5, "{left:?}");
}
