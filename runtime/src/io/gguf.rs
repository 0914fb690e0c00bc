//! GGUF reader (versions 2 and 3, little-endian) over a memory map: header, typed metadata, tensor
//! infos and zero-copy tensor data. Every count, length, size and offset is checked against the
//! file's length before it is used, so a truncated or hostile file gives a typed [`GgufError`]:
//! never a panic, never an allocation sized by an unchecked count, never a tensor outside the file.
//!
//! ## Where gguf-rs falls short and what this module adds
//!
//! Measured with gguf-rs 0.1.8 by `gguf/gguf_rs_check.rs`; every row but the one marked "source"
//! is asserted there, so the table stays true. On the valid crafted v2/v3 files and the SmolLM2
//! model both parsers agree on tensor names, dims, types, offsets, the data offset, and metadata
//! keys and values.
//!
//! | Input                            | gguf-rs 0.1.8                     | this module           |
//! |----------------------------------|-----------------------------------|-----------------------|
//! | array of arrays (valid per spec) | rejects (unsupported item type)   | parsed, <= 8 levels   |
//! | nested-array depth bomb          | rejects at the first nested level | `TooDeep`             |
//! | `general.alignment` 0 or 12      | accepts, silently uses 32         | `BadAlignment`        |
//! | `general.alignment` 48           | accepts 48, not a power of two    | `BadAlignment`        |
//! | tensor data past the end         | accepts                           | `TensorOutOfBounds`   |
//! | file cut in padding or data      | accepts (reads the header only)   | error at every cut    |
//! | file cut before the data section | error, no panic (every byte)      | error, no panic       |
//! | tensor offset not aligned        | accepts                           | `MisalignedTensor`    |
//! | duplicate tensor names           | accepts, keeps both               | `DuplicateTensor`     |
//! | duplicate metadata keys          | accepts, the last value wins      | `DuplicateKey`        |
//! | invalid UTF-8 key or string      | accepts, bytes become U+FFFD      | `InvalidUtf8` + key   |
//! | tensor type 40 (NVFP4)           | **panics** (`unreachable!`)       | NVFP4                 |
//! | types 41, 42 (Q1_0, Q2_0)        | rejects "invalid GGML type"       | parsed                |
//! | removed types 31-33, 36-38       | accepts, byte size 0              | `UnknownTensorType`   |
//! | type 99, removed type 4          | rejects, tensor not named         | `UnknownTensorType`   |
//! | byte size of 9 types (below)     | wrong (256-element blocks)        | ggml's type traits    |
//! | `ne[0]` not a multiple of block  | accepts, size rounded down        | `RowNotBlockMultiple` |
//! | 0 dimensions                     | accepts as a scalar               | `BadDimCount`         |
//! | dims product overflows u64       | rejects                           | `SizeOverflow`        |
//! | counts 2^62, array length 2^60   | rejects after reading to the end  | `Truncated` up front  |
//! | string length 2^63               | rejects (over its 1 GiB cap)      | `Truncated`           |
//! | string length <= 1 GiB past end  | allocates it first (source)       | `Truncated`           |
//! | version 1                        | accepts                           | `UnsupportedVersion`  |
//! | big-endian file                  | rejects, "invalid version"        | `BigEndian`           |
//! | `general.file_type` a string     | `file_type()` **panics**          | `WrongType`           |
//!
//! The 9 types whose byte size gguf-rs gets wrong: BF16, I8, I16, I32, I64, F64, IQ4_NL and MXFP4
//! (it assumes 256-element blocks where ggml has 1 or 32) and Q8_1 (40-byte blocks, ggml has 36).

use std::collections::HashMap;
use std::fmt;
use std::ops::Range;
use std::path::{Path, PathBuf};

/// The four bytes every GGUF file starts with.
pub const GGUF_MAGIC: [u8; 4] = *b"GGUF";
/// Tensor data alignment when `general.alignment` is absent (GGUF spec).
pub const GGUF_DEFAULT_ALIGNMENT: u64 = 32;
/// Most dimensions a tensor may have (`GGML_MAX_DIMS`).
pub const GGML_MAX_DIMS: usize = 4;
/// Most levels of arrays nested in one metadata value.
pub const MAX_ARRAY_NESTING: u32 = 8;
/// Metadata key holding the tensor data alignment.
pub const KEY_GENERAL_ALIGNMENT: &str = "general.alignment";
/// Metadata key holding the model architecture (e.g. "llama").
pub const KEY_GENERAL_ARCHITECTURE: &str = "general.architecture";

const REFETCH: &str = "the file is probably an incomplete or corrupted download; fetch it again";
/// Smallest encoded metadata entry: empty key (8) + value type (4) + 1-byte value.
const MIN_KV_BYTES: u64 = 13;
/// Smallest encoded tensor info: empty name (8) + n_dims (4) + one dim (8) + type (4) + offset (8).
const MIN_TENSOR_INFO_BYTES: u64 = 32;
/// Most items reserved up front for one array; larger arrays grow as items are actually parsed.
const MAX_PREALLOC_ITEMS: u64 = 1 << 16;

/// Everything that can go wrong opening or reading a GGUF file.
#[derive(thiserror::Error, Debug)]
pub enum GgufError {
    /// Opening, inspecting or mapping the file failed; the message leaves the OS error to the
    /// error's source (print the chain to see it).
    #[error("cannot read GGUF file {}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{} is not a regular file ({kind}); pass the path of a .gguf file", path.display())]
    NotRegularFile {
        path: PathBuf,
        /// What it is instead: "a directory", "a FIFO (named pipe)", "a character device", ...
        kind: &'static str,
    },
    #[error(
        "not a GGUF file: it starts with bytes {found:02x?} ({:?}) instead of \"GGUF\"",
        String::from_utf8_lossy(found)
    )]
    NotGguf { found: [u8; 4] },
    #[error(
        "GGUF version {v} is not supported (only versions 2 and 3 are); {hint}",
        v = .0,
        hint = version_hint(*.0)
    )]
    UnsupportedVersion(u32),
    #[error(
        "big-endian GGUF file (the version field is byte-swapped): only little-endian files are \
         supported; convert the model again without --bigendian"
    )]
    BigEndian,
    #[error(
        "truncated GGUF file: {what} at byte offset {offset} needs {needed} bytes, but the file \
         is only {file_len} bytes long; {REFETCH}"
    )]
    Truncated {
        what: String,
        offset: u64,
        needed: u64,
        file_len: u64,
    },
    #[error("{what} is not valid UTF-8; {REFETCH}")]
    InvalidUtf8 { what: String },
    #[error("{KEY_GENERAL_ALIGNMENT} is {0}: it must be a nonzero power of two")]
    BadAlignment(u64),
    /// `index` is set when the bad type is that of an array's elements inside item `index` of
    /// the (nested) array under `key`.
    #[error(
        "metadata key {} has unknown value type id {id} (byte offset {offset}); {REFETCH}",
        quoted_key(key, *index)
    )]
    UnknownValueType {
        key: String,
        index: Option<u64>,
        id: u32,
        offset: u64,
    },
    /// `index` is set when the bool is item `index` of an array.
    #[error(
        "metadata key {} holds a bool byte {value} at byte offset {offset} (must be 0 or 1); \
         {REFETCH}",
        quoted_key(key, *index)
    )]
    InvalidBool {
        key: String,
        index: Option<u64>,
        value: u8,
        offset: u64,
    },
    #[error("tensor '{tensor}' has ggml type id {id}, {}", tensor_type_hint(*id))]
    UnknownTensorType { tensor: String, id: u32 },
    #[error("tensor '{tensor}' has {n_dims} dimensions (must be 1 to {GGML_MAX_DIMS}); {REFETCH}")]
    BadDimCount { tensor: String, n_dims: u32 },
    #[error("tensor '{tensor}' with dims {dims:?}: element count or byte size overflows u64")]
    SizeOverflow { tensor: String, dims: Vec<u64> },
    #[error(
        "tensor '{tensor}' has rows of {ne0} elements, not a multiple of the {ggml_type} block \
         size {block_size}"
    )]
    RowNotBlockMultiple {
        tensor: String,
        ggml_type: GgmlType,
        ne0: u64,
        block_size: u64,
    },
    #[error("{n} elements are not a multiple of the {ggml_type} block size {block_size}")]
    NotBlockMultiple {
        ggml_type: GgmlType,
        n: u64,
        block_size: u64,
    },
    #[error("a row of {n} {ggml_type} elements is more than u64::MAX bytes")]
    RowBytesOverflow { ggml_type: GgmlType, n: u64 },
    /// The file offset of the data, `data_offset + offset`, may exceed u64: the message shows
    /// its exact value.
    #[error(
        "tensor '{tensor}' spans {size} bytes from byte offset {} (data section at \
         {data_offset} + tensor offset {offset}), past the end of the {file_len}-byte file; \
         {REFETCH}",
        u128::from(*data_offset) + u128::from(*offset)
    )]
    TensorOutOfBounds {
        tensor: String,
        /// The tensor's offset in the data section, as the file records it.
        offset: u64,
        /// File offset of the data section.
        data_offset: u64,
        size: u64,
        file_len: u64,
    },
    #[error(
        "tensor '{tensor}' has data offset {offset}, not a multiple of the alignment {alignment}; \
         {REFETCH}"
    )]
    MisalignedTensor {
        tensor: String,
        offset: u64,
        alignment: u64,
    },
    #[error("metadata key '{0}' appears more than once")]
    DuplicateKey(String),
    #[error("tensor name '{0}' appears more than once")]
    DuplicateTensor(String),
    #[error("metadata key '{key}' nests arrays more than {limit} levels deep")]
    TooDeep { key: String, limit: u32 },
    #[error("metadata key '{0}' is missing")]
    MissingKey(String),
    #[error("metadata key '{key}' should be {expected} but is {found}")]
    WrongType {
        key: String,
        expected: &'static str,
        found: String,
    },
    #[error("metadata key '{key}' holds {value}, which does not fit {expected}")]
    OutOfRange {
        key: String,
        value: String,
        expected: &'static str,
    },
}

/// `'key'`, or `'key'[index]` for an item of the array under `key`.
fn quoted_key(key: &str, index: Option<u64>) -> String {
    match index {
        Some(i) => format!("'{key}'[{i}]"),
        None => format!("'{key}'"),
    }
}

fn version_hint(version: u32) -> &'static str {
    match version {
        1 => "GGUF v1 predates 64-bit counts; convert the model again with a current llama.cpp",
        _ => "the file is either corrupt or newer than this reader; fetch it again or update",
    }
}

fn tensor_type_hint(id: u32) -> &'static str {
    match id {
        4 | 5 => "a type removed from ggml (Q4_2/Q4_3); convert the model again",
        31..=33 | 36..=38 => {
            "a repacked type removed from GGUF files (Q4_0_x_x/IQ4_NL_x_x); convert it again"
        }
        _ => "which this reader does not know (corrupt file, or newer than this reader)",
    }
}

/// GGUF metadata value type ids (`gguf_metadata_value_type` in the spec).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ValueType {
    U8,
    I8,
    U16,
    I16,
    U32,
    I32,
    F32,
    Bool,
    String,
    Array,
    U64,
    I64,
    F64,
}

impl ValueType {
    /// The type for a GGUF value type id, `None` for ids the spec does not define.
    pub fn from_id(id: u32) -> Option<Self> {
        Some(match id {
            0 => Self::U8,
            1 => Self::I8,
            2 => Self::U16,
            3 => Self::I16,
            4 => Self::U32,
            5 => Self::I32,
            6 => Self::F32,
            7 => Self::Bool,
            8 => Self::String,
            9 => Self::Array,
            10 => Self::U64,
            11 => Self::I64,
            12 => Self::F64,
            _ => return None,
        })
    }

    /// The GGUF value type id.
    pub fn id(self) -> u32 {
        match self {
            Self::U8 => 0,
            Self::I8 => 1,
            Self::U16 => 2,
            Self::I16 => 3,
            Self::U32 => 4,
            Self::I32 => 5,
            Self::F32 => 6,
            Self::Bool => 7,
            Self::String => 8,
            Self::Array => 9,
            Self::U64 => 10,
            Self::I64 => 11,
            Self::F64 => 12,
        }
    }

    /// Short name: "u8", "i32", "f32", "bool", "string", "array", ...
    pub fn name(self) -> &'static str {
        match self {
            Self::U8 => "u8",
            Self::I8 => "i8",
            Self::U16 => "u16",
            Self::I16 => "i16",
            Self::U32 => "u32",
            Self::I32 => "i32",
            Self::F32 => "f32",
            Self::Bool => "bool",
            Self::String => "string",
            Self::Array => "array",
            Self::U64 => "u64",
            Self::I64 => "i64",
            Self::F64 => "f64",
        }
    }

    /// Fewest bytes one value of this type takes in a file (a string's or an array's header).
    pub fn min_encoded_size(self) -> u64 {
        match self {
            Self::U8 | Self::I8 | Self::Bool => 1,
            Self::U16 | Self::I16 => 2,
            Self::U32 | Self::I32 | Self::F32 => 4,
            Self::U64 | Self::I64 | Self::F64 | Self::String => 8,
            Self::Array => 12,
        }
    }
}

impl fmt::Display for ValueType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// One metadata value. Arrays keep their element type, so an empty array stays typed.
#[derive(Debug, Clone, PartialEq)]
pub enum MetaValue {
    U8(u8),
    I8(i8),
    U16(u16),
    I16(i16),
    U32(u32),
    I32(i32),
    U64(u64),
    I64(i64),
    F32(f32),
    F64(f64),
    Bool(bool),
    String(String),
    Array {
        elem_type: ValueType,
        items: Vec<MetaValue>,
    },
}

impl MetaValue {
    /// The value's GGUF type.
    pub fn value_type(&self) -> ValueType {
        match self {
            Self::U8(_) => ValueType::U8,
            Self::I8(_) => ValueType::I8,
            Self::U16(_) => ValueType::U16,
            Self::I16(_) => ValueType::I16,
            Self::U32(_) => ValueType::U32,
            Self::I32(_) => ValueType::I32,
            Self::U64(_) => ValueType::U64,
            Self::I64(_) => ValueType::I64,
            Self::F32(_) => ValueType::F32,
            Self::F64(_) => ValueType::F64,
            Self::Bool(_) => ValueType::Bool,
            Self::String(_) => ValueType::String,
            Self::Array { .. } => ValueType::Array,
        }
    }

    /// Human-readable type, e.g. "u32" or "array of string", for error messages.
    pub fn type_name(&self) -> String {
        match self {
            Self::Array { elem_type, .. } => format!("array of {elem_type}"),
            other => other.value_type().name().to_string(),
        }
    }

    /// The value of any integer type (not bool), widened.
    pub fn as_i128(&self) -> Option<i128> {
        Some(match *self {
            Self::U8(v) => v.into(),
            Self::I8(v) => v.into(),
            Self::U16(v) => v.into(),
            Self::I16(v) => v.into(),
            Self::U32(v) => v.into(),
            Self::I32(v) => v.into(),
            Self::U64(v) => v.into(),
            Self::I64(v) => v.into(),
            _ => return None,
        })
    }

    /// Any integer type holding a value that fits u64.
    pub fn as_u64(&self) -> Option<u64> {
        self.as_i128().and_then(|v| u64::try_from(v).ok())
    }

    /// Any integer type holding a value that fits i64.
    pub fn as_i64(&self) -> Option<i64> {
        self.as_i128().and_then(|v| i64::try_from(v).ok())
    }

    /// An f32 or f64 value, as f64.
    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            Self::F32(v) => Some(v.into()),
            Self::F64(v) => Some(v),
            _ => None,
        }
    }

    pub fn as_bool(&self) -> Option<bool> {
        match *self {
            Self::Bool(v) => Some(v),
            _ => None,
        }
    }

    pub fn as_str(&self) -> Option<&str> {
        match self {
            Self::String(s) => Some(s),
            _ => None,
        }
    }

    /// The items of an array value.
    pub fn as_array(&self) -> Option<&[MetaValue]> {
        match self {
            Self::Array { items, .. } => Some(items),
            _ => None,
        }
    }
}

/// ggml tensor types with their GGUF ids. Ids 4, 5 (Q4_2, Q4_3), 31-33 (Q4_0_x_x) and 36-38
/// (IQ4_NL_x_x) were removed from ggml / GGUF files and are rejected.
#[allow(non_camel_case_types)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u32)]
pub enum GgmlType {
    F32 = 0,
    F16 = 1,
    Q4_0 = 2,
    Q4_1 = 3,
    Q5_0 = 6,
    Q5_1 = 7,
    Q8_0 = 8,
    Q8_1 = 9,
    Q2_K = 10,
    Q3_K = 11,
    Q4_K = 12,
    Q5_K = 13,
    Q6_K = 14,
    Q8_K = 15,
    IQ2_XXS = 16,
    IQ2_XS = 17,
    IQ3_XXS = 18,
    IQ1_S = 19,
    IQ4_NL = 20,
    IQ3_S = 21,
    IQ2_S = 22,
    IQ4_XS = 23,
    I8 = 24,
    I16 = 25,
    I32 = 26,
    I64 = 27,
    F64 = 28,
    IQ1_M = 29,
    BF16 = 30,
    TQ1_0 = 34,
    TQ2_0 = 35,
    MXFP4 = 39,
    NVFP4 = 40,
    Q1_0 = 41,
    Q2_0 = 42,
}

impl GgmlType {
    /// Every type this reader knows, in id order.
    pub const ALL: [GgmlType; 35] = [
        Self::F32,
        Self::F16,
        Self::Q4_0,
        Self::Q4_1,
        Self::Q5_0,
        Self::Q5_1,
        Self::Q8_0,
        Self::Q8_1,
        Self::Q2_K,
        Self::Q3_K,
        Self::Q4_K,
        Self::Q5_K,
        Self::Q6_K,
        Self::Q8_K,
        Self::IQ2_XXS,
        Self::IQ2_XS,
        Self::IQ3_XXS,
        Self::IQ1_S,
        Self::IQ4_NL,
        Self::IQ3_S,
        Self::IQ2_S,
        Self::IQ4_XS,
        Self::I8,
        Self::I16,
        Self::I32,
        Self::I64,
        Self::F64,
        Self::IQ1_M,
        Self::BF16,
        Self::TQ1_0,
        Self::TQ2_0,
        Self::MXFP4,
        Self::NVFP4,
        Self::Q1_0,
        Self::Q2_0,
    ];

    /// The type for a GGUF tensor type id; `None` for unknown and removed ids.
    pub fn from_id(id: u32) -> Option<Self> {
        Self::ALL.iter().copied().find(|t| t.id() == id)
    }

    /// The GGUF tensor type id.
    pub fn id(self) -> u32 {
        self as u32
    }

    /// (name, elements per block, bytes per block), from ggml.c's `type_traits`.
    fn traits(self) -> (&'static str, u64, u64) {
        match self {
            Self::F32 => ("F32", 1, 4),
            Self::F16 => ("F16", 1, 2),
            Self::Q4_0 => ("Q4_0", 32, 18),
            Self::Q4_1 => ("Q4_1", 32, 20),
            Self::Q5_0 => ("Q5_0", 32, 22),
            Self::Q5_1 => ("Q5_1", 32, 24),
            Self::Q8_0 => ("Q8_0", 32, 34),
            Self::Q8_1 => ("Q8_1", 32, 36),
            Self::Q2_K => ("Q2_K", 256, 84),
            Self::Q3_K => ("Q3_K", 256, 110),
            Self::Q4_K => ("Q4_K", 256, 144),
            Self::Q5_K => ("Q5_K", 256, 176),
            Self::Q6_K => ("Q6_K", 256, 210),
            Self::Q8_K => ("Q8_K", 256, 292),
            Self::IQ2_XXS => ("IQ2_XXS", 256, 66),
            Self::IQ2_XS => ("IQ2_XS", 256, 74),
            Self::IQ3_XXS => ("IQ3_XXS", 256, 98),
            Self::IQ1_S => ("IQ1_S", 256, 50),
            Self::IQ4_NL => ("IQ4_NL", 32, 18),
            Self::IQ3_S => ("IQ3_S", 256, 110),
            Self::IQ2_S => ("IQ2_S", 256, 82),
            Self::IQ4_XS => ("IQ4_XS", 256, 136),
            Self::I8 => ("I8", 1, 1),
            Self::I16 => ("I16", 1, 2),
            Self::I32 => ("I32", 1, 4),
            Self::I64 => ("I64", 1, 8),
            Self::F64 => ("F64", 1, 8),
            Self::IQ1_M => ("IQ1_M", 256, 56),
            Self::BF16 => ("BF16", 1, 2),
            Self::TQ1_0 => ("TQ1_0", 256, 54),
            Self::TQ2_0 => ("TQ2_0", 256, 66),
            Self::MXFP4 => ("MXFP4", 32, 17),
            Self::NVFP4 => ("NVFP4", 64, 36),
            Self::Q1_0 => ("Q1_0", 128, 18),
            Self::Q2_0 => ("Q2_0", 64, 18),
        }
    }

    /// GGUF's name for the type, e.g. "Q4_K".
    pub fn name(self) -> &'static str {
        self.traits().0
    }

    /// Elements per block (1 for plain types).
    pub fn block_size(self) -> u64 {
        self.traits().1
    }

    /// Bytes per block.
    pub fn type_size(self) -> u64 {
        self.traits().2
    }

    /// Bytes taken by `n` elements; an error when `n` is not a multiple of the block size.
    pub fn row_bytes(self, n: u64) -> Result<u64, GgufError> {
        let block_size = self.block_size();
        if !n.is_multiple_of(block_size) {
            return Err(GgufError::NotBlockMultiple {
                ggml_type: self,
                n,
                block_size,
            });
        }
        (n / block_size)
            .checked_mul(self.type_size())
            .ok_or(GgufError::RowBytesOverflow { ggml_type: self, n })
    }
}

impl fmt::Display for GgmlType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// One tensor's description, validated against the file it came from.
#[derive(Debug, Clone, PartialEq)]
pub struct TensorInfo {
    name: String,
    dims: Vec<u64>,
    ggml_type: GgmlType,
    offset: u64,
    n_elements: u64,
    size: u64,
    data: Range<usize>,
}

impl TensorInfo {
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Dimensions in GGML order: `dims()[0]` (ne\[0\]) is the innermost, the row length.
    pub fn dims(&self) -> &[u64] {
        &self.dims
    }

    pub fn ggml_type(&self) -> GgmlType {
        self.ggml_type
    }

    /// Offset of the data relative to the start of the data section.
    pub fn offset(&self) -> u64 {
        self.offset
    }

    /// Offset of the data from the start of the file.
    pub fn file_offset(&self) -> u64 {
        self.data.start as u64
    }

    /// Product of the dims.
    pub fn n_elements(&self) -> u64 {
        self.n_elements
    }

    /// Bytes of tensor data.
    pub fn size_bytes(&self) -> u64 {
        self.size
    }
}

enum Backing {
    Mmap(memmap2::Mmap),
    Owned(Vec<u8>),
}

impl Backing {
    fn bytes(&self) -> &[u8] {
        match self {
            Self::Mmap(m) => m,
            Self::Owned(v) => v,
        }
    }
}

/// A parsed GGUF file. Tensor data stays in the mapping (or the owned buffer) and is handed out
/// as borrowed slices.
pub struct GgufFile {
    backing: Backing,
    version: u32,
    metadata: Vec<(String, MetaValue)>,
    meta_index: HashMap<String, usize>,
    tensors: Vec<TensorInfo>,
    tensor_index: HashMap<String, usize>,
    alignment: u64,
    data_offset: u64,
}

impl fmt::Debug for GgufFile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GgufFile")
            .field("version", &self.version)
            .field("file_len", &self.file_len())
            .field("metadata", &self.metadata.len())
            .field("tensors", &self.tensors.len())
            .field("alignment", &self.alignment)
            .field("data_offset", &self.data_offset)
            .finish()
    }
}

impl GgufFile {
    /// Maps the file at `path` read-only and parses it.
    ///
    /// The mapping assumes nobody truncates or rewrites the file while it is open (as every
    /// mmap-based model loader does); tensor slices would otherwise change under the reader.
    ///
    /// Anything but a regular file (a directory, a device, a FIFO, a `/proc` file) is
    /// `NotRegularFile`, found from its metadata before it is opened, so a FIFO without a
    /// writer does not block.
    pub fn open(path: &Path) -> Result<Self, GgufError> {
        let io_err = |source| GgufError::Io {
            path: path.to_path_buf(),
            source,
        };
        let not_regular = |kind| GgufError::NotRegularFile {
            path: path.to_path_buf(),
            kind,
        };
        let meta = std::fs::metadata(path).map_err(io_err)?;
        if !meta.is_file() {
            return Err(not_regular(file_kind(&meta.file_type())));
        }
        let mut file = std::fs::File::open(path).map_err(io_err)?;
        let meta = file.metadata().map_err(io_err)?;
        if !meta.is_file() {
            // Replaced between the two looks.
            return Err(not_regular(file_kind(&meta.file_type())));
        }
        let backing = if meta.len() == 0 {
            // A file of a pseudo file system (/proc, /sys) reports size 0 yet has content.
            let mut first = [0u8; 1];
            if read_some(&mut file, &mut first).map_err(io_err)? > 0 {
                return Err(not_regular(PSEUDO_FILE));
            }
            // Some platforms refuse to map an empty file; an empty buffer parses the same.
            Backing::Owned(Vec::new())
        } else {
            // SAFETY: the map is read-only and private to this value; see the doc comment for
            // the (usual) assumption that the file is not modified while mapped.
            match unsafe { memmap2::Mmap::map(&file) } {
                Ok(map) => Backing::Mmap(map),
                // ENODEV: the file system cannot map files (sysfs attributes, for one).
                Err(e) if e.raw_os_error() == Some(19) && cfg!(unix) => {
                    return Err(not_regular(PSEUDO_FILE))
                }
                Err(e) => return Err(io_err(e)),
            }
        };
        Self::parse(backing)
    }

    /// Parses a GGUF file held in memory.
    pub fn from_bytes(bytes: Vec<u8>) -> Result<Self, GgufError> {
        Self::parse(Backing::Owned(bytes))
    }

    fn parse(backing: Backing) -> Result<Self, GgufError> {
        let p = Parser::new(backing.bytes()).parse()?;
        Ok(Self {
            backing,
            version: p.version,
            metadata: p.metadata,
            meta_index: p.meta_index,
            tensors: p.tensors,
            tensor_index: p.tensor_index,
            alignment: p.alignment,
            data_offset: p.data_offset,
        })
    }

    /// GGUF version: 2 or 3.
    pub fn version(&self) -> u32 {
        self.version
    }

    /// Length of the whole file in bytes.
    pub fn file_len(&self) -> u64 {
        self.backing.bytes().len() as u64
    }

    /// Tensor data alignment (`general.alignment`, default 32).
    pub fn alignment(&self) -> u64 {
        self.alignment
    }

    /// File offset where the tensor data section starts.
    pub fn data_offset(&self) -> u64 {
        self.data_offset
    }

    /// Metadata entries in file order.
    pub fn metadata(&self) -> impl ExactSizeIterator<Item = (&str, &MetaValue)> {
        self.metadata.iter().map(|(k, v)| (k.as_str(), v))
    }

    /// Number of metadata entries.
    pub fn metadata_len(&self) -> usize {
        self.metadata.len()
    }

    /// The value stored under `key`.
    pub fn get(&self, key: &str) -> Option<&MetaValue> {
        self.meta_index
            .get(key)
            .and_then(|&i| self.metadata.get(i))
            .map(|(_, v)| v)
    }

    /// The value stored under `key`, or `MissingKey`.
    pub fn require(&self, key: &str) -> Result<&MetaValue, GgufError> {
        self.get(key)
            .ok_or_else(|| GgufError::MissingKey(key.to_string()))
    }

    /// An integer of any type whose value fits u32.
    pub fn get_u32(&self, key: &str) -> Result<u32, GgufError> {
        int_as(key, self.require(key)?, "a u32")
    }

    /// An integer of any type whose value fits u64.
    pub fn get_u64(&self, key: &str) -> Result<u64, GgufError> {
        int_as(key, self.require(key)?, "a u64")
    }

    /// An integer of any type whose value fits i32.
    pub fn get_i32(&self, key: &str) -> Result<i32, GgufError> {
        int_as(key, self.require(key)?, "an i32")
    }

    /// An f32, or an f64 that is finite as f32 (or not finite to begin with).
    pub fn get_f32(&self, key: &str) -> Result<f32, GgufError> {
        float_as_f32(key, self.require(key)?)
    }

    pub fn get_bool(&self, key: &str) -> Result<bool, GgufError> {
        let v = self.require(key)?;
        v.as_bool().ok_or_else(|| wrong_type(key, "a bool", v))
    }

    pub fn get_str(&self, key: &str) -> Result<&str, GgufError> {
        let v = self.require(key)?;
        v.as_str().ok_or_else(|| wrong_type(key, "a string", v))
    }

    /// An array of strings (e.g. `tokenizer.ggml.tokens`).
    pub fn get_str_array(&self, key: &str) -> Result<Vec<&str>, GgufError> {
        let items = self.array_of(key, ValueType::String, "an array of string")?;
        items
            .iter()
            .map(|v| {
                v.as_str()
                    .ok_or_else(|| wrong_type(key, "an array of string", v))
            })
            .collect()
    }

    /// An array of integers of one type whose values all fit i32 (e.g. token types).
    pub fn get_i32_array(&self, key: &str) -> Result<Vec<i32>, GgufError> {
        self.int_array(key, "an array of integers that fit i32")
    }

    /// An array of integers of one type whose values all fit u32.
    pub fn get_u32_array(&self, key: &str) -> Result<Vec<u32>, GgufError> {
        self.int_array(key, "an array of integers that fit u32")
    }

    /// An array of f32 or f64 (e.g. `tokenizer.ggml.scores`).
    pub fn get_f32_array(&self, key: &str) -> Result<Vec<f32>, GgufError> {
        let v = self.require(key)?;
        match v {
            MetaValue::Array {
                elem_type: ValueType::F32 | ValueType::F64,
                items,
            } => items.iter().map(|item| float_as_f32(key, item)).collect(),
            _ => Err(wrong_type(key, "an array of f32", v)),
        }
    }

    pub fn get_u32_opt(&self, key: &str) -> Result<Option<u32>, GgufError> {
        self.opt(key, Self::get_u32)
    }

    pub fn get_u64_opt(&self, key: &str) -> Result<Option<u64>, GgufError> {
        self.opt(key, Self::get_u64)
    }

    pub fn get_i32_opt(&self, key: &str) -> Result<Option<i32>, GgufError> {
        self.opt(key, Self::get_i32)
    }

    pub fn get_f32_opt(&self, key: &str) -> Result<Option<f32>, GgufError> {
        self.opt(key, Self::get_f32)
    }

    pub fn get_bool_opt(&self, key: &str) -> Result<Option<bool>, GgufError> {
        self.opt(key, Self::get_bool)
    }

    pub fn get_str_opt(&self, key: &str) -> Result<Option<&str>, GgufError> {
        self.opt(key, Self::get_str)
    }

    pub fn get_str_array_opt(&self, key: &str) -> Result<Option<Vec<&str>>, GgufError> {
        self.opt(key, Self::get_str_array)
    }

    pub fn get_i32_array_opt(&self, key: &str) -> Result<Option<Vec<i32>>, GgufError> {
        self.opt(key, Self::get_i32_array)
    }

    pub fn get_u32_array_opt(&self, key: &str) -> Result<Option<Vec<u32>>, GgufError> {
        self.opt(key, Self::get_u32_array)
    }

    pub fn get_f32_array_opt(&self, key: &str) -> Result<Option<Vec<f32>>, GgufError> {
        self.opt(key, Self::get_f32_array)
    }

    /// `general.architecture`, e.g. "llama".
    pub fn architecture(&self) -> Result<&str, GgufError> {
        self.get_str(KEY_GENERAL_ARCHITECTURE)
    }

    /// Tensor infos in file order.
    pub fn tensors(&self) -> std::slice::Iter<'_, TensorInfo> {
        self.tensors.iter()
    }

    /// Number of tensors.
    pub fn tensor_count(&self) -> usize {
        self.tensors.len()
    }

    /// The tensor called `name`.
    pub fn tensor(&self, name: &str) -> Option<&TensorInfo> {
        self.tensor_index
            .get(name)
            .and_then(|&i| self.tensors.get(i))
    }

    /// The tensor's bytes, borrowed from the mapping (no copy). `info` must come from this
    /// file; an info whose range does not lie in this file gives an empty slice.
    pub fn tensor_data(&self, info: &TensorInfo) -> &[u8] {
        self.backing
            .bytes()
            .get(info.data.clone())
            .unwrap_or_default()
    }

    fn opt<'a, T>(
        &'a self,
        key: &str,
        get: impl FnOnce(&'a Self, &str) -> Result<T, GgufError>,
    ) -> Result<Option<T>, GgufError> {
        match self.get(key) {
            None => Ok(None),
            Some(_) => get(self, key).map(Some),
        }
    }

    fn array_of(
        &self,
        key: &str,
        elem: ValueType,
        expected: &'static str,
    ) -> Result<&[MetaValue], GgufError> {
        let v = self.require(key)?;
        match v {
            MetaValue::Array { elem_type, items } if *elem_type == elem => Ok(items),
            _ => Err(wrong_type(key, expected, v)),
        }
    }

    fn int_array<T: TryFrom<i128>>(
        &self,
        key: &str,
        expected: &'static str,
    ) -> Result<Vec<T>, GgufError> {
        let v = self.require(key)?;
        let items = match v {
            MetaValue::Array { elem_type, items } if is_integer(*elem_type) => items,
            _ => return Err(wrong_type(key, expected, v)),
        };
        items
            .iter()
            .map(|item| int_as(key, item, expected))
            .collect()
    }
}

const PSEUDO_FILE: &str =
    "a file of a pseudo file system such as /proc or /sys, which cannot be mapped";

/// What a file that is not a regular file is, for `NotRegularFile`.
fn file_kind(t: &std::fs::FileType) -> &'static str {
    if t.is_dir() {
        return "a directory";
    }
    #[cfg(unix)]
    {
        use std::os::unix::fs::FileTypeExt;
        if t.is_fifo() {
            return "a FIFO (named pipe)";
        }
        if t.is_char_device() {
            return "a character device";
        }
        if t.is_block_device() {
            return "a block device";
        }
        if t.is_socket() {
            return "a socket";
        }
    }
    "a special file"
}

/// `read` retried on `Interrupted`.
fn read_some(file: &mut std::fs::File, buf: &mut [u8]) -> std::io::Result<usize> {
    use std::io::Read;
    loop {
        match file.read(buf) {
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            r => return r,
        }
    }
}

fn is_integer(t: ValueType) -> bool {
    use ValueType::*;
    matches!(t, U8 | I8 | U16 | I16 | U32 | I32 | U64 | I64)
}

fn wrong_type(key: &str, expected: &'static str, found: &MetaValue) -> GgufError {
    GgufError::WrongType {
        key: key.to_string(),
        expected,
        found: found.type_name(),
    }
}

fn int_as<T: TryFrom<i128>>(
    key: &str,
    v: &MetaValue,
    expected: &'static str,
) -> Result<T, GgufError> {
    let n = v.as_i128().ok_or_else(|| wrong_type(key, expected, v))?;
    T::try_from(n).map_err(|_| GgufError::OutOfRange {
        key: key.to_string(),
        value: n.to_string(),
        expected,
    })
}

fn float_as_f32(key: &str, v: &MetaValue) -> Result<f32, GgufError> {
    match *v {
        MetaValue::F32(x) => Ok(x),
        MetaValue::F64(x) => {
            let y = x as f32;
            if y.is_finite() || !x.is_finite() {
                Ok(y)
            } else {
                Err(GgufError::OutOfRange {
                    key: key.to_string(),
                    value: x.to_string(),
                    expected: "an f32",
                })
            }
        }
        _ => Err(wrong_type(key, "an f32 or f64", v)),
    }
}

/// What the parser hands back; owns everything, borrows nothing.
struct Parsed {
    version: u32,
    metadata: Vec<(String, MetaValue)>,
    meta_index: HashMap<String, usize>,
    tensors: Vec<TensorInfo>,
    tensor_index: HashMap<String, usize>,
    alignment: u64,
    data_offset: u64,
}

/// A tensor info as read, before it is checked against the data section.
struct RawTensorInfo {
    name: String,
    dims: Vec<u64>,
    ggml_type: GgmlType,
    offset: u64,
}

/// Where a metadata value sits, for error messages: the key, and the index inside an array.
#[derive(Clone, Copy)]
struct Loc<'k> {
    key: &'k str,
    index: Option<u64>,
}

impl fmt::Display for Loc<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&quoted_key(self.key, self.index))
    }
}

/// A bounds-checked little-endian reader over the whole file.
struct Parser<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Parser<'a> {
    fn new(buf: &'a [u8]) -> Self {
        Self { buf, pos: 0 }
    }

    fn file_len(&self) -> u64 {
        self.buf.len() as u64
    }

    fn remaining(&self) -> u64 {
        (self.buf.len() - self.pos.min(self.buf.len())) as u64
    }

    fn truncated(&self, what: String, needed: u64) -> GgufError {
        GgufError::Truncated {
            what,
            offset: self.pos as u64,
            needed,
            file_len: self.file_len(),
        }
    }

    /// The next `n` bytes; `Truncated` (naming `what`) when the file ends first.
    fn take(&mut self, n: u64, what: &dyn Fn() -> String) -> Result<&'a [u8], GgufError> {
        if n > self.remaining() {
            return Err(self.truncated(what(), n));
        }
        // n <= remaining <= buf.len(), so these conversions and the slice cannot fail.
        let end = self.pos + n as usize;
        let bytes = self
            .buf
            .get(self.pos..end)
            .ok_or_else(|| self.truncated(what(), n))?;
        self.pos = end;
        Ok(bytes)
    }

    fn array<const N: usize>(&mut self, what: &dyn Fn() -> String) -> Result<[u8; N], GgufError> {
        let bytes = self.take(N as u64, what)?;
        <[u8; N]>::try_from(bytes).map_err(|_| self.truncated(what(), N as u64))
    }

    fn u8(&mut self, what: &dyn Fn() -> String) -> Result<u8, GgufError> {
        Ok(self.array::<1>(what)?[0])
    }

    fn u32(&mut self, what: &dyn Fn() -> String) -> Result<u32, GgufError> {
        self.array(what).map(u32::from_le_bytes)
    }

    fn u64(&mut self, what: &dyn Fn() -> String) -> Result<u64, GgufError> {
        self.array(what).map(u64::from_le_bytes)
    }

    /// Fails unless `count` items of at least `min_size` bytes each fit in the rest of the file:
    /// the guard in front of every loop and allocation sized by a count read from the file.
    fn check_count(
        &self,
        count: u64,
        min_size: u64,
        what: &dyn Fn() -> String,
    ) -> Result<(), GgufError> {
        let needed = count.saturating_mul(min_size);
        if needed > self.remaining() {
            let what = format!("{count} {} (at least {min_size} bytes each)", what());
            return Err(self.truncated(what, needed));
        }
        Ok(())
    }

    /// A GGUF string: u64 length, then that many bytes of UTF-8.
    fn string(&mut self, what: &dyn Fn() -> String) -> Result<String, GgufError> {
        let len = self.u64(&|| format!("length of {}", what()))?;
        let start = self.pos;
        let bytes = self.take(len, what)?;
        match std::str::from_utf8(bytes) {
            Ok(s) => Ok(s.to_owned()),
            Err(e) => Err(GgufError::InvalidUtf8 {
                what: format!(
                    "{} at byte offset {start} ({:?}, bad byte at +{})",
                    what(),
                    String::from_utf8_lossy(bytes),
                    e.valid_up_to()
                ),
            }),
        }
    }

    fn parse(mut self) -> Result<Parsed, GgufError> {
        if self.buf.len() < 4 {
            let mut found = [0u8; 4];
            found[..self.buf.len()].copy_from_slice(self.buf);
            if !GGUF_MAGIC.starts_with(self.buf) {
                return Err(GgufError::NotGguf { found });
            }
        }
        let magic = self.array::<4>(&|| "magic".to_string())?;
        if magic != GGUF_MAGIC {
            return Err(GgufError::NotGguf { found: magic });
        }
        let version = self.u32(&|| "version".to_string())?;
        match version {
            2 | 3 => {}
            // A byte-swapped small version (as llama.cpp detects it).
            v if v & 0xFFFF == 0 && v != 0 => return Err(GgufError::BigEndian),
            v => return Err(GgufError::UnsupportedVersion(v)),
        }
        let n_tensors = self.u64(&|| "tensor count".to_string())?;
        let n_kv = self.u64(&|| "metadata count".to_string())?;

        let (metadata, meta_index) = self.metadata(n_kv)?;
        let alignment = match meta_index
            .get(KEY_GENERAL_ALIGNMENT)
            .and_then(|&i| metadata.get(i))
        {
            None => GGUF_DEFAULT_ALIGNMENT,
            Some((_, v)) => int_as::<u64>(KEY_GENERAL_ALIGNMENT, v, "a u32")?,
        };
        if !alignment.is_power_of_two() {
            return Err(GgufError::BadAlignment(alignment));
        }

        let raw = self.tensor_infos(n_tensors)?;
        let infos_end = self.pos as u64;
        let data_offset = infos_end
            .checked_next_multiple_of(alignment)
            .ok_or(GgufError::BadAlignment(alignment))?;
        let file_len = self.file_len();
        let mut tensors = Vec::with_capacity(raw.len());
        let mut tensor_index = HashMap::with_capacity(raw.len());
        for r in raw {
            let info = check_tensor(r, alignment, data_offset, file_len)?;
            if tensor_index
                .insert(info.name.clone(), tensors.len())
                .is_some()
            {
                return Err(GgufError::DuplicateTensor(info.name));
            }
            tensors.push(info);
        }
        Ok(Parsed {
            version,
            metadata,
            meta_index,
            tensors,
            tensor_index,
            alignment,
            data_offset,
        })
    }

    #[allow(clippy::type_complexity)]
    fn metadata(
        &mut self,
        n_kv: u64,
    ) -> Result<(Vec<(String, MetaValue)>, HashMap<String, usize>), GgufError> {
        self.check_count(n_kv, MIN_KV_BYTES, &|| "metadata entries".to_string())?;
        let cap = n_kv.min(MAX_PREALLOC_ITEMS) as usize;
        let mut metadata = Vec::with_capacity(cap);
        let mut index = HashMap::with_capacity(cap);
        for i in 0..n_kv {
            let key = self.string(&|| format!("key of metadata entry #{i}"))?;
            if index.contains_key(&key) {
                return Err(GgufError::DuplicateKey(key));
            }
            let type_offset = self.pos as u64;
            let id = self.u32(&|| format!("value type of metadata key '{key}'"))?;
            let ty = ValueType::from_id(id).ok_or_else(|| GgufError::UnknownValueType {
                key: key.clone(),
                index: None,
                id,
                offset: type_offset,
            })?;
            let value = self.value(
                ty,
                Loc {
                    key: &key,
                    index: None,
                },
                0,
            )?;
            index.insert(key.clone(), metadata.len());
            metadata.push((key, value));
        }
        Ok((metadata, index))
    }

    /// One value of type `ty`; `depth` counts the arrays around it.
    fn value(&mut self, ty: ValueType, loc: Loc<'_>, depth: u32) -> Result<MetaValue, GgufError> {
        let what = || format!("value of {loc}");
        Ok(match ty {
            ValueType::U8 => MetaValue::U8(self.u8(&what)?),
            ValueType::I8 => MetaValue::I8(i8::from_le_bytes(self.array(&what)?)),
            ValueType::U16 => MetaValue::U16(u16::from_le_bytes(self.array(&what)?)),
            ValueType::I16 => MetaValue::I16(i16::from_le_bytes(self.array(&what)?)),
            ValueType::U32 => MetaValue::U32(u32::from_le_bytes(self.array(&what)?)),
            ValueType::I32 => MetaValue::I32(i32::from_le_bytes(self.array(&what)?)),
            ValueType::U64 => MetaValue::U64(u64::from_le_bytes(self.array(&what)?)),
            ValueType::I64 => MetaValue::I64(i64::from_le_bytes(self.array(&what)?)),
            ValueType::F32 => MetaValue::F32(f32::from_le_bytes(self.array(&what)?)),
            ValueType::F64 => MetaValue::F64(f64::from_le_bytes(self.array(&what)?)),
            ValueType::Bool => {
                let offset = self.pos as u64;
                match self.u8(&what)? {
                    0 => MetaValue::Bool(false),
                    1 => MetaValue::Bool(true),
                    value => {
                        return Err(GgufError::InvalidBool {
                            key: loc.key.to_string(),
                            index: loc.index,
                            value,
                            offset,
                        });
                    }
                }
            }
            ValueType::String => MetaValue::String(self.string(&|| format!("string {loc}"))?),
            ValueType::Array => {
                if depth >= MAX_ARRAY_NESTING {
                    let key = loc.key.to_string();
                    return Err(GgufError::TooDeep {
                        key,
                        limit: MAX_ARRAY_NESTING,
                    });
                }
                let type_offset = self.pos as u64;
                let id = self.u32(&|| format!("element type of array {loc}"))?;
                let elem_type =
                    ValueType::from_id(id).ok_or_else(|| GgufError::UnknownValueType {
                        key: loc.key.to_string(),
                        index: loc.index,
                        id,
                        offset: type_offset,
                    })?;
                let n = self.u64(&|| format!("length of array {loc}"))?;
                self.check_count(n, elem_type.min_encoded_size(), &|| {
                    format!("{elem_type} elements of array {loc}")
                })?;
                let mut items = Vec::with_capacity(n.min(MAX_PREALLOC_ITEMS) as usize);
                for i in 0..n {
                    let item_loc = Loc {
                        key: loc.key,
                        index: Some(i),
                    };
                    items.push(self.value(elem_type, item_loc, depth + 1)?);
                }
                MetaValue::Array { elem_type, items }
            }
        })
    }

    fn tensor_infos(&mut self, n_tensors: u64) -> Result<Vec<RawTensorInfo>, GgufError> {
        self.check_count(n_tensors, MIN_TENSOR_INFO_BYTES, &|| {
            "tensor infos".to_string()
        })?;
        let mut infos = Vec::with_capacity(n_tensors.min(MAX_PREALLOC_ITEMS) as usize);
        for i in 0..n_tensors {
            let name = self.string(&|| format!("name of tensor info #{i}"))?;
            let n_dims = self.u32(&|| format!("dimension count of tensor '{name}'"))?;
            if n_dims == 0 || n_dims as usize > GGML_MAX_DIMS {
                return Err(GgufError::BadDimCount {
                    tensor: name,
                    n_dims,
                });
            }
            let mut dims = Vec::with_capacity(n_dims as usize);
            for d in 0..n_dims {
                dims.push(self.u64(&|| format!("dimension {d} of tensor '{name}'"))?);
            }
            let id = self.u32(&|| format!("type of tensor '{name}'"))?;
            let offset = self.u64(&|| format!("data offset of tensor '{name}'"))?;
            let Some(ggml_type) = GgmlType::from_id(id) else {
                return Err(GgufError::UnknownTensorType { tensor: name, id });
            };
            infos.push(RawTensorInfo {
                name,
                dims,
                ggml_type,
                offset,
            });
        }
        Ok(infos)
    }
}

/// Checks one tensor's alignment, size and bounds against the data section.
fn check_tensor(
    r: RawTensorInfo,
    alignment: u64,
    data_offset: u64,
    file_len: u64,
) -> Result<TensorInfo, GgufError> {
    if !r.offset.is_multiple_of(alignment) {
        return Err(GgufError::MisalignedTensor {
            tensor: r.name,
            offset: r.offset,
            alignment,
        });
    }
    let overflow = |r: &RawTensorInfo| GgufError::SizeOverflow {
        tensor: r.name.clone(),
        dims: r.dims.clone(),
    };
    let n_elements = r.dims.iter().try_fold(1u64, |acc, &d| acc.checked_mul(d));
    let Some(n_elements) = n_elements else {
        return Err(overflow(&r));
    };
    let ne0 = r.dims.first().copied().unwrap_or(1);
    let row = match r.ggml_type.row_bytes(ne0) {
        Ok(row) => row,
        Err(GgufError::NotBlockMultiple {
            ggml_type,
            n,
            block_size,
        }) => {
            return Err(GgufError::RowNotBlockMultiple {
                tensor: r.name,
                ggml_type,
                ne0: n,
                block_size,
            })
        }
        Err(_) => return Err(overflow(&r)),
    };
    let size = r
        .dims
        .iter()
        .skip(1)
        .try_fold(row, |acc, &d| acc.checked_mul(d));
    let Some(size) = size else {
        return Err(overflow(&r));
    };
    let start = data_offset.checked_add(r.offset);
    let end = start.and_then(|s| s.checked_add(size));
    let (Some(start), Some(end)) = (start, end) else {
        return Err(GgufError::TensorOutOfBounds {
            tensor: r.name,
            offset: r.offset,
            data_offset,
            size,
            file_len,
        });
    };
    if end > file_len {
        return Err(GgufError::TensorOutOfBounds {
            tensor: r.name,
            offset: r.offset,
            data_offset,
            size,
            file_len,
        });
    }
    // end <= file_len, which is a slice length, so both fit usize.
    let data = start as usize..end as usize;
    Ok(TensorInfo {
        name: r.name,
        dims: r.dims,
        ggml_type: r.ggml_type,
        offset: r.offset,
        n_elements,
        size,
        data,
    })
}

#[cfg(test)]
mod gguf_rs_check;

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::time::{Duration, Instant};

    /// Test-only GGUF serializer: well-formed by default, with hooks to corrupt every field.
    pub(crate) struct Builder {
        pub magic: [u8; 4],
        pub version: u32,
        /// Header counts written instead of the real ones.
        pub n_tensors: Option<u64>,
        pub n_kv: Option<u64>,
        /// Alignment used to lay out the data section (set `general.alignment` separately).
        pub layout_alignment: u64,
        kv: Vec<u8>,
        kv_count: u64,
        tensors: Vec<TestTensor>,
    }

    struct TestTensor {
        name: Vec<u8>,
        dims: Vec<u64>,
        type_id: u32,
        data: Vec<u8>,
        offset: Option<u64>,
    }

    /// A serialized file and where its sections lie.
    pub(crate) struct Built {
        pub bytes: Vec<u8>,
        /// End of the tensor infos (start of the padding before the data section).
        pub infos_end: usize,
        pub data_start: usize,
        /// End of the last tensor's data: shorter files lack data, longer ones only lack padding.
        pub min_len: usize,
    }

    fn put_str(out: &mut Vec<u8>, s: &[u8]) {
        out.extend_from_slice(&(s.len() as u64).to_le_bytes());
        out.extend_from_slice(s);
    }

    /// Encodes a value without its type id (as inside an array).
    pub(crate) fn encode_value(out: &mut Vec<u8>, v: &MetaValue) {
        match v {
            MetaValue::U8(x) => out.push(*x),
            MetaValue::I8(x) => out.extend_from_slice(&x.to_le_bytes()),
            MetaValue::U16(x) => out.extend_from_slice(&x.to_le_bytes()),
            MetaValue::I16(x) => out.extend_from_slice(&x.to_le_bytes()),
            MetaValue::U32(x) => out.extend_from_slice(&x.to_le_bytes()),
            MetaValue::I32(x) => out.extend_from_slice(&x.to_le_bytes()),
            MetaValue::U64(x) => out.extend_from_slice(&x.to_le_bytes()),
            MetaValue::I64(x) => out.extend_from_slice(&x.to_le_bytes()),
            MetaValue::F32(x) => out.extend_from_slice(&x.to_le_bytes()),
            MetaValue::F64(x) => out.extend_from_slice(&x.to_le_bytes()),
            MetaValue::Bool(x) => out.push(u8::from(*x)),
            MetaValue::String(s) => put_str(out, s.as_bytes()),
            MetaValue::Array { elem_type, items } => {
                out.extend_from_slice(&elem_type.id().to_le_bytes());
                out.extend_from_slice(&(items.len() as u64).to_le_bytes());
                for item in items {
                    encode_value(out, item);
                }
            }
        }
    }

    /// Deterministic tensor bytes, different for each tensor.
    pub(crate) fn pattern(len: usize, seed: usize) -> Vec<u8> {
        (0..len).map(|i| (i * 7 + seed * 13 + 1) as u8).collect()
    }

    impl Builder {
        pub fn new(version: u32) -> Self {
            Self {
                magic: GGUF_MAGIC,
                version,
                n_tensors: None,
                n_kv: None,
                layout_alignment: GGUF_DEFAULT_ALIGNMENT,
                kv: Vec::new(),
                kv_count: 0,
                tensors: Vec::new(),
            }
        }

        pub fn kv(self, key: &str, v: MetaValue) -> Self {
            let mut payload = Vec::new();
            encode_value(&mut payload, &v);
            self.kv_raw(key.as_bytes(), v.value_type().id(), &payload)
        }

        /// A metadata entry with any key bytes, type id and encoded value.
        pub fn kv_raw(mut self, key: &[u8], type_id: u32, payload: &[u8]) -> Self {
            put_str(&mut self.kv, key);
            self.kv.extend_from_slice(&type_id.to_le_bytes());
            self.kv.extend_from_slice(payload);
            self.kv_count += 1;
            self
        }

        /// Sets `general.alignment` (as u32) and lays the data out with it.
        pub fn alignment(mut self, a: u32) -> Self {
            self.layout_alignment = u64::from(a).max(1);
            self.kv(KEY_GENERAL_ALIGNMENT, MetaValue::U32(a))
        }

        /// A well-formed tensor with pattern data of the right size.
        pub fn tensor(self, name: &str, dims: &[u64], t: GgmlType) -> Self {
            let rest: u64 = dims[1..].iter().product();
            let len = (t.row_bytes(dims[0]).expect("test dims") * rest) as usize;
            self.tensor_raw(name.as_bytes(), dims, t.id(), len, None)
        }

        /// A tensor with any name bytes, dims, type id and data length; `offset` overrides the
        /// recorded offset (the data is still placed where a writer would put it).
        pub fn tensor_raw(
            mut self,
            name: &[u8],
            dims: &[u64],
            type_id: u32,
            data_len: usize,
            offset: Option<u64>,
        ) -> Self {
            let seed = self.tensors.len();
            self.tensors.push(TestTensor {
                name: name.to_vec(),
                dims: dims.to_vec(),
                type_id,
                data: pattern(data_len, seed),
                offset,
            });
            self
        }

        pub fn build(&self) -> Built {
            let align = self.layout_alignment as usize;
            let pad = |out: &mut Vec<u8>| {
                while !out.len().is_multiple_of(align) {
                    out.push(0);
                }
            };
            let mut out = Vec::new();
            out.extend_from_slice(&self.magic);
            out.extend_from_slice(&self.version.to_le_bytes());
            let n_tensors = self.n_tensors.unwrap_or(self.tensors.len() as u64);
            out.extend_from_slice(&n_tensors.to_le_bytes());
            out.extend_from_slice(&self.n_kv.unwrap_or(self.kv_count).to_le_bytes());
            out.extend_from_slice(&self.kv);
            let mut placed = Vec::new();
            let mut cursor = 0usize;
            for t in &self.tensors {
                placed.push(cursor);
                cursor = (cursor + t.data.len()).div_ceil(align) * align;
            }
            for (t, &at) in self.tensors.iter().zip(&placed) {
                put_str(&mut out, &t.name);
                out.extend_from_slice(&(t.dims.len() as u32).to_le_bytes());
                for d in &t.dims {
                    out.extend_from_slice(&d.to_le_bytes());
                }
                out.extend_from_slice(&t.type_id.to_le_bytes());
                out.extend_from_slice(&t.offset.unwrap_or(at as u64).to_le_bytes());
            }
            let infos_end = out.len();
            pad(&mut out);
            let data_start = out.len();
            let mut min_len = data_start;
            for (t, &at) in self.tensors.iter().zip(&placed) {
                out.resize(data_start + at, 0);
                out.extend_from_slice(&t.data);
                min_len = out.len();
                pad(&mut out);
            }
            Built {
                bytes: out,
                infos_end,
                data_start,
                min_len,
            }
        }
    }

    fn arr(elem_type: ValueType, items: Vec<MetaValue>) -> MetaValue {
        MetaValue::Array { elem_type, items }
    }

    fn s(x: &str) -> MetaValue {
        MetaValue::String(x.to_string())
    }

    /// Metadata of the crafted file: every value type, arrays of each kind, and (when `nested`)
    /// an array of arrays of u32.
    pub(crate) fn fixture_metadata(nested: bool) -> Vec<(&'static str, MetaValue)> {
        use MetaValue as V;
        let mut kv = vec![
            (KEY_GENERAL_ARCHITECTURE, s("llama")),
            (KEY_GENERAL_ALIGNMENT, V::U32(64)),
            ("llama.block_count", V::U32(2)),
            ("t.u8", V::U8(200)),
            ("t.i8", V::I8(-100)),
            ("t.u16", V::U16(60_000)),
            ("t.i16", V::I16(-30_000)),
            ("t.u32", V::U32(4_000_000_000)),
            ("t.i32", V::I32(-2_000_000_000)),
            ("t.u64", V::U64(1 << 40)),
            ("t.i64", V::I64(-(1 << 40))),
            ("t.f32", V::F32(1.5)),
            ("t.f64", V::F64(-2.25)),
            ("t.true", V::Bool(true)),
            ("t.false", V::Bool(false)),
            ("t.string", s("héllo ✓ wörld")),
            ("t.empty_string", s("")),
            (
                "tokenizer.ggml.tokens",
                arr(ValueType::String, vec![s("<s>"), s("a"), s("é")]),
            ),
            (
                "tokenizer.ggml.scores",
                arr(ValueType::F32, vec![V::F32(0.0), V::F32(-1.5)]),
            ),
            (
                "tokenizer.ggml.token_type",
                arr(ValueType::I32, vec![V::I32(3), V::I32(1)]),
            ),
            (
                "t.u32_array",
                arr(
                    ValueType::U32,
                    vec![V::U32(1), V::U32(2), V::U32(4e9 as u32)],
                ),
            ),
            ("t.u8_array", arr(ValueType::U8, vec![V::U8(1), V::U8(255)])),
            (
                "t.bool_array",
                arr(ValueType::Bool, vec![V::Bool(true), V::Bool(false)]),
            ),
            (
                "t.i64_array",
                arr(ValueType::I64, vec![V::I64(i64::MIN), V::I64(i64::MAX)]),
            ),
            ("t.f64_array", arr(ValueType::F64, vec![V::F64(0.25)])),
            ("t.empty_array", arr(ValueType::U16, vec![])),
        ];
        if nested {
            let inner = |xs: &[u32]| arr(ValueType::U32, xs.iter().map(|&x| V::U32(x)).collect());
            let nested = arr(
                ValueType::Array,
                vec![inner(&[1, 2]), inner(&[3]), inner(&[])],
            );
            kv.push(("t.nested", nested));
        }
        kv
    }

    /// Tensors of the crafted file: several types, 1 to 4 dims.
    pub(crate) fn fixture_tensors() -> Vec<(&'static str, Vec<u64>, GgmlType)> {
        vec![
            ("token_embd.weight", vec![64, 4], GgmlType::Q8_0),
            ("blk.0.attn_norm.weight", vec![64], GgmlType::F32),
            ("blk.0.ffn_up.weight", vec![256, 2], GgmlType::Q4_K),
            ("blk.0.attn_q.weight", vec![32, 3], GgmlType::Q4_1),
            ("t.f16", vec![8, 2, 3], GgmlType::F16),
            ("t.bf16", vec![4, 1, 1, 2], GgmlType::BF16),
            ("t.q6_k", vec![256, 1], GgmlType::Q6_K),
        ]
    }

    /// The crafted valid file (alignment 64).
    pub(crate) fn fixture(version: u32, nested: bool) -> Built {
        let mut b = Builder::new(version);
        b.layout_alignment = 64;
        for (k, v) in fixture_metadata(nested) {
            b = b.kv(k, v);
        }
        for (name, dims, t) in fixture_tensors() {
            b = b.tensor(name, &dims, t);
        }
        b.build()
    }

    /// The real model: `$TESSERA_MODEL` (which `tools/test.sh` sets after fetching it). Its
    /// absence fails the test rather than skipping it.
    pub(crate) fn model_path() -> Option<PathBuf> {
        let path = std::env::var_os("TESSERA_MODEL")
            .map(PathBuf::from)
            .expect("set TESSERA_MODEL to SmolLM2-135M-Instruct.Q4_1.gguf, or run tools/test.sh");
        assert!(
            path.is_file(),
            "TESSERA_MODEL={} is not a file",
            path.display()
        );
        Some(path)
    }

    fn parse(bytes: &[u8]) -> Result<GgufFile, GgufError> {
        GgufFile::from_bytes(bytes.to_vec())
    }

    fn check_round_trip(version: u32) {
        let built = fixture(version, true);
        let f = parse(&built.bytes).expect("valid crafted file");
        assert_eq!(f.version(), version);
        assert_eq!(f.alignment(), 64);
        assert_eq!(f.data_offset(), built.data_start as u64);
        assert_eq!(f.data_offset() % 64, 0);
        assert!(f.data_offset() >= built.infos_end as u64);
        assert_eq!(f.file_len(), built.bytes.len() as u64);
        let expected = fixture_metadata(true);
        let got: Vec<(&str, &MetaValue)> = f.metadata().collect();
        assert_eq!(got.len(), expected.len());
        for ((gk, gv), (ek, ev)) in got.iter().zip(&expected) {
            assert_eq!(gk, ek);
            assert_eq!(*gv, ev, "value of {ek}");
            assert_eq!(f.get(ek), Some(ev));
        }
        assert_eq!(f.architecture().unwrap(), "llama");
        let tensors = fixture_tensors();
        assert_eq!(f.tensor_count(), tensors.len());
        let mut expected_offset = 0u64;
        for (seed, (info, (name, dims, t))) in f.tensors().zip(&tensors).enumerate() {
            assert_eq!(info.name(), *name);
            assert_eq!(info.dims(), &dims[..]);
            assert_eq!(info.ggml_type(), *t);
            assert_eq!(info.offset(), expected_offset);
            assert_eq!(info.offset() % 64, 0);
            let rest: u64 = dims[1..].iter().product();
            let size = t.row_bytes(dims[0]).unwrap() * rest;
            assert_eq!(info.size_bytes(), size);
            assert_eq!(info.n_elements(), dims.iter().product::<u64>());
            assert_eq!(info.file_offset(), f.data_offset() + info.offset());
            assert_eq!(f.tensor_data(info), &pattern(size as usize, seed)[..]);
            assert_eq!(f.tensor(name), Some(info));
            expected_offset += size.div_ceil(64) * 64;
        }
        assert!(f.tensor("absent").is_none());
    }

    #[test]
    fn valid_v3_file_round_trips_every_value_type_nested_arrays_tensors_and_alignment_64() {
        check_round_trip(3);
    }

    #[test]
    fn valid_v2_file_round_trips_like_v3() {
        check_round_trip(2);
    }

    #[test]
    fn every_truncation_of_a_valid_file_is_an_error_and_never_a_panic() {
        let built = fixture(3, true);
        let full = parse(&built.bytes).unwrap();
        assert!(
            built.min_len < built.bytes.len(),
            "the fixture should end with padding"
        );
        for cut in 0..built.min_len {
            match parse(&built.bytes[..cut]) {
                Ok(_) => panic!(
                    "a file cut to {cut} of {} bytes was accepted",
                    built.min_len
                ),
                Err(GgufError::Truncated { .. } | GgufError::TensorOutOfBounds { .. }) => {}
                Err(GgufError::NotGguf { .. }) if cut < 4 => panic!("a cut magic is Truncated"),
                Err(e) => panic!("cut {cut}: unexpected error {e}"),
            }
        }
        // Only trailing padding missing: every tensor is whole, and reads the same.
        for cut in built.min_len..built.bytes.len() {
            let f = parse(&built.bytes[..cut]).expect("only padding is missing");
            assert!(f.metadata().eq(full.metadata()));
            for (a, b) in f.tensors().zip(full.tensors()) {
                assert_eq!(a, b);
                assert_eq!(f.tensor_data(a), full.tensor_data(b));
            }
        }
    }

    /// Runs `f`, which must fail within a second (a parser that allocated or looped per claimed
    /// item would abort on allocation or run for ages).
    fn fails_fast(bytes: Vec<u8>) -> GgufError {
        let start = Instant::now();
        let err = GgufFile::from_bytes(bytes).expect_err("absurd count must fail");
        assert!(
            start.elapsed() < Duration::from_secs(1),
            "took {:?}",
            start.elapsed()
        );
        err
    }

    #[test]
    fn tensor_count_2_pow_62_fails_fast_without_allocating() {
        let mut b = Builder::new(3).kv("a", MetaValue::U32(1));
        b.n_tensors = Some(1 << 62);
        let err = fails_fast(b.build().bytes);
        assert!(matches!(err, GgufError::Truncated { ref what, .. } if what.contains("tensor")));
    }

    #[test]
    fn metadata_count_2_pow_62_fails_fast_without_allocating() {
        let mut b = Builder::new(3).kv("a", MetaValue::U32(1));
        b.n_kv = Some(1 << 62);
        let err = fails_fast(b.build().bytes);
        assert!(matches!(err, GgufError::Truncated { ref what, .. } if what.contains("metadata")));
    }

    #[test]
    fn string_length_2_pow_63_fails_fast_without_allocating() {
        // As a key length, and as a string value length.
        let mut b = Builder::new(3);
        b.n_kv = Some(1);
        let built = b.build();
        let mut bytes = built.bytes[..built.infos_end].to_vec();
        bytes.extend_from_slice(&(1u64 << 63).to_le_bytes());
        bytes.extend_from_slice(b"key, and enough bytes for one entry");
        let err = fails_fast(bytes);
        assert!(matches!(err, GgufError::Truncated { needed, .. } if needed == 1 << 63));

        let payload = (1u64 << 63).to_le_bytes();
        let bytes = Builder::new(3).kv_raw(b"k", 8, &payload).build().bytes;
        let err = fails_fast(bytes);
        assert!(matches!(err, GgufError::Truncated { ref what, .. } if what.contains("'k'")));
    }

    #[test]
    fn array_length_2_pow_60_fails_fast_without_allocating() {
        for elem in [ValueType::U8, ValueType::String, ValueType::Array] {
            let mut payload = elem.id().to_le_bytes().to_vec();
            payload.extend_from_slice(&(1u64 << 60).to_le_bytes());
            let bytes = Builder::new(3).kv_raw(b"big", 9, &payload).build().bytes;
            let err = fails_fast(bytes);
            assert!(
                matches!(err, GgufError::Truncated { ref what, .. } if what.contains("'big'")),
                "{err}"
            );
        }
    }

    #[test]
    fn tensor_data_past_end_of_file_is_tensor_out_of_bounds() {
        // Offset far past the end, and an offset whose end overflows u64: the message gives
        // the real file offset, not one clamped to u64::MAX.
        for offset in [1 << 20, u64::MAX - 31] {
            let built = Builder::new(3)
                .tensor_raw(b"w", &[8], 0, 32, Some(offset))
                .build();
            let err = parse(&built.bytes).unwrap_err();
            let data_offset = built.data_start as u64;
            let GgufError::TensorOutOfBounds {
                ref tensor,
                offset: o,
                data_offset: d,
                size,
                ..
            } = err
            else {
                panic!("{err}");
            };
            assert_eq!(
                (tensor.as_str(), o, d, size),
                ("w", offset, data_offset, 32)
            );
            let msg = err.to_string();
            let real = u128::from(data_offset) + u128::from(offset);
            assert!(
                msg.contains(&format!("spans 32 bytes from byte offset {real} ")),
                "{msg}"
            );
            assert!(
                msg.contains(&format!("{data_offset} + tensor offset {offset}")),
                "{msg}"
            );
            assert!(!msg.contains(&u64::MAX.to_string()), "{msg}");
        }
        // Data 4 bytes short: dims say 9 f32 (36 bytes), the file holds 32 and no padding.
        let built = Builder::new(3).tensor_raw(b"w", &[9], 0, 32, None).build();
        let err = parse(&built.bytes[..built.min_len]).unwrap_err();
        assert!(
            matches!(err, GgufError::TensorOutOfBounds { size: 36, .. }),
            "{err}"
        );
    }

    #[test]
    fn misaligned_tensor_offset_is_an_error() {
        let b = Builder::new(3).tensor_raw(b"w", &[8], 0, 32, Some(4));
        let err = parse(&b.build().bytes).unwrap_err();
        assert!(matches!(
            err,
            GgufError::MisalignedTensor { ref tensor, offset: 4, alignment: 32 } if tensor == "w"
        ));
    }

    #[test]
    fn alignment_zero_and_non_powers_of_two_are_bad_alignment() {
        for a in [0u32, 12, 48, 3] {
            let b = Builder::new(3)
                .alignment(a)
                .tensor("w", &[8], GgmlType::F32);
            let err = parse(&b.build().bytes).unwrap_err();
            assert!(
                matches!(err, GgufError::BadAlignment(x) if x == u64::from(a)),
                "{err}"
            );
        }
        // Alignment stored as a string is a type error, not silently the default.
        let b = Builder::new(3).kv(KEY_GENERAL_ALIGNMENT, s("32"));
        let err = parse(&b.build().bytes).unwrap_err();
        assert!(matches!(err, GgufError::WrongType { .. }), "{err}");
        // Alignment 1 and u8-typed alignments are fine.
        let b = Builder::new(3)
            .alignment(1)
            .tensor("w", &[3], GgmlType::F32);
        assert_eq!(parse(&b.build().bytes).unwrap().alignment(), 1);
        let b = Builder::new(3).kv(KEY_GENERAL_ALIGNMENT, MetaValue::U8(16));
        assert_eq!(parse(&b.build().bytes).unwrap().alignment(), 16);
    }

    #[test]
    fn unknown_type_99_and_removed_types_are_unknown_tensor_type_naming_the_tensor() {
        for id in [99, 4, 5, 31, 32, 33, 36, 37, 38, 43, u32::MAX] {
            let b = Builder::new(3).tensor_raw(b"blk.7.w", &[32], id, 32, None);
            let err = parse(&b.build().bytes).unwrap_err();
            match &err {
                GgufError::UnknownTensorType { tensor, id: got } => {
                    assert_eq!((tensor.as_str(), *got), ("blk.7.w", id));
                    assert!(err.to_string().contains("blk.7.w"));
                }
                other => panic!("type {id}: {other}"),
            }
        }
    }

    #[test]
    fn versions_0_1_and_4_are_unsupported_version() {
        for v in [0, 1, 4, 0xFFFF] {
            let err = parse(&Builder::new(v).build().bytes).unwrap_err();
            assert!(
                matches!(err, GgufError::UnsupportedVersion(x) if x == v),
                "{err}"
            );
        }
    }

    #[test]
    fn big_endian_file_is_reported_as_big_endian() {
        for v in [2u32, 3] {
            let mut bytes = GGUF_MAGIC.to_vec();
            bytes.extend_from_slice(&v.to_be_bytes());
            bytes.extend_from_slice(&0u64.to_be_bytes());
            bytes.extend_from_slice(&0u64.to_be_bytes());
            let err = parse(&bytes).unwrap_err();
            assert!(matches!(err, GgufError::BigEndian));
            assert!(err.to_string().contains("big-endian"));
        }
    }

    #[test]
    fn bad_magic_is_not_gguf() {
        let mut b = Builder::new(3);
        b.magic = *b"GGML";
        let err = parse(&b.build().bytes).unwrap_err();
        assert!(matches!(err, GgufError::NotGguf { found } if &found == b"GGML"));
        // A short file that is not a GGUF prefix is NotGguf too; a GGUF prefix is Truncated.
        assert!(matches!(
            parse(b"PK").unwrap_err(),
            GgufError::NotGguf { .. }
        ));
        assert!(matches!(
            parse(b"GG").unwrap_err(),
            GgufError::Truncated { .. }
        ));
        assert!(matches!(
            parse(b"").unwrap_err(),
            GgufError::Truncated { .. }
        ));
    }

    #[test]
    fn invalid_utf8_in_key_string_value_or_tensor_name_is_invalid_utf8() {
        let b = Builder::new(3).kv_raw(b"bad\xffkey", 4, &1u32.to_le_bytes());
        let err = parse(&b.build().bytes).unwrap_err();
        assert!(matches!(err, GgufError::InvalidUtf8 { ref what } if what.contains("key")));

        let mut payload = Vec::new();
        put_str(&mut payload, b"\xc3\x28");
        let b = Builder::new(3).kv_raw(b"general.name", 8, &payload);
        let err = parse(&b.build().bytes).unwrap_err();
        assert!(
            matches!(err, GgufError::InvalidUtf8 { ref what } if what.contains("general.name")),
            "{err}"
        );

        let mut payload = 8u32.to_le_bytes().to_vec();
        payload.extend_from_slice(&2u64.to_le_bytes());
        put_str(&mut payload, b"ok");
        put_str(&mut payload, b"\x80");
        let b = Builder::new(3).kv_raw(b"tokenizer.ggml.tokens", 9, &payload);
        let err = parse(&b.build().bytes).unwrap_err();
        assert!(
            err.to_string().contains("'tokenizer.ggml.tokens'[1]"),
            "{err}"
        );

        let b = Builder::new(3).tensor_raw(b"w\xfe", &[8], 0, 32, None);
        let err = parse(&b.build().bytes).unwrap_err();
        assert!(matches!(err, GgufError::InvalidUtf8 { ref what } if what.contains("tensor")));
    }

    fn nested_u8_arrays(levels: usize) -> Vec<u8> {
        let mut payload = Vec::new();
        for _ in 1..levels {
            payload.extend_from_slice(&9u32.to_le_bytes());
            payload.extend_from_slice(&1u64.to_le_bytes());
        }
        payload.extend_from_slice(&0u32.to_le_bytes());
        payload.extend_from_slice(&1u64.to_le_bytes());
        payload.push(42);
        payload
    }

    #[test]
    fn nesting_depth_bomb_is_too_deep_without_stack_overflow() {
        // 8 levels parse; 9 do not; a 100 000-level bomb fails the same way, quickly.
        let ok = Builder::new(3)
            .kv_raw(b"deep", 9, &nested_u8_arrays(8))
            .build();
        let mut v = parse(&ok.bytes).unwrap().get("deep").unwrap().clone();
        for _ in 1..8 {
            v = v.as_array().unwrap()[0].clone();
        }
        assert_eq!(v, arr(ValueType::U8, vec![MetaValue::U8(42)]));
        for levels in [9, 100_000] {
            let b = Builder::new(3).kv_raw(b"deep", 9, &nested_u8_arrays(levels));
            let err = fails_fast(b.build().bytes);
            assert!(matches!(err, GgufError::TooDeep { ref key, limit: 8 } if key == "deep"));
        }
    }

    #[test]
    fn duplicate_tensor_names_and_duplicate_metadata_keys_are_errors() {
        let b = Builder::new(3)
            .tensor("w", &[8], GgmlType::F32)
            .tensor("w", &[8], GgmlType::F32);
        let err = parse(&b.build().bytes).unwrap_err();
        assert!(matches!(err, GgufError::DuplicateTensor(ref n) if n == "w"));
        let b = Builder::new(3)
            .kv("k", MetaValue::U8(1))
            .kv("k", MetaValue::U8(2));
        let err = parse(&b.build().bytes).unwrap_err();
        assert!(matches!(err, GgufError::DuplicateKey(ref k) if k == "k"));
    }

    #[test]
    fn dims_product_overflow_and_bad_dim_counts_are_errors() {
        let b = Builder::new(3).tensor_raw(b"w", &[1 << 32, 1 << 32, 2], 0, 32, None);
        let err = parse(&b.build().bytes).unwrap_err();
        assert!(matches!(err, GgufError::SizeOverflow { ref tensor, .. } if tensor == "w"));
        // Element count fits, byte size does not (2^62 f32).
        let b = Builder::new(3).tensor_raw(b"w", &[1 << 31, 1 << 31], 0, 32, None);
        let err = parse(&b.build().bytes).unwrap_err();
        assert!(matches!(err, GgufError::SizeOverflow { .. }), "{err}");
        for dims in [&[][..], &[1, 1, 1, 1, 1][..]] {
            let b = Builder::new(3).tensor_raw(b"w", dims, 0, 32, None);
            let err = parse(&b.build().bytes).unwrap_err();
            assert!(matches!(err, GgufError::BadDimCount { ref tensor, .. } if tensor == "w"));
        }
        // A huge dim count is rejected before any dim is read.
        let mut b = Builder::new(3);
        b.n_tensors = Some(1);
        let built = b.build();
        let mut bytes = built.bytes[..built.infos_end].to_vec();
        put_str(&mut bytes, b"w");
        bytes.extend_from_slice(&u32::MAX.to_le_bytes());
        bytes.extend_from_slice(&[0; 64]);
        let err = parse(&bytes).unwrap_err();
        assert!(matches!(
            err,
            GgufError::BadDimCount {
                n_dims: u32::MAX,
                ..
            }
        ));
    }

    #[test]
    fn rows_not_a_multiple_of_the_block_size_are_rejected() {
        let b = Builder::new(3).tensor_raw(b"w", &[48, 2], GgmlType::Q4_K.id(), 1024, None);
        let err = parse(&b.build().bytes).unwrap_err();
        assert!(matches!(
            err,
            GgufError::RowNotBlockMultiple {
                ne0: 48,
                block_size: 256,
                ggml_type: GgmlType::Q4_K,
                ..
            }
        ));
    }

    #[test]
    fn ggml_type_table_matches_ggml_type_traits() {
        let expected: &[(u32, &str, u64, u64)] = &[
            (0, "F32", 1, 4),
            (1, "F16", 1, 2),
            (2, "Q4_0", 32, 18),
            (3, "Q4_1", 32, 20),
            (6, "Q5_0", 32, 22),
            (7, "Q5_1", 32, 24),
            (8, "Q8_0", 32, 34),
            (9, "Q8_1", 32, 36),
            (10, "Q2_K", 256, 84),
            (11, "Q3_K", 256, 110),
            (12, "Q4_K", 256, 144),
            (13, "Q5_K", 256, 176),
            (14, "Q6_K", 256, 210),
            (15, "Q8_K", 256, 292),
            (16, "IQ2_XXS", 256, 66),
            (17, "IQ2_XS", 256, 74),
            (18, "IQ3_XXS", 256, 98),
            (19, "IQ1_S", 256, 50),
            (20, "IQ4_NL", 32, 18),
            (21, "IQ3_S", 256, 110),
            (22, "IQ2_S", 256, 82),
            (23, "IQ4_XS", 256, 136),
            (24, "I8", 1, 1),
            (25, "I16", 1, 2),
            (26, "I32", 1, 4),
            (27, "I64", 1, 8),
            (28, "F64", 1, 8),
            (29, "IQ1_M", 256, 56),
            (30, "BF16", 1, 2),
            (34, "TQ1_0", 256, 54),
            (35, "TQ2_0", 256, 66),
            (39, "MXFP4", 32, 17),
            (40, "NVFP4", 64, 36),
            (41, "Q1_0", 128, 18),
            (42, "Q2_0", 64, 18),
        ];
        assert_eq!(GgmlType::ALL.len(), expected.len());
        for (&t, &(id, name, block, size)) in GgmlType::ALL.iter().zip(expected) {
            assert_eq!(
                (t.id(), t.name(), t.block_size(), t.type_size()),
                (id, name, block, size)
            );
            assert_eq!(GgmlType::from_id(id), Some(t));
            assert_eq!(t.to_string(), name);
        }
        for id in [4, 5, 31, 32, 33, 36, 37, 38, 43, 99] {
            assert_eq!(GgmlType::from_id(id), None, "id {id}");
        }
        assert_eq!(GgmlType::Q4_K.row_bytes(512).unwrap(), 288);
        assert_eq!(GgmlType::F32.row_bytes(3).unwrap(), 12);
        assert!(matches!(
            GgmlType::Q8_0.row_bytes(33),
            Err(GgufError::NotBlockMultiple {
                n: 33,
                block_size: 32,
                ..
            })
        ));
        assert!(matches!(
            GgmlType::F64.row_bytes(u64::MAX),
            Err(GgufError::RowBytesOverflow { .. })
        ));
    }

    #[test]
    fn typed_getters_accept_fitting_integers_and_report_typed_errors() {
        let f = parse(&fixture(3, true).bytes).unwrap();
        assert_eq!(f.get_u32("t.u8").unwrap(), 200);
        assert!(matches!(
            f.get_u32("t.u64"),
            Err(GgufError::OutOfRange { .. })
        ));
        assert!(
            matches!(f.get_u32("t.i8"), Err(GgufError::OutOfRange { ref key, .. }) if key == "t.i8")
        );
        assert!(matches!(
            f.get_u32("t.string"),
            Err(GgufError::WrongType { ref found, .. }) if found == "string"
        ));
        assert!(matches!(
            f.get_u32("t.true"),
            Err(GgufError::WrongType { .. })
        ));
        assert!(matches!(f.get_u32("absent"), Err(GgufError::MissingKey(ref k)) if k == "absent"));
        assert_eq!(f.get_u32_opt("absent").unwrap(), None);
        assert_eq!(f.get_u32_opt("llama.block_count").unwrap(), Some(2));
        assert!(f.get_u32_opt("t.string").is_err());
        assert_eq!(f.get_u64("t.u64").unwrap(), 1 << 40);
        assert_eq!(f.get_u64("t.u32").unwrap(), 4_000_000_000);
        assert!(matches!(
            f.get_u64("t.i64"),
            Err(GgufError::OutOfRange { .. })
        ));
        assert_eq!(f.get_i32("t.i16").unwrap(), -30_000);
        assert_eq!(f.get_f32("t.f32").unwrap(), 1.5);
        assert_eq!(f.get_f32("t.f64").unwrap(), -2.25);
        assert!(matches!(
            f.get_f32("t.u32"),
            Err(GgufError::WrongType { .. })
        ));
        assert!(f.get_bool("t.true").unwrap());
        assert!(!f.get_bool("t.false").unwrap());
        assert_eq!(f.get_bool_opt("absent").unwrap(), None);
        assert_eq!(f.get_str("t.string").unwrap(), "héllo ✓ wörld");
        assert_eq!(f.get_str_opt("t.empty_string").unwrap(), Some(""));
        assert_eq!(
            f.get_str_array("tokenizer.ggml.tokens").unwrap(),
            ["<s>", "a", "é"]
        );
        assert!(matches!(
            f.get_str_array("t.u32_array"),
            Err(GgufError::WrongType { ref found, .. }) if found == "array of u32"
        ));
        assert_eq!(
            f.get_i32_array("tokenizer.ggml.token_type").unwrap(),
            [3, 1]
        );
        assert_eq!(f.get_i32_array("t.u8_array").unwrap(), [1, 255]);
        assert!(matches!(
            f.get_i32_array("t.u32_array"),
            Err(GgufError::OutOfRange { .. })
        ));
        assert_eq!(
            f.get_u32_array("t.u32_array").unwrap(),
            [1, 2, 4_000_000_000]
        );
        assert!(matches!(
            f.get_i32_array("t.bool_array"),
            Err(GgufError::WrongType { .. })
        ));
        assert_eq!(f.get_i32_array_opt("t.empty_array").unwrap(), Some(vec![]));
        assert_eq!(
            f.get_f32_array("tokenizer.ggml.scores").unwrap(),
            [0.0, -1.5]
        );
        assert_eq!(f.get_f32_array("t.f64_array").unwrap(), [0.25]);
        assert_eq!(f.get_f32_array_opt("absent").unwrap(), None);
        assert!(matches!(
            f.get_str_array("t.nested"),
            Err(GgufError::WrongType { .. })
        ));
    }

    #[test]
    fn unknown_value_type_and_invalid_bool_name_the_key() {
        let b = Builder::new(3).kv_raw(b"general.x", 13, &[0; 8]);
        let err = parse(&b.build().bytes).unwrap_err();
        assert!(matches!(
            err,
            GgufError::UnknownValueType { ref key, index: None, id: 13, offset: 41 }
                if key == "general.x"
        ));
        let mut payload = 77u32.to_le_bytes().to_vec();
        payload.extend_from_slice(&0u64.to_le_bytes());
        let b = Builder::new(3).kv_raw(b"arr", 9, &payload);
        let err = parse(&b.build().bytes).unwrap_err();
        assert!(matches!(err, GgufError::UnknownValueType { id: 77, .. }));
        let b = Builder::new(3).kv_raw(b"flag", 7, &[2]);
        let err = parse(&b.build().bytes).unwrap_err();
        assert!(matches!(
            err,
            GgufError::InvalidBool { ref key, index: None, value: 2, .. } if key == "flag"
        ));
    }

    #[test]
    fn messages_quote_metadata_keys_once() {
        let b = Builder::new(3).kv_raw(b"flag", 7, &[2]);
        let msg = parse(&b.build().bytes).unwrap_err().to_string();
        assert!(msg.starts_with("metadata key 'flag' holds"), "{msg}");
        // A bool inside an array, and an array whose element type is unknown.
        let mut payload = 7u32.to_le_bytes().to_vec();
        payload.extend_from_slice(&2u64.to_le_bytes());
        payload.extend_from_slice(&[1, 5]);
        let b = Builder::new(3).kv_raw(b"flags", 9, &payload);
        let err = parse(&b.build().bytes).unwrap_err();
        assert!(matches!(
            err,
            GgufError::InvalidBool { ref key, index: Some(1), value: 5, .. } if key == "flags"
        ));
        let msg = err.to_string();
        assert!(msg.starts_with("metadata key 'flags'[1] holds"), "{msg}");
        let mut payload = 77u32.to_le_bytes().to_vec();
        payload.extend_from_slice(&0u64.to_le_bytes());
        let b = Builder::new(3).kv_raw(b"tokenizer.ggml.tokens", 9, &payload);
        let msg = parse(&b.build().bytes).unwrap_err().to_string();
        assert!(
            msg.starts_with("metadata key 'tokenizer.ggml.tokens' has unknown value type id 77"),
            "{msg}"
        );
        for msg in [
            msg,
            GgufError::MissingKey("k".into()).to_string(),
            GgufError::DuplicateKey("k".into()).to_string(),
        ] {
            assert!(!msg.contains("''"), "{msg}");
        }
    }

    #[test]
    fn file_without_tensors_parses_without_padding() {
        let built = Builder::new(3)
            .kv("general.architecture", s("llama"))
            .build();
        assert!(
            !built.infos_end.is_multiple_of(32),
            "the cut below should remove padding"
        );
        let f = parse(&built.bytes[..built.infos_end]).unwrap();
        assert_eq!(f.tensor_count(), 0);
        assert_eq!(f.architecture().unwrap(), "llama");
        let f = parse(&Builder::new(2).build().bytes).unwrap();
        assert_eq!((f.metadata_len(), f.tensor_count()), (0, 0));
        assert!(matches!(f.architecture(), Err(GgufError::MissingKey(_))));
    }

    #[test]
    fn open_maps_the_file_and_reads_what_from_bytes_reads() {
        let built = fixture(3, true);
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("fixture.gguf");
        std::fs::write(&path, &built.bytes).unwrap();
        let mapped = GgufFile::open(&path).unwrap();
        let owned = parse(&built.bytes).unwrap();
        assert!(mapped.metadata().eq(owned.metadata()));
        assert!(mapped.tensors().eq(owned.tensors()));
        for t in mapped.tensors() {
            assert_eq!(mapped.tensor_data(t), owned.tensor_data(t));
            // The mapping is page-aligned, so aligned offsets are aligned addresses.
            assert_eq!(mapped.tensor_data(t).as_ptr() as usize % 64, 0);
        }
        let missing = dir.path().join("missing.gguf");
        let err = GgufFile::open(&missing).unwrap_err();
        assert!(matches!(err, GgufError::Io { .. }));
        assert!(err.to_string().contains("missing.gguf"));
        // The OS error is the source, not repeated in the message.
        let source = std::error::Error::source(&err).unwrap().to_string();
        assert!(source.contains("os error"), "{source}");
        assert!(!err.to_string().contains("os error"), "{err}");
        let empty = dir.path().join("empty.gguf");
        std::fs::write(&empty, b"").unwrap();
        assert!(matches!(
            GgufFile::open(&empty).unwrap_err(),
            GgufError::Truncated { .. }
        ));
    }

    /// `GgufFile::open(path)`, failing the test if it does not return within 5 s.
    fn open_within_5s(path: &Path) -> Result<GgufFile, GgufError> {
        let (tx, rx) = std::sync::mpsc::channel();
        let owned = path.to_path_buf();
        std::thread::spawn(move || {
            let _ = tx.send(GgufFile::open(&owned));
        });
        rx.recv_timeout(Duration::from_secs(5))
            .unwrap_or_else(|_| panic!("opening {} hangs", path.display()))
    }

    fn assert_not_regular(path: &Path, kind: &str) {
        let err = open_within_5s(path).expect_err("not a regular file");
        let msg = err.to_string();
        assert!(
            matches!(err, GgufError::NotRegularFile { kind: k, .. } if k.contains(kind)),
            "{}: {msg}",
            path.display()
        );
        assert!(
            msg.starts_with(&format!("{} is not a regular file", path.display())),
            "{msg}"
        );
        assert!(msg.contains("pass the path of a .gguf file"), "{msg}");
        assert!(
            !msg.contains("bytes long") && !msg.contains("fetch it again"),
            "{msg}"
        );
    }

    #[test]
    fn open_rejects_directories_devices_fifos_and_proc_files_without_blocking() {
        let dir = tempfile::tempdir().unwrap();
        assert_not_regular(dir.path(), "directory");
        #[cfg(unix)]
        {
            for dev in ["/dev/zero", "/dev/urandom", "/dev/null"] {
                assert_not_regular(Path::new(dev), "character device");
            }
            // A FIFO with no writer: opening it for reading would block forever.
            let fifo = dir.path().join("model.gguf");
            let status = std::process::Command::new("mkfifo")
                .arg(&fifo)
                .status()
                .expect("mkfifo runs");
            assert!(status.success());
            assert_not_regular(&fifo, "FIFO");
        }
        #[cfg(target_os = "linux")]
        {
            assert_not_regular(Path::new("/proc/self/status"), "/proc");
            // Sysfs files claim 4096 bytes and cannot be mapped (ENODEV).
            let sys = Path::new("/sys/devices/system/cpu/online");
            if sys.is_file() {
                assert_not_regular(sys, "/sys");
            }
        }
        // A link to a regular file is that file.
        #[cfg(unix)]
        {
            let real = dir.path().join("real.gguf");
            std::fs::write(&real, fixture(3, false).bytes).unwrap();
            let link = dir.path().join("link.gguf");
            std::os::unix::fs::symlink(&real, &link).unwrap();
            assert!(GgufFile::open(&link).is_ok());
        }
    }

    #[test]
    fn error_messages_name_the_problem_its_location_and_suggest_fetching_again() {
        let built = fixture(3, false);
        let err = parse(&built.bytes[..100]).unwrap_err();
        let msg = err.to_string();
        assert!(
            msg.contains("truncated") && msg.contains("byte offset"),
            "{msg}"
        );
        assert!(
            msg.contains("incomplete") && msg.contains("fetch it again"),
            "{msg}"
        );
        let err = parse(&built.bytes[..built.min_len - 1])
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("'t.q6_k'") && err.contains("fetch it again"),
            "{err}"
        );
        let b = Builder::new(3).tensor_raw(b"w", &[8], 4, 32, None);
        let err = parse(&b.build().bytes).unwrap_err().to_string();
        assert!(err.contains("'w'") && err.contains("removed"), "{err}");
        let err = parse(&Builder::new(1).build().bytes)
            .unwrap_err()
            .to_string();
        assert!(err.contains("version 1"), "{err}");
    }

    #[test]
    fn real_smollm2_model_has_the_expected_tensors_and_metadata() {
        let Some(path) = model_path() else { return };
        let f = GgufFile::open(&path).unwrap();
        assert_eq!(f.tensor_count(), 272);
        assert_eq!(f.architecture().unwrap(), "llama");
        assert_eq!(f.get_u32("llama.block_count").unwrap(), 30);
        assert_eq!(
            f.get_str_array("tokenizer.ggml.tokens").unwrap().len(),
            49152
        );
        let embd = f.tensor("token_embd.weight").unwrap();
        assert_eq!(embd.ggml_type(), GgmlType::Q8_0);
        assert_eq!(embd.dims(), [576, 49152]);
        for t in f.tensors().filter(|t| t.name() != "token_embd.weight") {
            match t.dims().len() {
                2 => assert_eq!(t.ggml_type(), GgmlType::Q4_1, "{}", t.name()),
                1 => {
                    assert!(t.name().ends_with("norm.weight"), "{}", t.name());
                    assert_eq!(t.ggml_type(), GgmlType::F32, "{}", t.name());
                }
                n => panic!("{}: {n} dims", t.name()),
            }
            assert_eq!(f.tensor_data(t).len() as u64, t.size_bytes());
        }
    }
}
