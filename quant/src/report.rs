//! What the `quant` commands print and write: the calibration summary, the evaluation, the
//! outlier study (markdown, JSON and SVG plots) and the sweep table.

use plotters::prelude::*;

use crate::calibrate::CalibrateReport;
use crate::eval::EvalReport;
use crate::stats::ModelStats;

/// `quant calibrate`'s summary.
#[derive(Clone, Debug, serde::Serialize)]
pub struct CalibrateSummary {
    pub input: String,
    pub output: String,
    pub calibration: CalibrateReport,
    /// Calibration tokens run through the model.
    pub tokens: u64,
    pub gather_seconds: f64,
    pub eval: Option<EvalReport>,
    pub seconds: f64,
}

fn mib(b: u64) -> f64 {
    b as f64 / (1024.0 * 1024.0)
}

impl CalibrateSummary {
    pub fn to_text(&self) -> String {
        let c = &self.calibration;
        let mut s = format!(
            "wrote {} ({} {}, from {})\n",
            self.output, c.method, c.target, self.input
        );
        if let Some(h) = &c.converted_from {
            s += &format!(
                "  source is a safetensors folder ({} in {} file(s)): converted to GGUF in \
                 {:.1} s; that is the base\n",
                h.source_dtypes.join(", "),
                h.files,
                h.seconds
            );
        }
        if c.source_was_quantized {
            s += &format!(
                "  source was quantized ({}): dequantized to f32 first; that is the base\n",
                c.source_types.join(", ")
            );
        }
        let before_bpw = c.bytes_before as f64 * 8.0 / c.params.max(1) as f64;
        s += &format!(
            "  size        {:.2} MiB -> {:.2} MiB ({:.2} -> {:.2} bits per weight, {} parameters)\n",
            mib(c.bytes_before),
            mib(c.bytes_after),
            before_bpw,
            c.bpw,
            c.params
        );
        let mut counts: Vec<(String, usize)> = Vec::new();
        for t in &c.tensors {
            match counts.iter_mut().find(|(n, _)| *n == t.to) {
                Some((_, k)) => *k += 1,
                None => counts.push((t.to.clone(), 1)),
            }
        }
        let mix: Vec<String> = counts.iter().map(|(n, k)| format!("{k} {n}")).collect();
        s += &format!("  tensors     {}\n", mix.join(", "));
        let fallbacks = c
            .tensors
            .iter()
            .filter(|t| t.fallback_from.is_some())
            .count();
        if fallbacks > 0 {
            s += &format!(
                "  fallbacks   {fallbacks} tensors whose rows the type's blocks do not divide \
                 (see -v)\n"
            );
        }
        if self.tokens > 0 {
            s += &format!(
                "  calibration {} tokens in {:.1} s\n",
                self.tokens, self.gather_seconds
            );
        }
        if let Some(e) = &self.eval {
            s += &format!("  eval        {}\n", eval_line(e));
        }
        s += &format!("  time        {:.1} s in all", self.seconds);
        s
    }
}

fn eval_line(e: &EvalReport) -> String {
    format!(
        "PPL {:.4} -> {:.4} ({:+.2}%), KL mean {:.5} p99 {:.5}, same top {:.2}%, RMS dp {:.3}% \
         ({} tokens)",
        e.ppl_base,
        e.ppl_quant,
        100.0 * (e.ppl_quant / e.ppl_base - 1.0),
        e.kld_mean,
        e.kld_p99,
        100.0 * e.same_top,
        100.0 * e.rms_dp,
        e.scored
    )
}

/// `quant eval`'s text output, in llama-perplexity's terms.
pub fn eval_text(e: &EvalReport) -> String {
    format!(
        "chunks {} of {} tokens, {} tokens scored\n\
         PPL(base)          {:.4}\n\
         PPL(Q)             {:.4}\n\
         Mean ln(PPL(Q)/PPL(base)) {:.6}\n\
         Mean    KLD        {:.6}\n\
         Median  KLD        {:.6}\n\
         99.0%   KLD        {:.6}\n\
         Maximum KLD        {:.6}\n\
         Same top p         {:.3} %\n\
         RMS dp             {:.3} %",
        e.chunks,
        e.n_ctx,
        e.scored,
        e.ppl_base,
        e.ppl_quant,
        e.mean_ln_ppl_ratio,
        e.kld_mean,
        e.kld_median,
        e.kld_p99,
        e.kld_max,
        100.0 * e.same_top,
        100.0 * e.rms_dp
    )
}

/// One site of one set, summarised.
#[derive(Clone, Debug, serde::Serialize)]
pub struct SiteSummary {
    pub layer: usize,
    pub site: String,
    pub abs_max: f32,
    /// The channel where abs_max is reached.
    pub abs_max_channel: usize,
    pub mean_abs: f64,
    pub mean_sq: f64,
    /// Largest per-channel kurtosis, and the median one.
    pub kurtosis_max: f64,
    pub kurtosis_median: f64,
    /// Channels with |x| past the threshold.
    pub outlier_channels: usize,
    /// Per channel, for JSON readers: abs-max, mean |x|, E[x^2], kurtosis.
    pub channels_abs_max: Vec<f32>,
    pub channels_mean_abs: Vec<f32>,
    pub channels_mean_sq: Vec<f32>,
    pub channels_kurtosis: Vec<f64>,
}

/// The outlier study over several calibration sets.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Study {
    pub threshold: f32,
    pub sets: Vec<(String, u64, Vec<SiteSummary>)>,
}

impl Study {
    pub fn new(sets: &[(String, ModelStats)], threshold: f32) -> Study {
        let sets = sets
            .iter()
            .map(|(name, stats)| {
                let sites = stats
                    .sites
                    .iter()
                    .map(|s| {
                        let (ch, &mx) = s
                            .abs_max
                            .iter()
                            .enumerate()
                            .max_by(|a, b| a.1.total_cmp(b.1))
                            .unwrap_or((0, &0.0));
                        let kurt = s.kurtosis();
                        let mut finite: Vec<f64> =
                            kurt.iter().copied().filter(|k| k.is_finite()).collect();
                        finite.sort_by(|a, b| a.total_cmp(b));
                        let mean_abs = s.mean_abs();
                        let mean_sq = s.mean_sq();
                        SiteSummary {
                            layer: s.layer,
                            site: s.site.clone(),
                            abs_max: mx,
                            abs_max_channel: ch,
                            mean_abs: mean_abs.iter().map(|&v| v as f64).sum::<f64>()
                                / s.k.max(1) as f64,
                            mean_sq: mean_sq.iter().map(|&v| v as f64).sum::<f64>()
                                / s.k.max(1) as f64,
                            kurtosis_max: finite.last().copied().unwrap_or(f64::NAN),
                            kurtosis_median: finite
                                .get(finite.len() / 2)
                                .copied()
                                .unwrap_or(f64::NAN),
                            outlier_channels: s.outliers(threshold),
                            channels_abs_max: s.abs_max.clone(),
                            channels_mean_abs: mean_abs,
                            channels_mean_sq: mean_sq,
                            channels_kurtosis: kurt,
                        }
                    })
                    .collect();
                (name.clone(), stats.tokens(), sites)
            })
            .collect();
        Study { threshold, sets }
    }

    pub fn markdown(&self) -> String {
        let mut s = String::from("# Activation statistics of the linear inputs\n\n");
        s += &format!(
            "Outlier channels: channels whose largest |x| is past {} (LLM.int8's threshold).\n\n",
            self.threshold
        );
        // The overview: outlier channels and the largest |x| per set and site kind.
        s += "| set | tokens | site | outlier channels (sum over layers) | max abs | layer of max | \
              max kurtosis |\n|---|---|---|---|---|---|---|\n";
        for (name, tokens, sites) in &self.sets {
            for kind in site_kinds(sites) {
                let of: Vec<&SiteSummary> = sites.iter().filter(|x| x.site == kind).collect();
                let out: usize = of.iter().map(|x| x.outlier_channels).sum();
                let top = of.iter().max_by(|a, b| a.abs_max.total_cmp(&b.abs_max));
                let kmax = of
                    .iter()
                    .map(|x| x.kurtosis_max)
                    .filter(|k| k.is_finite())
                    .fold(f64::NAN, f64::max);
                if let Some(top) = top {
                    s += &format!(
                        "| {name} | {tokens} | {kind} | {out} | {:.2} | {} (ch {}) | {:.1} |\n",
                        top.abs_max, top.layer, top.abs_max_channel, kmax
                    );
                }
            }
        }
        for (name, _, sites) in &self.sets {
            s += &format!(
                "\n## {name}\n\n| layer | site | abs-max (channel) | mean abs | E[x^2] | \
                           kurtosis max / median | outliers |\n|---|---|---|---|---|---|---|\n"
            );
            for x in sites {
                s += &format!(
                    "| {} | {} | {:.3} ({}) | {:.4} | {:.4} | {:.1} / {:.2} | {} |\n",
                    x.layer,
                    x.site,
                    x.abs_max,
                    x.abs_max_channel,
                    x.mean_abs,
                    x.mean_sq,
                    x.kurtosis_max,
                    x.kurtosis_median,
                    x.outlier_channels
                );
            }
        }
        s
    }

    /// One SVG per set (largest |x| and outlier channels per layer, a line per site), and
    /// `compare.svg` (largest |x| per layer at each site, a line per set).
    pub fn plots(&self) -> Result<Vec<(String, String)>, String> {
        let mut out = Vec::new();
        for (name, _, sites) in &self.sets {
            let mut svg = String::new();
            {
                let root = SVGBackend::with_string(&mut svg, (900, 700)).into_drawing_area();
                root.fill(&WHITE).map_err(|e| e.to_string())?;
                let (top, bottom) = root.split_vertically(350);
                let series: Vec<(String, Points, Points)> = site_kinds(sites)
                    .into_iter()
                    .map(|kind| {
                        let of: Vec<&SiteSummary> =
                            sites.iter().filter(|x| x.site == kind).collect();
                        let mx = of
                            .iter()
                            .map(|x| (x.layer as f64, (x.abs_max as f64).max(1e-3)))
                            .collect();
                        let outl = of
                            .iter()
                            .map(|x| (x.layer as f64, x.outlier_channels as f64))
                            .collect();
                        (kind, mx, outl)
                    })
                    .collect();
                let layers = sites.iter().map(|x| x.layer).max().unwrap_or(0) as f64;
                line_chart(
                    &top,
                    &format!("{name}: largest |x| per layer"),
                    "max |x| (log)",
                    layers,
                    series
                        .iter()
                        .map(|(k, a, _)| (k.clone(), a.clone()))
                        .collect(),
                    true,
                )?;
                line_chart(
                    &bottom,
                    &format!("{name}: channels with |x| > {}", self.threshold),
                    "outlier channels",
                    layers,
                    series
                        .iter()
                        .map(|(k, _, b)| (k.clone(), b.clone()))
                        .collect(),
                    false,
                )?;
                root.present().map_err(|e| e.to_string())?;
            }
            out.push((format!("{}.svg", file_safe(name)), svg));
        }
        if let Some((_, _, first)) = self.sets.first() {
            let kinds = site_kinds(first);
            let mut svg = String::new();
            {
                let height = 300 * kinds.len() as u32;
                let root = SVGBackend::with_string(&mut svg, (900, height)).into_drawing_area();
                root.fill(&WHITE).map_err(|e| e.to_string())?;
                let panels = root.split_evenly((kinds.len(), 1));
                for (panel, kind) in panels.iter().zip(&kinds) {
                    let mut layers = 0.0f64;
                    let series = self
                        .sets
                        .iter()
                        .map(|(name, _, sites)| {
                            let pts: Vec<(f64, f64)> = sites
                                .iter()
                                .filter(|x| &x.site == kind)
                                .map(|x| {
                                    layers = layers.max(x.layer as f64);
                                    (x.layer as f64, (x.abs_max as f64).max(1e-3))
                                })
                                .collect();
                            (name.clone(), pts)
                        })
                        .collect();
                    line_chart(
                        panel,
                        &format!("{kind}: largest |x| per layer, by calibration set"),
                        "max |x| (log)",
                        layers,
                        series,
                        true,
                    )?;
                }
                root.present().map_err(|e| e.to_string())?;
            }
            out.push(("compare.svg".into(), svg));
        }
        Ok(out)
    }
}

/// A calibration set's name as part of a file name: a path's file stem, other characters
/// than letters, digits, `-` and `_` replaced by `_`.
pub fn file_safe(name: &str) -> String {
    let base = std::path::Path::new(name)
        .file_stem()
        .and_then(|s| s.to_str())
        .unwrap_or(name);
    base.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '_'
            }
        })
        .collect()
}

fn site_kinds(sites: &[SiteSummary]) -> Vec<String> {
    let mut kinds: Vec<String> = Vec::new();
    for s in sites {
        if !kinds.contains(&s.site) {
            kinds.push(s.site.clone());
        }
    }
    kinds
}

/// A line's points: (layer, value).
type Points = Vec<(f64, f64)>;

type Area<'a> = DrawingArea<SVGBackend<'a>, plotters::coord::Shift>;

fn line_chart(
    area: &Area,
    title: &str,
    y_label: &str,
    layers: f64,
    series: Vec<(String, Vec<(f64, f64)>)>,
    log_y: bool,
) -> Result<(), String> {
    let err = |e: &dyn std::fmt::Display| e.to_string();
    let ymax = series
        .iter()
        .flat_map(|(_, p)| p.iter().map(|q| q.1))
        .fold(1.0f64, f64::max);
    let ymin = series
        .iter()
        .flat_map(|(_, p)| p.iter().map(|q| q.1))
        .fold(f64::INFINITY, f64::min)
        .min(ymax);
    let mut builder = ChartBuilder::on(area);
    builder
        .caption(title, ("sans-serif", 18))
        .margin(10)
        .x_label_area_size(30)
        .y_label_area_size(60);
    let colors = [&BLUE, &RED, &GREEN, &MAGENTA, &CYAN, &BLACK];
    if log_y {
        let mut chart = builder
            .build_cartesian_2d(
                0f64..layers.max(1.0),
                (ymin.max(1e-3) * 0.8..ymax * 1.25).log_scale(),
            )
            .map_err(|e| err(&e))?;
        chart
            .configure_mesh()
            .x_desc("layer")
            .y_desc(y_label)
            .draw()
            .map_err(|e| err(&e))?;
        for (i, (name, pts)) in series.into_iter().enumerate() {
            let c = colors[i % colors.len()];
            chart
                .draw_series(LineSeries::new(pts, c))
                .map_err(|e| err(&e))?
                .label(name)
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], c));
        }
        chart
            .configure_series_labels()
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .draw()
            .map_err(|e| err(&e))?;
    } else {
        let mut chart = builder
            .build_cartesian_2d(0f64..layers.max(1.0), 0f64..ymax * 1.1)
            .map_err(|e| err(&e))?;
        chart
            .configure_mesh()
            .x_desc("layer")
            .y_desc(y_label)
            .draw()
            .map_err(|e| err(&e))?;
        for (i, (name, pts)) in series.into_iter().enumerate() {
            let c = colors[i % colors.len()];
            chart
                .draw_series(LineSeries::new(pts, c))
                .map_err(|e| err(&e))?
                .label(name)
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], c));
        }
        chart
            .configure_series_labels()
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .draw()
            .map_err(|e| err(&e))?;
    }
    Ok(())
}

/// One row of `quant sweep`'s table.
#[derive(Clone, Debug, serde::Serialize)]
pub struct SweepRow {
    pub set: String,
    pub method: String,
    pub target: String,
    pub bytes: u64,
    pub bpw: f64,
    pub eval: EvalReport,
}

pub fn sweep_markdown(rows: &[SweepRow], scored: usize) -> String {
    let mut s = format!(
        "Evaluated on {scored} held-out tokens against the base.\n\n| type | method | calibration \
         set | MiB | bpw | PPL | dPPL | KL mean | KL p99 | same top |\n\
         |---|---|---|---|---|---|---|---|---|---|\n"
    );
    for r in rows {
        let e = &r.eval;
        s += &format!(
            "| {} | {} | {} | {:.2} | {:.3} | {:.4} | {:+.2}% | {:.5} | {:.5} | {:.2}% |\n",
            r.target,
            r.method,
            r.set,
            mib(r.bytes),
            r.bpw,
            e.ppl_quant,
            100.0 * (e.ppl_quant / e.ppl_base - 1.0),
            e.kld_mean,
            e.kld_p99,
            100.0 * e.same_top
        );
    }
    s
}
