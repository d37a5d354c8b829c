//! Data-parallel training: what PyTorch calls DistributedDataParallel, over MPI on CPU.
//!
//! Each of N processes (ranks) holds the whole training state and runs the artifact's
//! **gradient graph** on its shard of the global batch; the gradients (and the loss, the
//! metrics and the batch-norm running statistics) are summed across ranks with one
//! all-reduce and divided by N; every rank then runs the **update graph** on the same averaged
//! gradients, so the parameters stay identical on every rank without ever being sent. See
//! [`DataParallelEntry`](super::manifest::DataParallelEntry) for the two graphs and
//! [`Trainer::data_parallel`](super::Trainer::data_parallel) for the loop.
//!
//! - [`Communicator`]: rank, size, `all_reduce_sum`, `broadcast`, `all_gather`, `barrier`,
//!   `abort`. [`SingleProcess`] (always compiled), [`LocalGroup`] (ranks as threads of one
//!   process: tests and the equivalence check without MPI) and, with the cargo feature `mpi`,
//!   `MpiCommunicator` (Open MPI through the `mpi` crate).
//! - [`from_env`]: the communicator the launch asks for: `mpirun -np N` sets
//!   `OMPI_COMM_WORLD_SIZE` (Open MPI) or `PMI_SIZE` (MPICH, Slurm); a multi-process launch of
//!   a build without the feature is an error, not N independent runs.
//! - Sharding: [`Shuffled::shard`](super::Shuffled::shard): the global batch order is a
//!   function of (seed, epoch) only; rank r of N takes rows `r*B .. (r+1)*B` of each global
//!   batch of `N*B` samples (with the same per-sample augmentation generators), so N ranks of
//!   batch B see exactly the samples one process of batch `N*B` sees, step for step.
//!
//! # What is and isn't equivalent to one process with the N-times batch
//! - Gradients: the mean of the per-shard gradients of a *mean* loss over equal shards is the
//!   gradient of the mean loss over the whole batch (cross-entropy, PixPro's per-image mean).
//!   Equal up to float summation order.
//! - Batch norm in training mode normalises with *per-shard* statistics (as DDP without
//!   SyncBatchNorm does); a model with batch norm therefore computes a different (if similar)
//!   gradient than one process with the doubled batch. We do not synchronise batch statistics.
//!   The running statistics are averaged across ranks: exact for `running_mean` (the mean of
//!   the shard means is the batch mean), not for `running_var` (the mean of the shard
//!   variances misses the spread of the shard means).
//! - Centres (DINO's and SCFS's `center.*` buffers: `c <- m c + (1 - m) mean(teacher
//!   outputs)`) are averaged across ranks like the running statistics, which is DINO's
//!   all-reduce of the batch centre: the mean of the ranks' updates is the update with the
//!   global batch mean (exact for equal shards). See [`averaged_buffer`].
//! - Other buffers (the momentum encoder's EMA) are computed from the identical parameters and
//!   stay identical on every rank without communication.
//! - Queues (MoCo, DenseCL; buffers named `*queue*`, `[K, D]` FIFOs with the step's keys in
//!   front): each rank's new keys are all-gathered and enqueued in rank order, the global
//!   batch order, as MoCo's `concat_all_gather` before `_dequeue_and_enqueue`; the queue is
//!   then the one-process queue of the N-times batch (tested exactly without batch norm).
//! - SwAV's Sinkhorn-Knopp codes ([`sinkhorn_codes`]): the artifact cuts the gradient graph
//!   before the codes (`data_parallel.sinkhorn`); each rank's scores stay on the rank and the
//!   sums Sinkhorn normalises by (the total, every prototype's column, the sample count) are
//!   all-reduced, as SwAV's `distributed_sinkhorn` does, so the codes are those of the whole
//!   global batch. SwAV's queue is gathered like MoCo's (below), so its rows are the same on
//!   every rank and count once (SwAV keeps a queue per GPU; ours is the one-process queue of
//!   the N-times batch).
//! - Means over the selected entries of the batch (LC-loss's valid locations, CCOP's valid
//!   boxes, DenseSiam's overlapping view pairs: `sum / max(count, 1)`): the artifact cuts the gradient graph before the
//!   denominator (`data_parallel.means`); the ranks' counts are summed and each rank divides
//!   its own sum by `max(total, 1) / N`, so the average over the ranks is the global sum over
//!   the global count.
//! - Not exchanged: partner images (RegionCL pairs within each rank's batch, as its official
//!   code does per GPU), and MoCo's shuffled batch norm (the key encoder normalises per shard,
//!   like the query encoder). DenseSiam's region negatives are the same image's other regions,
//!   so there is nothing to exchange.
//!
//! # Failure
//! A rank whose step fails prints the error with its rank and calls `MPI_Abort`, which makes
//! `mpirun` stop every rank with a message; a rank that dies makes `mpirun` stop the others.
//! Only rank 0 writes logs and checkpoints; a restarted job resumes from the last checkpoint
//! on every rank.

use std::sync::{Arc, Barrier, Mutex};

use ndarray::{Array2, ArrayView2, Axis};

/// Whether the data-parallel trainer averages buffer `name`'s next value across ranks: batch
/// norm's `running_mean` / `running_var`, and centres (a `center` path segment, e.g.
/// `center.dino`): exponential averages of batch means, whose per-rank updates average to the
/// update by the whole batch (exact for `running_mean` and centres; not for `running_var`).
pub fn averaged_buffer(name: &str) -> bool {
    name.ends_with("running_mean")
        || name.ends_with("running_var")
        || name.split('.').any(|part| part == "center")
}

/// Why a communicator could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum DistError {
    #[error("launched as {size} processes ({var}={size}) but this densa was built without the cargo feature `mpi`; rebuild with `cargo build --release --features mpi` (needs Open MPI and libclang) or run one process")]
    NotBuiltWithMpi { var: String, size: usize },
    #[error("{var}={value}: not a number (the launcher sets it to a process count or index)")]
    BadEnv { var: String, value: String },
    #[error("MPI could not be initialised (already initialised in this process?)")]
    MpiInit,
    #[error("{var} says {expected} processes but MPI's world has {got}")]
    SizeMismatch {
        var: String,
        expected: usize,
        got: usize,
    },
}

/// Collective operations among the ranks of a data-parallel job. Every rank must call the same
/// operations in the same order with the same lengths (as with MPI).
pub trait Communicator {
    /// This process's rank, from 0.
    fn rank(&self) -> usize;
    /// The number of ranks.
    fn size(&self) -> usize;
    /// Replaces `data` on every rank by the element-wise sum over ranks.
    fn all_reduce_sum(&self, data: &mut [f32]);
    /// Replaces `data` on every rank by `root`'s.
    fn broadcast(&self, root: usize, data: &mut [f32]);
    /// The concatenation of every rank's `local` in rank order (all the same length).
    fn all_gather(&self, local: &[f32]) -> Vec<f32>;
    /// Waits for every rank.
    fn barrier(&self);
    /// Stops the whole job after printing `message` (MPI: `MPI_Abort`).
    fn abort(&self, message: &str) -> !;
    /// A short description for logs (`mpi 2 ranks`).
    fn describe(&self) -> String;
}

/// One process: every collective is the identity.
#[derive(Clone, Copy, Debug, Default)]
pub struct SingleProcess;

impl Communicator for SingleProcess {
    fn rank(&self) -> usize {
        0
    }
    fn size(&self) -> usize {
        1
    }
    fn all_reduce_sum(&self, _data: &mut [f32]) {}
    fn broadcast(&self, _root: usize, _data: &mut [f32]) {}
    fn all_gather(&self, local: &[f32]) -> Vec<f32> {
        local.to_vec()
    }
    fn barrier(&self) {}
    fn abort(&self, message: &str) -> ! {
        eprintln!("densa: {message}");
        std::process::exit(1)
    }
    fn describe(&self) -> String {
        "single process".into()
    }
}

/// Ranks as threads of one process ([`LocalGroup::new`] gives one handle per rank). Sums run
/// in rank order, as Open MPI's does for two ranks on one node.
pub struct LocalGroup {
    rank: usize,
    size: usize,
    shared: Arc<Shared>,
}

struct Shared {
    barrier: Barrier,
    slots: Mutex<Vec<Vec<f32>>>,
}

impl LocalGroup {
    /// `size` handles, one per rank; move each into its own thread.
    pub fn new(size: usize) -> Vec<LocalGroup> {
        let shared = Arc::new(Shared {
            barrier: Barrier::new(size.max(1)),
            slots: Mutex::new(vec![Vec::new(); size.max(1)]),
        });
        (0..size.max(1))
            .map(|rank| LocalGroup {
                rank,
                size: size.max(1),
                shared: shared.clone(),
            })
            .collect()
    }

    fn slots(&self) -> std::sync::MutexGuard<'_, Vec<Vec<f32>>> {
        // A rank that panicked while holding the lock poisons it; the data is still usable
        // and the test that drove it fails anyway.
        self.shared
            .slots
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn exchange<T>(&self, mine: &[f32], read: impl FnOnce(&[Vec<f32>]) -> T) -> T {
        self.slots()[self.rank] = mine.to_vec();
        self.shared.barrier.wait();
        let out = read(&self.slots());
        self.shared.barrier.wait();
        out
    }
}

impl Communicator for LocalGroup {
    fn rank(&self) -> usize {
        self.rank
    }
    fn size(&self) -> usize {
        self.size
    }
    fn all_reduce_sum(&self, data: &mut [f32]) {
        let sum = self.exchange(data, |slots| {
            let mut sum = slots[0].clone();
            for s in &slots[1..] {
                for (a, b) in sum.iter_mut().zip(s) {
                    *a += b;
                }
            }
            sum
        });
        data.copy_from_slice(&sum);
    }
    fn broadcast(&self, root: usize, data: &mut [f32]) {
        let v = self.exchange(data, |slots| slots[root].clone());
        data.copy_from_slice(&v);
    }
    fn all_gather(&self, local: &[f32]) -> Vec<f32> {
        self.exchange(local, |slots| slots.concat())
    }
    fn barrier(&self) {
        self.shared.barrier.wait();
    }
    fn abort(&self, message: &str) -> ! {
        panic!("rank {} of {}: {message}", self.rank, self.size)
    }
    fn describe(&self) -> String {
        format!("{} threads", self.size)
    }
}

/// The process count the launcher announced: `OMPI_COMM_WORLD_SIZE` (Open MPI) or `PMI_SIZE`
/// (MPICH, Slurm), with the variable's name; `None` when not launched by MPI.
pub fn launched_size() -> Result<Option<(String, usize)>, DistError> {
    for var in ["OMPI_COMM_WORLD_SIZE", "PMI_SIZE"] {
        if let Ok(value) = std::env::var(var) {
            let size = value
                .trim()
                .parse::<usize>()
                .map_err(|_| DistError::BadEnv {
                    var: var.into(),
                    value: value.clone(),
                })?;
            return Ok(Some((var.to_string(), size)));
        }
    }
    Ok(None)
}

/// Sums `packed` over the ranks, after a barrier so that waiting for slower ranks is not
/// counted as communication. Returns (seconds waiting, seconds in the all-reduce).
pub fn timed_all_reduce(comm: &dyn Communicator, packed: &mut [f32]) -> (f64, f64) {
    let t_wait = std::time::Instant::now();
    comm.barrier();
    let t_comm = std::time::Instant::now();
    comm.all_reduce_sum(packed);
    (
        (t_comm - t_wait).as_secs_f64(),
        t_comm.elapsed().as_secs_f64(),
    )
}

/// The next `shape`'s worth of an all-reduced buffer, times `scale` (1 / ranks: the mean over
/// the ranks); `rest` moves past it.
///
/// # Panics
/// When `rest` is shorter than the shape (the caller packed it with the same shapes).
pub fn take_scaled(rest: &mut &[f32], shape: &[usize], scale: f32) -> ndarray::ArrayD<f32> {
    let n: usize = shape.iter().product();
    let values = rest[..n].iter().map(|v| v * scale).collect();
    *rest = &rest[n..];
    ndarray::ArrayD::from_shape_vec(shape.to_vec(), values).expect("the length is the shape's")
}

/// This process's index among the launch's processes on the same machine:
/// `OMPI_COMM_WORLD_LOCAL_RANK` (Open MPI), `MPI_LOCALRANKID` (MPICH) or `SLURM_LOCALID`
/// (`srun`); `None` when not launched by one of them. A GPU run picks its GPU by it.
pub fn launched_local_rank() -> Result<Option<usize>, DistError> {
    local_rank_of(|var| std::env::var(var).ok())
}

fn local_rank_of(var: impl Fn(&str) -> Option<String>) -> Result<Option<usize>, DistError> {
    for name in [
        "OMPI_COMM_WORLD_LOCAL_RANK",
        "MPI_LOCALRANKID",
        "SLURM_LOCALID",
    ] {
        if let Some(value) = var(name) {
            return value
                .trim()
                .parse::<usize>()
                .map(Some)
                .map_err(|_| DistError::BadEnv {
                    var: name.into(),
                    value,
                });
        }
    }
    Ok(None)
}

/// The communicator of this launch: MPI's world when started by `mpirun -np N` with N > 1
/// (cargo feature `mpi`), else [`SingleProcess`]. Call once per process (MPI initialises
/// once); keep the result alive until the end (dropping it finalises MPI).
pub fn from_env() -> Result<Arc<dyn Communicator>, DistError> {
    match launched_size()? {
        Some((var, size)) if size > 1 => mpi_world(var, size),
        _ => Ok(Arc::new(SingleProcess)),
    }
}

#[cfg(not(feature = "mpi"))]
fn mpi_world(var: String, size: usize) -> Result<Arc<dyn Communicator>, DistError> {
    Err(DistError::NotBuiltWithMpi { var, size })
}

// The MPI world is used from the thread that initialised it (MPI_THREAD_SINGLE), so the Arc
// is for sharing handles within that thread, not across threads.
#[cfg(feature = "mpi")]
#[allow(clippy::arc_with_non_send_sync)]
fn mpi_world(var: String, size: usize) -> Result<Arc<dyn Communicator>, DistError> {
    let world = mpi_impl::MpiCommunicator::init()?;
    if world.size() != size {
        return Err(DistError::SizeMismatch {
            var,
            expected: size,
            got: world.size(),
        });
    }
    Ok(Arc::new(world))
}

#[cfg(feature = "mpi")]
pub use mpi_impl::MpiCommunicator;

#[cfg(feature = "mpi")]
mod mpi_impl {
    use mpi::collective::SystemOperation;
    use mpi::traits::{Communicator as _, CommunicatorCollectives, Root};

    use super::{Communicator, DistError};

    /// MPI's `COMM_WORLD` (Open MPI through the `mpi` crate). Errors inside MPI abort the job
    /// (MPI's default error handler).
    pub struct MpiCommunicator {
        // Dropped last: finalises MPI.
        world: mpi::topology::SimpleCommunicator,
        _universe: mpi::environment::Universe,
    }

    impl MpiCommunicator {
        /// Initialises MPI (once per process).
        pub fn init() -> Result<MpiCommunicator, DistError> {
            let universe = mpi::initialize().ok_or(DistError::MpiInit)?;
            let world = universe.world();
            Ok(MpiCommunicator {
                world,
                _universe: universe,
            })
        }
    }

    impl Communicator for MpiCommunicator {
        fn rank(&self) -> usize {
            self.world.rank() as usize
        }
        fn size(&self) -> usize {
            self.world.size() as usize
        }
        fn all_reduce_sum(&self, data: &mut [f32]) {
            let send = data.to_vec();
            self.world
                .all_reduce_into(&send[..], data, SystemOperation::sum());
        }
        fn broadcast(&self, root: usize, data: &mut [f32]) {
            self.world.process_at_rank(root as i32).broadcast_into(data);
        }
        fn all_gather(&self, local: &[f32]) -> Vec<f32> {
            let mut out = vec![0.0f32; local.len() * self.size()];
            self.world.all_gather_into(local, &mut out[..]);
            out
        }
        fn barrier(&self) {
            self.world.barrier();
        }
        fn abort(&self, message: &str) -> ! {
            eprintln!(
                "densa: rank {} of {}: {message}; aborting the job",
                self.rank(),
                self.size()
            );
            self.world.abort(1)
        }
        fn describe(&self) -> String {
            format!("mpi {} ranks", self.size())
        }
    }
}

/// Sinkhorn-Knopp codes of every rank's `scores` (`[N_r, K]`, samples x prototypes), SwAV's
/// `distributed_sinkhorn`: `Q = exp(scores / epsilon)`, `Q /= sum(Q)`, then `iterations` times
/// { every prototype's column divided by its sum over all ranks' rows and by `K`; every row
/// divided by its sum and by `B` }, finally `Q *= B`, where `B` counts the rows of all ranks.
/// The sums cross ranks through `comm` (`2 + iterations` all-reduces of `K + 1` floats or
/// fewer); the result is this rank's rows of the codes of the concatenated problem.
///
/// Rows with `keep[i] == false` take no part (their codes are 0), as the graph's masked
/// Sinkhorn (a queue before it is full, or a shared queue on every rank but one). Computed in
/// f64 with the largest score subtracted first (which changes nothing mathematically), so
/// large `scores / epsilon` do not overflow.
pub fn sinkhorn_codes(
    scores: ArrayView2<f32>,
    keep: &[bool],
    epsilon: f64,
    iterations: usize,
    comm: &dyn Communicator,
) -> Array2<f32> {
    let (n, k) = scores.dim();
    assert_eq!(keep.len(), n, "one keep flag per row");
    let local_max = scores
        .outer_iter()
        .zip(keep)
        .filter(|(_, &kept)| kept)
        .flat_map(|(row, _)| row.to_vec())
        .fold(f32::NEG_INFINITY, f32::max);
    let max = comm
        .all_gather(&[local_max])
        .into_iter()
        .fold(f32::NEG_INFINITY, f32::max);
    let max = if max.is_finite() { f64::from(max) } else { 0.0 };
    let mut q = Array2::<f64>::zeros((n, k));
    for ((mut row, s), &kept) in q.outer_iter_mut().zip(scores.outer_iter()).zip(keep) {
        if kept {
            row.zip_mut_with(&s, |o, &v| *o = ((f64::from(v) - max) / epsilon).exp());
        }
    }
    let mut sums = vec![
        q.sum() as f32,
        keep.iter().filter(|&&kept| kept).count() as f32,
    ];
    comm.all_reduce_sum(&mut sums);
    let (total, count) = (f64::from(sums[0]), f64::from(sums[1]));
    q /= total;
    for _ in 0..iterations {
        let mut cols: Vec<f32> = q.sum_axis(Axis(0)).iter().map(|&v| v as f32).collect();
        comm.all_reduce_sum(&mut cols);
        for mut row in q.outer_iter_mut() {
            for (v, &c) in row.iter_mut().zip(&cols) {
                *v /= f64::from(c) * k as f64;
            }
        }
        for mut row in q.outer_iter_mut() {
            let s = row.sum();
            if s > 0.0 {
                row /= s * count;
            }
        }
    }
    q *= count;
    q.mapv(|v| v as f32)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_local_rank_comes_from_the_launchers_variable() {
        let env = |pairs: &'static [(&'static str, &'static str)]| {
            move |name: &str| {
                pairs
                    .iter()
                    .find(|(k, _)| *k == name)
                    .map(|(_, v)| v.to_string())
            }
        };
        assert_eq!(local_rank_of(env(&[])).unwrap(), None);
        assert_eq!(
            local_rank_of(env(&[("OMPI_COMM_WORLD_LOCAL_RANK", "3")])).unwrap(),
            Some(3)
        );
        assert_eq!(
            local_rank_of(env(&[("SLURM_LOCALID", "1"), ("MPI_LOCALRANKID", "2")])).unwrap(),
            Some(2)
        );
        let err = local_rank_of(env(&[("MPI_LOCALRANKID", "two")])).unwrap_err();
        assert!(err.to_string().contains("MPI_LOCALRANKID"), "{err}");
    }

    /// Scores like SwAV's (cosines), deterministic.
    fn scores(n: usize, k: usize, seed: u32) -> Array2<f32> {
        Array2::from_shape_fn((n, k), |(i, j)| {
            let x = (i as u32 * 7919 + j as u32 * 104_729 + seed * 31) % 1000;
            x as f32 / 500.0 - 1.0
        })
    }

    #[test]
    fn sinkhorn_codes_have_the_transport_marginals() {
        let (n, k) = (12, 5);
        let s = scores(n, k, 1);
        let q = sinkhorn_codes(s.view(), &[true; 12], 0.05, 200, &SingleProcess);
        // Converged: every row sums to 1, every prototype gets n / k of the mass.
        for row in q.outer_iter() {
            assert!((row.sum() - 1.0).abs() < 1e-5, "row sum {}", row.sum());
        }
        for col in q.axis_iter(Axis(1)) {
            let target = n as f32 / k as f32;
            assert!(
                (col.sum() - target).abs() < 1e-3,
                "column sum {}",
                col.sum()
            );
        }
        // A dropped row is 0 and the others are the codes of the kept rows alone.
        let mut keep = [true; 12];
        keep[3] = false;
        let masked = sinkhorn_codes(s.view(), &keep, 0.05, 3, &SingleProcess);
        let mut rows: Vec<usize> = (0..n).collect();
        rows.remove(3);
        let alone = sinkhorn_codes(
            s.select(Axis(0), &rows).view(),
            &[true; 11],
            0.05,
            3,
            &SingleProcess,
        );
        assert!(masked.row(3).iter().all(|&v| v == 0.0));
        for (a, &r) in rows.iter().enumerate() {
            for j in 0..k {
                assert!((masked[[r, j]] - alone[[a, j]]).abs() < 1e-6);
            }
        }
    }

    #[test]
    fn sinkhorn_codes_of_shards_are_the_whole_batchs() {
        let (n, k) = (8, 6);
        let s = scores(n, k, 2);
        let whole = sinkhorn_codes(s.view(), &[true; 8], 0.05, 3, &SingleProcess);
        let handles: Vec<_> = LocalGroup::new(2)
            .into_iter()
            .map(|c| {
                let part = s
                    .slice(ndarray::s![c.rank() * 4..(c.rank() + 1) * 4, ..])
                    .to_owned();
                std::thread::spawn(move || sinkhorn_codes(part.view(), &[true; 4], 0.05, 3, &c))
            })
            .collect();
        let parts: Vec<Array2<f32>> = handles.into_iter().map(|h| h.join().unwrap()).collect();
        let joined = ndarray::concatenate(Axis(0), &[parts[0].view(), parts[1].view()]).unwrap();
        let d = (&joined - &whole)
            .mapv(f32::abs)
            .fold(0.0f32, |a, &b| a.max(b));
        assert!(d < 1e-6, "sharded vs whole codes differ by {d}");
        // Without the all-reduce (each shard alone) the codes differ: the check can fail.
        let alone = sinkhorn_codes(
            s.slice(ndarray::s![..4, ..]),
            &[true; 4],
            0.05,
            3,
            &SingleProcess,
        );
        let d = (&alone - &whole.slice(ndarray::s![..4, ..]))
            .mapv(f32::abs)
            .fold(0.0f32, |a, &b| a.max(b));
        assert!(
            d > 1e-3,
            "a shard's own codes equal the whole batch's ({d})"
        );
    }

    #[test]
    fn local_group_collectives_match_their_definitions() {
        let handles: Vec<_> = LocalGroup::new(3)
            .into_iter()
            .map(|c| {
                std::thread::spawn(move || {
                    let r = c.rank() as f32;
                    let mut v = vec![r, 10.0 * r];
                    c.all_reduce_sum(&mut v);
                    let mut b = vec![r + 1.0];
                    c.broadcast(2, &mut b);
                    let g = c.all_gather(&[r]);
                    c.barrier();
                    (v, b, g)
                })
            })
            .collect();
        for h in handles {
            let (v, b, g) = h.join().unwrap();
            assert_eq!(v, vec![3.0, 30.0]);
            assert_eq!(b, vec![3.0]);
            assert_eq!(g, vec![0.0, 1.0, 2.0]);
        }
    }

    #[test]
    fn single_process_is_the_identity() {
        let c = SingleProcess;
        let mut v = vec![1.5, -2.0];
        c.all_reduce_sum(&mut v);
        assert_eq!(v, vec![1.5, -2.0]);
        assert_eq!(c.all_gather(&[4.0]), vec![4.0]);
        assert_eq!((c.rank(), c.size()), (0, 1));
    }
}
