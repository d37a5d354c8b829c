//! `densa finetune --task detect|segment ...`: fine-tunes a detector or a segmenter from a
//! backbone (random, imported or self-supervised) on a COCO-format dataset. The arguments are
//! shared; each task lives in its own module.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use clap::{Args, ValueEnum};
use densa_exporter::weights::{self, StateDict, WeightsError};
use densa_exporter::{GraphBuilder, ParamKind, Tensor};
use densa_models::Arch;

use super::BackendArgs;

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Task {
    /// FCOS-style one-stage detector.
    Detect,
    /// Semantic segmentation head on the FPN.
    Segment,
}

/// Which detector `--task detect` trains.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum DetectorKind {
    /// FCOS-style dense one-stage detector on an FPN.
    Fcos,
    /// DETR-family detector: transformer encoder/decoder, object queries, Hungarian matching.
    Detr,
}

/// `--arch`: a backbone (`resnet-edge`, ...) or `detr-<backbone>`, the DETR on that backbone.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ArchArg {
    pub backbone: Arch,
    /// Written `detr-<backbone>`: picks the DETR-family detector.
    pub detr: bool,
}

impl From<Arch> for ArchArg {
    fn from(backbone: Arch) -> ArchArg {
        ArchArg {
            backbone,
            detr: false,
        }
    }
}

impl std::str::FromStr for ArchArg {
    type Err = String;
    fn from_str(s: &str) -> Result<ArchArg, String> {
        let lower = s.to_ascii_lowercase();
        match lower.strip_prefix("detr-") {
            Some(rest) => Ok(ArchArg {
                backbone: rest.parse()?,
                detr: true,
            }),
            None => Ok(ArchArg {
                backbone: lower.parse()?,
                detr: false,
            }),
        }
    }
}

#[derive(Debug, Args)]
pub struct FinetuneArgs {
    /// What to train.
    #[arg(long)]
    pub task: Task,
    /// Backbone architecture: resnet18, resnet34, resnet50 or resnet-edge; `detr-<backbone>`
    /// (e.g. detr-resnet-edge) is the DETR-family detector on it (`--detector detr`).
    #[arg(long, default_value = "resnet-edge")]
    pub arch: ArchArg,
    /// The detector of `--task detect`: `fcos` (dense; the default) or `detr` (the default
    /// with `--arch detr-<backbone>`).
    #[arg(long, value_enum)]
    pub detector: Option<DetectorKind>,
    /// Training annotations, COCO instances JSON (`densa synth` writes one).
    #[arg(long)]
    pub data: PathBuf,
    /// Folder of the training images (default: `images/` beside --data).
    #[arg(long)]
    pub images: Option<PathBuf>,
    /// Validation annotations (COCO JSON); validated every --val-every epochs, best kept.
    #[arg(long)]
    pub val_data: Option<PathBuf>,
    /// Folder of the validation images (default: `images/` beside --val-data).
    #[arg(long)]
    pub val_images: Option<PathBuf>,
    /// Semantic masks folder for `--task segment` (default: `masks/` beside --data).
    #[arg(long)]
    pub masks: Option<PathBuf>,
    /// Validation masks folder for `--task segment` (default: `masks/` beside --val-data).
    #[arg(long)]
    pub val_masks: Option<PathBuf>,
    /// Backbone initialisation: `random`, a weights file (safetensors, .pth; torchvision
    /// parameter names, a key prefix such as `module.` or `backbone.` is detected), or a
    /// directory holding `backbone.safetensors` (what `densa pretrain` writes). Only the
    /// backbone is loaded; the FPN and heads start random. With `--detector detr`, also a
    /// directory holding a whole DETR (`detr.json` + `state.safetensors`, or its `best/`).
    #[arg(long, default_value = "random")]
    pub init: String,
    /// Train on this fraction of the labelled images (deterministic per --seed), e.g. 0.1.
    #[arg(long)]
    pub label_fraction: Option<f64>,
    /// Train on K images per class (k-shot; deterministic per --seed).
    #[arg(long, conflicts_with = "label_fraction")]
    pub shots: Option<usize>,
    /// Keep the backbone's weights fixed; train the neck and heads only.
    #[arg(long)]
    pub freeze_backbone: bool,
    /// Training epochs.
    #[arg(long, default_value_t = 12)]
    pub epochs: u64,
    /// Images per batch.
    #[arg(long, default_value_t = 8)]
    pub batch_size: usize,
    /// Peak learning rate (default: the task's).
    #[arg(long)]
    pub lr: Option<f64>,
    /// Square training input size in pixels (default: the task's).
    #[arg(long)]
    pub image_size: Option<u32>,
    /// Validate every N epochs.
    #[arg(long, default_value_t = 1)]
    pub val_every: u64,
    /// Seed of initialisation, subsets, augmentation and data order.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Output directory: artifacts, checkpoints, logs, best checkpoint. An existing run there
    /// is resumed from its last checkpoint.
    #[arg(long)]
    pub out: PathBuf,
    #[command(flatten)]
    pub backend: BackendArgs,
}

impl FinetuneArgs {
    /// The backbone architecture.
    pub fn backbone(&self) -> Arch {
        self.arch.backbone
    }

    /// The detector `--detector` and `--arch` ask for (they must agree).
    pub fn detector(&self) -> Result<DetectorKind> {
        match (self.detector, self.arch.detr) {
            (Some(DetectorKind::Fcos), true) => bail!(
                "--arch detr-{} is the DETR-family detector; it conflicts with --detector fcos",
                self.arch.backbone
            ),
            (Some(kind), _) => Ok(kind),
            (None, true) => Ok(DetectorKind::Detr),
            (None, false) => Ok(DetectorKind::Fcos),
        }
    }
}

pub fn run(args: FinetuneArgs) -> Result<()> {
    let comm = super::distributed::communicator()?;
    let detector = args.detector()?;
    let result = match args.task {
        Task::Detect if detector == DetectorKind::Detr => super::finetune_detr::run(&args, &comm),
        Task::Detect => super::finetune_detect::run(&args, &comm),
        Task::Segment if detector == DetectorKind::Detr => {
            bail!("the DETR (--detector detr, --arch detr-...) goes with --task detect, not --task segment")
        }
        Task::Segment => super::finetune_segment::run(&args, &comm),
    };
    super::distributed::or_abort(&comm, result)
}

/// The file a pretraining run directory keeps its backbone in (torchvision names, no prefix).
pub const PRETRAINED_BACKBONE: &str = "backbone.safetensors";

/// Key prefixes preferred, in this order, when several fit the backbone (a MoCo checkpoint
/// holds both the query and the key encoder): the query/online encoder is the one to use.
const PREFERRED_PREFIXES: [&str; 6] = [
    "",
    "backbone.",
    "module.encoder_q.",
    "encoder_q.",
    "module.backbone.",
    "module.",
];

/// Backbone weights read for `--init`, matched to the architecture's parameter names.
pub struct BackboneInit {
    /// The file they came from.
    pub path: PathBuf,
    /// Exactly the backbone's parameters and buffers, by the model's names.
    pub tensors: StateDict,
    /// The key prefix stripped from the file's keys (`""` for none).
    pub prefix: String,
    /// How many of the file's keys the backbone did not use (heads, other encoders...).
    pub unused: usize,
}

impl BackboneInit {
    /// One line for the log: what was loaded from where.
    pub fn describe(&self) -> String {
        let prefix = if self.prefix.is_empty() {
            "no key prefix".to_string()
        } else {
            format!("key prefix `{}`", self.prefix)
        };
        format!(
            "init: loaded {} backbone tensors from {} ({prefix}; {} other keys unused); FPN and \
             heads start random",
            self.tensors.len(),
            self.path.display(),
            self.unused
        )
    }
}

/// Reads `--init`: `None` for `random`; else the backbone of `arch` from a weights file or from
/// `DIR/backbone.safetensors`. Errors name the file, and for a wrong architecture each missing
/// or wrong-shaped tensor with both shapes.
pub fn load_backbone_init(init: &str, arch: Arch) -> Result<Option<BackboneInit>> {
    if init == "random" {
        return Ok(None);
    }
    let given = Path::new(init);
    if !given.exists() {
        bail!("--init {init}: no such file or directory (expected `random`, a weights file or a pretraining directory)");
    }
    let path = if given.is_dir() {
        let file = given.join(PRETRAINED_BACKBONE);
        if !file.is_file() {
            bail!(
                "--init {init}: the directory has no {PRETRAINED_BACKBONE} (what `densa pretrain` \
                 writes); pass the weights file itself otherwise"
            );
        }
        file
    } else {
        given.to_path_buf()
    };
    let sd = weights::load(&path).with_context(|| format!("--init: reading {}", path.display()))?;
    let mut b = GraphBuilder::new("backbone-names", 0);
    arch.config()
        .init(&mut b)
        .context("building the backbone's parameter list")?;
    let expected: Vec<(String, Vec<usize>)> = b
        .params()
        .iter()
        .filter(|p| p.kind != ParamKind::Constant)
        .map(|p| (p.name.clone(), p.shape.clone()))
        .collect();
    let matched = match weights::match_parameters(&sd, &expected, None) {
        Err(WeightsError::AmbiguousPrefix { candidates, .. }) => {
            let Some(prefix) = PREFERRED_PREFIXES
                .iter()
                .find(|p| candidates.iter().any(|c| c == *p))
            else {
                let e = weights::match_parameters(&sd, &expected, None).unwrap_err();
                return Err(e).context(format!("--init: {} as a {arch} backbone", path.display()));
            };
            weights::match_parameters(&sd, &expected, Some(prefix))
        }
        other => other,
    }
    .with_context(|| format!("--init: {} as a {arch} backbone", path.display()))?;
    for (name, t) in matched.tensors.iter() {
        if t.dtype().is_float() && t.to_f32().iter().any(|v| !v.is_finite()) {
            bail!(
                "--init: {}: tensor `{}{name}` holds NaN or infinite values",
                path.display(),
                matched.prefix
            );
        }
    }
    let unused = matched
        .unexpected
        .iter()
        .filter(|k| !k.ends_with("num_batches_tracked"))
        .count();
    Ok(Some(BackboneInit {
        path,
        tensors: matched.tensors,
        prefix: matched.prefix,
        unused,
    }))
}

/// Overlays the backbone weights on a freshly initialised model's builder (the backbone's
/// parameters carry torchvision names there too); everything else keeps its initialisation.
pub fn apply_backbone_init(b: &mut GraphBuilder, init: &BackboneInit) -> Result<()> {
    for (name, t) in init.tensors.iter() {
        let value = if t.dtype().is_float() {
            Tensor::F32(t.to_f32())
        } else {
            t.clone()
        };
        b.set_initializer(name, value).with_context(|| {
            format!(
                "--init {}: setting the model's `{name}`",
                init.path.display()
            )
        })?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        args: FinetuneArgs,
    }

    fn parse(extra: &[&str]) -> Result<FinetuneArgs, clap::Error> {
        let base = [
            "densa", "--task", "detect", "--data", "a.json", "--out", "o",
        ];
        Cli::try_parse_from(base.iter().chain(extra)).map(|c| c.args)
    }

    #[test]
    fn arch_detr_prefix_picks_the_detr_and_conflicts_with_fcos() {
        let a = parse(&[]).unwrap();
        assert_eq!(
            (a.backbone(), a.detector().unwrap()),
            (Arch::Edge, DetectorKind::Fcos)
        );
        let a = parse(&["--arch", "detr-resnet18"]).unwrap();
        assert_eq!(
            (a.backbone(), a.detector().unwrap()),
            (Arch::ResNet18, DetectorKind::Detr)
        );
        let a = parse(&["--arch", "resnet-edge", "--detector", "detr"]).unwrap();
        assert_eq!(a.detector().unwrap(), DetectorKind::Detr);
        let e = parse(&["--arch", "detr-resnet-edge", "--detector", "fcos"])
            .unwrap()
            .detector()
            .unwrap_err()
            .to_string();
        assert!(e.contains("conflicts with --detector fcos"), "{e}");
        let e = parse(&["--arch", "detr-vgg"]).err().unwrap().to_string();
        assert!(e.contains("unknown architecture `vgg`"), "{e}");
    }
}
