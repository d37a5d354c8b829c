//! `densa adapt` on a deployed classifier (`model.onnx` of `densa train`): the device's images
//! in class subfolders named as the model's classes (labeled), or any folder of images
//! (unlabeled).
//!
//! - `--method supervised`: cross-entropy on the labeled images (stretched to the input size as
//!   `densa train` does, random horizontal flip);
//! - `--method consistency`: Mean Teacher on the predictions (student on a photometrically
//!   perturbed view, momentum teacher on the plain one);
//! - `--method bn-stats`: the classifier keeps its `BatchNormalization` nodes, so statistics can
//!   be re-estimated on the device's images.
//!
//! Accuracy before and after is measured on `--val-data` (a class-subfolder folder) or on the
//! labeled adaptation images.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use densa_exporter::onnx::ModelProto;
use densa_exporter::Tensor;
use densa_models::adapt::{
    with_parameters, DeployedClassifier, ImageMeta, CLASS_LABELS, LOGITS, TEACHER_PROBS,
};
use densa_runtime::data::image::{is_image_file, read_rgb};
use densa_runtime::Backend;
use ndarray::{Array3, ArrayD, Axis};
use rand::{RngExt, SeedableRng};
use rand_chacha::ChaCha8Rng;

use super::adapt::{
    adaptation_loop, bn_stats, choose_subset, grads_of, param_inputs, peak_memory_mb, perturb,
    save_model, AdaptArgs, AdaptReport, Labels, Method, Scores,
};
use super::adapt_dense::{adapt_dense, DenseTask};

/// One image of the device's data and its class index in the model (when labeled).
#[derive(Clone, Debug)]
struct Item {
    path: PathBuf,
    label: Option<usize>,
}

/// Adapts the classifier `model` (named `label`) as `args` say; writes the adapted model and
/// returns the report (the caller writes it).
pub(super) fn adapt(args: &AdaptArgs, model: &ModelProto, label: &str) -> Result<AdaptReport> {
    let clf = DeployedClassifier::from_model(model, label)?;
    let started = Instant::now();
    let labeled = match args.labels {
        Labels::Coco => bail!(
            "--labels coco: {label} is a classifier; label its images with class subfolders \
             (--labels folders)"
        ),
        Labels::None => false,
        Labels::Folders => true,
        Labels::Auto => has_subfolders(&args.data)?,
    };
    let method = Method::parse(
        args.method.as_deref(),
        labeled,
        "put the images in class subfolders named as the model's classes (--labels folders)",
    )?;
    let items = if labeled {
        labeled_items(&args.data, &clf.classes)?
    } else {
        unlabeled_items(&args.data)?
    };
    let subset: Vec<Item> = choose_subset(items.len(), args.max_images, args.seed)
        .into_iter()
        .map(|i| items[i].clone())
        .collect();
    if subset.is_empty() {
        bail!("{}: no images", args.data.display());
    }
    let eval_set: Option<(Vec<Item>, String)> = if args.no_eval {
        None
    } else if let Some(v) = &args.val_data {
        Some((labeled_items(v, &clf.classes)?, v.display().to_string()))
    } else if labeled {
        Some((
            subset.clone(),
            format!("{} (the adaptation images)", args.data.display()),
        ))
    } else {
        None
    };
    let backend = densa_runtime::open_backend(args.backend.backend, &args.backend.options())?;
    let meta = clf.image;
    let load = |item: &Item| -> Result<Array3<f32>> {
        let img =
            read_rgb(&item.path).with_context(|| format!("reading {}", item.path.display()))?;
        Ok(stretch_input(&img, &meta))
    };

    let (adapted, losses, trainable, values_count, loop_seconds) = if method == Method::BnStats {
        let order: Vec<usize> = (0..subset.len()).collect();
        let (adapted, names, count) = bn_stats(
            args,
            model,
            label,
            backend.as_ref(),
            &clf.input,
            &order,
            |i| load(&subset[i]),
        )?;
        let seconds = started.elapsed().as_secs_f64();
        (adapted, Vec::new(), names, count, seconds)
    } else if let Some(objective) = method.dense_objective() {
        let load_item = |i: usize| load(&subset[i]);
        let task = DenseTask {
            model,
            label,
            input: clf.input.clone(),
            mean: meta.mean,
            std: meta.std,
            batched: true,
            items: subset.len(),
            load: &load_item,
        };
        let o = adapt_dense(args, &task, objective, backend.as_ref())?;
        (o.adapted, o.losses, o.trainable, o.values, o.seconds)
    } else {
        let trainable = clf.trainable(&args.selection())?;
        let mut params: BTreeMap<String, ArrayD<f32>> = clf
            .values(&trainable)?
            .into_iter()
            .map(|(n, t)| (n, t.to_f32()))
            .collect();
        let count = params.values().map(|a| a.len()).sum();
        let (losses, seconds) = match method {
            Method::Supervised => supervised(
                args,
                &clf,
                &trainable,
                &mut params,
                backend.as_ref(),
                &subset,
                &load,
            )?,
            Method::Consistency => consistency(
                args,
                &clf,
                &trainable,
                &mut params,
                backend.as_ref(),
                &subset,
                &load,
            )?,
            Method::BnStats | Method::Pixpro | Method::Densecl => {
                unreachable!("handled above")
            }
        };
        let new: BTreeMap<String, Tensor> = params
            .into_iter()
            .map(|(n, a)| (n, Tensor::F32(a)))
            .collect();
        (
            with_parameters(model, &new)?,
            losses,
            trainable,
            count,
            seconds,
        )
    };
    let seconds = started.elapsed().as_secs_f64();
    let peak = peak_memory_mb();
    save_model(args, &adapted)?;

    let (before, after) = match &eval_set {
        Some((items, name)) => {
            let score = |m: &ModelProto, what: &str| -> Result<Scores> {
                accuracy(m, &clf.input, backend.as_ref(), items, &load)
                    .with_context(|| format!("scoring the {what} model on {name}"))
            };
            (
                Some(score(model, "deployed")?),
                Some(score(&adapted, "adapted")?),
            )
        }
        None => (None, None),
    };
    let steps = losses.len() as u64;
    Ok(AdaptReport {
        model: args.model.display().to_string(),
        out: args.out.display().to_string(),
        method,
        train: args.trained(method),
        trainable_tensors: trainable.len(),
        trainable_values: values_count,
        images: subset.len(),
        steps,
        batch: args.batch,
        lr: args.lr,
        seed: args.seed,
        backend: backend.name().to_string(),
        seconds_per_step: if steps > 0 {
            loop_seconds / steps as f64
        } else {
            0.0
        },
        losses,
        seconds,
        peak_memory_mb: peak,
        eval_data: eval_set.as_ref().map(|e| e.1.clone()),
        before,
        after,
    })
}

/// The image as the classifier's input `[3, S, S]`: resized to `S x S` (bilinear, aspect not
/// kept, as `densa train`), `(x / 255 - mean) / std`.
pub(super) fn stretch_input(img: &image::RgbImage, meta: &ImageMeta) -> Array3<f32> {
    let size = meta.size;
    let img = if img.dimensions() == (size, size) {
        img.clone()
    } else {
        image::imageops::resize(img, size, size, image::imageops::FilterType::Triangle)
    };
    let s = size as usize;
    Array3::from_shape_fn((3, s, s), |(c, y, x)| {
        let v = img.get_pixel(x as u32, y as u32)[c] as f32 / 255.0;
        (v - meta.mean[c]) / meta.std[c]
    })
}

fn subfolders(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).with_context(|| format!("listing {}", dir.display()))? {
        let p = e
            .with_context(|| format!("listing {}", dir.display()))?
            .path();
        if p.is_dir() {
            out.push(p);
        }
    }
    out.sort();
    Ok(out)
}

fn has_subfolders(dir: &Path) -> Result<bool> {
    if !dir.is_dir() {
        bail!(
            "--data {}: not a folder (a classifier adapts on a folder of images)",
            dir.display()
        );
    }
    Ok(!subfolders(dir)?.is_empty())
}

fn images_in(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).with_context(|| format!("listing {}", dir.display()))? {
        let p = e
            .with_context(|| format!("listing {}", dir.display()))?
            .path();
        if p.is_file() && is_image_file(&p) {
            out.push(p);
        }
    }
    out.sort();
    Ok(out)
}

/// `dir/<class>/*.{png,jpg,...}`: every subfolder must be one of `classes` (the model's).
fn labeled_items(dir: &Path, classes: &[String]) -> Result<Vec<Item>> {
    if !dir.is_dir() {
        bail!("{}: not a folder of class subfolders", dir.display());
    }
    let mut items = Vec::new();
    for sub in subfolders(dir)? {
        let name = sub
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let Some(label) = classes.iter().position(|c| *c == name) else {
            bail!(
                "{}: subfolder `{name}` is not a class of the model (its classes: {})",
                dir.display(),
                classes.join(", ")
            );
        };
        items.extend(images_in(&sub)?.into_iter().map(|path| Item {
            path,
            label: Some(label),
        }));
    }
    if items.is_empty() {
        bail!(
            "{}: no images in class subfolders (expected {}/<class>/*.png)",
            dir.display(),
            dir.display()
        );
    }
    Ok(items)
}

/// Every image under `dir` (recursively), unlabeled.
fn unlabeled_items(dir: &Path) -> Result<Vec<Item>> {
    if !dir.is_dir() {
        bail!("--data {}: not a folder of images", dir.display());
    }
    let mut items = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        items.extend(
            images_in(&d)?
                .into_iter()
                .map(|path| Item { path, label: None }),
        );
        stack.extend(subfolders(&d)?);
    }
    items.sort_by(|a, b| a.path.cmp(&b.path));
    Ok(items)
}

fn flip(x: Array3<f32>) -> Array3<f32> {
    let mut x = x;
    x.invert_axis(Axis(2));
    x.as_standard_layout().to_owned()
}

fn batch_of_one(x: Array3<f32>) -> Tensor {
    Tensor::F32(x.insert_axis(Axis(0)).into_dyn())
}

fn supervised(
    args: &AdaptArgs,
    clf: &DeployedClassifier,
    trainable: &[String],
    params: &mut BTreeMap<String, ArrayD<f32>>,
    backend: &dyn Backend,
    items: &[Item],
    load: &dyn Fn(&Item) -> Result<Array3<f32>>,
) -> Result<(Vec<f64>, f64)> {
    let graph = clf
        .supervised_graph(trainable)
        .context("building the adaptation graph")?;
    let mut session = backend.load_model(&graph, "adaptation graph")?;
    let mut rng = ChaCha8Rng::seed_from_u64(args.seed ^ 0x5eed);
    let order: Vec<usize> = (0..items.len()).collect();
    let one = |i: usize,
               rng: &mut ChaCha8Rng,
               params: &BTreeMap<String, ArrayD<f32>>,
               sum: &mut BTreeMap<String, ArrayD<f32>>|
     -> Result<f64> {
        let item = &items[i];
        let mut x = load(item)?;
        if rng.random::<bool>() {
            x = flip(x);
        }
        let label = item
            .label
            .context("an unlabeled image in supervised adaptation")?;
        let mut inputs = param_inputs(params);
        inputs.push((clf.input.clone(), batch_of_one(x)));
        inputs.push((
            CLASS_LABELS.into(),
            Tensor::I64(ArrayD::from_elem(vec![1], label as i64)),
        ));
        let outs = session
            .run(inputs)
            .context("running the adaptation graph")?;
        grads_of(outs, sum)
    };
    adaptation_loop(args, params, &order, &mut rng, one, |_| {})
}

fn softmax_rows(logits: ArrayD<f32>) -> ArrayD<f32> {
    let mut p = logits;
    for mut row in p.axis_iter_mut(Axis(0)) {
        let m = row.fold(f32::NEG_INFINITY, |a, &b| a.max(b));
        row.mapv_inplace(|v| (v - m).exp());
        let s = row.sum();
        row.mapv_inplace(|v| v / s);
    }
    p
}

fn consistency(
    args: &AdaptArgs,
    clf: &DeployedClassifier,
    trainable: &[String],
    params: &mut BTreeMap<String, ArrayD<f32>>,
    backend: &dyn Backend,
    items: &[Item],
    load: &dyn Fn(&Item) -> Result<Array3<f32>>,
) -> Result<(Vec<f64>, f64)> {
    let graph = clf
        .consistency_graph(trainable)
        .context("building the consistency graph")?;
    let mut student = backend.load_model(&graph, "consistency graph")?;
    let mut teacher_session = backend.load_model(&clf.logits_graph(trainable)?, "teacher graph")?;
    let teacher = std::cell::RefCell::new(params.clone());
    let mut rng = ChaCha8Rng::seed_from_u64(args.seed ^ 0x7eac);
    let (mean, std) = (clf.image.mean, clf.image.std);
    let order: Vec<usize> = (0..items.len()).collect();
    let one = |i: usize,
               rng: &mut ChaCha8Rng,
               params: &BTreeMap<String, ArrayD<f32>>,
               sum: &mut BTreeMap<String, ArrayD<f32>>|
     -> Result<f64> {
        let weak = load(&items[i])?;
        let strong = perturb(&weak, mean, std, rng);
        let mut t_in = param_inputs(&teacher.borrow());
        t_in.push((clf.input.clone(), batch_of_one(weak)));
        let logits = teacher_session
            .run(t_in)
            .context("running the teacher")?
            .into_iter()
            .find(|(n, _)| n == LOGITS)
            .context("the teacher graph gave no `logits`")?
            .1
            .to_f32();
        let mut s_in = param_inputs(params);
        s_in.push((clf.input.clone(), batch_of_one(strong)));
        s_in.push((TEACHER_PROBS.into(), Tensor::F32(softmax_rows(logits))));
        let outs = student.run(s_in).context("running the consistency graph")?;
        grads_of(outs, sum)
    };
    let m = args.teacher_momentum;
    let ema = |params: &BTreeMap<String, ArrayD<f32>>| {
        super::adapt::ema_update(&mut teacher.borrow_mut(), params, m)
    };
    adaptation_loop(args, params, &order, &mut rng, one, ema)
}

/// Top-1 accuracy of `model` on the labeled `items` (batches of 8).
fn accuracy(
    model: &ModelProto,
    input: &str,
    backend: &dyn Backend,
    items: &[Item],
    load: &dyn Fn(&Item) -> Result<Array3<f32>>,
) -> Result<Scores> {
    let mut session = backend.load_model(model, "classifier")?;
    let mut correct = 0usize;
    for chunk in items.chunks(8) {
        let xs: Vec<Array3<f32>> = chunk.iter().map(load).collect::<Result<_>>()?;
        let views: Vec<_> = xs.iter().map(|x| x.view()).collect();
        let batch = ndarray::stack(Axis(0), &views)?;
        let logits = session
            .run(vec![(input.to_string(), Tensor::F32(batch.into_dyn()))])?
            .into_iter()
            .find(|(n, _)| n == LOGITS)
            .context("the model gave no `logits`")?
            .1
            .to_f32();
        for (row, item) in logits.axis_iter(Axis(0)).zip(chunk) {
            let pred = row
                .iter()
                .enumerate()
                .fold(
                    (0, f32::NEG_INFINITY),
                    |m, (i, &v)| if v > m.1 { (i, v) } else { m },
                )
                .0;
            correct += usize::from(Some(pred) == item.label);
        }
    }
    Ok(Scores {
        ap: None,
        ap50: None,
        accuracy: Some(correct as f64 / items.len().max(1) as f64),
        images: items.len(),
    })
}
