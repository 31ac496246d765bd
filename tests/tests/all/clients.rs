//! Clients in other languages against a real `wafer dev`: the C++ client in
//! `clients/cpp` (built here with Debian's libcapnp-dev) logs in and invokes.

use std::io::Write;
use std::process::{Command, Stdio};

use wafer_tests::workspace_root;

use crate::{deploy_example, start};

/// Builds `clients/cpp` (quick when up to date) and returns the program's path.
fn build_cpp_client() -> std::path::PathBuf {
    let root = workspace_root();
    let out = root.join("target").join("cpp");
    let built = Command::new(root.join("clients/cpp/build.sh"))
        .arg(&out)
        .stderr(Stdio::inherit())
        .output()
        .expect("run clients/cpp/build.sh");
    assert!(built.status.success(), "building the C++ client failed");
    out.join("wafer-invoke")
}

/// Runs the C++ client with `stdin`; its exit code, stdout and stderr.
fn run_cpp(program: &std::path::Path, args: &[&str], stdin: &[u8]) -> (i32, String, String) {
    let mut child = Command::new(program)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run wafer-invoke");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(stdin)
        .expect("write stdin");
    let out = child.wait_with_output().expect("wait");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test]
async fn the_cpp_client_logs_in_and_invokes() {
    let program = build_cpp_client();
    let (_dir, server) = start(&[]);
    deploy_example(&server, "hello", "").await;
    deploy_example(&server, "markdown", "").await;
    let api = server.api().to_string();
    let token = wafer_tests::ADMIN_TOKEN;

    let (code, out, err) = run_cpp(&program, &[&api, token, "hello", "/?name=cpp"], b"");
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("Hello, cpp!"), "{out}");
    assert!(err.contains("status: 200"), "{err}");

    let (code, out, err) = run_cpp(&program, &[&api, token, "markdown"], b"# From C++\n");
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("<h1>From C++</h1>"), "{out}");

    let (code, _, err) = run_cpp(&program, &[&api, "not-a-token", "hello"], b"");
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("error: unauthorized"), "{err}");

    let (code, _, err) = run_cpp(&program, &[&api, token, "nope"], b"");
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("error: notFound"), "{err}");
}
