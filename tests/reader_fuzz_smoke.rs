//! The fuzz targets' bodies (fuzz/fuzz_targets/*.rs) on mutated seed files, on stable Rust and
//! in the regular suite: truncations, byte flips, insertions and extreme numbers in the COCO,
//! VOC and YOLO readers give a value or an error naming the file, never a panic. The real
//! fuzzing (coverage-guided, unbounded) is `cargo +nightly fuzz run coco` (README).

use std::path::Path;

use densa::runtime::data::{coco, coco_source, voc, yolo};
use proptest::prelude::*;

const COCO: &[u8] = include_bytes!("../fuzz/corpus/coco/instances.json");
const RESULTS: &[u8] = include_bytes!("../fuzz/corpus/coco/results.json");
const VOC: &[u8] = include_bytes!("../fuzz/corpus/voc/000001.xml");
const YOLO: &[u8] = include_bytes!("../fuzz/corpus/yolo/a.txt");

/// One mutation of a seed file.
#[derive(Clone, Debug)]
enum Mutation {
    Truncate(usize),
    Flip(usize, u8),
    Insert(usize, Vec<u8>),
    /// Replaces the `k`-th run of ASCII digits with a token such as `-1e400` or `1e20`.
    Number(usize, &'static str),
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        any::<usize>().prop_map(Mutation::Truncate),
        (any::<usize>(), any::<u8>()).prop_map(|(i, b)| Mutation::Flip(i, b)),
        (any::<usize>(), proptest::collection::vec(any::<u8>(), 1..8))
            .prop_map(|(i, v)| Mutation::Insert(i, v)),
        (
            any::<usize>(),
            prop::sample::select(vec![
                "-1",
                "0",
                "-0",
                "1e400",
                "-1e400",
                "NaN",
                "18446744073709551616",
                "4294967296",
                "1e-320",
                "\"7\"",
                "null",
                "[]"
            ])
        )
            .prop_map(|(k, t)| Mutation::Number(k, t)),
    ]
}

fn apply(seed: &[u8], mutations: &[Mutation]) -> Vec<u8> {
    let mut bytes = seed.to_vec();
    for m in mutations {
        let n = bytes.len().max(1);
        match m {
            Mutation::Truncate(i) => bytes.truncate(i % n),
            Mutation::Flip(i, b) => {
                if !bytes.is_empty() {
                    bytes[i % n] ^= b | 1;
                }
            }
            Mutation::Insert(i, v) => {
                let at = i % (bytes.len() + 1);
                bytes.splice(at..at, v.iter().copied());
            }
            Mutation::Number(k, token) => {
                let runs: Vec<(usize, usize)> = digit_runs(&bytes);
                if !runs.is_empty() {
                    let (a, b) = runs[k % runs.len()];
                    bytes.splice(a..b, token.bytes());
                }
            }
        }
    }
    bytes
}

fn digit_runs(bytes: &[u8]) -> Vec<(usize, usize)> {
    let mut runs = Vec::new();
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i].is_ascii_digit() {
            let start = i;
            while i < bytes.len() && bytes[i].is_ascii_digit() {
                i += 1;
            }
            runs.push((start, i));
        } else {
            i += 1;
        }
    }
    runs
}

#[test]
fn seeds_are_valid() {
    let gt = coco::parse_dataset(COCO, Path::new("instances.json")).unwrap();
    let dets: Vec<coco::Detection> = serde_json::from_slice(RESULTS).unwrap();
    coco::check_results(dets, &gt).unwrap();
    coco_source::parse_coco(COCO, Path::new("instances.json")).unwrap();
    voc::parse_annotation(VOC, Path::new("000001.xml")).unwrap();
    assert_eq!(
        yolo::parse_labels(YOLO, Path::new("a.txt"), 20)
            .unwrap()
            .len(),
        2
    );
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(400))]

    #[test]
    fn mutated_coco_files_never_panic(m in proptest::collection::vec(mutation(), 1..4)) {
        let gt = coco::parse_dataset(COCO, Path::new("seed.json")).unwrap();
        let bytes = apply(COCO, &m);
        if let Err(e) = coco::parse_dataset(&bytes, Path::new("fuzz.json")) {
            prop_assert!(e.to_string().contains("fuzz.json"), "{e}");
        }
        if let Err(e) = coco_source::parse_coco(&bytes, Path::new("fuzz.json")) {
            prop_assert!(e.to_string().contains("fuzz.json"), "{e}");
        }
        let results = apply(RESULTS, &m);
        if let Ok(dets) = serde_json::from_slice::<Vec<coco::Detection>>(&results) {
            let _ = coco::check_results(dets, &gt);
        }
    }

    #[test]
    fn mutated_voc_files_never_panic(m in proptest::collection::vec(mutation(), 1..4)) {
        if let Err(e) = voc::parse_annotation(&apply(VOC, &m), Path::new("fuzz.xml")) {
            prop_assert!(e.to_string().contains("fuzz.xml"), "{e}");
        }
    }

    #[test]
    fn mutated_yolo_files_never_panic(m in proptest::collection::vec(mutation(), 1..4)) {
        if let Err(e) = yolo::parse_labels(&apply(YOLO, &m), Path::new("fuzz.txt"), 20) {
            prop_assert!(e.to_string().contains("fuzz.txt"), "{e}");
        }
    }
}
