// Scaled dot-product attention of queries over a KV cache, with grouped-query heads.
//
// q is [tokens, n_head, HD]; the caches are [position, n_kv_head, HD]; query t sits at position
// pos0 + t and, when causal, sees keys 0 ..= pos0 + t (otherwise all kv_len keys). Query head h
// reads KV head h / (n_head / n_kv_head).
// Work split: one workgroup of WG threads per (head, token), or per (KV head, token) with
// GQA > 1. Each thread runs an online softmax
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

var<workgroup> part_max: array<f32, WG * GQA>;
var<workgroup> part_sum: array<f32, WG * GQA>;
var<workgroup> part_acc: array<vec4<f32>, WG * GQA * H4>;

// With GQA > 1 a workgroup takes the GQA query heads that share KV head wid.x (for one token),
// so that each key and value row is loaded once for all of them: on CPU devices, where a
// thread's loads of different rows are gathered lane by lane, those loads are the cost.
@compute @workgroup_size(WG)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let t = wid.y;
    var kvh = wid.x / (p.n_head / p.n_kv_head);
    var h0 = wid.x;
    if (GQA > 1u) {
        kvh = wid.x;
        h0 = wid.x * GQA;
    }

    var qv: array<array<vec4<f32>, H4>, GQA>;
    var acc: array<array<vec4<f32>, H4>, GQA>;
    var m: array<f32, GQA>;
    var l: array<f32, GQA>;
    for (var g = 0u; g < GQA; g++) {
        let qb = (t * p.n_head + h0 + g) * H4;
        for (var d = 0u; d < H4; d++) {
            qv[g][d] = q[qb + d] * p.scale;
            acc[g][d] = vec4<f32>(0.0);
        }
        m[g] = -3.4e38;
        l[g] = 0.0;
    }
    var n_keys = p.kv_len;
    if (p.causal == 1u) {
        n_keys = min(p.pos0 + t + 1u, p.kv_len);
    }

    for (var j = lid; j < n_keys; j += WG) {
        let kb = (j * p.n_kv_head + kvh) * H4;
        var k_row: array<vec4<f32>, H4>;
        for (var d = 0u; d < H4; d++) {
            k_row[d] = k_cache[kb + d];
        }
        var weight: array<f32, GQA>;
        var correction: array<f32, GQA>;
        for (var g = 0u; g < GQA; g++) {
            var s4 = vec4<f32>(0.0);
            for (var d = 0u; d < H4; d++) {
                s4 += qv[g][d] * k_row[d];
            }
            let s = s4.x + s4.y + s4.z + s4.w;
            let m_new = max(m[g], s);
            correction[g] = exp(m[g] - m_new);
            weight[g] = exp(s - m_new);
            l[g] = l[g] * correction[g] + weight[g];
            m[g] = m_new;
        }
        for (var d = 0u; d < H4; d++) {
            let v = v_cache[kb + d];
            for (var g = 0u; g < GQA; g++) {
                acc[g][d] = acc[g][d] * correction[g] + weight[g] * v;
            }
        }
    }
    for (var g = 0u; g < GQA; g++) {
        let slot = g * WG + lid;
        part_max[slot] = m[g];
        part_sum[slot] = l[g];
        for (var d = 0u; d < H4; d++) {
            part_acc[slot * H4 + d] = acc[g][d];
        }
    }
    workgroupBarrier();

    for (var g = 0u; g < GQA; g++) {
        let base = g * WG;
        var global_max = -3.4e38;
        for (var i = 0u; i < WG; i++) {
            global_max = max(global_max, part_max[base + i]);
        }
        var total = 0.0;
        for (var i = 0u; i < WG; i++) {
            total += part_sum[base + i] * exp(part_max[base + i] - global_max);
        }
        let qb = (t * p.n_head + h0 + g) * H4;
        for (var d = lid; d < H4; d += WG) {
            var o = vec4<f32>(0.0);
            for (var i = 0u; i < WG; i++) {
                o += part_acc[(base + i) * H4 + d] * exp(part_max[base + i] - global_max);
            }
            out[qb + d] = o / total;
        }
    }
}
