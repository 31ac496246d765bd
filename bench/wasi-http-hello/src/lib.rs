//! A wasi:http proxy component that answers like wafer's `hello` example: greets
//! `?name=` and echoes the method, path, query parameters and headers.

use std::io::Write as _;

use wasip2::http::types::{
    Fields, IncomingRequest, Method, OutgoingBody, OutgoingResponse, ResponseOutparam,
};

wasip2::http::proxy::export!(Hello);

struct Hello;

fn method_name(method: &Method) -> String {
    match method {
        Method::Get => "GET".into(),
        Method::Head => "HEAD".into(),
        Method::Post => "POST".into(),
        Method::Put => "PUT".into(),
        Method::Delete => "DELETE".into(),
        Method::Connect => "CONNECT".into(),
        Method::Options => "OPTIONS".into(),
        Method::Trace => "TRACE".into(),
        Method::Patch => "PATCH".into(),
        Method::Other(other) => other.clone(),
    }
}

impl wasip2::exports::http::incoming_handler::Guest for Hello {
    fn handle(request: IncomingRequest, response_out: ResponseOutparam) {
        let path_with_query = request.path_with_query().unwrap_or_else(|| "/".into());
        let (path, query) = path_with_query
            .split_once('?')
            .unwrap_or((path_with_query.as_str(), ""));
        let pairs: Vec<(&str, &str)> = query
            .split('&')
            .filter(|p| !p.is_empty())
            .map(|p| p.split_once('=').unwrap_or((p, "")))
            .collect();
        let name = pairs
            .iter()
            .find(|(k, _)| *k == "name")
            .map(|(_, v)| *v)
            .unwrap_or("world");
        let mut body = format!("Hello, {name}!\n");
        body.push_str(&format!("method: {}\n", method_name(&request.method())));
        body.push_str(&format!("path: {path}\n"));
        for (key, value) in &pairs {
            body.push_str(&format!("query: {key}={value}\n"));
        }
        let mut headers = request.headers().entries();
        headers.sort();
        for (key, value) in headers {
            body.push_str(&format!("header: {key}: {}\n", String::from_utf8_lossy(&value)));
        }

        let fields = Fields::new();
        let _ = fields.set("content-type", &[b"text/plain; charset=utf-8".to_vec()]);
        let response = OutgoingResponse::new(fields);
        let Ok(outgoing) = response.body() else { return };
        ResponseOutparam::set(response_out, Ok(response));
        if let Ok(mut out) = outgoing.write() {
            let _ = out.write_all(body.as_bytes());
            let _ = out.flush();
        }
        let _ = OutgoingBody::finish(outgoing, None);
    }
}
