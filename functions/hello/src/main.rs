//! `hello`: greets the caller and echoes the request's method, path, query and headers.

use wafer_guest::http::{serve, Request, Response};
use wafer_guest::{log, Level};

fn main() {
    serve(|req: Request| -> Result<Response, String> {
        let name = req
            .query_param("name")
            .unwrap_or_else(|| "world".to_string());
        log(Level::Info, &format!("hello: greeting {name}"));
        let mut body = format!("Hello, {name}!\n");
        body.push_str(&format!("method: {}\n", req.method()));
        body.push_str(&format!("path: {}\n", req.path()));
        for (key, value) in req.query_pairs() {
            body.push_str(&format!("query: {key}={value}\n"));
        }
        for (key, value) in req.headers() {
            body.push_str(&format!("header: {key}: {value}\n"));
        }
        if !req.body().is_empty() {
            body.push_str(&format!("body: {} bytes\n", req.body().len()));
        }
        Ok(Response::text(200, body).header("x-wafer-example", "hello"))
    })
}
