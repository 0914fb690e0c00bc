// Optimizer kernels: the global L2 norm of the gradients with its clip scale, and the AdamW and
// SGD updates.
//
// The norm is reduced in a fixed order without atomics, so it is the same bit for bit on every
// run: `sum_squares` (one dispatch per gradient) writes one partial sum of squares per CHUNK
// elements into that gradient's own range of the partial sums, then `clip_scale` (one workgroup)
// adds the partial sums and writes the norm and min(1, max_norm / (norm + 1e-6)).
//
// The updates (one dispatch per parameter) multiply the gradient by the clip scale (a tensor
// holding 1 when there is no clipping), update the optimizer state and the parameter, and zero
// the gradient so that the next tapes accumulate from zero.
//
// Each entry point declares its own bindings; an entry's pipeline layout holds only those it
// uses, so the binding numbers repeat between entries.

const WG: u32 = 256u;
// Elements each thread of `sum_squares` squares; CHUNK = WG * ITEMS must match optim.rs.
const ITEMS: u32 = 16u;

struct SumParams {
    // sum_squares: elements of the gradient; clip_scale: number of partial sums
    len: u32,
    // sum_squares: index of this gradient's first partial sum
    first: u32,
    // clip_scale: the largest norm left unscaled
    max_norm: f32,
}

struct AdamParams {
    len: u32,
    lr: f32,
    weight_decay: f32,
    beta1: f32,
    beta2: f32,
    eps: f32,
    // lr / (1 - beta1^t)
    step_size: f32,
    // 1 / sqrt(1 - beta2^t)
    v_scale: f32,
}

struct SgdParams {
    len: u32,
    lr: f32,
    weight_decay: f32,
    momentum: f32,
}

// sum_squares, clip_scale
@group(0) @binding(0) var<uniform> sp: SumParams;
@group(0) @binding(1) var<storage, read> src: array<f32>;
// sum_squares
@group(0) @binding(2) var<storage, read_write> partials: array<f32>;
// clip_scale
@group(0) @binding(2) var<storage, read_write> norm_out: array<f32>;
@group(0) @binding(3) var<storage, read_write> scale_out: array<f32>;

// adamw, sgd: clip[0] multiplies every gradient.
@group(0) @binding(0) var<uniform> ap: AdamParams;
@group(0) @binding(1) var<storage, read> clip: array<f32>;
@group(0) @binding(2) var<storage, read_write> param: array<f32>;
@group(0) @binding(3) var<storage, read_write> grad: array<f32>;
// AdamW's first and second moments; SGD's momentum buffer is `moment1`.
@group(0) @binding(4) var<storage, read_write> moment1: array<f32>;
@group(0) @binding(5) var<storage, read_write> moment2: array<f32>;
// sgd
@group(0) @binding(0) var<uniform> gp: SgdParams;

var<workgroup> part: array<f32, WG>;

// The sum of every thread's `v`, by a fixed tree over workgroup memory; all threads get it.
// Must be called by every thread of the workgroup.
fn workgroup_sum(li: u32, v: f32) -> f32 {
    part[li] = v;
    workgroupBarrier();
    for (var s = WG / 2u; s > 0u; s >>= 1u) {
        if (li < s) {
            part[li] += part[li + s];
        }
        workgroupBarrier();
    }
    return part[0];
}

// Work split: workgroup g (linear over x and y) owns elements [g * CHUNK, (g + 1) * CHUNK);
// thread t squares elements t, t + WG, ... of it, and the workgroup's sum goes to
// partials[first + g]. Workgroups past the end (from splitting over y) write nothing.
@compute @workgroup_size(WG)
fn sum_squares(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) li: u32,
) {
    let g = wid.x + wid.y * nwg.x;
    let base = g * WG * ITEMS;
    var acc = 0.0;
    for (var j = 0u; j < ITEMS; j++) {
        let i = base + j * WG + li;
        if (i < sp.len) {
            let v = src[i];
            acc += v * v;
        }
    }
    let total = workgroup_sum(li, acc);
    if (li == 0u && base < sp.len) {
        partials[sp.first + g] = total;
    }
}

// Work split: one workgroup; thread t adds partial sums t, t + WG, ...
@compute @workgroup_size(WG)
fn clip_scale(@builtin(local_invocation_index) li: u32) {
    var acc = 0.0;
    for (var i = li; i < sp.len; i += WG) {
        acc += src[i];
    }
    let total = workgroup_sum(li, acc);
    if (li == 0u) {
        let norm = sqrt(total);
        norm_out[0] = norm;
        scale_out[0] = min(1.0, sp.max_norm / (norm + 1e-6));
    }
}

// Decoupled weight decay (Loshchilov & Hutter, "Decoupled Weight Decay Regularization",
// Algorithm 2) with bias-corrected moments:
//   m = beta1 m + (1 - beta1) g,  v = beta2 v + (1 - beta2) g^2,
//   p -= lr wd p + lr m_hat / (sqrt(v_hat) + eps).
// Work split: one thread per element, workgroups linear over x and y.
@compute @workgroup_size(WG)
fn adamw(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = gid.x + gid.y * nwg.x * WG;
    if (i >= ap.len) {
        return;
    }
    let g = grad[i] * clip[0];
    let m = ap.beta1 * moment1[i] + (1.0 - ap.beta1) * g;
    let v = ap.beta2 * moment2[i] + (1.0 - ap.beta2) * g * g;
    moment1[i] = m;
    moment2[i] = v;
    grad[i] = 0.0;
    let x = param[i];
    param[i] = x - ap.lr * ap.weight_decay * x - ap.step_size * m / (sqrt(v) * ap.v_scale + ap.eps);
}

// Heavy-ball momentum with decoupled weight decay: b = momentum b + g, p -= lr (b + wd p).
// Work split: one thread per element, workgroups linear over x and y.
@compute @workgroup_size(WG)
fn sgd(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = gid.x + gid.y * nwg.x * WG;
    if (i >= gp.len) {
        return;
    }
    let b = gp.momentum * moment1[i] + grad[i] * clip[0];
    moment1[i] = b;
    grad[i] = 0.0;
    let x = param[i];
    param[i] = x - gp.lr * (b + gp.weight_decay * x);
}
