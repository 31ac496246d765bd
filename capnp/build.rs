//! Compiles the schemas in this folder with Debian's `capnp` tool (package `capnproto`).

fn main() {
    for schema in ["raft.capnp", "node.capnp", "cluster.capnp", "accel.capnp"] {
        println!("cargo:rerun-if-changed={schema}");
    }
    if let Err(err) = capnpc::CompilerCommand::new()
        .file("raft.capnp")
        .file("node.capnp")
        .file("cluster.capnp")
        .file("accel.capnp")
        .run()
    {
        panic!("compiling the Cap'n Proto schemas failed (is the `capnp` tool installed? run scripts/bootstrap.sh): {err}");
    }
}
