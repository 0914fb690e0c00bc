// Attention with one query per invocation: the layout for CPU devices (lavapipe), whose SIMD
// lanes are invocations. Same inputs and result as attention.wgsl.
//
// Work split: workgroup x is the head, and the 64 invocations of workgroup y own queries
// 64y .. 64y+63. All lanes walk the same keys in step, so each key and value row is loaded once
// and broadcast; a lane whose causal window has ended masks itself out. Each lane keeps an
// online softmax (running max, sum and weighted value sum) in registers: HD is a multiple of 4
// and the vec4 loops over it are short enough to unroll. No workgroup memory, no barrier.

struct Params {
    n_head: u32,
    n_kv_head: u32,
    pos0: u32,
    causal: u32,
    kv_len: u32,
    scale: f32,
    tokens: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> q: array<vec4<f32>>;
@group(0) @binding(2) var<storage, read> k_cache: array<vec4<f32>>;
@group(0) @binding(3) var<storage, read> v_cache: array<vec4<f32>>;
@group(0) @binding(4) var<storage, read_write> out: array<vec4<f32>>;

const H4: u32 = HD / 4u;

@compute @workgroup_size(64)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let h = wid.x;
    let t0 = wid.y * 64u;
    let t = t0 + lid;
    let live = t < p.tokens;
    let kvh = h / (p.n_head / p.n_kv_head);
    let qb = (min(t, p.tokens - 1u) * p.n_head + h) * H4;

    var qv: array<vec4<f32>, H4>;
    var acc: array<vec4<f32>, H4>;
    for (var d = 0u; d < H4; d++) {
        qv[d] = q[qb + d] * p.scale;
        acc[d] = vec4<f32>(0.0);
    }
    // Keys this lane sees, and the most any lane of the workgroup sees.
    var n_keys = p.kv_len;
    var n_keys_group = p.kv_len;
    if (p.causal == 1u) {
        n_keys = min(p.pos0 + t + 1u, p.kv_len);
        n_keys_group = min(p.pos0 + min(t0 + 64u, p.tokens), p.kv_len);
    }

    var m = -3.4e38;
    var l = 0.0;
    for (var j = 0u; j < n_keys_group; j++) {
        let kb = (j * p.n_kv_head + kvh) * H4;
        var s4 = vec4<f32>(0.0);
        for (var d = 0u; d < H4; d++) {
            s4 += qv[d] * k_cache[kb + d];
        }
        let s = select(-3.4e38, s4.x + s4.y + s4.z + s4.w, j < n_keys);
        let m_new = max(m, s);
        let correction = exp(m - m_new);
        let weight = select(0.0, exp(s - m_new), j < n_keys);
        l = l * correction + weight;
        for (var d = 0u; d < H4; d++) {
            acc[d] = acc[d] * correction + weight * v_cache[kb + d];
        }
        m = m_new;
    }
    if (live) {
        let ob = (t * p.n_head + h) * H4;
        for (var d = 0u; d < H4; d++) {
            out[ob + d] = acc[d] / l;
        }
    }
}
