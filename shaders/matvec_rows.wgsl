// y[n] = W[n, :] . x for one row of x (decoding) on CPU devices, whose SIMD lanes are
// invocations: each invocation owns two rows of W, n and n + LANES of its workgroup's 2 LANES.
// Workgroups are small, so that a matrix of a few hundred rows still splits evenly over the
// device's threads (each runs whole workgroups).
//
// x is a uniform binding: a load of x is the same for every lane, which the device can serve
// with one scalar load, and each serves both rows. Row indices past the part are clamped and
// their results dropped, so every lane runs the same loads. x is read as vec4 (k is a multiple
// of 4); the parameters are those of `linear_rows.wgsl`, of which this is the m = 1 case.
//
// With SWIGLU = 1 the two rows of a lane are row n of the gate projection and row n of the up
// projection, bound as two buffers read as one (`split` words of gate, then up; see the runtime's
// `WEIGHT_ACCESS_SPLIT`), and the lane writes silu(gate) * up: the feed-forward's first half
// in one dispatch. Its workgroups then cover LANES rows each.
//
// With ROPE = 1 (query and key projections) the two rows of a lane are the pair that rotary
// position embedding rotates together, and the lane rotates them for position `pos` before it
// stores them (GGML's layouts: adjacent pairs, or NeoX's halves; see `rope.wgsl`), which saves
// the separate RoPE dispatch. Its workgroups cover LANES pairs each.

struct Params {
    n: u32,          // rows in this part of W
    k: u32,          // row length
    row_offset: u32, // output column of the part's first row
    y_stride: u32,   // unused (one row of y)
    y_offset: u32,   // element offset of y[0]
    x_stride: u32,   // unused (one row of x)
    accumulate: u32, // 1: y += W x instead of y = W x
    row_bytes: u32,  // bytes of one row of W
    x_offset: u32,   // unused: x is bound from its first element
    m: u32,          // unused: 1
    split: u32,      // SWIGLU: words of the gate projection, where the up projection starts
    // ROPE only:
    head_dim: u32,
    n_rot: u32,      // rotated dimensions of each head
    neox: u32,       // 1: NeoX layout (i, i + n_rot / 2); 0: adjacent pairs (2i, 2i + 1)
    pos: u32,        // position of the token
    base: f32,       // frequency base
}

@group(0) @binding(0) var<uniform> p: Params;
// binding 1: the weights, declared with `wload` (see quant.wgsl).
@group(0) @binding(2) var<uniform> x: array<vec4<f32>, XV>;
@group(0) @binding(3) var<storage, read_write> y: array<f32>;

fn sum4(v: vec4<f32>) -> f32 {
    return (v.x + v.y) + (v.z + v.w);
}

fn store(n: u32, value: f32) {
    if (n < p.n) {
        let i = p.y_offset + p.row_offset + n;
        if (p.accumulate == 1u) {
            y[i] += value;
        } else {
            y[i] = value;
        }
    }
}

@compute @workgroup_size(LANES)
fn main(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    var n0 = (wid.x + wid.y * nwg.x) * 2u * LANES + lid;
    var n1 = n0 + LANES;
    var row0 = min(n0, p.n - 1u) * p.row_bytes;
    var row1 = min(n1, p.n - 1u) * p.row_bytes;
    if (SWIGLU == 1u) {
        n0 = (wid.x + wid.y * nwg.x) * LANES + lid;
        n1 = n0;
        row0 = min(n0, p.n - 1u) * p.row_bytes;
        row1 = 4u * p.split + row0;
    }
    // ROPE: pair i of a head; pairs past n_rot / 2 are adjacent and not rotated.
    var i = 0u;
    var rotated = false;
    if (ROPE == 1u) {
        let pair = (wid.x + wid.y * nwg.x) * LANES + lid;
        let half_head = p.head_dim / 2u;
        i = pair % half_head;
        rotated = i < p.n_rot / 2u;
        n0 = (pair / half_head) * p.head_dim + 2u * i;
        n1 = n0 + 1u;
        if (rotated && p.neox == 1u) {
            n0 = (pair / half_head) * p.head_dim + i;
            n1 = n0 + p.n_rot / 2u;
        }
        row0 = min(n0, p.n - 1u) * p.row_bytes;
        row1 = min(n1, p.n - 1u) * p.row_bytes;
    }
    var acc0 = 0.0;
    var acc1 = 0.0;
    let blocks = p.k / 32u;
    // 32-element groups for K-quants too: a pair of groups for each of two rows
    // (`dequant_group_pair`) needs more registers than the device has. (The runtime sends
    // K-quants to `linear_rows.wgsl`, where they run as fast; measured on lavapipe.)
    for (var b = 0u; b < blocks; b++) {
        let w0 = dequant_group(row0, b);
        let w1 = dequant_group(row1, b);
        var s0 = vec4<f32>(0.0);
        var s1 = vec4<f32>(0.0);
        for (var j = 0u; j < 8u; j++) {
            let xv = x[8u * b + j];
            s0 += w0[j] * xv;
            s1 += w1[j] * xv;
        }
        acc0 += sum4(s0);
        acc1 += sum4(s1);
    }
    // F32 and F16 rows need not be whole groups of 32.
    for (var g = 8u * blocks; g < p.k / 4u; g++) {
        let xv = x[g];
        acc0 += dot(dequant4(row0, g), xv);
        acc1 += dot(dequant4(row1, g), xv);
    }
    if (SWIGLU == 1u) {
        store(n0, acc0 / (1.0 + exp(-acc0)) * acc1);
    } else if (ROPE == 1u) {
        var out0 = acc0;
        var out1 = acc1;
        if (rotated) {
            let theta = f32(p.pos) * pow(p.base, -2.0 * f32(i) / f32(p.n_rot));
            let c = cos(theta);
            let s = sin(theta);
            out0 = acc0 * c - acc1 * s;
            out1 = acc0 * s + acc1 * c;
        }
        store(n0, out0);
        store(n1, out1);
    } else {
        store(n0, acc0);
        store(n1, acc1);
    }
}
