//! Tokenizer loading, EOS/BOS resolution and document encoding with the `tokenizers` crate.
//!
//! Documents are encoded with `encode_special_tokens` on, so a string such as `<|endoftext|>`
//! inside raw text becomes ordinary text tokens and can never fake a document boundary. The EOS
//! (and BOS) ids are appended by us, after encoding, from the resolved separator.
//!
//! Byte-level BPE tokenizers (Qwen2, Llama-3) are encoded by `fast::ByteLevelBpe`. It returns the
//! same ids as `encode_fast` with a fraction of the allocations. Other tokenizers use `encode_fast`.

mod fast;

use crate::config::BosPolicy;
use crate::error::{Error, Result};
use serde::Serialize;
use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};
use tokenizers::Tokenizer;

/// EOS strings of common base models, tried in order when the tokenizer files name none.
const KNOWN_EOS: &[&str] = &["<|endoftext|>", "<|end_of_text|>", "</s>", "<eos>", "<|end|>", "[SEP]"];

/// Tokenizer facts recorded in the manifest.
#[derive(Clone, Debug, Serialize)]
pub struct TokenizerInfo {
    pub path: String,
    pub sha256: String,
    pub vocab_size: u32,
    pub eos_token: String,
    pub eos_id: u32,
    /// Source of the EOS string: `--eos-token`, `tokenizer_config.json` or the vocabulary.
    pub eos_source: String,
    pub bos_token: Option<String>,
    pub bos_id: Option<u32>,
    pub pad_id: u32,
}

pub struct DocTokenizer {
    tokenizer: Tokenizer,
    /// The byte-level BPE fast path, when tokenizer.json has its shape.
    fast: Option<fast::ByteLevelBpe>,
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

/// Read a token entry of tokenizer_config.json, either a string or `{"content": "..."}`.
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
        let fast = match fast::ByteLevelBpe::from_bytes(&bytes) {
            Ok(fast) => Some(fast),
            Err(reason) => {
                log::info!(
                    "{}: not a plain byte-level BPE ({reason}); encoding with tokenizers' encode_fast",
                    file.display()
                );
                None
            }
        };

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

        // ---- BOS: follow the post-processor unless --bos overrides it ----
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
        Ok(DocTokenizer { tokenizer, fast, info })
    }

    /// Return the id that the tokenizer's post-processor puts in front of a single sequence, if any.
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
        let mut out = Vec::with_capacity(text.len() / 3 + 2);
        if let Some(bos) = self.info.bos_id {
            out.push(bos);
        }
        self.encode_into(text, &mut out)?;
        // Never doubled: with special tokens encoded as text, a document cannot already start
        // with the BOS id, but a tokenizer whose normalizer produces it is guarded against too.
        if self.info.bos_id.is_some() && out.len() > 1 && out[1] == out[0] {
            out.remove(0);
        }
        out.push(self.info.eos_id);
        Ok(out)
    }

    /// Encode without BOS/EOS, by the same path as `encode_doc`.
    pub fn encode_plain(&self, text: &str) -> Result<Vec<u32>> {
        let mut out = Vec::new();
        self.encode_into(text, &mut out)?;
        Ok(out)
    }

    /// Encode without BOS/EOS through `tokenizers`' own `encode_fast`, never the fast path; tests
    /// compare the two.
    pub fn encode_reference(&self, text: &str) -> Result<Vec<u32>> {
        let encoding = self.tokenizer.encode_fast(text, false).map_err(|e| self.error(e))?;
        Ok(encoding.get_ids().to_vec())
    }

    /// Return whether documents go through the byte-level BPE fast path.
    pub fn uses_fast_path(&self) -> bool {
        self.fast.is_some()
    }

    fn encode_into(&self, text: &str, out: &mut Vec<u32>) -> Result<()> {
        match &self.fast {
            Some(fast) => fast.encode(&self.tokenizer, text, out).map_err(|e| self.error(e)),
            None => {
                let encoding = self.tokenizer.encode_fast(text, false).map_err(|e| self.error(e))?;
                out.extend_from_slice(encoding.get_ids());
                Ok(())
            }
        }
    }

    fn error(&self, e: tokenizers::Error) -> Error {
        Error::Tokenizer { path: PathBuf::from(&self.info.path), message: e.to_string() }
    }

    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        self.tokenizer
            .decode(ids, false)
            .map_err(|e| Error::Tokenizer { path: PathBuf::from(&self.info.path), message: e.to_string() })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    /// Qwen2's pre-tokenizer regex.
    const QWEN2_REGEX: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

    const TRICKY: &[&str] = &[
        "",
        "Hello world, it's the 2nd test -- 12345 tokens!\n\n\tindented   spaces  \r\n",
        "e\u{301}te\u{301} cafe\u{301} (decomposed, NFC composes them)",
        "中文文本，全角标点。混合 English 和 数字 2024 年",
        "emoji 😀👍🏽 zwj 👨\u{200d}👩\u{200d}👧 nbsp\u{a0}here",
        "special <|endoftext|> stays text <|im_start|>",
        "WE'LL YOU'VE I'M 'S 'T",
        "\u{0}\u{1f} control \u{7f}\u{85}",
        "   ",
        "\n\n\n",
    ];

    /// Write a small byte-level BPE with Qwen2's normalizer and pre-tokenizer as tokenizer.json:
    /// the 256 byte symbols plus a few merges.
    fn tiny_byte_level_bpe(dir: &Path, pre_tokenizer: serde_json::Value) -> PathBuf {
        let chars = fast_byte_chars();
        let mut vocab: serde_json::Map<String, serde_json::Value> =
            chars.iter().enumerate().map(|(i, c)| (c.to_string(), i.into())).collect();
        let merges = ["Ġ t", "h e", "Ġt he", "i n", "Ġ a", "Ã ©", "e r", "Ġ Ġ", "ĠĠ ĠĠ"];
        for merge in merges {
            let joined = merge.replace(' ', "");
            let id = vocab.len();
            vocab.entry(joined).or_insert(id.into());
        }
        let eos = vocab.len();
        let json = serde_json::json!({
            "version": "1.0", "truncation": null, "padding": null,
            "added_tokens": [{"id": eos, "content": "<|endoftext|>", "single_word": false, "lstrip": false,
                              "rstrip": false, "normalized": false, "special": true}],
            "normalizer": {"type": "NFC"},
            "pre_tokenizer": pre_tokenizer,
            "post_processor": null, "decoder": null,
            "model": {"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
                      "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false, "ignore_merges": false,
                      "vocab": vocab, "merges": merges},
        });
        let path = dir.join("tokenizer.json");
        std::fs::write(&path, serde_json::to_vec(&json).unwrap()).unwrap();
        std::fs::write(dir.join("tokenizer_config.json"), r#"{"eos_token": "<|endoftext|>"}"#).unwrap();
        path
    }

    fn qwen2_pre_tokenizer() -> serde_json::Value {
        serde_json::json!({"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": QWEN2_REGEX}, "behavior": "Isolated", "invert": false},
            {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": false, "use_regex": false}]})
    }

    fn fast_byte_chars() -> Vec<char> {
        let mut chars: Vec<char> = Vec::new();
        let mut next = 256u32;
        for byte in 0..=255u8 {
            if matches!(byte, b'!'..=b'~' | 0xA1..=0xAC | 0xAE..=0xFF) {
                chars.push(char::from(byte));
            } else {
                chars.push(char::from_u32(next).unwrap());
                next += 1;
            }
        }
        chars
    }

    fn assert_same_ids(tok: &DocTokenizer, text: &str) {
        assert_eq!(tok.encode_plain(text).unwrap(), tok.encode_reference(text).unwrap(), "text {text:?}");
    }

    #[test]
    fn fast_path_matches_encode_fast_on_tricky_text() {
        let dir = tempfile::tempdir().unwrap();
        let path = tiny_byte_level_bpe(dir.path(), qwen2_pre_tokenizer());
        let tok = DocTokenizer::load(path.to_str().unwrap(), None, BosPolicy::Auto).unwrap();
        assert!(tok.uses_fast_path());
        for text in TRICKY {
            assert_same_ids(&tok, text);
        }
        assert_eq!(tok.encode_doc("the").unwrap().last(), Some(&tok.info.eos_id));
    }

    #[test]
    fn other_pre_tokenizer_uses_encode_fast() {
        let dir = tempfile::tempdir().unwrap();
        let path = tiny_byte_level_bpe(
            dir.path(),
            serde_json::json!({"type": "ByteLevel", "add_prefix_space": false,
                                                                      "trim_offsets": true, "use_regex": true}),
        );
        let tok = DocTokenizer::load(path.to_str().unwrap(), None, BosPolicy::Auto).unwrap();
        assert!(!tok.uses_fast_path());
        assert_same_ids(&tok, TRICKY[1]);
    }

    /// The real Qwen2 tokenizer and corpus, when `scripts/fetch_assets.py` has built them.
    #[test]
    fn fast_path_matches_encode_fast_on_real_qwen2() {
        let cache = std::env::var_os("CPTSTREAM_CACHE")
            .map(PathBuf::from)
            .or_else(|| std::env::var_os("HOME").map(|home| PathBuf::from(home).join(".cache/cptstream")))
            .unwrap_or_default();
        let Ok(tok) = DocTokenizer::load(cache.join("qwen2").to_str().unwrap(), None, BosPolicy::Auto) else {
            eprintln!("skipped: no Qwen2 tokenizer under {}; run scripts/fetch_assets.py", cache.display());
            return;
        };
        assert!(tok.uses_fast_path());
        for text in TRICKY {
            assert_same_ids(&tok, text);
        }
        for name in ["en-linux-docs.jsonl", "zh-debian-reference.jsonl"] {
            let Ok(lines) = std::fs::read_to_string(cache.join("corpus").join(name)) else { continue };
            for line in lines.lines().take(200) {
                let record: serde_json::Value = serde_json::from_str(line).unwrap();
                assert_same_ids(&tok, record["text"].as_str().unwrap());
            }
        }
    }

    proptest::proptest! {
        #[test]
        fn fast_path_matches_encode_fast_on_random_text(
            text in "[ a-zA-Z0-9'.,!\n\r\t\u{301}\u{e9}\u{4e2d}\u{6587}\u{3002}\u{ff0c}\u{a0}\u{200d}\u{1f600}<|>]{0,80}"
        ) {
            thread_local! {
                static TOKENIZER: (tempfile::TempDir, DocTokenizer) = {
                    let dir = tempfile::tempdir().unwrap();
                    let path = tiny_byte_level_bpe(dir.path(), qwen2_pre_tokenizer());
                    let tok = DocTokenizer::load(path.to_str().unwrap(), None, BosPolicy::Auto).unwrap();
                    (dir, tok)
                };
            }
            TOKENIZER.with(|(_, tok)| {
                proptest::prop_assert_eq!(tok.encode_plain(&text).unwrap(), tok.encode_reference(&text).unwrap());
                Ok(())
            })?;
        }
    }
}

// Performance notes
// - `encode_fast` skips offset tracking; ids are identical to `encode`, and it is the faster call
//   in tokenizers 0.23.
// - Documents are encoded one per rayon task over a batch of documents (see pipeline.rs). The
//   tokenizer's own batch parallelism is not used, so --num-threads alone sets the thread count.
// - Measured with `cargo bench --bench core` (one thread, 3 MB of the real corpus, Qwen2, AMD EPYC
//   shared 2-core VM): `encode_fast` 2.0 MiB/s, the fast path 9.3 MiB/s. Criterion repeats the same
//   text, so the piece cache is warm there. End to end (`cptstream bench shard`, medians of 3 on the
//   40 MB corpus, same VM), `cptstream shard` ran at 4.9 MB/s against 1.7 MB/s for Python
//   `tokenizers` batch encoding alone. A perf profile of `encode_fast` showed about 30% of the time
//   in malloc/free for `NormalizedString` alignments and per-token `String`s.
// - Left in the profile after the fast path (perf, whole shard run): onig's regex search about 18%
//   (9% `match_at`, 7% a `memmove` inside `search_in_range`), BPE `merge_word` 10% (mostly long CJK
//   pieces, which the piece cache skips), NFC about 8%, since cut by skipping text that is NFC
//   already. Not tried: caching pieces over 32 bytes, and a hand-written scanner for the split
//   regex, which would remove the onig cost but has to match onig byte for byte.
