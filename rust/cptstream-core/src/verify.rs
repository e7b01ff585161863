//! `verify`: check every shard of an output directory against its manifest.
//!
//! For each listed shard: the path stays inside the directory, the file exists, its sha256 and
//! batch offsets match, and decoding it gives the recorded rows and tokens with every row exactly
//! `seq_len` long, `seq_lengths` positive and summing to at most `seq_len`, and every token id
//! below the vocabulary size. The manifest itself must be complete, its totals must equal the
//! sum over its shards, and no `.arrow` file may sit in a split directory without being listed.
//! Every problem is reported, not only the first.

use crate::error::{Error, Result};
use crate::shard::sha256_file;
use arrow_array::{Array, Int32Array, ListArray};
use arrow_ipc::reader::StreamReader;
use std::fs::File;
use std::io::BufReader;
use std::collections::BTreeSet;
use std::path::{Component, Path};

#[derive(Debug, Default, serde::Serialize)]
pub struct Report {
    pub shards: u64,
    pub rows: u64,
    pub tokens: u64,
    pub max_token_id: i64,
    pub problems: Vec<String>,
}

pub fn verify(dir: &Path) -> Result<Report> {
    let manifest_path = dir.join("manifest.json");
    let bytes = std::fs::read(&manifest_path).map_err(|e| Error::io(&manifest_path, e))?;
    let manifest: serde_json::Value = serde_json::from_slice(&bytes)
        .map_err(|e| Error::ShardFormat { path: manifest_path.clone(), message: format!("invalid JSON: {e}") })?;
    let field = |name: &str| {
        manifest.get(name).ok_or_else(|| Error::ShardFormat {
            path: manifest_path.clone(),
            message: format!("missing field {name:?}"),
        })
    };
    let seq_len = field("seq_len")?.as_u64().unwrap_or(0) as usize;
    let vocab_size = field("tokenizer")?.get("vocab_size").and_then(|v| v.as_i64()).unwrap_or(i64::MAX);
    let splits = field("splits")?.as_object().cloned().unwrap_or_default();

    let mut report = Report { max_token_id: -1, ..Report::default() };
    if manifest.get("complete").and_then(|c| c.as_bool()) != Some(true) {
        report.problems.push("manifest.json: \"complete\" is not true; the shard run did not finish".to_owned());
    }
    let mut total_rows = 0u64;
    let mut total_tokens = 0u64;
    let mut listed = BTreeSet::new();
    for (split, entries) in &splits {
        for entry in entries.as_array().cloned().unwrap_or_default() {
            report.shards += 1;
            let rel = entry.get("path").and_then(|p| p.as_str()).unwrap_or("");
            listed.insert(rel.to_owned());
            let want_rows = entry.get("rows").and_then(|v| v.as_u64()).unwrap_or(0);
            let want_tokens = entry.get("tokens").and_then(|v| v.as_u64()).unwrap_or(0);
            total_rows += want_rows;
            total_tokens += want_tokens;
            let label = format!("{split}: {rel}");
            let rel_path = Path::new(rel);
            if rel.is_empty() || rel_path.components().any(|c| !matches!(c, Component::Normal(_))) {
                report.problems.push(format!("{label}: path leaves the output directory or is empty"));
                continue;
            }
            let path = dir.join(rel_path);
            if !path.is_file() {
                report.problems.push(format!("{label}: missing"));
                continue;
            }
            let resolved = path.canonicalize().map_err(|e| Error::io(&path, e))?;
            if !resolved.starts_with(dir.canonicalize().map_err(|e| Error::io(dir, e))?) {
                report.problems.push(format!("{label}: path leaves the output directory through a symlink"));
                continue;
            }
            let want_sha = entry.get("sha256").and_then(|s| s.as_str()).unwrap_or("");
            let sha = match sha256_file(&path) {
                Ok(sha) => sha,
                Err(e) => {
                    report.problems.push(format!("{label}: cannot be read: {e}"));
                    continue;
                }
            };
            if sha != want_sha {
                report.problems.push(format!("{label}: sha256 is {sha}, manifest says {want_sha}"));
            }
            // Arrow asserts on some corrupt inputs instead of returning an error; a damaged shard
            // must become a reported problem, not a crash.
            let checked = std::panic::catch_unwind(|| check_stream(&path, seq_len, vocab_size))
                .unwrap_or_else(|_| Err("corrupt Arrow data (the decoder panicked)".to_owned()));
            match checked {
                Ok((rows, tokens, max_id)) => {
                    report.rows += rows;
                    report.tokens += tokens;
                    report.max_token_id = report.max_token_id.max(max_id);
                    if rows != want_rows {
                        report.problems.push(format!("{label}: holds {rows} rows, manifest says {want_rows}"));
                    }
                    if tokens != want_tokens {
                        report.problems.push(format!("{label}: holds {tokens} tokens, manifest says {want_tokens}"));
                    }
                }
                Err(message) => report.problems.push(format!("{label}: {message}")),
            }
        }
    }

    report.problems.extend(unlisted_shards(dir, splits.keys(), &listed)?);

    let counts = manifest.get("counts");
    for (name, total) in [("rows", total_rows), ("tokens", total_tokens)] {
        match counts.and_then(|c| c.get(name)).and_then(|v| v.as_u64()) {
            Some(counted) if counted != total => report
                .problems
                .push(format!("manifest.json: counts.{name} is {counted}, but its shards list {total} {name}")),
            Some(_) => {}
            None => report.problems.push(format!("manifest.json: counts.{name} is missing or not a number")),
        }
    }
    Ok(report)
}

/// List `.arrow` files in the split directories that the manifest does not name.
fn unlisted_shards<'a>(
    dir: &Path,
    splits: impl Iterator<Item = &'a String>,
    listed: &BTreeSet<String>,
) -> Result<Vec<String>> {
    let mut problems = Vec::new();
    let names: BTreeSet<&str> = splits.map(String::as_str).chain(["train", "validation"]).collect();
    for split in names {
        let split_dir = dir.join(split);
        if split.is_empty() || !split_dir.is_dir() || Path::new(split).components().count() != 1 {
            continue;
        }
        let mut files: Vec<String> = std::fs::read_dir(&split_dir)
            .map_err(|e| Error::io(&split_dir, e))?
            .filter_map(|entry| entry.ok().map(|e| e.file_name().to_string_lossy().into_owned()))
            .filter(|name| name.ends_with(".arrow"))
            .map(|name| format!("{split}/{name}"))
            .filter(|rel| !listed.contains(rel))
            .collect();
        files.sort();
        problems.extend(files.into_iter().map(|rel| format!("{split}: {rel}: not listed in the manifest")));
    }
    Ok(problems)
}

fn check_stream(path: &Path, seq_len: usize, vocab_size: i64) -> std::result::Result<(u64, u64, i64), String> {
    let file = File::open(path).map_err(|e| e.to_string())?;
    let reader = StreamReader::try_new(BufReader::new(file), None).map_err(|e| format!("not an Arrow stream: {e}"))?;
    let (mut rows, mut tokens, mut max_id) = (0u64, 0u64, -1i64);
    for batch in reader {
        let batch = batch.map_err(|e| format!("corrupt record batch after row {rows}: {e}"))?;
        let column = |name: &str| {
            batch
                .column_by_name(name)
                .and_then(|c| c.as_any().downcast_ref::<ListArray>().cloned())
                .ok_or_else(|| format!("no list column {name:?}"))
        };
        let ids = column("input_ids")?;
        let lengths = column("seq_lengths")?;
        for i in 0..batch.num_rows() {
            let row_ids = ids.value(i);
            let row_ids = row_ids.as_any().downcast_ref::<Int32Array>().ok_or("input_ids are not int32")?;
            if row_ids.len() != seq_len {
                return Err(format!("row {rows} has {} ids, seq_len is {seq_len}", row_ids.len()));
            }
            let row_lengths = lengths.value(i);
            let row_lengths = row_lengths.as_any().downcast_ref::<Int32Array>().ok_or("seq_lengths are not int32")?;
            let real: i64 = row_lengths.values().iter().map(|&l| l as i64).sum();
            if row_lengths.values().iter().any(|&l| l <= 0) || real > seq_len as i64 || real == 0 {
                return Err(format!("row {rows} has invalid seq_lengths {:?}", row_lengths.values()));
            }
            for &id in &row_ids.values()[..real as usize] {
                if id < 0 || id as i64 >= vocab_size {
                    return Err(format!("row {rows} holds token id {id}, outside the vocabulary of {vocab_size}"));
                }
                max_id = max_id.max(id as i64);
            }
            tokens += real as u64;
            rows += 1;
        }
    }
    Ok((rows, tokens, max_id))
}
