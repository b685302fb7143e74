"""The fact memory: one sentence per edit, embedded once, in a FAISS index that grows as edits arrive.

Index types (``index_type``):
  flat  exact inner-product search (``IndexFlatIP``), the default: a few thousand facts are searched in
        microseconds and the result is exact.
  hnsw  approximate search (``IndexHNSWFlat``, inner product, M = 32) for memories of hundreds of thousands of
        facts; it too accepts incremental adds without training.

``save(folder)`` / ``FactMemory.load(folder, embedder)`` store the index, the sentences, their ids and the raw
embeddings (so the memory can be re-indexed with another index type), for the trial checkpoint.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import faiss
import numpy as np

from retrieval.embedder import Embedder

INDEX_TYPES = ("flat", "hnsw")
HNSW_NEIGHBOURS = 32
FORMAT_VERSION = 1


@dataclass(frozen=True)
class Hit:
    position: int  # insertion order in the memory
    fact_id: str
    fact: str
    score: float


def _new_index(index_type: str, dim: int):
    if index_type == "flat":
        return faiss.IndexFlatIP(dim)
    if index_type == "hnsw":
        return faiss.IndexHNSWFlat(dim, HNSW_NEIGHBOURS, faiss.METRIC_INNER_PRODUCT)
    raise ValueError(f"index_type {index_type!r} is unknown (known: {', '.join(INDEX_TYPES)})")


class FactMemory:
    def __init__(self, embedder: Embedder, index_type: str = "flat"):
        self.embedder = embedder
        self.index_type = index_type
        self.index = _new_index(index_type, embedder.dim)
        self.facts: list[str] = []
        self.fact_ids: list[str] = []
        self._vectors: list[np.ndarray] = []
        self._query_vectors: dict[str, np.ndarray] = {}  # a trial re-asks the same prompts at every checkpoint

    def __len__(self) -> int:
        return len(self.facts)

    @property
    def index_bytes(self) -> int:
        """Size of the serialised FAISS index (the memory's footprint, sentences aside)."""
        return int(faiss.serialize_index(self.index).nbytes)

    def add(self, facts: list[str], fact_ids: list[str]) -> None:
        if len(facts) != len(fact_ids):
            raise ValueError(f"{len(facts)} facts but {len(fact_ids)} ids")
        if not facts:
            return
        vectors = self.embedder.encode(facts)
        self.index.add(vectors)
        self.facts.extend(facts)
        self.fact_ids.extend(fact_ids)
        self._vectors.append(vectors)

    def embed_queries(self, queries: list[str], cache: bool = True) -> np.ndarray:
        """Query vectors; with ``cache`` each distinct query is embedded once per memory (``cache=False`` always
        embeds, e.g. to time a query as a user would send it)."""
        if not cache:
            return self.embedder.encode(queries)
        missing = list(dict.fromkeys(q for q in queries if q not in self._query_vectors))
        if missing:
            for query, vector in zip(missing, self.embedder.encode(missing)):
                self._query_vectors[query] = vector
        if not queries:
            return np.zeros((0, self.embedder.dim), dtype=np.float32)
        return np.stack([self._query_vectors[q] for q in queries])

    def search(self, queries: list[str], k: int, cache: bool = True) -> list[list[Hit]]:
        """The top-``k`` facts for each query, best first (fewer when the memory holds fewer than k facts)."""
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        if not queries:
            return []
        if not self.facts:
            return [[] for _ in queries]
        scores, positions = self.index.search(self.embed_queries(queries, cache), min(k, len(self.facts)))
        return [[Hit(int(p), self.fact_ids[p], self.facts[p], float(s)) for s, p in zip(row_s, row_p) if p >= 0]
                for row_s, row_p in zip(scores, positions)]

    def save(self, folder: str | Path) -> Path:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        faiss.write_index(self.index, str(folder / "index.faiss"))
        vectors = np.concatenate(self._vectors) if self._vectors else np.zeros((0, self.embedder.dim), np.float32)
        np.save(folder / "embeddings.npy", vectors)
        meta = {"format_version": FORMAT_VERSION, "embedder": self.embedder.name, "dim": self.embedder.dim,
                "index_type": self.index_type, "facts": self.facts, "fact_ids": self.fact_ids}
        (folder / "facts.json").write_text(json.dumps(meta, indent=1))
        return folder

    @classmethod
    def load(cls, folder: str | Path, embedder: Embedder) -> FactMemory:
        folder = Path(folder)
        meta_path = folder / "facts.json"
        if not meta_path.is_file():
            raise FileNotFoundError(f"{meta_path}: no saved fact memory here")
        meta = json.loads(meta_path.read_text())
        if meta.get("format_version") != FORMAT_VERSION:
            raise ValueError(f"{meta_path}: format_version {meta.get('format_version')!r}, expected {FORMAT_VERSION}")
        if meta["embedder"] != embedder.name or meta["dim"] != embedder.dim:
            raise ValueError(f"{meta_path}: saved with embedder {meta['embedder']!r} (dim {meta['dim']}), "
                             f"loaded with {embedder.name!r} (dim {embedder.dim}); the vectors are not comparable")
        memory = cls(embedder, meta["index_type"])
        memory.index = faiss.read_index(str(folder / "index.faiss"))
        memory.facts, memory.fact_ids = list(meta["facts"]), list(meta["fact_ids"])
        vectors = np.load(folder / "embeddings.npy")
        memory._vectors = [vectors] if len(vectors) else []
        if memory.index.ntotal != len(memory.facts) or len(vectors) != len(memory.facts):
            raise ValueError(f"{folder}: index holds {memory.index.ntotal} vectors, embeddings {len(vectors)}, "
                             f"facts {len(memory.facts)}; the saved memory is inconsistent")
        return memory
