//! Test harness for wafer's end-to-end tests: locates the built `wafer` binary and the
//! example functions, and runs `wafer dev` (and, in [`cluster`], clusters of
//! `wafer server`) as real processes on ports chosen at run time.
#![warn(missing_docs)]

pub mod cluster;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use anyhow::{bail, Context};

/// The admin token every server the harness starts bootstraps with (through
/// `WAFER_ADMIN_TOKEN`), unless the test sets that variable itself.
pub const ADMIN_TOKEN: &str = "wafer-test-admin-token-0123456789";

/// The cluster secret every server and agent the harness starts is given (through
/// `WAFER_CLUSTER_SECRET`), unless the test sets that variable itself.
pub const CLUSTER_SECRET: &str = "wafer-test-cluster-secret-0123456789";

/// An HTTP client that sends [`ADMIN_TOKEN`] as its bearer token.
pub fn http() -> reqwest::Client {
    http_as(ADMIN_TOKEN)
}

/// An HTTP client that sends `token` as its bearer token.
pub fn http_as(token: &str) -> reqwest::Client {
    reqwest::Client::builder()
        .default_headers(bearer_headers(token))
        .build()
        .unwrap_or_default()
}

/// `GET url` with [`ADMIN_TOKEN`].
pub async fn get(url: impl reqwest::IntoUrl) -> reqwest::Result<reqwest::Response> {
    http().get(url).send().await
}

/// Headers carrying [`ADMIN_TOKEN`].
pub fn admin_headers() -> reqwest::header::HeaderMap {
    bearer_headers(ADMIN_TOKEN)
}

/// Headers carrying `token` as a bearer token.
pub fn bearer_headers(token: &str) -> reqwest::header::HeaderMap {
    let mut headers = reqwest::header::HeaderMap::new();
    if let Ok(value) = reqwest::header::HeaderValue::from_str(&format!("Bearer {token}")) {
        headers.insert(reqwest::header::AUTHORIZATION, value);
    }
    headers
}

/// How long a server may take to start listening.
const START_DEADLINE: Duration = Duration::from_secs(60);

/// A 127.0.0.1 port that is free now and lies below Linux's default range of ports given
/// to outgoing connections (32768-60999), for a server that restarts on the same
/// address: while it is down, no client connection of a test running beside it can take
/// its port (a port from binding port 0 can be). Each port is handed out once per test
/// process; test processes start at different points.
pub fn unused_port() -> anyhow::Result<u16> {
    const FIRST: u32 = 20_000;
    const COUNT: u32 = 12_000;
    static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let start = std::process::id().wrapping_mul(1_009) % COUNT;
    for _ in 0..COUNT {
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let port = u16::try_from(FIRST + (start + n) % COUNT).context("port number")?;
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return Ok(port);
        }
    }
    bail!("no free port in 127.0.0.1:{FIRST}..{}", FIRST + COUNT)
}

/// The workspace root.
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."))
}

/// The `wafer` binary: `$WAFER_BIN`, else `wafer` next to the test binary's profile
/// folder (`target/<profile>/wafer`).
pub fn wafer_bin() -> anyhow::Result<PathBuf> {
    if let Some(bin) = std::env::var_os("WAFER_BIN") {
        return Ok(PathBuf::from(bin));
    }
    let exe = std::env::current_exe().context("locating the test binary")?;
    // target/<profile>/deps/<test> or target/<profile>/<bench> -> target/<profile>/wafer
    let mut profile_dir = exe.parent().context("the test binary has no folder")?;
    if profile_dir.ends_with("deps") {
        profile_dir = profile_dir.parent().context("deps folder has no parent")?;
    }
    let bin = profile_dir.join("wafer");
    if !bin.exists() {
        bail!(
            "{} is missing: build it first (`cargo build --release --bins`, as scripts/test.sh does)",
            bin.display()
        );
    }
    Ok(bin)
}

/// The folder of built example functions (`target/functions`).
pub fn functions_dir() -> anyhow::Result<PathBuf> {
    let dir = workspace_root().join("target").join("functions");
    if !dir.join("hello.wasm").exists() {
        bail!(
            "example functions are not built in {}: run scripts/bootstrap.sh",
            dir.display()
        );
    }
    Ok(dir)
}

/// One built example function's module.
pub fn example(name: &str) -> anyhow::Result<Vec<u8>> {
    let path = functions_dir()?.join(format!("{name}.wasm"));
    std::fs::read(&path).with_context(|| format!("reading {}", path.display()))
}

/// Starts `command` (a `wafer` server whose data folder is `data`) with `RUST_LOG=info`,
/// stderr appended to `DATA.log`, and waits until `ready` accepts a line of its stdout;
/// returns the process and what `ready` returned. Fails with the log if the process
/// exits or is not ready within the start deadline.
pub fn spawn_until_ready<T: Send + 'static>(
    mut command: Command,
    data: &Path,
    what: &str,
    ready: fn(&str) -> Option<T>,
) -> anyhow::Result<(Child, T)> {
    let log_path = data.with_extension("log");
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log_path)
        .context("opening the server log")?;
    for (key, value) in [
        ("WAFER_ADMIN_TOKEN", ADMIN_TOKEN),
        ("WAFER_CLUSTER_SECRET", CLUSTER_SECRET),
    ] {
        if !command.get_envs().any(|(k, _)| k == key) {
            command.env(key, value);
        }
    }
    let mut child = command
        .env("RUST_LOG", "info")
        .stdout(Stdio::piped())
        .stderr(Stdio::from(log))
        .spawn()
        .with_context(|| format!("starting {what}"))?;
    let stdout = child.stdout.take().context("no stdout")?;
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if let Some(found) = ready(&line) {
                let _ = tx.send(found);
            }
        }
    });
    match rx.recv_timeout(START_DEADLINE) {
        Ok(found) => Ok((child, found)),
        Err(_) => {
            let _ = child.kill();
            let status = child.wait().ok();
            let log = std::fs::read_to_string(&log_path).unwrap_or_default();
            bail!("{what} did not start (exit: {status:?}); its log:\n{log}")
        }
    }
}

/// Starts `wafer ARGS` with its stdout a pipe whose reader is already gone and stderr
/// in `log`, and waits until the log shows `ready` (logged after the ready lines met the
/// closed pipe). Answers the process, or an error with the log when it exited first or
/// never got ready.
pub async fn spawn_with_closed_stdout(
    args: &[String],
    log: &Path,
    ready: &str,
) -> anyhow::Result<Child> {
    let (reader, writer) = std::io::pipe()?;
    drop(reader);
    let mut child = Command::new(wafer_bin()?)
        .args(args)
        .env("WAFER_CLUSTER_SECRET", CLUSTER_SECRET)
        .env("RUST_LOG", "info")
        .stdout(writer)
        .stderr(std::fs::File::create(log)?)
        .spawn()?;
    let deadline = std::time::Instant::now() + START_DEADLINE;
    let failed = loop {
        if let Some(status) = child.try_wait()? {
            break format!("exited ({status})");
        }
        if std::fs::read_to_string(log)?.contains(ready) {
            return Ok(child);
        }
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            break "never got ready".to_string();
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    };
    let log = std::fs::read_to_string(log).unwrap_or_default();
    bail!(
        "wafer {} {failed} with a closed stdout; its log:\n{log}",
        args.join(" ")
    )
}

/// A `wafer dev` process; killed when dropped.
pub struct DevServer {
    child: Child,
    url: String,
    api: String,
    data: PathBuf,
}

impl DevServer {
    /// Starts `wafer dev` on `127.0.0.1:0` with data in `data`, plus `extra` arguments,
    /// and waits until it prints its URL.
    pub fn start(data: &Path, extra: &[&str]) -> anyhow::Result<DevServer> {
        let mut command = Command::new(wafer_bin()?);
        command
            .arg("dev")
            .args(["--http", "127.0.0.1:0", "--api", "127.0.0.1:0", "--data"])
            .arg(data)
            .args(extra);
        // "wafer dev: listening on http://HTTP api API"
        let (child, (url, api)) = spawn_until_ready(command, data, "wafer dev", |line| {
            let rest = line.strip_prefix("wafer dev: listening on ")?;
            let (url, api) = rest.split_once(" api ")?;
            Some((url.trim().to_string(), api.trim().to_string()))
        })?;
        Ok(DevServer {
            child,
            url,
            api,
            data: data.to_path_buf(),
        })
    }

    /// `http://127.0.0.1:PORT` + `path`.
    pub fn url(&self, path: &str) -> String {
        format!("{}{}", self.url, path)
    }

    /// The server's base URL.
    pub fn base(&self) -> &str {
        &self.url
    }

    /// The public Cap'n Proto API's address (`host:port`).
    pub fn api(&self) -> &str {
        &self.api
    }

    /// The data folder.
    pub fn data(&self) -> &Path {
        &self.data
    }

    /// Kills the process (SIGKILL) and waits for it.
    pub fn kill(mut self) -> anyhow::Result<()> {
        self.child.kill().context("killing wafer dev")?;
        self.child.wait().context("waiting for wafer dev")?;
        Ok(())
    }

    /// Asks the process to stop (SIGTERM: a graceful stop).
    pub fn terminate(&self) -> anyhow::Result<()> {
        let status = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .context("running kill")?;
        if !status.success() {
            bail!("kill -TERM failed: {status}");
        }
        Ok(())
    }

    /// Waits, at most `within`, for the process to exit; how it exited.
    pub async fn exited(mut self, within: Duration) -> anyhow::Result<std::process::ExitStatus> {
        let deadline = std::time::Instant::now() + within;
        loop {
            if let Some(status) = self.child.try_wait().context("waiting for wafer dev")? {
                return Ok(status);
            }
            if std::time::Instant::now() > deadline {
                bail!(
                    "wafer dev still runs after {within:?}; its log:\n{}",
                    self.log()
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// The server's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.data.with_extension("log")).unwrap_or_default()
    }
}

impl Drop for DevServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Reads one sample's value from Prometheus text, e.g.
/// `metric(text, "wafer_module_compilations_total")`; `None` if absent.
pub fn metric(text: &str, sample: &str) -> Option<f64> {
    text.lines().filter(|l| !l.starts_with('#')).find_map(|l| {
        let (name, value) = l.rsplit_once(' ')?;
        (name == sample).then(|| value.parse().ok()).flatten()
    })
}

/// The start of a Cap'n Proto frame whose segment table announces one segment of
/// `words` 8-byte words (and sends a few of them).
pub fn capnp_frame_announcing(words: u32) -> Vec<u8> {
    let mut frame = Vec::new();
    frame.extend_from_slice(&0u32.to_le_bytes()); // one segment
    frame.extend_from_slice(&words.to_le_bytes());
    frame.extend_from_slice(&[0u8; 64]);
    frame
}

/// Sends `bytes` on a new connection to `addr` and asserts the server closes it (an
/// abort message before the close is fine) within a deadline.
pub async fn assert_connection_closed(addr: &str, bytes: &[u8]) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
    stream.write_all(bytes).await.expect("send");
    let mut buf = [0u8; 1024];
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        match tokio::time::timeout_at(deadline, stream.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return,
            Ok(Ok(_)) => {} // an abort message, then the close
            Err(_) => panic!("{addr} kept a malformed connection open"),
        }
    }
}
