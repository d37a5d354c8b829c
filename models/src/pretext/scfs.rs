//! SCFS (Song, Zhang, An, Luo, Wang, Xie; ICCV 2023, "Semantics-Consistent Feature Search for
//! Self-Supervised Visual Representation Learning"): DINO plus a feature-level search for the
//! local crops' targets.
//!
//! DINO part: a student and its EMA teacher (`teacher.*`, momentum 0.996 ramped to 1 by a
//! cosine); 2 global crops (scale (0.25, 1)) and `n_local` local crops (scale (0.05, 0.25), side
//! `round(image_size * 96 / 224)`); the DINO head (3-layer MLP with GELU, L2-normalised
//! bottleneck, weight-normalised last layer with the norm fixed at 1) gives `out_dim` logits;
//! the loss is the cross-entropy between the teacher's `softmax((t - center) / tau_t)` on each
//! global crop and the student's `log_softmax(s / 0.1)` on every other crop, averaged over the
//! pairs. The centre is a buffer updated `c <- 0.9 c + 0.1 mean(t)` by the teacher's global
//! outputs; `tau_t` warms up linearly 0.04 -> 0.07 (hyper input `scfs.teacher_temp`).
//!
//! Feature search, per stage `layer2`, `layer3`, `layer4`: the teacher's feature map of the
//! first global crop, L2-normalised per position, dotted with the student's pooled and
//! L2-normalised feature of each local crop (no gradient) gives an attention map
//! `[B, 1, H, W]` (cosine similarity, no softmax, as in the official code); the searched
//! target is the attention times the teacher's (unnormalised) feature map. A per-stage head
//! turns feature maps into embeddings. Stage loss = `0.5 * (global + local)`: global is the
//! swapped DINO cross-entropy between the teacher and student stage heads on the global crops
//! (with the stage's own centre), local the cross-entropy between the teacher's
//! `softmax(head(searched) / tau_t)` (no centring) and the student's `log_softmax(head(local) /
//! 0.1)`, averaged over the local crops. Total = DINO loss + the three stage losses (the
//! official `main_scfs.py`).
//!
//! # Our choices (for a small, faithful version)
//! - Stage heads are `GAP, Linear (C -> stage_hidden), ReLU, Linear (-> stage_dim), L2
//!   normalise` (`head.layer{2,3,4}`, defaults 2048 and 256 as the official head's MLP). The
//!   official `DINOShallowHead` also has a residual bottleneck block before the pooling and
//!   BatchNorm1d in the MLP; we leave both out, so the head sees the attention-weighted
//!   average of the teacher map.
//! - The DINO head has no batch norm (DINO's default `use_bn_in_head=False`); weight
//!   normalisation with `norm_last_layer=True` is `normalize(V)` row-wise in the forward.
//!   DINO's `freeze_last_layer` (gradient of the last layer dropped for the first epoch) is the
//!   hyper input `scfs.last_layer_grad` (0 for `freeze_last_layer_steps` steps, then 1), the
//!   gradient-scaling trick of [`super::swav::scale_gradient`].
//! - Views use the multi-crop colour recipe of [`MultiCropConfig::swav`] (DINO's blur and
//!   solarisation probabilities per global crop are not reproduced).
//! - Student batch norm runs once on the global crops and once on the local crops, the running
//!   statistics updated in that order ([`super::swav::chain_norm_state`]); the teacher runs
//!   once, on the global crops. No gradient clipping by default (official: 3.0).
//! - Teacher temperature warm-up length is a fraction of the run (`warmup_teacher_temp_fraction`,
//!   0.25 = the README's 50 of 200 epochs), since the schedule sees steps, not epochs.

use std::f64::consts::PI;

use densa_exporter::builder::{attr, Dim};
use densa_exporter::train::Fragment;
use densa_exporter::{BuildError, DType, GraphBuilder, Init, ParamKind, Value};
use densa_runtime::augment::{MultiCropConfig, ViewConfig};

use super::ops::{self, Linear, MlpHead};
use super::settings::{common, Hyper, Settings};
use super::swav::{crop_group_input, multi_crop_views, scale_gradient, small_crop_size};
use super::twin::{momentum_twin, EMA_MOMENTUM};
use super::{Family, MethodInfo, Pretext, PretextContext, PretextError};
use crate::backbone::ResNet;
use crate::train_step::ForwardGraph;

pub static INFO: MethodInfo = MethodInfo {
    name: "scfs",
    title: "Semantics-Consistent Feature Search for Self-Supervised Visual Representation Learning",
    paper: "Song, Zhang, An, Luo, Wang, Xie; ICCV 2023",
    summary:
        "DINO with local-crop targets searched in the teacher's global feature maps (layer2-4)",
    hyper,
    create,
    tiny: TINY,
    family: Family::Backbone,
};

/// Narrow heads, two local crops (see [`MethodInfo::tiny`]).
pub const TINY: &[(&str, &str)] = &[
    ("out_dim", "16"),
    ("hidden_dim", "16"),
    ("bottleneck_dim", "8"),
    ("stage_hidden", "16"),
    ("stage_dim", "8"),
    ("n_local", "2"),
];

/// Name of the teacher-temperature hyper input.
pub const TEACHER_TEMP: &str = "scfs.teacher_temp";
/// Name of the last-layer gradient scale hyper input.
pub const LAST_LAYER_GRAD: &str = "scfs.last_layer_grad";

fn hyper() -> Vec<Hyper> {
    let mut h = common("sgd", 0.1, 256, 1e-4);
    h.push(super::settings::batch_norm());
    h.extend([
        Hyper::float(
            "momentum",
            0.996,
            "base EMA momentum of the teacher (cosine to 1)",
        ),
        Hyper::int("n_local", 8, "local crops"),
        Hyper::float(
            "small_crop_ratio",
            96.0 / 224.0,
            "local crop side / image_size",
        ),
        Hyper::float(
            "global_scale_min",
            0.25,
            "min area fraction of global crops",
        ),
        Hyper::float("local_scale_min", 0.05, "min area fraction of local crops"),
        Hyper::float("local_scale_max", 0.25, "max area fraction of local crops"),
        Hyper::int("out_dim", 65536, "DINO head output dimension"),
        Hyper::int("hidden_dim", 2048, "DINO head hidden width"),
        Hyper::int("bottleneck_dim", 256, "DINO head bottleneck"),
        Hyper::int("stage_hidden", 2048, "stage head hidden width"),
        Hyper::int("stage_dim", 256, "stage head output dimension"),
        Hyper::float("student_temp", 0.1, "student softmax temperature"),
        Hyper::float(
            "warmup_teacher_temp",
            0.04,
            "teacher temperature at the start",
        ),
        Hyper::float(
            "teacher_temp",
            0.07,
            "teacher temperature after the warm-up",
        ),
        Hyper::float(
            "warmup_teacher_temp_fraction",
            0.25,
            "fraction of the run over which the teacher temperature warms up",
        ),
        Hyper::float("center_momentum", 0.9, "EMA momentum of the centres"),
        Hyper::int(
            "freeze_last_layer_steps",
            0,
            "steps with no gradient for the DINO head's last layer (official: one epoch)",
        ),
    ]);
    h
}

fn create(settings: Settings) -> Result<Box<dyn Pretext>, PretextError> {
    Ok(Box::new(Scfs { settings }))
}

/// The SCFS method.
pub struct Scfs {
    settings: Settings,
}

fn gelu(b: &mut GraphBuilder, x: &Value) -> Result<Value, BuildError> {
    let inv_sqrt2 = b.const_f32(std::f32::consts::FRAC_1_SQRT_2);
    let u = b.mul(x, &inv_sqrt2)?;
    let e = b.unary("Erf", &u);
    let one = b.const_f32(1.0);
    let e = b.add(&e, &one)?;
    let half = b.const_f32(0.5);
    let h = b.mul(x, &half)?;
    b.mul(&h, &e)
}

/// DINO's head: `mlp.0 (in -> hidden), GELU, mlp.2 (hidden -> hidden), GELU, mlp.4 (hidden ->
/// bottleneck)`, L2-normalise, `last_layer` (`[out, bottleneck]`, no bias, rows normalised in
/// the forward: weight norm with `g = 1`).
#[derive(Clone, Debug)]
pub struct DinoHead {
    pub fc: [Linear; 3],
    pub last: Value,
}

impl DinoHead {
    pub fn init(
        b: &mut GraphBuilder,
        name: &str,
        inp: usize,
        hidden: usize,
        bottleneck: usize,
        out: usize,
    ) -> Result<DinoHead, BuildError> {
        b.scoped(name, |b| {
            let fc = b.scoped("mlp", |b| -> Result<[Linear; 3], BuildError> {
                Ok([
                    Linear::init(b, "0", inp, hidden, true)?,
                    Linear::init(b, "2", hidden, hidden, true)?,
                    Linear::init(b, "4", hidden, bottleneck, true)?,
                ])
            })?;
            let last = b.param(
                "last_layer.weight_v",
                &[out, bottleneck],
                Init::KaimingUniformFanIn,
                ParamKind::Param,
            )?;
            Ok(DinoHead { fc, last })
        })
    }

    /// The last layer's weight as used: `normalize(V)` per row (`weight_norm` with `g = 1`, no
    /// epsilon, as PyTorch), its gradient scaled by `last_grad` (see the module docs; the
    /// `Identity` to stop goes to `frozen`). Built once per head and shared by its forward
    /// passes.
    ///
    /// # Shapes
    /// `[out, bottleneck]`.
    pub fn last_weight(
        &self,
        b: &mut GraphBuilder,
        last_grad: &Value,
        frozen: &mut Vec<Value>,
    ) -> Result<Value, BuildError> {
        let (v, f) = scale_gradient(b, &self.last, last_grad)?;
        frozen.push(f);
        let sq = b.reduce_sum_square(&v, &[1], true)?;
        let norm = b.sqrt(&sq);
        let w = b.div(&v, &norm)?;
        ops::transpose(b, &w, &[1, 0])
    }

    /// `last` from [`last_weight`](Self::last_weight).
    ///
    /// # Shapes
    /// `[N, in] -> [N, out]`.
    pub fn forward(
        &self,
        b: &mut GraphBuilder,
        x: &Value,
        last: &Value,
    ) -> Result<Value, BuildError> {
        let mut h = self.fc[0].forward(b, x)?;
        h = gelu(b, &h)?;
        h = self.fc[1].forward(b, &h)?;
        h = gelu(b, &h)?;
        h = self.fc[2].forward(b, &h)?;
        let h = ops::l2_normalize(b, &h, 1)?;
        ops::matmul(b, &h, last)
    }
}

/// `softmax(x / temperature)` along axis 1; `temperature` a float32 scalar value.
fn softmax_t(
    b: &mut GraphBuilder,
    x: &Value,
    temperature: &Value,
    log: bool,
) -> Result<Value, BuildError> {
    let y = b.div(x, temperature)?;
    Ok(b.node1(
        if log { "LogSoftmax" } else { "Softmax" },
        None,
        &[&y],
        vec![attr::int("axis", 1)],
        DType::F32,
        y.shape().to_vec(),
    ))
}

/// `mean_n sum_k -p * logq`.
fn cross_entropy(b: &mut GraphBuilder, p: &Value, logq: &Value) -> Result<Value, BuildError> {
    let prod = b.mul(p, logq)?;
    let s = b.reduce_sum(&prod, &[1], false)?;
    let m = b.reduce_mean(&s, &[0], false)?;
    Ok(b.neg(&m))
}

/// DINO's loss: teacher probabilities `softmax((teacher - center) / teacher_temp)` of the
/// `T` crops in `teacher` (no centring without `center`), student `log_softmax(student /
/// student_temp)` of the `V` crops in `student` (crop-major, the teacher's crops first), the
/// cross-entropy of every pair of different crop indices, averaged over the pairs. With
/// `V = T = 2` this is SCFS's swapped stage-global loss.
///
/// # Shapes
/// `student [V * B, K]`, `teacher [T * B, K]`, `center [1, K]`, temperatures `[]` -> `[]`.
#[allow(clippy::too_many_arguments)]
pub fn dino_loss(
    b: &mut GraphBuilder,
    student: &Value,
    teacher: &Value,
    center: Option<&Value>,
    teacher_temp: &Value,
    student_temp: f64,
    batch: usize,
) -> Result<Value, BuildError> {
    Ok(dino_loss_and_entropy(
        b,
        student,
        teacher,
        center,
        teacher_temp,
        student_temp,
        batch,
    )?
    .0)
}

/// [`dino_loss`] and the teacher targets' entropy averaged over the same pairs: the loss minus
/// the entropy is the mean `KL(teacher || student)`, the part of the loss the student can
/// lower (centring moves the entropy, not the student).
#[allow(clippy::too_many_arguments)]
pub fn dino_loss_and_entropy(
    b: &mut GraphBuilder,
    student: &Value,
    teacher: &Value,
    center: Option<&Value>,
    teacher_temp: &Value,
    student_temp: f64,
    batch: usize,
) -> Result<(Value, Value), BuildError> {
    let (ds, dt) = (ops::dims(b, student)?, ops::dims(b, teacher)?);
    let (v, t) = (ds[0] / batch, dt[0] / batch);
    let centred = match center {
        Some(c) => b.sub(teacher, c)?,
        None => teacher.clone(),
    };
    let probs = softmax_t(b, &centred, teacher_temp, false)?;
    let log_probs = softmax_t(b, &centred, teacher_temp, true)?;
    let st = b.const_f32(student_temp as f32);
    let logp = softmax_t(b, student, &st, true)?;
    let mut total: Option<Value> = None;
    let mut entropy: Option<Value> = None;
    let mut n = 0usize;
    for iq in 0..t {
        let q = ops::slice(b, &probs, 0, iq * batch, (iq + 1) * batch)?;
        let pairs = (0..v).filter(|&iv| iv != iq).count();
        if pairs > 0 {
            let lq = ops::slice(b, &log_probs, 0, iq * batch, (iq + 1) * batch)?;
            let h = cross_entropy(b, &q, &lq)?;
            let w = b.const_f32(pairs as f32);
            let h = b.mul(&h, &w)?;
            entropy = Some(match entropy {
                Some(x) => b.add(&x, &h)?,
                None => h,
            });
        }
        for iv in (0..v).filter(|&iv| iv != iq) {
            let s = ops::slice(b, &logp, 0, iv * batch, (iv + 1) * batch)?;
            let ce = cross_entropy(b, &q, &s)?;
            total = Some(match total {
                Some(x) => b.add(&x, &ce)?,
                None => ce,
            });
            n += 1;
        }
    }
    let w = b.const_f32(1.0 / n.max(1) as f32);
    let total = total.ok_or_else(|| b.op_error("dino_loss", "no crop pairs".to_string()))?;
    let entropy = entropy.ok_or_else(|| b.op_error("dino_loss", "no crop pairs".to_string()))?;
    Ok((b.mul(&total, &w)?, b.mul(&entropy, &w)?))
}

/// The centre's next value `center * m + mean_n(teacher) * (1 - m)` (DINO's `update_center`).
///
/// # Shapes
/// `center [1, K]`, `teacher [N, K]` -> `[1, K]`.
pub fn center_update(
    b: &mut GraphBuilder,
    center: &Value,
    teacher: &Value,
    momentum: f64,
) -> Result<Value, BuildError> {
    let mean = b.reduce_mean(teacher, &[0], true)?;
    let m = b.const_f32(momentum as f32);
    let r = b.const_f32((1.0 - momentum) as f32);
    let kept = b.mul(center, &m)?;
    let taken = b.mul(&mean, &r)?;
    b.add(&kept, &taken)
}

/// What [`feature_search`] computes.
pub struct Searched {
    /// Cosine attention `[L * B, 1, H, W]` of each local crop over the teacher's map.
    pub attention: Value,
    /// Attention-weighted teacher map `[L * B, C, H, W]`.
    pub target: Value,
    /// The student's pooled local feature before normalisation, detached: register with
    /// [`ForwardGraph::stop_gradient`].
    pub detached: Value,
}

/// SCFS's feature search: `teacher_map [B, C, H, W]` (the teacher's map of the first global
/// crop) against the student's local maps `student_local [L * B, C, h, w]` (crop-major):
/// `attention = <normalize_c(teacher_map), normalize(mean_hw(student_local))>` per position,
/// `target = attention * teacher_map`.
///
/// # Shapes
/// `teacher_map [B, C, H, W]`, `student_local [L * B, C, h, w]` -> attention
/// `[L * B, 1, H, W]`, target `[L * B, C, H, W]`.
pub fn feature_search(
    b: &mut GraphBuilder,
    teacher_map: &Value,
    student_local: &Value,
) -> Result<Searched, BuildError> {
    let (dt, dl) = (ops::dims(b, teacher_map)?, ops::dims(b, student_local)?);
    if dt.len() != 4 || dl.len() != 4 || dt[1] != dl[1] || dl[0] % dt[0] != 0 {
        return Err(b.op_error(
            "feature_search",
            format!("teacher map {dt:?} and local maps {dl:?} don't match"),
        ));
    }
    let crops = dl[0] / dt[0];
    let pooled = ops::pool(b, student_local)?;
    let detached = b.unary("Identity", &pooled);
    let u = ops::l2_normalize(b, &detached, 1)?;
    let u = b.reshape(&u, &[dl[0] as i64, dl[1] as i64, 1, 1])?;
    let repeats = b.const_i64(&[crops as i64, 1, 1, 1]);
    let shape: Vec<Dim> = [dl[0], dt[1], dt[2], dt[3]]
        .iter()
        .map(|&x| Dim::from(x))
        .collect();
    let tiled = b.node1(
        "Tile",
        None,
        &[teacher_map, &repeats],
        vec![],
        DType::F32,
        shape,
    );
    let tn = ops::l2_normalize(b, &tiled, 1)?;
    let attention = ops::dot(b, &tn, &u, 1)?;
    let target = b.mul(&attention, &tiled)?;
    Ok(Searched {
        attention,
        target,
        detached,
    })
}

/// The modules of the student (and, copied, the teacher).
struct Modules {
    net: ResNet,
    dino: DinoHead,
    stages: [MlpHead; 3],
}

impl Scfs {
    fn multi_crop(&self, image_size: u32) -> Result<MultiCropConfig, PretextError> {
        let s = &self.settings;
        let n_local = s.i64("n_local");
        if n_local < 1 {
            return Err(s.bad("n_local", "SCFS needs at least one local crop"));
        }
        let g = s.checked(
            "global_scale_min",
            |v| v > 0.0 && v <= 1.0,
            "must be in (0, 1]",
        )?;
        let (lo, hi) = (s.f64("local_scale_min"), s.f64("local_scale_max"));
        if !(lo > 0.0 && lo <= hi && hi <= 1.0) {
            return Err(s.bad(
                "local_scale_min",
                "need 0 < local_scale_min <= local_scale_max <= 1",
            ));
        }
        let ratio = s.checked("small_crop_ratio", |v| v > 0.0, "must be positive")?;
        let mut mc = MultiCropConfig::swav();
        mc.n_large = 2;
        mc.n_small = n_local as usize;
        mc.large.crop.size = (image_size, image_size);
        mc.large.crop.scale = (g, 1.0);
        let side = small_crop_size(image_size, ratio);
        mc.small.crop.size = (side, side);
        mc.small.crop.scale = (lo, hi);
        Ok(mc)
    }
}

impl Pretext for Scfs {
    fn info(&self) -> &'static MethodInfo {
        &INFO
    }

    fn settings(&self) -> &Settings {
        &self.settings
    }

    fn views(&self, image_size: u32) -> Vec<ViewConfig> {
        let mc = self.multi_crop(image_size).unwrap_or_else(|_| {
            let mut mc = MultiCropConfig::swav();
            mc.n_small = 8;
            mc.large.crop.size = (image_size, image_size);
            let s = small_crop_size(image_size, 96.0 / 224.0);
            mc.small.crop.size = (s, s);
            mc
        });
        multi_crop_views(&mc)
    }

    fn schedule(&self, step: u64, total: u64) -> Vec<(String, f64)> {
        let s = &self.settings;
        let total = total.max(1) as f64;
        let warm = (s.f64("warmup_teacher_temp_fraction") * total).max(0.0);
        let (t0, t1) = (s.f64("warmup_teacher_temp"), s.f64("teacher_temp"));
        // np.linspace(t0, t1, warm) indexed by step: reaches t1 at step warm - 1.
        let temp = if (step as f64) >= warm || warm <= 1.0 {
            t1
        } else {
            t0 + (t1 - t0) * step as f64 / (warm - 1.0)
        };
        let m0 = s.f64("momentum");
        let m = 1.0 - (1.0 - m0) * ((PI * step as f64 / total).cos() + 1.0) / 2.0;
        let freeze = s.i64("freeze_last_layer_steps").max(0) as u64;
        vec![
            (TEACHER_TEMP.to_string(), temp),
            (EMA_MOMENTUM.to_string(), m),
            (
                LAST_LAYER_GRAD.to_string(),
                if step < freeze { 0.0 } else { 1.0 },
            ),
        ]
    }

    fn build(&self, ctx: &PretextContext) -> Result<ForwardGraph, PretextError> {
        let s = &self.settings;
        let mc = self.multi_crop(ctx.image_size)?;
        let m = s.checked(
            "momentum",
            |v| (0.0..=1.0).contains(&v),
            "must be in [0, 1]",
        )?;
        let cm = s.checked(
            "center_momentum",
            |v| (0.0..=1.0).contains(&v),
            "must be in [0, 1]",
        )?;
        let st = s.checked("student_temp", |v| v > 0.0, "must be positive")?;
        let t0 = s.checked("warmup_teacher_temp", |v| v > 0.0, "must be positive")?;
        s.checked("teacher_temp", |v| v > 0.0, "must be positive")?;
        if s.i64("freeze_last_layer_steps") < 0 {
            return Err(s.bad("freeze_last_layer_steps", "must be >= 0"));
        }
        let (out_dim, hidden, bottleneck, stage_hidden, stage_dim) = (
            s.positive("out_dim")?,
            s.positive("hidden_dim")?,
            s.positive("bottleneck_dim")?,
            s.positive("stage_hidden")?,
            s.positive("stage_dim")?,
        );
        let (bsz, n_local) = (ctx.batch, mc.n_small);
        let mut b = GraphBuilder::new("scfs", ctx.seed);
        let global = crop_group_input(&mut b, bsz, mc.large.crop.size.0, 0, 2)?;
        let local = crop_group_input(&mut b, bsz, mc.small.crop.size.0, 2, n_local)?;
        let ch = ctx.arch.out_channels();
        let twin = momentum_twin(&mut b, m, |b| -> Result<Modules, PretextError> {
            Ok(Modules {
                net: ctx.arch.init(b)?,
                dino: DinoHead::init(b, "head.dino", ch[3], hidden, bottleneck, out_dim)?,
                stages: [
                    MlpHead::init(b, "head.layer2", ch[1], stage_hidden, stage_dim)?,
                    MlpHead::init(b, "head.layer3", ch[2], stage_hidden, stage_dim)?,
                    MlpHead::init(b, "head.layer4", ch[3], stage_hidden, stage_dim)?,
                ],
            })
        })?;
        let mut hyper = Fragment::default();
        let tt = hyper.hyperparameter(&mut b, TEACHER_TEMP, t0)?;
        let tt = b.cast(&tt, DType::F32);
        let freeze = s.i64("freeze_last_layer_steps");
        let lg =
            hyper.hyperparameter(&mut b, LAST_LAYER_GRAD, if freeze > 0 { 0.0 } else { 1.0 })?;
        let lg = b.cast(&lg, DType::F32);
        let mut frozen = Vec::new();
        let center = |b: &mut GraphBuilder, name: &str, k: usize| {
            b.param(name, &[1, k], Init::Zeros, ParamKind::Buffer)
        };
        let c_dino = center(&mut b, "center.dino", out_dim)?;
        let c_stage = [
            center(&mut b, "center.layer2", stage_dim)?,
            center(&mut b, "center.layer3", stage_dim)?,
            center(&mut b, "center.layer4", stage_dim)?,
        ];

        let (stu, tea) = (&twin.student, &twin.teacher);
        let mut mode_g = self.settings.norm_mode()?;
        let sg = stu.net.forward_mode(&mut b, &global, &mut mode_g)?;
        let mut mode_l = self.settings.norm_mode()?;
        let sl = stu.net.forward_mode(&mut b, &local, &mut mode_l)?;
        let mut norm =
            ops::chain_norm_state(&mut b, mode_g.into_state(), mode_l.into_state(), 0.1)?;
        let mut mode_t = self.settings.norm_mode()?;
        let tg = tea.net.forward_mode(&mut b, &global, &mut mode_t)?;
        norm.extend(mode_t.into_state());

        // DINO on the final features.
        let pooled = |b: &mut GraphBuilder, x: &Value| ops::pool(b, x);
        let psg = pooled(&mut b, &sg.c5)?;
        let psl = pooled(&mut b, &sl.c5)?;
        let w_s = stu.dino.last_weight(&mut b, &lg, &mut frozen)?;
        let s_glob = stu.dino.forward(&mut b, &psg, &w_s)?;
        let s_loc = stu.dino.forward(&mut b, &psl, &w_s)?;
        let s_out = b.concat(&[&s_glob, &s_loc], 0)?;
        let ptg = pooled(&mut b, &tg.c5)?;
        let w_t = tea.dino.last_weight(&mut b, &lg, &mut frozen)?;
        let t_out = tea.dino.forward(&mut b, &ptg, &w_t)?;
        let (l_dino, h_dino) =
            dino_loss_and_entropy(&mut b, &s_out, &t_out, Some(&c_dino), &tt, st, bsz)?;
        let next = center_update(&mut b, &c_dino, &t_out, cm)?;
        norm.update(c_dino.name(), next);

        // Feature search per stage.
        let half = b.const_f32(0.5);
        let mut loss = l_dino.clone();
        let mut entropy = h_dino;
        let mut metrics = vec![("loss_dino".to_string(), l_dino)];
        let stage_maps = [
            (&sg.c3, &sl.c3, &tg.c3),
            (&sg.c4, &sl.c4, &tg.c4),
            (&sg.c5, &sl.c5, &tg.c5),
        ];
        for (k, (smap_g, smap_l, tmap_g)) in stage_maps.into_iter().enumerate() {
            let head_s = &stu.stages[k];
            let head_t = &tea.stages[k];
            let embed =
                |b: &mut GraphBuilder, h: &MlpHead, x: &Value| -> Result<Value, BuildError> {
                    let p = ops::pool(b, x)?;
                    let z = h.forward(b, &p)?;
                    ops::l2_normalize(b, &z, 1)
                };
            let s_g = embed(&mut b, head_s, smap_g)?;
            let t_g = embed(&mut b, head_t, tmap_g)?;
            let (l_glob, h_glob) =
                dino_loss_and_entropy(&mut b, &s_g, &t_g, Some(&c_stage[k]), &tt, st, bsz)?;
            let next = center_update(&mut b, &c_stage[k], &t_g, cm)?;
            norm.update(c_stage[k].name(), next);
            let first = ops::slice(&mut b, tmap_g, 0, 0, bsz)?;
            let found = feature_search(&mut b, &first, smap_l)?;
            frozen.push(found.detached.clone());
            let t_l = embed(&mut b, head_t, &found.target)?;
            let s_l = embed(&mut b, head_s, smap_l)?;
            let p = softmax_t(&mut b, &t_l, &tt, false)?;
            let stc = b.const_f32(st as f32);
            let logq = softmax_t(&mut b, &s_l, &stc, true)?;
            // Mean over the crops of the per-crop batch means = mean over all rows.
            let l_loc = cross_entropy(&mut b, &p, &logq)?;
            let logp_t = softmax_t(&mut b, &t_l, &tt, true)?;
            let h_loc = cross_entropy(&mut b, &p, &logp_t)?;
            let both = b.add(&l_glob, &l_loc)?;
            let l_stage = b.mul(&both, &half)?;
            loss = b.add(&loss, &l_stage)?;
            let h_both = b.add(&h_glob, &h_loc)?;
            let h_stage = b.mul(&h_both, &half)?;
            entropy = b.add(&entropy, &h_stage)?;
            metrics.push((format!("loss_layer{}", k + 2), l_stage));
        }
        // The loss minus the targets' entropy: mean KL(teacher || student) over every term.
        let kl = b.sub(&loss, &entropy)?;
        metrics.push(("kl".to_string(), kl));
        let loss = b.reshape(&loss, &[1])?;
        norm.extend(twin.ema);
        norm.extend(hyper);
        let mut g = ForwardGraph::new(b, loss).norm_state(norm);
        for f in &frozen {
            g = g.stop_gradient(f);
        }
        for (name, v) in metrics {
            g = g.metric(&name, v);
        }
        Ok(g)
    }
}

#[cfg(test)]
#[path = "scfs_tests.rs"]
mod tests;
