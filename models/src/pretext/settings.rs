//! Hyperparameters of a method: declared with reference defaults, overridden by the user with
//! `key=value` strings (`--set temperature=0.1`) or a TOML table, checked by type and name.

use std::collections::BTreeMap;
use std::fmt;

use serde::Serialize;

use super::PretextError;
use crate::train_step::OptimizerConfig;

/// A hyperparameter's value.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(untagged)]
pub enum HyperValue {
    Bool(bool),
    Int(i64),
    Float(f64),
    Text(String),
}

impl fmt::Display for HyperValue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            HyperValue::Bool(v) => write!(f, "{v}"),
            HyperValue::Int(v) => write!(f, "{v}"),
            HyperValue::Float(v) => write!(f, "{v}"),
            HyperValue::Text(v) => write!(f, "{v}"),
        }
    }
}

impl HyperValue {
    /// Parses `text` as a value of the same type as `self`.
    fn parse_like(&self, text: &str) -> Result<HyperValue, String> {
        let t = text.trim();
        Ok(match self {
            HyperValue::Bool(_) => HyperValue::Bool(match t {
                "true" | "1" | "yes" | "on" => true,
                "false" | "0" | "no" | "off" => false,
                _ => return Err("expected true or false".into()),
            }),
            HyperValue::Int(_) => {
                HyperValue::Int(t.parse().map_err(|_| "expected an integer".to_string())?)
            }
            HyperValue::Float(_) => {
                let v: f64 = t.parse().map_err(|_| "expected a number".to_string())?;
                if !v.is_finite() {
                    return Err("expected a finite number".into());
                }
                HyperValue::Float(v)
            }
            HyperValue::Text(_) => HyperValue::Text(t.to_string()),
        })
    }
}

/// One hyperparameter: its key, reference default and meaning.
#[derive(Clone, Debug, Serialize)]
pub struct Hyper {
    pub key: &'static str,
    pub default: HyperValue,
    pub help: &'static str,
}

impl Hyper {
    pub fn float(key: &'static str, default: f64, help: &'static str) -> Hyper {
        Hyper {
            key,
            default: HyperValue::Float(default),
            help,
        }
    }
    pub fn int(key: &'static str, default: i64, help: &'static str) -> Hyper {
        Hyper {
            key,
            default: HyperValue::Int(default),
            help,
        }
    }
    pub fn bool(key: &'static str, default: bool, help: &'static str) -> Hyper {
        Hyper {
            key,
            default: HyperValue::Bool(default),
            help,
        }
    }
    pub fn text(key: &'static str, default: &str, help: &'static str) -> Hyper {
        Hyper {
            key,
            default: HyperValue::Text(default.to_string()),
            help,
        }
    }
}

/// The optimizer settings every method has, with the paper's values.
pub fn common(optimizer: &str, lr: f64, reference_batch: i64, weight_decay: f64) -> Vec<Hyper> {
    vec![
        Hyper::text("optimizer", optimizer, "sgd, lars or adamw"),
        Hyper::float(
            "lr",
            lr,
            "learning rate at reference_batch (scaled linearly to the batch used, cosine decay)",
        ),
        Hyper::int(
            "reference_batch",
            reference_batch,
            "batch size the paper's lr is given for",
        ),
        Hyper::float("weight_decay", weight_decay, "weight decay"),
        Hyper::float("sgd_momentum", 0.9, "momentum of SGD and LARS"),
        Hyper::int("warmup_steps", 0, "linear learning-rate warm-up steps"),
    ]
}

/// The backbone methods' `batch_norm` setting: how the networks' batch norms normalise while
/// pretraining ([`Settings::norm_mode`]).
pub fn batch_norm() -> Hyper {
    Hyper::text(
        "batch_norm",
        "batch",
        "batch: batch statistics, as the papers; frozen: the running statistics \
         (FrozenBatchNorm2d), for per-process batches too small for statistics; a data-parallel \
         run is then exactly the N-times batch",
    )
}

/// Resolved hyperparameters of one method: every declared key with its default or override.
#[derive(Clone, Debug, PartialEq)]
pub struct Settings {
    method: String,
    values: BTreeMap<String, HyperValue>,
}

impl Settings {
    /// The defaults of `specs`, then `overrides` (`key`, text) in order. Unknown keys and values
    /// of the wrong type are errors naming them.
    pub fn resolve(
        method: &str,
        specs: &[Hyper],
        overrides: &[(String, String)],
    ) -> Result<Settings, PretextError> {
        let mut values: BTreeMap<String, HyperValue> = specs
            .iter()
            .map(|h| (h.key.to_string(), h.default.clone()))
            .collect();
        for (key, text) in overrides {
            let current = values
                .get(key)
                .ok_or_else(|| PretextError::UnknownSetting {
                    method: method.to_string(),
                    key: key.clone(),
                    available: specs.iter().map(|h| h.key).collect::<Vec<_>>().join(", "),
                })?;
            let v = current
                .parse_like(text)
                .map_err(|problem| PretextError::BadSetting {
                    method: method.to_string(),
                    key: key.clone(),
                    value: text.clone(),
                    problem,
                })?;
            values.insert(key.clone(), v);
        }
        Ok(Settings {
            method: method.to_string(),
            values,
        })
    }

    /// Parses `key=value` strings.
    pub fn parse_assignments(items: &[String]) -> Result<Vec<(String, String)>, String> {
        items
            .iter()
            .map(|s| {
                s.split_once('=')
                    .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
                    .filter(|(k, _)| !k.is_empty())
                    .ok_or_else(|| format!("`{s}` is not key=value"))
            })
            .collect()
    }

    /// The flat table of a TOML document as `key=value` overrides (numbers, booleans and
    /// strings; nested tables are refused).
    pub fn parse_toml(text: &str) -> Result<Vec<(String, String)>, String> {
        let table: toml::Table = text.parse().map_err(|e: toml::de::Error| e.to_string())?;
        table
            .into_iter()
            .map(|(k, v)| {
                let s = match v {
                    toml::Value::String(s) => s,
                    toml::Value::Integer(i) => i.to_string(),
                    toml::Value::Float(f) => f.to_string(),
                    toml::Value::Boolean(b) => b.to_string(),
                    other => {
                        return Err(format!(
                            "`{k}`: expected a number, boolean or string, got {}",
                            other.type_str()
                        ))
                    }
                };
                Ok((k, s))
            })
            .collect()
    }

    /// The method these settings belong to.
    pub fn method(&self) -> &str {
        &self.method
    }

    /// Every key and value.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &HyperValue)> {
        self.values.iter().map(|(k, v)| (k.as_str(), v))
    }

    fn get(&self, key: &str) -> &HyperValue {
        self.values
            .get(key)
            .unwrap_or_else(|| panic!("{}: setting `{key}` is not declared", self.method))
    }

    /// A float setting (integers convert). Panics on an undeclared key: a bug in the method.
    pub fn f64(&self, key: &str) -> f64 {
        match self.get(key) {
            HyperValue::Float(v) => *v,
            HyperValue::Int(v) => *v as f64,
            other => panic!("{}: `{key}` = {other} is not a number", self.method),
        }
    }

    /// An integer setting. Panics on an undeclared key: a bug in the method.
    pub fn i64(&self, key: &str) -> i64 {
        match self.get(key) {
            HyperValue::Int(v) => *v,
            other => panic!("{}: `{key}` = {other} is not an integer", self.method),
        }
    }

    /// A positive integer setting, or an error naming it.
    pub fn positive(&self, key: &str) -> Result<usize, PretextError> {
        let v = self.i64(key);
        if v <= 0 {
            return Err(self.bad(key, "must be positive"));
        }
        Ok(v as usize)
    }

    /// A float setting in `(lo, hi]`-style bounds given by `ok`, or an error naming it.
    pub fn checked(
        &self,
        key: &str,
        ok: impl Fn(f64) -> bool,
        what: &str,
    ) -> Result<f64, PretextError> {
        let v = self.f64(key);
        if !ok(v) {
            return Err(self.bad(key, what));
        }
        Ok(v)
    }

    /// A boolean setting. Panics on an undeclared key: a bug in the method.
    pub fn bool(&self, key: &str) -> bool {
        match self.get(key) {
            HyperValue::Bool(v) => *v,
            other => panic!("{}: `{key}` = {other} is not a boolean", self.method),
        }
    }

    /// A text setting. Panics on an undeclared key: a bug in the method.
    pub fn text(&self, key: &str) -> &str {
        match self.get(key) {
            HyperValue::Text(v) => v,
            other => panic!("{}: `{key}` = {other} is not text", self.method),
        }
    }

    /// How the method's batch norms run ([`batch_norm`]): `batch` is training mode (batch
    /// statistics, running statistics updated), `frozen` the running statistics as constants
    /// of the step (the affine weight and bias still train).
    pub fn norm_mode(&self) -> Result<crate::nn::NormMode, PretextError> {
        match self.text("batch_norm") {
            "batch" => Ok(crate::nn::NormMode::train()),
            "frozen" => Ok(crate::nn::NormMode::Frozen),
            _ => Err(self.bad("batch_norm", "must be batch or frozen")),
        }
    }

    /// The error for setting `key` with `problem`.
    pub fn bad(&self, key: &str, problem: &str) -> PretextError {
        PretextError::BadSetting {
            method: self.method.clone(),
            key: key.to_string(),
            value: self.get(key).to_string(),
            problem: problem.to_string(),
        }
    }

    /// The optimizer of [`common`], the learning rate scaled to `batch`.
    pub fn optimizer(&self, batch: usize) -> Result<OptimizerConfig, PretextError> {
        let reference = self.positive("reference_batch")?;
        let lr =
            self.checked("lr", |v| v > 0.0, "must be positive")? * batch as f64 / reference as f64;
        let wd = self.checked("weight_decay", |v| v >= 0.0, "must be >= 0")?;
        let m = self.checked(
            "sgd_momentum",
            |v| (0.0..1.0).contains(&v),
            "must be in [0, 1)",
        )?;
        Ok(match self.text("optimizer") {
            "sgd" => OptimizerConfig::sgd(lr, m, wd),
            "lars" => OptimizerConfig::lars(lr, m, wd),
            "adamw" => OptimizerConfig::adamw(lr, wd),
            _ => return Err(self.bad("optimizer", "expected sgd, lars or adamw")),
        })
    }
}
