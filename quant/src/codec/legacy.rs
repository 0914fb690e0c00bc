//! Legacy block types (32 elements per block): Q4_0, Q4_1, Q5_0, Q5_1, Q8_0 and IQ4_NL.
//!
//! The encoders follow ggml's quantizers (`ggml/src/ggml-quants.c`) step by step, in the same f32
//! operation order, so that their output is byte-identical to `ggml_quantize_chunk`: the reference
//! (round-to-scale) encoders without an importance matrix, and the weighted scale searches with
//! one. Block layouts are GGUF's (`ggml/src/ggml-common.h`); all scales are little-endian f16.
//!
//! Grid codes are the signed integer multiplier of the scale for the symmetric types (Q4_0,
//! Q5_0, Q8_0), so that `Grid::value` reproduces ggml's dequantisation bit for bit; `set_quant`
//! clamps a code into its grid's range. `quantize_row` takes whole 32-element blocks.

use half::f16;

use tessera_runtime::tensor::IQ4_NL_LEVELS;

use super::{nearest_int, signed_max, BlockCodec, Grid};

/// Elements per block, for every type here.
const QK: usize = 32;

/// Below this absolute maximum a block counts as all zero (ggml's `GROUP_MAX_EPS`).
const GROUP_MAX_EPS: f32 = 1e-15;

fn put_f16(bytes: &mut [u8], x: f32) {
    bytes[..2].copy_from_slice(&f16::from_f32(x).to_le_bytes());
}

fn get_f16(bytes: &[u8]) -> f32 {
    f16::from_le_bytes([bytes[0], bytes[1]]).to_f32()
}

fn min_max(x: &[f32]) -> (f32, f32) {
    let (mut min, mut max) = (f32::MAX, -f32::MAX);
    for &v in x {
        if v < min {
            min = v;
        }
        if v > max {
            max = v;
        }
    }
    (min, max)
}

/// Mean square of the whole row: ggml's weighted legacy quantizers add it to every x^2 when
/// they turn importances into per-element weights.
fn row_sigma2(x: &[f32]) -> f32 {
    let mut sum_x2 = 0.0f32;
    for &v in x {
        sum_x2 += v * v;
    }
    sum_x2 / x.len() as f32
}

/// The per-element weights of ggml's weighted search: `importance * sqrt(sigma2 + x^2)`.
fn element_weights(xb: &[f32], importance: &[f32], sigma2: f32) -> [f32; QK] {
    let mut weights = [0.0f32; QK];
    for ((w, &x), &q) in weights.iter_mut().zip(xb).zip(importance) {
        *w = q * (sigma2 + x * x).sqrt();
    }
    weights
}

/// Runs `encode` on each whole block of `x`, with its slice of `importance` (if any) and its
/// `bytes`-long slice of `out`. A trailing partial block is skipped.
fn for_each_block(
    x: &[f32],
    importance: Option<&[f32]>,
    out: &mut [u8],
    bytes: usize,
    mut encode: impl FnMut(&[f32], Option<&[f32]>, &mut [u8]),
) {
    debug_assert!(
        x.len().is_multiple_of(QK),
        "a row of {} elements is not whole blocks",
        x.len()
    );
    debug_assert!(out.len() >= x.len() / QK * bytes, "output too short");
    debug_assert!(
        importance.is_none_or(|w| w.len() == x.len()),
        "importance length"
    );
    let blocks = x.chunks_exact(QK).zip(out.chunks_exact_mut(bytes));
    match importance {
        None => blocks.for_each(|(xb, yb)| encode(xb, None, yb)),
        Some(w) => blocks
            .zip(w.chunks_exact(QK))
            .for_each(|((xb, yb), wb)| encode(xb, Some(wb), yb)),
    }
}

/// Packs 32 four-bit codes: element `j` in the low nibble of byte `j`, element `j + 16` in its
/// high nibble.
fn pack_nibbles(codes: &[u8; QK], qs: &mut [u8]) {
    for j in 0..QK / 2 {
        qs[j] = (codes[j] & 0x0f) | (codes[j + QK / 2] << 4);
    }
}

/// Packs 32 five-bit codes: low nibbles as [`pack_nibbles`], bit 4 of element `j` in bit `j`
/// of the little-endian u32 `qh`.
fn pack_q5(codes: &[u8; QK], qh: &mut [u8], qs: &mut [u8]) {
    let mut high = 0u32;
    for (j, &c) in codes.iter().enumerate() {
        high |= u32::from((c >> 4) & 1) << j;
    }
    qh[..4].copy_from_slice(&high.to_le_bytes());
    pack_nibbles(codes, qs);
}

fn set_nibble(qs: &mut [u8], i: usize, code: u8) {
    if i < QK / 2 {
        qs[i] = (qs[i] & 0xf0) | (code & 0x0f);
    } else {
        qs[i - QK / 2] = (qs[i - QK / 2] & 0x0f) | (code << 4);
    }
}

fn set_q5(qh: &mut [u8], qs: &mut [u8], i: usize, code: u8) {
    let mut high = u32::from_le_bytes([qh[0], qh[1], qh[2], qh[3]]);
    high = (high & !(1 << i)) | (u32::from((code >> 4) & 1) << i);
    qh[..4].copy_from_slice(&high.to_le_bytes());
    set_nibble(qs, i, code);
}

/// Symmetric codes `-nmax ..= nmax - 1` (stored `+ nmax`) with a weighted least-squares scale,
/// searched over 19 candidate inverse scales around `-nmax / max` (ggml's `make_qx_quants`
/// with explicit weights). Returns the scale.
fn make_qx_quants(nmax: i32, x: &[f32], weights: &[f32], codes: &mut [u8; QK]) -> f32 {
    let (max, amax) = signed_max(x);
    if amax < GROUP_MAX_EPS {
        codes.fill(0);
        return 0.0;
    }
    let quantize = |iscale: f32, v: f32| nearest_int(iscale * v).clamp(-nmax, nmax - 1);

    let mut iscale = -(nmax as f32) / max;
    let (mut sumlx, mut suml2) = (0.0f32, 0.0f32);
    for ((code, &v), &w) in codes.iter_mut().zip(x).zip(weights) {
        let l = quantize(iscale, v);
        *code = (l + nmax) as u8;
        sumlx += w * v * l as f32;
        suml2 += w * l as f32 * l as f32;
    }
    let mut scale = if suml2 != 0.0 { sumlx / suml2 } else { 0.0 };
    let mut best = scale * sumlx;

    for step in (-9..=9).filter(|&s| s != 0) {
        iscale = -(nmax as f32 + 0.1 * step as f32) / max;
        (sumlx, suml2) = (0.0, 0.0);
        for (&v, &w) in x.iter().zip(weights) {
            let l = quantize(iscale, v) as f32;
            sumlx += w * v * l;
            suml2 += w * l * l;
        }
        if suml2 > 0.0 && sumlx * sumlx > best * suml2 {
            for (code, &v) in codes.iter_mut().zip(x) {
                *code = (quantize(iscale, v) + nmax) as u8;
            }
            scale = sumlx / suml2;
            best = scale * sumlx;
        }
    }
    scale
}

/// Affine codes `0 ..= nmax` with `x ~ scale * code + min`, `min <= 0`, fitted by weighted least
/// squares over 37 candidate inverse scales (ggml's `make_qkx3_quants` with explicit weights,
/// `rmin = -0.9`, `rdelta = 0.05`, `nstep = 36`, squared error). Returns `(scale, min)`.
fn make_qkx3_quants(nmax: i32, x: &[f32], weights: &[f32], codes: &mut [u8; QK]) -> (f32, f32) {
    const RMIN: f32 = -0.9;
    const RDELTA: f32 = 0.05;
    const NSTEP: i32 = 36;

    // 1. Range and weighted sums; the minimum is never above zero.
    let mut min = x[0];
    let mut max = x[0];
    let mut sum_w = weights[0];
    let mut sum_x = sum_w * x[0];
    for (&v, &w) in x.iter().zip(weights).skip(1) {
        if v < min {
            min = v;
        }
        if v > max {
            max = v;
        }
        sum_w += w;
        sum_x += w * v;
    }
    if min > 0.0 {
        min = 0.0;
    }
    if max <= min {
        codes.fill(0);
        return (0.0, min);
    }

    // 2. The plain min-max grid and its error.
    let mut iscale = nmax as f32 / (max - min);
    let mut scale = 1.0 / iscale;
    let mut best_error = 0.0f32;
    for ((code, &v), &w) in codes.iter_mut().zip(x).zip(weights) {
        *code = nearest_int(iscale * (v - min)).clamp(0, nmax) as u8;
        let diff = scale * f32::from(*code) + min - v;
        best_error += w * (diff * diff);
    }

    // 3. Candidate inverse scales; each gets its least-squares scale and minimum.
    let mut trial = [0u8; QK];
    for step in 0..=NSTEP {
        iscale = (RMIN + RDELTA * step as f32 + nmax as f32) / (max - min);
        let (mut sum_l, mut sum_l2, mut sum_xl) = (0.0f32, 0.0f32, 0.0f32);
        for ((code, &v), &w) in trial.iter_mut().zip(x).zip(weights) {
            let l = nearest_int(iscale * (v - min)).clamp(0, nmax);
            *code = l as u8;
            let l = l as f32;
            sum_l += w * l;
            sum_l2 += w * l * l;
            sum_xl += w * l * v;
        }
        let det = sum_w * sum_l2 - sum_l * sum_l;
        if det > 0.0 {
            let mut this_scale = (sum_w * sum_xl - sum_x * sum_l) / det;
            let mut this_min = (sum_l2 * sum_x - sum_l * sum_xl) / det;
            if this_min > 0.0 {
                this_min = 0.0;
                this_scale = sum_xl / sum_l2;
            }
            let mut error = 0.0f32;
            for ((&code, &v), &w) in trial.iter().zip(x).zip(weights) {
                let diff = this_scale * f32::from(code) + this_min - v;
                error += w * (diff * diff);
            }
            if error < best_error {
                *codes = trial;
                best_error = error;
                scale = this_scale;
                min = this_min;
            }
        }
    }
    (scale, min)
}

/// The index of the level nearest to `x` in the ascending `levels` (ggml's `best_index_int8`:
/// a bisection, ties to the upper level).
fn nearest_level(levels: &[i8; 16], x: f32) -> usize {
    let level = |k: usize| f32::from(levels[k]);
    if x <= level(0) {
        return 0;
    }
    if x >= level(15) {
        return 15;
    }
    let (mut lo, mut hi) = (0, 15);
    while hi - lo > 1 {
        let mid = (lo + hi) / 2;
        if x < level(mid) {
            hi = mid;
        } else {
            lo = mid;
        }
    }
    if x - level(hi - 1) < level(hi) - x {
        hi - 1
    } else {
        hi
    }
}

/// Element `i`'s code, checked against the block size in debug builds.
fn check_element(i: usize) {
    debug_assert!(i < QK, "element {i} of a {QK}-element block");
}

/// GGUF Q4_0: `d: f16, qs: [u8; 16]`; element `i` is `d * q`, `q = nibble - 8` in `-8 ..= 7`.
///
/// Grid codes are the signed `q`.
pub struct Q4_0;

impl BlockCodec for Q4_0 {
    const BLOCK: usize = QK;
    const BYTES: usize = 18;

    /// Encodes whole blocks (`x.len()` a multiple of 32, checked in debug builds; a trailing
    /// partial block is left out). With `importance`, the scale is ggml's weighted search
    /// (`make_qx_quants`, weights from the whole row's mean square); without, `-absmax / 8`.
    fn quantize_row(x: &[f32], importance: Option<&[f32]>, out: &mut [u8]) {
        let sigma2 = importance.map(|_| row_sigma2(x));
        for_each_block(x, importance, out, Self::BYTES, |xb, qw, block| {
            let mut codes = [0u8; QK];
            let d = match (qw, sigma2) {
                (Some(qw), Some(sigma2)) => {
                    let weights = element_weights(xb, qw, sigma2);
                    make_qx_quants(8, xb, &weights, &mut codes)
                }
                _ => {
                    let (max, _) = signed_max(xb);
                    let d = max / -8.0;
                    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
                    for (code, &v) in codes.iter_mut().zip(xb) {
                        *code = ((v * id + 8.5) as i32).clamp(0, 15) as u8;
                    }
                    d
                }
            };
            put_f16(block, d);
            pack_nibbles(&codes, &mut block[2..]);
        });
    }

    fn grid(block: &[u8], i: usize) -> Grid {
        check_element(i);
        Grid::Affine {
            scale: get_f16(block),
            offset: 0.0,
            qmin: -8,
            qmax: 7,
        }
    }

    fn set_quant(block: &mut [u8], i: usize, q: i32) {
        check_element(i);
        set_nibble(&mut block[2..], i, (q.clamp(-8, 7) + 8) as u8);
    }
}

/// GGUF Q4_1: `d: f16, m: f16, qs: [u8; 16]`; element `i` is `d * q + m`, `q` in `0 ..= 15`.
pub struct Q4_1;

impl BlockCodec for Q4_1 {
    const BLOCK: usize = QK;
    const BYTES: usize = 20;

    /// Encodes whole blocks (`x.len()` a multiple of 32, checked in debug builds). With
    /// `importance`, ggml's weighted affine search (`make_qkx3_quants`); without, the block's
    /// min-max range.
    fn quantize_row(x: &[f32], importance: Option<&[f32]>, out: &mut [u8]) {
        let sigma2 = importance.map(|_| row_sigma2(x));
        for_each_block(x, importance, out, Self::BYTES, |xb, qw, block| {
            let mut codes = [0u8; QK];
            let (d, m) = match (qw, sigma2) {
                (Some(qw), Some(sigma2)) => {
                    let weights = element_weights(xb, qw, sigma2);
                    make_qkx3_quants(15, xb, &weights, &mut codes)
                }
                _ => {
                    let (min, max) = min_max(xb);
                    let d = (max - min) / 15.0;
                    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
                    for (code, &v) in codes.iter_mut().zip(xb) {
                        *code = (((v - min) * id + 0.5) as i32).clamp(0, 15) as u8;
                    }
                    (d, min)
                }
            };
            put_f16(block, d);
            put_f16(&mut block[2..], m);
            pack_nibbles(&codes, &mut block[4..]);
        });
    }

    fn grid(block: &[u8], i: usize) -> Grid {
        check_element(i);
        Grid::Affine {
            scale: get_f16(block),
            offset: get_f16(&block[2..]),
            qmin: 0,
            qmax: 15,
        }
    }

    fn set_quant(block: &mut [u8], i: usize, q: i32) {
        check_element(i);
        set_nibble(&mut block[4..], i, q.clamp(0, 15) as u8);
    }
}

/// GGUF Q5_0: `d: f16, qh: u32, qs: [u8; 16]`; element `i` is `d * q`, `q = code - 16` in
/// `-16 ..= 15`, the code's low nibble in `qs` and its bit 4 in bit `i` of `qh`.
///
/// Grid codes are the signed `q`.
pub struct Q5_0;

impl BlockCodec for Q5_0 {
    const BLOCK: usize = QK;
    const BYTES: usize = 22;

    /// Encodes whole blocks (`x.len()` a multiple of 32, checked in debug builds). With
    /// `importance`, ggml's weighted search (`make_qx_quants`); without, `-absmax / 16`.
    fn quantize_row(x: &[f32], importance: Option<&[f32]>, out: &mut [u8]) {
        let sigma2 = importance.map(|_| row_sigma2(x));
        for_each_block(x, importance, out, Self::BYTES, |xb, qw, block| {
            let mut codes = [0u8; QK];
            let d = match (qw, sigma2) {
                (Some(qw), Some(sigma2)) => {
                    let weights = element_weights(xb, qw, sigma2);
                    make_qx_quants(16, xb, &weights, &mut codes)
                }
                _ => {
                    let (max, _) = signed_max(xb);
                    let d = max / -16.0;
                    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
                    for (code, &v) in codes.iter_mut().zip(xb) {
                        *code = ((v * id + 16.5) as i32).clamp(0, 31) as u8;
                    }
                    d
                }
            };
            put_f16(block, d);
            let (qh, qs) = block[2..].split_at_mut(4);
            pack_q5(&codes, qh, qs);
        });
    }

    fn grid(block: &[u8], i: usize) -> Grid {
        check_element(i);
        Grid::Affine {
            scale: get_f16(block),
            offset: 0.0,
            qmin: -16,
            qmax: 15,
        }
    }

    fn set_quant(block: &mut [u8], i: usize, q: i32) {
        check_element(i);
        let (qh, qs) = block[2..].split_at_mut(4);
        set_q5(qh, qs, i, (q.clamp(-16, 15) + 16) as u8);
    }
}

/// GGUF Q5_1: `d: f16, m: f16, qh: u32, qs: [u8; 16]`; element `i` is `d * q + m`, `q` in
/// `0 ..= 31` split as in Q5_0.
pub struct Q5_1;

impl BlockCodec for Q5_1 {
    const BLOCK: usize = QK;
    const BYTES: usize = 24;

    /// Encodes whole blocks (`x.len()` a multiple of 32, checked in debug builds). With
    /// `importance`, ggml's weighted affine search (`make_qkx3_quants`); without, the block's
    /// min-max range.
    fn quantize_row(x: &[f32], importance: Option<&[f32]>, out: &mut [u8]) {
        let sigma2 = importance.map(|_| row_sigma2(x));
        for_each_block(x, importance, out, Self::BYTES, |xb, qw, block| {
            let mut codes = [0u8; QK];
            let (d, m) = match (qw, sigma2) {
                (Some(qw), Some(sigma2)) => {
                    let weights = element_weights(xb, qw, sigma2);
                    make_qkx3_quants(31, xb, &weights, &mut codes)
                }
                _ => {
                    let (min, max) = min_max(xb);
                    let d = (max - min) / 31.0;
                    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
                    for (code, &v) in codes.iter_mut().zip(xb) {
                        *code = (((v - min) * id + 0.5) as i32).clamp(0, 31) as u8;
                    }
                    (d, min)
                }
            };
            put_f16(block, d);
            put_f16(&mut block[2..], m);
            let (qh, qs) = block[4..].split_at_mut(4);
            pack_q5(&codes, qh, qs);
        });
    }

    fn grid(block: &[u8], i: usize) -> Grid {
        check_element(i);
        Grid::Affine {
            scale: get_f16(block),
            offset: get_f16(&block[2..]),
            qmin: 0,
            qmax: 31,
        }
    }

    fn set_quant(block: &mut [u8], i: usize, q: i32) {
        check_element(i);
        let (qh, qs) = block[4..].split_at_mut(4);
        set_q5(qh, qs, i, q.clamp(0, 31) as u8);
    }
}

/// GGUF Q8_0: `d: f16, qs: [i8; 32]`; element `i` is `d * qs[i]`.
pub struct Q8_0;

impl BlockCodec for Q8_0 {
    const BLOCK: usize = QK;
    const BYTES: usize = 34;

    /// Encodes whole blocks (`x.len()` a multiple of 32, checked in debug builds) with the scale
    /// `absmax / 127`. `importance` is ignored, as in ggml.
    fn quantize_row(x: &[f32], _importance: Option<&[f32]>, out: &mut [u8]) {
        for_each_block(x, None, out, Self::BYTES, |xb, _, block| {
            let amax = xb.iter().fold(0.0f32, |a, v| a.max(v.abs()));
            let d = amax / 127.0;
            let id = if d != 0.0 { 1.0 / d } else { 0.0 };
            put_f16(block, d);
            for (q, &v) in block[2..].iter_mut().zip(xb) {
                *q = (v * id).round() as i8 as u8;
            }
        });
    }

    fn grid(block: &[u8], i: usize) -> Grid {
        check_element(i);
        Grid::Affine {
            scale: get_f16(block),
            offset: 0.0,
            qmin: -128,
            qmax: 127,
        }
    }

    fn set_quant(block: &mut [u8], i: usize, q: i32) {
        check_element(i);
        block[2 + i] = q.clamp(-128, 127) as i8 as u8;
    }
}

/// GGUF IQ4_NL: `d: f16, qs: [u8; 16]` (nibbles as Q4_0); element `i` is
/// `d * IQ4_NL_LEVELS[nibble]`. Grid codes are the level indices `0 ..= 15`.
pub struct Iq4Nl;

impl Iq4Nl {
    /// ggml's `quantize_row_iq4_nl_impl` for one 32-element block as `ggml_quantize_chunk` runs
    /// it (7 trial scales each side, with or without importance): weights `x^2`, or
    /// `importance * sqrt(sigma2 + x^2)` with `sigma2` twice the block's mean square.
    fn quantize_block(xb: &[f32], importance: Option<&[f32]>, block: &mut [u8]) {
        const NTRY: i32 = 7;
        let levels = &IQ4_NL_LEVELS;
        let level = |k: usize| f32::from(levels[k]);

        // 1. Weights.
        let mut weights = [0.0f32; QK];
        match importance {
            Some(qw) => {
                let mut sigma2 = 0.0f32;
                for &v in xb {
                    sigma2 += v * v;
                }
                sigma2 *= 2.0 / QK as f32;
                weights = element_weights(xb, qw, sigma2);
            }
            None => {
                for (w, &v) in weights.iter_mut().zip(xb) {
                    *w = v * v;
                }
            }
        }

        // 2. The scale: least squares on the grid of `max / 127`, then on 15 trial grids.
        let (max, amax) = signed_max(xb);
        let scale = if amax < GROUP_MAX_EPS {
            0.0
        } else {
            let fit = |id: f32| {
                let (mut sumqx, mut sumq2) = (0.0f32, 0.0f32);
                for (&v, &w) in xb.iter().zip(&weights) {
                    let q = level(nearest_level(levels, id * v));
                    sumqx += w * q * v;
                    sumq2 += w * q * q;
                }
                (sumqx, sumq2)
            };
            let d = -max / level(0);
            let (sumqx, sumq2) = fit(1.0 / d);
            let mut d = if sumq2 > 0.0 { sumqx / sumq2 } else { 0.0 };
            let mut best = d * sumqx;
            for trial in -NTRY..=NTRY {
                let id = (trial + i32::from(levels[0])) as f32 / max;
                let (sumqx, sumq2) = fit(id);
                if sumq2 > 0.0 && sumqx * sumqx > best * sumq2 {
                    d = sumqx / sumq2;
                    best = d * sumqx;
                }
            }
            d
        };

        // 3. Codes on the chosen (unrounded) scale.
        put_f16(block, scale);
        let id = if scale != 0.0 { 1.0 / scale } else { 0.0 };
        let mut codes = [0u8; QK];
        for (code, &v) in codes.iter_mut().zip(xb) {
            *code = nearest_level(levels, id * v) as u8;
        }
        pack_nibbles(&codes, &mut block[2..]);
    }
}

impl BlockCodec for Iq4Nl {
    const BLOCK: usize = QK;
    const BYTES: usize = 18;

    /// Encodes whole blocks (`x.len()` a multiple of 32, checked in debug builds). Unlike the
    /// other legacy types, the importance weights use the block's own mean square.
    fn quantize_row(x: &[f32], importance: Option<&[f32]>, out: &mut [u8]) {
        for_each_block(x, importance, out, Self::BYTES, Self::quantize_block);
    }

    fn grid(block: &[u8], i: usize) -> Grid {
        check_element(i);
        Grid::Table {
            scale: get_f16(block),
            levels: &IQ4_NL_LEVELS,
        }
    }

    fn set_quant(block: &mut [u8], i: usize, q: i32) {
        check_element(i);
        set_nibble(&mut block[2..], i, q.clamp(0, 15) as u8);
    }
}

#[cfg(test)]
mod tests {
    use super::super::fixtures::{self, N_DECODED_ROWS, N_PER_ROW, N_ROWS};
    use super::*;

    /// Encodes every fixture row with `T` and compares with llama.cpp's bytes, reporting each
    /// differing row by its first differing block and byte.
    fn assert_matches_llama<T: BlockCodec>(name: &str, weighted: bool) {
        let input = fixtures::input();
        let importance = fixtures::importance();
        let expected = fixtures::encoded(name, weighted);
        let row_bytes = N_PER_ROW / T::BLOCK * T::BYTES;
        assert_eq!(expected.len(), N_ROWS * row_bytes, "{name}: fixture size");

        let mut failures = Vec::new();
        let rows = input
            .chunks_exact(N_PER_ROW)
            .zip(expected.chunks_exact(row_bytes));
        for (r, (x, want)) in rows.enumerate() {
            // Poisoned, so that a byte the encoder forgets to write shows up.
            let mut got = vec![0xa5u8; row_bytes];
            T::quantize_row(x, weighted.then_some(&importance[..]), &mut got);
            if let Some(k) = got.iter().zip(want).position(|(a, b)| a != b) {
                failures.push(format!(
                    "{name} ({}): row {r}, block {}, byte {}: ours {:#04x}, llama.cpp {:#04x}",
                    if weighted { "imatrix" } else { "reference" },
                    k / T::BYTES,
                    k % T::BYTES,
                    got[k],
                    want[k]
                ));
            }
        }
        assert!(failures.is_empty(), "{}", failures.join("\n"));
    }

    /// The 4-bit code of element `i` (low nibbles first) of the packed `qs`.
    fn nibble(qs: &[u8], i: usize) -> u8 {
        if i < QK / 2 {
            qs[i] & 0x0f
        } else {
            qs[i - QK / 2] >> 4
        }
    }

    /// llama.cpp's dequantisation of one block, written from the layouts independently of
    /// `grid`; checked against the decoded fixtures below.
    fn decode(name: &str, block: &[u8]) -> Vec<f32> {
        let half = |o: usize| f16::from_le_bytes([block[o], block[o + 1]]).to_f32();
        let low = |o: usize, i: usize| u32::from(nibble(&block[o..], i));
        let high = |o: usize, i: usize| {
            let qh = u32::from_le_bytes([block[o], block[o + 1], block[o + 2], block[o + 3]]);
            ((qh >> i) & 1) << 4
        };
        (0..QK)
            .map(|i| match name {
                "q4_0" => (low(2, i) as i32 - 8) as f32 * half(0),
                "q4_1" => low(4, i) as f32 * half(0) + half(2),
                "q5_0" => ((low(6, i) | high(2, i)) as i32 - 16) as f32 * half(0),
                "q5_1" => (low(8, i) | high(4, i)) as f32 * half(0) + half(2),
                "q8_0" => f32::from(block[2 + i] as i8) * half(0),
                "iq4_nl" => half(0) * f32::from(IQ4_NL_LEVELS[low(2, i) as usize]),
                _ => panic!("no decoder for {name}"),
            })
            .collect()
    }

    /// Every element of llama.cpp's decoded rows is a value of its grid, and the code `nearest`
    /// finds for it is the one stored (writing it back leaves the block as it was).
    fn assert_grid_decodes<T: BlockCodec>(name: &str) {
        let encoded = fixtures::encoded(name, false);
        let decoded = fixtures::decoded(name);
        assert_eq!(
            decoded.len(),
            N_DECODED_ROWS * N_PER_ROW,
            "{name}: fixture size"
        );

        let blocks = encoded
            .chunks_exact(T::BYTES)
            .zip(decoded.chunks_exact(T::BLOCK));
        for (b, (block, values)) in blocks.enumerate() {
            assert_eq!(
                decode(name, block),
                values,
                "{name}: test decoder, block {b}"
            );
            for (i, &v) in values.iter().enumerate() {
                let grid = T::grid(block, i);
                let q = grid.nearest(v);
                assert_eq!(grid.value(q), v, "{name}: block {b}, element {i}, code {q}");
                let mut copy = block.to_vec();
                T::set_quant(&mut copy, i, q);
                assert_eq!(
                    copy, block,
                    "{name}: block {b}, element {i}: code {q} not stored"
                );
            }
        }
    }

    /// Setting a code moves exactly that element to the code's grid value; setting the old code
    /// back restores the block.
    fn assert_set_quant_round_trip<T: BlockCodec>(name: &str) {
        let encoded = fixtures::encoded(name, false);
        let mut changed = 0;
        for (b, block) in encoded.chunks_exact(T::BYTES).take(8).enumerate() {
            let before = decode(name, block);
            for i in [0, 1, 15, 16, 17, 31] {
                let grid = T::grid(block, i);
                let (qmin, qmax) = match grid {
                    Grid::Affine { qmin, qmax, .. } => (qmin, qmax),
                    Grid::Table { levels, .. } => (0, levels.len() as i32 - 1),
                };
                let old = grid.nearest(before[i]);
                let new = if old == qmax { qmin } else { qmax };

                let mut edited = block.to_vec();
                T::set_quant(&mut edited, i, new);
                let after = decode(name, &edited);
                assert_eq!(after[i], grid.value(new), "{name}: block {b}, element {i}");
                if after[i] != before[i] {
                    changed += 1;
                }
                for k in (0..QK).filter(|&k| k != i) {
                    assert_eq!(
                        after[k].to_bits(),
                        before[k].to_bits(),
                        "{name}: block {b}: setting element {i} moved element {k}"
                    );
                    assert_eq!(
                        T::grid(&edited, k),
                        T::grid(block, k),
                        "{name}: grid of {k}"
                    );
                }

                T::set_quant(&mut edited, i, old);
                assert_eq!(
                    edited, block,
                    "{name}: block {b}, element {i}: not restored"
                );
            }
        }
        assert!(changed > 0, "{name}: no edit changed a value");
    }

    macro_rules! codec_tests {
        ($($module:ident: $codec:ty, $name:literal;)*) => {$(
            mod $module {
                use super::*;

                #[test]
                fn reference_encoding_is_byte_identical_to_llama() {
                    assert_matches_llama::<$codec>($name, false);
                }

                #[test]
                fn importance_encoding_is_byte_identical_to_llama() {
                    assert_matches_llama::<$codec>($name, true);
                }

                #[test]
                fn grid_holds_llama_decoded_values() {
                    assert_grid_decodes::<$codec>($name);
                }

                #[test]
                fn set_quant_moves_one_element_onto_its_grid() {
                    assert_set_quant_round_trip::<$codec>($name);
                }
            }
        )*};
    }

    codec_tests! {
        q4_0: Q4_0, "q4_0";
        q4_1: Q4_1, "q4_1";
        q5_0: Q5_0, "q5_0";
        q5_1: Q5_1, "q5_1";
        q8_0: Q8_0, "q8_0";
        iq4_nl: Iq4Nl, "iq4_nl";
    }

    #[test]
    fn nearest_int_rounds_half_to_even() {
        let cases = [
            (0.5, 0),
            (1.5, 2),
            (2.5, 2),
            (-0.5, 0),
            (-1.5, -2),
            (-2.4, -2),
            (7.6, 8),
        ];
        for (x, want) in cases {
            assert_eq!(nearest_int(x), want, "nearest_int({x})");
        }
    }

    #[test]
    fn nearest_level_takes_the_closer_level_and_the_upper_on_ties() {
        assert_eq!(nearest_level(&IQ4_NL_LEVELS, -200.0), 0);
        assert_eq!(nearest_level(&IQ4_NL_LEVELS, 200.0), 15);
        assert_eq!(nearest_level(&IQ4_NL_LEVELS, 0.0), 8);
        assert_eq!(nearest_level(&IQ4_NL_LEVELS, -4.5), 8);
        assert_eq!(nearest_level(&IQ4_NL_LEVELS, -4.6), 7);
    }

    #[test]
    #[cfg(debug_assertions)]
    #[should_panic(expected = "not whole blocks")]
    fn a_partial_block_is_a_caller_error() {
        let mut out = [0u8; 2 * 18];
        Q4_0::quantize_row(&[0.5; 33], None, &mut out);
    }
}
