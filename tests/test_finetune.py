"""Starting from a checkpoint: --init-from, chat loss masks, weighted data mixtures, and the
optimizer state kept by parameter name."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import TINY_TRAIN, assert_one_line_error, run_cli, tiny_configs
from safetensors.torch import save_file
from test_train import assert_same_training

from semilla.api import LanguageModel
from semilla.batches import IGNORE_INDEX, MixtureDataset, TokenDataset, parse_mixture
from semilla.checkpoint import (
    load_checkpoint,
    load_optimizer_state,
    optimizer_state_by_name,
    read_optimizer_tensors,
    write_optimizer_tensors,
)
from semilla.cli import main
from semilla.config import TrainConfig, preset, replace
from semilla.data import prepare
from semilla.errors import CheckpointError
from semilla.evaluate import evaluate
from semilla.export.hf import export_hf
from semilla.export.importer import import_hf
from semilla.export.quantize import quantize_int8
from semilla.models import build_model
from semilla.optim import make_optimizer
from semilla.tokenizer import Tokenizer
from semilla.train import train
from semilla.train_inputs import init_model_config
from semilla.train_metrics import batch_metrics, loss_fn, metric_sums
from semilla.train_setup import resume_configs, setup

QUESTIONS = ["hola", "quien eres", "que hora es", "donde vives", "como estas", "que lees", "adios"]
ANSWER = "soy el escudero."


def chat_rows(n: int) -> list[dict]:
    """Short conversations (optionally with a system turn) whose assistant always answers ANSWER."""
    rows = []
    for i in range(n):
        messages = [{"role": "user", "content": QUESTIONS[i % len(QUESTIONS)]}]
        if i % 3 == 0:
            messages.insert(0, {"role": "system", "content": "responde"})
        messages.append({"role": "assistant", "content": ANSWER})
        rows.append({"messages": messages})
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


# --- the loss mask --------------------------------------------------------------------------


def test_chat_mask_covers_the_assistant_content_and_its_end_marker(corpus_text: str) -> None:
    tok = Tokenizer.train_char([corpus_text])
    messages = [
        {"role": "system", "content": "sé breve"},
        {"role": "user", "content": "hola"},
        {"role": "assistant", "content": "buenas"},
        {"role": "user", "content": "y?"},
        {"role": "assistant", "content": "nada"},
    ]
    ids, mask = tok.encode_chat(messages)
    assert ids == tok.apply_chat_template(messages, add_generation_prompt=False)
    assert len(mask) == len(ids)
    counted = [i for i, m in zip(ids, mask, strict=True) if m]
    assert counted == tok.encode("buenas") + [tok.end_id] + tok.encode("nada") + [tok.end_id]
    # role tokens are never counted, and every counted run starts right after <|assistant|>
    assistant = tok.token_to_id("<|assistant|>")
    starts = [k for k in range(len(ids)) if mask[k] and not mask[k - 1]]
    assert [ids[k - 1] for k in starts] == [assistant, assistant]


def test_prepare_writes_masks_beside_the_shards_only_for_chat_data(tmp_path: Path, corpus_file: Path) -> None:
    rows = chat_rows(30) + [{"text": "una linea de texto plano"}] * 5
    proc = run_cli("prepare", write_jsonl(tmp_path / "chat.jsonl", rows), "-o", tmp_path / "chat", "-q")
    assert proc.returncode == 0 and "loss mask" in proc.stdout, proc.stderr
    chat = json.loads((tmp_path / "chat" / "meta.json").read_text())
    assert chat["loss_mask"]
    tok = Tokenizer.load(tmp_path / "chat")
    for split in ("train", "val", "test"):
        for shard in chat["splits"][split]["shards"]:
            ids = np.fromfile(tmp_path / "chat" / shard["file"], dtype=np.uint16)
            mask = np.fromfile(tmp_path / "chat" / shard["mask"], dtype=np.uint8)
            assert len(mask) == len(ids) == shard["tokens"]
            assert set(np.unique(mask)) <= {0, 1}
            assert not mask[ids == tok.token_to_id("<|user|>")].any()
    plain = prepare([str(corpus_file)], str(tmp_path / "plain"))
    assert not plain["loss_mask"] and not list((tmp_path / "plain").glob("*.mask"))
    # JSONL of text rows only: the masks written while streaming are dropped again
    text_rows = prepare(
        [str(write_jsonl(tmp_path / "text.jsonl", [{"text": f"fila {i}"} for i in range(20)]))],
        str(tmp_path / "text"),
    )
    assert not text_rows["loss_mask"] and not list((tmp_path / "text").glob("*.mask"))


def test_batches_ignore_every_target_outside_the_assistant_turns(tmp_path: Path) -> None:
    data = tmp_path / "chat"
    prepare([str(write_jsonl(tmp_path / "chat.jsonl", chat_rows(40)))], str(data), split=(1.0, 0.0, 0.0))
    tok = Tokenizer.load(data)
    gen = torch.Generator().manual_seed(0)
    x, y = TokenDataset(data).random_batch(8, 48, gen)
    unmasked_x, unmasked_y = TokenDataset(data, loss_mask=False).random_batch(8, 48, gen.manual_seed(0))
    assert torch.equal(x, unmasked_x)  # inputs are untouched, only targets are ignored
    counted = y != IGNORE_INDEX
    assert torch.equal(y[counted], unmasked_y[counted])
    assert 0 < counted.sum() < counted.numel()
    answer = set(tok.encode(ANSWER)) | {tok.end_id}
    assert set(y[counted].tolist()) <= answer
    for role in ("<|system|>", "<|user|>", "<|assistant|>"):
        assert not (unmasked_y[counted] == tok.token_to_id(role)).any()
    assert (unmasked_y[~counted] == tok.token_to_id("<|user|>")).any()


@pytest.mark.parametrize("rows", [1, 3])
def test_masking_targets_never_touches_the_inputs(tmp_path: Path, rows: int) -> None:
    """One row (a mixture's source picked once): the input and target slices of one window are
    views of the same memory unless copied; the masked targets must not reach the inputs."""
    data = tmp_path / "chat"
    prepare([str(write_jsonl(tmp_path / "chat.jsonl", chat_rows(40)))], str(data), split=(1.0, 0.0, 0.0))
    gen = torch.Generator().manual_seed(0)
    for _ in range(20):
        x, y = TokenDataset(data).random_batch(rows, 48, gen)
        assert (y == IGNORE_INDEX).any()
        assert int(x.min()) >= 0


def test_user_turn_tokens_contribute_exactly_zero_gradient(tmp_path: Path) -> None:
    """The gradient reaching the logits of positions whose target is a system/user token (or a
    role tag) is exactly zero; assistant positions get gradient; and the parameter gradient
    equals the one of a loss written by hand over the assistant positions alone."""
    data = tmp_path / "chat"
    prepare([str(write_jsonl(tmp_path / "chat.jsonl", chat_rows(40)))], str(data), split=(1.0, 0.0, 0.0))
    tok = Tokenizer.load(data)
    x, y = TokenDataset(data).random_batch(4, 48, torch.Generator().manual_seed(1))
    _, all_targets = TokenDataset(data, loss_mask=False).random_batch(4, 48, torch.Generator().manual_seed(1))
    torch.manual_seed(0)
    model = build_model(replace(preset("tiny"), vocab_size=tok.vocab_size, block_size=48))
    logits = model(x)
    logits.retain_grad()
    loss_fn(logits, y).backward()
    ignored = y == IGNORE_INDEX
    assert ignored.any() and (all_targets[ignored] == tok.token_to_id("<|user|>")).any()
    assert logits.grad[ignored].abs().max() == 0
    assert (logits.grad[~ignored].abs().sum(-1) > 0).all()
    grads = [p.grad.clone() for p in model.parameters()]

    model.zero_grad()
    per_position = torch.nn.functional.cross_entropy(
        model(x).view(-1, tok.vocab_size), all_targets.view(-1), reduction="none"
    )
    (per_position[~ignored.view(-1)].mean()).backward()
    for g, p in zip(grads, model.parameters(), strict=True):
        torch.testing.assert_close(g, p.grad, rtol=1e-5, atol=1e-7)


def test_metrics_and_validation_skip_ignored_targets() -> None:
    """Whatever the model predicts where the target is ignored changes no loss or accuracy."""
    torch.manual_seed(0)
    logits = torch.randn(2, 6, 11)
    targets = torch.randint(0, 11, (2, 6))
    targets[0, :3] = IGNORE_INDEX
    other = logits.clone()
    other[0, :3] = torch.randn(3, 11) * 10
    assert batch_metrics(logits, targets) == batch_metrics(other, targets)
    counted = targets != IGNORE_INDEX
    expected = torch.nn.functional.cross_entropy(logits[counted], targets[counted])
    assert batch_metrics(logits, targets)["loss"] == pytest.approx(float(expected), rel=1e-6)
    assert float(loss_fn(logits, targets)) == pytest.approx(float(expected), rel=1e-6)
    assert metric_sums(logits, targets)["count"] == 9


def test_eval_scores_chat_data_on_the_assistant_turns(tmp_path: Path) -> None:
    """`semilla eval` on prepared chat data: the likelihood counts exactly the assistant targets
    and equals a plain forward's cross-entropy over those positions."""
    data = tmp_path / "chat"
    prepare([str(write_jsonl(tmp_path / "chat.jsonl", chat_rows(10)))], str(data), split=(1.0, 0.0, 0.0))
    tok = Tokenizer.load(data)
    torch.manual_seed(0)
    model = build_model(replace(preset("tiny"), vocab_size=tok.vocab_size, block_size=512)).eval()
    lm = LanguageModel(model, tok, {"path": "tiny"})
    report = evaluate(lm, data=str(data), split="train", num_samples=0, references=0)["likelihood"]
    ids = torch.from_numpy(np.fromfile(data / "train_000.bin", dtype=np.uint16).astype(np.int64))
    counted = torch.from_numpy(np.fromfile(data / "train_000.mask", dtype=np.uint8)).bool()
    assert len(ids) < 512  # one window: the oracle is one forward pass
    with torch.no_grad():
        logits = model(ids[None, :-1])[0]
    keep = counted[1:]
    assert report["tokens"] == int(keep.sum()) < len(ids) - 1
    expected = torch.nn.functional.cross_entropy(logits[keep], ids[1:][keep])
    assert report["cross_entropy"] == pytest.approx(float(expected), rel=1e-5)
    assert "bits_per_char" not in report


def greedy(model: torch.nn.Module, ids: list[int], stop: int, limit: int = 40) -> list[int]:
    out: list[int] = []
    with torch.no_grad():
        for _ in range(limit):
            context = (ids + out)[-model.config.block_size :]
            out.append(int(model(torch.tensor([context]))[0, -1].argmax()))
            if out[-1] == stop:
                break
    return out


def test_fine_tuning_on_chat_rows_teaches_the_assistant_format(tmp_path: Path, tiny_run: Path) -> None:
    """A model trained on plain text, fine-tuned --init-from on chat rows, answers after
    <|assistant|> with text and then <|end|> (greedy)."""
    base, tok, _ = load_checkpoint(tiny_run)
    prompt = tok.apply_chat_template([{"role": "user", "content": "quien eres"}])
    assert tok.end_id not in greedy(base, prompt, tok.end_id)  # plain text never taught it <|end|>

    chat = write_jsonl(tmp_path / "chat.jsonl", chat_rows(70))
    run = tmp_path / "chat-run"
    settings = dict(
        max_iters=150, learning_rate=1e-2, warmup_iters=10, eval_interval=150, init_from=str(tiny_run)
    )
    train_cfg = tiny_configs(chat, run, **settings)[1]
    train(init_model_config(str(tiny_run), {}), train_cfg)
    tuned, tuned_tok, config = load_checkpoint(run / "last")
    assert tuned_tok.same_encoding(tok)
    assert config["train"]["init_from"] == str((tiny_run / "best").resolve())
    for question in ("quien eres", "hola"):
        reply = greedy(tuned, tok.apply_chat_template([{"role": "user", "content": question}]), tok.end_id)
        assert reply[-1] == tok.end_id, tok.decode(reply)
        assert tok.decode(reply[:-1]) == ANSWER


def test_loss_on_all_counts_every_token(tmp_path: Path) -> None:
    data = tmp_path / "chat"
    prepare([str(write_jsonl(tmp_path / "chat.jsonl", chat_rows(40)))], str(data))
    t = setup(*tiny_configs(data, tmp_path / "run", loss_on="all"))
    _, y = t.train_data.random_batch(8, 32, torch.Generator().manual_seed(0))
    assert not (y == IGNORE_INDEX).any()
    t = setup(*tiny_configs(data, tmp_path / "run2"))
    _, y = t.train_data.random_batch(8, 32, torch.Generator().manual_seed(0))
    assert (y == IGNORE_INDEX).any()


# --- --init-from ----------------------------------------------------------------------------


def test_init_from_starts_a_new_run_from_the_weights_with_the_checkpoints_tokenizer(
    tmp_path: Path, tiny_run: Path, corpus_file: Path
) -> None:
    """Raw text is prepared with the checkpoint's tokenizer; weights equal the checkpoint's at
    step 0; the optimizer and the schedule are fresh; config.json records the origin."""
    model_cfg = init_model_config(str(tiny_run), {"dropout": 0.1})
    assert model_cfg.dropout == 0.1 and model_cfg.n_layer == 2
    t = setup(model_cfg, tiny_configs(corpus_file, tmp_path / "run", init_from=str(tiny_run))[1])
    source, tok, _ = load_checkpoint(tiny_run)
    for name, value in source.state_dict().items():
        assert torch.equal(t.model.state_dict()[name], value), name
    assert t.state.step == 0 and not t.optimizer.state
    assert Tokenizer.load(tmp_path / "run" / "data").same_encoding(tok)
    assert t.config.init_from == str((tiny_run / "best").resolve())


def test_init_from_a_checkpoint_imported_from_hugging_face(
    tmp_path: Path, tiny_run: Path, prepared_dir: Path
) -> None:
    """export hf -> import -> --init-from: the imported weights train on the original data."""
    imported = import_hf(export_hf(tiny_run, tmp_path / "hf"), tmp_path / "imported")
    settings = dict(max_iters=2, eval_interval=2, init_from=str(imported))
    result = train(
        init_model_config(str(imported), {}), tiny_configs(prepared_dir, tmp_path / "run", **settings)[1]
    )
    assert result["step"] == 2
    source, _, _ = load_checkpoint(tiny_run)
    tuned, _, _ = load_checkpoint(tmp_path / "run" / "last")
    assert (
        tuned.config.n_layer == source.config.n_layer and tuned.config.vocab_size == source.config.vocab_size
    )


def test_prepare_takes_the_tokenizer_of_a_run_directory(tmp_path: Path, tiny_run: Path) -> None:
    text = tmp_path / "new.txt"
    text.write_text("En un lugar nuevo.\n" * 20, encoding="utf-8")
    proc = run_cli("prepare", text, "-o", tmp_path / "prepared", "--tokenizer-from", tiny_run, "-q")
    assert proc.returncode == 0, proc.stderr
    assert Tokenizer.load(tmp_path / "prepared").same_encoding(Tokenizer.load(tiny_run / "best"))


@pytest.fixture(scope="module")
def other_tokenizer_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("other")
    (root / "other.txt").write_text("xyz zyx " * 200, encoding="utf-8")
    prepare([str(root / "other.txt")], str(root / "data"))
    return root / "data"


def test_cli_refuses_bad_starts_with_one_line(
    tmp_path: Path, tiny_run: Path, prepared_dir: Path, other_tokenizer_data: Path, cli_in_process
) -> None:
    """The first refusal as a user meets it, in its own process; the others in this one (the
    same cli.main, without importing torch again for each)."""
    base = [
        "train",
        "--data",
        prepared_dir,
        "--out-dir",
        tmp_path / "run",
        "--device",
        "cpu",
        "--no-progress",
    ]
    proc = run_cli(*base, "--resume", tiny_run, "--init-from", tiny_run)
    assert_one_line_error(proc, "--resume and --init-from")

    int8 = quantize_int8(tiny_run, tmp_path / "int8")
    assert_one_line_error(cli_in_process(*base, "--init-from", int8), "int8", str(int8))

    proc = cli_in_process(*base[:2], other_tokenizer_data, *base[3:], "--init-from", tiny_run)
    assert_one_line_error(proc, "another tokenizer", "--tokenizer-from")

    proc = cli_in_process(*base, "--init-from", tiny_run, "--n-layer", "3", "--n-embd", "64")
    assert_one_line_error(proc, "n_layer 2 -> 3", "n_embd 32 -> 64")
    assert_one_line_error(cli_in_process(*base, "--init-from", tiny_run, "--preset", "tiny"), "--preset")
    assert not (tmp_path / "run").exists()  # nothing half-written


def test_cli_init_from_trains_and_keeps_the_shape(tmp_path: Path, tiny_run: Path, prepared_dir: Path) -> None:
    run = tmp_path / "run"
    flags = ["--max-iters", "4", "--eval-interval", "4", "--eval-iters", "1", "--batch-size", "4"]
    proc = run_cli(
        "train", "--init-from", tiny_run, "--data", prepared_dir, "--out-dir", run,
        "--device", "cpu", "--no-progress", "--block-size", "32", *flags,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    saved = json.loads((run / "last" / "config.json").read_text())["model"]
    source = json.loads((tiny_run / "best" / "config.json").read_text())["model"]
    for key in ("n_layer", "n_embd", "n_head", "block_size", "vocab_size", "norm", "pos", "mlp"):
        assert saved[key] == source[key], key
    assert json.loads((run / "last" / "trainer_state.json").read_text())["step"] == 4


# --- optimizer state by parameter name ------------------------------------------------------


def test_optimizer_state_round_trips_by_name(tmp_path: Path, tiny_run: Path) -> None:
    saved = read_optimizer_tensors(tiny_run / "last")
    model, _, _ = load_checkpoint(tiny_run / "last")
    names = {name for name, _ in model.named_parameters()}
    assert set(saved.state) == names
    # the default optimizer: Muon's momentum for the blocks' matrices, AdamW's moments for the rest
    muon = {n for g in saved.param_groups if g["optimizer"] == "muon" for n in g["params"]}
    assert "model.layers.0.self_attn.q_proj.weight" in muon and "model.embed_tokens.weight" not in muon
    first_moment = {name: "momentum_buffer" if name in muon else "exp_avg" for name in names}
    for name, param in model.named_parameters():
        if name in muon:
            assert set(saved.state[name]) == {"momentum_buffer"}
        else:
            assert set(saved.state[name]) == {"exp_avg", "exp_avg_sq", "step"}
            assert float(saved.state[name]["step"]) == TINY_TRAIN["max_iters"]
        assert saved.state[name][first_moment[name]].shape == param.shape
    assert sorted(n for g in saved.param_groups for n in g["params"]) == sorted(names)
    # write -> read is the identity
    (tmp_path / "copy").mkdir()
    write_optimizer_tensors(tmp_path / "copy", saved)
    again = read_optimizer_tensors(tmp_path / "copy")
    assert again.param_groups == saved.param_groups
    for name in names:
        for key, value in saved.state[name].items():
            assert torch.equal(again.state[name][key], value)

    # loading matches by name: an optimizer that lists the parameters in another order
    model.train()
    cfg = TrainConfig()
    optimizer = make_optimizer(model, cfg, torch.device("cpu"))
    for group in optimizer.param_groups:
        group["params"].reverse()
    load_optimizer_state(tiny_run / "last", optimizer, model)
    restored = optimizer_state_by_name(optimizer, model)
    for name in names:
        moment = first_moment[name]
        assert torch.equal(restored.state[name][moment], saved.state[name][moment]), name


def test_optimizer_state_of_another_shape_is_refused_by_name(tmp_path: Path, tiny_run: Path) -> None:
    model = build_model(replace(preset("tiny"), vocab_size=tiny_vocab(tiny_run), block_size=32, n_layer=3))
    optimizer = make_optimizer(model, TrainConfig(), torch.device("cpu"))
    with pytest.raises(CheckpointError, match=r"missing \['model.layers.2"):
        load_optimizer_state(tiny_run / "last", optimizer, model)


def tiny_vocab(run: Path) -> int:
    return json.loads((run / "last" / "config.json").read_text())["model"]["vocab_size"]


def write_position_keyed_optimizer(checkpoint: Path) -> None:
    """Rewrite optimizer.safetensors as semilla wrote it before names: "{index}.{key}" tensors."""
    model_cfg, train_cfg = resume_configs(str(checkpoint.parent), {})
    model, _, _ = load_checkpoint(checkpoint, prefer="last")
    optimizer = make_optimizer(model.train(), train_cfg, torch.device("cpu"))
    load_optimizer_state(checkpoint, optimizer, model)
    sd = optimizer.state_dict()
    tensors = {f"{i}.{k}": v.contiguous() for i, s in sd["state"].items() for k, v in s.items()}
    layout = {"param_groups": sd["param_groups"], "scalars": {}}
    save_file(tensors, str(checkpoint / "optimizer.safetensors"), metadata={"layout": json.dumps(layout)})


def test_a_position_keyed_optimizer_file_still_resumes_exactly(tmp_path: Path, prepared_dir: Path) -> None:
    n = 4
    settings = dict(deterministic=True, seed=7, lr_schedule="constant")
    straight, halves = tmp_path / "straight", tmp_path / "halves"
    train(*tiny_configs(prepared_dir, straight, max_iters=2 * n, **settings))
    train(*tiny_configs(prepared_dir, halves, max_iters=n, **settings))
    write_position_keyed_optimizer(halves / "last")
    with pytest.raises(CheckpointError, match="by position"):
        read_optimizer_tensors(halves / "last")
    train(*resume_configs(str(halves), {"max_iters": 2 * n}), resume=str(halves))
    assert_same_training(straight, halves, 2 * n)


# --- weighted mixtures ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def two_sources(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """Two prepared datasets with one tokenizer: one only 'a'/'b', the other only 'x'/'y'."""
    root = tmp_path_factory.mktemp("mixture")
    (root / "all.txt").write_text("ab xy\n", encoding="utf-8")
    prepare([str(root / "all.txt")], str(root / "tok"), split=(1.0, 0.0, 0.0))
    for name, text in (("ab", "abba baab " * 300), ("xy", "xyyx yxxy " * 300)):
        (root / f"{name}.txt").write_text(text, encoding="utf-8")
        prepare([str(root / f"{name}.txt")], str(root / name), tokenizer_from=str(root / "tok"))
    return root / "ab", root / "xy"


def test_mixture_rows_follow_the_weights(two_sources: tuple[Path, Path]) -> None:
    ab, xy = two_sources
    tok = Tokenizer.load(ab)
    data = MixtureDataset([TokenDataset(ab), TokenDataset(xy)], [0.75, 0.25])
    x, y = data.random_batch(800, 8, torch.Generator().manual_seed(0))
    from_ab = torch.isin(x, torch.tensor(tok.encode("ab"))).any(-1)
    from_xy = torch.isin(x, torch.tensor(tok.encode("xy"))).any(-1)
    assert not (from_ab & from_xy).any() and (from_ab | from_xy).all()
    assert 0.70 < from_ab.float().mean() < 0.80
    assert torch.equal(x[:, 1:], y[:, :-1])
    again, _ = data.random_batch(800, 8, torch.Generator().manual_seed(0))
    assert torch.equal(x, again)


def test_mixture_with_raw_text_and_exact_resume(
    tmp_path: Path, two_sources: tuple[Path, Path], corpus_file: Path
) -> None:
    ab, xy = two_sources
    raw = tmp_path / "more.txt"
    raw.write_text("baba xyxy " * 300, encoding="utf-8")
    spec = f"{ab}:0.5,{xy}:0.3,{raw}:0.2"
    n = 4
    settings = dict(deterministic=True, seed=3, lr_schedule="constant")
    straight, halves = tmp_path / "straight", tmp_path / "halves"
    train(*tiny_configs(spec, straight, max_iters=2 * n, **settings))
    assert Tokenizer.load(straight / "data_2").same_encoding(Tokenizer.load(ab))  # raw text, same tokenizer
    train(*tiny_configs(spec, halves, max_iters=n, **settings))
    train(*resume_configs(str(halves), {"max_iters": 2 * n}), resume=str(halves))
    assert_same_training(straight, halves, 2 * n)


def test_a_mixture_of_raw_text_gets_one_tokenizer_trained_on_all_of_it(tmp_path: Path) -> None:
    for name, text in (("ab.txt", "abba baab\n" * 100), ("xy.txt", "xyyx yxxy\n" * 100)):
        (tmp_path / name).write_text(text, encoding="utf-8")
    spec = f"{tmp_path / 'ab.txt'}:2,{tmp_path / 'xy.txt'}:1"
    t = setup(*tiny_configs(spec, tmp_path / "run", block_size=8))
    tok = Tokenizer.load(tmp_path / "run" / "data_0")
    assert tok.same_encoding(Tokenizer.load(tmp_path / "run" / "data_1")) and tok.same_encoding(t.tokenizer)
    assert tok.unk_id not in tok.encode("abxy ")
    assert isinstance(t.train_data, MixtureDataset) and t.train_data.weights.tolist() == [2.0, 1.0]


@pytest.mark.parametrize(
    ("spec", "needle"),
    [
        ("A:0.7,B", "'B' has no weight"),
        ("A:0.7,B:-0.3", "the weight of B must be >= 0, got -0.3"),
        ("A:0,B:0", "sum to 0"),
        ("A:lots,B:0.3", "the weight of A must be a number, got 'lots'"),
    ],
)
def test_malformed_mixture_weights_are_refused_with_one_line(
    spec: str, needle: str, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    code = main(["train", "--data", spec, "--out-dir", str(tmp_path / "run"), "--device", "cpu"])
    lines = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(lines) == 1, lines
    assert lines[0].startswith("semilla: error: --data mixture:") and needle in lines[0], lines[0]
    assert not (tmp_path / "run").exists()


def test_cli_refuses_a_malformed_mixture_and_mixed_tokenizers(
    tmp_path: Path, prepared_dir: Path, other_tokenizer_data: Path
) -> None:
    base = ["train", "--out-dir", tmp_path / "run", "--device", "cpu", "--no-progress"]
    proc = run_cli(*base, "--data", f"{prepared_dir}:0.7,{other_tokenizer_data}")
    assert_one_line_error(proc, "has no weight")
    proc = run_cli(*base, "--data", f"{prepared_dir}:0.7,{other_tokenizer_data}:0.3")
    assert_one_line_error(proc, "another tokenizer", str(other_tokenizer_data))
    assert parse_mixture(str(prepared_dir)) is None  # plain data keeps its meaning
    colon = tmp_path / "notes:2024.txt"
    colon.write_text("hola\n", encoding="utf-8")
    assert parse_mixture(f"{colon},{prepared_dir}") is None  # an existing path is a path


def test_resume_of_an_init_from_run_continues_exactly(
    tmp_path: Path, tiny_run: Path, prepared_dir: Path
) -> None:
    copy = Path(shutil.copytree(tiny_run, tmp_path / "source"))
    n = 3
    settings = dict(deterministic=True, seed=5, lr_schedule="constant", init_from=str(copy))
    model_cfg = init_model_config(str(copy), {})
    straight, halves = tmp_path / "straight", tmp_path / "halves"
    train(model_cfg, tiny_configs(prepared_dir, straight, max_iters=2 * n, **settings)[1])
    train(model_cfg, tiny_configs(prepared_dir, halves, max_iters=n, **settings)[1])
    shutil.rmtree(copy)  # a resumed run no longer needs the checkpoint it started from
    train(*resume_configs(str(halves), {"max_iters": 2 * n}), resume=str(halves))
    assert_same_training(straight, halves, 2 * n)
