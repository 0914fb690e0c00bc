//! Records dispatches and copies, then submits them as one command buffer.
//!
//! Kernel parameters go into a uniform arena that is written once per submit; bind groups are
//! made at submit time. A decode step is one `Recorder`: one submit, one wait for the sampled
//! token.

use std::num::NonZeroU64;
use std::sync::Arc;

use crate::error::Result;
use crate::gpu::Gpu;
use crate::pipeline::PipelineKey;
use crate::tensor::{PooledBuffer, Tensor};

/// A resource bound to a kernel: a buffer (all of it, or `size` bytes from `offset`), or a
/// texture view (weights on devices that read them as texels). A tensor's binding carries its
/// pooled buffer, which the recorder holds until it submits.
#[derive(Clone, Copy)]
pub(crate) struct Binding<'a> {
    pub resource: Resource<'a>,
    pub pooled: Option<&'a Arc<PooledBuffer>>,
}

#[derive(Clone, Copy)]
pub(crate) enum Resource<'a> {
    Buffer(&'a wgpu::Buffer, Option<(u64, u64)>),
    Texture(&'a wgpu::TextureView),
}

impl<'a> From<&'a wgpu::Buffer> for Binding<'a> {
    fn from(buffer: &'a wgpu::Buffer) -> Self {
        Binding {
            resource: Resource::Buffer(buffer, None),
            pooled: None,
        }
    }
}

impl<'a> From<&'a Tensor> for Binding<'a> {
    fn from(t: &'a Tensor) -> Self {
        Binding {
            resource: Resource::Buffer(&t.buf.buffer, None),
            pooled: Some(&t.buf),
        }
    }
}

impl<'a> Binding<'a> {
    /// `size` bytes of `t` from byte `offset`.
    pub fn range(t: &'a Tensor, offset: u64, size: u64) -> Self {
        Binding {
            resource: Resource::Buffer(&t.buf.buffer, Some((offset, size))),
            pooled: Some(&t.buf),
        }
    }

    /// `size` bytes of a buffer from byte `offset`.
    pub fn buffer_range(buffer: &'a wgpu::Buffer, offset: u64, size: u64) -> Self {
        Binding {
            resource: Resource::Buffer(buffer, Some((offset, size))),
            pooled: None,
        }
    }

    /// A whole texture.
    pub fn texture(view: &'a wgpu::TextureView) -> Self {
        Binding {
            resource: Resource::Texture(view),
            pooled: None,
        }
    }
}

/// A dispatch's kernel: compiled, or checked by naga and compiled at submit together with the
/// others the batch needs, on all cores ([`PipelineCache::build_all`](crate::pipeline)).
enum Kernel {
    Ready(Arc<wgpu::ComputePipeline>),
    Pending(PipelineKey),
}

/// A [`Binding`]'s resource, kept until the submit.
enum Bound {
    Buffer(wgpu::Buffer, Option<(u64, u64)>),
    Texture(wgpu::TextureView),
}

enum Step {
    Dispatch {
        kernel: Kernel,
        buffers: Vec<Bound>,
        params: Option<(u64, u64)>,
        groups: [u32; 3],
    },
    Clear {
        buffer: wgpu::Buffer,
        size: u64,
    },
    Copy {
        src: wgpu::Buffer,
        src_offset: u64,
        dst: wgpu::Buffer,
        dst_offset: u64,
        size: u64,
    },
}

/// Handle to a read requested with [`Recorder::read`]; indexes the result of `submit`.
#[derive(Clone, Copy, Debug)]
pub struct ReadId(usize);

impl ReadId {
    /// Position of this read in the vector `submit` returns.
    pub fn index(self) -> usize {
        self.0
    }
}

/// A batch of GPU work, submitted at once.
///
/// The recorder holds every tensor its work names until it submits (or is dropped unsubmitted):
/// a tensor its owner drops meanwhile cannot go back to the buffer pool, where another owner,
/// on this thread or another, could take it and write it through the queue ahead of this work.
pub struct Recorder<'g> {
    gpu: &'g Gpu,
    steps: Vec<Step>,
    arena: Vec<u8>,
    reads: Vec<(wgpu::Buffer, u64, u64)>,
    held: Vec<Arc<PooledBuffer>>,
}

impl<'g> Recorder<'g> {
    pub fn new(gpu: &'g Gpu) -> Self {
        Recorder {
            gpu,
            steps: Vec::new(),
            arena: Vec::new(),
            reads: Vec::new(),
            held: Vec::new(),
        }
    }

    pub fn gpu(&self) -> &'g Gpu {
        self.gpu
    }

    /// Records one dispatch of the pipeline `key`. Binding 0 is the uniform `params` (when not
    /// empty), bindings 1.. are `buffers` in order: tensors (`x.into()`), weight buffers, or
    /// ranges of either.
    pub(crate) fn dispatch(
        &mut self,
        key: &PipelineKey,
        params: &[u32],
        buffers: &[Binding],
        groups: [u32; 3],
    ) -> Result<()> {
        if groups.contains(&0) {
            return Ok(());
        }
        let kernel = match self.gpu.pipelines.lookup(key) {
            Some(pipeline) => Kernel::Ready(pipeline),
            None => {
                self.gpu.pipelines.check(key)?;
                Kernel::Pending(key.clone())
            }
        };
        let params = if params.is_empty() {
            None
        } else {
            let align = self
                .gpu
                .limits()
                .min_uniform_buffer_offset_alignment
                .max(16) as usize;
            let offset = self.arena.len().div_ceil(align) * align;
            self.arena.resize(offset, 0);
            self.arena.extend_from_slice(bytemuck::cast_slice(params));
            let size = (params.len() * 4).div_ceil(16) * 16;
            self.arena.resize(offset + size, 0);
            Some((offset as u64, size as u64))
        };
        self.held
            .extend(buffers.iter().filter_map(|b| b.pooled.cloned()));
        let buffers = buffers
            .iter()
            .map(|b| match b.resource {
                Resource::Buffer(buffer, range) => Bound::Buffer(buffer.clone(), range),
                Resource::Texture(view) => Bound::Texture(view.clone()),
            })
            .collect();
        self.steps.push(Step::Dispatch {
            kernel,
            buffers,
            params,
            groups,
        });
        Ok(())
    }

    /// Records a copy of `len` f32 elements between tensors.
    pub fn copy(
        &mut self,
        src: &Tensor,
        src_elem: usize,
        dst: &Tensor,
        dst_elem: usize,
        len: usize,
    ) {
        self.held.extend([src.buf.clone(), dst.buf.clone()]);
        self.steps.push(Step::Copy {
            src: src.buffer().clone(),
            src_offset: src_elem as u64 * 4,
            dst: dst.buffer().clone(),
            dst_offset: dst_elem as u64 * 4,
            size: len as u64 * 4,
        });
    }

    /// Records setting all of `t` to zero.
    pub fn clear(&mut self, t: &Tensor) {
        self.held.push(t.buf.clone());
        self.steps.push(Step::Clear {
            buffer: t.buffer().clone(),
            size: t.len() as u64 * 4,
        });
    }

    /// Asks for `len` elements of `t` from element `offset` to be read back after the work.
    pub fn read(&mut self, t: &Tensor, offset: usize, len: usize) -> ReadId {
        self.held.push(t.buf.clone());
        self.reads
            .push((t.buffer().clone(), offset as u64 * 4, len as u64 * 4));
        ReadId(self.reads.len() - 1)
    }

    /// Number of dispatches recorded so far.
    pub fn dispatch_count(&self) -> usize {
        self.steps
            .iter()
            .filter(|s| matches!(s, Step::Dispatch { .. }))
            .count()
    }

    /// Submits everything as one command buffer. When reads were requested, waits for them and
    /// returns their bytes, indexed by [`ReadId`]; otherwise returns without waiting.
    pub fn submit(self) -> Result<Vec<Vec<u8>>> {
        let gpu = self.gpu;
        let device = &gpu.device;
        let pending: Vec<PipelineKey> = self
            .steps
            .iter()
            .filter_map(|step| match step {
                Step::Dispatch {
                    kernel: Kernel::Pending(key),
                    ..
                } => Some(key.clone()),
                _ => None,
            })
            .collect();
        if !pending.is_empty() {
            gpu.pipelines.build_all(device, pending)?;
        }
        // The arena comes from the pool and goes back after the submit: a later write to it is
        // ordered after this submission on the queue, so a decode step allocates nothing.
        let arena = if self.arena.is_empty() {
            None
        } else {
            let usage = wgpu::BufferUsages::UNIFORM | wgpu::BufferUsages::COPY_DST;
            let buffer = gpu.raw_buffer("uniform arena", self.arena.len() as u64, usage)?;
            gpu.queue.write_buffer(&buffer, 0, &self.arena);
            Some(buffer)
        };

        let mut encoder = device.create_command_encoder(&Default::default());
        let mut pass: Option<wgpu::ComputePass<'static>> = None;
        for step in &self.steps {
            match step {
                Step::Dispatch {
                    kernel,
                    buffers,
                    params,
                    groups,
                } => {
                    let pipeline = match kernel {
                        Kernel::Ready(pipeline) => pipeline.clone(),
                        Kernel::Pending(key) => gpu.pipelines.lookup(key).ok_or_else(|| {
                            crate::error::RuntimeError::Device(format!(
                                "kernel {} was not compiled",
                                key.family
                            ))
                        })?,
                    };
                    let mut entries = Vec::with_capacity(buffers.len() + 1);
                    if let (Some((offset, size)), Some(arena)) = (params, &arena) {
                        entries.push(wgpu::BindGroupEntry {
                            binding: 0,
                            resource: wgpu::BindingResource::Buffer(wgpu::BufferBinding {
                                buffer: arena,
                                offset: *offset,
                                size: NonZeroU64::new(*size),
                            }),
                        });
                    }
                    for (i, bound) in buffers.iter().enumerate() {
                        let resource = match bound {
                            Bound::Texture(view) => wgpu::BindingResource::TextureView(view),
                            Bound::Buffer(b, None) => b.as_entire_binding(),
                            Bound::Buffer(b, Some((offset, size))) => {
                                wgpu::BindingResource::Buffer(wgpu::BufferBinding {
                                    buffer: b,
                                    offset: *offset,
                                    size: NonZeroU64::new(*size),
                                })
                            }
                        };
                        entries.push(wgpu::BindGroupEntry {
                            binding: i as u32 + 1,
                            resource,
                        });
                    }
                    let bind_group = device.create_bind_group(&wgpu::BindGroupDescriptor {
                        label: None,
                        layout: &pipeline.get_bind_group_layout(0),
                        entries: &entries,
                    });
                    let p = pass.get_or_insert_with(|| {
                        encoder
                            .begin_compute_pass(&Default::default())
                            .forget_lifetime()
                    });
                    p.set_pipeline(&pipeline);
                    p.set_bind_group(0, &bind_group, &[]);
                    p.dispatch_workgroups(groups[0], groups[1], groups[2]);
                }
                Step::Clear { buffer, size } => {
                    drop(pass.take());
                    encoder.clear_buffer(buffer, 0, Some(*size));
                }
                Step::Copy {
                    src,
                    src_offset,
                    dst,
                    dst_offset,
                    size,
                } => {
                    drop(pass.take());
                    encoder.copy_buffer_to_buffer(src, *src_offset, dst, *dst_offset, *size);
                }
            }
        }
        drop(pass.take());

        let mut stagings = Vec::with_capacity(self.reads.len());
        for (buffer, offset, len) in &self.reads {
            let staging = gpu.staging(*len)?;
            encoder.copy_buffer_to_buffer(buffer, *offset, &staging, 0, len.div_ceil(4) * 4);
            stagings.push((staging, *len));
        }
        gpu.queue.submit([encoder.finish()]);
        if let Some(arena) = arena {
            gpu.pool
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .give(arena);
        }
        gpu.check_error()?;
        stagings
            .iter()
            .map(|(s, len)| gpu.map_staging(s, *len))
            .collect()
    }
}

/// Splits `n` workgroups over x and y so neither exceeds the device's per-dimension limit.
/// Kernels recover the linear index as `wid.x + wid.y * num_workgroups.x`.
pub(crate) fn split_groups(gpu: &Gpu, n: u32, z: u32) -> [u32; 3] {
    let max = gpu.limits().max_compute_workgroups_per_dimension.max(1);
    if n <= max {
        [n, 1, z]
    } else {
        let y = n.div_ceil(max);
        [n.div_ceil(y), y, z]
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::{self, test_util};

    /// A tensor its owner drops between recording and submit must not come back from the pool
    /// to a queue write that lands ahead of the recorded work (a copy and a kernel read it).
    #[test]
    fn tensors_dropped_before_the_submit_are_not_reused_ahead_of_the_work() {
        // A device of its own, so this test's pool sees no other test's buffers.
        let gpu = test_util::open(None);
        let n = 1000;
        let first: Vec<f32> = (0..n).map(|i| i as f32).collect();
        let copied = gpu.tensor(&[n]).unwrap();
        let summed = gpu.tensor_from(&[n], &vec![0.5; n]).unwrap();
        let mut rec = Recorder::new(&gpu);
        for _ in 0..2 {
            let x = gpu.tensor_from(&[n], &first).unwrap();
            rec.copy(&x, 0, &copied, 0, n);
            ops::elementwise::add(&mut rec, &summed, &x, n).unwrap();
            drop(x);
            // The same size as x: the pool's first candidate were x's buffer back in it.
            drop(gpu.tensor_from(&[n], &vec![-1.0; n]).unwrap());
        }
        rec.submit().unwrap();
        assert_eq!(gpu.read(&copied).unwrap(), first);
        let want: Vec<f32> = first.iter().map(|v| 0.5 + 2.0 * v).collect();
        assert_eq!(gpu.read(&summed).unwrap(), want);
    }
}
