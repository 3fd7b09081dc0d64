//! frostbyte-gitops: keeps the Frostbyte tenant registry in PostgreSQL equal to SOPS-encrypted
//! tenant files in git.
//!
//! `domain` is the pure core; `source` (git), `sops` (decryption), `store` (PostgreSQL) and
//! `localpg` (a local cluster) and `notify` (webhooks) are adapters; `sync` wires them together for
//! the CLI in `main.rs`.

pub mod agent;
pub mod compose;
pub mod config;
pub mod domain;
pub mod files;
pub mod localpg;
pub mod location;
pub mod notify;
pub mod parse;
pub mod ports;
pub mod sops;
pub mod source;
pub mod status;
pub mod store;
pub mod sync;
pub mod verify;
pub mod web;

/// Runs CPU-bound or blocking work from async code: on the multi-threaded runtime the worker hands
/// its other tasks (the database connections among them) to another thread meanwhile.
pub fn blocking<T>(f: impl FnOnce() -> T) -> T {
    match tokio::runtime::Handle::try_current() {
        Ok(h) if h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread => tokio::task::block_in_place(f),
        _ => f(),
    }
}
