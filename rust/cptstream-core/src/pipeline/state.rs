//! On-disk state of a run: the checkpoint written after every finished shard, and the manifest.

use super::{Counts, Run, FORMAT_VERSION, STATE_DIR};
use crate::config::ShardConfig;
use crate::error::{Error, Result};
use crate::pack::Packer;
use crate::shard::{write_atomic, WriterState};
use serde::{Deserialize, Serialize};
use std::path::Path;

const CHECKPOINT_VERSION: u32 = 1;

#[derive(Serialize, Deserialize)]
pub(super) struct Checkpoint {
    pub(super) version: u32,
    pub(super) config: String,
    pub(super) tokenizer_sha256: String,
    pub(super) files: Vec<String>,
    pub(super) file_index: usize,
    pub(super) records_done: u64,
    pub(super) counts: Counts,
    pub(super) packers: Vec<Packer>,
    pub(super) writers: Vec<WriterState>,
    pub(super) dedup_entries: u64,
}

impl Run<'_> {
    pub(super) fn save_checkpoint(&mut self, file_index: usize, records_done: u64) -> Result<()> {
        let dedup_entries = match &mut self.dedup {
            Some(d) => d.sync()?,
            None => 0,
        };
        let writers = self.writers.iter_mut().map(|w| w.checkpoint()).collect::<Result<Vec<_>>>()?;
        let cp = Checkpoint {
            version: CHECKPOINT_VERSION,
            config: config_identity(self.cfg),
            tokenizer_sha256: self.tokenizer.info.sha256.clone(),
            files: self.files.clone(),
            file_index,
            records_done,
            counts: self.counts.clone(),
            packers: self.packers.clone(),
            writers,
            dedup_entries,
        };
        let bytes = serde_json::to_vec(&cp).expect("checkpoint serializes");
        write_atomic(&self.out.join(STATE_DIR).join("checkpoint.json"), &bytes)
    }

    pub(super) fn load_checkpoint(&mut self, path: &Path) -> Result<Checkpoint> {
        let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
        let cp: Checkpoint = serde_json::from_slice(&bytes).map_err(|e| Error::ShardFormat {
            path: path.to_path_buf(),
            message: format!("unreadable checkpoint: {e}"),
        })?;
        let mismatch = |what: &str| Error::invalid(format!(
            "cannot resume in {}: the {what} differs from the interrupted run; use the same arguments or a new output directory",
            self.out.display()
        ));
        if cp.version != CHECKPOINT_VERSION {
            return Err(mismatch("checkpoint version"));
        }
        if cp.config != config_identity(self.cfg) {
            return Err(mismatch("configuration"));
        }
        if cp.tokenizer_sha256 != self.tokenizer.info.sha256 {
            return Err(mismatch("tokenizer"));
        }
        if cp.files != self.files {
            return Err(mismatch("list of input files"));
        }
        for (writer, state) in self.writers.iter_mut().zip(cp.writers.iter()) {
            writer.restore(state.clone())?;
        }
        self.counts = cp.counts.clone();
        self.packers = cp.packers.clone();
        Ok(cp)
    }

    pub(super) fn manifest(&self, elapsed: f64, resumed: bool) -> serde_json::Value {
        let info = &self.tokenizer.info;
        let c = &self.counts;
        serde_json::json!({
            "format_version": FORMAT_VERSION,
            "complete": true,
            "tokenizer": {
                "path": info.path, "sha256": info.sha256, "vocab_size": info.vocab_size,
                "eos_token": info.eos_token, "eos_id": info.eos_id, "eos_source": info.eos_source,
                "bos_token": info.bos_token, "bos_id": info.bos_id, "pad_id": info.pad_id,
            },
            "seq_len": self.cfg.seq_len,
            "packing": self.cfg.packing,
            "rows_per_batch": self.cfg.rows_per_batch,
            "counts": {
                "files_read": c.files_read, "files_failed": c.files_failed, "files_skipped": c.files_skipped,
                "records_skipped": c.records_skipped,
                "docs_read": c.docs_read, "docs_kept": c.docs_kept, "docs_dropped": c.docs_dropped,
                "docs_train": c.docs_train, "docs_validation": c.docs_validation,
                "tokens": c.tokens, "rows": c.rows, "pad_tokens": c.pad_tokens,
                "text_bytes": c.text_bytes, "input_bytes": c.input_bytes,
                "dedup_false_positive_rate": self.dedup.as_ref().map(|d| d.false_positive_rate()).unwrap_or(0.0),
            },
            "problems": c.examples,
            "splits": {
                "train": self.writers[0].finished(),
                "validation": self.writers[1].finished(),
            },
            "run": {"seconds": elapsed, "resumed": resumed},
            "config": self.cfg,
        })
    }
}

fn config_identity(cfg: &ShardConfig) -> String {
    serde_json::to_string(&cfg.output_identity()).expect("config serializes")
}

pub(super) fn read_manifest(path: &Path) -> Result<serde_json::Value> {
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    serde_json::from_slice(&bytes)
        .map_err(|e| Error::ShardFormat { path: path.to_path_buf(), message: format!("invalid manifest: {e}") })
}
