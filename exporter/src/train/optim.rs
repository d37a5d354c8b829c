//! Optimizer updates as graph fragments: SGD, AdamW and LARS.
//!
//! SGD and AdamW follow PyTorch 1.13's `torch.optim.SGD` / `torch.optim.AdamW` single-tensor
//! code paths operation by operation (`_single_tensor_sgd`, `_single_tensor_adamw`), including
//! their scalar arithmetic in double precision (see the [module conventions](super)).
//! LARS is "Layer-wise Adaptive Rate Scaling" (You, Gitman, Ginsburg 2017) as the
//! self-supervised papers train with it (SimCLR, BYOL, Barlow Twins); PyTorch has none, see
//! [`LarsConfig`] for the exact formula and which choices are ours.
//!
//! Each optimizer creates, under its `prefix` (default `optim`):
//! - hyperparameter inputs (float64 scalars) `{prefix}.lr`, `{prefix}.momentum`, ...;
//! - state inputs `{prefix}.{slot}.{param}` with PyTorch's slot names (`momentum_buffer`,
//!   `exp_avg`, `exp_avg_sq`, `max_exp_avg_sq`), initially zero;
//! - `{prefix}.step` (int64 scalar, updates done so far, initially 0) where the update depends
//!   on it: SGD creates its momentum buffer at the first step (PyTorch clones the gradient
//!   into it), AdamW's bias correction uses it.
//!
//! and updates every parameter `p` to `p.next`. Two parameter groups with different
//! hyperparameters are two optimizers with different prefixes.

use super::{expect_same_shape, fixed_f32_shape, Fragment, TrainError};
use crate::builder::{GraphBuilder, Value};
use crate::tensor::{DType, Tensor};

/// A parameter, its gradient and whether it takes part in weight decay and adaptation.
#[derive(Clone, Debug)]
pub struct ParamGrad {
    /// The parameter's current value; its name names the state (`fc.weight` -> `fc.weight.next`).
    pub param: Value,
    /// The gradient of the loss with respect to `param`: same shape.
    pub grad: Value,
    /// Excluded from weight decay (every optimizer) and from LARS's trust-ratio adaptation.
    /// The SSL papers exclude biases and normalisation parameters ([`is_bias_or_norm`]);
    /// PyTorch expresses the same with a parameter group whose weight decay is 0.
    pub exclude: bool,
}

impl ParamGrad {
    /// A parameter that takes part in weight decay and adaptation.
    pub fn new(param: &Value, grad: &Value) -> ParamGrad {
        ParamGrad {
            param: param.clone(),
            grad: grad.clone(),
            exclude: false,
        }
    }

    /// A parameter excluded or not by the papers' rule, [`is_bias_or_norm`].
    pub fn by_papers_rule(param: &Value, grad: &Value) -> ParamGrad {
        ParamGrad {
            exclude: is_bias_or_norm(param.name(), param.rank()),
            ..ParamGrad::new(param, grad)
        }
    }
}

/// Whether a parameter is a bias or a normalisation parameter, which BYOL, SimCLR and Barlow
/// Twins exclude from weight decay and LARS adaptation. Barlow Twins' and VICReg's
/// implementations decide by rank (`p.ndim == 1`: biases and batch/group/layer-norm scales and
/// shifts); we also exclude any parameter whose name's last component is `bias`.
pub fn is_bias_or_norm(name: &str, rank: usize) -> bool {
    rank <= 1 || name.rsplit('.').next() == Some("bias")
}

/// An optimizer: adds the update of a set of parameters to a graph.
pub trait Optimizer {
    /// `SGD`, `AdamW`, `LARS`.
    fn name(&self) -> &'static str;

    /// Adds the update of `params` to `b`: creates the optimizer's state and hyperparameter
    /// inputs and returns them with the new values of the parameters and the state.
    fn update(&self, b: &mut GraphBuilder, params: &[ParamGrad]) -> Result<Fragment, TrainError>;
}

fn check_params(fragment: &'static str, params: &[ParamGrad]) -> Result<(), TrainError> {
    if params.is_empty() {
        return Err(TrainError::Empty {
            fragment,
            what: "parameters",
        });
    }
    for p in params {
        fixed_f32_shape(fragment, &p.param)?;
        expect_same_shape(fragment, &p.grad, &p.param)?;
    }
    Ok(())
}

fn check_range(
    fragment: &'static str,
    name: &'static str,
    value: f64,
    ok: bool,
    expected: &'static str,
) -> Result<(), TrainError> {
    if ok && value.is_finite() {
        Ok(())
    } else {
        Err(TrainError::Hyperparameter {
            fragment,
            name,
            value,
            expected,
        })
    }
}

/// The step counter `{prefix}.step` (int64 scalar) and its next value.
fn step_counter(
    f: &mut Fragment,
    b: &mut GraphBuilder,
    prefix: &str,
) -> Result<(Value, Value), TrainError> {
    let name = format!("{prefix}.step");
    let step = f.state(b, &name, Tensor::zeros(DType::I64, &[]))?;
    let one = b.const_scalar(DType::I64, 1.0)?;
    let next = b.add(&step, &one)?;
    f.update(&name, next.clone());
    Ok((step, next))
}

/// A zero-initialised slot `{prefix}.{slot}.{param}` shaped like the parameter.
fn slot(
    f: &mut Fragment,
    b: &mut GraphBuilder,
    prefix: &str,
    slot: &str,
    p: &ParamGrad,
) -> Result<(String, Value), TrainError> {
    let shape = fixed_f32_shape("optimizer", &p.param)?;
    let name = format!("{prefix}.{slot}.{}", p.param.name());
    let v = f.state(b, &name, Tensor::zeros(DType::F32, &shape))?;
    Ok((name, v))
}

/// `c - x` in float64.
fn rsub(b: &mut GraphBuilder, c: f64, x: &Value) -> Result<Value, TrainError> {
    let c = b.const_scalar(DType::F64, c)?;
    Ok(b.sub(&c, x)?)
}

/// `torch.optim.SGD`: `d = g + weight_decay * p`; with momentum, `buf = d` at the first step
/// and `buf = momentum * buf + (1 - dampening) * d` after; `d = d + momentum * buf` (Nesterov)
/// or `d = buf`; `p = p - lr * d`.
///
/// Hyperparameter inputs: `lr`, `weight_decay`, and with momentum `momentum`, `dampening`.
/// Whether there is a momentum buffer at all is decided at build time by `momentum != 0`, as
/// PyTorch decides it by the group's value.
///
/// # Shapes
/// Each parameter and its gradient have the same fixed shape; `{prefix}.momentum_buffer.{p}`
/// has it too.
#[derive(Clone, Debug, PartialEq)]
pub struct SgdConfig {
    /// Learning rate; default 0.1 (torchvision's ImageNet recipe; PyTorch has no default).
    pub lr: f64,
    /// Default 0.9 (PyTorch: 0).
    pub momentum: f64,
    /// Default 0, as in PyTorch.
    pub dampening: f64,
    /// L2 penalty added to the gradient; default 0, as in PyTorch.
    pub weight_decay: f64,
    /// Nesterov momentum; default false. Needs momentum > 0 and dampening 0.
    pub nesterov: bool,
    /// Name prefix of the optimizer's inputs; default `optim`.
    pub prefix: String,
}

impl Default for SgdConfig {
    fn default() -> Self {
        SgdConfig {
            lr: 0.1,
            momentum: 0.9,
            dampening: 0.0,
            weight_decay: 0.0,
            nesterov: false,
            prefix: "optim".into(),
        }
    }
}

impl Optimizer for SgdConfig {
    fn name(&self) -> &'static str {
        "SGD"
    }

    fn update(&self, b: &mut GraphBuilder, params: &[ParamGrad]) -> Result<Fragment, TrainError> {
        const F: &str = "SGD";
        check_range(F, "lr", self.lr, self.lr >= 0.0, "lr >= 0")?;
        check_range(
            F,
            "momentum",
            self.momentum,
            self.momentum >= 0.0,
            "momentum >= 0",
        )?;
        check_range(F, "dampening", self.dampening, true, "a finite number")?;
        let wd = self.weight_decay;
        check_range(F, "weight_decay", wd, wd >= 0.0, "weight_decay >= 0")?;
        if self.nesterov && (self.momentum <= 0.0 || self.dampening != 0.0) {
            return Err(TrainError::Unsupported {
                fragment: F,
                what: format!(
                    "Nesterov momentum requires momentum > 0 and dampening 0 (got {} and {})",
                    self.momentum, self.dampening
                ),
            });
        }
        check_params(F, params)?;
        let pre = &self.prefix;
        let mut f = Fragment::default();
        let lr = f.hyperparameter(b, &format!("{pre}.lr"), self.lr)?;
        let wd = f.hyperparameter(b, &format!("{pre}.weight_decay"), wd)?;
        let lr = b.cast(&lr, DType::F32);
        let wd = b.cast(&wd, DType::F32);
        struct Momentum {
            first: Value,
            momentum: Value,
            keep: Value,
        }
        let momentum = if self.momentum != 0.0 {
            let m = f.hyperparameter(b, &format!("{pre}.momentum"), self.momentum)?;
            let d = f.hyperparameter(b, &format!("{pre}.dampening"), self.dampening)?;
            let (step, _) = step_counter(&mut f, b, pre)?;
            let zero = b.const_scalar(DType::I64, 0.0)?;
            let first = b.equal(&step, &zero)?;
            let keep = rsub(b, 1.0, &d)?;
            Some(Momentum {
                first,
                momentum: b.cast(&m, DType::F32),
                keep: b.cast(&keep, DType::F32),
            })
        } else {
            None
        };
        for p in params {
            let mut d = p.grad.clone();
            if !p.exclude {
                let decay = b.mul(&p.param, &wd)?;
                d = b.add(&d, &decay)?;
            }
            if let Some(m) = &momentum {
                let (name, buf) = slot(&mut f, b, pre, "momentum_buffer", p)?;
                let kept = b.mul(&buf, &m.momentum)?;
                let fresh = b.mul(&d, &m.keep)?;
                let running = b.add(&kept, &fresh)?;
                let buf = b.select(&m.first, &d, &running)?;
                f.update(&name, buf.clone());
                d = if self.nesterov {
                    let ahead = b.mul(&buf, &m.momentum)?;
                    b.add(&d, &ahead)?
                } else {
                    buf
                };
            }
            let step = b.mul(&d, &lr)?;
            let next = b.sub(&p.param, &step)?;
            f.update(p.param.name(), next);
        }
        Ok(f)
    }
}

/// `torch.optim.AdamW` (Loshchilov & Hutter's decoupled weight decay):
/// `t = step + 1`; `p = p * (1 - lr * weight_decay)`; `m = beta1 * m + (1 - beta1) * g`;
/// `v = beta2 * v + (1 - beta2) * g²`; with amsgrad `v_max = max(v_max, v)` replaces `v` below;
/// `p = p - lr / (1 - beta1^t) * m / (sqrt(v) / sqrt(1 - beta2^t) + eps)`.
///
/// Hyperparameter inputs: `lr`, `beta1`, `beta2`, `eps`, `weight_decay`. State:
/// `{prefix}.step`, `{prefix}.exp_avg.{p}`, `{prefix}.exp_avg_sq.{p}` and with amsgrad
/// `{prefix}.max_exp_avg_sq.{p}`. One step counter serves every parameter (PyTorch keeps one per
/// parameter; they are equal when every parameter is updated at every step).
///
/// # Shapes
/// Each parameter and its gradient have the same fixed shape; the slots have it too.
#[derive(Clone, Debug, PartialEq)]
pub struct AdamWConfig {
    /// Default 1e-3, as in PyTorch.
    pub lr: f64,
    /// Default 0.9, as in PyTorch.
    pub beta1: f64,
    /// Default 0.999, as in PyTorch.
    pub beta2: f64,
    /// Default 1e-8, as in PyTorch.
    pub eps: f64,
    /// Decoupled weight decay; default 1e-2, as in PyTorch.
    pub weight_decay: f64,
    /// The AMSGrad variant; default false, as in PyTorch.
    pub amsgrad: bool,
    /// Name prefix of the optimizer's inputs; default `optim`.
    pub prefix: String,
}

impl Default for AdamWConfig {
    fn default() -> Self {
        AdamWConfig {
            lr: 1e-3,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 1e-2,
            amsgrad: false,
            prefix: "optim".into(),
        }
    }
}

impl Optimizer for AdamWConfig {
    fn name(&self) -> &'static str {
        "AdamW"
    }

    fn update(&self, b: &mut GraphBuilder, params: &[ParamGrad]) -> Result<Fragment, TrainError> {
        const F: &str = "AdamW";
        check_range(F, "lr", self.lr, self.lr >= 0.0, "lr >= 0")?;
        let beta_ok = |v: f64| (0.0..1.0).contains(&v);
        check_range(
            F,
            "beta1",
            self.beta1,
            beta_ok(self.beta1),
            "0 <= beta1 < 1",
        )?;
        check_range(
            F,
            "beta2",
            self.beta2,
            beta_ok(self.beta2),
            "0 <= beta2 < 1",
        )?;
        check_range(F, "eps", self.eps, self.eps >= 0.0, "eps >= 0")?;
        let wd = self.weight_decay;
        check_range(F, "weight_decay", wd, wd >= 0.0, "weight_decay >= 0")?;
        check_params(F, params)?;
        let pre = &self.prefix;
        let mut f = Fragment::default();
        let lr = f.hyperparameter(b, &format!("{pre}.lr"), self.lr)?;
        let beta1 = f.hyperparameter(b, &format!("{pre}.beta1"), self.beta1)?;
        let beta2 = f.hyperparameter(b, &format!("{pre}.beta2"), self.beta2)?;
        let eps = f.hyperparameter(b, &format!("{pre}.eps"), self.eps)?;
        let wd = f.hyperparameter(b, &format!("{pre}.weight_decay"), wd)?;
        let (_, t) = step_counter(&mut f, b, pre)?;

        // Scalars, in float64 as PyTorch computes them in Python.
        let t = b.cast(&t, DType::F64);
        let beta1_t = b.pow(&beta1, &t)?;
        let beta2_t = b.pow(&beta2, &t)?;
        let correction1 = rsub(b, 1.0, &beta1_t)?;
        let correction2 = rsub(b, 1.0, &beta2_t)?;
        let step_size = b.div(&lr, &correction1)?;
        let correction2_sqrt = b.sqrt(&correction2);
        let lr_wd = b.mul(&lr, &wd)?;
        let decay = rsub(b, 1.0, &lr_wd)?;
        let keep1 = rsub(b, 1.0, &beta1)?;
        let keep2 = rsub(b, 1.0, &beta2)?;
        // ... rounded to float32 where they meet tensors.
        let [step_size, correction2_sqrt, decay, beta1, keep1, beta2, keep2, eps] = [
            &step_size,
            &correction2_sqrt,
            &decay,
            &beta1,
            &keep1,
            &beta2,
            &keep2,
            &eps,
        ]
        .map(|v| b.cast(v, DType::F32));

        for p in params {
            let param = if p.exclude {
                p.param.clone()
            } else {
                b.mul(&p.param, &decay)?
            };
            let (m_name, m) = slot(&mut f, b, pre, "exp_avg", p)?;
            let (v_name, v) = slot(&mut f, b, pre, "exp_avg_sq", p)?;
            let m_kept = b.mul(&m, &beta1)?;
            let m_fresh = b.mul(&p.grad, &keep1)?;
            let m = b.add(&m_kept, &m_fresh)?;
            let v_kept = b.mul(&v, &beta2)?;
            let g2 = b.mul(&p.grad, &p.grad)?;
            let v_fresh = b.mul(&g2, &keep2)?;
            let v = b.add(&v_kept, &v_fresh)?;
            f.update(&m_name, m.clone());
            f.update(&v_name, v.clone());
            let second = if self.amsgrad {
                let (max_name, v_max) = slot(&mut f, b, pre, "max_exp_avg_sq", p)?;
                let v_max = b.max2(&v_max, &v)?;
                f.update(&max_name, v_max.clone());
                v_max
            } else {
                v
            };
            let root = b.sqrt(&second);
            let scaled = b.div(&root, &correction2_sqrt)?;
            let denom = b.add(&scaled, &eps)?;
            let ratio = b.div(&m, &denom)?;
            let step = b.mul(&ratio, &step_size)?;
            let next = b.sub(&param, &step)?;
            f.update(p.param.name(), next);
        }
        Ok(f)
    }
}

/// How LARS measures the gradient in its trust ratio.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TrustRatio {
    /// `eta * ||w|| / (||g|| + weight_decay * ||w||)`: the LARS paper's Algorithm 1, NVIDIA
    /// Apex's LARC and timm's `Lars`.
    Paper,
    /// `eta * ||w|| / ||g + weight_decay * w||`: the norm of the decayed gradient, as the
    /// SimCLR (TensorFlow) and Barlow Twins implementations compute it.
    DecayedGradient,
}

/// LARS, with PyTorch's momentum convention. For each parameter not excluded:
/// `d = g + weight_decay * w`; `trust = eta * ||w|| / (||g|| + weight_decay * ||w||)` (or the
/// [`TrustRatio::DecayedGradient`] form), `trust = 1` where `||w||` or the gradient norm is 0;
/// `d = trust * d`. For an excluded parameter `d = g` (no decay, no adaptation).
/// Then `buf = momentum * buf + d` (buffer initially 0, so the first step's buffer is `d`, as
/// PyTorch's SGD clones it) and `w = w - lr * buf`.
///
/// Our choices: the learning rate multiplies the buffer (PyTorch's SGD convention, used by the
/// Barlow Twins and timm implementations; SimCLR's TensorFlow code puts it inside the buffer,
/// which differs only while the learning rate changes); no epsilon in the trust ratio (timm
/// adds 1e-8); norms are Frobenius norms over the whole parameter tensor.
///
/// Hyperparameter inputs: `lr`, `momentum`, `weight_decay`, `eta`. State:
/// `{prefix}.momentum_buffer.{p}`.
///
/// # Shapes
/// Each parameter and its gradient have the same fixed shape; the buffer has it too.
#[derive(Clone, Debug, PartialEq)]
pub struct LarsConfig {
    /// Default 0.2 (BYOL's base rate for batch 256; the papers scale it by batch / 256).
    pub lr: f64,
    /// Default 0.9 (SimCLR, BYOL, Barlow Twins).
    pub momentum: f64,
    /// Default 1.5e-6 (BYOL, Barlow Twins).
    pub weight_decay: f64,
    /// Trust coefficient; default 1e-3 (the LARS paper, SimCLR, BYOL, Barlow Twins).
    pub eta: f64,
    /// Default [`TrustRatio::Paper`].
    pub trust_ratio: TrustRatio,
    /// Name prefix of the optimizer's inputs; default `optim`.
    pub prefix: String,
}

impl Default for LarsConfig {
    fn default() -> Self {
        LarsConfig {
            lr: 0.2,
            momentum: 0.9,
            weight_decay: 1.5e-6,
            eta: 1e-3,
            trust_ratio: TrustRatio::Paper,
            prefix: "optim".into(),
        }
    }
}

impl Optimizer for LarsConfig {
    fn name(&self) -> &'static str {
        "LARS"
    }

    fn update(&self, b: &mut GraphBuilder, params: &[ParamGrad]) -> Result<Fragment, TrainError> {
        const F: &str = "LARS";
        check_range(F, "lr", self.lr, self.lr >= 0.0, "lr >= 0")?;
        check_range(
            F,
            "momentum",
            self.momentum,
            self.momentum >= 0.0,
            "momentum >= 0",
        )?;
        let wd = self.weight_decay;
        check_range(F, "weight_decay", wd, wd >= 0.0, "weight_decay >= 0")?;
        check_range(F, "eta", self.eta, self.eta > 0.0, "eta > 0")?;
        check_params(F, params)?;
        let pre = &self.prefix;
        let mut f = Fragment::default();
        let lr = f.hyperparameter(b, &format!("{pre}.lr"), self.lr)?;
        let momentum = f.hyperparameter(b, &format!("{pre}.momentum"), self.momentum)?;
        let wd = f.hyperparameter(b, &format!("{pre}.weight_decay"), wd)?;
        let eta = f.hyperparameter(b, &format!("{pre}.eta"), self.eta)?;
        let [lr, momentum, wd, eta] = [&lr, &momentum, &wd, &eta].map(|v| b.cast(v, DType::F32));
        let zero = b.const_f32(0.0);
        let one = b.const_f32(1.0);
        for p in params {
            let d = if p.exclude {
                p.grad.clone()
            } else {
                let decay = b.mul(&p.param, &wd)?;
                let d = b.add(&p.grad, &decay)?;
                let w_norm = frobenius(b, &p.param)?;
                let (g_norm, denom) = match self.trust_ratio {
                    TrustRatio::Paper => {
                        let g_norm = frobenius(b, &p.grad)?;
                        let decay_norm = b.mul(&w_norm, &wd)?;
                        let denom = b.add(&g_norm, &decay_norm)?;
                        (g_norm, denom)
                    }
                    TrustRatio::DecayedGradient => {
                        let d_norm = frobenius(b, &d)?;
                        (d_norm.clone(), d_norm)
                    }
                };
                let scaled = b.mul(&w_norm, &eta)?;
                let ratio = b.div(&scaled, &denom)?;
                let g_positive = b.greater(&g_norm, &zero)?;
                let w_positive = b.greater(&w_norm, &zero)?;
                let ratio = b.select(&g_positive, &ratio, &one)?;
                let trust = b.select(&w_positive, &ratio, &one)?;
                b.mul(&d, &trust)?
            };
            let (name, buf) = slot(&mut f, b, pre, "momentum_buffer", p)?;
            let kept = b.mul(&buf, &momentum)?;
            let buf = b.add(&kept, &d)?;
            f.update(&name, buf.clone());
            let step = b.mul(&buf, &lr)?;
            let next = b.sub(&p.param, &step)?;
            f.update(p.param.name(), next);
        }
        Ok(f)
    }
}

/// The Frobenius (L2) norm of a whole tensor, a float32 scalar.
pub(crate) fn frobenius(b: &mut GraphBuilder, x: &Value) -> Result<Value, TrainError> {
    let sum = b.reduce_sum_square(x, &[], false)?;
    Ok(b.sqrt(&sum))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::builder::Dim;
    use crate::train::InputRole;

    fn param_and_grad(b: &mut GraphBuilder, name: &str, shape: &[i64]) -> ParamGrad {
        let dims: Vec<Dim> = shape.iter().map(|&d| d.into()).collect();
        let p = b.input(name, DType::F32, dims.clone()).unwrap();
        let g = b.input(&format!("grad.{name}"), DType::F32, dims).unwrap();
        ParamGrad::by_papers_rule(&p, &g)
    }

    #[test]
    fn papers_rule_excludes_biases_and_norm_parameters() {
        assert!(is_bias_or_norm("layer1.0.bn1.weight", 1));
        assert!(is_bias_or_norm("fc.bias", 1));
        assert!(is_bias_or_norm("head.proj.bias", 2));
        assert!(!is_bias_or_norm("layer1.0.conv1.weight", 4));
        assert!(!is_bias_or_norm("fc.weight", 2));
    }

    #[test]
    fn sgd_names_its_inputs_and_outputs_after_the_parameters() {
        let mut b = GraphBuilder::new("t", 0);
        let w = param_and_grad(&mut b, "fc.weight", &[3, 2]);
        let bias = param_and_grad(&mut b, "fc.bias", &[3]);
        assert!(bias.exclude && !w.exclude);
        let f = SgdConfig::default().update(&mut b, &[w, bias]).unwrap();
        let state: Vec<&str> = f
            .inputs
            .iter()
            .filter(|i| i.role == InputRole::State)
            .map(|i| i.name.as_str())
            .collect();
        assert_eq!(
            state,
            [
                "optim.step",
                "optim.momentum_buffer.fc.weight",
                "optim.momentum_buffer.fc.bias"
            ]
        );
        let hyper: Vec<(&str, f64)> = f.hyperparameters().collect();
        assert_eq!(
            hyper,
            [
                ("optim.lr", 0.1),
                ("optim.weight_decay", 0.0),
                ("optim.momentum", 0.9),
                ("optim.dampening", 0.0)
            ]
        );
        let updated: Vec<&str> = f.updates.iter().map(|u| u.name.as_str()).collect();
        assert_eq!(
            updated,
            [
                "optim.step",
                "optim.momentum_buffer.fc.weight",
                "fc.weight",
                "optim.momentum_buffer.fc.bias",
                "fc.bias"
            ]
        );
        assert_eq!(
            f.next_of("fc.weight").unwrap().shape(),
            &[3.into(), 2.into()]
        );
    }

    #[test]
    fn sgd_without_momentum_has_no_buffer_and_no_step() {
        let mut b = GraphBuilder::new("t", 0);
        let w = param_and_grad(&mut b, "w", &[4]);
        let config = SgdConfig {
            momentum: 0.0,
            ..SgdConfig::default()
        };
        let f = config.update(&mut b, &[w]).unwrap();
        assert!(f.inputs.iter().all(|i| i.role == InputRole::Hyperparameter));
        assert_eq!(f.updates.len(), 1);
    }

    #[test]
    fn bad_configurations_are_refused_with_the_reason() {
        let mut b = GraphBuilder::new("t", 0);
        let w = param_and_grad(&mut b, "w", &[4]);
        let nesterov = SgdConfig {
            nesterov: true,
            dampening: 0.1,
            ..SgdConfig::default()
        };
        let e = nesterov
            .update(&mut b, std::slice::from_ref(&w))
            .unwrap_err()
            .to_string();
        assert!(e.contains("Nesterov") && e.contains("dampening"), "{e}");
        let beta = AdamWConfig {
            beta2: 1.0,
            ..AdamWConfig::default()
        };
        let e = beta
            .update(&mut b, std::slice::from_ref(&w))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("beta2 = 1") && e.contains("0 <= beta2 < 1"),
            "{e}"
        );
        let e = LarsConfig::default()
            .update(&mut b, &[])
            .unwrap_err()
            .to_string();
        assert!(e.contains("LARS") && e.contains("no parameters"), "{e}");
    }

    #[test]
    fn gradients_must_match_their_parameters() {
        let mut b = GraphBuilder::new("t", 0);
        let p = b.input("w", DType::F32, vec![3.into(), 2.into()]).unwrap();
        let g = b.input("g", DType::F32, vec![2.into(), 3.into()]).unwrap();
        let e = AdamWConfig::default()
            .update(&mut b, &[ParamGrad::new(&p, &g)])
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("`g` has shape [2,3]") && e.contains("`w`"),
            "{e}"
        );
        let dynamic = b.input("d", DType::F32, vec![Dim::from("N")]).unwrap();
        let e = AdamWConfig::default()
            .update(&mut b, &[ParamGrad::new(&dynamic, &dynamic)])
            .unwrap_err()
            .to_string();
        assert!(e.contains("fixed at build time"), "{e}");
    }

    #[test]
    fn adamw_amsgrad_adds_a_max_slot() {
        let mut b = GraphBuilder::new("t", 0);
        let w = param_and_grad(&mut b, "w", &[2, 2]);
        let config = AdamWConfig {
            amsgrad: true,
            ..AdamWConfig::default()
        };
        let f = config.update(&mut b, &[w]).unwrap();
        assert!(f.next_of("optim.max_exp_avg_sq.w").is_some());
        assert!(f.next_of("optim.exp_avg.w").is_some());
        assert!(f.next_of("optim.step").is_some());
    }
}
