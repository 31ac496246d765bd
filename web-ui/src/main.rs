//! wafer's web console: a Leptos client-side-rendered app that every node serves at `/`.
//! It uses the REST API and the server-sent event stream with the user's token, and
//! can do nothing the API would not let that token do.

mod api;
mod app;
mod model;
mod pages;
mod widgets;

fn main() {
    console_error_panic_hook::set_once();
    leptos::mount::mount_to_body(app::App);
}
