"""An asyncio client for wafer's public Cap'n Proto API (``capnp/cluster.capnp``)."""

from __future__ import annotations

import asyncio
import inspect
import json
import logging
import math
import time
import weakref
from collections.abc import Iterable, Mapping
from typing import Any, Awaitable, Callable, Optional, Union

import capnp

from ._schema import schema
from .errors import WaferError, check
from .types import (
    ClusterStatus,
    Event,
    FrameworkInfo,
    FunctionInfo,
    Job,
    NodeInfo,
    Response,
    Task,
    TokenInfo,
)

__all__ = ["Client", "Subscription", "MAX_CHUNK_BYTES"]

log = logging.getLogger("wafer_client")

# The most bytes one `Upload.write` may carry.
MAX_CHUNK_BYTES = 1 << 20
# The longest wait one `awaitJob` call may ask for.
_MAX_AWAIT_MS = 300_000

Headers = Union[Mapping[str, str], Iterable[tuple[str, str]], None]
Progress = Callable[[int, int], Optional[Awaitable[None]]]
EventCallback = Callable[[Event], Optional[Awaitable[None]]]


# ---------------------------------------------------------------------------------
# The KJ event loop.
#
# pycapnp runs Cap'n Proto on a KJ event loop tied to the asyncio loop, started with
# `capnp.kj_loop()` (or `capnp.run(coro)`). Callers that already run one use it; for
# callers that do not, `Client.connect` starts one and the last client on that asyncio
# loop to be `aclose`d stops it again.


class _OwnedKjLoop:
    def __init__(self, context: Any) -> None:
        self.context = context
        self.users = 0


_owned: "weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _OwnedKjLoop]" = (
    weakref.WeakKeyDictionary()
)


async def _acquire_kj_loop() -> Optional[_OwnedKjLoop]:
    loop = asyncio.get_running_loop()
    owned = _owned.get(loop)
    if owned is None:
        context = capnp.kj_loop()
        try:
            await context.__aenter__()
        except RuntimeError:
            # The caller runs its own KJ loop (capnp.run / capnp.kj_loop): use it.
            return None
        owned = _owned[loop] = _OwnedKjLoop(context)
    owned.users += 1
    return owned


async def _release_kj_loop(owned: Optional[_OwnedKjLoop]) -> None:
    if owned is None:
        return
    owned.users -= 1
    if owned.users > 0:
        return
    loop = asyncio.get_running_loop()
    if _owned.get(loop) is owned:
        del _owned[loop]
    await owned.context.__aexit__(None, None, None)


async def _maybe_await(value: Any) -> None:
    if inspect.isawaitable(value):
        await value


def _split_address(address: str) -> tuple[str, int]:
    host, sep, port = address.strip().rpartition(":")
    if not sep or not host or not port.isdigit():
        raise ValueError(f"address {address!r} is not host:port")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    return host, int(port)


def _header_pairs(headers: Headers) -> list[tuple[str, str]]:
    if headers is None:
        return []
    items = headers.items() if isinstance(headers, Mapping) else headers
    return [(str(k), str(v)) for k, v in items]


# ---------------------------------------------------------------------------------


class Subscription:
    """An event subscription from :meth:`Client.watch`.

    Events arrive while this object is alive (the server stops sending them when the
    subscription capability is dropped); call :meth:`cancel` to stop them.
    """

    def __init__(self, capability: Any, sink: Any) -> None:
        self._capability = capability
        self._sink = sink

    @property
    def active(self) -> bool:
        return self._capability is not None

    async def cancel(self) -> None:
        """Stops the events. Calling it again does nothing."""
        capability, self._capability = self._capability, None
        if capability is None:
            return
        try:
            await capability.cancel()
        finally:
            self._sink = None


def _make_sink(callback: EventCallback) -> Any:
    class _Sink(schema().EventSink.Server):  # type: ignore[misc,name-defined]
        async def event(self, event: Any, **kwargs: Any) -> None:
            # Convert while the message is alive; the callback gets plain data.
            converted = Event.from_capnp(event)
            try:
                await _maybe_await(callback(converted))
            except Exception:
                # A failing callback must not end the subscription.
                log.exception("wafer event callback failed on a %r event", converted.kind)

    return _Sink()


class Client:
    """A connection to a wafer server's ``--api`` port, logged in with an API token.

    Open it with ``await Client.connect("host:port", token)``; close it with
    ``await client.aclose()`` or use ``async with await Client.connect(...) as c``.
    Every call needs the scope the server's schema names; a refused call raises
    :class:`WaferError`.
    """

    def __init__(self, *, _rpc: Any, _stream: Any, _cluster: Any, _token: TokenInfo,
                 _kj: Optional[_OwnedKjLoop], address: str) -> None:
        self._rpc = _rpc
        self._stream = _stream
        self._cluster = _cluster
        self._kj = _kj
        self.token = _token
        self.address = address

    # -- connection -----------------------------------------------------------------

    @classmethod
    async def connect(cls, address: str, token: str) -> "Client":
        """Connects to ``address`` (``host:port``) and logs in with ``token``.

        Raises :class:`WaferError` (``unauthorized``) if the server refuses the token,
        ``OSError`` if it cannot be reached.
        """
        host, port = _split_address(address)
        gateway_schema = schema().Gateway
        kj = await _acquire_kj_loop()
        rpc = stream = None
        try:
            stream = await capnp.AsyncIoStream.create_connection(host=host, port=port)
            rpc = capnp.TwoPartyClient(stream)
            gateway = rpc.bootstrap().cast_as(gateway_schema)
            answer = await gateway.login(token)
            check(answer.error)
            info = TokenInfo.from_capnp(answer.token)
            return cls(_rpc=rpc, _stream=stream, _cluster=answer.cluster, _token=info,
                       _kj=kj, address=address)
        except BaseException:
            if rpc is not None:
                rpc.close()
            if stream is not None:
                stream.close()
            await _release_kj_loop(kj)
            raise

    def close(self) -> None:
        """Closes the connection (capabilities from it, e.g. subscriptions, stop).

        Prefer :meth:`aclose` where you can await: it also stops the KJ event loop
        that ``connect`` started, if it started one.
        """
        self._cluster = None
        rpc, self._rpc = self._rpc, None
        stream, self._stream = self._stream, None
        if rpc is not None:
            rpc.close()
        if stream is not None:
            stream.close()

    async def aclose(self) -> None:
        """Closes the connection and, if ``connect`` started the KJ event loop and no
        other client uses it, stops it."""
        self.close()
        kj, self._kj = self._kj, None
        await _release_kj_loop(kj)

    async def __aenter__(self) -> "Client":
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.aclose()

    @property
    def closed(self) -> bool:
        return self._cluster is None

    def _c(self) -> Any:
        if self._cluster is None:
            raise RuntimeError("this wafer Client is closed")
        return self._cluster

    # -- functions --------------------------------------------------------------------

    async def deploy(
        self,
        name: str,
        wasm: Union[bytes, bytearray, memoryview],
        manifest: Union[Mapping[str, Any], str, None] = None,
        chunk_size: int = 256 * 1024,
        progress: Optional[Progress] = None,
    ) -> FunctionInfo:
        """Deploys ``wasm`` as function ``name`` and returns the new version.

        ``manifest`` is the function's manifest (limits and env, as
        ``wafer deploy --manifest``), a dict or JSON text; ``None`` for defaults. The
        module goes up in chunks of ``chunk_size`` bytes (at most 1 MiB); after each,
        ``progress(received, total)`` is called (it may be a coroutine function).
        The new version is served by the time this returns.
        """
        if not 0 < chunk_size <= MAX_CHUNK_BYTES:
            raise ValueError(f"chunk_size must be 1..{MAX_CHUNK_BYTES}, not {chunk_size}")
        if manifest is None:
            manifest_text = ""
        elif isinstance(manifest, str):
            manifest_text = manifest
        else:
            manifest_text = json.dumps(manifest)
        data = memoryview(wasm).cast("B")
        total = len(data)

        request = self._c().deploy_request()
        request.name = name
        request.size = total
        request.manifest = manifest_text
        answer = await request.send()
        check(answer.error)
        upload = answer.upload

        for start in range(0, total, chunk_size):
            written = await upload.write(bytes(data[start:start + chunk_size]))
            check(written.error)
            if progress is not None:
                await _maybe_await(progress(int(written.received), total))

        finished = await upload.finish()
        check(finished.error)
        return FunctionInfo.from_capnp(finished.function)

    async def list_functions(self) -> list[FunctionInfo]:
        """Every deployed function, sorted by name."""
        answer = await self._c().listFunctions()
        check(answer.error)
        return [FunctionInfo.from_capnp(f) for f in answer.functions]

    async def get_function(self, name: str) -> FunctionInfo:
        request = self._c().getFunction_request()
        request.name = name
        answer = await request.send()
        check(answer.error)
        return FunctionInfo.from_capnp(answer.function)

    async def list_versions(self, name: str) -> list[FunctionInfo]:
        """The versions of ``name`` kept for rollbacks, oldest first; the last is current."""
        request = self._c().listVersions_request()
        request.name = name
        answer = await request.send()
        check(answer.error)
        return [FunctionInfo.from_capnp(f) for f in answer.versions]

    async def rollback(self, name: str, version: Optional[int] = None) -> FunctionInfo:
        """Makes kept ``version`` of ``name`` (default: the one before the current)
        current again, as the function's next version; returns the new record."""
        if version is not None and version < 1:
            raise ValueError("versions start at 1")
        request = self._c().rollbackFunction_request()
        request.name = name
        request.version = version or 0
        answer = await request.send()
        check(answer.error)
        return FunctionInfo.from_capnp(answer.function)

    async def delete_function(self, name: str) -> None:
        request = self._c().deleteFunction_request()
        request.name = name
        answer = await request.send()
        check(answer.error)

    async def invoke(
        self,
        name: str,
        body: bytes = b"",
        path: str = "/",
        method: str = "",
        headers: Headers = None,
    ) -> Response:
        """Runs function ``name`` once, as an HTTP request to ``/fn/NAME{path}``.

        ``method`` empty means POST with a body, else GET. Returns the function's
        answer even when its status is an error; raises :class:`WaferError` when it
        could not run or failed (``failed``, ``timeout``, ...; ``.log`` then holds the
        guest's log tail).
        """
        pairs = _header_pairs(headers)
        request = self._c().invoke_request()
        request.name = name
        r = request.init("request")
        r.method = method
        r.path = path
        r.body = bytes(body)
        list_ = r.init("headers", len(pairs))
        for i, (key, value) in enumerate(pairs):
            list_[i].key = key
            list_[i].value = value
        answer = await request.send()
        check(answer.error, log=str(answer.response.log))
        return Response.from_capnp(answer.response)

    # -- jobs -------------------------------------------------------------------------

    async def submit_job(
        self,
        function: str,
        input: bytes = b"",
        constraints: Iterable[str] = (),
        max_attempts: int = 0,
    ) -> Job:
        """Submits a durable job: ``function`` runs once with ``input`` as stdin.

        ``constraints`` are ``key=value`` / ``key!=value`` placement constraints on
        agent attributes; ``max_attempts`` 0 means the server's default (3).
        """
        constraints = [str(c) for c in constraints]
        request = self._c().submitJob_request()
        spec = request.init("job")
        spec.function = function
        spec.input = bytes(input)
        spec.maxAttempts = max_attempts
        list_ = spec.init("constraints", len(constraints))
        for i, c in enumerate(constraints):
            list_[i] = c
        answer = await request.send()
        check(answer.error)
        return Job.from_capnp(answer.job)

    async def wait(self, job_id: int, timeout: float = 60.0) -> Job:
        """Waits until job ``job_id`` has ended or ``timeout`` seconds have passed,
        and returns it as it is then: check ``job.ended`` to tell which."""
        deadline = time.monotonic() + max(0.0, timeout)
        while True:
            remaining_ms = max(0, math.ceil((deadline - time.monotonic()) * 1000))
            request = self._c().awaitJob_request()
            request.id = job_id
            request.timeoutMs = min(remaining_ms, _MAX_AWAIT_MS)
            answer = await request.send()
            check(answer.error)
            job = Job.from_capnp(answer.job)
            if job.ended or time.monotonic() >= deadline:
                return job

    async def get_job(self, job_id: int) -> Job:
        """Job ``job_id`` as it is now."""
        request = self._c().getJob_request()
        request.id = job_id
        answer = await request.send()
        check(answer.error)
        return Job.from_capnp(answer.job)

    async def kill_job(self, job_id: int) -> Job:
        request = self._c().killJob_request()
        request.id = job_id
        answer = await request.send()
        check(answer.error)
        return Job.from_capnp(answer.job)

    async def list_jobs(self, limit: int = 0, state: str = "") -> list[Job]:
        """The newest ``limit`` jobs (0: 100), newest first, in ``state`` if given."""
        request = self._c().listJobs_request()
        request.limit = limit
        request.state = state
        answer = await request.send()
        check(answer.error)
        return [Job.from_capnp(j) for j in answer.jobs]

    async def list_tasks(self) -> list[Task]:
        """Every attempt of the newest jobs."""
        answer = await self._c().listTasks()
        check(answer.error)
        return [Task.from_capnp(t) for t in answer.tasks]

    # -- cluster ----------------------------------------------------------------------

    async def nodes(self) -> list[NodeInfo]:
        """The agents: resources, use, attributes, state."""
        answer = await self._c().listNodes()
        check(answer.error)
        return [NodeInfo.from_capnp(n) for n in answer.nodes]

    async def frameworks(self) -> list[FrameworkInfo]:
        answer = await self._c().listFrameworks()
        check(answer.error)
        return [FrameworkInfo.from_capnp(f) for f in answer.frameworks]

    async def status(self) -> ClusterStatus:
        """The Raft cluster as the server this client talks to sees it."""
        answer = await self._c().status()
        check(answer.error)
        return ClusterStatus.from_capnp(answer.status)

    async def watch(self, callback: EventCallback) -> Subscription:
        """Calls ``callback(event)`` (a function or coroutine function) for every
        :class:`Event` on the server, one at a time, until the returned
        :class:`Subscription` is cancelled or dropped, or the connection closes.

        An exception from the callback is logged (logger ``wafer_client``) and the
        events go on. A slow callback makes the server drop events; it then sends
        one ``missed`` event with their count.
        """
        sink = _make_sink(callback)
        request = self._c().watch_request()
        request.sink = sink
        answer = await request.send()
        check(answer.error)
        return Subscription(answer.subscription, sink)
