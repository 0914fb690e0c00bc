// Rotary position embedding, in place, on x[t, head, :] for tokens at positions pos0 + t.
//
// Two layouts, as in GGML: NORMAL rotates adjacent pairs (2i, 2i+1); NEOX rotates (i, i + n_rot/2).
// theta_i = pos * base^(-2i / n_rot). Dimensions past n_rot are left as they are.
// Work split: one thread per rotated pair; workgroup y indexes the token.

struct Params {
    heads: u32,
    head_dim: u32,
    n_rot: u32,
    pos0: u32,
    neox: u32,     // 1 for the NeoX layout
    base: f32,     // frequency base
    offset: u32,   // element offset of x[0, 0, 0]
    stride: u32,   // elements between tokens
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read_write> x: array<f32>;

@compute @workgroup_size(64)
fn main(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(workgroup_id) wid: vec3<u32>) {
    let half_rot = p.n_rot / 2u;
    let pair = gid.x;
    if (pair >= p.heads * half_rot) {
        return;
    }
    let head = pair / half_rot;
    let i = pair % half_rot;
    let t = wid.y;
    let theta = f32(p.pos0 + t) * pow(p.base, -2.0 * f32(i) / f32(p.n_rot));
    let c = cos(theta);
    let s = sin(theta);
    let base = p.offset + t * p.stride + head * p.head_dim;
    var a = base + 2u * i;
    var b = a + 1u;
    if (p.neox == 1u) {
        a = base + i;
        b = a + half_rot;
    }
    let x0 = x[a];
    let x1 = x[b];
    x[a] = x0 * c - x1 * s;
    x[b] = x0 * s + x1 * c;
}
