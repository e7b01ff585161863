//! One `shard` run: read → clean → deduplicate → tokenize → pack → write, with checkpoints.
//!
//! Documents are read in batches on the coordinating thread. Cleaning, filtering, hashing and
//! tokenization run in parallel over a batch on a local rayon pool. Everything that has state
//! (counts, deduplication, the validation split, packing, writing) then runs in document order on
//! the coordinating thread, so the output depends only on the input and the configuration, never
//! on the thread count.
//!
//! After every finished shard a checkpoint records the input cursor (file, records consumed),
//! the counts, the packer state, both writers' states and the length of the deduplication log.
//! `--resume` restores all of it and re-reads the input from the cursor, which gives the same
//! bytes as a run that never stopped.
//!
//! A panic never unwinds out of [`run`]: a panic while preparing one document is caught on the
//! worker thread and reported with that document's `FILE:LINE`, and any other panic is caught
//! around the whole run and reported with the file, record and stage last recorded in
//! [`Position`]. Both become [`Error::Panic`].

use crate::clean::{clean, filter};
use crate::config::{OnError, Packing, ShardConfig};
use crate::dedup::{hash_text, Dedup};
use crate::error::{panic_message, Error, Result};
use crate::pack::{BfdPacker, ConcatPacker, Packer, Row};
use crate::read::{self, FileError, Item, Options};
use crate::shard::{write_atomic, ShardWriter};
use crate::tokenize::DocTokenizer;
use rayon::prelude::*;
use serde::{Deserialize, Serialize};
use std::cell::{Cell, RefCell};
use std::collections::{BTreeMap, VecDeque};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::time::Instant;

mod state;

use state::read_manifest;

pub const FORMAT_VERSION: u32 = 1;
const BATCH_DOCS: usize = 2048;
const BATCH_BYTES: usize = 16 << 20;
/// Locations kept per reason in the summary; the counts stay exact.
const MAX_EXAMPLES: usize = 5;
pub const STATE_DIR: &str = ".cptstream";
/// Environment variable for tests: a document that contains its value panics while it is prepared.
pub const TEST_PANIC_MARKER_ENV: &str = "CPTSTREAM_TEST_PANIC_MARKER";

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Counts {
    pub files_read: u64,
    pub files_failed: BTreeMap<String, u64>,
    pub files_skipped: BTreeMap<String, u64>,
    pub records_skipped: BTreeMap<String, u64>,
    pub docs_read: u64,
    pub docs_kept: u64,
    pub docs_dropped: BTreeMap<String, u64>,
    pub docs_train: u64,
    pub docs_validation: u64,
    pub text_bytes: u64,
    pub input_bytes: u64,
    pub tokens: u64,
    pub rows: u64,
    pub pad_tokens: u64,
    /// First few `path:line: detail` locations per reason, for the summary.
    pub examples: BTreeMap<String, Vec<String>>,
}

impl Counts {
    fn note(&mut self, reason: &str, location: String) {
        let list = self.examples.entry(reason.to_owned()).or_default();
        if list.len() < MAX_EXAMPLES {
            list.push(location);
        }
    }
}

/// Live figures for the progress bar.
#[derive(Clone, Debug, Default)]
pub struct Progress {
    pub docs: u64,
    pub text_bytes: u64,
    pub tokens: u64,
    pub rows: u64,
    pub files_done: usize,
    pub files_total: usize,
}


/// Result of a run: the manifest as written, and whether it was already complete.
pub struct Outcome {
    pub manifest: serde_json::Value,
    pub already_complete: bool,
    pub resumed: bool,
}

enum Prepared {
    Dropped(&'static str),
    Keep { text_len: usize, hash: u128, tokens: Result<Vec<u32>> },
    Panicked(String),
}

/// Current file, record and stage of the coordinating thread, kept outside the run so a caught panic can name them.
#[derive(Default)]
struct Position {
    file: RefCell<String>,
    record: Cell<u64>,
    stage: Cell<&'static str>,
}

impl Position {
    fn enter(&self, stage: &'static str, record: u64) {
        self.stage.set(stage);
        self.record.set(record);
    }

    fn describe(&self) -> String {
        let file = self.file.borrow();
        let stage = self.stage.get();
        if file.is_empty() {
            format!("the run setup ({stage})")
        } else {
            format!("{file}:{} ({stage})", self.record.get())
        }
    }
}

struct Run<'a> {
    cfg: &'a ShardConfig,
    position: &'a Position,
    panic_marker: Option<String>,
    out: PathBuf,
    tokenizer: DocTokenizer,
    counts: Counts,
    dedup: Option<Dedup>,
    packers: Vec<Packer>,
    writers: Vec<ShardWriter>,
    rows: VecDeque<Row>,
    files: Vec<String>,
}

/// Run one shard job; see the module documentation. `progress` returning false stops the run
/// with [`Error::Interrupted`].
pub fn run(cfg: &ShardConfig, resume: bool, progress: &mut dyn FnMut(&Progress) -> bool) -> Result<Outcome> {
    let position = Position::default();
    position.enter("loading the tokenizer and listing inputs", 0);
    catch_unwind(AssertUnwindSafe(|| run_unguarded(cfg, resume, progress, &position))).unwrap_or_else(|payload| {
        Err(Error::Panic { context: position.describe(), message: panic_message(&*payload) })
    })
}

fn run_unguarded(
    cfg: &ShardConfig,
    resume: bool,
    progress: &mut dyn FnMut(&Progress) -> bool,
    position: &Position,
) -> Result<Outcome> {
    cfg.validate()?;
    let started = Instant::now();

    // ---- everything that can fail on bad arguments, before any file is written ----
    let tokenizer = DocTokenizer::load(&cfg.tokenizer, cfg.eos_token.as_deref(), cfg.bos)?;
    log::info!(
        "tokenizer {}: EOS {:?} = {} (from {}), BOS {}",
        tokenizer.info.path,
        tokenizer.info.eos_token,
        tokenizer.info.eos_id,
        tokenizer.info.eos_source,
        match (&tokenizer.info.bos_token, tokenizer.info.bos_id) {
            (Some(t), Some(id)) => format!("{t:?} = {id}"),
            _ => "off".to_owned(),
        }
    );
    let (files, unsupported) = read::discover(&cfg.inputs)?;
    if files.is_empty() {
        return Err(Error::invalid(format!("no readable input file found in {:?}", cfg.inputs)));
    }
    let out = PathBuf::from(&cfg.output);
    let manifest_path = out.join("manifest.json");
    let checkpoint_path = out.join(STATE_DIR).join("checkpoint.json");

    if resume && !checkpoint_path.exists() && manifest_path.exists() {
        let manifest = read_manifest(&manifest_path)?;
        if manifest.get("complete").and_then(|c| c.as_bool()) == Some(true) {
            return Ok(Outcome { manifest, already_complete: true, resumed: true });
        }
    }
    if !resume && (manifest_path.exists() || checkpoint_path.exists() || out.join("train").exists()) {
        return Err(Error::invalid(format!(
            "output directory {} already contains a cptstream run; pass --resume to continue it or choose another directory",
            out.display()
        )));
    }
    std::fs::create_dir_all(out.join(STATE_DIR)).map_err(|e| Error::io(out.join(STATE_DIR), e))?;

    let seq_len = cfg.seq_len;
    let make_packer = || match cfg.packing {
        Packing::Bfd => Packer::Bfd(BfdPacker::new(seq_len, cfg.bfd_window_rows, cfg.bfd_open_rows)),
        Packing::Concat => Packer::Concat(ConcatPacker::new(seq_len)),
    };
    let make_writer = |split: &str| {
        ShardWriter::new(&out, split, seq_len, tokenizer.info.pad_id, cfg.resolved_shard_rows(), cfg.rows_per_batch, cfg.zstd_level)
    };
    let writers = vec![make_writer("train")?, make_writer("validation")?];
    let file_names: Vec<String> = files.iter().map(|p| p.display().to_string()).collect();
    let mut run = Run {
        cfg,
        position,
        panic_marker: std::env::var(TEST_PANIC_MARKER_ENV).ok().filter(|m| !m.is_empty()),
        out: out.clone(),
        tokenizer,
        counts: Counts::default(),
        dedup: cfg.dedup.then(|| Dedup::new(cfg.dedup_memory_mb << 20)),
        packers: vec![make_packer(), make_packer()],
        writers,
        rows: VecDeque::new(),
        files: file_names,
    };

    // ---- restore a checkpoint, or start fresh ----
    let dedup_log = out.join(STATE_DIR).join("dedup.log");
    let (mut file_index, mut records_done, resumed) = if resume && checkpoint_path.exists() {
        let cp = run.load_checkpoint(&checkpoint_path)?;
        if let Some(d) = &mut run.dedup {
            d.attach_log(&dedup_log, cp.dedup_entries)?;
        }
        log::info!("resuming at file {} of {}, after {} records", cp.file_index + 1, files.len(), cp.records_done);
        (cp.file_index, cp.records_done, true)
    } else {
        if let Some(d) = &mut run.dedup {
            d.attach_log(&dedup_log, 0)?;
        }
        for path in &unsupported {
            *run.counts.files_skipped.entry("unsupported_file".into()).or_default() += 1;
            run.counts.note("unsupported_file", path.display().to_string());
        }
        if !unsupported.is_empty() {
            log::warn!("skipping {} files with unsupported extensions, e.g. {}", unsupported.len(), unsupported[0].display());
        }
        (0, 0, false)
    };

    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(cfg.num_threads)
        .build()
        .map_err(|e| Error::invalid(format!("cannot start {} threads: {e}", cfg.num_threads)))?;
    let opts = Options { text_field: cfg.text_field.clone(), utf8: cfg.invalid_utf8, max_record_bytes: cfg.max_record_bytes };
    let mut live = Progress { files_total: files.len(), ..Progress::default() };

    // ---- read, process and write, file by file ----
    while file_index < files.len() {
        let path = &files[file_index];
        let skip = std::mem::take(&mut records_done);
        run.process_file(file_index, path, skip, &opts, &pool, &mut live, progress)?;
        file_index += 1;
        run.counts.files_read += 1;
        run.counts.input_bytes += std::fs::metadata(path).map(|m| m.len()).unwrap_or(0);
        live.files_done = file_index;
    }

    // ---- flush the packers and writers, then the manifest ----
    position.enter("writing the last shards and the manifest", 0);
    for split in 0..2 {
        run.packers[split].finish(&mut run.rows);
        run.write_rows(split)?;
        run.writers[split].finish()?;
    }
    let manifest = run.manifest(started.elapsed().as_secs_f64(), resumed);
    let text = serde_json::to_string_pretty(&manifest).expect("manifest serializes");
    write_atomic(&manifest_path, text.as_bytes())?;
    let _ = std::fs::remove_dir_all(out.join(STATE_DIR));
    progress(&live);
    Ok(Outcome { manifest, already_complete: false, resumed })
}

/// Clean, filter, hash and tokenize one document; runs on the worker threads.
fn prepare(text: &str, cfg: &ShardConfig, tokenizer: &DocTokenizer, panic_marker: Option<&str>) -> Prepared {
    if let Some(marker) = panic_marker {
        assert!(!text.contains(marker), "test panic: the document contains {TEST_PANIC_MARKER_ENV}={marker:?}");
    }
    let cleaned = clean(text, &cfg.clean);
    match filter(&cleaned, &cfg.clean) {
        Some(reason) => Prepared::Dropped(reason.as_str()),
        None => Prepared::Keep { text_len: text.len(), hash: hash_text(&cleaned), tokens: tokenizer.encode_doc(&cleaned) },
    }
}

impl Run<'_> {
    #[allow(clippy::too_many_arguments)]
    fn process_file(
        &mut self,
        file_index: usize,
        path: &Path,
        skip: u64,
        opts: &Options,
        pool: &rayon::ThreadPool,
        live: &mut Progress,
        progress: &mut dyn FnMut(&Progress) -> bool,
    ) -> Result<()> {
        let shown = path.display().to_string();
        *self.position.file.borrow_mut() = shown.clone();
        self.position.enter("opening the file", 0);
        let mut reader = match read::open(path, opts) {
            Ok(r) => r,
            Err(e) => return self.file_failed(&shown, 0, e),
        };
        let mut consumed = 0u64;
        let mut last_report = Instant::now();
        loop {
            // ---- collect a batch ----
            let mut items = Vec::new();
            let mut bytes = 0usize;
            let mut failure = None;
            while items.len() < BATCH_DOCS && bytes < BATCH_BYTES {
                self.position.enter("reading", consumed + 1);
                match reader.next_item() {
                    Ok(Some(item)) => {
                        consumed += 1;
                        if consumed <= skip {
                            continue;
                        }
                        if let Item::Doc { text, .. } = &item {
                            bytes += text.len();
                        }
                        items.push((consumed, item));
                    }
                    Ok(None) => break,
                    Err(e) => {
                        failure = Some(e);
                        break;
                    }
                }
            }
            let at_end = items.len() < BATCH_DOCS && bytes < BATCH_BYTES;

            // ---- clean, filter, hash and tokenize in parallel ----
            let first = items.first().map_or(consumed, |(record, _)| *record);
            self.position.enter("cleaning and tokenizing a batch starting", first);
            let (cfg, tokenizer, marker) = (self.cfg, &self.tokenizer, self.panic_marker.as_deref());
            let prepared: Vec<Option<Prepared>> = pool.install(|| {
                items
                    .par_iter()
                    .map(|(_, item)| match item {
                        // Caught per document, so the error names the document that panicked.
                        Item::Doc { text, .. } => Some(
                            catch_unwind(AssertUnwindSafe(|| prepare(text, cfg, tokenizer, marker)))
                                .unwrap_or_else(|payload| Prepared::Panicked(panic_message(&*payload))),
                        ),
                        Item::Skip { .. } => None,
                    })
                    .collect()
            });

            // ---- in document order: counts, dedup, split, pack, write ----
            for ((record, item), prepared) in items.into_iter().zip(prepared) {
                self.position.enter("deduplicating, packing and writing", record);
                let finished_shard = self.handle(&shown, item, prepared)?;
                if finished_shard {
                    self.save_checkpoint(file_index, record)?;
                }
            }

            live.docs = self.counts.docs_read;
            live.text_bytes = self.counts.text_bytes;
            live.tokens = self.counts.tokens;
            live.rows = self.counts.rows;
            if last_report.elapsed().as_millis() >= 500 {
                last_report = Instant::now();
                if !progress(live) {
                    return Err(Error::Interrupted);
                }
            }

            if let Some(e) = failure {
                return self.file_failed(&shown, consumed + 1, e);
            }
            if at_end {
                if consumed == 0 {
                    *self.counts.files_skipped.entry("empty_file".into()).or_default() += 1;
                    self.counts.note("empty_file", format!("{shown}: no records"));
                }
                return Ok(());
            }
        }
    }

    /// Count one record; returns true when a shard was finished on its account.
    fn handle(&mut self, file: &str, item: Item, prepared: Option<Prepared>) -> Result<bool> {
        let (line, prepared) = match (item, prepared) {
            (Item::Skip { line, reason, detail }, _) => {
                *self.counts.records_skipped.entry(reason.into()).or_default() += 1;
                let location = format!("{file}:{line}: {detail}");
                if self.cfg.on_error == OnError::Fail && reason != "blank_line" {
                    return Err(Error::invalid(format!("{location} ({reason}); rerun with --on-error skip to skip such records")));
                }
                self.counts.note(reason, location);
                return Ok(false);
            }
            (Item::Doc { line, .. }, Some(p)) => (line, p),
            (Item::Doc { .. }, None) => unreachable!("every document is prepared"),
        };
        self.counts.docs_read += 1;
        let (text_len, hash, tokens) = match prepared {
            Prepared::Dropped(reason) => {
                *self.counts.docs_dropped.entry(reason.into()).or_default() += 1;
                self.counts.note(reason, format!("{file}:{line}"));
                return Ok(false);
            }
            Prepared::Keep { text_len, hash, tokens } => (text_len, hash, tokens),
            Prepared::Panicked(message) => return Err(Error::Panic { context: format!("{file}:{line}"), message }),
        };
        if let Some(dedup) = &mut self.dedup {
            if dedup.check_and_insert(hash)? {
                *self.counts.docs_dropped.entry("duplicate".into()).or_default() += 1;
                self.counts.note("duplicate", format!("{file}:{line}"));
                return Ok(false);
            }
        }
        let tokens = tokens.map_err(|e| Error::invalid(format!("{file}:{line}: {e}")))?;

        let split = usize::from(self.is_validation(hash));
        self.counts.docs_kept += 1;
        self.counts.text_bytes += text_len as u64;
        self.counts.tokens += tokens.len() as u64;
        if split == 1 {
            self.counts.docs_validation += 1;
        } else {
            self.counts.docs_train += 1;
        }
        self.packers[split].push(&tokens, &mut self.rows);
        self.write_rows(split)
    }

    fn is_validation(&self, hash: u128) -> bool {
        if self.cfg.val_fraction <= 0.0 {
            return false;
        }
        let h = xxhash_rust::xxh3::xxh3_64_with_seed(&hash.to_le_bytes(), self.cfg.val_seed);
        (h as f64 / 18446744073709551616.0) < self.cfg.val_fraction
    }

    fn write_rows(&mut self, split: usize) -> Result<bool> {
        let mut finished = false;
        while let Some(row) = self.rows.pop_front() {
            self.counts.rows += 1;
            self.counts.pad_tokens += (self.cfg.seq_len - row.tokens.len()) as u64;
            finished |= self.writers[split].push(row)?.is_some();
        }
        Ok(finished)
    }

    fn file_failed(&mut self, file: &str, line: u64, e: FileError) -> Result<()> {
        *self.counts.files_failed.entry(e.reason.into()).or_default() += 1;
        let location = if line > 0 { format!("{file}:{line}: {}", e.detail) } else { format!("{file}: {}", e.detail) };
        log::warn!("cannot read {location} ({})", e.reason);
        if self.cfg.on_error == OnError::Fail {
            return Err(Error::invalid(format!("{location} ({}); rerun with --on-error skip to skip bad files", e.reason)));
        }
        self.counts.note(e.reason, location);
        Ok(())
    }
}
