// Y[m, n] = sum_k X[m, k] * W[n, k] for many rows of X (prefill), tiled through workgroup memory.
//
// Work split: a workgroup of 8x8 threads computes a 32x32 tile of Y (32 rows of X by 32 rows of
// W); each thread owns a 4x4 block of it. K is walked 32 at a time: X's and W's 32x32 slices are
// staged in workgroup memory, W dequantised on the way in. Workgroup x indexes tiles of n,
// y tiles of m. Shapes need not be multiples of 32: loads past an edge read zero.

struct Params {
    n: u32,          // rows in this part of W
    k: u32,          // row length
    row_offset: u32, // output column of the part's first row
    y_stride: u32,   // elements between rows of Y
    y_offset: u32,   // element offset of Y[0, 0]
    x_stride: u32,   // elements between rows of X
    accumulate: u32, // 1: Y += X W^T instead of Y = X W^T
    row_bytes: u32,  // bytes from one row of W to the next (rows padded to 16 bytes)
    x_offset: u32,   // element offset of x[0, 0]
    m: u32,          // rows of X
}

@group(0) @binding(0) var<uniform> p: Params;
// binding 1: the weights, declared with `wload` (see quant.wgsl).
@group(0) @binding(2) var<storage, read> x: array<f32>;
@group(0) @binding(3) var<storage, read_write> y: array<f32>;

const TILE: u32 = 32u;
// Rows padded by one to spread workgroup-memory banks.
var<workgroup> xs: array<array<f32, 33>, 32>;
var<workgroup> ws: array<array<f32, 33>, 32>;

@compute @workgroup_size(8, 8)
fn main(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(local_invocation_id) lid: vec3<u32>,
    @builtin(local_invocation_index) li: u32,
) {
    let n0 = wid.x * TILE;
    let m0 = wid.y * TILE;
    var acc: array<array<f32, 4>, 4>;
    for (var i = 0u; i < 4u; i++) {
        for (var j = 0u; j < 4u; j++) {
            acc[i][j] = 0.0;
        }
    }

    for (var k0 = 0u; k0 < p.k; k0 += TILE) {
        // Stage X: 32 rows x 32 columns, 16 values per thread.
        for (var e = li; e < TILE * TILE; e += 64u) {
            let r = e / TILE;
            let c = e % TILE;
            let m = m0 + r;
            let k = k0 + c;
            var v = 0.0;
            if (m < p.m && k < p.k) {
                v = x[p.x_offset + m * p.x_stride + k];
            }
            xs[r][c] = v;
        }
        // Stage W: 32 rows x 8 groups of four, 4 groups per thread.
        for (var e = li; e < TILE * 8u; e += 64u) {
            let r = e / 8u;
            let g = e % 8u;
            let n = n0 + r;
            var v = vec4<f32>(0.0);
            if (n < p.n) {
                v = dequant4(n * p.row_bytes, k0 / 4u + g);
            }
            for (var c = 0u; c < 4u; c++) {
                let k = k0 + 4u * g + c;
                ws[r][4u * g + c] = select(0.0, v[c], k < p.k);
            }
        }
        workgroupBarrier();

        for (var c = 0u; c < TILE; c++) {
            var xv: array<f32, 4>;
            var wv: array<f32, 4>;
            for (var i = 0u; i < 4u; i++) {
                xv[i] = xs[lid.y * 4u + i][c];
                wv[i] = ws[lid.x * 4u + i][c];
            }
            for (var i = 0u; i < 4u; i++) {
                for (var j = 0u; j < 4u; j++) {
                    acc[i][j] += xv[i] * wv[j];
                }
            }
        }
        workgroupBarrier();
    }

    for (var i = 0u; i < 4u; i++) {
        let m = m0 + lid.y * 4u + i;
        for (var j = 0u; j < 4u; j++) {
            let n = n0 + lid.x * 4u + j;
            if (m < p.m && n < p.n) {
                let o = p.y_offset + m * p.y_stride + p.row_offset + n;
                if (p.accumulate == 1u) {
                    y[o] += acc[i][j];
                } else {
                    y[o] = acc[i][j];
                }
            }
        }
    }
}
