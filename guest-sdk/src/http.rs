//! WAGI-style HTTP functions: the request from environment variables and stdin, the
//! response as a CGI header block and body on stdout.

use std::fmt::{self, Display};
use std::io::{Read, Write};

/// Exit status of an instance whose handler panicked (`EX_SOFTWARE`).
pub const PANIC_EXIT_STATUS: i32 = 70;

/// An HTTP request as wafer hands it to a function.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    method: String,
    path: String,
    query: String,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Request {
    /// Reads the request of this invocation: environment variables and all of stdin.
    ///
    /// A variable that is not UTF-8 (which a host other than wafer may pass on from a
    /// header) is read with U+FFFD in place of the bytes that are not.
    pub fn from_env() -> std::io::Result<Request> {
        let mut body = Vec::new();
        std::io::stdin().read_to_end(&mut body)?;
        let text = |s: std::ffi::OsString| {
            s.into_string()
                .unwrap_or_else(|s| s.to_string_lossy().into_owned())
        };
        let vars = std::env::vars_os().map(|(k, v)| (text(k), text(v)));
        Ok(Request::from_vars(vars, body))
    }

    /// Builds a request from WAGI/CGI variables (`REQUEST_METHOD`, `PATH_INFO`,
    /// `QUERY_STRING`, `CONTENT_TYPE`, `CONTENT_LENGTH` and `HTTP_*`) and a body.
    ///
    /// Header names are reconstructed from `HTTP_X_FOO` as `x-foo`. Missing variables
    /// give `GET`, `/` and an empty query.
    pub fn from_vars<I, K, V>(vars: I, body: Vec<u8>) -> Request
    where
        I: IntoIterator<Item = (K, V)>,
        K: AsRef<str>,
        V: Into<String>,
    {
        let mut method = String::from("GET");
        let mut path = String::from("/");
        let mut query = String::new();
        let mut headers = Vec::new();
        for (key, value) in vars {
            let key = key.as_ref();
            match key {
                "REQUEST_METHOD" => method = value.into(),
                "PATH_INFO" => {
                    let value: String = value.into();
                    path = if value.is_empty() { "/".into() } else { value };
                }
                "QUERY_STRING" => query = value.into(),
                "CONTENT_TYPE" => headers.push(("content-type".to_string(), value.into())),
                "CONTENT_LENGTH" => headers.push(("content-length".to_string(), value.into())),
                _ => {
                    if let Some(name) = key.strip_prefix("HTTP_") {
                        let name = name
                            .chars()
                            .map(|c| match c {
                                '_' => '-',
                                c => c.to_ascii_lowercase(),
                            })
                            .collect();
                        headers.push((name, value.into()));
                    }
                }
            }
        }
        headers.sort_by(|a, b| a.0.cmp(&b.0));
        Request {
            method,
            path,
            query,
            headers,
            body,
        }
    }

    /// The HTTP method, upper case (`GET`, `POST`, ...).
    pub fn method(&self) -> &str {
        &self.method
    }

    /// The path below the function's route: `/a/b` for `/fn/NAME/a/b`, `/` for `/fn/NAME`.
    pub fn path(&self) -> &str {
        &self.path
    }

    /// The raw query string, without the `?`.
    pub fn query(&self) -> &str {
        &self.query
    }

    /// The query string decoded into `(name, value)` pairs, in order.
    pub fn query_pairs(&self) -> Vec<(String, String)> {
        form_urlencoded::parse(self.query.as_bytes())
            .map(|(k, v)| (k.into_owned(), v.into_owned()))
            .collect()
    }

    /// The first value of query parameter `name`, decoded.
    pub fn query_param(&self, name: &str) -> Option<String> {
        form_urlencoded::parse(self.query.as_bytes())
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.into_owned())
    }

    /// All headers as `(lower-case name, value)`, sorted by name.
    pub fn headers(&self) -> &[(String, String)] {
        &self.headers
    }

    /// The first value of header `name` (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// The request body.
    pub fn body(&self) -> &[u8] {
        &self.body
    }

    /// Takes the request body, leaving it empty.
    pub fn take_body(&mut self) -> Vec<u8> {
        std::mem::take(&mut self.body)
    }
}

/// An HTTP response a function returns.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Response {
    /// A response with `status` and no headers or body.
    pub fn new(status: u16) -> Response {
        Response {
            status,
            headers: Vec::new(),
            body: Vec::new(),
        }
    }

    /// A `200 OK` response.
    pub fn ok() -> Response {
        Response::new(200)
    }

    /// A plain-text response with `status`.
    pub fn text(status: u16, body: impl Into<String>) -> Response {
        Response::new(status)
            .header("content-type", "text/plain; charset=utf-8")
            .body(body.into())
    }

    /// Adds a header. Names and values must not contain line breaks; any that do are
    /// replaced with spaces so the header block stays well formed.
    pub fn header(mut self, name: impl Into<String>, value: impl Into<String>) -> Response {
        let clean = |s: String| {
            if s.contains(['\r', '\n']) {
                s.replace(['\r', '\n'], " ")
            } else {
                s
            }
        };
        self.headers.push((clean(name.into()), clean(value.into())));
        self
    }

    /// Sets the body.
    pub fn body(mut self, body: impl Into<Vec<u8>>) -> Response {
        self.body = body.into();
        self
    }

    /// The status code.
    pub fn status(&self) -> u16 {
        self.status
    }

    /// The headers, in the order they were added.
    pub fn headers(&self) -> &[(String, String)] {
        &self.headers
    }

    /// The body bytes.
    pub fn body_bytes(&self) -> &[u8] {
        &self.body
    }

    /// The response as the CGI output a WAGI host reads: `Status:`, headers, a blank
    /// line, then the body.
    pub fn to_cgi(&self) -> Vec<u8> {
        let head: usize = self
            .headers
            .iter()
            .map(|(k, v)| k.len() + v.len() + 3)
            .sum();
        let mut out = Vec::with_capacity(16 + head + 1 + self.body.len());
        out.extend_from_slice(b"Status: ");
        out.extend_from_slice(self.status.to_string().as_bytes());
        out.push(b'\n');
        for (name, value) in &self.headers {
            out.extend_from_slice(name.as_bytes());
            out.extend_from_slice(b": ");
            out.extend_from_slice(value.as_bytes());
            out.push(b'\n');
        }
        out.push(b'\n');
        out.extend_from_slice(&self.body);
        out
    }

    /// Parses CGI output (`Name: value` lines, a blank line, the body). `Status: 404
    /// Not Found` sets the status; without it the status is 200. Returns `None` when the
    /// output does not begin with a header block.
    pub fn from_cgi(output: &[u8]) -> Option<Response> {
        let head = CgiHead::parse(output)?;
        Some(Response {
            status: head.status,
            headers: head
                .headers
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            body: output[head.body_offset..].to_vec(),
        })
    }
}

/// The header block of CGI output, borrowed from it: what a host needs to build an
/// HTTP response without copying the body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CgiHead<'a> {
    /// The status (`Status:`, a final HTTP status from 200 to 599); without one, 302
    /// when there is a `Location:` header (a CGI redirect), else 200.
    pub status: u16,
    /// The other headers, in order, names as written.
    pub headers: Vec<(&'a str, &'a str)>,
    /// Where the body starts in the output.
    pub body_offset: usize,
}

impl<'a> CgiHead<'a> {
    /// Parses the header block at the start of `output`; `None` when the output does
    /// not begin with one (`Name: value` lines ended by a blank line, and a `Status:`
    /// if any that is a final HTTP status).
    pub fn parse(output: &'a [u8]) -> Option<CgiHead<'a>> {
        let (head_len, body_offset) = split_header_block(output)?;
        let text = std::str::from_utf8(&output[..head_len]).ok()?;
        let mut status = None;
        let mut redirect = false;
        let mut headers = Vec::new();
        for line in text.lines() {
            let line = line.trim_end_matches('\r');
            let (name, value) = line.split_once(':')?;
            let name = name.trim();
            if name.is_empty() || name.contains(char::is_whitespace) {
                return None;
            }
            let value = value.trim();
            if name.eq_ignore_ascii_case("status") {
                let code = value.split_whitespace().next()?;
                status = Some(code.parse().ok().filter(|c| (200..=599).contains(c))?);
            } else {
                redirect |= name.eq_ignore_ascii_case("location");
                headers.push((name, value));
            }
        }
        Some(CgiHead {
            status: status.unwrap_or(if redirect { 302 } else { 200 }),
            headers,
            body_offset,
        })
    }
}

impl From<String> for Response {
    fn from(body: String) -> Response {
        Response::text(200, body)
    }
}

impl From<&str> for Response {
    fn from(body: &str) -> Response {
        Response::text(200, body)
    }
}

/// Finds the first blank line (`\n\n` or `\n\r\n`) of CGI output: the header block's
/// length and where the body starts.
fn split_header_block(output: &[u8]) -> Option<(usize, usize)> {
    let mut from = 0;
    while let Some(i) = output[from..]
        .iter()
        .position(|&b| b == b'\n')
        .map(|i| from + i)
    {
        // Line ends at i; is the next line empty?
        let rest = &output[i + 1..];
        if rest.first() == Some(&b'\n') {
            return Some((i, i + 2));
        }
        if rest.starts_with(b"\r\n") {
            return Some((i, i + 3));
        }
        from = i + 1;
    }
    None
}

/// Writes a 500 response naming `message`.
fn error_response(message: &str) -> Response {
    Response::text(500, format!("{message}\n"))
}

/// Writes `response` to stdout as CGI output.
fn write_response(response: &Response) -> std::io::Result<()> {
    let mut stdout = std::io::stdout().lock();
    stdout.write_all(&response.to_cgi())?;
    stdout.flush()
}

/// Runs an HTTP function: reads the request, calls `handler`, writes its response.
///
/// `Err(e)` becomes a `500` whose body is `e`'s message; a panic becomes a `500` naming
/// the panic and the instance exits with [`PANIC_EXIT_STATUS`].
pub fn serve<F, R, E>(handler: F)
where
    F: FnOnce(Request) -> Result<R, E>,
    R: Into<Response>,
    E: Display,
{
    std::panic::set_hook(Box::new(|info| {
        let message = panic_message(info);
        eprintln!("{message}");
        // Nothing was written yet: the response is buffered until the handler returns.
        let _ = write_response(&error_response(&message));
        std::process::exit(PANIC_EXIT_STATUS);
    }));
    let response = match Request::from_env() {
        Ok(request) => match handler(request) {
            Ok(response) => response.into(),
            Err(err) => {
                let message = err.to_string();
                crate::log(crate::Level::Error, &message);
                error_response(&message)
            }
        },
        Err(err) => error_response(&format!("reading the request body: {err}")),
    };
    if let Err(err) = write_response(&response) {
        eprintln!("writing the response: {err}");
        std::process::exit(1);
    }
}

fn panic_message(info: &std::panic::PanicHookInfo<'_>) -> String {
    let payload = info
        .payload()
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| info.payload().downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "unknown panic payload".to_string());
    match info.location() {
        Some(loc) => format!(
            "function panicked at {}:{}: {payload}",
            loc.file(),
            loc.line()
        ),
        None => format!("function panicked: {payload}"),
    }
}

/// A message for errors that carry only text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Error(pub String);

impl Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Error {}

#[cfg(test)]
mod tests {
    use super::*;

    fn vars(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn request_from_wagi_vars() {
        let req = Request::from_vars(
            vars(&[
                ("REQUEST_METHOD", "POST"),
                ("PATH_INFO", "/a/b"),
                ("QUERY_STRING", "name=J%C3%BCrgen&x=1&x=2&sp=a+b"),
                ("HTTP_X_TRACE_ID", "abc"),
                ("HTTP_ACCEPT", "text/plain"),
                ("CONTENT_TYPE", "application/json"),
                ("CONTENT_LENGTH", "2"),
                ("UNRELATED", "ignored"),
            ]),
            b"{}".to_vec(),
        );
        assert_eq!(req.method(), "POST");
        assert_eq!(req.path(), "/a/b");
        assert_eq!(req.query_param("name").as_deref(), Some("Jürgen"));
        assert_eq!(req.query_param("sp").as_deref(), Some("a b"));
        assert_eq!(req.query_param("x").as_deref(), Some("1"));
        assert_eq!(req.query_param("missing"), None);
        assert_eq!(req.query_pairs().len(), 4);
        assert_eq!(req.header("X-Trace-Id"), Some("abc"));
        assert_eq!(req.header("content-type"), Some("application/json"));
        assert_eq!(req.header("content-length"), Some("2"));
        assert!(req.header("unrelated").is_none());
        assert_eq!(req.headers().len(), 4);
        assert_eq!(req.body(), b"{}");
    }

    #[test]
    fn request_defaults_when_vars_missing() {
        let req = Request::from_vars(Vec::<(String, String)>::new(), Vec::new());
        assert_eq!(req.method(), "GET");
        assert_eq!(req.path(), "/");
        assert_eq!(req.query(), "");
        assert!(req.headers().is_empty());
    }

    #[test]
    fn response_round_trips_through_cgi() {
        let resp = Response::new(201)
            .header("Content-Type", "application/json")
            .header("X-Evil", "a\r\nStatus: 999")
            .body(b"{\"ok\":true}\n\nmore".to_vec());
        let cgi = resp.to_cgi();
        let parsed = Response::from_cgi(&cgi).expect("valid CGI output");
        assert_eq!(parsed.status(), 201);
        assert_eq!(
            parsed.headers(),
            &[
                ("Content-Type".to_string(), "application/json".to_string()),
                ("X-Evil".to_string(), "a  Status: 999".to_string()),
            ]
        );
        assert_eq!(parsed.body_bytes(), b"{\"ok\":true}\n\nmore");
    }

    #[test]
    fn cgi_head_borrows_headers_and_points_at_the_body() {
        let output = b"Content-Type: text/plain\nStatus: 202\r\nX-B:  two \n\nbody\n\nrest";
        let head = CgiHead::parse(output).expect("valid CGI output");
        assert_eq!(head.status, 202);
        assert_eq!(
            head.headers,
            vec![("Content-Type", "text/plain"), ("X-B", "two")]
        );
        assert_eq!(&output[head.body_offset..], b"body\n\nrest");
        let empty_body = CgiHead::parse(b"X-A: 1\r\n\r\n").expect("valid");
        assert_eq!(empty_body.body_offset, 10);
    }

    #[test]
    fn cgi_with_crlf_and_reason_phrase() {
        let parsed = Response::from_cgi(b"Status: 404 Not Found\r\nX-A: 1\r\n\r\nnope")
            .expect("valid CGI output");
        assert_eq!(parsed.status(), 404);
        assert_eq!(parsed.headers(), &[("X-A".to_string(), "1".to_string())]);
        assert_eq!(parsed.body_bytes(), b"nope");
    }

    #[test]
    fn cgi_location_without_status_is_a_redirect() {
        let head = CgiHead::parse(b"Location: /elsewhere\n\n").expect("valid");
        assert_eq!(head.status, 302);
        assert_eq!(head.headers, vec![("Location", "/elsewhere")]);
        let head = CgiHead::parse(b"Location: /new\nStatus: 301\n\n").expect("valid");
        assert_eq!(head.status, 301);
    }

    #[test]
    fn cgi_without_status_is_200() {
        let parsed = Response::from_cgi(b"Content-Type: text/plain\n\nhi").expect("valid");
        assert_eq!(parsed.status(), 200);
        assert_eq!(parsed.body_bytes(), b"hi");
    }

    #[test]
    fn plain_output_is_not_cgi() {
        assert!(Response::from_cgi(b"hello world\n\nsecond paragraph").is_none());
        assert!(Response::from_cgi(b"no blank line: at all").is_none());
        assert!(Response::from_cgi(b"Status: abc\n\nbody").is_none());
        // Not final HTTP statuses.
        assert!(Response::from_cgi(b"Status: 999 Weird\n\nbody").is_none());
        assert!(Response::from_cgi(b"Status: 101\n\nbody").is_none());
        assert!(Response::from_cgi(b"").is_none());
    }
}
