//! Arrow IPC stream shards with zstd-compressed buffers, written atomically.
//!
//! A shard is written to `NAME.arrow.tmp` one record batch at a time and renamed to `NAME.arrow`
//! only after the end-of-stream marker is on disk and synced, so a listed shard is always whole.
//! The stream format (not the IPC file format) is used because `datasets.Dataset.from_file`
//! reads streams. The byte offset of every record-batch message is kept for the manifest, so a
//! reader can seek to any batch without reading the ones before it.
//!
//! Record batches are encoded with arrow's `IpcDataGenerator` and written as messages by hand
//! (instead of `StreamWriter`) so that a resumed run can reopen a partly written shard, truncate it
//! to the checkpointed length and append to it.

use crate::error::{Error, Result};
use crate::pack::Row;
use arrow_array::{ArrayRef, Int32Array, ListArray, RecordBatch};
use arrow_buffer::OffsetBuffer;
use arrow_ipc::writer::{IpcWriteContext, DictionaryTracker, IpcDataGenerator, IpcWriteOptions};
use arrow_schema::{DataType, Field, Schema, SchemaRef};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::fs::{File, OpenOptions};
use std::io::{BufWriter, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// One finished shard as listed in the manifest.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShardEntry {
    pub path: String,
    pub rows: u64,
    pub tokens: u64,
    pub sha256: String,
    pub batch_offsets: Vec<u64>,
}

/// Writer state saved in a checkpoint, enough to reopen the writer where it stopped.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct WriterState {
    pub index: usize,
    pub file_len: u64,
    pub batch_offsets: Vec<u64>,
    pub rows_in_shard: u64,
    pub tokens_in_shard: u64,
    pub pending: Vec<Row>,
    pub finished: Vec<ShardEntry>,
}

pub fn schema() -> SchemaRef {
    let item = Arc::new(Field::new("item", DataType::Int32, false));
    Arc::new(Schema::new(vec![
        Field::new("input_ids", DataType::List(item.clone()), false),
        Field::new("seq_lengths", DataType::List(item), false),
    ]))
}

pub struct ShardWriter {
    root: PathBuf,
    split: String,
    seq_len: usize,
    pad_id: u32,
    rows_per_shard: u64,
    rows_per_batch: usize,
    options: IpcWriteOptions,
    schema: SchemaRef,
    context: IpcWriteContext,
    file: Option<BufWriter<File>>,
    state: WriterState,
}

impl ShardWriter {
    pub fn new(
        root: &Path,
        split: &str,
        seq_len: usize,
        pad_id: u32,
        rows_per_shard: usize,
        rows_per_batch: usize,
        zstd_level: i32,
    ) -> Result<Self> {
        let options = IpcWriteOptions::default()
            .try_with_compression(Some(arrow_ipc::CompressionType::ZSTD))
            .and_then(|o| o.try_with_compression_level(Some(zstd_level)))
            .map_err(|e| Error::invalid(format!("invalid zstd level {zstd_level}: {e}")))?;
        Ok(ShardWriter {
            root: root.to_path_buf(),
            split: split.to_owned(),
            seq_len,
            pad_id,
            rows_per_shard: rows_per_shard as u64,
            rows_per_batch,
            options,
            schema: schema(),
            context: IpcWriteContext::default(),
            file: None,
            state: WriterState::default(),
        })
    }

    fn relative_path(&self, index: usize) -> String {
        format!("{}/shard_{index:05}.arrow", self.split)
    }

    fn tmp_path(&self) -> PathBuf {
        self.root.join(format!("{}.tmp", self.relative_path(self.state.index)))
    }

    /// Add a row; returns the shard entry when this row completed a shard.
    pub fn push(&mut self, row: Row) -> Result<Option<ShardEntry>> {
        debug_assert!(row.tokens.len() <= self.seq_len);
        self.state.tokens_in_shard += row.tokens.len() as u64;
        self.state.rows_in_shard += 1;
        self.state.pending.push(row);
        if self.state.pending.len() == self.rows_per_batch || self.state.rows_in_shard == self.rows_per_shard {
            self.write_pending()?;
        }
        if self.state.rows_in_shard == self.rows_per_shard {
            return self.finalize().map(Some);
        }
        Ok(None)
    }

    /// Write what is left as a last, shorter shard.
    pub fn finish(&mut self) -> Result<Option<ShardEntry>> {
        if self.state.rows_in_shard == 0 {
            return Ok(None);
        }
        self.write_pending()?;
        self.finalize().map(Some)
    }

    pub fn finished(&self) -> &[ShardEntry] {
        &self.state.finished
    }

    fn open_file(&mut self) -> Result<&mut BufWriter<File>> {
        if self.file.is_none() {
            let path = self.tmp_path();
            if let Some(parent) = path.parent() {
                std::fs::create_dir_all(parent).map_err(|e| Error::io(parent, e))?;
            }
            let file = File::create(&path).map_err(|e| Error::io(&path, e))?;
            let mut writer = BufWriter::with_capacity(1 << 20, file);
            let mut tracker = DictionaryTracker::new(false);
            let encoded = IpcDataGenerator::default().schema_to_bytes_with_dictionary_tracker(
                &self.schema,
                &mut tracker,
                &self.options,
            );
            let (meta, data) = arrow_ipc::writer::write_message(&mut writer, encoded, &self.options)
                .map_err(|e| Error::Arrow { path: path.clone(), message: e.to_string() })?;
            self.state.file_len = (meta + data) as u64;
            self.file = Some(writer);
        }
        Ok(self.file.as_mut().expect("file was opened above"))
    }

    fn write_pending(&mut self) -> Result<()> {
        if self.state.pending.is_empty() {
            return Ok(());
        }
        let rows = std::mem::take(&mut self.state.pending);
        let batch = self.build_batch(&rows)?;
        let path = self.tmp_path();
        let arrow_err = |e: arrow_schema::ArrowError| Error::Arrow { path: path.clone(), message: e.to_string() };

        let mut tracker = DictionaryTracker::new(false);
        let (_, encoded) = IpcDataGenerator::default()
            .encode(&batch, &mut tracker, &self.options, &mut self.context)
            .map_err(arrow_err)?;
        let options = self.options.clone();
        let offset = {
            self.open_file()?;
            self.state.file_len
        };
        let file = self.file.as_mut().expect("file is open");
        let (meta, data) = arrow_ipc::writer::write_message(file, encoded, &options).map_err(arrow_err)?;
        self.state.batch_offsets.push(offset);
        self.state.file_len += (meta + data) as u64;
        Ok(())
    }

    fn build_batch(&self, rows: &[Row]) -> Result<RecordBatch> {
        let mut ids = Vec::with_capacity(rows.len() * self.seq_len);
        let mut lengths = Vec::new();
        let mut length_offsets = Vec::with_capacity(rows.len() + 1);
        length_offsets.push(0i32);
        for row in rows {
            ids.extend(row.tokens.iter().map(|&t| t as i32));
            ids.extend(std::iter::repeat_n(self.pad_id as i32, self.seq_len - row.tokens.len()));
            lengths.extend(row.seq_lengths.iter().map(|&l| l as i32));
            length_offsets.push(lengths.len() as i32);
        }
        let item = Arc::new(Field::new("item", DataType::Int32, false));
        let id_offsets = OffsetBuffer::from_lengths(std::iter::repeat_n(self.seq_len, rows.len()));
        let input_ids = ListArray::new(item.clone(), id_offsets, Arc::new(Int32Array::from(ids)), None);
        let seq_lengths = ListArray::new(
            item,
            OffsetBuffer::new(length_offsets.into()),
            Arc::new(Int32Array::from(lengths)),
            None,
        );
        let columns: Vec<ArrayRef> = vec![Arc::new(input_ids), Arc::new(seq_lengths)];
        RecordBatch::try_new(self.schema.clone(), columns)
            .map_err(|e| Error::Arrow { path: self.tmp_path(), message: e.to_string() })
    }

    fn finalize(&mut self) -> Result<ShardEntry> {
        let tmp = self.tmp_path();
        self.open_file()?;
        let mut writer = self.file.take().expect("file is open");
        // End-of-stream marker: continuation token and a zero length.
        writer.write_all(&[0xFF, 0xFF, 0xFF, 0xFF, 0, 0, 0, 0]).map_err(|e| Error::io(&tmp, e))?;
        let file = writer.into_inner().map_err(|e| Error::io(&tmp, e.into_error()))?;
        file.sync_all().map_err(|e| Error::io(&tmp, e))?;
        drop(file);

        let relative = self.relative_path(self.state.index);
        let path = self.root.join(&relative);
        let sha256 = sha256_file(&tmp)?;
        std::fs::rename(&tmp, &path).map_err(|e| Error::io(&path, e))?;
        sync_dir(path.parent().expect("shard paths have a parent"))?;

        let entry = ShardEntry {
            path: relative,
            rows: self.state.rows_in_shard,
            tokens: self.state.tokens_in_shard,
            sha256,
            batch_offsets: std::mem::take(&mut self.state.batch_offsets),
        };
        self.state.finished.push(entry.clone());
        self.state.index += 1;
        self.state.rows_in_shard = 0;
        self.state.tokens_in_shard = 0;
        self.state.file_len = 0;
        Ok(entry)
    }

    /// Flush the partly written shard to disk and return the state a checkpoint records.
    pub fn checkpoint(&mut self) -> Result<WriterState> {
        let tmp = self.tmp_path();
        if let Some(writer) = &mut self.file {
            writer.flush().map_err(|e| Error::io(&tmp, e))?;
            writer.get_ref().sync_data().map_err(|e| Error::io(&tmp, e))?;
        }
        Ok(self.state.clone())
    }

    /// Reopen from a checkpoint: finished shards must be intact, and a partly written shard is
    /// cut back to its checkpointed length so that whatever a killed run appended is discarded.
    pub fn restore(&mut self, state: WriterState) -> Result<()> {
        for entry in &state.finished {
            let path = self.root.join(&entry.path);
            let actual = sha256_file(&path)?;
            if actual != entry.sha256 {
                return Err(Error::ShardFormat {
                    path,
                    message: format!("sha256 is {actual}, the checkpoint recorded {}; cannot resume", entry.sha256),
                });
            }
        }
        self.state = state;
        self.file = None;

        // A run killed after renaming a finished shard but before its next checkpoint leaves
        // `NAME.arrow` and no `NAME.arrow.tmp`. The finished file starts with the checkpointed
        // bytes, because shards are only appended to, so it becomes the partial shard again.
        let tmp = self.tmp_path();
        let current = self.root.join(self.relative_path(self.state.index));
        if self.state.file_len > 0 && !tmp.exists() && current.exists() {
            std::fs::rename(&current, &tmp).map_err(|e| Error::io(&tmp, e))?;
        }

        // Shards finished after the checkpoint will be written again, so leftovers are removed.
        let dir = self.root.join(&self.split);
        if dir.is_dir() {
            for entry in std::fs::read_dir(&dir).map_err(|e| Error::io(&dir, e))? {
                let path = entry.map_err(|e| Error::io(&dir, e))?.path();
                let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
                let index = name.strip_prefix("shard_").and_then(|n| n.strip_suffix(".arrow")).and_then(|n| n.parse().ok());
                if index.is_some_and(|i: usize| i >= self.state.index) {
                    std::fs::remove_file(&path).map_err(|e| Error::io(&path, e))?;
                }
            }
        }

        if self.state.file_len > 0 {
            let file = OpenOptions::new().write(true).open(&tmp).map_err(|e| Error::io(&tmp, e))?;
            let len = file.metadata().map_err(|e| Error::io(&tmp, e))?.len();
            if len < self.state.file_len {
                return Err(Error::ShardFormat {
                    path: tmp,
                    message: format!("contains {len} bytes, the checkpoint recorded {}; cannot resume", self.state.file_len),
                });
            }
            file.set_len(self.state.file_len).map_err(|e| Error::io(&tmp, e))?;
            let mut file = file;
            use std::io::Seek;
            file.seek(std::io::SeekFrom::End(0)).map_err(|e| Error::io(&tmp, e))?;
            self.file = Some(BufWriter::with_capacity(1 << 20, file));
        }
        Ok(())
    }
}

pub fn sha256_file(path: &Path) -> Result<String> {
    let mut file = File::open(path).map_err(|e| Error::io(path, e))?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = file.read(&mut buf).map_err(|e| Error::io(path, e))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(format!("{:x}", hasher.finalize()))
}

pub fn sync_dir(dir: &Path) -> Result<()> {
    File::open(dir).and_then(|d| d.sync_all()).map_err(|e| Error::io(dir, e))
}

/// Write a file atomically: temporary file in the same directory, fsync, rename, fsync the
/// directory.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let tmp = path.with_extension(format!(
        "{}.tmp",
        path.extension().map(|e| e.to_string_lossy().into_owned()).unwrap_or_default()
    ));
    {
        let mut file = File::create(&tmp).map_err(|e| Error::io(&tmp, e))?;
        file.write_all(bytes).map_err(|e| Error::io(&tmp, e))?;
        file.sync_all().map_err(|e| Error::io(&tmp, e))?;
    }
    std::fs::rename(&tmp, path).map_err(|e| Error::io(path, e))?;
    sync_dir(path.parent().unwrap_or(Path::new(".")))
}
