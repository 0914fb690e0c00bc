//! Device tensors: f32 activations from the buffer pool, and weights that stay in their GGUF
//! block layout on the device.
//!
//! A weight larger than the device's storage-binding limit is split into row ranges, each its
//! own buffer; kernels run once per part.

use std::sync::{Arc, Mutex, OnceLock, Weak};

use half::f16;

use crate::error::{Result, RuntimeError};
use crate::gpu::Gpu;
use crate::pool::{bucket, BufferPool};
use crate::recorder::Binding;

/// Element types the kernels can read, with GGML's type ids. Block layouts are GGML's
/// (`ggml-common.h`): K-quants pack 256 elements in a super-block of 8 (Q4_K, Q5_K) or 16
/// (Q2_K, Q3_K, Q6_K) sub-blocks with quantised scales; the others pack 32.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[allow(non_camel_case_types)]
pub enum DType {
    F32,
    F16,
    Q4_0,
    Q4_1,
    Q5_0,
    Q5_1,
    Q8_0,
    Q2_K,
    Q3_K,
    Q4_K,
    Q5_K,
    Q6_K,
    IQ4_NL,
}

/// IQ4_NL's 16 non-linear levels, indexed by the 4-bit code (`kvalues_iq4nl` in ggml).
pub const IQ4_NL_LEVELS: [i8; 16] = [
    -127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113,
];

impl DType {
    /// Whether the decode mat-vec reads weights of this type from their texture copy, where the
    /// device makes one ([`Gpu::weight_textures`]): the 32-element block types it reads 16
    /// bytes a load (Q5's high bits and K-quants' super-blocks are read otherwise).
    pub fn reads_from_texels(self) -> bool {
        matches!(
            self,
            DType::Q4_0 | DType::Q4_1 | DType::Q8_0 | DType::IQ4_NL
        )
    }

    /// All types the runtime runs, for tests and benchmarks.
    pub const ALL: [DType; 13] = [
        DType::F32,
        DType::F16,
        DType::Q4_0,
        DType::Q4_1,
        DType::Q5_0,
        DType::Q5_1,
        DType::Q8_0,
        DType::Q2_K,
        DType::Q3_K,
        DType::Q4_K,
        DType::Q5_K,
        DType::Q6_K,
        DType::IQ4_NL,
    ];

    /// GGML's type id (the value in GGUF tensor infos).
    pub fn ggml_id(self) -> u32 {
        match self {
            DType::F32 => 0,
            DType::F16 => 1,
            DType::Q4_0 => 2,
            DType::Q4_1 => 3,
            DType::Q5_0 => 6,
            DType::Q5_1 => 7,
            DType::Q8_0 => 8,
            DType::Q2_K => 10,
            DType::Q3_K => 11,
            DType::Q4_K => 12,
            DType::Q5_K => 13,
            DType::Q6_K => 14,
            DType::IQ4_NL => 20,
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
            DType::Q5_0 => "Q5_0",
            DType::Q5_1 => "Q5_1",
            DType::Q8_0 => "Q8_0",
            DType::Q2_K => "Q2_K",
            DType::Q3_K => "Q3_K",
            DType::Q4_K => "Q4_K",
            DType::Q5_K => "Q5_K",
            DType::Q6_K => "Q6_K",
            DType::IQ4_NL => "IQ4_NL",
        }
    }

    /// Elements per block (1 for plain floats).
    pub fn block_size(self) -> usize {
        match self {
            DType::F32 | DType::F16 => 1,
            DType::Q2_K | DType::Q3_K | DType::Q4_K | DType::Q5_K | DType::Q6_K => 256,
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
            DType::Q5_0 => 22,
            DType::Q5_1 => 24,
            DType::Q8_0 => 34,
            DType::Q2_K => 84,
            DType::Q3_K => 110,
            DType::Q4_K => 144,
            DType::Q5_K => 176,
            DType::Q6_K => 210,
            DType::IQ4_NL => 18,
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

    /// Bytes from one row of a `k`-element weight to the next on the device: the row padded to
    /// 16 bytes, so that every row starts where a kernel can read it as `vec4<u32>` and a
    /// block's offset in its row is the same for every row (see `matvec_rows.wgsl`).
    pub fn row_stride(self, k: usize) -> Result<usize> {
        Ok(self.row_bytes(k)?.div_ceil(WEIGHT_ROW_ALIGN) * WEIGHT_ROW_ALIGN)
    }

    /// The bytes per block that the WGSL dequantisation steps over: a GGUF block, or 32
    /// elements of a plain float type.
    pub(crate) fn wgsl_block_bytes(self) -> u32 {
        let elements = self.block_size().max(32);
        (self.block_bytes() * elements / self.block_size()) as u32
    }
}

/// The f16 at byte `i` of `b`, widened.
fn half_at(b: &[u8], i: usize) -> f32 {
    f16::from_le_bytes([b[i], b[i + 1]]).to_f32()
}

/// Scale and min of sub-block `j` (0..8) from the 12 packed 6-bit values of a Q4_K or Q5_K
/// super-block: the first four pairs sit in the low 6 bits of bytes 0..8, the last four take
/// their low nibbles from bytes 8..12 and their top two bits from bytes 0..8.
fn scale_min_k4(j: usize, q: &[u8]) -> (u8, u8) {
    if j < 4 {
        (q[j] & 63, q[j + 4] & 63)
    } else {
        (
            (q[j + 4] & 15) | ((q[j - 4] >> 6) << 4),
            (q[j + 4] >> 4) | ((q[j] >> 6) << 4),
        )
    }
}

/// Scale `i` (0..16) of a Q3_K super-block from its 12 packed bytes, as the signed value
/// `sc - 32`: low nibbles in bytes 0..8 (low half first), top two bits in bytes 8..12.
fn scale_q3_k(i: usize, q: &[u8]) -> i32 {
    let low = (q[i % 8] >> (4 * (i / 8))) & 15;
    let high = (q[8 + i % 4] >> (2 * (i / 4))) & 3;
    i32::from(low | (high << 4)) - 32
}

/// Decodes one row of `dtype` into f32: the CPU reference every kernel is checked against.
/// The arithmetic follows ggml's `dequantize_row_*` operation by operation, so results equal
/// llama.cpp's bit for bit.
pub fn dequantize_row(dtype: DType, bytes: &[u8], out: &mut [f32]) {
    let blocks = out
        .chunks_mut(dtype.block_size().max(32))
        .zip(bytes.chunks_exact(dtype.wgsl_block_bytes() as usize));
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
            for (o, b) in blocks {
                let d = half_at(b, 0);
                for (j, v) in o.iter_mut().enumerate() {
                    *v = d * f32::from(b[2 + j] as i8);
                }
            }
        }
        DType::Q4_0 | DType::IQ4_NL => {
            let level = |q: u8| match dtype {
                DType::Q4_0 => f32::from(q) - 8.0,
                _ => f32::from(IQ4_NL_LEVELS[usize::from(q)]),
            };
            for (o, b) in blocks {
                let d = half_at(b, 0);
                for j in 0..16 {
                    o[j] = d * level(b[2 + j] & 15);
                    o[j + 16] = d * level(b[2 + j] >> 4);
                }
            }
        }
        DType::Q4_1 => {
            for (o, b) in blocks {
                let (d, m) = (half_at(b, 0), half_at(b, 2));
                for j in 0..16 {
                    o[j] = d * (b[4 + j] & 15) as f32 + m;
                    o[j + 16] = d * (b[4 + j] >> 4) as f32 + m;
                }
            }
        }
        DType::Q5_0 | DType::Q5_1 => {
            // f16 d (and f16 m for Q5_1), 4 bytes of fifth bits (bit e for element e), then
            // nibbles as in Q4_0. Q5_0: x = d * (q - 16); Q5_1: x = d * q + m.
            let qh_at = if dtype == DType::Q5_0 { 2 } else { 4 };
            for (o, b) in blocks {
                let d = half_at(b, 0);
                let qh = u32::from_le_bytes([b[qh_at], b[qh_at + 1], b[qh_at + 2], b[qh_at + 3]]);
                let qs = &b[qh_at + 4..];
                for (e, v) in o.iter_mut().enumerate() {
                    let low = (qs[e % 16] >> (4 * (e / 16))) & 15;
                    let q = i32::from(low) | ((((qh >> e) & 1) as i32) << 4);
                    *v = match dtype {
                        DType::Q5_0 => (q - 16) as f32 * d,
                        _ => q as f32 * d + half_at(b, 2),
                    };
                }
            }
        }
        DType::Q2_K => {
            // 16 scale bytes (low nibble scale, high nibble min, one per 16 elements), 64
            // bytes of 2-bit codes (each 32-byte half serves 128 elements, 2 bits per pass),
            // f16 d, f16 dmin; x = d * scale * q - dmin * min.
            for (o, b) in blocks {
                let (d, dmin) = (half_at(b, 80), half_at(b, 82));
                for (e, v) in o.iter_mut().enumerate() {
                    let sc = b[e / 16];
                    let (dl, ml) = (d * f32::from(sc & 15), dmin * f32::from(sc >> 4));
                    let q = (b[16 + 32 * (e / 128) + e % 32] >> (2 * ((e / 32) % 4))) & 3;
                    *v = dl * f32::from(q) - ml;
                }
            }
        }
        DType::Q3_K => {
            // 32 bytes of high bits (bit e / 32 of byte e % 32), 64 bytes of 2-bit codes laid
            // out as in Q2_K, 12 bytes of 6-bit scales, f16 d; x = d * (sc - 32) * (q - 4)
            // where the high bit, when set, cancels the 4.
            for (o, b) in blocks {
                let d = half_at(b, 108);
                for (e, v) in o.iter_mut().enumerate() {
                    let dl = d * scale_q3_k(e / 16, &b[96..108]) as f32;
                    let low = (b[32 + 32 * (e / 128) + e % 32] >> (2 * ((e / 32) % 4))) & 3;
                    let high = (b[e % 32] >> (e / 32)) & 1;
                    *v = dl * (i32::from(low) - if high == 1 { 0 } else { 4 }) as f32;
                }
            }
        }
        DType::Q4_K | DType::Q5_K => {
            // f16 d, f16 dmin, 12 bytes of 6-bit scales and mins (one pair per 32 elements),
            // for Q5_K 32 bytes of fifth bits (bit e / 32 of byte e % 32), then 128 bytes of
            // nibbles, each 32-byte run serving 64 elements (low nibbles first);
            // x = d * scale * q - dmin * min.
            let qs_at = if dtype == DType::Q4_K { 16 } else { 48 };
            for (o, b) in blocks {
                let (d, dmin) = (half_at(b, 0), half_at(b, 2));
                for (e, v) in o.iter_mut().enumerate() {
                    let (sc, m) = scale_min_k4(e / 32, &b[4..16]);
                    let (dl, ml) = (d * f32::from(sc), dmin * f32::from(m));
                    let mut q = (b[qs_at + 32 * (e / 64) + e % 32] >> (4 * ((e / 32) % 2))) & 15;
                    if dtype == DType::Q5_K {
                        q += ((b[16 + e % 32] >> (e / 32)) & 1) << 4;
                    }
                    *v = dl * f32::from(q) - ml;
                }
            }
        }
        DType::Q6_K => {
            // 128 bytes of low nibbles, 64 bytes of 2-bit high parts, 16 signed scales (one per
            // 16 elements), f16 d. Each half of 128 elements uses 64 low-nibble bytes and 32
            // high bytes: its quarter t takes nibble t / 2 of byte 32 * (t % 2) + l and bits
            // 2t..2t+2 of high byte l. x = d * scale * (q - 32).
            for (o, b) in blocks {
                let d = half_at(b, 208);
                for (e, v) in o.iter_mut().enumerate() {
                    let (h, t, l) = (e / 128, (e / 32) % 4, e % 32);
                    let low = (b[64 * h + 32 * (t % 2) + l] >> (4 * (t / 2))) & 15;
                    let high = (b[128 + 32 * h + l] >> (2 * t)) & 3;
                    let q = i32::from(low | (high << 4)) - 32;
                    let sc = b[192 + e / 16] as i8;
                    *v = d * f32::from(sc) * q as f32;
                }
            }
        }
    }
}

/// Bytes of host data a synthetic weight starts from, at most.
const SYNTHETIC_PATTERN_BYTES: usize = 256 << 10;

/// The rows a [`Gpu::synthetic_weight`] of this shape and seed repeats: how many, and their
/// bytes (valid blocks from [`random_weight`](crate::testing::random_weight)). Where the
/// pattern is shorter than the weight it holds a multiple of 4 rows, so it is a multiple of 4
/// bytes and each repeat starts where a buffer copy may.
pub fn synthetic_pattern(
    dtype: DType,
    rows: usize,
    cols: usize,
    seed: u64,
) -> Result<(usize, Vec<u8>)> {
    let row_bytes = dtype.row_bytes(cols)?.max(1);
    let fit = (SYNTHETIC_PATTERN_BYTES / row_bytes).max(4) / 4 * 4;
    let pattern_rows = fit.min(rows).max(1);
    let bytes = crate::testing::random_weight(dtype, pattern_rows, cols, seed);
    Ok((pattern_rows, bytes))
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

    /// The whole tensor as a kernel binding (see `Recorder::dispatch`).
    pub(crate) fn bind(&self) -> Binding<'_> {
        self.into()
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

/// Alignment of each weight row on the device, in bytes ([`DType::row_stride`]).
pub const WEIGHT_ROW_ALIGN: usize = 16;

/// Bytes after a weight part's last row that kernels may read: the unaligned word reads of
/// 2-byte-aligned blocks look one word on, and 16-byte loads read whole words.
pub(crate) const WEIGHT_SLACK: u64 = 16;

/// Texels (16 bytes each) per row of a weight texture ([`WeightTexels`]): texel t of a buffer
/// is at (t % TEXEL_ROW, t / TEXEL_ROW). A power of two that every device's textures reach
/// (WebGPU's minimum is 8192).
pub const TEXEL_ROW: u32 = 4096;

/// A weight buffer's bytes again as a texture of `rgba32uint` texels, [`TEXEL_ROW`] to a
/// texture row, each group of 8 weight rows interleaved (see `weight_texels.wgsl`): what the
/// decode mat-vec reads where [`Gpu::weight_textures`] holds.
pub struct WeightTexels {
    pub(crate) view: wgpu::TextureView,
    _texture: wgpu::Texture,
    /// Bytes the texture holds: its buffer's rows in whole groups of 8, and one group more.
    pub bytes: u64,
}

/// One row range of a weight: its rows from byte `offset` of a buffer, which it has to itself
/// or shares with other weights laid out after it ([`Gpu::join_weights`]), and the buffer's
/// texture copy ([`WeightTexels`]), made when a kernel first asks for it and shared by every
/// part of the buffer.
pub struct WeightPart {
    pub(crate) buffer: wgpu::Buffer,
    /// Byte of the buffer where the part's first row starts.
    pub(crate) offset: u64,
    pub row_start: usize,
    pub rows: usize,
    pub(crate) texels: Arc<OnceLock<Option<WeightTexels>>>,
}

impl WeightPart {
    /// The part's binding, for a weight of rows `row_stride` bytes apart: its rows and the
    /// [`WEIGHT_SLACK`] after them.
    pub(crate) fn binding(&self, row_stride: usize) -> Binding<'_> {
        let size = (self.rows * row_stride) as u64 + WEIGHT_SLACK;
        Binding::buffer_range(&self.buffer, self.offset, size)
    }

    /// The part's texture binding and its first row's texel there, for rows `row_stride` bytes
    /// apart, the texture made on first use; `None` where the device makes none (see
    /// [`Gpu::weight_textures`]).
    pub(crate) fn texel_binding(
        &self,
        gpu: &Gpu,
        row_stride: usize,
    ) -> Result<Option<(Binding<'_>, u32)>> {
        if self.texels.get().is_none() {
            let made = gpu.texels_of(&self.buffer, row_stride)?;
            // Another thread may have made it meanwhile: either copy serves.
            let _ = self.texels.set(made);
        }
        let texels = self.texels.get().and_then(Option::as_ref);
        Ok(texels.map(|t| (Binding::texture(&t.view), (self.offset / 16) as u32)))
    }
}

/// A 2-D weight `[rows, cols]` (GGML's ne = [cols, rows]) kept in its block layout.
pub struct Weight {
    pub dtype: DType,
    pub rows: usize,
    pub cols: usize,
    /// Bytes from one row to the next in a part's buffer ([`DType::row_stride`]).
    pub row_stride: usize,
    pub parts: Vec<WeightPart>,
}

impl Weight {
    /// Bytes of the weight on the device.
    pub fn bytes(&self) -> usize {
        self.rows * self.dtype.row_bytes(self.cols).unwrap_or(0)
    }

    /// Where `others` follow this weight in one buffer ([`Gpu::join_weights`]): the byte offset
    /// of each from this one's first row. `None` where any is not a single part of that buffer
    /// after this weight, or the types or row strides differ.
    pub(crate) fn followers(&self, others: &[&Weight]) -> Option<Vec<u64>> {
        let [first] = self.parts.as_slice() else {
            return None;
        };
        others
            .iter()
            .map(|w| match w.parts.as_slice() {
                [part]
                    if part.buffer == first.buffer
                        && part.offset > first.offset
                        && (w.dtype, w.row_stride) == (self.dtype, self.row_stride) =>
                {
                    Some(part.offset - first.offset)
                }
                _ => None,
            })
            .collect()
    }
}

const STORAGE: wgpu::BufferUsages = wgpu::BufferUsages::STORAGE
    .union(wgpu::BufferUsages::COPY_SRC)
    .union(wgpu::BufferUsages::COPY_DST);

/// Activations may also be bound as uniform buffers, which some kernels read them through (see
/// `ops::linear`).
const TENSOR: wgpu::BufferUsages = STORAGE.union(wgpu::BufferUsages::UNIFORM);

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
        let buffer = self.raw_buffer("tensor", bytes, TENSOR)?;
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
        let stride = dtype.row_stride(cols)?;
        self.weight_parts(name, dtype, rows, cols, true, |buffer, row_start, n| {
            let chunk = &bytes[row_start * row_bytes..(row_start + n) * row_bytes];
            {
                let mut view = buffer
                    .get_mapped_range_mut(..)
                    .map_err(|e| RuntimeError::Device(format!("mapping `{name}`: {e}")))?;
                if stride == row_bytes {
                    view.slice(..chunk.len()).copy_from_slice(chunk);
                } else {
                    for (r, row) in chunk.chunks_exact(row_bytes).enumerate() {
                        view.slice(r * stride..r * stride + row_bytes)
                            .copy_from_slice(row);
                    }
                }
            }
            buffer.unmap();
            Ok(())
        })
    }

    /// A `[rows, cols]` weight of valid random blocks made on the device, for benchmarks: the
    /// same part layout as [`upload_weight`](Self::upload_weight), each part filled by copying
    /// one pattern of rows from [`random_weight`](crate::testing::random_weight) (at most
    /// 256 KiB, the only bytes sent from the host) over and over. Part `p`'s row `r` is
    /// pattern row `r % pattern_rows`; [`synthetic_pattern`] gives the pattern.
    pub fn synthetic_weight(
        &self,
        name: &str,
        dtype: DType,
        rows: usize,
        cols: usize,
        seed: u64,
    ) -> Result<Weight> {
        let (row_bytes, stride) = (dtype.row_bytes(cols)?, dtype.row_stride(cols)?);
        let (pattern_rows, packed) = synthetic_pattern(dtype, rows, cols, seed)?;
        // The pattern laid out as the weight's rows are: each padded to the row stride.
        let mut pattern = vec![0u8; pattern_rows * stride];
        for (r, row) in packed.chunks_exact(row_bytes.max(1)).enumerate() {
            pattern[r * stride..r * stride + row_bytes].copy_from_slice(row);
        }
        let source = self.device.create_buffer(&wgpu::BufferDescriptor {
            label: Some("synthetic pattern"),
            size: (pattern.len() as u64).div_ceil(4) * 4,
            usage: wgpu::BufferUsages::COPY_SRC,
            mapped_at_creation: true,
        });
        {
            let mut view = source
                .get_mapped_range_mut(..)
                .map_err(|e| RuntimeError::Device(format!("mapping `{name}`: {e}")))?;
            view.slice(..pattern.len()).copy_from_slice(&pattern);
        }
        source.unmap();
        let mut encoder = self.device.create_command_encoder(&Default::default());
        let weight = self.weight_parts(name, dtype, rows, cols, false, |buffer, _, n| {
            // Rows are whole strides (multiples of 16 bytes), so every copy starts aligned.
            for first in (0..n).step_by(pattern_rows) {
                let len = (pattern_rows.min(n - first) * stride) as u64;
                let offset = (first * stride) as u64;
                encoder.copy_buffer_to_buffer(&source, 0, buffer, offset, len);
            }
            Ok(())
        })?;
        self.queue.submit([encoder.finish()]);
        Ok(weight)
    }

    /// Moves weights of one type and row length into one buffer, one after another (each from
    /// an offset the device can bind storage at), so that one kernel can read them all through
    /// one binding: the decode mat-vec of Q, K and V on CPU devices
    /// ([`linear_qkv`](crate::ops::linear_qkv)). Weights that are not one part each, differ in
    /// type or row length, or would not fit one binding together are returned as they were.
    pub fn join_weights(&self, name: &str, weights: Vec<Weight>) -> Result<Vec<Weight>> {
        let Some(first) = weights.first() else {
            return Ok(weights);
        };
        let kind = (first.dtype, first.cols, first.row_stride);
        let alike = weights
            .iter()
            .all(|w| w.parts.len() == 1 && (w.dtype, w.cols, w.row_stride) == kind);
        let align = (self.limits().min_storage_buffer_offset_alignment as u64).max(16);
        let mut offsets = Vec::with_capacity(weights.len());
        let mut end = 0;
        for w in &weights {
            let start = u64::div_ceil(end, align) * align;
            offsets.push(start);
            end = start + (w.rows * w.row_stride) as u64;
        }
        let size = end + WEIGHT_SLACK;
        if !alike || weights.len() < 2 || size > self.max_binding_size() {
            return Ok(weights);
        }
        let buffer = self.device.create_buffer(&wgpu::BufferDescriptor {
            label: Some(name),
            size,
            usage: STORAGE,
            mapped_at_creation: false,
        });
        let mut encoder = self.device.create_command_encoder(&Default::default());
        for (w, &at) in weights.iter().zip(&offsets) {
            let part = &w.parts[0];
            let len = (w.rows * w.row_stride) as u64;
            encoder.copy_buffer_to_buffer(&part.buffer, part.offset, &buffer, at, len);
        }
        self.queue.submit([encoder.finish()]);
        let texels = Arc::new(OnceLock::new());
        Ok(weights
            .into_iter()
            .zip(offsets)
            .map(|(w, offset)| Weight {
                parts: vec![WeightPart {
                    buffer: buffer.clone(),
                    offset,
                    row_start: 0,
                    rows: w.rows,
                    texels: texels.clone(),
                }],
                ..w
            })
            .collect())
    }

    /// Creates the buffers of a `[rows, cols]` weight, rows [`DType::row_stride`] apart, split
    /// into row ranges under the binding limit (each with [`WEIGHT_SLACK`] after its rows), and
    /// lets `fill(buffer, row_start, rows)` write each.
    fn weight_parts(
        &self,
        name: &str,
        dtype: DType,
        rows: usize,
        cols: usize,
        mapped: bool,
        mut fill: impl FnMut(&wgpu::Buffer, usize, usize) -> Result<()>,
    ) -> Result<Weight> {
        let row_bytes = dtype.row_stride(cols)?;
        let limit = (self.max_binding_size() / 16 * 16).saturating_sub(WEIGHT_SLACK) as usize;
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
            // Whole 16-byte words, which kernels may read the weight as.
            let size = (n * row_bytes) as u64 + WEIGHT_SLACK;
            let buffer = self.device.create_buffer(&wgpu::BufferDescriptor {
                label: Some(name),
                size,
                usage: STORAGE,
                mapped_at_creation: mapped,
            });
            fill(&buffer, row_start, n)?;
            parts.push(WeightPart {
                buffer,
                offset: 0,
                row_start,
                rows: n,
                texels: Arc::new(OnceLock::new()),
            });
            row_start += n;
        }
        Ok(Weight {
            dtype,
            rows,
            cols,
            row_stride: row_bytes,
            parts,
        })
    }

    /// A texture copy of `buffer`, rows of `row_stride` bytes from its first byte, their groups
    /// of 8 interleaved ([`WeightTexels`], `weight_texels.wgsl`), recorded on the queue after
    /// what was submitted before. `None` where the device reads weights from buffers, or the
    /// texture would need more rows than the device allows (the weight is then read from the
    /// buffer).
    pub(crate) fn texels_of(
        &self,
        buffer: &wgpu::Buffer,
        row_stride: usize,
    ) -> Result<Option<WeightTexels>> {
        let texels = buffer.size() / 16;
        let row_texels = (row_stride / 16) as u64;
        if !self.weight_textures() || row_texels == 0 || !row_stride.is_multiple_of(16) {
            return Ok(None);
        }
        // Whole groups of 8 rows, and one more: a lane may read a word past its row's end.
        let total = (texels.div_ceil(row_texels).div_ceil(8) + 1) * 8 * row_texels;
        let rows = total.div_ceil(TEXEL_ROW as u64);
        let (Ok(rows), Ok(total_u32), Ok(texels_u32)) = (
            u32::try_from(rows),
            u32::try_from(total),
            u32::try_from(texels),
        ) else {
            return Ok(None);
        };
        if rows > self.limits().max_texture_dimension_2d {
            return Ok(None);
        }
        let texture = self.device.create_texture(&wgpu::TextureDescriptor {
            label: Some("weight texels"),
            size: wgpu::Extent3d {
                width: TEXEL_ROW,
                height: rows,
                depth_or_array_layers: 1,
            },
            mip_level_count: 1,
            sample_count: 1,
            dimension: wgpu::TextureDimension::D2,
            format: wgpu::TextureFormat::Rgba32Uint,
            usage: wgpu::TextureUsages::TEXTURE_BINDING | wgpu::TextureUsages::STORAGE_BINDING,
            view_formats: &[],
        });
        let view = texture.create_view(&Default::default());
        let key = crate::pipeline::PipelineKey::new("weight_texels", "main")
            .define("TEXEL_SHIFT", TEXEL_ROW.trailing_zeros());
        let params = [texels_u32, row_texels as u32, total_u32];
        let groups = crate::recorder::split_groups(self, total_u32.div_ceil(64), 1);
        let mut rec = crate::recorder::Recorder::new(self);
        rec.dispatch(
            &key,
            &params,
            &[buffer.into(), Binding::texture(&view)],
            groups,
        )?;
        rec.submit()?;
        Ok(Some(WeightTexels {
            view,
            _texture: texture,
            bytes: total * 16,
        }))
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

#[cfg(test)]
mod tests {
    use super::*;

    /// llama.cpp's encoding of 10 rows of 512 elements and its decoding of the first two
    /// (`quant/tests/data/codec`, see its README).
    fn codec_fixture(dtype: DType) -> (Vec<u8>, Vec<f32>) {
        let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../quant/tests/data/codec");
        let stem = match dtype {
            DType::IQ4_NL => "iq4_nl".to_string(),
            d => d.name().to_lowercase().replace("_k", "_K"),
        };
        let read = |ext: &str| {
            let path = format!("{dir}/{stem}.{ext}");
            std::fs::read(&path).unwrap_or_else(|e| panic!("{path}: {e}"))
        };
        let decoded = read("decoded.f32");
        (read("ref.bin"), bytemuck::pod_collect_to_vec(&decoded))
    }

    #[test]
    fn dequantize_row_equals_llama_cpp_bit_for_bit() {
        let quantized = DType::ALL.into_iter().filter(|d| d.block_size() > 1);
        for dtype in quantized {
            let (encoded, want) = codec_fixture(dtype);
            let row_bytes = dtype.row_bytes(512).unwrap();
            assert_eq!(encoded.len(), 10 * row_bytes, "{dtype:?} fixture size");
            for (r, want) in want.chunks_exact(512).enumerate() {
                let mut got = vec![f32::NAN; 512];
                dequantize_row(
                    dtype,
                    &encoded[r * row_bytes..(r + 1) * row_bytes],
                    &mut got,
                );
                for (e, (g, w)) in got.iter().zip(want).enumerate() {
                    assert_eq!(
                        g.to_bits(),
                        w.to_bits(),
                        "{dtype:?} row {r} element {e}: {g} != {w}"
                    );
                }
            }
        }
    }

    /// A synthetic weight's bytes are its pattern repeated from the start of every part; its
    /// blocks decode to finite values and a linear layer over it matches the CPU reference.
    #[test]
    fn synthetic_weights_repeat_valid_rows_in_every_part_and_run_through_linear() {
        use crate::gpu::GpuOptions;
        use crate::ops::linear::{linear, linear_ref, LinearOut};
        use crate::ops::test_util::max_rel_err;
        use crate::recorder::Recorder;
        use crate::testing::random_f32;

        // Q4_0 rows of 2286 bytes (2 mod 4): a 112-row pattern, repeated four times and a bit
        // in each 458-row part of a 1 MiB binding. Q6_K: one copy per part of a small weight.
        let cases = [
            (DType::Q4_0, 1000, 4064, Some(1 << 20)),
            (DType::Q6_K, 77, 512, None),
        ];
        for (dtype, rows, cols, binding) in cases {
            let gpu = Gpu::new(&GpuOptions {
                max_binding_override: binding,
                ..Default::default()
            })
            .unwrap();
            let w = gpu.synthetic_weight("w", dtype, rows, cols, 11).unwrap();
            let (pattern_rows, pattern) = synthetic_pattern(dtype, rows, cols, 11).unwrap();
            let row_bytes = dtype.row_bytes(cols).unwrap();
            if binding.is_some() {
                assert!(w.parts.len() > 1 && w.parts[0].rows > 2 * pattern_rows);
            }
            let mut bytes = Vec::new();
            for part in &w.parts {
                let len = (part.rows * w.row_stride) as u64;
                let padded = gpu.read_bytes(&part.buffer, part.offset, len).unwrap();
                let got: Vec<u8> = padded
                    .chunks_exact(w.row_stride)
                    .flat_map(|row| row[..row_bytes].iter().copied())
                    .collect();
                let want: Vec<u8> = (0..part.rows)
                    .flat_map(|r| {
                        let p = r % pattern_rows;
                        pattern[p * row_bytes..(p + 1) * row_bytes].iter().copied()
                    })
                    .collect();
                assert!(got == want, "{dtype:?} part at row {}", part.row_start);
                bytes.extend(want);
            }
            let mut values = vec![0.0; cols];
            for row in bytes.chunks_exact(row_bytes) {
                dequantize_row(dtype, row, &mut values);
                assert!(values.iter().all(|v| v.is_finite()), "{dtype:?}");
            }
            for m in [1, 5] {
                let x = random_f32(m * cols, 3);
                let xt = gpu.tensor_from(&[m, cols], &x).unwrap();
                let yt = gpu.tensor(&[m, rows]).unwrap();
                let mut rec = Recorder::new(&gpu);
                linear(&mut rec, &w, &xt, m, &yt, LinearOut::dense(rows)).unwrap();
                rec.submit().unwrap();
                let got = gpu.read(&yt).unwrap();
                let err = max_rel_err(&got, &linear_ref(&bytes, &w, &x, m));
                assert!(err < 1e-4, "{dtype:?} m={m}: {err}");
            }
        }
    }

    #[test]
    fn block_sizes_follow_ggml() {
        for dtype in DType::ALL {
            assert_eq!(DType::from_ggml_id(dtype.ggml_id()), Some(dtype));
        }
        assert_eq!(DType::Q4_K.row_bytes(512).unwrap(), 288);
        assert_eq!(DType::Q3_K.row_bytes(768).unwrap(), 330);
        assert_eq!(DType::IQ4_NL.row_bytes(64).unwrap(), 36);
        assert!(DType::Q6_K.row_bytes(96).is_err());
        assert_eq!(DType::from_ggml_id(9), None);
    }
}
