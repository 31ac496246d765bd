//! Invocations run on an agent over Cap'n Proto (`Executor.run`): the `Outcome` and
//! `Invocation` encodings, and the gateway's client call.

use std::time::Duration;

use bytes::Bytes;
use wafer_proto::node_capnp::outcome;

use super::{RpcError, RpcHandle};
use crate::digest::Digest;
use crate::runtime::{Exit, Invocation, Limits, Outcome, Stdio};

/// Why a remote run did not happen.
#[derive(Debug, thiserror::Error)]
pub enum RemoteRunError {
    /// The agent could not be reached (try another).
    #[error(transparent)]
    Rpc(#[from] RpcError),
    /// The agent has no instance slot free (try another).
    #[error("agent busy: {0}")]
    Busy(String),
    /// The agent could not run it (module gone, bad limits ...).
    #[error("{0}")]
    Failed(String),
}

/// Writes an `Outcome`.
pub fn write_outcome(mut b: outcome::Builder<'_>, o: &Outcome) {
    {
        let mut exit = b.reborrow().init_exit();
        match &o.exit {
            Exit::Code(code) => exit.set_code(*code),
            Exit::Timeout => exit.set_timeout(()),
            Exit::MemoryLimit => exit.set_memory_limit(()),
            Exit::ResponseTooLarge => exit.set_response_too_large(()),
            Exit::OutOfFuel => exit.set_out_of_fuel(()),
            Exit::Trap(message) => exit.set_trap(message.as_str()),
        }
    }
    b.set_stdout(&o.stdout);
    b.set_log(&o.log);
    b.set_log_dropped(o.log_dropped);
    b.set_memory_refused(o.memory_refused);
    b.set_duration_ns(u64::try_from(o.duration.as_nanos()).unwrap_or(u64::MAX));
    b.set_fuel_used(o.fuel_used.unwrap_or(0));
}

/// Reads an `Outcome`.
pub fn read_outcome(r: outcome::Reader<'_>) -> Result<Outcome, capnp::Error> {
    use outcome::exit::Which;
    let exit = match r.get_exit().which()? {
        Which::Code(code) => Exit::Code(code),
        Which::Timeout(()) => Exit::Timeout,
        Which::MemoryLimit(()) => Exit::MemoryLimit,
        Which::ResponseTooLarge(()) => Exit::ResponseTooLarge,
        Which::OutOfFuel(()) => Exit::OutOfFuel,
        Which::Trap(message) => Exit::Trap(message?.to_str()?.to_string()),
    };
    Ok(Outcome {
        exit,
        stdout: Bytes::copy_from_slice(r.get_stdout()?),
        log: Bytes::copy_from_slice(r.get_log()?),
        log_dropped: r.get_log_dropped(),
        memory_refused: r.get_memory_refused(),
        duration: Duration::from_nanos(r.get_duration_ns()),
        fuel_used: Some(r.get_fuel_used()).filter(|used| *used > 0),
    })
}

/// Runs `invocation` of the module `module` under `limits` on the agent at `addr`.
pub async fn run_remote(
    rpc: &RpcHandle,
    addr: &str,
    module: Digest,
    limits: Limits,
    invocation: Invocation,
) -> Result<Outcome, RemoteRunError> {
    let target = addr.to_string();
    rpc.run(move |peers| async move {
        let executor = peers.executor(&target).await?;
        let fail = |e: capnp::Error| RpcError::from_capnp(&target, e);
        let mut request = executor.run_request();
        {
            let mut p = request.get();
            p.set_module(module.to_string().as_str());
            // Limits are plain numbers: they always serialize.
            p.set_limits(serde_json::to_string(&limits).unwrap_or_default().as_str());
            let mut args = p.reborrow().init_args(invocation.args.len() as u32);
            for (i, arg) in invocation.args.iter().enumerate() {
                args.set(i as u32, arg.as_str());
            }
            let mut env = p.reborrow().init_env(invocation.env.len() as u32);
            for (i, (key, value)) in invocation.env.iter().enumerate() {
                let mut label = env.reborrow().get(i as u32);
                label.set_key(key);
                label.set_value(value);
            }
            if let Stdio::Captured(stdin) = &invocation.stdio {
                p.set_stdin(stdin);
            }
        }
        let reply = request.send().promise.await.map_err(|e| {
            peers.forget(&target);
            fail(e)
        })?;
        let r = reply.get().map_err(fail)?;
        let error = r
            .get_error()
            .map_err(fail)?
            .to_str()
            .map_err(|e| fail(e.into()))?;
        if r.get_busy() {
            return Err(RemoteRunError::Busy(error.to_string()));
        }
        if !error.is_empty() {
            return Err(RemoteRunError::Failed(error.to_string()));
        }
        Ok(read_outcome(r.get_outcome().map_err(fail)?).map_err(fail)?)
    })
    .await?
}

/// Reads the invocation of an `Executor.run` request.
pub fn read_run(
    p: wafer_proto::node_capnp::executor::run_params::Reader<'_>,
) -> Result<(Digest, Limits, Invocation), capnp::Error> {
    let bad = |e: String| capnp::Error::failed(e);
    let module: Digest = p
        .get_module()?
        .to_str()?
        .parse()
        .map_err(|e| bad(format!("{e}")))?;
    let limits: Limits =
        serde_json::from_str(p.get_limits()?.to_str()?).map_err(|e| bad(e.to_string()))?;
    let mut args = Vec::new();
    for arg in p.get_args()? {
        args.push(arg?.to_str()?.to_string());
    }
    let mut env = crate::runtime::Environ::default();
    for label in p.get_env()? {
        env.push(label.get_key()?.to_str()?, label.get_value()?.to_str()?);
    }
    Ok((
        module,
        limits,
        Invocation {
            args,
            env,
            stdio: Stdio::Captured(Bytes::copy_from_slice(p.get_stdin()?)),
        },
    ))
}
