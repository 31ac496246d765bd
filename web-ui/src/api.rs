//! Calls to wafer's REST API with the user's token (`fetch`), the upload with progress
//! (`XMLHttpRequest`), and the server-sent event stream read from a `fetch` body (an
//! `EventSource` cannot send the `Authorization` header).

use std::cell::RefCell;
use std::fmt;
use std::rc::Rc;

use js_sys::{Reflect, Uint8Array};
use serde::de::DeserializeOwned;
use wasm_bindgen::closure::Closure;
use wasm_bindgen::{JsCast, JsValue};
use wasm_bindgen_futures::JsFuture;
use web_sys::{AbortSignal, Headers, ReadableStreamDefaultReader, RequestInit, Response};

/// Why a call failed: the API's error (status, code, message) or a network failure
/// (status 0).
#[derive(Debug, Clone, PartialEq)]
pub struct ApiError {
    /// HTTP status; 0 when no answer came.
    pub status: u16,
    /// The API's error code (`unauthorized`, `not_found`, ...), or `network`.
    pub code: String,
    /// For people.
    pub message: String,
    /// The guest's log tail, when a function failed.
    pub log: String,
}

impl ApiError {
    fn network(what: &str, e: JsValue) -> ApiError {
        let detail = e
            .dyn_ref::<js_sys::Error>()
            .map(|e| String::from(e.message()))
            .or_else(|| e.as_string())
            .unwrap_or_else(|| "no answer".into());
        ApiError {
            status: 0,
            code: "network".into(),
            message: format!("{what}: {detail}"),
            log: String::new(),
        }
    }

    fn from_reply(reply: &Reply) -> ApiError {
        let json: serde_json::Value = serde_json::from_slice(&reply.body).unwrap_or_default();
        let text = |key: &str| json[key].as_str().unwrap_or_default().to_string();
        let mut message = text("message");
        if message.is_empty() {
            message = String::from_utf8_lossy(&reply.body).trim().to_string();
        }
        ApiError {
            status: reply.status,
            code: text("error"),
            message,
            log: text("log"),
        }
    }

    /// The token is not (or no longer) valid.
    pub fn is_unauthorized(&self) -> bool {
        self.status == 401
    }
}

impl fmt::Display for ApiError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.status {
            0 => write!(f, "{}", self.message),
            s if self.code.is_empty() => write!(f, "{s}: {}", self.message),
            s => write!(f, "{s} {}: {}", self.code, self.message),
        }
    }
}

/// An HTTP answer.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Reply {
    /// Status code.
    pub status: u16,
    /// Headers, lower-case names, in the order the browser gives them.
    pub headers: Vec<(String, String)>,
    /// Body bytes.
    pub body: Vec<u8>,
}

fn js_err(what: &'static str) -> impl Fn(JsValue) -> ApiError {
    move |e| ApiError::network(what, e)
}

async fn fetch(
    method: &str,
    path: &str,
    token: &str,
    headers: &[(String, String)],
    body: Option<&[u8]>,
    signal: Option<&AbortSignal>,
) -> Result<Response, ApiError> {
    let window = web_sys::window().ok_or_else(|| ApiError::network("fetch", "no window".into()))?;
    let init = RequestInit::new();
    init.set_method(method);
    let h = Headers::new().map_err(js_err("headers"))?;
    for (name, value) in headers {
        h.append(name, value)
            .map_err(|_| ApiError::network("headers", format!("bad header `{name}`").into()))?;
    }
    if !token.is_empty() {
        h.set("authorization", &format!("Bearer {token}"))
            .map_err(js_err("headers"))?;
    }
    init.set_headers(&h);
    if let Some(body) = body {
        init.set_body(&Uint8Array::from(body).into());
    }
    init.set_signal(signal);
    let response = JsFuture::from(window.fetch_with_str_and_init(path, &init))
        .await
        .map_err(js_err("the server did not answer"))?;
    response
        .dyn_into::<Response>()
        .map_err(js_err("the server did not answer"))
}

/// Sends a request and reads the whole answer, whatever its status.
pub async fn send(
    method: &str,
    path: &str,
    token: &str,
    headers: &[(String, String)],
    body: Option<&[u8]>,
) -> Result<Reply, ApiError> {
    let response = fetch(method, path, token, headers, body, None).await?;
    let mut reply = Reply {
        status: response.status(),
        ..Reply::default()
    };
    if let Ok(Some(entries)) = js_sys::try_iter(&response.headers()) {
        for entry in entries.flatten() {
            let pair = js_sys::Array::from(&entry);
            reply.headers.push((
                pair.get(0).as_string().unwrap_or_default(),
                pair.get(1).as_string().unwrap_or_default(),
            ));
        }
    }
    let buffer = JsFuture::from(response.array_buffer().map_err(js_err("reading"))?)
        .await
        .map_err(js_err("reading the answer"))?;
    reply.body = Uint8Array::new(&buffer).to_vec();
    Ok(reply)
}

/// Sends a request; a status of 400 or above is an [`ApiError`].
pub async fn call(
    method: &str,
    path: &str,
    token: &str,
    json: Option<&serde_json::Value>,
) -> Result<Reply, ApiError> {
    let body = json.map(|j| j.to_string().into_bytes());
    let headers = if body.is_some() {
        vec![("content-type".to_string(), "application/json".to_string())]
    } else {
        Vec::new()
    };
    let reply = send(method, path, token, &headers, body.as_deref()).await?;
    if reply.status >= 400 {
        return Err(ApiError::from_reply(&reply));
    }
    Ok(reply)
}

/// `GET path` as JSON.
pub async fn get<T: DeserializeOwned>(path: &str, token: &str) -> Result<T, ApiError> {
    let reply = call("GET", path, token, None).await?;
    serde_json::from_slice(&reply.body).map_err(|e| ApiError {
        status: reply.status,
        code: "bad_answer".into(),
        message: format!("unexpected answer from {path}: {e}"),
        log: String::new(),
    })
}

/// Percent-encodes one path segment or query value.
pub fn encode(value: &str) -> String {
    String::from(js_sys::encode_uri_component(value))
}

/// Uploads `file` with `PUT path`, reporting `(sent, total)` bytes as it goes.
pub async fn upload(
    path: &str,
    token: &str,
    file: web_sys::File,
    progress: impl Fn(f64, f64) + 'static,
) -> Result<Reply, ApiError> {
    let xhr = web_sys::XmlHttpRequest::new().map_err(js_err("upload"))?;
    xhr.open("PUT", path).map_err(js_err("upload"))?;
    xhr.set_request_header("authorization", &format!("Bearer {token}"))
        .map_err(js_err("upload"))?;
    xhr.set_request_header("content-type", "application/wasm")
        .map_err(js_err("upload"))?;
    let on_progress =
        Closure::<dyn Fn(web_sys::ProgressEvent)>::new(move |e: web_sys::ProgressEvent| {
            if e.length_computable() {
                progress(e.loaded(), e.total());
            }
        });
    xhr.upload()
        .map_err(js_err("upload"))?
        .set_onprogress(Some(on_progress.as_ref().unchecked_ref()));
    let done = js_sys::Promise::new(&mut |resolve, reject| {
        xhr.set_onload(Some(&resolve));
        xhr.set_onerror(Some(&reject));
        xhr.set_onabort(Some(&reject));
    });
    xhr.send_with_opt_blob(Some(&file))
        .map_err(js_err("upload"))?;
    JsFuture::from(done)
        .await
        .map_err(|_| ApiError::network("upload", "the connection failed".into()))?;
    drop(on_progress);
    let reply = Reply {
        status: xhr.status().unwrap_or_default(),
        headers: Vec::new(),
        body: xhr
            .response_text()
            .ok()
            .flatten()
            .unwrap_or_default()
            .into_bytes(),
    };
    if reply.status >= 400 {
        return Err(ApiError::from_reply(&reply));
    }
    Ok(reply)
}

/// One server-sent event: its name and JSON data.
#[derive(Debug, Clone, PartialEq)]
pub struct StreamEvent {
    /// `deployed`, `task_changed`, `stats`, ...
    pub name: String,
    /// Its data.
    pub data: serde_json::Value,
}

/// Parses the complete events at the front of `buffer` (SSE framing: `field: value`
/// lines, a blank line after each event), leaving any incomplete rest there.
pub fn parse_events(buffer: &mut Vec<u8>) -> Vec<StreamEvent> {
    let mut events = Vec::new();
    loop {
        let end = buffer.windows(2).position(|w| w == b"\n\n");
        let Some(end) = end else { break };
        let block: Vec<u8> = buffer.drain(..end + 2).collect();
        let text = String::from_utf8_lossy(&block);
        let mut name = String::from("message");
        let mut data = String::new();
        for line in text.lines() {
            if let Some(v) = line.strip_prefix("event:") {
                name = v.trim().to_string();
            } else if let Some(v) = line.strip_prefix("data:") {
                if !data.is_empty() {
                    data.push('\n');
                }
                data.push_str(v.strip_prefix(' ').unwrap_or(v));
            }
        }
        if data.is_empty() {
            continue; // a keep-alive comment
        }
        events.push(StreamEvent {
            name,
            data: serde_json::from_str(&data).unwrap_or(serde_json::Value::String(data)),
        });
    }
    events
}

/// Follows `GET /v1/events` until the stream ends, fails or `signal` aborts it, passing
/// each event to `on_event`.
pub async fn follow_events(
    token: &str,
    signal: &AbortSignal,
    on_event: Rc<dyn Fn(StreamEvent)>,
) -> Result<(), ApiError> {
    let response = fetch("GET", "/v1/events", token, &[], None, Some(signal)).await?;
    if response.status() >= 400 {
        let status = response.status();
        return Err(ApiError {
            status,
            code: if status == 401 {
                "unauthorized"
            } else {
                "error"
            }
            .into(),
            message: format!("the event stream was refused ({status})"),
            log: String::new(),
        });
    }
    let body = response
        .body()
        .ok_or_else(|| ApiError::network("events", "no body".into()))?;
    let reader: ReadableStreamDefaultReader = body.get_reader().unchecked_into();
    let buffer = RefCell::new(Vec::new());
    loop {
        let chunk = JsFuture::from(reader.read())
            .await
            .map_err(js_err("the event stream broke"))?;
        let done = Reflect::get(&chunk, &"done".into())
            .ok()
            .and_then(|d| d.as_bool())
            .unwrap_or(true);
        if done {
            return Ok(());
        }
        let value = Reflect::get(&chunk, &"value".into()).map_err(js_err("events"))?;
        let bytes = Uint8Array::new(&value).to_vec();
        let events = {
            let mut buffer = buffer.borrow_mut();
            buffer.extend_from_slice(&bytes);
            parse_events(&mut buffer)
        };
        for event in events {
            on_event(event);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_are_parsed_once_complete() {
        let mut buffer =
            b"event: stats\ndata: {\"invocations\":3}\n\n: keep-alive\n\nevent: dele".to_vec();
        let events = parse_events(&mut buffer);
        assert_eq!(events.len(), 1);
        assert_eq!(events[0].name, "stats");
        assert_eq!(events[0].data["invocations"], 3);
        assert_eq!(buffer, b"event: dele");
        buffer.extend_from_slice(b"ted\ndata: {\"name\":\"f\"}\n\n");
        let events = parse_events(&mut buffer);
        assert_eq!(events[0].name, "deleted");
        assert!(buffer.is_empty());
    }
}
