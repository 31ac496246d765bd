//! Login with an API token.

use leptos::prelude::*;
use leptos::task::spawn_local;

use crate::app::Ctx;

/// The login form; a refused token is said so.
#[component]
pub fn Login(ctx: Ctx) -> impl IntoView {
    let token = RwSignal::new(String::new());
    let error = RwSignal::new(None::<String>);
    let busy = RwSignal::new(false);
    let submit = move |ev: leptos::ev::SubmitEvent| {
        ev.prevent_default();
        let secret = token.get_untracked().trim().to_string();
        if secret.is_empty() {
            error.set(Some("Enter an API token.".into()));
            return;
        }
        busy.set(true);
        error.set(None);
        spawn_local(async move {
            if let Err(e) = ctx.login(secret).await {
                let message = if e.is_unauthorized() {
                    format!("That token was refused: {}", e.message)
                } else {
                    format!("Could not log in: {e}")
                };
                error.set(Some(message));
            }
            busy.set(false);
        });
    };
    view! {
        <main class="login">
            <h1><span class="brand">"wafer"</span>" console"</h1>
            <form on:submit=submit>
                <label for="token">"API token"</label>
                <input id="token" name="token" type="password" autocomplete="off" required
                    placeholder="wafer_…"
                    prop:value=move || token.get()
                    on:input=move |ev| token.set(event_target_value(&ev))/>
                <p class="hint">
                    "wafer dev prints an admin token and keeps it in "
                    <code>".wafer/dev/admin.token"</code>
                    "; " <code>"wafer token create --scope read"</code> " makes a read-only one."
                </p>
                <button id="login" type="submit" disabled=move || busy.get()>"Log in"</button>
                <Show when=move || error.with(Option::is_some)>
                    <p class="error" id="login-error" role="alert">{move || error.get().unwrap_or_default()}</p>
                </Show>
                <Show when=move || ctx.problem.with(Option::is_some)>
                    <p class="notice" role="status">{move || ctx.problem.get().unwrap_or_default()}</p>
                </Show>
            </form>
        </main>
    }
}
