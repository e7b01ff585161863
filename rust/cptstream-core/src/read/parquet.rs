//! Parquet reader: one record per row of the text column, decoded in batches of 1024 rows.

use super::{FileError, Item, RecordReader};
use arrow_array::{Array, LargeStringArray, StringArray, StringViewArray};
use arrow_schema::DataType;
use parquet::arrow::arrow_reader::{ParquetRecordBatchReader, ParquetRecordBatchReaderBuilder};
use parquet::arrow::ProjectionMask;
use std::fs::File;

pub(super) struct ParquetReader {
    batches: ParquetRecordBatchReader,
    current: Option<Box<dyn Array>>,
    current_pos: usize,
    row: u64,
}

impl ParquetReader {
    pub(super) fn open(file: File, field: &str) -> std::result::Result<Self, FileError> {
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
