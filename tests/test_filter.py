"""distill filter: every verdict per row, reasons, curation, dedup, decontamination, outputs."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from conftest import shared_path
from distill.config import load_config
from distill.errors import ConfigError, InputError
from distill.problems import load_problems
from distill.records import TraceRecord, write_parquet
from distill.teacher.curate import BenchmarkIndex, BenchmarkItem, find_duplicates, select, words
from distill.teacher.filter import FilterConfig, load_benchmarks, run
from distill.verify import Verifier

REASONING = "First I add the two numbers carefully, then I check the sum once more to be sure."
PLANTED = (  # MATH-500 test/precalculus/807.json with small edits
    "Convert the point $(0,4)$ in rectangular coordinates to polar coordinates.  Please enter your answer "
    "in the form $(r,\\theta),$ where $r > 0$ and $0 \\le \\theta < 2 \\pi.$"
)
APPLES = ("Tom has 2 apples in his bag and buys 3 more apples at the market on his way home from school today. "
          "How many apples does Tom have in his bag now?")
APPLES_COPY = ("Tom has 2 apples in his bag and then he buys 3 more apples at the market on his way home from school today. "
               "How many apples does Tom have in his bag now?")
PEARS = "A basket holds 7 pears and a second basket holds 5 pears more than the first. How many pears are there in both baskets?"
COINS = "Sara had 10 coins and gave 4 coins to her brother on the way home from school. How many coins does Sara keep?"


def trace(problem_id, sample_idx, problem, answer, final, reasoning=REASONING, finish="stop", **extra):
    return {"problem_id": problem_id, "sample_idx": sample_idx, "problem": problem, "answer": answer,
            "completion": f"<think>\n{reasoning}\n</think>\n\n{final}", "finish_reason": finish, **extra}


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


ROWS = [
    trace("apples", 0, APPLES, "5", "So Tom has \\boxed{5} apples."),
    trace("apples", 1, APPLES, "5", "\\boxed{5}", reasoning=REASONING * 3),  # correct, longer
    trace("apples", 2, APPLES, "5", "\\boxed{6}"),  # wrong
    trace("apples", 3, APPLES, "5", "\\boxed{5}", finish="length"),  # truncated
    trace("apples-copy", 0, APPLES_COPY, "5", "\\boxed{5}"),  # near copy of apples
    trace("pears", 0, PEARS, "19", "\\boxed{19}", reasoning=REASONING + " 所以我们需要把两个篮子里的梨的数量加起来得到答案。"),  # language
    trace("pears", 1, PEARS, "19", "\\boxed{19}", reasoning=REASONING + " Wait, let me add the pears again to check." * 80),  # loop
    trace("pears", 2, PEARS, "19", "\\boxed{19}"),
    {**trace("pears", 3, PEARS, "19", ""), "completion": "I think it is \\boxed{19}"},  # no think block: format
    trace("planted", 0, PLANTED, "(4, \\frac{\\pi}{2})", "\\boxed{\\left(4, \\frac{\\pi}{2}\\right)}"),  # contaminated
    trace("coins", 0, COINS, None, "\\boxed{6}"),  # no reference
    trace("coins", 1, COINS, None, "I am not sure."),
]


@pytest.fixture(scope="module")
def verifier():
    with Verifier(workers=2) as shared:
        yield shared


@pytest.fixture(scope="module")
def data_dir():
    return shared_path("eval/math500/test.jsonl").parents[1]


def config(tmp_path: Path, traces: Path, **changes) -> FilterConfig:
    changes.setdefault("decontaminate", ())
    changes.setdefault("plots", False)
    return FilterConfig(traces=traces, out=tmp_path / "out", **changes)


def by_id(path: Path) -> dict[str, dict]:
    return {row["id"]: row for row in pq.read_table(path).to_pylist()}


def test_filter_records_every_verdict_and_the_first_reason(tmp_path, verifier, data_dir):
    traces = write_jsonl(tmp_path / "traces.jsonl", ROWS)
    cfg = config(tmp_path, traces, data_dir=data_dir, decontaminate=("gsm8k", "math500", "aime24", "aime25", "amc23"), plots=True)
    metrics = run(cfg, verifier=verifier)
    out = cfg.out
    accepted, rejected = by_id(out / "accepted.parquet"), by_id(out / "rejected.parquet")

    assert set(accepted) == {"apples/0", "apples/1", "pears/2"}
    reasons = {key: row["reject_reason"] for key, row in rejected.items()}
    assert reasons == {
        "apples/2": "wrong", "apples/3": "truncated", "apples-copy/0": "duplicate",
        "pears/0": "language", "pears/1": "repetition", "pears/3": "format",
        "planted/0": "contaminated", "coins/0": "bad_reference", "coins/1": "bad_reference",
    }
    # Every verdict is recorded, not only the first failure.
    assert rejected["planted/0"]["correct"] is True and rejected["planted/0"]["contaminated_by"] == "math500:test/precalculus/807.json"
    assert rejected["pears/3"]["failed_checks"] == "format" and rejected["pears/3"]["correct"] is True
    assert rejected["apples/3"]["truncated"] and rejected["apples/3"]["answer_verdict"] == "correct"
    assert rejected["apples-copy/0"]["duplicate_of"] == "apples"
    assert rejected["coins/1"]["failed_checks"] == "bad_reference" and rejected["coins/1"]["correct"] is None
    assert not rejected["pears/0"]["language_ok"] and rejected["pears/1"]["max_repeats"] > 10
    assert accepted["apples/0"]["extracted"] == "5" and accepted["apples/0"]["pass_rate"] == 0.75

    # accepted.parquet is what `distill train` reads: chat messages, user then assistant.
    messages = accepted["apples/0"]["messages"]
    assert [m["role"] for m in messages] == ["user", "assistant"]
    assert messages[0]["content"] == APPLES and messages[1]["content"].startswith("<think>")

    stats = json.loads((out / "stats.json").read_text())
    assert stats["rows"] == len(ROWS) and stats["accepted"] == 3
    assert stats["pass_rate"]["per_problem"] == {"apples": 0.75, "apples-copy": 1.0, "pears": 1.0, "planted": 1.0, "coins": None}
    assert stats["decontamination"]["by_benchmark"] == {"math500": 1}
    assert stats["dedup"] == {"threshold": 0.8, "exact": 0, "near": 1}
    assert metrics["reject_reasons"]["bad_reference"] == 2 and metrics["accepted_problems"] == 2

    report = (out / "report.md").read_text()
    assert "`planted`" in report and "test/precalculus/807.json" in report  # the removed problem and what it matched
    assert "`apples-copy`" in report
    for plot in ("reasons", "lengths", "pass_rate"):
        assert (out / "plots" / f"{plot}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"plots/{plot}.png" in report
    assert json.loads((out / "metrics.json").read_text())["accepted"] == 3
    ledger = json.loads((out / "metrics.json").read_text())["compute"]  # no model ran; the input's ledger is the cost
    assert ledger["counts_as"] == "none" and ledger["flops_total"] == 0 and len(ledger["upstream"]) == 1
    # Rejections the user may not expect, over 1%: a warning line and a record in metrics.json.
    warnings = json.loads((out / "metrics.json").read_text())["warnings"]
    assert [(w["reason"], w["count"], w["total"]) for w in warnings] == [("truncated", 1, 12)]
    assert "raise max_tokens in distill generate" in warnings[0]["message"] and "warning: traces cut off" in (out / "filter.log").read_text()


def test_selection_and_difficulty(tmp_path, verifier):
    rows = [trace("apples", i, APPLES, "5", "\\boxed{5}", reasoning=REASONING * (4 - i)) for i in range(4)]
    rows += [trace("apples", 4, APPLES, "5", "\\boxed{7}")]  # pass rate 4/5
    rows += [trace("coins", i, COINS, "6", "\\boxed{6}" if i < 2 else "\\boxed{5}") for i in range(4)]  # 2/4
    traces = write_jsonl(tmp_path / "traces.jsonl", rows)

    def accepted_ids(**changes):
        cfg = config(tmp_path, traces, dedup=False, **changes)
        run(cfg, verifier=verifier)
        return sorted(by_id(cfg.out / "accepted.parquet"))

    assert accepted_ids() == ["apples/0", "apples/1", "apples/2", "apples/3", "coins/0", "coins/1"]
    assert accepted_ids(selection="max_k", k=1) == ["apples/0", "coins/0"]
    assert accepted_ids(selection="shortest", k=2) == ["apples/2", "apples/3", "coins/0", "coins/1"]
    chosen = accepted_ids(selection="random_k", k=2, seed=3)
    assert len(chosen) == 4 and chosen == accepted_ids(selection="random_k", k=2, seed=3)  # seeded
    # Difficulty: keep problems the teacher solves at most 60% of the time.
    assert accepted_ids(pass_rate_max=0.6) == ["coins/0", "coins/1"]
    rejected = by_id(tmp_path / "out" / "rejected.parquet")
    assert rejected["apples/0"]["reject_reason"] == "difficulty" and rejected["apples/4"]["reject_reason"] == "wrong"


def test_select_modes_directly():
    candidates = [(10, 2, 500), (11, 0, 300), (12, 1, 300), (13, 3, 100)]  # (row, sample_idx, length)
    assert select(candidates, "all", 1, 0, "p") == [11, 12, 10, 13]
    assert select(candidates, "max_k", 2, 0, "p") == [11, 12]
    assert select(candidates, "shortest", 2, 0, "p") == [13, 11]
    assert select(candidates, "random_k", 2, 0, "p") == select(list(reversed(candidates)), "random_k", 2, 0, "p")


def test_dedup_finds_exact_and_near_copies():
    texts = [APPLES, PEARS, APPLES.upper().replace(" ", "  "), APPLES_COPY, COINS,
             PEARS.replace("a second basket", "another basket"),
             "A train leaves at 3 pm and travels 60 miles per hour. How far has it gone by 5 pm?"]
    found = {d.index: (d.kept, d.kind) for d in find_duplicates(texts, threshold=0.8)}
    assert found == {2: (0, "exact"), 3: (0, "near")}  # the first copy is kept
    near = {d.index: d.similarity for d in find_duplicates(texts, threshold=0.8) if d.kind == "near"}
    assert 0.8 <= near[3] < 1.0
    # Two words replaced in a 24-word problem: Jaccard 0.72, a copy only at a looser threshold.
    assert {d.index: d.kept for d in find_duplicates(texts, threshold=0.7)} == {2: 0, 3: 0, 5: 1}
    # A stricter threshold keeps the near copies; exact ones are always found.
    assert {d.index for d in find_duplicates(texts, threshold=0.95)} == {2}


def test_decontamination_finds_a_planted_math500_problem(data_dir):
    index = BenchmarkIndex(load_benchmarks(["math500", "aime24"], data_dir), n=8)
    match = index.match(PLANTED)
    assert match is not None and match.item.benchmark == "math500" and match.item.item_id == "test/precalculus/807.json"
    math500 = load_problems("math500", data_dir=data_dir).problems
    # MATH-500 problems with every 9th word changed are still found: 8 words in a row survive.
    for problem in math500[:60]:
        tokens = words(problem.problem)
        if len(tokens) < 13:
            continue
        edited = " ".join("edited" if i % 9 == 4 else token for i, token in enumerate(tokens))
        found = index.match(edited)
        assert found is not None and found.item.item_id == problem.id, problem.id
    assert index.match(APPLES) is None and index.match(COINS) is None


def test_decontamination_short_texts_and_user_files(tmp_path):
    items = [BenchmarkItem("mine", "a", "What is 2+2?"), BenchmarkItem("mine", "b", PEARS)]
    index = BenchmarkIndex(items, n=8)
    assert index.match("what is 2 + 2 ?").item.item_id == "a"  # shorter than n: matched when equal
    assert index.match("What is 2+3?") is None
    user_file = write_jsonl(tmp_path / "held_out.jsonl", [{"id": "h1", "problem": COINS, "answer": "6"}])
    assert BenchmarkIndex(load_benchmarks([str(user_file)], None)).match(COINS).item.benchmark == "held_out.jsonl"


def test_bad_rows_error_or_skip(tmp_path, verifier):
    rows = [json.dumps(trace("apples", 0, APPLES, "5", "\\boxed{5}")),
            json.dumps({"problem": APPLES, "answer": "5"}),  # no completion
            "{not json"]
    traces = tmp_path / "bad.jsonl"
    traces.write_text("\n".join(rows) + "\n", encoding="utf-8")
    with pytest.raises(InputError, match=r"bad\.jsonl:2: missing field 'completion'.*--on-bad-row skip"):
        run(config(tmp_path, traces), verifier=verifier)
    metrics = run(config(tmp_path, traces, on_bad_row="skip"), verifier=verifier)
    assert metrics["skipped_rows"] == 2 and metrics["accepted"] == 1
    warnings = json.loads((tmp_path / "out" / "metrics.json").read_text())["warnings"]
    assert [(w["reason"], w["count"], w["total"]) for w in warnings] == [("malformed", 2, 3)]
    report = (tmp_path / "out" / "report.md").read_text()
    assert "bad.jsonl:2" in report and "bad.jsonl:3" in report


def test_inputs_run_dir_shards_parquet_and_minimal_rows(tmp_path, verifier):
    run_dir = tmp_path / "generate"
    run_dir.mkdir()
    write_jsonl(run_dir / "traces.shard-0-of-2.jsonl", [trace("apples", 0, APPLES, "5", "\\boxed{5}")])
    write_jsonl(run_dir / "traces.shard-1-of-2.jsonl", [trace("pears", 0, PEARS, "19", "\\boxed{19}")])
    assert run(config(tmp_path, run_dir), verifier=verifier)["accepted"] == 2

    records = [TraceRecord("coins", i, COINS, "6", f"<think>\n{REASONING}\n</think>\n\\boxed{{{6 + i}}}") for i in range(2)]
    parquet = tmp_path / "traces.parquet"
    write_parquet(records, parquet)
    assert run(config(tmp_path, parquet), verifier=verifier)["accepted"] == 1

    # A minimal file with several completions per problem and no ids: samples are numbered.
    minimal = write_jsonl(tmp_path / "minimal.jsonl", [
        {"problem": COINS, "answer": "6", "completion": f"<think>\n{REASONING}\n</think>\n\\boxed{{{answer}}}"} for answer in (6, 6, 7)
    ])
    metrics = run(config(tmp_path, minimal), verifier=verifier)
    assert metrics["accepted"] == 2 and len(by_id(tmp_path / "out" / "accepted.parquet")) == 2


def test_student_length_check(tmp_path, verifier):
    tokenizer = shared_path("tokenizers/qwen2.5-instruct")
    long_reasoning = " ".join(f"Step {i}: {i} plus {i + 1} makes {2 * i + 1}." for i in range(40))
    rows = [trace("apples", 0, APPLES, "5", "\\boxed{5}"), trace("apples", 1, APPLES, "5", "\\boxed{5}", reasoning=long_reasoning)]
    traces = write_jsonl(tmp_path / "traces.jsonl", rows)
    cfg = config(tmp_path, traces, student=str(tokenizer), max_seq_len=200)
    metrics = run(cfg, verifier=verifier)
    accepted, rejected = by_id(cfg.out / "accepted.parquet"), by_id(cfg.out / "rejected.parquet")
    assert list(accepted) == ["apples/0"] and rejected["apples/1"]["reject_reason"] == "too_long"
    short, long = accepted["apples/0"]["num_tokens"], rejected["apples/1"]["num_tokens"]
    assert 40 < short <= 200 < long  # the Qwen template adds its system prompt to the count
    assert metrics["check_failures"] == {"too_long": 1}
    with pytest.raises(ConfigError, match="--student"):
        run(config(tmp_path, traces, student=str(tmp_path / "no-such-tokenizer")), verifier=verifier)


def test_config_validation_and_recipe_keys(tmp_path):
    with pytest.raises(ConfigError, match="pass_rate_min"):
        load_config(FilterConfig, overrides=["traces=x.jsonl", "out=o", "pass_rate_min=0.9", "pass_rate_max=0.5"])
    loaded = load_config(FilterConfig, overrides=["traces=x.jsonl", "out=o", "think_tags=<|begin_of_thought|>,<|end_of_thought|>", "decontaminate=[]"])
    assert loaded.config.think_tags == ("<|begin_of_thought|>", "<|end_of_thought|>") and loaded.config.decontaminate == ()
    with pytest.raises(ConfigError, match="missing required value 'traces'"):
        load_config(FilterConfig, overrides=["out=o"])


def test_cli_filter(tmp_path, run_cli):
    traces = write_jsonl(tmp_path / "traces.jsonl", ROWS[:3])
    code, out, err = run_cli("filter", "--in", str(traces), "--out", str(tmp_path / "cli"), "decontaminate=[]", "verifier_workers=1")
    assert code == 0, err
    assert "accepted 2/3 traces" in out and (tmp_path / "cli" / "accepted.parquet").is_file()
    code, out, err = run_cli("filter", "--out", str(tmp_path / "cli2"))
    assert code == 2 and "missing required value 'traces'" in err and "--traces" in err
    bad = tmp_path / "bad.jsonl"
    bad.write_text((tmp_path / "traces.jsonl").read_text() + "{torn\n", encoding="utf-8")
    code, out, err = run_cli("filter", "--in", str(bad), "--out", str(tmp_path / "cli3"), "decontaminate=[]")
    assert code == 2 and err.strip().endswith("fix the line or pass --on-bad-row skip") and "bad.jsonl:4" in err
    code, out, err = run_cli("filter", "--in", str(bad), "--out", str(tmp_path / "cli3"), "--on-bad-row", "skip", "decontaminate=[]")
    assert code == 0 and "accepted 2/3 traces" in out
