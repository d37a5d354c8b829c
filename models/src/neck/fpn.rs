//! Feature Pyramid Network (Lin et al. 2017), with torchvision's parameter names
//! (`inner_blocks.{i}.0.weight`, `layer_blocks.{i}.0.weight`) and semantics: 1x1 laterals,
//! nearest top-down upsampling to the lateral's exact size, 3x3 output convolutions, and an
//! optional extra level from a stride-2 max pool of the coarsest output (`LastLevelMaxPool`).

use densa_exporter::builder::ops::Window2d;
use densa_exporter::{BuildError, GraphBuilder, Init, Value};

use crate::nn::{Conv2d, Conv2dConfig};

/// FPN shape.
#[derive(Clone, Debug, PartialEq)]
pub struct FpnConfig {
    /// Channels of each input level, finest first.
    pub in_channels: Vec<usize>,
    /// Channels of every output level (torchvision detectors: 256).
    pub out_channels: usize,
    /// Add a max-pooled extra level (P6 from P5), as torchvision's `LastLevelMaxPool`.
    pub extra_max_pool: bool,
}

impl FpnConfig {
    pub fn new(in_channels: &[usize], out_channels: usize) -> Self {
        FpnConfig {
            in_channels: in_channels.to_vec(),
            out_channels,
            extra_max_pool: false,
        }
    }

    /// Creates the parameters in the current scope.
    pub fn init(&self, b: &mut GraphBuilder) -> Result<Fpn, BuildError> {
        // torchvision: kaiming_uniform_(a=1) -> U(-sqrt(3/fan_in), sqrt(3/fan_in)), bias 0.
        let conv = |cin: usize, cout: usize, k: usize| {
            Conv2dConfig::new(cin, cout, k)
                .padding(k / 2)
                .weight_init(Init::Uniform((3.0 / (cin * k * k) as f32).sqrt()))
                .bias_init(Init::Zeros)
        };
        let mut inner = Vec::new();
        let mut layer = Vec::new();
        for (i, &c) in self.in_channels.iter().enumerate() {
            inner.push(b.scoped(format!("inner_blocks.{i}"), |b| {
                conv(c, self.out_channels, 1).init(b, "0")
            })?);
            layer.push(b.scoped(format!("layer_blocks.{i}"), |b| {
                conv(self.out_channels, self.out_channels, 3).init(b, "0")
            })?);
        }
        Ok(Fpn {
            name: b.scoped_name(""),
            inner,
            layer,
            extra_max_pool: self.extra_max_pool,
        })
    }
}

/// An FPN whose parameters exist in the graph.
#[derive(Clone, Debug)]
pub struct Fpn {
    name: String,
    inner: Vec<Conv2d>,
    layer: Vec<Conv2d>,
    extra_max_pool: bool,
}

impl Fpn {
    /// # Shapes
    /// `[N, C_i, H_i, W_i]` per level `->` `[N, out_channels, H_i, W_i]` per level (plus
    /// `[N, out_channels, ceil(H_last/2), ..]` with the extra level).
    pub fn forward(
        &self,
        b: &mut GraphBuilder,
        features: &[&Value],
    ) -> Result<Vec<Value>, BuildError> {
        if features.len() != self.inner.len() {
            return Err(b.op_error(
                "FPN",
                format!(
                    "{} input levels for an FPN built for {}",
                    features.len(),
                    self.inner.len()
                ),
            ));
        }
        let last = features.len() - 1;
        let mut last_inner = self.inner[last].forward(b, features[last])?;
        let mut results = vec![self.layer[last].forward(b, &last_inner)?];
        for i in (0..last).rev() {
            let lateral = self.inner[i].forward(b, features[i])?;
            let name = self.name.clone();
            last_inner = b.scoped(
                if name.is_empty() {
                    format!("top_down{i}")
                } else {
                    format!("{name}.top_down{i}")
                },
                |b| {
                    let up = b.resize_nearest_like(&last_inner, &lateral)?;
                    b.add(&lateral, &up)
                },
            )?;
            results.insert(0, self.layer[i].forward(b, &last_inner)?);
        }
        if self.extra_max_pool {
            let p = results.last().expect("one level at least").clone();
            results.push(b.scoped("pool", |b| b.max_pool2d(&p, &Window2d::square(1, 2, 0)))?);
        }
        Ok(results)
    }
}
