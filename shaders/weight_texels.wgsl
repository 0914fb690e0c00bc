// Copies a weight buffer into a texture of rgba32uint texels (16 bytes each), its rows
// interleaved in groups of 8: texel j of row r lands at (r / 8) 8 W + 8 j + r % 8 (W texels a
// row), and texel o of the texture at (o % 2^TEXEL_SHIFT, o / 2^TEXEL_SHIFT). The 8 lanes of a
// CPU device's SIMD group, one row each in the decode mat-vec, then read 128 adjacent bytes at
// every step, and a row group is one sequential stream (see `matvec_rows.wgsl`).
//
// One invocation a texel of the texture; texels past the buffer's end are zero.

struct Params {
    texels: u32,     // 16-byte words in the buffer
    row_texels: u32, // W: the row stride in texels
    total: u32,      // texels to write: whole groups of 8 rows
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> src: array<vec4<u32>>;
@group(0) @binding(2) var dst: texture_storage_2d<rgba32uint, write>;

@compute @workgroup_size(64)
fn main(
    @builtin(global_invocation_id) gid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
) {
    let o = gid.x + gid.y * nwg.x * 64u;
    if (o >= p.total) {
        return;
    }
    let group = o / (8u * p.row_texels);
    let within = o % (8u * p.row_texels);
    let t = (8u * group + within % 8u) * p.row_texels + within / 8u;
    var v = vec4<u32>(0u);
    if (t < p.texels) {
        v = src[t];
    }
    let mask = (1u << TEXEL_SHIFT) - 1u;
    textureStore(dst, vec2<u32>(o & mask, o >> TEXEL_SHIFT), v);
}
