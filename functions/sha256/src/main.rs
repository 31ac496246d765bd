//! `sha256`: hashes the request body (CPU-bound). `?rounds=N` hashes the digest again
//! N-1 more times, for load tests; the answer is the hex digest.

use sha2::{Digest, Sha256};
use wafer_guest::http::{serve, Request, Response};

fn main() {
    serve(|req: Request| -> Result<Response, String> {
        let rounds: u64 = match req.query_param("rounds") {
            Some(n) => n
                .parse()
                .ok()
                .filter(|n| *n >= 1)
                .ok_or_else(|| format!("rounds must be a positive number, got {n:?}"))?,
            None => 1,
        };
        let mut digest = Sha256::digest(req.body());
        for _ in 1..rounds {
            digest = Sha256::digest(digest);
        }
        let hex: String = digest.iter().map(|b| format!("{b:02x}")).collect();
        Ok(Response::text(200, format!("{hex}\n")))
    })
}
