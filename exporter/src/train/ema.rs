//! The exponential moving average of a momentum encoder ("momentum update" in MoCo, the
//! target network of BYOL, the teacher of DINO): `k = m * k + (1 - m) * q` for each teacher
//! value `k` and its student value `q`, with `m` a scalar hyperparameter input (scheduled by
//! BYOL and DINO from 0.996 towards 1, see [`schedule`](super::schedule)).
//!
//! `1 - m` is computed in float64 and both factors are rounded to float32 where they meet the
//! tensors, as MoCo's `param_k.data * m + param_q.data * (1. - m)` does in PyTorch.

use super::{expect_same_shape, fixed_f32_shape, Fragment, TrainError};
use crate::builder::{GraphBuilder, Value};
use crate::tensor::DType;

/// Configuration of [`ema_update`].
#[derive(Clone, Debug, PartialEq)]
pub struct EmaConfig {
    /// Default of the hyperparameter input `{prefix}.momentum`; default 0.996 (BYOL's base;
    /// MoCo uses 0.999).
    pub momentum: f64,
    /// Name prefix of the input; default `ema`.
    pub prefix: String,
}

impl Default for EmaConfig {
    fn default() -> Self {
        EmaConfig {
            momentum: 0.996,
            prefix: "ema".into(),
        }
    }
}

/// Adds `teacher.next = m * teacher + (1 - m) * student` for each `(teacher, student)` pair.
/// Returns the hyperparameter input `{prefix}.momentum` and one update per teacher value,
/// named after it (`teacher.fc.weight` -> `teacher.fc.weight.next`).
///
/// # Shapes
/// Each teacher value and its student value have the same fixed shape.
pub fn ema_update(
    b: &mut GraphBuilder,
    pairs: &[(Value, Value)],
    config: &EmaConfig,
) -> Result<Fragment, TrainError> {
    const F: &str = "EMA";
    if pairs.is_empty() {
        return Err(TrainError::Empty {
            fragment: F,
            what: "teacher/student pairs",
        });
    }
    if !(0.0..=1.0).contains(&config.momentum) {
        return Err(TrainError::Hyperparameter {
            fragment: F,
            name: "momentum",
            value: config.momentum,
            expected: "0 <= momentum <= 1",
        });
    }
    for (teacher, student) in pairs {
        fixed_f32_shape(F, teacher)?;
        expect_same_shape(F, student, teacher)?;
    }
    let mut f = Fragment::default();
    let m = f.hyperparameter(b, &format!("{}.momentum", config.prefix), config.momentum)?;
    let one = b.const_scalar(DType::F64, 1.0)?;
    let rest = b.sub(&one, &m)?;
    let m = b.cast(&m, DType::F32);
    let rest = b.cast(&rest, DType::F32);
    for (teacher, student) in pairs {
        let kept = b.mul(teacher, &m)?;
        let taken = b.mul(student, &rest)?;
        let next = b.add(&kept, &taken)?;
        f.update(teacher.name(), next);
    }
    Ok(f)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ema_updates_each_teacher_and_checks_shapes() {
        let mut b = GraphBuilder::new("t", 0);
        let k = b
            .input("teacher.w", DType::F32, vec![2.into(), 3.into()])
            .unwrap();
        let q = b
            .input("student.w", DType::F32, vec![2.into(), 3.into()])
            .unwrap();
        let f = ema_update(&mut b, &[(k.clone(), q)], &EmaConfig::default()).unwrap();
        assert_eq!(f.next_of("teacher.w").unwrap().shape(), k.shape());
        let wrong = b
            .input("student.v", DType::F32, vec![3.into(), 2.into()])
            .unwrap();
        let config = EmaConfig {
            prefix: "ema2".into(),
            ..EmaConfig::default()
        };
        let e = ema_update(&mut b, &[(k, wrong)], &config)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("`student.v`") && e.contains("`teacher.w`"),
            "{e}"
        );
    }
}
