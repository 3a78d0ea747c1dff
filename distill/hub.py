"""The Hugging Face hub as a run meets it: the true cause of a model that cannot be had, and the fix.

A model named by hub id (a student preset's base, a teacher) is read from the local cache or
downloaded. When that fails, transformers says "We couldn't connect to 'https://huggingface.co'"
for every cause alike; the exception it chains says which one it was:

    LocalEntryNotFoundError   not in the cache, and the hub could not be reached (offline mode,
                              no network): download it first, or pass a local directory
    GatedRepoError            a gated repository (the Llama bases): a token with access is needed
    RepositoryNotFoundError   no such repository (or a private one the token cannot see)

`model_error` turns each into one line; `distill train` / `distill grpo` use it when resolving a
student, and `distill doctor` reports the token and the gated presets' access with the helpers
below. Nothing here imports huggingface_hub at module load (distill --help stays fast).
"""

from __future__ import annotations

import functools
import os
from pathlib import Path

from distill.errors import InputError

OFFLINE_VARIABLES = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
TOKEN_VARIABLES = ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN")


def offline_variable() -> str | None:
    """The environment variable that switches the hub off (HF_HUB_OFFLINE=1), if one does."""
    for name in OFFLINE_VARIABLES:
        if os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on"):
            return name
    return None


def token_source() -> str | None:
    """Where a hub token comes from (an environment variable or the token file), never the token."""
    for name in TOKEN_VARIABLES:
        if os.environ.get(name, "").strip():
            return name
    path = token_file()
    return str(path) if path is not None and path.is_file() and path.read_text(encoding="utf-8").strip() else None


def token_file() -> Path | None:
    try:
        from huggingface_hub import constants
    except ImportError:
        return None
    return Path(constants.HF_TOKEN_PATH)


def cache_dir() -> str:
    try:
        from huggingface_hub import constants

        return str(constants.HF_HUB_CACHE)
    except ImportError:
        return "~/.cache/huggingface/hub"


def model_error(model_id: str, error: BaseException, what: str, gated: bool = False) -> InputError:
    """One line for a model `what` (e.g. "student 'qwen-7b' (Qwen/Qwen2.5-Math-7B)") that could
    not be loaded from `model_id`: the cause found in the exception chain, and its fix. `gated`:
    the repository is known to be gated (the Llama presets), so the download needs a token too."""
    from huggingface_hub import errors

    chain = _chain(error)
    if any(isinstance(e, errors.GatedRepoError) for e in chain):
        token = f"the token from {token_source()} has no access" if token_source() else "no hub token is set"
        return InputError(
            f"{what}: {model_id} is a gated repository and {token}; accept its licence at https://huggingface.co/{model_id} "
            "and set HF_TOKEN (or run `hf auth login`) with that account, or pass a local model directory"
        )
    if any(isinstance(e, errors.RepositoryNotFoundError) for e in chain):
        return InputError(
            f"{what}: the hub has no model {model_id} (or it is private and {'the token cannot see it' if token_source() else 'no hub token is set'}); "
            "check the name, or pass a local model directory"
        )
    if any(isinstance(e, (errors.LocalEntryNotFoundError, errors.OfflineModeIsEnabled)) for e in chain):
        switched_off = offline_variable()
        why = f"{switched_off}=1 is set" if switched_off else "the hub could not be reached"
        fixes = f"unset {switched_off} where the hub is reachable, " if switched_off else ""
        token = f" with a token that has access (a gated repository: accept its licence at https://huggingface.co/{model_id})" if gated else ""
        return InputError(
            f"{what}: {model_id} is not in the local Hugging Face cache ({cache_dir()}) and {why}; download it first "
            f"(`hf download {model_id}` on a machine with access{token}, then copy the cache or set HF_HOME), {fixes}"
            "or pass a local model directory"
        )
    reason = str(error).splitlines()[0][:200] if str(error) else type(error).__name__
    return InputError(f"{what}: could not load {model_id} ({reason}); pass a local model directory or a hub id of a transformers model")


def _chain(error: BaseException | None) -> list[BaseException]:
    seen: list[BaseException] = []
    while error is not None and error not in seen:
        seen.append(error)
        error = error.__cause__ or error.__context__
    return seen


def gated_access(model_id: str, timeout_s: float = 5.0) -> str:
    """Whether this machine's token may download a gated `model_id`, as one phrase: 'access
    granted', 'no access: ...', or why it cannot be checked (offline, hub unreachable)."""
    switched_off = offline_variable()
    if switched_off:
        return f"cannot be checked: {switched_off}=1 (offline)"
    try:
        from huggingface_hub import auth_check, constants, errors
    except ImportError:
        return "cannot be checked: huggingface_hub is not installed"
    if not _reachable(constants.ENDPOINT, timeout_s):
        return f"cannot be checked: {constants.ENDPOINT} is unreachable from this machine"
    try:
        auth_check(model_id)
    except errors.GatedRepoError:
        return f"no access: accept the licence at https://huggingface.co/{model_id}" + ("" if token_source() else " and set HF_TOKEN")
    except errors.RepositoryNotFoundError:
        return "no such repository (or not visible to this token)"
    except Exception as error:  # network trouble mid-check: say so, never fail doctor
        return f"cannot be checked: {type(error).__name__}"
    return "access granted"


@functools.lru_cache(maxsize=None)
def _reachable(endpoint: str, timeout_s: float) -> bool:
    """One quick request to the hub (no retries): the hub's own client backs off for ~25 s."""
    import httpx

    try:
        httpx.head(endpoint, timeout=timeout_s, follow_redirects=False)
    except Exception:  # DNS failure, refused, timed out, proxy: all mean "not reachable from here"
        return False
    return True
