//! Scheduling, the two-level model made visible: frameworks with their role, weight and
//! dominant share; what each role holds against its quota; the leader's open offers;
//! and the serverless framework's leases.

use std::collections::BTreeMap;

use leptos::prelude::*;

use crate::app::Ctx;
use crate::model::{millis, Resources};

fn res(r: Resources) -> String {
    let mut text = format!("{} slots, {} MiB", r.slots, r.memory_mb);
    if r.accelerators > 0 {
        text.push_str(&format!(", {} accel", r.accelerators));
    }
    text
}

/// The scheduling page.
#[component]
pub fn Scheduling(ctx: Ctx) -> impl IntoView {
    let frameworks = move || {
        ctx.frameworks
            .get()
            .into_iter()
            .map(|f| {
                let share = f.dominant_share.unwrap_or(f.allocated_share);
                let pct = (share * 100.0).clamp(0.0, 100.0);
                view! {
                    <tr>
                        <td><strong>{f.name.clone()}</strong><br/><code class="muted">{f.id.clone()}</code></td>
                        <td>{f.role.clone()}</td>
                        <td>{format!("{}", f.weight)}</td>
                        <td>
                            <span class="bar-track small" role="meter" aria-label=format!("dominant share {pct:.1}%")
                                aria-valuemin="0" aria-valuemax="100" aria-valuenow=format!("{pct:.1}")>
                                <span class="bar-fill" style=format!("width: {pct:.1}%")></span>
                            </span>
                            {format!(" {pct:.1}%")}
                        </td>
                        <td>{res(f.allocated)}</td>
                    </tr>
                }
            })
            .collect_view()
    };
    let roles = move || {
        // What each role's frameworks hold, with its weight and quota.
        let mut held: BTreeMap<String, Resources> = BTreeMap::new();
        ctx.frameworks.with(|fs| {
            for f in fs {
                let entry = held.entry(f.role.clone()).or_default();
                *entry = entry.plus(f.allocated);
            }
        });
        let settings = ctx.roles.get();
        for r in &settings {
            held.entry(r.name.clone()).or_default();
        }
        held.into_iter()
            .map(|(role, holds)| {
                let setting = settings.iter().find(|r| r.name == role);
                let weight = setting.map_or(1.0, |r| r.weight);
                let quota = setting
                    .and_then(|r| r.quota)
                    .map_or_else(|| "none".to_string(), res);
                view! {
                    <tr><td>{role}</td><td>{format!("{weight}")}</td><td>{res(holds)}</td><td>{quota}</td></tr>
                }
            })
            .collect_view()
    };
    let offers = move || {
        ctx.offers
            .get()
            .into_iter()
            .map(|o| {
                view! {
                    <tr><td>{o.id}</td><td>{o.framework}</td><td>{o.agent}</td><td>{res(o.resources)}</td><td>{millis(o.age_ms)}</td></tr>
                }
            })
            .collect_view()
    };
    let leases = move || {
        ctx.leases
            .get()
            .into_iter()
            .map(|l| {
                view! { <tr><td>{l.id}</td><td>{l.agent}</td><td>{res(l.resources)}</td></tr> }
            })
            .collect_view()
    };
    view! {
        <h1>"Scheduling"</h1>
        <p class="muted">
            "The leader offers each agent's free resources to one framework at a time, by weighted dominant resource fairness; "
            "a framework accepts what it uses, and each acceptance is a command committed through Raft."
        </p>
        <section aria-labelledby="fw-h">
            <h2 id="fw-h">"Frameworks"</h2>
            <div class="table-wrap"><table id="frameworks">
                <thead><tr><th>"framework"</th><th>"role"</th><th>"weight"</th><th>"dominant share"</th><th>"allocated"</th></tr></thead>
                <tbody>{frameworks}</tbody>
            </table></div>
        </section>
        <section aria-labelledby="roles-h">
            <h2 id="roles-h">"Allocation per role"</h2>
            <div class="table-wrap"><table id="roles">
                <thead><tr><th>"role"</th><th>"weight"</th><th>"held"</th><th>"quota"</th></tr></thead>
                <tbody>{roles}</tbody>
            </table></div>
        </section>
        <section aria-labelledby="offers-h">
            <h2 id="offers-h">"Open offers"</h2>
            <div class="table-wrap"><table id="offers">
                <thead><tr><th>"offer"</th><th>"framework"</th><th>"agent"</th><th>"resources"</th><th>"age"</th></tr></thead>
                <tbody>{offers}</tbody>
            </table></div>
            <Show when=move || ctx.offers.with(Vec::is_empty)>
                <p class="muted">"No open offers now (offers are short-lived; the leader lists them)."</p>
            </Show>
        </section>
        <section aria-labelledby="leases-h">
            <h2 id="leases-h">"Serverless leases"</h2>
            <div class="table-wrap"><table id="leases">
                <thead><tr><th>"allocation"</th><th>"agent"</th><th>"resources"</th></tr></thead>
                <tbody>{leases}</tbody>
            </table></div>
        </section>
    }
}
