// Activation statistics of a matrix x [m, k] (rows at x_offset + r * stride), accumulated into
// buffers that persist across dispatches.
//
// channel_stats: stats[s_offset + s * k + j] for s = 0..6 gets, over the m rows, sum x, sum x^2,
// sum |x|, sum x^3, sum x^4 (added) and max |x| (maxed). Cooperative layout (`channel_stats`):
// a workgroup of CH x RS threads owns CH adjacent channels, RS row slices each walk a strided
// share of the rows and thread slice 0 adds the slices up from workgroup memory. Lane-per-row
// layout (`channel_stats_rows`): one invocation per channel walks every row.
//
// gram: h[(a - row0) * k + b] += sum_r x[r, a] * x[r, b] for a in row0..row0 + rows and every b.
// Cooperative layout (`gram`): a workgroup of T x T threads owns a 4T x 4T output tile, stages RT
// rows of both column ranges in workgroup memory, and each thread accumulates a 4 x 4 block.
// Lane-per-row layout (`gram_rows`): one invocation owns output row a and TB adjacent columns;
// the column loads are the same for every invocation of a workgroup (broadcast). Where the
// layout allows, CPU devices instead transpose the rows' columns row0.. (`transpose_rows`:
// out[i * m + r] = x[r, row0 + i]) and run the training gemm (`train_matmul_rows.wgsl`) on them.

struct Params {
    m: u32,
    k: u32,
    x_offset: u32,
    stride: u32,
    // channel_stats: offset of the stats block; gram: first output row.
    out_offset: u32,
    // gram: output rows; unused by channel_stats.
    rows: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> x: array<f32>;
@group(0) @binding(2) var<storage, read_write> out: array<f32>;

const S: u32 = 6u;

fn add_stats(j: u32, acc: array<f32, 6>) {
    let base = p.out_offset + j;
    for (var s = 0u; s < 5u; s++) {
        out[base + s * p.k] += acc[s];
    }
    out[base + 5u * p.k] = max(out[base + 5u * p.k], acc[5]);
}

fn accumulate(acc: ptr<function, array<f32, 6>>, v: f32) {
    let v2 = v * v;
    (*acc)[0] += v;
    (*acc)[1] += v2;
    (*acc)[2] += abs(v);
    (*acc)[3] += v2 * v;
    (*acc)[4] += v2 * v2;
    (*acc)[5] = max((*acc)[5], abs(v));
}

var<workgroup> partial: array<array<f32, 6>, CH * RS>;

@compute @workgroup_size(CH, RS)
fn channel_stats(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(local_invocation_id) lid: vec3<u32>,
) {
    let j = wid.x * CH + lid.x;
    var acc = array<f32, 6>(0.0, 0.0, 0.0, 0.0, 0.0, 0.0);
    if (j < p.k) {
        for (var r = lid.y; r < p.m; r += RS) {
            accumulate(&acc, x[p.x_offset + r * p.stride + j]);
        }
    }
    partial[lid.y * CH + lid.x] = acc;
    workgroupBarrier();
    if (lid.y == 0u && j < p.k) {
        var total = acc;
        for (var s = 1u; s < RS; s++) {
            let o = partial[s * CH + lid.x];
            for (var i = 0u; i < 5u; i++) {
                total[i] += o[i];
            }
            total[5] = max(total[5], o[5]);
        }
        add_stats(j, total);
    }
}

@compute @workgroup_size(64)
fn channel_stats_rows(@builtin(global_invocation_id) gid: vec3<u32>) {
    let j = gid.x;
    if (j >= p.k) {
        return;
    }
    var acc = array<f32, 6>(0.0, 0.0, 0.0, 0.0, 0.0, 0.0);
    for (var r = 0u; r < p.m; r++) {
        accumulate(&acc, x[p.x_offset + r * p.stride + j]);
    }
    add_stats(j, acc);
}

const TILE: u32 = 4u * T;

var<workgroup> xa: array<f32, RT * TILE>;
var<workgroup> xb: array<f32, RT * TILE>;

fn load(r: u32, c: u32) -> f32 {
    if (r < p.m && c < p.k) {
        return x[p.x_offset + r * p.stride + c];
    }
    return 0.0;
}

@compute @workgroup_size(T, T)
fn gram(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(local_invocation_id) lid: vec3<u32>,
    @builtin(local_invocation_index) t: u32,
) {
    // Output rows a (relative to row0) along y, columns b along x.
    let a0 = wid.y * TILE;
    let b0 = wid.x * TILE;
    var acc: array<array<f32, 4>, 4>;
    for (var r0 = 0u; r0 < p.m; r0 += RT) {
        for (var i = t; i < RT * TILE; i += T * T) {
            let rr = i / TILE;
            let cc = i % TILE;
            let a = a0 + cc;
            var va = 0.0;
            if (a < p.rows) {
                va = load(r0 + rr, p.out_offset + a);
            }
            xa[i] = va;
            xb[i] = load(r0 + rr, b0 + cc);
        }
        workgroupBarrier();
        for (var rr = 0u; rr < RT; rr++) {
            var va: array<f32, 4>;
            var vb: array<f32, 4>;
            for (var u = 0u; u < 4u; u++) {
                va[u] = xa[rr * TILE + lid.y + u * T];
                vb[u] = xb[rr * TILE + lid.x + u * T];
            }
            for (var u = 0u; u < 4u; u++) {
                for (var v = 0u; v < 4u; v++) {
                    acc[u][v] += va[u] * vb[v];
                }
            }
        }
        workgroupBarrier();
    }
    for (var u = 0u; u < 4u; u++) {
        let a = a0 + lid.y + u * T;
        for (var v = 0u; v < 4u; v++) {
            let b = b0 + lid.x + v * T;
            if (a < p.rows && b < p.k) {
                out[a * p.k + b] += acc[u][v];
            }
        }
    }
}

@compute @workgroup_size(64)
fn gram_rows(@builtin(global_invocation_id) gid: vec3<u32>) {
    let a = gid.x;
    let b0 = gid.y * TB;
    if (a >= p.rows) {
        return;
    }
    let col = p.out_offset + a;
    var acc: array<f32, TB>;
    for (var r = 0u; r < p.m; r++) {
        let row = p.x_offset + r * p.stride;
        let va = x[row + col];
        for (var v = 0u; v < TB; v++) {
            if (b0 + v < p.k) {
                acc[v] += va * x[row + b0 + v];
            }
        }
    }
    for (var v = 0u; v < TB; v++) {
        if (b0 + v < p.k) {
            out[a * p.k + b0 + v] += acc[v];
        }
    }
}

// One invocation per row r of x writes TB of its columns, row0 + i for i in TB * gid.y.., as
// elements r of the rows of the transpose.
@compute @workgroup_size(64)
fn transpose_rows(@builtin(global_invocation_id) gid: vec3<u32>) {
    let r = gid.x;
    if (r >= p.m) {
        return;
    }
    let row = p.x_offset + r * p.stride + p.out_offset;
    for (var v = 0u; v < TB; v++) {
        let i = gid.y * TB + v;
        if (i < p.rows) {
            out[i * p.m + r] = x[row + i];
        }
    }
}
