//! Every advisory lock key the agent takes, in one place, so that no two uses collide.

use sha2::{Digest, Sha256};

/// Held while migrations run (session level).
pub const MIGRATE: i64 = 0x66726f7374627974;
/// Mixed into each source's apply lock key.
const APPLY: i64 = 0x66726f737461706c;
/// First key of the replicas' member slot locks ("frmb"); the second is the slot. Two-key locks
/// are a space of their own in PostgreSQL, apart from the one-key locks above.
pub const MEMBER_NS: i32 = 0x6672_6d62;

/// The key of a source's apply lock (transaction level): sources apply side by side, one run per
/// source at a time.
pub fn apply(source: &str) -> i64 {
    let d = Sha256::digest(format!("apply\0{source}").as_bytes());
    i64::from_be_bytes(d[..8].try_into().expect("8 bytes")) ^ APPLY
}

/// The key of a source's lease (session level): which replica syncs it.
pub fn lease(name: &str) -> i64 {
    let d = Sha256::digest(format!("frostbyte source lease\0{name}").as_bytes());
    i64::from_be_bytes(d[..8].try_into().expect("8 bytes"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_of_different_uses_do_not_collide() {
        let keys = [MIGRATE, apply("default"), apply("eu"), lease("default"), lease("eu")];
        let distinct: std::collections::BTreeSet<i64> = keys.into_iter().collect();
        assert_eq!(distinct.len(), keys.len());
    }
}
