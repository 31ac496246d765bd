//! The console's shell: the session (token in session storage), navigation between the
//! pages (kept in the URL's fragment), the data the pages show, refreshed from the REST
//! API when the event stream says it changed, and the stream itself.

use std::rc::Rc;
use std::time::Duration;

use leptos::prelude::*;
use leptos::task::spawn_local;
use serde::de::DeserializeOwned;

use crate::api::{self, ApiError, StreamEvent};
use crate::model::*;
use crate::pages;

/// Where the token is kept for the browser tab's session.
const TOKEN_KEY: &str = "wafer-token";
/// Invocation-rate samples kept (one per `stats` event, every 2 s: ten minutes).
const MAX_SAMPLES: usize = 300;

/// The console's pages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Page {
    Overview,
    Functions,
    Jobs,
    Scheduling,
    Nodes,
}

impl Page {
    pub const ALL: [Page; 5] = [
        Page::Overview,
        Page::Functions,
        Page::Jobs,
        Page::Scheduling,
        Page::Nodes,
    ];

    pub fn title(self) -> &'static str {
        match self {
            Page::Overview => "Overview",
            Page::Functions => "Functions",
            Page::Jobs => "Jobs",
            Page::Scheduling => "Scheduling",
            Page::Nodes => "Nodes & Raft",
        }
    }

    fn slug(self) -> &'static str {
        match self {
            Page::Overview => "overview",
            Page::Functions => "functions",
            Page::Jobs => "jobs",
            Page::Scheduling => "scheduling",
            Page::Nodes => "nodes",
        }
    }

    fn from_hash(hash: &str) -> Page {
        let slug = hash.trim_start_matches('#').trim_start_matches('/');
        Page::ALL
            .into_iter()
            .find(|p| p.slug() == slug)
            .unwrap_or(Page::Overview)
    }
}

/// A sample of this node's invocation totals.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Sample {
    pub at_ms: f64,
    pub invocations: u64,
    pub errors: u64,
}

/// Which data a change touched.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Dirty(u8);

impl Dirty {
    const CLUSTER: u8 = 1;
    const NODES: u8 = 2;
    const FUNCTIONS: u8 = 4;
    const JOBS: u8 = 8;
    const SCHEDULING: u8 = 16;
    const ALL: u8 = 31;
}

/// Everything the pages share; `Copy` (signals are handles).
#[derive(Clone, Copy)]
pub struct Ctx {
    pub token: RwSignal<String>,
    pub me: RwSignal<Option<Me>>,
    pub page: RwSignal<Page>,
    pub cluster: RwSignal<Option<Cluster>>,
    pub agents: RwSignal<Vec<Agent>>,
    pub functions: RwSignal<Vec<Function>>,
    pub jobs: RwSignal<Vec<Job>>,
    pub frameworks: RwSignal<Vec<Framework>>,
    pub offers: RwSignal<Vec<Offer>>,
    pub leases: RwSignal<Vec<Lease>>,
    pub roles: RwSignal<Vec<Role>>,
    pub samples: RwSignal<Vec<Sample>>,
    /// Whether the event stream is connected.
    pub live: RwSignal<bool>,
    /// The last failure to load something, shown in a banner.
    pub problem: RwSignal<Option<String>>,
    /// The clock, ms since the epoch, ticking every second (for "ago" columns).
    pub now_ms: RwSignal<u64>,
    dirty: RwSignal<u8>,
    /// Bumped at each login and logout: a stream of an older session stops.
    session: RwSignal<u64>,
}

impl Ctx {
    fn new() -> Ctx {
        Ctx {
            token: RwSignal::new(String::new()),
            me: RwSignal::new(None),
            page: RwSignal::new(Page::from_hash(&location_hash())),
            cluster: RwSignal::new(None),
            agents: RwSignal::new(Vec::new()),
            functions: RwSignal::new(Vec::new()),
            jobs: RwSignal::new(Vec::new()),
            frameworks: RwSignal::new(Vec::new()),
            offers: RwSignal::new(Vec::new()),
            leases: RwSignal::new(Vec::new()),
            roles: RwSignal::new(Vec::new()),
            samples: RwSignal::new(Vec::new()),
            live: RwSignal::new(false),
            problem: RwSignal::new(None),
            now_ms: RwSignal::new(now_ms()),
            dirty: RwSignal::new(0),
            session: RwSignal::new(0),
        }
    }

    /// The user's token, without tracking.
    pub fn token(&self) -> String {
        self.token.get_untracked()
    }

    /// The logged-in user may deploy.
    pub fn can_deploy(&self) -> bool {
        self.me.with(|m| m.as_ref().is_some_and(Me::can_deploy))
    }

    /// The logged-in user may invoke and run jobs.
    pub fn can_invoke(&self) -> bool {
        self.me.with(|m| m.as_ref().is_some_and(Me::can_invoke))
    }

    /// Asks for everything to be loaded again soon.
    pub fn refresh_all(&self) {
        self.dirty.set(Dirty::ALL);
    }

    /// Asks for functions to be loaded again soon.
    pub fn refresh_functions(&self) {
        self.dirty.update(|d| *d |= Dirty::FUNCTIONS);
    }

    /// Asks for jobs (and what they hold) to be loaded again soon.
    pub fn refresh_jobs(&self) {
        self.dirty
            .update(|d| *d |= Dirty::JOBS | Dirty::NODES | Dirty::SCHEDULING);
    }

    /// Handles a failed call: an invalid token ends the session.
    pub fn failed(&self, e: &ApiError) {
        if e.is_unauthorized() {
            self.logout(Some(format!("Your token stopped working: {}", e.message)));
        } else {
            self.problem.set(Some(e.to_string()));
        }
    }

    /// Logs in with `token` (checked with `GET /v1/whoami`).
    pub async fn login(self, token: String) -> Result<(), ApiError> {
        let me: Me = api::get("/v1/whoami", &token).await?;
        if let Some(storage) = session_storage() {
            let _ = storage.set_item(TOKEN_KEY, &token);
        }
        self.token.set(token);
        self.me.set(Some(me));
        self.problem.set(None);
        self.session.update(|s| *s += 1);
        self.refresh_all();
        follow(self);
        Ok(())
    }

    /// Forgets the token (and says why, if `why`).
    pub fn logout(&self, why: Option<String>) {
        if let Some(storage) = session_storage() {
            let _ = storage.remove_item(TOKEN_KEY);
        }
        self.session.update(|s| *s += 1);
        self.token.set(String::new());
        self.me.set(None);
        self.live.set(false);
        self.samples.set(Vec::new());
        self.problem.set(why);
    }
}

/// ms since the Unix epoch.
pub fn now_ms() -> u64 {
    js_sys::Date::now() as u64
}

fn location_hash() -> String {
    web_sys::window()
        .and_then(|w| w.location().hash().ok())
        .unwrap_or_default()
}

fn session_storage() -> Option<web_sys::Storage> {
    web_sys::window()?.session_storage().ok()?
}

/// Loads `path` into `target`; failures go to the banner.
fn load<T, U>(ctx: Ctx, path: &'static str, target: RwSignal<U>, pick: fn(T) -> U)
where
    T: DeserializeOwned + 'static,
    U: Send + Sync + 'static,
{
    let token = ctx.token();
    spawn_local(async move {
        match api::get::<T>(path, &token).await {
            Ok(value) => target.set(pick(value)),
            Err(e) => ctx.failed(&e),
        }
    });
}

/// Loads what `dirty` names.
fn reload(ctx: Ctx, dirty: u8) {
    if ctx.token().is_empty() {
        return;
    }
    if dirty & Dirty::CLUSTER != 0 {
        load(ctx, "/v1/cluster", ctx.cluster, |c: Cluster| Some(c));
    }
    if dirty & Dirty::NODES != 0 {
        load(ctx, "/v1/nodes", ctx.agents, |a: Agents| a.agents);
    }
    if dirty & Dirty::FUNCTIONS != 0 {
        load(ctx, "/v1/functions", ctx.functions, |f: Functions| {
            f.functions
        });
    }
    if dirty & Dirty::JOBS != 0 {
        load(ctx, "/v1/jobs?limit=200", ctx.jobs, |j: Jobs| j.jobs);
    }
    if dirty & Dirty::SCHEDULING != 0 {
        load(ctx, "/v1/frameworks", ctx.frameworks, |f: Frameworks| {
            f.frameworks
        });
        load(ctx, "/v1/offers", ctx.offers, |o: Offers| o.offers);
        load(ctx, "/v1/leases", ctx.leases, |l: Leases| l.leases);
        load(ctx, "/v1/roles", ctx.roles, |r: Roles| r.roles);
    }
}

/// What an event from the stream changes.
fn on_event(ctx: Ctx, event: StreamEvent) {
    let touched = match event.name.as_str() {
        "deployed" | "deleted" => Dirty::FUNCTIONS,
        "task_changed" => Dirty::JOBS | Dirty::NODES | Dirty::SCHEDULING,
        "node_joined" | "node_lost" => Dirty::NODES | Dirty::SCHEDULING | Dirty::CLUSTER,
        "leader_changed" => Dirty::CLUSTER | Dirty::SCHEDULING,
        "missed" => Dirty::ALL,
        "stats" => {
            let sample = Sample {
                at_ms: event.data["at_ms"]
                    .as_f64()
                    .unwrap_or_else(js_sys::Date::now),
                invocations: event.data["invocations"].as_u64().unwrap_or(0),
                errors: event.data["errors"].as_u64().unwrap_or(0),
            };
            ctx.samples.update(|s| {
                s.push(sample);
                if s.len() > MAX_SAMPLES {
                    s.remove(0);
                }
            });
            0
        }
        "ended" => {
            let reason = event.data["reason"]
                .as_str()
                .unwrap_or("the token was revoked");
            ctx.logout(Some(format!("Your session ended: {reason}")));
            0
        }
        _ => 0,
    };
    if touched != 0 {
        ctx.dirty.update(|d| *d |= touched);
    }
}

/// Follows the event stream for the current session, reconnecting after failures.
fn follow(ctx: Ctx) {
    let session = ctx.session.get_untracked();
    spawn_local(async move {
        let mut delay = 1_000;
        while ctx.session.get_untracked() == session {
            let Ok(abort) = web_sys::AbortController::new() else {
                return;
            };
            let handler: Rc<dyn Fn(StreamEvent)> = {
                let abort = abort.clone();
                Rc::new(move |event| {
                    // A stream of an ended session stops at its next event (at most
                    // the 2 s between `stats` events).
                    if ctx.session.get_untracked() != session {
                        abort.abort();
                        return;
                    }
                    ctx.live.set(true);
                    on_event(ctx, event);
                })
            };
            let result = api::follow_events(&ctx.token(), &abort.signal(), handler).await;
            if ctx.session.get_untracked() != session {
                return;
            }
            ctx.live.set(false);
            match result {
                Err(e) if e.is_unauthorized() => {
                    ctx.failed(&e);
                    return;
                }
                Ok(()) => delay = 1_000,
                Err(_) => delay = (delay * 2).min(15_000),
            }
            // Whatever happened while away is loaded again.
            ctx.refresh_all();
            sleep(delay).await;
        }
    });
}

/// Waits `ms` milliseconds.
pub async fn sleep(ms: i32) {
    let promise = js_sys::Promise::new(&mut |resolve, _| {
        if let Some(window) = web_sys::window() {
            let _ = window.set_timeout_with_callback_and_timeout_and_arguments_0(&resolve, ms);
        }
    });
    let _ = wasm_bindgen_futures::JsFuture::from(promise).await;
}

/// The console.
#[component]
pub fn App() -> impl IntoView {
    let ctx = Ctx::new();
    // Loads whatever changed, at most twice a second; everything every 5 s (indices,
    // offers and heartbeats change without events).
    set_interval(
        move || {
            let dirty = ctx.dirty.get_untracked();
            if dirty != 0 {
                ctx.dirty.set(0);
                reload(ctx, dirty);
            }
        },
        Duration::from_millis(500),
    );
    set_interval(
        move || {
            ctx.now_ms.set(now_ms());
            if (ctx.now_ms.get_untracked() / 1000).is_multiple_of(5) {
                ctx.dirty
                    .update(|d| *d |= Dirty::CLUSTER | Dirty::NODES | Dirty::SCHEDULING);
            }
        },
        Duration::from_secs(1),
    );
    let _ = window_event_listener_untyped("hashchange", move |_| {
        ctx.page.set(Page::from_hash(&location_hash()));
    });
    // A token from this tab's session logs in again on reload.
    if let Some(saved) = session_storage().and_then(|s| s.get_item(TOKEN_KEY).ok().flatten()) {
        spawn_local(async move {
            if let Err(e) = ctx.login(saved).await {
                ctx.logout(Some(format!("Please log in again: {e}")));
            }
        });
    }
    view! {
        <Show
            when=move || ctx.me.with(Option::is_some)
            fallback=move || view! { <pages::login::Login ctx=ctx/> }
        >
            <Shell ctx=ctx/>
        </Show>
    }
}

/// Header, navigation, banner and the current page.
#[component]
fn Shell(ctx: Ctx) -> impl IntoView {
    let who = move || {
        ctx.me.with(|m| {
            m.as_ref()
                .map(|m| format!("{} ({})", m.name, m.scopes.join(", ")))
                .unwrap_or_default()
        })
    };
    let nav = Page::ALL
        .into_iter()
        .map(|page| {
            view! {
                <a
                    href=format!("#/{}", page.slug())
                    class:current=move || ctx.page.get() == page
                    aria-current=move || (ctx.page.get() == page).then_some("page")
                >
                    {page.title()}
                </a>
            }
        })
        .collect_view();
    view! {
        <header class="top">
            <span class="brand">"wafer"</span>
            <nav aria-label="Pages">{nav}</nav>
            <span class="who">
                <span class=move || if ctx.live.get() { "dot live" } else { "dot" }
                    title=move || if ctx.live.get() { "live: following the event stream" } else { "reconnecting to the event stream" }
                ></span>
                <span id="who">{who}</span>
                <button id="logout" on:click=move |_| ctx.logout(None)>"Log out"</button>
            </span>
        </header>
        <Show when=move || ctx.problem.with(Option::is_some)>
            <div class="banner" role="alert">
                <span>{move || ctx.problem.get().unwrap_or_default()}</span>
                <button on:click=move |_| ctx.problem.set(None) aria-label="Dismiss">"×"</button>
            </div>
        </Show>
        <main>
            {move || match ctx.page.get() {
                Page::Overview => view! { <pages::overview::Overview ctx=ctx/> }.into_any(),
                Page::Functions => view! { <pages::functions::FunctionsPage ctx=ctx/> }.into_any(),
                Page::Jobs => view! { <pages::jobs::JobsPage ctx=ctx/> }.into_any(),
                Page::Scheduling => view! { <pages::scheduling::Scheduling ctx=ctx/> }.into_any(),
                Page::Nodes => view! { <pages::nodes::Nodes ctx=ctx/> }.into_any(),
            }}
        </main>
    }
}
