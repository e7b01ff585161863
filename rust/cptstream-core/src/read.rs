//! Input discovery and streaming record readers for JSONL (plain, zstd, gzip), Parquet and text.
//!
//! Every reader yields one [`Item`] per record position (a JSONL line, a Parquet row, a text
//! file), so a resume cursor is simply "records consumed in file N". Problems with one record are
//! returned as [`Item::Skip`] with a reason and a 1-based line or row number; problems with the
//! whole file are returned as [`FileError`] and reported by the caller.
//!
//! A damaged compressed file ends in an error, never in a silent end of file: zstd 0.13 reports a
//! cut frame as `UnexpectedEof` ("incomplete frame") and flate2 1.x a cut deflate stream or
//! trailer the same way (`tests/hostile_readers.rs` checks both). The line being read when the
//! error arrives is dropped with the error, so a partial last line never becomes a document.
//! A panic inside a decoder (arrow and parquet assert on some corrupt inputs) is caught and
//! returned as a [`FileError`] of that file.

use crate::config::Utf8Policy;
use crate::error::panic_message;
use std::fs::File;
use std::io::{BufRead, BufReader, Read};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::Path;

mod discover;
mod parquet;

pub use discover::{detect, discover, Compression, Format};

/// Bytes at the start of a JSONL or text stream checked by [`looks_binary`].
const SNIFF_BYTES: usize = 8192;

/// Maximum record size read into memory, in bytes; longer JSONL lines and text files are skipped and counted.
pub const DEFAULT_MAX_RECORD_BYTES: usize = 256 << 20;

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

/// Open a reader for one file. Panics of the decoders, here and in `next_item`, come back as
/// a [`FileError`] of this file.
pub fn open(path: &Path, opts: &Options) -> std::result::Result<Box<dyn RecordReader>, FileError> {
    let (format, compression) = detect(path).ok_or_else(|| FileError {
        reason: "unsupported_file",
        detail: "unsupported file extension".into(),
    })?;
    let panic_reason = if format == Format::Parquet { "corrupt_parquet" } else { "reader_panic" };
    let inner = catch_unwind(AssertUnwindSafe(|| open_unguarded(path, format, compression, opts)))
        .unwrap_or_else(|payload| Err(decoder_panicked(panic_reason, payload)))?;
    Ok(Box::new(Guarded { inner: Some(inner), panic_reason }))
}

fn open_unguarded(
    path: &Path,
    format: Format,
    compression: Compression,
    opts: &Options,
) -> std::result::Result<Box<dyn RecordReader>, FileError> {
    let file = File::open(path).map_err(|e| FileError { reason: "unreadable", detail: e.to_string() })?;
    // A 0-byte file is empty whatever its extension, while zstd, gzip and Parquet would call it damaged.
    if file.metadata().is_ok_and(|m| m.len() == 0) {
        return Ok(Box::new(NoRecords));
    }
    match format {
        Format::Parquet => Ok(Box::new(parquet::ParquetReader::open(file, &opts.text_field)?)),
        Format::Jsonl => {
            let mut input = decompress(file, compression)?;
            let head = input.fill_buf().map_err(|e| stream_error(e, compression))?;
            if looks_binary(&head[..head.len().min(SNIFF_BYTES)]) {
                return Err(not_text());
            }
            Ok(Box::new(JsonlReader {
                input,
                compression,
                line: 0,
                buf: Vec::new(),
                field: opts.text_field.clone(),
                utf8: opts.utf8,
                max_bytes: opts.max_record_bytes,
            }))
        }
        Format::Text => {
            let input = decompress(file, compression)?;
            Ok(Box::new(TextReader { input: Some(input), compression, utf8: opts.utf8, max_bytes: opts.max_record_bytes }))
        }
    }
}

fn decoder_panicked(reason: &'static str, payload: Box<dyn std::any::Any + Send>) -> FileError {
    FileError { reason, detail: format!("the decoder panicked: {}", panic_message(&*payload)) }
}

fn not_text() -> FileError {
    FileError { reason: "not_text", detail: "file content is binary, not text".into() }
}

struct NoRecords;

impl RecordReader for NoRecords {
    fn next_item(&mut self) -> std::result::Result<Option<Item>, FileError> {
        Ok(None)
    }
}

/// A reader whose panics become a [`FileError`]; after one, the file is treated as ended.
struct Guarded {
    inner: Option<Box<dyn RecordReader>>,
    panic_reason: &'static str,
}

impl RecordReader for Guarded {
    fn next_item(&mut self) -> std::result::Result<Option<Item>, FileError> {
        let Some(inner) = self.inner.as_mut() else {
            return Ok(None);
        };
        match catch_unwind(AssertUnwindSafe(|| inner.next_item())) {
            Ok(result) => result,
            Err(payload) => {
                // A reader that panicked may hold broken state, so it is never called again.
                self.inner = None;
                Err(decoder_panicked(self.panic_reason, payload))
            }
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

/// Classify a read error: a stream that ends early is `truncated`, bad compressed data is
/// `corrupt_zstd` or `corrupt_gzip`, anything else (an I/O failure) is `read_error`.
fn stream_error(e: std::io::Error, compression: Compression) -> FileError {
    use std::io::ErrorKind;
    let reason = match (e.kind(), compression) {
        (ErrorKind::UnexpectedEof, _) => "truncated",
        (ErrorKind::InvalidData | ErrorKind::InvalidInput | ErrorKind::Other, Compression::Zstd) => "corrupt_zstd",
        (ErrorKind::InvalidData | ErrorKind::InvalidInput | ErrorKind::Other, Compression::Gzip) => "corrupt_gzip",
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
    compression: Compression,
    line: u64,
    buf: Vec<u8>,
    field: String,
    utf8: Utf8Policy,
    max_bytes: usize,
}

impl RecordReader for JsonlReader {
    fn next_item(&mut self) -> std::result::Result<Option<Item>, FileError> {
        let (n, newline) = read_line_bounded(&mut *self.input, &mut self.buf, self.max_bytes)
            .map_err(|e| stream_error(e, self.compression))?;
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
    compression: Compression,
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
        input.take(limit).read_to_end(&mut bytes).map_err(|e| stream_error(e, self.compression))?;
        if bytes.len() > self.max_bytes {
            let detail = format!("file longer than {} bytes", self.max_bytes);
            return Ok(Some(Item::Skip { line: 1, reason: "record_too_large", detail }));
        }
        if looks_binary(&bytes[..bytes.len().min(SNIFF_BYTES)]) {
            return Err(not_text());
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
