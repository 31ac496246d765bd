//! Function names, deploy specifications and the records kept for deployed functions.

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::digest::Digest;
use crate::runtime::Limits;

/// Longest function name.
pub const MAX_NAME_LEN: usize = 63;

/// A function's name: 1-63 characters of `a-z`, `0-9`, `-` and `_`, starting with a
/// letter or digit (safe in URLs, file names and metric labels).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct FunctionName(String);

/// A string that is not a valid [`FunctionName`].
#[derive(Debug, thiserror::Error)]
#[error(
    "invalid function name {0:?}: use 1-63 characters of a-z, 0-9, '-' and '_', \
     starting with a letter or digit"
)]
pub struct InvalidName(pub String);

impl FunctionName {
    /// The name as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl FromStr for FunctionName {
    type Err = InvalidName;

    fn from_str(s: &str) -> Result<FunctionName, InvalidName> {
        let valid = !s.is_empty()
            && s.len() <= MAX_NAME_LEN
            && s.bytes()
                .next()
                .is_some_and(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
            && s.bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_');
        if valid {
            Ok(FunctionName(s.to_string()))
        } else {
            Err(InvalidName(s.to_string()))
        }
    }
}

impl fmt::Display for FunctionName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl Serialize for FunctionName {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.0)
    }
}

impl<'de> Deserialize<'de> for FunctionName {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<FunctionName, D::Error> {
        String::deserialize(d)?
            .parse()
            .map_err(serde::de::Error::custom)
    }
}

/// What a deployer asks for besides the module: limits and environment. Also the JSON
/// manifest format (`wafer.json`): every field is optional.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct FunctionSpec {
    /// Resource limits.
    #[serde(flatten)]
    pub limits: Limits,
    /// Environment variables given to every invocation.
    pub env: BTreeMap<String, String>,
}

/// A deployed function as stored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FunctionRecord {
    /// Name.
    pub name: FunctionName,
    /// Deploy counter, 1 for the first deploy under this name.
    pub version: u64,
    /// Digest of the module.
    pub digest: Digest,
    /// Module size, bytes.
    pub size: u64,
    /// Limits and environment.
    #[serde(flatten)]
    pub spec: FunctionSpec,
    /// When this version was deployed, ms since the Unix epoch.
    pub deployed_at_ms: u64,
    /// Labels: free-form metadata set with `wafer label`.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    /// The earlier version whose module and spec a rollback made current again.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub restored_from: Option<u64>,
}

/// Longest label key.
pub const MAX_LABEL_KEY: usize = 63;
/// Longest label value.
pub const MAX_LABEL_VALUE: usize = 255;
/// Most labels on one function.
pub const MAX_LABELS: usize = 64;

/// Checks a label key: 1-63 characters of `a-z`, `0-9`, `-`, `_`, `.` and `/`.
pub fn check_label_key(key: &str) -> Result<(), String> {
    let valid = !key.is_empty()
        && key.len() <= MAX_LABEL_KEY
        && key
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"-_./".contains(&b));
    if valid {
        Ok(())
    } else {
        Err(format!(
            "invalid label key {key:?}: use 1-{MAX_LABEL_KEY} characters of a-z, 0-9, '-', '_', '.' and '/'"
        ))
    }
}

/// Checks a label value: at most 255 bytes, no control characters.
pub fn check_label_value(key: &str, value: &str) -> Result<(), String> {
    if value.len() > MAX_LABEL_VALUE || value.chars().any(char::is_control) {
        return Err(format!(
            "invalid value for label {key:?}: at most {MAX_LABEL_VALUE} bytes without control characters"
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        for ok in ["hello", "a", "hello-c", "x_1", "9lives"] {
            assert!(ok.parse::<FunctionName>().is_ok(), "{ok}");
        }
        let long = "a".repeat(64);
        for bad in ["", "Hello", "-x", "a/b", "a b", "é", long.as_str()] {
            assert!(bad.parse::<FunctionName>().is_err(), "{bad}");
        }
    }

    #[test]
    fn manifest_fields_are_optional_and_checked() {
        let spec: FunctionSpec = serde_json::from_str(r#"{"memory_mb": 32, "env": {"A": "1"}}"#)
            .expect("valid manifest");
        assert_eq!(spec.limits.memory_mb, 32);
        assert_eq!(spec.limits.timeout_ms, Limits::default().timeout_ms);
        assert_eq!(spec.env.get("A").map(String::as_str), Some("1"));
        assert!(serde_json::from_str::<FunctionSpec>(r#"{"memroy_mb": 32}"#).is_err());
    }
}
