// Softmax over each row of x, in place, stable (the row maximum is subtracted first).
//
// Work split: one workgroup of WG threads per row: a max reduction, a sum reduction, then a
// scaling pass, each striding over the row.

struct Params {
    k: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read_write> x: array<f32>;

var<workgroup> partial: array<f32, WG>;

fn reduce_max(t: u32) -> f32 {
    for (var s = WG / 2u; s > 0u; s >>= 1u) {
        if (t < s) {
            partial[t] = max(partial[t], partial[t + s]);
        }
        workgroupBarrier();
    }
    return partial[0];
}

fn reduce_sum(t: u32) -> f32 {
    for (var s = WG / 2u; s > 0u; s >>= 1u) {
        if (t < s) {
            partial[t] += partial[t + s];
        }
        workgroupBarrier();
    }
    return partial[0];
}

@compute @workgroup_size(WG)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) t: u32) {
    let base = wid.x * p.k;
    var m = -3.4e38;
    for (var i = t; i < p.k; i += WG) {
        m = max(m, x[base + i]);
    }
    partial[t] = m;
    workgroupBarrier();
    let row_max = reduce_max(t);
    workgroupBarrier();

    var sum = 0.0;
    for (var i = t; i < p.k; i += WG) {
        let e = exp(x[base + i] - row_max);
        x[base + i] = e;
        sum += e;
    }
    partial[t] = sum;
    workgroupBarrier();
    let total = reduce_sum(t);
    for (var i = t; i < p.k; i += WG) {
        x[base + i] /= total;
    }
}
