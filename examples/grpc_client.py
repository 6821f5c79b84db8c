"""A Python client of semilla's gRPC API (`semilla serve --grpc-port 50051`).

    pip install 'semilla[grpc]'    # grpcio, and grpcio-tools to read the .proto
    python examples/grpc_client.py --address 127.0.0.1:50051 --key sk-...   # --key: unless open

Clients in other languages compile src/semilla/serve/rpc/semilla.proto with their own protoc.
"""

from __future__ import annotations

import argparse

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from semilla.serve.rpc import stubs

pb, services = stubs()  # message classes and stubs, made from semilla.proto


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--address", default="127.0.0.1:50051")
    parser.add_argument("--key", help="an API key or token (metadata authorization: Bearer ...)")
    parser.add_argument("--model", default="", help="default: the server's default model")
    parser.add_argument("--prompt", default="En un lugar de la Mancha")
    args = parser.parse_args()
    metadata = [("authorization", f"Bearer {args.key}")] if args.key else []

    with grpc.insecure_channel(args.address) as channel:
        health = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service="semilla.v1.Semilla")
        )
        print("health:", health_pb2.HealthCheckResponse.ServingStatus.Name(health.status))
        client = services.SemillaStub(channel)
        models = client.ListModels(pb.ListModelsRequest(), metadata=metadata).models
        print("models:", ", ".join(m.id for m in models))

        request = pb.ChatRequest(
            model=args.model,
            messages=[pb.Message(role="user", content=args.prompt)],
            sampling=pb.Sampling(max_tokens=48, temperature=0.8, seed=7),
        )
        answer = client.Chat(request, metadata=metadata)  # unary: the whole answer
        print("chat:", answer.choices[0].text, f"({answer.usage.completion_tokens} tokens)")

        print("stream: ", end="")
        try:
            for chunk in client.ChatStream(request, metadata=metadata):  # the same text, as it comes
                print(chunk.text, end="", flush=True)
        except grpc.RpcError as e:  # UNAUTHENTICATED, INVALID_ARGUMENT, RESOURCE_EXHAUSTED, ...
            raise SystemExit(f"\n{e.code().name}: {e.details()}") from None
        print()


if __name__ == "__main__":
    main()
