//! Perplexity by llama-perplexity's method: the tokens are cut into non-overlapping windows of
//! `n_ctx`, each evaluated from an empty cache (its first token replaced by BOS when the model
//! adds one), and the second half of each window is scored.

use crate::llm::{LlmError, Logits, Session};

/// The result of a perplexity run.
#[derive(Clone, Debug, serde::Serialize)]
pub struct PerplexityReport {
    pub n_ctx: usize,
    pub chunks: usize,
    /// Tokens scored in all.
    pub scored: usize,
    /// Running perplexity after each chunk, as llama-perplexity prints it.
    pub running: Vec<f64>,
    pub perplexity: f64,
    /// Mean negative log-likelihood per scored token, in nats.
    pub nll: f64,
}

/// Log-probability of `target` under the softmax of `logits`, computed in f64.
pub fn log_softmax_at(logits: &[f32], target: usize) -> f64 {
    let max = logits.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b)) as f64;
    let sum: f64 = logits.iter().map(|&l| (l as f64 - max).exp()).sum();
    logits[target] as f64 - max - sum.ln()
}

/// Scores `tokens` in windows of `n_ctx` (`session` must hold at least `n_ctx`), calling
/// `progress(done, total, running_ppl)` after each window.
pub fn perplexity(
    session: &mut Session,
    tokens: &[u32],
    n_ctx: usize,
    bos: Option<u32>,
    progress: &mut dyn FnMut(usize, usize, f64),
) -> Result<PerplexityReport, LlmError> {
    if n_ctx < 4 {
        return Err(LlmError::BadInput(format!(
            "a perplexity window of {n_ctx} tokens is too small: pass --ctx-size 4 or more"
        )));
    }
    let chunks = tokens.len() / n_ctx;
    if chunks == 0 {
        return Err(LlmError::BadInput(format!(
            "perplexity needs at least one window of {n_ctx} tokens, and only {} were given: use \
             a longer text, a smaller --ctx-size, or a larger --max-tokens",
            tokens.len()
        )));
    }
    let n_vocab = session_vocab(session);
    let first = n_ctx / 2;
    let mut nll = 0.0f64;
    let mut scored = 0usize;
    let mut running = Vec::with_capacity(chunks);
    for i in 0..chunks {
        let window = &tokens[i * n_ctx..(i + 1) * n_ctx];
        let mut batch = window.to_vec();
        if let Some(bos) = bos {
            batch[0] = bos;
        }
        session.reset();
        // Positions before `first` are never scored: they need no logits.
        session.eval(&batch[..first], Logits::None)?;
        let logits = session.eval(&batch[first..], Logits::All)?;
        for j in first..n_ctx - 1 {
            let row = &logits[(j - first) * n_vocab..(j - first + 1) * n_vocab];
            nll -= log_softmax_at(row, window[j + 1] as usize);
            scored += 1;
        }
        let ppl = (nll / scored as f64).exp();
        running.push(ppl);
        progress(i + 1, chunks, ppl);
    }
    let mean = nll / scored as f64;
    Ok(PerplexityReport {
        n_ctx,
        chunks,
        scored,
        running,
        perplexity: mean.exp(),
        nll: mean,
    })
}

fn session_vocab(session: &Session) -> usize {
    session.model().config.n_vocab
}
