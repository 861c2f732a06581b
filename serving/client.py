"""A small synchronous client for meshserve's gRPC API.

    with Client("localhost:50051") as c:
        for resp in c.generate(messages=[{"role": "user", "content": "Hi"}], max_tokens=32):
            print(resp.text, end="")
"""

from __future__ import annotations

import json
from typing import Iterator

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from meshserve.serving.proto.meshserve.v1 import generation_pb2 as pb
from meshserve.serving.proto.meshserve.v1 import generation_pb2_grpc as pb_grpc

SAMPLING_FIELDS = {f.name for f in pb.SamplingOptions.DESCRIPTOR.fields}


class _Bearer(grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor,
              grpc.StreamUnaryClientInterceptor, grpc.StreamStreamClientInterceptor):
    """Adds `authorization: Bearer <token>` to every call of a channel."""

    def __init__(self, token: str):
        self._header = ("authorization", f"Bearer {token}")

    def _details(self, details):
        metadata = list(details.metadata or ()) + [self._header]
        return _Details(details.method, details.timeout, metadata, details.credentials, details.wait_for_ready,
                        details.compression)

    def intercept_unary_unary(self, continuation, details, request):
        return continuation(self._details(details), request)

    def intercept_unary_stream(self, continuation, details, request):
        return continuation(self._details(details), request)

    def intercept_stream_unary(self, continuation, details, requests):
        return continuation(self._details(details), requests)

    def intercept_stream_stream(self, continuation, details, requests):
        return continuation(self._details(details), requests)


class _Details(grpc.ClientCallDetails):
    def __init__(self, method, timeout, metadata, credentials, wait_for_ready, compression):
        self.method, self.timeout, self.metadata = method, timeout, metadata
        self.credentials, self.wait_for_ready, self.compression = credentials, wait_for_ready, compression


def channel(target: str, token: str | None = None, tls_ca: str | None = None,
            max_message_bytes: int = 64 * 2**20) -> grpc.Channel:
    """A channel to a meshserve server, with TLS (given the CA) and the bearer token on every call."""
    options = [("grpc.max_receive_message_length", max_message_bytes),
               ("grpc.max_send_message_length", max_message_bytes)]
    if tls_ca is not None:
        creds = grpc.ssl_channel_credentials(open(tls_ca, "rb").read())
        ch = grpc.secure_channel(target, creds, options=options)
    else:
        ch = grpc.insecure_channel(target, options=options)
    return grpc.intercept_channel(ch, _Bearer(token)) if token else ch


class Client:
    def __init__(self, target: str, token: str | None = None, tls_ca: str | None = None,
                 max_message_bytes: int = 64 * 2**20):
        self.channel = channel(target, token, tls_ca, max_message_bytes)
        self.stub = pb_grpc.GenerationStub(self.channel)
        self.health_stub = health_pb2_grpc.HealthStub(self.channel)

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self.channel.close()

    @staticmethod
    def request(text: str = "", token_ids=(), messages=(), priority: int = 0, request_id: str = "",
                tools=(), tool_choice: str = "", parallel_tool_calls: bool | None = None,
                **sampling) -> pb.GenerateRequest:
        """`tools`: OpenAI-shaped tools ({"type": "function", "function": {"name", "description",
        "parameters"}}); `choice=[...]` and `json_schema=` (a dict or JSON text) for constraints."""
        unknown = set(sampling) - SAMPLING_FIELDS
        if unknown:
            raise TypeError(f"unknown sampling option(s) {', '.join(sorted(unknown))}")
        if isinstance(sampling.get("choice"), (list, tuple)):
            sampling["choice"] = pb.Choices(choices=list(sampling["choice"]))
        if isinstance(sampling.get("json_schema"), dict):
            sampling["json_schema"] = json.dumps(sampling["json_schema"])
        specs = [t["function"] for t in tools]
        return pb.GenerateRequest(
            text=text, token_ids=list(token_ids), priority=priority, request_id=request_id,
            messages=[pb.ChatMessage(role=m["role"], content=m.get("content") or "",
                                     tool_call_id=m.get("tool_call_id", ""),
                                     tool_calls=[pb.ToolCall(id=c.get("id", ""), name=c["function"]["name"],
                                                             arguments=c["function"].get("arguments", ""))
                                                 for c in m.get("tool_calls") or ()]) for m in messages],
            tools=[pb.Tool(name=f["name"], description=f.get("description", ""),
                           parameters=json.dumps(f["parameters"]) if f.get("parameters") is not None else "")
                   for f in specs],
            tool_choice=tool_choice, parallel_tool_calls=parallel_tool_calls,
            sampling=pb.SamplingOptions(**{k: v for k, v in sampling.items() if v is not None}))

    def generate(self, text: str = "", token_ids=(), messages=(), *, timeout: float | None = None,
                 **kwargs) -> Iterator[pb.GenerateResponse]:
        """Stream responses; raises grpc.RpcError with the server's status on failure."""
        return self.stub.Generate(self.request(text, token_ids, messages, **kwargs), timeout=timeout)

    def tokenize(self, text: str = "", messages=()) -> list[int]:
        req = pb.TokenizeRequest(text=text, messages=[pb.ChatMessage(**m) for m in messages])
        return list(self.stub.Tokenize(req).token_ids)

    def detokenize(self, token_ids) -> str:
        return self.stub.Detokenize(pb.DetokenizeRequest(token_ids=list(token_ids))).text

    def model_info(self) -> pb.ModelInfoResponse:
        return self.stub.ModelInfo(pb.ModelInfoRequest())

    def health(self, service: str = "", timeout: float = 5.0) -> str:
        """SERVING, NOT_SERVING, … (the health status name)."""
        resp = self.health_stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout)
        return health_pb2.HealthCheckResponse.ServingStatus.Name(resp.status)

    def wait_serving(self, timeout: float = 600.0, poll_s: float = 0.2) -> None:
        import time

        deadline = time.monotonic() + timeout
        while True:
            try:
                if self.health() == "SERVING":
                    return
            except grpc.RpcError:
                pass  # not listening yet
            if time.monotonic() > deadline:
                raise TimeoutError(f"the server was not SERVING within {timeout:.0f} s")
            time.sleep(poll_s)
