//! Hardware scanner: what this machine offers to the cluster.
//!
//! [`scan`] gathers one [`HardwareProfile`] — CPUs, memory, swap, thermal sensors, GPUs (NVIDIA
//! through NVML loaded at run time, AMD through sysfs, OpenCL ICDs), the operating system, and
//! the container facts that change what the node can really use: the cgroup CPU quota and memory
//! limit. The worker sends the profile in its `Register` message; `effective_cpus` is its default
//! slot count and the Möbius model reads cores and memory from it.
//!
//! Everything that parses text (cgroup files, `/proc/self/cgroup`, DMI strings) is a pure
//! function so it can be tested without the files; the functions that read the machine only glue
//! those parsers to the file system and never fail: a missing file means "not present here".

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use sysinfo::{Components, CpuRefreshKind, MemoryRefreshKind, RefreshKind, System};

/// A memory limit at or above this many bytes means "no limit" (cgroup v1 writes
/// `9223372036854771712` for an unlimited group).
const UNLIMITED_MEMORY_BYTES: u64 = 1 << 60;

/// Root of the cgroup file system.
const CGROUP_ROOT: &str = "/sys/fs/cgroup";

/// How long [`scan`] waits between two CPU readings to measure utilisation; sysinfo needs at
/// least `MINIMUM_CPU_UPDATE_INTERVAL` between them.
fn cpu_measure_interval() -> Duration {
    sysinfo::MINIMUM_CPU_UPDATE_INTERVAL.max(Duration::from_millis(200))
}

/// Everything the worker knows about its machine; the domain twin of the wire
/// `venom.v1.HardwareProfile` (same field names and meanings, converted in
/// [`crate::convert`]).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct HardwareProfile {
    pub cpu_physical_cores: u32,
    pub cpu_logical_cores: u32,
    pub cpu_arch: String,
    pub cpu_vendor: String,
    pub cpu_brand: String,
    pub cpu_frequency_mhz: u64,
    /// Whole-machine CPU utilisation measured over a short interval, 0–100.
    pub cpu_usage_percent: f64,
    pub memory_total_bytes: u64,
    pub memory_available_bytes: u64,
    pub swap_total_bytes: u64,
    pub swap_free_bytes: u64,
    pub gpus: Vec<GpuInfo>,
    pub thermal_sensors: Vec<ThermalSensor>,
    /// False means θ's thermal term is fixed at 1.0 on this node.
    pub has_thermal_sensor: bool,
    pub os_name: String,
    pub os_version: String,
    pub kernel_version: String,
    pub hostname: String,
    pub hyperthreading: bool,
    /// "none", or the hypervisor's name ("kvm", "vmware", …; "hypervisor" when unknown).
    pub virtualization: String,
    pub in_docker: bool,
    pub in_kubernetes: bool,
    /// cgroup CPU quota in cores (0 = unlimited).
    pub cgroup_cpu_quota: f64,
    /// cgroup memory limit in bytes (0 = unlimited).
    pub cgroup_memory_limit_bytes: u64,
    /// Logical CPUs usable here after the cgroup quota.
    pub effective_cpus: u32,
    /// Memory usable here after the cgroup limit.
    pub effective_memory_bytes: u64,
    /// File names of the OpenCL ICDs registered in `/etc/OpenCL/vendors`.
    pub opencl_icds: Vec<String>,
    /// Built for macOS, where Metal is always present.
    pub metal: bool,
}

/// One GPU.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct GpuInfo {
    /// "cuda", "rocm", "metal" or "opencl".
    pub backend: String,
    pub name: String,
    pub memory_total_bytes: u64,
    /// Index within its backend.
    pub index: u32,
}

/// One temperature sensor.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ThermalSensor {
    pub label: String,
    pub celsius: f64,
    /// The sensor's critical temperature, when it reports one.
    pub critical_celsius: Option<f64>,
}

/// Scans this machine. Blocks for about a quarter of a second to measure CPU utilisation; call
/// it from a blocking context (`tokio::task::spawn_blocking`) inside async code.
pub fn scan() -> HardwareProfile {
    let mut system = System::new_with_specifics(
        RefreshKind::nothing()
            .with_cpu(CpuRefreshKind::everything())
            .with_memory(MemoryRefreshKind::everything()),
    );
    std::thread::sleep(cpu_measure_interval());
    system.refresh_cpu_all();
    system.refresh_memory();

    let cpu_logical_cores = u32::try_from(system.cpus().len())
        .unwrap_or(u32::MAX)
        .max(1);
    let cpu_physical_cores = system
        .physical_core_count()
        .and_then(|n| u32::try_from(n).ok())
        .unwrap_or(cpu_logical_cores)
        .max(1);
    let first_cpu = system.cpus().first();
    let cpu_vendor = first_cpu
        .map(|cpu| cpu.vendor_id().trim().to_owned())
        .unwrap_or_default();
    let cpu_brand = first_cpu
        .map(|cpu| cpu.brand().trim().to_owned())
        .unwrap_or_default();
    let cpu_frequency_mhz = system
        .cpus()
        .iter()
        .map(|cpu| cpu.frequency())
        .max()
        .unwrap_or(0);

    let thermal_sensors = read_thermal_sensors(&Components::new_with_refreshed_list());
    let cgroup = CgroupLimits::detect();
    let memory_total_bytes = system.total_memory();

    let mut gpus = nvml::gpus();
    gpus.extend(rocm_gpus(Path::new("/sys/class/drm")));

    HardwareProfile {
        cpu_physical_cores,
        cpu_logical_cores,
        cpu_arch: System::cpu_arch(),
        cpu_vendor,
        cpu_brand,
        cpu_frequency_mhz,
        cpu_usage_percent: f64::from(system.global_cpu_usage()).clamp(0.0, 100.0),
        memory_total_bytes,
        memory_available_bytes: system.available_memory(),
        swap_total_bytes: system.total_swap(),
        swap_free_bytes: system.free_swap(),
        gpus,
        has_thermal_sensor: !thermal_sensors.is_empty(),
        thermal_sensors,
        os_name: System::name().unwrap_or_else(|| std::env::consts::OS.to_owned()),
        os_version: System::os_version()
            .or_else(System::long_os_version)
            .unwrap_or_default(),
        kernel_version: System::kernel_version().unwrap_or_default(),
        hostname: local_hostname(),
        hyperthreading: cpu_logical_cores > cpu_physical_cores,
        virtualization: detect_virtualization(
            &read_trimmed("/sys/class/dmi/id/product_name"),
            &read_trimmed("/sys/class/dmi/id/sys_vendor"),
            cpuinfo_has_hypervisor_flag(&read_trimmed("/proc/cpuinfo")),
        ),
        in_docker: Path::new("/.dockerenv").exists()
            || cgroup_mentions_docker(&read_trimmed("/proc/1/cgroup")),
        in_kubernetes: std::env::var_os("KUBERNETES_SERVICE_HOST").is_some(),
        cgroup_cpu_quota: cgroup.cpu_quota_cores.unwrap_or(0.0),
        cgroup_memory_limit_bytes: cgroup.memory_limit_bytes.unwrap_or(0),
        effective_cpus: effective_cpus(cpu_logical_cores, cgroup.cpu_quota_cores),
        effective_memory_bytes: effective_memory_bytes(
            memory_total_bytes,
            cgroup.memory_limit_bytes,
        ),
        opencl_icds: opencl_icds(Path::new("/etc/OpenCL/vendors")),
        metal: cfg!(target_os = "macos"),
    }
}

/// This machine's host name, or "localhost" when it cannot be read.
pub fn local_hostname() -> String {
    hostname::get()
        .ok()
        .and_then(|name| name.into_string().ok())
        .filter(|name| !name.is_empty())
        .or_else(System::host_name)
        .unwrap_or_else(|| "localhost".to_owned())
}

/// The temperature sensors that report a reading.
pub(crate) fn read_thermal_sensors(components: &Components) -> Vec<ThermalSensor> {
    components
        .iter()
        .filter_map(|component| {
            let celsius = f64::from(component.temperature()?);
            if !celsius.is_finite() {
                return None;
            }
            let critical_celsius = component
                .critical()
                .map(f64::from)
                .filter(|critical| critical.is_finite() && *critical > 0.0);
            Some(ThermalSensor {
                label: component.label().to_owned(),
                celsius,
                critical_celsius,
            })
        })
        .collect()
}

/// A file's text with surrounding whitespace removed, or "" when it cannot be read.
fn read_trimmed(path: impl AsRef<Path>) -> String {
    std::fs::read_to_string(path)
        .map(|text| text.trim().to_owned())
        .unwrap_or_default()
}

// ---------------------------------------------------------------------------
// Virtualization and containers
// ---------------------------------------------------------------------------

/// Names the hypervisor from the DMI product name and system vendor, falling back to the
/// `hypervisor` CPU flag; "none" on bare metal.
pub fn detect_virtualization(
    product_name: &str,
    sys_vendor: &str,
    hypervisor_flag: bool,
) -> String {
    let haystack = format!("{product_name} {sys_vendor}").to_ascii_lowercase();
    let known = [
        ("kvm", "kvm"),
        ("qemu", "qemu"),
        ("vmware", "vmware"),
        ("virtualbox", "virtualbox"),
        ("innotek", "virtualbox"),
        ("xen", "xen"),
        ("virtual machine", "hyperv"),
        ("hyper-v", "hyperv"),
        ("amazon ec2", "amazon"),
        ("google compute engine", "google"),
        ("bochs", "bochs"),
        ("parallels", "parallels"),
        ("openstack", "openstack"),
    ];
    if let Some((_, name)) = known.iter().find(|(needle, _)| haystack.contains(needle)) {
        return (*name).to_owned();
    }
    if hypervisor_flag {
        "hypervisor".to_owned()
    } else {
        "none".to_owned()
    }
}

/// True when a `flags` line of `/proc/cpuinfo` lists `hypervisor`.
pub fn cpuinfo_has_hypervisor_flag(cpuinfo: &str) -> bool {
    cpuinfo.lines().any(|line| {
        let mut parts = line.splitn(2, ':');
        let key = parts.next().unwrap_or_default().trim();
        let value = parts.next().unwrap_or_default();
        key == "flags" && value.split_whitespace().any(|flag| flag == "hypervisor")
    })
}

/// True when `/proc/1/cgroup` places init in a Docker cgroup.
pub fn cgroup_mentions_docker(proc_1_cgroup: &str) -> bool {
    proc_1_cgroup.contains("docker")
}

// ---------------------------------------------------------------------------
// cgroups
// ---------------------------------------------------------------------------

/// The cgroup limits that bound this process, from the nearest enclosing groups.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct CgroupLimits {
    /// CPU quota in cores; `None` when unlimited.
    pub cpu_quota_cores: Option<f64>,
    /// Memory limit in bytes; `None` when unlimited.
    pub memory_limit_bytes: Option<u64>,
    /// The file holding this group's memory use (`memory.current` or `memory.usage_in_bytes`).
    memory_usage_file: Option<PathBuf>,
    /// The group's `memory.stat`, for the reclaimable page cache.
    memory_stat_file: Option<PathBuf>,
}

impl CgroupLimits {
    /// Reads the limits of this process's cgroups (v2 first, then v1). Never fails: anything
    /// unreadable counts as unlimited.
    pub fn detect() -> Self {
        let proc_self_cgroup = read_trimmed("/proc/self/cgroup");
        let memberships = parse_proc_self_cgroup(&proc_self_cgroup);
        let root = Path::new(CGROUP_ROOT);
        if root.join("cgroup.controllers").exists() {
            let path = memberships
                .iter()
                .find(|membership| membership.controllers.is_empty())
                .map_or("/", |membership| membership.path.as_str());
            return Self::detect_v2(root, path);
        }
        Self::detect_v1(root, &memberships)
    }

    fn detect_v2(root: &Path, path: &str) -> Self {
        let dirs = group_dirs(root, path);
        let cpu_quota_cores = min_over(&dirs, |dir| {
            parse_cgroup_v2_cpu_max(&read_trimmed(dir.join("cpu.max")))
        });
        let memory_limit_bytes = min_over(&dirs, |dir| {
            parse_cgroup_memory_limit(&read_trimmed(dir.join("memory.max")))
        });
        let own = dirs.iter().find(|dir| dir.join("memory.current").exists());
        Self {
            cpu_quota_cores,
            memory_limit_bytes,
            memory_usage_file: own.map(|dir| dir.join("memory.current")),
            memory_stat_file: own.map(|dir| dir.join("memory.stat")),
        }
    }

    fn detect_v1(root: &Path, memberships: &[CgroupMembership]) -> Self {
        let path_of = |controller: &str| {
            memberships
                .iter()
                .find(|membership| membership.controllers.iter().any(|c| c == controller))
                .map_or("/", |membership| membership.path.as_str())
        };
        let cpu_mount = ["cpu", "cpu,cpuacct", "cpuacct,cpu"]
            .iter()
            .map(|name| root.join(name))
            .find(|dir| dir.exists());
        let cpu_quota_cores = cpu_mount.and_then(|mount| {
            min_over(&group_dirs(&mount, path_of("cpu")), |dir| {
                parse_cgroup_v1_cpu_quota(
                    &read_trimmed(dir.join("cpu.cfs_quota_us")),
                    &read_trimmed(dir.join("cpu.cfs_period_us")),
                )
            })
        });
        let memory_dirs = group_dirs(&root.join("memory"), path_of("memory"));
        let memory_limit_bytes = min_over(&memory_dirs, |dir| {
            parse_cgroup_memory_limit(&read_trimmed(dir.join("memory.limit_in_bytes")))
        });
        let own = memory_dirs
            .iter()
            .find(|dir| dir.join("memory.usage_in_bytes").exists());
        Self {
            cpu_quota_cores,
            memory_limit_bytes,
            memory_usage_file: own.map(|dir| dir.join("memory.usage_in_bytes")),
            memory_stat_file: own.map(|dir| dir.join("memory.stat")),
        }
    }

    /// Bytes still available inside the memory limit: limit − (usage − inactive page cache).
    /// `None` when there is no limit or the usage cannot be read.
    pub fn memory_available_bytes(&self) -> Option<u64> {
        let limit = self.memory_limit_bytes?;
        let usage: u64 = read_trimmed(self.memory_usage_file.as_ref()?)
            .parse()
            .ok()?;
        let inactive_file = self
            .memory_stat_file
            .as_ref()
            .map(|file| parse_memory_stat_inactive_file(&read_trimmed(file)))
            .unwrap_or(0);
        Some(limit.saturating_sub(usage.saturating_sub(inactive_file)))
    }
}

/// One line of `/proc/self/cgroup`: `hierarchy-id:controllers:path`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CgroupMembership {
    /// The v1 controllers of this hierarchy; empty for the v2 unified hierarchy.
    pub controllers: Vec<String>,
    pub path: String,
}

/// Parses `/proc/self/cgroup`.
pub fn parse_proc_self_cgroup(text: &str) -> Vec<CgroupMembership> {
    text.lines()
        .filter_map(|line| {
            let mut parts = line.splitn(3, ':');
            let _hierarchy_id = parts.next()?;
            let controllers = parts.next()?;
            let path = parts.next()?.trim();
            Some(CgroupMembership {
                controllers: controllers
                    .split(',')
                    .filter(|c| !c.is_empty())
                    .map(str::to_owned)
                    .collect(),
                path: path.to_owned(),
            })
        })
        .collect()
}

/// The directories of a cgroup and its ancestors under `mount`, nearest first. Ancestors
/// matter because the tightest limit anywhere above applies; a path that does not exist under
/// the mount (a container that sees only its own group) falls back to the mount itself.
fn group_dirs(mount: &Path, path: &str) -> Vec<PathBuf> {
    let mut dirs = Vec::new();
    let mut current = PathBuf::from(path.trim_start_matches('/'));
    loop {
        let dir = mount.join(&current);
        if dir.is_dir() {
            dirs.push(dir);
        }
        if !current.pop() {
            break;
        }
    }
    dirs
}

/// The smallest value `read` finds in any of `dirs`.
fn min_over<T: PartialOrd + Copy>(
    dirs: &[PathBuf],
    read: impl Fn(&Path) -> Option<T>,
) -> Option<T> {
    dirs.iter()
        .filter_map(|dir| read(dir))
        .fold(None, |best, value| match best {
            Some(best) if best <= value => Some(best),
            _ => Some(value),
        })
}

/// Parses cgroup v2 `cpu.max` (`"200000 100000"` → 2.0 cores; `"max 100000"` → unlimited).
pub fn parse_cgroup_v2_cpu_max(text: &str) -> Option<f64> {
    let mut parts = text.split_whitespace();
    let quota = parts.next()?;
    let period_us: f64 = parts.next().unwrap_or("100000").parse().ok()?;
    if quota == "max" {
        return None;
    }
    let quota_us: f64 = quota.parse().ok()?;
    cores_from_quota(quota_us, period_us)
}

/// Parses cgroup v1 `cpu.cfs_quota_us` and `cpu.cfs_period_us` (a quota of -1 is unlimited).
pub fn parse_cgroup_v1_cpu_quota(quota_us: &str, period_us: &str) -> Option<f64> {
    let quota_us: f64 = quota_us.trim().parse().ok()?;
    let period_us: f64 = period_us.trim().parse().ok()?;
    cores_from_quota(quota_us, period_us)
}

fn cores_from_quota(quota_us: f64, period_us: f64) -> Option<f64> {
    (quota_us > 0.0 && period_us > 0.0).then(|| quota_us / period_us)
}

/// Parses `memory.max` (v2) or `memory.limit_in_bytes` (v1); "max", 0 and absurdly large
/// values mean unlimited.
pub fn parse_cgroup_memory_limit(text: &str) -> Option<u64> {
    let limit: u64 = text.trim().parse().ok()?;
    (limit > 0 && limit < UNLIMITED_MEMORY_BYTES).then_some(limit)
}

/// The reclaimable page cache in a `memory.stat` (`inactive_file` in v2, `total_inactive_file`
/// in v1), 0 when absent.
pub fn parse_memory_stat_inactive_file(text: &str) -> u64 {
    let value_of = |wanted: &str| {
        text.lines().find_map(|line| {
            let mut parts = line.split_whitespace();
            (parts.next()? == wanted)
                .then(|| parts.next()?.parse::<u64>().ok())
                .flatten()
        })
    };
    value_of("total_inactive_file")
        .or_else(|| value_of("inactive_file"))
        .unwrap_or(0)
}

/// Logical CPUs usable under a quota: `min(logical, ceil(quota))`, at least 1.
pub fn effective_cpus(logical_cores: u32, quota_cores: Option<f64>) -> u32 {
    let logical_cores = logical_cores.max(1);
    match quota_cores {
        Some(quota) if quota > 0.0 => {
            let ceiling = quota.ceil().min(f64::from(u32::MAX));
            // The value is a whole number in 1..=u32::MAX after ceil and min.
            #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
            let quota_cpus = ceiling as u32;
            logical_cores.min(quota_cpus.max(1))
        }
        _ => logical_cores,
    }
}

/// Memory usable under a limit: `min(total, limit)`.
pub fn effective_memory_bytes(total_bytes: u64, limit_bytes: Option<u64>) -> u64 {
    limit_bytes.map_or(total_bytes, |limit| total_bytes.min(limit))
}

// ---------------------------------------------------------------------------
// GPUs
// ---------------------------------------------------------------------------

/// AMD GPUs (PCI vendor 0x1002) under `/sys/class/drm/card*/device`.
fn rocm_gpus(drm: &Path) -> Vec<GpuInfo> {
    let Ok(entries) = std::fs::read_dir(drm) else {
        return Vec::new();
    };
    let mut cards: Vec<(u32, PathBuf)> = entries
        .flatten()
        .filter_map(|entry| {
            let name = entry.file_name().into_string().ok()?;
            let number: u32 = name.strip_prefix("card")?.parse().ok()?;
            Some((number, entry.path().join("device")))
        })
        .collect();
    cards.sort();
    let mut gpus = Vec::new();
    for (_, device) in cards {
        if !is_amd_vendor(&read_trimmed(device.join("vendor"))) {
            continue;
        }
        let product = read_trimmed(device.join("product_name"));
        let name = if product.is_empty() {
            format!("AMD GPU {}", read_trimmed(device.join("device")))
        } else {
            product
        };
        gpus.push(GpuInfo {
            backend: "rocm".to_owned(),
            name,
            memory_total_bytes: read_trimmed(device.join("mem_info_vram_total"))
                .parse()
                .unwrap_or(0),
            index: u32::try_from(gpus.len()).unwrap_or(u32::MAX),
        });
    }
    gpus
}

/// True for AMD's PCI vendor id as sysfs writes it.
pub fn is_amd_vendor(vendor: &str) -> bool {
    vendor.trim().eq_ignore_ascii_case("0x1002")
}

/// The OpenCL ICD files registered on this machine, sorted.
fn opencl_icds(vendors: &Path) -> Vec<String> {
    let Ok(entries) = std::fs::read_dir(vendors) else {
        return Vec::new();
    };
    let mut icds: Vec<String> = entries
        .flatten()
        .filter_map(|entry| entry.file_name().into_string().ok())
        .filter(|name| name.ends_with(".icd"))
        .collect();
    icds.sort();
    icds
}

/// NVIDIA GPUs through NVML, loaded at run time so the worker neither links against nor
/// requires the driver.
mod nvml {
    use std::ffi::{c_char, c_int, c_uint, c_void, CStr};

    use libloading::{Library, Symbol};

    use super::GpuInfo;

    /// NVML's `NVML_SUCCESS`.
    const NVML_SUCCESS: c_int = 0;
    /// NVML's `NVML_DEVICE_NAME_V2_BUFFER_SIZE`.
    const NAME_BUFFER_BYTES: usize = 96;
    /// At most this many devices are listed, whatever the driver claims.
    const MAX_DEVICES: c_uint = 64;

    /// NVML's `nvmlMemory_t`.
    #[repr(C)]
    #[derive(Default)]
    struct NvmlMemory {
        total: u64,
        free: u64,
        used: u64,
    }

    type NvmlDevice = *mut c_void;
    type InitFn = unsafe extern "C" fn() -> c_int;
    type ShutdownFn = unsafe extern "C" fn() -> c_int;
    type GetCountFn = unsafe extern "C" fn(*mut c_uint) -> c_int;
    type GetHandleFn = unsafe extern "C" fn(c_uint, *mut NvmlDevice) -> c_int;
    type GetNameFn = unsafe extern "C" fn(NvmlDevice, *mut c_char, c_uint) -> c_int;
    type GetMemoryFn = unsafe extern "C" fn(NvmlDevice, *mut NvmlMemory) -> c_int;

    /// NVML's library name on Linux.
    const LIBRARY: &str = "libnvidia-ml.so.1";

    /// The NVIDIA GPUs NVML reports; empty when the library is absent or fails.
    pub(super) fn gpus() -> Vec<GpuInfo> {
        if !cfg!(unix) {
            return Vec::new();
        }
        query(LIBRARY).unwrap_or_default()
    }

    // SAFETY: loading the library runs its initialisers, which belong to the NVIDIA driver
    // installed on this machine (or whatever the caller names in tests). Every call below goes
    // to NVML with the C signatures from `nvml.h` (the `_v2`
    // entry points named explicitly), with pointers to live, correctly sized locals; the name
    // buffer's length is passed so NVML writes within it, and it is NUL-terminated by NVML on
    // success (and by us, defensively). `nvmlShutdown` pairs the successful `nvmlInit_v2`, and
    // the library stays loaded until after it.
    #[allow(unsafe_code)]
    pub(super) fn query(library: &str) -> Option<Vec<GpuInfo>> {
        let library = unsafe { Library::new(library) }.ok()?;
        let init: Symbol<InitFn> = unsafe { library.get(b"nvmlInit_v2\0") }.ok()?;
        let shutdown: Symbol<ShutdownFn> = unsafe { library.get(b"nvmlShutdown\0") }.ok()?;
        let get_count: Symbol<GetCountFn> =
            unsafe { library.get(b"nvmlDeviceGetCount_v2\0") }.ok()?;
        let get_handle: Symbol<GetHandleFn> =
            unsafe { library.get(b"nvmlDeviceGetHandleByIndex_v2\0") }.ok()?;
        let get_name: Symbol<GetNameFn> = unsafe { library.get(b"nvmlDeviceGetName\0") }.ok()?;
        let get_memory: Symbol<GetMemoryFn> =
            unsafe { library.get(b"nvmlDeviceGetMemoryInfo\0") }.ok()?;

        if unsafe { init() } != NVML_SUCCESS {
            return None;
        }
        let mut count: c_uint = 0;
        let mut gpus = Vec::new();
        if unsafe { get_count(&mut count) } == NVML_SUCCESS {
            for index in 0..count.min(MAX_DEVICES) {
                let mut device: NvmlDevice = std::ptr::null_mut();
                if unsafe { get_handle(index, &mut device) } != NVML_SUCCESS {
                    continue;
                }
                let mut name_buffer = [0 as c_char; NAME_BUFFER_BYTES];
                let name = if unsafe {
                    get_name(
                        device,
                        name_buffer.as_mut_ptr(),
                        NAME_BUFFER_BYTES as c_uint,
                    )
                } == NVML_SUCCESS
                {
                    name_buffer[NAME_BUFFER_BYTES - 1] = 0;
                    unsafe { CStr::from_ptr(name_buffer.as_ptr()) }
                        .to_string_lossy()
                        .into_owned()
                } else {
                    format!("NVIDIA GPU {index}")
                };
                let mut memory = NvmlMemory::default();
                let memory_total_bytes =
                    if unsafe { get_memory(device, &mut memory) } == NVML_SUCCESS {
                        memory.total
                    } else {
                        0
                    };
                gpus.push(GpuInfo {
                    backend: "cuda".to_owned(),
                    name,
                    memory_total_bytes,
                    index,
                });
            }
        }
        unsafe { shutdown() };
        Some(gpus)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cgroup_v2_cpu_max_parses_quota_and_unlimited() {
        assert_eq!(parse_cgroup_v2_cpu_max("200000 100000"), Some(2.0));
        assert_eq!(parse_cgroup_v2_cpu_max("150000 100000\n"), Some(1.5));
        assert_eq!(parse_cgroup_v2_cpu_max("50000"), Some(0.5));
        assert_eq!(parse_cgroup_v2_cpu_max("max 100000"), None);
        assert_eq!(parse_cgroup_v2_cpu_max(""), None);
        assert_eq!(parse_cgroup_v2_cpu_max("garbage 100000"), None);
    }

    #[test]
    fn cgroup_v1_cpu_quota_parses_quota_and_unlimited() {
        assert_eq!(parse_cgroup_v1_cpu_quota("400000", "100000"), Some(4.0));
        assert_eq!(parse_cgroup_v1_cpu_quota("-1", "100000"), None);
        assert_eq!(parse_cgroup_v1_cpu_quota("50000", "0"), None);
        assert_eq!(parse_cgroup_v1_cpu_quota("", ""), None);
    }

    #[test]
    fn memory_limit_ignores_unlimited_markers() {
        assert_eq!(parse_cgroup_memory_limit("536870912\n"), Some(536_870_912));
        assert_eq!(parse_cgroup_memory_limit("max"), None);
        assert_eq!(parse_cgroup_memory_limit("9223372036854771712"), None);
        assert_eq!(parse_cgroup_memory_limit("0"), None);
    }

    #[test]
    fn memory_stat_reads_inactive_file_for_both_versions() {
        let v2 = "anon 100\nfile 5000\ninactive_file 4096\nactive_file 10\n";
        assert_eq!(parse_memory_stat_inactive_file(v2), 4096);
        let v1 = "cache 10\ninactive_file 7\ntotal_inactive_file 8192\n";
        assert_eq!(parse_memory_stat_inactive_file(v1), 8192);
        assert_eq!(parse_memory_stat_inactive_file("anon 1\n"), 0);
    }

    #[test]
    fn effective_cpus_rounds_the_quota_up_and_never_exceeds_logical() {
        assert_eq!(effective_cpus(8, None), 8);
        assert_eq!(effective_cpus(8, Some(1.5)), 2);
        assert_eq!(effective_cpus(8, Some(2.0)), 2);
        assert_eq!(effective_cpus(4, Some(16.0)), 4);
        assert_eq!(effective_cpus(4, Some(0.1)), 1);
        assert_eq!(effective_cpus(0, None), 1);
    }

    #[test]
    fn effective_memory_is_the_smaller_of_total_and_limit() {
        assert_eq!(effective_memory_bytes(16 << 30, None), 16 << 30);
        assert_eq!(effective_memory_bytes(16 << 30, Some(2 << 30)), 2 << 30);
        assert_eq!(effective_memory_bytes(1 << 30, Some(2 << 30)), 1 << 30);
    }

    #[test]
    fn proc_self_cgroup_parses_v1_and_v2_lines() {
        let text = "4:memory:/docker/abc\n2:cpu,cpuacct:/docker/abc\n0::/user.slice/x.scope\n";
        let memberships = parse_proc_self_cgroup(text);
        assert_eq!(memberships.len(), 3);
        assert_eq!(memberships[0].controllers, vec!["memory".to_owned()]);
        assert_eq!(memberships[0].path, "/docker/abc");
        assert_eq!(
            memberships[1].controllers,
            vec!["cpu".to_owned(), "cpuacct".to_owned()]
        );
        assert!(memberships[2].controllers.is_empty());
        assert_eq!(memberships[2].path, "/user.slice/x.scope");
    }

    #[test]
    fn group_dirs_takes_the_tightest_limit_of_the_group_and_its_ancestors() {
        let mount = tempfile::tempdir().expect("temp dir");
        let group = mount.path().join("outer/inner");
        std::fs::create_dir_all(&group).expect("create cgroup dirs");
        std::fs::write(mount.path().join("outer/memory.max"), "1073741824\n").expect("write");
        std::fs::write(group.join("memory.max"), "max\n").expect("write");
        std::fs::write(group.join("cpu.max"), "300000 100000\n").expect("write");
        std::fs::write(mount.path().join("outer/cpu.max"), "max 100000\n").expect("write");

        let limits = CgroupLimits::detect_v2(mount.path(), "/outer/inner");
        assert_eq!(limits.memory_limit_bytes, Some(1 << 30));
        assert_eq!(limits.cpu_quota_cores, Some(3.0));

        // A path the mount does not show (a container seeing only its own group) falls back
        // to the mount's own files.
        std::fs::write(mount.path().join("memory.max"), "2147483648\n").expect("write");
        let limits = CgroupLimits::detect_v2(mount.path(), "/docker/elsewhere");
        assert_eq!(limits.memory_limit_bytes, Some(2 << 30));
        assert_eq!(limits.cpu_quota_cores, None);
    }

    #[test]
    fn cgroup_memory_available_subtracts_usage_but_not_inactive_cache() {
        let mount = tempfile::tempdir().expect("temp dir");
        std::fs::write(mount.path().join("memory.max"), "1000000\n").expect("write");
        std::fs::write(mount.path().join("memory.current"), "600000\n").expect("write");
        std::fs::write(
            mount.path().join("memory.stat"),
            "anon 1\ninactive_file 100000\n",
        )
        .expect("write");
        let limits = CgroupLimits::detect_v2(mount.path(), "/");
        assert_eq!(limits.memory_available_bytes(), Some(500_000));
    }

    #[test]
    fn virtualization_is_named_from_dmi_or_the_cpu_flag() {
        assert_eq!(detect_virtualization("KVM", "Red Hat", false), "kvm");
        assert_eq!(
            detect_virtualization("Standard PC (Q35)", "QEMU", true),
            "qemu"
        );
        assert_eq!(
            detect_virtualization("VMware Virtual Platform", "VMware, Inc.", true),
            "vmware"
        );
        assert_eq!(
            detect_virtualization("Virtual Machine", "Microsoft Corporation", true),
            "hyperv"
        );
        assert_eq!(detect_virtualization("", "", true), "hypervisor");
        assert_eq!(
            detect_virtualization("ThinkPad X1", "LENOVO", false),
            "none"
        );
    }

    #[test]
    fn cpuinfo_hypervisor_flag_is_found_only_in_flags() {
        let virtual_cpu = "processor\t: 0\nflags\t\t: fpu vme hypervisor lahf_lm\n";
        let metal_cpu =
            "processor\t: 0\nflags\t\t: fpu vme lahf_lm\nmodel name\t: hypervisor-ish\n";
        assert!(cpuinfo_has_hypervisor_flag(virtual_cpu));
        assert!(!cpuinfo_has_hypervisor_flag(metal_cpu));
    }

    #[test]
    fn docker_is_detected_from_init_cgroup() {
        assert!(cgroup_mentions_docker("12:memory:/docker/0123abcd\n"));
        assert!(!cgroup_mentions_docker("0::/init.scope\n"));
    }

    #[test]
    fn amd_gpus_are_listed_from_sysfs() {
        let drm = tempfile::tempdir().expect("temp dir");
        let amd = drm.path().join("card1/device");
        let nvidia = drm.path().join("card0/device");
        let connector = drm.path().join("card1-DP-1/device");
        for dir in [&amd, &nvidia, &connector] {
            std::fs::create_dir_all(dir).expect("create");
        }
        std::fs::write(amd.join("vendor"), "0x1002\n").expect("write");
        std::fs::write(amd.join("device"), "0x73bf\n").expect("write");
        std::fs::write(amd.join("mem_info_vram_total"), "17163091968\n").expect("write");
        std::fs::write(nvidia.join("vendor"), "0x10de\n").expect("write");
        std::fs::write(connector.join("vendor"), "0x1002\n").expect("write");

        let gpus = rocm_gpus(drm.path());
        assert_eq!(gpus.len(), 1, "{gpus:?}");
        assert_eq!(gpus[0].backend, "rocm");
        assert_eq!(gpus[0].name, "AMD GPU 0x73bf");
        assert_eq!(gpus[0].memory_total_bytes, 17_163_091_968);
        assert_eq!(gpus[0].index, 0);
    }

    #[test]
    fn a_missing_nvml_library_means_no_nvidia_gpus() {
        assert_eq!(nvml::query("/nonexistent/libnvidia-ml.so.1"), None);
    }

    /// A stand-in for NVML with two devices, to exercise the FFI without a GPU.
    const FAKE_NVML_C: &str = r#"
        #include <string.h>
        typedef struct { unsigned long long total, free, used; } nvmlMemory_t;
        static int initialised = 0;
        int nvmlInit_v2(void) { initialised = 1; return 0; }
        int nvmlShutdown(void) { initialised = 0; return 0; }
        int nvmlDeviceGetCount_v2(unsigned int *count) { *count = 2; return initialised ? 0 : 1; }
        int nvmlDeviceGetHandleByIndex_v2(unsigned int index, void **device) {
            *device = (void *)(unsigned long)(index + 1); return 0;
        }
        int nvmlDeviceGetName(void *device, char *name, unsigned int length) {
            const char *names[] = { "Fake H100", "Fake A100" };
            strncpy(name, names[(unsigned long)device - 1], length); return 0;
        }
        int nvmlDeviceGetMemoryInfo(void *device, nvmlMemory_t *memory) {
            if ((unsigned long)device == 2) return 999; /* an error for the second device */
            memory->total = 80ULL << 30; memory->free = 1; memory->used = 2; return 0;
        }
    "#;

    #[test]
    fn nvml_devices_are_read_through_the_c_interface() {
        let dir = tempfile::tempdir().expect("temp dir");
        let source = dir.path().join("fake_nvml.c");
        let library = dir.path().join("libfake-nvml.so");
        std::fs::write(&source, FAKE_NVML_C).expect("write the fake NVML");
        let compiled = std::process::Command::new("cc")
            .args(["-shared", "-fPIC", "-o"])
            .arg(&library)
            .arg(&source)
            .status();
        match compiled {
            Ok(status) if status.success() => {}
            // Without a C compiler there is nothing to load; the missing-library test above
            // still covers the fallback.
            _ => return eprintln!("no C compiler; skipping the fake NVML check"),
        }
        let gpus = nvml::query(library.to_str().expect("UTF-8 temp path")).expect("NVML loads");
        assert_eq!(
            gpus,
            vec![
                GpuInfo {
                    backend: "cuda".to_owned(),
                    name: "Fake H100".to_owned(),
                    memory_total_bytes: 80 << 30,
                    index: 0
                },
                GpuInfo {
                    backend: "cuda".to_owned(),
                    name: "Fake A100".to_owned(),
                    memory_total_bytes: 0,
                    index: 1
                },
            ]
        );
    }

    #[test]
    fn opencl_icds_lists_only_icd_files() {
        let vendors = tempfile::tempdir().expect("temp dir");
        std::fs::write(vendors.path().join("nvidia.icd"), "libnvidia-opencl.so.1\n")
            .expect("write");
        std::fs::write(vendors.path().join("amdocl64.icd"), "libamdocl64.so\n").expect("write");
        std::fs::write(vendors.path().join("README"), "not an icd\n").expect("write");
        assert_eq!(
            opencl_icds(vendors.path()),
            vec!["amdocl64.icd", "nvidia.icd"]
        );
        assert!(opencl_icds(&vendors.path().join("missing")).is_empty());
    }

    #[test]
    fn scan_reports_a_consistent_profile_of_this_machine() {
        let profile = scan();
        assert!(profile.cpu_logical_cores >= 1);
        assert!(profile.cpu_physical_cores >= 1);
        assert_eq!(
            profile.hyperthreading,
            profile.cpu_logical_cores > profile.cpu_physical_cores
        );
        assert!(profile.effective_cpus >= 1 && profile.effective_cpus <= profile.cpu_logical_cores);
        assert!(profile.memory_total_bytes > 0);
        assert!(profile.effective_memory_bytes <= profile.memory_total_bytes);
        assert!((0.0..=100.0).contains(&profile.cpu_usage_percent));
        assert_eq!(
            profile.has_thermal_sensor,
            !profile.thermal_sensors.is_empty()
        );
        assert!(!profile.hostname.is_empty());
        assert!(!profile.virtualization.is_empty());
        assert_eq!(profile.metal, cfg!(target_os = "macos"));

        let wire = crate::convert::hardware_profile(&profile);
        assert_eq!(wire.cpu_logical_cores, profile.cpu_logical_cores);
        assert_eq!(wire.effective_memory_bytes, profile.effective_memory_bytes);
        assert_eq!(crate::convert::hardware_profile_from_wire(&wire), profile);
        let json = serde_json::to_string(&profile).expect("serialize");
        let mut back: HardwareProfile = serde_json::from_str(&json).expect("deserialize");
        // Decimal text may move a float by one ulp; compare floats by value, the rest exactly.
        assert!((back.cpu_usage_percent - profile.cpu_usage_percent).abs() < 1e-9);
        back.cpu_usage_percent = profile.cpu_usage_percent;
        for (got, want) in back
            .thermal_sensors
            .iter_mut()
            .zip(&profile.thermal_sensors)
        {
            assert!((got.celsius - want.celsius).abs() < 1e-9);
            got.celsius = want.celsius;
            got.critical_celsius = want.critical_celsius;
        }
        assert_eq!(back, profile);
    }
}
