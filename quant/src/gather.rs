//! Calibration statistics: the calibration windows run through the model on the GPU with the
//! forward pass's hooks on (`tessera_models::llm::observe`), and importance matrices read from
//! or written to llama.cpp's files.

use tessera_models::llm::model::LlamaModel;
use tessera_models::llm::observe::ObserveOptions;
use tessera_models::llm::{Logits, Session};
use tessera_runtime::io::gguf::GgufFile;

use crate::imatrix::{Imatrix, ImatrixEntry};
use crate::stats::{ModelStats, SiteStats};
use crate::QuantError;

/// What to gather beyond the per-channel statistics.
#[derive(Clone, Copy, Debug, Default)]
pub struct GatherOptions {
    /// The Gram matrix X^T X of every site (GPTQ).
    pub gram: bool,
    /// Keep this many input rows of every site (AWQ's search).
    pub capture_rows: usize,
}

/// Runs every window from an empty cache and returns the statistics of every linear input.
pub fn gather(
    model: &LlamaModel,
    windows: &[Vec<u32>],
    opts: GatherOptions,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<ModelStats, QuantError> {
    let n_ctx = windows.iter().map(Vec::len).max().unwrap_or(0);
    if n_ctx == 0 {
        return Err(QuantError::Data("no calibration windows to run".into()));
    }
    let mut session = Session::new(model, n_ctx)?;
    session.observe(ObserveOptions {
        stats: true,
        gram: opts.gram,
        capture_rows: opts.capture_rows,
    })?;
    for (i, w) in windows.iter().enumerate() {
        session.reset();
        session.eval(w, Logits::None)?;
        progress(i + 1, windows.len());
    }
    let obs = session.observations()?;
    let sites = obs
        .sites
        .into_iter()
        .map(|o| {
            let k = o.width;
            let mut s = SiteStats {
                layer: o.layer,
                site: o.site.name().to_string(),
                tensors: o.tensors,
                k,
                count: o.tokens,
                gram: o.gram,
                rows: o.captured,
                ..Default::default()
            };
            if let Some(c) = o.stats {
                s.sum = c.sum;
                s.sum_sq = c.sum_sq;
                s.sum_abs = c.sum_abs;
                s.sum_cube = c.sum_cube;
                s.sum_quad = c.sum_quad;
                s.abs_max = c.max_abs.iter().map(|&v| v as f32).collect();
            }
            s
        })
        .collect();
    Ok(ModelStats::new(sites))
}

/// Statistics from an importance matrix: one site per entry, holding only sum x^2 and the
/// count (all the `imatrix` method reads). Entries for tensors the model does not have are an
/// error: the matrix was made for another model.
pub fn stats_from_imatrix(im: &Imatrix, file: &GgufFile) -> Result<ModelStats, QuantError> {
    let mut sites = Vec::new();
    for (name, e) in &im.entries {
        let Some(t) = file.tensor(name) else {
            return Err(QuantError::Data(format!(
                "the importance matrix has an entry for `{name}`, which this model does not have: \
                 it was made for another model"
            )));
        };
        let k = t.dims().first().copied().unwrap_or(0) as usize;
        if e.counts.len() != 1 || e.sum_sq.len() != k {
            return Err(QuantError::Data(format!(
                "the importance matrix's `{name}` has {} values over {} experts, the tensor's \
                 rows {k}: it was made for another model",
                e.sum_sq.len(),
                e.counts.len()
            )));
        }
        if let Some(bad) = e.sum_sq.iter().find(|v| !v.is_finite() || **v < 0.0) {
            return Err(QuantError::Data(format!(
                "the importance matrix's `{name}` holds {bad}, which a sum of squares cannot be: \
                 the file is corrupt; compute it again"
            )));
        }
        // llama-quantize reads sum / count as f32; keep the same quotient.
        let count = e.counts[0].max(1);
        sites.push(SiteStats {
            site: "imatrix".into(),
            tensors: vec![name.clone()],
            k,
            count,
            sum_sq: e
                .importance()
                .iter()
                .map(|&v| v as f64 * count as f64)
                .collect(),
            ..Default::default()
        });
    }
    Ok(ModelStats::new(sites))
}

/// An importance matrix in llama.cpp's form from gathered statistics: an entry per weight.
pub fn imatrix_from_stats(stats: &ModelStats, datasets: &[String], chunk_size: usize) -> Imatrix {
    let mut im = Imatrix {
        datasets: datasets.to_vec(),
        chunk_size: chunk_size as u32,
        chunk_count: (stats.tokens() / chunk_size.max(1) as u64) as u32,
        ..Default::default()
    };
    for s in &stats.sites {
        for t in &s.tensors {
            im.entries.insert(
                t.clone(),
                ImatrixEntry::dense(s.sum_sq.iter().map(|&v| v as f32).collect(), s.count),
            );
        }
    }
    im
}
