//! `--device` and device-resident training state.
//!
//! - A training session that keeps its state inside ONNX Runtime (IoBinding; what a GPU run
//!   does) trains to the same state as the host round trip, through a checkpoint and a resume.
//!   Here it runs on the CPU, which has the same code path as the GPU but for the memory the
//!   state is bound to.
//! - `--device cuda` where the ONNX Runtime library has no CUDA provider (CI's CPU build) says
//!   so and runs on the CPU; an unknown device is refused by name. Under a launcher that sets
//!   the local rank (`mpirun`), plain `cuda` is the process's own GPU.

use crate::common;

use densa::runtime::backend::ort::OrtBackend;
use densa::runtime::train::classify::SyntheticSquares;
use densa::runtime::train::{Artifact, Defaults, Length, Shuffled, TrainOptions, Trainer};
use densa::runtime::{BackendOptions, Device};

fn ort(resident: bool) -> Option<OrtBackend> {
    common::ort_backend()?;
    let options = BackendOptions {
        threads: Some(2),
        allow_download: false,
        resident_state: Some(resident),
        ..BackendOptions::default()
    };
    Some(OrtBackend::new(&options).expect("ONNX Runtime was found above"))
}

fn artifact(dir: &std::path::Path) -> Artifact {
    let o = common::densa()
        .args([
            "export",
            "train",
            "--arch",
            "resnet-edge",
            "--task",
            "classify",
            "--classes",
            "4",
            "--image-size",
            "32",
            "--lr",
            "0.05",
            "--out",
        ])
        .arg(dir)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", common::stderr(&o));
    Artifact::load(dir).unwrap()
}

fn options(out: &std::path::Path, steps: u64) -> TrainOptions {
    let mut o = TrainOptions::new(out);
    o.length = Length::Steps(steps);
    o.checkpoint_every = 3;
    o.progress = false;
    o.plot = false;
    o.handle_ctrl_c = false;
    o
}

fn data() -> Shuffled<SyntheticSquares> {
    Shuffled::new(SyntheticSquares::new(32, 4, 32, 7).unwrap(), 8).unwrap()
}

#[test]
fn resident_state_trains_to_the_same_state_as_the_host_round_trip() {
    let (Some(host), Some(resident)) = (ort(false), ort(true)) else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let artifact = artifact(&tmp.path().join("artifact"));

    let mut a = Trainer::new(
        artifact.clone(),
        &host,
        data(),
        Defaults,
        options(&tmp.path().join("host"), 7),
    )
    .unwrap();
    a.run().unwrap();

    // 4 steps, stop (a checkpoint at 3 and a final one at 4), then resume to 7.
    let out = tmp.path().join("resident");
    let mut b = Trainer::new(
        artifact.clone(),
        &resident,
        data(),
        Defaults,
        options(&out, 4),
    )
    .unwrap();
    b.run().unwrap();
    let mut c = Trainer::resume(
        &out,
        artifact,
        &resident,
        data(),
        Defaults,
        options(&out, 7),
    )
    .unwrap();
    c.run().unwrap();

    let (sa, sc) = (a.state(), c.state());
    assert_eq!(sa.len(), sc.len());
    let mut changed = 0;
    for (name, ta) in sa.iter() {
        let tc = sc.get(name).unwrap();
        assert_eq!(
            ta, tc,
            "`{name}` differs between the host and resident runs"
        );
        if c.artifact().state().get(name) != Some(ta) {
            changed += 1;
        }
    }
    assert!(
        changed > sa.len() / 2,
        "training changed only {changed} tensors"
    );
}

#[test]
fn a_gpu_request_without_a_cuda_provider_runs_on_the_cpu_and_says_why() {
    let Some(_) = common::ort_backend() else {
        return;
    };
    let options = BackendOptions {
        allow_download: false,
        device: Device::Cuda(0),
        ..BackendOptions::default()
    };
    let has_cuda = OrtBackend::new(&options).unwrap().device().is_gpu();
    let tmp = tempfile::tempdir().unwrap();
    let o = common::densa()
        .args([
            "train",
            "--synthetic",
            "16",
            "--classes",
            "2",
            "--arch",
            "resnet-edge",
            "--image-size",
            "32",
            "--batch-size",
            "8",
            "--steps",
            "2",
            "--holdout-every",
            "0",
            "--backend",
            "ort",
            "--device",
            "cuda",
            "--no-download",
            "--out",
        ])
        .arg(tmp.path())
        // The second process of an `mpirun` launch on this machine: plain `cuda` is its GPU 1.
        .env("OMPI_COMM_WORLD_LOCAL_RANK", "1")
        .env_remove("CUDA_VISIBLE_DEVICES")
        .output()
        .unwrap();
    let err = common::stderr(&o);
    assert!(o.status.success(), "{err}");
    if !has_cuda {
        assert!(
            err.contains("--device cuda:1: ")
                && err.contains("no CUDA execution provider")
                && err.contains("running on the CPU"),
            "{err}"
        );
    }

    let o = common::densa()
        .args(["train", "--synthetic", "16", "--device", "tpu", "--out"])
        .arg(tmp.path().join("x"))
        .output()
        .unwrap();
    assert!(!o.status.success());
    assert!(
        common::stderr(&o).contains("unknown device `tpu`"),
        "{}",
        common::stderr(&o)
    );
}

#[test]
fn device_names_parse() {
    assert_eq!("cpu".parse::<Device>(), Ok(Device::Cpu));
    assert_eq!("cuda".parse::<Device>(), Ok(Device::Cuda(0)));
    assert_eq!("cuda:3".parse::<Device>(), Ok(Device::Cuda(3)));
    assert!("cuda:-1".parse::<Device>().is_err());
    assert!("cuda:x".parse::<Device>().is_err());
    assert_eq!(Device::Cuda(1).to_string(), "cuda:1");
}
