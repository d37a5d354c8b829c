//! Structural validation of a model: what must hold before a graph is saved or run.
//!
//! Checks: an opset for the default domain, unique names (values, nodes, initializers,
//! inputs), every node input defined earlier (a graph input, an initializer or an earlier
//! node's output: topological order), every graph output defined, and every graph output typed.
//! Errors name the node and the value concerned.

use std::collections::{HashMap, HashSet};

use crate::onnx::{GraphProto, ModelProto};

/// What is wrong with a model.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum ValidationError {
    #[error("the model has no graph")]
    NoGraph,
    #[error("the model imports no opset for the default ONNX domain")]
    NoDefaultOpset,
    #[error("node #{index} (`{node}`, {op}) has an empty op_type")]
    EmptyOpType {
        index: usize,
        node: String,
        op: String,
    },
    #[error("value `{name}` is defined twice: by {first} and by {second}")]
    DuplicateValue {
        name: String,
        first: String,
        second: String,
    },
    #[error("node name `{0}` is used by two nodes")]
    DuplicateNode(String),
    #[error("node `{node}` ({op}) uses `{value}` before node `{producer}` produces it: nodes are not in topological order")]
    NotTopological {
        node: String,
        op: String,
        value: String,
        producer: String,
    },
    #[error("node `{node}` ({op}) uses `{value}`, which no input, initializer or node defines")]
    UndefinedInput {
        node: String,
        op: String,
        value: String,
    },
    #[error("graph output `{0}` is not defined by any node, input or initializer")]
    UndefinedOutput(String),
    #[error("graph output `{0}` has no tensor type")]
    UntypedOutput(String),
}

/// Checks the structure of `model`.
pub fn validate(model: &ModelProto) -> Result<(), ValidationError> {
    if !model
        .opset_import
        .iter()
        .any(|o| o.domain.is_empty() || o.domain == "ai.onnx")
    {
        return Err(ValidationError::NoDefaultOpset);
    }
    let graph = model.graph.as_ref().ok_or(ValidationError::NoGraph)?;
    validate_graph(graph, &HashSet::new())
}

fn node_label(graph: &GraphProto, i: usize) -> String {
    let n = &graph.node[i];
    if n.name.is_empty() {
        format!("#{i}")
    } else {
        n.name.clone()
    }
}

/// Checks one graph; `outer` holds the names visible from enclosing graphs (for subgraphs).
pub fn validate_graph(graph: &GraphProto, outer: &HashSet<String>) -> Result<(), ValidationError> {
    // Who defines each name, to report duplicates.
    let mut names: HashMap<&str, &'static str> = HashMap::new();
    for i in &graph.input {
        if names.insert(&i.name, "graph input").is_some() {
            return Err(ValidationError::DuplicateValue {
                name: i.name.clone(),
                first: "graph input".into(),
                second: "graph input".into(),
            });
        }
    }
    for t in &graph.initializer {
        // An initializer may also be listed as a graph input (IR < 4 style): allowed.
        if names.insert(&t.name, "initializer") == Some("initializer") {
            return Err(ValidationError::DuplicateValue {
                name: t.name.clone(),
                first: "initializer".into(),
                second: "initializer".into(),
            });
        }
    }
    for s in &graph.sparse_initializer {
        if let Some(v) = &s.values {
            names.insert(&v.name, "sparse initializer");
        }
    }
    // Producers of every node output, to tell "later" from "never".
    let mut producers: HashMap<&str, usize> = HashMap::new();
    let mut node_names = HashSet::new();
    for (i, n) in graph.node.iter().enumerate() {
        if n.op_type.is_empty() {
            return Err(ValidationError::EmptyOpType {
                index: i,
                node: n.name.clone(),
                op: String::new(),
            });
        }
        if !n.name.is_empty() && !node_names.insert(n.name.as_str()) {
            return Err(ValidationError::DuplicateNode(n.name.clone()));
        }
        for o in n.output.iter().filter(|o| !o.is_empty()) {
            let by = format!("node `{}` ({})", node_label(graph, i), n.op_type);
            if let Some(first) = names.get(o.as_str()) {
                return Err(ValidationError::DuplicateValue {
                    name: o.clone(),
                    first: first.to_string(),
                    second: by,
                });
            }
            if let Some(&j) = producers.get(o.as_str()) {
                let first = format!(
                    "node `{}` ({})",
                    node_label(graph, j),
                    graph.node[j].op_type
                );
                return Err(ValidationError::DuplicateValue {
                    name: o.clone(),
                    first,
                    second: by,
                });
            }
            producers.insert(o, i);
        }
    }
    let mut available: HashSet<&str> = names.keys().copied().collect();
    for (i, n) in graph.node.iter().enumerate() {
        for input in n.input.iter().filter(|s| !s.is_empty()) {
            if available.contains(input.as_str()) || outer.contains(input) {
                continue;
            }
            let node = node_label(graph, i);
            return Err(match producers.get(input.as_str()) {
                Some(&j) => ValidationError::NotTopological {
                    node,
                    op: n.op_type.clone(),
                    value: input.clone(),
                    producer: node_label(graph, j),
                },
                None => ValidationError::UndefinedInput {
                    node,
                    op: n.op_type.clone(),
                    value: input.clone(),
                },
            });
        }
        // Subgraphs (If/Loop/Scan bodies) see everything defined so far.
        for a in &n.attribute {
            let subgraphs = a.g.iter().chain(a.graphs.iter());
            for g in subgraphs {
                let mut visible: HashSet<String> = outer.clone();
                visible.extend(available.iter().map(|s| s.to_string()));
                validate_graph(g, &visible)?;
            }
        }
        for o in n.output.iter().filter(|o| !o.is_empty()) {
            available.insert(o);
        }
    }
    for o in &graph.output {
        if !available.contains(o.name.as_str()) && !outer.contains(&o.name) {
            return Err(ValidationError::UndefinedOutput(o.name.clone()));
        }
        let typed = matches!(crate::builder::read_value_info(o), Some((Some(_), _)));
        if !typed {
            return Err(ValidationError::UntypedOutput(o.name.clone()));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::builder::{Dim, GraphBuilder};
    use crate::onnx::NodeProto;
    use crate::tensor::DType;

    fn small() -> ModelProto {
        let mut b = GraphBuilder::new("g", 0);
        let x = b
            .input("x", DType::F32, vec![Dim::from("N"), 3.into()])
            .unwrap();
        let y = b.relu(&x);
        let z = b.unary("Sigmoid", &y);
        b.output(&z, "z").unwrap();
        b.finish()
    }

    #[test]
    fn built_graph_is_valid() {
        validate(&small()).unwrap();
    }

    #[test]
    fn out_of_order_nodes_name_both() {
        let mut m = small();
        m.graph.as_mut().unwrap().node.swap(0, 1);
        let e = validate(&m).unwrap_err();
        assert!(matches!(e, ValidationError::NotTopological { .. }), "{e}");
        assert!(
            e.to_string().contains("`sigmoid`") && e.to_string().contains("`relu`"),
            "{e}"
        );
    }

    #[test]
    fn undefined_input_and_duplicates() {
        let mut m = small();
        m.graph.as_mut().unwrap().node[1].input[0] = "nope".into();
        assert_eq!(
            validate(&m).unwrap_err(),
            ValidationError::UndefinedInput {
                node: "sigmoid".into(),
                op: "Sigmoid".into(),
                value: "nope".into()
            }
        );
        let mut m = small();
        let g = m.graph.as_mut().unwrap();
        g.node.push(NodeProto {
            name: "again".into(),
            op_type: "Relu".into(),
            input: vec!["x".into()],
            output: vec!["relu".into()],
            ..Default::default()
        });
        assert!(matches!(
            validate(&m).unwrap_err(),
            ValidationError::DuplicateValue { .. }
        ));
        let mut m = small();
        m.graph.as_mut().unwrap().node[1].name = "relu".into();
        assert_eq!(
            validate(&m).unwrap_err(),
            ValidationError::DuplicateNode("relu".into())
        );
    }

    #[test]
    fn untyped_output_is_reported() {
        let mut m = small();
        m.graph.as_mut().unwrap().output[0].r#type = None;
        assert_eq!(
            validate(&m).unwrap_err(),
            ValidationError::UntypedOutput("z".into())
        );
    }
}
