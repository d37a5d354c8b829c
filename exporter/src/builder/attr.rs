//! Helpers that make `AttributeProto`s.

use crate::onnx::{AttributeProto, AttributeType, TensorProto};

/// An `INT` attribute.
pub fn int(name: &str, v: i64) -> AttributeProto {
    AttributeProto {
        name: name.into(),
        r#type: AttributeType::Int as i32,
        i: v,
        ..Default::default()
    }
}

/// An `INTS` attribute.
pub fn ints(name: &str, v: &[i64]) -> AttributeProto {
    AttributeProto {
        name: name.into(),
        r#type: AttributeType::Ints as i32,
        ints: v.to_vec(),
        ..Default::default()
    }
}

/// A `FLOAT` attribute.
pub fn float(name: &str, v: f32) -> AttributeProto {
    AttributeProto {
        name: name.into(),
        r#type: AttributeType::Float as i32,
        f: v,
        ..Default::default()
    }
}

/// A `FLOATS` attribute.
pub fn floats(name: &str, v: &[f32]) -> AttributeProto {
    AttributeProto {
        name: name.into(),
        r#type: AttributeType::Floats as i32,
        floats: v.to_vec(),
        ..Default::default()
    }
}

/// A `STRING` attribute.
pub fn string(name: &str, v: &str) -> AttributeProto {
    AttributeProto {
        name: name.into(),
        r#type: AttributeType::String as i32,
        s: v.as_bytes().to_vec(),
        ..Default::default()
    }
}

/// A `TENSOR` attribute.
pub fn tensor(name: &str, t: TensorProto) -> AttributeProto {
    AttributeProto {
        name: name.into(),
        r#type: AttributeType::Tensor as i32,
        t: Some(t),
        ..Default::default()
    }
}

/// Finds attribute `name` of a node.
pub fn find<'a>(attrs: &'a [AttributeProto], name: &str) -> Option<&'a AttributeProto> {
    attrs.iter().find(|a| a.name == name)
}

/// Reads an `INT` attribute, with a default.
pub fn get_int(attrs: &[AttributeProto], name: &str, default: i64) -> i64 {
    find(attrs, name).map(|a| a.i).unwrap_or(default)
}

/// Reads a `FLOAT` attribute, with a default.
pub fn get_float(attrs: &[AttributeProto], name: &str, default: f32) -> f32 {
    find(attrs, name).map(|a| a.f).unwrap_or(default)
}

/// Reads an `INTS` attribute, if present.
pub fn get_ints<'a>(attrs: &'a [AttributeProto], name: &str) -> Option<&'a [i64]> {
    find(attrs, name).map(|a| a.ints.as_slice())
}

/// Reads a `STRING` attribute, if present.
pub fn get_string(attrs: &[AttributeProto], name: &str) -> Option<String> {
    find(attrs, name).map(|a| String::from_utf8_lossy(&a.s).into_owned())
}
