//! Conv and ConvTranspose gradients (input, weight, bias) vs finite differences on ONNX Runtime
//! and tract agreement, over random strides, pads (asymmetric), dilations, groups, 1-D and 2-D,
//! shapes declared or unknown, with each weight-gradient formulation.

use crate::gradcheck;

use densa::exporter::autodiff::ConvWeightGrad;
use densa::exporter::DType;
use gradcheck::*;
use proptest::prelude::*;

const FORMULATIONS: [ConvWeightGrad; 3] = [
    ConvWeightGrad::ConvTrick,
    ConvWeightGrad::PatchesEinsum,
    ConvWeightGrad::PatchesMatMul,
];

#[derive(Clone, Debug)]
struct Params {
    spatial: usize,
    batch: usize,
    cg: usize,
    mg: usize,
    group: usize,
    size: Vec<usize>,
    kernel: Vec<usize>,
    stride: Vec<usize>,
    dilation: Vec<usize>,
    pads: Vec<usize>,
    dynamic: bool,
    bias: bool,
    seed: u64,
}

fn params() -> impl Strategy<Value = Params> {
    (1usize..3)
        .prop_flat_map(|n| {
            (
                Just(n),
                1usize..3,
                1usize..3,
                1usize..3,
                1usize..3,
                prop::collection::vec(3usize..9, n),
                prop::collection::vec(1usize..4, n),
                prop::collection::vec(1usize..4, n),
                prop::collection::vec(1usize..3, n),
                prop::collection::vec(0usize..3, 2 * n),
                (any::<bool>(), any::<bool>(), any::<u64>()),
            )
        })
        .prop_map(
            |(
                spatial,
                batch,
                cg,
                mg,
                group,
                size,
                kernel,
                stride,
                dilation,
                pads,
                (dynamic, bias, seed),
            )| {
                Params {
                    spatial,
                    batch,
                    cg,
                    mg,
                    group,
                    size,
                    kernel,
                    stride,
                    dilation,
                    pads,
                    dynamic,
                    bias,
                    seed,
                }
            },
        )
        .prop_filter("the window fits the padded input", |p| {
            (0..p.spatial).all(|i| {
                let keff = p.dilation[i] * (p.kernel[i] - 1) + 1;
                p.size[i] + p.pads[i] + p.pads[i + p.spatial] >= keff
            })
        })
}

fn as_i64(v: &[usize]) -> Vec<i64> {
    v.iter().map(|&x| x as i64).collect()
}

fn conv_case(p: &Params, transpose: bool, formulation: ConvWeightGrad) {
    let mut rng = Gen::new(p.seed);
    let mut net = Net::new(DType::F32);
    let c = p.cg * p.group;
    let m = p.mg * p.group;
    let mut xs = vec![p.batch, c];
    xs.extend(&p.size);
    // Conv: W [M, C/g, k]; ConvTranspose: W [C, M/g, k].
    let mut ws = if transpose {
        vec![c, p.mg]
    } else {
        vec![m, p.cg]
    };
    ws.extend(&p.kernel);
    let nx: usize = xs.iter().product();
    let xv = (0..nx).map(|_| rng.uniform(-1.0, 1.0)).collect();
    let x = net.input("x", tensor(DType::F32, &xs, xv), p.dynamic);
    let w = net.rand_input(&mut rng, "w", &ws, -1.0, 1.0);
    let mut inputs = vec![x.clone(), w.clone()];
    let mut wrt = vec!["x", "w"];
    if p.bias {
        inputs.push(net.rand_input(&mut rng, "b", &[m], -1.0, 1.0));
        wrt.push("b");
    }
    let mut attrs = vec![
        ints("kernel_shape", &as_i64(&p.kernel)),
        ints("strides", &as_i64(&p.stride)),
        ints("dilations", &as_i64(&p.dilation)),
        ints("pads", &as_i64(&p.pads)),
        int("group", p.group as i64),
    ];
    if transpose {
        // output_padding must stay below the stride (ONNX Runtime checks the stride only).
        let op: Vec<i64> = (0..p.spatial)
            .map(|i| rng.below(0, p.stride[i] as i64))
            .collect();
        attrs.push(ints("output_padding", &op));
    }
    let refs: Vec<&str> = inputs.iter().map(String::as_str).collect();
    let op = if transpose { "ConvTranspose" } else { "Conv" };
    let y = net.node(op, &refs, attrs);
    let label = format!("{op} {p:?} {formulation:?}");
    check(
        &label,
        &net,
        &y,
        &wrt,
        &mut rng,
        &Check::f32_linear().conv(formulation),
    );
}

proptest! {
    #![proptest_config(cases(12))]

    #[test]
    fn conv(p in params()) {
        for f in FORMULATIONS {
            conv_case(&p, false, f);
        }
    }

    #[test]
    fn conv_transpose(p in params()) {
        // A transposed convolution's output must not be empty after its pads.
        for f in FORMULATIONS {
            let ok = (0..p.spatial).all(|i| {
                let keff = p.dilation[i] * (p.kernel[i] - 1) + 1;
                (p.stride[i] * (p.size[i] - 1) + keff) > p.pads[i] + p.pads[i + p.spatial]
            });
            if ok {
                conv_case(&p, true, f);
            }
        }
    }
}

/// The three formulations give the same weight gradient on a ResNet-like strided conv.
#[test]
fn formulations_agree() {
    let p = Params {
        spatial: 2,
        batch: 2,
        cg: 3,
        mg: 4,
        group: 1,
        size: vec![9, 8],
        kernel: vec![3, 3],
        stride: vec![2, 2],
        dilation: vec![1, 1],
        pads: vec![1, 1, 1, 1],
        dynamic: false,
        bias: false,
        seed: 11,
    };
    for f in FORMULATIONS {
        conv_case(&p, false, f);
        conv_case(
            &Params {
                dynamic: true,
                ..p.clone()
            },
            false,
            f,
        );
    }
}
