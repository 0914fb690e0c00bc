// out[r] = the index of the largest value of row r of x; ties go to the lowest index.
//
// Work split: one workgroup of WG threads per row; each thread scans a strided slice, then the
// (value, index) pairs are reduced in workgroup memory.

struct Params {
    k: u32,
    offset: u32, // element offset of row 0
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> x: array<f32>;
@group(0) @binding(2) var<storage, read_write> out: array<u32>;

const NONE: u32 = 0xffffffffu;

var<workgroup> best_value: array<f32, WG>;
var<workgroup> best_index: array<u32, WG>;

@compute @workgroup_size(WG)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) t: u32) {
    let base = p.offset + wid.x * p.k;
    var v = -3.4e38;
    var idx = NONE;
    for (var i = t; i < p.k; i += WG) {
        let xi = x[base + i];
        if (xi > v || idx == NONE) {
            v = xi;
            idx = i;
        }
    }
    best_value[t] = v;
    best_index[t] = idx;
    workgroupBarrier();
    for (var s = WG / 2u; s > 0u; s >>= 1u) {
        if (t < s) {
            let ov = best_value[t + s];
            let oi = best_index[t + s];
            let bi = best_index[t];
            let bv = best_value[t];
            if (oi != NONE && (bi == NONE || ov > bv || (ov == bv && oi < bi))) {
                best_value[t] = ov;
                best_index[t] = oi;
            }
        }
        workgroupBarrier();
    }
    if (t == 0u) {
        out[wid.x] = best_index[0];
    }
}
