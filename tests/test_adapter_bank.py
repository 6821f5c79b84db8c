"""Many LoRA adapters in one continuous batch: each row equals its adapter merged into the model
and run alone (tokens, and logprobs within 1e-5), rows joining mid-flight included; the bank
holds at most N adapters, never dropping one that rows use."""

from __future__ import annotations

import asyncio

import pytest
import torch
from export_helpers import save_tiny

from semilla.checkpoint import load_checkpoint
from semilla.config import GenerateConfig
from semilla.generate import generate
from semilla.models.adapter_bank import AdapterBank, UnknownAdapterError
from semilla.models.lora import (
    AdapterError,
    LoraConfig,
    apply_lora,
    load_adapter,
    lora_layers,
    merge_and_unload,
    save_adapter,
)
from semilla.serve.engine import Engine

# four adapters of different ranks over different layers (gate/up: the fused SwiGLU matmul)
ADAPTERS = {
    "qv": ("q_proj,v_proj", 4),
    "all": ("all-linear", 8),
    "out": ("o_proj,down_proj", 2),
    "kgu": ("k_proj,gate_proj,up_proj", 6),
}
PROMPTS = ["the quick brown", "En un lugar", "the lazy dog", "de cuyo nombre", "fox jumps", "the end"]


def make_adapter(ckpt, directory, targets: str, r: int, seed: int):
    """A PEFT adapter for `ckpt` with random A and B (a fresh adapter's B = 0 does nothing)."""
    model, _, _ = load_checkpoint(ckpt)
    apply_lora(model, LoraConfig(r=r, alpha=2 * r, dropout=0.0, target_modules=targets))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in lora_layers(model).values():
            layer.lora_B.weight.copy_(torch.randn(layer.lora_B.weight.shape, generator=gen) * 0.05)
    return save_adapter(directory, model, LoraConfig(r=r, alpha=2 * r, target_modules=targets), str(ckpt))


def merged(ckpt, adapter):
    """The checkpoint's model with `adapter` merged into its weights (None: the base model)."""
    model, _, _ = load_checkpoint(ckpt)
    if adapter is not None:
        load_adapter(model, adapter)
        merge_and_unload(model)
    return model.eval()


@pytest.fixture(scope="module", params=["llama", "gpt2"])
def base(request, tmp_path_factory):
    """(checkpoint, tokenizer, {adapter name: directory}) of a tiny random model."""
    root = tmp_path_factory.mktemp(f"bank-{request.param}")
    ckpt = save_tiny(root / "ckpt", request.param, "char")
    adapters = {
        name: make_adapter(ckpt, root / name, targets, r, seed)
        for seed, (name, (targets, r)) in enumerate(ADAPTERS.items())
    }
    _, tok, _ = load_checkpoint(ckpt)
    return ckpt, tok, adapters


async def run_engine(
    engine: Engine, requests: list[tuple[list[int], GenerateConfig, str | None]], delay: float
):
    """Submit each (prompt, config, adapter) `delay` s after the previous one; {index: events}."""
    loop, queue = asyncio.get_running_loop(), asyncio.Queue()
    index = {}
    for i, (prompt, cfg, adapter) in enumerate(requests):
        index[engine.submit("m", prompt, cfg, frozenset(), loop, queue, adapter=adapter)] = i
        await asyncio.sleep(delay)
    events = {i: [] for i in range(len(requests))}
    done = 0
    while done < len(requests):
        seq, event = await queue.get()
        assert not isinstance(event, BaseException), event
        events[index[seq]].append(event)
        done += event.finish_reason is not None
    return events


def test_rows_with_four_adapters_and_none_equal_each_adapter_merged_alone(base):
    """8 requests over 4 adapters and the base model, into 5 slots, 20 ms apart: rows join
    mid-flight (next to rows of other adapters), wait for a slot, move between cache rows."""
    ckpt, tok, adapters = base
    names = ["qv", None, "all", "out", "kgu", None, "all", "qv"]
    cfg = GenerateConfig(max_new_tokens=24, temperature=0.0)
    requests = [(tok.encode(PROMPTS[i % len(PROMPTS)]), cfg, name) for i, name in enumerate(names)]
    engine = Engine(max_slots=5, queue_size=8, max_adapters=4)
    engine.add_model("m", merged(ckpt, None), tok.pad_id)
    for name, directory in adapters.items():
        engine.add_adapter("m", name, directory)
    engine.start()
    try:
        got = asyncio.run(run_engine(engine, requests, delay=0.02))
    finally:
        engine.stop()
    references = {name: merged(ckpt, adapters[name] if name else None) for name in {*names}}
    differs = set()
    for i, (prompt, _, name) in enumerate(requests):
        alone = generate(references[name], [prompt], cfg, ())[0]
        tokens = [e.token for e in got[i] if e.token is not None]
        assert tokens == alone.tokens, (i, name)
        logprobs = torch.tensor([e.logprob for e in got[i] if e.token is not None])
        assert (logprobs - torch.tensor(alone.logprobs)).abs().max() < 1e-5, (i, name)
        if name is not None and tokens != generate(references[None], [prompt], cfg, ())[0].tokens:
            differs.add(name)
    assert differs == set(ADAPTERS)  # every adapter changes what its rows say


def test_the_bank_holds_at_most_n_and_never_drops_one_in_use(base):
    ckpt, _, adapters = base
    bank = AdapterBank(merged(ckpt, None), max_held=2)
    for name, directory in adapters.items():
        bank.register(name, directory)
    assert bank.names() == sorted(ADAPTERS) and list(bank.loaded) == ["out", "kgu"]
    bank.acquire("qv")  # dropped earlier: read again, the least recently used idle one leaves
    assert list(bank.loaded) == ["kgu", "qv"]
    bank.acquire("kgu")
    with pytest.raises(AdapterError, match="all 2 adapters held in memory are in use"):
        bank.acquire("all")
    assert bank.users["all"] == 0
    bank.unregister("qv")  # in use: its rows finish with it
    assert "qv" in bank.held.slots and "qv" not in bank.names()
    with pytest.raises(UnknownAdapterError, match="no adapter named 'qv'"):
        bank.acquire("qv")
    bank.release("qv")
    assert "qv" not in bank.held.slots and list(bank.loaded) == ["kgu"]
    bank.release("kgu")
    bank.acquire("all")
    assert set(bank.held.slots) == {"kgu", "all"}


def test_an_unknown_adapter_is_refused_at_submit(base):
    ckpt, tok, _ = base
    engine = Engine(max_slots=2)
    engine.add_model("m", merged(ckpt, None), tok.pad_id)
    with pytest.raises(UnknownAdapterError, match="no adapter named 'nope'"):
        engine.submit(
            "m", [2], GenerateConfig(), frozenset(), asyncio.new_event_loop(), asyncio.Queue(), "nope"
        )
    assert not engine.workers["m"].waiting


def test_an_adapter_for_another_base_is_refused_at_registration(base, tmp_path):
    ckpt, _, adapters = base
    wider = save_tiny(tmp_path / "wider", "llama", "char", n_embd=64)
    bank = AdapterBank(merged(wider, None))
    with pytest.raises(AdapterError, match="do not fit the layer|is not a layer of this model"):
        bank.register("qv", adapters["qv"])
    assert bank.names() == [] and not bank.held.layers


def test_an_lstm_has_no_layers_to_adapt(tmp_path, base):
    _, _, adapters = base
    lstm = save_tiny(tmp_path / "lstm", "llama", "char", arch="lstm", lstm_hidden=32)
    bank = AdapterBank(merged(lstm, None))
    with pytest.raises(AdapterError, match="no layers LoRA adapts"):
        bank.register("qv", adapters["qv"])


def test_a_truncated_adapter_is_refused_at_registration_and_the_bank_is_unchanged(base, tmp_path):
    ckpt, _, adapters = base
    bank = AdapterBank(merged(ckpt, None))
    bank.register("qv", adapters["qv"])
    broken = tmp_path / "broken"
    broken.mkdir()
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        data = (adapters["all"] / name).read_bytes()
        (broken / name).write_bytes(data[: len(data) // 2] if name.endswith("safetensors") else data)
    with pytest.raises(AdapterError, match="is corrupt or truncated"):
        bank.register("all", broken)
    assert bank.names() == ["qv"] and list(bank.held.slots) == ["qv"]
