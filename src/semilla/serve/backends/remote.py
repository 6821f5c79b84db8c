"""Remote services as backends, over httpx: any OpenAI-compatible API (OpenAI, DeepSeek, Ollama's
/v1, llama.cpp's server, vLLM, another semilla) and Anthropic's Messages API.

A provider's URL and key come from the admin's providers file only; a request names a model,
never a URL. Whatever goes wrong upstream becomes a `ProviderError`, retryable (connection
error, timeout, 5xx, 429, an answer not in the API's shape) or not (401 and other 4xx); a
fallback chain moves on after a retryable one. A key never appears in an error or a log line.
"""

from __future__ import annotations

import asyncio
import email.utils
import json
import time
from abc import abstractmethod
from collections.abc import AsyncIterator, Iterator

import httpx

from semilla.serve.backends.base import Backend
from semilla.serve.errors import APIError
from semilla.serve.providers import ProviderConfig
from semilla.serve.serving import ChoiceDelta, Generation, GenerationCall, TokenInfo, settings_or_400

ANTHROPIC_VERSION = "2023-06-01"
ERROR_DETAIL_CHARS = 200
# One stream piece: (choice index, text, finish_reason or None, token logprobs)
Piece = tuple[int, str, str | None, list[TokenInfo]]


class ProviderError(APIError):
    """A provider did not answer. `retryable`: the next provider of a chain may answer instead;
    `retry_after`: seconds the provider asked to be left alone; `reason` labels the metric."""

    def __init__(
        self,
        provider: str,
        message: str,
        *,
        status: int = 502,
        retryable: bool = True,
        retry_after: float | None = None,
        reason: str = "status",
    ):
        code = "provider_timeout" if status == 504 else "provider_error"
        super().__init__(status, f"provider {provider!r}: {message}", type="provider_error", code=code)
        self.provider, self.retryable, self.retry_after, self.reason = (
            provider,
            retryable,
            retry_after,
            reason,
        )


def retry_after_s(value: str | None) -> float | None:
    """Retry-After in seconds: a number, or an HTTP date."""
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


def error_detail(raw: bytes) -> str:
    """The message of an upstream error body: OpenAI's/Anthropic's error.message, else its text."""
    try:
        data = json.loads(raw)
        message = data["error"]["message"] if isinstance(data["error"], dict) else data["error"]
        return str(message)
    except (ValueError, KeyError, TypeError):
        text = raw.decode("utf-8", "replace").strip()
        return "an HTML page" if text[:1] == "<" else text


class Upstream:
    """One configured remote provider: its URL, key, timeouts and connection pool."""

    def __init__(self, cfg: ProviderConfig):
        self.cfg, self.name = cfg, cfg.name
        self._client: httpx.AsyncClient | None = None

    def _headers(self) -> dict[str, str]:
        key = self.cfg.api_key.value if self.cfg.api_key else ""
        if self.cfg.kind == "anthropic":
            return {"anthropic-version": ANTHROPIC_VERSION, **({"x-api-key": key} if key else {})}
        return {"authorization": f"Bearer {key}"} if key else {}

    def client(self) -> httpx.AsyncClient:
        """The provider's connection pool, made on first use (in the server's event loop)."""
        if self._client is None:
            timeout = httpx.Timeout(self.cfg.timeout_s, connect=self.cfg.connect_timeout_s)
            self._client = httpx.AsyncClient(
                base_url=self.cfg.base_url.rstrip("/") + "/",
                headers=self._headers(),
                timeout=timeout,
                follow_redirects=False,  # the URL is the admin's: a redirect never takes a request elsewhere
                limits=httpx.Limits(max_connections=self.cfg.max_connections),
            )
        return self._client

    async def aclose(self) -> None:
        if self._client is not None:
            await self._client.aclose()
            self._client = None

    def redact(self, text: str) -> str:
        key = self.cfg.api_key.value if self.cfg.api_key else ""
        text = text.replace(key, "***") if key else text
        return " ".join(text.split())[:ERROR_DETAIL_CHARS]

    def _transport_error(self, e: httpx.HTTPError) -> ProviderError:
        if isinstance(e, httpx.TimeoutException):
            return ProviderError(
                self.name, f"no answer within {self.cfg.timeout_s:g} s", status=504, reason="timeout"
            )
        return ProviderError(self.name, f"connection failed ({type(e).__name__})", reason="connection")

    async def open(self, path: str, body: dict, stream: bool) -> httpx.Response:
        """POST `body` to the provider; the response (its body unread when streaming) or a
        ProviderError for a transport failure or an error status."""
        client = self.client()
        try:
            response = await client.send(client.build_request("POST", path, json=body), stream=True)
        except httpx.HTTPError as e:
            raise self._transport_error(e) from None
        if not response.is_success:
            try:
                raw = await response.aread()
            except httpx.HTTPError:
                raw = b""
            finally:
                await response.aclose()
            raise self._status_error(response.status_code, response.headers.get("retry-after"), raw)
        if not stream:
            try:
                await response.aread()
            except httpx.HTTPError as e:
                raise self._transport_error(e) from None
            finally:
                await response.aclose()
        return response

    def _status_error(self, status: int, retry_after: str | None, raw: bytes) -> ProviderError:
        detail = self.redact(error_detail(raw))
        if status in (408, 429) or status >= 500:
            return ProviderError(
                self.name, f"answered {status}: {detail}", retry_after=retry_after_s(retry_after)
            )
        return ProviderError(self.name, f"refused the request ({status}): {detail}", retryable=False)

    def json(self, response: httpx.Response) -> dict:
        """The response's JSON object; anything else (HTML, a cut body) is a ProviderError."""
        try:
            data = json.loads(response.content)
        except ValueError:
            what = "an HTML page" if response.content.lstrip()[:1] == b"<" else "invalid JSON"
            raise ProviderError(self.name, f"answered {what}", reason="invalid") from None
        if not isinstance(data, dict):
            raise ProviderError(self.name, "answered JSON that is not an object", reason="invalid")
        return data

    async def events(self, response: httpx.Response) -> AsyncIterator[tuple[str, str]]:
        """(event, data) of a server-sent event stream; closes the response at its end."""
        kind = response.headers.get("content-type", "").split(";")[0].strip()
        try:
            if kind != "text/event-stream":
                raise ProviderError(
                    self.name, f"answered {kind or 'no content type'}, not a stream", reason="invalid"
                )
            event, data = "", []
            async for line in response.aiter_lines():
                if not line:
                    if data:
                        yield event, "\n".join(data)
                    event, data = "", []
                    continue
                field, _, value = line.partition(":")
                value = value[1:] if value.startswith(" ") else value
                if field == "event":
                    event = value
                elif field == "data":
                    data.append(value)
            if data:
                yield event, "\n".join(data)
        except httpx.HTTPError as e:
            raise self._transport_error(e) from None
        finally:
            await response.aclose()


def _finish(reason: str | None, kind: str) -> str | None:
    """The provider's finish or stop reason as OpenAI names it."""
    if reason is None:
        return None
    if kind == "anthropic":
        return "length" if reason == "max_tokens" else "stop"
    return reason if reason in ("stop", "length", "content_filter") else "stop"


def _tokens(logprobs: dict | None) -> list[TokenInfo]:
    """OpenAI chat logprobs ({"content": [{token, logprob, top_logprobs}]}) as TokenInfo."""
    content = (logprobs or {}).get("content") or []
    return [
        TokenInfo(t["token"], t["logprob"], [(a["token"], a["logprob"]) for a in t.get("top_logprobs") or []])
        for t in content
    ]


class RemoteGeneration(Generation):
    """One request to a remote provider: a single POST, or an event stream read as it comes."""

    def __init__(
        self, backend: RemoteBackend, n_choices: int, call: GenerationCall, path: str, body: dict, texts: list
    ):
        super().__init__(backend.id, n_choices, call)
        self.backend, self.upstream, self.path, self.body = backend, backend.upstream, path, body
        self.texts = texts
        self.completion_tokens = 0
        self._response: httpx.Response | None = None

    async def start(self) -> None:
        self._response = await self.upstream.open(self.path, self.body, stream=self.call.stream)

    def cancel(self) -> None:
        if self._response is not None and not self._response.is_closed:
            asyncio.ensure_future(self._response.aclose())

    async def deltas(self) -> AsyncIterator[ChoiceDelta]:
        assert self._response is not None, "start() first"
        try:
            async for index, text, finish, tokens in self._read():
                delta = self._accept(index, text, finish, tokens)
                if delta is not None:
                    yield delta
            if any(c.finish_reason is None for c in self.choices):
                raise ProviderError(
                    self.upstream.name, "the answer ended before it was complete", reason="invalid"
                )
        except ProviderError:
            self.failed = True
            raise
        finally:
            self._settle_tokens()

    async def _read(self) -> AsyncIterator[Piece]:
        parse = self.backend.parse
        if not self.call.stream:
            for piece in self._checked(parse, self.upstream.json(self._response)):
                yield piece
            return
        events = self.upstream.events(self._response)
        try:
            async for _, data in events:
                if data == "[DONE]":
                    break
                try:
                    payload = json.loads(data)
                except ValueError:
                    raise ProviderError(
                        self.upstream.name, "sent an event that is not JSON", reason="invalid"
                    ) from None
                for piece in self._checked(self.backend.parse_event, payload):
                    yield piece
        finally:
            await events.aclose()  # the connection goes back to the pool now, not when collected

    def _checked(self, parse, payload) -> list[Piece]:
        """The pieces `parse` finds in an answer or event; a shape it cannot read is a ProviderError."""
        if isinstance(payload, dict) and payload.get("error") is not None:
            detail = self.upstream.redact(error_detail(json.dumps(payload).encode()))
            raise ProviderError(self.upstream.name, f"sent an error: {detail}", reason="status")
        try:
            pieces = list(parse(payload, self))
        except (KeyError, TypeError, ValueError, AttributeError):
            raise ProviderError(
                self.upstream.name, "answered in an unexpected shape", reason="invalid"
            ) from None
        if any(not 0 <= p[0] < len(self.choices) for p in pieces):
            raise ProviderError(
                self.upstream.name, "answered a choice it was not asked for", reason="invalid"
            )
        return pieces

    def _accept(
        self, index: int, text: str, finish: str | None, tokens: list[TokenInfo]
    ) -> ChoiceDelta | None:
        """A piece as a delta, through the content filter; None once its choice has ended."""
        choice = self.choices[index]
        if choice.finish_reason:
            return None
        delta = ChoiceDelta(index, text, list(tokens))
        choice.finish_reason = finish
        if self.screen is not None:
            self._screen(choice, delta)
        delta.finish_reason = choice.finish_reason
        choice.text += delta.text
        choice.tokens.extend(tokens)
        if not delta.text and not delta.finish_reason and not delta.tokens:
            return None
        return delta

    def _settle_tokens(self) -> None:
        """The provider counts tokens for the whole answer: choice 0 carries its count."""
        if self.choices:
            self.choices[0].n_tokens = self.completion_tokens
        if self.on_tokens is not None:
            self.on_tokens(self.completion_tokens)


def refuse_token_ids(model: str, prompt: list, call: GenerationCall) -> None:
    """Token ids are a local model's own: elsewhere they mean nothing."""
    if prompt and not isinstance(prompt[0], str):
        raise APIError(
            400, f"a prompt of token ids needs a local model, not {model!r}", param=call.prompt_param
        )


class RemoteBackend(Backend):
    """`provider/model` of a remote service; subclasses speak its API."""

    def __init__(self, upstream: Upstream, model: str):
        super().__init__(f"{upstream.name}/{model}")
        self.upstream, self.model = upstream, model
        self.owned_by = upstream.name

    def _generation(
        self, n_choices: int, call: GenerationCall, path: str, body: dict, texts
    ) -> RemoteGeneration:
        settings_or_400(call.cfg)
        for param, asked in (
            (call.output and call.output.param, call.output),
            ("logit_bias", call.logit_bias),
        ):
            if asked:  # token masks and biases need the model's own tokens
                raise APIError(400, f"{param} needs a local model, not {self.id!r}", param=param)
        return RemoteGeneration(self, n_choices, call, path, body, texts)

    @abstractmethod
    def parse(self, data: dict, gen: RemoteGeneration) -> Iterator[Piece]:
        """The pieces of a whole (non-streamed) response body of this API."""

    @abstractmethod
    def parse_event(self, data: dict, gen: RemoteGeneration) -> Iterator[Piece]:
        """The pieces of one streamed event of this API."""


class OpenAIBackend(RemoteBackend):
    """An OpenAI-compatible service: /chat/completions and /completions under its base URL."""

    def _sampling(self, call: GenerationCall) -> dict:
        cfg = call.cfg
        body = {"model": self.model, "max_tokens": cfg.max_new_tokens, "temperature": cfg.temperature,
                "top_p": cfg.top_p, "n": call.n, "stream": call.stream}  # fmt: skip
        if cfg.stop:
            body["stop"] = cfg.stop
        if cfg.seed is not None:
            body["seed"] = cfg.seed
        for name in ("frequency_penalty", "presence_penalty"):
            if getattr(cfg, name):
                body[name] = getattr(cfg, name)
        if call.stream:
            body["stream_options"] = {"include_usage": True}
        return body

    def chat(self, messages: list[dict], call: GenerationCall) -> RemoteGeneration:
        body = {**self._sampling(call), "messages": messages}
        if call.cfg.logprobs is not None:
            body |= {"logprobs": True, "top_logprobs": call.cfg.logprobs}
        return self._generation(call.n, call, "chat/completions", body, messages)

    def complete(self, prompt: list[str] | list[int], call: GenerationCall) -> RemoteGeneration:
        refuse_token_ids(self.id, prompt, call)
        body = {**self._sampling(call), "prompt": prompt[0] if len(prompt) == 1 else list(prompt)}
        return self._generation(len(prompt) * call.n, call, "completions", body, list(prompt))

    def _usage(self, data: dict, gen: RemoteGeneration) -> None:
        usage = data.get("usage") or {}
        gen.prompt_tokens = int(usage.get("prompt_tokens") or gen.prompt_tokens)
        gen.completion_tokens = int(usage.get("completion_tokens") or gen.completion_tokens)

    def parse(self, data: dict, gen: RemoteGeneration) -> Iterator[Piece]:
        self._usage(data, gen)
        for c in data["choices"]:
            text = (c["message"].get("content") if "message" in c else c["text"]) or ""
            yield (
                c["index"],
                text,
                _finish(c.get("finish_reason") or "stop", "openai"),
                _tokens(c.get("logprobs")),
            )

    def parse_event(self, data: dict, gen: RemoteGeneration) -> Iterator[Piece]:
        self._usage(data, gen)
        for c in data.get("choices") or []:
            text = ((c["delta"] or {}).get("content") if "delta" in c else c.get("text")) or ""
            logprobs = c.get("logprobs") if "delta" in c else None
            yield c["index"], text, _finish(c.get("finish_reason"), "openai"), _tokens(logprobs)


class AnthropicBackend(RemoteBackend):
    """Anthropic's Messages API: /v1/messages under its base URL; one choice per request."""

    def chat(self, messages: list[dict], call: GenerationCall) -> RemoteGeneration:
        if call.n != 1:
            raise APIError(400, f"n={call.n}: {self.id} (Anthropic's API) answers one choice", param="n")
        if call.cfg.logprobs is not None:
            raise APIError(400, f"{self.id} (Anthropic's API) gives no logprobs", param="logprobs")
        cfg = call.cfg
        system = "\n\n".join(m["content"] for m in messages if m["role"] == "system")
        body = {
            "model": self.model,
            "max_tokens": cfg.max_new_tokens,
            "messages": [
                {"role": m["role"], "content": m["content"]} for m in messages if m["role"] != "system"
            ],
            "temperature": min(cfg.temperature, 1.0),  # Anthropic's range is [0, 1]
            "stream": call.stream,
        }
        if system:
            body["system"] = system
        if cfg.top_p < 1:
            body["top_p"] = cfg.top_p
        if cfg.top_k:
            body["top_k"] = cfg.top_k
        if cfg.stop:
            body["stop_sequences"] = cfg.stop
        return self._generation(1, call, "v1/messages", body, messages)

    def complete(self, prompt: list[str] | list[int], call: GenerationCall) -> RemoteGeneration:
        """A text prompt becomes one user message (the Messages API has no plain completion)."""
        refuse_token_ids(self.id, prompt, call)
        if len(prompt) != 1:
            raise APIError(400, f"{self.id} (Anthropic's API) takes one prompt", param=call.prompt_param)
        gen = self.chat([{"role": "user", "content": prompt[0]}], call)
        gen.texts = list(prompt)
        return gen

    def parse(self, data: dict, gen: RemoteGeneration) -> Iterator[Piece]:
        usage = data.get("usage") or {}
        gen.prompt_tokens = int(usage.get("input_tokens") or 0)
        gen.completion_tokens = int(usage.get("output_tokens") or 0)
        text = "".join(block["text"] for block in data["content"] if block.get("type") == "text")
        yield 0, text, _finish(data.get("stop_reason") or "end_turn", "anthropic"), []

    def parse_event(self, data: dict, gen: RemoteGeneration) -> Iterator[Piece]:
        kind = data["type"]
        if kind == "message_start":
            gen.prompt_tokens = int((data["message"].get("usage") or {}).get("input_tokens") or 0)
        elif kind == "content_block_delta" and data["delta"].get("type") == "text_delta":
            yield 0, data["delta"]["text"], None, []
        elif kind == "message_delta":
            gen.completion_tokens = int((data.get("usage") or {}).get("output_tokens") or 0)
            stop = data["delta"].get("stop_reason")
            if stop:
                yield 0, "", _finish(stop, "anthropic"), []


BACKENDS = {"openai": OpenAIBackend, "anthropic": AnthropicBackend}
