//! The error type of every dataset reader, the loader and the synthetic scene writer.
//!
//! Each variant names the file; field-level problems also name the field as a path inside the
//! file, in the file's own vocabulary: `<object>[2]/<bndbox>/<xmax>` for VOC XML (indices
//! count from 1, as XPath does), `annotations[3].bbox` for COCO JSON (indices from 0, as in
//! JSON tooling), `line 4, cx` for YOLO labels, `pixel (x, y)` for masks.

use std::path::{Path, PathBuf};

/// Errors of the data layer.
#[derive(Debug, thiserror::Error)]
pub enum DataError {
    /// A file or directory could not be read or written.
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// An image is missing or cannot be decoded. [`OnBadImage`](super::OnBadImage) decides
    /// whether the loader skips the sample or stops.
    #[error("{path}: bad image: {problem}")]
    Image { path: PathBuf, problem: String },
    /// The file is not well-formed (XML or JSON syntax, PNG structure).
    #[error("{path}: {problem}")]
    Syntax { path: PathBuf, problem: String },
    /// A field of a well-formed file has a bad or missing value.
    #[error("{path}: {field}: {problem}")]
    Field {
        path: PathBuf,
        field: String,
        problem: String,
    },
    /// The dataset's layout is not as expected (missing directory, no images, unpaired files).
    #[error("{path}: {problem}")]
    Layout { path: PathBuf, problem: String },
    /// A configuration value is out of range.
    #[error("invalid {field}: {problem}")]
    Config { field: String, problem: String },
}

impl DataError {
    /// True for a missing or undecodable image: the one failure a loader may skip.
    pub fn is_bad_image(&self) -> bool {
        matches!(self, DataError::Image { .. })
    }

    pub(crate) fn io(path: &Path, source: std::io::Error) -> Self {
        DataError::Io {
            path: path.to_path_buf(),
            source,
        }
    }

    pub(crate) fn field(path: &Path, field: impl Into<String>, problem: impl Into<String>) -> Self {
        DataError::Field {
            path: path.to_path_buf(),
            field: field.into(),
            problem: problem.into(),
        }
    }

    pub(crate) fn syntax(path: &Path, problem: impl Into<String>) -> Self {
        DataError::Syntax {
            path: path.to_path_buf(),
            problem: problem.into(),
        }
    }

    pub(crate) fn layout(path: &Path, problem: impl Into<String>) -> Self {
        DataError::Layout {
            path: path.to_path_buf(),
            problem: problem.into(),
        }
    }

    pub(crate) fn config(field: impl Into<String>, problem: impl Into<String>) -> Self {
        DataError::Config {
            field: field.into(),
            problem: problem.into(),
        }
    }
}

/// Quotes a value found in a file for an error message, shortened if long.
pub(crate) fn quoted(text: &str) -> String {
    const MAX: usize = 40;
    if text.chars().count() > MAX {
        let head: String = text.chars().take(MAX).collect();
        format!("{head:?}...")
    } else {
        format!("{text:?}")
    }
}
