//! Data-parallel launches of `densa train` and `densa pretrain`: `mpirun -np N densa ...`
//! (cargo feature `mpi`). See `densa_runtime::train::distributed` for the engine; here the
//! communicator is set up from the launch and rank 0 reports the communication figures.

use std::sync::Arc;

use anyhow::{Context, Result};
use densa_runtime::train::{CommStats, Communicator, Trainer};

/// The communicator this launch asks for (one process unless started by `mpirun -np N`).
pub fn communicator() -> Result<Arc<dyn Communicator>> {
    densa_runtime::train::from_env().context("setting up data-parallel training")
}

/// `result`, or, when it is an error of one rank of several, the end of the whole job:
/// the error is printed with the rank and MPI aborts every rank (the others would otherwise
/// wait for this one in their next collective).
pub fn or_abort(comm: &Arc<dyn Communicator>, result: Result<()>) -> Result<()> {
    match result {
        Err(e) if comm.size() > 1 => comm.abort(&format!("{e:#}")),
        other => other,
    }
}

/// ` on N processes` for messages (empty for one).
pub fn ranks_note(ranks: usize) -> String {
    if ranks > 1 {
        format!(", {ranks} processes data parallel")
    } else {
        String::new()
    }
}

/// Refuses to resume the run in `out`, trained on `trained` processes, on `now`: the global
/// batch (`--batch` is per process), the data order and the learning rate depend on the count.
pub fn check_process_count(out: &std::path::Path, trained: usize, now: usize) -> Result<()> {
    if trained == now {
        return Ok(());
    }
    let relaunch = match trained {
        1 => "one process".to_string(),
        n => format!("`mpirun -np {n}`"),
    };
    anyhow::bail!(
        "{} holds a run trained on {trained} process(es), this launch has {now}: its global \
         batch, data order and learning rate depend on the count; resume it with {relaunch}, \
         or use another --out",
        out.display()
    )
}

/// Prints the communication share of a data-parallel run (nothing for one process).
pub fn report(trainer: &Trainer<'_>) {
    if let Some(s) = trainer.comm_stats() {
        report_stats(&s);
    }
}

/// Prints the communication share of a data-parallel run's figures.
pub fn report_stats(s: &CommStats) {
    if s.steps == 0 {
        return;
    }
    let share = s.all_reduce_s / s.step_s.max(1e-12);
    println!(
        "data parallel: {} ranks, {} steps, {:.3} s/step, all-reduce {:.2} MB/step in {:.4} s/step ({:.1}% of the step, {:.2} GB/s), waiting for other ranks {:.4} s/step",
        s.ranks,
        s.steps,
        s.step_s / s.steps as f64,
        s.bytes_per_step as f64 / 1e6,
        s.all_reduce_s / s.steps as f64,
        100.0 * share,
        s.bytes_per_step as f64 * s.steps as f64 / s.all_reduce_s.max(1e-12) / 1e9,
        s.wait_s / s.steps as f64,
    );
}
