//! COCO instances JSON and COCO results JSON: any bytes give a value or an error, never a
//! panic. Results are checked against the seed ground truth in `corpus/coco/instances.json`.
#![no_main]

use std::path::Path;
use std::sync::LazyLock;

use densa_runtime::data::{coco, coco_source};
use libfuzzer_sys::fuzz_target;

static GT: LazyLock<coco::Dataset> = LazyLock::new(|| {
    coco::parse_dataset(include_bytes!("../corpus/coco/instances.json"), Path::new("seed.json"))
        .expect("the seed ground truth is valid")
});

fuzz_target!(|bytes: &[u8]| {
    let path = Path::new("fuzz.json");
    let _ = coco::parse_dataset(bytes, path);
    let _ = coco_source::parse_coco(bytes, path);
    if let Ok(detections) = serde_json::from_slice::<Vec<coco::Detection>>(bytes) {
        let _ = coco::check_results(detections, &GT);
    }
});
