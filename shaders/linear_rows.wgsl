// Y[m, n] = sum_k X[m, k] * W[n, k], one output column per invocation: the layout for CPU
// devices (lavapipe), whose SIMD lanes are invocations.
//
// Work split: invocation n of the dispatch owns row n of W (one row of the part) and computes it
// against TM consecutive rows of X (workgroup z picks which TM). Loads of X are the same for
// every lane, so the device can broadcast them; each weight block is loaded once, with as few
// words as its layout allows, and used for TM rows. There is
// no workgroup memory and no barrier. X is read as vec4: k and x_offset are multiples of 4.

struct Params {
    n: u32,          // rows in this part of W
    k: u32,          // row length
    row_offset: u32, // output column of the part's first row
    y_stride: u32,   // elements between rows of Y
    y_offset: u32,   // element offset of Y[0, 0]
    x_stride: u32,   // elements between rows of X
    accumulate: u32, // 1: Y += X W^T instead of Y = X W^T
    row_bytes: u32,  // bytes from one row of W to the next (rows padded to 16 bytes)
    x_offset: u32,   // element offset of X[0, 0]
    m: u32,          // rows of X
}

@group(0) @binding(0) var<uniform> p: Params;
// binding 1: the weights, declared with `wload` (see quant.wgsl).
@group(0) @binding(2) var<storage, read> x: array<vec4<f32>>;
@group(0) @binding(3) var<storage, read_write> y: array<f32>;

@compute @workgroup_size(64)
fn main(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let n = (wid.x + wid.y * nwg.x) * 64u + lid;
    if (n >= p.n) {
        return;
    }
    let m0 = wid.z * TM;
    let rows = min(TM, p.m - m0);
    let row = n * p.row_bytes;
    let groups = p.k / 4u;
    let xs = p.x_stride / 4u;
    let xb = p.x_offset / 4u + m0 * xs;

    var acc: array<f32, TM>;
    for (var r = 0u; r < TM; r++) {
        acc[r] = 0.0;
    }
    // Whole groups of 32 through `dequant_group`, then any groups of four left (F32 and F16
    // rows need not be whole blocks).
    let blocks = p.k / 32u;
    // K-quant rows (whole super-blocks, so an even number of groups) go two groups at a time,
    // which share their code words.
    if (K_QUANT) {
        for (var c = 0u; c < blocks / 2u; c++) {
            let w = dequant_group_pair(row, c);
            for (var r = 0u; r < TM; r++) {
                if (r < rows) {
                    let xr = xb + r * xs + 16u * c;
                    var s = vec4<f32>(0.0);
                    for (var j = 0u; j < 16u; j++) {
                        s += w[j] * x[xr + j];
                    }
                    acc[r] += s.x + s.y + s.z + s.w;
                }
            }
        }
    }
    for (var b = select(0u, blocks, K_QUANT); b < blocks; b++) {
        let w = dequant_group(row, b);
        for (var r = 0u; r < TM; r++) {
            if (r < rows) {
                let xr = xb + r * xs + 8u * b;
                var s = vec4<f32>(0.0);
                for (var j = 0u; j < 8u; j++) {
                    s += w[j] * x[xr + j];
                }
                acc[r] += s.x + s.y + s.z + s.w;
            }
        }
    }
    for (var g = 8u * blocks; g < groups; g++) {
        let w = dequant4(row, g);
        for (var r = 0u; r < TM; r++) {
            if (r < rows) {
                acc[r] += dot(w, x[xb + r * xs + g]);
            }
        }
    }
    for (var r = 0u; r < rows; r++) {
        let i = p.y_offset + (m0 + r) * p.y_stride + p.row_offset + n;
        if (p.accumulate == 1u) {
            y[i] += acc[r];
        } else {
            y[i] = acc[r];
        }
    }
}
