//! The full, resolved configuration of one `shard` run, as recorded in the manifest.

use crate::clean::CleanConfig;
use crate::error::{Error, Result};
use serde::{Deserialize, Serialize};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Packing {
    /// Best-fit decreasing over a bounded window; documents never cross rows unless split.
    Bfd,
    /// Stream concatenation; documents may cross rows.
    Concat,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BosPolicy {
    /// Add BOS exactly when the tokenizer's own post-processor adds it.
    Auto,
    Always,
    Never,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OnError {
    /// Count the bad record or file, report it and go on.
    Skip,
    /// Stop at the first bad record or file with a non-zero exit status.
    Fail,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Utf8Policy {
    /// Replace invalid byte sequences with U+FFFD and keep the document.
    Replace,
    /// Skip the record and count it as `invalid_utf8`.
    Skip,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ShardConfig {
    /// Files, directories or globs, read in the order given (directories in sorted order).
    pub inputs: Vec<String>,
    /// A directory holding `tokenizer.json` (and `tokenizer_config.json`), or the file itself.
    pub tokenizer: String,
    pub output: String,
    /// Tokens per row.
    pub seq_len: usize,
    pub packing: Packing,
    /// JSON key or Parquet column that contains the text.
    pub text_field: String,
    /// Share of documents sent to the validation split, chosen by a stable hash of the text.
    pub val_fraction: f64,
    /// Salt of the validation hash; change it to draw another split.
    pub val_seed: u64,
    /// Worker threads; 0 uses every core. Does not change the output.
    pub num_threads: usize,
    /// Document separator; resolved from the tokenizer files when unset.
    pub eos_token: Option<String>,
    pub bos: BosPolicy,
    pub on_error: OnError,
    pub invalid_utf8: Utf8Policy,
    pub clean: CleanConfig,
    /// Exact deduplication of cleaned documents.
    pub dedup: bool,
    /// Memory for the deduplication set, in MiB; past it the set becomes a Bloom filter.
    pub dedup_memory_mb: usize,
    /// BFD window, in rows' worth of tokens.
    pub bfd_window_rows: usize,
    /// Most rows kept open for later documents to fill.
    pub bfd_open_rows: usize,
    /// Rows per shard; 0 sizes shards at 128 MiB of token ids.
    pub shard_rows: usize,
    /// Rows per Arrow record batch, the unit a reader decompresses.
    pub rows_per_batch: usize,
    pub zstd_level: i32,
    /// Longest JSONL line or text file read, in bytes; longer records are skipped and counted.
    pub max_record_bytes: usize,
}

impl Default for ShardConfig {
    fn default() -> Self {
        ShardConfig {
            inputs: Vec::new(),
            tokenizer: String::new(),
            output: String::new(),
            seq_len: 4096,
            packing: Packing::Bfd,
            text_field: "text".into(),
            val_fraction: 0.0,
            val_seed: 0,
            num_threads: 0,
            eos_token: None,
            bos: BosPolicy::Auto,
            on_error: OnError::Skip,
            invalid_utf8: Utf8Policy::Replace,
            clean: CleanConfig::default(),
            dedup: true,
            dedup_memory_mb: 512,
            bfd_window_rows: 512,
            bfd_open_rows: 512,
            shard_rows: 0,
            rows_per_batch: 64,
            zstd_level: 3,
            max_record_bytes: crate::read::DEFAULT_MAX_RECORD_BYTES,
        }
    }
}

impl ShardConfig {
    pub fn from_json(json: &str) -> Result<Self> {
        let cfg: ShardConfig =
            serde_json::from_str(json).map_err(|e| Error::invalid(format!("invalid shard configuration: {e}")))?;
        cfg.validate()?;
        Ok(cfg)
    }

    pub fn validate(&self) -> Result<()> {
        if self.inputs.is_empty() {
            return Err(Error::invalid("no input given"));
        }
        if self.tokenizer.is_empty() {
            return Err(Error::invalid("no tokenizer given (--tokenizer)"));
        }
        if self.output.is_empty() {
            return Err(Error::invalid("no output directory given (--output)"));
        }
        if self.seq_len < 2 {
            return Err(Error::invalid(format!("seq_len must be at least 2, got {}", self.seq_len)));
        }
        if !(0.0..1.0).contains(&self.val_fraction) {
            return Err(Error::invalid(format!("val_fraction must be in [0, 1), got {}", self.val_fraction)));
        }
        if self.rows_per_batch == 0 || self.bfd_window_rows == 0 || self.bfd_open_rows == 0 {
            return Err(Error::invalid("rows_per_batch, bfd_window_rows and bfd_open_rows must be positive"));
        }
        if !(1..=22).contains(&self.zstd_level) {
            return Err(Error::invalid(format!("zstd_level must be in 1..=22, got {}", self.zstd_level)));
        }
        for (name, v) in [("max_symbol_ratio", self.clean.max_symbol_ratio), ("max_repeated_line_ratio", self.clean.max_repeated_line_ratio)] {
            if !(0.0..=1.0).contains(&v) {
                return Err(Error::invalid(format!("clean.{name} must be in [0, 1], got {v}")));
            }
        }
        Ok(())
    }

    /// Rows per shard after resolving the 0 default.
    pub fn resolved_shard_rows(&self) -> usize {
        if self.shard_rows > 0 {
            self.shard_rows
        } else {
            ((128usize << 20) / (4 * self.seq_len)).max(1)
        }
    }

    /// Return the configuration without the fields that do not change the output (the thread
    /// count), to check that a resumed run continues the same job.
    pub fn output_identity(&self) -> ShardConfig {
        ShardConfig { num_threads: 0, ..self.clone() }
    }
}
