//! Datasets: readers for the formats densa trains and evaluates on, one in-memory sample type,
//! a parallel deterministic loader, and the synthetic scene generator.
//!
//! | format | module | gives |
//! | --- | --- | --- |
//! | COCO instances JSON (+ optional semantic mask PNGs) | [`coco_source`], types in [`coco`] | boxes, `iscrowd`, masks |
//! | Pascal VOC (`Annotations/*.xml`, `SegmentationClass/*.png`) | [`voc`] | boxes with `difficult`/`truncated`, or masks |
//! | semantic masks as PNG (palette or gray; VOC and Cityscapes conventions) | [`mask`] | masks |
//! | YOLO txt (`class cx cy w h`, normalised) | [`yolo`] | boxes |
//! | image folders (unlabeled pretraining) | [`folder`] | images only |
//! | synthetic scenes (`densa synth`) | [`synth`] | writes COCO JSON + images + masks |
//!
//! Every reader implements [`SampleSource`]: it indexes the dataset when opened (parsing and
//! validating every annotation file, so a bad label fails early and names its file and field)
//! and decodes images lazily in [`SampleSource::load`]. [`SourceSpec`] describes any of them
//! (serde, for configuration files) and [`open`] opens it. [`Loader`] turns a source into
//! batches: parallel decoding, bounded prefetch, a per-seed epoch order and data-parallel
//! sharding.
//!
//! Conventions (ours): boxes are `[x0, y0, x1, y1]` in pixels of the stored image, continuous
//! coordinates with the top-left corner of the image at `(0, 0)` (a box covering exactly
//! pixel column 3 spans `x0 = 3, x1 = 4`); semantic masks hold class indices into
//! [`SampleSource::segment_classes`] with [`IGNORE_INDEX`] (255) for pixels that count as
//! neither right nor wrong.

pub mod coco;
pub mod coco_source;
mod error;
pub mod folder;
pub mod image;
pub mod loader;
pub mod mask;
mod rng;
pub mod synth;
pub mod voc;
pub mod yolo;

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

pub use self::coco_source::{CocoSource, CocoSpec};
pub use self::error::DataError;
pub use self::folder::{FolderSpec, ImageFolder};
pub use self::image::{GrayImage, RgbImage};
pub use self::loader::{Batch, EpochIter, Loader, LoaderConfig, OnBadImage, Shard};
pub use self::mask::{MaskConvention, MaskSource, MaskSpec};
pub use self::voc::{VocSource, VocSpec, VocTask};
pub use self::yolo::{YoloSource, YoloSpec};

/// Mask value of pixels that are ignored by losses and metrics (VOC's object boundaries,
/// Cityscapes' unlabeled classes).
pub const IGNORE_INDEX: u8 = 255;

/// A semantic mask: one class index per pixel (into [`SampleSource::segment_classes`]),
/// [`IGNORE_INDEX`] for ignored pixels. Same size as its image.
pub type SemanticMask = GrayImage;

/// One object box.
#[derive(Clone, Debug, PartialEq)]
pub struct BoxAnnotation {
    /// `[x0, y0, x1, y1]` in pixels, continuous coordinates (see the module docs).
    pub xyxy: [f32; 4],
    /// Index into [`SampleSource::classes`].
    pub class: usize,
    /// VOC's `difficult`: excluded from VOC AP (neither a hit nor a miss).
    pub difficult: bool,
    /// VOC's `truncated`: the object extends beyond the image.
    pub truncated: bool,
    /// COCO's `iscrowd`: a region of many objects, ignored by COCO AP.
    pub iscrowd: bool,
}

impl BoxAnnotation {
    /// A plain box: not difficult, truncated or crowd.
    pub fn new(xyxy: [f32; 4], class: usize) -> Self {
        BoxAnnotation {
            xyxy,
            class,
            difficult: false,
            truncated: false,
            iscrowd: false,
        }
    }
}

/// One decoded sample, whatever the format it came from.
#[derive(Clone, Debug)]
pub struct Sample {
    /// Numeric id: the COCO image id for COCO sources, else the 1-based position in the
    /// source's sorted order (so any source can be written out as COCO ground truth).
    pub id: u64,
    /// Stable name: the VOC/COCO/YOLO image id or file stem, the relative path in folders.
    pub name: String,
    /// The image file.
    pub path: PathBuf,
    pub image: RgbImage,
    /// Object boxes (empty for unlabeled and mask-only sources).
    pub boxes: Vec<BoxAnnotation>,
    /// Semantic mask, same size as `image`, when the source has one.
    pub mask: Option<SemanticMask>,
}

/// A dataset: an indexed list of samples that decode on demand. Implementations are cheap to
/// share between threads (the loader decodes in parallel).
pub trait SampleSource: Send + Sync {
    /// Number of samples.
    fn len(&self) -> usize;
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Object class names: [`BoxAnnotation::class`] indexes this. Empty without boxes.
    fn classes(&self) -> &[String];
    /// Names of the semantic mask values: value `v` is `segment_classes()[v]` (255 =
    /// ignore). Empty without masks.
    fn segment_classes(&self) -> &[String];
    /// The image file of sample `index`, `None` out of range.
    fn image_path(&self, index: usize) -> Option<&Path>;
    /// Decodes sample `index` (image, annotations already validated when opened, mask).
    fn load(&self, index: usize) -> Result<Sample, DataError>;
}

/// Which dataset to open and where: one variant per format. As JSON:
/// `{"format": "voc", "root": "VOCdevkit/VOC2012", "split": "val"}`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "format", rename_all = "snake_case")]
pub enum SourceSpec {
    Coco(CocoSpec),
    Voc(VocSpec),
    Yolo(YoloSpec),
    Masks(MaskSpec),
    Folder(FolderSpec),
}

/// Opens (indexes and validates) the dataset a spec describes.
pub fn open(spec: &SourceSpec) -> Result<Box<dyn SampleSource>, DataError> {
    Ok(match spec {
        SourceSpec::Coco(s) => Box::new(CocoSource::open(s)?),
        SourceSpec::Voc(s) => Box::new(VocSource::open(s)?),
        SourceSpec::Yolo(s) => Box::new(YoloSource::open(s)?),
        SourceSpec::Masks(s) => Box::new(MaskSource::open(s)?),
        SourceSpec::Folder(s) => Box::new(ImageFolder::open(s)?),
    })
}

/// Error for an index past the end of a source.
pub(crate) fn out_of_range(index: usize, len: usize) -> DataError {
    DataError::config(
        "sample index",
        format!("{index} is out of range for a dataset of {len} samples"),
    )
}

/// Reads a whole file, naming it on failure.
pub(crate) fn read_file(path: &Path) -> Result<Vec<u8>, DataError> {
    std::fs::read(path).map_err(|e| DataError::io(path, e))
}
