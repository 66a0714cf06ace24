//! Which node serves which key: one node for a single Redis; for a Redis Cluster, the slot map
//! (`CLUSTER SLOTS`) from key slot (CRC16 of the key, modulo 16384, as Redis computes it) to the
//! slot's master.

use std::sync::Arc;

use redis::Value;

use super::node::{Node, node_name};

/// Slots of a Redis Cluster.
pub(crate) const SLOTS: usize = 16384;
const UNASSIGNED: u16 = u16::MAX;

/// The slot of `key`, as Redis Cluster computes it (honouring a `{hash tag}`).
pub(crate) fn slot(key: &[u8]) -> u16 {
    let tagged = key.iter().position(|&b| b == b'{').and_then(|open| {
        let close = key[open + 1..].iter().position(|&b| b == b'}')?;
        (close > 0).then(|| &key[open + 1..open + 1 + close])
    });
    crc16::State::<crc16::XMODEM>::calculate(tagged.unwrap_or(key)) % SLOTS as u16
}

/// The nodes and, for a cluster, which of them serves each slot.
pub(crate) struct Topology {
    pub(crate) nodes: Vec<Arc<Node>>,
    /// `None`: a single node serves everything. Otherwise an index into `nodes` per slot, or
    /// `UNASSIGNED`.
    slots: Option<Box<[u16]>>,
}

impl Topology {
    pub(crate) fn single(node: Arc<Node>) -> Self {
        Self {
            nodes: vec![node],
            slots: None,
        }
    }

    /// A cluster topology with no slot assigned (before the first discovery).
    pub(crate) fn empty() -> Self {
        Self {
            nodes: Vec::new(),
            slots: Some(vec![UNASSIGNED; SLOTS].into_boxed_slice()),
        }
    }

    /// The index (into `nodes`) of the node that serves `key`, if any.
    pub(crate) fn node_for(&self, key: &[u8]) -> Option<usize> {
        match &self.slots {
            None => Some(0),
            Some(slots) => {
                let n = slots[usize::from(slot(key))];
                (n != UNASSIGNED).then_some(usize::from(n))
            }
        }
    }

    /// Whether some slot has no node.
    pub(crate) fn has_gaps(&self) -> bool {
        self.slots.as_ref().is_some_and(|s| s.contains(&UNASSIGNED))
    }

    /// Builds the topology from a `CLUSTER SLOTS` reply received from `asked_host`; `node`
    /// gives (or makes) the node for a `host:port`. `None` when the reply is malformed.
    pub(crate) fn from_cluster_slots(
        reply: &Value,
        asked_host: &str,
        mut node: impl FnMut(&str, u16) -> Option<Arc<Node>>,
    ) -> Option<Self> {
        let Value::Array(ranges) = reply else {
            return None;
        };
        let mut nodes: Vec<Arc<Node>> = Vec::new();
        let mut slots = vec![UNASSIGNED; SLOTS].into_boxed_slice();
        for range in ranges {
            let Value::Array(fields) = range else {
                return None;
            };
            let (Some(Value::Int(start)), Some(Value::Int(end)), Some(Value::Array(master))) =
                (fields.first(), fields.get(1), fields.get(2))
            else {
                return None;
            };
            let (start, end) = (usize::try_from(*start).ok()?, usize::try_from(*end).ok()?);
            if start > end || end >= SLOTS {
                return None;
            }
            let host = match master.first() {
                Some(Value::BulkString(h)) => std::str::from_utf8(h).ok()?,
                Some(Value::SimpleString(h)) => h.as_str(),
                _ => return None,
            };
            // An empty host means "the node you asked"; "?" an unknown address.
            let host = if host.is_empty() { asked_host } else { host };
            if host == "?" {
                continue;
            }
            let Some(Value::Int(port)) = master.get(1) else {
                return None;
            };
            let port = u16::try_from(*port).ok()?;
            let name = node_name(host, port);
            let index = match nodes.iter().position(|n| n.name == name) {
                Some(i) => i,
                None => {
                    nodes.push(node(host, port)?);
                    nodes.len() - 1
                }
            };
            let index = u16::try_from(index).ok()?;
            slots[start..=end].fill(index);
        }
        Some(Self {
            nodes,
            slots: Some(slots),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_match_redis() {
        // Values from the Redis Cluster specification and `CLUSTER KEYSLOT`.
        assert_eq!(slot(b"123456789"), 0x31c3);
        assert_eq!(slot(b"foo"), 12182);
        assert_eq!(slot(b"bar"), 5061);
        assert_eq!(slot(b"{user1000}.following"), slot(b"user1000"));
        // An empty tag hashes the whole key.
        assert_eq!(
            slot(b"foo{}{bar}"),
            crc16::State::<crc16::XMODEM>::calculate(b"foo{}{bar}") % 16384
        );
        assert_eq!(slot(b"foo{{bar}}zap"), slot(b"{bar"));
        assert_eq!(slot(b"foo{bar}{zap}"), slot(b"bar"));
    }
}
