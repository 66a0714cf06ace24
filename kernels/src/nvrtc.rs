//! Compiling the kernel sources to PTX with NVRTC, loaded at run time. The same path serves
//! the runtime (per device, cached) and CI (compile-only, no GPU).

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
fn preload() {
    static DONE: OnceLock<Option<libloading::Library>> = OnceLock::new();
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
        candidates.into_iter().find_map(|path| {
            // SAFETY: loading NVRTC runs only its initialisers. Once loaded by path, the
            // loader resolves cudarc's later `dlopen("libnvrtc.so.13")` to it by soname. The
            // handle is kept for the life of the process.
            unsafe { libloading::Library::new(&path) }.ok()
        })
    });
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
    probe()?;
    let code = CString::new(source.full_source())
        .map_err(|_| KernelError::InvalidArgument("NUL in kernel source".into()))?;
    let name = CString::new(source.name).expect("file names have no NUL");
    let options = [
        format!("--gpu-architecture={arch}"),
        "--std=c++17".to_owned(),
        "--restrict".to_owned(),
    ];
    let failed = |log: String| KernelError::Compile {
        name: source.name,
        arch: arch.to_owned(),
        log,
    };
    let prog = result::create_program(&code, Some(&name))
        .map_err(|e| failed(format!("nvrtcCreateProgram: {e:?}")))?;
    let program = Program(prog);
    // SAFETY: `prog` is a live program; the options outlive the call.
    let compiled = unsafe { result::compile_program(program.0, &options) };
    // SAFETY: as above; the log exists after a compile attempt, successful or not.
    let log = unsafe { result::get_program_log(program.0) }
        .map(|raw| text(&raw))
        .unwrap_or_default();
    if let Err(e) = compiled {
        return Err(failed(format!("{e:?}\n{log}")));
    }
    // SAFETY: compiled successfully just above.
    let ptx = unsafe { result::get_ptx(program.0) }
        .map(|raw| text(&raw))
        .map_err(|e| failed(format!("nvrtcGetPTX: {e:?}")))?;
    Ok(Compiled {
        ptx,
        log: log.trim().to_owned(),
    })
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
