//! Pooling and resampling gradients (MaxPool, AveragePool, GlobalAveragePool, GlobalMaxPool,
//! Resize in every mode, GridSample) vs finite differences on ONNX Runtime, and tract agreement.

use crate::gradcheck;

use densa::exporter::DType;
use gradcheck::*;
use proptest::prelude::*;

fn as_i64(v: &[usize]) -> Vec<i64> {
    v.iter().map(|&x| x as i64).collect()
}

/// Distinct values (so the argmax of every window is unique and stays so under a step of 0.01).
fn distinct_input(net: &mut Net, rng: &mut Gen, shape: &[usize], dynamic: bool) -> String {
    let n = shape.iter().product();
    let v = rng.distinct(n, 0.05);
    net.input("x", tensor(DType::F32, shape, v), dynamic)
}

proptest! {
    #![proptest_config(cases(12))]

    #[test]
    fn max_pool(
        size in prop::collection::vec(3usize..8, 2),
        kernel in prop::collection::vec(1usize..4, 2),
        stride in prop::collection::vec(1usize..3, 2),
        dilation in prop::collection::vec(1usize..3, 2),
        pad in 0usize..2,
        ceil in any::<bool>(),
        indices_output in any::<bool>(),
        seed in any::<u64>(),
    ) {
        // ONNX: pads smaller than the kernel; the window fits.
        prop_assume!((0..2).all(|i| pad < kernel[i] && size[i] + 2 * pad > dilation[i] * (kernel[i] - 1)));
        // ONNX shape inference and ONNX Runtime's kernel disagree when ceil_mode adds a window
        // that starts in the end padding: keep away from that case.
        prop_assume!(!ceil || (0..2).all(|i| {
            let span = size[i] + 2 * pad - (dilation[i] * (kernel[i] - 1) + 1);
            span.div_ceil(stride[i]) * stride[i] < size[i] + pad
        }));
        let mut rng = Gen::new(seed);
        let mut net = Net::new(DType::F32);
        let x = distinct_input(&mut net, &mut rng, &[2, 2, size[0], size[1]], false);
        let attrs = vec![
            ints("kernel_shape", &as_i64(&kernel)),
            ints("strides", &as_i64(&stride)),
            ints("dilations", &as_i64(&dilation)),
            ints("pads", &[pad as i64; 4]),
            int("ceil_mode", ceil as i64),
        ];
        let y = if indices_output {
            net.node_n("MaxPool", &[&x], attrs, 2).remove(0)
        } else {
            net.node("MaxPool", &[&x], attrs)
        };
        check("MaxPool", &net, &y, &["x"], &mut rng, &Check::f32_linear().with_eps(0.01));
    }

    #[test]
    fn average_pool(
        size in prop::collection::vec(3usize..8, 2),
        kernel in prop::collection::vec(1usize..4, 2),
        stride in prop::collection::vec(1usize..4, 2),
        pads in prop::collection::vec(0usize..2, 4),
        count_include_pad in any::<bool>(),
        dynamic in any::<bool>(),
        seed in any::<u64>(),
    ) {
        prop_assume!((0..2).all(|i| pads[i] < kernel[i] && pads[i + 2] < kernel[i] && size[i] + pads[i] + pads[i + 2] >= kernel[i]));
        let mut rng = Gen::new(seed);
        let mut net = Net::new(DType::F32);
        let shape = [2usize, 3, size[0], size[1]];
        let n = shape.iter().product();
        let x = net.input("x", tensor(DType::F32, &shape, (0..n).map(|_| rng.uniform(-1.0, 1.0)).collect()), dynamic);
        let y = net.node("AveragePool", &[&x], vec![
            ints("kernel_shape", &as_i64(&kernel)),
            ints("strides", &as_i64(&stride)),
            ints("pads", &as_i64(&pads)),
            int("count_include_pad", count_include_pad as i64),
        ]);
        check("AveragePool", &net, &y, &["x"], &mut rng, &Check::f32_linear());
    }

    #[test]
    fn global_pools(h in 1usize..5, w in 1usize..5, dynamic in any::<bool>(), seed in any::<u64>()) {
        let mut rng = Gen::new(seed);
        for op in ["GlobalAveragePool", "GlobalMaxPool"] {
            let mut net = Net::new(DType::F32);
            let x = distinct_input(&mut net, &mut rng, &[2, 3, h, w], dynamic);
            let y = net.node(op, &[&x], vec![]);
            check(op, &net, &y, &["x"], &mut rng, &Check::f32_linear().with_eps(0.01));
        }
    }

    /// Resize: nearest (every rounding), linear, cubic; every coordinate transformation but
    /// tf_crop_and_resize; scales or sizes; up and down.
    #[test]
    fn resize(
        h in 2usize..7,
        w in 2usize..7,
        oh in 1usize..10,
        ow in 1usize..10,
        mode in 0usize..5,
        ctm in 0usize..5,
        use_sizes in any::<bool>(),
        dynamic in any::<bool>(),
        seed in any::<u64>(),
    ) {
        // Scales that keep the shape are refused (runtimes disagree there; see resize_same_shape).
        prop_assume!(use_sizes || (oh, ow) != (h, w));
        let mut rng = Gen::new(seed);
        let mut net = Net::new(DType::F32);
        let shape = [1usize, 2, h, w];
        let n = shape.iter().product();
        let x = net.input("x", tensor(DType::F32, &shape, (0..n).map(|_| rng.uniform(-1.0, 1.0)).collect()), dynamic);
        let (mode, nearest) = [
            ("nearest", "round_prefer_floor"),
            ("nearest", "floor"),
            ("nearest", "ceil"),
            ("linear", ""),
            ("cubic", ""),
        ][mode];
        let ctm = ["half_pixel", "asymmetric", "align_corners", "pytorch_half_pixel", "half_pixel_symmetric"][ctm];
        let mut attrs = vec![string("mode", mode), string("coordinate_transformation_mode", ctm)];
        if !nearest.is_empty() {
            attrs.push(string("nearest_mode", nearest));
        }
        let y = if use_sizes {
            let sizes = net.ints(&[1, 2, oh as i64, ow as i64]);
            net.node("Resize", &[&x, "", "", &sizes], attrs)
        } else {
            // Scales whose output size does not hinge on rounding (ONNX shape inference and
            // ONNX Runtime's kernel round 5 * 1.4 differently).
            let sc = vec![1.0, 1.0, (oh as f64 + 0.5) / h as f64, (ow as f64 + 0.5) / w as f64];
            let scales = net.init(tensor(DType::F32, &[4], sc));
            net.node("Resize", &[&x, "", &scales], attrs)
        };
        // tract's forward Resize differs from ONNX Runtime in some modes (nearest with
        // align_corners, half_pixel_symmetric, cubic downscaling): there the harness checks
        // the gradients on ONNX Runtime only, with a note.
        let c = Check::f32_linear();
        check(&format!("Resize {mode} {nearest} {ctm} {h}x{w} -> {oh}x{ow} sizes={use_sizes}"), &net, &y, &["x"], &mut rng, &c);
    }

    /// GridSample: bilinear (input and grid gradients) and nearest (input gradient), zeros and
    /// border padding, both align_corners; few channels (the input gradient scattered) and
    /// more channels than map cells (the input gradient as a product with sampling weights).
    #[test]
    fn grid_sample(
        channels in prop::sample::select(vec![2usize, 40]),
        h in 2usize..6,
        w in 2usize..6,
        oh in 1usize..4,
        ow in 1usize..4,
        bilinear in any::<bool>(),
        border in any::<bool>(),
        align in any::<bool>(),
        seed in any::<u64>(),
    ) {
        let mut rng = Gen::new(seed);
        let mut net = Net::new(DType::F32);
        let x = net.rand_input(&mut rng, "x", &[2, channels, h, w], -1.0, 1.0);
        // Grid points away from pixel boundaries (where bilinear weights have kinks) and from
        // nearest-rounding ties, so finite differences see a smooth function.
        let ng = 2 * oh * ow * 2;
        let gv: Vec<f64> = (0..ng).map(|i| {
            let size = if i % 2 == 0 { w } else { h } as f64;
            loop {
                let g = rng.uniform(-1.2, 1.2);
                let pix = if align { (g + 1.0) / 2.0 * (size - 1.0) } else { ((g + 1.0) * size - 1.0) / 2.0 };
                let frac = pix - pix.floor();
                if (0.1..0.4).contains(&frac) || (0.6..0.9).contains(&frac) {
                    break g;
                }
            }
        }).collect();
        let grid = net.input("grid", tensor(DType::F32, &[2, oh, ow, 2], gv), false);
        let y = net.node("GridSample", &[&x, &grid], vec![
            string("mode", if bilinear { "bilinear" } else { "nearest" }),
            string("padding_mode", if border { "border" } else { "zeros" }),
            int("align_corners", align as i64),
        ]);
        let label = format!("GridSample C={channels} {h}x{w} bilinear={bilinear} border={border} align={align}");
        check(&label, &net, &y, &["x"], &mut rng, &Check::f32_linear());
        if bilinear {
            check(&label, &net, &y, &["grid"], &mut rng, &Check::f32_smooth().with_eps(1e-3));
        }
    }
}

/// A Resize whose scales are not 1 but keep the shape is ambiguous (ONNX Runtime copies, the
/// specification resamples): refused with a message naming the node.
#[test]
fn resize_same_shape_is_refused() {
    let mut rng = Gen::new(1);
    let mut net = Net::new(DType::F32);
    let x = net.rand_input(&mut rng, "x", &[1, 1, 4, 4], -1.0, 1.0);
    let scales = net.init(tensor(DType::F32, &[4], vec![1.0, 1.0, 1.125, 1.125]));
    let y = net.node("Resize", &[&x, "", &scales], vec![string("mode", "linear")]);
    let req = densa::exporter::autodiff::GradRequest::new(&y, &["x"]);
    let e = densa::exporter::autodiff::with_gradients(&net.model(&y), &req).unwrap_err();
    let msg = e.to_string();
    let node = y.split(':').next().unwrap();
    assert!(
        msg.contains(&format!("`{node}`"))
            && msg.contains("(Resize)")
            && msg.contains("keep the shape"),
        "{msg}"
    );
}
