"""Tests for the shipped training set data/mind497.jsonl and its checker data/verify.py: the schema,
unique ids, the paper's subject and level counts (Tables 6 and 7), every boxed answer equal to the
gold one by math-verify, and the blind second answers in agreement. Run: pytest -q test_data.py"""
import collections, importlib.util, json, subprocess, sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
spec = importlib.util.spec_from_file_location("verify", HERE / "data" / "verify.py")
verify = importlib.util.module_from_spec(spec)
spec.loader.exec_module(verify)

ROWS = [json.loads(line) for line in verify.DATA.read_text(encoding="utf-8").splitlines()]
BLIND = [json.loads(line) for line in verify.BLIND.read_text(encoding="utf-8").splitlines()]


def test_schema_and_unique_ids():
    assert ROWS and all(not verify.schema_errors(f"line {n}", r) for n, r in enumerate(ROWS, 1))
    assert len({r["id"] for r in ROWS}) == len(ROWS)
    assert len({r["problem"] for r in ROWS}) == len(ROWS)


def test_counts_are_the_paper_s_tables():
    """Table 6 (subjects) and Table 7 (levels): never above them while blocks are added, and
    exactly them once all 497 problems are in."""
    for key, table in (("subject", verify.SUBJECT_TARGETS), ("level", verify.LEVEL_TARGETS)):
        got = collections.Counter(r[key] for r in ROWS)
        assert set(got) <= set(table) and all(got[v] <= n for v, n in table.items()), got
        if len(ROWS) == sum(table.values()):
            assert got == collections.Counter(table), got
    assert not verify.count_errors(ROWS) or len(ROWS) < 497


def test_every_rationale_ends_in_the_gold_answer_by_math_verify():
    bad = [m for n, r in enumerate(ROWS, 1) for m in verify.answer_errors(f"line {n}", r)]
    assert not bad, bad[:5]


def test_blind_answers_agree_with_the_gold_answers():
    agree, bad = verify.compare_blind({r["id"]: r for r in ROWS}, [("blind", b) for b in BLIND])
    assert not bad and agree == len(ROWS), bad[:5]
    assert all(b["method"].strip() for b in BLIND)  # how each second answer was settled


def test_the_checker_finds_a_wrong_answer_a_bad_rationale_and_a_missing_blind_answer(tmp_path):
    rows = [dict(r, rationales=dict(r["rationales"])) for r in ROWS[:3]]
    rows[0]["answer"] = rows[0]["answer"] + "1"          # gold no longer what the rationales box
    k = next(iter(rows[1]["rationales"]))
    rows[1]["rationales"][k] += " So the answer is done."   # text after the box
    data, blind = tmp_path / "d.jsonl", tmp_path / "d.blind.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    blind.write_text("".join(json.dumps(b) + "\n" for b in BLIND[:2]), encoding="utf-8")
    r = subprocess.run([sys.executable, str(HERE / "data" / "verify.py"), str(data), "--partial"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 1
    err = r.stderr.splitlines()
    assert sum(f"({rows[0]['id']}, " in m and "wrong answer" in m for m in err) == 8
    assert any(f"({rows[1]['id']}, {k})" in m and "does not end in" in m for m in err)
    assert any(f"blind answer {BLIND[0]['answer']!r}" in m for m in err)  # disagrees with the new gold
    assert f"{rows[2]['id']}: no blind answer" in err
    assert "3 problems; 15 of 24 rationales end in the gold answer" in r.stdout


def test_the_shipped_set_passes_its_checker():
    args = [] if len(ROWS) == 497 else ["--partial"]
    r = subprocess.run([sys.executable, str(HERE / "data" / "verify.py"), *args],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert f"blind answers agree on {len(ROWS)} of {len(ROWS)}" in r.stdout


def test_a_real_student_trains_on_the_set_by_default_and_the_demo_on_the_sample(tmp_path, monkeypatch):
    import infra, mind
    data = HERE / "data"
    real, tiny = mind.Config(student="Qwen/Qwen2.5-1.5B"), mind.Config(student="tiny")
    monkeypatch.setattr(mind, "HERE", tmp_path)  # a checkout in which data/build.py has not run
    (tmp_path / "data").mkdir()
    assert mind.data_file(real) == tmp_path / "data" / "mind497.jsonl"
    assert mind.data_file(tiny) == tmp_path / "data" / "sample.jsonl"
    (tmp_path / "data" / "mind_math.jsonl").write_text("")  # once built, the built set comes first
    assert mind.data_file(real) == mind.data_file(tiny) == tmp_path / "data" / "mind_math.jsonl"
    assert mind.data_file(mind.Config(student="tiny", data="x.jsonl")) == Path("x.jsonl")
    said = []  # the shipped set is no demo: no note
    assert infra.demo_data_note("Qwen/Qwen2.5-1.5B", data / "mind497.jsonl", 497, said.append) is None
    assert len(mind.load_data(data / "mind497.jsonl")) == len(ROWS) and not said


@pytest.mark.parametrize("flag, name", [("--out", "mind497.jsonl"), ("--log", "mind497.blind.jsonl"),
                                        ("--out", "sample.jsonl")])
def test_build_never_writes_to_a_shipped_set(flag, name, capsys):
    before = (HERE / "data" / name).read_bytes()
    sys.path.insert(0, str(HERE / "data"))
    import build
    with pytest.raises(build.BuildError, match=f"{name} is a set shipped with this repository"):
        build.main(["--teacher-url", "http://127.0.0.1:9/v1", "--teacher-model", "m", flag,
                    str(HERE / "data" / name)])
    assert (HERE / "data" / name).read_bytes() == before
