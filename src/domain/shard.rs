//! Which replica syncs which source: rendezvous hashing with bounded load. Every replica computes
//! the same answer from the same inputs (the source names and the live member slots), so no
//! coordinator is needed; no replica gets more than ceil(S/R) sources, which plain hashing (Argo
//! CD's shard = hash mod R) does not promise; and when a member joins or leaves, only the sources
//! whose first choices change move.

use sha2::{Digest, Sha256};
use std::collections::BTreeMap;

fn weight(source: &str, member: u32) -> u64 {
    let d = Sha256::new()
        .chain_update(source.as_bytes())
        .chain_update([0])
        .chain_update(member.to_be_bytes())
        .finalize();
    u64::from_be_bytes(d[..8].try_into().expect("8 bytes"))
}

/// The member each source goes to. Sources are placed in name order, each on the member that
/// weighs it highest among those below the cap. Empty when there are no members.
pub fn assign(sources: &[&str], members: &[u32]) -> BTreeMap<String, u32> {
    let mut out = BTreeMap::new();
    if members.is_empty() {
        return out;
    }
    let cap = sources.len().div_ceil(members.len());
    let mut load: BTreeMap<u32, usize> = members.iter().map(|m| (*m, 0)).collect();
    let mut names: Vec<&str> = sources.to_vec();
    names.sort_unstable();
    names.dedup();
    for s in names {
        let mut ranked: Vec<(u64, u32)> = members.iter().map(|m| (weight(s, *m), *m)).collect();
        ranked.sort_unstable_by(|a, b| b.cmp(a));
        let chosen = ranked.iter().map(|(_, m)| *m).find(|m| load[m] < cap).expect("members * cap >= sources");
        *load.get_mut(&chosen).expect("a member") += 1;
        out.insert(s.to_string(), chosen);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(n: usize) -> Vec<String> {
        (0..n).map(|i| format!("source-{i}")).collect()
    }

    fn loads(a: &BTreeMap<String, u32>) -> BTreeMap<u32, usize> {
        let mut l = BTreeMap::new();
        for m in a.values() {
            *l.entry(*m).or_default() += 1;
        }
        l
    }

    #[test]
    fn every_source_has_one_member_and_none_more_than_its_share() {
        for (s, r) in [(4, 2), (10, 3), (1, 5), (10_000, 100), (7, 7), (3, 1)] {
            let n = names(s);
            let refs: Vec<&str> = n.iter().map(String::as_str).collect();
            let members: Vec<u32> = (0..r).map(|i| i * 3 + 1).collect();
            let a = assign(&refs, &members);
            assert_eq!(a.len(), s);
            let cap = s.div_ceil(r as usize);
            assert!(loads(&a).values().all(|l| *l <= cap), "{s} sources, {r} members: {:?}", loads(&a));
        }
    }

    #[test]
    fn every_replica_computes_the_same_assignment_whatever_the_order() {
        let n = names(50);
        let mut refs: Vec<&str> = n.iter().map(String::as_str).collect();
        let a = assign(&refs, &[1, 2, 3]);
        refs.reverse();
        assert_eq!(a, assign(&refs, &[3, 1, 2]));
    }

    #[test]
    fn a_member_leaving_moves_little_more_than_its_own_sources() {
        let n = names(1000);
        let refs: Vec<&str> = n.iter().map(String::as_str).collect();
        let before = assign(&refs, &(0..10).collect::<Vec<_>>());
        let after = assign(&refs, &(0..9).collect::<Vec<_>>());
        let moved = refs.iter().filter(|s| before[**s] != after[**s]).count();
        let orphaned = before.values().filter(|m| **m == 9).count();
        // Its own sources must move; the bound keeps the rest mostly in place.
        assert!(moved >= orphaned && moved < orphaned * 3, "moved {moved}, orphaned {orphaned}");
    }
}
