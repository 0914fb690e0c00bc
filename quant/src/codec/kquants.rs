//! K-quants (256-element super-blocks): Q2_K, Q3_K, Q4_K, Q5_K and Q6_K.
//!
//! Block layouts are GGUF's (`block_q2_K` ... `block_q6_K` in ggml's `ggml-common.h`). The
//! encoders follow ggml's reference quantizers and, given importance weights, its weighted scale
//! searches, step by step and in the same f32 operation order, so that their bytes equal
//! llama.cpp's `ggml_quantize_chunk` on the same input.

use super::{nearest_int, signed_max, BlockCodec, Grid};

/// Elements per super-block.
const QK_K: usize = 256;

/// Below this largest magnitude a group counts as all zero (ggml's `GROUP_MAX_EPS`).
const GROUP_MAX_EPS: f32 = 1e-15;

/// `x` rounded to f16 (round to nearest even), little-endian.
fn f16_bytes(x: f32) -> [u8; 2] {
    half::f16::from_f32(x).to_le_bytes()
}

/// The f16 at `block[at..at + 2]`, as f32.
fn read_f16(block: &[u8], at: usize) -> f32 {
    half::f16::from_le_bytes([block[at], block[at + 1]]).to_f32()
}

// ---------------------------------------------------------------------------------------------
// Scale searches (ggml-quants.c: make_qx_quants, make_q3_quants, make_qkx2/3_quants,
// make_qp_quants), only in the variants the K-quant encoders use.
// ---------------------------------------------------------------------------------------------

/// Symmetric codes `levels[i] - nmax` in `-nmax .. nmax` and their scale, chosen among 19 trial
/// scales around `-nmax / max` by the weighted least-squares fit (weights `x^2`, or `weights`).
fn make_qx_quants(x: &[f32], nmax: i32, levels: &mut [i8], weights: Option<&[f32]>) -> f32 {
    let (max, amax) = signed_max(x);
    if amax < GROUP_MAX_EPS {
        levels.fill(0);
        return 0.0;
    }
    let weight = |i: usize| weights.map_or(x[i] * x[i], |w| w[i]);
    let code = |iscale: f32, v: f32| nearest_int(iscale * v).clamp(-nmax, nmax - 1);

    // 1. The scale that maps the extreme element onto -nmax, refitted by least squares.
    let mut iscale = -(nmax as f32) / max;
    let (mut sumlx, mut suml2) = (0.0f32, 0.0f32);
    for i in 0..x.len() {
        let l = code(iscale, x[i]);
        levels[i] = (l + nmax) as i8;
        let w = weight(i);
        sumlx += w * x[i] * l as f32;
        suml2 += w * l as f32 * l as f32;
    }
    let mut scale = if suml2 != 0.0 { sumlx / suml2 } else { 0.0 };
    let mut best = scale * sumlx;

    // 2. Trial scales -(nmax + 0.1 is) / max; keep the codes of the best fit.
    for is in -9..=9 {
        if is == 0 {
            continue;
        }
        iscale = -(nmax as f32 + 0.1 * is as f32) / max;
        sumlx = 0.0;
        suml2 = 0.0;
        for (i, &v) in x.iter().enumerate() {
            let l = code(iscale, v);
            let w = weight(i);
            sumlx += w * v * l as f32;
            suml2 += w * l as f32 * l as f32;
        }
        if suml2 > 0.0 && sumlx * sumlx > best * suml2 {
            for i in 0..x.len() {
                levels[i] = (nmax + code(iscale, x[i])) as i8;
            }
            scale = sumlx / suml2;
            best = scale * sumlx;
        }
    }
    scale
}

/// Q3_K's reference search: symmetric codes as in [`make_qx_quants`] (weights `x^2`), then up to
/// five passes that move single codes while that improves the least-squares fit.
fn make_q3_quants(x: &[f32], nmax: i32, levels: &mut [i8]) -> f32 {
    let (max, amax) = signed_max(x);
    if amax < GROUP_MAX_EPS {
        levels.fill(0);
        return 0.0;
    }

    let iscale = -(nmax as f32) / max;
    let (mut sumlx, mut suml2) = (0.0f32, 0.0f32);
    for i in 0..x.len() {
        let l = nearest_int(iscale * x[i]).clamp(-nmax, nmax - 1);
        levels[i] = l as i8;
        let w = x[i] * x[i];
        sumlx += w * x[i] * l as f32;
        suml2 += w * l as f32 * l as f32;
    }

    for _ in 0..5 {
        let mut changed = 0;
        for i in 0..x.len() {
            let w = x[i] * x[i];
            let old = f32::from(levels[i]);
            let mut slx = sumlx - w * x[i] * old;
            if slx > 0.0 {
                let mut sl2 = suml2 - w * old * old;
                let new = nearest_int(x[i] * sl2 / slx).clamp(-nmax, nmax - 1);
                if new != i32::from(levels[i]) {
                    slx += w * x[i] * new as f32;
                    sl2 += w * new as f32 * new as f32;
                    if sl2 > 0.0 && slx * slx * suml2 > sumlx * sumlx * sl2 {
                        levels[i] = new as i8;
                        sumlx = slx;
                        suml2 = sl2;
                        changed += 1;
                    }
                }
            }
        }
        if changed == 0 {
            break;
        }
    }

    for l in levels.iter_mut() {
        *l += nmax as i8;
    }
    if suml2 > 0.0 {
        sumlx / suml2
    } else {
        0.0
    }
}

/// The trial scales of [`make_qkx_quants`]: `(rmin + rdelta * is + nmax) / (max - min)` for
/// `is` in `0 ..= nstep`.
#[derive(Clone, Copy)]
struct ScaleSteps {
    rmin: f32,
    rdelta: f32,
    nstep: i32,
}

/// Asymmetric codes `0 ..= nmax` with a scale and a min (ggml's `make_qkx2_quants`, and
/// `make_qkx3_quants`, which is the same search when weights are given): the weighted
/// least-squares (or, with `use_mad`, least absolute) fit over the trial scales `steps`.
/// Returns the scale and the min as a non-negative offset (value = scale * q - min).
fn make_qkx_quants(
    x: &[f32],
    weights: &[f32],
    nmax: i32,
    levels: &mut [u8],
    steps: ScaleSteps,
    use_mad: bool,
) -> (f32, f32) {
    let n = x.len();
    let (mut min, mut max) = (x[0], x[0]);
    let mut sum_w = weights[0];
    let mut sum_x = sum_w * x[0];
    for i in 1..n {
        if x[i] < min {
            min = x[i];
        }
        if x[i] > max {
            max = x[i];
        }
        sum_w += weights[i];
        sum_x += weights[i] * x[i];
    }
    if min > 0.0 {
        min = 0.0;
    }
    if max == min {
        levels.fill(0);
        return (0.0, -min);
    }
    let error = |diff: f32| if use_mad { diff.abs() } else { diff * diff };

    // 1. The range mapped onto 0 ..= nmax.
    let mut iscale = nmax as f32 / (max - min);
    let mut scale = 1.0 / iscale;
    let mut best_error = 0.0f32;
    for i in 0..n {
        let l = nearest_int(iscale * (x[i] - min)).clamp(0, nmax);
        levels[i] = l as u8;
        best_error += weights[i] * error(scale * l as f32 + min - x[i]);
    }

    // 2. Each trial scale's codes, with scale and min refitted to them.
    let mut trial = [0u8; 32];
    let trial = &mut trial[..n];
    for is in 0..=steps.nstep {
        iscale = (steps.rmin + steps.rdelta * is as f32 + nmax as f32) / (max - min);
        let (mut sum_l, mut sum_l2, mut sum_xl) = (0.0f32, 0.0f32, 0.0f32);
        for i in 0..n {
            let l = nearest_int(iscale * (x[i] - min)).clamp(0, nmax);
            trial[i] = l as u8;
            let w = weights[i];
            sum_l += w * l as f32;
            sum_l2 += w * l as f32 * l as f32;
            sum_xl += w * l as f32 * x[i];
        }
        let det = sum_w * sum_l2 - sum_l * sum_l;
        if det > 0.0 {
            let mut this_scale = (sum_w * sum_xl - sum_x * sum_l) / det;
            let mut this_min = (sum_l2 * sum_x - sum_l * sum_xl) / det;
            if this_min > 0.0 {
                this_min = 0.0;
                this_scale = sum_xl / sum_l2;
            }
            let mut cur_error = 0.0f32;
            for i in 0..n {
                cur_error += weights[i] * error(this_scale * f32::from(trial[i]) + this_min - x[i]);
            }
            if cur_error < best_error {
                levels.copy_from_slice(trial);
                best_error = cur_error;
                scale = this_scale;
                min = this_min;
            }
        }
    }
    (scale, -min)
}

/// Codes `0 ..= nmax` for non-negative `x` (sub-block scales or mins) and their scale: the best
/// of nine trial scales around `nmax / max` by weighted squared error, then up to five passes
/// that move single codes while that improves the least-squares fit.
fn make_qp_quants(x: &[f32], nmax: i32, levels: &mut [u8], weights: &[f32]) -> f32 {
    let mut max = 0.0f32;
    for &v in x {
        max = if max > v { max } else { v };
    }
    if max < GROUP_MAX_EPS {
        levels.fill(0);
        return 0.0;
    }

    // 1. The best trial scale.
    let mut iscale = nmax as f32 / max;
    for (level, &v) in levels.iter_mut().zip(x) {
        *level = nearest_int(iscale * v) as u8;
    }
    let scale = 1.0 / iscale;
    let mut best_mse = 0.0f32;
    for i in 0..x.len() {
        let diff = x[i] - scale * f32::from(levels[i]);
        best_mse += weights[i] * diff * diff;
    }
    for is in -4..=4 {
        if is == 0 {
            continue;
        }
        let iscale_is = (0.1 * is as f32 + nmax as f32) / max;
        let scale_is = 1.0 / iscale_is;
        let mut mse = 0.0f32;
        for i in 0..x.len() {
            let l = nearest_int(iscale_is * x[i]).min(nmax);
            let diff = x[i] - scale_is * l as f32;
            mse += weights[i] * diff * diff;
        }
        if mse < best_mse {
            best_mse = mse;
            iscale = iscale_is;
        }
    }

    // 2. Its codes, then single-code moves.
    let (mut sumlx, mut suml2) = (0.0f32, 0.0f32);
    for i in 0..x.len() {
        let l = nearest_int(iscale * x[i]).min(nmax);
        levels[i] = l as u8;
        let w = weights[i];
        sumlx += w * x[i] * l as f32;
        suml2 += w * l as f32 * l as f32;
    }
    for _ in 0..5 {
        let mut changed = 0;
        for i in 0..x.len() {
            let w = weights[i];
            let old = f32::from(levels[i]);
            let mut slx = sumlx - w * x[i] * old;
            let mut sl2 = suml2 - w * old * old;
            if slx > 0.0 && sl2 > 0.0 {
                let new = nearest_int(x[i] * sl2 / slx).min(nmax);
                if new != i32::from(levels[i]) {
                    slx += w * x[i] * new as f32;
                    sl2 += w * new as f32 * new as f32;
                    if slx * slx * suml2 > sumlx * sumlx * sl2 {
                        levels[i] = new as u8;
                        sumlx = slx;
                        suml2 = sl2;
                        changed += 1;
                    }
                }
            }
        }
        if changed == 0 {
            break;
        }
    }
    if suml2 > 0.0 {
        sumlx / suml2
    } else {
        0.0
    }
}

/// The importance weights of a super-block's elements: `importance * sqrt(sigma2 + x^2)`.
fn sigma_weights(x: &[f32], importance: &[f32], sigma2: f32, weights: &mut [f32]) {
    for ((w, &q), &v) in weights.iter_mut().zip(importance).zip(x) {
        *w = q * (sigma2 + v * v).sqrt();
    }
}

/// The sum of squares of a super-block, in element order.
fn sum_squares(x: &[f32]) -> f32 {
    x.iter().fold(0.0f32, |sum, &v| sum + v * v)
}

/// Encodes every super-block of `x` with `encode_block`, checking the row shape in debug
/// builds; trailing elements short of a super-block are ignored.
fn encode_row(
    x: &[f32],
    importance: Option<&[f32]>,
    out: &mut [u8],
    bytes: usize,
    encode_block: impl Fn(&[f32], Option<&[f32]>, &mut [u8]),
) {
    debug_assert!(
        x.len().is_multiple_of(QK_K),
        "a K-quant row is whole super-blocks of {QK_K}"
    );
    debug_assert!(
        out.len() >= x.len() / QK_K * bytes,
        "output shorter than the row"
    );
    debug_assert!(
        importance.is_none_or(|w| w.len() == x.len()),
        "one weight per element"
    );
    for (i, (block, xs)) in out
        .chunks_exact_mut(bytes)
        .zip(x.chunks_exact(QK_K))
        .enumerate()
    {
        let weights = importance.map(|w| &w[i * QK_K..(i + 1) * QK_K]);
        encode_block(xs, weights, block);
    }
}

/// Packs 2-bit codes as Q2_K and Q3_K store them: byte `32 h + l` holds elements
/// `128 h + 32 k + l` at bits `2k`.
fn pack_2bit(levels: &[u8; QK_K], qs: &mut [u8]) {
    for h in 0..2 {
        for l in 0..32 {
            let e = 128 * h + l;
            qs[32 * h + l] =
                levels[e] | levels[e + 32] << 2 | levels[e + 64] << 4 | levels[e + 96] << 6;
        }
    }
}

/// The byte and shift of element `i`'s 2-bit code in Q2_K's and Q3_K's `qs`.
fn locate_2bit(i: usize) -> (usize, u32) {
    (32 * (i / 128) + i % 32, 2 * ((i % 128) / 32) as u32)
}

// ---------------------------------------------------------------------------------------------
// Q2_K: scales[16] (4-bit scale | 4-bit min), qs[64], d, dmin.
// ---------------------------------------------------------------------------------------------

const Q2K_SCALES: usize = 0;
const Q2K_QS: usize = 16;
const Q2K_D: usize = 80;
const Q2K_DMIN: usize = 82;

/// Q2_K: 16 sub-blocks of 16 with 4-bit scales and mins; value `d sc q - dmin m`, q in 0..=3.
pub struct Q2K;

/// Final codes once the block's scales are stored (both Q2_K paths).
fn q2k_requantize(x: &[f32], block: &[u8], levels: &mut [u8; QK_K]) {
    let d = read_f16(block, Q2K_D);
    let dmin = read_f16(block, Q2K_DMIN);
    for j in 0..QK_K / 16 {
        let sc = block[Q2K_SCALES + j];
        let dl = d * f32::from(sc & 0xF);
        if dl == 0.0 {
            continue;
        }
        let ml = dmin * f32::from(sc >> 4);
        for ii in 0..16 {
            let l = nearest_int((x[16 * j + ii] + ml) / dl).clamp(0, 3);
            levels[16 * j + ii] = l as u8;
        }
    }
}

fn q2k_encode_block(x: &[f32], importance: Option<&[f32]>, block: &mut [u8]) {
    let mut levels = [0u8; QK_K];
    let mut scales = [0.0f32; QK_K / 16];
    let mut mins = [0.0f32; QK_K / 16];
    let mut weights = [0.0f32; 16];

    match importance {
        None => {
            let steps = ScaleSteps {
                rmin: -0.5,
                rdelta: 0.1,
                nstep: 15,
            };
            let (mut max_scale, mut max_min) = (0.0f32, 0.0f32);
            for j in 0..QK_K / 16 {
                let xs = &x[16 * j..16 * j + 16];
                for (w, &v) in weights.iter_mut().zip(xs) {
                    *w = v.abs();
                }
                let levels = &mut levels[16 * j..16 * j + 16];
                (scales[j], mins[j]) = make_qkx_quants(xs, &weights, 3, levels, steps, true);
                if scales[j] > max_scale {
                    max_scale = scales[j];
                }
                if mins[j] > max_min {
                    max_min = mins[j];
                }
            }
            let sc = &mut block[Q2K_SCALES..Q2K_SCALES + 16];
            if max_scale > 0.0 {
                let iscale = 15.0 / max_scale;
                for j in 0..QK_K / 16 {
                    sc[j] = nearest_int(iscale * scales[j]) as u8;
                }
            } else {
                sc.fill(0);
            }
            let d = if max_scale > 0.0 {
                max_scale / 15.0
            } else {
                0.0
            };
            if max_min > 0.0 {
                let iscale = 15.0 / max_min;
                for j in 0..QK_K / 16 {
                    sc[j] |= (nearest_int(iscale * mins[j]) << 4) as u8;
                }
            }
            let dmin = if max_min > 0.0 { max_min / 15.0 } else { 0.0 };
            block[Q2K_D..Q2K_D + 2].copy_from_slice(&f16_bytes(d));
            block[Q2K_DMIN..Q2K_DMIN + 2].copy_from_slice(&f16_bytes(dmin));
        }
        Some(importance) => {
            let steps = ScaleSteps {
                rmin: -0.9,
                rdelta: 0.05,
                nstep: 36,
            };
            let sigma2 = sum_squares(x) / QK_K as f32;
            let mut sw = [0.0f32; QK_K / 16];
            for j in 0..QK_K / 16 {
                let xs = &x[16 * j..16 * j + 16];
                sigma_weights(xs, &importance[16 * j..16 * j + 16], sigma2, &mut weights);
                sw[j] = weights.iter().fold(0.0f32, |s, &w| s + w);
                let levels = &mut levels[16 * j..16 * j + 16];
                (scales[j], mins[j]) = make_qkx_quants(xs, &weights, 3, levels, steps, false);
            }
            let (mut ls, mut lm) = ([0u8; QK_K / 16], [0u8; QK_K / 16]);
            let d = make_qp_quants(&scales, 15, &mut ls, &sw);
            let dmin = make_qp_quants(&mins, 15, &mut lm, &sw);
            block[Q2K_D..Q2K_D + 2].copy_from_slice(&f16_bytes(d));
            block[Q2K_DMIN..Q2K_DMIN + 2].copy_from_slice(&f16_bytes(dmin));
            for j in 0..QK_K / 16 {
                block[Q2K_SCALES + j] = ls[j] | lm[j] << 4;
            }
        }
    }

    q2k_requantize(x, block, &mut levels);
    pack_2bit(&levels, &mut block[Q2K_QS..Q2K_QS + 64]);
}

impl BlockCodec for Q2K {
    const BLOCK: usize = QK_K;
    const BYTES: usize = 84;

    /// Requires whole super-blocks (`x.len()` a multiple of 256; checked in debug builds).
    fn quantize_row(x: &[f32], importance: Option<&[f32]>, out: &mut [u8]) {
        encode_row(x, importance, out, Self::BYTES, q2k_encode_block);
    }

    fn grid(block: &[u8], i: usize) -> Grid {
        let sc = block[Q2K_SCALES + i / 16];
        let scale = read_f16(block, Q2K_D) * f32::from(sc & 0xF);
        let min = read_f16(block, Q2K_DMIN) * f32::from(sc >> 4);
        Grid::Affine {
            scale,
            offset: -min,
            qmin: 0,
            qmax: 3,
        }
    }

    fn set_quant(block: &mut [u8], i: usize, q: i32) {
        let (byte, shift) = locate_2bit(i);
        let qs = &mut block[Q2K_QS + byte];
        *qs = (*qs & !(3 << shift)) | ((q as u8 & 3) << shift);
    }
}

// ---------------------------------------------------------------------------------------------
// Q3_K: hmask[32], qs[64], scales[12] (16 six-bit scales), d.
// ---------------------------------------------------------------------------------------------

const Q3K_HMASK: usize = 0;
const Q3K_QS: usize = 32;
const Q3K_SCALES: usize = 96;
const Q3K_D: usize = 108;

/// Q3_K: 16 sub-blocks of 16 with signed 6-bit scales; value `d (sc - 32) q`, q in -4..=3
/// (its grid's codes are the signed values; the stored 3 bits are `q + 4`).
pub struct Q3K;

/// Stores 6-bit sub-block scale `l` (0..=63) of sub-block `j`: low nibbles in bytes 0..8,
/// high two bits in bytes 8..12.
fn q3k_pack_scale(scales: &mut [u8], j: usize, l: i32) {
    if j < 8 {
        scales[j] = (l & 0xF) as u8;
    } else {
        scales[j - 8] |= ((l & 0xF) << 4) as u8;
    }
    scales[j % 4 + 8] |= ((l >> 4) << (2 * (j / 4))) as u8;
}

/// Sub-block `j`'s signed scale (`sc - 32`).
fn q3k_scale(scales: &[u8], j: usize) -> i32 {
    let low = if j < 8 {
        scales[j] & 0xF
    } else {
        scales[j - 8] >> 4
    };
    let high = (scales[8 + j % 4] >> (2 * (j / 4))) & 3;
    i32::from(low | high << 4) - 32
}

fn q3k_encode_block(x: &[f32], importance: Option<&[f32]>, block: &mut [u8]) {
    let mut levels = [0i8; QK_K];
    let mut scales = [0.0f32; QK_K / 16];
    block[Q3K_SCALES..Q3K_SCALES + 12].fill(0);

    let d = match importance {
        None => {
            let (mut max_scale, mut amax) = (0.0f32, 0.0f32);
            for j in 0..QK_K / 16 {
                let levels = &mut levels[16 * j..16 * j + 16];
                scales[j] = make_q3_quants(&x[16 * j..16 * j + 16], 4, levels);
                if scales[j].abs() > amax {
                    amax = scales[j].abs();
                    max_scale = scales[j];
                }
            }
            if max_scale != 0.0 {
                let iscale = -32.0 / max_scale;
                let packed = &mut block[Q3K_SCALES..Q3K_SCALES + 12];
                for (j, &scale) in scales.iter().enumerate() {
                    let l = i32::from(nearest_int(iscale * scale) as i8).clamp(-32, 31) + 32;
                    q3k_pack_scale(packed, j, l);
                }
                1.0 / iscale
            } else {
                0.0
            }
        }
        Some(importance) => {
            let sigma2 = 2.0 * sum_squares(x) / QK_K as f32;
            let mut weights = [0.0f32; 16];
            let mut sw = [0.0f32; QK_K / 16];
            for j in 0..QK_K / 16 {
                let xs = &x[16 * j..16 * j + 16];
                sigma_weights(xs, &importance[16 * j..16 * j + 16], sigma2, &mut weights);
                sw[j] = weights.iter().fold(0.0f32, |s, &w| s + w);
                let levels = &mut levels[16 * j..16 * j + 16];
                scales[j] = make_qx_quants(xs, 4, levels, Some(&weights));
            }
            let mut ls = [0i8; QK_K / 16];
            let d = make_qx_quants(&scales, 32, &mut ls, Some(&sw));
            let packed = &mut block[Q3K_SCALES..Q3K_SCALES + 12];
            for (j, &l) in ls.iter().enumerate() {
                q3k_pack_scale(packed, j, i32::from(l));
            }
            d
        }
    };
    block[Q3K_D..Q3K_D + 2].copy_from_slice(&f16_bytes(d));

    // Final codes from the stored scales, then the high bits into hmask.
    let d = read_f16(block, Q3K_D);
    for j in 0..QK_K / 16 {
        let dl = d * q3k_scale(&block[Q3K_SCALES..], j) as f32;
        if dl == 0.0 {
            continue;
        }
        for ii in 0..16 {
            let l = nearest_int(x[16 * j + ii] / dl).clamp(-4, 3);
            levels[16 * j + ii] = (l + 4) as i8;
        }
    }
    let hmask = &mut block[Q3K_HMASK..Q3K_HMASK + 32];
    hmask.fill(0);
    let mut low = [0u8; QK_K];
    for (e, &l) in levels.iter().enumerate() {
        let mut l = l as u8;
        if l > 3 {
            hmask[e % 32] |= 1 << (e / 32);
            l -= 4;
        }
        low[e] = l;
    }
    pack_2bit(&low, &mut block[Q3K_QS..Q3K_QS + 64]);
}

impl BlockCodec for Q3K {
    const BLOCK: usize = QK_K;
    const BYTES: usize = 110;

    /// Requires whole super-blocks (`x.len()` a multiple of 256; checked in debug builds).
    fn quantize_row(x: &[f32], importance: Option<&[f32]>, out: &mut [u8]) {
        encode_row(x, importance, out, Self::BYTES, q3k_encode_block);
    }

    fn grid(block: &[u8], i: usize) -> Grid {
        let scale = read_f16(block, Q3K_D) * q3k_scale(&block[Q3K_SCALES..], i / 16) as f32;
        Grid::Affine {
            scale,
            offset: 0.0,
            qmin: -4,
            qmax: 3,
        }
    }

    fn set_quant(block: &mut [u8], i: usize, q: i32) {
        let stored = (q + 4) as u8;
        let (byte, shift) = locate_2bit(i);
        let qs = &mut block[Q3K_QS + byte];
        *qs = (*qs & !(3 << shift)) | ((stored & 3) << shift);
        let bit = 1u8 << (i / 32);
        let hmask = &mut block[Q3K_HMASK + i % 32];
        *hmask = if stored & 4 != 0 {
            *hmask | bit
        } else {
            *hmask & !bit
        };
    }
}

// ---------------------------------------------------------------------------------------------
// Q4_K and Q5_K: d, dmin, scales[12] (8 six-bit scales and 8 six-bit mins), then the codes.
// ---------------------------------------------------------------------------------------------

const K4_D: usize = 0;
const K4_DMIN: usize = 2;
const K4_SCALES: usize = 4;

/// Sub-block `j`'s 6-bit scale and min in the 12-byte packing of Q4_K and Q5_K (ggml's
/// `get_scale_min_k4`).
fn k4_scale_min(scales: &[u8], j: usize) -> (u8, u8) {
    if j < 4 {
        (scales[j] & 63, scales[j + 4] & 63)
    } else {
        (
            (scales[j + 4] & 0xF) | (scales[j - 4] >> 6) << 4,
            (scales[j + 4] >> 4) | (scales[j] >> 6) << 4,
        )
    }
}

/// Stores sub-block `j`'s scale and min (j in 0..8, in increasing order; bytes 0..8 are
/// overwritten for j < 4 and only ORed into after).
fn k4_pack_scale_min(scales: &mut [u8], j: usize, ls: u8, lm: u8) {
    if j < 4 {
        scales[j] = ls;
        scales[j + 4] = lm;
    } else {
        scales[j + 4] = (ls & 0xF) | (lm & 0xF) << 4;
        scales[j - 4] |= (ls >> 4) << 6;
        scales[j] |= (lm >> 4) << 6;
    }
}

/// What differs between Q4_K's and Q5_K's scale searches.
struct K4Search {
    /// Largest code (15 or 31).
    nmax: i32,
    /// The reference quantizer's trial scales.
    reference_steps: ScaleSteps,
    /// Whether the weighted path caps the 6-bit scale codes at 63 (ggml does for Q5_K only;
    /// they exceed it only when a wrapped negative code came out of the search, which Q4_K then
    /// stores as it is).
    cap_weighted_codes: bool,
}

/// The scale search shared by Q4_K and Q5_K: stores d, dmin and the packed sub-block scales and
/// returns the codes (0 ..= `nmax`) of every element under them.
fn k4_encode_scales(
    x: &[f32],
    importance: Option<&[f32]>,
    search: &K4Search,
    block: &mut [u8],
) -> [u8; QK_K] {
    let K4Search {
        nmax,
        reference_steps,
        cap_weighted_codes,
    } = *search;
    let mut levels = [0u8; QK_K];
    let mut scales = [0.0f32; QK_K / 32];
    let mut mins = [0.0f32; QK_K / 32];
    let mut weights = [0.0f32; 32];

    let (d, dmin) = match importance {
        None => {
            let (mut max_scale, mut max_min) = (0.0f32, 0.0f32);
            for j in 0..QK_K / 32 {
                let xs = &x[32 * j..32 * j + 32];
                let av_x = (sum_squares(xs) / 32.0).sqrt();
                for (w, &v) in weights.iter_mut().zip(xs) {
                    *w = av_x + v.abs();
                }
                let levels = &mut levels[32 * j..32 * j + 32];
                (scales[j], mins[j]) =
                    make_qkx_quants(xs, &weights, nmax, levels, reference_steps, false);
                if scales[j] > max_scale {
                    max_scale = scales[j];
                }
                if mins[j] > max_min {
                    max_min = mins[j];
                }
            }
            let inv_scale = if max_scale > 0.0 {
                63.0 / max_scale
            } else {
                0.0
            };
            let inv_min = if max_min > 0.0 { 63.0 / max_min } else { 0.0 };
            let packed = &mut block[K4_SCALES..K4_SCALES + 12];
            for j in 0..QK_K / 32 {
                let ls = (nearest_int(inv_scale * scales[j]) as u8).min(63);
                let lm = (nearest_int(inv_min * mins[j]) as u8).min(63);
                k4_pack_scale_min(packed, j, ls, lm);
            }
            (max_scale / 63.0, max_min / 63.0)
        }
        Some(importance) => {
            let steps = ScaleSteps {
                rmin: -0.9,
                rdelta: 0.05,
                nstep: 36,
            };
            let sigma2 = 2.0 * sum_squares(x) / QK_K as f32;
            let mut sw = [0.0f32; QK_K / 32];
            for j in 0..QK_K / 32 {
                let xs = &x[32 * j..32 * j + 32];
                sigma_weights(xs, &importance[32 * j..32 * j + 32], sigma2, &mut weights);
                sw[j] = weights.iter().fold(0.0f32, |s, &w| s + w);
                let levels = &mut levels[32 * j..32 * j + 32];
                (scales[j], mins[j]) = make_qkx_quants(xs, &weights, nmax, levels, steps, false);
            }
            let (mut ls, mut lm) = ([0u8; QK_K / 32], [0u8; QK_K / 32]);
            let d = make_qp_quants(&scales, 63, &mut ls, &sw);
            let dmin = make_qp_quants(&mins, 63, &mut lm, &sw);
            let packed = &mut block[K4_SCALES..K4_SCALES + 12];
            for j in 0..QK_K / 32 {
                let (ls, lm) = if cap_weighted_codes {
                    (ls[j].min(63), lm[j].min(63))
                } else {
                    (ls[j], lm[j])
                };
                k4_pack_scale_min(packed, j, ls, lm);
            }
            (d, dmin)
        }
    };
    block[K4_D..K4_D + 2].copy_from_slice(&f16_bytes(d));
    block[K4_DMIN..K4_DMIN + 2].copy_from_slice(&f16_bytes(dmin));

    // Final codes from the stored scales.
    let d = read_f16(block, K4_D);
    let dmin = read_f16(block, K4_DMIN);
    for j in 0..QK_K / 32 {
        let (sc, m) = k4_scale_min(&block[K4_SCALES..], j);
        let dl = d * f32::from(sc);
        if dl == 0.0 {
            continue;
        }
        let ml = dmin * f32::from(m);
        for ii in 0..32 {
            let l = nearest_int((x[32 * j + ii] + ml) / dl).clamp(0, nmax);
            levels[32 * j + ii] = l as u8;
        }
    }
    levels
}

/// Element `i`'s grid in Q4_K and Q5_K (codes `0 ..= qmax`).
fn k4_grid(block: &[u8], i: usize, qmax: i32) -> Grid {
    let (sc, m) = k4_scale_min(&block[K4_SCALES..], i / 32);
    let scale = read_f16(block, K4_D) * f32::from(sc);
    let min = read_f16(block, K4_DMIN) * f32::from(m);
    Grid::Affine {
        scale,
        offset: -min,
        qmin: 0,
        qmax,
    }
}

/// The byte and shift of element `i`'s low nibble in Q4_K's and Q5_K's `qs`: byte `32 c + l`
/// holds elements `64 c + l` (low nibble) and `64 c + 32 + l` (high nibble).
fn k4_locate_nibble(i: usize) -> (usize, u32) {
    (32 * (i / 64) + i % 32, 4 * ((i % 64) / 32) as u32)
}

const Q4K_QS: usize = 16;

/// Q4_K: 8 sub-blocks of 32 with 6-bit scales and mins; value `d sc q - dmin m`, q in 0..=15.
pub struct Q4K;

fn q4k_encode_block(x: &[f32], importance: Option<&[f32]>, block: &mut [u8]) {
    let search = K4Search {
        nmax: 15,
        reference_steps: ScaleSteps {
            rmin: -1.0,
            rdelta: 0.1,
            nstep: 20,
        },
        cap_weighted_codes: false,
    };
    let levels = k4_encode_scales(x, importance, &search, block);
    let qs = &mut block[Q4K_QS..Q4K_QS + 128];
    for c in 0..4 {
        for l in 0..32 {
            qs[32 * c + l] = levels[64 * c + l] | levels[64 * c + 32 + l] << 4;
        }
    }
}

impl BlockCodec for Q4K {
    const BLOCK: usize = QK_K;
    const BYTES: usize = 144;

    /// Requires whole super-blocks (`x.len()` a multiple of 256; checked in debug builds).
    fn quantize_row(x: &[f32], importance: Option<&[f32]>, out: &mut [u8]) {
        encode_row(x, importance, out, Self::BYTES, q4k_encode_block);
    }

    fn grid(block: &[u8], i: usize) -> Grid {
        k4_grid(block, i, 15)
    }

    fn set_quant(block: &mut [u8], i: usize, q: i32) {
        let (byte, shift) = k4_locate_nibble(i);
        let qs = &mut block[Q4K_QS + byte];
        *qs = (*qs & !(0xF << shift)) | ((q as u8 & 0xF) << shift);
    }
}

const Q5K_QH: usize = 16;
const Q5K_QS: usize = 48;

/// Q5_K: Q4_K's scales with a fifth code bit in `qh`; value `d sc q - dmin m`, q in 0..=31.
pub struct Q5K;

fn q5k_encode_block(x: &[f32], importance: Option<&[f32]>, block: &mut [u8]) {
    let search = K4Search {
        nmax: 31,
        reference_steps: ScaleSteps {
            rmin: -0.5,
            rdelta: 0.1,
            nstep: 15,
        },
        cap_weighted_codes: true,
    };
    let levels = k4_encode_scales(x, importance, &search, block);
    let (qh, qs) = block[Q5K_QH..Q5K_QS + 128].split_at_mut(32);
    qh.fill(0);
    for c in 0..4 {
        for l in 0..32 {
            let (mut low, mut high) = (levels[64 * c + l], levels[64 * c + 32 + l]);
            if low > 15 {
                low -= 16;
                qh[l] |= 1 << (2 * c);
            }
            if high > 15 {
                high -= 16;
                qh[l] |= 2 << (2 * c);
            }
            qs[32 * c + l] = low | high << 4;
        }
    }
}

impl BlockCodec for Q5K {
    const BLOCK: usize = QK_K;
    const BYTES: usize = 176;

    /// Requires whole super-blocks (`x.len()` a multiple of 256; checked in debug builds).
    fn quantize_row(x: &[f32], importance: Option<&[f32]>, out: &mut [u8]) {
        encode_row(x, importance, out, Self::BYTES, q5k_encode_block);
    }

    fn grid(block: &[u8], i: usize) -> Grid {
        k4_grid(block, i, 31)
    }

    fn set_quant(block: &mut [u8], i: usize, q: i32) {
        let (byte, shift) = k4_locate_nibble(i);
        let qs = &mut block[Q5K_QS + byte];
        *qs = (*qs & !(0xF << shift)) | ((q as u8 & 0xF) << shift);
        let bit = 1u8 << (i / 32);
        let qh = &mut block[Q5K_QH + i % 32];
        *qh = if q & 16 != 0 { *qh | bit } else { *qh & !bit };
    }
}

// ---------------------------------------------------------------------------------------------
// Q6_K: ql[128], qh[64], scales[16] (i8), d.
// ---------------------------------------------------------------------------------------------

const Q6K_QL: usize = 0;
const Q6K_QH: usize = 128;
const Q6K_SCALES: usize = 192;
const Q6K_D: usize = 208;

/// Q6_K: 16 sub-blocks of 16 with signed 8-bit scales; value `d sc q`, q in -32..=31 (its
/// grid's codes are the signed values; the stored 6 bits are `q + 32`).
pub struct Q6K;

/// Where element `i`'s code lives: the `ql` byte and nibble shift, the `qh` byte and shift.
/// Within each half of 128, element `32 k + l` has its low nibble in `ql[l + 32 (k % 2)]`
/// (high nibble for k >= 2) and its top two bits in `qh[l]` at bits `2k`.
fn q6k_locate(i: usize) -> (usize, u32, usize, u32) {
    let (h, k, l) = (i / 128, (i % 128) / 32, i % 32);
    (
        64 * h + l + 32 * (k % 2),
        4 * (k / 2) as u32,
        32 * h + l,
        2 * k as u32,
    )
}

fn q6k_encode_block(x: &[f32], importance: Option<&[f32]>, block: &mut [u8]) {
    let mut levels = [0i8; QK_K];
    let mut scales = [0.0f32; QK_K / 16];

    let (mut max_scale, mut max_abs_scale) = (0.0f32, 0.0f32);
    for j in 0..QK_K / 16 {
        let weights = importance.map(|w| &w[16 * j..16 * j + 16]);
        let levels = &mut levels[16 * j..16 * j + 16];
        scales[j] = make_qx_quants(&x[16 * j..16 * j + 16], 32, levels, weights);
        if scales[j].abs() > max_abs_scale {
            max_abs_scale = scales[j].abs();
            max_scale = scales[j];
        }
    }
    if max_abs_scale < GROUP_MAX_EPS {
        block.fill(0);
        return;
    }

    let iscale = -128.0 / max_scale;
    block[Q6K_D..Q6K_D + 2].copy_from_slice(&f16_bytes(1.0 / iscale));
    for j in 0..QK_K / 16 {
        block[Q6K_SCALES + j] = nearest_int(iscale * scales[j]).min(127) as i8 as u8;
    }

    let d = read_f16(block, Q6K_D);
    for j in 0..QK_K / 16 {
        let dl = d * f32::from(block[Q6K_SCALES + j] as i8);
        if dl == 0.0 {
            continue;
        }
        for ii in 0..16 {
            let l = nearest_int(x[16 * j + ii] / dl).clamp(-32, 31);
            levels[16 * j + ii] = (l + 32) as i8;
        }
    }

    block[..Q6K_SCALES].fill(0);
    for (i, &l) in levels.iter().enumerate() {
        let l = l as u8;
        let (ql, ql_shift, qh, qh_shift) = q6k_locate(i);
        block[Q6K_QL + ql] |= (l & 0xF) << ql_shift;
        block[Q6K_QH + qh] |= (l >> 4) << qh_shift;
    }
}

impl BlockCodec for Q6K {
    const BLOCK: usize = QK_K;
    const BYTES: usize = 210;

    /// Requires whole super-blocks (`x.len()` a multiple of 256; checked in debug builds).
    fn quantize_row(x: &[f32], importance: Option<&[f32]>, out: &mut [u8]) {
        encode_row(x, importance, out, Self::BYTES, q6k_encode_block);
    }

    fn grid(block: &[u8], i: usize) -> Grid {
        let scale = read_f16(block, Q6K_D) * f32::from(block[Q6K_SCALES + i / 16] as i8);
        Grid::Affine {
            scale,
            offset: 0.0,
            qmin: -32,
            qmax: 31,
        }
    }

    fn set_quant(block: &mut [u8], i: usize, q: i32) {
        let stored = (q + 32) as u8;
        let (ql, ql_shift, qh, qh_shift) = q6k_locate(i);
        let low = &mut block[Q6K_QL + ql];
        *low = (*low & !(0xF << ql_shift)) | ((stored & 0xF) << ql_shift);
        let high = &mut block[Q6K_QH + qh];
        *high = (*high & !(3 << qh_shift)) | (((stored >> 4) & 3) << qh_shift);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec::fixtures;

    /// The stored code of element `i`, in its grid's numbering (the inverse of `set_quant`).
    trait StoredCode: BlockCodec {
        fn code(block: &[u8], i: usize) -> i32;
    }

    impl StoredCode for Q2K {
        fn code(block: &[u8], i: usize) -> i32 {
            let (byte, shift) = locate_2bit(i);
            i32::from((block[Q2K_QS + byte] >> shift) & 3)
        }
    }

    impl StoredCode for Q3K {
        fn code(block: &[u8], i: usize) -> i32 {
            let (byte, shift) = locate_2bit(i);
            let low = i32::from((block[Q3K_QS + byte] >> shift) & 3);
            let high = i32::from((block[Q3K_HMASK + i % 32] >> (i / 32)) & 1);
            low + 4 * high - 4
        }
    }

    impl StoredCode for Q4K {
        fn code(block: &[u8], i: usize) -> i32 {
            let (byte, shift) = k4_locate_nibble(i);
            i32::from((block[Q4K_QS + byte] >> shift) & 0xF)
        }
    }

    impl StoredCode for Q5K {
        fn code(block: &[u8], i: usize) -> i32 {
            let (byte, shift) = k4_locate_nibble(i);
            let low = i32::from((block[Q5K_QS + byte] >> shift) & 0xF);
            let high = i32::from((block[Q5K_QH + i % 32] >> (i / 32)) & 1);
            low + 16 * high
        }
    }

    impl StoredCode for Q6K {
        fn code(block: &[u8], i: usize) -> i32 {
            let (ql, ql_shift, qh, qh_shift) = q6k_locate(i);
            let low = i32::from((block[Q6K_QL + ql] >> ql_shift) & 0xF);
            let high = i32::from((block[Q6K_QH + qh] >> qh_shift) & 3);
            low + 16 * high - 32
        }
    }

    /// Every fixture row encoded by `C` equals llama.cpp's bytes; on mismatch, names the type,
    /// row, super-block and first differing byte of each differing row.
    fn assert_rows_match<C: BlockCodec>(ggml_name: &str, weighted: bool) {
        let input = fixtures::input();
        let importance = fixtures::importance();
        let expected = fixtures::encoded(ggml_name, weighted);
        let row_bytes = fixtures::N_PER_ROW / C::BLOCK * C::BYTES;
        assert_eq!(
            expected.len(),
            fixtures::N_ROWS * row_bytes,
            "{ggml_name} fixture size"
        );

        let mut failures = Vec::new();
        for row in 0..fixtures::N_ROWS {
            let x = &input[row * fixtures::N_PER_ROW..(row + 1) * fixtures::N_PER_ROW];
            let mut out = vec![0xAAu8; row_bytes];
            C::quantize_row(x, weighted.then_some(&importance[..]), &mut out);
            let want = &expected[row * row_bytes..(row + 1) * row_bytes];
            if let Some(at) = (0..row_bytes).find(|&k| out[k] != want[k]) {
                failures.push(format!(
                    "{ggml_name} ({}) row {row}, super-block {}, byte {}: {:#04x}, llama.cpp {:#04x}",
                    if weighted { "imatrix" } else { "reference" },
                    at / C::BYTES,
                    at % C::BYTES,
                    out[at],
                    want[at],
                ));
            }
        }
        assert!(failures.is_empty(), "{}", failures.join("\n"));
    }

    /// Over llama.cpp's decoding of its own encoding, the grid's nearest code to each decoded
    /// value is the stored code and its value is the decoded value exactly.
    fn assert_grid_matches_decoding<C: StoredCode>(ggml_name: &str) {
        let encoded = fixtures::encoded(ggml_name, false);
        let decoded = fixtures::decoded(ggml_name);
        assert_eq!(
            decoded.len(),
            fixtures::N_DECODED_ROWS * fixtures::N_PER_ROW
        );
        for (b, values) in decoded.chunks_exact(C::BLOCK).enumerate() {
            let block = &encoded[b * C::BYTES..(b + 1) * C::BYTES];
            for (i, &value) in values.iter().enumerate() {
                let grid = C::grid(block, i);
                let code = grid.nearest(value);
                assert_eq!(
                    grid.value(code),
                    value,
                    "{ggml_name} block {b} element {i}: grid {grid:?}, code {code}"
                );
                assert_eq!(code, C::code(block, i), "{ggml_name} block {b} element {i}");
            }
        }
    }

    /// `set_quant` writes exactly element `i`'s code: it reads back, every other code and every
    /// grid is unchanged, and writing the old code restores the block.
    fn assert_set_quant_round_trips<C: StoredCode>(ggml_name: &str) {
        let encoded = fixtures::encoded(ggml_name, true);
        let original = &encoded[C::BYTES..2 * C::BYTES];
        let grids: Vec<Grid> = (0..C::BLOCK).map(|k| C::grid(original, k)).collect();
        let codes: Vec<i32> = (0..C::BLOCK).map(|k| C::code(original, k)).collect();
        for i in (0..C::BLOCK).step_by(5) {
            let Grid::Affine { qmin, qmax, .. } = grids[i] else {
                panic!("{ggml_name}: K-quant grids are affine");
            };
            for q in qmin..=qmax {
                let mut block = original.to_vec();
                C::set_quant(&mut block, i, q);
                for k in 0..C::BLOCK {
                    let want = if k == i { q } else { codes[k] };
                    assert_eq!(
                        C::code(&block, k),
                        want,
                        "{ggml_name}: set {i} to {q}, read {k}"
                    );
                    assert_eq!(C::grid(&block, k), grids[k], "{ggml_name}: grid {k} moved");
                }
                C::set_quant(&mut block, i, codes[i]);
                assert_eq!(block, original, "{ggml_name}: restoring element {i}");
            }
        }
    }

    #[test]
    fn q2_k_matches_llama_cpp() {
        assert_rows_match::<Q2K>("q2_K", false);
        assert_rows_match::<Q2K>("q2_K", true);
    }

    #[test]
    fn q3_k_matches_llama_cpp() {
        assert_rows_match::<Q3K>("q3_K", false);
        assert_rows_match::<Q3K>("q3_K", true);
    }

    #[test]
    fn q4_k_matches_llama_cpp() {
        assert_rows_match::<Q4K>("q4_K", false);
        assert_rows_match::<Q4K>("q4_K", true);
    }

    #[test]
    fn q5_k_matches_llama_cpp() {
        assert_rows_match::<Q5K>("q5_K", false);
        assert_rows_match::<Q5K>("q5_K", true);
    }

    #[test]
    fn q6_k_matches_llama_cpp() {
        assert_rows_match::<Q6K>("q6_K", false);
        assert_rows_match::<Q6K>("q6_K", true);
    }

    #[test]
    fn grids_reproduce_llama_cpp_decoding() {
        assert_grid_matches_decoding::<Q2K>("q2_K");
        assert_grid_matches_decoding::<Q3K>("q3_K");
        assert_grid_matches_decoding::<Q4K>("q4_K");
        assert_grid_matches_decoding::<Q5K>("q5_K");
        assert_grid_matches_decoding::<Q6K>("q6_K");
    }

    #[test]
    fn set_quant_writes_only_its_element() {
        assert_set_quant_round_trips::<Q2K>("q2_K");
        assert_set_quant_round_trips::<Q3K>("q3_K");
        assert_set_quant_round_trips::<Q4K>("q4_K");
        assert_set_quant_round_trips::<Q5K>("q5_K");
        assert_set_quant_round_trips::<Q6K>("q6_K");
    }

    #[test]
    fn nearest_int_rounds_half_to_even() {
        let cases = [
            (0.5, 0),
            (1.5, 2),
            (2.5, 2),
            (-0.5, 0),
            (-1.5, -2),
            (3.49, 3),
            (-7.6, -8),
        ];
        for (x, want) in cases {
            assert_eq!(nearest_int(x), want, "nearest_int({x})");
        }
    }
}
