//! Finding CUDA 13's libraries for ONNX Runtime's CUDA execution provider and tract-cuda.
//!
//! The provider (`libonnxruntime_providers_cuda.so`) links cudart, cuBLAS, cuFFT, cuRAND, NVRTC
//! and cuDNN 9 by soname. The dynamic loader finds them when they are installed system-wide or
//! on `LD_LIBRARY_PATH`; otherwise the usual place on a machine with PyTorch or with
//! `onnxruntime-gpu[cuda,cudnn]` is the `nvidia-*` Python packages, whose `lib/` folders the loader
//! never looks at. Like `onnxruntime.preload_dlls()`, [`preload`] loads each library from
//! those folders before the provider starts: a library already loaded is found by its soname.
//!
//! Folders searched, in order: `DENSA_CUDA_LIB_DIRS` (`:`-separated), then every `lib/` under
//! the `nvidia` package of the Python in `DENSA_PYTHON` (default `python3`). A library found in
//! none of them is left to the dynamic loader; if it is missing there too the provider fails to
//! start and the backend falls back to the CPU with that message.

use std::path::{Path, PathBuf};
use std::process::Command;

/// The libraries the CUDA provider needs, dependencies first.
const LIBRARIES: &[&str] = &[
    "libcudart.so.13",
    "libcublasLt.so.13",
    "libcublas.so.13",
    "libnvrtc.so.13",
    "libcurand.so.10",
    "libcufft.so.12",
    "libcudnn.so.9",
    "libcudnn_graph.so.9",
    "libcudnn_ops.so.9",
    "libcudnn_heuristic.so.9",
    "libcudnn_adv.so.9",
    "libcudnn_cnn.so.9",
    "libcudnn_engines_precompiled.so.9",
    "libcudnn_engines_runtime_compiled.so.9",
];

/// Prints the folders of the `nvidia` namespace package, one per line.
const PYTHON_QUERY: &str = "import nvidia; print('\\n'.join(nvidia.__path__))";

/// Candidate folders: `DENSA_CUDA_LIB_DIRS`, then the `lib/` folders of the `nvidia-*` packages.
fn folders() -> Vec<PathBuf> {
    let mut dirs: Vec<PathBuf> = std::env::var_os("DENSA_CUDA_LIB_DIRS")
        .map(|v| std::env::split_paths(&v).collect())
        .unwrap_or_default();
    let python = std::env::var_os("DENSA_PYTHON").unwrap_or_else(|| "python3".into());
    if let Ok(out) = Command::new(python).args(["-c", PYTHON_QUERY]).output() {
        if out.status.success() {
            for root in String::from_utf8_lossy(&out.stdout).lines() {
                dirs.extend(lib_dirs(Path::new(root.trim())));
            }
        }
    }
    dirs
}

/// `root/*/lib` (CUDA 12 layout: `nvidia/cublas/lib`) and `root/*/*/lib` (`nvidia/cu13/lib`).
fn lib_dirs(root: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let Ok(entries) = std::fs::read_dir(root) else {
        return out;
    };
    for e in entries.flatten() {
        let lib = e.path().join("lib");
        if lib.is_dir() {
            out.push(lib);
        }
        if let Ok(inner) = std::fs::read_dir(e.path()) {
            out.extend(
                inner
                    .flatten()
                    .map(|i| i.path().join("lib"))
                    .filter(|p| p.is_dir()),
            );
        }
    }
    out.sort();
    out
}

/// Loads each library found in the candidate folders; returns a one-line account.
pub fn preload() -> String {
    let dirs = folders();
    let mut loaded = 0;
    let mut failed = Vec::new();
    let mut absent = Vec::new();
    for name in LIBRARIES {
        match dirs.iter().map(|d| d.join(name)).find(|p| p.is_file()) {
            // SAFETY: loading a CUDA library runs only its initialisers; it stays loaded for the
            // life of the process (the handle is leaked on purpose) so later loads by soname find it.
            Some(path) => match unsafe { libloading::Library::new(&path) } {
                Ok(lib) => {
                    std::mem::forget(lib);
                    loaded += 1
                }
                Err(e) => failed.push(format!("{}: {e}", path.display())),
            },
            None => absent.push(*name),
        }
    }
    let mut report = format!("{loaded} of {} preloaded", LIBRARIES.len());
    if !absent.is_empty() {
        report += &format!("; left to the dynamic loader: {}", absent.join(", "));
    }
    if !failed.is_empty() {
        report += &format!("; failed: {}", failed.join("; "));
    }
    report
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_both_package_layouts() {
        let dir = tempfile::tempdir().unwrap();
        for sub in ["cublas/lib", "cu13/lib", "cudnn/include"] {
            std::fs::create_dir_all(dir.path().join(sub)).unwrap();
        }
        let found = lib_dirs(dir.path());
        assert_eq!(
            found,
            vec![dir.path().join("cu13/lib"), dir.path().join("cublas/lib")]
        );
    }
}
