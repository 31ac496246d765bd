//! Authentication of API callers: the node's in-memory index of the replicated API
//! tokens, kept current as an [`Observer`] of the state machine, and the check of a
//! presented secret (or of a logged-in capability's token) against it.
//!
//! The index changes in the same step that applies a `CreateToken` or `RevokeToken`
//! command, before the proposer is answered: a revocation acknowledged by a node holds
//! on that node from then on, and on every other node as soon as it applies the entry.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};

use crate::state::{
    hash_token_into, CommandResponse, Observer, Scope, State, StateError, TokenId, TokenRecord,
};

/// Why a caller was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    /// No token was presented.
    #[error(
        "missing token: send `Authorization: Bearer <token>` (`wafer token create` makes one; \
         `wafer dev` keeps an admin token in its data folder)"
    )]
    Missing,
    /// The token is not known: never created, or revoked.
    #[error("unknown or revoked token")]
    Unknown,
    /// The token has expired.
    #[error("token {0} has expired")]
    Expired(TokenId),
    /// The token is valid but lacks the scope the call needs.
    #[error("token {id} (scopes: {scopes}) does not allow this: it needs the {needed} scope")]
    Forbidden {
        /// The token.
        id: TokenId,
        /// Its scopes.
        scopes: String,
        /// The scope the call needs.
        needed: Scope,
    },
}

impl AuthError {
    /// Whether the caller is known but not allowed (HTTP 403) rather than not known
    /// (HTTP 401).
    pub fn is_forbidden(&self) -> bool {
        matches!(self, AuthError::Forbidden { .. })
    }
}

/// The node's tokens, indexed by their secret's hash. Records are shared: a check on
/// every request hands out a reference, not a copy.
pub struct Tokens {
    state: State,
    by_hash: RwLock<HashMap<String, Arc<TokenRecord>>>,
}

impl Tokens {
    /// Loads the tokens from `state`.
    pub fn load(state: State) -> Result<Tokens, StateError> {
        let tokens = Tokens {
            state,
            by_hash: RwLock::new(HashMap::new()),
        };
        tokens.reload()?;
        Ok(tokens)
    }

    /// Reads every token from the state again.
    pub fn reload(&self) -> Result<(), StateError> {
        let all = self.state.list_tokens()?;
        let index = all
            .into_iter()
            .map(|t| (t.hash.clone(), Arc::new(t)))
            .collect();
        *self.by_hash.write().unwrap_or_else(|e| e.into_inner()) = index;
        Ok(())
    }

    /// Whether no token exists (a cluster that was never given one).
    pub fn is_empty(&self) -> bool {
        self.by_hash
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .is_empty()
    }

    /// Every token, by id.
    pub fn list(&self) -> Vec<TokenRecord> {
        let mut all: Vec<TokenRecord> = self
            .by_hash
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .map(|t| TokenRecord::clone(t))
            .collect();
        all.sort_by(|a, b| a.id.cmp(&b.id));
        all
    }

    /// The token whose secret is `secret`, if it is valid now.
    pub fn authenticate(&self, secret: Option<&str>) -> Result<Arc<TokenRecord>, AuthError> {
        let secret = secret.filter(|s| !s.is_empty()).ok_or(AuthError::Missing)?;
        let mut hex = [0; 64];
        self.by_hash_valid(hash_token_into(secret, &mut hex))
    }

    /// The token whose secret's hash is `hash`, if it is valid now (a capability
    /// obtained by logging in re-checks its token this way on every call).
    pub fn by_hash_valid(&self, hash: &str) -> Result<Arc<TokenRecord>, AuthError> {
        let record = self
            .by_hash
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(hash)
            .cloned()
            .ok_or(AuthError::Unknown)?;
        if record.expired(crate::scheduler::now_ms()) {
            return Err(AuthError::Expired(record.id.clone()));
        }
        Ok(record)
    }

    /// The token whose secret's hash is `hash`, if it is valid now and allows `scope`.
    pub fn authorize_hash(&self, hash: &str, scope: Scope) -> Result<Arc<TokenRecord>, AuthError> {
        allow(self.by_hash_valid(hash)?, scope)
    }

    /// The token whose secret is `secret`, if it is valid now and allows `scope`.
    pub fn authorize(
        &self,
        secret: Option<&str>,
        scope: Scope,
    ) -> Result<Arc<TokenRecord>, AuthError> {
        allow(self.authenticate(secret)?, scope)
    }
}

/// `record` if it allows `scope`.
pub fn allow(record: Arc<TokenRecord>, scope: Scope) -> Result<Arc<TokenRecord>, AuthError> {
    if record.allows(scope) {
        Ok(record)
    } else {
        Err(AuthError::Forbidden {
            scopes: record.scope_list(),
            id: record.id.clone(),
            needed: scope,
        })
    }
}

impl Observer for Tokens {
    fn applied(&self, _last_index: u64, changes: &[&CommandResponse]) {
        let touched = changes.iter().any(|c| {
            matches!(
                c,
                CommandResponse::TokenCreated(_) | CommandResponse::TokenRevoked(_)
            )
        });
        if !touched {
            return;
        }
        let mut index = self.by_hash.write().unwrap_or_else(|e| e.into_inner());
        for change in changes {
            match change {
                CommandResponse::TokenCreated(record) => {
                    index.insert(record.hash.clone(), Arc::new(record.clone()));
                }
                CommandResponse::TokenRevoked(id) => index.retain(|_, t| t.id != *id),
                _ => {}
            }
        }
    }

    fn replaced(&self, _last_index: u64) {
        if let Err(e) = self.reload() {
            tracing::error!(error = %e, "reloading tokens after a snapshot");
        }
    }
}
