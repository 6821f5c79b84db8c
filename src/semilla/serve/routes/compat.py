"""The seeds' own endpoints: robo-poet's /v1/generate and simpleIA's /predict, over the same backends."""

from __future__ import annotations

import math
from collections.abc import AsyncIterator

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse

from semilla.config import GenerateConfig
from semilla.serve.protocol import GenerateRequest, PredictRequest
from semilla.serve.routes.openai import JSON_BODY, generation_call, stream_guard
from semilla.serve.serving import Result, new_id, run_to_end

router = APIRouter(tags=["compat"])


def _perplexity(result: Result) -> float | None:
    logprobs = [t.logprob for c in result.choices for t in c.tokens]
    if not logprobs:
        return None
    return round(math.exp(-sum(logprobs) / len(logprobs)), 4)


async def _start(request: Request, body, text: str, cfg_kwargs: dict, n: int, route: str, stream: bool):
    """Authorize, fit the prompt, start; a max_length the client did not send is shortened to
    what the context leaves instead of refused."""
    state, hooks = request.app.state.semilla, request.app.state.hooks
    principal = await hooks.authorize(request, "models")
    backend = state.backend(body.model)
    hooks.screen_prompt(principal, text)
    cfg = GenerateConfig(max_new_tokens=body.max_length, truncate="error", logprobs=0, **cfg_kwargs)
    asked = "max_length" in body.model_fields_set
    call = generation_call(
        request, principal, cfg, asked, n, stream=stream, param="max_length",
        prompt_param="text" if route == "generate" else "prompt",
    )  # fmt: skip
    gen = backend.complete([text], call)
    await gen.start()

    def record(result: Result, rid: str) -> None:
        hooks.record_completion(principal, result.record(rid, gen.model, route, text))

    return gen, record


@router.post("/v1/generate", dependencies=JSON_BODY)
async def generate(body: GenerateRequest, request: Request) -> dict:
    """robo-poet: {text, max_length, temperature, top_p, top_k, num_samples, stop_tokens}."""
    sampling = dict(
        temperature=body.temperature,
        top_p=body.top_p,
        top_k=body.top_k,
        stop=body.stop_tokens,
        seed=body.seed,
    )
    gen, record = await _start(request, body, body.text, sampling, body.num_samples, "generate", False)
    result = await run_to_end(request, gen)
    rid = new_id("gen")
    record(result, rid)
    return {
        "id": rid,
        "generated_text": [c.text for c in result.choices],
        "metadata": {
            "model_version": gen.model,
            "generation_time_ms": round(1000 * result.elapsed_s),
            "tokens_generated": result.completion_tokens,
            "perplexity": _perplexity(result),
            "finish_reasons": [c.finish_reason for c in result.choices],
        },
        "status": "success",
    }


@router.post("/predict", dependencies=JSON_BODY)
async def predict(body: PredictRequest, request: Request):
    """simpleIA: {prompt, max_length, num_return_sequences, temperature, stream}."""
    sampling = dict(temperature=body.temperature, seed=body.seed)
    n = body.num_return_sequences
    gen, record = await _start(request, body, body.prompt, sampling, n, "predict", body.stream)
    rid = new_id("pred")
    if body.stream:

        def make_chunk(d) -> dict | None:
            if not d.text and not d.finish_reason:
                return None
            return {"index": d.index, "token": d.text, "finish_reason": d.finish_reason}

        async def events() -> AsyncIterator[str]:
            async for chunk in stream_guard(gen.deltas(), make_chunk, list):
                yield chunk
            record(gen.finish(), rid)

        return StreamingResponse(events(), media_type="text/event-stream", headers=gen.headers)
    result = await run_to_end(request, gen)
    record(result, rid)
    texts = [c.text for c in result.choices]
    return {
        "id": rid,
        "model": gen.model,
        "prompt": body.prompt,
        "response": texts[0],
        "responses": texts,
        "usage": result.usage(),
    }
