//! cptstream-core: streaming preparation of raw corpora for continued pretraining.
//!
//! The steps, one module each: [`read`] (inputs) → [`clean`] → [`dedup`] → [`tokenize`] →
//! [`pack`] → [`shard`] (Arrow IPC output), tied together by [`pipeline::run`].

pub mod clean;
pub mod config;
pub mod dedup;
pub mod error;
pub mod pack;
pub mod pipeline;
pub mod read;
pub mod shard;
pub mod tokenize;
pub mod verify;

pub use config::ShardConfig;
pub use error::{Error, Result};
