//! `quant eval`: how far a quantized model's next-token distributions are from its base's, with
//! llama-perplexity's `--kl-divergence` definitions.
//!
//! Both models score the same windows by llama-perplexity's method (non-overlapping windows of
//! `n_ctx` tokens from an empty cache, the second half of each scored). The base's log-softmax
//! rows are kept (f32, `n_vocab` per scored token), so one base pass serves many quantized
//! models (`quant sweep`). For every scored token: KL(base || quant) over the whole vocabulary,
//! whether the two argmaxes agree, and the change in the probability of the token that came.

use tessera_models::llm::{Logits, Session};

use crate::QuantError;

/// The base model's log-probabilities over the scored tokens of some windows.
pub struct Reference {
    pub n_ctx: usize,
    pub n_vocab: usize,
    windows: Vec<Vec<u32>>,
    /// `[scored, n_vocab]` log-softmax rows.
    logprobs: Vec<f32>,
    /// The token that came next at each scored position.
    targets: Vec<u32>,
}

impl Reference {
    pub fn scored(&self) -> usize {
        self.targets.len()
    }

    pub fn chunks(&self) -> usize {
        self.windows.len()
    }
}

/// The comparison of a quantized model with the base.
#[derive(Clone, Debug, serde::Serialize)]
pub struct EvalReport {
    pub n_ctx: usize,
    pub chunks: usize,
    pub scored: usize,
    pub ppl_base: f64,
    pub ppl_quant: f64,
    /// Mean of ln(PPL(Q)/PPL(base)) per token, as llama-perplexity prints it.
    pub mean_ln_ppl_ratio: f64,
    pub kld_mean: f64,
    pub kld_median: f64,
    pub kld_p99: f64,
    pub kld_max: f64,
    /// Share of scored tokens where both models' most likely token is the same.
    pub same_top: f64,
    /// Root mean square of p_quant(t) - p_base(t) for the token t that came.
    pub rms_dp: f64,
}

/// Cuts `tokens` into at most `max_chunks` windows of `n_ctx` (first token BOS when given).
pub fn eval_windows(
    tokens: &[u32],
    n_ctx: usize,
    max_chunks: Option<usize>,
    bos: Option<u32>,
) -> Result<Vec<Vec<u32>>, QuantError> {
    if n_ctx < 4 {
        return Err(QuantError::Data(format!(
            "an evaluation window of {n_ctx} tokens is too small: pass -c 4 or more"
        )));
    }
    let mut windows: Vec<Vec<u32>> = tokens
        .chunks_exact(n_ctx)
        .map(|w| {
            let mut w = w.to_vec();
            if let Some(b) = bos {
                w[0] = b;
            }
            w
        })
        .collect();
    if let Some(n) = max_chunks {
        windows.truncate(n);
    }
    if windows.is_empty() {
        return Err(QuantError::Data(format!(
            "the evaluation text has {} tokens, fewer than one window of -c {n_ctx}: give a \
             longer text or a smaller -c",
            tokens.len()
        )));
    }
    Ok(windows)
}

/// Runs the second half of `window` through `session` and returns its logits rows
/// (`[n_ctx - n_ctx/2, n_vocab]`).
fn score_window(session: &mut Session, window: &[u32]) -> Result<Vec<f32>, QuantError> {
    let first = window.len() / 2;
    session.reset();
    session.eval(&window[..first], Logits::None)?;
    let logits = session.eval(&window[first..], Logits::All)?;
    if logits.iter().any(|v| !v.is_finite()) {
        return Err(QuantError::Model(
            "the model produced NaN or infinite logits: its weights are broken (a NaN or an \
             overflowing scale); quantize it again"
                .into(),
        ));
    }
    Ok(logits)
}

fn log_softmax(row: &[f32], out: &mut [f32]) {
    let max = row.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b)) as f64;
    let sum: f64 = row.iter().map(|&l| (l as f64 - max).exp()).sum();
    let lse = max + sum.ln();
    for (o, &l) in out.iter_mut().zip(row) {
        *o = (l as f64 - lse) as f32;
    }
}

/// Scores `windows` with the base model, calling `progress(done, total)` after each.
pub fn reference(
    session: &mut Session,
    windows: Vec<Vec<u32>>,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<Reference, QuantError> {
    let n_vocab = session.model().config.n_vocab;
    let n_ctx = windows.first().map_or(0, Vec::len);
    let first = n_ctx / 2;
    let mut logprobs = Vec::new();
    let mut targets = Vec::new();
    for (i, w) in windows.iter().enumerate() {
        let logits = score_window(session, w)?;
        for j in first..n_ctx - 1 {
            let row = &logits[(j - first) * n_vocab..(j - first + 1) * n_vocab];
            let start = logprobs.len();
            logprobs.resize(start + n_vocab, 0.0);
            log_softmax(row, &mut logprobs[start..]);
            targets.push(w[j + 1]);
        }
        progress(i + 1, windows.len());
    }
    Ok(Reference {
        n_ctx,
        n_vocab,
        windows,
        logprobs,
        targets,
    })
}

/// Scores the reference's windows with a quantized model and compares.
pub fn compare(
    session: &mut Session,
    base: &Reference,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<EvalReport, QuantError> {
    let n_vocab = session.model().config.n_vocab;
    if n_vocab != base.n_vocab {
        return Err(QuantError::Data(format!(
            "the models' vocabularies differ ({n_vocab} vs {} tokens): they are not the same \
             model",
            base.n_vocab
        )));
    }
    let first = base.n_ctx / 2;
    let per_window = base.n_ctx - 1 - first;
    let mut q = vec![0.0f32; n_vocab];
    let mut klds = Vec::with_capacity(base.scored());
    let (mut nll_b, mut nll_q, mut same, mut dp2) = (0.0f64, 0.0f64, 0usize, 0.0f64);
    for (i, w) in base.windows.iter().enumerate() {
        let logits = score_window(session, w)?;
        for j in 0..per_window {
            let k = i * per_window + j;
            let b = &base.logprobs[k * n_vocab..(k + 1) * n_vocab];
            log_softmax(&logits[j * n_vocab..(j + 1) * n_vocab], &mut q);
            let t = base.targets[k] as usize;
            nll_b -= b[t] as f64;
            nll_q -= q[t] as f64;
            let kl: f64 = b
                .iter()
                .zip(&q)
                .map(|(&lb, &lq)| (lb as f64).exp() * (lb as f64 - lq as f64))
                .sum();
            klds.push(kl.max(0.0));
            same += (argmax(b) == argmax(&q)) as usize;
            let dp = (q[t] as f64).exp() - (b[t] as f64).exp();
            dp2 += dp * dp;
        }
        progress(i + 1, base.windows.len());
    }
    let n = klds.len() as f64;
    let mean = klds.iter().sum::<f64>() / n;
    klds.sort_by(|a, b| a.total_cmp(b));
    let pct = |p: f64| klds[(((klds.len() - 1) as f64) * p).round() as usize];
    Ok(EvalReport {
        n_ctx: base.n_ctx,
        chunks: base.windows.len(),
        scored: klds.len(),
        ppl_base: (nll_b / n).exp(),
        ppl_quant: (nll_q / n).exp(),
        mean_ln_ppl_ratio: (nll_q - nll_b) / n,
        kld_mean: mean,
        kld_median: pct(0.5),
        kld_p99: pct(0.99),
        kld_max: klds[klds.len() - 1],
        same_top: same as f64 / n,
        rms_dp: (dp2 / n).sqrt(),
    })
}

fn argmax(row: &[f32]) -> usize {
    let mut best = 0;
    for (i, &v) in row.iter().enumerate() {
        if v > row[best] {
            best = i;
        }
    }
    best
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn windows_are_cut_and_short_text_is_an_error() {
        let t: Vec<u32> = (0..100).collect();
        let w = eval_windows(&t, 32, None, Some(7)).unwrap();
        assert_eq!(w.len(), 3);
        assert_eq!(w[1][0], 7);
        assert_eq!(w[1][1], 33);
        assert_eq!(eval_windows(&t, 32, Some(2), None).unwrap().len(), 2);
        let e = eval_windows(&t, 128, None, None).unwrap_err().to_string();
        assert!(e.contains("fewer than one window"), "{e}");
        assert!(eval_windows(&t, 2, None, None).is_err());
    }

    #[test]
    fn log_softmax_normalises() {
        let row = [1.0f32, 2.0, 3.0, -50.0];
        let mut out = [0.0f32; 4];
        log_softmax(&row, &mut out);
        let s: f64 = out.iter().map(|&l| (l as f64).exp()).sum();
        assert!((s - 1.0).abs() < 1e-6);
        assert!((out[2] - out[1] - 1.0).abs() < 1e-6);
    }
}
