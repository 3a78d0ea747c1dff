"""Run directories: every stage writes into one directory with the same files.

    RUN_DIR/
      config.yaml      the resolved config (and where each non-default value came from)
      metrics.jsonl    one JSON object per step or batch, appended and flushed as it happens
      metrics.json     the final figures, written atomically at the end
      <stage>.log      the run's log
      ...              the stage's own outputs

Later stages and `distill compare` read these files; no stage reaches into another's code.
Reopening a run directory (to resume) checks that the settings that define its outputs have
not changed: mixing two teachers or two sampling settings in one directory is refused.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import shutil
import sys
import textwrap
import time
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import yaml

from distill.config import non_default, save_config, to_dict
from distill.errors import ConfigError, DistillError

CONFIG_FILE = "config.yaml"
METRICS_LOG = "metrics.jsonl"
METRICS_FILE = "metrics.json"
DROP_WARNING_FRACTION = 0.01  # dropping more of a stage's input than this, unasked, is warned about


class RunDir:
    def __init__(
        self,
        path: str | Path,
        stage: str,
        config: Any,
        sources: Mapping[str, str] | None = None,
        locked: Sequence[str] = (),
    ):
        """Create or reopen `path` for `stage`. `locked` are dotted config keys that must equal
        those of an existing config.yaml (the run is being resumed), else ConfigError."""
        self.path = Path(path)
        self.stage = stage
        self.config = config
        self.sources = dict(sources or {})
        self.path.mkdir(parents=True, exist_ok=True)
        config_path = self.path / CONFIG_FILE
        self.resumed = config_path.exists()
        if self.resumed and locked:
            check_locked(config_path, to_dict(config), locked, field_defaults(config))
        save_config(config, config_path, sources)
        self.log = _file_logger(stage, self.path / f"{stage}.log")
        self.started = time.time()
        self.warnings: list[dict[str, Any]] = []  # drop_warning's, written into metrics.json

    def say(self, message: str) -> None:
        """Tell the user (stderr, so stdout stays clean for results) and keep it in the log."""
        print(message, file=sys.stderr, flush=True)
        self.log.info(message)

    def announce(self, headline: str, shown: Sequence[str] = ()) -> None:
        """A run's first lines, the same for every stage: `headline` (what runs, on what, where
        to), then the settings not at their default grouped by where they came from (keys in
        `shown` are in the headline already); the whole resolved config is in config.yaml."""
        self.say(headline)
        for line in settings_lines(self.config, self.sources, shown):
            self.say(line)
        self.say(f"  every setting, defaults included: {self.path / CONFIG_FILE}")

    def mark_resume(self, step: int) -> None:
        """Note in metrics.jsonl that the run resumed from its checkpoint at `step`. The lines
        logged after that checkpoint stay (what happened is not erased); the steps redone after
        the mark are logged again and readers count each step by its last record (step_rows)."""
        self.log_metrics({"event": "resume", "step": step})

    def warn_dropped(self, reason: str, count: int, total: int, what: str, fix: str) -> bool:
        """Say a warning line when more than DROP_WARNING_FRACTION of a stage's input is dropped or
        rejected for a reason the user may not expect (too long, malformed, skipped), naming the
        count and the setting to change; keep it for metrics.json ("warnings"). True if it warned."""
        if total <= 0 or count / total <= DROP_WARNING_FRACTION:
            return False
        message = f"warning: {what}: {count:,} of {total:,} ({count / total:.1%}); {fix}"
        print(message, file=sys.stderr, flush=True)
        self.log.warning(message)
        self.warnings.append({"reason": reason, "count": count, "total": total, "fraction": round(count / total, 6), "message": message})
        return True

    def file(self, name: str) -> Path:
        return self.path / name

    def log_metrics(self, record: Mapping[str, Any]) -> None:
        """Append one step's figures to metrics.jsonl (flushed: a crash keeps every step logged)."""
        line = json.dumps({"time": round(time.time(), 3), **_jsonable(record)}, ensure_ascii=False)
        with (self.path / METRICS_LOG).open("a", encoding="utf-8") as handle:
            handle.write(line + "\n")

    def step_rows(self) -> list[dict[str, Any]]:
        """The logged step records (rows with a "step"), one per step: a step logged again after a
        resume (grpo replays from its last checkpoint) counts once, by its last record."""
        return step_rows(self.path)

    def step_total(self, key: str) -> float:
        """The sum of `key` over the logged steps (see step_rows), e.g. the tokens a run trained on."""
        return sum(row.get(key, 0) for row in self.step_rows())

    def write_metrics(self, metrics: Mapping[str, Any]) -> Path:
        """Write the final metrics.json atomically, with the stage name and wall time added."""
        data = {"stage": self.stage, "wall_time_s": round(time.time() - self.started, 3), **_jsonable(metrics)}
        if self.warnings:
            data["warnings"] = _jsonable(self.warnings)
        return write_json(self.path / METRICS_FILE, data)


def settings_lines(config: Any, sources: Mapping[str, str] | None, shown: Sequence[str] = (), width: int = 110) -> list[str]:
    """'  <origin>: key=value key=value ...' lines for the settings not at their default, one
    group per origin (preset, recipe, command line); without sources, one group."""
    groups: dict[str, list[str]] = {}
    for key, value in non_default(config).items():
        if key in shown:
            continue
        origin = (sources or {}).get(key) or "set"
        groups.setdefault("set" if origin == "default" else origin, []).append(f"{key}={_show(value)}")
    if not groups:
        return ["  settings: all at their defaults"]
    lines = []
    for origin, items in groups.items():
        label = "settings" if origin == "set" else origin
        lines += textwrap.wrap(" ".join(items), width, initial_indent=f"  {label}: ", subsequent_indent="      ", break_long_words=False)
    return lines


def _show(value: Any) -> str:
    """A setting as one would type it after key= (long texts shortened)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(_show(v) for v in value) + "]"
    if isinstance(value, Mapping):
        return "{" + ",".join(f"{k}:{_show(v)}" for k, v in value.items()) + "}"
    text = str(value)
    if text == "" or any(c.isspace() for c in text):
        text = json.dumps(text, ensure_ascii=False)
    return text if len(text) <= 48 else text[:45] + "..."


@contextlib.contextmanager
def removed_if_refused(path: str | Path | None) -> Iterator[None]:
    """A run refused before it produced anything (a DistillError: bad input, unreachable model,
    not enough memory) leaves no directory behind: the directories this call made are removed
    when they hold nothing but config.yaml (and eval's protocol.json), logs, empty files and
    folders. A directory that existed before (a run being resumed) is never touched."""
    if path is None:
        yield
        return
    path = Path(path)
    made = path
    while not made.parent.exists() and made.parent != made:
        made = made.parent  # the topmost directory that does not exist yet
    fresh = not path.exists()
    try:
        yield
    except DistillError:
        if fresh and made.is_dir() and _holds_no_output(made):
            _close_logs(made)
            shutil.rmtree(made, ignore_errors=True)
        raise


# Files that say what a run will do, not what it did (eval's protocol.json is written up front),
# and caches a run rebuilds (train's tokenized data, written before the data is found empty).
_DESCRIPTIONS = (CONFIG_FILE, "protocol.json")
_CACHES = ("tokenized",)


def _holds_no_output(directory: Path) -> bool:
    """Nothing in `directory` but descriptions, logs, empty files and folders."""
    for item in directory.rglob("*"):
        if set(item.relative_to(directory).parts) & set(_CACHES):
            continue
        if item.is_file() and item.stat().st_size and item.name.removesuffix(".tmp") not in _DESCRIPTIONS and item.suffix != ".log":
            return False
    return True


def _close_logs(directory: Path) -> None:
    """Close the run logs kept open under `directory`: a later run in this process that makes
    the same directory again must open a fresh file, not write into a deleted one."""
    root = str(directory.resolve())
    for logger in list(logging.Logger.manager.loggerDict.values()):
        for handler in list(getattr(logger, "handlers", ())):
            if isinstance(handler, logging.FileHandler) and handler.baseFilename.startswith(root + os.sep):
                handler.close()
                logger.removeHandler(handler)


def write_json(path: Path, data: Any) -> Path:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(_jsonable(data), indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    tmp.replace(path)
    return path


def step_rows(run_dir: str | Path) -> list[dict[str, Any]]:
    """See RunDir.step_rows; for a run directory on disk."""
    path = Path(run_dir) / METRICS_LOG
    if not path.is_file():
        return []
    last: dict[int, dict[str, Any]] = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:  # a line torn by a crash mid-write
            continue
        if isinstance(row, dict) and isinstance(row.get("step"), int) and "event" not in row:
            last[row["step"]] = row
    return [last[step] for step in sorted(last)]


def read_metrics(run_dir: str | Path) -> dict[str, Any]:
    path = Path(run_dir) / METRICS_FILE
    if not path.is_file():
        raise ConfigError(f"{path}: not found; is {run_dir} a finished distill run directory?")
    return json.loads(path.read_text(encoding="utf-8"))


def read_config(run_dir: str | Path) -> dict[str, Any]:
    path = Path(run_dir) / CONFIG_FILE
    if not path.is_file():
        raise ConfigError(f"{path}: not found; is {run_dir} a distill run directory?")
    return yaml.safe_load(path.read_text(encoding="utf-8")) or {}


def check_locked(config_path: Path, new: Mapping[str, Any], locked: Sequence[str], defaults: Mapping[str, Any] | None = None) -> None:
    """Refuse a change of any `locked` key against config.yaml. A top-level key the saved config
    lacks (a setting newer than the run directory) counts as its default from `defaults`."""
    old = yaml.safe_load(config_path.read_text(encoding="utf-8")) or {}
    changed = []
    for key in locked:
        before, after = _get(old, key), _get(new, key)
        if defaults is not None and key in defaults and key not in old:
            before = defaults[key]
        if before != after:
            changed.append(f"{key}: {before!r} -> {after!r}")
    if changed:
        raise ConfigError(
            f"{config_path.parent}: this run directory was made with other settings ({'; '.join(changed)}); "
            "use a new --out directory, or the original settings to resume"
        )


def field_defaults(config: Any) -> dict[str, Any]:
    """The plain defaults of a config dataclass's top-level fields."""
    import dataclasses

    return {f.name: f.default for f in dataclasses.fields(config) if f.default is not dataclasses.MISSING}


def _get(data: Mapping[str, Any], dotted: str) -> Any:
    node: Any = data
    for part in dotted.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return None
        node = node[part]
    return node


def _jsonable(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None  # JSON has no NaN/inf; readers treat null as "not measured"
    if isinstance(value, Path):
        return str(value)
    if hasattr(value, "item") and callable(value.item):  # numpy / torch scalars
        return _jsonable(value.item())
    return value


def _file_logger(stage: str, path: Path) -> logging.Logger:
    logger = logging.getLogger(f"distill.{stage}.{os.getpid()}.{path}")
    logger.setLevel(logging.INFO)
    logger.propagate = False
    if not logger.handlers:
        handler = logging.FileHandler(path, encoding="utf-8")
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
        logger.addHandler(handler)
    return logger
