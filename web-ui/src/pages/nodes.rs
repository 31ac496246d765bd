//! Nodes and Raft: the servers (role, addresses) with this node's Raft indices, and
//! the agents (state, address, accelerators and their use, attributes, last heartbeat).

use leptos::prelude::*;

use crate::app::Ctx;
use crate::model::ago;
use crate::pages::overview::role;

fn index(i: Option<u64>) -> String {
    i.map_or_else(|| "—".into(), |i| i.to_string())
}

/// The nodes page.
#[component]
pub fn Nodes(ctx: Ctx) -> impl IntoView {
    let cluster = move || ctx.cluster.get().unwrap_or_default();
    let members = move || {
        let c = cluster();
        c.members
            .iter()
            .map(|m| {
                let role = role(m, c.leader_id);
                let this = if m.id == c.id { " (answering)" } else { "" };
                view! {
                    <tr>
                        <td>{format!("{}{this}", m.id)}</td>
                        <td><span class=format!("state role-{role}")>{role}</span></td>
                        <td>{if m.voter { "voter" } else { "learner" }}</td>
                        <td><code>{m.rpc.clone()}</code></td>
                        <td><code>{m.http.clone()}</code></td>
                    </tr>
                }
            })
            .collect_view()
    };
    let agents = move || {
        let now = ctx.now_ms.get();
        ctx.agents
            .get()
            .into_iter()
            .map(|a| {
                let attributes = a
                    .attributes
                    .iter()
                    .map(|(k, v)| format!("{k}={v}"))
                    .collect::<Vec<_>>()
                    .join(", ");
                let devices = if a.resources.accelerators == 0 {
                    "—".to_string()
                } else {
                    let attr = |k: &str| a.attributes.get(k).cloned().unwrap_or_default();
                    format!(
                        "{}/{} in use · {} ({}, {} MiB)",
                        a.allocated.accelerators,
                        a.resources.accelerators,
                        attr("accel.name"),
                        attr("accel.type"),
                        attr("accel.memory_mb")
                    )
                };
                let heartbeat = match a.last_heartbeat_ms {
                    Some(at) => ago(now, at),
                    None => "— (known to the leader)".to_string(),
                };
                view! {
                    <tr>
                        <td><strong>{a.id.clone()}</strong></td>
                        <td><span class=format!("state state-{}", a.state)>{a.state.clone()}</span></td>
                        <td><code>{a.rpc.clone()}</code></td>
                        <td class="devices">{devices}</td>
                        <td>{attributes}</td>
                        <td>{heartbeat}</td>
                        <td>{ago(now, a.registered_at_ms)}</td>
                    </tr>
                }
            })
            .collect_view()
    };
    view! {
        <h1>"Nodes & Raft"</h1>
        <section aria-labelledby="raft-h">
            <h2 id="raft-h">"Raft"</h2>
            <dl class="facts" id="raft">
                <dt>"answering node"</dt><dd>{move || format!("{} ({})", cluster().id, cluster().state)}</dd>
                <dt>"leader"</dt><dd>{move || index(cluster().leader_id)}</dd>
                <dt>"term"</dt><dd id="raft-term">{move || cluster().term}</dd>
                <dt>"last log index"</dt><dd>{move || index(cluster().last_log_index)}</dd>
                <dt>"commit index"</dt><dd id="raft-committed">{move || match cluster().committed_index {
                    Some(i) => i.to_string(),
                    None => "— (the leader knows)".to_string(),
                }}</dd>
                <dt>"applied index"</dt><dd id="raft-applied">{move || index(cluster().applied_index)}</dd>
                <dt>"snapshot index"</dt><dd>{move || index(cluster().snapshot_index)}</dd>
            </dl>
            <div class="table-wrap"><table id="members">
                <thead><tr><th>"id"</th><th>"role"</th><th>"vote"</th><th>"node address"</th><th>"HTTP"</th></tr></thead>
                <tbody>{members}</tbody>
            </table></div>
        </section>
        <section aria-labelledby="agents-h2">
            <h2 id="agents-h2">"Agents"</h2>
            <div class="table-wrap"><table id="agents">
                <thead><tr><th>"agent"</th><th>"state"</th><th>"executor address"</th><th>"accelerators"</th><th>"attributes"</th><th>"last heartbeat"</th><th>"registered"</th></tr></thead>
                <tbody>{agents}</tbody>
            </table></div>
        </section>
    }
}
