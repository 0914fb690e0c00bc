// Sums of whole tensors to one value (sum, mean) and their gradient.
//
// A sum runs as one or two dispatches of `sum`: each workgroup reduces one chunk to a value, in
// a fixed order (threads stride over the chunk, then a tree in workgroup memory), so a run is
// repeatable bit for bit; a second dispatch of one workgroup sums the chunks' values.

struct Params {
    len: u32,
    // Elements per workgroup (`sum`).
    chunk: u32,
    // The factor applied to the result (1 / n for a mean), and to the gradient.
    scale: f32,
    pad: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read_write> o0: array<f32>;
@group(0) @binding(2) var<storage, read> i0: array<f32>;

var<workgroup> part: array<f32, WG>;

// o0[g] = scale * (sum of i0 over chunk g): one workgroup of WG threads (a power of two) per
// chunk, on x.
@compute @workgroup_size(WG)
fn sum(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) li: u32) {
    let start = wid.x * p.chunk;
    let end = min(start + p.chunk, p.len);
    var acc = 0.0;
    for (var i = start + li; i < end; i += WG) {
        acc += i0[i];
    }
    part[li] = acc;
    workgroupBarrier();
    for (var s = WG / 2u; s > 0u; s >>= 1u) {
        if (li < s) {
            part[li] += part[li + s];
        }
        workgroupBarrier();
    }
    if (li == 0u) {
        o0[wid.x] = part[0] * p.scale;
    }
}

// dx (o0) += scale * dy (i0, one value): one thread per element over workgroups of 256, linear
// over x and y (see `split_groups`).
@compute @workgroup_size(256)
fn sum_grad(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = gid.x + gid.y * nwg.x * 256u;
    if (i < p.len) {
        o0[i] += p.scale * i0[0];
    }
}
