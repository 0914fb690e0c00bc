//! Compute pipelines, built lazily and cached by a key struct.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use crate::error::{Result, RuntimeError};
use crate::shaders;

/// Identifies one compiled pipeline: a kernel family, an entry point and its specialisation.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct PipelineKey {
    pub family: &'static str,
    pub entry: &'static str,
    pub defines: Vec<(&'static str, u32)>,
}

impl PipelineKey {
    pub fn new(family: &'static str, entry: &'static str) -> Self {
        PipelineKey {
            family,
            entry,
            defines: Vec::new(),
        }
    }

    pub fn define(mut self, name: &'static str, value: u32) -> Self {
        self.defines.push((name, value));
        self
    }
}

/// Pipelines keyed by [`PipelineKey`]; each is compiled once per device.
#[derive(Default)]
pub struct PipelineCache {
    pipelines: Mutex<HashMap<PipelineKey, Arc<wgpu::ComputePipeline>>>,
}

impl PipelineCache {
    /// Returns the pipeline for `key`, compiling it on first use.
    pub fn get(
        &self,
        device: &wgpu::Device,
        key: &PipelineKey,
    ) -> Result<Arc<wgpu::ComputePipeline>> {
        let mut map = self.pipelines.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(p) = map.get(key) {
            return Ok(p.clone());
        }
        let label = format!("{}::{} {:?}", key.family, key.entry, key.defines);
        let shader_error = |message: String| RuntimeError::Shader {
            kernel: label.clone(),
            message,
        };
        let text = shaders::assemble(key.family, &key.defines)
            .ok_or_else(|| shader_error("no such kernel family".into()))?;
        // naga's own validation first: its errors point at the WGSL line.
        shaders::validate(&text).map_err(shader_error)?;
        let module = device.create_shader_module(wgpu::ShaderModuleDescriptor {
            label: Some(&label),
            source: wgpu::ShaderSource::Wgsl(text.into()),
        });
        let pipeline = device.create_compute_pipeline(&wgpu::ComputePipelineDescriptor {
            label: Some(&label),
            layout: None,
            module: &module,
            entry_point: Some(key.entry),
            compilation_options: Default::default(),
            cache: None,
        });
        let pipeline = Arc::new(pipeline);
        map.insert(key.clone(), pipeline.clone());
        Ok(pipeline)
    }
}
