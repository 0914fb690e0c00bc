//! Rotary position embedding (RoPE), normal and NeoX layouts, any frequency base.

use crate::error::{Result, RuntimeError};
use crate::ops::check_len;
use crate::pipeline::PipelineKey;
use crate::recorder::Recorder;
use crate::tensor::Tensor;

/// Which dimensions are rotated together: GGML's `rope_type` 0 and 2.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RopeLayout {
    /// Adjacent pairs (2i, 2i+1): llama in GGUF.
    Normal,
    /// Halves (i, i + n_rot/2): GPT-NeoX, Qwen, Phi and others.
    Neox,
}

/// Shape and frequencies of one RoPE application.
#[derive(Clone, Copy, Debug)]
pub struct RopeParams {
    pub heads: usize,
    pub head_dim: usize,
    /// Rotated dimensions per head (even, at most `head_dim`).
    pub n_rot: usize,
    pub layout: RopeLayout,
    pub base: f32,
    /// Position of the first token.
    pub pos0: usize,
    pub tokens: usize,
    /// Element offset of token 0 and elements between tokens.
    pub offset: usize,
    pub stride: usize,
}

/// Records RoPE in place on `x`.
pub fn rope(rec: &mut Recorder, x: &Tensor, p: &RopeParams) -> Result<()> {
    if !p.n_rot.is_multiple_of(2) || p.n_rot > p.head_dim || p.n_rot == 0 {
        return Err(RuntimeError::Shape(format!(
            "rope over {} of {} dims",
            p.n_rot, p.head_dim
        )));
    }
    if p.tokens > 0 {
        check_len(
            "rope",
            x,
            p.offset + (p.tokens - 1) * p.stride + p.heads * p.head_dim,
        )?;
    }
    let params = [
        p.heads as u32,
        p.head_dim as u32,
        p.n_rot as u32,
        p.pos0 as u32,
        (p.layout == RopeLayout::Neox) as u32,
        p.base.to_bits(),
        p.offset as u32,
        p.stride as u32,
    ];
    let groups = ((p.heads * p.n_rot / 2) as u32).div_ceil(64);
    rec.dispatch(
        &PipelineKey::new("rope", "main"),
        &params,
        &[x.bind()],
        [groups, p.tokens as u32, 1],
    )
}

/// CPU reference, in f64, on a dense `[tokens, heads, head_dim]` slice.
pub fn rope_ref(x: &mut [f32], p: &RopeParams) {
    let half = p.n_rot / 2;
    for t in 0..p.tokens {
        for h in 0..p.heads {
            let base = p.offset + t * p.stride + h * p.head_dim;
            for i in 0..half {
                let theta =
                    (p.pos0 + t) as f64 * (p.base as f64).powf(-2.0 * i as f64 / p.n_rot as f64);
                let (a, b) = match p.layout {
                    RopeLayout::Normal => (base + 2 * i, base + 2 * i + 1),
                    RopeLayout::Neox => (base + i, base + i + half),
                };
                let (x0, x1) = (x[a] as f64, x[b] as f64);
                x[a] = (x0 * theta.cos() - x1 * theta.sin()) as f32;
                x[b] = (x0 * theta.sin() + x1 * theta.cos()) as f32;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::test_util::{gpu, max_rel_err};
    use crate::testing::random_f32;

    #[test]
    fn rope_matches_cpu_reference_in_both_layouts() {
        let gpu = gpu();
        for layout in [RopeLayout::Normal, RopeLayout::Neox] {
            for (heads, head_dim, n_rot, base, pos0, tokens) in [
                (3, 64, 64, 10000.0, 0, 5),
                (2, 10, 6, 100000.0, 17, 3),
                (1, 128, 128, 500000.0, 4000, 1),
            ] {
                let p = RopeParams {
                    heads,
                    head_dim,
                    n_rot,
                    layout,
                    base,
                    pos0,
                    tokens,
                    offset: 0,
                    stride: heads * head_dim,
                };
                let mut x = random_f32(tokens * heads * head_dim, 9);
                let xt = gpu.tensor_from(&[x.len()], &x).unwrap();
                let mut rec = Recorder::new(gpu);
                rope(&mut rec, &xt, &p).unwrap();
                rec.submit().unwrap();
                let got = gpu.read(&xt).unwrap();
                rope_ref(&mut x, &p);
                // f32 angles at position 4000 carry ~1e-4 relative phase error.
                let err = max_rel_err(&got, &x);
                assert!(
                    err < 2e-3,
                    "{layout:?} {heads}x{head_dim} pos {pos0}: {err}"
                );
            }
        }
    }

    #[test]
    fn odd_rotation_width_is_rejected() {
        let gpu = gpu();
        let x = gpu.tensor(&[16]).unwrap();
        let p = RopeParams {
            heads: 1,
            head_dim: 16,
            n_rot: 5,
            layout: RopeLayout::Normal,
            base: 1e4,
            pos0: 0,
            tokens: 1,
            offset: 0,
            stride: 16,
        };
        assert!(rope(&mut Recorder::new(gpu), &x, &p).is_err());
    }
}
