"""A Python client for wafer's public Cap'n Proto API (``capnp/cluster.capnp``).

    import asyncio
    from wafer_client import Client

    async def main():
        async with await Client.connect("127.0.0.1:7001", token) as client:
            print(await client.list_functions())

    asyncio.run(main())
"""

from ._schema import schema, schema_path
from .client import MAX_CHUNK_BYTES, Client, Subscription
from .errors import WaferError
from .types import (
    ClusterStatus,
    Event,
    FrameworkInfo,
    FunctionInfo,
    Job,
    Limits,
    Member,
    NodeInfo,
    Resources,
    Response,
    Task,
    TokenInfo,
)

__version__ = "0.1.0"

__all__ = [
    "Client",
    "ClusterStatus",
    "Event",
    "FrameworkInfo",
    "FunctionInfo",
    "Job",
    "Limits",
    "MAX_CHUNK_BYTES",
    "Member",
    "NodeInfo",
    "Resources",
    "Response",
    "Subscription",
    "Task",
    "TokenInfo",
    "WaferError",
    "schema",
    "schema_path",
]
