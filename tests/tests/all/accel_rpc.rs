//! `wafer accel` over Cap'n Proto, as any cluster member reaches it: devices behind
//! the cluster secret, buffers that stay on the device between kernels, promise
//! pipelining (compile, kernel, run and read in one round trip), typed errors, the
//! grant's memory bound, sessions that cannot use each other's buffers, and a kernel
//! past its deadline (timeout, then `busy`, then the device serves again).

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::process::{Child, Command};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use wafer::accel::client::connect;
use wafer::accel::{AccelError, ErrorKind};
use wafer::rpc::ClusterSecret;
use wafer_proto::accel_capnp::{accel, arg, buffer, kernel, session};
use wafer_tests::{spawn_until_ready, wafer_bin, CLUSTER_SECRET};

/// A `wafer accel` process; killed when dropped.
pub struct Backend {
    child: Child,
    /// Its address.
    pub addr: String,
    _dir: tempfile::TempDir,
}

impl Backend {
    /// Starts `wafer accel` on a free port with `extra` arguments.
    pub fn start(extra: &[&str]) -> Backend {
        let dir = tempfile::tempdir().expect("temp dir");
        let mut command = Command::new(wafer_bin().expect("wafer built"));
        command
            .args(["accel", "--listen", "127.0.0.1:0"])
            .args(extra);
        // "wafer accel: N devices; rpc ADDR"
        let (child, addr) =
            spawn_until_ready(command, &dir.path().join("accel"), "wafer accel", |line| {
                let rest = line.strip_prefix("wafer accel: ")?;
                Some(rest.split_once("; rpc ")?.1.trim().to_string())
            })
            .expect("wafer accel starts (is PoCL installed? scripts/bootstrap.sh installs it)");
        Backend {
            child,
            addr,
            _dir: dir,
        }
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn secret() -> ClusterSecret {
    ClusterSecret::new(CLUSTER_SECRET).expect("test secret")
}

/// Runs `f` on a `LocalSet` (capnp-rpc objects are `!Send`).
async fn local<F: std::future::Future<Output = ()>>(f: F) {
    tokio::task::LocalSet::new().run_until(f).await
}

const ADD: &str =
    "__kernel void add(__global const float* a, __global const float* b, __global float* c) {
    size_t i = get_global_id(0);
    c[i] = a[i] + b[i];
}
__kernel void scale(__global float* x, float by) {
    size_t i = get_global_id(0);
    x[i] = x[i] * by;
}";

fn floats(values: &[f32]) -> Vec<u8> {
    values.iter().flat_map(|f| f.to_le_bytes()).collect()
}

fn from_bytes(bytes: &[u8]) -> Vec<f32> {
    bytes
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect()
}

fn open(accel: &accel::Client, memory: u64, timeout_ms: u64) -> session::Client {
    let mut request = accel.open_request();
    request.get().set_device(0);
    request.get().set_memory_limit(memory);
    request.get().set_timeout_ms(timeout_ms);
    request.send().pipeline.get_session()
}

fn alloc(session: &session::Client, bytes: u64) -> buffer::Client {
    let mut request = session.alloc_request();
    request.get().set_bytes(bytes);
    request.send().pipeline.get_buffer()
}

async fn write(buffer: &buffer::Client, data: &[u8]) -> Result<(), AccelError> {
    let mut request = buffer.write_request();
    request.get().set_data(data);
    request.send().promise.await?;
    Ok(())
}

async fn read(buffer: &buffer::Client, offset: u64, length: u64) -> Result<Vec<u8>, AccelError> {
    let mut request = buffer.read_request();
    request.get().set_offset(offset);
    request.get().set_length(length);
    let reply = request.send().promise.await?;
    Ok(reply.get()?.get_data()?.to_vec())
}

enum A<'a> {
    Buf(&'a buffer::Client),
    F(f32),
    U(u32),
}

async fn run(
    session: &session::Client,
    source: &str,
    name: &str,
    args: &[A<'_>],
    global: &[u64],
    local_size: &[u64],
) -> Result<u64, AccelError> {
    let kernel = kernel_of(session, source, name).await?;
    let mut request = kernel.run_request();
    {
        let mut p = request.get();
        write_args(p.reborrow().init_args(args.len() as u32), args);
        let mut g = p.reborrow().init_global(global.len() as u32);
        for (i, v) in global.iter().enumerate() {
            g.set(i as u32, *v);
        }
        let mut l = p.init_local(local_size.len() as u32);
        for (i, v) in local_size.iter().enumerate() {
            l.set(i as u32, *v);
        }
    }
    let reply = request.send().promise.await?;
    Ok(reply.get()?.get_info()?.get_device_ns())
}

fn write_args(mut list: capnp::struct_list::Builder<'_, arg::Owned>, args: &[A<'_>]) {
    for (i, arg) in args.iter().enumerate() {
        let mut w = list.reborrow().get(i as u32);
        match arg {
            A::Buf(b) => w.set_buffer((*b).clone()),
            A::F(v) => w.set_float(*v),
            A::U(v) => w.set_uint(*v),
        }
    }
}

/// Buffers holding `a` and `b`, and a third of the same size for the output.
async fn inputs(
    session: &session::Client,
    a: &[f32],
    b: &[f32],
) -> (buffer::Client, buffer::Client, buffer::Client) {
    let bytes = (a.len() * 4) as u64;
    let (da, db, dc) = (
        alloc(session, bytes),
        alloc(session, bytes),
        alloc(session, bytes),
    );
    write(&da, &floats(a)).await.expect("write a");
    write(&db, &floats(b)).await.expect("write b");
    (da, db, dc)
}

/// Kernel `name` of `source`, compiled and looked up pipelined, awaited (a dropped
/// request promise would cancel the call its pipelined capability stands for).
async fn kernel_of(
    session: &session::Client,
    source: &str,
    name: &str,
) -> Result<kernel::Client, AccelError> {
    let mut compile = session.compile_request();
    compile.get().set_source(source);
    let program = compile.send().pipeline.get_program();
    let mut kernel = program.kernel_request();
    kernel.get().set_name(name);
    Ok(kernel.send().promise.await?.get()?.get_kernel()?)
}

/// `Session.runAll` of `runs` (kernel, arguments, global size); answers their device
/// time.
async fn run_all(
    session: &session::Client,
    runs: &[(&kernel::Client, &[A<'_>], u64)],
) -> Result<u64, AccelError> {
    let mut request = session.run_all_request();
    let mut list = request.get().init_runs(runs.len() as u32);
    for (i, (kernel, args, global)) in runs.iter().enumerate() {
        let mut w = list.reborrow().get(i as u32);
        w.set_kernel((*kernel).clone());
        write_args(w.reborrow().init_args(args.len() as u32), args);
        w.init_global(1).set(0, *global);
    }
    let reply = request.send().promise.await?;
    Ok(reply.get()?.get_info()?.get_device_ns())
}

fn kind(result: Result<impl std::fmt::Debug, AccelError>) -> ErrorKind {
    match result {
        Ok(v) => panic!("expected an error, got {v:?}"),
        Err(e) => {
            assert!(!e.message.is_empty(), "{e:?}");
            e.kind
        }
    }
}

#[tokio::test]
async fn devices_are_served_to_members_only_and_chained_kernels_keep_data_on_the_device() {
    let backend = Backend::start(&[]);
    local(async {
        // A wrong secret gets nothing.
        let stranger = connect(
            &backend.addr,
            &ClusterSecret::new("not the cluster secret at all").expect("long"),
        )
        .await
        .expect("connects");
        let refused = stranger.devices_request().send().promise.await;
        let refused = refused.err().expect("refused").to_string();
        assert!(refused.contains("wrong cluster secret"), "{refused}");

        let accel = connect(&backend.addr, &secret()).await.expect("connects");
        let reply = accel
            .devices_request()
            .send()
            .promise
            .await
            .expect("devices");
        let devices = reply.get().expect("reply").get_devices().expect("list");
        assert!(!devices.is_empty());
        let (device, _) = wafer::accel::backend::read_device(devices.get(0)).expect("device");
        assert!(
            !device.name.is_empty() && !device.vendor.is_empty(),
            "{device:?}"
        );
        assert!(
            device.compute_units >= 1 && device.global_memory > 0,
            "{device:?}"
        );
        assert!(device.max_work_group_size >= 1, "{device:?}");

        // c = a + b, then c *= 3 in place: no data leaves the device in between.
        let n = 100_000usize;
        let a: Vec<f32> = (0..n).map(|i| i as f32).collect();
        let b: Vec<f32> = (0..n).map(|i| 2.0 * i as f32 + 1.0).collect();
        let session = open(&accel, 0, 0);
        let bytes = (n * 4) as u64;
        let (da, db, dc) = inputs(&session, &a, &b).await;
        run(
            &session,
            ADD,
            "add",
            &[A::Buf(&da), A::Buf(&db), A::Buf(&dc)],
            &[n as u64],
            &[],
        )
        .await
        .expect("add");
        run(
            &session,
            ADD,
            "scale",
            &[A::Buf(&dc), A::F(3.0)],
            &[n as u64],
            &[1000],
        )
        .await
        .expect("scale");
        let c = from_bytes(&read(&dc, 0, bytes).await.expect("read"));
        for i in 0..n {
            assert_eq!(c[i], (a[i] + b[i]) * 3.0, "element {i}");
        }
    })
    .await;
}

#[tokio::test]
async fn bad_calls_fail_with_their_kind() {
    let backend = Backend::start(&["--max-session-memory", "64"]);
    local(async {
        let accel = connect(&backend.addr, &secret()).await.expect("connects");
        let session = open(&accel, 4 << 20, 0);
        let (a, b, c) = (
            alloc(&session, 64),
            alloc(&session, 64),
            alloc(&session, 64),
        );
        // The build log comes back.
        let broken = run(
            &session,
            "__kernel void k(__global float* x) { x[0] = nope; }",
            "k",
            &[A::Buf(&a)],
            &[1],
            &[],
        )
        .await;
        let err = broken.expect_err("does not compile");
        assert_eq!(err.kind, ErrorKind::Compile, "{err:?}");
        assert!(err.message.contains("nope"), "{err:?}");
        assert_eq!(
            kind(run(&session, ADD, "missing", &[], &[1], &[]).await),
            ErrorKind::UnknownKernel
        );
        assert_eq!(
            kind(run(&session, ADD, "add", &[A::Buf(&a), A::Buf(&b)], &[16], &[]).await),
            ErrorKind::ArgCount
        );
        assert_eq!(
            kind(
                run(
                    &session,
                    ADD,
                    "add",
                    &[A::Buf(&a), A::U(1), A::Buf(&c)],
                    &[16],
                    &[]
                )
                .await
            ),
            ErrorKind::ArgType
        );
        assert_eq!(
            kind(
                run(
                    &session,
                    ADD,
                    "add",
                    &[A::Buf(&a), A::Buf(&b), A::Buf(&c)],
                    &[17],
                    &[]
                )
                .await
            ),
            ErrorKind::BufferTooSmall
        );
        assert_eq!(
            kind(
                run(
                    &session,
                    ADD,
                    "add",
                    &[A::Buf(&a), A::Buf(&b), A::Buf(&c)],
                    &[16],
                    &[1 << 24]
                )
                .await
            ),
            ErrorKind::WorkSize
        );
        assert_eq!(
            kind(
                run(
                    &session,
                    ADD,
                    "add",
                    &[A::Buf(&a), A::Buf(&b), A::Buf(&c)],
                    &[16],
                    &[3]
                )
                .await
            ),
            ErrorKind::WorkSize
        );
        assert_eq!(
            kind(
                run(
                    &session,
                    ADD,
                    "add",
                    &[A::Buf(&a), A::Buf(&b), A::Buf(&c)],
                    &[0],
                    &[]
                )
                .await
            ),
            ErrorKind::WorkSize
        );
        // Reads and writes stay inside the buffer.
        assert_eq!(kind(read(&a, 60, 8).await), ErrorKind::Invalid);
        assert_eq!(kind(write(&a, &[0; 65]).await), ErrorKind::Invalid);
        // The session's memory bound (4 MiB), and the backend's cap on a session (64 MiB).
        let big = alloc(&session, 3 << 20);
        big.size_request().send().promise.await.expect("3 MiB fit");
        let over = alloc(&session, 2 << 20);
        assert_eq!(
            kind(
                over.size_request()
                    .send()
                    .promise
                    .await
                    .map(|_| ())
                    .map_err(AccelError::from)
            ),
            ErrorKind::MemoryLimit
        );
        drop(big);
        // Freed memory counts out (once the release reaches the backend).
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let again = alloc(&session, 2 << 20);
            if again.size_request().send().promise.await.is_ok() {
                break;
            }
            assert!(Instant::now() < deadline, "freed memory never counted out");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let greedy = open(&accel, 128 << 20, 0);
        assert_eq!(
            kind(
                greedy
                    .usage_request()
                    .send()
                    .promise
                    .await
                    .map(|_| ())
                    .map_err(AccelError::from)
            ),
            ErrorKind::MemoryLimit
        );

        // Another session's buffer cannot be used, even when handed over.
        let other = open(&accel, 0, 0);
        let foreign = alloc(&other, 64);
        write(&foreign, &[7; 64]).await.expect("write");
        let used = run(
            &session,
            ADD,
            "add",
            &[A::Buf(&a), A::Buf(&b), A::Buf(&foreign)],
            &[16],
            &[],
        )
        .await;
        assert_eq!(kind(used), ErrorKind::Invalid);
        // And fresh buffers never show another session's data.
        let fresh = alloc(&session, 64);
        assert_eq!(read(&fresh, 0, 64).await.expect("read"), vec![0; 64]);
    })
    .await;
}

#[tokio::test]
async fn run_all_runs_a_chain_in_order_and_checks_every_run_first() {
    let backend = Backend::start(&[]);
    local(async {
        let accel = connect(&backend.addr, &secret()).await.expect("connects");
        let session = open(&accel, 0, 0);
        let n = 10_000usize;
        let a: Vec<f32> = (0..n).map(|i| i as f32).collect();
        let b: Vec<f32> = (0..n).map(|i| 0.5 * i as f32).collect();
        let bytes = (n * 4) as u64;
        let (da, db, dc) = inputs(&session, &a, &b).await;
        let (add, scale) = (
            kernel_of(&session, ADD, "add").await.expect("add"),
            kernel_of(&session, ADD, "scale").await.expect("scale"),
        );
        // c = a + b, c *= 3, c *= -2: in this order, in one call.
        let device_ns = run_all(
            &session,
            &[
                (&add, &[A::Buf(&da), A::Buf(&db), A::Buf(&dc)], n as u64),
                (&scale, &[A::Buf(&dc), A::F(3.0)], n as u64),
                (&scale, &[A::Buf(&dc), A::F(-2.0)], n as u64),
            ],
        )
        .await
        .expect("the chain runs");
        assert!(device_ns > 0, "the chain took no device time");
        let c = from_bytes(&read(&dc, 0, bytes).await.expect("read"));
        for i in 0..n {
            assert_eq!(c[i], (a[i] + b[i]) * 3.0 * -2.0, "element {i}");
        }
        assert_eq!(run_all(&session, &[]).await.expect("nothing to run"), 0);

        // A run that fails its checks: none of the call's runs ran, and the error
        // names the run.
        let failed = run_all(
            &session,
            &[
                (&scale, &[A::Buf(&dc), A::F(10.0)], n as u64),
                (&scale, &[A::Buf(&dc)], n as u64),
            ],
        )
        .await
        .expect_err("the second run has too few arguments");
        assert_eq!(failed.kind, ErrorKind::ArgCount, "{failed:?}");
        assert!(failed.message.starts_with("run 2 of 2: "), "{failed:?}");
        let unchanged = from_bytes(&read(&dc, 0, bytes).await.expect("read"));
        assert_eq!(unchanged, c, "no run of the failed call ran");

        // Kernels and buffers of another session are refused, and so is an oversize call.
        let other = open(&accel, 0, 0);
        let foreign = kernel_of(&other, ADD, "scale").await.expect("scale");
        let refused = run_all(&session, &[(&foreign, &[A::Buf(&dc), A::F(1.0)], 16)])
            .await
            .expect_err("a foreign kernel");
        assert_eq!(refused.kind, ErrorKind::Invalid, "{refused:?}");
        assert!(
            refused.message.contains("not one of this session"),
            "{refused:?}"
        );
        let theirs = alloc(&other, 64);
        let refused = run_all(&session, &[(&scale, &[A::Buf(&theirs), A::F(1.0)], 16)]).await;
        assert_eq!(kind(refused), ErrorKind::Invalid);
        let one = [A::Buf(&dc), A::F(1.0)];
        let many: Vec<(&kernel::Client, &[A<'_>], u64)> = vec![(&scale, &one, 16); 4097];
        assert_eq!(kind(run_all(&session, &many).await), ErrorKind::Invalid);
    })
    .await;
}

#[tokio::test]
async fn a_closed_stdout_does_not_stop_the_backend() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let port = wafer_tests::unused_port()?;
    let addr = format!("127.0.0.1:{port}");
    let args = ["accel", "--listen", &addr].map(String::from);
    let mut child = wafer_tests::spawn_with_closed_stdout(
        &args,
        &dir.path().join("accel.log"),
        "wafer accel ready",
    )
    .await?;
    let mut devices = None;
    local(async {
        if let Ok(accel) = connect(&addr, &secret()).await {
            if let Ok(reply) = accel.devices_request().send().promise.await {
                devices = reply
                    .get()
                    .and_then(|r| r.get_devices())
                    .map(|d| d.len())
                    .ok();
            }
        }
    })
    .await;
    let _ = child.kill();
    let _ = child.wait();
    anyhow::ensure!(
        devices.is_some_and(|n| n > 0),
        "wafer accel does not serve after its ready lines met the closed pipe"
    );
    Ok(())
}

/// Forwards one connection to `to`, counting the client's Call messages (`seen`).
/// Once `hold` is set to a number of calls, everything the server sends is held until
/// the client has sent that many: a client that waits for an answer before its next
/// call never gets one, and only a fully pipelined chain completes.
fn holding_proxy(to: String) -> (String, Arc<AtomicUsize>, Arc<AtomicUsize>) {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = listener.local_addr().expect("addr").to_string();
    let seen = Arc::new(AtomicUsize::new(0));
    let hold = Arc::new(AtomicUsize::new(0));
    let counter = seen.clone();
    let until = hold.clone();
    std::thread::spawn(move || {
        let Ok((mut client, _)) = listener.accept() else {
            return;
        };
        let Ok(mut server) = TcpStream::connect(&to) else {
            return;
        };
        let (mut client_rx, mut server_rx) = (
            client.try_clone().expect("clone"),
            server.try_clone().expect("clone"),
        );
        let up = counter.clone();
        std::thread::spawn(move || {
            // Client -> server, frame by frame, counting calls.
            while let Some(frame) = read_frame(&mut client_rx) {
                if is_call(&frame) {
                    up.fetch_add(1, Ordering::SeqCst);
                }
                if server.write_all(&frame).is_err() {
                    break;
                }
            }
        });
        let mut buf = vec![0u8; 1 << 16];
        loop {
            let n = match server_rx.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            while counter.load(Ordering::SeqCst) < until.load(Ordering::SeqCst) {
                std::thread::sleep(Duration::from_millis(1));
            }
            if client.write_all(&buf[..n]).is_err() {
                break;
            }
        }
    });
    (addr, seen, hold)
}

/// One capnp frame (segment table and segments), as raw bytes.
fn read_frame(stream: &mut TcpStream) -> Option<Vec<u8>> {
    let mut head = [0u8; 4];
    stream.read_exact(&mut head).ok()?;
    let segments = u32::from_le_bytes(head) as usize + 1;
    let mut table = vec![0u8; segments * 4 + if segments.is_multiple_of(2) { 4 } else { 0 }];
    stream.read_exact(&mut table).ok()?;
    let words: usize = (0..segments)
        .map(|i| {
            u32::from_le_bytes([
                table[i * 4],
                table[i * 4 + 1],
                table[i * 4 + 2],
                table[i * 4 + 3],
            ]) as usize
        })
        .sum();
    let mut body = vec![0u8; words * 8];
    stream.read_exact(&mut body).ok()?;
    let mut frame = head.to_vec();
    frame.extend_from_slice(&table);
    frame.extend_from_slice(&body);
    Some(frame)
}

fn is_call(frame: &[u8]) -> bool {
    let mut options = capnp::message::ReaderOptions::new();
    options.traversal_limit_in_words(None);
    let Ok(message) = capnp::serialize::read_message(&mut &frame[..], options) else {
        return false;
    };
    message
        .get_root::<capnp_rpc::rpc_capnp::message::Reader>()
        .ok()
        .and_then(|m| m.which().ok())
        .is_some_and(|w| matches!(w, capnp_rpc::rpc_capnp::message::Which::Call(_)))
}

#[tokio::test]
async fn compile_kernel_run_and_read_cost_one_round_trip() {
    let backend = Backend::start(&[]);
    let (proxy, seen, hold) = holding_proxy(backend.addr.clone());
    local(async move {
        let accel = connect(&proxy, &secret()).await.expect("connects");
        let session = open(&accel, 0, 0);
        let n = 1024u64;
        let (a, b, c) = (
            alloc(&session, n * 4),
            alloc(&session, n * 4),
            alloc(&session, n * 4),
        );
        let values: Vec<f32> = (0..n).map(|i| i as f32).collect();
        write(&a, &floats(&values)).await.expect("write a");
        write(&b, &floats(&values)).await.expect("write b");
        c.size_request().send().promise.await.expect("c allocated");

        // From here on the server's answers are held until the client has sent the
        // five calls of the chain: compile, kernel, run, done.buffer and read.
        const CHAIN: usize = 5;
        hold.store(seen.load(Ordering::SeqCst) + CHAIN, Ordering::SeqCst);
        let mut compile = session.compile_request();
        compile.get().set_source(ADD);
        let program = compile.send().pipeline.get_program();
        let mut k = program.kernel_request();
        k.get().set_name("add");
        let kernel = k.send().pipeline.get_kernel();
        let mut r = kernel.run_request();
        {
            let mut p = r.get();
            let mut args = p.reborrow().init_args(3);
            args.reborrow().get(0).set_buffer(a.clone());
            args.reborrow().get(1).set_buffer(b.clone());
            args.reborrow().get(2).set_buffer(c.clone());
            p.init_global(1).set(0, n);
        }
        let done = r.send().pipeline.get_done();
        let mut pick = done.buffer_request();
        pick.get().set_index(2);
        let output = pick.send().pipeline.get_buffer();
        let mut read = output.read_request();
        read.get().set_length(n * 4);
        let answer = tokio::time::timeout(Duration::from_secs(30), read.send().promise)
            .await
            .expect("the chain completes without waiting between calls (one round trip)")
            .expect("read");
        let sums = from_bytes(answer.get().expect("reply").get_data().expect("data"));
        assert_eq!(sums.len(), n as usize);
        for (i, s) in sums.iter().enumerate() {
            assert_eq!(*s, 2.0 * i as f32, "element {i}");
        }
    })
    .await;
}

#[tokio::test]
async fn a_kernel_past_its_deadline_times_out_and_the_device_recovers() {
    let backend = Backend::start(&[]);
    local(async {
        let accel = connect(&backend.addr, &secret()).await.expect("connects");
        let slow = "__kernel void spin(__global float* out, uint rounds) {
            float acc = 0.0f;
            for (uint r = 0; r < rounds; r++) {
                for (uint i = 0; i < 1000000u; i++) { acc = acc * 0.9999999f + 1.0f; }
            }
            out[get_global_id(0)] = acc;
        }";
        let session = open(&accel, 0, 200);
        let out = alloc(&session, 4);
        out.size_request().send().promise.await.expect("allocated");
        // A second session, its buffer allocated (and zeroed) before the device is taken.
        let quick = open(&accel, 0, 5000);
        let q_out = alloc(&quick, 4);
        q_out
            .size_request()
            .send()
            .promise
            .await
            .expect("allocated");
        // Long enough to pass 200 ms on any CPU; short enough to end within seconds.
        let timed_out = run(
            &session,
            slow,
            "spin",
            &[A::Buf(&out), A::U(1000)],
            &[1],
            &[],
        )
        .await;
        assert_eq!(kind(timed_out), ErrorKind::Timeout);
        // The kernel still occupies the device: runs are refused meanwhile, and then
        // served again once it ended.
        let deadline = Instant::now() + Duration::from_secs(120);
        let mut saw_busy = false;
        loop {
            match run(&quick, slow, "spin", &[A::Buf(&q_out), A::U(0)], &[1], &[]).await {
                Ok(_) => break,
                Err(e) if e.kind == ErrorKind::Busy => saw_busy = true,
                Err(e) => panic!("unexpected {e:?}"),
            }
            assert!(Instant::now() < deadline, "the device never recovered");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert!(saw_busy, "the device said busy while the late kernel ran");
    })
    .await;
}
