//! Two-level scheduling, Mesos style: the leader's allocator offers agents' free
//! resources to frameworks by dominant resource fairness; a framework accepts an offer
//! with a command that the replicated state validates (so nothing is allocated twice),
//! or declines it.

pub mod allocator;
pub mod driver;
pub mod jobs;
pub mod leader;
pub mod metrics;
pub mod serverless;
pub mod simulation;

pub use crate::state::{Constraint, InvalidConstraint};
pub use allocator::{Allocator, AllocatorConfig, Offer, OfferError, OfferId, Share};
pub use jobs::LaunchSpec;
pub use leader::{now_ms, AgentView, Scheduler, SchedulerConfig, Wakeups};
pub use metrics::SchedulerMetrics;
