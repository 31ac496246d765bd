//! Frameworks, the roles they belong to (weights and quotas for dominant resource
//! fairness) and the allocations they hold: an allocation is an accepted offer, a share
//! of one agent's resources.

use std::fmt;

use serde::{Deserialize, Serialize};

use super::ident::ident;
use super::{AgentId, Resources};

ident!(
    /// A framework's id.
    FrameworkId,
    "framework id"
);

ident!(
    /// A role: frameworks in one role share its weight and quota.
    RoleName,
    "role"
);

/// Largest weight of a role.
pub const MAX_WEIGHT: f64 = 1_000_000.0;

/// A registered framework.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FrameworkRecord {
    /// Its id.
    pub id: FrameworkId,
    /// A name for people.
    pub name: String,
    /// The role whose share it draws on.
    pub role: RoleName,
    /// When it registered, ms since the Unix epoch.
    pub registered_at_ms: u64,
}

/// A role's settings. A role nobody configured has weight 1 and no quota.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RoleRecord {
    /// The role.
    pub name: RoleName,
    /// Its weight: a role of weight 2 gets twice the dominant share of a role of weight
    /// 1 when both want more than is free.
    pub weight: f64,
    /// The most the role's frameworks may hold together (none: no limit).
    pub quota: Option<Resources>,
}

impl RoleRecord {
    /// The settings of a role nobody configured.
    pub fn default_for(name: RoleName) -> RoleRecord {
        RoleRecord {
            name,
            weight: 1.0,
            quota: None,
        }
    }
}

/// An allocation's id: assigned in log order by the state machine.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct AllocationId(pub u64);

impl fmt::Display for AllocationId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// Resources of one agent held by one framework (an accepted offer).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Allocation {
    /// Its id.
    pub id: AllocationId,
    /// The framework holding it.
    pub framework: FrameworkId,
    /// The framework's role when it was accepted.
    pub role: RoleName,
    /// The agent whose resources these are.
    pub agent: AgentId,
    /// How much.
    pub resources: Resources,
    /// When it was accepted, ms since the Unix epoch.
    pub allocated_at_ms: u64,
    /// The job attempt it runs, if it was placed for one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub task: Option<super::TaskRef>,
}
