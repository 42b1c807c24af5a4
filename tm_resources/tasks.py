"""Task types from embeddings: label prompts by their nearest seed examples, and propose new types.

A task type is a name with a handful of hand-written example prompts (task_seeds.yaml, or
`loop.task_seeds` in the configuration). `TaskClassifier` labels a prompt vector by a
similarity-weighted vote of its nearest seeds and says "unknown" when they disagree or none is
close; `candidate_types` groups the unknown and doubtful prompts into dense clusters that a human
(or the loop) may turn into new types. Everything is plain numpy and deterministic.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import numpy as np
import yaml

if TYPE_CHECKING:
    from tm_resources.embedder import Embedder

UNKNOWN = "unknown"
SEEDS_RESOURCE = "task_seeds.yaml"


def load_seeds(path: str | Path | None = None) -> dict[str, list[str]]:
    """Seed prompts per task type from a YAML mapping; None: the built-in task_seeds.yaml."""
    if path is None:
        text = resources.files("tm_resources").joinpath(SEEDS_RESOURCE).read_text(encoding="utf-8")
        source = f"tm_resources/{SEEDS_RESOURCE}"
    else:
        text = Path(path).read_text(encoding="utf-8")
        source = str(path)
    return validate_seeds(yaml.safe_load(text), source)


def validate_seeds(data: object, source: str = "task seeds") -> dict[str, list[str]]:
    """The seeds as a clean mapping, or ValueError naming what is wrong."""
    if not isinstance(data, dict) or not data:
        raise ValueError(f"{source}: expected a mapping of task type -> list of example prompts")
    seeds: dict[str, list[str]] = {}
    for name, examples in data.items():
        if not isinstance(name, str) or not name or name == UNKNOWN:
            raise ValueError(f"{source}: {name!r} is not a usable task type name")
        if not isinstance(examples, list) or not examples:
            raise ValueError(f"{source}: {name}: expected a non-empty list of example prompts")
        cleaned = [e.strip() for e in examples if isinstance(e, str) and e.strip()]
        if len(cleaned) != len(examples):
            raise ValueError(f"{source}: {name}: every example must be a non-empty string")
        seeds[name] = cleaned
    return seeds


def seeds_from_config(task_seeds: dict[str, list[str]] | None) -> dict[str, list[str]]:
    """`LoopConfig.task_seeds` when set (it replaces the built-in seeds), else the built-in ones."""
    if task_seeds:
        return validate_seeds(task_seeds, "loop.task_seeds")
    return load_seeds()


class TaskClassifier:
    """Labels prompt vectors with a task type by their nearest seed examples.

    Vectors are compared after taking out the seeds' mean vector: sentence vectors share a large
    common direction ("this is a request") that otherwise drowns the words telling types apart.

    method "knn" (the default; measured better, see bench/task_types.py): the k most similar
    seeds vote, each with weight exp((similarity - best) / temperature), so a few close seeds
    outweigh many loose ones. method "centroid": a softmax over the similarities to each type's
    mean seed vector, with the same temperature.

    The confidence returned is the share of the vote won by the chosen type (0..1; 1 when every
    near seed agrees). A prompt is "unknown" when its confidence is under `min_confidence` (its
    neighbours disagree) or when no seed at all has a plain cosine similarity of `min_similarity`.
    """

    def __init__(self, seeds: dict[str, list[str]], embedder: Embedder, *,
                 method: Literal["knn", "centroid"] = "knn", k: int = 15, temperature: float = 0.1,
                 min_confidence: float = 0.4, min_similarity: float = 0.15) -> None:
        if method not in ("knn", "centroid"):
            raise ValueError(f"method must be 'knn' or 'centroid', not {method!r}")
        if k < 1 or temperature <= 0:
            raise ValueError("k must be at least 1 and temperature above 0")
        seeds = validate_seeds(seeds)
        self.embedder = embedder
        self.method = method
        self.k = k
        self.temperature = temperature
        self.min_confidence = min_confidence
        self.min_similarity = min_similarity
        # Sorted names make label ids, and so every tie-break, independent of dict order.
        self.types = sorted(seeds)
        self.seed_texts = [t for name in self.types for t in seeds[name]]
        self.seed_labels = np.array([i for i, name in enumerate(self.types) for _ in seeds[name]])
        self.seed_vecs = embedder.embed(self.seed_texts)
        self.center = self.seed_vecs.mean(axis=0)
        self._seeds_c = _unit(self.seed_vecs - self.center)
        self._centroids_c = _unit(np.stack([self._seeds_c[self.seed_labels == i].mean(axis=0)
                                            for i in range(len(self.types))]))

    def classify(self, vecs: np.ndarray) -> list[tuple[str, float]]:
        """(task type or "unknown", confidence) per row of `vecs` (unit vectors, shape (n, dim))."""
        vecs = np.atleast_2d(np.asarray(vecs, dtype=np.float32))
        if len(vecs) == 0:
            return []
        votes = self.votes(vecs)
        best = votes.argmax(axis=1)
        confidence = votes[np.arange(len(vecs)), best]
        nearest = (vecs @ self.seed_vecs.T).max(axis=1)
        known = (confidence >= self.min_confidence) & (nearest >= self.min_similarity)
        return [(self.types[b] if ok else UNKNOWN, round(float(c), 4))
                for b, c, ok in zip(best, confidence, known, strict=True)]

    def classify_texts(self, texts: list[str]) -> list[tuple[str, float]]:
        return self.classify(self.embedder.embed(texts))

    def classify_text(self, text: str) -> tuple[str, float]:
        """One prompt, as the gateway calls it per request."""
        return self.classify(self.embedder.embed_one(text)[None, :])[0]

    def votes(self, vecs: np.ndarray) -> np.ndarray:
        """Each type's share of the vote per row, shape (n, len(self.types)), rows summing to 1."""
        vecs_c = _unit(np.atleast_2d(vecs) - self.center)
        if self.method == "centroid":
            sims = vecs_c @ self._centroids_c.T
            weights = np.exp((sims - sims.max(axis=1, keepdims=True)) / self.temperature)
            return weights / weights.sum(axis=1, keepdims=True)
        sims = vecs_c @ self._seeds_c.T
        k = min(self.k, sims.shape[1])
        # A stable sort on -similarity: equal similarities keep seed order, so results never vary.
        top = np.argsort(-sims, axis=1, kind="stable")[:, :k]
        top_sims = np.take_along_axis(sims, top, axis=1)
        weights = np.exp((top_sims - top_sims[:, :1]) / self.temperature)
        votes = np.zeros((len(sims), len(self.types)))
        np.add.at(votes, (np.arange(len(sims))[:, None], self.seed_labels[top]), weights)
        return votes / votes.sum(axis=1, keepdims=True)


def _unit(x: np.ndarray) -> np.ndarray:
    return (x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)).astype(np.float32)


_WORD = re.compile(r"[a-z][a-z0-9+#'-]*[a-z0-9+#]|[a-z]")
_STOPWORDS = frozenset("""
a about above after again against all am an and any are as at be because been before being below
between both but by can could did do does doing down during each few for from further had has have
having he her here hers herself him himself his how i if in into is it its itself just let me more
most my myself no nor not now of off on once only or other our ours ourselves out over own please
same she should so some such than that the their theirs them themselves then there these they this
those through to too under until up very was we were what when where which while who whom why will
with would you your yours yourself yourselves i'm it's don't can't i'd i've you're also get make
using use want need like one two us may might must shall yes
""".split())


def _words(text: str) -> set[str]:
    return {w for w in _WORD.findall(text.lower()) if w not in _STOPWORDS and len(w) > 1}


def _dense_groups(vecs: np.ndarray, threshold: float, min_size: int, chunk: int = 2048) -> list[np.ndarray]:
    """Greedy density clustering. The point with the most neighbours (cosine >= threshold) founds a
    group of its still-free neighbours, which then takes in every free point as close to the
    group's centroid; then the next densest free point, and so on. Scattered points join none."""
    n = len(vecs)
    neighbours: list[np.ndarray] = []
    for start in range(0, n, chunk):
        sims = vecs[start:start + chunk] @ vecs.T
        neighbours.extend(np.flatnonzero(row >= threshold) for row in sims)
    counts = np.array([len(nb) for nb in neighbours])
    order = np.lexsort((np.arange(n), -counts))  # most neighbours first, then by position
    free = np.ones(n, dtype=bool)
    groups = []
    for i in order:
        if counts[i] < min_size:
            break
        if not free[i]:
            continue
        core = neighbours[i][free[neighbours[i]]]
        if len(core) < min_size:
            continue
        centroid = _unit(vecs[core].mean(axis=0))
        members = np.union1d(core, np.flatnonzero(free & (vecs @ centroid >= threshold)))
        free[members] = False
        groups.append(members)
    return groups


def candidate_types(vecs: np.ndarray, texts: list[str], labels: list[str], confidences: list[float], *,
                    min_cluster_size: int = 10, similarity: float = 0.45, min_confidence: float | None = 0.5,
                    max_points: int = 5000, n_examples: int = 5, n_words: int = 8,
                    random_state: int = 0) -> list[dict]:
    """Groups of prompts the classifier could not place well, each a possible new task type.

    Considered: rows labelled "unknown", plus rows whose confidence is under `min_confidence`
    (None: unknown rows only). A group is at least `min_cluster_size` of them around a dense core
    (cosine >= `similarity`); groups come largest first. Each reports a suggested name, its size,
    the row indices, the prompts nearest its centroid, the words that set it apart from all the
    texts given, its mean cosine to the centroid and the centroid (a unit vector). Over
    `max_points` candidates are sampled down with `random_state`, so results are reproducible.
    """
    vecs = np.asarray(vecs, dtype=np.float32)
    if not (len(vecs) == len(texts) == len(labels) == len(confidences)):
        raise ValueError("vecs, texts, labels and confidences must have one entry per prompt")
    pool = np.array([i for i, (lab, conf) in enumerate(zip(labels, confidences, strict=True))
                     if lab == UNKNOWN or (min_confidence is not None and conf < min_confidence)], dtype=int)
    if len(pool) > max_points:
        pool = np.sort(np.random.default_rng(random_state).choice(pool, size=max_points, replace=False))
    if len(pool) < min_cluster_size:
        return []

    pool_vecs = vecs[pool]
    groups = _dense_groups(pool_vecs, similarity, min_cluster_size)
    groups.sort(key=lambda g: (-len(g), int(g[0])))

    words = [_words(t) for t in texts]
    df_all = Counter(w for ws in words for w in ws)
    out: list[dict] = []
    for members in groups:
        rows = pool[members]
        centroid = _unit(pool_vecs[members].mean(axis=0))
        sims = pool_vecs[members] @ centroid
        nearest = rows[np.lexsort((rows, -sims))][:n_examples]
        df_c = Counter(w for r in rows for w in words[r])
        # Common in the group and rare elsewhere: tf-idf on document frequencies.
        scored = [(df_c[w] / len(rows) * math.log((len(texts) + 1) / (df_all[w] + 1)), w)
                  for w in df_c if df_c[w] >= max(2, len(rows) // 5)]
        top_words = [w for _, w in sorted(scored, key=lambda sw: (-sw[0], sw[1]))[:n_words]]
        out.append({
            "name": "-".join(top_words[:2]) or f"cluster-{len(out) + 1}",
            "size": int(len(rows)),
            "indices": sorted(int(r) for r in rows),
            "examples": [texts[r] for r in nearest],
            "top_words": top_words,
            "mean_similarity": round(float(sims.mean()), 4),
            "centroid": centroid,
        })
    return out
