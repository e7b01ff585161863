//! Single-thread throughput of the hot steps, in bytes of document text per second.
//!
//!     cargo bench -p cptstream-core --bench core
//!
//! Input: about 3 MB of the real corpus (English and Chinese) and the real Qwen2 tokenizer that
//! `scripts/fetch_assets.py` builds under `$CPTSTREAM_CACHE` (default `~/.cache/cptstream`).
//! Every step reports `Throughput::Bytes` of the text it stands for, packing included (its
//! input is the tokens of that text), so the three figures compare directly with each other
//! and with the MB/s of `cptstream bench shard`.

use cptstream_core::clean::{clean, CleanConfig};
use cptstream_core::config::BosPolicy;
use cptstream_core::pack::{BfdPacker, ConcatPacker, Packer};
use cptstream_core::tokenize::DocTokenizer;
use criterion::{black_box, criterion_group, criterion_main, Criterion, Throughput};
use std::collections::VecDeque;
use std::path::PathBuf;
use std::time::Duration;

/// (file under corpus/, bytes of text to take from it)
const SAMPLES: &[(&str, usize)] = &[("en-linux-docs.jsonl", 2_500_000), ("zh-debian-reference.jsonl", 550_000)];
const SEQ_LEN: usize = 4096;

fn cache_dir() -> PathBuf {
    std::env::var_os("CPTSTREAM_CACHE")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|home| PathBuf::from(home).join(".cache/cptstream")))
        .expect("set CPTSTREAM_CACHE or HOME to find the benchmark assets")
}

/// Documents of the real corpus, whole, until each file's byte budget is reached.
fn load_docs() -> Vec<String> {
    let corpus = cache_dir().join("corpus");
    let mut docs = Vec::new();
    for &(name, budget) in SAMPLES {
        let path = corpus.join(name);
        let text = std::fs::read_to_string(&path).unwrap_or_else(|e| {
            panic!("cannot read {}: {e}; build the assets with scripts/fetch_assets.py", path.display())
        });
        let mut taken = 0;
        for line in text.lines().filter(|line| !line.trim().is_empty()) {
            let record: serde_json::Value = serde_json::from_str(line).expect("corpus lines are JSON");
            let doc = record["text"].as_str().expect("corpus records have a text field").to_owned();
            taken += doc.len();
            docs.push(doc);
            if taken >= budget {
                break;
            }
        }
    }
    docs
}

fn bench_steps(c: &mut Criterion) {
    let docs = load_docs();
    let text_bytes: usize = docs.iter().map(String::len).sum();
    let tokenizer_dir = cache_dir().join("qwen2");
    let tokenizer = DocTokenizer::load(tokenizer_dir.to_str().expect("UTF-8 path"), None, BosPolicy::Auto)
        .unwrap_or_else(|e| {
            panic!("cannot load {}: {e}; build it with scripts/fetch_assets.py", tokenizer_dir.display())
        });
    let config = CleanConfig::default();
    let cleaned: Vec<String> = docs.iter().map(|doc| clean(doc, &config)).collect();
    let tokens: Vec<Vec<u32>> = cleaned.iter().map(|doc| tokenizer.encode_doc(doc).expect("encodes")).collect();

    let mut group = c.benchmark_group("core");
    group.throughput(Throughput::Bytes(text_bytes as u64));
    group.sample_size(10);
    group.measurement_time(Duration::from_secs(8));
    group.warm_up_time(Duration::from_secs(1));

    group.bench_function("clean", |b| {
        b.iter(|| docs.iter().map(|doc| clean(black_box(doc), &config).len()).sum::<usize>())
    });
    group.bench_function("tokenize/fast_path", |b| {
        b.iter(|| cleaned.iter().map(|doc| tokenizer.encode_doc(black_box(doc)).expect("encodes").len()).sum::<usize>())
    });
    group.bench_function("tokenize/encode_fast", |b| {
        b.iter(|| {
            cleaned.iter().map(|doc| tokenizer.encode_reference(black_box(doc)).expect("encodes").len()).sum::<usize>()
        })
    });
    group.bench_function("pack/bfd", |b| b.iter(|| pack(Packer::Bfd(BfdPacker::new(SEQ_LEN, 512, 512)), &tokens)));
    group.bench_function("pack/concat", |b| b.iter(|| pack(Packer::Concat(ConcatPacker::new(SEQ_LEN)), &tokens)));
    group.finish();
}

/// Pack every document and return the row count, so the work cannot be optimized away.
fn pack(mut packer: Packer, docs: &[Vec<u32>]) -> usize {
    let mut rows = VecDeque::new();
    let mut count = 0;
    for doc in docs {
        packer.push(black_box(doc), &mut rows);
        count += rows.len();
        rows.clear();
    }
    packer.finish(&mut rows);
    count + rows.len()
}

criterion_group!(benches, bench_steps);
criterion_main!(benches);
