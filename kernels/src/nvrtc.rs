//! Compiling the kernel sources with NVRTC, loaded at run time: to PTX, and to a CUBIN for
//! one real architecture (what the runtime loads, per device, cached). The same path serves
//! the runtime and CI (compile-only, no GPU).

use std::ffi::{CStr, CString};
use std::path::PathBuf;
use std::sync::OnceLock;

use cudarc::nvrtc::{result, sys};

use crate::{KernelError, KernelSource};

/// PTX text and NVRTC's log (empty when the compiler had nothing to say).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Compiled {
    /// The PTX module.
    pub ptx: String,
    /// Warnings and notes; kvbm's CI fails on any.
    pub log: String,
}

/// Whether the NVRTC library can be loaded, with its version.
///
/// ```
/// match kvbm_kernels::nvrtc::version() {
///     Ok((major, minor)) => println!("NVRTC {major}.{minor}"),
///     Err(e) => println!("{e}"), // typed error, never a panic
/// }
/// ```
pub fn version() -> Result<(i32, i32), KernelError> {
    probe()?;
    let (mut major, mut minor) = (0, 0);
    // SAFETY: the library is present; the out-pointers are live locals.
    let status = unsafe { sys::nvrtcVersion(&mut major, &mut minor) };
    if status != sys::nvrtcResult::NVRTC_SUCCESS {
        return Err(KernelError::NvrtcMissing(format!(
            "nvrtcVersion: {status:?}"
        )));
    }
    Ok((major, minor))
}

/// Where NVRTC usually lives when it is not on the loader's path: `$KVBM_NVRTC` (a file),
/// then `$CUDA_HOME/lib64` and the default toolkit directories.
///
/// NVRTC opens its builtins library (`libnvrtc-builtins.so.13.*`) by soname when it first
/// compiles, from the loader's path, not from its own directory: loaded here by path, it
/// would fail every compile ("failed to open libnvrtc-builtins.so.13.0"). So the builtins of
/// the same directory are loaded first, by path (the loader then resolves NVRTC's soname
/// lookup to them).
fn preload() {
    static DONE: OnceLock<Vec<libloading::Library>> = OnceLock::new();
    DONE.get_or_init(|| {
        let mut candidates: Vec<PathBuf> = Vec::new();
        if let Some(file) = std::env::var_os("KVBM_NVRTC") {
            candidates.push(file.into());
        }
        let dirs = std::env::var_os("CUDA_HOME")
            .map(|home| PathBuf::from(home).join("lib64"))
            .into_iter()
            .chain(
                [
                    "/usr/local/cuda/lib64",
                    "/usr/local/cuda/targets/x86_64-linux/lib",
                ]
                .map(PathBuf::from),
            );
        candidates.extend(dirs.map(|d| d.join("libnvrtc.so.13")));
        candidates
            .into_iter()
            .find_map(|path| {
                if !path.exists() {
                    return None;
                }
                let mut held: Vec<libloading::Library> = builtins_beside(&path)
                    .into_iter()
                    // SAFETY: loading the builtins runs only their initialisers; the handle
                    // is kept for the life of the process.
                    .filter_map(|b| unsafe { libloading::Library::new(b) }.ok())
                    .collect();
                // SAFETY: loading NVRTC runs only its initialisers. Once loaded by path, the
                // loader resolves cudarc's later `dlopen("libnvrtc.so.13")` to it by soname.
                // The handle is kept for the life of the process.
                let nvrtc = unsafe { libloading::Library::new(&path) }.ok()?;
                held.push(nvrtc);
                Some(held)
            })
            .unwrap_or_default()
    });
}

/// The builtins libraries (`libnvrtc-builtins.so.13*`) in `nvrtc`'s directory, the most
/// specific name first (`.so.13.0` before `.so.13`).
fn builtins_beside(nvrtc: &std::path::Path) -> Vec<PathBuf> {
    let Some(dir) = nvrtc.parent() else {
        return Vec::new();
    };
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut found: Vec<PathBuf> = entries
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("libnvrtc-builtins.so.13"))
        })
        .collect();
    found.sort_by_key(|p| std::cmp::Reverse(p.as_os_str().len()));
    found
}

fn probe() -> Result<(), KernelError> {
    preload();
    // SAFETY: only tries to load the library (cudarc panics on first use when it is missing,
    // so the probe comes first).
    if unsafe { sys::is_culib_present() } {
        Ok(())
    } else {
        Err(KernelError::NvrtcMissing(
            "libnvrtc.so.13 not found on the loader path, $KVBM_NVRTC, $CUDA_HOME/lib64 or \
             /usr/local/cuda/lib64 (pip install nvidia-cuda-nvrtc==13.0.*, then put \
             nvidia/cu13/lib on LD_LIBRARY_PATH)"
                .into(),
        ))
    }
}

/// Compiles `source` to PTX for `arch` (e.g. `"compute_90"`).
pub fn compile(source: &KernelSource, arch: &str) -> Result<Compiled, KernelError> {
    let (program, log) = build(source, arch)?;
    // SAFETY: compiled successfully (`build`).
    let ptx = unsafe { result::get_ptx(program.0) }
        .map(|raw| text(&raw))
        .map_err(|e| compile_error(source, arch, format!("nvrtcGetPTX: {e:?}")))?;
    Ok(Compiled { ptx, log })
}

/// A CUBIN (machine code for one architecture) and NVRTC's log.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CompiledCubin {
    /// The ELF image, for `cuModuleLoadData`.
    pub cubin: Vec<u8>,
    /// Warnings and notes.
    pub log: String,
}

/// Compiles `source` to a CUBIN for `arch` (a real architecture, e.g. `"sm_90"`).
///
/// The runtime loads kernels as CUBINs: PTX is compiled again by the driver, which refuses
/// PTX newer than itself (`CUDA_ERROR_UNSUPPORTED_PTX_VERSION` for a CUDA 13.1 NVRTC on a
/// CUDA 13.0 driver), while a CUBIN from any 13.x NVRTC loads on any 13.x driver.
pub fn compile_cubin(source: &KernelSource, arch: &str) -> Result<CompiledCubin, KernelError> {
    let (program, log) = build(source, arch)?;
    let failed = |what: String| compile_error(source, arch, what);
    let mut size = 0usize;
    // SAFETY: compiled successfully (`build`); the out-pointer is a live local.
    let status = unsafe { sys::nvrtcGetCUBINSize(program.0, &mut size) };
    if status != sys::nvrtcResult::NVRTC_SUCCESS || size == 0 {
        return Err(failed(format!(
            "nvrtcGetCUBINSize: {status:?} (size {size}; a virtual architecture has no CUBIN)"
        )));
    }
    let mut cubin = vec![0u8; size];
    // SAFETY: `cubin` has the size NVRTC reported.
    let status = unsafe { sys::nvrtcGetCUBIN(program.0, cubin.as_mut_ptr().cast()) };
    if status != sys::nvrtcResult::NVRTC_SUCCESS {
        return Err(failed(format!("nvrtcGetCUBIN: {status:?}")));
    }
    Ok(CompiledCubin { cubin, log })
}

fn compile_error(source: &KernelSource, arch: &str, log: String) -> KernelError {
    KernelError::Compile {
        name: source.name,
        arch: arch.to_owned(),
        log,
    }
}

/// Creates and compiles the program for `arch`: the program and the trimmed log.
fn build(source: &KernelSource, arch: &str) -> Result<(Program, String), KernelError> {
    probe()?;
    let code = CString::new(source.full_source())
        .map_err(|_| KernelError::InvalidArgument("NUL in kernel source".into()))?;
    let name = CString::new(source.name).expect("file names have no NUL");
    let options = [
        format!("--gpu-architecture={arch}"),
        "--std=c++17".to_owned(),
        "--restrict".to_owned(),
    ];
    let prog = result::create_program(&code, Some(&name))
        .map_err(|e| compile_error(source, arch, format!("nvrtcCreateProgram: {e:?}")))?;
    let program = Program(prog);
    // SAFETY: `prog` is a live program; the options outlive the call.
    let compiled = unsafe { result::compile_program(program.0, &options) };
    // SAFETY: as above; the log exists after a compile attempt, successful or not.
    let log = unsafe { result::get_program_log(program.0) }
        .map(|raw| text(&raw))
        .unwrap_or_default();
    if let Err(e) = compiled {
        return Err(compile_error(source, arch, format!("{e:?}\n{log}")));
    }
    Ok((program, log.trim().to_owned()))
}

/// Destroys the program on every path.
struct Program(sys::nvrtcProgram);

impl Drop for Program {
    fn drop(&mut self) {
        // SAFETY: created by `create_program` and destroyed only here.
        let _ = unsafe { result::destroy_program(self.0) };
    }
}

fn text(raw: &[std::ffi::c_char]) -> String {
    let bytes: Vec<u8> = raw.iter().map(|&c| c as u8).collect();
    CStr::from_bytes_until_nul(&bytes)
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|_| String::from_utf8_lossy(&bytes).into_owned())
}
