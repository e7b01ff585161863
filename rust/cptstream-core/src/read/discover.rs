//! Input discovery: expand files, directories and globs, and detect format and compression.

use crate::error::{Error, Result};
use std::path::{Path, PathBuf};

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
        // A `.json` file is one JSON document (often pretty-printed metadata next to the data),
        // not JSON lines, so it is reported as unsupported instead of failing line by line.
        "jsonl" | "ndjson" => Format::Jsonl,
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
