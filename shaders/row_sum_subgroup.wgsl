// The sum of `v` over the TPR consecutive threads (t = lid % TPR) that share a row, returned to
// every one of them, by subgroup shuffles. The runtime includes this file only where the device
// has subgroups that hold at least TPR lanes, TPR a power of two:
// a butterfly of xor shuffles then stays inside each group of TPR lanes, for any subgroup size
// from TPR up. Every thread of the workgroup must call it. `row_sum_shared.wgsl` is the
// fallback.

fn row_sum(v: f32, lid: u32, t: u32) -> f32 {
    var s = v;
    for (var offset = TPR / 2u; offset > 0u; offset >>= 1u) {
        s += subgroupShuffleXor(s, offset);
    }
    return s;
}
