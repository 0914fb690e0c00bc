//! Linear layers: `y = x W^T` with W `[n, k]` in any runtime type, dequantised in registers,
//! accumulated in f32. A few rows of x (decoding) go to the mat-vec kernel, more to the tiled
//! matmul; a weight split into row ranges runs once per part.

use crate::error::{Result, RuntimeError};
use crate::gpu::{Gpu, KernelLayout};
use crate::ops::rope::{RopeLayout, RopeParams};
use crate::ops::{check_len, weight_kernel};
use crate::pipeline::PipelineKey;
use crate::recorder::{split_groups, Binding, Recorder};
use crate::tensor::{dequantize_row, DType, Tensor, Weight, WeightPart, WEIGHT_SLACK};

/// Up to this many rows of x, the mat-vec kernel is used.
pub const MATVEC_MAX_ROWS: usize = 4;

const MATVEC_WG: u32 = 64;
/// Threads that share a row in the cooperative mat-vec, at most.
const MATVEC_TPR: u32 = 16;

/// Rows per workgroup of the cooperative mat-vec, and whether its threads sum a row by subgroup
/// shuffles: they can where subgroups hold all of a row's threads (16, or 8 on devices whose
/// subgroups are 8 wide); elsewhere they sum through workgroup memory.
fn matvec_split(gpu: &Gpu) -> (u32, bool) {
    let f = gpu.features();
    let tpr = MATVEC_TPR.min(f.subgroup_min_size.max(1).next_power_of_two());
    if f.subgroup && f.subgroup_min_size >= tpr && tpr >= 4 {
        (MATVEC_WG / tpr, true)
    } else {
        (MATVEC_WG / MATVEC_TPR, false)
    }
}

/// Where a linear layer reads and writes: row r of x starts at `x[x_offset + r * k]`, and
/// column c of that row's output lands at `y[offset + r * stride + c]`.
#[derive(Clone, Copy, Debug)]
pub struct LinearOut {
    pub x_offset: usize,
    pub offset: usize,
    pub stride: usize,
    /// Add into y (a fused residual) instead of overwriting it.
    pub accumulate: bool,
}

impl LinearOut {
    /// Dense input and a dense `[m, n]` output that is overwritten.
    pub fn dense(n: usize) -> Self {
        LinearOut {
            x_offset: 0,
            offset: 0,
            stride: n,
            accumulate: false,
        }
    }
}

/// Records `y[r, :] (+)= x[r, :] W^T` for the `m` rows of x (`[m, w.cols]`, dense).
pub fn linear(
    rec: &mut Recorder,
    w: &Weight,
    x: &Tensor,
    m: usize,
    y: &Tensor,
    out: LinearOut,
) -> Result<()> {
    let (n, k) = (w.rows, w.cols);
    check_len("linear input", x, out.x_offset + m * k)?;
    if m > 0 {
        check_len("linear output", y, out.offset + (m - 1) * out.stride + n)?;
    }
    if out.stride < n && m > 1 {
        return Err(RuntimeError::Shape(format!(
            "output stride {} < {n} columns",
            out.stride
        )));
    }
    let row_bytes = w.row_stride as u32;
    let gpu = rec.gpu();
    for part in &w.parts {
        let defines = |family| weight_kernel(gpu, family, w.dtype);
        let mut params = kernel_params(part, k, row_bytes, out);
        let buffers = [part.binding(w.row_stride), x.bind(), y.bind()];
        let rows_layout = rec.gpu().kernel_layout() == KernelLayout::LanePerRow
            && k.is_multiple_of(4)
            && out.x_offset.is_multiple_of(4);
        if rows_layout {
            params.push(m as u32);
            linear_rows(rec, w, part, x, m, y, out, params)?;
        } else if m <= MATVEC_MAX_ROWS {
            let (rows, subgroup) = matvec_split(rec.gpu());
            let key = defines("matvec")
                .define("WG", MATVEC_WG)
                .define("ROWS", rows)
                .define("SUBGROUP", subgroup as u32);
            let groups = split_groups(rec.gpu(), (part.rows as u32).div_ceil(rows), m as u32);
            rec.dispatch(&key, &params, &buffers, groups)?;
        } else {
            params.push(m as u32);
            let groups = [(part.rows as u32).div_ceil(32), (m as u32).div_ceil(32), 1];
            rec.dispatch(&defines("matmul"), &params, &buffers, groups)?;
        }
    }
    Ok(())
}

/// Invocations of a `matvec_rows` workgroup, each owning two rows of W. A workgroup runs on one
/// of the device's threads, so a matrix of 576 rows must split into several of them a thread to
/// keep every thread busy; but each workgroup also copies x and meets at a barrier, so fewer,
/// larger ones cost less where there are few threads. 32 where the CPU device has up to 4
/// (lavapipe starts one a CPU, or `LP_NUM_THREADS`), else 16. SmolLM2-135M Q4_1 tg64 on
/// lavapipe with two cores (2026-12-06, runs interleaved): 16 lanes 27.1/28.1/29.5 t/s, 32 lanes
/// 30.5/30.6/33.3 and 32.5/32.0/33.0, 64 lanes 28.3/28.3/30.0, 8 lanes 25.2-26.1.
fn matvec_lanes() -> u32 {
    static LANES: std::sync::OnceLock<u32> = std::sync::OnceLock::new();
    *LANES.get_or_init(|| {
        let setting = std::env::var("LP_NUM_THREADS").ok();
        let threads = setting.and_then(|v| v.trim().parse::<usize>().ok());
        let threads =
            threads.unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
        if threads <= 4 {
            32
        } else {
            16
        }
    })
}

/// The `Params` words the linear kernels share (see `linear_rows.wgsl`), before `m`.
fn kernel_params(part: &WeightPart, k: usize, row_bytes: u32, out: LinearOut) -> Vec<u32> {
    vec![
        part.rows as u32,
        k as u32,
        part.row_start as u32,
        out.stride as u32,
        out.offset as u32,
        k as u32,
        out.accumulate as u32,
        row_bytes,
        out.x_offset as u32,
    ]
}

/// The lane-per-row kernels (CPU devices) for one part of W. x goes through uniform bindings
/// where the device allows it, in windows of rows that fit one binding: a load of x is then one
/// scalar load for all lanes, where a storage load is one load per lane.
#[allow(clippy::too_many_arguments)]
fn linear_rows(
    rec: &mut Recorder,
    w: &Weight,
    part: &WeightPart,
    x: &Tensor,
    m: usize,
    y: &Tensor,
    out: LinearOut,
    mut params: Vec<u32>,
) -> Result<()> {
    let k = w.cols;
    let tm = match m {
        0..=1 => 1,
        2..=4 => 4,
        _ => 8,
    };
    let gpu = rec.gpu();
    let defines = |family| weight_kernel(gpu, family, w.dtype).define("TM", tm as u32);
    let groups = |rows_of_x: usize| {
        split_groups(
            gpu,
            (part.rows as u32).div_ceil(64),
            (rows_of_x as u32).div_ceil(tm as u32),
        )
    };
    // Rows of x per uniform window: whole multiples of TM.
    let limits = gpu.limits();
    let window = (limits.max_uniform_buffer_binding_size as usize / (4 * k.max(1))) / tm * tm;
    let row_aligned = (k * 4).is_multiple_of(limits.min_uniform_buffer_offset_alignment as usize);
    let windows = window > 0 && (m <= window || row_aligned);
    match uniform_x(rec, x, out.x_offset, m.min(window.max(1)) * k) {
        // Two rows of W a lane share each load of x: faster for 32-element blocks (lavapipe,
        // Q4_1 1536x576: 0.7 -> 0.45 ms), no faster for K-quants.
        Some(_) if m == 1 && matvec_part(rec, w, part, x, y, out, Fusion::default())? => Ok(()),
        Some(_) if windows => {
            for start in (0..m).step_by(window) {
                let rows = window.min(m - start);
                let x_range = uniform_x(rec, x, out.x_offset + start * k, rows * k)
                    .ok_or_else(|| RuntimeError::Shape("x window past its tensor".into()))?;
                let key = defines("linear_rows_ux").define("XV", (rows * k / 4) as u32);
                params[4] = (out.offset + start * out.stride) as u32;
                // The kernel indexes x from the start of the bound range.
                params[8] = 0;
                params[9] = rows as u32;
                let bindings = [part.binding(w.row_stride), x_range, y.bind()];
                rec.dispatch(&key, &params, &bindings, groups(rows))?;
            }
            Ok(())
        }
        _ => {
            let buffers = [part.binding(w.row_stride), x.bind(), y.bind()];
            rec.dispatch(&defines("linear_rows"), &params, &buffers, groups(m))
        }
    }
}

/// Records `out = silu(x gate^T) * (x up^T)` for the `m` rows of x: one fused dispatch where
/// [`linear_swiglu`] can take it (one row, on CPU devices), else the two projections (the up
/// one into `up_out`) and [`swiglu`](crate::ops::swiglu).
pub fn gate_up_swiglu(
    rec: &mut Recorder,
    gate: &Weight,
    up: &Weight,
    x: &Tensor,
    m: usize,
    out: &Tensor,
    up_out: &Tensor,
) -> Result<()> {
    if m == 1 && linear_swiglu(rec, gate, up, x, out)? {
        return Ok(());
    }
    let n = gate.rows;
    linear(rec, gate, x, m, out, LinearOut::dense(n))?;
    linear(rec, up, x, m, up_out, LinearOut::dense(n))?;
    crate::ops::swiglu(rec, out, up_out, m * n)
}

/// A projection's input as RMSNorm of `x` by `weight` (`[k]`): folded into the decode mat-vec
/// where it can take it (one row of an unrolled length, on CPU devices: each SIMD group
/// normalises x before its groups), else run first into `scratch` (x's shape), which the
/// projections then read.
#[derive(Clone, Copy)]
pub struct Normed<'a> {
    pub x: &'a Tensor,
    pub weight: &'a Tensor,
    pub eps: f32,
    pub scratch: &'a Tensor,
}

impl<'a> Normed<'a> {
    /// Records the norm into `scratch` for the `m` rows, and returns it.
    pub fn run(&self, rec: &mut Recorder, m: usize) -> Result<&'a Tensor> {
        let k = self.weight.len();
        crate::ops::rmsnorm(rec, self.x, self.weight, self.scratch, m, k, self.eps)?;
        Ok(self.scratch)
    }
}

/// [`gate_up_swiglu`] of RMSNorm(x): one dispatch for norm, both projections and SwiGLU where
/// [`matvec_fused`] takes them, else the norm and then [`gate_up_swiglu`].
pub fn rmsnorm_gate_up_swiglu(
    rec: &mut Recorder,
    gate: &Weight,
    up: &Weight,
    input: Normed,
    m: usize,
    out: &Tensor,
    up_out: &Tensor,
) -> Result<()> {
    let fusion = Fusion {
        up: Some(up),
        norm: Some(input),
        ..Fusion::default()
    };
    if m == 1 && matvec_fused(rec, gate, input.x, out, LinearOut::dense(gate.rows), fusion)? {
        return Ok(());
    }
    let xn = input.run(rec, m)?;
    gate_up_swiglu(rec, gate, up, xn, m, out, up_out)
}

/// What a decode mat-vec on CPU devices ([`matvec_fused`]) does besides `x W^T`.
#[derive(Clone, Copy, Default)]
pub struct Fusion<'a> {
    /// SwiGLU with this up projection: `y = silu(x W^T) * (x up^T)` (W is the gate).
    pub up: Option<&'a Weight>,
    /// Rotary position embedding of the result (one token).
    pub rope: Option<&'a RopeParams>,
    /// RMSNorm of x first (its `x` is the kernel's x; its scratch is not used).
    pub norm: Option<Normed<'a>>,
}

/// Records `y = silu(x gate^T) * (x up^T)` for one row of x (decoding), in one dispatch, where
/// [`matvec_fused`] can take it. Returns `false` (recording nothing) otherwise; the caller then
/// runs the two projections and [`swiglu`](crate::ops::swiglu).
pub fn linear_swiglu(
    rec: &mut Recorder,
    gate: &Weight,
    up: &Weight,
    x: &Tensor,
    y: &Tensor,
) -> Result<bool> {
    let fusion = Fusion {
        up: Some(up),
        ..Fusion::default()
    };
    matvec_fused(rec, gate, x, y, LinearOut::dense(gate.rows), fusion)
}

/// Records `y = x W^T` for the `m` rows of x, then rotary position embedding on y (`rope`
/// describes y's heads, layout and positions): one fused dispatch where [`matvec_fused`] can
/// take it (one row, on CPU devices), else [`linear`] and [`rope`](crate::ops::rope).
pub fn linear_rope(
    rec: &mut Recorder,
    w: &Weight,
    x: &Tensor,
    m: usize,
    y: &Tensor,
    out: LinearOut,
    rope: &RopeParams,
) -> Result<()> {
    let fusion = Fusion {
        rope: Some(rope),
        ..Fusion::default()
    };
    if m == 1 && matvec_fused(rec, w, x, y, out, fusion)? {
        return Ok(());
    }
    linear(rec, w, x, m, y, out)?;
    crate::ops::rope(rec, y, rope)
}

/// Records `y = x W^T` for one row of x (decoding) with what `fusion` adds, in one dispatch of
/// `matvec_rows.wgsl`, where the device and the weights allow it: the lane-per-row layout, x
/// bindable as uniform, W (and the up projection, of W's type and shape) of a 32-element block
/// type in one part; for RoPE, `heads * head_dim` rows and one token; for SwiGLU and RoPE, no
/// accumulation. Returns `false`, recording nothing, otherwise.
pub fn matvec_fused(
    rec: &mut Recorder,
    w: &Weight,
    x: &Tensor,
    y: &Tensor,
    out: LinearOut,
    fusion: Fusion,
) -> Result<bool> {
    if w.parts.len() != 1 {
        return Ok(false);
    }
    matvec_part(rec, w, &w.parts[0], x, y, out, fusion)
}

/// [`matvec_fused`] on one part of W (SwiGLU and RoPE need W whole).
fn matvec_part(
    rec: &mut Recorder,
    w: &Weight,
    part: &WeightPart,
    x: &Tensor,
    y: &Tensor,
    out: LinearOut,
    fusion: Fusion,
) -> Result<bool> {
    let (n, k) = (part.rows, w.cols);
    let row_bytes = w.row_stride;
    let whole = w.parts.len() == 1;
    let mut fits = rec.gpu().kernel_layout() == KernelLayout::LanePerRow
        && w.dtype.block_size() != 256
        && k.is_multiple_of(4)
        && (whole || (fusion.up.is_none() && fusion.rope.is_none()));
    if let Some(up) = fusion.up {
        fits &= (up.dtype, up.rows, up.cols, up.parts.len()) == (w.dtype, n, k, 1)
            && (n * row_bytes).is_multiple_of(4)
            && !out.accumulate
            && fusion.rope.is_none();
    }
    if let Some(r) = fusion.rope {
        fits &= rope_fits(r, n) && !out.accumulate;
    }
    if let Some(norm) = fusion.norm {
        fits &= whole && norm.weight.len() == k && out.x_offset == 0 && unrolled_groups(k) > 0;
    }
    if !fits {
        return Ok(false);
    }
    let norm_w = match fusion.norm {
        Some(norm) => match uniform_x(rec, norm.weight, 0, k) {
            Some(range) => Some(range),
            None => return Ok(false),
        },
        None => None,
    };
    // Every window's x must bind as uniform before anything is recorded.
    let fused = fusion.up.is_some() || fusion.rope.is_some() || fusion.norm.is_some();
    let windows = column_windows(k, fused);
    let mut x_ranges = Vec::with_capacity(windows.len());
    for &(start, len) in &windows {
        match uniform_x(rec, x, out.x_offset + start, len) {
            Some(range) => x_ranges.push(range),
            None => return Ok(false),
        }
    }
    check_len(
        "a fused mat-vec's output",
        y,
        out.offset + part.row_start + n,
    )?;
    // Lanes own two rows of W, or a gate row and its up row, or a rotated pair.
    let lanes = match (fusion.up, fusion.rope) {
        (Some(_), _) => n as u32,
        (None, Some(_)) => (n / 2) as u32,
        (None, None) => (n as u32).div_ceil(2),
    };
    let groups = split_groups(rec.gpu(), lanes.div_ceil(matvec_lanes()), 1);
    for (i, (&(start, len), x_range)) in windows.iter().zip(x_ranges).enumerate() {
        // W (and the up projection) as textures where the kernel reads them so and all have one.
        let up_texels = match fusion.up {
            Some(up) => Some(texels_for(rec, &up.parts[0], up, len)?),
            None => None,
        };
        let texels = match (texels_for(rec, part, w, len)?, up_texels) {
            (Some(w), None) => Some((w, None)),
            (Some(w), Some(Some(up))) => Some((w, Some(up))),
            _ => None,
        };
        let key = matvec_rows_key(rec.gpu(), w.dtype, len, texels.is_some())
            .define("SWIGLU", fusion.up.is_some() as u32)
            .define("ROPE", fusion.rope.is_some() as u32)
            .define("QKV", 0)
            .define("NORM", fusion.norm.is_some() as u32);
        // Windows after the first add into y.
        let out = LinearOut {
            accumulate: out.accumulate || i > 0,
            ..out
        };
        let mut params = kernel_params(part, len, row_bytes as u32, out);
        // One row of x; SwiGLU's up projection starts where the gate's words end.
        params.extend([1, fusion.up.map_or(0, |_| (n * row_bytes / 4) as u32)]);
        params.extend(fusion.rope.map_or([0; 5], rope_words));
        // The window's first byte in each row of W; no key and value projections.
        params.push((start / 32) as u32 * w.dtype.wgsl_block_bytes());
        params.extend([0; 5]);
        let mut bindings = vec![part.binding(w.row_stride), x_range, y.bind()];
        if let Some(up) = fusion.up {
            bindings.push(up.parts[0].binding(up.row_stride));
        }
        // The first texel of each: W's rows, the up projection's.
        match texels {
            Some(((w_tex, w_texel), up)) => {
                bindings[0] = w_tex;
                params.extend([w_texel, up.map_or(0, |(_, t)| t)]);
                if let Some((up_tex, _)) = up {
                    bindings[3] = up_tex;
                }
            }
            None => params.extend([0, 0]),
        }
        params.push(fusion.norm.map_or(0, |norm| norm.eps.to_bits()));
        bindings.extend(norm_w);
        rec.dispatch(&key, &params, &bindings, groups)?;
    }
    Ok(true)
}

/// One of attention's projections for [`linear_qkv`]: its weight, where it writes, and for
/// queries and keys the rotation of the result.
#[derive(Clone, Copy)]
pub struct Projection<'a> {
    pub w: &'a Weight,
    pub y: &'a Tensor,
    pub out: LinearOut,
    pub rope: Option<&'a RopeParams>,
}

impl Projection<'_> {
    /// Records this projection of the `m` rows of x on its own.
    fn record(&self, rec: &mut Recorder, x: &Tensor, m: usize) -> Result<()> {
        match self.rope {
            Some(rope) => linear_rope(rec, self.w, x, m, self.y, self.out, rope),
            None => linear(rec, self.w, x, m, self.y, self.out),
        }
    }
}

/// Records attention's query, key and value projections of the `m` rows of x, the query and
/// key ones rotated: in one dispatch where [`matvec_qkv`] takes them (one row, on CPU devices,
/// the weights joined by [`Gpu::join_weights`]), else one projection after another.
pub fn linear_qkv(
    rec: &mut Recorder,
    x: &Tensor,
    m: usize,
    q: Projection,
    k: Projection,
    v: Projection,
) -> Result<()> {
    if m == 1 && matvec_qkv(rec, x, None, q, k, v)? {
        return Ok(());
    }
    for p in [q, k, v] {
        p.record(rec, x, m)?;
    }
    Ok(())
}

/// [`linear_qkv`] of RMSNorm(x): one dispatch for the norm and the three projections where
/// [`matvec_qkv`] takes them, else the norm and then [`linear_qkv`].
pub fn rmsnorm_qkv(
    rec: &mut Recorder,
    input: Normed,
    m: usize,
    q: Projection,
    k: Projection,
    v: Projection,
) -> Result<()> {
    if m == 1 && matvec_qkv(rec, input.x, Some(input), q, k, v)? {
        return Ok(());
    }
    let xn = input.run(rec, m)?;
    linear_qkv(rec, xn, m, q, k, v)
}

/// Records the query, key and value projections of one row of x in one dispatch of
/// `matvec_rows.wgsl` (QKV = 1), where the device and weights allow it: the lane-per-row layout;
/// K and V after Q in Q's buffer, of Q's type (32-element blocks) and row length, which x binds
/// whole as uniform; queries and keys rotated alike for one token (only the number of heads
/// may differ); values not rotated; no accumulation. With `norm`, x is first normalised (in the
/// kernel). Returns `false`, recording nothing, otherwise.
pub fn matvec_qkv(
    rec: &mut Recorder,
    x: &Tensor,
    norm: Option<Normed>,
    q: Projection,
    k: Projection,
    v: Projection,
) -> Result<bool> {
    let (Some(qr), Some(kr), None) = (q.rope, k.rope, v.rope) else {
        return Ok(false);
    };
    let Some(&[k_base, v_base]) = q.w.followers(&[k.w, v.w]).as_deref() else {
        return Ok(false);
    };
    let cols = q.w.cols;
    let same_rotation = (qr.head_dim, qr.n_rot, qr.layout, qr.base.to_bits(), qr.pos0)
        == (kr.head_dim, kr.n_rot, kr.layout, kr.base.to_bits(), kr.pos0);
    let kv_rows = k.w.rows;
    let fits = rec.gpu().kernel_layout() == KernelLayout::LanePerRow
        && q.w.dtype.block_size() != 256
        && cols.is_multiple_of(4)
        && (k.w.cols, v.w.cols, v.w.rows) == (cols, cols, kv_rows)
        && same_rotation
        && rope_fits(qr, q.w.rows)
        && rope_fits(kr, kv_rows)
        && [q.out, k.out, v.out].iter().all(|o| !o.accumulate)
        && (k.out.x_offset, v.out.x_offset) == (q.out.x_offset, q.out.x_offset)
        // Q's rows, then K's, then V's, so that one binding from Q covers all three.
        && k_base >= (q.w.rows * q.w.row_stride) as u64
        && k_base + (kv_rows * q.w.row_stride) as u64 <= v_base
        && u32::try_from(v_base).is_ok()
        && norm.is_none_or(|n| {
            n.weight.len() == cols && q.out.x_offset == 0 && unrolled_groups(cols) > 0
        });
    if !fits {
        return Ok(false);
    }
    let Some(x_range) = uniform_x(rec, x, q.out.x_offset, cols) else {
        return Ok(false);
    };
    let norm_w = match norm {
        Some(n) => match uniform_x(rec, n.weight, 0, cols) {
            Some(range) => Some(range),
            None => return Ok(false),
        },
        None => None,
    };
    check_len(
        "the query projection's output",
        q.y,
        q.out.offset + q.w.rows,
    )?;
    check_len("the key projection's output", k.y, k.out.offset + kv_rows)?;
    check_len("the value projection's output", v.y, v.out.offset + kv_rows)?;
    let part = &q.w.parts[0];
    let row_bytes = q.w.row_stride;
    // Textures locate a lane's rows on a grid of whole rows from Q's first.
    let on_grid = [k_base, v_base]
        .iter()
        .all(|b| b.is_multiple_of(row_bytes as u64));
    let texels = match on_grid {
        true => texels_for(rec, part, q.w, cols)?,
        false => None,
    };
    let key = matvec_rows_key(rec.gpu(), q.w.dtype, cols, texels.is_some())
        .define("SWIGLU", 0)
        .define("ROPE", 0)
        .define("QKV", 1)
        .define("NORM", norm.is_some() as u32);
    let mut params = kernel_params(part, cols, row_bytes as u32, q.out);
    // One row of x, no up projection; the rotation; whole rows (no column window).
    params.extend([1, 0]);
    params.extend(rope_words(qr));
    params.push(0);
    params.extend([
        kv_rows as u32,
        k_base as u32,
        v_base as u32,
        k.out.offset as u32,
        v.out.offset as u32,
    ]);
    // The three weights as one binding, from Q's first row to the slack after V's last.
    let span = v_base + (kv_rows * row_bytes) as u64 + WEIGHT_SLACK;
    let weights = match texels {
        Some((binding, first)) => {
            params.extend([first, 0]);
            binding
        }
        None => {
            params.extend([0, 0]);
            Binding::buffer_range(&part.buffer, part.offset, span)
        }
    };
    params.push(norm.map_or(0, |n| n.eps.to_bits()));
    let mut bindings = vec![weights, x_range, q.y.bind(), k.y.bind(), v.y.bind()];
    bindings.extend(norm_w);
    // A lane for each pair of rows: query and key pairs, then value pairs.
    let lanes = ((q.w.rows + 2 * kv_rows) / 2) as u32;
    let groups = split_groups(rec.gpu(), lanes.div_ceil(matvec_lanes()), 1);
    rec.dispatch(&key, &params, &bindings, groups)?;
    Ok(true)
}

/// The `matvec_rows` kernel for rows (or column windows) of `len` elements of `dtype`, its
/// weights bound as textures or not, before its fusion defines (SWIGLU, ROPE, QKV).
fn matvec_rows_key(gpu: &Gpu, dtype: DType, len: usize, texels: bool) -> PipelineKey {
    weight_kernel(gpu, "matvec_rows", dtype)
        .define("WTEX", texels as u32)
        .define("XV", (len / 4) as u32)
        .define("LANES", matvec_lanes())
        .define("UNROLL", unrolled_groups(len))
        .define("XSHARED", x_shared_fits(gpu, len) as u32)
}

/// Whether an unrolled `matvec_rows` kernel over rows of `len` elements copies x into workgroup
/// memory first (`XSHARED`; see `shaders::norm_input`): x and one vector of squares a lane
/// must fit the device's workgroup storage.
fn x_shared_fits(gpu: &Gpu, len: usize) -> bool {
    let bytes = 4 * len + 16 * matvec_lanes() as usize;
    let room = gpu.limits().max_compute_workgroup_storage_size as usize;
    gpu.shared_x() && unrolled_groups(len) > 0 && bytes <= room
}

/// The texture binding of `part` of `w` (and its first texel) where `matvec_rows` reads it
/// from its texture ([`Gpu::weight_textures`], made here on first use): rows (or windows) of
/// `len` elements of w's type are read 16 bytes a load ([`DType::reads_from_texels`],
/// unrolled), which the texture's row-locating accessors serve (other kernels locate words by
/// division there), and the part starts on the texture's grid of whole rows.
fn texels_for<'a>(
    rec: &Recorder,
    part: &'a WeightPart,
    w: &Weight,
    len: usize,
) -> Result<Option<(Binding<'a>, u32)>> {
    let on_grid = part.offset.is_multiple_of(w.row_stride as u64);
    if w.dtype.reads_from_texels() && unrolled_groups(len) > 0 && on_grid {
        part.texel_binding(rec.gpu(), w.row_stride)
    } else {
        Ok(None)
    }
}

/// Whether `matvec_rows` can rotate a projection of `rows` rows for `r`: one token, whole heads
/// and rotated pairs.
fn rope_fits(r: &RopeParams, rows: usize) -> bool {
    r.tokens == 1
        && r.head_dim.is_multiple_of(2)
        && r.n_rot.is_multiple_of(2)
        && r.n_rot > 0
        && r.n_rot <= r.head_dim
        && rows == r.heads * r.head_dim
}

/// The rotation's words of `matvec_rows`'s parameters (head_dim .. base).
fn rope_words(r: &RopeParams) -> [u32; 5] {
    [
        r.head_dim as u32,
        r.n_rot as u32,
        (r.layout == RopeLayout::Neox) as u32,
        r.pos0 as u32,
        r.base.to_bits(),
    ]
}

/// The column windows `(start, len)` one decode mat-vec over rows of `k` elements runs as: the
/// whole row, or, for a row longer than the unrolled length, equal windows of a multiple of 8
/// groups of 32 (so that each starts 16-byte aligned in every 32-element block type), each
/// unrolled, the later ones adding into y: SmolLM2's 1536-wide down projection runs as two
/// windows of 768, whose one kernel compiles in a fraction of the 48-group one's time. Fused
/// kernels need whole dot products, and rows of more than 4 windows loop instead.
fn column_windows(k: usize, fused: bool) -> Vec<(usize, usize)> {
    let (max, groups) = (max_unrolled_groups() / 8 * 8, k / 32);
    if fused || !k.is_multiple_of(32) || groups <= max || max == 0 || groups > 4 * max {
        return vec![(0, k)];
    }
    let per = groups.div_ceil(groups.div_ceil(max)).div_ceil(8) * 8;
    (0..groups)
        .step_by(per)
        .map(|g| (32 * g, 32 * per.min(groups - g)))
        .collect()
}

/// Groups of 32 elements the decode mat-vec unrolls, with constant indices into x and constant
/// block offsets, for rows of `k` elements; 0 (a loop) for longer rows. Unrolled code runs ~1.5x
/// faster on lavapipe but takes the driver seconds to compile (SmolLM2-135M's 576-long rows:
/// ~3 s a kernel), and the time grows faster than the row: `TESSERA_MATVEC_UNROLL` sets the
/// longest row unrolled, in groups (0: none).
fn unrolled_groups(k: usize) -> u32 {
    let groups = k / 32;
    if groups <= max_unrolled_groups() {
        groups as u32
    } else {
        0
    }
}

/// The longest row, in groups of 32, that the decode mat-vec unrolls (`unrolled_groups`):
/// `TESSERA_MATVEC_UNROLL`, else 32. A setting that changes decode speed, which benchmarks
/// report beside their figures.
pub fn max_unrolled_groups() -> usize {
    static MAX: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *MAX.get_or_init(|| unroll_setting(std::env::var("TESSERA_MATVEC_UNROLL").ok().as_deref()))
}

/// The unrolled length a `TESSERA_MATVEC_UNROLL` value asks for, within the limit; a value
/// that is not a number is reported and the default used.
fn unroll_setting(value: Option<&str>) -> usize {
    let Some(value) = value else {
        return MATVEC_MAX_UNROLL;
    };
    match value.trim().parse::<usize>() {
        Ok(groups) if groups <= MATVEC_UNROLL_LIMIT => groups,
        Ok(_) => {
            log::warn!(
                "TESSERA_MATVEC_UNROLL={value}: at most {MATVEC_UNROLL_LIMIT} groups are \
                 unrolled (longer kernels take minutes to compile): using {MATVEC_UNROLL_LIMIT}"
            );
            MATVEC_UNROLL_LIMIT
        }
        Err(_) => {
            log::warn!(
                "TESSERA_MATVEC_UNROLL={value} is not a number of groups of 32 (0 to \
                 {MATVEC_UNROLL_LIMIT}): using {MATVEC_MAX_UNROLL}"
            );
            MATVEC_MAX_UNROLL
        }
    }
}

/// The most groups `TESSERA_MATVEC_UNROLL` may ask for.
const MATVEC_UNROLL_LIMIT: usize = 128;

/// The longest row, in groups of 32, that [`unrolled_groups`] unrolls by default.
const MATVEC_MAX_UNROLL: usize = 32;

/// The `len` elements of `x` from `offset` as a uniform binding, where the device allows it:
/// the buffer can be bound as uniform, the offset is aligned and the range fits the limit.
fn uniform_x<'a>(rec: &Recorder, x: &'a Tensor, offset: usize, len: usize) -> Option<Binding<'a>> {
    let limits = rec.gpu().limits();
    let (start, size) = (offset as u64 * 4, len as u64 * 4);
    let usable = x.buffer().usage().contains(wgpu::BufferUsages::UNIFORM)
        && start.is_multiple_of(limits.min_uniform_buffer_offset_alignment as u64)
        && size > 0
        && size <= limits.max_uniform_buffer_binding_size;
    usable.then_some(Binding::range(x, start, size))
}

/// CPU reference: `x [m, k]` times the dequantised weight's transpose, accumulated in f64.
pub fn linear_ref(w_bytes: &[u8], w: &Weight, x: &[f32], m: usize) -> Vec<f32> {
    let (n, k) = (w.rows, w.cols);
    let row_bytes = w.dtype.row_bytes(k).unwrap_or(0);
    let mut wf = vec![0.0f32; k];
    let mut y = vec![0.0f32; m * n];
    for r in 0..n {
        dequantize_row(
            w.dtype,
            &w_bytes[r * row_bytes..(r + 1) * row_bytes],
            &mut wf,
        );
        for i in 0..m {
            let xr = &x[i * k..(i + 1) * k];
            y[i * n + r] = xr
                .iter()
                .zip(&wf)
                .map(|(&a, &b)| a as f64 * b as f64)
                .sum::<f64>() as f32;
        }
    }
    y
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gpu::{Gpu, GpuOptions, KernelLayout};
    use crate::ops::test_util::{gpu, gpus, max_rel_err, narrow_rows};
    use crate::tensor::DType;
    use crate::testing::{random_f32, random_weight};

    fn check(gpu: &Gpu, dtype: DType, m: usize, n: usize, k: usize, seed: u64) {
        let bytes = random_weight(dtype, n, k, seed);
        let w = gpu.upload_weight("w", dtype, n, k, &bytes).unwrap();
        check_weight(gpu, &w, &bytes, m, seed);
    }

    /// `linear` of `m` random rows of x through `w` (made from `bytes`) against the reference.
    fn check_weight(gpu: &Gpu, w: &Weight, bytes: &[u8], m: usize, seed: u64) {
        let (dtype, n, k) = (w.dtype, w.rows, w.cols);
        let x = random_f32(m * k, seed + 1);
        let xt = gpu.tensor_from(&[m, k], &x).unwrap();
        let yt = gpu.tensor(&[m, n]).unwrap();
        let mut rec = Recorder::new(gpu);
        linear(&mut rec, w, &xt, m, &yt, LinearOut::dense(n)).unwrap();
        rec.submit().unwrap();
        let got = gpu.read(&yt).unwrap();
        let want = linear_ref(bytes, w, &x, m);
        let err = max_rel_err(&got, &want);
        assert!(
            err < 1e-4,
            "{dtype:?} m={m} n={n} k={k}: relative error {err}"
        );
    }

    #[test]
    fn matvec_matches_cpu_reference_for_every_type_on_odd_shapes() {
        for dtype in DType::ALL {
            // K-quant rows are whole 256-element super-blocks.
            let shapes = if dtype.block_size() == 256 {
                vec![(37, 512), (1, 256), (201, 768), (5, 1024)]
            } else {
                // 544: 17 groups, unrolled (odd, and its last block's words reach the padding);
                // 1088: 34, two column windows (24 + 10 groups); 4128: 129, a loop.
                vec![(37, 96), (1, 32), (201, 544), (5, 1088), (3, 4128)]
            };
            for (i, &(n, k)) in shapes.iter().enumerate() {
                for m in [1, 3] {
                    for gpu in gpus() {
                        check(gpu, dtype, m, n, k, 10 * i as u64 + m as u64);
                    }
                }
                // 32-bit weight loads: a short row and column windows, decoding.
                if i == 0 || i == 3 {
                    check(narrow_rows(), dtype, 1, n, k, 10 * i as u64 + 1);
                }
            }
        }
    }

    #[test]
    fn weights_load_as_64_bit_words_only_on_cpu_devices_with_64_bit_integers() {
        let [cooperative, rows] = gpus();
        assert!(!cooperative.wide_weight_loads());
        assert_eq!(rows.wide_weight_loads(), rows.features().shader_int64);
        assert!(!narrow_rows().wide_weight_loads());
        // The two loads read the same bytes: one key each, and the same result (the test above
        // checks both against the reference).
        let wide = weight_kernel(rows, "matvec_rows", DType::Q4_1);
        let narrow = weight_kernel(narrow_rows(), "matvec_rows", DType::Q4_1);
        assert_eq!(wide == narrow, !rows.wide_weight_loads());
    }

    #[test]
    fn decode_mat_vecs_read_interleaved_weight_textures_only_on_cpu_devices() {
        let [cooperative, rows] = gpus();
        assert!(!cooperative.weight_textures());
        assert!(!narrow_rows().weight_textures());
        let texels = rows.limits().max_texture_dimension_2d >= crate::tensor::TEXEL_ROW;
        assert_eq!(rows.weight_textures(), texels);
        // 37 rows of 96 (stride 64 bytes, 4 texels): four groups of 8 and a partial one, and
        // one group more for reads past a row's end.
        let (n, k) = (37, 96);
        let made = |w: &Weight| w.parts[0].texels.get().map(|t| t.as_ref().map(|t| t.bytes));
        for gpu in [cooperative, rows, narrow_rows()] {
            let bytes = random_weight(DType::Q4_1, n, k, 3);
            let w = gpu.upload_weight("w", DType::Q4_1, n, k, &bytes).unwrap();
            // Made when the decode mat-vec first asks, which only lane-per-row devices do.
            assert_eq!(made(&w), None, "{}", gpu.name());
            check_weight(gpu, &w, &bytes, 1, 3);
            let expected = (gpu.kernel_layout() == KernelLayout::LanePerRow)
                .then(|| gpu.weight_textures().then_some((5 + 1) * 8 * 4 * 16));
            assert_eq!(made(&w), expected, "{}", gpu.name());
            // Types the decode mat-vec reads otherwise never ask for one.
            let bytes = random_weight(DType::Q4_K, 3, 256, 4);
            let k_quant = gpu.upload_weight("w", DType::Q4_K, 3, 256, &bytes).unwrap();
            check_weight(gpu, &k_quant, &bytes, 1, 4);
            assert_eq!(made(&k_quant), None);
            // The decode mat-vec ran from the texture where there is one.
            if gpu.kernel_layout() == KernelLayout::LanePerRow {
                let key = matvec_rows_key(gpu, DType::Q4_1, k, gpu.weight_textures())
                    .define("SWIGLU", 0)
                    .define("ROPE", 0)
                    .define("QKV", 0)
                    .define("NORM", 0);
                assert!(gpu.pipelines.lookup(&key).is_some(), "{}", gpu.name());
            }
        }
    }

    #[test]
    fn the_unroll_setting_is_a_number_of_groups_within_the_limit() {
        assert_eq!(unroll_setting(None), MATVEC_MAX_UNROLL);
        assert_eq!(unroll_setting(Some("0")), 0);
        assert_eq!(unroll_setting(Some(" 48 ")), 48);
        assert_eq!(unroll_setting(Some("100000")), MATVEC_UNROLL_LIMIT);
        for bad in ["abc", "-3", "", "1.5"] {
            assert_eq!(unroll_setting(Some(bad)), MATVEC_MAX_UNROLL, "{bad:?}");
        }
    }

    #[test]
    fn column_windows_tile_the_row_in_aligned_unrolled_pieces() {
        let max = max_unrolled_groups();
        for k in [32, 96, 544, 1024, 1088, 1536, 4096, 4128, 11008, 14336, 100] {
            let windows = column_windows(k, false);
            let mut next = 0;
            for &(start, len) in &windows {
                assert_eq!(start, next, "k={k}: {windows:?}");
                assert!(start % 256 == 0 && len > 0, "k={k}: {windows:?}");
                next = start + len;
            }
            assert_eq!(next, k, "k={k}: {windows:?}");
            if windows.len() > 1 {
                assert!(
                    windows.iter().all(|&(_, len)| len / 32 <= max),
                    "{windows:?}"
                );
            }
            assert_eq!(column_windows(k, true), [(0, k)]);
        }
        if max == MATVEC_MAX_UNROLL {
            assert_eq!(column_windows(1536, false), [(0, 768), (768, 768)]);
            assert_eq!(column_windows(544, false), [(0, 544)]);
        }
    }

    #[test]
    fn the_cooperative_matvec_sums_rows_with_and_without_subgroups() {
        for no_subgroups in [false, true] {
            let gpu = Gpu::new(&GpuOptions {
                layout: Some(KernelLayout::Cooperative),
                no_subgroups,
                ..Default::default()
            })
            .unwrap();
            let (rows, subgroup) = matvec_split(&gpu);
            assert!(
                !(no_subgroups && subgroup),
                "subgroups used though turned off"
            );
            if !no_subgroups && gpu.features().subgroup && gpu.features().subgroup_min_size >= 4 {
                assert!(
                    subgroup,
                    "the device has subgroups, the kernel does not use them"
                );
            }
            assert!(MATVEC_WG / rows <= MATVEC_TPR);
            for (dtype, n, k) in [
                (DType::Q4_1, 37, 96),
                (DType::Q6_K, 19, 512),
                (DType::F16, 9, 61),
            ] {
                for m in [1, 3] {
                    check(&gpu, dtype, m, n, k, 40 + m as u64);
                }
            }
        }
    }

    /// A Q4_K weight `[4, 256]`, an input and an output: a mat-vec the fused kernels leave to
    /// their callers.
    fn k_quant_matvec(gpu: &Gpu) -> (Weight, Tensor, Tensor) {
        let bytes = random_weight(DType::Q4_K, 4, 256, 4);
        let q = gpu.upload_weight("q", DType::Q4_K, 4, 256, &bytes).unwrap();
        let x = gpu.tensor_from(&[256], &random_f32(256, 5)).unwrap();
        (q, x, gpu.tensor(&[4]).unwrap())
    }

    #[test]
    fn fused_gate_up_swiglu_matches_the_unfused_kernels() {
        // The fused kernel is the lane-per-row layout's, with 64-bit weight loads and without.
        for gpu in [gpus()[1], narrow_rows()] {
            fused_gate_up_swiglu_on(gpu);
        }
    }

    fn fused_gate_up_swiglu_on(gpu: &Gpu) {
        for (dtype, n, k) in [
            (DType::Q4_1, 67, 96),
            (DType::Q8_0, 130, 64),
            (DType::F16, 5, 12),
        ] {
            let gate_bytes = random_weight(dtype, n, k, 1);
            let up_bytes = random_weight(dtype, n, k, 2);
            let gate = gpu.upload_weight("gate", dtype, n, k, &gate_bytes).unwrap();
            let up = gpu.upload_weight("up", dtype, n, k, &up_bytes).unwrap();
            let x = gpu.tensor_from(&[k], &random_f32(k, 3)).unwrap();
            let (g, u, fused) = (
                gpu.tensor(&[n]).unwrap(),
                gpu.tensor(&[n]).unwrap(),
                gpu.tensor(&[n]).unwrap(),
            );
            let mut rec = Recorder::new(gpu);
            assert!(linear_swiglu(&mut rec, &gate, &up, &x, &fused).unwrap());
            linear(&mut rec, &gate, &x, 1, &g, LinearOut::dense(n)).unwrap();
            linear(&mut rec, &up, &x, 1, &u, LinearOut::dense(n)).unwrap();
            crate::ops::swiglu(&mut rec, &g, &u, n).unwrap();
            rec.submit().unwrap();
            let (want, got) = (gpu.read(&g).unwrap(), gpu.read(&fused).unwrap());
            let err = max_rel_err(&got, &want);
            assert!(err < 1e-5, "{dtype:?} {n}x{k}: fused differs by {err}");

            // The norm folded in: one dispatch against the norm and then the fused kernel.
            let norm = NormCase::new(gpu, k);
            let mut rec = Recorder::new(gpu);
            rmsnorm_gate_up_swiglu(&mut rec, &gate, &up, norm.input(0), 1, &fused, &u).unwrap();
            let folded = unrolled_groups(k) > 0;
            assert_eq!(rec.dispatch_count(), 2 - folded as usize, "{dtype:?} k={k}");
            let xn = norm.input(1).run(&mut rec, 1).unwrap();
            assert!(linear_swiglu(&mut rec, &gate, &up, xn, &g).unwrap());
            rec.submit().unwrap();
            let (want, got) = (gpu.read(&g).unwrap(), gpu.read(&fused).unwrap());
            let err = max_rel_err(&got, &want);
            assert!(
                err < 1e-5,
                "{dtype:?} {n}x{k}: folded norm differs by {err}"
            );
        }
        // K-quants and a mismatch of types are left to the caller.
        let (q, x, y) = k_quant_matvec(gpu);
        assert!(!linear_swiglu(&mut Recorder::new(gpu), &q, &q, &x, &y).unwrap());
    }

    #[test]
    fn fused_linear_rope_matches_linear_then_rope() {
        // The fused kernel is the lane-per-row layout's.
        let gpu = gpus()[1];
        for (dtype, heads, head_dim, n_rot, layout, k) in [
            (DType::Q4_1, 3, 8, 8, RopeLayout::Normal, 96),
            (DType::Q8_0, 2, 12, 8, RopeLayout::Neox, 64),
            (DType::Q4_0, 1, 64, 64, RopeLayout::Neox, 32),
            (DType::F32, 5, 6, 4, RopeLayout::Normal, 12),
        ] {
            let n = heads * head_dim;
            let w_bytes = random_weight(dtype, n, k, 6);
            let w = gpu.upload_weight("w", dtype, n, k, &w_bytes).unwrap();
            let x = gpu.tensor_from(&[k], &random_f32(k, 7)).unwrap();
            // Written two rows in, as into a key cache at position 2.
            let out = LinearOut {
                x_offset: 0,
                offset: 2 * n,
                stride: n,
                accumulate: false,
            };
            let rope = RopeParams {
                heads,
                head_dim,
                n_rot,
                layout,
                base: 10000.0,
                pos0: 37,
                tokens: 1,
                offset: 2 * n,
                stride: n,
            };
            let (want, got) = (gpu.tensor(&[3 * n]).unwrap(), gpu.tensor(&[3 * n]).unwrap());
            let mut rec = Recorder::new(gpu);
            crate::ops::fill(&mut rec, &got, 0.5, 3 * n).unwrap();
            let fusion = Fusion {
                rope: Some(&rope),
                ..Fusion::default()
            };
            assert!(matvec_fused(&mut rec, &w, &x, &got, out, fusion).unwrap());
            linear(&mut rec, &w, &x, 1, &want, out).unwrap();
            crate::ops::rope(&mut rec, &want, &rope).unwrap();
            rec.submit().unwrap();
            let (want, got) = (gpu.read(&want).unwrap(), gpu.read(&got).unwrap());
            assert!(
                got[..2 * n].iter().all(|&v| v == 0.5),
                "rows before the offset kept"
            );
            let err = max_rel_err(&got[2 * n..], &want[2 * n..]);
            assert!(err < 1e-5, "{dtype:?} {layout:?}: fused differs by {err}");
        }
        // K-quants, several tokens and accumulation are left to `linear_rope`'s fallback.
        let (q, x, y) = k_quant_matvec(gpu);
        let rope = RopeParams {
            heads: 1,
            head_dim: 4,
            n_rot: 4,
            layout: RopeLayout::Normal,
            base: 10000.0,
            pos0: 0,
            tokens: 1,
            offset: 0,
            stride: 4,
        };
        let mut rec = Recorder::new(gpu);
        let fusion = Fusion {
            rope: Some(&rope),
            ..Fusion::default()
        };
        assert!(!matvec_fused(&mut rec, &q, &x, &y, LinearOut::dense(4), fusion).unwrap());
        assert_eq!(rec.dispatch_count(), 0);
    }

    /// A residual row far from unit scale, an RMSNorm weight, and two scratch rows.
    struct NormCase {
        x: Tensor,
        weight: Tensor,
        scratch: [Tensor; 2],
    }

    impl NormCase {
        fn new(gpu: &Gpu, k: usize) -> Self {
            let x: Vec<f32> = random_f32(k, 7).iter().map(|v| 6.0 * v + 0.5).collect();
            NormCase {
                x: gpu.tensor_from(&[k], &x).unwrap(),
                weight: gpu.tensor_from(&[k], &random_f32(k, 8)).unwrap(),
                scratch: [gpu.tensor(&[k]).unwrap(), gpu.tensor(&[k]).unwrap()],
            }
        }

        fn input(&self, scratch: usize) -> Normed<'_> {
            Normed {
                x: &self.x,
                weight: &self.weight,
                eps: 1e-5,
                scratch: &self.scratch[scratch],
            }
        }
    }

    /// Query, key and value projections of weights `w` into `y`, the keys and values at `cache`.
    fn projections<'a>(
        w: &'a [Weight; 3],
        y: &'a [Tensor; 3],
        cache: LinearOut,
        [q_rope, k_rope]: [&'a RopeParams; 2],
    ) -> (Projection<'a>, Projection<'a>, Projection<'a>) {
        let q = Projection {
            w: &w[0],
            y: &y[0],
            out: LinearOut::dense(w[0].rows),
            rope: Some(q_rope),
        };
        let k = Projection {
            w: &w[1],
            y: &y[1],
            out: cache,
            rope: Some(k_rope),
        };
        let v = Projection {
            w: &w[2],
            y: &y[2],
            out: cache,
            rope: None,
        };
        (q, k, v)
    }

    #[test]
    fn fused_qkv_matches_the_three_projections() {
        // The fused kernel is the lane-per-row layout's.
        let gpu = gpus()[1];
        for (dtype, q_heads, kv_heads, head_dim, n_rot, layout, k) in [
            (DType::Q4_1, 9, 3, 8, 8, RopeLayout::Normal, 96),
            (DType::Q8_0, 4, 1, 12, 8, RopeLayout::Neox, 64),
            (DType::Q4_0, 2, 2, 64, 64, RopeLayout::Neox, 32),
            (DType::IQ4_NL, 3, 1, 6, 4, RopeLayout::Normal, 160),
            (DType::F16, 5, 1, 6, 4, RopeLayout::Normal, 12),
            // Rows longer than the unrolled length: the kernel's loop over groups.
            (DType::Q8_0, 2, 1, 16, 16, RopeLayout::Neox, 1088),
        ] {
            let (nq, nkv) = (q_heads * head_dim, kv_heads * head_dim);
            let upload = |name, rows, seed| {
                let bytes = random_weight(dtype, rows, k, seed);
                gpu.upload_weight(name, dtype, rows, k, &bytes).unwrap()
            };
            let alone = [upload("q", nq, 1), upload("k", nkv, 2), upload("v", nkv, 3)];
            let joined = [upload("q", nq, 1), upload("k", nkv, 2), upload("v", nkv, 3)];
            let joined: [Weight; 3] = gpu
                .join_weights("qkv", joined.into())
                .unwrap()
                .try_into()
                .ok()
                .unwrap();
            let x = gpu.tensor_from(&[k], &random_f32(k, 4)).unwrap();
            // Keys and values go to row 2 of their caches, as for position 2.
            let cache = LinearOut {
                x_offset: 0,
                offset: 2 * nkv,
                stride: nkv,
                accumulate: false,
            };
            let rope = |heads, offset, stride| RopeParams {
                heads,
                head_dim,
                n_rot,
                layout,
                base: 10000.0,
                pos0: 2,
                tokens: 1,
                offset,
                stride,
            };
            let (q_rope, k_rope) = (rope(q_heads, 0, nq), rope(kv_heads, 2 * nkv, nkv));
            let outputs = || {
                let t = |len| gpu.tensor_from(&[len], &vec![0.5; len]).unwrap();
                [t(nq), t(3 * nkv), t(3 * nkv)]
            };
            let (want, got) = (outputs(), outputs());
            let mut rec = Recorder::new(gpu);
            let (q, k_, v) = projections(&joined, &got, cache, [&q_rope, &k_rope]);
            let (k_swapped, v_swapped) = (
                Projection {
                    w: &joined[2],
                    ..k_
                },
                Projection { w: &joined[1], ..v },
            );
            assert!(
                !matvec_qkv(&mut rec, &x, None, q, k_swapped, v_swapped).unwrap(),
                "keys after values cannot run as one"
            );
            let (q, k_, v) = projections(&alone, &want, cache, [&q_rope, &k_rope]);
            assert!(
                !matvec_qkv(&mut rec, &x, None, q, k_, v).unwrap(),
                "weights in their own buffers cannot run as one"
            );
            linear_qkv(&mut rec, &x, 1, q, k_, v).unwrap();
            let unfused = rec.dispatch_count();
            let (q, k_, v) = projections(&joined, &got, cache, [&q_rope, &k_rope]);
            linear_qkv(&mut rec, &x, 1, q, k_, v).unwrap();
            assert_eq!(
                rec.dispatch_count(),
                unfused + 1,
                "{dtype:?}: not one dispatch"
            );
            rec.submit().unwrap();
            for (i, what) in ["queries", "keys", "values"].iter().enumerate() {
                let (want, got) = (gpu.read(&want[i]).unwrap(), gpu.read(&got[i]).unwrap());
                let start = if i == 0 { 0 } else { 2 * nkv };
                assert!(
                    got[..start].iter().all(|&v| v == 0.5),
                    "{dtype:?} {what}: rows before the cache position written"
                );
                let err = max_rel_err(&got[start..], &want[start..]);
                assert!(
                    err < 1e-5,
                    "{dtype:?} {layout:?} {what}: fused differs by {err}"
                );
            }

            // The norm folded in (unrolled rows only): against the norm, then the fused kernel.
            let norm = NormCase::new(gpu, k);
            let (want, got) = (outputs(), outputs());
            let mut rec = Recorder::new(gpu);
            let (q, k_, v) = projections(&joined, &got, cache, [&q_rope, &k_rope]);
            rmsnorm_qkv(&mut rec, norm.input(0), 1, q, k_, v).unwrap();
            let folded = unrolled_groups(k) > 0;
            assert_eq!(rec.dispatch_count(), 2 - folded as usize, "{dtype:?} k={k}");
            let xn = norm.input(1).run(&mut rec, 1).unwrap();
            let (q, k_, v) = projections(&joined, &want, cache, [&q_rope, &k_rope]);
            linear_qkv(&mut rec, xn, 1, q, k_, v).unwrap();
            rec.submit().unwrap();
            for (i, what) in ["queries", "keys", "values"].iter().enumerate() {
                let (want, got) = (gpu.read(&want[i]).unwrap(), gpu.read(&got[i]).unwrap());
                let err = max_rel_err(&got, &want);
                assert!(err < 1e-5, "{dtype:?} {what}: folded norm differs by {err}");
            }
        }
    }

    #[test]
    fn float_rows_of_any_length_match_cpu_reference() {
        for dtype in [DType::F32, DType::F16] {
            for (n, k) in [(5, 7), (33, 61), (3, 1), (9, 12)] {
                for gpu in gpus() {
                    check(gpu, dtype, 1, n, k, 7);
                    check(gpu, dtype, 9, n, k, 8);
                }
            }
        }
    }

    #[test]
    fn matmul_matches_cpu_reference_for_every_type_on_odd_shapes() {
        for dtype in DType::ALL {
            let shapes = if dtype.block_size() == 256 {
                [(5, 37, 512), (33, 65, 768), (70, 3, 256), (17, 130, 512)]
            } else {
                [(5, 37, 96), (33, 65, 160), (70, 3, 32), (17, 130, 64)]
            };
            for (m, n, k) in shapes {
                for gpu in gpus() {
                    check(gpu, dtype, m, n, k, (m * n) as u64);
                }
            }
        }
    }

    #[test]
    fn weights_split_over_the_binding_limit_give_the_same_result() {
        for layout in [KernelLayout::Cooperative, KernelLayout::LanePerRow] {
            let options = GpuOptions {
                max_binding_override: Some(8192),
                layout: Some(layout),
                ..Default::default()
            };
            let small = Gpu::new(&options).unwrap();
            let bytes = random_weight(DType::Q8_0, 300, 96, 3);
            let w = small
                .upload_weight("w", DType::Q8_0, 300, 96, &bytes)
                .unwrap();
            assert!(
                w.parts.len() > 1,
                "expected a split, got {} part(s)",
                w.parts.len()
            );
            for m in [1, 6] {
                check(&small, DType::Q8_0, m, 300, 96, 3);
                check(&small, DType::Q4_1, m, 257, 64, 4);
                // 210-byte rows: every other row of a part starts 2-byte aligned.
                check(&small, DType::Q6_K, m, 77, 256, 5);
            }
        }
    }

    #[test]
    fn accumulate_adds_into_the_output_at_an_offset() {
        let gpu = gpu();
        let (n, k) = (40, 64);
        let bytes = random_weight(DType::Q4_0, n, k, 1);
        let w = gpu.upload_weight("w", DType::Q4_0, n, k, &bytes).unwrap();
        let x = random_f32(k, 2);
        let base = random_f32(n + 5, 3);
        let xt = gpu.tensor_from(&[k], &x).unwrap();
        let yt = gpu.tensor_from(&[n + 5], &base).unwrap();
        let mut rec = Recorder::new(gpu);
        let out = LinearOut {
            x_offset: 0,
            offset: 5,
            stride: n,
            accumulate: true,
        };
        linear(&mut rec, &w, &xt, 1, &yt, out).unwrap();
        rec.submit().unwrap();
        let got = gpu.read(&yt).unwrap();
        let prod = linear_ref(&bytes, &w, &x, 1);
        let mut want = base.clone();
        for i in 0..n {
            want[5 + i] += prod[i];
        }
        assert!(max_rel_err(&got, &want) < 1e-4);
    }

    #[test]
    fn quantized_rows_that_are_not_whole_blocks_are_rejected() {
        assert!(DType::Q4_1.row_bytes(40).is_err());
        assert!(gpu()
            .upload_weight("w", DType::Q8_0, 2, 40, &[0; 80])
            .is_err());
    }
}
