//! Reductions: ReduceSum, ReduceMean, ReduceMax, ReduceMin, ReduceSumSquare, ReduceL2,
//! ReduceLogSumExp.
//!
//! The output gradient is given back its reduced axes (`Unsqueeze` when `keepdims = 0`) and
//! broadcast over the input: evenly for Sum/Mean, to the extrema for Max/Min (split between
//! ties, as PyTorch's `amax`), `2x` for SumSquare, `x / y` for L2 (0 where the norm is 0),
//! `exp(x - y)` for LogSumExp. Axes must be constants (attribute or constant input).

use super::{AutodiffError, Ctx, Step};
use crate::builder::attr;

/// The reductions listed in the module documentation.
pub(crate) fn reduce(cx: &mut Ctx, s: &Step) -> Result<Vec<Option<String>>, AutodiffError> {
    let mut out = s.none();
    if !s.need(0) {
        return Ok(out);
    }
    let dy = s.dy0()?.to_string();
    let (x, y) = (s.x(0)?, s.y(0));
    let rank = cx.rank(s, x)?;
    let dtype = cx.dtype(s, x)?;
    let a = &s.node.attribute;
    let keep = attr::get_int(a, "keepdims", 1) == 1;
    let noop = attr::get_int(a, "noop_with_empty_axes", 0) == 1;
    let axes: Vec<i64> = match attr::get_ints(a, "axes") {
        Some(v) => v.to_vec(),
        None => match s.input(1) {
            Some(n) => cx
                .info
                .get(n)
                .ints()
                .ok_or_else(|| s.unsupported("axes computed at run time"))?,
            None => vec![],
        },
    };
    let mut axes: Vec<i64> = if axes.is_empty() {
        if noop {
            // Reduces nothing: the identity.
            out[0] = Some(dy);
            return Ok(out);
        }
        (0..rank as i64).collect()
    } else {
        axes.iter()
            .map(|&v| super::infer::norm_axis(v, rank) as i64)
            .collect()
    };
    axes.sort();
    axes.dedup();
    let e = &mut cx.e;
    let (dyk, yk) = if keep {
        (dy.clone(), y.to_string())
    } else {
        (e.unsqueeze(&dy, &axes), e.unsqueeze(y, &axes))
    };
    let g = match s.node.op_type.as_str() {
        "ReduceSum" => e.expand_like(&dyk, x),
        "ReduceMean" => {
            let xs = cx.info.shape(x);
            let count: Option<i64> = xs.as_ref().and_then(|xs| {
                axes.iter()
                    .map(|&ax| xs.get(ax as usize).and_then(|d| d.fixed()))
                    .product()
            });
            let e = &mut cx.e;
            let c = match count {
                Some(c) => e.scalar(dtype, c as f64),
                None => {
                    let nx = e.size_as(x, dtype);
                    let ny = e.size_as(y, dtype);
                    e.div(&nx, &ny)
                }
            };
            let d = e.div(&dyk, &c);
            e.expand_like(&d, x)
        }
        "ReduceMax" | "ReduceMin" => {
            let eq = e.op("Equal", &[x, &yk], vec![]);
            let mask = e.cast(&eq, dtype);
            let count = e.reduce_sum(&mask, &axes, true);
            let share = e.div(&dyk, &count);
            e.mul(&mask, &share)
        }
        "ReduceSumSquare" => {
            let two = e.scalar(dtype, 2.0);
            let t = e.mul(x, &two);
            e.mul(&t, &dyk)
        }
        "ReduceL2" => {
            let zero = e.scalar(dtype, 0.0);
            let q = e.div(x, &yk);
            let is0 = e.op("Equal", &[&yk, &zero], vec![]);
            let q = e.op("Where", &[&is0, &zero, &q], vec![]);
            e.mul(&q, &dyk)
        }
        "ReduceLogSumExp" => {
            let d = e.sub(x, &yk);
            let p = e.op("Exp", &[&d], vec![]);
            e.mul(&p, &dyk)
        }
        other => unreachable!("reduce rule for {other}"),
    };
    out[0] = Some(g);
    Ok(out)
}
