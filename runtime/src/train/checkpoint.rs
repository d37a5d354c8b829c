//! Checkpoints: every state tensor (safetensors) and where the run stands (JSON).
//!
//! ```text
//! OUT/checkpoints/step-00000120/state.safetensors   every state input, by name
//! OUT/checkpoints/step-00000120/checkpoint.json     CheckpointManifest
//! ```
//!
//! A checkpoint is written into a temporary directory (each file fsynced), which is then
//! renamed to `step-NNNNNNNN` and the parent directory fsynced: a process killed at any point
//! leaves either a complete checkpoint or none (stale temporaries are removed by the next
//! write). Only the newest `keep` checkpoints are kept.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};

use densa_exporter::weights::{load_safetensors, save_safetensors, StateDict, WeightsError};
use serde::{Deserialize, Serialize};

use super::trainer::{Position, TrainOptions};

/// Schema version of `checkpoint.json`.
pub const CHECKPOINT_SCHEMA_VERSION: u32 = 1;
/// The `kind` field of `checkpoint.json`.
pub const CHECKPOINT_KIND: &str = "densa.train.checkpoint";
/// Directory of checkpoints inside the output directory.
pub const CHECKPOINTS_DIR: &str = "checkpoints";
/// File name of the checkpoint manifest.
pub const CHECKPOINT_FILE: &str = "checkpoint.json";
/// File name of the state tensors.
pub const CHECKPOINT_STATE: &str = "state.safetensors";

/// Why a checkpoint was written.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CheckpointReason {
    /// Every `checkpoint_every` steps.
    Periodic,
    /// Ctrl-C or a stop request.
    Interrupt,
    /// The end of the run.
    Final,
}

/// The order of the data: the epoch's permutation is ChaCha8 seeded with `seed` on stream
/// `stream` (= the epoch); `position` batches of it are consumed.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct DataOrder {
    /// `chacha8`.
    pub generator: String,
    /// The run's seed.
    pub seed: u64,
    /// The generator's stream: the epoch.
    pub stream: u64,
    /// Batches of the epoch already consumed.
    pub position: u64,
    /// Batches per epoch of the data source (a resumed run must see the same number).
    pub batches_per_epoch: u64,
    /// The data source's description.
    pub source: String,
}

/// Where the schedule stands.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ScheduleState {
    /// The step the schedule is asked for next.
    pub step: u64,
    /// The schedule's description.
    pub describe: String,
    /// Hyperparameter values of the last step run (empty before the first).
    pub last_values: BTreeMap<String, f64>,
}

/// Which artifact the state belongs to.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ArtifactRef {
    /// [`Artifact::fingerprint`](super::Artifact::fingerprint).
    pub fingerprint: String,
    /// Where the artifact was loaded from (informative).
    pub label: String,
    /// The manifest's `task`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub task: Option<String>,
}

/// The contents of `checkpoint.json`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct CheckpointManifest {
    /// [`CHECKPOINT_SCHEMA_VERSION`].
    pub schema_version: u32,
    /// [`CHECKPOINT_KIND`].
    pub kind: String,
    /// Steps completed.
    pub step: u64,
    /// Epoch of the next batch.
    pub epoch: u64,
    /// Batches of that epoch already consumed.
    pub index_in_epoch: u64,
    /// Data order (RNG) state.
    pub data_order: DataOrder,
    /// Schedule position.
    pub schedule: ScheduleState,
    /// Non-finite steps in a row just before this point.
    pub nonfinite_in_row: u32,
    /// Training time so far, seconds (informative).
    pub elapsed_s: f64,
    /// Why it was written.
    pub reason: CheckpointReason,
    /// The artifact.
    pub artifact: ArtifactRef,
    /// The run's options.
    pub config: TrainOptions,
    /// The state file, relative to the checkpoint directory.
    pub state: String,
}

impl CheckpointManifest {
    /// The position it records.
    pub fn position(&self) -> Position {
        Position {
            step: self.step,
            epoch: self.epoch,
            index_in_epoch: self.index_in_epoch,
        }
    }
}

/// Why a checkpoint could not be written or read.
#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: not a valid checkpoint manifest: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("{path}: checkpoint schema_version {version} (kind `{kind}`) is not supported; this densa reads `{CHECKPOINT_KIND}` version {CHECKPOINT_SCHEMA_VERSION}")]
    Schema {
        path: PathBuf,
        version: u32,
        kind: String,
    },
    #[error("{dir}: no checkpoint found (looked for {CHECKPOINT_FILE} there and in {CHECKPOINTS_DIR}/step-*)")]
    NotFound { dir: PathBuf },
    #[error(transparent)]
    Weights(#[from] WeightsError),
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> CheckpointError + '_ {
    move |source| CheckpointError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// The directory name of the checkpoint at `step`.
pub fn step_dir_name(step: u64) -> String {
    format!("step-{step:08}")
}

/// Writes a checkpoint under `out_dir/checkpoints/` and keeps the newest `keep` (at least 1).
/// A checkpoint of the same step already there is kept as it is (the state of a step is
/// always the same). Returns the checkpoint's directory.
pub fn write(
    out_dir: &Path,
    manifest: &CheckpointManifest,
    state: &StateDict,
    keep: usize,
) -> Result<PathBuf, CheckpointError> {
    let root = out_dir.join(CHECKPOINTS_DIR);
    fs::create_dir_all(&root).map_err(io(&root))?;
    let name = step_dir_name(manifest.step);
    let dir = root.join(&name);
    if !dir.join(CHECKPOINT_FILE).is_file() {
        let tmp = root.join(format!(".{name}.tmp{}", std::process::id()));
        if tmp.exists() {
            fs::remove_dir_all(&tmp).map_err(io(&tmp))?;
        }
        fs::create_dir(&tmp).map_err(io(&tmp))?;
        save_safetensors(state, &tmp.join(&manifest.state))?;
        let json = serde_json::to_string_pretty(manifest).expect("a checkpoint serialises");
        let json_path = tmp.join(CHECKPOINT_FILE);
        densa_exporter::io::write_atomic(&json_path, json.as_bytes()).map_err(io(&json_path))?;
        if dir.exists() {
            // An incomplete directory of that name (no manifest) cannot be a checkpoint.
            fs::remove_dir_all(&dir).map_err(io(&dir))?;
        }
        fs::rename(&tmp, &dir).map_err(io(&dir))?;
        if let Ok(d) = fs::File::open(&root) {
            let _ = d.sync_all();
        }
    }
    prune(&root, keep.max(1))?;
    Ok(dir)
}

/// Removes all but the newest `keep` checkpoints, and stale temporaries of other processes.
fn prune(root: &Path, keep: usize) -> Result<(), CheckpointError> {
    let own_tmp = format!(".tmp{}", std::process::id());
    for entry in fs::read_dir(root).map_err(io(root))? {
        let entry = entry.map_err(io(root))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.starts_with(".step-") && !name.ends_with(&own_tmp) {
            let path = entry.path();
            fs::remove_dir_all(&path).map_err(io(&path))?;
        }
    }
    let all = list(root.parent().unwrap_or(Path::new(".")))?;
    for (_, path) in all.iter().take(all.len().saturating_sub(keep)) {
        fs::remove_dir_all(path).map_err(io(path))?;
    }
    Ok(())
}

/// The complete checkpoints under `out_dir/checkpoints/`, oldest first.
pub fn list(out_dir: &Path) -> Result<Vec<(u64, PathBuf)>, CheckpointError> {
    let root = out_dir.join(CHECKPOINTS_DIR);
    if !root.is_dir() {
        return Ok(Vec::new());
    }
    let mut found = Vec::new();
    for entry in fs::read_dir(&root).map_err(io(&root))? {
        let entry = entry.map_err(io(&root))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(step) = name
            .strip_prefix("step-")
            .and_then(|s| s.parse::<u64>().ok())
        else {
            continue;
        };
        if entry.path().join(CHECKPOINT_FILE).is_file() {
            found.push((step, entry.path()));
        }
    }
    found.sort();
    Ok(found)
}

/// The newest checkpoint under `out_dir`, if any.
pub fn latest(out_dir: &Path) -> Result<Option<PathBuf>, CheckpointError> {
    Ok(list(out_dir)?.pop().map(|(_, p)| p))
}

/// The checkpoint directory `path` names: itself when it holds `checkpoint.json`, otherwise
/// the newest checkpoint of the output directory `path`.
pub fn locate(path: &Path) -> Result<PathBuf, CheckpointError> {
    if path.join(CHECKPOINT_FILE).is_file() {
        return Ok(path.to_path_buf());
    }
    latest(path)?.ok_or_else(|| CheckpointError::NotFound {
        dir: path.to_path_buf(),
    })
}

/// Reads the checkpoint in `dir`: its manifest and its state.
pub fn read(dir: &Path) -> Result<(CheckpointManifest, StateDict), CheckpointError> {
    let path = dir.join(CHECKPOINT_FILE);
    let text = fs::read_to_string(&path).map_err(io(&path))?;
    let value: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| CheckpointError::Parse {
            path: path.clone(),
            message: e.to_string(),
        })?;
    let version = value
        .get("schema_version")
        .and_then(|v| v.as_u64())
        .unwrap_or(0);
    let kind = value
        .get("kind")
        .and_then(|v| v.as_str())
        .unwrap_or_default()
        .to_string();
    if version != u64::from(CHECKPOINT_SCHEMA_VERSION) || kind != CHECKPOINT_KIND {
        return Err(CheckpointError::Schema {
            path,
            version: version as u32,
            kind,
        });
    }
    let manifest: CheckpointManifest =
        serde_json::from_value(value).map_err(|e| CheckpointError::Parse {
            path: path.clone(),
            message: e.to_string(),
        })?;
    let state_path = dir.join(&manifest.state);
    if Path::new(&manifest.state).is_absolute() || manifest.state.contains("..") {
        return Err(CheckpointError::Parse {
            path,
            message: format!(
                "`state` must be a file inside the checkpoint, not {:?}",
                manifest.state
            ),
        });
    }
    let state = load_safetensors(&state_path)?;
    Ok((manifest, state))
}
