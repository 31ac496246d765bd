//! `wafer dev`: a single-node server (state, runtime, gateway) in one process, with the
//! example functions deployed at start.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::Context;

use crate::functions::Functions;
use crate::gateway::{self, AppState};
use crate::metrics::Metrics;
use crate::runtime::{Runtime, RuntimeConfig};
use crate::state::{FunctionName, FunctionSpec, State};

/// Settings of a dev server.
#[derive(Debug, Clone)]
pub struct DevConfig {
    /// Gateway address; port 0 picks a free port.
    pub http: SocketAddr,
    /// Data folder (state database and precompiled-code cache).
    pub data: PathBuf,
    /// Folder of example functions (`NAME.wasm`, optional `NAME.json` manifest) to
    /// deploy at start.
    pub examples: Option<PathBuf>,
    /// Largest module accepted, MiB.
    pub max_module_mb: u64,
    /// Runtime settings (the cache folder is set from `data`).
    pub runtime: RuntimeConfig,
}

/// Opens the node's state and runtime in `data`.
pub fn open_node(
    data: &Path,
    runtime: &RuntimeConfig,
    max_module_mb: u64,
) -> anyhow::Result<Functions> {
    std::fs::create_dir_all(data)
        .with_context(|| format!("creating data folder {}", data.display()))?;
    let state = State::open(&data.join("wafer.redb"))?;
    let mut runtime = runtime.clone();
    runtime.cache_dir = Some(data.join("cache"));
    let runtime = Arc::new(Runtime::new(&runtime)?);
    Ok(Functions::load(state, runtime, max_module_mb << 20)?)
}

/// Deploys every `NAME.wasm` in `dir` (with `NAME.json` as its manifest when present)
/// whose module or manifest differs from what is deployed. Returns the names.
pub fn deploy_examples(functions: &Functions, dir: &Path) -> anyhow::Result<Vec<FunctionName>> {
    let mut entries: Vec<PathBuf> = std::fs::read_dir(dir)
        .with_context(|| format!("reading examples folder {}", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "wasm"))
        .collect();
    entries.sort();
    let mut names = Vec::new();
    for path in entries {
        let Some(stem) = path.file_stem().and_then(|s| s.to_str()) else {
            continue;
        };
        let name: FunctionName = stem.parse()?;
        let wasm = std::fs::read(&path).with_context(|| format!("reading {}", path.display()))?;
        let manifest = path.with_extension("json");
        let spec: FunctionSpec = if manifest.exists() {
            let text = std::fs::read_to_string(&manifest)
                .with_context(|| format!("reading {}", manifest.display()))?;
            serde_json::from_str(&text)
                .with_context(|| format!("parsing {}", manifest.display()))?
        } else {
            FunctionSpec::default()
        };
        let current = functions.get(&name).ok();
        let unchanged = current.is_some_and(|d| {
            d.record.digest == crate::digest::Digest::of(&wasm) && d.record.spec == spec
        });
        if !unchanged {
            functions
                .deploy(&name, &wasm, spec)
                .with_context(|| format!("deploying example {}", path.display()))?;
        }
        names.push(name);
    }
    Ok(names)
}

/// Runs the dev server until Ctrl-C or SIGTERM.
pub async fn run(config: DevConfig) -> anyhow::Result<()> {
    let (functions, examples) = {
        let config = config.clone();
        tokio::task::spawn_blocking(move || -> anyhow::Result<_> {
            let functions = open_node(&config.data, &config.runtime, config.max_module_mb)?;
            let examples = match &config.examples {
                Some(dir) => deploy_examples(&functions, dir)?,
                None => Vec::new(),
            };
            Ok((functions, examples))
        })
        .await??
    };
    let metrics = Metrics::new(functions.runtime().metrics());
    let state = Arc::new(AppState {
        functions: Arc::new(functions),
        metrics,
    });
    let listener = tokio::net::TcpListener::bind(config.http)
        .await
        .with_context(|| format!("binding the gateway to {}", config.http))?;
    let addr = listener.local_addr()?;
    // The first line on stdout is machine-readable: tests and scripts wait for it.
    println!("wafer dev: listening on http://{addr}");
    println!("  data folder: {}", config.data.display());
    for name in &examples {
        println!("  example: http://{addr}/fn/{name}");
    }
    println!(
        "  try: curl 'http://{addr}/fn/hello?name=you'   |   wafer --server http://{addr} fns"
    );
    tracing::info!(%addr, functions = state.functions.list().len(), "wafer dev ready");
    gateway::serve::serve(
        listener,
        gateway::app(state),
        gateway::serve::default_workers(),
        shutdown_signal(),
    )
    .await
    .context("serving HTTP")?;
    tracing::info!("wafer dev stopped");
    Ok(())
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = ctrl_c => {}
                    _ = term.recv() => {}
                }
            }
            Err(_) => {
                let _ = ctrl_c.await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = ctrl_c.await;
    }
}
