use super::*;

fn tiny() -> SegmenterConfig {
    SegmenterConfig {
        fpn_channels: 16,
        head_channels: 16,
        groups: 4,
        ..SegmenterConfig::new(Arch::Edge, 3)
    }
}

#[test]
fn training_graph_has_loss_state_and_trainable_sets() {
    let g = training_graph(&tiny(), 64, false, 0).unwrap();
    let graph = g.model.graph.as_ref().unwrap();
    let outs: Vec<&str> = graph.output.iter().map(|o| o.name.as_str()).collect();
    assert_eq!(outs[0], "loss");
    assert!(outs.contains(&"bn1.running_mean.next"), "{outs:?}");
    assert_eq!(g.state.updates.len(), outs.len() - 1);
    assert!(g.trainable.contains(&"conv1.weight".to_string()));
    assert!(g.trainable.contains(&"head.classifier.weight".to_string()));
    assert!(g.buffers.contains(&"bn1.running_var".to_string()));
    let frozen = training_graph(&tiny(), 64, true, 0).unwrap();
    assert!(frozen.trainable.iter().all(|n| !Segmenter::is_backbone(n)));
    assert!(frozen
        .trainable
        .contains(&"fpn.inner_blocks.0.0.weight".to_string()));
}

#[test]
fn inference_graph_outputs_logits_and_class_map_without_batch_norm() {
    let meta = vec![("densa.task".to_string(), "segment".to_string())];
    let m = inference_graph(&tiny(), None, &meta, 0).unwrap();
    let g = m.graph.as_ref().unwrap();
    let outs: Vec<&str> = g.output.iter().map(|o| o.name.as_str()).collect();
    assert_eq!(outs, ["logits", "class_map"]);
    assert!(!g.node.iter().any(|n| n.op_type == "BatchNormalization"));
    assert!(m.metadata_props.iter().any(|e| e.key == "densa.task"));
}

#[test]
fn state_with_a_wrong_shape_or_nan_is_named() {
    let mut sd = StateDict::new();
    let e = inference_graph(&tiny(), Some(&sd), &[], 0)
        .unwrap_err()
        .to_string();
    assert!(e.contains("conv1.weight") && e.contains("missing"), "{e}");
    // Every tensor of the right shape, then one NaN.
    let mut b = GraphBuilder::new("g", 0);
    tiny().init(&mut b).unwrap();
    for p in b.params() {
        if p.kind != ParamKind::Constant {
            sd.insert(
                p.name.clone(),
                Tensor::F32(ndarray::ArrayD::zeros(p.shape.clone())),
            );
        }
    }
    assert!(inference_graph(&tiny(), Some(&sd), &[], 0).is_ok());
    sd.insert(
        "head.classifier.bias",
        Tensor::F32(ndarray::ArrayD::from_elem(vec![3], f32::NAN)),
    );
    let e = inference_graph(&tiny(), Some(&sd), &[], 0)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("head.classifier.bias") && e.contains("NaN"),
        "{e}"
    );
    sd.insert(
        "head.classifier.bias",
        Tensor::F32(ndarray::ArrayD::zeros(vec![4])),
    );
    let e = inference_graph(&tiny(), Some(&sd), &[], 0)
        .unwrap_err()
        .to_string();
    assert!(e.contains("shape"), "{e}");
}

#[test]
fn config_round_trips_through_json_and_is_checked() {
    let c = tiny();
    let text = serde_json::to_string(&c).unwrap();
    assert!(text.contains("\"resnet-edge\""), "{text}");
    let back: SegmenterConfig = serde_json::from_str(&text).unwrap();
    assert_eq!(back, c);
    let mut bad = tiny();
    bad.groups = 5;
    let mut b = GraphBuilder::new("g", 0);
    assert!(bad.init(&mut b).unwrap_err().to_string().contains("groups"));
}
