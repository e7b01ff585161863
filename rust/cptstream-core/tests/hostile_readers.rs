//! Damaged and arbitrary input through every reader and the cleaner.
//!
//! The fixed cases pin down what each kind of damage becomes (a reason, never a partial
//! document). The property tests feed arbitrary and mutated bytes: no panic escapes a reader,
//! the JSONL and text decoders never panic at all, and cleaning is idempotent on any text.

use cptstream_core::clean::{clean, filter, CleanConfig, Normalization};
use cptstream_core::config::Utf8Policy;
use cptstream_core::read::{self, FileError, Item, Options};
use proptest::prelude::*;
use std::io::Write;
use std::path::Path;

const MAX_ITEMS: usize = 100_000;

fn options(max_record_bytes: usize) -> Options {
    Options { text_field: "text".into(), utf8: Utf8Policy::Replace, max_record_bytes }
}

/// Read a whole file: its documents, skipped reasons and the error that ended it, if any.
fn drain(path: &Path, opts: &Options) -> (Vec<String>, Vec<&'static str>, Option<FileError>) {
    let (mut docs, mut skips) = (Vec::new(), Vec::new());
    let mut reader = match read::open(path, opts) {
        Ok(r) => r,
        Err(e) => return (docs, skips, Some(e)),
    };
    for _ in 0..MAX_ITEMS {
        match reader.next_item() {
            Ok(Some(Item::Doc { text, .. })) => docs.push(text),
            Ok(Some(Item::Skip { reason, .. })) => skips.push(reason),
            Ok(None) => return (docs, skips, None),
            Err(e) => return (docs, skips, Some(e)),
        }
    }
    panic!("{} yields more than {MAX_ITEMS} records", path.display());
}

/// 20,000 JSONL lines whose texts differ, so any partial line would show up as a new text.
fn corpus() -> (Vec<String>, Vec<u8>) {
    let texts: Vec<String> = (0..20_000).map(|i| format!("document {i} says {}", "word ".repeat(i % 17))).collect();
    let mut jsonl = Vec::new();
    for t in &texts {
        writeln!(jsonl, "{}", serde_json::json!({ "text": t })).unwrap();
    }
    (texts, jsonl)
}

fn gzip(bytes: &[u8]) -> Vec<u8> {
    let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    encoder.write_all(bytes).unwrap();
    encoder.finish().unwrap()
}

/// Check that the documents read before the cut are a strict prefix of the originals, whole and in order.
fn assert_whole_prefix(docs: &[String], texts: &[String]) {
    assert!(!docs.is_empty(), "no document was read before the cut");
    assert!(docs.len() < texts.len(), "all {} documents were read from a cut file", texts.len());
    assert_eq!(docs, &texts[..docs.len()]);
}

#[test]
fn zstd_cut_at_60_percent_ends_truncated() {
    let dir = tempfile::tempdir().unwrap();
    let (texts, jsonl) = corpus();
    let compressed = zstd::encode_all(&jsonl[..], 3).unwrap();
    let path = dir.path().join("cut.jsonl.zst");
    std::fs::write(&path, &compressed[..compressed.len() * 6 / 10]).unwrap();

    let (docs, skips, error) = drain(&path, &options(1 << 20));
    let error = error.expect("a cut zstd file must end in an error");
    assert_eq!(error.reason, "truncated", "{}", error.detail);
    assert!(skips.is_empty(), "{skips:?}");
    assert_whole_prefix(&docs, &texts);
}

#[test]
fn gzip_cut_in_body_or_trailer_ends_truncated() {
    let dir = tempfile::tempdir().unwrap();
    let (texts, jsonl) = corpus();
    let compressed = gzip(&jsonl);

    let body = dir.path().join("body.jsonl.gz");
    std::fs::write(&body, &compressed[..compressed.len() * 6 / 10]).unwrap();
    let (docs, _, error) = drain(&body, &options(1 << 20));
    assert_eq!(error.expect("cut gzip body").reason, "truncated");
    assert_whole_prefix(&docs, &texts);

    // Without the last 4 trailer bytes every line decodes, but the file is still reported.
    let trailer = dir.path().join("trailer.jsonl.gz");
    std::fs::write(&trailer, &compressed[..compressed.len() - 4]).unwrap();
    let (docs, _, error) = drain(&trailer, &options(1 << 20));
    assert_eq!(error.expect("cut gzip trailer").reason, "truncated");
    assert_eq!(docs, texts);
}

#[test]
fn damaged_headers_and_binary_files_are_file_errors() {
    let dir = tempfile::tempdir().unwrap();
    let (_, jsonl) = corpus();
    let mut compressed = gzip(&jsonl[..1000]);
    compressed[3] = 0xE0; // reserved FLG bits, which RFC 1952 says must be zero
    let cases: [(&str, Vec<u8>, &str); 5] = [
        ("bad-header.jsonl.gz", compressed, "corrupt_gzip"),
        ("not-zstd.jsonl.zst", b"{\"text\": \"plain\"}\n".to_vec(), "corrupt_zstd"),
        ("image.txt", b"\x89PNG\r\n\x1a\n\0\0\0\rIHDR\0\0\0\x10".to_vec(), "not_text"),
        ("image.jsonl", b"\x89PNG\r\n\x1a\n\0\0\0\rIHDR\0\0\0\x10".to_vec(), "not_text"),
        ("garbage.parquet", b"PAR1 this is not parquet PAR1".to_vec(), "corrupt_parquet"),
    ];
    for (name, bytes, reason) in cases {
        let path = dir.path().join(name);
        std::fs::write(&path, bytes).unwrap();
        let (docs, _, error) = drain(&path, &options(1 << 20));
        assert!(docs.is_empty(), "{name}: {docs:?}");
        assert_eq!(error.map(|e| e.reason), Some(reason), "{name}");
    }
}

#[test]
fn empty_files_have_no_records() {
    let dir = tempfile::tempdir().unwrap();
    for name in ["empty.jsonl", "empty.jsonl.zst", "empty.jsonl.gz", "empty.txt", "empty.parquet"] {
        let path = dir.path().join(name);
        std::fs::write(&path, b"").unwrap();
        let (docs, skips, error) = drain(&path, &options(1 << 20));
        assert!(docs.is_empty(), "{name}");
        assert!(skips.is_empty(), "{name}");
        assert!(error.is_none(), "{name}: {:?}", error.map(|e| e.detail));
    }
}

#[test]
fn multi_megabyte_line_read_whole_or_skipped() {
    let dir = tempfile::tempdir().unwrap();
    let long = "長".repeat(3 << 20); // 9 MiB of UTF-8 on one line
    let path = dir.path().join("long.jsonl");
    let mut bytes = serde_json::json!({ "text": long }).to_string().into_bytes();
    bytes.extend_from_slice(b"\n{\"text\": \"after\"}\n");
    std::fs::write(&path, &bytes).unwrap();

    let (docs, _, error) = drain(&path, &options(16 << 20));
    assert!(error.is_none());
    assert_eq!(docs.len(), 2);
    assert_eq!(docs[0].len(), long.len());
    assert_eq!(docs[1], "after");

    // Over the limit the line is skipped, and the reader resumes at the next line.
    let (docs, skips, error) = drain(&path, &options(1 << 20));
    assert!(error.is_none());
    assert_eq!(skips, ["record_too_large"]);
    assert_eq!(docs, ["after"]);
}

fn parquet_bytes() -> Vec<u8> {
    use arrow_array::{RecordBatch, StringArray};
    let texts: Vec<String> = (0..300).map(|i| format!("row {i} of a small parquet file")).collect();
    let batch = RecordBatch::try_from_iter([("text", std::sync::Arc::new(StringArray::from(texts)) as _)]).unwrap();
    let mut out = Vec::new();
    let mut writer = parquet::arrow::ArrowWriter::try_new(&mut out, batch.schema(), None).unwrap();
    writer.write(&batch).unwrap();
    writer.close().unwrap();
    out
}

/// Reasons a reader may end a file with; `reader_panic` is not among them.
const FILE_REASONS: &[&str] =
    &["truncated", "corrupt_zstd", "corrupt_gzip", "read_error", "not_text", "corrupt_parquet", "missing_field", "not_string"];

fn check_no_panic(name: &str, bytes: &[u8]) -> std::result::Result<(), TestCaseError> {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join(name);
    std::fs::write(&path, bytes).unwrap();
    let (_, _, error) = drain(&path, &options(1 << 16));
    if let Some(e) = error {
        prop_assert!(FILE_REASONS.contains(&e.reason), "{name}: {} ({})", e.reason, e.detail);
        // Parquet decoders may panic on corrupt data, which the reader turns into corrupt_parquet.
        prop_assert!(name.ends_with(".parquet") || !e.detail.contains("panicked"), "{name}: {}", e.detail);
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    #[test]
    fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..4096)) {
        for name in ["a.jsonl", "a.txt", "a.jsonl.zst", "a.jsonl.gz", "a.txt.gz", "a.parquet"] {
            check_no_panic(name, &bytes)?;
        }
    }

    #[test]
    fn mutated_compressed_and_parquet_never_panic(
        flips in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..8),
        cut in any::<prop::sample::Index>(),
    ) {
        let (_, jsonl) = corpus();
        let sources = [
            ("m.jsonl.zst", zstd::encode_all(&jsonl[..20_000], 3).unwrap()),
            ("m.jsonl.gz", gzip(&jsonl[..20_000])),
            ("m.parquet", parquet_bytes()),
        ];
        for (name, mut bytes) in sources {
            for (index, value) in &flips {
                let i = index.index(bytes.len());
                bytes[i] ^= value | 1;
            }
            check_no_panic(name, &bytes)?;
            check_no_panic(name, &bytes[..cut.index(bytes.len())])?;
        }
    }

    #[test]
    fn clean_arbitrary_bytes_idempotent(bytes in proptest::collection::vec(any::<u8>(), 0..2048)) {
        let text = String::from_utf8_lossy(&bytes);
        for normalization in [Normalization::Nfc, Normalization::Nfkc, Normalization::None] {
            let cfg = CleanConfig { normalization, ..CleanConfig::default() };
            let once = clean(&text, &cfg);
            prop_assert_eq!(clean(&once, &cfg), once.clone());
            let _ = filter(&once, &cfg);
        }
    }
}
