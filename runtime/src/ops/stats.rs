//! Activation statistics for post-training quantization: per-channel moments and maxima of a
//! matrix's columns (`channel_stats`) and its Gram matrix `X^T X` (`gram`), both accumulated
//! across dispatches into buffers the caller owns and zeroes.
//!
//! The statistics block of a matrix `[m, k]` is `[STATS, k]`, one row per statistic in the order
//! of the `SUM`.. `MAX_ABS` constants. The Gram matrix is written by row ranges, so one larger
//! than a storage binding can be split into parts (`gram_rows_per_part`).

use crate::autograd::matmul::{gemm_rows, GemmShape, Strided};
use crate::error::{Result, RuntimeError};
use crate::gpu::{Gpu, KernelLayout};
use crate::ops::{check_len, pow2_floor};
use crate::pipeline::PipelineKey;
use crate::recorder::Recorder;
use crate::tensor::Tensor;

/// Statistics per channel.
pub const STATS: usize = 6;
/// Row of the statistics block holding sum x.
pub const SUM: usize = 0;
/// Row holding sum x^2.
pub const SUM_SQ: usize = 1;
/// Row holding sum |x|.
pub const SUM_ABS: usize = 2;
/// Row holding sum x^3.
pub const SUM_CUBE: usize = 3;
/// Row holding sum x^4.
pub const SUM_QUAD: usize = 4;
/// Row holding max |x| (maxed, not added).
pub const MAX_ABS: usize = 5;

/// Rows staged per step of the cooperative Gram kernel.
const GRAM_RT: u32 = 16;
/// Columns per invocation of the lane-per-row Gram kernel.
const GRAM_TB: u32 = 8;

/// Where the `m` rows of width `k` of an input matrix lie in its tensor: row `r` starts at
/// element `offset + r * stride`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Rows {
    pub m: usize,
    pub k: usize,
    pub offset: usize,
    pub stride: usize,
}

impl Rows {
    /// `m` contiguous rows of width `k` from element 0.
    pub fn dense(m: usize, k: usize) -> Self {
        Rows {
            m,
            k,
            offset: 0,
            stride: k,
        }
    }

    /// Elements the tensor must hold.
    fn extent(&self) -> usize {
        if self.m == 0 {
            0
        } else {
            self.offset + (self.m - 1) * self.stride + self.k
        }
    }

    fn check(&self, what: &str, x: &Tensor) -> Result<()> {
        if self.stride < self.k {
            return Err(RuntimeError::Shape(format!(
                "{what}: row stride {} is shorter than the row width {}",
                self.stride, self.k
            )));
        }
        check_len(what, x, self.extent())?;
        if self.extent() > u32::MAX as usize {
            return Err(RuntimeError::Shape(format!(
                "{what}: {} elements do not fit 32-bit indices",
                self.extent()
            )));
        }
        Ok(())
    }
}

fn u32_of(what: &str, v: usize) -> Result<u32> {
    u32::try_from(v).map_err(|_| RuntimeError::Shape(format!("{what}: {v} exceeds 32 bits")))
}

/// The defines every entry of `stats.wgsl` is specialised with, read from the device limits.
fn key(gpu: &Gpu, entry: &'static str) -> PipelineKey {
    let limits = gpu.limits();
    let wg = pow2_floor(
        limits
            .max_compute_invocations_per_workgroup
            .min(limits.max_compute_workgroup_size_x)
            .min(256),
    );
    let ch = wg.min(32);
    let rs = (wg / ch).min(pow2_floor(limits.max_compute_workgroup_size_y));
    // A T x T workgroup stages 2 * RT * 4T floats; T = 16 needs 256 invocations and 8 KiB.
    let tile_bytes = |t: u32| 2 * GRAM_RT * 4 * t * 4;
    let t = if wg >= 256
        && limits.max_compute_workgroup_size_y >= 16
        && limits.max_compute_workgroup_storage_size >= tile_bytes(16) + 6 * 4 * wg
    {
        16
    } else {
        8
    };
    PipelineKey::new("stats", entry)
        .define("CH", ch)
        .define("RS", rs)
        .define("T", t)
        .define("RT", GRAM_RT)
        .define("TB", GRAM_TB)
}

fn check_groups(gpu: &Gpu, what: &str, groups: [u32; 3]) -> Result<()> {
    let max = gpu.limits().max_compute_workgroups_per_dimension;
    if groups.iter().any(|&g| g > max) {
        return Err(RuntimeError::Shape(format!(
            "{what}: {groups:?} workgroups exceed the device's {max} per dimension"
        )));
    }
    Ok(())
}

/// Records the accumulation of the per-channel statistics of `x`'s rows into the `[STATS, k]`
/// block of `stats` at element `stats_offset` (sums added, maxima maxed).
pub fn channel_stats(
    rec: &mut Recorder,
    x: &Tensor,
    rows: Rows,
    stats: &Tensor,
    stats_offset: usize,
) -> Result<()> {
    rows.check("channel_stats input", x)?;
    check_len("channel_stats output", stats, stats_offset + STATS * rows.k)?;
    if rows.m == 0 || rows.k == 0 {
        return Ok(());
    }
    let gpu = rec.gpu();
    let (key, width) = match gpu.kernel_layout() {
        KernelLayout::Cooperative => {
            let key = key(gpu, "channel_stats");
            let ch = key.defines[0].1;
            (key, ch)
        }
        KernelLayout::LanePerRow => (key(gpu, "channel_stats_rows"), 64),
    };
    let groups = [u32_of("channel_stats", rows.k)?.div_ceil(width), 1, 1];
    check_groups(gpu, "channel_stats", groups)?;
    let params = [
        u32_of("channel_stats", rows.m)?,
        u32_of("channel_stats", rows.k)?,
        u32_of("channel_stats", rows.offset)?,
        u32_of("channel_stats", rows.stride)?,
        u32_of("channel_stats", stats_offset)?,
        0,
    ];
    rec.dispatch(&key, &params, &[x.bind(), stats.bind()], groups)
}

/// Rows of a `[k, k]` Gram matrix that fit one storage binding of `gpu`.
pub fn gram_rows_per_part(gpu: &Gpu, k: usize) -> usize {
    (gpu.max_binding_size() as usize / (4 * k.max(1))).clamp(1, k.max(1))
}

/// Elements of the scratch tensor [`gram`] transposes `m` rows into for `h_rows` output rows.
pub fn gram_scratch_len(m: usize, h_rows: usize) -> usize {
    m * h_rows
}

/// Records `h += X^T X` for rows `row0..row0 + h_rows` of the `[k, k]` Gram matrix of `x`'s
/// rows; `h` holds those rows, `[h_rows, k]`. Only the upper triangle (column >= row) is sure
/// to be added; entries below the diagonal may be left as they were, so read the whole matrix
/// through [`mirror_upper`]. CPU devices transpose x's rows into `scratch` (at least
/// [`gram_scratch_len`] elements; one is allocated without it), which several calls on one
/// recorder may share.
pub fn gram(
    rec: &mut Recorder,
    x: &Tensor,
    rows: Rows,
    h: &Tensor,
    (row0, h_rows): (usize, usize),
    scratch: Option<&Tensor>,
) -> Result<()> {
    rows.check("gram input", x)?;
    check_len("gram output", h, h_rows * rows.k)?;
    if row0 + h_rows > rows.k {
        return Err(RuntimeError::Shape(format!(
            "gram: rows {row0}..{} of a [{k}, {k}] matrix",
            row0 + h_rows,
            k = rows.k
        )));
    }
    if rows.m == 0 || h_rows == 0 {
        return Ok(());
    }
    let gpu = rec.gpu();
    let k = u32_of("gram", rows.k)?;
    let n = u32_of("gram", h_rows)?;
    // The words of stats.wgsl's Params, which the Gram kernels and `transpose_rows` share.
    let params = [
        u32_of("gram", rows.m)?,
        k,
        u32_of("gram", rows.offset)?,
        u32_of("gram", rows.stride)?,
        u32_of("gram", row0)?,
        n,
    ];
    let (key, groups) = match gpu.kernel_layout() {
        KernelLayout::Cooperative => {
            let key = key(gpu, "gram");
            let tile = 4 * key.defines[2].1;
            (key, [k.div_ceil(tile), n.div_ceil(tile), 1])
        }
        KernelLayout::LanePerRow => {
            if gram_by_gemm(rec, x, rows, h, (row0, h_rows), scratch, &params)? {
                return Ok(());
            }
            (
                key(gpu, "gram_rows"),
                [n.div_ceil(64), k.div_ceil(GRAM_TB), 1],
            )
        }
    };
    check_groups(gpu, "gram", groups)?;
    rec.dispatch(&key, &params, &[x.bind(), h.bind()], groups)
}

/// The Gram matrix on CPU devices, where the training gemm is ~3x the Gram kernel's rate:
/// the rows' columns `row0..` are transposed into a scratch tensor, whose rows (A) the gemm reads
/// through uniform windows while it streams x's rows (B). Each block of output rows starts its
/// columns at its first row (rounded down to 4 for B's vec4 loads), which halves the work.
/// Returns `false`, recording nothing, where the layout does not suit the gemm. `params` are
/// [`gram`]'s words, which `transpose_rows` reads too.
fn gram_by_gemm(
    rec: &mut Recorder,
    x: &Tensor,
    rows: Rows,
    h: &Tensor,
    (row0, h_rows): (usize, usize),
    scratch: Option<&Tensor>,
    params: &[u32; 6],
) -> Result<bool> {
    let (m, k) = (rows.m, rows.k);
    let limits = rec.gpu().limits();
    let window = (limits.max_uniform_buffer_binding_size as usize).min(1 << 16) / 4;
    // Rows of X^T a block: as many as a uniform window holds, in groups of 8 (the gemm's rows
    // a workgroup).
    let block = window.saturating_sub(8 + m) / m / 8 * 8;
    let align = limits.min_uniform_buffer_offset_alignment as usize;
    if block == 0
        || !rows.offset.is_multiple_of(4)
        || !rows.stride.is_multiple_of(4)
        || !align.is_multiple_of(16)
    {
        return Ok(false);
    }
    let gpu = rec.gpu();
    let xt = match scratch {
        Some(t) if t.len() >= gram_scratch_len(m, h_rows) => t.clone(),
        _ => gpu.tensor(&[h_rows, m])?,
    };
    if !xt.buffer().usage().contains(wgpu::BufferUsages::UNIFORM) {
        return Ok(false);
    }
    let groups = [
        u32_of("gram", m)?.div_ceil(64),
        u32_of("gram", h_rows)?.div_ceil(GRAM_TB),
        1,
    ];
    check_groups(gpu, "gram", groups)?;
    let transpose = key(gpu, "transpose_rows");
    let mut recorded = false;
    for i_lo in (0..h_rows).step_by(block) {
        let col0 = (row0 + i_lo) / 4 * 4;
        let a = Strided {
            t: &xt,
            off: i_lo * m,
            os: m,
            ls: 1,
            bs: 0,
        };
        let b = Strided {
            t: x,
            off: rows.offset + col0,
            os: 1,
            ls: rows.stride,
            bs: 0,
        };
        let shape = GemmShape {
            m: block.min(h_rows - i_lo),
            n: k - col0,
            k: m,
            batch: 1,
        };
        if !recorded {
            rec.dispatch(&transpose, params, &[x.bind(), xt.bind()], groups)?;
            recorded = true;
        }
        if !gemm_rows(rec, shape, 1.0, a, b, h, (i_lo * k + col0, k, 0), true)? {
            return Err(RuntimeError::Shape(format!(
                "gram: the gemm refused a block of {shape:?} after taking the first"
            )));
        }
    }
    Ok(recorded)
}

/// Copies the upper triangle of a `[k, k]` matrix onto its lower one: the whole Gram matrix
/// from what [`gram`] guarantees.
pub fn mirror_upper(h: &mut [f32], k: usize) {
    for a in 1..k {
        for b in 0..a {
            h[a * k + b] = h[b * k + a];
        }
    }
}

/// CPU reference of [`channel_stats`]: accumulates into `stats` (`[STATS, k]`) in f64.
pub fn channel_stats_ref(x: &[f32], rows: Rows, stats: &mut [f64]) {
    let k = rows.k;
    for r in 0..rows.m {
        let row = &x[rows.offset + r * rows.stride..][..k];
        for (j, &v) in row.iter().enumerate() {
            let v = v as f64;
            stats[SUM * k + j] += v;
            stats[SUM_SQ * k + j] += v * v;
            stats[SUM_ABS * k + j] += v.abs();
            stats[SUM_CUBE * k + j] += v * v * v;
            stats[SUM_QUAD * k + j] += v * v * v * v;
            stats[MAX_ABS * k + j] = stats[MAX_ABS * k + j].max(v.abs());
        }
    }
}

/// CPU reference of [`gram`]: accumulates rows `row0..row0 + h_rows` of `X^T X` into `h`.
pub fn gram_ref(x: &[f32], rows: Rows, h: &mut [f64], row0: usize, h_rows: usize) {
    let k = rows.k;
    for r in 0..rows.m {
        let row = &x[rows.offset + r * rows.stride..][..k];
        for a in 0..h_rows {
            let va = row[row0 + a] as f64;
            for (b, &vb) in row.iter().enumerate() {
                h[a * k + b] += va * vb as f64;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::test_util::gpus;
    use crate::testing::random_f32;

    /// Largest difference relative to the largest reference magnitude of each statistic row.
    fn row_errors(got: &[f32], want: &[f64], k: usize) -> Vec<f64> {
        got.chunks(k)
            .zip(want.chunks(k))
            .map(|(g, w)| {
                let scale = w.iter().fold(1e-30f64, |a, &b| a.max(b.abs()));
                g.iter()
                    .zip(w)
                    .fold(0.0f64, |a, (&g, &w)| a.max((g as f64 - w).abs()))
                    / scale
            })
            .collect()
    }

    #[test]
    fn stats_channel_stats_match_cpu_reference_on_odd_shapes_and_accumulate() {
        for gpu in gpus() {
            // (m, k, offset, stride): dense, strided with an offset, one row, one column.
            for (m, k, offset, stride) in [
                (37, 97, 0, 97),
                (37, 97, 5, 131),
                (1, 576, 3, 600),
                (600, 1, 0, 1),
            ] {
                let rows = Rows {
                    m,
                    k,
                    offset,
                    stride,
                };
                let x: Vec<f32> = random_f32(rows.extent(), (m * k) as u64)
                    .iter()
                    .map(|v| v * 3.0)
                    .collect();
                let base = 7;
                let prior: Vec<f32> = random_f32(base + STATS * k, 9)
                    .iter()
                    .map(|v| v.abs())
                    .collect();
                let xt = gpu.tensor_from(&[x.len()], &x).unwrap();
                let st = gpu.tensor_from(&[prior.len()], &prior).unwrap();
                // Two dispatches accumulate: each row is counted twice on top of the prior.
                let mut rec = Recorder::new(gpu);
                channel_stats(&mut rec, &xt, rows, &st, base).unwrap();
                channel_stats(&mut rec, &xt, rows, &st, base).unwrap();
                rec.submit().unwrap();
                let got = gpu.read(&st).unwrap();
                assert_eq!(
                    &got[..base],
                    &prior[..base],
                    "the block's prefix is untouched"
                );
                let mut want: Vec<f64> = prior[base..].iter().map(|&v| v as f64).collect();
                channel_stats_ref(&x, rows, &mut want);
                channel_stats_ref(&x, rows, &mut want);
                let errs = row_errors(&got[base..], &want, k);
                let layout = gpu.kernel_layout();
                assert!(
                    errs.iter().all(|&e| e < 1e-5),
                    "{layout:?} m={m} k={k} offset={offset} stride={stride}: {errs:?}"
                );
                assert!(
                    got[base + MAX_ABS * k..].iter().any(|&v| v > 1.0),
                    "max |x| of 3 * uniform(-1, 1) exceeds 1 somewhere"
                );
            }
        }
    }

    #[test]
    fn stats_gram_matches_cpu_reference_on_odd_shapes_by_row_parts() {
        for gpu in gpus() {
            for (m, k, offset, stride) in [
                (37, 97, 0, 97),
                (5, 130, 11, 141),
                (70, 1, 2, 3),
                (45, 36, 8, 40),
            ] {
                let rows = Rows {
                    m,
                    k,
                    offset,
                    stride,
                };
                let x = random_f32(rows.extent(), (m + k) as u64);
                let xt = gpu.tensor_from(&[x.len()], &x).unwrap();
                // Split the matrix into uneven row parts, each accumulated twice.
                let cuts = [0, k / 3, k / 3 + 1, k];
                let mut got = Vec::new();
                let mut want = vec![0.0f64; k * k];
                // Parts alternate between a shared scratch tensor and one of their own.
                let shared = gpu.tensor(&[gram_scratch_len(m, k)]).unwrap();
                for (i, part) in cuts.windows(2).enumerate() {
                    let (row0, n) = (part[0], part[1] - part[0]);
                    let scratch = i.is_multiple_of(2).then_some(&shared);
                    if n == 0 {
                        continue;
                    }
                    let ht = gpu.tensor_from(&[n * k], &vec![0.5; n * k]).unwrap();
                    let mut rec = Recorder::new(gpu);
                    gram(&mut rec, &xt, rows, &ht, (row0, n), scratch).unwrap();
                    gram(&mut rec, &xt, rows, &ht, (row0, n), scratch).unwrap();
                    if gpu.kernel_layout() == KernelLayout::LanePerRow && stride % 4 == 0 {
                        // Aligned rows take the transpose and one gemm block per call.
                        assert_eq!(rec.dispatch_count(), 4, "m={m} k={k}");
                    }
                    rec.submit().unwrap();
                    got.extend(gpu.read(&ht).unwrap());
                    let slice = &mut want[row0 * k..(row0 + n) * k];
                    slice.iter_mut().for_each(|v| *v = 0.5);
                    gram_ref(&x, rows, slice, row0, n);
                    gram_ref(&x, rows, slice, row0, n);
                }
                mirror_upper(&mut got, k);
                let err = row_errors(&got, &want, k * k)[0];
                let layout = gpu.kernel_layout();
                assert!(err < 1e-5, "{layout:?} m={m} k={k}: {err}");
            }
        }
    }

    #[test]
    fn stats_shapes_outside_the_tensors_are_errors() {
        let gpu = gpus()[0];
        let x = gpu.tensor(&[10, 8]).unwrap();
        let small = gpu.tensor(&[STATS * 8 - 1]).unwrap();
        let mut rec = Recorder::new(gpu);
        let dense = Rows::dense(10, 8);
        assert!(channel_stats(&mut rec, &x, dense, &small, 0).is_err());
        let tall = Rows::dense(11, 8);
        let stats = gpu.tensor(&[STATS * 8]).unwrap();
        assert!(channel_stats(&mut rec, &x, tall, &stats, 0).is_err());
        let narrow = Rows {
            stride: 4,
            ..Rows::dense(2, 8)
        };
        assert!(channel_stats(&mut rec, &x, narrow, &stats, 0).is_err());
        let h = gpu.tensor(&[8, 8]).unwrap();
        assert!(gram(&mut rec, &x, dense, &h, (4, 5), None).is_err());
        assert_eq!(rec.dispatch_count(), 0);
        assert!(gram(&mut rec, &x, dense, &h, (0, 8), None).is_ok());
        assert!(rec.dispatch_count() >= 1);
    }
}
