//! The tract backend: pure Rust, embedded, the default everywhere.
//!
//! tract optimises a model for concrete input shapes. A session keeps the ONNX model analysed
//! once and an optimised plan for the last input shapes it saw; new shapes re-plan.
//!
//! With the cargo feature `tract-cuda`, [`TractCudaBackend`] plans the same models with tract's
//! CUDA runtime (NVIDIA GPUs, CUDA loaded at run time): the ops it has kernels for run on the
//! GPU, the others on the CPU. It is for inference; training graphs belong on ONNX Runtime.

use std::sync::Arc;

use densa_exporter::{DType, Tensor};
use tract_onnx::prelude::{
    DatumType, Framework, InferenceFact, InferenceModel, InferenceModelExt, IntoRunnable, TValue,
    TVec, Tensor as TractTensor,
};
use tract_onnx::tract_core::runtime::Runnable;

use super::{decode_model, Backend, BackendError, Interface, Session};

const NAME: &str = "tract";

/// The tract backend.
#[derive(Clone, Copy, Debug, Default)]
pub struct TractBackend;

impl TractBackend {
    pub fn new() -> TractBackend {
        TractBackend
    }
}

impl Backend for TractBackend {
    fn name(&self) -> &'static str {
        NAME
    }

    fn load(&self, bytes: &[u8], label: &str) -> Result<Box<dyn Session>, BackendError> {
        load(bytes, label, false)
    }
}

fn load(bytes: &[u8], label: &str, gpu: bool) -> Result<Box<dyn Session>, BackendError> {
    let proto = decode_model(bytes, label, NAME)?;
    let interface = Interface::of(&proto);
    let model = tract_onnx::onnx()
        .model_for_read(&mut &bytes[..])
        .map_err(|e| load_error(label, &e))?;
    Ok(Box::new(TractSession {
        label: label.to_string(),
        interface,
        model,
        plan: None,
        gpu,
    }))
}

/// tract with its CUDA runtime (cargo feature `tract-cuda`): NVIDIA GPU `0`.
#[cfg(feature = "tract-cuda")]
#[derive(Clone, Copy, Debug)]
pub struct TractCudaBackend;

#[cfg(feature = "tract-cuda")]
impl TractCudaBackend {
    /// Checks that CUDA and the libraries tract's kernels need can be loaded (after preloading
    /// them from the `nvidia-*` Python packages, see [`super::cuda_libs`]).
    ///
    /// The system's CUDA libraries come first: tract's loader asks for unversioned names
    /// (`libcudnn.so`) before versioned ones, so preloading the Python packages' copies next to
    /// an installed CUDA would mix two cuDNN releases (cuDNN then fails with
    /// `SUBLIBRARY_VERSION_MISMATCH`, as seen on an H200 machine). Only when the system has none
    /// are the packages' libraries preloaded.
    pub fn new() -> Result<TractCudaBackend, String> {
        let runtime = cuda_runtime()?;
        if runtime.check().is_err() {
            let report = super::cuda_libs::preload();
            tracing::info!("CUDA libraries: {report}");
            runtime.check().map_err(|e| format!("{e:#}"))?;
        }
        Ok(TractCudaBackend)
    }
}

#[cfg(feature = "tract-cuda")]
fn cuda_runtime() -> Result<&'static dyn tract_onnx::tract_core::runtime::Runtime, String> {
    // Linking the crate registers its runtime under the name `cuda`.
    let _ = &tract_cuda::CudaTransform;
    tract_onnx::tract_core::runtime::runtime_for_name("cuda")
        .map_err(|e| format!("{e:#}"))?
        .ok_or_else(|| "tract's CUDA runtime is not registered".to_string())
}

#[cfg(feature = "tract-cuda")]
impl Backend for TractCudaBackend {
    fn name(&self) -> &'static str {
        NAME
    }

    fn device(&self) -> super::Device {
        super::Device::Cuda(0)
    }

    fn load(&self, bytes: &[u8], label: &str) -> Result<Box<dyn Session>, BackendError> {
        load(bytes, label, true)
    }
}

fn load_error(label: &str, e: &tract_onnx::prelude::TractError) -> BackendError {
    BackendError::Load {
        backend: NAME,
        model: label.to_string(),
        message: format!("{e:#}"),
    }
}

type Signature = Vec<(DType, Vec<usize>)>;

struct TractSession {
    label: String,
    interface: Interface,
    model: InferenceModel,
    plan: Option<(Signature, Arc<dyn Runnable>)>,
    /// Plan with tract's CUDA runtime.
    gpu: bool,
}

impl TractSession {
    fn plan_for(&mut self, inputs: &[(String, Tensor)]) -> Result<Arc<dyn Runnable>, BackendError> {
        let signature: Signature = inputs
            .iter()
            .map(|(_, t)| (t.dtype(), t.shape().to_vec()))
            .collect();
        if let Some((sig, plan)) = &self.plan {
            if *sig == signature {
                return Ok(plan.clone());
            }
        }
        let mut model = self.model.clone();
        for (i, (dtype, shape)) in signature.iter().enumerate() {
            let fact = InferenceFact::dt_shape(datum_type(*dtype)?, shape.as_slice());
            model = model
                .with_input_fact(i, fact)
                .map_err(|e| load_error(&self.label, &e))?;
        }
        let plan: Arc<dyn Runnable> = if self.gpu {
            self.gpu_plan(model)?
        } else {
            Arc::new(
                model
                    .into_optimized()
                    .and_then(|m| m.into_runnable())
                    .map_err(|e| load_error(&self.label, &e))?,
            )
        };
        self.plan = Some((signature, plan.clone()));
        Ok(plan)
    }
}

impl TractSession {
    #[cfg(feature = "tract-cuda")]
    fn gpu_plan(&self, model: InferenceModel) -> Result<Arc<dyn Runnable>, BackendError> {
        let typed = model
            .into_typed()
            .and_then(|m| m.into_decluttered())
            .map_err(|e| load_error(&self.label, &e))?;
        let runtime = cuda_runtime().map_err(|message| BackendError::Load {
            backend: NAME,
            model: self.label.clone(),
            message,
        })?;
        let plan = runtime
            .prepare(typed)
            .map_err(|e| load_error(&self.label, &e))?;
        Ok(Arc::from(plan))
    }

    #[cfg(not(feature = "tract-cuda"))]
    fn gpu_plan(&self, _: InferenceModel) -> Result<Arc<dyn Runnable>, BackendError> {
        unreachable!("GPU sessions exist only with the `tract-cuda` feature")
    }
}

impl Session for TractSession {
    fn interface(&self) -> &Interface {
        &self.interface
    }

    fn run(
        &mut self,
        inputs: Vec<(String, Tensor)>,
    ) -> Result<Vec<(String, Tensor)>, BackendError> {
        let inputs = self.interface.arrange(&self.label, inputs)?;
        let plan = self.plan_for(&inputs)?;
        let values: TVec<TValue> = inputs
            .into_iter()
            .map(|(_, t)| to_tract(t).into())
            .collect();
        let outputs = plan.run(values).map_err(|e| BackendError::Run {
            backend: NAME,
            model: self.label.clone(),
            message: format!("{e:#}"),
        })?;
        self.interface
            .outputs
            .iter()
            .zip(outputs)
            .map(|(port, v)| Ok((port.name.clone(), from_tract(&v)?)))
            .collect()
    }
}

fn datum_type(dtype: DType) -> Result<DatumType, BackendError> {
    Ok(match dtype {
        DType::F32 => DatumType::F32,
        DType::F64 => DatumType::F64,
        DType::F16 => DatumType::F16,
        DType::I64 => DatumType::I64,
        DType::I32 => DatumType::I32,
        DType::I8 => DatumType::I8,
        DType::U8 => DatumType::U8,
        DType::Bool => DatumType::Bool,
        DType::BF16 => {
            return Err(BackendError::UnsupportedType {
                backend: NAME,
                dtype: dtype.to_string(),
            })
        }
    })
}

/// Converts a densa tensor to a tract tensor.
pub fn to_tract(t: Tensor) -> TractTensor {
    match t {
        Tensor::F32(a) => a.into(),
        Tensor::F64(a) => a.into(),
        Tensor::F16(a) => a.into(),
        Tensor::I64(a) => a.into(),
        Tensor::I32(a) => a.into(),
        Tensor::I8(a) => a.into(),
        Tensor::U8(a) => a.into(),
        Tensor::Bool(a) => a.into(),
        // bf16 is refused before planning (datum_type); keep the conversion total.
        Tensor::BF16(a) => a.mapv(f32::from).into(),
    }
}

/// Converts a tract tensor to a densa tensor.
pub fn from_tract(t: &TractTensor) -> Result<Tensor, BackendError> {
    let err = |_| BackendError::UnsupportedType {
        backend: NAME,
        dtype: format!("{:?}", t.datum_type()),
    };
    Ok(match t.datum_type() {
        DatumType::F32 => Tensor::F32(t.to_plain_array_view::<f32>().map_err(err)?.to_owned()),
        DatumType::F64 => Tensor::F64(t.to_plain_array_view::<f64>().map_err(err)?.to_owned()),
        DatumType::F16 => Tensor::F16(
            t.to_plain_array_view::<half::f16>()
                .map_err(err)?
                .to_owned(),
        ),
        DatumType::I64 => Tensor::I64(t.to_plain_array_view::<i64>().map_err(err)?.to_owned()),
        DatumType::I32 => Tensor::I32(t.to_plain_array_view::<i32>().map_err(err)?.to_owned()),
        DatumType::I8 => Tensor::I8(t.to_plain_array_view::<i8>().map_err(err)?.to_owned()),
        DatumType::U8 => Tensor::U8(t.to_plain_array_view::<u8>().map_err(err)?.to_owned()),
        DatumType::Bool => Tensor::Bool(t.to_plain_array_view::<bool>().map_err(err)?.to_owned()),
        // tract computes integer shape arithmetic (and constants folded from it) symbolically;
        // the ONNX graph declared int64.
        DatumType::TDim => {
            let as_i64 = t.cast_to::<i64>().map_err(err)?;
            Tensor::I64(as_i64.to_plain_array_view::<i64>().map_err(err)?.to_owned())
        }
        other => {
            return Err(BackendError::UnsupportedType {
                backend: NAME,
                dtype: format!("{other:?}"),
            })
        }
    })
}

/// The concrete shape of every value of `model` (by ONNX value name) for the given input
/// shapes (float32 inputs unless the model declares otherwise), as tract's analysis finds them.
/// `label` names the model in errors.
pub fn infer_shapes(
    model: &densa_exporter::onnx::ModelProto,
    label: &std::path::Path,
    input_shapes: &std::collections::HashMap<String, Vec<usize>>,
) -> Result<std::collections::HashMap<String, Vec<usize>>, BackendError> {
    use prost::Message;
    use tract_onnx::prelude::InferenceModelExt as _;
    let label_s = label.display().to_string();
    let interface = Interface::of(model);
    let bytes = model.encode_to_vec();
    let mut m = tract_onnx::onnx()
        .model_for_read(&mut &bytes[..])
        .map_err(|e| load_error(&label_s, &e))?;
    for (i, port) in interface.inputs.iter().enumerate() {
        let shape = input_shapes
            .get(&port.name)
            .ok_or_else(|| BackendError::MissingInput {
                model: label_s.clone(),
                name: port.name.clone(),
            })?;
        let dt = datum_type(port.dtype.unwrap_or(DType::F32))?;
        m = m
            .with_input_fact(i, InferenceFact::dt_shape(dt, shape.as_slice()))
            .map_err(|e| load_error(&label_s, &e))?;
    }
    m.analyse(false).map_err(|e| load_error(&label_s, &e))?;
    let mut shapes = std::collections::HashMap::new();
    for node in m.nodes() {
        for (ix, output) in node.outputs.iter().enumerate() {
            let outlet = tract_onnx::prelude::OutletId::new(node.id, ix);
            let name = m
                .outlet_label(outlet)
                .map(str::to_string)
                .unwrap_or_else(|| node.name.clone());
            if let Ok(Some(dims)) = output.fact.shape.as_concrete_finite() {
                shapes.insert(name, dims.to_vec());
            }
        }
    }
    Ok(shapes)
}
