//! The web console in real headless Chromium, driven over WebDriver (chromedriver +
//! fantoccini) against a real `wafer dev`: a bad token is refused with a message, a
//! read-only token sees everything and gets no controls, an admin deploys a function
//! from a file, rolls it back after a second deploy, invokes it from the try-it panel,
//! and watches a job turn FINISHED without reloading. Along the way: labels on every
//! input, keyboard order, a narrow window, and no errors in Chromium's console log.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use fantoccini::wd::{Capabilities, WebDriverCompatibleCommand};
use fantoccini::{Client, ClientBuilder, Locator};
use serde_json::{json, Value};
use tokio::time::Instant;
use wafer_tests::{functions_dir, http, workspace_root, DevServer, ADMIN_TOKEN};

use crate::create_token;

const DEADLINE: Duration = Duration::from_secs(30);

/// A chromedriver process, killed on drop.
struct Driver {
    child: Child,
    url: String,
}

impl Drop for Driver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

async fn start_driver() -> Driver {
    let port = free_port();
    let child = Command::new("chromedriver")
        .arg(format!("--port={port}"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("chromedriver runs (Debian's chromium-driver; scripts/bootstrap.sh installs it)");
    let driver = Driver {
        child,
        url: format!("http://127.0.0.1:{port}"),
    };
    let until = Instant::now() + DEADLINE;
    loop {
        let ready = reqwest::get(format!("{}/status", driver.url))
            .await
            .ok()
            .filter(|r| r.status().is_success());
        if ready.is_some() {
            return driver;
        }
        assert!(Instant::now() < until, "chromedriver did not start");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn browser(driver: &Driver, profile: &std::path::Path) -> Client {
    let mut caps = Capabilities::new();
    caps.insert(
        "goog:chromeOptions".into(),
        json!({
            "binary": "/usr/bin/chromium",
            "args": [
                "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--disable-quic", "--no-first-run", "--disable-background-networking",
                "--disable-component-update", "--disable-sync", "--window-size=1280,800",
                format!("--user-data-dir={}", profile.display()),
            ],
        }),
    );
    caps.insert("goog:loggingPrefs".into(), json!({ "browser": "ALL" }));
    ClientBuilder::new(hyper_util::client::legacy::connect::HttpConnector::new())
        .capabilities(caps)
        .connect(&driver.url)
        .await
        .expect("a Chromium session")
}

/// chromedriver's browser log (console messages and failed loads), emptied as read.
#[derive(Debug)]
struct BrowserLog;

impl WebDriverCompatibleCommand for BrowserLog {
    fn endpoint(
        &self,
        base_url: &url::Url,
        session_id: Option<&str>,
    ) -> Result<url::Url, url::ParseError> {
        base_url.join(&format!(
            "session/{}/se/log",
            session_id.unwrap_or_default()
        ))
    }

    fn method_and_body(&self, _: &url::Url) -> (http::Method, Option<String>) {
        (http::Method::POST, Some(r#"{"type":"browser"}"#.into()))
    }
}

/// Errors in the browser's log since the last call, but the refusals the test asked
/// for (`allowed` substrings).
async fn log_errors(c: &Client, allowed: &[&str]) -> Vec<String> {
    let log = c.issue_cmd(BrowserLog).await.expect("browser log");
    log.as_array()
        .map(|entries| {
            entries
                .iter()
                .filter(|e| e["level"] == "SEVERE" || e["level"] == "WARNING")
                .map(|e| e["message"].as_str().unwrap_or_default().to_string())
                .filter(|m| !allowed.iter().any(|a| m.contains(a)))
                .collect()
        })
        .unwrap_or_default()
}

/// Waits until `css` exists and its text satisfies `wanted`; returns the text.
async fn wait_text(c: &Client, css: &str, wanted: impl Fn(&str) -> bool) -> String {
    let until = Instant::now() + DEADLINE;
    let mut last = String::new();
    loop {
        if let Ok(element) = c.find(Locator::Css(css)).await {
            if let Ok(text) = element.text().await {
                if wanted(&text) {
                    return text;
                }
                last = text;
            }
        }
        assert!(
            Instant::now() < until,
            "`{css}` never showed what was expected; last text: {last:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Waits until `css` matches nothing.
async fn wait_gone(c: &Client, css: &str) {
    let until = Instant::now() + DEADLINE;
    while exists(c, css).await {
        assert!(Instant::now() < until, "`{css}` is still there");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Whether `css` matches anything now.
async fn exists(c: &Client, css: &str) -> bool {
    c.find_all(Locator::Css(css))
        .await
        .map(|all| !all.is_empty())
        .unwrap_or(false)
}

async fn click(c: &Client, css: &str) {
    c.wait()
        .at_most(DEADLINE)
        .for_element(Locator::Css(css))
        .await
        .unwrap_or_else(|e| panic!("`{css}` not found: {e}"))
        .click()
        .await
        .unwrap_or_else(|e| panic!("clicking `{css}`: {e}"));
}

async fn type_into(c: &Client, css: &str, text: &str) {
    let element = c
        .wait()
        .at_most(DEADLINE)
        .for_element(Locator::Css(css))
        .await
        .unwrap_or_else(|e| panic!("`{css}` not found: {e}"));
    element.clear().await.expect("clear");
    element.send_keys(text).await.expect("type");
}

async fn log_in(c: &Client, base: &str, token: &str) {
    c.goto(base).await.expect("open the console");
    type_into(c, "#token", token).await;
    click(c, "#login").await;
    wait_text(c, "#who", |t| !t.is_empty()).await;
}

async fn log_out(c: &Client) {
    click(c, "#logout").await;
    c.wait()
        .at_most(DEADLINE)
        .for_element(Locator::Css("#token"))
        .await
        .expect("back at the login form");
}

async fn open_page(c: &Client, page: &str, heading: &str) {
    click(c, &format!("header nav a[href='#/{page}']")).await;
    wait_text(c, "main h1", |t| t == heading).await;
}

/// Inputs, selects and text areas without a label (by id or aria-label).
async fn unlabelled(c: &Client) -> Vec<Value> {
    let found = c
        .execute(
            "return [...document.querySelectorAll('input, select, textarea')]
                .filter(e => (!e.labels || e.labels.length === 0) && !e.getAttribute('aria-label'))
                .map(e => e.outerHTML.slice(0, 120));",
            vec![],
        )
        .await
        .expect("script");
    found.as_array().cloned().unwrap_or_default()
}

/// Whether the page is wider than the window (it should scroll only inside tables).
async fn overflows(c: &Client) -> bool {
    c.execute(
        "return document.documentElement.scrollWidth > window.innerWidth + 1;",
        vec![],
    )
    .await
    .expect("script")
    .as_bool()
    .unwrap_or(true)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_console_works_in_chromium() {
    let dir = tempfile::tempdir().expect("temp dir");
    let functions = functions_dir().expect("examples built");
    let server = DevServer::start(
        &dir.path().join("data"),
        &["--functions", &functions.display().to_string()],
    )
    .expect("wafer dev starts");
    let base = server.url("/");
    let driver = start_driver().await;
    let c = browser(&driver, &dir.path().join("chromium")).await;

    // A bad token: refused, with a message.
    c.goto(&base).await.expect("open the console");
    type_into(&c, "#token", "wafer_this-token-does-not-exist").await;
    click(&c, "#login").await;
    let refused = wait_text(&c, "#login-error", |t| !t.is_empty()).await;
    assert!(refused.contains("refused"), "{refused}");
    // The form is usable from the keyboard: the token field, then the button.
    c.execute("document.getElementById('token').focus();", vec![])
        .await
        .expect("focus");
    c.find(Locator::Css("#token"))
        .await
        .expect("token field")
        .send_keys("\u{E004}")
        .await
        .expect("tab");
    let focused = c
        .execute("return document.activeElement.id;", vec![])
        .await
        .expect("script");
    assert_eq!(focused, "login", "Tab moves from the token to the button");
    assert_eq!(unlabelled(&c).await, Vec::<Value>::new());

    // A read-only token sees everything and is offered no controls.
    let (reader, _) = create_token(server.base(), &["read"]).await;
    log_in(&c, &base, &reader).await;
    wait_text(&c, "#who", |t| t.ends_with("(read)")).await;
    open_page(&c, "functions", "Functions").await;
    wait_text(&c, "#functions", |t| {
        t.contains("markdown") && t.contains("wordcount")
    })
    .await;
    assert!(
        !exists(&c, "#deploy-button").await,
        "a reader has no deploy button"
    );
    assert!(!exists(&c, "#try-send").await, "a reader cannot invoke");
    assert!(
        !exists(&c, "#functions button").await,
        "a reader has no delete or try buttons"
    );
    open_page(&c, "jobs", "Jobs").await;
    assert!(
        !exists(&c, "#job-submit").await,
        "a reader cannot submit jobs"
    );
    log_out(&c).await;

    // An admin: the overview, live.
    log_in(&c, &base, ADMIN_TOKEN).await;
    open_page(&c, "overview", "Overview").await;
    wait_text(&c, "#leader", |t| t == "node 1").await;
    wait_text(&c, "#agents-up", |t| t == "1 / 1").await;
    wait_text(&c, ".agents", |t| {
        t.contains("slots") && t.contains("memory")
    })
    .await;
    // Invocations made elsewhere show in the chart's rate.
    for _ in 0..20 {
        let r = http()
            .get(server.url("/fn/hello"))
            .send()
            .await
            .expect("invoke");
        assert!(r.status().is_success());
    }
    wait_text(&c, "#rate", |t| t.parse::<f64>().is_ok_and(|r| r > 0.0)).await;
    let shot = c.screenshot().await.expect("screenshot");
    assert!(shot.starts_with(b"\x89PNG"), "a PNG screenshot");
    let shots = workspace_root().join("target").join("console-screenshots");
    std::fs::create_dir_all(&shots).expect("screenshot folder");
    std::fs::write(shots.join("overview.png"), &shot).expect("save screenshot");
    assert_eq!(unlabelled(&c).await, Vec::<Value>::new());

    // Deploy from a file input, with progress and a result.
    open_page(&c, "functions", "Functions").await;
    let module: PathBuf = functions.join("markdown.wasm");
    c.find(Locator::Css("#deploy-file"))
        .await
        .expect("file input")
        .send_keys(&module.display().to_string())
        .await
        .expect("choose the file");
    type_into(&c, "#deploy-name", "md2").await;
    type_into(&c, "#deploy-memory", "64").await;
    type_into(&c, "#deploy-fuel", "500000000").await;
    type_into(&c, "#deploy-env", "MODE=console").await;
    click(&c, "#deploy-button").await;
    let deployed = wait_text(&c, "#deploy-result", |t| !t.is_empty()).await;
    assert!(deployed.contains("Deployed md2 version 1"), "{deployed}");
    wait_text(&c, "#functions tr[data-function='md2']", |t| {
        t.contains("64 MiB")
    })
    .await;
    let record = crate::get_json(&server, "/v1/functions/md2").await;
    assert_eq!(record["env"]["MODE"], "console", "{record}");
    assert_eq!(record["fuel"], 500_000_000, "{record}");
    assert_eq!(unlabelled(&c).await, Vec::<Value>::new());

    // A second version deployed elsewhere shows (from the event stream), and
    // "Roll back" restores the first.
    assert!(!exists(&c, "button[aria-label='Roll back md2']").await);
    let second = http()
        .put(server.url("/v1/functions/md2"))
        .body(std::fs::read(functions.join("wordcount.wasm")).expect("wordcount.wasm"))
        .send()
        .await
        .expect("deploy version 2");
    assert!(second.status().is_success());
    wait_text(&c, "#functions tr[data-function='md2'] .version", |t| {
        t == "2"
    })
    .await;
    click(&c, "button[aria-label='Roll back md2']").await;
    wait_text(&c, "#functions tr[data-function='md2'] .version", |t| {
        t == "3 (from 1)"
    })
    .await;
    let record = crate::get_json(&server, "/v1/functions/md2").await;
    assert_eq!(record["restored_from"], 1, "{record}");
    assert_eq!(record["env"]["MODE"], "console", "{record}");

    // Invoke it from the try-it panel.
    click(&c, "#try-function option[value='md2']").await;
    type_into(&c, "#try-body-in", "# Hi from *Chromium*").await;
    click(&c, "#try-send").await;
    wait_text(&c, "#try-status", |t| t == "200").await;
    let body = wait_text(&c, "#try-body", |t| !t.is_empty()).await;
    assert!(
        body.contains("<h1>Hi from <em>Chromium</em></h1>"),
        "{body}"
    );
    let took = wait_text(&c, "#try-duration", |t| t.contains("ms")).await;
    assert!(took.starts_with("in ") && took.ends_with(" ms"), "{took}");
    // After a try, the function's recent guest logs show (`hello` logs each greeting).
    click(&c, "#try-function option[value='hello']").await;
    type_into(&c, "#try-path", "/?name=chromium").await;
    click(&c, "#try-send").await;
    let logs = wait_text(&c, "#try-logs", |t| t.contains("greeting chromium")).await;
    assert!(
        logs.contains("v1 200 | [info] hello: greeting chromium"),
        "{logs}"
    );

    // Delete asks first.
    click(&c, "button[aria-label='Delete md2']").await;
    wait_text(&c, ".confirm", |t| t.contains("Delete md2?")).await;
    click(&c, ".confirm button.danger").await;
    wait_gone(&c, "#functions tr[data-function='md2']").await;

    // A job, watched until FINISHED without a reload.
    open_page(&c, "jobs", "Jobs").await;
    click(&c, "#job-function option[value='wordcount']").await;
    type_into(&c, "#job-input", "one two three two").await;
    click(&c, "#job-submit").await;
    wait_text(&c, "#detail-state", |t| t == "FINISHED").await;
    let output = wait_text(&c, "#job-output", |t| !t.is_empty()).await;
    assert!(output.contains("\"words\": 4"), "{output}");
    wait_text(&c, "#jobs .job-state", |t| t == "FINISHED").await;
    assert!(
        exists(&c, "#job-download").await,
        "the output can be downloaded"
    );
    // Filtering by another state hides it.
    click(&c, "#filter-state option[value='FAILED']").await;
    wait_gone(&c, "#jobs tbody tr").await;

    // The other pages render their data.
    open_page(&c, "scheduling", "Scheduling").await;
    wait_text(&c, "#frameworks", |t| {
        t.contains("jobs") && t.contains("serverless")
    })
    .await;
    open_page(&c, "nodes", "Nodes & Raft").await;
    wait_text(&c, "#members", |t| t.contains("leader")).await;
    wait_text(&c, "#agents", |t| t.contains("active")).await;
    // The dev server's OpenCL device (PoCL's CPU device) and its use.
    wait_text(&c, "#agents", |t| t.contains("in use") && t.contains("cpu")).await;

    // Narrow: nothing but tables scrolls sideways.
    c.set_window_size(390, 800).await.expect("resize");
    for (page, heading) in [
        ("overview", "Overview"),
        ("functions", "Functions"),
        ("jobs", "Jobs"),
    ] {
        open_page(&c, page, heading).await;
        if overflows(&c).await {
            let wide = c
                .execute(
                    "const clipped = e => { for (let p = e.parentElement; p; p = p.parentElement) {
                           if (getComputedStyle(p).overflowX !== 'visible') return true; } return false; };
                     return [...document.querySelectorAll('body *')]
                        .filter(e => e.getBoundingClientRect().right > window.innerWidth + 1 && !clipped(e))
                        .slice(0, 8).map(e => e.tagName + '#' + e.id + '.' + e.className + ' ' + Math.round(e.getBoundingClientRect().right))
                        .concat([document.documentElement.scrollWidth, window.innerWidth]);",
                    vec![],
                )
                .await
                .expect("script");
            panic!("{page} is wider than a narrow window: {wide}");
        }
    }

    // The only errors Chromium logged are the refusals this test asked for.
    let errors = log_errors(
        &c,
        &["/v1/whoami - Failed to load resource: the server responded with a status of 401"],
    )
    .await;
    assert!(errors.is_empty(), "console errors: {errors:#?}");
    c.close().await.expect("close the browser");
}
