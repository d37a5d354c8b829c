//! `densa finetune --task detect`.

use anyhow::Result;

use super::finetune::FinetuneArgs;

pub fn run(_args: &FinetuneArgs) -> Result<()> {
    anyhow::bail!("`densa finetune --task detect` is not yet available")
}
