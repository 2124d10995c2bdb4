//! The host's TAP device, opened through `/dev/net/tun` with
//! `TUNSETIFF` (`IFF_TAP | IFF_NO_PI`: every read is one Ethernet frame,
//! with no packet-information header).

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;

/// `_IOW('T', 202, int)`.
const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
const IFF_TAP: libc::c_short = 0x0002;
const IFF_NO_PI: libc::c_short = 0x1000;

/// `struct ifreq` with the `ifr_flags` member of its union.
#[repr(C)]
struct IfReq {
    name: [u8; libc::IFNAMSIZ],
    flags: libc::c_short,
    _pad: [u8; 22],
}

/// An open TAP device (non-blocking).
pub struct Tap {
    file: File,
    name: String,
}

fn exists(name: &str) -> bool {
    std::path::Path::new("/sys/class/net").join(name).exists()
}

impl Tap {
    /// Attaches to the TAP device `name`. With `create`, a missing one is
    /// made (it lives as long as this handle) and brought up; without, a
    /// missing one is an error that says how to make it.
    pub fn open(name: &str, create: bool) -> io::Result<Tap> {
        if name.is_empty() || name.len() >= libc::IFNAMSIZ || name.contains('/') {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "{name:?} is not an interface name (1 to {} bytes, no '/')",
                    libc::IFNAMSIZ - 1
                ),
            ));
        }
        let existed = exists(name);
        if !existed && !create {
            return Err(io::Error::new(
                io::ErrorKind::NotFound,
                format!(
                    "no network interface {name}: create it (ip tuntap add dev {name} mode tap; ip link set {name} up) or pass --create"
                ),
            ));
        }
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
            .open("/dev/net/tun")
            .map_err(|e| io::Error::new(e.kind(), format!("opening /dev/net/tun: {e}")))?;
        let mut req = IfReq {
            name: [0; libc::IFNAMSIZ],
            flags: IFF_TAP | IFF_NO_PI,
            _pad: [0; 22],
        };
        req.name[..name.len()].copy_from_slice(name.as_bytes());
        // SAFETY: TUNSETIFF reads and writes one struct ifreq.
        let rc = unsafe { libc::ioctl(file.as_raw_fd(), TUNSETIFF, &mut req as *mut IfReq) };
        if rc < 0 {
            let e = io::Error::last_os_error();
            let hint = match e.raw_os_error() {
                Some(libc::EINVAL) => " (is it a TUN device, or a TAP opened with other flags?)",
                Some(libc::EPERM) => " (needs CAP_NET_ADMIN, or a TAP device owned by this user)",
                Some(libc::EBUSY) => " (another process has it open)",
                _ => "",
            };
            return Err(io::Error::new(
                e.kind(),
                format!("attaching to TAP device {name}: {e}{hint}"),
            ));
        }
        if !existed {
            set_up(name)?;
        }
        Ok(Tap {
            file,
            name: name.to_string(),
        })
    }

    /// A stand-in for a TAP device in tests: any descriptor that reads and
    /// writes one frame per call (a SOCK_SEQPACKET socket).
    #[cfg(test)]
    pub(crate) fn from_file(file: File, name: &str) -> Tap {
        Tap {
            file,
            name: name.to_string(),
        }
    }

    /// The interface's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Reads one frame into `buf` (which must hold [`super::FRAME_MAX`]
    /// bytes); None when none is waiting.
    pub fn read_frame(&mut self, buf: &mut [u8]) -> io::Result<Option<usize>> {
        match self.file.read(buf) {
            Ok(n) => Ok(Some(n)),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(None),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Writes one frame; false when the device's queue is full (the frame
    /// is dropped, as a switch would).
    pub fn write_frame(&mut self, frame: &[u8]) -> io::Result<bool> {
        match self.file.write(frame) {
            Ok(_) => Ok(true),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(false),
            // No carrier (nobody on the interface's other side, or it is down): dropped.
            Err(e) if e.raw_os_error() == Some(libc::EIO) => Ok(false),
            // A frame the device does not take (shorter than an Ethernet
            // header, longer than its MTU): that frame is dropped.
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => Ok(false),
            Err(e) => Err(e),
        }
    }
}

impl AsRawFd for Tap {
    fn as_raw_fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }
}

/// Brings interface `name` up (SIOCSIFFLAGS with IFF_UP).
fn set_up(name: &str) -> io::Result<()> {
    // SAFETY: a plain datagram socket for the interface ioctls, closed below.
    let s = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if s < 0 {
        return Err(io::Error::last_os_error());
    }
    let mut req = IfReq {
        name: [0; libc::IFNAMSIZ],
        flags: 0,
        _pad: [0; 22],
    };
    req.name[..name.len()].copy_from_slice(name.as_bytes());
    // SAFETY: SIOCGIFFLAGS/SIOCSIFFLAGS read and write one struct ifreq.
    let rc = unsafe {
        let mut rc = libc::ioctl(s, libc::SIOCGIFFLAGS, &mut req as *mut IfReq);
        if rc == 0 {
            req.flags |= libc::IFF_UP as libc::c_short;
            rc = libc::ioctl(s, libc::SIOCSIFFLAGS, &mut req as *mut IfReq);
        }
        rc
    };
    let err = io::Error::last_os_error();
    // SAFETY: the socket opened above.
    unsafe { libc::close(s) };
    if rc < 0 {
        return Err(io::Error::new(
            err.kind(),
            format!("bringing {name} up: {err}"),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_names_and_missing_devices_are_clear_errors() {
        let e = Tap::open("", false).err().expect("empty name");
        assert!(e.to_string().contains("not an interface name"), "{e}");
        let e = Tap::open("a/b", true).err().expect("slash");
        assert!(e.to_string().contains("not an interface name"), "{e}");
        let e = Tap::open("falcon-nosuch0", false).err().expect("missing");
        assert!(
            e.to_string().contains("ip tuntap add dev falcon-nosuch0"),
            "{e}"
        );
    }
}
