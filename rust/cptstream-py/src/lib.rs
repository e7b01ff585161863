//! Python bindings of cptstream-core: convert arguments, release the GIL, map errors.

mod errors;

use cptstream_core::config::BosPolicy;
use cptstream_core::pipeline::{self, Progress};
use cptstream_core::tokenize::DocTokenizer;
use cptstream_core::ShardConfig;
use errors::{CptstreamError, PyCoreError, ShardFormatError, TokenizerError};
use pyo3::prelude::*;
use pyo3::types::PyAny;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::PathBuf;

/// Run `f` and turn a panic into `CptstreamError` naming `what`, so no panic reaches Python as
/// pyo3's `PanicException`, which is a `BaseException` that `except Exception` misses.
fn guard<T>(what: &str, f: impl FnOnce() -> cptstream_core::Result<T>) -> cptstream_core::Result<T> {
    catch_unwind(AssertUnwindSafe(f)).unwrap_or_else(|payload| {
        Err(cptstream_core::Error::Panic {
            context: what.to_owned(),
            message: cptstream_core::error::panic_message(&*payload),
        })
    })
}

/// Run `f` with the GIL released and map its error; heavier than O(1) work goes through here.
fn run_detached<T: Send>(
    py: Python<'_>,
    what: &str,
    f: impl FnOnce() -> cptstream_core::Result<T> + Send,
) -> PyResult<T> {
    py.detach(|| guard(what, f)).map_err(|e| PyCoreError(e).into())
}

fn parse_bos(bos: &str) -> PyResult<BosPolicy> {
    match bos {
        "auto" => Ok(BosPolicy::Auto),
        "always" => Ok(BosPolicy::Always),
        "never" => Ok(BosPolicy::Never),
        other => Err(pyo3::exceptions::PyValueError::new_err(format!(
            "invalid BOS policy {other:?}; expected auto, always or never"
        ))),
    }
}

/// Run one shard job from a JSON configuration and return the manifest as JSON.
///
/// `progress(docs, text_bytes, tokens, rows, files_done, files_total)` is called about twice a
/// second with the GIL held; Ctrl-C and exceptions it raises stop the run, and the last
/// checkpoint stays valid for `resume=True`.
#[pyfunction]
#[pyo3(signature = (config_json, resume=false, progress=None))]
fn shard(py: Python<'_>, config_json: &str, resume: bool, progress: Option<Py<PyAny>>) -> PyResult<(String, bool, bool)> {
    let cfg = ShardConfig::from_json(config_json).map_err(PyCoreError)?;
    let mut raised: Option<PyErr> = None;
    let result = py.detach(|| {
        let mut report = |p: &Progress| -> bool {
            Python::attach(|py| {
                if let Err(e) = py.check_signals() {
                    raised = Some(e);
                    return false;
                }
                if let Some(cb) = &progress {
                    let args = (p.docs, p.text_bytes, p.tokens, p.rows, p.files_done, p.files_total);
                    if let Err(e) = cb.call1(py, args) {
                        raised = Some(e);
                        return false;
                    }
                }
                true
            })
        };
        // pipeline::run catches its own panics with the file and record; this guard covers the rest.
        guard("a shard run", || pipeline::run(&cfg, resume, &mut report))
    });
    if let Some(e) = raised {
        return Err(e);
    }
    let outcome = result.map_err(PyCoreError)?;
    let text = serde_json::to_string(&outcome.manifest).expect("manifest serializes");
    Ok((text, outcome.already_complete, outcome.resumed))
}

/// Check every shard of `directory` against its manifest; returns the report as JSON.
#[pyfunction]
fn verify(py: Python<'_>, directory: PathBuf) -> PyResult<String> {
    let what = format!("verifying {}", directory.display());
    let report = run_detached(py, &what, || cptstream_core::verify::verify(&directory))?;
    Ok(serde_json::to_string(&report).expect("report serializes"))
}

/// Encode documents exactly as `shard` does (BOS when on, EOS at the end), without cleaning.
#[pyfunction]
#[pyo3(signature = (tokenizer, texts, eos_token=None, bos="auto", add_eos=true))]
fn encode(
    py: Python<'_>,
    tokenizer: &str,
    texts: Vec<String>,
    eos_token: Option<String>,
    bos: &str,
    add_eos: bool,
) -> PyResult<Vec<Vec<u32>>> {
    let policy = parse_bos(bos)?;
    run_detached(py, "encoding documents", || {
        let tok = DocTokenizer::load(tokenizer, eos_token.as_deref(), policy)?;
        texts.iter().map(|t| if add_eos { tok.encode_doc(t) } else { tok.encode_plain(t) }).collect()
    })
}

/// Resolve the tokenizer's EOS, BOS and padding as `shard` would; returns JSON.
#[pyfunction]
#[pyo3(signature = (tokenizer, eos_token=None, bos="auto"))]
fn tokenizer_info(py: Python<'_>, tokenizer: &str, eos_token: Option<String>, bos: &str) -> PyResult<String> {
    let policy = parse_bos(bos)?;
    let tok = run_detached(py, "loading the tokenizer", || DocTokenizer::load(tokenizer, eos_token.as_deref(), policy))?;
    Ok(serde_json::to_string(&tok.info).expect("info serializes"))
}

/// Clean one document with the given cleaning configuration (JSON, defaults when omitted).
#[pyfunction]
#[pyo3(signature = (text, config_json=None))]
fn clean(text: &str, config_json: Option<&str>) -> PyResult<String> {
    let cfg: cptstream_core::clean::CleanConfig = match config_json {
        Some(json) => serde_json::from_str(json)
            .map_err(|e| pyo3::exceptions::PyValueError::new_err(format!("invalid cleaning configuration: {e}")))?,
        None => Default::default(),
    };
    Ok(guard("cleaning a document", || Ok(cptstream_core::clean::clean(text, &cfg))).map_err(PyCoreError)?)
}

/// Pack token-id documents into rows as `shard` does; returns `(tokens, seq_lengths)` per row.
#[pyfunction]
#[pyo3(signature = (docs, seq_len, packing="bfd", window_rows=512, open_rows=512))]
fn pack(docs: Vec<Vec<u32>>, seq_len: usize, packing: &str, window_rows: usize, open_rows: usize) -> PyResult<Vec<(Vec<u32>, Vec<u32>)>> {
    use cptstream_core::pack::{BfdPacker, ConcatPacker, Packer};
    if seq_len == 0 || window_rows == 0 || open_rows == 0 {
        return Err(pyo3::exceptions::PyValueError::new_err("seq_len, window_rows and open_rows must be positive"));
    }
    let mut packer = match packing {
        "bfd" => Packer::Bfd(BfdPacker::new(seq_len, window_rows, open_rows)),
        "concat" => Packer::Concat(ConcatPacker::new(seq_len)),
        other => {
            return Err(pyo3::exceptions::PyValueError::new_err(format!("invalid packing {other:?}; expected bfd or concat")))
        }
    };
    let rows = guard("packing documents", || {
        let mut rows = std::collections::VecDeque::new();
        for doc in &docs {
            packer.push(doc, &mut rows);
        }
        packer.finish(&mut rows);
        Ok(rows)
    })
    .map_err(PyCoreError)?;
    Ok(rows.into_iter().map(|r| (r.tokens, r.seq_lengths)).collect())
}

/// Return the default shard configuration as JSON, the single source of defaults for the CLI.
#[pyfunction]
fn default_config() -> String {
    serde_json::to_string(&ShardConfig::default()).expect("config serializes")
}

#[pymodule]
fn _core(m: &Bound<'_, PyModule>) -> PyResult<()> {
    pyo3_log::init();
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    m.add("FORMAT_VERSION", pipeline::FORMAT_VERSION)?;
    m.add("CptstreamError", m.py().get_type::<CptstreamError>())?;
    m.add("ShardFormatError", m.py().get_type::<ShardFormatError>())?;
    m.add("TokenizerError", m.py().get_type::<TokenizerError>())?;
    m.add_function(wrap_pyfunction!(shard, m)?)?;
    m.add_function(wrap_pyfunction!(verify, m)?)?;
    m.add_function(wrap_pyfunction!(encode, m)?)?;
    m.add_function(wrap_pyfunction!(tokenizer_info, m)?)?;
    m.add_function(wrap_pyfunction!(clean, m)?)?;
    m.add_function(wrap_pyfunction!(pack, m)?)?;
    m.add_function(wrap_pyfunction!(default_config, m)?)?;
    Ok(())
}
