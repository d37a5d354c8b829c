//! Elementwise arithmetic, comparisons, reductions and reshapes: the primitive ops that
//! training-mode normalisation, optimizer updates and losses are written with.
//!
//! Each method adds one ONNX node (opset [`OPSET`](super::OPSET) = 17) and computes the result's
//! shape like [`ops`](super::ops) does: symbolic where the op preserves a symbolic dimension,
//! [`Dim::Unknown`] where arithmetic on a symbol would be needed. In opset 17 `ReduceSum` takes
//! its axes as an input while `ReduceMean`, `ReduceMax`, `ReduceProd` and `ReduceSumSquare`
//! take them as an attribute; the methods hide that difference.

use ndarray::ArrayD;

use super::ops::broadcast;
use super::{attr, shape_string, BuildError, Dim, GraphBuilder, Shape, Value};
use crate::tensor::{DType, Tensor};

/// The reductions of [`GraphBuilder::reduce`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reduction {
    /// `ReduceSum`.
    Sum,
    /// `ReduceMean`.
    Mean,
    /// `ReduceSumSquare`: the sum of squares.
    SumSquare,
    /// `ReduceMax`.
    Max,
    /// `ReduceProd`.
    Prod,
}

impl Reduction {
    fn op(self) -> &'static str {
        match self {
            Reduction::Sum => "ReduceSum",
            Reduction::Mean => "ReduceMean",
            Reduction::SumSquare => "ReduceSumSquare",
            Reduction::Max => "ReduceMax",
            Reduction::Prod => "ReduceProd",
        }
    }
}

impl GraphBuilder {
    /// `Sub`: `a - b`, broadcasting.
    pub fn sub(&mut self, a: &Value, b: &Value) -> Result<Value, BuildError> {
        self.binary("Sub", a, b)
    }

    /// `Mul`: `a * b`, broadcasting.
    pub fn mul(&mut self, a: &Value, b: &Value) -> Result<Value, BuildError> {
        self.binary("Mul", a, b)
    }

    /// `Div`: `a / b`, broadcasting.
    pub fn div(&mut self, a: &Value, b: &Value) -> Result<Value, BuildError> {
        self.binary("Div", a, b)
    }

    /// `Pow`: `a ^ b`, broadcasting (both of the same float type here).
    pub fn pow(&mut self, a: &Value, b: &Value) -> Result<Value, BuildError> {
        self.binary("Pow", a, b)
    }

    /// `Max` of two values, elementwise, broadcasting.
    pub fn max2(&mut self, a: &Value, b: &Value) -> Result<Value, BuildError> {
        self.binary("Max", a, b)
    }

    /// `Min` of two values, elementwise, broadcasting.
    pub fn min2(&mut self, a: &Value, b: &Value) -> Result<Value, BuildError> {
        self.binary("Min", a, b)
    }

    /// `Sqrt`.
    pub fn sqrt(&mut self, x: &Value) -> Value {
        self.unary("Sqrt", x)
    }

    /// `Neg`.
    pub fn neg(&mut self, x: &Value) -> Value {
        self.unary("Neg", x)
    }

    /// `Abs`.
    pub fn abs(&mut self, x: &Value) -> Value {
        self.unary("Abs", x)
    }

    /// `Sum` of several values of one type, broadcasting.
    ///
    /// # Shapes
    /// The broadcast of all operand shapes.
    pub fn sum_all(&mut self, xs: &[&Value]) -> Result<Value, BuildError> {
        let first = xs
            .first()
            .ok_or_else(|| self.op_error("Sum", "no operands"))?;
        let mut shape = first.shape().to_vec();
        for x in &xs[1..] {
            if x.dtype() != first.dtype() {
                return Err(self.op_error(
                    "Sum",
                    format!(
                        "`{}` is {} but `{}` is {}",
                        x.name(),
                        x.dtype(),
                        first.name(),
                        first.dtype()
                    ),
                ));
            }
            shape = broadcast(&shape, x.shape()).ok_or_else(|| {
                self.op_error(
                    "Sum",
                    format!(
                        "`{}` {} does not broadcast with {}",
                        x.name(),
                        shape_string(x.shape()),
                        shape_string(&shape)
                    ),
                )
            })?;
        }
        Ok(self.node1("Sum", None, xs, vec![], first.dtype(), shape))
    }

    /// A comparison (`Less`, `Greater`, `Equal`): a bool value of the broadcast shape.
    pub fn compare(&mut self, op: &str, a: &Value, b: &Value) -> Result<Value, BuildError> {
        if a.dtype() != b.dtype() {
            return Err(self.op_error(
                op,
                format!(
                    "`{}` is {} but `{}` is {}",
                    a.name(),
                    a.dtype(),
                    b.name(),
                    b.dtype()
                ),
            ));
        }
        let shape = broadcast(a.shape(), b.shape()).ok_or_else(|| {
            self.op_error(
                op,
                format!(
                    "shapes {} and {} do not broadcast",
                    shape_string(a.shape()),
                    shape_string(b.shape())
                ),
            )
        })?;
        Ok(self.node1(op, None, &[a, b], vec![], DType::Bool, shape))
    }

    /// `Less`: `a < b`.
    pub fn less(&mut self, a: &Value, b: &Value) -> Result<Value, BuildError> {
        self.compare("Less", a, b)
    }

    /// `Greater`: `a > b`.
    pub fn greater(&mut self, a: &Value, b: &Value) -> Result<Value, BuildError> {
        self.compare("Greater", a, b)
    }

    /// `Equal`: `a == b`.
    pub fn equal(&mut self, a: &Value, b: &Value) -> Result<Value, BuildError> {
        self.compare("Equal", a, b)
    }

    /// `Where`: `if_true` where `condition` holds, `if_false` elsewhere (all three broadcast).
    pub fn select(
        &mut self,
        condition: &Value,
        if_true: &Value,
        if_false: &Value,
    ) -> Result<Value, BuildError> {
        if condition.dtype() != DType::Bool {
            return Err(self.op_error(
                "Where",
                format!(
                    "condition `{}` is {}, expected bool",
                    condition.name(),
                    condition.dtype()
                ),
            ));
        }
        if if_true.dtype() != if_false.dtype() {
            return Err(self.op_error(
                "Where",
                format!(
                    "`{}` is {} but `{}` is {}",
                    if_true.name(),
                    if_true.dtype(),
                    if_false.name(),
                    if_false.dtype()
                ),
            ));
        }
        let shape = broadcast(if_true.shape(), if_false.shape())
            .and_then(|s| broadcast(condition.shape(), &s))
            .ok_or_else(|| {
                self.op_error(
                    "Where",
                    format!(
                        "shapes {}, {} and {} do not broadcast",
                        shape_string(condition.shape()),
                        shape_string(if_true.shape()),
                        shape_string(if_false.shape())
                    ),
                )
            })?;
        Ok(self.node1(
            "Where",
            None,
            &[condition, if_true, if_false],
            vec![],
            if_true.dtype(),
            shape,
        ))
    }

    /// `Cast` to `dtype`.
    pub fn cast(&mut self, x: &Value, dtype: DType) -> Value {
        self.node1(
            "Cast",
            None,
            &[x],
            vec![attr::int("to", dtype.onnx() as i64)],
            dtype,
            x.shape().to_vec(),
        )
    }

    /// A constant scalar (rank 0) of `dtype` holding `value` (converted).
    pub fn const_scalar(&mut self, dtype: DType, value: f64) -> Result<Value, BuildError> {
        let t = match dtype {
            DType::F32 => Tensor::F32(ArrayD::from_elem(vec![], value as f32)),
            DType::F64 => Tensor::F64(ArrayD::from_elem(vec![], value)),
            DType::I64 => Tensor::I64(ArrayD::from_elem(vec![], value as i64)),
            DType::I32 => Tensor::I32(ArrayD::from_elem(vec![], value as i32)),
            other => {
                return Err(self.op_error(
                    "Constant",
                    format!("scalar constants of type {other} are not supported"),
                ))
            }
        };
        Ok(self.constant(t))
    }

    /// A reduction over `axes` (negative counts from the end; empty means every axis).
    ///
    /// # Shapes
    /// `x`'s shape with the reduced axes set to 1 (`keepdims`) or removed.
    pub fn reduce(
        &mut self,
        reduction: Reduction,
        x: &Value,
        axes: &[i64],
        keepdims: bool,
    ) -> Result<Value, BuildError> {
        let op = reduction.op();
        let rank = x.rank() as i64;
        let mut normalized: Vec<i64> = Vec::with_capacity(axes.len());
        for &a in axes {
            let n = if a < 0 { a + rank } else { a };
            if !(0..rank).contains(&n) {
                return Err(self.op_error(
                    op,
                    format!(
                        "axis {a} is out of range for `{}` {}",
                        x.name(),
                        shape_string(x.shape())
                    ),
                ));
            }
            if normalized.contains(&n) {
                return Err(self.op_error(op, format!("axis {a} is listed twice")));
            }
            normalized.push(n);
        }
        if normalized.is_empty() {
            normalized = (0..rank).collect();
        }
        normalized.sort_unstable();
        let shape: Shape = x
            .shape()
            .iter()
            .enumerate()
            .filter_map(
                |(i, d)| match (normalized.contains(&(i as i64)), keepdims) {
                    (false, _) => Some(d.clone()),
                    (true, true) => Some(Dim::Fixed(1)),
                    (true, false) => None,
                },
            )
            .collect();
        let keep = attr::int("keepdims", keepdims as i64);
        Ok(if reduction == Reduction::Sum {
            let axes_value = self.const_i64(&normalized);
            self.node1(op, None, &[x, &axes_value], vec![keep], x.dtype(), shape)
        } else {
            let attrs = vec![attr::ints("axes", &normalized), keep];
            self.node1(op, None, &[x], attrs, x.dtype(), shape)
        })
    }

    /// `ReduceSum` over `axes`; see [`reduce`](Self::reduce).
    pub fn reduce_sum(
        &mut self,
        x: &Value,
        axes: &[i64],
        keepdims: bool,
    ) -> Result<Value, BuildError> {
        self.reduce(Reduction::Sum, x, axes, keepdims)
    }

    /// `ReduceMean` over `axes`; see [`reduce`](Self::reduce).
    pub fn reduce_mean(
        &mut self,
        x: &Value,
        axes: &[i64],
        keepdims: bool,
    ) -> Result<Value, BuildError> {
        self.reduce(Reduction::Mean, x, axes, keepdims)
    }

    /// `ReduceSumSquare` over `axes`; see [`reduce`](Self::reduce).
    pub fn reduce_sum_square(
        &mut self,
        x: &Value,
        axes: &[i64],
        keepdims: bool,
    ) -> Result<Value, BuildError> {
        self.reduce(Reduction::SumSquare, x, axes, keepdims)
    }

    /// `Reshape` to a constant target (`0` copies the input's dimension, one `-1` is inferred).
    ///
    /// # Shapes
    /// The target, with `0` and `-1` resolved where the input's dimensions are known.
    pub fn reshape(&mut self, x: &Value, target: &[i64]) -> Result<Value, BuildError> {
        if target.iter().filter(|&&d| d == -1).count() > 1 {
            return Err(self.op_error("Reshape", format!("target {target:?} has two -1")));
        }
        if target.iter().any(|&d| d < -1) {
            return Err(self.op_error("Reshape", format!("target {target:?} has a negative size")));
        }
        let mut shape: Shape = Vec::with_capacity(target.len());
        for (i, &d) in target.iter().enumerate() {
            shape.push(match d {
                0 => x.shape().get(i).cloned().ok_or_else(|| {
                    self.op_error(
                        "Reshape",
                        format!(
                            "target {target:?} copies axis {i} of `{}` {}, which has no such axis",
                            x.name(),
                            shape_string(x.shape())
                        ),
                    )
                })?,
                -1 => Dim::Unknown,
                d => Dim::Fixed(d),
            });
        }
        let total = x
            .shape()
            .iter()
            .try_fold(1i64, |acc, d| d.fixed().map(|v| acc * v));
        let known = shape
            .iter()
            .enumerate()
            .filter(|(i, _)| target[*i] != -1)
            .try_fold(1i64, |acc, (_, d)| d.fixed().map(|v| acc * v));
        if let Some(pos) = target.iter().position(|&d| d == -1) {
            if let (Some(total), Some(known)) = (total, known) {
                if known == 0 || total % known != 0 {
                    return Err(self.op_error(
                        "Reshape",
                        format!(
                            "`{}` {} cannot be reshaped to {target:?}",
                            x.name(),
                            shape_string(x.shape())
                        ),
                    ));
                }
                shape[pos] = Dim::Fixed(total / known);
            }
        } else if let (Some(total), Some(known)) = (total, known) {
            if total != known {
                return Err(self.op_error(
                    "Reshape",
                    format!(
                        "`{}` {} has {total} elements, target {target:?} has {known}",
                        x.name(),
                        shape_string(x.shape())
                    ),
                ));
            }
        }
        let target_value = self.const_i64(target);
        Ok(self.node1(
            "Reshape",
            None,
            &[x, &target_value],
            vec![],
            x.dtype(),
            shape,
        ))
    }

    /// `Reshape` of `x` to the runtime shape of `like` (an elementwise inverse of a reshape).
    ///
    /// # Shapes
    /// `like`'s shape; the element counts must agree at run time.
    pub fn reshape_like(&mut self, x: &Value, like: &Value) -> Value {
        let target = self.shape_of(like, 0, like.rank() as i64);
        self.node1(
            "Reshape",
            None,
            &[x, &target],
            vec![],
            x.dtype(),
            like.shape().to_vec(),
        )
    }

    /// The number of elements of `x` over `axes` (all axes when empty) at run time, as a scalar
    /// of `dtype`: `Shape -> Gather -> ReduceProd -> Cast`. A constant when those dimensions
    /// are known at build time.
    pub fn count_over(
        &mut self,
        x: &Value,
        axes: &[i64],
        dtype: DType,
    ) -> Result<Value, BuildError> {
        let rank = x.rank() as i64;
        let axes: Vec<i64> = if axes.is_empty() {
            (0..rank).collect()
        } else {
            axes.iter()
                .map(|&a| if a < 0 { a + rank } else { a })
                .collect()
        };
        if let Some(&bad) = axes.iter().find(|&&a| !(0..rank).contains(&a)) {
            return Err(self.op_error(
                "Shape",
                format!(
                    "axis {bad} is out of range for `{}` {}",
                    x.name(),
                    shape_string(x.shape())
                ),
            ));
        }
        let known = axes
            .iter()
            .try_fold(1i64, |acc, &a| x.dim(a).fixed().map(|v| acc * v));
        if let Some(n) = known {
            return self.const_scalar(dtype, n as f64);
        }
        let shape = self.shape_of(x, 0, rank);
        let indices = self.const_i64(&axes);
        let picked = self.node1(
            "Gather",
            None,
            &[&shape, &indices],
            vec![attr::int("axis", 0)],
            DType::I64,
            vec![Dim::Fixed(axes.len() as i64)],
        );
        let n = self.reduce(Reduction::Prod, &picked, &[0], false)?;
        Ok(self.cast(&n, dtype))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn builder_with_x() -> (GraphBuilder, Value) {
        let mut b = GraphBuilder::new("t", 0);
        let x = b
            .input(
                "x",
                DType::F32,
                vec![Dim::from("N"), 4.into(), 3.into(), 5.into()],
            )
            .unwrap();
        (b, x)
    }

    #[test]
    fn reductions_keep_or_drop_axes() {
        let (mut b, x) = builder_with_x();
        let m = b.reduce_mean(&x, &[0, 2, 3], true).unwrap();
        assert_eq!(
            m.shape(),
            &[Dim::Fixed(1), Dim::Fixed(4), 1.into(), 1.into()]
        );
        let s = b.reduce_sum(&x, &[-1, 1], false).unwrap();
        assert_eq!(s.shape(), &[Dim::from("N"), Dim::Fixed(3)]);
        let all = b.reduce_sum_square(&x, &[], false).unwrap();
        assert!(all.shape().is_empty());
        let e = b.reduce_sum(&x, &[4], true).unwrap_err().to_string();
        assert!(
            e.contains("axis 4 is out of range") && e.contains("`x`"),
            "{e}"
        );
        let e = b.reduce_mean(&x, &[1, -3], true).unwrap_err().to_string();
        assert!(e.contains("listed twice"), "{e}");
    }

    #[test]
    fn reshape_resolves_zero_and_minus_one() {
        let (mut b, x) = builder_with_x();
        let g = b.reshape(&x, &[0, 2, -1]).unwrap();
        assert_eq!(g.shape(), &[Dim::from("N"), Dim::Fixed(2), Dim::Unknown]);
        let c = b
            .input("c", DType::F32, vec![1.into(), 4.into(), 1.into()])
            .unwrap();
        let flat = b.reshape(&c, &[-1]).unwrap();
        assert_eq!(flat.shape(), &[Dim::Fixed(4)]);
        let e = b.reshape(&c, &[3, -1]).unwrap_err().to_string();
        assert!(e.contains("cannot be reshaped"), "{e}");
        let e = b.reshape(&c, &[5]).unwrap_err().to_string();
        assert!(e.contains("has 4 elements"), "{e}");
    }

    #[test]
    fn comparisons_and_where_check_types() {
        let (mut b, x) = builder_with_x();
        let zero = b.const_f32(0.0);
        let pos = b.greater(&x, &zero).unwrap();
        assert_eq!(pos.dtype(), DType::Bool);
        assert_eq!(pos.shape(), x.shape());
        let y = b.select(&pos, &x, &zero).unwrap();
        assert_eq!(y.shape(), x.shape());
        let e = b.select(&x, &x, &zero).unwrap_err().to_string();
        assert!(e.contains("expected bool"), "{e}");
        let i = b.const_scalar(DType::I64, 1.0).unwrap();
        let e = b.less(&x, &i).unwrap_err().to_string();
        assert!(e.contains("float32") && e.contains("int64"), "{e}");
    }

    #[test]
    fn count_is_constant_when_known() {
        let (mut b, x) = builder_with_x();
        let n = b.count_over(&x, &[1, 2], DType::F32).unwrap();
        assert_eq!(
            b.initializer_value(n.name()),
            Some(&Tensor::F32(ArrayD::from_elem(vec![], 12.0)))
        );
        let m = b.count_over(&x, &[0, 2, 3], DType::F32).unwrap();
        assert!(b.initializer_value(m.name()).is_none());
        assert!(m.shape().is_empty());
    }
}
