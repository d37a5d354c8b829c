//! DETR's training step with the Hungarian matching on the host, between the two halves of a
//! split train step ([`split_train_step`]):
//!
//! 1. the **forward** graph (images + state -> every decoder layer's logits and boxes, and the
//!    activations the backward pass needs);
//! 2. on the host, per image and per decoder layer, the matching cost and the minimum-cost
//!    matching ([`super::matcher`]), laid out as per-query targets ([`QueryTargets`]);
//! 3. the **backward** graph (activations + targets + state + hyperparameters -> loss, new
//!    state: the set criterion, its gradient and the optimizer's update).
//!
//! Nothing is computed twice: the backward graph takes the forward's activations. The step
//! computes exactly what the whole train step computes when fed the same targets (tested).

use std::collections::HashMap;
use std::sync::Arc;

use densa_exporter::onnx::ModelProto;
use densa_exporter::weights::StateDict;
use densa_exporter::Tensor;
use densa_runtime::backend::{Backend, Session};
use densa_runtime::train::distributed::{averaged_buffer, take_scaled, timed_all_reduce};
use densa_runtime::train::{CommStats, Communicator, InputRole, Manifest, OutputRole};
use ndarray::{ArrayD, IxDyn};

use super::matcher::{match_image, query_embeddings, ImageTargets, MatcherConfig, QueryTargets};
use super::{names, DetrConfig, DetrError};
use crate::train_step::{
    build_train_step, split_data_parallel, split_train_step, ForwardGraph, SplitDataParallel,
    SplitStep, TrainStep, TrainStepConfig,
};

/// The composed DETR train step: whole (for reference and artifacts) and split.
pub struct DetrStepGraphs {
    pub whole: TrainStep,
    pub split: SplitStep,
    /// Per decoder layer: the logits and boxes value names (forward outputs).
    pub predictions: Vec<(String, String)>,
    /// With [`TrainStepConfig::data_parallel`]: the gradient graph split the same way, and the
    /// update graph ([`DetrTrainer::for_ranks`]).
    pub data_parallel: Option<SplitDataParallel>,
}

impl DetrStepGraphs {
    /// Splits `whole` after the forward pass: `host_inputs` are the matched targets,
    /// `predictions` each decoder layer's (logits, boxes).
    pub fn split(
        whole: TrainStep,
        host_inputs: &[String],
        predictions: Vec<(String, String)>,
    ) -> Result<DetrStepGraphs, DetrError> {
        let host_in: Vec<&str> = host_inputs.iter().map(String::as_str).collect();
        let host_out: Vec<&str> = predictions
            .iter()
            .flat_map(|(a, b)| [a.as_str(), b.as_str()])
            .collect();
        let split = split_train_step(&whole, &host_in, &host_out)?;
        let data_parallel = split_data_parallel(&whole, &host_in, &host_out)?;
        Ok(DetrStepGraphs {
            whole,
            split,
            predictions,
            data_parallel,
        })
    }
}

/// Builds the train step of `config` for batches of `batch` images (fixed) and splits it
/// after the forward pass, the matched targets being the host inputs.
pub fn step_graphs(
    config: &DetrConfig,
    batch: usize,
    train: &TrainStepConfig,
    seed: u64,
) -> Result<DetrStepGraphs, DetrError> {
    let (b, t) = config.training_forward(seed, Some(batch))?;
    let mut fwd = ForwardGraph::new(b, t.loss).norm_state(t.norm_state);
    for (l, (ce, bbox, giou)) in t.layer_losses.into_iter().enumerate() {
        fwd = fwd
            .metric(&format!("loss_ce.{l}"), ce)
            .metric(&format!("loss_bbox.{l}"), bbox)
            .metric(&format!("loss_giou.{l}"), giou);
    }
    for (l, e) in t.embedding_losses {
        fwd = fwd.metric(&format!("loss_embed.{l}"), e);
    }
    let whole = build_train_step(fwd, train)?;
    DetrStepGraphs::split(whole, &t.host_inputs, t.predictions)
}

/// What one step reports.
#[derive(Clone, Debug, PartialEq)]
pub struct StepReport {
    /// The total loss (every decoder layer).
    pub loss: f32,
    /// The metrics (`loss_ce.{l}`, `loss_bbox.{l}`, `loss_giou.{l}`, with an embedding head
    /// `loss_embed.{l}`), by name.
    pub metrics: Vec<(String, f32)>,
    /// Target boxes in the batch.
    pub num_boxes: usize,
}

/// Runs DETR train steps on a backend: forward, host matching, backward and update; keeps
/// the state (parameters, buffers, optimizer slots) on the host.
pub struct DetrTrainer {
    config: DetrConfig,
    matcher: MatcherConfig,
    manifest: Manifest,
    /// The split step's halves, for one process (`None` on a rank of a data-parallel job).
    single: Option<SingleProcess>,
    predictions: Vec<(String, String)>,
    batch: usize,
    state: StateDict,
    /// Hyperparameter values (defaults from the manifest, overridable).
    hyper: HashMap<String, f64>,
    steps: u64,
    /// Set by [`DetrTrainer::for_ranks`] on more than one rank.
    dp: Option<DataParallel>,
}

/// One process's step: the forward half, the host matching, the backward half (with the
/// update).
struct SingleProcess {
    forward: Box<dyn Session>,
    backward: Box<dyn Session>,
}

/// A data-parallel DETR step's graphs and exchange plan: every rank runs the forward half
/// and matches its own images (DETR's matching is per image), the gradient half gives the
/// rank's gradients, one all-reduce averages gradients, running statistics, loss and metrics,
/// and the update graph applies the averages. The box count that normalises the losses is
/// summed over the ranks first, as DETR's `all_reduce(num_boxes)`.
struct DataParallel {
    comm: Arc<dyn Communicator>,
    forward: Box<dyn Session>,
    grad: Box<dyn Session>,
    update: Box<dyn Session>,
    /// (gradient name, parameter shape).
    grads: Vec<(String, Vec<usize>)>,
    /// Buffers whose next values are averaged: (next name, shape).
    averaged: Vec<(String, Vec<usize>)>,
    stats: CommStats,
}

/// Loads `model` on `backend`; errors name the graph.
fn load_graph(
    backend: &dyn Backend,
    model: &ModelProto,
    label: &str,
) -> Result<Box<dyn Session>, DetrError> {
    backend
        .load_model(model, label)
        .map_err(|e| DetrError::Step(format!("loading the {label} graph: {e}")))
}

/// Runs `session` on `inputs`; errors name the graph.
fn run_graph(
    session: &mut dyn Session,
    inputs: Vec<(String, Tensor)>,
    label: &str,
) -> Result<HashMap<String, Tensor>, DetrError> {
    Ok(session
        .run(inputs)
        .map_err(|e| DetrError::Step(format!("{label}: {e}")))?
        .into_iter()
        .collect())
}

fn scalar_f64(v: f64) -> Tensor {
    Tensor::F64(ArrayD::from_elem(IxDyn(&[]), v))
}

impl DetrTrainer {
    /// Loads the two halves of `graphs` on `backend`, starting from the step's initial state.
    pub fn new(
        config: &DetrConfig,
        graphs: &DetrStepGraphs,
        batch: usize,
        backend: &dyn Backend,
    ) -> Result<DetrTrainer, DetrError> {
        let mut trainer = DetrTrainer::unloaded(config, graphs, batch);
        trainer.single = Some(SingleProcess {
            forward: load_graph(backend, &graphs.split.forward, "detr-forward")?,
            backward: load_graph(backend, &graphs.split.backward, "detr-backward")?,
        });
        Ok(trainer)
    }

    /// The trainer before any graph is loaded.
    fn unloaded(config: &DetrConfig, graphs: &DetrStepGraphs, batch: usize) -> DetrTrainer {
        let manifest = graphs.whole.manifest.clone();
        let hyper = manifest
            .inputs
            .iter()
            .filter(|e| e.role == InputRole::Hyper)
            .filter_map(|e| e.default.map(|d| (e.name.clone(), d)))
            .collect();
        DetrTrainer {
            config: config.clone(),
            matcher: config.matcher,
            single: None,
            manifest,
            predictions: graphs.predictions.clone(),
            batch,
            state: graphs.whole.state.clone(),
            hyper,
            steps: 0,
            dp: None,
        }
    }

    /// A trainer for one of `comm`'s ranks: with one rank, [`DetrTrainer::new`]; with more,
    /// each rank steps on its own images (its `batch`-image shard of the global batch) and the
    /// ranks apply the same averaged update, so they hold the same state. Only the graphs this
    /// rank will run are loaded. With more than one rank, `graphs` must have been built with
    /// [`TrainStepConfig::data_parallel`].
    pub fn for_ranks(
        config: &DetrConfig,
        graphs: &DetrStepGraphs,
        batch: usize,
        backend: &dyn Backend,
        comm: Arc<dyn Communicator>,
    ) -> Result<DetrTrainer, DetrError> {
        if comm.size() <= 1 {
            return DetrTrainer::new(config, graphs, batch, backend);
        }
        let mut trainer = DetrTrainer::unloaded(config, graphs, batch);
        let split = graphs.data_parallel.as_ref().ok_or_else(|| {
            DetrError::Step(
                "the train step was built without data parallelism (TrainStepConfig::\
                 data_parallel)"
                    .into(),
            )
        })?;
        let mut grads = Vec::new();
        for g in &split.grads {
            let shape = trainer
                .state
                .get(&g.param)
                .map(|t| t.shape().to_vec())
                .ok_or_else(|| DetrError::Step(format!("parameter `{}` has no state", g.param)))?;
            grads.push((g.grad.clone(), shape));
        }
        let mut averaged = Vec::new();
        for e in &trainer.manifest.inputs {
            let Some(next) = &e.next else { continue };
            if e.role != InputRole::Buffer || !averaged_buffer(&e.name) {
                continue;
            }
            let shape = trainer
                .state
                .get(&e.name)
                .map(|t| t.shape().to_vec())
                .ok_or_else(|| DetrError::Step(format!("buffer `{}` has no state", e.name)))?;
            averaged.push((next.clone(), shape));
        }
        trainer.dp = Some(DataParallel {
            stats: CommStats {
                ranks: comm.size(),
                ..CommStats::default()
            },
            forward: load_graph(backend, &split.forward, "detr-dp-forward")?,
            grad: load_graph(backend, &split.grad, "detr-dp-gradient")?,
            update: load_graph(backend, &split.update, "detr-dp-update")?,
            comm,
            grads,
            averaged,
        });
        Ok(trainer)
    }

    /// The current state (parameters, buffers, optimizer slots), by name.
    pub fn state(&self) -> &StateDict {
        &self.state
    }

    /// Replaces entries of the state (a checkpoint, a pretrained backbone); shapes must match.
    pub fn load_state(&mut self, state: &StateDict) -> Result<usize, DetrError> {
        let mut n = 0;
        for (name, t) in state.iter() {
            if let Some(cur) = self.state.get(name) {
                if cur.shape() != t.shape() {
                    return Err(DetrError::State {
                        name: name.to_string(),
                        problem: format!("has shape {:?}, expected {:?}", t.shape(), cur.shape()),
                    });
                }
                self.state.insert(name, t.clone());
                n += 1;
            }
        }
        Ok(n)
    }

    /// Sets a hyperparameter (`optim.lr`...) for the following steps.
    pub fn set_hyper(&mut self, name: &str, value: f64) -> Result<(), DetrError> {
        match self.hyper.get_mut(name) {
            Some(v) => {
                *v = value;
                Ok(())
            }
            None => Err(DetrError::Step(format!(
                "`{name}` is not a hyperparameter of the step (have: {})",
                self.hyper.keys().cloned().collect::<Vec<_>>().join(", ")
            ))),
        }
    }

    /// Steps run so far.
    pub fn steps(&self) -> u64 {
        self.steps
    }

    fn value_for(&self, name: &str, extra: &HashMap<String, Tensor>) -> Option<Tensor> {
        extra
            .get(name)
            .cloned()
            .or_else(|| self.state.get(name).cloned())
            .or_else(|| self.hyper.get(name).map(|&v| scalar_f64(v)))
    }

    fn feed(
        &self,
        session: &dyn Session,
        extra: &HashMap<String, Tensor>,
        label: &str,
    ) -> Result<Vec<(String, Tensor)>, DetrError> {
        session
            .interface()
            .inputs
            .iter()
            .map(|p| {
                self.value_for(&p.name, extra)
                    .map(|t| (p.name.clone(), t))
                    .ok_or_else(|| {
                        DetrError::Step(format!(
                            "nothing to feed input `{}` of the {label}",
                            p.name
                        ))
                    })
            })
            .collect()
    }

    /// The per-layer matched targets of a batch from the forward outputs: host inputs of the
    /// backward graph.
    pub fn match_batch(
        &self,
        outputs: &HashMap<String, Tensor>,
        targets: &[ImageTargets],
    ) -> Result<HashMap<String, Tensor>, DetrError> {
        let q = self.config.num_queries;
        let classes = self.config.num_classes();
        let k = self.config.class_outputs();
        let n = targets.len();
        let mut host = HashMap::new();
        for (l, (logits_name, boxes_name)) in self.predictions.iter().enumerate() {
            let get = |name: &str| {
                outputs
                    .get(name)
                    .map(|t| t.to_f32())
                    .ok_or_else(|| DetrError::Step(format!("the forward graph gave no `{name}`")))
            };
            let logits = get(logits_name)?;
            let boxes = get(boxes_name)?;
            let (logits, boxes) = (
                logits.as_standard_layout().to_owned(),
                boxes.as_standard_layout().to_owned(),
            );
            let (ls, bs) = (
                logits.as_slice().expect("standard layout"),
                boxes.as_slice().expect("standard layout"),
            );
            if ls.len() != n * q * k || bs.len() != n * q * 4 {
                return Err(DetrError::Step(format!(
                    "layer {l}: predictions for {} values, expected a batch of {n}",
                    ls.len()
                )));
            }
            let matches = targets
                .iter()
                .enumerate()
                .map(|(i, t)| {
                    match_image(
                        &self.matcher,
                        &self.config.loss.class,
                        &ls[i * q * k..(i + 1) * q * k],
                        &bs[i * q * 4..(i + 1) * q * 4],
                        q,
                        classes,
                        t,
                    )
                })
                .collect::<Result<Vec<_>, _>>()?;
            if let Some(e) = self
                .config
                .embedding
                .filter(|e| e.on_layer(l, self.config.decoder_layers))
            {
                let values = query_embeddings(&matches, targets, e.dim)?;
                host.insert(
                    names::embeddings(l),
                    Tensor::F32(
                        ArrayD::from_shape_vec(IxDyn(&[n, q, e.dim]), values).expect("[N, Q, E]"),
                    ),
                );
            }
            let qt = QueryTargets::from_matches(&matches, targets, classes);
            host.insert(
                names::classes(l),
                Tensor::I64(ArrayD::from_shape_vec(IxDyn(&[n, q]), qt.classes).expect("[N, Q]")),
            );
            host.insert(
                names::boxes(l),
                Tensor::F32(
                    ArrayD::from_shape_vec(IxDyn(&[n, q, 4]), qt.boxes).expect("[N, Q, 4]"),
                ),
            );
            host.insert(
                names::mask(l),
                Tensor::F32(ArrayD::from_shape_vec(IxDyn(&[n, q]), qt.mask).expect("[N, Q]")),
            );
        }
        let total: usize = targets.iter().map(|t| t.boxes.len()).sum();
        host.insert(
            names::NUM_BOXES.to_string(),
            Tensor::F32(ArrayD::from_elem(IxDyn(&[]), total.max(1) as f32)),
        );
        Ok(host)
    }

    /// The forward half on `images` (and `extra`), then the matching of every image: the
    /// values the rest of the step is fed (the inputs, the matched targets, the forward
    /// outputs) and the forward outputs.
    #[allow(clippy::type_complexity)]
    fn forward_and_match(
        &self,
        forward: &mut dyn Session,
        images: Tensor,
        targets: &[ImageTargets],
        extra: &[(String, Tensor)],
    ) -> Result<(HashMap<String, Tensor>, HashMap<String, Tensor>), DetrError> {
        let mut feed_values: HashMap<String, Tensor> = extra.iter().cloned().collect();
        feed_values.insert(names::IMAGES.to_string(), images);
        let inputs = self.feed(forward, &feed_values, "forward graph")?;
        let f_out = run_graph(forward, inputs, "forward graph")?;
        feed_values.extend(self.match_batch(&f_out, targets)?);
        feed_values.extend(f_out.iter().map(|(k, v)| (k.clone(), v.clone())));
        Ok((feed_values, f_out))
    }

    /// The forward half, the matching and the backward half of one process's step: their
    /// outputs.
    #[allow(clippy::type_complexity)]
    fn run_halves(
        &self,
        single: &mut SingleProcess,
        images: Tensor,
        targets: &[ImageTargets],
        extra: &[(String, Tensor)],
    ) -> Result<(HashMap<String, Tensor>, HashMap<String, Tensor>), DetrError> {
        let (feed_values, f_out) =
            self.forward_and_match(single.forward.as_mut(), images, targets, extra)?;
        let inputs = self.feed(single.backward.as_ref(), &feed_values, "backward graph")?;
        let b_out = run_graph(single.backward.as_mut(), inputs, "backward graph")?;
        Ok((f_out, b_out))
    }

    /// One step on `images [N, 3, S, S]` (normalised) with their targets; `extra` feeds other
    /// batch inputs (`decoder.self_attn_mask`). A non-finite loss is an error and leaves the
    /// state as it was.
    pub fn step(
        &mut self,
        images: Tensor,
        targets: &[ImageTargets],
        extra: &[(String, Tensor)],
    ) -> Result<StepReport, DetrError> {
        if targets.len() != self.batch {
            return Err(DetrError::Step(format!(
                "{} target lists for a batch of {}",
                targets.len(),
                self.batch
            )));
        }
        if self.dp.is_some() {
            return self.step_data_parallel(images, targets, extra);
        }
        let mut single = self
            .single
            .take()
            .expect("a trainer loads one kind of step");
        let halves = self.run_halves(&mut single, images, targets, extra);
        self.single = Some(single);
        let (f_out, b_out) = halves?;
        let first = |t: &Tensor| t.to_f32().iter().next().copied().unwrap_or(f32::NAN);
        let loss = b_out
            .get(names::LOSS)
            .map(first)
            .ok_or_else(|| DetrError::Step("the backward graph gave no `loss`".into()))?;
        if !loss.is_finite() {
            return Err(DetrError::Step(format!(
                "loss is {loss} at step {}; state left unchanged",
                self.steps
            )));
        }
        let mut next = StateDict::new();
        for e in &self.manifest.inputs {
            let Some(n) = &e.next else { continue };
            let v = b_out.get(n).or_else(|| f_out.get(n)).ok_or_else(|| {
                DetrError::Step(format!(
                    "no graph gave `{n}`, the next value of `{}`",
                    e.name
                ))
            })?;
            next.insert(e.name.clone(), v.clone());
        }
        for (name, t) in next.iter() {
            self.state.insert(name, t.clone());
        }
        self.steps += 1;
        let mut metrics: Vec<(String, f32)> = self
            .manifest
            .outputs
            .iter()
            .filter(|o| o.role == densa_runtime::train::OutputRole::Metric)
            .filter_map(|o| b_out.get(&o.name).map(|t| (o.name.clone(), first(t))))
            .collect();
        metrics.sort_by(|a, b| a.0.cmp(&b.0));
        Ok(StepReport {
            loss,
            metrics,
            num_boxes: targets.iter().map(|t| t.boxes.len()).sum(),
        })
    }
}

impl DetrTrainer {
    /// The communication figures of a data-parallel run (`None` for one process).
    pub fn comm_stats(&self) -> Option<CommStats> {
        self.dp.as_ref().map(|d| d.stats)
    }

    /// [`DetrTrainer::step`] as one rank of a data-parallel job (see [`DataParallel`]).
    fn step_data_parallel(
        &mut self,
        images: Tensor,
        targets: &[ImageTargets],
        extra: &[(String, Tensor)],
    ) -> Result<StepReport, DetrError> {
        let t0 = std::time::Instant::now();
        let mut dp = self.dp.take().expect("checked by the caller");
        let result = self.rank_step(&mut dp, images, targets, extra);
        dp.stats.steps += 1;
        dp.stats.step_s += t0.elapsed().as_secs_f64();
        self.dp = Some(dp);
        result
    }

    fn rank_step(
        &mut self,
        dp: &mut DataParallel,
        images: Tensor,
        targets: &[ImageTargets],
        extra: &[(String, Tensor)],
    ) -> Result<StepReport, DetrError> {
        let (mut feed_values, f_out) =
            self.forward_and_match(dp.forward.as_mut(), images, targets, extra)?;
        // The losses are normalised by the global batch's box count (in place of the rank's
        // own that the matching gave): each rank divides by max(total, 1) / N, so the mean
        // over ranks is the global sum over the global count.
        let local: usize = targets.iter().map(|t| t.boxes.len()).sum();
        let mut count = [local as f32];
        dp.comm.all_reduce_sum(&mut count);
        let ranks = dp.comm.size();
        feed_values.insert(
            names::NUM_BOXES.to_string(),
            Tensor::F32(ArrayD::from_elem(
                IxDyn(&[]),
                count[0].max(1.0) / ranks as f32,
            )),
        );
        let inputs = self.feed(dp.grad.as_ref(), &feed_values, "gradient graph")?;
        let mut g_out = run_graph(dp.grad.as_mut(), inputs, "gradient graph")?;
        for (k, v) in &f_out {
            g_out.entry(k.clone()).or_insert_with(|| v.clone());
        }
        let take = |name: &str| {
            g_out
                .get(name)
                .ok_or_else(|| DetrError::Step(format!("the gradient graph gave no `{name}`")))
        };
        let first = |t: &Tensor| t.to_f32().iter().next().copied().unwrap_or(f32::NAN);
        let metric_names: Vec<String> = self
            .manifest
            .outputs
            .iter()
            .filter(|o| o.role == OutputRole::Metric && g_out.contains_key(&o.name))
            .map(|o| o.name.clone())
            .collect();
        // One all-reduce: gradients, averaged buffers, loss, metrics.
        let mut packed = Vec::new();
        for (g, _) in &dp.grads {
            packed.extend(take(g)?.to_f32().iter());
        }
        for (next, _) in &dp.averaged {
            packed.extend(take(next)?.to_f32().iter());
        }
        packed.push(first(take(names::LOSS)?));
        for m in &metric_names {
            packed.push(first(take(m)?));
        }
        let (wait_s, comm_s) = timed_all_reduce(dp.comm.as_ref(), &mut packed);
        dp.stats.all_reduce_s += comm_s;
        dp.stats.wait_s += wait_s;
        // The box count's all-reduce included.
        dp.stats.bytes_per_step = (packed.len() + 1) * std::mem::size_of::<f32>();
        let scale = 1.0 / ranks as f32;
        let mut rest = &packed[..];
        let mut averaged: HashMap<String, Tensor> = HashMap::new();
        for (name, shape) in dp.grads.iter().chain(&dp.averaged) {
            averaged.insert(
                name.clone(),
                Tensor::F32(take_scaled(&mut rest, shape, scale)),
            );
        }
        let loss = rest[0] * scale;
        let mut metrics: Vec<(String, f32)> = metric_names
            .into_iter()
            .zip(&rest[1..])
            .map(|(m, v)| (m, v * scale))
            .collect();
        metrics.sort_by(|a, b| a.0.cmp(&b.0));
        if !loss.is_finite() {
            return Err(DetrError::Step(format!(
                "loss is {loss} at step {}; state left unchanged",
                self.steps
            )));
        }
        let inputs = self.feed(dp.update.as_ref(), &averaged, "update graph")?;
        let u_out = run_graph(dp.update.as_mut(), inputs, "update graph")?;
        let mut next = StateDict::new();
        for e in &self.manifest.inputs {
            let Some(n) = &e.next else { continue };
            // Parameters the update graph does not output are frozen.
            if let Some(v) = u_out
                .get(n)
                .or_else(|| averaged.get(n))
                .or_else(|| g_out.get(n))
            {
                next.insert(e.name.clone(), v.clone());
            }
        }
        for (name, t) in next.iter() {
            self.state.insert(name, t.clone());
        }
        self.steps += 1;
        Ok(StepReport {
            loss,
            metrics,
            num_boxes: local,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::train_step::OptimizerConfig;
    use crate::Arch;
    use densa_runtime::backend::tract::TractBackend;

    fn tiny() -> DetrConfig {
        let mut c = DetrConfig::new(Arch::Edge, vec!["square".into(), "bar".into()]);
        c.image_size = 64;
        c.d_model = 16;
        c.heads = 2;
        c.encoder_layers = 1;
        c.decoder_layers = 2;
        c.ffn_dim = 32;
        c.num_queries = 6;
        c
    }

    /// Two 64 px images: dark noise with bright rectangles; targets in normalised cxcywh.
    fn scenes() -> (Tensor, Vec<ImageTargets>) {
        let s = 64usize;
        let rects: [&[([usize; 4], usize)]; 2] = [
            &[([8, 10, 30, 32], 0), ([40, 36, 60, 44], 1)],
            &[([20, 20, 48, 50], 0)],
        ];
        let mut x = vec![0f32; 2 * 3 * s * s];
        let mut rng = super::super::hungarian::tests::Rng::new(1);
        for v in x.iter_mut() {
            *v = rng.next_f64() as f32 * 0.2 - 1.0;
        }
        let mut targets = Vec::new();
        for (n, list) in rects.iter().enumerate() {
            let mut t = ImageTargets::default();
            for &([x1, y1, x2, y2], label) in list.iter() {
                for c in 0..3 {
                    for y in y1..y2 {
                        for xx in x1..x2 {
                            x[((n * 3 + c) * s + y) * s + xx] = if label == 0 { 1.5 } else { 0.8 };
                        }
                    }
                }
                let f = |v: usize| v as f32 / s as f32;
                t.boxes.push(super::super::matcher::xyxy_to_cxcywh([
                    f(x1),
                    f(y1),
                    f(x2),
                    f(y2),
                ]));
                t.labels.push(label);
            }
            targets.push(t);
        }
        (
            Tensor::F32(ArrayD::from_shape_vec(IxDyn(&[2, 3, s, s]), x).unwrap()),
            targets,
        )
    }

    #[test]
    fn the_split_step_computes_what_the_whole_step_computes() {
        let c = tiny();
        let graphs = step_graphs(&c, 2, &TrainStepConfig::default(), 0).unwrap();
        let backend = TractBackend::new();
        let mut t = DetrTrainer::new(&c, &graphs, 2, &backend).unwrap();
        let (images, targets) = scenes();
        // The host targets as the split step builds them (forward on the initial state).
        let mut fwd = backend.load_model(&graphs.split.forward, "f").unwrap();
        let mut feed = HashMap::new();
        feed.insert(names::IMAGES.to_string(), images.clone());
        let inputs = t.feed(fwd.as_ref(), &feed, "forward").unwrap();
        let f_out: HashMap<String, Tensor> = fwd.run(inputs).unwrap().into_iter().collect();
        let host = t.match_batch(&f_out, &targets).unwrap();
        let mask0 = host[&names::mask(0)].to_f32();
        assert_eq!(mask0.iter().sum::<f32>(), 3.0, "one query per target");
        // The whole step on the same inputs.
        let mut whole = backend.load_model(&graphs.whole.graph, "whole").unwrap();
        feed.extend(host);
        let inputs = t.feed(whole.as_ref(), &feed, "whole").unwrap();
        let w_out: HashMap<String, Tensor> = whole.run(inputs).unwrap().into_iter().collect();
        let report = t.step(images, &targets, &[]).unwrap();
        let w_loss = w_out["loss"].to_f32().iter().next().copied().unwrap();
        assert!(
            (report.loss - w_loss).abs() <= 1e-5 * w_loss.abs(),
            "{} vs {w_loss}",
            report.loss
        );
        assert_eq!(report.num_boxes, 3);
        assert!(report
            .metrics
            .iter()
            .any(|(n, v)| n == "loss_giou.1" && *v > 0.0));
        for name in ["class_embed.weight", "conv1.weight", "query_embed.weight"] {
            let a = t.state().get(name).unwrap().to_f32();
            let b = w_out[&format!("{name}.next")].to_f32();
            let d = a
                .iter()
                .zip(b.iter())
                .fold(0f32, |m, (x, y)| m.max((x - y).abs()));
            assert!(d <= 1e-6, "`{name}` differs by {d}");
            assert_ne!(
                a,
                graphs.whole.state.get(name).unwrap().to_f32(),
                "`{name}` did not move"
            );
        }
    }

    /// 2 ranks of one image each train like one process with both: every rank matches its own
    /// image, the box count is summed over the ranks and the update averages the gradients.
    /// The images hold 2 and 1 boxes, so normalising by each rank's own count would train
    /// differently: the check can fail. Backbone batch norm on running statistics (with batch
    /// statistics the shards normalise differently), and the no-object class weighted 1: with
    /// DETR's 0.1 the class loss is a weighted mean over each rank's queries (each GPU's
    /// `F.cross_entropy` in DETR's multi-GPU runs), whose average over the ranks is not the
    /// weighted mean over the doubled batch. SGD: Adam's normalised step would turn rounding
    /// in near-zero gradients into learning-rate-sized moves. Measured: 4.8e-7 where the state
    /// moved 3.7; with each rank's own box count 1.6.
    #[test]
    fn two_ranks_train_like_one_process_with_the_doubled_batch() {
        use densa_runtime::train::LocalGroup;
        use ndarray::{Axis, Slice};
        let mut c = tiny();
        c.train_batch_norm = false;
        c.loss.eos_coef = 1.0;
        let mut train = TrainStepConfig::new(OptimizerConfig::sgd(0.01, 0.9, 1e-4));
        train.data_parallel = true;
        let whole = step_graphs(&c, 2, &train, 0).unwrap();
        let shard = step_graphs(&c, 1, &train, 0).unwrap();
        let (images, targets) = scenes();
        let steps = 3;
        let mut one = DetrTrainer::new(&c, &whole, 2, &TractBackend::new()).unwrap();
        let mut losses = Vec::new();
        for _ in 0..steps {
            losses.push(one.step(images.clone(), &targets, &[]).unwrap().loss);
        }
        let all = images.to_f32();
        let (c, shard, targets) = (&c, &shard, &targets);
        let ranks: Vec<(StateDict, Vec<f32>)> = std::thread::scope(|s| {
            let handles: Vec<_> = LocalGroup::new(2)
                .into_iter()
                .map(|comm| {
                    let mine = Tensor::F32(
                        all.slice_axis(Axis(0), Slice::from(comm.rank()..comm.rank() + 1))
                            .to_owned(),
                    );
                    s.spawn(move || {
                        let rank = comm.rank();
                        let backend = TractBackend::new();
                        let comm: Arc<dyn Communicator> = Arc::new(comm);
                        let mut t = DetrTrainer::for_ranks(c, shard, 1, &backend, comm).unwrap();
                        let losses = (0..steps)
                            .map(|_| {
                                t.step(mine.clone(), &targets[rank..rank + 1], &[])
                                    .unwrap()
                                    .loss
                            })
                            .collect();
                        (t.state().clone(), losses)
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        let diff = |a: &StateDict, b: &StateDict| {
            a.iter().fold(0f32, |m, (name, t)| {
                let u = b.get(name).unwrap().to_f32();
                t.to_f32()
                    .iter()
                    .zip(u.iter())
                    .fold(m, |m, (x, y)| m.max((x - y).abs()))
            })
        };
        assert_eq!(diff(&ranks[0].0, &ranks[1].0), 0.0, "the ranks differ");
        let moved = diff(one.state(), &whole.whole.state);
        let d = diff(one.state(), &ranks[0].0);
        assert!(moved > 1e-3, "the steps changed nothing ({moved})");
        assert!(
            d < 1e-5,
            "2 ranks vs the doubled batch: max |diff| {d} (moved {moved})"
        );
        for (a, b) in losses.iter().zip(&ranks[0].1) {
            assert!(
                (a - b).abs() <= 1e-5 * a.abs(),
                "losses {losses:?} vs {:?}",
                ranks[0].1
            );
        }
    }

    #[test]
    fn a_hundred_steps_fit_two_tiny_scenes_and_the_export_finds_their_objects() {
        let c = tiny();
        let train = TrainStepConfig::new(OptimizerConfig::adamw(1e-3, 1e-4));
        let graphs = step_graphs(&c, 2, &train, 0).unwrap();
        let mut t = DetrTrainer::new(&c, &graphs, 2, &TractBackend::new()).unwrap();
        let (images, targets) = scenes();
        let losses: Vec<f32> = (0..100)
            .map(|_| t.step(images.clone(), &targets, &[]).unwrap().loss)
            .collect();
        // Measured: 11.65 at step 0, 0.90 at step 100 (AdamW 1e-3, seed 0).
        assert!(losses[99] < 0.2 * losses[0], "losses {losses:?}");
        assert_eq!(t.steps(), 100);
        // The exported model (last decoder layer, top 3 queries) finds every object: the
        // matching, the losses and the decoding agree on what a box and a class are.
        let model = c.inference_graph(Some(t.state()), 3, &[]).unwrap();
        let out: HashMap<String, Tensor> = TractBackend::new()
            .load_model(&model, "fitted")
            .unwrap()
            .run(vec![("images".into(), images.clone())])
            .unwrap()
            .into_iter()
            .collect();
        let (boxes, scores, labels) = (
            out["boxes"].to_f32(),
            out["scores"].to_f32(),
            out["labels"].to_f32(),
        );
        for (n, tg) in targets.iter().enumerate() {
            for (tb, &label) in tg.boxes.iter().zip(&tg.labels) {
                let want = super::super::matcher::cxcywh_to_xyxy(tb.map(|v| v * 64.0));
                let found = (0..3).any(|k| {
                    let b = [0, 1, 2, 3].map(|i| boxes[[n, k, i]]);
                    // GIoU <= IoU, so GIoU > 0.7 means IoU > 0.7.
                    let giou = super::super::matcher::generalized_iou(b, want);
                    scores[[n, k]] > 0.5 && labels[[n, k]] as usize == label && giou > 0.7
                });
                assert!(found, "image {n}: no detection of {want:?} (class {label}): {boxes:?} {scores:?} {labels:?}");
            }
        }
        let e = t.step(images, &targets[..1], &[]).unwrap_err().to_string();
        assert!(e.contains("batch of 2"), "{e}");
    }

    #[test]
    fn a_frozen_backbone_stays_while_the_transformer_and_embedding_head_learn() {
        let mut c = tiny();
        c.embedding = Some(super::super::EmbeddingConfig::detreg(3));
        let mut train = TrainStepConfig::new(OptimizerConfig::adamw(1e-3, 1e-4));
        train.trainable = crate::train_step::Trainable::Frozen(
            super::super::pretext::BACKBONE_PREFIXES
                .map(String::from)
                .to_vec(),
        );
        let graphs = step_graphs(&c, 2, &train, 0).unwrap();
        let mut t = DetrTrainer::new(&c, &graphs, 2, &TractBackend::new()).unwrap();
        let (images, mut targets) = scenes();
        targets[0].embeddings = vec![vec![1.0, 0.0, -1.0], vec![0.5, 0.5, 0.5]];
        // An image without proposals: all its queries learn "no object".
        targets[1] = ImageTargets::default();
        let names = [
            "conv1.weight",
            "layer1.0.bn1.weight",
            "layer4.0.conv2.weight",
            "transformer.decoder.layers.0.cross_attn.q_proj.weight",
            "feature_embed.layers.0.weight",
            "feature_embed.layers.2.bias",
            "class_embed.weight",
        ];
        let before: Vec<_> = names
            .iter()
            .map(|n| t.state().get(n).unwrap().to_f32())
            .collect();
        let report = t.step(images.clone(), &targets, &[]).unwrap();
        assert_eq!(report.num_boxes, 2);
        let embed = report
            .metrics
            .iter()
            .find(|(n, _)| n == "loss_embed.1")
            .map(|(_, v)| *v)
            .unwrap();
        assert!(embed > 0.0 && embed.is_finite(), "{embed}");
        for (name, b) in names.iter().zip(&before) {
            let a = t.state().get(name).unwrap().to_f32();
            let frozen = name.starts_with("conv1") || name.starts_with("layer");
            assert_eq!(a == *b, frozen, "`{name}`: frozen {frozen}");
        }
        // Embeddings that do not fit the head are an error naming them.
        targets[0].embeddings[1].push(0.0);
        let e = t.step(images, &targets, &[]).unwrap_err().to_string();
        assert!(e.contains("embedding"), "{e}");
    }
}
