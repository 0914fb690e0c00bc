//! Compute pipelines, built lazily and cached by a key struct.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
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

/// Pipelines keyed by [`PipelineKey`]; each is compiled once per device. With a disk cache, the
/// driver's compiled code is loaded at start and written back when new pipelines were made.
#[derive(Default)]
pub struct PipelineCache {
    pipelines: Mutex<HashMap<PipelineKey, Arc<wgpu::ComputePipeline>>>,
    /// Keys whose WGSL naga has accepted.
    checked: Mutex<HashSet<PipelineKey>>,
    disk: Option<DiskCache>,
}

/// The driver's pipeline cache and the file it is kept in.
struct DiskCache {
    cache: wgpu::PipelineCache,
    path: PathBuf,
    /// What the file held at start.
    loaded: Option<Vec<u8>>,
}

/// A pipeline cache file larger than this is ignored (drivers' caches of a few dozen kernels
/// are far smaller).
const MAX_CACHE_FILE: u64 = 256 << 20;

/// The bytes of a cache file: `None` for anything but a regular file of a sane size (a FIFO or
/// a device there must not block or exhaust the start).
fn read_cache_file(path: &Path) -> Option<Vec<u8>> {
    let meta = std::fs::metadata(path).ok()?;
    if !meta.is_file() || meta.len() > MAX_CACHE_FILE {
        log::warn!(
            "ignoring the pipeline cache {}: not a regular file of at most {} MiB",
            path.display(),
            MAX_CACHE_FILE >> 20
        );
        return None;
    }
    std::fs::read(path).ok()
}

impl PipelineCache {
    /// A cache backed by a file of `dir` named for the adapter and driver (a driver update
    /// starts a new one). A missing, unreadable or stale file starts an empty cache.
    pub(crate) fn on_disk(device: &wgpu::Device, info: &wgpu::AdapterInfo, dir: &Path) -> Self {
        let Some(key) = wgpu::util::pipeline_cache_key(info) else {
            return Self::default();
        };
        let path = dir.join(key);
        let data = read_cache_file(&path);
        // SAFETY: the data was written by `get_data` of a cache for the same adapter key (the
        // file name), and `fallback` makes the driver start empty if it rejects it.
        let cache = unsafe {
            device.create_pipeline_cache(&wgpu::PipelineCacheDescriptor {
                label: Some("tessera pipelines"),
                data: data.as_deref(),
                fallback: true,
            })
        };
        log::info!(
            "pipeline cache {} ({} bytes loaded)",
            path.display(),
            data.as_ref().map_or(0, Vec::len)
        );
        PipelineCache {
            pipelines: Mutex::default(),
            checked: Mutex::default(),
            disk: Some(DiskCache {
                cache,
                path,
                loaded: data,
            }),
        }
    }

    /// Writes the driver's cache to its file (through a temporary file and a rename) when its
    /// data changed during the run. Failures are logged: a cache is optional.
    pub(crate) fn save(&self) {
        let Some(disk) = &self.disk else { return };
        let Some(data) = disk.cache.get_data() else {
            return;
        };
        if disk.loaded.as_ref() == Some(&data) {
            return;
        }
        let write = || -> std::io::Result<()> {
            if let Some(dir) = disk.path.parent() {
                std::fs::create_dir_all(dir)?;
            }
            let tmp = disk
                .path
                .with_extension(format!("tmp-{}", std::process::id()));
            std::fs::write(&tmp, &data)?;
            std::fs::rename(&tmp, &disk.path).inspect_err(|_| {
                let _ = std::fs::remove_file(&tmp);
            })
        };
        match write() {
            Ok(()) => log::info!(
                "pipeline cache saved: {} ({} bytes)",
                disk.path.display(),
                data.len()
            ),
            Err(e) => log::warn!(
                "could not save the pipeline cache {}: {e}",
                disk.path.display()
            ),
        }
    }

    /// Returns the pipeline for `key`, compiling it on first use.
    pub fn get(
        &self,
        device: &wgpu::Device,
        key: &PipelineKey,
    ) -> Result<Arc<wgpu::ComputePipeline>> {
        match self.lookup(key) {
            Some(p) => Ok(p),
            None => self.build(device, key),
        }
    }

    /// How many pipelines are compiled.
    pub(crate) fn len(&self) -> usize {
        self.pipelines
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .len()
    }

    /// The pipeline for `key` if it was compiled.
    pub(crate) fn lookup(&self, key: &PipelineKey) -> Option<Arc<wgpu::ComputePipeline>> {
        let map = self.pipelines.lock().unwrap_or_else(|e| e.into_inner());
        map.get(key).cloned()
    }

    /// Checks the WGSL of `key` with naga (once per key), so that a kernel's error shows where
    /// its dispatch is recorded even when the driver compiles it later ([`Self::build_all`]).
    pub(crate) fn check(&self, key: &PipelineKey) -> Result<()> {
        self.text(key).map(drop)
    }

    /// The WGSL of `key`, validated by naga the first time it is asked for (whose errors point
    /// at the WGSL line); later only assembled.
    fn text(&self, key: &PipelineKey) -> Result<String> {
        let shader_error = |message: String| RuntimeError::Shader {
            kernel: label_of(key),
            message,
        };
        let text = shaders::assemble(key.family, &key.defines)
            .ok_or_else(|| shader_error("no such kernel family".into()))?;
        let mut checked = self.checked.lock().unwrap_or_else(|e| e.into_inner());
        if !checked.contains(key) {
            shaders::validate(&text).map_err(shader_error)?;
            checked.insert(key.clone());
        }
        Ok(text)
    }

    /// Compiles `key` (without holding the map, so that several threads can compile at once)
    /// and keeps it; a pipeline another thread kept meanwhile wins.
    fn build(
        &self,
        device: &wgpu::Device,
        key: &PipelineKey,
    ) -> Result<Arc<wgpu::ComputePipeline>> {
        let text = self.text(key)?;
        let label = label_of(key);
        let started = std::time::Instant::now();
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
            cache: self.disk.as_ref().map(|d| &d.cache),
        });
        log::debug!(
            "compiled {label} in {:.2} s",
            started.elapsed().as_secs_f64()
        );
        let mut map = self.pipelines.lock().unwrap_or_else(|e| e.into_inner());
        Ok(map.entry(key.clone()).or_insert(Arc::new(pipeline)).clone())
    }

    /// Compiles every key of `keys` not compiled yet, on as many threads as the machine has
    /// cores (drivers that compile on the CPU, such as lavapipe, take seconds for large
    /// kernels); the first error is returned.
    pub(crate) fn build_all(&self, device: &wgpu::Device, keys: Vec<PipelineKey>) -> Result<()> {
        let mut todo: Vec<PipelineKey> = Vec::new();
        for key in keys {
            if self.lookup(&key).is_none() && !todo.contains(&key) {
                todo.push(key);
            }
        }
        let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
        if todo.len() <= 1 || threads == 1 {
            return todo
                .iter()
                .try_for_each(|k| self.build(device, k).map(drop));
        }
        let queue = Mutex::new(todo);
        let next = || queue.lock().unwrap_or_else(|e| e.into_inner()).pop();
        std::thread::scope(|scope| {
            let workers: Vec<_> = (0..threads)
                .map(|_| {
                    scope.spawn(|| -> Result<()> {
                        while let Some(key) = next() {
                            self.build(device, &key)?;
                        }
                        Ok(())
                    })
                })
                .collect();
            workers.into_iter().try_for_each(|w| {
                w.join().unwrap_or_else(|_| {
                    Err(RuntimeError::Device("a kernel compile panicked".into()))
                })
            })
        })
    }
}

/// How a pipeline is named in logs and errors.
fn label_of(key: &PipelineKey) -> String {
    format!("{}::{} {:?}", key.family, key.entry, key.defines)
}

#[cfg(test)]
mod tests {
    use crate::gpu::{Gpu, GpuOptions};
    use crate::ops::rmsnorm;
    use crate::recorder::Recorder;

    fn norm_of_ones(gpu: &Gpu) -> Vec<f32> {
        let x = gpu.tensor_from(&[8], &[2.0; 8]).unwrap();
        let w = gpu.tensor_from(&[8], &[1.0; 8]).unwrap();
        let y = gpu.tensor(&[8]).unwrap();
        let mut rec = Recorder::new(gpu);
        rmsnorm(&mut rec, &x, &w, &y, 1, 8, 0.0).unwrap();
        rec.submit().unwrap();
        gpu.read(&y).unwrap()
    }

    #[test]
    fn kernels_compile_together_at_submit_and_a_bad_one_fails_where_it_is_recorded() {
        let gpu = Gpu::new(&GpuOptions::default()).unwrap();
        let keys: Vec<_> = [1, 2, 4, 8]
            .into_iter()
            .map(|wg| super::PipelineKey::new("rmsnorm", "main").define("WG", wg))
            .collect();
        assert!(keys.iter().all(|k| gpu.pipelines.lookup(k).is_none()));
        gpu.pipelines
            .build_all(&gpu.device, [keys.clone(), keys.clone()].concat())
            .unwrap();
        assert!(keys.iter().all(|k| gpu.pipelines.lookup(k).is_some()));
        // A dispatch records a kernel unknown to naga's checks as an error, before any submit.
        let mut rec = Recorder::new(&gpu);
        let bad = super::PipelineKey::new("no_such_kernel", "main");
        assert!(rec.dispatch(&bad, &[], &[], [1, 1, 1]).is_err());
        let missing_define = super::PipelineKey::new("rmsnorm", "main");
        assert!(rec.dispatch(&missing_define, &[1], &[], [1, 1, 1]).is_err());
        assert_eq!(rec.dispatch_count(), 0);
        // A first use compiles at submit and computes the right thing.
        assert_eq!(norm_of_ones(&gpu), vec![1.0; 8]);
    }

    #[test]
    fn the_disk_cache_is_written_and_a_corrupt_file_is_ignored() {
        let dir = std::env::temp_dir().join(format!("tessera-pipelines-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let options = GpuOptions {
            pipeline_cache_dir: Some(dir.clone()),
            ..Default::default()
        };
        let gpu = Gpu::new(&options).unwrap();
        let on_disk = gpu.pipelines.disk.is_some();
        assert_eq!(norm_of_ones(&gpu), vec![1.0; 8]);
        drop(gpu);
        if !on_disk {
            // The adapter offers no pipeline cache (GL, Metal, DX12): nothing may be written.
            assert!(
                !dir.exists(),
                "a cache file was written without a driver cache"
            );
            return;
        }
        let files: Vec<_> = std::fs::read_dir(&dir).unwrap().flatten().collect();
        assert_eq!(files.len(), 1, "{files:?}");
        let path = files[0].path();
        assert!(std::fs::metadata(&path).unwrap().len() > 0);
        std::fs::write(&path, b"not a pipeline cache").unwrap();
        let gpu = Gpu::new(&options).unwrap();
        assert_eq!(norm_of_ones(&gpu), vec![1.0; 8]);
        drop(gpu);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
