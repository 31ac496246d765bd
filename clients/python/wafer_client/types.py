"""Plain data classes for what the API returns, with converters from capnp readers."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

__all__ = [
    "ClusterStatus",
    "Event",
    "FrameworkInfo",
    "FunctionInfo",
    "Job",
    "Limits",
    "Member",
    "NodeInfo",
    "Resources",
    "Response",
    "Task",
    "TokenInfo",
]

# Job states after which a job never changes again.
ENDED_STATES = frozenset({"FINISHED", "FAILED", "KILLED"})


def _pairs(reader: Any) -> dict[str, str]:
    return {str(kv.key): str(kv.value) for kv in reader}


@dataclass(frozen=True)
class TokenInfo:
    """The logged-in token's public description (never its secret)."""

    id: str
    name: str
    scopes: tuple[str, ...]
    # When it stops working, ms since the Unix epoch (0: never).
    expires_at_ms: int

    @classmethod
    def from_capnp(cls, r: Any) -> "TokenInfo":
        return cls(
            id=str(r.id),
            name=str(r.name),
            scopes=tuple(str(s) for s in r.scopes),
            expires_at_ms=int(r.expiresAtMs),
        )


@dataclass(frozen=True)
class Limits:
    memory_mb: int
    timeout_ms: int
    max_request_bytes: int
    max_response_bytes: int
    max_log_bytes: int
    # Fuel for one run, about one unit per wasm instruction; 0: unmetered.
    fuel: int = 0

    @classmethod
    def from_capnp(cls, r: Any) -> "Limits":
        return cls(
            memory_mb=int(r.memoryMb),
            timeout_ms=int(r.timeoutMs),
            max_request_bytes=int(r.maxRequestBytes),
            max_response_bytes=int(r.maxResponseBytes),
            max_log_bytes=int(r.maxLogBytes),
            fuel=int(r.fuel),
        )


@dataclass(frozen=True)
class FunctionInfo:
    """A deployed function (one version of it)."""

    name: str
    # 1 for the first deploy under this name, then one more per deploy.
    version: int
    # `sha256:<hex>` of the module.
    digest: str
    size: int
    limits: Limits
    env: dict[str, str] = field(default_factory=dict)
    labels: dict[str, str] = field(default_factory=dict)
    deployed_at_ms: int = 0
    # The earlier version a rollback restored as this one; None for a deploy.
    restored_from: Optional[int] = None

    @classmethod
    def from_capnp(cls, r: Any) -> "FunctionInfo":
        return cls(
            name=str(r.name),
            version=int(r.version),
            digest=str(r.digest),
            size=int(r.size),
            limits=Limits.from_capnp(r.limits),
            env=_pairs(r.env),
            labels=_pairs(r.labels),
            deployed_at_ms=int(r.deployedAtMs),
            restored_from=int(r.restoredFrom) or None,
        )


@dataclass(frozen=True)
class Response:
    """What an invoked function answered."""

    status: int
    # In the order the function sent them; a name may repeat.
    headers: list[tuple[str, str]]
    body: bytes
    # The guest's log tail when it failed; empty otherwise.
    log: str = ""

    def header(self, name: str, default: Optional[str] = None) -> Optional[str]:
        """The first header called ``name`` (case-insensitive), else ``default``."""
        lowered = name.lower()
        for key, value in self.headers:
            if key.lower() == lowered:
                return value
        return default

    @property
    def text(self) -> str:
        """The body decoded as UTF-8 (bad bytes replaced)."""
        return self.body.decode("utf-8", errors="replace")

    @classmethod
    def from_capnp(cls, r: Any) -> "Response":
        return cls(
            status=int(r.status),
            headers=[(str(kv.key), str(kv.value)) for kv in r.headers],
            body=bytes(r.body),
            log=str(r.log),
        )


@dataclass(frozen=True)
class Task:
    """One attempt of a job."""

    job: int
    # 1 for the first attempt.
    attempt: int
    function: str
    agent: str
    state: str
    reason: str
    started_at_ms: int
    # 0 while it runs.
    ended_at_ms: int

    @classmethod
    def from_capnp(cls, r: Any) -> "Task":
        return cls(
            job=int(r.job),
            attempt=int(r.attempt),
            function=str(r.function),
            agent=str(r.agent),
            state=str(r.state),
            reason=str(r.reason),
            started_at_ms=int(r.startedAtMs),
            ended_at_ms=int(r.endedAtMs),
        )


@dataclass(frozen=True)
class Job:
    """A durable job and its attempts."""

    id: int
    function: str
    # STAGING, STARTING, RUNNING, FINISHED, FAILED, KILLED, UNREACHABLE or GONE.
    state: str
    # Why it waits or why it failed; empty if nothing to say.
    reason: str
    # Its stdout once FINISHED; empty before.
    output: bytes
    # Whether it has ended (FINISHED, FAILED or KILLED).
    ended: bool
    attempts: list[Task] = field(default_factory=list)
    submitted_at_ms: int = 0

    @property
    def finished(self) -> bool:
        """Whether it ended successfully (state FINISHED)."""
        return self.state == "FINISHED"

    @classmethod
    def from_capnp(cls, r: Any) -> "Job":
        return cls(
            id=int(r.id),
            function=str(r.function),
            state=str(r.state),
            reason=str(r.reason),
            output=bytes(r.output),
            ended=bool(r.ended),
            attempts=[Task.from_capnp(t) for t in r.attempts],
            submitted_at_ms=int(r.submittedAtMs),
        )


@dataclass(frozen=True)
class Resources:
    slots: int
    memory_mb: int
    accelerators: int

    @classmethod
    def from_capnp(cls, r: Any) -> "Resources":
        return cls(
            slots=int(r.slots), memory_mb=int(r.memoryMb), accelerators=int(r.accelerators)
        )


@dataclass(frozen=True)
class NodeInfo:
    """An agent."""

    id: str
    # Its executor's Cap'n Proto address.
    rpc: str
    # `active` or `unreachable`.
    state: str
    resources: Resources
    allocated: Resources
    free: Resources
    attributes: dict[str, str] = field(default_factory=dict)

    @classmethod
    def from_capnp(cls, r: Any) -> "NodeInfo":
        return cls(
            id=str(r.id),
            rpc=str(r.rpc),
            state=str(r.state),
            resources=Resources.from_capnp(r.resources),
            allocated=Resources.from_capnp(r.allocated),
            free=Resources.from_capnp(r.free),
            attributes=_pairs(r.attributes),
        )


@dataclass(frozen=True)
class FrameworkInfo:
    id: str
    name: str
    role: str
    weight: float
    allocated: Resources
    # Its dominant share of the active agents' resources, 0 to 1.
    allocated_share: float

    @classmethod
    def from_capnp(cls, r: Any) -> "FrameworkInfo":
        return cls(
            id=str(r.id),
            name=str(r.name),
            role=str(r.role),
            weight=float(r.weight),
            allocated=Resources.from_capnp(r.allocated),
            allocated_share=float(r.allocatedShare),
        )


@dataclass(frozen=True)
class Member:
    id: int
    # Its node (Cap'n Proto) and HTTP addresses.
    rpc: str
    http: str
    voter: bool

    @classmethod
    def from_capnp(cls, r: Any) -> "Member":
        return cls(id=int(r.id), rpc=str(r.rpc), http=str(r.http), voter=bool(r.voter))


@dataclass(frozen=True)
class ClusterStatus:
    """The Raft cluster as the server the client talks to sees it."""

    # The server answering.
    id: int
    # Leader, Follower, Candidate or Learner (as the server spells it).
    state: str
    # 0: no leader known.
    leader_id: int
    term: int
    members: list[Member]
    last_log_index: int
    applied_index: int

    @classmethod
    def from_capnp(cls, r: Any) -> "ClusterStatus":
        return cls(
            id=int(r.id),
            state=str(r.state),
            leader_id=int(r.leaderId),
            term=int(r.term),
            members=[Member.from_capnp(m) for m in r.members],
            last_log_index=int(r.lastLogIndex),
            applied_index=int(r.appliedIndex),
        )


# The schema's union member names, as `Event.kind`.
_KINDS = {
    "deployed": "deployed",
    "deleted": "deleted",
    "taskChanged": "task_changed",
    "nodeJoined": "node_joined",
    "nodeLost": "node_lost",
    "leaderChanged": "leader_changed",
    "missed": "missed",
    "ended": "ended",
}


@dataclass(frozen=True)
class Event:
    """Something that happened in the cluster (see ``Client.watch``).

    ``kind`` says which fields are set:

    - ``deployed``: ``function`` (the new version's :class:`FunctionInfo`)
    - ``deleted``: ``name`` (the function removed)
    - ``task_changed``: ``job``, ``attempt`` (0 when the change is the job's alone),
      ``state``
    - ``node_joined`` / ``node_lost``: ``node`` (the agent's id)
    - ``leader_changed``: ``leader_id`` (0: none known), ``term``
    - ``missed``: ``missed`` (how many events were dropped because the client fell
      behind)
    - ``ended``: ``reason`` (the server ended the subscription: its token was revoked
      or expired; no events follow)

    An event kind this client does not know (a newer server) has ``kind`` set to the
    schema's name for it, or ``unknown``.
    """

    kind: str
    # When the server saw it, ms since the Unix epoch.
    at_ms: int
    function: Optional[FunctionInfo] = None
    name: Optional[str] = None
    job: Optional[int] = None
    attempt: Optional[int] = None
    state: Optional[str] = None
    node: Optional[str] = None
    leader_id: Optional[int] = None
    term: Optional[int] = None
    missed: Optional[int] = None
    reason: Optional[str] = None

    @classmethod
    def from_capnp(cls, r: Any) -> "Event":
        at_ms = int(r.atMs)
        try:
            which = str(r.which())
        except Exception:  # a union member newer than the loaded schema
            return cls(kind="unknown", at_ms=at_ms)
        kind = _KINDS.get(which, which)
        if which == "deployed":
            return cls(kind, at_ms, function=FunctionInfo.from_capnp(r.deployed))
        if which == "deleted":
            return cls(kind, at_ms, name=str(r.deleted))
        if which == "taskChanged":
            t = r.taskChanged
            return cls(kind, at_ms, job=int(t.job), attempt=int(t.attempt), state=str(t.state))
        if which == "nodeJoined":
            return cls(kind, at_ms, node=str(r.nodeJoined))
        if which == "nodeLost":
            return cls(kind, at_ms, node=str(r.nodeLost))
        if which == "leaderChanged":
            l = r.leaderChanged
            return cls(kind, at_ms, leader_id=int(l.leaderId), term=int(l.term))
        if which == "missed":
            return cls(kind, at_ms, missed=int(r.missed))
        if which == "ended":
            return cls(kind, at_ms, reason=str(r.ended))
        return cls(kind, at_ms)
