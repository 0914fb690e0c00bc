// out[t, :] = W[ids[t], :]: the embedding rows of a batch of tokens, dequantised.
//
// Work split: one thread per group of four elements of one output row; workgroup y indexes the
// token. Ids are checked against the vocabulary on the host before upload. Rows outside this
// part of W ([row_offset, row_offset + n)) are left to the dispatch of the part holding them.

struct Params {
    n: u32,          // rows in this part
    k: u32,          // row length
    row_offset: u32, // first row id held by this part
    row_bytes: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
// binding 1: the weights, declared with `wload` (see quant.wgsl).
@group(0) @binding(2) var<storage, read> ids: array<u32>;
@group(0) @binding(3) var<storage, read_write> out: array<f32>;

@compute @workgroup_size(64)
fn main(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(workgroup_id) wid: vec3<u32>) {
    let g = gid.x;
    let t = wid.y;
    let id = ids[t];
    if (4u * g >= p.k || id < p.row_offset || id >= p.row_offset + p.n) {
        return;
    }
    let v = dequant4((id - p.row_offset) * p.row_bytes, g);
    for (var c = 0u; c < 4u; c++) {
        if (4u * g + c < p.k) {
            out[t * p.k + 4u * g + c] = v[c];
        }
    }
}
