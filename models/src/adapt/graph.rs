//! Graph surgery: trainable initializers to inputs, a loss appended to the head's raw outputs,
//! the decoder dropped, gradients added; and new parameter values written back.

use std::collections::{BTreeMap, HashSet};

use densa_exporter::autodiff::{with_gradients, GradRequest};
use densa_exporter::builder::tensor_type;
use densa_exporter::onnx::{ModelProto, ValueInfoProto};
use densa_exporter::passes::eliminate_dead_code;
use densa_exporter::{DType, Dim, GraphBuilder, Tensor, Value};

use super::{AdaptError, DeployedDetector};
use crate::detect::{detection_loss, names, RawOutputs, TargetValues};

/// Every float initializer of `model` named `*.weight` / `*.bias`, by name.
pub fn parameters_of(model: &ModelProto) -> Result<BTreeMap<String, Tensor>, AdaptError> {
    let mut out = BTreeMap::new();
    for t in model.graph.iter().flat_map(|g| g.initializer.iter()) {
        if t.name.ends_with(".weight") || t.name.ends_with(".bias") {
            let v = Tensor::from_proto(t).map_err(|e| AdaptError::Parameter {
                name: t.name.clone(),
                problem: e.to_string(),
            })?;
            if v.dtype() == DType::F32 {
                out.insert(t.name.clone(), v);
            }
        }
    }
    Ok(out)
}

/// `model` with the initializers in `values` replaced (same name, same shape and type, finite
/// values): everything else (inputs, outputs, nodes, metadata, other initializers) unchanged.
pub fn with_parameters(
    model: &ModelProto,
    values: &BTreeMap<String, Tensor>,
) -> Result<ModelProto, AdaptError> {
    let mut out = model.clone();
    let graph = out.graph.as_mut().ok_or_else(|| AdaptError::Parameter {
        name: String::new(),
        problem: "the model has no graph".into(),
    })?;
    let mut done = HashSet::new();
    for t in graph.initializer.iter_mut() {
        if let Some(v) = values.get(&t.name) {
            let dims: Vec<usize> = t.dims.iter().map(|&d| d as usize).collect();
            let problem = |problem: String| AdaptError::Parameter {
                name: t.name.clone(),
                problem,
            };
            if v.shape() != dims.as_slice() || v.dtype() != DType::F32 {
                return Err(problem(format!(
                    "new value is {} {:?}, the model has float32 {dims:?}",
                    v.dtype().name(),
                    v.shape()
                )));
            }
            if v.to_f32().iter().any(|x| !x.is_finite()) {
                return Err(problem("new value holds NaN or infinite numbers".into()));
            }
            *t = v.to_proto(&t.name);
            done.insert(t.name.clone());
        }
    }
    if let Some(missing) = values.keys().find(|k| !done.contains(*k)) {
        return Err(AdaptError::Parameter {
            name: missing.clone(),
            problem: "is not an initializer of the model".into(),
        });
    }
    Ok(out)
}

/// What a loss builder declares: its inputs besides the raw head outputs, and its outputs.
pub(crate) struct LossGraph {
    pub model: ModelProto,
}

impl DeployedDetector {
    /// [`merge`] on this detector: `raw_outputs` declares the head's raw outputs as the
    /// graph's outputs; the loss graph consumes them.
    pub(crate) fn merged(
        &self,
        trainable: &[String],
        loss: Option<&LossGraph>,
        raw_outputs: bool,
    ) -> Result<ModelProto, AdaptError> {
        let mut outputs = Vec::new();
        if raw_outputs {
            let n = if self.chw {
                Dim::Fixed(1)
            } else {
                Dim::from("N")
            };
            let l = Dim::Fixed(self.config.assigner().locations() as i64);
            let c = Dim::Fixed(self.config.num_classes() as i64);
            for (name, shape) in [
                (&self.raw.cls, vec![n.clone(), l.clone(), c]),
                (&self.raw.box_log, vec![n.clone(), l.clone(), Dim::Fixed(4)]),
                (&self.raw.ctr, vec![n, l]),
            ] {
                outputs.push(ValueInfoProto {
                    name: name.clone(),
                    r#type: Some(tensor_type(DType::F32, &shape)),
                    ..Default::default()
                });
            }
        }
        let consumed: HashSet<&str> = [&self.raw.cls, &self.raw.box_log, &self.raw.ctr]
            .into_iter()
            .map(String::as_str)
            .collect();
        merge(
            &self.model,
            &self.label,
            trainable,
            loss,
            outputs,
            &consumed,
        )
    }

    /// The teacher/inference graph: images and the `trainable` parameters in, the head's raw
    /// outputs (`cls`, `box_log`, `ctr` logits) out.
    pub fn raw_graph(&self, trainable: &[String]) -> Result<ModelProto, AdaptError> {
        self.merged(trainable, None, true)
    }

    /// Declares the raw head outputs as inputs of a loss builder.
    pub(crate) fn raw_inputs(&self, b: &mut GraphBuilder) -> Result<RawOutputs, AdaptError> {
        let n = Dim::from("N");
        let l = Dim::Fixed(self.config.assigner().locations() as i64);
        let c = Dim::Fixed(self.config.num_classes() as i64);
        Ok(RawOutputs {
            cls: b.input(
                &self.raw.cls,
                DType::F32,
                vec![n.clone(), l.clone(), c.clone()],
            )?,
            box_log: b.input(
                &self.raw.box_log,
                DType::F32,
                vec![n.clone(), l.clone(), Dim::Fixed(4)],
            )?,
            ctr: b.input(&self.raw.ctr, DType::F32, vec![n, l])?,
        })
    }

    /// Inputs `[N, L, C]`, `[N, L, 4]`, `[N, L]` named `names` (targets of a loss).
    pub(crate) fn target_inputs(
        &self,
        b: &mut GraphBuilder,
        names: [&str; 4],
    ) -> Result<TargetValues, AdaptError> {
        let n = Dim::from("N");
        let l = Dim::Fixed(self.config.assigner().locations() as i64);
        let c = Dim::Fixed(self.config.num_classes() as i64);
        let f = DType::F32;
        Ok(TargetValues {
            cls: b.input(names[0], f, vec![n.clone(), l.clone(), c])?,
            reg: b.input(names[1], f, vec![n.clone(), l.clone(), Dim::Fixed(4)])?,
            ctr: b.input(names[2], f, vec![n.clone(), l.clone()])?,
            pos: b.input(names[3], f, vec![n, l])?,
        })
    }

    /// The forward graph with the detector's training loss on the device's labels: inputs the
    /// model's image input, the `trainable` parameters and the FCOS targets (`targets.cls
    /// [N, L, C]`, `targets.reg [N, L, 4]`, `targets.ctr [N, L]`, `targets.pos [N, L]`, as
    /// [`crate::detect::AssignConfig::assign`] makes them); outputs `loss`, `loss_cls`,
    /// `loss_box`, `loss_ctr`. No gradients (see [`Self::supervised_graph`]).
    pub fn supervised_forward(&self, trainable: &[String]) -> Result<ModelProto, AdaptError> {
        let mut b = GraphBuilder::new("densa-adapt-loss", 0);
        let raw = self.raw_inputs(&mut b)?;
        let targets =
            self.target_inputs(&mut b, [names::CLS, names::REG, names::CTR, names::POS])?;
        let (alpha, gamma) = (self.config.focal_alpha, self.config.focal_gamma);
        let losses = b.scoped("adapt.loss", |b| {
            detection_loss(b, &raw, &targets, alpha, gamma)
        })?;
        output_losses(&mut b, &losses)?;
        self.merged(trainable, Some(&LossGraph { model: b.finish() }), false)
    }

    /// [`Self::supervised_forward`] with gradients: outputs `loss` and `grad.<p>` for every
    /// trainable `p`, in order.
    pub fn supervised_graph(&self, trainable: &[String]) -> Result<ModelProto, AdaptError> {
        let forward = self.supervised_forward(trainable)?;
        differentiate(&forward, trainable)
    }
}

/// `model` (named `label` in errors) with `trainable` initializers as graph inputs (declared
/// with their shapes), its outputs replaced by `outputs` and those of `loss` (a model whose
/// inputs named in `consumed` are values of `model` and whose other inputs become inputs of
/// the result), dead code (a decoder) removed.
pub(crate) fn merge(
    model: &ModelProto,
    label: &str,
    trainable: &[String],
    loss: Option<&LossGraph>,
    outputs: Vec<ValueInfoProto>,
    consumed: &HashSet<&str>,
) -> Result<ModelProto, AdaptError> {
    let structure = |problem: String| AdaptError::Structure {
        model: label.to_string(),
        problem,
    };
    let mut model = model.clone();
    let graph = model
        .graph
        .as_mut()
        .ok_or_else(|| structure("has no graph".into()))?;
    let wanted: HashSet<&str> = trainable.iter().map(String::as_str).collect();
    let (moved, kept): (Vec<_>, Vec<_>) = std::mem::take(&mut graph.initializer)
        .into_iter()
        .partition(|t| wanted.contains(t.name.as_str()));
    graph.initializer = kept;
    if moved.len() != trainable.len() {
        let have: HashSet<&str> = moved.iter().map(|t| t.name.as_str()).collect();
        let missing = trainable
            .iter()
            .find(|n| !have.contains(n.as_str()))
            .cloned()
            .unwrap_or_default();
        return Err(AdaptError::Parameter {
            name: missing,
            problem: format!("is not an initializer of {label}"),
        });
    }
    for t in &moved {
        if graph.input.iter().any(|i| i.name == t.name) {
            continue;
        }
        let dims: Vec<Dim> = t.dims.iter().map(|&d| Dim::Fixed(d)).collect();
        graph.input.push(ValueInfoProto {
            name: t.name.clone(),
            r#type: Some(tensor_type(DType::F32, &dims)),
            ..Default::default()
        });
    }
    unfold_trainable_batch_norms(graph, &wanted, &moved).map_err(structure)?;
    // tract names a convolution's bias node `<conv node>.bias`, which would collide with
    // the graph input of that name: node names get a prefix (they carry no meaning).
    for node in graph.node.iter_mut() {
        if !node.name.is_empty() {
            node.name = format!("adapt/{}", node.name);
        }
    }
    graph.output.clear();
    graph.output.extend(outputs);
    if let Some(loss) = loss {
        let lg = loss
            .model
            .graph
            .as_ref()
            .ok_or_else(|| structure("loss graph missing".into()))?;
        let taken: HashSet<String> = graph
            .node
            .iter()
            .flat_map(|n| n.output.iter().cloned())
            .chain(graph.initializer.iter().map(|t| t.name.clone()))
            .chain(graph.input.iter().map(|i| i.name.clone()))
            .collect();
        for name in lg
            .node
            .iter()
            .flat_map(|n| n.output.iter())
            .chain(lg.initializer.iter().map(|t| &t.name))
        {
            if taken.contains(name) {
                return Err(structure(format!(
                    "the adaptation loss's value `{name}` clashes with a name of the model"
                )));
            }
        }
        graph.input.extend(
            lg.input
                .iter()
                .filter(|i| !consumed.contains(i.name.as_str()))
                .cloned(),
        );
        graph.node.extend(lg.node.iter().cloned());
        graph.initializer.extend(lg.initializer.iter().cloned());
        graph.output.extend(lg.output.iter().cloned());
    }
    Ok(eliminate_dead_code(&model)?)
}

/// Declares `[total, cls, box, ctr]` as the outputs `loss`, `loss_cls`, `loss_box`, `loss_ctr`.
pub(crate) fn output_losses(b: &mut GraphBuilder, losses: &[Value; 4]) -> Result<(), AdaptError> {
    for (v, name) in losses.iter().zip([
        names::LOSS,
        names::LOSS_CLS,
        names::LOSS_BOX,
        names::LOSS_CTR,
    ]) {
        b.output(v, name)?;
    }
    Ok(())
}

/// `loss` and its gradients with respect to `trainable`.
pub(crate) fn differentiate(
    forward: &ModelProto,
    trainable: &[String],
) -> Result<ModelProto, AdaptError> {
    let wrt: Vec<&str> = trainable.iter().map(String::as_str).collect();
    Ok(with_gradients(
        forward,
        &GradRequest::new(names::LOSS, &wrt),
    )?)
}

/// Rewrites every inference-mode `BatchNormalization` whose scale or bias is trainable (a graph
/// input now) as `(x - mean) * (1 / sqrt(var + eps)) * scale + bias` with `[1, C, 1, 1]`
/// constants for the frozen statistics: tract only loads batch norms whose parameters are
/// constants, and the same arithmetic is differentiable everywhere.
fn unfold_trainable_batch_norms(
    graph: &mut densa_exporter::onnx::GraphProto,
    trainable: &HashSet<&str>,
    moved: &[densa_exporter::onnx::TensorProto],
) -> Result<(), String> {
    use densa_exporter::onnx::NodeProto;
    let value_of = |graph: &densa_exporter::onnx::GraphProto, name: &str| -> Option<Tensor> {
        graph
            .initializer
            .iter()
            .chain(moved.iter())
            .find(|t| t.name == name)
            .and_then(|t| Tensor::from_proto(t).ok())
    };
    let mut nodes = Vec::with_capacity(graph.node.len());
    let mut inits = Vec::new();
    for (i, node) in std::mem::take(&mut graph.node).into_iter().enumerate() {
        let trains = node.op_type == "BatchNormalization"
            && node.input.len() >= 5
            && (trainable.contains(node.input[1].as_str())
                || trainable.contains(node.input[2].as_str()));
        if !trains {
            nodes.push(node);
            continue;
        }
        let label = if node.name.is_empty() {
            format!("#{i}")
        } else {
            node.name.clone()
        };
        if node.output.len() != 1 {
            return Err(format!(
                "BatchNormalization `{label}` is in training mode (several outputs)"
            ));
        }
        let eps = node
            .attribute
            .iter()
            .find(|a| a.name == "epsilon")
            .map(|a| a.f)
            .unwrap_or(1e-5);
        let stat = |name: &str| {
            value_of(graph, name)
                .map(|t| t.to_f32())
                .ok_or_else(|| format!("BatchNormalization `{label}`: `{name}` is not a constant"))
        };
        let mean = stat(&node.input[3])?;
        let var = stat(&node.input[4])?;
        let c = mean.len();
        let p = |s: &str| format!("adapt.bn.{i}.{s}");
        let four = |v: Vec<f32>| {
            Tensor::F32(ndarray::ArrayD::from_shape_vec(vec![1, c, 1, 1], v).expect("[1, C, 1, 1]"))
        };
        inits.push(four(mean.iter().copied().collect()).to_proto(&p("mean")));
        inits.push(
            four(var.iter().map(|v| 1.0 / (v + eps).sqrt()).collect()).to_proto(&p("inv_std")),
        );
        inits.push(
            Tensor::I64(ndarray::ArrayD::from_shape_vec(vec![4], vec![1, -1, 1, 1]).expect("[4]"))
                .to_proto(&p("shape")),
        );
        let op = |op: &str, inputs: Vec<String>, output: String| NodeProto {
            name: output.clone(),
            op_type: op.into(),
            input: inputs,
            output: vec![output],
            ..Default::default()
        };
        nodes.push(op(
            "Sub",
            vec![node.input[0].clone(), p("mean")],
            p("centred"),
        ));
        nodes.push(op("Mul", vec![p("centred"), p("inv_std")], p("normed")));
        nodes.push(op(
            "Reshape",
            vec![node.input[1].clone(), p("shape")],
            p("scale4"),
        ));
        nodes.push(op(
            "Reshape",
            vec![node.input[2].clone(), p("shape")],
            p("bias4"),
        ));
        nodes.push(op("Mul", vec![p("normed"), p("scale4")], p("scaled")));
        nodes.push(op(
            "Add",
            vec![p("scaled"), p("bias4")],
            node.output[0].clone(),
        ));
    }
    graph.node = nodes;
    graph.initializer.extend(inits);
    Ok(())
}
