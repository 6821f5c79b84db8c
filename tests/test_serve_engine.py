"""The continuous-batching engine on its own: sequences in, token events out."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
import torch

import semilla
from semilla.config import GenerateConfig
from semilla.generate import generate
from semilla.serve.engine import Engine, QueueTimeoutError


@pytest.fixture(scope="module")
def lm(tiny_run: Path):
    return semilla.load(str(tiny_run))


async def collect(
    engine: Engine, lm, prompts: list[list[int]], cfgs: list[GenerateConfig], delay: float = 0.0
):
    """Submit each prompt (optionally one after another), return {index: (tokens, finish)}."""
    loop, queue = asyncio.get_running_loop(), asyncio.Queue()
    seqs = {}
    for i, (p, c) in enumerate(zip(prompts, cfgs, strict=True)):
        seqs[engine.submit("m", p, c, frozenset(lm.stop_ids), loop, queue)] = i
        await asyncio.sleep(delay)
    out = {i: ([], None) for i in range(len(prompts))}
    while any(finish is None for _, finish in out.values()):
        seq, event = await queue.get()
        if isinstance(event, BaseException):
            out[seqs[seq]] = (out[seqs[seq]][0], event)
            continue
        tokens, _ = out[seqs[seq]]
        if event.token is not None:
            tokens.append(event.token)
        out[seqs[seq]] = (tokens, event.finish_reason)
    return out


def assert_engine_equals_core_alone(model, lm, texts: list[str], cfgs: list[GenerateConfig], slots: int):
    """Submit the prompts 10 ms apart to an engine with fewer slots than prompts (so they join
    mid-flight, wait, and move between cache rows); each must equal generating it alone."""
    prompts = [lm.tokenizer.encode(t) for t in texts]
    engine = Engine(max_slots=slots, queue_size=8)
    engine.add_model("m", model.eval(), lm.tokenizer.pad_id)
    engine.start()
    try:
        got = asyncio.run(collect(engine, lm, prompts, cfgs, delay=0.01))
    finally:
        engine.stop()
    for i, (p, c) in enumerate(zip(prompts, cfgs, strict=True)):
        alone = generate(model, [p], c, lm.stop_ids)[0]
        assert got[i] == (alone.tokens, alone.finish_reason), i


def test_sequences_that_join_mid_flight_give_what_they_give_alone(lm):
    """Continuous batching must not change a seeded sequence: joined late, next to others,
    moved between cache rows when a neighbour finishes, it equals the generation core alone."""
    cfgs = [
        GenerateConfig(max_new_tokens=n, temperature=0.9, seed=s)
        for n, s in ((6, 1), (20, 2), (3, 3), (12, 4))
    ]
    assert_engine_equals_core_alone(
        lm.model, lm, ["En un", "Había una vez", "El", "Sancho dijo"], cfgs, slots=3
    )


def test_a_sequence_waiting_past_its_timeout_gets_a_queue_timeout(lm):
    engine = Engine(max_slots=1, queue_size=8)
    engine.add_model("m", lm.model, lm.tokenizer.pad_id)
    engine.start()
    stop = frozenset(lm.stop_ids)

    async def run():
        loop, queue = asyncio.get_running_loop(), asyncio.Queue()
        long = GenerateConfig(max_new_tokens=20, min_new_tokens=20, temperature=1.0)
        holder = engine.submit("m", [2], long, stop, loop, queue)
        holder.timeout_s = 60.0
        waiter = engine.submit("m", [2], long, stop, loop, queue)
        waiter.timeout_s = 0.0  # already late: must never take a slot
        events = []
        while True:
            seq, event = await queue.get()
            events.append((seq is waiter, event))
            if seq is holder and getattr(event, "finish_reason", None):
                return events

    try:
        events = asyncio.run(run())
    finally:
        engine.stop()
    waiter_events = [e for is_waiter, e in events if is_waiter]
    assert len(waiter_events) == 1 and isinstance(waiter_events[0], QueueTimeoutError)
    assert sum(1 for is_waiter, e in events if not is_waiter and e.token is not None) == 20


def test_the_output_filter_judges_whole_words_before_showing_them():
    import re
    from types import SimpleNamespace

    from semilla.serve.serving import Choice, ChoiceDelta, Job

    job = SimpleNamespace(screen=lambda text: re.search(r"(?<!\w)ass(?!\w)", text) is not None)

    def feed(pieces: list[str]) -> tuple[str, str | None]:
        choice, shown = Choice(0), ""
        for i, piece in enumerate(pieces):
            if i == len(pieces) - 1:
                choice.finish_reason = "length"
            delta = ChoiceDelta(0, piece)
            Job._screen(job, choice, delta)
            shown += delta.text
            choice.text += delta.text
            if choice.finish_reason == "content_filter":
                break
        return shown, choice.finish_reason

    assert feed(["I a", "ss", "ume so", "."]) == ("I assume so.", "length")  # a prefix is no match
    assert feed(["you a", "ss", " is", " here"]) == ("you ", "content_filter")  # never shown
    assert feed(["the end a", "ss"]) == ("the end ", "content_filter")  # judged at the finish


def test_an_lstm_model_is_served_by_the_same_engine(lm):
    """The LSTM's (h, c) state plays the KV cache's part: joined late and moved between rows,
    a seeded sequence still equals the generation core alone."""
    from semilla.config import ModelConfig
    from semilla.models import build_model

    torch.manual_seed(0)
    lstm = build_model(
        ModelConfig(arch="lstm", vocab_size=lm.tokenizer.vocab_size, n_layer=2, n_embd=16, lstm_hidden=24)
    )
    cfgs = [GenerateConfig(max_new_tokens=n, temperature=0.9, seed=s) for n, s in ((5, 1), (12, 2), (3, 3))]
    assert_engine_equals_core_alone(lstm, lm, ["En un", "Había una vez", "El"], cfgs, slots=2)
    # in bfloat16 too (`serve --dtype bfloat16`, and the default on CUDA): the (h, c) slots follow
    assert_engine_equals_core_alone(
        lstm.to(torch.bfloat16), lm, ["En un", "Había una vez"], cfgs[:2], slots=1
    )


def test_a_bfloat16_model_is_served_like_it_generates_alone(tiny_run: Path):
    """`semilla serve --dtype bfloat16`: the engine batches bfloat16 rows (prepacked oneDNN
    kernels on CPUs with native bf16) and a seeded sequence still equals the core alone."""
    from semilla.serve.registry import load_models

    served = load_models([("m", str(tiny_run))], device="cpu", dtype="bfloat16")["m"]
    lm = served.lm
    assert {p.dtype for p in lm.model.parameters()} == {torch.bfloat16}
    cfgs = [GenerateConfig(max_new_tokens=n, temperature=0.9, seed=s) for n, s in ((6, 1), (20, 2), (3, 3))]
    assert_engine_equals_core_alone(lm.model, lm, ["En un", "Había una vez", "El"], cfgs, slots=2)
