//! The ONNX Runtime backend (the `ort` crate, library loaded at run time; see [`super::ort_lib`]).
//!
//! On `--device cuda[:N]` sessions get ONNX Runtime's CUDA execution provider. That needs the
//! GPU build of the library (the `onnxruntime-gpu` wheel: `libonnxruntime.so` with
//! `libonnxruntime_providers_cuda.so` beside it) and CUDA 13's libraries (cudart, cuBLAS, cuFFT,
//! cuRAND, NVRTC, cuDNN 9), which [`super::cuda_libs`] preloads from the `nvidia-*` Python
//! packages when the dynamic loader does not find them. When either is missing the backend
//! says why on stderr and runs on the CPU: a GPU request never fails a job that the CPU can do.
//!
//! Training state can stay inside a session between steps ([`ResidentState`], IoBinding): on a
//! GPU the parameters, optimizer slots and buffers are bound as device tensors and the step's
//! new state is bound to device memory, so only the batch goes up and the loss comes down.

use std::sync::atomic::{AtomicBool, Ordering};

use densa_exporter::Tensor;
use ort::ep::{self, ExecutionProvider};
use ort::memory::{AllocationDevice, AllocatorType, MemoryInfo, MemoryType};
use ort::session::Session as OrtSession;
use ort::value::{DynTensor, DynTensorValueType, DynValue, TensorElementType};

use super::{
    cuda_libs, decode_model, ort_lib, Backend, BackendError, BackendOptions, Device, Interface,
    ResidentState, Session,
};

const NAME: &str = "ort";

/// The ONNX Runtime backend.
pub struct OrtBackend {
    threads: Option<usize>,
    environment: &'static ort::environment::Environment,
    /// The device sessions are created on (a GPU request the library cannot serve is CPU here).
    device: Device,
    /// Set when registering the CUDA provider failed once: later sessions go to the CPU at once.
    cuda_failed: AtomicBool,
    resident_state: bool,
}

impl OrtBackend {
    /// Finds and loads the ONNX Runtime library (once per process). A GPU `options.device`
    /// that this library cannot serve becomes the CPU, with a warning on stderr.
    pub fn new(options: &BackendOptions) -> Result<OrtBackend, BackendError> {
        let library = ort_lib::init(options.allow_download)
            .map_err(|e| BackendError::OrtUnavailable(e.to_string()))?;
        let environment = ort_lib::environment(options.allow_download)
            .map_err(|e| BackendError::OrtUnavailable(e.to_string()))?;
        let mut device = options.device;
        if let Device::Cuda(_) = device {
            match ep::CUDA::is_available() {
                Ok(true) => {
                    let report = cuda_libs::preload();
                    tracing::info!("CUDA libraries: {report}");
                    // Registering the provider loads it and the CUDA libraries: a failure shows
                    // here, before anyone reports the device.
                    let probe = OrtSession::builder(environment).map_err(|e| {
                        BackendError::OrtUnavailable(format!("session options: {e}"))
                    })?;
                    let Device::Cuda(id) = device else {
                        unreachable!()
                    };
                    let cuda = ep::CUDA::default()
                        .with_device_id(id)
                        .build()
                        .error_on_failure();
                    if let Err(e) = probe.with_execution_providers([cuda]) {
                        eprintln!("{}", cuda_failure(device, &e.to_string()));
                        device = Device::Cpu;
                    }
                }
                Ok(false) | Err(_) => {
                    eprintln!(
                        "densa: warning: --device {device}: the ONNX Runtime library {} has no CUDA \
                         execution provider (it is a CPU build); running on the CPU. For the GPU, \
                         install the GPU build (`pip install onnxruntime-gpu=={}`) or point \
                         ORT_DYLIB_PATH at its libonnxruntime.so",
                        library.path.display(),
                        ort_lib::ORT_VERSION
                    );
                    device = Device::Cpu;
                }
            }
        }
        Ok(OrtBackend {
            threads: options.threads,
            environment,
            device,
            cuda_failed: AtomicBool::new(false),
            resident_state: options.resident_state.unwrap_or(device.is_gpu()),
        })
    }

    /// The device new sessions run on.
    pub fn device(&self) -> Device {
        if self.cuda_failed.load(Ordering::Relaxed) {
            Device::Cpu
        } else {
            self.device
        }
    }

    fn builder(
        &self,
        fail: &dyn Fn(String) -> BackendError,
    ) -> Result<ort::session::builder::SessionBuilder, BackendError> {
        let mut builder = OrtSession::builder(self.environment).map_err(|e| fail(e.to_string()))?;
        if let Some(n) = self.threads {
            builder = builder
                .with_intra_threads(n)
                .map_err(|e| fail(e.to_string()))?;
        }
        Ok(builder)
    }
}

impl Backend for OrtBackend {
    fn name(&self) -> &'static str {
        NAME
    }

    fn device(&self) -> Device {
        OrtBackend::device(self)
    }

    fn load(&self, bytes: &[u8], label: &str) -> Result<Box<dyn Session>, BackendError> {
        let proto = decode_model(bytes, label, NAME)?;
        let interface = Interface::of(&proto);
        let fail = |e: String| BackendError::Load {
            backend: NAME,
            model: label.to_string(),
            message: e,
        };
        let mut device = self.device();
        let mut builder = self.builder(&fail)?;
        if let Device::Cuda(id) = device {
            let cuda = ep::CUDA::default()
                .with_device_id(id)
                .with_tf32(tf32())
                .build()
                .error_on_failure();
            match builder.with_execution_providers([cuda]) {
                Ok(b) => builder = b,
                Err(e) => {
                    if !self.cuda_failed.swap(true, Ordering::Relaxed) {
                        eprintln!("{}", cuda_failure(device, &e.to_string()));
                    }
                    device = Device::Cpu;
                    builder = self.builder(&fail)?;
                }
            }
        }
        let session = builder
            .commit_from_memory(bytes)
            .map_err(|e| fail(e.to_string()))?;
        let resident = self.resident_state.then(|| Resident::new(device));
        Ok(Box::new(OrtSessionBox {
            label: label.to_string(),
            interface,
            session,
            resident,
        }))
    }
}

/// Whether cuBLAS and cuDNN may use TF32 (ONNX Runtime's default, faster, 10-bit mantissa
/// inputs): `DENSA_CUDA_TF32=0` asks for full float32, to compare with a CPU run.
fn tf32() -> bool {
    std::env::var("DENSA_CUDA_TF32").map_or(true, |v| v != "0")
}

/// The warning for a CUDA provider that would not start.
fn cuda_failure(device: Device, error: &str) -> String {
    format!(
        "densa: warning: --device {device}: ONNX Runtime's CUDA provider could not start ({}); \
         running on the CPU. It needs CUDA 13 and cuDNN 9: `pip install \
         onnxruntime-gpu[cuda,cudnn]=={}` installs them, or add their lib folders to \
         LD_LIBRARY_PATH (or DENSA_CUDA_LIB_DIRS)",
        error.lines().next().unwrap_or_default(),
        ort_lib::ORT_VERSION
    )
}

struct OrtSessionBox {
    label: String,
    interface: Interface,
    session: OrtSession,
    resident: Option<Resident>,
}

/// The state of a [`ResidentState`] session: tensors on the session's device.
struct Resident {
    device: Device,
    /// `(input, next output)` pairs.
    pairs: Vec<(String, String)>,
    current: Vec<DynTensor>,
    pending: Option<Vec<DynTensor>>,
}

impl Resident {
    fn new(device: Device) -> Resident {
        Resident {
            device,
            pairs: Vec::new(),
            current: Vec::new(),
            pending: None,
        }
    }

    fn memory(&self) -> Result<MemoryInfo<'static>, ort::Error> {
        match self.device {
            Device::Cpu => MemoryInfo::new(
                AllocationDevice::CPU,
                0,
                AllocatorType::Device,
                MemoryType::Default,
            ),
            Device::Cuda(id) => MemoryInfo::new(
                AllocationDevice::CUDA,
                id,
                AllocatorType::Device,
                MemoryType::Default,
            ),
        }
    }

    fn upload(&self, t: Tensor) -> Result<DynTensor, ort::Error> {
        let host = to_ort_tensor(t)?;
        match self.device {
            Device::Cpu => Ok(host),
            Device::Cuda(id) => host.to(AllocationDevice::CUDA, id),
        }
    }
}

impl Session for OrtSessionBox {
    fn interface(&self) -> &Interface {
        &self.interface
    }

    fn run(
        &mut self,
        inputs: Vec<(String, Tensor)>,
    ) -> Result<Vec<(String, Tensor)>, BackendError> {
        let inputs = self.interface.arrange(&self.label, inputs)?;
        let run_err = |e: ort::Error| BackendError::Run {
            backend: NAME,
            model: self.label.clone(),
            message: e.to_string(),
        };
        let mut values: Vec<(String, DynValue)> = Vec::with_capacity(inputs.len());
        for (name, t) in inputs {
            values.push((name, to_ort(t).map_err(run_err)?));
        }
        let outputs = self.session.run(values).map_err(run_err)?;
        self.interface
            .outputs
            .iter()
            .map(|port| {
                let v = outputs.get(&port.name).ok_or_else(|| BackendError::Run {
                    backend: NAME,
                    model: self.label.clone(),
                    message: format!("output `{}` missing from the results", port.name),
                })?;
                Ok((port.name.clone(), from_ort(v, &self.label)?))
            })
            .collect()
    }

    fn resident_state(&mut self) -> Option<&mut dyn ResidentState> {
        if self.resident.is_some() {
            Some(self)
        } else {
            None
        }
    }
}

impl ResidentState for OrtSessionBox {
    fn location(&self) -> String {
        self.resident
            .as_ref()
            .map(|r| r.device.to_string())
            .unwrap_or_default()
    }

    fn set(&mut self, pairs: &[(String, String)], values: Vec<Tensor>) -> Result<(), BackendError> {
        let label = self.label.clone();
        let resident = self.resident.as_mut().expect("resident_state() checked");
        for (input, next) in pairs {
            let known_in = self.interface.inputs.iter().any(|p| &p.name == input);
            let known_out = self.interface.outputs.iter().any(|p| &p.name == next);
            if !known_in || !known_out {
                return Err(BackendError::Run {
                    backend: NAME,
                    model: label,
                    message: format!(
                        "state pair `{input}` -> `{next}` is not an input/output pair of the model"
                    ),
                });
            }
        }
        let current = values
            .into_iter()
            .map(|t| resident.upload(t))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| BackendError::Run {
                backend: NAME,
                model: label,
                message: format!("placing the state on {}: {e}", resident.device),
            })?;
        resident.pairs = pairs.to_vec();
        resident.current = current;
        resident.pending = None;
        Ok(())
    }

    fn run(
        &mut self,
        inputs: Vec<(String, Tensor)>,
    ) -> Result<Vec<(String, Tensor)>, BackendError> {
        let label = self.label.clone();
        let run_err = |e: ort::Error| BackendError::Run {
            backend: NAME,
            model: label.clone(),
            message: e.to_string(),
        };
        let resident = self.resident.as_mut().expect("resident_state() checked");
        let is_state = |name: &str| resident.pairs.iter().any(|(i, _)| i == name);
        let is_next = |name: &str| resident.pairs.iter().any(|(_, o)| o == name);
        // Check the host inputs against the interface, the state's inputs aside.
        let host_ports = Interface {
            inputs: self
                .interface
                .inputs
                .iter()
                .filter(|p| !is_state(&p.name))
                .cloned()
                .collect(),
            outputs: Vec::new(),
        };
        let inputs = host_ports.arrange(&label, inputs)?;
        let mut binding = self.session.create_binding().map_err(run_err)?;
        let mut held = Vec::with_capacity(inputs.len());
        for (name, t) in inputs {
            let v = to_ort(t).map_err(run_err)?;
            binding.bind_input(name.as_str(), &v).map_err(run_err)?;
            held.push(v);
        }
        for ((input, _), value) in resident.pairs.iter().zip(&resident.current) {
            binding.bind_input(input.as_str(), value).map_err(run_err)?;
        }
        let state_memory = resident.memory().map_err(run_err)?;
        let host_memory = MemoryInfo::new(
            AllocationDevice::CPU,
            0,
            AllocatorType::Device,
            MemoryType::Default,
        )
        .map_err(run_err)?;
        for port in &self.interface.outputs {
            let memory = if is_next(&port.name) {
                &state_memory
            } else {
                &host_memory
            };
            binding
                .bind_output_to_device(port.name.as_str(), memory)
                .map_err(run_err)?;
        }
        let mut outputs = self.session.run_binding(&binding).map_err(run_err)?;
        let missing = |name: &str| BackendError::Run {
            backend: NAME,
            model: label.clone(),
            message: format!("output `{name}` missing from the results"),
        };
        let mut pending = Vec::with_capacity(resident.pairs.len());
        for (_, next) in &resident.pairs {
            let v = outputs.remove(next.as_str()).ok_or_else(|| missing(next))?;
            pending.push(v.downcast::<DynTensorValueType>().map_err(run_err)?);
        }
        let mut host = Vec::new();
        for port in &self.interface.outputs {
            if is_next(&port.name) {
                continue;
            }
            let v = outputs
                .get(port.name.as_str())
                .ok_or_else(|| missing(&port.name))?;
            host.push((port.name.clone(), from_ort(v, &label)?));
        }
        drop(outputs);
        drop(held);
        resident.pending = Some(pending);
        Ok(host)
    }

    fn commit(&mut self) {
        if let Some(r) = self.resident.as_mut() {
            if let Some(p) = r.pending.take() {
                r.current = p;
            }
        }
    }

    fn discard(&mut self) {
        if let Some(r) = self.resident.as_mut() {
            r.pending = None;
        }
    }

    fn get(&self) -> Result<Vec<Tensor>, BackendError> {
        let Some(r) = self.resident.as_ref() else {
            return Ok(Vec::new());
        };
        let err = |e: ort::Error| BackendError::Run {
            backend: NAME,
            model: self.label.clone(),
            message: format!("copying the state from {}: {e}", r.device),
        };
        r.current
            .iter()
            .map(|v| match r.device {
                Device::Cpu => from_ort(v, &self.label),
                Device::Cuda(_) => {
                    let host = v.to(AllocationDevice::CPU, 0).map_err(err)?;
                    from_ort(&host, &self.label)
                }
            })
            .collect()
    }
}

fn to_ort_tensor(t: Tensor) -> Result<DynTensor, ort::Error> {
    use ort::value::Tensor as T;
    Ok(match t {
        Tensor::F32(a) => T::from_array(a)?.upcast(),
        Tensor::F64(a) => T::from_array(a)?.upcast(),
        Tensor::F16(a) => T::from_array(a)?.upcast(),
        Tensor::BF16(a) => T::from_array(a)?.upcast(),
        Tensor::I64(a) => T::from_array(a)?.upcast(),
        Tensor::I32(a) => T::from_array(a)?.upcast(),
        Tensor::I8(a) => T::from_array(a)?.upcast(),
        Tensor::U8(a) => T::from_array(a)?.upcast(),
        Tensor::Bool(a) => T::from_array(a)?.upcast(),
    })
}

fn to_ort(t: Tensor) -> Result<DynValue, ort::Error> {
    use ort::value::Tensor as T;
    Ok(match t {
        Tensor::F32(a) => T::from_array(a)?.into_dyn(),
        Tensor::F64(a) => T::from_array(a)?.into_dyn(),
        Tensor::F16(a) => T::from_array(a)?.into_dyn(),
        Tensor::BF16(a) => T::from_array(a)?.into_dyn(),
        Tensor::I64(a) => T::from_array(a)?.into_dyn(),
        Tensor::I32(a) => T::from_array(a)?.into_dyn(),
        Tensor::I8(a) => T::from_array(a)?.into_dyn(),
        Tensor::U8(a) => T::from_array(a)?.into_dyn(),
        Tensor::Bool(a) => T::from_array(a)?.into_dyn(),
    })
}

fn from_ort<M: ort::value::ValueTypeMarker + ?Sized>(
    v: &ort::value::Value<M>,
    label: &str,
) -> Result<Tensor, BackendError> {
    let v = v.view().into_dyn();
    from_ort_dyn(&v, label)
}

fn from_ort_dyn(v: &DynValue, label: &str) -> Result<Tensor, BackendError> {
    let ty = v.dtype().tensor_type();
    let err = |e: ort::Error| BackendError::Run {
        backend: NAME,
        model: label.to_string(),
        message: e.to_string(),
    };
    Ok(match ty {
        Some(TensorElementType::Float32) => {
            Tensor::F32(v.try_extract_array::<f32>().map_err(err)?.to_owned())
        }
        Some(TensorElementType::Float64) => {
            Tensor::F64(v.try_extract_array::<f64>().map_err(err)?.to_owned())
        }
        Some(TensorElementType::Float16) => {
            Tensor::F16(v.try_extract_array::<half::f16>().map_err(err)?.to_owned())
        }
        Some(TensorElementType::Bfloat16) => {
            Tensor::BF16(v.try_extract_array::<half::bf16>().map_err(err)?.to_owned())
        }
        Some(TensorElementType::Int64) => {
            Tensor::I64(v.try_extract_array::<i64>().map_err(err)?.to_owned())
        }
        Some(TensorElementType::Int32) => {
            Tensor::I32(v.try_extract_array::<i32>().map_err(err)?.to_owned())
        }
        Some(TensorElementType::Int8) => {
            Tensor::I8(v.try_extract_array::<i8>().map_err(err)?.to_owned())
        }
        Some(TensorElementType::Uint8) => {
            Tensor::U8(v.try_extract_array::<u8>().map_err(err)?.to_owned())
        }
        Some(TensorElementType::Bool) => {
            Tensor::Bool(v.try_extract_array::<bool>().map_err(err)?.to_owned())
        }
        other => {
            return Err(BackendError::UnsupportedType {
                backend: NAME,
                dtype: format!("{other:?}"),
            })
        }
    })
}
