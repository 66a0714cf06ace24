//! GPU discovery through NVML (`libnvidia-ml`, loaded at run time): what a device pool can
//! be sized from before any CUDA context exists.

use crate::error::StorageError;
use crate::layout::LayoutConfig;

/// One GPU as NVML reports it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GpuInfo {
    /// NVML index (the CUDA ordinal when `CUDA_DEVICE_ORDER=PCI_BUS_ID`).
    pub index: u32,
    /// Product name.
    pub name: String,
    /// Total memory in bytes.
    pub total_bytes: u64,
    /// Free memory in bytes.
    pub free_bytes: u64,
    /// Current PCIe link generation, where reported.
    pub pcie_generation: Option<u32>,
    /// Current PCIe link width (lanes), where reported.
    pub pcie_width: Option<u32>,
}

/// Lists the GPUs NVML sees. [`StorageError::Nvml`] where the library is missing (a
/// machine without the NVIDIA driver) and [`StorageError::CudaDisabled`] in a build without
/// the `cuda` feature.
///
/// ```
/// match kvbm_physical::discover_gpus() {
///     Ok(gpus) => gpus.iter().for_each(|g| println!("{}: {} free", g.name, g.free_bytes)),
///     Err(e) => println!("no GPU discovery: {e}"), // typed, never a panic
/// }
/// ```
pub fn discover_gpus() -> Result<Vec<GpuInfo>, StorageError> {
    imp::discover()
}

/// `config` with `num_blocks` set so the pool fills `fraction` of GPU `index`'s free memory
/// (see [`LayoutConfig::sized_for`]).
pub fn device_pool_config(
    config: LayoutConfig,
    index: u32,
    fraction: f64,
) -> Result<LayoutConfig, crate::LayoutError> {
    let gpus = discover_gpus()?;
    let gpu = gpus
        .iter()
        .find(|g| g.index == index)
        .ok_or_else(|| StorageError::NoCudaDevice(format!("NVML has no GPU {index}")))?;
    // Free memory beyond usize (32-bit hosts) is more than any pool can use anyway.
    config.sized_for(
        usize::try_from(gpu.free_bytes).unwrap_or(usize::MAX),
        fraction,
    )
}

#[cfg(feature = "cuda")]
mod imp {
    use nvml_wrapper::Nvml;

    use super::GpuInfo;
    use crate::error::StorageError;

    pub(super) fn discover() -> Result<Vec<GpuInfo>, StorageError> {
        let nvml_err = |e: nvml_wrapper::error::NvmlError| StorageError::Nvml(e.to_string());
        let nvml = Nvml::init().map_err(nvml_err)?;
        let count = nvml.device_count().map_err(nvml_err)?;
        (0..count)
            .map(|index| {
                let device = nvml.device_by_index(index).map_err(nvml_err)?;
                let memory = device.memory_info().map_err(nvml_err)?;
                Ok(GpuInfo {
                    index,
                    name: device.name().map_err(nvml_err)?,
                    total_bytes: memory.total,
                    free_bytes: memory.free,
                    pcie_generation: device.current_pcie_link_gen().ok(),
                    pcie_width: device.current_pcie_link_width().ok(),
                })
            })
            .collect()
    }
}

#[cfg(not(feature = "cuda"))]
mod imp {
    use super::GpuInfo;
    use crate::error::StorageError;

    pub(super) fn discover() -> Result<Vec<GpuInfo>, StorageError> {
        Err(StorageError::CudaDisabled)
    }
}
