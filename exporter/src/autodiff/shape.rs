//! Shape ops: Reshape, Flatten, Squeeze, Unsqueeze, Transpose, Expand, Tile, Concat, Split,
//! Slice, Pad.
//!
//! Index-selecting ops whose selection is only known at run time (a Slice with computed
//! bounds or steps, a reflect/edge Pad) use the *index ramp*: the forward op applied to
//! `arange(size(x))` shaped like `x` tells, for every output element, which input element it
//! came from; a `ScatterElements` sends the gradient back there. This reproduces the forward
//! op's bounds clamping and negative steps exactly, with no re-derivation. Static cases take
//! the direct route (`Pad` for a unit-step Slice, `Slice` for a constant Pad).

use super::broadcast::reduce_like;
use super::infer::{norm_axis, slice_bounds};
use super::{AutodiffError, Ctx, Step};
use crate::builder::{attr, Dim};

type Grads = Result<Vec<Option<String>>, AutodiffError>;

/// Reshape, Flatten, Squeeze, Unsqueeze: reshape the gradient back.
pub(crate) fn reshape(cx: &mut Ctx, s: &Step) -> Grads {
    let mut out = s.none();
    if !s.need(0) {
        return Ok(out);
    }
    let dy = s.dy0()?.to_string();
    let x = s.x(0)?;
    out[0] = Some(match cx.info.get(x).fixed_shape() {
        Some(shape) => cx.e.reshape_const(&dy, &shape),
        None => cx.e.reshape_like(&dy, x),
    });
    Ok(out)
}

/// Transpose: the inverse permutation.
pub(crate) fn transpose(cx: &mut Ctx, s: &Step) -> Grads {
    let mut out = s.none();
    if !s.need(0) {
        return Ok(out);
    }
    let dy = s.dy0()?.to_string();
    let x = s.x(0)?;
    let perm: Vec<i64> = match attr::get_ints(&s.node.attribute, "perm") {
        Some(p) => p.to_vec(),
        None => (0..cx.rank(s, x)? as i64).rev().collect(),
    };
    let mut inv = vec![0i64; perm.len()];
    for (i, &p) in perm.iter().enumerate() {
        inv[p as usize] = i as i64;
    }
    out[0] = Some(cx.e.transpose(&dy, &inv));
    Ok(out)
}

/// Expand: sum the broadcast axes.
pub(crate) fn expand(cx: &mut Ctx, s: &Step) -> Grads {
    let mut out = s.none();
    if s.need(0) {
        let dy = s.dy0()?.to_string();
        out[0] = Some(reduce_like(cx, s, &dy, s.y(0), s.x(0)?)?);
    }
    Ok(out)
}

/// Tile: view the gradient as `[r0, d0, r1, d1, ...]` and sum the repeat axes.
pub(crate) fn tile(cx: &mut Ctx, s: &Step) -> Grads {
    let mut out = s.none();
    if !s.need(0) {
        return Ok(out);
    }
    let dy = s.dy0()?.to_string();
    let (x, reps) = (s.x(0)?, s.x(1)?);
    let rank = cx.rank(s, x)?;
    let e = &mut cx.e;
    let target = match cx.info.get(x).fixed_shape() {
        Some(shape) => {
            // Static: interleave repeats and sizes, [-1] for the repeats (one per axis at most).
            let reps_v = cx.info.get(reps).ints();
            match reps_v {
                Some(r) => {
                    let v: Vec<i64> = r.iter().zip(&shape).flat_map(|(&a, &b)| [a, b]).collect();
                    e.i64s(&v)
                }
                None => interleave(e, reps, x),
            }
        }
        None => interleave(e, reps, x),
    };
    let view = e.op("Reshape", &[&dy, &target], vec![]);
    let axes: Vec<i64> = (0..rank as i64).map(|i| 2 * i).collect();
    let summed = e.reduce_sum(&view, &axes, false);
    out[0] = Some(summed);
    Ok(out)
}

fn interleave(e: &mut super::emit::Emitter, reps: &str, x: &str) -> String {
    let r = e.cast(reps, crate::tensor::DType::I64);
    let r = e.unsqueeze(&r, &[1]);
    let sh = e.shape(x);
    let sh = e.unsqueeze(&sh, &[1]);
    let pairs = e.op("Concat", &[&r, &sh], vec![attr::int("axis", 1)]);
    e.reshape_const(&pairs, &[-1])
}

/// Concat: split the gradient at the operands' sizes.
pub(crate) fn concat(cx: &mut Ctx, s: &Step) -> Grads {
    let dy = s.dy0()?.to_string();
    let n = s.node.input.len();
    let x0 = s.x(0)?;
    let rank = cx.rank(s, x0)?;
    let axis = norm_axis(attr::get_int(&s.node.attribute, "axis", 0), rank);
    let sizes: Option<Vec<i64>> = (0..n)
        .map(|i| {
            s.input(i)
                .and_then(|v| cx.info.shape(v))
                .and_then(|sh| sh.get(axis).and_then(Dim::fixed))
        })
        .collect();
    let e = &mut cx.e;
    let split = match sizes {
        Some(v) => e.i64s(&v),
        None => {
            let parts: Vec<String> = (0..n)
                .map(|i| e.shape_range(&s.node.input[i], axis as i64, Some(axis as i64 + 1)))
                .collect();
            let refs: Vec<&str> = parts.iter().map(String::as_str).collect();
            e.op("Concat", &refs, vec![attr::int("axis", 0)])
        }
    };
    let parts = e.op_n(
        "Split",
        &[&dy, &split],
        vec![attr::int("axis", axis as i64)],
        n,
    );
    let mut out = s.none();
    for (i, p) in parts.into_iter().enumerate() {
        if s.need(i) {
            out[i] = Some(p);
        }
    }
    Ok(out)
}

/// Split: concatenate the output gradients (zeros for outputs without one).
pub(crate) fn split(cx: &mut Ctx, s: &Step) -> Grads {
    let mut out = s.none();
    if !s.need(0) {
        return Ok(out);
    }
    let x = s.x(0)?;
    let rank = cx.rank(s, x)?;
    let dtype = cx.dtype(s, x)?;
    let axis = norm_axis(attr::get_int(&s.node.attribute, "axis", 0), rank);
    let parts: Vec<String> =
        s.dy.iter()
            .enumerate()
            .map(|(i, d)| match d {
                Some(g) => g.clone(),
                None => cx.e.zeros_like(s.y(i), dtype),
            })
            .collect();
    let refs: Vec<&str> = parts.iter().map(String::as_str).collect();
    out[0] = Some(cx.e.op("Concat", &refs, vec![attr::int("axis", axis as i64)]));
    Ok(out)
}

/// Slice.
pub(crate) fn slice(cx: &mut Ctx, s: &Step) -> Grads {
    let mut out = s.none();
    if !s.need(0) {
        return Ok(out);
    }
    let dy = s.dy0()?.to_string();
    let x = s.x(0)?;
    let rank = cx.rank(s, x)?;
    let dtype = cx.dtype(s, x)?;
    let konst = |i: usize| s.input(i).map(|n| cx.info.get(n).ints());
    let (starts, ends) = (konst(1).flatten(), konst(2).flatten());
    let axes = match konst(3) {
        None => starts
            .as_ref()
            .map(|v| (0..v.len() as i64).collect::<Vec<_>>()),
        Some(a) => a,
    };
    let steps = match konst(4) {
        None => starts.as_ref().map(|v| vec![1i64; v.len()]),
        Some(st) => st,
    };
    let xs = cx.info.shape(x);
    // Static route: unit steps, known bounds and sizes on the sliced axes: Pad.
    if let (Some(st), Some(en), Some(ax), Some(sp), Some(xs)) = (&starts, &ends, &axes, &steps, &xs)
    {
        if sp.iter().all(|&v| v == 1) {
            let mut pads = vec![0i64; 2 * rank];
            let mut ok = true;
            for k in 0..ax.len() {
                let a = norm_axis(ax[k], rank);
                match xs[a].fixed() {
                    Some(d) => {
                        let (b, e) = slice_bounds(st[k], en[k], 1, d);
                        let e = e.max(b);
                        pads[a] = b;
                        pads[rank + a] = d - e;
                    }
                    None => ok = false,
                }
            }
            if ok {
                let p = cx.e.i64s(&pads);
                let g = cx.e.op("Pad", &[&dy, &p], vec![]);
                if let [axis] = ax.as_slice() {
                    let a = norm_axis(*axis, rank);
                    if let Some(d) = xs[a].fixed() {
                        let (b, e) = slice_bounds(st[0], en[0], 1, d);
                        cx.e.slice_grads.insert(
                            g.clone(),
                            super::emit::SliceGrad {
                                dy: dy.clone(),
                                axis: a,
                                rank,
                                begin: b,
                                end: e.max(b),
                                dim: d,
                            },
                        );
                    }
                }
                out[0] = Some(g);
                return Ok(out);
            }
        }
    }
    // Index ramp.
    let e = &mut cx.e;
    let ramp = ramp_like(e, x);
    let mut inputs: Vec<&str> = vec![&ramp];
    inputs.extend(s.node.input[1..].iter().map(String::as_str));
    let picked = e.op("Slice", &inputs, vec![]);
    out[0] = Some(scatter_flat(e, x, &picked, &dy, dtype, false));
    Ok(out)
}

/// `arange(size(x))` shaped like `x` (int64).
fn ramp_like(e: &mut super::emit::Emitter, x: &str) -> String {
    let n = e.op("Size", &[x], vec![]);
    let zero = e.i64_scalar(0);
    let one = e.i64_scalar(1);
    let r = e.op("Range", &[&zero, &n, &one], vec![]);
    e.reshape_like(&r, x)
}

/// Scatters `g` to the flat positions `idx` of a zero tensor shaped like `x`. With
/// `spare_slot`, index `size(x)` is a dump for elements that came from no input (padding).
fn scatter_flat(
    e: &mut super::emit::Emitter,
    x: &str,
    idx: &str,
    g: &str,
    dtype: crate::tensor::DType,
    spare_slot: bool,
) -> String {
    let n = e.op("Size", &[x], vec![]);
    let n1 = e.reshape_const(&n, &[1]);
    let len = if spare_slot {
        let one = e.i64s(&[1]);
        e.add(&n1, &one)
    } else {
        n1.clone()
    };
    let zeros = e.zeros_of_shape(&len, dtype);
    let fi = e.reshape_const(idx, &[-1]);
    let fg = e.reshape_const(g, &[-1]);
    let mut attrs = vec![attr::int("axis", 0)];
    if spare_slot {
        attrs.push(attr::string("reduction", "add"));
    }
    let sc = e.op("ScatterElements", &[&zeros, &fi, &fg], attrs);
    let sc = if spare_slot {
        let z = e.i64s(&[0]);
        e.op("Slice", &[&sc, &z, &n1], vec![])
    } else {
        sc
    };
    e.reshape_like(&sc, x)
}

/// Pad (constant, reflect, edge).
pub(crate) fn pad(cx: &mut Ctx, s: &Step) -> Grads {
    let dy = s.dy0()?.to_string();
    let x = s.x(0)?;
    let rank = cx.rank(s, x)?;
    let dtype = cx.dtype(s, x)?;
    let a = &s.node.attribute;
    let mode = attr::get_string(a, "mode").unwrap_or_else(|| "constant".into());
    let pads = s.input(1).and_then(|p| cx.info.get(p).ints());
    let axes: Option<Vec<usize>> = match s.input(3) {
        None => Some((0..rank).collect()),
        Some(n) => cx
            .info
            .get(n)
            .ints()
            .map(|v| v.iter().map(|&a| norm_axis(a, rank)).collect()),
    };
    let mut out = s.none();
    if s.need(0) {
        let direct = mode == "constant"
            && pads.as_ref().is_some_and(|p| p.iter().all(|&v| v >= 0))
            && axes.is_some();
        out[0] = Some(if direct {
            // Cut the padding off again.
            let p = pads.clone().expect("checked");
            let ax = axes.clone().expect("checked");
            let k = ax.len();
            let starts: Vec<i64> = (0..k).map(|i| p[i]).collect();
            let ends: Vec<i64> = (0..k)
                .map(|i| if p[k + i] > 0 { -p[k + i] } else { i64::MAX })
                .collect();
            let axv: Vec<i64> = ax.iter().map(|&v| v as i64).collect();
            let e = &mut cx.e;
            let st = e.i64s(&starts);
            let en = e.i64s(&ends);
            let av = e.i64s(&axv);
            e.op("Slice", &[&dy, &st, &en, &av], vec![])
        } else {
            if mode == "wrap" {
                return Err(s.unsupported("mode wrap"));
            }
            cx.require_opset(s, 16, "ScatterElements with reduction=add")?;
            let e = &mut cx.e;
            let ramp = ramp_like(e, x);
            // Padding reads from the spare slot `size(x)`.
            let n = e.op("Size", &[x], vec![]);
            let mut inputs: Vec<&str> = vec![&ramp, s.x(1)?];
            if mode == "constant" {
                inputs.push(&n);
            } else {
                inputs.push("");
            }
            if let Some(ax) = s.input(3) {
                inputs.push(ax);
            }
            let picked = e.op("Pad", &inputs, vec![attr::string("mode", &mode)]);
            scatter_flat(e, x, &picked, &dy, dtype, true)
        });
    }
    if let (true, Some(_)) = (s.need(2), s.input(2)) {
        // The constant value receives the gradient of every padding element.
        let ry = cx.rank(s, s.y(0))?;
        let all: Vec<i64> = (0..ry as i64).collect();
        let total = cx.e.reduce_sum(&dy, &all, false);
        let inner = match &out[0] {
            Some(dx) => {
                let dx = dx.clone();
                let allx: Vec<i64> = (0..rank as i64).collect();
                cx.e.reduce_sum(&dx, &allx, false)
            }
            None => return Err(s.unsupported("gradient of the pad value alone")),
        };
        out[2] = Some(cx.e.sub(&total, &inner));
    }
    Ok(out)
}
