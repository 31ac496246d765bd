//! `wordcount`: statistics of the request body as JSON (lines, words, characters, bytes
//! and the most frequent words).

use std::collections::HashMap;

use wafer_guest::http::{serve, Request, Response};

fn main() {
    serve(|req: Request| -> Result<Response, String> {
        let text =
            std::str::from_utf8(req.body()).map_err(|e| format!("body is not UTF-8: {e}"))?;
        let top_n: usize = match req.query_param("top") {
            Some(n) => n
                .parse()
                .map_err(|_| format!("top must be a number, got {n:?}"))?,
            None => 5,
        };
        let mut counts: HashMap<String, u64> = HashMap::new();
        let mut words = 0u64;
        for word in text.split_whitespace() {
            words += 1;
            let norm: String = word
                .trim_matches(|c: char| !c.is_alphanumeric())
                .to_lowercase();
            if !norm.is_empty() {
                *counts.entry(norm).or_default() += 1;
            }
        }
        let mut top: Vec<(String, u64)> = counts.into_iter().collect();
        top.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
        top.truncate(top_n);
        let stats = serde_json::json!({
            "lines": text.lines().count(),
            "words": words,
            "chars": text.chars().count(),
            "bytes": text.len(),
            "top": top.iter().map(|(w, c)| serde_json::json!({"word": w, "count": c})).collect::<Vec<_>>(),
        });
        let body = serde_json::to_vec_pretty(&stats).map_err(|e| e.to_string())?;
        Ok(Response::ok()
            .header("content-type", "application/json")
            .body(body))
    })
}
