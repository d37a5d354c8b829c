use std::collections::BTreeMap;

use densa_exporter::{GraphBuilder, Tensor};
use densa_runtime::infer::spec::{
    Channels, InputLayout, InputSpec, ModelSpec, OutputLayout, OutputSpec, ResizeMode, SPEC_KEY,
};
use densa_runtime::{open_backend, BackendKind, BackendOptions};
use ndarray::{Array3, ArrayD};
use rand::{RngExt, SeedableRng};
use rand_chacha::ChaCha8Rng;

use super::*;
use crate::detect::names;

fn tiny_config() -> DetectorConfig {
    let mut c = DetectorConfig::new(crate::Arch::Edge, vec!["a".into(), "b".into()]);
    c.image_size = 64;
    c.channels = 16;
    c.gn_groups = 4;
    c.head_convs = 1;
    c.train_batch_norm = false;
    c
}

fn spec(config: &DetectorConfig) -> ModelSpec {
    ModelSpec {
        input: InputSpec {
            name: Some("images".into()),
            layout: InputLayout::Nchw,
            size: [config.image_size, config.image_size],
            resize: ResizeMode::Letterbox,
            pad_value: 114,
            scale: 1.0 / 255.0,
            mean: config.mean,
            std: config.std,
            channels: Channels::Rgb,
        },
        output: OutputSpec {
            layout: OutputLayout::BoxesScoresLabels,
            boxes: "boxes".into(),
            scores: "scores".into(),
            labels: "labels".into(),
            label_offset: 0,
            nms_iou: 0.6,
            host_nms: true,
            classes: config.classes.clone(),
        },
    }
}

/// A deployed export of `config` with random-but-nontrivial running statistics, so that BN
/// folding matters.
fn deployed(config: &DetectorConfig) -> (ModelProto, densa_exporter::weights::StateDict) {
    let mut state = config.initial_state(3).unwrap();
    let mut rng = ChaCha8Rng::seed_from_u64(9);
    let names: Vec<String> = state.iter().map(|(n, _)| n.to_string()).collect();
    for n in names {
        if n.ends_with("running_var") || n.ends_with("running_mean") || n.contains("bn") {
            let t = state.get(&n).unwrap().to_f32();
            let v = t.mapv(|x| {
                if n.ends_with("running_var") {
                    0.5 + rng.random::<f32>()
                } else {
                    x + 0.2 * (rng.random::<f32>() - 0.5)
                }
            });
            state.insert(n, Tensor::F32(v));
        }
    }
    let toml = spec(config).to_toml();
    let model = config
        .inference_graph(Some(&state), 50, &[(SPEC_KEY, toml.as_str())])
        .unwrap();
    (model, state)
}

fn sample(config: &DetectorConfig, seed: u64) -> (Array3<f32>, Vec<(String, Tensor)>) {
    let s = config.image_size as usize;
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let x = Array3::from_shape_fn((3, s, s), |_| rng.random::<f32>() * 2.0 - 1.0);
    let assigner = config.assigner();
    let t = assigner.assign(&[([8.0, 10.0, 40.0, 34.0], 1), ([30.0, 30.0, 60.0, 62.0], 0)]);
    let l = assigner.locations();
    let c = config.num_classes();
    let arr =
        |shape: Vec<usize>, v: Vec<f32>| Tensor::F32(ArrayD::from_shape_vec(shape, v).unwrap());
    let targets = vec![
        (names::CLS.to_string(), arr(vec![1, l, c], t.cls)),
        (names::REG.to_string(), arr(vec![1, l, 4], t.reg)),
        (names::CTR.to_string(), arr(vec![1, l], t.ctr)),
        (names::POS.to_string(), arr(vec![1, l], t.pos)),
    ];
    (x, targets)
}

fn output(outs: &[(String, Tensor)], name: &str) -> ArrayD<f32> {
    outs.iter().find(|(n, _)| n == name).unwrap().1.to_f32()
}

/// The loss and gradients of the graph rebuilt from the deployed (BN-folded) export equal those
/// of the detector's own training graph with frozen batch norm and the same state: the
/// surgery wires the loss to the right values and folding changes nothing but rounding.
#[test]
fn supervised_graph_matches_the_training_graph() {
    let config = tiny_config();
    let (model, state) = deployed(&config);
    let det = DeployedDetector::from_model(&model, "tiny.onnx").unwrap();
    assert_eq!(det.config.image_size, 64);
    let trainable = det.trainable(&TrainSelection::Head).unwrap();
    assert!(trainable.iter().all(|n| n.starts_with("head.")));
    assert!(trainable.contains(&"head.cls_logits.weight".to_string()));
    let graph = det.supervised_graph(&trainable).unwrap();

    let (train, _) = config.training_graph(0).unwrap();
    let wrt: Vec<&str> = trainable.iter().map(String::as_str).collect();
    let mut reference = densa_exporter::autodiff::with_gradients(
        &train,
        &densa_exporter::autodiff::GradRequest::new(names::LOSS, &wrt),
    )
    .unwrap();
    // The training graph's initial values from `state`.
    for t in reference.graph.as_mut().unwrap().initializer.iter_mut() {
        if let Some(v) = state.get(&t.name) {
            *t = v.to_proto(&t.name);
        }
    }
    let backend = open_backend(BackendKind::Tract, &BackendOptions::default()).unwrap();
    let mut ours = backend.load_model(&graph, "adapt").unwrap();
    let mut theirs = backend.load_model(&reference, "train").unwrap();
    let (x, targets) = sample(&config, 1);
    let mut inputs = vec![("images".to_string(), det.image_input(x))];
    inputs.extend(targets);
    let values = det.values(&trainable).unwrap();
    let mut with_params = inputs.clone();
    with_params.extend(values);
    let a = ours.run(with_params).unwrap();
    let b = theirs.run(inputs).unwrap();
    let (la, lb) = (output(&a, "loss")[[]], output(&b, "loss")[[]]);
    assert!(la.is_finite() && la > 0.0);
    assert!(
        (la - lb).abs() <= 1e-4 * lb.abs().max(1.0),
        "loss {la} vs {lb}"
    );
    for name in [
        "head.cls_logits.weight",
        "head.bbox_pred.bias",
        "head.cls_tower.0.gn.weight",
    ] {
        let g = format!("grad.{name}");
        let (ga, gb) = (output(&a, &g), output(&b, &g));
        let scale = gb.iter().fold(0f32, |m, x| m.max(x.abs())).max(1e-6);
        let diff = (&ga - &gb).iter().fold(0f32, |m, x| m.max(x.abs()));
        assert!(
            diff <= 1e-3 * scale,
            "{g}: max diff {diff} at scale {scale}"
        );
    }
}

#[test]
fn writing_parameters_changes_only_those() {
    let config = tiny_config();
    let (model, _) = deployed(&config);
    let mut values = BTreeMap::new();
    values.insert(
        "head.centerness.bias".to_string(),
        Tensor::F32(ArrayD::from_elem(vec![1], 0.5)),
    );
    let out = with_parameters(&model, &values).unwrap();
    let (g0, g1) = (model.graph.as_ref().unwrap(), out.graph.as_ref().unwrap());
    assert_eq!(g0.node, g1.node);
    assert_eq!(g0.input, g1.input);
    assert_eq!(g0.output, g1.output);
    assert_eq!(model.metadata_props, out.metadata_props);
    for (a, b) in g0.initializer.iter().zip(&g1.initializer) {
        assert_eq!(a.name, b.name);
        assert_eq!(a == b, a.name != "head.centerness.bias", "{}", a.name);
    }
    values.insert(
        "head.centerness.bias".to_string(),
        Tensor::F32(ArrayD::from_elem(vec![2], 0.5)),
    );
    assert!(matches!(
        with_parameters(&model, &values),
        Err(AdaptError::Parameter { .. })
    ));
    values.clear();
    values.insert(
        "head.centerness.bias".to_string(),
        Tensor::F32(ArrayD::from_elem(vec![1], f32::NAN)),
    );
    assert!(with_parameters(&model, &values).is_err());
}

#[test]
fn selections_and_bad_models() {
    let sel: TrainSelection = "fpn.*,head.cls_logits".parse().unwrap();
    assert!(sel.selects("fpn.inner_blocks.0.0.weight"));
    assert!(sel.selects("head.cls_logits.bias"));
    assert!(!sel.selects("head.cls_logits_x.bias"));
    assert!(!sel.selects("layer1.0.conv1.weight"));
    assert!(glob_match("layer*.conv1.*", "layer2.0.conv1.bias"));
    assert!(!glob_match("layer*.conv1.*", "layer2.0.conv2.bias"));
    assert!("".parse::<TrainSelection>().is_err());

    let config = tiny_config();
    let (model, _) = deployed(&config);
    let det = DeployedDetector::from_model(&model, "m.onnx").unwrap();
    let none = TrainSelection::Patterns(vec!["nothing.*".into()]);
    let e = det.trainable(&none).unwrap_err().to_string();
    assert!(e.contains("m.onnx") && e.contains("nothing.*"), "{e}");

    let (backbone, _) = crate::export::backbone(
        crate::Arch::Edge,
        &crate::export::WeightOptions::default(),
        0,
    )
    .unwrap();
    let e = DeployedDetector::from_model(&backbone, "bb.onnx").unwrap_err();
    assert!(matches!(e, AdaptError::WrongTask { .. }), "{e}");
    let mut bare = model.clone();
    bare.metadata_props.retain(|p| p.key != SPEC_KEY);
    let e = DeployedDetector::from_model(&bare, "bare.onnx")
        .unwrap_err()
        .to_string();
    assert!(e.contains("bare.onnx") && e.contains("densa.spec"), "{e}");
    let e = bn_stats_graph(&model, "m.onnx").unwrap_err().to_string();
    assert!(e.contains("folded"), "{e}");
}

/// Batch-statistics re-estimation on a graph with two unfolded batch norms (the second one
/// sees the first one's output normalised by the batch statistics): against the same
/// computation on the host.
#[test]
fn bn_stats_match_the_host_computation() {
    let mut b = GraphBuilder::new("bn", 0);
    let x = b
        .input(
            "x",
            densa_exporter::DType::F32,
            vec![densa_exporter::Dim::from("N"), 2.into(), 3.into(), 3.into()],
        )
        .unwrap();
    let bn1 = crate::nn::BatchNorm2dConfig::new(2)
        .init(&mut b, "bn1")
        .unwrap();
    let y = bn1.forward(&mut b, &x).unwrap();
    let y = b.relu(&y);
    let bn2 = crate::nn::BatchNorm2dConfig::new(2)
        .init(&mut b, "bn2")
        .unwrap();
    let z = bn2.forward(&mut b, &y).unwrap();
    b.output(&z, "z").unwrap();
    let model = b.finish();
    let (graph, sites) = bn_stats_graph(&model, "bn.onnx").unwrap();
    assert_eq!(sites.len(), 2);
    let backend = open_backend(BackendKind::Tract, &BackendOptions::default()).unwrap();
    let mut s = backend.load_model(&graph, "bn").unwrap();
    let mut rng = ChaCha8Rng::seed_from_u64(4);
    let batches: Vec<ArrayD<f32>> = (0..3)
        .map(|_| ArrayD::from_shape_fn(vec![2, 2, 3, 3], |_| rng.random::<f32>() * 3.0 + 1.0))
        .collect();
    let mut stats = BatchNormStats::new(sites);
    for x in &batches {
        let outs = s.run(vec![("x".into(), Tensor::F32(x.clone()))]).unwrap();
        stats.add(&outs, 2).unwrap();
    }
    let got = stats.finish();
    // Host: per batch, bn1 with the batch's statistics (weight 1, bias 0, eps 1e-5), relu;
    // averaged batch means and mean squares over equal batches.
    let chan = |a: &ArrayD<f32>, c: usize| -> Vec<f64> {
        a.index_axis(ndarray::Axis(1), c)
            .iter()
            .map(|&v| v as f64)
            .collect()
    };
    for c in 0..2 {
        let (mut m1, mut s1, mut m2, mut s2) = (0.0, 0.0, 0.0, 0.0);
        for x in &batches {
            let v = chan(x, c);
            let mean = v.iter().sum::<f64>() / v.len() as f64;
            let sq = v.iter().map(|a| a * a).sum::<f64>() / v.len() as f64;
            let var = sq - mean * mean;
            let y: Vec<f64> = v
                .iter()
                .map(|a| ((a - mean) / (var + 1e-5).sqrt()).max(0.0))
                .collect();
            m1 += mean / 3.0;
            s1 += sq / 3.0;
            m2 += y.iter().sum::<f64>() / y.len() as f64 / 3.0;
            s2 += y.iter().map(|a| a * a).sum::<f64>() / y.len() as f64 / 3.0;
        }
        let close = |a: f32, b: f64| (a as f64 - b).abs() < 1e-4 * b.abs().max(1.0);
        let g = |n: &str| got[n].to_f32();
        assert!(close(g("bn1.running_mean")[[c]], m1));
        assert!(close(g("bn1.running_var")[[c]], s1 - m1 * m1));
        assert!(close(g("bn2.running_mean")[[c]], m2));
        assert!(close(g("bn2.running_var")[[c]], s2 - m2 * m2));
    }
}

/// An export with NMS in the graph (one CHW image in) adapts the same way: same loss as the
/// batched export for the same image and targets.
#[test]
fn nms_in_graph_exports_give_the_same_loss() {
    let config = tiny_config();
    let (model, state) = deployed(&config);
    let mut chw_spec = spec(&config);
    chw_spec.input.layout = InputLayout::Chw;
    chw_spec.output.host_nms = false;
    let toml = chw_spec.to_toml();
    let chw_model = config
        .inference_graph_with(Some(&state), 50, Some(0.6), &[(SPEC_KEY, toml.as_str())])
        .unwrap();
    let backend = open_backend(BackendKind::Tract, &BackendOptions::default()).unwrap();
    let (x, targets) = sample(&config, 2);
    let mut losses = Vec::new();
    for (m, chw) in [(&model, false), (&chw_model, true)] {
        let det = DeployedDetector::from_model(m, "m.onnx").unwrap();
        assert_eq!(det.chw, chw);
        let trainable = det.trainable(&TrainSelection::Head).unwrap();
        let graph = det.supervised_graph(&trainable).unwrap();
        let mut session = backend.load_model(&graph, "adapt").unwrap();
        let mut inputs = vec![("images".to_string(), det.image_input(x.clone()))];
        inputs.extend(targets.clone());
        inputs.extend(det.values(&trainable).unwrap());
        let outs = session.run(inputs).unwrap();
        losses.push(output(&outs, "loss")[[]]);
    }
    assert!(
        (losses[0] - losses[1]).abs() <= 1e-5 * losses[0].abs(),
        "{losses:?}"
    );
}

/// The consistency loss equals its formula computed on the host from the student's raw
/// outputs, and its gradient along a direction of `head.cls_logits.bias` matches central
/// finite differences.
#[test]
fn consistency_loss_matches_the_host_and_finite_differences() {
    let config = tiny_config();
    let (model, _) = deployed(&config);
    let det = DeployedDetector::from_model(&model, "m.onnx").unwrap();
    let trainable = det.trainable(&TrainSelection::Head).unwrap();
    let cc = ConsistencyConfig::default();
    let graph = det.consistency_graph(&trainable, &cc).unwrap();
    let backend = open_backend(BackendKind::Tract, &BackendOptions::default()).unwrap();
    let mut session = backend.load_model(&graph, "consistency").unwrap();
    let mut raw = backend
        .load_model(&det.raw_graph(&trainable).unwrap(), "raw")
        .unwrap();
    let (x, _) = sample(&config, 5);
    let l = config.assigner().locations();
    let c = config.num_classes();
    let mut rng = ChaCha8Rng::seed_from_u64(11);
    let mut rand = |shape: Vec<usize>, lo: f32, hi: f32| {
        ArrayD::from_shape_fn(shape, |_| lo + (hi - lo) * rng.random::<f32>())
    };
    let t_cls = rand(vec![1, l, c], 0.0, 1.0);
    let t_ctr = rand(vec![1, l], 0.0, 1.0);
    let t_box = rand(vec![1, l, 4], -1.0, 1.0);
    let params = det.values(&trainable).unwrap();
    let run = |session: &mut Box<dyn densa_runtime::Session>,
               params: &BTreeMap<String, Tensor>|
     -> Vec<(String, Tensor)> {
        let mut inputs = vec![("images".to_string(), det.image_input(x.clone()))];
        inputs.push((TEACHER_CLS.into(), Tensor::F32(t_cls.clone())));
        inputs.push((TEACHER_CTR.into(), Tensor::F32(t_ctr.clone())));
        inputs.push((TEACHER_BOX.into(), Tensor::F32(t_box.clone())));
        inputs.extend(params.clone());
        session.run(inputs).unwrap()
    };
    let outs = run(&mut session, &params);
    let loss = output(&outs, "loss")[[]] as f64;

    // Host formula.
    let mut raw_in = vec![("images".to_string(), det.image_input(x.clone()))];
    raw_in.extend(params.clone());
    let r = raw.run(raw_in).unwrap();
    let (s_cls, s_box, s_ctr) = (
        output(&r, &det.raw.cls),
        output(&r, &det.raw.box_log),
        output(&r, &det.raw.ctr),
    );
    let bce = |x: f64, t: f64| (1.0 + (-x.abs()).exp()).ln() + x.max(0.0) - x * t;
    let (mut w_sum, mut cls_sum, mut ctr_sum, mut box_sum) = (0.0, 0.0, 0.0, 0.0);
    for i in 0..l {
        let w = (0..c).map(|k| t_cls[[0, i, k]] as f64).fold(0.0, f64::max);
        w_sum += w;
        for k in 0..c {
            cls_sum += bce(s_cls[[0, i, k]] as f64, t_cls[[0, i, k]] as f64);
        }
        ctr_sum += w * bce(s_ctr[[0, i]] as f64, t_ctr[[0, i]] as f64);
        box_sum += w
            * (0..4)
                .map(|j| (s_box[[0, i, j]] as f64 - t_box[[0, i, j]] as f64).abs())
                .sum::<f64>();
    }
    let norm = w_sum.max(1.0);
    let host = (cls_sum + ctr_sum + cc.box_weight as f64 * box_sum) / norm;
    assert!(
        (loss - host).abs() <= 1e-4 * host,
        "graph {loss}, host {host}"
    );

    // Central differences along a fixed direction of one parameter.
    let name = "head.cls_logits.bias";
    let grad = output(&outs, &format!("grad.{name}"));
    let dir = ArrayD::from_shape_vec(vec![c], (0..c).map(|k| 1.0 - k as f32).collect()).unwrap();
    let eps = 1e-2f32;
    let mut at = |sign: f32| {
        let mut p = params.clone();
        let v = p[name].to_f32() + &(&dir * (sign * eps));
        p.insert(name.to_string(), Tensor::F32(v));
        output(&run(&mut session, &p), "loss")[[]] as f64
    };
    let fd = (at(1.0) - at(-1.0)) / (2.0 * eps as f64);
    let analytic: f64 = grad
        .iter()
        .zip(dir.iter())
        .map(|(g, d)| (g * d) as f64)
        .sum();
    assert!(
        analytic.abs() > 1e-2,
        "a gradient this small tests nothing: {analytic}"
    );
    assert!(
        (fd - analytic).abs() <= 2e-2 * analytic.abs().max(1e-3),
        "finite differences {fd}, gradient {analytic}"
    );
}

/// A model that kept its batch norms, trained through them (`--train all`: the batch norms
/// rewritten as constant-statistics arithmetic), gives the folded export's loss.
#[test]
fn unfolded_batch_norm_gives_the_folded_loss() {
    let config = tiny_config();
    let (folded, state) = deployed(&config);
    let toml = spec(&config).to_toml();
    let unfolded = config
        .inference_graph_bn(Some(&state), 50, None, &[(SPEC_KEY, toml.as_str())], false)
        .unwrap();
    assert!(unfolded
        .graph
        .as_ref()
        .unwrap()
        .node
        .iter()
        .any(|n| n.op_type == "BatchNormalization"));
    let backend = open_backend(BackendKind::Tract, &BackendOptions::default()).unwrap();
    let (x, targets) = sample(&config, 7);
    let mut losses = Vec::new();
    for m in [&folded, &unfolded] {
        let det = DeployedDetector::from_model(m, "m.onnx").unwrap();
        let trainable = det.trainable(&TrainSelection::All).unwrap();
        let graph = det.supervised_graph(&trainable).unwrap();
        let mut session = backend.load_model(&graph, "adapt").unwrap();
        let mut inputs = vec![("images".to_string(), det.image_input(x.clone()))];
        inputs.extend(targets.clone());
        inputs.extend(det.values(&trainable).unwrap());
        let outs = session.run(inputs).unwrap();
        losses.push(output(&outs, "loss")[[]]);
    }
    assert!(
        (losses[0] - losses[1]).abs() <= 1e-4 * losses[0].abs(),
        "{losses:?}"
    );
}

/// The pretext objectives (`--method pixpro|densecl`): the trainable parameters are exactly the
/// backbone's (upstream of its last stage), and each loss equals a direct host computation
/// from the student's features and the teacher's keys, with gradients matching central
/// differences.
#[test]
fn dense_objectives_match_the_host_and_finite_differences() {
    let config = tiny_config();
    let (model, _) = deployed(&config);
    let feature = backbone_feature(&model, "m.onnx").unwrap();
    let all: Vec<String> = parameters_of(&model).unwrap().into_keys().collect();
    let trainable = upstream_parameters(&model, &feature, &all);
    assert!(trainable.contains(&"conv1.weight".to_string()));
    assert!(trainable.iter().any(|p| p.starts_with("layer4.")));
    assert!(
        trainable
            .iter()
            .all(|p| !p.starts_with("head.") && !p.starts_with("fpn.")),
        "{trainable:?}"
    );
    let backend = open_backend(BackendKind::Tract, &BackendOptions::default()).unwrap();
    let params: BTreeMap<String, Tensor> = parameters_of(&model)
        .unwrap()
        .into_iter()
        .filter(|(n, _)| trainable.contains(n))
        .collect();
    let (x, _) = sample(&config, 7);
    let image = Tensor::F32(x.insert_axis(ndarray::Axis(0)).into_dyn());
    let mut feat_session = backend
        .load_model(
            &feature_graph(&model, "m.onnx", &trainable, &feature).unwrap(),
            "features",
        )
        .unwrap();
    let mut inputs = vec![("images".to_string(), image.clone())];
    inputs.extend(params.clone());
    let f = output(&feat_session.run(inputs).unwrap(), &feature);
    let (c, h, w) = (f.shape()[1], f.shape()[2], f.shape()[3]);
    let s = h * w;
    assert!(s >= 4, "a {h}x{w} feature map");
    let mut rng = ChaCha8Rng::seed_from_u64(21);
    let keys = ArrayD::from_shape_fn(vec![1, c, s], |_| rng.random::<f32>() * 2.0 - 1.0);

    // Host: cells as f64 unit vectors.
    let cell = |a: &ArrayD<f32>, j: usize, four: bool| -> Vec<f64> {
        let v: Vec<f64> = (0..c)
            .map(|k| {
                if four {
                    a[[0, k, j / w, j % w]] as f64
                } else {
                    a[[0, k, j]] as f64
                }
            })
            .collect();
        let n = v.iter().map(|x| x * x).sum::<f64>().sqrt().max(1e-12);
        v.into_iter().map(|x| x / n).collect()
    };
    let dot = |a: &[f64], b: &[f64]| a.iter().zip(b).map(|(x, y)| x * y).sum::<f64>();
    let xs: Vec<Vec<f64>> = (0..s).map(|j| cell(&f, j, true)).collect();
    let ks: Vec<Vec<f64>> = (0..s).map(|j| cell(&keys, j, false)).collect();

    for objective in [
        DenseObjective::named("pixpro").unwrap(),
        DenseObjective::named("densecl").unwrap(),
    ] {
        let mut pos = ArrayD::<f32>::zeros(vec![1, s, s]);
        match objective {
            DenseObjective::PixPro { .. } => {
                for i in 0..s {
                    for j in 0..s {
                        pos[[0, i, j]] = f32::from((i * 3 + j) % 3 == 0);
                    }
                }
            }
            DenseObjective::DenseCl { .. } => {
                for i in 0..s {
                    pos[[0, i, (i * 5 + 1) % s]] = 1.0;
                }
            }
        }
        let host = match objective {
            DenseObjective::PixPro { gamma, .. } => {
                let mut sum = 0.0;
                for i in 0..s {
                    let mut y = vec![0.0; c];
                    for j in 0..s {
                        let a = dot(&xs[i], &xs[j]).max(0.0).powf(gamma as f64);
                        for k in 0..c {
                            y[k] += a * xs[j][k];
                        }
                    }
                    let n = dot(&y, &y).sqrt();
                    for j in 0..s {
                        sum += pos[[0, i, j]] as f64 * dot(&y, &ks[j]) / n;
                    }
                }
                -sum / (pos.sum() as f64 + 1e-6)
            }
            DenseObjective::DenseCl { tau } => {
                let mut sum = 0.0;
                for i in 0..s {
                    let l: Vec<f64> = (0..s).map(|j| dot(&xs[i], &ks[j]) / tau as f64).collect();
                    let m = l.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                    let lse = m + l.iter().map(|v| (v - m).exp()).sum::<f64>().ln();
                    for j in 0..s {
                        sum += pos[[0, i, j]] as f64 * (l[j] - lse);
                    }
                }
                -sum / s as f64
            }
        };
        let graph =
            dense_consistency_graph(&model, "m.onnx", &trainable, &feature, [c, h, w], objective)
                .unwrap();
        let mut session = backend.load_model(&graph, "dense").unwrap();
        let mut run = |p: &BTreeMap<String, Tensor>| {
            let mut inputs = vec![
                ("images".to_string(), image.clone()),
                (TEACHER_KEYS.to_string(), Tensor::F32(keys.clone())),
                (POSITIVES.to_string(), Tensor::F32(pos.clone())),
            ];
            inputs.extend(p.clone());
            session.run(inputs).unwrap()
        };
        let outs = run(&params);
        let loss = output(&outs, "loss")[[]] as f64;
        assert!(
            (loss - host).abs() <= 1e-4 * host.abs().max(1e-3),
            "{objective:?}: graph {loss}, host {host}"
        );
        let name = trainable
            .iter()
            .rev()
            .find(|p| p.ends_with(".weight"))
            .unwrap()
            .clone();
        let grad = output(&outs, &format!("grad.{name}"));
        let mut drng = ChaCha8Rng::seed_from_u64(5);
        let dir = grad.mapv(|_| drng.random::<f32>() - 0.5);
        let eps = 2e-3f32;
        let mut at = |sign: f32| {
            let mut p = params.clone();
            let v = p[&name].to_f32() + &(&dir * (sign * eps));
            p.insert(name.clone(), Tensor::F32(v));
            output(&run(&p), "loss")[[]] as f64
        };
        let fd = (at(1.0) - at(-1.0)) / (2.0 * eps as f64);
        let analytic: f64 = grad
            .iter()
            .zip(dir.iter())
            .map(|(g, d)| (g * d) as f64)
            .sum();
        assert!(
            analytic.abs() > 1e-3,
            "{objective:?}: a gradient this small tests nothing: {analytic}"
        );
        assert!(
            (fd - analytic).abs() <= 3e-2 * analytic.abs(),
            "{objective:?} on {name}: finite differences {fd}, gradient {analytic}"
        );
    }
}

/// A deployed classifier (`densa train`'s `model.onnx`): `head` is `fc`, the supervised loss is
/// the host cross-entropy of its logits and the consistency loss the host soft cross-entropy
/// against given teacher probabilities.
#[test]
fn classifier_losses_match_the_host() {
    let mut config = crate::train_step::ClassifierConfig::new(crate::Arch::Edge, 3);
    config.image_size = 32;
    let weights = crate::export::WeightOptions {
        state_dict: None,
        strip_prefix: None,
    };
    let (eval, _) = crate::train_step::classifier_graph(&config, &weights, false).unwrap();
    let eval = eval.builder.finish();
    let classes: Vec<String> = ["a", "b", "c"].iter().map(|s| s.to_string()).collect();
    let model = crate::train_step::deployed_classifier(
        &eval,
        &densa_exporter::weights::StateDict::new(),
        "resnet-edge",
        &classes,
        32,
    )
    .unwrap();
    let clf = DeployedClassifier::from_model(&model, "c.onnx").unwrap();
    assert_eq!(clf.classes, classes);
    assert_eq!(clf.image.size, 32);
    let head = clf.trainable(&TrainSelection::Head).unwrap();
    assert_eq!(head, vec!["fc.bias".to_string(), "fc.weight".to_string()]);
    let backend = open_backend(BackendKind::Tract, &BackendOptions::default()).unwrap();
    let params = clf.values(&head).unwrap();
    let mut rng = ChaCha8Rng::seed_from_u64(3);
    let x = ArrayD::from_shape_fn(vec![2, 3, 32, 32], |_| rng.random::<f32>() * 2.0 - 1.0);
    let with = |extra: Vec<(String, Tensor)>| {
        let mut inputs = vec![(clf.input.clone(), Tensor::F32(x.clone()))];
        inputs.extend(params.clone());
        inputs.extend(extra);
        inputs
    };
    let logits = output(
        &backend
            .load_model(&clf.logits_graph(&head).unwrap(), "logits")
            .unwrap()
            .run(with(vec![]))
            .unwrap(),
        LOGITS,
    );
    let log_softmax = |n: usize, k: usize| {
        let row: Vec<f64> = (0..3).map(|j| logits[[n, j]] as f64).collect();
        let m = row.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        row[k] - m - row.iter().map(|v| (v - m).exp()).sum::<f64>().ln()
    };
    let labels = [2i64, 0];
    let sup = output(
        &backend
            .load_model(&clf.supervised_graph(&head).unwrap(), "sup")
            .unwrap()
            .run(with(vec![(
                CLASS_LABELS.into(),
                Tensor::I64(ArrayD::from_shape_vec(vec![2], labels.to_vec()).unwrap()),
            )]))
            .unwrap(),
        "loss",
    )[[]] as f64;
    let host_sup = -(log_softmax(0, 2) + log_softmax(1, 0)) / 2.0;
    assert!(
        (sup - host_sup).abs() <= 1e-5 * host_sup.abs().max(1.0),
        "{sup} vs {host_sup}"
    );
    let p = ArrayD::from_shape_vec(vec![2, 3], vec![0.2f32, 0.5, 0.3, 0.7, 0.1, 0.2]).unwrap();
    let cons = output(
        &backend
            .load_model(&clf.consistency_graph(&head).unwrap(), "cons")
            .unwrap()
            .run(with(vec![(TEACHER_PROBS.into(), Tensor::F32(p.clone()))]))
            .unwrap(),
        "loss",
    )[[]] as f64;
    let host_cons = -(0..2)
        .map(|n| {
            (0..3)
                .map(|k| p[[n, k]] as f64 * log_softmax(n, k))
                .sum::<f64>()
        })
        .sum::<f64>()
        / 2.0;
    assert!(
        (cons - host_cons).abs() <= 1e-5 * host_cons.abs().max(1.0),
        "{cons} vs {host_cons}"
    );
}
