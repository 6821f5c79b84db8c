"""The seeds' own endpoints: robo-poet's /v1/generate and simpleIA's /predict, over the same engine."""

from __future__ import annotations

import json
import math
from collections.abc import AsyncIterator

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse

from semilla.config import GenerateConfig
from semilla.serve.protocol import GenerateRequest, PredictRequest
from semilla.serve.routes.openai import JSON_BODY, settings_or_400
from semilla.serve.serving import Job, Result, fit_max_tokens, new_id, run_to_end

router = APIRouter(tags=["compat"])


def _perplexity(result: Result) -> float | None:
    logprobs = [t.logprob for c in result.choices for t in c.tokens]
    if not logprobs:
        return None
    return round(math.exp(-sum(logprobs) / len(logprobs)), 4)


async def _start(
    request: Request, model: str | None, text: str, max_length: int, cfg_kwargs: dict, n: int, route: str
):
    state, hooks = request.app.state.semilla, request.app.state.hooks
    principal = await hooks.authorize(request, "models")
    served = state.model(model)
    hooks.screen_prompt(principal, text)
    prompt = served.lm.tokenizer.encode(text) or [served.lm.tokenizer.bos_id]
    text_param = "text" if route == "generate" else "prompt"
    max_new = fit_max_tokens(served, len(prompt), max_length, max_length, "max_length", text_param)
    cfg = settings_or_400(
        lambda: GenerateConfig(max_new_tokens=max_new, truncate="error", logprobs=0, **cfg_kwargs)
    )
    job = Job(state.engine, served, [prompt], cfg, n, lambda t: hooks.screen_output(t))
    job.submit()

    def record(result: Result, rid: str) -> None:
        hooks.record_tokens(principal, result.completion_tokens)
        hooks.record_completion(principal, result.record(rid, served.id, route, text))

    return served, job, record


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
    served, job, record = await _start(
        request, body.model, body.text, body.max_length, sampling, body.num_samples, "generate"
    )
    result = await run_to_end(request, job)
    rid = new_id("gen")
    record(result, rid)
    return {
        "id": rid,
        "generated_text": [c.text for c in result.choices],
        "metadata": {
            "model_version": served.id,
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
    served, job, record = await _start(
        request, body.model, body.prompt, body.max_length, sampling, n, "predict"
    )
    rid = new_id("pred")
    if body.stream:

        async def events() -> AsyncIterator[str]:
            try:
                async for d in job.deltas():
                    if d.text or d.finish_reason:
                        payload = {"index": d.index, "token": d.text, "finish_reason": d.finish_reason}
                        yield f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"
                record(job.finish(), rid)
            except Exception as e:  # noqa: BLE001 - mid-stream: an error event, then the end
                yield f"data: {json.dumps({'error': {'message': str(e), 'type': 'server_error'}})}\n\n"
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")
    result = await run_to_end(request, job)
    record(result, rid)
    texts = [c.text for c in result.choices]
    return {
        "id": rid,
        "model": served.id,
        "prompt": body.prompt,
        "response": texts[0],
        "responses": texts,
        "usage": result.usage(),
    }
