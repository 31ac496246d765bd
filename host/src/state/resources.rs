//! Resources that agents offer and frameworks hold: invocation slots, memory and
//! accelerator devices, as whole numbers (so that every replica computes the same sums).

use std::fmt;

use serde::{Deserialize, Serialize};

/// An amount of each kind of resource.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Resources {
    /// Concurrent WebAssembly instances (one invocation or job task each).
    pub slots: u64,
    /// Guest memory, MiB.
    pub memory_mb: u64,
    /// Accelerator devices.
    pub accelerators: u64,
}

impl Resources {
    /// No resources.
    pub const ZERO: Resources = Resources {
        slots: 0,
        memory_mb: 0,
        accelerators: 0,
    };

    /// `slots` slots and `memory_mb` MiB, no accelerators.
    pub const fn new(slots: u64, memory_mb: u64) -> Resources {
        Resources {
            slots,
            memory_mb,
            accelerators: 0,
        }
    }

    /// Whether every amount is zero.
    pub fn is_zero(&self) -> bool {
        *self == Resources::ZERO
    }

    /// Whether `self` fits in `within` (no amount is larger).
    pub fn fits_in(&self, within: &Resources) -> bool {
        self.slots <= within.slots
            && self.memory_mb <= within.memory_mb
            && self.accelerators <= within.accelerators
    }

    /// The sum, saturating at `u64::MAX`.
    pub fn plus(&self, other: &Resources) -> Resources {
        Resources {
            slots: self.slots.saturating_add(other.slots),
            memory_mb: self.memory_mb.saturating_add(other.memory_mb),
            accelerators: self.accelerators.saturating_add(other.accelerators),
        }
    }

    /// The difference, each amount floored at zero.
    pub fn minus(&self, other: &Resources) -> Resources {
        Resources {
            slots: self.slots.saturating_sub(other.slots),
            memory_mb: self.memory_mb.saturating_sub(other.memory_mb),
            accelerators: self.accelerators.saturating_sub(other.accelerators),
        }
    }

    /// The smaller of each amount.
    pub fn min(&self, other: &Resources) -> Resources {
        Resources {
            slots: self.slots.min(other.slots),
            memory_mb: self.memory_mb.min(other.memory_mb),
            accelerators: self.accelerators.min(other.accelerators),
        }
    }

    /// How many copies of `each` fit in `self` (`u64::MAX` when `each` is zero).
    pub fn count_of(&self, each: &Resources) -> u64 {
        let per = |have: u64, need: u64| have.checked_div(need).unwrap_or(u64::MAX);
        per(self.slots, each.slots)
            .min(per(self.memory_mb, each.memory_mb))
            .min(per(self.accelerators, each.accelerators))
    }

    /// `each` times `n`, saturating.
    pub fn times(&self, n: u64) -> Resources {
        Resources {
            slots: self.slots.saturating_mul(n),
            memory_mb: self.memory_mb.saturating_mul(n),
            accelerators: self.accelerators.saturating_mul(n),
        }
    }

    /// The dominant share of `self` in `total`: the largest fraction of any resource
    /// kind (kinds the cluster has none of are ignored). Used for dominant resource
    /// fairness.
    pub fn dominant_share(&self, total: &Resources) -> f64 {
        let share = |have: u64, all: u64| {
            if all == 0 {
                0.0
            } else {
                have as f64 / all as f64
            }
        };
        share(self.slots, total.slots)
            .max(share(self.memory_mb, total.memory_mb))
            .max(share(self.accelerators, total.accelerators))
    }
}

impl fmt::Display for Resources {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} slots, {} MiB", self.slots, self.memory_mb)?;
        if self.accelerators > 0 {
            write!(f, ", {} accelerators", self.accelerators)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn arithmetic_and_shares() {
        let agent = Resources::new(8, 4096);
        let task = Resources::new(1, 256);
        assert!(task.fits_in(&agent));
        assert!(!agent.fits_in(&task));
        assert_eq!(agent.count_of(&task), 8);
        assert_eq!(Resources::new(8, 512).count_of(&task), 2);
        assert_eq!(agent.minus(&task.times(3)), Resources::new(5, 4096 - 768));
        assert_eq!(task.minus(&agent), Resources::ZERO);
        let total = Resources::new(100, 1000);
        assert!((Resources::new(10, 300).dominant_share(&total) - 0.3).abs() < 1e-9);
        // No accelerators in the cluster: that kind does not count.
        let gpu_task = Resources {
            accelerators: 1,
            ..Resources::ZERO
        };
        assert_eq!(gpu_task.dominant_share(&total), 0.0);
        // With devices in the cluster, a device is usually the dominant share.
        let with_devices = Resources {
            accelerators: 4,
            ..total
        };
        let job = Resources {
            accelerators: 1,
            ..Resources::new(1, 100)
        };
        assert!((job.dominant_share(&with_devices) - 0.25).abs() < 1e-9);
        assert_eq!(with_devices.count_of(&job), 4);
    }
}
