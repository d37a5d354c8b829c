//! Helpers shared by the end-to-end tests.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use densa::runtime::{open_backend, Backend, BackendKind, BackendOptions};

/// The `densa` binary under test.
pub fn densa() -> Command {
    Command::new(env!("CARGO_BIN_EXE_densa"))
}

/// Runs `densa` with `args`; returns the output. Never panics on failure of the command.
pub fn run_densa(args: &[&str]) -> Output {
    densa().args(args).output().expect("the densa binary runs")
}

pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Asserts a clean failure: exit status 1 and no panic.
pub fn assert_clean_failure(o: &Output) -> String {
    let err = stderr(o);
    assert_eq!(
        o.status.code(),
        Some(1),
        "expected exit status 1, got {:?}; stderr:\n{err}",
        o.status
    );
    assert!(!err.contains("panicked"), "densa panicked:\n{err}");
    err
}

fn required() -> bool {
    std::env::var("DENSA_REQUIRE_ORT").is_ok_and(|v| v == "1")
}

/// The ONNX Runtime backend, or `None` (with a note) when its library is missing. With
/// `DENSA_REQUIRE_ORT=1` (CI) a missing library fails the test instead.
pub fn ort_backend() -> Option<Box<dyn Backend>> {
    let options = BackendOptions {
        threads: Some(2),
        allow_download: false,
        ..BackendOptions::default()
    };
    match open_backend(BackendKind::Ort, &options) {
        Ok(b) => Some(b),
        Err(e) if required() => panic!("DENSA_REQUIRE_ORT=1 but ONNX Runtime is unavailable: {e}"),
        Err(e) => {
            eprintln!("note: skipping the ONNX Runtime part of this test: {e}");
            None
        }
    }
}

/// The tract backend.
pub fn tract_backend() -> Box<dyn Backend> {
    open_backend(BackendKind::Tract, &BackendOptions::default()).expect("tract is always available")
}

/// The Python interpreter with `onnx`, `onnxruntime` and `numpy`, or `None` (with a note).
/// With `DENSA_REQUIRE_ORT=1` their absence fails the test.
pub fn python_peers() -> Option<String> {
    let python = std::env::var("DENSA_PYTHON").unwrap_or_else(|_| "python3".into());
    let ok = Command::new(&python)
        .args(["-c", "import onnx, onnxruntime, numpy"])
        .output()
        .is_ok_and(|o| o.status.success());
    if ok {
        Some(python)
    } else if required() {
        panic!("DENSA_REQUIRE_ORT=1 but `{python}` lacks onnx/onnxruntime/numpy (pip install onnx onnxruntime==1.31.1 numpy)");
    } else {
        eprintln!("note: skipping the Python reference part of this test: {python} lacks onnx/onnxruntime/numpy");
        None
    }
}

/// Runs tests/py/ort_reference.py: onnx.checker (full) + ONNX Runtime from Python.
pub fn python_reference(python: &str, model: &Path, inputs: &[(&str, &Path)], out: &Path) {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/py/ort_reference.py");
    let mut cmd = Command::new(python);
    cmd.arg(script).arg(model).arg(out);
    for (name, path) in inputs {
        cmd.arg(format!("{name}={}", path.display()));
    }
    let o = cmd.output().expect("python runs");
    assert!(
        o.status.success(),
        "python reference failed:\n{}",
        stderr(&o)
    );
}

/// `max |a - b| / max |b|`: the relative difference of two outputs.
pub fn max_rel_diff(a: &ndarray::ArrayD<f32>, b: &ndarray::ArrayD<f32>) -> f32 {
    assert_eq!(a.shape(), b.shape(), "shapes differ");
    let scale = b
        .iter()
        .fold(0f32, |m, v| m.max(v.abs()))
        .max(f32::MIN_POSITIVE);
    let diff = a
        .iter()
        .zip(b.iter())
        .fold(0f32, |m, (x, y)| m.max((x - y).abs()));
    assert!(diff.is_finite(), "non-finite difference");
    diff / scale
}

pub fn fixture(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(rel)
}

/// Runs `densa args`, fails the test with its stderr unless it succeeds; stdout and stderr.
pub fn ok(args: &[&str]) -> (String, String) {
    let o = run_densa(args);
    assert!(o.status.success(), "densa {args:?} failed:\n{}", stderr(&o));
    (String::from_utf8_lossy(&o.stdout).into_owned(), stderr(&o))
}

/// A randomly initialised (`seed`) edge backbone in torchvision names, saved to `path`: a
/// stand-in for a wave-1 `backbone.safetensors`.
pub fn random_backbone(path: &Path, seed: u64) -> densa::exporter::weights::StateDict {
    let mut b = densa::exporter::GraphBuilder::new("backbone", seed);
    densa::models::backbone::Arch::Edge
        .config()
        .init(&mut b)
        .unwrap();
    let mut sd = densa::exporter::weights::StateDict::new();
    for p in b.params() {
        if let Some(t) = b.initializer_value(&p.name) {
            sd.insert(p.name.clone(), t.clone());
        }
    }
    densa::exporter::weights::save_safetensors(&sd, path).unwrap();
    sd
}

/// `densa finetune --task detect --detector detr --init RUN` for one epoch at 64 px on
/// `annotations` (tract), into `out`: the stderr line saying how many DETR tensors loaded.
pub fn finetune_detr_from(run: &str, annotations: &str, out: &str) -> String {
    let (_, log) = ok(&[
        "finetune",
        "--task",
        "detect",
        "--detector",
        "detr",
        "--data",
        annotations,
        "--image-size",
        "64",
        "--epochs",
        "1",
        "--batch-size",
        "2",
        "--init",
        run,
        "--out",
        out,
        "--backend",
        "tract",
    ]);
    log.lines()
        .find(|l| l.starts_with("init: loaded"))
        .unwrap_or_else(|| panic!("{log}"))
        .to_string()
}
