//! The public Cap'n Proto API (`capnp/cluster.capnp`) over real TCP: login and scopes,
//! revocation, chunked uploads and their limits, invocations, jobs, malformed messages,
//! and watch events across a leader change.

use std::rc::Rc;
use std::time::{Duration, Instant};

use capnp_rpc::{rpc_twoparty_capnp, twoparty, RpcSystem};
use futures_util::AsyncReadExt;
use reqwest::StatusCode;
use tokio::sync::mpsc;
use wafer_proto::cluster_capnp::{cluster, error, event, event_sink, gateway};
use wafer_tests::cluster::Cluster;
use wafer_tests::{assert_connection_closed, capnp_frame_announcing, example, http};

use crate::{create_token as token, deploy_example, start, submit_job};

/// Connects to the API at `addr` (the connection runs on the current `LocalSet`).
async fn connect(addr: &str) -> gateway::Client {
    let stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
    stream.set_nodelay(true).expect("nodelay");
    let (reader, writer) = tokio_util::compat::TokioAsyncReadCompatExt::compat(stream).split();
    let network = Box::new(twoparty::VatNetwork::new(
        reader,
        writer,
        rpc_twoparty_capnp::Side::Client,
        Default::default(),
    ));
    let mut system = RpcSystem::new(network, None);
    let client: gateway::Client = system.bootstrap(rpc_twoparty_capnp::Side::Server);
    tokio::task::spawn_local(system);
    client
}

/// `(code, reason)` of an `Error`.
fn code(e: error::Reader<'_>) -> (error::Code, String) {
    (
        e.get_code().expect("known code"),
        e.get_reason().expect("reason").to_string().expect("utf-8"),
    )
}

/// Logs in at `addr` with `token`; the `Cluster`, or the refusal's code.
async fn login(addr: &str, token: &str) -> Result<cluster::Client, error::Code> {
    let gateway = connect(addr).await;
    let mut request = gateway.login_request();
    request.get().set_token(token);
    let response = request.send().promise.await.expect("login call");
    let results = response.get().expect("results");
    let (c, _) = code(results.get_error().expect("error field"));
    if c != error::Code::Ok {
        return Err(c);
    }
    Ok(results.get_cluster().expect("cluster"))
}

/// Uploads `wasm` as `name` in chunks of `chunk` bytes, announcing `size`; returns the
/// progress seen and the outcome's error code (Ok on success) with the new version.
async fn upload(
    cluster: &cluster::Client,
    name: &str,
    wasm: &[u8],
    size: u64,
    chunk: usize,
) -> (Vec<u64>, error::Code, u64) {
    let mut request = cluster.deploy_request();
    request.get().set_name(name);
    request.get().set_size(size);
    request.get().set_manifest("");
    let response = request.send().promise.await.expect("deploy call");
    let results = response.get().expect("results");
    let (c, _) = code(results.get_error().expect("error"));
    if c != error::Code::Ok {
        return (Vec::new(), c, 0);
    }
    let upload = results.get_upload().expect("upload");
    let mut progress = Vec::new();
    for part in wasm.chunks(chunk) {
        let mut write = upload.write_request();
        write.get().set_chunk(part);
        let answer = write.send().promise.await.expect("write call");
        let answer = answer.get().expect("results");
        let (c, _) = code(answer.get_error().expect("error"));
        if c != error::Code::Ok {
            return (progress, c, 0);
        }
        progress.push(answer.get_received());
    }
    let finished = upload
        .finish_request()
        .send()
        .promise
        .await
        .expect("finish call");
    let finished = finished.get().expect("results");
    let (c, _) = code(finished.get_error().expect("error"));
    let version = finished
        .get_function()
        .map(|f| f.get_version())
        .unwrap_or(0);
    (progress, c, version)
}

/// The error code of `listFunctions`.
async fn list_code(cluster: &cluster::Client) -> error::Code {
    let response = cluster
        .list_functions_request()
        .send()
        .promise
        .await
        .expect("call");
    code(response.get().expect("results").get_error().expect("error")).0
}

/// Invokes `name` with `body` at `path`: the error code and reason, the status and body.
async fn invoke(
    cluster: &cluster::Client,
    name: &str,
    path: &str,
    body: &[u8],
) -> (error::Code, String, u16, Vec<u8>) {
    let mut request = cluster.invoke_request();
    request.get().set_name(name);
    let mut r = request.get().init_request();
    r.set_path(path);
    r.set_body(body);
    let response = request.send().promise.await.expect("invoke call");
    let results = response.get().expect("results");
    let (c, reason) = code(results.get_error().expect("error"));
    let (status, body) = match results.get_response() {
        Ok(r) => (r.get_status(), r.get_body().unwrap_or_default().to_vec()),
        Err(_) => (0, Vec::new()),
    };
    (c, reason, status, body)
}

#[tokio::test]
async fn each_scope_allows_its_calls_and_refuses_the_others() {
    let (_dir, server) = start(&[]);
    deploy_example(&server, "hello", "").await;
    let hello = example("hello").expect("example");
    tokio::task::LocalSet::new()
        .run_until(async {
            let api = server.api();
            assert_eq!(
                login(api, "not-a-token").await.err(),
                Some(error::Code::Unauthorized)
            );
            let read = login(api, &token(server.base(), &["read"]).await.0)
                .await
                .expect("login");
            let deploy = login(api, &token(server.base(), &["deploy"]).await.0)
                .await
                .expect("login");
            let invoker = login(api, &token(server.base(), &["invoke"]).await.0)
                .await
                .expect("login");
            let admin = login(api, wafer_tests::ADMIN_TOKEN).await.expect("login");

            assert_eq!(list_code(&read).await, error::Code::Ok);
            assert_eq!(list_code(&deploy).await, error::Code::Forbidden);
            assert_eq!(list_code(&invoker).await, error::Code::Forbidden);
            assert_eq!(list_code(&admin).await, error::Code::Ok);

            let size = hello.len() as u64;
            assert_eq!(
                upload(&read, "f", &hello, size, 4096).await.1,
                error::Code::Forbidden
            );
            assert_eq!(
                upload(&deploy, "f", &hello, size, 4096).await.1,
                error::Code::Ok
            );
            assert_eq!(
                invoke(&deploy, "hello", "/", b"").await.0,
                error::Code::Forbidden
            );
            let (c, _, status, body) = invoke(&invoker, "hello", "/?name=capnp", b"").await;
            assert_eq!((c, status), (error::Code::Ok, 200));
            assert!(String::from_utf8_lossy(&body).contains("capnp"));
            // Headers reach the guest, UTF-8 beyond ASCII included (as over HTTP).
            let mut request = invoker.invoke_request();
            request.get().set_name("hello");
            let mut r = request.get().init_request();
            r.set_path("/");
            let mut headers = r.init_headers(1);
            headers.reborrow().get(0).set_key("X-Name");
            headers.get(0).set_value("José");
            let response = request.send().promise.await.expect("invoke call");
            let results = response.get().expect("results");
            assert_eq!(code(results.get_error().expect("error")).0, error::Code::Ok);
            let body = results
                .get_response()
                .expect("response")
                .get_body()
                .expect("body");
            let body = String::from_utf8_lossy(body);
            assert!(body.contains("header: x-name: José\n"), "{body}");
            assert_eq!(
                invoke(&read, "hello", "/", b"").await.0,
                error::Code::Forbidden
            );

            let mut submit = invoker.submit_job_request();
            submit.get().init_job().set_function("hello");
            let answer = submit.send().promise.await.expect("submit");
            assert_eq!(
                code(answer.get().expect("r").get_error().expect("e")).0,
                error::Code::Ok
            );
            let mut submit = read.submit_job_request();
            submit.get().init_job().set_function("hello");
            let answer = submit.send().promise.await.expect("submit");
            assert_eq!(
                code(answer.get().expect("r").get_error().expect("e")).0,
                error::Code::Forbidden
            );
            let mut delete = invoker.delete_function_request();
            delete.get().set_name("f");
            let answer = delete.send().promise.await.expect("delete");
            assert_eq!(
                code(answer.get().expect("r").get_error().expect("e")).0,
                error::Code::Forbidden
            );
            let status = read.status_request().send().promise.await.expect("status");
            let status = status.get().expect("r").get_status().expect("status");
            assert_eq!(status.get_leader_id(), 1);
        })
        .await;
}

#[tokio::test]
async fn a_revoked_token_stops_working_at_once() {
    let (_dir, server) = start(&[]);
    tokio::task::LocalSet::new()
        .run_until(async {
            let (secret, id) = token(server.base(), &["read"]).await;
            let cluster = login(server.api(), &secret).await.expect("login");
            assert_eq!(list_code(&cluster).await, error::Code::Ok);
            let (_subscription, mut events) = watch(&cluster).await;
            let revoked = http()
                .delete(server.url(&format!("/v1/tokens/{id}")))
                .send()
                .await
                .expect("revoke");
            assert_eq!(revoked.status(), StatusCode::OK);
            assert_eq!(list_code(&cluster).await, error::Code::Unauthorized);
            assert_eq!(
                login(server.api(), &secret).await.err(),
                Some(error::Code::Unauthorized)
            );
            // Its subscription is told why it ends.
            expect_event(&mut events, |e| {
                e.starts_with("ended:") && e.contains("revoked")
            })
            .await;
        })
        .await;
}

#[tokio::test]
async fn chunked_uploads_report_progress_and_over_the_limit_store_nothing() {
    let (_dir, server) = start(&["--max-module-mb", "1"]);
    let markdown = example("markdown").expect("example");
    tokio::task::LocalSet::new()
        .run_until(async {
            let cluster = login(server.api(), wafer_tests::ADMIN_TOKEN)
                .await
                .expect("login");
            // Over the limit as announced: refused before any byte is sent.
            assert_eq!(
                upload(&cluster, "big", &[], 2 << 20, 1024).await.1,
                error::Code::TooLarge
            );
            // More than announced: refused mid-upload; nothing is stored.
            let (_, c, _) = upload(&cluster, "liar", &markdown, 1000, 64 << 10).await;
            assert_eq!(c, error::Code::TooLarge);
            let mut get = cluster.get_function_request();
            get.get().set_name("liar");
            let answer = get.send().promise.await.expect("get");
            assert_eq!(
                code(answer.get().expect("r").get_error().expect("e")).0,
                error::Code::NotFound
            );
            // Malformed WebAssembly: a clear error, nothing stored.
            let (_, c, _) = upload(&cluster, "junk", b"not wasm", 8, 4).await;
            assert_eq!(c, error::Code::Invalid);

            // A real module in 64 KiB chunks: progress counts up to its size, and the
            // function is served.
            if markdown.len() <= 1 << 20 {
                let (progress, c, version) = upload(
                    &cluster,
                    "markdown",
                    &markdown,
                    markdown.len() as u64,
                    64 << 10,
                )
                .await;
                assert_eq!((c, version), (error::Code::Ok, 1));
                assert_eq!(progress.last().copied(), Some(markdown.len() as u64));
                assert!(progress.windows(2).all(|w| w[0] < w[1]));
                let (c, _, status, body) =
                    invoke(&cluster, "markdown", "/", b"# Title\n\n*hi*").await;
                assert_eq!((c, status), (error::Code::Ok, 200));
                assert!(String::from_utf8_lossy(&body).contains("<h1>Title</h1>"));
            }
            let listed = http()
                .get(server.url("/v1/functions"))
                .send()
                .await
                .expect("list")
                .text()
                .await
                .expect("body");
            assert!(!listed.contains("liar") && !listed.contains("junk"));
        })
        .await;
}

#[tokio::test]
async fn invocations_and_jobs_answer_with_results_or_typed_errors() {
    let (_dir, server) = start(&[]);
    deploy_example(&server, "wordcount", "").await;
    deploy_example(&server, "spin", "").await;
    tokio::task::LocalSet::new()
        .run_until(async {
            let cluster = login(server.api(), wafer_tests::ADMIN_TOKEN)
                .await
                .expect("login");
            let (c, reason, _, _) = invoke(&cluster, "nope", "/", b"").await;
            assert_eq!((c, reason.as_str()), (error::Code::NotFound, "not_found"));
            let (c, reason, status, _) = invoke(&cluster, "spin", "/", b"").await;
            assert_eq!(
                (c, reason.as_str(), status),
                (error::Code::Timeout, "timeout", 504)
            );

            let mut submit = cluster.submit_job_request();
            let mut job = submit.get().init_job();
            job.set_function("wordcount");
            job.set_input(b"one two three");
            let answer = submit.send().promise.await.expect("submit");
            let id = answer.get().expect("r").get_job().expect("job").get_id();
            let mut wait = cluster.await_job_request();
            wait.get().set_id(id);
            wait.get().set_timeout_ms(60_000);
            let answer = wait.send().promise.await.expect("await");
            let job = answer.get().expect("r").get_job().expect("job");
            assert_eq!(
                job.get_state().expect("state").to_str().expect("utf-8"),
                "FINISHED"
            );
            assert!(job.get_ended());
            // A WAGI function's stdout: CGI headers, a blank line, the JSON.
            let output = String::from_utf8_lossy(job.get_output().expect("output")).to_string();
            let json = output
                .split_once("\n\n")
                .map_or(output.as_str(), |(_, body)| body);
            let stats: serde_json::Value = serde_json::from_str(json).expect("json");
            assert_eq!(stats["words"], 3, "{output}");
            assert_eq!(job.get_attempts().expect("attempts").len(), 1);

            let nodes = cluster
                .list_nodes_request()
                .send()
                .promise
                .await
                .expect("nodes");
            let nodes = nodes.get().expect("r").get_nodes().expect("nodes");
            assert_eq!(nodes.len(), 1);
            assert_eq!(
                nodes.get(0).get_state().expect("s").to_str().expect("u"),
                "active"
            );
        })
        .await;
}

#[tokio::test]
async fn malformed_and_oversized_messages_close_only_their_connection() {
    let (_dir, server) = start(&[]);
    let addr = server.api().to_string();
    // Garbage, and a segment table announcing a 1 GiB message (the API reads 64 MiB).
    assert_connection_closed(&addr, b"GET / HTTP/1.1\r\n\r\n garbage garbage").await;
    assert_connection_closed(&addr, &capnp_frame_announcing(128 << 20)).await;
    // Everyone else is still served.
    tokio::task::LocalSet::new()
        .run_until(async {
            let cluster = login(&addr, wafer_tests::ADMIN_TOKEN).await.expect("login");
            assert_eq!(list_code(&cluster).await, error::Code::Ok);
        })
        .await;
}

/// An event sink that forwards each event as a short text.
struct Sink(mpsc::UnboundedSender<String>);

impl event_sink::Server for Sink {
    async fn event(
        self: Rc<Self>,
        params: event_sink::EventParams,
        _: event_sink::EventResults,
    ) -> Result<(), capnp::Error> {
        let e = params.get()?.get_event()?;
        let text = match e.which()? {
            event::Deployed(f) => format!("deployed:{}", f?.get_name()?.to_str()?),
            event::Deleted(name) => format!("deleted:{}", name?.to_str()?),
            event::TaskChanged(t) => format!("task:{}:{}", t.get_job(), t.get_state()?.to_str()?),
            event::NodeJoined(a) => format!("joined:{}", a?.to_str()?),
            event::NodeLost(a) => format!("lost:{}", a?.to_str()?),
            event::LeaderChanged(l) => format!("leader:{}", l.get_leader_id()),
            event::Missed(n) => format!("missed:{n}"),
            event::Ended(why) => format!("ended:{}", why?.to_str()?),
        };
        let _ = self.0.send(text);
        Ok(())
    }
}

/// Subscribes `sink` on `cluster`; keep the subscription to keep the events coming.
async fn watch(
    cluster: &cluster::Client,
) -> (
    wafer_proto::cluster_capnp::subscription::Client,
    mpsc::UnboundedReceiver<String>,
) {
    let (tx, rx) = mpsc::unbounded_channel();
    let mut request = cluster.watch_request();
    request
        .get()
        .set_sink(capnp_rpc::new_client::<event_sink::Client, _>(Sink(tx)));
    let answer = request.send().promise.await.expect("watch");
    let results = answer.get().expect("results");
    assert_eq!(code(results.get_error().expect("e")).0, error::Code::Ok);
    (results.get_subscription().expect("subscription"), rx)
}

/// Waits for an event matching `wanted`.
async fn expect_event(rx: &mut mpsc::UnboundedReceiver<String>, wanted: impl Fn(&str) -> bool) {
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut seen = Vec::new();
    while Instant::now() < deadline {
        match tokio::time::timeout(Duration::from_secs(1), rx.recv()).await {
            Ok(Some(e)) if wanted(&e) => return,
            Ok(Some(e)) => seen.push(e),
            Ok(None) => break,
            Err(_) => {}
        }
    }
    panic!("the expected event never came; seen: {seen:?}");
}

#[tokio::test]
async fn watch_pushes_deploys_and_job_changes() {
    let (_dir, server) = start(&[]);
    tokio::task::LocalSet::new()
        .run_until(async {
            let cluster = login(server.api(), wafer_tests::ADMIN_TOKEN)
                .await
                .expect("login");
            let (subscription, mut rx) = watch(&cluster).await;
            deploy_example(&server, "wordcount", "").await;
            expect_event(&mut rx, |e| e == "deployed:wordcount").await;
            let submitted = submit_job(
                &server,
                serde_json::json!({ "function": "wordcount", "input": "a b" }),
            )
            .await;
            let id = submitted["id"].as_u64().expect("id");
            expect_event(&mut rx, |e| e == format!("task:{id}:FINISHED")).await;
            // Cancelled: no more events.
            subscription
                .cancel_request()
                .send()
                .promise
                .await
                .expect("cancel");
            deploy_example(&server, "hello", "").await;
            let late = tokio::time::timeout(Duration::from_millis(500), async {
                while let Some(e) = rx.recv().await {
                    if e == "deployed:hello" {
                        return true;
                    }
                }
                false
            })
            .await;
            assert!(!matches!(late, Ok(true)), "an event came after cancel");
        })
        .await;
}

#[tokio::test]
async fn watch_on_a_follower_goes_on_across_a_leader_change() {
    let dir = tempfile::tempdir().expect("temp dir");
    let mut cluster = Cluster::start(dir.path(), 3, &[]).await.expect("cluster");
    let leader = cluster.wait_leader(&[1, 2, 3]).await.expect("leader");
    let follower = [1, 2, 3]
        .into_iter()
        .find(|id| *id != leader)
        .expect("a follower");
    let api = cluster.server(follower).api.clone();
    let local = tokio::task::LocalSet::new();
    let (client, _subscription, mut rx) = local
        .run_until(async {
            let client = login(&api, wafer_tests::ADMIN_TOKEN).await.expect("login");
            let (subscription, rx) = watch(&client).await;
            (client, subscription, rx)
        })
        .await;
    cluster.kill(leader).expect("kill the leader");
    let rest: Vec<u64> = [1, 2, 3].into_iter().filter(|id| *id != leader).collect();
    let new_leader = cluster.wait_leader(&rest).await.expect("a new leader");
    local
        .run_until(async {
            expect_event(&mut rx, |e| e == format!("leader:{new_leader}")).await;
            let other = rest
                .iter()
                .copied()
                .find(|id| *id != follower)
                .expect("another survivor");
            let wasm = example("hello").expect("example");
            let response = http()
                .put(cluster.server(other).url("/v1/functions/after"))
                .body(wasm)
                .send()
                .await
                .expect("deploy");
            assert_eq!(response.status(), StatusCode::CREATED);
            expect_event(&mut rx, |e| e == "deployed:after").await;
            assert_eq!(list_code(&client).await, error::Code::Ok);
        })
        .await;
}
