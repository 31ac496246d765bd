//! Functions: the deployed list, deploying a `.wasm` file with limits and env (upload
//! progress shown), rolling back to the version before, removal with confirmation, and
//! a try-it panel that invokes a function and shows status, headers, body and duration,
//! then the function's recent guest logs.

use leptos::prelude::*;
use leptos::task::spawn_local;
use wasm_bindgen::JsCast;

use crate::api::{self, ApiError, Reply};
use crate::app::{now_ms, Ctx};
use crate::model::{ago, bytes, millis, Function, LogPage};

/// The functions page.
#[component]
pub fn FunctionsPage(ctx: Ctx) -> impl IntoView {
    let selected = RwSignal::new(String::new());
    view! {
        <h1>"Functions"</h1>
        <FunctionTable ctx=ctx selected=selected/>
        <div class="columns">
            <Show when=move || ctx.can_deploy()>
                <DeployForm ctx=ctx/>
            </Show>
            <Show when=move || ctx.can_invoke()>
                <TryIt ctx=ctx selected=selected/>
            </Show>
        </div>
    }
}

#[component]
fn FunctionTable(ctx: Ctx, selected: RwSignal<String>) -> impl IntoView {
    // The function whose removal waits for confirmation.
    let confirming = RwSignal::new(None::<String>);
    let row = move |f: Function| {
        let name = f.name.clone();
        let short = f
            .digest
            .trim_start_matches("sha256:")
            .chars()
            .take(12)
            .collect::<String>();
        let labels = f
            .labels
            .iter()
            .map(|(k, v)| {
                if v.is_empty() {
                    k.clone()
                } else {
                    format!("{k}={v}")
                }
            })
            .collect::<Vec<_>>()
            .join(", ");
        let deployed = f.deployed_at_ms;
        let (key, shown) = (name.clone(), name.clone());
        let version = match f.restored_from {
            Some(from) => format!("{} (from {from})", f.version),
            None => f.version.to_string(),
        };
        let current = f.version;
        view! {
            <tr data-function=key>
                <td><strong>{shown}</strong></td>
                <td class="version">{version}</td>
                <td><code title=f.digest.clone()>{short}</code></td>
                <td>{bytes(f.size)}</td>
                <td>{format!("{} MiB", f.memory_mb)}</td>
                <td>{millis(f.timeout_ms)}</td>
                <td>{labels}</td>
                <td>{move || ago(ctx.now_ms.get(), deployed)}</td>
                <td class="actions">
                    <RowActions ctx=ctx name=name version=current selected=selected confirming=confirming/>
                </td>
            </tr>
        }
    };
    view! {
        <div class="table-wrap"><table id="functions">
            <thead>
                <tr>
                    <th>"name"</th><th>"version"</th><th>"digest"</th><th>"size"</th>
                    <th>"memory"</th><th>"timeout"</th><th>"labels"</th><th>"deployed"</th>
                    <th><span class="sr-only">"actions"</span></th>
                </tr>
            </thead>
            <tbody>
                {move || ctx.functions.get().into_iter().map(row).collect_view()}
            </tbody>
        </table></div>
        <Show when=move || ctx.functions.with(Vec::is_empty)>
            <p class="muted">"No functions deployed yet."</p>
        </Show>
    }
}

/// A function's buttons: try it, roll back to the version before (from version 2 on),
/// and delete (after a confirmation).
#[component]
fn RowActions(
    ctx: Ctx,
    name: String,
    version: u64,
    selected: RwSignal<String>,
    confirming: RwSignal<Option<String>>,
) -> impl IntoView {
    let name = StoredValue::new(name);
    let roll_back = move |_| {
        let token = ctx.token();
        let target = name.get_value();
        spawn_local(async move {
            let path = format!("/v1/functions/{}/rollback", api::encode(&target));
            match api::call("POST", &path, &token, None).await {
                Ok(_) => ctx.refresh_functions(),
                Err(e) => ctx.failed(&e),
            }
        });
    };
    let remove = move |_| {
        let token = ctx.token();
        let target = name.get_value();
        spawn_local(async move {
            let path = format!("/v1/functions/{}", api::encode(&target));
            match api::call("DELETE", &path, &token, None).await {
                Ok(_) => ctx.refresh_functions(),
                Err(e) => ctx.failed(&e),
            }
            confirming.set(None);
        });
    };
    let asking = move || confirming.get() == Some(name.get_value());
    move || {
        let n = name.get_value();
        let try_button = ctx.can_invoke().then(|| {
            view! {
                <button aria-label=format!("Try {n}") on:click=move |_| selected.set(name.get_value())>"Try"</button>
            }
        });
        let roll_back_button = (ctx.can_deploy() && version > 1).then(|| {
            view! {
                <button aria-label=format!("Roll back {n}")
                    title="Make the version before the current one current again"
                    on:click=roll_back>"Roll back"</button>
            }
        });
        let delete = if !ctx.can_deploy() {
            None
        } else if asking() {
            Some(
                view! {
                    <span class="confirm" role="alert">
                        {format!("Delete {n}? ")}
                        <button class="danger" on:click=remove>"Yes, delete"</button>
                        <button on:click=move |_| confirming.set(None)>"Cancel"</button>
                    </span>
                }
                .into_any(),
            )
        } else {
            Some(
                view! {
                    <button class="danger" aria-label=format!("Delete {n}")
                        on:click=move |_| confirming.set(Some(name.get_value()))>"Delete"</button>
                }
                .into_any(),
            )
        };
        view! { {try_button} {roll_back_button} {delete} }
    }
}

/// Keeps `selected` on the first deployed function until the user picks one.
pub fn default_to_first_function(ctx: Ctx, selected: RwSignal<String>) {
    Effect::new(move |_| {
        let first = ctx.functions.with(|f| f.first().map(|f| f.name.clone()));
        if selected.with_untracked(String::is_empty) {
            if let Some(first) = first {
                selected.set(first);
            }
        }
    });
}

/// Parses `KEY=VALUE` lines (blank lines skipped).
pub fn parse_pairs(text: &str, separator: char) -> Result<Vec<(String, String)>, String> {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(|line| {
            line.split_once(separator)
                .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
                .filter(|(k, _)| !k.is_empty())
                .ok_or_else(|| format!("`{line}` is not KEY{separator}VALUE"))
        })
        .collect()
}

#[component]
fn DeployForm(ctx: Ctx) -> impl IntoView {
    let name = RwSignal::new(String::new());
    let memory = RwSignal::new(String::new());
    let timeout = RwSignal::new(String::new());
    let fuel = RwSignal::new(String::new());
    let env = RwSignal::new(String::new());
    let progress = RwSignal::new(None::<(f64, f64)>);
    let result = RwSignal::new(None::<Result<String, String>>);
    let file_input = NodeRef::<leptos::html::Input>::new();
    let on_file = move |_| {
        // The name defaults to the file's, without `.wasm`.
        let file = file_input
            .get()
            .and_then(|i| i.files())
            .and_then(|f| f.get(0));
        if let Some(file) = file {
            if name.get_untracked().is_empty() {
                let stem = file.name();
                let stem = stem.trim_end_matches(".wasm").trim_end_matches(".wat");
                name.set(stem.to_string());
            }
        }
    };
    let submit = move |ev: leptos::ev::SubmitEvent| {
        ev.prevent_default();
        result.set(None);
        let Some(file) = file_input
            .get()
            .and_then(|i| i.files())
            .and_then(|f| f.get(0))
        else {
            result.set(Some(Err("Choose a .wasm file.".into())));
            return;
        };
        let fname = name.get_untracked().trim().to_string();
        if fname.is_empty() {
            result.set(Some(Err("Give the function a name.".into())));
            return;
        }
        let mut query = Vec::new();
        for (key, value) in [
            ("memory_mb", memory.get_untracked()),
            ("timeout_ms", timeout.get_untracked()),
            ("fuel", fuel.get_untracked()),
        ] {
            let value = value.trim().to_string();
            if !value.is_empty() {
                query.push(format!("{key}={}", api::encode(&value)));
            }
        }
        match parse_pairs(&env.get_untracked(), '=') {
            Ok(pairs) => {
                for (k, v) in pairs {
                    query.push(format!("env={}", api::encode(&format!("{k}={v}"))));
                }
            }
            Err(e) => {
                result.set(Some(Err(format!("Environment: {e}"))));
                return;
            }
        }
        let mut path = format!("/v1/functions/{}", api::encode(&fname));
        if !query.is_empty() {
            path = format!("{path}?{}", query.join("&"));
        }
        progress.set(Some((0.0, file.size())));
        let token = ctx.token();
        spawn_local(async move {
            let outcome = api::upload(&path, &token, file, move |sent, total| {
                progress.set(Some((sent, total)));
            })
            .await;
            progress.set(None);
            match outcome {
                Ok(reply) => {
                    let record: Function = serde_json::from_slice(&reply.body).unwrap_or_default();
                    result.set(Some(Ok(format!(
                        "Deployed {} version {} ({}).",
                        record.name,
                        record.version,
                        bytes(record.size)
                    ))));
                    ctx.refresh_functions();
                }
                Err(e) if e.is_unauthorized() => ctx.failed(&e),
                Err(e) => result.set(Some(Err(e.to_string()))),
            }
        });
    };
    view! {
        <section class="card form" aria-labelledby="deploy-h">
            <h2 id="deploy-h">"Deploy"</h2>
            <form id="deploy" on:submit=submit>
                <label for="deploy-file">"Module (.wasm or .wat)"</label>
                <input id="deploy-file" type="file" accept=".wasm,.wat,application/wasm"
                    node_ref=file_input on:change=on_file/>
                <label for="deploy-name">"Name"</label>
                <input id="deploy-name" type="text" autocomplete="off" placeholder="my-function"
                    prop:value=move || name.get() on:input=move |ev| name.set(event_target_value(&ev))/>
                <div class="row">
                    <div>
                        <label for="deploy-memory">"Memory (MiB)"</label>
                        <input id="deploy-memory" type="number" min="1" placeholder="128"
                            prop:value=move || memory.get() on:input=move |ev| memory.set(event_target_value(&ev))/>
                    </div>
                    <div>
                        <label for="deploy-timeout">"Timeout (ms)"</label>
                        <input id="deploy-timeout" type="number" min="1" placeholder="10000"
                            prop:value=move || timeout.get() on:input=move |ev| timeout.set(event_target_value(&ev))/>
                    </div>
                    <div>
                        <label for="deploy-fuel">"Fuel (units)"</label>
                        <input id="deploy-fuel" type="number" min="0" placeholder="unmetered"
                            title="A CPU budget per run: about one unit per WebAssembly instruction"
                            prop:value=move || fuel.get() on:input=move |ev| fuel.set(event_target_value(&ev))/>
                    </div>
                </div>
                <label for="deploy-env">"Environment (KEY=VALUE per line)"</label>
                <textarea id="deploy-env" rows="2"
                    prop:value=move || env.get() on:input=move |ev| env.set(event_target_value(&ev))></textarea>
                <button id="deploy-button" type="submit" disabled=move || progress.with(Option::is_some)>"Deploy"</button>
                <Show when=move || progress.with(Option::is_some)>
                    {move || {
                        let (sent, total) = progress.get().unwrap_or_default();
                        view! {
                            <progress id="deploy-progress" max=total.max(1.0) value=sent
                                aria-label="Upload progress"></progress>
                            <span class="muted">{format!(" {} of {}", bytes(sent as u64), bytes(total as u64))}</span>
                        }
                    }}
                </Show>
                {move || result.get().map(|r| match r {
                    Ok(text) => view! { <p class="ok" id="deploy-result" role="status">{text}</p> }.into_any(),
                    Err(text) => view! { <p class="error" id="deploy-result" role="alert">{text}</p> }.into_any(),
                })}
            </form>
        </section>
    }
}

/// What an invocation answered, and how long it took.
#[derive(Debug, Clone, PartialEq)]
struct Tried {
    reply: Result<Reply, ApiError>,
    ms: f64,
}

#[component]
fn TryIt(ctx: Ctx, selected: RwSignal<String>) -> impl IntoView {
    let method = RwSignal::new("POST".to_string());
    let path = RwSignal::new("/".to_string());
    let headers = RwSignal::new(String::new());
    let body = RwSignal::new(String::new());
    let tried = RwSignal::new(None::<Tried>);
    let busy = RwSignal::new(false);
    // The tried function's recent logs (this server's), read after each try.
    let logs = RwSignal::new(None::<Result<LogPage, ApiError>>);
    default_to_first_function(ctx, selected);
    let send = move |ev: leptos::ev::SubmitEvent| {
        ev.prevent_default();
        let name = selected.get_untracked();
        if name.is_empty() {
            return;
        }
        let header_list = match parse_pairs(&headers.get_untracked(), ':') {
            Ok(h) => h,
            Err(e) => {
                tried.set(Some(Tried {
                    reply: Err(ApiError {
                        status: 0,
                        code: "bad_input".into(),
                        message: format!("Headers: {e}"),
                        log: String::new(),
                    }),
                    ms: 0.0,
                }));
                return;
            }
        };
        let mut sub = path.get_untracked().trim().to_string();
        if !sub.starts_with('/') {
            sub.insert(0, '/');
        }
        let url = format!("/fn/{}{sub}", api::encode(&name));
        let m = method.get_untracked();
        let payload = body.get_untracked();
        let token = ctx.token();
        busy.set(true);
        spawn_local(async move {
            let started = performance_now();
            let has_body = m != "GET" && m != "HEAD";
            let reply = api::send(
                &m,
                &url,
                &token,
                &header_list,
                has_body.then_some(payload.as_bytes()),
            )
            .await;
            let ms = performance_now() - started;
            if let Ok(r) = &reply {
                if r.status == 401 {
                    ctx.failed(&ApiError {
                        status: 401,
                        code: "unauthorized".into(),
                        message: "the token was refused".into(),
                        log: String::new(),
                    });
                }
            }
            tried.set(Some(Tried { reply, ms }));
            busy.set(false);
            let page = api::get::<LogPage>(
                &format!("/v1/functions/{}/logs?limit=10", api::encode(&name)),
                &token,
            )
            .await;
            logs.set(Some(page));
        });
    };
    let options = move || {
        ctx.functions
            .get()
            .into_iter()
            .map(|f| {
                let (value, label, is) = (f.name.clone(), f.name.clone(), f.name);
                view! { <option value=value selected=move || selected.get() == is>{label}</option> }
            })
            .collect_view()
    };
    let outcome = move || {
        tried.get().map(|t| match t.reply {
            Ok(reply) => {
                let text = String::from_utf8_lossy(&reply.body).to_string();
                let heads = reply
                    .headers
                    .iter()
                    .map(|(k, v)| format!("{k}: {v}"))
                    .collect::<Vec<_>>()
                    .join("\n");
                let class = if reply.status < 400 { "status ok" } else { "status bad" };
                view! {
                    <div id="try-result" class="result">
                        <p>
                            <span class=class id="try-status">{reply.status}</span>
                            <span class="muted" id="try-duration">{format!(" in {:.1} ms", t.ms)}</span>
                        </p>
                        <details>
                            <summary>"Headers"</summary>
                            <pre id="try-headers">{heads}</pre>
                        </details>
                        <pre id="try-body" class="body">{text}</pre>
                    </div>
                }
                .into_any()
            }
            Err(e) => view! { <p id="try-result" class="error" role="alert">{e.to_string()}</p> }.into_any(),
        })
    };
    let recent_logs = move || {
        logs.get().map(|page| match page {
            Ok(page) => {
                let lines = page.lines();
                let text = if lines.is_empty() {
                    "(nothing logged yet)".to_string()
                } else {
                    lines.join("\n")
                };
                view! {
                    <details open=true>
                        <summary>{format!("Recent logs (node {})", page.node)}</summary>
                        <pre id="try-logs" class="body">{text}</pre>
                    </details>
                }
                .into_any()
            }
            Err(e) => {
                view! { <p id="try-logs" class="muted">{format!("Logs: {e}")}</p> }.into_any()
            }
        })
    };
    view! {
        <section class="card form" aria-labelledby="try-h">
            <h2 id="try-h">"Try it"</h2>
            <form id="try" on:submit=send>
                <div class="row">
                    <div>
                        <label for="try-function">"Function"</label>
                        <select id="try-function" on:change=move |ev| selected.set(event_target_value(&ev))>
                            {options}
                        </select>
                    </div>
                    <div>
                        <label for="try-method">"Method"</label>
                        <select id="try-method" on:change=move |ev| method.set(event_target_value(&ev))>
                            {["POST", "GET", "PUT", "DELETE", "PATCH"].into_iter().map(|m| view! {
                                <option value=m selected=move || method.get() == m>{m}</option>
                            }).collect_view()}
                        </select>
                    </div>
                </div>
                <label for="try-path">"Path and query"</label>
                <input id="try-path" type="text" autocomplete="off" placeholder="/?name=you"
                    prop:value=move || path.get() on:input=move |ev| path.set(event_target_value(&ev))/>
                <label for="try-headers-in">"Headers (Name: value per line)"</label>
                <textarea id="try-headers-in" rows="2"
                    prop:value=move || headers.get() on:input=move |ev| headers.set(event_target_value(&ev))></textarea>
                <label for="try-body-in">"Body"</label>
                <textarea id="try-body-in" rows="4"
                    prop:value=move || body.get() on:input=move |ev| body.set(event_target_value(&ev))></textarea>
                <button id="try-send" type="submit" disabled=move || busy.get() || selected.with(String::is_empty)>"Send"</button>
            </form>
            {outcome}
            {recent_logs}
        </section>
    }
}

fn performance_now() -> f64 {
    web_sys::window()
        .and_then(|w| w.performance())
        .map(|p| p.now())
        .unwrap_or_else(|| now_ms() as f64)
}

/// Offers `bytes` to the user as a file download named `name`.
pub fn download(name: &str, data: &[u8]) {
    let array = js_sys::Uint8Array::from(data);
    let parts = js_sys::Array::of1(&array);
    let Ok(blob) = web_sys::Blob::new_with_u8_array_sequence(&parts) else {
        return;
    };
    let Ok(url) = web_sys::Url::create_object_url_with_blob(&blob) else {
        return;
    };
    let anchor = web_sys::window()
        .and_then(|w| w.document())
        .and_then(|d| d.create_element("a").ok())
        .and_then(|a| a.dyn_into::<web_sys::HtmlAnchorElement>().ok());
    if let Some(a) = anchor {
        a.set_href(&url);
        a.set_download(name);
        a.click();
    }
    // Freed once the browser has surely started the download.
    set_timeout(
        move || {
            let _ = web_sys::Url::revoke_object_url(&url);
        },
        std::time::Duration::from_secs(60),
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pairs_parse_and_refuse_clearly() {
        assert_eq!(
            parse_pairs("A=1\n\n B = two words \n", '='),
            Ok(vec![
                ("A".into(), "1".into()),
                ("B".into(), "two words".into())
            ])
        );
        assert_eq!(
            parse_pairs("X-Trace: 1", ':'),
            Ok(vec![("X-Trace".into(), "1".into())])
        );
        assert!(parse_pairs("nope", '=').unwrap_err().contains("nope"));
    }
}
