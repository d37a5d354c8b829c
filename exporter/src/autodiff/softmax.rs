//! Softmax and LogSoftmax (opset 13 semantics: one axis).
//!
//! `Softmax: dx = y · (dy - Σ_axis dy · y)`, `LogSoftmax: dx = dy - exp(y) · Σ_axis dy`.

use super::{AutodiffError, Ctx, Step};
use crate::builder::attr;

/// Softmax, LogSoftmax.
pub(crate) fn softmax(cx: &mut Ctx, s: &Step) -> Result<Vec<Option<String>>, AutodiffError> {
    let mut out = s.none();
    if !s.need(0) {
        return Ok(out);
    }
    let dy = s.dy0()?.to_string();
    let y = s.y(0);
    let rank = cx.rank(s, y)?;
    let axis = super::infer::norm_axis(attr::get_int(&s.node.attribute, "axis", -1), rank) as i64;
    let e = &mut cx.e;
    out[0] = Some(if s.node.op_type == "Softmax" {
        let p = e.mul(&dy, y);
        let sum = e.reduce_sum(&p, &[axis], true);
        let d = e.sub(&dy, &sum);
        e.mul(y, &d)
    } else {
        let sum = e.reduce_sum(&dy, &[axis], true);
        let p = e.op("Exp", &[y], vec![]);
        let t = e.mul(&p, &sum);
        e.sub(&dy, &t)
    });
    Ok(out)
}
