//! Resampling: Resize and GridSample.
//!
//! **Resize** is linear in its input and separable per axis, so its gradient is the transposed
//! interpolation: for each resized axis `k`, the interpolation matrix `M_k[i, o]` (weight of
//! input row `i` in output row `o`) is obtained by applying *the same Resize* to an identity
//! matrix laid along axis `k` (and one other axis), and the gradient is contracted with it
//! (`Einsum`). Because the forward op itself builds the matrix, every mode (nearest with any
//! rounding, linear, cubic, antialias) and coordinate transformation is reproduced exactly. The
//! identity is a constant when the size is known. `tf_crop_and_resize`, the `axes` attribute
//! and aspect-ratio policies other than `stretch` are refused. Axes whose size provably does
//! not change are skipped (scale 1 maps every coordinate to itself).
//!
//! ONNX Runtime copies its input when a Resize leaves the shape unchanged (whatever the
//! scales), and accepts linear/cubic 4-D resizes only when the two outer scales are 1. So the
//! identity is laid along axes `j` (its rows) and `k`, and a third axis `l` (the other spatial
//! axis of a 4-D tensor) is upsampled from 1 to 2 and indexed at 0: the shape always changes,
//! the outer scales stay 1, and a size-1 axis upsampled repeats its only value in every mode.
//!
//! **GridSample** (4-D, `padding_mode` zeros or border): the input gradient scatters the output
//! gradient to the four bilinear corners (or the nearest pixel) with their weights
//! (`ScatterElements`, add); the grid gradient of bilinear sampling is the difference of the
//! corner values weighted by the other axis' weights, times the un-normalisation scale (zero
//! where border padding clipped). Nearest sampling has no grid gradient. Bicubic and
//! reflection padding are refused.

use super::{AutodiffError, Ctx, Step};
use crate::builder::{attr, Dim};
use crate::tensor::{DType, Tensor};

type Grads = Result<Vec<Option<String>>, AutodiffError>;

fn identity_tensor(dtype: DType, shape: &[usize], n: usize) -> Tensor {
    let mut v = vec![0f64; n * n];
    for i in 0..n {
        v[i * n + i] = 1.0;
    }
    match dtype {
        DType::F64 => Tensor::F64(ndarray::ArrayD::from_shape_vec(shape, v).expect("n*n")),
        _ => Tensor::F32(
            ndarray::ArrayD::from_shape_vec(shape, v.into_iter().map(|x| x as f32).collect())
                .expect("n*n"),
        ),
    }
}

/// Resize.
pub(crate) fn resize(cx: &mut Ctx, s: &Step) -> Grads {
    let mut out = s.none();
    if !s.need(0) {
        return Ok(out);
    }
    let a = &s.node.attribute;
    if attr::get_string(a, "coordinate_transformation_mode").as_deref()
        == Some("tf_crop_and_resize")
    {
        return Err(s.unsupported("coordinate_transformation_mode tf_crop_and_resize"));
    }
    if attr::find(a, "axes").is_some() {
        return Err(s.unsupported("the axes attribute (give scales or sizes for every axis)"));
    }
    if attr::get_string(a, "keep_aspect_ratio_policy").is_some_and(|p| p != "stretch") {
        return Err(s.unsupported("keep_aspect_ratio_policy other than stretch"));
    }
    let dy = s.dy0()?.to_string();
    let (x, y) = (s.x(0)?, s.y(0));
    let xs = cx.shape(s, x)?;
    let ys = cx
        .info
        .shape(y)
        .unwrap_or_else(|| vec![Dim::Unknown; xs.len()]);
    let r = xs.len();
    if r < 2 {
        return Err(s.unsupported("rank < 2"));
    }
    let dtype = cx.dtype(s, x)?;
    let sizes = s.input(3);
    let scales = if sizes.is_none() { s.input(2) } else { None };
    if sizes.is_none() && scales.is_none() {
        return Err(s.unsupported("neither scales nor sizes"));
    }
    let scale_values = scales.and_then(|n| cx.info.get(n).floats());
    let axes: Vec<usize> = (0..r)
        .filter(|&k| match &scale_values {
            Some(v) => v.get(k).is_none_or(|&f| f != 1.0),
            None => xs[k] != ys[k] || matches!(xs[k], Dim::Unknown),
        })
        .collect();
    let same_shape = xs
        .iter()
        .zip(&ys)
        .all(|(a, b)| a.fixed().is_some() && a == b);
    if same_shape && !axes.is_empty() {
        return Err(s.unsupported(
            "scales other than 1 that keep the shape: ONNX Runtime copies the input there, the ONNX specification resamples",
        ));
    }
    let letters: Vec<char> = ('a'..='x').collect();
    if r > letters.len() {
        return Err(s.unsupported("rank above 24"));
    }
    let mut g = dy;
    for &k in &axes {
        let j = if k == 0 { 1 } else { 0 };
        // The axis upsampled 1 -> 2 to force a shape change (none for rank 2).
        let l = (0..r).rev().find(|&t| t != j && t != k);
        let e = &mut cx.e;
        // The identity along axes j and k.
        let eye = match xs[k].fixed() {
            Some(h) => {
                let mut shape = vec![1usize; r];
                shape[j] = h as usize;
                shape[k] = h as usize;
                e.constant(identity_tensor(dtype, &shape, h as usize))
            }
            None => {
                let hs = e.shape_range(x, k as i64, Some(k as i64 + 1));
                let h = e.reshape_const(&hs, &[]);
                let zero = e.i64_scalar(0);
                let one = e.i64_scalar(1);
                let ramp = e.op("Range", &[&zero, &h, &one], vec![]);
                let col = e.unsqueeze(&ramp, &[1]);
                let row = e.unsqueeze(&ramp, &[0]);
                let eq = e.op("Equal", &[&col, &row], vec![]);
                let eye2 = e.cast(&eq, dtype);
                // [H(j), H(k)] -> rank r with the two axes at j and k.
                let extra: Vec<i64> = (2..r as i64).collect();
                let full = if extra.is_empty() {
                    eye2
                } else {
                    e.unsqueeze(&eye2, &extra)
                };
                let mut perm = vec![0i64; r];
                let mut next = 2;
                for (t, p) in perm.iter_mut().enumerate() {
                    *p = if t == j {
                        0
                    } else if t == k {
                        1
                    } else {
                        next += 1;
                        next - 1
                    };
                }
                e.transpose(&full, &perm)
            }
        };
        let resized = match (sizes, &scale_values) {
            (Some(_), _) => {
                let v: Option<Vec<i64>> = (0..r)
                    .map(|t| {
                        if t == j {
                            xs[k].fixed()
                        } else if t == k {
                            ys[k].fixed()
                        } else if Some(t) == l {
                            Some(2)
                        } else {
                            Some(1)
                        }
                    })
                    .collect();
                let sz = match v {
                    Some(v) => e.i64s(&v),
                    None => {
                        let parts: Vec<String> = (0..r)
                            .map(|t| {
                                if t == j {
                                    e.shape_range(x, k as i64, Some(k as i64 + 1))
                                } else if t == k {
                                    e.shape_range(y, k as i64, Some(k as i64 + 1))
                                } else if Some(t) == l {
                                    e.i64s(&[2])
                                } else {
                                    e.i64s(&[1])
                                }
                            })
                            .collect();
                        let refs: Vec<&str> = parts.iter().map(String::as_str).collect();
                        e.op("Concat", &refs, vec![attr::int("axis", 0)])
                    }
                };
                e.op("Resize", &[&eye, "", "", &sz], a.clone())
            }
            (None, Some(v)) => {
                let sc: Vec<f32> = (0..r)
                    .map(|t| {
                        if t == k {
                            v[k] as f32
                        } else if Some(t) == l {
                            2.0
                        } else {
                            1.0
                        }
                    })
                    .collect();
                let c = e.constant(Tensor::F32(
                    ndarray::ArrayD::from_shape_vec(vec![r], sc).expect("1-D"),
                ));
                e.op("Resize", &[&eye, "", &c], a.clone())
            }
            (None, None) => {
                let sc = scales.expect("scales or sizes");
                let idx = e.i64s(&[k as i64]);
                let sk = e.op("Gather", &[sc, &idx], vec![attr::int("axis", 0)]);
                let mut parts: Vec<String> = Vec::new();
                for t in 0..r {
                    parts.push(if t == k {
                        sk.clone()
                    } else {
                        let v = if Some(t) == l { 2.0 } else { 1.0 };
                        e.constant(Tensor::F32(ndarray::ArrayD::from_elem(vec![1], v)))
                    });
                }
                let refs: Vec<&str> = parts.iter().map(String::as_str).collect();
                let c = e.op("Concat", &refs, vec![attr::int("axis", 0)]);
                e.op("Resize", &[&eye, "", &c], a.clone())
            }
        };
        let resized = match l {
            Some(l) => {
                let zero = e.i64s(&[0]);
                let one = e.i64s(&[1]);
                let ax = e.i64s(&[l as i64]);
                e.op("Slice", &[&resized, &zero, &one, &ax], vec![])
            }
            None => resized,
        };
        let others: Vec<i64> = (0..r as i64)
            .filter(|&t| t != j as i64 && t != k as i64)
            .collect();
        let m = if others.is_empty() {
            resized
        } else {
            e.squeeze(&resized, &others)
        };
        let g_subs: String = (0..r)
            .map(|t| if t == k { 'y' } else { letters[t] })
            .collect();
        let out_subs: String = (0..r)
            .map(|t| if t == k { 'z' } else { letters[t] })
            .collect();
        let m_subs = if j < k { "zy" } else { "yz" };
        let eq = format!("{g_subs},{m_subs}->{out_subs}");
        g = e.op("Einsum", &[&g, &m], vec![attr::string("equation", &eq)]);
    }
    out[0] = Some(g);
    Ok(out)
}

/// GridSample (4-D).
pub(crate) fn grid_sample(cx: &mut Ctx, s: &Step) -> Grads {
    let a = &s.node.attribute;
    let mode = attr::get_string(a, "mode").unwrap_or_else(|| "bilinear".into());
    let padding = attr::get_string(a, "padding_mode").unwrap_or_else(|| "zeros".into());
    let align = attr::get_int(a, "align_corners", 0) == 1;
    let bilinear = match mode.as_str() {
        "bilinear" | "linear" => true,
        "nearest" => false,
        other => return Err(s.unsupported(format!("mode {other}"))),
    };
    if padding != "zeros" && padding != "border" {
        return Err(s.unsupported(format!("padding_mode {padding}")));
    }
    let dy = s.dy0()?.to_string();
    let (x, grid) = (s.x(0)?, s.x(1)?);
    if cx.rank(s, x)? != 4 {
        return Err(s.unsupported("only 4-D inputs (2-D sampling)"));
    }
    cx.require_opset(s, 16, "GridSample and ScatterElements with reduction=add")?;
    let dtype = cx.dtype(s, x)?;
    let xs = cx.shape(s, x)?;
    let mut out = s.none();
    let e = &mut cx.e;
    let size = |e: &mut super::emit::Emitter, axis: usize| -> String {
        match xs[axis].fixed() {
            Some(v) => e.scalar(dtype, v as f64),
            None => {
                let d = e.shape_range(x, axis as i64, Some(axis as i64 + 1));
                let d = e.reshape_const(&d, &[]);
                e.cast(&d, dtype)
            }
        }
    };
    let wf = size(e, 3);
    let hf = size(e, 2);
    let one = e.scalar(dtype, 1.0);
    let half = e.scalar(dtype, 0.5);
    let zero = e.scalar(dtype, 0.0);
    let wm1 = e.sub(&wf, &one);
    let hm1 = e.sub(&hf, &one);
    // Un-normalised coordinates and d(coordinate)/d(grid).
    let coord =
        |e: &mut super::emit::Emitter, c: i64, n: &str, nm1: &str| -> (String, String, String) {
            let ci = e.i64_scalar(c);
            let g = e.op("Gather", &[grid, &ci], vec![attr::int("axis", 3)]);
            let gp1 = e.add(&g, &one);
            let (pos, scale) = if align {
                let t = e.mul(&gp1, nm1);
                (e.mul(&t, &half), e.mul(nm1, &half))
            } else {
                let t = e.mul(&gp1, n);
                let t = e.sub(&t, &one);
                (e.mul(&t, &half), e.mul(n, &half))
            };
            if padding == "border" {
                let clipped = e.op("Clip", &[&pos, &zero, nm1], vec![]);
                let above = e.op("Greater", &[&pos, &zero], vec![]);
                let below = e.op("Less", &[&pos, nm1], vec![]);
                let inside = e.op("And", &[&above, &below], vec![]);
                let m = e.cast(&inside, dtype);
                let scale = e.mul(&m, &scale);
                (clipped, scale, g)
            } else {
                (pos, scale, g)
            }
        };
    let (ix, sx, gx) = coord(e, 0, &wf, &wm1);
    let (iy, sy, _) = coord(e, 1, &hf, &hm1);
    // Corners: (x, y, weight).
    let corners: Vec<(String, String, String)> = if bilinear {
        let x0 = e.op("Floor", &[&ix], vec![]);
        let y0 = e.op("Floor", &[&iy], vec![]);
        let x1 = e.add(&x0, &one);
        let y1 = e.add(&y0, &one);
        let wx1 = e.sub(&ix, &x0);
        let wx0 = e.sub(&one, &wx1);
        let wy1 = e.sub(&iy, &y0);
        let wy0 = e.sub(&one, &wy1);
        vec![
            (x0.clone(), y0.clone(), e.mul(&wx0, &wy0)),
            (x1.clone(), y0, e.mul(&wx1, &wy0)),
            (x0, y1.clone(), e.mul(&wx0, &wy1)),
            (x1, y1, e.mul(&wx1, &wy1)),
        ]
    } else {
        let xr = e.op("Round", &[&ix], vec![]);
        let yr = e.op("Round", &[&iy], vec![]);
        let w = e.expand_like(&one, &xr);
        vec![(xr, yr, w)]
    };
    // Flat index y*W + x (clamped) and validity of each corner: [N, 1, L].
    let mut flat = Vec::new();
    let mut valid = Vec::new();
    for (cxr, cyr, _) in &corners {
        let inx = in_range(e, cxr, &zero, &wm1);
        let iny = in_range(e, cyr, &zero, &hm1);
        let v = e.op("And", &[&inx, &iny], vec![]);
        let v = e.cast(&v, dtype);
        let xc = e.op("Clip", &[cxr, &zero, &wm1], vec![]);
        let yc = e.op("Clip", &[cyr, &zero, &hm1], vec![]);
        let t = e.mul(&yc, &wf);
        let t = e.add(&t, &xc);
        let t = e.cast(&t, DType::I64);
        flat.push(e.reshape_const(&t, &[0, 1, -1]));
        valid.push(e.reshape_const(&v, &[0, 1, -1]));
    }
    let dyr = e.reshape_const(&dy, &[0, 0, -1]);
    // Small static input maps (a backbone's last stage sampled at many points): the input
    // gradient as `dy [N, C, L] x W [N, L, H*W]`, W the sampling weights of each output point
    // (one-hot corners times their bilinear weights), instead of scattering `N*C*4L` updates.
    let small_map = match (xs[1].fixed(), xs[2].fixed(), xs[3].fixed()) {
        (Some(c), Some(h), Some(w)) => h * w <= 256 && h * w <= c,
        _ => false,
    };
    if s.need(0) && small_map {
        let hw = xs[2].fixed().unwrap_or(0) * xs[3].fixed().unwrap_or(0);
        let cells = e.constant(Tensor::I64(
            ndarray::ArrayD::from_shape_vec(vec![1, 1, hw as usize], (0..hw).collect())
                .expect("[1, 1, HW]"),
        ));
        let mut terms = Vec::new();
        for ((fi, v), (_, _, w)) in flat.iter().zip(&valid).zip(&corners) {
            let col = e.reshape_const(fi, &[0, -1, 1]);
            let hit = e.op("Equal", &[&col, &cells], vec![]);
            let hit = e.cast(&hit, dtype);
            let wr = e.reshape_const(w, &[0, -1, 1]);
            let vr = e.reshape_const(v, &[0, -1, 1]);
            let wv = e.mul(&wr, &vr);
            terms.push(e.mul(&hit, &wv));
        }
        let weights = e.sum(&terms);
        let g = e.op("MatMul", &[&dyr, &weights], vec![]);
        out[0] = Some(e.reshape_like(&g, x));
    } else if s.need(0) {
        let mut idx = Vec::new();
        let mut upd = Vec::new();
        for ((fi, v), (_, _, w)) in flat.iter().zip(&valid).zip(&corners) {
            let wr = e.reshape_const(w, &[0, 1, -1]);
            let wv = e.mul(&wr, v);
            upd.push(e.mul(&dyr, &wv));
            idx.push(e.expand_like(fi, &dyr));
        }
        let ir: Vec<&str> = idx.iter().map(String::as_str).collect();
        let ur: Vec<&str> = upd.iter().map(String::as_str).collect();
        let idx = e.op("Concat", &ir, vec![attr::int("axis", 2)]);
        let upd = e.op("Concat", &ur, vec![attr::int("axis", 2)]);
        let zeros = e.zeros_like(x, dtype);
        let zeros = e.reshape_const(&zeros, &[0, 0, -1]);
        let sc = e.op(
            "ScatterElements",
            &[&zeros, &idx, &upd],
            vec![attr::int("axis", 2), attr::string("reduction", "add")],
        );
        out[0] = Some(e.reshape_like(&sc, x));
    }
    if s.need(1) && bilinear {
        let xr = e.reshape_const(x, &[0, 0, -1]);
        // p[a] = Σ_c dy · value at corner a, [N, L].
        let mut p = Vec::new();
        for (fi, v) in flat.iter().zip(&valid) {
            let ie = e.expand_like(fi, &dyr);
            let val = e.op("GatherElements", &[&xr, &ie], vec![attr::int("axis", 2)]);
            let val = e.mul(&val, v);
            let t = e.mul(&dyr, &val);
            p.push(e.reduce_sum(&t, &[1], false));
        }
        let flat_w = |e: &mut super::emit::Emitter, w: &str| e.reshape_const(w, &[0, -1]);
        let ix0 = e.op("Floor", &[&ix], vec![]);
        let iy0 = e.op("Floor", &[&iy], vec![]);
        let wx1 = e.sub(&ix, &ix0);
        let wx0 = e.sub(&one, &wx1);
        let wy1 = e.sub(&iy, &iy0);
        let wy0 = e.sub(&one, &wy1);
        let (wx0, wx1, wy0, wy1) = (
            flat_w(e, &wx0),
            flat_w(e, &wx1),
            flat_w(e, &wy0),
            flat_w(e, &wy1),
        );
        // d/dix = wy0 (p10 - p00) + wy1 (p11 - p01); d/diy = wx0 (p01 - p00) + wx1 (p11 - p10).
        let d1 = e.sub(&p[1], &p[0]);
        let d2 = e.sub(&p[3], &p[2]);
        let a1 = e.mul(&wy0, &d1);
        let a2 = e.mul(&wy1, &d2);
        let dix = e.add(&a1, &a2);
        let d3 = e.sub(&p[2], &p[0]);
        let d4 = e.sub(&p[3], &p[1]);
        let b1 = e.mul(&wx0, &d3);
        let b2 = e.mul(&wx1, &d4);
        let diy = e.add(&b1, &b2);
        let sxb = broadcast_like(e, &sx, &ix);
        let syb = broadcast_like(e, &sy, &iy);
        let sxr = flat_w(e, &sxb);
        let syr = flat_w(e, &syb);
        let dgx = e.mul(&dix, &sxr);
        let dgy = e.mul(&diy, &syr);
        let dgx = e.reshape_like(&dgx, &gx);
        let dgy = e.reshape_like(&dgy, &gx);
        let dgx = e.unsqueeze(&dgx, &[3]);
        let dgy = e.unsqueeze(&dgy, &[3]);
        out[1] = Some(e.op("Concat", &[&dgx, &dgy], vec![attr::int("axis", 3)]));
    }
    Ok(out)
}

/// `lo <= v <= hi`.
fn in_range(e: &mut super::emit::Emitter, v: &str, lo: &str, hi: &str) -> String {
    let a = e.op("GreaterOrEqual", &[v, lo], vec![]);
    let b = e.op("LessOrEqual", &[v, hi], vec![]);
    e.op("And", &[&a, &b], vec![])
}

/// `v` (a scalar or a tensor shaped like `like`) as a tensor shaped like `like`.
fn broadcast_like(e: &mut super::emit::Emitter, v: &str, like: &str) -> String {
    e.expand_like(v, like)
}
