//! The cluster-secret handshake. The bootstrap capability of a server's `--listen` port
//! and of an agent's executor port is a `Door` (`capnp/node.capnp`) that hands out the
//! node's interface only to a peer presenting the cluster secret; every outgoing
//! connection presents it, pipelined with its first call, so the handshake costs no
//! round trip.
//!
//! The secret is compared by its SHA-256 in constant time. It authenticates peers; it
//! does not encrypt the connection: run the node ports on a private network.

use std::net::SocketAddr;
use std::rc::Rc;
use std::sync::Arc;

use sha2::{Digest as _, Sha256};
use wafer_proto::accel_capnp::accel;
use wafer_proto::node_capnp::{door, executor, node};

/// Shortest cluster secret accepted.
pub const MIN_SECRET_LEN: usize = 16;

/// What a peer is refused with when its secret is wrong.
pub const WRONG_SECRET: &str =
    "wrong cluster secret: this node belongs to another cluster (check --secret or WAFER_CLUSTER_SECRET)";

/// The secret every node of a cluster is started with.
#[derive(Clone)]
pub struct ClusterSecret {
    secret: Arc<[u8]>,
    hash: [u8; 32],
}

/// A secret too short to be one.
#[derive(Debug, Clone, thiserror::Error)]
#[error("a cluster secret has at least {MIN_SECRET_LEN} characters, this one {0}")]
pub struct InvalidSecret(pub usize);

impl std::fmt::Debug for ClusterSecret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ClusterSecret(..)")
    }
}

impl ClusterSecret {
    /// The secret `text`.
    pub fn new(text: &str) -> Result<ClusterSecret, InvalidSecret> {
        let text = text.trim();
        if text.len() < MIN_SECRET_LEN {
            return Err(InvalidSecret(text.len()));
        }
        Ok(ClusterSecret {
            secret: Arc::from(text.as_bytes()),
            hash: Sha256::digest(text.as_bytes()).into(),
        })
    }

    /// A new random secret, as text (64 hex digits).
    pub fn generate() -> String {
        hex::encode(rand::random::<[u8; 32]>())
    }

    /// The secret's bytes, as sent to peers.
    pub fn as_bytes(&self) -> &[u8] {
        &self.secret
    }

    /// Whether `presented` is this secret (compared by hash, in constant time).
    pub fn matches(&self, presented: &[u8]) -> bool {
        let hash: [u8; 32] = Sha256::digest(presented).into();
        hash.iter()
            .zip(self.hash.iter())
            .fold(0u8, |diff, (a, b)| diff | (a ^ b))
            == 0
    }
}

/// One connection's `Door`: what the peer gets once its secret matches.
pub struct DoorService {
    node: Option<node::Client>,
    executor: Option<executor::Client>,
    accel: Option<accel::Client>,
    secret: ClusterSecret,
    peer: SocketAddr,
}

impl DoorService {
    /// A server's door to `node`, for the connection from `peer`.
    pub fn server(node: node::Client, secret: ClusterSecret, peer: SocketAddr) -> door::Client {
        capnp_rpc::new_client(DoorService {
            node: Some(node),
            executor: None,
            accel: None,
            secret,
            peer,
        })
    }

    /// An agent's door to `executor`, for the connection from `peer`.
    pub fn agent(
        executor: executor::Client,
        secret: ClusterSecret,
        peer: SocketAddr,
    ) -> door::Client {
        capnp_rpc::new_client(DoorService {
            node: None,
            executor: Some(executor),
            accel: None,
            secret,
            peer,
        })
    }

    /// An accelerator backend's door to `accel`, for the connection from `peer`.
    pub fn accel(accel: accel::Client, secret: ClusterSecret, peer: SocketAddr) -> door::Client {
        capnp_rpc::new_client(DoorService {
            node: None,
            executor: None,
            accel: Some(accel),
            secret,
            peer,
        })
    }

    fn admit(&self, presented: &[u8]) -> Result<(), capnp::Error> {
        if self.secret.matches(presented) {
            Ok(())
        } else {
            tracing::warn!(peer = %self.peer, "refused a peer: wrong cluster secret");
            Err(capnp::Error::failed(WRONG_SECRET.into()))
        }
    }
}

impl door::Server for DoorService {
    async fn node(
        self: Rc<Self>,
        params: door::NodeParams,
        mut results: door::NodeResults,
    ) -> Result<(), capnp::Error> {
        self.admit(params.get()?.get_secret()?)?;
        match &self.node {
            Some(node) => {
                results.get().set_node(node.clone());
                Ok(())
            }
            None => Err(capnp::Error::failed(
                "this is not a server's node port".into(),
            )),
        }
    }

    async fn executor(
        self: Rc<Self>,
        params: door::ExecutorParams,
        mut results: door::ExecutorResults,
    ) -> Result<(), capnp::Error> {
        self.admit(params.get()?.get_secret()?)?;
        match &self.executor {
            Some(executor) => {
                results.get().set_executor(executor.clone());
                Ok(())
            }
            None => Err(capnp::Error::failed(
                "this is not an agent's executor port".into(),
            )),
        }
    }

    async fn accel(
        self: Rc<Self>,
        params: door::AccelParams,
        mut results: door::AccelResults,
    ) -> Result<(), capnp::Error> {
        self.admit(params.get()?.get_secret()?)?;
        match &self.accel {
            Some(accel) => {
                results.get().set_accel(accel.clone());
                Ok(())
            }
            None => Err(capnp::Error::failed(
                "this is not an accelerator backend's port".into(),
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_match_only_themselves_and_short_ones_are_refused() {
        let secret = ClusterSecret::new("correct horse battery staple").expect("long enough");
        assert!(secret.matches(b"correct horse battery staple"));
        assert!(!secret.matches(b"correct horse battery stapl"));
        assert!(!secret.matches(b""));
        assert!(ClusterSecret::new("short").is_err());
        assert_eq!(ClusterSecret::generate().len(), 64);
        assert!(!format!("{secret:?}").contains("horse"));
    }
}
