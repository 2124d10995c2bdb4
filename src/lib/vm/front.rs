//! One replica's side of a replicated VM: its TAP device and the stream to
//! its QEMU, with bounded queues both ways.
//!
//! * Inbound (TAP → VM): on the leader, frames read from the TAP device are
//!   proposed to the engine; every replica writes a frame to its VM once it
//!   is committed ([`VmFront::to_vm`]). With early delivery the leader
//!   writes it as it proposes it ([`VmFront::give`]) and holds back what
//!   its VM sends until that input is committed ([`VmFront::commit_to`]):
//!   the VM works while the replicas agree, and nothing it says leaves the
//!   host before the input it may depend on is on a majority.
//! * Outbound (VM → TAP): the leader's VM's frames go out through the TAP
//!   device at once (or once committed, see above); a backup's are counted
//!   and dropped.

use std::collections::VecDeque;
use std::io::{self, Read, Write};
use std::os::fd::AsRawFd;

use super::tap::Tap;
use super::translate::Translator;
use super::{FRAME_MAX, FrameReader, encode};
use crate::capture::{Frame, PcapWriter};

/// Bytes queued for one VM at most; beyond, committed frames are dropped
/// (and counted) as a congested switch would, so one slow VM cannot stall
/// the replica's loop.
pub const VM_QUEUE_MAX: usize = 4 << 20;

/// The sender's MAC and IPv4 address of a frame a guest sent (IPv4 or ARP).
fn identity(frame: &[u8]) -> Option<([u8; 6], [u8; 4])> {
    if frame.len() >= 34 && frame[12..14] == [0x08, 0x00] && frame[14] >> 4 == 4 {
        Some((
            frame[6..12].try_into().expect("6"),
            frame[26..30].try_into().expect("4"),
        ))
    } else if frame.len() >= 42 && frame[12..14] == [0x08, 0x06] {
        Some((
            frame[22..28].try_into().expect("6"),
            frame[28..32].try_into().expect("4"),
        ))
    } else {
        None
    }
}

/// Counters an operator wants to see.
#[derive(Clone, Copy, Debug, Default, serde::Serialize)]
pub struct VmStats {
    /// Frames read from the TAP device (on the leader: proposed).
    pub tap_in: u64,
    /// Frames read from the TAP device while not the leader (dropped).
    pub tap_in_ignored: u64,
    /// Committed frames written to the VM.
    pub to_vm: u64,
    /// Committed frames dropped because the VM did not read fast enough.
    pub to_vm_dropped: u64,
    /// Frames from the VM sent out through the TAP device (leader).
    pub from_vm: u64,
    /// Frames from the VM dropped because this replica is a backup.
    pub from_vm_dropped: u64,
    /// Frames the TAP device would not take (queue full or no carrier).
    pub tap_out_dropped: u64,
    /// Leader, early delivery: frames written to the VM before they committed.
    pub given_early: u64,
    /// Leader, early delivery: frames from the VM that waited for a commit
    /// before going out.
    pub held_for_commit: u64,
    /// Frames from the VM dropped while they waited: this replica stopped
    /// leading before the input they may depend on committed.
    pub held_dropped: u64,
    /// Time spent translating TCP flows (ns), both ways.
    pub translate_ns: u64,
    /// Frames looked at by the translation, both ways.
    pub translated: u64,
}

/// The TAP device and the VM's stream.
pub struct VmFront {
    tap: Tap,
    /// The stream to QEMU (None while QEMU, started separately, is away).
    vm: Option<mio::net::UnixStream>,
    reader: FrameReader,
    out: Vec<u8>,
    buf: Vec<u8>,
    capture: Option<PcapWriter>,
    /// Per-flow TCP translation.
    translator: Translator,
    /// The guest's MAC and IPv4 address (from its frames).
    mac: Option<[u8; 6]>,
    ip: Option<[u8; 4]>,
    /// The op of the last frame given to the VM before it committed.
    given: u64,
    /// The replicas' commit point, as last told.
    committed: u64,
    /// Frames from the VM waiting for `committed` to reach their op.
    held: VecDeque<(u64, Vec<u8>)>,
    held_bytes: usize,
    /// Reading from the VM stopped: `held` is full.
    read_paused: bool,
    /// Counters.
    pub stats: VmStats,
}

impl VmFront {
    /// Wraps an open TAP device and the falcon end of the VM's stream.
    pub fn new(tap: Tap, vm: Option<mio::net::UnixStream>, capture: Option<PcapWriter>) -> VmFront {
        VmFront {
            tap,
            vm,
            reader: FrameReader::new(),
            out: Vec::new(),
            buf: vec![0; FRAME_MAX],
            capture,
            translator: Translator::new(),
            mac: None,
            ip: None,
            given: 0,
            committed: 0,
            held: VecDeque::new(),
            held_bytes: 0,
            read_paused: false,
            stats: VmStats::default(),
        }
    }

    /// The TAP device's name.
    pub fn tap_name(&self) -> &str {
        self.tap.name()
    }

    /// The descriptors to wait on: the TAP device's and the VM stream's.
    pub fn tap_fd(&self) -> std::os::fd::RawFd {
        self.tap.as_raw_fd()
    }

    /// The VM stream, to register with the event loop.
    pub fn vm_stream(&mut self) -> Option<&mut mio::net::UnixStream> {
        self.vm.as_mut()
    }

    /// Whether the stream to QEMU is there.
    pub fn connected(&self) -> bool {
        self.vm.is_some()
    }

    /// A (new) stream to QEMU; what was queued for the old one is dropped
    /// (a restarted QEMU is a fresh VM).
    pub fn attach(&mut self, vm: mio::net::UnixStream) {
        self.vm = Some(vm);
        self.out.clear();
        self.reader = FrameReader::new();
    }

    /// Frames wait for room in the VM's stream.
    pub fn wants_write(&self) -> bool {
        self.vm.is_some() && !self.out.is_empty()
    }

    /// The stream to QEMU went away: gives it back (to deregister).
    pub fn detach(&mut self) -> Option<mio::net::UnixStream> {
        self.out.clear();
        self.vm.take()
    }

    /// Reads up to `max` frames from the TAP device. The leader gets them
    /// (to propose); a backup's are counted and dropped. True if the device
    /// may have more.
    pub fn read_tap(
        &mut self,
        leader: bool,
        max: usize,
        out: &mut Vec<bytes::Bytes>,
    ) -> io::Result<bool> {
        for _ in 0..max {
            match self.tap.read_frame(&mut self.buf)? {
                None => return Ok(false),
                Some(0) => continue,
                Some(n) => {
                    if leader {
                        self.stats.tap_in += 1;
                        out.push(bytes::Bytes::copy_from_slice(&self.buf[..n]));
                    } else {
                        self.stats.tap_in_ignored += 1;
                    }
                }
            }
        }
        Ok(true)
    }

    /// Queues a committed frame for the VM (and the capture file) and writes
    /// what the stream takes now. A backup translates TCP flows first (and
    /// may hold a frame until its guest catches up).
    pub fn to_vm(&mut self, frame: &[u8], time_ns: u64, leader: bool) {
        if let Some(c) = &mut self.capture {
            c.write(&Frame {
                time_ns,
                bytes: frame.to_vec(),
            });
        }
        // The leader translates too: its offsets are 0 for flows opened under
        // it, and flows it joined as a backup keep their offsets.
        let _ = leader;
        let t = std::time::Instant::now();
        let frames = self.translator.inbound(frame.to_vec());
        self.stats.translate_ns += t.elapsed().as_nanos() as u64;
        self.stats.translated += 1;
        for f in frames {
            self.queue(&f);
        }
        let _ = self.flush_vm();
    }

    /// Early delivery (leader): writes the frame proposed at `op` to the
    /// VM now, before it commits. Until the commit point reaches `op`, what
    /// the VM sends waits ([`VmFront::commit_to`]).
    pub fn give(&mut self, op: u64, frame: &[u8], time_ns: u64) {
        self.given = self.given.max(op);
        self.stats.given_early += 1;
        self.to_vm(frame, time_ns, true);
    }

    /// The replicas committed up to `op`: frames from the VM that waited for
    /// it go out. True if reading from the VM stopped for want of room and
    /// may go on now.
    pub fn commit_to(&mut self, op: u64) -> io::Result<bool> {
        self.committed = self.committed.max(op);
        while self.held.front().is_some_and(|h| h.0 <= self.committed) {
            let (_, frame) = self.held.pop_front().expect("checked");
            self.held_bytes -= frame.len();
            self.send_out(&frame)?;
        }
        Ok(std::mem::take(&mut self.read_paused) && self.held_bytes < VM_QUEUE_MAX)
    }

    /// This replica stopped leading: what its VM said after input that has
    /// not committed never leaves the host.
    pub fn drop_held(&mut self) -> bool {
        self.stats.held_dropped += self.held.len() as u64;
        self.held.clear();
        self.held_bytes = 0;
        std::mem::take(&mut self.read_paused)
    }

    /// A frame from the leader's VM, out through the TAP device.
    fn send_out(&mut self, frame: &[u8]) -> io::Result<()> {
        if self.tap.write_frame(frame)? {
            self.stats.from_vm += 1;
        } else {
            self.stats.tap_out_dropped += 1;
        }
        Ok(())
    }

    fn queue(&mut self, frame: &[u8]) {
        if self.out.len() + 4 + frame.len() > VM_QUEUE_MAX {
            self.stats.to_vm_dropped += 1;
            return;
        }
        encode(frame, &mut self.out);
        self.stats.to_vm += 1;
    }

    /// This replica just became the leader: its TAP device now carries the
    /// VM, so tell the network (a gratuitous ARP for the guest's address,
    /// learned from what the guest sent). False if the address is not known yet.
    pub fn announce(&mut self) -> io::Result<bool> {
        let (Some(mac), Some(ip)) = (self.mac, self.ip) else {
            return Ok(false);
        };
        let mut f = Vec::with_capacity(60);
        f.extend_from_slice(&[0xff; 6]);
        f.extend_from_slice(&mac);
        f.extend_from_slice(&[0x08, 0x06, 0, 1, 0x08, 0x00, 6, 4, 0, 1]);
        f.extend_from_slice(&mac);
        f.extend_from_slice(&ip);
        f.extend_from_slice(&[0; 6]);
        f.extend_from_slice(&ip);
        f.resize(60, 0);
        self.tap.write_frame(&f)
    }

    /// A backup's translation counters.
    pub fn translate_stats(&self) -> super::translate::TranslateStats {
        self.translator.stats
    }

    /// Writes queued frames to the VM as far as it takes them.
    pub fn flush_vm(&mut self) -> io::Result<()> {
        let mut done = 0;
        while done < self.out.len() {
            let Some(vm) = self.vm.as_mut() else {
                // No QEMU to write to: what is queued is lost with it.
                self.stats.to_vm_dropped += 1;
                self.out.clear();
                return Ok(());
            };
            match vm.write(&self.out[done..]) {
                Ok(0) => break,
                Ok(n) => done += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    self.out.drain(..done);
                    return Err(e);
                }
            }
        }
        self.out.drain(..done);
        Ok(())
    }

    /// Reads what the VM sent: the leader passes each frame to the TAP
    /// device, a backup counts and drops it. Errs when the stream closed or
    /// carried a frame it cannot hold (then the VM is not trusted further).
    pub fn from_vm(&mut self, leader: bool) -> io::Result<()> {
        loop {
            if self.held_bytes >= VM_QUEUE_MAX {
                // The VM waits (its socket fills) until the input commits.
                self.read_paused = true;
                break;
            }
            let Some(vm) = self.vm.as_mut() else {
                return Ok(());
            };
            match vm.read(&mut self.buf) {
                Ok(0) => {
                    return Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "the VM's network stream closed (QEMU exited?)",
                    ));
                }
                Ok(n) => {
                    let (reader, buf) = (&mut self.reader, &self.buf);
                    reader.feed(&buf[..n]);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
            self.drain_frames(leader)?;
        }
        self.drain_frames(leader)
    }

    fn drain_frames(&mut self, leader: bool) -> io::Result<()> {
        while let Some(frame) = self
            .reader
            .next_frame()
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, format!("from the VM: {e}")))?
        {
            // Learn how far our guest is (and release frames waiting for it).
            let t = std::time::Instant::now();
            let released = self.translator.outbound(frame);
            self.stats.translate_ns += t.elapsed().as_nanos() as u64;
            self.stats.translated += 1;
            if let Some((mac, ip)) = identity(frame).filter(|(_, ip)| *ip != [0; 4]) {
                self.mac = Some(mac);
                self.ip = Some(ip);
            }
            if leader {
                let mut out = frame.to_vec();
                let t = std::time::Instant::now();
                self.translator.rewrite_out(&mut out);
                self.stats.translate_ns += t.elapsed().as_nanos() as u64;
                if self.given > self.committed || !self.held.is_empty() {
                    // It may answer input that is not on a majority yet.
                    self.stats.held_for_commit += 1;
                    self.held_bytes += out.len();
                    self.held.push_back((self.given, out));
                } else {
                    self.send_out(&out)?;
                }
            } else {
                self.stats.from_vm_dropped += 1;
            }
            for f in released {
                if self.out.len() + 4 + f.len() > VM_QUEUE_MAX {
                    self.stats.to_vm_dropped += 1;
                } else {
                    encode(&f, &mut self.out);
                    self.stats.to_vm += 1;
                }
            }
        }
        if !self.out.is_empty() {
            self.flush_vm()?;
        }
        Ok(())
    }

    /// Flushes the capture file, if any; how many frames it holds.
    pub fn finish(self) -> Option<Result<u64, crate::capture::PcapError>> {
        self.capture.map(PcapWriter::finish)
    }
}
