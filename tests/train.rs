//! Training from scratch on the autograd tape: a two-layer model overfits one batch; gradients
//! accumulated over two half-batches equal the full batch's; the trained graph and the
//! inference graph (checkpoint -> GGUF -> `LlamaModel`) give the same logits; `tessera train
//! lm` writes checkpoints, a curve and samples, and a resumed run repeats the uninterrupted
//! run's losses bit for bit; bad input is a clear error. Runs are a few steps of tiny models.

mod common;

use std::path::Path;

use common::{assert_clean_failure, stderr, tessera};
use tessera::models::llm::{LoadedModel, Logits, Session};
use tessera::models::train::{self, Corpus, LmConfig, LmModel, TrainConfig, Trainer};
use tessera::runtime::autograd::Tape;
use tessera::runtime::{Gpu, GpuOptions};

/// One device shared by the tests, which run on parallel threads: their tapes and sessions
/// take buffers from one pool while others' recorded work is not yet submitted (a recorder
/// holds what its work names, so none is handed out early).
fn gpu() -> std::sync::Arc<Gpu> {
    static GPU: std::sync::OnceLock<std::sync::Arc<Gpu>> = std::sync::OnceLock::new();
    GPU.get_or_init(|| {
        std::sync::Arc::new(Gpu::new(&GpuOptions::default()).expect("a GPU adapter (lavapipe)"))
    })
    .clone()
}

fn tiny(ctx: usize) -> LmConfig {
    LmConfig::preset("tiny", ctx).unwrap()
}

fn text() -> Vec<u8> {
    tessera::quant::calib::HELDOUT_EN.as_bytes()[..20_000].to_vec()
}

#[test]
fn a_two_layer_model_overfits_one_batch() {
    let gpu = gpu();
    let config = TrainConfig {
        steps: 300,
        batch: 2,
        micro_batch: 2,
        lr: 1e-2,
        min_lr: 1e-2,
        warmup: 10,
        weight_decay: 0.0,
        eval_every: 0,
        ..TrainConfig::default()
    };
    let lm = tiny(24);
    assert_eq!(lm.n_layers, 2);
    let model = LmModel::init(&gpu, lm, 1).unwrap();
    let mut trainer = Trainer::new(&gpu, model, config).unwrap();
    // One batch: a corpus exactly one sequence long, so every step draws the same bytes.
    let corpus = Corpus {
        train: b"First Citizen:\nBefore we ".to_vec(),
        val: b"First Citizen:\nBefore we ".to_vec(),
    };
    let mut loss = f32::INFINITY;
    for _ in 0..300 {
        loss = trainer.step(&gpu, &corpus).unwrap().loss;
        if loss < 0.05 {
            break;
        }
    }
    assert!(loss < 0.05, "loss {loss} after {} steps", trainer.step);
}

#[test]
fn gradients_over_two_half_batches_equal_the_full_batch_gradient() {
    let gpu = gpu();
    let seq = 16;
    let corpus = Corpus::split(text(), 0.1);
    let b = corpus.train_batch(3, 0, 4, seq);
    let scale = 1.0 / (4 * seq) as f32;
    let grads = |halves: bool| -> Vec<Vec<f32>> {
        let model = LmModel::init(&gpu, tiny(seq), 7).unwrap();
        let parts: Vec<(usize, usize)> = if halves {
            vec![(0, 2), (2, 4)]
        } else {
            vec![(0, 4)]
        };
        for (from, to) in parts {
            let mut tape = Tape::new(&gpu);
            let r = from * seq..to * seq;
            let l = model
                .loss(
                    &mut tape,
                    &b.inputs[r.clone()],
                    &b.targets[r],
                    to - from,
                    seq,
                    scale,
                )
                .unwrap();
            tape.backward(l).unwrap();
            tape.submit().unwrap();
        }
        model
            .params
            .iter()
            .map(|p| gpu.read(&p.grad).unwrap())
            .collect()
    };
    let (full, half) = (grads(false), grads(true));
    for (f, h) in full.iter().zip(&half) {
        let scale = f.iter().fold(1e-6f32, |a, b| a.max(b.abs()));
        let worst = f
            .iter()
            .zip(h)
            .fold(0.0f32, |a, (x, y)| a.max((x - y).abs()));
        assert!(worst / scale < 1e-4, "differs by {worst} at scale {scale}");
        assert!(f.iter().any(|&v| v != 0.0));
    }
}

#[test]
fn the_trained_graph_and_the_inference_path_agree() {
    let gpu = gpu();
    let seq = 20;
    let model = LmModel::init(&gpu, tiny(32), 11).unwrap();
    let trainer = Trainer::new(&gpu, model, TrainConfig::default()).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let ckpt = train::save_checkpoint(&gpu, dir.path(), &trainer).unwrap();
    let gguf = dir.path().join("m.gguf");
    tessera::models::hf::convert(&ckpt, &gguf, &|_, _| {}).unwrap();
    let loaded = LoadedModel::open(&gguf, gpu.clone()).unwrap();
    let ids = loaded.tokenizer.encode("ROMEO:\nWhat light", false, false);
    assert_eq!(ids.len(), 17, "one token per byte");
    assert_eq!(ids[0], b'R' as u32);
    let mut session = Session::new(&loaded.model, 32).unwrap();
    let want = session.eval(&ids, Logits::All).unwrap();

    let mut tape = Tape::no_grad(&gpu);
    let logits = trainer
        .model
        .forward(&mut tape, &ids, 1, ids.len())
        .unwrap();
    let r = tape.read(logits);
    let got: Vec<f32> = bytemuck_f32(&tape.submit().unwrap()[r.index()]);
    assert_eq!(got.len(), want.len());
    let worst = got
        .iter()
        .zip(&want)
        .fold(0.0f32, |a, (x, y)| a.max((x - y).abs()));
    assert!(worst < 1e-3, "logits differ by {worst}");
    let _ = seq;
}

fn bytemuck_f32(bytes: &[u8]) -> Vec<f32> {
    bytes
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
        .collect()
}

fn write_text(dir: &Path) -> String {
    let path = dir.join("text.txt");
    std::fs::write(&path, text()).unwrap();
    path.to_string_lossy().into_owned()
}

fn losses(run: &Path) -> Vec<String> {
    let csv = std::fs::read_to_string(run.join("loss.csv")).unwrap();
    csv.lines()
        .skip(1)
        .map(|l| l.split(',').nth(1).unwrap().to_string())
        .collect()
}

const SMALL: &[&str] = &[
    "train",
    "lm",
    "--size",
    "tiny",
    "--batch",
    "4",
    "--seq-len",
    "32",
    "--eval-every",
    "3",
    "--eval-batches",
    "2",
];

#[test]
fn train_lm_writes_checkpoints_and_a_resumed_run_repeats_the_losses_bit_for_bit() {
    let dir = tempfile::tempdir().unwrap();
    let data = write_text(dir.path());
    let (a, b) = (dir.path().join("a"), dir.path().join("b"));
    let run = |out: &Path, steps: &str, extra: &[&str]| {
        let mut args = SMALL.to_vec();
        args.extend([
            "--data",
            &data,
            "--steps",
            steps,
            "--save-every",
            "3",
            "--sample",
            "0",
        ]);
        let out = out.to_string_lossy().into_owned();
        args.extend(["--out", &out]);
        args.extend(extra);
        let o = tessera(&args);
        assert!(o.status.success(), "{}", stderr(&o));
        String::from_utf8_lossy(&o.stdout).into_owned()
    };
    let whole = run(&a, "6", &[]);
    assert!(whole.contains("trained to step 6"), "{whole}");
    for f in [
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "optimizer.safetensors",
        "trainer.json",
    ] {
        assert!(a.join("step-000006").join(f).is_file(), "{f}");
    }
    assert!(a.join("step-000003").is_dir());
    let svg = std::fs::read_to_string(a.join("loss.svg")).unwrap();
    assert!(svg.starts_with("<svg") && svg.contains("held out"));

    run(&b, "3", &[]);
    // A resumed run takes its model, data and settings from the checkpoint and writes into its
    // own run folder; flags that would change them are refused.
    let b3 = b.join("step-000003").to_string_lossy().into_owned();
    let refused = tessera(&[
        "train", "lm", "--resume", &b3, "--steps", "6", "--size", "1m",
    ]);
    assert_clean_failure(&refused, &["--size", "cannot change when resuming"]);
    let resumed = tessera(&[
        "train", "lm", "--resume", &b3, "--steps", "6", "--sample", "0",
    ]);
    assert!(resumed.status.success(), "{}", stderr(&resumed));
    assert!(b.join("step-000006").is_dir());
    let (la, lb) = (losses(&a), losses(&b));
    assert_eq!(la.len(), 6);
    assert_eq!(la, lb, "resumed losses differ from the uninterrupted run's");

    // The run folder stands for its newest checkpoint in generate and export.
    let a_s = a.to_string_lossy().into_owned();
    let g = tessera(&[
        "generate", "-m", &a_s, "-p", "ROMEO:", "-n", "20", "--temp", "0",
    ]);
    assert!(g.status.success(), "{}", stderr(&g));
    // generate prints the completion only: 20 bytes, some of them invalid UTF-8 this early.
    assert!(g.stdout.len() > 2, "{}", String::from_utf8_lossy(&g.stdout));
    let gguf = dir.path().join("x.gguf").to_string_lossy().into_owned();
    let e = tessera(&["train", "export", &a_s, "-o", &gguf]);
    assert!(e.status.success(), "{}", stderr(&e));
    let loaded = LoadedModel::open(Path::new(&gguf), common::gpu()).unwrap();
    assert_eq!(loaded.tokenizer.vocab_size(), 256);
}

#[test]
fn train_lm_samples_after_training() {
    let dir = tempfile::tempdir().unwrap();
    let data = write_text(dir.path());
    let out = dir.path().join("run").to_string_lossy().into_owned();
    let mut args = SMALL.to_vec();
    args.extend([
        "--data", &data, "--steps", "2", "--sample", "80", "--out", &out,
    ]);
    let o = tessera(&args);
    assert!(o.status.success(), "{}", stderr(&o));
    let stdout = String::from_utf8_lossy(&o.stdout);
    let sample = stdout.split("invalid UTF-8):\n").nth(1).expect("a sample");
    assert!(sample.len() >= 60, "{sample:?}");
}

#[test]
fn train_lm_bad_input_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let short = dir.path().join("short.txt");
    std::fs::write(&short, "too short").unwrap();
    let short = short.to_string_lossy().into_owned();
    let out = dir.path().join("o").to_string_lossy().into_owned();
    let cases: Vec<(Vec<&str>, Vec<&str>)> = vec![
        (
            vec!["--data", "/nonexistent/x.txt"],
            vec!["/nonexistent/x.txt"],
        ),
        (vec!["--data", &short], vec!["fewer than one sequence"]),
        (vec!["--size", "huge"], vec!["no model size", "tiny"]),
        (
            vec!["--batch", "4", "--micro-batch", "3"],
            vec!["micro-batch"],
        ),
        (vec!["--resume", "/nonexistent"], vec!["no checkpoint"]),
        (vec!["--lr", "0"], vec!["learning rate"]),
        (vec!["--lr", "-1"], vec!["learning rate"]),
        (vec!["--steps", "0"], vec!["--steps"]),
        (vec!["--seq-len", "1"], vec!["--seq-len", "2 to 8192"]),
        (
            vec!["--micro-batch", "1000", "--batch", "1000"],
            vec!["tokens a submit"],
        ),
    ];
    for (extra, needles) in cases {
        let mut args = vec!["train", "lm", "--steps", "1", "--out", &out];
        args.extend(extra);
        assert_clean_failure(&tessera(&args), &needles);
    }
    // A new run into a folder that holds another run's checkpoints is refused.
    let run = dir.path().join("run");
    std::fs::create_dir_all(run.join("step-000002")).unwrap();
    let run = run.to_string_lossy().into_owned();
    assert_clean_failure(
        &tessera(&["train", "lm", "--steps", "1", "--out", &run]),
        &["already holds", "--resume"],
    );

    let bad = dir.path().join("bad");
    std::fs::create_dir_all(bad.join("step-000001")).unwrap();
    std::fs::write(bad.join("step-000001/trainer.json"), "{").unwrap();
    let bad = bad.to_string_lossy().into_owned();
    let mut args = vec![
        "train", "lm", "--steps", "2", "--out", &out, "--resume", &bad,
    ];
    assert_clean_failure(&tessera(&args), &["trainer.json"]);
    args = vec!["train", "export", &bad, "-o", "/tmp/never.gguf"];
    assert_clean_failure(&tessera(&args), &["config.json"]);
}
