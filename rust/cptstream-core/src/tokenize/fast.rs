//! Fast path for byte-level BPE tokenizers (the GPT-2 family: Qwen2, Llama-3, ...).
//!
//! It returns the ids that `Tokenizer::encode_fast(text, false)` returns, by the same steps and
//! with the tokenizer's own parts. These are the NFC normalizer (called only for text that is not
//! NFC already), the pre-tokenizer's onig regex with `Isolated` splitting, the
//! GPT-2 byte-to-character map, and the tokenizer's BPE model for each piece. It leaves out
//! `encode_fast`'s bookkeeping: an alignment entry per byte in `NormalizedString`, a `String` per
//! pre-token and per output token, and the `Encoding`. A per-thread cache maps recent pieces to
//! their ids, so a word seen before costs one hash lookup.
//!
//! It is used only when tokenizer.json has exactly this shape (see `from_json`); any other
//! tokenizer goes through `encode_fast`. Tests compare both paths id for id.

use std::cell::RefCell;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use tokenizers::utils::SysRegex;
use tokenizers::{Model, NormalizedString, Normalizer, Tokenizer};
use unicode_normalization::{is_nfc_quick, IsNormalized};
use xxhash_rust::xxh3::Xxh3DefaultBuilder;

/// Pieces kept per thread; the cache is emptied when full. 65,536 pieces of up to 32 bytes cost
/// a few MiB per thread, and cover the common words of a corpus.
const CACHE_ENTRIES: usize = 1 << 16;
/// Longer pieces (long numbers, runs of symbols) rarely repeat and are not cached.
const CACHE_PIECE_BYTES: usize = 32;

static NEXT_ID: AtomicU64 = AtomicU64::new(0);

// xxh3 instead of SipHash: the keys are short and the lookups were 3% of a shard run.
type PieceCache = HashMap<Box<[u8]>, Box<[u32]>, Xxh3DefaultBuilder>;

thread_local! {
    /// `(id of the ByteLevelBpe that filled it, piece bytes -> ids)`; another tokenizer clears it.
    static CACHE: RefCell<(u64, PieceCache)> = RefCell::new((u64::MAX, HashMap::default()));
}

pub(super) struct ByteLevelBpe {
    id: u64,
    split: SysRegex,
    nfc: bool,
    byte_chars: [char; 256],
}

/// Build the GPT-2 map from bytes to printable characters, as `tokenizers`' ByteLevel does.
/// Printable Latin-1 bytes map to themselves, and the other bytes to U+0100 onwards in byte order.
fn byte_chars() -> [char; 256] {
    let mut map = ['\0'; 256];
    let mut next = 256u32;
    for byte in 0..=255u8 {
        let printable = matches!(byte, b'!'..=b'~' | 0xA1..=0xAC | 0xAE..=0xFF);
        map[byte as usize] = if printable {
            char::from(byte)
        } else {
            next += 1;
            char::from_u32(next - 1).expect("U+0100..U+0143 are valid characters")
        };
    }
    map
}

/// The parts of tokenizer.json that decide whether the fast path applies. Deserializing only these
/// skips the vocabulary and merges, so checking costs no second copy of them in memory.
#[derive(serde::Deserialize)]
struct Shape {
    #[serde(default)]
    truncation: serde_json::Value,
    #[serde(default)]
    padding: serde_json::Value,
    #[serde(default)]
    normalizer: serde_json::Value,
    #[serde(default)]
    pre_tokenizer: serde_json::Value,
    #[serde(default)]
    added_tokens: serde_json::Value,
    model: ModelShape,
}

#[derive(serde::Deserialize)]
struct ModelShape {
    #[serde(rename = "type", default)]
    kind: serde_json::Value,
    #[serde(default)]
    dropout: serde_json::Value,
}

impl ByteLevelBpe {
    /// Build the fast path from the bytes of tokenizer.json, or return why it does not apply.
    pub(super) fn from_bytes(bytes: &[u8]) -> Result<Self, String> {
        let shape: Shape = serde_json::from_slice(bytes).map_err(|e| format!("unreadable tokenizer.json: {e}"))?;
        Self::from_json(&serde_json::json!({
            "truncation": shape.truncation,
            "padding": shape.padding,
            "normalizer": shape.normalizer,
            "pre_tokenizer": shape.pre_tokenizer,
            "added_tokens": shape.added_tokens,
            "model": {"type": shape.model.kind, "dropout": shape.model.dropout},
        }))
    }

    /// Build the fast path if `json` (the parsed tokenizer.json) has the supported shape, or
    /// return why not.
    ///
    /// Supported: no truncation or padding, and a normalizer that is null or NFC. The pre-tokenizer
    /// is a Sequence of a Split on a regex (`Isolated`, not inverted) and a ByteLevel without
    /// prefix space or regex. The model is a BPE without dropout. Every added token is special,
    /// so `encode_special_tokens` leaves it in the text and no added-token matching is needed.
    pub(super) fn from_json(json: &serde_json::Value) -> Result<Self, String> {
        if !json["truncation"].is_null() || !json["padding"].is_null() {
            return Err("truncation or padding is set".into());
        }
        let nfc = match &json["normalizer"] {
            serde_json::Value::Null => false,
            n if n["type"] == "NFC" => true,
            n => return Err(format!("normalizer {} is not NFC", n["type"])),
        };

        let pre = &json["pre_tokenizer"];
        let steps = pre["pretokenizers"].as_array().map(Vec::as_slice).unwrap_or_default();
        let [split, byte_level] = steps else {
            return Err("pre-tokenizer is not a Sequence of Split and ByteLevel".into());
        };
        let pattern = split["pattern"]["Regex"].as_str();
        let split_ok = split["type"] == "Split" && split["behavior"] == "Isolated" && split["invert"] == false;
        let byte_level_ok = byte_level["type"] == "ByteLevel"
            && byte_level["add_prefix_space"] == false
            && byte_level["use_regex"] == false;
        let (Some(pattern), true, true, true) = (pattern, pre["type"] == "Sequence", split_ok, byte_level_ok) else {
            return Err("pre-tokenizer is not Sequence[Split(Regex, Isolated), ByteLevel(no prefix, no regex)]".into());
        };

        let model = &json["model"];
        let no_dropout = model["dropout"].is_null() || model["dropout"].as_f64() == Some(0.0);
        if model["type"] != "BPE" || !no_dropout {
            return Err("model is not a BPE without dropout".into());
        }
        let added = json["added_tokens"].as_array().map(Vec::as_slice).unwrap_or_default();
        if added.iter().any(|token| token["special"] != true) {
            return Err("tokenizer has non-special added tokens".into());
        }

        let split = SysRegex::new(pattern).map_err(|e| format!("invalid pre-tokenizer regex: {e}"))?;
        Ok(ByteLevelBpe { id: NEXT_ID.fetch_add(1, Ordering::Relaxed), split, nfc, byte_chars: byte_chars() })
    }

    /// Append the ids of `text` (no special tokens) to `out`.
    pub(super) fn encode(&self, tokenizer: &Tokenizer, text: &str, out: &mut Vec<u32>) -> tokenizers::Result<()> {
        // Text that is already NFC (ASCII, and whatever `clean` normalized) skips the normalizer.
        // NOTE: the quick check uses the unicode-normalization crate's Unicode version, tokenizers an
        // older one. Unicode's normalization stability policy makes text that is NFC in a later
        // version NFC in an earlier one, and the tests compare both paths on the real corpus.
        let normalized;
        let text = if self.nfc && !text.is_ascii() && is_nfc_quick(text.chars()) != IsNormalized::Yes {
            let mut n = NormalizedString::from(text);
            tokenizer.get_normalizer().expect("an NFC normalizer was found at load").normalize(&mut n)?;
            normalized = n;
            normalized.get()
        } else {
            text
        };

        let model = tokenizer.get_model();
        CACHE.with(|cell| {
            let (owner, cache) = &mut *cell.borrow_mut();
            if *owner != self.id {
                cache.clear();
                *owner = self.id;
            }
            // `Isolated` splitting: every match is a piece, and so is every gap between matches.
            let mut mapped = String::new();
            let mut prev = 0;
            for (start, end) in self.split.find_iter(text) {
                if prev != start {
                    self.piece(model, &text[prev..start], cache, &mut mapped, out)?;
                }
                self.piece(model, &text[start..end], cache, &mut mapped, out)?;
                prev = end;
            }
            if prev != text.len() {
                self.piece(model, &text[prev..], cache, &mut mapped, out)?;
            }
            Ok(())
        })
    }

    fn piece(
        &self,
        model: &impl Model,
        piece: &str,
        cache: &mut PieceCache,
        mapped: &mut String,
        out: &mut Vec<u32>,
    ) -> tokenizers::Result<()> {
        if piece.is_empty() {
            return Ok(());
        }
        if let Some(ids) = cache.get(piece.as_bytes()) {
            out.extend_from_slice(ids);
            return Ok(());
        }
        mapped.clear();
        mapped.extend(piece.bytes().map(|b| self.byte_chars[b as usize]));
        let start = out.len();
        out.extend(model.tokenize(mapped)?.iter().map(|token| token.id));
        if piece.len() <= CACHE_PIECE_BYTES {
            if cache.len() >= CACHE_ENTRIES {
                cache.clear();
            }
            cache.insert(piece.as_bytes().into(), out[start..].into());
        }
        Ok(())
    }
}
