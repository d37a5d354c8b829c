//! Elementwise ops: unary activations, broadcasting arithmetic, selections.
//!
//! Subgradients at kinks follow PyTorch: `Relu'(0) = 0`, `Abs'(0) = 0` (`Sign`), `Clip` passes
//! the gradient where `min <= x <= max`, `Max`/`Min` split it evenly between tied operands.

use super::broadcast::reduce_like;
use super::{AutodiffError, Ctx, Step};
use crate::builder::attr;

type Grads = Result<Vec<Option<String>>, AutodiffError>;

/// Add, Sub, Mul, Div, Pow.
pub(crate) fn binary(cx: &mut Ctx, s: &Step) -> Grads {
    let dy = s.dy0()?.to_string();
    let (a, b, y) = (s.x(0)?, s.x(1)?, s.y(0));
    let dtype = cx.dtype(s, y)?;
    let mut out = s.none();
    let op = s.node.op_type.as_str();
    if s.need(0) {
        let g = match op {
            "Add" | "Sub" => dy.clone(),
            "Mul" => cx.e.mul(&dy, b),
            "Div" => cx.e.div(&dy, b),
            "Pow" => {
                let bf = match cx.info.dtype(b) {
                    Some(d) if d != dtype => cx.e.cast(b, dtype),
                    _ => b.to_string(),
                };
                let one = cx.e.scalar(dtype, 1.0);
                let bm1 = cx.e.sub(&bf, &one);
                let p = cx.e.op("Pow", &[a, &bm1], vec![]);
                let mut d = cx.e.mul(&bf, &p);
                // b * a^(b-1) is 0 where b == 0 (even at a == 0), as PyTorch has it.
                let b_nonzero = cx
                    .info
                    .get(b)
                    .floats()
                    .or_else(|| {
                        cx.info
                            .get(b)
                            .ints()
                            .map(|v| v.iter().map(|&x| x as f64).collect())
                    })
                    .is_some_and(|v| v.iter().all(|&x| x != 0.0));
                if !b_nonzero {
                    let zero = cx.e.scalar(dtype, 0.0);
                    let is0 = cx.e.op("Equal", &[&bf, &zero], vec![]);
                    d = cx.e.op("Where", &[&is0, &zero, &d], vec![]);
                }
                cx.e.mul(&dy, &d)
            }
            _ => unreachable!("binary rule for {op}"),
        };
        out[0] = Some(reduce_like(cx, s, &g, y, a)?);
    }
    if s.need(1) {
        let g = match op {
            "Add" => dy.clone(),
            "Sub" => cx.e.neg(&dy),
            "Mul" => cx.e.mul(&dy, a),
            "Div" => {
                let t = cx.e.mul(&dy, y);
                let t = cx.e.div(&t, b);
                cx.e.neg(&t)
            }
            "Pow" => {
                // d/db a^b = a^b ln a, taken as 0 where a == 0.
                let zero = cx.e.scalar(dtype, 0.0);
                let ln = cx.e.op("Log", &[a], vec![]);
                let t = cx.e.mul(y, &ln);
                let is0 = cx.e.op("Equal", &[a, &zero], vec![]);
                let t = cx.e.op("Where", &[&is0, &zero, &t], vec![]);
                cx.e.mul(&dy, &t)
            }
            _ => unreachable!("binary rule for {op}"),
        };
        out[1] = Some(reduce_like(cx, s, &g, y, b)?);
    }
    Ok(out)
}

/// Unary activations and functions.
pub(crate) fn unary(cx: &mut Ctx, s: &Step) -> Grads {
    let mut out = s.none();
    if !s.need(0) {
        return Ok(out);
    }
    let dy = s.dy0()?.to_string();
    let (x, y) = (s.x(0)?, s.y(0));
    let dtype = cx.dtype(s, y)?;
    let a = &s.node.attribute;
    let e = &mut cx.e;
    let zero = e.scalar(dtype, 0.0);
    let g = match s.node.op_type.as_str() {
        "Neg" => e.neg(&dy),
        "Abs" => {
            let sign = e.op("Sign", &[x], vec![]);
            e.mul(&dy, &sign)
        }
        "Relu" => {
            let pos = e.op("Greater", &[x, &zero], vec![]);
            e.op("Where", &[&pos, &dy, &zero], vec![])
        }
        "LeakyRelu" => {
            let alpha = e.scalar(dtype, attr::get_float(a, "alpha", 0.01) as f64);
            let pos = e.op("Greater", &[x, &zero], vec![]);
            let neg = e.mul(&dy, &alpha);
            e.op("Where", &[&pos, &dy, &neg], vec![])
        }
        "Elu" => {
            let alpha = e.scalar(dtype, attr::get_float(a, "alpha", 1.0) as f64);
            let pos = e.op("Greater", &[x, &zero], vec![]);
            let slope = e.add(y, &alpha);
            let neg = e.mul(&dy, &slope);
            e.op("Where", &[&pos, &dy, &neg], vec![])
        }
        "Selu" => {
            let alpha = attr::get_float(a, "alpha", 1.673_263_2) as f64;
            let gamma = attr::get_float(a, "gamma", 1.050_701) as f64;
            let g = e.scalar(dtype, gamma);
            let ag = e.scalar(dtype, alpha * gamma);
            let pos = e.op("Greater", &[x, &zero], vec![]);
            let dpos = e.mul(&dy, &g);
            let slope = e.add(y, &ag);
            let dneg = e.mul(&dy, &slope);
            e.op("Where", &[&pos, &dpos, &dneg], vec![])
        }
        "Sigmoid" => {
            let one = e.scalar(dtype, 1.0);
            let c = e.sub(&one, y);
            let d = e.mul(y, &c);
            e.mul(&dy, &d)
        }
        "HardSigmoid" => {
            let alpha = attr::get_float(a, "alpha", 0.2) as f64;
            let beta = attr::get_float(a, "beta", 0.5) as f64;
            let al = e.scalar(dtype, alpha);
            let be = e.scalar(dtype, beta);
            let one = e.scalar(dtype, 1.0);
            let t = e.mul(x, &al);
            let t = e.add(&t, &be);
            let above = e.op("Greater", &[&t, &zero], vec![]);
            let below = e.op("Less", &[&t, &one], vec![]);
            let inside = e.op("And", &[&above, &below], vec![]);
            let d = e.mul(&dy, &al);
            e.op("Where", &[&inside, &d, &zero], vec![])
        }
        "HardSwish" => {
            // y = x * clip(x/6 + 1/2, 0, 1): 0 below -3, x/3 + 1/2 up to 3, 1 above.
            let m3 = e.scalar(dtype, -3.0);
            let p3 = e.scalar(dtype, 3.0);
            let third = e.scalar(dtype, 1.0 / 3.0);
            let half = e.scalar(dtype, 0.5);
            let one = e.scalar(dtype, 1.0);
            let mid = e.mul(x, &third);
            let mid = e.add(&mid, &half);
            let le3 = e.op("LessOrEqual", &[x, &p3], vec![]);
            let upper = e.op("Where", &[&le3, &mid, &one], vec![]);
            let lt = e.op("Less", &[x, &m3], vec![]);
            let d = e.op("Where", &[&lt, &zero, &upper], vec![]);
            e.mul(&dy, &d)
        }
        "Tanh" => {
            let one = e.scalar(dtype, 1.0);
            let y2 = e.mul(y, y);
            let d = e.sub(&one, &y2);
            e.mul(&dy, &d)
        }
        "Exp" => e.mul(&dy, y),
        "Log" => e.div(&dy, x),
        "Sqrt" => {
            let two = e.scalar(dtype, 2.0);
            let d = e.mul(y, &two);
            e.div(&dy, &d)
        }
        "Reciprocal" => {
            let y2 = e.mul(y, y);
            let d = e.mul(&dy, &y2);
            e.neg(&d)
        }
        "Sin" => {
            let c = e.op("Cos", &[x], vec![]);
            e.mul(&dy, &c)
        }
        "Cos" => {
            let sn = e.op("Sin", &[x], vec![]);
            let d = e.mul(&dy, &sn);
            e.neg(&d)
        }
        "Erf" => {
            let k = e.scalar(dtype, 2.0 / std::f64::consts::PI.sqrt());
            let x2 = e.mul(x, x);
            let nx2 = e.neg(&x2);
            let ex = e.op("Exp", &[&nx2], vec![]);
            let d = e.mul(&ex, &k);
            e.mul(&dy, &d)
        }
        "Softplus" => {
            let sg = e.op("Sigmoid", &[x], vec![]);
            e.mul(&dy, &sg)
        }
        other => unreachable!("unary rule for {other}"),
    };
    out[0] = Some(g);
    Ok(out)
}

/// PRelu: `y = x` where `x >= 0`, `slope * x` elsewhere (slope broadcasts to x).
pub(crate) fn prelu(cx: &mut Ctx, s: &Step) -> Grads {
    let dy = s.dy0()?.to_string();
    let (x, slope, y) = (s.x(0)?, s.x(1)?, s.y(0));
    let dtype = cx.dtype(s, y)?;
    let zero = cx.e.scalar(dtype, 0.0);
    let neg = cx.e.op("Less", &[x, &zero], vec![]);
    let mut out = s.none();
    if s.need(0) {
        let scaled = cx.e.mul(&dy, slope);
        out[0] = Some(cx.e.op("Where", &[&neg, &scaled, &dy], vec![]));
    }
    if s.need(1) {
        let t = cx.e.mul(&dy, x);
        let t = cx.e.op("Where", &[&neg, &t, &zero], vec![]);
        out[1] = Some(reduce_like(cx, s, &t, y, slope)?);
    }
    Ok(out)
}

/// Clip (bounds as inputs, opset 11+): the gradient passes where `min <= x <= max`; a bound
/// that is differentiated gets the sum of the gradient where it clipped.
pub(crate) fn clip(cx: &mut Ctx, s: &Step) -> Grads {
    let dy = s.dy0()?.to_string();
    let (x, y) = (s.x(0)?, s.y(0));
    let dtype = cx.dtype(s, y)?;
    let rank = cx.rank(s, y)?;
    let e = &mut cx.e;
    let zero = e.scalar(dtype, 0.0);
    let (lo, hi) = (s.input(1), s.input(2));
    let mut out = s.none();
    if s.need(0) {
        let mut mask: Option<String> = None;
        if let Some(lo) = lo {
            mask = Some(e.op("GreaterOrEqual", &[x, lo], vec![]));
        }
        if let Some(hi) = hi {
            let m = e.op("LessOrEqual", &[x, hi], vec![]);
            mask = Some(match mask {
                Some(p) => e.op("And", &[&p, &m], vec![]),
                None => m,
            });
        }
        out[0] = Some(match mask {
            Some(m) => e.op("Where", &[&m, &dy, &zero], vec![]),
            None => dy.clone(),
        });
    }
    let all: Vec<i64> = (0..rank as i64).collect();
    for (k, cmp) in [(1usize, "Less"), (2usize, "Greater")] {
        if let (true, Some(b)) = (s.need(k), s.input(k)) {
            let m = e.op(cmp, &[x, b], vec![]);
            let t = e.op("Where", &[&m, &dy, &zero], vec![]);
            out[k] = Some(if all.is_empty() {
                t
            } else {
                e.reduce_sum(&t, &all, false)
            });
        }
    }
    Ok(out)
}

/// Max, Min (variadic, broadcasting): the gradient goes to the operands equal to the result,
/// split evenly among ties.
pub(crate) fn max_min(cx: &mut Ctx, s: &Step) -> Grads {
    let dy = s.dy0()?.to_string();
    let y = s.y(0);
    let dtype = cx.dtype(s, y)?;
    let n = s.node.input.len();
    let mut out = s.none();
    if n == 1 {
        out[0] = Some(dy);
        return Ok(out);
    }
    let masks: Vec<String> = (0..n)
        .map(|i| {
            let xi = s.x(i)?;
            let eq = cx.e.op("Equal", &[xi, y], vec![]);
            Ok(cx.e.cast(&eq, dtype))
        })
        .collect::<Result<_, AutodiffError>>()?;
    let count = cx.e.sum(&masks);
    let share = cx.e.div(&dy, &count);
    for (i, mask) in masks.iter().enumerate() {
        if s.need(i) {
            let g = cx.e.mul(&share, mask);
            out[i] = Some(reduce_like(cx, s, &g, y, s.x(i)?)?);
        }
    }
    Ok(out)
}

/// Sum, Mean (variadic, broadcasting).
pub(crate) fn sum_mean(cx: &mut Ctx, s: &Step) -> Grads {
    let mut dy = s.dy0()?.to_string();
    let y = s.y(0);
    let n = s.node.input.len();
    if s.node.op_type == "Mean" && n > 1 {
        let dtype = cx.dtype(s, y)?;
        let k = cx.e.scalar(dtype, n as f64);
        dy = cx.e.div(&dy, &k);
    }
    let mut out = s.none();
    for (i, slot) in out.iter_mut().enumerate() {
        if s.need(i) {
            *slot = Some(reduce_like(cx, s, &dy, y, s.x(i)?)?);
        }
    }
    Ok(out)
}

/// Where(cond, a, b).
pub(crate) fn where_(cx: &mut Ctx, s: &Step) -> Grads {
    let dy = s.dy0()?.to_string();
    let (c, y) = (s.x(0)?, s.y(0));
    let dtype = cx.dtype(s, y)?;
    let zero = cx.e.scalar(dtype, 0.0);
    let mut out = s.none();
    if s.need(1) {
        let g = cx.e.op("Where", &[c, &dy, &zero], vec![]);
        out[1] = Some(reduce_like(cx, s, &g, y, s.x(1)?)?);
    }
    if s.need(2) {
        let g = cx.e.op("Where", &[c, &zero, &dy], vec![]);
        out[2] = Some(reduce_like(cx, s, &g, y, s.x(2)?)?);
    }
    Ok(out)
}

/// Cast: the gradient is cast back to the input's floating type.
pub(crate) fn cast(cx: &mut Ctx, s: &Step) -> Grads {
    let mut out = s.none();
    let x = s.x(0)?;
    match cx.info.dtype(x) {
        Some(d) if d.is_float() && s.need(0) => {
            let dy = s.dy0()?;
            out[0] = Some(if cx.info.dtype(s.y(0)) == Some(d) {
                dy.to_string()
            } else {
                cx.e.cast(dy, d)
            });
        }
        Some(d) if !d.is_float() => {}
        Some(_) => {}
        None => return Err(s.unknown(x, "element type")),
    }
    Ok(out)
}

/// Identity.
pub(crate) fn identity(_cx: &mut Ctx, s: &Step) -> Grads {
    let mut out = s.none();
    if s.need(0) {
        out[0] = Some(s.dy0()?.to_string());
    }
    Ok(out)
}

/// Dropout in inference mode is the identity; training mode (random mask) is refused.
pub(crate) fn dropout(cx: &mut Ctx, s: &Step) -> Grads {
    if let Some(t) = s.input(2) {
        let training = cx
            .info
            .get(t)
            .value
            .map(|v| v.to_f32().iter().any(|&b| b != 0.0));
        if training != Some(false) {
            return Err(s.unsupported(
                "training-mode Dropout (random mask); differentiate the inference graph or write the mask as an input",
            ));
        }
    }
    identity(cx, s)
}
