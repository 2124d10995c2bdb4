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
//! their connection (a database other than 0, WATCH, blocking pops,
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
/// Deepest nesting of aggregates in an answer (arrays in arrays…) that is
/// followed (16 bytes of memory a level). Redis's replies nest a few levels,
/// but a Lua script's table nests as deep as Lua's C stack lets it (about
/// 8,000 levels) before Redis cuts it with an error inside: far more than
/// that is not Redis.
const NESTING_MAX: usize = 1 << 20;

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
    /// The program's answer goes to nobody (the `+OK` and `+QUEUED`s of a
    /// transaction falcon already answered).
    swallow: bool,
}

impl Owed {
    fn local(conn: u64, answer: &'static [u8]) -> Owed {
        Owed {
            conn,
            local: Some(answer),
            close: false,
            swallow: false,
        }
    }

    fn program(conn: u64, swallow: bool) -> Owed {
        Owed {
            conn,
            local: None,
            close: false,
            swallow,
        }
    }

    fn closing(conn: u64, answer: &'static [u8]) -> Owed {
        Owed {
            close: true,
            ..Owed::local(conn, answer)
        }
    }
}

/// A transaction under way (MULTI, before EXEC): its commands wait in
/// falcon, answered `+QUEUED`, and go to the program in one block at EXEC.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
struct Multi {
    /// The queued commands, in canonical form.
    queued: Vec<u8>,
    count: usize,
    /// A command was refused while queuing: EXEC fails, as in Redis.
    aborted: bool,
}

#[derive(Debug, Default)]
struct Conn {
    /// Input not yet a whole command (from the start of that command).
    pending: Vec<u8>,
    /// How far the command in `pending` was read.
    scan: Scan,
    /// Answers owed to it.
    owed: usize,
    /// Closed in the log: ends once nothing is owed.
    closed: bool,
    /// Broke the protocol: its further input is dropped.
    broken: bool,
    /// A transaction under way.
    multi: Option<Multi>,
}

impl Conn {
    /// Bytes it holds (counted in [`Mux`]'s `pending`): its unfinished
    /// command and its queued transaction.
    fn held(&self) -> usize {
        self.pending.len() + self.multi.as_ref().map_or(0, |m| m.queued.len())
    }
}

/// The commands of every client, down one connection to the program.
#[derive(Debug)]
pub struct Mux {
    conns: HashMap<u64, Conn>,
    owed: VecDeque<Owed>,
    replies: ReplyScanner,
    /// The longest command accepted (its arguments and framing).
    max_command: usize,
    /// Most bytes of unfinished commands, all clients together.
    max_pending: usize,
    /// Bytes of unfinished commands now.
    pending: usize,
}

impl Mux {
    /// A multiplexer that accepts commands of up to `max_command` bytes,
    /// and holds at most `max_pending` bytes of unfinished ones in all.
    pub fn new(max_command: usize, max_pending: usize) -> Mux {
        Mux {
            conns: HashMap::new(),
            owed: VecDeque::new(),
            replies: ReplyScanner::default(),
            max_command,
            max_pending,
            pending: 0,
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

    /// No client is in the middle of a command or about to be closed for
    /// breaking the protocol.
    #[cfg(test)]
    fn whole(&self) -> bool {
        self.pending == 0 && self.conns.values().all(|c| !c.broken)
    }

    /// The program restarts: nothing is owed and no client is known.
    pub fn clear(&mut self) {
        self.conns.clear();
        self.owed.clear();
        self.replies = ReplyScanner::default();
        self.pending = 0;
    }

    /// The state a snapshot must carry beside the program's: each client's
    /// unfinished command, and which clients broke the protocol (their
    /// later input is dropped). Empty when there is none.
    pub fn export(&self) -> Vec<u8> {
        let mut conns: Vec<(&u64, &Conn)> = self
            .conns
            .iter()
            .filter(|(_, c)| c.broken || !c.pending.is_empty() || c.multi.is_some())
            .collect();
        if conns.is_empty() {
            return Vec::new();
        }
        conns.sort_by_key(|(id, _)| **id);
        let mut out = STATE_MAGIC.to_vec();
        for (id, c) in conns {
            out.extend_from_slice(&id.to_le_bytes());
            let m = c.multi.as_ref();
            out.push(
                u8::from(c.broken)
                    | u8::from(m.is_some()) << 1
                    | u8::from(m.is_some_and(|m| m.aborted)) << 2,
            );
            out.extend_from_slice(&(c.pending.len() as u64).to_le_bytes());
            out.extend_from_slice(&c.pending);
            let (count, queued) = m.map_or((0, &[][..]), |m| (m.count, &m.queued[..]));
            out.extend_from_slice(&(count as u64).to_le_bytes());
            out.extend_from_slice(&(queued.len() as u64).to_le_bytes());
            out.extend_from_slice(queued);
        }
        out
    }

    /// Takes back what [`Mux::export`] wrote, on a program restored from
    /// that snapshot (its connections opened again first).
    pub fn import(&mut self, state: &[u8]) -> Result<(), String> {
        let bad = || "not a falcon RESP state (from a snapshot)".to_string();
        let rest = state.strip_prefix(STATE_MAGIC).ok_or_else(bad)?;
        struct Cursor<'a>(&'a [u8]);
        impl<'a> Cursor<'a> {
            fn bytes(&mut self, n: u64) -> Option<&'a [u8]> {
                let n = usize::try_from(n).ok().filter(|&n| n <= self.0.len())?;
                let (part, rest) = self.0.split_at(n);
                self.0 = rest;
                Some(part)
            }
            fn u64(&mut self) -> Option<u64> {
                Some(u64::from_le_bytes(self.bytes(8)?.try_into().ok()?))
            }
        }
        let mut cur = Cursor(rest);
        let mut parsed = Vec::new();
        while !cur.0.is_empty() {
            let mut one = || {
                let id = cur.u64()?;
                let flags = cur.bytes(1)?[0];
                let len = cur.u64()?;
                let pending = cur.bytes(len)?.to_vec();
                let count = usize::try_from(cur.u64()?).ok()?;
                let qlen = cur.u64()?;
                let queued = cur.bytes(qlen)?.to_vec();
                // Every queued command takes bytes: a count past them is
                // not one falcon wrote (and would owe answers without end).
                if count as u64 > qlen {
                    return None;
                }
                let multi = (flags & 2 != 0).then_some(Multi {
                    queued,
                    count,
                    aborted: flags & 4 != 0,
                });
                Some((id, flags & 1 != 0, pending, multi))
            };
            let one = one().ok_or_else(bad)?;
            if !self.conns.contains_key(&one.0) {
                return Err(format!(
                    "the RESP state (from a snapshot) names connection {:#x}, which the snapshot does not hold open",
                    one.0
                ));
            }
            parsed.push(one);
        }
        for (id, broken, pending, multi) in parsed {
            let c = self.conns.entry(id).or_default();
            self.pending -= c.held();
            c.broken = broken;
            c.pending = pending;
            c.multi = multi;
            c.scan = Scan::default();
            self.pending += c.held();
        }
        Ok(())
    }

    /// The log opened `conn`.
    pub fn open(&mut self, conn: u64) {
        if let Some(old) = self.conns.insert(conn, Conn::default()) {
            self.pending -= old.held();
        }
    }

    /// The log holds `bytes` of `conn`'s input: its whole commands go to
    /// `to_program`, in Redis's canonical form (falcon's own answers, to
    /// `out`).
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
        let mut scan = std::mem::take(&mut c.scan);
        let mut input = std::mem::take(&mut c.pending);
        self.pending -= input.len();
        let buf: &[u8] = if input.is_empty() {
            bytes
        } else {
            input.extend_from_slice(bytes);
            &input
        };
        let mut at = 0;
        let mut owed: Vec<Owed> = Vec::new();
        let mut broken = false;
        let mut multi = self.conns.get_mut(&conn).and_then(|c| c.multi.take());
        let queued_before = multi.as_ref().map_or(0, |m| m.queued.len());
        while at < buf.len() {
            match request(&buf[at..], &mut scan, self.max_command) {
                Request::Incomplete => break,
                Request::Empty(n) => at += n,
                Request::Command {
                    len,
                    verdict,
                    encoded,
                } => {
                    let command = encoded.as_deref().unwrap_or(&buf[at..at + len]);
                    match (verdict, &mut multi) {
                        (Verdict::Quit, _) => {
                            owed.push(Owed::closing(conn, b"+OK\r\n"));
                            broken = true;
                        }
                        (Verdict::Multi, None) => {
                            multi = Some(Multi::default());
                            owed.push(Owed::local(conn, b"+OK\r\n"));
                        }
                        (Verdict::Multi, Some(_)) => {
                            owed.push(Owed::local(conn, b"-ERR MULTI calls can not be nested\r\n"))
                        }
                        (Verdict::Exec, None) => {
                            owed.push(Owed::local(conn, b"-ERR EXEC without MULTI\r\n"));
                        }
                        (Verdict::Discard, None) => {
                            owed.push(Owed::local(conn, b"-ERR DISCARD without MULTI\r\n"));
                        }
                        (Verdict::Discard, Some(_)) => {
                            multi = None;
                            owed.push(Owed::local(conn, b"+OK\r\n"));
                        }
                        (Verdict::Exec, Some(m)) if m.aborted => {
                            multi = None;
                            owed.push(Owed::local(
                                conn,
                                b"-EXECABORT Transaction discarded because of previous errors.\r\n",
                            ));
                        }
                        (Verdict::Exec, Some(m)) => {
                            // The whole transaction in one block: no other
                            // client's command comes between.
                            to_program.extend_from_slice(b"*1\r\n$5\r\nMULTI\r\n");
                            to_program.extend_from_slice(&m.queued);
                            to_program.extend_from_slice(b"*1\r\n$4\r\nEXEC\r\n");
                            for _ in 0..=m.count {
                                owed.push(Owed::program(conn, true));
                            }
                            owed.push(Owed::program(conn, false));
                            multi = None;
                        }
                        (Verdict::Pass, None) => {
                            to_program.extend_from_slice(command);
                            owed.push(Owed::program(conn, false));
                        }
                        // SELECT 0 runs in the transaction, as Redis would.
                        (Verdict::Pass | Verdict::Answer(b"+OK\r\n"), Some(m)) => {
                            m.queued.extend_from_slice(command);
                            m.count += 1;
                            owed.push(Owed::local(conn, b"+QUEUED\r\n"));
                        }
                        (Verdict::Answer(a), None) => owed.push(Owed::local(conn, a)),
                        (Verdict::Answer(a), Some(m)) => {
                            m.aborted = true;
                            owed.push(Owed::local(conn, a));
                        }
                    }
                    at += len;
                    if broken {
                        break;
                    }
                }
                Request::Bad(why) => {
                    owed.push(Owed::closing(conn, why));
                    broken = true;
                    break;
                }
            }
            scan = Scan::default();
        }
        // Queued commands count as unfinished input.
        let queued_now = multi.as_ref().map_or(0, |m| m.queued.len());
        self.pending = self.pending - queued_before + queued_now;
        let rest = &buf[at..];
        if !broken && self.pending + rest.len() > self.max_pending {
            owed.push(Owed::closing(conn, TOO_MUCH));
            broken = true;
        }
        let c = self.conns.get_mut(&conn).expect("checked");
        if broken {
            self.pending -= queued_now;
        } else {
            self.pending += rest.len();
            c.pending = rest.to_vec();
            c.scan = scan;
            c.multi = multi;
        }
        c.broken = broken;
        c.owed += owed.len();
        self.owed.extend(owed);
        self.deliver_local(out);
    }

    /// The log closed `conn`: what it is still owed is delivered as it
    /// comes (for the divergence check), then it ends.
    pub fn close(&mut self, conn: u64, out: &mut Vec<Delivery>) {
        let Some(c) = self.conns.get_mut(&conn) else {
            return;
        };
        c.closed = true;
        c.broken = false;
        self.pending -= c.held();
        c.pending = Vec::new();
        c.multi = None;
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
            let (conn, swallow) = (o.conn, o.swallow);
            let end = self.replies.scan(&bytes[at..])?;
            let upto = end.map_or(bytes.len(), |n| at + n);
            if !swallow {
                push_reply(out, conn, &bytes[at..upto]);
            }
            at = upto;
            if end.is_some() {
                let o = self.owed.pop_front().expect("checked");
                self.answered(o, out);
                self.deliver_local(out);
            }
        }
        Ok(())
    }

    /// The program's answer under way, if any, is whole: the connection
    /// may go without losing one.
    pub fn between_answers(&self) -> bool {
        self.replies.idle()
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
            c.owed = c.owed.saturating_sub(1);
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
    /// MULTI, EXEC, DISCARD: a transaction, queued in falcon.
    Multi,
    Exec,
    Discard,
}

/// One request at the front of a client's input.
#[derive(Debug, PartialEq, Eq)]
enum Request {
    /// Not whole yet.
    Incomplete,
    /// An empty line or an empty array: Redis skips it without an answer.
    Empty(usize),
    /// A whole command of `len` bytes; `encoded`: its canonical form when
    /// the input was not in it (an inline command).
    Command {
        len: usize,
        verdict: Verdict,
        encoded: Option<Vec<u8>>,
    },
    /// Not Redis's protocol (as falcon reads it, strictly): this answer,
    /// then the connection closes.
    Bad(&'static [u8]),
}

/// The first bytes of [`Mux::export`]'s state.
const STATE_MAGIC: &[u8] = b"falcon-resp-state 1\n";

const TOO_LONG: &[u8] =
    b"-ERR Protocol error: command longer than falcon's limits.client_buffer\r\n";
const TOO_MUCH: &[u8] = b"-ERR Protocol error: the unfinished commands of all clients together passed falcon's limits.program_backlog_bytes\r\n";
const BAD_COUNT: &[u8] = b"-ERR Protocol error: invalid multibulk length\r\n";
const BAD_LEN: &[u8] = b"-ERR Protocol error: invalid bulk length\r\n";

/// How far the command at the front of a connection's input was read
/// (offsets from its start), so that more input does not read it again.
#[derive(Debug, Default)]
struct Scan {
    /// Its arguments (None: the header not read yet).
    count: Option<usize>,
    /// The next argument's header (or, inline, where to look for the end
    /// of the line).
    at: usize,
    /// Arguments read.
    done: usize,
    /// The command's name and first argument.
    name: std::ops::Range<usize>,
    first: std::ops::Range<usize>,
    /// A BLOCK option (before any STREAMS).
    block: bool,
    streams: bool,
    /// Arguments still to pass over as names (XREADGROUP GROUP's two).
    names: u8,
}

impl Scan {
    /// Argument `arg` (at `range` of the command) was read.
    fn arg(&mut self, arg: &[u8], range: std::ops::Range<usize>) {
        match self.done {
            0 => self.name = range,
            1 => self.first = range,
            _ => {}
        }
        if self.names > 0 {
            self.names -= 1;
        } else if self.done == 1 && arg.eq_ignore_ascii_case(b"group") {
            self.names = 2;
        } else if self.done > 0 {
            if arg.eq_ignore_ascii_case(b"streams") {
                self.streams = true;
            } else if !self.streams && arg.eq_ignore_ascii_case(b"block") {
                self.block = true;
            }
        }
        self.done += 1;
    }
}

/// Splits one request off the front of `buf` (not empty), going on from
/// `scan`. falcon reads the protocol strictly (numbers as Redis writes
/// them, every line ended by CRLF), so what it passes on is canonical and
/// the program reads exactly the commands falcon read.
fn request(buf: &[u8], scan: &mut Scan, max: usize) -> Request {
    if buf[0] != b'*' {
        return inline(buf, scan);
    }
    let count = match scan.count {
        Some(n) => n,
        None => {
            let (n, len) = match header(buf) {
                Header::Incomplete => return Request::Incomplete,
                Header::Bad => return Request::Bad(BAD_COUNT),
                Header::Number(n, len) => (n, len),
            };
            if n <= 0 {
                return Request::Empty(len);
            }
            if n > ARGS_MAX {
                return Request::Bad(BAD_COUNT);
            }
            scan.count = Some(n as usize);
            scan.at = len;
            n as usize
        }
    };
    while scan.done < count {
        let rest = &buf[scan.at..];
        if rest.is_empty() {
            return Request::Incomplete;
        }
        if rest[0] != b'$' {
            return Request::Bad(b"-ERR Protocol error: expected '$'\r\n");
        }
        let (len, n) = match header(rest) {
            Header::Incomplete => return Request::Incomplete,
            Header::Bad => return Request::Bad(BAD_LEN),
            Header::Number(l, _) if l < 0 => return Request::Bad(BAD_LEN),
            Header::Number(l, n) => (l as u64, n),
        };
        if scan.at as u64 + n as u64 + len > max as u64 {
            return Request::Bad(TOO_LONG);
        }
        let len = len as usize;
        if rest.len() < n + len + 2 {
            return Request::Incomplete;
        }
        if &rest[n + len..n + len + 2] != b"\r\n" {
            return Request::Bad(b"-ERR Protocol error: bulk string not followed by CRLF\r\n");
        }
        let from = scan.at + n;
        scan.arg(&rest[n..n + len], from..from + len);
        scan.at += n + len + 2;
    }
    Request::Command {
        len: scan.at,
        verdict: verdict(
            &buf[scan.name.clone()],
            &buf[scan.first.clone()],
            count,
            scan.block,
        ),
        encoded: None,
    }
}

/// Blanks between the words of an inline command, as C's isspace (Redis's).
fn blank(b: u8) -> bool {
    matches!(b, b' ' | b'\t' | b'\n' | b'\r' | 0x0b | 0x0c)
}

/// A command written as a line of words (`PING`, from telnet): re-encoded
/// as an array of bulk strings.
fn inline(buf: &[u8], scan: &mut Scan) -> Request {
    let Some(nl) = buf[scan.at..].iter().position(|&b| b == b'\n') else {
        scan.at = buf.len();
        return if buf.len() > INLINE_MAX {
            Request::Bad(b"-ERR Protocol error: too big inline request\r\n")
        } else {
            Request::Incomplete
        };
    };
    let nl = scan.at + nl;
    let line = &buf[..nl];
    let words: Vec<&[u8]> = line
        .split(|&b| blank(b))
        .filter(|w| !w.is_empty())
        .collect();
    if words.is_empty() {
        return Request::Empty(nl + 1);
    }
    if line.iter().any(|&b| matches!(b, b'"' | b'\'' | 0)) {
        // Redis's quoting rules are its own: rather than guess them, say so.
        return Request::Command {
            len: nl + 1,
            verdict: Verdict::Answer(
                b"-ERR falcon (program_protocol = \"resp\"): inline commands with quotes are not supported; send the command in RESP (as redis-cli and client libraries do)\r\n",
            ),
            encoded: None,
        };
    }
    let mut encoded = format!("*{}\r\n", words.len()).into_bytes();
    for w in &words {
        encoded.extend_from_slice(format!("${}\r\n", w.len()).as_bytes());
        encoded.extend_from_slice(w);
        encoded.extend_from_slice(b"\r\n");
        scan.arg(w, 0..0);
    }
    Request::Command {
        len: nl + 1,
        verdict: verdict(
            words[0],
            words.get(1).copied().unwrap_or_default(),
            words.len(),
            scan.block,
        ),
        encoded: Some(encoded),
    }
}

/// Whether the program may run command `name` (with first argument
/// `first`, `count` words in all, a `BLOCK` option or not).
fn verdict(name: &[u8], first: &[u8], count: usize, block: bool) -> Verdict {
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
        b"multi" => Verdict::Multi,
        b"exec" => Verdict::Exec,
        b"discard" => Verdict::Discard,
        // No WATCH ever holds, so there is nothing to undo.
        b"unwatch" => Verdict::Answer(b"+OK\r\n"),
        b"watch" => Verdict::Answer(
            b"-ERR falcon (program_protocol = \"resp\"): WATCH is not supported: every client shares one connection to the program; MULTI/EXEC without it, or a Lua script (EVAL), or the default program_protocol = \"bytes\"\r\n",
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

/// A header line (`*3\r\n`, `$5\r\n`) at the front of a buffer.
enum Header {
    Incomplete,
    /// Not a number as Redis writes one, or not ended by CRLF.
    Bad,
    /// Its number and its length with the CRLF.
    Number(i64, usize),
}

fn header(buf: &[u8]) -> Header {
    let Some(cr) = buf.iter().take(HEADER_MAX).position(|&b| b == b'\r') else {
        return if buf.len() >= HEADER_MAX {
            Header::Bad
        } else {
            Header::Incomplete
        };
    };
    match buf.get(cr + 1) {
        None => Header::Incomplete,
        Some(b'\n') => strict_int(&buf[1..cr]).map_or(Header::Bad, |n| Header::Number(n, cr + 2)),
        Some(_) => Header::Bad,
    }
}

/// A number as Redis writes it (its `string2ll`): an optional minus, no
/// plus, no leading zero, no blank.
fn strict_int(text: &[u8]) -> Option<i64> {
    let digits = text.strip_prefix(b"-").unwrap_or(text);
    let ok = match digits {
        [] => false,
        [b'0'] => text.len() == 1,
        [b'1'..=b'9', rest @ ..] => rest.iter().all(u8::is_ascii_digit),
        _ => false,
    };
    if !ok {
        return None;
    }
    std::str::from_utf8(text).ok()?.parse().ok()
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
    /// Between two answers.
    fn idle(&self) -> bool {
        self.line.is_empty() && !self.skipping_line && self.bulk == 0 && self.open.is_empty()
    }

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
                if self.open.len() >= NESTING_MAX {
                    return Err(format!(
                        "the program's answer nests aggregates more than {NESTING_MAX} deep (not an answer Redis gives)"
                    ));
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

    fn req(buf: &[u8], max: usize) -> Request {
        request(buf, &mut Scan::default(), max)
    }

    #[test]
    fn requests_are_split_whole_and_only_whole() {
        let set = cmd(&["SET", "k", "v\r\nv"]);
        for cut in 0..set.len() {
            assert_eq!(
                req(&set[..cut.max(1)], 1 << 20),
                Request::Incomplete,
                "{cut}"
            );
        }
        assert_eq!(
            req(&set, 1 << 20),
            Request::Command {
                len: set.len(),
                verdict: Verdict::Pass,
                encoded: None,
            }
        );
        assert_eq!(req(b"*0\r\n", 100), Request::Empty(4));
        assert_eq!(req(b"*-1\r\n", 100), Request::Empty(5));
        assert_eq!(req(b"  \r\n", 100), Request::Empty(4));
        assert_eq!(req(b"\x0b\r\n", 100), Request::Empty(3));
        assert!(matches!(req(b"*1\r\n$1\r\nabc", 100), Request::Bad(_)));
        assert!(
            matches!(req(&cmd(&["SET", "k", &"v".repeat(200)]), 100), Request::Bad(b) if b == TOO_LONG)
        );
        // Only numbers as Redis writes them, and only CRLF: what goes on is
        // read by the program exactly as falcon read it.
        for bad in [
            &b"*x\r\n"[..],
            b"*+1\r\n$4\r\nPING\r\n",
            b"*01\r\n$4\r\nPING\r\n",
            b"*1\n$4\r\nPING\r\n",
            b"*1\r\n$04\r\nPING\r\n",
            b"*1\r\n$+4\r\nPING\r\n",
            b"*1\r\n$-1\r\n",
            b"*1\r\n$ 4\r\nPING\r\n",
            b"*1\r\n:1\r\n",
            b"*-0\r\n",
        ] {
            assert!(
                matches!(req(bad, 100), Request::Bad(_)),
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
        // Inline: words split at C's blanks, re-encoded.
        assert_eq!(
            req(b"ping\r\n", 100),
            Request::Command {
                len: 6,
                verdict: Verdict::Pass,
                encoded: Some(cmd(&["ping"])),
            }
        );
        assert_eq!(
            req(b"\x0bSELECT\x0c5\t\r\n", 100),
            Request::Command {
                len: 12,
                verdict: verdict(b"SELECT", b"5", 2, false),
                encoded: Some(cmd(&["SELECT", "5"])),
            }
        );
        for refused in [&b"set k \"a b\"\r\n"[..], b"get a\0b\r\n"] {
            assert!(matches!(
                req(refused, 100),
                Request::Command {
                    verdict: Verdict::Answer(_),
                    ..
                }
            ));
        }
        assert!(matches!(
            req(&[b'x'; INLINE_MAX + 1], INLINE_MAX * 2),
            Request::Bad(_)
        ));
    }

    #[test]
    fn a_transaction_waits_in_falcon_and_goes_to_the_program_in_one_block() {
        let mut m = Mux::new(1 << 20, 1 << 20);
        let (mut prog, mut out) = (Vec::new(), Vec::new());
        m.open(1);
        m.open(2);
        m.data(1, &cmd(&["MULTI"]), &mut prog, &mut out);
        m.data(1, &cmd(&["SET", "t", "1"]), &mut prog, &mut out);
        // Another client's command goes first: the transaction is not sent yet.
        m.data(2, &cmd(&["GET", "t"]), &mut prog, &mut out);
        m.data(
            1,
            &[cmd(&["INCR", "t"]), cmd(&["SELECT", "0"])].concat(),
            &mut prog,
            &mut out,
        );
        // A snapshot now carries the transaction under way.
        let state = m.export();
        m.data(1, &cmd(&["EXEC"]), &mut prog, &mut out);
        let block = [
            cmd(&["MULTI"]),
            cmd(&["SET", "t", "1"]),
            cmd(&["INCR", "t"]),
            cmd(&["SELECT", "0"]),
            cmd(&["EXEC"]),
        ]
        .concat();
        assert_eq!(prog, [cmd(&["GET", "t"]), block.clone()].concat());
        m.program_output(
            b"$-1\r\n+OK\r\n+QUEUED\r\n+QUEUED\r\n+QUEUED\r\n*3\r\n+OK\r\n:2\r\n+OK\r\n",
            &mut out,
        )
        .unwrap();
        assert_eq!(
            replies(&out),
            [
                (1, "+OK\r\n+QUEUED\r\n".into()),
                (2, "$-1\r\n".into()),
                (1, "+QUEUED\r\n+QUEUED\r\n*3\r\n+OK\r\n:2\r\n+OK\r\n".into()),
            ]
        );
        assert_eq!(m.owed(), 0);
        assert_eq!(m.pending, 0);
        // Restored from the snapshot taken before EXEC: the same block.
        let mut r = Mux::new(1 << 20, 1 << 20);
        r.open(1);
        r.import(&state).unwrap();
        // A transaction that counts more queued commands than its bytes
        // could hold is not falcon's: refused (it would owe answers
        // without end).
        let queued = cmd(&["INCR", "t"]);
        let forge = |count: u64| {
            let mut v = STATE_MAGIC.to_vec();
            v.extend_from_slice(&1u64.to_le_bytes());
            v.push(2);
            v.extend_from_slice(&0u64.to_le_bytes());
            v.extend_from_slice(&count.to_le_bytes());
            v.extend_from_slice(&(queued.len() as u64).to_le_bytes());
            v.extend_from_slice(&queued);
            v
        };
        let mut f = Mux::new(1 << 20, 1 << 20);
        f.open(1);
        f.import(&forge(1)).unwrap();
        assert!(f.import(&forge(u64::MAX)).is_err());
        assert!(f.import(&forge(queued.len() as u64 + 1)).is_err());
        let (mut prog2, mut out2) = (Vec::new(), Vec::new());
        r.data(1, &cmd(&["EXEC"]), &mut prog2, &mut out2);
        assert_eq!(prog2, block);
        // Refused inside: EXEC fails and nothing reaches the program. DISCARD.
        prog.clear();
        out.clear();
        for c in [
            &["MULTI"][..],
            &["BLPOP", "l", "0"],
            &["EXEC"],
            &["EXEC"],
            &["MULTI"],
            &["MULTI"],
            &["SET", "a", "b"],
            &["DISCARD"],
        ] {
            m.data(1, &cmd(c), &mut prog, &mut out);
        }
        assert!(prog.is_empty());
        let r: Vec<String> = replies(&out).into_iter().map(|(_, a)| a).collect();
        let r = r.concat();
        let lines: Vec<&str> = r.split("\r\n").collect();
        assert_eq!(lines[0], "+OK");
        assert!(lines[1].starts_with("-ERR falcon"), "{r}");
        assert!(lines[2].starts_with("-EXECABORT"), "{r}");
        assert_eq!(
            &lines[3..8],
            [
                "-ERR EXEC without MULTI",
                "+OK",
                "-ERR MULTI calls can not be nested",
                "+QUEUED",
                "+OK"
            ]
        );
        assert_eq!(m.pending, 0);
    }

    #[test]
    fn input_in_any_pieces_gives_the_same_commands() {
        let input = [
            cmd(&["SET", "k", "v\r\n"]),
            b"PING\r\n\r\n".to_vec(),
            cmd(&["SELECT", "3"]),
            cmd(&["LPUSH", "l", "a", "b", "c"]),
            b"get k\n".to_vec(),
        ]
        .concat();
        let whole = {
            let mut m = Mux::new(1 << 20, 1 << 20);
            m.open(1);
            let (mut prog, mut out) = (Vec::new(), Vec::new());
            m.data(1, &input, &mut prog, &mut out);
            (prog, out)
        };
        assert_eq!(
            whole.0,
            [
                cmd(&["SET", "k", "v\r\n"]),
                cmd(&["PING"]),
                cmd(&["LPUSH", "l", "a", "b", "c"]),
                cmd(&["get", "k"])
            ]
            .concat()
        );
        for size in 1..input.len() {
            let mut m = Mux::new(1 << 20, 1 << 20);
            m.open(1);
            let (mut prog, mut out) = (Vec::new(), Vec::new());
            for piece in input.chunks(size) {
                m.data(1, piece, &mut prog, &mut out);
            }
            assert_eq!(prog, whole.0, "pieces of {size}");
            assert_eq!(out, whole.1, "pieces of {size}");
            assert_eq!(m.pending, 0);
        }
        // Unfinished commands of all clients together are bounded.
        let mut m = Mux::new(1 << 20, 100);
        let (mut prog, mut out) = (Vec::new(), Vec::new());
        m.open(1);
        m.open(2);
        let big = cmd(&["SET", "k", &"v".repeat(200)]);
        m.data(1, &big[..60], &mut prog, &mut out);
        assert!(out.is_empty() && !m.whole());
        m.data(2, &big[..60], &mut prog, &mut out);
        assert!(matches!(&out[0], Delivery::Reply { conn: 2, bytes } if bytes == TOO_MUCH));
        assert_eq!(out[1], Delivery::CloseClient { conn: 2 });
        assert!(prog.is_empty());
        // A snapshot carries the unfinished command and the broken client.
        let state = m.export();
        let mut restored = Mux::new(1 << 20, 100);
        restored.open(1);
        restored.open(2);
        restored.import(&state).unwrap();
        assert_eq!(restored.export(), state);
        let (mut p1, mut p2, mut o1, mut o2) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        for (mux, p, o) in [
            (&mut m, &mut p1, &mut o1),
            (&mut restored, &mut p2, &mut o2),
        ] {
            mux.data(1, &big[60..], p, o);
            mux.data(2, &cmd(&["FLUSHALL"]), p, o);
        }
        assert_eq!(p1, big);
        assert_eq!(p2, big);
        assert!(restored.import(b"garbage").is_err());
        assert!(restored.import(&state[..state.len() - 1]).is_err());
        // A connection the restored program does not have open is refused,
        // and nothing of the state is taken.
        let mut stranger = Mux::new(1 << 20, 100);
        stranger.open(1);
        let err = stranger.import(&state).unwrap_err();
        assert!(err.contains("0x2"), "{err}");
        assert_eq!(stranger.pending, 0);
        m.close(1, &mut out);
        m.close(2, &mut out);
        assert!(m.whole());
    }

    #[test]
    fn state_holding_commands_are_answered_by_falcon() {
        let v = |args: &[&str]| match req(&cmd(args), 1 << 20) {
            Request::Command { verdict, .. } => verdict,
            r => panic!("{r:?}"),
        };
        assert_eq!(v(&["select", "0"]), Verdict::Answer(b"+OK\r\n"));
        assert_eq!(v(&["multi"]), Verdict::Multi);
        assert_eq!(v(&["EXEC"]), Verdict::Exec);
        assert_eq!(v(&["Discard"]), Verdict::Discard);
        assert_eq!(v(&["UNWATCH"]), Verdict::Answer(b"+OK\r\n"));
        for refused in [
            &["SELECT", "1"][..],
            &["WATCH", "k"],
            &["BLPOP", "l", "0"],
            &["SUBSCRIBE", "c"],
            &["CLIENT", "SETNAME", "x"],
            &["HELLO", "3"],
            &["XREAD", "BLOCK", "0", "STREAMS", "s", "$"],
            &[
                "XREADGROUP",
                "GROUP",
                "g",
                "streams",
                "BLOCK",
                "0",
                "STREAMS",
                "s",
                ">",
            ],
            &[
                "XREADGROUP",
                "GROUP",
                "streams",
                "block",
                "BLOCK",
                "0",
                "STREAMS",
                "s",
                ">",
            ],
        ] {
            assert!(
                matches!(v(refused), Verdict::Answer(a) if a.starts_with(b"-ERR falcon")),
                "{refused:?}"
            );
        }
        for passed in [
            &["XREAD", "STREAMS", "s", "0"][..],
            &["XREAD", "STREAMS", "block", "0"],
            &["XREADGROUP", "GROUP", "g", "block", "STREAMS", "s", ">"],
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
        // Nesting: as deep as the limit is followed; one more is refused
        // (memory for open aggregates stays bounded).
        let deep = |n: usize| {
            let mut v = b"*1\r\n".repeat(n);
            v.extend_from_slice(b":1\r\n");
            v
        };
        let ok = deep(NESTING_MAX);
        assert_eq!(ReplyScanner::default().scan(&ok), Ok(Some(ok.len())));
        let err = ReplyScanner::default()
            .scan(&deep(NESTING_MAX + 1))
            .unwrap_err();
        assert!(err.contains("nests"), "{err}");
    }

    #[test]
    fn the_mux_keeps_log_order_and_routes_every_answer() {
        let mut m = Mux::new(1 << 20, 1 << 20);
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
        m.data(2, &cmd(&["WATCH", "k"]), &mut prog, &mut out);
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
