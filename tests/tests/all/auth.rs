//! API tokens over HTTP and the CLI: the admin token `wafer dev` makes, scopes,
//! revocation, expiry and the public invocation mode.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use reqwest::StatusCode;
use serde_json::Value;
use wafer_tests::{http, http_as, wafer_bin, DevServer};

use crate::{deploy_example, expect_error, start};

/// Creates a token with `scopes` through the API; returns its secret and id.
async fn token(server: &DevServer, scopes: &[&str], ttl_secs: Option<u64>) -> (String, String) {
    let response = http()
        .post(server.url("/v1/tokens"))
        .json(&serde_json::json!({ "scopes": scopes, "name": "test", "ttl_secs": ttl_secs }))
        .send()
        .await
        .expect("create token");
    assert_eq!(response.status(), StatusCode::CREATED);
    let created: Value = response.json().await.expect("json");
    assert!(created.get("hash").is_none(), "the hash is never shown");
    (
        created["token"].as_str().expect("secret").to_string(),
        created["id"].as_str().expect("id").to_string(),
    )
}

/// The status of `method path` (with a small body for writes) as `token`.
async fn status(server: &DevServer, token: &str, method: &str, path: &str) -> StatusCode {
    let client = http_as(token);
    let url = server.url(path);
    let request = match method {
        "GET" => client.get(url),
        "POST" => client.post(url).body("{}"),
        "PUT" => client
            .put(url)
            .body(wafer_tests::example("hello").expect("example")),
        "DELETE" => client.delete(url),
        other => panic!("method {other}"),
    };
    request.send().await.expect("request").status()
}

#[tokio::test]
async fn each_scope_allows_its_calls_and_refuses_the_others() {
    let (_dir, server) = start(&[]);
    deploy_example(&server, "hello", "").await;
    let (read, _) = token(&server, &["read"], None).await;
    let (deploy, _) = token(&server, &["deploy"], None).await;
    let (invoke, _) = token(&server, &["invoke"], None).await;
    let (admin, _) = token(&server, &["admin"], None).await;
    let ok = |s: StatusCode| s.is_success();
    let forbidden = |s: StatusCode| s == StatusCode::FORBIDDEN;
    type Check = fn(StatusCode) -> bool;
    let cases: [(&str, &str, &str, Check); 14] = [
        // read
        (&read, "GET", "/v1/functions", ok),
        (&read, "GET", "/metrics", ok),
        (&read, "PUT", "/v1/functions/f", forbidden),
        (&read, "GET", "/fn/hello", forbidden),
        (&read, "GET", "/v1/tokens", forbidden),
        // deploy
        (&deploy, "PUT", "/v1/functions/f", ok),
        (&deploy, "GET", "/v1/functions", forbidden),
        (&deploy, "POST", "/v1/jobs", forbidden),
        // invoke
        (&invoke, "GET", "/fn/hello", ok),
        (&invoke, "DELETE", "/v1/functions/f", forbidden),
        (&invoke, "PUT", "/v1/roles/batch", forbidden),
        // admin
        (&admin, "GET", "/v1/tokens", ok),
        (&admin, "DELETE", "/v1/functions/f", ok),
        (&admin, "GET", "/fn/hello", ok),
    ];
    for (token, method, path, check) in cases {
        let got = status(&server, token, method, path).await;
        assert!(check(got), "{method} {path} with a token: {got}");
    }
    // A refusal names the scope that is missing.
    let refused = http_as(&read)
        .delete(server.url("/v1/functions/hello"))
        .send()
        .await
        .expect("delete");
    let body = expect_error(refused, StatusCode::FORBIDDEN, "forbidden").await;
    assert!(body["message"]
        .as_str()
        .unwrap_or_default()
        .contains("deploy"));
    // whoami answers any valid token with its scopes.
    let me: Value = http_as(&invoke)
        .get(server.url("/v1/whoami"))
        .send()
        .await
        .expect("whoami")
        .json()
        .await
        .expect("json");
    assert_eq!(me["scopes"], serde_json::json!(["invoke"]));
}

#[tokio::test]
async fn missing_bad_revoked_and_expired_tokens_are_refused_at_once() {
    let (_dir, server) = start(&[]);
    deploy_example(&server, "hello", "").await;
    // No token, a bad token: 401 with a challenge; /healthz stays open.
    let anonymous = reqwest::Client::new();
    let response = anonymous
        .get(server.url("/v1/functions"))
        .send()
        .await
        .expect("get");
    assert!(response.headers().contains_key("www-authenticate"));
    let body = expect_error(response, StatusCode::UNAUTHORIZED, "unauthorized").await;
    assert!(body["message"]
        .as_str()
        .unwrap_or_default()
        .contains("Bearer"));
    assert_eq!(
        status(&server, "not-a-token", "GET", "/fn/hello").await,
        StatusCode::UNAUTHORIZED
    );
    let health = anonymous
        .get(server.url("/healthz"))
        .send()
        .await
        .expect("health");
    assert_eq!(health.status(), StatusCode::OK);

    // Revoked: refused on the very next call.
    let (secret, id) = token(&server, &["invoke"], None).await;
    assert_eq!(
        status(&server, &secret, "GET", "/fn/hello").await,
        StatusCode::OK
    );
    let revoked = http()
        .delete(server.url(&format!("/v1/tokens/{id}")))
        .send()
        .await
        .expect("revoke");
    assert_eq!(revoked.status(), StatusCode::OK);
    let response = http_as(&secret)
        .get(server.url("/fn/hello"))
        .send()
        .await
        .expect("invoke");
    expect_error(response, StatusCode::UNAUTHORIZED, "unauthorized").await;
    let again = http()
        .delete(server.url(&format!("/v1/tokens/{id}")))
        .send()
        .await
        .expect("revoke again");
    expect_error(again, StatusCode::NOT_FOUND, "unknown_token").await;

    // Expired: works, then stops working once its lifetime is over.
    let (short, _) = token(&server, &["read"], Some(1)).await;
    assert_eq!(
        status(&server, &short, "GET", "/v1/functions").await,
        StatusCode::OK
    );
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let response = http_as(&short)
            .get(server.url("/v1/functions"))
            .send()
            .await
            .expect("get");
        if response.status() == StatusCode::UNAUTHORIZED {
            let body: Value = response.json().await.expect("json");
            assert!(body["message"]
                .as_str()
                .unwrap_or_default()
                .contains("expired"));
            break;
        }
        assert!(Instant::now() < deadline, "the token never expired");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // Bad requests for tokens are clear errors.
    for body in [
        serde_json::json!({ "scopes": [] }),
        serde_json::json!({ "scopes": ["root"] }),
        serde_json::json!({ "scopes": ["read"], "ttl_secs": 0 }),
    ] {
        let response = http()
            .post(server.url("/v1/tokens"))
            .json(&body)
            .send()
            .await
            .expect("create");
        assert_eq!(response.status(), StatusCode::BAD_REQUEST, "{body}");
    }
}

#[tokio::test]
async fn public_invoke_mode_opens_only_the_invocation_routes() {
    let (_dir, server) = start(&["--public-invoke"]);
    deploy_example(&server, "hello", "").await;
    let anonymous = reqwest::Client::new();
    let invoked = anonymous
        .get(server.url("/fn/hello?name=anyone"))
        .send()
        .await
        .expect("invoke");
    assert_eq!(invoked.status(), StatusCode::OK);
    let listed = anonymous
        .get(server.url("/v1/functions"))
        .send()
        .await
        .expect("list");
    assert_eq!(listed.status(), StatusCode::UNAUTHORIZED);
}

/// Runs `wafer ARGS` in `cwd` against `server` with no token in the environment.
fn cli(cwd: &std::path::Path, server: &DevServer, args: &[&str]) -> std::process::Output {
    Command::new(wafer_bin().expect("wafer"))
        .current_dir(cwd)
        .env_remove("WAFER_TOKEN")
        .args(["--server", server.base()])
        .args(args)
        .output()
        .expect("run wafer")
}

#[tokio::test]
async fn wafer_dev_makes_an_admin_token_once_and_the_cli_finds_it() {
    let dir = tempfile::tempdir().expect("temp dir");
    let data = dir.path().join(".wafer").join("dev");
    std::fs::create_dir_all(&data).expect("data folder");
    // Started by hand (without the harness's bootstrap token) to read what it prints.
    let mut child = Command::new(wafer_bin().expect("wafer"))
        .args(["dev", "--http", "127.0.0.1:0", "--api", "127.0.0.1:0"])
        .args(["--no-examples", "--data"])
        .arg(&data)
        .env_remove("WAFER_ADMIN_TOKEN")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("wafer dev");
    let stdout = child.stdout.take().expect("stdout");
    let mut url = None;
    let mut printed = None;
    let mut lines = BufReader::new(stdout).lines();
    for line in lines.by_ref() {
        let line = line.expect("line");
        if let Some(rest) = line.strip_prefix("wafer dev: listening on ") {
            url = rest.split_whitespace().next().map(str::to_string);
        }
        if let Some(rest) = line.trim().strip_prefix("admin token: ") {
            printed = rest.split_whitespace().next().map(str::to_string);
            break;
        }
    }
    // Keep reading, so that the server's later lines find an open pipe.
    std::thread::spawn(move || lines.for_each(drop));
    let url = url.expect("listening line");
    let printed = printed.expect("an admin token is printed at first start");
    let kept = std::fs::read_to_string(data.join("admin.token")).expect("token file");
    assert_eq!(kept.trim(), printed);
    let me = http_as(&printed)
        .get(format!("{url}/v1/whoami"))
        .send()
        .await
        .expect("whoami");
    assert_eq!(me.status(), StatusCode::OK);
    let _ = child.kill();
    let _ = child.wait();

    // Restarted (through the harness, whose bootstrap token must now be ignored): the
    // same token, no new one.
    let server = DevServer::start(&data, &["--no-examples"]).expect("restart");
    assert_eq!(
        status(&server, &printed, "GET", "/v1/whoami").await,
        StatusCode::OK
    );
    assert_eq!(
        status(&server, wafer_tests::ADMIN_TOKEN, "GET", "/v1/whoami").await,
        StatusCode::UNAUTHORIZED
    );

    // The CLI, run beside .wafer/dev with no token given, uses the dev admin token.
    let created = cli(
        dir.path(),
        &server,
        &[
            "token",
            "create",
            "--scope",
            "read,invoke",
            "--name",
            "ci",
            "--ttl",
            "1h",
        ],
    );
    assert!(
        created.status.success(),
        "{}",
        String::from_utf8_lossy(&created.stderr)
    );
    let secret = String::from_utf8_lossy(&created.stdout).trim().to_string();
    assert!(secret.starts_with("wafer_"), "{secret}");
    let listed = cli(dir.path(), &server, &["token", "list", "--json"]);
    let listed: Value = serde_json::from_slice(&listed.stdout).expect("token list json");
    let ci = listed["tokens"]
        .as_array()
        .and_then(|all| all.iter().find(|t| t["name"] == "ci"))
        .expect("the new token is listed")
        .clone();
    assert_eq!(ci["scopes"], serde_json::json!(["invoke", "read"]));
    assert!(ci["expires_at_ms"].as_u64().is_some());
    let id = ci["id"].as_str().expect("id");
    let revoked = cli(dir.path(), &server, &["token", "revoke", id]);
    assert!(revoked.status.success());
    assert_eq!(
        status(&server, &secret, "GET", "/v1/functions").await,
        StatusCode::UNAUTHORIZED
    );
    // A token without the admin scope cannot manage tokens, and says so.
    let (reader, _) = {
        let response = http_as(&printed)
            .post(server.url("/v1/tokens"))
            .json(&serde_json::json!({ "scopes": ["read"] }))
            .send()
            .await
            .expect("create");
        let created: Value = response.json().await.expect("json");
        (created["token"].as_str().expect("secret").to_string(), ())
    };
    let refused = Command::new(wafer_bin().expect("wafer"))
        .env("WAFER_TOKEN", &reader)
        .args(["--server", server.base(), "token", "list"])
        .output()
        .expect("run wafer");
    assert!(!refused.status.success());
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains("admin"),
        "{}",
        String::from_utf8_lossy(&refused.stderr)
    );
}
