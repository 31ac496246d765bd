//! API tokens in the replicated state: scopes, records (the secret's SHA-256 only, never
//! the secret) and the `tokens` table, changed by `CreateToken` and `RevokeToken`.

use std::collections::BTreeSet;
use std::io::Write;

use redb::{ReadTransaction, ReadableTable, TableDefinition, TableHandle, WriteTransaction};
use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};

use super::ident::ident;
use super::{storage, write_row, Command, CommandResponse, Rejection, StateError};

/// Token id -> JSON [`TokenRecord`].
const TOKENS: TableDefinition<&str, &[u8]> = TableDefinition::new("tokens");

/// Shortest secret accepted (a bootstrap token given on the command line, say).
pub const MIN_TOKEN_LEN: usize = 16;
/// Longest secret accepted.
pub const MAX_TOKEN_LEN: usize = 256;
/// Longest token name.
pub const MAX_TOKEN_NAME_LEN: usize = 128;

ident!(
    /// A token's public id: the first 12 hex digits of its secret's SHA-256, shown by
    /// `wafer token list` and used to revoke it.
    TokenId,
    "token id"
);

/// What a token allows. `admin` allows everything.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Scope {
    /// Everything: tokens, membership, roles, and all the other scopes.
    Admin,
    /// Deploy, relabel and delete functions.
    Deploy,
    /// Invoke functions, submit and kill jobs.
    Invoke,
    /// Read the cluster's state: functions, jobs, nodes, scheduling, metrics.
    Read,
}

impl Scope {
    /// Every scope.
    pub const ALL: [Scope; 4] = [Scope::Admin, Scope::Deploy, Scope::Invoke, Scope::Read];

    /// The scope's name.
    pub fn as_str(self) -> &'static str {
        match self {
            Scope::Admin => "admin",
            Scope::Deploy => "deploy",
            Scope::Invoke => "invoke",
            Scope::Read => "read",
        }
    }
}

impl std::fmt::Display for Scope {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A scope name that is not one of [`Scope::ALL`].
#[derive(Debug, Clone, thiserror::Error)]
#[error("unknown scope {0:?}: use admin, deploy, invoke or read")]
pub struct InvalidScope(pub String);

impl std::str::FromStr for Scope {
    type Err = InvalidScope;

    fn from_str(s: &str) -> Result<Scope, InvalidScope> {
        Scope::ALL
            .into_iter()
            .find(|scope| scope.as_str() == s)
            .ok_or_else(|| InvalidScope(s.to_string()))
    }
}

/// A stored token.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenRecord {
    /// Its public id.
    pub id: TokenId,
    /// A name for people ("ci", "alice's laptop").
    pub name: String,
    /// What it allows.
    pub scopes: BTreeSet<Scope>,
    /// Hex SHA-256 of the secret.
    pub hash: String,
    /// When it was created, ms since the Unix epoch.
    pub created_at_ms: u64,
    /// When it stops working, ms since the Unix epoch (none: never).
    pub expires_at_ms: Option<u64>,
}

impl TokenRecord {
    /// Whether the token allows `scope` (`admin` allows every scope).
    pub fn allows(&self, scope: Scope) -> bool {
        self.scopes.contains(&Scope::Admin) || self.scopes.contains(&scope)
    }

    /// Whether the token has expired at `now_ms`.
    pub fn expired(&self, now_ms: u64) -> bool {
        self.expires_at_ms.is_some_and(|at| now_ms >= at)
    }

    /// The scopes as a comma-separated list.
    pub fn scope_list(&self) -> String {
        let names: Vec<&str> = self.scopes.iter().map(|s| s.as_str()).collect();
        names.join(",")
    }
}

/// Hex SHA-256 of a token's secret: what the state stores and looks tokens up by.
pub fn hash_token(secret: &str) -> String {
    let mut hex = [0; 64];
    hash_token_into(secret, &mut hex).to_string()
}

/// [`hash_token`] written into `hex` (no allocation: a check on every request uses it).
pub fn hash_token_into<'a>(secret: &str, hex: &'a mut [u8; 64]) -> &'a str {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    for (pair, byte) in hex
        .chunks_exact_mut(2)
        .zip(Sha256::digest(secret.as_bytes()))
    {
        pair[0] = DIGITS[usize::from(byte >> 4)];
        pair[1] = DIGITS[usize::from(byte & 0x0f)];
    }
    // Only ASCII digits were written.
    std::str::from_utf8(hex).unwrap_or_default()
}

/// The id of the token whose secret hashes to `hash`.
pub fn token_id(hash: &str) -> Result<TokenId, Rejection> {
    hash.get(..12)
        .and_then(|prefix| prefix.parse().ok())
        .ok_or_else(|| Rejection::InvalidToken(format!("malformed token hash {hash:?}")))
}

/// A new random secret: `wafer_` and 43 characters of URL-safe base64 (256 bits).
pub fn generate_secret() -> String {
    use base64::Engine as _;
    let bytes: [u8; 32] = rand::random();
    format!(
        "wafer_{}",
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
    )
}

/// Checks a secret given by a person (a bootstrap token): length and characters.
pub fn check_secret(secret: &str) -> Result<(), String> {
    if secret.len() < MIN_TOKEN_LEN || secret.len() > MAX_TOKEN_LEN {
        return Err(format!(
            "a token has {MIN_TOKEN_LEN} to {MAX_TOKEN_LEN} characters, this one {}",
            secret.len()
        ));
    }
    if !secret.bytes().all(|b| b.is_ascii_graphic()) {
        return Err("a token has only printable ASCII characters, no spaces".into());
    }
    Ok(())
}

/// Creates the table (so that readers find it empty rather than missing).
pub(super) fn create_tables(txn: &WriteTransaction) -> Result<(), StateError> {
    txn.open_table(TOKENS).map_err(storage)?;
    Ok(())
}

/// Every token, by id.
pub(super) fn read_all(txn: &ReadTransaction) -> Result<Vec<TokenRecord>, StateError> {
    let table = txn.open_table(TOKENS).map_err(storage)?;
    let mut out = Vec::new();
    for entry in table.iter().map_err(storage)? {
        let (key, value) = entry.map_err(storage)?;
        out.push(decode(key.value(), value.value())?);
    }
    Ok(out)
}

/// Applies a token command (any other command is answered `None`).
pub(super) fn apply(
    txn: &WriteTransaction,
    command: &Command,
) -> Result<Option<CommandResponse>, StateError> {
    let answer = match command {
        Command::CreateToken {
            name,
            scopes,
            hash,
            at_ms,
            expires_at_ms,
        } => create(txn, name, scopes, hash, *at_ms, *expires_at_ms)?,
        Command::RevokeToken { id } => {
            let mut table = txn.open_table(TOKENS).map_err(storage)?;
            let removed = table.remove(id.as_str()).map_err(storage)?.is_some();
            if removed {
                CommandResponse::TokenRevoked(id.clone())
            } else {
                CommandResponse::Rejected(Rejection::UnknownToken(id.clone()))
            }
        }
        _ => return Ok(None),
    };
    Ok(Some(answer))
}

fn create(
    txn: &WriteTransaction,
    name: &str,
    scopes: &BTreeSet<Scope>,
    hash: &str,
    at_ms: u64,
    expires_at_ms: Option<u64>,
) -> Result<CommandResponse, StateError> {
    let refuse = |why: String| Ok(CommandResponse::Rejected(Rejection::InvalidToken(why)));
    if scopes.is_empty() {
        return refuse("a token needs at least one scope".into());
    }
    if name.len() > MAX_TOKEN_NAME_LEN || name.chars().any(char::is_control) {
        return refuse(format!(
            "a token name has at most {MAX_TOKEN_NAME_LEN} bytes and no control characters"
        ));
    }
    if hash.len() != 64 || !hash.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
        return refuse("a token hash is 64 lowercase hex digits".into());
    }
    if expires_at_ms.is_some_and(|at| at <= at_ms) {
        return refuse("a token cannot expire before it is created".into());
    }
    let id = match token_id(hash) {
        Ok(id) => id,
        Err(why) => return Ok(CommandResponse::Rejected(why)),
    };
    let mut table = txn.open_table(TOKENS).map_err(storage)?;
    if table.get(id.as_str()).map_err(storage)?.is_some() {
        return refuse(format!("token {id} already exists"));
    }
    let record = TokenRecord {
        id: id.clone(),
        name: name.to_string(),
        scopes: scopes.clone(),
        hash: hash.to_string(),
        created_at_ms: at_ms,
        expires_at_ms,
    };
    let encoded = serde_json::to_vec(&record).map_err(|e| StateError::Corrupt {
        key: id.to_string(),
        message: e.to_string(),
    })?;
    table
        .insert(id.as_str(), encoded.as_slice())
        .map_err(storage)?;
    Ok(CommandResponse::TokenCreated(record))
}

/// Writes every token to `out` as snapshot rows.
pub(super) fn dump(txn: &ReadTransaction, out: &mut impl Write) -> Result<(), StateError> {
    let table = txn.open_table(TOKENS).map_err(storage)?;
    for entry in table.iter().map_err(storage)? {
        let (key, value) = entry.map_err(storage)?;
        write_row(out, TOKENS.name(), key.value().as_bytes(), value.value())?;
    }
    Ok(())
}

/// Empties the table (before a snapshot's rows are restored).
pub(super) fn clear(txn: &WriteTransaction) -> Result<(), StateError> {
    txn.delete_table(TOKENS).map_err(storage)?;
    create_tables(txn)
}

/// Restores a row [`dump`] wrote, if `table` is this module's; `false` otherwise.
pub(super) fn restore_row(
    txn: &WriteTransaction,
    table: &str,
    key: &[u8],
    value: &[u8],
) -> Result<bool, StateError> {
    if table != TOKENS.name() {
        return Ok(false);
    }
    let key = std::str::from_utf8(key)
        .map_err(|_| StateError::Snapshot(format!("malformed key row in {table}")))?;
    decode(key, value)?;
    txn.open_table(TOKENS)
        .map_err(storage)?
        .insert(key, value)
        .map_err(storage)?;
    Ok(true)
}

fn decode(key: &str, bytes: &[u8]) -> Result<TokenRecord, StateError> {
    serde_json::from_slice(bytes).map_err(|e| StateError::Corrupt {
        key: key.to_string(),
        message: e.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::super::{apply, dump, restore, State};
    use super::*;
    use redb::ReadableDatabase;

    #[test]
    fn a_token_hash_is_the_lower_case_hex_sha256_of_its_secret() {
        // Stored hashes must keep this form: tokens made before a change still work.
        let abc = "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad";
        assert_eq!(hash_token("abc"), abc);
        let mut hex = [0; 64];
        assert_eq!(hash_token_into("abc", &mut hex), abc);
        assert_eq!(hash_token(""), hex::encode(Sha256::digest(b"")));
    }

    fn run(state: &State, command: Command) -> Result<CommandResponse, StateError> {
        let txn = state.database().begin_write().map_err(storage)?;
        let answer = apply(&txn, &command)?;
        txn.commit().map_err(storage)?;
        Ok(answer)
    }

    fn create(secret: &str, scopes: &[Scope]) -> Command {
        Command::CreateToken {
            name: "test".into(),
            scopes: scopes.iter().copied().collect(),
            hash: hash_token(secret),
            at_ms: 10,
            expires_at_ms: None,
        }
    }

    #[test]
    fn tokens_are_created_once_revoked_and_carried_in_snapshots() -> Result<(), StateError> {
        let dir = tempfile::tempdir().map_err(|e| StateError::Snapshot(e.to_string()))?;
        let state = State::open(&dir.path().join("s.redb"))?;
        let secret = generate_secret();
        assert!(secret.starts_with("wafer_") && secret.len() == 49);
        let CommandResponse::TokenCreated(record) = run(&state, create(&secret, &[Scope::Read]))?
        else {
            panic!("the token is created");
        };
        assert!(record.allows(Scope::Read) && !record.allows(Scope::Deploy));
        assert_eq!(record.hash, hash_token(&secret));
        // The same secret again, no scopes, an expiry in the past: refused.
        for refused in [
            create(&secret, &[Scope::Admin]),
            create("another-secret-1234", &[]),
            Command::CreateToken {
                name: "x".into(),
                scopes: [Scope::Read].into(),
                hash: hash_token("yet-another-secret"),
                at_ms: 10,
                expires_at_ms: Some(5),
            },
        ] {
            assert!(matches!(
                run(&state, refused)?,
                CommandResponse::Rejected(Rejection::InvalidToken(_))
            ));
        }
        run(&state, create("admin-secret-12345", &[Scope::Admin]))?;

        let mut stream = Vec::new();
        dump(
            &state.database().begin_read().map_err(storage)?,
            &mut stream,
        )?;
        let copy = State::open(&dir.path().join("copy.redb"))?;
        let txn = copy.database().begin_write().map_err(storage)?;
        restore(&txn, &mut stream.as_slice())?;
        txn.commit().map_err(storage)?;
        assert_eq!(copy.list_tokens()?, state.list_tokens()?);
        assert_eq!(copy.list_tokens()?.len(), 2);

        assert_eq!(
            run(
                &state,
                Command::RevokeToken {
                    id: record.id.clone()
                }
            )?,
            CommandResponse::TokenRevoked(record.id.clone())
        );
        assert_eq!(
            run(
                &state,
                Command::RevokeToken {
                    id: record.id.clone()
                }
            )?,
            CommandResponse::Rejected(Rejection::UnknownToken(record.id))
        );
        assert_eq!(state.list_tokens()?.len(), 1);
        Ok(())
    }

    #[test]
    fn scopes_parse_and_admin_allows_everything() {
        assert_eq!("deploy".parse::<Scope>().ok(), Some(Scope::Deploy));
        assert!("root".parse::<Scope>().is_err());
        let admin = TokenRecord {
            id: TokenId::from_static("abc"),
            name: String::new(),
            scopes: [Scope::Admin].into(),
            hash: String::new(),
            created_at_ms: 0,
            expires_at_ms: Some(100),
        };
        assert!(Scope::ALL.iter().all(|s| admin.allows(*s)));
        assert!(!admin.expired(99) && admin.expired(100));
        assert!(check_secret("short").is_err());
        assert!(check_secret("has a space in the middle").is_err());
        assert!(check_secret(&generate_secret()).is_ok());
    }
}
