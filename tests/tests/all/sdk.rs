//! The guest SDK's contract, run natively: the `greeter` example of `wafer-guest`
//! (built by `cargo test`) reads WAGI variables and answers CGI output.

use std::io::Write;
use std::path::PathBuf;
use std::process::{Command, Output, Stdio};

fn greeter() -> PathBuf {
    let bin = wafer_tests::wafer_bin().expect("wafer binary");
    let path = bin.with_file_name("examples").join("greeter");
    assert!(
        path.exists(),
        "{} is missing: `cargo test` builds the wafer-guest examples",
        path.display()
    );
    path
}

fn run(query: &str, body: &[u8]) -> Output {
    run_with(query, body, &[])
}

/// [`run`] with more environment variables, given as bytes.
fn run_with(query: &str, body: &[u8], extra: &[(&str, &[u8])]) -> Output {
    use std::os::unix::ffi::OsStrExt;
    let mut child = Command::new(greeter())
        .env_clear()
        .envs(
            extra
                .iter()
                .map(|(k, v)| (*k, std::ffi::OsStr::from_bytes(v))),
        )
        .env("REQUEST_METHOD", "POST")
        .env("PATH_INFO", "/")
        .env("QUERY_STRING", query)
        .env("CONTENT_LENGTH", body.len().to_string())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("greeter runs");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(body)
        .expect("write");
    child.wait_with_output().expect("output")
}

#[test]
fn answers_with_cgi_output() {
    let out = run("name=ada", b"12345");
    assert_eq!(out.status.code(), Some(0));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.starts_with("Status: 200\n"), "{stdout}");
    assert!(
        stdout.contains("content-type: text/plain; charset=utf-8\n"),
        "{stdout}"
    );
    assert!(
        stdout.ends_with("\n\nHello, ada! You sent 5 bytes.\n"),
        "{stdout}"
    );
}

#[test]
fn an_error_becomes_a_500_with_its_message() {
    let out = run("name=", b"");
    assert_eq!(out.status.code(), Some(0));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.starts_with("Status: 500\n"), "{stdout}");
    assert!(stdout.ends_with("\n\nname must not be empty\n"), "{stdout}");
}

#[test]
fn a_panic_becomes_a_500_naming_it_and_exit_status_70() {
    let out = run("panic=1", b"");
    assert_eq!(out.status.code(), Some(70));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.starts_with("Status: 500\n"), "{stdout}");
    assert!(stdout.contains("function panicked at"), "{stdout}");
    assert!(stdout.contains("asked to panic"), "{stdout}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("asked to panic"), "{stderr}");
}

#[test]
fn a_variable_that_is_not_utf8_does_not_break_the_request() {
    // A host other than wafer may pass a Latin-1 header on as it came.
    let out = run_with("name=ada", b"", &[("HTTP_X_LATIN1", b"caf\xe9")]);
    assert_eq!(out.status.code(), Some(0));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.starts_with("Status: 200\n"), "{stdout}");
    assert!(
        stdout.ends_with("\n\nHello, ada! You sent 0 bytes.\n"),
        "{stdout}"
    );
}
