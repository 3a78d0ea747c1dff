"""The teacher's top-k log-probs of every sampled token, stored beside the trace file.

`distill generate ... top_logprobs=20` keeps, for every generated token, the k most likely
tokens under the teacher and their log-probs (temperature 1, before top-p): what `distill train
kd_alpha=...` distils from. They are large (a 32k-token trace with k=20 is 655k numbers), so
they are not JSON: each trace file `traces[.shard-I-of-N].jsonl` has a binary sidecar
`traces[.shard-I-of-N].topk.bin`, and each record holds a reference to its block:

    "top_logprobs": {"file": "traces.topk.bin", "offset": 123456, "tokens": 812, "k": 20}

A block is three little-endian arrays, end to end, for `tokens` = n generated tokens:
    sampled   (n,)   int32     the sampled token ids (Completion.token_ids): train aligns on them
    ids       (n, k) int32     the teacher's top-k token ids, most likely first
    logprobs  (n, k) float16   their log-probs (-inf pads a row an engine returned short)
so 4 + 6k bytes per token (124 at k=20: 4 MB for a 32k-token trace). float16 keeps log-probs
to about 3 significant digits (0.05% relative), below what the KD loss can feel; ids need 32
bits (Qwen's vocabulary has 152k entries). No compression: blocks are read by memory map at
training time, a slice per sequence, without decoding the file.

Crash safety (the same guarantee as the JSONL): generate appends a batch's blocks and fsyncs
the sidecar before it writes the records that reference them; on resume the sidecar is cut back
to the end of the last block a record references (`repair_sidecar`), so a tail written without
its record (kill -9 between the two writes) is dropped and written again, never referenced twice.

In the trace file `file` is relative to the trace file's folder (a run directory can be moved
or its shards copied together); readers (`distill.records.iter_traces`) resolve it to an
absolute path, which is what `distill filter` writes into accepted.parquet.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

from distill.errors import InputError

SUFFIX = ".topk.bin"
_REFERENCE_KEYS = ("file", "offset", "tokens", "k")


def sidecar_path(trace_path: str | Path) -> Path:
    """traces.jsonl -> traces.topk.bin; traces.shard-0-of-4.jsonl -> traces.shard-0-of-4.topk.bin."""
    trace_path = Path(trace_path)
    return trace_path.with_name(trace_path.stem + SUFFIX)


def bytes_per_token(k: int) -> int:
    """Storage of one generated token: its id (int32) and k (id int32, log-prob float16) pairs."""
    return 4 + 6 * k


def block_size(tokens: int, k: int) -> int:
    return tokens * bytes_per_token(k)


def reference_end(reference: Mapping[str, Any]) -> int:
    """The byte after a reference's block."""
    return int(reference["offset"]) + block_size(int(reference["tokens"]), int(reference["k"]))


def pack(token_ids: Sequence[int], top: Sequence[tuple[Sequence[int], Sequence[float]]], k: int) -> bytes:
    """One block from an engine's Completion.token_ids and Completion.top_logprobs."""
    import numpy as np

    if len(top) != len(token_ids):
        raise ValueError(f"{len(top)} top-k rows for {len(token_ids)} generated tokens")
    if all(len(row_ids) == k for row_ids, _ in top):  # the usual case: one conversion, no Python loop over rows
        ids = np.asarray([row_ids for row_ids, _ in top], dtype="<i4").reshape(len(top), k)
        logprobs = np.asarray([row_logprobs for _, row_logprobs in top], dtype="<f2").reshape(len(top), k)
    else:
        ids = np.zeros((len(top), k), dtype="<i4")
        logprobs = np.full((len(top), k), -np.inf, dtype="<f2")
        for row, (row_ids, row_logprobs) in enumerate(top):
            width = min(k, len(row_ids))
            ids[row, :width] = row_ids[:width]
            logprobs[row, :width] = row_logprobs[:width]
    return np.asarray(token_ids, dtype="<i4").tobytes() + ids.tobytes() + logprobs.tobytes()


@dataclass
class TopK:
    sampled: Any  # (n,) int32
    ids: Any  # (n, k) int32
    logprobs: Any  # (n, k) float16

    def __len__(self) -> int:
        return len(self.sampled)


def unpack(buffer: Any, tokens: int, k: int) -> TopK:
    """A block's arrays from its bytes (a bytes object or a uint8 memmap slice): views, no copy."""
    import numpy as np

    data = np.frombuffer(buffer, dtype=np.uint8) if isinstance(buffer, (bytes, bytearray)) else buffer
    first, second = tokens * 4, tokens * 4 * (1 + k)
    return TopK(
        data[:first].view("<i4"),
        data[first:second].view("<i4").reshape(tokens, k),
        data[second : second + tokens * k * 2].view("<f2").reshape(tokens, k),
    )


class SidecarWriter:
    """Appends blocks to a sidecar, fsynced before the records that reference them are written."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._handle = self.path.open("ab")
        self.size = self._handle.seek(0, os.SEEK_END)

    def append(self, blocks: Sequence[bytes]) -> list[int]:
        """Write the blocks end to end; returns each one's offset."""
        offsets = []
        for block in blocks:
            offsets.append(self.size)
            self._handle.write(block)
            self.size += len(block)
        if blocks:
            self._handle.flush()
            os.fsync(self._handle.fileno())
        return offsets

    def close(self) -> None:
        self._handle.close()


def repair_sidecar(path: Path, referenced_end: int) -> int:
    """Cut a sidecar back to the end of the last block a record references (a tail written by a
    run killed before its records were); returns bytes removed. A sidecar shorter than what the
    records reference has lost data: an InputError naming it."""
    size = path.stat().st_size if path.exists() else 0
    if size < referenced_end:
        raise InputError(
            f"{path}: {size} bytes, but the trace records reference {referenced_end}; the top-k sidecar was truncated or replaced. "
            "Restore it, or generate into a new --out"
        )
    if size > referenced_end:
        with path.open("rb+") as handle:
            handle.truncate(referenced_end)
            handle.flush()
            os.fsync(handle.fileno())
    return size - referenced_end


def parse_reference(value: Any, where: str) -> dict[str, Any] | None:
    """A record's `top_logprobs` reference (a mapping, or JSON text in Parquet), checked; None stays None."""
    import json

    if value is None:
        return None
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError:
            raise InputError(f"{where}: 'top_logprobs' is text that is not JSON") from None
    if not isinstance(value, Mapping) or any(key not in value for key in _REFERENCE_KEYS):
        raise InputError(f"{where}: 'top_logprobs' must be {{file, offset, tokens, k}} (a reference into a .topk.bin sidecar)")
    try:
        reference = {"file": str(value["file"]), "offset": int(value["offset"]), "tokens": int(value["tokens"]), "k": int(value["k"])}
    except (TypeError, ValueError):
        raise InputError(f"{where}: 'top_logprobs' has a non-integer offset, tokens or k") from None
    if reference["offset"] < 0 or reference["tokens"] < 0 or reference["k"] < 1:
        raise InputError(f"{where}: 'top_logprobs' needs offset >= 0, tokens >= 0 and k >= 1")
    return reference


def resolve_reference(reference: dict[str, Any] | None, folder: Path) -> dict[str, Any] | None:
    """The reference with its file made absolute, relative names read from `folder`."""
    if reference is None or Path(reference["file"]).is_absolute():
        return reference
    return {**reference, "file": str((folder / reference["file"]).resolve())}


class TopKReader:
    """Reads referenced blocks by memory map (one map per sidecar, opened once)."""

    def __init__(self) -> None:
        self._maps: dict[str, Any] = {}

    def read(self, reference: Mapping[str, Any], where: str = "") -> TopK:
        import numpy as np

        name = str(reference["file"])
        data = self._maps.get(name)
        if data is None:
            if not Path(name).is_file():
                raise InputError(
                    f"{where + ': ' if where else ''}the teacher's top-k sidecar {name} is missing; "
                    "keep the `distill generate` run directory where it was when filtered, or train with kd_alpha=0"
                )
            data = self._maps[name] = np.memmap(name, dtype=np.uint8, mode="r") if os.path.getsize(name) else np.zeros(0, np.uint8)
        end = reference_end(reference)
        if end > len(data):
            raise InputError(f"{where + ': ' if where else ''}{name} ends at byte {len(data)}, before the referenced block's end ({end}); the sidecar is truncated")
        return unpack(data[int(reference["offset"]) : end], int(reference["tokens"]), int(reference["k"]))
