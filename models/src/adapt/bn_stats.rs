//! `bn-stats`: re-estimating batch-norm statistics on the device's images (AdaBN, Li et al.
//! 2016; PyTorch's `torch.optim.swa_utils.update_bn`, a cumulative average over batches).
//!
//! Only models that kept `BatchNormalization` nodes have statistics to re-estimate (densa's
//! own exports fold them into the convolutions). [`bn_stats_graph`] rewrites each
//! `BatchNormalization(X, scale, B, mean, var)` to normalise with the batch's statistics
//! (`ReduceMean` over N, H, W), as a training-mode forward does, and outputs each node's batch
//! mean and mean of squares; [`BatchNormStats`] averages them over batches (weighted by the
//! number of values) and writes `mean` and the population variance `E[x^2] - E[x]^2` into the
//! node's statistic initializers.
//!
//! Our choice: the population (biased) variance, as AdaBN; PyTorch's running variance uses
//! the unbiased one, a factor `n / (n - 1)` that is negligible at these counts.

use std::collections::BTreeMap;

use densa_exporter::builder::attr;
use densa_exporter::builder::tensor_type;
use densa_exporter::onnx::{ModelProto, NodeProto, ValueInfoProto};
use densa_exporter::{DType, Dim, Tensor};
use ndarray::ArrayD;

use super::AdaptError;

/// One rewritten batch-norm node: the statistic initializers it reads and the outputs that
/// carry its batch statistics.
#[derive(Clone, Debug)]
pub struct BnSite {
    pub node: String,
    pub mean: String,
    pub var: String,
    pub batch_mean: String,
    pub batch_sqmean: String,
}

/// The model with batch norms in batch-statistics mode and one `[C]` mean and mean-of-squares
/// output per node (named `bn_stats.<k>.mean` / `.sqmean`), and the sites; an error when the
/// model has no `BatchNormalization` node.
pub fn bn_stats_graph(
    model: &ModelProto,
    label: &str,
) -> Result<(ModelProto, Vec<BnSite>), AdaptError> {
    let structure = |problem: String| AdaptError::Structure {
        model: label.to_string(),
        problem,
    };
    let mut out = model.clone();
    let opset = model
        .opset_import
        .iter()
        .find(|o| o.domain.is_empty() || o.domain == "ai.onnx")
        .map(|o| o.version)
        .unwrap_or(densa_exporter::builder::OPSET);
    let graph = out
        .graph
        .as_mut()
        .ok_or_else(|| structure("has no graph".into()))?;
    let inits: std::collections::HashSet<String> =
        graph.initializer.iter().map(|t| t.name.clone()).collect();
    let mut nodes = Vec::with_capacity(graph.node.len());
    let mut sites = Vec::new();
    let mut extra_inits = Vec::new();
    for (i, node) in std::mem::take(&mut graph.node).into_iter().enumerate() {
        if node.op_type != "BatchNormalization" {
            nodes.push(node);
            continue;
        }
        let k = sites.len();
        let label_of = |s: &str| format!("bn_stats.{k}.{s}");
        let name = if node.name.is_empty() {
            format!("#{i}")
        } else {
            node.name.clone()
        };
        if node.input.len() < 5 || node.output.len() != 1 {
            return Err(structure(format!(
                "BatchNormalization `{name}` in training mode (several outputs) or with missing inputs"
            )));
        }
        let (x, mean, var) = (&node.input[0], &node.input[3], &node.input[4]);
        for s in [mean, var] {
            if !inits.contains(s) {
                return Err(structure(format!(
                    "BatchNormalization `{name}`: statistic `{s}` is not an initializer"
                )));
            }
        }
        let reduce_mean = |input: &str, output: String| -> Vec<NodeProto> {
            if opset >= 18 {
                vec![NodeProto {
                    name: output.clone(),
                    op_type: "ReduceMean".into(),
                    input: vec![input.to_string(), label_of("axes")],
                    output: vec![output],
                    attribute: vec![attr::int("keepdims", 1)],
                    ..Default::default()
                }]
            } else {
                vec![NodeProto {
                    name: output.clone(),
                    op_type: "ReduceMean".into(),
                    input: vec![input.to_string()],
                    output: vec![output],
                    attribute: vec![attr::ints("axes", &[0, 2, 3]), attr::int("keepdims", 1)],
                    ..Default::default()
                }]
            }
        };
        if opset >= 18 {
            extra_inits.push(
                Tensor::I64(ArrayD::from_shape_vec(vec![3], vec![0, 2, 3]).expect("[3]"))
                    .to_proto(&label_of("axes")),
            );
        }
        extra_inits.push(
            Tensor::I64(ArrayD::from_shape_vec(vec![1], vec![-1]).expect("[1]"))
                .to_proto(&label_of("flat")),
        );
        let m4 = label_of("m4");
        let sq = label_of("x2");
        let sq4 = label_of("sq4");
        let mm = label_of("mm");
        let v4 = label_of("v4");
        let site = BnSite {
            node: name.clone(),
            mean: mean.clone(),
            var: var.clone(),
            batch_mean: label_of("mean"),
            batch_sqmean: label_of("sqmean"),
        };
        let simple = |op: &str, inputs: Vec<String>, output: String| NodeProto {
            name: output.clone(),
            op_type: op.into(),
            input: inputs,
            output: vec![output],
            ..Default::default()
        };
        nodes.extend(reduce_mean(x, m4.clone()));
        nodes.push(simple("Mul", vec![x.clone(), x.clone()], sq.clone()));
        nodes.extend(reduce_mean(&sq, sq4.clone()));
        nodes.push(simple("Mul", vec![m4.clone(), m4.clone()], mm.clone()));
        nodes.push(simple("Sub", vec![sq4.clone(), mm], v4.clone()));
        nodes.push(simple(
            "Reshape",
            vec![m4.clone(), label_of("flat")],
            site.batch_mean.clone(),
        ));
        nodes.push(simple(
            "Reshape",
            vec![sq4, label_of("flat")],
            site.batch_sqmean.clone(),
        ));
        // y = (x - mean) / sqrt(var + eps) * scale + bias, per channel ([1, C, 1, 1]).
        let eps = node
            .attribute
            .iter()
            .find(|a| a.name == "epsilon")
            .map(|a| a.f)
            .unwrap_or(1e-5);
        extra_inits.push(Tensor::F32(ArrayD::from_elem(vec![], eps)).to_proto(&label_of("eps")));
        extra_inits.push(
            Tensor::I64(ArrayD::from_shape_vec(vec![4], vec![1, -1, 1, 1]).expect("[4]"))
                .to_proto(&label_of("c4")),
        );
        let centred = label_of("centred");
        let ve = label_of("ve");
        let sd = label_of("sd");
        let normed = label_of("normed");
        let scale4 = label_of("scale4");
        let bias4 = label_of("bias4");
        let scaled = label_of("scaled");
        nodes.push(simple("Sub", vec![x.clone(), m4.clone()], centred.clone()));
        nodes.push(simple("Add", vec![v4.clone(), label_of("eps")], ve.clone()));
        nodes.push(simple("Sqrt", vec![ve], sd.clone()));
        nodes.push(simple("Div", vec![centred, sd], normed.clone()));
        nodes.push(simple(
            "Reshape",
            vec![node.input[1].clone(), label_of("c4")],
            scale4.clone(),
        ));
        nodes.push(simple(
            "Reshape",
            vec![node.input[2].clone(), label_of("c4")],
            bias4.clone(),
        ));
        nodes.push(simple("Mul", vec![normed, scale4], scaled.clone()));
        nodes.push(simple("Add", vec![scaled, bias4], node.output[0].clone()));
        for out_name in [&site.batch_mean, &site.batch_sqmean] {
            graph.output.push(ValueInfoProto {
                name: out_name.clone(),
                r#type: Some(tensor_type(DType::F32, &[Dim::from("C")])),
                ..Default::default()
            });
        }
        sites.push(site);
    }
    if sites.is_empty() {
        return Err(AdaptError::NoBatchNorm {
            model: label.to_string(),
            problem: "has no BatchNormalization node (batch norm was folded at export): \
                      bn-stats has no statistics to re-estimate; use --method supervised or \
                      an unlabeled method"
                .into(),
        });
    }
    graph.node = nodes;
    graph.initializer.extend(extra_inits);
    Ok((out, sites))
}

/// Running averages of the batch statistics of each site.
#[derive(Clone, Debug)]
pub struct BatchNormStats {
    sites: Vec<BnSite>,
    sum_mean: Vec<ArrayD<f64>>,
    sum_sq: Vec<ArrayD<f64>>,
    weight: f64,
}

impl BatchNormStats {
    pub fn new(sites: Vec<BnSite>) -> BatchNormStats {
        let n = sites.len();
        BatchNormStats {
            sites,
            sum_mean: vec![ArrayD::zeros(vec![0]); n],
            sum_sq: vec![ArrayD::zeros(vec![0]); n],
            weight: 0.0,
        }
    }

    /// Adds one run's outputs (a batch of `images` images of one size).
    pub fn add(&mut self, outputs: &[(String, Tensor)], images: usize) -> Result<(), AdaptError> {
        let w = images as f64;
        for (k, site) in self.sites.iter().enumerate() {
            for (name, sum) in [
                (&site.batch_mean, &mut self.sum_mean[k]),
                (&site.batch_sqmean, &mut self.sum_sq[k]),
            ] {
                let v = outputs
                    .iter()
                    .find(|(n, _)| n == name)
                    .map(|(_, t)| t.to_f32().mapv(|x| x as f64 * w))
                    .ok_or_else(|| AdaptError::Parameter {
                        name: name.clone(),
                        problem: "missing from the statistics run's outputs".into(),
                    })?;
                if sum.is_empty() {
                    *sum = v;
                } else {
                    *sum += &v;
                }
            }
        }
        self.weight += w;
        Ok(())
    }

    /// The re-estimated statistics, by initializer name (`mean` and `var` of each site).
    pub fn finish(&self) -> BTreeMap<String, Tensor> {
        let mut out = BTreeMap::new();
        let w = self.weight.max(1.0);
        for (k, site) in self.sites.iter().enumerate() {
            let mean = self.sum_mean[k].mapv(|x| x / w);
            let var = ndarray::Zip::from(&self.sum_sq[k])
                .and(&mean)
                .map_collect(|&s, &m| (s / w - m * m).max(0.0));
            out.insert(site.mean.clone(), Tensor::F32(mean.mapv(|x| x as f32)));
            out.insert(site.var.clone(), Tensor::F32(var.mapv(|x| x as f32)));
        }
        out
    }

    pub fn sites(&self) -> &[BnSite] {
        &self.sites
    }
}
