//! `densa methods [--json]`: the pretext methods, their papers, what they pretrain (a backbone
//! or a whole detector) and default hyperparameters.

use std::fmt::Write as _;
use std::io::Write as _;

use anyhow::Result;
use clap::Args;
use densa_models::pretext::{self, registry::hyperparameters};

#[derive(Debug, Args)]
pub struct MethodsArgs {
    /// Print JSON: a list of objects with `name`, `title`, `paper`, `summary`, `family`
    /// (`backbone` or `detector`) and `hyperparameters` (key -> default).
    #[arg(long)]
    pub json: bool,
}

pub fn run(args: MethodsArgs) -> Result<()> {
    let methods = pretext::methods();
    if args.json {
        let list: Vec<serde_json::Value> = methods
            .iter()
            .map(|m| {
                let hyper: serde_json::Map<String, serde_json::Value> = hyperparameters(m)
                    .into_iter()
                    .map(|h| {
                        (
                            h.key.to_string(),
                            serde_json::to_value(&h.default).unwrap_or_default(),
                        )
                    })
                    .collect();
                serde_json::json!({
                    "name": m.name,
                    "title": m.title,
                    "paper": m.paper,
                    "summary": m.summary,
                    "family": m.family.name(),
                    "hyperparameters": hyper,
                })
            })
            .collect();
        return print(serde_json::to_string_pretty(&list)? + "\n");
    }
    let mut text = String::new();
    for m in methods {
        let hyper: Vec<String> = hyperparameters(m)
            .iter()
            .map(|h| format!("{}={}", h.key, h.default))
            .collect();
        writeln!(text, "{:<10} {}", m.name, m.title)?;
        writeln!(text, "{:<10} pretrains a {}", "", m.family.name())?;
        writeln!(text, "{:<10} {}; {}", "", m.paper, m.summary)?;
        writeln!(text, "{:<10} defaults: {}\n", "", hyper.join(" "))?;
    }
    text.push_str(
        "override with `densa pretrain --method NAME --set key=value` or --config FILE.toml\n",
    );
    print(text)
}

/// Writes `text` to standard output; a reader that stopped early (`densa methods | head`) is
/// not an error.
fn print(text: String) -> Result<()> {
    match std::io::stdout().lock().write_all(text.as_bytes()) {
        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => Err(e.into()),
        _ => Ok(()),
    }
}
