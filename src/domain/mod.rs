//! The pure core: tenant documents, validation, plans, drift and audit payloads. No I/O here.

pub mod audit;
pub mod commit;
pub mod document;
pub mod drift;
pub mod escape;
pub mod history;
pub mod issue;
pub mod json;
pub mod plan;
pub mod render;
pub mod secret_paths;
pub mod shard;
pub mod tenant;
