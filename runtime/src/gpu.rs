//! Adapter enumeration and choice, and the opened device.
//!
//! Every fact about the device (binding limits, subgroup sizes, shader-f16) is read from the
//! adapter, never assumed. Optional features are requested only where the adapter offers them;
//! every kernel has a path that needs none of them.

use std::fmt;
use std::str::FromStr;
use std::sync::{Arc, Mutex};

use crate::error::{Result, RuntimeError};
use crate::pipeline::PipelineCache;
use crate::pool::BufferPool;

/// Which adapter to open: `auto` (the best one found), an index from `tessera devices`, or a
/// case-insensitive substring of the adapter's name or backend.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum DeviceSelector {
    #[default]
    Auto,
    Index(usize),
    Name(String),
}

impl FromStr for DeviceSelector {
    type Err = std::convert::Infallible;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let s = s.trim();
        Ok(if s.is_empty() || s.eq_ignore_ascii_case("auto") {
            DeviceSelector::Auto
        } else if let Ok(index) = s.parse() {
            DeviceSelector::Index(index)
        } else {
            DeviceSelector::Name(s.to_string())
        })
    }
}

impl fmt::Display for DeviceSelector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DeviceSelector::Auto => write!(f, "auto"),
            DeviceSelector::Index(i) => write!(f, "{i}"),
            DeviceSelector::Name(n) => write!(f, "{n}"),
        }
    }
}

/// What `tessera devices` prints about one adapter.
#[derive(Clone, Debug)]
pub struct AdapterReport {
    pub index: usize,
    /// Whether `auto` picks this adapter.
    pub preferred: bool,
    pub name: String,
    pub backend: String,
    pub device_type: String,
    pub vendor: u32,
    pub driver: String,
    pub driver_info: String,
    pub shader_f16: bool,
    pub subgroup: bool,
    pub subgroup_min_size: u32,
    pub subgroup_max_size: u32,
    pub timestamp_query: bool,
    pub max_storage_buffer_binding_size: u64,
    pub max_uniform_buffer_binding_size: u64,
    pub max_buffer_size: u64,
    pub max_compute_workgroup_storage_size: u32,
    pub max_compute_invocations_per_workgroup: u32,
    pub max_compute_workgroups_per_dimension: u32,
}

/// Optional capabilities of the opened device.
#[derive(Clone, Copy, Debug, Default)]
pub struct DeviceFeatures {
    pub shader_f16: bool,
    pub subgroup: bool,
    pub subgroup_min_size: u32,
    pub subgroup_max_size: u32,
    pub timestamp_query: bool,
    pub shader_int64: bool,
}

/// How kernels split work over invocations; chosen per device type.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KernelLayout {
    /// The threads of a workgroup share an output row and reduce in workgroup memory: for GPUs,
    /// where neighbouring threads should read neighbouring bytes.
    Cooperative,
    /// Each invocation owns an output row (or query) and loads shared by all lanes are
    /// broadcast: for CPU devices such as lavapipe, whose SIMD lanes are invocations.
    LanePerRow,
}

impl FromStr for KernelLayout {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "cooperative" => Ok(KernelLayout::Cooperative),
            "rows" | "lane-per-row" => Ok(KernelLayout::LanePerRow),
            _ => Err(format!(
                "unknown kernel layout `{s}` (use `cooperative` or `rows`)"
            )),
        }
    }
}

/// The layout a `TESSERA_KERNELS` value asks for; a value that names none is reported, and the
/// device's own layout runs.
fn layout_setting(value: Option<&str>) -> Option<KernelLayout> {
    match value?.trim().parse() {
        Ok(layout) => Some(layout),
        Err(e) => {
            log::warn!("TESSERA_KERNELS: {e}; the device's own layout runs");
            None
        }
    }
}

/// Whether a `TESSERA_WEIGHT_TEXTURES` value leaves weight textures on (the default).
fn textures_setting(value: Option<&str>) -> bool {
    switch_setting(
        "TESSERA_WEIGHT_TEXTURES",
        value,
        "weight textures stay on where the device uses them",
    )
}

/// Whether the value of the on/off setting `name` leaves it on (the default, also where it is
/// unset): `0`, `off`, `false` or `no` turn it off, `1`, `on`, `true` or `yes` keep it; any
/// other value is reported (with `kept`, what happens instead) and the default kept.
pub(crate) fn switch_setting(name: &str, value: Option<&str>, kept: &str) -> bool {
    let Some(value) = value else {
        return true;
    };
    match value.trim().to_ascii_lowercase().as_str() {
        "0" | "off" | "false" | "no" => false,
        "1" | "on" | "true" | "yes" => true,
        _ => {
            log::warn!("{name}={value} is not 0/off/false/no or 1/on/true/yes: {kept}");
            true
        }
    }
}

/// Options for opening a device.
#[derive(Clone, Debug, Default)]
pub struct GpuOptions {
    pub selector: DeviceSelector,
    /// Overrides the kernel layout chosen from the device type (also `TESSERA_KERNELS`).
    pub layout: Option<KernelLayout>,
    /// Caps the storage-binding size below the adapter's own limit: tests use it to force
    /// weight splitting on any device.
    pub max_binding_override: Option<u64>,
    /// A directory for the driver's compiled pipelines, reused by the next start (where the
    /// adapter offers pipeline caches: Vulkan). `None` keeps nothing.
    pub pipeline_cache_dir: Option<std::path::PathBuf>,
    /// Leaves subgroup operations off even where the adapter offers them, so that tests can run
    /// the kernels' fallbacks on any device.
    pub no_subgroups: bool,
    /// Leaves 64-bit integers off even where the adapter offers them, so that tests can run the
    /// 32-bit weight loads of CPU devices without them (OpenGL's llvmpipe) on any device.
    pub no_int64: bool,
    /// Reads weights from storage buffers only, never from texture copies of them
    /// ([`Gpu::weight_textures`]; also `TESSERA_WEIGHT_TEXTURES=0`).
    pub no_weight_textures: bool,
    /// Leaves a CPU device's threads where the scheduler puts them, instead of one core each
    /// ([`Gpu::pinned_threads`]; also `TESSERA_PIN_THREADS=0`): for a process that keeps cores
    /// busy with work of its own, which a pinned worker cannot move away from.
    pub no_thread_pinning: bool,
    /// Keeps the decode mat-vec's x out of workgroup memory ([`Gpu::shared_x`]), so that tests
    /// run its path for devices with too little of it on any device.
    pub no_shared_x: bool,
}

/// An opened device with its queue, limits, pipeline cache and buffer pool.
pub struct Gpu {
    pub(crate) device: wgpu::Device,
    pub(crate) queue: wgpu::Queue,
    info: wgpu::AdapterInfo,
    limits: wgpu::Limits,
    features: DeviceFeatures,
    max_binding: u64,
    layout: KernelLayout,
    pub(crate) pipelines: PipelineCache,
    pub(crate) pool: Arc<Mutex<BufferPool>>,
    pub(crate) device_error: Arc<Mutex<Option<String>>>,
    weight_textures: bool,
    shared_x: bool,
    pinned_threads: Vec<(i32, usize)>,
}

/// Adapters of `backends`, narrowed further by `WGPU_BACKEND` (e.g. `vulkan`, `gl`).
fn adapters_of(backends: wgpu::Backends) -> Vec<wgpu::Adapter> {
    let mut desc = wgpu::InstanceDescriptor::new_without_display_handle_from_env();
    desc.backends &= backends;
    if desc.backends.is_empty() {
        return Vec::new();
    }
    let instance = wgpu::Instance::new(desc);
    pollster::block_on(instance.enumerate_adapters(backends))
}

fn adapters() -> Vec<wgpu::Adapter> {
    adapters_of(wgpu::Backends::all())
}

fn report(index: usize, adapter: &wgpu::Adapter) -> AdapterReport {
    let info = adapter.get_info();
    let limits = adapter.limits();
    let features = adapter.features();
    AdapterReport {
        index,
        preferred: false,
        name: info.name.clone(),
        backend: format!("{:?}", info.backend),
        device_type: format!("{:?}", info.device_type),
        vendor: info.vendor,
        driver: info.driver.clone(),
        driver_info: info.driver_info.clone(),
        shader_f16: features.contains(wgpu::Features::SHADER_F16),
        subgroup: features.contains(wgpu::Features::SUBGROUP),
        subgroup_min_size: info.subgroup_min_size,
        subgroup_max_size: info.subgroup_max_size,
        timestamp_query: features.contains(wgpu::Features::TIMESTAMP_QUERY),
        max_storage_buffer_binding_size: limits.max_storage_buffer_binding_size,
        max_uniform_buffer_binding_size: limits.max_uniform_buffer_binding_size,
        max_buffer_size: limits.max_buffer_size,
        max_compute_workgroup_storage_size: limits.max_compute_workgroup_storage_size,
        max_compute_invocations_per_workgroup: limits.max_compute_invocations_per_workgroup,
        max_compute_workgroups_per_dimension: limits.max_compute_workgroups_per_dimension,
    }
}

/// Lists every adapter wgpu finds, in enumeration order (the indices `--device N` takes).
pub fn enumerate_adapters() -> Vec<AdapterReport> {
    let all = adapters();
    let best = (0..all.len()).min_by_key(|&i| preference(&all[i].get_info()));
    let mut reports: Vec<_> = all.iter().enumerate().map(|(i, a)| report(i, a)).collect();
    if let Some(best) = best {
        reports[best].preferred = true;
    }
    reports
}

/// Rank for the default choice: discrete, integrated, virtual, CPU, with OpenGL after all
/// native backends. Lower is better.
fn preference(info: &wgpu::AdapterInfo) -> (u8, u8) {
    let kind = match info.device_type {
        wgpu::DeviceType::DiscreteGpu => 0,
        wgpu::DeviceType::IntegratedGpu => 1,
        wgpu::DeviceType::VirtualGpu => 2,
        wgpu::DeviceType::Cpu => 3,
        wgpu::DeviceType::Other => 4,
    };
    let backend = u8::from(info.backend == wgpu::Backend::Gl);
    (backend, kind)
}

fn describe(reports: &[AdapterReport]) -> String {
    if reports.is_empty() {
        return "  (none)".to_string();
    }
    reports
        .iter()
        .map(|r| {
            format!(
                "  {}: {} ({}, {})",
                r.index, r.name, r.backend, r.device_type
            )
        })
        .collect::<Vec<_>>()
        .join("\n")
}

fn choose(selector: &DeviceSelector) -> Result<wgpu::Adapter> {
    // The default choice ranks OpenGL last, so it is only opened (EGL setup, and its complaints
    // on a headless machine) when no native backend has an adapter.
    if *selector == DeviceSelector::Auto {
        let native = adapters_of(wgpu::Backends::PRIMARY);
        if let Some(best) = native.into_iter().min_by_key(|a| preference(&a.get_info())) {
            return Ok(best);
        }
    }
    let mut all = adapters();
    if all.is_empty() {
        return Err(RuntimeError::NoAdapter);
    }
    let reports: Vec<_> = all.iter().enumerate().map(|(i, a)| report(i, a)).collect();
    let not_found = || RuntimeError::AdapterNotFound {
        requested: selector.to_string(),
        available: describe(&reports),
    };
    let index = match selector {
        DeviceSelector::Auto => (0..all.len())
            .min_by_key(|&i| preference(&all[i].get_info()))
            .ok_or(RuntimeError::NoAdapter)?,
        DeviceSelector::Index(i) if *i < all.len() => *i,
        DeviceSelector::Index(_) => return Err(not_found()),
        DeviceSelector::Name(name) => {
            let needle = name.to_lowercase();
            let matches: Vec<usize> = reports
                .iter()
                .filter(|r| {
                    r.name.to_lowercase().contains(&needle) || r.backend.to_lowercase() == needle
                })
                .map(|r| r.index)
                .collect();
            match matches[..] {
                [] => return Err(not_found()),
                [one] => one,
                _ => {
                    return Err(RuntimeError::AmbiguousAdapter {
                        requested: name.clone(),
                        available: describe(&reports),
                    })
                }
            }
        }
    };
    Ok(all.swap_remove(index))
}

impl Gpu {
    /// Opens the adapter `options.selector` names (by default the best one found).
    pub fn new(options: &GpuOptions) -> Result<Gpu> {
        // The threads before any driver starts its own (see `affinity`).
        // (Only where pinning is wanted: the snapshot lists and renames threads.)
        let pinning = !options.no_thread_pinning
            && crate::affinity::pinning_setting(
                std::env::var("TESSERA_PIN_THREADS").ok().as_deref(),
            );
        let mut threads_before = pinning.then(crate::affinity::Snapshot::take).flatten();
        let adapter = choose(&options.selector)?;
        let info = adapter.get_info();
        let offered = adapter.features();

        // Optional features only where present; the kernels run without any of them.
        let mut wanted =
            wgpu::Features::SHADER_F16 | wgpu::Features::SUBGROUP | wgpu::Features::TIMESTAMP_QUERY;
        if options.pipeline_cache_dir.is_some() {
            wanted |= wgpu::Features::PIPELINE_CACHE;
        }
        // 64-bit integers let CPU devices load weights in fewer, wider pieces
        // (`Gpu::wide_weight_loads`).
        if !options.no_int64 {
            wanted |= wgpu::Features::SHADER_INT64;
        }
        if options.no_subgroups {
            wanted.remove(wgpu::Features::SUBGROUP);
        }
        let required_features = offered & wanted;
        let limits = adapter.limits();
        let desc = wgpu::DeviceDescriptor {
            label: Some("tessera"),
            required_features,
            required_limits: limits.clone(),
            ..Default::default()
        };
        let (device, queue) =
            pollster::block_on(adapter.request_device(&desc)).map_err(|source| {
                RuntimeError::RequestDevice {
                    adapter: info.name.clone(),
                    source,
                }
            })?;

        // Without a handler wgpu panics on a device error (out of memory, ...); keep it and
        // report it from the next wait instead.
        let device_error = Arc::new(Mutex::new(None));
        let slot = device_error.clone();
        device.on_uncaptured_error(Arc::new(move |e: wgpu::Error| {
            let mut slot = slot.lock().unwrap_or_else(|p| p.into_inner());
            slot.get_or_insert_with(|| e.to_string());
        }));

        let features = DeviceFeatures {
            shader_f16: required_features.contains(wgpu::Features::SHADER_F16),
            subgroup: required_features.contains(wgpu::Features::SUBGROUP),
            subgroup_min_size: info.subgroup_min_size,
            subgroup_max_size: info.subgroup_max_size,
            timestamp_query: required_features.contains(wgpu::Features::TIMESTAMP_QUERY),
            shader_int64: required_features.contains(wgpu::Features::SHADER_INT64),
        };
        let adapter_max = limits
            .max_storage_buffer_binding_size
            .min(limits.max_buffer_size);
        let max_binding = options
            .max_binding_override
            .map_or(adapter_max, |o| o.min(adapter_max));
        let env_layout = layout_setting(std::env::var("TESSERA_KERNELS").ok().as_deref());
        let layout = options
            .layout
            .or(env_layout)
            .unwrap_or(match info.device_type {
                wgpu::DeviceType::Cpu => KernelLayout::LanePerRow,
                _ => KernelLayout::Cooperative,
            });
        let weight_textures = layout == KernelLayout::LanePerRow
            && !options.no_weight_textures
            && textures_setting(std::env::var("TESSERA_WEIGHT_TEXTURES").ok().as_deref())
            && limits.max_texture_dimension_2d >= crate::tensor::TEXEL_ROW;
        log::info!(
            "device: {} ({:?}, {:?}), driver {} {}, storage binding limit {} MiB, weight \
             textures {}",
            info.name,
            info.backend,
            info.device_type,
            info.driver,
            info.driver_info,
            max_binding >> 20,
            if weight_textures { "on" } else { "off" }
        );
        // A CPU device's workers, one core each (see `affinity`); the snapshot, dropped here,
        // gives this thread's name back.
        let pinned_threads = match threads_before {
            Some(ref mut before) if info.device_type == wgpu::DeviceType::Cpu => {
                before.spread_new_threads()
            }
            _ => Vec::new(),
        };
        drop(threads_before);
        if !pinned_threads.is_empty() {
            log::info!("driver threads pinned (thread, CPU): {pinned_threads:?}");
        }
        let pipelines = match &options.pipeline_cache_dir {
            Some(dir) if required_features.contains(wgpu::Features::PIPELINE_CACHE) => {
                PipelineCache::on_disk(&device, &info, dir)
            }
            _ => PipelineCache::default(),
        };
        Ok(Gpu {
            device,
            queue,
            info,
            limits,
            features,
            max_binding,
            layout,
            pipelines,
            pool: Arc::new(Mutex::new(BufferPool::default())),
            device_error,
            weight_textures,
            shared_x: !options.no_shared_x,
            pinned_threads,
        })
    }

    /// The adapter's name, e.g. "llvmpipe (LLVM 15.0.6, 256 bits)".
    pub fn name(&self) -> &str {
        &self.info.name
    }

    /// The backend in use, e.g. "Vulkan".
    pub fn backend(&self) -> String {
        format!("{:?}", self.info.backend)
    }

    /// The adapter description as wgpu reports it.
    pub fn info(&self) -> &wgpu::AdapterInfo {
        &self.info
    }

    /// The device limits (the adapter's own, all requested).
    pub fn limits(&self) -> &wgpu::Limits {
        &self.limits
    }

    /// Optional features that were found and enabled.
    pub fn features(&self) -> DeviceFeatures {
        self.features
    }

    /// How kernels split their work on this device.
    pub fn kernel_layout(&self) -> KernelLayout {
        self.layout
    }

    /// Whether kernels read weights as 64-bit words (define `W64`; see `shaders::weight_access`):
    /// on CPU devices with 64-bit integers, where a storage load costs per component, not per
    /// byte.
    pub fn wide_weight_loads(&self) -> bool {
        self.features.shader_int64 && self.layout == KernelLayout::LanePerRow
    }

    /// Whether weights also get a texture copy that the decode mat-vec reads them through
    /// (define `WTEX`; see `shaders::weight_access`): on CPU devices, where llvmpipe fetches
    /// texels with straight-line loads but runs a storage load whose address differs between
    /// lanes as a loop over the lanes, one that stalls on every cache miss. On lavapipe, a
    /// mat-vec over weights that miss the caches runs about 1.5x faster from a texture.
    pub fn weight_textures(&self) -> bool {
        self.weight_textures
    }

    /// Whether the decode mat-vec may copy x into workgroup memory where it fits
    /// (`ops::linear`'s `x_shared_fits`): off only through [`GpuOptions::no_shared_x`].
    pub fn shared_x(&self) -> bool {
        self.shared_x
    }

    /// The driver threads this device pinned, each with its CPU: on a CPU device, the threads
    /// its driver started while it was opened, one CPU each in turn, so that the scheduler does
    /// not stack the workers of every dispatch on one core (see `affinity`). Empty elsewhere.
    pub fn pinned_threads(&self) -> &[(i32, usize)] {
        &self.pinned_threads
    }

    /// How many kernels (pipelines) this device has compiled so far.
    pub fn compiled_kernels(&self) -> usize {
        self.pipelines.len()
    }

    /// The largest buffer a kernel may bind as storage; larger weights are split by rows.
    pub fn max_binding_size(&self) -> u64 {
        self.max_binding
    }

    /// Waits for all submitted work and turns a device error into a typed one.
    pub fn wait(&self) -> Result<()> {
        self.device
            .poll(wgpu::PollType::wait_indefinitely())
            .map_err(|e| RuntimeError::Device(e.to_string()))?;
        self.check_error()
    }

    /// Returns the first device error reported since the last check, if any.
    pub fn check_error(&self) -> Result<()> {
        let mut slot = self.device_error.lock().unwrap_or_else(|p| p.into_inner());
        match slot.take() {
            Some(message) => Err(RuntimeError::Device(message)),
            None => Ok(()),
        }
    }
}

impl Drop for Gpu {
    /// Keeps the pipelines compiled in this run for the next one (see `GpuOptions`).
    fn drop(&mut self) {
        self.pipelines.save();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_kernels_setting_names_a_layout_or_none() {
        assert_eq!(layout_setting(None), None);
        assert_eq!(layout_setting(Some("rows")), Some(KernelLayout::LanePerRow));
        assert_eq!(
            layout_setting(Some(" cooperative ")),
            Some(KernelLayout::Cooperative)
        );
        assert_eq!(layout_setting(Some("lanes")), None);
    }

    #[test]
    fn the_textures_setting_turns_them_off_only_when_asked() {
        assert!(textures_setting(None));
        for off in ["0", " off ", "FALSE", "no"] {
            assert!(!textures_setting(Some(off)), "{off:?}");
        }
        for on in ["1", "on", "True", "yes", "garbage", ""] {
            assert!(textures_setting(Some(on)), "{on:?}");
        }
    }

    #[test]
    fn selector_parses_auto_index_and_name() {
        assert_eq!(
            "auto".parse::<DeviceSelector>().unwrap(),
            DeviceSelector::Auto
        );
        assert_eq!("".parse::<DeviceSelector>().unwrap(), DeviceSelector::Auto);
        assert_eq!(
            "2".parse::<DeviceSelector>().unwrap(),
            DeviceSelector::Index(2)
        );
        assert_eq!(
            "llvmpipe".parse::<DeviceSelector>().unwrap(),
            DeviceSelector::Name("llvmpipe".into())
        );
    }

    #[test]
    fn preference_puts_discrete_first_and_opengl_last() {
        let mut info = wgpu::AdapterInfo::new(wgpu::DeviceType::Cpu, wgpu::Backend::Vulkan);
        let cpu_vulkan = preference(&info);
        info.device_type = wgpu::DeviceType::DiscreteGpu;
        let discrete = preference(&info);
        info.device_type = wgpu::DeviceType::IntegratedGpu;
        let integrated = preference(&info);
        info.backend = wgpu::Backend::Gl;
        let integrated_gl = preference(&info);
        assert!(discrete < integrated);
        assert!(integrated < cpu_vulkan);
        assert!(cpu_vulkan < integrated_gl);
    }

    /// On a CPU device, with two or more CPUs to run on, opening it pins the driver's new
    /// threads over at least two of them; asked not to, or on a GPU, it pins none.
    #[test]
    fn a_cpu_device_spreads_its_driver_threads_over_the_cores() {
        let gpu = match Gpu::new(&GpuOptions::default()) {
            Ok(gpu) => gpu,
            Err(RuntimeError::NoAdapter) => return, // a machine without any driver
            Err(e) => panic!("{e}"),
        };
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        let spread: std::collections::HashSet<usize> =
            gpu.pinned_threads().iter().map(|&(_, cpu)| cpu).collect();
        // Lavapipe starts a worker a core unless told otherwise (LP_NUM_THREADS); llvmpipe
        // behind OpenGL may share threads started by an earlier device of the process.
        let own_threads = gpu.info().backend == wgpu::Backend::Vulkan
            && std::env::var_os("LP_NUM_THREADS").is_none()
            && crate::affinity::pinning_setting(
                std::env::var("TESSERA_PIN_THREADS").ok().as_deref(),
            );
        if gpu.info().device_type == wgpu::DeviceType::Cpu && cfg!(target_os = "linux") {
            if cores >= 2 && own_threads {
                assert!(
                    gpu.pinned_threads().len() >= 2,
                    "{:?}",
                    gpu.pinned_threads()
                );
                assert!(spread.len() >= 2, "{:?}", gpu.pinned_threads());
            }
        } else {
            assert!(gpu.pinned_threads().is_empty());
        }
        let options = GpuOptions {
            no_thread_pinning: true,
            ..Default::default()
        };
        assert!(Gpu::new(&options).unwrap().pinned_threads().is_empty());
    }

    #[test]
    fn unknown_adapter_name_lists_what_exists() {
        match choose(&DeviceSelector::Name("no-such-device-xyz".into())) {
            Err(RuntimeError::AdapterNotFound { requested, .. }) => {
                assert_eq!(requested, "no-such-device-xyz")
            }
            Err(RuntimeError::NoAdapter) => {} // a machine without any driver
            other => panic!(
                "expected AdapterNotFound, got {:?}",
                other.map(|a| a.get_info())
            ),
        }
    }
}
