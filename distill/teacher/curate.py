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
    finder = DuplicateFinder(threshold, shingle, permutations, bands, seed)
    for text in texts:
        finder.add(text)
    return finder.finish(texts.__getitem__)


class DuplicateFinder:
    """find_duplicates for a stream of problems: `add` each text in input order (it keeps a
    16-byte digest and the LSH band hashes, 272 bytes a problem, not the text), then `finish`
    with a way to get a text back by index (only candidate pairs are read again)."""

    def __init__(self, threshold: float = 0.8, shingle: int = 3, permutations: int = 128, bands: int = 32, seed: int = 0):
        assert permutations % bands == 0, f"permutations ({permutations}) must be a multiple of bands ({bands})"
        self.threshold, self.shingle, self.bands, self.rows = threshold, shingle, bands, permutations // bands
        rng = np.random.default_rng(seed)
        self._a = rng.integers(1, (1 << 32) - 5, size=permutations, dtype=np.uint64)
        self._b = rng.integers(0, (1 << 32) - 5, size=permutations, dtype=np.uint64)
        self._first_of: dict[bytes, int] = {}  # digest of the normalised text -> first index
        self._exact: list[Duplicate] = []
        self._unique: list[int] = []  # indices of the first copies, in input order
        self._band_hashes: list[np.ndarray] = []  # (bands,) uint64 per unique problem; all-zero rows = no shingles
        self._has_shingles: list[bool] = []
        self._count = 0

    def add(self, text: str) -> None:
        index = self._count
        self._count += 1
        key = hashlib.blake2b(normalised(text).encode("utf-8"), digest_size=16).digest()
        if key in self._first_of:
            self._exact.append(Duplicate(index, self._first_of[key], 1.0, "exact"))
            return
        self._first_of[key] = index
        self._unique.append(index)
        if self.threshold >= 1.0:
            return
        shingles = self._shingles(text)
        self._has_shingles.append(bool(shingles))
        if not shingles:
            self._band_hashes.append(np.zeros(self.bands, dtype=np.uint64))
            return
        signature = _minhash(np.fromiter(shingles, dtype=np.uint64, count=len(shingles)), self._a, self._b)  # (P,)
        bands = signature.reshape(self.bands, self.rows)
        digests = [hashlib.blake2b(band.tobytes(), digest_size=8).digest() for band in bands]
        self._band_hashes.append(np.frombuffer(b"".join(digests), dtype=np.uint64))

    def _shingles(self, text: str) -> set[int]:
        return {_hash32(" ".join(g)) for g in _ngrams(words(text), self.shingle)}

    def finish(self, text_of) -> list[Duplicate]:
        """The duplicates, sorted by index; `text_of(index)` returns the text added at `index`."""
        duplicates = list(self._exact)
        if self.threshold >= 1.0 or len(self._unique) < 2:
            return sorted(duplicates, key=lambda d: d.index)
        hashes = np.stack(self._band_hashes)  # (U, bands)
        usable = np.asarray(self._has_shingles)
        # Candidate pairs exactly as a position-ordered scan of LSH buckets would meet them: each
        # position is compared with the first BUCKET_COMPARISONS earlier members of each bucket.
        candidates: list[tuple[int, int, int, int]] = []  # (position, band, rank of the other, other)
        positions = np.nonzero(usable)[0]
        for band in range(self.bands):
            keys = hashes[positions, band]
            order = np.argsort(keys, kind="stable")  # positions ascending inside each bucket
            sorted_keys, sorted_positions = keys[order], positions[order]
            starts = np.flatnonzero(np.r_[True, sorted_keys[1:] != sorted_keys[:-1]])
            ends = np.r_[starts[1:], len(sorted_keys)]
            for start, end in zip(starts[ends - starts > 1], ends[ends - starts > 1]):
                members = sorted_positions[start:end].tolist()
                for rank_i in range(1, len(members)):
                    for rank_j in range(min(rank_i, BUCKET_COMPARISONS)):
                        candidates.append((members[rank_i], band, rank_j, members[rank_j]))
        candidates.sort()
        parent = list(range(len(self._unique)))  # union-find over positions in the unique list

        def root(x: int) -> int:
            while parent[x] != x:
                parent[x] = parent[parent[x]]
                x = parent[x]
            return x

        shingle_cache: dict[int, set[int]] = {}

        def shingles_at(position: int) -> set[int]:
            if position not in shingle_cache:
                shingle_cache[position] = self._shingles(text_of(self._unique[position]))
            return shingle_cache[position]

        similarity: dict[int, float] = {}
        for position, _, _, other_position in candidates:
            if root(other_position) == root(position):
                continue
            mine, other = shingles_at(position), shingles_at(other_position)
            jaccard = len(mine & other) / len(mine | other)
            if jaccard >= self.threshold:
                low, high = sorted((root(position), root(other_position)))
                parent[high] = low  # the earliest problem stays the root: it is the one kept
                similarity[position] = max(similarity.get(position, 0.0), jaccard)
        for position in range(len(self._unique)):
            top = root(position)
            if top != position:
                duplicates.append(Duplicate(self._unique[position], self._unique[top], round(similarity.get(position, self.threshold), 4), "near"))
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
