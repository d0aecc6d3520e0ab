//! A tiny blocking HTTP/1.1 client over `TcpStream`, just enough to drive the API from
//! tests: one request per connection (`Connection: close`), fixed-length, chunked and
//! read-to-close bodies, and Server-Sent Events read one event at a time. Every connect,
//! read and write has a time-out, so a hung server fails a test instead of hanging it.

use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use serde_json::Value;

/// Longest a single read or write may block.
pub const IO_TIMEOUT: Duration = Duration::from_secs(30);

/// A complete response.
#[derive(Debug)]
pub struct Response {
    pub status: u16,
    /// Names lower-cased.
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Response {
    pub fn header(&self, name: &str) -> Option<&str> {
        find_header(&self.headers, name)
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    /// The body as JSON; panics with the body when it is not.
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| {
            panic!(
                "status {}: body is not JSON ({e}): {:?}",
                self.status,
                self.text()
            )
        })
    }
}

fn find_header<'a>(headers: &'a [(String, String)], name: &str) -> Option<&'a str> {
    headers
        .iter()
        .find(|(n, _)| n.eq_ignore_ascii_case(name))
        .map(|(_, v)| v.as_str())
}

/// A client for one server, `http://HOST:PORT`.
#[derive(Clone, Debug)]
pub struct Client {
    addr: SocketAddr,
    /// Sent with every request (e.g. `Authorization`).
    headers: Vec<(String, String)>,
}

impl Client {
    pub fn new(base_url: &str) -> Client {
        let hostport = base_url
            .strip_prefix("http://")
            .unwrap_or(base_url)
            .trim_end_matches('/');
        let addr = hostport
            .parse()
            .unwrap_or_else(|e| panic!("{base_url}: not http://IP:PORT ({e})"));
        Client {
            addr,
            headers: Vec::new(),
        }
    }

    /// The same client, sending `name: value` with every request.
    pub fn with_header(&self, name: &str, value: &str) -> Client {
        let mut c = self.clone();
        c.headers.push((name.to_owned(), value.to_owned()));
        c
    }

    /// The same client, sending `Authorization: Bearer KEY`.
    pub fn with_key(&self, key: &str) -> Client {
        self.with_header("Authorization", &format!("Bearer {key}"))
    }

    pub fn get(&self, path: &str) -> io::Result<Response> {
        self.open("GET", path, None)?.into_response()
    }

    pub fn post_json(&self, path: &str, body: &Value) -> io::Result<Response> {
        self.post_raw(path, body.to_string().as_bytes())
    }

    /// Posts bytes as they are, e.g. a malformed body.
    pub fn post_raw(&self, path: &str, body: &[u8]) -> io::Result<Response> {
        self.open("POST", path, Some(body))?.into_response()
    }

    /// Posts JSON and returns once the response head is in; the body is read as it comes.
    pub fn post_stream(&self, path: &str, body: &Value) -> io::Result<Streaming> {
        self.open("POST", path, Some(body.to_string().as_bytes()))
    }

    /// Sends a JSON POST and returns the connection without reading anything: a client
    /// that may hang up before the answer comes.
    pub fn send_json(&self, path: &str, body: &Value) -> io::Result<TcpStream> {
        self.send("POST", path, Some(body.to_string().as_bytes()))
    }

    fn send(&self, method: &str, path: &str, body: Option<&[u8]>) -> io::Result<TcpStream> {
        let stream = TcpStream::connect_timeout(&self.addr, Duration::from_secs(10))?;
        stream.set_read_timeout(Some(IO_TIMEOUT))?;
        stream.set_write_timeout(Some(IO_TIMEOUT))?;
        stream.set_nodelay(true)?;
        let mut req = format!(
            "{method} {path} HTTP/1.1\r\nHost: {}\r\nConnection: close\r\nAccept: */*\r\n",
            self.addr
        );
        for (name, value) in &self.headers {
            req.push_str(&format!("{name}: {value}\r\n"));
        }
        if let Some(b) = body {
            req.push_str("Content-Type: application/json\r\n");
            req.push_str(&format!("Content-Length: {}\r\n", b.len()));
        }
        req.push_str("\r\n");
        let mut w = &stream;
        w.write_all(req.as_bytes())?;
        if let Some(b) = body {
            // A server may answer and hang up before reading a body it refuses (one too
            // large): its answer is still there to read.
            match w.write_all(b) {
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::BrokenPipe | io::ErrorKind::ConnectionReset
                    ) => {}
                other => other?,
            }
        }
        Ok(stream)
    }

    fn open(&self, method: &str, path: &str, body: Option<&[u8]>) -> io::Result<Streaming> {
        let stream = self.send(method, path, body)?;
        let mut reader = BufReader::new(stream);
        let status_line = read_line(&mut reader)?;
        let status = status_line
            .strip_prefix("HTTP/1.1 ")
            .or_else(|| status_line.strip_prefix("HTTP/1.0 "))
            .and_then(|s| s.get(..3))
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| bad(format!("bad status line {status_line:?}")))?;
        let mut headers = Vec::new();
        loop {
            let line = read_line(&mut reader)?;
            if line.is_empty() {
                break;
            }
            let (name, value) = line
                .split_once(':')
                .ok_or_else(|| bad(format!("bad header line {line:?}")))?;
            headers.push((name.trim().to_ascii_lowercase(), value.trim().to_owned()));
        }
        let chunked = find_header(&headers, "transfer-encoding")
            .is_some_and(|v| v.to_ascii_lowercase().contains("chunked"));
        let body = if chunked {
            Body::Chunked {
                inner: reader,
                left: 0,
                done: false,
            }
        } else if let Some(len) = find_header(&headers, "content-length") {
            let len: u64 = len
                .parse()
                .map_err(|_| bad(format!("bad content-length {len:?}")))?;
            Body::Plain(Read::take(reader, len))
        } else {
            Body::Plain(Read::take(reader, u64::MAX))
        };
        Ok(Streaming {
            status,
            headers,
            body: BufReader::new(body),
        })
    }
}

fn bad(msg: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg)
}

/// One CRLF-terminated line without its terminator; EOF before it is an error.
fn read_line(r: &mut impl BufRead) -> io::Result<String> {
    let mut line = String::new();
    if r.read_line(&mut line)? == 0 {
        return Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            "connection closed before the line ended",
        ));
    }
    Ok(line.trim_end_matches(['\r', '\n']).to_owned())
}

/// A response body as a plain byte stream, de-chunked.
enum Body {
    Plain(io::Take<BufReader<TcpStream>>),
    Chunked {
        inner: BufReader<TcpStream>,
        /// Bytes left in the current chunk.
        left: u64,
        done: bool,
    },
}

impl Read for Body {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Body::Plain(r) => r.read(buf),
            Body::Chunked { inner, left, done } => {
                if *done || buf.is_empty() {
                    return Ok(0);
                }
                if *left == 0 {
                    let line = read_line(inner)?;
                    let size = line.split(';').next().unwrap_or("").trim();
                    *left = u64::from_str_radix(size, 16)
                        .map_err(|_| bad(format!("bad chunk size line {line:?}")))?;
                    if *left == 0 {
                        // Trailers, then the blank line that ends the body.
                        while !read_line(inner)?.is_empty() {}
                        *done = true;
                        return Ok(0);
                    }
                }
                let want = buf.len().min(*left as usize);
                let n = inner.read(&mut buf[..want])?;
                if n == 0 {
                    return Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "connection closed inside a chunk",
                    ));
                }
                *left -= n as u64;
                if *left == 0 && !read_line(inner)?.is_empty() {
                    return Err(bad("chunk not followed by CRLF".into()));
                }
                Ok(n)
            }
        }
    }
}

/// A response whose body has not been read yet. Dropping it closes the connection, which
/// is how a test plays a client that goes away mid-stream.
pub struct Streaming {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    body: BufReader<Body>,
}

impl Streaming {
    pub fn header(&self, name: &str) -> Option<&str> {
        find_header(&self.headers, name)
    }

    /// Reads the rest of the body.
    pub fn into_response(mut self) -> io::Result<Response> {
        let mut body = Vec::new();
        self.body.read_to_end(&mut body)?;
        Ok(Response {
            status: self.status,
            headers: self.headers,
            body,
        })
    }

    /// The next SSE event's data (its `data:` lines joined by newlines); `None` at the
    /// end of the body. Comments (keep-alives) and other fields are skipped.
    pub fn next_event(&mut self) -> io::Result<Option<String>> {
        let mut data: Option<String> = None;
        loop {
            let mut line = String::new();
            if self.body.read_line(&mut line)? == 0 {
                return Ok(data);
            }
            let line = line.trim_end_matches(['\r', '\n']);
            if line.is_empty() {
                if data.is_some() {
                    return Ok(data);
                }
                continue;
            }
            if let Some(rest) = line.strip_prefix("data:") {
                let rest = rest.strip_prefix(' ').unwrap_or(rest);
                match &mut data {
                    Some(d) => {
                        d.push('\n');
                        d.push_str(rest);
                    }
                    None => data = Some(rest.to_owned()),
                }
            }
        }
    }

    /// Every remaining event's data, in order.
    pub fn events(mut self) -> io::Result<Vec<String>> {
        let mut out = Vec::new();
        while let Some(ev) = self.next_event()? {
            out.push(ev);
        }
        Ok(out)
    }
}
