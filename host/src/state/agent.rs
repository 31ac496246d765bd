//! Agents as the replicated state knows them: where each one is reached, what it has
//! (capacity and attributes), and whether the leader hears from it.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::ident::ident;
use super::Resources;

ident!(
    /// An agent's id, chosen by the agent (kept in its data folder) and stable across
    /// its restarts.
    AgentId,
    "agent id"
);

/// Whether the leader hears from an agent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AgentState {
    /// Registered and heartbeating: its free resources are offered.
    Active,
    /// It missed its heartbeats: its allocations went back to the pool, and its tasks
    /// may still run. It becomes active again when it registers anew.
    Unreachable,
}

/// An agent's record.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentRecord {
    /// Its id.
    pub id: AgentId,
    /// Cap'n Proto address of its executor.
    pub rpc: String,
    /// Its capacity.
    pub resources: Resources,
    /// The sum of its allocations: never more than `resources`, except devices
    /// withdrawn while tasks held them (their backend went away) until those end.
    pub allocated: Resources,
    /// Attributes that placement constraints match (`zone`, `arch`, labels ...).
    pub attributes: BTreeMap<String, String>,
    /// Whether the leader hears from it.
    pub state: AgentState,
    /// When it first registered, ms since the Unix epoch.
    pub registered_at_ms: u64,
    /// When its state last changed, ms since the Unix epoch.
    pub changed_at_ms: u64,
}
