//! The safetensors format: an 8-byte header length, a JSON header, raw little-endian data.

use std::collections::HashMap;
use std::path::Path;

use ::safetensors::tensor::TensorView;
use ::safetensors::{Dtype, SafeTensors};
use ndarray::{ArrayD, IxDyn};

use super::{StateDict, WeightsError};
use crate::tensor::{DType, Tensor};

/// Whether `head` (the first bytes of a file of `file_len` bytes) starts like a safetensors
/// file: a little-endian header length that fits in the file, then a JSON object.
pub(crate) fn looks_like_safetensors(head: &[u8], file_len: u64) -> bool {
    let Some(len_bytes) = head.get(..8) else {
        return false;
    };
    let header_len = u64::from_le_bytes(len_bytes.try_into().expect("8 bytes"));
    header_len >= 2 && header_len <= file_len.saturating_sub(8) && head.get(8) == Some(&b'{')
}

/// Reads a safetensors file, tensors in the order of their data in the file.
///
/// `int16`, `uint16` and `uint32`, which [`DType`] lacks, are widened to `int32`/`int64`.
pub fn load_safetensors(path: &Path) -> Result<StateDict, WeightsError> {
    let bytes = std::fs::read(path).map_err(WeightsError::io(path))?;
    let invalid = |e: ::safetensors::SafeTensorError| WeightsError::Safetensors {
        path: path.to_path_buf(),
        message: e.to_string(),
    };
    let (_, metadata) = SafeTensors::read_metadata(&bytes).map_err(invalid)?;
    let file = SafeTensors::deserialize(&bytes).map_err(invalid)?;
    let mut sd = StateDict::new().with_source(path);
    for name in metadata.offset_keys() {
        let view = file.tensor(&name).map_err(invalid)?;
        let tensor = decode(&view).ok_or_else(|| WeightsError::UnsupportedDtype {
            path: path.to_path_buf(),
            key: name.clone(),
            dtype: format!("{:?}", view.dtype()),
        })?;
        sd.insert(name, tensor);
    }
    Ok(sd)
}

/// The tensor of a view; `None` for element types densa does not handle.
fn decode(view: &TensorView<'_>) -> Option<Tensor> {
    let (shape, data) = (view.shape(), view.data());
    let direct = |dtype: DType| Tensor::from_le_bytes(dtype, shape, data);
    // Widening keeps every value; the element size was checked by the safetensors crate.
    fn widened<T, const N: usize>(
        shape: &[usize],
        data: &[u8],
        f: impl Fn([u8; N]) -> T,
    ) -> Option<ArrayD<T>> {
        let values = data
            .chunks_exact(N)
            .map(|c| f(c.try_into().expect("N bytes")))
            .collect();
        ArrayD::from_shape_vec(IxDyn(shape), values).ok()
    }
    match view.dtype() {
        Dtype::F32 => direct(DType::F32),
        Dtype::F64 => direct(DType::F64),
        Dtype::F16 => direct(DType::F16),
        Dtype::BF16 => direct(DType::BF16),
        Dtype::I64 => direct(DType::I64),
        Dtype::I32 => direct(DType::I32),
        Dtype::I8 => direct(DType::I8),
        Dtype::U8 => direct(DType::U8),
        Dtype::BOOL => direct(DType::Bool),
        Dtype::I16 => widened(shape, data, |b| i32::from(i16::from_le_bytes(b))).map(Tensor::I32),
        Dtype::U16 => widened(shape, data, |b| i32::from(u16::from_le_bytes(b))).map(Tensor::I32),
        Dtype::U32 => widened(shape, data, |b| i64::from(u32::from_le_bytes(b))).map(Tensor::I64),
        _ => None,
    }
}

fn dtype_code(dtype: DType) -> Dtype {
    match dtype {
        DType::F32 => Dtype::F32,
        DType::F64 => Dtype::F64,
        DType::F16 => Dtype::F16,
        DType::BF16 => Dtype::BF16,
        DType::I64 => Dtype::I64,
        DType::I32 => Dtype::I32,
        DType::I8 => Dtype::I8,
        DType::U8 => Dtype::U8,
        DType::Bool => Dtype::BOOL,
    }
}

/// Writes `sd` as a safetensors file, atomically (temporary file, fsync, rename).
///
/// The header carries `{"format": "pt"}`, which Hugging Face loaders look for.
pub fn save_safetensors(sd: &StateDict, path: &Path) -> Result<(), WeightsError> {
    let data: Vec<(&str, DType, &[usize], Vec<u8>)> = sd
        .iter()
        .map(|(n, t)| (n, t.dtype(), t.shape(), t.to_le_bytes()))
        .collect();
    let mut views = Vec::with_capacity(data.len());
    for (name, dtype, shape, bytes) in &data {
        let view = TensorView::new(dtype_code(*dtype), shape.to_vec(), bytes).map_err(|e| {
            WeightsError::Safetensors {
                path: path.to_path_buf(),
                message: format!("`{name}`: {e}"),
            }
        })?;
        views.push((*name, view));
    }
    let metadata = HashMap::from([("format".to_string(), "pt".to_string())]);
    let bytes =
        ::safetensors::serialize(views, Some(metadata)).map_err(|e| WeightsError::Safetensors {
            path: path.to_path_buf(),
            message: e.to_string(),
        })?;
    crate::io::write_atomic(path, &bytes).map_err(WeightsError::io(path))
}

#[cfg(test)]
mod tests {
    use half::{bf16, f16};

    use super::*;
    use crate::weights::test_util::fixture;
    use crate::weights::{load_pth, WeightsError};

    fn array<T>(shape: &[usize], values: Vec<T>) -> ArrayD<T> {
        ArrayD::from_shape_vec(IxDyn(shape), values).unwrap()
    }

    fn every_dtype() -> StateDict {
        let mut sd = StateDict::new();
        sd.insert(
            "f32",
            Tensor::F32(array(&[2, 3], vec![-2.5, -1.5, -0.5, 0.5, 1.5, 2.5])),
        );
        sd.insert(
            "f64",
            Tensor::F64(array(&[3], vec![1.0 / 3.0, -1e300, 0.0])),
        );
        sd.insert(
            "f16",
            Tensor::F16(array(&[2], vec![f16::from_f32(0.5), f16::MAX])),
        );
        sd.insert(
            "bf16",
            Tensor::BF16(array(
                &[1, 2],
                vec![bf16::from_f32(-2.0), bf16::MIN_POSITIVE],
            )),
        );
        sd.insert("i64", Tensor::I64(array(&[2], vec![i64::MIN, i64::MAX])));
        sd.insert("i32", Tensor::I32(array(&[], vec![-5])));
        sd.insert("i8", Tensor::I8(array(&[2], vec![-128, 127])));
        sd.insert("u8", Tensor::U8(array(&[3], vec![0, 1, 255])));
        sd.insert("bool", Tensor::Bool(array(&[2, 1], vec![true, false])));
        sd.insert("empty", Tensor::F32(array(&[0, 4], vec![])));
        sd
    }

    #[test]
    fn safetensors_round_trip_every_dtype() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("all.safetensors");
        let sd = every_dtype();
        save_safetensors(&sd, &path).unwrap();
        let back = load_safetensors(&path).unwrap();
        assert_eq!(back.source(), Some(path.as_path()));
        assert_eq!(back.len(), sd.len());
        for (name, tensor) in sd.iter() {
            assert_eq!(back.get(name), Some(tensor), "{name}");
        }
        // No temporary file is left beside it.
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
    }

    #[test]
    fn safetensors_fixture_written_by_hand_matches_the_checkpoint() {
        // plain.safetensors is written by make_fixtures.py from the spec, not by this crate.
        let st = load_safetensors(&fixture("plain.safetensors")).unwrap();
        let pth = load_pth(&fixture("plain.pth")).unwrap();
        assert_eq!(
            st.names().collect::<Vec<_>>(),
            pth.names().collect::<Vec<_>>()
        );
        for (name, tensor) in pth.iter() {
            assert_eq!(st.get(name), Some(tensor), "{name}");
        }
        // int16 is widened to int32.
        assert_eq!(st.get("short").unwrap().dtype(), DType::I32);
    }

    #[test]
    fn safetensors_truncated_is_an_error_naming_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let bytes = std::fs::read(fixture("plain.safetensors")).unwrap();
        let path = dir.path().join("cut.safetensors");
        for cut in [0, 5, 12, bytes.len() - 3] {
            std::fs::write(&path, &bytes[..cut]).unwrap();
            let e = load_safetensors(&path).unwrap_err();
            assert!(matches!(e, WeightsError::Safetensors { .. }), "{cut}: {e}");
            assert!(e.to_string().contains("cut.safetensors"), "{e}");
        }
    }

    #[test]
    fn safetensors_sniffing() {
        assert!(looks_like_safetensors(b"\x02\0\0\0\0\0\0\0{}", 10));
        assert!(!looks_like_safetensors(b"\x03\0\0\0\0\0\0\0{}", 10));
        assert!(!looks_like_safetensors(b"\x02\0\0\0\0\0\0\0[]", 10));
        assert!(!looks_like_safetensors(b"\x02\0\0", 3));
    }
}
