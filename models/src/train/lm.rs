//! The trained model: a llama-family transformer over bytes, built on the autograd tape.
//!
//! Its graph is the inference path's (`llm::model`): RMSNorm, q/k/v projections, RoPE on
//! adjacent pairs (GGML's llama layout), causal grouped attention, SwiGLU, untied output. Its
//! parameters carry GGUF's names and `[out, in]` layouts, so a checkpoint converts to a GGUF that
//! the inference code runs unchanged.

use rand::{Rng, SeedableRng};
use tessera_runtime::autograd::attention::AttentionShape;
use tessera_runtime::autograd::{Param, Tape, Var};
use tessera_runtime::Gpu;

use super::{Result, TrainError};

/// The model's shape.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct LmConfig {
    pub dim: usize,
    pub n_layers: usize,
    pub n_heads: usize,
    pub n_kv_heads: usize,
    pub ffn: usize,
    pub vocab: usize,
    /// Context: the training sequence length and the model's context length.
    pub ctx: usize,
    pub rope_theta: f32,
    pub eps: f32,
}

/// The longest context (sequence length) a model may have.
pub const MAX_CTX: usize = 8192;

/// Named sizes: (name, dim, layers, heads, ffn).
const PRESETS: &[(&str, usize, usize, usize, usize)] = &[
    ("tiny", 32, 2, 2, 96),
    ("1m", 128, 4, 4, 384),
    ("4m", 256, 5, 8, 704),
];

impl LmConfig {
    /// A named size (`tiny`, `1m`, `4m`) with a byte vocabulary and context `ctx`.
    pub fn preset(name: &str, ctx: usize) -> Result<LmConfig> {
        let &(_, dim, n_layers, n_heads, ffn) =
            PRESETS.iter().find(|p| p.0 == name).ok_or_else(|| {
                let names: Vec<&str> = PRESETS.iter().map(|p| p.0).collect();
                TrainError::Config(format!(
                    "no model size `{name}`; the sizes are {}",
                    names.join(", ")
                ))
            })?;
        let c = LmConfig {
            dim,
            n_layers,
            n_heads,
            n_kv_heads: n_heads,
            ffn,
            vocab: 256,
            ctx,
            rope_theta: 10000.0,
            eps: 1e-5,
        };
        c.check()?;
        Ok(c)
    }

    pub fn preset_names() -> Vec<&'static str> {
        PRESETS.iter().map(|p| p.0).collect()
    }

    pub fn head_dim(&self) -> usize {
        self.dim / self.n_heads
    }

    /// Fails on shapes the kernels cannot take.
    pub fn check(&self) -> Result<()> {
        let bad = |m: String| Err(TrainError::Config(m));
        if !(2..=MAX_CTX).contains(&self.ctx) {
            return bad(format!(
                "a context (--seq-len) of {} bytes: it must be 2 to {MAX_CTX}",
                self.ctx
            ));
        }
        if self.dim == 0 || self.n_layers == 0 || self.ffn == 0 {
            return bad(format!(
                "a model size is zero: dim {}, {} layers, ffn {}",
                self.dim, self.n_layers, self.ffn
            ));
        }
        if self.n_heads == 0
            || !self.dim.is_multiple_of(self.n_heads)
            || !self.head_dim().is_multiple_of(2)
        {
            return bad(format!(
                "dim {} must split into {} heads of an even size",
                self.dim, self.n_heads
            ));
        }
        if self.n_kv_heads == 0 || !self.n_heads.is_multiple_of(self.n_kv_heads) {
            return bad(format!(
                "{} kv heads do not divide {} heads",
                self.n_kv_heads, self.n_heads
            ));
        }
        if self.vocab == 0 || self.vocab > 256 {
            return bad("the vocabulary is bytes: 1 to 256 tokens".into());
        }
        Ok(())
    }

    /// Every parameter's GGUF name and shape (`[out, in]` for matrices), in a fixed order.
    pub fn param_shapes(&self) -> Vec<(String, Vec<usize>)> {
        let (d, f, hd) = (self.dim, self.ffn, self.head_dim());
        let kv = self.n_kv_heads * hd;
        let mut list = vec![("token_embd.weight".to_string(), vec![self.vocab, d])];
        for i in 0..self.n_layers {
            let l = |n: &str, s: Vec<usize>| (format!("blk.{i}.{n}.weight"), s);
            list.extend([
                l("attn_norm", vec![d]),
                l("attn_q", vec![d, d]),
                l("attn_k", vec![kv, d]),
                l("attn_v", vec![kv, d]),
                l("attn_output", vec![d, d]),
                l("ffn_norm", vec![d]),
                l("ffn_gate", vec![f, d]),
                l("ffn_up", vec![f, d]),
                l("ffn_down", vec![d, f]),
            ]);
        }
        list.push(("output_norm.weight".into(), vec![d]));
        list.push(("output.weight".into(), vec![self.vocab, d]));
        list
    }

    pub fn n_params(&self) -> usize {
        self.param_shapes()
            .iter()
            .map(|(_, s)| s.iter().product::<usize>())
            .sum()
    }
}

/// The model's parameters on the device.
pub struct LmModel {
    pub config: LmConfig,
    pub params: Vec<Param>,
}

/// Indices into `params` of one layer's tensors, in `param_shapes` order.
const PER_LAYER: usize = 9;

impl LmModel {
    /// A freshly initialised model: matrices and the embedding from N(0, 0.02), the projections
    /// into the residual stream (attn_output, ffn_down) from N(0, 0.02 / sqrt(2 layers)), norm
    /// gains 1 (GPT-2's scheme).
    pub fn init(gpu: &Gpu, config: LmConfig, seed: u64) -> Result<LmModel> {
        config.check()?;
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let residual_std = 0.02 / (2.0 * config.n_layers as f64).sqrt();
        let values = config
            .param_shapes()
            .into_iter()
            .map(|(name, shape)| {
                let n: usize = shape.iter().product();
                let data = if shape.len() == 1 {
                    vec![1.0; n]
                } else {
                    let std = if name.ends_with("attn_output.weight")
                        || name.ends_with("ffn_down.weight")
                    {
                        residual_std
                    } else {
                        0.02
                    };
                    (0..n).map(|_| (normal(&mut rng) * std) as f32).collect()
                };
                (name, data)
            })
            .collect();
        Self::from_values(gpu, config, values)
    }

    /// A model holding the given values, which must be every parameter of `config`, in order.
    pub fn from_values(
        gpu: &Gpu,
        config: LmConfig,
        values: Vec<(String, Vec<f32>)>,
    ) -> Result<LmModel> {
        config.check()?;
        let shapes = config.param_shapes();
        if values.len() != shapes.len() {
            return Err(TrainError::Config(format!(
                "{} tensors given for a model of {}",
                values.len(),
                shapes.len()
            )));
        }
        let mut params = Vec::with_capacity(shapes.len());
        for ((name, shape), (given, data)) in shapes.iter().zip(values) {
            if *name != given || data.len() != shape.iter().product::<usize>() {
                return Err(TrainError::Config(format!(
                    "tensor {given} with {} values where {name} {shape:?} belongs",
                    data.len()
                )));
            }
            params.push(Param::new(gpu, name, shape, &data)?);
        }
        Ok(LmModel { config, params })
    }

    /// The parameters as references, for optimizers.
    pub fn param_refs(&self) -> Vec<&Param> {
        self.params.iter().collect()
    }

    /// Logits `[batch * seq, vocab]` for `ids` (`batch` sequences of `seq` bytes).
    pub fn forward(&self, tape: &mut Tape, ids: &[u32], batch: usize, seq: usize) -> Result<Var> {
        let c = &self.config;
        if ids.len() != batch * seq || seq > c.ctx || seq == 0 {
            return Err(TrainError::Config(format!(
                "{} ids for {batch} sequences of {seq} (context {})",
                ids.len(),
                c.ctx
            )));
        }
        let hd = c.head_dim();
        let positions: Vec<u32> = (0..batch * seq).map(|i| (i % seq) as u32).collect();
        let shape = AttentionShape {
            batch,
            seq,
            heads: c.n_heads,
            kv_heads: c.n_kv_heads,
            head_dim: hd,
            causal: true,
        };
        let p: Vec<Var> = self.params.iter().map(|p| tape.param(p)).collect();
        let mut x = tape.embedding(p[0], ids)?;
        for layer in 0..c.n_layers {
            let w = &p[1 + layer * PER_LAYER..1 + (layer + 1) * PER_LAYER];
            let h = tape.rmsnorm(x, w[0], c.eps)?;
            let q = tape.linear(h, w[1])?;
            let k = tape.linear(h, w[2])?;
            let v = tape.linear(h, w[3])?;
            let q = tape.rope(q, hd, &positions, c.rope_theta)?;
            let k = tape.rope(k, hd, &positions, c.rope_theta)?;
            let a = tape.attention(q, k, v, shape)?;
            let o = tape.linear(a, w[4])?;
            x = tape.add(x, o)?;
            let h = tape.rmsnorm(x, w[5], c.eps)?;
            let gate = tape.linear(h, w[6])?;
            let up = tape.linear(h, w[7])?;
            let s = tape.swiglu(gate, up)?;
            let d = tape.linear(s, w[8])?;
            x = tape.add(x, d)?;
        }
        let n = p.len();
        let h = tape.rmsnorm(x, p[n - 2], c.eps)?;
        Ok(tape.linear(h, p[n - 1])?)
    }

    /// `scale` times the summed cross-entropy of predicting `targets` (in nats).
    pub fn loss(
        &self,
        tape: &mut Tape,
        inputs: &[u32],
        targets: &[u32],
        batch: usize,
        seq: usize,
        scale: f32,
    ) -> Result<Var> {
        let logits = self.forward(tape, inputs, batch, seq)?;
        Ok(tape.cross_entropy(logits, targets, scale)?)
    }
}

/// A standard normal sample (Box-Muller).
fn normal(rng: &mut impl Rng) -> f64 {
    let u1: f64 = rng.random_range(f64::MIN_POSITIVE..1.0);
    let u2: f64 = rng.random();
    (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_1m_preset_has_about_a_million_parameters() {
        let c = LmConfig::preset("1m", 128).unwrap();
        // 256*128 embedding + 4 * (2*128 + 4*128*128 + 3*128*384) + 128 + 256*128 output.
        assert_eq!(c.n_params(), 918_656);
        assert!(LmConfig::preset("2m", 128).is_err());
        let mut odd = c.clone();
        odd.n_heads = 3;
        assert!(odd.check().is_err());
    }
}
