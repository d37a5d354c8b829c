//! Pascal VOC annotation XML: any bytes give a value or an error, never a panic.
#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;

fuzz_target!(|bytes: &[u8]| {
    let _ = densa_runtime::data::voc::parse_annotation(bytes, Path::new("fuzz.xml"));
});
