//! `densa inspect`.

use std::collections::HashMap;
use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Args;
use densa_exporter::inspect::{declared_dims, estimate_flops, summarize};

#[derive(Debug, Args)]
pub struct InspectArgs {
    /// The ONNX model.
    pub model: PathBuf,
    /// Input shape used for the FLOPs estimate, NAME=D,D,D,D (repeatable). Default: the
    /// declared shape, with batch 1 and 224 for other symbolic dimensions.
    #[arg(long = "shape")]
    pub shapes: Vec<String>,
    /// Print one JSON object.
    #[arg(long)]
    pub json: bool,
}

pub fn run(args: InspectArgs) -> Result<()> {
    let path = &args.model;
    let model = densa_exporter::io::load(path)
        .with_context(|| format!("reading model {}", path.display()))?;
    let summary = summarize(&model);
    let mut shapes: HashMap<String, Vec<usize>> = HashMap::new();
    for spec in &args.shapes {
        let (name, dims) = spec
            .split_once('=')
            .with_context(|| format!("--shape {spec}: expected NAME=D,D,..."))?;
        let dims: Vec<usize> = dims
            .split(',')
            .map(|d| d.trim().parse::<usize>())
            .collect::<Result<_, _>>()
            .with_context(|| format!("--shape {spec}: dimensions must be whole numbers"))?;
        shapes.insert(name.to_string(), dims);
    }
    for port in &summary.inputs {
        if !shapes.contains_key(&port.name) {
            if let Some(dims) = declared_dims(&model, &port.name) {
                let concrete = dims
                    .iter()
                    .enumerate()
                    .map(|(i, d)| d.unwrap_or(if i == 0 { 1 } else { 224 }))
                    .collect();
                shapes.insert(port.name.clone(), concrete);
            }
        }
    }
    let flops = match densa_runtime::backend::tract::infer_shapes(&model, path, &shapes) {
        Ok(all) => Some(estimate_flops(&model, &all)),
        Err(e) => {
            eprintln!("densa: FLOPs not estimated: {e}");
            None
        }
    };
    if args.json {
        let mut v = serde_json::to_value(&summary)?;
        v["flops"] = flops
            .map(|(f, _)| f.into())
            .unwrap_or(serde_json::Value::Null);
        v["flops_input_shapes"] = serde_json::to_value(&shapes)?;
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(());
    }
    println!("{}", path.display());
    println!(
        "  producer: {}   IR {}   opsets: {}",
        summary.producer,
        summary.ir_version,
        summary
            .opsets
            .iter()
            .map(|(d, v)| format!("{d} {v}"))
            .collect::<Vec<_>>()
            .join(", ")
    );
    println!("inputs:");
    for p in &summary.inputs {
        println!("  {:<20} {:<8} {}", p.name, p.dtype, p.shape);
    }
    println!("outputs:");
    for p in &summary.outputs {
        println!("  {:<20} {:<8} {}", p.name, p.dtype, p.shape);
    }
    println!(
        "parameters: {} ({:.2} MB)",
        summary.parameters,
        summary.parameter_bytes as f64 / 1e6
    );
    match flops {
        Some((f, unknown)) => {
            let mut shapes: Vec<_> = shapes.iter().collect();
            shapes.sort();
            let at: Vec<String> = shapes.iter().map(|(n, s)| format!("{n}={s:?}")).collect();
            println!(
                "FLOPs: {:.3} G at {} (multiply-add = 2 FLOPs){}",
                f as f64 / 1e9,
                at.join(" "),
                if unknown > 0 {
                    format!("; {unknown} node(s) without shapes not counted")
                } else {
                    String::new()
                }
            );
        }
        None => println!("FLOPs: not estimated"),
    }
    println!("ops ({} nodes):", summary.nodes);
    let mut ops: Vec<_> = summary.op_histogram.iter().collect();
    ops.sort_by(|a, b| b.1.cmp(a.1).then(a.0.cmp(b.0)));
    for (op, n) in ops {
        println!("  {op:<24} {n}");
    }
    if !summary.metadata.is_empty() {
        println!("metadata:");
        for (k, v) in &summary.metadata {
            println!("  {k} = {v}");
        }
    }
    Ok(())
}
