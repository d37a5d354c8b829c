//! DETR's transformer (Carion et al. 2020) as graph pieces: linear layers on token tensors,
//! multi-head attention from `MatMul`/`Softmax`/`Reshape`/`Transpose`, post-norm encoder and
//! decoder layers, and the 2-D sine positional encoding.
//!
//! Tokens are batch-first, `[N, T, D]` (PyTorch's `nn.MultiheadAttention` with
//! `batch_first=True`); the token counts `T` are fixed at build time (the input size is), the
//! batch `N` may be symbolic. Dropout is left out (p = 0, the inference behaviour).
//!
//! Choices that are ours: linear weights are `[out, in]` as PyTorch stores them and initialised
//! with PyTorch's `nn.Linear` default (DETR re-initialises its transformer with Xavier uniform);
//! the query, key and value projections are three parameters (`q_proj`, `k_proj`, `v_proj`)
//! instead of PyTorch's packed `in_proj_weight`.

use densa_exporter::builder::{attr, ops::broadcast, shape_string, Dim};
use densa_exporter::train::norm::{LayerNorm, LayerNormConfig};
use densa_exporter::train::TrainError;
use densa_exporter::{BuildError, DType, GraphBuilder, Init, ParamKind, Tensor, Value};
use ndarray::ArrayD;

/// `Transpose` with permutation `perm` (symbolic dimensions carried along).
pub(crate) fn transpose(b: &mut GraphBuilder, x: &Value, perm: &[i64]) -> Value {
    let shape = perm.iter().map(|&p| x.dim(p).clone()).collect();
    b.node1(
        "Transpose",
        None,
        &[x],
        vec![attr::ints("perm", perm)],
        x.dtype(),
        shape,
    )
}

/// Batched `MatMul` of `[.., m, k]` and `[.., k, n]`, leading dimensions broadcasting.
pub(crate) fn matmul(b: &mut GraphBuilder, x: &Value, y: &Value) -> Result<Value, BuildError> {
    let (rx, ry) = (x.rank(), y.rank());
    let fail = |b: &GraphBuilder| {
        b.op_error(
            "MatMul",
            format!(
                "`{}` {} and `{}` {} don't multiply",
                x.name(),
                shape_string(x.shape()),
                y.name(),
                shape_string(y.shape())
            ),
        )
    };
    if rx < 2 || ry < 2 {
        return Err(fail(b));
    }
    if let (Some(k1), Some(k2)) = (x.dim(-1).fixed(), y.dim(-2).fixed()) {
        if k1 != k2 {
            return Err(fail(b));
        }
    }
    let mut shape = broadcast(&x.shape()[..rx - 2], &y.shape()[..ry - 2]).ok_or_else(|| fail(b))?;
    shape.push(x.dim(-2).clone());
    shape.push(y.dim(-1).clone());
    Ok(b.node1("MatMul", None, &[x, y], vec![], x.dtype(), shape))
}

/// A linear layer on the last axis, PyTorch's `nn.Linear` (weight `[out, in]`).
#[derive(Clone, Debug)]
pub struct Linear {
    pub weight: Value,
    pub bias: Value,
    pub in_features: usize,
    pub out_features: usize,
}

impl Linear {
    /// Creates `name.weight` `[out, in]` (PyTorch's default init: U(+-1/sqrt(in))) and
    /// `name.bias` `[out]` (the same bound) in the current scope.
    pub fn new(
        b: &mut GraphBuilder,
        name: &str,
        in_features: usize,
        out_features: usize,
    ) -> Result<Linear, BuildError> {
        let bound = 1.0 / (in_features.max(1) as f32).sqrt();
        Linear::with_bias_init(b, name, in_features, out_features, Init::Uniform(bound))
    }

    /// [`Linear::new`] with the bias initialised by `bias` (Deformable DETR's class prior).
    pub fn with_bias_init(
        b: &mut GraphBuilder,
        name: &str,
        in_features: usize,
        out_features: usize,
        bias: Init,
    ) -> Result<Linear, BuildError> {
        b.scoped(name, |b| {
            Ok(Linear {
                weight: b.param(
                    "weight",
                    &[out_features, in_features],
                    Init::KaimingUniformFanIn,
                    ParamKind::Param,
                )?,
                bias: b.param("bias", &[out_features], bias, ParamKind::Param)?,
                in_features,
                out_features,
            })
        })
    }

    /// `x · weightᵀ + bias`.
    ///
    /// # Shapes
    /// `[.., in] -> [.., out]`.
    pub fn forward(&self, b: &mut GraphBuilder, x: &Value) -> Result<Value, BuildError> {
        if x.dim(-1).fixed() != Some(self.in_features as i64) {
            return Err(b.op_error(
                "Linear",
                format!(
                    "`{}` {} does not end in {} features (`{}`)",
                    x.name(),
                    shape_string(x.shape()),
                    self.in_features,
                    self.weight.name()
                ),
            ));
        }
        let wt = transpose(b, &self.weight, &[1, 0]);
        let y = matmul(b, x, &wt)?;
        b.add(&y, &self.bias)
    }
}

/// `nn.MultiheadAttention` (batch first, no dropout, no bias on key/value sequences).
#[derive(Clone, Debug)]
pub struct MultiHeadAttention {
    pub q_proj: Linear,
    pub k_proj: Linear,
    pub v_proj: Linear,
    pub out_proj: Linear,
    pub heads: usize,
}

impl MultiHeadAttention {
    /// Creates `name.{q,k,v,out}_proj.{weight,bias}`. `d_model` must be a multiple of `heads`.
    pub fn new(
        b: &mut GraphBuilder,
        name: &str,
        d_model: usize,
        heads: usize,
    ) -> Result<MultiHeadAttention, BuildError> {
        if heads == 0 || !d_model.is_multiple_of(heads) {
            return Err(b.op_error(
                "MultiHeadAttention",
                format!("d_model {d_model} is not a multiple of {heads} heads"),
            ));
        }
        b.scoped(name, |b| {
            Ok(MultiHeadAttention {
                q_proj: Linear::new(b, "q_proj", d_model, d_model)?,
                k_proj: Linear::new(b, "k_proj", d_model, d_model)?,
                v_proj: Linear::new(b, "v_proj", d_model, d_model)?,
                out_proj: Linear::new(b, "out_proj", d_model, d_model)?,
                heads,
            })
        })
    }

    /// `softmax(q kᵀ / sqrt(d_head) + mask) v` per head, heads concatenated, then `out_proj`.
    /// `mask` is added to the attention logits before the softmax (PyTorch's float
    /// `attn_mask`; `-inf` or a large negative value hides a key from a query): UP-DETR's
    /// block-diagonal query groups.
    ///
    /// # Shapes
    /// `query [N, Tq, D]`, `key [N, Tk, D]`, `value [N, Tk, D]`, `mask` broadcastable to
    /// `[N, heads, Tq, Tk]` (usually `[Tq, Tk]`) -> `[N, Tq, D]`. `Tq`, `Tk` and `D` fixed.
    pub fn forward(
        &self,
        b: &mut GraphBuilder,
        query: &Value,
        key: &Value,
        value: &Value,
        mask: Option<&Value>,
    ) -> Result<Value, BuildError> {
        let d = self.q_proj.in_features;
        let h = self.heads;
        let dh = d / h;
        let fixed = |b: &GraphBuilder, v: &Value| {
            v.dim(1).fixed().ok_or_else(|| {
                b.op_error(
                    "MultiHeadAttention",
                    format!(
                        "`{}` {} needs a token count fixed at build time",
                        v.name(),
                        shape_string(v.shape())
                    ),
                )
            })
        };
        let tq = fixed(b, query)?;
        let tk = fixed(b, key)?;
        let split_heads = |b: &mut GraphBuilder, x: &Value, t: i64| -> Result<Value, BuildError> {
            let x = b.reshape(x, &[0, t, h as i64, dh as i64])?;
            Ok(transpose(b, &x, &[0, 2, 1, 3]))
        };
        let q = self.q_proj.forward(b, query)?;
        let k = self.k_proj.forward(b, key)?;
        let v = self.v_proj.forward(b, value)?;
        let q = split_heads(b, &q, tq)?;
        let k = split_heads(b, &k, tk)?;
        let v = split_heads(b, &v, tk)?;
        let scale = b.const_f32(1.0 / (dh as f32).sqrt());
        let q = b.mul(&q, &scale)?;
        let kt = transpose(b, &k, &[0, 1, 3, 2]);
        let mut logits = matmul(b, &q, &kt)?;
        if let Some(m) = mask {
            logits = b.add(&logits, m)?;
        }
        let attn = b.node1(
            "Softmax",
            Some("softmax"),
            &[&logits],
            vec![attr::int("axis", -1)],
            DType::F32,
            logits.shape().to_vec(),
        );
        let out = matmul(b, &attn, &v)?;
        let out = transpose(b, &out, &[0, 2, 1, 3]);
        let out = b.reshape(&out, &[0, tq, d as i64])?;
        self.out_proj.forward(b, &out)
    }
}

/// The position-wise feed-forward block: `linear2(relu(linear1(x)))`.
#[derive(Clone, Debug)]
pub struct FeedForward {
    pub linear1: Linear,
    pub linear2: Linear,
}

impl FeedForward {
    fn new(b: &mut GraphBuilder, d_model: usize, hidden: usize) -> Result<FeedForward, BuildError> {
        Ok(FeedForward {
            linear1: Linear::new(b, "linear1", d_model, hidden)?,
            linear2: Linear::new(b, "linear2", hidden, d_model)?,
        })
    }

    /// # Shapes
    /// `[.., D] -> [.., D]`.
    pub fn forward(&self, b: &mut GraphBuilder, x: &Value) -> Result<Value, BuildError> {
        let h = self.linear1.forward(b, x)?;
        let h = b.relu(&h);
        self.linear2.forward(b, &h)
    }
}

fn residual_norm(
    b: &mut GraphBuilder,
    norm: &LayerNorm,
    x: &Value,
    y: &Value,
) -> Result<Value, TrainError> {
    let s = b.add(x, y)?;
    norm.forward(b, &s)
}

fn add_pos(b: &mut GraphBuilder, x: &Value, pos: Option<&Value>) -> Result<Value, BuildError> {
    match pos {
        Some(p) => b.add(x, p),
        None => Ok(x.clone()),
    }
}

/// A post-norm encoder layer (DETR's `TransformerEncoderLayer`, `normalize_before=False`).
#[derive(Clone, Debug)]
pub struct EncoderLayer {
    pub self_attn: MultiHeadAttention,
    pub ffn: FeedForward,
    pub norm1: LayerNorm,
    pub norm2: LayerNorm,
}

impl EncoderLayer {
    /// Creates the layer's parameters under `name`.
    pub fn new(
        b: &mut GraphBuilder,
        name: &str,
        d_model: usize,
        heads: usize,
        hidden: usize,
    ) -> Result<EncoderLayer, TrainError> {
        b.scoped(name, |b| {
            Ok(EncoderLayer {
                self_attn: MultiHeadAttention::new(b, "self_attn", d_model, heads)?,
                ffn: FeedForward::new(b, d_model, hidden)?,
                norm1: LayerNormConfig::new(&[d_model]).init(b, "norm1")?,
                norm2: LayerNormConfig::new(&[d_model]).init(b, "norm2")?,
            })
        })
    }

    /// `x = norm1(x + attn(x + pos, x + pos, x)); x = norm2(x + ffn(x))`.
    ///
    /// # Shapes
    /// `src [N, T, D]`, `pos [T, D]` (or `[N, T, D]`) -> `[N, T, D]`.
    pub fn forward(
        &self,
        b: &mut GraphBuilder,
        src: &Value,
        pos: Option<&Value>,
    ) -> Result<Value, TrainError> {
        let qk = add_pos(b, src, pos)?;
        let a = self.self_attn.forward(b, &qk, &qk, src, None)?;
        let x = residual_norm(b, &self.norm1, src, &a)?;
        let f = self.ffn.forward(b, &x)?;
        residual_norm(b, &self.norm2, &x, &f)
    }
}

/// A post-norm decoder layer (DETR's `TransformerDecoderLayer`): self-attention among the
/// queries, cross-attention to the encoder's memory, feed-forward.
#[derive(Clone, Debug)]
pub struct DecoderLayer {
    pub self_attn: MultiHeadAttention,
    pub cross_attn: MultiHeadAttention,
    pub ffn: FeedForward,
    pub norm1: LayerNorm,
    pub norm2: LayerNorm,
    pub norm3: LayerNorm,
}

impl DecoderLayer {
    /// Creates the layer's parameters under `name`.
    pub fn new(
        b: &mut GraphBuilder,
        name: &str,
        d_model: usize,
        heads: usize,
        hidden: usize,
    ) -> Result<DecoderLayer, TrainError> {
        b.scoped(name, |b| {
            Ok(DecoderLayer {
                self_attn: MultiHeadAttention::new(b, "self_attn", d_model, heads)?,
                cross_attn: MultiHeadAttention::new(b, "cross_attn", d_model, heads)?,
                ffn: FeedForward::new(b, d_model, hidden)?,
                norm1: LayerNormConfig::new(&[d_model]).init(b, "norm1")?,
                norm2: LayerNormConfig::new(&[d_model]).init(b, "norm2")?,
                norm3: LayerNormConfig::new(&[d_model]).init(b, "norm3")?,
            })
        })
    }

    /// `t = norm1(t + self_attn(t + qpos, t + qpos, t, mask));
    /// t = norm2(t + cross_attn(t + qpos, memory + pos, memory)); t = norm3(t + ffn(t))`.
    ///
    /// # Shapes
    /// `tgt [N, Q, D]`, `memory [N, T, D]`, `query_pos [Q, D]`, `pos [T, D]`,
    /// `self_attn_mask` broadcastable to `[N, heads, Q, Q]` -> `[N, Q, D]`.
    pub fn forward(
        &self,
        b: &mut GraphBuilder,
        tgt: &Value,
        memory: &Value,
        query_pos: &Value,
        pos: Option<&Value>,
        self_attn_mask: Option<&Value>,
    ) -> Result<Value, TrainError> {
        let qk = b.add(tgt, query_pos)?;
        let a = self.self_attn.forward(b, &qk, &qk, tgt, self_attn_mask)?;
        let t = residual_norm(b, &self.norm1, tgt, &a)?;
        let q = b.add(&t, query_pos)?;
        let k = add_pos(b, memory, pos)?;
        let c = self.cross_attn.forward(b, &q, &k, memory, None)?;
        let t = residual_norm(b, &self.norm2, &t, &c)?;
        let f = self.ffn.forward(b, &t)?;
        residual_norm(b, &self.norm3, &t, &f)
    }
}

/// DETR's `PositionEmbeddingSine(num_pos_feats = d_model / 2, temperature, normalize=True)` for
/// an `h x w` map without padding, flattened row-major: channel `2i` of the `y` half is
/// `sin(y / temperature^(2i / (D/2)))`, channel `2i + 1` the `cos` at the same frequency, with
/// `y = (row + 1) / (h + 1e-6) * 2π`; then the `x` half likewise.
///
/// # Shapes
/// -> `[h * w, d_model]`; `d_model` must be a multiple of 4.
pub fn sine_position_encoding(h: usize, w: usize, d_model: usize, temperature: f32) -> Tensor {
    let half = d_model / 2;
    let eps = 1e-6f64;
    let scale = 2.0 * std::f64::consts::PI;
    let dim_t: Vec<f64> = (0..half)
        .map(|k| (temperature as f64).powf(2.0 * (k / 2) as f64 / half as f64))
        .collect();
    let mut out = vec![0f32; h * w * d_model];
    for r in 0..h {
        for c in 0..w {
            let y = (r + 1) as f64 / (h as f64 + eps) * scale;
            let x = (c + 1) as f64 / (w as f64 + eps) * scale;
            let row = &mut out[(r * w + c) * d_model..(r * w + c + 1) * d_model];
            for k in 0..half {
                let (py, px) = (y / dim_t[k], x / dim_t[k]);
                let (vy, vx) = if k % 2 == 0 {
                    (py.sin(), px.sin())
                } else {
                    (py.cos(), px.cos())
                };
                row[k] = vy as f32;
                row[half + k] = vx as f32;
            }
        }
    }
    Tensor::F32(ArrayD::from_shape_vec(vec![h * w, d_model], out).expect("[T, D]"))
}

/// A multi-layer perceptron with ReLU between layers (DETR's box head `MLP`).
#[derive(Clone, Debug)]
pub struct Mlp {
    pub layers: Vec<Linear>,
}

impl Mlp {
    /// `layers` linear layers `input -> hidden -> ... -> output`, named `name.layers.{i}`.
    pub fn new(
        b: &mut GraphBuilder,
        name: &str,
        input: usize,
        hidden: usize,
        output: usize,
        layers: usize,
    ) -> Result<Mlp, BuildError> {
        b.scoped(name, |b| {
            (0..layers)
                .map(|i| {
                    let fan_in = if i == 0 { input } else { hidden };
                    let fan_out = if i + 1 == layers { output } else { hidden };
                    Linear::new(b, &format!("layers.{i}"), fan_in, fan_out)
                })
                .collect::<Result<Vec<_>, _>>()
                .map(|layers| Mlp { layers })
        })
    }

    /// # Shapes
    /// `[.., input] -> [.., output]`.
    pub fn forward(&self, b: &mut GraphBuilder, x: &Value) -> Result<Value, BuildError> {
        let mut x = x.clone();
        for (i, l) in self.layers.iter().enumerate() {
            x = l.forward(b, &x)?;
            if i + 1 < self.layers.len() {
                x = b.relu(&x);
            }
        }
        Ok(x)
    }
}

/// A `[N, rows, cols]` zero tensor whose `N` is `like`'s first dimension at run time.
pub(crate) fn zeros_batch(
    b: &mut GraphBuilder,
    like: &Value,
    rows: usize,
    cols: usize,
) -> Result<Value, BuildError> {
    let zero = b.constant(Tensor::F32(ArrayD::zeros(vec![1, rows, cols])));
    let n = b.shape_of(like, 0, 1);
    let rest = b.const_i64(&[rows as i64, cols as i64]);
    let shape = b.concat(&[&n, &rest], 0)?;
    Ok(b.node1(
        "Expand",
        None,
        &[&zero, &shape],
        vec![],
        DType::F32,
        vec![like.dim(0).clone(), Dim::from(rows), Dim::from(cols)],
    ))
}
