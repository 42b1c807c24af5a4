"""The embedder: ONNX vectors equal sentence-transformers', the export is cached and shared, and
similar texts land closer than unrelated ones."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import numpy as np
import pytest

from tm_resources import embedder as emb
from tm_resources.embedder import Embedder, get_embedder

TEXTS = [
    "How do I reverse a list in Python?",
    "Write a haiku about the sea.",
    "hi",
    "",
    "Summarize the following report for the board. " * 60,  # longer than the 256-token cap
    "Quelle est la capitale de la France ?",
]


@pytest.fixture(scope="session")
def model_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # One folder under the session's base, so test_tasks.py reuses the same export.
    return tmp_path_factory.getbasetemp() / "tm-models"


@pytest.fixture(scope="session")
def embedder(model_cache: Path) -> Embedder:
    """fp32 at the model's full 256 tokens: what sentence-transformers computes."""
    return get_embedder(precision="fp32", max_tokens=256, cache_dir=model_cache)


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(axis=1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def test_vectors_match_sentence_transformers(embedder: Embedder) -> None:
    from sentence_transformers import SentenceTransformer

    reference = SentenceTransformer(str(emb.model_path()), device="cpu").encode(
        TEXTS, normalize_embeddings=True, batch_size=4)
    vecs = embedder.embed(TEXTS)
    assert vecs.shape == (len(TEXTS), 384) and vecs.dtype == np.float32
    assert cosines(vecs, reference).min() > 0.9999
    np.testing.assert_allclose(np.linalg.norm(vecs, axis=1), 1.0, atol=1e-5)


def test_one_text_alone_equals_the_same_text_in_a_padded_batch(embedder: Embedder) -> None:
    batch = embedder.embed(TEXTS)
    for text, row in zip(TEXTS, batch, strict=True):
        assert float(embedder.embed_one(text) @ row) > 0.9999


def test_similar_texts_are_closer_than_unrelated_ones(embedder: Embedder) -> None:
    a, b, c = embedder.embed([
        "How can I sort a dictionary by its values in Python?",
        "Python: order a dict by value",
        "Write a poem about falling leaves in autumn.",
    ])
    assert a @ b > 0.7
    assert a @ b > a @ c + 0.4


def test_empty_input_gives_an_empty_matrix(embedder: Embedder) -> None:
    assert embedder.embed([]).shape == (0, 384)


def test_the_export_is_cached_and_written_atomically(embedder: Embedder, model_cache: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    assert embedder.onnx_path.parent == model_cache and embedder.onnx_path.exists()
    assert not [p for p in model_cache.iterdir() if p.name.endswith(".tmp")]

    def no_export(*args, **kwargs):
        raise AssertionError("the cached model should have been reused")

    monkeypatch.setattr(emb, "export_onnx", no_export)
    again = Embedder(precision="fp32", max_tokens=256, cache_dir=model_cache)  # as a second process would
    assert again.onnx_path == embedder.onnx_path
    assert float(again.embed_one("hello") @ embedder.embed_one("hello")) > 0.9999


def test_cache_folder_comes_from_the_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("TM_MODEL_CACHE", raising=False)
    monkeypatch.setenv("TM_HOME", str(tmp_path / "home"))
    assert emb.default_cache_dir() == (tmp_path / "home" / "models").resolve()
    monkeypatch.setenv("TM_MODEL_CACHE", str(tmp_path / "elsewhere"))
    assert emb.default_cache_dir() == tmp_path / "elsewhere"


def test_a_damaged_cache_file_is_exported_again(model_cache: Path, tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    good = next(model_cache.glob("*-fp32.onnx"))
    (tmp_path / good.name).write_bytes(b"not a model")
    monkeypatch.setattr(emb, "export_onnx", lambda dest, src=None: os.link(good, dest) or dest)
    fixed = Embedder(precision="fp32", cache_dir=tmp_path)
    assert fixed.embed_one("hello").shape == (384,)


def test_a_lower_token_cap_changes_only_long_texts(embedder: Embedder, model_cache: Path) -> None:
    short_cap = Embedder(precision="fp32", max_tokens=128, cache_dir=model_cache)
    short, long = "Translate 'good night' into Spanish.", "word " * 400
    assert float(short_cap.embed_one(short) @ embedder.embed_one(short)) > 0.9999
    assert float(short_cap.embed_one(long) @ embedder.embed_one(long)) < 0.9999
    with pytest.raises(ValueError):
        Embedder(max_tokens=1000, cache_dir=model_cache)


def test_int8_stays_close_to_fp32(embedder: Embedder, model_cache: Path) -> None:
    int8 = get_embedder(precision="int8", max_tokens=256, cache_dir=model_cache)
    assert int8.onnx_path != embedder.onnx_path and int8.onnx_path.stat().st_size < embedder.onnx_path.stat().st_size
    sims = cosines(int8.embed(TEXTS), embedder.embed(TEXTS))
    assert sims.mean() > 0.97 and sims.min() > 0.9


def test_get_embedder_shares_one_instance_across_threads(model_cache: Path) -> None:
    """The defaults (fp32, 128 tokens): one instance for the whole process."""
    seen: list[Embedder] = []
    threads = [threading.Thread(target=lambda: seen.append(get_embedder(cache_dir=model_cache))) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len({id(e) for e in seen}) == 1


def test_concurrent_calls_from_threads_give_the_same_vectors(embedder: Embedder) -> None:
    expected = embedder.embed(TEXTS)
    results: dict[int, np.ndarray] = {}

    def work(i: int) -> None:
        results[i] = np.stack([embedder.embed_one(t) for t in TEXTS])

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for got in results.values():
        assert cosines(got, expected).min() > 0.9999
