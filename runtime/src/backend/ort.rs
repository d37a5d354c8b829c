//! The ONNX Runtime backend (the `ort` crate, library loaded at run time; see [`super::ort_lib`]).

use densa_exporter::Tensor;
use ort::session::Session as OrtSession;
use ort::value::{DynValue, TensorElementType};

use super::{decode_model, ort_lib, Backend, BackendError, BackendOptions, Interface, Session};

const NAME: &str = "ort";

/// The ONNX Runtime backend.
pub struct OrtBackend {
    threads: Option<usize>,
    environment: &'static ort::environment::Environment,
}

impl OrtBackend {
    /// Finds and loads the ONNX Runtime library (once per process).
    pub fn new(options: &BackendOptions) -> Result<OrtBackend, BackendError> {
        let environment = ort_lib::environment(options.allow_download)
            .map_err(|e| BackendError::OrtUnavailable(e.to_string()))?;
        Ok(OrtBackend {
            threads: options.threads,
            environment,
        })
    }
}

impl Backend for OrtBackend {
    fn name(&self) -> &'static str {
        NAME
    }

    fn load(&self, bytes: &[u8], label: &str) -> Result<Box<dyn Session>, BackendError> {
        let proto = decode_model(bytes, label, NAME)?;
        let interface = Interface::of(&proto);
        let fail = |e: String| BackendError::Load {
            backend: NAME,
            model: label.to_string(),
            message: e,
        };
        let mut builder = OrtSession::builder(self.environment).map_err(|e| fail(e.to_string()))?;
        if let Some(n) = self.threads {
            builder = builder
                .with_intra_threads(n)
                .map_err(|e| fail(e.to_string()))?;
        }
        let session = builder
            .commit_from_memory(bytes)
            .map_err(|e| fail(e.to_string()))?;
        Ok(Box::new(OrtSessionBox {
            label: label.to_string(),
            interface,
            session,
        }))
    }
}

struct OrtSessionBox {
    label: String,
    interface: Interface,
    session: OrtSession,
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

fn from_ort(v: &DynValue, label: &str) -> Result<Tensor, BackendError> {
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
