//! Shard writer restore after a crash at the moments that random kills rarely hit.

use cptstream_core::pack::Row;
use cptstream_core::shard::{sha256_file, ShardWriter, WriterState};
use std::path::Path;

const SEQ_LEN: usize = 4;

fn writer(root: &Path) -> ShardWriter {
    // 3 rows per shard, 2 rows per record batch: a checkpoint after 2 rows has bytes on disk.
    ShardWriter::new(root, "train", SEQ_LEN, 0, 3, 2, 3).unwrap()
}

fn row(i: u32) -> Row {
    Row { tokens: vec![i, i + 1, 7], seq_lengths: vec![3] }
}

/// Write `rows` rows into a fresh directory with no interruption; returns the shard hashes.
fn uninterrupted(rows: u32) -> Vec<String> {
    let dir = tempfile::tempdir().unwrap();
    let mut w = writer(dir.path());
    for i in 0..rows {
        w.push(row(i)).unwrap();
    }
    w.finish().unwrap();
    w.finished().iter().map(|e| sha256_file(&dir.path().join(&e.path)).unwrap()).collect()
}

/// Write 2 rows and checkpoint, as the pipeline does after a shard; then keep writing.
fn checkpointed(root: &Path) -> (ShardWriter, WriterState) {
    let mut w = writer(root);
    w.push(row(0)).unwrap();
    w.push(row(1)).unwrap();
    let state = w.checkpoint().unwrap();
    assert!(state.file_len > 0, "the checkpoint must cover bytes of a partial shard");
    (w, state)
}

fn resume_and_finish(root: &Path, state: WriterState, rows: u32) -> Vec<String> {
    let mut w = writer(root);
    w.restore(state).unwrap();
    for i in 2..rows {
        w.push(row(i)).unwrap();
    }
    w.finish().unwrap();
    w.finished().iter().map(|e| sha256_file(&root.join(&e.path)).unwrap()).collect()
}

#[test]
fn killed_after_rename_before_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let (mut w, state) = checkpointed(dir.path());

    // Row 3 finishes shard 0: it is renamed to its final name, then the process dies before
    // the next checkpoint, so the checkpoint still describes a partial shard 0.
    assert!(w.push(row(2)).unwrap().is_some());
    drop(w);
    assert!(dir.path().join("train/shard_00000.arrow").is_file());
    assert!(!dir.path().join("train/shard_00000.arrow.tmp").exists());

    assert_eq!(resume_and_finish(dir.path(), state, 7), uninterrupted(7));
}

#[test]
fn killed_after_later_shards_removes_them() {
    let dir = tempfile::tempdir().unwrap();
    let (mut w, state) = checkpointed(dir.path());
    for i in 2..7 {
        w.push(row(i)).unwrap();
    }
    drop(w);
    assert!(dir.path().join("train/shard_00001.arrow").is_file());

    let mut restored = writer(dir.path());
    restored.restore(state.clone()).unwrap();
    assert!(!dir.path().join("train/shard_00001.arrow").exists(), "a shard past the checkpoint was kept");
    drop(restored);

    assert_eq!(resume_and_finish(dir.path(), state, 7), uninterrupted(7));
}

#[test]
fn killed_mid_batch_truncates_appended_bytes() {
    let dir = tempfile::tempdir().unwrap();
    let (w, state) = checkpointed(dir.path());
    drop(w);

    // Bytes a killed run appended after the checkpoint are cut off on restore.
    let tmp = dir.path().join("train/shard_00000.arrow.tmp");
    let mut bytes = std::fs::read(&tmp).unwrap();
    bytes.extend_from_slice(&[0xAB; 100]);
    std::fs::write(&tmp, bytes).unwrap();

    assert_eq!(resume_and_finish(dir.path(), state, 7), uninterrupted(7));
}

#[test]
fn partial_shard_shorter_than_checkpoint_is_rejected() {
    let dir = tempfile::tempdir().unwrap();
    let (w, state) = checkpointed(dir.path());
    drop(w);
    let tmp = dir.path().join("train/shard_00000.arrow.tmp");
    std::fs::OpenOptions::new().write(true).open(&tmp).unwrap().set_len(state.file_len - 1).unwrap();

    let error = writer(dir.path()).restore(state.clone()).unwrap_err().to_string();
    assert!(error.contains("shard_00000.arrow.tmp"), "{error}");
    assert!(error.contains(&format!("the checkpoint recorded {}", state.file_len)), "{error}");
}
