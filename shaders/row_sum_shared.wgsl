// The sum of `v` over the TPR consecutive threads (t = lid % TPR) that share a row, returned to
// every one of them, through workgroup memory: for devices without subgroups, or with subgroups
// narrower than TPR (see `row_sum_subgroup.wgsl`). Every thread of the workgroup must call it.

var<workgroup> partial: array<f32, WG>;

fn row_sum(v: f32, lid: u32, t: u32) -> f32 {
    partial[lid] = v;
    workgroupBarrier();
    for (var half = TPR / 2u; half > 0u; half >>= 1u) {
        if (t < half) {
            partial[lid] += partial[lid + half];
        }
        workgroupBarrier();
    }
    return partial[lid - t];
}
