//! `markdown`: renders the request body (CommonMark with tables, strikethrough and task
//! lists) to HTML.

use pulldown_cmark::{html, Options, Parser};
use wafer_guest::http::{serve, Request, Response};

fn main() {
    serve(|req: Request| -> Result<Response, String> {
        let text =
            std::str::from_utf8(req.body()).map_err(|e| format!("body is not UTF-8: {e}"))?;
        let mut options = Options::empty();
        options.insert(Options::ENABLE_TABLES);
        options.insert(Options::ENABLE_STRIKETHROUGH);
        options.insert(Options::ENABLE_TASKLISTS);
        let mut out = String::with_capacity(text.len() * 3 / 2);
        html::push_html(&mut out, Parser::new_ext(text, options));
        Ok(Response::ok()
            .header("content-type", "text/html; charset=utf-8")
            .body(out))
    })
}
