//! Tokenizer loading, EOS/BOS resolution and document encoding with the `tokenizers` crate.
//!
//! Documents are encoded with `encode_special_tokens` on, so a string such as `<|endoftext|>`
//! inside raw text becomes ordinary text tokens and can never fake a document boundary. The EOS
//! (and BOS) ids are appended by us, after encoding, from the resolved separator.

use crate::config::BosPolicy;
use crate::error::{Error, Result};
use serde::Serialize;
use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};
use tokenizers::Tokenizer;

/// EOS strings of common base models, tried in order when the tokenizer files name none.
const KNOWN_EOS: &[&str] = &["<|endoftext|>", "<|end_of_text|>", "</s>", "<eos>", "<|end|>", "[SEP]"];

/// What the manifest records about the tokenizer.
#[derive(Clone, Debug, Serialize)]
pub struct TokenizerInfo {
    pub path: String,
    pub sha256: String,
    pub vocab_size: u32,
    pub eos_token: String,
    pub eos_id: u32,
    /// Where the EOS string came from: `--eos-token`, `tokenizer_config.json` or the vocabulary.
    pub eos_source: String,
    pub bos_token: Option<String>,
    pub bos_id: Option<u32>,
    pub pad_id: u32,
}

pub struct DocTokenizer {
    tokenizer: Tokenizer,
    pub info: TokenizerInfo,
}

fn read_config(dir: &Path) -> Result<Option<serde_json::Value>> {
    let path = dir.join("tokenizer_config.json");
    if !path.exists() {
        return Ok(None);
    }
    let text = std::fs::read_to_string(&path).map_err(|e| Error::io(&path, e))?;
    let value = serde_json::from_str(&text)
        .map_err(|e| Error::Tokenizer { path: path.clone(), message: format!("invalid JSON: {e}") })?;
    Ok(Some(value))
}

/// A token entry in tokenizer_config.json is either a string or `{"content": "..."}`.
fn token_string(value: Option<&serde_json::Value>) -> Option<String> {
    match value? {
        serde_json::Value::String(s) => Some(s.clone()),
        serde_json::Value::Object(map) => map.get("content").and_then(|c| c.as_str()).map(str::to_owned),
        _ => None,
    }
}

impl DocTokenizer {
    /// Load `tokenizer.json` from a directory or a file path and resolve EOS, BOS and padding.
    pub fn load(path: &str, eos_override: Option<&str>, bos_policy: BosPolicy) -> Result<Self> {
        let given = PathBuf::from(path);
        let (file, dir) = if given.is_dir() {
            (given.join("tokenizer.json"), given.clone())
        } else {
            (given.clone(), given.parent().map(Path::to_path_buf).unwrap_or_default())
        };
        let bytes = std::fs::read(&file).map_err(|e| Error::io(&file, e))?;
        let mut tokenizer = Tokenizer::from_bytes(&bytes)
            .map_err(|e| Error::Tokenizer { path: file.clone(), message: e.to_string() })?;
        tokenizer.set_encode_special_tokens(true);
        let sha256 = format!("{:x}", Sha256::digest(&bytes));
        let config = read_config(&dir)?;

        // ---- EOS ----
        let from_config = config.as_ref().and_then(|c| token_string(c.get("eos_token")));
        let (eos_token, eos_source) = if let Some(s) = eos_override {
            (s.to_owned(), "--eos-token".to_owned())
        } else if let Some(s) = from_config {
            (s, "tokenizer_config.json".to_owned())
        } else if let Some(s) = KNOWN_EOS.iter().find(|s| tokenizer.token_to_id(s).is_some()) {
            (s.to_string(), "vocabulary".to_owned())
        } else {
            return Err(Error::Tokenizer {
                path: file,
                message: "cannot resolve the EOS token: no --eos-token, no eos_token in tokenizer_config.json \
                          and none of the usual EOS strings in the vocabulary"
                    .into(),
            });
        };
        let eos_id = tokenizer.token_to_id(&eos_token).ok_or_else(|| Error::Tokenizer {
            path: file.clone(),
            message: format!("EOS token {eos_token:?} (from {eos_source}) is not in the vocabulary"),
        })?;

        // ---- BOS: follow the post-processor unless told otherwise ----
        let added_bos = Self::post_processor_bos(&tokenizer, &file)?;
        let config_bos = config.as_ref().and_then(|c| token_string(c.get("bos_token")));
        let bos_id = match bos_policy {
            BosPolicy::Never => None,
            BosPolicy::Auto => added_bos,
            BosPolicy::Always => {
                let id = added_bos.or_else(|| config_bos.as_deref().and_then(|s| tokenizer.token_to_id(s)));
                Some(id.ok_or_else(|| Error::Tokenizer {
                    path: file.clone(),
                    message: "--bos always, but the tokenizer has no BOS token".into(),
                })?)
            }
        };
        let bos_token = bos_id.and_then(|id| tokenizer.id_to_token(id));

        let pad_id = config
            .as_ref()
            .and_then(|c| token_string(c.get("pad_token")))
            .and_then(|s| tokenizer.token_to_id(&s))
            .unwrap_or(eos_id);
        let max_id = tokenizer.get_vocab(true).values().copied().max().unwrap_or(0);
        let vocab_size = max_id.max(tokenizer.get_vocab_size(true) as u32 - 1) + 1;

        let info = TokenizerInfo {
            path: file.display().to_string(),
            sha256,
            vocab_size,
            eos_token,
            eos_id,
            eos_source,
            bos_token,
            bos_id,
            pad_id,
        };
        Ok(DocTokenizer { tokenizer, info })
    }

    /// The id that the tokenizer's post-processor puts in front of a single sequence, if any.
    fn post_processor_bos(tokenizer: &Tokenizer, file: &Path) -> Result<Option<u32>> {
        let err = |e: tokenizers::Error| Error::Tokenizer { path: file.to_path_buf(), message: e.to_string() };
        let plain = tokenizer.encode_fast("a", false).map_err(err)?;
        let with = tokenizer.encode_fast("a", true).map_err(err)?;
        let (plain, with) = (plain.get_ids(), with.get_ids());
        if with.len() > plain.len() && with[1..].starts_with(plain) {
            return Ok(Some(with[0]));
        }
        Ok(None)
    }

    /// Encode one cleaned document, with BOS in front when on and EOS at the end.
    pub fn encode_doc(&self, text: &str) -> Result<Vec<u32>> {
        let encoding = self
            .tokenizer
            .encode_fast(text, false)
            .map_err(|e| Error::Tokenizer { path: PathBuf::from(&self.info.path), message: e.to_string() })?;
        let ids = encoding.get_ids();
        let mut out = Vec::with_capacity(ids.len() + 2);
        if let Some(bos) = self.info.bos_id {
            // Never doubled: with special tokens encoded as text, a document cannot already start
            // with the BOS id, but a tokenizer whose normalizer produces it is guarded against too.
            if ids.first() != Some(&bos) {
                out.push(bos);
            }
        }
        out.extend_from_slice(ids);
        out.push(self.info.eos_id);
        Ok(out)
    }

    /// Encode without BOS/EOS, for tests and the reference comparison.
    pub fn encode_plain(&self, text: &str) -> Result<Vec<u32>> {
        let encoding = self
            .tokenizer
            .encode_fast(text, false)
            .map_err(|e| Error::Tokenizer { path: PathBuf::from(&self.info.path), message: e.to_string() })?;
        Ok(encoding.get_ids().to_vec())
    }

    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        self.tokenizer
            .decode(ids, false)
            .map_err(|e| Error::Tokenizer { path: PathBuf::from(&self.info.path), message: e.to_string() })
    }
}

// Performance notes
// - `encode_fast` skips offset tracking; ids are identical to `encode`, and it is the faster call
//   in tokenizers 0.23.
// - Documents are encoded one per rayon task over a batch of documents (see pipeline.rs); the
//   tokenizer's own batch parallelism is not used so that the thread count stays ours.
