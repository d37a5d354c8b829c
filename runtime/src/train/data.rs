//! Where batches come from: [`DataSource`], and [`Shuffled`] for data sets of samples.
//!
//! Exact resume needs batches that depend on nothing but their position: a data source is a
//! function of [`BatchAt`] (seed, epoch, index in the epoch). [`Shuffled`] turns a data set of
//! samples ([`Samples`]) into such a source: each epoch visits the samples in a permutation
//! drawn from ChaCha8 seeded with the run's seed on stream `epoch`, cut into batches (the last
//! partial batch is dropped, so every batch has the same shape), stacked on a new axis 0.
//! Each sample gets its own ChaCha8 generator (seed, stream derived from epoch and position)
//! for augmentation, so a sample's augmentation does not depend on what ran before it.

use densa_exporter::Tensor;
use ndarray::{ArrayD, Axis};
use rand::{RngExt, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// Batches of named tensors (names are the artifact's `batch` inputs).
pub type Batch = Vec<(String, Tensor)>;

/// The position of a batch in the run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BatchAt {
    /// The run's seed.
    pub seed: u64,
    /// Epoch, from 0.
    pub epoch: u64,
    /// Batch index within the epoch, from 0.
    pub index: u64,
    /// Steps completed before this batch in the whole run.
    pub step: u64,
}

impl BatchAt {
    /// A ChaCha8 generator for this batch alone (augmentation, sampling), independent of
    /// every other batch's.
    pub fn rng(&self) -> ChaCha8Rng {
        let mut rng = ChaCha8Rng::seed_from_u64(self.seed);
        rng.set_stream(mix(self.epoch, self.index));
        rng
    }
}

/// Why a batch could not be made.
#[derive(Debug, thiserror::Error)]
pub enum DataError {
    #[error("{source_name}: {message}")]
    Source {
        source_name: String,
        message: String,
    },
    #[error("{source_name}: sample {index}: tensor `{name}` is {got}, earlier samples of the batch had {expected}")]
    Ragged {
        source_name: String,
        index: usize,
        name: String,
        expected: String,
        got: String,
    },
    #[error("{source_name}: {samples} samples make no batch of {batch_size}")]
    TooSmall {
        source_name: String,
        samples: usize,
        batch_size: usize,
    },
}

/// A source of training batches, deterministic in [`BatchAt`].
///
/// The same `at` must give the same batch, whatever was asked before: that is what makes a
/// resumed run equal to an uninterrupted one.
pub trait DataSource {
    /// Batches in one epoch (at least 1).
    fn batches_per_epoch(&self) -> u64;
    /// The batch at `at`.
    fn batch(&mut self, at: BatchAt) -> Result<Batch, DataError>;
    /// A short description recorded in checkpoints (`coco:train2017 x16`).
    fn describe(&self) -> String {
        String::from("data")
    }
}

/// A data set of samples, each a set of named tensors without the batch axis.
pub trait Samples {
    /// Number of samples.
    fn len(&self) -> usize;
    /// Whether there are none.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Sample `index`; `rng` is this sample's own generator (for augmentation).
    fn sample(&mut self, index: usize, rng: &mut ChaCha8Rng) -> Result<Batch, DataError>;
    /// A short description (`synthetic-regression n=256`).
    fn describe(&self) -> String {
        String::from("samples")
    }
}

impl<S: Samples + ?Sized> Samples for Box<S> {
    fn len(&self) -> usize {
        (**self).len()
    }
    fn sample(&mut self, index: usize, rng: &mut ChaCha8Rng) -> Result<Batch, DataError> {
        (**self).sample(index, rng)
    }
    fn describe(&self) -> String {
        (**self).describe()
    }
}

/// Batches of `batch_size` samples in a fresh permutation each epoch (or in order when
/// `shuffle` is false); the last partial batch is dropped.
pub struct Shuffled<S> {
    samples: S,
    batch_size: usize,
    shuffle: bool,
    order: Option<(u64, u64, Vec<usize>)>,
    /// (rank, ranks): this source yields rank's slice of each global batch.
    shard: (usize, usize),
}

impl<S: Samples> Shuffled<S> {
    /// Batches of `batch_size` from `samples`, shuffled each epoch.
    pub fn new(samples: S, batch_size: usize) -> Result<Shuffled<S>, DataError> {
        if batch_size == 0 || samples.len() < batch_size {
            return Err(DataError::TooSmall {
                source_name: samples.describe(),
                samples: samples.len(),
                batch_size,
            });
        }
        Ok(Shuffled {
            samples,
            batch_size,
            shuffle: true,
            order: None,
            shard: (0, 1),
        })
    }

    /// Rank `rank` of `ranks`'s share of a data-parallel run (see
    /// [`distributed`](super::distributed)): the global batch of `ranks * batch_size` samples
    /// at each position is the batch one process with that batch size would get (same order,
    /// same per-sample generators); this source yields its rows `rank * batch_size ..
    /// (rank + 1) * batch_size`. Epochs have `len / (ranks * batch_size)` batches.
    pub fn shard(mut self, rank: usize, ranks: usize) -> Result<Shuffled<S>, DataError> {
        if ranks == 0 || rank >= ranks || self.samples.len() < self.batch_size * ranks {
            return Err(DataError::TooSmall {
                source_name: format!("{} (rank {rank} of {ranks})", self.samples.describe()),
                samples: self.samples.len(),
                batch_size: self.batch_size * ranks.max(1),
            });
        }
        self.shard = (rank, ranks);
        Ok(self)
    }

    /// Visits the samples in order instead (evaluation, debugging).
    pub fn in_order(mut self) -> Shuffled<S> {
        self.shuffle = false;
        self
    }

    /// The samples.
    pub fn samples(&self) -> &S {
        &self.samples
    }

    fn order(&mut self, seed: u64, epoch: u64) -> &[usize] {
        let fresh = !matches!(&self.order, Some((s, e, _)) if *s == seed && *e == epoch);
        if fresh {
            let order = epoch_order(self.samples.len(), seed, epoch, self.shuffle);
            self.order = Some((seed, epoch, order));
        }
        &self.order.as_ref().expect("set above").2
    }
}

/// The visiting order of `n` samples in `epoch`: Fisher-Yates over ChaCha8 seeded with
/// `seed` on stream `epoch` (identity when not shuffling).
pub fn epoch_order(n: usize, seed: u64, epoch: u64, shuffle: bool) -> Vec<usize> {
    let mut order: Vec<usize> = (0..n).collect();
    if shuffle {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        rng.set_stream(epoch);
        for i in (1..n).rev() {
            let j = rng.random_range(0..=i);
            order.swap(i, j);
        }
    }
    order
}

impl<S: Samples> DataSource for Shuffled<S> {
    fn batches_per_epoch(&self) -> u64 {
        (self.samples.len() / (self.batch_size * self.shard.1)) as u64
    }

    fn batch(&mut self, at: BatchAt) -> Result<Batch, DataError> {
        let (rank, ranks) = self.shard;
        let start = (at.index as usize * ranks + rank) * self.batch_size;
        let size = self.batch_size;
        let indices: Vec<usize> = self.order(at.seed, at.epoch)[start..start + size].to_vec();
        let mut parts = Vec::with_capacity(indices.len());
        for (k, &index) in indices.iter().enumerate() {
            let mut rng = ChaCha8Rng::seed_from_u64(at.seed);
            rng.set_stream(mix(at.epoch, (start + k) as u64) ^ 0x5a5a_5a5a_5a5a_5a5a);
            parts.push((index, self.samples.sample(index, &mut rng)?));
        }
        stack(&parts, &self.samples.describe())
    }

    fn describe(&self) -> String {
        let shard = match self.shard {
            (_, 1) => String::new(),
            (r, n) => format!(" shard={r}/{n}"),
        };
        format!(
            "{} batch={}{}{shard}",
            self.samples.describe(),
            self.batch_size,
            if self.shuffle { "" } else { " in-order" }
        )
    }
}

/// Stacks samples (`(sample index, tensors)`) into a batch along a new axis 0.
pub fn stack(parts: &[(usize, Batch)], source_name: &str) -> Result<Batch, DataError> {
    let Some((_, first)) = parts.first() else {
        return Ok(Vec::new());
    };
    let mut out = Vec::with_capacity(first.len());
    for (name, t0) in first {
        let mut views: Vec<&Tensor> = Vec::with_capacity(parts.len());
        for (index, sample) in parts {
            let found = sample.iter().find(|(n, _)| n == name).map(|(_, t)| t);
            let describe = |t: &Tensor| format!("{} {:?}", t.dtype(), t.shape());
            match found {
                Some(t) if t.dtype() == t0.dtype() && t.shape() == t0.shape() => views.push(t),
                other => {
                    return Err(DataError::Ragged {
                        source_name: source_name.to_string(),
                        index: *index,
                        name: name.clone(),
                        expected: describe(t0),
                        got: other.map(describe).unwrap_or_else(|| "missing".into()),
                    })
                }
            }
        }
        out.push((name.clone(), stack_tensors(&views)));
    }
    Ok(out)
}

fn stack_tensors(ts: &[&Tensor]) -> Tensor {
    fn go<T: Clone>(arrays: Vec<&ArrayD<T>>) -> ArrayD<T> {
        let views: Vec<_> = arrays.iter().map(|a| a.view()).collect();
        ndarray::stack(Axis(0), &views).expect("same shapes checked")
    }
    macro_rules! each {
        ($($v:ident),*) => {
            match ts[0] {
                $(Tensor::$v(_) => Tensor::$v(go(ts.iter().map(|t| match t {
                    Tensor::$v(a) => a,
                    _ => unreachable!("same dtype checked"),
                }).collect())),)*
            }
        };
    }
    each!(F32, F64, F16, BF16, I64, I32, I8, U8, Bool)
}

/// Mixes two counters into a stream number (SplitMix64 finaliser).
fn mix(a: u64, b: u64) -> u64 {
    let mut z = a
        .wrapping_mul(0x9e37_79b9_7f4a_7c15)
        .wrapping_add(b)
        .wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// A data source from a closure of [`BatchAt`] (tests, procedural data).
pub struct FnSource<F> {
    batches_per_epoch: u64,
    f: F,
    name: String,
}

impl<F: FnMut(BatchAt) -> Result<Batch, DataError>> FnSource<F> {
    /// `batches_per_epoch` batches per epoch made by `f`.
    pub fn new(name: &str, batches_per_epoch: u64, f: F) -> FnSource<F> {
        FnSource {
            batches_per_epoch: batches_per_epoch.max(1),
            f,
            name: name.into(),
        }
    }
}

impl<F: FnMut(BatchAt) -> Result<Batch, DataError>> DataSource for FnSource<F> {
    fn batches_per_epoch(&self) -> u64 {
        self.batches_per_epoch
    }
    fn batch(&mut self, at: BatchAt) -> Result<Batch, DataError> {
        (self.f)(at)
    }
    fn describe(&self) -> String {
        self.name.clone()
    }
}

/// Counts of each sample in a set of orders (for tests).
#[cfg(test)]
fn histogram(orders: &[Vec<usize>]) -> std::collections::HashMap<usize, usize> {
    let mut h = std::collections::HashMap::new();
    for o in orders {
        for &i in o {
            *h.entry(i).or_insert(0) += 1;
        }
    }
    h
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Counting(usize);

    impl Samples for Counting {
        fn len(&self) -> usize {
            self.0
        }
        fn sample(&mut self, index: usize, rng: &mut ChaCha8Rng) -> Result<Batch, DataError> {
            let noise: f32 = rng.random();
            Ok(vec![
                (
                    "i".into(),
                    Tensor::I64(ArrayD::from_elem(vec![1], index as i64)),
                ),
                (
                    "noise".into(),
                    Tensor::F32(ArrayD::from_elem(vec![2], noise)),
                ),
            ])
        }
    }

    fn at(seed: u64, epoch: u64, index: u64) -> BatchAt {
        BatchAt {
            seed,
            epoch,
            index,
            step: 0,
        }
    }

    #[test]
    fn epoch_orders_are_permutations_that_change_with_epoch_and_seed() {
        let a = epoch_order(50, 7, 0, true);
        let b = epoch_order(50, 7, 1, true);
        let c = epoch_order(50, 8, 0, true);
        assert_eq!(a, epoch_order(50, 7, 0, true));
        assert_ne!(a, b);
        assert_ne!(a, c);
        let h = histogram(std::slice::from_ref(&a));
        assert_eq!(h.len(), 50);
        assert!(h.values().all(|&n| n == 1));
        assert_eq!(epoch_order(5, 7, 0, false), vec![0, 1, 2, 3, 4]);
    }

    #[test]
    fn shards_of_a_global_batch_are_its_rows_in_rank_order() {
        // One process with batch 6 and three ranks with batch 2 see the same samples, with
        // the same augmentation noise, step for step.
        let mut whole = Shuffled::new(Counting(40), 6).unwrap();
        let mut shards: Vec<_> = (0..3)
            .map(|r| Shuffled::new(Counting(40), 2).unwrap().shard(r, 3).unwrap())
            .collect();
        assert_eq!(whole.batches_per_epoch(), 6);
        assert!(shards.iter().all(|s| s.batches_per_epoch() == 6));
        for (epoch, index) in [(0, 0), (0, 5), (3, 2)] {
            let w = whole.batch(at(11, epoch, index)).unwrap();
            for (r, shard) in shards.iter_mut().enumerate() {
                let s = shard.batch(at(11, epoch, index)).unwrap();
                for ((wn, wt), (sn, st)) in w.iter().zip(&s) {
                    assert_eq!(wn, sn);
                    let rows = match (wt, st) {
                        (Tensor::I64(a), Tensor::I64(b)) => {
                            a.slice_axis(Axis(0), (2 * r..2 * r + 2).into()) == b.view()
                        }
                        (Tensor::F32(a), Tensor::F32(b)) => {
                            a.slice_axis(Axis(0), (2 * r..2 * r + 2).into()) == b.view()
                        }
                        _ => false,
                    };
                    assert!(rows, "rank {r}, `{wn}` at epoch {epoch} batch {index}");
                }
            }
        }
        assert!(Shuffled::new(Counting(5), 2).unwrap().shard(0, 3).is_err());
        assert!(Shuffled::new(Counting(8), 2).unwrap().shard(2, 2).is_err());
    }

    #[test]
    fn batches_depend_only_on_their_position() {
        let mut s = Shuffled::new(Counting(10), 3).unwrap();
        assert_eq!(s.batches_per_epoch(), 3);
        let b = s.batch(at(1, 2, 1)).unwrap();
        // Ask for other batches in between: the same position gives the same batch.
        s.batch(at(1, 0, 0)).unwrap();
        s.batch(at(2, 2, 1)).unwrap();
        assert_eq!(s.batch(at(1, 2, 1)).unwrap(), b);
        assert_eq!(b[0].1.shape(), &[3, 1]);
        assert_eq!(b[1].1.shape(), &[3, 2]);
        let order = epoch_order(10, 1, 2, true);
        let Tensor::I64(ids) = &b[0].1 else { panic!() };
        assert_eq!(
            ids.iter().map(|&v| v as usize).collect::<Vec<_>>(),
            order[3..6]
        );
    }

    #[test]
    fn too_few_samples_is_an_error() {
        let e = Shuffled::new(Counting(2), 3).err().unwrap();
        assert!(
            e.to_string().contains("2 samples make no batch of 3"),
            "{e}"
        );
    }
}
