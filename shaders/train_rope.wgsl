// Rotary position embedding for training: out of place, one position per row, and its backward.
//
// x is [rows, width] with width = heads * head_dim; each head's adjacent pairs (2i, 2i+1) turn
// by pos[row] * base^(-2i / head_dim), computed as rope.wgsl computes it for the llama layout,
// so the forward agrees with the inference kernel. The backward turns the output gradient by
// the negative angle and adds it into the input gradient.
//
// Work split: one thread per pair, over all rows; workgroups linear over x and y (see
// `split_groups`).

struct Params {
    pairs: u32,     // rows * width / 2
    width: u32,     // elements per row
    head_dim: u32,
    base: f32,      // frequency base (theta)
    backward: u32,  // 1: dst += rotate(src, -angle); 0: dst = rotate(src, angle)
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> pos: array<u32>;
@group(0) @binding(2) var<storage, read> src: array<f32>;
@group(0) @binding(3) var<storage, read_write> dst: array<f32>;

@compute @workgroup_size(256)
fn main(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let pair = gid.x + gid.y * nwg.x * 256u;
    if (pair >= p.pairs) {
        return;
    }
    let half_row = p.width / 2u;
    let row = pair / half_row;
    let i = (pair % half_row) % (p.head_dim / 2u);
    let theta = f32(pos[row]) * pow(p.base, -2.0 * f32(i) / f32(p.head_dim));
    let c = cos(theta);
    var s = sin(theta);
    let a = 2u * pair;
    let x0 = src[a];
    let x1 = src[a + 1u];
    if (p.backward == 1u) {
        s = -s;
        dst[a] += x0 * c - x1 * s;
        dst[a + 1u] += x0 * s + x1 * c;
    } else {
        dst[a] = x0 * c - x1 * s;
        dst[a + 1u] = x0 * s + x1 * c;
    }
}
