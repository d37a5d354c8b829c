//! Dead-code removal: nodes none of whose outputs reach a graph output, and initializers no
//! node uses. Graph inputs are kept: they are the model's interface.

use std::collections::HashSet;

use super::PassError;
use crate::onnx::{GraphProto, ModelProto};

/// The model without the nodes and initializers that do not contribute to its outputs.
pub fn eliminate_dead_code(model: &ModelProto) -> Result<ModelProto, PassError> {
    let graph = model.graph.as_ref().ok_or(PassError::NoGraph)?;
    let mut out = model.clone();
    out.graph = Some(prune(graph));
    Ok(out)
}

fn prune(graph: &GraphProto) -> GraphProto {
    let mut needed: HashSet<&str> = graph.output.iter().map(|o| o.name.as_str()).collect();
    let mut keep = vec![false; graph.node.len()];
    for (i, node) in graph.node.iter().enumerate().rev() {
        if node.output.iter().any(|o| needed.contains(o.as_str())) {
            keep[i] = true;
            needed.extend(node.input.iter().map(String::as_str));
            // Names used inside subgraphs (captured from this scope) are needed too.
            for a in &node.attribute {
                for g in a.g.iter().chain(a.graphs.iter()) {
                    for n in &g.node {
                        needed.extend(n.input.iter().map(String::as_str));
                    }
                }
            }
        }
    }
    let mut pruned = graph.clone();
    pruned.node = graph
        .node
        .iter()
        .zip(&keep)
        .filter(|(_, &k)| k)
        .map(|(n, _)| n.clone())
        .collect();
    pruned
        .initializer
        .retain(|t| needed.contains(t.name.as_str()));
    let names: HashSet<&str> = pruned
        .node
        .iter()
        .flat_map(|n| n.input.iter().chain(n.output.iter()))
        .map(String::as_str)
        .collect();
    pruned
        .value_info
        .retain(|v| names.contains(v.name.as_str()));
    pruned
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::builder::{GraphBuilder, Init, ParamKind};
    use crate::DType;

    #[test]
    fn unused_branch_and_initializer_go() {
        let mut b = GraphBuilder::new("g", 0);
        let x = b.input("x", DType::F32, vec![3.into()]).unwrap();
        let w = b.param("w", &[3], Init::Ones, ParamKind::Param).unwrap();
        let unused = b
            .param("unused", &[3], Init::Ones, ParamKind::Param)
            .unwrap();
        let y = b.add(&x, &w).unwrap();
        let _dead = b.binary("Mul", &x, &unused).unwrap();
        b.output(&y, "y").unwrap();
        let m = eliminate_dead_code(&b.finish()).unwrap();
        let g = m.graph.unwrap();
        assert_eq!(
            g.node
                .iter()
                .map(|n| n.op_type.as_str())
                .collect::<Vec<_>>(),
            ["Add", "Identity"]
        );
        assert_eq!(
            g.initializer
                .iter()
                .map(|t| t.name.as_str())
                .collect::<Vec<_>>(),
            ["w"]
        );
        assert_eq!(g.input.len(), 1);
    }
}
