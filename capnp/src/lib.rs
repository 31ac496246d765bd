//! wafer's Cap'n Proto wire contracts: the schemas in `capnp/` compiled to Rust.
//!
//! - `raft.capnp`: Raft RPC between servers (append entries, vote, chunked install
//!   snapshot) and the encoding of log entries.
//! - `node.capnp`: a server's node-to-node interface (identity, forwarded writes and
//!   read-index, membership changes) and the replicated state machine's commands.
//! - `cluster.capnp`: the public API (`Gateway.login(token)` -> a scoped `Cluster`).
//! - `accel.capnp`: accelerator backends (OpenCL devices, programs, kernels, buffers).

#![allow(missing_docs, clippy::all, clippy::unwrap_used)]

pub mod raft_capnp {
    include!(concat!(env!("OUT_DIR"), "/raft_capnp.rs"));
}

pub mod node_capnp {
    include!(concat!(env!("OUT_DIR"), "/node_capnp.rs"));
}

pub mod cluster_capnp {
    include!(concat!(env!("OUT_DIR"), "/cluster_capnp.rs"));
}

pub mod accel_capnp {
    include!(concat!(env!("OUT_DIR"), "/accel_capnp.rs"));
}
