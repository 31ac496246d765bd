//! A small HTTP/1.1 load generator: N keep-alive connections issuing GETs back to back
//! on one thread, latencies in an HDR histogram.

use std::time::{Duration, Instant};

use anyhow::Context;
use bytes::Bytes;
use hdrhistogram::Histogram;
use http_body_util::{BodyExt, Empty};
use hyper::Request;
use hyper_util::rt::TokioIo;

/// What a load run measured.
pub struct Stats {
    /// Latencies, µs.
    pub hist: Histogram<u64>,
    /// Non-2xx answers or failed requests.
    pub errors: u64,
    /// Measured time.
    pub elapsed: Duration,
}

impl Stats {
    /// Empty stats.
    pub fn new() -> anyhow::Result<Stats> {
        Ok(Stats {
            hist: Histogram::new(3)?,
            errors: 0,
            elapsed: Duration::ZERO,
        })
    }

    /// Adds another run's measurements.
    pub fn merge(&mut self, other: &Stats) -> anyhow::Result<()> {
        self.hist.add(&other.hist)?;
        self.errors += other.errors;
        self.elapsed += other.elapsed;
        Ok(())
    }

    /// Successful requests per second.
    pub fn rps(&self) -> f64 {
        self.hist.len() as f64 / self.elapsed.as_secs_f64()
    }
}

/// Drives `url` with `connections` connections: 1 s warm-up, then `duration` measured.
pub fn run(url: &str, connections: usize, duration: Duration) -> anyhow::Result<Stats> {
    run_spread(url, 1, connections, duration)
}

/// [`run`], with `{n}` in `url` replaced by 0, 1, ... `spread - 1` in turn, so that one
/// run drives many functions (each connection starts at another one).
pub fn run_spread(
    url: &str,
    spread: usize,
    connections: usize,
    duration: Duration,
) -> anyhow::Result<Stats> {
    let uris = (0..spread.max(1))
        .map(|n| url.replace("{n}", &n.to_string()).parse::<hyper::Uri>())
        .collect::<Result<Vec<_>, _>>()
        .context("parsing URL")?;
    let uris = std::sync::Arc::new(uris);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let warmup = Instant::now() + Duration::from_secs(1);
        let end = warmup + duration;
        let mut tasks = Vec::new();
        for first in 0..connections {
            let uris = uris.clone();
            tasks.push(tokio::spawn(async move {
                connection(&uris, first, warmup, end).await
            }));
        }
        let mut stats = Stats::new()?;
        for t in tasks {
            let (hist, errors) = t.await??;
            stats.hist.add(&hist)?;
            stats.errors += errors;
        }
        stats.elapsed = duration;
        Ok(stats)
    })
}

/// One keep-alive connection sending GETs to `uris` in turn from `first`, all on the
/// first one's host.
async fn connection(
    uris: &[hyper::Uri],
    first: usize,
    warmup: Instant,
    end: Instant,
) -> anyhow::Result<(Histogram<u64>, u64)> {
    let authority = uris[0].authority().context("URL has no host")?.clone();
    let paths: Vec<&str> = uris
        .iter()
        .map(|uri| uri.path_and_query().map_or("/", |p| p.as_str()))
        .collect();
    let mut next = first;
    let stream = tokio::net::TcpStream::connect(authority.as_str()).await?;
    stream.set_nodelay(true)?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(conn);
    let mut hist = Histogram::<u64>::new(3)?;
    let mut errors = 0;
    let authorization = format!("Bearer {}", wafer_tests::ADMIN_TOKEN);
    loop {
        let now = Instant::now();
        if now >= end {
            break;
        }
        let path = paths[next % paths.len()];
        next += 1;
        let request = Request::get(path)
            .header(hyper::header::HOST, authority.as_str())
            // wafer checks it; the other servers ignore it.
            .header(hyper::header::AUTHORIZATION, authorization.as_str())
            .body(Empty::<Bytes>::new())?;
        let started = Instant::now();
        let ok = match sender.send_request(request).await {
            Ok(response) => {
                let ok = response.status().is_success();
                ok && response.into_body().collect().await.is_ok()
            }
            Err(_) => false,
        };
        let done = Instant::now();
        if started >= warmup && done <= end {
            if ok {
                hist.record(done.duration_since(started).as_micros() as u64)?;
            } else {
                errors += 1;
            }
        }
    }
    Ok((hist, errors))
}
