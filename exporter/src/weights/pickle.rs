//! A restricted unpickler for PyTorch checkpoints.
//!
//! Python's `pickle` is a small stack machine whose `GLOBAL` + `REDUCE` opcodes call any
//! importable function, which is why loading an untrusted `.pth` with `torch.load` (before
//! `weights_only=True`) runs arbitrary code. This machine calls nothing: `GLOBAL` resolves only
//! an allow-list of what `torch.save` emits for tensors and containers (`collections.OrderedDict`,
//! `torch._utils._rebuild_tensor_v2`, `_rebuild_parameter`, the typed storages, `torch.Size`),
//! and `REDUCE` interprets those few by hand. Any other global is refused with its name.
//!
//! Objects live in an arena and the stack and memo hold indices, so the memo shares identity as
//! Python's does (a dict memoised before its `SETITEMS` is the same dict afterwards). The result
//! is then copied out into a [`PickleValue`] tree, within budgets: a pickle can reference one
//! object many times or build cycles, and a few bytes must not expand into unbounded memory.

use std::collections::HashMap;
use std::path::Path;

use super::WeightsError;
use crate::tensor::{DType, Tensor};

/// A value read from a checkpoint's pickle.
#[derive(Clone, Debug, PartialEq)]
pub enum PickleValue {
    None,
    Bool(bool),
    Int(i64),
    /// An integer beyond `i64`, as little-endian two's-complement bytes.
    BigInt(Vec<u8>),
    Float(f64),
    Str(String),
    Bytes(Vec<u8>),
    List(Vec<PickleValue>),
    Tuple(Vec<PickleValue>),
    /// A `dict` or `OrderedDict`, in insertion order.
    Dict(Vec<(PickleValue, PickleValue)>),
    /// A tensor or `nn.Parameter`, rebuilt from its storage.
    Tensor(Tensor),
    /// An allowed class or function named but not called, e.g. `torch.FloatStorage`.
    Global(String),
    /// A storage referenced without a tensor viewing it.
    Storage {
        key: String,
        storage_type: String,
        len: usize,
    },
}

impl PickleValue {
    /// What the value is, for messages (`dict`, `tensor`...).
    pub fn kind(&self) -> &'static str {
        match self {
            PickleValue::None => "None",
            PickleValue::Bool(_) => "bool",
            PickleValue::Int(_) | PickleValue::BigInt(_) => "int",
            PickleValue::Float(_) => "float",
            PickleValue::Str(_) => "str",
            PickleValue::Bytes(_) => "bytes",
            PickleValue::List(_) => "list",
            PickleValue::Tuple(_) => "tuple",
            PickleValue::Dict(_) => "dict",
            PickleValue::Tensor(_) => "tensor",
            PickleValue::Global(_) => "global",
            PickleValue::Storage { .. } => "storage",
        }
    }

    /// The value of a dict under the string key `key`.
    pub fn get(&self, key: &str) -> Option<&PickleValue> {
        self.as_dict()?
            .iter()
            .find(|(k, _)| k.as_str() == Some(key))
            .map(|(_, v)| v)
    }

    /// Removes and returns the value of a dict under the string key `key`.
    pub fn take(&mut self, key: &str) -> Option<PickleValue> {
        let PickleValue::Dict(items) = self else {
            return None;
        };
        let i = items.iter().position(|(k, _)| k.as_str() == Some(key))?;
        Some(items.remove(i).1)
    }

    /// The entries, when the value is a dict.
    pub fn as_dict(&self) -> Option<&[(PickleValue, PickleValue)]> {
        match self {
            PickleValue::Dict(items) => Some(items),
            _ => None,
        }
    }

    /// The string, when the value is one.
    pub fn as_str(&self) -> Option<&str> {
        match self {
            PickleValue::Str(s) => Some(s),
            _ => None,
        }
    }

    /// The integer, when the value is one that fits `i64`.
    pub fn as_int(&self) -> Option<i64> {
        match self {
            PickleValue::Int(i) => Some(*i),
            _ => None,
        }
    }

    /// The tensor, when the value is one.
    pub fn as_tensor(&self) -> Option<&Tensor> {
        match self {
            PickleValue::Tensor(t) => Some(t),
            _ => None,
        }
    }
}

/// The element type of a torch typed storage (`torch.FloatStorage`...).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum StorageKind {
    F32,
    F64,
    F16,
    BF16,
    I64,
    I32,
    I16,
    I8,
    U8,
    Bool,
}

impl StorageKind {
    const ALL: [StorageKind; 10] = [
        StorageKind::F32,
        StorageKind::F64,
        StorageKind::F16,
        StorageKind::BF16,
        StorageKind::I64,
        StorageKind::I32,
        StorageKind::I16,
        StorageKind::I8,
        StorageKind::U8,
        StorageKind::Bool,
    ];

    /// The class name in module `torch`.
    pub fn torch_name(self) -> &'static str {
        match self {
            StorageKind::F32 => "FloatStorage",
            StorageKind::F64 => "DoubleStorage",
            StorageKind::F16 => "HalfStorage",
            StorageKind::BF16 => "BFloat16Storage",
            StorageKind::I64 => "LongStorage",
            StorageKind::I32 => "IntStorage",
            StorageKind::I16 => "ShortStorage",
            StorageKind::I8 => "CharStorage",
            StorageKind::U8 => "ByteStorage",
            StorageKind::Bool => "BoolStorage",
        }
    }

    /// Bytes per element in the archive.
    pub fn elem_size(self) -> usize {
        match self {
            StorageKind::F64 | StorageKind::I64 => 8,
            StorageKind::F32 | StorageKind::I32 => 4,
            StorageKind::F16 | StorageKind::BF16 | StorageKind::I16 => 2,
            StorageKind::I8 | StorageKind::U8 | StorageKind::Bool => 1,
        }
    }

    /// The element type of the tensors read from it; `int16`, which densa lacks, widens to
    /// `int32`.
    pub fn dtype(self) -> Option<DType> {
        match self {
            StorageKind::F32 => Some(DType::F32),
            StorageKind::F64 => Some(DType::F64),
            StorageKind::F16 => Some(DType::F16),
            StorageKind::BF16 => Some(DType::BF16),
            StorageKind::I64 => Some(DType::I64),
            StorageKind::I32 => Some(DType::I32),
            StorageKind::I16 => None,
            StorageKind::I8 => Some(DType::I8),
            StorageKind::U8 => Some(DType::U8),
            StorageKind::Bool => Some(DType::Bool),
        }
    }
}

/// A storage as a checkpoint's persistent id names it: `data/<key>`, `len` elements.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct StorageRef {
    pub key: String,
    pub kind: StorageKind,
    pub len: usize,
}

/// Where the unpickler gets tensor data: the archive around the pickle.
pub(crate) trait TensorSource {
    /// The tensor of `size` and `stride` (in elements) at `offset` in `storage`, as
    /// `torch._utils._rebuild_tensor_v2` builds it.
    fn rebuild(
        &mut self,
        storage: &StorageRef,
        offset: usize,
        size: &[usize],
        stride: &[usize],
    ) -> Result<Tensor, WeightsError>;
}

/// The globals this unpickler accepts; everything else is refused.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Global {
    OrderedDict,
    RebuildTensor,
    RebuildTensorV2,
    RebuildParameter,
    RebuildParameterWithState,
    TorchSize,
    Storage(StorageKind),
}

impl Global {
    fn resolve(module: &str, name: &str) -> Option<Global> {
        Some(match (module, name) {
            ("collections", "OrderedDict") => Global::OrderedDict,
            ("torch._utils", "_rebuild_tensor") => Global::RebuildTensor,
            ("torch._utils", "_rebuild_tensor_v2") => Global::RebuildTensorV2,
            ("torch._utils", "_rebuild_parameter") => Global::RebuildParameter,
            ("torch._utils", "_rebuild_parameter_with_state") => Global::RebuildParameterWithState,
            ("torch", "Size") => Global::TorchSize,
            ("torch", storage) => Global::Storage(
                StorageKind::ALL
                    .into_iter()
                    .find(|k| k.torch_name() == storage)?,
            ),
            _ => return None,
        })
    }

    fn name(self) -> String {
        match self {
            Global::OrderedDict => "collections.OrderedDict".into(),
            Global::RebuildTensor => "torch._utils._rebuild_tensor".into(),
            Global::RebuildTensorV2 => "torch._utils._rebuild_tensor_v2".into(),
            Global::RebuildParameter => "torch._utils._rebuild_parameter".into(),
            Global::RebuildParameterWithState => {
                "torch._utils._rebuild_parameter_with_state".into()
            }
            Global::TorchSize => "torch.Size".into(),
            Global::Storage(kind) => format!("torch.{}", kind.torch_name()),
        }
    }
}

type Id = usize;

/// Dict keys as Python compares them, for the types checkpoints use; others by identity.
#[derive(Debug, Hash, PartialEq, Eq)]
enum DictKey {
    Int(i64),
    Str(String),
    Identity(Id),
}

#[derive(Debug, Default)]
struct DictNode {
    items: Vec<(Id, Id)>,
    index: HashMap<DictKey, usize>,
}

#[derive(Debug)]
enum Node {
    None,
    Bool(bool),
    Int(i64),
    BigInt(Vec<u8>),
    Float(f64),
    Str(String),
    Bytes(Vec<u8>),
    List(Vec<Id>),
    Tuple(Vec<Id>),
    Dict(DictNode),
    Tensor(Tensor),
    Global(Global),
    Storage(StorageRef),
}

impl Node {
    fn kind(&self) -> &'static str {
        match self {
            Node::None => "None",
            Node::Bool(_) => "bool",
            Node::Int(_) | Node::BigInt(_) => "int",
            Node::Float(_) => "float",
            Node::Str(_) => "str",
            Node::Bytes(_) => "bytes",
            Node::List(_) => "list",
            Node::Tuple(_) => "tuple",
            Node::Dict(_) => "dict",
            Node::Tensor(_) => "tensor",
            Node::Global(_) => "global",
            Node::Storage(_) => "storage",
        }
    }

    /// Bytes a copy of the value's payload costs (for the expansion budget).
    fn payload_bytes(&self) -> usize {
        match self {
            Node::Str(s) => s.len(),
            Node::Bytes(b) | Node::BigInt(b) => b.len(),
            Node::Tensor(t) => t.len() * t.dtype().size(),
            _ => 0,
        }
    }
}

/// Deeper nesting than this is refused (also what stops a self-referencing list).
const MAX_DEPTH: usize = 100;
/// Copies of shared payloads beyond twice the payload present, plus this, are refused.
const SHARED_COPY_SLACK: usize = 64 << 20;

/// Runs the pickle `data` (from `path`, named in errors) and returns the object it builds.
pub(crate) fn unpickle(
    data: &[u8],
    path: &Path,
    tensors: &mut dyn TensorSource,
) -> Result<PickleValue, WeightsError> {
    let mut machine = Machine {
        path,
        data,
        pos: 0,
        op_start: 0,
        ops: 0,
        arena: Vec::new(),
        stack: Vec::new(),
        marks: Vec::new(),
        memo: HashMap::new(),
        tensors,
    };
    let root = machine.run()?;
    machine.into_value(root)
}

struct Machine<'a> {
    path: &'a Path,
    data: &'a [u8],
    pos: usize,
    /// Where the opcode being run starts (for error messages).
    op_start: usize,
    ops: usize,
    arena: Vec<Node>,
    stack: Vec<Id>,
    /// Stack heights at each open MARK.
    marks: Vec<usize>,
    memo: HashMap<u32, Id>,
    tensors: &'a mut dyn TensorSource,
}

impl<'a> Machine<'a> {
    fn err(&self, message: impl Into<String>) -> WeightsError {
        WeightsError::Pickle {
            path: self.path.to_path_buf(),
            offset: self.op_start,
            message: message.into(),
        }
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], WeightsError> {
        if n > self.data.len() - self.pos {
            return Err(self.err(format!(
                "an operand of {n} bytes runs past the end of the pickle ({} bytes left)",
                self.data.len() - self.pos
            )));
        }
        let data: &'a [u8] = self.data;
        let bytes = &data[self.pos..self.pos + n];
        self.pos += n;
        Ok(bytes)
    }

    fn take_array<const N: usize>(&mut self) -> Result<[u8; N], WeightsError> {
        Ok(self.take(N)?.try_into().expect("N bytes"))
    }

    fn u8(&mut self) -> Result<u8, WeightsError> {
        Ok(self.take_array::<1>()?[0])
    }

    fn u32(&mut self) -> Result<u32, WeightsError> {
        Ok(u32::from_le_bytes(self.take_array()?))
    }

    fn len_u64(&mut self) -> Result<usize, WeightsError> {
        let n = u64::from_le_bytes(self.take_array()?);
        // Anything that does not fit usize cannot fit the pickle either; take() reports it.
        Ok(usize::try_from(n).unwrap_or(usize::MAX))
    }

    fn line(&mut self) -> Result<String, WeightsError> {
        let data: &'a [u8] = self.data;
        let rest = &data[self.pos..];
        let Some(end) = rest.iter().position(|&b| b == b'\n') else {
            return Err(self.err("GLOBAL operand without a newline"));
        };
        let text = std::str::from_utf8(&rest[..end])
            .map_err(|_| self.err("GLOBAL operand is not UTF-8"))?
            .to_string();
        self.pos += end + 1;
        Ok(text)
    }

    fn string(&mut self, n: usize) -> Result<Node, WeightsError> {
        let bytes = self.take(n)?;
        match std::str::from_utf8(bytes) {
            Ok(s) => Ok(Node::Str(s.to_string())),
            Err(_) => Err(self.err("a string is not valid UTF-8")),
        }
    }

    fn push(&mut self, node: Node) {
        self.arena.push(node);
        self.stack.push(self.arena.len() - 1);
    }

    fn pop(&mut self) -> Result<Id, WeightsError> {
        if self.stack.len() <= self.marks.last().copied().unwrap_or(0) {
            return Err(self.err("stack underflow"));
        }
        Ok(self.stack.pop().expect("checked above"))
    }

    fn top(&self) -> Result<Id, WeightsError> {
        if self.stack.len() <= self.marks.last().copied().unwrap_or(0) {
            return Err(self.err("stack underflow"));
        }
        Ok(*self.stack.last().expect("checked above"))
    }

    fn pop_mark(&mut self) -> Result<Vec<Id>, WeightsError> {
        let Some(mark) = self.marks.pop() else {
            return Err(self.err("no MARK to pop to"));
        };
        Ok(self.stack.split_off(mark))
    }

    fn memo_put(&mut self, index: u32) -> Result<(), WeightsError> {
        let id = self.top()?;
        self.memo.insert(index, id);
        Ok(())
    }

    fn memo_get(&mut self, index: u32) -> Result<(), WeightsError> {
        let Some(&id) = self.memo.get(&index) else {
            return Err(self.err(format!("memo entry {index} is read before it is written")));
        };
        self.stack.push(id);
        Ok(())
    }

    fn tuple_items(&self, id: Id, what: &str) -> Result<Vec<Id>, WeightsError> {
        match &self.arena[id] {
            Node::Tuple(items) | Node::List(items) => Ok(items.clone()),
            other => Err(self.err(format!(
                "{what}: expected a tuple, found a {}",
                other.kind()
            ))),
        }
    }

    fn int(&self, id: Id, what: &str) -> Result<i64, WeightsError> {
        match &self.arena[id] {
            Node::Int(i) => Ok(*i),
            other => Err(self.err(format!("{what}: expected an int, found a {}", other.kind()))),
        }
    }

    fn usize_list(&self, id: Id, what: &str) -> Result<Vec<usize>, WeightsError> {
        self.tuple_items(id, what)?
            .into_iter()
            .map(|i| {
                let v = self.int(i, what)?;
                usize::try_from(v).map_err(|_| self.err(format!("{what}: negative value {v}")))
            })
            .collect()
    }

    fn dict_key(&self, id: Id) -> DictKey {
        match &self.arena[id] {
            Node::Int(i) => DictKey::Int(*i),
            Node::Bool(b) => DictKey::Int(*b as i64),
            Node::Str(s) => DictKey::Str(s.clone()),
            _ => DictKey::Identity(id),
        }
    }

    fn set_items(&mut self, dict: Id, pairs: &[Id]) -> Result<(), WeightsError> {
        if !pairs.len().is_multiple_of(2) {
            return Err(self.err("SETITEMS with an odd number of items"));
        }
        for pair in pairs.chunks_exact(2) {
            let key = self.dict_key(pair[0]);
            let Node::Dict(d) = &mut self.arena[dict] else {
                let kind = self.arena[dict].kind();
                return Err(self.err(format!("SETITEM on a {kind}, not a dict")));
            };
            match d.index.get(&key) {
                Some(&i) => d.items[i] = (pair[0], pair[1]),
                None => {
                    d.index.insert(key, d.items.len());
                    d.items.push((pair[0], pair[1]));
                }
            }
        }
        Ok(())
    }

    fn append(&mut self, list: Id, items: Vec<Id>) -> Result<(), WeightsError> {
        match &mut self.arena[list] {
            Node::List(l) => {
                l.extend(items);
                Ok(())
            }
            other => {
                let kind = other.kind();
                Err(self.err(format!("APPEND on a {kind}, not a list")))
            }
        }
    }

    fn global(&mut self, module: &str, name: &str) -> Result<(), WeightsError> {
        match Global::resolve(module, name) {
            Some(g) => {
                self.push(Node::Global(g));
                Ok(())
            }
            None if module == "torch" && name.ends_with("Storage") => {
                Err(WeightsError::UnsupportedStorage {
                    path: self.path.to_path_buf(),
                    storage_type: format!("{module}.{name}"),
                })
            }
            None => Err(WeightsError::ForbiddenGlobal {
                path: self.path.to_path_buf(),
                global: format!("{module}.{name}"),
            }),
        }
    }

    /// A persistent id, which torch uses only for storages:
    /// `("storage", torch.<Type>Storage, key, location, numel)`.
    fn persistent_load(&mut self, pid: Id) -> Result<Node, WeightsError> {
        let parts = self.tuple_items(pid, "persistent id")?;
        let [tag, storage_type, key, _location, len] = parts[..] else {
            return Err(self.err(format!(
                "persistent id of {} items, expected 5",
                parts.len()
            )));
        };
        if !matches!(&self.arena[tag], Node::Str(s) if s == "storage") {
            return Err(self.err("persistent id is not a storage"));
        }
        let Node::Global(Global::Storage(kind)) = self.arena[storage_type] else {
            return Err(self.err("persistent id without a storage type"));
        };
        let Node::Str(key) = &self.arena[key] else {
            return Err(self.err("persistent id: the storage key is not a string"));
        };
        let len = self.int(len, "storage length")?;
        let len = usize::try_from(len).map_err(|_| self.err("negative storage length"))?;
        Ok(Node::Storage(StorageRef {
            key: key.clone(),
            kind,
            len,
        }))
    }

    /// `callable(*args)` for the allowed callables.
    fn reduce(&mut self, callable: Id, args: Id) -> Result<Id, WeightsError> {
        let Node::Global(global) = self.arena[callable] else {
            let kind = self.arena[callable].kind();
            return Err(self.err(format!("REDUCE calls a {kind}, not an allowed global")));
        };
        let args = self.tuple_items(args, "REDUCE arguments")?;
        let node = match global {
            Global::OrderedDict => {
                let pairs = match args[..] {
                    [] => Vec::new(),
                    [items] => self.tuple_items(items, "OrderedDict items")?,
                    _ => return Err(self.err("OrderedDict with more than one argument")),
                };
                self.arena.push(Node::Dict(DictNode::default()));
                let id = self.arena.len() - 1;
                for pair in pairs {
                    let kv = self.tuple_items(pair, "OrderedDict item")?;
                    if kv.len() != 2 {
                        return Err(self.err("OrderedDict item is not a pair"));
                    }
                    self.set_items(id, &kv)?;
                }
                return Ok(id);
            }
            Global::RebuildTensor | Global::RebuildTensorV2 => {
                let [storage, offset, size, stride, ..] = args[..] else {
                    return Err(self.err(format!(
                        "{} with {} arguments",
                        global.name(),
                        args.len()
                    )));
                };
                let Node::Storage(storage) = &self.arena[storage] else {
                    let kind = self.arena[storage].kind();
                    return Err(self.err(format!("tensor rebuilt from a {kind}, not a storage")));
                };
                let storage = storage.clone();
                let offset = self.int(offset, "storage offset")?;
                let offset =
                    usize::try_from(offset).map_err(|_| self.err("negative storage offset"))?;
                let size = self.usize_list(size, "tensor size")?;
                let stride = self.usize_list(stride, "tensor stride")?;
                if size.len() != stride.len() {
                    return Err(self.err(format!(
                        "tensor size {size:?} and stride {stride:?} differ in length"
                    )));
                }
                Node::Tensor(self.tensors.rebuild(&storage, offset, &size, &stride)?)
            }
            // A parameter is its tensor; requires_grad, hooks and state do not matter here.
            Global::RebuildParameter | Global::RebuildParameterWithState => match args.first() {
                Some(&data) if matches!(self.arena[data], Node::Tensor(_)) => return Ok(data),
                _ => return Err(self.err(format!("{} without a tensor", global.name()))),
            },
            Global::TorchSize => match args[..] {
                [dims] => Node::Tuple(self.tuple_items(dims, "torch.Size")?),
                _ => return Err(self.err("torch.Size with other than one argument")),
            },
            Global::Storage(_) => {
                return Err(self.err(format!(
                    "{} is called directly; only storages stored in the archive are accepted",
                    global.name()
                )))
            }
        };
        self.arena.push(node);
        Ok(self.arena.len() - 1)
    }

    fn run(&mut self) -> Result<Id, WeightsError> {
        loop {
            self.op_start = self.pos;
            self.ops += 1;
            if self.pos == self.data.len() {
                return Err(self.err("the pickle ends before its STOP opcode (truncated?)"));
            }
            let op = self.u8()?;
            match op {
                0x80 => {
                    let version = self.u8()?;
                    if version > 5 {
                        return Err(self.err(format!("unknown pickle protocol {version}")));
                    }
                }
                0x95 => {
                    // FRAME: framing is transparent once the whole pickle is in memory.
                    self.take(8)?;
                }
                b'}' => self.push(Node::Dict(DictNode::default())),
                b']' => self.push(Node::List(Vec::new())),
                b')' => self.push(Node::Tuple(Vec::new())),
                b'(' => self.marks.push(self.stack.len()),
                b'q' => {
                    let i = self.u8()?;
                    self.memo_put(u32::from(i))?;
                }
                b'r' => {
                    let i = self.u32()?;
                    self.memo_put(i)?;
                }
                0x94 => {
                    let i = u32::try_from(self.memo.len()).map_err(|_| self.err("memo full"))?;
                    self.memo_put(i)?;
                }
                b'h' => {
                    let i = self.u8()?;
                    self.memo_get(u32::from(i))?;
                }
                b'j' => {
                    let i = self.u32()?;
                    self.memo_get(i)?;
                }
                b'J' => {
                    let v = i32::from_le_bytes(self.take_array()?);
                    self.push(Node::Int(i64::from(v)));
                }
                b'K' => {
                    let v = self.u8()?;
                    self.push(Node::Int(i64::from(v)));
                }
                b'M' => {
                    let v = u16::from_le_bytes(self.take_array()?);
                    self.push(Node::Int(i64::from(v)));
                }
                0x8a => {
                    let n = usize::from(self.u8()?);
                    let bytes = self.take(n)?.to_vec();
                    self.push(long(bytes));
                }
                0x8b => {
                    let n = i32::from_le_bytes(self.take_array()?);
                    let n = usize::try_from(n).map_err(|_| self.err("LONG4 of negative length"))?;
                    let bytes = self.take(n)?.to_vec();
                    self.push(long(bytes));
                }
                b'G' => {
                    let v = f64::from_be_bytes(self.take_array()?);
                    self.push(Node::Float(v));
                }
                b'X' => {
                    let n = self.u32()? as usize;
                    let s = self.string(n)?;
                    self.push(s);
                }
                0x8c => {
                    let n = usize::from(self.u8()?);
                    let s = self.string(n)?;
                    self.push(s);
                }
                0x8d => {
                    let n = self.len_u64()?;
                    let s = self.string(n)?;
                    self.push(s);
                }
                b'C' => {
                    let n = usize::from(self.u8()?);
                    let b = self.take(n)?.to_vec();
                    self.push(Node::Bytes(b));
                }
                b'B' => {
                    let n = self.u32()? as usize;
                    let b = self.take(n)?.to_vec();
                    self.push(Node::Bytes(b));
                }
                0x8e => {
                    let n = self.len_u64()?;
                    let b = self.take(n)?.to_vec();
                    self.push(Node::Bytes(b));
                }
                b'N' => self.push(Node::None),
                0x88 => self.push(Node::Bool(true)),
                0x89 => self.push(Node::Bool(false)),
                b't' => {
                    let items = self.pop_mark()?;
                    self.push(Node::Tuple(items));
                }
                0x85..=0x87 => {
                    let n = usize::from(op - 0x84);
                    let mut items = (0..n).map(|_| self.pop()).collect::<Result<Vec<_>, _>>()?;
                    items.reverse();
                    self.push(Node::Tuple(items));
                }
                b'l' => {
                    let items = self.pop_mark()?;
                    self.push(Node::List(items));
                }
                b'd' => {
                    let items = self.pop_mark()?;
                    self.push(Node::Dict(DictNode::default()));
                    let dict = self.top()?;
                    self.set_items(dict, &items)?;
                }
                b's' => {
                    let value = self.pop()?;
                    let key = self.pop()?;
                    let dict = self.top()?;
                    self.set_items(dict, &[key, value])?;
                }
                b'u' => {
                    let items = self.pop_mark()?;
                    let dict = self.top()?;
                    self.set_items(dict, &items)?;
                }
                b'a' => {
                    let item = self.pop()?;
                    let list = self.top()?;
                    self.append(list, vec![item])?;
                }
                b'e' => {
                    let items = self.pop_mark()?;
                    let list = self.top()?;
                    self.append(list, items)?;
                }
                b'0' => {
                    self.pop()?;
                }
                b'1' => {
                    self.pop_mark()?;
                }
                b'2' => {
                    let top = self.top()?;
                    self.stack.push(top);
                }
                b'c' => {
                    let module = self.line()?;
                    let name = self.line()?;
                    self.global(&module, &name)?;
                }
                0x93 => {
                    let name = self.pop()?;
                    let module = self.pop()?;
                    let (Node::Str(module), Node::Str(name)) =
                        (&self.arena[module], &self.arena[name])
                    else {
                        return Err(self.err("STACK_GLOBAL operands are not strings"));
                    };
                    let (module, name) = (module.clone(), name.clone());
                    self.global(&module, &name)?;
                }
                b'R' => {
                    let args = self.pop()?;
                    let callable = self.pop()?;
                    let id = self.reduce(callable, args)?;
                    self.stack.push(id);
                }
                0x81 => {
                    // NEWOBJ: cls.__new__(cls, *args), which for the allowed classes is the call.
                    let args = self.pop()?;
                    let class = self.pop()?;
                    if !matches!(
                        self.arena[class],
                        Node::Global(Global::OrderedDict | Global::TorchSize)
                    ) {
                        let kind = self.arena[class].kind();
                        return Err(self.err(format!("NEWOBJ on a {kind}, not an allowed class")));
                    }
                    let id = self.reduce(class, args)?;
                    self.stack.push(id);
                }
                b'b' => {
                    // BUILD sets an object's state. Torch emits it for the `_metadata` of a
                    // state dict (module versions), which the tensors do not need.
                    self.pop()?;
                    let target = self.top()?;
                    if !matches!(self.arena[target], Node::Dict(_) | Node::Tensor(_)) {
                        let kind = self.arena[target].kind();
                        return Err(self.err(format!("BUILD on a {kind}")));
                    }
                }
                b'Q' => {
                    let pid = self.pop()?;
                    let storage = self.persistent_load(pid)?;
                    self.push(storage);
                }
                b'.' => return self.pop(),
                other => {
                    return Err(self.err(format!(
                        "unsupported opcode 0x{other:02x} ({:?})",
                        char::from(other)
                    )))
                }
            }
        }
    }

    /// Copies the object graph under `root` out of the arena, within the budgets.
    fn into_value(mut self, root: Id) -> Result<PickleValue, WeightsError> {
        let mut uses = vec![0usize; self.arena.len()];
        let mut nodes_left = 8 * self.ops + 10_000;
        self.count_uses(root, 0, &mut uses, &mut nodes_left)?;
        let payload: usize = self.arena.iter().map(Node::payload_bytes).sum();
        let mut copies_left = payload.saturating_mul(2).saturating_add(SHARED_COPY_SLACK);
        self.emit(root, &mut uses, &mut copies_left)
    }

    /// Counts how often each object is reached from `id`; refuses deep or exploding graphs.
    fn count_uses(
        &self,
        id: Id,
        depth: usize,
        uses: &mut [usize],
        nodes_left: &mut usize,
    ) -> Result<(), WeightsError> {
        if depth > MAX_DEPTH {
            return Err(self.err(format!(
                "objects nested deeper than {MAX_DEPTH} levels (or a recursive structure)"
            )));
        }
        if *nodes_left == 0 {
            return Err(self.err("shared references expand the pickle into too many objects"));
        }
        *nodes_left -= 1;
        uses[id] += 1;
        match &self.arena[id] {
            Node::List(items) | Node::Tuple(items) => {
                for &item in items {
                    self.count_uses(item, depth + 1, uses, nodes_left)?;
                }
            }
            Node::Dict(d) => {
                for &(k, v) in &d.items {
                    self.count_uses(k, depth + 1, uses, nodes_left)?;
                    self.count_uses(v, depth + 1, uses, nodes_left)?;
                }
            }
            _ => {}
        }
        Ok(())
    }

    /// The value of `id`; its payload is moved out on its last use and copied before.
    fn emit(
        &mut self,
        id: Id,
        uses: &mut [usize],
        copies_left: &mut usize,
    ) -> Result<PickleValue, WeightsError> {
        uses[id] -= 1;
        let last_use = uses[id] == 0;
        if !last_use {
            let cost = self.arena[id].payload_bytes();
            if cost > *copies_left {
                return Err(self.err(
                    "shared references to tensors or strings expand the checkpoint beyond twice \
                     its data; refusing",
                ));
            }
            *copies_left -= cost;
        }
        Ok(match &mut self.arena[id] {
            Node::None => PickleValue::None,
            Node::Bool(b) => PickleValue::Bool(*b),
            Node::Int(i) => PickleValue::Int(*i),
            Node::Float(f) => PickleValue::Float(*f),
            Node::BigInt(b) => PickleValue::BigInt(move_or_copy(b, last_use)),
            Node::Str(s) => PickleValue::Str(move_or_copy(s, last_use)),
            Node::Bytes(b) => PickleValue::Bytes(move_or_copy(b, last_use)),
            Node::Tensor(t) => PickleValue::Tensor(if last_use {
                std::mem::replace(t, Tensor::zeros(DType::U8, &[0]))
            } else {
                t.clone()
            }),
            Node::Global(g) => PickleValue::Global(g.name()),
            Node::Storage(s) => PickleValue::Storage {
                key: s.key.clone(),
                storage_type: format!("torch.{}", s.kind.torch_name()),
                len: s.len,
            },
            Node::List(items) => {
                let items = items.clone();
                PickleValue::List(self.emit_all(&items, uses, copies_left)?)
            }
            Node::Tuple(items) => {
                let items = items.clone();
                PickleValue::Tuple(self.emit_all(&items, uses, copies_left)?)
            }
            Node::Dict(d) => {
                let pairs = d.items.clone();
                let mut out = Vec::with_capacity(pairs.len());
                for (k, v) in pairs {
                    out.push((
                        self.emit(k, uses, copies_left)?,
                        self.emit(v, uses, copies_left)?,
                    ));
                }
                PickleValue::Dict(out)
            }
        })
    }

    fn emit_all(
        &mut self,
        items: &[Id],
        uses: &mut [usize],
        copies_left: &mut usize,
    ) -> Result<Vec<PickleValue>, WeightsError> {
        items
            .iter()
            .map(|&i| self.emit(i, uses, copies_left))
            .collect()
    }
}

fn move_or_copy<T: Clone + Default>(value: &mut T, last_use: bool) -> T {
    if last_use {
        std::mem::take(value)
    } else {
        value.clone()
    }
}

/// A little-endian two's-complement integer of any length (LONG1, LONG4).
fn long(bytes: Vec<u8>) -> Node {
    let negative = bytes.last().is_some_and(|&b| b & 0x80 != 0);
    let fill = if negative { 0xff } else { 0 };
    let n = bytes.len().min(8);
    let mut le = [fill; 8];
    le[..n].copy_from_slice(&bytes[..n]);
    let value = i64::from_le_bytes(le);
    // It fits when the bytes past the eighth only repeat the sign and the sign survives.
    if bytes[n..].iter().all(|&b| b == fill) && (value < 0) == negative {
        Node::Int(value)
    } else {
        Node::BigInt(bytes)
    }
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use super::*;

    /// A source for pickles without storages; a tensor request is an error.
    struct NoTensors;

    impl TensorSource for NoTensors {
        fn rebuild(
            &mut self,
            storage: &StorageRef,
            _: usize,
            _: &[usize],
            _: &[usize],
        ) -> Result<Tensor, WeightsError> {
            Err(WeightsError::MissingStorage {
                path: PathBuf::from("test.pkl"),
                key: storage.key.clone(),
                entry: format!("data/{}", storage.key),
            })
        }
    }

    /// A source whose every tensor is zeros of the requested size.
    struct Zeros;

    impl TensorSource for Zeros {
        fn rebuild(
            &mut self,
            storage: &StorageRef,
            _: usize,
            size: &[usize],
            _: &[usize],
        ) -> Result<Tensor, WeightsError> {
            Ok(Tensor::zeros(
                storage.kind.dtype().unwrap_or(DType::I32),
                size,
            ))
        }
    }

    fn run(bytes: &[u8]) -> Result<PickleValue, WeightsError> {
        unpickle(bytes, Path::new("test.pkl"), &mut NoTensors)
    }

    /// Pickle text: `X` (BINUNICODE) of `s`.
    fn unicode(s: &str) -> Vec<u8> {
        let mut out = vec![b'X'];
        out.extend((s.len() as u32).to_le_bytes());
        out.extend(s.as_bytes());
        out
    }

    fn cat(parts: &[&[u8]]) -> Vec<u8> {
        parts.concat()
    }

    #[test]
    fn pickle_scalars_and_containers() {
        // {"a": [1, -2, 300, 70000], "b": (1.5, None, True, False), "c": b"xy", "d": 2**70}
        let bytes = cat(&[
            b"\x80\x02}q\x00(",
            &unicode("a"),
            b"]q\x01(K\x01J\xfe\xff\xff\xffM\x2c\x01J\x70\x11\x01\x00e",
            &unicode("b"),
            b"(G\x3f\xf8\x00\x00\x00\x00\x00\x00N\x88\x89t",
            &unicode("c"),
            b"C\x02xy",
            &unicode("d"),
            b"\x8a\x09\x00\x00\x00\x00\x00\x00\x00\x00\x40",
            b"u.",
        ]);
        let v = run(&bytes).unwrap();
        assert_eq!(
            v.get("a"),
            Some(&PickleValue::List(vec![
                PickleValue::Int(1),
                PickleValue::Int(-2),
                PickleValue::Int(300),
                PickleValue::Int(70000)
            ]))
        );
        assert_eq!(
            v.get("b"),
            Some(&PickleValue::Tuple(vec![
                PickleValue::Float(1.5),
                PickleValue::None,
                PickleValue::Bool(true),
                PickleValue::Bool(false)
            ]))
        );
        assert_eq!(v.get("c"), Some(&PickleValue::Bytes(b"xy".to_vec())));
        assert_eq!(
            v.get("d"),
            Some(&PickleValue::BigInt(vec![0, 0, 0, 0, 0, 0, 0, 0, 0x40]))
        );
    }

    #[test]
    fn pickle_long_integers_decode_two_complement() {
        let int = |bytes: &[u8]| match long(bytes.to_vec()) {
            Node::Int(i) => Some(i),
            _ => None,
        };
        assert_eq!(int(&[]), Some(0));
        assert_eq!(int(&[0xff]), Some(-1));
        assert_eq!(int(&[0x00, 0x80]), Some(-32768));
        assert_eq!(int(&[0xff, 0x00]), Some(255));
        assert_eq!(int(&i64::MIN.to_le_bytes()), Some(i64::MIN));
        assert_eq!(
            int(&[0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x7f, 0x00]),
            Some(i64::MAX)
        );
        assert_eq!(int(&[0, 0, 0, 0, 0, 0, 0, 0x80, 0x00]), None);
        assert_eq!(
            int(&[0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x7f, 0xff]),
            None
        );
    }

    #[test]
    fn pickle_memo_shares_identity_like_python() {
        // d = {}; memo d; l = [d, d]; d["k"] = 1 after memoising: both entries see "k".
        let bytes = cat(&[
            b"\x80\x02]q\x00}r\x01\x00\x00\x00a",
            b"j\x01\x00\x00\x00a",
            b"j\x01\x00\x00\x00",
            &unicode("k"),
            b"K\x01s0.",
        ]);
        let v = run(&bytes).unwrap();
        let dict = PickleValue::Dict(vec![(PickleValue::Str("k".into()), PickleValue::Int(1))]);
        assert_eq!(v, PickleValue::List(vec![dict.clone(), dict]));
    }

    #[test]
    fn pickle_protocol_4_framing_and_short_strings() {
        // \x95 FRAME, \x8c SHORT_BINUNICODE, \x94 MEMOIZE, \x8d BINUNICODE8, \x8e BINBYTES8.
        let bytes = cat(&[
            b"\x80\x04\x95\x20\x00\x00\x00\x00\x00\x00\x00",
            b"\x8c\x02ab\x94\x8d\x01\x00\x00\x00\x00\x00\x00\x00c\x8e\x00\x00\x00\x00\x00\x00\x00\x00",
            b"h\x00\x87.",
        ]);
        // The stack holds "ab", "c", b"", "ab" (BINGET); TUPLE3 takes the last three.
        let v = run(&bytes).unwrap();
        assert_eq!(
            v,
            PickleValue::Tuple(vec![
                PickleValue::Str("c".into()),
                PickleValue::Bytes(vec![]),
                PickleValue::Str("ab".into()),
            ])
        );
    }

    #[test]
    fn pickle_refuses_globals_outside_the_allow_list() {
        for (bytes, global) in [
            (
                b"\x80\x02cos\nsystem\nq\x00X\x01\x00\x00\x00xq\x01\x85R.".to_vec(),
                "os.system",
            ),
            (b"\x80\x02cposix\nsystem\n.".to_vec(), "posix.system"),
            (
                b"\x80\x02c__builtin__\neval\n.".to_vec(),
                "__builtin__.eval",
            ),
            (
                cat(&[b"\x80\x04\x8c\x08builtins\x94\x8c\x04eval\x94\x93.".as_slice()]),
                "builtins.eval",
            ),
            (
                b"\x80\x02csubprocess\nPopen\n.".to_vec(),
                "subprocess.Popen",
            ),
            (b"\x80\x02ctorch\nload\n.".to_vec(), "torch.load"),
        ] {
            let e = run(&bytes).unwrap_err();
            let WeightsError::ForbiddenGlobal { global: found, .. } = &e else {
                panic!("{global}: {e}")
            };
            assert_eq!(found, global);
            let msg = e.to_string();
            assert!(
                msg.contains("test.pkl") && msg.contains(&format!("`{global}`")),
                "{msg}"
            );
        }
    }

    #[test]
    fn pickle_malformed_input_is_an_error_not_a_panic() {
        let cases: &[(&[u8], &str)] = &[
            (b"", "ends before"),
            (b"\x80\x02", "ends before"),
            (b"\x80\x02K", "runs past the end"),
            (b"\x80\x02X\xff\xff\xff\x7fabc.", "runs past the end"),
            (
                b"\x80\x02\x8d\xff\xff\xff\xff\xff\xff\xff\xffab.",
                "runs past the end",
            ),
            (b"\x80\x02\x8b\xff\xff\xff\xff.", "negative length"),
            (b"\x80\x02.", "underflow"),
            (b"\x80\x02(.", "underflow"),
            (b"\x80\x02K\x01(K\x02\x86.", "underflow"),
            (b"\x80\x02t.", "no MARK"),
            (b"\x80\x02h\x05.", "memo entry 5"),
            (b"\x80\x02K\x00K\x01K\x02s.", "not a dict"),
            (b"\x80\x02K\x01K\x02a.", "not a list"),
            (b"\x80\x02}K\x01u.", "no MARK"),
            (b"\x80\x02}(K\x01u.", "odd number"),
            (b"\x80\x02\xff.", "unsupported opcode 0xff"),
            (b"\x80\x09.", "protocol 9"),
            (b"\x80\x02cos", "without a newline"),
            (b"\x80\x02K\x01)R.", "REDUCE calls a int"),
            (b"\x80\x02ctorch\nFloatStorage\n)R.", "called directly"),
            (b"\x80\x02K\x01Q.", "persistent id"),
            (b"\x80\x02X\x02\x00\x00\x00\xff\xfe.", "UTF-8"),
            (b"\x80\x02K\x01N\x81.", "NEWOBJ"),
            (b"\x80\x02K\x01Nb.", "BUILD on a int"),
            (b"\x80\x02]q\x00h\x00a.", "recursive"),
        ];
        for (bytes, expected) in cases {
            let e = run(bytes).unwrap_err().to_string();
            assert!(
                e.contains("test.pkl") && e.contains(expected),
                "{bytes:?}: {e}"
            );
        }
    }

    #[test]
    fn pickle_exponential_sharing_is_refused() {
        // t0 = [1]; t(i+1) = (t(i), t(i)) 40 times: 2^40 leaves if expanded.
        let bytes = cat(&[b"\x80\x02]K\x01a", &b"2\x86".repeat(40), b"."]);
        let e = run(&bytes).unwrap_err().to_string();
        assert!(e.contains("too many objects"), "{e}");
    }

    #[test]
    fn pickle_unsupported_storage_type_is_named() {
        let e = run(b"\x80\x02ctorch\nComplexFloatStorage\n.")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("test.pkl") && e.contains("torch.ComplexFloatStorage"),
            "{e}"
        );
    }

    #[test]
    fn pickle_torch_tensor_reduction_and_parameter() {
        // _rebuild_parameter(_rebuild_tensor_v2(pid, 0, (2, 3), (3, 1), False, OrderedDict()), True, OrderedDict())
        let pid = cat(&[
            b"(",
            &unicode("storage"),
            b"ctorch\nFloatStorage\n",
            &unicode("0"),
            &unicode("cpu"),
            b"K\x06tQ",
        ]);
        let bytes = cat(&[
            b"\x80\x02ctorch._utils\n_rebuild_parameter\n",
            b"ctorch._utils\n_rebuild_tensor_v2\n(",
            &pid,
            b"K\x00K\x02K\x03\x86K\x03K\x01\x86\x89ccollections\nOrderedDict\n)Rtq\x00R",
            b"\x88ccollections\nOrderedDict\n)R\x87R.",
        ]);
        let v = unpickle(&bytes, Path::new("test.pkl"), &mut Zeros).unwrap();
        assert_eq!(v, PickleValue::Tensor(Tensor::zeros(DType::F32, &[2, 3])));
        // Without a storage behind it the source's error comes through.
        let e = run(&bytes).unwrap_err();
        assert!(matches!(e, WeightsError::MissingStorage { .. }), "{e}");
    }

    #[test]
    fn pickle_ordered_dict_build_state_is_ignored() {
        // OrderedDict() with items, then BUILD {"_metadata": {...}} as Module.state_dict() has.
        let bytes = cat(&[
            b"\x80\x02ccollections\nOrderedDict\n)R(",
            &unicode("w"),
            b"K\x07u}(",
            &unicode("_metadata"),
            b"}ub.",
        ]);
        let v = run(&bytes).unwrap();
        assert_eq!(v.get("w"), Some(&PickleValue::Int(7)));
        assert_eq!(v.as_dict().unwrap().len(), 1);
    }

    #[test]
    fn pickle_allowed_classes_build_plain_containers() {
        // OrderedDict([("a", 1)]) by REDUCE, OrderedDict() by NEWOBJ, torch.Size((2, 3)).
        let od = cat(&[
            b"\x80\x02ccollections\nOrderedDict\n]",
            &unicode("a"),
            b"K\x01\x86a\x85R.",
        ]);
        let expected = PickleValue::Dict(vec![(PickleValue::Str("a".into()), PickleValue::Int(1))]);
        assert_eq!(run(&od).unwrap(), expected);
        let newobj = b"\x80\x02ccollections\nOrderedDict\n)\x81.";
        assert_eq!(run(newobj).unwrap(), PickleValue::Dict(vec![]));
        let size = b"\x80\x02ctorch\nSize\n(K\x02K\x03t\x85R.";
        let dims = PickleValue::Tuple(vec![PickleValue::Int(2), PickleValue::Int(3)]);
        assert_eq!(run(size).unwrap(), dims);
    }
}
