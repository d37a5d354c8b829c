//! `densa finetune --task segment`: fine-tunes a semantic-FPN segmenter
//! ([`densa_models::segment`]) on a COCO-format dataset with semantic mask PNGs (as
//! `densa synth` writes them).
//!
//! - **Subsets** (the low-label regime of the self-supervised papers): `--label-fraction F` keeps
//!   `max(1, round(F * n))` images, the first of a seeded permutation; `--shots K` walks the same
//!   permutation and keeps an image when one of its categories (from the COCO annotations) still
//!   has fewer than K images. Both depend on `--seed` only. The chosen file names are written to
//!   `OUT/subset.json`.
//! - **Augmentation**: stretch to `--image-size` (image bilinear, mask nearest), horizontal flip
//!   with probability 0.5, from the per-sample generator of the trainer (deterministic per seed,
//!   epoch and index, so a resumed run sees the same batches).
//! - **Optimisation**: AdamW (lr 3e-3 by default, weight decay 1e-4) with linear warm-up and
//!   cosine decay, composed by `densa_models::train_step`; the backbone is frozen with
//!   `--freeze-backbone`.
//! - **Validation** every `--val-every` epochs on `--val-data` (mIoU at the original image size,
//!   as `densa eval segment` computes it); the best weights go to `OUT/best.safetensors`
//!   (`OUT/best.json` holds the epoch and metrics), the last to `OUT/last.safetensors`.
//! - **Resume**: an existing run in `--out` continues from its newest checkpoint (same seed and
//!   data required, checked by the trainer).
//!
//! `OUT/segmenter.json` ([`SegmenterRun`]) holds what `densa export segmenter` needs.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use densa_exporter::weights::{save_safetensors, StateDict};
use densa_exporter::Tensor;
use densa_models::export::{IMAGENET_MEAN, IMAGENET_STD};
use densa_models::segment::{
    self, SegmenterConfig, SegmenterRun, BEST_STATE, HEAD_PREFIXES, LAST_STATE, RUN_FILE,
};
use densa_models::train_step::{
    train_step_artifact, ForwardGraph, OptimizerConfig, TrainStepConfig, Trainable,
};
use densa_runtime::augment::labeled::LabeledSample;
use densa_runtime::backend::Backend;
use densa_runtime::data::{CocoSource, CocoSpec, SampleSource};
use densa_runtime::eval::seg::{ConfusionMatrix, LabelMap, SegMetrics};
use densa_runtime::infer::segment::segment_batch;
use densa_runtime::open_backend;
use densa_runtime::train::data::epoch_order;
use densa_runtime::train::{
    checkpoint, Batch, Communicator, DataError, Length, Samples, Shuffled, TrainOptions, Trainer,
    WarmupCosine,
};
use ndarray::{Array3, ArrayD, IxDyn};
use rand::RngExt;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use super::finetune::{apply_backbone_init, load_backbone_init, FinetuneArgs};

/// Defaults of the segment task.
const DEFAULT_LR: f64 = 3e-3;
const DEFAULT_IMAGE_SIZE: u32 = 128;
const WEIGHT_DECAY: f64 = 1e-4;
/// Salt of the subset permutation, so it differs from the data order of the same seed.
const SUBSET_SALT: u64 = 0x005E_B5E7;

/// The best validation so far (`OUT/best.json`).
#[derive(Debug, Serialize, Deserialize)]
struct Best {
    epoch: u64,
    step: u64,
    #[serde(rename = "mIoU")]
    miou: f64,
    pixel_accuracy: Option<f64>,
    per_class_iou: Vec<Option<f64>>,
}

/// Training samples: augmented image `[3, S, S]` and labels `[S, S]`.
pub(crate) struct SegSamples {
    pub(crate) source: Arc<CocoSource>,
    pub(crate) indices: Vec<usize>,
    pub(crate) size: u32,
    pub(crate) mean: [f32; 3],
    pub(crate) std: [f32; 3],
}

impl Samples for SegSamples {
    fn len(&self) -> usize {
        self.indices.len()
    }

    fn sample(&mut self, index: usize, rng: &mut ChaCha8Rng) -> Result<Batch, DataError> {
        let err = |message: String| DataError::Source {
            source_name: "segment".into(),
            message,
        };
        let s = self
            .source
            .load(self.indices[index])
            .map_err(|e| err(e.to_string()))?;
        let mask = s
            .mask
            .ok_or_else(|| err(format!("{}: no semantic mask", s.path.display())))?;
        let labeled = LabeledSample::new(s.image, vec![], vec![], Some(mask))
            .map_err(|e| err(format!("{}: {e}", s.path.display())))?;
        let mut view = labeled.resize((self.size, self.size), &Default::default());
        if rng.random::<f64>() < 0.5 {
            view = view.hflip();
        }
        let n = self.size as usize;
        let mut x = Array3::<f32>::zeros((3, n, n));
        for (px, py, p) in view.image.enumerate_pixels() {
            for c in 0..3 {
                x[[c, py as usize, px as usize]] =
                    (p.0[c] as f32 / 255.0 - self.mean[c]) / self.std[c];
            }
        }
        let mask = view.mask.expect("the mask travels with the image");
        let labels = ArrayD::from_shape_vec(
            IxDyn(&[n, n]),
            mask.pixels().map(|p| p.0[0] as i64).collect(),
        )
        .expect("n * n labels");
        Ok(vec![
            ("images".into(), Tensor::F32(x.into_dyn())),
            ("labels".into(), Tensor::I64(labels)),
        ])
    }

    fn describe(&self) -> String {
        format!("segment:{} images at {}px", self.indices.len(), self.size)
    }
}

/// The indices of the training subset (see the module docs).
fn subset(source: &CocoSource, args: &FinetuneArgs) -> Result<Vec<usize>> {
    let n = source.len();
    let order = epoch_order(n, args.seed ^ SUBSET_SALT, 0, true);
    let mut keep: Vec<usize> = if let Some(f) = args.label_fraction {
        if !(f > 0.0 && f <= 1.0) {
            bail!("--label-fraction {f}: must be in (0, 1]");
        }
        let k = ((f * n as f64).round() as usize).clamp(1, n);
        order[..k].to_vec()
    } else if let Some(k) = args.shots {
        if k == 0 {
            bail!("--shots 0: at least one image per class is needed");
        }
        let ds = source.dataset();
        let mut cats_of: Vec<Vec<u64>> = vec![Vec::new(); ds.images.len()];
        let pos: std::collections::HashMap<u64, usize> = ds
            .images
            .iter()
            .enumerate()
            .map(|(i, im)| (im.id, i))
            .collect();
        for a in &ds.annotations {
            if let Some(&i) = pos.get(&a.image_id) {
                if !cats_of[i].contains(&a.category_id) {
                    cats_of[i].push(a.category_id);
                }
            }
        }
        let mut have: std::collections::HashMap<u64, usize> = Default::default();
        let mut chosen = Vec::new();
        for &i in &order {
            if cats_of[i]
                .iter()
                .any(|c| have.get(c).copied().unwrap_or(0) < k)
            {
                for c in &cats_of[i] {
                    *have.entry(*c).or_default() += 1;
                }
                chosen.push(i);
            }
        }
        chosen
    } else {
        (0..n).collect()
    };
    keep.sort_unstable();
    Ok(keep)
}

/// mIoU of `state` on the validation source, at original image size.
fn validate(
    backend: &dyn Backend,
    run: &SegmenterRun,
    state: &StateDict,
    val: &CocoSource,
) -> Result<SegMetrics> {
    let model = segment::inference_graph(&run.model, Some(state), &[], 0)?;
    let mut session = backend.load_model(&model, "validation segmenter")?;
    let spec = super::export_segmenter::serving_spec(run);
    let mut matrix = ConfusionMatrix::new(run.classes.len());
    for i in 0..val.len() {
        let s = val.load(i).with_context(|| "loading a validation image")?;
        let Some(gt) = &s.mask else {
            bail!("{}: no mask", s.path.display());
        };
        let pred = segment_batch(session.as_mut(), &spec, &[&s.image], "validation")?;
        let map = |m: &image::GrayImage| LabelMap {
            width: m.width(),
            height: m.height(),
            labels: m.pixels().map(|p| p.0[0] as u32).collect(),
        };
        matrix.add(
            &map(gt),
            &map(&pred[0]),
            Some(255),
            &s.path,
            Path::new("prediction"),
        )?;
    }
    Ok(matrix.metrics())
}

pub(crate) fn open_source(
    data: &Path,
    images: &Option<PathBuf>,
    masks: &Option<PathBuf>,
) -> Result<CocoSource> {
    let root = data.parent().map(PathBuf::from).unwrap_or_default();
    CocoSource::open(&CocoSpec {
        annotations: data.to_path_buf(),
        images: images.clone().unwrap_or_else(|| root.join("images")),
        masks: Some(masks.clone().unwrap_or_else(|| root.join("masks"))),
    })
    .with_context(|| format!("opening {}", data.display()))
}

/// Only the model's parameters and buffers (no optimizer slots) of a trainer state.
fn model_state(state: &StateDict, run: &SegmenterRun) -> Result<StateDict> {
    let mut b = densa_exporter::GraphBuilder::new("names", 0);
    run.model.init(&mut b)?;
    let mut out = StateDict::new();
    for p in b.params() {
        if p.kind != densa_exporter::ParamKind::Constant {
            let t = state
                .get(&p.name)
                .with_context(|| format!("the trainer state lacks `{}`", p.name))?;
            out.insert(p.name.clone(), t.clone());
        }
    }
    Ok(out)
}

/// Fine-tunes as `args` say; one rank of a data-parallel job under `mpirun -np N` (rank 0
/// alone validates, writes and reports).
pub fn run(args: &FinetuneArgs, comm: &Arc<dyn Communicator>) -> Result<()> {
    let (rank, ranks) = (comm.rank(), comm.size());
    let source = Arc::new(open_source(&args.data, &args.images, &args.masks)?);
    let classes = source.segment_classes().to_vec();
    let size = args.image_size.unwrap_or(DEFAULT_IMAGE_SIZE);
    if size < 32 || !size.is_multiple_of(32) {
        bail!("--image-size {size}: must be a multiple of 32 (the backbone's stride), at least 32");
    }
    let val = match &args.val_data {
        Some(v) => Some(open_source(v, &args.val_images, &args.val_masks)?),
        None => None,
    };
    if let Some(v) = &val {
        if v.segment_classes() != classes.as_slice() {
            bail!(
                "the validation classes ({}) differ from the training classes ({})",
                v.segment_classes().join(", "),
                classes.join(", ")
            );
        }
    }
    let indices = subset(&source, args)?;
    if indices.len() < args.batch_size * ranks {
        bail!(
            "{} training image(s) after subsetting, fewer than one batch of {}; lower \
             --batch-size or raise --label-fraction/--shots",
            indices.len(),
            args.batch_size * ranks
        );
    }
    std::fs::create_dir_all(&args.out)
        .with_context(|| format!("creating {}", args.out.display()))?;
    let run = SegmenterRun {
        model: SegmenterConfig::new(args.backbone(), classes.len()),
        classes: classes.clone(),
        image_size: size,
        mean: IMAGENET_MEAN,
        std: IMAGENET_STD,
    };
    let run_path = args.out.join(RUN_FILE);
    if rank == 0 {
        densa_exporter::io::write_atomic(&run_path, serde_json::to_string_pretty(&run)?.as_bytes())
            .with_context(|| format!("writing {}", run_path.display()))?;
    }
    let names: Vec<String> = indices
        .iter()
        .map(|&i| source.dataset().images[i].file_name.clone())
        .collect();
    let subset_path = args.out.join("subset.json");
    if rank == 0 {
        densa_exporter::io::write_atomic(
            &subset_path,
            serde_json::to_string_pretty(&names)?.as_bytes(),
        )
        .with_context(|| format!("writing {}", subset_path.display()))?;
    }

    // The train step: forward + loss, AdamW, (frozen backbone).
    let mut forward = segment::training_forward(&run.model, size as usize, args.seed)?;
    if let Some(init) = load_backbone_init(&args.init, args.backbone())? {
        eprintln!("densa: {}", init.describe());
        apply_backbone_init(&mut forward.builder, &init)?;
    }
    let eval = segment::inference_graph(&run.model, None, &[], args.seed)?;
    let lr = args.lr.unwrap_or(DEFAULT_LR);
    let mut config = TrainStepConfig::new(OptimizerConfig::adamw(lr, WEIGHT_DECAY));
    config.task = Some("segment".into());
    config.data_parallel = ranks > 1;
    if args.freeze_backbone {
        config.trainable = Trainable::Only(HEAD_PREFIXES.iter().map(|s| s.to_string()).collect());
    }
    let graph = ForwardGraph::new(forward.builder, forward.loss).norm_state(forward.norm);
    let artifact = train_step_artifact(graph, Some(eval), &config)
        .context("composing the segmenter's train step")?;
    let backend = open_backend(args.backend.backend, &args.backend.options())?;
    let batches_per_epoch = (indices.len() / (args.batch_size * ranks)) as u64;
    let total = batches_per_epoch * args.epochs;
    let samples = || SegSamples {
        source: source.clone(),
        indices: indices.clone(),
        size,
        mean: run.mean,
        std: run.std,
    };
    let schedule = || WarmupCosine {
        input: "optim.lr".into(),
        peak: lr,
        floor: lr * 0.01,
        warmup: (total / 10).min(100),
        total,
    };
    eprintln!(
        "densa: fine-tuning a {} segmenter ({} classes) on {} of {} images at {size}px, {} \
         epochs x {batches_per_epoch} steps, backend {}",
        args.backbone(),
        classes.len(),
        indices.len(),
        source.len(),
        args.epochs,
        backend.label()
    );
    let best_path = args.out.join("best.json");
    let mut best: Option<Best> = std::fs::read_to_string(&best_path)
        .ok()
        .and_then(|t| serde_json::from_str(&t).ok());
    let val_every = args.val_every.max(1);
    loop {
        let mut options = TrainOptions::new(&args.out);
        options.seed = args.seed;
        options.checkpoint_every = 0;
        options.keep_checkpoints = 2;
        let latest = checkpoint::latest(&args.out)?;
        let done_steps = match &latest {
            Some(dir) => checkpoint::read(dir)?.0.step,
            None => 0,
        };
        let done = done_steps / batches_per_epoch.max(1);
        if done >= args.epochs {
            eprintln!(
                "densa: {done} epochs already done in {}",
                args.out.display()
            );
            break;
        }
        let target = (((done / val_every) + 1) * val_every).min(args.epochs);
        options.length = Length::Steps(target * batches_per_epoch);
        let data = Shuffled::new(samples(), args.batch_size)?.shard(rank, ranks)?;
        let mut trainer = if latest.is_some() {
            Trainer::resume(
                &args.out,
                artifact.clone(),
                backend.as_ref(),
                data,
                schedule(),
                options,
            )?
        } else {
            Trainer::new(
                artifact.clone(),
                backend.as_ref(),
                data,
                schedule(),
                options,
            )?
        }
        .data_parallel(backend.as_ref(), comm.clone())?;
        let summary = trainer.run()?;
        if rank != 0 {
            // Rank 0 validates and writes; the others wait for it in the next first step.
            if summary.stop != densa_runtime::train::StopReason::Finished || target >= args.epochs {
                return Ok(());
            }
            continue;
        }
        if ranks > 1 {
            super::distributed::report(&trainer);
        }
        let state = model_state(&trainer.state(), &run)?;
        save_safetensors(&state, &args.out.join(LAST_STATE))?;
        if summary.stop != densa_runtime::train::StopReason::Finished {
            eprintln!(
                "densa: interrupted at step {}; run again to resume",
                summary.position.step
            );
            return Ok(());
        }
        if let Some(v) = &val {
            let m = validate(backend.as_ref(), &run, &state, v)?;
            let miou = m.miou.unwrap_or(0.0);
            eprintln!(
                "densa: epoch {target}: loss {:.4}, validation mIoU {miou:.4}, pixel accuracy {:.4}",
                summary.last_loss.unwrap_or(f64::NAN),
                m.pixel_accuracy.unwrap_or(0.0)
            );
            if best.as_ref().is_none_or(|b| miou > b.miou) {
                save_safetensors(&state, &args.out.join(BEST_STATE))?;
                let b = Best {
                    epoch: target,
                    step: summary.position.step,
                    miou,
                    pixel_accuracy: m.pixel_accuracy,
                    per_class_iou: m.per_class_iou.clone(),
                };
                densa_exporter::io::write_atomic(
                    &best_path,
                    serde_json::to_string_pretty(&b)?.as_bytes(),
                )?;
                best = Some(b);
            }
        } else {
            eprintln!(
                "densa: epoch {target}: loss {:.4}",
                summary.last_loss.unwrap_or(f64::NAN)
            );
        }
        if target >= args.epochs {
            break;
        }
    }
    if let Some(b) = &best {
        println!(
            "best validation mIoU {:.4} at epoch {} -> {}",
            b.miou,
            b.epoch,
            args.out.join(BEST_STATE).display()
        );
    }
    println!(
        "export with: densa export segmenter --ckpt {} --out segmenter.onnx",
        args.out.display()
    );
    Ok(())
}
