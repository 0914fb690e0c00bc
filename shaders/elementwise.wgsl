// Elementwise kernels over flat f32 arrays: residual add, SwiGLU and fill.
//
// Work split: one thread per element, workgroups linear over x and y (see `split_groups`).

struct Params {
    len: u32,
    // fill only
    value: f32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read_write> a: array<f32>;
@group(0) @binding(2) var<storage, read> b: array<f32>;

fn index(gid: vec3<u32>, nwg: vec3<u32>) -> u32 {
    return gid.x + gid.y * nwg.x * 256u;
}

// a += b
@compute @workgroup_size(256)
fn add(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = index(gid, nwg);
    if (i < p.len) {
        a[i] += b[i];
    }
}

// a = silu(a) * b, with a the gate projection and b the up projection.
@compute @workgroup_size(256)
fn swiglu(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = index(gid, nwg);
    if (i < p.len) {
        let g = a[i];
        a[i] = g / (1.0 + exp(-g)) * b[i];
    }
}

// a = p.value
@compute @workgroup_size(256)
fn fill(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = index(gid, nwg);
    if (i < p.len) {
        a[i] = p.value;
    }
}
