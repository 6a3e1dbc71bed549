//! RESP2, the Redis serialization protocol: requests in and replies out.
//!
//! A request is an array of bulk strings (`*2\r\n$3\r\nGET\r\n$1\r\nk\r\n`)
//! or an inline line (`PING\r\n`, as `redis-benchmark` and telnet send).
//! [`parse`] looks at the bytes received so far and returns one command
//! (the byte ranges of its arguments and how many bytes it used), "not yet"
//! when it is incomplete, or a [`ProtocolError`]. It never panics and checks
//! every length against the limits before it trusts it, so a hostile client
//! cannot make the node allocate what it announces.

use std::ops::Range;

use bytes::{BufMut, Bytes, BytesMut};

/// Limits a parse enforces.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Longest bulk string (a key or a value).
    pub bulk_bytes_max: usize,
    /// Most arguments in one command.
    pub args_max: usize,
    /// Longest inline command line.
    pub inline_bytes_max: usize,
}

/// Input that is not RESP2, or that passes a limit. The connection is
/// answered with the error and closed, as Redis does.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProtocolError {
    #[error("invalid multibulk length")]
    MultibulkLength,
    #[error("invalid bulk length")]
    BulkLength,
    #[error("expected '$', got '{0}'")]
    ExpectedBulk(char),
    #[error("bulk string of {len} bytes is over the limit of {max}")]
    BulkTooLarge { len: u64, max: usize },
    #[error("{count} arguments are over the limit of {max}")]
    TooManyArgs { count: u64, max: usize },
    #[error("bulk string not followed by CRLF")]
    MissingCrlf,
    #[error("too big inline request")]
    InlineTooLarge,
    #[error("unbalanced quotes in request")]
    UnbalancedQuotes,
}

/// One parsed command: argument ranges into the parsed bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    pub args: Vec<Range<usize>>,
    /// Bytes of input the command used.
    pub consumed: usize,
    /// Inline arguments with quotes or escapes are rebuilt: then they are
    /// here instead of in `args`.
    pub owned: Option<Vec<Bytes>>,
}

impl Frame {
    /// The arguments, sharing `input` (which must be the parsed bytes).
    pub fn arguments(self, input: &Bytes) -> Vec<Bytes> {
        match self.owned {
            Some(args) => args,
            None => self.args.into_iter().map(|r| input.slice(r)).collect(),
        }
    }
}

/// Parses one command from the front of `input`: `Ok(None)` means more
/// bytes are needed. An empty command (`*0`, a blank line) comes back with
/// no arguments. Stateless: an incomplete command is parsed again from its
/// start next time; a connection uses a [`Parser`] instead.
pub fn parse(input: &[u8], limits: &Limits) -> Result<Option<Frame>, ProtocolError> {
    Parser::default().parse(input, limits)
}

/// A parser that remembers where an incomplete command stopped, so a client
/// that sends a long command a few bytes at a time costs work in proportion
/// to what it sends, not to what it sent before. Between calls the caller
/// may only append to the input (until a command completes and is removed).
#[derive(Debug, Default)]
pub struct Parser {
    resume: Option<Resume>,
}

#[derive(Debug)]
enum Resume {
    /// Arguments complete so far, and where the next one starts.
    Multibulk {
        count: usize,
        args: Vec<Range<usize>>,
        pos: usize,
    },
    /// Bytes already searched for the end of the line.
    Inline { scanned: usize },
}

impl Parser {
    pub fn parse(&mut self, input: &[u8], limits: &Limits) -> Result<Option<Frame>, ProtocolError> {
        let resume = self.resume.take();
        let result = match input.first() {
            None => Ok(None),
            Some(b'*') => parse_multibulk(input, limits, resume, &mut self.resume),
            Some(_) => parse_inline(input, limits, resume, &mut self.resume),
        };
        if result.is_err() {
            self.resume = None;
        }
        result
    }
}

/// Finds the `\r\n` ending the line that starts at `from`.
fn line_end(input: &[u8], from: usize) -> Option<usize> {
    input
        .get(from..)?
        .windows(2)
        .position(|w| w == b"\r\n")
        .map(|p| from + p)
}

/// A decimal integer as RESP writes it (`-1` allowed), at most 19 digits.
fn parse_int(digits: &[u8]) -> Option<i64> {
    let (negative, digits) = match digits.split_first() {
        Some((b'-', rest)) => (true, rest),
        _ => (false, digits),
    };
    if digits.is_empty() || digits.len() > 18 || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    let value = digits
        .iter()
        .fold(0i64, |acc, d| acc * 10 + i64::from(d - b'0'));
    Some(if negative { -value } else { value })
}

fn parse_multibulk(
    input: &[u8],
    limits: &Limits,
    resume: Option<Resume>,
    save: &mut Option<Resume>,
) -> Result<Option<Frame>, ProtocolError> {
    let (count, mut args, mut pos) = match resume {
        Some(Resume::Multibulk { count, args, pos }) => (count, args, pos),
        _ => match multibulk_count(input, limits)? {
            Count::Incomplete => return Ok(None),
            Count::Empty(consumed) => {
                return Ok(Some(Frame {
                    args: Vec::new(),
                    consumed,
                    owned: None,
                }));
            }
            // Not `with_capacity(count)`: the count is the client's word only.
            Count::Args { count, pos } => (count, Vec::new(), pos),
        },
    };
    while args.len() < count {
        let Some(&first) = input.get(pos) else {
            *save = Some(Resume::Multibulk { count, args, pos });
            return Ok(None);
        };
        if first != b'$' {
            return Err(ProtocolError::ExpectedBulk(char::from(first)));
        }
        // The length line is short: search a bounded window, not the
        // (possibly huge, partly arrived) data after it.
        let window = &input[..input.len().min(pos + 34)];
        let Some(end) = line_end(window, pos + 1) else {
            if input.len() - pos > 32 {
                return Err(ProtocolError::BulkLength);
            }
            *save = Some(Resume::Multibulk { count, args, pos });
            return Ok(None);
        };
        let len = parse_int(&input[pos + 1..end]).ok_or(ProtocolError::BulkLength)?;
        if len < 0 {
            return Err(ProtocolError::BulkLength);
        }
        if len as u64 > limits.bulk_bytes_max as u64 {
            return Err(ProtocolError::BulkTooLarge {
                len: len as u64,
                max: limits.bulk_bytes_max,
            });
        }
        let start = end + 2;
        let stop = start + len as usize;
        if input.len() < stop + 2 {
            *save = Some(Resume::Multibulk { count, args, pos });
            return Ok(None);
        }
        if &input[stop..stop + 2] != b"\r\n" {
            return Err(ProtocolError::MissingCrlf);
        }
        args.push(start..stop);
        pos = stop + 2;
    }
    Ok(Some(Frame {
        args,
        consumed: pos,
        owned: None,
    }))
}

enum Count {
    Incomplete,
    /// `*0` or a negative count: an empty command of this many bytes.
    Empty(usize),
    Args {
        count: usize,
        pos: usize,
    },
}

fn multibulk_count(input: &[u8], limits: &Limits) -> Result<Count, ProtocolError> {
    let window = &input[..input.len().min(34)];
    let Some(end) = line_end(window, 1) else {
        // A count line longer than any valid one is garbage, not "wait".
        return if input.len() > 32 {
            Err(ProtocolError::MultibulkLength)
        } else {
            Ok(Count::Incomplete)
        };
    };
    let count = parse_int(&input[1..end]).ok_or(ProtocolError::MultibulkLength)?;
    let pos = end + 2;
    if count <= 0 {
        return Ok(Count::Empty(pos));
    }
    if count as u64 > limits.args_max as u64 {
        return Err(ProtocolError::TooManyArgs {
            count: count as u64,
            max: limits.args_max,
        });
    }
    Ok(Count::Args {
        count: count as usize,
        pos,
    })
}

fn parse_inline(
    input: &[u8],
    limits: &Limits,
    resume: Option<Resume>,
    save: &mut Option<Resume>,
) -> Result<Option<Frame>, ProtocolError> {
    let from = match resume {
        Some(Resume::Inline { scanned }) => scanned.min(input.len()),
        _ => 0,
    };
    let Some(newline) = input[from..]
        .iter()
        .position(|&b| b == b'\n')
        .map(|p| from + p)
    else {
        if input.len() > limits.inline_bytes_max {
            return Err(ProtocolError::InlineTooLarge);
        }
        *save = Some(Resume::Inline {
            scanned: input.len(),
        });
        return Ok(None);
    };
    if newline > limits.inline_bytes_max {
        return Err(ProtocolError::InlineTooLarge);
    }
    let line = &input[..newline];
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    let consumed = newline + 1;
    if !line.iter().any(|&b| b == b'"' || b == b'\'') {
        let mut args = Vec::new();
        let mut start = None;
        for (i, &b) in line.iter().enumerate() {
            match (b.is_ascii_whitespace(), start) {
                (true, Some(s)) => {
                    args.push(s..i);
                    start = None;
                }
                (false, None) => start = Some(i),
                _ => {}
            }
        }
        if let Some(s) = start {
            args.push(s..line.len());
        }
        if args.len() > limits.args_max {
            return Err(ProtocolError::TooManyArgs {
                count: args.len() as u64,
                max: limits.args_max,
            });
        }
        return Ok(Some(Frame {
            args,
            consumed,
            owned: None,
        }));
    }
    let owned = split_quoted(line)?;
    if owned.len() > limits.args_max {
        return Err(ProtocolError::TooManyArgs {
            count: owned.len() as u64,
            max: limits.args_max,
        });
    }
    Ok(Some(Frame {
        args: Vec::new(),
        consumed,
        owned: Some(owned),
    }))
}

/// Splits an inline line with quotes the way redis-cli writes them:
/// `"..."` with `\n \r \t \" \\ \xHH` escapes, and `'...'` taken literally
/// (but `\'`).
fn split_quoted(line: &[u8]) -> Result<Vec<Bytes>, ProtocolError> {
    let mut args = Vec::new();
    let mut i = 0;
    while i < line.len() {
        while i < line.len() && line[i].is_ascii_whitespace() {
            i += 1;
        }
        if i == line.len() {
            break;
        }
        let mut arg = Vec::new();
        let mut quote = None;
        while i < line.len() {
            let b = line[i];
            match quote {
                None if b.is_ascii_whitespace() => break,
                None if b == b'"' || b == b'\'' => quote = Some(b),
                None => arg.push(b),
                Some(q) if b == q => {
                    quote = None;
                    // A closing quote must end the argument.
                    if line.get(i + 1).is_some_and(|c| !c.is_ascii_whitespace()) {
                        return Err(ProtocolError::UnbalancedQuotes);
                    }
                }
                Some(b'"') if b == b'\\' && i + 1 < line.len() => {
                    i += 1;
                    let hex = |c: u8| (c as char).to_digit(16);
                    match line[i] {
                        b'n' => arg.push(b'\n'),
                        b'r' => arg.push(b'\r'),
                        b't' => arg.push(b'\t'),
                        b'a' => arg.push(7),
                        b'b' => arg.push(8),
                        b'x' if i + 2 < line.len()
                            && hex(line[i + 1]).is_some()
                            && hex(line[i + 2]).is_some() =>
                        {
                            let v =
                                hex(line[i + 1]).unwrap_or(0) * 16 + hex(line[i + 2]).unwrap_or(0);
                            arg.push(v as u8);
                            i += 2;
                        }
                        c => arg.push(c),
                    }
                }
                Some(b'\'') if b == b'\\' && line.get(i + 1) == Some(&b'\'') => {
                    i += 1;
                    arg.push(b'\'');
                }
                Some(_) => arg.push(b),
            }
            i += 1;
        }
        if quote.is_some() {
            return Err(ProtocolError::UnbalancedQuotes);
        }
        args.push(Bytes::from(arg));
    }
    Ok(args)
}

/// A reply, encoded with [`Reply::encode`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply {
    Ok,
    Simple(String),
    /// An error line; the text starts with its code (`ERR`, `READONLY`...).
    Error(String),
    Int(i64),
    Bulk(Bytes),
    Nil,
    Array(Vec<Reply>),
    /// Field and value pairs: a RESP3 map, or in RESP2 the flat array
    /// Redis sends there (`HELLO`, `CONFIG GET`, `SENTINEL MASTER`).
    Map(Vec<(Reply, Reply)>),
}

impl Reply {
    pub fn err(text: impl std::fmt::Display) -> Reply {
        Reply::Error(format!("ERR {text}"))
    }

    pub fn bulk(bytes: impl Into<Bytes>) -> Reply {
        Reply::Bulk(bytes.into())
    }

    /// RESP2.
    pub fn encode(&self, out: &mut BytesMut) {
        self.encode_as(out, false)
    }

    /// RESP2, or RESP3 (`resp3`: the client said `HELLO 3`), which differs
    /// in what tidewal sends only in its null (`_`) and maps (`%`).
    pub fn encode_as(&self, out: &mut BytesMut, resp3: bool) {
        match self {
            Reply::Ok => out.put_slice(b"+OK\r\n"),
            Reply::Simple(s) => line(out, b'+', s.as_bytes()),
            Reply::Error(s) => line(out, b'-', s.as_bytes()),
            Reply::Int(n) => line(out, b':', n.to_string().as_bytes()),
            Reply::Bulk(b) => {
                line(out, b'$', b.len().to_string().as_bytes());
                out.put_slice(b);
                out.put_slice(b"\r\n");
            }
            Reply::Nil if resp3 => out.put_slice(b"_\r\n"),
            Reply::Nil => out.put_slice(b"$-1\r\n"),
            Reply::Array(items) => {
                line(out, b'*', items.len().to_string().as_bytes());
                for item in items {
                    item.encode_as(out, resp3);
                }
            }
            Reply::Map(pairs) => {
                if resp3 {
                    line(out, b'%', pairs.len().to_string().as_bytes());
                } else {
                    line(out, b'*', (2 * pairs.len()).to_string().as_bytes());
                }
                for (k, v) in pairs {
                    k.encode_as(out, resp3);
                    v.encode_as(out, resp3);
                }
            }
        }
    }
}

/// The `*N` line that starts an array of `len` replies.
pub fn encode_array_header(len: usize, out: &mut BytesMut) {
    line(out, b'*', len.to_string().as_bytes());
}

/// `prefix text \r\n`, with CR and LF in the text replaced: a simple string
/// or error must stay on one line whatever it quotes.
fn line(out: &mut BytesMut, prefix: u8, text: &[u8]) {
    out.put_u8(prefix);
    out.extend(
        text.iter()
            .map(|&b| if b == b'\r' || b == b'\n' { b' ' } else { b }),
    );
    out.put_slice(b"\r\n");
}

/// Parses one reply from `input` (what a node reads when it asks another
/// node something: votes, positions, records): the reply and the bytes it
/// used, `None` while incomplete, or why it is not RESP2. Bulk strings
/// longer than `bulk_bytes_max` and arrays nested deeper than three
/// (`ROLE`'s list of replicas) are refused before anything is allocated
/// for them.
pub fn parse_reply(
    input: &[u8],
    bulk_bytes_max: usize,
) -> Result<Option<(Reply, usize)>, ProtocolError> {
    reply_at(input, 0, bulk_bytes_max, 0)
}

fn reply_at(
    input: &[u8],
    at: usize,
    bulk_bytes_max: usize,
    depth: u32,
) -> Result<Option<(Reply, usize)>, ProtocolError> {
    let Some(&kind) = input.get(at) else {
        return Ok(None);
    };
    let Some(end) = line_end(input, at + 1) else {
        return Ok(None);
    };
    let text = &input[at + 1..end];
    let next = end + 2;
    let number = || parse_int(text).ok_or(ProtocolError::BulkLength);
    match kind {
        b'+' => Ok(Some((
            Reply::Simple(String::from_utf8_lossy(text).into()),
            next,
        ))),
        b'-' => Ok(Some((
            Reply::Error(String::from_utf8_lossy(text).into()),
            next,
        ))),
        b':' => Ok(Some((Reply::Int(number()?), next))),
        b'$' => {
            let len = number()?;
            if len == -1 {
                return Ok(Some((Reply::Nil, next)));
            }
            let len = usize::try_from(len).map_err(|_| ProtocolError::BulkLength)?;
            if len > bulk_bytes_max {
                return Err(ProtocolError::BulkTooLarge {
                    len: len as u64,
                    max: bulk_bytes_max,
                });
            }
            if input.len() < next + len + 2 {
                return Ok(None);
            }
            if &input[next + len..next + len + 2] != b"\r\n" {
                return Err(ProtocolError::MissingCrlf);
            }
            let body = Bytes::copy_from_slice(&input[next..next + len]);
            Ok(Some((Reply::Bulk(body), next + len + 2)))
        }
        b'*' if depth < 3 => {
            let count = number()?;
            if count == -1 {
                return Ok(Some((Reply::Nil, next)));
            }
            // Every element takes at least 3 bytes: a count beyond what
            // the input could hold is not believed.
            let count = usize::try_from(count)
                .ok()
                .filter(|&c| c <= (1 << 20))
                .ok_or(ProtocolError::MultibulkLength)?;
            let mut items = Vec::with_capacity(count.min(input.len() / 3));
            let mut at = next;
            for _ in 0..count {
                match reply_at(input, at, bulk_bytes_max, depth + 1)? {
                    Some((item, used)) => {
                        items.push(item);
                        at = used;
                    }
                    None => return Ok(None),
                }
            }
            Ok(Some((Reply::Array(items), at)))
        }
        b'*' => Err(ProtocolError::MultibulkLength),
        other => Err(ProtocolError::ExpectedBulk(other as char)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMITS: Limits = Limits {
        bulk_bytes_max: 1024,
        args_max: 8,
        inline_bytes_max: 64,
    };

    type Parsed = Option<(Vec<Vec<u8>>, usize)>;

    fn args(input: &[u8]) -> Result<Parsed, ProtocolError> {
        let bytes = Bytes::copy_from_slice(input);
        Ok(parse(input, &LIMITS)?.map(|f| {
            let consumed = f.consumed;
            let a = f.arguments(&bytes).iter().map(|b| b.to_vec()).collect();
            (a, consumed)
        }))
    }

    #[test]
    fn multibulk_and_inline() {
        let (a, n) = args(b"*2\r\n$3\r\nGET\r\n$1\r\nk\r\nrest")
            .unwrap()
            .unwrap();
        assert_eq!(a, vec![b"GET".to_vec(), b"k".to_vec()]);
        assert_eq!(n, 20);
        let (a, n) = args(b"PING\r\n").unwrap().unwrap();
        assert_eq!((a, n), (vec![b"PING".to_vec()], 6));
        let (a, _) = args(b"set k \"a b\\x41\"\n").unwrap().unwrap();
        assert_eq!(a, vec![b"set".to_vec(), b"k".to_vec(), b"a bA".to_vec()]);
        assert_eq!(args(b"*0\r\n").unwrap().unwrap().0.len(), 0);
    }

    #[test]
    fn incomplete_waits_for_more() {
        let full = b"*2\r\n$3\r\nGET\r\n$5\r\nhello\r\n";
        for cut in 0..full.len() {
            assert_eq!(args(&full[..cut]).unwrap(), None, "cut at {cut}");
        }
        assert!(args(full).unwrap().is_some());
        assert_eq!(args(b"PIN").unwrap(), None);
    }

    #[test]
    fn a_parser_fed_byte_by_byte_finds_the_same_commands() {
        let input: &[u8] =
            b"*3\r\n$3\r\nSET\r\n$5\r\nhello\r\n$0\r\n\r\nPING\r\n*1\r\n$4\r\nPING\r\n";
        let mut whole = Vec::new();
        let mut rest = input;
        while let Some(f) = parse(rest, &LIMITS).unwrap() {
            whole.push((f.args.clone(), f.consumed));
            rest = &rest[f.consumed..];
        }
        let mut parser = Parser::default();
        let (mut fed, mut start, mut got) = (0, 0, Vec::new());
        while fed < input.len() {
            fed += 1;
            while let Some(f) = parser.parse(&input[start..fed], &LIMITS).unwrap() {
                start += f.consumed;
                got.push((f.args.clone(), f.consumed));
            }
        }
        assert_eq!(got, whole);
        assert_eq!(got.len(), 3);
    }

    #[test]
    fn bad_input_is_a_typed_error() {
        assert_eq!(args(b"*x\r\n"), Err(ProtocolError::MultibulkLength));
        assert_eq!(args(b"*1\r\n:1\r\n"), Err(ProtocolError::ExpectedBulk(':')));
        assert_eq!(args(b"*1\r\n$-5\r\n"), Err(ProtocolError::BulkLength));
        assert!(matches!(
            args(b"*1\r\n$99999999\r\n"),
            Err(ProtocolError::BulkTooLarge { .. })
        ));
        assert!(matches!(
            args(b"*999999999\r\n"),
            Err(ProtocolError::TooManyArgs { .. })
        ));
        assert_eq!(args(b"*1\r\n$1\r\nab\r\n"), Err(ProtocolError::MissingCrlf));
        assert_eq!(args(&[b'x'; 100]), Err(ProtocolError::InlineTooLarge));
        assert_eq!(args(b"set \"k\n"), Err(ProtocolError::UnbalancedQuotes));
        assert_eq!(args(&[b'*'; 40]), Err(ProtocolError::MultibulkLength));
    }

    #[test]
    fn replies_encode_as_redis_does() {
        let mut out = BytesMut::new();
        Reply::Array(vec![
            Reply::Ok,
            Reply::Int(-3),
            Reply::bulk("v"),
            Reply::Nil,
            Reply::err("bad\r\nline"),
        ])
        .encode(&mut out);
        assert_eq!(
            &out[..],
            b"*5\r\n+OK\r\n:-3\r\n$1\r\nv\r\n$-1\r\n-ERR bad  line\r\n"
        );
    }

    #[test]
    fn replies_parse_back_whole_or_not_yet() {
        let reply = Reply::Array(vec![
            Reply::Int(1),
            Reply::Simple("granted".into()),
            Reply::Array(vec![Reply::Int(0), Reply::Int(4096)]),
            Reply::bulk("records\r\n"),
            Reply::Nil,
            Reply::Error("ERR no".into()),
        ]);
        let mut out = BytesMut::new();
        reply.encode(&mut out);
        assert_eq!(parse_reply(&out, 64), Ok(Some((reply, out.len()))));
        for cut in 0..out.len() {
            assert_eq!(parse_reply(&out[..cut], 64), Ok(None), "cut at {cut}");
        }
        assert_eq!(
            parse_reply(b"+OK\r\n", 64),
            Ok(Some((Reply::Simple("OK".into()), 5)))
        );
        // Lengths are checked before anything is taken on trust.
        assert!(matches!(
            parse_reply(b"$65\r\n", 64),
            Err(ProtocolError::BulkTooLarge { len: 65, .. })
        ));
        assert!(parse_reply(b"*99999999\r\n", 64).is_err());
        assert!(
            parse_reply(b"*1\r\n*1\r\n*1\r\n*1\r\n:1\r\n", 64).is_err(),
            "too deep"
        );
        // ROLE's list of replicas: three deep.
        assert!(matches!(
            parse_reply(b"*1\r\n*1\r\n*1\r\n:1\r\n", 64),
            Ok(Some(_))
        ));
        assert!(parse_reply(b"$1\r\nab\r\n", 64).is_err());
        assert!(parse_reply(b"?\r\n", 64).is_err());
    }

    proptest::proptest! {
        #[test]
        fn never_panics(input in proptest::collection::vec(proptest::num::u8::ANY, 0..200)) {
            let _ = parse(&input, &LIMITS);
            let _ = parse_reply(&input, 64);
        }
    }
}
