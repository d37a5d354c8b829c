//! Exports: inference graphs with batch norm folded, metadata that makes them self-describing.

use densa_exporter::onnx::ModelProto;
use densa_exporter::passes::{fold_batch_norm, PassError};
use densa_exporter::validate::{validate, ValidationError};
use densa_exporter::weights::{self, StateDict, WeightsError};
use densa_exporter::{BuildError, DType, Dim, GraphBuilder, ParamKind, Tensor};

use crate::backbone::Arch;

/// ImageNet normalisation, the statistics torchvision's pretrained ResNets expect.
pub const IMAGENET_MEAN: [f32; 3] = [0.485, 0.456, 0.406];
pub const IMAGENET_STD: [f32; 3] = [0.229, 0.224, 0.225];

/// Why an export failed.
#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    #[error(transparent)]
    Build(#[from] BuildError),
    #[error(transparent)]
    Weights(Box<WeightsError>),
    #[error(transparent)]
    Pass(#[from] PassError),
    #[error("the exported graph is invalid: {0}")]
    Invalid(#[from] ValidationError),
}

impl From<WeightsError> for ExportError {
    fn from(e: WeightsError) -> Self {
        ExportError::Weights(Box::new(e))
    }
}

/// How to load weights into a model before export.
#[derive(Clone, Debug, Default)]
pub struct WeightOptions<'a> {
    /// The state dict (already read from its file).
    pub state_dict: Option<&'a StateDict>,
    /// The prefix to strip from its keys; `None` detects it.
    pub strip_prefix: Option<&'a str>,
}

/// What an export produced besides the model: what happened to the weights.
#[derive(Clone, Debug, Default)]
pub struct ExportReport {
    /// The prefix stripped from the checkpoint's keys.
    pub prefix: Option<String>,
    /// Checkpoint keys the model did not use (e.g. `fc.weight` for a backbone), other than
    /// batch-norm `num_batches_tracked` counters.
    pub unused_keys: Vec<String>,
}

/// Loads `weights` into the builder's parameters and buffers (names as the model has them).
pub fn load_weights(
    b: &mut GraphBuilder,
    weights: &WeightOptions,
) -> Result<ExportReport, ExportError> {
    let Some(sd) = weights.state_dict else {
        return Ok(ExportReport::default());
    };
    let expected: Vec<(String, Vec<usize>)> = b
        .params()
        .iter()
        .filter(|p| p.kind != ParamKind::Constant)
        .map(|p| (p.name.clone(), p.shape.clone()))
        .collect();
    let matched = weights::match_parameters(sd, &expected, weights.strip_prefix)?;
    for (name, _) in &expected {
        let t = matched
            .tensors
            .get(name)
            .expect("match_parameters returns every expected name");
        b.set_initializer(name, Tensor::F32(t.to_f32()))?;
    }
    // BN batch counters are bookkeeping of PyTorch's training loop, not weights: unused by
    // design, not worth a warning.
    let unused_keys = matched
        .unexpected
        .iter()
        .filter(|k| !k.ends_with("num_batches_tracked"))
        .cloned()
        .collect();
    Ok(ExportReport {
        prefix: Some(matched.prefix.clone()),
        unused_keys,
    })
}

/// The backbone of `arch` as an inference graph: input `images` float32 `[N, 3, H, W]` (N, H,
/// W dynamic), outputs `c2..c5` (strides 4..32), batch norm folded, metadata describing it.
pub fn backbone(
    arch: Arch,
    weights: &WeightOptions,
    seed: u64,
) -> Result<(ModelProto, ExportReport), ExportError> {
    let config = arch.config();
    let mut b = GraphBuilder::new(&format!("densa-{}", arch.name()), seed);
    let images = b.input(
        "images",
        DType::F32,
        vec![
            Dim::from("N"),
            Dim::Fixed(3),
            Dim::from("H"),
            Dim::from("W"),
        ],
    )?;
    let net = config.init(&mut b)?;
    let report = load_weights(&mut b, weights)?;
    let stages = net.forward(&mut b, &images)?;
    for (name, v) in ["c2", "c3", "c4", "c5"].iter().zip(stages.as_array()) {
        b.output(v, name)?;
    }
    let channels: Vec<String> = config
        .out_channels()
        .iter()
        .map(|c| c.to_string())
        .collect();
    b.metadata("densa.task", "backbone");
    b.metadata("densa.arch", arch.name());
    b.metadata("densa.outputs", "c2,c3,c4,c5");
    b.metadata("densa.strides", "4,8,16,32");
    b.metadata("densa.channels", &channels.join(","));
    b.metadata("densa.input", "images:NCHW:RGB:float32:0-1");
    b.metadata("densa.mean", &join(&IMAGENET_MEAN));
    b.metadata("densa.std", &join(&IMAGENET_STD));
    let model = fold_batch_norm(&b.finish())?;
    validate(&model)?;
    Ok((model, report))
}

fn join(v: &[f32]) -> String {
    v.iter()
        .map(|x| x.to_string())
        .collect::<Vec<_>>()
        .join(",")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resnet18_has_torchvision_names_and_no_batch_norm_left() {
        let (m, _) = backbone(Arch::ResNet18, &WeightOptions::default(), 0).unwrap();
        let g = m.graph.unwrap();
        let names: Vec<&str> = g.initializer.iter().map(|t| t.name.as_str()).collect();
        for expected in [
            "conv1.weight",
            "layer1.0.conv1.weight",
            "layer2.0.downsample.0.weight",
            "layer4.1.conv2.weight",
        ] {
            assert!(
                names.contains(&expected),
                "{expected} missing from {names:?}"
            );
        }
        assert!(!g.node.iter().any(|n| n.op_type == "BatchNormalization"));
        assert_eq!(g.node.iter().filter(|n| n.op_type == "Conv").count(), 20);
        let outs: Vec<&str> = g.output.iter().map(|o| o.name.as_str()).collect();
        assert_eq!(outs, ["c2", "c3", "c4", "c5"]);
    }

    #[test]
    fn parameter_counts_match_torchvision() {
        // torchvision's ResNets without the fc layer: 11,176,512 / 21,284,672 / 23,508,032
        // parameters, plus the running statistics (2 per BN channel).
        fn count(arch: Arch) -> (usize, usize) {
            let mut b = GraphBuilder::new("g", 0);
            arch.config().init(&mut b).unwrap();
            let mut params = 0;
            let mut buffers = 0;
            for p in b.params() {
                let n: usize = p.shape.iter().product();
                match p.kind {
                    ParamKind::Param => params += n,
                    ParamKind::Buffer => buffers += n,
                    ParamKind::Constant => {}
                }
            }
            (params, buffers)
        }
        assert_eq!(count(Arch::ResNet18).0, 11_176_512);
        assert_eq!(count(Arch::ResNet34).0, 21_284_672);
        assert_eq!(count(Arch::ResNet50).0, 23_508_032);
    }
}

/// Why a checkpoint cannot fill a model: a tensor that is missing, has the wrong shape or holds
/// non-finite values (the caller names the file), or the builder refused the value.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("`{name}` {problem}")]
    Tensor { name: String, problem: String },
    #[error(transparent)]
    Build(#[from] BuildError),
}

/// Sets every parameter and buffer of `b` (constants aside) from `state`: the names must all be
/// there with the model's shapes and finite values. Entries the model does not have (optimizer
/// slots of a training state) are ignored.
pub fn set_state(b: &mut GraphBuilder, state: &StateDict) -> Result<(), StateError> {
    let wanted: Vec<(String, Vec<usize>)> = b
        .params()
        .iter()
        .filter(|p| p.kind != ParamKind::Constant)
        .map(|p| (p.name.clone(), p.shape.clone()))
        .collect();
    for (name, shape) in wanted {
        let problem = |problem: String| StateError::Tensor {
            name: name.clone(),
            problem,
        };
        let t = state
            .get(&name)
            .ok_or_else(|| problem("is missing from the checkpoint".into()))?;
        if t.shape() != shape.as_slice() {
            return Err(problem(format!(
                "has shape {:?}, the model expects {shape:?}",
                t.shape()
            )));
        }
        let values = t.to_f32();
        if values.iter().any(|v| !v.is_finite()) {
            return Err(problem("holds NaN or infinite values".into()));
        }
        b.set_initializer(&name, Tensor::F32(values))?;
    }
    Ok(())
}
