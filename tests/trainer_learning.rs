//! The trainer runs a hand-written train step (toy MLP, SGD with momentum) on tract and on
//! ONNX Runtime: the loss falls by a large factor, a seed gives the same curve every time, and
//! the two backends' curves agree.

use crate::common;

use std::path::Path;

use densa::exporter::weights::StateDict;
use densa::runtime::train::log::read_records;
use densa::runtime::train::{toy, Defaults, Length, Shuffled, StepRecord, TrainOptions, Trainer};
use densa::runtime::Backend;

const STEPS: u64 = 300;

fn options(out: &Path, seed: u64) -> TrainOptions {
    let mut o = TrainOptions::new(out);
    o.seed = seed;
    o.length = Length::Steps(STEPS);
    o.checkpoint_every = 0;
    o.progress = false;
    o.handle_ctrl_c = false;
    o.plot = false;
    o
}

/// Trains the toy MLP; returns the step log and the final state.
fn train(backend: &dyn Backend, out: &Path, seed: u64) -> (Vec<StepRecord>, StateDict) {
    let artifact = toy::mlp_artifact(&toy::MlpConfig::default()).unwrap();
    let data = Shuffled::new(toy::RegressionSamples::new(256, 4, 1), 16).unwrap();
    let mut trainer = Trainer::new(artifact, backend, data, Defaults, options(out, seed)).unwrap();
    let summary = trainer.run().unwrap();
    assert_eq!(summary.position.step, STEPS);
    assert_eq!(summary.position.epoch, STEPS / 16);
    (read_records(&summary.log).unwrap(), trainer.state())
}

fn losses(records: &[StepRecord]) -> Vec<f64> {
    records.iter().map(|r| r.loss.expect("finite")).collect()
}

/// Mean loss of the first and of the last `k` steps.
fn first_last(losses: &[f64], k: usize) -> (f64, f64) {
    let mean = |s: &[f64]| s.iter().sum::<f64>() / s.len() as f64;
    (mean(&losses[..k]), mean(&losses[losses.len() - k..]))
}

fn check_learns(name: &str, records: &[StepRecord], state: &StateDict) {
    assert_eq!(records.len() as u64, STEPS);
    assert!(records.iter().all(|r| !r.skipped));
    let l = losses(records);
    let (first, last) = first_last(&l, 16);
    eprintln!(
        "{name}: mean loss of the first 16 steps {first:.5}, of the last 16 {last:.6}, ratio {:.1}",
        first / last
    );
    assert!(
        first / last > 20.0,
        "{name}: loss fell only from {first} to {last}"
    );
    // The buffer role: `steps` counts the updates applied.
    assert_eq!(
        state
            .get("steps")
            .unwrap()
            .to_f32()
            .iter()
            .copied()
            .collect::<Vec<_>>(),
        [STEPS as f32]
    );
    // Hyperparameters come from the manifest defaults, and metrics are logged.
    assert_eq!(records[0].hyper["lr"], 0.05);
    assert!(records.iter().all(|r| r.metrics["mae"].is_some()));
    assert_eq!(records[16].epoch, 1);
}

#[test]
fn the_toy_mlp_learns_on_tract() {
    let dir = tempfile::tempdir().unwrap();
    let (records, state) = train(common::tract_backend().as_ref(), dir.path(), 3);
    check_learns("tract", &records, &state);
}

#[test]
fn the_toy_mlp_learns_on_ort() {
    let Some(ort) = common::ort_backend() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let (records, state) = train(ort.as_ref(), dir.path(), 3);
    check_learns("ort", &records, &state);
}

#[test]
fn a_seed_gives_the_same_curve_every_time() {
    let mut backends = vec![common::tract_backend()];
    backends.extend(common::ort_backend());
    for backend in &backends {
        let (a, b, c) = (
            tempfile::tempdir().unwrap(),
            tempfile::tempdir().unwrap(),
            tempfile::tempdir().unwrap(),
        );
        let (ra, sa) = train(backend.as_ref(), a.path(), 11);
        let (rb, sb) = train(backend.as_ref(), b.path(), 11);
        let (rc, _) = train(backend.as_ref(), c.path(), 12);
        let name = backend.name();
        // Bit for bit: compare the f64 bit patterns.
        let bits = |r: &[StepRecord]| losses(r).iter().map(|v| v.to_bits()).collect::<Vec<_>>();
        assert_eq!(
            bits(&ra),
            bits(&rb),
            "{name}: same seed, different loss curve"
        );
        assert_eq!(sa, sb, "{name}: same seed, different final state");
        assert_ne!(
            bits(&ra),
            bits(&rc),
            "{name}: another seed gave the same data order"
        );
    }
}

#[test]
fn ort_and_tract_curves_agree() {
    let Some(ort) = common::ort_backend() else {
        return;
    };
    let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let (rt, st) = train(common::tract_backend().as_ref(), a.path(), 5);
    let (ro, so) = train(ort.as_ref(), b.path(), 5);
    let (lt, lo) = (losses(&rt), losses(&ro));
    let worst = lt
        .iter()
        .zip(&lo)
        .map(|(t, o)| (t - o).abs() / t.abs().max(1e-12))
        .fold(0f64, f64::max);
    eprintln!("largest relative loss difference tract vs ort over {STEPS} steps: {worst:.2e}");
    assert!(
        worst < 1e-3,
        "tract and ort curves differ by {worst:.2e} (relative)"
    );
    let w_t = st.get("fc1.weight").unwrap().to_f32();
    let w_o = so.get("fc1.weight").unwrap().to_f32();
    let rel = common::max_rel_diff(&w_o, &w_t);
    eprintln!("final fc1.weight relative difference: {rel:.2e}");
    assert!(rel < 1e-3, "final weights differ by {rel:.2e}");
}

#[test]
fn the_run_draws_a_loss_curve() {
    let dir = tempfile::tempdir().unwrap();
    let artifact = toy::mlp_artifact(&toy::MlpConfig::default()).unwrap();
    let data = Shuffled::new(toy::RegressionSamples::new(64, 4, 1), 16).unwrap();
    let mut o = options(dir.path(), 0);
    o.plot = true;
    o.length = Length::Epochs(10);
    let summary = Trainer::new(
        artifact,
        common::tract_backend().as_ref(),
        data,
        Defaults,
        o,
    )
    .unwrap()
    .run()
    .unwrap();
    assert_eq!(summary.position.step, 40);
    let plot = summary.plot.expect("a plot");
    let bytes = std::fs::read(&plot).unwrap();
    assert_eq!(&bytes[..8], b"\x89PNG\r\n\x1a\n");
    if let Ok(keep) = std::env::var("DENSA_KEEP_PLOT") {
        std::fs::copy(&plot, keep).unwrap();
    }
}
