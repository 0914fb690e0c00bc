//! Embedding gather: the rows of a weight (any runtime type) selected by token ids.

use crate::error::{Result, RuntimeError};
use crate::ops::{check_len, weight_kernel};
use crate::recorder::Recorder;
use crate::tensor::{Tensor, Weight};

/// Records `out[t, :] = W[ids[t], :]` for `n` ids (u32 values stored in `ids`).
pub fn embedding(
    rec: &mut Recorder,
    w: &Weight,
    ids: &Tensor,
    n: usize,
    out: &Tensor,
) -> Result<()> {
    check_len("embedding ids", ids, n)?;
    check_len("embedding output", out, n * w.cols)?;
    let row_bytes = w.row_stride as u32;
    let key = weight_kernel(rec.gpu(), "embedding", w.dtype);
    let groups = (w.cols as u32).div_ceil(4).div_ceil(64);
    if n as u32 > rec.gpu().limits().max_compute_workgroups_per_dimension {
        return Err(RuntimeError::Shape(format!(
            "{n} tokens in one embedding dispatch"
        )));
    }
    for part in &w.parts {
        let params = [
            part.rows as u32,
            w.cols as u32,
            part.row_start as u32,
            row_bytes,
        ];
        rec.dispatch(
            &key,
            &params,
            &[part.binding(w.row_stride), ids.bind(), out.bind()],
            [groups, n as u32, 1],
        )?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gpu::{Gpu, GpuOptions};
    use crate::ops::test_util::gpus;
    use crate::tensor::{dequantize_row, DType};
    use crate::testing::random_weight;

    fn check(gpu: &Gpu, dtype: DType, rows: usize, cols: usize, ids: &[u32]) {
        let bytes = random_weight(dtype, rows, cols, 5);
        let w = gpu.upload_weight("emb", dtype, rows, cols, &bytes).unwrap();
        let idt = gpu.tensor(&[ids.len()]).unwrap();
        gpu.write_u32(&idt, ids).unwrap();
        let out = gpu.tensor(&[ids.len(), cols]).unwrap();
        let mut rec = Recorder::new(gpu);
        embedding(&mut rec, &w, &idt, ids.len(), &out).unwrap();
        rec.submit().unwrap();
        let got = gpu.read(&out).unwrap();
        let row_bytes = dtype.row_bytes(cols).unwrap();
        let mut want = vec![0.0; ids.len() * cols];
        for (t, &id) in ids.iter().enumerate() {
            let r = id as usize;
            dequantize_row(
                dtype,
                &bytes[r * row_bytes..(r + 1) * row_bytes],
                &mut want[t * cols..(t + 1) * cols],
            );
        }
        assert_eq!(got, want, "{dtype:?} {rows}x{cols}");
    }

    #[test]
    fn gathered_rows_equal_cpu_dequantisation_for_every_type() {
        for dtype in DType::ALL {
            let cols = match dtype.block_size() {
                1 => 45,
                32 => 96,
                _ => 768,
            };
            for gpu in gpus() {
                check(gpu, dtype, 77, cols, &[0, 76, 3, 3, 50]);
            }
        }
    }

    #[test]
    fn gather_works_across_weight_parts() {
        let small = Gpu::new(&GpuOptions {
            max_binding_override: Some(2048),
            ..Default::default()
        })
        .unwrap();
        check(&small, DType::Q8_0, 200, 64, &[0, 199, 57, 120, 1]);
    }
}
