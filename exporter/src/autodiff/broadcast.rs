//! Gradients of broadcasting: a gradient shaped like a broadcast result is summed back to the
//! shape of the operand (NumPy's rule: leading axes the operand lacks, and axes where it has
//! size 1 and the result does not).
//!
//! Decided statically when the inferred shapes tell which axes were broadcast (fixed sizes or
//! equal symbolic sizes); otherwise decided at run time: `Shape(operand)` left-padded with ones
//! is compared with 1, the axes where it is 1 are found with `NonZero`, summed with
//! `ReduceSum(keepdims=1, noop_with_empty_axes=1)` and the result reshaped to the operand.

use super::{AutodiffError, Ctx, Step};
use crate::builder::{attr, Dim};

/// Per axis of the gradient: sum it (`Some(true)`), keep it (`Some(false)`), or unknown.
fn broadcast_axes(g: &[Dim], t: &[Dim]) -> Vec<Option<bool>> {
    let lead = g.len() - t.len();
    (0..g.len())
        .map(|i| {
            if i < lead {
                return Some(true);
            }
            let (gd, td) = (&g[i], &t[i - lead]);
            match (gd, td) {
                (_, Dim::Fixed(1)) => Some(*gd != Dim::Fixed(1)),
                (_, Dim::Fixed(_)) => Some(false),
                (Dim::Fixed(1), _) => Some(false),
                (Dim::Param(a), Dim::Param(b)) if a == b => Some(false),
                _ => None,
            }
        })
        .collect()
}

/// `g` (shaped `g_shape`, a broadcast of `target`) summed back to the shape of `target`.
/// `target_shape` overrides the inferred shape of `target` (for values a rule creates).
pub(crate) fn reduce_to(
    cx: &mut Ctx,
    s: &Step,
    g: &str,
    g_shape: Option<&[Dim]>,
    target: &str,
    target_shape: Option<&[Dim]>,
) -> Result<String, AutodiffError> {
    let t_shape = match target_shape {
        Some(t) => t.to_vec(),
        None => cx.shape(s, target)?,
    };
    let g_shape = match g_shape {
        Some(gs) => gs.to_vec(),
        None => return Err(s.unknown(g, "shape")),
    };
    if g_shape.len() < t_shape.len() {
        return Err(s.unsupported(format!(
            "gradient of rank {} cannot be summed to `{target}` of rank {}",
            g_shape.len(),
            t_shape.len()
        )));
    }
    let axes = broadcast_axes(&g_shape, &t_shape);
    let lead = g_shape.len() - t_shape.len();
    if axes.iter().all(Option::is_some) {
        let sum: Vec<i64> = axes
            .iter()
            .enumerate()
            .filter(|(_, a)| **a == Some(true))
            .map(|(i, _)| i as i64)
            .collect();
        let r = cx.e.reduce_sum(g, &sum, true);
        if lead == 0 {
            return Ok(r);
        }
        let leading: Vec<i64> = (0..lead as i64).collect();
        return Ok(cx.e.squeeze(&r, &leading));
    }
    // Run-time decision.
    let e = &mut cx.e;
    let t = e.shape(target);
    let padded = if lead > 0 {
        let ones = e.i64s(&vec![1; lead]);
        e.op("Concat", &[&ones, &t], vec![attr::int("axis", 0)])
    } else {
        t
    };
    let one = e.i64_scalar(1);
    let mask = e.op("Equal", &[&padded, &one], vec![]);
    let nz = e.op("NonZero", &[&mask], vec![]);
    let axes = e.reshape_const(&nz, &[-1]);
    let summed = e.op(
        "ReduceSum",
        &[g, &axes],
        vec![
            attr::int("keepdims", 1),
            attr::int("noop_with_empty_axes", 1),
        ],
    );
    Ok(e.reshape_like(&summed, target))
}

/// Like [`reduce_to`] for a gradient shaped like output `y` of the step.
pub(crate) fn reduce_like(
    cx: &mut Ctx,
    s: &Step,
    g: &str,
    y: &str,
    target: &str,
) -> Result<String, AutodiffError> {
    let gs = cx.info.shape(y);
    let ts = cx.info.shape(target);
    match (&gs, &ts) {
        (Some(a), Some(b)) if a == b && !a.contains(&Dim::Unknown) => return Ok(g.to_string()),
        _ => {}
    }
    reduce_to(cx, s, g, gs.as_deref(), target, ts.as_deref())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn axes_are_decided_when_sizes_tell() {
        let g = vec![Dim::from("N"), Dim::Fixed(3), Dim::Fixed(4)];
        assert_eq!(
            broadcast_axes(&g, &[Dim::Fixed(3), Dim::Fixed(1)]),
            vec![Some(true), Some(false), Some(true)]
        );
        assert_eq!(
            broadcast_axes(&g, &[Dim::from("N"), Dim::Fixed(3), Dim::Fixed(4)]),
            vec![Some(false); 3]
        );
        assert_eq!(
            broadcast_axes(&g, &[Dim::Unknown, 3.into(), 4.into()])[0],
            None
        );
    }
}
