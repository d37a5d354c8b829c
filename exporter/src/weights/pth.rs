//! PyTorch zip checkpoints, as `torch.save` writes them since torch 1.6.
//!
//! The archive holds `<dir>/data.pkl` (the pickled object), `<dir>/data/<key>` (one file of raw
//! elements per storage) and optionally `<dir>/byteorder` (`little` when absent). `<dir>` is
//! the stem of the file name at save time, so it is found rather than assumed.

use std::collections::HashMap;
use std::fs::File;
use std::io::{BufReader, Read, Seek, SeekFrom};
use std::path::Path;
use std::rc::Rc;

use ndarray::{ArrayD, IxDyn};
use zip::result::ZipError;
use zip::ZipArchive;

use super::pickle::{unpickle, PickleValue, StorageRef, TensorSource};
use super::{StateDict, WeightsError, ZIP_MAGIC};
use crate::tensor::Tensor;

/// Tensors built from views may total at most twice the storage bytes read, plus this (views
/// overlap, e.g. a weight and its transpose; expanded views repeat elements).
const VIEW_SLACK_BYTES: u128 = 64 << 20;

/// The start of a pre-1.6 torch file: a pickle whose first value is torch's magic number
/// 0x1950a86a20f9469cfc6c (LONG1 of 10 bytes).
pub(crate) fn looks_like_legacy_torch(head: &[u8]) -> bool {
    const MAGIC: &[u8] = b"\x8a\x0a\x6c\xfc\x9c\x46\xf9\x20\x6a\xa8\x50\x19";
    head.len() >= 2 + MAGIC.len() && head[0] == 0x80 && head[2..].starts_with(MAGIC)
}

/// Reads a PyTorch zip checkpoint and picks its state dict as [`select_state_dict`] does.
pub fn load_pth(path: &Path) -> Result<StateDict, WeightsError> {
    select_state_dict(load_pth_tree(path)?, path)
}

/// Reads a PyTorch zip checkpoint into the tree of values it pickles (dicts, lists, numbers,
/// strings, tensors), for callers that pick the state dict themselves (e.g. an EMA copy).
///
/// Nothing is executed: any global beyond what `torch.save` emits for tensors is refused.
pub fn load_pth_tree(path: &Path) -> Result<PickleValue, WeightsError> {
    let mut file = File::open(path).map_err(WeightsError::io(path))?;
    let file_len = file.metadata().map_err(WeightsError::io(path))?.len();
    let mut head = Vec::with_capacity(16);
    (&mut file)
        .take(16)
        .read_to_end(&mut head)
        .map_err(WeightsError::io(path))?;
    if head.is_empty() {
        return Err(WeightsError::Empty {
            path: path.to_path_buf(),
        });
    }
    if looks_like_legacy_torch(&head) {
        return Err(WeightsError::LegacyTorch {
            path: path.to_path_buf(),
        });
    }
    if !head.starts_with(ZIP_MAGIC) {
        return Err(zip_error(
            path,
            "the file does not start with a zip signature",
        ));
    }
    file.seek(SeekFrom::Start(0))
        .map_err(WeightsError::io(path))?;
    let zip = ZipArchive::new(BufReader::new(file))
        .map_err(|e| zip_error(path, format!("{e}; the file may be truncated")))?;
    let mut archive = Archive::open(zip, path, file_len)?;
    let pickle = archive.read_entry(&format!("{}/data.pkl", archive.dir))?;
    unpickle(&pickle, path, &mut archive)
}

fn zip_error(path: &Path, message: impl Into<String>) -> WeightsError {
    WeightsError::Zip {
        path: path.to_path_buf(),
        message: message.into(),
    }
}

/// The state dict of a checkpoint tree.
///
/// The top-level dict when it holds tensors (`torch.save(model.state_dict())`); otherwise its
/// `state_dict` or `model` entry (training checkpoints such as `{"epoch", "state_dict",
/// "optimizer"}`), when exactly one of them is a dict of tensors. Non-tensor entries are
/// dropped. `path` is only used in messages and recorded as the source.
pub fn select_state_dict(tree: PickleValue, path: &Path) -> Result<StateDict, WeightsError> {
    let no_state_dict = |message: String| WeightsError::NoStateDict {
        path: path.to_path_buf(),
        message,
    };
    let PickleValue::Dict(items) = tree else {
        return Err(no_state_dict(format!(
            "the checkpoint holds a {}, not a dict",
            tree.kind()
        )));
    };
    let holds_tensors = |items: &[(PickleValue, PickleValue)]| {
        items
            .iter()
            .any(|(_, v)| matches!(v, PickleValue::Tensor(_)))
    };
    if holds_tensors(&items) {
        return Ok(tensors_of(items, path));
    }
    const NESTED: [&str; 2] = ["state_dict", "model"];
    let mut nested: Vec<(PickleValue, PickleValue)> = Vec::new();
    let mut keys = Vec::with_capacity(items.len());
    for (key, value) in items {
        keys.push(match &key {
            PickleValue::Str(s) => format!("`{s}`"),
            other => format!("a {} key", other.kind()),
        });
        let is_nested = key.as_str().is_some_and(|k| NESTED.contains(&k));
        if is_nested && value.as_dict().is_some_and(holds_tensors) {
            nested.push((key, value));
        }
    }
    match nested.len() {
        1 => {
            let Some((_, PickleValue::Dict(items))) = nested.pop() else {
                unreachable!("only dicts are kept")
            };
            Ok(tensors_of(items, path))
        }
        0 => {
            Err(no_state_dict(format!(
            "the top-level dict holds no tensors and neither `state_dict` nor `model` is a dict \
             of tensors; top-level keys: {}",
            if keys.is_empty() { "none".to_string() } else { keys.join(", ") }
        )))
        }
        _ => Err(no_state_dict(
            "both `state_dict` and `model` hold tensors; pick one with load_pth_tree".to_string(),
        )),
    }
}

fn tensors_of(items: Vec<(PickleValue, PickleValue)>, path: &Path) -> StateDict {
    let mut sd: StateDict = items
        .into_iter()
        .filter_map(|(k, v)| match (k, v) {
            (PickleValue::Str(k), PickleValue::Tensor(t)) => Some((k, t)),
            _ => None,
        })
        .collect();
    sd.set_source(Some(path.to_path_buf()));
    sd
}

/// The open archive: where its records are, and the storages read so far.
struct Archive<'p> {
    zip: ZipArchive<BufReader<File>>,
    path: &'p Path,
    file_len: u64,
    /// The directory of `data.pkl` inside the archive.
    dir: String,
    big_endian: bool,
    storages: HashMap<String, Rc<Vec<u8>>>,
    storage_bytes: u128,
    tensor_bytes: u128,
}

impl<'p> Archive<'p> {
    fn open(
        zip: ZipArchive<BufReader<File>>,
        path: &'p Path,
        file_len: u64,
    ) -> Result<Archive<'p>, WeightsError> {
        let names: Vec<&str> = zip.file_names().collect();
        let mut dirs: Vec<&str> = names
            .iter()
            .filter_map(|n| n.strip_suffix("/data.pkl"))
            .filter(|d| !d.is_empty() && !d.contains('/'))
            .collect();
        dirs.sort_unstable();
        let Some(&dir) = dirs.first() else {
            return Err(zip_error(
                path,
                "a zip archive without `<dir>/data.pkl`, so not a PyTorch checkpoint",
            ));
        };
        let torchscript = names.iter().any(|n| {
            *n == format!("{dir}/constants.pkl") || n.starts_with(&format!("{dir}/code/"))
        });
        if torchscript {
            return Err(WeightsError::TorchScript {
                path: path.to_path_buf(),
            });
        }
        let mut archive = Archive {
            dir: dir.to_string(),
            zip,
            path,
            file_len,
            big_endian: false,
            storages: HashMap::new(),
            storage_bytes: 0,
            tensor_bytes: 0,
        };
        let byteorder = format!("{}/byteorder", archive.dir);
        if archive.zip.index_for_name(&byteorder).is_some() {
            let order = archive.read_entry(&byteorder)?;
            archive.big_endian = match order.trim_ascii() {
                b"little" => false,
                b"big" => true,
                other => {
                    return Err(WeightsError::Malformed {
                        path: path.to_path_buf(),
                        message: format!(
                            "`{byteorder}` says {:?}, expected `little` or `big`",
                            String::from_utf8_lossy(other)
                        ),
                    })
                }
            };
        }
        Ok(archive)
    }

    /// The bytes of the record `name`, read as far as they really go: the size its header
    /// claims is trusted only up to the size of the file for the initial allocation.
    fn read_entry(&mut self, name: &str) -> Result<Vec<u8>, WeightsError> {
        let mut entry = self.zip.by_name(name).map_err(|e| match e {
            ZipError::FileNotFound => zip_error(self.path, format!("`{name}` is missing")),
            other => zip_error(self.path, format!("`{name}`: {other}")),
        })?;
        let claimed = entry.size();
        let mut bytes = Vec::with_capacity(claimed.min(self.file_len) as usize);
        (&mut entry)
            .take(claimed)
            .read_to_end(&mut bytes)
            .map_err(|e| zip_error(self.path, format!("reading `{name}`: {e}")))?;
        Ok(bytes)
    }

    fn storage(&mut self, storage: &StorageRef) -> Result<Rc<Vec<u8>>, WeightsError> {
        if let Some(bytes) = self.storages.get(&storage.key) {
            return Ok(bytes.clone());
        }
        let entry = format!("{}/data/{}", self.dir, storage.key);
        if self.zip.index_for_name(&entry).is_none() {
            return Err(WeightsError::MissingStorage {
                path: self.path.to_path_buf(),
                key: storage.key.clone(),
                entry,
            });
        }
        let bytes = Rc::new(self.read_entry(&entry)?);
        self.storage_bytes += bytes.len() as u128;
        self.storages.insert(storage.key.clone(), bytes.clone());
        Ok(bytes)
    }
}

impl TensorSource for Archive<'_> {
    fn rebuild(
        &mut self,
        storage: &StorageRef,
        offset: usize,
        size: &[usize],
        stride: &[usize],
    ) -> Result<Tensor, WeightsError> {
        let bytes = self.storage(storage)?;
        let elem = storage.kind.elem_size();
        let too_short = |needed: u128, what: String| WeightsError::StorageTooShort {
            path: self.path.to_path_buf(),
            key: storage.key.clone(),
            needed,
            available: bytes.len(),
            what,
        };
        let declared = storage.len as u128 * elem as u128;
        if declared > bytes.len() as u128 {
            return Err(too_short(
                declared,
                format!(
                    "the pickle declares {} elements of torch.{}",
                    storage.len,
                    storage.kind.torch_name()
                ),
            ));
        }
        let view = || format!("a tensor of size {size:?}, stride {stride:?} at offset {offset}");
        let malformed = |message: String| WeightsError::Malformed {
            path: self.path.to_path_buf(),
            message,
        };
        let Some(numel) = size
            .iter()
            .try_fold(1u128, |n, &d| n.checked_mul(d as u128))
            .filter(|&n| n <= usize::MAX as u128)
        else {
            return Err(malformed(format!(
                "{} has more elements than memory can hold",
                view()
            )));
        };
        if numel > 0 {
            let last = size
                .iter()
                .zip(stride)
                .try_fold(offset as u128, |acc, (&n, &s)| {
                    (n as u128 - 1)
                        .checked_mul(s as u128)
                        .and_then(|x| x.checked_add(acc))
                });
            match last {
                Some(last) if last < storage.len as u128 => {}
                _ => {
                    let needed = last.map_or(u128::MAX, |l| (l + 1).saturating_mul(elem as u128));
                    return Err(too_short(needed, view()));
                }
            }
        }
        let out_bytes = numel * elem as u128;
        self.tensor_bytes += out_bytes;
        if self.tensor_bytes > 2 * self.storage_bytes + VIEW_SLACK_BYTES {
            return Err(malformed(format!(
                "tensor views total {} bytes from {} bytes of storages; refusing to expand them \
                 (last: {})",
                self.tensor_bytes,
                self.storage_bytes,
                view()
            )));
        }
        let data = gather(&bytes, elem, offset, size, stride, self.big_endian);
        let tensor = match storage.kind.dtype() {
            Some(dtype) => Tensor::from_le_bytes(dtype, size, &data),
            // int16, which densa lacks, widens to int32.
            None => {
                let values = data
                    .chunks_exact(2)
                    .map(|c| i32::from(i16::from_le_bytes([c[0], c[1]])));
                ArrayD::from_shape_vec(IxDyn(size), values.collect())
                    .ok()
                    .map(Tensor::I32)
            }
        };
        tensor.ok_or_else(|| too_short(out_bytes, view()))
    }
}

/// The elements of a strided view, row-major, as little-endian bytes. The caller has checked
/// that every index is inside `storage`.
fn gather(
    storage: &[u8],
    elem: usize,
    offset: usize,
    size: &[usize],
    stride: &[usize],
    big_endian: bool,
) -> Vec<u8> {
    let numel: usize = size.iter().product();
    let mut out = Vec::with_capacity(numel * elem);
    let contiguous = {
        let mut expected = 1;
        size.iter().zip(stride).rev().all(|(&n, &s)| {
            let ok = n <= 1 || s == expected;
            expected *= n;
            ok
        })
    };
    if numel == 0 {
    } else if contiguous {
        out.extend_from_slice(&storage[offset * elem..(offset + numel) * elem]);
    } else {
        // An odometer over the index, moving the storage position by strides.
        let mut index = vec![0usize; size.len()];
        let mut pos = offset;
        for _ in 0..numel {
            out.extend_from_slice(&storage[pos * elem..(pos + 1) * elem]);
            for d in (0..size.len()).rev() {
                index[d] += 1;
                if index[d] < size[d] {
                    pos += stride[d];
                    break;
                }
                index[d] = 0;
                pos -= (size[d] - 1) * stride[d];
            }
        }
    }
    if big_endian && elem > 1 {
        for e in out.chunks_exact_mut(elem) {
            e.reverse();
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    use half::{bf16, f16};
    use serde_json::Value;

    use super::*;
    use crate::tensor::DType;
    use crate::weights::test_util::fixture;
    use crate::weights::{load, match_parameters};

    /// Compares a tensor with its `expected.json` entry exactly.
    fn assert_matches_json(name: &str, tensor: &Tensor, expected: &Value) {
        assert_eq!(
            tensor.dtype().name(),
            expected["dtype"].as_str().unwrap(),
            "{name}"
        );
        let shape: Vec<usize> = expected["shape"]
            .as_array()
            .unwrap()
            .iter()
            .map(|d| d.as_u64().unwrap() as usize)
            .collect();
        assert_eq!(tensor.shape(), shape.as_slice(), "{name}");
        let values = expected["values"].as_array().unwrap();
        let f64s = || values.iter().map(|v| v.as_f64().unwrap());
        let i64s = || values.iter().map(|v| v.as_i64().unwrap());
        let same = match tensor {
            Tensor::F32(a) => a.iter().copied().eq(f64s().map(|v| v as f32)),
            Tensor::F64(a) => a.iter().copied().eq(f64s()),
            Tensor::F16(a) => a.iter().copied().eq(f64s().map(f16::from_f64)),
            Tensor::BF16(a) => a.iter().copied().eq(f64s().map(bf16::from_f64)),
            Tensor::I64(a) => a.iter().copied().eq(i64s()),
            Tensor::I32(a) => a.iter().map(|&v| i64::from(v)).eq(i64s()),
            Tensor::I8(a) => a.iter().map(|&v| i64::from(v)).eq(i64s()),
            Tensor::U8(a) => a.iter().map(|&v| i64::from(v)).eq(i64s()),
            Tensor::Bool(a) => a
                .iter()
                .copied()
                .eq(values.iter().map(|v| v.as_bool().unwrap())),
        };
        assert!(same, "{name}: {tensor:?} != {values:?}");
    }

    /// `expected.json`: (name, {dtype, shape, values}) in state dict order.
    fn expected() -> Vec<(String, Value)> {
        let text = std::fs::read_to_string(fixture("expected.json")).unwrap();
        let entries: Vec<Value> = serde_json::from_str(&text).unwrap();
        entries
            .into_iter()
            .map(|e| (e["name"].as_str().unwrap().to_string(), e))
            .collect()
    }

    #[test]
    fn pth_plain_state_dict_matches_torch() {
        let expected = expected();
        for file in ["plain.pth", "plain_proto4.pth"] {
            let sd = load_pth(&fixture(file)).unwrap();
            assert_eq!(
                sd.names().collect::<Vec<_>>(),
                expected.iter().map(|(n, _)| n.as_str()).collect::<Vec<_>>(),
                "{file}"
            );
            for (name, value) in &expected {
                assert_matches_json(name, sd.get(name).unwrap(), value);
            }
        }
    }

    #[test]
    fn pth_views_are_materialised_with_their_strides() {
        let sd = load_pth(&fixture("plain.pth")).unwrap();
        // transposed = (arange(12) / 4 - 1).reshape(3, 4).t()
        let t = sd.get("transposed").unwrap().as_f32().unwrap();
        assert_eq!(t.shape(), &[4, 3]);
        assert_eq!(t[[1, 2]], 9.0 / 4.0 - 1.0);
        // shared_b = (arange(10) * 0.5)[4:10:2], a strided view at offset 4 of shared_a's storage.
        assert_eq!(
            sd.get("shared_b")
                .unwrap()
                .as_f32()
                .unwrap()
                .as_slice()
                .unwrap(),
            &[2.0, 3.0, 4.0]
        );
        assert_eq!(
            sd.get("expanded")
                .unwrap()
                .as_f32()
                .unwrap()
                .as_slice()
                .unwrap(),
            &[1.5; 3]
        );
        assert_eq!(sd.get("scalar").unwrap().shape(), &[] as &[usize]);
    }

    #[test]
    fn pth_nested_checkpoint_keeps_its_tree_and_unnests() {
        let path = fixture("nested.pth");
        let tree = load_pth_tree(&path).unwrap();
        assert_eq!(tree.get("epoch"), Some(&PickleValue::Int(3)));
        assert_eq!(
            tree.get("arch").and_then(PickleValue::as_str),
            Some("resnet50")
        );
        assert_eq!(tree.get("best_acc"), Some(&PickleValue::Float(71.5)));
        let groups = tree
            .get("optimizer")
            .and_then(|o| o.get("param_groups"))
            .unwrap();
        let PickleValue::List(groups) = groups else {
            panic!("{groups:?}")
        };
        assert_eq!(groups[0].get("lr"), Some(&PickleValue::Float(0.03)));
        assert_eq!(groups[0].get("nesterov"), Some(&PickleValue::Bool(false)));

        let sd = load(&path).unwrap();
        assert_eq!(sd.source(), Some(path.as_path()));
        assert!(sd.contains("module.encoder_q.conv.weight") && sd.contains("module.queue"));

        let expected = expected();
        let params: Vec<(String, Vec<usize>)> = expected
            .iter()
            .map(|(k, v)| {
                let shape = v["shape"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|d| d.as_u64().unwrap() as usize);
                (k.clone(), shape.collect())
            })
            .collect();
        let matched = match_parameters(&sd, &params, None).unwrap();
        assert_eq!(matched.prefix, "module.encoder_q.");
        assert_eq!(
            matched.unexpected,
            ["module.encoder_q.fc.weight", "module.queue"]
        );
        for (name, value) in &expected {
            let tensor = matched.tensors.get(name).unwrap();
            let dtype = value["dtype"].as_str().unwrap();
            if matches!(dtype, "float16" | "bfloat16" | "float32" | "float64") {
                // Float parameters come out as f32.
                assert_eq!(tensor.dtype(), DType::F32, "{name}");
            } else {
                assert_matches_json(name, tensor, value);
            }
        }
        assert_eq!(
            matched
                .tensors
                .get("double")
                .unwrap()
                .as_f32()
                .unwrap()
                .as_slice()
                .unwrap(),
            &[1.0f32 / 3.0, -2.0, 0.0, 7.5]
        );
    }

    #[test]
    fn pth_malicious_pickle_is_refused_without_running_it() {
        let marker = Path::new("/tmp/densa-weights-fixture-pwned");
        let _ = std::fs::remove_file(marker);
        let path = fixture("malicious.pth");
        for result in [load(&path).map(|_| ()), load_pth_tree(&path).map(|_| ())] {
            let e = result.unwrap_err();
            assert!(
                matches!(&e, WeightsError::ForbiddenGlobal { global, .. } if global == "os.system"),
                "{e}"
            );
            let msg = e.to_string();
            assert!(
                msg.contains("malicious.pth") && msg.contains("`os.system`"),
                "{msg}"
            );
        }
        assert!(!marker.exists());
    }

    /// A torch-like archive with the given records, as `<dir>/<name>`.
    fn archive(dir: &Path, records: &[(&str, &[u8])]) -> std::path::PathBuf {
        let path = dir.join("made.pth");
        let mut zip = zip::ZipWriter::new(File::create(&path).unwrap());
        let options = zip::write::SimpleFileOptions::default()
            .compression_method(zip::CompressionMethod::Stored);
        for (name, bytes) in records {
            zip.start_file(format!("made/{name}"), options).unwrap();
            zip.write_all(bytes).unwrap();
        }
        zip.finish().unwrap();
        path
    }

    /// `{"w": _rebuild_tensor_v2(storage "0" of `len` floats, offset, size, stride)}`.
    fn tensor_pickle(len: u8, offset: u8, size: &[u8], stride: &[u8]) -> Vec<u8> {
        let ints = |v: &[u8]| v.iter().flat_map(|&i| [b'K', i]).collect::<Vec<u8>>();
        [
            b"\x80\x02}X\x01\x00\x00\x00wctorch._utils\n_rebuild_tensor_v2\n((X\x07\x00\x00\x00storage"
                .as_slice(),
            b"ctorch\nFloatStorage\nX\x01\x00\x00\x000X\x03\x00\x00\x00cpu",
            &[b'K', len],
            b"tQ",
            &[b'K', offset],
            b"(",
            &ints(size),
            b"t(",
            &ints(stride),
            b"t\x89N",
            b"tRs.",
        ]
        .concat()
    }

    /// Archive records: (name under `made/`, bytes).
    type Records = Vec<(&'static str, Vec<u8>)>;

    #[test]
    fn pth_storage_problems_are_errors_naming_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let floats: Vec<u8> = (0..6).flat_map(|i| (i as f32).to_le_bytes()).collect();
        let cases: Vec<(Records, &str)> = vec![
            // data/0 missing
            (
                vec![("data.pkl", tensor_pickle(6, 0, &[2, 3], &[3, 1]))],
                "`made/data/0` is missing",
            ),
            // the storage holds 6 floats but the pickle declares 8
            (
                vec![
                    ("data.pkl", tensor_pickle(8, 0, &[2, 3], &[3, 1])),
                    ("data/0", floats.clone()),
                ],
                "declares 8 elements",
            ),
            // the view reaches element 6 of 6
            (
                vec![
                    ("data.pkl", tensor_pickle(6, 1, &[2, 3], &[3, 1])),
                    ("data/0", floats.clone()),
                ],
                "offset 1",
            ),
            (vec![("data/0", floats.clone())], "without `<dir>/data.pkl`"),
            (
                vec![
                    ("data.pkl", tensor_pickle(6, 0, &[2, 3], &[3, 1])),
                    ("data/0", floats.clone()),
                    ("byteorder", b"middle".to_vec()),
                ],
                "`little` or `big`",
            ),
            (
                vec![
                    ("data.pkl", b"\x80\x02K\x01.".to_vec()),
                    ("constants.pkl", vec![]),
                    ("code/x.py", vec![]),
                ],
                "TorchScript",
            ),
            (
                vec![("data.pkl", b"\x80\x02K\x01.".to_vec())],
                "holds a int, not a dict",
            ),
            (
                vec![("data.pkl", b"\x80\x02}.".to_vec())],
                "top-level keys: none",
            ),
        ];
        for (records, expected) in cases {
            let records: Vec<(&str, &[u8])> =
                records.iter().map(|(n, b)| (*n, b.as_slice())).collect();
            let path = archive(dir.path(), &records);
            let e = load_pth(&path).unwrap_err().to_string();
            assert!(
                e.contains("made.pth") && e.contains(expected),
                "{expected}: {e}"
            );
        }
    }

    #[test]
    fn pth_big_endian_archives_are_swapped() {
        let dir = tempfile::tempdir().unwrap();
        let floats: Vec<u8> = (0..6).flat_map(|i| (i as f32).to_be_bytes()).collect();
        let pickle = tensor_pickle(6, 0, &[3, 2], &[1, 3]);
        let path = archive(
            dir.path(),
            &[
                ("data.pkl", &pickle),
                ("data/0", &floats),
                ("byteorder", b"big"),
            ],
        );
        let sd = load_pth(&path).unwrap();
        assert_eq!(
            sd.get("w").unwrap().as_f32().unwrap().as_slice().unwrap(),
            &[0., 3., 1., 4., 2., 5.]
        );
    }

    #[test]
    fn pth_zero_stride_views_cannot_expand_without_bound() {
        let dir = tempfile::tempdir().unwrap();
        // One float viewed as 255^4 elements (16 GB) with zero strides.
        let pickle = tensor_pickle(1, 0, &[255, 255, 255, 255], &[0, 0, 0, 0]);
        let path = archive(
            dir.path(),
            &[("data.pkl", &pickle), ("data/0", &1f32.to_le_bytes())],
        );
        let e = load_pth(&path).unwrap_err().to_string();
        assert!(
            e.contains("made.pth") && e.contains("refusing to expand"),
            "{e}"
        );
    }

    #[test]
    fn pth_gather_walks_strides() {
        let storage: Vec<u8> = (0u8..12).collect();
        // A (3, 2) view with strides (1, 4) at offset 1 of a 12-element byte storage.
        assert_eq!(
            gather(&storage, 1, 1, &[3, 2], &[1, 4], false),
            [1, 5, 2, 6, 3, 7]
        );
        assert_eq!(
            gather(&storage, 1, 2, &[2, 2], &[2, 1], false),
            [2, 3, 4, 5]
        );
        assert_eq!(gather(&storage, 2, 0, &[2], &[3], true), [1, 0, 7, 6]);
        assert_eq!(
            gather(&storage, 1, 0, &[0, 3], &[3, 1], false),
            [] as [u8; 0]
        );
        assert_eq!(gather(&storage, 1, 5, &[], &[], false), [5]);
    }
}
