//! GGUF v3 writer: metadata of every value type, tensor infos and aligned tensor data, written
//! atomically. The file goes to a temporary file in the destination's folder, is flushed and
//! synced, then renamed over the destination, so a reader sees the old file or the whole new one;
//! on any error the temporary file is removed. Tensor data is streamed from borrowed slices (a
//! mapped [`GgufFile`], say) or from readers, never gathered into one buffer.
//!
//! The layout is the one llama.cpp's `gguf_write_out` produces: header, metadata, tensor infos,
//! zero padding to `general.alignment`, then each tensor at its recorded offset, each followed by
//! zero padding to the alignment.

use std::borrow::Cow;
use std::collections::HashSet;
use std::fs::File;
use std::io::{BufWriter, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use super::gguf::{
    GgmlType, GgufFile, MetaValue, ValueType, GGML_MAX_DIMS, GGUF_DEFAULT_ALIGNMENT, GGUF_MAGIC,
    KEY_GENERAL_ALIGNMENT, MAX_ARRAY_NESTING,
};

/// The GGUF version this writer produces.
pub const GGUF_WRITE_VERSION: u32 = 3;
/// Longest tensor name llama.cpp accepts, in bytes (`GGML_MAX_NAME` is 64 with the NUL).
pub const MAX_TENSOR_NAME_BYTES: usize = 63;
/// Buffer between the encoder and the file.
const WRITE_BUFFER_BYTES: usize = 1 << 20;
/// Chunk size when copying a tensor from a reader.
const COPY_CHUNK_BYTES: usize = 1 << 16;

/// Everything that can go wrong building or writing a GGUF file.
#[derive(thiserror::Error, Debug)]
pub enum GgufWriteError {
    #[error(
        "cannot write {}: the folder {} does not exist; create it first or choose another \
         destination",
        path.display(),
        dir.display()
    )]
    FolderMissing { path: PathBuf, dir: PathBuf },
    #[error(
        "cannot write {}: {} is not a folder; choose a destination inside a folder",
        path.display(),
        dir.display()
    )]
    NotAFolder { path: PathBuf, dir: PathBuf },
    #[error(
        "cannot write {}: it is a folder; pass a file name such as {}",
        path.display(),
        path.join("model.gguf").display()
    )]
    DestinationIsFolder { path: PathBuf },
    /// The OS error is the source.
    #[error(
        "cannot write {}: the folder {} is not writable (read-only or permission denied); \
         choose another destination or fix its permissions",
        path.display(),
        dir.display()
    )]
    NotWritable {
        path: PathBuf,
        dir: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "cannot write {}: the disk is full (or over quota) after {written} bytes; free space \
         on that file system or write elsewhere (nothing was left behind)",
        path.display()
    )]
    DiskFull {
        path: PathBuf,
        /// Bytes the encoder had produced when the write failed.
        written: u64,
        #[source]
        source: std::io::Error,
    },
    /// Any other I/O failure; the OS error is the source.
    #[error("cannot write GGUF file {}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "tensor '{tensor}' has {actual} bytes of data, but dims {dims:?} of type {ggml_type} \
         take {expected}; check the dims (GGML order, row length first) and the type"
    )]
    TensorSizeMismatch {
        tensor: String,
        dims: Vec<u64>,
        ggml_type: String,
        expected: u64,
        actual: u64,
    },
    #[error(
        "tensor '{tensor}' has rows of {ne0} elements, not a multiple of the {ggml_type} block \
         size {block_size}; dims are in GGML order (row length first)"
    )]
    RowNotBlockMultiple {
        tensor: String,
        ggml_type: GgmlType,
        ne0: u64,
        block_size: u64,
    },
    #[error(
        "tensor '{tensor}' has ggml type id {id}, which this writer does not know; pass its byte \
         size explicitly with `add_tensor_sized`"
    )]
    UnknownTensorType { tensor: String, id: u32 },
    #[error("tensor '{tensor}' has {n_dims} dimensions (must be 1 to {GGML_MAX_DIMS})")]
    BadDimCount { tensor: String, n_dims: usize },
    #[error("tensor '{tensor}' with dims {dims:?}: element count or byte size exceeds i64::MAX")]
    SizeOverflow { tensor: String, dims: Vec<u64> },
    #[error("tensor name '{0}' is added twice; tensor names must be unique")]
    DuplicateTensor(String),
    #[error(
        "tensor name '{name}' is {len} bytes long; llama.cpp accepts at most \
         {MAX_TENSOR_NAME_BYTES}, so shorten it"
    )]
    NameTooLong { name: String, len: usize },
    #[error(
        "tensor '{tensor}' was announced as {expected} bytes but its reader gave {got}{}; pass \
         the reader's exact length",
        if *.got > *.expected { " or more" } else { "" }
    )]
    StreamLength {
        tensor: String,
        expected: u64,
        got: u64,
    },
    #[error("{KEY_GENERAL_ALIGNMENT} must be a nonzero power of two held as u32, not {found}")]
    BadAlignment { found: String },
    #[error(
        "metadata key '{key}': an array of {elem_type} holds a {found} at index {index}; every \
         item must have the array's element type"
    )]
    MixedArray {
        key: String,
        elem_type: ValueType,
        index: usize,
        found: String,
    },
    #[error("metadata key '{key}' nests arrays more than {MAX_ARRAY_NESTING} levels deep")]
    TooDeep { key: String },
}

/// Where a tensor's bytes come from.
pub enum TensorData<'a> {
    /// Bytes in memory, borrowed (e.g. from a mapped file) or owned.
    Bytes(Cow<'a, [u8]>),
    /// A reader that yields exactly the tensor's byte size, read while the file is written.
    Reader(Box<dyn Read + 'a>),
}

impl<'a> From<&'a [u8]> for TensorData<'a> {
    fn from(bytes: &'a [u8]) -> Self {
        Self::Bytes(Cow::Borrowed(bytes))
    }
}

impl From<Vec<u8>> for TensorData<'_> {
    fn from(bytes: Vec<u8>) -> Self {
        Self::Bytes(Cow::Owned(bytes))
    }
}

impl<'a> From<Cow<'a, [u8]>> for TensorData<'a> {
    fn from(bytes: Cow<'a, [u8]>) -> Self {
        Self::Bytes(bytes)
    }
}

struct PendingTensor<'a> {
    name: String,
    dims: Vec<u64>,
    type_id: u32,
    size: u64,
    data: TensorData<'a>,
}

/// Builds a GGUF v3 file: metadata in insertion order, tensors in insertion order.
pub struct GgufWriter<'a> {
    metadata: Vec<(String, MetaValue)>,
    tensors: Vec<PendingTensor<'a>>,
    tensor_names: HashSet<String>,
}

impl Default for GgufWriter<'_> {
    fn default() -> Self {
        Self::new()
    }
}

impl<'a> GgufWriter<'a> {
    /// An empty file: no metadata (alignment 32), no tensors.
    pub fn new() -> Self {
        Self {
            metadata: Vec::new(),
            tensors: Vec::new(),
            tensor_names: HashSet::new(),
        }
    }

    /// Starts from `src`'s metadata, all of it in file order (including `general.alignment`);
    /// no tensors. Drop or override keys with [`Self::remove`] and [`Self::set`].
    pub fn with_metadata_of(src: &GgufFile) -> Self {
        let mut w = Self::new();
        w.metadata = src
            .metadata()
            .map(|(k, v)| (k.to_string(), v.clone()))
            .collect();
        w
    }

    /// Starts from `src`'s metadata, keeping only the keys `keep` accepts.
    pub fn with_metadata_of_filtered(src: &GgufFile, keep: impl Fn(&str) -> bool) -> Self {
        let mut w = Self::with_metadata_of(src);
        w.metadata.retain(|(k, _)| keep(k));
        w
    }

    /// Sets `key` to `value`: an existing key keeps its place, a new one goes last.
    pub fn set(&mut self, key: impl Into<String>, value: MetaValue) {
        let key = key.into();
        match self.metadata.iter_mut().find(|(k, _)| *k == key) {
            Some((_, v)) => *v = value,
            None => self.metadata.push((key, value)),
        }
    }

    /// Removes `key`, returning its value.
    pub fn remove(&mut self, key: &str) -> Option<MetaValue> {
        let i = self.metadata.iter().position(|(k, _)| k == key)?;
        Some(self.metadata.remove(i).1)
    }

    /// The value set for `key`.
    pub fn get(&self, key: &str) -> Option<&MetaValue> {
        self.metadata.iter().find(|(k, _)| k == key).map(|(_, v)| v)
    }

    /// Sets `general.alignment` (a nonzero power of two).
    pub fn set_alignment(&mut self, alignment: u32) -> Result<(), GgufWriteError> {
        if !alignment.is_power_of_two() {
            return Err(GgufWriteError::BadAlignment {
                found: alignment.to_string(),
            });
        }
        self.set(KEY_GENERAL_ALIGNMENT, MetaValue::U32(alignment));
        Ok(())
    }

    /// The alignment the file will be laid out with: `general.alignment`, default 32.
    pub fn alignment(&self) -> Result<u64, GgufWriteError> {
        match self.get(KEY_GENERAL_ALIGNMENT) {
            None => Ok(GGUF_DEFAULT_ALIGNMENT),
            Some(MetaValue::U32(a)) if a.is_power_of_two() => Ok(u64::from(*a)),
            Some(MetaValue::U32(a)) => Err(GgufWriteError::BadAlignment {
                found: a.to_string(),
            }),
            Some(v) => Err(GgufWriteError::BadAlignment {
                found: format!("a {}", v.type_name()),
            }),
        }
    }

    /// Number of tensors added so far.
    pub fn tensor_count(&self) -> usize {
        self.tensors.len()
    }

    /// Adds a tensor of a known ggml type; `data` must hold exactly the bytes `dims` (GGML
    /// order, row length first) of that type take. Unknown type ids need [`Self::add_tensor_sized`].
    pub fn add_tensor(
        &mut self,
        name: impl Into<String>,
        dims: &[u64],
        type_id: u32,
        data: impl Into<TensorData<'a>>,
    ) -> Result<(), GgufWriteError> {
        let name = name.into();
        let data = data.into();
        let Some(ggml_type) = GgmlType::from_id(type_id) else {
            return Err(GgufWriteError::UnknownTensorType {
                tensor: name,
                id: type_id,
            });
        };
        let size = tensor_bytes(&name, dims, ggml_type)?;
        let actual = match &data {
            TensorData::Bytes(b) => b.len() as u64,
            // A reader is checked as it is copied.
            TensorData::Reader(_) => size,
        };
        if actual != size {
            return Err(GgufWriteError::TensorSizeMismatch {
                tensor: name,
                dims: dims.to_vec(),
                ggml_type: ggml_type.to_string(),
                expected: size,
                actual,
            });
        }
        self.push(name, dims, type_id, size, data)
    }

    /// Adds a tensor with an explicit byte size, for any type id (passed through unchanged).
    /// For a known type the size must also match the dims; a reader must yield `size` bytes.
    pub fn add_tensor_sized(
        &mut self,
        name: impl Into<String>,
        dims: &[u64],
        type_id: u32,
        size: u64,
        data: impl Into<TensorData<'a>>,
    ) -> Result<(), GgufWriteError> {
        let name = name.into();
        let data = data.into();
        check_dims(&name, dims)?;
        let expected = match GgmlType::from_id(type_id) {
            Some(t) => tensor_bytes(&name, dims, t)?,
            None => size,
        };
        let actual = match &data {
            TensorData::Bytes(b) => b.len() as u64,
            TensorData::Reader(_) => size,
        };
        if size != expected || actual != expected {
            let ggml_type = GgmlType::from_id(type_id)
                .map(|t| t.to_string())
                .unwrap_or_else(|| format!("id {type_id}"));
            return Err(GgufWriteError::TensorSizeMismatch {
                tensor: name,
                dims: dims.to_vec(),
                ggml_type,
                expected,
                actual: if actual != expected { actual } else { size },
            });
        }
        self.push(name, dims, type_id, size, data)
    }

    /// Adds every tensor of `src`, its bytes borrowed from `src` (no copy until written).
    pub fn add_tensors_of(&mut self, src: &'a GgufFile) -> Result<(), GgufWriteError> {
        for t in src.tensors() {
            self.add_tensor(t.name(), t.dims(), t.ggml_type().id(), src.tensor_data(t))?;
        }
        Ok(())
    }

    fn push(
        &mut self,
        name: String,
        dims: &[u64],
        type_id: u32,
        size: u64,
        data: TensorData<'a>,
    ) -> Result<(), GgufWriteError> {
        if name.len() > MAX_TENSOR_NAME_BYTES {
            let len = name.len();
            return Err(GgufWriteError::NameTooLong { name, len });
        }
        if !self.tensor_names.insert(name.clone()) {
            return Err(GgufWriteError::DuplicateTensor(name));
        }
        self.tensors.push(PendingTensor {
            name,
            dims: dims.to_vec(),
            type_id,
            size,
            data,
        });
        Ok(())
    }

    /// Writes the file to `path` atomically (temporary file in the same folder, synced, renamed)
    /// and returns its length in bytes. On error nothing is left behind and an existing file at
    /// `path` is untouched.
    pub fn write(self, path: &Path) -> Result<u64, GgufWriteError> {
        // 1. Check the whole file can be encoded before touching the disk.
        self.validate()?;

        // 2. Check the destination folder, then create the temporary file next to `path`.
        let dir = destination_folder(path)?;
        let (guard, file) = TempGuard::create(path, &dir)?;

        // 3. Stream everything through a buffer, flush, sync.
        let io_err = |e: std::io::Error, written: u64| classify_write_error(path, &dir, written, e);
        let mut out = CountingWriter::new(BufWriter::with_capacity(WRITE_BUFFER_BYTES, file));
        let len = match self.encode(&mut out) {
            Ok(len) => len,
            Err(EncodeError::Io(e)) => return Err(io_err(e, out.written)),
            Err(EncodeError::Format(e)) => return Err(e),
        };
        let written = out.written;
        let file = out
            .inner
            .into_inner()
            .map_err(|e| io_err(e.into_error(), written))?;
        file.sync_all().map_err(|e| io_err(e, written))?;
        drop(file);

        // 4. Rename over the destination and make the rename durable.
        guard.persist(path).map_err(|e| io_err(e, written))?;
        sync_folder(&dir);
        Ok(len)
    }

    /// Encodes the file into `out` (any writer: a socket, a buffer) and returns its length.
    /// Not atomic: on error `out` holds a partial file.
    pub fn write_to(self, out: &mut impl Write) -> Result<u64, GgufWriteError> {
        self.validate()?;
        let mut counting = CountingWriter::new(out);
        match self.encode(&mut counting) {
            Ok(len) => Ok(len),
            Err(EncodeError::Format(e)) => Err(e),
            Err(EncodeError::Io(source)) => Err(classify_stream_error(counting.written, source)),
        }
    }

    /// Checks the metadata: alignment, array element types, nesting depth.
    fn validate(&self) -> Result<(), GgufWriteError> {
        self.alignment()?;
        for (key, value) in &self.metadata {
            validate_value(key, value, 0)?;
        }
        Ok(())
    }

    fn encode<W: Write>(self, out: &mut CountingWriter<W>) -> Result<u64, EncodeError> {
        let alignment = self.alignment()?;

        // Header.
        out.write_all(&GGUF_MAGIC)?;
        out.write_all(&GGUF_WRITE_VERSION.to_le_bytes())?;
        out.write_all(&(self.tensors.len() as u64).to_le_bytes())?;
        out.write_all(&(self.metadata.len() as u64).to_le_bytes())?;

        // Metadata.
        for (key, value) in &self.metadata {
            write_str(out, key)?;
            out.write_all(&value.value_type().id().to_le_bytes())?;
            write_value(out, value)?;
        }

        // Tensor infos, each tensor placed at the next aligned offset of the data section.
        let mut offset = 0u64;
        for t in &self.tensors {
            write_str(out, &t.name)?;
            out.write_all(&(t.dims.len() as u32).to_le_bytes())?;
            for d in &t.dims {
                out.write_all(&d.to_le_bytes())?;
            }
            out.write_all(&t.type_id.to_le_bytes())?;
            out.write_all(&offset.to_le_bytes())?;
            offset = padded(offset, t.size, alignment).ok_or_else(|| overflow(t))?;
        }
        pad(out, alignment)?;

        // Tensor data, each padded to the alignment.
        for t in self.tensors {
            match t.data {
                TensorData::Bytes(bytes) => out.write_all(&bytes)?,
                TensorData::Reader(reader) => copy_exact(reader, out, &t.name, t.size)?,
            }
            pad(out, alignment)?;
        }
        Ok(out.written)
    }
}

/// Bytes a tensor of `ggml_type` with `dims` takes, checking the dims as llama.cpp reads them.
fn tensor_bytes(name: &str, dims: &[u64], ggml_type: GgmlType) -> Result<u64, GgufWriteError> {
    check_dims(name, dims)?;
    let overflow = || GgufWriteError::SizeOverflow {
        tensor: name.to_string(),
        dims: dims.to_vec(),
    };
    let ne0 = dims.first().copied().unwrap_or(1);
    let block_size = ggml_type.block_size();
    if !ne0.is_multiple_of(block_size) {
        return Err(GgufWriteError::RowNotBlockMultiple {
            tensor: name.to_string(),
            ggml_type,
            ne0,
            block_size,
        });
    }
    let row = ggml_type.row_bytes(ne0).map_err(|_| overflow())?;
    let size = dims
        .iter()
        .skip(1)
        .try_fold(row, |acc, &d| acc.checked_mul(d))
        .ok_or_else(overflow)?;
    if size > i64::MAX as u64 {
        return Err(overflow());
    }
    Ok(size)
}

/// 1 to 4 dims, each and their product within i64 (llama.cpp reads them as i64).
fn check_dims(name: &str, dims: &[u64]) -> Result<(), GgufWriteError> {
    if dims.is_empty() || dims.len() > GGML_MAX_DIMS {
        return Err(GgufWriteError::BadDimCount {
            tensor: name.to_string(),
            n_dims: dims.len(),
        });
    }
    let product = dims.iter().try_fold(1u64, |acc, &d| acc.checked_mul(d));
    match product {
        Some(n) if n <= i64::MAX as u64 && dims.iter().all(|&d| d <= i64::MAX as u64) => Ok(()),
        _ => Err(GgufWriteError::SizeOverflow {
            tensor: name.to_string(),
            dims: dims.to_vec(),
        }),
    }
}

fn validate_value(key: &str, value: &MetaValue, depth: u32) -> Result<(), GgufWriteError> {
    let MetaValue::Array { elem_type, items } = value else {
        return Ok(());
    };
    if depth >= MAX_ARRAY_NESTING {
        return Err(GgufWriteError::TooDeep {
            key: key.to_string(),
        });
    }
    for (index, item) in items.iter().enumerate() {
        if item.value_type() != *elem_type {
            return Err(GgufWriteError::MixedArray {
                key: key.to_string(),
                elem_type: *elem_type,
                index,
                found: item.type_name(),
            });
        }
        validate_value(key, item, depth + 1)?;
    }
    Ok(())
}

fn overflow(t: &PendingTensor<'_>) -> GgufWriteError {
    GgufWriteError::SizeOverflow {
        tensor: t.name.clone(),
        dims: t.dims.clone(),
    }
}

/// `offset + size` rounded up to `alignment`.
fn padded(offset: u64, size: u64, alignment: u64) -> Option<u64> {
    offset
        .checked_add(size)?
        .checked_next_multiple_of(alignment)
}

/// What `encode` can fail with: a format problem found late, or the writer's error.
enum EncodeError {
    Format(GgufWriteError),
    Io(std::io::Error),
}

impl From<std::io::Error> for EncodeError {
    fn from(e: std::io::Error) -> Self {
        Self::Io(e)
    }
}

impl From<GgufWriteError> for EncodeError {
    fn from(e: GgufWriteError) -> Self {
        Self::Format(e)
    }
}

/// Counts the bytes written, for padding and error reports.
struct CountingWriter<W> {
    inner: W,
    written: u64,
}

impl<W: Write> CountingWriter<W> {
    fn new(inner: W) -> Self {
        Self { inner, written: 0 }
    }
}

impl<W: Write> Write for CountingWriter<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.written += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

fn write_str<W: Write>(out: &mut W, s: &str) -> std::io::Result<()> {
    out.write_all(&(s.len() as u64).to_le_bytes())?;
    out.write_all(s.as_bytes())
}

/// A value without its type id (the form it has inside an array).
fn write_value<W: Write>(out: &mut W, value: &MetaValue) -> std::io::Result<()> {
    match value {
        MetaValue::U8(x) => out.write_all(&[*x]),
        MetaValue::I8(x) => out.write_all(&x.to_le_bytes()),
        MetaValue::U16(x) => out.write_all(&x.to_le_bytes()),
        MetaValue::I16(x) => out.write_all(&x.to_le_bytes()),
        MetaValue::U32(x) => out.write_all(&x.to_le_bytes()),
        MetaValue::I32(x) => out.write_all(&x.to_le_bytes()),
        MetaValue::U64(x) => out.write_all(&x.to_le_bytes()),
        MetaValue::I64(x) => out.write_all(&x.to_le_bytes()),
        MetaValue::F32(x) => out.write_all(&x.to_le_bytes()),
        MetaValue::F64(x) => out.write_all(&x.to_le_bytes()),
        MetaValue::Bool(x) => out.write_all(&[u8::from(*x)]),
        MetaValue::String(s) => write_str(out, s),
        MetaValue::Array { elem_type, items } => {
            out.write_all(&elem_type.id().to_le_bytes())?;
            out.write_all(&(items.len() as u64).to_le_bytes())?;
            items.iter().try_for_each(|item| write_value(out, item))
        }
    }
}

/// Zeros up to the next multiple of `alignment`.
fn pad<W: Write>(out: &mut CountingWriter<W>, alignment: u64) -> std::io::Result<()> {
    const ZEROS: [u8; 256] = [0; 256];
    let mut missing = out.written.next_multiple_of(alignment) - out.written;
    while missing > 0 {
        let n = missing.min(ZEROS.len() as u64) as usize;
        out.write_all(&ZEROS[..n])?;
        missing -= n as u64;
    }
    Ok(())
}

/// Copies exactly `size` bytes from `reader`; a shorter or longer reader is an error.
fn copy_exact<W: Write>(
    mut reader: Box<dyn Read + '_>,
    out: &mut W,
    name: &str,
    size: u64,
) -> Result<(), EncodeError> {
    let mut buf = vec![0u8; COPY_CHUNK_BYTES];
    let mut copied = 0u64;
    while copied < size {
        let want = (size - copied).min(buf.len() as u64) as usize;
        let n = match reader.read(&mut buf[..want]) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e.into()),
        };
        out.write_all(&buf[..n])?;
        copied += n as u64;
    }
    let extra = loop {
        match reader.read(&mut buf[..1]) {
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Ok(n) => break n as u64,
            Err(e) => return Err(e.into()),
        }
    };
    if copied != size || extra > 0 {
        return Err(GgufWriteError::StreamLength {
            tensor: name.to_string(),
            expected: size,
            got: copied + extra,
        }
        .into());
    }
    Ok(())
}

/// The folder `path` goes into, checked to exist and be a folder; `path` must not be a folder.
fn destination_folder(path: &Path) -> Result<PathBuf, GgufWriteError> {
    if path.is_dir() {
        return Err(GgufWriteError::DestinationIsFolder {
            path: path.to_path_buf(),
        });
    }
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    match std::fs::metadata(&dir) {
        Ok(m) if m.is_dir() => Ok(dir),
        Ok(_) => Err(GgufWriteError::NotAFolder {
            path: path.to_path_buf(),
            dir,
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Err(GgufWriteError::FolderMissing {
            path: path.to_path_buf(),
            dir: first_missing(&dir),
        }),
        // ENOTDIR: a component above is a regular file.
        Err(e) if e.raw_os_error() == Some(20) && cfg!(unix) => Err(GgufWriteError::NotAFolder {
            path: path.to_path_buf(),
            dir,
        }),
        Err(source) => Err(GgufWriteError::NotWritable {
            path: path.to_path_buf(),
            dir,
            source,
        }),
    }
}

/// The outermost folder of `dir` that does not exist, the one to create first.
fn first_missing(dir: &Path) -> PathBuf {
    let mut missing = dir.to_path_buf();
    while let Some(parent) = missing.parent() {
        if parent.as_os_str().is_empty() || parent.exists() {
            break;
        }
        missing = parent.to_path_buf();
    }
    missing
}

fn is_disk_full(e: &std::io::Error) -> bool {
    // ENOSPC (28) and EDQUOT (122) on Linux.
    e.kind() == std::io::ErrorKind::StorageFull
        || (cfg!(target_os = "linux") && matches!(e.raw_os_error(), Some(28 | 122)))
}

fn is_not_writable(e: &std::io::Error) -> bool {
    // EROFS (30) on Linux: a read-only file system.
    e.kind() == std::io::ErrorKind::PermissionDenied
        || e.kind() == std::io::ErrorKind::ReadOnlyFilesystem
        || (cfg!(target_os = "linux") && e.raw_os_error() == Some(30))
}

/// Maps an I/O error met while writing `path` to the error a user can act on.
fn classify_write_error(
    path: &Path,
    dir: &Path,
    written: u64,
    source: std::io::Error,
) -> GgufWriteError {
    if is_disk_full(&source) {
        GgufWriteError::DiskFull {
            path: path.to_path_buf(),
            written,
            source,
        }
    } else if is_not_writable(&source) {
        GgufWriteError::NotWritable {
            path: path.to_path_buf(),
            dir: dir.to_path_buf(),
            source,
        }
    } else {
        GgufWriteError::Io {
            path: path.to_path_buf(),
            source,
        }
    }
}

fn classify_stream_error(written: u64, source: std::io::Error) -> GgufWriteError {
    let path = PathBuf::from("<stream>");
    if is_disk_full(&source) {
        GgufWriteError::DiskFull {
            path,
            written,
            source,
        }
    } else {
        GgufWriteError::Io { path, source }
    }
}

/// Makes a completed rename durable; a failure here loses nothing already renamed, so it is
/// only logged.
fn sync_folder(dir: &Path) {
    #[cfg(unix)]
    if let Err(e) = File::open(dir).and_then(|d| d.sync_all()) {
        log::debug!("could not sync folder {}: {e}", dir.display());
    }
    #[cfg(not(unix))]
    let _ = dir;
}

/// Removes a temporary file on drop unless disarmed (after the rename).
struct TempGuard {
    path: Option<PathBuf>,
}

impl TempGuard {
    /// Creates a new, empty temporary file next to `dest`, in `dir`.
    fn create(dest: &Path, dir: &Path) -> Result<(Self, File), GgufWriteError> {
        static COUNTER: AtomicU64 = AtomicU64::new(0);
        let stem = dest
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "out.gguf".to_string());
        loop {
            let n = COUNTER.fetch_add(1, Ordering::Relaxed);
            let path = dir.join(format!(".{stem}.tmp-{}-{n}", std::process::id()));
            match File::options().write(true).create_new(true).open(&path) {
                Ok(file) => return Ok((Self { path: Some(path) }, file)),
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
                Err(e) => return Err(classify_write_error(dest, dir, 0, e)),
            }
        }
    }

    /// Renames the temporary file (already closed) to `dest`.
    fn persist(mut self, dest: &Path) -> std::io::Result<()> {
        if let Some(path) = &self.path {
            std::fs::rename(path, dest)?;
        }
        self.path = None;
        Ok(())
    }
}

impl Drop for TempGuard {
    fn drop(&mut self) {
        if let Some(path) = self.path.take() {
            let _ = std::fs::remove_file(path);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::io::gguf::tests::{fixture, fixture_metadata, fixture_tensors, pattern};
    use crate::io::gguf::GgufError;
    use gguf_rs::{ByteOrder, GGUFContainer};
    use std::io::Cursor;

    /// A writer holding the crafted fixture's metadata (every value type, nested arrays,
    /// alignment 64) and tensors of seven types, with the same bytes the fixture builder uses.
    fn fixture_writer(nested: bool) -> GgufWriter<'static> {
        let mut w = GgufWriter::new();
        for (k, v) in fixture_metadata(nested) {
            w.set(k, v);
        }
        for (seed, (name, dims, t)) in fixture_tensors().into_iter().enumerate() {
            let rest: u64 = dims[1..].iter().product();
            let len = t.row_bytes(dims[0]).unwrap() * rest;
            w.add_tensor(name, &dims, t.id(), pattern(len as usize, seed))
                .unwrap();
        }
        w
    }

    fn encode(w: GgufWriter<'_>) -> Vec<u8> {
        let mut out = Vec::new();
        let len = w.write_to(&mut out).unwrap();
        assert_eq!(len, out.len() as u64);
        out
    }

    /// Files in `dir`, sorted.
    fn listing(dir: &Path) -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    }

    #[test]
    fn gguf_write_matches_the_independent_test_serializer_byte_for_byte() {
        for nested in [false, true] {
            assert_eq!(encode(fixture_writer(nested)), fixture(3, nested).bytes);
        }
    }

    #[test]
    fn gguf_write_round_trips_every_value_type_and_tensor_through_the_reader() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("out.gguf");
        let len = fixture_writer(true).write(&path).unwrap();
        assert_eq!(std::fs::metadata(&path).unwrap().len(), len);
        let f = GgufFile::open(&path).unwrap();
        assert_eq!((f.version(), f.alignment()), (3, 64));
        let expected = fixture_metadata(true);
        assert_eq!(f.metadata_len(), expected.len());
        for ((k, v), (ek, ev)) in f.metadata().zip(&expected) {
            assert_eq!((k, v), (*ek, ev));
        }
        assert_eq!(f.tensor_count(), fixture_tensors().len());
        for (seed, (t, (name, dims, ty))) in f.tensors().zip(fixture_tensors()).enumerate() {
            assert_eq!((t.name(), t.dims(), t.ggml_type()), (name, &dims[..], ty));
            assert_eq!(t.offset() % 64, 0, "{name}");
            let data = f.tensor_data(t);
            assert_eq!(data, pattern(data.len(), seed), "{name}");
        }
        assert_eq!(f.file_len() % 64, 0, "the last tensor is padded too");
        assert_eq!(listing(dir.path()), ["out.gguf"]);
    }

    #[test]
    fn gguf_write_honours_odd_alignments_and_the_default() {
        for alignment in [None, Some(1), Some(8), Some(64), Some(4096)] {
            let mut w = GgufWriter::new();
            w.set("general.name", MetaValue::String("x".into()));
            if let Some(a) = alignment {
                w.set_alignment(a).unwrap();
            }
            w.add_tensor("a", &[3], GgmlType::F32.id(), vec![1u8; 12])
                .unwrap();
            w.add_tensor("b", &[32, 2], GgmlType::Q8_0.id(), vec![2u8; 68])
                .unwrap();
            w.add_tensor("c", &[5], GgmlType::F16.id(), vec![3u8; 10])
                .unwrap();
            let f = GgufFile::from_bytes(encode(w)).unwrap();
            let a = alignment.map_or(32, u64::from);
            assert_eq!(f.alignment(), a);
            assert_eq!(f.data_offset() % a, 0);
            let offsets: Vec<u64> = f.tensors().map(|t| t.offset()).collect();
            let b = 12u64.next_multiple_of(a);
            assert_eq!(
                offsets,
                [0, b, (b + 68).next_multiple_of(a)],
                "alignment {a}"
            );
            for (t, byte) in f.tensors().zip(1u8..) {
                assert!(f.tensor_data(t).iter().all(|&x| x == byte), "{}", t.name());
            }
        }
    }

    #[test]
    fn gguf_write_output_is_read_the_same_by_gguf_rs() {
        let bytes = encode(fixture_writer(false));
        let ours = GgufFile::from_bytes(bytes.clone()).unwrap();
        let rest = Cursor::new(bytes[4..].to_vec());
        let theirs = GGUFContainer::new(ByteOrder::LE, Box::new(rest), u64::MAX)
            .decode()
            .unwrap();
        assert_eq!(theirs.get_version(), "v3");
        assert_eq!(theirs.num_tensor(), ours.tensor_count() as u64);
        assert_eq!(theirs.num_kv(), ours.metadata_len() as u64);
        assert_eq!(theirs.alignment(), 64);
        assert_eq!(theirs.data_offset(), ours.data_offset());
        for (o, t) in ours.tensors().zip(theirs.tensors()) {
            assert_eq!(t.name, o.name());
            assert_eq!(t.shape, o.dims());
            assert_eq!(t.kind, o.ggml_type().id());
            assert_eq!(t.offset, o.offset());
        }
        let md = theirs.metadata();
        assert_eq!(md["t.string"], "héllo ✓ wörld");
        assert_eq!(md["t.i64"], -(1i64 << 40));
        assert_eq!(
            md["t.u32_array"],
            serde_json::json!([1, 2, 4_000_000_000u32])
        );
        assert_eq!(
            md["tokenizer.ggml.tokens"],
            serde_json::json!(["<s>", "a", "é"])
        );
        assert_eq!(md["t.true"], true);
        assert_eq!(md["t.f64"], -2.25);
    }

    #[test]
    fn gguf_write_copies_a_file_and_drops_or_overrides_keys() {
        let src = GgufFile::from_bytes(fixture(3, true).bytes).unwrap();
        let mut w = GgufWriter::with_metadata_of_filtered(&src, |k| !k.starts_with("t.u"));
        w.set("t.string", MetaValue::String("replaced".into()));
        w.set("general.quantized_by", MetaValue::String("tessera".into()));
        assert!(w.remove("t.i8").is_some());
        assert!(w.remove("absent").is_none());
        w.add_tensors_of(&src).unwrap();
        let out = GgufFile::from_bytes(encode(w)).unwrap();
        assert!(out.get("t.u8").is_none() && out.get("t.u32_array").is_none());
        assert!(out.get("t.i8").is_none());
        assert_eq!(out.get_str("t.string").unwrap(), "replaced");
        assert_eq!(out.get_str("general.quantized_by").unwrap(), "tessera");
        assert_eq!(out.get("t.nested"), src.get("t.nested"));
        // Overridden keys keep their place; new keys go last.
        let keys: Vec<&str> = out.metadata().map(|(k, _)| k).collect();
        let src_keys: Vec<&str> = src
            .metadata()
            .map(|(k, _)| k)
            .filter(|k| !k.starts_with("t.u") && *k != "t.i8")
            .collect();
        assert_eq!(keys[..keys.len() - 1], src_keys[..]);
        assert_eq!(keys.last(), Some(&"general.quantized_by"));
        for (a, b) in out.tensors().zip(src.tensors()) {
            assert_eq!(
                (a.name(), a.dims(), a.offset()),
                (b.name(), b.dims(), b.offset())
            );
            assert_eq!(out.tensor_data(a), src.tensor_data(b));
        }
    }

    #[test]
    fn gguf_write_rejects_tensors_whose_bytes_do_not_match_dims_and_type() {
        let mut w = GgufWriter::new();
        let err = w
            .add_tensor("w", &[32, 2], GgmlType::Q4_0.id(), vec![0u8; 35])
            .unwrap_err();
        assert!(matches!(
            err,
            GgufWriteError::TensorSizeMismatch {
                expected: 36,
                actual: 35,
                ..
            }
        ));
        let msg = err.to_string();
        assert!(
            msg.contains("'w'") && msg.contains("Q4_0") && msg.contains("check"),
            "{msg}"
        );
        let err = w
            .add_tensor("w", &[33], GgmlType::Q8_0.id(), vec![0u8; 34])
            .unwrap_err();
        assert!(matches!(
            err,
            GgufWriteError::RowNotBlockMultiple {
                ne0: 33,
                block_size: 32,
                ..
            }
        ));
        let err = w.add_tensor("w", &[], 0, vec![]).unwrap_err();
        assert!(matches!(err, GgufWriteError::BadDimCount { n_dims: 0, .. }));
        let err = w
            .add_tensor("w", &[1, 1, 1, 1, 1], 0, vec![0; 4])
            .unwrap_err();
        assert!(matches!(err, GgufWriteError::BadDimCount { n_dims: 5, .. }));
        let err = w
            .add_tensor("w", &[1 << 40, 1 << 40], 0, vec![])
            .unwrap_err();
        assert!(matches!(err, GgufWriteError::SizeOverflow { .. }));
        let err = w.add_tensor("w", &[4], 99, vec![0; 4]).unwrap_err();
        assert!(matches!(
            err,
            GgufWriteError::UnknownTensorType { id: 99, .. }
        ));
        assert!(err.to_string().contains("add_tensor_sized"), "{err}");
        assert_eq!(w.tensor_count(), 0);
        let long = "x".repeat(MAX_TENSOR_NAME_BYTES + 1);
        let err = w.add_tensor(long, &[1], 0, vec![0; 4]).unwrap_err();
        assert!(matches!(err, GgufWriteError::NameTooLong { len: 64, .. }));
        w.add_tensor("w", &[1], 0, vec![0; 4]).unwrap();
        let err = w.add_tensor("w", &[1], 0, vec![0; 4]).unwrap_err();
        assert!(matches!(err, GgufWriteError::DuplicateTensor(ref n) if n == "w"));
    }

    #[test]
    fn gguf_write_passes_unknown_type_ids_through_with_an_explicit_size() {
        let mut w = GgufWriter::new();
        // A known type must still match its dims.
        let err = w
            .add_tensor_sized("k", &[4], GgmlType::F32.id(), 15, vec![0u8; 15])
            .unwrap_err();
        assert!(matches!(
            err,
            GgufWriteError::TensorSizeMismatch { expected: 16, .. }
        ));
        let err = w
            .add_tensor_sized("u", &[8], 77, 10, vec![0u8; 9])
            .unwrap_err();
        assert!(matches!(
            err,
            GgufWriteError::TensorSizeMismatch {
                expected: 10,
                actual: 9,
                ..
            }
        ));
        w.add_tensor_sized("u", &[8], 77, 10, vec![5u8; 10])
            .unwrap();
        w.add_tensor_sized("k", &[4], GgmlType::F32.id(), 16, vec![6u8; 16])
            .unwrap();
        let bytes = encode(w);
        // Tessera's reader rejects id 77, naming the tensor: the id was written as given.
        let err = GgufFile::from_bytes(bytes.clone()).unwrap_err();
        assert!(
            matches!(err, GgufError::UnknownTensorType { ref tensor, id: 77 } if tensor == "u")
        );
        // The second tensor sits after 10 bytes padded to 32.
        let data_start = bytes.len() - 64;
        assert_eq!(bytes[data_start..data_start + 10], [5u8; 10]);
        assert_eq!(bytes[data_start + 32..data_start + 48], [6u8; 16]);
    }

    #[test]
    fn gguf_write_streams_tensor_data_from_readers_of_exact_length() {
        let data: Vec<u8> = (0..=255u8).cycle().take(4096).collect();
        let mut w = GgufWriter::new();
        w.add_tensor(
            "r",
            &[1024],
            GgmlType::F32.id(),
            TensorData::Reader(Box::new(&data[..])),
        )
        .unwrap();
        let f = GgufFile::from_bytes(encode(w)).unwrap();
        assert_eq!(f.tensor_data(f.tensor("r").unwrap()), &data[..]);
        for (len, got) in [(4095usize, 4095u64), (4097, 4097)] {
            let mut w = GgufWriter::new();
            let reader = TensorData::Reader(Box::new(Cursor::new(vec![0u8; len])));
            w.add_tensor("r", &[1024], GgmlType::F32.id(), reader)
                .unwrap();
            let err = w.write_to(&mut Vec::new()).unwrap_err();
            assert!(
                matches!(err, GgufWriteError::StreamLength { expected: 4096, got: g, .. } if g == got),
                "{err}"
            );
        }
    }

    #[test]
    fn gguf_write_rejects_bad_alignments_and_malformed_arrays() {
        let mut w = GgufWriter::new();
        assert!(matches!(
            w.set_alignment(48),
            Err(GgufWriteError::BadAlignment { .. })
        ));
        assert!(matches!(
            w.set_alignment(0),
            Err(GgufWriteError::BadAlignment { .. })
        ));
        w.set(KEY_GENERAL_ALIGNMENT, MetaValue::U64(64));
        let err = w.write_to(&mut Vec::new()).unwrap_err();
        assert!(err.to_string().contains("u32, not a u64"), "{err}");
        let mut w = GgufWriter::new();
        let items = vec![MetaValue::U32(1), MetaValue::I32(2)];
        w.set(
            "mixed",
            MetaValue::Array {
                elem_type: ValueType::U32,
                items,
            },
        );
        let err = w.write_to(&mut Vec::new()).unwrap_err();
        assert!(
            matches!(err, GgufWriteError::MixedArray { index: 1, ref found, .. } if found == "i32")
        );
        let mut deep = MetaValue::Array {
            elem_type: ValueType::U8,
            items: vec![],
        };
        for _ in 0..MAX_ARRAY_NESTING {
            deep = MetaValue::Array {
                elem_type: ValueType::Array,
                items: vec![deep],
            };
        }
        let mut w = GgufWriter::new();
        w.set("deep", deep);
        assert!(matches!(
            w.write_to(&mut Vec::new()),
            Err(GgufWriteError::TooDeep { .. })
        ));
    }

    #[test]
    fn gguf_write_to_a_missing_folder_or_through_a_file_fails_and_leaves_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("no/such/out.gguf");
        let err = fixture_writer(false).write(&missing).unwrap_err();
        assert!(
            matches!(err, GgufWriteError::FolderMissing { dir: ref d, .. } if d.ends_with("no")),
            "{err}"
        );
        assert!(err.to_string().contains("create it first"), "{err}");
        let file = dir.path().join("some_file");
        std::fs::write(&file, b"x").unwrap();
        let err = fixture_writer(false)
            .write(&file.join("out.gguf"))
            .unwrap_err();
        assert!(matches!(err, GgufWriteError::NotAFolder { .. }), "{err}");
        let err = fixture_writer(false).write(dir.path()).unwrap_err();
        assert!(
            matches!(err, GgufWriteError::DestinationIsFolder { .. }),
            "{err}"
        );
        assert_eq!(listing(dir.path()), ["some_file"]);
    }

    #[cfg(unix)]
    #[test]
    fn gguf_write_into_a_read_only_folder_is_not_writable_unless_root() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let ro = dir.path().join("ro");
        std::fs::create_dir(&ro).unwrap();
        std::fs::set_permissions(&ro, std::fs::Permissions::from_mode(0o555)).unwrap();
        let result = fixture_writer(false).write(&ro.join("out.gguf"));
        // Root ignores the mode bits (CI runs as root), so probe what this process can do.
        let probe = ro.join("probe");
        let root_like = std::fs::write(&probe, b"").is_ok();
        if root_like {
            assert!(result.is_ok());
        } else {
            let err = result.unwrap_err();
            assert!(matches!(err, GgufWriteError::NotWritable { .. }), "{err}");
            assert!(err.to_string().contains("permission"), "{err}");
            assert!(listing(&ro).is_empty());
        }
        std::fs::set_permissions(&ro, std::fs::Permissions::from_mode(0o755)).unwrap();
    }

    #[test]
    fn gguf_write_failing_midway_removes_its_temp_file_and_keeps_the_old_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("model.gguf");
        std::fs::write(&path, b"old contents").unwrap();
        let mut w = fixture_writer(false);
        // A reader one byte short fails after the header and some data are on disk.
        let short = TensorData::Reader(Box::new(Cursor::new(vec![0u8; 4095])));
        w.add_tensor("last", &[1024], GgmlType::F32.id(), short)
            .unwrap();
        let err = w.write(&path).unwrap_err();
        assert!(matches!(err, GgufWriteError::StreamLength { .. }), "{err}");
        assert_eq!(listing(dir.path()), ["model.gguf"]);
        assert_eq!(std::fs::read(&path).unwrap(), b"old contents");
        // A good write replaces it.
        fixture_writer(false).write(&path).unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), fixture(3, false).bytes);
        assert_eq!(listing(dir.path()), ["model.gguf"]);
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn gguf_write_reports_a_full_disk_as_disk_full() {
        // /dev/full fails every write with ENOSPC.
        let mut full = File::options().write(true).open("/dev/full").unwrap();
        let err = fixture_writer(false).write_to(&mut full).unwrap_err();
        assert!(matches!(err, GgufWriteError::DiskFull { .. }), "{err}");
        assert!(err.to_string().contains("free space"), "{err}");
        // The same mapping applies to files written through `write`.
        let enospc = std::io::Error::from_raw_os_error(28);
        let err = classify_write_error(Path::new("a/b.gguf"), Path::new("a"), 7, enospc);
        assert!(
            matches!(err, GgufWriteError::DiskFull { written: 7, .. }),
            "{err}"
        );
        let erofs = std::io::Error::from_raw_os_error(30);
        let err = classify_write_error(Path::new("a/b.gguf"), Path::new("a"), 0, erofs);
        assert!(matches!(err, GgufWriteError::NotWritable { .. }), "{err}");
    }
}
