// Embedding rows selected by token ids, and the gradient of the table without atomics.
//
// The gradient is a scatter-add made deterministic on the CPU: the runtime lists, for each
// table row that some id selects, the positions selecting it in increasing order, and one
// thread per (row, column) sums those positions' gradients in that order.

struct Params {
    // Threads that do work: ids * d (gather), used rows * d (scatter).
    len: u32,
    d: u32,
    // Table rows some id selects (scatter).
    used: u32,
    pad: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read_write> o0: array<f32>;
@group(0) @binding(2) var<storage, read> i0: array<f32>;
// gather: the ids. scatter: used + 1 offsets into the positions, then the used rows, then the
// positions (grouped by row).
@group(0) @binding(3) var<storage, read> idx: array<u32>;

fn index(gid: vec3<u32>, nwg: vec3<u32>) -> u32 {
    return gid.x + gid.y * nwg.x * 256u;
}

// y (o0) [n, d] = table (i0) rows ids (idx): one thread per output element, workgroups of 256
// linear over x and y (see `split_groups`).
@compute @workgroup_size(256)
fn gather(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let t = index(gid, nwg);
    if (t >= p.len) {
        return;
    }
    let i = t / p.d;
    o0[t] = i0[idx[i] * p.d + t - i * p.d];
}

// dtable (o0) += the rows of dy (i0) at each used row's positions: one thread per (used row,
// column), summing in position order.
@compute @workgroup_size(256)
fn scatter(
    @builtin(global_invocation_id) gid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
) {
    let t = index(gid, nwg);
    if (t >= p.len) {
        return;
    }
    let u = t / p.d;
    let c = t - u * p.d;
    let positions = 2u * p.used + 1u;
    var acc = 0.0;
    for (var k = idx[u]; k < idx[u + 1u]; k++) {
        acc += i0[idx[positions + k] * p.d + c];
    }
    let row = idx[p.used + 1u + u];
    o0[row * p.d + c] += acc;
}
