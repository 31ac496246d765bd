//! Cluster health at a glance: leader and term, servers and agents with their state,
//! resource use per agent, and this node's invocation and error rates, live.

use leptos::prelude::*;

use crate::app::Ctx;
use crate::model::Member;
use crate::widgets::{Bar, RateChart};

/// A server's role as the answering node sees it.
pub fn role(member: &Member, leader: Option<u64>) -> &'static str {
    if Some(member.id) == leader {
        "leader"
    } else if member.voter {
        "follower"
    } else {
        "learner"
    }
}

/// The overview page.
#[component]
pub fn Overview(ctx: Ctx) -> impl IntoView {
    let cluster = move || ctx.cluster.get().unwrap_or_default();
    let leader = move || match cluster().leader_id {
        Some(id) => format!("node {id}"),
        None => "none".into(),
    };
    let agents_up = move || {
        ctx.agents.with(|a| {
            let up = a.iter().filter(|a| a.state == "active").count();
            format!("{up} / {}", a.len())
        })
    };
    let running = move || {
        ctx.jobs
            .with(|j| j.iter().filter(|j| !j.ended()).count().to_string())
    };
    let servers = move || {
        let c = cluster();
        c.members
            .iter()
            .map(|m| {
                let role = role(m, c.leader_id);
                view! {
                    <tr>
                        <td>{m.id}</td>
                        <td><span class=format!("state role-{role}")>{role}</span></td>
                        <td><code>{m.rpc.clone()}</code></td>
                        <td><code>{m.http.clone()}</code></td>
                    </tr>
                }
            })
            .collect_view()
    };
    let agents = move || {
        ctx.agents
            .get()
            .into_iter()
            .map(|a| {
                view! {
                    <div class="agent card">
                        <div class="agent-head">
                            <strong>{a.id.clone()}</strong>
                            <span class=format!("state state-{}", a.state)>{a.state.clone()}</span>
                        </div>
                        <Bar label="slots" used=a.allocated.slots total=a.resources.slots unit=""/>
                        <Bar label="memory" used=a.allocated.memory_mb total=a.resources.memory_mb unit=" MiB"/>
                        <Bar label="accel" used=a.allocated.accelerators total=a.resources.accelerators unit=""/>
                    </div>
                }
            })
            .collect_view()
    };
    view! {
        <h1>"Overview"</h1>
        <section class="cards" aria-label="Cluster summary">
            <div class="card stat"><span class="label">"Leader"</span><strong id="leader">{leader}</strong></div>
            <div class="card stat"><span class="label">"Term"</span><strong id="term">{move || cluster().term}</strong></div>
            <div class="card stat"><span class="label">"Servers"</span><strong>{move || cluster().members.len()}</strong></div>
            <div class="card stat"><span class="label">"Agents up"</span><strong id="agents-up">{agents_up}</strong></div>
            <div class="card stat"><span class="label">"Functions"</span><strong id="function-count">{move || ctx.functions.with(Vec::len)}</strong></div>
            <div class="card stat"><span class="label">"Jobs not ended"</span><strong>{running}</strong></div>
        </section>
        <section aria-labelledby="rates-h">
            <h2 id="rates-h">"Invocations"</h2>
            <RateChart samples=Signal::derive(move || ctx.samples.get())/>
        </section>
        <section aria-labelledby="servers-h">
            <h2 id="servers-h">"Servers"</h2>
            <div class="table-wrap"><table>
                <thead><tr><th>"id"</th><th>"role"</th><th>"node address"</th><th>"HTTP"</th></tr></thead>
                <tbody>{servers}</tbody>
            </table></div>
        </section>
        <section aria-labelledby="agents-h">
            <h2 id="agents-h">"Agents"</h2>
            <div class="agents">{agents}</div>
        </section>
    }
}
