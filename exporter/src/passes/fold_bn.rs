//! Batch-norm folding: `Conv -> BatchNormalization` (inference mode) becomes one `Conv`.
//!
//! With `s = gamma / sqrt(var + eps)`: `W' = W * s` per output channel and
//! `b' = (b - mean) * s + beta`. The pair is folded only when the convolution's output feeds
//! nothing but the batch norm and every parameter is an initializer; other batch norms stay.

use std::collections::HashMap;

use ndarray::{ArrayD, Axis};

use super::{eliminate_dead_code, PassError};
use crate::builder::attr;
use crate::onnx::{GraphProto, ModelProto, NodeProto};
use crate::tensor::Tensor;

/// The model with every foldable `Conv -> BatchNormalization` pair folded.
pub fn fold_batch_norm(model: &ModelProto) -> Result<ModelProto, PassError> {
    let graph = model.graph.as_ref().ok_or(PassError::NoGraph)?;
    let mut out = model.clone();
    out.graph = Some(fold(graph)?);
    eliminate_dead_code(&out)
}

fn fold(graph: &GraphProto) -> Result<GraphProto, PassError> {
    let init_index: HashMap<&str, usize> = graph
        .initializer
        .iter()
        .enumerate()
        .map(|(i, t)| (t.name.as_str(), i))
        .collect();
    let mut uses: HashMap<&str, usize> = HashMap::new();
    for n in &graph.node {
        for i in n.input.iter().filter(|s| !s.is_empty()) {
            *uses.entry(i).or_default() += 1;
        }
    }
    for o in &graph.output {
        *uses.entry(&o.name).or_default() += 1;
    }
    let producer: HashMap<&str, usize> = graph
        .node
        .iter()
        .enumerate()
        .flat_map(|(i, n)| n.output.iter().map(move |o| (o.as_str(), i)))
        .collect();
    let f32_init = |name: &str| -> Result<Option<ArrayD<f32>>, PassError> {
        match init_index.get(name) {
            Some(&i) => Ok(Tensor::from_proto(&graph.initializer[i])?.as_f32().cloned()),
            None => Ok(None),
        }
    };

    let mut new_nodes: Vec<Option<NodeProto>> = graph.node.iter().cloned().map(Some).collect();
    let mut new_inits = graph.initializer.clone();
    let mut taken: std::collections::HashSet<String> =
        graph.initializer.iter().map(|t| t.name.clone()).collect();
    for (bn_idx, bn) in graph.node.iter().enumerate() {
        let default_domain = bn.domain.is_empty() || bn.domain == "ai.onnx";
        if bn.op_type != "BatchNormalization"
            || !default_domain
            || bn.input.len() != 5
            || bn.output.len() != 1
        {
            continue;
        }
        if attr::get_int(&bn.attribute, "training_mode", 0) != 0 {
            continue;
        }
        let Some(&conv_idx) = producer.get(bn.input[0].as_str()) else {
            continue;
        };
        let conv = &graph.node[conv_idx];
        if conv.op_type != "Conv"
            || conv.output.len() != 1
            || uses.get(conv.output[0].as_str()) != Some(&1)
        {
            continue;
        }
        let Some(w) = f32_init(&conv.input[1])? else {
            continue;
        };
        let params: Option<Vec<ArrayD<f32>>> = bn.input[1..]
            .iter()
            .map(|n| f32_init(n))
            .collect::<Result<Vec<_>, _>>()?
            .into_iter()
            .collect();
        let Some(params) = params else { continue };
        let (gamma, beta, mean, var) = (&params[0], &params[1], &params[2], &params[3]);
        let channels = w.shape()[0];
        if params.iter().any(|p| p.len() != channels) {
            return Err(PassError::Node {
                node: bn.name.clone(),
                message: format!(
                    "batch norm parameters do not have the {channels} channels of conv `{}`",
                    conv.name
                ),
            });
        }
        let bias = match conv.input.get(2).filter(|s| !s.is_empty()) {
            Some(name) => match f32_init(name)? {
                Some(b) => b,
                None => continue,
            },
            None => ArrayD::zeros(vec![channels]),
        };
        let eps = attr::get_float(&bn.attribute, "epsilon", 1e-5);
        let scale: Vec<f32> = (0..channels)
            .map(|c| gamma[c] / (var[c] + eps).sqrt())
            .collect();
        let mut folded_w = w.clone();
        for (c, mut filt) in folded_w.axis_iter_mut(Axis(0)).enumerate() {
            filt.mapv_inplace(|v| v * scale[c]);
        }
        let folded_b: ArrayD<f32> = ArrayD::from_shape_fn(vec![channels], |i| {
            (bias[i[0]] - mean[i[0]]) * scale[i[0]] + beta[i[0]]
        });

        // The folded weight replaces the original when nothing else uses it (keeping its
        // torchvision name); otherwise it gets a name of its own.
        let w_name = if uses.get(conv.input[1].as_str()) == Some(&1) {
            conv.input[1].clone()
        } else {
            fresh(&mut taken, &format!("{}_folded", conv.input[1]))
        };
        let b_name = match conv
            .input
            .get(2)
            .filter(|s| !s.is_empty() && uses.get(s.as_str()) == Some(&1))
        {
            Some(b) => b.clone(),
            None => fresh(
                &mut taken,
                &format!("{}.bias", conv.name.trim_end_matches(".weight")),
            ),
        };
        set_init(&mut new_inits, &w_name, Tensor::F32(folded_w));
        set_init(&mut new_inits, &b_name, Tensor::F32(folded_b));
        let mut folded = conv.clone();
        folded.input = vec![conv.input[0].clone(), w_name, b_name];
        folded.output = vec![bn.output[0].clone()];
        new_nodes[conv_idx] = None;
        // The folded conv takes the batch norm's place: its output keeps the same consumers.
        new_nodes[bn_idx] = Some(folded);
    }
    let mut g = graph.clone();
    g.node = new_nodes.into_iter().flatten().collect();
    g.initializer = new_inits;
    Ok(g)
}

fn fresh(taken: &mut std::collections::HashSet<String>, base: &str) -> String {
    let mut name = base.to_string();
    let mut k = 1;
    while taken.contains(&name) {
        name = format!("{base}_{k}");
        k += 1;
    }
    taken.insert(name.clone());
    name
}

fn set_init(inits: &mut Vec<crate::onnx::TensorProto>, name: &str, value: Tensor) {
    let proto = value.to_proto(name);
    match inits.iter_mut().find(|t| t.name == name) {
        Some(t) => *t = proto,
        None => inits.push(proto),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::builder::ops::Window2d;
    use crate::builder::{GraphBuilder, Init, ParamKind};
    use crate::DType;

    #[test]
    fn folds_conv_bn_and_drops_statistics() {
        let mut b = GraphBuilder::new("g", 1);
        let x = b
            .input(
                "x",
                DType::F32,
                vec![1.into(), 2.into(), 5.into(), 5.into()],
            )
            .unwrap();
        let y = b
            .scoped("conv1", |b| {
                let w = b.param(
                    "weight",
                    &[3, 2, 3, 3],
                    Init::KaimingNormalFanOut,
                    ParamKind::Param,
                )?;
                b.conv2d(Some(""), &x, &w, None, &Window2d::square(3, 1, 1), 1)
            })
            .unwrap();
        let y = b
            .scoped("bn1", |b| {
                let g = b.param("weight", &[3], Init::Uniform(1.0), ParamKind::Param)?;
                let be = b.param("bias", &[3], Init::Uniform(1.0), ParamKind::Param)?;
                let m = b.param("running_mean", &[3], Init::Uniform(1.0), ParamKind::Buffer)?;
                let v = b.param("running_var", &[3], Init::Constant(2.0), ParamKind::Buffer)?;
                b.batch_norm(Some(""), &y, [&g, &be, &m, &v], 1e-5)
            })
            .unwrap();
        b.output(&y, "y").unwrap();
        let folded = fold_batch_norm(&b.finish()).unwrap();
        let g = folded.graph.unwrap();
        let ops: Vec<&str> = g.node.iter().map(|n| n.op_type.as_str()).collect();
        assert_eq!(ops, ["Conv", "Identity"]);
        let names: Vec<&str> = g.initializer.iter().map(|t| t.name.as_str()).collect();
        assert_eq!(names, ["conv1.weight", "conv1.bias"]);
        // Numerics of the fold are checked end to end against the unfolded graph on both
        // backends (runtime tests) and against PyTorch (tests/torchvision_parity.rs).
    }
}
