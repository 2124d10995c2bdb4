//! What divergence detection hashes of a program's output: the bytes as
//! written, or — for a protocol whose servers put per-process values in
//! their answers — a canonical form of them.
//!
//! PostgreSQL (`divergence_protocol = "postgres"`) answers every new
//! connection with its backend's pid and a random cancel key
//! (BackendKeyData), and names pids in the details of errors such as
//! "deadlock detected" and in notifications. Copies that agree on every row
//! still differ there, so the normalizer zeroes the key data and the
//! notification's pid, and keeps of an error or notice only its severity,
//! SQLSTATE code and message. Everything else passes as written. The
//! canonical stream is what chunk offsets count.

/// The protocols a replica's output can be normalized for.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    /// Compare the bytes as written.
    #[default]
    Bytes,
    /// PostgreSQL's wire protocol (v3), server to client.
    Postgres,
}

impl Protocol {
    /// Parses the cluster file's name for it.
    pub fn from_name(s: &str) -> Option<Protocol> {
        match s {
            "bytes" => Some(Protocol::Bytes),
            "postgres" | "postgresql" => Some(Protocol::Postgres),
            _ => None,
        }
    }

    /// A fresh normalizer for one connection.
    pub fn start(self) -> Normalizer {
        Normalizer(match self {
            Protocol::Bytes => Inner::Bytes,
            Protocol::Postgres => Inner::Postgres(Pg::Start),
        })
    }
}

/// Error and notice messages longer than this pass as written (not buffered).
const PG_NOTICE_MAX: usize = 64 << 10;

/// One connection's normalizer.
pub struct Normalizer(Inner);

enum Inner {
    /// As written.
    Bytes,
    /// PostgreSQL.
    Postgres(Pg),
}

/// Where a PostgreSQL stream is.
enum Pg {
    /// Before the first message: single-byte answers to SSLRequest or
    /// GSSENCRequest may come first.
    Start,
    /// Reading a message's type and length.
    Header { buf: [u8; 5], have: usize },
    /// Inside a message body: `left` bytes to go.
    Body {
        kind: u8,
        left: usize,
        /// Bytes of the body seen so far (for masking by position).
        seen: usize,
        /// An error or notice, kept whole to rewrite it.
        keep: Option<Vec<u8>>,
    },
    /// Not (or no longer) the plain protocol: TLS, or bytes that do not parse.
    Pass,
}

impl Normalizer {
    /// Turns `input`, the next bytes of the output, into the canonical
    /// stream, appended to `out`. Returns `input` itself when nothing
    /// changes (no copy).
    pub fn feed<'a>(&mut self, input: &'a [u8], out: &'a mut Vec<u8>) -> &'a [u8] {
        match &mut self.0 {
            Inner::Bytes => input,
            Inner::Postgres(pg) => {
                out.clear();
                pg.feed(input, out);
                out
            }
        }
    }
}

impl Pg {
    fn feed(&mut self, mut input: &[u8], out: &mut Vec<u8>) {
        while !input.is_empty() {
            match self {
                Pg::Pass => {
                    out.extend_from_slice(input);
                    return;
                }
                Pg::Start => match input[0] {
                    // SSLRequest or GSSENCRequest refused: one byte, then the protocol.
                    b'N' => {
                        out.push(b'N');
                        input = &input[1..];
                    }
                    // Accepted: TLS follows, which cannot be read here.
                    b'S' | b'G' => *self = Pg::Pass,
                    _ => {
                        *self = Pg::Header {
                            buf: [0; 5],
                            have: 0,
                        }
                    }
                },
                Pg::Header { buf, have } => {
                    let n = (5 - *have).min(input.len());
                    buf[*have..*have + n].copy_from_slice(&input[..n]);
                    *have += n;
                    input = &input[n..];
                    if *have < 5 {
                        return;
                    }
                    let (kind, buf) = (buf[0], *buf);
                    let len = u32::from_be_bytes([buf[1], buf[2], buf[3], buf[4]]) as usize;
                    if len < 4 {
                        out.extend_from_slice(&buf);
                        *self = Pg::Pass;
                        continue;
                    }
                    let left = len - 4;
                    let keep = matches!(kind, b'E' | b'N') && left <= PG_NOTICE_MAX;
                    if !keep {
                        out.extend_from_slice(&buf);
                    }
                    *self = Pg::Body {
                        kind,
                        left,
                        seen: 0,
                        keep: keep.then(Vec::new),
                    };
                    self.end_if_done(out);
                }
                Pg::Body {
                    kind,
                    left,
                    seen,
                    keep,
                } => {
                    let n = (*left).min(input.len());
                    let (now, rest) = input.split_at(n);
                    match (keep, *kind) {
                        (Some(k), _) => k.extend_from_slice(now),
                        // BackendKeyData: pid and cancel key.
                        (None, b'K') => out.extend(std::iter::repeat_n(0, n)),
                        // NotificationResponse: the notifying backend's pid first.
                        (None, b'A') => {
                            for (i, &b) in now.iter().enumerate() {
                                out.push(if *seen + i < 4 { 0 } else { b });
                            }
                        }
                        _ => out.extend_from_slice(now),
                    }
                    *left -= n;
                    *seen += n;
                    input = rest;
                    self.end_if_done(out);
                }
            }
        }
    }

    /// At the end of a body: writes a kept error or notice in canonical form
    /// and goes on to the next message.
    fn end_if_done(&mut self, out: &mut Vec<u8>) {
        let Pg::Body {
            kind,
            left: 0,
            keep,
            ..
        } = self
        else {
            return;
        };
        if let Some(body) = keep.take() {
            // Fields: a type byte and a NUL-terminated string each, then a NUL.
            let mut canon = Vec::with_capacity(body.len());
            let mut rest = &body[..];
            while let Some((&field, more)) = rest.split_first() {
                if field == 0 {
                    break;
                }
                let end = more.iter().position(|&b| b == 0).unwrap_or(more.len());
                if matches!(field, b'S' | b'V' | b'C' | b'M') {
                    canon.push(field);
                    canon.extend_from_slice(&more[..end]);
                    canon.push(0);
                }
                rest = more.get(end + 1..).unwrap_or(&[]);
            }
            canon.push(0);
            out.push(*kind);
            out.extend_from_slice(&((canon.len() + 4) as u32).to_be_bytes());
            out.extend_from_slice(&canon);
        }
        *self = Pg::Header {
            buf: [0; 5],
            have: 0,
        };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(kind: u8, body: &[u8]) -> Vec<u8> {
        let mut m = vec![kind];
        m.extend_from_slice(&((body.len() + 4) as u32).to_be_bytes());
        m.extend_from_slice(body);
        m
    }

    fn error(detail: &str) -> Vec<u8> {
        let mut b = Vec::new();
        for (f, v) in [
            (b'S', "ERROR"),
            (b'V', "ERROR"),
            (b'C', "40P01"),
            (b'M', "deadlock detected"),
            (b'D', detail),
            (b'F', "deadlock.c"),
        ] {
            b.push(f);
            b.extend_from_slice(v.as_bytes());
            b.push(0);
        }
        b.push(0);
        msg(b'E', &b)
    }

    /// A session as a server writes it, with per-process values `pid`.
    fn session(pid: u32) -> Vec<u8> {
        let mut s = vec![b'N'];
        s.extend(msg(b'R', &0u32.to_be_bytes()));
        s.extend(msg(b'S', b"TimeZone\0UTC\0"));
        let mut key = pid.to_be_bytes().to_vec();
        key.extend_from_slice(&(pid.wrapping_mul(2_654_435_761)).to_be_bytes());
        s.extend(msg(b'K', &key));
        s.extend(msg(b'Z', b"I"));
        s.extend(msg(b'D', b"\0\x01\0\0\0\x031234"));
        s.extend(error(&format!(
            "Process {pid} waits for ShareLock on transaction 7; blocked by process {}.",
            pid + 1
        )));
        let mut note = pid.to_be_bytes().to_vec();
        note.extend_from_slice(b"chan\0payload\0");
        s.extend(msg(b'A', &note));
        s.extend(msg(b'Z', b"I"));
        s
    }

    fn canon(bytes: &[u8], step: usize) -> Vec<u8> {
        let mut n = Protocol::Postgres.start();
        let (mut all, mut scratch) = (Vec::new(), Vec::new());
        for piece in bytes.chunks(step) {
            all.extend_from_slice(n.feed(piece, &mut scratch));
        }
        all
    }

    #[test]
    fn per_process_values_vanish_and_the_rest_stays() {
        let (a, b) = (session(4242), session(99_999));
        assert_ne!(a, b);
        let ca = canon(&a, 7);
        assert_eq!(ca, canon(&b, 3));
        assert_eq!(ca, canon(&a, 1));
        assert_eq!(ca, canon(&a, a.len()));
        // Rows and messages are kept: a different row or error code differs.
        let row = String::from_utf8_lossy(&ca).into_owned();
        assert!(row.contains("1234") && row.contains("deadlock detected") && row.contains("40P01"));
        assert!(!row.contains("Process"));
        let mut c = session(4242);
        let at = c.windows(4).position(|w| w == b"1234").unwrap();
        c[at] = b'9';
        assert_ne!(canon(&c, 5), ca);
    }

    #[test]
    fn tls_and_garbage_pass_as_written() {
        let tls = b"S\x16\x03\x01 whatever".to_vec();
        assert_eq!(canon(&tls, 2), tls);
        let junk = b"Q\0\0\0\x01rest of it".to_vec(); // a length under 4
        assert_eq!(canon(&junk, 3), junk);
        let mut plain = Protocol::Bytes.start();
        let mut scratch = Vec::new();
        assert_eq!(plain.feed(b"as is", &mut scratch), b"as is");
    }

    #[test]
    fn a_huge_error_is_not_buffered() {
        let big = error(&"x".repeat(PG_NOTICE_MAX + 10));
        assert_eq!(canon(&big, 4096), big);
    }
}
