//! A complete wafer HTTP function: greets `?name=`, answers an empty name with an error
//! (a 500 carrying the message) and `?panic=1` with a panic (a 500 naming the panic).
//!
//! Build for wafer with `cargo build --release --target wasm32-wasip1 --example greeter`;
//! it also runs natively, reading the WAGI variables from its environment.

use wafer_guest::http::{serve, Request, Response};
use wafer_guest::{log, Level};

fn main() {
    serve(|req: Request| -> Result<Response, String> {
        if req.query_param("panic").is_some() {
            panic!("asked to panic");
        }
        let name = req
            .query_param("name")
            .unwrap_or_else(|| "world".to_string());
        if name.is_empty() {
            return Err("name must not be empty".to_string());
        }
        log(Level::Info, &format!("greeting {name}"));
        Ok(Response::ok()
            .header("content-type", "text/plain; charset=utf-8")
            .body(format!(
                "Hello, {name}! You sent {} bytes.\n",
                req.body().len()
            )))
    })
}
