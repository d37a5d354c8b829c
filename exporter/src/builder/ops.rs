//! Ops of the builder: one method per ONNX operator, each checking its operands and computing
//! the result's shape (symbolic where the input is symbolic and the op preserves it, unknown
//! where arithmetic on a symbol would be needed).

use super::{attr, BuildError, Dim, GraphBuilder, Shape, Value};
use crate::tensor::DType;

/// Attributes of a 2-D convolution or pooling window.
#[derive(Clone, Debug, PartialEq)]
pub struct Window2d {
    /// Kernel height and width.
    pub kernel: [i64; 2],
    /// Strides.
    pub stride: [i64; 2],
    /// Padding `[top, left, bottom, right]` (ONNX order: begins then ends).
    pub pads: [i64; 4],
    /// Dilations.
    pub dilation: [i64; 2],
}

impl Window2d {
    /// A square window with symmetric padding.
    pub fn square(kernel: i64, stride: i64, padding: i64) -> Window2d {
        Window2d {
            kernel: [kernel; 2],
            stride: [stride; 2],
            pads: [padding; 4],
            dilation: [1; 2],
        }
    }

    fn out_dim(&self, input: &Dim, axis: usize) -> Dim {
        match input {
            Dim::Fixed(n) => {
                let span = self.dilation[axis] * (self.kernel[axis] - 1) + 1;
                let padded = n + self.pads[axis] + self.pads[axis + 2];
                Dim::Fixed((padded - span).div_euclid(self.stride[axis]) + 1)
            }
            Dim::Param(_)
                if self.kernel[axis] == 1
                    && self.stride[axis] == 1
                    && self.pads[axis] == 0
                    && self.pads[axis + 2] == 0 =>
            {
                input.clone()
            }
            Dim::Param(_)
                if self.stride[axis] == 1
                    && self.pads[axis] + self.pads[axis + 2]
                        == self.dilation[axis] * (self.kernel[axis] - 1) =>
            {
                input.clone()
            }
            _ => Dim::Unknown,
        }
    }

    fn attributes(&self) -> Vec<crate::onnx::AttributeProto> {
        vec![
            attr::ints("kernel_shape", &self.kernel),
            attr::ints("strides", &self.stride),
            attr::ints("pads", &self.pads),
            attr::ints("dilations", &self.dilation),
        ]
    }
}

/// NumPy broadcasting of two shapes, as far as it can be known.
pub fn broadcast(a: &[Dim], b: &[Dim]) -> Option<Shape> {
    let rank = a.len().max(b.len());
    let mut out = Vec::with_capacity(rank);
    for i in 0..rank {
        let da = if i + a.len() >= rank {
            &a[i + a.len() - rank]
        } else {
            &Dim::Fixed(1)
        };
        let db = if i + b.len() >= rank {
            &b[i + b.len() - rank]
        } else {
            &Dim::Fixed(1)
        };
        out.push(match (da, db) {
            (Dim::Fixed(1), d) | (d, Dim::Fixed(1)) => d.clone(),
            (Dim::Fixed(x), Dim::Fixed(y)) if x != y => return None,
            (x, y) if x == y => x.clone(),
            (Dim::Fixed(x), _) | (_, Dim::Fixed(x)) => Dim::Fixed(*x),
            (Dim::Param(x), _) | (_, Dim::Param(x)) => Dim::Param(x.clone()),
            _ => Dim::Unknown,
        });
    }
    Some(out)
}

impl GraphBuilder {
    fn expect_rank(&self, op: &str, v: &Value, rank: usize) -> Result<(), BuildError> {
        if v.rank() != rank {
            return Err(self.op_error(
                op,
                format!(
                    "input `{}` has rank {} ({}), expected {rank}",
                    v.name(),
                    v.rank(),
                    super::shape_string(v.shape())
                ),
            ));
        }
        Ok(())
    }

    /// `Conv`: `x` [N, C, H, W], `w` [M, C/group, kh, kw], optional `bias` [M].
    ///
    /// # Shapes
    /// `[N, C, H, W] -> [N, M, H', W']`.
    pub fn conv2d(
        &mut self,
        name: Option<&str>,
        x: &Value,
        w: &Value,
        bias: Option<&Value>,
        window: &Window2d,
        group: i64,
    ) -> Result<Value, BuildError> {
        self.expect_rank("Conv", x, 4)?;
        self.expect_rank("Conv", w, 4)?;
        if let (Some(c), Some(wc)) = (x.dim(1).fixed(), w.dim(1).fixed()) {
            if c != wc * group {
                return Err(self.op_error(
                    "Conv",
                    format!(
                        "input `{}` has {c} channels but weight `{}` expects {} (group {group})",
                        x.name(),
                        w.name(),
                        wc * group
                    ),
                ));
            }
        }
        let (kh, kw) = (w.dim(2).fixed(), w.dim(3).fixed());
        if (kh, kw) != (Some(window.kernel[0]), Some(window.kernel[1])) {
            return Err(self.op_error(
                "Conv",
                format!(
                    "weight `{}` does not have the kernel {:?}",
                    w.name(),
                    window.kernel
                ),
            ));
        }
        let shape = vec![
            x.dim(0).clone(),
            w.dim(0).clone(),
            window.out_dim(x.dim(2), 0),
            window.out_dim(x.dim(3), 1),
        ];
        let mut attrs = window.attributes();
        attrs.push(attr::int("group", group));
        let mut inputs = vec![Some(x), Some(w)];
        if let Some(b) = bias {
            inputs.push(Some(b));
        }
        Ok(self
            .node("Conv", name, &inputs, attrs, vec![(x.dtype(), shape)])
            .remove(0))
    }

    /// `BatchNormalization` in inference mode (uses the running statistics in `params`).
    pub fn batch_norm(
        &mut self,
        name: Option<&str>,
        x: &Value,
        params: [&Value; 4],
        epsilon: f32,
    ) -> Result<Value, BuildError> {
        if x.rank() < 2 {
            return Err(self.op_error(
                "BatchNormalization",
                format!("input `{}` must have a channel axis", x.name()),
            ));
        }
        let [scale, bias, mean, var] = params;
        let attrs = vec![
            attr::float("epsilon", epsilon),
            attr::float("momentum", 0.9),
        ];
        Ok(self.node1(
            "BatchNormalization",
            name,
            &[x, scale, bias, mean, var],
            attrs,
            x.dtype(),
            x.shape().to_vec(),
        ))
    }

    /// A unary op that keeps the shape (`Relu`, `Sigmoid`, `Exp`...).
    pub fn unary(&mut self, op: &str, x: &Value) -> Value {
        self.node1(op, None, &[x], vec![], x.dtype(), x.shape().to_vec())
    }

    /// `Relu`.
    pub fn relu(&mut self, x: &Value) -> Value {
        self.unary("Relu", x)
    }

    /// A broadcasting binary op (`Add`, `Sub`, `Mul`, `Div`, `Pow`).
    pub fn binary(&mut self, op: &str, a: &Value, b: &Value) -> Result<Value, BuildError> {
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
                    super::shape_string(a.shape()),
                    super::shape_string(b.shape())
                ),
            )
        })?;
        Ok(self.node1(op, None, &[a, b], vec![], a.dtype(), shape))
    }

    /// `Add`.
    pub fn add(&mut self, a: &Value, b: &Value) -> Result<Value, BuildError> {
        self.binary("Add", a, b)
    }

    /// `MaxPool` over a 2-D window.
    pub fn max_pool2d(&mut self, x: &Value, window: &Window2d) -> Result<Value, BuildError> {
        self.expect_rank("MaxPool", x, 4)?;
        let shape = vec![
            x.dim(0).clone(),
            x.dim(1).clone(),
            window.out_dim(x.dim(2), 0),
            window.out_dim(x.dim(3), 1),
        ];
        Ok(self.node1("MaxPool", None, &[x], window.attributes(), x.dtype(), shape))
    }

    /// `GlobalAveragePool`: `[N, C, H, W] -> [N, C, 1, 1]`.
    pub fn global_avg_pool(&mut self, x: &Value) -> Result<Value, BuildError> {
        self.expect_rank("GlobalAveragePool", x, 4)?;
        let shape = vec![
            x.dim(0).clone(),
            x.dim(1).clone(),
            Dim::Fixed(1),
            Dim::Fixed(1),
        ];
        Ok(self.node1("GlobalAveragePool", None, &[x], vec![], x.dtype(), shape))
    }

    /// `Flatten` at `axis`.
    pub fn flatten(&mut self, x: &Value, axis: i64) -> Value {
        let r = x.rank() as i64;
        let axis = if axis < 0 { axis + r } else { axis } as usize;
        let prod = |dims: &[Dim]| -> Dim {
            dims.iter()
                .try_fold(1i64, |acc, d| d.fixed().map(|v| acc * v))
                .map(Dim::Fixed)
                .unwrap_or(Dim::Unknown)
        };
        let shape = vec![
            if axis == 1 {
                x.dim(0).clone()
            } else {
                prod(&x.shape()[..axis])
            },
            prod(&x.shape()[axis..]),
        ];
        self.node1(
            "Flatten",
            None,
            &[x],
            vec![attr::int("axis", axis as i64)],
            x.dtype(),
            shape,
        )
    }

    /// `Gemm` with `transB = 1`: `x [N, K] · w[M, K]ᵀ + b[M]`, PyTorch's `Linear`.
    pub fn linear(
        &mut self,
        name: Option<&str>,
        x: &Value,
        w: &Value,
        b: Option<&Value>,
    ) -> Result<Value, BuildError> {
        self.expect_rank("Gemm", x, 2)?;
        self.expect_rank("Gemm", w, 2)?;
        if let (Some(k), Some(wk)) = (x.dim(1).fixed(), w.dim(1).fixed()) {
            if k != wk {
                return Err(self.op_error(
                    "Gemm",
                    format!(
                        "`{}` has {k} features, `{}` expects {wk}",
                        x.name(),
                        w.name()
                    ),
                ));
            }
        }
        let shape = vec![x.dim(0).clone(), w.dim(0).clone()];
        let mut inputs = vec![Some(x), Some(w)];
        if let Some(b) = b {
            inputs.push(Some(b));
        }
        Ok(self
            .node(
                "Gemm",
                name,
                &inputs,
                vec![attr::int("transB", 1)],
                vec![(x.dtype(), shape)],
            )
            .remove(0))
    }

    /// `Shape` of `x`, dimensions `start..end`.
    pub fn shape_of(&mut self, x: &Value, start: i64, end: i64) -> Value {
        let r = x.rank() as i64;
        let s = if start < 0 { start + r } else { start }.clamp(0, r);
        let e = if end < 0 { end + r } else { end }.clamp(0, r);
        self.node1(
            "Shape",
            None,
            &[x],
            vec![attr::int("start", s), attr::int("end", e)],
            DType::I64,
            vec![Dim::Fixed((e - s).max(0))],
        )
    }

    /// `Concat` along `axis`.
    pub fn concat(&mut self, xs: &[&Value], axis: i64) -> Result<Value, BuildError> {
        let first = xs
            .first()
            .ok_or_else(|| self.op_error("Concat", "no inputs"))?;
        let r = first.rank() as i64;
        let a = if axis < 0 { axis + r } else { axis } as usize;
        let mut shape = first.shape().to_vec();
        let mut total = Some(0i64);
        for x in xs {
            if x.rank() != first.rank() {
                return Err(self.op_error(
                    "Concat",
                    format!(
                        "`{}` has rank {}, `{}` has {}",
                        x.name(),
                        x.rank(),
                        first.name(),
                        first.rank()
                    ),
                ));
            }
            total = total.and_then(|t| x.dim(a as i64).fixed().map(|v| t + v));
        }
        shape[a] = total.map(Dim::Fixed).unwrap_or(Dim::Unknown);
        Ok(self.node1(
            "Concat",
            None,
            xs,
            vec![attr::int("axis", a as i64)],
            first.dtype(),
            shape,
        ))
    }

    /// Nearest-neighbour `Resize` of `x` [N, C, H, W] to the spatial size of `like`, with
    /// PyTorch's `F.interpolate(mode="nearest")` semantics (asymmetric coordinates, floor).
    pub fn resize_nearest_like(&mut self, x: &Value, like: &Value) -> Result<Value, BuildError> {
        self.expect_rank("Resize", x, 4)?;
        self.expect_rank("Resize", like, 4)?;
        self.resize_like(x, like, "nearest", "asymmetric", Some("floor"))
    }

    /// Bilinear `Resize` of `x` [N, C, H, W] to the spatial size of `like`, with PyTorch's
    /// `F.interpolate(mode="bilinear", align_corners=False)` semantics (half-pixel centres).
    pub fn resize_bilinear_like(&mut self, x: &Value, like: &Value) -> Result<Value, BuildError> {
        self.expect_rank("Resize", x, 4)?;
        self.expect_rank("Resize", like, 4)?;
        self.resize_like(x, like, "linear", "half_pixel", None)
    }

    /// `Resize` of rank-4 `x` to the spatial size of rank-4 `like` (sizes read at run time).
    fn resize_like(
        &mut self,
        x: &Value,
        like: &Value,
        mode: &str,
        coordinates: &str,
        nearest_mode: Option<&str>,
    ) -> Result<Value, BuildError> {
        let nc = self.shape_of(x, 0, 2);
        let hw = self.shape_of(like, 2, 4);
        let sizes = self.concat(&[&nc, &hw], 0)?;
        let shape = vec![
            x.dim(0).clone(),
            x.dim(1).clone(),
            like.dim(2).clone(),
            like.dim(3).clone(),
        ];
        let mut attrs = vec![
            attr::string("mode", mode),
            attr::string("coordinate_transformation_mode", coordinates),
        ];
        attrs.extend(nearest_mode.map(|m| attr::string("nearest_mode", m)));
        Ok(self
            .node(
                "Resize",
                None,
                &[Some(x), None, None, Some(&sizes)],
                attrs,
                vec![(x.dtype(), shape)],
            )
            .remove(0))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn conv_shapes() {
        let mut b = GraphBuilder::new("t", 0);
        let x = b
            .input(
                "x",
                DType::F32,
                vec![Dim::from("N"), 3.into(), 224.into(), Dim::from("W")],
            )
            .unwrap();
        let w = b
            .param(
                "w",
                &[64, 3, 7, 7],
                super::super::Init::Zeros,
                super::super::ParamKind::Param,
            )
            .unwrap();
        let y = b
            .conv2d(None, &x, &w, None, &Window2d::square(7, 2, 3), 1)
            .unwrap();
        assert_eq!(
            y.shape(),
            &[
                Dim::from("N"),
                Dim::Fixed(64),
                Dim::Fixed(112),
                Dim::Unknown
            ]
        );
        let w3 = b
            .param(
                "w3",
                &[64, 64, 3, 3],
                super::super::Init::Zeros,
                super::super::ParamKind::Param,
            )
            .unwrap();
        let z = b
            .conv2d(None, &y, &w3, None, &Window2d::square(3, 1, 1), 1)
            .unwrap();
        assert_eq!(z.shape()[2], Dim::Fixed(112));
    }

    #[test]
    fn conv_channel_mismatch_names_the_values() {
        let mut b = GraphBuilder::new("t", 0);
        let x = b
            .input(
                "x",
                DType::F32,
                vec![1.into(), 4.into(), 8.into(), 8.into()],
            )
            .unwrap();
        let w = b
            .param(
                "w",
                &[8, 3, 3, 3],
                super::super::Init::Zeros,
                super::super::ParamKind::Param,
            )
            .unwrap();
        let e = b
            .conv2d(None, &x, &w, None, &Window2d::square(3, 1, 1), 1)
            .unwrap_err()
            .to_string();
        assert!(e.contains("`x` has 4 channels") && e.contains("`w`"), "{e}");
    }

    #[test]
    fn broadcasting() {
        let s = broadcast(&[Dim::from("N"), 3.into(), 1.into()], &[4.into()]).unwrap();
        assert_eq!(s, vec![Dim::from("N"), Dim::Fixed(3), Dim::Fixed(4)]);
        assert!(broadcast(&[3.into()], &[4.into()]).is_none());
    }
}
