//! Convolution gradients of densa's autodiff on ResNet-18's convolution shapes: the input
//! gradient (ConvTranspose) and the weight gradient in each formulation (Conv trick, patches +
//! Einsum, patches + batched MatMul), on ONNX Runtime and tract, side by side with PyTorch's
//! own backward (`torch.nn.grad.conv2d_input/weight`, CPU, same threads) when Debian's
//! `python3-torch` is installed. Prints median milliseconds summed over the shapes and the
//! ratios to PyTorch.
//!
//! ```sh
//! cargo bench --profile dev --bench autodiff_conv   # dependencies are optimised in dev too
//! DENSA_BENCH_BATCH=16 DENSA_BENCH_SIZE=224 DENSA_BENCH_ITERS=5 cargo bench --bench autodiff_conv
//! ```

use std::collections::HashSet;
use std::process::Command;
use std::time::Instant;

use densa::exporter::autodiff::{gradients, ConvWeightGrad, GradOptions, GradRequest};
use densa::exporter::builder::{attr, tensor_type, Dim};
use densa::exporter::onnx::{
    GraphProto, ModelProto, NodeProto, OperatorSetIdProto, ValueInfoProto,
};
use densa::exporter::passes::eliminate_dead_code;
use densa::exporter::{DType, Tensor};
use densa::runtime::{open_backend, Backend, BackendKind, BackendOptions};
use ndarray::ArrayD;

/// (in channels, out channels, kernel, stride, input size at 224 px).
const RESNET18_CONVS: [(usize, usize, usize, usize, usize); 11] = [
    (3, 64, 7, 2, 224),
    (64, 64, 3, 1, 56),
    (64, 128, 3, 2, 56),
    (128, 128, 3, 1, 28),
    (64, 128, 1, 2, 56),
    (128, 256, 3, 2, 28),
    (256, 256, 3, 1, 14),
    (128, 256, 1, 2, 28),
    (256, 512, 3, 2, 14),
    (512, 512, 3, 1, 7),
    (256, 512, 1, 2, 14),
];

fn env(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn input(name: &str, shape: &[usize]) -> ValueInfoProto {
    let dims: Vec<Dim> = shape.iter().map(|&d| Dim::Fixed(d as i64)).collect();
    ValueInfoProto {
        name: name.into(),
        r#type: Some(tensor_type(DType::F32, &dims)),
        ..Default::default()
    }
}

/// `y = Conv(x, w)` and its gradient graph for `wrt`, the output gradient fed as `dy`.
fn grad_model(
    shape: (usize, usize, usize, usize, usize),
    batch: usize,
    size: usize,
    wrt: &str,
    f: ConvWeightGrad,
) -> (ModelProto, Vec<(String, Tensor)>) {
    let (cin, cout, k, s, h) = shape;
    let h = (h * size / 224).max(k);
    let pad = k / 2;
    let ho = (h + 2 * pad - k) / s + 1;
    let conv = NodeProto {
        name: "conv".into(),
        op_type: "Conv".into(),
        input: vec!["x".into(), "w".into()],
        output: vec!["y".into()],
        attribute: vec![
            attr::ints("kernel_shape", &[k as i64; 2]),
            attr::ints("strides", &[s as i64; 2]),
            attr::ints("pads", &[pad as i64; 4]),
        ],
        ..Default::default()
    };
    let model = ModelProto {
        ir_version: 8,
        opset_import: vec![OperatorSetIdProto {
            domain: String::new(),
            version: 17,
        }],
        graph: Some(GraphProto {
            name: "conv".into(),
            node: vec![conv],
            input: vec![
                input("x", &[batch, cin, h, h]),
                input("w", &[cout, cin, k, k]),
            ],
            output: vec![input("y", &[batch, cout, ho, ho])],
            ..Default::default()
        }),
        ..Default::default()
    };
    let req = GradRequest {
        loss: "y".into(),
        wrt: vec![wrt.into()],
        stop_gradient: HashSet::new(),
        seed_name: Some("dy".into()),
        options: GradOptions {
            conv_weight_grad: f,
            opset: 17,
        },
    };
    // The gradient alone: the forward convolution is not an output (and is pruned).
    let graph = model.graph.as_ref().expect("graph");
    let g = gradients(graph, &req).expect("differentiable");
    let (_, gv) = &g.grads[0];
    let mut graph = graph.clone();
    graph.node.extend(g.nodes);
    graph.initializer.extend(g.initializers);
    let out_shape: Vec<usize> = if wrt == "x" {
        vec![batch, cin, h, h]
    } else {
        vec![cout, cin, k, k]
    };
    graph.input.push(input("dy", &[batch, cout, ho, ho]));
    graph.output = vec![input(gv, &out_shape)];
    let g = eliminate_dead_code(&ModelProto {
        graph: Some(graph),
        ..model
    })
    .expect("prunes");
    let fill = |shape: &[usize]| {
        let n: usize = shape.iter().product();
        Tensor::F32(
            ArrayD::from_shape_vec(
                shape,
                (0..n)
                    .map(|i| ((i * 7919) % 1000) as f32 / 500.0 - 1.0)
                    .collect(),
            )
            .unwrap(),
        )
    };
    let feeds = vec![
        ("x".to_string(), fill(&[batch, cin, h, h])),
        ("w".to_string(), fill(&[cout, cin, k, k])),
        ("dy".to_string(), fill(&[batch, cout, ho, ho])),
    ];
    (g, feeds)
}

fn median_ms(
    backend: &dyn Backend,
    model: &ModelProto,
    feeds: &[(String, Tensor)],
    iters: usize,
) -> f64 {
    let mut s = backend.load_model(model, "bench").expect("loads");
    s.run(feeds.to_vec()).expect("runs");
    let mut t: Vec<f64> = (0..iters)
        .map(|_| {
            let start = Instant::now();
            s.run(feeds.to_vec()).expect("runs");
            start.elapsed().as_secs_f64() * 1e3
        })
        .collect();
    t.sort_by(f64::total_cmp);
    t[t.len() / 2]
}

fn main() {
    let batch = env("DENSA_BENCH_BATCH", 4);
    let size = env("DENSA_BENCH_SIZE", 112);
    let iters = env("DENSA_BENCH_ITERS", 3);
    let threads = env("DENSA_BENCH_THREADS", 2);
    let options = BackendOptions {
        threads: Some(threads),
        allow_download: false,
        ..BackendOptions::default()
    };
    let mut backends: Vec<Box<dyn Backend>> = vec![];
    match open_backend(BackendKind::Ort, &options) {
        Ok(b) => backends.push(b),
        Err(e) => eprintln!("note: ONNX Runtime unavailable ({e}); tract only"),
    }
    backends.push(open_backend(BackendKind::Tract, &options).expect("tract"));
    println!("ResNet-18 convolutions, batch {batch}, {size} px, {threads} threads, median of {iters}, ms summed over {} shapes", RESNET18_CONVS.len());
    let torch = torch_ms(batch, size, threads, iters);
    let mut rows: Vec<(String, String, f64)> = vec![];
    for b in &backends {
        let cases: [(&str, &str, ConvWeightGrad); 4] = [
            ("input (ConvTranspose)", "x", ConvWeightGrad::ConvTrick),
            ("weight: Conv trick", "w", ConvWeightGrad::ConvTrick),
            (
                "weight: patches + Einsum",
                "w",
                ConvWeightGrad::PatchesEinsum,
            ),
            (
                "weight: patches + MatMul",
                "w",
                ConvWeightGrad::PatchesMatMul,
            ),
        ];
        for (label, wrt, f) in cases {
            let total: f64 = RESNET18_CONVS
                .iter()
                .map(|&shape| {
                    let (m, feeds) = grad_model(shape, batch, size, wrt, f);
                    median_ms(b.as_ref(), &m, &feeds, iters)
                })
                .sum();
            rows.push((b.name().to_string(), label.to_string(), total));
        }
    }
    println!(
        "{:<8} {:<26} {:>10} {:>12}",
        "backend", "gradient", "ms", "vs PyTorch"
    );
    for (backend, label, ms) in rows {
        let peer = torch.map(|(i, w)| if label.starts_with("input") { i } else { w });
        let ratio = peer
            .map(|p| format!("{:.2}x", ms / p))
            .unwrap_or_else(|| "-".into());
        println!("{backend:<8} {label:<26} {ms:>10.1} {ratio:>12}");
    }
    if let Some((i, w)) = torch {
        println!(
            "{:<8} {:<26} {:>10.1}\n{:<8} {:<26} {:>10.1}",
            "pytorch", "input", i, "pytorch", "weight", w
        );
    }
}

/// PyTorch's input and weight gradients (ms summed over the shapes), when installed.
fn torch_ms(batch: usize, size: usize, threads: usize, iters: usize) -> Option<(f64, f64)> {
    let shapes: Vec<String> = RESNET18_CONVS
        .iter()
        .map(|(ci, co, k, s, h)| format!("({ci},{co},{k},{s},{})", (h * size / 224).max(*k)))
        .collect();
    let script = format!(
        r#"
import time, torch
torch.set_num_threads({threads})
def med(f):
    f(); t = []
    for _ in range({iters}):
        s = time.perf_counter(); f(); t.append((time.perf_counter() - s) * 1e3)
    return sorted(t)[len(t) // 2]
ti = tw = 0.0
for ci, co, k, s, h in [{shapes}]:
    x = torch.randn({batch}, ci, h, h); w = torch.randn(co, ci, k, k)
    y = torch.nn.functional.conv2d(x, w, stride=s, padding=k // 2); dy = torch.randn_like(y)
    ti += med(lambda: torch.nn.grad.conv2d_input(x.shape, w, dy, stride=s, padding=k // 2))
    tw += med(lambda: torch.nn.grad.conv2d_weight(x, w.shape, dy, stride=s, padding=k // 2))
print(ti, tw)
"#,
        shapes = shapes.join(",")
    );
    let o = Command::new("/usr/bin/python3")
        .args(["-c", &script])
        .output()
        .ok()?;
    if !o.status.success() {
        eprintln!("note: no PyTorch peer (Debian python3-torch not installed)");
        return None;
    }
    let text = String::from_utf8_lossy(&o.stdout);
    let mut it = text.split_whitespace().filter_map(|v| v.parse().ok());
    Some((it.next()?, it.next()?))
}
