//! densa reads and writes models made by the `onnx` Python package without losing anything.

use crate::common;

use std::process::Command;

use common::*;

#[test]
fn models_written_by_onnx_python_round_trip() {
    let Some(python) = python_peers() else { return };
    let dir = tempfile::tempdir().unwrap();
    let original = dir.path().join("original.onnx");
    let rewritten = dir.path().join("rewritten.onnx");
    let script =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/py/onnx_roundtrip.py");
    let o = Command::new(&python)
        .arg(&script)
        .arg("write")
        .arg(&original)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));

    let model = densa::exporter::io::load(&original).unwrap();
    densa::exporter::validate::validate(&model).unwrap();
    densa::exporter::io::save(&model, &rewritten).unwrap();

    let o = Command::new(&python)
        .arg(&script)
        .arg("compare")
        .arg(&original)
        .arg(&rewritten)
        .output()
        .unwrap();
    assert!(
        o.status.success(),
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
}
