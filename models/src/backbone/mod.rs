//! Backbones and the names users pick them by.

pub mod resnet;

use std::fmt;
use std::str::FromStr;

pub use resnet::{ResNet, ResNetConfig, Stages};

/// A backbone architecture, by its command-line name.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Arch {
    ResNet18,
    ResNet34,
    ResNet50,
    /// densa's edge backbone (ResNet-10 at quarter width), see [`ResNetConfig::edge`].
    Edge,
}

impl Arch {
    /// Every architecture, in the order `--help` lists them.
    pub const ALL: [Arch; 4] = [Arch::ResNet18, Arch::ResNet34, Arch::ResNet50, Arch::Edge];

    /// The command-line name.
    pub fn name(self) -> &'static str {
        match self {
            Arch::ResNet18 => "resnet18",
            Arch::ResNet34 => "resnet34",
            Arch::ResNet50 => "resnet50",
            Arch::Edge => "resnet-edge",
        }
    }

    /// The ResNet configuration of this architecture.
    pub fn config(self) -> ResNetConfig {
        match self {
            Arch::ResNet18 => ResNetConfig::resnet18(),
            Arch::ResNet34 => ResNetConfig::resnet34(),
            Arch::ResNet50 => ResNetConfig::resnet50(),
            Arch::Edge => ResNetConfig::edge(),
        }
    }
}

impl fmt::Display for Arch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Arch {
    type Err = String;
    fn from_str(s: &str) -> Result<Arch, String> {
        Arch::ALL
            .into_iter()
            .find(|a| a.name() == s.to_ascii_lowercase())
            .ok_or_else(|| {
                let names: Vec<&str> = Arch::ALL.iter().map(|a| a.name()).collect();
                format!(
                    "unknown architecture `{s}`; choose one of {}",
                    names.join(", ")
                )
            })
    }
}
