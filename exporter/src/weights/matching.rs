//! Matching a state dict against the parameters a model expects.
//!
//! Checkpoints name parameters with prefixes from their training setup: `module.` from
//! `DataParallel`, `module.encoder_q.` from MoCo, `backbone.`, `model.`... Matching finds the
//! prefix under which every expected name is present with the right shape, or says why none
//! fits. Keys ending in `num_batches_tracked` (a BatchNorm counter that older checkpoints lack
//! and inference ignores) are never a problem: when absent or of another shape they are zero.

use std::collections::HashSet;
use std::path::Path;

use super::{StateDict, WeightsError};
use crate::tensor::{DType, Tensor};

/// What [`match_parameters`] picked.
#[derive(Clone, Debug)]
pub struct Matched {
    /// Exactly the expected names, in the expected order. Floating-point tensors are `f32`;
    /// integer buffers keep their type.
    pub tensors: StateDict,
    /// The prefix stripped from the file's keys (`""` for none).
    pub prefix: String,
    /// The file's keys that were not used, as named in the file: those under the prefix
    /// first (e.g. `fc.weight` of a classifier head), then the others.
    pub unexpected: Vec<String>,
}

/// The keys of `sd` that start with `prefix`, with it removed; the others are dropped.
pub fn strip_prefix(sd: &StateDict, prefix: &str) -> StateDict {
    let mut out: StateDict = sd
        .iter()
        .filter_map(|(name, t)| Some((name.strip_prefix(prefix)?.to_string(), t.clone())))
        .collect();
    out.set_source(sd.source().map(Path::to_path_buf));
    out
}

fn is_batch_counter(name: &str) -> bool {
    name.ends_with("num_batches_tracked")
}

/// How well the keys under one prefix fit the expected parameters.
struct Fit {
    prefix: String,
    found: usize,
    missing: Vec<String>,
    wrong_shape: Vec<(String, Vec<usize>, Vec<usize>)>,
}

impl Fit {
    fn complete(&self) -> bool {
        self.missing.is_empty() && self.wrong_shape.is_empty()
    }
}

fn fit(sd: &StateDict, expected: &[(String, Vec<usize>)], prefix: &str) -> Fit {
    let mut fit = Fit {
        prefix: prefix.to_string(),
        found: 0,
        missing: Vec::new(),
        wrong_shape: Vec::new(),
    };
    for (name, shape) in expected {
        if is_batch_counter(name) {
            continue;
        }
        match sd.get(&format!("{prefix}{name}")) {
            None => fit.missing.push(name.clone()),
            Some(t) if t.shape() != shape.as_slice() => {
                fit.wrong_shape
                    .push((name.clone(), shape.clone(), t.shape().to_vec()))
            }
            Some(_) => fit.found += 1,
        }
    }
    fit
}

/// Every prefix `P` (empty or ending in `.`) such that some key is `P` + an expected name;
/// `""` first, then in the order of the keys.
fn candidate_prefixes(sd: &StateDict, expected: &[(String, Vec<usize>)]) -> Vec<String> {
    let names: HashSet<&str> = expected.iter().map(|(n, _)| n.as_str()).collect();
    let mut seen = HashSet::new();
    let mut candidates = vec![String::new()];
    seen.insert(String::new());
    for key in sd.names() {
        for (i, _) in key.match_indices('.') {
            let (prefix, rest) = key.split_at(i + 1);
            if names.contains(rest) && seen.insert(prefix.to_string()) {
                candidates.push(prefix.to_string());
            }
        }
    }
    candidates
}

/// Picks from `sd` the tensors named in `expected` (name, shape).
///
/// With `strip_prefix`, keys are looked up as that prefix + name. Without, the prefix is
/// detected: among `""` and every `P` such that some key is `P` + an expected name, the one
/// under which every expected name has the right shape; several such prefixes are an error
/// (`AmbiguousPrefix`), none a `Mismatch` report for the prefix that fits best.
pub fn match_parameters(
    sd: &StateDict,
    expected: &[(String, Vec<usize>)],
    strip_prefix: Option<&str>,
) -> Result<Matched, WeightsError> {
    let file = sd.source().map(Path::to_path_buf);
    let chosen = match strip_prefix {
        Some(prefix) => fit(sd, expected, prefix),
        None => {
            let fits: Vec<Fit> = candidate_prefixes(sd, expected)
                .iter()
                .map(|p| fit(sd, expected, p))
                .collect();
            let complete: Vec<&Fit> = fits.iter().filter(|f| f.complete()).collect();
            if complete.len() > 1 {
                let candidates = complete.iter().map(|f| f.prefix.clone()).collect();
                return Err(WeightsError::AmbiguousPrefix { file, candidates });
            }
            // The first best: `""` wins ties, then the order of the keys.
            let mut fits = fits.into_iter();
            let first = fits.next().expect("\"\" is always a candidate");
            fits.fold(first, |best, f| {
                let better = f.complete() && !best.complete()
                    || (f.complete() == best.complete() && f.found > best.found);
                if better {
                    f
                } else {
                    best
                }
            })
        }
    };

    let used: HashSet<String> = expected
        .iter()
        .map(|(name, _)| format!("{}{name}", chosen.prefix))
        .collect();
    let (mut unexpected, outside): (Vec<String>, Vec<String>) = sd
        .names()
        .filter(|k| !used.contains(*k))
        .map(str::to_string)
        .partition(|k| k.starts_with(&chosen.prefix));
    unexpected.extend(outside);

    if !chosen.complete() {
        return Err(WeightsError::Mismatch {
            file,
            prefix: chosen.prefix,
            missing: chosen.missing,
            unexpected: unexpected
                .into_iter()
                .filter(|k| !is_batch_counter(k))
                .collect(),
            wrong_shape: chosen.wrong_shape.into_boxed_slice(),
        });
    }

    let mut tensors = StateDict::new();
    tensors.set_source(file);
    for (name, shape) in expected {
        let found = sd
            .get(&format!("{}{name}", chosen.prefix))
            .filter(|t| t.shape() == shape.as_slice());
        let tensor = match found {
            Some(t) if t.dtype().is_float() && t.dtype() != DType::F32 => Tensor::F32(t.to_f32()),
            Some(t) => t.clone(),
            // Only a batch counter can be absent here (see `fit`).
            None => Tensor::zeros(DType::I64, shape),
        };
        tensors.insert(name.clone(), tensor);
    }
    Ok(Matched {
        tensors,
        prefix: chosen.prefix,
        unexpected,
    })
}

/// How errors name the state dict's file.
pub(crate) fn file_label(file: Option<&Path>) -> String {
    file.map_or_else(|| "the weights".to_string(), |p| p.display().to_string())
}

/// `"module.", "" (none)` for messages.
pub(crate) fn prefix_list(prefixes: &[String]) -> String {
    let quoted: Vec<String> = prefixes
        .iter()
        .map(|p| {
            if p.is_empty() {
                "`` (no prefix)".to_string()
            } else {
                format!("`{p}`")
            }
        })
        .collect();
    quoted.join(", ")
}

/// At most `limit` items joined by `sep`, then "and N more".
fn first_of(items: &[String], limit: usize, sep: &str) -> String {
    let mut text = items
        .iter()
        .take(limit)
        .cloned()
        .collect::<Vec<_>>()
        .join(sep);
    if items.len() > limit {
        text.push_str(&format!("{sep}and {} more", items.len() - limit));
    }
    text
}

/// The message of [`WeightsError::Mismatch`].
pub(crate) fn mismatch_message(
    file: Option<&Path>,
    prefix: &str,
    missing: &[String],
    wrong_shape: &[(String, Vec<usize>, Vec<usize>)],
    unexpected: &[String],
) -> String {
    let under = if prefix.is_empty() {
        "no key prefix".to_string()
    } else {
        format!("key prefix `{prefix}`")
    };
    let mut text = format!(
        "{}: the weights do not fit the model ({under}): {} missing, {} of the wrong shape, {} \
         unexpected",
        file_label(file),
        missing.len(),
        wrong_shape.len(),
        unexpected.len()
    );
    if !missing.is_empty() {
        text.push_str(&format!("\n  missing: {}", first_of(missing, 20, ", ")));
    }
    if !wrong_shape.is_empty() {
        let lines: Vec<String> = wrong_shape
            .iter()
            .map(|(name, want, got)| format!("{name}: model {want:?}, file {got:?}"))
            .collect();
        text.push_str(&format!(
            "\n  wrong shape:\n    {}",
            first_of(&lines, 20, "\n    ")
        ));
    }
    if !unexpected.is_empty() {
        text.push_str(&format!(
            "\n  unexpected: {}",
            first_of(unexpected, 10, ", ")
        ));
    }
    text
}

#[cfg(test)]
mod tests {
    use ndarray::{ArrayD, IxDyn};

    use super::*;

    fn t(shape: &[usize]) -> Tensor {
        Tensor::F32(ArrayD::zeros(IxDyn(shape)))
    }

    fn sd(entries: &[(&str, &[usize])]) -> StateDict {
        entries
            .iter()
            .map(|(n, s)| (n.to_string(), t(s)))
            .collect::<StateDict>()
            .with_source("ckpt.pth")
    }

    fn expected(entries: &[(&str, &[usize])]) -> Vec<(String, Vec<usize>)> {
        entries
            .iter()
            .map(|(n, s)| (n.to_string(), s.to_vec()))
            .collect()
    }

    const MODEL: &[(&str, &[usize])] = &[
        ("conv1.weight", &[4, 3, 3, 3]),
        ("bn1.weight", &[4]),
        ("bn1.num_batches_tracked", &[]),
    ];

    #[test]
    fn matching_without_prefix_reports_unexpected_keys() {
        let file = sd(&[
            ("conv1.weight", &[4, 3, 3, 3]),
            ("bn1.weight", &[4]),
            ("bn1.num_batches_tracked", &[]),
            ("fc.weight", &[10, 4]),
        ]);
        let m = match_parameters(&file, &expected(MODEL), None).unwrap();
        assert_eq!(m.prefix, "");
        assert_eq!(m.unexpected, ["fc.weight"]);
        assert_eq!(
            m.tensors.names().collect::<Vec<_>>(),
            ["conv1.weight", "bn1.weight", "bn1.num_batches_tracked"]
        );
    }

    #[test]
    fn matching_detects_prefixes() {
        for prefix in [
            "module.",
            "module.encoder_q.",
            "encoder_q.",
            "backbone.",
            "module.backbone.",
            "model.",
        ] {
            let mut keys: Vec<(String, Vec<usize>)> = MODEL
                .iter()
                .map(|(n, s)| (format!("{prefix}{n}"), s.to_vec()))
                .collect();
            keys.push((format!("{prefix}fc.bias"), vec![10]));
            keys.push(("queue".to_string(), vec![4, 8]));
            let file: StateDict = keys.into_iter().map(|(n, s)| (n, t(&s))).collect();
            let m = match_parameters(&file, &expected(MODEL), None).unwrap();
            assert_eq!(m.prefix, prefix);
            assert_eq!(
                m.unexpected,
                [format!("{prefix}fc.bias"), "queue".to_string()]
            );
            // An explicit prefix gives the same.
            let explicit = match_parameters(&file, &expected(MODEL), Some(prefix)).unwrap();
            assert_eq!(explicit.tensors, m.tensors);
        }
    }

    #[test]
    fn matching_batch_counters_are_never_a_problem() {
        // Older checkpoints lack num_batches_tracked: it comes out as a zero int64.
        let file = sd(&[
            ("conv1.weight", &[4, 3, 3, 3]),
            ("bn1.weight", &[4]),
            ("bn2.num_batches_tracked", &[]),
        ]);
        let m = match_parameters(&file, &expected(MODEL), None).unwrap();
        assert_eq!(
            m.tensors.get("bn1.num_batches_tracked"),
            Some(&Tensor::zeros(DType::I64, &[]))
        );
        assert_eq!(m.unexpected, ["bn2.num_batches_tracked"]);
    }

    #[test]
    fn matching_ambiguous_prefixes_are_an_error_listing_them() {
        let mut keys = Vec::new();
        for prefix in ["module.encoder_q.", "module.encoder_k."] {
            keys.extend(MODEL.iter().map(|(n, s)| (format!("{prefix}{n}"), t(s))));
        }
        let file: StateDict = keys
            .into_iter()
            .collect::<StateDict>()
            .with_source("moco.pth");
        let e = match_parameters(&file, &expected(MODEL), None).unwrap_err();
        let WeightsError::AmbiguousPrefix { candidates, .. } = &e else {
            panic!("{e}")
        };
        assert_eq!(candidates, &["module.encoder_q.", "module.encoder_k."]);
        let msg = e.to_string();
        assert!(
            msg.contains("moco.pth")
                && msg.contains("--strip-prefix")
                && msg.contains("`module.encoder_k.`"),
            "{msg}"
        );
        // Choosing resolves it.
        let m = match_parameters(&file, &expected(MODEL), Some("module.encoder_k.")).unwrap();
        assert_eq!(m.unexpected.len(), 3);
    }

    #[test]
    fn matching_reports_missing_unexpected_and_wrong_shapes() {
        // A resnet18-like file into a resnet50-like model.
        let file = sd(&[
            ("module.conv1.weight", &[64, 3, 7, 7]),
            ("module.layer1.0.conv1.weight", &[64, 64, 3, 3]),
            ("module.layer1.0.conv2.weight", &[64, 64, 3, 3]),
            ("module.layer1.0.bn1.num_batches_tracked", &[]),
            ("module.fc.weight", &[1000, 512]),
        ]);
        let model = expected(&[
            ("conv1.weight", &[64, 3, 7, 7]),
            ("layer1.0.conv1.weight", &[64, 64, 1, 1]),
            ("layer1.0.conv2.weight", &[64, 64, 3, 3]),
            ("layer1.0.conv3.weight", &[256, 64, 1, 1]),
            ("fc.weight", &[1000, 2048]),
        ]);
        let e = match_parameters(&file, &model, None).unwrap_err();
        let WeightsError::Mismatch {
            file: f,
            prefix,
            missing,
            unexpected,
            wrong_shape,
        } = &e
        else {
            panic!("{e}")
        };
        assert_eq!(f.as_deref(), Some(Path::new("ckpt.pth")));
        assert_eq!(prefix, "module.");
        assert_eq!(missing, &["layer1.0.conv3.weight"]);
        assert!(
            unexpected.is_empty(),
            "batch counters are not reported: {unexpected:?}"
        );
        assert_eq!(
            &wrong_shape[..],
            &[
                (
                    "layer1.0.conv1.weight".to_string(),
                    vec![64, 64, 1, 1],
                    vec![64, 64, 3, 3]
                ),
                ("fc.weight".to_string(), vec![1000, 2048], vec![1000, 512]),
            ]
        );
        let msg = e.to_string();
        for part in [
            "ckpt.pth",
            "key prefix `module.`",
            "missing: layer1.0.conv3.weight",
            "layer1.0.conv1.weight: model [64, 64, 1, 1], file [64, 64, 3, 3]",
            "fc.weight: model [1000, 2048], file [1000, 512]",
        ] {
            assert!(msg.contains(part), "{part:?} not in:\n{msg}");
        }
    }

    #[test]
    fn matching_long_lists_are_cut_with_a_count() {
        let names: Vec<String> = (0..25).map(|i| format!("extra{i}.weight")).collect();
        let file: StateDict = names.iter().map(|n| (n.clone(), t(&[1]))).collect();
        let e = match_parameters(&file, &expected(&[("w", &[1])]), None).unwrap_err();
        let msg = e.to_string();
        assert!(
            msg.contains("the weights do not fit") && msg.contains("no key prefix"),
            "{msg}"
        );
        assert!(
            msg.contains("extra9.weight, and 15 more") && !msg.contains("extra10.weight"),
            "{msg}"
        );
    }

    #[test]
    fn matching_converts_floats_to_f32_and_keeps_integers() {
        let mut file = StateDict::new();
        file.insert(
            "w",
            Tensor::F16(ArrayD::from_elem(IxDyn(&[2]), half::f16::from_f32(0.5))),
        );
        file.insert("b", Tensor::F64(ArrayD::from_elem(IxDyn(&[1]), 0.25)));
        file.insert("n", Tensor::I64(ArrayD::from_elem(IxDyn(&[]), 7)));
        let m = match_parameters(
            &file,
            &expected(&[("w", &[2]), ("b", &[1]), ("n", &[])]),
            None,
        )
        .unwrap();
        assert_eq!(
            m.tensors
                .get("w")
                .unwrap()
                .as_f32()
                .unwrap()
                .as_slice()
                .unwrap(),
            &[0.5, 0.5]
        );
        assert_eq!(m.tensors.get("b").unwrap().dtype(), DType::F32);
        assert_eq!(m.tensors.get("n"), file.get("n"));
    }

    #[test]
    fn matching_strip_prefix_keeps_only_prefixed_keys() {
        let file = sd(&[("module.a", &[1]), ("b", &[2]), ("module.c.d", &[3])]);
        let stripped = strip_prefix(&file, "module.");
        assert_eq!(stripped.names().collect::<Vec<_>>(), ["a", "c.d"]);
        assert_eq!(stripped.source(), Some(Path::new("ckpt.pth")));
    }
}
