//! Weight import: safetensors files and PyTorch checkpoints, matched against a model's
//! parameters.
//!
//! - [`load`] reads either format, told apart by content (the extension is only a hint for the
//!   error message), into a [`StateDict`].
//! - [`load_safetensors`] / [`save_safetensors`]: the `safetensors` format, written atomically.
//! - [`load_pth`] / [`load_pth_tree`]: PyTorch's zip checkpoints (`torch.save` since 1.6). The
//!   pickle inside is read by a restricted unpickler that never executes anything: it knows the
//!   handful of globals `torch.save` emits for tensors and containers and refuses every other
//!   one, so a checkpoint that asks for `os.system` is an error that names it. Legacy (pre-1.6,
//!   non-zip) checkpoints are refused with the way to convert them.
//! - [`match_parameters`] picks, from a state dict, the tensors a model expects, detecting key
//!   prefixes such as `module.` (DataParallel) or `module.encoder_q.` (MoCo), and reports
//!   missing, unexpected and wrong-shape keys in one readable error.
//!
//! Choices that are ours: floating-point parameters are converted to `f32` on matching (the
//! graphs are built in `f32`); `int16` (torch and safetensors) and safetensors' `U16`/`U32`,
//! which [`DType`] lacks, are widened losslessly to `int32`/`int64`; a checkpoint's non-tensor
//! content (epoch, optimizer hyper-parameters) is parsed and available through
//! [`load_pth_tree`], but [`load_pth`] keeps only the tensors of the state dict.
//!
//! [`DType`]: crate::tensor::DType

use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};

mod matching;
mod pickle;
mod pth;
mod safetensors;
mod state_dict;

pub use self::matching::{match_parameters, strip_prefix, Matched};
pub use self::pickle::PickleValue;
pub use self::pth::{load_pth, load_pth_tree, select_state_dict};
pub use self::safetensors::{load_safetensors, save_safetensors};
pub use self::state_dict::StateDict;

/// A parameter whose shape in the file differs: (expected name, expected shape, shape in the
/// file).
pub type WrongShape = (String, Vec<usize>, Vec<usize>);

/// Why weights could not be read, written or matched to a model.
#[derive(Debug, thiserror::Error)]
pub enum WeightsError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: the file is empty, not a weights file")]
    Empty { path: PathBuf },
    #[error("{path}: not a weights file densa reads (expected a safetensors file or a PyTorch zip checkpoint){hint}")]
    UnknownFormat { path: PathBuf, hint: String },
    #[error("{path}: legacy PyTorch serialization (torch < 1.6) is not supported; re-save it with torch.save(..., _use_new_zipfile_serialization=True)")]
    LegacyTorch { path: PathBuf },
    #[error("{path}: a TorchScript archive, not a checkpoint; save `model.state_dict()` with torch.save instead")]
    TorchScript { path: PathBuf },
    #[error("{path}: not a valid safetensors file: {message}")]
    Safetensors { path: PathBuf, message: String },
    #[error("{path}: tensor `{key}` has element type {dtype}, which densa does not handle")]
    UnsupportedDtype {
        path: PathBuf,
        key: String,
        dtype: String,
    },
    #[error("{path}: the checkpoint holds a `{storage_type}`, a storage type densa does not read (quantized and complex tensors are not supported)")]
    UnsupportedStorage { path: PathBuf, storage_type: String },
    #[error("{path}: not a valid PyTorch zip checkpoint: {message}")]
    Zip { path: PathBuf, message: String },
    #[error("{path}: {message}")]
    Malformed { path: PathBuf, message: String },
    #[error("refusing to load {path}: the pickle asks for global `{global}`; only tensor data is accepted")]
    ForbiddenGlobal { path: PathBuf, global: String },
    #[error("{path}: malformed pickle at byte {offset}: {message}")]
    Pickle {
        path: PathBuf,
        offset: usize,
        message: String,
    },
    #[error("{path}: storage `{key}` is referenced by the pickle but `{entry}` is missing from the archive")]
    MissingStorage {
        path: PathBuf,
        key: String,
        entry: String,
    },
    #[error(
        "{path}: storage `{key}` holds {available} bytes, but {needed} bytes are needed ({what})"
    )]
    StorageTooShort {
        path: PathBuf,
        key: String,
        needed: u128,
        available: usize,
        what: String,
    },
    #[error("{path}: no state dict found: {message}")]
    NoStateDict { path: PathBuf, message: String },
    #[error("{}", matching::mismatch_message(.file.as_deref(), .prefix, .missing, .wrong_shape, .unexpected))]
    Mismatch {
        /// The file the state dict came from, when known.
        file: Option<PathBuf>,
        /// The key prefix the report is for (`""` for none).
        prefix: String,
        /// Expected parameter names the file lacks.
        missing: Vec<String>,
        /// File keys no expected parameter used, as named in the file (batch counters left
        /// out: they are never a problem).
        unexpected: Vec<String>,
        /// (expected name, expected shape, shape in the file).
        wrong_shape: Box<[WrongShape]>,
    },
    #[error("{}: several key prefixes fit every parameter of the model: {}; pass --strip-prefix with the one to use", matching::file_label(.file.as_deref()), matching::prefix_list(.candidates))]
    AmbiguousPrefix {
        file: Option<PathBuf>,
        candidates: Vec<String>,
    },
}

impl WeightsError {
    pub(crate) fn io(path: &Path) -> impl FnOnce(std::io::Error) -> WeightsError + '_ {
        move |source| WeightsError::Io {
            path: path.to_path_buf(),
            source,
        }
    }
}

/// The zip local-file-header signature, which every PyTorch (>= 1.6) checkpoint starts with.
const ZIP_MAGIC: &[u8] = b"PK\x03\x04";

/// Reads a safetensors file or a PyTorch zip checkpoint, told apart by content.
///
/// For a checkpoint, the state dict is picked as [`select_state_dict`] does.
pub fn load(path: &Path) -> Result<StateDict, WeightsError> {
    let mut head = Vec::with_capacity(16);
    let file_len = {
        let file = File::open(path).map_err(WeightsError::io(path))?;
        let len = file.metadata().map_err(WeightsError::io(path))?.len();
        file.take(16)
            .read_to_end(&mut head)
            .map_err(WeightsError::io(path))?;
        len
    };
    if head.is_empty() {
        return Err(WeightsError::Empty {
            path: path.to_path_buf(),
        });
    }
    if head.starts_with(ZIP_MAGIC) {
        return load_pth(path);
    }
    if safetensors::looks_like_safetensors(&head, file_len) {
        return load_safetensors(path);
    }
    if pth::looks_like_legacy_torch(&head) {
        return Err(WeightsError::LegacyTorch {
            path: path.to_path_buf(),
        });
    }
    let extension = path
        .extension()
        .and_then(|e| e.to_str())
        .unwrap_or("")
        .to_ascii_lowercase();
    match extension.as_str() {
        // The content decides; the extension only sharpens the message.
        "safetensors" => load_safetensors(path),
        "pth" | "pt" | "bin" | "ckpt" => Err(WeightsError::UnknownFormat {
            path: path.to_path_buf(),
            hint: format!(
                "; the `.{extension}` extension suggests a PyTorch checkpoint, but the file does \
                 not start with a zip signature"
            ),
        }),
        _ => Err(WeightsError::UnknownFormat {
            path: path.to_path_buf(),
            hint: String::new(),
        }),
    }
}

#[cfg(test)]
pub(crate) mod test_util {
    use std::path::PathBuf;

    /// A file of `tests/fixtures/weights/`.
    pub fn fixture(name: &str) -> PathBuf {
        PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures/weights")
            .join(name)
    }
}

#[cfg(test)]
mod tests {
    use super::test_util::fixture;
    use super::*;

    fn write(dir: &Path, name: &str, bytes: &[u8]) -> PathBuf {
        let path = dir.join(name);
        std::fs::write(&path, bytes).unwrap();
        path
    }

    #[test]
    fn load_dispatches_on_content_not_extension() {
        let dir = tempfile::tempdir().unwrap();
        let pth = std::fs::read(fixture("plain.pth")).unwrap();
        let st = std::fs::read(fixture("plain.safetensors")).unwrap();
        // Swapped extensions: the content wins.
        let from_pth = load(&write(dir.path(), "a.safetensors", &pth)).unwrap();
        let from_st = load(&write(dir.path(), "b.pth", &st)).unwrap();
        assert_eq!(from_pth.len(), from_st.len());
        assert_eq!(from_pth.get("conv.weight"), from_st.get("conv.weight"));
    }

    #[test]
    fn load_empty_and_random_files_are_clean_errors() {
        let dir = tempfile::tempdir().unwrap();
        let empty = write(dir.path(), "empty.pth", b"");
        let e = load(&empty).unwrap_err().to_string();
        assert!(e.contains("empty.pth") && e.contains("empty"), "{e}");

        let random: Vec<u8> = (0..997u32)
            .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
            .collect();
        let noise = write(dir.path(), "noise.pth", &random);
        let e = load(&noise).unwrap_err().to_string();
        assert!(
            e.contains("noise.pth") && e.contains("zip signature"),
            "{e}"
        );

        let noise = write(dir.path(), "noise.dat", &random);
        let e = load(&noise).unwrap_err();
        assert!(matches!(e, WeightsError::UnknownFormat { .. }), "{e}");

        let e = load(&dir.path().join("absent.safetensors")).unwrap_err();
        assert!(
            matches!(e, WeightsError::Io { .. }) && e.to_string().contains("absent.safetensors")
        );
    }

    #[test]
    fn load_refuses_legacy_torch_pickles_with_the_way_out() {
        let dir = tempfile::tempdir().unwrap();
        // The start of a torch < 1.6 file: protocol 2, then LONG1 of torch's magic number.
        let legacy = write(
            dir.path(),
            "old.pth",
            b"\x80\x02\x8a\x0al\xfc\x9cF\xf9 j\xa8P\x19.",
        );
        let e = load(&legacy).unwrap_err().to_string();
        assert!(
            e.contains("old.pth") && e.contains("_use_new_zipfile_serialization=True"),
            "{e}"
        );
    }

    #[test]
    fn load_truncated_checkpoint_is_a_clean_error() {
        let dir = tempfile::tempdir().unwrap();
        let pth = std::fs::read(fixture("plain.pth")).unwrap();
        for cut in [4, 100, pth.len() / 2, pth.len() - 10] {
            let path = write(dir.path(), "cut.pth", &pth[..cut]);
            let e = load(&path).unwrap_err().to_string();
            assert!(e.contains("cut.pth"), "{cut}: {e}");
        }
    }
}
