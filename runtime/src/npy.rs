//! `.npy` / `.npz` files for [`Tensor`]s of any element type densa handles.

use std::fs::File;
use std::io::{BufReader, BufWriter, Read, Seek};
use std::path::{Path, PathBuf};

use densa_exporter::Tensor;
use ndarray::ArrayD;
use ndarray_npy::{NpzWriter, ReadNpyExt, ReadableElement, WriteNpyExt};

/// Errors reading or writing NumPy files; they name the file (and the array in an archive).
#[derive(Debug, thiserror::Error)]
pub enum NpyError {
    #[error("{path}: {message}")]
    File { path: PathBuf, message: String },
}

fn fail(path: &Path, message: impl ToString) -> NpyError {
    NpyError::File {
        path: path.to_path_buf(),
        message: message.to_string(),
    }
}

/// The `descr` of an `.npy` header (`<f4`, `<i8`, `|b1`...).
fn descr(header: &str) -> Option<String> {
    let start = header.find("'descr'")? + "'descr'".len();
    let rest = &header[start..];
    let q1 = rest.find('\'')? + 1;
    let q2 = rest[q1..].find('\'')? + q1;
    Some(rest[q1..q2].to_string())
}

fn read_typed<R: Read, T: ReadableElement>(r: R) -> Result<ArrayD<T>, ndarray_npy::ReadNpyError> {
    ArrayD::<T>::read_npy(r)
}

/// Reads one `.npy` array from bytes; `path` names it in errors.
pub fn read_npy_bytes(bytes: &[u8], path: &Path) -> Result<Tensor, NpyError> {
    if bytes.len() < 10 || &bytes[..6] != b"\x93NUMPY" {
        return Err(fail(path, "not a .npy file (missing the \\x93NUMPY magic)"));
    }
    let header_end = bytes.len().min(4096);
    let header = String::from_utf8_lossy(&bytes[..header_end]);
    let d = descr(&header).ok_or_else(|| fail(path, "the .npy header has no 'descr'"))?;
    let e = |e: ndarray_npy::ReadNpyError| fail(path, e);
    Ok(match d.as_str() {
        "<f4" => Tensor::F32(read_typed(bytes).map_err(e)?),
        "<f8" => Tensor::F64(read_typed(bytes).map_err(e)?),
        "<i8" => Tensor::I64(read_typed(bytes).map_err(e)?),
        "<i4" => Tensor::I32(read_typed(bytes).map_err(e)?),
        "|i1" => Tensor::I8(read_typed(bytes).map_err(e)?),
        "|u1" => Tensor::U8(read_typed(bytes).map_err(e)?),
        "|b1" => Tensor::Bool(read_typed(bytes).map_err(e)?),
        other => {
            return Err(fail(
                path,
                format!("unsupported dtype '{other}' (densa reads float32/64, int64/32/8, uint8, bool, little-endian)"),
            ))
        }
    })
}

/// Reads an `.npy` file.
pub fn read_npy(path: &Path) -> Result<Tensor, NpyError> {
    let bytes = std::fs::read(path).map_err(|e| fail(path, e))?;
    read_npy_bytes(&bytes, path)
}

/// Reads every array of an `.npz` archive, in archive order.
pub fn read_npz(path: &Path) -> Result<Vec<(String, Tensor)>, NpyError> {
    let file = File::open(path).map_err(|e| fail(path, e))?;
    let mut zip = zip::ZipArchive::new(BufReader::new(file))
        .map_err(|e| fail(path, format!("not a valid .npz archive: {e}")))?;
    let mut out = Vec::new();
    for i in 0..zip.len() {
        let mut member = zip.by_index(i).map_err(|e| fail(path, e))?;
        let name = member.name().to_string();
        let mut bytes = Vec::new();
        member
            .read_to_end(&mut bytes)
            .map_err(|e| fail(path, format!("{name}: {e}")))?;
        let t = read_npy_bytes(&bytes, &path.join(&name))?;
        out.push((name.trim_end_matches(".npy").to_string(), t));
    }
    Ok(out)
}

fn write_one<W: std::io::Write + Seek>(
    npz: &mut NpzWriter<W>,
    name: &str,
    t: &Tensor,
) -> Result<(), String> {
    let r = match t {
        Tensor::F32(a) => npz.add_array(name, a),
        Tensor::F64(a) => npz.add_array(name, a),
        Tensor::I64(a) => npz.add_array(name, a),
        Tensor::I32(a) => npz.add_array(name, a),
        Tensor::I8(a) => npz.add_array(name, a),
        Tensor::U8(a) => npz.add_array(name, a),
        Tensor::Bool(a) => npz.add_array(name, a),
        Tensor::F16(a) => npz.add_array(name, &a.mapv(f32::from)),
        Tensor::BF16(a) => npz.add_array(name, &a.mapv(f32::from)),
    };
    r.map_err(|e| e.to_string())
}

/// Writes named tensors to an `.npz` archive (float16/bfloat16 are widened to float32).
pub fn write_npz(path: &Path, tensors: &[(String, Tensor)]) -> Result<(), NpyError> {
    let file = File::create(path).map_err(|e| fail(path, e))?;
    let mut npz = NpzWriter::new(BufWriter::new(file));
    for (name, t) in tensors {
        write_one(&mut npz, name, t).map_err(|e| fail(path, format!("{name}: {e}")))?;
    }
    npz.finish().map_err(|e| fail(path, e))?;
    Ok(())
}

/// Writes one tensor to an `.npy` file.
pub fn write_npy(path: &Path, t: &Tensor) -> Result<(), NpyError> {
    let file = File::create(path).map_err(|e| fail(path, e))?;
    let w = BufWriter::new(file);
    let r = match t {
        Tensor::F32(a) => a.write_npy(w),
        Tensor::F64(a) => a.write_npy(w),
        Tensor::I64(a) => a.write_npy(w),
        Tensor::I32(a) => a.write_npy(w),
        Tensor::I8(a) => a.write_npy(w),
        Tensor::U8(a) => a.write_npy(w),
        Tensor::Bool(a) => a.write_npy(w),
        Tensor::F16(a) => a.mapv(f32::from).write_npy(w),
        Tensor::BF16(a) => a.mapv(f32::from).write_npy(w),
    };
    r.map_err(|e| fail(path, e))
}
