//! Placement constraints on agent attributes (`zone=b`, `arch!=arm64`): a framework
//! uses only offers from agents whose attributes match all of a task's constraints.

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// How a constraint compares an attribute.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    /// The attribute is present and equal to the value.
    Equals,
    /// The attribute is absent or different from the value.
    NotEquals,
}

/// One placement constraint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Constraint {
    /// The attribute.
    pub key: String,
    /// The comparison.
    pub op: Op,
    /// The value compared with.
    pub value: String,
}

/// Text that is not a constraint.
#[derive(Debug, Clone, thiserror::Error)]
#[error("invalid constraint {0:?}: write KEY=VALUE or KEY!=VALUE")]
pub struct InvalidConstraint(pub String);

impl Constraint {
    /// Whether an agent with `attributes` satisfies the constraint.
    pub fn matches(&self, attributes: &BTreeMap<String, String>) -> bool {
        let value = attributes.get(&self.key);
        match self.op {
            Op::Equals => value == Some(&self.value),
            Op::NotEquals => value != Some(&self.value),
        }
    }

    /// Whether an agent with `attributes` satisfies all of `constraints`.
    pub fn all_match(constraints: &[Constraint], attributes: &BTreeMap<String, String>) -> bool {
        constraints.iter().all(|c| c.matches(attributes))
    }
}

impl FromStr for Constraint {
    type Err = InvalidConstraint;

    fn from_str(s: &str) -> Result<Constraint, InvalidConstraint> {
        let (key, op, value) = if let Some((k, v)) = s.split_once("!=") {
            (k, Op::NotEquals, v)
        } else if let Some((k, v)) = s.split_once('=') {
            (k, Op::Equals, v)
        } else {
            return Err(InvalidConstraint(s.to_string()));
        };
        let key = key.trim();
        if key.is_empty() || value.contains('=') {
            return Err(InvalidConstraint(s.to_string()));
        }
        Ok(Constraint {
            key: key.to_string(),
            op,
            value: value.trim().to_string(),
        })
    }
}

impl fmt::Display for Constraint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let op = match self.op {
            Op::Equals => "=",
            Op::NotEquals => "!=",
        };
        write!(f, "{}{op}{}", self.key, self.value)
    }
}

impl Serialize for Constraint {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Constraint {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Constraint, D::Error> {
        String::deserialize(d)?
            .parse()
            .map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn constraints_parse_and_match() -> Result<(), InvalidConstraint> {
        let attributes = BTreeMap::from([("zone".to_string(), "b".to_string())]);
        let zone_b: Constraint = "zone=b".parse()?;
        assert!(zone_b.matches(&attributes));
        assert!(!"zone=a".parse::<Constraint>()?.matches(&attributes));
        assert!("zone!=a".parse::<Constraint>()?.matches(&attributes));
        assert!(!"arch=arm64".parse::<Constraint>()?.matches(&attributes));
        assert!("arch!=arm64".parse::<Constraint>()?.matches(&attributes));
        assert_eq!(zone_b.to_string(), "zone=b");
        assert!("zone".parse::<Constraint>().is_err());
        assert!("=b".parse::<Constraint>().is_err());
        Ok(())
    }
}
