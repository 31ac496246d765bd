"""End-to-end tests of wafer_client against a real `wafer dev` server."""

from __future__ import annotations

import asyncio
import itertools
import json
import math

import capnp
import pytest

from wafer_client import Client, Event, WaferError

_names = itertools.count(1)


def unique(prefix: str) -> str:
    return f"{prefix}-{next(_names)}"


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, timeout=30))


async def poll(condition, timeout: float = 10.0, what: str = "condition") -> None:
    """Waits until `condition()` is true, checking often; fails after `timeout` s."""
    deadline = asyncio.get_running_loop().time() + timeout
    while not condition():
        if asyncio.get_running_loop().time() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)


def test_deploy_in_chunks_and_invoke(wafer):
    wasm = wafer.module("markdown")
    name = unique("markdown")
    chunk = len(wasm) // 4 + 1
    progress: list[tuple[int, int]] = []

    async def main():
        async with await Client.connect(wafer.api, wafer.admin_token) as client:
            info = await client.deploy(
                name, wasm, chunk_size=chunk, progress=lambda r, t: progress.append((r, t))
            )
            assert info.name == name
            assert info.version == 1
            assert info.size == len(wasm)
            assert info.digest.startswith("sha256:")

            response = await client.invoke(name, b"# Hello\n\nfrom *python*")
            assert response.status == 200
            assert "<h1>" in response.text
            assert "<em>python</em>" in response.text
            assert response.header("Content-Type", "").startswith("text/html")

            assert name in [f.name for f in await client.list_functions()]
            assert (await client.get_function(name)).version == 1

    run(main())
    assert len(progress) == math.ceil(len(wasm) / chunk) >= 4
    assert all(total == len(wasm) for _, total in progress)
    received = [r for r, _ in progress]
    assert received == sorted(received) and len(set(received)) == len(received)
    assert received[-1] == len(wasm)


def test_job_runs_and_is_awaited(wafer):
    name = unique("wordcount")

    async def main():
        async with await Client.connect(wafer.api, wafer.admin_token) as client:
            await client.deploy(name, wafer.module("wordcount"))
            job = await client.submit_job(name, b"one two three")
            assert job.id > 0 and job.function == name
            done = await client.wait(job.id, timeout=20)
            assert done.ended, done
            assert done.state == "FINISHED", done
            assert done.attempts and done.attempts[0].attempt == 1
            assert (await client.get_job(job.id)).state == "FINISHED"
            return done

    done = run(main())
    # CGI: headers, a blank line, then the JSON stats.
    _, sep, body = done.output.replace(b"\r\n", b"\n").partition(b"\n\n")
    assert sep, done.output
    assert json.loads(body)["words"] == 3


def test_watch_sees_a_deploy(wafer):
    first, second = unique("hello"), unique("hello")
    events: list[Event] = []

    def deployed(name: str) -> bool:
        return any(e.kind == "deployed" and e.function.name == name for e in events)

    async def main():
        async with await Client.connect(wafer.api, wafer.admin_token) as client:
            subscription = await client.watch(events.append)
            await client.deploy(first, wafer.module("hello"))
            await poll(lambda: deployed(first), what=f"a deployed event for {first}")
            event = next(e for e in events if e.kind == "deployed" and e.function.name == first)
            assert event.at_ms > 0 and event.function.version == 1

            await subscription.cancel()
            await subscription.cancel()  # a second cancel does nothing
            assert not subscription.active
            await client.deploy(second, wafer.module("hello"))
            await client.delete_function(second)
            await client.list_functions()  # a round trip after the deploy
            await asyncio.sleep(0.2)
            assert not deployed(second)

    run(main())


def test_watch_with_async_callback_under_capnp_run(wafer):
    # The caller runs the KJ loop itself (capnp.run) and the callback is a coroutine.
    name = unique("hello")
    events: list[Event] = []

    async def on_event(event: Event) -> None:
        await asyncio.sleep(0)
        events.append(event)

    async def main():
        client = await Client.connect(wafer.api, wafer.admin_token)
        try:
            subscription = await client.watch(on_event)
            await client.deploy(name, wafer.module("hello"))
            await client.delete_function(name)
            await poll(lambda: any(e.kind == "deleted" and e.name == name for e in events),
                       what=f"a deleted event for {name}")
            await subscription.cancel()
        finally:
            await client.aclose()

    asyncio.run(asyncio.wait_for(capnp.run(main()), timeout=30))


def test_invoke_with_query_and_errors(wafer):
    name = unique("hello")

    async def main():
        async with await Client.connect(wafer.api, wafer.admin_token) as client:
            await client.deploy(name, wafer.module("hello"))
            response = await client.invoke(name, path="/?name=python")
            assert response.status == 200
            assert "python" in response.text

            with pytest.raises(WaferError) as refused:
                await client.invoke(unique("missing"))
            assert refused.value.code == "notFound"

            with pytest.raises(WaferError) as refused:
                await client.get_job(987654321)
            assert refused.value.code == "notFound"

            with pytest.raises(WaferError) as refused:
                await client.deploy(unique("broken"), b"\0asm but not really")
            assert refused.value.code == "invalid"
            assert refused.value.message

            with pytest.raises(ValueError):
                await client.deploy(name, b"x", chunk_size=(1 << 20) + 1)

            await client.delete_function(name)
            assert name not in [f.name for f in await client.list_functions()]

            status = await client.status()
            assert status.leader_id != 0 and status.members
            nodes = await client.nodes()
            assert nodes and nodes[0].state == "active"

    run(main())


def test_versions_are_kept_and_rolled_back(wafer):
    name = unique("versioned")

    async def main():
        async with await Client.connect(wafer.api, wafer.admin_token) as client:
            first = await client.deploy(name, wafer.module("hello"))
            await client.deploy(name, wafer.module("wordcount"))
            assert "Hello" not in (await client.invoke(name)).text

            restored = await client.rollback(name)
            assert restored.version == 3
            assert restored.restored_from == 1
            assert restored.digest == first.digest
            assert (await client.invoke(name)).text.startswith("Hello, world!")

            versions = await client.list_versions(name)
            assert [v.version for v in versions] == [1, 2, 3]
            assert versions[-1].restored_from == 1 and versions[0].restored_from is None

            with pytest.raises(WaferError) as refused:
                await client.rollback(name, 42)
            assert refused.value.code == "notFound"
            assert refused.value.reason == "unknown_version"
            assert "kept: 1, 2, 3" in refused.value.message

            with pytest.raises(WaferError) as refused:
                await client.rollback(name, 3)
            assert refused.value.code == "conflict"
            assert refused.value.reason == "already_current"

            await client.delete_function(name)

    run(main())


def test_read_only_token_cannot_deploy(wafer):
    token = wafer.create_token(["read"], name="python-tests")

    async def main():
        async with await Client.connect(wafer.api, token) as client:
            assert client.token.scopes == ("read",)
            assert isinstance(await client.list_functions(), list)
            with pytest.raises(WaferError) as refused:
                await client.deploy(unique("nope"), wafer.module("hello"))
            assert refused.value.code == "forbidden"
            with pytest.raises(WaferError) as refused:
                await client.submit_job("anything", b"")
            assert refused.value.code == "forbidden"

    run(main())


def test_bad_token_is_unauthorized(wafer):
    async def main():
        with pytest.raises(WaferError) as refused:
            await Client.connect(wafer.api, "not-a-real-token-0123456789")
        assert refused.value.code == "unauthorized"
        # The client is still usable after a refused login.
        async with await Client.connect(wafer.api, wafer.admin_token) as client:
            await client.status()

    run(main())


def test_manifest_limits_and_failed_invocations(wafer):
    spin, hog = unique("spin"), unique("hog")

    async def main():
        async with await Client.connect(wafer.api, wafer.admin_token) as client:
            info = await client.deploy(
                spin, wafer.module("spin"), manifest={"timeout_ms": 300, "env": {"MODE": "test"}}
            )
            assert info.limits.timeout_ms == 300
            assert info.env == {"MODE": "test"}
            with pytest.raises(WaferError) as refused:
                await client.invoke(spin)
            assert refused.value.code == "timeout"

            info = await client.deploy(
                spin, wafer.module("spin"), manifest={"fuel": 2_000_000, "timeout_ms": 60_000}
            )
            assert info.limits.fuel == 2_000_000
            with pytest.raises(WaferError) as refused:
                await client.invoke(spin)
            assert refused.value.code == "failed"
            assert refused.value.reason == "fuel_exhausted"

            info = await client.deploy(hog, wafer.module("hog"), manifest='{"memory_mb": 32}')
            assert info.limits.memory_mb == 32
            with pytest.raises(WaferError) as refused:
                await client.invoke(hog)
            assert refused.value.code == "failed"
            assert refused.value.reason == "memory_limit"

            with pytest.raises(WaferError) as refused:
                await client.deploy(unique("bad"), wafer.module("hello"), manifest={"memory_mb": "lots"})
            assert refused.value.code == "invalid"

    run(main())
