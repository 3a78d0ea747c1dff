"""Loss masking, chat templates, data reading and packing for `distill train` (no model needed).

The mask tests use the real Qwen2.5 and Llama-3 tokenizers and the R1-Distill chat template from
../shared/data/tokenizers, and check token by token (runs of equal mask decoded as a whole) that
exactly the assistant replies and their end-of-turn tokens are trained on.
"""

from __future__ import annotations

import functools
import json

import numpy as np
import pytest

from conftest import shared_path
from distill.errors import ConfigError, InputError
from distill.records import TraceRecord, write_parquet
from distill.students.chat import TEMPLATES, resolve_template
from distill.students.data import (
    IGNORE,
    collate,
    encode,
    encode_dataset,
    epoch_order,
    plan_step,
    read_conversations,
    Conversation,
    shifted_targets,
)

REASONING_1 = "<think>\nTwo plus two: count 2, then 2 more, gives 4.\n</think>\n\nThe answer is $\\boxed{4}$."
REASONING_2 = "<think>\nDouble it: 4 * 2 = 8. Check: 8 / 2 = 4. ✓\n</think>\n\nSo it is $\\boxed{8}$."
CONVERSATION = [
    {"role": "user", "content": "What is 2+2?"},
    {"role": "assistant", "content": REASONING_1},
    {"role": "user", "content": "And twice that?"},
    {"role": "assistant", "content": REASONING_2},
]


def load_tokenizer(folder: str):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(shared_path(f"tokenizers/{folder}/tokenizer.json").parent)


@functools.lru_cache(maxsize=None)
def tokenizer_from(folder: str):
    """Loaded once per session (tests only read it)."""
    return load_tokenizer(folder)


def r1_distill_tokenizer():
    """DeepSeek-R1-Distill-Qwen: Qwen2.5's BPE with its own special tokens and chat template
    (../shared has its tokenizer_config.json only; the BPE is the same as Qwen2.5's)."""
    tokenizer = load_tokenizer("qwen2.5-instruct")  # a fresh copy: it is modified below
    config = json.loads(shared_path("tokenizers/deepseek-r1-distill-qwen/tokenizer_config.json").read_text())
    tokenizer.add_special_tokens(
        {"bos_token": "<｜begin▁of▁sentence｜>", "eos_token": "<｜end▁of▁sentence｜>", "additional_special_tokens": ["<｜User｜>", "<｜Assistant｜>"]}
    )
    tokenizer.chat_template = config["chat_template"]
    return tokenizer


def runs(tokenizer, encoded) -> list[tuple[str, bool]]:
    """Maximal runs of tokens with the same mask value, each decoded: [(text, trained), ...]."""
    out: list[tuple[list[int], bool]] = []
    for token, trained in zip(encoded.input_ids.tolist(), encoded.loss_mask.tolist()):
        if not out or out[-1][1] != trained:
            out.append(([], trained))
        out[-1][0].append(token)
    return [(tokenizer.decode(ids), trained) for ids, trained in out]


def check_prompt_tokens_match_inference(tokenizer, template, encoded, turn_prompt: str) -> None:
    """The tokens before the first trained token are exactly the tokens of the generation prompt
    as inference tokenizes it."""
    first = int(np.argmax(encoded.loss_mask))
    assert encoded.input_ids[:first].tolist() == tokenizer(turn_prompt, add_special_tokens=False)["input_ids"]


def test_qwen_own_template_trains_exactly_the_assistant_replies():
    tokenizer = tokenizer_from("qwen2.5-instruct")
    template = resolve_template("model", tokenizer)
    encoded = encode(CONVERSATION, tokenizer, template)
    system = "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n"
    assert runs(tokenizer, encoded) == [
        (system + "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n", False),
        (REASONING_1 + "<|im_end|>", True),
        ("\n<|im_start|>user\nAnd twice that?<|im_end|>\n<|im_start|>assistant\n", False),
        (REASONING_2 + "<|im_end|>", True),
    ]
    check_prompt_tokens_match_inference(tokenizer, template, encoded, tokenizer.apply_chat_template(CONVERSATION[:1], tokenize=False, add_generation_prompt=True))


def test_chatml_think_moves_the_prefill_to_the_prompt_side():
    tokenizer = tokenizer_from("qwen2.5-instruct")
    template = resolve_template("chatml-think", tokenizer)
    encoded = encode(CONVERSATION, tokenizer, template)
    assert runs(tokenizer, encoded) == [
        ("<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n<think>\n", False),
        (REASONING_1.removeprefix("<think>\n") + "<|im_end|>", True),
        ("\n<|im_start|>user\nAnd twice that?<|im_end|>\n<|im_start|>assistant\n<think>\n", False),
        (REASONING_2.removeprefix("<think>\n") + "<|im_end|>", True),
    ]
    generation_prompt = tokenizer.apply_chat_template(CONVERSATION[:1], chat_template=template.source, tokenize=False, add_generation_prompt=True)
    assert generation_prompt.endswith("<|im_start|>assistant\n<think>\n")
    check_prompt_tokens_match_inference(tokenizer, template, encoded, generation_prompt)


@pytest.mark.parametrize("choice", ["model", "llama3-think"])
def test_llama3_templates_train_exactly_the_assistant_replies(choice):
    tokenizer = tokenizer_from("llama-3-instruct")
    template = resolve_template(choice, tokenizer)
    encoded = encode(CONVERSATION, tokenizer, template)
    prefill = "<think>\n" if choice == "llama3-think" else ""
    header = "<|start_header_id|>assistant<|end_header_id|>\n\n" + prefill
    assert runs(tokenizer, encoded) == [
        ("<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nWhat is 2+2?<|eot_id|>" + header, False),
        (REASONING_1.removeprefix(prefill) + "<|eot_id|>", True),
        ("<|start_header_id|>user<|end_header_id|>\n\nAnd twice that?<|eot_id|>" + header, False),
        (REASONING_2.removeprefix(prefill) + "<|eot_id|>", True),
    ]
    assert encoded.input_ids.tolist().count(tokenizer.bos_token_id) == 1, "one BOS: the template's, no second one from the tokenizer"


def test_r1_distill_template_keeps_the_reasoning_it_would_drop():
    tokenizer = r1_distill_tokenizer()
    # The trap: rendered as is, the R1-Distill template keeps only the text after </think>.
    naive = tokenizer.apply_chat_template(CONVERSATION, tokenize=False)
    assert "Two plus two" not in naive and "Double it" not in naive
    encoded = encode(CONVERSATION, tokenizer, resolve_template("model", tokenizer))
    assert runs(tokenizer, encoded) == [
        ("<｜begin▁of▁sentence｜><｜User｜>What is 2+2?<｜Assistant｜><think>\n", False),
        (REASONING_1.removeprefix("<think>\n") + "<｜end▁of▁sentence｜>", True),
        ("<｜User｜>And twice that?<｜Assistant｜><think>\n", False),
        (REASONING_2.removeprefix("<think>\n") + "<｜end▁of▁sentence｜>", True),
    ]
    trained = tokenizer.decode(encoded.input_ids[encoded.loss_mask])
    assert "Two plus two" in trained and "Double it" in trained, "the reasoning of every assistant turn is trained on"


def test_template_must_exist_in_the_tokenizer():
    tokenizer = tokenizer_from("llama-3-instruct")
    with pytest.raises(ConfigError, match="<\\|im_start\\|>"):
        resolve_template("chatml-think", tokenizer)
    with pytest.raises(ConfigError, match="unknown template"):
        resolve_template("vicuna", tokenizer)
    assert set(TEMPLATES) == {"chatml-think", "chatml", "llama3-think", "llama3"}


# --------------------------------------------------------------------------------------------
# reading rows


def test_reads_accepted_parquet_messages_and_problem_completion_rows(tmp_path):
    records = [
        TraceRecord(problem_id="p1", sample_idx=0, problem="What is 1+1?", answer="2", completion="<think>\n1+1=2\n</think>\n\n2"),
        TraceRecord(problem_id="p2", sample_idx=0, problem="3*3?", answer="9", completion="<think>\n9\n</think>\n\n9",
                    prompt=[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "3*3?"}]),
    ]  # fmt: skip
    write_parquet(records, tmp_path / "accepted.parquet")
    from_parquet, _ = read_conversations(tmp_path / "accepted.parquet")
    from_dir, _ = read_conversations(tmp_path)  # a `distill filter` run directory
    assert [c.messages for c in from_parquet] == [r.messages() for r in records] == [c.messages for c in from_dir]
    rows = tmp_path / "rows.jsonl"
    rows.write_text(json.dumps({"problem": "What is 1+1?", "completion": "2"}) + "\n" + json.dumps({"messages": records[1].messages()}) + "\n")
    conversations, _ = read_conversations(rows)
    assert conversations[0].messages == [{"role": "user", "content": "What is 1+1?"}, {"role": "assistant", "content": "2"}]
    assert conversations[1].messages == records[1].messages()


def test_rows_without_an_assistant_turn_are_named_or_skipped(tmp_path):
    rows = tmp_path / "rows.jsonl"
    good = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
    rows.write_text(json.dumps(good) + "\n" + json.dumps({"messages": [{"role": "user", "content": "hi"}]}) + "\n")
    with pytest.raises(InputError, match=r"rows.jsonl:2: no assistant turn.*on_bad_row=skip"):
        read_conversations(rows)
    conversations, skipped = read_conversations(rows, on_bad_row="skip")
    assert len(conversations) == 1 and len(skipped) == 1 and "rows.jsonl:2" in skipped[0]


def test_over_long_sequences_are_dropped_or_truncated_and_counted():
    tokenizer = tokenizer_from("qwen2.5-instruct")
    template = resolve_template("chatml-think", tokenizer)
    short = Conversation([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "<think>\nok\n</think>\n\nhello"}], "a:1")
    long = Conversation([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "<think>\n" + "word " * 200 + "</think>\n\ndone"}], "a:2")
    limit = len(encode(short.messages, tokenizer, template)) + 5
    dropped = encode_dataset([short, long], tokenizer, template, limit, "drop", progress=False)
    assert (len(dropped.examples), dropped.dropped_too_long, dropped.truncated) == (1, 1, 0)
    truncated = encode_dataset([short, long], tokenizer, template, limit, "truncate", progress=False)
    assert (len(truncated.examples), truncated.dropped_too_long, truncated.truncated) == (2, 0, 1)
    assert len(truncated.examples[1]) == limit and truncated.examples[1].where == "a:2"


# --------------------------------------------------------------------------------------------
# packing and batching


def test_targets_are_shifted_inside_each_sequence_and_packing_restarts_positions():
    tokenizer = tokenizer_from("qwen2.5-instruct")
    template = resolve_template("chatml-think", tokenizer)
    first = encode(CONVERSATION[:2], tokenizer, template)
    second = encode(CONVERSATION, tokenizer, template)
    targets = shifted_targets(first)
    trained_positions = np.flatnonzero(first.loss_mask)
    assert (targets[trained_positions - 1] == first.input_ids[trained_positions]).all()
    assert (targets != IGNORE).sum() == first.loss_mask.sum() and targets[-1] == IGNORE

    packed = collate([first, second], packing=True, pad_id=0)
    assert packed.attention_mask is None and packed.input_ids.shape == (1, len(first) + len(second))
    positions = packed.position_ids[0].tolist()
    assert positions[: len(first)] == list(range(len(first))) and positions[len(first) :] == list(range(len(second)))
    assert packed.targets[0, len(first) - 1] == IGNORE, "no sequence predicts its neighbour's first token"
    assert packed.trained == first.loss_mask.sum() + second.loss_mask.sum() and packed.padded == 0

    padded = collate([first, second], packing=False, pad_id=0)
    assert padded.input_ids.shape == (2, len(second)) and padded.padded == len(second) - len(first)
    assert int(padded.attention_mask.sum()) == len(first) + len(second) and padded.trained == packed.trained


def test_step_plan_covers_each_sequence_once_and_gives_ranks_equal_micro_batch_counts():
    rng = np.random.default_rng(0)
    lengths = rng.integers(10, 500, size=40).tolist()
    order = epoch_order(40, seed=3, epoch=1)
    assert sorted(order.tolist()) == list(range(40)) and (order == epoch_order(40, 3, 1)).all()
    assert not (order == epoch_order(40, 3, 2)).all(), "each epoch is shuffled afresh"
    chosen = order[:16].tolist()
    for world, packing in [(1, True), (2, True), (3, False)]:
        plan = plan_step(lengths, chosen, world, packing, micro_batch_tokens=600, micro_batch_size=2)
        flat = [i for rank in plan for micro in rank for i in micro]
        assert sorted(flat) == sorted(chosen)
        assert len({len(rank) for rank in plan}) == 1, "every rank runs the same number of micro-batches"
        for rank in plan:
            for micro in rank:
                assert sum(lengths[i] for i in micro) <= 600 if packing else len(micro) <= 2
    loads = [sum(lengths[i] for micro in rank for i in micro) for rank in plan_step(lengths, chosen, 2, True, 600, 1)]
    assert abs(loads[0] - loads[1]) <= max(lengths), "ranks get balanced token counts"
    with pytest.raises(ConfigError, match="micro_batch_tokens"):
        plan_step([700], [0], 1, True, micro_batch_tokens=600, micro_batch_size=1)
