//! Host tensors: the values densa moves between files, graphs and backends.
//!
//! A [`Tensor`] is an `ndarray` array of one of the element types densa handles. It converts to
//! and from ONNX `TensorProto` (initializers, constants) so the same value can be an initializer
//! in a graph, an entry of a safetensors file or an input of a backend.

use half::{bf16, f16};
use ndarray::{ArrayD, IxDyn};

use crate::onnx::{DataLocation, DataType, TensorProto};

/// Element types densa handles.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DType {
    F32,
    F64,
    F16,
    BF16,
    I64,
    I32,
    I8,
    U8,
    Bool,
}

impl DType {
    /// The ONNX `TensorProto.DataType` of this element type.
    pub fn onnx(self) -> DataType {
        match self {
            DType::F32 => DataType::Float,
            DType::F64 => DataType::Double,
            DType::F16 => DataType::Float16,
            DType::BF16 => DataType::Bfloat16,
            DType::I64 => DataType::Int64,
            DType::I32 => DataType::Int32,
            DType::I8 => DataType::Int8,
            DType::U8 => DataType::Uint8,
            DType::Bool => DataType::Bool,
        }
    }

    /// The element type of an ONNX data type code, if densa handles it.
    pub fn from_onnx(code: i32) -> Option<DType> {
        Some(match DataType::try_from(code).ok()? {
            DataType::Float => DType::F32,
            DataType::Double => DType::F64,
            DataType::Float16 => DType::F16,
            DataType::Bfloat16 => DType::BF16,
            DataType::Int64 => DType::I64,
            DataType::Int32 => DType::I32,
            DataType::Int8 => DType::I8,
            DataType::Uint8 => DType::U8,
            DataType::Bool => DType::Bool,
            _ => return None,
        })
    }

    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            DType::F64 | DType::I64 => 8,
            DType::F32 | DType::I32 => 4,
            DType::F16 | DType::BF16 => 2,
            DType::I8 | DType::U8 | DType::Bool => 1,
        }
    }

    /// Lower-case name as numpy spells it (`float32`, `int64`...).
    pub fn name(self) -> &'static str {
        match self {
            DType::F32 => "float32",
            DType::F64 => "float64",
            DType::F16 => "float16",
            DType::BF16 => "bfloat16",
            DType::I64 => "int64",
            DType::I32 => "int32",
            DType::I8 => "int8",
            DType::U8 => "uint8",
            DType::Bool => "bool",
        }
    }

    /// Whether the type is a floating-point type.
    pub fn is_float(self) -> bool {
        matches!(self, DType::F32 | DType::F64 | DType::F16 | DType::BF16)
    }
}

impl std::fmt::Display for DType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// A host tensor of any element type densa handles.
#[derive(Clone, Debug, PartialEq)]
pub enum Tensor {
    F32(ArrayD<f32>),
    F64(ArrayD<f64>),
    F16(ArrayD<f16>),
    BF16(ArrayD<bf16>),
    I64(ArrayD<i64>),
    I32(ArrayD<i32>),
    I8(ArrayD<i8>),
    U8(ArrayD<u8>),
    Bool(ArrayD<bool>),
}

/// Why a `TensorProto` could not become a [`Tensor`].
#[derive(Debug, thiserror::Error)]
pub enum TensorError {
    #[error("tensor `{name}`: unsupported data type {code}")]
    UnsupportedType { name: String, code: i32 },
    #[error("tensor `{name}`: {got} bytes of data for shape {shape:?} of {dtype} ({expected} bytes expected)")]
    SizeMismatch {
        name: String,
        shape: Vec<usize>,
        dtype: DType,
        expected: usize,
        got: usize,
    },
    #[error("tensor `{name}`: negative dimension in {dims:?}")]
    NegativeDim { name: String, dims: Vec<i64> },
    #[error("tensor `{name}`: data is stored externally; load the model with its external data")]
    External { name: String },
}

macro_rules! each_variant {
    ($t:expr, $a:ident => $body:expr) => {
        match $t {
            Tensor::F32($a) => $body,
            Tensor::F64($a) => $body,
            Tensor::F16($a) => $body,
            Tensor::BF16($a) => $body,
            Tensor::I64($a) => $body,
            Tensor::I32($a) => $body,
            Tensor::I8($a) => $body,
            Tensor::U8($a) => $body,
            Tensor::Bool($a) => $body,
        }
    };
}

impl Tensor {
    /// The element type.
    pub fn dtype(&self) -> DType {
        match self {
            Tensor::F32(_) => DType::F32,
            Tensor::F64(_) => DType::F64,
            Tensor::F16(_) => DType::F16,
            Tensor::BF16(_) => DType::BF16,
            Tensor::I64(_) => DType::I64,
            Tensor::I32(_) => DType::I32,
            Tensor::I8(_) => DType::I8,
            Tensor::U8(_) => DType::U8,
            Tensor::Bool(_) => DType::Bool,
        }
    }

    /// The shape.
    pub fn shape(&self) -> &[usize] {
        each_variant!(self, a => a.shape())
    }

    /// Number of elements.
    pub fn len(&self) -> usize {
        each_variant!(self, a => a.len())
    }

    /// Whether the tensor has no elements.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// A zero-filled tensor.
    pub fn zeros(dtype: DType, shape: &[usize]) -> Tensor {
        let s = IxDyn(shape);
        match dtype {
            DType::F32 => Tensor::F32(ArrayD::zeros(s)),
            DType::F64 => Tensor::F64(ArrayD::zeros(s)),
            DType::F16 => Tensor::F16(ArrayD::from_elem(s, f16::ZERO)),
            DType::BF16 => Tensor::BF16(ArrayD::from_elem(s, bf16::ZERO)),
            DType::I64 => Tensor::I64(ArrayD::zeros(s)),
            DType::I32 => Tensor::I32(ArrayD::zeros(s)),
            DType::I8 => Tensor::I8(ArrayD::zeros(s)),
            DType::U8 => Tensor::U8(ArrayD::zeros(s)),
            DType::Bool => Tensor::Bool(ArrayD::from_elem(s, false)),
        }
    }

    /// The values as `f32` (floating and integer types are converted; bool becomes 0/1).
    pub fn to_f32(&self) -> ArrayD<f32> {
        match self {
            Tensor::F32(a) => a.clone(),
            Tensor::F64(a) => a.mapv(|v| v as f32),
            Tensor::F16(a) => a.mapv(f32::from),
            Tensor::BF16(a) => a.mapv(f32::from),
            Tensor::I64(a) => a.mapv(|v| v as f32),
            Tensor::I32(a) => a.mapv(|v| v as f32),
            Tensor::I8(a) => a.mapv(f32::from),
            Tensor::U8(a) => a.mapv(f32::from),
            Tensor::Bool(a) => a.mapv(|v| v as u8 as f32),
        }
    }

    /// Borrow as `f32`, when that is the element type.
    pub fn as_f32(&self) -> Option<&ArrayD<f32>> {
        match self {
            Tensor::F32(a) => Some(a),
            _ => None,
        }
    }

    /// The values in row-major order as little-endian bytes.
    pub fn to_le_bytes(&self) -> Vec<u8> {
        fn bytes<T: Copy, const N: usize>(a: &ArrayD<T>, f: impl Fn(T) -> [u8; N]) -> Vec<u8> {
            let mut out = Vec::with_capacity(a.len() * N);
            for v in a.iter() {
                out.extend_from_slice(&f(*v));
            }
            out
        }
        match self {
            Tensor::F32(a) => bytes(a, f32::to_le_bytes),
            Tensor::F64(a) => bytes(a, f64::to_le_bytes),
            Tensor::F16(a) => bytes(a, f16::to_le_bytes),
            Tensor::BF16(a) => bytes(a, bf16::to_le_bytes),
            Tensor::I64(a) => bytes(a, i64::to_le_bytes),
            Tensor::I32(a) => bytes(a, i32::to_le_bytes),
            Tensor::I8(a) => bytes(a, i8::to_le_bytes),
            Tensor::U8(a) => bytes(a, u8::to_le_bytes),
            Tensor::Bool(a) => bytes(a, |v: bool| [v as u8]),
        }
    }

    /// Build a tensor from row-major little-endian bytes. `None` when the length is wrong.
    pub fn from_le_bytes(dtype: DType, shape: &[usize], data: &[u8]) -> Option<Tensor> {
        let count: usize = shape.iter().product();
        if data.len() != count * dtype.size() {
            return None;
        }
        fn collect<T, const N: usize>(
            shape: &[usize],
            data: &[u8],
            f: impl Fn([u8; N]) -> T,
        ) -> ArrayD<T> {
            let v: Vec<T> = data
                .chunks_exact(N)
                .map(|c| f(c.try_into().expect("chunks_exact yields N bytes")))
                .collect();
            ArrayD::from_shape_vec(IxDyn(shape), v).expect("length checked above")
        }
        Some(match dtype {
            DType::F32 => Tensor::F32(collect(shape, data, f32::from_le_bytes)),
            DType::F64 => Tensor::F64(collect(shape, data, f64::from_le_bytes)),
            DType::F16 => Tensor::F16(collect(shape, data, f16::from_le_bytes)),
            DType::BF16 => Tensor::BF16(collect(shape, data, bf16::from_le_bytes)),
            DType::I64 => Tensor::I64(collect(shape, data, i64::from_le_bytes)),
            DType::I32 => Tensor::I32(collect(shape, data, i32::from_le_bytes)),
            DType::I8 => Tensor::I8(collect(shape, data, i8::from_le_bytes)),
            DType::U8 => Tensor::U8(collect(shape, data, u8::from_le_bytes)),
            DType::Bool => Tensor::Bool(collect(shape, data, |b: [u8; 1]| b[0] != 0)),
        })
    }

    /// As an ONNX `TensorProto` named `name`, data in `raw_data`.
    pub fn to_proto(&self, name: &str) -> TensorProto {
        TensorProto {
            name: name.to_string(),
            dims: self.shape().iter().map(|&d| d as i64).collect(),
            data_type: self.dtype().onnx() as i32,
            raw_data: self.to_le_bytes(),
            ..Default::default()
        }
    }

    /// Decode an ONNX `TensorProto` (raw or typed data fields).
    pub fn from_proto(p: &TensorProto) -> Result<Tensor, TensorError> {
        let name = p.name.clone();
        if p.data_location == DataLocation::External as i32 {
            return Err(TensorError::External { name });
        }
        let dtype = DType::from_onnx(p.data_type).ok_or_else(|| TensorError::UnsupportedType {
            name: name.clone(),
            code: p.data_type,
        })?;
        if p.dims.iter().any(|&d| d < 0) {
            return Err(TensorError::NegativeDim {
                name,
                dims: p.dims.clone(),
            });
        }
        let shape: Vec<usize> = p.dims.iter().map(|&d| d as usize).collect();
        let count: usize = shape.iter().product();
        let mismatch = |got: usize| TensorError::SizeMismatch {
            name: p.name.clone(),
            shape: shape.clone(),
            dtype,
            expected: count * dtype.size(),
            got,
        };
        if !p.raw_data.is_empty() || count == 0 {
            return Tensor::from_le_bytes(dtype, &shape, &p.raw_data)
                .ok_or_else(|| mismatch(p.raw_data.len()));
        }
        // Typed fields, as the ONNX specification assigns them per data type.
        let arr = |len: usize| -> Result<IxDyn, TensorError> {
            if len == count {
                Ok(IxDyn(&shape))
            } else {
                Err(mismatch(len * dtype.size()))
            }
        };
        Ok(match dtype {
            DType::F32 => Tensor::F32(
                ArrayD::from_shape_vec(arr(p.float_data.len())?, p.float_data.clone())
                    .expect("checked"),
            ),
            DType::F64 => Tensor::F64(
                ArrayD::from_shape_vec(arr(p.double_data.len())?, p.double_data.clone())
                    .expect("checked"),
            ),
            DType::I64 => Tensor::I64(
                ArrayD::from_shape_vec(arr(p.int64_data.len())?, p.int64_data.clone())
                    .expect("checked"),
            ),
            // int32, int8, uint8, bool, float16 and bfloat16 all live in int32_data.
            DType::I32 => Tensor::I32(
                ArrayD::from_shape_vec(arr(p.int32_data.len())?, p.int32_data.clone())
                    .expect("checked"),
            ),
            DType::I8 => Tensor::I8(
                ArrayD::from_shape_vec(
                    arr(p.int32_data.len())?,
                    p.int32_data.iter().map(|&v| v as i8).collect(),
                )
                .expect("checked"),
            ),
            DType::U8 => Tensor::U8(
                ArrayD::from_shape_vec(
                    arr(p.int32_data.len())?,
                    p.int32_data.iter().map(|&v| v as u8).collect(),
                )
                .expect("checked"),
            ),
            DType::Bool => Tensor::Bool(
                ArrayD::from_shape_vec(
                    arr(p.int32_data.len())?,
                    p.int32_data.iter().map(|&v| v != 0).collect(),
                )
                .expect("checked"),
            ),
            DType::F16 => Tensor::F16(
                ArrayD::from_shape_vec(
                    arr(p.int32_data.len())?,
                    p.int32_data
                        .iter()
                        .map(|&v| f16::from_bits(v as u16))
                        .collect(),
                )
                .expect("checked"),
            ),
            DType::BF16 => Tensor::BF16(
                ArrayD::from_shape_vec(
                    arr(p.int32_data.len())?,
                    p.int32_data
                        .iter()
                        .map(|&v| bf16::from_bits(v as u16))
                        .collect(),
                )
                .expect("checked"),
            ),
        })
    }
}

macro_rules! impl_from_array {
    ($($t:ty => $v:ident),*) => {$(
        impl From<ArrayD<$t>> for Tensor {
            fn from(a: ArrayD<$t>) -> Tensor { Tensor::$v(a) }
        }
    )*};
}
impl_from_array!(f32 => F32, f64 => F64, f16 => F16, bf16 => BF16, i64 => I64, i32 => I32,
    i8 => I8, u8 => U8, bool => Bool);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proto_round_trip_every_type() {
        let tensors = vec![
            Tensor::F32(ArrayD::from_shape_vec(IxDyn(&[2, 2]), vec![1.0, -2.5, 3.0, 0.0]).unwrap()),
            Tensor::I64(ArrayD::from_shape_vec(IxDyn(&[3]), vec![1, -7, i64::MAX]).unwrap()),
            Tensor::Bool(ArrayD::from_shape_vec(IxDyn(&[2]), vec![true, false]).unwrap()),
            Tensor::F16(ArrayD::from_shape_vec(IxDyn(&[1]), vec![f16::from_f32(0.5)]).unwrap()),
            Tensor::U8(ArrayD::from_shape_vec(IxDyn(&[]), vec![200]).unwrap()),
        ];
        for t in tensors {
            let back = Tensor::from_proto(&t.to_proto("x")).unwrap();
            assert_eq!(back, t);
        }
    }

    #[test]
    fn typed_fields_decode() {
        let p = TensorProto {
            name: "w".into(),
            dims: vec![2],
            data_type: DataType::Float as i32,
            float_data: vec![1.5, 2.5],
            ..Default::default()
        };
        assert_eq!(
            Tensor::from_proto(&p).unwrap().to_f32().as_slice().unwrap(),
            &[1.5, 2.5]
        );
    }

    #[test]
    fn wrong_size_is_an_error_naming_the_tensor() {
        let p = TensorProto {
            name: "bad".into(),
            dims: vec![3],
            data_type: DataType::Float as i32,
            raw_data: vec![0; 8],
            ..Default::default()
        };
        let e = Tensor::from_proto(&p).unwrap_err().to_string();
        assert!(
            e.contains("`bad`") && e.contains("12 bytes expected"),
            "{e}"
        );
    }
}
