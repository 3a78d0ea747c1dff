"""`distill train` end to end on tiny models, on CPU: packing, averaging, distribution, resume,
LoRA, export and bad input.

Most runs use a 2-layer Qwen2 with a character-level tokenizer (vocabulary ~100, so steps take
milliseconds); the packing test uses conftest's tiny Qwen2 with the real Qwen2.5 tokenizer.
"""

from __future__ import annotations

import json
import os
import random
import string
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from distill.errors import ConfigError, InputError

ROOT = Path(__file__).resolve().parents[1]
# The settings every run here shares: a constant lr, so the first k steps of any run are the
# same whatever its length, and runs of different lengths can be compared step by step.
COMMON = ["global_batch=8", "lr=3e-3", "schedule=constant", "warmup_ratio=0", "save_every=2"]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models run fastest on one thread, and the machine's cores are shared."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def student(tmp_path_factory) -> Path:
    """A tiny Qwen2 with a character tokenizer and a ChatML template."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from distill.chartok import build_char_tokenizer

    out = tmp_path_factory.mktemp("char-student")
    tokenizer = build_char_tokenizer(string.printable)
    config = Qwen2Config(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=1024, tie_word_embeddings=True,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )  # fmt: skip
    torch.manual_seed(0)
    Qwen2ForCausalLM(config).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """24 arithmetic traces of varied length (problem + completion rows)."""
    rng = random.Random(0)
    path = tmp_path_factory.mktemp("data") / "traces.jsonl"
    with path.open("w") as handle:
        for _ in range(24):
            a, b = rng.randint(10, 999), rng.randint(10, 999)
            steps = " ".join(f"carry{k}" for k in range(rng.randint(1, 12)))
            completion = f"<think>\n{steps} {a}+{b}={a + b}\n</think>\n\nThe answer is \\boxed{{{a + b}}}."
            handle.write(json.dumps({"problem": f"What is {a}+{b}?", "completion": completion}) + "\n")
    return path


def cli(*args: str) -> int:
    from distill.cli import main

    try:
        main(list(args))
    except SystemExit as exit_:
        return int(exit_.code or 0)
    return 0


def train_args(student: Path, data: Path, out: Path, *extra: str) -> list[str]:
    return ["train", "--student", str(student), "--data", str(data), "--out", str(out), *COMMON, *extra]


def step_records(out: Path) -> dict[int, dict]:
    """The last record logged for each step (a killed run may have logged a step twice)."""
    records = {}
    for line in (out / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        if "loss" in record:
            records[record["step"]] = record
    return records


def weights(model_dir: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(model_dir / "model.safetensors"))


def subprocess_env() -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    return env


@pytest.fixture(scope="module")
def reference(student, data, tmp_path_factory) -> Path:
    """An uninterrupted 4-step single-process run, through the command line."""
    out = tmp_path_factory.mktemp("reference") / "run"
    assert cli(*train_args(student, data, out, "max_steps=4")) == 0
    return out


# --------------------------------------------------------------------------------------------
# the loop


def test_packed_sequences_score_exactly_like_separate_ones(tiny_qwen):
    """Per-token log-probs of three packed sequences equal those of each sequence run alone
    through the model's own full-logit forward, within 1e-5; a packed row with an attention
    mask (which turns transformers' packed-sequence detection off) does not."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from distill.students.logprobs import IGNORE, summed_nll, token_logprobs

    model = AutoModelForCausalLM.from_pretrained(tiny_qwen, attn_implementation="sdpa").eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_qwen)
    texts = ["What is 2+2? It is 4.", "A longer one: 12 * 12 = 144, since 12 * 10 = 120 and 12 * 2 = 24.", "Short."]
    sequences = [torch.tensor(tokenizer(t)["input_ids"]) for t in texts]
    input_ids = torch.cat(sequences)[None]  # (1, T)
    positions = torch.cat([torch.arange(len(s)) for s in sequences])[None]
    targets = torch.cat([torch.cat([s[1:], torch.tensor([IGNORE])]) for s in sequences])[None]
    with torch.no_grad():
        packed = token_logprobs(model, input_ids, positions, targets, chunk_tokens=7)[0]  # small chunks on purpose
        leaky = token_logprobs(model, input_ids, positions, targets, attention_mask=torch.ones_like(input_ids))[0]
        start, reference = 0, []
        for sequence in sequences:
            logits = model(sequence[None]).logits[0].float()  # (L, V): the plain path
            alone = torch.log_softmax(logits, -1)[:-1].gather(-1, sequence[1:, None])[:, 0]
            reference.append(alone)
            assert torch.allclose(packed[start : start + len(sequence) - 1], alone, atol=1e-5, rtol=0)
            assert packed[start + len(sequence) - 1] == 0, "a sequence's last position predicts nothing"
            start += len(sequence)
        total = summed_nll(model, input_ids, positions, targets, chunk_tokens=5)
    assert torch.isclose(total, -torch.cat(reference).sum(), atol=1e-4)
    later = slice(len(sequences[0]), None)
    assert (leaky[later] - packed[later]).abs().max() > 1e-3, "the test detects attention across sequences"


def test_chunked_losses_have_the_gradients_of_full_logit_cross_entropy(tiny_qwen):
    """summed_nll (fused: gradients computed in the forward; chunked: checkpointed chunks) gives
    the loss and gradients of plain cross-entropy over materialised logits."""
    import torch
    import torch.nn.functional as F
    from transformers import AutoModelForCausalLM

    from distill.students.logprobs import IGNORE, summed_nll

    model = AutoModelForCausalLM.from_pretrained(tiny_qwen, attn_implementation="sdpa")
    torch.manual_seed(0)
    input_ids = torch.randint(0, 1000, (2, 23))
    targets = torch.cat([input_ids[:, 1:], torch.full((2, 1), IGNORE)], 1)
    targets[0, :5] = IGNORE  # an untrained prompt
    position_ids = torch.arange(23).expand(2, 23)

    def gradients(compute):
        model.zero_grad()
        loss = compute()
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}

    def full():
        logits = model(input_ids, position_ids=position_ids, use_cache=False).logits.float()
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=IGNORE, reduction="sum")

    expected_loss, expected = gradients(full)
    for mode in ("auto", "chunked"):
        loss, grads = gradients(lambda: summed_nll(model, input_ids, position_ids, targets, chunk_tokens=8, fused=mode))
        assert torch.isclose(loss, expected_loss, rtol=1e-5), mode
        for name, grad in grads.items():
            assert torch.allclose(grad, expected[name], atol=1e-6, rtol=1e-4), (mode, name)


def test_empty_micro_batches_never_reach_the_fused_loss(tiny_qwen, monkeypatch):
    """plan_step pads a rank with fewer micro-batches with empty ones (FSDP's collectives must
    match); the fused loss kernel must never see them (liger's divides by the row count). The
    guard returns a zero whose gradient reaches every parameter, so every rank reduces alike."""
    import torch
    from transformers import AutoModelForCausalLM

    from distill.students import logprobs
    from distill.students.data import Encoded, collate, plan_step

    plan = plan_step([30, 5, 5], [0, 1, 2], world=2, packing=True, micro_batch_tokens=30, micro_batch_size=1)
    assert [len(p) for p in plan] == [1, 1] and plan[1] == [[1, 2]]
    plan = plan_step([30, 30, 30], [0, 1, 2], world=2, packing=True, micro_batch_tokens=30, micro_batch_size=1)
    assert [] in plan[1], "uneven shares: rank 1 runs an empty micro-batch"

    rows_seen = []

    def fused_kernel(hidden, weight, bias, targets, chunk_tokens):  # a stand-in that refuses zero rows, as liger fails on them
        rows_seen.append(hidden.shape[0])
        assert hidden.shape[0] > 0, "an empty micro-batch reached the fused loss"
        return hidden.sum() * 0

    monkeypatch.setattr(logprobs.LinearCrossEntropy, "apply", fused_kernel)
    model = AutoModelForCausalLM.from_pretrained(tiny_qwen, attn_implementation="sdpa")
    for packing in (True, False):
        batch = collate([], packing, pad_id=0)
        model.zero_grad()
        loss = logprobs.summed_nll(model, batch.input_ids, batch.position_ids, batch.targets, batch.attention_mask, fused="auto")
        loss.backward()
        assert loss.item() == 0.0 and batch.trained == 0
        assert all(p.grad is not None and not p.grad.any() for p in model.parameters()), "zero gradients, on every parameter"
    assert rows_seen == []
    example = Encoded(np.arange(1, 9, dtype=np.int32), np.array([0, 0, 0, 1, 1, 1, 1, 1], dtype=bool))
    batch = collate([example], True, pad_id=0)
    logprobs.summed_nll(model, batch.input_ids, batch.position_ids, batch.targets, fused="auto")
    assert rows_seen == [5], "non-empty micro-batches still take the fused path"


def test_one_step_of_8_equals_4_accumulated_micro_batches_of_2(student, data, tmp_path):
    """The loss is the mean over every trained token of the global batch, however the batch is cut
    into micro-batches (padded or packed): same loss and gradient norm for two steps."""
    from distill.students.sft import TrainConfig, run

    def two_steps(name: str, **changes) -> dict[int, dict]:
        cfg = TrainConfig(student=str(student), data=str(data), out=tmp_path / name, global_batch=8, lr=3e-3, warmup_ratio=0,
                          max_steps=2, save_every=100, **changes)  # fmt: skip
        run(cfg)
        return step_records(tmp_path / name)

    whole = two_steps("whole", packing=False, micro_batch_size=8)
    accumulated = two_steps("accumulated", packing=False, micro_batch_size=2)
    packed = two_steps("packed", packing=True, micro_batch_tokens=260)
    assert whole[1]["micro_batches"] == 1 and accumulated[1]["micro_batches"] == 4 and packed[1]["micro_batches"] > 1
    assert whole[1]["padding_fraction"] > 0 and packed[1]["padding_fraction"] == 0
    for step in (1, 2):
        for other in (accumulated, packed):
            assert other[step]["loss"] == pytest.approx(whole[step]["loss"], rel=1e-5, abs=0)
            assert other[step]["grad_norm"] == pytest.approx(whole[step]["grad_norm"], rel=1e-4, abs=0)
            assert other[step]["trained_tokens"] == whole[step]["trained_tokens"]


def test_loss_falls_parameters_change_and_every_step_is_logged(reference, student):
    records = step_records(reference)
    assert sorted(records) == [1, 2, 3, 4]
    assert records[4]["loss"] < records[1]["loss"] - 0.05
    for record in records.values():
        assert record["lr"] == pytest.approx(3e-3) and record["grad_norm"] > 0 and record["tokens_per_s"] > 0
        assert record["peak_memory_gb"] > 0 and record["mfu"] is None  # MFU is measured on GPUs only
    trained, base = weights(reference / "model"), weights(student)
    changed = [name for name in base if not (trained[name] == base[name]).all()]
    assert len(changed) == len(base), f"every parameter moved; unchanged: {set(base) - set(changed)}"
    metrics = json.loads((reference / "metrics.json").read_text())
    assert metrics["steps"] == 4 and metrics["final_loss"] == pytest.approx(records[4]["loss"])
    # the compute ledger: every token of each sequence through forward + backward, 6N each
    from distill.compute import weights_params

    ledger = metrics["compute"]
    assert ledger["student_params"] == weights_params(student) and ledger["counts_as"] == "training"
    assert ledger["student_tokens_trained"] == metrics["train_tokens"] == sum(r["trained_tokens"] for r in records.values())
    assert ledger["student_tokens_forward_backward"] == sum(r["tokens"] for r in records.values()) > ledger["student_tokens_trained"]
    assert ledger["flops_total"] == 6 * ledger["student_params"] * ledger["student_tokens_forward_backward"]
    assert (reference / "config.yaml").is_file() and (reference / "train.log").is_file()


def test_export_loads_with_transformers_and_keeps_the_chat_template(reference, student):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    model = AutoModelForCausalLM.from_pretrained(reference / "model")
    tokenizer = AutoTokenizer.from_pretrained(reference / "model")
    assert tokenizer.chat_template == AutoTokenizer.from_pretrained(student).chat_template
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "What is 1+1?"}], tokenize=False, add_generation_prompt=True)
    assert prompt.endswith("<|im_start|>assistant\n")
    end_of_turn = tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert end_of_turn in GenerationConfig.from_pretrained(reference / "model").eos_token_id
    ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=False).input_ids
    with torch.no_grad():
        assert torch.isfinite(model(ids).logits).all()


def test_kill_9_then_rerun_continues_the_same_trajectory(reference, student, data, tmp_path):
    """A run killed with SIGKILL after step 3 (checkpoint at step 2) and run again ends exactly as
    the uninterrupted run: same loss at every step, same final weights."""
    out = tmp_path / "run"
    args = train_args(student, data, out, "max_steps=4")
    env = dict(subprocess_env(), DISTILL_FAULT_SIGKILL_AT_STEP="3")
    killed = subprocess.run([sys.executable, "-m", "distill.cli", *args], env=env, capture_output=True, text=True, timeout=180)
    assert killed.returncode == -9, killed.stderr[-2000:]
    assert (out / "checkpoints" / "latest").read_text() == "step-00000002"
    assert not (out / "model").exists()
    assert cli(*args) == 0  # the same command again resumes
    log = (out / "metrics.jsonl").read_text()
    assert '"event": "resume", "step": 2' in log
    assert "(built by an earlier launch: not tokenized again)" in (out / "train.log").read_text(), "the resume reads the tokenized cache"
    expected, resumed = step_records(reference), step_records(out)
    assert [resumed[s]["loss"] for s in (1, 2, 3, 4)] == pytest.approx([expected[s]["loss"] for s in (1, 2, 3, 4)], rel=1e-6, abs=0)
    final, reference_final = weights(out / "model"), weights(reference / "model")
    assert all((final[name] - reference_final[name]).abs().max() < 1e-6 for name in final)


def test_two_cpu_processes_with_fsdp_match_one_process(reference, student, data, tmp_path):
    out = tmp_path / "run"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "distill.cli",
               *train_args(student, data, out, "max_steps=2")]  # fmt: skip
    done = subprocess.run(command, env=subprocess_env(), capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    two, one = step_records(out), step_records(reference)
    for step in (1, 2):
        assert two[step]["loss"] == pytest.approx(one[step]["loss"], rel=1e-5, abs=0)
        assert two[step]["grad_norm"] == pytest.approx(one[step]["grad_norm"], rel=1e-4, abs=0)
        assert two[step]["tokens"] == one[step]["tokens"]
    assert json.loads((out / "metrics.json").read_text())["world_size"] == 2
    # One cache, built by rank 0 and memory-mapped by both ranks (rank 1 never tokenizes: it is
    # handed the folder), and the losses above are computed from it.
    assert len(list((out / "tokenized").iterdir())) == 1 and (out / "train.log").read_text().count("tokenized data:") == 1
    from transformers import AutoModelForCausalLM

    assert AutoModelForCausalLM.from_pretrained(out / "model") is not None  # FSDP shards gathered into one directory


def test_lora_merged_at_export_or_kept_as_an_adapter(student, data, tmp_path):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = weights(student)
    for merge in ("true", "false"):
        assert cli(*train_args(student, data, tmp_path / merge, "max_steps=2", "lora=true", "lora_r=4", f"merge_lora={merge}", "lr=1e-2")) == 0
    merged_dir, adapter_dir = tmp_path / "true" / "model", tmp_path / "false" / "model"
    merged = weights(merged_dir)
    assert not (merged_dir / "adapter_config.json").exists() and set(merged) == set(base)
    assert (merged["model.embed_tokens.weight"] == base["model.embed_tokens.weight"]).all(), "the frozen base is untouched"
    assert not (merged["model.layers.0.self_attn.q_proj.weight"] == base["model.layers.0.self_attn.q_proj.weight"]).all()
    assert (adapter_dir / "adapter_config.json").is_file() and not (adapter_dir / "model.safetensors").exists()
    ids = torch.tensor([[5, 17, 30, 41, 9]])
    with torch.no_grad():
        from_merged = AutoModelForCausalLM.from_pretrained(merged_dir)(ids).logits
        with_adapter = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(student), adapter_dir)(ids).logits
    assert torch.allclose(from_merged, with_adapter, atol=1e-5), "merged weights equal base + adapter"


def test_qlora_export_and_weight_sync_dequantize_and_merge(student, tmp_path):
    """A 4-bit (bitsandbytes NF4) base with a LoRA adapter: the export writes plain weights (the
    base dequantised, the adapter merged in full precision) that transformers loads without
    bitsandbytes and that compute what the QLoRA model computes; GRPO's weight sync sends the same
    tensors under the base model's names; the 4-bit base is left untouched. bitsandbytes runs
    4-bit layers on CPU since 0.48; QLoRA *training* stays GPU-only (load_student refuses it on CPU)."""
    pytest.importorskip("bitsandbytes", reason="QLoRA needs bitsandbytes (the [gpu] extra); its CPU backend runs this test")
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

    from distill.students.checkpoint import export_model, is_quantized
    from distill.students.grpo import _policy_weights
    from distill.students.parallel import Dist

    from transformers import Qwen2Config, Qwen2ForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(student)
    shape = Qwen2Config(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                        num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=True)  # fmt: skip
    torch.manual_seed(0)
    Qwen2ForCausalLM(shape).save_pretrained(tmp_path / "base")  # 4-bit blocks of 64 need rows of at least 64
    quantization = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32, bnb_4bit_use_double_quant=True)
    base = AutoModelForCausalLM.from_pretrained(tmp_path / "base", quantization_config=quantization, device_map={"": "cpu"})
    torch.manual_seed(0)
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", task_type="CAUSAL_LM"))
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0, 0.05)  # a trained adapter (B starts at zero)
    assert is_quantized(model)
    packed = {name: p.detach().clone() for name, p in model.named_parameters() if hasattr(p, "quant_state")}
    ids = torch.tensor([[5, 17, 30, 41, 9, 22, 3]])
    model.train()  # no dropout anywhere; in eval mode bitsandbytes repacks 4-bit weights for its CPU kernel
    with torch.no_grad():
        expected = model(ids).logits

    dist = Dist(rank=0, world=1, local_rank=0, device=torch.device("cpu"))
    export_model(model, tokenizer, tmp_path / "merged", dist, merge_lora=True, dtype=torch.float32)
    config = json.loads((tmp_path / "merged" / "config.json").read_text())
    assert "quantization_config" not in config
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    assert not is_quantized(exported)
    with torch.no_grad():
        assert torch.allclose(exported(ids).logits, expected, atol=1e-4), "the export computes what the QLoRA model computes"

    sent = dict(_policy_weights(model))
    saved = exported.state_dict()
    assert set(sent) == set(saved), "the weight sync uses the base model's parameter names"
    assert all(sent[name].shape == saved[name].shape and torch.allclose(sent[name].float(), saved[name], atol=1e-6) for name in saved)
    assert all(torch.equal(p, packed[name]) for name, p in model.named_parameters() if name in packed), "the 4-bit base is untouched"

    export_model(model, tokenizer, tmp_path / "adapter", dist, merge_lora=False)
    assert (tmp_path / "adapter" / "adapter_config.json").is_file() and not (tmp_path / "adapter" / "model.safetensors").exists()


# --------------------------------------------------------------------------------------------
# bad input: one line, before any training


def test_bad_input_gets_one_clear_message_before_training(student, data, tmp_path, capsys, monkeypatch):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    cases = [
        (train_args(student, empty, tmp_path / "a"), "no training rows"),
        (train_args(student, data, tmp_path / "b", "max_seq_len=20"), "none of the 24 rows is left to train on"),
        (["train", "--student", "qwen-9b", "--data", str(data), "--out", str(tmp_path / "c")], "is not a preset (qwen-1.5b"),
        (train_args(student, data, tmp_path / "d", "micro_batch_tokens=50"), "micro_batch_tokens=50 is smaller than the longest"),
    ]
    for args, message in cases:
        assert cli(*args) == 2
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err
        assert len([line for line in err.splitlines() if line.startswith("error:")]) == 1
        assert not Path(args[args.index("--out") + 1]).exists(), "a refused run leaves no run directory"

    import psutil

    class Scarce:
        available = 2**20  # 1 MiB free

    monkeypatch.setattr(psutil, "virtual_memory", lambda: Scarce())
    assert cli(*train_args(student, data, tmp_path / "e")) == 2
    err = capsys.readouterr().err
    assert "not enough memory" in err and "lora=true" in err
    assert "parameters:" not in err, "refused before the model was loaded"
    assert not (tmp_path / "e").exists(), "a refused run leaves no run directory"


def test_dropped_and_truncated_sequences_are_reported(student, data, tmp_path):
    from distill.students.sft import TrainConfig, run

    lengths = []
    for too_long in ("drop", "truncate"):
        out = tmp_path / too_long
        metrics = run(TrainConfig(student=str(student), data=str(data), out=out, max_seq_len=100, too_long=too_long, max_steps=1, save_every=100))
        log = (out / "train.log").read_text()
        lengths.append(metrics["sequences"])
        if too_long == "drop":
            dropped = metrics["dropped_too_long"]
            assert dropped > 0 and f"warning: sequences dropped, longer than max_seq_len=100 (too_long=drop): {dropped} of 24" in log
            assert "raise max_seq_len" in log
            warnings = json.loads((out / "metrics.json").read_text())["warnings"]
            assert [(w["reason"], w["count"], w["total"]) for w in warnings] == [("too_long", dropped, 24)]
        else:
            assert metrics["truncated"] > 0 and metrics["dropped_too_long"] == 0 and "warning: sequences truncated to max_seq_len=100" in log
            assert [w["reason"] for w in json.loads((out / "metrics.json").read_text())["warnings"]] == ["truncated"]
    assert lengths[1] == 24 > lengths[0]


def test_rerunning_a_finished_run_does_nothing(reference, student, data, capsys):
    before = (reference / "metrics.jsonl").read_text()
    assert cli(*train_args(student, data, reference, "max_steps=4")) == 0
    assert "already trained (4 steps)" in capsys.readouterr().err
    assert (reference / "metrics.jsonl").read_text() == before


def test_the_data_is_tokenized_once_and_memory_mapped(student, data, tmp_path, monkeypatch):
    """A second launch on the same data (another run directory, same data_cache) reads the cache
    and tokenizes nothing; a change that alters the token ids (max_seq_len) builds a new cache."""
    from distill.students import data as data_module
    from distill.students.data import TokenizedData
    from distill.students.sft import TrainConfig, run

    calls = []
    tokenize = data_module.tokenize_segments
    monkeypatch.setattr(data_module, "tokenize_segments", lambda batch, tokenizer: calls.append(len(batch)) or tokenize(batch, tokenizer))
    cache = tmp_path / "cache"
    common = dict(student=str(student), data=str(data), max_steps=1, save_every=100, data_cache=str(cache))
    first = run(TrainConfig(out=tmp_path / "a", **common))
    assert sum(calls) == 24
    second = run(TrainConfig(out=tmp_path / "b", **common))
    assert sum(calls) == 24, "the second launch tokenized again"
    assert first["first_loss"] == second["first_loss"] and first["sequences"] == second["sequences"] == 24
    folder = next(cache.iterdir())
    mapped = TokenizedData(folder)
    assert isinstance(mapped.input_ids, np.memmap) and len(mapped) == 24 and mapped.tokens == int(mapped.lengths.sum())
    run(TrainConfig(out=tmp_path / "c", max_seq_len=200, **common))
    assert sum(calls) == 48 and len(list(cache.iterdir())) == 2


# --------------------------------------------------------------------------------------------
# the filter's length check is the training tokenization


def test_a_trace_the_filter_accepts_is_never_dropped_by_training(student, tmp_path, monkeypatch):
    """`distill filter --student P` counts lengths with training's own template and tokenization
    and the max_seq_len training uses: for a model directory, exactly the traces the filter calls
    too long are the ones training drops; for a preset, the filter uses the smallest max_seq_len
    of its plans (here one GPU's), so nothing it accepts is dropped on any GPU count."""
    from distill.students.presets import PRESETS
    from distill.students.sft import TrainConfig, run as train
    from distill.teacher.filter import FilterConfig, run as filter_traces
    from distill.verify import Verifier

    rng = random.Random(1)
    rows = []
    for index in range(24):
        a, b = rng.randint(10, 99), rng.randint(10, 99)
        steps = " ".join(f"step{k}" for k in range(rng.randint(5, 200)))
        rows.append({"problem_id": f"q{index}", "sample_idx": 0, "problem": f"What is {a}+{b}?", "answer": str(a + b),
                     "completion": f"<think>\n{steps}\n</think>\n\nThe answer is \\boxed{{{a + b}}}."})
    traces = tmp_path / "traces.jsonl"
    traces.write_text("".join(json.dumps(row) + "\n" for row in rows))
    preset = {"model": str(student), "params_b": 0.0001, "source": "test",
              "config": {"chat_template": "chatml-think", "max_seq_len": 900}, "memory_plan": {1: {"max_seq_len": 600}, 2: {}}}  # fmt: skip
    monkeypatch.setitem(PRESETS, "tiny-char", preset)

    with Verifier(workers=1) as verifier:
        for name, limit in ((str(student), 1024), ("tiny-char", 600)):
            out = tmp_path / f"filter-{len(name)}"
            metrics = filter_traces(FilterConfig(traces=traces, out=out, student=name, decontaminate=(), dedup=False, plots=False), verifier=verifier)
            too_long = metrics["check_failures"].get("too_long", 0)
            assert 0 < too_long < 24 and metrics["accepted"] == 24 - too_long, (name, metrics)
            assert json.loads((out / "stats.json").read_text())["max_seq_len"] == limit
            trained = train(TrainConfig(student=name, data=str(out), out=tmp_path / f"train-{len(name)}", max_steps=1, global_batch=4, save_every=100))
            assert trained["dropped_too_long"] == 0 and trained["sequences"] == metrics["accepted"], name
            if name == str(student):  # the same limit on both sides: the same traces are too long
                unfiltered = train(TrainConfig(student=name, data=str(traces), out=tmp_path / "train-all", max_steps=1, global_batch=4, save_every=100))
                assert unfiltered["dropped_too_long"] == too_long


def test_two_processes_load_without_a_full_copy_on_every_rank(tmp_path):
    """parallel.load_sharded: rank 0 reads the weights, rank 1 receives only its shards. Each
    rank's peak resident memory while loading, over its resident memory before: rank 0 holds the
    whole fp32 model once; rank 1 stays well under it (about half: its shard). The gathered weights
    equal the saved ones (the losses of the loading path: test_two_cpu_processes_with_fsdp...)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=512, hidden_size=512, intermediate_size=1536, num_hidden_layers=12, num_attention_heads=8,
                         num_key_value_heads=8, max_position_embeddings=256, tie_word_embeddings=True)  # fmt: skip
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    size = sum(p.numel() for p in model.parameters()) * 4  # fp32 bytes, about 170 MB
    model.save_pretrained(tmp_path / "model")
    del model
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               str(ROOT / "tests" / "fsdp_load_worker.py"), str(tmp_path / "model"), str(tmp_path)]  # fmt: skip
    done = subprocess.run(command, env=subprocess_env(), capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in (0, 1)]
    assert ranks[0]["weights_equal"] is True
    assert ranks[0]["local_params"] + ranks[1]["local_params"] == size // 4 and ranks[1]["local_params"] < 0.55 * size // 4
    assert ranks[0]["rss_growth"] > 0.9 * size, "rank 0 reads the whole model (the measurement sees a full copy)"
    assert ranks[1]["rss_growth"] < 0.8 * size, f"rank 1 grew by {ranks[1]['rss_growth'] / 2**20:.0f} MiB for a {size / 2**20:.0f} MiB model"
