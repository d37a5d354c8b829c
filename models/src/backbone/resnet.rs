//! ResNet, exactly torchvision's architecture and parameter names (`conv1.weight`,
//! `bn1.running_mean`, `layer1.0.downsample.0.weight`, ...), so torchvision checkpoints and
//! checkpoints of the self-supervised papers load as they are.
//!
//! The bottleneck is torchvision's "ResNet v1.5" (stride on the 3x3 convolution). The forward
//! returns the four stage outputs `c2..c5` (torchvision `layer1..layer4`, strides 4..32); the
//! classification head (`fc`) is not part of a backbone.

use densa_exporter::builder::ops::Window2d;
use densa_exporter::{BuildError, GraphBuilder, Init, Value};

use densa_exporter::train::TrainError;

use crate::nn::{BatchNorm2d, BatchNorm2dConfig, Conv2d, Conv2dConfig, NormMode};

/// The residual block type.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Block {
    /// Two 3x3 convolutions (ResNet-18/34), expansion 1.
    Basic,
    /// 1x1, 3x3, 1x1 (ResNet-50 and deeper), expansion 4.
    Bottleneck,
}

impl Block {
    pub fn expansion(self) -> usize {
        match self {
            Block::Basic => 1,
            Block::Bottleneck => 4,
        }
    }
}

/// A ResNet's shape.
#[derive(Clone, Debug, PartialEq)]
pub struct ResNetConfig {
    pub block: Block,
    /// Blocks per stage.
    pub layers: [usize; 4],
    /// Planes per stage before expansion (torchvision: 64, 128, 256, 512).
    pub planes: [usize; 4],
    /// Channels of the stem convolution (torchvision: 64).
    pub stem_channels: usize,
    /// Input channels (3).
    pub in_channels: usize,
    /// Initialise the last batch norm of each block to zero (torchvision's
    /// `zero_init_residual`, default false).
    pub zero_init_residual: bool,
}

impl ResNetConfig {
    pub fn resnet18() -> Self {
        Self::torchvision(Block::Basic, [2, 2, 2, 2])
    }
    pub fn resnet34() -> Self {
        Self::torchvision(Block::Basic, [3, 4, 6, 3])
    }
    pub fn resnet50() -> Self {
        Self::torchvision(Block::Bottleneck, [3, 4, 6, 3])
    }
    /// densa's edge backbone: ResNet-10 at quarter width (one basic block per stage, 16..128
    /// channels, 1.2 M parameters). Same names and strides as torchvision's ResNets, so every
    /// pipeline treats it like one; small enough to train on 2 CPU cores in tests and demos.
    pub fn edge() -> Self {
        ResNetConfig {
            planes: [16, 32, 64, 128],
            stem_channels: 16,
            ..Self::torchvision(Block::Basic, [1, 1, 1, 1])
        }
    }

    fn torchvision(block: Block, layers: [usize; 4]) -> Self {
        ResNetConfig {
            block,
            layers,
            planes: [64, 128, 256, 512],
            stem_channels: 64,
            in_channels: 3,
            zero_init_residual: false,
        }
    }

    /// Channels of `c2..c5`.
    pub fn out_channels(&self) -> [usize; 4] {
        self.planes.map(|p| p * self.block.expansion())
    }

    /// Creates every parameter in the builder's current scope.
    pub fn init(&self, b: &mut GraphBuilder) -> Result<ResNet, BuildError> {
        let conv = |cin, cout, k| {
            Conv2dConfig::new(cin, cout, k)
                .bias(false)
                .weight_init(Init::KaimingNormalFanOut)
        };
        let conv1 = conv(self.in_channels, self.stem_channels, 7)
            .stride(2)
            .padding(3)
            .init(b, "conv1")?;
        let bn1 = BatchNorm2dConfig::new(self.stem_channels).init(b, "bn1")?;
        let mut inplanes = self.stem_channels;
        let mut stages = Vec::new();
        for (s, (&blocks, &planes)) in self.layers.iter().zip(&self.planes).enumerate() {
            let stride = if s == 0 { 1 } else { 2 };
            let stage = b.scoped(format!("layer{}", s + 1), |b| {
                (0..blocks)
                    .map(|i| {
                        let block_stride = if i == 0 { stride } else { 1 };
                        let blk = b.scoped(i, |b| {
                            self.init_block(b, inplanes, planes, block_stride, &conv)
                        });
                        inplanes = planes * self.block.expansion();
                        blk
                    })
                    .collect::<Result<Vec<_>, _>>()
            })?;
            stages.push(stage);
        }
        Ok(ResNet { conv1, bn1, stages })
    }

    fn init_block(
        &self,
        b: &mut GraphBuilder,
        inplanes: usize,
        planes: usize,
        stride: usize,
        conv: &dyn Fn(usize, usize, usize) -> Conv2dConfig,
    ) -> Result<ResidualBlock, BuildError> {
        let out = planes * self.block.expansion();
        let last_gamma = if self.zero_init_residual { 0.0 } else { 1.0 };
        let mut convs = Vec::new();
        let mut bns = Vec::new();
        let specs: Vec<(usize, usize, usize, usize, usize)> = match self.block {
            // (in, out, kernel, stride, padding)
            Block::Basic => vec![(inplanes, planes, 3, stride, 1), (planes, planes, 3, 1, 1)],
            Block::Bottleneck => {
                vec![
                    (inplanes, planes, 1, 1, 0),
                    (planes, planes, 3, stride, 1),
                    (planes, out, 1, 1, 0),
                ]
            }
        };
        let n = specs.len();
        for (i, (cin, cout, k, s, p)) in specs.into_iter().enumerate() {
            convs.push(
                conv(cin, cout, k)
                    .stride(s)
                    .padding(p)
                    .init(b, &format!("conv{}", i + 1))?,
            );
            let mut bn = BatchNorm2dConfig::new(cout);
            if i == n - 1 {
                bn.gamma_init = last_gamma;
            }
            bns.push(bn.init(b, &format!("bn{}", i + 1))?);
        }
        let downsample = if stride != 1 || inplanes != out {
            Some(b.scoped("downsample", |b| -> Result<_, BuildError> {
                Ok((
                    conv(inplanes, out, 1).stride(stride).init(b, "0")?,
                    BatchNorm2dConfig::new(out).init(b, "1")?,
                ))
            })?)
        } else {
            None
        };
        Ok(ResidualBlock {
            name: b.scoped_name(""),
            convs,
            bns,
            downsample,
        })
    }
}

/// One residual block.
#[derive(Clone, Debug)]
pub struct ResidualBlock {
    name: String,
    convs: Vec<Conv2d>,
    bns: Vec<BatchNorm2d>,
    downsample: Option<(Conv2d, BatchNorm2d)>,
}

impl ResidualBlock {
    fn forward_mode(
        &self,
        b: &mut GraphBuilder,
        x: &Value,
        mode: &mut NormMode,
    ) -> Result<Value, TrainError> {
        let mut h = x.clone();
        let n = self.convs.len();
        for (i, (conv, bn)) in self.convs.iter().zip(&self.bns).enumerate() {
            h = conv.forward(b, &h)?;
            h = bn.forward_mode(b, &h, mode)?;
            if i + 1 < n {
                h = b.scoped(&self.name, |b| b.relu(&h));
            }
        }
        let identity = match &self.downsample {
            Some((conv, bn)) => {
                let d = conv.forward(b, x)?;
                bn.forward_mode(b, &d, mode)?
            }
            None => x.clone(),
        };
        b.scoped(&self.name, |b| {
            let sum = b.add(&h, &identity)?;
            Ok(b.relu(&sum))
        })
    }
}

/// The build error of an inference-mode forward (which creates no training fragments).
fn inference_only<T>(r: Result<T, TrainError>) -> Result<T, BuildError> {
    r.map_err(|e| match e {
        TrainError::Build(e) => e,
        other => BuildError::Op {
            op: "BatchNormalization".into(),
            node: String::new(),
            message: other.to_string(),
        },
    })
}

/// A ResNet whose parameters exist in the graph.
#[derive(Clone, Debug)]
pub struct ResNet {
    conv1: Conv2d,
    bn1: BatchNorm2d,
    stages: Vec<Vec<ResidualBlock>>,
}

/// The four stage outputs.
#[derive(Clone, Debug)]
pub struct Stages {
    /// Stride 4 (`layer1`).
    pub c2: Value,
    /// Stride 8 (`layer2`).
    pub c3: Value,
    /// Stride 16 (`layer3`).
    pub c4: Value,
    /// Stride 32 (`layer4`).
    pub c5: Value,
}

impl Stages {
    pub fn as_array(&self) -> [&Value; 4] {
        [&self.c2, &self.c3, &self.c4, &self.c5]
    }
}

impl ResNet {
    /// # Shapes
    /// `images [N, 3, H, W] -> c2 [N, C2, H/4, W/4], c3 [.., H/8, ..], c4 [.., H/16, ..],
    /// c5 [N, C5, H/32, W/32]` (sizes rounded up, as torchvision's strided convolutions do).
    pub fn forward(&self, b: &mut GraphBuilder, images: &Value) -> Result<Stages, BuildError> {
        inference_only(self.forward_mode(b, images, &mut NormMode::Inference))
    }

    /// [`forward`](Self::forward) with batch norm as `mode` says: in training mode
    /// (`NormMode::train()`) every batch norm uses batch statistics and records the update of
    /// its running statistics in `mode`.
    ///
    /// # Shapes
    /// As [`forward`](Self::forward).
    pub fn forward_mode(
        &self,
        b: &mut GraphBuilder,
        images: &Value,
        mode: &mut NormMode,
    ) -> Result<Stages, TrainError> {
        let mut x = self.conv1.forward(b, images)?;
        x = self.bn1.forward_mode(b, &x, mode)?;
        x = b.relu(&x);
        x = b.scoped("maxpool", |b| b.max_pool2d(&x, &Window2d::square(3, 2, 1)))?;
        let mut outs = Vec::with_capacity(4);
        for stage in &self.stages {
            for block in stage {
                x = block.forward_mode(b, &x, mode)?;
            }
            outs.push(x.clone());
        }
        let [c2, c3, c4, c5]: [Value; 4] = outs.try_into().expect("four stages");
        Ok(Stages { c2, c3, c4, c5 })
    }
}
