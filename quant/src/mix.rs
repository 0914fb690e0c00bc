//! Which type each tensor gets: a single type for every weight matrix, or one of llama-quantize's
//! presets (Q4_K_M and friends), whose per-tensor mix this follows rule for rule, so a file made
//! here has the size of llama-quantize's at the same preset.
//!
//! The rules are those of llama.cpp's `llama_tensor_get_type` (llama.cpp as vendored in
//! llama-cpp-python 0.3.36) for llama-family models: attn_v and ffn_down get more bits in the
//! first and last eighths of the layers and every third layer between, the output matrix (or the
//! token embedding when it is tied to the output) gets Q6_K, and a matrix whose rows the type's
//! block size does not divide falls back to a type with 32-element blocks.

use std::fmt;

use tessera_runtime::DType;

/// What the user asked for with `--type`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Target {
    /// Every weight matrix in this type (llama-quantize's `--pure`), with the block-size
    /// fallback.
    Pure(DType),
    /// A llama-quantize preset.
    Preset(Preset),
}

/// The llama-quantize presets Tessera writes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Preset {
    Q2K,
    Q3KM,
    Q4KS,
    Q4KM,
    Q5KM,
    Q6K,
    Q8_0,
}

impl Preset {
    pub const ALL: [Preset; 7] = [
        Preset::Q2K,
        Preset::Q3KM,
        Preset::Q4KS,
        Preset::Q4KM,
        Preset::Q5KM,
        Preset::Q6K,
        Preset::Q8_0,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Preset::Q2K => "Q2_K",
            Preset::Q3KM => "Q3_K_M",
            Preset::Q4KS => "Q4_K_S",
            Preset::Q4KM => "Q4_K_M",
            Preset::Q5KM => "Q5_K_M",
            Preset::Q6K => "Q6_K",
            Preset::Q8_0 => "Q8_0",
        }
    }

    /// The type of the tensors no rule singles out.
    pub fn base_type(self) -> DType {
        match self {
            Preset::Q2K => DType::Q2_K,
            Preset::Q3KM => DType::Q3_K,
            Preset::Q4KS | Preset::Q4KM => DType::Q4_K,
            Preset::Q5KM => DType::Q5_K,
            Preset::Q6K => DType::Q6_K,
            Preset::Q8_0 => DType::Q8_0,
        }
    }

    /// llama.cpp's `general.file_type` (llama_ftype) value for the preset.
    pub fn file_type(self) -> u32 {
        match self {
            Preset::Q2K => 10,
            Preset::Q3KM => 12,
            Preset::Q4KS => 14,
            Preset::Q4KM => 15,
            Preset::Q5KM => 17,
            Preset::Q6K => 18,
            Preset::Q8_0 => 7,
        }
    }
}

/// Types `quant` can write: every type the runtime runs.
pub const WRITABLE: [DType; 13] = DType::ALL;

impl Target {
    /// Parses a preset name (`Q4_K_M`) or a type name (`Q4_K`, `q8_0`, `f16`); presets win where
    /// a name is both (`Q6_K`, `Q8_0`, `Q2_K`: llama-quantize treats those as presets too).
    pub fn parse(s: &str) -> Option<Target> {
        let upper = s.to_ascii_uppercase();
        if let Some(p) = Preset::ALL.into_iter().find(|p| p.name() == upper) {
            return Some(Target::Preset(p));
        }
        WRITABLE
            .into_iter()
            .find(|d| d.name() == upper)
            .map(Target::Pure)
    }

    /// Every name `parse` accepts, for error messages.
    pub fn names() -> String {
        let mut names: Vec<&str> = Preset::ALL.iter().map(|p| p.name()).collect();
        for d in WRITABLE {
            if !names.contains(&d.name()) {
                names.push(d.name());
            }
        }
        names.join(", ")
    }

    /// `general.file_type` for the output: the preset's, or the single type's ftype.
    pub fn file_type(self) -> u32 {
        match self {
            Target::Preset(p) => p.file_type(),
            Target::Pure(d) => match d {
                DType::F32 => 0,
                DType::F16 => 1,
                DType::Q4_0 => 2,
                DType::Q4_1 => 3,
                DType::Q8_0 => 7,
                DType::Q5_0 => 8,
                DType::Q5_1 => 9,
                DType::Q2_K => 10,
                DType::Q3_K => 12,
                DType::Q4_K => 15,
                DType::Q5_K => 17,
                DType::Q6_K => 18,
                DType::IQ4_NL => 25,
            },
        }
    }
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Target::Pure(d) => f.write_str(d.name()),
            Target::Preset(p) => f.write_str(p.name()),
        }
    }
}

/// The role of a tensor in a llama-family model, from its GGUF name.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Category {
    TokenEmbd,
    Output,
    AttnQ,
    AttnK,
    AttnV,
    AttnOutput,
    FfnGate,
    FfnUp,
    FfnDown,
    Other,
}

impl Category {
    pub fn of(name: &str) -> Category {
        let has = |s: &str| name.contains(s);
        if name == "output.weight" {
            Category::Output
        } else if name == "token_embd.weight" {
            Category::TokenEmbd
        } else if has("attn_v.weight") {
            Category::AttnV
        } else if has("attn_k.weight") {
            Category::AttnK
        } else if has("attn_q.weight") {
            Category::AttnQ
        } else if has("attn_output.weight") {
            Category::AttnOutput
        } else if has("ffn_up") {
            Category::FfnUp
        } else if has("ffn_gate") {
            Category::FfnGate
        } else if has("ffn_down") {
            Category::FfnDown
        } else {
            Category::Other
        }
    }
}

/// A tensor as the mix sees it: name, GGUF dims (row length first) and its position.
#[derive(Clone, Debug)]
pub struct TensorShape {
    pub name: String,
    pub dims: Vec<u64>,
}

/// Whether a tensor is quantized at all (matrices only; norms and other vectors stay as they
/// are, as in llama-quantize).
pub fn is_quantizable(t: &TensorShape) -> bool {
    t.dims.iter().filter(|&&d| d > 1).count() >= 2
        && t.name.ends_with("weight")
        && !t.name.contains("_norm.weight")
}

/// One tensor's chosen type, and the type the rules wanted when a block-size fallback replaced
/// it (for the log).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Choice {
    pub dtype: DType,
    pub fallback_from: Option<DType>,
}

/// Chooses a type for every tensor, in file order (the layer counters of llama.cpp's rules walk
/// the tensors in that order). `overrides` (`--tensor-type PATTERN=TYPE`) win over the preset's
/// rules, first match first (a regular expression searched in the name, as llama-quantize's
/// `--tensor-type`); tensors that are not quantizable keep `None`. `n_gqa` is the number of
/// query heads per KV head.
pub fn choose(
    tensors: &[TensorShape],
    target: Target,
    n_layer: usize,
    n_gqa: usize,
    overrides: &[(fancy_regex::Regex, DType)],
) -> Vec<Option<Choice>> {
    let tied = !tensors.iter().any(|t| t.name == "output.weight");
    let n_attn_v = tensors
        .iter()
        .filter(|t| Category::of(&t.name) == Category::AttnV)
        .count();
    let mut i_attn_v = 0;
    let mut i_ffn_down = 0;
    tensors
        .iter()
        .map(|t| {
            if !is_quantizable(t) {
                return None;
            }
            let category = Category::of(&t.name);
            let default = match target {
                Target::Pure(d) => d,
                Target::Preset(p) => p.base_type(),
            };
            let manual = overrides
                .iter()
                .find(|(re, _)| re.is_match(&t.name).unwrap_or(false));
            let wanted = match (manual, target) {
                (Some(&(_, d)), _) => d,
                (None, Target::Pure(d)) => d,
                (None, Target::Preset(p)) => preset_type(
                    p,
                    t,
                    category,
                    tied,
                    (n_layer, n_gqa),
                    (&mut i_attn_v, n_attn_v),
                    &mut i_ffn_down,
                    default,
                ),
            };
            // The counters advance whichever way the type was chosen, as llama.cpp's do only on
            // its rule path; overrides are rare enough that this difference does not matter
            // for sizes, and keeping the walk simple keeps it checkable.
            Some(fallback(wanted, t.dims[0]))
        })
        .collect()
}

/// The layer number of a `blk.N.` tensor. llama.cpp's rules count attn_v and ffn_down
/// tensors as it meets them, in layer order; a file need not store them in that order (names
/// sort blk.10 before blk.2), so the number is read from the name.
fn layer_of(name: &str) -> Option<usize> {
    name.strip_prefix("blk.")?.split('.').next()?.parse().ok()
}

fn use_more_bits(i: usize, n: usize) -> bool {
    i < n / 8 || i >= 7 * n / 8 || (i as i64 - (n / 8) as i64).rem_euclid(3) == 2
}

#[allow(clippy::too_many_arguments)]
fn preset_type(
    p: Preset,
    t: &TensorShape,
    category: Category,
    tied: bool,
    (n_layer, n_gqa): (usize, usize),
    (i_attn_v, n_attn_v): (&mut usize, usize),
    i_ffn_down: &mut usize,
    default: DType,
) -> DType {
    use Preset::*;
    match category {
        Category::Output | Category::TokenEmbd if category == Category::Output || tied => {
            if !t.dims[0].is_multiple_of(default.block_size() as u64) {
                DType::Q8_0
            } else if default != DType::Q8_0 {
                DType::Q6_K
            } else {
                default
            }
        }
        Category::AttnV => {
            let i = layer_of(&t.name).unwrap_or(*i_attn_v);
            *i_attn_v += 1;
            match p {
                Q2K if n_gqa >= 4 => DType::Q4_K,
                Q2K => DType::Q3_K,
                Q3KM if i < 2 => DType::Q5_K,
                Q3KM => DType::Q4_K,
                Q4KM | Q5KM if use_more_bits(i, n_attn_v) => DType::Q6_K,
                Q4KS if i < 4 => DType::Q5_K,
                _ => default,
            }
        }
        Category::FfnDown => {
            let i = layer_of(&t.name).unwrap_or(*i_ffn_down);
            *i_ffn_down += 1;
            match p {
                Q2K => DType::Q3_K,
                Q3KM if i < n_layer / 16 => DType::Q5_K,
                Q3KM => DType::Q4_K,
                Q4KM if use_more_bits(i, n_layer) => DType::Q6_K,
                Q5KM if use_more_bits(i, n_layer) => DType::Q6_K,
                Q4KS if i < n_layer / 8 => DType::Q5_K,
                _ => default,
            }
        }
        Category::AttnOutput => match p {
            Q2K => DType::Q3_K,
            Q3KM => DType::Q4_K,
            _ => default,
        },
        _ => default,
    }
}

/// llama.cpp's fallback for rows the block size does not divide: 256-element types go to a
/// 32-element type of about the same size, and to F16 if even that does not fit.
pub fn fallback(wanted: DType, row: u64) -> Choice {
    if row.is_multiple_of(wanted.block_size() as u64) {
        return Choice {
            dtype: wanted,
            fallback_from: None,
        };
    }
    let mut dtype = match wanted {
        DType::Q2_K | DType::Q3_K => DType::Q4_0,
        DType::Q4_K => DType::Q5_0,
        DType::Q5_K => DType::Q5_1,
        DType::Q6_K => DType::Q8_0,
        other => other,
    };
    if !row.is_multiple_of(dtype.block_size() as u64) {
        dtype = DType::F16;
    }
    Choice {
        dtype,
        fallback_from: Some(wanted),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// SmolLM2-135M's tensors in file order: 30 layers, rows of 576 (1536 for ffn_down), tied
    /// embeddings.
    fn smollm2() -> Vec<TensorShape> {
        let mut t = vec![TensorShape {
            name: "token_embd.weight".into(),
            dims: vec![576, 49152],
        }];
        for i in 0..30 {
            for (n, dims) in [
                ("attn_norm.weight", vec![576]),
                ("attn_q.weight", vec![576, 576]),
                ("attn_k.weight", vec![576, 192]),
                ("attn_v.weight", vec![576, 192]),
                ("attn_output.weight", vec![576, 576]),
                ("ffn_norm.weight", vec![576]),
                ("ffn_gate.weight", vec![576, 1536]),
                ("ffn_up.weight", vec![576, 1536]),
                ("ffn_down.weight", vec![1536, 576]),
            ] {
                t.push(TensorShape {
                    name: format!("blk.{i}.{n}"),
                    dims,
                });
            }
        }
        t.push(TensorShape {
            name: "output_norm.weight".into(),
            dims: vec![576],
        });
        t
    }

    fn type_of(ts: &[TensorShape], c: &[Option<Choice>], name: &str) -> Option<DType> {
        let i = ts.iter().position(|t| t.name == name).unwrap();
        c[i].map(|c| c.dtype)
    }

    #[test]
    fn q4_k_m_on_smollm2_follows_llama_quantize() {
        let ts = smollm2();
        let c = choose(&ts, Target::parse("q4_k_m").unwrap(), 30, 3, &[]);
        // Tied embedding: the output rule wants Q6_K, but 576 % 256 != 0 gives Q8_0.
        assert_eq!(type_of(&ts, &c, "token_embd.weight"), Some(DType::Q8_0));
        assert_eq!(type_of(&ts, &c, "blk.0.attn_norm.weight"), None);
        // Rows of 576: Q4_K falls back to Q5_0, Q6_K to Q8_0.
        assert_eq!(type_of(&ts, &c, "blk.5.attn_q.weight"), Some(DType::Q5_0));
        assert_eq!(type_of(&ts, &c, "blk.0.attn_v.weight"), Some(DType::Q8_0));
        assert_eq!(type_of(&ts, &c, "blk.4.attn_v.weight"), Some(DType::Q5_0));
        // use_more_bits(i, 30): i < 3, i >= 26, (i - 3) % 3 == 2.
        let more: Vec<usize> = (0..30).filter(|&i| use_more_bits(i, 30)).collect();
        assert_eq!(more, [0, 1, 2, 5, 8, 11, 14, 17, 20, 23, 26, 27, 28, 29]);
        assert_eq!(type_of(&ts, &c, "blk.5.ffn_down.weight"), Some(DType::Q6_K));
        assert_eq!(type_of(&ts, &c, "blk.6.ffn_down.weight"), Some(DType::Q4_K));
        let fallback = c
            .iter()
            .flatten()
            .filter(|c| c.fallback_from.is_some())
            .count();
        // q, k, v, o, gate and up in every layer; token_embd took Q8_0 by the output rule.
        assert_eq!(fallback, 30 * 6);
    }

    #[test]
    fn q3_k_m_and_q2_k_use_their_rules_and_q4_0_fallback() {
        let ts = smollm2();
        let c = choose(&ts, Target::parse("Q3_K_M").unwrap(), 30, 3, &[]);
        assert_eq!(type_of(&ts, &c, "blk.0.ffn_down.weight"), Some(DType::Q5_K));
        assert_eq!(type_of(&ts, &c, "blk.2.ffn_down.weight"), Some(DType::Q4_K));
        assert_eq!(type_of(&ts, &c, "blk.9.attn_q.weight"), Some(DType::Q4_0));
        assert_eq!(
            type_of(&ts, &c, "blk.9.attn_output.weight"),
            Some(DType::Q5_0)
        );
        let c = choose(&ts, Target::parse("Q2_K").unwrap(), 30, 3, &[]);
        assert_eq!(type_of(&ts, &c, "blk.9.ffn_down.weight"), Some(DType::Q3_K));
        assert_eq!(type_of(&ts, &c, "blk.9.ffn_up.weight"), Some(DType::Q4_0));
    }

    #[test]
    fn pure_types_overrides_and_f16_fallback() {
        let ts = smollm2();
        let c = choose(&ts, Target::parse("q4_0").unwrap(), 30, 3, &[]);
        assert!(c.iter().flatten().all(|c| c.dtype == DType::Q4_0));
        let ov = vec![(fancy_regex::Regex::new("ffn_down").unwrap(), DType::Q8_0)];
        let c = choose(&ts, Target::parse("Q4_K_M").unwrap(), 30, 3, &ov);
        assert_eq!(type_of(&ts, &c, "blk.6.ffn_down.weight"), Some(DType::Q8_0));
        assert_eq!(fallback(DType::Q4_K, 100).dtype, DType::F16);
        assert_eq!(fallback(DType::Q8_0, 100).dtype, DType::F16);
        assert_eq!(fallback(DType::Q4_K, 512).fallback_from, None);
        assert!(Target::parse("Q7_K").is_none());
        assert!(Target::names().contains("Q4_K_M"));
    }
}
