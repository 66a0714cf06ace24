//! GPU discovery through NVML (`libnvidia-ml`, loaded at run time): what a device pool can
//! be sized from before any CUDA context exists.
//!
//! NVML numbers GPUs in PCI order, over every GPU of the machine; CUDA numbers only the
//! GPUs `CUDA_VISIBLE_DEVICES` leaves visible, in its order (fastest first unless
//! `CUDA_DEVICE_ORDER=PCI_BUS_ID`). The two are tied by PCI bus id: [`GpuInfo::cuda_ordinal`]
//! is the CUDA ordinal of the GPU with the same bus id, if CUDA sees it.

use crate::error::StorageError;
use crate::layout::LayoutConfig;

/// One GPU as NVML reports it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GpuInfo {
    /// NVML index (all GPUs of the machine, in PCI order). Not a CUDA ordinal: see
    /// [`cuda_ordinal`](Self::cuda_ordinal).
    pub index: u32,
    /// The CUDA device ordinal of this GPU (matched by PCI bus id), or `None` when CUDA does
    /// not see it (hidden by `CUDA_VISIBLE_DEVICES`, or no usable CUDA driver).
    pub cuda_ordinal: Option<usize>,
    /// PCI bus id as NVML reports it (e.g. `00000000:3B:00.0`).
    pub pci_bus_id: String,
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

/// Lists the GPUs NVML sees, each with its CUDA ordinal where CUDA sees it.
/// [`StorageError::Nvml`] where the library is missing (a machine without the NVIDIA
/// driver) and [`StorageError::CudaDisabled`] in a build without the `cuda` feature.
///
/// ```
/// match kvbm_physical::discover_gpus() {
///     Ok(gpus) => gpus.iter().for_each(|g| println!("{} (CUDA {:?}): {} free", g.name, g.cuda_ordinal, g.free_bytes)),
///     Err(e) => println!("no GPU discovery: {e}"), // typed, never a panic
/// }
/// ```
pub fn discover_gpus() -> Result<Vec<GpuInfo>, StorageError> {
    imp::discover()
}

/// `config` with `num_blocks` set so the pool fills `fraction` of the free memory of the GPU
/// with CUDA ordinal `ordinal` (see [`LayoutConfig::sized_for`]): the GPU that
/// [`CudaDevice::open(ordinal)`](crate::CudaDevice::open) opens, found in NVML by PCI bus id.
pub fn device_pool_config(
    config: LayoutConfig,
    ordinal: usize,
    fraction: f64,
) -> Result<LayoutConfig, crate::LayoutError> {
    let gpus = discover_gpus()?;
    let gpu = gpus
        .iter()
        .find(|g| g.cuda_ordinal == Some(ordinal))
        .ok_or_else(|| {
            StorageError::NoCudaDevice(format!("no GPU seen by NVML has CUDA ordinal {ordinal}"))
        })?;
    // Free memory beyond usize (32-bit hosts) is more than any pool can use anyway.
    config.sized_for(
        usize::try_from(gpu.free_bytes).unwrap_or(usize::MAX),
        fraction,
    )
}

/// A PCI address: domain, bus, device, function.
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
type PciAddress = (u32, u8, u8, u8);

/// Parses `DOMAIN:BUS:DEVICE.FUNCTION` in hex, any case, any domain width (NVML writes
/// `00000000:3B:00.0`, CUDA `0000:3b:00.0`).
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
fn parse_pci_bus_id(id: &str) -> Option<PciAddress> {
    let mut parts = id.trim().trim_end_matches('\0').split(':');
    let (domain, bus, rest) = (parts.next()?, parts.next()?, parts.next()?);
    if parts.next().is_some() {
        return None;
    }
    let (device, function) = rest.split_once('.')?;
    Some((
        u32::from_str_radix(domain, 16).ok()?,
        u8::from_str_radix(bus, 16).ok()?,
        u8::from_str_radix(device, 16).ok()?,
        u8::from_str_radix(function, 16).ok()?,
    ))
}

/// For each NVML GPU (by bus id), the CUDA ordinal whose bus id (`cuda[ordinal]`) names the
/// same PCI address, if any.
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
fn cuda_ordinals(nvml: &[&str], cuda: &[&str]) -> Vec<Option<usize>> {
    let cuda: Vec<Option<PciAddress>> = cuda.iter().map(|id| parse_pci_bus_id(id)).collect();
    nvml.iter()
        .map(|id| {
            let address = parse_pci_bus_id(id)?;
            cuda.iter().position(|c| *c == Some(address))
        })
        .collect()
}

/// The PCI bus id of CUDA device `ordinal` (`cuDeviceGetPCIBusId`).
#[cfg(feature = "cuda")]
pub(crate) fn cuda_pci_bus_id(ordinal: usize) -> Result<String, StorageError> {
    use cudarc::driver::sys;
    let failed = |call: &'static str| {
        move |e: cudarc::driver::DriverError| StorageError::Cuda {
            call,
            error: e.to_string(),
        }
    };
    // SAFETY: only tries to load the library (cudarc panics on first use when it is
    // missing, so the probe comes first).
    if !unsafe { sys::is_culib_present() } {
        return Err(StorageError::NoCudaDevice(
            "the CUDA driver library (libcuda.so) was not found".into(),
        ));
    }
    let ordinal = i32::try_from(ordinal)
        .map_err(|_| StorageError::NoCudaDevice(format!("no CUDA device {ordinal}")))?;
    let mut device: sys::CUdevice = 0;
    let mut buf = [0 as std::ffi::c_char; 64];
    // SAFETY: plain driver queries with live out-pointers; `buf` holds `buf.len()` bytes.
    unsafe {
        sys::cuInit(0).result().map_err(failed("cuInit"))?;
        sys::cuDeviceGet(&mut device, ordinal)
            .result()
            .map_err(failed("cuDeviceGet"))?;
        sys::cuDeviceGetPCIBusId(buf.as_mut_ptr(), buf.len() as i32, device)
            .result()
            .map_err(failed("cuDeviceGetPCIBusId"))?;
    }
    let bytes: Vec<u8> = buf
        .iter()
        .take_while(|&&c| c != 0)
        .map(|&c| c as u8)
        .collect();
    Ok(String::from_utf8_lossy(&bytes).into_owned())
}

#[cfg(feature = "cuda")]
mod imp {
    use nvml_wrapper::Nvml;

    use super::GpuInfo;
    use crate::error::StorageError;

    /// The PCI bus ids of the GPUs CUDA sees, by ordinal; empty without a usable driver.
    fn cuda_bus_ids() -> Vec<String> {
        // SAFETY: only tries to load the library.
        if !unsafe { cudarc::driver::sys::is_culib_present() } {
            return Vec::new();
        }
        let count = match cudarc::driver::CudaContext::device_count() {
            Ok(n) => n.max(0) as usize,
            Err(e) => {
                tracing::debug!(error = %e, "CUDA sees no device; no GPU gets a CUDA ordinal");
                return Vec::new();
            }
        };
        (0..count)
            .map(|ordinal| super::cuda_pci_bus_id(ordinal).unwrap_or_default())
            .collect()
    }

    pub(super) fn discover() -> Result<Vec<GpuInfo>, StorageError> {
        let nvml_err = |e: nvml_wrapper::error::NvmlError| StorageError::Nvml(e.to_string());
        let nvml = Nvml::init().map_err(nvml_err)?;
        let count = nvml.device_count().map_err(nvml_err)?;
        let mut gpus = (0..count)
            .map(|index| {
                let device = nvml.device_by_index(index).map_err(nvml_err)?;
                let memory = device.memory_info().map_err(nvml_err)?;
                Ok(GpuInfo {
                    index,
                    cuda_ordinal: None,
                    pci_bus_id: device.pci_info().map_err(nvml_err)?.bus_id,
                    name: device.name().map_err(nvml_err)?,
                    total_bytes: memory.total,
                    free_bytes: memory.free,
                    pcie_generation: device.current_pcie_link_gen().ok(),
                    pcie_width: device.current_pcie_link_width().ok(),
                })
            })
            .collect::<Result<Vec<_>, StorageError>>()?;
        let cuda = cuda_bus_ids();
        let cuda: Vec<&str> = cuda.iter().map(String::as_str).collect();
        let nvml_ids: Vec<&str> = gpus.iter().map(|g| g.pci_bus_id.as_str()).collect();
        let ordinals = super::cuda_ordinals(&nvml_ids, &cuda);
        for (gpu, ordinal) in gpus.iter_mut().zip(ordinals) {
            gpu.cuda_ordinal = ordinal;
        }
        Ok(gpus)
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bus_ids_parse_in_both_spellings() {
        assert_eq!(parse_pci_bus_id("00000000:3B:00.0"), Some((0, 0x3b, 0, 0)));
        assert_eq!(parse_pci_bus_id("0000:3b:00.0"), Some((0, 0x3b, 0, 0)));
        assert_eq!(parse_pci_bus_id("0001:DB:1F.7\0"), Some((1, 0xdb, 0x1f, 7)));
        for bad in [
            "",
            "3b:00.0",
            "0000:3b:00",
            "0000:3b:00.0:1",
            "zz:3b:00.0",
            "0:100:0.0",
        ] {
            assert_eq!(parse_pci_bus_id(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn nvml_indices_map_to_cuda_ordinals_by_bus_id() {
        // Four GPUs, NVML in PCI order.
        let nvml = [
            "00000000:18:00.0",
            "00000000:3B:00.0",
            "00000000:86:00.0",
            "00000000:AF:00.0",
        ];
        // No CUDA_VISIBLE_DEVICES, PCI order: the identity.
        let all = [
            "0000:18:00.0",
            "0000:3b:00.0",
            "0000:86:00.0",
            "0000:af:00.0",
        ];
        assert_eq!(
            cuda_ordinals(&nvml, &all),
            vec![Some(0), Some(1), Some(2), Some(3)]
        );
        // CUDA_VISIBLE_DEVICES=2,0: CUDA ordinal 0 is NVML index 2; 1 and 3 are hidden.
        let visible = ["0000:86:00.0", "0000:18:00.0"];
        assert_eq!(
            cuda_ordinals(&nvml, &visible),
            vec![Some(1), None, Some(0), None]
        );
        // Without a usable CUDA driver nothing maps.
        assert_eq!(cuda_ordinals(&nvml, &[]), vec![None; 4]);
        // An unparsable id maps to nothing rather than to a wrong device.
        assert_eq!(cuda_ordinals(&["garbage"], &["garbage"]), vec![None]);
    }
}
