//! `densa detect` serves third-party detectors through spec files: a torchvision-style export
//! (CHW input, boxes/scores/labels outputs, 1-based labels) and a YOLOv8-layout export
//! (`[1, 4 + classes, anchors]`, host NMS, letterbox). The fixture models are made here with
//! densa's builder: constant predictions in model-input pixels (plus a zero-weighted
//! dependency on the image), so the expected boxes in image pixels are known exactly.

use crate::common;

use std::path::Path;

use common::*;
use densa::exporter::builder::attr;
use densa::exporter::{DType, Dim, GraphBuilder, Tensor};
use ndarray::{ArrayD, IxDyn};

/// `out = constant + 0 * mean(images)`, so the constant depends on the input.
fn constant_output(
    b: &mut GraphBuilder,
    images: &densa::exporter::Value,
    value: Tensor,
    name: &str,
) {
    let rank = value.shape().len();
    let dtype = value.dtype();
    let c = b.constant(value.clone());
    let m = b.node1(
        "ReduceMean",
        None,
        &[images],
        vec![attr::int("keepdims", 0)],
        DType::F32,
        vec![],
    );
    let zero = b.const_f32(0.0);
    let z = b.binary("Mul", &m, &zero).unwrap();
    let z = if dtype == DType::F32 {
        z
    } else {
        b.node1(
            "Cast",
            None,
            &[&z],
            vec![attr::int("to", dtype.onnx() as i64)],
            dtype,
            vec![],
        )
    };
    let shape: Vec<Dim> = value.shape().iter().map(|&d| Dim::from(d)).collect();
    let out = b.node1("Add", None, &[&c, &z], vec![], dtype, shape);
    let _ = rank;
    b.output(&out, name).unwrap();
}

fn yolov8_model(path: &Path) {
    let mut b = GraphBuilder::new("yolo-like", 0);
    let images = b
        .input(
            "images",
            DType::F32,
            vec![1.into(), 3.into(), 64.into(), 64.into()],
        )
        .unwrap();
    // Anchors (columns): cx, cy, w, h, score class 0, score class 1.
    let anchors = [
        [32.0, 32.0, 16.0, 16.0, 0.9, 0.0], // kept
        [33.0, 32.0, 16.0, 16.0, 0.8, 0.0], // same class, IoU 0.88 with the first: suppressed
        [32.0, 32.0, 16.0, 16.0, 0.0, 0.7], // other class: kept
        [10.0, 40.0, 8.0, 8.0, 0.1, 0.05],  // below the threshold
    ];
    let mut data = vec![0f32; 6 * anchors.len()];
    for (a, v) in anchors.iter().enumerate() {
        for (r, x) in v.iter().enumerate() {
            data[r * anchors.len() + a] = *x;
        }
    }
    let t = Tensor::F32(ArrayD::from_shape_vec(IxDyn(&[1, 6, anchors.len()]), data).unwrap());
    constant_output(&mut b, &images, t, "output0");
    densa::exporter::io::save(&b.finish(), path).unwrap();
}

fn torchvision_model(path: &Path) {
    let mut b = GraphBuilder::new("torchvision-like", 0);
    let image = b
        .input(
            "image",
            DType::F32,
            vec![3.into(), Dim::from("H"), Dim::from("W")],
        )
        .unwrap();
    let boxes = Tensor::F32(
        ArrayD::from_shape_vec(
            IxDyn(&[2, 4]),
            vec![16.0, 16.0, 32.0, 48.0, 0.0, 0.0, 8.0, 8.0],
        )
        .unwrap(),
    );
    constant_output(&mut b, &image, boxes, "boxes");
    constant_output(
        &mut b,
        &image,
        Tensor::F32(ArrayD::from_shape_vec(IxDyn(&[2]), vec![0.95, 0.2]).unwrap()),
        "scores",
    );
    constant_output(
        &mut b,
        &image,
        Tensor::I64(ArrayD::from_shape_vec(IxDyn(&[2]), vec![2, 1]).unwrap()),
        "labels",
    );
    densa::exporter::io::save(&b.finish(), path).unwrap();
}

fn detections(json: &Path) -> Vec<serde_json::Value> {
    serde_json::from_str(&std::fs::read_to_string(json).unwrap()).unwrap()
}

fn assert_box(d: &serde_json::Value, xywh: [f64; 4]) {
    let got: Vec<f64> = d["bbox"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_f64().unwrap())
        .collect();
    for (g, w) in got.iter().zip(xywh) {
        assert!((g - w).abs() < 1e-3, "box {got:?}, expected {xywh:?}");
    }
}

#[test]
fn yolov8_layout_through_a_spec_file() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("yolo.onnx");
    yolov8_model(&model);
    let spec = dir.path().join("yolo.toml");
    std::fs::write(
        &spec,
        "[input]\nsize = [64, 64]\nresize = \"letterbox\"\n[output]\nlayout = \"yolov8\"\nnms_iou = 0.5\nclasses = [\"disk\", \"square\"]\n",
    )
    .unwrap();
    let images = dir.path().join("images");
    std::fs::create_dir(&images).unwrap();
    image::RgbImage::from_pixel(128, 64, image::Rgb([40, 80, 120]))
        .save(images.join("a.png"))
        .unwrap();
    std::fs::write(images.join("broken.jpg"), b"not a jpeg").unwrap();
    let json = dir.path().join("dets.json");
    let drawn = dir.path().join("drawn");
    for backend in ["tract", "ort"] {
        if backend == "ort" && ort_backend().is_none() {
            continue;
        }
        let o = run_densa(&[
            "detect",
            model.to_str().unwrap(),
            images.to_str().unwrap(),
            "--spec",
            spec.to_str().unwrap(),
            "--backend",
            backend,
            "--json",
            json.to_str().unwrap(),
            "--draw",
            drawn.to_str().unwrap(),
        ]);
        let err = stderr(&o);
        assert!(o.status.success(), "{err}");
        assert!(
            err.contains("skipping") && err.contains("broken.jpg"),
            "the corrupt image is reported: {err}"
        );
        let d = detections(&json);
        assert_eq!(d.len(), 2, "{d:?}");
        // Letterbox 128x64 -> 64x64: scale 0.5, 16 px of padding above. Model box 24..40.
        assert_eq!(d[0]["category_id"], 0);
        assert_eq!(d[0]["file_name"], "a.png");
        assert!((d[0]["score"].as_f64().unwrap() - 0.9).abs() < 1e-6);
        assert_box(&d[0], [48.0, 16.0, 32.0, 32.0]);
        assert_eq!(d[1]["category_id"], 1);
        assert_box(&d[1], [48.0, 16.0, 32.0, 32.0]);
        assert!(drawn.join("a.png").exists());
    }
}

#[test]
fn torchvision_layout_through_a_spec_file() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("tv.onnx");
    torchvision_model(&model);
    let spec = dir.path().join("tv.toml");
    std::fs::write(
        &spec,
        "[input]\nlayout = \"CHW\"\nsize = [64, 64]\nresize = \"stretch\"\nmean = [0.485, 0.456, 0.406]\nstd = [0.229, 0.224, 0.225]\n\
         [output]\nlayout = \"boxes-scores-labels\"\nlabel_offset = 1\n",
    )
    .unwrap();
    let img = dir.path().join("street.jpg");
    image::RgbImage::from_pixel(200, 100, image::Rgb([200, 10, 10]))
        .save(&img)
        .unwrap();
    let json = dir.path().join("dets.json");
    let o = run_densa(&[
        "detect",
        model.to_str().unwrap(),
        img.to_str().unwrap(),
        "--spec",
        spec.to_str().unwrap(),
        "--backend",
        "tract",
        "--score-threshold",
        "0.5",
        "--json",
        json.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let d = detections(&json);
    assert_eq!(
        d.len(),
        1,
        "the 0.2-score box is below the threshold: {d:?}"
    );
    assert_eq!(
        d[0]["category_id"], 1,
        "torchvision's label 2 minus the offset"
    );
    // Stretch 200x100 -> 64x64: model [16, 16, 32, 48] -> image [50, 25, 100, 75].
    assert_box(&d[0], [50.0, 25.0, 50.0, 50.0]);
}

#[test]
fn a_model_without_metadata_needs_a_spec() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("tv.onnx");
    torchvision_model(&model);
    let img = dir.path().join("x.png");
    image::RgbImage::new(8, 8).save(&img).unwrap();
    let err = assert_clean_failure(&run_densa(&[
        "detect",
        model.to_str().unwrap(),
        img.to_str().unwrap(),
        "--backend",
        "tract",
    ]));
    assert!(err.contains("tv.onnx") && err.contains("--spec"), "{err}");
}
