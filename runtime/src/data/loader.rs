//! Batches from a [`SampleSource`]: parallel decoding, bounded prefetch, a deterministic
//! order per seed and data-parallel sharding (PyTorch's `DataLoader` + `DistributedSampler`,
//! in one type).
//!
//! - **Order**: epoch `e` visits the samples in a permutation drawn from ChaCha8 keyed by
//!   `(seed, e)` (Fisher-Yates with our own unbiased bounded draws), so the order depends only
//!   on the seed, the epoch and the dataset length: not on thread count, timing or the `rand`
//!   release. Without shuffling the order is the source's.
//! - **Sharding**: the epoch's order is padded by repeating its beginning to a multiple of
//!   `world_size` (every rank then takes the same number of steps, as `DistributedSampler`
//!   does) and rank `r` takes positions `r, r + world_size, ...`.
//! - **Parallelism and memory**: one producer thread decodes each batch with rayon
//!   (`par_iter`, results kept in order) and hands it over a channel holding at most
//!   `prefetch` batches; so at most `prefetch + 2` batches (queued, being decoded, held by the
//!   consumer) are in memory. Dropping the iterator stops the producer.
//! - **Bad images**: a missing or undecodable image either stops the epoch with its error
//!   ([`OnBadImage::Fail`]) or is skipped with a warning naming the file
//!   ([`OnBadImage::Skip`]; the batch is then smaller and [`Batch::skipped`] lists it). Other
//!   errors (a mask that does not match its image, a failing transform) always stop.

use std::path::PathBuf;
use std::sync::mpsc::{sync_channel, Receiver};
use std::sync::Arc;
use std::thread::JoinHandle;

use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use super::rng::DetRng;
use super::{DataError, Sample, SampleSource};

/// What to do with a missing or undecodable image.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OnBadImage {
    /// Skip the sample, log a warning naming the file.
    Skip,
    /// Stop with the error.
    #[default]
    Fail,
}

/// This process's part of a data-parallel run.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Shard {
    /// 0-based rank of this process.
    pub rank: usize,
    /// Number of processes.
    pub world_size: usize,
}

impl Default for Shard {
    /// The whole dataset: rank 0 of 1.
    fn default() -> Self {
        Shard {
            rank: 0,
            world_size: 1,
        }
    }
}

/// Loader settings.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct LoaderConfig {
    /// Samples per batch. Default 8.
    pub batch_size: usize,
    /// Visit the samples in a seeded random order each epoch. Default true.
    pub shuffle: bool,
    /// Seed of the epoch permutations. Default 0.
    pub seed: u64,
    /// Drop the last batch of an epoch when it is incomplete. Default false.
    pub drop_last: bool,
    /// Batches decoded ahead of the consumer. Default 2.
    pub prefetch: usize,
    /// Decoding threads: `None` uses rayon's global pool (one per core). Default `None`.
    pub threads: Option<usize>,
    pub shard: Shard,
    /// Default [`OnBadImage::Fail`].
    pub on_bad_image: OnBadImage,
}

impl Default for LoaderConfig {
    fn default() -> Self {
        LoaderConfig {
            batch_size: 8,
            shuffle: true,
            seed: 0,
            drop_last: false,
            prefetch: 2,
            threads: None,
            shard: Shard::default(),
            on_bad_image: OnBadImage::Fail,
        }
    }
}

/// One batch.
#[derive(Debug)]
pub struct Batch<T> {
    pub epoch: u64,
    /// Position of the batch in this rank's epoch.
    pub index: usize,
    /// The decoded (and transformed) samples, in order.
    pub items: Vec<T>,
    /// Source indices of `items`.
    pub indices: Vec<usize>,
    /// Source indices and paths of samples skipped as bad images.
    pub skipped: Vec<(usize, PathBuf)>,
}

type Transform<T> = dyn Fn(Sample) -> Result<T, DataError> + Send + Sync;

/// Turns a source into batches of `T` (by default, [`Sample`]s).
pub struct Loader<T = Sample> {
    source: Arc<dyn SampleSource>,
    config: LoaderConfig,
    transform: Arc<Transform<T>>,
    pool: Option<Arc<rayon::ThreadPool>>,
}

impl Loader<Sample> {
    /// Checks the configuration; builds the decoding pool when `threads` is set.
    pub fn new(source: Arc<dyn SampleSource>, config: LoaderConfig) -> Result<Self, DataError> {
        if config.batch_size == 0 {
            return Err(DataError::config("batch_size", "must be at least 1"));
        }
        if config.prefetch == 0 {
            return Err(DataError::config("prefetch", "must be at least 1"));
        }
        let Shard { rank, world_size } = config.shard;
        if world_size == 0 || rank >= world_size {
            return Err(DataError::config(
                "shard",
                format!("rank {rank} of world size {world_size}: need rank < world size"),
            ));
        }
        let pool = match config.threads {
            None => None,
            Some(0) => return Err(DataError::config("threads", "must be at least 1")),
            Some(n) => Some(Arc::new(
                rayon::ThreadPoolBuilder::new()
                    .num_threads(n)
                    .thread_name(|i| format!("densa-decode-{i}"))
                    .build()
                    .map_err(|e| DataError::config("threads", e.to_string()))?,
            )),
        };
        Ok(Loader {
            source,
            config,
            transform: Arc::new(Ok),
            pool,
        })
    }
}

impl<T: Send + 'static> Loader<T> {
    /// Applies `f` to every sample after decoding, on the decoding threads (resizing,
    /// augmentation, conversion to tensors).
    pub fn map<U, F>(self, f: F) -> Loader<U>
    where
        F: Fn(T) -> Result<U, DataError> + Send + Sync + 'static,
    {
        let inner = self.transform;
        Loader {
            source: self.source,
            config: self.config,
            transform: Arc::new(move |s| f(inner(s)?)),
            pool: self.pool,
        }
    }

    pub fn config(&self) -> &LoaderConfig {
        &self.config
    }

    pub fn source(&self) -> &Arc<dyn SampleSource> {
        &self.source
    }

    /// The source indices this rank visits in `epoch`, in order.
    pub fn epoch_indices(&self, epoch: u64) -> Vec<usize> {
        let n = self.source.len();
        if n == 0 {
            return Vec::new();
        }
        let mut order: Vec<usize> = (0..n).collect();
        if self.config.shuffle {
            DetRng::new(self.config.seed, b"loader\0\0", epoch).shuffle(&mut order);
        }
        let Shard { rank, world_size } = self.config.shard;
        let padded = n.div_ceil(world_size) * world_size;
        (rank..padded)
            .step_by(world_size)
            .map(|p| order[p % n])
            .collect()
    }

    /// Batches per epoch for this rank.
    pub fn batches_per_epoch(&self) -> usize {
        let n = self.epoch_indices(0).len();
        if self.config.drop_last {
            n / self.config.batch_size
        } else {
            n.div_ceil(self.config.batch_size)
        }
    }

    /// Starts decoding `epoch`; the iterator yields its batches in order.
    pub fn epoch(&self, epoch: u64) -> EpochIter<T> {
        let mut batches: Vec<Vec<usize>> = self
            .epoch_indices(epoch)
            .chunks(self.config.batch_size)
            .map(<[usize]>::to_vec)
            .collect();
        if self.config.drop_last
            && batches
                .last()
                .is_some_and(|b| b.len() < self.config.batch_size)
        {
            batches.pop();
        }
        let (sender, receiver) = sync_channel(self.config.prefetch);
        let source = Arc::clone(&self.source);
        let transform = Arc::clone(&self.transform);
        let pool = self.pool.clone();
        let on_bad = self.config.on_bad_image;
        let producer = std::thread::Builder::new()
            .name(format!("densa-loader-epoch-{epoch}"))
            .spawn(move || {
                for (index, indices) in batches.into_iter().enumerate() {
                    let decode = || {
                        indices
                            .par_iter()
                            .map(|&i| source.load(i).and_then(|s| transform(s)))
                            .collect::<Vec<_>>()
                    };
                    let results = match &pool {
                        Some(pool) => pool.install(decode),
                        None => decode(),
                    };
                    let batch = assemble(epoch, index, &indices, results, on_bad, &*source);
                    let stop = batch.is_err();
                    if sender.send(batch).is_err() || stop {
                        return;
                    }
                }
            })
            .ok();
        EpochIter {
            receiver,
            producer,
            spawn_failed: false,
        }
    }
}

fn assemble<T>(
    epoch: u64,
    index: usize,
    indices: &[usize],
    results: Vec<Result<T, DataError>>,
    on_bad: OnBadImage,
    source: &dyn SampleSource,
) -> Result<Batch<T>, DataError> {
    let mut batch = Batch {
        epoch,
        index,
        items: Vec::with_capacity(results.len()),
        indices: Vec::with_capacity(results.len()),
        skipped: Vec::new(),
    };
    for (&i, result) in indices.iter().zip(results) {
        match result {
            Ok(item) => {
                batch.items.push(item);
                batch.indices.push(i);
            }
            Err(e) if e.is_bad_image() && on_bad == OnBadImage::Skip => {
                tracing::warn!("skipping sample {i}: {e}");
                let path = match &e {
                    DataError::Image { path, .. } => path.clone(),
                    _ => source.image_path(i).map(PathBuf::from).unwrap_or_default(),
                };
                batch.skipped.push((i, path));
            }
            Err(e) => return Err(e),
        }
    }
    Ok(batch)
}

/// The batches of one epoch, decoded ahead by a producer thread.
pub struct EpochIter<T> {
    receiver: Receiver<Result<Batch<T>, DataError>>,
    producer: Option<JoinHandle<()>>,
    spawn_failed: bool,
}

impl<T> Iterator for EpochIter<T> {
    type Item = Result<Batch<T>, DataError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.producer.is_none() && !self.spawn_failed {
            self.spawn_failed = true;
            return Some(Err(DataError::config(
                "loader",
                "could not start the decoding thread",
            )));
        }
        self.receiver.recv().ok()
    }
}

impl<T> Drop for EpochIter<T> {
    fn drop(&mut self) {
        // Closing the channel makes the producer's next send fail, so it stops after the batch
        // it is decoding.
        let (_, closed) = sync_channel(1);
        drop(std::mem::replace(&mut self.receiver, closed));
        if let Some(handle) = self.producer.take() {
            let _ = handle.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::image::{write_png_rgb, RgbImage};
    use crate::data::{FolderSpec, ImageFolder};
    use std::path::Path;

    /// A source of `n` tiny in-memory samples whose red channel is the index.
    struct Counting {
        n: usize,
        bad: Vec<usize>,
    }

    impl SampleSource for Counting {
        fn len(&self) -> usize {
            self.n
        }
        fn classes(&self) -> &[String] {
            &[]
        }
        fn segment_classes(&self) -> &[String] {
            &[]
        }
        fn image_path(&self, _: usize) -> Option<&Path> {
            None
        }
        fn load(&self, index: usize) -> Result<Sample, DataError> {
            if self.bad.contains(&index) {
                return Err(DataError::Image {
                    path: format!("img{index}.png").into(),
                    problem: "corrupt".into(),
                });
            }
            Ok(Sample {
                id: index as u64,
                name: index.to_string(),
                path: PathBuf::new(),
                image: RgbImage::from_pixel(1, 1, image::Rgb([index as u8, 0, 0])),
                boxes: Vec::new(),
                mask: None,
            })
        }
    }

    fn loader(n: usize, config: LoaderConfig) -> Loader<usize> {
        Loader::new(Arc::new(Counting { n, bad: vec![] }), config)
            .unwrap()
            .map(|s| Ok(s.image.get_pixel(0, 0).0[0] as usize))
    }

    fn visit(l: &Loader<usize>, epoch: u64) -> Vec<Vec<usize>> {
        l.epoch(epoch).map(|b| b.unwrap().items).collect()
    }

    #[test]
    fn order_is_deterministic_per_seed_and_epoch() {
        let config = |seed, threads| LoaderConfig {
            batch_size: 4,
            seed,
            threads,
            ..LoaderConfig::default()
        };
        let a = visit(&loader(30, config(1, Some(1))), 0);
        let b = visit(&loader(30, config(1, Some(3))), 0);
        assert_eq!(a, b, "same seed, different thread counts");
        let flat: Vec<usize> = a.concat();
        let mut sorted = flat.clone();
        sorted.sort();
        assert_eq!(sorted, (0..30).collect::<Vec<_>>(), "each sample once");
        assert_eq!(a.len(), 8);
        assert_eq!(a.last().unwrap().len(), 2);
        assert_ne!(
            flat,
            visit(&loader(30, config(2, None)), 0).concat(),
            "other seed"
        );
        assert_ne!(
            flat,
            visit(&loader(30, config(1, None)), 1).concat(),
            "other epoch"
        );
        // The items match the indices the loader reports.
        let l = loader(30, config(1, None));
        assert_eq!(flat, l.epoch_indices(0));
        let unshuffled = loader(
            5,
            LoaderConfig {
                shuffle: false,
                batch_size: 2,
                ..LoaderConfig::default()
            },
        );
        assert_eq!(visit(&unshuffled, 3), vec![vec![0, 1], vec![2, 3], vec![4]]);
    }

    #[test]
    fn shards_partition_the_epoch_with_equal_lengths() {
        let n = 10;
        let shards: Vec<Vec<usize>> = (0..3)
            .map(|rank| {
                loader(
                    n,
                    LoaderConfig {
                        shard: Shard {
                            rank,
                            world_size: 3,
                        },
                        seed: 5,
                        ..LoaderConfig::default()
                    },
                )
                .epoch_indices(0)
            })
            .collect();
        assert!(shards.iter().all(|s| s.len() == 4), "{shards:?}");
        let mut all: Vec<usize> = shards.concat();
        all.sort();
        all.dedup();
        assert_eq!(all, (0..n).collect::<Vec<_>>());
        assert!(Loader::new(
            Arc::new(Counting { n, bad: vec![] }),
            LoaderConfig {
                shard: Shard {
                    rank: 3,
                    world_size: 3
                },
                ..LoaderConfig::default()
            }
        )
        .is_err());
    }

    #[test]
    fn drop_last_and_early_drop() {
        let l = loader(
            10,
            LoaderConfig {
                batch_size: 4,
                drop_last: true,
                prefetch: 1,
                ..LoaderConfig::default()
            },
        );
        assert_eq!(l.batches_per_epoch(), 2);
        assert!(visit(&l, 0).iter().all(|b| b.len() == 4));
        let mut it = l.epoch(1);
        assert!(it.next().is_some());
        drop(it); // must not hang with the producer blocked on a full channel
    }

    #[test]
    fn bad_images_are_skipped_or_fail_per_flag() {
        let source = Arc::new(Counting { n: 6, bad: vec![4] });
        let config = |on_bad_image| LoaderConfig {
            batch_size: 3,
            shuffle: false,
            on_bad_image,
            ..LoaderConfig::default()
        };
        let skip = Loader::new(source.clone(), config(OnBadImage::Skip)).unwrap();
        let batches: Vec<_> = skip.epoch(0).map(Result::unwrap).collect();
        assert_eq!(batches[1].indices, vec![3, 5]);
        assert_eq!(batches[1].skipped, vec![(4, PathBuf::from("img4.png"))]);
        let fail = Loader::new(source, config(OnBadImage::Fail)).unwrap();
        let results: Vec<_> = fail.epoch(0).collect();
        assert_eq!(results.len(), 2, "stops at the failing batch");
        let msg = results[1].as_ref().unwrap_err().to_string();
        assert!(msg.contains("img4.png: bad image: corrupt"), "{msg}");
    }

    #[test]
    fn corrupt_file_in_a_folder_is_skipped_with_its_path_or_fails() {
        let dir = tempfile::tempdir().unwrap();
        for name in ["a.png", "c.png"] {
            write_png_rgb(&dir.path().join(name), &RgbImage::new(2, 2)).unwrap();
        }
        std::fs::write(dir.path().join("b.png"), b"\x89PNG\r\n\x1a\n truncated").unwrap();
        let folder = Arc::new(
            ImageFolder::open(&FolderSpec {
                root: dir.path().into(),
            })
            .unwrap(),
        );
        let config = |on_bad_image| LoaderConfig {
            batch_size: 8,
            on_bad_image,
            ..LoaderConfig::default()
        };
        let skip = Loader::new(folder.clone(), config(OnBadImage::Skip)).unwrap();
        let batch = skip.epoch(0).next().unwrap().unwrap();
        assert_eq!(batch.items.len(), 2);
        assert_eq!(batch.skipped, vec![(1, dir.path().join("b.png"))]);
        let fail = Loader::new(folder, config(OnBadImage::Fail)).unwrap();
        let msg = fail.epoch(0).next().unwrap().unwrap_err().to_string();
        assert!(msg.contains("b.png: bad image"), "{msg}");
    }
}
