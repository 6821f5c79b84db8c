"""semilla's gRPC API (`semilla.proto` beside this file), served by `semilla serve --grpc-port`.

The message classes and stubs are made from the .proto when first asked for (grpcio-tools'
compiler, in memory): nothing generated is kept in the source tree, and the .proto is the one
description of the API, for Python clients as for any other language's.

    from semilla.serve.rpc import stubs
    pb, services = stubs()
    client = services.SemillaStub(grpc.insecure_channel("127.0.0.1:50051"))
"""

from __future__ import annotations

import functools
from types import ModuleType

PROTO = "semilla/serve/rpc/semilla.proto"  # found on sys.path, where the semilla package lies
SERVICE = "semilla.v1.Semilla"


@functools.cache
def stubs() -> tuple[ModuleType, ModuleType]:
    """(messages, services): semilla.proto's message classes and its stub and servicer classes."""
    import grpc

    return grpc.protos_and_services(PROTO)
