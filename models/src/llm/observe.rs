//! Activation statistics of every linear layer's input, gathered during the forward pass for
//! post-training quantization (importance matrices, GPTQ's Hessian, AWQ's scale search, outlier
//! studies).
//!
//! Each layer has four distinct linear inputs ([`Site`]). Their statistics are recorded into
//! the micro-batch's own submit, right after the kernel that produces each input: per-channel
//! sums are zeroed before a micro-batch, read back with its results and accumulated in f64 here;
//! Gram matrices accumulate on the device in f32 and are read once, by
//! [`Session::observations`](crate::llm::Session::observations). The first `capture_rows` input
//! rows of each site are copied out as they go by.

use tessera_runtime::ops::stats::{self, Rows, STATS};
use tessera_runtime::{Gpu, ReadId, Recorder, Tensor};

use crate::llm::LlmError;

/// What a session gathers about the linear inputs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ObserveOptions {
    /// Per-channel sums of x, x^2, |x|, x^3, x^4 and max |x|.
    pub stats: bool,
    /// The Gram matrix `X^T X` of each site (`[width, width]`, f32 on the device).
    pub gram: bool,
    /// Keeps the first this many input rows (tokens) of each site.
    pub capture_rows: usize,
}

/// One of the four distinct linear inputs of a llama layer.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Site {
    /// The attention norm's output: input of `attn_q`, `attn_k` and `attn_v`.
    AttnNorm,
    /// The attention's output: input of `attn_output`.
    Attention,
    /// The FFN norm's output: input of `ffn_gate` and `ffn_up`.
    FfnNorm,
    /// The SwiGLU output: input of `ffn_down`.
    SwiGlu,
}

impl Site {
    pub const ALL: [Site; 4] = [Site::AttnNorm, Site::Attention, Site::FfnNorm, Site::SwiGlu];

    /// A short name for reports.
    pub fn name(self) -> &'static str {
        match self {
            Site::AttnNorm => "attn_norm",
            Site::Attention => "attention",
            Site::FfnNorm => "ffn_norm",
            Site::SwiGlu => "swiglu",
        }
    }

    /// The weights this site feeds, as the middle of their GGUF names.
    pub fn weights(self) -> &'static [&'static str] {
        match self {
            Site::AttnNorm => &["attn_q", "attn_k", "attn_v"],
            Site::Attention => &["attn_output"],
            Site::FfnNorm => &["ffn_gate", "ffn_up"],
            Site::SwiGlu => &["ffn_down"],
        }
    }

    /// The GGUF names of the tensors this site feeds in `layer` (`blk.{layer}.attn_q.weight`..).
    pub fn tensor_names(self, layer: usize) -> Vec<String> {
        self.weights()
            .iter()
            .map(|w| format!("blk.{layer}.{w}.weight"))
            .collect()
    }

    fn index(self) -> usize {
        self as usize
    }
}

/// Per-channel sums over the observed tokens, accumulated in f64.
#[derive(Clone, Debug, PartialEq)]
pub struct ChannelStats {
    pub sum: Vec<f64>,
    pub sum_sq: Vec<f64>,
    pub sum_abs: Vec<f64>,
    pub sum_cube: Vec<f64>,
    pub sum_quad: Vec<f64>,
    pub max_abs: Vec<f64>,
}

impl ChannelStats {
    fn new(width: usize) -> Self {
        let zeros = vec![0.0; width];
        ChannelStats {
            sum: zeros.clone(),
            sum_sq: zeros.clone(),
            sum_abs: zeros.clone(),
            sum_cube: zeros.clone(),
            sum_quad: zeros.clone(),
            max_abs: zeros,
        }
    }

    /// Adds one `[STATS, width]` block as the kernel writes it.
    fn add(&mut self, block: &[f32]) {
        let k = self.sum.len();
        let sums = [
            (&mut self.sum, stats::SUM),
            (&mut self.sum_sq, stats::SUM_SQ),
            (&mut self.sum_abs, stats::SUM_ABS),
            (&mut self.sum_cube, stats::SUM_CUBE),
            (&mut self.sum_quad, stats::SUM_QUAD),
        ];
        for (acc, row) in sums {
            for (a, &v) in acc.iter_mut().zip(&block[row * k..(row + 1) * k]) {
                *a += v as f64;
            }
        }
        let maxima = &block[stats::MAX_ABS * k..(stats::MAX_ABS + 1) * k];
        for (a, &v) in self.max_abs.iter_mut().zip(maxima) {
            *a = a.max(v as f64);
        }
    }

    /// Mean of x^2 per channel over `tokens` (llama.cpp's importance matrix values).
    pub fn mean_sq(&self, tokens: u64) -> Vec<f64> {
        let n = tokens.max(1) as f64;
        self.sum_sq.iter().map(|v| v / n).collect()
    }
}

/// What was gathered at one site of one layer.
#[derive(Clone, Debug, PartialEq)]
pub struct SiteObservation {
    pub layer: usize,
    pub site: Site,
    /// GGUF names of the weights this input feeds.
    pub tensors: Vec<String>,
    /// Channels of the input.
    pub width: usize,
    /// Input rows (tokens) observed.
    pub tokens: u64,
    pub stats: Option<ChannelStats>,
    /// `X^T X`, `[width, width]` row-major.
    pub gram: Option<Vec<f32>>,
    /// The first captured rows, `[captured_rows, width]` row-major.
    pub captured: Vec<f32>,
}

impl SiteObservation {
    pub fn captured_rows(&self) -> usize {
        self.captured.len() / self.width.max(1)
    }
}

/// Everything a session observed, one entry per layer and site in layer order.
#[derive(Clone, Debug, PartialEq)]
pub struct Observations {
    pub sites: Vec<SiteObservation>,
}

impl Observations {
    pub fn site(&self, layer: usize, site: Site) -> Option<&SiteObservation> {
        self.sites
            .iter()
            .find(|s| s.layer == layer && s.site == site)
    }

    /// The site whose input feeds the GGUF tensor `name` (`blk.3.ffn_up.weight`).
    pub fn for_tensor(&self, name: &str) -> Option<&SiteObservation> {
        self.sites
            .iter()
            .find(|s| s.tensors.iter().any(|t| t == name))
    }
}

/// A row range of one site's Gram matrix, in a tensor that fits one storage binding.
struct GramPart {
    row0: usize,
    rows: usize,
    h: Tensor,
}

/// The device buffers and host accumulators of an observing session.
pub(crate) struct Observer {
    options: ObserveOptions,
    widths: [usize; 4],
    /// One `[STATS, width]` block per layer and site, at `stats_offsets[layer * 4 + site]`.
    stats: Option<Tensor>,
    stats_offsets: Vec<usize>,
    grams: Vec<Vec<GramPart>>,
    host: Vec<SiteObservation>,
}

/// What one micro-batch recorded: the reads to absorb after its submit.
pub(crate) struct Pending {
    tokens: usize,
    capture_rows: usize,
    captures: Vec<Tensor>,
    stats_read: Option<ReadId>,
    capture_reads: Vec<ReadId>,
    /// Room for the Gram kernels' transposed rows, shared by every site of the batch.
    gram_scratch: Option<Tensor>,
}

impl Observer {
    /// Allocates the statistics for `n_layer` layers whose sites have `widths` channels.
    pub(crate) fn new(
        gpu: &Gpu,
        options: ObserveOptions,
        n_layer: usize,
        widths: [usize; 4],
    ) -> Result<Self, LlmError> {
        let mut stats_offsets = Vec::with_capacity(n_layer * 4);
        let mut stats_len = 0;
        let mut grams = Vec::new();
        let mut host = Vec::new();
        for layer in 0..n_layer {
            for site in Site::ALL {
                let k = widths[site.index()];
                stats_offsets.push(stats_len);
                stats_len += STATS * k;
                let mut parts = Vec::new();
                if options.gram {
                    let per_part = stats::gram_rows_per_part(gpu, k);
                    for row0 in (0..k).step_by(per_part) {
                        let rows = per_part.min(k - row0);
                        let h = gpu.tensor_from(&[rows, k], &vec![0.0; rows * k])?;
                        parts.push(GramPart { row0, rows, h });
                    }
                }
                grams.push(parts);
                host.push(SiteObservation {
                    layer,
                    site,
                    tensors: site.tensor_names(layer),
                    width: k,
                    tokens: 0,
                    stats: options.stats.then(|| ChannelStats::new(k)),
                    gram: None,
                    captured: Vec::new(),
                });
            }
        }
        let stats = if options.stats && stats_len > 0 {
            Some(gpu.tensor(&[stats_len])?)
        } else {
            None
        };
        Ok(Observer {
            options,
            widths,
            stats,
            stats_offsets,
            grams,
            host,
        })
    }

    /// Prepares a micro-batch of `tokens` rows: zeroes the per-batch sums (a queue write,
    /// ordered before the batch's submit) and makes room for the rows still to capture.
    pub(crate) fn begin(&self, gpu: &Gpu, tokens: usize) -> Result<Pending, LlmError> {
        if let Some(t) = &self.stats {
            gpu.write(t, &vec![0.0; t.len()])?;
        }
        let captured = self.host.first().map_or(0, |s| s.tokens as usize);
        let capture_rows = self
            .options
            .capture_rows
            .saturating_sub(captured)
            .min(tokens);
        let mut captures = Vec::new();
        if capture_rows > 0 {
            for s in &self.host {
                captures.push(gpu.tensor(&[capture_rows, s.width])?);
            }
        }
        // Only CPU devices' Gram kernels transpose.
        let transposes = gpu.kernel_layout() == tessera_runtime::KernelLayout::LanePerRow;
        let gram_rows = self.grams.iter().flatten().map(|p| p.rows).max();
        let gram_rows = gram_rows.filter(|_| transposes);
        let gram_scratch = gram_rows
            .map(|rows| gpu.tensor(&[stats::gram_scratch_len(tokens, rows)]))
            .transpose()?;
        Ok(Pending {
            tokens,
            capture_rows,
            captures,
            gram_scratch,
            stats_read: None,
            capture_reads: Vec::new(),
        })
    }

    /// Records the statistics of `site` of `layer`, whose input is the first `pending.tokens`
    /// rows of `x`; call right after the kernel that writes `x`.
    pub(crate) fn record(
        &self,
        rec: &mut Recorder,
        pending: &Pending,
        layer: usize,
        site: Site,
        x: &Tensor,
    ) -> Result<(), LlmError> {
        let i = layer * 4 + site.index();
        let k = self.widths[site.index()];
        let rows = Rows::dense(pending.tokens, k);
        if let Some(t) = &self.stats {
            stats::channel_stats(rec, x, rows, t, self.stats_offsets[i])?;
        }
        for part in &self.grams[i] {
            let scratch = pending.gram_scratch.as_ref();
            stats::gram(rec, x, rows, &part.h, (part.row0, part.rows), scratch)?;
        }
        if let Some(dst) = pending.captures.get(i) {
            rec.copy(x, 0, dst, 0, pending.capture_rows * k);
        }
        Ok(())
    }

    /// Asks for the batch's sums and captured rows to be read back with its submit.
    pub(crate) fn finish(&self, rec: &mut Recorder, pending: &mut Pending) {
        if let Some(t) = &self.stats {
            pending.stats_read = Some(rec.read(t, 0, t.len()));
        }
        pending.capture_reads = pending
            .captures
            .iter()
            .map(|t| rec.read(t, 0, t.len()))
            .collect();
    }

    /// Accumulates a submitted batch's reads (`bytes`, as `Recorder::submit` returns them).
    pub(crate) fn absorb(&mut self, pending: Pending, bytes: &[Vec<u8>]) -> Result<(), LlmError> {
        let get = |id: ReadId| -> Result<Vec<f32>, LlmError> {
            bytes
                .get(id.index())
                .map(|b| bytemuck::pod_collect_to_vec(b))
                .ok_or_else(|| LlmError::BadConfig("an observation read is missing".into()))
        };
        let block = pending.stats_read.map(get).transpose()?;
        for (i, site) in self.host.iter_mut().enumerate() {
            site.tokens += pending.tokens as u64;
            if let (Some(acc), Some(block)) = (&mut site.stats, &block) {
                let offset = self.stats_offsets[i];
                acc.add(&block[offset..offset + STATS * site.width]);
            }
            if let Some(&id) = pending.capture_reads.get(i) {
                site.captured.extend(get(id)?);
            }
        }
        Ok(())
    }

    /// Everything observed so far, with the Gram matrices read from the device.
    pub(crate) fn observations(&self, gpu: &Gpu) -> Result<Observations, LlmError> {
        let mut sites = self.host.clone();
        for (site, parts) in sites.iter_mut().zip(&self.grams) {
            if parts.is_empty() {
                continue;
            }
            let mut h = Vec::with_capacity(site.width * site.width);
            for part in parts {
                h.extend(gpu.read(&part.h)?);
            }
            stats::mirror_upper(&mut h, site.width);
            site.gram = Some(h);
        }
        Ok(Observations { sites })
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use tessera_runtime::io::gguf::GgufFile;
    use tessera_runtime::ops::stats::{channel_stats_ref, gram_ref};
    use tessera_runtime::testing::{max_rel_err, random_f32};
    use tessera_runtime::{GpuOptions, KernelLayout};

    use super::*;
    use crate::llm::{LlamaModel, Logits, Session};

    const D: usize = 64;
    const FF: usize = 96;
    const HEADS: usize = 2;
    const KV_HEADS: usize = 1;
    const HEAD_DIM: usize = 32;
    const VOCAB: usize = 50;
    const LAYERS: usize = 2;

    fn put_str(out: &mut Vec<u8>, s: &str) {
        out.extend_from_slice(&(s.len() as u64).to_le_bytes());
        out.extend_from_slice(s.as_bytes());
    }

    /// A GGUF v3 file of a tiny llama with random F32 weights (tied output projection).
    fn tiny_llama() -> Vec<u8> {
        let u32s = [
            ("llama.embedding_length", D),
            ("llama.feed_forward_length", FF),
            ("llama.attention.head_count", HEADS),
            ("llama.attention.head_count_kv", KV_HEADS),
            ("llama.block_count", LAYERS),
            ("llama.vocab_size", VOCAB),
            ("llama.context_length", 256),
        ];
        // (name, GGML dims, values); matrices are [rows, cols] with GGML dims [cols, rows].
        let mut tensors: Vec<(String, Vec<usize>, Vec<f32>)> = Vec::new();
        let mut seed = 100;
        let mut add = |name: String, dims: Vec<usize>, scale: f32, bias: f32| {
            seed += 1;
            let n = dims.iter().product();
            let values = random_f32(n, seed)
                .iter()
                .map(|v| v * scale + bias)
                .collect();
            tensors.push((name, dims, values));
        };
        let (dq, dkv) = (HEADS * HEAD_DIM, KV_HEADS * HEAD_DIM);
        add("token_embd.weight".into(), vec![D, VOCAB], 1.0, 0.0);
        add("output_norm.weight".into(), vec![D], 0.2, 1.0);
        for i in 0..LAYERS {
            let name = |s: &str| format!("blk.{i}.{s}.weight");
            add(name("attn_norm"), vec![D], 0.2, 1.0);
            add(name("attn_q"), vec![D, dq], 0.3, 0.0);
            add(name("attn_k"), vec![D, dkv], 0.3, 0.0);
            add(name("attn_v"), vec![D, dkv], 0.3, 0.0);
            add(name("attn_output"), vec![dq, D], 0.2, 0.0);
            add(name("ffn_norm"), vec![D], 0.2, 1.0);
            add(name("ffn_gate"), vec![D, FF], 0.3, 0.0);
            add(name("ffn_up"), vec![D, FF], 0.3, 0.0);
            add(name("ffn_down"), vec![FF, D], 0.2, 0.0);
        }
        let mut out = b"GGUF".to_vec();
        out.extend_from_slice(&3u32.to_le_bytes());
        out.extend_from_slice(&(tensors.len() as u64).to_le_bytes());
        out.extend_from_slice(&(u32s.len() as u64 + 1).to_le_bytes());
        // Value types from the GGUF spec: 4 = UINT32, 8 = STRING.
        put_str(&mut out, "general.architecture");
        out.extend_from_slice(&8u32.to_le_bytes());
        put_str(&mut out, "llama");
        for (key, v) in u32s {
            put_str(&mut out, key);
            out.extend_from_slice(&4u32.to_le_bytes());
            out.extend_from_slice(&(v as u32).to_le_bytes());
        }
        let mut offset = 0u64;
        for (name, dims, values) in &tensors {
            put_str(&mut out, name);
            out.extend_from_slice(&(dims.len() as u32).to_le_bytes());
            for &d in dims {
                out.extend_from_slice(&(d as u64).to_le_bytes());
            }
            out.extend_from_slice(&0u32.to_le_bytes()); // GGML_TYPE_F32
            out.extend_from_slice(&offset.to_le_bytes());
            offset += (values.len() as u64 * 4).div_ceil(32) * 32;
        }
        for (_, _, values) in &tensors {
            out.resize(out.len().div_ceil(32) * 32, 0);
            out.extend_from_slice(bytemuck::cast_slice(values));
        }
        out
    }

    /// The tiny model on a device in `layout`, with storage bindings capped at `max_binding`.
    fn model(layout: KernelLayout, max_binding: Option<u64>) -> LlamaModel {
        let options = GpuOptions {
            layout: Some(layout),
            max_binding_override: max_binding,
            ..Default::default()
        };
        let gpu = Arc::new(Gpu::new(&options).expect("a GPU adapter (lavapipe will do)"));
        let file = GgufFile::from_bytes(tiny_llama()).expect("the tiny model parses");
        LlamaModel::load(gpu, &file).expect("the tiny model loads")
    }

    fn tokens(n: usize) -> Vec<u32> {
        (0..n).map(|i| ((i * 7 + 3) % VOCAB) as u32).collect()
    }

    /// Runs `toks` in three eval calls, one per logits mode, and returns the logits.
    fn run(session: &mut Session, toks: &[u32]) -> Vec<f32> {
        let mut logits = session.eval(&toks[..20], Logits::All).unwrap();
        logits.extend(session.eval(&toks[20..30], Logits::None).unwrap());
        logits.extend(session.eval(&toks[30..], Logits::Last).unwrap());
        logits
    }

    #[test]
    fn eval_last_runs_the_last_token_as_a_decode_step() {
        let m = model(KernelLayout::LanePerRow, None);
        let toks = tokens(5);
        let mut whole = Session::new(&m, 16).unwrap();
        let want = whole.eval(&toks, Logits::Last).unwrap();
        let mut split = Session::new(&m, 16).unwrap();
        let got = split.eval_last(&toks).unwrap();
        assert_eq!(split.n_past(), toks.len());
        let err = max_rel_err(&got, &want);
        assert!(err < 1e-4, "eval_last differs from eval by {err}");
        // The decode kernels are compiled: the next token compiles nothing.
        let compiled = m.gpu().compiled_kernels();
        split.eval(&toks[..1], Logits::Last).unwrap();
        assert_eq!(m.gpu().compiled_kernels(), compiled);
    }

    #[test]
    fn observed_statistics_equal_those_of_the_captured_rows_and_logits_do_not_change() {
        let toks = tokens(37);
        // 32 KiB bindings split the SwiGLU site's 96 x 96 Gram matrix into two row parts.
        for (layout, max_binding) in [
            (KernelLayout::Cooperative, None),
            (KernelLayout::LanePerRow, Some(32 << 10)),
        ] {
            let model = model(layout, max_binding);
            if max_binding.is_some() {
                assert!(stats::gram_rows_per_part(model.gpu(), FF) < FF);
            }
            let mut plain = Session::new(&model, 64).unwrap();
            let want_logits = run(&mut plain, &toks);
            let mut session = Session::new(&model, 64).unwrap();
            assert!(session.observations().is_err(), "not observing yet");
            session
                .observe(ObserveOptions {
                    stats: true,
                    gram: true,
                    capture_rows: 100,
                })
                .unwrap();
            let logits = run(&mut session, &toks);
            let same = logits.len() == want_logits.len()
                && logits
                    .iter()
                    .zip(&want_logits)
                    .all(|(a, b)| a.to_bits() == b.to_bits());
            assert!(same, "{layout:?}: observing changed the logits");

            let obs = session.observations().unwrap();
            assert_eq!(obs.sites.len(), LAYERS * 4);
            for site in &obs.sites {
                let what = format!("{layout:?} layer {} {}", site.layer, site.site.name());
                let k = site.width;
                assert_eq!(site.tokens, toks.len() as u64, "{what}");
                assert_eq!(site.captured_rows(), toks.len(), "{what}");
                let rows = Rows::dense(toks.len(), k);
                let mut want = vec![0.0; STATS * k];
                channel_stats_ref(&site.captured, rows, &mut want);
                let st = site.stats.as_ref().unwrap();
                let got = [
                    &st.sum,
                    &st.sum_sq,
                    &st.sum_abs,
                    &st.sum_cube,
                    &st.sum_quad,
                    &st.max_abs,
                ];
                for (s, got) in got.iter().enumerate() {
                    let want = &want[s * k..(s + 1) * k];
                    let scale = want.iter().fold(1e-30f64, |a, &b| a.max(b.abs()));
                    for (g, w) in got.iter().zip(want) {
                        assert!((g - w).abs() <= 1e-5 * scale, "{what} stat {s}: {g} vs {w}");
                    }
                }
                assert!(st.max_abs.iter().any(|&m| m > 0.0), "{what}: all zero");
                let mut h = vec![0.0; k * k];
                gram_ref(&site.captured, rows, &mut h, 0, k);
                let scale = h.iter().fold(1e-30f64, |a, &b| a.max(b.abs()));
                let gram = site.gram.as_ref().unwrap();
                assert_eq!(gram.len(), k * k);
                for (g, w) in gram.iter().zip(&h) {
                    assert!((*g as f64 - w).abs() <= 1e-5 * scale, "{what} gram");
                }
            }
            // The sites differ from one another, and are found by the tensors they feed.
            let widths: Vec<usize> = Site::ALL
                .iter()
                .map(|&s| obs.site(1, s).unwrap().width)
                .collect();
            assert_eq!(widths, [D, HEADS * HEAD_DIM, D, FF]);
            let down = obs.for_tensor("blk.1.ffn_down.weight").unwrap();
            assert_eq!((down.layer, down.site), (1, Site::SwiGlu));
            let v = obs.for_tensor("blk.0.attn_v.weight").unwrap();
            assert_eq!((v.layer, v.site), (0, Site::AttnNorm));
            assert!(obs.for_tensor("blk.2.attn_v.weight").is_none());
            let (a, b) = (obs.site(0, Site::AttnNorm), obs.site(0, Site::FfnNorm));
            assert_ne!(a.unwrap().captured, b.unwrap().captured);
        }
    }

    #[test]
    fn capture_keeps_only_the_first_rows_and_greedy_steps_are_counted() {
        let model = model(KernelLayout::LanePerRow, None);
        let toks = tokens(37);
        let mut full = Session::new(&model, 64).unwrap();
        full.observe(ObserveOptions {
            capture_rows: 64,
            ..Default::default()
        })
        .unwrap();
        run(&mut full, &toks);
        let mut session = Session::new(&model, 64).unwrap();
        let options = ObserveOptions {
            stats: true,
            gram: false,
            capture_rows: 25,
        };
        session.observe(options).unwrap();
        run(&mut session, &toks);
        let next = session.eval_greedy(&[3]).unwrap();
        assert!((next as usize) < VOCAB);
        let (all, some) = (
            full.observations().unwrap(),
            session.observations().unwrap(),
        );
        for (a, s) in all.sites.iter().zip(&some.sites) {
            assert_eq!(a.tokens, 37);
            assert!(a.stats.is_none() && a.gram.is_none());
            assert_eq!(s.tokens, 38);
            assert!(s.gram.is_none());
            assert_eq!(s.captured_rows(), 25);
            assert_eq!(s.captured[..], a.captured[..25 * a.width]);
        }
        // Layer 0's first site is the attention norm of the token embeddings.
        let file = GgufFile::from_bytes(tiny_llama()).unwrap();
        let f32s = |name: &str| -> Vec<f32> {
            bytemuck::pod_collect_to_vec(file.tensor_data(file.tensor(name).unwrap()))
        };
        let (embd, norm) = (f32s("token_embd.weight"), f32s("blk.0.attn_norm.weight"));
        let site = some.site(0, Site::AttnNorm).unwrap();
        for (t, row) in site.captured.chunks(D).enumerate() {
            let e = &embd[toks[t] as usize * D..][..D];
            let ms = e.iter().map(|&v| v as f64 * v as f64).sum::<f64>() / D as f64;
            let scale = 1.0 / (ms + 1e-5).sqrt();
            for ((&got, &x), &w) in row.iter().zip(e).zip(&norm) {
                let want = x as f64 * scale * w as f64;
                assert!((got as f64 - want).abs() < 1e-4, "row {t}: {got} vs {want}");
            }
        }
        // Observing again starts over.
        session.observe(options).unwrap();
        let fresh = session.observations().unwrap();
        assert!(fresh
            .sites
            .iter()
            .all(|s| s.tokens == 0 && s.captured.is_empty()));
    }
}
