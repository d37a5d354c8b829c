//! `densa run` and `densa bench`.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::Args;
use densa_runtime::{npy, open_backend, Session, Tensor};

use super::BackendArgs;

#[derive(Debug, Args)]
pub struct RunArgs {
    /// The ONNX model.
    pub model: PathBuf,
    /// An input: `FILE.npy` (for a model with one input) or `NAME=FILE.npy`. Repeatable.
    #[arg(long = "input", required = true)]
    pub inputs: Vec<String>,
    /// Where to write the outputs (.npz, one array per output, by name).
    #[arg(long)]
    pub out: PathBuf,
    #[command(flatten)]
    pub backend: BackendArgs,
}

/// Reads `--input` arguments into named tensors, matching unnamed ones to the model's inputs.
fn read_inputs(
    specs: &[String],
    session: &dyn Session,
    model: &Path,
) -> Result<Vec<(String, Tensor)>> {
    let names: Vec<&str> = session
        .interface()
        .inputs
        .iter()
        .map(|p| p.name.as_str())
        .collect();
    let mut out = Vec::new();
    for spec in specs {
        let (name, file) = match spec.split_once('=') {
            Some((n, f)) if !n.is_empty() && !Path::new(spec).exists() => (n.to_string(), f),
            _ => {
                if names.len() != 1 {
                    bail!(
                        "{}: the model has {} inputs ({}); name each one: --input NAME=FILE.npy",
                        model.display(),
                        names.len(),
                        names.join(", ")
                    );
                }
                (names[0].to_string(), spec.as_str())
            }
        };
        let t =
            npy::read_npy(Path::new(file)).with_context(|| format!("reading input `{name}`"))?;
        out.push((name, t));
    }
    Ok(out)
}

fn open(model: &Path, backend: &BackendArgs) -> Result<Box<dyn Session>> {
    let b = open_backend(backend.backend, &backend.options())?;
    // Decode first so that a bad file gets densa's message, not a backend's.
    densa_exporter::io::load(model)
        .with_context(|| format!("reading model {}", model.display()))?;
    b.load_file(model)
        .with_context(|| format!("loading {} on {}", model.display(), b.name()))
}

pub fn run(args: RunArgs) -> Result<()> {
    let mut session = open(&args.model, &args.backend)?;
    let inputs = read_inputs(&args.inputs, session.as_ref(), &args.model)?;
    let outputs = session
        .run(inputs)
        .with_context(|| format!("running {}", args.model.display()))?;
    npy::write_npz(&args.out, &outputs)?;
    for (name, t) in &outputs {
        println!("{name}: {} {:?}", t.dtype(), t.shape());
    }
    Ok(())
}

#[derive(Debug, Args)]
pub struct BenchArgs {
    /// The ONNX model.
    pub model: PathBuf,
    /// Input shape of a single-input float model, e.g. 8,3,224,224.
    #[arg(long, value_delimiter = ',')]
    pub shape: Vec<usize>,
    /// Timed runs (after --warmup untimed ones).
    #[arg(long, default_value_t = 20)]
    pub iters: usize,
    #[arg(long, default_value_t = 3)]
    pub warmup: usize,
    /// Print one JSON object instead of text.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub backend: BackendArgs,
}

pub fn bench(args: BenchArgs) -> Result<()> {
    let mut session = open(&args.model, &args.backend)?;
    let names: Vec<String> = session
        .interface()
        .inputs
        .iter()
        .map(|p| p.name.clone())
        .collect();
    if names.len() != 1 {
        bail!(
            "{}: `densa bench` times single-input models; this one has {}",
            args.model.display(),
            names.len()
        );
    }
    if args.shape.is_empty() {
        bail!("--shape is required (e.g. --shape 1,3,224,224)");
    }
    // Deterministic, non-constant input so no backend can shortcut.
    let n: usize = args.shape.iter().product();
    let data: Vec<f32> = (0..n).map(|i| ((i % 251) as f32) / 251.0).collect();
    let input = ndarray::ArrayD::from_shape_vec(args.shape.clone(), data)?;
    let mut times = Vec::with_capacity(args.iters);
    for i in 0..args.warmup + args.iters {
        let inputs = vec![(names[0].clone(), Tensor::F32(input.clone()))];
        let t0 = Instant::now();
        session.run(inputs)?;
        if i >= args.warmup {
            times.push(t0.elapsed().as_secs_f64() * 1e3);
        }
    }
    times.sort_by(|a, b| a.total_cmp(b));
    let median = times[times.len() / 2];
    let mean = times.iter().sum::<f64>() / times.len() as f64;
    if args.json {
        println!(
            "{}",
            serde_json::json!({"backend": args.backend.backend.to_string(), "median_ms": median, "mean_ms": mean, "min_ms": times[0], "iters": args.iters})
        );
    } else {
        println!(
            "median {median:.2} ms, mean {mean:.2} ms, min {:.2} ms over {} runs",
            times[0], args.iters
        );
    }
    Ok(())
}
