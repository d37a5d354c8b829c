//! A toy train step written by hand: a two-layer MLP regressor trained by SGD with momentum,
//! its gradients spelled out node by node, and a synthetic data set for it.
//!
//! It exercises every role of the artifact contract (batch, param, optimizer, buffer, hyper;
//! loss, metric, state) without densa's autodiff, so the trainer can be tested on its own,
//! and it shows producers of artifacts what a train step looks like.
//!
//! The model: `p = fc2(relu(fc1(x)))`, loss `mean((p - y)^2)`, metric `mae = mean(|p - y|)`.
//! The update, PyTorch's `SGD(momentum)`: `v <- momentum * v + g`, `w <- w - lr * v`. A buffer
//! `steps` counts the updates applied.
//!
//! # Shapes
//! - `x`: `[N, inputs]`, `y`: `[N, 1]` (N symbolic)
//! - `fc1.weight`: `[hidden, inputs]`, `fc1.bias`: `[hidden]`, `fc2.weight`: `[1, hidden]`,
//!   `fc2.bias`: `[1]`; each has a momentum slot `<name>.momentum` of the same shape
//! - `steps`, `lr`, `momentum`, `loss`, `mae`: `[]`

use densa_exporter::builder::attr;
use densa_exporter::onnx::ModelProto;
use densa_exporter::weights::StateDict;
use densa_exporter::{BuildError, DType, Dim, GraphBuilder, Tensor, Value};
use ndarray::{ArrayD, IxDyn};
use rand::{RngExt, SeedableRng};
use rand_chacha::ChaCha8Rng;

use super::data::{Batch, DataError, Samples};
use super::manifest::{Artifact, InputRole, Manifest, OutputRole};

/// Configuration of the toy MLP regressor.
#[derive(Clone, Debug, PartialEq)]
pub struct MlpConfig {
    /// Input features. Default 4.
    pub inputs: usize,
    /// Hidden units. Default 16.
    pub hidden: usize,
    /// Default learning rate (the `lr` input's default). Default 0.05.
    pub lr: f64,
    /// Default momentum. Default 0.9.
    pub momentum: f64,
    /// Seed of the initial weights. Default 0.
    pub seed: u64,
}

impl Default for MlpConfig {
    fn default() -> MlpConfig {
        MlpConfig {
            inputs: 4,
            hidden: 16,
            lr: 0.05,
            momentum: 0.9,
            seed: 0,
        }
    }
}

/// The parameters of the MLP, in order.
const PARAMS: [&str; 4] = ["fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"];

/// The train step graph of the MLP regressor (see the module docs).
pub fn mlp_train_step(config: &MlpConfig) -> Result<ModelProto, BuildError> {
    let (d, h) = (config.inputs, config.hidden);
    let mut b = GraphBuilder::new("mlp_regression_train_step", config.seed);
    let f32s = |dims: &[usize]| dims.iter().map(|&n| Dim::from(n)).collect::<Vec<_>>();
    let x = b.input("x", DType::F32, vec!["N".into(), Dim::from(d)])?;
    let y = b.input("y", DType::F32, vec!["N".into(), Dim::from(1)])?;
    let shapes: [Vec<usize>; 4] = [vec![h, d], vec![h], vec![1, h], vec![1]];
    let mut params = Vec::new();
    for (name, shape) in PARAMS.iter().zip(&shapes) {
        params.push(b.input(name, DType::F32, f32s(shape))?);
    }
    let mut slots = Vec::new();
    for (name, shape) in PARAMS.iter().zip(&shapes) {
        slots.push(b.input(&format!("{name}.momentum"), DType::F32, f32s(shape))?);
    }
    let steps = b.input("steps", DType::F32, vec![])?;
    let lr = b.input("lr", DType::F32, vec![])?;
    let momentum = b.input("momentum", DType::F32, vec![])?;

    // Forward.
    let z = b.linear(Some("fc1"), &x, &params[0], Some(&params[1]))?;
    let hid = b.relu(&z);
    let p = b.linear(Some("fc2"), &hid, &params[2], Some(&params[3]))?;
    let diff = b.binary("Sub", &p, &y)?;
    let sq = b.binary("Mul", &diff, &diff)?;
    let loss = mean_all(&mut b, &sq);
    let abs = b.unary("Abs", &diff);
    let mae = mean_all(&mut b, &abs);

    // Backward: dloss/dp = 2 (p - y) / N.
    let n = b.shape_of(&diff, 0, 1);
    let n = b.node1(
        "Cast",
        None,
        &[&n],
        vec![attr::int("to", 1)],
        DType::F32,
        vec![1.into()],
    );
    let two = b.const_f32(2.0);
    let scale = b.binary("Div", &two, &n)?;
    let dp = b.binary("Mul", &diff, &scale)?;
    let g_w2 = matmul_t(&mut b, &dp, &hid)?; // dpᵀ · h: [1, H]
    let g_b2 = sum_rows(&mut b, &dp);
    let dh = b.node1(
        "MatMul",
        None,
        &[&dp, &params[2]],
        vec![],
        DType::F32,
        vec![x.dim(0).clone(), Dim::from(h)],
    );
    let zero = b.const_f32(0.0);
    let positive = b.node1(
        "Greater",
        None,
        &[&z, &zero],
        vec![],
        DType::Bool,
        z.shape().to_vec(),
    );
    let mask = b.node1(
        "Cast",
        None,
        &[&positive],
        vec![attr::int("to", 1)],
        DType::F32,
        z.shape().to_vec(),
    );
    let dz = b.binary("Mul", &dh, &mask)?;
    let g_w1 = matmul_t(&mut b, &dz, &x)?; // dzᵀ · x: [H, D]
    let g_b1 = sum_rows(&mut b, &dz);
    let grads = [g_w1, g_b1, g_w2, g_b2];

    b.output(&loss, "loss")?;
    b.output(&mae, "mae")?;
    for ((name, (w, v)), g) in PARAMS.iter().zip(params.iter().zip(&slots)).zip(&grads) {
        let decayed = b.binary("Mul", &momentum, v)?;
        let v_next = b.binary("Add", &decayed, g)?;
        let step = b.binary("Mul", &lr, &v_next)?;
        let w_next = b.binary("Sub", w, &step)?;
        b.output(&w_next, &format!("{name}.next"))?;
        b.output(&v_next, &format!("{name}.momentum.next"))?;
    }
    let one = b.const_f32(1.0);
    let steps_next = b.binary("Add", &steps, &one)?;
    b.output(&steps_next, "steps.next")?;
    Ok(b.finish())
}

/// `ReduceMean` over every axis: a scalar.
fn mean_all(b: &mut GraphBuilder, x: &Value) -> Value {
    b.node1(
        "ReduceMean",
        None,
        &[x],
        vec![attr::int("keepdims", 0)],
        x.dtype(),
        vec![],
    )
}

/// `ReduceSum` over axis 0.
fn sum_rows(b: &mut GraphBuilder, x: &Value) -> Value {
    let axes = b.const_i64(&[0]);
    b.node1(
        "ReduceSum",
        None,
        &[x, &axes],
        vec![attr::int("keepdims", 0)],
        x.dtype(),
        x.shape()[1..].to_vec(),
    )
}

/// `aᵀ · c` for `a [N, P]`, `c [N, Q]`: `[P, Q]`.
fn matmul_t(b: &mut GraphBuilder, a: &Value, c: &Value) -> Result<Value, BuildError> {
    let at = b.node1(
        "Transpose",
        None,
        &[a],
        vec![attr::ints("perm", &[1, 0])],
        a.dtype(),
        vec![a.dim(1).clone(), a.dim(0).clone()],
    );
    Ok(b.node1(
        "MatMul",
        None,
        &[&at, c],
        vec![],
        a.dtype(),
        vec![a.dim(1).clone(), c.dim(1).clone()],
    ))
}

/// The manifest of [`mlp_train_step`].
pub fn mlp_manifest(config: &MlpConfig) -> Manifest {
    let mut m = Manifest::new()
        .task("toy-mlp-regression")
        .batch("x")
        .batch("y");
    for name in PARAMS {
        m = m.state(name, InputRole::Param, &format!("{name}.next"));
    }
    for name in PARAMS {
        m = m.state(
            &format!("{name}.momentum"),
            InputRole::Optimizer,
            &format!("{name}.momentum.next"),
        );
    }
    m.state("steps", InputRole::Buffer, "steps.next")
        .hyper("lr", config.lr)
        .hyper("momentum", config.momentum)
        .output("loss", OutputRole::Loss)
        .output("mae", OutputRole::Metric)
}

/// The initial state: PyTorch's `Linear` init (U(-1/sqrt(fan_in), 1/sqrt(fan_in))) from
/// ChaCha8 seeded with `config.seed`, zero momentum, zero step count.
pub fn mlp_initial_state(config: &MlpConfig) -> StateDict {
    let (d, h) = (config.inputs, config.hidden);
    let mut rng = ChaCha8Rng::seed_from_u64(config.seed);
    let mut uniform = |shape: &[usize], fan_in: usize| {
        let bound = 1.0 / (fan_in as f32).sqrt();
        let n = shape.iter().product();
        let values = (0..n).map(|_| rng.random_range(-bound..bound)).collect();
        Tensor::F32(ArrayD::from_shape_vec(IxDyn(shape), values).expect("sized"))
    };
    let mut sd = StateDict::new();
    sd.insert("fc1.weight", uniform(&[h, d], d));
    sd.insert("fc1.bias", uniform(&[h], d));
    sd.insert("fc2.weight", uniform(&[1, h], h));
    sd.insert("fc2.bias", uniform(&[1], h));
    let zeros: Vec<(String, Tensor)> = sd
        .iter()
        .map(|(n, t)| {
            (
                format!("{n}.momentum"),
                Tensor::zeros(DType::F32, t.shape()),
            )
        })
        .collect();
    for (n, t) in zeros {
        sd.insert(n, t);
    }
    sd.insert("steps", Tensor::zeros(DType::F32, &[]));
    sd
}

/// The whole toy artifact (graph, manifest, initial state), validated.
pub fn mlp_artifact(config: &MlpConfig) -> Result<Artifact, super::TrainError> {
    let graph = mlp_train_step(config).map_err(|e| super::ManifestError::Entry {
        path: "<toy>".into(),
        name: "mlp_train_step".into(),
        problem: e.to_string(),
    })?;
    Ok(Artifact::new(
        mlp_manifest(config),
        graph,
        mlp_initial_state(config),
    )?)
}

/// A synthetic regression data set: `x ~ U(-1, 1)^inputs`, `y = sin(2 x0) + x1 x2 - 0.5 x3`
/// (features beyond 4 are noise the model must learn to ignore; fewer than 4 drop terms).
pub struct RegressionSamples {
    x: Vec<Vec<f32>>,
    y: Vec<f32>,
    seed: u64,
}

impl RegressionSamples {
    /// `n` samples of `inputs` features drawn from ChaCha8 seeded with `seed`.
    pub fn new(n: usize, inputs: usize, seed: u64) -> RegressionSamples {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let x: Vec<Vec<f32>> = (0..n)
            .map(|_| {
                (0..inputs)
                    .map(|_| rng.random_range(-1.0f32..1.0))
                    .collect()
            })
            .collect();
        let y = x
            .iter()
            .map(|v| {
                let at = |i: usize| v.get(i).copied().unwrap_or(0.0);
                (2.0 * at(0)).sin() + at(1) * at(2) - 0.5 * at(3)
            })
            .collect();
        RegressionSamples { x, y, seed }
    }
}

impl Samples for RegressionSamples {
    fn len(&self) -> usize {
        self.x.len()
    }

    fn sample(&mut self, index: usize, _: &mut ChaCha8Rng) -> Result<Batch, DataError> {
        let x = &self.x[index];
        Ok(vec![
            (
                "x".into(),
                Tensor::F32(ArrayD::from_shape_vec(IxDyn(&[x.len()]), x.clone()).expect("sized")),
            ),
            (
                "y".into(),
                Tensor::F32(ArrayD::from_elem(IxDyn(&[1]), self.y[index])),
            ),
        ])
    }

    fn describe(&self) -> String {
        format!("synthetic-regression n={} seed={}", self.x.len(), self.seed)
    }
}
