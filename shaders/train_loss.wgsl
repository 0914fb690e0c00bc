// Cross-entropy of logits [rows, vocab] against one target per row, fused with the
// log-softmax, and its backward pass.
//
// rows: one workgroup of WG threads per row (workgroups linear over x and y, see
//   `split_groups`): the row's maximum, then its sum of exponentials, each reduced through
//   workgroup memory; writes the row's loss, logsumexp - logit[target] (0 for an ignored
//   target), and its logsumexp into stats = [losses (rows), logsumexps (rows)].
// total: one workgroup sums the row losses in a fixed order (each thread a fixed stride of
//   rows, then a tree) and writes scale * sum: the same bits on every run.
// backward: one thread per logit adds g * scale * (softmax - onehot(target)), with g the
//   loss's upstream gradient read from its buffer; ignored rows add nothing.
//
// Each entry point binds its own buffers from binding 1 in the order the host passes them, so
// total's globals share binding numbers with the others' (bindings are checked per entry point).

struct Params {
    rows: u32,
    vocab: u32,
    scale: f32,
}

@group(0) @binding(0) var<uniform> p: Params;
// rows and backward
@group(0) @binding(1) var<storage, read> logits: array<f32>;
@group(0) @binding(2) var<storage, read> targets: array<u32>;
@group(0) @binding(3) var<storage, read_write> stats: array<f32>;
// backward
@group(0) @binding(4) var<storage, read> upstream: array<f32>;
@group(0) @binding(5) var<storage, read_write> d_logits: array<f32>;
// total
@group(0) @binding(1) var<storage, read> row_loss: array<f32>;
@group(0) @binding(2) var<storage, read_write> loss: array<f32>;

const IGNORE: u32 = 0xffffffffu;

var<workgroup> partial: array<f32, WG>;

fn reduce_max(t: u32) -> f32 {
    for (var s = WG / 2u; s > 0u; s >>= 1u) {
        if (t < s) {
            partial[t] = max(partial[t], partial[t + s]);
        }
        workgroupBarrier();
    }
    return partial[0];
}

fn reduce_sum(t: u32) -> f32 {
    for (var s = WG / 2u; s > 0u; s >>= 1u) {
        if (t < s) {
            partial[t] += partial[t + s];
        }
        workgroupBarrier();
    }
    return partial[0];
}

@compute @workgroup_size(WG)
fn rows(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) t: u32,
) {
    let r = wid.x + wid.y * nwg.x;
    if (r >= p.rows) {
        return;
    }
    let base = r * p.vocab;
    var m = -3.4e38;
    for (var c = t; c < p.vocab; c += WG) {
        m = max(m, logits[base + c]);
    }
    partial[t] = m;
    workgroupBarrier();
    let row_max = reduce_max(t);
    workgroupBarrier();
    var sum = 0.0;
    for (var c = t; c < p.vocab; c += WG) {
        sum += exp(logits[base + c] - row_max);
    }
    partial[t] = sum;
    workgroupBarrier();
    let sum_exp = reduce_sum(t);
    if (t == 0u) {
        let lse = row_max + log(sum_exp);
        let tgt = targets[r];
        var row = 0.0;
        if (tgt != IGNORE) {
            row = lse - logits[base + tgt];
        }
        stats[r] = row;
        stats[p.rows + r] = lse;
    }
}

@compute @workgroup_size(WG)
fn total(@builtin(local_invocation_index) t: u32) {
    var sum = 0.0;
    for (var r = t; r < p.rows; r += WG) {
        sum += row_loss[r];
    }
    partial[t] = sum;
    workgroupBarrier();
    let rows_sum = reduce_sum(t);
    if (t == 0u) {
        loss[0] = p.scale * rows_sum;
    }
}

@compute @workgroup_size(256)
fn backward(
    @builtin(global_invocation_id) gid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
) {
    let e = gid.x + gid.y * nwg.x * 256u;
    if (e >= p.rows * p.vocab) {
        return;
    }
    let r = e / p.vocab;
    let tgt = targets[r];
    if (tgt == IGNORE) {
        return;
    }
    let prob = exp(logits[e] - stats[p.rows + r]);
    let onehot = select(0.0, 1.0, e % p.vocab == tgt);
    d_logits[e] += upstream[0] * p.scale * (prob - onehot);
}
