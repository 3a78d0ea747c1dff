"""Off-policy logit distillation: the teacher's top-k kept by `distill generate top_logprobs=k`,
carried by `distill filter`, distilled by `distill train kd_alpha=...`.

The loss and its gradient are checked against hand-computed values (a 5-token vocabulary, the
softmax written out), the chunked loss against full logits, packing against padding; the storage
round trip, kill -9 resume of generate, and generate -> filter -> train end to end on the toy
world's models (a 2.3M teacher and a 0.8M student sharing a character tokenizer: fast on CPU,
and the teacher writes real traces).
"""

from __future__ import annotations

import json
import math
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from distill import toy
from distill.errors import InputError

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models run fastest on one thread, and the machine's cores are shared."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# --------------------------------------------------------------------------------------------
# the loss


def test_topk_forward_kl_and_its_gradient_match_hand_computed_values():
    import torch

    from distill.students.logprobs import topk_forward_kl

    logits = [1.0, -0.5, 2.0, 0.3, -1.2]  # the student's logits over a 5-token vocabulary
    teacher_ids = [2, 0, 3]  # the teacher's top-3 ...
    teacher_logprobs = [-0.4, -1.5, -2.5]  # ... and their log-probs at temperature 1 (the rest of the mass is the tail)
    for temperature in (1.0, 2.0):
        # By hand: the student's softmax over the whole vocabulary at T, the teacher's top-k renormalised at T.
        exps = [math.exp(z / temperature) for z in logits]
        q = [e / sum(exps) for e in exps]
        weights = [math.exp(lp / temperature) for lp in teacher_logprobs]
        p = [w / sum(weights) for w in weights]
        expected = temperature**2 * sum(pk * (math.log(pk) - math.log(q[i])) for pk, i in zip(p, teacher_ids))
        # d/dz_j = T * (q_j - p_j), p_j = 0 outside the top-k.
        p_full = [0.0] * 5
        for pk, i in zip(p, teacher_ids):
            p_full[i] = pk
        expected_grad = [temperature * (q[j] - p_full[j]) for j in range(5)]

        z = torch.tensor([logits], dtype=torch.float64, requires_grad=True)
        student = torch.log_softmax(z / temperature, dim=-1)[:, teacher_ids]
        value = topk_forward_kl(student, torch.tensor([teacher_logprobs], dtype=torch.float64), temperature)
        value.backward()
        assert value.item() == pytest.approx(expected, rel=1e-12)
        assert z.grad[0].tolist() == pytest.approx(expected_grad, rel=1e-10, abs=1e-12)
        assert expected > 0, "the tail the student keeps outside the top-k is penalised"

    # Padding (a row with a smaller k: -inf) adds nothing and gives no NaN.
    padded = torch.log_softmax(torch.tensor([logits], dtype=torch.float64), -1)[:, [2, 0, 3, 1]]
    plain = topk_forward_kl(padded[:, :3], torch.tensor([teacher_logprobs], dtype=torch.float64))
    with_pad = topk_forward_kl(padded, torch.tensor([teacher_logprobs + [-math.inf]], dtype=torch.float64))
    assert with_pad.item() == pytest.approx(plain.item(), rel=1e-12)
    # A student equal to the teacher on its top-k with nothing in the tail: zero.
    exact = torch.tensor([[math.log(0.7), math.log(0.2), math.log(0.1)]], dtype=torch.float64)
    assert topk_forward_kl(exact, exact).item() == pytest.approx(0.0, abs=1e-12)


def _kd_batch_for(examples, packing):
    from distill.students.data import collate

    return collate(examples, packing, pad_id=0)


def _examples(vocab: int, seed: int = 0):
    """Three sequences with loss masks and teacher top-k on some of their trained tokens."""
    from distill.students.data import Encoded, KDTarget

    rng = np.random.default_rng(seed)
    out = []
    for length, start, count, k in ((9, 4, 4, 3), (6, 2, 3, 2), (7, 3, 0, 3)):
        ids = rng.integers(0, vocab, length).astype(np.int32)
        mask = np.zeros(length, bool)
        mask[start - 1 if start > 1 else 1 :] = True
        kd = None
        if count:
            top = np.stack([rng.choice(vocab, k, replace=False) for _ in range(count)]).astype(np.int32)
            top[:, 0] = ids[start : start + count]  # the sampled token is among the top-k
            logprobs = np.log(np.sort(rng.dirichlet(np.ones(k + 1), count), axis=1)[:, ::-1][:, :k]).astype(np.float16)
            kd = KDTarget(start, count, top, logprobs)
        out.append(Encoded(ids, mask, kd=kd))
    return out


def test_chunked_kd_equals_full_logits_and_packing_equals_padding(tiny_qwen):
    """The chunked CE + KD (fused: gradients in the forward; and checkpointed) has the values and
    gradients of the same sums over full (T, V) logits; packed and padded micro-batches agree."""
    import torch
    from transformers import AutoModelForCausalLM

    from distill.students.logprobs import IGNORE, Scorer, final_hidden_states, topk_forward_kl

    model = AutoModelForCausalLM.from_pretrained(tiny_qwen, dtype=torch.float32)
    examples = _examples(model.config.vocab_size)
    temperature = 1.5

    def full_logits(batch):
        # The same decoder pass (packed rows split at position restarts), then the whole (B, T, V) logits at once.
        logits = model.lm_head(final_hidden_states(model, batch.input_ids, batch.position_ids, batch.attention_mask)).float()
        flat = logits.reshape(-1, logits.shape[-1])
        targets = batch.targets.reshape(-1)
        trained = targets != IGNORE
        ce = torch.nn.functional.cross_entropy(flat[trained], targets[trained], reduction="sum")
        student = torch.log_softmax(flat[batch.kd.positions] / temperature, -1).gather(-1, batch.kd.ids)
        return torch.stack([ce, topk_forward_kl(student, batch.kd.logprobs, temperature)])

    results = {}
    for packing in (True, False):
        batch = _kd_batch_for(examples, packing)
        assert len(batch.kd.positions) == 4 + 3
        for name, fused in (("full", None), ("fused", "auto"), ("checkpointed", "chunked")):
            model.zero_grad()
            if fused is None:
                value = full_logits(batch)
                (value[0] * 0.3 + value[1] * 0.7).backward()
            else:
                loss, *sums = Scorer(model, chunk_tokens=2, fused=fused)(batch.input_ids, batch.position_ids, batch.targets, batch.attention_mask,
                                                                          reduction="sum", kd=batch.kd, kd_temperature=temperature, kd_weights=(0.3, 0.7))  # fmt: skip
                loss.backward()
                value = torch.stack(sums)
                assert loss.item() == pytest.approx(0.3 * sums[0].item() + 0.7 * sums[1].item(), rel=1e-6)
            results[(packing, name)] = (value.detach(), model.lm_head.weight.grad.clone(), model.model.layers[0].mlp.up_proj.weight.grad.clone())
    reference = results[(True, "full")]
    for key, (value, head_grad, layer_grad) in results.items():
        torch.testing.assert_close(value, reference[0], rtol=1e-5, atol=1e-5, msg=str(key))
        torch.testing.assert_close(head_grad, reference[1], rtol=1e-4, atol=1e-6, msg=str(key))
        torch.testing.assert_close(layer_grad, reference[2], rtol=1e-4, atol=1e-6, msg=str(key))
    assert reference[0][1] > 0


def test_alignment_finds_the_completion_after_the_prefill_and_allows_the_templates_end_of_turn():
    from distill.students.chat import resolve_template
    from distill.students.data import align_topk, encode

    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(toy.BASE_DIR)
    completion = "<think>\n1+2\n[1+2=3]\n</think>\n\\boxed{3}"
    messages = [{"role": "user", "content": "1+2"}, {"role": "assistant", "content": completion}]
    generated = tokenizer("1+2\n[1+2=3]\n</think>\n\\boxed{3}<|im_end|>", add_special_tokens=False)["input_ids"]
    for template_name in ("model", "chatml"):  # with the `<think>\n` prefill (moved to the prompt) and without (trained as content)
        example = encode(messages, tokenizer, resolve_template(template_name, tokenizer))
        start, count = align_topk(example, np.asarray(generated))
        assert count == len(generated) and example.input_ids[start : start + count].tolist() == generated
        assert example.loss_mask[start : start + count].all()
    # A stop token the text does not hold (another end-of-turn): all but the last token align.
    other_stop = generated[:-1] + [tokenizer.convert_tokens_to_ids("<|endoftext|>") if "<|endoftext|>" in tokenizer.get_vocab() else 0]
    start, count = align_topk(example, np.asarray(other_stop))
    assert count == len(generated) - 1
    # Ids that are not in the turn (another tokenizer) do not align.
    assert align_topk(example, np.asarray(generated[::-1])) is None


# --------------------------------------------------------------------------------------------
# storage


def test_sidecar_round_trip_repair_and_references(tmp_path):
    from distill.records import TraceRecord, read_traces, write_parquet
    from distill.topk import SidecarWriter, TopKReader, bytes_per_token, pack, parse_reference, repair_sidecar, sidecar_path

    assert sidecar_path(tmp_path / "traces.shard-1-of-4.jsonl").name == "traces.shard-1-of-4.topk.bin"
    assert bytes_per_token(20) == 124
    first = pack([5, 7], [([5, 1, 2], [-0.1, -2.5, -3.0]), ([7, 3], [-0.01, -4.75])], k=3)  # a short row is padded
    second = pack([9], [([9, 4, 1], [-1e-4, -9.5, -12.0])], k=3)
    assert len(first) == 2 * bytes_per_token(3)
    path = tmp_path / "traces.topk.bin"
    writer = SidecarWriter(path)
    offsets = writer.append([first, second])
    writer.close()
    assert offsets == [0, len(first)]
    reader = TopKReader()
    block = reader.read({"file": str(path), "offset": offsets[0], "tokens": 2, "k": 3})
    assert block.sampled.tolist() == [5, 7] and block.ids.tolist() == [[5, 1, 2], [7, 3, 0]]
    assert block.logprobs[0].tolist() == pytest.approx([-0.1, -2.5, -3.0], rel=1e-3) and block.logprobs[1, 2] == -np.inf
    assert reader.read({"file": str(path), "offset": offsets[1], "tokens": 1, "k": 3}).ids.tolist() == [[9, 4, 1]]

    # A tail written without its record is cut; a sidecar shorter than its references is an error.
    with path.open("ab") as handle:
        handle.write(b"\x01" * 17)
    assert repair_sidecar(path, len(first) + len(second)) == 17 and path.stat().st_size == len(first) + len(second)
    with pytest.raises(InputError, match="truncated or replaced"):
        repair_sidecar(path, 10_000)
    with pytest.raises(InputError, match="offset, tokens"):
        parse_reference({"file": "x"}, "f:1")

    # The record keeps a relative reference; readers resolve it beside the trace file, and Parquet keeps it.
    record = TraceRecord(problem_id="p", sample_idx=0, problem="1+1", answer="2", completion="2",
                         top_logprobs={"file": path.name, "offset": offsets[1], "tokens": 1, "k": 3})
    plain = TraceRecord(problem_id="q", sample_idx=0, problem="1+2", answer="3", completion="3")
    assert "top_logprobs" not in plain.to_json(), "records without top-k are written as before"
    (tmp_path / "traces.jsonl").write_text(json.dumps(record.to_json()) + "\n" + json.dumps(plain.to_json()) + "\n")
    read = read_traces(tmp_path).records
    assert read[0].top_logprobs == {"file": str(path.resolve()), "offset": offsets[1], "tokens": 1, "k": 3} and read[1].top_logprobs is None
    write_parquet(read, tmp_path / "out.parquet")
    again = read_traces(tmp_path / "out.parquet").records
    assert [r.top_logprobs for r in again] == [r.top_logprobs for r in read]


# --------------------------------------------------------------------------------------------
# generate: top-k kept, resume after kill -9


def _problems(path: Path, count: int = 4) -> Path:
    rng = random.Random(7)
    return toy.write_problems([toy.make_problem(2, rng, f"p{i}") for i in range(count)], path)


def _generate_args(data: Path, *extra: str) -> list[str]:
    return ["--model", str(toy.TEACHER_DIR), "--data", str(data), "--engine", "hf", "--n", "2", "--max-tokens", "60",
            "instruction=", "top_logprobs=4", *extra]  # fmt: skip


def _topk_by_key(out: Path) -> dict:
    from distill.records import read_traces
    from distill.topk import TopKReader

    reader = TopKReader()
    blocks = {}
    for record in read_traces(out).records:
        assert record.top_logprobs is not None, "every record references its top-k"
        blocks[record.key] = (record, reader.read(record.top_logprobs))
    return blocks


@pytest.fixture(scope="module")
def generated(tmp_path_factory):
    """One uninterrupted generate run with top_logprobs=4 on the toy teacher."""
    from distill.cli import main

    folder = tmp_path_factory.mktemp("kd-generate")
    data = _problems(folder / "problems.jsonl")
    out = folder / "gen"
    with pytest.raises(SystemExit) as done:
        main(["generate", "--out", str(out), *_generate_args(data)])
    assert done.value.code in (0, None)
    return {"out": out, "data": data}


def test_generate_keeps_the_teachers_top_k_compactly(generated):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import torch

    out = generated["out"]
    blocks = _topk_by_key(out)
    assert len(blocks) == 8
    metrics = json.loads((out / "metrics.json").read_text())
    tokens = sum(len(b) for _, b in blocks.values())
    assert metrics["top_logprobs"] == {"k": 4, "file": "traces.topk.bin", "tokens": tokens, "bytes": 28 * tokens, "bytes_per_token": 28}
    assert (out / "traces.topk.bin").stat().st_size == 28 * tokens
    tokenizer = AutoTokenizer.from_pretrained(toy.TEACHER_DIR)
    teacher = AutoModelForCausalLM.from_pretrained(toy.TEACHER_DIR, dtype=torch.float32)
    record, block = blocks[sorted(blocks)[0]]
    # The sampled ids are the completion (after the template's `<think>\n` prefill) ...
    assert record.completion == "<think>\n" + tokenizer.decode(block.sampled, skip_special_tokens=True)
    # ... and the top-k are the teacher's own distribution at temperature 1, most likely first.
    prompt = tokenizer.apply_chat_template(record.prompt, add_generation_prompt=True, tokenize=False)
    ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        logits = teacher(torch.tensor([ids + block.sampled.tolist()])).logits[0, len(ids) - 1 : -1]
    expected = torch.log_softmax(logits.float(), -1).topk(4)
    assert block.ids.tolist() == expected.indices.tolist()
    np.testing.assert_allclose(block.logprobs.astype(np.float32), expected.values.numpy(), rtol=2e-3, atol=2e-3)


def test_resume_after_kill_9_keeps_records_and_sidecar_consistent(generated, run_cli, tmp_path):
    out = tmp_path / "killed"
    args = [*_generate_args(generated["data"]), "hf.batch_size=2", "flush_every=1"]
    trace_file, sidecar = out / "traces.jsonl", out / "traces.topk.bin"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    process = subprocess.Popen([sys.executable, "-m", "distill.cli", "generate", "--out", str(out), *args],
                               env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    deadline = time.time() + 120
    while time.time() < deadline and process.poll() is None:
        if trace_file.exists() and trace_file.read_bytes().count(b"\n") >= 1:
            break
        time.sleep(0.01)
    assert process.poll() is None, "the run finished before it could be killed; give it more work"
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    written = trace_file.read_bytes().count(b"\n")
    assert 1 <= written < 8, "killed mid-run"
    # What kill -9 can leave: a block fsynced without its record, and a torn record line.
    with sidecar.open("ab") as handle:
        handle.write(b"\x07" * 100)
    with trace_file.open("a") as handle:
        handle.write('{"id": "p3/1", "problem_id": "p3", "sample_idx": 1, "top_logprobs": {"file": "traces.topk.bin", "offs')

    code, _, stderr = run_cli("generate", "--out", str(out), *args)
    assert code == 0, stderr
    assert f"{written} samples already in traces.jsonl, {8 - written} to go" in stderr
    resumed, reference = _topk_by_key(out), _topk_by_key(generated["out"])
    assert set(resumed) == set(reference)
    ends = []
    for key, (record, block) in reference.items():
        again, again_block = resumed[key]
        assert again.completion == record.completion, key
        assert again_block.sampled.tolist() == block.sampled.tolist() and again_block.ids.tolist() == block.ids.tolist(), key
        # float16 storage: a resumed run batches rows differently, which can move a log-prob across
        # a rounding boundary, one float16 step (2^-10 relative, ~0.008 at -8)
        np.testing.assert_allclose(again_block.logprobs.astype(np.float32), block.logprobs.astype(np.float32), rtol=2e-3, atol=2e-3)
        ends.append((again.top_logprobs["offset"], again.top_logprobs["offset"] + 28 * len(again_block)))
    # Blocks tile the sidecar exactly: nothing orphaned (the 100 bytes were cut), nothing shared.
    ends.sort()
    assert ends[0][0] == 0 and all(a[1] == b[0] for a, b in zip(ends, ends[1:])) and ends[-1][1] == sidecar.stat().st_size
    # top_logprobs is locked with the run directory.
    code, _, stderr = run_cli("generate", "--out", str(out), *args, "top_logprobs=8")
    assert code == 2 and "top_logprobs: 4 -> 8" in stderr


# --------------------------------------------------------------------------------------------
# generate -> filter -> train


def _mean_kd(model_dir: Path, dataset, temperature: float = 1.0) -> float:
    """The student's mean top-k forward KL to the teacher over a dataset (no training)."""
    import torch
    from transformers import AutoModelForCausalLM

    from distill.students.data import collate
    from distill.students.logprobs import Scorer

    scorer = Scorer(AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32))
    total = count = 0.0
    with torch.no_grad():
        for example in dataset.examples:
            batch = collate([example], True, pad_id=0)
            total += float(scorer(batch.input_ids, batch.position_ids, batch.targets, None, reduction="sum", kd=batch.kd, kd_temperature=temperature)[2])
            count += len(batch.kd.positions)
    return total / count


def test_generate_filter_train_with_kd_lowers_the_kl_to_the_teacher(generated, run_cli, tmp_path):
    import pyarrow.parquet as pq
    from transformers import AutoTokenizer

    from distill.students.chat import resolve_template
    from distill.students.data import encode_dataset, iter_conversations

    filtered = tmp_path / "filter"
    code, _, stderr = run_cli("filter", "--in", str(generated["out"]), "--out", str(filtered), "plots=false", "decontaminate=[]",
                              "dedup=false", "verifier_workers=1")  # fmt: skip
    assert code == 0, stderr
    table = pq.read_table(filtered / "accepted.parquet").to_pylist()
    assert table, "the toy teacher solves some of its problems"
    for row in table:
        reference = json.loads(row["top_logprobs"])
        assert Path(reference["file"]) == (generated["out"] / "traces.topk.bin").resolve() and reference["k"] == 4

    # A fresh student with the teacher's tokenizer (far from the teacher), every accepted trace in each step.
    student = toy.init_model(toy.ModelShape(hidden=32, layers=2, heads=4, kv_heads=2, intermediate=64), tmp_path / "student")
    train = tmp_path / "train"
    args = ["train", "--student", str(student), "--data", str(filtered), "--out", str(train), "global_batch=64", "max_steps=8",
            "lr=1e-2", "grad_clip=1.0", "schedule=constant", "warmup_ratio=0", "kd_alpha=0.5", "kd_temperature=1.0"]  # fmt: skip
    code, _, stderr = run_cli(*args)
    assert code == 0, stderr
    assert f"{len(table)} of {len(table)} rows carry the teacher's top-k" in stderr
    kd = json.loads((train / "metrics.json").read_text())["kd"]
    assert kd["alpha"] == 0.5 and kd["rows_misaligned"] == 0 and kd["kd_tokens_per_epoch"] > 0
    assert kd["final_kd_loss"] < kd["first_kd_loss"]
    steps = [json.loads(line) for line in (train / "metrics.jsonl").read_text().splitlines() if '"step"' in line]
    assert all(s["kd_loss"] is not None and s["kd_tokens"] > 0 for s in steps)

    # Measured apart from training: the trained student is closer to the teacher's top-k than its base.
    tokenizer = AutoTokenizer.from_pretrained(student)
    dataset = encode_dataset(iter_conversations(filtered), tokenizer, resolve_template("auto", tokenizer), 512, progress=False, kd=True)
    assert all(e.kd is not None for e in dataset.examples)
    before, after = _mean_kd(student, dataset), _mean_kd(train / "model", dataset)
    assert after < 0.8 * before, (before, after)


def test_kd_alpha_zero_is_plain_sft_and_bad_kd_data_is_refused(generated, run_cli, tmp_path, tiny_qwen):
    common = ["--student", str(toy.BASE_DIR), "global_batch=4", "max_steps=2", "lr=3e-3", "schedule=constant", "warmup_ratio=0"]
    traces = generated["out"] / "traces.jsonl"
    stripped = tmp_path / "stripped.jsonl"  # the same traces without their top-k
    stripped.write_text("".join(json.dumps({k: v for k, v in json.loads(line).items() if k != "top_logprobs"}) + "\n"
                                for line in traces.read_text().splitlines()))  # fmt: skip
    losses = {}
    for name, data in (("topk", traces), ("plain", stripped)):
        code, _, stderr = run_cli("train", "--data", str(data), "--out", str(tmp_path / name), *common)
        assert code == 0, stderr
        rows = [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines() if '"step"' in line]
        assert all("kd_loss" not in r for r in rows)
        losses[name] = [(r["loss"], r["grad_norm"]) for r in rows]
        if name == "topk":
            assert "kd_alpha=0.5 would distil from them" in stderr
    assert losses["topk"] == losses["plain"], "kd_alpha=0: the data's top-k change nothing"

    # kd_alpha > 0 on data without top-k, and a student whose tokenizer differs from the teacher's.
    code, _, stderr = run_cli("train", "--data", str(stripped), "--out", str(tmp_path / "none"), *common, "kd_alpha=0.5")
    assert code == 2 and "no row carries the teacher's top-k" in stderr and "kd_alpha=0" in stderr and "Traceback" not in stderr
    assert not (tmp_path / "none").exists(), "a refused run leaves no run directory"
    code, _, stderr = run_cli("train", "--data", str(traces), "--out", str(tmp_path / "other"), "--student", str(tiny_qwen),
                              *common[2:], "kd_alpha=0.5")  # fmt: skip
    assert code == 2 and f"{traces}:" in stderr and "tokenizer or chat template differs from the teacher's" in stderr, stderr
    assert "Traceback" not in stderr


def test_alignment_on_the_real_qwen_tokenizer_and_misaligned_rows_are_counted(shared_data, tmp_path):
    """The teacher's ids as a Qwen-family teacher samples them (after the `<think>\\n` prefill,
    up to <|im_end|>) are found in the student's tokenization; rows that are not are counted,
    and only a dataset where none aligns is refused."""
    from transformers import AutoTokenizer

    from distill.students.chat import resolve_template
    from distill.students.data import Conversation, align_topk, encode, encode_dataset, kd_refusal
    from distill.topk import SidecarWriter, pack

    tokenizer = AutoTokenizer.from_pretrained(shared_data / "tokenizers" / "qwen2.5-instruct")
    template = resolve_template("chatml-think", tokenizer)
    generated = "Okay, 17 + 25: 7 + 5 = 12, carry 1; 1 + 2 + 1 = 4.\n</think>\n\nSo the sum is \\boxed{42}."
    messages = [{"role": "user", "content": "What is 17 + 25?"}, {"role": "assistant", "content": "<think>\n" + generated}]
    sampled = tokenizer(generated + "<|im_end|>", add_special_tokens=False)["input_ids"]
    example = encode(messages, tokenizer, template)
    start, count = align_topk(example, np.asarray(sampled))
    assert count == len(sampled) and tokenizer.decode(example.input_ids[start:]).startswith(generated)

    # One row whose sampled ids re-encode differently (a non-canonical split of its first word) among aligned ones.
    split = tokenizer("Ok", add_special_tokens=False)["input_ids"] + tokenizer("ay", add_special_tokens=False)["input_ids"]
    odd = split + sampled[1:]
    assert tokenizer.decode(odd) == tokenizer.decode(sampled) and odd != sampled
    path = tmp_path / "traces.topk.bin"
    writer = SidecarWriter(path)
    blocks = [pack(ids, [([t, 0], [-0.1, -2.5]) for t in ids], k=2) for ids in (sampled, odd)]
    offsets = writer.append(blocks)
    writer.close()
    refs = [{"file": str(path), "offset": o, "tokens": len(ids), "k": 2} for o, ids in zip(offsets, (sampled, odd))]
    rows = [Conversation(messages, "a.jsonl:1", refs[0]), Conversation(messages, "a.jsonl:2", refs[1])]
    dataset = encode_dataset(rows, tokenizer, template, 4096, progress=False, kd=True)
    assert (dataset.kd_rows, dataset.kd_misaligned) == (2, 1) and dataset.kd_first_misaligned.startswith("a.jsonl:2")
    assert dataset.examples[0].kd.count == len(sampled) and dataset.examples[1].kd is None
    assert kd_refusal(dataset, "student") is None
    only_odd = encode_dataset(rows[1:], tokenizer, template, 4096, progress=False, kd=True)
    assert "a.jsonl:2" in kd_refusal(only_odd, "student")
