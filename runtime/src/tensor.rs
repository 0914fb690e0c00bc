//! Device tensors: f32 activations from the buffer pool, and weights that stay in their GGUF
//! block layout on the device.
//!
//! A weight larger than the device's storage-binding limit is split into row ranges, each its
//! own buffer; kernels run once per part.

use std::sync::{Arc, Mutex, Weak};

use half::f16;

use crate::error::{Result, RuntimeError};
use crate::gpu::Gpu;
use crate::pool::{bucket, BufferPool};

/// Element types the kernels can read, with GGML's type ids.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DType {
    F32,
    F16,
    Q4_0,
    Q4_1,
    Q8_0,
}

impl DType {
    /// All types the runtime runs, for tests and benchmarks.
    pub const ALL: [DType; 5] = [
        DType::F32,
        DType::F16,
        DType::Q4_0,
        DType::Q4_1,
        DType::Q8_0,
    ];

    /// GGML's type id (the value in GGUF tensor infos).
    pub fn ggml_id(self) -> u32 {
        match self {
            DType::F32 => 0,
            DType::F16 => 1,
            DType::Q4_0 => 2,
            DType::Q4_1 => 3,
            DType::Q8_0 => 8,
        }
    }

    /// The type for a GGML type id, if the runtime has kernels for it.
    pub fn from_ggml_id(id: u32) -> Option<DType> {
        DType::ALL.into_iter().find(|d| d.ggml_id() == id)
    }

    /// GGUF's name for the type.
    pub fn name(self) -> &'static str {
        match self {
            DType::F32 => "F32",
            DType::F16 => "F16",
            DType::Q4_0 => "Q4_0",
            DType::Q4_1 => "Q4_1",
            DType::Q8_0 => "Q8_0",
        }
    }

    /// Elements per block (1 for plain floats).
    pub fn block_size(self) -> usize {
        match self {
            DType::F32 | DType::F16 => 1,
            _ => 32,
        }
    }

    /// Bytes per block.
    pub fn block_bytes(self) -> usize {
        match self {
            DType::F32 => 4,
            DType::F16 => 2,
            DType::Q4_0 => 18,
            DType::Q4_1 => 20,
            DType::Q8_0 => 34,
        }
    }

    /// Bytes of one row of `k` elements, or an error when `k` is not a whole number of blocks.
    pub fn row_bytes(self, k: usize) -> Result<usize> {
        if !k.is_multiple_of(self.block_size()) {
            return Err(RuntimeError::Shape(format!(
                "a {} row must hold a multiple of {} elements, not {k}",
                self.name(),
                self.block_size()
            )));
        }
        Ok(k / self.block_size() * self.block_bytes())
    }

    /// The bytes per 32-element group that the WGSL dequantisation steps over.
    pub(crate) fn wgsl_block_bytes(self) -> u32 {
        (self.block_bytes() * 32 / self.block_size()) as u32
    }
}

/// Decodes one row of `dtype` into f32: the CPU reference every kernel is checked against.
pub fn dequantize_row(dtype: DType, bytes: &[u8], out: &mut [f32]) {
    let half_at = |b: &[u8], i: usize| f16::from_le_bytes([b[i], b[i + 1]]).to_f32();
    match dtype {
        DType::F32 => {
            for (o, c) in out.iter_mut().zip(bytes.chunks_exact(4)) {
                *o = f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
            }
        }
        DType::F16 => {
            for (o, c) in out.iter_mut().zip(bytes.chunks_exact(2)) {
                *o = f16::from_le_bytes([c[0], c[1]]).to_f32();
            }
        }
        DType::Q8_0 => {
            for (o, b) in out.chunks_mut(32).zip(bytes.chunks_exact(34)) {
                let d = half_at(b, 0);
                for (j, v) in o.iter_mut().enumerate() {
                    *v = d * f32::from(b[2 + j] as i8);
                }
            }
        }
        DType::Q4_0 => {
            for (o, b) in out.chunks_mut(32).zip(bytes.chunks_exact(18)) {
                let d = half_at(b, 0);
                for j in 0..16 {
                    o[j] = d * ((b[2 + j] & 15) as f32 - 8.0);
                    o[j + 16] = d * ((b[2 + j] >> 4) as f32 - 8.0);
                }
            }
        }
        DType::Q4_1 => {
            for (o, b) in out.chunks_mut(32).zip(bytes.chunks_exact(20)) {
                let (d, m) = (half_at(b, 0), half_at(b, 2));
                for j in 0..16 {
                    o[j] = d * (b[4 + j] & 15) as f32 + m;
                    o[j + 16] = d * (b[4 + j] >> 4) as f32 + m;
                }
            }
        }
    }
}

/// A pooled device buffer that goes back to the pool when the last handle drops.
pub(crate) struct PooledBuffer {
    pub(crate) buffer: wgpu::Buffer,
    pool: Weak<Mutex<BufferPool>>,
}

impl Drop for PooledBuffer {
    fn drop(&mut self) {
        if let Some(pool) = self.pool.upgrade() {
            let mut pool = pool.lock().unwrap_or_else(|p| p.into_inner());
            pool.give(self.buffer.clone());
        }
    }
}

/// An f32 tensor on the device, row-major.
#[derive(Clone)]
pub struct Tensor {
    pub(crate) buf: Arc<PooledBuffer>,
    shape: Vec<usize>,
}

impl Tensor {
    pub fn shape(&self) -> &[usize] {
        &self.shape
    }

    pub fn len(&self) -> usize {
        self.shape.iter().product()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub(crate) fn buffer(&self) -> &wgpu::Buffer {
        &self.buf.buffer
    }

    /// Returns the same storage seen with another shape of equal or smaller size.
    pub fn view(&self, shape: &[usize]) -> Result<Tensor> {
        let len: usize = shape.iter().product();
        if len * 4 > self.buf.buffer.size() as usize {
            return Err(RuntimeError::Shape(format!(
                "cannot view {:?} as {shape:?}: it needs more storage",
                self.shape
            )));
        }
        Ok(Tensor {
            buf: self.buf.clone(),
            shape: shape.to_vec(),
        })
    }
}

/// One row range of a weight, in its own buffer.
pub struct WeightPart {
    pub(crate) buffer: wgpu::Buffer,
    pub row_start: usize,
    pub rows: usize,
}

/// A 2-D weight `[rows, cols]` (GGML's ne = [cols, rows]) kept in its block layout.
pub struct Weight {
    pub dtype: DType,
    pub rows: usize,
    pub cols: usize,
    pub parts: Vec<WeightPart>,
}

impl Weight {
    /// Bytes of the weight on the device.
    pub fn bytes(&self) -> usize {
        self.rows * self.dtype.row_bytes(self.cols).unwrap_or(0)
    }
}

const STORAGE: wgpu::BufferUsages = wgpu::BufferUsages::STORAGE
    .union(wgpu::BufferUsages::COPY_SRC)
    .union(wgpu::BufferUsages::COPY_DST);

impl Gpu {
    /// A buffer of at least `size` bytes, from the pool when one is free.
    pub(crate) fn raw_buffer(
        &self,
        what: &str,
        size: u64,
        usage: wgpu::BufferUsages,
    ) -> Result<wgpu::Buffer> {
        let size = bucket(size);
        let limit = self.limits().max_buffer_size;
        if size > limit {
            return Err(RuntimeError::BufferTooLarge {
                what: what.into(),
                bytes: size,
                limit,
            });
        }
        let pooled = self
            .pool
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take(size, usage);
        Ok(pooled.unwrap_or_else(|| {
            self.device.create_buffer(&wgpu::BufferDescriptor {
                label: Some(what),
                size,
                usage,
                mapped_at_creation: false,
            })
        }))
    }

    /// A new f32 tensor; its contents are unspecified until written.
    pub fn tensor(&self, shape: &[usize]) -> Result<Tensor> {
        let bytes = (shape.iter().product::<usize>() * 4) as u64;
        if bytes > self.max_binding_size() {
            return Err(RuntimeError::BufferTooLarge {
                what: format!("a tensor of shape {shape:?}"),
                bytes,
                limit: self.max_binding_size(),
            });
        }
        let buffer = self.raw_buffer("tensor", bytes, STORAGE)?;
        let buf = Arc::new(PooledBuffer {
            buffer,
            pool: Arc::downgrade(&self.pool),
        });
        Ok(Tensor {
            buf,
            shape: shape.to_vec(),
        })
    }

    /// A tensor holding `data`.
    pub fn tensor_from(&self, shape: &[usize], data: &[f32]) -> Result<Tensor> {
        let t = self.tensor(shape)?;
        if data.len() != t.len() {
            return Err(RuntimeError::Shape(format!(
                "{} values given for a tensor of shape {shape:?}",
                data.len()
            )));
        }
        self.queue
            .write_buffer(t.buffer(), 0, bytemuck::cast_slice(data));
        Ok(t)
    }

    /// Overwrites the start of `t` with `data`.
    pub fn write(&self, t: &Tensor, data: &[f32]) -> Result<()> {
        if data.len() > t.len() {
            return Err(RuntimeError::Shape("write larger than the tensor".into()));
        }
        self.queue
            .write_buffer(t.buffer(), 0, bytemuck::cast_slice(data));
        Ok(())
    }

    /// Writes u32 values (token ids) into `t`'s storage.
    pub fn write_u32(&self, t: &Tensor, data: &[u32]) -> Result<()> {
        if data.len() > t.len() {
            return Err(RuntimeError::Shape("write larger than the tensor".into()));
        }
        self.queue
            .write_buffer(t.buffer(), 0, bytemuck::cast_slice(data));
        Ok(())
    }

    /// Uploads a `[rows, cols]` weight given in its GGUF bytes, split into row ranges that fit
    /// the storage-binding limit.
    pub fn upload_weight(
        &self,
        name: &str,
        dtype: DType,
        rows: usize,
        cols: usize,
        bytes: &[u8],
    ) -> Result<Weight> {
        let row_bytes = dtype.row_bytes(cols)?;
        if bytes.len() != rows * row_bytes {
            return Err(RuntimeError::Shape(format!(
                "weight `{name}`: {} bytes given, {rows} rows of {cols} {} need {}",
                bytes.len(),
                dtype.name(),
                rows * row_bytes
            )));
        }
        // 8 bytes of slack: the unaligned word reads of 2-byte-aligned blocks look one word on.
        let limit = self.max_binding_size().saturating_sub(8) as usize;
        let rows_per_part = (limit / row_bytes.max(1)).max(1);
        if row_bytes > limit {
            return Err(RuntimeError::BufferTooLarge {
                what: format!("one row of weight `{name}`"),
                bytes: row_bytes as u64,
                limit: limit as u64,
            });
        }
        let mut parts = Vec::new();
        let mut row_start = 0;
        while row_start < rows {
            let n = rows_per_part.min(rows - row_start);
            let chunk = &bytes[row_start * row_bytes..(row_start + n) * row_bytes];
            let size = (chunk.len() as u64 + 8).div_ceil(4) * 4;
            let buffer = self.device.create_buffer(&wgpu::BufferDescriptor {
                label: Some(name),
                size,
                usage: STORAGE,
                mapped_at_creation: true,
            });
            {
                let mut view = buffer
                    .get_mapped_range_mut(..)
                    .map_err(|e| RuntimeError::Device(format!("mapping `{name}`: {e}")))?;
                view.slice(..chunk.len()).copy_from_slice(chunk);
            }
            buffer.unmap();
            parts.push(WeightPart {
                buffer,
                row_start,
                rows: n,
            });
            row_start += n;
        }
        Ok(Weight {
            dtype,
            rows,
            cols,
            parts,
        })
    }

    /// Copies a tensor back to the host.
    pub fn read(&self, t: &Tensor) -> Result<Vec<f32>> {
        let bytes = self.read_bytes(t.buffer(), 0, (t.len() * 4) as u64)?;
        Ok(bytemuck::pod_collect_to_vec(&bytes))
    }

    /// Copies `len` bytes at `offset` of a buffer back to the host.
    pub(crate) fn read_bytes(
        &self,
        buffer: &wgpu::Buffer,
        offset: u64,
        len: u64,
    ) -> Result<Vec<u8>> {
        let mut encoder = self.device.create_command_encoder(&Default::default());
        let staging = self.staging(len)?;
        encoder.copy_buffer_to_buffer(buffer, offset, &staging, 0, len.div_ceil(4) * 4);
        self.queue.submit([encoder.finish()]);
        self.map_staging(&staging, len)
    }

    pub(crate) fn staging(&self, len: u64) -> Result<wgpu::Buffer> {
        self.raw_buffer(
            "readback",
            len.div_ceil(4) * 4,
            wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
        )
    }

    /// Waits for `staging` to be mappable and returns its first `len` bytes.
    pub(crate) fn map_staging(&self, staging: &wgpu::Buffer, len: u64) -> Result<Vec<u8>> {
        let (tx, rx) = std::sync::mpsc::channel();
        staging.map_async(wgpu::MapMode::Read, .., move |r| {
            let _ = tx.send(r);
        });
        self.wait()?;
        rx.recv()
            .map_err(|e| RuntimeError::Readback(e.to_string()))?
            .map_err(|e| RuntimeError::Readback(e.to_string()))?;
        let data = {
            let view = staging
                .get_mapped_range(..)
                .map_err(|e| RuntimeError::Readback(e.to_string()))?;
            view[..len as usize].to_vec()
        };
        staging.unmap();
        self.pool
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .give(staging.clone());
        Ok(data)
    }
}
