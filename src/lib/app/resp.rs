//! `program_protocol = "resp"`: every client's commands go down one
//! pipelined connection to the program (Redis, Valkey, KeyDB…), in log
//! order, and the answers are split by reading Redis's protocol.
//!
//! With one connection per client (the default), a replica must wait for
//! the program's answer to one client before it hands another client's
//! command over, or a program could run them in another order on another
//! replica: one program round trip per command, one after the other. Down
//! one connection, the order is the connection's, so a whole batch of
//! committed commands goes in one write and its answers come back in one
//! read.
//!
//! The price: the program sees one client. Commands that keep state in
//! their connection (a database other than 0, transactions, blocking pops,
//! subscriptions, `CLIENT`, `HELLO`, `AUTH`) are answered by falcon with an
//! error that says so; the program never sees them. Everything here is a
//! function of the log alone, so every replica answers the same.

use std::collections::{HashMap, VecDeque};

/// Longest inline command (a line without `*`), as Redis allows.
const INLINE_MAX: usize = 64 << 10;
/// Most arguments in one command, as Redis allows.
const ARGS_MAX: i64 = 1024 * 1024;
/// Longest header line of an answer (`$<len>`, `*<count>`…).
const HEADER_MAX: usize = 64;

/// What the node does with the program's answers and with falcon's own.
#[derive(Debug, PartialEq, Eq)]
pub enum Delivery {
    /// Output for connection `conn` (an answer, or part of one).
    Reply {
        /// The connection.
        conn: u64,
        /// The bytes.
        bytes: Vec<u8>,
    },
    /// The log closed `conn` and every answer it was owed was delivered.
    Ended {
        /// The connection.
        conn: u64,
    },
    /// The client broke the protocol (or sent QUIT): after its answers so
    /// far, its connection is to be closed.
    CloseClient {
        /// The connection.
        conn: u64,
    },
}

/// One answer owed, in the order the program (or falcon) gives them.
#[derive(Debug)]
struct Owed {
    conn: u64,
    /// falcon's own answer; None: the program's next one.
    local: Option<&'static [u8]>,
    /// After it, the client's connection is closed.
    close: bool,
}

#[derive(Debug, Default)]
struct Conn {
    /// Input not yet a whole command.
    pending: Vec<u8>,
    /// Answers owed to it.
    owed: usize,
    /// Closed in the log: ends once nothing is owed.
    closed: bool,
    /// Broke the protocol: its further input is dropped.
    broken: bool,
}

/// The commands of every client, down one connection to the program.
#[derive(Debug)]
pub struct Mux {
    conns: HashMap<u64, Conn>,
    owed: VecDeque<Owed>,
    replies: ReplyScanner,
    /// The longest command accepted (its arguments and framing).
    max_command: usize,
}

impl Mux {
    /// A multiplexer that accepts commands of up to `max_command` bytes.
    pub fn new(max_command: usize) -> Mux {
        Mux {
            conns: HashMap::new(),
            owed: VecDeque::new(),
            replies: ReplyScanner::default(),
            max_command,
        }
    }

    /// Answers the program owes (it is busy while any are).
    pub fn outstanding(&self) -> usize {
        self.owed.iter().filter(|o| o.local.is_none()).count()
    }

    /// Answers owed in all (the program's and falcon's own).
    pub fn owed(&self) -> usize {
        self.owed.len()
    }

    /// The program restarts: nothing is owed and no client is known.
    pub fn clear(&mut self) {
        self.conns.clear();
        self.owed.clear();
        self.replies = ReplyScanner::default();
    }

    /// The log opened `conn`.
    pub fn open(&mut self, conn: u64) {
        self.conns.insert(conn, Conn::default());
    }

    /// The log holds `bytes` of `conn`'s input: its whole commands go to
    /// `to_program` (falcon's own answers, to `out`).
    pub fn data(
        &mut self,
        conn: u64,
        bytes: &[u8],
        to_program: &mut Vec<u8>,
        out: &mut Vec<Delivery>,
    ) {
        let Some(c) = self.conns.get_mut(&conn) else {
            return;
        };
        if c.broken || c.closed {
            return;
        }
        let mut input = std::mem::take(&mut c.pending);
        let buf: &[u8] = if input.is_empty() {
            bytes
        } else {
            input.extend_from_slice(bytes);
            &input
        };
        let mut at = 0;
        let mut owed = Vec::new();
        let mut broken = false;
        while at < buf.len() {
            match request(&buf[at..], self.max_command) {
                Request::Incomplete => break,
                Request::Empty(n) => at += n,
                Request::Command { len, verdict } => {
                    match verdict {
                        Verdict::Pass => {
                            to_program.extend_from_slice(&buf[at..at + len]);
                            owed.push((None, false));
                        }
                        Verdict::Answer(a) => owed.push((Some(a), false)),
                        Verdict::Quit => {
                            owed.push((Some(&b"+OK\r\n"[..]), true));
                            broken = true;
                        }
                    }
                    at += len;
                    if broken {
                        break;
                    }
                }
                Request::Bad(why) => {
                    owed.push((Some(why), true));
                    broken = true;
                    break;
                }
            }
        }
        let c = self.conns.get_mut(&conn).expect("checked");
        c.broken = broken;
        if !broken {
            let rest = &buf[at..];
            if rest.len() > self.max_command {
                owed.push((Some(TOO_LONG), true));
                c.broken = true;
            } else {
                c.pending = rest.to_vec();
            }
        }
        c.owed += owed.len();
        for (local, close) in owed {
            self.owed.push_back(Owed { conn, local, close });
        }
        self.deliver_local(out);
    }

    /// The log closed `conn`: what it is still owed is delivered as it
    /// comes (for the divergence check), then it ends.
    pub fn close(&mut self, conn: u64, out: &mut Vec<Delivery>) {
        let Some(c) = self.conns.get_mut(&conn) else {
            return;
        };
        c.closed = true;
        c.pending = Vec::new();
        if c.owed == 0 {
            self.conns.remove(&conn);
            out.push(Delivery::Ended { conn });
        }
    }

    /// The program wrote `bytes`: each answer goes to the connection it
    /// is owed to. An error if the program wrote something that is not an
    /// answer owed (its output no longer lines up: the node must stop).
    pub fn program_output(&mut self, bytes: &[u8], out: &mut Vec<Delivery>) -> Result<(), String> {
        let mut at = 0;
        while at < bytes.len() {
            let Some(o) = self.owed.front() else {
                return Err(format!(
                    "the program wrote {} bytes nobody asked for on falcon's shared connection: {:?}",
                    bytes.len() - at,
                    String::from_utf8_lossy(&bytes[at..bytes.len().min(at + 80)])
                ));
            };
            debug_assert!(o.local.is_none(), "local answers go at once");
            let conn = o.conn;
            let end = self.replies.scan(&bytes[at..])?;
            let upto = end.map_or(bytes.len(), |n| at + n);
            push_reply(out, conn, &bytes[at..upto]);
            at = upto;
            if end.is_some() {
                let o = self.owed.pop_front().expect("checked");
                self.answered(o, out);
                self.deliver_local(out);
            }
        }
        Ok(())
    }

    /// falcon's own answers at the front of the queue go now.
    fn deliver_local(&mut self, out: &mut Vec<Delivery>) {
        while let Some(a) = self.owed.front().and_then(|o| o.local) {
            let conn = self.owed.front().expect("checked").conn;
            push_reply(out, conn, a);
            let o = self.owed.pop_front().expect("checked");
            self.answered(o, out);
        }
    }

    fn answered(&mut self, o: Owed, out: &mut Vec<Delivery>) {
        if o.close {
            out.push(Delivery::CloseClient { conn: o.conn });
        }
        if let Some(c) = self.conns.get_mut(&o.conn) {
            c.owed -= 1;
            if c.owed == 0 && c.closed {
                self.conns.remove(&o.conn);
                out.push(Delivery::Ended { conn: o.conn });
            }
        }
    }
}

/// Adds `bytes` for `conn`, joined to the last delivery if it is `conn`'s.
fn push_reply(out: &mut Vec<Delivery>, conn: u64, bytes: &[u8]) {
    if bytes.is_empty() {
        return;
    }
    if let Some(Delivery::Reply { conn: c, bytes: b }) = out.last_mut() {
        if *c == conn {
            b.extend_from_slice(bytes);
            return;
        }
    }
    out.push(Delivery::Reply {
        conn,
        bytes: bytes.to_vec(),
    });
}

/// What is to be done with one command.
#[derive(Debug, PartialEq, Eq)]
enum Verdict {
    /// The program runs it.
    Pass,
    /// falcon answers it (the program never sees it).
    Answer(&'static [u8]),
    /// QUIT: +OK, then the connection closes.
    Quit,
}

/// One request at the front of a client's input.
#[derive(Debug, PartialEq, Eq)]
enum Request {
    /// Not whole yet.
    Incomplete,
    /// An empty line or an empty array: Redis skips it without an answer.
    Empty(usize),
    /// A whole command of `len` bytes.
    Command { len: usize, verdict: Verdict },
    /// Not Redis's protocol: this answer, then the connection closes.
    Bad(&'static [u8]),
}

const TOO_LONG: &[u8] =
    b"-ERR Protocol error: command longer than falcon's limits.client_buffer\r\n";

/// Splits one request off the front of `buf` (not empty).
fn request(buf: &[u8], max: usize) -> Request {
    if buf[0] != b'*' {
        return inline(buf);
    }
    let Some((count, mut at)) = header(buf) else {
        return if buf.len() > HEADER_MAX {
            Request::Bad(b"-ERR Protocol error: invalid multibulk length\r\n")
        } else {
            Request::Incomplete
        };
    };
    let Some(count) = count else {
        return Request::Bad(b"-ERR Protocol error: invalid multibulk length\r\n");
    };
    if count <= 0 {
        return Request::Empty(at);
    }
    if count > ARGS_MAX {
        return Request::Bad(b"-ERR Protocol error: invalid multibulk length\r\n");
    }
    let mut args: [&[u8]; 2] = [&[]; 2];
    let mut block = false;
    for i in 0..count as usize {
        let rest = &buf[at..];
        if rest.is_empty() {
            return Request::Incomplete;
        }
        if rest[0] != b'$' {
            return Request::Bad(b"-ERR Protocol error: expected '$'\r\n");
        }
        let Some((len, n)) = header(rest) else {
            return if rest.len() > HEADER_MAX {
                Request::Bad(b"-ERR Protocol error: invalid bulk length\r\n")
            } else {
                Request::Incomplete
            };
        };
        let len = match len {
            Some(l) if l >= 0 && (l as usize) <= max => l as usize,
            Some(l) if l >= 0 => return Request::Bad(TOO_LONG),
            _ => return Request::Bad(b"-ERR Protocol error: invalid bulk length\r\n"),
        };
        if at + n + len > max {
            return Request::Bad(TOO_LONG);
        }
        if rest.len() < n + len + 2 {
            return Request::Incomplete;
        }
        let arg = &rest[n..n + len];
        if &rest[n + len..n + len + 2] != b"\r\n" {
            return Request::Bad(b"-ERR Protocol error: bulk string not followed by CRLF\r\n");
        }
        if let Some(slot) = args.get_mut(i) {
            *slot = arg;
        }
        if i > 0 && arg.eq_ignore_ascii_case(b"block") {
            block = true;
        }
        at += n + len + 2;
    }
    Request::Command {
        len: at,
        verdict: verdict(args[0], args[1], count, block),
    }
}

/// A command written as a line of words (`PING`, from telnet).
fn inline(buf: &[u8]) -> Request {
    let Some(nl) = buf.iter().position(|&b| b == b'\n') else {
        return if buf.len() > INLINE_MAX {
            Request::Bad(b"-ERR Protocol error: too big inline request\r\n")
        } else {
            Request::Incomplete
        };
    };
    let line = &buf[..nl];
    let mut words = line
        .split(|b| b.is_ascii_whitespace())
        .filter(|w| !w.is_empty());
    let Some(name) = words.next() else {
        return Request::Empty(nl + 1);
    };
    if line.iter().any(|&b| b == b'"' || b == b'\'') {
        // Redis's quoting rules are its own: rather than guess them, say so.
        return Request::Command {
            len: nl + 1,
            verdict: Verdict::Answer(
                b"-ERR falcon (program_protocol = \"resp\"): quoted inline commands are not supported; send the command in RESP (as redis-cli does)\r\n",
            ),
        };
    }
    let second = words.next().unwrap_or_default();
    let count = 1 + i64::from(!second.is_empty()) + words.clone().count() as i64;
    let block =
        words.any(|w| w.eq_ignore_ascii_case(b"block")) || second.eq_ignore_ascii_case(b"block");
    Request::Command {
        len: nl + 1,
        verdict: verdict(name, second, count, block),
    }
}

/// Whether the program may run command `name` (with first argument
/// `first`, `count` words in all, a `BLOCK` argument or not).
fn verdict(name: &[u8], first: &[u8], count: i64, block: bool) -> Verdict {
    let mut lower = [0u8; 16];
    if name.len() > lower.len() {
        return Verdict::Pass;
    }
    let lower = &mut lower[..name.len()];
    lower.copy_from_slice(name);
    lower.make_ascii_lowercase();
    match &*lower {
        b"select" if first == b"0" && count == 2 => Verdict::Answer(b"+OK\r\n"),
        b"select" => Verdict::Answer(
            b"-ERR falcon (program_protocol = \"resp\"): only database 0: every client shares one connection to the program, so SELECT would switch it for all\r\n",
        ),
        b"multi" | b"exec" | b"discard" | b"watch" | b"unwatch" => Verdict::Answer(
            b"-ERR falcon (program_protocol = \"resp\"): transactions (MULTI, EXEC, WATCH) are not supported: every client shares one connection to the program; use a Lua script (EVAL) or the default program_protocol = \"bytes\"\r\n",
        ),
        b"blpop" | b"brpop" | b"brpoplpush" | b"blmove" | b"blmpop" | b"bzpopmin"
        | b"bzpopmax" | b"bzmpop" | b"wait" | b"waitaof" => Verdict::Answer(
            b"-ERR falcon (program_protocol = \"resp\"): blocking commands are not supported: one would hold every client's commands behind it\r\n",
        ),
        b"xread" | b"xreadgroup" if block => Verdict::Answer(
            b"-ERR falcon (program_protocol = \"resp\"): XREAD with BLOCK is not supported: it would hold every client's commands behind it\r\n",
        ),
        b"subscribe" | b"psubscribe" | b"ssubscribe" | b"unsubscribe" | b"punsubscribe"
        | b"sunsubscribe" | b"monitor" | b"sync" | b"psync" | b"replconf" => Verdict::Answer(
            b"-ERR falcon (program_protocol = \"resp\"): subscriptions, MONITOR and replication commands are not supported: their output is not an answer to one command\r\n",
        ),
        b"client" | b"hello" | b"auth" | b"reset" | b"readonly" | b"readwrite" | b"asking" => {
            Verdict::Answer(
                b"-ERR falcon (program_protocol = \"resp\"): connection commands (CLIENT, HELLO, AUTH, RESET) are not supported: every client shares one connection to the program\r\n",
            )
        }
        b"quit" => Verdict::Quit,
        _ => Verdict::Pass,
    }
}

/// A header line at the front of `buf` (`*3\r\n`, `$5\r\n`): its number
/// (None if it is not one) and its length with the CRLF; None if the line
/// is not whole.
fn header(buf: &[u8]) -> Option<(Option<i64>, usize)> {
    let nl = buf.iter().take(HEADER_MAX).position(|&b| b == b'\n')?;
    let text = buf[1..nl].strip_suffix(b"\r").unwrap_or(&buf[1..nl]);
    let n = std::str::from_utf8(text)
        .ok()
        .and_then(|t| t.parse::<i64>().ok());
    Some((n, nl + 1))
}

/// Finds where each answer in the program's output ends, across reads:
/// the scanner keeps only the header line it is in and what the open
/// arrays still hold, never an answer's bytes.
#[derive(Debug, Default)]
struct ReplyScanner {
    /// A header line read in part.
    line: Vec<u8>,
    /// In a line whose text does not matter (`+OK`, `-ERR …`, `:12`).
    skipping_line: bool,
    /// Bytes of a bulk string (and its CRLF) still to come.
    bulk: u64,
    /// Open aggregates: elements each still holds, and whether it is an
    /// attribute (which annotates the value after it rather than being one).
    open: Vec<(u64, bool)>,
}

impl ReplyScanner {
    /// Reads `bytes`: Some(n) if an answer ends after its first n bytes,
    /// None if all of them belong to an answer not yet whole.
    fn scan(&mut self, bytes: &[u8]) -> Result<Option<usize>, String> {
        let mut at = 0;
        while at < bytes.len() {
            if self.bulk > 0 {
                let n = (self.bulk as usize).min(bytes.len() - at);
                self.bulk -= n as u64;
                at += n;
                if self.bulk == 0 && self.value_done() {
                    return Ok(Some(at));
                }
                continue;
            }
            let rest = &bytes[at..];
            let nl = rest.iter().position(|&b| b == b'\n');
            if self.skipping_line || (self.line.is_empty() && is_line_type(rest[0])) {
                let Some(nl) = nl else {
                    self.skipping_line = true;
                    return Ok(None);
                };
                self.skipping_line = false;
                at += nl + 1;
                if self.value_done() {
                    return Ok(Some(at));
                }
                continue;
            }
            let take = nl.map_or(rest.len(), |n| n + 1);
            if self.line.len() + take > HEADER_MAX {
                return Err(format!(
                    "the program's answer is not Redis's protocol (a header line longer than {HEADER_MAX} bytes: {:?})",
                    String::from_utf8_lossy(&self.line)
                ));
            }
            self.line.extend_from_slice(&rest[..take]);
            at += take;
            if nl.is_none() {
                return Ok(None);
            }
            let line = std::mem::take(&mut self.line);
            if self.header(&line)? {
                return Ok(Some(at));
            }
        }
        Ok(None)
    }

    /// A whole header line (a value that carries a length or a count):
    /// whether an answer ended with it.
    fn header(&mut self, line: &[u8]) -> Result<bool, String> {
        let kind = line[0];
        let text = line[1..].strip_suffix(b"\n").unwrap_or(&line[1..]);
        let text = text.strip_suffix(b"\r").unwrap_or(text);
        let n: i64 = std::str::from_utf8(text)
            .ok()
            .and_then(|t| t.parse().ok())
            .ok_or_else(|| {
                format!(
                    "the program's answer is not Redis's protocol: {:?}",
                    String::from_utf8_lossy(line)
                )
            })?;
        match kind {
            // Bulk strings, bulk errors, verbatim strings.
            b'$' | b'!' | b'=' => {
                if n < 0 {
                    return Ok(self.value_done());
                }
                self.bulk = n as u64 + 2;
                Ok(false)
            }
            b'*' | b'~' | b'%' | b'|' => {
                let count = if matches!(kind, b'%' | b'|') {
                    n.saturating_mul(2)
                } else {
                    n
                };
                if count <= 0 {
                    if kind == b'|' {
                        return Ok(false);
                    }
                    return Ok(self.value_done());
                }
                self.open.push((count as u64, kind == b'|'));
                Ok(false)
            }
            b'>' => Err(
                "the program sent a push message (RESP3) on falcon's shared connection".to_string(),
            ),
            _ => Err(format!(
                "the program's answer is not Redis's protocol: {:?}",
                String::from_utf8_lossy(line)
            )),
        }
    }

    /// A value ended: whether that ends an answer.
    fn value_done(&mut self) -> bool {
        while let Some((left, attribute)) = self.open.last_mut() {
            *left -= 1;
            if *left > 0 {
                return false;
            }
            let attribute = *attribute;
            self.open.pop();
            if attribute {
                // The annotated value comes next, at the same level.
                return false;
            }
        }
        true
    }
}

/// Types whose whole value is one line.
fn is_line_type(b: u8) -> bool {
    matches!(b, b'+' | b'-' | b':' | b'_' | b',' | b'#' | b'(')
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cmd(args: &[&str]) -> Vec<u8> {
        let mut v = format!("*{}\r\n", args.len()).into_bytes();
        for a in args {
            v.extend_from_slice(format!("${}\r\n{a}\r\n", a.len()).as_bytes());
        }
        v
    }

    fn replies(out: &[Delivery]) -> Vec<(u64, String)> {
        out.iter()
            .filter_map(|d| match d {
                Delivery::Reply { conn, bytes } => {
                    Some((*conn, String::from_utf8_lossy(bytes).into_owned()))
                }
                _ => None,
            })
            .collect()
    }

    #[test]
    fn requests_are_split_whole_and_only_whole() {
        let set = cmd(&["SET", "k", "v\r\nv"]);
        for cut in 0..set.len() {
            assert_eq!(
                request(&set[..cut.max(1)], 1 << 20),
                Request::Incomplete,
                "{cut}"
            );
        }
        assert_eq!(
            request(&set, 1 << 20),
            Request::Command {
                len: set.len(),
                verdict: Verdict::Pass
            }
        );
        assert_eq!(request(b"*0\r\n", 100), Request::Empty(4));
        assert_eq!(request(b"  \r\n", 100), Request::Empty(4));
        assert!(matches!(request(b"*x\r\n", 100), Request::Bad(_)));
        assert!(matches!(request(b"*1\r\n:1\r\n", 100), Request::Bad(_)));
        assert!(matches!(request(b"*1\r\n$1\r\nabc", 100), Request::Bad(_)));
        assert!(
            matches!(request(&cmd(&["SET", "k", &"v".repeat(200)]), 100), Request::Bad(b) if b == TOO_LONG)
        );
        assert_eq!(
            request(b"ping\r\n", 100),
            Request::Command {
                len: 6,
                verdict: Verdict::Pass
            }
        );
        assert!(matches!(
            request(b"set k \"a b\"\r\n", 100),
            Request::Command {
                verdict: Verdict::Answer(_),
                ..
            }
        ));
    }

    #[test]
    fn state_holding_commands_are_answered_by_falcon() {
        let v = |args: &[&str]| match request(&cmd(args), 1 << 20) {
            Request::Command { verdict, .. } => verdict,
            r => panic!("{r:?}"),
        };
        assert_eq!(v(&["select", "0"]), Verdict::Answer(b"+OK\r\n"));
        for refused in [
            &["SELECT", "1"][..],
            &["MULTI"],
            &["exec"],
            &["WATCH", "k"],
            &["BLPOP", "l", "0"],
            &["SUBSCRIBE", "c"],
            &["CLIENT", "SETNAME", "x"],
            &["HELLO", "3"],
            &["XREAD", "BLOCK", "0", "STREAMS", "s", "$"],
        ] {
            assert!(
                matches!(v(refused), Verdict::Answer(a) if a.starts_with(b"-ERR falcon")),
                "{refused:?}"
            );
        }
        for passed in [
            &["XREAD", "STREAMS", "s", "0"][..],
            &["GET", "block"],
            &["EVAL", "return 1", "0"],
        ] {
            assert_eq!(v(passed), Verdict::Pass, "{passed:?}");
        }
        assert_eq!(v(&["QUIT"]), Verdict::Quit);
    }

    #[test]
    fn answers_are_found_across_any_cut() {
        let answers: &[&[u8]] = &[
            b"+OK\r\n",
            b"-ERR wrong\r\n",
            b":42\r\n",
            b"$-1\r\n",
            b"$5\r\nab\r\nc\r\n",
            b"*-1\r\n",
            b"*0\r\n",
            b"*3\r\n$1\r\na\r\n*2\r\n:1\r\n$0\r\n\r\n+x\r\n",
            b"%1\r\n+k\r\n*1\r\n_\r\n",
            b"|1\r\n+ttl\r\n:3\r\n$2\r\nhi\r\n",
        ];
        let all: Vec<u8> = answers.concat();
        let want: Vec<usize> = answers
            .iter()
            .scan(0, |s, a| {
                *s += a.len();
                Some(*s)
            })
            .collect();
        // Every way of cutting the stream in two, and byte by byte.
        for cut in 0..=all.len() {
            let mut s = ReplyScanner::default();
            let mut ends = Vec::new();
            for (base, part) in [(0, &all[..cut]), (cut, &all[cut..])] {
                let mut at = 0;
                while at < part.len() {
                    match s.scan(&part[at..]).unwrap() {
                        Some(n) => {
                            at += n;
                            ends.push(base + at);
                        }
                        None => break,
                    }
                }
            }
            assert_eq!(ends, want, "cut at {cut}");
        }
        let mut s = ReplyScanner::default();
        let mut ends = Vec::new();
        for (i, b) in all.iter().enumerate() {
            if s.scan(std::slice::from_ref(b)).unwrap().is_some() {
                ends.push(i + 1);
            }
        }
        assert_eq!(ends, want);
        assert!(ReplyScanner::default().scan(b"?what\r\n").is_err());
        assert!(ReplyScanner::default().scan(b">2\r\n").is_err());
        assert!(ReplyScanner::default().scan(&[b'$'; 100]).is_err());
    }

    #[test]
    fn the_mux_keeps_log_order_and_routes_every_answer() {
        let mut m = Mux::new(1 << 20);
        let (mut prog, mut out) = (Vec::new(), Vec::new());
        m.open(1);
        m.open(2);
        // Client 1's SET arrives in two pieces; client 2's GET in between
        // goes first, whole.
        let set = cmd(&["SET", "k", "v"]);
        m.data(1, &set[..7], &mut prog, &mut out);
        assert!(prog.is_empty());
        m.data(2, &cmd(&["GET", "k"]), &mut prog, &mut out);
        m.data(1, &set[7..], &mut prog, &mut out);
        assert_eq!(prog, [cmd(&["GET", "k"]), set.clone()].concat());
        // Refused while answers are owed: it waits its turn.
        m.data(2, &cmd(&["MULTI"]), &mut prog, &mut out);
        assert!(out.is_empty());
        assert_eq!(m.outstanding(), 2);
        m.program_output(b"$-1\r\n+O", &mut out).unwrap();
        m.program_output(b"K\r\n", &mut out).unwrap();
        let r = replies(&out);
        assert_eq!(r[0], (2, "$-1\r\n".into()));
        // (An answer split across reads reaches its client as it comes.)
        assert_eq!(r[1], (1, "+OK\r\n".into()));
        assert!(r[2].0 == 2 && r[2].1.starts_with("-ERR falcon"));
        assert_eq!(m.owed(), 0);
        // With nothing owed, falcon's answer goes at once.
        out.clear();
        m.data(1, &cmd(&["SELECT", "0"]), &mut prog, &mut out);
        assert_eq!(replies(&out), [(1, "+OK\r\n".into())]);
        // A close waits for what is owed; garbage closes the client.
        out.clear();
        m.data(1, &cmd(&["INCR", "n"]), &mut prog, &mut out);
        m.close(1, &mut out);
        assert!(out.is_empty());
        m.program_output(b":1\r\n", &mut out).unwrap();
        assert_eq!(
            out,
            [
                Delivery::Reply {
                    conn: 1,
                    bytes: b":1\r\n".to_vec()
                },
                Delivery::Ended { conn: 1 }
            ]
        );
        out.clear();
        m.data(2, b"*1\r\n:x\r\n", &mut prog, &mut out);
        assert!(
            matches!(&out[0], Delivery::Reply { conn: 2, bytes } if bytes.starts_with(b"-ERR Protocol error"))
        );
        assert_eq!(out[1], Delivery::CloseClient { conn: 2 });
        // An answer nobody is owed means the connection no longer lines up.
        assert!(m.program_output(b"+OK\r\n", &mut out).is_err());
    }
}
