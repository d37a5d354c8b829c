//! Graph pieces the pretext methods share: L2 normalisation, matrix products, InfoNCE against
//! a queue, FIFO queues as buffers, MLP and 1x1-convolution projection heads.
//!
//! Pretraining graphs have a batch size fixed at build time (queues and per-sample host inputs
//! need it), so every helper here works on fixed shapes and checks them.

use densa_exporter::builder::{attr, Dim};
use densa_exporter::train::Fragment;
use densa_exporter::{BuildError, DType, GraphBuilder, Init, ParamKind, Tensor, Value};
use ndarray::ArrayD;

use super::PretextError;
use crate::nn::{BatchNorm2d, BatchNorm2dConfig, Conv2d, Conv2dConfig, NormMode};

/// The fixed shape of `v`, or an error naming it.
pub fn dims(b: &GraphBuilder, v: &Value) -> Result<Vec<usize>, BuildError> {
    v.shape()
        .iter()
        .map(|d| d.fixed().map(|x| x as usize))
        .collect::<Option<Vec<_>>>()
        .ok_or_else(|| {
            b.op_error(
                "pretext",
                format!("`{}` needs a shape fixed at build time", v.name()),
            )
        })
}

fn shape(d: &[usize]) -> Vec<Dim> {
    d.iter().map(|&x| Dim::from(x)).collect()
}

/// `Transpose` with permutation `perm`.
pub fn transpose(b: &mut GraphBuilder, x: &Value, perm: &[usize]) -> Result<Value, BuildError> {
    let d = dims(b, x)?;
    let out: Vec<usize> = perm.iter().map(|&p| d[p]).collect();
    let perm: Vec<i64> = perm.iter().map(|&p| p as i64).collect();
    Ok(b.node1(
        "Transpose",
        None,
        &[x],
        vec![attr::ints("perm", &perm)],
        DType::F32,
        shape(&out),
    ))
}

/// `MatMul` of `[..., m, k]` and `[..., k, n]` (same leading dims).
pub fn matmul(b: &mut GraphBuilder, x: &Value, y: &Value) -> Result<Value, BuildError> {
    let (dx, dy) = (dims(b, x)?, dims(b, y)?);
    if dx.len() != dy.len() || dx.len() < 2 || dx[dx.len() - 1] != dy[dy.len() - 2] {
        return Err(b.op_error(
            "MatMul",
            format!(
                "`{}` {dx:?} and `{}` {dy:?} don't multiply",
                x.name(),
                y.name()
            ),
        ));
    }
    let mut out = dx.clone();
    *out.last_mut().expect("rank >= 2") = dy[dy.len() - 1];
    Ok(b.node1("MatMul", None, &[x, y], vec![], DType::F32, shape(&out)))
}

/// `x / max(||x||_2, 1e-12)` along `axis` (PyTorch's `F.normalize`).
pub fn l2_normalize(b: &mut GraphBuilder, x: &Value, axis: i64) -> Result<Value, BuildError> {
    let sq = b.reduce_sum_square(x, &[axis], true)?;
    let norm = b.sqrt(&sq);
    let eps = b.const_f32(1e-12);
    let norm = b.max2(&norm, &eps)?;
    b.div(x, &norm)
}

/// `x[start..end]` along `axis`.
pub fn slice(
    b: &mut GraphBuilder,
    x: &Value,
    axis: usize,
    start: usize,
    end: usize,
) -> Result<Value, BuildError> {
    let mut d = dims(b, x)?;
    if start >= end || end > d[axis] {
        return Err(b.op_error(
            "Slice",
            format!("{start}..{end} of axis {axis} of `{}` {d:?}", x.name()),
        ));
    }
    d[axis] = end - start;
    let starts = b.const_i64(&[start as i64]);
    let ends = b.const_i64(&[end as i64]);
    let axes = b.const_i64(&[axis as i64]);
    Ok(b.node1(
        "Slice",
        None,
        &[x, &starts, &ends, &axes],
        vec![],
        x.dtype(),
        shape(&d),
    ))
}

/// `sum(x * y)` along `axis`, keeping it.
pub fn dot(b: &mut GraphBuilder, x: &Value, y: &Value, axis: i64) -> Result<Value, BuildError> {
    let p = b.mul(x, y)?;
    b.reduce_sum(&p, &[axis], true)
}

/// Cross-entropy with target class 0 of `logits [N, C]`, averaged over `N`: the InfoNCE loss
/// once the positive logit is in column 0.
pub fn ce_first(b: &mut GraphBuilder, logits: &Value) -> Result<Value, BuildError> {
    let logp = b.node1(
        "LogSoftmax",
        Some("log_softmax"),
        &[logits],
        vec![attr::int("axis", 1)],
        DType::F32,
        logits.shape().to_vec(),
    );
    let first = slice(b, &logp, 1, 0, 1)?;
    let mean = b.reduce_mean(&first, &[0, 1], false)?;
    Ok(b.neg(&mean))
}

/// InfoNCE of L2-normalised queries `q [N, D]` against their positive keys `k [N, D]` and the
/// negatives `queue [K, D]`, temperature `t`: `CE([q.k, q.queue^T] / t, 0)`, mean over `N`.
pub fn info_nce(
    b: &mut GraphBuilder,
    q: &Value,
    k: &Value,
    queue: &Value,
    t: f64,
) -> Result<Value, BuildError> {
    let pos = dot(b, q, k, 1)?;
    let qt = transpose(b, queue, &[1, 0])?;
    let neg = matmul(b, q, &qt)?;
    let logits = b.concat(&[&pos, &neg], 1)?;
    let inv_t = b.const_f32((1.0 / t) as f32);
    let logits = b.mul(&logits, &inv_t)?;
    ce_first(b, &logits)
}

/// A FIFO queue of `size` keys of dimension `dim`: a buffer initialised with L2-normalised
/// Gaussian rows (MoCo's `randn` + `normalize`), named `name`.
pub fn queue(
    b: &mut GraphBuilder,
    name: &str,
    size: usize,
    dim: usize,
) -> Result<Value, BuildError> {
    let v = b.param(name, &[size, dim], Init::Normal(1.0), ParamKind::Buffer)?;
    let mut t = b
        .initializer_value(v.name())
        .expect("just created")
        .to_f32();
    for mut row in t.rows_mut() {
        let n = row.iter().map(|x| x * x).sum::<f32>().sqrt().max(1e-12);
        row.mapv_inplace(|x| x / n);
    }
    b.set_initializer(v.name(), Tensor::F32(t.into_dyn()))?;
    Ok(v)
}

/// Enqueues `keys [N, D]` at the front of `queue [K, D]` and drops the oldest `N` rows; records
/// the update in `state`. Same contents as MoCo's ring buffer (a FIFO), in a different order,
/// which no loss depends on.
pub fn enqueue(
    b: &mut GraphBuilder,
    queue: &Value,
    keys: &Value,
    state: &mut Fragment,
) -> Result<(), BuildError> {
    let (dq, dk) = (dims(b, queue)?, dims(b, keys)?);
    if dq.len() != 2 || dk.len() != 2 || dq[1] != dk[1] || dk[0] > dq[0] {
        return Err(b.op_error(
            "enqueue",
            format!(
                "keys `{}` {dk:?} don't fit queue `{}` {dq:?} (the queue must hold at least one batch)",
                keys.name(),
                queue.name()
            ),
        ));
    }
    let next = if dk[0] == dq[0] {
        b.unary("Identity", keys)
    } else {
        let kept = slice(b, queue, 0, 0, dq[0] - dk[0])?;
        b.concat(&[keys, &kept], 0)?
    };
    state.update(queue.name(), next);
    Ok(())
}

/// A linear layer with PyTorch's default initialisation: `{name}.weight [out, in]`,
/// `{name}.bias [out]`.
#[derive(Clone, Debug)]
pub struct Linear {
    pub weight: Value,
    pub bias: Option<Value>,
    name: String,
}

impl Linear {
    pub fn init(
        b: &mut GraphBuilder,
        name: &str,
        inp: usize,
        out: usize,
        bias: bool,
    ) -> Result<Linear, BuildError> {
        let weight = b.param(
            &format!("{name}.weight"),
            &[out, inp],
            Init::KaimingUniformFanIn,
            ParamKind::Param,
        )?;
        let bias = if bias {
            let bound = 1.0 / (inp as f32).sqrt();
            Some(b.param(
                &format!("{name}.bias"),
                &[out],
                Init::Uniform(bound),
                ParamKind::Param,
            )?)
        } else {
            None
        };
        Ok(Linear {
            weight,
            bias,
            name: b.scoped_name(name),
        })
    }

    /// # Shapes
    /// `[N, in] -> [N, out]`.
    pub fn forward(&self, b: &mut GraphBuilder, x: &Value) -> Result<Value, BuildError> {
        b.scoped_root(|b| b.linear(Some(&self.name), x, &self.weight, self.bias.as_ref()))
    }
}

/// MoCo-v2's projection head: `fc (in -> hidden), ReLU, fc (hidden -> out)`, parameters
/// `{name}.0.*` and `{name}.2.*` (PyTorch's `Sequential` numbering).
#[derive(Clone, Debug)]
pub struct MlpHead {
    pub fc1: Linear,
    pub fc2: Linear,
}

impl MlpHead {
    pub fn init(
        b: &mut GraphBuilder,
        name: &str,
        inp: usize,
        hidden: usize,
        out: usize,
    ) -> Result<MlpHead, BuildError> {
        b.scoped(name, |b| {
            Ok(MlpHead {
                fc1: Linear::init(b, "0", inp, hidden, true)?,
                fc2: Linear::init(b, "2", hidden, out, true)?,
            })
        })
    }

    /// # Shapes
    /// `[N, in] -> [N, out]`.
    pub fn forward(&self, b: &mut GraphBuilder, x: &Value) -> Result<Value, BuildError> {
        let h = self.fc1.forward(b, x)?;
        let h = b.relu(&h);
        self.fc2.forward(b, &h)
    }
}

/// A dense projection head: `conv1x1 (in -> hidden), [BN], ReLU, conv1x1 (hidden -> out)`
/// (DenseCL's dense head without BN, PixPro's projector with it), parameters `{name}.0.*`,
/// `{name}.1.*` (BN), and `{name}.2.*` / `{name}.3.*`.
#[derive(Clone, Debug)]
pub struct ConvHead {
    pub conv1: Conv2d,
    pub bn: Option<BatchNorm2d>,
    pub conv2: Conv2d,
}

impl ConvHead {
    pub fn init(
        b: &mut GraphBuilder,
        name: &str,
        inp: usize,
        hidden: usize,
        out: usize,
        batch_norm: bool,
    ) -> Result<ConvHead, BuildError> {
        b.scoped(name, |b| {
            let conv1 = Conv2dConfig::new(inp, hidden, 1)
                .weight_init(Init::KaimingUniformFanIn)
                .init(b, "0")?;
            let bn = if batch_norm {
                Some(BatchNorm2dConfig::new(hidden).init(b, "1")?)
            } else {
                None
            };
            let conv2 = Conv2dConfig::new(hidden, out, 1)
                .weight_init(Init::KaimingUniformFanIn)
                .init(b, if batch_norm { "3" } else { "2" })?;
            Ok(ConvHead { conv1, bn, conv2 })
        })
    }

    /// # Shapes
    /// `[N, in, H, W] -> [N, out, H, W]`.
    pub fn forward(
        &self,
        b: &mut GraphBuilder,
        x: &Value,
        mode: &mut NormMode,
    ) -> Result<Value, PretextError> {
        let mut h = self.conv1.forward(b, x)?;
        if let Some(bn) = &self.bn {
            h = bn.forward_mode(b, &h, mode)?;
        }
        let h = b.relu(&h);
        Ok(self.conv2.forward(b, &h)?)
    }
}

/// `[N, C, H, W] -> [N, C, H*W]`.
pub fn flatten_cells(b: &mut GraphBuilder, x: &Value) -> Result<Value, BuildError> {
    let d = dims(b, x)?;
    b.reshape(x, &[d[0] as i64, d[1] as i64, (d[2] * d[3]) as i64])
}

/// `GlobalAveragePool` then flatten: `[N, C, H, W] -> [N, C]`.
pub fn pool(b: &mut GraphBuilder, x: &Value) -> Result<Value, BuildError> {
    let p = b.global_avg_pool(x)?;
    Ok(b.flatten(&p, 1))
}

/// A float32 tensor of `shape` filled by `f(index)`, for host inputs.
pub fn host_tensor(shape: &[usize], values: Vec<f32>) -> Tensor {
    Tensor::F32(ArrayD::from_shape_vec(shape.to_vec(), values).expect("sized by the caller"))
}

/// The running-statistic updates of two forward passes through the same batch norms, in order
/// (PyTorch's state after both calls; `momentum` is the batch norms', 0.1 for
/// [`NormMode::train`]): each buffer `r` updated to `u1` by the first pass and `u2`
/// (computed from the same input `r`) by the second becomes `u2 + (1 - momentum) (u1 - r)`.
/// Updates present in only one fragment are kept as they are.
pub fn chain_norm_state(
    b: &mut GraphBuilder,
    first: Fragment,
    second: Fragment,
    momentum: f32,
) -> Result<Fragment, PretextError> {
    let mut out = Fragment {
        inputs: first.inputs,
        updates: Vec::new(),
    };
    out.inputs.extend(second.inputs.clone());
    let keep = b.const_f32(1.0 - momentum);
    for u in first.updates {
        match second.next_of(&u.name) {
            Some(u2) => {
                let r = b
                    .initializer_handle(&u.name)
                    .ok_or_else(|| PretextError::Invalid {
                        method: "batch norm".into(),
                        problem: format!("running statistic `{}` is not a buffer", u.name),
                    })?;
                let d = b.sub(&u.next, &r)?;
                let d = b.mul(&d, &keep)?;
                let next = b.add(u2, &d)?;
                out.update(&u.name, next);
            }
            None => out.update(&u.name, u.next),
        }
    }
    for u in second.updates {
        if out.next_of(&u.name).is_none() {
            out.update(&u.name, u.next);
        }
    }
    Ok(out)
}

/// A mean over the selected entries of a batch, with the values data-parallel training needs
/// to make it the global batch's ([`crate::train_step::ForwardGraph::global_mean`]).
pub struct MaskedMean {
    /// `total / denominator`.
    pub mean: Value,
    /// How many entries were selected.
    pub count: Value,
    /// `max(count, 1)`.
    pub denominator: Value,
}

/// `total / max(count, 1)` (0 for an empty selection).
pub fn masked_mean(
    b: &mut GraphBuilder,
    total: &Value,
    count: &Value,
) -> Result<MaskedMean, BuildError> {
    let one = b.const_f32(1.0);
    let denominator = b.max2(count, &one)?;
    let mean = b.div(total, &denominator)?;
    Ok(MaskedMean {
        mean,
        count: count.clone(),
        denominator,
    })
}
