//! Embedding lookup of a trained table by token ids, with its backward pass: a scatter-add into
//! the table's gradient made deterministic without atomics (`train_embedding.wgsl`).
//!
//! The ids are known on the CPU, so the forward pass lists, for each table row some id
//! selects, the positions selecting it in increasing order; the backward pass gives each
//! (row, column) one thread that sums those positions' gradients in that order.

use crate::autograd::{Backward, Grads, Tape, Var};
use crate::error::{Result, RuntimeError};
use crate::pipeline::PipelineKey;
use crate::recorder::{split_groups, Recorder};
use crate::tensor::Tensor;

/// Records one dispatch of `entry` over `threads` threads.
fn record(
    rec: &mut Recorder,
    entry: &'static str,
    threads: usize,
    d: usize,
    used: usize,
    buffers: [&Tensor; 3],
) -> Result<()> {
    let params = [threads as u32, d as u32, used as u32, 0];
    let groups = split_groups(rec.gpu(), (threads as u32).div_ceil(256), 1);
    rec.dispatch(
        &PipelineKey::new("train_embedding", entry),
        &params,
        &buffers.map(|t| t.bind()),
        groups,
    )
}

/// The positions of `ids` grouped by the row they select, as `scatter` reads them: for the
/// `used` rows some id selects (ascending), `used + 1` offsets into the positions, then those
/// rows, then the positions (ascending within a row).
fn rows_to_positions(ids: &[u32], vocab: usize) -> (Vec<u32>, usize) {
    let mut count = vec![0u32; vocab];
    for &id in ids {
        count[id as usize] += 1;
    }
    let rows: Vec<u32> = (0..vocab as u32)
        .filter(|&v| count[v as usize] > 0)
        .collect();
    let used = rows.len();
    let mut csr = Vec::with_capacity(2 * used + 1 + ids.len());
    // Where the next position of each row goes, among the positions.
    let mut next = vec![0u32; vocab];
    let mut at = 0;
    csr.push(0);
    for &v in &rows {
        next[v as usize] = at;
        at += count[v as usize];
        csr.push(at);
    }
    csr.extend_from_slice(&rows);
    let start = csr.len();
    csr.resize(start + ids.len(), 0);
    for (position, &id) in ids.iter().enumerate() {
        let slot = &mut next[id as usize];
        csr[start + *slot as usize] = position as u32;
        *slot += 1;
    }
    (csr, used)
}

struct EmbeddingBackward {
    table: Var,
    /// [`rows_to_positions`] on the device (made when the table needs a gradient).
    csr: Option<Tensor>,
    used: usize,
    d: usize,
}

impl Backward for EmbeddingBackward {
    fn backward(&self, g: &mut Grads, dy: &Tensor) -> Result<()> {
        let (Some(dtable), Some(csr)) = (g.grad_of(self.table)?, &self.csr) else {
            return Ok(());
        };
        let threads = self.used * self.d;
        let buffers = [&dtable, dy, csr];
        record(g.rec(), "scatter", threads, self.d, self.used, buffers)
    }
}

impl<'g> Tape<'g> {
    /// The rows of `table` (`[vocab, d]`) selected by `ids`: `[ids.len(), d]`. An id not below
    /// `vocab` is an error naming it.
    pub fn embedding(&mut self, table: Var, ids: &[u32]) -> Result<Var> {
        let (vocab, d) = match *self.shape(table) {
            [vocab, d] if vocab > 0 && d > 0 => (vocab, d),
            _ => {
                return Err(RuntimeError::Shape(format!(
                    "embedding: the table must be [vocab, d] with both above 0, not {:?}",
                    self.shape(table)
                )))
            }
        };
        if ids.is_empty() {
            return Err(RuntimeError::Shape("embedding: no ids to look up".into()));
        }
        if let Some((position, id)) = ids.iter().enumerate().find(|(_, &id)| id as usize >= vocab) {
            return Err(RuntimeError::Shape(format!(
                "embedding: id {id} at position {position} is outside the table's {vocab} rows"
            )));
        }

        // The uploads go into fresh buffers that the tape then holds: nothing it recorded can
        // be using them.
        let n = ids.len();
        let id_tensor = self.alloc(&[n])?;
        self.gpu().write_u32(&id_tensor, ids)?;
        let y = self.alloc(&[n, d])?;
        let tt = self.value(table).clone();
        record(&mut self.rec, "gather", n * d, d, 0, [&y, &tt, &id_tensor])?;

        // The backward pass's lists, only when it will run.
        let mut csr = None;
        let mut used = 0;
        if self.grad_enabled() && self.requires_grad(table) {
            let (lists, rows) = rows_to_positions(ids, vocab);
            let t = self.alloc(&[lists.len()])?;
            self.gpu().write_u32(&t, &lists)?;
            (csr, used) = (Some(t), rows);
        }
        Ok(self.push(y, &[table], || EmbeddingBackward {
            table,
            csr,
            used,
            d,
        }))
    }
}

/// CPU reference: the rows of `table` (`[.., d]`) at `ids`.
pub fn embedding_ref(table: &[f64], d: usize, ids: &[u32]) -> Vec<f64> {
    ids.iter()
        .flat_map(|&id| table[id as usize * d..][..d].iter().copied())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::autograd::check::{assert_close, finite_diff, probe_loss, to_f64};
    use crate::autograd::elementwise::harness::{assert_adds, run};
    use crate::ops::test_util::gpu;
    use crate::testing::random_f32;

    #[test]
    fn the_positions_of_each_used_row_are_listed_in_order() {
        let (csr, used) = rows_to_positions(&[3, 0, 3, 6, 3, 1], 7);
        assert_eq!(used, 4);
        // Offsets, rows 0 1 3 6, then positions: row 0 at 1, row 1 at 5, row 3 at 0 2 4,
        // row 6 at 3.
        assert_eq!(csr, [0, 1, 2, 5, 6, 0, 1, 3, 6, 1, 5, 0, 2, 4, 3]);
    }

    #[test]
    fn embedding_matches_reference_and_sums_repeated_ids() {
        let gpu = gpu();
        for (vocab, d, ids) in [
            (7, 5, vec![3, 0, 3, 6, 3, 1]),
            (3, 130, vec![2, 2, 2]),
            (40, 1, vec![39, 0, 17]),
            (1, 33, vec![0]),
        ] {
            let table = random_f32(vocab * d, 1);
            let r = run(gpu, &[(&[vocab, d], &table, true)], 2, |t, v| {
                t.embedding(v[0], &ids)
            });
            assert_eq!(r.shape, [ids.len(), d]);
            let t64 = to_f64(&table);
            assert_close("embedding", &r.y, &embedding_ref(&t64, d, &ids), 0.0);
            let fd = finite_diff(&t64, |t| probe_loss(&embedding_ref(t, d, &ids), &r.probe));
            let dtable = r.grads[0].as_ref().unwrap();
            assert_close("dtable", dtable, &fd, 1e-4);
            for row in (0..vocab as u32).filter(|v| !ids.contains(v)) {
                let unused = &dtable[row as usize * d..][..d];
                assert!(unused.iter().all(|&v| v == 0.0), "row {row} was not used");
            }
        }
    }

    #[test]
    fn repeated_ids_sum_in_position_order_on_every_run() {
        let gpu = gpu();
        let (vocab, d) = (50, 33);
        let ids: Vec<u32> = (0..500).map(|i| (i * 7 % 13) as u32).collect();
        let table = random_f32(vocab * d, 3);
        let runs: Vec<_> = (0..2)
            .map(|_| {
                run(gpu, &[(&[vocab, d], &table, true)], 4, |t, v| {
                    t.embedding(v[0], &ids)
                })
            })
            .collect();
        let (first, second) = (runs[0].grads[0].as_ref(), runs[1].grads[0].as_ref());
        assert_eq!(first, second);
        // Row 7's gradient is the probe's rows at its positions, summed in f32 in order.
        let mut want = vec![0.0f32; d];
        for (i, _) in ids.iter().enumerate().filter(|(_, &id)| id == 7) {
            for (w, p) in want.iter_mut().zip(&runs[0].probe[i * d..]) {
                *w += p;
            }
        }
        let got = &first.unwrap()[7 * d..][..d];
        let want: Vec<f64> = want.iter().map(|&v| v as f64).collect();
        assert_close("row 7", got, &want, 1e-6);
    }

    #[test]
    fn ids_outside_the_table_and_bad_tables_are_errors() {
        let gpu = gpu();
        let mut tape = Tape::new(gpu);
        let table = tape.upload(&[4, 3], &[0.0; 12]).unwrap();
        let flat = tape.upload(&[12], &[0.0; 12]).unwrap();
        let message = |r: Result<Var>| match r {
            Err(RuntimeError::Shape(m)) => m,
            Err(e) => panic!("not a shape error: {e}"),
            Ok(_) => panic!("accepted"),
        };
        let m = message(tape.embedding(table, &[0, 3, 4, 1]));
        assert!(m.contains("id 4") && m.contains("position 2"), "{m}");
        assert!(message(tape.embedding(flat, &[0])).contains("[12]"));
        assert!(message(tape.embedding(table, &[])).contains("embedding"));
    }

    #[test]
    fn the_gradient_adds_into_what_the_table_already_holds() {
        let table = random_f32(7 * 5, 5);
        assert_adds(gpu(), &[(&[7, 5], &table, true)], |t, v| {
            t.embedding(v[0], &[3, 0, 3, 6, 3, 1])
        });
    }
}
