"""One tokenizer interface over Hugging Face `tokenizers`: character-level and byte-level BPE.

Both kinds are saved as a standard `tokenizer.json` (plus `tokenizer_config.json` with the
chat template), so transformers and the llama.cpp converters can read them.
"""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Iterable
from pathlib import Path

import numpy as np
from tokenizers import Regex, decoders, models, normalizers, pre_tokenizers, trainers
from tokenizers import Tokenizer as HFTokenizer

from semilla.errors import CheckpointError, DataError

PAD, UNK, BOS, EOS = "<pad>", "<unk>", "<bos>", "<eos>"
SYSTEM, USER, ASSISTANT, END = "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"
SPECIAL_TOKENS = [PAD, UNK, BOS, EOS, SYSTEM, USER, ASSISTANT, END]  # ids 0..7
ROLE_TOKENS = {"system": SYSTEM, "user": USER, "assistant": ASSISTANT}

# The Jinja form of `Tokenizer.apply_chat_template`, stored for transformers and llama.cpp.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>' + message['content'] + '<|end|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
)


class Tokenizer:
    """Text <-> token ids. `kind` is 'char' or 'bpe'; special tokens have ids 0..7."""

    def __init__(self, hf: HFTokenizer, kind: str, chat_template: str = CHAT_TEMPLATE):
        self.hf = hf
        self.kind = kind
        self.chat_template = chat_template
        # User text is data: '<eos>' typed by a user is five characters, not the eos token.
        self.hf.encode_special_tokens = True
        self.pad_id, self.unk_id, self.bos_id, self.eos_id = (self.token_to_id(t) for t in SPECIAL_TOKENS[:4])
        self.end_id = self.token_to_id(END)

    # --- training -------------------------------------------------------------------------

    @classmethod
    def train_char(cls, texts: Iterable[str]) -> Tokenizer:
        """Vocabulary = the distinct characters of the corpus, after the special tokens."""
        chars: set[str] = set()
        for text in texts:
            chars.update(text)
        chars -= set(SPECIAL_TOKENS)
        vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
        for ch in sorted(chars):
            vocab[ch] = len(vocab)
        hf = HFTokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
        # every character is its own word; the decoder glues them back without spaces
        hf.pre_tokenizer = pre_tokenizers.Split(Regex(r"(?m)."), behavior="isolated")
        hf.decoder = decoders.Fuse()
        hf.add_special_tokens(SPECIAL_TOKENS)
        return cls(hf, "char")

    @classmethod
    def train_bpe(cls, texts: Iterable[str], vocab_size: int = 8192) -> Tokenizer:
        """Byte-level BPE (GPT-2 style, no prefix space), NFC-normalized, case preserved."""
        if vocab_size < 256 + len(SPECIAL_TOKENS):
            raise DataError(f"BPE vocab_size must be at least {256 + len(SPECIAL_TOKENS)}, got {vocab_size}")
        hf = HFTokenizer(models.BPE(unk_token=None, byte_fallback=False))
        hf.normalizer = normalizers.NFC()
        hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        hf.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            special_tokens=SPECIAL_TOKENS,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        hf.train_from_iterator(texts, trainer=trainer)
        return cls(hf, "bpe")

    # --- use ------------------------------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        return self.hf.get_vocab_size(with_added_tokens=True)

    def token_to_id(self, token: str) -> int:
        i = self.hf.token_to_id(token)
        assert i is not None, f"token {token!r} missing from the vocabulary"
        return i

    def encode(self, text: str) -> list[int]:
        return self.hf.encode(text, add_special_tokens=False).ids

    def encode_array(self, text: str) -> np.ndarray:
        """`encode` as an int64 array. A char tokenizer maps code points through a table: the
        same ids ~50x faster than the tokenizers library, which builds an object per character."""
        if self.kind != "char":
            return np.asarray(self.encode(text), dtype=np.int64)
        points = np.frombuffer(text.encode("utf-32-le", "surrogatepass"), dtype="<u4")
        table = self._char_table
        ids = np.full(len(points), self.unk_id, dtype=np.int64)
        known = points < len(table)
        ids[known] = table[points[known]]
        return ids

    @functools.cached_property
    def _char_table(self) -> np.ndarray:
        """code point -> id of that character (<unk> where the vocabulary has none)."""
        chars = {t: i for t, i in self.hf.get_vocab().items() if len(t) == 1 and t not in SPECIAL_TOKENS}
        table = np.full(max(map(ord, chars), default=0) + 1, self.unk_id, dtype=np.int64)
        for ch, i in chars.items():
            table[ord(ch)] = i
        return table

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self.hf.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        return self.hf.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def same_encoding(self, other: Tokenizer) -> bool:
        """True when both turn text into the same ids: their tokenizer.json contents agree."""
        return json.loads(self.hf.to_str()) == json.loads(other.hf.to_str())

    def id_to_token(self, i: int) -> str | None:
        return self.hf.id_to_token(i)

    def encode_chat(self, messages: list[dict[str, str]]) -> tuple[list[int], list[int]]:
        """Token ids of a conversation, <|role|>content<|end|> per message, and its loss mask:
        1 on each assistant message's content and its <|end|>, 0 on role tokens and on system
        and user turns (chat fine-tuning learns to answer, not to write the user's part).

        Role tokens are inserted as ids, so message text can never forge a turn boundary.
        """
        ids: list[int] = []
        mask: list[int] = []
        for m in messages:
            role = m.get("role")
            if role not in ROLE_TOKENS:
                raise DataError(f"unknown chat role {role!r}; expected one of {', '.join(ROLE_TOKENS)}")
            turn = [*self.encode(m.get("content") or ""), self.end_id]
            ids += [self.token_to_id(ROLE_TOKENS[role]), *turn]
            mask += [0] + [int(role == "assistant")] * len(turn)
        return ids, mask

    def apply_chat_template(
        self, messages: list[dict[str, str]], add_generation_prompt: bool = True
    ) -> list[int]:
        """Token ids of a conversation (see encode_chat), then <|assistant|> to prompt a reply."""
        ids, _ = self.encode_chat(messages)
        if add_generation_prompt:
            ids.append(self.token_to_id(ASSISTANT))
        return ids

    # --- files ----------------------------------------------------------------------------

    def save(self, directory: str | os.PathLike, model_max_length: int | None = None) -> None:
        """Write tokenizer.json and tokenizer_config.json into `directory`; `model_max_length`
        is the context of the model it goes with (transformers truncates to it)."""
        d = Path(directory)
        self.hf.encode_special_tokens = False  # stored files keep the library default
        try:
            self.hf.save(str(d / "tokenizer.json"))
        finally:
            self.hf.encode_special_tokens = True
        config = {
            "semilla_tokenizer_kind": self.kind,
            "tokenizer_class": "PreTrainedTokenizerFast",
            "bos_token": BOS,
            "eos_token": EOS,
            "unk_token": UNK,
            "pad_token": PAD,
            "additional_special_tokens": SPECIAL_TOKENS[4:],
            "chat_template": self.chat_template,
            "model_max_length": model_max_length or 1_000_000,
            "clean_up_tokenization_spaces": False,
        }
        (d / "tokenizer_config.json").write_text(
            json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8"
        )

    @classmethod
    def load(cls, directory: str | os.PathLike) -> Tokenizer:
        d = Path(directory)
        path = d / "tokenizer.json"
        if not path.is_file():
            raise CheckpointError(f"{d} has no tokenizer.json")
        try:
            hf = HFTokenizer.from_file(str(path))
            config_path = d / "tokenizer_config.json"
            config = json.loads(config_path.read_text(encoding="utf-8")) if config_path.is_file() else {}
        except Exception as e:  # the tokenizers library raises plain Exception on bad JSON
            raise CheckpointError(f"{path} cannot be read: {str(e).splitlines()[0]}") from e
        kind = config.get("semilla_tokenizer_kind") or (
            "char" if isinstance(hf.model, models.WordLevel) else "bpe"
        )
        missing = [t for t in SPECIAL_TOKENS if hf.token_to_id(t) is None]
        if missing:
            raise CheckpointError(f"{path} lacks semilla's special tokens: {', '.join(missing)}")
        return cls(hf, kind, config.get("chat_template") or CHAT_TEMPLATE)
