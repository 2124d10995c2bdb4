//! `falcon tap-attach`: a QEMU virtual machine replicated by ordering its
//! inbound Ethernet frames.
//!
//! * [`tap`]: the host's TAP device, opened by falcon itself.
//! * [`FrameReader`] / [`encode`]: QEMU's `-netdev stream` framing — each
//!   frame is a 4-byte big-endian length, then the raw Ethernet frame.

pub mod front;
pub mod tap;
pub mod translate;

/// The longest frame accepted from QEMU or the TAP device (64 KiB of
/// payload plus headers: what virtio-net with TSO can hand over).
pub const FRAME_MAX: usize = 69_632;

/// A problem in a stream of frames.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    /// A length prefix over [`FRAME_MAX`] (or zero): the stream cannot be trusted after it.
    #[error("a frame of {0} bytes announced (the limit is {FRAME_MAX}, and 0 is not a frame)")]
    BadLength(usize),
}

/// Appends `frame` with its 4-byte big-endian length to `out`.
pub fn encode(frame: &[u8], out: &mut Vec<u8>) {
    out.extend_from_slice(&(frame.len() as u32).to_be_bytes());
    out.extend_from_slice(frame);
}

/// Cuts a byte stream into frames.
#[derive(Default, Debug)]
pub struct FrameReader {
    buf: Vec<u8>,
    at: usize,
}

impl FrameReader {
    /// A reader with nothing buffered.
    pub fn new() -> FrameReader {
        FrameReader::default()
    }

    /// Adds bytes read from the stream.
    pub fn feed(&mut self, bytes: &[u8]) {
        if self.at > 0 && self.at == self.buf.len() {
            self.buf.clear();
            self.at = 0;
        }
        self.buf.extend_from_slice(bytes);
    }

    /// Bytes buffered and not yet returned as frames.
    pub fn pending(&self) -> usize {
        self.buf.len() - self.at
    }

    /// The next whole frame, if there is one.
    pub fn next_frame(&mut self) -> Result<Option<&[u8]>, FrameError> {
        let rest = &self.buf[self.at..];
        if rest.len() < 4 {
            self.compact();
            return Ok(None);
        }
        let len = u32::from_be_bytes(rest[..4].try_into().expect("4 bytes")) as usize;
        if len == 0 || len > FRAME_MAX {
            return Err(FrameError::BadLength(len));
        }
        if rest.len() < 4 + len {
            self.compact();
            return Ok(None);
        }
        let start = self.at + 4;
        self.at = start + len;
        Ok(Some(&self.buf[start..start + len]))
    }

    fn compact(&mut self) {
        if self.at > 0 {
            self.buf.drain(..self.at);
            self.at = 0;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_come_out_whole_whatever_the_reads() {
        let frames: Vec<Vec<u8>> = (1..=50).map(|n| vec![n as u8; n * 37]).collect();
        let mut stream = Vec::new();
        for f in &frames {
            encode(f, &mut stream);
        }
        for chunk in [1, 3, 4, 5, 64, 1000, stream.len()] {
            let mut r = FrameReader::new();
            let mut got = Vec::new();
            for piece in stream.chunks(chunk) {
                r.feed(piece);
                while let Some(f) = r.next_frame().unwrap() {
                    got.push(f.to_vec());
                }
            }
            assert_eq!(got, frames, "reads of {chunk} bytes");
            assert_eq!(r.pending(), 0);
        }
    }

    #[test]
    fn an_oversized_or_empty_frame_is_refused() {
        let mut r = FrameReader::new();
        r.feed(&((FRAME_MAX + 1) as u32).to_be_bytes());
        assert_eq!(r.next_frame(), Err(FrameError::BadLength(FRAME_MAX + 1)));
        let mut r = FrameReader::new();
        r.feed(&[0, 0, 0, 0]);
        assert_eq!(r.next_frame(), Err(FrameError::BadLength(0)));
        let mut r = FrameReader::new();
        let mut s = Vec::new();
        encode(&vec![7; FRAME_MAX], &mut s);
        r.feed(&s);
        assert_eq!(r.next_frame().unwrap().map(<[u8]>::len), Some(FRAME_MAX));
    }
}
