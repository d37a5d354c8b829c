//! `densa adapt --method pixpro|densecl`: a pretext method's dense objective on the backbone
//! features of any densa export (detector, segmenter, classifier), with a momentum teacher
//! ([`densa_models::adapt::dense_consistency_graph`] has the objectives and our choices).
//!
//! Each image gives two views: random resized crops (area 0.3-1 of the serving view, as the
//! methods' crops) at the model's input size, each flipped with probability 0.5 and
//! photometrically perturbed. The student sees one (drawn at random), the teacher the other;
//! PixPro's positives come from the crops' geometry, DenseCL's from the teacher's features of
//! both views.

use std::collections::BTreeMap;

use anyhow::{bail, Context, Result};
use densa_exporter::onnx::ModelProto;
use densa_exporter::Tensor;
use densa_models::adapt::{
    backbone_feature, dense_consistency_graph, feature_graph, parameters_of, select,
    upstream_parameters, with_parameters, DenseObjective, POSITIVES, TEACHER_KEYS,
};
use densa_runtime::augment::geometry::{
    pixpro_positive_mask, DistanceFrame, FeatureGrid, ViewGeometry,
};
use densa_runtime::augment::spatial::{resized_crop, RandomResizedCropConfig};
use densa_runtime::Backend;
use ndarray::{Array3, ArrayD, Axis, IxDyn};
use rand::{RngExt, SeedableRng};
use rand_chacha::ChaCha8Rng;

use super::adapt::{adaptation_loop, grads_of, param_inputs, perturb, AdaptArgs};

/// What a task gives the dense adaptation: the model, its image input and normalisation, and
/// how to load item `i` as the serving view `[3, S, S]` (normalised).
pub(super) struct DenseTask<'a> {
    pub model: &'a ModelProto,
    pub label: &'a str,
    pub input: String,
    pub mean: [f32; 3],
    pub std: [f32; 3],
    /// NCHW input (`[1, 3, S, S]`) rather than one CHW image.
    pub batched: bool,
    pub items: usize,
    pub load: &'a dyn Fn(usize) -> Result<Array3<f32>>,
}

/// What [`adapt_dense`] returns.
pub(super) struct DenseOutcome {
    pub adapted: ModelProto,
    /// Mean loss of each step.
    pub losses: Vec<f64>,
    /// The parameters trained.
    pub trainable: Vec<String>,
    /// Their number of values.
    pub values: usize,
    /// Seconds of the adaptation loop.
    pub seconds: f64,
}

/// Adapts `task.model` with `objective`.
pub(super) fn adapt_dense(
    args: &AdaptArgs,
    task: &DenseTask,
    objective: DenseObjective,
    backend: &dyn Backend,
) -> Result<DenseOutcome> {
    let feature = backbone_feature(task.model, task.label)?;
    let all: Vec<String> = parameters_of(task.model)?.into_keys().collect();
    let candidates = match &args.train {
        Some(sel) => select(&all, sel, task.label)?,
        None => all,
    };
    let trainable = upstream_parameters(task.model, &feature, &candidates);
    if trainable.is_empty() {
        bail!(
            "{}: --train {} selects no parameter the backbone features (`{feature}`) depend on; \
             the pretext objectives train the backbone (leave --train out, or give `all` or \
             backbone names such as `layer4.*`)",
            task.label,
            args.selection()
        );
    }
    let values = parameters_of(task.model)?;
    let mut params: BTreeMap<String, ArrayD<f32>> = trainable
        .iter()
        .map(|n| (n.clone(), values[n].to_f32()))
        .collect();
    let count = params.values().map(|a| a.len()).sum();

    let mut teacher_session = backend.load_model(
        &feature_graph(task.model, task.label, &trainable, &feature)?,
        "teacher feature graph",
    )?;
    let as_input = |x: Array3<f32>| -> Tensor {
        if task.batched {
            Tensor::F32(x.insert_axis(Axis(0)).into_dyn())
        } else {
            Tensor::F32(x.into_dyn())
        }
    };
    // The feature's shape, from one teacher run.
    let probe = (task.load)(0)?;
    let size = probe.shape()[1] as u32;
    let mut t_in = param_inputs(&params);
    t_in.push((task.input.clone(), as_input(probe)));
    let f = teacher_feature(teacher_session.run(t_in)?, &feature)?;
    let [c, h, w] = match f.shape() {
        [1, c, h, w] => [*c, *h, *w],
        other => bail!(
            "{}: the backbone feature `{feature}` is {other:?}, expected [1, C, H, W]",
            task.label
        ),
    };
    let graph = dense_consistency_graph(
        task.model,
        task.label,
        &trainable,
        &feature,
        [c, h, w],
        objective,
    )
    .context("building the dense adaptation graph")?;
    let mut student = backend.load_model(&graph, "dense adaptation graph")?;
    let grid = FeatureGrid::new(h, w, size as f32 / h as f32);
    let crop = RandomResizedCropConfig {
        size: (size, size),
        scale: (0.3, 1.0),
        ratio: (3.0 / 4.0, 4.0 / 3.0),
    };
    let teacher = std::cell::RefCell::new(params.clone());
    let mut rng = ChaCha8Rng::seed_from_u64(args.seed ^ 0xde75e);
    let order: Vec<usize> = (0..task.items).collect();
    let one = |i: usize,
               rng: &mut ChaCha8Rng,
               params: &BTreeMap<String, ArrayD<f32>>,
               sum: &mut BTreeMap<String, ArrayD<f32>>|
     -> Result<f64> {
        let serving = (task.load)(i)?;
        let rgb = to_rgb(&serving, task.mean, task.std);
        let view = |rng: &mut ChaCha8Rng| {
            let b = crop.sample(size, size, rng);
            let flipped = rng.random::<bool>();
            let img = resized_crop(&rgb, &b, (size, size), flipped);
            let x = perturb(
                &from_rgb(&img, task.mean, task.std),
                task.mean,
                task.std,
                rng,
            );
            let geometry = ViewGeometry {
                crop: b,
                flipped,
                out_size: (size, size),
                image_size: (size, size),
            };
            (x, geometry)
        };
        let (x_s, g_s) = view(rng);
        let (x_t, g_t) = view(rng);
        let mut teacher_run = |x: &Array3<f32>| -> Result<ArrayD<f32>> {
            let mut t_in = param_inputs(&teacher.borrow());
            t_in.push((task.input.clone(), as_input(x.clone())));
            let f = teacher_feature(teacher_session.run(t_in)?, &feature)?;
            Ok(f.into_shape_with_order(IxDyn(&[1, c, h * w]))?)
        };
        let keys = teacher_run(&x_t)?;
        let s2 = h * w;
        let mut pos = ArrayD::<f32>::zeros(IxDyn(&[1, s2, s2]));
        match objective {
            DenseObjective::PixPro { pos_ratio, .. } => {
                let mask = pixpro_positive_mask(
                    &g_s,
                    grid,
                    &g_t,
                    grid,
                    pos_ratio,
                    DistanceFrame::OriginalPixels,
                );
                for ((a, b), &m) in mask.indexed_iter() {
                    pos[[0, a, b]] = if m { 1.0 } else { 0.0 };
                }
            }
            DenseObjective::DenseCl { .. } => {
                let own = teacher_run(&x_s)?;
                for a in 0..s2 {
                    let best = best_match(&own, &keys, a);
                    pos[[0, a, best]] = 1.0;
                }
            }
        }
        let mut s_in = param_inputs(params);
        s_in.push((task.input.clone(), as_input(x_s)));
        s_in.push((TEACHER_KEYS.into(), Tensor::F32(keys)));
        s_in.push((POSITIVES.into(), Tensor::F32(pos)));
        let outs = student
            .run(s_in)
            .context("running the dense adaptation graph")?;
        grads_of(outs, sum)
    };
    let m = args.teacher_momentum;
    let ema = |params: &BTreeMap<String, ArrayD<f32>>| {
        super::adapt::ema_update(&mut teacher.borrow_mut(), params, m)
    };
    let (losses, seconds) = adaptation_loop(args, &mut params, &order, &mut rng, one, ema)?;
    let new: BTreeMap<String, Tensor> = params
        .into_iter()
        .map(|(n, a)| (n, Tensor::F32(a)))
        .collect();
    Ok(DenseOutcome {
        adapted: with_parameters(task.model, &new)?,
        losses,
        trainable,
        values: count,
        seconds,
    })
}

fn teacher_feature(outs: Vec<(String, Tensor)>, feature: &str) -> Result<ArrayD<f32>> {
    outs.into_iter()
        .find(|(n, _)| n == feature)
        .map(|(_, t)| t.to_f32())
        .with_context(|| format!("the teacher graph gave no `{feature}`"))
}

/// The cell `j` of `keys [1, C, S]` of greatest cosine similarity with cell `a` of
/// `own [1, C, S]`.
fn best_match(own: &ArrayD<f32>, keys: &ArrayD<f32>, a: usize) -> usize {
    let c = own.shape()[1];
    let s = keys.shape()[2];
    let norm = |v: &ArrayD<f32>, j: usize| {
        (0..c)
            .map(|k| v[[0, k, j]] * v[[0, k, j]])
            .sum::<f32>()
            .sqrt()
            .max(1e-12)
    };
    let na = norm(own, a);
    let mut best = (0, f32::NEG_INFINITY);
    for j in 0..s {
        let dot: f32 = (0..c).map(|k| own[[0, k, a]] * keys[[0, k, j]]).sum();
        let cos = dot / (na * norm(keys, j));
        if cos > best.1 {
            best = (j, cos);
        }
    }
    best.0
}

/// A normalised `[3, S, S]` image back to 8-bit RGB.
fn to_rgb(x: &Array3<f32>, mean: [f32; 3], std: [f32; 3]) -> image::RgbImage {
    let (h, w) = (x.shape()[1], x.shape()[2]);
    image::RgbImage::from_fn(w as u32, h as u32, |u, v| {
        let px = |c: usize| {
            ((x[[c, v as usize, u as usize]] * std[c] + mean[c]).clamp(0.0, 1.0) * 255.0).round()
                as u8
        };
        image::Rgb([px(0), px(1), px(2)])
    })
}

/// 8-bit RGB to a normalised `[3, S, S]` input.
fn from_rgb(img: &image::RgbImage, mean: [f32; 3], std: [f32; 3]) -> Array3<f32> {
    let (w, h) = img.dimensions();
    Array3::from_shape_fn((3, h as usize, w as usize), |(c, y, x)| {
        (img.get_pixel(x as u32, y as u32)[c] as f32 / 255.0 - mean[c]) / std[c]
    })
}
