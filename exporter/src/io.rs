//! Reading and writing `.onnx` files.
//!
//! Models are written atomically (temporary file, fsync, rename). Initializers are stored in the
//! model file unless the whole model would exceed protobuf's 2 GiB limit, in which case large
//! tensors go to `<model>.data` beside it (ONNX "external data"). Reading resolves external data.

use std::fs::{self, File};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use prost::Message;

use crate::onnx::{DataLocation, GraphProto, ModelProto, StringStringEntryProto, TensorProto};

/// Protobuf's hard limit on a message, with a margin for the graph structure.
const INLINE_LIMIT: usize = (2usize << 30) - (64 << 20);
/// Tensors at least this large go to the external data file when externalising.
const EXTERNAL_MIN_BYTES: usize = 1024;

/// Why a model file could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum OnnxIoError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: the file is empty, not an ONNX model")]
    Empty { path: PathBuf },
    #[error("{path}: not a valid ONNX model (protobuf decoding failed: {source}); the file may be truncated or of another format")]
    Decode {
        path: PathBuf,
        source: prost::DecodeError,
    },
    #[error("{path}: the model has no graph")]
    NoGraph { path: PathBuf },
    #[error("{path}: initializer `{tensor}` refers to external data {location:?}: {message}")]
    ExternalData {
        path: PathBuf,
        tensor: String,
        location: String,
        message: String,
    },
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> OnnxIoError + '_ {
    move |source| OnnxIoError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Decodes a model from bytes; `path` is only used in error messages.
pub fn decode(bytes: &[u8], path: &Path) -> Result<ModelProto, OnnxIoError> {
    if bytes.is_empty() {
        return Err(OnnxIoError::Empty {
            path: path.to_path_buf(),
        });
    }
    let model = ModelProto::decode(bytes).map_err(|source| OnnxIoError::Decode {
        path: path.to_path_buf(),
        source,
    })?;
    if model.graph.is_none() {
        return Err(OnnxIoError::NoGraph {
            path: path.to_path_buf(),
        });
    }
    Ok(model)
}

/// Reads a model and any external data it refers to.
pub fn load(path: &Path) -> Result<ModelProto, OnnxIoError> {
    let bytes = fs::read(path).map_err(io_err(path))?;
    let mut model = decode(&bytes, path)?;
    let dir = path.parent().unwrap_or(Path::new("."));
    if let Some(g) = model.graph.as_mut() {
        resolve_external(g, dir, path)?;
    }
    Ok(model)
}

fn resolve_external(
    graph: &mut GraphProto,
    dir: &Path,
    model_path: &Path,
) -> Result<(), OnnxIoError> {
    for t in graph.initializer.iter_mut() {
        if t.data_location != DataLocation::External as i32 {
            continue;
        }
        let entry = |k: &str| {
            t.external_data
                .iter()
                .find(|e| e.key == k)
                .map(|e| e.value.clone())
        };
        let location = entry("location").unwrap_or_default();
        let fail = |message: String| OnnxIoError::ExternalData {
            path: model_path.to_path_buf(),
            tensor: t.name.clone(),
            location: location.clone(),
            message,
        };
        let rel = Path::new(&location);
        if location.is_empty()
            || rel.is_absolute()
            || rel
                .components()
                .any(|c| matches!(c, std::path::Component::ParentDir))
        {
            return Err(fail(
                "the location must be a relative path inside the model's directory".into(),
            ));
        }
        let offset: u64 = entry("offset")
            .map(|v| v.parse())
            .transpose()
            .map_err(|e| fail(format!("bad offset: {e}")))?
            .unwrap_or(0);
        let mut file = File::open(dir.join(rel)).map_err(|e| fail(e.to_string()))?;
        let file_len = file.metadata().map_err(|e| fail(e.to_string()))?.len();
        let length: u64 = match entry("length") {
            Some(v) => v.parse().map_err(|e| fail(format!("bad length: {e}")))?,
            None => file_len.saturating_sub(offset),
        };
        if offset.checked_add(length).is_none_or(|end| end > file_len) {
            return Err(fail(format!(
                "bytes {offset}..{} are past the end of the file ({file_len} bytes)",
                offset + length
            )));
        }
        let mut data = vec![0u8; length as usize];
        file.seek(SeekFrom::Start(offset))
            .map_err(|e| fail(e.to_string()))?;
        file.read_exact(&mut data)
            .map_err(|e| fail(e.to_string()))?;
        t.raw_data = data;
        t.external_data.clear();
        t.data_location = DataLocation::Default as i32;
    }
    Ok(())
}

/// Writes `bytes` to `path` atomically: a temporary file in the same directory, fsync, rename.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "out".into());
    let tmp = dir.join(format!(".{name}.tmp{}", std::process::id()));
    let result = (|| {
        let mut f = File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        fs::rename(&tmp, path)?;
        if let Ok(d) = File::open(&dir) {
            let _ = d.sync_all();
        }
        Ok(())
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

/// Writes a model. Above the protobuf limit, initializers go to `<file name>.data` beside it.
pub fn save(model: &ModelProto, path: &Path) -> Result<(), OnnxIoError> {
    if model.encoded_len() < INLINE_LIMIT {
        return write_atomic(path, &model.encode_to_vec()).map_err(io_err(path));
    }
    let data_name = format!(
        "{}.data",
        path.file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default()
    );
    let data_path = path.with_file_name(&data_name);
    let mut model = model.clone();
    let mut data: Vec<u8> = Vec::new();
    if let Some(g) = model.graph.as_mut() {
        for t in g.initializer.iter_mut() {
            if t.raw_data.len() >= EXTERNAL_MIN_BYTES {
                externalise(t, &data_name, &mut data);
            }
        }
    }
    write_atomic(&data_path, &data).map_err(io_err(&data_path))?;
    write_atomic(path, &model.encode_to_vec()).map_err(io_err(path))
}

fn externalise(t: &mut TensorProto, location: &str, data: &mut Vec<u8>) {
    // Keep tensors 4 KiB aligned, as the ONNX helpers do, so they can be memory-mapped.
    let offset = data.len().div_ceil(4096) * 4096;
    data.resize(offset, 0);
    data.extend_from_slice(&t.raw_data);
    let kv = |k: &str, v: String| StringStringEntryProto {
        key: k.into(),
        value: v,
    };
    t.external_data = vec![
        kv("location", location.to_string()),
        kv("offset", offset.to_string()),
        kv("length", t.raw_data.len().to_string()),
    ];
    t.data_location = DataLocation::External as i32;
    t.raw_data = Vec::new();
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tensor::Tensor;
    use ndarray::ArrayD;

    #[test]
    fn truncated_file_is_a_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("m.onnx");
        let mut b = crate::builder::GraphBuilder::new("g", 0);
        let x = b.input("x", crate::DType::F32, vec![2.into()]).unwrap();
        let w = b
            .param(
                "w",
                &[2],
                crate::builder::Init::Ones,
                crate::builder::ParamKind::Param,
            )
            .unwrap();
        let y = b.add(&x, &w).unwrap();
        b.output(&y, "y").unwrap();
        let bytes = b.finish().encode_to_vec();
        fs::write(&p, &bytes[..bytes.len() - 5]).unwrap();
        let e = load(&p).unwrap_err().to_string();
        assert!(
            e.contains("m.onnx") && e.contains("not a valid ONNX model"),
            "{e}"
        );
        fs::write(&p, b"").unwrap();
        assert!(load(&p).unwrap_err().to_string().contains("empty"));
        assert!(load(&dir.path().join("missing.onnx"))
            .unwrap_err()
            .to_string()
            .contains("missing.onnx"));
    }

    #[test]
    fn external_data_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let mut t = Tensor::F32(ArrayD::from_elem(vec![600], 1.5)).to_proto("w");
        let original = t.clone();
        let mut data = vec![7u8; 10];
        externalise(&mut t, "m.onnx.data", &mut data);
        fs::write(dir.path().join("m.onnx.data"), &data).unwrap();
        let model = ModelProto {
            graph: Some(GraphProto {
                initializer: vec![t],
                ..Default::default()
            }),
            ..Default::default()
        };
        fs::write(dir.path().join("m.onnx"), model.encode_to_vec()).unwrap();
        let back = load(&dir.path().join("m.onnx")).unwrap();
        assert_eq!(back.graph.unwrap().initializer[0], original);
    }

    #[test]
    fn external_data_outside_the_directory_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let mut t = Tensor::F32(ArrayD::from_elem(vec![4], 1.0)).to_proto("w");
        externalise(&mut t, "../../etc/passwd", &mut Vec::new());
        let model = ModelProto {
            graph: Some(GraphProto {
                initializer: vec![t],
                ..Default::default()
            }),
            ..Default::default()
        };
        fs::write(dir.path().join("m.onnx"), model.encode_to_vec()).unwrap();
        let e = load(&dir.path().join("m.onnx")).unwrap_err().to_string();
        assert!(e.contains("`w`") && e.contains("relative path"), "{e}");
    }
}
