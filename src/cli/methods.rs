//! `densa methods [--json]`: the pretext methods, their papers, what they pretrain (a backbone
//! or a whole detector) and default hyperparameters.

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
        println!("{}", serde_json::to_string_pretty(&list)?);
        return Ok(());
    }
    for m in methods {
        println!("{:<10} {}", m.name, m.title);
        println!("{:<10} pretrains a {}", "", m.family.name());
        println!("{:<10} {}; {}", "", m.paper, m.summary);
        let hyper: Vec<String> = hyperparameters(m)
            .iter()
            .map(|h| format!("{}={}", h.key, h.default))
            .collect();
        println!("{:<10} defaults: {}", "", hyper.join(" "));
        println!();
    }
    println!("override with `densa pretrain --method NAME --set key=value` or --config FILE.toml");
    Ok(())
}
