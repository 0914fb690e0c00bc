// Elementwise training kernels and their gradients: silu, gelu (tanh form), scale, swiglu, and
// add / mul with numpy broadcasting.
//
// Specialised by OP (the operation, OP_*) and RANK (the dimensions a broadcast index is split
// over), so that no thread pays for a branch it does not take: on lavapipe, general kernels that
// chose these at run time ran two to four times slower than the flat ones (branches seem to run
// under masks there, and integer division is scalar), so flat shapes get entries of their own.
//
// Bindings: o0 (1) is the output every entry writes; i0, i1, i2 (2..4) are inputs; o1 (5) is a
// second output. Each entry uses a prefix of them, so the runtime binds buffers in order.
// Gradient entries add into their outputs (buffers that start at zero), with one owning thread
// per output element: no atomics, repeatable runs.
//
// Broadcasting works on shapes merged to at most four dimensions (outermost in x, the last
// RANK of them in use). An element index is split over `dims`; operand offsets are the index
// dotted with strides `s1` and `s2` (stride 0 on a broadcast dimension). A broadcast operand's
// gradient loops over `red` (the extents it was broadcast along, 1 elsewhere) in row-major
// order.

struct Params {
    dims: vec4<u32>,
    s1: vec4<u32>,
    s2: vec4<u32>,
    red: vec4<u32>,
    len: u32,
    // The factor of `scale`.
    s: f32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read_write> o0: array<f32>;
@group(0) @binding(2) var<storage, read> i0: array<f32>;
@group(0) @binding(3) var<storage, read> i1: array<f32>;
@group(0) @binding(4) var<storage, read> i2: array<f32>;
@group(0) @binding(5) var<storage, read_write> o1: array<f32>;

const OP_SILU: u32 = 0u;
const OP_GELU: u32 = 1u;
const OP_SCALE: u32 = 2u;
const OP_ADD: u32 = 3u;
const OP_MUL: u32 = 4u;

// sqrt(2 / pi) and the cubic coefficient of GPT-2's tanh approximation of GELU.
const GELU_C: f32 = 0.7978845608028654;
const GELU_A: f32 = 0.044715;

// One thread per element over workgroups of 256, linear over x and y (see `split_groups`).
fn index(gid: vec3<u32>, nwg: vec3<u32>) -> u32 {
    return gid.x + gid.y * nwg.x * 256u;
}

fn sigmoid(x: f32) -> f32 {
    return 1.0 / (1.0 + exp(-x));
}

// tanh through exp(-2|u|), which cannot overflow.
fn tanh_stable(u: f32) -> f32 {
    let e = exp(-2.0 * abs(u));
    return sign(u) * (1.0 - e) / (1.0 + e);
}

fn silu(x: f32) -> f32 {
    return x * sigmoid(x);
}

fn silu_grad(x: f32) -> f32 {
    let s = sigmoid(x);
    return s * (1.0 + x * (1.0 - s));
}

fn gelu(x: f32) -> f32 {
    return 0.5 * x * (1.0 + tanh_stable(GELU_C * (x + GELU_A * x * x * x)));
}

fn gelu_grad(x: f32) -> f32 {
    let t = tanh_stable(GELU_C * (x + GELU_A * x * x * x));
    return 0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * GELU_C * (1.0 + 3.0 * GELU_A * x * x);
}

// The four-dimensional index of element j of a row-major array of extents n, of which the
// first 4 - RANK are 1: RANK - 1 divisions.
fn split(j: u32, n: vec4<u32>) -> vec4<u32> {
    var i = vec4<u32>(0u, 0u, 0u, j);
    if (RANK > 1u) {
        let q = j / n.w;
        i.w = j - q * n.w;
        i.z = q;
        if (RANK > 2u) {
            let q2 = q / n.z;
            i.z = q - q2 * n.z;
            i.y = q2;
            if (RANK > 3u) {
                let q3 = q2 / n.y;
                i.y = q2 - q3 * n.y;
                i.x = q3;
            }
        }
    }
    return i;
}

fn offset(i: vec4<u32>, s: vec4<u32>) -> u32 {
    return i.x * s.x + i.y * s.y + i.z * s.z + i.w * s.w;
}

// o0 = f(i0): silu, gelu or scale.
@compute @workgroup_size(256)
fn unary(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = index(gid, nwg);
    if (i >= p.len) {
        return;
    }
    let x = i0[i];
    if (OP == OP_SILU) {
        o0[i] = silu(x);
    } else if (OP == OP_GELU) {
        o0[i] = gelu(x);
    } else {
        o0[i] = p.s * x;
    }
}

// o0 += i0 * f'(i1): dx from dy and x (scale reads no x).
@compute @workgroup_size(256)
fn unary_grad(
    @builtin(global_invocation_id) gid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
) {
    let i = index(gid, nwg);
    if (i >= p.len) {
        return;
    }
    let dy = i0[i];
    if (OP == OP_SILU) {
        o0[i] += dy * silu_grad(i1[i]);
    } else if (OP == OP_GELU) {
        o0[i] += dy * gelu_grad(i1[i]);
    } else {
        o0[i] += p.s * dy;
    }
}

// o0 = silu(i0) * i1: gate i0, up i1.
@compute @workgroup_size(256)
fn swiglu(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = index(gid, nwg);
    if (i < p.len) {
        o0[i] = silu(i0[i]) * i1[i];
    }
}

// Both gradients of swiglu from dy (i0), gate (i1) and up (i2): o0 += d gate, o1 += d up.
@compute @workgroup_size(256)
fn swiglu_grad(
    @builtin(global_invocation_id) gid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
) {
    let i = index(gid, nwg);
    if (i >= p.len) {
        return;
    }
    let dy = i0[i];
    let g = i1[i];
    o0[i] += dy * i2[i] * silu_grad(g);
    o1[i] += dy * silu(g);
}

// The gate's gradient alone: o0 += dy (i0) * up (i2) * silu'(gate (i1)).
@compute @workgroup_size(256)
fn swiglu_grad_gate(
    @builtin(global_invocation_id) gid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
) {
    let i = index(gid, nwg);
    if (i < p.len) {
        o0[i] += i0[i] * i2[i] * silu_grad(i1[i]);
    }
}

// The up projection's gradient alone: o0 += dy (i0) * silu(gate (i1)).
@compute @workgroup_size(256)
fn swiglu_grad_up(
    @builtin(global_invocation_id) gid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
) {
    let i = index(gid, nwg);
    if (i < p.len) {
        o0[i] += i0[i] * silu(i1[i]);
    }
}

fn apply(a: f32, b: f32) -> f32 {
    if (OP == OP_MUL) {
        return a * b;
    }
    return a + b;
}

// o0 = i0 + i1 or i0 * i1 for operands of the output's shape: one thread per element.
@compute @workgroup_size(256)
fn binary_flat(
    @builtin(global_invocation_id) gid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
) {
    let j = index(gid, nwg);
    if (j < p.len) {
        o0[j] = apply(i0[j], i1[j]);
    }
}

// o0 = i0 + i1 or i0 * i1, broadcast: one thread per output element, split over p.dims; the
// operands are read at strides s1 (i0) and s2 (i1).
@compute @workgroup_size(256)
fn binary(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let j = index(gid, nwg);
    if (j < p.len) {
        let at = split(j, p.dims);
        o0[j] = apply(i0[offset(at, p.s1)], i1[offset(at, p.s2)]);
    }
}

// The gradient of an operand that has the output's shape when the other, for mul, has it too:
// o0 += dy (i0), times the other operand (i1) for mul. One thread per element.
@compute @workgroup_size(256)
fn binary_grad_flat(
    @builtin(global_invocation_id) gid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
) {
    let j = index(gid, nwg);
    if (j >= p.len) {
        return;
    }
    if (OP == OP_MUL) {
        o0[j] += i0[j] * i1[j];
    } else {
        o0[j] += i0[j];
    }
}

// The gradient of a mul operand that has the output's shape when the other (i1) is broadcast:
// o0 += dy (i0) * the other read at strides s2. One thread per element, split over p.dims.
@compute @workgroup_size(256)
fn binary_grad_mul(
    @builtin(global_invocation_id) gid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
) {
    let j = index(gid, nwg);
    if (j < p.len) {
        o0[j] += i0[j] * i1[offset(split(j, p.dims), p.s2)];
    }
}

// The gradient of a broadcast operand: one thread per element of it (p.dims are its extents,
// 1 where it was broadcast), summing dy (i0, strides s1) times, for mul, the other operand
// (i1, strides s2) over the p.red extents it was broadcast along.
@compute @workgroup_size(256)
fn binary_grad(
    @builtin(global_invocation_id) gid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
) {
    let j = index(gid, nwg);
    if (j >= p.len) {
        return;
    }
    let at = split(j, p.dims);
    let base1 = offset(at, p.s1);
    let base2 = offset(at, p.s2);
    var acc = 0.0;
    for (var r0 = 0u; r0 < p.red.x; r0++) {
        for (var r1 = 0u; r1 < p.red.y; r1++) {
            for (var r2 = 0u; r2 < p.red.z; r2++) {
                let o = base1 + r0 * p.s1.x + r1 * p.s1.y + r2 * p.s1.z;
                let q = base2 + r0 * p.s2.x + r1 * p.s2.y + r2 * p.s2.z;
                for (var r3 = 0u; r3 < p.red.w; r3++) {
                    var g = i0[o + r3 * p.s1.w];
                    if (OP == OP_MUL) {
                        g *= i1[q + r3 * p.s2.w];
                    }
                    acc += g;
                }
            }
        }
    }
    o0[j] += acc;
}

// Both gradients when neither operand was broadcast, from dy (i0), a (i1), b (i2): o0 += d a,
// o1 += d b. One thread per element.
@compute @workgroup_size(256)
fn binary_grad_both(
    @builtin(global_invocation_id) gid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
) {
    let i = index(gid, nwg);
    if (i >= p.len) {
        return;
    }
    let dy = i0[i];
    if (OP == OP_MUL) {
        o0[i] += dy * i2[i];
        o1[i] += dy * i1[i];
    } else {
        o0[i] += dy;
        o1[i] += dy;
    }
}
