//! The NATS client text protocol as the load generator speaks it inside WebSocket frames:
//! an incremental parser for what a server sends (`INFO`, `MSG`, `PING`, `PONG`, `+OK`,
//! `-ERR`), fed byte chunks split at arbitrary points, and the few lines a client sends
//! (`CONNECT`, `SUB`, `PUB`, `PING`, `PONG`). It is protocol only: it must never touch a
//! socket, and never allocate per `MSG` (payloads are borrowed from its buffer).

use anyhow::{bail, Result};

/// One server operation; `Msg` borrows its subject and payload from the parser.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum NatsOp<'a> {
    Info(&'a [u8]),
    Msg { subject: &'a [u8], sid: u64, payload: &'a [u8] },
    Ping,
    Pong,
    Ok,
    Err(&'a [u8]),
}

/// Buffers server bytes and yields complete operations.
#[derive(Default)]
pub(crate) struct Parser {
    buf: Vec<u8>,
    /// Bytes of `buf` already consumed.
    pos: usize,
}

/// Longest control line accepted before a `\r\n` (INFO lines are a few hundred bytes).
const MAX_CONTROL_LINE: usize = 64 * 1024;

impl Parser {
    pub(crate) fn new() -> Parser {
        Parser::default()
    }

    /// Appends a chunk (one WebSocket frame's payload, or any part of the stream).
    pub(crate) fn push(&mut self, chunk: &[u8]) {
        if self.pos > 0 {
            self.buf.drain(..self.pos);
            self.pos = 0;
        }
        self.buf.extend_from_slice(chunk);
    }

    /// The next complete operation, or None until more bytes arrive.
    #[allow(clippy::should_implement_trait)]
    pub(crate) fn next(&mut self) -> Result<Option<NatsOp<'_>>> {
        let rest = &self.buf[self.pos..];
        let Some(eol) = find_crlf(rest) else {
            if rest.len() > MAX_CONTROL_LINE {
                bail!("NATS control line longer than {MAX_CONTROL_LINE} bytes");
            }
            return Ok(None);
        };
        let line = &rest[..eol];
        let (verb, args) = match line.iter().position(|b| *b == b' ' || *b == b'\t') {
            Some(i) => (&line[..i], trim(&line[i + 1..])),
            None => (line, &line[line.len()..]),
        };
        let start = self.pos;
        let after_line = start + eol + 2;
        if verb.eq_ignore_ascii_case(b"MSG") {
            let mut parts = args.split(|b| *b == b' ' || *b == b'\t').filter(|p| !p.is_empty());
            let subject = parts.next();
            let sid = parts.next();
            let (third, fourth) = (parts.next(), parts.next());
            let size = fourth.or(third); // with a reply subject, the size is the 4th argument
            let (Some(subject), Some(sid), Some(size)) = (subject, sid, size) else {
                bail!("malformed MSG line: {:?}", String::from_utf8_lossy(line));
            };
            let sid = parse_u64(sid)?;
            let size = parse_u64(size)? as usize;
            if self.buf.len() < after_line + size + 2 {
                return Ok(None);
            }
            if &self.buf[after_line + size..after_line + size + 2] != b"\r\n" {
                bail!("MSG payload not followed by CRLF");
            }
            self.pos = after_line + size + 2;
            let subject_at = start + (subject.as_ptr() as usize - rest.as_ptr() as usize);
            return Ok(Some(NatsOp::Msg {
                subject: &self.buf[subject_at..subject_at + subject.len()],
                sid,
                payload: &self.buf[after_line..after_line + size],
            }));
        }
        let args_at = start + (args.as_ptr() as usize - rest.as_ptr() as usize);
        let args_range = args_at..args_at + args.len();
        let op = if verb.eq_ignore_ascii_case(b"PING") {
            Kind::Ping
        } else if verb.eq_ignore_ascii_case(b"PONG") {
            Kind::Pong
        } else if verb.eq_ignore_ascii_case(b"+OK") {
            Kind::Ok
        } else if verb.eq_ignore_ascii_case(b"-ERR") {
            Kind::Err
        } else if verb.eq_ignore_ascii_case(b"INFO") {
            Kind::Info
        } else {
            bail!("unknown NATS operation: {:?}", String::from_utf8_lossy(line));
        };
        self.pos = after_line;
        Ok(Some(match op {
            Kind::Ping => NatsOp::Ping,
            Kind::Pong => NatsOp::Pong,
            Kind::Ok => NatsOp::Ok,
            Kind::Err => NatsOp::Err(&self.buf[args_range]),
            Kind::Info => NatsOp::Info(&self.buf[args_range]),
        }))
    }
}

enum Kind {
    Ping,
    Pong,
    Ok,
    Err,
    Info,
}

fn find_crlf(b: &[u8]) -> Option<usize> {
    b.windows(2).position(|w| w == b"\r\n")
}

fn trim(mut b: &[u8]) -> &[u8] {
    while let [b' ' | b'\t', rest @ ..] = b {
        b = rest;
    }
    while let [rest @ .., b' ' | b'\t'] = b {
        b = rest;
    }
    b
}

fn parse_u64(b: &[u8]) -> Result<u64> {
    if b.is_empty() || !b.iter().all(u8::is_ascii_digit) || b.len() > 19 {
        bail!("not a number: {:?}", String::from_utf8_lossy(b));
    }
    Ok(b.iter().fold(0u64, |n, d| n * 10 + u64::from(d - b'0')))
}

/// Maps a Switchyard channel name to a NATS subject: `bench:3` → `bench.3`.
pub(crate) fn subject(channel: &str) -> String {
    channel.replace(':', ".")
}

/// The `CONNECT` line: no echo of our own messages, no `+OK` for every command.
pub(crate) fn connect_line() -> String {
    concat!(
        r#"CONNECT {"verbose":false,"pedantic":false,"tls_required":false,"name":"switchyard-bench","#,
        r#""lang":"rust","version":"0.1.0","protocol":1,"echo":false,"headers":false,"no_responders":false}"#,
        "\r\n"
    )
    .to_string()
}

pub(crate) fn sub_line(subject: &str, sid: u64) -> String {
    format!("SUB {subject} {sid}\r\n")
}

/// The header of a `PUB`; the payload and a CRLF follow it.
pub(crate) fn pub_header(subject: &str, len: usize) -> String {
    format!("PUB {subject} {len}\r\n")
}

pub(crate) const PING: &[u8] = b"PING\r\n";
pub(crate) const PONG: &[u8] = b"PONG\r\n";

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, PartialEq)]
    enum Owned {
        Info(String),
        Msg(String, u64, Vec<u8>),
        Ping,
        Pong,
        Ok,
        Err(String),
    }

    fn own(op: NatsOp<'_>) -> Owned {
        let s = |b: &[u8]| String::from_utf8(b.to_vec()).unwrap();
        match op {
            NatsOp::Info(b) => Owned::Info(s(b)),
            NatsOp::Msg { subject, sid, payload } => Owned::Msg(s(subject), sid, payload.to_vec()),
            NatsOp::Ping => Owned::Ping,
            NatsOp::Pong => Owned::Pong,
            NatsOp::Ok => Owned::Ok,
            NatsOp::Err(b) => Owned::Err(s(b)),
        }
    }

    const STREAM: &[u8] = b"INFO {\"server_id\":\"X\",\"max_payload\":1048576}\r\n\
        PING\r\n\
        MSG bench.3 7 12\r\nhello\r\nworld\r\n\
        +OK\r\n\
        msg bench.0 1 reply.to 0\r\n\r\n\
        PONG\r\n\
        MSG  bench.1\t2   3 \r\n{\"}\r\n\
        -ERR 'Slow Consumer'\r\n";

    fn expected() -> Vec<Owned> {
        vec![
            Owned::Info("{\"server_id\":\"X\",\"max_payload\":1048576}".into()),
            Owned::Ping,
            Owned::Msg("bench.3".into(), 7, b"hello\r\nworld".to_vec()),
            Owned::Ok,
            Owned::Msg("bench.0".into(), 1, Vec::new()),
            Owned::Pong,
            Owned::Msg("bench.1".into(), 2, b"{\"}".to_vec()),
            Owned::Err("'Slow Consumer'".into()),
        ]
    }

    fn parse_in_chunks(chunks: &[&[u8]]) -> Vec<Owned> {
        let mut p = Parser::new();
        let mut out = Vec::new();
        for c in chunks {
            p.push(c);
            while let Some(op) = p.next().unwrap() {
                out.push(own(op));
            }
        }
        out
    }

    #[test]
    fn whole_stream_at_once() {
        assert_eq!(parse_in_chunks(&[STREAM]), expected());
    }

    #[test]
    fn split_at_every_point() {
        for i in 0..=STREAM.len() {
            let (a, b) = STREAM.split_at(i);
            assert_eq!(parse_in_chunks(&[a, b]), expected(), "split at {i}");
        }
    }

    #[test]
    fn split_at_every_pair_of_points_and_byte_by_byte() {
        for i in (0..=STREAM.len()).step_by(3) {
            for j in (i..=STREAM.len()).step_by(5) {
                let chunks = [&STREAM[..i], &STREAM[i..j], &STREAM[j..]];
                assert_eq!(parse_in_chunks(&chunks), expected(), "split at {i} and {j}");
            }
        }
        let bytes: Vec<&[u8]> = STREAM.chunks(1).collect();
        assert_eq!(parse_in_chunks(&bytes), expected());
    }

    #[test]
    fn malformed_input_is_an_error() {
        for bad in [&b"MSG a 1\r\n"[..], b"MSG a x 3\r\nabc\r\n", b"WHAT\r\n", b"MSG a 1 3\r\nabcXY"] {
            let mut p = Parser::new();
            p.push(bad);
            assert!(p.next().is_err(), "{:?}", String::from_utf8_lossy(bad));
        }
        let mut p = Parser::new();
        p.push(&vec![b'x'; MAX_CONTROL_LINE + 1]);
        assert!(p.next().is_err());
    }

    #[test]
    fn client_lines() {
        assert_eq!(subject("bench:3"), "bench.3");
        assert_eq!(sub_line("bench.3", 9), "SUB bench.3 9\r\n");
        assert_eq!(pub_header("a.b", 12), "PUB a.b 12\r\n");
        let c = connect_line();
        assert!(c.starts_with("CONNECT {") && c.ends_with("}\r\n"));
        let json: serde_json::Value = serde_json::from_str(&c["CONNECT ".len()..c.len() - 2]).unwrap();
        assert_eq!(json["verbose"], false);
    }
}
