//! Summaries of a model: interface, op histogram, parameter count, FLOPs estimate, metadata.
//!
//! FLOPs need the shape of every value, which needs shape inference with concrete input sizes:
//! the runtime provides those (tract analyses the graph) and [`estimate_flops`] turns them into
//! a count. A multiply-add counts as two FLOPs.

use std::collections::{BTreeMap, HashMap};

use crate::builder::{read_value_info, shape_string, Dim};
use crate::onnx::ModelProto;
use crate::tensor::DType;

/// A graph input or output as declared in the model.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Port {
    pub name: String,
    pub dtype: String,
    pub shape: String,
}

/// What `densa inspect` prints.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Summary {
    pub producer: String,
    pub ir_version: i64,
    pub opsets: Vec<(String, i64)>,
    pub inputs: Vec<Port>,
    pub outputs: Vec<Port>,
    pub op_histogram: BTreeMap<String, usize>,
    pub nodes: usize,
    /// Elements of floating-point initializers (the learned parameters and buffers).
    pub parameters: usize,
    pub parameter_bytes: usize,
    pub metadata: Vec<(String, String)>,
}

/// Summarises `model`. Initializers that are also graph inputs are not counted as inputs.
pub fn summarize(model: &ModelProto) -> Summary {
    let graph = model.graph.clone().unwrap_or_default();
    let init_names: std::collections::HashSet<&str> =
        graph.initializer.iter().map(|t| t.name.as_str()).collect();
    let port = |vi: &crate::onnx::ValueInfoProto| {
        let (dtype, shape) = read_value_info(vi).unwrap_or((None, None));
        Port {
            name: vi.name.clone(),
            dtype: dtype
                .map(|d| d.name().to_string())
                .unwrap_or_else(|| "?".into()),
            shape: shape
                .map(|s| shape_string(&s))
                .unwrap_or_else(|| "?".into()),
        }
    };
    let mut op_histogram = BTreeMap::new();
    for n in &graph.node {
        let op = if n.domain.is_empty() || n.domain == "ai.onnx" {
            n.op_type.clone()
        } else {
            format!("{}:{}", n.domain, n.op_type)
        };
        *op_histogram.entry(op).or_insert(0) += 1;
    }
    let (mut parameters, mut parameter_bytes) = (0, 0);
    for t in &graph.initializer {
        if let Some(dt) = DType::from_onnx(t.data_type).filter(|d| d.is_float()) {
            let n: usize = t.dims.iter().map(|&d| d.max(0) as usize).product();
            parameters += n;
            parameter_bytes += n * dt.size();
        }
    }
    Summary {
        producer: format!("{} {}", model.producer_name, model.producer_version)
            .trim()
            .to_string(),
        ir_version: model.ir_version,
        opsets: model
            .opset_import
            .iter()
            .map(|o| {
                (
                    if o.domain.is_empty() {
                        "ai.onnx".to_string()
                    } else {
                        o.domain.clone()
                    },
                    o.version,
                )
            })
            .collect(),
        inputs: graph
            .input
            .iter()
            .filter(|i| !init_names.contains(i.name.as_str()))
            .map(port)
            .collect(),
        outputs: graph.output.iter().map(port).collect(),
        nodes: graph.node.len(),
        op_histogram,
        parameters,
        parameter_bytes,
        metadata: model
            .metadata_props
            .iter()
            .map(|e| (e.key.clone(), e.value.clone()))
            .collect(),
    }
}

/// FLOPs of one forward pass, given the concrete shape of every value (`shapes`, by value
/// name, as shape inference found them). Values whose shapes are missing count as zero, and
/// the number of nodes skipped that way is returned beside the total.
pub fn estimate_flops(model: &ModelProto, shapes: &HashMap<String, Vec<usize>>) -> (u64, usize) {
    let Some(graph) = model.graph.as_ref() else {
        return (0, 0);
    };
    let init_shape: HashMap<&str, Vec<usize>> = graph
        .initializer
        .iter()
        .map(|t| {
            (
                t.name.as_str(),
                t.dims.iter().map(|&d| d.max(0) as usize).collect(),
            )
        })
        .collect();
    let shape = |name: &str| -> Option<Vec<usize>> {
        shapes
            .get(name)
            .cloned()
            .or_else(|| init_shape.get(name).cloned())
    };
    let numel = |s: &[usize]| s.iter().product::<usize>() as u64;
    let (mut total, mut unknown) = (0u64, 0usize);
    for n in &graph.node {
        let out = n.output.first().and_then(|o| shape(o));
        let inp = |i: usize| {
            n.input
                .get(i)
                .filter(|s| !s.is_empty())
                .and_then(|s| shape(s))
        };
        let flops = match n.op_type.as_str() {
            "Conv" => (|| {
                let (o, w) = (out.clone()?, inp(1)?);
                let per_output = 2 * w[1..].iter().product::<usize>() as u64;
                Some(numel(&o) * per_output + if n.input.len() > 2 { numel(&o) } else { 0 })
            })(),
            "ConvTranspose" => (|| {
                let (x, w) = (inp(0)?, inp(1)?);
                Some(2 * numel(&x) * w[1..].iter().product::<usize>() as u64)
            })(),
            "Gemm" | "MatMul" => (|| {
                let (a, o) = (inp(0)?, out.clone()?);
                let trans_a = crate::builder::attr::get_int(&n.attribute, "transA", 0) != 0;
                let k = if n.op_type == "Gemm" && trans_a {
                    a[0]
                } else {
                    *a.last()?
                };
                Some(2 * numel(&o) * k as u64)
            })(),
            "BatchNormalization"
            | "InstanceNormalization"
            | "LayerNormalization"
            | "GroupNormalization" => out.as_deref().map(|o| 2 * numel(o)),
            "MaxPool" | "AveragePool" => (|| {
                let k = crate::builder::attr::get_ints(&n.attribute, "kernel_shape")?;
                Some(numel(&out.clone()?) * k.iter().product::<i64>() as u64)
            })(),
            "GlobalAveragePool" | "GlobalMaxPool" | "ReduceMean" | "ReduceSum" | "ReduceMax" => {
                inp(0).map(|x| numel(&x))
            }
            "Add" | "Sub" | "Mul" | "Div" | "Relu" | "Sigmoid" | "Tanh" | "Exp" | "Log"
            | "Sqrt" | "Pow" | "Clip" | "LeakyRelu" | "HardSigmoid" | "HardSwish" | "Softmax"
            | "LogSoftmax" | "Erf" | "Max" | "Min" => out.as_deref().map(numel),
            _ => Some(0),
        };
        match flops {
            Some(f) => total += f,
            None => unknown += 1,
        }
    }
    (total, unknown)
}

/// The dims of a declared input, with symbolic ones left `None`.
pub fn declared_dims(model: &ModelProto, input: &str) -> Option<Vec<Option<usize>>> {
    let vi = model
        .graph
        .as_ref()?
        .input
        .iter()
        .find(|i| i.name == input)?;
    let (_, shape) = read_value_info(vi)?;
    Some(
        shape?
            .iter()
            .map(|d| {
                if let Dim::Fixed(v) = d {
                    Some(*v as usize)
                } else {
                    None
                }
            })
            .collect(),
    )
}
