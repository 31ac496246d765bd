//! Jobs and tasks: submitting a job, the table (state, agent, attempts, duration)
//! filtered by state and function, a job's detail (attempts, reasons, output to read or
//! download), and killing a job that has not ended.

use leptos::prelude::*;
use leptos::task::spawn_local;

use crate::api;
use crate::app::Ctx;
use crate::model::{ago, bytes, millis, Job};
use crate::pages::functions::{default_to_first_function, download};
use crate::widgets::State;

/// States a job can be in, for the filter.
const STATES: [&str; 8] = [
    "STAGING",
    "STARTING",
    "RUNNING",
    "FINISHED",
    "FAILED",
    "KILLED",
    "UNREACHABLE",
    "GONE",
];

/// The jobs page.
#[component]
pub fn JobsPage(ctx: Ctx) -> impl IntoView {
    let state_filter = RwSignal::new(String::new());
    let function_filter = RwSignal::new(String::new());
    let open = RwSignal::new(None::<u64>);
    let shown = move || {
        let state = state_filter.get();
        let function = function_filter.get();
        ctx.jobs.with(|jobs| {
            jobs.iter()
                .filter(|j| state.is_empty() || j.state == state)
                .filter(|j| function.is_empty() || j.function == function)
                .cloned()
                .collect::<Vec<_>>()
        })
    };
    let function_names = move || {
        let mut names: Vec<String> = ctx
            .jobs
            .with(|j| j.iter().map(|j| j.function.clone()).collect());
        names.sort();
        names.dedup();
        names
    };
    let row = move |job: Job| {
        let id = job.id;
        let ended = job.ended();
        let now = ctx.now_ms.get();
        view! {
            <tr data-job=id.to_string() class:selected=move || open.get() == Some(id)>
                <td><button class="link" on:click=move |_| open.set(Some(id))
                    aria-label=format!("Show job {id}")>{format!("#{id}")}</button></td>
                <td>{job.function.clone()}</td>
                <td class="job-state"><State state=job.state.clone()/></td>
                <td>{job.agent().to_string()}</td>
                <td>{format!("{} / {}", job.attempts.len(), job.max_attempts)}</td>
                <td>{millis(job.duration_ms(now))}</td>
                <td>{ago(now, job.submitted_at_ms)}</td>
                <td class="reason">{job.reason.clone().unwrap_or_default()}</td>
                <td class="actions">
                    <Show when=move || ctx.can_invoke() && !ended>
                        <KillButton ctx=ctx id=id/>
                    </Show>
                </td>
            </tr>
        }
    };
    view! {
        <h1>"Jobs"</h1>
        <Show when=move || ctx.can_invoke()>
            <SubmitForm ctx=ctx open=open/>
        </Show>
        <div class="filters" role="group" aria-label="Filter jobs">
            <label for="filter-state">"State"</label>
            <select id="filter-state" on:change=move |ev| state_filter.set(event_target_value(&ev))>
                <option value="">"any"</option>
                {STATES.into_iter().map(|s| view! { <option value=s>{s}</option> }).collect_view()}
            </select>
            <label for="filter-function">"Function"</label>
            <select id="filter-function" on:change=move |ev| function_filter.set(event_target_value(&ev))>
                <option value="">"any"</option>
                {move || function_names().into_iter().map(|f| {
                    let (value, label, is) = (f.clone(), f.clone(), f);
                    view! { <option value=value selected=move || function_filter.get() == is>{label}</option> }
                }).collect_view()}
            </select>
        </div>
        <div class="table-wrap"><table id="jobs">
            <thead>
                <tr>
                    <th>"job"</th><th>"function"</th><th>"state"</th><th>"agent"</th>
                    <th>"attempts"</th><th>"duration"</th><th>"submitted"</th><th>"reason"</th>
                    <th><span class="sr-only">"actions"</span></th>
                </tr>
            </thead>
            <tbody>{move || shown().into_iter().map(row).collect_view()}</tbody>
        </table></div>
        <Show when=move || ctx.jobs.with(Vec::is_empty)>
            <p class="muted">"No jobs yet."</p>
        </Show>
        {move || open.get().map(|id| view! { <JobDetail ctx=ctx id=id open=open/> })}
    }
}

#[component]
fn KillButton(ctx: Ctx, id: u64) -> impl IntoView {
    let busy = RwSignal::new(false);
    let kill = move |_| {
        busy.set(true);
        let token = ctx.token();
        spawn_local(async move {
            match api::call("POST", &format!("/v1/jobs/{id}/kill"), &token, None).await {
                Ok(_) => ctx.refresh_jobs(),
                Err(e) => ctx.failed(&e),
            }
            busy.set(false);
        });
    };
    view! {
        <button class="danger" aria-label=format!("Kill job {id}") disabled=move || busy.get() on:click=kill>"Kill"</button>
    }
}

#[component]
fn SubmitForm(ctx: Ctx, open: RwSignal<Option<u64>>) -> impl IntoView {
    let function = RwSignal::new(String::new());
    let input = RwSignal::new(String::new());
    let attempts = RwSignal::new("3".to_string());
    let constraints = RwSignal::new(String::new());
    let error = RwSignal::new(None::<String>);
    default_to_first_function(ctx, function);
    let submit = move |ev: leptos::ev::SubmitEvent| {
        ev.prevent_default();
        error.set(None);
        let max_attempts = match attempts.get_untracked().trim().parse::<u32>() {
            Ok(n) => n,
            Err(_) => {
                error.set(Some("Attempts must be a number from 1 to 10.".into()));
                return;
            }
        };
        let constraints: Vec<String> = constraints
            .get_untracked()
            .split(',')
            .map(str::trim)
            .filter(|c| !c.is_empty())
            .map(String::from)
            .collect();
        let body = serde_json::json!({
            "function": function.get_untracked(),
            "input": input.get_untracked(),
            "max_attempts": max_attempts,
            "constraints": constraints,
        });
        let token = ctx.token();
        spawn_local(async move {
            match api::call("POST", "/v1/jobs", &token, Some(&body)).await {
                Ok(reply) => {
                    let job: Job = serde_json::from_slice(&reply.body).unwrap_or_default();
                    ctx.jobs.update(|jobs| {
                        if !jobs.iter().any(|j| j.id == job.id) {
                            jobs.insert(0, job.clone());
                        }
                    });
                    open.set(Some(job.id));
                    ctx.refresh_jobs();
                }
                Err(e) if e.is_unauthorized() => ctx.failed(&e),
                Err(e) => error.set(Some(e.to_string())),
            }
        });
    };
    view! {
        <section class="card form" aria-labelledby="submit-h">
            <h2 id="submit-h">"Submit a job"</h2>
            <form id="submit-job" on:submit=submit>
                <div class="row">
                    <div>
                        <label for="job-function">"Function"</label>
                        <select id="job-function" on:change=move |ev| function.set(event_target_value(&ev))>
                            {move || ctx.functions.get().into_iter().map(|f| {
                                let (value, label, is) = (f.name.clone(), f.name.clone(), f.name);
                                view! { <option value=value selected=move || function.get() == is>{label}</option> }
                            }).collect_view()}
                        </select>
                    </div>
                    <div>
                        <label for="job-attempts">"Attempts"</label>
                        <input id="job-attempts" type="number" min="1" max="10"
                            prop:value=move || attempts.get() on:input=move |ev| attempts.set(event_target_value(&ev))/>
                    </div>
                    <div>
                        <label for="job-constraints">"Constraints (comma-separated)"</label>
                        <input id="job-constraints" type="text" placeholder="zone=b"
                            prop:value=move || constraints.get() on:input=move |ev| constraints.set(event_target_value(&ev))/>
                    </div>
                </div>
                <label for="job-input">"Input (stdin)"</label>
                <textarea id="job-input" rows="3"
                    prop:value=move || input.get() on:input=move |ev| input.set(event_target_value(&ev))></textarea>
                <button id="job-submit" type="submit" disabled=move || function.with(String::is_empty)>"Submit"</button>
                {move || error.get().map(|e| view! { <p class="error" role="alert">{e}</p> })}
            </form>
        </section>
    }
}

#[component]
fn JobDetail(ctx: Ctx, id: u64, open: RwSignal<Option<u64>>) -> impl IntoView {
    let job = move || {
        ctx.jobs
            .with(|jobs| jobs.iter().find(|j| j.id == id).cloned())
    };
    let output = RwSignal::new(None::<Result<Vec<u8>, String>>);
    // The output is loaded once the job has finished.
    Effect::new(move |loaded: Option<bool>| {
        let finished = job().is_some_and(|j| j.state == "FINISHED");
        if finished && loaded != Some(true) {
            let token = ctx.token();
            spawn_local(async move {
                let path = format!("/v1/jobs/{id}/output");
                match api::call("GET", &path, &token, None).await {
                    Ok(reply) => output.set(Some(Ok(reply.body))),
                    Err(e) => output.set(Some(Err(e.to_string()))),
                }
            });
            return true;
        }
        loaded.unwrap_or(false)
    });
    let attempts = move || {
        job().map(|j| {
            j.attempts
                .into_iter()
                .map(|a| {
                    let ran = match a.ended_at_ms {
                        Some(end) => millis(end.saturating_sub(a.started_at_ms)),
                        None => "running".into(),
                    };
                    let number = a.number;
                    let log = a.log.map(|log| {
                        view! {
                            <details class="attempt-log">
                                <summary>{format!("log of attempt {number}")}</summary>
                                <pre class="body">{log}</pre>
                            </details>
                        }
                    });
                    view! {
                        <tr>
                            <td>{a.number}</td>
                            <td>{a.agent}</td>
                            <td><State state=a.state/></td>
                            <td>{ran}</td>
                            <td class="reason">{a.reason.unwrap_or_default()}{log}</td>
                        </tr>
                    }
                })
                .collect_view()
        })
    };
    view! {
        <section class="card detail" id="job-detail" aria-labelledby="detail-h">
            <div class="detail-head">
                <h2 id="detail-h">{format!("Job #{id}")}</h2>
                <button on:click=move |_| open.set(None) aria-label="Close the job's detail">"Close"</button>
            </div>
            {move || match job() {
                None => view! { <p class="muted">"This job is not among the newest 200."</p> }.into_any(),
                Some(j) => {
                    let submitted = j.submitted_at_ms;
                    view! {
                    <dl class="facts">
                        <dt>"function"</dt><dd>{j.function.clone()}</dd>
                        <dt>"state"</dt><dd id="detail-state"><State state=j.state.clone()/></dd>
                        <dt>"reason"</dt><dd>{j.reason.clone().unwrap_or_else(|| "—".into())}</dd>
                        <dt>"input"</dt><dd>{bytes(j.input_size)}</dd>
                        <dt>"constraints"</dt><dd>{if j.constraints.is_empty() { "none".to_string() } else { j.constraints.join(", ") }}</dd>
                        <dt>"attempts allowed to fail"</dt><dd>{j.max_attempts}</dd>
                        <dt>"submitted"</dt><dd>{move || ago(ctx.now_ms.get(), submitted)}</dd>
                    </dl>
                }.into_any()
                }
            }}
            <h3>"Attempts"</h3>
            <div class="table-wrap"><table>
                <thead><tr><th>"#"</th><th>"agent"</th><th>"state"</th><th>"ran"</th><th>"reason and log"</th></tr></thead>
                <tbody>{attempts}</tbody>
            </table></div>
            <h3>"Output"</h3>
            {move || match output.get() {
                None => view! { <p class="muted">"The output appears when the job has finished."</p> }.into_any(),
                Some(Err(e)) => view! { <p class="error">{e}</p> }.into_any(),
                Some(Ok(data)) => {
                    let text = String::from_utf8_lossy(&data).to_string();
                    let size = data.len() as u64;
                    view! {
                        <pre id="job-output" class="body">{text}</pre>
                        <button id="job-download" on:click=move |_| download(&format!("job-{id}-output.txt"), &data)>
                            {format!("Download ({})", bytes(size))}
                        </button>
                    }.into_any()
                }
            }}
        </section>
    }
}
