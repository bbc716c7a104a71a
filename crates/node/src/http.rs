//! A small HTTP/1.1 server and client over the control socket (a Unix socket), enough for
//! a JSON API that `curl --unix-socket` can call. One request per connection.

use std::path::Path;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{UnixListener, UnixStream};

/// Largest request or response body accepted.
const MAX_BODY: usize = 16 << 20;

/// A parsed request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpRequest {
    /// `GET`, `PUT`, ...
    pub method: String,
    /// The path, without the query.
    pub path: String,
    /// Query parameters, in order.
    pub query: Vec<(String, String)>,
    /// The body.
    pub body: Vec<u8>,
    /// The client sent `Connection: close`: the connection ends after the answer.
    pub close: bool,
}

impl HttpRequest {
    /// A query parameter.
    pub fn param(&self, name: &str) -> Option<&str> {
        self.query
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }
}

/// A response: status and JSON body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpResponse {
    /// Status code.
    pub status: u16,
    /// Body.
    pub body: Vec<u8>,
    /// Its media type.
    pub content_type: &'static str,
}

impl HttpResponse {
    /// A JSON response.
    pub fn json(status: u16, value: &serde_json::Value) -> Self {
        HttpResponse {
            status,
            body: serde_json::to_vec(value).unwrap_or_default(),
            content_type: "application/json",
        }
    }

    /// An error response `{"error": message}`.
    pub fn error(status: u16, message: impl std::fmt::Display) -> Self {
        Self::json(status, &serde_json::json!({ "error": message.to_string() }))
    }
}

fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        409 => "Conflict",
        412 => "Precondition Failed",
        413 => "Payload Too Large",
        500 => "Internal Server Error",
        503 => "Service Unavailable",
        _ => "Status",
    }
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' if i + 2 < bytes.len() => {
                let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).ok();
                match hex.and_then(|h| u8::from_str_radix(h, 16).ok()) {
                    Some(b) => {
                        out.push(b);
                        i += 3;
                    }
                    None => {
                        out.push(b'%');
                        i += 1;
                    }
                }
            }
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            b => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Percent-encodes a path segment or query value.
pub fn percent_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// How long a client may take to send its whole request before the connection is dropped.
const READ_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// How long an open connection may stay idle between two requests.
const IDLE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

/// The bytes read from one connection and not yet consumed: a request's head and body, and
/// whatever a client already sent of the next one.
#[derive(Default)]
struct ConnBuf {
    buf: Vec<u8>,
}

impl ConnBuf {
    /// Reads more bytes; `Ok(false)` at end of stream.
    async fn fill<S: AsyncRead + Unpin>(&mut self, stream: &mut S) -> Result<bool, String> {
        let mut chunk = [0u8; 8192];
        let n = stream.read(&mut chunk).await.map_err(|e| e.to_string())?;
        self.buf.extend_from_slice(&chunk[..n]);
        Ok(n > 0)
    }
}

/// Reads one request within [`READ_TIMEOUT`] of its first byte; `Ok(None)` when the client
/// closed (or stayed idle for [`IDLE_TIMEOUT`]) between requests; `Err` with a reason for
/// anything malformed or slow.
async fn next_request<S: AsyncRead + Unpin>(
    stream: &mut S,
    conn: &mut ConnBuf,
) -> Result<Option<HttpRequest>, String> {
    if conn.buf.is_empty() {
        match tokio::time::timeout(IDLE_TIMEOUT, conn.fill(stream)).await {
            Ok(Ok(true)) => {}
            Ok(Ok(false)) | Err(_) => return Ok(None),
            Ok(Err(e)) => return Err(e),
        }
    }
    tokio::time::timeout(READ_TIMEOUT, read_request_from(stream, conn))
        .await
        .map_err(|_| format!("request not received within {} s", READ_TIMEOUT.as_secs()))?
        .map(Some)
}

/// Reads one whole request; `Err` with a reason for anything malformed.
#[cfg(test)]
async fn read_request<S: AsyncRead + Unpin>(stream: &mut S) -> Result<HttpRequest, String> {
    read_request_from(stream, &mut ConnBuf::default()).await
}

/// Reads one HTTP message (request or response): its head (start line and headers), its
/// body, and whether the sender asked to close the connection after it.
async fn read_message<S: AsyncRead + Unpin>(
    stream: &mut S,
    conn: &mut ConnBuf,
) -> Result<(String, Vec<u8>, bool), String> {
    let head_end = loop {
        if let Some(end) = conn.buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break end;
        }
        if conn.buf.len() > 64 * 1024 {
            return Err("header too large".into());
        }
        if !conn.fill(stream).await? {
            return Err("connection closed in the header".into());
        }
    };
    let head = std::str::from_utf8(&conn.buf[..head_end])
        .map_err(|_| "head is not UTF-8")?
        .to_owned();
    let (length, close) = headers(head.split("\r\n").skip(1))?;
    let total = head_end + 4 + length;
    while conn.buf.len() < total {
        if !conn.fill(stream).await? {
            return Err("connection closed in the body".into());
        }
    }
    let body = conn.buf[head_end + 4..total].to_vec();
    conn.buf.drain(..total);
    Ok((head, body, close))
}

async fn read_request_from<S: AsyncRead + Unpin>(
    stream: &mut S,
    conn: &mut ConnBuf,
) -> Result<HttpRequest, String> {
    let (head, body, close) = read_message(stream, conn).await?;
    let request_line = head.split("\r\n").next().ok_or("empty request")?;
    let mut parts = request_line.split(' ');
    let method = parts.next().ok_or("no method")?.to_owned();
    let target = parts.next().ok_or("no path")?;
    let (path, query) = target.split_once('?').unwrap_or((target, ""));
    let query = query
        .split('&')
        .filter(|kv| !kv.is_empty())
        .map(|kv| {
            let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
            (percent_decode(k), percent_decode(v))
        })
        .collect();
    Ok(HttpRequest {
        method,
        path: percent_decode(path),
        query,
        body,
        close,
    })
}

/// The body length and whether the client asked to close after this request.
fn headers<'a>(lines: impl Iterator<Item = &'a str>) -> Result<(usize, bool), String> {
    let mut length = 0;
    let mut close = false;
    for line in lines {
        let Some((k, v)) = line.split_once(':') else {
            continue;
        };
        let k = k.trim();
        if k.eq_ignore_ascii_case("transfer-encoding") {
            return Err("Transfer-Encoding is not supported; send a Content-Length".into());
        }
        if k.eq_ignore_ascii_case("content-length") {
            length = v.trim().parse().map_err(|_| "bad content-length")?;
        }
        if k.eq_ignore_ascii_case("connection") && v.trim().eq_ignore_ascii_case("close") {
            close = true;
        }
    }
    if length > MAX_BODY {
        return Err("body too large".into());
    }
    Ok((length, close))
}

async fn write_response<S: AsyncWrite + Unpin>(
    stream: &mut S,
    r: &HttpResponse,
    close: bool,
) -> std::io::Result<()> {
    let head = format!(
        "HTTP/1.1 {} {}\r\nContent-Type: {}\r\nContent-Length: {}\r\nConnection: {}\r\n\r\n",
        r.status,
        reason(r.status),
        r.content_type,
        r.body.len(),
        if close { "close" } else { "keep-alive" },
    );
    let mut out = head.into_bytes();
    out.extend_from_slice(&r.body);
    stream.write_all(&out).await?;
    if close {
        stream.shutdown().await?;
    }
    Ok(())
}

/// Answers the requests of one connection with `handler`, in order, until the client closes
/// or asks to (`Connection: close`); a malformed request gets a 400 and ends the connection.
async fn serve_connection<S, H, F>(mut stream: S, handler: H)
where
    S: AsyncRead + AsyncWrite + Unpin,
    H: Fn(HttpRequest) -> F,
    F: std::future::Future<Output = HttpResponse>,
{
    let mut conn = ConnBuf::default();
    loop {
        let (response, close) = match next_request(&mut stream, &mut conn).await {
            Ok(None) => return,
            Ok(Some(req)) => {
                let close = req.close;
                (handler(req).await, close)
            }
            Err(e) => (HttpResponse::error(400, e), true),
        };
        if write_response(&mut stream, &response, close).await.is_err() || close {
            return;
        }
    }
}

/// Binds the control socket at `path` with mode 0600 (removing a stale socket file).
pub fn bind(path: &Path) -> std::io::Result<UnixListener> {
    use std::os::unix::fs::PermissionsExt;
    if path.exists() {
        std::fs::remove_file(path)?;
    }
    let listener = UnixListener::bind(path)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    Ok(listener)
}

/// Serves requests with `handler` until the listener fails. Connections are kept open
/// between requests (HTTP/1.1 keep-alive) unless the client sends `Connection: close`.
pub async fn serve<H, F>(listener: UnixListener, handler: H)
where
    H: Fn(HttpRequest) -> F + Clone + Send + Sync + 'static,
    F: std::future::Future<Output = HttpResponse> + Send + 'static,
{
    while let Ok((stream, _)) = listener.accept().await {
        tokio::spawn(serve_connection(stream, handler.clone()));
    }
}

/// Serves plain-text responses from `render` on a TCP address (Prometheus metrics).
pub async fn serve_tcp<H, F>(listener: tokio::net::TcpListener, render: H)
where
    H: Fn(HttpRequest) -> F + Clone + Send + Sync + 'static,
    F: std::future::Future<Output = HttpResponse> + Send + 'static,
{
    while let Ok((stream, _)) = listener.accept().await {
        let render = render.clone();
        tokio::spawn(serve_connection(stream, move |req: HttpRequest| {
            let render = render.clone();
            async move {
                if req.body.is_empty() {
                    render(req).await
                } else {
                    HttpResponse::error(400, "the metrics endpoint takes no request body")
                }
            }
        }));
    }
}

/// A client of a node's control socket that keeps its connection open between requests
/// (HTTP/1.1 keep-alive), for callers that send many.
pub struct ControlClient {
    stream: UnixStream,
    conn: ConnBuf,
}

impl ControlClient {
    /// Connects to the control socket at `path`.
    pub async fn connect(path: &Path) -> Result<Self, String> {
        let stream = UnixStream::connect(path).await.map_err(|e| {
            format!(
                "cannot reach the node's control socket {}: {e} (is the node running, and is --data-dir right?)",
                path.display()
            )
        })?;
        Ok(ControlClient {
            stream,
            conn: ConnBuf::default(),
        })
    }

    /// Sends one request and reads its answer. After an `Err` the connection is in an
    /// unknown state: connect again.
    pub async fn request(
        &mut self,
        method: &str,
        target: &str,
        body: &[u8],
    ) -> Result<HttpResponse, String> {
        self.send(method, target, body, false).await
    }

    async fn send(
        &mut self,
        method: &str,
        target: &str,
        body: &[u8],
        close: bool,
    ) -> Result<HttpResponse, String> {
        let mut out = format!(
            "{method} {target} HTTP/1.1\r\nHost: starling\r\nContent-Length: {}\r\n{}\r\n",
            body.len(),
            if close { "Connection: close\r\n" } else { "" },
        )
        .into_bytes();
        out.extend_from_slice(body);
        self.stream
            .write_all(&out)
            .await
            .map_err(|e| e.to_string())?;
        let (head, body, _) = read_message(&mut self.stream, &mut self.conn).await?;
        let status: u16 = head
            .split("\r\n")
            .next()
            .and_then(|l| l.split(' ').nth(1))
            .and_then(|s| s.parse().ok())
            .ok_or("bad status line")?;
        Ok(HttpResponse {
            status,
            body,
            content_type: "application/json",
        })
    }
}

/// Sends one request to the control socket at `path` on a connection of its own.
pub async fn call(
    path: &Path,
    method: &str,
    target: &str,
    body: &[u8],
) -> Result<HttpResponse, String> {
    ControlClient::connect(path)
        .await?
        .send(method, target, body, true)
        .await
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn percent_round_trip() {
        for s in ["a/b c", "x%y", "ключ", "", "plain"] {
            assert_eq!(percent_decode(&percent_encode(s)), s);
        }
        assert_eq!(percent_decode("%zz%"), "%zz%");
    }

    #[tokio::test]
    async fn request_and_response_over_a_socket() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.sock");
        let listener = bind(&path).unwrap();
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        tokio::spawn(serve(listener, |req: HttpRequest| async move {
            HttpResponse::json(
                200,
                &serde_json::json!({"m": req.method, "p": req.path, "q": req.param("x"), "n": req.body.len()}),
            )
        }));
        let r = call(&path, "PUT", "/v1/kv/a%2Fb?x=1", b"hello")
            .await
            .unwrap();
        assert_eq!(r.status, 200);
        let v: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
        assert_eq!(v["p"], "/v1/kv/a/b");
        assert_eq!(v["q"], "1");
        assert_eq!(v["n"], 5);
    }

    #[tokio::test]
    async fn one_connection_carries_many_requests_even_pipelined() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.sock");
        let listener = bind(&path).unwrap();
        tokio::spawn(serve(listener, |req: HttpRequest| async move {
            HttpResponse::json(
                200,
                &serde_json::json!({"p": req.path, "n": req.body.len()}),
            )
        }));
        let mut client = ControlClient::connect(&path).await.unwrap();
        for i in 0..3 {
            let body = vec![b'x'; i];
            let r = client
                .request("PUT", &format!("/v1/kv/k{i}"), &body)
                .await
                .unwrap();
            let v: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
            assert_eq!(
                (v["p"].as_str().unwrap(), v["n"].as_u64().unwrap()),
                (&*format!("/v1/kv/k{i}"), i as u64)
            );
        }
        // Two requests in one write: two answers, in order, then the close is honoured.
        let mut raw = UnixStream::connect(&path).await.unwrap();
        raw.write_all(
            b"PUT /a HTTP/1.1\r\nContent-Length: 2\r\n\r\nhiGET /b HTTP/1.1\r\nConnection: close\r\n\r\n",
        )
        .await
        .unwrap();
        let mut out = String::new();
        raw.read_to_string(&mut out).await.unwrap();
        let a = out.find("\"p\":\"/a\"").unwrap();
        let b = out.find("\"p\":\"/b\"").unwrap();
        assert!(a < b, "{out}");
        assert!(out.contains("Connection: close"), "{out}");
    }

    #[tokio::test]
    async fn chunked_bodies_and_truncated_heads_are_refused() {
        let chunked =
            b"POST /v1/kv/a HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n";
        let err = read_request(&mut &chunked[..]).await.unwrap_err();
        assert!(err.contains("Transfer-Encoding"), "{err}");
        let truncated = b"GET /v1/status HTTP/1.1\r\nHost: x";
        let err = read_request(&mut &truncated[..]).await.unwrap_err();
        assert!(err.contains("closed"), "{err}");
        let ok = b"GET /v1/status HTTP/1.1\r\n\r\n";
        assert_eq!(read_request(&mut &ok[..]).await.unwrap().path, "/v1/status");
    }
}
