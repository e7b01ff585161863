//! Input discovery and streaming record readers for JSONL (plain, zstd, gzip), Parquet and text.
//!
//! Every reader yields one [`Item`] per record position (a JSONL line, a Parquet row, a text
//! file), so a resume cursor is simply "records consumed in file N". Problems with one record are
//! returned as [`Item::Skip`] with a reason and a 1-based line or row number; problems with the
//! whole file are returned as [`FileError`] and reported by the caller.

use crate::config::Utf8Policy;
use crate::error::{Error, Result};
use arrow_array::{Array, LargeStringArray, StringArray, StringViewArray};
use arrow_schema::DataType;
use parquet::arrow::arrow_reader::{ParquetRecordBatchReader, ParquetRecordBatchReaderBuilder};
use parquet::arrow::ProjectionMask;
use std::fs::File;
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};

/// Longest record read into memory; longer JSONL lines and text files are skipped and counted.
pub const DEFAULT_MAX_RECORD_BYTES: usize = 256 << 20;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    Jsonl,
    Parquet,
    Text,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Compression {
    None,
    Zstd,
    Gzip,
}

/// Detect format and compression from the file name; `None` for unsupported files.
pub fn detect(path: &Path) -> Option<(Format, Compression)> {
    let name = path.file_name()?.to_string_lossy().to_lowercase();
    let (stem, compression) = if let Some(s) = name.strip_suffix(".zst") {
        (s, Compression::Zstd)
    } else if let Some(s) = name.strip_suffix(".zstd") {
        (s, Compression::Zstd)
    } else if let Some(s) = name.strip_suffix(".gz") {
        (s, Compression::Gzip)
    } else {
        (name.as_str(), Compression::None)
    };
    let ext = stem.rsplit_once('.').map(|(_, e)| e)?;
    let format = match ext {
        "jsonl" | "ndjson" | "json" => Format::Jsonl,
        "parquet" if compression == Compression::None => Format::Parquet,
        "txt" | "text" | "md" | "markdown" | "rst" => Format::Text,
        _ => return None,
    };
    Some((format, compression))
}

/// Expand inputs (files, directories, globs) into a sorted, duplicate-free file list, in the
/// order the inputs were given. Files under a directory with an unsupported extension are
/// returned in `unsupported` so that the summary can report them.
pub fn discover(inputs: &[String]) -> Result<(Vec<PathBuf>, Vec<PathBuf>)> {
    let mut files = Vec::new();
    let mut unsupported = Vec::new();
    let mut seen = std::collections::HashSet::new();

    for input in inputs {
        let mut matched: Vec<PathBuf> = Vec::new();
        if input.contains(['*', '?', '[']) {
            let paths = glob::glob(input).map_err(|e| Error::invalid(format!("invalid glob {input:?}: {e}")))?;
            for entry in paths {
                matched.push(entry.map_err(|e| Error::io(e.path().to_path_buf(), e.into()))?);
            }
            if matched.is_empty() {
                return Err(Error::invalid(format!("input glob {input:?} matched no file")));
            }
            matched.sort();
        } else {
            let path = PathBuf::from(input);
            let meta = std::fs::metadata(&path).map_err(|e| Error::io(&path, e))?;
            if meta.is_file() && detect(&path).is_none() {
                return Err(Error::invalid(format!(
                    "{}: unsupported input type; expected .jsonl, .jsonl.zst, .jsonl.gz, .parquet, .txt or .md",
                    path.display()
                )));
            }
            matched.push(path);
        }

        for path in matched {
            if path.is_dir() {
                walk(&path, &mut files, &mut unsupported, &mut seen)?;
            } else if detect(&path).is_some() {
                if seen.insert(path.clone()) {
                    files.push(path);
                }
            } else {
                unsupported.push(path);
            }
        }
    }
    Ok((files, unsupported))
}

fn walk(
    dir: &Path,
    files: &mut Vec<PathBuf>,
    unsupported: &mut Vec<PathBuf>,
    seen: &mut std::collections::HashSet<PathBuf>,
) -> Result<()> {
    let mut entries: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(|e| Error::io(dir, e))?
        .map(|e| e.map(|e| e.path()).map_err(|e| Error::io(dir, e)))
        .collect::<Result<_>>()?;
    entries.sort();
    for path in entries {
        let name = path.file_name().map(|n| n.to_string_lossy().starts_with('.')).unwrap_or(false);
        if name {
            continue; // hidden files and folders, including our own .cptstream state
        }
        if path.is_dir() {
            walk(&path, files, unsupported, seen)?;
        } else if detect(&path).is_some() {
            if seen.insert(path.clone()) {
                files.push(path);
            }
        } else {
            unsupported.push(path);
        }
    }
    Ok(())
}

/// One record position of an input file.
#[derive(Debug)]
pub enum Item {
    Doc { line: u64, text: String },
    Skip { line: u64, reason: &'static str, detail: String },
}

/// A failure that ends the reading of one file; records read before it stay valid.
#[derive(Debug)]
pub struct FileError {
    pub reason: &'static str,
    pub detail: String,
}

pub trait RecordReader {
    /// Return the next record, `Ok(None)` at a clean end of file.
    fn next_item(&mut self) -> std::result::Result<Option<Item>, FileError>;
}

pub struct Options {
    pub text_field: String,
    pub utf8: Utf8Policy,
    pub max_record_bytes: usize,
}

/// Open a reader for one file.
pub fn open(path: &Path, opts: &Options) -> std::result::Result<Box<dyn RecordReader>, FileError> {
    let (format, compression) = detect(path).ok_or_else(|| FileError {
        reason: "unsupported_file",
        detail: "unsupported file extension".into(),
    })?;
    let file = File::open(path).map_err(|e| FileError { reason: "unreadable", detail: e.to_string() })?;

    match format {
        Format::Parquet => Ok(Box::new(ParquetReader::open(file, &opts.text_field)?)),
        Format::Jsonl => {
            let stream = decompress(file, compression)?;
            Ok(Box::new(JsonlReader {
                input: stream,
                line: 0,
                buf: Vec::new(),
                field: opts.text_field.clone(),
                utf8: opts.utf8,
                max_bytes: opts.max_record_bytes,
            }))
        }
        Format::Text => {
            let stream = decompress(file, compression)?;
            Ok(Box::new(TextReader { input: Some(stream), utf8: opts.utf8, max_bytes: opts.max_record_bytes }))
        }
    }
}

fn decompress(file: File, compression: Compression) -> std::result::Result<Box<dyn BufRead>, FileError> {
    let reader = BufReader::with_capacity(1 << 20, file);
    Ok(match compression {
        Compression::None => Box::new(reader),
        Compression::Zstd => {
            let dec = zstd::stream::read::Decoder::with_buffer(reader)
                .map_err(|e| FileError { reason: "corrupt_zstd", detail: e.to_string() })?;
            Box::new(BufReader::with_capacity(1 << 20, dec))
        }
        Compression::Gzip => Box::new(BufReader::with_capacity(1 << 20, flate2::bufread::MultiGzDecoder::new(reader))),
    })
}

fn stream_error(e: std::io::Error, compression_hint: &'static str) -> FileError {
    let reason = match e.kind() {
        std::io::ErrorKind::UnexpectedEof => "truncated",
        std::io::ErrorKind::InvalidData | std::io::ErrorKind::InvalidInput | std::io::ErrorKind::Other => {
            compression_hint
        }
        _ => "read_error",
    };
    FileError { reason, detail: e.to_string() }
}

/// Read one line into `buf` without its newline, keeping at most `max` bytes. Returns the byte
/// count consumed (0 at EOF) and whether the line ended with a newline.
fn read_line_bounded(input: &mut dyn BufRead, buf: &mut Vec<u8>, max: usize) -> std::io::Result<(usize, bool)> {
    buf.clear();
    let mut consumed = 0usize;
    loop {
        let available = input.fill_buf()?;
        if available.is_empty() {
            return Ok((consumed, false));
        }
        let (chunk, found) = match memchr::memchr(b'\n', available) {
            Some(i) => (&available[..i], true),
            None => (available, false),
        };
        let room = max.saturating_sub(buf.len());
        buf.extend_from_slice(&chunk[..chunk.len().min(room + 1)]);
        let used = chunk.len() + usize::from(found);
        consumed += used;
        input.consume(used);
        if found {
            return Ok((consumed, true));
        }
    }
}

fn decode_utf8(bytes: Vec<u8>, policy: Utf8Policy) -> std::result::Result<String, usize> {
    match String::from_utf8(bytes) {
        Ok(s) => Ok(s),
        Err(e) => {
            let offset = e.utf8_error().valid_up_to();
            match policy {
                Utf8Policy::Replace => Ok(String::from_utf8_lossy(e.as_bytes()).into_owned()),
                Utf8Policy::Skip => Err(offset),
            }
        }
    }
}

struct JsonlReader {
    input: Box<dyn BufRead>,
    line: u64,
    buf: Vec<u8>,
    field: String,
    utf8: Utf8Policy,
    max_bytes: usize,
}

impl RecordReader for JsonlReader {
    fn next_item(&mut self) -> std::result::Result<Option<Item>, FileError> {
        let (n, newline) = read_line_bounded(&mut *self.input, &mut self.buf, self.max_bytes)
            .map_err(|e| stream_error(e, "corrupt_compressed"))?;
        if n == 0 {
            return Ok(None);
        }
        self.line += 1;
        let line = self.line;
        let _ = newline;

        if self.buf.len() > self.max_bytes {
            let detail = format!("line longer than {} bytes", self.max_bytes);
            return Ok(Some(Item::Skip { line, reason: "record_too_large", detail }));
        }
        let mut bytes = std::mem::take(&mut self.buf);
        if line == 1 && bytes.starts_with(b"\xEF\xBB\xBF") {
            bytes.drain(..3);
        }
        if bytes.last() == Some(&b'\r') {
            bytes.pop();
        }
        if bytes.iter().all(|b| b.is_ascii_whitespace()) {
            return Ok(Some(Item::Skip { line, reason: "blank_line", detail: String::new() }));
        }

        let text = match decode_utf8(bytes, self.utf8) {
            Ok(s) => s,
            Err(offset) => {
                let detail = format!("invalid UTF-8 at byte {offset} of the line");
                return Ok(Some(Item::Skip { line, reason: "invalid_utf8", detail }));
            }
        };
        Ok(Some(json_record(line, &text, &self.field)))
    }
}

fn json_record(line: u64, text: &str, field: &str) -> Item {
    let value: serde_json::Value = match serde_json::from_str(text) {
        Ok(v) => v,
        Err(e) => {
            return Item::Skip { line, reason: "invalid_json", detail: e.to_string() };
        }
    };
    let serde_json::Value::Object(mut map) = value else {
        let kind = match value {
            serde_json::Value::Array(_) => "an array",
            serde_json::Value::String(_) => "a string",
            serde_json::Value::Number(_) => "a number",
            serde_json::Value::Bool(_) => "a boolean",
            _ => "null",
        };
        return Item::Skip { line, reason: "not_object", detail: format!("record is {kind}, not an object") };
    };
    match map.remove(field) {
        Some(serde_json::Value::String(s)) => Item::Doc { line, text: s },
        Some(serde_json::Value::Null) => {
            Item::Skip { line, reason: "null_field", detail: format!("field {field:?} is null") }
        }
        Some(other) => {
            let detail = format!("field {field:?} is not a string: {}", truncate(&other.to_string(), 40));
            Item::Skip { line, reason: "not_string", detail }
        }
        None => {
            let keys: Vec<&String> = map.keys().take(5).collect();
            Item::Skip { line, reason: "missing_field", detail: format!("no field {field:?}; fields are {keys:?}") }
        }
    }
}

fn truncate(s: &str, max_chars: usize) -> String {
    let mut out: String = s.chars().take(max_chars).collect();
    if s.chars().count() > max_chars {
        out.push('…');
    }
    out
}

/// Known magic numbers of binary formats that users rename by mistake.
const BINARY_MAGIC: &[&[u8]] = &[
    b"\x89PNG", b"\xFF\xD8\xFF", b"GIF8", b"%PDF", b"PK\x03\x04", b"\x1F\x8B", b"\x28\xB5\x2F\xFD", b"\x7FELF",
    b"PAR1",
];

/// Decide whether a file's first bytes look like binary data rather than text. NUL bytes alone
/// do not decide it, because real text files carry stray NULs that cleaning removes.
pub fn looks_binary(head: &[u8]) -> bool {
    if BINARY_MAGIC.iter().any(|m| head.starts_with(m)) {
        return true;
    }
    if head.is_empty() {
        return false;
    }
    let controls = head.iter().filter(|&&b| b < 0x20 && !matches!(b, b'\n' | b'\r' | b'\t' | 0x0C)).count();
    let mut invalid = 0usize;
    let mut rest = head;
    while !rest.is_empty() {
        match std::str::from_utf8(rest) {
            Ok(_) => break,
            Err(e) => {
                let skip = e.error_len().unwrap_or(rest.len() - e.valid_up_to());
                invalid += skip;
                rest = &rest[e.valid_up_to() + skip..];
            }
        }
    }
    (controls + invalid) * 10 > head.len()
}

struct TextReader {
    input: Option<Box<dyn BufRead>>,
    utf8: Utf8Policy,
    max_bytes: usize,
}

impl RecordReader for TextReader {
    fn next_item(&mut self) -> std::result::Result<Option<Item>, FileError> {
        let Some(input) = self.input.take() else {
            return Ok(None);
        };
        let mut bytes = Vec::new();
        let limit = self.max_bytes as u64 + 1;
        input.take(limit).read_to_end(&mut bytes).map_err(|e| stream_error(e, "corrupt_compressed"))?;
        if bytes.len() > self.max_bytes {
            let detail = format!("file longer than {} bytes", self.max_bytes);
            return Ok(Some(Item::Skip { line: 1, reason: "record_too_large", detail }));
        }
        if looks_binary(&bytes[..bytes.len().min(8192)]) {
            return Err(FileError { reason: "not_text", detail: "file content is binary, not text".into() });
        }
        if bytes.starts_with(b"\xEF\xBB\xBF") {
            bytes.drain(..3);
        }
        match decode_utf8(bytes, self.utf8) {
            Ok(text) => Ok(Some(Item::Doc { line: 1, text })),
            Err(offset) => {
                let detail = format!("invalid UTF-8 at byte {offset}");
                Ok(Some(Item::Skip { line: 1, reason: "invalid_utf8", detail }))
            }
        }
    }
}

struct ParquetReader {
    batches: ParquetRecordBatchReader,
    current: Option<Box<dyn Array>>,
    current_pos: usize,
    row: u64,
}

impl ParquetReader {
    fn open(file: File, field: &str) -> std::result::Result<Self, FileError> {
        let corrupt = |e: parquet::errors::ParquetError| FileError { reason: "corrupt_parquet", detail: e.to_string() };
        let builder = ParquetRecordBatchReaderBuilder::try_new(file).map_err(corrupt)?;
        let schema = builder.schema().clone();
        let Some((index, column)) = schema.column_with_name(field) else {
            let names: Vec<&String> = schema.fields().iter().map(|f| f.name()).take(8).collect();
            let detail = format!("no column {field:?}; columns are {names:?}");
            return Err(FileError { reason: "missing_field", detail });
        };
        if !matches!(column.data_type(), DataType::Utf8 | DataType::LargeUtf8 | DataType::Utf8View) {
            let detail = format!("column {field:?} has type {}, not a string type", column.data_type());
            return Err(FileError { reason: "not_string", detail });
        }
        let mask = ProjectionMask::roots(builder.parquet_schema(), [index]);
        let batches = builder.with_projection(mask).with_batch_size(1024).build().map_err(corrupt)?;
        Ok(ParquetReader { batches, current: None, current_pos: 0, row: 0 })
    }
}

impl RecordReader for ParquetReader {
    fn next_item(&mut self) -> std::result::Result<Option<Item>, FileError> {
        loop {
            if let Some(array) = &self.current {
                if self.current_pos < array.len() {
                    let i = self.current_pos;
                    self.current_pos += 1;
                    self.row += 1;
                    let line = self.row;
                    if array.is_null(i) {
                        return Ok(Some(Item::Skip { line, reason: "null_field", detail: "text is null".into() }));
                    }
                    let any = array.as_any();
                    let text = if let Some(a) = any.downcast_ref::<StringArray>() {
                        a.value(i)
                    } else if let Some(a) = any.downcast_ref::<LargeStringArray>() {
                        a.value(i)
                    } else if let Some(a) = any.downcast_ref::<StringViewArray>() {
                        a.value(i)
                    } else {
                        unreachable!("column type was checked when the file was opened")
                    };
                    return Ok(Some(Item::Doc { line, text: text.to_owned() }));
                }
            }
            match self.batches.next() {
                None => return Ok(None),
                Some(Err(e)) => return Err(FileError { reason: "corrupt_parquet", detail: e.to_string() }),
                Some(Ok(batch)) => {
                    let column = batch.column(0).clone();
                    self.current = Some(Box::new(column) as Box<dyn Array>);
                    self.current_pos = 0;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn detects_formats() {
        assert_eq!(detect(Path::new("a.jsonl.zst")), Some((Format::Jsonl, Compression::Zstd)));
        assert_eq!(detect(Path::new("a.JSONL.gz")), Some((Format::Jsonl, Compression::Gzip)));
        assert_eq!(detect(Path::new("a.parquet")), Some((Format::Parquet, Compression::None)));
        assert_eq!(detect(Path::new("中文.md")), Some((Format::Text, Compression::None)));
        assert_eq!(detect(Path::new("a.png")), None);
        assert_eq!(detect(Path::new("README")), None);
    }

    #[test]
    fn binary_detection_spares_text_with_nul() {
        assert!(looks_binary(b"\x89PNG\r\n\x1a\n\0\0\0\rIHDR"));
        assert!(!looks_binary("中文︰测试，好！\r\nline2\x00tail".as_bytes()));
        assert!(looks_binary(&[0u8, 1, 2, 3, 0xFF, 0xFE, 7, 8]));
    }

    #[test]
    fn bounded_line_reader_caps_memory() {
        let data = b"abcdef\nxy".to_vec();
        let mut input: Box<dyn BufRead> = Box::new(std::io::Cursor::new(data));
        let mut buf = Vec::new();
        assert_eq!(read_line_bounded(&mut *input, &mut buf, 3).unwrap(), (7, true));
        assert_eq!(buf.len(), 4); // max + 1 marks the line as too long
        assert_eq!(read_line_bounded(&mut *input, &mut buf, 3).unwrap(), (2, false));
        assert_eq!(buf, b"xy");
    }
}
