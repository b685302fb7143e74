"""Text quality: the n-gram entropy of generations (docs/methods.md), as the ROME/MEMIT line of papers
computes it. Per text, with H_n the Shannon entropy in bits of its word n-gram frequency distribution:

    fluency(text) = mean(⅔ · H₂, ⁴⁄₃ · H₃)

and ``gen/fluency`` is the mean over the generations. A model that degenerates into repeating itself has few
distinct n-grams, so its entropy drops. Words are ``\\w+`` runs and single punctuation marks (the papers use NLTK's
word tokenizer, which splits the same way for plain English text).
"""

from __future__ import annotations

import math
import re
from collections import Counter
from typing import Sequence

WEIGHTS = {2: 2 / 3, 3: 4 / 3}
_TOKEN = re.compile(r"\w+|[^\w\s]")


def words(text: str) -> list[str]:
    return _TOKEN.findall(text)


def ngram_entropy(tokens: Sequence[str], n: int) -> float:
    """Entropy in bits of the n-gram frequency distribution (0 for fewer than n tokens)."""
    grams = Counter(tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1))
    total = sum(grams.values())
    return -sum(c / total * math.log2(c / total) for c in grams.values()) if total else 0.0


def fluency(text: str) -> float:
    tokens = words(text)
    return sum(weight * ngram_entropy(tokens, n) for n, weight in WEIGHTS.items()) / len(WEIGHTS)


def mean_fluency(texts: Sequence[str]) -> float:
    if not texts:
        raise ValueError("fluency of no generations")
    return sum(fluency(t) for t in texts) / len(texts)
