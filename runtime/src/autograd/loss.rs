//! Cross-entropy fused with the log-softmax (`train_loss.wgsl`): the loss of logits against
//! target tokens, summed over rows in a fixed order, and a backward pass that reads the loss's
//! upstream gradient on the device.

use crate::autograd::{Backward, Grads, Tape, Var};
use crate::error::{Result, RuntimeError};
use crate::ops::pow2_floor;
use crate::pipeline::PipelineKey;
use crate::recorder::split_groups;
use crate::tensor::Tensor;

/// A target that contributes nothing to the loss (padding, prompt tokens).
pub const IGNORE: u32 = u32::MAX;

struct CrossEntropyBackward {
    logits: Var,
    targets: Tensor,
    /// Per-row losses, then per-row log-sum-exps.
    stats: Tensor,
    rows: usize,
    vocab: usize,
    scale: f32,
    wg: u32,
}

impl<'g> Tape<'g> {
    /// `scale * sum over rows of (logsumexp(row) - row[target])` for logits `[rows, vocab]`
    /// (any leading dimensions make the rows) and one target per row: a scalar `[1]`. Rows
    /// whose target is [`IGNORE`] (`u32::MAX`) contribute 0; any other target must be below
    /// `vocab`. With `scale = 1 / n` for the n counted targets of all micro-batches of a step,
    /// the gradients the micro-batches accumulate are those of the mean over the whole batch.
    pub fn cross_entropy(&mut self, logits: Var, targets: &[u32], scale: f32) -> Result<Var> {
        let shape = self.shape(logits).to_vec();
        let vocab = shape.last().copied().unwrap_or(0);
        let len = self.value(logits).len();
        let rows = len.checked_div(vocab).unwrap_or(0);
        if rows == 0 || targets.len() != rows {
            return Err(RuntimeError::Shape(format!(
                "cross_entropy: {} targets for logits of shape {shape:?}",
                targets.len()
            )));
        }
        if len > u32::MAX as usize {
            return Err(RuntimeError::Shape(format!(
                "cross_entropy: logits of shape {shape:?} have more than 2^32 values"
            )));
        }
        if let Some((row, &t)) = targets
            .iter()
            .enumerate()
            .find(|&(_, &t)| t != IGNORE && t as usize >= vocab)
        {
            return Err(RuntimeError::Shape(format!(
                "cross_entropy: target {t} of row {row} is outside the vocabulary of {vocab} \
                 (u32::MAX marks a row to ignore)"
            )));
        }
        if !scale.is_finite() {
            return Err(RuntimeError::Shape(format!(
                "cross_entropy: scale {scale} is not finite"
            )));
        }
        let target_t = self.alloc(&[rows])?;
        self.gpu().write_u32(&target_t, targets)?;
        let stats = self.alloc(&[2 * rows])?;
        let loss = self.alloc(&[1])?;
        let wg = pow2_floor(
            self.gpu()
                .limits()
                .max_compute_invocations_per_workgroup
                .min(64),
        );
        let params = [rows as u32, vocab as u32, scale.to_bits()];
        let key = |entry| PipelineKey::new("train_loss", entry).define("WG", wg);
        let x = self.value(logits).clone();
        let groups = split_groups(self.gpu(), rows as u32, 1);
        self.rec.dispatch(
            &key("rows"),
            &params,
            &[x.bind(), target_t.bind(), stats.bind()],
            groups,
        )?;
        self.rec.dispatch(
            &key("total"),
            &params,
            &[stats.bind(), loss.bind()],
            [1, 1, 1],
        )?;
        Ok(self.push(loss, &[logits], || CrossEntropyBackward {
            logits,
            targets: target_t,
            stats,
            rows,
            vocab,
            scale,
            wg,
        }))
    }
}

impl Backward for CrossEntropyBackward {
    fn backward(&self, g: &mut Grads, d_loss: &Tensor) -> Result<()> {
        let Some(dx) = g.grad_of(self.logits)? else {
            return Ok(());
        };
        let x = g.value(self.logits);
        let n = self.rows * self.vocab;
        let groups = split_groups(g.rec().gpu(), n.div_ceil(256) as u32, 1);
        let params = [self.rows as u32, self.vocab as u32, self.scale.to_bits()];
        let buffers = [
            x.bind(),
            self.targets.bind(),
            self.stats.bind(),
            d_loss.bind(),
            dx.bind(),
        ];
        let key = PipelineKey::new("train_loss", "backward").define("WG", self.wg);
        g.rec().dispatch(&key, &params, &buffers, groups)
    }
}

/// CPU reference of [`Tape::cross_entropy`] in f64.
pub fn cross_entropy_ref(logits: &[f64], targets: &[u32], vocab: usize, scale: f32) -> f64 {
    let sum: f64 = logits
        .chunks(vocab)
        .zip(targets)
        .filter(|&(_, &t)| t != IGNORE)
        .map(|(row, &t)| {
            let m = row.iter().copied().fold(f64::NEG_INFINITY, f64::max);
            let lse = m + row.iter().map(|x| (x - m).exp()).sum::<f64>().ln();
            lse - row[t as usize]
        })
        .sum();
    scale as f64 * sum
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::autograd::check::{assert_close, finite_diff, to_f64};
    use crate::ops::test_util::gpu;
    use crate::testing::random_f32;

    /// Loss and logit gradient from the device, the backward seeded with `upstream`.
    fn run(
        logits: &[f32],
        vocab: usize,
        targets: &[u32],
        scale: f32,
        upstream: f32,
    ) -> [Vec<f32>; 2] {
        let gpu = gpu();
        let rows = targets.len();
        let mut tape = Tape::new(gpu);
        let x = tape.leaf(gpu.tensor_from(&[rows, vocab], logits).unwrap());
        let loss = tape.cross_entropy(x, targets, scale).unwrap();
        assert_eq!(tape.shape(loss), &[1]);
        tape.backward_from(loss, gpu.tensor_from(&[1], &[upstream]).unwrap())
            .unwrap();
        let (lt, dx) = (tape.value(loss).clone(), tape.grad(x).unwrap().clone());
        tape.submit().unwrap();
        [gpu.read(&lt).unwrap(), gpu.read(&dx).unwrap()]
    }

    #[test]
    fn cross_entropy_matches_the_reference_and_finite_differences() {
        for (rows, vocab, logit_scale) in [(3, 1, 1.0), (5, 7, 4.0), (6, 300, 20.0), (70, 9, 2.0)] {
            let logits: Vec<f32> = random_f32(rows * vocab, 30)
                .iter()
                .map(|x| x * logit_scale)
                .collect();
            let mut targets: Vec<u32> = (0..rows).map(|r| ((r * 37 + 5) % vocab) as u32).collect();
            targets[1] = IGNORE;
            let (scale, upstream) = (0.37, -1.7);
            let [loss, dx] = run(&logits, vocab, &targets, scale, upstream);
            let x64 = to_f64(&logits);
            let want = cross_entropy_ref(&x64, &targets, vocab, scale);
            let what = format!("cross-entropy {rows}x{vocab}");
            assert_close(&what, &loss, &[want], 1e-5);
            let fd: Vec<f64> = finite_diff(&x64, |x| cross_entropy_ref(x, &targets, vocab, scale))
                .iter()
                .map(|d| d * upstream as f64)
                .collect();
            assert_close(&format!("{what} dlogits"), &dx, &fd, 1e-4);
            assert!(
                dx[vocab..2 * vocab].iter().all(|&d| d == 0.0),
                "ignored row"
            );
        }
    }

    #[test]
    fn cross_entropy_is_repeatable_and_backward_seeds_one() {
        let gpu = gpu();
        let (rows, vocab) = (257, 33);
        let logits = random_f32(rows * vocab, 31);
        let targets: Vec<u32> = (0..rows).map(|r| (r % vocab) as u32).collect();
        let first = run(&logits, vocab, &targets, 1.0 / rows as f32, 1.0);
        assert_eq!(run(&logits, vocab, &targets, 1.0 / rows as f32, 1.0), first);
        // Tape::backward seeds the scalar with 1: the same gradient as seeding it by hand.
        let mut tape = Tape::new(gpu);
        let x = tape.leaf(gpu.tensor_from(&[rows, vocab], &logits).unwrap());
        let loss = tape.cross_entropy(x, &targets, 1.0 / rows as f32).unwrap();
        tape.backward(loss).unwrap();
        let dx = tape.grad(x).unwrap().clone();
        tape.submit().unwrap();
        assert_eq!(gpu.read(&dx).unwrap(), first[1]);
    }

    #[test]
    fn cross_entropy_rejects_bad_targets_and_shapes() {
        let gpu = gpu();
        let mut tape = Tape::new(gpu);
        let x = tape.leaf(gpu.tensor(&[3, 7]).unwrap());
        let err = tape.cross_entropy(x, &[0, 7, 2], 1.0).unwrap_err();
        assert!(err.to_string().contains("target 7 of row 1"), "{err}");
        assert!(
            tape.cross_entropy(x, &[0, 1], 1.0).is_err(),
            "too few targets"
        );
        assert!(
            tape.cross_entropy(x, &[0, 1, 2, 3], 1.0).is_err(),
            "too many"
        );
        assert!(
            tape.cross_entropy(x, &[0, 1, 2], f32::NAN).is_err(),
            "NaN scale"
        );
        let empty = tape.leaf(gpu.tensor(&[3, 0]).unwrap());
        assert!(
            tape.cross_entropy(empty, &[0, 1, 2], 1.0).is_err(),
            "no vocabulary"
        );
        assert!(tape.cross_entropy(x, &[0, IGNORE, 6], 1.0).is_ok());
    }
}
