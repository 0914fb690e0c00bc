// C = alpha * A B (+ C when p.beta is 1): the training gemm for CPU devices, where each
// invocation is a SIMD lane and owns output columns.
//
// On CPU devices (lavapipe) a storage-buffer load is one load per lane, but a uniform-buffer
// load whose offset is the same for every lane is one scalar load. The lanes of a workgroup
// share their rows of C (8 from wid.y * 8) and step through the reduction together, so A is
// bound as a uniform window of AV vec4s and read at lane-invariant offsets, while each lane
// streams its own column(s) of B with vec4 loads. The host splits A into windows that fit the
// uniform binding limit (by rows, or by reduction steps accumulated over dispatches).
//
// VARIANT 0: B contiguous along the reduction (B(l, j) at b_off + j * b_os + l: a linear
//            layer's W); lane j owns column j and takes four reduction steps a load. A is
//            contiguous along l too (a_ls = 1).
// VARIANT 1: B contiguous along its columns (B(l, j) at b_off + l * b_ls + j); lane j4 owns
//            columns 4 j4 .. 4 j4 + 3 and reads them as one vec4 a reduction step.
// Rows and columns are those of this dispatch: i_lo + r is the row of C, l_lo + l the
// reduction index of B; A is indexed from the window's start (a_rel).

struct Params {
    m: u32,
    n: u32,
    k: u32,
    beta: u32,
    a_rel: u32,
    a_os: u32,
    a_ls: u32,
    i_lo: u32,
    b_off: u32,
    b_os: u32,
    b_ls: u32,
    l_lo: u32,
    c_off: u32,
    c_rs: u32,
    alpha: f32,
    pad: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<uniform> a: array<vec4<f32>, AV>;
@group(0) @binding(2) var<storage, read> b: array<vec4<f32>>;
@group(0) @binding(3) var<storage, read_write> c: array<f32>;

fn aload(i: u32) -> f32 {
    return a[i >> 2u][i & 3u];
}

fn store(r: u32, j: u32, v: f32) {
    if (r < p.m && j < p.n) {
        let at = p.c_off + (p.i_lo + r) * p.c_rs + j;
        var out = p.alpha * v;
        if (p.beta == 1u) {
            out += c[at];
        }
        c[at] = out;
    }
}

@compute @workgroup_size(64)
fn main(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(workgroup_id) wid: vec3<u32>) {
    let r0 = wid.y * 8u;
    if (VARIANT == 0u) {
        let j = gid.x;
        if (j >= p.n) {
            return;
        }
        var lo = vec4<f32>(0.0);
        var hi = vec4<f32>(0.0);
        let bb = (p.b_off + j * p.b_os + p.l_lo) / 4u;
        let rs = p.a_os / 4u;
        let a0 = p.a_rel / 4u + r0 * rs;
        for (var l4 = 0u; l4 < p.k / 4u; l4++) {
            let bv = b[bb + l4];
            let ai = a0 + l4;
            lo += vec4<f32>(
                dot(a[ai], bv),
                dot(a[ai + rs], bv),
                dot(a[ai + 2u * rs], bv),
                dot(a[ai + 3u * rs], bv),
            );
            hi += vec4<f32>(
                dot(a[ai + 4u * rs], bv),
                dot(a[ai + 5u * rs], bv),
                dot(a[ai + 6u * rs], bv),
                dot(a[ai + 7u * rs], bv),
            );
        }
        for (var r = 0u; r < 4u; r++) {
            store(r0 + r, j, lo[r]);
            store(r0 + 4u + r, j, hi[r]);
        }
    } else {
        let j4 = gid.x;
        if (4u * j4 >= p.n) {
            return;
        }
        var acc0 = vec4<f32>(0.0);
        var acc1 = vec4<f32>(0.0);
        var acc2 = vec4<f32>(0.0);
        var acc3 = vec4<f32>(0.0);
        var acc4 = vec4<f32>(0.0);
        var acc5 = vec4<f32>(0.0);
        var acc6 = vec4<f32>(0.0);
        var acc7 = vec4<f32>(0.0);
        let os = p.a_os;
        for (var l = 0u; l < p.k; l++) {
            let bv = b[(p.b_off + (p.l_lo + l) * p.b_ls) / 4u + j4];
            let ai = p.a_rel + r0 * os + l * p.a_ls;
            acc0 += aload(ai) * bv;
            acc1 += aload(ai + os) * bv;
            acc2 += aload(ai + 2u * os) * bv;
            acc3 += aload(ai + 3u * os) * bv;
            acc4 += aload(ai + 4u * os) * bv;
            acc5 += aload(ai + 5u * os) * bv;
            acc6 += aload(ai + 6u * os) * bv;
            acc7 += aload(ai + 7u * os) * bv;
        }
        for (var q = 0u; q < 4u; q++) {
            let j = 4u * j4 + q;
            store(r0, j, acc0[q]);
            store(r0 + 1u, j, acc1[q]);
            store(r0 + 2u, j, acc2[q]);
            store(r0 + 3u, j, acc3[q]);
            store(r0 + 4u, j, acc4[q]);
            store(r0 + 5u, j, acc5[q]);
            store(r0 + 6u, j, acc6[q]);
            store(r0 + 7u, j, acc7[q]);
        }
    }
}
