//! The training loop: runs an artifact's train step on a backend, step after step.
//!
//! Each step feeds the batch (from the [`DataSource`]), the state (the host's named tensors)
//! and the hyperparameters (from the [`Schedule`], else the manifest defaults), runs the graph,
//! and swaps every state input for its `next` output. A step whose loss or new state is not
//! finite is skipped: the old state is kept, a warning printed and the step logged with
//! `"skipped": true`; `max_nonfinite_in_row` such steps in a row stop the run with an error.
//!
//! Exact resume: the state is saved bit for bit, batches are a function of (seed, epoch, index)
//! and the schedule a function of the step, so a run resumed from a checkpoint computes the
//! same steps as one that never stopped (on the same backend).
//!
//! Our choices: the loop is in Rust on the host. The state travels host -> backend -> host every
//! step, except on sessions that keep it themselves ([`Session::resident_state`]: ONNX Runtime
//! on a GPU, through IoBinding), where only the batch and hyperparameters go in and the loss and
//! metrics come out; there the host copy ([`Trainer::state`]) is refreshed at every checkpoint
//! and at the end of [`Trainer::run`], and a step is judged finite by its loss alone. The clock
//! (`time_s`) and throughput are the only fields of the log that differ between two identical
//! runs.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Instant;

use densa_exporter::weights::StateDict;
use densa_exporter::Tensor;
use serde::{Deserialize, Serialize};

use super::checkpoint::{
    self, ArtifactRef, CheckpointManifest, CheckpointReason, DataOrder, ScheduleState,
    CHECKPOINT_KIND, CHECKPOINT_SCHEMA_VERSION, CHECKPOINT_STATE,
};
use super::data::{Batch, BatchAt, DataSource};
use super::distributed::{take_scaled, timed_all_reduce, Communicator};
use super::log::{self, JsonlLog, Progress, StepRecord, LOG_FILE, PLOT_FILE};
use super::manifest::{hyper_tensor, Artifact, HostStep, InputRole, OutputRole, SinkhornExchange};
use super::schedule::Schedule;
use super::TrainError;
use crate::backend::{Backend, Port, Session};

/// How long to train.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Length {
    /// This many steps in all.
    Steps(u64),
    /// This many epochs (of the data source's `batches_per_epoch`).
    Epochs(u64),
}

/// Options of a run. `TrainOptions::new(out_dir)` gives the defaults.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TrainOptions {
    /// Where the log, the plot and the checkpoints go.
    pub out_dir: PathBuf,
    /// Seed of the data order and of per-batch generators. Default 0.
    pub seed: u64,
    /// How long to train. Default 1000 steps.
    pub length: Length,
    /// Checkpoint every this many steps (0: only on interrupt and at the end). Default 500.
    pub checkpoint_every: u64,
    /// How many checkpoints to keep (the newest). Default 3.
    pub keep_checkpoints: usize,
    /// Stop with an error after this many non-finite steps in a row. Default 5.
    pub max_nonfinite_in_row: u32,
    /// Show a progress bar (only when stderr is a terminal). Default true.
    pub progress: bool,
    /// Draw `loss.png` at the end. Default true.
    pub plot: bool,
    /// Catch Ctrl-C: finish the step, checkpoint, return (a second Ctrl-C exits at once).
    /// Default true.
    pub handle_ctrl_c: bool,
}

impl TrainOptions {
    /// The defaults, writing into `out_dir`.
    pub fn new(out_dir: impl Into<PathBuf>) -> TrainOptions {
        TrainOptions {
            out_dir: out_dir.into(),
            seed: 0,
            length: Length::Steps(1000),
            checkpoint_every: 500,
            keep_checkpoints: 3,
            max_nonfinite_in_row: 5,
            progress: true,
            plot: true,
            handle_ctrl_c: true,
        }
    }
}

/// Where a run stands.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Position {
    /// Steps completed.
    pub step: u64,
    /// Epoch of the next batch.
    pub epoch: u64,
    /// Batches of that epoch already consumed.
    pub index_in_epoch: u64,
}

/// Why [`Trainer::run`] returned.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StopReason {
    /// Every step of `length` ran.
    Finished,
    /// Ctrl-C or [`Trainer::stop_handle`]: stopped after a step, checkpointed.
    Interrupted,
}

/// What a run did.
#[derive(Clone, Debug)]
pub struct TrainSummary {
    /// Why it returned.
    pub stop: StopReason,
    /// Where it stands now.
    pub position: Position,
    /// Steps run by this call.
    pub steps_run: u64,
    /// The last finite loss of this call.
    pub last_loss: Option<f64>,
    /// The last checkpoint written.
    pub checkpoint: Option<PathBuf>,
    /// The step log.
    pub log: PathBuf,
    /// The loss curve, when drawn.
    pub plot: Option<PathBuf>,
}

/// Where each manifest entry sits among the session's inputs and outputs.
struct StepPlan {
    batch_inputs: HashSet<String>,
    state_names: Vec<String>,
    /// For each state input: the position of its `next` among the outputs, and its name.
    next_index: Vec<usize>,
    next_names: Vec<String>,
    loss_index: usize,
    metrics: Vec<(String, usize)>,
    hyper: Vec<(String, f64, Port)>,
}

impl StepPlan {
    fn new(artifact: &Artifact, session: &dyn Session) -> StepPlan {
        let interface = session.interface();
        let out_pos = |name: &str| {
            interface
                .outputs
                .iter()
                .position(|p| p.name == name)
                .expect("the manifest was validated against the graph")
        };
        let manifest = artifact.manifest();
        let mut plan = StepPlan {
            batch_inputs: HashSet::new(),
            state_names: Vec::new(),
            next_index: Vec::new(),
            next_names: Vec::new(),
            loss_index: 0,
            metrics: Vec::new(),
            hyper: Vec::new(),
        };
        for e in &manifest.inputs {
            match e.role {
                InputRole::Batch => {
                    plan.batch_inputs.insert(e.name.clone());
                }
                InputRole::Hyper => {
                    let port = interface
                        .inputs
                        .iter()
                        .find(|p| p.name == e.name)
                        .expect("validated")
                        .clone();
                    plan.hyper
                        .push((e.name.clone(), e.default.expect("validated"), port));
                }
                _ => {
                    let next = e.next.as_deref().expect("validated");
                    plan.state_names.push(e.name.clone());
                    plan.next_index.push(out_pos(next));
                    plan.next_names.push(next.to_string());
                }
            }
        }
        for e in &manifest.outputs {
            match e.role {
                OutputRole::Loss => plan.loss_index = out_pos(&e.name),
                OutputRole::Metric => plan.metrics.push((e.name.clone(), out_pos(&e.name))),
                OutputRole::State => {}
            }
        }
        plan
    }
}

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

/// Installs the process's Ctrl-C handler once: the first Ctrl-C asks running trainers to stop
/// after their step, the second exits at once (status 130).
fn install_ctrl_c() {
    static INSTALLED: OnceLock<Result<(), String>> = OnceLock::new();
    let result = INSTALLED.get_or_init(|| {
        ctrlc::set_handler(|| {
            if INTERRUPTED.swap(true, Ordering::SeqCst) {
                std::process::exit(130);
            }
            eprintln!(
                "densa: interrupted: finishing the step, then checkpointing (Ctrl-C again quits now)"
            );
        })
        .map_err(|e| e.to_string())
    });
    if let Err(e) = result {
        tracing::warn!("Ctrl-C will not checkpoint: {e}");
    }
}

/// Runs a training artifact. See the module documentation.
pub struct Trainer<'a> {
    artifact: Artifact,
    session: Box<dyn Session>,
    data: Box<dyn DataSource + 'a>,
    schedule: Box<dyn Schedule + 'a>,
    options: TrainOptions,
    plan: StepPlan,
    /// Current state, aligned with `plan.state_names`; on a resident session the host copy,
    /// refreshed by [`Trainer::sync_state`].
    state: Vec<Tensor>,
    /// Whether the session keeps the state ([`Session::resident_state`]).
    resident: bool,
    position: Position,
    nonfinite_in_row: u32,
    last_hyper: BTreeMap<String, f64>,
    /// Training seconds before this process (resumed runs).
    elapsed_before: f64,
    started: Instant,
    resumed: bool,
    stop: Arc<AtomicBool>,
    /// Set by [`Trainer::data_parallel`].
    dp: Option<DataParallel>,
}

/// Communication figures of a data-parallel run (this process, since it started).
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct CommStats {
    /// Ranks.
    pub ranks: usize,
    /// Steps run.
    pub steps: u64,
    /// Seconds spent waiting for the slowest rank to reach the all-reduce (a barrier just
    /// before it: load imbalance, not communication).
    pub wait_s: f64,
    /// Seconds spent in the all-reduce itself (after the barrier).
    pub all_reduce_s: f64,
    /// Seconds of whole steps (data, gradient graph, all-reduce, update graph).
    pub step_s: f64,
    /// Bytes each rank contributes to the all-reduce per step (gradients, averaged buffers,
    /// loss, metrics, stop flag; float32).
    pub bytes_per_step: usize,
}

/// The data-parallel engine of a [`Trainer`] (see [`super::distributed`]).
struct DataParallel {
    comm: Arc<dyn Communicator>,
    /// With a host step inside the gradient graph: its forward half and the step.
    forward: Option<(Box<dyn Session>, HostStep)>,
    grad: Box<dyn Session>,
    update: Box<dyn Session>,
    /// Gradient outputs all-reduced, in order, with their shapes.
    grads: Vec<(String, Vec<usize>)>,
    /// State indices of the buffers averaged across ranks
    /// ([`averaged_buffer`](super::distributed::averaged_buffer)).
    averaged: Vec<usize>,
    /// State indices of the key queues ([`gather_queue`]).
    queues: Vec<usize>,
    /// For each state input: its `next` output name.
    next_names: Vec<String>,
    stats: CommStats,
}

impl<'a> Trainer<'a> {
    /// A trainer at step 0 with the artifact's initial state. Loads the train step on
    /// `backend`.
    pub fn new(
        artifact: Artifact,
        backend: &dyn Backend,
        data: impl DataSource + 'a,
        schedule: impl Schedule + 'a,
        options: TrainOptions,
    ) -> Result<Trainer<'a>, TrainError> {
        let mut trainer = Trainer::unplaced(artifact, backend, data, schedule, options)?;
        trainer.place_state()?;
        Ok(trainer)
    }

    /// [`Trainer::new`] without handing the state to a session that keeps it: [`Trainer::resume`]
    /// places the checkpoint's state instead of uploading the initial one first.
    fn unplaced(
        artifact: Artifact,
        backend: &dyn Backend,
        data: impl DataSource + 'a,
        schedule: impl Schedule + 'a,
        options: TrainOptions,
    ) -> Result<Trainer<'a>, TrainError> {
        let label = format!("{}/{}", artifact.label(), artifact.manifest().graph);
        let mut session = backend.load_model(artifact.graph(), &label)?;
        let resident = session.resident_state().is_some();
        let plan = StepPlan::new(&artifact, session.as_ref());
        let state = plan
            .state_names
            .iter()
            .map(|n| artifact.state().get(n).expect("validated").clone())
            .collect();
        if data.batches_per_epoch() == 0 {
            return Err(TrainError::EmptyData {
                source_name: data.describe(),
            });
        }
        Ok(Trainer {
            artifact,
            session,
            data: Box::new(data),
            schedule: Box::new(schedule),
            options,
            plan,
            state,
            resident,
            position: Position::default(),
            nonfinite_in_row: 0,
            last_hyper: BTreeMap::new(),
            elapsed_before: 0.0,
            started: Instant::now(),
            resumed: false,
            stop: Arc::new(AtomicBool::new(false)),
            dp: None,
        })
    }

    /// Hands the host state to a session that keeps it (a no-op otherwise).
    fn place_state(&mut self) -> Result<(), TrainError> {
        let Some(resident) = self.session.resident_state() else {
            return Ok(());
        };
        let pairs: Vec<(String, String)> = self
            .plan
            .state_names
            .iter()
            .zip(&self.plan.next_names)
            .map(|(i, o)| (i.clone(), o.clone()))
            .collect();
        resident.set(&pairs, self.state.clone())?;
        tracing::info!("training state kept on {}", resident.location());
        Ok(())
    }

    /// Refreshes the host copy of the state from a session that keeps it (a no-op otherwise).
    /// [`Trainer::run`] and [`Trainer::checkpoint`] do this themselves; call it after driving
    /// [`Trainer::step`] by hand and before reading [`Trainer::state`].
    pub fn sync_state(&mut self) -> Result<(), TrainError> {
        if !self.resident {
            return Ok(());
        }
        if let Some(resident) = self.session.resident_state() {
            self.state = resident.get()?;
        }
        Ok(())
    }

    /// Trains data-parallel among `comm`'s ranks (see [`super::distributed`]): each step runs
    /// the artifact's gradient graph on this rank's batch (the data source must be this rank's
    /// shard: [`Shuffled::shard`](super::Shuffled::shard)), all-reduces the gradients, the loss,
    /// the metrics and the batch-norm running statistics, and runs the update graph. Only rank
    /// 0 writes the log, the checkpoints and the plot and shows progress. With one rank the
    /// fused graph runs as before.
    pub fn data_parallel(
        self,
        backend: &dyn Backend,
        comm: Arc<dyn Communicator>,
    ) -> Result<Trainer<'a>, TrainError> {
        if comm.size() <= 1 {
            return Ok(self);
        }
        self.split_engine(backend, comm)
    }

    /// [`data_parallel`](Self::data_parallel), also for one rank: runs the gradient and
    /// update graphs instead of the fused step (to check that the split computes what the
    /// fused step does).
    pub fn split_engine(
        mut self,
        backend: &dyn Backend,
        comm: Arc<dyn Communicator>,
    ) -> Result<Trainer<'a>, TrainError> {
        // The split graphs take the host state; a session keeping it is left behind.
        self.resident = false;
        let fail = |problem: String| TrainError::DataParallel {
            artifact: self.artifact.label(),
            problem,
        };
        let Some((entry, graphs)) = self.artifact.data_parallel() else {
            return Err(fail(
                "the artifact has no gradient and update graphs (manifest `data_parallel`); \
                 build it with data parallelism on"
                    .into(),
            ));
        };
        let manifest = self.artifact.manifest();
        let label = self.artifact.label();
        let grad = backend.load_model(&graphs.grad, &format!("{label}/{}", entry.grad_graph))?;
        let update =
            backend.load_model(&graphs.update, &format!("{label}/{}", entry.update_graph))?;
        let forward = match (&graphs.forward, entry.host.is_empty()) {
            (Some(f), false) => {
                let file = entry.forward_graph.as_deref().unwrap_or("forward");
                Some((
                    backend.load_model(f, &format!("{label}/{file}"))?,
                    entry.host.clone(),
                ))
            }
            (None, true) => None,
            _ => {
                return Err(fail(
                    "the gradient graph's forward half and its host step come together".into(),
                ))
            }
        };
        let mut grads = Vec::new();
        for g in &entry.grads {
            let shape = self
                .artifact
                .state()
                .get(&g.param)
                .map(|t| t.shape().to_vec())
                .ok_or_else(|| fail(format!("parameter `{}` has no state", g.param)))?;
            grads.push((g.grad.clone(), shape));
        }
        let mut averaged = Vec::new();
        let mut queues = Vec::new();
        let mut next_names = Vec::new();
        for (k, name) in self.plan.state_names.iter().enumerate() {
            let e = manifest
                .input(name)
                .expect("state names come from the manifest");
            next_names.push(e.next.clone().expect("validated"));
            if e.role == InputRole::Buffer && super::distributed::averaged_buffer(name) {
                averaged.push(k);
            }
            if e.role == InputRole::Buffer && name.contains("queue") {
                if self.state[k].shape().len() != 2 {
                    return Err(fail(format!(
                        "queue `{name}` is {:?}, expected [K, D]",
                        self.state[k].shape()
                    )));
                }
                queues.push(k);
            }
        }
        // Every input of the two graphs must be fed from the batch, the state, the
        // hyperparameters or the gradients.
        let known = |n: &str| {
            self.plan.batch_inputs.contains(n)
                || self.plan.state_names.iter().any(|s| s == n)
                || self.plan.hyper.iter().any(|(h, _, _)| h == n)
                || grads.iter().any(|(g, _)| g == n)
        };
        // With a host step, the gradient graph also takes the forward half's outputs and the
        // codes.
        let exchanged = |n: &str| {
            forward.as_ref().is_some_and(|(f, host)| {
                f.interface().outputs.iter().any(|p| p.name == n)
                    || host
                        .sinkhorn
                        .iter()
                        .any(|ex| ex.stages.iter().any(|s| s.codes == n))
                    || host.means.iter().any(|m| m.denominator == n)
            })
        };
        let mut graphs: Vec<(&str, &dyn Session)> = vec![("gradient", grad.as_ref())];
        graphs.push(("update", update.as_ref()));
        if let Some((f, _)) = &forward {
            graphs.push(("forward", f.as_ref()));
        }
        for (graph, session) in graphs {
            let extra = graph == "gradient";
            if let Some(p) = session
                .interface()
                .inputs
                .iter()
                .find(|p| !known(&p.name) && (!extra || !exchanged(&p.name)))
            {
                return Err(fail(format!(
                    "input `{}` of the {graph} graph is not a batch, state, hyper or gradient name",
                    p.name
                )));
            }
        }
        let floats: usize = grads
            .iter()
            .map(|(_, s)| s.iter().product::<usize>())
            .sum::<usize>()
            + averaged.iter().map(|&k| self.state[k].len()).sum::<usize>()
            + 2
            + self.plan.metrics.len()
            + host_step_floats(forward.as_ref());
        self.dp = Some(DataParallel {
            stats: CommStats {
                ranks: comm.size(),
                bytes_per_step: floats * std::mem::size_of::<f32>(),
                ..CommStats::default()
            },
            comm,
            forward,
            grad,
            update,
            grads,
            averaged,
            queues,
            next_names,
        });
        Ok(self)
    }

    /// The communication figures of a data-parallel run (`None` for one process).
    pub fn comm_stats(&self) -> Option<CommStats> {
        self.dp.as_ref().map(|d| d.stats)
    }

    /// Whether this process writes logs and checkpoints (rank 0, or a single process).
    pub fn is_leader(&self) -> bool {
        self.dp.as_ref().is_none_or(|d| d.comm.rank() == 0)
    }

    /// A trainer continuing from a checkpoint: `from` is a checkpoint directory or an output
    /// directory (its newest checkpoint). The artifact must be the one the checkpoint was made
    /// with (same fingerprint), the seed the same and the data source as long; `options` may
    /// change the length, checkpointing and output directory.
    pub fn resume(
        from: &Path,
        artifact: Artifact,
        backend: &dyn Backend,
        data: impl DataSource + 'a,
        schedule: impl Schedule + 'a,
        options: TrainOptions,
    ) -> Result<Trainer<'a>, TrainError> {
        let dir = checkpoint::locate(from)?;
        let (ckpt, state) = checkpoint::read(&dir)?;
        let mismatch = |field: &str, checkpoint: String, current: String| TrainError::Resume {
            checkpoint: dir.clone(),
            field: field.to_string(),
            in_checkpoint: checkpoint,
            now: current,
        };
        let fingerprint = artifact.fingerprint();
        if ckpt.artifact.fingerprint != fingerprint {
            return Err(mismatch(
                "artifact fingerprint",
                format!("{} ({})", ckpt.artifact.fingerprint, ckpt.artifact.label),
                format!("{fingerprint} ({})", artifact.label()),
            ));
        }
        if ckpt.data_order.seed != options.seed {
            return Err(mismatch(
                "seed",
                ckpt.data_order.seed.to_string(),
                options.seed.to_string(),
            ));
        }
        if ckpt.data_order.batches_per_epoch != data.batches_per_epoch() {
            return Err(mismatch(
                "batches per epoch",
                format!(
                    "{} ({})",
                    ckpt.data_order.batches_per_epoch, ckpt.data_order.source
                ),
                format!("{} ({})", data.batches_per_epoch(), data.describe()),
            ));
        }
        let mut trainer = Trainer::unplaced(artifact, backend, data, schedule, options)?;
        let state_path = dir.join(&ckpt.state);
        for (name, slot) in trainer
            .plan
            .state_names
            .iter()
            .zip(trainer.state.iter_mut())
        {
            let Some(t) = state.get(name) else {
                return Err(TrainError::CheckpointState {
                    path: state_path,
                    name: name.clone(),
                    problem: "missing".into(),
                });
            };
            if t.dtype() != slot.dtype() || t.shape() != slot.shape() {
                return Err(TrainError::CheckpointState {
                    path: state_path,
                    name: name.clone(),
                    problem: format!(
                        "is {} {:?}, the artifact's state is {} {:?}",
                        t.dtype(),
                        t.shape(),
                        slot.dtype(),
                        slot.shape()
                    ),
                });
            }
            *slot = t.clone();
        }
        trainer.place_state()?;
        trainer.position = ckpt.position();
        trainer.nonfinite_in_row = ckpt.nonfinite_in_row;
        trainer.last_hyper = ckpt.schedule.last_values.clone();
        trainer.elapsed_before = ckpt.elapsed_s;
        trainer.resumed = true;
        Ok(trainer)
    }

    /// The total number of steps `options.length` asks for.
    pub fn total_steps(&self) -> u64 {
        match self.options.length {
            Length::Steps(n) => n,
            Length::Epochs(n) => n * self.data.batches_per_epoch(),
        }
    }

    /// Where the run stands.
    pub fn position(&self) -> Position {
        self.position
    }

    /// The current state, by name (manifest order).
    pub fn state(&self) -> StateDict {
        let mut sd = StateDict::new();
        for (name, t) in self.plan.state_names.iter().zip(&self.state) {
            sd.insert(name.clone(), t.clone());
        }
        sd
    }

    /// The artifact.
    pub fn artifact(&self) -> &Artifact {
        &self.artifact
    }

    /// The options.
    pub fn options(&self) -> &TrainOptions {
        &self.options
    }

    /// A flag that, once set, makes [`run`](Self::run) stop after the current step, checkpoint
    /// and return [`StopReason::Interrupted`] (what Ctrl-C does).
    pub fn stop_handle(&self) -> Arc<AtomicBool> {
        self.stop.clone()
    }

    /// Runs one step and returns its record. A non-finite step keeps the old state; the
    /// `max_nonfinite_in_row`-th in a row is an error.
    pub fn step(&mut self) -> Result<StepRecord, TrainError> {
        let record = self.step_unchecked()?;
        self.check_nonfinite(&record)?;
        Ok(record)
    }

    fn check_nonfinite(&self, record: &StepRecord) -> Result<(), TrainError> {
        let limit = self.options.max_nonfinite_in_row.max(1);
        if self.nonfinite_in_row >= limit {
            return Err(TrainError::NonFinite {
                step: record.step,
                in_row: self.nonfinite_in_row,
                last: record.note.clone().unwrap_or_default(),
            });
        }
        Ok(())
    }

    fn hyper_values(&self, step: u64) -> Result<Vec<(String, f64)>, TrainError> {
        let mut values: Vec<(String, f64)> = self
            .plan
            .hyper
            .iter()
            .map(|(n, d, _)| (n.clone(), *d))
            .collect();
        for (name, v) in self.schedule.values(step) {
            let Some(slot) = values.iter_mut().find(|(n, _)| *n == name) else {
                return Err(TrainError::Schedule {
                    step,
                    name,
                    expected: self
                        .plan
                        .hyper
                        .iter()
                        .map(|(n, _, _)| n.as_str())
                        .collect::<Vec<_>>()
                        .join(", "),
                });
            };
            slot.1 = v;
        }
        Ok(values)
    }

    /// The batch at the current position, checked against the batch inputs, and its sample
    /// count.
    fn next_batch(&mut self) -> Result<(Batch, usize), TrainError> {
        let pos = self.position;
        let at = BatchAt {
            seed: self.options.seed,
            epoch: pos.epoch,
            index: pos.index_in_epoch,
            step: pos.step,
        };
        let batch = self.data.batch(at).map_err(|source| TrainError::Data {
            step: pos.step + 1,
            source,
        })?;
        for (name, _) in &batch {
            if !self.plan.batch_inputs.contains(name) {
                return Err(TrainError::BatchInput {
                    source_name: self.data.describe(),
                    name: name.clone(),
                    expected: self.batch_names(),
                });
            }
        }
        if let Some(missing) = self
            .plan
            .batch_inputs
            .iter()
            .find(|n| !batch.iter().any(|(b, _)| b == *n))
        {
            return Err(TrainError::BatchInput {
                source_name: self.data.describe(),
                name: format!("{missing} (missing)"),
                expected: self.batch_names(),
            });
        }
        let samples = batch
            .first()
            .and_then(|(_, t)| t.shape().first().copied())
            .unwrap_or(1);
        Ok((batch, samples))
    }

    fn step_unchecked(&mut self) -> Result<StepRecord, TrainError> {
        if self.dp.is_some() {
            return self.step_data_parallel();
        }
        let t0 = Instant::now();
        let pos = self.position;
        let (batch, samples) = self.next_batch()?;
        let hyper = self.hyper_values(pos.step)?;

        let mut inputs: Vec<(String, Tensor)> =
            Vec::with_capacity(batch.len() + self.state.len() + hyper.len());
        inputs.extend(batch);
        for ((name, value), (_, _, port)) in hyper.iter().zip(&self.plan.hyper) {
            let t = hyper_tensor(port, *value).map_err(|problem| TrainError::Schedule {
                step: pos.step,
                name: format!("{name} ({problem})"),
                expected: String::new(),
            })?;
            inputs.push((name.clone(), t));
        }
        if self.resident {
            return self.resident_step(inputs, hyper, samples, t0);
        }
        // The state is copied in and the new state copied out every step (sessions that keep
        // the state take `resident_step` above). The copy also keeps the old state for a
        // skipped (non-finite) step.
        inputs.extend(
            self.plan
                .state_names
                .iter()
                .cloned()
                .zip(self.state.iter().cloned()),
        );

        let outputs = self.session.run(inputs)?;
        let mut outputs: Vec<Option<Tensor>> = outputs.into_iter().map(|(_, t)| Some(t)).collect();
        let loss = mean(outputs[self.plan.loss_index].as_ref().expect("present"));
        let metrics: BTreeMap<String, Option<f64>> = self
            .plan
            .metrics
            .iter()
            .map(|(n, i)| {
                let v = mean(outputs[*i].as_ref().expect("present"));
                (n.clone(), v.is_finite().then_some(v))
            })
            .collect();

        let mut problem = (!loss.is_finite()).then(|| format!("loss is {loss}"));
        if problem.is_none() {
            for (name, &i) in self.plan.state_names.iter().zip(&self.plan.next_index) {
                if !all_finite(outputs[i].as_ref().expect("present")) {
                    problem = Some(format!("the new value of `{name}` is not finite"));
                    break;
                }
            }
        }
        let step = pos.step + 1;
        match &problem {
            None => {
                for (k, &i) in self.plan.next_index.iter().enumerate() {
                    let new = outputs[i]
                        .take()
                        .expect("each output is the next of one input");
                    if new.dtype() != self.state[k].dtype() || new.shape() != self.state[k].shape()
                    {
                        return Err(TrainError::StateShape {
                            step,
                            name: self.plan.state_names[k].clone(),
                            expected: format!(
                                "{} {:?}",
                                self.state[k].dtype(),
                                self.state[k].shape()
                            ),
                            got: format!("{} {:?}", new.dtype(), new.shape()),
                        });
                    }
                    self.state[k] = new;
                }
                self.nonfinite_in_row = 0;
            }
            Some(p) => {
                self.nonfinite_in_row += 1;
                tracing::warn!(
                    "step {step}: {p}; update skipped, state kept ({} in a row, stopping at {})",
                    self.nonfinite_in_row,
                    self.options.max_nonfinite_in_row.max(1)
                );
            }
        }

        self.finish_step(pos, loss, metrics, problem, hyper, samples, t0)
    }

    /// A step on a session that keeps the state: `inputs` are the batch and hyperparameters.
    fn resident_step(
        &mut self,
        inputs: Vec<(String, Tensor)>,
        hyper: Vec<(String, f64)>,
        samples: usize,
        t0: Instant,
    ) -> Result<StepRecord, TrainError> {
        let pos = self.position;
        let resident = self
            .session
            .resident_state()
            .expect("the session kept its state at load");
        let outputs: BTreeMap<String, Tensor> = resident.run(inputs)?.into_iter().collect();
        let interface = self.session.interface();
        let by_index = |i: usize| outputs.get(&interface.outputs[i].name).expect("present");
        let loss = mean(by_index(self.plan.loss_index));
        let metrics: BTreeMap<String, Option<f64>> = self
            .plan
            .metrics
            .iter()
            .map(|(n, i)| {
                let v = mean(by_index(*i));
                (n.clone(), v.is_finite().then_some(v))
            })
            .collect();
        let problem = (!loss.is_finite()).then(|| format!("loss is {loss}"));
        let resident = self.session.resident_state().expect("checked");
        match &problem {
            None => {
                resident.commit();
                self.nonfinite_in_row = 0;
            }
            Some(p) => {
                resident.discard();
                self.nonfinite_in_row += 1;
                tracing::warn!(
                    "step {}: {p}; update skipped, state kept ({} in a row, stopping at {})",
                    pos.step + 1,
                    self.nonfinite_in_row,
                    self.options.max_nonfinite_in_row.max(1)
                );
            }
        }
        self.finish_step(pos, loss, metrics, problem, hyper, samples, t0)
    }

    /// Advances the position and makes the step's record.
    #[allow(clippy::too_many_arguments)]
    fn finish_step(
        &mut self,
        pos: Position,
        loss: f64,
        metrics: BTreeMap<String, Option<f64>>,
        problem: Option<String>,
        hyper: Vec<(String, f64)>,
        samples: usize,
        t0: Instant,
    ) -> Result<StepRecord, TrainError> {
        let step = pos.step + 1;
        self.advance(step);
        self.last_hyper = hyper.into_iter().collect();
        let seconds = t0.elapsed().as_secs_f64().max(1e-9);
        Ok(StepRecord {
            step,
            epoch: pos.epoch,
            loss: loss.is_finite().then_some(loss),
            metrics,
            hyper: self.last_hyper.clone(),
            images_per_s: samples as f64 / seconds,
            time_s: self.elapsed(),
            skipped: problem.is_some(),
            note: problem,
        })
    }

    fn advance(&mut self, step: u64) {
        self.position.step = step;
        self.position.index_in_epoch += 1;
        if self.position.index_in_epoch >= self.data.batches_per_epoch() {
            self.position.epoch += 1;
            self.position.index_in_epoch = 0;
        }
    }

    fn hyper_tensors(&self, hyper: &[(String, f64)], step: u64) -> Result<Batch, TrainError> {
        hyper
            .iter()
            .zip(&self.plan.hyper)
            .map(|((name, value), (_, _, port))| {
                hyper_tensor(port, *value)
                    .map(|t| (name.clone(), t))
                    .map_err(|problem| TrainError::Schedule {
                        step,
                        name: format!("{name} ({problem})"),
                        expected: String::new(),
                    })
            })
            .collect()
    }

    /// One data-parallel step: gradient graph, one all-reduce, update graph (see
    /// [`Trainer::data_parallel`]). Every decision (skip, stop) is taken on all-reduced values,
    /// so all ranks take it together.
    fn step_data_parallel(&mut self) -> Result<StepRecord, TrainError> {
        let t0 = Instant::now();
        let pos = self.position;
        let (batch, samples) = self.next_batch()?;
        let hyper = self.hyper_values(pos.step)?;
        let hyper_t = self.hyper_tensors(&hyper, pos.step)?;
        let dp = self.dp.as_mut().expect("checked by the caller");
        let ranks = dp.comm.size();
        let step = pos.step + 1;

        // Inputs by name: batch, state, hyperparameters.
        let state_of = |n: &str| {
            self.plan
                .state_names
                .iter()
                .position(|s| s == n)
                .map(|k| self.state[k].clone())
        };
        let base = |name: &str| {
            batch
                .iter()
                .chain(&hyper_t)
                .find(|(n, _)| n == name)
                .map(|(_, t)| t.clone())
                .or_else(|| state_of(name))
        };
        let fed = |session: &dyn Session, extra: &mut dyn FnMut(&str) -> Option<Tensor>| {
            let mut inputs = Vec::new();
            for p in &session.interface().inputs {
                let t = extra(&p.name)
                    .or_else(|| base(&p.name))
                    .expect("checked in data_parallel");
                inputs.push((p.name.clone(), t));
            }
            inputs
        };
        // A host step inside the gradient graph: its forward half, the step over every rank,
        // then the rest with the forward's activations and the step's results.
        let mut host_step_s = 0.0;
        let mut grad_out: BTreeMap<String, Tensor> = match &mut dp.forward {
            Some((forward, host)) => {
                let fwd_out = forward.run(fed(forward.as_ref(), &mut |_| None))?;
                let t = Instant::now();
                let values = host_step(host, &fwd_out, dp.comm.as_ref()).map_err(|problem| {
                    TrainError::DataParallel {
                        artifact: self.artifact.label(),
                        problem,
                    }
                })?;
                host_step_s = t.elapsed().as_secs_f64();
                let mut fwd: HashMap<String, Tensor> = fwd_out.into_iter().chain(values).collect();
                // The activations move into the gradient graph; what the step reads afterwards
                // (loss, metrics, state updates) is copied.
                let next_names = &dp.next_names;
                let metrics = &self.plan.metrics;
                let read_later = |n: &str| {
                    n == "loss"
                        || next_names.iter().any(|x| x == n)
                        || metrics.iter().any(|(m, _)| m == n)
                };
                let inputs = fed(dp.grad.as_ref(), &mut |n| {
                    if read_later(n) {
                        fwd.get(n).cloned()
                    } else {
                        fwd.remove(n)
                    }
                });
                let mut out: BTreeMap<String, Tensor> = dp.grad.run(inputs)?.into_iter().collect();
                for (name, t) in fwd {
                    out.entry(name).or_insert(t);
                }
                out
            }
            None => dp
                .grad
                .run(fed(dp.grad.as_ref(), &mut |_| None))?
                .into_iter()
                .collect(),
        };

        // Pack, all-reduce, average.
        let take = |out: &BTreeMap<String, Tensor>, name: &str| {
            out.get(name)
                .cloned()
                .ok_or_else(|| TrainError::DataParallel {
                    artifact: self.artifact.label(),
                    problem: format!("the gradient graph has no output `{name}`"),
                })
        };
        let mut packed: Vec<f32> = Vec::with_capacity(dp.stats.bytes_per_step / 4);
        for (g, _) in &dp.grads {
            packed.extend(take(&grad_out, g)?.to_f32().iter());
        }
        for &k in &dp.averaged {
            packed.extend(take(&grad_out, &dp.next_names[k])?.to_f32().iter());
        }
        packed.push(mean(&take(&grad_out, "loss")?) as f32);
        let mut grad_metrics = Vec::new();
        for (name, _) in &self.plan.metrics {
            let v = grad_out.get(name).map(mean);
            grad_metrics.push(v.is_some());
            packed.push(v.unwrap_or(0.0) as f32);
        }
        let wants_stop = self.stop.load(Ordering::SeqCst) || INTERRUPTED.load(Ordering::SeqCst);
        packed.push(if wants_stop { 1.0 } else { 0.0 });
        let (wait_s, comm_s) = timed_all_reduce(dp.comm.as_ref(), &mut packed);
        let scale = 1.0 / ranks as f32;
        let mut rest = &packed[..];
        let mut grads = Vec::with_capacity(dp.grads.len());
        for (g, shape) in &dp.grads {
            grads.push((g.clone(), Tensor::F32(take_scaled(&mut rest, shape, scale))));
        }
        for &k in &dp.averaged {
            let a = take_scaled(&mut rest, self.state[k].shape(), scale);
            grad_out.insert(dp.next_names[k].clone(), Tensor::F32(a));
        }
        let loss = f64::from(rest[0] * scale);
        let mut metrics: BTreeMap<String, Option<f64>> = BTreeMap::new();
        for ((name, _), (present, v)) in self
            .plan
            .metrics
            .iter()
            .zip(grad_metrics.iter().zip(&rest[1..]))
        {
            if *present {
                let v = f64::from(v * scale);
                metrics.insert(name.clone(), v.is_finite().then_some(v));
            }
        }
        if *rest.last().expect("the stop flag") > 0.0 {
            self.stop.store(true, Ordering::SeqCst);
        }
        // Queues: every rank's new keys, enqueued in rank order (MoCo's gather before enqueue).
        for &k in &dp.queues {
            let name = &dp.next_names[k];
            let local = take(&grad_out, name)?.to_f32();
            let old = self.state[k].to_f32();
            let new = gather_queue(dp.comm.as_ref(), &old, &local).map_err(|problem| {
                TrainError::DataParallel {
                    artifact: self.artifact.label(),
                    problem: format!("queue `{}`: {problem}", self.plan.state_names[k]),
                }
            })?;
            grad_out.insert(name.clone(), Tensor::F32(new));
        }

        // Update (skipped when the averaged loss or gradients are not finite).
        let mut problem = (!loss.is_finite()).then(|| format!("loss is {loss}"));
        if problem.is_none() {
            if let Some((g, _)) = grads.iter().find(|(_, t)| !all_finite(t)) {
                problem = Some(format!("the averaged gradient `{g}` is not finite"));
            }
        }
        let mut new_state: Vec<Option<Tensor>> = vec![None; self.state.len()];
        if problem.is_none() {
            let mut inputs = Vec::new();
            for p in &dp.update.interface().inputs {
                let t = grads
                    .iter()
                    .chain(&hyper_t)
                    .find(|(n, _)| *n == p.name)
                    .map(|(_, t)| t.clone())
                    .or_else(|| state_of(&p.name))
                    .expect("checked in data_parallel");
                inputs.push((p.name.clone(), t));
            }
            let update_out: BTreeMap<String, Tensor> = dp.update.run(inputs)?.into_iter().collect();
            for (name, _) in &self.plan.metrics {
                if let Some(t) = update_out.get(name) {
                    let v = mean(t);
                    metrics.insert(name.clone(), v.is_finite().then_some(v));
                }
            }
            for (k, next) in dp.next_names.iter().enumerate() {
                let new = update_out.get(next).or_else(|| grad_out.get(next));
                if let Some(t) = new {
                    if !all_finite(t) {
                        problem = Some(format!(
                            "the new value of `{}` is not finite",
                            self.plan.state_names[k]
                        ));
                        break;
                    }
                    if t.dtype() != self.state[k].dtype() || t.shape() != self.state[k].shape() {
                        return Err(TrainError::StateShape {
                            step,
                            name: self.plan.state_names[k].clone(),
                            expected: format!(
                                "{} {:?}",
                                self.state[k].dtype(),
                                self.state[k].shape()
                            ),
                            got: format!("{} {:?}", t.dtype(), t.shape()),
                        });
                    }
                    new_state[k] = Some(t.clone());
                }
            }
        }
        match &problem {
            None => {
                for (slot, new) in self.state.iter_mut().zip(new_state) {
                    // Parameters the update graph does not output are frozen.
                    if let Some(t) = new {
                        *slot = t;
                    }
                }
                self.nonfinite_in_row = 0;
            }
            Some(p) => {
                self.nonfinite_in_row += 1;
                tracing::warn!(
                    "step {step}: {p}; update skipped, state kept ({} in a row, stopping at {})",
                    self.nonfinite_in_row,
                    self.options.max_nonfinite_in_row.max(1)
                );
            }
        }
        for (name, _) in &self.plan.metrics {
            metrics.entry(name.clone()).or_insert(None);
        }
        self.advance(step);
        self.last_hyper = hyper.into_iter().collect();
        let seconds = t0.elapsed().as_secs_f64().max(1e-9);
        if let Some(dp) = self.dp.as_mut() {
            dp.stats.steps += 1;
            dp.stats.all_reduce_s += comm_s + host_step_s;
            dp.stats.wait_s += wait_s;
            dp.stats.step_s += seconds;
        }
        Ok(StepRecord {
            step,
            epoch: pos.epoch,
            loss: loss.is_finite().then_some(loss),
            metrics,
            hyper: self.last_hyper.clone(),
            images_per_s: (samples * ranks) as f64 / seconds,
            time_s: self.elapsed(),
            skipped: problem.is_some(),
            note: problem,
        })
    }

    fn batch_names(&self) -> String {
        let mut names: Vec<&str> = self.plan.batch_inputs.iter().map(String::as_str).collect();
        names.sort();
        names.join(", ")
    }

    fn elapsed(&self) -> f64 {
        self.elapsed_before + self.started.elapsed().as_secs_f64()
    }

    /// Writes a checkpoint of the current state and position now; returns its directory.
    pub fn checkpoint(&mut self, reason: CheckpointReason) -> Result<PathBuf, TrainError> {
        self.sync_state()?;
        let manifest = CheckpointManifest {
            schema_version: CHECKPOINT_SCHEMA_VERSION,
            kind: CHECKPOINT_KIND.into(),
            step: self.position.step,
            epoch: self.position.epoch,
            index_in_epoch: self.position.index_in_epoch,
            data_order: DataOrder {
                generator: "chacha8".into(),
                seed: self.options.seed,
                stream: self.position.epoch,
                position: self.position.index_in_epoch,
                batches_per_epoch: self.data.batches_per_epoch(),
                source: self.data.describe(),
            },
            schedule: ScheduleState {
                step: self.position.step,
                describe: self.schedule.describe(),
                last_values: self.last_hyper.clone(),
            },
            nonfinite_in_row: self.nonfinite_in_row,
            elapsed_s: self.elapsed(),
            reason,
            artifact: ArtifactRef {
                fingerprint: self.artifact.fingerprint(),
                label: self.artifact.label(),
                task: self.artifact.manifest().task.clone(),
            },
            config: self.options.clone(),
            state: CHECKPOINT_STATE.into(),
        };
        Ok(checkpoint::write(
            &self.options.out_dir,
            &manifest,
            &self.state(),
            self.options.keep_checkpoints,
        )?)
    }

    /// Trains until `options.length` steps are done or a stop is requested: logs every step,
    /// checkpoints every `checkpoint_every` steps, on stop and at the end, draws the loss
    /// curve at the end.
    ///
    /// Data parallel ([`Trainer::data_parallel`]): only rank 0 writes; an error on any rank
    /// aborts the whole job (MPI abort) with the error and the rank, instead of leaving the
    /// other ranks waiting in the all-reduce.
    pub fn run(&mut self) -> Result<TrainSummary, TrainError> {
        let result = self.run_inner();
        if let (Err(e), Some(dp)) = (&result, &self.dp) {
            dp.comm.abort(&e.to_string());
        }
        if let (Ok(_), Some(dp)) = (&result, &self.dp) {
            // Rank 0's last checkpoint is on disk before any rank returns.
            dp.comm.barrier();
        }
        result
    }

    fn run_inner(&mut self) -> Result<TrainSummary, TrainError> {
        let leader = self.is_leader();
        let data_parallel = self.dp.is_some();
        let out = self.options.out_dir.clone();
        std::fs::create_dir_all(&out).map_err(|source| TrainError::Io {
            path: out.clone(),
            source,
        })?;
        if self.options.handle_ctrl_c {
            install_ctrl_c();
            INTERRUPTED.store(false, Ordering::SeqCst);
        }
        let log_path = out.join(LOG_FILE);
        let mut log = if !leader {
            None
        } else if self.resumed || self.position.step > 0 {
            Some(JsonlLog::resume(&log_path, self.position.step)?)
        } else {
            Some(JsonlLog::create(&log_path)?)
        };
        self.started = Instant::now();
        let total = self.total_steps();
        let progress = Progress::new(total, self.position.step, self.options.progress && leader);
        let mut summary = TrainSummary {
            stop: StopReason::Finished,
            position: self.position,
            steps_run: 0,
            last_loss: None,
            checkpoint: None,
            log: log_path.clone(),
            plot: None,
        };
        let mut checkpointed_at = None;
        while self.position.step < total {
            let record = progress.suspend(|| self.step_unchecked())?;
            if let Some(log) = log.as_mut() {
                log.append(&record)?;
            }
            progress.update(&record);
            summary.steps_run += 1;
            if record.loss.is_some() {
                summary.last_loss = record.loss;
            }
            if let Err(e) = self.check_nonfinite(&record) {
                progress.finish();
                return Err(e);
            }
            let every = self.options.checkpoint_every;
            if every > 0 && self.position.step.is_multiple_of(every) {
                if leader {
                    summary.checkpoint = Some(self.checkpoint(CheckpointReason::Periodic)?);
                }
                checkpointed_at = Some(self.position.step);
            }
            // Data parallel: the stop flag was all-reduced in the step, so every rank stops
            // after the same step.
            let interrupted = !data_parallel && INTERRUPTED.load(Ordering::SeqCst);
            if self.stop.load(Ordering::SeqCst) || interrupted {
                summary.stop = StopReason::Interrupted;
                break;
            }
        }
        let reason = match summary.stop {
            StopReason::Finished => CheckpointReason::Final,
            StopReason::Interrupted => CheckpointReason::Interrupt,
        };
        if leader
            && (checkpointed_at != Some(self.position.step)
                || reason == CheckpointReason::Interrupt)
        {
            summary.checkpoint = Some(self.checkpoint(reason)?);
        }
        progress.finish();
        if self.options.plot && leader {
            let records = log::read_records(&log_path)?;
            let plot = out.join(PLOT_FILE);
            let title = match &self.artifact.manifest().task {
                Some(task) => format!("training loss: {task}"),
                None => "training loss".to_string(),
            };
            log::plot_loss(&records, &plot, &title, (800, 500))?;
            summary.plot = Some(plot);
        }
        summary.position = self.position;
        Ok(summary)
    }
}

/// The mean of a tensor's elements as f64 (NaN for an empty tensor).
/// Floats a step's host step sends: per Sinkhorn stage, the maximum, the total and the count,
/// then one prototype row per iteration (0 when the forward graph's shapes are not fixed); one
/// per mean.
fn host_step_floats(forward: Option<&(Box<dyn Session>, HostStep)>) -> usize {
    let Some((f, host)) = forward else {
        return 0;
    };
    host.means.len()
        + host
            .sinkhorn
            .iter()
            .flat_map(|ex| ex.stages.iter().map(move |st| (ex, st)))
            .map(|(ex, st)| {
                let k = f
                    .interface()
                    .outputs
                    .iter()
                    .find(|p| p.name == st.scores)
                    .and_then(|p| p.shape.as_ref())
                    .and_then(|s| s.last())
                    .and_then(|d| d.fixed())
                    .map_or(0, |k| k.max(0) as usize);
                3 + ex.iterations * k
            })
            .sum::<usize>()
}

/// The values of `host` for the gradient graph: Sinkhorn codes ([`exchange_sinkhorn`]) and
/// global means' denominators (`max(sum of the ranks' counts, floor) / N`), from the forward
/// half's outputs `fwd`.
fn host_step(
    host: &HostStep,
    fwd: &[(String, Tensor)],
    comm: &dyn Communicator,
) -> Result<Vec<(String, Tensor)>, String> {
    let mut out = match &host.sinkhorn {
        Some(ex) => exchange_sinkhorn(ex, fwd, comm)?,
        None => Vec::new(),
    };
    if host.means.is_empty() {
        return Ok(out);
    }
    let mut counts = Vec::new();
    for m in &host.means {
        let t = fwd
            .iter()
            .find(|(n, _)| *n == m.count)
            .map(|(_, t)| t.to_f32())
            .ok_or_else(|| format!("the forward graph has no output `{}`", m.count))?;
        if t.len() != 1 {
            return Err(format!(
                "count `{}` is {:?}, not one value",
                m.count,
                t.shape()
            ));
        }
        counts.push((t.shape().to_vec(), t.iter().next().copied().unwrap_or(0.0)));
    }
    let mut totals: Vec<f32> = counts.iter().map(|(_, c)| *c).collect();
    comm.all_reduce_sum(&mut totals);
    let ranks = comm.size() as f32;
    for ((m, (shape, _)), total) in host.means.iter().zip(counts).zip(totals) {
        let den = total.max(m.floor as f32) / ranks;
        out.push((
            m.denominator.clone(),
            Tensor::F32(ndarray::ArrayD::from_elem(shape, den)),
        ));
    }
    Ok(out)
}

/// The codes of every stage of `exchange`, computed with every rank from the forward half's
/// outputs `fwd` (see [`super::distributed::sinkhorn_codes`]): a shared queue's rows count on
/// rank 0 only, and only while the stage's `queue_used` flag is set.
fn exchange_sinkhorn(
    exchange: &SinkhornExchange,
    fwd: &[(String, Tensor)],
    comm: &dyn Communicator,
) -> Result<Vec<(String, Tensor)>, String> {
    let get = |name: &str| {
        fwd.iter()
            .find(|(n, _)| n == name)
            .map(|(_, t)| t.to_f32())
            .ok_or_else(|| format!("the forward graph has no output `{name}`"))
    };
    let mut out = Vec::new();
    for stage in &exchange.stages {
        let scores = get(&stage.scores)?;
        let scores = scores
            .view()
            .into_dimensionality::<ndarray::Ix2>()
            .map_err(|_| {
                format!(
                    "`{}` is {:?}, expected [N, K]",
                    stage.scores,
                    scores.shape()
                )
            })?;
        let n = scores.nrows();
        if stage.queue_rows > n {
            return Err(format!(
                "`{}` has {n} rows, fewer than its {} queue rows",
                stage.scores, stage.queue_rows
            ));
        }
        let used = match &stage.queue_used {
            Some(flag) => get(flag)?.iter().next().is_some_and(|&v| v > 0.0),
            None => true,
        };
        let queue = used && comm.rank() == 0;
        let keep: Vec<bool> = (0..n).map(|i| i >= stage.queue_rows || queue).collect();
        let codes = super::distributed::sinkhorn_codes(
            scores,
            &keep,
            exchange.epsilon,
            exchange.iterations,
            comm,
        );
        let batch = codes.slice(ndarray::s![stage.queue_rows.., ..]).to_owned();
        out.push((stage.codes.clone(), Tensor::F32(batch.into_dyn())));
    }
    Ok(out)
}

fn mean(t: &Tensor) -> f64 {
    let n = t.len();
    if n == 0 {
        return f64::NAN;
    }
    let sum: f64 = match t {
        Tensor::F64(a) => a.iter().sum(),
        other => other.to_f32().iter().map(|&v| f64::from(v)).sum(),
    };
    sum / n as f64
}

fn all_finite(t: &Tensor) -> bool {
    match t {
        Tensor::F32(a) => a.iter().all(|v| v.is_finite()),
        Tensor::F64(a) => a.iter().all(|v| v.is_finite()),
        Tensor::F16(a) => a.iter().all(|v| v.is_finite()),
        Tensor::BF16(a) => a.iter().all(|v| v.is_finite()),
        _ => true,
    }
}

/// The queue one process with the whole global batch would hold after this step: each rank's
/// graph enqueued its own keys at the front (`next = [keys; old[..K - m]]`, `m` keys); the
/// ranks' keys are gathered in rank order, which is the global batch order of the sharding,
/// and enqueued together: `[keys_0; keys_1; ...; old[..K - N m]]`. `m` is found by matching
/// the kept rows against the old queue (they are copies). The same on every rank.
fn gather_queue(
    comm: &dyn Communicator,
    old: &ndarray::ArrayD<f32>,
    local_next: &ndarray::ArrayD<f32>,
) -> Result<ndarray::ArrayD<f32>, String> {
    let (k, d) = (old.shape()[0], old.shape()[1]);
    if local_next.shape() != old.shape() {
        return Err(format!(
            "the new queue is {:?}, the old one {:?}",
            local_next.shape(),
            old.shape()
        ));
    }
    let old = old
        .view()
        .into_shape_with_order((k, d))
        .map_err(|e| e.to_string())?;
    let next = local_next
        .view()
        .into_shape_with_order((k, d))
        .map_err(|e| e.to_string())?;
    let m = (1..=k)
        .find(|&m| (m..k).all(|r| next.row(r) == old.row(r - m)))
        .ok_or("the new queue is not the old one with keys in front")?;
    let keys: Vec<f32> = next.slice(ndarray::s![..m, ..]).iter().copied().collect();
    let all = comm.all_gather(&keys);
    let n = all.len() / d;
    if n * d != all.len() || !n.is_multiple_of(comm.size()) || n != m * comm.size() {
        return Err(format!(
            "ranks enqueued different numbers of keys ({} values gathered, {m} keys here)",
            all.len()
        ));
    }
    if n > k {
        return Err(format!(
            "{n} keys per step across {} ranks exceed the queue's {k} rows: lengthen the queue",
            comm.size()
        ));
    }
    let mut out = Vec::with_capacity(k * d);
    out.extend_from_slice(&all);
    out.extend(old.slice(ndarray::s![..k - n, ..]).iter().copied());
    ndarray::ArrayD::from_shape_vec(vec![k, d], out).map_err(|e| e.to_string())
}
