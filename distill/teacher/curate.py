"""Curation helpers of `distill filter`: problem-text normalisation, decontamination against
benchmarks, exact and near-duplicate detection, and per-problem selection.

**Normalisation** (both dedup and decontamination): Unicode NFKC, lower case, words are runs of
letters or digits (LaTeX commands become their names: `\\frac{1}{2}` -> `frac 1 2`), so spacing,
punctuation and `$` do not hide a copy.

**Decontamination**: a training problem is contaminated when it shares at least one word
n-gram (default n=8, as open-r1's decontamination) with a benchmark problem. A text shorter than
n words is one n-gram of its own length, matched only by an equal text. The match reported is
the benchmark item sharing the most n-grams.

**Near duplicates**: MinHash (128 permutations) of word 3-gram shingles, LSH with 32 bands of 4
rows to find candidates (a pair at Jaccard 0.8 shares a band with probability 1 - 1e-7; at 0.3,
0.23), then the exact Jaccard similarity of the shingle sets decides (>= threshold, default 0.8).
A problem is compared with at most the first 16 members of each bucket it falls in (linear cost).
In each group of copies the problem seen first in the input is kept. At 0.8, a 30-word problem
with one word inserted or changed (a number included) is a copy; a 20-word one is not (0.76).
"""

from __future__ import annotations

import hashlib
import random
import re
import unicodedata
from dataclasses import dataclass
from typing import Sequence

import numpy as np

_WORD = re.compile(r"[^\W_]+")
_PRIME = np.uint64((1 << 32) - 5)
_SHINGLE_MASK = (1 << 32) - 1
BUCKET_COMPARISONS = 16  # members of an LSH bucket a new problem is compared with (bounds the cost)


def words(text: str) -> list[str]:
    return _WORD.findall(unicodedata.normalize("NFKC", text).lower())


def normalised(text: str) -> str:
    return " ".join(words(text))


def _ngrams(tokens: list[str], n: int) -> set[tuple[str, ...]]:
    if len(tokens) < n:
        return {tuple(tokens)} if tokens else set()
    return {tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)}


# --------------------------------------------------------------------------------------------
# decontamination


@dataclass(frozen=True)
class BenchmarkItem:
    benchmark: str  # "math500", "aime24", or a file name
    item_id: str
    text: str


@dataclass(frozen=True)
class Contamination:
    item: BenchmarkItem
    shared_ngrams: int


class BenchmarkIndex:
    """Word n-grams of benchmark problems -> the items holding them."""

    def __init__(self, items: Sequence[BenchmarkItem], n: int = 8):
        assert n >= 1, f"n-gram size must be >= 1, got {n}"
        self.n = n
        self.items = list(items)
        self._grams: dict[tuple[str, ...], list[int]] = {}
        for index, item in enumerate(self.items):
            for gram in _ngrams(words(item.text), n):
                holders = self._grams.setdefault(gram, [])
                if not holders or holders[-1] != index:
                    holders.append(index)

    def match(self, text: str) -> Contamination | None:
        shared: dict[int, int] = {}
        for gram in _ngrams(words(text), self.n):
            for index in self._grams.get(gram, ()):
                shared[index] = shared.get(index, 0) + 1
        if not shared:
            return None
        best = max(shared, key=lambda index: (shared[index], -index))
        return Contamination(self.items[best], shared[best])


# --------------------------------------------------------------------------------------------
# duplicates


@dataclass(frozen=True)
class Duplicate:
    index: int  # the problem removed
    kept: int  # the problem it duplicates (kept)
    similarity: float  # 1.0 for an exact copy (after normalisation)
    kind: str  # "exact" | "near"


def find_duplicates(texts: Sequence[str], threshold: float = 0.8, shingle: int = 3, permutations: int = 128, bands: int = 32, seed: int = 0) -> list[Duplicate]:
    """Problems that copy an earlier one, exactly or nearly (see the module docstring)."""
    assert permutations % bands == 0, f"permutations ({permutations}) must be a multiple of bands ({bands})"
    duplicates: list[Duplicate] = []
    first_of: dict[str, int] = {}
    unique: list[int] = []
    for index, text in enumerate(texts):
        key = normalised(text)
        if key in first_of:
            duplicates.append(Duplicate(index, first_of[key], 1.0, "exact"))
        else:
            first_of[key] = index
            unique.append(index)
    if threshold >= 1.0 or len(unique) < 2:
        return duplicates

    shingles = [{_hash32(" ".join(g)) for g in _ngrams(words(texts[i]), shingle)} for i in unique]
    rng = np.random.default_rng(seed)
    a = rng.integers(1, (1 << 32) - 5, size=permutations, dtype=np.uint64)
    b = rng.integers(0, (1 << 32) - 5, size=permutations, dtype=np.uint64)
    rows = permutations // bands
    parent = list(range(len(unique)))  # union-find over positions in `unique`

    def root(x: int) -> int:
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    buckets: dict[tuple[int, bytes], list[int]] = {}
    similarity: dict[int, float] = {}
    for position, shingle_set in enumerate(shingles):
        if not shingle_set:
            continue
        signature = _minhash(np.fromiter(shingle_set, dtype=np.uint64, count=len(shingle_set)), a, b)  # (P,)
        for band in range(bands):
            members = buckets.setdefault((band, signature[band * rows : (band + 1) * rows].tobytes()), [])
            for other_position in members[:BUCKET_COMPARISONS]:
                if root(other_position) == root(position):
                    continue
                other = shingles[other_position]
                jaccard = len(shingle_set & other) / len(shingle_set | other)
                if jaccard >= threshold:
                    low, high = sorted((root(position), root(other_position)))
                    parent[high] = low  # the earliest problem stays the root: it is the one kept
                    similarity[position] = max(similarity.get(position, 0.0), jaccard)
            members.append(position)
    for position in range(len(unique)):
        top = root(position)
        if top != position:
            duplicates.append(Duplicate(unique[position], unique[top], round(similarity.get(position, threshold), 4), "near"))
    return sorted(duplicates, key=lambda d: d.index)


def _hash32(text: str) -> int:
    return int.from_bytes(hashlib.blake2b(text.encode("utf-8"), digest_size=4).digest(), "little") & _SHINGLE_MASK


def _minhash(shingles: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Min over shingles of (a*x + b) mod p per permutation, (S,) -> (P,). With p = 2^32 - 5
    and a, b, x < 2^32, a*x + b < 2^64: exact in uint64."""
    value = (shingles[:, None] * a[None, :] + b[None, :]) % _PRIME  # (S, P)
    return value.min(axis=0)


# --------------------------------------------------------------------------------------------
# selection


def select(candidates: Sequence[tuple[int, int, int]], mode: str, k: int, seed: int, problem_id: str) -> list[int]:
    """Pick rows of one problem. `candidates`: (row, sample_idx, length) of its rows that passed
    every check. Modes: "all"; "max_k" (the first k by sample index); "shortest" (the k shortest;
    ties by sample index); "random_k" (k at random, seeded by (seed, problem id): the same rows
    whatever the input order)."""
    ordered = sorted(candidates, key=lambda c: c[1])
    if mode == "all":
        chosen = ordered
    elif mode == "max_k":
        chosen = ordered[:k]
    elif mode == "shortest":
        chosen = sorted(ordered, key=lambda c: (c[2], c[1]))[:k]
    elif mode == "random_k":
        rng = random.Random(f"{seed}:{problem_id}")
        chosen = rng.sample(ordered, min(k, len(ordered)))
    else:
        raise ValueError(f"unknown selection mode {mode!r}")
    return [c[0] for c in chosen]
