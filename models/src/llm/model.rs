//! The llama-family graph on the runtime's kernels: weights loaded from GGUF, and a session that
//! holds the KV cache and runs prefill (in micro-batches) and decode.
//!
//! A micro-batch is one submit. Logits are computed only for the positions asked for. A session
//! told to [`observe`](Session::observe) also records statistics of every linear layer's input
//! into that submit (see [`observe`](crate::llm::observe)).

use std::sync::Arc;

use tessera_runtime::io::gguf::GgufFile;
use tessera_runtime::ops::{self, AttentionParams, LinearOut, Normed, Projection, RopeParams};
use tessera_runtime::{dequantize_row, DType, Gpu, KernelLayout, Recorder, Tensor, Weight};

use crate::llm::observe::{Observations, ObserveOptions, Observer, Pending, Site};
use crate::llm::{LlamaConfig, LlmError};

/// Tokens per micro-batch of prefill, as llama.cpp's default `n_ubatch`.
pub const UBATCH: usize = 512;

struct Layer {
    attn_norm: Tensor,
    attn_q: Weight,
    attn_k: Weight,
    attn_v: Weight,
    attn_output: Weight,
    ffn_norm: Tensor,
    ffn_gate: Weight,
    ffn_up: Weight,
    ffn_down: Weight,
}

impl Layer {
    fn matrices(&self) -> [&Weight; 7] {
        [
            &self.attn_q,
            &self.attn_k,
            &self.attn_v,
            &self.attn_output,
            &self.ffn_gate,
            &self.ffn_up,
            &self.ffn_down,
        ]
    }
}

/// One tensor of a loaded model, for size reports.
#[derive(Clone, Copy, Debug)]
pub struct TensorSize {
    pub dtype: DType,
    pub elements: usize,
    pub bytes: usize,
    /// A weight matrix, as opposed to a norm vector.
    pub is_matrix: bool,
}

/// A llama-family model on the device.
pub struct LlamaModel {
    gpu: Arc<Gpu>,
    pub config: LlamaConfig,
    token_embd: Weight,
    /// `None` when the output projection is tied to the token embedding.
    output: Option<Weight>,
    output_norm: Tensor,
    layers: Vec<Layer>,
}

fn check_dims(file: &GgufFile, name: &str, expected: &[u64]) -> Result<(), LlmError> {
    let info = file
        .tensor(name)
        .ok_or_else(|| LlmError::MissingTensor(name.to_string()))?;
    if info.dims() != expected {
        return Err(LlmError::TensorShape {
            name: name.to_string(),
            expected: expected.to_vec(),
            found: info.dims().to_vec(),
        });
    }
    Ok(())
}

fn dtype_of(file: &GgufFile, name: &str) -> Result<DType, LlmError> {
    let info = file
        .tensor(name)
        .ok_or_else(|| LlmError::MissingTensor(name.to_string()))?;
    DType::from_ggml_id(info.ggml_type().id()).ok_or_else(|| LlmError::UnsupportedTensorType {
        name: name.to_string(),
        dtype: info.ggml_type().name().to_string(),
    })
}

/// Uploads the `[rows, cols]` weight `name` (GGML dims `[cols, rows]`).
fn load_weight(
    gpu: &Gpu,
    file: &GgufFile,
    name: &str,
    rows: usize,
    cols: usize,
) -> Result<Weight, LlmError> {
    check_dims(file, name, &[cols as u64, rows as u64])?;
    let dtype = dtype_of(file, name)?;
    let info = file
        .tensor(name)
        .ok_or_else(|| LlmError::MissingTensor(name.to_string()))?;
    Ok(gpu.upload_weight(name, dtype, rows, cols, file.tensor_data(info))?)
}

/// Uploads the 1-D tensor `name` as f32.
fn load_vector(gpu: &Gpu, file: &GgufFile, name: &str, len: usize) -> Result<Tensor, LlmError> {
    check_dims(file, name, &[len as u64])?;
    let dtype = dtype_of(file, name)?;
    let info = file
        .tensor(name)
        .ok_or_else(|| LlmError::MissingTensor(name.to_string()))?;
    let mut values = vec![0.0; len];
    if dtype.block_size() != 1 {
        return Err(LlmError::BadInput(format!(
            "norm weight `{name}` is {}, but norm weights must be F32 or F16; the file was made by \
             a converter Tessera does not know",
            dtype.name()
        )));
    }
    dequantize_row(dtype, file.tensor_data(info), &mut values);
    Ok(gpu.tensor_from(&[len], &values)?)
}

/// Where the model's tensors come from: a GGUF file, or synthetic values made on the device.
trait TensorSource {
    /// The `[rows, cols]` matrix `name` (GGML dims `[cols, rows]`).
    fn weight(&self, gpu: &Gpu, name: &str, rows: usize, cols: usize) -> Result<Weight, LlmError>;
    /// The 1-D tensor `name`, as f32.
    fn vector(&self, gpu: &Gpu, name: &str, len: usize) -> Result<Tensor, LlmError>;
    /// Whether `output.weight` exists; without it the output is tied to the token embedding.
    fn has_output(&self) -> bool;
}

struct GgufSource<'f>(&'f GgufFile);

impl TensorSource for GgufSource<'_> {
    fn weight(&self, gpu: &Gpu, name: &str, rows: usize, cols: usize) -> Result<Weight, LlmError> {
        load_weight(gpu, self.0, name, rows, cols)
    }

    fn vector(&self, gpu: &Gpu, name: &str, len: usize) -> Result<Tensor, LlmError> {
        load_vector(gpu, self.0, name, len)
    }

    fn has_output(&self) -> bool {
        self.0.tensor("output.weight").is_some()
    }
}

/// Random valid blocks for every matrix (a seed per tensor name), ones for every norm.
struct SyntheticSource<F> {
    dtype_of: F,
    seed: u64,
    tied_output: bool,
}

impl<F: Fn(&str, usize) -> DType> TensorSource for SyntheticSource<F> {
    fn weight(&self, gpu: &Gpu, name: &str, rows: usize, cols: usize) -> Result<Weight, LlmError> {
        // FNV-1a of the name, so each tensor has its own pattern.
        let seed = name
            .bytes()
            .fold(0xcbf2_9ce4_8422_2325_u64 ^ self.seed, |h, b| {
                (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
            });
        let dtype = (self.dtype_of)(name, cols);
        Ok(gpu.synthetic_weight(name, dtype, rows, cols, seed)?)
    }

    fn vector(&self, gpu: &Gpu, _name: &str, len: usize) -> Result<Tensor, LlmError> {
        Ok(gpu.tensor_from(&[len], &vec![1.0; len])?)
    }

    fn has_output(&self) -> bool {
        !self.tied_output
    }
}

impl LlamaModel {
    /// Builds the graph's weights from an open GGUF file.
    pub fn load(gpu: Arc<Gpu>, file: &GgufFile) -> Result<Self, LlmError> {
        let config = LlamaConfig::from_gguf(file)?;
        // The block count is checked against the tensors before anything is allocated for it.
        if file
            .tensor(&format!("blk.{}.attn_norm.weight", config.n_layer))
            .is_some()
        {
            return Err(LlmError::BadConfig(format!(
                "the file holds more layers than its block_count ({}) says",
                config.n_layer
            )));
        }
        Self::build(gpu, config, &GgufSource(file))
    }

    /// A model of `config`'s shapes with random weights made on the device (no host upload
    /// beyond a small pattern per matrix), for benchmarks: each matrix in
    /// `dtype_of(name, row_length)`, norms of ones, an output matrix of its own unless
    /// `tied_output`. Its numbers mean nothing; its speed is that of a real model of this shape.
    pub fn synthetic(
        gpu: Arc<Gpu>,
        config: LlamaConfig,
        tied_output: bool,
        seed: u64,
        dtype_of: impl Fn(&str, usize) -> DType,
    ) -> Result<Self, LlmError> {
        config.validate()?;
        let source = SyntheticSource {
            dtype_of,
            seed,
            tied_output,
        };
        Self::build(gpu, config, &source)
    }

    fn build(gpu: Arc<Gpu>, c: LlamaConfig, source: &impl TensorSource) -> Result<Self, LlmError> {
        let (d, ff) = (c.n_embd, c.n_ff);
        let (dq, dkv) = (c.n_head * c.head_dim, c.n_head_kv * c.head_dim);
        let token_embd = source.weight(&gpu, "token_embd.weight", c.n_vocab, d)?;
        let output = match source.has_output() {
            true => Some(source.weight(&gpu, "output.weight", c.n_vocab, d)?),
            false => None,
        };
        let output_norm = source.vector(&gpu, "output_norm.weight", d)?;
        let mut layers = Vec::new();
        for i in 0..c.n_layer {
            let name = |s: &str| format!("blk.{i}.{s}.weight");
            let weight = |s: &str, rows, cols| source.weight(&gpu, &name(s), rows, cols);
            let mut qkv = vec![
                weight("attn_q", dq, d)?,
                weight("attn_k", dkv, d)?,
                weight("attn_v", dkv, d)?,
            ];
            // On CPU devices one kernel projects a decoded token's Q, K and V, from one buffer.
            if gpu.kernel_layout() == KernelLayout::LanePerRow
                && qkv.iter().all(|w| w.dtype.block_size() != 256)
            {
                qkv = gpu.join_weights(&name("attn_qkv"), qkv)?;
            }
            let [attn_q, attn_k, attn_v] = <[Weight; 3]>::try_from(qkv)
                .map_err(|_| LlmError::BadConfig("attention weights lost in joining".into()))?;
            layers.push(Layer {
                attn_norm: source.vector(&gpu, &name("attn_norm"), d)?,
                attn_q,
                attn_k,
                attn_v,
                attn_output: weight("attn_output", d, dq)?,
                ffn_norm: source.vector(&gpu, &name("ffn_norm"), d)?,
                ffn_gate: weight("ffn_gate", ff, d)?,
                ffn_up: weight("ffn_up", ff, d)?,
                ffn_down: weight("ffn_down", d, ff)?,
            });
        }
        log::info!(
            "model: {} layers, width {}, {} heads ({} KV), vocab {}, {:.1} MB of weights",
            c.n_layer,
            d,
            c.n_head,
            c.n_head_kv,
            c.n_vocab,
            1e-6 * Self::weight_bytes_of(&token_embd, &output, &layers) as f64
        );
        Ok(LlamaModel {
            gpu,
            config: c,
            token_embd,
            output,
            output_norm,
            layers,
        })
    }

    /// Every tensor on the device, the norm vectors as F32; a tied output counts once.
    pub fn tensor_sizes(&self) -> Vec<TensorSize> {
        let matrix = |w: &Weight| TensorSize {
            dtype: w.dtype,
            elements: w.rows * w.cols,
            bytes: w.bytes(),
            is_matrix: true,
        };
        let vector = |t: &Tensor| TensorSize {
            dtype: DType::F32,
            elements: t.len(),
            bytes: 4 * t.len(),
            is_matrix: false,
        };
        let mut sizes = vec![matrix(&self.token_embd), vector(&self.output_norm)];
        sizes.extend(self.output.as_ref().map(matrix));
        for l in &self.layers {
            sizes.extend([vector(&l.attn_norm), vector(&l.ffn_norm)]);
            sizes.extend(l.matrices().map(matrix));
        }
        sizes
    }

    fn weight_bytes_of(embd: &Weight, output: &Option<Weight>, layers: &[Layer]) -> usize {
        let per_layer: usize = layers
            .iter()
            .map(|l| l.matrices().iter().map(|w| w.bytes()).sum::<usize>())
            .sum();
        embd.bytes() + output.as_ref().map_or(0, Weight::bytes) + per_layer
    }

    /// Bytes of the matrices a decode step reads (every layer plus the output projection).
    pub fn decode_weight_bytes(&self) -> usize {
        let output = self.output.as_ref().unwrap_or(&self.token_embd).bytes();
        Self::weight_bytes_of(&self.token_embd, &None, &self.layers) - self.token_embd.bytes()
            + output
    }

    pub fn gpu(&self) -> &Arc<Gpu> {
        &self.gpu
    }

    fn output_weight(&self) -> &Weight {
        self.output.as_ref().unwrap_or(&self.token_embd)
    }
}

/// Which positions of a batch need logits.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Logits {
    None,
    Last,
    All,
}

/// Activations of one micro-batch.
struct Scratch {
    ids: Tensor,
    x: Tensor,
    xn: Tensor,
    q: Tensor,
    attn: Tensor,
    gate: Tensor,
    up: Tensor,
    last: Tensor,
    last_norm: Tensor,
    logits_last: Tensor,
    token: Tensor,
}

/// A conversation with the model: its KV cache and position.
pub struct Session<'m> {
    model: &'m LlamaModel,
    n_ctx: usize,
    n_past: usize,
    k_cache: Vec<Tensor>,
    v_cache: Vec<Tensor>,
    scratch: Scratch,
    observer: Option<Observer>,
}

impl<'m> Session<'m> {
    /// A session with room for `n_ctx` tokens.
    pub fn new(model: &'m LlamaModel, n_ctx: usize) -> Result<Self, LlmError> {
        let c = &model.config;
        let gpu = &model.gpu;
        let n_ctx = n_ctx.max(1);
        let dkv = c.n_head_kv * c.head_dim;
        let dq = c.n_head * c.head_dim;
        let u = UBATCH.min(n_ctx);
        let mut k_cache = Vec::with_capacity(c.n_layer);
        let mut v_cache = Vec::with_capacity(c.n_layer);
        for _ in 0..c.n_layer {
            k_cache.push(gpu.tensor(&[n_ctx, dkv])?);
            v_cache.push(gpu.tensor(&[n_ctx, dkv])?);
        }
        let scratch = Scratch {
            ids: gpu.tensor(&[u])?,
            x: gpu.tensor(&[u, c.n_embd])?,
            xn: gpu.tensor(&[u, c.n_embd])?,
            q: gpu.tensor(&[u, dq])?,
            attn: gpu.tensor(&[u, dq])?,
            gate: gpu.tensor(&[u, c.n_ff])?,
            up: gpu.tensor(&[u, c.n_ff])?,
            last: gpu.tensor(&[c.n_embd])?,
            last_norm: gpu.tensor(&[c.n_embd])?,
            logits_last: gpu.tensor(&[c.n_vocab])?,
            token: gpu.tensor(&[1])?,
        };
        Ok(Session {
            model,
            n_ctx,
            n_past: 0,
            k_cache,
            v_cache,
            scratch,
            observer: None,
        })
    }

    /// Starts gathering statistics of every linear layer's input from the next `eval` on,
    /// forgetting what an earlier `observe` gathered.
    pub fn observe(&mut self, options: ObserveOptions) -> Result<(), LlmError> {
        let c = &self.model.config;
        let dq = c.n_head * c.head_dim;
        let mut widths = [0; 4];
        for site in Site::ALL {
            widths[site as usize] = match site {
                Site::AttnNorm | Site::FfnNorm => c.n_embd,
                Site::Attention => dq,
                Site::SwiGlu => c.n_ff,
            };
        }
        self.observer = Some(Observer::new(&self.model.gpu, options, c.n_layer, widths)?);
        Ok(())
    }

    /// What the session observed since [`observe`](Self::observe), keyed by layer and site.
    pub fn observations(&self) -> Result<Observations, LlmError> {
        match &self.observer {
            Some(o) => o.observations(&self.model.gpu),
            None => Err(LlmError::BadInput(
                "the session is not observing: call observe before eval".into(),
            )),
        }
    }

    /// Accumulates what a submitted micro-batch observed.
    fn absorb(&mut self, pending: Option<Pending>, bytes: &[Vec<u8>]) -> Result<(), LlmError> {
        match (&mut self.observer, pending) {
            (Some(o), Some(p)) => o.absorb(p, bytes),
            _ => Ok(()),
        }
    }

    pub fn n_ctx(&self) -> usize {
        self.n_ctx
    }

    pub fn model(&self) -> &LlamaModel {
        self.model
    }

    /// Tokens already in the cache.
    pub fn n_past(&self) -> usize {
        self.n_past
    }

    /// Forgets the cache; the next batch starts at position 0.
    pub fn reset(&mut self) {
        self.n_past = 0;
    }

    fn check_fits(&self, tokens: &[u32]) -> Result<(), LlmError> {
        if self.n_past + tokens.len() > self.n_ctx {
            return Err(LlmError::ContextFull {
                tokens: tokens.len(),
                n_past: self.n_past,
                n_ctx: self.n_ctx,
                n_ctx_train: self.model.config.n_ctx_train,
            });
        }
        let n_vocab = self.model.config.n_vocab;
        if let Some(&id) = tokens.iter().find(|&&id| id as usize >= n_vocab) {
            return Err(LlmError::BadToken { id, n_vocab });
        }
        Ok(())
    }

    /// Runs `tokens` through the model after what is cached, and returns the logits asked for:
    /// `[n_vocab]` for `Last`, `[tokens.len(), n_vocab]` for `All`, nothing for `None`.
    pub fn eval(&mut self, tokens: &[u32], logits: Logits) -> Result<Vec<f32>, LlmError> {
        self.check_fits(tokens)?;
        let n_vocab = self.model.config.n_vocab;
        let mut out = Vec::new();
        let chunks: Vec<&[u32]> = tokens.chunks(self.scratch.ids.len()).collect();
        for (i, chunk) in chunks.iter().enumerate() {
            let is_last = i + 1 == chunks.len();
            let gpu = &self.model.gpu;
            let mut rec = Recorder::new(gpu);
            let mut pending = self.record_batch(&mut rec, chunk)?;
            match logits {
                Logits::All => {
                    // The logits of a batch may exceed one binding: project them in row slices.
                    let rows = chunk.len();
                    let max_rows = (gpu.max_binding_size() as usize / (4 * n_vocab)).clamp(1, rows);
                    let logits_t = gpu.tensor(&[max_rows, n_vocab])?;
                    let c = &self.model.config;
                    ops::rmsnorm(
                        &mut rec,
                        &self.scratch.x,
                        &self.model.output_norm,
                        &self.scratch.xn,
                        rows,
                        c.n_embd,
                        c.rms_eps,
                    )?;
                    for start in (0..rows).step_by(max_rows) {
                        let n = max_rows.min(rows - start);
                        let layout = LinearOut {
                            x_offset: start * c.n_embd,
                            ..LinearOut::dense(n_vocab)
                        };
                        ops::linear(
                            &mut rec,
                            self.model.output_weight(),
                            &self.scratch.xn,
                            n,
                            &logits_t,
                            layout,
                        )?;
                        let id = rec.read(&logits_t, 0, n * n_vocab);
                        let bytes = std::mem::replace(&mut rec, Recorder::new(gpu)).submit()?;
                        // The batch's observations ride on its first submit.
                        self.absorb(pending.take(), &bytes)?;
                        out.extend_from_slice(
                            bytemuck::pod_collect_to_vec::<u8, f32>(&bytes[id.index()]).as_slice(),
                        );
                    }
                }
                Logits::Last if is_last => {
                    self.record_logits_last(&mut rec, chunk.len())?;
                    let id = rec.read(&self.scratch.logits_last, 0, n_vocab);
                    let bytes = rec.submit()?;
                    out = bytemuck::pod_collect_to_vec(&bytes[id.index()]);
                    self.absorb(pending, &bytes)?;
                }
                _ => {
                    let bytes = rec.submit()?;
                    self.absorb(pending, &bytes)?;
                }
            }
            self.n_past += chunk.len();
        }
        Ok(out)
    }

    /// Runs `tokens` and returns the last one's logits, `[n_vocab]`, that token run alone as a
    /// decode step (as [`Self::eval_greedy`] runs it): the kernels of decoding are then compiled
    /// here, with the prompt, and not in the first step a caller times as decoding.
    pub fn eval_last(&mut self, tokens: &[u32]) -> Result<Vec<f32>, LlmError> {
        let last = self.eval_all_but_last(tokens)?;
        self.eval(last, Logits::Last)
    }

    /// Runs all of `tokens` but the last (without logits) and returns the last, to be run alone.
    fn eval_all_but_last<'t>(&mut self, tokens: &'t [u32]) -> Result<&'t [u32], LlmError> {
        let (head, last) = tokens.split_at(tokens.len().saturating_sub(1));
        if !head.is_empty() {
            self.eval(head, Logits::None)?;
        }
        Ok(last)
    }

    /// Runs `tokens` and returns the argmax of the last position's logits, computed on the
    /// device so only the token id is read back.
    pub fn eval_greedy(&mut self, tokens: &[u32]) -> Result<u32, LlmError> {
        if tokens.is_empty() {
            return Err(LlmError::BadConfig("no tokens to evaluate".into()));
        }
        let tail = self.eval_all_but_last(tokens)?;
        self.check_fits(tail)?;
        let n_vocab = self.model.config.n_vocab;
        let mut rec = Recorder::new(&self.model.gpu);
        let pending = self.record_batch(&mut rec, tail)?;
        self.record_logits_last(&mut rec, 1)?;
        let s = &self.scratch;
        ops::argmax(&mut rec, &s.logits_last, 0, 1, n_vocab, &s.token)?;
        let id = rec.read(&s.token, 0, 1);
        let bytes = rec.submit()?;
        self.absorb(pending, &bytes)?;
        self.n_past += 1;
        let token: Vec<u32> = bytemuck::pod_collect_to_vec(&bytes[id.index()]);
        token
            .first()
            .copied()
            .ok_or_else(|| LlmError::BadConfig("empty readback".into()))
    }

    /// Records the layers for one micro-batch at position `n_past`, with the observations of an
    /// observing session (absorb them from the submit's reads).
    fn record_batch(
        &self,
        rec: &mut Recorder,
        tokens: &[u32],
    ) -> Result<Option<Pending>, LlmError> {
        let m = &self.model;
        let c = &m.config;
        let s = &self.scratch;
        let gpu = &m.gpu;
        let n = tokens.len();
        let pos0 = self.n_past;
        let d = c.n_embd;
        let (dq, dkv) = (c.n_head * c.head_dim, c.n_head_kv * c.head_dim);

        gpu.write_u32(&s.ids, tokens)?;
        let observer = self.observer.as_ref();
        let mut pending = observer.map(|o| o.begin(gpu, n)).transpose()?;
        let observe =
            |rec: &mut Recorder, l: usize, site: Site, x: &Tensor| match (observer, &pending) {
                (Some(o), Some(p)) => o.record(rec, p, l, site, x),
                _ => Ok(()),
            };
        // Where the observer needs the norm's output, runs and observes it (into the input's
        // scratch) and says so; otherwise the projections run the norm themselves where the
        // device lets them (decoding).
        let observed_norm = |rec: &mut Recorder, l: usize, site: Site, input: &Normed| {
            if observer.is_none() {
                return Ok::<_, LlmError>(false);
            }
            let xn = input.run(rec, n)?;
            observe(rec, l, site, xn)?;
            Ok(true)
        };
        ops::embedding(rec, &m.token_embd, &s.ids, n, &s.x)?;
        let rope = |heads: usize, offset: usize, stride: usize| RopeParams {
            heads,
            head_dim: c.head_dim,
            n_rot: c.n_rot,
            layout: c.rope_layout,
            base: c.rope_base,
            pos0,
            tokens: n,
            offset,
            stride,
        };
        let attention = AttentionParams {
            n_head: c.n_head,
            n_kv_head: c.n_head_kv,
            head_dim: c.head_dim,
            pos0,
            tokens: n,
            kv_len: pos0 + n,
            causal: true,
            scale: 1.0 / (c.head_dim as f32).sqrt(),
        };
        let residual = LinearOut {
            x_offset: 0,
            offset: 0,
            stride: d,
            accumulate: true,
        };
        let to_cache = LinearOut {
            x_offset: 0,
            offset: pos0 * dkv,
            stride: dkv,
            accumulate: false,
        };

        for (l, layer) in m.layers.iter().enumerate() {
            let (kc, vc) = (&self.k_cache[l], &self.v_cache[l]);
            // Attention: K and V are written straight into the cache, then rotated there (in the
            // projection's kernel where the device has one).
            let attn_in = Normed {
                x: &s.x,
                weight: &layer.attn_norm,
                eps: c.rms_eps,
                scratch: &s.xn,
            };
            let (q_rope, k_rope) = (rope(c.n_head, 0, dq), rope(c.n_head_kv, pos0 * dkv, dkv));
            let q = Projection {
                w: &layer.attn_q,
                y: &s.q,
                out: LinearOut::dense(dq),
                rope: Some(&q_rope),
            };
            let k = Projection {
                w: &layer.attn_k,
                y: kc,
                out: to_cache,
                rope: Some(&k_rope),
            };
            let v = Projection {
                w: &layer.attn_v,
                y: vc,
                out: to_cache,
                rope: None,
            };
            if observed_norm(rec, l, Site::AttnNorm, &attn_in)? {
                ops::linear_qkv(rec, attn_in.scratch, n, q, k, v)?;
            } else {
                ops::rmsnorm_qkv(rec, attn_in, n, q, k, v)?;
            }
            ops::attention(rec, &s.q, kc, vc, &s.attn, &attention)?;
            observe(rec, l, Site::Attention, &s.attn)?;
            ops::linear(rec, &layer.attn_output, &s.attn, n, &s.x, residual)?;

            // Feed-forward: SwiGLU, its down projection added into the residual stream.
            // One kernel for the norm, gate, up and SwiGLU where the device has it (decoding).
            let ffn_in = Normed {
                x: &s.x,
                weight: &layer.ffn_norm,
                eps: c.rms_eps,
                scratch: &s.xn,
            };
            let (gate, up) = (&layer.ffn_gate, &layer.ffn_up);
            if observed_norm(rec, l, Site::FfnNorm, &ffn_in)? {
                ops::gate_up_swiglu(rec, gate, up, ffn_in.scratch, n, &s.gate, &s.up)?;
            } else {
                ops::rmsnorm_gate_up_swiglu(rec, gate, up, ffn_in, n, &s.gate, &s.up)?;
            }
            observe(rec, l, Site::SwiGlu, &s.gate)?;
            ops::linear(rec, &layer.ffn_down, &s.gate, n, &s.x, residual)?;
        }
        if let (Some(o), Some(p)) = (observer, &mut pending) {
            o.finish(rec, p);
        }
        Ok(pending)
    }

    /// Records the output norm and projection of the batch's last row into `logits_last`.
    fn record_logits_last(&self, rec: &mut Recorder, n: usize) -> Result<(), LlmError> {
        let m = &self.model;
        let c = &m.config;
        let s = &self.scratch;
        rec.copy(&s.x, (n - 1) * c.n_embd, &s.last, 0, c.n_embd);
        ops::rmsnorm(
            rec,
            &s.last,
            &m.output_norm,
            &s.last_norm,
            1,
            c.n_embd,
            c.rms_eps,
        )?;
        ops::linear(
            rec,
            m.output_weight(),
            &s.last_norm,
            1,
            &s.logits_last,
            LinearOut::dense(c.n_vocab),
        )?;
        Ok(())
    }
}
