//! A single-producer, single-consumer ring of records in shared memory: the
//! ring protocol that `shm` runs between processes on one host (and that the
//! RDMA transport runs with one-sided writes).
//!
//! The receiver owns the ring (it creates the file, as an RDMA follower
//! exposes its memory); exactly one sender writes into it. Layout:
//!
//! ```text
//! 0     magic "FALCONRG" | version u32 | capacity u32 | incarnation u64
//! 64    write_pos u64, write_seq u64  (published; written by the sender only)
//! 128   read_pos  u64   (bytes consumed; written back by the receiver only)
//! 4096  data, `capacity` bytes (a power of two)
//! ```
//!
//! A record is `len u32 | seq u32 | crc32c u32 | 0 u32 | payload`, padded to
//! 8 bytes, and may wrap around the end of the data area. The sender writes a
//! record, then publishes it by storing `write_pos` (release); the receiver
//! reads only below `write_pos` (acquire), checks that `seq` is the record
//! number it expects (a record left from the previous lap can never pass)
//! and the checksum, then stores `read_pos`. The sender never writes beyond
//! `read_pos + capacity`: it cannot overwrite what the receiver has not read.

use std::sync::atomic::{AtomicU64, Ordering};

/// First bytes of a ring file.
pub const MAGIC: &[u8; 8] = b"FALCONRG";
/// Layout version.
pub const VERSION: u32 = 1;
/// Bytes before the data area.
pub const HEADER: usize = 4096;
const REC_HEADER: usize = 16;
/// Offset of `write_pos` (then `write_seq`) in the header: written by the sender only.
pub const WRITE_POS: usize = 64;
const WRITE_SEQ: usize = 72;
/// Offset of `read_pos` in the header: written by the receiver only.
pub const READ_POS: usize = 128;

/// Why a record could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RingError {
    /// The header is not a ring's.
    #[error("not a falcon ring (bad magic or version)")]
    NotARing,
    /// A record with the wrong sequence number: stale or corrupt.
    #[error("record {got} where {want} was expected")]
    Sequence {
        /// Expected (low 32 bits).
        want: u32,
        /// Found.
        got: u32,
    },
    /// A record whose bytes do not match its checksum.
    #[error("record {0}: checksum mismatch")]
    Checksum(u32),
    /// A length that cannot be.
    #[error("record length {0} out of range")]
    Length(u32),
    /// A write position that cannot be.
    #[error("write position {0} out of range")]
    Position(u64),
}

/// A ring over `len` bytes of memory at `base` (shared with another process).
pub struct Ring {
    base: *mut u8,
    capacity: usize,
    /// Records written or read so far (this side's count).
    seq: u64,
    /// Write side: bytes written but not yet published.
    pending: u64,
    /// Read side, after a reset: take the next record's number as it comes
    /// (if its checksum holds) instead of expecting one.
    resync: bool,
}

/// The smallest data area a ring may have.
const CAPACITY_MIN: usize = 64;

// SAFETY: the memory is only reached through atomics for the positions and
// through the single-producer/single-consumer discipline for the data.
unsafe impl Send for Ring {}

fn padded(n: usize) -> usize {
    (REC_HEADER + n).div_ceil(8) * 8
}

impl Ring {
    /// Writes a fresh header into `len` bytes at `base`.
    ///
    /// # Safety
    /// `base` must point to `len` writable bytes that stay mapped while any
    /// `Ring` over them lives, and no other process may use them yet.
    pub unsafe fn init(base: *mut u8, len: usize, incarnation: u64) -> Ring {
        let avail = (len - HEADER).min(u32::MAX as usize / 2);
        let capacity = 1usize << (usize::BITS - 1 - avail.leading_zeros());
        assert!(
            capacity >= CAPACITY_MIN,
            "a ring needs at least {CAPACITY_MIN} bytes of data"
        );
        // SAFETY: the caller gives us the whole region.
        unsafe {
            std::ptr::write_bytes(base, 0, HEADER);
            std::ptr::copy_nonoverlapping(MAGIC.as_ptr(), base, 8);
            (base.add(8) as *mut u32).write_unaligned(VERSION);
            (base.add(12) as *mut u32).write_unaligned(capacity as u32);
            (base.add(16) as *mut u64).write_unaligned(incarnation);
        }
        Ring {
            base,
            capacity,
            seq: 0,
            pending: 0,
            resync: false,
        }
    }

    /// Opens a ring another process initialised.
    ///
    /// # Safety
    /// As for [`Ring::init`], except that the header is already written.
    pub unsafe fn open(base: *mut u8, len: usize) -> Result<Ring, RingError> {
        // SAFETY: the caller gives us at least HEADER bytes.
        let (magic, version, capacity) = unsafe {
            (
                std::slice::from_raw_parts(base, 8),
                (base.add(8) as *const u32).read_unaligned(),
                (base.add(12) as *const u32).read_unaligned() as usize,
            )
        };
        if magic != MAGIC
            || version != VERSION
            || !capacity.is_power_of_two()
            || capacity < CAPACITY_MIN
            || capacity > u32::MAX as usize / 2
            || HEADER + capacity > len
        {
            return Err(RingError::NotARing);
        }
        let mut r = Ring {
            base,
            capacity,
            seq: 0,
            pending: 0,
            resync: false,
        };
        // A sender continues where the last one stopped, if the positions make sense.
        let (write, read) = (
            r.write_pos().load(Ordering::Acquire),
            r.read_pos().load(Ordering::Acquire),
        );
        if write < read || write - read > capacity as u64 || write > u64::MAX / 2 {
            return Err(RingError::NotARing);
        }
        r.pending = write;
        r.seq = r.write_seq().load(Ordering::Acquire);
        // A sender that died between storing write_seq and write_pos left
        // write_seq counting records it never published; the receiver
        // would take the next record for damage and drop what is still
        // unread. The unread records themselves tell the next number.
        if let Some(seq) = r.seq_after(read, write) {
            r.seq = seq;
        }
        Ok(r)
    }

    /// The number of the record that follows the published ones between
    /// `read` and `write`, read from their headers (None when nothing is
    /// unread or the headers do not add up to `write`).
    fn seq_after(&self, read: u64, write: u64) -> Option<u64> {
        let mut head = [0u8; REC_HEADER];
        let (mut pos, mut first, mut records) = (read, None, 0u64);
        while pos < write {
            self.copy_out(pos, &mut head);
            let len = u32::from_le_bytes(head[..4].try_into().expect("4")) as usize;
            if len > self.max_payload() {
                return None;
            }
            first.get_or_insert(u32::from_le_bytes(head[4..8].try_into().expect("4")));
            pos += padded(len) as u64;
            records += 1;
        }
        (pos == write).then_some(first.map(|f| u64::from(f) + records)?)
    }

    /// The incarnation the receiver wrote at init.
    pub fn incarnation(&self) -> u64 {
        // SAFETY: within the header.
        unsafe { (self.base.add(16) as *const u64).read_unaligned() }
    }

    fn write_pos(&self) -> &AtomicU64 {
        // SAFETY: aligned (the mapping is page-aligned), inside the header.
        unsafe { &*(self.base.add(WRITE_POS) as *const AtomicU64) }
    }

    fn write_seq(&self) -> &AtomicU64 {
        // SAFETY: as above.
        unsafe { &*(self.base.add(WRITE_SEQ) as *const AtomicU64) }
    }

    fn read_pos(&self) -> &AtomicU64 {
        // SAFETY: as above.
        unsafe { &*(self.base.add(READ_POS) as *const AtomicU64) }
    }

    /// Bytes in the data area.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// The published write position (bytes since the ring was made).
    pub fn published(&self) -> u64 {
        self.write_pos().load(Ordering::Acquire)
    }

    /// The receiver's read position (bytes since the ring was made).
    pub fn consumed(&self) -> u64 {
        self.read_pos().load(Ordering::Acquire)
    }

    /// The largest payload one record can carry.
    pub fn max_payload(&self) -> usize {
        self.capacity - REC_HEADER - 8
    }

    fn copy_in(&mut self, pos: u64, bytes: &[u8]) {
        let at = (pos as usize) & (self.capacity - 1);
        let first = bytes.len().min(self.capacity - at);
        // SAFETY: both parts lie inside the data area.
        unsafe {
            let data = self.base.add(HEADER);
            std::ptr::copy_nonoverlapping(bytes.as_ptr(), data.add(at), first);
            std::ptr::copy_nonoverlapping(bytes[first..].as_ptr(), data, bytes.len() - first);
        }
    }

    fn copy_out(&self, pos: u64, out: &mut [u8]) {
        let at = (pos as usize) & (self.capacity - 1);
        let first = out.len().min(self.capacity - at);
        // SAFETY: both parts lie inside the data area.
        unsafe {
            let data = self.base.add(HEADER);
            std::ptr::copy_nonoverlapping(data.add(at), out.as_mut_ptr(), first);
            let rest = out.len() - first;
            std::ptr::copy_nonoverlapping(data, out[first..].as_mut_ptr(), rest);
        }
    }

    /// Sender: [`Ring::push`] of one message to replica `to`, as a transport
    /// reports it: `Full` when the receiver has not made room yet,
    /// `TooLarge` when no room could ever hold it.
    pub fn send(&mut self, to: super::NodeId, payload: &[u8]) -> Result<(), super::SendError> {
        if self.push(payload) {
            Ok(())
        } else if payload.len() > self.max_payload() {
            Err(super::SendError::TooLarge {
                to,
                bytes: payload.len(),
                max: self.max_payload(),
            })
        } else {
            Err(super::SendError::Full(to))
        }
    }

    /// Sender: writes one record (unpublished until [`Ring::publish`]).
    /// False when the receiver has not consumed enough to make room.
    pub fn push(&mut self, payload: &[u8]) -> bool {
        let need = padded(payload.len()) as u64;
        if payload.len() > self.max_payload() {
            return false;
        }
        let read = self.read_pos().load(Ordering::Acquire);
        // (A read position ahead of ours is the other side's damage: refuse.)
        if read > self.pending || self.pending + need - read > self.capacity as u64 {
            return false;
        }
        let mut head = [0u8; REC_HEADER];
        head[..4].copy_from_slice(&(payload.len() as u32).to_le_bytes());
        head[4..8].copy_from_slice(&(self.seq as u32).to_le_bytes());
        head[8..12].copy_from_slice(&crc32c::crc32c(payload).to_le_bytes());
        let pos = self.pending;
        self.copy_in(pos, &head);
        self.copy_in(pos + REC_HEADER as u64, payload);
        self.pending += need;
        self.seq = self.seq.wrapping_add(1);
        true
    }

    /// Sender: makes every pushed record visible. True if there was any.
    pub fn publish(&mut self) -> bool {
        let wp = self.write_pos();
        if wp.load(Ordering::Relaxed) == self.pending {
            return false;
        }
        self.write_seq().store(self.seq, Ordering::Relaxed);
        wp.store(self.pending, Ordering::Release);
        true
    }

    /// Receiver: is a published record waiting?
    pub fn ready(&self) -> bool {
        self.write_pos().load(Ordering::Acquire) > self.read_pos().load(Ordering::Relaxed)
    }

    /// Receiver: takes the next published record into `out` (replacing its
    /// contents). Ok(false) when there is none.
    pub fn pop(&mut self, out: &mut Vec<u8>) -> Result<bool, RingError> {
        let write = self.write_pos().load(Ordering::Acquire);
        let read = self.read_pos().load(Ordering::Relaxed);
        if write <= read {
            return Ok(false);
        }
        // Positions never come near this: the writer's word is not one.
        if write > u64::MAX / 2 {
            return Err(RingError::Position(write));
        }
        let mut head = [0u8; REC_HEADER];
        self.copy_out(read, &mut head);
        let len = u32::from_le_bytes(head[..4].try_into().expect("4"));
        let seq = u32::from_le_bytes(head[4..8].try_into().expect("4"));
        let crc = u32::from_le_bytes(head[8..12].try_into().expect("4"));
        if len as usize > self.max_payload() || padded(len as usize) as u64 > write - read {
            return Err(RingError::Length(len));
        }
        if seq != self.seq as u32 && !self.resync {
            return Err(RingError::Sequence {
                want: self.seq as u32,
                got: seq,
            });
        }
        out.clear();
        out.resize(len as usize, 0);
        self.copy_out(read + REC_HEADER as u64, out);
        if crc32c::crc32c(out) != crc {
            return Err(RingError::Checksum(seq));
        }
        if self.resync {
            self.resync = false;
            self.seq = (self.seq & !u64::from(u32::MAX)) | u64::from(seq);
        }
        self.seq = self.seq.wrapping_add(1);
        self.read_pos()
            .store(read + padded(len as usize) as u64, Ordering::Release);
        Ok(true)
    }

    /// Receiver: skips everything published (after an error), so the ring
    /// can be used again from the next record a new sender writes.
    pub fn reset_reader(&mut self) {
        let write = self.write_pos().load(Ordering::Acquire);
        // The sender may publish again between these loads: the number of the
        // next record is taken from the record itself.
        self.resync = true;
        self.read_pos().store(write, Ordering::Release);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn region(len: usize) -> Vec<u64> {
        vec![0u64; len / 8]
    }

    #[test]
    fn a_sender_that_died_while_publishing_is_followed_without_losing_unread_records() {
        let mut mem = region(HEADER + 4096);
        let base = mem.as_mut_ptr() as *mut u8;
        let mut tx = unsafe { Ring::init(base, HEADER + 4096, 1) };
        let mut rx = unsafe { Ring::open(base, HEADER + 4096) }.unwrap();
        let mut out = Vec::new();
        for i in 0..3u8 {
            assert!(tx.push(&[i; 10]));
        }
        tx.publish();
        assert!(rx.pop(&mut out).unwrap());
        assert_eq!(out, [0; 10]);
        // Two more records written; the sender dies after storing write_seq
        // and before storing write_pos.
        assert!(tx.push(&[3; 10]));
        assert!(tx.push(&[4; 10]));
        tx.write_seq().store(tx.seq, Ordering::Relaxed);
        // A new sender process maps the ring again.
        let mut tx = unsafe { Ring::open(base, HEADER + 4096) }.unwrap();
        assert!(tx.push(&[9; 10]));
        tx.publish();
        let mut got = Vec::new();
        while rx.pop(&mut out).expect("no record taken for damage") {
            got.push(out[0]);
        }
        assert_eq!(got, [1, 2, 9]);
    }

    #[test]
    fn wraps_many_times_with_a_small_ring_and_never_overwrites_unread_records() {
        let mut mem = region(HEADER + 4096);
        let base = mem.as_mut_ptr() as *mut u8;
        let mut tx = unsafe { Ring::init(base, HEADER + 4096, 1) };
        let mut rx = unsafe { Ring::open(base, HEADER + 4096) }.unwrap();
        let mut out = Vec::new();
        let mut sent = 0u64;
        let mut got = 0u64;
        // 100,000 records of varied sizes through 4 KiB: about 500 laps.
        while got < 100_000 {
            while sent < 100_000 {
                let n = (sent % 97) as usize + 1;
                let payload: Vec<u8> = (0..n).map(|i| (sent as usize + i) as u8).collect();
                if !tx.push(&payload) {
                    break; // full: the receiver has not read enough
                }
                sent += 1;
            }
            tx.publish();
            while rx.pop(&mut out).unwrap() {
                let n = (got % 97) as usize + 1;
                let want: Vec<u8> = (0..n).map(|i| (got as usize + i) as u8).collect();
                assert_eq!(out, want, "record {got}");
                got += 1;
            }
        }
        assert!(!rx.pop(&mut out).unwrap());
    }

    #[test]
    fn unpublished_records_are_invisible_and_full_is_refused() {
        let mut mem = region(HEADER + 1024);
        let base = mem.as_mut_ptr() as *mut u8;
        let mut tx = unsafe { Ring::init(base, HEADER + 1024, 1) };
        let mut rx = unsafe { Ring::open(base, HEADER + 1024) }.unwrap();
        assert!(tx.push(b"hello"));
        let mut out = Vec::new();
        assert!(!rx.pop(&mut out).unwrap(), "not published yet");
        tx.publish();
        assert!(rx.pop(&mut out).unwrap());
        assert_eq!(out, b"hello");
        let big = vec![7u8; 500];
        assert!(tx.push(&big));
        assert!(!tx.push(&big), "the second would overwrite unread bytes");
        assert!(!tx.push(&vec![0u8; 2000]), "larger than the ring");
    }

    #[test]
    fn random_bytes_in_the_ring_are_refused_without_a_panic() {
        // A bounded version of fuzz/fuzz_targets/ring_records.rs.
        let mut rng = crate::log::storage::SplitMix(7);
        let len = HEADER + 1024;
        let mut out = Vec::new();
        for _ in 0..20_000 {
            let mut mem = region(len);
            let base = mem.as_mut_ptr() as *mut u8;
            let _ = unsafe { Ring::init(base, len, 1) };
            let bytes = unsafe { std::slice::from_raw_parts_mut(base, len) };
            for b in &mut bytes[64..136] {
                *b = rng.next_u64() as u8;
            }
            for b in &mut bytes[HEADER..] {
                *b = rng.next_u64() as u8;
            }
            // Half the time, positions that pass the open checks.
            if rng.next_u64() % 2 == 0 {
                let read = rng.next_u64() % 100_000;
                let write = read + rng.next_u64() % 1025;
                bytes[READ_POS..READ_POS + 8].copy_from_slice(&read.to_le_bytes());
                bytes[WRITE_POS..WRITE_POS + 8].copy_from_slice(&write.to_le_bytes());
            }
            if let Ok(mut r) = unsafe { Ring::open(base, len) } {
                for _ in 0..8 {
                    if !matches!(r.pop(&mut out), Ok(true)) {
                        break;
                    }
                }
                let _ = r.push(b"after");
            }
        }
    }

    #[test]
    fn a_stale_or_damaged_record_is_refused() {
        let mut mem = region(HEADER + 1024);
        let base = mem.as_mut_ptr() as *mut u8;
        let mut tx = unsafe { Ring::init(base, HEADER + 1024, 1) };
        let mut rx = unsafe { Ring::open(base, HEADER + 1024) }.unwrap();
        assert!(tx.push(b"first"));
        tx.publish();
        let mut out = Vec::new();
        assert!(rx.pop(&mut out).unwrap());
        // A record from the previous lap: same place, old sequence number.
        let mut old = Ring {
            base,
            capacity: 1024,
            seq: 0,
            pending: 24,
            resync: false,
        };
        assert!(old.push(b"stale"));
        old.publish();
        assert_eq!(
            rx.pop(&mut out),
            Err(RingError::Sequence { want: 1, got: 0 })
        );
        rx.reset_reader();
        // A flipped payload byte.
        let mut tx2 = Ring {
            base,
            capacity: 1024,
            seq: 1,
            pending: 48,
            resync: false,
        };
        assert!(tx2.push(b"third"));
        unsafe { *base.add(HEADER + 48 + REC_HEADER) ^= 1 };
        tx2.publish();
        assert_eq!(rx.pop(&mut out), Err(RingError::Checksum(1)));
        let _ = tx;
        assert!(unsafe { Ring::open(base.add(8), 1024) }.is_err());
    }

    /// A write position no writer reaches is an error, not "nothing yet":
    /// the ring would otherwise say it is ready forever and keep its
    /// reader's loop from sleeping. After the reset it is quiet.
    #[test]
    fn an_impossible_write_position_is_an_error_and_the_reset_quiets_it() {
        let mut mem = region(HEADER + 1024);
        let base = mem.as_mut_ptr() as *mut u8;
        let _tx = unsafe { Ring::init(base, HEADER + 1024, 1) };
        let mut rx = unsafe { Ring::open(base, HEADER + 1024) }.unwrap();
        let bad = u64::MAX / 2 + 7;
        unsafe {
            std::ptr::copy_nonoverlapping(bad.to_le_bytes().as_ptr(), base.add(WRITE_POS), 8)
        };
        assert!(rx.ready());
        let mut out = Vec::new();
        assert_eq!(rx.pop(&mut out), Err(RingError::Position(bad)));
        rx.reset_reader();
        assert!(!rx.ready());
        assert_eq!(rx.pop(&mut out), Ok(false));
    }
}
