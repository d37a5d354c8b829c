//! `densa finetune --task segment`.

use anyhow::Result;

use super::finetune::FinetuneArgs;

pub fn run(_args: &FinetuneArgs) -> Result<()> {
    anyhow::bail!("`densa finetune --task segment` is not yet available")
}
