//! `densa train` killed with SIGKILL in the middle of a run, then started again with the same
//! command, resumes from its newest checkpoint and ends in exactly the state of an
//! uninterrupted run.

use crate::common;

use std::path::Path;
use std::time::{Duration, Instant};

use densa::runtime::train::checkpoint;

fn args(out: &Path) -> Vec<String> {
    [
        "train",
        "--synthetic",
        "64",
        "--classes",
        "4",
        "--arch",
        "resnet-edge",
        "--image-size",
        "32",
        "--batch-size",
        "8",
        "--steps",
        "24",
        "--checkpoint-every",
        "3",
        "--holdout-every",
        "0",
        "--backend",
        "tract",
        "--lr",
        "0.05",
        "--out",
    ]
    .iter()
    .map(|s| s.to_string())
    .chain(std::iter::once(out.display().to_string()))
    .collect()
}

fn final_state(out: &Path) -> (u64, densa::exporter::weights::StateDict) {
    let dir = checkpoint::latest(out)
        .unwrap()
        .expect("a final checkpoint");
    let (manifest, state) = checkpoint::read(&dir).unwrap();
    (manifest.step, state)
}

#[test]
fn kill_9_then_resume_equals_an_uninterrupted_run() {
    let full = tempfile::tempdir().unwrap();
    let o = common::densa().args(args(full.path())).output().unwrap();
    assert!(o.status.success(), "{}", common::stderr(&o));

    let cut = tempfile::tempdir().unwrap();
    let mut child = common::densa()
        .args(args(cut.path()))
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    // Wait for a checkpoint past the first, then kill without warning.
    let start = Instant::now();
    loop {
        let step = checkpoint::latest(cut.path())
            .ok()
            .flatten()
            .and_then(|d| checkpoint::read(&d).ok())
            .map(|(m, _)| m.step);
        if step.is_some_and(|s| s >= 6) {
            break;
        }
        if let Ok(Some(status)) = child.try_wait() {
            panic!("densa train ended ({status}) before it could be killed");
        }
        assert!(
            start.elapsed() < Duration::from_secs(120),
            "no checkpoint in 120 s"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    child.kill().unwrap(); // SIGKILL on Unix
    child.wait().unwrap();
    let (killed_at, _) = final_state(cut.path());
    assert!(killed_at < 24, "the run finished before the kill");

    let o = common::densa().args(args(cut.path())).output().unwrap();
    let err = common::stderr(&o);
    assert!(o.status.success(), "{err}");
    assert!(err.contains("resuming"), "{err}");

    let (s1, a) = final_state(full.path());
    let (s2, b) = final_state(cut.path());
    assert_eq!((s1, s2), (24, 24));
    assert_eq!(a.len(), b.len());
    for (name, t) in a.iter() {
        assert_eq!(
            Some(t),
            b.get(name),
            "`{name}` differs after kill -9 and resume"
        );
    }
}
