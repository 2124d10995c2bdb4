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
/// Reads of the VM's stream in one turn of the loop (of up to
/// [`FRAME_MAX`] bytes each); the rest waits for the next turn.
const VM_READS_PER_TURN: usize = 64;

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
    /// The last [`VmFront::from_vm`] stopped at its budget with the stream
    /// perhaps not empty: read again without waiting for an event.
    pub more: bool,
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
            more: false,
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
        // Not a frame QEMU's stream can carry (a log record may hold more):
        // QEMU would drop the connection, on every replica, at every replay.
        if frame.is_empty() || frame.len() > super::FRAME_MAX {
            self.stats.to_vm_dropped += 1;
            return;
        }
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

    /// The replicas committed (and this replica checked) up to `op`: frames
    /// from the VM that waited for it go out. Says whether reading from the
    /// VM stopped for want of room and may go on now, and the first error
    /// the TAP device gave (those frames are counted as dropped).
    pub fn commit_to(&mut self, op: u64) -> (bool, Option<io::Error>) {
        self.committed = self.committed.max(op);
        let mut error = None;
        while self.held.front().is_some_and(|h| h.0 <= self.committed) {
            let (_, frame) = self.held.pop_front().expect("checked");
            self.held_bytes -= frame.len();
            if let Err(e) = self.send_out(&frame) {
                self.stats.tap_out_dropped += 1;
                error.get_or_insert(e);
            }
        }
        let resume = self.read_paused && self.held_bytes < VM_QUEUE_MAX;
        if resume {
            self.read_paused = false;
        }
        (resume, error)
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
        self.more = false;
        let mut reads = 0;
        loop {
            if reads == VM_READS_PER_TURN {
                // A guest that keeps its stream full cannot hold the loop.
                self.more = true;
                break;
            }
            reads += 1;
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
            // Learn how far our guest is (and release frames waiting for it);
            // the leader's frame goes out in the numbering its clients know.
            let t = std::time::Instant::now();
            let released = self.translator.outbound(frame);
            let out = leader.then(|| {
                let mut out = frame.to_vec();
                self.translator.rewrite_out(&mut out);
                out
            });
            self.stats.translate_ns += t.elapsed().as_nanos() as u64;
            self.stats.translated += 1;
            if let Some((mac, ip)) = identity(frame).filter(|(_, ip)| *ip != [0; 4]) {
                self.mac = Some(mac);
                self.ip = Some(ip);
            }
            // Frames released for the guest first: a failure to send the
            // guest's frame out must not lose them.
            for f in released {
                self.queue(&f);
            }
            if let Some(out) = out {
                // (Held frames are tagged with `given`, which only grows, and
                // go as soon as `committed` reaches it: none is held here
                // unless `given` is ahead.)
                if self.given > self.committed {
                    // It may answer input that is not on a majority yet.
                    self.stats.held_for_commit += 1;
                    self.held_bytes += out.len();
                    self.held.push_back((self.given, out));
                } else if let Err(e) = self.send_out(&out) {
                    self.stats.tap_out_dropped += 1;
                    return Err(e);
                }
            } else {
                self.stats.from_vm_dropped += 1;
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixStream;

    /// A VmFront whose TAP device is one end of a SEQPACKET pair and whose
    /// QEMU is one end of a stream pair; the other ends, to play the
    /// network and the VM.
    fn front() -> (VmFront, std::fs::File, UnixStream) {
        let mut fds = [0; 2];
        // SAFETY: socketpair fills two descriptors that we own from here on.
        let rc = unsafe {
            libc::socketpair(
                libc::AF_UNIX,
                libc::SOCK_SEQPACKET | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
                0,
                fds.as_mut_ptr(),
            )
        };
        assert_eq!(rc, 0, "{}", io::Error::last_os_error());
        // SAFETY: fresh descriptors, each owned by one File.
        let (tap, net) = unsafe {
            use std::os::fd::FromRawFd;
            (
                std::fs::File::from_raw_fd(fds[0]),
                std::fs::File::from_raw_fd(fds[1]),
            )
        };
        let (ours, qemu) = UnixStream::pair().unwrap();
        ours.set_nonblocking(true).unwrap();
        qemu.set_nonblocking(true).unwrap();
        let vm = VmFront::new(
            Tap::from_file(tap, "test0"),
            Some(mio::net::UnixStream::from_std(ours)),
            None,
        );
        (vm, net, qemu)
    }

    /// An Ethernet frame that is not IPv4 (nothing to translate), tagged.
    fn frame(tag: u8, len: usize) -> Vec<u8> {
        let mut f = vec![tag; len.max(60)];
        f[12..14].copy_from_slice(&[0x88, 0xb5]);
        f
    }

    /// Frames waiting on the network side, in order.
    fn out_on_net(net: &mut std::fs::File) -> Vec<Vec<u8>> {
        let mut got = Vec::new();
        let mut buf = vec![0; FRAME_MAX];
        while let Ok(n) = net.read(&mut buf) {
            got.push(buf[..n].to_vec());
        }
        got
    }

    /// What QEMU sends: frames in the stream's framing.
    fn qemu_sends(qemu: &mut UnixStream, frames: &[Vec<u8>]) {
        let mut bytes = Vec::new();
        for f in frames {
            encode(f, &mut bytes);
        }
        qemu.write_all(&bytes).unwrap();
    }

    #[test]
    fn the_leaders_vm_answer_waits_for_the_commit_of_what_it_was_given_early() {
        let (mut vm, mut net, mut qemu) = front();
        vm.give(7, &frame(1, 60), 0);
        // The VM has the frame before it committed …
        let mut got = vec![0; 64];
        qemu.read_exact(&mut got).unwrap();
        assert_eq!(&got[4..], &frame(1, 60)[..]);
        // … and its answer waits for op 7.
        qemu_sends(&mut qemu, &[frame(2, 60)]);
        vm.from_vm(true).unwrap();
        assert!(
            out_on_net(&mut net).is_empty(),
            "an answer left before its input committed"
        );
        let (resume, err) = vm.commit_to(6);
        assert!(!resume && err.is_none());
        assert!(
            out_on_net(&mut net).is_empty(),
            "released at op 6 for input at op 7"
        );
        vm.commit_to(7);
        assert_eq!(out_on_net(&mut net), vec![frame(2, 60)]);
        // Nothing outstanding: the next answer goes at once.
        qemu_sends(&mut qemu, &[frame(3, 60)]);
        vm.from_vm(true).unwrap();
        assert_eq!(out_on_net(&mut net), vec![frame(3, 60)]);
        assert_eq!((vm.stats.given_early, vm.stats.held_for_commit), (1, 1));
    }

    #[test]
    fn a_deposed_leaders_held_answers_never_leave() {
        let (mut vm, mut net, mut qemu) = front();
        vm.give(3, &frame(1, 60), 0);
        qemu_sends(&mut qemu, &[frame(2, 60), frame(4, 60)]);
        vm.from_vm(true).unwrap();
        vm.drop_held();
        vm.commit_to(3);
        assert!(out_on_net(&mut net).is_empty());
        assert_eq!(vm.stats.held_dropped, 2);
    }

    #[test]
    fn reading_from_the_vm_stops_when_held_answers_fill_the_queue_and_goes_on_once_released() {
        let (mut vm, mut net, qemu) = front();
        vm.give(5, &frame(1, 60), 0);
        // QEMU sends more than the queue holds, in 32 KiB frames.
        let frames: Vec<Vec<u8>> = (0..(VM_QUEUE_MAX / 32768 + 8))
            .map(|i| frame(i as u8, 32768))
            .collect();
        let writer = {
            let frames = frames.clone();
            let mut qemu = qemu.try_clone().unwrap();
            qemu.set_nonblocking(false).unwrap();
            std::thread::spawn(move || {
                for f in &frames {
                    let mut b = Vec::new();
                    encode(f, &mut b);
                    qemu.write_all(&b).unwrap();
                }
            })
        };
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
        while !vm.read_paused {
            vm.from_vm(true).unwrap();
            assert!(std::time::Instant::now() < deadline, "reading never paused");
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        assert!(vm.held_bytes >= VM_QUEUE_MAX);
        assert!(out_on_net(&mut net).is_empty());
        // A commit below the held answers' op releases nothing, and reading stays paused …
        assert!(!vm.commit_to(4).0);
        assert!(
            vm.read_paused,
            "the pause was forgotten while the queue is still full"
        );
        // … until they go: then the caller is told to read again.
        let mut released = 0;
        let (resume, _) = vm.commit_to(5);
        assert!(resume);
        released += out_on_net(&mut net).len();
        // Read the rest (the network side drains as it goes).
        while released + (vm.stats.tap_out_dropped as usize) < frames.len() {
            vm.from_vm(true).unwrap();
            released += out_on_net(&mut net).len();
            assert!(std::time::Instant::now() < deadline, "the rest never came");
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        writer.join().unwrap();
        assert!(released > 0);
        assert_eq!(released + vm.stats.tap_out_dropped as usize, frames.len());
    }
}
