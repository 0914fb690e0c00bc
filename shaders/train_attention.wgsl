// Attention for training: softmax(q k^T * scale) v over grouped-query heads, causal or not, and
// its backward pass in the manner of FlashAttention-2. No score matrix is ever stored.
//
// Layouts: q, o and their gradients are [batch, seq, heads, HD]; k, v and theirs are
// [batch, seq, kv_heads, HD]; query head h reads kv head h / (heads / kv_heads). The per-row
// statistics lse (log-sum-exp of the scaled scores) and delta (rowsum(dO * O)) are
// [batch, heads, seq].
//
// forward: a lane owns one query row and keeps an online softmax over the keys, BK keys at a
//   time: the scores of one block live in registers, the running maximum and sum are rescaled
//   once per block. It writes the output row and the row's lse.
// backward_q: a lane owns one query row: delta = rowsum(dO * O), then for every key the
//   probability recomputed from lse, dS = P (dO . v - delta), and dQ += scale * dS k.
// backward_kv: a lane owns one key row of one kv head: for each query head of its group and
//   each query row, P and dS as above, dV += P dO and dK += scale * dS q.
// Each output row has one owning lane, so the backward adds into its gradients without atomics,
// in a fixed order. backward_kv reads the delta that backward_q wrote, so it runs after it.
//
// Work split: WG lanes per workgroup own consecutive rows (workgroup x); workgroup y is the
// head (kv head for backward_kv), z the batch. All lanes of a workgroup walk the same rows of
// the other side in step, so those loads are the same for every lane; with a causal mask a
// lane masks the rows it must not see rather than leaving the walk.
//
// Each entry point binds its own buffers from binding 1 in the order the host passes them, so
// globals of different entry points may share a binding number (o and dk, dq and dv): bindings
// are checked per entry point.

struct Params {
    seq: u32,
    heads: u32,
    kv_heads: u32,
    causal: u32,
    scale: f32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> q: array<f32>;
@group(0) @binding(2) var<storage, read> k: array<f32>;
@group(0) @binding(3) var<storage, read> v: array<f32>;
// forward and backward_q
@group(0) @binding(4) var<storage, read_write> o: array<f32>;
// backward_kv
@group(0) @binding(4) var<storage, read_write> dk: array<f32>;
@group(0) @binding(5) var<storage, read_write> lse: array<f32>;
@group(0) @binding(6) var<storage, read> d_out: array<f32>;
@group(0) @binding(7) var<storage, read_write> delta: array<f32>;
// backward_q
@group(0) @binding(8) var<storage, read_write> dq: array<f32>;
// backward_kv
@group(0) @binding(8) var<storage, read_write> dv: array<f32>;

const NEG: f32 = -3.4e38;

fn q_row(b: u32, i: u32, h: u32) -> u32 {
    return ((b * p.seq + i) * p.heads + h) * HD;
}

fn kv_row(b: u32, j: u32, kvh: u32) -> u32 {
    return ((b * p.seq + j) * p.kv_heads + kvh) * HD;
}

fn stat(b: u32, h: u32, i: u32) -> u32 {
    return (b * p.heads + h) * p.seq + i;
}

@compute @workgroup_size(WG)
fn forward(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let b = wid.z;
    let h = wid.y;
    let kvh = h / (p.heads / p.kv_heads);
    let i0 = wid.x * WG;
    // A lane past the end works on the last row and writes nothing.
    let i = min(i0 + lid, p.seq - 1u);
    let qb = q_row(b, i, h);
    var qs: array<f32, HD>;
    var acc: array<f32, HD>;
    for (var d = 0u; d < HD; d++) {
        qs[d] = q[qb + d] * p.scale;
        acc[d] = 0.0;
    }
    // Keys this lane sees, and the most any lane of the workgroup sees.
    var n_keys = p.seq;
    var n_group = p.seq;
    if (p.causal == 1u) {
        n_keys = i + 1u;
        n_group = min(i0 + WG, p.seq);
    }
    var m = NEG;
    var l = 0.0;
    var s: array<f32, BK>;
    for (var j0 = 0u; j0 < n_group; j0 += BK) {
        let j1 = min(j0 + BK, n_group);
        var block_max = NEG;
        for (var j = j0; j < j1; j++) {
            let kb = kv_row(b, j, kvh);
            var dot = 0.0;
            for (var d = 0u; d < HD; d++) {
                dot += qs[d] * k[kb + d];
            }
            let sc = select(NEG, dot, j < n_keys);
            s[j - j0] = sc;
            block_max = max(block_max, sc);
        }
        // Key 0 is in every lane's first block, so m is a real score from then on.
        let m_new = max(m, block_max);
        let correction = exp(m - m_new);
        l *= correction;
        for (var d = 0u; d < HD; d++) {
            acc[d] *= correction;
        }
        for (var j = j0; j < j1; j++) {
            let w = select(0.0, exp(s[j - j0] - m_new), j < n_keys);
            l += w;
            let vb = kv_row(b, j, kvh);
            for (var d = 0u; d < HD; d++) {
                acc[d] += w * v[vb + d];
            }
        }
        m = m_new;
    }
    if (i0 + lid < p.seq) {
        for (var d = 0u; d < HD; d++) {
            o[qb + d] = acc[d] / l;
        }
        lse[stat(b, h, i)] = m + log(l);
    }
}

@compute @workgroup_size(WG)
fn backward_q(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let b = wid.z;
    let h = wid.y;
    let kvh = h / (p.heads / p.kv_heads);
    let i0 = wid.x * WG;
    let i = min(i0 + lid, p.seq - 1u);
    let qb = q_row(b, i, h);
    var qs: array<f32, HD>;
    var go: array<f32, HD>;
    var kr: array<f32, HD>;
    var acc: array<f32, HD>;
    var delta_i = 0.0;
    for (var d = 0u; d < HD; d++) {
        qs[d] = q[qb + d] * p.scale;
        go[d] = d_out[qb + d];
        delta_i += go[d] * o[qb + d];
        acc[d] = 0.0;
    }
    let si = stat(b, h, i);
    let lse_i = lse[si];
    var n_keys = p.seq;
    var n_group = p.seq;
    if (p.causal == 1u) {
        n_keys = i + 1u;
        n_group = min(i0 + WG, p.seq);
    }
    for (var j = 0u; j < n_group; j++) {
        let kb = kv_row(b, j, kvh);
        var dot = 0.0;
        var dp = 0.0;
        for (var d = 0u; d < HD; d++) {
            kr[d] = k[kb + d];
            dot += qs[d] * kr[d];
            dp += go[d] * v[kb + d];
        }
        let prob = select(0.0, exp(dot - lse_i), j < n_keys);
        let ds = prob * (dp - delta_i);
        for (var d = 0u; d < HD; d++) {
            acc[d] += ds * kr[d];
        }
    }
    if (i0 + lid < p.seq) {
        delta[si] = delta_i;
        for (var d = 0u; d < HD; d++) {
            dq[qb + d] += p.scale * acc[d];
        }
    }
}

@compute @workgroup_size(WG)
fn backward_kv(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let b = wid.z;
    let kvh = wid.y;
    let group = p.heads / p.kv_heads;
    let j0 = wid.x * WG;
    let j = min(j0 + lid, p.seq - 1u);
    let kb = kv_row(b, j, kvh);
    var kr: array<f32, HD>;
    var vr: array<f32, HD>;
    var qs: array<f32, HD>;
    var go: array<f32, HD>;
    var dk_acc: array<f32, HD>;
    var dv_acc: array<f32, HD>;
    for (var d = 0u; d < HD; d++) {
        kr[d] = k[kb + d];
        vr[d] = v[kb + d];
        dk_acc[d] = 0.0;
        dv_acc[d] = 0.0;
    }
    // Under the causal mask no lane of the workgroup is seen by a query before row j0.
    let i_first = select(0u, j0, p.causal == 1u);
    for (var h = kvh * group; h < (kvh + 1u) * group; h++) {
        for (var i = i_first; i < p.seq; i++) {
            let qb = q_row(b, i, h);
            var dot = 0.0;
            var dp = 0.0;
            for (var d = 0u; d < HD; d++) {
                qs[d] = q[qb + d] * p.scale;
                go[d] = d_out[qb + d];
                dot += qs[d] * kr[d];
                dp += go[d] * vr[d];
            }
            let si = stat(b, h, i);
            let prob = select(0.0, exp(dot - lse[si]), p.causal == 0u || j <= i);
            let ds = prob * (dp - delta[si]);
            for (var d = 0u; d < HD; d++) {
                dv_acc[d] += prob * go[d];
                dk_acc[d] += ds * qs[d];
            }
        }
    }
    if (j0 + lid < p.seq) {
        for (var d = 0u; d < HD; d++) {
            dk[kb + d] += dk_acc[d];
            dv[kb + d] += dv_acc[d];
        }
    }
}
