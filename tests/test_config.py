"""Recipes and overrides: typed, frozen, every bad key or value named with its file."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Literal, Optional

import pytest
import yaml

from distill.config import load_config, non_default, save_config
from distill.errors import ConfigError


@dataclasses.dataclass(frozen=True)
class Inner:
    temperature: float = 0.6
    stop: tuple[str, ...] = ()


@dataclasses.dataclass(frozen=True)
class Example:
    model: str
    n: int = 4
    engine: Literal["hf", "vllm", "openai"] = "hf"
    limit: Optional[int] = None
    lora: bool = False
    out: Path = Path("runs/x")
    sampling: Inner = Inner()


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "recipe.yaml"
    path.write_text(text)
    return path


def test_layers_and_sources(tmp_path):
    recipe = write(tmp_path, "# distill x --recipe r.yaml\nn: 8\nsampling:\n  temperature: 1.0\n")
    loaded = load_config(
        Example,
        preset={"model": "qwen", "n": 2},
        preset_name="qwen-7b",
        recipe=recipe,
        flags={"engine": "vllm", "limit": None},
        overrides=["sampling.stop=</s>,<|im_end|>", "lora=true", "limit=10"],
    )
    cfg = loaded.config
    assert cfg == Example(model="qwen", n=8, engine="vllm", limit=10, lora=True,
                          sampling=Inner(temperature=1.0, stop=("</s>", "<|im_end|>")))
    assert loaded.sources["model"] == "preset qwen-7b"
    assert loaded.sources["n"] == f"recipe {recipe}"
    assert loaded.sources["engine"] == "command line"
    assert loaded.sources["out"] == "default"
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.n = 3  # type: ignore[misc]
    # what a run prints about its settings: the values off their defaults, grouped by origin
    assert non_default(cfg) == {"model": "qwen", "n": 8, "engine": "vllm", "limit": 10, "lora": True,
                                "sampling.temperature": 1.0, "sampling.stop": ("</s>", "<|im_end|>")}
    from distill.rundir import settings_lines

    lines = settings_lines(cfg, loaded.sources, shown=("model",))
    assert lines == [f"  recipe {recipe}: n=8 sampling.temperature=1.0", "  command line: engine=vllm limit=10 lora=true sampling.stop=[</s>,<|im_end|>]"]
    assert settings_lines(Example(model="m"), {}, shown=("model",)) == ["  settings: all at their defaults"]


def test_unknown_key_names_file_and_suggests(tmp_path):
    recipe = write(tmp_path, "model: m\nsampling:\n  temprature: 0.7\n")
    with pytest.raises(ConfigError, match=r"recipe\.yaml: unknown key 'sampling\.temprature' \(did you mean 'temperature'\?\)"):
        load_config(Example, recipe=recipe)


def test_wrong_type_in_recipe_and_override(tmp_path):
    recipe = write(tmp_path, "model: m\nn: four\n")
    with pytest.raises(ConfigError, match=r"recipe\.yaml: key 'n' expects int, got 'four'"):
        load_config(Example, recipe=recipe)
    with pytest.raises(ConfigError, match=r"command line: key 'engine' expects one of 'hf', 'vllm', 'openai', got 'tpu'"):
        load_config(Example, flags={"model": "m"}, overrides=["engine=tpu"])
    with pytest.raises(ConfigError, match=r"key 'lora' expects bool"):
        load_config(Example, flags={"model": "m"}, overrides=["lora=maybe"])
    with pytest.raises(ConfigError, match="not key=value"):
        load_config(Example, flags={"model": "m"}, overrides=["lora"])


def test_missing_required_names_flag():
    with pytest.raises(ConfigError, match=r"missing required value 'model': pass --model"):
        load_config(Example)


def test_bad_yaml_and_missing_recipe(tmp_path):
    with pytest.raises(ConfigError, match=r"recipe\.yaml:\d+: not valid YAML"):
        load_config(Example, recipe=write(tmp_path, "model: m\nn: [1,\n"))
    with pytest.raises(ConfigError, match="recipe not found"):
        load_config(Example, recipe=tmp_path / "nope.yaml")


def test_resolved_config_round_trips(tmp_path):
    loaded = load_config(Example, flags={"model": "m"}, overrides=["n=3"])
    save_config(loaded.config, tmp_path / "config.yaml", loaded.sources)
    text = (tmp_path / "config.yaml").read_text()
    assert "#   n: command line" in text
    again = load_config(Example, recipe=tmp_path / "config.yaml")
    assert again.config == loaded.config
    assert yaml.safe_load(text)["sampling"]["temperature"] == 0.6
