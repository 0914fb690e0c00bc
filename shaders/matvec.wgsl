// y[m, n] = sum_k x[m, k] * W[n, k]: matrix-vector products for decoding (few rows of x).
//
// Work split: ROWS output rows per workgroup of WG threads; the TPR = WG / ROWS threads of a row
// stride over its groups of four elements, then sum their partial sums with `row_sum`: by
// subgroup shuffles where the device has subgroups of at least TPR lanes, in workgroup memory
// otherwise (the runtime includes one of `row_sum_subgroup.wgsl`, `row_sum_shared.wgsl`). Workgroups are
// linear over x and y (see `split_groups`); z indexes the row m of x. W is one row range of a
// weight (a part), whose first row is output column `row_offset`.

struct Params {
    n: u32,          // rows in this part
    k: u32,          // row length
    row_offset: u32, // output column of the part's first row
    y_stride: u32,   // elements between rows of y
    y_offset: u32,   // element offset of y[0, 0]
    x_stride: u32,   // elements between rows of x
    accumulate: u32, // 1: y += W x instead of y = W x
    row_bytes: u32,  // bytes from one row of W to the next (rows padded to 16 bytes)
    x_offset: u32,   // element offset of x[0, 0]
}

@group(0) @binding(0) var<uniform> p: Params;
// binding 1: the weights, declared with `wload` (see quant.wgsl).
@group(0) @binding(2) var<storage, read> x: array<f32>;
@group(0) @binding(3) var<storage, read_write> y: array<f32>;

const TPR: u32 = WG / ROWS;

fn x4(base: u32, g: u32) -> vec4<f32> {
    let i = base + 4u * g;
    return vec4<f32>(x[i], x[i + 1u], x[i + 2u], x[i + 3u]);
}

@compute @workgroup_size(WG)
fn main(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let n = (wid.x + wid.y * nwg.x) * ROWS + lid / TPR;
    let t = lid % TPR;
    let m = wid.z;
    let groups = (p.k + 3u) / 4u;
    let full = p.k / 4u;
    let row = n * p.row_bytes;
    let xb = p.x_offset + m * p.x_stride;

    var acc = 0.0;
    if (n < p.n) {
        for (var g = t; g < full; g += TPR) {
            acc += dot(dequant4(row, g), x4(xb, g));
        }
        // A row of F32 or F16 may end inside its last group of four.
        if (full < groups && t == 0u) {
            let w = dequant4(row, full);
            for (var e = 0u; e < p.k - 4u * full; e++) {
                acc += w[e] * x[xb + 4u * full + e];
            }
        }
    }
    let sum = row_sum(acc, lid, t);
    if (t == 0u && n < p.n) {
        let i = p.y_offset + m * p.y_stride + p.row_offset + n;
        if (p.accumulate == 1u) {
            y[i] += sum;
        } else {
            y[i] = sum;
        }
    }
}
