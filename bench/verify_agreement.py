"""Verifier correctness: distill's Verifier and math-verify on the peers' labelled cases, side by
side in one run, and the Verifier against the recorded verdicts of the real Sky-T1 traces.

    python bench/verify_agreement.py [--data ../shared/data] [--write docs/benchmarks.md]

Peers' cases: tests/data/peer_cases.jsonl (Math-Verify's, NeMo-Skills' and lighteval's own test
cases; sources and licences in tests/data/PEER_CASES.md), graded by
- math-verify as each peer's test calls it (its extraction targets and options),
- math-verify called plainly (`verify(parse(gold), parse(pred))`, with the case's precision,
  strict and set-relation options),
- distill's `Verifier.grade(gold, pred)` with each no-answer fallback.
A false positive credits a pair the peer labels unequal. The test
`tests/test_verify.py::test_peer_labelled_cases_against_math_verify` asserts the targets.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from peer_cases import distill_verdicts, load_cases, measure  # noqa: E402

SECTION = "## Verifier agreement with peers' labels (`bench/verify_agreement.py`)"
SKY_T1 = ("sky-t1-math-correct-5k-32b_aime24.jsonl", "sky-t1-math-correct-5k-27b_math500.jsonl")


def sky_t1(data: Path, fallback: str) -> dict:
    from distill.verify import Verifier

    rows = []
    for name in SKY_T1:
        rows += [json.loads(line) for line in (data / "traces" / name).read_text().splitlines()]
    with Verifier(workers=2, think_tags=("<|begin_of_thought|>", "<|end_of_thought|>"), no_answer_fallback=fallback) as verifier:
        verdicts = verifier.grade([(row["answer"], row["code"][0]) for row in rows])
    recorded = [row["score"][0] for row in rows]
    decided = [(v.correct, r) for v, r in zip(verdicts, recorded) if v.reason in ("correct", "wrong")]
    return {
        "traces": len(rows),
        "decided": len(decided),
        "agree_decided": sum(ours == theirs for ours, theirs in decided),
        "agree_all": sum((v.correct is True) == r for v, r in zip(verdicts, recorded)),
        "no_answer": sum(v.reason == "no_answer" for v in verdicts),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data")
    parser.add_argument("--write", type=Path, default=None, help="replace this script's section in a Markdown file")
    args = parser.parse_args()

    cases = load_cases()
    started = time.perf_counter()
    table = measure(cases, no_answer_fallback="last")
    strict = [v.correct is True for v in distill_verdicts(cases, no_answer_fallback="none")]
    table["distill Verifier (no_answer_fallback=none)"] = {
        "agree": sum(c == case["label"] for c, case in zip(strict, cases)),
        "false_positive": [i for i, (c, case) in enumerate(zip(strict, cases)) if c and not case["label"]],
        "false_negative": [i for i, (c, case) in enumerate(zip(strict, cases)) if not c and case["label"]],
    }
    seconds = time.perf_counter() - started
    plain = table["math-verify, plain defaults"]["credited"]
    ours = table["distill Verifier (no_answer_fallback=last)"]["credited"]
    lost = [i for i, case in enumerate(cases) if ours[i] != case["label"] and plain[i] == case["label"]]
    won = [i for i, case in enumerate(cases) if ours[i] == case["label"] and plain[i] != case["label"]]
    lines = [
        SECTION,
        "",
        f"`python bench/verify_agreement.py`, {time.strftime('%Y-%m-%d')}, math-verify "
        f"{_version('math-verify')}: {len(cases)} labelled (gold, prediction) cases from the peers' own test suites "
        "(tests/data/PEER_CASES.md), every grader run on all of them in this run "
        f"({seconds:.0f} s, 2 shared cores).",
        "",
        "| grader | agrees with the peers' labels | credits a pair labelled unequal | misses a pair labelled equal |",
        "|---|---:|---:|---:|",
        *[f"| {name} | {row['agree']} / {len(cases)} ({row['agree'] / len(cases):.1%}) | {len(row['false_positive'])} | {len(row['false_negative'])} |"
          for name, row in table.items()],
        "",
        f"distill (eval's fallback) is right where plain math-verify is wrong on {len(won)} cases and wrong where it is "
        f"right on {len(lost)}:",
        *[f"- `{_short(cases[i]['gold'])}` vs `{_short(cases[i]['pred'])}` (label {cases[i]['label']}; "
          f"{cases[i]['source'].rsplit('/', 1)[-1]})" for i in lost],
        "",
        "With `no_answer_fallback=none` (filter, grpo) most misses are predictions without a box or an "
        "\"answer is\" (the peers test free-text extraction): by design those are `no_answer` there.",
        "",
    ]
    if (args.data / "traces").is_dir():
        lines += ["Real long-CoT outputs (530 Sky-T1 traces in ../shared/data/traces) against their recorded verdicts:", "",
                  "| fallback | answer found | agree where found | agree overall (no answer = not credited) |", "|---|---:|---:|---:|"]
        for fallback in ("none", "last"):
            row = sky_t1(args.data, fallback)
            lines.append(f"| {fallback} | {row['decided']} / {row['traces']} | {row['agree_decided']} ({row['agree_decided'] / row['decided']:.1%}) | "
                         f"{row['agree_all']} ({row['agree_all'] / row['traces']:.1%}) |")
        lines.append("")
    section = "\n".join(lines)
    print(section)
    if args.write:
        from sft_vs_trl import replace_section  # same folder: one way to put a section in the doc

        replace_section(args.write, section)


def _short(text: str | None, limit: int = 70) -> str:
    text = " ".join((text or "").split()).replace("`", "'")
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _version(package: str) -> str:
    from importlib import metadata

    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "?"


if __name__ == "__main__":
    main()
