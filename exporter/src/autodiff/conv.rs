//! Conv and ConvTranspose, any spatial rank, strides, pads, dilations and groups.
//!
//! Input gradient of Conv: a ConvTranspose of the output gradient with the same weight, stride,
//! pads, dilation and groups. A strided convolution may ignore the last `r = (H + pb + pe -
//! keff) mod s` rows of its padded input; the transposed convolution gets them back as
//! `output_padding = r` when `H` is known, and otherwise (dynamic sizes) as zero rows: it runs
//! without end padding, is padded with `s - 1` zeros and sliced to `Shape(x)` at run time.
//!
//! Weight gradient (`dW[m, c, k] = Σ_{n, o} dY[n, m, o] · Xpad[n, c, o·s + k·d]`), three
//! formulations ([`ConvWeightGrad`]):
//! - *Conv trick*: the input with batch and channels swapped (`[C/g, g·N, H]`) convolved with
//!   the output gradient as kernel (`[M, N, Ho]`, groups g), stride = the forward dilation,
//!   dilation = the forward stride, end pad `pe - r` (DESIGN.md); when `r > pe` or `r` is
//!   unknown, the end pad stays `pe` and the result is sliced to the kernel size.
//! - *Patches*: one strided `Slice` of the padded input per kernel tap, stacked
//!   (`[N, C, K, Ho]`), contracted with the output gradient by one `Einsum`, or by a batched
//!   `MatMul` per sample and a `ReduceSum` over the batch.
//!
//! ConvTranspose is the adjoint: its input gradient is a Conv of the output gradient with the
//! same weight, and its weight gradient is the Conv weight gradient with the roles of input and
//! output gradient exchanged (`r` is then the `output_padding`).
//!
//! `auto_pad = SAME_*` needs known input sizes (to resolve the pads); ConvTranspose with
//! `output_shape` is refused (give pads and output_padding).

use super::{AutodiffError, ConvWeightGrad, Ctx, Step};
use crate::builder::{attr, Dim};

type Grads = Result<Vec<Option<String>>, AutodiffError>;

/// The window of a convolution, resolved.
#[derive(Clone, Debug)]
pub(crate) struct Geom {
    pub kernel: Vec<i64>,
    pub strides: Vec<i64>,
    pub dilations: Vec<i64>,
    pub pads_begin: Vec<i64>,
    pub pads_end: Vec<i64>,
    pub group: i64,
}

impl Geom {
    fn n(&self) -> usize {
        self.kernel.len()
    }

    fn keff(&self, i: usize) -> i64 {
        self.dilations[i] * (self.kernel[i] - 1) + 1
    }

    fn pads(&self) -> Vec<i64> {
        [self.pads_begin.clone(), self.pads_end.clone()].concat()
    }

    /// Reads the window attributes of a Conv/ConvTranspose/pool node. `kernel` comes from the
    /// weight or `kernel_shape`; `in_sizes` (spatial) resolves `SAME_*` pads.
    pub fn read(s: &Step, kernel: Vec<i64>, in_sizes: &[Dim]) -> Result<Geom, AutodiffError> {
        let a = &s.node.attribute;
        let n = kernel.len();
        let get = |name: &str, default: i64, len: usize| -> Result<Vec<i64>, AutodiffError> {
            match attr::get_ints(a, name) {
                Some(v) if v.len() == len => Ok(v.to_vec()),
                Some(v) => Err(s.unsupported(format!(
                    "attribute {name} has {} values for {n} spatial axes",
                    v.len()
                ))),
                None => Ok(vec![default; len]),
            }
        };
        let strides = get("strides", 1, n)?;
        let dilations = get("dilations", 1, n)?;
        let mut pads = get("pads", 0, 2 * n)?;
        let auto_pad = attr::get_string(a, "auto_pad").unwrap_or_default();
        match auto_pad.as_str() {
            "" | "NOTSET" => {}
            "VALID" => pads = vec![0; 2 * n],
            "SAME_UPPER" | "SAME_LOWER" => {
                for i in 0..n {
                    let h = in_sizes
                        .get(i)
                        .and_then(Dim::fixed)
                        .ok_or_else(|| s.unknown(&s.node.input[0], "spatial size (auto_pad)"))?;
                    let keff = dilations[i] * (kernel[i] - 1) + 1;
                    let out = (h + strides[i] - 1) / strides[i];
                    let total = ((out - 1) * strides[i] + keff - h).max(0);
                    let (b, e) = if auto_pad == "SAME_UPPER" {
                        (total / 2, total - total / 2)
                    } else {
                        (total - total / 2, total / 2)
                    };
                    pads[i] = b;
                    pads[i + n] = e;
                }
            }
            other => return Err(s.unsupported(format!("auto_pad {other}"))),
        }
        Ok(Geom {
            kernel,
            strides,
            dilations,
            pads_begin: pads[..n].to_vec(),
            pads_end: pads[n..].to_vec(),
            group: attr::get_int(a, "group", 1),
        })
    }

    /// `r` per axis: rows of the padded input that no window reaches, when the size is known.
    fn remainder(&self, in_sizes: &[Dim]) -> Vec<Option<i64>> {
        (0..self.n())
            .map(|i| {
                in_sizes.get(i).and_then(Dim::fixed).map(|h| {
                    (h + self.pads_begin[i] + self.pads_end[i] - self.keff(i))
                        .rem_euclid(self.strides[i])
                })
            })
            .collect()
    }
}

fn kernel_of(cx: &Ctx, s: &Step, w: &str, skip: usize) -> Result<Vec<i64>, AutodiffError> {
    if let Some(k) = attr::get_ints(&s.node.attribute, "kernel_shape") {
        return Ok(k.to_vec());
    }
    let shape = cx.shape(s, w)?;
    shape[skip..]
        .iter()
        .map(|d| d.fixed().ok_or_else(|| s.unknown(w, "kernel size")))
        .collect()
}

fn fixed_dim(cx: &Ctx, s: &Step, v: &str, axis: usize) -> Result<i64, AutodiffError> {
    cx.shape(s, v)?
        .get(axis)
        .and_then(Dim::fixed)
        .ok_or_else(|| s.unknown(v, "channel count"))
}

/// The transposed convolution of `dy` with `w`: the gradient of a Conv with respect to its
/// input `x` (whose spatial sizes are `x_sizes`), or the scatter of any window op.
pub(crate) fn conv_input_grad(
    cx: &mut Ctx,
    dy: &str,
    w: &str,
    x: &str,
    x_sizes: &[Dim],
    g: &Geom,
) -> String {
    let n = g.n();
    let r = g.remainder(x_sizes);
    // Axes whose remainder is unknown and may be non-zero: dynamic fix-up.
    let dynamic: Vec<usize> = (0..n)
        .filter(|&i| g.strides[i] > 1 && r[i].is_none())
        .collect();
    let mut pads_end = g.pads_end.clone();
    for &i in &dynamic {
        pads_end[i] = 0;
    }
    let output_padding: Vec<i64> = r.iter().map(|v| v.unwrap_or(0)).collect();
    let mut attrs = vec![
        attr::ints("kernel_shape", &g.kernel),
        attr::ints("strides", &g.strides),
        attr::ints("dilations", &g.dilations),
        attr::ints("pads", &[g.pads_begin.clone(), pads_end].concat()),
        attr::int("group", g.group),
    ];
    if output_padding.iter().any(|&p| p != 0) {
        attrs.push(attr::ints("output_padding", &output_padding));
    }
    let dx = cx.e.op("ConvTranspose", &[dy, w], attrs);
    if dynamic.is_empty() {
        return dx;
    }
    // Missing rows are zeros at the end (at most s - 1 of them), then cut to the input size.
    let rank = n + 2;
    let mut pads = vec![0i64; 2 * rank];
    for &i in &dynamic {
        pads[rank + 2 + i] = g.strides[i] - 1;
    }
    let p = cx.e.i64s(&pads);
    let padded = cx.e.op("Pad", &[&dx, &p], vec![]);
    let axes: Vec<i64> = dynamic.iter().map(|&i| 2 + i as i64).collect();
    let starts = cx.e.i64s(&vec![0; axes.len()]);
    let sizes = cx.e.shape(x);
    let ax = cx.e.i64s(&axes);
    let ends =
        cx.e.op("Gather", &[&sizes, &ax], vec![attr::int("axis", 0)]);
    cx.e.op("Slice", &[&padded, &starts, &ends, &ax], vec![])
}

/// `dW[m, c/g, k] = Σ dY[n, m, o] · Xpad[n, c, o·s + k·d]` for an input `x` and output
/// gradient `dy`; `out_ch` = M, `in_per_group` = C/g; `r` as in [`Geom::remainder`] (None:
/// unknown).
#[allow(clippy::too_many_arguments)]
pub(crate) fn conv_weight_grad(
    cx: &mut Ctx,
    x: &str,
    dy: &str,
    dy_sizes: &[Dim],
    g: &Geom,
    out_ch: i64,
    in_per_group: i64,
    r: &[Option<i64>],
) -> String {
    match cx.options.conv_weight_grad {
        ConvWeightGrad::ConvTrick => weight_grad_conv_trick(cx, x, dy, g, out_ch, in_per_group, r),
        ConvWeightGrad::PatchesEinsum | ConvWeightGrad::PatchesMatMul => {
            weight_grad_patches(cx, x, dy, dy_sizes, g, out_ch, in_per_group)
        }
    }
}

fn weight_grad_conv_trick(
    cx: &mut Ctx,
    x: &str,
    dy: &str,
    g: &Geom,
    out_ch: i64,
    in_per_group: i64,
    r: &[Option<i64>],
) -> String {
    let n = g.n();
    let rank = n + 2;
    let spatial: Vec<i64> = (2..rank as i64).collect();
    let e = &mut cx.e;
    let (xt, dyt) = if g.group == 1 {
        let mut perm = vec![1, 0];
        perm.extend(&spatial);
        (e.transpose(x, &perm), e.transpose(dy, &perm))
    } else {
        // x [N, C, H] -> [N, g, C/g, H] -> [C/g, g, N, H] -> [C/g, g*N, H].
        let batch = e.shape_range(x, 0, Some(1));
        let sp = e.shape_range(x, 2, None);
        let gc = e.i64s(&[g.group, in_per_group]);
        let split = e.op("Concat", &[&batch, &gc, &sp], vec![attr::int("axis", 0)]);
        let x5 = e.op("Reshape", &[x, &split], vec![]);
        let mut perm = vec![2, 1, 0];
        perm.extend(spatial.iter().map(|a| a + 1));
        let x5t = e.transpose(&x5, &perm);
        let head = e.i64s(&[in_per_group, -1]);
        let target = e.op("Concat", &[&head, &sp], vec![attr::int("axis", 0)]);
        let xt = e.op("Reshape", &[&x5t, &target], vec![]);
        // dy [N, M, Ho] -> [N, g, M/g, Ho] -> [g, M/g, N, Ho] -> [M, N, Ho].
        let dbatch = e.shape_range(dy, 0, Some(1));
        let dsp = e.shape_range(dy, 2, None);
        let gm = e.i64s(&[g.group, out_ch / g.group]);
        let dsplit = e.op("Concat", &[&dbatch, &gm, &dsp], vec![attr::int("axis", 0)]);
        let d5 = e.op("Reshape", &[dy, &dsplit], vec![]);
        let mut perm = vec![1, 2, 0];
        perm.extend(spatial.iter().map(|a| a + 1));
        let d5t = e.transpose(&d5, &perm);
        let dhead = e.i64s(&[out_ch, -1]);
        let dtarget = e.op("Concat", &[&dhead, &dsp], vec![attr::int("axis", 0)]);
        (xt, e.op("Reshape", &[&d5t, &dtarget], vec![]))
    };
    let mut pads_end = g.pads_end.clone();
    let mut slice_needed = false;
    for i in 0..n {
        match r[i] {
            Some(ri) if ri <= g.pads_end[i] => pads_end[i] -= ri,
            Some(0) => {}
            _ => slice_needed = true,
        }
    }
    let attrs = vec![
        attr::ints("strides", &g.dilations),
        attr::ints("dilations", &g.strides),
        attr::ints("pads", &[g.pads_begin.clone(), pads_end].concat()),
        attr::int("group", g.group),
    ];
    let c = e.op("Conv", &[&xt, &dyt], attrs);
    let c = if slice_needed {
        let starts = e.i64s(&vec![0; n]);
        let ends = e.i64s(&g.kernel);
        let axes = e.i64s(&spatial);
        e.op("Slice", &[&c, &starts, &ends, &axes], vec![])
    } else {
        c
    };
    let mut perm = vec![1, 0];
    perm.extend(&spatial);
    e.transpose(&c, &perm)
}

fn weight_grad_patches(
    cx: &mut Ctx,
    x: &str,
    dy: &str,
    dy_sizes: &[Dim],
    g: &Geom,
    out_ch: i64,
    in_per_group: i64,
) -> String {
    let n = g.n();
    let rank = n + 2;
    let spatial: Vec<i64> = (2..rank as i64).collect();
    let e = &mut cx.e;
    let xp = if g.pads().iter().any(|&p| p != 0) {
        let mut pads = vec![0i64; 2 * rank];
        for i in 0..n {
            pads[2 + i] = g.pads_begin[i];
            pads[rank + 2 + i] = g.pads_end[i];
        }
        let p = e.i64s(&pads);
        e.op("Pad", &[x, &p], vec![])
    } else {
        x.to_string()
    };
    let out_sizes: Option<Vec<i64>> = dy_sizes.iter().map(Dim::fixed).collect();
    // Ho * s, for ends computed at run time.
    let scaled = if out_sizes.is_none() {
        let ho = e.shape_range(dy, 2, None);
        let s = e.i64s(&g.strides);
        Some(e.mul(&ho, &s))
    } else {
        None
    };
    let axes = e.i64s(&spatial);
    let steps = e.i64s(&g.strides);
    let taps: i64 = g.kernel.iter().product();
    let mut patches = Vec::with_capacity(taps as usize);
    for t in 0..taps {
        // The kernel position of tap t (row-major over the kernel).
        let mut rem = t;
        let mut pos = vec![0i64; n];
        for i in (0..n).rev() {
            pos[i] = rem % g.kernel[i];
            rem /= g.kernel[i];
        }
        let start: Vec<i64> = (0..n).map(|i| pos[i] * g.dilations[i]).collect();
        let starts = e.i64s(&start);
        let ends = match (&out_sizes, &scaled) {
            (Some(ho), _) => {
                let v: Vec<i64> = (0..n)
                    .map(|i| start[i] + (ho[i] - 1) * g.strides[i] + 1)
                    .collect();
                e.i64s(&v)
            }
            (None, Some(sc)) => {
                let off: Vec<i64> = (0..n).map(|i| start[i] - g.strides[i] + 1).collect();
                let o = e.i64s(&off);
                e.add(sc, &o)
            }
            (None, None) => unreachable!("scaled is set when sizes are unknown"),
        };
        let p = e.op("Slice", &[&xp, &starts, &ends, &axes, &steps], vec![]);
        patches.push(e.unsqueeze(&p, &[2]));
    }
    let refs: Vec<&str> = patches.iter().map(String::as_str).collect();
    // [N, C, K, Ho...]
    let stacked = e.op("Concat", &refs, vec![attr::int("axis", 2)]);
    let grp = g.group;
    let mg = out_ch / grp;
    let mut wshape = vec![out_ch, in_per_group];
    wshape.extend(&g.kernel);
    match cx.options.conv_weight_grad {
        ConvWeightGrad::PatchesEinsum => {
            let p = e.reshape_const(&stacked, &[0, grp, in_per_group, taps, -1]);
            let d = e.reshape_const(dy, &[0, grp, mg, -1]);
            let w = e.op(
                "Einsum",
                &[&d, &p],
                vec![attr::string("equation", "ngml,ngckl->gmck")],
            );
            e.reshape_const(&w, &wshape)
        }
        _ => {
            let p = e.reshape_const(&stacked, &[0, grp, in_per_group * taps, -1]);
            let d = e.reshape_const(dy, &[0, grp, mg, -1]);
            let dt = e.transpose(&d, &[0, 1, 3, 2]);
            // [N, g, C/g*K, M/g] summed over N.
            let m = e.op("MatMul", &[&p, &dt], vec![]);
            let m = e.reduce_sum(&m, &[0], false);
            let mt = e.transpose(&m, &[0, 2, 1]);
            e.reshape_const(&mt, &wshape)
        }
    }
}

/// Bias gradient: the output gradient summed over every axis but the channels.
fn bias_grad(cx: &mut Ctx, dy: &str, rank: usize) -> String {
    let mut axes = vec![0i64];
    axes.extend(2..rank as i64);
    cx.e.reduce_sum(dy, &axes, false)
}

/// Conv.
pub(crate) fn conv(cx: &mut Ctx, s: &Step) -> Grads {
    let dy = s.dy0()?.to_string();
    let (x, w, y) = (s.x(0)?, s.x(1)?, s.y(0));
    let xs = cx.shape(s, x)?;
    let rank = xs.len();
    if rank < 3 {
        return Err(s.unsupported("input of rank < 3"));
    }
    let kernel = kernel_of(cx, s, w, 2)?;
    let g = Geom::read(s, kernel, &xs[2..])?;
    let mut out = s.none();
    if s.need(0) {
        out[0] = Some(conv_input_grad(cx, &dy, w, x, &xs[2..], &g));
    }
    if s.need(1) {
        let m = fixed_dim(cx, s, w, 0)?;
        let cg = fixed_dim(cx, s, w, 1)?;
        let ys = cx.shape(s, y)?;
        let r = g.remainder(&xs[2..]);
        out[1] = Some(conv_weight_grad(cx, x, &dy, &ys[2..], &g, m, cg, &r));
    }
    if s.need(2) {
        out[2] = Some(bias_grad(cx, &dy, rank));
    }
    Ok(out)
}

/// ConvTranspose.
pub(crate) fn conv_transpose(cx: &mut Ctx, s: &Step) -> Grads {
    let dy = s.dy0()?.to_string();
    let (x, w) = (s.x(0)?, s.x(1)?);
    let a = &s.node.attribute;
    if attr::find(a, "output_shape").is_some() {
        return Err(s.unsupported("output_shape (give pads and output_padding instead)"));
    }
    if attr::get_string(a, "auto_pad").is_some_and(|p| p.starts_with("SAME")) {
        return Err(s.unsupported("auto_pad SAME_* (give pads instead)"));
    }
    let xs = cx.shape(s, x)?;
    let rank = xs.len();
    if rank < 3 {
        return Err(s.unsupported("input of rank < 3"));
    }
    let kernel = kernel_of(cx, s, w, 2)?;
    let g = Geom::read(s, kernel, &[])?;
    let mut out = s.none();
    if s.need(0) {
        let attrs = vec![
            attr::ints("kernel_shape", &g.kernel),
            attr::ints("strides", &g.strides),
            attr::ints("dilations", &g.dilations),
            attr::ints("pads", &g.pads()),
            attr::int("group", g.group),
        ];
        out[0] = Some(cx.e.op("Conv", &[&dy, w], attrs));
    }
    if s.need(1) {
        // W [C, M/g, k]: the Conv weight gradient with input dY and output gradient X.
        let c = fixed_dim(cx, s, w, 0)?;
        let mg = fixed_dim(cx, s, w, 1)?;
        let op = attr::get_ints(a, "output_padding")
            .map(<[i64]>::to_vec)
            .unwrap_or(vec![0; g.kernel.len()]);
        let r: Vec<Option<i64>> = op.iter().map(|&v| Some(v)).collect();
        out[1] = Some(conv_weight_grad(cx, &dy, x, &xs[2..], &g, c, mg, &r));
    }
    if s.need(2) {
        out[2] = Some(bias_grad(cx, &dy, rank));
    }
    Ok(out)
}
