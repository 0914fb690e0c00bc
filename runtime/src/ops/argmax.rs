//! Argmax over rows: greedy sampling on the device, so a decode step reads back one id.

use crate::error::Result;
use crate::ops::{check_len, pow2_floor};
use crate::pipeline::PipelineKey;
use crate::recorder::Recorder;
use crate::tensor::Tensor;

/// Records `out[r] = argmax(x[offset + r*k .. offset + (r+1)*k])` (as u32) for `rows` rows; ties
/// go to the lowest index.
pub fn argmax(
    rec: &mut Recorder,
    x: &Tensor,
    offset: usize,
    rows: usize,
    k: usize,
    out: &Tensor,
) -> Result<()> {
    check_len("argmax input", x, offset + rows * k)?;
    check_len("argmax output", out, rows)?;
    let wg = pow2_floor(
        rec.gpu()
            .limits()
            .max_compute_invocations_per_workgroup
            .min(256),
    );
    let key = PipelineKey::new("argmax", "main").define("WG", wg);
    rec.dispatch(
        &key,
        &[k as u32, offset as u32],
        &[x.bind(), out.bind()],
        [rows as u32, 1, 1],
    )
}

/// CPU reference: first index of the maximum.
pub fn argmax_ref(row: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &v) in row.iter().enumerate() {
        if v > row[best] {
            best = i;
        }
    }
    best as u32
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::test_util::gpu;
    use crate::testing::random_f32;

    #[test]
    fn argmax_finds_the_first_maximum() {
        let gpu = gpu();
        for (rows, k) in [(1, 49152), (4, 7), (2, 1)] {
            let mut x = random_f32(rows * k, 11);
            if k > 5 {
                // A tie: the lower index must win.
                x[k - 1] = 5.0;
                x[3] = 5.0;
            }
            let xt = gpu.tensor_from(&[rows, k], &x).unwrap();
            let out = gpu.tensor(&[rows]).unwrap();
            let mut rec = Recorder::new(gpu);
            argmax(&mut rec, &xt, 0, rows, k, &out).unwrap();
            let id = rec.read(&out, 0, rows);
            let bytes = rec.submit().unwrap();
            let got: Vec<u32> = bytemuck::pod_collect_to_vec(&bytes[id.index()]);
            let want: Vec<u32> = x.chunks(k).map(argmax_ref).collect();
            assert_eq!(got, want, "rows={rows} k={k}");
        }
    }
}
