//! Normalisation layers.
//!
//! - BatchNormalization in inference mode (running statistics as inputs): an affine map per
//!   channel, `y = (x - mean) · scale / sqrt(var + eps) + bias`, differentiated with respect to
//!   all five inputs. Training mode (batch statistics) is refused here: training graphs express
//!   batch norm with primitive ops (DESIGN.md), which this module differentiates op by op.
//! - LayerNormalization (opset 17): statistics over the axes from `axis` on, recomputed in the
//!   backward pass; `dx = inv_std · (g - mean(g) - x̂ · mean(g · x̂))` with `g = dy · scale`.

use super::broadcast::reduce_to;
use super::{AutodiffError, Ctx, Step};
use crate::builder::attr;

type Grads = Result<Vec<Option<String>>, AutodiffError>;

/// BatchNormalization (inference mode).
pub(crate) fn batch_norm(cx: &mut Ctx, s: &Step) -> Grads {
    let a = &s.node.attribute;
    if attr::get_int(a, "training_mode", 0) != 0 {
        return Err(
            s.unsupported("training_mode = 1; write training-mode batch norm with primitive ops")
        );
    }
    if s.dy.iter().skip(1).any(Option::is_some) {
        return Err(s.unsupported("gradients of the running-statistics outputs"));
    }
    let dy = s.dy0()?.to_string();
    let x = s.x(0)?;
    let (scale, mean, var) = (s.x(1)?, s.x(3)?, s.x(4)?);
    let rank = cx.rank(s, x)?;
    let dtype = cx.dtype(s, x)?;
    let eps = attr::get_float(a, "epsilon", 1e-5) as f64;
    let e = &mut cx.e;
    // [C] -> [C, 1, ...] to broadcast against [N, C, ...].
    let mut per_channel = vec![-1i64];
    per_channel.extend(std::iter::repeat_n(1, rank.saturating_sub(2)));
    let mut other: Vec<i64> = vec![0];
    other.extend(2..rank as i64);
    let eps_c = e.scalar(dtype, eps);
    let ve = e.add(var, &eps_c);
    let sd = e.op("Sqrt", &[&ve], vec![]);
    let one = e.scalar(dtype, 1.0);
    let inv = e.div(&one, &sd);
    let mut out = s.none();
    let sum_dy = if s.need(2) || s.need(3) {
        Some(e.reduce_sum(&dy, &other, false))
    } else {
        None
    };
    let centered_dot = if s.need(1) || s.need(4) {
        let m = e.reshape_const(mean, &per_channel);
        let xc = e.sub(x, &m);
        let t = e.mul(&dy, &xc);
        Some(e.reduce_sum(&t, &other, false))
    } else {
        None
    };
    if s.need(0) {
        let k = e.mul(scale, &inv);
        let k = e.reshape_const(&k, &per_channel);
        out[0] = Some(e.mul(&dy, &k));
    }
    if s.need(1) {
        let d = centered_dot.clone().expect("computed when needed");
        out[1] = Some(e.mul(&d, &inv));
    }
    if s.need(2) {
        out[2] = sum_dy.clone();
    }
    if s.need(3) {
        let k = e.mul(scale, &inv);
        let t = e.mul(sum_dy.as_deref().expect("computed when needed"), &k);
        out[3] = Some(e.neg(&t));
    }
    if s.need(4) {
        // d/dvar (var + eps)^(-1/2) = -1/2 inv^3.
        let inv3 = e.mul(&inv, &inv);
        let inv3 = e.mul(&inv3, &inv);
        let half = e.scalar(dtype, -0.5);
        let k = e.mul(scale, &inv3);
        let k = e.mul(&k, &half);
        out[4] = Some(e.mul(centered_dot.as_deref().expect("computed when needed"), &k));
    }
    Ok(out)
}

/// LayerNormalization.
pub(crate) fn layer_norm(cx: &mut Ctx, s: &Step) -> Grads {
    if s.dy.iter().skip(1).any(Option::is_some) {
        return Err(s.unsupported("gradients of the Mean / InvStdDev outputs"));
    }
    let dy = s.dy0()?.to_string();
    let (x, y) = (s.x(0)?, s.y(0));
    let xs = cx.shape(s, x)?;
    let rank = xs.len();
    let dtype = cx.dtype(s, x)?;
    let a = &s.node.attribute;
    let axis = super::infer::norm_axis(attr::get_int(a, "axis", -1), rank);
    let eps = attr::get_float(a, "epsilon", 1e-5) as f64;
    let axes: Vec<i64> = (axis as i64..rank as i64).collect();
    let scale = s.x(1)?;
    let e = &mut cx.e;
    let mean = e.reduce("ReduceMean", x, &axes, true);
    let xc = e.sub(x, &mean);
    let sq = e.mul(&xc, &xc);
    let var = e.reduce("ReduceMean", &sq, &axes, true);
    let eps_c = e.scalar(dtype, eps);
    let ve = e.add(&var, &eps_c);
    let sd = e.op("Sqrt", &[&ve], vec![]);
    let one = e.scalar(dtype, 1.0);
    let inv = e.div(&one, &sd);
    let xhat = e.mul(&xc, &inv);
    let mut out = s.none();
    if s.need(0) {
        let g = e.mul(&dy, scale);
        let mg = e.reduce("ReduceMean", &g, &axes, true);
        let gx = e.mul(&g, &xhat);
        let mgx = e.reduce("ReduceMean", &gx, &axes, true);
        let t = e.sub(&g, &mg);
        let u = e.mul(&xhat, &mgx);
        let t = e.sub(&t, &u);
        out[0] = Some(e.mul(&t, &inv));
    }
    if s.need(1) {
        let t = cx.e.mul(&dy, &xhat);
        out[1] = Some(reduce_to(cx, s, &t, Some(&xs), scale, None)?);
    }
    if let (true, Some(b)) = (s.need(2), s.input(2)) {
        let ys = cx.shape(s, y)?;
        out[2] = Some(reduce_to(cx, s, &dy, Some(&ys), b, None)?);
    }
    Ok(out)
}
