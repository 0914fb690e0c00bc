//! Training text as bytes: a training split and a held-out split, random training batches and
//! fixed validation batches.

use std::path::Path;

use rand::{Rng, SeedableRng};

use super::{Result, TrainError};

/// A text split into training and held-out bytes.
pub struct Corpus {
    pub train: Vec<u8>,
    pub val: Vec<u8>,
}

/// One batch: `batch` sequences of `seq` input bytes and, for each, the next bytes as targets.
pub struct Batch {
    pub inputs: Vec<u32>,
    pub targets: Vec<u32>,
}

impl Corpus {
    /// The first `1 - held_out` of `text` for training, the rest held out; the cut moves back
    /// to the start of its line where one is within 4 KiB (tinyshakespeare's held-out tenth
    /// then starts at byte 1,003,836, as the built-in `heldout-en` text does).
    pub fn split(text: Vec<u8>, held_out: f64) -> Corpus {
        let cut = ((text.len() as f64) * (1.0 - held_out)).floor() as usize;
        let near = cut.saturating_sub(4096);
        let cut = match text[near..cut].iter().rposition(|&b| b == b'\n') {
            Some(i) if near + i > 0 => near + i + 1,
            _ => cut,
        };
        let mut train = text;
        let val = train.split_off(cut.min(train.len()));
        Corpus { train, val }
    }

    /// Reads a file and holds out its last 10%.
    pub fn from_file(path: &Path) -> Result<Corpus> {
        let text = std::fs::read(path).map_err(|source| TrainError::Io {
            what: format!("reading {}", path.display()),
            source,
        })?;
        Ok(Corpus::split(text, 0.1))
    }

    /// Fails unless both splits hold at least one sequence of `seq` bytes and its targets.
    pub fn check(&self, seq: usize, what: &str) -> Result<()> {
        for (split, bytes) in [("training", &self.train), ("held-out", &self.val)] {
            if bytes.len() < seq + 1 {
                return Err(TrainError::Data(format!(
                    "{what}: its {split} part has {} bytes, fewer than one sequence of {seq} \
                     bytes and its next byte; give a longer text (the last 10% is held out) or \
                     a shorter --seq-len",
                    bytes.len()
                )));
            }
        }
        Ok(())
    }

    /// The training batch of `step`: sequences at random offsets drawn from a generator seeded
    /// by (`seed`, `step`), so a resumed run draws the same batches as an uninterrupted one.
    pub fn train_batch(&self, seed: u64, step: u64, batch: usize, seq: usize) -> Batch {
        let mut rng =
            rand::rngs::StdRng::seed_from_u64(seed ^ step.wrapping_mul(0x9E37_79B9_7F4A_7C15));
        let starts: Vec<usize> = (0..batch)
            .map(|_| rng.random_range(0..=self.train.len() - seq - 1))
            .collect();
        make_batch(&self.train, &starts, seq)
    }

    /// Held-out batch `i` of `n`: sequences at offsets spread evenly over the held-out bytes.
    pub fn val_batch(&self, i: usize, n: usize, batch: usize, seq: usize) -> Batch {
        let span = self.val.len() - seq - 1;
        let total = (n * batch).max(1);
        let starts: Vec<usize> = (0..batch).map(|b| (i * batch + b) * span / total).collect();
        make_batch(&self.val, &starts, seq)
    }
}

fn make_batch(bytes: &[u8], starts: &[usize], seq: usize) -> Batch {
    let mut inputs = Vec::with_capacity(starts.len() * seq);
    let mut targets = Vec::with_capacity(starts.len() * seq);
    for &s in starts {
        inputs.extend(bytes[s..s + seq].iter().map(|&b| b as u32));
        targets.extend(bytes[s + 1..s + seq + 1].iter().map(|&b| b as u32));
    }
    Batch { inputs, targets }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batches_are_shifted_by_one_and_repeatable() {
        let c = Corpus::split((0..=255u8).cycle().take(5000).collect(), 0.1);
        // The cut moves back to the line start after byte 4362 ('\n' is byte 10 of each 256).
        assert_eq!(c.train.len(), 4363);
        assert_eq!(c.val.len(), 637);
        let a = c.train_batch(7, 3, 4, 16);
        assert_eq!(a.inputs.len(), 64);
        for (x, y) in a.inputs.iter().zip(&a.targets) {
            assert_eq!((x + 1) % 256, *y);
        }
        assert_eq!(a.inputs, c.train_batch(7, 3, 4, 16).inputs);
        assert_ne!(a.inputs, c.train_batch(7, 4, 4, 16).inputs);
        let v = c.val_batch(1, 2, 3, 10);
        assert_eq!(v.targets.len(), 30);
        assert!(c.check(636, "t").is_ok());
        assert!(c.check(637, "t").is_err());
        let plain = Corpus::split(vec![b'a'; 100], 0.1);
        assert_eq!((plain.train.len(), plain.val.len()), (90, 10));
        // One line break far before the cut: the byte cut stands.
        let mut one_line = vec![b'a'; 100_000];
        one_line[1] = b'\n';
        let c = Corpus::split(one_line, 0.1);
        assert_eq!(c.train.len(), 90_000);
    }
}
