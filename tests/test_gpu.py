"""GPU-only paths: bf16 against fp32, packed attention in bf16, liger-kernel against the torch
loss, FSDP2 over NCCL in one process, `distill train` on CUDA. Marked `gpu`; skipped without
CUDA. bench/gpu_check.py runs them on the device (`pytest -m gpu tests/test_gpu.py`).

Their CPU counterparts (fp32, exact tolerances) are in tests/test_attention.py and
tests/test_train_loop.py; these never stand in for those."""

from __future__ import annotations

import os
import socket

import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

TEXTS = [
    "What is 2+2? It is 4.",
    "A longer one: 12 * 12 = 144, since 12 * 10 = 120 and 12 * 2 = 24, and 120 + 24 = 144.",
    "Short.",
    "Then 7 * 8 = 56, and 56 + 1 = 57.",
]


def _load(path, attention: str, dtype=torch.float32):
    from transformers import AutoModelForCausalLM

    from distill.students.attention import resolve_attention

    name = resolve_attention(attention, torch.device("cuda"))
    return AutoModelForCausalLM.from_pretrained(path, attn_implementation=name, dtype=dtype).cuda()


def _packed(tokenizer):
    from distill.students.logprobs import IGNORE

    sequences = [torch.tensor(tokenizer(t)["input_ids"]) for t in TEXTS]
    input_ids = torch.cat(sequences)[None].cuda()
    positions = torch.cat([torch.arange(len(s)) for s in sequences])[None].cuda()
    targets = torch.cat([torch.cat([s[1:], torch.tensor([IGNORE])]) for s in sequences])[None].cuda()
    return [s.cuda() for s in sequences], input_ids, positions, targets


@pytest.mark.parametrize("attention", ["sdpa_varlen", "flex_attention"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_packed_per_token_logprobs_equal_sequences_run_one_by_one_on_gpu(tiny_qwen, attention, dtype):
    """fp32: within 1e-4; bf16 autocast: within 0.05 per token (bf16 keeps 8 bits of mantissa)."""
    from transformers import AutoTokenizer

    from distill.students.logprobs import token_logprobs

    model = _load(tiny_qwen, attention).eval()
    plain = _load(tiny_qwen, "sdpa").eval()
    sequences, input_ids, positions, targets = _packed(AutoTokenizer.from_pretrained(tiny_qwen))
    tolerance = 1e-4 if dtype == "float32" else 5e-2
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16, enabled=dtype == "bfloat16"):
        packed = token_logprobs(model, input_ids, positions, targets)[0].float()
        start = 0
        for sequence in sequences:
            alone = token_logprobs(plain, sequence[None])[0, :-1].float()
            assert (packed[start : start + len(sequence) - 1] - alone).abs().max() < tolerance
            start += len(sequence)


def test_bf16_loss_is_the_fp32_loss_within_tolerance(tiny_qwen):
    """The bf16-autocast loss (what a GPU run trains with) is within 1% of the fp32 loss, and its
    gradients point the same way (cosine > 0.99)."""
    from transformers import AutoTokenizer

    from distill.students.logprobs import summed_nll

    model = _load(tiny_qwen, "auto")
    _, input_ids, positions, targets = _packed(AutoTokenizer.from_pretrained(tiny_qwen))
    losses, grads = {}, {}
    for dtype in ("float32", "bfloat16"):
        model.zero_grad()
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=dtype == "bfloat16"):
            loss = summed_nll(model, input_ids, positions, targets)
        loss.backward()
        losses[dtype] = float(loss)
        grads[dtype] = torch.cat([p.grad.flatten().float() for p in model.parameters()])
    assert abs(losses["bfloat16"] - losses["float32"]) / abs(losses["float32"]) < 1e-2
    assert torch.nn.functional.cosine_similarity(grads["bfloat16"], grads["float32"], dim=0) > 0.99


def test_liger_fused_loss_matches_the_torch_loss(tiny_qwen):
    """liger-kernel's fused linear cross-entropy and LinearCrossEntropy (torch): the same loss and
    gradients under bf16 autocast."""
    pytest.importorskip("liger_kernel", reason="liger-kernel is not installed")
    from transformers import AutoTokenizer

    from distill.students.logprobs import summed_nll

    model = _load(tiny_qwen, "auto")
    _, input_ids, positions, targets = _packed(AutoTokenizer.from_pretrained(tiny_qwen))
    results = {}
    for fused in ("liger", "chunked"):
        model.zero_grad()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = summed_nll(model, input_ids, positions, targets, fused=fused)
        loss.backward()
        results[fused] = (float(loss), torch.cat([p.grad.flatten().float() for p in model.parameters()]))
    (liger_loss, liger_grad), (torch_loss, torch_grad) = results["liger"], results["chunked"]
    assert abs(liger_loss - torch_loss) / abs(torch_loss) < 1e-2
    assert torch.nn.functional.cosine_similarity(liger_grad, torch_grad, dim=0) > 0.99


def test_fsdp2_over_nccl_in_one_process_matches_the_unsharded_model(tiny_qwen, monkeypatch):
    """students/parallel.shard on a one-rank NCCL mesh (FSDP2 with bf16 compute, fp32 reduce):
    the loss and gradient norm of the unsharded autocast model, and an optimizer step runs."""
    import torch.distributed as torch_dist
    from transformers import AutoTokenizer

    from distill.students.logprobs import Scorer
    from distill.students.parallel import Dist, shard

    _, input_ids, positions, targets = _packed(AutoTokenizer.from_pretrained(tiny_qwen))
    reference = Scorer(_load(tiny_qwen, "auto"))
    with torch.autocast("cuda", dtype=torch.bfloat16):
        expected = reference(input_ids, positions, targets, reduction="sum")
    expected.backward()
    expected_norm = float(torch.nn.utils.clip_grad_norm_(reference.parameters(), float("inf")))

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(port))
    torch_dist.init_process_group("nccl", rank=0, world_size=1, device_id=torch.device("cuda", 0))
    try:
        dist = Dist(rank=0, world=1, local_rank=0, device=torch.device("cuda", 0), mixed_precision=True)
        monkeypatch.setattr(Dist, "distributed", property(lambda self: True))  # shard even a world of one
        sharded = shard(Scorer(_load(tiny_qwen, "auto")), dist)
        assert any(type(p).__name__ == "DTensor" for p in sharded.parameters()), "FSDP2 sharded the parameters"
        with dist.autocast():  # FSDP's mixed-precision policy, not autocast, casts here
            loss = sharded(input_ids, positions, targets, reduction="sum")
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(sharded.parameters(), float("inf"))
        norm = float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)
        torch.optim.AdamW(sharded.parameters(), lr=1e-3).step()
    finally:
        torch_dist.destroy_process_group()
    assert abs(float(loss) - float(expected)) / float(expected) < 2e-2
    assert abs(norm - expected_norm) / expected_norm < 5e-2


def test_distill_train_on_cuda_trains_in_bf16_and_reports_memory(tiny_qwen, tmp_path):
    """The whole loop on one GPU: bf16 autocast, packed sdpa_varlen, loss falls, peak memory logged."""
    import json

    from distill.students.sft import TrainConfig, run

    data = tmp_path / "data.jsonl"
    rows = [{"messages": [{"role": "user", "content": f"What is {a} + {a}?"}, {"role": "assistant", "content": f"It is {2 * a}."}]} for a in range(16)]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "run"
    metrics = run(TrainConfig(student=str(tiny_qwen), data=str(data), out=out, chat_template="chatml", max_seq_len=128, global_batch=8,
                              epochs=4, lr=3e-3, warmup_ratio=0.0, save_every=1000))  # fmt: skip
    steps = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [s for s in steps if "loss" in s]
    assert metrics["final_loss"] < metrics["first_loss"]
    assert all(s["peak_memory_gb"] > 0 for s in steps)
    assert os.path.isfile(out / "model" / "config.json")
