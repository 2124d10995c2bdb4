//! Divergence detection: does this replica's copy of the program write what
//! the leader's wrote?
//!
//! Every replica hashes what its copy writes on each replicated connection,
//! in chunks that end at fixed output offsets (every `chunk` bytes, plus a
//! last chunk when the program closes the connection), so a chunk's hash
//! depends on the bytes only, never on when they were read. The leader
//! proposes each of its chunk hashes as a `Digest` entry; the entry is
//! ordered and replicated like any input, and every follower compares it
//! with its own hash of the same bytes when it applies it (waiting, if its
//! own copy has not written that far yet).
//!
//! Because the digests travel in the log, a follower far behind compares
//! them when it gets there, and a replica that replays its log (a restart,
//! `falcon failover resync`) checks its rebuilt copy against them on the
//! way. Memory is bounded: a few chunk hashes per open connection, and the
//! ends of the last [`ENDED_MAX`] closed ones.

use std::collections::{HashMap, VecDeque};

use xxhash_rust::xxh3::Xxh3;

use super::normalize::{Normalizer, Protocol};

/// Chunk size when the cluster file gives none.
pub const CHUNK_DEFAULT: u64 = 16 << 10;
/// Own chunk hashes kept per connection while the leader's are not in yet.
const OWN_MAX: usize = 256;
/// Leader's chunk hashes kept per connection while this copy has not written that far.
const EXPECTED_MAX: usize = 1024;
/// Closed connections remembered (for a leader's digest that comes later).
pub const ENDED_MAX: usize = 4096;
/// Bytes of a `Digest` entry's payload.
pub const PAYLOAD_LEN: usize = 29;

/// One chunk of a connection's output: bytes `end - len .. end`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Chunk {
    /// The connection.
    pub conn: u64,
    /// The output offset where the chunk ends.
    pub end: u64,
    /// Its length (the last chunk may be shorter than the chunk size, or empty).
    pub len: u64,
    /// xxh3-64 of its bytes.
    pub hash: u64,
    /// The program closed the connection after it: `end` is the total.
    pub last: bool,
    /// The chunk size of the replica that hashed it.
    pub chunk_size: u64,
}

impl Chunk {
    /// The chunk's number on its connection, from 1.
    pub fn index(&self) -> u64 {
        (self.end - self.len) / self.chunk_size.max(1) + 1
    }

    /// The `Digest` entry's payload: end, len, hash, chunk size (LE), flags.
    pub fn encode(&self) -> Vec<u8> {
        let mut p = Vec::with_capacity(PAYLOAD_LEN);
        p.extend_from_slice(&self.end.to_le_bytes());
        p.extend_from_slice(&self.len.to_le_bytes());
        p.extend_from_slice(&self.hash.to_le_bytes());
        p.extend_from_slice(&(self.chunk_size as u32).to_le_bytes());
        p.push(u8::from(self.last));
        p
    }

    /// Reads a `Digest` entry's payload (None: not one).
    pub fn decode(conn: u64, p: &[u8]) -> Option<Chunk> {
        if p.len() != PAYLOAD_LEN {
            return None;
        }
        let u64_at = |i: usize| u64::from_le_bytes(p[i..i + 8].try_into().expect("8 bytes"));
        let c = Chunk {
            conn,
            end: u64_at(0),
            len: u64_at(8),
            hash: u64_at(16),
            chunk_size: u64::from(u32::from_le_bytes(p[24..28].try_into().expect("4 bytes"))),
            last: match p[28] {
                0 => false,
                1 => true,
                _ => return None,
            },
        };
        (c.len <= c.end && c.chunk_size > 0 && c.len <= c.chunk_size).then_some(c)
    }
}

/// How a replica's output differs from the leader's.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Mismatch {
    /// The connection.
    pub conn: u64,
    /// The first byte of the first chunk that differs.
    pub offset: u64,
    /// Where that chunk ends.
    pub end: u64,
    /// Its number on the connection, from 1.
    pub chunk: u64,
    /// What differs, in words.
    pub what: String,
}

impl std::fmt::Display for Mismatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "connection {}, bytes {}..{} (chunk {}, the first that differs): {}",
            self.conn, self.offset, self.end, self.chunk, self.what
        )
    }
}

/// What is known of one connection's output here.
struct Conn {
    /// Bytes written so far.
    total: u64,
    /// The hash of the chunk under way.
    hasher: Xxh3,
    /// Own chunks whose leader's hash has not come yet, oldest first.
    own: VecDeque<Chunk>,
    /// Leader's chunks this copy has not written that far yet, oldest first.
    expected: VecDeque<Chunk>,
    /// The program closed it (true: cleanly, its output is complete).
    ended: Option<bool>,
    /// Its output here does not start where the leader's did (reopened
    /// after a snapshot was restored): nothing on it can be compared.
    unaligned: bool,
    /// What is hashed of the output (see [`Protocol`]).
    norm: Normalizer,
    /// The client's close reached this copy's program (see [`resolve`]).
    client_closed: bool,
}

impl Conn {
    /// The chunk under way ends here (`len` bytes): to `chunks`, and kept
    /// to compare when `keep`.
    fn finish_chunk(
        &mut self,
        conn: u64,
        len: u64,
        chunk_size: u64,
        last: bool,
        keep: bool,
        chunks: &mut Vec<Chunk>,
    ) {
        let done = Chunk {
            conn,
            end: self.total,
            len,
            hash: self.hasher.digest(),
            last,
            chunk_size,
        };
        self.hasher.reset();
        chunks.push(done);
        if keep {
            self.own.push_back(done);
            if self.own.len() > OWN_MAX {
                self.own.pop_front();
            }
        }
    }

    fn new(protocol: Protocol) -> Conn {
        Conn {
            norm: protocol.start(),
            total: 0,
            hasher: Xxh3::new(),
            own: VecDeque::new(),
            expected: VecDeque::new(),
            ended: None,
            unaligned: false,
            client_closed: false,
        }
    }
}

/// What a leader's chunk meant here.
enum Resolved {
    Same,
    Differs(Mismatch),
    /// This copy has not written that far yet.
    Wait,
    /// Cannot tell (own hash forgotten, connection restarted, another chunk size).
    Unchecked,
}

/// The counts a replica reports.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Counts {
    /// Leader's chunks compared with this copy's.
    pub compared: u64,
    /// Of them, how many differed.
    pub mismatches: u64,
    /// Leader's chunks that could not be compared (see [`Digests`]).
    pub unchecked: u64,
}

/// This replica's output hashes (see the module's documentation).
pub struct Digests {
    chunk: u64,
    protocol: Protocol,
    /// The normalized output of one read.
    scratch: Vec<u8>,
    conns: HashMap<u64, Conn>,
    ended: VecDeque<u64>,
    /// The counts so far.
    pub counts: Counts,
    /// Chunk sizes of leaders' digests that differ from ours (said once).
    pub other_chunk_size: Option<u64>,
}

impl Digests {
    /// `chunk`: bytes per chunk; 0 turns detection off (nothing is hashed).
    pub fn new(chunk: u64, protocol: Protocol) -> Digests {
        Digests {
            chunk,
            protocol,
            scratch: Vec::new(),
            conns: HashMap::new(),
            ended: VecDeque::new(),
            counts: Counts::default(),
            other_chunk_size: None,
        }
    }

    /// Whether detection is on.
    pub fn on(&self) -> bool {
        self.chunk > 0
    }

    /// Bytes per chunk (0: off).
    pub fn chunk(&self) -> u64 {
        self.chunk
    }

    /// The (normalized) output of `conn` so far, when it is followed here.
    pub fn total(&self, conn: u64) -> Option<u64> {
        self.conns
            .get(&conn)
            .filter(|c| !c.unaligned)
            .map(|c| c.total)
    }

    /// Forgets every connection (the program restarted); counts stay.
    pub fn reset(&mut self) {
        self.conns.clear();
        self.ended.clear();
    }

    /// This replica opened a connection to its program for `conn` (leader's
    /// digests for connections it never opened cannot be compared).
    pub fn opened(&mut self, conn: u64) {
        if self.on() {
            self.conns.insert(conn, Conn::new(self.protocol));
        }
    }

    /// Connection `conn` was opened again on a program restored from a
    /// snapshot: its output here does not line up with the leader's.
    pub fn unaligned(&mut self, conn: u64) {
        if self.on() {
            let c = self
                .conns
                .entry(conn)
                .or_insert_with(|| Conn::new(self.protocol));
            c.unaligned = true;
        }
    }

    /// The program wrote `bytes` on `conn`. Completed chunks go to `chunks`
    /// (the leader proposes them) — and, when `keep` (a follower), are kept
    /// to compare with the leader's; differences found go to `mismatches`.
    pub fn output(
        &mut self,
        conn: u64,
        bytes: &[u8],
        keep: bool,
        chunks: &mut Vec<Chunk>,
        mismatches: &mut Vec<Mismatch>,
    ) {
        if !self.on() {
            return;
        }
        let size = self.chunk;
        let protocol = self.protocol;
        let c = self
            .conns
            .entry(conn)
            .or_insert_with(|| Conn::new(protocol));
        if c.unaligned || c.ended.is_some() {
            return;
        }
        let mut bytes = c.norm.feed(bytes, &mut self.scratch);
        while !bytes.is_empty() {
            let room = (size - c.total % size) as usize;
            let (now, rest) = bytes.split_at(room.min(bytes.len()));
            c.hasher.update(now);
            c.total += now.len() as u64;
            bytes = rest;
            if c.total % size == 0 {
                c.finish_chunk(conn, size, size, false, keep, chunks);
            }
        }
        self.settle(conn, mismatches);
    }

    /// The program closed `conn` (`clean`: at the end of its output, not
    /// reset or abandoned). The last chunk goes to `chunks` as for [`output`].
    pub fn end(
        &mut self,
        conn: u64,
        clean: bool,
        keep: bool,
        chunks: &mut Vec<Chunk>,
        mismatches: &mut Vec<Mismatch>,
    ) {
        if !self.on() {
            return;
        }
        let size = self.chunk;
        let c = self
            .conns
            .entry(conn)
            .or_insert_with(|| Conn::new(self.protocol));
        if c.ended.is_some() {
            return;
        }
        c.ended = Some(clean && !c.unaligned);
        if clean && !c.unaligned {
            c.finish_chunk(conn, c.total % size, size, true, keep, chunks);
        }
        self.ended.push_back(conn);
        while self.ended.len() > ENDED_MAX {
            if let Some(old) = self.ended.pop_front() {
                if let Some(gone) = self.conns.remove(&old) {
                    self.counts.unchecked += gone.expected.len() as u64;
                }
            }
        }
        self.settle(conn, mismatches);
    }

    /// The client's close reached this copy's program (see [`resolve`]).
    pub fn client_closed(&mut self, conn: u64) {
        if let Some(c) = self.conns.get_mut(&conn) {
            c.client_closed = true;
        }
    }

    /// A leader's chunk, from a `Digest` entry this replica applied.
    pub fn leader(&mut self, theirs: Chunk, mismatches: &mut Vec<Mismatch>) {
        if !self.on() {
            self.counts.unchecked += 1;
            return;
        }
        if theirs.chunk_size != self.chunk {
            self.other_chunk_size = Some(theirs.chunk_size);
            self.counts.unchecked += 1;
            return;
        }
        let Some(c) = self.conns.get_mut(&theirs.conn) else {
            // Not opened here, or closed long ago and forgotten.
            self.counts.unchecked += 1;
            return;
        };
        if !c.expected.is_empty() {
            if c.expected.len() >= EXPECTED_MAX {
                self.counts.unchecked += 1;
            } else {
                c.expected.push_back(theirs);
            }
            return;
        }
        match resolve(c, &theirs) {
            Resolved::Wait => c.expected.push_back(theirs),
            r => self.count(r, mismatches),
        }
    }

    fn count(&mut self, r: Resolved, mismatches: &mut Vec<Mismatch>) {
        match r {
            Resolved::Same => self.counts.compared += 1,
            Resolved::Differs(m) => {
                self.counts.compared += 1;
                self.counts.mismatches += 1;
                mismatches.push(m);
            }
            Resolved::Unchecked => self.counts.unchecked += 1,
            Resolved::Wait => {}
        }
    }

    /// Compares what the leader's chunks waited for, now that `conn` wrote more or ended.
    fn settle(&mut self, conn: u64, mismatches: &mut Vec<Mismatch>) {
        let Some(c) = self.conns.get_mut(&conn) else {
            return;
        };
        let mut done = Vec::new();
        while let Some(theirs) = c.expected.front().copied() {
            match resolve(c, &theirs) {
                Resolved::Wait => break,
                r => {
                    c.expected.pop_front();
                    done.push(r);
                }
            }
        }
        for r in done {
            self.count(r, mismatches);
        }
    }
}

/// Compares a leader's chunk with this copy's output on its connection.
fn resolve(c: &mut Conn, theirs: &Chunk) -> Resolved {
    if c.unaligned {
        return Resolved::Unchecked;
    }
    let differs = |what: String| {
        Resolved::Differs(Mismatch {
            conn: theirs.conn,
            offset: theirs.end - theirs.len,
            end: theirs.end,
            chunk: theirs.index(),
            what,
        })
    };
    let complete = c.ended == Some(true);
    // A program that reads the end of its input after the client's close
    // may close at once and drop the answers it has not sent yet (Redis
    // does, also after QUIT), as many as timing has it: one copy's output
    // may stop short of another's. Totals a chunk (`chunk_size`) or more
    // apart are not taken for divergence (the chunks both wrote are still
    // compared); closer ones cannot be told from a different answer, and
    // still count.
    if c.client_closed {
        let size = theirs.chunk_size;
        if theirs.last {
            if c.total > theirs.end {
                if c.total - theirs.end >= size {
                    return Resolved::Unchecked;
                }
                if c.ended.is_none() {
                    // This copy may still write a chunk past the leader's end.
                    return Resolved::Wait;
                }
            } else if c.ended.is_some() && theirs.end - c.total >= size {
                return Resolved::Unchecked;
            }
        } else if c.ended.is_some() && c.total < theirs.end {
            // This copy ended before the leader's copy completed this
            // chunk: the leader's last chunk says by how much.
            return Resolved::Unchecked;
        }
    }
    if theirs.last {
        // The leader's copy closed the connection after `end` bytes.
        if c.total > theirs.end {
            return differs(format!(
                "the leader's copy closed the connection after {} bytes; this copy wrote {} or more",
                theirs.end, c.total
            ));
        }
        match c.ended {
            None => return Resolved::Wait,
            Some(false) => return Resolved::Unchecked,
            Some(true) if c.total < theirs.end => {
                return differs(format!(
                    "this copy closed the connection after {} bytes; the leader's wrote {}",
                    c.total, theirs.end
                ));
            }
            Some(true) => {}
        }
    } else if c.total < theirs.end {
        return if complete {
            differs(format!(
                "this copy closed the connection after {} bytes; the leader's wrote at least {}",
                c.total, theirs.end
            ))
        } else if c.ended.is_some() {
            Resolved::Unchecked
        } else {
            Resolved::Wait
        };
    }
    // This copy wrote that far: its own hash of the same bytes, if kept.
    while let Some(mine) = c.own.front().copied() {
        if mine.end < theirs.end || (mine.end == theirs.end && mine.last != theirs.last) {
            // Never compared (the leader's hash of it did not come): forget it.
            if mine.end < theirs.end || !mine.last {
                c.own.pop_front();
                continue;
            }
            // Ours is the last chunk, theirs a full one ending at the same byte.
            return Resolved::Unchecked;
        }
        if mine.end > theirs.end {
            return Resolved::Unchecked;
        }
        c.own.pop_front();
        return if mine.hash == theirs.hash && mine.len == theirs.len {
            Resolved::Same
        } else {
            differs("the bytes differ".into())
        };
    }
    Resolved::Unchecked
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Feeds `out` to a fresh Digests in pieces of `step` bytes; returns its chunks.
    fn chunks_of(out: &[u8], step: usize, size: u64) -> Vec<Chunk> {
        let mut d = Digests::new(size, Protocol::Bytes);
        let (mut chunks, mut m) = (Vec::new(), Vec::new());
        for piece in out.chunks(step) {
            d.output(7, piece, false, &mut chunks, &mut m);
        }
        d.end(7, true, false, &mut chunks, &mut m);
        assert!(m.is_empty());
        chunks
    }

    #[test]
    fn chunks_depend_on_the_bytes_not_on_how_they_were_read() {
        let out: Vec<u8> = (0..10_000u32).map(|i| (i * 7 % 251) as u8).collect();
        let a = chunks_of(&out, 1, 1024);
        let b = chunks_of(&out, 999, 1024);
        let c = chunks_of(&out, 10_000, 1024);
        assert_eq!(a, b);
        assert_eq!(a, c);
        assert_eq!(a.len(), 10); // 9 full chunks and the last 784 bytes
        assert_eq!(a[9].len, 10_000 - 9 * 1024);
        assert!(a[9].last && a[9].end == 10_000);
        assert!(a[..9].iter().all(|c| !c.last && c.len == 1024));
        // A total that is a multiple of the chunk size ends with an empty last chunk.
        let d = chunks_of(&out[..2048], 100, 1024);
        assert_eq!(d.len(), 3);
        assert_eq!((d[2].len, d[2].end, d[2].last), (0, 2048, true));
    }

    #[test]
    fn a_digest_entry_round_trips_and_garbage_is_refused() {
        let c = Chunk {
            conn: 3,
            end: 4096,
            len: 1024,
            hash: 0xdead_beef_0123_4567,
            last: true,
            chunk_size: 1024,
        };
        assert_eq!(Chunk::decode(3, &c.encode()), Some(c));
        assert_eq!(c.index(), 4);
        assert_eq!(Chunk::decode(3, &c.encode()[..20]), None);
        let mut bad = c.encode();
        bad[28] = 9;
        assert_eq!(Chunk::decode(3, &bad), None);
        let mut long = c;
        long.len = 5000; // longer than its end
        assert_eq!(Chunk::decode(3, &long.encode()), None);
    }

    /// A follower fed `mine`, compared with a leader that wrote `theirs`, with
    /// the leader's digests arriving before (`early`) or after its own output.
    fn compare(mine: &[u8], theirs: &[u8], early: bool) -> (Counts, Vec<Mismatch>) {
        compare_closed(mine, theirs, early, false, 500)
    }

    /// As [`compare`]; `client_closed`: the client's close reached this copy first.
    fn compare_closed(
        mine: &[u8],
        theirs: &[u8],
        early: bool,
        client_closed: bool,
        piece: usize,
    ) -> (Counts, Vec<Mismatch>) {
        let leader = chunks_of(theirs, 300, 1024);
        let mut f = Digests::new(1024, Protocol::Bytes);
        f.opened(7);
        if client_closed {
            f.client_closed(7);
        }
        let (mut chunks, mut m) = (Vec::new(), Vec::new());
        if early {
            for c in &leader {
                f.leader(*c, &mut m);
            }
        }
        for piece in mine.chunks(piece) {
            f.output(7, piece, true, &mut chunks, &mut m);
        }
        f.end(7, true, true, &mut chunks, &mut m);
        if !early {
            for c in &leader {
                f.leader(*c, &mut m);
            }
        }
        (f.counts, m)
    }

    #[test]
    fn equal_output_matches_whichever_comes_first() {
        let out = vec![b'x'; 5000];
        for early in [false, true] {
            let (counts, m) = compare(&out, &out, early);
            assert!(m.is_empty(), "{m:?}");
            assert_eq!(
                counts,
                Counts {
                    compared: 5,
                    mismatches: 0,
                    unchecked: 0
                }
            );
        }
    }

    #[test]
    fn the_first_differing_chunk_is_named() {
        let theirs = vec![b'x'; 5000];
        let mut mine = theirs.clone();
        mine[2100] = b'y'; // chunk 3: bytes 2048..3072
        for early in [false, true] {
            let (counts, m) = compare(&mine, &theirs, early);
            assert_eq!(counts.mismatches, 1, "{m:?}");
            assert_eq!((m[0].offset, m[0].end, m[0].chunk), (2048, 3072, 3));
        }
    }

    #[test]
    fn shorter_and_longer_output_differ() {
        let theirs = vec![b'x'; 5000];
        for early in [false, true] {
            let (_, m) = compare(&theirs[..4000], &theirs, early);
            assert!(!m.is_empty(), "shorter, early {early}");
            assert!(m[0].what.contains("closed the connection after"), "{m:?}");
            let mut longer = theirs.clone();
            longer.extend_from_slice(b"more");
            let (_, m) = compare(&longer, &theirs, early);
            assert!(!m.is_empty(), "longer, early {early}");
            assert_eq!(m[0].chunk, 5, "{m:?}");
        }
    }

    #[test]
    fn output_cut_short_at_the_clients_close_by_a_chunk_or_more_is_not_divergence() {
        // Chunks of 1024; the leader's copy wrote 5000 bytes.
        let theirs = vec![b'x'; 5000];
        let mut longer = vec![b'x'; 7000];
        for early in [false, true] {
            for piece in [100, 500] {
                // A chunk or more short, or long: not divergence.
                for len in [1000, 2500, 3976, 6024, 7000] {
                    let mine = &longer[..len];
                    let (counts, m) = compare_closed(mine, &theirs, early, true, piece);
                    assert!(
                        m.is_empty(),
                        "{len} bytes, early {early}, pieces of {piece}: {m:?}"
                    );
                    assert!(counts.unchecked >= 1, "{counts:?}");
                    // Without the client's close first, it is.
                    let (_, m) = compare_closed(mine, &theirs, early, false, piece);
                    assert!(!m.is_empty(), "{len} bytes, early {early}");
                }
                // Less than a chunk apart: it still differs.
                for len in [3977, 3990, 4500, 4999, 5001, 5100, 6023] {
                    let (_, m) = compare_closed(&longer[..len], &theirs, early, true, piece);
                    assert_eq!(
                        m.len(),
                        1,
                        "{len} bytes, early {early}, pieces of {piece}: {m:?}"
                    );
                }
                // The bytes both wrote are still compared.
                let mut cut = theirs[..2500].to_vec();
                cut[1500] = b'y';
                let (_, m) = compare_closed(&cut, &theirs, early, true, piece);
                assert_eq!(m.len(), 1, "{m:?}");
                assert_eq!(m[0].chunk, 2);
                longer[4500] = b'y';
                let (_, m) = compare_closed(&longer[..5000], &theirs, early, true, piece);
                assert_eq!(m.len(), 1, "{m:?}");
                longer[4500] = b'x';
            }
        }
    }

    #[test]
    fn an_abandoned_or_unaligned_connection_is_unchecked_not_diverged() {
        let leader = chunks_of(&[b'x'; 3000], 3000, 1024);
        let mut f = Digests::new(1024, Protocol::Bytes);
        f.opened(7);
        let (mut chunks, mut m) = (Vec::new(), Vec::new());
        f.output(7, &[b'x'; 1500], true, &mut chunks, &mut m);
        f.end(7, false, true, &mut chunks, &mut m);
        for c in &leader {
            f.leader(*c, &mut m);
        }
        assert!(m.is_empty());
        assert_eq!(f.counts.compared, 1);
        assert_eq!(f.counts.unchecked, 2);

        let mut g = Digests::new(1024, Protocol::Bytes);
        g.opened(7);
        g.unaligned(7);
        g.output(7, &[b'z'; 3000], true, &mut chunks, &mut m);
        g.end(7, true, true, &mut chunks, &mut m);
        for c in &leader {
            g.leader(*c, &mut m);
        }
        assert!(m.is_empty());
        assert_eq!(g.counts.unchecked, 3);
    }

    #[test]
    fn another_chunk_size_is_unchecked_and_off_hashes_nothing() {
        let leader = chunks_of(&[b'x'; 3000], 3000, 1024);
        let mut f = Digests::new(4096, Protocol::Bytes);
        f.opened(7);
        let mut m = Vec::new();
        for c in &leader {
            f.leader(*c, &mut m);
        }
        assert_eq!(f.other_chunk_size, Some(1024));
        assert_eq!(f.counts.unchecked, 3);
        let mut off = Digests::new(0, Protocol::Bytes);
        let mut chunks = Vec::new();
        off.output(7, &[b'x'; 5000], true, &mut chunks, &mut m);
        off.end(7, true, true, &mut chunks, &mut m);
        assert!(chunks.is_empty() && m.is_empty());
    }

    #[test]
    fn memory_stays_bounded_when_the_leaders_hashes_never_come() {
        let mut f = Digests::new(1024, Protocol::Bytes);
        let (mut chunks, mut m) = (Vec::new(), Vec::new());
        for conn in 0..(ENDED_MAX as u64 + 100) {
            f.output(conn, &[b'x'; 4096], true, &mut chunks, &mut m);
            f.end(conn, true, true, &mut chunks, &mut m);
            chunks.clear();
        }
        assert!(f.conns.len() <= ENDED_MAX);
        f.output(
            1 << 40,
            &vec![b'x'; 1024 * (OWN_MAX + 50)],
            true,
            &mut chunks,
            &mut m,
        );
        assert!(f.conns[&(1 << 40)].own.len() <= OWN_MAX);
        // A digest for a connection never opened here, or long forgotten, is unchecked.
        let before = f.counts.unchecked;
        let stray = chunks_of(&[b'x'; 10], 10, 1024);
        f.leader(
            Chunk {
                conn: 99_999_999,
                ..stray[0]
            },
            &mut m,
        );
        f.leader(
            Chunk {
                conn: 0,
                ..stray[0]
            },
            &mut m,
        );
        assert_eq!(f.counts.unchecked, before + 2);
        assert!(m.is_empty());
    }
}
