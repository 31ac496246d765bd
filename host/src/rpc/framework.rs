//! The `Scheduler` capability that external frameworks use (served on the leader), and
//! the registry of their `FrameworkCallback`s: capnp clients are `!Send`, so they live
//! here, on the RPC thread, and the scheduler reaches them through the `RpcHandle`.

use std::cell::RefCell;
use std::collections::HashMap;
use std::rc::Rc;
use std::sync::Arc;
use std::time::Duration;

use wafer_proto::node_capnp::{framework_callback, offer, scheduler, task_status};

use super::server::{failed, write_failure};
use crate::scheduler::{Offer, OfferId, Scheduler};
use crate::state::{write_resources, FrameworkId, FunctionName, JobId};

thread_local! {
    /// Subscribed frameworks' callbacks (on the RPC thread only).
    static CALLBACKS: RefCell<HashMap<FrameworkId, framework_callback::Client>> =
        RefCell::new(HashMap::new());
}

/// The callback of `framework`, if it is subscribed here (call on the RPC thread).
pub fn callback(framework: &FrameworkId) -> Option<framework_callback::Client> {
    CALLBACKS.with(|c| c.borrow().get(framework).cloned())
}

/// Forgets the callback of `framework` (call on the RPC thread).
pub fn forget_callback(framework: &FrameworkId) {
    CALLBACKS.with(|c| c.borrow_mut().remove(framework));
}

/// Forgets every callback (this node stopped leading; call on the RPC thread).
pub fn forget_callbacks() {
    CALLBACKS.with(|c| c.borrow_mut().clear());
}

/// A task's state as a framework is told.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TaskStatusInfo {
    /// The task (job) id.
    pub job: JobId,
    /// Its attempt.
    pub attempt: u32,
    /// Its state (`RUNNING`, `FINISHED` ...).
    pub state: String,
    /// Why, when it failed or was lost.
    pub reason: String,
    /// Where it ran.
    pub agent: String,
    /// With `FINISHED`: its output's digest.
    pub output: String,
}

/// Writes a `TaskStatus`.
pub fn write_status(mut b: task_status::Builder<'_>, s: &TaskStatusInfo) {
    b.set_job(s.job.0);
    b.set_attempt(s.attempt);
    b.set_state(s.state.as_str());
    b.set_reason(s.reason.as_str());
    b.set_agent(s.agent.as_str());
    b.set_output(s.output.as_str());
}

/// Writes an `Offer`.
pub fn write_offer(mut b: offer::Builder<'_>, o: &Offer) {
    b.set_id(o.id.0);
    b.set_agent(o.agent.as_str());
    write_resources(b.reborrow().init_resources(), &o.resources);
    let mut list = b.init_attributes(o.attributes.len() as u32);
    for (i, (key, value)) in o.attributes.iter().enumerate() {
        let mut label = list.reborrow().get(i as u32);
        label.set_key(key.as_str());
        label.set_value(value.as_str());
    }
}

/// The `Scheduler` capability.
pub struct SchedulerService {
    scheduler: Arc<Scheduler>,
}

impl SchedulerService {
    /// Serves `scheduler`.
    pub fn new(scheduler: Arc<Scheduler>) -> SchedulerService {
        SchedulerService { scheduler }
    }
}

fn framework_id(text: capnp::text::Reader<'_>) -> Result<FrameworkId, capnp::Error> {
    text.to_str()?.parse().map_err(failed)
}

impl scheduler::Server for SchedulerService {
    async fn subscribe(
        self: Rc<Self>,
        params: scheduler::SubscribeParams,
        mut results: scheduler::SubscribeResults,
    ) -> Result<(), capnp::Error> {
        let params = params.get()?;
        let id = framework_id(params.get_id()?)?;
        let name = params.get_name()?.to_str()?.to_string();
        let role = params.get_role()?.to_str()?.parse().map_err(failed)?;
        let callback = params.get_callback()?;
        match self.scheduler.subscribe(id.clone(), name, role).await {
            Ok(()) => {
                CALLBACKS.with(|c| c.borrow_mut().insert(id, callback));
            }
            Err(e) => write_failure(results.get().init_failure(), &e),
        }
        Ok(())
    }

    async fn subscribed(
        self: Rc<Self>,
        params: scheduler::SubscribedParams,
        mut results: scheduler::SubscribedResults,
    ) -> Result<(), capnp::Error> {
        let id = framework_id(params.get()?.get_framework()?)?;
        match self.scheduler.is_subscribed(&id) {
            Ok(yes) => results.get().set_yes(yes && callback(&id).is_some()),
            Err(e) => write_failure(results.get().init_failure(), &e),
        }
        Ok(())
    }

    async fn accept(
        self: Rc<Self>,
        params: scheduler::AcceptParams,
        mut results: scheduler::AcceptResults,
    ) -> Result<(), capnp::Error> {
        let params = params.get()?;
        let id = framework_id(params.get_framework()?)?;
        let offer = OfferId(params.get_offer());
        let mut tasks = Vec::new();
        for task in params.get_tasks()? {
            let function: FunctionName = task.get_function()?.to_str()?.parse().map_err(failed)?;
            tasks.push((function, bytes::Bytes::copy_from_slice(task.get_input()?)));
        }
        match self.scheduler.accept(id, offer, tasks).await {
            Ok(jobs) => {
                let mut list = results.get().init_jobs(jobs.len() as u32);
                for (i, job) in jobs.iter().enumerate() {
                    list.set(i as u32, job.0);
                }
            }
            Err(e) => write_failure(results.get().init_failure(), &e),
        }
        Ok(())
    }

    async fn decline(
        self: Rc<Self>,
        params: scheduler::DeclineParams,
        mut results: scheduler::DeclineResults,
    ) -> Result<(), capnp::Error> {
        let params = params.get()?;
        let id = framework_id(params.get_framework()?)?;
        // Out of range (negative, NaN, huge): no filter, or at most an hour.
        let refuse = Duration::try_from_secs_f64(params.get_refuse_seconds())
            .unwrap_or(Duration::ZERO)
            .min(Duration::from_secs(3600));
        if let Err(e) = self
            .scheduler
            .decline(&id, OfferId(params.get_offer()), refuse)
        {
            write_failure(results.get().init_failure(), &e);
        }
        Ok(())
    }

    async fn want_offers(
        self: Rc<Self>,
        params: scheduler::WantOffersParams,
        mut results: scheduler::WantOffersResults,
    ) -> Result<(), capnp::Error> {
        let params = params.get()?;
        let id = framework_id(params.get_framework()?)?;
        if let Err(e) = self.scheduler.want_offers(&id, params.get_want()) {
            write_failure(results.get().init_failure(), &e);
        }
        Ok(())
    }

    async fn kill(
        self: Rc<Self>,
        params: scheduler::KillParams,
        mut results: scheduler::KillResults,
    ) -> Result<(), capnp::Error> {
        let params = params.get()?;
        let id = framework_id(params.get_framework()?)?;
        if let Err(e) = self.scheduler.kill_task(&id, JobId(params.get_job())).await {
            write_failure(results.get().init_failure(), &e);
        }
        Ok(())
    }
}
