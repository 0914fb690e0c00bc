// y[n] = W[n, :] . x for one row of x (decoding) on CPU devices, whose SIMD lanes are
// invocations: each invocation owns two rows of W, n and n + LANES of its workgroup's 2 LANES.
// Workgroups are small, so that a matrix of a few hundred rows still splits evenly over the
// device's threads (each runs whole workgroups).
//
// x is a uniform binding: a load of x is the same for every lane, which the device can serve
// with one scalar load, and each serves both rows. Unrolled kernels first copy x into workgroup
// memory where it fits (`share_x`, the runtime's), where such a load needs no bounds check. Row
// indices past the part are clamped and their results dropped, so every lane runs the same
// loads. x is read as vec4 (k is a multiple of 4); the parameters are those of
// `linear_rows.wgsl`, of which this is the m = 1 case.
//
// With SWIGLU = 1 the two rows of a lane are row n of the gate projection and row n of the up
// projection, bound as two buffers read as one (`split` words of gate, then up; see the runtime's
// `weight_access`), and the lane writes silu(gate) * up: the feed-forward's first half
// in one dispatch. Its workgroups then cover LANES rows each.
//
// With ROPE = 1 (query and key projections) the two rows of a lane are the pair that rotary
// position embedding rotates together, and the lane rotates them for position `pos` before it
// stores them (GGML's layouts: adjacent pairs, or NeoX's halves; see `rope.wgsl`), which saves
// the separate RoPE dispatch. Its workgroups cover LANES pairs each.
//
// With QKV = 1 the attention's three projections run as one: W binds the query rows, then the
// key rows from byte `k_base` and the value rows from byte `v_base` of the same buffer (see the
// runtime's `join_weights`). Lanes take pairs of rows in that order: query and key pairs are
// rotated as with ROPE = 1 (their heads share the parameters), value pairs are adjacent rows.
// Keys and values land in `y_k` and `y_v` (the caches) through `store_kv`, which the runtime
// declares with them (`QKV_OUTPUTS`).
//
// With NORM = 1 (with SWIGLU or QKV, whole rows) x is the residual stream and the kernel applies
// the RMSNorm before it (weight `norm_w`, bound after the kernel's other bindings; the runtime's
// `norm_input`): one dispatch fewer for each norm of a decode step.

struct Params {
    n: u32,          // rows in this part of W
    k: u32,          // row length
    row_offset: u32, // output column of the part's first row
    y_stride: u32,   // unused (one row of y)
    y_offset: u32,   // element offset of y[0]
    x_stride: u32,   // unused (one row of x)
    accumulate: u32, // 1: y += W x instead of y = W x
    row_bytes: u32,  // bytes from one row of W to the next (rows padded to 16 bytes)
    x_offset: u32,   // unused: x is bound from its first element
    m: u32,          // unused: 1
    split: u32,      // SWIGLU: words of the gate projection, where the up projection starts
    // ROPE only:
    head_dim: u32,
    n_rot: u32,      // rotated dimensions of each head
    neox: u32,       // 1: NeoX layout (i, i + n_rot / 2); 0: adjacent pairs (2i, 2i + 1)
    pos: u32,        // position of the token
    base: f32,       // frequency base
    w_offset: u32,   // byte of each row of W where this dispatch's columns start (x's window)
    // QKV only:
    kv_n: u32,       // rows of the key projection, and of the value one
    k_base: u32,     // byte of the binding where the key rows start
    v_base: u32,     // byte where the value rows start
    k_y_offset: u32, // element offset of the keys' first row in y_k
    v_y_offset: u32, // element offset of the values' first row in y_v
    // WTEX only (weights bound as textures):
    w_texel: u32,    // texel of binding 1 where W's first row starts
    w_texel_b: u32,  // SWIGLU: texel of binding 4 where the up projection starts
    // NORM only:
    norm_eps: f32,   // RMSNorm's epsilon
}

@group(0) @binding(0) var<uniform> p: Params;
// binding 1: the weights, declared with `wload` (see quant.wgsl): a storage buffer, or on CPU
// devices a texture (WTEX = 1; see the runtime's `texel_weight_access`).
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

// RMSNorm folded in (NORM = 1): y = W RMSNorm(x) = rms_scale() W (norm_w * x). Before the
// groups, the runtime's `share_x` (into workgroup memory) or `norm_x(i)` (into a private copy)
// adds x's squares into `xsq` and keeps x[i] norm_w[i] for `xin(i)`, once for both rows of a
// lane: scaling x inside every group's dot product instead made decoding slower than the
// separate norm's dispatch did (lavapipe). `norm_x` is unrolled, with constant indices: a loop
// over x would load it lane by lane.
var<private> xsq: vec4<f32>;

fn rms_scale() -> f32 {
    return inverseSqrt(sum4(xsq) / f32(p.k) + p.norm_eps);
}

// The lane's two rows (byte offsets) and their sums so far.
var<private> row0: u32;
var<private> row1: u32;
var<private> acc0: f32;
var<private> acc1: f32;

// The last 16 bytes read of each of the lane's rows, which the next group starts with when its
// block begins in them.
var<private> carry0: vec4<u32>;
var<private> carry1: vec4<u32>;

// The 16-byte words of the lane's first or second row (`wload4_row`) that hold block b, as up
// to 12 words: the first of them is word (b BLOCK_BYTES) / 16. With b a constant (UNROLL) the
// word a group shares with the one before it is not read again.
fn row_words(second: bool, b: u32) -> array<u32, 12> {
    let first = b * BLOCK_BYTES / 16u;
    let count = (b * BLOCK_BYTES + BLOCK_BYTES - 1u) / 16u - first + 1u;
    let carried = b > 0u && (b * BLOCK_BYTES - 1u) / 16u == first;
    var v: array<vec4<u32>, 3>;
    for (var i = 0u; i < count; i++) {
        if (i == 0u && carried) {
            v[i] = select(carry0, carry1, second);
        } else {
            v[i] = wload4_row(second, first + i);
        }
    }
    if (second) {
        carry1 = v[count - 1u];
    } else {
        carry0 = v[count - 1u];
    }
    var w: array<u32, 12>;
    for (var i = 0u; i < 4u * count; i++) {
        w[i] = v[i / 4u][i % 4u];
    }
    return w;
}

// The 32-bit word at byte `at` (2-byte aligned) of `w`.
fn word_at(w: array<u32, 12>, at: u32) -> u32 {
    if (at % 4u == 0u) {
        return w[at / 4u];
    }
    return (w[at / 4u] >> 16u) | (w[at / 4u + 1u] << 16u);
}

// Group b of a row times x, from the words that hold its block (at byte `at` of them), for
// the types read 16 bytes a load: Q4_1 as d (q . x) + m sum(x), Q4_0 and Q8_0 as d (q . x)
// (with Q4_0's codes offset by 8: d (q . x - 8 sum(x))), IQ4_NL through its levels.
fn block_dot(w: array<u32, 12>, at: u32, b: u32, xsum: f32) -> f32 {
    var s = vec4<f32>(0.0);
    if (WTYPE == 3u) {
        let dm = unpack2x16float(w[at / 4u]);
        for (var j = 0u; j < 4u; j++) {
            let q = w[at / 4u + 1u + j];
            s = fma(u4x4(q), xin(8u * b + j), s);
            s = fma(u4x4(q >> 4u), xin(8u * b + j + 4u), s);
        }
        return fma(dm.x, sum4(s), dm.y * xsum);
    }
    let d = unpack2x16float(w[at / 4u] >> ((at % 4u) * 8u)).x;
    if (WTYPE == 8u) {
        for (var j = 0u; j < 8u; j++) {
            s = fma(i8x4(word_at(w, at + 2u + 4u * j)), xin(8u * b + j), s);
        }
        return d * sum4(s);
    }
    for (var j = 0u; j < 4u; j++) {
        let q = word_at(w, at + 2u + 4u * j);
        if (WTYPE == 2u) {
            s = fma(u4x4(q), xin(8u * b + j), s);
            s = fma(u4x4(q >> 4u), xin(8u * b + j + 4u), s);
        } else {
            s = fma(iq4x4(q), xin(8u * b + j), s);
            s = fma(iq4x4(q >> 4u), xin(8u * b + j + 4u), s);
        }
    }
    if (WTYPE == 2u) {
        return d * (sum4(s) - 8.0 * xsum);
    }
    return d * sum4(s);
}

// Whether blocks are read 16 bytes a load (`row_words`, `block_dot`): Q4_0, Q4_1, Q8_0 and
// IQ4_NL in unrolled kernels.
const VEC4_BLOCKS: bool = UNROLL > 0u
    && (WTYPE == 2u || WTYPE == 3u || WTYPE == 8u || WTYPE == 20u);

// Adds group b (32 elements) of the lane's two rows times x to the sums. With UNROLL > 0 the
// runtime writes one call per group with b a constant, so that every load of x has a constant
// index (see the runtime's `unroll_groups`), and a block's offset in its row is a constant too:
// the types of `VEC4_BLOCKS` are then read 16 bytes a load, where each 4-byte load of a lane
// costs a loop over the SIMD lanes on CPU devices.
fn accumulate_group(b: u32) {
    if (VEC4_BLOCKS) {
        let at = (b * BLOCK_BYTES) % 16u;
        let w0 = row_words(false, b);
        let w1 = row_words(true, b);
        var xs = vec4<f32>(0.0);
        if (WTYPE == 2u || WTYPE == 3u) {
            for (var j = 0u; j < 8u; j++) {
                xs += xin(8u * b + j);
            }
        }
        acc0 += block_dot(w0, at, b, sum4(xs));
        acc1 += block_dot(w1, at, b, sum4(xs));
        return;
    }
    let w0 = dequant_group(row0, b);
    let w1 = dequant_group(row1, b);
    var s0 = vec4<f32>(0.0);
    var s1 = vec4<f32>(0.0);
    for (var j = 0u; j < 8u; j++) {
        let xv = xin(8u * b + j);
        s0 += w0[j] * xv;
        s1 += w1[j] * xv;
    }
    acc0 += sum4(s0);
    acc1 += sum4(s1);
}

@compute @workgroup_size(LANES)
fn main(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    xsq = vec4<f32>(0.0);
    share_x(lid);
    var n0 = (wid.x + wid.y * nwg.x) * 2u * LANES + lid;
    var n1 = n0 + LANES;
    row0 = min(n0, p.n - 1u) * p.row_bytes;
    row1 = min(n1, p.n - 1u) * p.row_bytes;
    if (SWIGLU == 1u) {
        n0 = (wid.x + wid.y * nwg.x) * LANES + lid;
        n1 = n0;
        row0 = min(n0, p.n - 1u) * p.row_bytes;
        row1 = 4u * p.split + row0;
    }
    // ROPE: pair i of a head; pairs past n_rot / 2 are adjacent and not rotated.
    var i = 0u;
    var rotated = false;
    // QKV: the projection of the lane's pair (0 query, 1 key, 2 value), and whether the pair
    // is one of them (lanes past the last value pair read the first and store nothing).
    var seg = 0u;
    var live = true;
    if (ROPE == 1u || QKV == 1u) {
        var pair = (wid.x + wid.y * nwg.x) * LANES + lid;
        var base = 0u;
        var rows = p.n;
        if (QKV == 1u) {
            let q_pairs = p.n / 2u;
            let kv_pairs = p.kv_n / 2u;
            if (pair >= q_pairs + kv_pairs) {
                seg = 2u;
                live = pair < q_pairs + 2u * kv_pairs;
                pair = select(0u, pair - q_pairs - kv_pairs, live);
                base = p.v_base;
            } else if (pair >= q_pairs) {
                seg = 1u;
                pair -= q_pairs;
                base = p.k_base;
            }
            rows = select(p.n, p.kv_n, seg > 0u);
        }
        // Pairs not rotated (values too) are adjacent rows: n0 = 2 pair.
        let half_head = p.head_dim / 2u;
        i = pair % half_head;
        rotated = i < p.n_rot / 2u && seg < 2u;
        n0 = (pair / half_head) * p.head_dim + 2u * i;
        n1 = n0 + 1u;
        if (rotated && p.neox == 1u) {
            n0 = (pair / half_head) * p.head_dim + i;
            n1 = n0 + p.n_rot / 2u;
        }
        row0 = base + min(n0, rows - 1u) * p.row_bytes;
        row1 = base + min(n1, rows - 1u) * p.row_bytes;
    }
    lane_rows(row0, row1);
    row0 += p.w_offset;
    row1 += p.w_offset;
    acc0 = 0.0;
    acc1 = 0.0;
    var scale = 1.0;
    if (NORM == 1u) {
        // The first UNROLL groups' squares with constant indices, then the rest in a loop.
        // @unrolled-squares
        for (var g = 8u * UNROLL; g < p.k / 4u; g++) {
            norm_x(g);
        }
        scale = rms_scale();
    }
    // 32-element groups for K-quants too: a pair of groups for each of two rows
    // (`dequant_group_pair`) needs more registers than the device has. (The runtime sends
    // K-quants to `linear_rows.wgsl`, where they run as fast; measured on lavapipe.)
    let blocks = p.k / 32u;
    if (UNROLL > 0u) {
        // @unrolled-groups
    } else {
        for (var b = 0u; b < blocks; b++) {
            accumulate_group(b);
        }
    }
    // F32 and F16 rows need not be whole groups of 32.
    for (var g = 8u * blocks; g < p.k / 4u; g++) {
        let xv = xin(g);
        acc0 += dot(dequant4(row0, g), xv);
        acc1 += dot(dequant4(row1, g), xv);
    }
    if (NORM == 1u) {
        acc0 *= scale;
        acc1 *= scale;
    }
    if (SWIGLU == 1u) {
        store(n0, acc0 / (1.0 + exp(-acc0)) * acc1);
    } else if (ROPE == 1u || QKV == 1u) {
        var out0 = acc0;
        var out1 = acc1;
        if (rotated) {
            let theta = f32(p.pos) * pow(p.base, -2.0 * f32(i) / f32(p.n_rot));
            let c = cos(theta);
            let s = sin(theta);
            out0 = acc0 * c - acc1 * s;
            out1 = acc0 * s + acc1 * c;
        }
        if (seg == 0u) {
            store(n0, out0);
            store(n1, out1);
        } else if (live) {
            store_kv(seg, n0, out0);
            store_kv(seg, n1, out1);
        }
    } else {
        store(n0, acc0);
        store(n1, acc1);
    }
}
