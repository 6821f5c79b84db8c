"""What a run shows beyond its loss (in TensorBoard, metrics.jsonl and the log):

- every evaluation: a histogram of each weight tensor (`weights/NAME`) and of its gradient in the
  step just taken, after clipping (`gradients/NAME`);
- at the end: the token embeddings in TensorBoard's projector, each point labelled with its
  token (the first PROJECTOR_TOKENS ids: the projector is for looking, not for 100k rows);
- gradient-norm spikes: a step whose norm is over `grad_spike_factor` times the median of the
  SPIKE_WINDOW steps before it is a `grad_spike` row in metrics.jsonl, TensorBoard and the log.

Nothing here touches the model, the optimizer or a random generator: a run trains the same with
it. The norms are kept on the device and read at each log line, one synchronisation per log
rather than one per step. Rank 0 of a run alone writes; a sharded (FSDP) run has no rank with
every weight, so it gets none of this.
"""

from __future__ import annotations

import statistics
from collections import deque
from collections.abc import Callable
from typing import Any

import torch

PROJECTOR_TOKENS = 10_000
SPIKE_WINDOW = 100  # steps of gradient norms the running median is taken over
SPIKE_MIN_HISTORY = 10  # steps seen before any step can be a spike


def token_label(text: str) -> str:
    """A token as one projector label: whitespace shown, never a tab or a line break."""
    shown = text.replace("\\", "\\\\").replace("\n", "\\n").replace("\t", "\\t").replace("\r", "\\r")
    return shown if shown.strip() else repr(text)


class TrainingInsight:
    """The histograms, projector and spike flags of one run (rank 0). It reads the trainer's
    model each time: ages replace it as they grow."""

    def __init__(self, trainer: Any, writer: Any):
        self.t, self.writer = trainer, writer
        self.spike_factor = trainer.config.grad_spike_factor
        self.norms: list[tuple[int, torch.Tensor]] = []  # (step, norm on the device) since the last check
        self.history: deque[float] = deque(maxlen=SPIKE_WINDOW)
        self.gradients: dict[str, torch.Tensor] = {}  # the last evaluated step's gradients, on the CPU

    def after_clip(self, step: int, grad_norm: torch.Tensor) -> None:
        """Called between clipping and the optimizer step of `step`: keep its norm, and its
        gradients when an evaluation follows it."""
        cfg = self.t.config
        if self.spike_factor > 0:
            self.norms.append((step, grad_norm.detach()))
        if step % cfg.eval_interval == 0 or step == cfg.max_iters:
            self.gradients = {
                name: p.grad.detach().float().cpu()
                for name, p in self.t.model.named_parameters()
                if p.grad is not None
            }

    def flag_spikes(self, record: Callable[..., None]) -> None:
        """record("grad_spike", {grad_norm, median, ratio}, step) for each spike among the norms
        kept since the last call."""
        for step, spike in self.spikes():
            record("grad_spike", spike, step)

    def spikes(self) -> list[tuple[int, dict[str, float]]]:
        found = []
        values = torch.stack([n for _, n in self.norms]).float().cpu().tolist() if self.norms else []
        for (step, _), norm in zip(self.norms, values, strict=True):
            if len(self.history) >= SPIKE_MIN_HISTORY:
                median = statistics.median(self.history)
                if median > 0 and norm > self.spike_factor * median:
                    found.append((step, {"grad_norm": norm, "median": median, "ratio": norm / median}))
            self.history.append(norm)
        self.norms = []
        return found

    @torch.no_grad()
    def histograms(self, step: int) -> None:
        """Each weight's histogram and, from the step just taken, each gradient's."""
        for name, p in self.t.model.named_parameters():
            self.writer.add_histogram(f"weights/{name}", p.detach().float().cpu(), step)
        for name, grad in self.gradients.items():
            self.writer.add_histogram(f"gradients/{name}", grad, step)
        self.gradients = {}

    @torch.no_grad()
    def embeddings(self, step: int) -> None:
        """The token embeddings in TensorBoard's projector, labelled with their tokens."""
        model, tokenizer = self.t.model, self.t.tokenizer
        table = model.get_submodule(embedding_path(model)).weight
        n = min(PROJECTOR_TOKENS, table.size(0), tokenizer.vocab_size)
        labels = [token_label(tokenizer.decode([i])) for i in range(n)]
        self.writer.add_embedding(table[:n].detach().float().cpu(), labels, step, tag="token_embeddings")


def embedding_path(model: torch.nn.Module) -> str:
    """The module name of the token embedding table (transformers and LSTMs alike)."""
    names = [name for name, _ in model.named_modules() if name.endswith("embed_tokens")]
    assert names, "a semilla model has an embed_tokens table"
    return names[0]
