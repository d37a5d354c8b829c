//! MatMul (NumPy semantics: batched, broadcasting, 1-D operands) and Gemm.
//!
//! `dA = dY · Bᵀ`, `dB = Aᵀ · dY`, batch axes summed back to each operand's shape; 1-D operands
//! are promoted as `numpy.matmul` does (a leading or trailing 1) and squeezed back. Gemm's
//! gradients are Gemms themselves with the transposition flags swapped.

use super::broadcast::reduce_to;
use super::infer::matmul_shape;
use super::{AutodiffError, Ctx, Step};
use crate::builder::{attr, Dim};

type Grads = Result<Vec<Option<String>>, AutodiffError>;

fn swap_last_two(rank: usize) -> Vec<i64> {
    let mut p: Vec<i64> = (0..rank as i64).collect();
    p.swap(rank - 2, rank - 1);
    p
}

/// MatMul.
pub(crate) fn matmul(cx: &mut Ctx, s: &Step) -> Grads {
    let dy = s.dy0()?.to_string();
    let (a, b) = (s.x(0)?, s.x(1)?);
    let sa = cx.shape(s, a)?;
    let sb = cx.shape(s, b)?;
    let (a1, b1) = (sa.len() == 1, sb.len() == 1);
    // Promote 1-D operands and the gradient accordingly.
    let (a2, sa2) = if a1 {
        (cx.e.unsqueeze(a, &[0]), vec![Dim::Fixed(1), sa[0].clone()])
    } else {
        (a.to_string(), sa.clone())
    };
    let (b2, sb2) = if b1 {
        (cx.e.unsqueeze(b, &[1]), vec![sb[0].clone(), Dim::Fixed(1)])
    } else {
        (b.to_string(), sb.clone())
    };
    let sy2 =
        matmul_shape(&sa2, &sb2).ok_or_else(|| s.unsupported("operand shapes do not multiply"))?;
    let dy2 = match (a1, b1) {
        (true, true) => cx.e.reshape_const(&dy, &[1, 1]),
        (true, false) => cx.e.unsqueeze(&dy, &[-2]),
        (false, true) => cx.e.unsqueeze(&dy, &[-1]),
        (false, false) => dy.clone(),
    };
    let batch = &sy2[..sy2.len() - 2];
    let mut out = s.none();
    if s.need(0) {
        let bt = cx.e.transpose(&b2, &swap_last_two(sb2.len()));
        let g = cx.e.op("MatMul", &[&dy2, &bt], vec![]);
        let mut gs = batch.to_vec();
        gs.extend_from_slice(&sa2[sa2.len() - 2..]);
        let mut g = reduce_to(cx, s, &g, Some(&gs), &a2, Some(&sa2))?;
        if a1 {
            g = cx.e.squeeze(&g, &[0]);
        }
        out[0] = Some(g);
    }
    if s.need(1) {
        let at = cx.e.transpose(&a2, &swap_last_two(sa2.len()));
        let g = cx.e.op("MatMul", &[&at, &dy2], vec![]);
        let mut gs = batch.to_vec();
        gs.extend_from_slice(&sb2[sb2.len() - 2..]);
        let mut g = reduce_to(cx, s, &g, Some(&gs), &b2, Some(&sb2))?;
        if b1 {
            g = cx.e.squeeze(&g, &[1]);
        }
        out[1] = Some(g);
    }
    Ok(out)
}

/// Gemm: `Y = alpha · op(A) · op(B) + beta · C`.
pub(crate) fn gemm(cx: &mut Ctx, s: &Step) -> Grads {
    let dy = s.dy0()?.to_string();
    let (a, b, y) = (s.x(0)?, s.x(1)?, s.y(0));
    let at = &s.node.attribute;
    let alpha = attr::get_float(at, "alpha", 1.0);
    let beta = attr::get_float(at, "beta", 1.0);
    let ta = attr::get_int(at, "transA", 0);
    let tb = attr::get_int(at, "transB", 0);
    let gemm_attrs = |ta: i64, tb: i64| {
        vec![
            attr::float("alpha", alpha),
            attr::int("transA", ta),
            attr::int("transB", tb),
        ]
    };
    let mut out = s.none();
    if s.need(0) {
        out[0] = Some(if ta == 0 {
            cx.e.op("Gemm", &[&dy, b], gemm_attrs(0, 1 - tb))
        } else {
            cx.e.op("Gemm", &[b, &dy], gemm_attrs(tb, 1))
        });
    }
    if s.need(1) {
        out[1] = Some(if tb == 0 {
            cx.e.op("Gemm", &[a, &dy], gemm_attrs(1 - ta, 0))
        } else {
            cx.e.op("Gemm", &[&dy, a], gemm_attrs(1, ta))
        });
    }
    if let (true, Some(c)) = (s.need(2), s.input(2)) {
        let mut g = dy.clone();
        if beta != 1.0 {
            let dtype = cx.dtype(s, y)?;
            let k = cx.e.scalar(dtype, beta as f64);
            g = cx.e.mul(&g, &k);
        }
        let gs = cx.shape(s, y)?;
        out[2] = Some(reduce_to(cx, s, &g, Some(&gs), c, None)?);
    }
    Ok(out)
}
