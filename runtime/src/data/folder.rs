//! Plain image folders, for unlabeled (self-supervised) pretraining.
//!
//! Every file with an image extension ([`IMAGE_EXTENSIONS`](super::image::IMAGE_EXTENSIONS),
//! any case) under the root, recursively, in sorted relative-path order (component by
//! component, so the order is the same on every platform and file system). Hidden entries
//! (names starting with `.`) and symbolic links to directories are not followed; symbolic
//! links to files are.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::image::{is_image_file, read_rgb};
use super::{out_of_range, DataError, Sample, SampleSource};

/// An image folder.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct FolderSpec {
    pub root: PathBuf,
}

/// The images of a folder tree.
#[derive(Debug)]
pub struct ImageFolder {
    root: PathBuf,
    /// Paths relative to `root`, sorted.
    files: Vec<PathBuf>,
    paths: Vec<PathBuf>,
}

impl ImageFolder {
    /// Lists the images under `spec.root`. No images at all is an error.
    pub fn open(spec: &FolderSpec) -> Result<Self, DataError> {
        let files = list_images(&spec.root)?;
        if files.is_empty() {
            return Err(DataError::layout(
                &spec.root,
                "no images found (looked recursively for .jpg, .jpeg, .png, .bmp, .webp)",
            ));
        }
        let paths = files.iter().map(|f| spec.root.join(f)).collect();
        Ok(ImageFolder {
            root: spec.root.clone(),
            files,
            paths,
        })
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Paths relative to the root, in the source's order.
    pub fn relative_paths(&self) -> &[PathBuf] {
        &self.files
    }
}

impl SampleSource for ImageFolder {
    fn len(&self) -> usize {
        self.files.len()
    }

    fn classes(&self) -> &[String] {
        &[]
    }

    fn segment_classes(&self) -> &[String] {
        &[]
    }

    fn image_path(&self, index: usize) -> Option<&Path> {
        self.paths.get(index).map(PathBuf::as_path)
    }

    fn load(&self, index: usize) -> Result<Sample, DataError> {
        let path = self
            .paths
            .get(index)
            .ok_or_else(|| out_of_range(index, self.len()))?;
        Ok(Sample {
            id: index as u64 + 1,
            name: self.files[index].to_string_lossy().into_owned(),
            path: path.clone(),
            image: read_rgb(path)?,
            boxes: Vec::new(),
            mask: None,
        })
    }
}

/// Image files under `root`, recursively, as sorted paths relative to `root`.
pub fn list_images(root: &Path) -> Result<Vec<PathBuf>, DataError> {
    let mut found = Vec::new();
    walk(root, Path::new(""), &mut found)?;
    found.sort();
    Ok(found)
}

fn walk(root: &Path, relative: &Path, found: &mut Vec<PathBuf>) -> Result<(), DataError> {
    let dir = root.join(relative);
    let entries = std::fs::read_dir(&dir).map_err(|e| DataError::io(&dir, e))?;
    for entry in entries {
        let entry = entry.map_err(|e| DataError::io(&dir, e))?;
        let name = entry.file_name();
        if name.to_string_lossy().starts_with('.') {
            continue;
        }
        let rel = relative.join(&name);
        let kind = entry
            .file_type()
            .map_err(|e| DataError::io(&entry.path(), e))?;
        if kind.is_dir() {
            walk(root, &rel, found)?;
        } else if is_image_file(&rel) && (kind.is_file() || entry.path().is_file()) {
            found.push(rel);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::image::{write_png_rgb, RgbImage};

    #[test]
    fn lists_recursively_in_sorted_order_and_skips_other_files() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        std::fs::create_dir_all(root.join("b/deep")).unwrap();
        std::fs::create_dir_all(root.join("a")).unwrap();
        std::fs::create_dir_all(root.join(".cache")).unwrap();
        let img = RgbImage::new(4, 4);
        for p in [
            "z.png",
            "b/deep/x.PNG",
            "a/y.png",
            "b/a.png",
            ".cache/h.png",
        ] {
            write_png_rgb(&root.join(p), &img).unwrap();
        }
        std::fs::write(root.join("a/notes.txt"), "x").unwrap();
        let folder = ImageFolder::open(&FolderSpec { root: root.into() }).unwrap();
        let names: Vec<_> = folder
            .relative_paths()
            .iter()
            .map(|p| p.to_string_lossy().replace('\\', "/"))
            .collect();
        assert_eq!(names, ["a/y.png", "b/a.png", "b/deep/x.PNG", "z.png"]);
        let s = folder.load(2).unwrap();
        assert_eq!((s.id, s.image.dimensions()), (3, (4, 4)));
        assert!(s.boxes.is_empty() && s.mask.is_none());
        assert!(folder.load(4).is_err());
    }

    #[test]
    fn empty_or_missing_folder_is_a_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        let msg = ImageFolder::open(&FolderSpec {
            root: dir.path().into(),
        })
        .unwrap_err()
        .to_string();
        assert!(msg.contains("no images found"), "{msg}");
        let missing = dir.path().join("nope");
        let msg = ImageFolder::open(&FolderSpec { root: missing })
            .unwrap_err()
            .to_string();
        assert!(msg.contains("nope"), "{msg}");
    }
}
