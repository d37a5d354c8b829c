//! Unlabelled images as pretraining samples: each sample is the method's views of one image
//! (`view0`, `view1`, ...) plus its per-sample host inputs.
//!
//! Images are decoded once at start, in parallel; files that don't decode are reported and
//! skipped (the run goes on with the others). Decoded images are kept in memory when they fit in
//! [`CACHE_BYTES`], else decoded again per sample.
//!
//! Methods that need more than the views per sample (the decoded image, its index, the step:
//! CCOP's proposals and curriculum) get them through [`Pretext::sample_inputs`]; the step
//! reaches the samples through [`PretextSource`], which sets it from each batch's position
//! before making the batch (so a batch stays a function of its position, and resumes are
//! exact). Per-image preparation ([`Pretext::prepare_image`]) runs in [`PretextSamples::prepare`].

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use densa_exporter::Tensor;
use densa_runtime::augment::{SampleSeed, ViewConfig};
use densa_runtime::data::image::{is_image_file, read_rgb};
use densa_runtime::train::{Batch, BatchAt, DataError, DataSource, Samples, Shuffled};
use image::RgbImage;
use rand::Rng;
use rand_chacha::ChaCha8Rng;
use rayon::prelude::*;

use super::{Pretext, PretextContext, SampleInfo};

/// Decoded images are cached up to this many bytes (RGB8).
pub const CACHE_BYTES: usize = 1 << 30;

/// An image file that could not be used, and why.
#[derive(Clone, Debug)]
pub struct Skipped {
    pub path: PathBuf,
    pub problem: String,
}

/// The image files under `dir` (recursively, sorted), e.g. a `densa synth` output's `images/`.
pub fn image_files(dir: &Path) -> Result<Vec<PathBuf>, DataError> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let entries = std::fs::read_dir(&d).map_err(|e| DataError::Source {
            source_name: d.display().to_string(),
            message: format!("cannot list the folder: {e}"),
        })?;
        for e in entries {
            let path = e
                .map_err(|e| DataError::Source {
                    source_name: d.display().to_string(),
                    message: e.to_string(),
                })?
                .path();
            if path.is_dir() {
                stack.push(path);
            } else if is_image_file(&path) {
                out.push(path);
            }
        }
    }
    out.sort();
    Ok(out)
}

/// Pretraining samples of one method over a list of image files.
pub struct PretextSamples {
    files: Vec<PathBuf>,
    cache: Option<Vec<RgbImage>>,
    views: Vec<ViewConfig>,
    method: Arc<dyn Pretext>,
    ctx: PretextContext,
    /// Steps completed before the batch being made, and the run's total (0: unknown).
    step: AtomicU64,
    total: AtomicU64,
}

impl PretextSamples {
    /// Decodes every file (in parallel); returns the samples over the ones that decode and the
    /// ones skipped.
    pub fn new(
        files: Vec<PathBuf>,
        method: Arc<dyn Pretext>,
        ctx: PretextContext,
    ) -> (PretextSamples, Vec<Skipped>) {
        let decoded: Vec<Result<RgbImage, String>> = files
            .par_iter()
            .map(|p| read_rgb(p).map_err(|e| e.to_string()))
            .collect();
        let mut kept = Vec::new();
        let mut images = Vec::new();
        let mut skipped = Vec::new();
        for (path, r) in files.into_iter().zip(decoded) {
            match r {
                Ok(img) => {
                    kept.push(path);
                    images.push(img);
                }
                Err(problem) => skipped.push(Skipped { path, problem }),
            }
        }
        let bytes: usize = images.iter().map(|i| i.as_raw().len()).sum();
        let cache = (bytes <= CACHE_BYTES).then_some(images);
        let views = method.views(ctx.image_size);
        (
            PretextSamples {
                files: kept,
                cache,
                views,
                method,
                ctx,
                step: AtomicU64::new(0),
                total: AtomicU64::new(0),
            },
            skipped,
        )
    }

    /// The files used.
    pub fn files(&self) -> &[PathBuf] {
        &self.files
    }

    /// Sets the step the next samples belong to (see [`PretextSource`]).
    pub fn set_step(&self, step: u64) {
        self.step.store(step, Ordering::Relaxed);
    }

    /// Sets the run's total steps (for curricula; 0 = unknown).
    pub fn set_total_steps(&self, total: u64) {
        self.total.store(total, Ordering::Relaxed);
    }

    /// Runs the method's per-image preparation ([`Pretext::prepare_image`]) over every image,
    /// in parallel, calling `tick` after each; a no-op for methods that prepare nothing.
    pub fn prepare(&self, tick: &(dyn Fn() + Sync)) -> Result<(), DataError> {
        if !self.method.prepares_images() {
            return Ok(());
        }
        (0..self.files.len()).into_par_iter().try_for_each(|i| {
            let path = &self.files[i];
            let source = |message: String| DataError::Source {
                source_name: path.display().to_string(),
                message,
            };
            let decoded;
            let img = match &self.cache {
                Some(c) => &c[i],
                None => {
                    decoded = read_rgb(path).map_err(|e| source(e.to_string()))?;
                    &decoded
                }
            };
            self.method
                .prepare_image(i, img)
                .map_err(|e| source(e.to_string()))?;
            tick();
            Ok(())
        })
    }
}

/// A [`Shuffled`] source of pretext samples that tells the samples the step of each batch
/// before making it ([`PretextSamples::set_step`]).
pub struct PretextSource {
    inner: Shuffled<PretextSamples>,
}

impl PretextSource {
    pub fn new(inner: Shuffled<PretextSamples>) -> PretextSource {
        PretextSource { inner }
    }

    /// The samples.
    pub fn samples(&self) -> &PretextSamples {
        self.inner.samples()
    }
}

impl DataSource for PretextSource {
    fn batches_per_epoch(&self) -> u64 {
        self.inner.batches_per_epoch()
    }

    fn batch(&mut self, at: BatchAt) -> Result<Batch, DataError> {
        self.inner.samples().set_step(at.step);
        self.inner.batch(at)
    }

    fn describe(&self) -> String {
        self.inner.describe()
    }
}

impl Samples for PretextSamples {
    fn len(&self) -> usize {
        self.files.len()
    }

    fn sample(&mut self, index: usize, rng: &mut ChaCha8Rng) -> Result<Batch, DataError> {
        let path = &self.files[index];
        let decoded;
        let img = match &self.cache {
            Some(c) => &c[index],
            None => {
                decoded = read_rgb(path).map_err(|e| DataError::Source {
                    source_name: path.display().to_string(),
                    message: e.to_string(),
                })?;
                &decoded
            }
        };
        let seed = SampleSeed::new(rng.next_u64(), 0, index as u64, 0);
        let views: Vec<_> = self
            .views
            .iter()
            .enumerate()
            .map(|(k, v)| v.apply(img, seed.with_view(k as u64)))
            .collect();
        let mut out: Batch = views
            .iter()
            .enumerate()
            .map(|(k, v)| (format!("view{k}"), Tensor::F32(v.pixels.clone().into_dyn())))
            .collect();
        let info = SampleInfo {
            image: img,
            index,
            step: self.step.load(Ordering::Relaxed),
            total: self.total.load(Ordering::Relaxed),
        };
        let host = self
            .method
            .sample_inputs(&self.ctx, &info, &views)
            .map_err(|e| DataError::Source {
                source_name: path.display().to_string(),
                message: e.to_string(),
            })?;
        out.extend(host);
        Ok(out)
    }

    fn describe(&self) -> String {
        format!(
            "{} images for {}",
            self.files.len(),
            self.method.info().name
        )
    }
}
