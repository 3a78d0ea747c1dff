"""Student presets, memory plans, the LR schedule and recipe layering for `distill train`."""

from __future__ import annotations

import pytest

from distill.errors import ConfigError
from distill.students.presets import PRESETS, check_memory, estimate_memory_gb, memory_plan, preset_values
from distill.students.sft import TrainConfig, load_train_config, lr_factor

# (hidden, layers, intermediate, vocab) of each preset's base model, from its published config.
SHAPES = {
    "qwen-1.5b": (1536, 28, 8960, 151936),
    "qwen-7b": (3584, 28, 18944, 152064),
    "qwen-14b": (5120, 48, 13824, 152064),
    "qwen-32b": (5120, 64, 27648, 152064),
    "llama-8b": (4096, 32, 14336, 128256),
    "llama-70b": (8192, 80, 28672, 128256),
}


def estimate(name: str, gpus: int, **plan) -> dict[str, float]:
    hidden, layers, intermediate, vocab = SHAPES[name]
    plan = {**memory_plan(name, gpus), **plan}
    tokens = plan.get("max_seq_len", PRESETS[name]["config"]["max_seq_len"])
    return estimate_memory_gb(
        PRESETS[name]["params_b"] * 1e9, gpus, lora=plan["lora"], quantize=plan["quantize"], cpu_offload=plan["cpu_offload"],
        activation_checkpointing=plan["activation_checkpointing"], tokens=tokens, hidden=hidden, layers=layers,
        intermediate=intermediate, vocab=vocab, chunk_tokens=1024,
    )  # fmt: skip


def test_presets_are_the_r1_distill_bases_with_their_recipes():
    assert set(PRESETS) == set(SHAPES)
    assert PRESETS["qwen-7b"]["model"] == "Qwen/Qwen2.5-Math-7B" and PRESETS["llama-70b"]["model"] == "meta-llama/Llama-3.3-70B-Instruct"
    seven = preset_values("qwen-7b")
    assert {k: seven[k] for k in ("lr", "min_lr_ratio", "warmup_ratio", "epochs", "global_batch", "grad_clip")} == {
        "lr": 4e-5, "min_lr_ratio": 0.1, "warmup_ratio": 0.03, "epochs": 5, "global_batch": 128, "grad_clip": 0.2,
    }  # fmt: skip
    for name, preset in PRESETS.items():
        values = preset["config"]
        assert values["max_seq_len"] == 32768 and set(values) <= {f.name for f in TrainConfig.__dataclass_fields__.values()}
        # Qwen2.5-Math ships a 4k context: only its presets raise the RoPE base.
        assert ("rope_theta" in values) == preset["model"].startswith("Qwen/Qwen2.5-Math"), name
        assert values["chat_template"] == ("chatml-think" if name.startswith("qwen") else "llama3-think")


def test_every_memory_plan_fits_an_80gb_gpu_and_full_tuning_alone_often_does_not():
    for name, preset in PRESETS.items():
        for gpus in preset["memory_plan"]:
            assert estimate(name, gpus)["total"] < 80, (name, gpus)
    assert memory_plan("qwen-7b", 1)["lora"] and not memory_plan("qwen-7b", 8)["lora"]
    assert memory_plan("qwen-7b", 6) == memory_plan("qwen-7b", 4), "a count between two entries gets the smaller one's plan"
    assert memory_plan("llama-70b", 1)["quantize"] == "4bit"
    full = estimate("qwen-7b", 1, lora=False, cpu_offload=False)
    with pytest.raises(ConfigError, match=r"not enough memory on H100: .* needs about 1\d\d\.\d GiB .*lora=true"):
        check_memory(full, 79.6, "H100", "full fine-tuning, 1 device")
    check_memory(estimate("qwen-7b", 1), 79.6, "H100", "LoRA, 1 device")  # the preset's own plan passes


def test_preset_values_are_overridden_by_recipe_then_command_line(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("# distill train --recipe r.yaml\nstudent: qwen-7b\nlr: 2.0e-5\n")
    loaded = load_train_config(recipe=recipe, flags={"data": "d.parquet", "out": tmp_path / "o"}, overrides=["epochs=2"])
    cfg, sources = loaded.config, loaded.sources
    assert (cfg.lr, cfg.epochs, cfg.global_batch, cfg.rope_theta) == (2e-5, 2, 128, 300000.0)
    assert sources["lr"] == f"recipe {recipe}" and sources["epochs"] == "command line" and sources["global_batch"] == "preset qwen-7b"
    plain = load_train_config(flags={"student": "some/model", "data": "d", "out": tmp_path / "p"}).config
    assert plain.rope_theta is None and plain.chat_template == "auto"
    with pytest.raises(ConfigError, match="quantize=4bit is QLoRA"):
        load_train_config(flags={"student": "m", "data": "d", "out": tmp_path}, overrides=["quantize=4bit"])


def test_lr_warms_up_then_decays_to_its_floor():
    factors = [lr_factor(step, 100, 3, "cosine", 0.1) for step in range(100)]
    assert factors[:3] == [0.25, 0.5, 0.75] and factors[3] == 1.0
    assert all(a >= b for a, b in zip(factors[3:], factors[4:])) and factors[-1] == pytest.approx(0.1)
    assert lr_factor(50, 100, 0, "linear", 0.0) == pytest.approx(1 - 50 / 99)
    assert lr_factor(99, 100, 0, "constant", 0.1) == 1.0


def test_host_memory_counts_one_full_copy_per_node_and_the_offloaded_states():
    from distill.students.presets import check_host_memory, estimate_host_memory_gb

    params = PRESETS["llama-70b"]["params_b"] * 1e9
    # Full fine-tuning on 8 GPUs of a node: rank 0 alone reads the fp32 weights (263 GiB), the
    # other ranks receive their shards; before, every rank loaded a copy (8 x 263 GiB = 2.1 TiB).
    full = estimate_host_memory_gb(params, 64, 8, load_bytes=4, device_states_gb=estimate("llama-70b", 64)["states"], on_gpu=True, cpu_offload=False)
    assert full["full_copy"] == pytest.approx(params * 4 / 2**30) and full["node"] == full["full_copy"] < 8 * params * 4 / 2**30 / 7
    # CPU offload on 16 GPUs: each rank's share of the 16 B/param states lives in host memory too.
    states = estimate("llama-70b", 16, cpu_offload=False)["states"]
    offload = estimate_host_memory_gb(params, 16, 8, load_bytes=4, device_states_gb=states, on_gpu=True, cpu_offload=True)
    assert offload["node"] == pytest.approx(params * 4 / 2**30 + 8 * states)
    with pytest.raises(ConfigError, match=r"not enough host memory on this node: .*one full copy of the weights \(263\.0 GiB, on rank 0\).*8 processes"):
        check_host_memory(offload, 700.0, 8)
    check_host_memory(full, 1000.0, 8)
    # One CPU process trains on the copy it loaded: not counted twice.
    assert estimate_host_memory_gb(1e6, 1, 1, load_bytes=4, device_states_gb=0.5, on_gpu=False, cpu_offload=False)["node"] == 0.5


def test_the_filter_checks_lengths_against_the_smallest_plan_of_a_preset():
    from distill.students.presets import preset_limits

    assert preset_limits("llama-70b") == (16384, "preset llama-70b's plan for 1 GPU")
    assert preset_limits("qwen-7b") == (32768, "preset qwen-7b")
