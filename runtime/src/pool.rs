//! A pool of device buffers, reused by size so repeated runs allocate nothing new.

use std::collections::HashMap;

/// Free buffers by (size, usage). Sizes are rounded up to a multiple of 256 bytes so that
/// nearby sizes share buffers.
#[derive(Default)]
pub struct BufferPool {
    free: HashMap<(u64, u32), Vec<wgpu::Buffer>>,
    free_bytes: u64,
}

/// Free bytes above which returned buffers are dropped instead of kept.
const MAX_FREE_BYTES: u64 = 1 << 30;

pub(crate) fn bucket(size: u64) -> u64 {
    size.max(4).div_ceil(256) * 256
}

impl BufferPool {
    pub(crate) fn take(&mut self, size: u64, usage: wgpu::BufferUsages) -> Option<wgpu::Buffer> {
        let key = (bucket(size), usage.bits());
        let buffer = self.free.get_mut(&key)?.pop()?;
        self.free_bytes -= key.0;
        Some(buffer)
    }

    pub(crate) fn give(&mut self, buffer: wgpu::Buffer) {
        let size = buffer.size();
        if self.free_bytes + size > MAX_FREE_BYTES {
            return;
        }
        self.free_bytes += size;
        self.free
            .entry((size, buffer.usage().bits()))
            .or_default()
            .push(buffer);
    }
}
