//! The generate loop: prefill the prompt, then decode token by token until the budget, an
//! end-of-generation token or the end of the context, streaming text as it completes.

use std::time::{Duration, Instant};

use crate::llm::sampler::{Sampler, SamplerConfig};
use crate::llm::tokenizer::{StreamDecoder, Tokenizer};
use crate::llm::{LlmError, Session};

/// Why generation stopped.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StopReason {
    /// `n_predict` tokens were generated.
    Budget,
    /// The model produced an end-of-generation token.
    EndOfGeneration,
    /// The context is full.
    ContextFull,
    /// The caller asked to stop (`on_text` returned false).
    Cancelled,
}

impl std::fmt::Display for StopReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            StopReason::Budget => "the token budget (-n) was reached",
            StopReason::EndOfGeneration => "the model ended its answer",
            StopReason::ContextFull => "the context is full",
            StopReason::Cancelled => "cancelled",
        })
    }
}

/// Counts and timings of one generation.
#[derive(Clone, Debug)]
pub struct GenerateStats {
    pub prompt_tokens: usize,
    pub generated: Vec<u32>,
    pub prefill: Duration,
    pub decode: Duration,
    pub stop: StopReason,
}

impl GenerateStats {
    /// Prompt tokens per second of prefill.
    pub fn prefill_tps(&self) -> f64 {
        self.prompt_tokens as f64 / self.prefill.as_secs_f64().max(1e-9)
    }

    /// Generated tokens per second, counting the decode steps after the first token (which
    /// comes out of prefill).
    pub fn decode_tps(&self) -> f64 {
        let steps = self.generated.len().saturating_sub(1);
        steps as f64 / self.decode.as_secs_f64().max(1e-9)
    }
}

/// Generates up to `n_predict` tokens after `prompt` (-1: until the end of generation or of the
/// context), calling `on_text` with each completed piece of text; it returns false to stop.
pub fn generate(
    session: &mut Session,
    tokenizer: &Tokenizer,
    prompt: &[u32],
    n_predict: i64,
    sampler: SamplerConfig,
    on_text: &mut dyn FnMut(&str) -> bool,
) -> Result<GenerateStats, LlmError> {
    if prompt.is_empty() {
        return Err(LlmError::EmptyPrompt);
    }
    // The prompt and at least one generated token must fit.
    if session.n_past() + prompt.len() >= session.n_ctx() {
        return Err(LlmError::PromptTooLong {
            prompt: prompt.len(),
            n_ctx: session.n_ctx(),
            n_ctx_train: session.model().config.n_ctx_train,
        });
    }
    // Greedy without penalties runs argmax on the device: one id read back per token.
    let on_device = sampler.temperature <= 0.0 && sampler.repeat_penalty == 1.0;
    let mut sampler = Sampler::new(sampler);
    for &t in prompt {
        sampler.accept(t);
    }
    let mut next = |session: &mut Session, tokens: &[u32]| -> Result<u32, LlmError> {
        if on_device {
            session.eval_greedy(tokens)
        } else {
            // The prompt's last token as a decode step, so that compiling the decode kernels
            // counts as prefill (as with greedy decoding), not as the first decode step.
            let logits = session.eval_last(tokens)?;
            sampler
                .sample(&logits)
                .map_err(|e| LlmError::BadConfig(e.to_string()))
        }
    };

    let mut decoder = StreamDecoder::new(tokenizer, false);
    let mut generated = Vec::new();
    let start = Instant::now();
    let mut token = next(session, prompt)?;
    let prefill = start.elapsed();
    let start = Instant::now();
    let budget = if n_predict < 0 {
        usize::MAX
    } else {
        n_predict as usize
    };
    let stop = loop {
        if generated.len() >= budget {
            break StopReason::Budget;
        }
        if tokenizer.is_eog(token) {
            break StopReason::EndOfGeneration;
        }
        generated.push(token);
        if !on_text(&decoder.push(token)) {
            break StopReason::Cancelled;
        }
        if generated.len() >= budget {
            break StopReason::Budget;
        }
        if session.n_past() >= session.n_ctx() {
            break StopReason::ContextFull;
        }
        token = next(session, &[token])?;
    };
    on_text(&decoder.finish());
    Ok(GenerateStats {
        prompt_tokens: prompt.len(),
        generated,
        prefill,
        decode: start.elapsed(),
        stop,
    })
}
