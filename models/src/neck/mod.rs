//! Necks: modules between a backbone and the task heads.

pub mod fpn;

pub use fpn::{Fpn, FpnConfig};
