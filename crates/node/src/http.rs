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

/// Reads one request within [`READ_TIMEOUT`]; `Err` with a reason for anything malformed or slow.
async fn read_request_timed<S: AsyncRead + Unpin>(stream: &mut S) -> Result<HttpRequest, String> {
    tokio::time::timeout(READ_TIMEOUT, read_request(stream))
        .await
        .map_err(|_| format!("request not received within {} s", READ_TIMEOUT.as_secs()))?
}

/// Reads one request; `Err` with a reason for anything malformed.
async fn read_request<S: AsyncRead + Unpin>(stream: &mut S) -> Result<HttpRequest, String> {
    let (head, mut body) = read_head(stream).await?;
    let mut lines = head.split("\r\n");
    let request_line = lines.next().ok_or("empty request")?;
    let mut parts = request_line.split(' ');
    let method = parts.next().ok_or("no method")?.to_owned();
    let target = parts.next().ok_or("no path")?;
    let length = content_length(lines)?;
    read_body(stream, &mut body, length).await?;
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
    })
}

async fn read_head<S: AsyncRead + Unpin>(stream: &mut S) -> Result<(String, Vec<u8>), String> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8(buf[..end].to_vec()).map_err(|_| "head is not UTF-8")?;
            return Ok((head, buf[end + 4..].to_vec()));
        }
        if buf.len() > 64 * 1024 {
            return Err("header too large".into());
        }
        let n = stream.read(&mut chunk).await.map_err(|e| e.to_string())?;
        if n == 0 {
            return Err("connection closed in the header".into());
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

fn content_length<'a>(lines: impl Iterator<Item = &'a str>) -> Result<usize, String> {
    let mut length = 0;
    for line in lines {
        if let Some((k, _)) = line.split_once(':')
            && k.trim().eq_ignore_ascii_case("transfer-encoding")
        {
            return Err("Transfer-Encoding is not supported; send a Content-Length".into());
        }
        if let Some((k, v)) = line.split_once(':')
            && k.trim().eq_ignore_ascii_case("content-length")
        {
            length = v.trim().parse().map_err(|_| "bad content-length")?;
        }
    }
    if length > MAX_BODY {
        return Err("body too large".into());
    }
    Ok(length)
}

async fn read_body<S: AsyncRead + Unpin>(
    stream: &mut S,
    body: &mut Vec<u8>,
    length: usize,
) -> Result<(), String> {
    let mut chunk = [0u8; 8192];
    while body.len() < length {
        let n = stream.read(&mut chunk).await.map_err(|e| e.to_string())?;
        if n == 0 {
            return Err("connection closed in the body".into());
        }
        body.extend_from_slice(&chunk[..n]);
    }
    body.truncate(length);
    Ok(())
}

async fn write_response<S: AsyncWrite + Unpin>(
    stream: &mut S,
    r: &HttpResponse,
) -> std::io::Result<()> {
    let head = format!(
        "HTTP/1.1 {} {}\r\nContent-Type: {}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        r.status,
        reason(r.status),
        r.content_type,
        r.body.len()
    );
    stream.write_all(head.as_bytes()).await?;
    stream.write_all(&r.body).await?;
    stream.shutdown().await
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

/// Serves requests with `handler` until the listener fails.
pub async fn serve<H, F>(listener: UnixListener, handler: H)
where
    H: Fn(HttpRequest) -> F + Clone + Send + Sync + 'static,
    F: std::future::Future<Output = HttpResponse> + Send,
{
    while let Ok((mut stream, _)) = listener.accept().await {
        let handler = handler.clone();
        tokio::spawn(async move {
            let response = match read_request_timed(&mut stream).await {
                Ok(req) => handler(req).await,
                Err(e) => HttpResponse::error(400, e),
            };
            let _ = write_response(&mut stream, &response).await;
        });
    }
}

/// Serves plain-text responses from `render` on a TCP address (Prometheus metrics).
pub async fn serve_tcp<H, F>(listener: tokio::net::TcpListener, render: H)
where
    H: Fn(HttpRequest) -> F + Clone + Send + Sync + 'static,
    F: std::future::Future<Output = HttpResponse> + Send,
{
    while let Ok((mut stream, _)) = listener.accept().await {
        let render = render.clone();
        tokio::spawn(async move {
            let response = match read_request_timed(&mut stream).await {
                Ok(req) if !req.body.is_empty() => {
                    HttpResponse::error(400, "the metrics endpoint takes no request body")
                }
                Ok(req) => render(req).await,
                Err(e) => HttpResponse::error(400, e),
            };
            let _ = write_response(&mut stream, &response).await;
        });
    }
}

/// Sends one request to the control socket at `path`.
pub async fn call(
    path: &Path,
    method: &str,
    target: &str,
    body: &[u8],
) -> Result<HttpResponse, String> {
    let mut stream = UnixStream::connect(path).await.map_err(|e| {
        format!(
            "cannot reach the node's control socket {}: {e} (is the node running, and is --data-dir right?)",
            path.display()
        )
    })?;
    let head = format!(
        "{method} {target} HTTP/1.1\r\nHost: starling\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    stream
        .write_all(head.as_bytes())
        .await
        .map_err(|e| e.to_string())?;
    stream.write_all(body).await.map_err(|e| e.to_string())?;
    let (head, mut rest) = read_head(&mut stream).await?;
    let mut lines = head.split("\r\n");
    let status_line = lines.next().ok_or("empty response")?;
    let status: u16 = status_line
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or("bad status line")?;
    let length = content_length(lines)?;
    read_body(&mut stream, &mut rest, length).await?;
    Ok(HttpResponse {
        status,
        body: rest,
        content_type: "application/json",
    })
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
