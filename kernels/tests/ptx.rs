//! Every kernel compiles to PTX through the runtime's own NVRTC path, without a GPU and
//! without warnings. CI installs NVRTC (pip `nvidia-cuda-nvrtc==13.0.*`) and sets
//! `KVBM_REQUIRE_NVRTC=1`, so a missing NVRTC fails there instead of skipping; elsewhere
//! (a fresh machine running `cargo test`) the test says it skipped.
#![cfg(feature = "cuda")]

use kvbm_kernels::{KernelError, KernelSource, SOURCES, nvrtc};

fn nvrtc_or_skip() -> bool {
    match nvrtc::version() {
        Ok((major, minor)) => {
            eprintln!("NVRTC {major}.{minor}");
            true
        }
        Err(e) if std::env::var("KVBM_REQUIRE_NVRTC").as_deref() == Ok("1") => {
            panic!("KVBM_REQUIRE_NVRTC=1 but {e}")
        }
        Err(e) => {
            eprintln!("skipped: {e}");
            false
        }
    }
}

#[test]
fn every_kernel_compiles_to_ptx_without_warnings() {
    if !nvrtc_or_skip() {
        return;
    }
    // Ampere, Hopper (the GPU machines) and Blackwell.
    for arch in ["compute_80", "compute_90", "compute_100"] {
        for source in SOURCES {
            let out = nvrtc::compile(&source, arch).unwrap_or_else(|e| panic!("{e}"));
            assert!(
                out.log.is_empty(),
                "{} for {arch} warned:\n{}",
                source.name,
                out.log
            );
            for f in source.functions {
                assert!(
                    out.ptx.contains(&format!(".entry {f}")),
                    "{f} missing from {}",
                    source.name
                );
            }
            assert!(
                out.ptx
                    .contains(&format!(".target sm_{}", &arch["compute_".len()..]))
            );
        }
    }
}

#[test]
fn a_broken_kernel_is_a_compile_error_with_the_log() {
    if !nvrtc_or_skip() {
        return;
    }
    let broken = KernelSource {
        name: "broken.cu",
        code: "extern \"C\" __global__ void k(int* p) { p[0] = undefined_name; }",
        functions: &["k"],
    };
    match nvrtc::compile(&broken, "compute_90") {
        Err(KernelError::Compile { name, log, .. }) => {
            assert_eq!(name, "broken.cu");
            assert!(log.contains("undefined_name"), "{log}");
        }
        other => panic!("{other:?}"),
    }
    // A warning is reported in the log (CI's test above fails on any).
    let warns = KernelSource {
        name: "warns.cu",
        code: "extern \"C\" __global__ void k(int* p) { int unused = 1; p[0] = 0; }",
        functions: &["k"],
    };
    let out = nvrtc::compile(&warns, "compute_90").unwrap();
    assert!(
        out.log.contains("warning"),
        "expected a warning, got {:?}",
        out.log
    );
}

#[test]
fn every_kernel_compiles_to_a_cubin_for_the_gpu_machines() {
    if !nvrtc_or_skip() {
        return;
    }
    // What the runtime loads: machine code for the device's own architecture.
    for arch in ["sm_80", "sm_90", "sm_100"] {
        for source in SOURCES {
            let out = nvrtc::compile_cubin(&source, arch).unwrap_or_else(|e| panic!("{e}"));
            assert!(
                out.log.is_empty(),
                "{} for {arch}: {}",
                source.name,
                out.log
            );
            assert_eq!(&out.cubin[..4], b"\x7fELF", "{} for {arch}", source.name);
            for f in source.functions {
                let name = f.as_bytes();
                assert!(
                    out.cubin.windows(name.len()).any(|w| w == name),
                    "{f} missing from the {arch} CUBIN of {}",
                    source.name
                );
            }
        }
    }
    // A virtual architecture has no CUBIN: an error, not an empty image.
    match nvrtc::compile_cubin(&SOURCES[0], "compute_90") {
        Err(KernelError::Compile { .. }) => {}
        other => panic!("{other:?}"),
    }
}

/// NVRTC loaded by path (`$KVBM_NVRTC`), with its directory not on the loader's path, still
/// compiles: its builtins library beside it is loaded first. Runs itself in a child process
/// whose environment has no `LD_LIBRARY_PATH` (the parent's names NVRTC's directory).
#[test]
fn nvrtc_loaded_by_path_finds_its_builtins() {
    if std::env::var_os("KVBM_NVRTC_CHILD").is_some() {
        let out = nvrtc::compile(&SOURCES[0], "compute_90").unwrap_or_else(|e| panic!("{e}"));
        assert!(out.ptx.contains(".entry"));
        return;
    }
    if !nvrtc_or_skip() {
        return;
    }
    let lib = std::env::var_os("LD_LIBRARY_PATH")
        .iter()
        .flat_map(std::env::split_paths)
        .map(|d| d.join("libnvrtc.so.13"))
        .find(|p| p.exists());
    let Some(lib) = lib else {
        eprintln!("skipped: NVRTC is not on LD_LIBRARY_PATH (found elsewhere)");
        return;
    };
    let child = std::process::Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "nvrtc_loaded_by_path_finds_its_builtins",
            "--nocapture",
            "--test-threads=1",
        ])
        .env_remove("LD_LIBRARY_PATH")
        .env("KVBM_NVRTC_CHILD", "1")
        .env("KVBM_NVRTC", &lib)
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&child.stdout),
        String::from_utf8_lossy(&child.stderr)
    );
    assert!(child.status.success(), "{text}");
    assert!(text.contains("1 passed"), "{text}");
}
