"""Training data for students: conversations -> token ids + loss mask -> packed micro-batches.

This module is THE one place where the loss mask is decided. The rule: a token is trained on
exactly when the student would generate it at inference, i.e. the text of every assistant turn
(reasoning and answer) followed by the end-of-turn token; never the system/user text, the
role headers, a generation prefill such as `<think>\\n`, or whatever the template prints after
the end-of-turn token.

How a conversation is rendered (`render_segments`):
1. Each assistant message's content is swapped for a sentinel and the whole conversation is
   rendered with the chat template. A template may rewrite assistant content (R1-Distill's keeps
   only the text after `</think>`, Llama-3's trims it); the sentinel passes through untouched,
   and the real content is put back afterwards. So the reasoning is never lost.
2. For each assistant turn the template's generation prompt for the conversation so far is
   rendered too. It must extend the text before the sentinel; whatever it adds (the `<think>\\n`
   prefill of R1-style templates) is moved from the start of the content to the prompt side,
   because at inference it is given, not generated.
3. The text after the sentinel must start with the end-of-turn token, which is trained on.
4. Segments are tokenized one by one (add_special_tokens=False: templates print their own BOS).
   Tokenizing the prompt separately from the reply is what inference does (the prompt is
   tokenized up to the assistant header, then the model generates), so no BPE merge straddles
   the boundary between what is given and what is learned.

Packing (`plan_step`): a step takes `global_batch` sequences; they are spread over ranks by
token count (longest first, to the rank with fewest tokens), and each rank packs its share into
micro-batches of at most `micro_batch_tokens` tokens (best-fit decreasing). A packed micro-batch
is one row of concatenated sequences whose position ids restart at 0 for each sequence; the
attention (flash-attn varlen where installed, else students/attention.py's sdpa_varlen, which
runs SDPA on each sequence alone) reads the boundaries from the position ids, so no token
attends across sequences. Targets are shifted
inside each sequence before concatenation, so no sequence predicts its neighbour's first token.
With packing off, a micro-batch is `micro_batch_size` sequences padded to the longest.
Every rank computes the same plan from the lengths alone, so every rank knows the global
number of trained tokens of a step without communicating, and all ranks run the same number of
micro-batches (a rank with fewer runs empty ones: FSDP's collectives must match).

The teacher's top-k (logit distillation, `distill train kd_alpha=...`): a row whose trace kept
them (`top_logprobs`, a reference into generate's sidecar, distill/topk.py) is aligned here, once,
when it is tokenized (`align_topk`): the teacher's sampled completion ids are located inside the
tokenized assistant turn (after the prefill the template gives), so token `start + j` of the
sequence is the teacher's sampled token j and its top-k train the logits at position
`start + j - 1`. A row whose ids are not found there is trained on cross-entropy alone and
counted; when no row is found, the student's tokenizer or template differs from the teacher's
and training refuses (`kd_refusal`).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import numpy as np

from distill.errors import ConfigError, InputError
from distill.records import iter_jsonl, record_from_row
from distill.topk import TopKReader, parse_reference, resolve_reference

IGNORE = -100  # target of a position that is not trained on
_SENTINEL = "\ue000distill-assistant-{}\ue001"  # private-use characters: no template touches them
_SENTINEL_RE = re.compile("\ue000distill-assistant-(\\d+)\ue001")


# --------------------------------------------------------------------------------------------
# reading


@dataclass
class Conversation:
    messages: list[dict[str, str]]
    where: str  # "file:line" or "file:row N", for error messages
    topk: dict[str, Any] | None = None  # the teacher's top-k of the last assistant turn: a sidecar reference (distill/topk.py)


def read_conversations(source: str | Path, split: str = "train", on_bad_row: str = "error") -> tuple[list[Conversation], list[str]]:
    """All conversations of a source, and the skipped-row messages (see iter_conversations)."""
    skipped: list[str] = []
    return list(iter_conversations(source, split, on_bad_row, skipped)), skipped


def iter_conversations(source: str | Path, split: str = "train", on_bad_row: str = "error", skipped: list[str] | None = None) -> Iterator[Conversation]:
    """Conversations, streamed, from Parquet/JSONL (a `messages` column, or `problem` +
    `completion`), a `distill filter` run directory (its accepted.parquet), or a hub dataset
    name. Bad rows raise InputError naming file and row, or with on_bad_row="skip" are appended
    to `skipped` and passed over."""
    path = Path(source)
    folder = path.parent if path.is_file() else path
    if path.is_dir():
        candidate = path / "accepted.parquet"
        if not candidate.is_file():
            raise InputError(f"{path}: a directory without accepted.parquet; pass a Parquet/JSONL file or a `distill filter` run directory")
        path = candidate
    if path.is_file():
        rows = _file_rows(path)
    elif re.fullmatch(r"[\w.-]+/[\w.-]+", str(source)) and not path.suffix:
        rows = _hub_rows(str(source), split)
    else:
        raise InputError(f"{source}: data not found; pass a Parquet/JSONL file, a `distill filter` run directory, or a hub dataset name")
    for where, row in rows:
        try:
            reference = parse_reference(row.get("top_logprobs"), where)
            yield Conversation(row_messages(row, where), where, resolve_reference(reference, folder))
        except InputError as error:
            if on_bad_row == "skip":
                if skipped is not None:
                    skipped.append(str(error))
                continue
            raise InputError(f"{error}; fix the row or pass on_bad_row=skip") from None


def row_messages(row: dict[str, Any], where: str) -> list[dict[str, str]]:
    """The chat messages of one row, checked: roles and string contents, at least one assistant
    turn with text in it."""
    messages = row.get("messages")
    if messages is None:
        if "problem" in row and "completion" in row:
            # The trace form: reuse the record reader (prompt JSON, minimal form) for one meaning.
            messages = record_from_row({"answer": None, **row}, where).messages()
        else:
            raise InputError(f"{where}: no 'messages' column and no 'problem' + 'completion'; a training row needs one of the two")
    if isinstance(messages, str):
        try:
            messages = json.loads(messages)
        except ValueError:
            raise InputError(f"{where}: 'messages' is a string that is not JSON") from None
    if not isinstance(messages, list) or not messages:
        raise InputError(f"{where}: 'messages' must be a non-empty list of {{role, content}}")
    clean = []
    for number, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str) or not isinstance(message.get("content"), str):
            raise InputError(f"{where}: message {number} is not {{role: str, content: str}}")
        clean.append({"role": message["role"], "content": message["content"]})
    if not any(m["role"] == "assistant" and m["content"].strip() for m in clean):
        raise InputError(f"{where}: no assistant turn with text, so nothing to train on")
    return clean


def _file_rows(path: Path) -> Iterable[tuple[str, dict]]:
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        try:
            handle = pq.ParquetFile(path)
        except Exception as error:  # pyarrow raises several types for a bad file
            raise InputError(f"{path}: not a readable Parquet file ({str(error).splitlines()[0][:120]})") from None
        batches = (batch.to_pylist() for batch in handle.iter_batches(batch_size=1024))  # streamed: the text is not all held at once
        return ((f"{path}:row {n}", row) for n, row in enumerate((row for batch in batches for row in batch), start=1))
    if path.suffix in (".jsonl", ".json"):
        return ((f"{path}:{n}", row) for n, row in iter_jsonl(path))
    raise InputError(f"{path}: unsupported data file type '{path.suffix}'; use .parquet or .jsonl")


def _hub_rows(name: str, split: str) -> Iterable[tuple[str, dict]]:
    import datasets

    try:
        dataset = datasets.load_dataset(name, split=split)
    except Exception as error:  # offline, unknown name, unknown split: all one message for the user
        reason = str(error).splitlines()[0][:160]
        raise InputError(f"{name}: no such local file, and no hub dataset of that name could be loaded (split '{split}'): {reason}") from None
    return ((f"{name}[{split}]:row {n}", row) for n, row in enumerate(dataset, start=1))


# --------------------------------------------------------------------------------------------
# rendering and tokenizing: the loss mask


@dataclass
class RenderNotes:
    """What rendering had to say about a dataset (reported once, not per row)."""

    prefill_missing: int = 0  # assistant turns that do not open with the template's prefill
    prefill: str = ""


def render_segments(messages: list[dict[str, str]], tokenizer, template, notes: RenderNotes | None = None) -> list[tuple[str, bool]]:
    """(text, trained) segments of one conversation, in order; see the module docstring."""
    turns = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    shown = [dict(m, content=_SENTINEL.format(k)) if m["role"] == "assistant" else dict(m) for k, m in _numbered(messages)]
    full = _render(tokenizer, template, shown, generation_prompt=False)
    found = [int(k) for k in _SENTINEL_RE.findall(full)]
    if found != list(range(len(turns))):
        raise ConfigError(
            f"chat template '{template.name}' does not render each assistant message exactly once, in order; "
            "choose another chat_template"
        )
    segments: list[tuple[str, bool]] = []
    cursor = 0  # position in `full` up to which text is already in segments
    for k, index in enumerate(turns):
        marker = _SENTINEL.format(k)
        start = full.index(marker)
        before = full[:start]
        generation = _render(tokenizer, template, shown[:index], generation_prompt=True)
        if not generation.startswith(before):
            raise ConfigError(
                f"chat template '{template.name}' renders an assistant turn differently from its generation prompt, "
                "so training would not match inference; choose another chat_template"
            )
        prefill = generation[len(before):]
        content = messages[index]["content"]
        prompt_text = full[cursor:start]
        if prefill and content.startswith(prefill):
            prompt_text, content = prompt_text + prefill, content[len(prefill):]
        elif prefill and notes is not None:
            notes.prefill_missing += 1
            notes.prefill = prefill
        after = start + len(marker)
        if not full.startswith(template.end_of_turn, after):
            raise ConfigError(
                f"chat template '{template.name}' does not close assistant turns with {template.end_of_turn!r}; "
                "set end_of_turn= to the token it uses"
            )
        segments.append((prompt_text, False))
        segments.append((content + template.end_of_turn, True))
        cursor = after + len(template.end_of_turn)
    # Text after the last end-of-turn (e.g. ChatML's "\n") is never generated: not kept.
    return [(text, trained) for text, trained in segments if text]


def _numbered(messages: list[dict[str, str]]) -> Iterable[tuple[int, dict[str, str]]]:
    count = 0
    for message in messages:
        yield count, message
        if message["role"] == "assistant":
            count += 1


def _render(tokenizer, template, messages: list[dict[str, str]], generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(
        messages, chat_template=template.source, tokenize=False, add_generation_prompt=generation_prompt
    )


@dataclass
class KDTarget:
    """The teacher's top-k of one sequence: input_ids[start + j] is the teacher's sampled token j
    (j < count); its k candidates and their log-probs (temperature 1) are ids[j], logprobs[j]."""

    start: int
    count: int
    ids: np.ndarray  # (count, k) int32
    logprobs: np.ndarray  # (count, k) float16


@dataclass
class Encoded:
    input_ids: np.ndarray  # (T,) int32
    loss_mask: np.ndarray  # (T,) bool: True where the token is trained on (predicted from t-1)
    where: str = ""
    kd: KDTarget | None = None  # with kd on and a row that kept the teacher's top-k
    topk: dict[str, Any] | None = None  # the reference `kd` was read from (kept by the cache)

    def __len__(self) -> int:
        return len(self.input_ids)


def tokenize_segments(batch: Sequence[list[tuple[str, bool]]], tokenizer) -> list[Encoded]:
    """Tokenize the segments of many conversations in one call (the Rust tokenizer is parallel)."""
    texts = [text for segments in batch for text, _ in segments]
    ids = tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else []
    out: list[Encoded] = []
    position = 0
    for segments in batch:
        pieces = ids[position : position + len(segments)]
        position += len(segments)
        input_ids = np.fromiter((t for piece in pieces for t in piece), dtype=np.int32)
        loss_mask = np.concatenate([np.full(len(piece), trained, dtype=bool) for piece, (_, trained) in zip(pieces, segments)]) if pieces else np.zeros(0, bool)
        out.append(Encoded(input_ids, loss_mask))
    return out


def encode(messages: list[dict[str, str]], tokenizer, template) -> Encoded:
    """One conversation -> token ids and loss mask."""
    return tokenize_segments([render_segments(messages, tokenizer, template)], tokenizer)[0]


@dataclass
class EncodedDataset:
    examples: list[Encoded]
    rows: int  # conversations read
    dropped_too_long: int = 0
    truncated: int = 0
    dropped_untrained: int = 0  # nothing left to train on after truncation
    skipped_rows: list[str] = field(default_factory=list)
    notes: RenderNotes = field(default_factory=RenderNotes)
    kd_rows: int = 0  # rows that carry the teacher's top-k (counted with kd on)
    kd_misaligned: int = 0  # ... whose completion ids are not in their tokenized assistant turn
    kd_first_misaligned: str = ""  # where the first of those is, for the message

    @property
    def tokens(self) -> int:
        return int(sum(len(e) for e in self.examples))

    @property
    def trained_tokens(self) -> int:
        return int(sum(int(e.loss_mask.sum()) for e in self.examples))


def encode_dataset(conversations: Iterable[Conversation], tokenizer, template, max_len: int, too_long: str = "drop", progress: bool = True,
                   kd: bool = False) -> EncodedDataset:  # fmt: skip
    """Encode every conversation (a stream: only token ids are kept); sequences over `max_len`
    tokens are dropped or truncated (`too_long`), and counted either way. In memory; `distill
    train` writes the same examples to a memory-mapped cache instead (`tokenize_to_cache`).
    kd=True: rows with the teacher's top-k get `Encoded.kd` (align_topk)."""
    result = EncodedDataset(examples=[], rows=0)
    result.examples.extend(_encode_stream(conversations, tokenizer, template, max_len, too_long, result, progress, TopKReader() if kd else None))
    return result


def align_topk(example: Encoded, sampled: np.ndarray) -> tuple[int, int] | None:
    """(start, count) with input_ids[start : start + count] == sampled[:count], all trained tokens:
    where the teacher's sampled completion sits in the tokenized conversation, found by search
    from the first trained token (a template without the teacher's `<think>` prefill trains it as
    content, so the completion starts a few tokens later). count is len(sampled), or one less when
    the last sampled token (the teacher's stop token) is not in the text, so the template wrote
    its own end of turn. None when the ids are not there (another tokenizer, or a sampled
    tokenization that re-encoding the text does not reproduce)."""
    ids, mask = example.input_ids, example.loss_mask
    trained = np.flatnonzero(mask)
    if not len(sampled) or not len(trained):
        return None
    first = int(trained[0])
    for count in (len(sampled), len(sampled) - 1):
        if count < 1:
            break
        head = np.asarray(sampled[:count], dtype=ids.dtype)
        for start in np.flatnonzero(ids[first : len(ids) - count + 1] == head[0]) + first:
            if np.array_equal(ids[start : start + count], head) and mask[start : start + count].all():
                return int(start), count
    return None


def kd_refusal(result: EncodedDataset, tokenizer_name: str) -> str | None:
    """The one-line refusal when top-k rows exist but none aligns (the student tokenizes the
    teacher's text differently), else None."""
    if result.kd_rows and result.kd_misaligned == result.kd_rows:
        return (
            f"{result.kd_first_misaligned}: the teacher's completion token ids (from its top-k sidecar) are not in the student's "
            f"tokenization of the assistant turn for any of the {result.kd_rows} rows with top-k: {tokenizer_name}'s tokenizer or chat "
            "template differs from the teacher's. Use a student that shares the teacher's tokenizer, or kd_alpha=0"
        )
    return None


def _encode_stream(conversations: Iterable[Conversation], tokenizer, template, max_len: int, too_long: str, result: EncodedDataset, progress: bool,
                   topk: TopKReader | None = None) -> Iterator[Encoded]:  # fmt: skip
    """The examples to train on, one at a time; `result` counts rows, drops and truncations.
    With a `topk` reader, rows that kept the teacher's top-k are aligned (align_topk)."""
    from itertools import islice

    from tqdm.auto import tqdm

    bar = tqdm(desc="tokenize", unit="row", disable=not progress, leave=False)
    stream = iter(conversations)
    while chunk := list(islice(stream, 512)):
        result.rows += len(chunk)
        rendered = [render_segments(c.messages, tokenizer, template, result.notes) for c in chunk]
        for conversation, example in zip(chunk, tokenize_segments(rendered, tokenizer)):
            example.where = conversation.where
            if topk is not None and conversation.topk is not None:
                _attach_topk(example, conversation.topk, topk, result)
            if len(example) > max_len:
                if too_long == "drop":
                    result.dropped_too_long += 1
                    continue
                kd = example.kd
                if kd is not None:  # keep the positions that are still in the sequence
                    count = min(kd.count, max_len - kd.start)
                    kd = KDTarget(kd.start, count, kd.ids[:count], kd.logprobs[:count]) if count > 0 else None
                example = Encoded(example.input_ids[:max_len], example.loss_mask[:max_len], example.where, kd, example.topk if kd else None)
                result.truncated += 1
            # Position 0 is never predicted; a sequence needs a trained token after it.
            if not example.loss_mask[1:].any():
                result.dropped_untrained += 1
                continue
            yield example
        bar.update(len(chunk))
    bar.close()


def _attach_topk(example: Encoded, reference: dict[str, Any], reader: TopKReader, result: EncodedDataset) -> None:
    block = reader.read(reference, example.where)
    result.kd_rows += 1
    found = align_topk(example, block.sampled)
    if found is None:
        result.kd_misaligned += 1
        result.kd_first_misaligned = result.kd_first_misaligned or f"{example.where} (top-k in {reference['file']})"
        return
    start, count = found
    example.kd = KDTarget(start, count, block.ids[:count], block.logprobs[:count])
    example.topk = reference


# --------------------------------------------------------------------------------------------
# the tokenized cache: tokenize once, memory-map everywhere

CACHE_FORMAT = 1


class TokenizedData:
    """An encoded dataset on disk (`tokenize_to_cache`), memory-mapped: every rank, launch and
    resume reads the same files, and pages of token ids are loaded only when a batch needs them.
    Files: input_ids.bin (int32) and loss_mask.bin (bool), every example end to end;
    offsets.npy ((N+1,) int64); trained.npy ((N,) int64, trained targets per example);
    meta.json (rows read, drops, truncations, skipped rows, render notes). With kd on, also
    kd.npy ((N, 6) int64: sidecar index, offset, tokens, k, start, count; -1 = no top-k) and
    kd_files.json (the sidecars): each example's teacher top-k, read by memory map when a batch
    needs them. Indexing gives Encoded views; `examples` is the object itself (the
    EncodedDataset interface)."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        meta = json.loads((self.folder / "meta.json").read_text(encoding="utf-8"))
        self.offsets = np.load(self.folder / "offsets.npy")
        self.trained = np.load(self.folder / "trained.npy")
        total = int(self.offsets[-1])
        self.input_ids = np.memmap(self.folder / "input_ids.bin", np.int32, "r") if total else np.zeros(0, np.int32)
        self.loss_mask = np.memmap(self.folder / "loss_mask.bin", np.bool_, "r") if total else np.zeros(0, bool)
        self.rows: int = meta["rows"]
        self.dropped_too_long: int = meta["dropped_too_long"]
        self.truncated: int = meta["truncated"]
        self.dropped_untrained: int = meta["dropped_untrained"]
        self.skipped_rows: list[str] = meta["skipped_rows"]
        self.notes = RenderNotes(**meta["notes"])
        self.tokens: int = total
        self.trained_tokens: int = meta["mask_sum"]
        self.kd_rows: int = meta.get("kd_rows", 0)
        self.kd_misaligned: int = meta.get("kd_misaligned", 0)
        self.kd_first_misaligned: str = meta.get("kd_first_misaligned", "")
        has_kd = (self.folder / "kd.npy").is_file()
        self.kd = np.load(self.folder / "kd.npy") if has_kd else None  # (N, 6)
        self.kd_files: list[str] = json.loads((self.folder / "kd_files.json").read_text(encoding="utf-8")) if has_kd else []
        self._topk = TopKReader()

    @property
    def kd_counts(self) -> np.ndarray:
        """(N,) positions with the teacher's top-k per example (0 without)."""
        return np.zeros(len(self), np.int64) if self.kd is None else np.where(self.kd[:, 0] >= 0, self.kd[:, 5], 0)

    @property
    def examples(self) -> "TokenizedData":
        return self

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, index: int) -> Encoded:
        start, end = int(self.offsets[index]), int(self.offsets[index + 1])
        example = Encoded(self.input_ids[start:end], self.loss_mask[start:end])
        if self.kd is not None and self.kd[index, 0] >= 0:
            file, offset, tokens, k, kd_start, count = (int(v) for v in self.kd[index])
            block = self._topk.read({"file": self.kd_files[file], "offset": offset, "tokens": tokens, "k": k})
            example.kd = KDTarget(kd_start, count, block.ids[:count], block.logprobs[:count])
        return example

    def __iter__(self) -> Iterator[Encoded]:
        return (self[i] for i in range(len(self)))


def cache_key(parts: dict[str, Any]) -> str:
    """The folder name of a cache: a digest of everything the token ids depend on."""
    import hashlib

    return hashlib.sha256(json.dumps({"format": CACHE_FORMAT, **parts}, sort_keys=True, default=str).encode("utf-8")).hexdigest()[:24]


def data_fingerprint(source: str | Path, split: str) -> dict[str, Any]:
    """What identifies the training data without reading it: a file's (or a filter run's
    accepted.parquet's) path, size and modification time; a hub dataset's name and split."""
    path = Path(source)
    if path.is_dir() and (path / "accepted.parquet").is_file():
        path = path / "accepted.parquet"
    if path.is_file():
        stat = path.stat()
        return {"file": str(path.resolve()), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
    return {"dataset": str(source), "split": split}


def tokenizer_fingerprint(tokenizer) -> str:
    """A digest of the tokenizer's vocabulary, merges, normalisation and special tokens."""
    import hashlib

    backend = getattr(tokenizer, "backend_tokenizer", None)
    text = backend.to_str() if backend is not None else json.dumps(sorted(tokenizer.get_vocab().items()))
    text += json.dumps(getattr(tokenizer, "special_tokens_map", {}), sort_keys=True, default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def tokenize_to_cache(conversations: Iterable[Conversation], tokenizer, template, max_len: int, too_long: str, folder: str | Path,
                      skipped: list[str] | None = None, progress: bool = True, kd: bool = False) -> TokenizedData:  # fmt: skip
    """Encode a stream of conversations straight into the files of a TokenizedData (nothing but
    one chunk is held in memory), written into FOLDER.partial and renamed when complete. kd=True:
    the teacher's top-k of each row are aligned and referenced (kd.npy)."""
    import shutil

    folder = Path(folder)
    partial = folder.with_name(folder.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    counts = EncodedDataset(examples=[], rows=0)
    offsets, trained, mask_sum = [0], [], 0
    kd_rows: list[tuple[int, ...]] = []
    kd_files: dict[str, int] = {}
    with (partial / "input_ids.bin").open("wb") as ids_file, (partial / "loss_mask.bin").open("wb") as mask_file:
        for example in _encode_stream(conversations, tokenizer, template, max_len, too_long, counts, progress, TopKReader() if kd else None):
            if kd:
                ref = example.topk
                kd_rows.append((-1, 0, 0, 0, 0, 0) if example.kd is None or ref is None else
                               (kd_files.setdefault(ref["file"], len(kd_files)), ref["offset"], ref["tokens"], ref["k"], example.kd.start, example.kd.count))
            ids_file.write(np.ascontiguousarray(example.input_ids, dtype=np.int32).tobytes())
            mask_file.write(np.ascontiguousarray(example.loss_mask, dtype=np.bool_).tobytes())
            offsets.append(offsets[-1] + len(example))
            trained.append(int(example.loss_mask[1:].sum()))
            mask_sum += int(example.loss_mask.sum())
    np.save(partial / "offsets.npy", np.asarray(offsets, dtype=np.int64))
    np.save(partial / "trained.npy", np.asarray(trained, dtype=np.int64))
    if kd:
        np.save(partial / "kd.npy", np.asarray(kd_rows, dtype=np.int64).reshape(-1, 6))
        (partial / "kd_files.json").write_text(json.dumps(list(kd_files)), encoding="utf-8")
    meta = {
        "rows": counts.rows, "dropped_too_long": counts.dropped_too_long, "truncated": counts.truncated,
        "dropped_untrained": counts.dropped_untrained, "skipped_rows": list(skipped or []),
        "notes": {"prefill_missing": counts.notes.prefill_missing, "prefill": counts.notes.prefill}, "mask_sum": mask_sum,
        "kd_rows": counts.kd_rows, "kd_misaligned": counts.kd_misaligned, "kd_first_misaligned": counts.kd_first_misaligned,
    }  # fmt: skip
    (partial / "meta.json").write_text(json.dumps(meta), encoding="utf-8")
    shutil.rmtree(folder, ignore_errors=True)
    partial.rename(folder)
    return TokenizedData(folder)


def shifted_targets(example: Encoded) -> np.ndarray:
    """(T,) next-token targets inside one sequence: targets[t] = ids[t+1] where token t+1 is
    trained, else IGNORE; the last position predicts nothing."""
    targets = np.full(len(example), IGNORE, dtype=np.int64)
    trained = example.loss_mask[1:]
    targets[:-1][trained] = example.input_ids[1:][trained]
    return targets


# --------------------------------------------------------------------------------------------
# batching


def epoch_order(count: int, seed: int, epoch: int) -> np.ndarray:
    """The shuffled order of examples in one epoch; a pure function of (seed, epoch), so a resumed
    run sees the same order."""
    return np.random.default_rng([seed, epoch]).permutation(count)


def plan_step(
    lengths: Sequence[int],
    indices: Sequence[int],
    world: int,
    packing: bool,
    micro_batch_tokens: int,
    micro_batch_size: int,
) -> list[list[list[int]]]:
    """plan[rank][micro] = example indices of one optimizer step (same plan on every rank)."""
    ranked = sorted(indices, key=lambda i: (-lengths[i], i))  # longest first, ties by index
    shares: list[list[int]] = [[] for _ in range(world)]
    loads = [0] * world
    for index in ranked:
        rank = min(range(world), key=lambda r: (loads[r], r))
        shares[rank].append(index)
        loads[rank] += lengths[index]
    plan = []
    for share in shares:
        if packing:
            plan.append(_best_fit(share, lengths, micro_batch_tokens))
        else:
            plan.append([share[i : i + micro_batch_size] for i in range(0, len(share), micro_batch_size)])
    depth = max((len(p) for p in plan), default=0)
    for micro_batches in plan:
        micro_batches.extend([] for _ in range(depth - len(micro_batches)))  # empty = a no-op micro-batch
    return plan


def _best_fit(share: list[int], lengths: Sequence[int], capacity: int) -> list[list[int]]:
    bins: list[list[int]] = []
    room: list[int] = []
    for index in share:  # already longest first
        length = lengths[index]
        if length > capacity:
            raise ConfigError(f"a {length}-token sequence does not fit micro_batch_tokens={capacity}; raise micro_batch_tokens to at least max_seq_len")
        best = None
        for b, free in enumerate(room):
            if free >= length and (best is None or free < room[best]):
                best = b
        if best is None:
            bins.append([index])
            room.append(capacity - length)
        else:
            bins[best].append(index)
            room[best] -= length
    return bins


@dataclass
class Batch:
    input_ids: Any  # (B, T) long
    position_ids: Any  # (B, T) long
    targets: Any  # (B, T) long, IGNORE where not trained
    attention_mask: Any | None  # (B, T) long, only when padded; None lets packing be detected
    tokens: int  # real (non-padding) input tokens
    trained: int  # trained target tokens
    padded: int  # padding tokens
    attention_pairs: int  # sum of L^2 over sequences (for attention FLOPs)
    kd: "KDBatch | None" = None  # the teacher's top-k of the positions that have them


@dataclass
class KDBatch:
    """The teacher's top-k for a micro-batch: at flat position positions[m] of the (B, T) batch
    (row * T + t) the logits predict a token whose teacher top-k are ids[m] with log-probs
    logprobs[m] (temperature 1; -inf pads sequences with a smaller k)."""

    positions: Any  # (M,) long
    ids: Any  # (M, K) long
    logprobs: Any  # (M, K) float32

    def to(self, device) -> "KDBatch":
        return KDBatch(self.positions.to(device), self.ids.to(device), self.logprobs.to(device))


def _kd_batch(examples: Sequence[Encoded], starts: Sequence[int]) -> KDBatch | None:
    """KDBatch of the examples with top-k; `starts` is each example's flat index of its token 0."""
    import torch

    chosen = [(e.kd, base) for e, base in zip(examples, starts) if e.kd is not None and e.kd.count > 0]
    if not chosen:
        return None
    width = max(kd.ids.shape[1] for kd, _ in chosen)
    count = sum(kd.count for kd, _ in chosen)
    ids = np.zeros((count, width), np.int64)
    logprobs = np.full((count, width), -np.inf, np.float32)
    positions = np.empty(count, np.int64)
    row = 0
    for kd, base in chosen:
        k = kd.ids.shape[1]
        ids[row : row + kd.count, :k] = kd.ids
        logprobs[row : row + kd.count, :k] = kd.logprobs
        # Token start + j is predicted by the logits at start + j - 1.
        positions[row : row + kd.count] = base + kd.start - 1 + np.arange(kd.count)
        row += kd.count
    return KDBatch(torch.from_numpy(positions), torch.from_numpy(ids), torch.from_numpy(logprobs))


def collate(examples: Sequence[Encoded], packing: bool, pad_id: int):
    """Micro-batch tensors. Packed: (1, sum L) with position ids restarting per sequence and no
    attention mask. Padded: (B, max L) with an attention mask. Empty: one ignored pad token."""
    import torch

    if not examples:
        one = torch.tensor([[pad_id]])
        return Batch(one, torch.zeros_like(one), torch.full_like(one, IGNORE), None, 0, 0, 1, 0)
    targets = [shifted_targets(e) for e in examples]
    pairs = int(sum(len(e) ** 2 for e in examples))
    trained = int(sum(int((t != IGNORE).sum()) for t in targets))
    if packing:
        input_ids = torch.from_numpy(np.concatenate([e.input_ids for e in examples]).astype(np.int64))[None]
        positions = torch.from_numpy(np.concatenate([np.arange(len(e)) for e in examples]))[None]
        starts = np.concatenate([[0], np.cumsum([len(e) for e in examples])[:-1]])
        return Batch(input_ids, positions, torch.from_numpy(np.concatenate(targets))[None], None, input_ids.shape[1], trained, 0, pairs,
                     _kd_batch(examples, starts.tolist()))  # fmt: skip
    width = max(len(e) for e in examples)
    input_ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    target_rows = torch.full((len(examples), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for row, (example, target) in enumerate(zip(examples, targets)):
        input_ids[row, : len(example)] = torch.from_numpy(example.input_ids.astype(np.int64))
        target_rows[row, : len(example)] = torch.from_numpy(target)
        mask[row, : len(example)] = 1
    positions = torch.arange(width).expand(len(examples), width).clone()
    real = int(mask.sum())
    starts = [row * width for row in range(len(examples))]
    return Batch(input_ids, positions, target_rows, mask, real, trained, input_ids.numel() - real, pairs, _kd_batch(examples, starts))
