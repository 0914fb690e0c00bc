// RMSNorm and LayerNorm over rows of d values, with their gradients.
//
//   rms:   y = x * rstd * w,            rstd = 1 / sqrt(mean(x^2) + eps)
//   layer: y = (x - mu) * rstd * w + b, rstd = 1 / sqrt(mean((x - mu)^2) + eps)
//
// LAYER (a define) is 1 for LayerNorm, 0 for RMSNorm. The forward pass keeps (mu, rstd) per
// row in `stats` (mu = 0 for rms) for the backward pass.
// Row entries: each row belongs to TPR threads of a workgroup of WG (both powers of two, TPR
// dividing WG), which stride over the row and sum through workgroup memory; TPR = 1 gives a
// row to each thread (for CPU devices, whose SIMD lanes are threads). Workgroups are linear
// over x and y (see `split_groups`).
//
// Bindings: each entry uses a prefix of them, so the runtime binds buffers in order; what the
// fourth one holds depends on the entry (see each).

struct Params {
    rows: u32,
    d: u32,
    eps: f32,
    pad: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read_write> o0: array<f32>;
@group(0) @binding(2) var<storage, read> i0: array<f32>;
@group(0) @binding(3) var<storage, read> i1: array<f32>;
@group(0) @binding(4) var<storage, read_write> o1: array<f32>;
@group(0) @binding(5) var<storage, read> i2: array<f32>;

var<workgroup> red: array<vec2<f32>, WG>;

// The sum of v over the TPR threads sharing li's row, returned to each of them. Every thread
// of the workgroup must call it (it holds barriers).
fn row_sum(li: u32, v: vec2<f32>) -> vec2<f32> {
    if (TPR == 1u) {
        return v;
    }
    red[li] = v;
    workgroupBarrier();
    let lane = li % TPR;
    for (var s = TPR / 2u; s > 0u; s >>= 1u) {
        if (lane < s) {
            red[li] += red[li + s];
        }
        workgroupBarrier();
    }
    let total = red[li - lane];
    workgroupBarrier();
    return total;
}

fn row_of(wid: vec3<u32>, nwg: vec3<u32>, li: u32) -> u32 {
    return (wid.x + wid.y * nwg.x) * (WG / TPR) + li / TPR;
}

// y (o0) from x (i0), w (i1) and, for layer, b (i2); writes (mu, rstd) of each row to o1.
@compute @workgroup_size(WG)
fn norm(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) li: u32,
) {
    let row = row_of(wid, nwg, li);
    let lane = li % TPR;
    let live = row < p.rows;
    let base = row * p.d;
    var mu = 0.0;
    if (LAYER == 1u) {
        var s = 0.0;
        if (live) {
            for (var c = lane; c < p.d; c += TPR) {
                s += i0[base + c];
            }
        }
        mu = row_sum(li, vec2<f32>(s, 0.0)).x / f32(p.d);
    }
    var ss = 0.0;
    if (live) {
        for (var c = lane; c < p.d; c += TPR) {
            let v = i0[base + c] - mu;
            ss += v * v;
        }
    }
    let rstd = inverseSqrt(row_sum(li, vec2<f32>(ss, 0.0)).x / f32(p.d) + p.eps);
    if (!live) {
        return;
    }
    for (var c = lane; c < p.d; c += TPR) {
        var y = (i0[base + c] - mu) * rstd * i1[c];
        if (LAYER == 1u) {
            y += i2[c];
        }
        o0[base + c] = y;
    }
    if (lane == 0u) {
        o1[2u * row] = mu;
        o1[2u * row + 1u] = rstd;
    }
}

// dx (o0) += rstd * (g - mean(g) - xhat * mean(g * xhat)) with g = dy * w and xhat the
// normalised x (the mean(g) term for layer only), from x (i0), w (i1), the forward's stats (o1,
// only read) and dy (i2).
@compute @workgroup_size(WG)
fn norm_grad_x(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) li: u32,
) {
    let row = row_of(wid, nwg, li);
    let lane = li % TPR;
    let live = row < p.rows;
    let base = row * p.d;
    var mu = 0.0;
    var rstd = 0.0;
    var acc = vec2<f32>(0.0);
    if (live) {
        mu = o1[2u * row];
        rstd = o1[2u * row + 1u];
        for (var c = lane; c < p.d; c += TPR) {
            let xhat = (i0[base + c] - mu) * rstd;
            let g = i2[base + c] * i1[c];
            acc += vec2<f32>(g, g * xhat);
        }
    }
    let means = row_sum(li, acc) / f32(p.d);
    if (!live) {
        return;
    }
    var mean_g = 0.0;
    if (LAYER == 1u) {
        mean_g = means.x;
    }
    for (var c = lane; c < p.d; c += TPR) {
        let xhat = (i0[base + c] - mu) * rstd;
        let g = i2[base + c] * i1[c];
        o0[base + c] += rstd * (g - mean_g - xhat * means.y);
    }
}

// dw (o0) += sum over rows of dy * xhat and, for layer, db (o1) += sum over rows of dy, from
// x (i0), the forward's stats (i1) and dy (i2). One thread per column, summing the rows in
// order; workgroups of 64.
@compute @workgroup_size(64)
fn norm_grad_wb(
    @builtin(global_invocation_id) gid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
) {
    let c = gid.x + gid.y * nwg.x * 64u;
    if (c >= p.d) {
        return;
    }
    var dw = 0.0;
    var db = 0.0;
    for (var r = 0u; r < p.rows; r++) {
        let at = r * p.d + c;
        let dy = i2[at];
        dw += dy * (i0[at] - i1[2u * r]) * i1[2u * r + 1u];
        db += dy;
    }
    o0[c] += dw;
    if (LAYER == 1u) {
        o1[c] += db;
    }
}
