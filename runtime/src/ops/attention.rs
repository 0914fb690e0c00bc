//! Attention of queries over a KV cache: grouped-query heads, causal or bidirectional, for
//! prefill (many queries) and decode (one) alike.

use crate::error::{Result, RuntimeError};
use crate::gpu::KernelLayout;
use crate::ops::{check_len, pow2_floor};
use crate::pipeline::PipelineKey;
use crate::recorder::Recorder;
use crate::tensor::Tensor;

/// Shapes of one attention call.
#[derive(Clone, Copy, Debug)]
pub struct AttentionParams {
    pub n_head: usize,
    pub n_kv_head: usize,
    pub head_dim: usize,
    /// Position of the first query.
    pub pos0: usize,
    pub tokens: usize,
    /// Keys held in the cache (for causal attention, at least pos0 + tokens).
    pub kv_len: usize,
    pub causal: bool,
    pub scale: f32,
}

/// Records `out = softmax(q k^T * scale) v` for q `[tokens, n_head, head_dim]` and caches
/// `[position, n_kv_head, head_dim]`.
pub fn attention(
    rec: &mut Recorder,
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    out: &Tensor,
    p: &AttentionParams,
) -> Result<()> {
    if p.head_dim == 0 || !p.head_dim.is_multiple_of(4) {
        return Err(RuntimeError::Shape(format!(
            "head size {} is not a multiple of 4",
            p.head_dim
        )));
    }
    if p.n_kv_head == 0 || !p.n_head.is_multiple_of(p.n_kv_head) {
        return Err(RuntimeError::Shape(format!(
            "{} heads over {} KV heads",
            p.n_head, p.n_kv_head
        )));
    }
    check_len("attention q", q, p.tokens * p.n_head * p.head_dim)?;
    check_len("attention out", out, p.tokens * p.n_head * p.head_dim)?;
    check_len("attention k", k, p.kv_len * p.n_kv_head * p.head_dim)?;
    check_len("attention v", v, p.kv_len * p.n_kv_head * p.head_dim)?;

    let params = [
        p.n_head as u32,
        p.n_kv_head as u32,
        p.pos0 as u32,
        p.causal as u32,
        p.kv_len as u32,
        p.scale.to_bits(),
        p.tokens as u32,
    ];
    let buffers = [q.bind(), k.bind(), v.bind(), out.bind()];
    // A query per lane pays off once there are enough queries to fill the SIMD lanes.
    if rec.gpu().kernel_layout() == KernelLayout::LanePerRow && p.tokens >= 16 {
        let key = PipelineKey::new("attention_rows", "main").define("HD", p.head_dim as u32);
        let groups = [p.n_head as u32, (p.tokens as u32).div_ceil(64), 1];
        return rec.dispatch(&key, &params, &buffers, groups);
    }

    // On CPU devices a workgroup takes all the query heads of a KV head (up to 8), which then
    // load each key and value row once: lavapipe gathers a thread's loads of different rows
    // lane by lane, and those loads are the kernel's cost.
    let group = p.n_head / p.n_kv_head;
    let gqa = match rec.gpu().kernel_layout() {
        KernelLayout::LanePerRow if group <= 8 => group,
        _ => 1,
    };
    // Partial sums of WG threads for head_dim values of each head must fit in workgroup memory.
    // On CPU devices the threads of a workgroup take turns at each barrier of the merge: 8 are
    // faster than 32 (lavapipe, 9 heads of 64 over 128 keys: 134 -> 101 us a dispatch).
    let limits = rec.gpu().limits();
    let room = limits.max_compute_workgroup_storage_size as usize / (4 * (p.head_dim + 2) * gqa);
    let most = match rec.gpu().kernel_layout() {
        KernelLayout::LanePerRow => 8,
        KernelLayout::Cooperative => 32,
    };
    let wg = pow2_floor((room.min(most) as u32).min(limits.max_compute_invocations_per_workgroup));
    let key = PipelineKey::new("attention", "main")
        .define("WG", wg)
        .define("HD", p.head_dim as u32)
        .define("GQA", gqa as u32);
    // The cooperative kernel's parameters are the first six (it has no use for `tokens`).
    let groups = [(p.n_head / gqa) as u32, p.tokens as u32, 1];
    rec.dispatch(&key, &params[..6], &buffers, groups)
}

/// CPU reference in f64.
pub fn attention_ref(q: &[f32], k: &[f32], v: &[f32], p: &AttentionParams) -> Vec<f32> {
    let hd = p.head_dim;
    let group = p.n_head / p.n_kv_head;
    let mut out = vec![0.0f32; p.tokens * p.n_head * hd];
    for t in 0..p.tokens {
        let n_keys = if p.causal {
            (p.pos0 + t + 1).min(p.kv_len)
        } else {
            p.kv_len
        };
        for h in 0..p.n_head {
            let kvh = h / group;
            let qr = &q[(t * p.n_head + h) * hd..][..hd];
            let scores: Vec<f64> = (0..n_keys)
                .map(|j| {
                    let kr = &k[(j * p.n_kv_head + kvh) * hd..][..hd];
                    qr.iter()
                        .zip(kr)
                        .map(|(&a, &b)| a as f64 * b as f64)
                        .sum::<f64>()
                        * p.scale as f64
                })
                .collect();
            let m = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let w: Vec<f64> = scores.iter().map(|s| (s - m).exp()).collect();
            let sum: f64 = w.iter().sum();
            for d in 0..hd {
                let o: f64 = (0..n_keys)
                    .map(|j| w[j] * v[(j * p.n_kv_head + kvh) * hd + d] as f64)
                    .sum();
                out[(t * p.n_head + h) * hd + d] = (o / sum) as f32;
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::test_util::{gpu, gpus, max_rel_err};
    use crate::testing::random_f32;

    fn check(p: AttentionParams) {
        for gpu in gpus() {
            check_on(gpu, p);
        }
    }

    fn check_on(gpu: &crate::gpu::Gpu, p: AttentionParams) {
        let q = random_f32(p.tokens * p.n_head * p.head_dim, 1);
        let k: Vec<f32> = random_f32(p.kv_len * p.n_kv_head * p.head_dim, 2)
            .iter()
            .map(|x| x * 3.0)
            .collect();
        let v = random_f32(p.kv_len * p.n_kv_head * p.head_dim, 3);
        let qt = gpu.tensor_from(&[q.len()], &q).unwrap();
        let kt = gpu.tensor_from(&[k.len()], &k).unwrap();
        let vt = gpu.tensor_from(&[v.len()], &v).unwrap();
        let out = gpu.tensor(&[q.len()]).unwrap();
        let mut rec = Recorder::new(gpu);
        attention(&mut rec, &qt, &kt, &vt, &out, &p).unwrap();
        rec.submit().unwrap();
        let err = max_rel_err(&gpu.read(&out).unwrap(), &attention_ref(&q, &k, &v, &p));
        assert!(err < 1e-5, "{p:?}: {err}");
    }

    #[test]
    fn causal_prefill_with_grouped_heads_matches_cpu_reference() {
        check(AttentionParams {
            n_head: 9,
            n_kv_head: 3,
            head_dim: 64,
            pos0: 0,
            tokens: 70,
            kv_len: 70,
            causal: true,
            scale: 0.125,
        });
    }

    #[test]
    fn decode_over_a_long_cache_matches_cpu_reference() {
        check(AttentionParams {
            n_head: 4,
            n_kv_head: 1,
            head_dim: 32,
            pos0: 1000,
            tokens: 1,
            kv_len: 1001,
            causal: true,
            scale: 0.2,
        });
    }

    #[test]
    fn decode_takes_query_heads_by_kv_group_and_matches_cpu_reference() {
        // SmolLM2-135M's heads (groups of 3, one workgroup each on CPU devices), and a group
        // of 16, more than a CPU device's workgroup takes (one workgroup per query head).
        for (n_head, n_kv_head, head_dim) in [(9, 3, 64), (16, 1, 16)] {
            check(AttentionParams {
                n_head,
                n_kv_head,
                head_dim,
                pos0: 129,
                tokens: 1,
                kv_len: 130,
                causal: true,
                scale: 0.125,
            });
        }
    }

    #[test]
    fn chunked_prefill_after_cached_tokens_matches_cpu_reference() {
        check(AttentionParams {
            n_head: 6,
            n_kv_head: 2,
            head_dim: 48,
            pos0: 20,
            tokens: 13,
            kv_len: 33,
            causal: true,
            scale: 0.15,
        });
    }

    #[test]
    fn bidirectional_attention_sees_every_key() {
        check(AttentionParams {
            n_head: 2,
            n_kv_head: 2,
            head_dim: 128,
            pos0: 0,
            tokens: 5,
            kv_len: 5,
            causal: false,
            scale: 0.09,
        });
    }

    #[test]
    fn heads_that_do_not_divide_are_rejected() {
        let gpu = gpu();
        let t = gpu.tensor(&[1024]).unwrap();
        let p = AttentionParams {
            n_head: 5,
            n_kv_head: 2,
            head_dim: 8,
            pos0: 0,
            tokens: 1,
            kv_len: 1,
            causal: true,
            scale: 1.0,
        };
        assert!(attention(&mut Recorder::new(gpu), &t, &t, &t, &t, &p).is_err());
    }
}
