"""Rebuild tests/data/peer_cases.jsonl from the peers' own test files (run by hand, offline).

    python tests/data/harvest_peer_cases.py MATH_VERIFY_GIT NEMO_SKILLS_GIT LIGHTEVAL_GIT

Each argument is a bare git directory of the peer's repository (as the `fetch` tool leaves it,
e.g. /work/.mirror/huggingface+Math-Verify/repo); the files are read at HEAD with `git show`.
The parametrized cases are read from the test files' syntax trees (nothing of the peers is
imported), with the options each test passes to its grader: `match_types` (math-verify's
extraction targets), `precision`, `strict`, `allow_set_relation_comp`, `language`.

Kept: every (gold, prediction, label) case of a math grader. Left out: multiple-choice letter
tests (`NativeLetters`, answer indices: not what a math verifier grades), tests that call
sympy or `parse` directly with no label, and lighteval cases that repeat a Math-Verify case
with the same options (lighteval's suite is where Math-Verify's began).
"""

from __future__ import annotations

import ast
import json
import math
import subprocess
import sys
from pathlib import Path

OUT = Path(__file__).with_name("peer_cases.jsonl")

# (repository, its git dir argument index, path, license)
SOURCES = [
    ("huggingface/Math-Verify", 0, "tests/test_all.py", "Apache-2.0"),
    ("huggingface/Math-Verify", 0, "tests/test_boxed.py", "Apache-2.0"),
    ("huggingface/Math-Verify", 0, "tests/test_numina_cases.py", "Apache-2.0"),
    ("huggingface/Math-Verify", 0, "tests/test_open_thoughts.py", "Apache-2.0"),
    ("huggingface/Math-Verify", 0, "tests/test_strict.py", "Apache-2.0"),
    ("huggingface/Math-Verify", 0, "tests/test_yujianll.py", "Apache-2.0"),
    ("NVIDIA/NeMo-Skills", 1, "tests/test_math_equal.py", "Apache-2.0"),
    ("huggingface/lighteval", 2, "tests/unit/metrics/test_extractive_match.py", "MIT"),
]

# The grader helpers' positional parameters, to read each test's call.
SIGNATURES = {
    "huggingface/Math-Verify": ["gold", "pred", "match_types", "precision", "strict", "allow_set_relation_comp"],
    "huggingface/lighteval": ["gold", "pred", "language", "match_types", "precision"],
}
DEFAULTS = {"match_types": ["latex", "expr"], "precision": 6, "strict": True, "allow_set_relation_comp": False, "language": "english"}


class _Language:
    """Stands in for lighteval's Language enum: `Language.FRENCH` -> "fr"-like names."""

    def __getattr__(self, name: str) -> str:
        return name.lower()


def _show(git_dir: str, path: str) -> str:
    return subprocess.run(["git", "--git-dir", git_dir, "show", f"HEAD:{path}"], check=True, capture_output=True, text=True).stdout


def _commit(git_dir: str) -> str:
    return subprocess.run(["git", "--git-dir", git_dir, "rev-parse", "HEAD"], check=True, capture_output=True, text=True).stdout.strip()


def _cases(repo: str, path: str, source: str):
    tree = ast.parse(source)
    namespace = {"math": math, "Language": _Language()}
    for function in tree.body:
        if not isinstance(function, ast.FunctionDef):
            continue
        marks = [d for d in function.decorator_list if isinstance(d, ast.Call) and ast.unparse(d.func).endswith("parametrize")]
        if not marks:
            continue
        names = [n.strip() for n in ast.literal_eval(marks[0].args[0]).split(",")]
        rows = eval(compile(ast.Expression(marks[0].args[1]), path, "eval"), namespace)  # the peer's own literals
        body = ast.unparse(function)
        if "NativeLetters" in body or "StringExtractionConfig" in body:
            continue  # multiple-choice letters: not a math verifier's job
        for row in rows:
            values = dict(zip(names, row if len(names) > 1 else (row,)))
            yield from _from_call(repo, path, function, values)


def _from_call(repo: str, path: str, function: ast.FunctionDef, values: dict):
    base = {"source": f"{repo}/{path}::{function.name}", **DEFAULTS}
    if repo == "NVIDIA/NeMo-Skills":
        # math_equal(a, b) and math_equal(b, a) must both be True (or both False).
        label = function.name == "test_correct_examples"
        first, second = values["output_pair"]
        for gold, pred in ((first, second), (second, first)):
            yield {**base, "gold": None if gold is None else str(gold), "pred": None if pred is None else str(pred), "label": label,
                   "match_types": ["nemo_math_equal"]}
        return
    call = next(n for n in ast.walk(function) if isinstance(n, ast.Call) and ast.unparse(n.func) in ("compare_strings", "verify"))
    options = dict(base)
    if ast.unparse(call.func) == "verify":  # test_yujianll: verify(parse(gold), parse(pred)), all defaults
        options.update(gold=values["gold"], pred=values["pred"], match_types=["default"])
    else:
        arguments = dict(zip(SIGNATURES[repo], call.args))
        arguments.update({k.arg: k.value for k in call.keywords})
        for key, node in arguments.items():
            options[key] = eval(compile(ast.Expression(node), path, "eval"), {"math": math}, values)
    label = values.get("expected", values.get("result"))
    options["label"] = bool(label)
    yield options


def main() -> None:
    git_dirs = sys.argv[1:4]
    if len(git_dirs) != 3:
        raise SystemExit(__doc__.strip().splitlines()[2].strip())
    cases, seen = [], set()
    for repo, index, path, license in SOURCES:
        commit = _commit(git_dirs[index])
        for case in _cases(repo, path, _show(git_dirs[index], path)):
            key = (case["gold"], case["pred"], json.dumps(case["match_types"]), case["precision"], case["strict"], case["allow_set_relation_comp"])
            if key in seen:
                continue  # the same case with the same options in an earlier file
            seen.add(key)
            cases.append({**case, "source": f"https://github.com/{repo}/blob/{commit}/{case['source'].split('/', 2)[2]}", "license": license})
    with OUT.open("w", encoding="utf-8") as out:
        for case in cases:
            out.write(json.dumps(case, ensure_ascii=False) + "\n")
    print(f"{len(cases)} cases -> {OUT}")


if __name__ == "__main__":
    main()
