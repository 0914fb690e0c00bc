//! The device's copy bandwidth: one buffer copied to another, timed around submit and wait.
//!
//! This is the yardstick for memory-bound kernels: a decode step that reads every weight once
//! cannot go faster than the device moves bytes. Bytes are counted as STREAM counts its Copy
//! kernel, read plus written, so a weight read at the full rate scores 1.

use std::time::Instant;

use crate::error::{Result, RuntimeError};
use crate::gpu::Gpu;

/// Bytes one measurement copies unless the device's buffers are smaller.
pub const DEFAULT_COPY_BYTES: u64 = 256 << 20;

/// Copies timed after the untimed warm-up.
pub const DEFAULT_REPEATS: usize = 5;

/// What [`copy_bandwidth`] measured.
#[derive(Clone, Debug)]
pub struct CopyBandwidth {
    /// Bytes copied by each repeat (the traffic is twice this: read and written).
    pub bytes: u64,
    /// Seconds each timed repeat took, submit to completion.
    pub samples_s: Vec<f64>,
}

impl CopyBandwidth {
    /// Read plus written bytes per second of one sample, in GB/s (10^9 bytes).
    fn gbs(&self, seconds: f64) -> f64 {
        2.0 * self.bytes as f64 / seconds / 1e9
    }

    /// The fastest repeat, in GB/s: the least disturbed measure of what the device can do.
    pub fn best_gbs(&self) -> f64 {
        let fastest = self.samples_s.iter().copied().fold(f64::INFINITY, f64::min);
        self.gbs(fastest)
    }

    /// The median repeat, in GB/s.
    pub fn median_gbs(&self) -> f64 {
        let mut sorted = self.samples_s.clone();
        sorted.sort_by(f64::total_cmp);
        let n = sorted.len();
        if n == 0 {
            return 0.0;
        }
        let median = if n % 2 == 1 {
            sorted[n / 2]
        } else {
            0.5 * (sorted[n / 2 - 1] + sorted[n / 2])
        };
        self.gbs(median)
    }
}

/// Copies `bytes` (at most the device's largest buffer, rounded down to 4) from one device
/// buffer to another once untimed, then `repeats` times, each in its own submit, timed from
/// submit to the end of the wait.
pub fn copy_bandwidth(gpu: &Gpu, bytes: u64, repeats: usize) -> Result<CopyBandwidth> {
    let bytes = bytes.min(gpu.limits().max_buffer_size) / 4 * 4;
    if bytes == 0 || repeats == 0 {
        return Err(RuntimeError::Shape(
            "a copy-bandwidth measurement needs some bytes and at least one repeat".into(),
        ));
    }
    let buffer = |label, usage| {
        gpu.device.create_buffer(&wgpu::BufferDescriptor {
            label: Some(label),
            size: bytes,
            usage,
            mapped_at_creation: false,
        })
    };
    let source = buffer("copy source", wgpu::BufferUsages::COPY_SRC);
    let destination = buffer("copy destination", wgpu::BufferUsages::COPY_DST);
    let copy = || -> Result<f64> {
        let mut encoder = gpu.device.create_command_encoder(&Default::default());
        encoder.copy_buffer_to_buffer(&source, 0, &destination, 0, bytes);
        let commands = encoder.finish();
        let start = Instant::now();
        gpu.queue.submit([commands]);
        gpu.wait()?;
        Ok(start.elapsed().as_secs_f64())
    };
    // The warm-up also pays for wgpu's zeroing of the fresh buffers and first-touch paging.
    copy()?;
    let samples_s = (0..repeats).map(|_| copy()).collect::<Result<_>>()?;
    Ok(CopyBandwidth { bytes, samples_s })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn copy_bandwidth_is_positive_and_counts_read_and_write() {
        let gpu = crate::ops::test_util::gpu();
        let measured = copy_bandwidth(gpu, 16 << 20, 3).unwrap();
        assert_eq!(measured.bytes, 16 << 20);
        assert_eq!(measured.samples_s.len(), 3);
        let best = measured.best_gbs();
        assert!(best.is_finite() && best > 0.0, "{best}");
        assert!(best >= measured.median_gbs());
        let one = CopyBandwidth {
            bytes: 1_000_000_000,
            samples_s: vec![4.0, 1.0, 2.0],
        };
        assert_eq!(one.best_gbs(), 2.0);
        assert_eq!(one.median_gbs(), 1.0);
    }

    #[test]
    fn an_empty_copy_is_refused() {
        let gpu = crate::ops::test_util::gpu();
        assert!(copy_bandwidth(gpu, 0, 3).is_err());
        assert!(copy_bandwidth(gpu, 1024, 0).is_err());
    }
}
