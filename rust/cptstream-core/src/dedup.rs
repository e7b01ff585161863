//! Exact deduplication of cleaned documents by their 128-bit XXH3 hash, in bounded memory.
//!
//! Hashes go into an exact set until it would pass the memory budget (`memory_bytes`, at an
//! estimated 32 bytes per entry). Past that the set is turned into a Bloom filter of the same
//! size with k = 7 probes, so memory stays flat however large the corpus is. A Bloom filter
//! only errs one way: a new document may be taken for a duplicate. With m bits and n documents
//! the false-positive rate is (1 - e^(-7n/m))^7; at the default 512 MiB (m = 2^32 bits) that is
//! about 2e-6 after 100 million documents and 0.02 after 500 million. The summary reports the
//! estimate for the actual run, so no document is lost without the number being shown.
//!
//! Every new hash is also appended to a log on disk; a resumed run replays the log up to the
//! checkpoint and rebuilds the same state in the same order.

use crate::error::{Error, Result};
use std::collections::HashSet;
use std::fs::{File, OpenOptions};
use std::io::{BufWriter, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

const BYTES_PER_ENTRY: usize = 32;
const BLOOM_PROBES: u64 = 7;

enum Set {
    Exact(HashSet<u128>),
    Bloom { bits: Vec<u64>, mask: u64, inserted: u64 },
}

pub struct Dedup {
    set: Set,
    memory_bytes: usize,
    log: Option<(PathBuf, BufWriter<File>)>,
    logged: u64,
}

impl Dedup {
    pub fn new(memory_bytes: usize) -> Self {
        Dedup { set: Set::Exact(HashSet::new()), memory_bytes: memory_bytes.max(1 << 20), log: None, logged: 0 }
    }

    /// Open the on-disk log, replaying its first `entries` hashes (a resumed run) and dropping
    /// whatever a killed run wrote after them.
    pub fn attach_log(&mut self, path: &Path, entries: u64) -> Result<()> {
        let mut file = OpenOptions::new().create(true).read(true).write(true).truncate(false).open(path)
            .map_err(|e| Error::io(path, e))?;
        let len = file.metadata().map_err(|e| Error::io(path, e))?.len();
        if len < entries * 16 {
            return Err(Error::ShardFormat {
                path: path.to_path_buf(),
                message: format!("deduplication log contains {} hashes, the checkpoint expects {entries}", len / 16),
            });
        }
        let mut reader = std::io::BufReader::new(&mut file);
        let mut buf = [0u8; 16];
        for _ in 0..entries {
            reader.read_exact(&mut buf).map_err(|e| Error::io(path, e))?;
            self.insert_in_memory(u128::from_le_bytes(buf));
        }
        drop(reader);
        file.set_len(entries * 16).map_err(|e| Error::io(path, e))?;
        file.seek(SeekFrom::End(0)).map_err(|e| Error::io(path, e))?;
        self.logged = entries;
        self.log = Some((path.to_path_buf(), BufWriter::with_capacity(1 << 16, file)));
        Ok(())
    }

    /// Return true if the hash was seen before; record it otherwise.
    pub fn check_and_insert(&mut self, hash: u128) -> Result<bool> {
        if self.contains(hash) {
            return Ok(true);
        }
        self.insert_in_memory(hash);
        if let Some((path, log)) = &mut self.log {
            log.write_all(&hash.to_le_bytes()).map_err(|e| Error::io(path.as_path(), e))?;
        }
        self.logged += 1;
        Ok(false)
    }

    /// Flush the log to disk and return the number of hashes it holds, for the checkpoint.
    pub fn sync(&mut self) -> Result<u64> {
        if let Some((path, log)) = &mut self.log {
            log.flush().map_err(|e| Error::io(path.as_path(), e))?;
            log.get_ref().sync_data().map_err(|e| Error::io(path.as_path(), e))?;
        }
        Ok(self.logged)
    }

    fn contains(&self, hash: u128) -> bool {
        match &self.set {
            Set::Exact(set) => set.contains(&hash),
            Set::Bloom { bits, mask, .. } => probes(hash, *mask).all(|b| bits[(b >> 6) as usize] & (1 << (b & 63)) != 0),
        }
    }

    fn insert_in_memory(&mut self, hash: u128) {
        match &mut self.set {
            Set::Exact(set) => {
                set.insert(hash);
                if set.len() * BYTES_PER_ENTRY > self.memory_bytes {
                    self.convert_to_bloom();
                }
            }
            Set::Bloom { bits, mask, inserted } => {
                for b in probes(hash, *mask) {
                    bits[(b >> 6) as usize] |= 1 << (b & 63);
                }
                *inserted += 1;
            }
        }
    }

    fn convert_to_bloom(&mut self) {
        // The largest power of two of bits that fits the budget, so a mask replaces a modulo.
        let m_bits = ((self.memory_bytes * 8) as u64).next_power_of_two() >> 1;
        let m_bits = m_bits.max(1 << 16);
        let mut bits = vec![0u64; (m_bits / 64) as usize];
        let mask = m_bits - 1;
        let Set::Exact(set) = std::mem::replace(&mut self.set, Set::Exact(HashSet::new())) else {
            return;
        };
        // Insertion order into a Bloom filter does not change its bits, so iterating the
        // HashSet in its arbitrary order keeps the state deterministic.
        for &h in &set {
            for b in probes(h, mask) {
                bits[(b >> 6) as usize] |= 1 << (b & 63);
            }
        }
        log::warn!(
            "deduplication set passed {} MiB after {} documents; continuing with a Bloom filter of {} Mbit",
            self.memory_bytes >> 20,
            set.len(),
            m_bits >> 20
        );
        self.set = Set::Bloom { bits, mask, inserted: set.len() as u64 };
    }

    /// Estimated false-positive rate for the next document (0 while the set is exact).
    pub fn false_positive_rate(&self) -> f64 {
        match &self.set {
            Set::Exact(_) => 0.0,
            Set::Bloom { mask, inserted, .. } => {
                let m = (*mask + 1) as f64;
                let k = BLOOM_PROBES as f64;
                (1.0 - (-k * *inserted as f64 / m).exp()).powf(k)
            }
        }
    }

    pub fn is_exact(&self) -> bool {
        matches!(self.set, Set::Exact(_))
    }
}

/// Bit positions for a hash by double hashing of its two 64-bit halves.
fn probes(hash: u128, mask: u64) -> impl Iterator<Item = u64> {
    let h1 = hash as u64;
    let h2 = ((hash >> 64) as u64) | 1;
    (0..BLOOM_PROBES).map(move |i| h1.wrapping_add(i.wrapping_mul(h2)) & mask)
}

pub fn hash_text(text: &str) -> u128 {
    xxhash_rust::xxh3::xxh3_128(text.as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exact_then_bloom_keeps_membership() {
        let mut d = Dedup::new(1 << 20);
        let n = (1 << 20) / BYTES_PER_ENTRY as u128 + 10;
        for i in 0..n {
            assert!(!d.check_and_insert(i.wrapping_mul(0x9E3779B97F4A7C15F39CC0605CEDC835)).unwrap());
        }
        assert!(!d.is_exact());
        for i in 0..n {
            assert!(d.check_and_insert(i.wrapping_mul(0x9E3779B97F4A7C15F39CC0605CEDC835)).unwrap());
        }
        assert!(d.false_positive_rate() > 0.0);
    }

    #[test]
    fn log_replay_rebuilds_state() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("dedup.log");
        let mut d = Dedup::new(1 << 20);
        d.attach_log(&path, 0).unwrap();
        for h in [1u128, 2, 3] {
            d.check_and_insert(h).unwrap();
        }
        assert_eq!(d.sync().unwrap(), 3);
        d.check_and_insert(4).unwrap();
        d.sync().unwrap();
        drop(d);

        let mut resumed = Dedup::new(1 << 20);
        resumed.attach_log(&path, 3).unwrap();
        assert!(resumed.check_and_insert(2).unwrap());
        assert!(!resumed.check_and_insert(4).unwrap(), "hash 4 came after the checkpoint");
        assert_eq!(resumed.sync().unwrap(), 4);
        assert_eq!(std::fs::metadata(&path).unwrap().len(), 4 * 16);
    }
}
