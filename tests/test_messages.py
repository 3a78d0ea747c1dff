"""What a user reads: one test per message (the command, the one line it prints, the exit code),
the startup lines of a run, and no run directory left by a run refused before it started.

The hub is off in the test bed (conftest sets HF_HUB_OFFLINE=1), so a preset's base model is
"not in the cache, and the hub switched off": the message must say that, not that the preset is
unknown. Gated, missing and unreachable repositories are stand-ins here: the real hub exception
classes, built by hand (no network), given to the one function that words the message.
"""

from __future__ import annotations

import json
import string
from pathlib import Path

import pytest

from distill import hub


def error_lines(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith("error:")]


def one_error(code: int, err: str, expected_code: int = 2) -> str:
    """The single error line of a refused command (no traceback), without its 'error: ' prefix."""
    assert code == expected_code, err
    assert "Traceback" not in err
    lines = error_lines(err)
    assert len(lines) == 1, err
    return lines[0].removeprefix("error: ")


@pytest.fixture(scope="module")
def conversations(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("data") / "train.jsonl"
    rows = [{"messages": [{"role": "user", "content": f"What is {i}+1?"},
                          {"role": "assistant", "content": f"<think>\n{i}+1={i + 1}\n</think>\n\n\\boxed{{{i + 1}}}"}]} for i in range(8)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def problems(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("problems") / "problems.jsonl"
    path.write_text("".join(json.dumps({"id": f"p{i}", "problem": f"{i}+1", "answer": str(i + 1)}) + "\n" for i in range(4)))
    return path


@pytest.fixture(scope="module")
def char_student(tmp_path_factory) -> Path:
    """A tiny Qwen2 with a character tokenizer: a step takes milliseconds."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from distill.chartok import build_char_tokenizer

    out = tmp_path_factory.mktemp("student")
    tokenizer = build_char_tokenizer(string.printable)
    torch.manual_seed(0)
    Qwen2ForCausalLM(Qwen2Config(
        vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1, max_position_embeddings=256, tie_word_embeddings=True,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )).save_pretrained(out)  # fmt: skip
    tokenizer.save_pretrained(out)
    return out


# --------------------------------------------------------------------------------------------
# refused before anything is loaded: the true cause, cheapest check first, no run directory


def test_missing_data_file_is_reported_before_the_unreachable_hub(run_cli, tmp_path):
    # the case: a preset whose model is not cached, with no hub, and a data file that is not there
    out = tmp_path / "X"
    code, _, err = run_cli("train", "--student", "qwen-7b", "--data", "/nonexistent.parquet", "--out", str(out))
    assert one_error(code, err) == (
        "/nonexistent.parquet: data not found; pass a Parquet/JSONL file, a `distill filter` run directory, or a hub dataset name"
    )
    assert not out.exists(), "a refused run leaves no run directory"


def test_preset_not_cached_with_the_hub_off_says_so_and_how_to_fix_it(run_cli, conversations, tmp_path):
    out = tmp_path / "runs" / "X"
    code, _, err = run_cli("train", "--student", "qwen-7b", "--data", str(conversations), "--out", str(out))
    line = one_error(code, err)
    assert line.startswith("student 'qwen-7b' (preset: Qwen/Qwen2.5-Math-7B): Qwen/Qwen2.5-Math-7B is not in the local Hugging Face cache")
    assert "HF_HUB_OFFLINE=1 is set" in line and "`hf download Qwen/Qwen2.5-Math-7B`" in line
    assert "unset HF_HUB_OFFLINE" in line and "or pass a local model directory" in line
    assert "not a preset" not in line
    assert not (tmp_path / "runs").exists(), "the directories the refused run made are gone"


def test_gated_preset_not_cached_mentions_the_licence_and_token(run_cli, conversations, tmp_path):
    code, _, err = run_cli("train", "--student", "llama-8b", "--data", str(conversations), "--out", str(tmp_path / "X"))
    line = one_error(code, err)
    assert "meta-llama/Llama-3.1-8B is not in the local Hugging Face cache" in line
    assert "with a token that has access (a gated repository: accept its licence at https://huggingface.co/meta-llama/Llama-3.1-8B)" in line
    assert not (tmp_path / "X").exists()


def test_unknown_student_name_suggests_the_preset_without_asking_the_hub(run_cli, conversations, tmp_path):
    code, _, err = run_cli("train", "--student", "qwen-9b", "--data", str(conversations), "--out", str(tmp_path / "X"))
    assert one_error(code, err) == (
        "student 'qwen-9b' is not a preset (qwen-1.5b, qwen-7b, qwen-14b, qwen-32b, llama-8b, llama-70b) (did you mean 'qwen-7b'?), "
        "an existing model directory, or a hub id (org/name)"
    )
    assert "distill train:" not in err, "refused before the run started: nothing announced"
    assert not (tmp_path / "X").exists()


def test_grpo_refusals_name_the_cause_and_leave_no_run_directory(run_cli, problems, tmp_path):
    code, _, err = run_cli("grpo", "--student", "qwen-7b", "--data", str(tmp_path / "missing.jsonl"), "--out", str(tmp_path / "A"))
    assert one_error(code, err) == f"{tmp_path / 'missing.jsonl'}: file not found"
    assert not (tmp_path / "A").exists()
    code, _, err = run_cli("grpo", "--student", "qwen-1.5b", "--data", str(problems), "--out", str(tmp_path / "B"))
    line = one_error(code, err)
    assert line.startswith("student 'qwen-1.5b' (preset: Qwen/Qwen2.5-Math-1.5B): Qwen/Qwen2.5-Math-1.5B is not in the local Hugging Face cache")
    assert not (tmp_path / "B").exists()


def test_a_refused_resume_keeps_the_existing_run_directory(run_cli, char_student, conversations, tmp_path):
    out = tmp_path / "run"
    args = ["train", "--student", str(char_student), "--data", str(conversations), "--out", str(out), "max_steps=1", "global_batch=4"]
    code, _, err = run_cli(*args)
    assert code == 0, err
    code, _, err = run_cli(*args, "lr=1e-3")
    assert "this run directory was made with other settings (lr: 4e-05 -> 0.001)" in one_error(code, err)
    assert (out / "model" / "config.json").is_file(), "the finished run is untouched"


# --------------------------------------------------------------------------------------------
# the hub's other failures, worded by distill.hub.model_error (stand-in exceptions, no network)


def _response(status: int):
    import httpx

    return httpx.Response(status, request=httpx.Request("GET", "https://huggingface.co/api/models/x"))


def _raised_by_transformers(cause: BaseException) -> OSError:
    """What AutoConfig.from_pretrained raises: an OSError chained to the hub's exception."""
    try:
        raise OSError("We couldn't connect to 'https://huggingface.co' to load the files") from cause
    except OSError as error:
        return error


def test_gated_repository_without_token(monkeypatch):
    from huggingface_hub.errors import GatedRepoError

    for name in hub.TOKEN_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(hub, "token_file", lambda: None)
    error = hub.model_error("meta-llama/Llama-3.1-8B", _raised_by_transformers(GatedRepoError("403", response=_response(403))), "student 'llama-8b'")
    assert str(error) == (
        "student 'llama-8b': meta-llama/Llama-3.1-8B is a gated repository and no hub token is set; accept its licence at "
        "https://huggingface.co/meta-llama/Llama-3.1-8B and set HF_TOKEN (or run `hf auth login`) with that account, "
        "or pass a local model directory"
    )
    assert error.exit_code == 2
    monkeypatch.setenv("HF_TOKEN", "hf_secret_value")
    error = hub.model_error("meta-llama/Llama-3.1-8B", _raised_by_transformers(GatedRepoError("403", response=_response(403))), "student 'llama-8b'")
    assert "the token from HF_TOKEN has no access" in str(error) and "hf_secret_value" not in str(error)


def test_no_such_repository_and_unreachable_hub(monkeypatch):
    from huggingface_hub.errors import LocalEntryNotFoundError, RepositoryNotFoundError

    error = hub.model_error("nobody/none", _raised_by_transformers(RepositoryNotFoundError("404", response=_response(404))), "student 'nobody/none'")
    assert str(error).startswith("student 'nobody/none': the hub has no model nobody/none (or it is private")
    for name in hub.OFFLINE_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    error = hub.model_error("Qwen/Qwen2.5-Math-7B", _raised_by_transformers(LocalEntryNotFoundError("no connection")), "student 'qwen-7b'")
    assert "is not in the local Hugging Face cache" in str(error) and "and the hub could not be reached; download it first" in str(error)
    assert "unset" not in str(error), "nothing to unset when offline mode is not on"


# --------------------------------------------------------------------------------------------
# distill doctor: the token (never its value) and the gated presets' access


def test_doctor_offline_says_access_cannot_be_checked(run_cli, monkeypatch):
    for name in hub.TOKEN_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(hub, "token_file", lambda: None)
    code, out, _ = run_cli("doctor")
    assert code == 0
    assert "HF token      not set: the gated presets (llama-8b, llama-70b) need one: `hf auth login` or HF_TOKEN" in out
    assert "  llama-8b    meta-llama/Llama-3.1-8B (gated): cannot be checked: HF_HUB_OFFLINE=1 (offline)" in out
    monkeypatch.setenv("HF_TOKEN", "hf_secret_value")
    code, out, _ = run_cli("doctor")
    assert "HF token      set (from HF_TOKEN)" in out and "hf_secret_value" not in out


def test_doctor_online_reports_access_per_gated_preset(run_cli, monkeypatch):
    # stand-ins for the network: the hub answers, and refuses one gated repository
    import huggingface_hub
    from huggingface_hub.errors import GatedRepoError

    for name in hub.OFFLINE_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HF_TOKEN", "hf_x")
    monkeypatch.setattr(hub, "_reachable", lambda endpoint, timeout_s: True)

    def auth_check(repo_id, **_):
        if "70B" in repo_id:
            raise GatedRepoError("403", response=_response(403))

    monkeypatch.setattr(huggingface_hub, "auth_check", auth_check)
    code, out, _ = run_cli("doctor")
    assert code == 0
    assert "  llama-8b    meta-llama/Llama-3.1-8B (gated): access granted" in out
    assert "  llama-70b   meta-llama/Llama-3.3-70B-Instruct (gated): no access: accept the licence at https://huggingface.co/meta-llama/Llama-3.3-70B-Instruct" in out
    monkeypatch.setattr(hub, "_reachable", lambda endpoint, timeout_s: False)
    code, out, _ = run_cli("doctor")
    assert "(gated): cannot be checked: https://huggingface.co is unreachable from this machine" in out


# --------------------------------------------------------------------------------------------
# what a run prints first: what runs, on what, the settings off their defaults; not the config


def test_train_announces_what_runs_and_only_the_non_default_settings(run_cli, char_student, conversations, tmp_path):
    out = tmp_path / "run"
    code, stdout, err = run_cli("train", "--student", str(char_student), "--data", str(conversations), "--out", str(out),
                                "max_steps=2", "global_batch=4", "lr=1e-3")
    assert code == 0, err
    lines = err.splitlines()
    assert lines[0] == f"distill train: {char_student} on {conversations} -> {out}, 1 process on cpu"
    assert lines[1] == "  command line: max_steps=2 global_batch=4 lr=0.001"
    assert lines[2] == f"  every setting, defaults included: {out / 'config.yaml'}"
    assert "adam_beta1" not in err, "defaults are in config.yaml, not on the terminal"
    assert "adam_beta1: 0.9" in (out / "config.yaml").read_text()
    done = [line for line in lines if line.startswith("done: ")]
    assert len(done) == 1 and done[0].startswith("done: 2 steps, loss ") and f"model in {out / 'model'}" in done[0]
    assert stdout.strip() == str(out / "model")


def test_grpo_announces_what_runs_and_its_result(run_cli, capsys, tmp_path):
    from test_grpo import build_task

    model_dir, problems = build_task(tmp_path)
    capsys.readouterr()  # what saving the task's model printed
    out = tmp_path / "run"
    code, stdout, err = run_cli("grpo", "--student", str(model_dir), "--data", str(problems), "--out", str(out), "instruction=null",
                                "group_size=4", "prompts_per_step=2", "max_tokens=2", "steps=1", "micro_batch_size=8")
    assert code == 0, err
    lines = err.splitlines()
    assert lines[0] == f"distill grpo: {model_dir} on {problems} -> {out}, 1 process on cpu"
    assert lines[1] == "  command line: group_size=4 prompts_per_step=2 max_tokens=2 instruction=null steps=1 micro_batch_size=8"
    assert lines[2] == f"  every setting, defaults included: {out / 'config.yaml'}"
    assert "adam_beta1" not in err and "verifier_timeout_s" not in err
    done = [line for line in lines if line.startswith("done: ")]
    assert len(done) == 1 and done[0].startswith("done: 1 steps, mean reward ") and f"model in {out / 'model'}" in done[0]
    assert stdout.strip() == str(out / "model")
