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

import json
import logging
import math
import os
import sys
import time
from pathlib import Path
from typing import Any, Mapping, Sequence

import yaml

from distill.config import save_config, to_dict
from distill.errors import ConfigError

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
        self.path.mkdir(parents=True, exist_ok=True)
        config_path = self.path / CONFIG_FILE
        self.resumed = config_path.exists()
        if self.resumed and locked:
            check_locked(config_path, to_dict(config), locked)
        save_config(config, config_path, sources)
        self.log = _file_logger(stage, self.path / f"{stage}.log")
        self.started = time.time()
        self.warnings: list[dict[str, Any]] = []  # drop_warning's, written into metrics.json

    def say(self, message: str) -> None:
        """Tell the user (stderr, so stdout stays clean for results) and keep it in the log."""
        print(message, file=sys.stderr, flush=True)
        self.log.info(message)

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


def check_locked(config_path: Path, new: Mapping[str, Any], locked: Sequence[str]) -> None:
    old = yaml.safe_load(config_path.read_text(encoding="utf-8")) or {}
    changed = []
    for key in locked:
        before, after = _get(old, key), _get(new, key)
        if before != after:
            changed.append(f"{key}: {before!r} -> {after!r}")
    if changed:
        raise ConfigError(
            f"{config_path.parent}: this run directory was made with other settings ({'; '.join(changed)}); "
            "use a new --out directory, or the original settings to resume"
        )


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
