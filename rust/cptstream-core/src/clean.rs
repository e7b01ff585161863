//! Text cleaning and quality filters, safe for Chinese and other CJK text.
//!
//! Cleaning runs in one pass over the characters, then one optional Unicode normalization and one
//! pass over the lines. NFC is the default because NFKC rewrites full-width CJK punctuation
//! (`，` to `,`, `︰` to `:`), which changes what the model learns about CJK typography. Cleaning
//! is idempotent: cleaning cleaned text returns it unchanged (a property test checks this).

use serde::{Deserialize, Serialize};
use std::collections::HashSet;
use unicode_normalization::UnicodeNormalization;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Normalization {
    Nfc,
    Nfkc,
    None,
}

/// Cleaning steps and filter thresholds; every step is on by default.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CleanConfig {
    /// Master switch for the character and line steps below (filters stay on).
    pub enabled: bool,
    pub normalization: Normalization,
    /// Remove C0/C1 control characters except `\n` and `\t`.
    pub strip_control: bool,
    /// Remove U+200B, U+2060, U+180E and U+FEFF anywhere in the text.
    pub remove_zero_width: bool,
    /// Remove spaces and tabs at the end of each line.
    pub trim_trailing_spaces: bool,
    /// Replace runs of blank lines with one blank line.
    pub collapse_blank_lines: bool,
    /// Drop documents with fewer characters than this after cleaning.
    pub min_chars: usize,
    /// Drop documents whose share of punctuation and symbols among non-space characters exceeds this.
    pub max_symbol_ratio: f64,
    /// Drop documents whose share of repeated non-blank lines exceeds this (only with 4 or more lines).
    pub max_repeated_line_ratio: f64,
}

impl Default for CleanConfig {
    fn default() -> Self {
        CleanConfig {
            enabled: true,
            normalization: Normalization::Nfc,
            strip_control: true,
            remove_zero_width: true,
            trim_trailing_spaces: true,
            collapse_blank_lines: true,
            min_chars: 1,
            max_symbol_ratio: 0.7,
            max_repeated_line_ratio: 0.7,
        }
    }
}

/// Filter reason for dropping a document; the names are the keys of `docs_dropped`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DropReason {
    Empty,
    TooShort,
    SymbolRatio,
    RepeatedLines,
}

impl DropReason {
    pub fn as_str(self) -> &'static str {
        match self {
            DropReason::Empty => "empty",
            DropReason::TooShort => "too_short",
            DropReason::SymbolRatio => "symbol_ratio",
            DropReason::RepeatedLines => "repeated_lines",
        }
    }
}

// NOTE: U+200C (ZWNJ) and U+200D (ZWJ) are kept on purpose: Persian, Hindi and other scripts
// spell words with them, and emoji sequences need ZWJ. Removing them would change the text.
fn is_zero_width(c: char) -> bool {
    matches!(c, '\u{200B}' | '\u{2060}' | '\u{180E}' | '\u{FEFF}')
}

fn is_removed_control(c: char) -> bool {
    c != '\n' && c != '\t' && c.is_control()
}

/// Clean one document. The result contains no CR, no removed characters and at most one blank line
/// in a row, and it is already normalized.
pub fn clean(text: &str, cfg: &CleanConfig) -> String {
    if !cfg.enabled {
        return text.to_owned();
    }

    // ---- characters: BOM, line endings, controls, zero-width ----
    let mut chars = String::with_capacity(text.len());
    let mut it = text.chars().peekable();
    while let Some(c) = it.next() {
        match c {
            '\r' => {
                if it.peek() == Some(&'\n') {
                    it.next();
                }
                chars.push('\n');
            }
            c if cfg.remove_zero_width && is_zero_width(c) => {}
            c if cfg.strip_control && is_removed_control(c) => {}
            c => chars.push(c),
        }
    }

    // ---- normalization ----
    // Normalization can create characters that the first pass removes (for example NFKC maps some
    // compatibility characters to spaces), so the first pass runs again on its output.
    let normalized: String = match cfg.normalization {
        Normalization::Nfc => chars.nfc().collect(),
        Normalization::Nfkc => {
            let n: String = chars.nfkc().collect();
            n.chars()
                .filter(|&c| {
                    let zero_width = cfg.remove_zero_width && is_zero_width(c);
                    let control = cfg.strip_control && is_removed_control(c);
                    !zero_width && !control
                })
                .collect()
        }
        Normalization::None => chars,
    };

    // ---- lines: trailing spaces, blank-line runs, document edges ----
    let mut out = String::with_capacity(normalized.len());
    let mut blank_run = 0usize;
    for line in normalized.split('\n') {
        let line = if cfg.trim_trailing_spaces { line.trim_end_matches([' ', '\t']) } else { line };
        if line.is_empty() {
            blank_run += 1;
            if cfg.collapse_blank_lines && blank_run > 1 {
                continue;
            }
        } else {
            blank_run = 0;
        }
        out.push_str(line);
        out.push('\n');
    }
    out.pop();

    // Leading and trailing blank lines carry nothing; trailing whitespace would make the document
    // end differently depending on how the source file ended.
    let start = out.len() - out.trim_start_matches('\n').len();
    let trimmed = out[start..].trim_end();
    trimmed.to_owned()
}

/// Apply the quality filters to a cleaned document.
pub fn filter(text: &str, cfg: &CleanConfig) -> Option<DropReason> {
    if text.is_empty() {
        return Some(DropReason::Empty);
    }

    let mut chars = 0usize;
    let mut visible = 0usize;
    let mut symbols = 0usize;
    for c in text.chars() {
        chars += 1;
        if c.is_whitespace() {
            continue;
        }
        visible += 1;
        if !c.is_alphanumeric() && !is_combining_mark(c) {
            symbols += 1;
        }
    }
    if chars < cfg.min_chars {
        return Some(DropReason::TooShort);
    }
    if visible > 0 && cfg.max_symbol_ratio < 1.0 && symbols as f64 / visible as f64 > cfg.max_symbol_ratio {
        return Some(DropReason::SymbolRatio);
    }

    if cfg.max_repeated_line_ratio < 1.0 {
        let lines: Vec<&str> = text.lines().map(str::trim).filter(|l| !l.is_empty()).collect();
        if lines.len() >= 4 {
            let mut seen = HashSet::with_capacity(lines.len());
            let repeated = lines.iter().filter(|l| !seen.insert(**l)).count();
            if repeated as f64 / lines.len() as f64 > cfg.max_repeated_line_ratio {
                return Some(DropReason::RepeatedLines);
            }
        }
    }
    None
}

// Combining marks (Devanagari vowel signs, Thai tone marks, accents after NFC fails to compose)
// belong to the letters before them and must not count as symbols.
fn is_combining_mark(c: char) -> bool {
    matches!(c as u32,
        0x0300..=0x036F | 0x0483..=0x0489 | 0x0591..=0x05C7 | 0x0610..=0x061A | 0x064B..=0x065F
        | 0x0670 | 0x06D6..=0x06ED | 0x0900..=0x0903 | 0x093A..=0x094F | 0x0951..=0x0957
        | 0x0962..=0x0963 | 0x0981..=0x0983 | 0x09BC..=0x09D7 | 0x0A01..=0x0A83 | 0x0ABC..=0x0ACD
        | 0x0B01..=0x0B03 | 0x0B3C..=0x0B57 | 0x0BBE..=0x0BCD | 0x0C00..=0x0C04 | 0x0C3E..=0x0C56
        | 0x0CBC..=0x0CD6 | 0x0D00..=0x0D03 | 0x0D3E..=0x0D57 | 0x0E31 | 0x0E34..=0x0E3A
        | 0x0E47..=0x0E4E | 0x0EB1..=0x0EBC | 0x0EC8..=0x0ECD | 0x0F18..=0x0F19 | 0x0F35..=0x0F39
        | 0x0F71..=0x0F84 | 0x102B..=0x103E | 0x1AB0..=0x1AFF | 0x1DC0..=0x1DFF | 0x20D0..=0x20FF
        | 0x302A..=0x302F | 0x3099..=0x309A | 0xFE00..=0xFE0F | 0xFE20..=0xFE2F)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cjk_punctuation_crlf_and_nul() {
        let cfg = CleanConfig::default();
        let out = clean("中文︰测试，好！\r\nline2\x00tail", &cfg);
        assert_eq!(out, "中文︰测试，好！\nline2tail");
    }

    #[test]
    fn nfkc_rewrites_fullwidth_punctuation() {
        let cfg = CleanConfig { normalization: Normalization::Nfkc, ..CleanConfig::default() };
        assert_eq!(clean("测试，好！", &cfg), "测试,好!");
    }

    #[test]
    fn bom_zero_width_and_blank_lines() {
        let cfg = CleanConfig::default();
        let out = clean("\u{FEFF}a\u{200B}b  \n\n\n\nc\t\n", &cfg);
        assert_eq!(out, "ab\n\nc");
    }

    #[test]
    fn zwj_survives() {
        let cfg = CleanConfig::default();
        let family = "👨\u{200D}👩\u{200D}👧";
        assert_eq!(clean(family, &cfg), family);
    }

    #[test]
    fn filters_by_reason() {
        let cfg = CleanConfig::default();
        assert_eq!(filter("", &cfg), Some(DropReason::Empty));
        assert_eq!(filter("a", &cfg), None);
        assert_eq!(filter("!!!! #### $$$$ a", &cfg), Some(DropReason::SymbolRatio));
        assert_eq!(filter("x\nx\nx\nx\nx\nx\nx\nx\nx\ny", &cfg), Some(DropReason::RepeatedLines));
        assert_eq!(filter("x\nx\nx\nx\nx\ny", &cfg), None); // 4 of 6 repeated: 0.67 <= 0.7
        assert_eq!(filter("中文测试，好！", &cfg), None);
        let strict = CleanConfig { min_chars: 5, ..CleanConfig::default() };
        assert_eq!(filter("abcd", &strict), Some(DropReason::TooShort));
    }

    proptest::proptest! {
        #[test]
        fn clean_is_idempotent(s in "\\PC*|[\\x00-\\x7f\u{3000}-\u{303f}\u{4e00}-\u{4e80}\r\n\t \u{feff}\u{200b}]*") {
            let cfg = CleanConfig::default();
            let once = clean(&s, &cfg);
            proptest::prop_assert_eq!(clean(&once, &cfg), once.clone());
            let nfkc = CleanConfig { normalization: Normalization::Nfkc, ..CleanConfig::default() };
            let once = clean(&s, &nfkc);
            proptest::prop_assert_eq!(clean(&once, &nfkc), once);
        }
    }
}
