//! Hash slots: where a Redis Cluster keeps a key.
//!
//! Every call names the slot it is routed to (fred would otherwise hash the
//! first argument, which for `EVALSHA` is the script's hash, and pay a
//! `MOVED` redirection per call), and on a cluster a call that touches
//! several keys is split into one call per slot: a script may only touch the
//! keys of one slot. On a single Redis the slot is computed and ignored.

use fred::types::ClusterHash;

/// The hash slot of `key` (CRC16 of the key, or of its `{tag}`).
pub(super) fn slot(key: &str) -> u16 {
    fred::util::redis_keyslot(key.as_bytes())
}

/// Routing of a command to the node that holds `key`.
pub(super) fn at(key: &str) -> ClusterHash {
    ClusterHash::Custom(slot(key))
}

/// Indices of `keys` grouped by slot: the groups in order of first
/// appearance, each group in the keys' order.
pub(super) fn group_by_slot<'a>(keys: impl IntoIterator<Item = &'a str>) -> Vec<Vec<usize>> {
    let mut groups: Vec<(u16, Vec<usize>)> = Vec::new();
    for (i, key) in keys.into_iter().enumerate() {
        let s = slot(key);
        match groups.iter_mut().find(|(g, _)| *g == s) {
            Some((_, members)) => members.push(i),
            None => groups.push((s, vec![i])),
        }
    }
    groups.into_iter().map(|(_, members)| members).collect()
}

/// `keys` split into groups of one slot each (see [`group_by_slot`]).
pub(super) fn split_by_slot(keys: &[String]) -> Vec<Vec<String>> {
    group_by_slot(keys.iter().map(String::as_str))
        .into_iter()
        .map(|group| group.into_iter().map(|i| keys[i].clone()).collect())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_with_one_tag_share_a_slot_and_groups_keep_order() {
        assert_eq!(slot("a:{x}:1"), slot("b:{x}:2"));
        // The specification's example: CRC16("123456789") = 0x31C3, mod 16384.
        assert_eq!(slot("123456789"), 12739);
        let keys = ["k:{1}:a", "k:{2}:a", "k:{1}:b"];
        assert_eq!(group_by_slot(keys), vec![vec![0, 2], vec![1]]);
    }
}
