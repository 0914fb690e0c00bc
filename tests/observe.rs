//! Observation of the linear inputs on the real model: every quantizable weight of the file is
//! found by name with the right width, the statistics agree with the captured rows, and the
//! logits are those of a session that does not observe.

mod common;

use tessera::models::llm::{Logits, ObserveOptions, Session};

#[test]
fn observations_cover_every_linear_weight_of_the_real_model_without_changing_logits() {
    let loaded = common::model();
    let c = &loaded.model.config;
    let tokens = loaded.tokenizer.encode(
        "Quantization needs statistics of the activations.",
        true,
        true,
    );

    let mut plain = Session::new(&loaded.model, 64).unwrap();
    let want = plain.eval(&tokens, Logits::All).unwrap();
    let mut session = Session::new(&loaded.model, 64).unwrap();
    session
        .observe(ObserveOptions {
            stats: true,
            gram: false,
            capture_rows: tokens.len(),
        })
        .unwrap();
    let got = session.eval(&tokens, Logits::All).unwrap();
    assert!(
        got.iter()
            .zip(&want)
            .all(|(a, b)| a.to_bits() == b.to_bits()),
        "observing changed the logits"
    );

    let obs = session.observations().unwrap();
    assert_eq!(obs.sites.len(), 4 * c.n_layer);
    let linear = [
        "attn_q",
        "attn_k",
        "attn_v",
        "attn_output",
        "ffn_gate",
        "ffn_up",
        "ffn_down",
    ];
    let mut found = 0;
    for info in loaded.file.tensors() {
        let name = info.name();
        if !name.starts_with("blk.") || !linear.iter().any(|w| name.contains(&format!(".{w}."))) {
            continue;
        }
        let site = obs
            .for_tensor(name)
            .unwrap_or_else(|| panic!("no observation feeds {name}"));
        assert_eq!(site.width as u64, info.dims()[0], "{name}: input width");
        assert_eq!(site.tokens, tokens.len() as u64, "{name}");
        found += 1;
    }
    assert_eq!(found, 7 * c.n_layer);

    for site in &obs.sites {
        let st = site.stats.as_ref().unwrap();
        assert_eq!(site.captured_rows(), tokens.len());
        for j in 0..site.width {
            let column = site.captured.iter().skip(j).step_by(site.width);
            let sum_sq: f64 = column.clone().map(|&v| v as f64 * v as f64).sum();
            let max = column.fold(0.0f64, |a, &v| a.max(v.abs() as f64));
            assert!((st.sum_sq[j] - sum_sq).abs() <= 1e-5 * sum_sq.max(1.0));
            assert_eq!(
                st.max_abs[j],
                max,
                "layer {} {}",
                site.layer,
                site.site.name()
            );
        }
    }
}
