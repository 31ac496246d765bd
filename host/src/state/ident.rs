//! Validated identifiers of the scheduling state (agents, frameworks, roles): the same
//! rule as function names, so that every id is safe in URLs, file names and metric
//! labels.

/// Defines `$name`, a string id of 1-63 characters of `a-z`, `0-9`, `-` and `_`,
/// starting with a letter or digit, with `FromStr`, `Display` and serde as a string.
macro_rules! ident {
    ($(#[$doc:meta])* $name:ident, $what:literal) => {
        $(#[$doc])*
        #[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub struct $name(String);

        impl $name {
            /// The id as text.
            pub fn as_str(&self) -> &str {
                &self.0
            }

            /// An id written in the code (it must be valid).
            pub fn from_static(s: &'static str) -> $name {
                debug_assert!($crate::state::ident::valid(s), "invalid id {s:?}");
                $name(s.to_string())
            }
        }

        impl std::str::FromStr for $name {
            type Err = $crate::state::InvalidId;

            fn from_str(s: &str) -> Result<$name, $crate::state::InvalidId> {
                if $crate::state::ident::valid(s) {
                    Ok($name(s.to_string()))
                } else {
                    Err($crate::state::InvalidId {
                        what: $what,
                        value: s.to_string(),
                    })
                }
            }
        }

        impl std::fmt::Display for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl serde::Serialize for $name {
            fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.serialize_str(&self.0)
            }
        }

        impl<'de> serde::Deserialize<'de> for $name {
            fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<$name, D::Error> {
                <String as serde::Deserialize>::deserialize(d)?
                    .parse()
                    .map_err(serde::de::Error::custom)
            }
        }
    };
}

pub(crate) use ident;

/// Whether `s` is a valid id: 1-63 characters of `a-z`, `0-9`, `-` and `_`, starting
/// with a letter or digit.
pub fn valid(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes()
            .next()
            .is_some_and(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_')
}

/// A string that is not a valid id.
#[derive(Debug, Clone, thiserror::Error)]
#[error(
    "invalid {what} {value:?}: use 1-63 characters of a-z, 0-9, '-' and '_', starting with a \
     letter or digit"
)]
pub struct InvalidId {
    /// What the id names ("agent id", ...).
    pub what: &'static str,
    /// The text given.
    pub value: String,
}

/// Parses `s` in tests, where a bad literal is a bug in the test.
#[cfg(test)]
pub(crate) fn test_id<T: std::str::FromStr>(s: &str) -> T
where
    T::Err: std::fmt::Debug,
{
    match s.parse() {
        Ok(v) => v,
        Err(e) => panic!("{s}: {e:?}"),
    }
}
