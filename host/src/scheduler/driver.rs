//! A client for external frameworks (Mesos's "scheduler driver"): subscribes a
//! framework with the leader over Cap'n Proto (`Node.scheduler`), follows the leader
//! (subscribing again after a leader change), delivers offers, rescinds and task
//! updates as events on a channel, and sends accepts, declines and kills.

use std::collections::BTreeMap;
use std::rc::Rc;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use wafer_proto::node_capnp::{framework_callback, scheduler};

use crate::cluster::ClusterError;
use crate::rpc::{read_failure, RpcError, RpcHandle};
use crate::state::{read_resources, Resources};

/// `Ok(Ok(value))`, or `Ok(Err(the call's failure))` when its results carry one.
macro_rules! answer {
    ($r:expr, $value:expr) => {
        Ok(if $r.has_failure() {
            Err(read_failure($r.get_failure()?)?)
        } else {
            Ok($value)
        })
    };
}

/// How often the driver checks that it is still subscribed with the leader.
const CHECK_EVERY: Duration = Duration::from_millis(500);

/// An offer as a framework sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OfferInfo {
    /// Its id (answer with it).
    pub id: u64,
    /// The agent.
    pub agent: String,
    /// What is offered.
    pub resources: Resources,
    /// The agent's attributes.
    pub attributes: BTreeMap<String, String>,
}

/// A task's state as a framework is told.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TaskStatus {
    /// The task (job) id.
    pub job: u64,
    /// Its attempt.
    pub attempt: u32,
    /// `STARTING`, `RUNNING`, `FINISHED`, `FAILED`, `KILLED`, `UNREACHABLE`, `GONE`.
    pub state: String,
    /// Why, if it failed or was lost.
    pub reason: String,
    /// Where it ran.
    pub agent: String,
    /// With `FINISHED`: the digest of its output.
    pub output: String,
}

/// What the cluster tells a framework.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FrameworkEvent {
    /// New offers.
    Offers(Vec<OfferInfo>),
    /// Offers withdrawn.
    Rescinded(Vec<u64>),
    /// A task changed state.
    Status(TaskStatus),
    /// Subscribed (again) with a leader.
    Subscribed,
}

/// A subscribed framework.
pub struct Driver {
    rpc: RpcHandle,
    servers: Vec<String>,
    id: String,
    name: String,
    role: String,
    /// The server that answered last (the leader, normally).
    leader: Mutex<String>,
    events: tokio::sync::mpsc::UnboundedSender<FrameworkEvent>,
}

/// The framework's callback, on the driver's RPC thread.
struct Callback {
    events: tokio::sync::mpsc::UnboundedSender<FrameworkEvent>,
}

impl framework_callback::Server for Callback {
    async fn offers(
        self: Rc<Self>,
        params: framework_callback::OffersParams,
        _: framework_callback::OffersResults,
    ) -> Result<(), capnp::Error> {
        let mut offers = Vec::new();
        for offer in params.get()?.get_offers()? {
            let mut attributes = BTreeMap::new();
            for label in offer.get_attributes()? {
                attributes.insert(
                    label.get_key()?.to_str()?.to_string(),
                    label.get_value()?.to_str()?.to_string(),
                );
            }
            offers.push(OfferInfo {
                id: offer.get_id(),
                agent: offer.get_agent()?.to_str()?.to_string(),
                resources: read_resources(offer.get_resources()?),
                attributes,
            });
        }
        let _ = self.events.send(FrameworkEvent::Offers(offers));
        Ok(())
    }

    async fn rescind(
        self: Rc<Self>,
        params: framework_callback::RescindParams,
        _: framework_callback::RescindResults,
    ) -> Result<(), capnp::Error> {
        let ids = params.get()?.get_offers()?.iter().collect();
        let _ = self.events.send(FrameworkEvent::Rescinded(ids));
        Ok(())
    }

    async fn status(
        self: Rc<Self>,
        params: framework_callback::StatusParams,
        _: framework_callback::StatusResults,
    ) -> Result<(), capnp::Error> {
        let s = params.get()?.get_status()?;
        let _ = self.events.send(FrameworkEvent::Status(TaskStatus {
            job: s.get_job(),
            attempt: s.get_attempt(),
            state: s.get_state()?.to_str()?.to_string(),
            reason: s.get_reason()?.to_str()?.to_string(),
            agent: s.get_agent()?.to_str()?.to_string(),
            output: s.get_output()?.to_str()?.to_string(),
        }));
        Ok(())
    }
}

impl Driver {
    /// Subscribes framework `id` (`name`, in `role`) through any of `servers` (their
    /// `--listen` addresses, reached with the cluster `secret`) and keeps it subscribed;
    /// events arrive on the receiver.
    pub async fn start(
        servers: Vec<String>,
        secret: crate::rpc::ClusterSecret,
        id: &str,
        name: &str,
        role: &str,
    ) -> Result<
        (
            Arc<Driver>,
            tokio::sync::mpsc::UnboundedReceiver<FrameworkEvent>,
        ),
        ClusterError,
    > {
        if servers.is_empty() {
            return Err(ClusterError::Rejected("no server addresses".into()));
        }
        let rpc = RpcHandle::start(secret).map_err(|e| ClusterError::Unavailable(e.to_string()))?;
        let (events, receiver) = tokio::sync::mpsc::unbounded_channel();
        let driver = Arc::new(Driver {
            rpc,
            leader: Mutex::new(servers[0].clone()),
            servers,
            id: id.to_string(),
            name: name.to_string(),
            role: role.to_string(),
            events,
        });
        driver.subscribe().await?;
        let weak = Arc::downgrade(&driver);
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(CHECK_EVERY).await;
                let Some(driver) = weak.upgrade() else {
                    return;
                };
                let subscribed = driver
                    .call(|s, framework| async move {
                        let mut request = s.subscribed_request();
                        request.get().set_framework(framework.as_str());
                        let reply = request.send().promise.await?;
                        let r = reply.get()?;
                        answer!(r, r.get_yes())
                    })
                    .await;
                if !matches!(subscribed, Ok(true)) {
                    if let Err(e) = driver.subscribe().await {
                        tracing::warn!(framework = driver.id, error = %e, "subscribing again");
                    }
                }
            }
        });
        Ok((driver, receiver))
    }

    fn leader(&self) -> String {
        self.leader
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    fn set_leader(&self, addr: String) {
        *self.leader.lock().unwrap_or_else(|p| p.into_inner()) = addr;
    }

    /// Runs `f` with the leader's `Scheduler` capability and this framework's id;
    /// follows `notLeader` answers and tries other servers while none answers.
    async fn call<T, F, Fut>(&self, f: F) -> Result<T, ClusterError>
    where
        T: Send + 'static,
        F: Fn(scheduler::Client, String) -> Fut + Send + Sync + Clone + 'static,
        Fut: std::future::Future<Output = Result<Result<T, ClusterError>, capnp::Error>> + 'static,
    {
        let mut last = ClusterError::Unavailable("no server answered".into());
        for attempt in 0..self.servers.len() * 4 {
            let addr = if attempt == 0 {
                self.leader()
            } else {
                match &last {
                    ClusterError::NotLeader {
                        leader: Some((_, leader)),
                    } => leader.rpc.clone(),
                    _ => self.servers[attempt % self.servers.len()].clone(),
                }
            };
            let (target, f, id) = (addr.clone(), f.clone(), self.id.clone());
            let result = self
                .rpc
                .run(move |peers| async move {
                    let (node, _) = peers.get(&target).await?;
                    let s = node.scheduler_request().send().pipeline.get_scheduler();
                    f(s, id).await.map_err(|e| {
                        peers.forget(&target);
                        RpcError::from_capnp(&target, e)
                    })
                })
                .await
                .map_err(ClusterError::from)
                .and_then(|r| r.map_err(ClusterError::from))
                .and_then(|r| r);
            match result {
                Ok(answer) => {
                    self.set_leader(addr);
                    return Ok(answer);
                }
                Err(ClusterError::Rejected(why)) => return Err(ClusterError::Rejected(why)),
                Err(e) => {
                    if !matches!(e, ClusterError::NotLeader { leader: Some(_) }) {
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                    last = e;
                }
            }
        }
        Err(last)
    }

    /// Subscribes with the leader (again).
    async fn subscribe(&self) -> Result<(), ClusterError> {
        let (name, role, events) = (self.name.clone(), self.role.clone(), self.events.clone());
        self.call(move |s, id| {
            let (name, role, events) = (name.clone(), role.clone(), events.clone());
            async move {
                let mut request = s.subscribe_request();
                request.get().set_id(id.as_str());
                request.get().set_name(name.as_str());
                request.get().set_role(role.as_str());
                let callback: framework_callback::Client =
                    capnp_rpc::new_client(Callback { events });
                request.get().set_callback(callback);
                let reply = request.send().promise.await?;
                let r = reply.get()?;
                answer!(r, ())
            }
        })
        .await?;
        let _ = self.events.send(FrameworkEvent::Subscribed);
        Ok(())
    }

    /// Accepts offer `offer` with `tasks` (function, input); answers the task ids.
    pub async fn accept(
        &self,
        offer: u64,
        tasks: Vec<(String, Vec<u8>)>,
    ) -> Result<Vec<u64>, ClusterError> {
        self.call(move |s, id| {
            let tasks = tasks.clone();
            async move {
                let mut request = s.accept_request();
                request.get().set_framework(id.as_str());
                request.get().set_offer(offer);
                let mut list = request.get().init_tasks(tasks.len() as u32);
                for (i, (function, input)) in tasks.iter().enumerate() {
                    let mut task = list.reborrow().get(i as u32);
                    task.set_function(function.as_str());
                    task.set_input(input);
                }
                let reply = request.send().promise.await?;
                let r = reply.get()?;
                answer!(r, r.get_jobs()?.iter().collect())
            }
        })
        .await
    }

    /// Declines offer `offer`; its agent is not offered again for `refuse_for`.
    pub async fn decline(&self, offer: u64, refuse_for: Duration) -> Result<(), ClusterError> {
        self.call(move |s, id| async move {
            let mut request = s.decline_request();
            request.get().set_framework(id.as_str());
            request.get().set_offer(offer);
            request.get().set_refuse_seconds(refuse_for.as_secs_f64());
            let reply = request.send().promise.await?;
            let r = reply.get()?;
            answer!(r, ())
        })
        .await
    }

    /// Stops (false) or resumes (true) offers.
    pub async fn want_offers(&self, want: bool) -> Result<(), ClusterError> {
        self.call(move |s, id| async move {
            let mut request = s.want_offers_request();
            request.get().set_framework(id.as_str());
            request.get().set_want(want);
            let reply = request.send().promise.await?;
            let r = reply.get()?;
            answer!(r, ())
        })
        .await
    }

    /// Kills task `job` of this framework.
    pub async fn kill(&self, job: u64) -> Result<(), ClusterError> {
        self.call(move |s, id| async move {
            let mut request = s.kill_request();
            request.get().set_framework(id.as_str());
            request.get().set_job(job);
            let reply = request.send().promise.await?;
            let r = reply.get()?;
            answer!(r, ())
        })
        .await
    }
}
