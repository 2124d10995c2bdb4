//! The small key-value state machine the simulated clients drive, and its
//! request encoding.

use std::collections::HashMap;

/// One client operation.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Op {
    /// Set a key.
    Put(String, String),
    /// Read a key.
    Get(String),
}

/// A client request as carried in an entry's payload.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Request {
    /// The client.
    pub client: u32,
    /// Its request number (retries keep it).
    pub seq: u64,
    /// What to do.
    pub op: Op,
}

impl Request {
    /// Encodes as text: `client seq put key value` or `client seq get key`.
    pub fn encode(&self) -> Vec<u8> {
        match &self.op {
            Op::Put(k, v) => format!("{} {} put {k} {v}", self.client, self.seq),
            Op::Get(k) => format!("{} {} get {k}", self.client, self.seq),
        }
        .into_bytes()
    }

    /// Decodes what [`Request::encode`] wrote.
    pub fn decode(b: &[u8]) -> Option<Request> {
        let s = std::str::from_utf8(b).ok()?;
        let mut it = s.split(' ');
        let client = it.next()?.parse().ok()?;
        let seq = it.next()?.parse().ok()?;
        let op = match it.next()? {
            "put" => Op::Put(it.next()?.to_string(), it.next()?.to_string()),
            "get" => Op::Get(it.next()?.to_string()),
            _ => return None,
        };
        Some(Request { client, seq, op })
    }
}

/// The state machine, with at-most-once execution per (client, seq).
#[derive(Default, Clone, Debug)]
pub struct Kv {
    data: HashMap<String, String>,
    last: HashMap<u32, (u64, String)>,
    /// How many requests were executed (not answered from the dedup table).
    pub executed: u64,
}

impl Kv {
    /// Applies a request; returns its result and whether it was executed now
    /// (false: a retry answered from the table).
    pub fn apply(&mut self, r: &Request) -> (String, bool) {
        if let Some((seq, result)) = self.last.get(&r.client) {
            if r.seq <= *seq {
                return (
                    if r.seq == *seq {
                        result.clone()
                    } else {
                        "stale".into()
                    },
                    false,
                );
            }
        }
        let result = match &r.op {
            Op::Put(k, v) => {
                self.data.insert(k.clone(), v.clone());
                "ok".to_string()
            }
            Op::Get(k) => self.data.get(k).cloned().unwrap_or_else(|| "nil".into()),
        };
        self.executed += 1;
        self.last.insert(r.client, (r.seq, result.clone()));
        (result, true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roundtrip_and_dedup() {
        let r = Request {
            client: 3,
            seq: 9,
            op: Op::Put("a".into(), "x".into()),
        };
        assert_eq!(Request::decode(&r.encode()), Some(r.clone()));
        let mut kv = Kv::default();
        assert_eq!(kv.apply(&r), ("ok".into(), true));
        assert_eq!(kv.apply(&r), ("ok".into(), false));
        let g = Request {
            client: 4,
            seq: 1,
            op: Op::Get("a".into()),
        };
        assert_eq!(kv.apply(&g).0, "x");
        assert_eq!(kv.executed, 2);
    }
}
