//! Indexing: Gather, GatherElements, GatherND, TopK. Their gradients scatter-add the output
//! gradient back to the gathered positions (`ScatterElements` / `ScatterND` with
//! `reduction = add`, opset 16), so repeated indices accumulate. Negative indices are
//! normalised first.

use super::infer::norm_axis;
use super::{AutodiffError, Ctx, Step};
use crate::builder::attr;
use crate::tensor::DType;

type Grads = Result<Vec<Option<String>>, AutodiffError>;

/// `idx` as int64 with negative entries made non-negative against `size` (broadcast).
fn normalise(e: &mut super::emit::Emitter, idx: &str, size: &str) -> String {
    let i = e.cast(idx, DType::I64);
    let zero = e.i64_scalar(0);
    let neg = e.op("Less", &[&i, &zero], vec![]);
    let shifted = e.add(&i, size);
    e.op("Where", &[&neg, &shifted, &i], vec![])
}

/// Gather (any index rank).
pub(crate) fn gather(cx: &mut Ctx, s: &Step) -> Grads {
    let mut out = s.none();
    if !s.need(0) {
        return Ok(out);
    }
    cx.require_opset(s, 16, "ScatterElements with reduction=add")?;
    let dy = s.dy0()?.to_string();
    let (x, idx) = (s.x(0)?, s.x(1)?);
    let r = cx.rank(s, x)?;
    let q = cx.rank(s, idx)?;
    let dtype = cx.dtype(s, x)?;
    let axis = norm_axis(attr::get_int(&s.node.attribute, "axis", 0), r);
    let e = &mut cx.e;
    let dim = e.shape_range(x, axis as i64, Some(axis as i64 + 1));
    let dim = e.reshape_const(&dim, &[]);
    let idx = normalise(e, idx, &dim);
    // The gradient viewed as x.shape[:axis] + [Q] + x.shape[axis+1:].
    let dyv = if q == 1 {
        dy.clone()
    } else if q == 0 {
        e.unsqueeze(&dy, &[axis as i64])
    } else {
        let mut parts = Vec::new();
        if axis > 0 {
            parts.push(e.shape_range(x, 0, Some(axis as i64)));
        }
        parts.push(e.i64s(&[-1]));
        if axis + 1 < r {
            parts.push(e.shape_range(x, axis as i64 + 1, None));
        }
        let refs: Vec<&str> = parts.iter().map(String::as_str).collect();
        let target = e.op("Concat", &refs, vec![attr::int("axis", 0)]);
        e.op("Reshape", &[&dy, &target], vec![])
    };
    let mut ishape = vec![1i64; r];
    ishape[axis] = -1;
    let iv = e.reshape_const(&idx, &ishape);
    let ib = e.expand_like(&iv, &dyv);
    let zeros = e.zeros_like(x, dtype);
    out[0] = Some(e.op(
        "ScatterElements",
        &[&zeros, &ib, &dyv],
        vec![
            attr::int("axis", axis as i64),
            attr::string("reduction", "add"),
        ],
    ));
    Ok(out)
}

/// GatherElements.
pub(crate) fn gather_elements(cx: &mut Ctx, s: &Step) -> Grads {
    let mut out = s.none();
    if !s.need(0) {
        return Ok(out);
    }
    cx.require_opset(s, 16, "ScatterElements with reduction=add")?;
    let dy = s.dy0()?.to_string();
    let (x, idx) = (s.x(0)?, s.x(1)?);
    let r = cx.rank(s, x)?;
    let dtype = cx.dtype(s, x)?;
    let axis = norm_axis(attr::get_int(&s.node.attribute, "axis", 0), r);
    let e = &mut cx.e;
    let dim = e.shape_range(x, axis as i64, Some(axis as i64 + 1));
    let dim = e.reshape_const(&dim, &[]);
    let idx = normalise(e, idx, &dim);
    let zeros = e.zeros_like(x, dtype);
    out[0] = Some(e.op(
        "ScatterElements",
        &[&zeros, &idx, &dy],
        vec![
            attr::int("axis", axis as i64),
            attr::string("reduction", "add"),
        ],
    ));
    Ok(out)
}

/// GatherND (batch_dims = 0).
pub(crate) fn gather_nd(cx: &mut Ctx, s: &Step) -> Grads {
    let mut out = s.none();
    if !s.need(0) {
        return Ok(out);
    }
    if attr::get_int(&s.node.attribute, "batch_dims", 0) != 0 {
        return Err(s.unsupported("batch_dims > 0"));
    }
    cx.require_opset(s, 16, "ScatterND with reduction=add")?;
    let dy = s.dy0()?.to_string();
    let (x, idx) = (s.x(0)?, s.x(1)?);
    let dtype = cx.dtype(s, x)?;
    let k = cx
        .shape(s, idx)?
        .last()
        .and_then(|d| d.fixed())
        .ok_or_else(|| s.unknown(idx, "last dimension"))?;
    let e = &mut cx.e;
    let dims = e.shape_range(x, 0, Some(k));
    let idx = normalise(e, idx, &dims);
    let zeros = e.zeros_like(x, dtype);
    out[0] = Some(e.op(
        "ScatterND",
        &[&zeros, &idx, &dy],
        vec![attr::string("reduction", "add")],
    ));
    Ok(out)
}

/// TopK: the values' gradient goes back to the selected positions.
pub(crate) fn top_k(cx: &mut Ctx, s: &Step) -> Grads {
    let mut out = s.none();
    if !s.need(0) {
        return Ok(out);
    }
    cx.require_opset(s, 16, "ScatterElements with reduction=add")?;
    let dy = s.dy0()?.to_string();
    let x = s.x(0)?;
    let indices = s
        .node
        .output
        .get(1)
        .filter(|o| !o.is_empty())
        .ok_or_else(|| s.unsupported("no Indices output"))?;
    let r = cx.rank(s, x)?;
    let dtype = cx.dtype(s, x)?;
    let axis = norm_axis(attr::get_int(&s.node.attribute, "axis", -1), r);
    let e = &mut cx.e;
    let zeros = e.zeros_like(x, dtype);
    out[0] = Some(e.op(
        "ScatterElements",
        &[&zeros, indices, &dy],
        vec![
            attr::int("axis", axis as i64),
            attr::string("reduction", "add"),
        ],
    ));
    Ok(out)
}
