"""Packed sequences on torch's own attention (distill/students/attention.py), on CPU in fp32.

The GPU side of the same checks (bf16 tolerance, flex_attention) is tests/test_gpu.py."""

from __future__ import annotations

import json
import sys
import types

import pytest

from distill.errors import ConfigError, MissingDependency


def _packed(tokenizer, texts):
    """(sequences, input_ids (1, T), position ids restarting per sequence, shifted targets)."""
    import torch

    from distill.students.logprobs import IGNORE

    sequences = [torch.tensor(tokenizer(t)["input_ids"]) for t in texts]
    input_ids = torch.cat(sequences)[None]
    positions = torch.cat([torch.arange(len(s)) for s in sequences])[None]
    targets = torch.cat([torch.cat([s[1:], torch.tensor([IGNORE])]) for s in sequences])[None]
    return sequences, input_ids, positions, targets


TEXTS = [
    "What is 2+2? It is 4.",
    "A longer one: 12 * 12 = 144, since 12 * 10 = 120 and 12 * 2 = 24, and 120 + 24 = 144.",
    "Short.",
    "Then 7 * 8 = 56.",
]


@pytest.fixture(params=["qwen", "llama"])
def tiny_model(request, tiny_qwen, tiny_llama):
    return {"qwen": tiny_qwen, "llama": tiny_llama}[request.param]


def test_packed_per_token_losses_and_gradients_equal_sequences_run_one_by_one(tiny_model, monkeypatch):
    """With the attention `auto` picks on CPU, the per-token log-probs of a packed row equal those
    of each sequence run alone through the plain full-logit forward (fp32, 1e-5), the summed loss's
    gradients equal the sum of the separate ones, and attention runs on each sequence alone: no
    call sees the whole row (no T x T square)."""
    import torch
    import transformers.integrations.sdpa_attention as sdpa_module
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from distill.students.attention import VARLEN, resolve_attention
    from distill.students.logprobs import summed_nll, token_logprobs

    name = resolve_attention("auto", torch.device("cpu"))
    assert name == VARLEN
    model = AutoModelForCausalLM.from_pretrained(tiny_model, attn_implementation=name).eval()
    plain = AutoModelForCausalLM.from_pretrained(tiny_model, attn_implementation="eager").eval()  # an independent reference
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    sequences, input_ids, positions, targets = _packed(tokenizer, TEXTS)

    seen = []
    original = sdpa_module.sdpa_attention_forward

    def spy(module, query, key, value, attention_mask, **kwargs):
        seen.append((query.shape[2], attention_mask is None))
        return original(module, query, key, value, attention_mask, **kwargs)

    monkeypatch.setattr(sdpa_module, "sdpa_attention_forward", spy)
    with torch.no_grad():
        packed = token_logprobs(model, input_ids, positions, targets, chunk_tokens=7)[0]
    layers = model.config.num_hidden_layers
    assert seen == [(len(s), True) for s in sequences] * layers, "each sequence attends alone, with the causal kernel"

    start = 0
    for sequence in sequences:
        with torch.no_grad():
            logits = plain(sequence[None]).logits[0].float()  # (L, V)
        alone = torch.log_softmax(logits, -1)[:-1].gather(-1, sequence[1:, None])[:, 0]
        assert torch.allclose(packed[start : start + len(sequence) - 1], alone, atol=1e-5, rtol=0)
        assert packed[start + len(sequence) - 1] == 0, "a sequence's last position predicts nothing"
        start += len(sequence)

    model.zero_grad()
    summed_nll(model, input_ids, positions, targets, chunk_tokens=5).backward()
    packed_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    for sequence in sequences:
        one = sequence[None]
        target = torch.cat([sequence[1:], torch.tensor([-100])])[None]
        summed_nll(model, one, torch.arange(len(sequence))[None], target, chunk_tokens=5).backward()
    for name_, parameter in model.named_parameters():
        assert torch.allclose(packed_grads[name_], parameter.grad, atol=1e-5, rtol=1e-4), name_


def test_two_packed_rows_and_one_by_one_agree(tiny_qwen):
    """Rows of a (2, T) batch are split independently, each at its own restarts."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from distill.students.attention import resolve_attention
    from distill.students.logprobs import token_logprobs

    model = AutoModelForCausalLM.from_pretrained(tiny_qwen, attn_implementation=resolve_attention("auto", torch.device("cpu"))).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_qwen)
    _, ids_a, pos_a, tg_a = _packed(tokenizer, TEXTS[:2])
    _, ids_b, pos_b, tg_b = _packed(tokenizer, TEXTS[2:] + ["and a filler that makes the widths match, more or less"])
    width = min(ids_a.shape[1], ids_b.shape[1])
    rows = [(t[:, :width]) for t in (ids_a, pos_a, tg_a, ids_b, pos_b, tg_b)]
    with torch.no_grad():
        both = token_logprobs(model, torch.cat([rows[0], rows[3]]), torch.cat([rows[1], rows[4]]), torch.cat([rows[2], rows[5]]))
        first = token_logprobs(model, rows[0], rows[1], rows[2])
        second = token_logprobs(model, rows[3], rows[4], rows[5])
    assert torch.allclose(both, torch.cat([first, second]), atol=1e-5, rtol=0)


def test_padded_batches_and_generation_compute_what_sdpa_computes(tiny_qwen):
    """A padding mask or a KV cache goes to transformers' sdpa path: GRPO's padded micro-batches
    and the hf engine's generation through the training model are unchanged."""
    import torch
    from transformers import AutoModelForCausalLM

    from distill.students.attention import resolve_attention
    from distill.students.logprobs import token_logprobs

    varlen = AutoModelForCausalLM.from_pretrained(tiny_qwen, attn_implementation=resolve_attention("auto", torch.device("cpu"))).eval()
    sdpa = AutoModelForCausalLM.from_pretrained(tiny_qwen, attn_implementation="sdpa").eval()
    torch.manual_seed(0)
    input_ids = torch.randint(3, 200, (3, 9))
    mask = torch.ones_like(input_ids)
    mask[0, 6:] = 0  # right padding (training)
    mask[1, 4:] = 0
    with torch.no_grad():
        assert torch.equal(token_logprobs(varlen, input_ids, None, None, mask), token_logprobs(sdpa, input_ids, None, None, mask))
    left = torch.ones_like(input_ids)
    left[0, :3] = 0  # left padding (generation)
    settings = dict(attention_mask=left, max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert torch.equal(varlen.generate(input_ids, **settings), sdpa.generate(input_ids, **settings))
    one = dict(attention_mask=torch.ones_like(input_ids[:1]), max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert torch.equal(varlen.generate(input_ids[:1], **one), sdpa.generate(input_ids[:1], **one))


def test_sequence_lengths_follow_position_restarts():
    import torch

    from distill.students.attention import sequence_lengths

    assert sequence_lengths(torch.arange(6)[None]) is None
    assert sequence_lengths(torch.tensor([[0, 1, 2, 0, 1, 0]])) == [[3, 2, 1]]
    assert sequence_lengths(torch.tensor([[0, 1, 0, 1], [0, 1, 2, 3]])) == [[2, 2], [4]]
    assert sequence_lengths(torch.tensor([[5, 6, 7, 0, 1]])) == [[3, 2]], "a row may start mid-sequence (positions not from 0)"


def test_auto_picks_flash_attn_when_installed_else_sdpa_varlen(monkeypatch):
    import torch

    from distill.students.attention import VARLEN, resolve_attention

    monkeypatch.setitem(sys.modules, "flash_attn", None)  # not installed
    assert resolve_attention("auto", torch.device("cpu")) == VARLEN
    assert resolve_attention("auto", torch.device("cuda")) == VARLEN
    with pytest.raises(MissingDependency, match="flash-attn"):
        resolve_attention("flash_attention_2", torch.device("cuda"))
    with pytest.raises(ConfigError, match="flex_attention cannot train on CPU"):
        resolve_attention("flex_attention", torch.device("cpu"))
    assert resolve_attention("flex_attention", torch.device("cuda")) == "flex_attention"
    assert resolve_attention("sdpa", torch.device("cpu")) == "sdpa"
    monkeypatch.setitem(sys.modules, "flash_attn", types.ModuleType("flash_attn"))  # installed
    assert resolve_attention("auto", torch.device("cuda")) == "flash_attention_2"
    assert resolve_attention("auto", torch.device("cpu")) == VARLEN


def test_a_model_saved_after_training_with_sdpa_varlen_loads_anywhere(tiny_qwen, tmp_path):
    """The implementation name is not written into config.json: the export loads without distill."""
    import torch
    from transformers import AutoModelForCausalLM

    from distill.students.attention import resolve_attention

    model = AutoModelForCausalLM.from_pretrained(tiny_qwen, attn_implementation=resolve_attention("auto", torch.device("cpu")))
    model.save_pretrained(tmp_path / "out")
    assert "sdpa_varlen" not in json.dumps(json.loads((tmp_path / "out" / "config.json").read_text()))


def test_sliding_window_layers_keep_their_window_when_packed(tmp_path):
    """A sliding-window model (Qwen2 with use_sliding_window): the window needs a real mask, so
    sdpa_varlen hands it to transformers' sdpa mask and computes what `sdpa` computes."""
    import torch
    from transformers import AutoModelForCausalLM, Qwen2Config, Qwen2ForCausalLM

    from distill.students.attention import resolve_attention
    from distill.students.logprobs import token_logprobs

    config = Qwen2Config(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         use_sliding_window=True, sliding_window=4, max_window_layers=0)  # fmt: skip
    torch.manual_seed(0)
    Qwen2ForCausalLM(config).save_pretrained(tmp_path / "sliding")
    assert "sliding_attention" in Qwen2Config.from_pretrained(tmp_path / "sliding").layer_types
    varlen = AutoModelForCausalLM.from_pretrained(tmp_path / "sliding", attn_implementation=resolve_attention("auto", torch.device("cpu"))).eval()
    eager = AutoModelForCausalLM.from_pretrained(tmp_path / "sliding", attn_implementation="eager").eval()
    lengths = [9, 6, 11]
    input_ids = torch.randint(0, 128, (1, sum(lengths)))
    positions = torch.cat([torch.arange(n) for n in lengths])[None]
    with torch.no_grad():
        packed = token_logprobs(varlen, input_ids, positions)
        start = 0
        for n in lengths:
            alone = token_logprobs(eager, input_ids[:, start : start + n])[0, :-1]
            assert torch.allclose(packed[0, start : start + n - 1], alone, atol=1e-5, rtol=0)
            start += n
        full = AutoModelForCausalLM.from_pretrained(tmp_path / "sliding", attn_implementation="eager", layer_types=["full_attention"] * 2).eval()
        assert (token_logprobs(full, input_ids[:, -11:])[0, :-1] - packed[0, -11:-1]).abs().max() > 1e-3, "the window matters here"


def test_what_per_sequence_sdpa_cannot_do_is_refused_not_dropped():
    """A logit softcap (Gemma 2) on a packed row: a one-line error naming the fix."""
    import types as pytypes

    import torch

    from distill.students.attention import varlen_attention

    layer = pytypes.SimpleNamespace(num_key_value_groups=2, is_causal=True, training=True)
    query, key = torch.randn(1, 4, 6, 8), torch.randn(1, 2, 6, 8)
    positions = torch.tensor([[0, 1, 2, 0, 1, 2]])
    with pytest.raises(ConfigError, match="does not support softcap.*attn_implementation=eager"):
        varlen_attention(layer, query, key, key, None, position_ids=positions, softcap=30.0)
    output, _ = varlen_attention(layer, query, key, key, None, position_ids=positions, softcap=None)
    assert output.shape == (1, 6, 4, 8)
