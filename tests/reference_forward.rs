//! The whole model on the device against a plain f64 forward pass on the CPU, written here from
//! the llama graph alone (GGUF weights dequantised by the CPU reference decoder). This checks
//! the graph and every kernel together, with no llama.cpp arithmetic involved.

mod common;

use tessera::models::llm::{Logits, Session};

#[test]
fn device_logits_equal_an_f64_cpu_forward_pass() {
    let loaded = common::model();
    let c = &loaded.model.config;
    // Enough tokens for both the prefill and the decode kernels, and a 2-row decode batch.
    let tokens = loaded
        .tokenizer
        .encode("The capital of France is Paris.\n\nThe", true, true);
    let want = common::reference::logits(&loaded.file, c, &tokens);

    let mut session = Session::new(&loaded.model, 64).unwrap();
    let split = tokens.len() - 3;
    let mut got = session.eval(&tokens[..split], Logits::All).unwrap();
    got.extend(
        session
            .eval(&tokens[split..split + 2], Logits::All)
            .unwrap(),
    );
    got.extend(session.eval(&tokens[split + 2..], Logits::All).unwrap());

    let mut worst = 0.0f64;
    for (j, row) in want.iter().enumerate() {
        let ours = &got[j * c.n_vocab..(j + 1) * c.n_vocab];
        for (&o, &w) in ours.iter().zip(row) {
            worst = worst.max((o as f64 - w).abs());
        }
    }
    eprintln!("largest logit difference from the f64 reference: {worst:.2e}");
    assert!(worst < 1e-3, "largest logit difference {worst}");
}
