use densa_exporter::autodiff::{with_gradients, GradRequest};

use super::*;

fn config() -> DetectorConfig {
    DetectorConfig::new(
        Arch::Edge,
        vec!["disk".into(), "square".into(), "triangle".into()],
    )
}

#[test]
fn level_sizes_follow_the_resnet_strides() {
    let mut c = config();
    assert_eq!(c.level_sizes(), [16, 8, 4]);
    c.image_size = 100; // 50, 25, 13, 7, 4
    assert_eq!(c.level_sizes(), [13, 7, 4]);
    assert_eq!(c.assigner().locations(), 13 * 13 + 49 + 16);
}

#[test]
fn training_graph_has_the_declared_interface_and_differentiates() {
    let c = config();
    let (model, trainable) = c.training_graph(0).unwrap();
    let g = model.graph.as_ref().unwrap();
    let inputs: Vec<&str> = g.input.iter().map(|i| i.name.as_str()).collect();
    assert_eq!(
        inputs,
        [
            names::IMAGES,
            names::CLS,
            names::REG,
            names::CTR,
            names::POS
        ]
    );
    let outputs: Vec<&str> = g.output.iter().map(|o| o.name.as_str()).collect();
    assert_eq!(
        outputs,
        [
            names::LOSS,
            names::LOSS_CLS,
            names::LOSS_BOX,
            names::LOSS_CTR
        ]
    );
    assert!(trainable.iter().any(|n| n == "head.cls_logits.bias"));
    assert!(trainable.iter().any(|n| n == "fpn.inner_blocks.0.0.weight"));
    assert!(!trainable.iter().any(|n| n.ends_with("running_mean")));
    let wrt: Vec<&str> = trainable.iter().map(String::as_str).collect();
    let train = with_gradients(&model, &GradRequest::new(names::LOSS, &wrt)).unwrap();
    let outs: Vec<&str> = train
        .graph
        .as_ref()
        .unwrap()
        .output
        .iter()
        .map(|o| o.name.as_str())
        .collect();
    let missing: Vec<&str> = trainable
        .iter()
        .map(String::as_str)
        .filter(|n| !outs.iter().any(|o| o.ends_with(n)))
        .collect();
    assert!(missing.is_empty(), "no gradient for {missing:?}");
}

#[test]
fn inference_graph_loads_state_and_folds_batch_norm() {
    let c = config();
    let state = c.initial_state(3).unwrap();
    let m = c
        .inference_graph(Some(&state), 50, &[("densa.spec", "x")])
        .unwrap();
    let g = m.graph.as_ref().unwrap();
    assert!(!g.node.iter().any(|n| n.op_type == "BatchNormalization"));
    let outs: Vec<&str> = g.output.iter().map(|o| o.name.as_str()).collect();
    assert_eq!(outs, ["boxes", "scores", "labels"]);
    assert!(m.metadata_props.iter().any(|p| p.key == "densa.spec"));
    let mut bad = state.clone();
    bad.insert("head.cls_logits.bias", Tensor::F32(ArrayD::zeros(vec![7])));
    let e = c
        .inference_graph(Some(&bad), 50, &[])
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("head.cls_logits.bias") && e.contains("[7]"),
        "{e}"
    );
}

#[test]
fn bad_configs_name_the_field() {
    let mut c = config();
    c.gn_groups = 5;
    let e = c.training_graph(0).unwrap_err().to_string();
    assert!(e.contains("gn_groups"), "{e}");
    let mut c = config();
    c.arch = "vgg".into();
    assert!(c
        .training_graph(0)
        .unwrap_err()
        .to_string()
        .contains("arch"));
}
