//! YOLO label text: any bytes give boxes or an error, never a panic.
#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;

fuzz_target!(|bytes: &[u8]| {
    let _ = densa_runtime::data::yolo::parse_labels(bytes, Path::new("fuzz.txt"), 20);
});
