//! CPU token sampler over one row of logits, in llama.cpp's common-sampler order: repetition
//! penalty -> top-k -> top-p -> min-p -> temperature -> softmax -> seeded draw (`StdRng`).
//! The same config, seed and accepted history give the same tokens. NaN and -inf logits are
//! skipped (never chosen); a row with nothing choosable is a [`SamplerError`], never a panic.

use std::collections::VecDeque;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// Sampling parameters; `Default` is llama.cpp's `common_params_sampling`.
#[derive(Debug, Clone, PartialEq)]
pub struct SamplerConfig {
    /// Divides the logits; `<= 0` means greedy argmax (ties go to the lowest id).
    pub temperature: f32,
    /// Keep the `top_k` most likely tokens; 0 disables.
    pub top_k: usize,
    /// Keep the smallest most-likely set whose probability reaches `top_p`; `>= 1` disables.
    pub top_p: f32,
    /// Drop tokens less likely than `min_p` times the most likely one; `<= 0` disables.
    pub min_p: f32,
    /// Penalty for tokens among the last `repeat_last_n` accepted ones; 1 disables.
    pub repeat_penalty: f32,
    /// History length for the penalty; 0 disables.
    pub repeat_last_n: usize,
    /// RNG seed; `None` draws one from the OS (see [`Sampler::seed`]).
    pub seed: Option<u64>,
}

impl Default for SamplerConfig {
    fn default() -> Self {
        Self {
            temperature: 0.8,
            top_k: 40,
            top_p: 0.95,
            min_p: 0.05,
            repeat_penalty: 1.0,
            repeat_last_n: 64,
            seed: None,
        }
    }
}

impl SamplerConfig {
    /// Greedy decoding: always the argmax (after the repetition penalty).
    pub fn greedy() -> Self {
        Self {
            temperature: 0.0,
            ..Self::default()
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SamplerError {
    #[error("logits are empty")]
    Empty,
    #[error("none of the {0} logits can be sampled (all NaN or -inf)")]
    NoCandidates(usize),
    #[error("{0} logits is more than u32 token ids can address")]
    TooMany(usize),
}

/// Stateful sampler: owns the RNG and the accepted-token history for the penalty.
#[derive(Debug, Clone)]
pub struct Sampler {
    config: SamplerConfig,
    seed: u64,
    rng: StdRng,
    history: VecDeque<u32>,
}

impl Sampler {
    pub fn new(config: SamplerConfig) -> Self {
        let seed = config.seed.unwrap_or_else(|| rand::rng().random());
        let history = VecDeque::with_capacity(config.repeat_last_n);
        Self {
            rng: StdRng::seed_from_u64(seed),
            seed,
            config,
            history,
        }
    }

    pub fn config(&self) -> &SamplerConfig {
        &self.config
    }

    /// The seed in use (drawn from the OS when the config had none), to reproduce a run.
    pub fn seed(&self) -> u64 {
        self.seed
    }

    /// Records a token (prompt or generated) for the repetition penalty.
    pub fn accept(&mut self, token: u32) {
        if self.config.repeat_last_n == 0 {
            return;
        }
        if self.history.len() == self.config.repeat_last_n {
            self.history.pop_front();
        }
        self.history.push_back(token);
    }

    /// The last `repeat_last_n` accepted tokens, oldest first.
    pub fn history(&self) -> impl Iterator<Item = u32> + '_ {
        self.history.iter().copied()
    }

    /// Forgets the history and restarts the RNG from the seed.
    pub fn reset(&mut self) {
        self.history.clear();
        self.rng = StdRng::seed_from_u64(self.seed);
    }

    /// Picks the next token id from `logits` (one entry per vocabulary id). Does not
    /// [`accept`](Self::accept) it.
    pub fn sample(&mut self, logits: &[f32]) -> Result<u32, SamplerError> {
        let candidates = self.candidates(logits)?;
        let temperature = self.config.temperature;
        if temperature <= 0.0 || candidates.len() == 1 {
            // Candidates are sorted by logit, ties by id, so the first is the argmax.
            return Ok(candidates[0].0);
        }
        // Softmax of logit / temperature in f64, relative to the max (the first candidate).
        let max = f64::from(candidates[0].1);
        let t = f64::from(temperature);
        let weights: Vec<f64> = candidates
            .iter()
            .map(|&(_, l)| ((f64::from(l) - max) / t).exp())
            .collect();
        let total: f64 = weights.iter().sum();
        let mut target = self.rng.random::<f64>() * total;
        for (&(id, _), w) in candidates.iter().zip(&weights) {
            if target < *w {
                return Ok(id);
            }
            target -= w;
        }
        // Rounding left the target past the end: take the last candidate.
        Ok(candidates[candidates.len() - 1].0)
    }

    /// Penalized logits of the tokens that survive top-k, top-p and min-p, sorted by logit
    /// (descending, ties by id); never empty on success. With temperature `<= 0` only the
    /// argmax is returned.
    fn candidates(&self, logits: &[f32]) -> Result<Vec<(u32, f32)>, SamplerError> {
        if logits.is_empty() {
            return Err(SamplerError::Empty);
        }
        if u32::try_from(logits.len()).is_err() {
            return Err(SamplerError::TooMany(logits.len()));
        }
        let mut penalized = logits.to_vec();
        self.apply_penalty(&mut penalized);
        let mut cands: Vec<(u32, f32)> = penalized
            .iter()
            .enumerate()
            .filter(|(_, l)| !l.is_nan() && **l != f32::NEG_INFINITY)
            .map(|(i, &l)| (i as u32, l))
            .collect();
        if cands.is_empty() {
            return Err(SamplerError::NoCandidates(logits.len()));
        }
        // +inf logits win outright, uniformly among themselves.
        if cands.iter().any(|(_, l)| *l == f32::INFINITY) {
            cands.retain(|(_, l)| *l == f32::INFINITY);
            cands.iter_mut().for_each(|c| c.1 = 0.0);
        }
        let by_logit = |a: &(u32, f32), b: &(u32, f32)| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0));

        if self.config.temperature <= 0.0 {
            let best = cands.iter().copied().min_by(by_logit);
            return Ok(best.into_iter().collect());
        }

        // top-k
        let k = self.config.top_k;
        if k > 0 && k < cands.len() {
            cands.select_nth_unstable_by(k - 1, by_logit);
            cands.truncate(k);
        }
        cands.sort_unstable_by(by_logit);

        // top-p: smallest prefix whose softmax mass reaches p (at least one token).
        let top_p = self.config.top_p;
        if top_p < 1.0 {
            let max = f64::from(cands[0].1);
            let weights: Vec<f64> = cands
                .iter()
                .map(|&(_, l)| (f64::from(l) - max).exp())
                .collect();
            let total: f64 = weights.iter().sum();
            let mut cum = 0.0;
            let mut keep = cands.len();
            for (i, w) in weights.iter().enumerate() {
                cum += w / total;
                if cum >= f64::from(top_p) {
                    keep = i + 1;
                    break;
                }
            }
            cands.truncate(keep);
        }

        // min-p: keep p(token) >= min_p * p(max), i.e. logit >= max + ln(min_p).
        let min_p = self.config.min_p;
        if min_p > 0.0 {
            let threshold = f64::from(cands[0].1) + f64::from(min_p).ln();
            let keep = cands
                .iter()
                .take_while(|&&(_, l)| f64::from(l) >= threshold)
                .count();
            cands.truncate(keep.max(1));
        }
        Ok(cands)
    }

    /// llama.cpp's repetition penalty over the distinct tokens of the history: positive logits
    /// are divided by the penalty, the others multiplied.
    fn apply_penalty(&self, logits: &mut [f32]) {
        let penalty = self.config.repeat_penalty;
        if self.config.repeat_last_n == 0 || penalty == 1.0 || self.history.is_empty() {
            return;
        }
        let mut distinct: Vec<u32> = self.history.iter().copied().collect();
        distinct.sort_unstable();
        distinct.dedup();
        for id in distinct {
            if let Some(l) = logits.get_mut(id as usize) {
                *l = if *l > 0.0 { *l / penalty } else { *l * penalty };
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sampler(config: SamplerConfig) -> Sampler {
        Sampler::new(SamplerConfig {
            seed: Some(config.seed.unwrap_or(7)),
            ..config
        })
    }

    /// Logits whose softmax is exactly `probs`.
    fn logits_for(probs: &[f64]) -> Vec<f32> {
        probs.iter().map(|p| p.ln() as f32).collect()
    }

    fn kept_ids(s: &Sampler, logits: &[f32]) -> Vec<u32> {
        let mut ids: Vec<u32> = s
            .candidates(logits)
            .expect("candidates")
            .iter()
            .map(|c| c.0)
            .collect();
        ids.sort_unstable();
        ids
    }

    #[test]
    fn defaults_are_llama_cpp_defaults() {
        let c = SamplerConfig::default();
        assert_eq!(
            (c.temperature, c.top_k, c.top_p, c.min_p),
            (0.8, 40, 0.95, 0.05)
        );
        assert_eq!((c.repeat_penalty, c.repeat_last_n, c.seed), (1.0, 64, None));
    }

    #[test]
    fn greedy_picks_argmax_and_lowest_id_on_ties() {
        let mut s = sampler(SamplerConfig::greedy());
        assert_eq!(s.sample(&[0.1, 3.0, -1.0, 2.9]), Ok(1));
        assert_eq!(s.sample(&[1.0, 5.0, 5.0, 5.0]), Ok(1));
        let mut s = sampler(SamplerConfig {
            temperature: -1.0,
            ..SamplerConfig::default()
        });
        assert_eq!(s.sample(&[-3.0, -2.0, -2.5]), Ok(1));
    }

    #[test]
    fn same_seed_gives_same_sequence_and_other_seed_differs() {
        let logits = vec![0.0f32; 50];
        let run = |seed| {
            let cfg = SamplerConfig {
                top_k: 0,
                min_p: 0.0,
                top_p: 1.0,
                seed: Some(seed),
                ..SamplerConfig::default()
            };
            let mut s = Sampler::new(cfg);
            (0..64)
                .map(|_| s.sample(&logits).expect("sample"))
                .collect::<Vec<_>>()
        };
        assert_eq!(run(42), run(42));
        assert_ne!(run(42), run(43));
    }

    #[test]
    fn reset_replays_the_same_draws() {
        let logits = vec![0.0f32; 10];
        let mut s = sampler(SamplerConfig {
            top_k: 0,
            min_p: 0.0,
            ..SamplerConfig::default()
        });
        let first: Vec<u32> = (0..20)
            .map(|_| s.sample(&logits).expect("sample"))
            .collect();
        s.reset();
        let second: Vec<u32> = (0..20)
            .map(|_| s.sample(&logits).expect("sample"))
            .collect();
        assert_eq!(first, second);
    }

    #[test]
    fn unseeded_sampler_reports_its_seed() {
        let s = Sampler::new(SamplerConfig::default());
        let mut replay = Sampler::new(SamplerConfig {
            seed: Some(s.seed()),
            ..SamplerConfig::default()
        });
        let mut s = s;
        let logits = vec![0.5f32; 30];
        for _ in 0..10 {
            assert_eq!(s.sample(&logits), replay.sample(&logits));
        }
    }

    #[test]
    fn top_k_one_equals_greedy() {
        let logits = [0.3, 1.2, 1.1, -0.4, 1.2, 0.9];
        let mut greedy = sampler(SamplerConfig::greedy());
        let want = greedy.sample(&logits).expect("sample");
        for seed in 0..20 {
            let cfg = SamplerConfig {
                top_k: 1,
                temperature: 1.5,
                seed: Some(seed),
                ..SamplerConfig::default()
            };
            assert_eq!(Sampler::new(cfg).sample(&logits), Ok(want));
        }
    }

    #[test]
    fn top_k_keeps_the_k_largest() {
        let s = sampler(SamplerConfig {
            top_k: 3,
            top_p: 1.0,
            min_p: 0.0,
            ..SamplerConfig::default()
        });
        assert_eq!(kept_ids(&s, &[0.1, 0.5, 0.2, 0.9, 0.3]), vec![1, 3, 4]);
    }

    #[test]
    fn min_p_removes_tokens_below_p_times_max() {
        let logits = logits_for(&[0.5, 0.3, 0.15, 0.05]);
        let s = sampler(SamplerConfig {
            min_p: 0.2,
            top_p: 1.0,
            top_k: 0,
            ..SamplerConfig::default()
        });
        // Threshold 0.2 * 0.5 = 0.1: token 3 (0.05) goes, token 2 (0.15) stays.
        assert_eq!(kept_ids(&s, &logits), vec![0, 1, 2]);
        let mut s = s;
        for _ in 0..500 {
            assert_ne!(s.sample(&logits), Ok(3));
        }
    }

    #[test]
    fn top_p_keeps_smallest_set_reaching_p() {
        let logits = logits_for(&[0.05, 0.5, 0.15, 0.3]);
        let cfg = |top_p| SamplerConfig {
            top_p,
            min_p: 0.0,
            top_k: 0,
            ..SamplerConfig::default()
        };
        assert_eq!(kept_ids(&sampler(cfg(0.4)), &logits), vec![1]);
        assert_eq!(kept_ids(&sampler(cfg(0.75)), &logits), vec![1, 3]);
        assert_eq!(kept_ids(&sampler(cfg(0.81)), &logits), vec![1, 2, 3]);
        assert_eq!(kept_ids(&sampler(cfg(1.0)), &logits), vec![0, 1, 2, 3]);
    }

    #[test]
    fn repetition_penalty_lowers_repeated_logits_of_both_signs() {
        let mut s = sampler(SamplerConfig {
            repeat_penalty: 2.0,
            ..SamplerConfig::default()
        });
        s.accept(0);
        s.accept(1);
        s.accept(1);
        s.accept(99); // outside the vocabulary: ignored
        let mut logits = vec![2.0, -2.0, 1.0];
        s.apply_penalty(&mut logits);
        assert_eq!(logits, vec![1.0, -4.0, 1.0]);
    }

    #[test]
    fn repetition_penalty_changes_greedy_choice() {
        let mut s = sampler(SamplerConfig {
            repeat_penalty: 1.5,
            ..SamplerConfig::greedy()
        });
        let logits = [3.0, 2.5, 0.0];
        assert_eq!(s.sample(&logits), Ok(0));
        s.accept(0);
        assert_eq!(s.sample(&logits), Ok(1));
    }

    #[test]
    fn history_keeps_only_last_n() {
        let mut s = sampler(SamplerConfig {
            repeat_last_n: 3,
            ..SamplerConfig::default()
        });
        for t in 0..5 {
            s.accept(t);
        }
        assert_eq!(s.history().collect::<Vec<_>>(), vec![2, 3, 4]);
        let mut off = sampler(SamplerConfig {
            repeat_last_n: 0,
            ..SamplerConfig::default()
        });
        off.accept(1);
        assert_eq!(off.history().count(), 0);
    }

    #[test]
    fn nan_logits_are_skipped_and_all_nan_is_an_error() {
        let mut s = sampler(SamplerConfig::default());
        for _ in 0..50 {
            assert_eq!(
                s.sample(&[f32::NAN, 1.0, f32::NAN, f32::NEG_INFINITY]),
                Ok(1)
            );
        }
        assert_eq!(
            sampler(SamplerConfig::greedy()).sample(&[f32::NAN, -1.0, 0.5]),
            Ok(2)
        );
        assert_eq!(
            s.sample(&[f32::NAN, f32::NAN]),
            Err(SamplerError::NoCandidates(2))
        );
        assert_eq!(s.sample(&[]), Err(SamplerError::Empty));
    }

    #[test]
    fn positive_infinity_wins() {
        let mut s = sampler(SamplerConfig::default());
        assert_eq!(s.sample(&[1.0, f32::INFINITY, 3.0]), Ok(1));
    }

    #[test]
    fn draws_follow_the_tempered_distribution() {
        // p = [0.6, 0.3, 0.1] at temperature 1, no filtering.
        let logits = logits_for(&[0.6, 0.3, 0.1]);
        let cfg = SamplerConfig {
            temperature: 1.0,
            top_k: 0,
            top_p: 1.0,
            min_p: 0.0,
            seed: Some(1),
            ..SamplerConfig::default()
        };
        let mut s = Sampler::new(cfg);
        let mut counts = [0usize; 3];
        let n = 20_000;
        for _ in 0..n {
            counts[s.sample(&logits).expect("sample") as usize] += 1;
        }
        for (c, p) in counts.iter().zip([0.6, 0.3, 0.1]) {
            let freq = *c as f64 / n as f64;
            assert!((freq - p).abs() < 0.02, "{counts:?}");
        }
    }
}
