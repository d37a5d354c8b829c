//! Pooling.
//!
//! - MaxPool: the gradient is scattered to the argmax of each window: the `Indices` output
//!   (flat indices into the input) drives `ScatterElements(reduction=add)` on the flattened
//!   input (opset 16). Without an `Indices` output the pooling is recomputed with one.
//! - AveragePool: a transposed convolution of the output gradient with a kernel of ones (per
//!   channel, through a `[N·C, 1, H, W]` reshape), divided by the window size, or by the count
//!   of non-padding elements per window (`count_include_pad = 0`, computed by a convolution of
//!   ones). `ceil_mode = 1` is accepted when the known sizes show it adds no window.
//! - GlobalAveragePool: the gradient spread evenly. GlobalMaxPool: to the maxima, split between
//!   ties.

use super::conv::{conv_input_grad, Geom};
use super::{AutodiffError, Ctx, Step};
use crate::builder::{attr, Dim};
use crate::tensor::{DType, Tensor};

type Grads = Result<Vec<Option<String>>, AutodiffError>;

fn pool_kernel(s: &Step) -> Result<Vec<i64>, AutodiffError> {
    attr::get_ints(&s.node.attribute, "kernel_shape")
        .map(<[i64]>::to_vec)
        .ok_or_else(|| s.unsupported("no kernel_shape"))
}

/// MaxPool.
pub(crate) fn max_pool(cx: &mut Ctx, s: &Step) -> Grads {
    let mut out = s.none();
    if !s.need(0) {
        return Ok(out);
    }
    cx.require_opset(s, 16, "ScatterElements with reduction=add")?;
    let dy = s.dy0()?.to_string();
    let x = s.x(0)?;
    if attr::get_int(&s.node.attribute, "storage_order", 0) != 0 {
        return Err(s.unsupported("storage_order = 1 (column-major indices)"));
    }
    let indices = match s.node.output.get(1).filter(|o| !o.is_empty()) {
        Some(i) => i.clone(),
        None => {
            let outs = cx.e.op_n("MaxPool", &[x], s.node.attribute.clone(), 2);
            outs[1].clone()
        }
    };
    let dtype = cx.dtype(s, x)?;
    let e = &mut cx.e;
    let size = e.op("Size", &[x], vec![]);
    let size1 = e.reshape_const(&size, &[1]);
    let zeros = e.zeros_of_shape(&size1, dtype);
    let flat_i = e.reshape_const(&indices, &[-1]);
    let flat_g = e.reshape_const(&dy, &[-1]);
    let scattered = e.op(
        "ScatterElements",
        &[&zeros, &flat_i, &flat_g],
        vec![attr::int("axis", 0), attr::string("reduction", "add")],
    );
    out[0] = Some(e.reshape_like(&scattered, x));
    Ok(out)
}

/// AveragePool.
pub(crate) fn average_pool(cx: &mut Ctx, s: &Step) -> Grads {
    let mut out = s.none();
    if !s.need(0) {
        return Ok(out);
    }
    let dy = s.dy0()?.to_string();
    let x = s.x(0)?;
    let xs = cx.shape(s, x)?;
    let dtype = cx.dtype(s, x)?;
    let kernel = pool_kernel(s)?;
    let n = kernel.len();
    if xs.len() != n + 2 {
        return Err(s.unsupported("kernel_shape does not match the input rank"));
    }
    let g = Geom::read(s, kernel.clone(), &xs[2..])?;
    let a = &s.node.attribute;
    if attr::get_int(a, "ceil_mode", 0) == 1 {
        // Accepted only when ceil and floor give the same windows.
        let same = (0..n).all(|i| {
            xs[2 + i].fixed().is_some_and(|h| {
                let span =
                    h + g.pads_begin[i] + g.pads_end[i] - (g.dilations[i] * (kernel[i] - 1) + 1);
                span % g.strides[i] == 0
            })
        });
        if !same {
            return Err(
                s.unsupported("ceil_mode = 1 with a partial last window (or unknown sizes)")
            );
        }
    }
    let count_pad = attr::get_int(a, "count_include_pad", 0) == 1;
    let padded = g.pads_begin.iter().chain(&g.pads_end).any(|&p| p != 0);
    let taps: i64 = kernel.iter().product();
    let mut wshape = vec![1usize, 1];
    wshape.extend(kernel.iter().map(|&k| k as usize));
    let ones_kernel = cx.e.constant(ones(dtype, &wshape));
    let scaled = if count_pad || !padded {
        let k = cx.e.scalar(dtype, taps as f64);
        cx.e.div(&dy, &k)
    } else {
        // Non-padding elements per window: a convolution of ones with ones.
        let e = &mut cx.e;
        let sp = e.shape_range(x, 2, None);
        let head = e.i64s(&[1, 1]);
        let shape = e.op("Concat", &[&head, &sp], vec![attr::int("axis", 0)]);
        let zeros = e.zeros_of_shape(&shape, dtype);
        let one = e.scalar(dtype, 1.0);
        let plane = e.add(&zeros, &one);
        let count = e.op(
            "Conv",
            &[&plane, &ones_kernel],
            vec![
                attr::ints("kernel_shape", &kernel),
                attr::ints("strides", &g.strides),
                attr::ints("dilations", &g.dilations),
                attr::ints("pads", &[g.pads_begin.clone(), g.pads_end.clone()].concat()),
            ],
        );
        e.div(&dy, &count)
    };
    // [N, C, Ho] -> [N*C, 1, Ho], scatter by a transposed convolution, back to [N, C, H].
    let mut target = vec![-1i64, 1];
    target.extend(std::iter::repeat_n(0, n));
    let flat = cx.e.reshape_const(&scaled, &target);
    let g1 = Geom { group: 1, ..g };
    let mut xs_flat = vec![Dim::Unknown, Dim::Fixed(1)];
    xs_flat.extend(xs[2..].iter().cloned());
    let dx = conv_input_grad(cx, &flat, &ones_kernel, x, &xs_flat[2..], &g1);
    out[0] = Some(cx.e.reshape_like(&dx, x));
    Ok(out)
}

fn ones(dtype: DType, shape: &[usize]) -> Tensor {
    match dtype {
        DType::F64 => Tensor::F64(ndarray::ArrayD::ones(shape)),
        _ => Tensor::F32(ndarray::ArrayD::ones(shape)),
    }
}

/// GlobalAveragePool.
pub(crate) fn global_average_pool(cx: &mut Ctx, s: &Step) -> Grads {
    let mut out = s.none();
    if !s.need(0) {
        return Ok(out);
    }
    let dy = s.dy0()?.to_string();
    let x = s.x(0)?;
    let xs = cx.shape(s, x)?;
    let dtype = cx.dtype(s, x)?;
    let count: Option<i64> = xs[2..].iter().map(Dim::fixed).product();
    let e = &mut cx.e;
    let c = match count {
        Some(c) => e.scalar(dtype, c as f64),
        None => {
            let sp = e.shape_range(x, 2, None);
            let prod = e.op("ReduceProd", &[&sp], vec![attr::int("keepdims", 0)]);
            e.cast(&prod, dtype)
        }
    };
    let scaled = e.div(&dy, &c);
    out[0] = Some(e.expand_like(&scaled, x));
    Ok(out)
}

/// GlobalMaxPool.
pub(crate) fn global_max_pool(cx: &mut Ctx, s: &Step) -> Grads {
    let mut out = s.none();
    if !s.need(0) {
        return Ok(out);
    }
    let dy = s.dy0()?.to_string();
    let (x, y) = (s.x(0)?, s.y(0));
    let rank = cx.rank(s, x)?;
    let dtype = cx.dtype(s, x)?;
    let e = &mut cx.e;
    let eq = e.op("Equal", &[x, y], vec![]);
    let mask = e.cast(&eq, dtype);
    let axes: Vec<i64> = (2..rank as i64).collect();
    let count = e.reduce_sum(&mask, &axes, true);
    let share = e.div(&dy, &count);
    out[0] = Some(e.mul(&mask, &share));
    Ok(out)
}
