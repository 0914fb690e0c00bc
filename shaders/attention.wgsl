// Scaled dot-product attention of queries over a KV cache, with grouped-query heads.
//
// q is [tokens, n_head, HD]; the caches are [position, n_kv_head, HD]; query t sits at position
// pos0 + t and, when causal, sees keys 0 ..= pos0 + t (otherwise all kv_len keys). Query head h
// reads KV head h / (n_head / n_kv_head).
// Work split: one workgroup of WG threads per (head, token). Each thread runs an online softmax
// over keys j = lid, lid + WG, ... keeping its own running max, sum and weighted value sum; the
// WG partial results are then merged in workgroup memory. No score vector is materialised, so
// the context length is bounded only by the cache.

struct Params {
    n_head: u32,
    n_kv_head: u32,
    pos0: u32,
    causal: u32,
    kv_len: u32,
    scale: f32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> q: array<vec4<f32>>;
@group(0) @binding(2) var<storage, read> k_cache: array<vec4<f32>>;
@group(0) @binding(3) var<storage, read> v_cache: array<vec4<f32>>;
@group(0) @binding(4) var<storage, read_write> out: array<vec4<f32>>;

// Rows are handled as vec4: HD is a multiple of 4, and loops of H4 steps unroll.
const H4: u32 = HD / 4u;

var<workgroup> part_max: array<f32, WG>;
var<workgroup> part_sum: array<f32, WG>;
var<workgroup> part_acc: array<vec4<f32>, WG * H4>;

@compute @workgroup_size(WG)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let h = wid.x;
    let t = wid.y;
    let kvh = h / (p.n_head / p.n_kv_head);
    let qb = (t * p.n_head + h) * H4;

    var qv: array<vec4<f32>, H4>;
    var acc: array<vec4<f32>, H4>;
    for (var d = 0u; d < H4; d++) {
        qv[d] = q[qb + d] * p.scale;
        acc[d] = vec4<f32>(0.0);
    }
    var n_keys = p.kv_len;
    if (p.causal == 1u) {
        n_keys = min(p.pos0 + t + 1u, p.kv_len);
    }

    var m = -3.4e38;
    var l = 0.0;
    for (var j = lid; j < n_keys; j += WG) {
        let kb = (j * p.n_kv_head + kvh) * H4;
        var s4 = vec4<f32>(0.0);
        for (var d = 0u; d < H4; d++) {
            s4 += qv[d] * k_cache[kb + d];
        }
        let s = s4.x + s4.y + s4.z + s4.w;
        let m_new = max(m, s);
        let correction = exp(m - m_new);
        let weight = exp(s - m_new);
        l = l * correction + weight;
        for (var d = 0u; d < H4; d++) {
            acc[d] = acc[d] * correction + weight * v_cache[kb + d];
        }
        m = m_new;
    }
    part_max[lid] = m;
    part_sum[lid] = l;
    for (var d = 0u; d < H4; d++) {
        part_acc[lid * H4 + d] = acc[d];
    }
    workgroupBarrier();

    var global_max = -3.4e38;
    for (var i = 0u; i < WG; i++) {
        global_max = max(global_max, part_max[i]);
    }
    var total = 0.0;
    for (var i = 0u; i < WG; i++) {
        total += part_sum[i] * exp(part_max[i] - global_max);
    }
    for (var d = lid; d < H4; d += WG) {
        var o = vec4<f32>(0.0);
        for (var i = 0u; i < WG; i++) {
            o += part_acc[i * H4 + d] * exp(part_max[i] - global_max);
        }
        out[qb + d] = o / total;
    }
}
