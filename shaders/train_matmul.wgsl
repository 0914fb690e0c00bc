// C = alpha * A B (+ C when p.beta is 1): dense f32 matrix product for training.
//
// Operands are read through strides: element (row i, reduction index l) of A is at
// a_off + i * a_rs + l * a_ls, element (l, column j) of B at b_off + l * b_ls + j * b_cs, so the
// transposed operands of a backward pass (x^T, W^T) are read in place. A batch of products runs
// over z, each operand advancing by its batch stride.
//
// Work split: a workgroup owns a TS x TS tile of C and each of its 8 x 8 threads owns a 4 x 4
// block of it; the reduction advances TK at a time through workgroup memory.

struct Params {
    m: u32,
    n: u32,
    k: u32,
    beta: u32,
    a_off: u32,
    a_rs: u32,
    a_ls: u32,
    a_bs: u32,
    b_off: u32,
    b_ls: u32,
    b_cs: u32,
    b_bs: u32,
    c_off: u32,
    c_rs: u32,
    c_bs: u32,
    alpha: f32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> a: array<f32>;
@group(0) @binding(2) var<storage, read> b: array<f32>;
@group(0) @binding(3) var<storage, read_write> c: array<f32>;

const TS: u32 = 32u;
const TK: u32 = 16u;

// Tiles stored reduction-major: ta[l * TS + i], tb[l * TS + j].
var<workgroup> ta: array<f32, 512>;
var<workgroup> tb: array<f32, 512>;

@compute @workgroup_size(8, 8)
fn main(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(local_invocation_id) lid: vec3<u32>,
    @builtin(local_invocation_index) li: u32,
) {
    let row0 = wid.y * TS;
    let col0 = wid.x * TS;
    let a_base = p.a_off + wid.z * p.a_bs;
    let b_base = p.b_off + wid.z * p.b_bs;
    var acc0 = vec4<f32>(0.0);
    var acc1 = vec4<f32>(0.0);
    var acc2 = vec4<f32>(0.0);
    var acc3 = vec4<f32>(0.0);
    for (var l0 = 0u; l0 < p.k; l0 += TK) {
        // 512 values of each tile, 8 per thread; out-of-range ones are zero.
        for (var s = 0u; s < 8u; s++) {
            let e = li + s * 64u;
            let l = e / TS;
            let r = e % TS;
            let gl = l0 + l;
            var va = 0.0;
            var vb = 0.0;
            if (gl < p.k) {
                if (row0 + r < p.m) {
                    va = a[a_base + (row0 + r) * p.a_rs + gl * p.a_ls];
                }
                if (col0 + r < p.n) {
                    vb = b[b_base + gl * p.b_ls + (col0 + r) * p.b_cs];
                }
            }
            ta[e] = va;
            tb[e] = vb;
        }
        workgroupBarrier();
        for (var l = 0u; l < TK; l++) {
            let ai = l * TS + lid.y * 4u;
            let bi = l * TS + lid.x * 4u;
            let bv = vec4<f32>(tb[bi], tb[bi + 1u], tb[bi + 2u], tb[bi + 3u]);
            acc0 += ta[ai] * bv;
            acc1 += ta[ai + 1u] * bv;
            acc2 += ta[ai + 2u] * bv;
            acc3 += ta[ai + 3u] * bv;
        }
        workgroupBarrier();
    }
    let c_base = p.c_off + wid.z * p.c_bs;
    let j0 = col0 + lid.x * 4u;
    for (var r = 0u; r < 4u; r++) {
        let i = row0 + lid.y * 4u + r;
        if (i >= p.m) {
            break;
        }
        var v = acc0;
        switch r {
            case 1u: { v = acc1; }
            case 2u: { v = acc2; }
            case 3u: { v = acc3; }
            default: {}
        }
        for (var q = 0u; q < 4u; q++) {
            let j = j0 + q;
            if (j < p.n) {
                let at = c_base + i * p.c_rs + j;
                var out = p.alpha * v[q];
                if (p.beta == 1u) {
                    out += c[at];
                }
                c[at] = out;
            }
        }
    }
}
