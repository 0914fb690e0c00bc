// y[r, :] = x[r, :] / sqrt(mean(x[r, :]^2) + eps) * w: RMSNorm over rows.
//
// Work split: one workgroup of WG threads per row; threads stride over the row, then reduce the
// sum of squares in workgroup memory (WG is a power of two).

struct Params {
    k: u32,
    eps: f32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> x: array<f32>;
@group(0) @binding(2) var<storage, read> w: array<f32>;
@group(0) @binding(3) var<storage, read_write> y: array<f32>;

var<workgroup> partial: array<f32, WG>;

@compute @workgroup_size(WG)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) t: u32) {
    let base = wid.x * p.k;
    var acc = 0.0;
    for (var i = t; i < p.k; i += WG) {
        let v = x[base + i];
        acc += v * v;
    }
    partial[t] = acc;
    workgroupBarrier();
    for (var s = WG / 2u; s > 0u; s >>= 1u) {
        if (t < s) {
            partial[t] += partial[t + s];
        }
        workgroupBarrier();
    }
    let scale = inverseSqrt(partial[0] / f32(p.k) + p.eps);
    for (var i = t; i < p.k; i += WG) {
        y[base + i] = x[base + i] * scale * w[i];
    }
}
