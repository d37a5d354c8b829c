//! [`StateDict`]: named tensors in file order, as PyTorch's `state_dict()` is.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use crate::tensor::Tensor;

/// Tensors by name, in insertion order (the order of the file, hence of the modules).
///
/// It remembers the file it was read from, so matching errors can name it.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct StateDict {
    entries: Vec<(String, Tensor)>,
    index: HashMap<String, usize>,
    source: Option<PathBuf>,
}

impl StateDict {
    /// An empty state dict with no source file.
    pub fn new() -> StateDict {
        StateDict::default()
    }

    /// The tensor named `name`.
    pub fn get(&self, name: &str) -> Option<&Tensor> {
        self.index.get(name).map(|&i| &self.entries[i].1)
    }

    /// Whether a tensor is named `name`.
    pub fn contains(&self, name: &str) -> bool {
        self.index.contains_key(name)
    }

    /// Sets `name` to `tensor`, keeping its position when it exists; returns the tensor replaced.
    pub fn insert(&mut self, name: impl Into<String>, tensor: Tensor) -> Option<Tensor> {
        let name = name.into();
        match self.index.get(&name) {
            Some(&i) => Some(std::mem::replace(&mut self.entries[i].1, tensor)),
            None => {
                self.index.insert(name.clone(), self.entries.len());
                self.entries.push((name, tensor));
                None
            }
        }
    }

    /// Number of tensors.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether there are no tensors.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// (name, tensor) in order.
    pub fn iter(&self) -> impl ExactSizeIterator<Item = (&str, &Tensor)> {
        self.entries.iter().map(|(n, t)| (n.as_str(), t))
    }

    /// The names in order.
    pub fn names(&self) -> impl ExactSizeIterator<Item = &str> {
        self.entries.iter().map(|(n, _)| n.as_str())
    }

    /// The file the tensors were read from, if any.
    pub fn source(&self) -> Option<&Path> {
        self.source.as_deref()
    }

    /// Records the file the tensors came from (used in error messages).
    pub fn with_source(mut self, path: impl Into<PathBuf>) -> StateDict {
        self.source = Some(path.into());
        self
    }

    pub(crate) fn set_source(&mut self, source: Option<PathBuf>) {
        self.source = source;
    }
}

impl FromIterator<(String, Tensor)> for StateDict {
    fn from_iter<I: IntoIterator<Item = (String, Tensor)>>(iter: I) -> StateDict {
        let mut sd = StateDict::new();
        for (name, tensor) in iter {
            sd.insert(name, tensor);
        }
        sd
    }
}

impl IntoIterator for StateDict {
    type Item = (String, Tensor);
    type IntoIter = std::vec::IntoIter<(String, Tensor)>;

    fn into_iter(self) -> Self::IntoIter {
        self.entries.into_iter()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ndarray::{ArrayD, IxDyn};

    fn scalar(v: f32) -> Tensor {
        Tensor::F32(ArrayD::from_elem(IxDyn(&[]), v))
    }

    #[test]
    fn state_dict_keeps_insertion_order_and_replaces_in_place() {
        let mut sd = StateDict::new();
        sd.insert("b", scalar(1.0));
        sd.insert("a", scalar(2.0));
        assert_eq!(sd.insert("b", scalar(3.0)), Some(scalar(1.0)));
        assert_eq!(sd.names().collect::<Vec<_>>(), ["b", "a"]);
        assert_eq!(sd.get("b"), Some(&scalar(3.0)));
        assert!(sd.contains("a") && !sd.contains("c"));
        assert_eq!(sd.len(), 2);
        let back: StateDict = sd.clone().into_iter().collect();
        assert_eq!(back, sd);
    }
}
