//! `hello`: greets the caller and echoes the request's method, path, query and headers.

use std::fmt::Write;

use wafer_guest::http::{serve, Request, Response};
use wafer_guest::{log, Level};

fn main() {
    serve(|req: Request| -> Result<Response, std::fmt::Error> {
        let name = req
            .query_param("name")
            .unwrap_or_else(|| "world".to_string());
        log(Level::Info, &format!("hello: greeting {name}"));
        let mut body = String::with_capacity(256);
        writeln!(body, "Hello, {name}!")?;
        writeln!(body, "method: {}", req.method())?;
        writeln!(body, "path: {}", req.path())?;
        for (key, value) in req.query_pairs() {
            writeln!(body, "query: {key}={value}")?;
        }
        for (key, value) in req.headers() {
            writeln!(body, "header: {key}: {value}")?;
        }
        if !req.body().is_empty() {
            writeln!(body, "body: {} bytes", req.body().len())?;
        }
        Ok(Response::text(200, body).header("x-wafer-example", "hello"))
    })
}
