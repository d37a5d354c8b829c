//! End-to-end data-parallel training: `mpirun -np 2 --oversubscribe densa ...` on one machine
//! (loopback), against one process with the doubled batch.
//!
//! Run with `cargo test --features mpi --test distributed` (Open MPI installed). Without
//! `mpirun` the MPI tests skip with a note, or fail when `DENSA_REQUIRE_MPI=1` (CI). Without the
//! feature, only the refusal of an MPI launch is tested.

#![cfg_attr(not(feature = "mpi"), allow(dead_code, unused_imports))]

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use common::{assert_clean_failure, densa, stderr};
use densa::exporter::weights::{load_safetensors, StateDict};

/// A 4-class classifier on 16x16 images without batch norm (the setting where N shards of B
/// and one batch of N*B give the same gradient; see `densa_runtime::train::distributed`),
/// AdamW with clipping (an update that is not linear in the gradient), written with its
/// data-parallel graphs.
#[cfg(feature = "mpi")]
fn classifier_artifact(dir: &Path) {
    use densa::exporter::{DType, GraphBuilder};
    use densa::models::nn::Conv2dConfig;
    use densa::models::train_step::{
        cross_entropy, train_step_artifact, ForwardGraph, OptimizerConfig, TrainStepConfig,
    };
    let mut b = GraphBuilder::new("tiny-classifier", 1);
    let x = b
        .input(
            "images",
            DType::F32,
            vec!["N".into(), 3.into(), 16.into(), 16.into()],
        )
        .unwrap();
    let conv = Conv2dConfig::new(3, 8, 3)
        .padding(1)
        .init(&mut b, "conv")
        .unwrap();
    let head = Conv2dConfig::new(8, 4, 1).init(&mut b, "fc").unwrap();
    let h = conv.forward(&mut b, &x).unwrap();
    let h = b.relu(&h);
    let h = head.forward(&mut b, &h).unwrap();
    let h = b.global_avg_pool(&h).unwrap();
    let logits = b.flatten(&h, 1);
    let labels = b.input("labels", DType::I64, vec!["N".into()]).unwrap();
    let loss = cross_entropy(&mut b, &logits, &labels).unwrap();
    let mut config = TrainStepConfig::new(OptimizerConfig::adamw(0.01, 0.01));
    config.clip = Some(densa::exporter::train::clip::ClipConfig {
        max_norm: 1.0,
        ..Default::default()
    });
    config.data_parallel = true;
    train_step_artifact(ForwardGraph::new(b, loss), None, &config)
        .unwrap()
        .save(dir)
        .unwrap();
}

/// `mpirun`, or `None` (with a note) when it is missing; with `DENSA_REQUIRE_MPI=1` a missing
/// `mpirun` fails the test.
fn mpirun() -> Option<PathBuf> {
    let found = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|p| p.join("mpirun"))
            .find(|p| p.is_file())
    });
    if found.is_none() {
        if std::env::var("DENSA_REQUIRE_MPI").is_ok_and(|v| v == "1") {
            panic!("DENSA_REQUIRE_MPI=1 but `mpirun` is not on PATH (apt-get install openmpi-bin)");
        }
        eprintln!("note: skipping: `mpirun` is not on PATH (set DENSA_REQUIRE_MPI=1 to fail)");
    }
    found
}

/// Runs `cmd`, killing it after `limit` (a hung job fails the test instead of hanging CI).
fn output_within(mut cmd: Command, limit: std::time::Duration) -> Output {
    let dir = tempfile::tempdir().unwrap();
    let (out, err) = (dir.path().join("stdout"), dir.path().join("stderr"));
    let mut child = cmd
        .stdout(std::fs::File::create(&out).unwrap())
        .stderr(std::fs::File::create(&err).unwrap())
        .spawn()
        .expect("mpirun runs");
    let start = std::time::Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if start.elapsed() > limit {
            child.kill().unwrap();
            let _ = child.wait();
            panic!(
                "the job did not end within {limit:?}; stderr:\n{}",
                std::fs::read_to_string(&err).unwrap_or_default()
            );
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    };
    Output {
        status,
        stdout: std::fs::read(&out).unwrap(),
        stderr: std::fs::read(&err).unwrap(),
    }
}

const LIMIT: std::time::Duration = std::time::Duration::from_secs(180);

/// `mpirun` with root allowed (CI runs as root).
fn mpirun_command(mpirun: &Path) -> Command {
    let mut cmd = Command::new(mpirun);
    cmd.args(["--oversubscribe", "--bind-to", "none"])
        .env("OMPI_ALLOW_RUN_AS_ROOT", "1")
        .env("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1");
    cmd
}

/// `mpirun -np 2 --oversubscribe densa <args>`.
fn mpirun_densa<S: AsRef<std::ffi::OsStr>>(mpirun: &Path, args: &[S]) -> Output {
    let mut cmd = mpirun_command(mpirun);
    cmd.args(["-np", "2", env!("CARGO_BIN_EXE_densa")])
        .args(args);
    output_within(cmd, LIMIT)
}

fn ok(o: &Output, what: &str) -> String {
    let out = String::from_utf8_lossy(&o.stdout).into_owned();
    assert!(
        o.status.success(),
        "{what} failed ({:?}):\nstdout:\n{out}\nstderr:\n{}",
        o.status,
        stderr(o)
    );
    out
}

fn final_state(out: &Path) -> StateDict {
    let ckpt = densa::runtime::train::checkpoint::latest(out)
        .unwrap()
        .expect("a checkpoint");
    load_safetensors(&ckpt.join("state.safetensors")).unwrap()
}

fn max_diff(a: &StateDict, b: &StateDict) -> f32 {
    let mut worst = 0.0f32;
    assert_eq!(a.len(), b.len());
    for (name, t) in a.iter() {
        let other = b.get(name).unwrap_or_else(|| panic!("`{name}` missing"));
        for (p, q) in t.to_f32().iter().zip(other.to_f32().iter()) {
            worst = worst.max((p - q).abs());
        }
    }
    worst
}

#[cfg(feature = "mpi")]
#[test]
fn two_processes_train_a_classifier_like_one_with_the_doubled_batch_and_resume() {
    let Some(mpirun) = mpirun() else { return };
    let dir = tempfile::tempdir().unwrap();
    let artifact = dir.path().join("artifact");
    classifier_artifact(&artifact);
    let a = artifact.to_str().unwrap();
    let common = |out: &str, batch: &str| -> Vec<String> {
        [
            "train",
            "--artifact",
            a,
            "--synthetic",
            "48",
            "--classes",
            "4",
            "--holdout-every",
            "0",
            "--steps",
            "5",
            "--checkpoint-every",
            "2",
            "--backend",
            "tract",
            "--batch-size",
            batch,
            "--out",
            out,
        ]
        .iter()
        .map(|s| s.to_string())
        .collect()
    };
    let reference = dir.path().join("one");
    let args = common(reference.to_str().unwrap(), "8");
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    ok(
        &densa().args(&args).output().unwrap(),
        "one process, batch 8",
    );

    let dp = dir.path().join("two");
    let args = common(dp.to_str().unwrap(), "4");
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = ok(&mpirun_densa(&mpirun, &args), "mpirun -np 2, batch 4");
    // Rank 0 alone reports and logs.
    assert_eq!(out.matches("step 5 (epoch").count(), 1, "{out}");
    assert!(out.contains("data parallel: 2 ranks"), "{out}");
    let log = std::fs::read_to_string(dp.join("train_log.jsonl")).unwrap();
    assert_eq!(log.lines().count(), 5, "{log}");

    let (one, two) = (final_state(&reference), final_state(&dp));
    let d = max_diff(&one, &two);
    assert!(d < 1e-5, "data parallel vs doubled batch: max |diff| {d}");

    // A job that dies after step 4 resumes from its checkpoint on every rank and ends where
    // the uninterrupted run did.
    let last = densa::runtime::train::checkpoint::latest(&dp)
        .unwrap()
        .unwrap();
    std::fs::remove_dir_all(&last).unwrap();
    let out = ok(&mpirun_densa(&mpirun, &args), "the resumed job");
    assert!(out.contains("step 5 (epoch"), "{out}");
    let resumed = final_state(&dp);
    assert_eq!(max_diff(&two, &resumed), 0.0);
}

#[cfg(feature = "mpi")]
#[test]
fn a_failing_rank_stops_the_job_with_its_message() {
    let Some(mpirun) = mpirun() else { return };
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("run");
    // Rank 1 is given a data folder that does not exist (MPMD launch); rank 0 must not wait
    // for it forever.
    let mut cmd = mpirun_command(&mpirun);
    cmd.args(["-np", "1", env!("CARGO_BIN_EXE_densa")])
        .args([
            "train",
            "--synthetic",
            "32",
            "--classes",
            "4",
            "--image-size",
            "32",
        ])
        .args([
            "--batch-size",
            "4",
            "--steps",
            "3",
            "--backend",
            "tract",
            "--out",
        ])
        .arg(&out)
        .args([":", "-np", "1", env!("CARGO_BIN_EXE_densa")])
        .args([
            "train",
            "--data",
            "/nonexistent/densa-images",
            "--image-size",
            "32",
        ])
        .args([
            "--batch-size",
            "4",
            "--steps",
            "3",
            "--backend",
            "tract",
            "--out",
        ])
        .arg(&out);
    let o = output_within(cmd, LIMIT);
    let err = stderr(&o);
    assert!(!o.status.success(), "the job should fail:\n{err}");
    assert!(err.contains("rank 1 of 2"), "{err}");
    assert!(err.contains("/nonexistent/densa-images"), "{err}");
}

/// PixPro, a dense method, on 2 processes: with `batch_norm=frozen` (running statistics, so
/// no per-shard batch statistics) it trains to one process's parameters at the doubled batch.
#[cfg(feature = "mpi")]
#[test]
fn two_processes_pretrain_pixpro_like_one_with_the_doubled_batch() {
    let Some(mpirun) = mpirun() else { return };
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    ok(
        &densa()
            .args(["synth", "--images", "8", "--size", "48x48", "--out"])
            .arg(&data)
            .output()
            .unwrap(),
        "densa synth",
    );
    let args = |out: &Path, batch: &str| -> Vec<String> {
        [
            "pretrain",
            "--method",
            "pixpro",
            "--arch",
            "resnet-edge",
            "--data",
            data.to_str().unwrap(),
            "--batch",
            batch,
            "--steps",
            "2",
            "--image-size",
            "32",
            "--set",
            "hidden_dim=16",
            "--set",
            "dim=8",
            "--set",
            "batch_norm=frozen",
            "--backend",
            "tract",
            "--out",
            out.to_str().unwrap(),
        ]
        .iter()
        .map(|s| s.to_string())
        .collect()
    };
    let two = dir.path().join("two");
    let stdout = ok(
        &mpirun_densa(&mpirun, &args(&two, "2")),
        "mpirun -np 2 densa pretrain pixpro",
    );
    assert!(stdout.contains("data parallel: 2 ranks"), "{stdout}");
    assert!(two.join("backbone.safetensors").is_file());
    let log = std::fs::read_to_string(two.join("train_log.jsonl")).unwrap();
    assert_eq!(log.lines().count(), 2, "{log}");
    let one = dir.path().join("one");
    ok(
        &densa().args(args(&one, "4")).output().unwrap(),
        "densa pretrain pixpro --batch 4",
    );
    let (a, b) = (final_state(&one), final_state(&two));
    let moved = max_diff(
        &a,
        &load_safetensors(&one.join("artifact/state.safetensors")).unwrap(),
    );
    let d = max_diff(&a, &b);
    assert!(moved > 1e-3, "two steps changed nothing ({moved})");
    assert!(
        d < 1e-5,
        "data parallel vs doubled batch: max |diff| {d} (moved {moved})"
    );
}

/// A command that does not train data parallel is refused under a multi-process launch
/// instead of writing its outputs N times over (the check comes before MPI starts).
#[test]
fn a_multi_process_launch_of_a_single_process_command_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("scenes");
    let o = densa()
        .args(["synth", "--images", "2", "--out"])
        .arg(&out)
        .env("OMPI_COMM_WORLD_SIZE", "2")
        .output()
        .unwrap();
    let err = common::assert_clean_failure(&o);
    assert!(
        err.contains("launched as 2 processes") && err.contains("without mpirun"),
        "{err}"
    );
    assert!(!out.exists(), "nothing is written");
}

/// Without the feature, an `mpirun` launch is refused with the way out, not run N times.
#[cfg(not(feature = "mpi"))]
#[test]
fn an_mpi_launch_of_a_build_without_the_feature_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let o = densa()
        .args([
            "train",
            "--synthetic",
            "16",
            "--classes",
            "4",
            "--steps",
            "1",
            "--out",
        ])
        .arg(dir.path())
        .env("OMPI_COMM_WORLD_SIZE", "2")
        .output()
        .unwrap();
    let err = common::assert_clean_failure(&o);
    assert!(err.contains("--features mpi"), "{err}");
}

#[cfg(feature = "mpi")]
#[test]
fn two_processes_finetune_and_pretrain_with_queues_centres_sinkhorn_and_counts() {
    let Some(mpirun) = mpirun() else { return };
    let dir = tempfile::tempdir().unwrap();
    let p = |rel: &str| dir.path().join(rel).display().to_string();
    for (name, n, seed) in [("train", "16", "0"), ("val", "4", "1")] {
        ok(
            &densa()
                .args(["synth", "--out", &p(name), "--images", n, "--seed", seed])
                .args(["--size", "64x64", "--max-objects", "2"])
                .output()
                .unwrap(),
            "densa synth",
        );
    }
    // One epoch of batch 2 per rank on the 16 training scenes, validated on the 4 others.
    let finetune = |flags: &[&str], out: &str| {
        let mut args: Vec<String> = ["finetune"]
            .iter()
            .chain(flags)
            .map(|s| s.to_string())
            .collect();
        for (flag, value) in [
            ("--data", p("train/annotations.json")),
            ("--val-data", p("val/annotations.json")),
            ("--image-size", "64".into()),
            ("--epochs", "1".into()),
            ("--batch-size", "2".into()),
            ("--backend", "tract".into()),
            ("--out", p(out)),
        ] {
            args.extend([flag.to_string(), value]);
        }
        args
    };
    let args = finetune(&["--task", "detect"], "run");
    let out = ok(
        &mpirun_densa(&mpirun, &args),
        "mpirun -np 2 densa finetune --task detect",
    );
    assert_eq!(out.matches("best: epoch 1").count(), 1, "{out}");
    let log = std::fs::read_to_string(dir.path().join("run/train_log.jsonl")).unwrap();
    assert_eq!(log.lines().count(), 4, "16 images / (2 ranks x 2):\n{log}");

    let args = finetune(&["--task", "segment"], "seg");
    let out = ok(
        &mpirun_densa(&mpirun, &args),
        "mpirun -np 2 densa finetune --task segment",
    );
    assert_eq!(out.matches("best validation mIoU").count(), 1, "{out}");
    let log = std::fs::read_to_string(dir.path().join("seg/train_log.jsonl")).unwrap();
    assert_eq!(log.lines().count(), 4, "{log}");

    // The DETR: every rank matches its own images.
    let args = finetune(&["--task", "detect", "--detector", "detr"], "detr");
    let out = ok(
        &mpirun_densa(&mpirun, &args),
        "mpirun -np 2 densa finetune --detector detr",
    );
    assert!(
        out.contains("data parallel: 2 ranks, 4 steps"),
        "16 images / (2 x 2): {out}"
    );
    assert_eq!(out.matches("best: epoch 1").count(), 1, "{out}");
    let val = std::fs::read_to_string(dir.path().join("detr/val.jsonl")).unwrap();
    assert_eq!(val.lines().count(), 1, "{val}");
    // Its global batch depends on the process count: one process refuses to resume it.
    let mut more = args.clone();
    let epochs = more.iter().position(|a| a == "--epochs").unwrap();
    more[epochs + 1] = "2".into();
    let err = refused_on_one_process(&more);
    assert!(
        err.contains("trained on 2 process(es), this launch has 1"),
        "{err}"
    );

    // DenseCL's queues gather every rank's keys (`queues_gather_every_ranks_keys` checks the
    // arithmetic): it trains on 2 processes.
    let args = [
        "pretrain",
        "--method",
        "densecl",
        "--data",
        &p("train"),
        "--batch",
        "2",
        "--steps",
        "2",
        "--image-size",
        "32",
        "--set",
        "queue_size=16",
        "--set",
        "hidden_dim=16",
        "--set",
        "dim=8",
        "--backend",
        "tract",
        "--out",
        &p("densecl"),
    ];
    let out = ok(
        &mpirun_densa(&mpirun, &args),
        "mpirun -np 2 densa pretrain densecl",
    );
    assert!(out.contains("data parallel: 2 ranks"), "{out}");
    // SCFS's DINO centres are averaged across ranks (`centres_are_averaged_across_ranks`
    // checks the arithmetic): it trains on 2 processes.
    let train = p("train");
    let scfs_out = p("scfs");
    let out = ok(
        &mpirun_densa(&mpirun, &tiny_pretrain("scfs", &train, &scfs_out, 2)),
        "mpirun -np 2 densa pretrain scfs",
    );
    assert!(out.contains("data parallel: 2 ranks"), "{out}");
    assert_eq!(log_lines(&scfs_out), 2);
    // SwAV's Sinkhorn sums are all-reduced between the halves of the gradient graph
    // (`swav_sinkhorn_sums_cross_ranks` checks the arithmetic): it trains on 2 processes and
    // resumes from its saved artifact (which holds the forward half).
    let swav_out = p("swav");
    let out = ok(
        &mpirun_densa(&mpirun, &tiny_pretrain("swav", &train, &swav_out, 1)),
        "mpirun -np 2 densa pretrain swav",
    );
    assert!(out.contains("data parallel: 2 ranks"), "{out}");
    assert!(Path::new(&swav_out)
        .join("artifact/grad_forward.onnx")
        .is_file());
    let out = ok(
        &mpirun_densa(&mpirun, &tiny_pretrain("swav", &train, &swav_out, 2)),
        "mpirun -np 2 densa pretrain swav (resumed)",
    );
    assert!(out.contains("step 2"), "{out}");
    assert_eq!(log_lines(&swav_out), 2);
    // `--batch` is per process: one process refuses to resume a 2-process run, and writes
    // nothing.
    let err = refused_on_one_process(&tiny_pretrain("swav", &train, &swav_out, 3));
    assert!(
        err.contains("trained on 2 process(es), this launch has 1") && err.contains("mpirun -np 2"),
        "{err}"
    );
    assert_eq!(log_lines(&swav_out), 2);
    // LC-loss's mean over valid locations, CCOP's means over valid boxes and DenseSiam's means
    // over overlapping view pairs count every rank's entries
    // (`masked_means_count_every_ranks_samples` checks the arithmetic).
    // RegionCL's partners are each rank's own batch reversed, as its official code does on
    // each GPU.
    for method in ["lcloss", "ccop", "regioncl", "densesiam"] {
        let out_dir = p(method);
        let out = ok(
            &mpirun_densa(&mpirun, &tiny_pretrain(method, &train, &out_dir, 2)),
            &format!("mpirun -np 2 densa pretrain {method}"),
        );
        assert!(out.contains("data parallel: 2 ranks"), "{out}");
        assert_eq!(log_lines(&out_dir), 2);
    }
    // The detector methods match each rank's images on its own host and sum the box count
    // over the ranks (`two_ranks_train_like_one_process_with_the_doubled_batch` in
    // `densa_models::detr::train` checks the arithmetic): UP-DETR trains on 2 processes, rank
    // 0 alone writes, and a second launch resumes.
    let updetr = p("updetr");
    let out = ok(
        &mpirun_densa(&mpirun, &tiny_pretrain("updetr", &train, &updetr, 2)),
        "mpirun -np 2 densa pretrain updetr",
    );
    assert!(out.contains("data parallel: 2 ranks"), "{out}");
    assert_eq!(log_lines(&updetr), 2);
    let out = ok(
        &mpirun_densa(&mpirun, &tiny_pretrain("updetr", &train, &updetr, 3)),
        "mpirun -np 2 densa pretrain updetr (resumed)",
    );
    assert!(out.contains("step 3"), "{out}");
    assert_eq!(log_lines(&updetr), 3);
    let err = refused_on_one_process(&tiny_pretrain("updetr", &train, &updetr, 4));
    assert!(err.contains("trained on 2 process(es)"), "{err}");
    assert_eq!(log_lines(&updetr), 3);
    // DetReg: rank 0 computes the per-image proposals and embeddings (with the SwAV encoder
    // trained above) before the other rank reads them.
    let detreg = p("detreg");
    let mut args = tiny_pretrain("detreg", &train, &detreg, 2);
    args.extend(["--set".to_string(), format!("encoder={swav_out}")]);
    let out = ok(
        &mpirun_densa(&mpirun, &args),
        "mpirun -np 2 densa pretrain detreg",
    );
    assert!(out.contains("data parallel: 2 ranks"), "{out}");
    assert_eq!(log_lines(&detreg), 2);
}

/// `densa pretrain` arguments for `steps` steps of `method` at its tiny smoke settings
/// (batch 2, 32 px, tract).
fn tiny_pretrain(method: &str, data: &str, out: &str, steps: u64) -> Vec<String> {
    let mut args: Vec<String> = [
        "pretrain",
        "--method",
        method,
        "--data",
        data,
        "--batch",
        "2",
        "--steps",
        &steps.to_string(),
        "--image-size",
        "32",
        "--backend",
        "tract",
        "--out",
        out,
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    for (k, v) in densa::models::pretext::method_info(method).unwrap().tiny {
        args.extend(["--set".to_string(), format!("{k}={v}")]);
    }
    args
}

/// Runs `densa args` as one process, which must fail cleanly; returns its error output.
fn refused_on_one_process(args: &[String]) -> String {
    assert_clean_failure(&densa().args(args).output().unwrap())
}

fn log_lines(out: &str) -> usize {
    std::fs::read_to_string(Path::new(out).join("train_log.jsonl"))
        .unwrap()
        .lines()
        .count()
}
