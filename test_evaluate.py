"""Tests of evaluate.py, offline: the scoring functions on hard cases whose verdicts are known
independently, the six fixture files in the Hub layouts, greedy batched generation, the vLLM path
(with a stand-in module), the error messages, and the tiny GPT-2 end to end (trained by mind.py).

Run: pytest -q test_evaluate.py   (about a minute on a laptop CPU)
"""
import csv, gc, json, re, subprocess, sys, threading, types, weakref
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

HERE = Path(__file__).resolve().parent
FIX = HERE / "data" / "fixtures" / "eval"
sys.path.insert(0, str(HERE))
import evaluate as ev  # noqa: E402
from prompts import eval_prompt  # noqa: E402


def fixture_rows(bench):
    """The fixture's raw rows, read with the standard library only (independently of evaluate.py)."""
    path = next(FIX.glob(f"{bench}.*"))
    if path.suffix == ".csv":
        with open(path, newline="", encoding="utf-8") as fh:
            return list(csv.DictReader(fh))
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


# ----------------------------------------------------------------------------------------------------
# Scoring. Each case: (bench, completion, gold, extracted answer expected, verdict expected). The
# verdicts are facts (1/2 = 0.5, 1,000 = 1000) or the documented rules (the last box is the answer).
CASES = [
    # MATH500: math-verify equivalence of the last \boxed{}
    ("math500", "Subtracting gives $\\frac{3}{6}$, so the answer is \\boxed{0.5}.", "\\frac{1}{2}", "0.5", True),
    ("math500", "The answer is \\boxed{\\dfrac12}", "\\frac{1}{2}", "\\dfrac12", True),
    ("math500", "\\boxed{\\dfrac12}", "0.5", "\\dfrac12", True),
    ("math500", "\\boxed{\\frac{1}{3}}", "\\frac{1}{2}", "\\frac{1}{3}", False),
    ("math500", "The price drops by \\boxed{10\\%}.", "10\\%", "10\\%", True),
    ("math500", "The price drops by \\boxed{10}.", "10\\%", "10", True),  # MATH graders accept a dropped %
    ("math500", "There are \\boxed{1,000} of them.", "1000", "1,000", True),
    ("math500", "\\boxed{\\frac{1}{\\sqrt{2}}}", "\\frac{\\sqrt{2}}{2}", "\\frac{1}{\\sqrt{2}}", True),  # nested braces
    ("math500", "\\boxed{\\frac{\\sqrt{3}}{3}}", "\\frac{\\sqrt{3}}{2}", "\\frac{\\sqrt{3}}{3}", False),
    ("math500", "First \\boxed{3}, but correcting myself: \\boxed{5}", "5", "5", True),  # two boxes: the last
    ("math500", "First \\boxed{3}, but correcting myself: \\boxed{5}", "3", "5", False),
    ("math500", "\\boxed{4, 3}", "3, 4", "4, 3", True),  # a set of solutions in any order
    ("math500", "Hence the answer is 7.", "7", "7", True),  # no box: math-verify finds it
    ("math500", "I do not know how to do this.", "7", None, False),  # nothing: unparsed
    # GSM8K, SVAMP: the boxed number, else the last number, compared as numbers
    ("gsm8k", "So \\boxed{1,000}", "1000", "1000", True),
    ("gsm8k", "In all she pays $1,850.", "1850", "1850", True),
    ("gsm8k", "\\boxed{10\\%}", "10", "10", True),
    ("gsm8k", "\\boxed{\\$18.00}", "18", "18", True),
    ("gsm8k", "\\boxed{14}", "15", "14", False),
    ("gsm8k", "Maybe \\boxed{3}; no wait, \\boxed{5}", "5", "5", True),
    ("gsm8k", "5 - 3 = 2 apples", "2", "2", True),
    ("gsm8k", "I cannot tell.", "2", None, False),
    ("svamp", "Each friend gets \\boxed{\\frac{12}{5}}", 2.4, "2.4", True),
    ("svamp", "Each friend gets 12/5 pizzas.", 2.4, "2.4", True),
    ("svamp", "The temperature is x = -4", -4.0, "-4", True),
    ("svamp", "\\boxed{9}", 9.0, "9", True),
    # CSQA, GPQA: boxed letter, else 'Answer: X', else the last standalone letter
    ("csqa", "\\boxed{(C)}", "C", "C", True),
    ("csqa", "\\boxed{C}", "(C)", "C", True),
    ("csqa", "\\boxed{\\text{C. library}}", "C", "C", True),
    ("csqa", "It is a fridge.\nAnswer: (B)", "B", "B", True),
    ("csqa", "So the answer is D.", "D", "D", True),
    ("csqa", "A careful reading points to (D).", "D", "D", True),  # the article 'A' is no answer
    ("csqa", "(B) is tempting, but (A) is right.", "B", "A", False),
    ("gpqa", "\\boxed{E}", "A", None, False),  # GPQA has only A-D
    ("gpqa", "A library is no answer here.", "A", None, False),
    # StrategyQA: boxed or last yes/no
    ("strategyqa", "\\boxed{Yes.}", True, "yes", True),
    ("strategyqa", "**No**, it cannot fly.", False, "no", True),
    ("strategyqa", "So the answer is: yes!", "yes", "yes", True),
    ("strategyqa", "\\boxed{\\text{No}}", "no", "no", True),
    ("strategyqa", "Yes, penguins swim; but fly? The answer is no.", True, "no", False),
    ("strategyqa", "Hard to say.", "no", None, False),
]


@pytest.mark.parametrize("bench, completion, gold, extracted, verdict", CASES)
def test_scoring_hard_cases(bench, completion, gold, extracted, verdict):
    assert ev.extract_answer(bench, completion) == extracted
    assert ev.is_correct(bench, completion, gold) is verdict


def test_math_scoring_off_the_main_thread():
    """math-verify's signal.alarm only works on the main thread; is_correct must work anywhere."""
    pairs = [("\\boxed{0.5}", "\\frac{1}{2}", True), ("\\boxed{\\frac{1}{3}}", "\\frac{1}{2}", False),
             ("The answer is 7.", "7", True)]
    with ThreadPoolExecutor(2) as pool:
        got = list(pool.map(lambda p: (threading.current_thread() is threading.main_thread(),
                                       ev.is_correct("math500", p[0], p[1]),
                                       ev.extract_answer("math500", p[0])), pairs))
    assert [g[0] for g in got] == [False] * 3  # really off the main thread
    assert [g[1] for g in got] == [p[2] for p in pairs]
    assert [g[2] for g in got] == ["0.5", "\\frac{1}{3}", "7"]


def test_score_counts():
    items = [{"gold": "3"}, {"gold": "4"}, {"gold": "5"}, {"gold": "6"}]
    r = ev.score("gsm8k", items, ["\\boxed{3}", "\\boxed{5}", "no idea", "it is 6"])
    assert (r["n"], r["correct"], r["unparsed"]) == (4, 2, 1)
    assert r["accuracy"] == pytest.approx(50.0)
    assert [it["extracted"] for it in r["items"]] == ["3", "5", None, "6"]


def test_markdown_table_layout_and_gains():
    def row(label, accs):
        return {"label": label, "settings": {"limit": 0}, "benchmarks": {
            b: {"accuracy": a, "correct": int(a), "n": 100, "unparsed": 1} for b, a in zip(ev.BENCHES, accs)}}
    base, tuned = [50, 80, 70, 60, 40, 20], [55, 80, 69, 62, 44, 26]
    lines = ev.markdown_table([row("base", base), row("tuned", tuned)]).splitlines()
    assert lines[0] == "| Model | MATH500 | GSM8K | SVAMP | ID Avg | CSQA | StrategyQA | GPQA-D | OOD Avg |"
    cells = [c.strip() for c in lines[3].strip("|").split("|")]
    assert cells[0] == "tuned"
    assert cells[1] == "55.00 ↑5.00" and cells[2] == "80.00 ±0.00" and cells[3] == "69.00 ↓1.00"
    id_gain = (55 + 80 + 69) / 3 - (50 + 80 + 70) / 3
    assert cells[4] == f"{(55 + 80 + 69) / 3:.2f} ↑{id_gain:.2f}"
    assert cells[8] == f"{(62 + 44 + 26) / 3:.2f} ↑{(62 + 44 + 26) / 3 - (60 + 40 + 20) / 3:.2f}"
    assert lines[2].split("|")[2].strip() == "50.00"  # the reference row has no gains
    assert "| tuned | 55/100 (1) |" in "\n".join(lines)


# ----------------------------------------------------------------------------------------------------
# Benchmarks: the fixtures are small files in each Hub dataset's own layout.
@pytest.mark.parametrize("bench", list(ev.BENCHES))
def test_fixtures_load_in_hub_layout(bench):
    local = ev.parse_local([str(FIX)])
    items, source, skipped = ev.load_bench(bench, local, seed=0)
    raw = fixture_rows(bench)
    assert source == local[bench] and len(items) == len(raw) >= 5 and skipped == []
    for item, row in zip(items, raw):
        if bench == "math500":
            assert item["gold"] == row["answer"] and item["question"] == row["problem"]
        elif bench == "gsm8k":
            assert float(item["gold"]) == float(row["answer"].split("####")[1])
        elif bench == "svamp":  # the dataset's own concatenation is the question we ask
            assert item["question"] == row["question_concat"] and item["gold"] == row["Answer"]
        elif bench == "csqa":
            assert item["gold"] == row["answerKey"]
            for label, text in zip(row["choices"]["label"], row["choices"]["text"]):
                assert f"\n({label}) {text}" in item["question"]
        elif bench == "strategyqa":
            assert item["gold"] == ("yes" if row["answer"] else "no")
        else:  # gpqa: the gold letter points at the correct answer, the four options are all there
            shown = dict(line[1:].split(") ", 1) for line in item["question"].split("\n\n")[1].splitlines())
            assert shown[item["gold"]] == row["Correct Answer"].strip()
            assert sorted(shown.values()) == sorted(row[f].strip() for f in ev.BENCHES["gpqa"]["fields"][1:])
        kind, no_template = ev.BENCHES[bench]["kind"], types.SimpleNamespace(chat_template=None)
        plain = eval_prompt(item["question"], kind) + "\n\nSolution:\n"  # as mind.py trains without a template
        assert ev.format_prompt(no_template, item["question"], kind) == plain


def test_gpqa_shuffle_is_seeded_and_recorded():
    local = ev.parse_local([str(FIX)])
    a, _, _ = ev.load_bench("gpqa", local, seed=0)
    b, _, _ = ev.load_bench("gpqa", local, seed=0)
    assert [(x["gold"], x["options"]) for x in a] == [(x["gold"], x["options"]) for x in b]
    assert [x["shuffle_seed"] for x in a] == [f"0:{i}" for i in range(len(a))]
    golds_over_seeds = {ev.load_bench("gpqa", local, seed=s)[0][0]["gold"] for s in range(12)}
    assert len(golds_over_seeds) > 1  # the correct option does not stay in one place
    assert len({x["gold"] for x in a}) > 1


def run_cli(*args, cwd):
    return subprocess.run([sys.executable, str(HERE / "evaluate.py"), *map(str, args)], capture_output=True,
                          text=True, cwd=cwd)


def one_error_line(r) -> str:
    """The CLI's stderr when it refuses its input: exit status 2, one line, no traceback."""
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr
    lines = [l for l in r.stderr.splitlines() if l.strip()]
    assert len(lines) == 1, r.stderr
    return lines[0]


GSM = [json.dumps({"question": "1+1?", "answer": "2\n#### 2"}).encode(),
       json.dumps({"question": "2+2?", "answer": "4\n#### 4"}).encode()]
PREFIX = '{"question": "Où '.encode()  # 17 characters, 18 bytes: columns count characters
NO_VALUE = '{"question": "3+3?", "answer": '  # JSON's column of the error: the character after this


# (file name, its bytes, the line and what the message must say about it)
BAD_FILES = [
    ("gsm8k.jsonl", b"\n".join(GSM + [PREFIX + b'\xff?", "answer": "#### 1"}']) + b"\n",
     3, f"not valid UTF-8 (byte 0xff at column {len(PREFIX.decode()) + 1})"),
    ("gsm8k.jsonl", b"\n".join(GSM + [NO_VALUE.encode() + b"}"]) + b"\n",
     3, f"not valid JSON (Expecting value, column {len(NO_VALUE) + 1})"),
    ("gsm8k.jsonl", b"\n".join(GSM[:1] + [b"", b'["3+3?", "#### 6"]']) + b"\n",
     3, "expected a JSON object, got list"),
    ("gsm8k.jsonl", b"\n".join(GSM + [b'{"question": ["3+3?"], "answer": "#### 6"}']) + b"\n",
     3, "field 'question' must be a string, got list"),
    ("strategyqa.jsonl", b'{"question": "Is ice cold?", "answer": 1}\n',
     1, "field 'answer' must be true/false or yes/no, got int"),
    ("gsm8k.jsonl", b"\n".join(GSM + [b'{"question": "3+3?", "answer": "6"}']) + b"\n",
     3, "field 'answer' has no '#### <number>' line"),  # a value that cannot be read still stops the run
    ("gpqa.csv", b"Question,Correct Answer,Incorrect Answer 1,Incorrect Answer 2,Incorrect Answer 3\n"
                 b"Q1?,a,b,c,d\n" b"Q2?,caf\xe9,b,c,d\n",  # Latin-1, not UTF-8
     3, f"not valid UTF-8 (byte 0xe9 at column {len('Q2?,caf') + 1})"),
]


@pytest.mark.parametrize("name, data, line, message", BAD_FILES,
                         ids=[f"{c[0]}-{c[3].split(' (')[0].split(',')[0]}" for c in BAD_FILES])
def test_bad_local_file_is_one_line_naming_file_and_line(tmp_path, name, data, line, message):
    bad = tmp_path / name
    bad.write_bytes(data)
    bench = name.split(".")[0]
    r = run_cli("--bench", bench, "--local", f"{bench}={bad}", "--out", tmp_path / "eval", cwd=tmp_path)
    assert one_error_line(r) == f"error: {bad}:{line}: {message}"
    assert not (tmp_path / "eval").exists()  # refused before any model


def test_bad_benchmark_name_and_json_array_items(tmp_path):
    assert "nope" in one_error_line(run_cli("--bench", "math500,nope", cwd=tmp_path))
    arr = tmp_path / "gsm8k.json"
    arr.write_text(json.dumps([{"question": "1+1?", "answer": "#### 2"}, "2+2?"]), encoding="utf-8")
    r = run_cli("--bench", "gsm8k", "--local", f"gsm8k={arr}", cwd=tmp_path)
    assert one_error_line(r) == f"error: {arr}: item 2: expected a JSON object, got str"


def test_jsonl_lines_end_at_newline_only(tmp_path):
    """U+2028 is a line break to str.splitlines but may stand unescaped inside a JSON string; CRLF works."""
    rows = [{"question": "Two\u2028lines: 1+1?", "answer": "#### 2"}, {"question": "2+2?", "answer": "#### 4"}]
    f = tmp_path / "gsm8k.jsonl"
    f.write_bytes(b"".join(json.dumps(r, ensure_ascii=False).encode() + b"\r\n" for r in rows))
    items, _, skipped = ev.load_bench("gsm8k", {"gsm8k": str(f)}, seed=0)
    assert [it["question"] for it in items] == [r["question"] for r in rows] and skipped == []


def test_csv_byte_order_mark_and_unreadable_parquet(tmp_path):
    f = tmp_path / "gpqa.csv"  # as a spreadsheet saves it: the BOM would otherwise join the first column's name
    f.write_bytes(b"\xef\xbb\xbfRecord ID,Question,Correct Answer,Incorrect Answer 1,Incorrect Answer 2,"
                  b"Incorrect Answer 3\r\nr1,Q1?,a,b,c,d\r\n")
    items, _, _ = ev.load_bench("gpqa", {"gpqa": str(f)}, seed=0)
    assert [it["id"] for it in items] == ["r1"]
    f = tmp_path / "gsm8k.parquet"
    f.write_bytes(b"PAR1 but cut short")
    with pytest.raises(ev.EvalError) as e:
        ev.read_local(f)
    assert str(e.value).startswith(f"{f}: not a readable Parquet file (") and "\n" not in str(e.value)


def test_bad_results_files_are_one_line(tmp_path, random_student):
    good = {"label": "m", "settings": {"limit": 0}, "benchmarks": {"gsm8k": {
        "source": "s", "n": 1, "correct": 1, "unparsed": 0, "accuracy": 100.0, "items": [{"question": "q"}]}}}
    cases = [(b'{"label": "m",\n "settings": \xfe}', ":2: not valid UTF-8 (byte 0xfe at column 14)"),
             (b'{"label": "m",\n "settings": }', ":2: not valid JSON (Expecting value, column 14); "
                                                 "not a results file of evaluate.py"),
             (b"[1]", ": expected a JSON object, got list; not a results file of evaluate.py (OUT/<row>.json)"),
             (json.dumps({**good, "benchmarks": {"gsm8k": {**good["benchmarks"]["gsm8k"], "n": "1"}}}).encode(),
              ": benchmarks.gsm8k: field 'n' is missing or not an integer; not a results file of evaluate.py "
              "(OUT/<row>.json)")]
    for data, message in cases:
        f = tmp_path / "row.json"
        f.write_bytes(data)
        assert one_error_line(run_cli("--table", f, cwd=tmp_path)) == f"error: {f}{message}"
    f.write_text(json.dumps(good), encoding="utf-8")  # the same file, well formed: one table
    r = run_cli("--table", f, cwd=tmp_path)
    assert r.returncode == 0 and "| m | – | 1/1 (0) |" in r.stdout, r.stderr
    assert one_error_line(run_cli("--table", tmp_path / "none.json", cwd=tmp_path)) == \
        f"error: {tmp_path / 'none.json'}: cannot read it (No such file or directory)"

    # A rerun reads the row's earlier results file (to reuse it): a broken one is named, not a traceback.
    path, _, _ = random_student
    out = tmp_path / "eval"
    out.mkdir()
    row = out / (re.sub(r"[^A-Za-z0-9._-]+", "_", str(path)).strip("_") + ".json")  # OUT/<row>.json
    row.write_bytes(b'{"label": "m", "settings": {}, "benchmarks": {"gsm8k": [1]}}')
    with pytest.raises(ev.EvalError) as e:
        ev.main(["--student", str(path), "--bench", "gsm8k", "--local", str(FIX), "--out", str(out)])
    assert str(e.value) == (f"{row}: benchmarks.gsm8k: expected an object, got list; not a results file of "
                            "evaluate.py (OUT/<row>.json); move that file away or choose another --out")


def test_gated_gpqa_is_one_clear_message(monkeypatch):
    import datasets
    from datasets.exceptions import DatasetNotFoundError

    def gated(*a, **k):  # what datasets raises for Idavidrein/gpqa without a token
        raise DatasetNotFoundError("Dataset 'Idavidrein/gpqa' is a gated dataset on the Hub. "
                                   "You must be authenticated to access it.")
    monkeypatch.setattr(datasets, "load_dataset", gated)
    with pytest.raises(ev.EvalError) as e:
        ev.load_bench("gpqa", {}, seed=0)
    msg = str(e.value)
    assert "\n" not in msg and "gated" in msg and "HF_TOKEN" in msg and "--local gpqa=FILE" in msg


# Rows with an empty or missing field: skipped, counted and listed, never an abort of the benchmark.
GPQA_HEADER = ["Record ID", "Question", "Correct Answer", "Incorrect Answer 1", "Incorrect Answer 2",
               "Incorrect Answer 3"]
GPQA_ROWS = [["r1", "Q1?", "right1", "w1", "w2", "w3"],
             ["r2", "Q2?", "", "w1", "w2", "w3"],           # an empty answer cell
             ["r3", "Q3?", "right3", "w1", "  ", "w3"],     # an empty choice cell (white space only)
             ["r4", "Q4?", "right4", "w1", "w2", "w3"]]


def write_csv(path, header, rows):
    with open(path, "w", newline="", encoding="utf-8") as fh:
        csv.writer(fh).writerows([header, *rows])


def write_skip_fixtures(folder):
    """A GPQA and a MATH500 file in which some rows lack a field they need; returns their paths."""
    gpqa, math = folder / "gpqa.csv", folder / "math500.jsonl"
    write_csv(gpqa, GPQA_HEADER, GPQA_ROWS)
    math.write_text("".join(json.dumps(r) + "\n" for r in [
        {"problem": "What is 1+1?", "answer": "2", "unique_id": "m1"},
        {"problem": "   ", "answer": "3", "unique_id": "m2"},           # a blank problem
        {"problem": "What is 2+2?", "unique_id": "m3"},                 # no answer at all
        {"problem": "What is 3+3?", "answer": None, "unique_id": "m4"},  # a null answer
        {"problem": "What is 0+0?", "answer": 0, "unique_id": "m5"}]), encoding="utf-8")  # 0 is an answer
    return gpqa, math


def test_rows_with_empty_or_missing_fields_are_skipped_and_listed(tmp_path):
    gpqa, math = write_skip_fixtures(tmp_path)
    items, source, skipped = ev.load_bench("gpqa", {"gpqa": str(gpqa)}, seed=0)
    assert source == str(gpqa) and [it["id"] for it in items] == ["r1", "r4"]
    assert skipped == [dict(index=1, where=f"{gpqa}:3", id="r2", reason="empty field 'Correct Answer'"),
                       dict(index=2, where=f"{gpqa}:4", id="r3", reason="empty field 'Incorrect Answer 2'")]
    # the questions left keep their row's index, so their option shuffle is the one of the full file
    assert [it["shuffle_seed"] for it in items] == ["0:0", "0:3"]
    for it, row in zip(items, (GPQA_ROWS[0], GPQA_ROWS[3])):
        assert it["options"]["ABCD".index(it["gold"])] == row[2] and sorted(it["options"]) == sorted(row[2:])

    items, _, skipped = ev.load_bench("math500", {"math500": str(math)}, seed=0)
    assert [(it["id"], it["gold"]) for it in items] == [("m1", "2"), ("m5", "0")]
    assert [(s["where"], s["id"], s["reason"]) for s in skipped] == [
        (f"{math}:2", "m2", "empty field 'problem'"), (f"{math}:3", "m3", "missing field 'answer'"),
        (f"{math}:4", "m4", "empty field 'answer'")]
    assert ev.skip_summary(skipped, shown=1) == (f"empty field 'problem' in 1 row ({math}:2); missing field "
                                                 f"'answer' in 1 row ({math}:3); empty field 'answer' in 1 row "
                                                 f"({math}:4)")

    csqa = tmp_path / "csqa.jsonl"  # an empty choice inside CSQA's choices; StrategyQA: false is an answer
    choices = {"label": ["A", "B", "C"], "text": ["cupboard", "", "oven"]}
    csqa.write_text(json.dumps({"id": "c1", "question": "Cold?", "choices": choices, "answerKey": "A"}) + "\n",
                    encoding="utf-8")
    with pytest.raises(ev.EvalError) as e:  # its only row skipped: nothing left to score is an error
        ev.load_bench("csqa", {"csqa": str(csqa)}, seed=0)
    assert str(e.value) == (f"csqa: no question to score in {csqa}, all 1 rows skipped: empty choice B in field "
                            f"'choices' in 1 row ({csqa}:1) (csqa rows follow tau/commonsense_qa: question, "
                            "choices, answerKey)")
    sqa = tmp_path / "strategyqa.jsonl"
    sqa.write_text(json.dumps({"qid": "s1", "question": "Hot ice?", "answer": False}) + "\n"
                   + json.dumps({"qid": "s2", "question": "Cold ice?", "answer": ""}) + "\n", encoding="utf-8")
    items, _, skipped = ev.load_bench("strategyqa", {"strategyqa": str(sqa)}, seed=0)
    assert [it["gold"] for it in items] == ["no"] and [s["id"] for s in skipped] == ["s2"]


def test_skipped_rows_stay_out_of_the_denominator_and_show_in_the_table():
    items = [{"gold": "3"}, {"gold": "4"}, {"gold": "5"}]
    skipped = [dict(index=3, where="f:4", id=3, reason="empty field 'answer'"),
               dict(index=5, where="f:6", id=5, reason="missing field 'question'")]
    r = ev.score("gsm8k", items, ["\\boxed{3}", "no idea", "\\boxed{6}"], skipped)
    assert (r["n_total"], r["n_scored"], r["n_skipped"], r["n"]) == (5, 3, 2, 3)
    assert (r["correct"], r["unparsed"]) == (1, 1) and r["accuracy"] == pytest.approx(100 / 3)  # unparsed: wrong
    assert r["skipped"] == skipped

    def row(label, skips):
        return {"label": label, "settings": {"limit": 0}, "benchmarks": {"gsm8k": {
            "accuracy": 100 / 3, "correct": 1, "n": 3, "unparsed": 1, "n_skipped": skips}}}
    note = "Skipped: rows with an empty or missing field"
    table = ev.markdown_table([row("base", 0), row("tuned", 2)])
    assert "| base | – | 1/3 (1) | – |" in table and "| tuned | – | 1/3 (1), 2 skipped | – |" in table
    assert note in table
    none_skipped = ev.markdown_table([row("base", 0)])
    assert note not in none_skipped and "skipped" not in none_skipped


# ----------------------------------------------------------------------------------------------------
# Generation
def tokens_per_s_fits(stats) -> bool:
    """tokens_per_s (rounded to 0.1) agrees with new_tokens / gen_seconds, gen_seconds being rounded to 1 ms:
    on a fast run that rounding alone moves the quotient by several percent."""
    n, g = stats["new_tokens"], stats["gen_seconds"]
    return n / (g + 5e-4) - 0.05 <= stats["tokens_per_s"] <= n / max(g - 5e-4, 1e-9) + 0.05


@pytest.fixture(scope="module")
def random_student(tmp_path_factory):
    """A tiny GPT-2 with large random weights (prompt-dependent greedy text), whose own
    generation_config asks for sampling and a repetition penalty that evaluate.py must not apply."""
    import mind
    texts = [r["problem"] for r in mind.load_data(HERE / "data" / "sample.jsonl")]
    model, tok, _ = mind.build_tiny(texts, seed=0)
    torch.manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.3)
        model.transformer.wte.weight[tok.eos_token_id] = 0.0  # never stop early (tied LM head: logit 0)
    model.generation_config.do_sample, model.generation_config.temperature = True, 0.7
    model.generation_config.repetition_penalty = 3.0
    path = tmp_path_factory.mktemp("random-student")
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path, model, tok


def test_batched_left_padded_generation_is_plain_greedy(random_student):
    path, model, tok = random_student
    tok = ev.load_tokenizer(str(path))
    questions = ["Solve 2+2.", "A much longer question about apples, pears and 1, 2, 3 plums.", "x", "Is 7 prime?"]
    ids = ev.encode_prompts(tok, [ev.format_prompt(tok, q, "math") for q in questions])
    assert len({len(i) for i in ids}) > 1  # different lengths, so the batch is padded

    def argmax_loop(prompt, n=10):  # greedy decoding by hand, one unpadded sequence at a time
        x, out = torch.tensor([prompt]), []
        for _ in range(n):
            with torch.no_grad():
                nxt = model(x).logits[0, -1].argmax().item()
            out.append(nxt)
            x = torch.cat([x, torch.tensor([[nxt]])], 1)
        return tok.decode(out, skip_special_tokens=True)
    expected = [argmax_loop(i) for i in ids]
    assert len(set(expected)) > 1
    for decode in ("plain", "fast"):
        for batch_size in (4, 3):  # one batch; two, the second filled up with a copy on the fast path
            texts, stats = ev.hf_generator(str(path), None, tok, 10, batch_size, decode)(ids, "test")
            assert texts == expected, (decode, batch_size)
            assert stats["new_tokens"] == 10 * len(ids)  # the copy is not counted
            assert stats["decode"] == decode and stats["batch_size"] == batch_size and not stats["compiled"]  # CPU
            assert tokens_per_s_fits(stats)


@pytest.fixture(scope="module")
def random_qwen2():
    """A tiny Qwen2 (the paper's student family: grouped KV heads, rotary positions), random weights, fp32."""
    from transformers import AutoModelForCausalLM, Qwen2Config
    torch.manual_seed(0)
    config = Qwen2Config(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.3)  # large weights: greedy text that depends on the prompt
    return model


@pytest.mark.parametrize("arch", ["gpt2", "qwen2"])
def test_fast_path_gives_the_plain_path_completions_token_for_token(arch, random_student, random_qwen2):
    """The fast path's own code (fill-up copies, widths rounded up to 64, static cache reused and regrown) against
    the plain path, on CPU in fp32: prompts of 3 to 130 tokens, batches of other sizes and widths, rows that stop
    early at eos and rows that run to the end."""
    model = random_student[1] if arch == "gpt2" else random_qwen2
    vocab = model.config.vocab_size
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(1, vocab, (n,), generator=g).tolist() for n in (3, 70, 12, 40, 5, 66, 20)]
    longer = [torch.randint(1, vocab, (n,), generator=g).tolist() for n in (130, 9)]  # needs a larger cache
    plain_ids, plain_new = ev.make_decoder(model, 12, 3, False, None, 0)(prompts)
    assert plain_new == 12 * len(prompts) and all(len(r) == 12 for r in plain_ids)
    assert len({tuple(r) for r in plain_ids}) == len(prompts)  # prompt-dependent completions

    # An "eos" that some completions produce after a few tokens and others never: rows end at different steps.
    def first(row, t):
        return row.index(t) if t in row else None
    eos = next(t for t in sorted({t for r in plain_ids for t in r})
               if any((first(r, t) or 0) >= 2 for r in plain_ids) and any(t not in r for r in plain_ids))
    expected = [r[:first(r, eos)] if eos in r else r for r in plain_ids]  # greedy: the same text, cut at eos
    assert 0 < sum(len(r) < 12 for r in expected) < len(prompts)

    for batch_size in (2, 16):  # 7 prompts in 4 batches (widths 128 and 64, a copy) or in one, mostly copies
        fast = ev.make_decoder(model, 12, batch_size, True, [eos], 0)
        ids, new = fast(prompts)
        assert ids == expected, batch_size
        assert new == sum(len(r) + (len(r) < 12) for r in expected)  # eos itself is a generated token
        assert fast(longer)[0] == ev.make_decoder(model, 12, 3, False, [eos], 0)(longer)[0]
        assert fast(prompts)[0] == expected  # after the cache was regrown
    assert ev.make_decoder(model, 12, 3, False, eos, 0)(prompts)[0] == expected


def test_batches_padding_and_memory_arithmetic():
    lengths = [5, 70, 12, 70, 3]
    assert ev.plan_batches(lengths, 2, fill=False) == [[1, 3], [2, 0], [4]]  # longest first, stable
    assert ev.plan_batches(lengths, 2, fill=True) == [[1, 3], [2, 0], [4, 4]]  # one shape: topped up with a copy
    assert ev.plan_batches(lengths, 8, fill=True) == [[1, 3, 2, 0, 4, 4, 4, 4]]
    ids, mask = ev.left_pad([[7, 8, 9], [5]], 4, pad_id=0)
    assert ids.tolist() == [[0, 7, 8, 9], [0, 0, 0, 5]] and mask.tolist() == [[0, 1, 1, 1], [0, 0, 0, 1]]
    assert [ev.round_up(n) for n in (1, 64, 65, 300)] == [64, 64, 128, 320]

    # Qwen2.5-1.5B: 28 layers x 2 (K, V) x 2 KV heads x 128 dims x 2 bytes (bf16) = 28,672 bytes per cached token.
    qwen = types.SimpleNamespace(num_hidden_layers=28, num_attention_heads=12, num_key_value_heads=2,
                                 hidden_size=1536, intermediate_size=8960, vocab_size=151936)
    logits = 2 * 151936 * 4
    assert ev.row_bytes(qwen, 0, 1000, 2) == 28_672 * 1000 + logits
    prefill = 10 * (4 * 1536 + 3 * 8960) * 2 + 10 * 1000 * 2  # one layer's activations, the mask: 10 prompt tokens
    assert ev.row_bytes(qwen, 10, 1000, 2) - ev.row_bytes(qwen, 0, 1000, 2) == prefill
    per_row = ev.row_bytes(qwen, 300, 320 + 2048, 2)
    assert ev.auto_batch_size(qwen, 2, 80 * 2**30, 300, 2048) == ev.MAX_AUTO_BATCH  # an empty H100: the cap
    n = ev.auto_batch_size(qwen, 2, 10 * 2**30, 300, 2048)
    assert n % 8 == 0 and n * per_row <= 0.8 * 10 * 2**30 < (n + 8) * per_row  # the most that fits, a multiple of 8
    assert ev.auto_batch_size(qwen, 2, 3 * per_row, 300, 2048) == 2  # below 8: not rounded
    with pytest.raises(ev.EvalError, match="--max-new-tokens"):
        ev.auto_batch_size(qwen, 2, per_row, 300, 2048)


def test_out_of_memory_is_one_clear_message(random_qwen2, monkeypatch):
    def oom(*a, **k):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
    monkeypatch.setattr(random_qwen2, "generate", oom)
    with pytest.raises(ev.EvalError) as e:
        ev.make_decoder(random_qwen2, 8, 64, True, None, 0)([[1, 2, 3]])
    assert "\n" not in str(e.value) and "--batch-size 32" in str(e.value) and "64 prompts" in str(e.value)


def test_speed_test_prints_one_table(capsys):
    rows = ev.main(["--speed-test", "--speed-shape", "tiny", "--speed-prompts", "10", "--speed-new-tokens", "6",
                    "--batch-size", "4"])
    assert [(r["path"], r["batch"]) for r in rows] == [("plain", 16), ("plain", 4), ("fast", 4)]
    for r in rows:  # every path generates exactly prompts x new tokens (no eos)
        assert r["tokens_per_s"] * r["wall_s"] == pytest.approx(10 * 6)
        assert r["first_batch_s"] > 0 and r["peak_gib"] is None  # no GPU here
        table1_batches = sum(-(-b["size"] // r["batch"]) for b in ev.BENCHES.values())
        assert r["table1_min"] * 60 >= table1_batches * r["wall_s"] / -(-10 // r["batch"]) - 1e-9
    lines = [l for l in capsys.readouterr().out.splitlines() if l.startswith("|")]
    assert lines[0].startswith("| path | batch | new tokens/s | wall s | first batch (compile) s | peak GPU GiB |")
    assert len(lines) == 2 + len(rows) and all(l.count("|") == lines[0].count("|") for l in lines)
    assert lines[2].split("|")[7].strip() == "1.0"  # speed relative to the first row
    assert ev.main(["--speed-test", "--speed-shape", "tiny", "--speed-prompts", "3", "--speed-new-tokens", "2",
                    "--speed-paths", "fast"])[0]["path"] == "fast"


def test_speed_test_vllm_path_with_a_stand_in_module(monkeypatch):
    """vLLM's documented offline API: LLM(model=folder, skip_tokenizer_init=True), SamplingParams(ignore_eos=True)."""
    calls = {}

    class LLM:
        def __init__(self, **kw):
            calls.update(init=kw, config=json.loads((Path(kw["model"]) / "config.json").read_text()))

        def generate(self, prompts, params, use_tqdm=True):
            calls.update(prompts=prompts, params=params)
            return [types.SimpleNamespace(outputs=[types.SimpleNamespace(token_ids=[0] * params["max_tokens"])])
                    for _ in prompts]
    vllm = types.ModuleType("vllm")
    vllm.LLM, vllm.SamplingParams = LLM, lambda **kw: kw
    monkeypatch.setitem(sys.modules, "vllm", vllm)
    rows = ev.main(["--speed-test", "--speed-shape", "tiny", "--speed-prompts", "5", "--speed-new-tokens", "3",
                    "--speed-paths", "vllm,fast", "--batch-size", "2"])
    assert [(r["path"], r["batch"]) for r in rows] == [("fast", 2), ("vllm", None)]  # vLLM last
    assert calls["config"]["hidden_size"] == ev.SPEED_SHAPES["tiny"]["hidden_size"]  # the same student, saved
    assert calls["init"]["skip_tokenizer_init"] is True and calls["init"]["max_model_len"] >= 300 + 3
    assert calls["params"] == dict(temperature=0.0, max_tokens=3, ignore_eos=True)
    assert len(calls["prompts"]) == 5 and 80 <= len(calls["prompts"][0]["prompt_token_ids"]) <= 300
    assert rows[1]["tokens_per_s"] * rows[1]["wall_s"] == pytest.approx(5 * 3)
    monkeypatch.setitem(sys.modules, "vllm", None)
    with pytest.raises(ev.EvalError, match="pip install vllm"):
        ev.main(["--speed-test", "--speed-shape", "tiny", "--speed-prompts", "2", "--speed-paths", "vllm"])


def test_chat_template_is_used_when_there_is_one(random_student):
    path, _, _ = random_student
    tok = ev.load_tokenizer(str(path))
    tok.chat_template = ("{% for m in messages %}<|user|>{{ m['content'] }}{% endfor %}"
                         "{% if add_generation_prompt %}<|assistant|>{% endif %}")
    expected = f"<|user|>{eval_prompt('Is 7 prime?', 'yesno')}<|assistant|>"
    assert ev.format_prompt(tok, "Is 7 prime?", "yesno") == expected


def test_vllm_missing_is_one_clear_message(monkeypatch):
    monkeypatch.setitem(sys.modules, "vllm", None)  # makes `import vllm` fail, installed or not
    with pytest.raises(ev.EvalError, match="pip install vllm"):
        ev.vllm_generator("some/model", None, None, 16, 0)


def test_vllm_path_with_a_stand_in_module(monkeypatch, tmp_path, random_student):
    """Checks our calls against vLLM's documented offline API: LLM(model, enable_lora, max_lora_rank),
    SamplingParams(temperature=0 ...), LLM.generate([{'prompt_token_ids': ...}], params, lora_request=...)."""
    path, _, tok = random_student
    calls = {}

    class LLM:
        def __init__(self, **kw):
            calls.update(init=kw, llm=weakref.ref(self))

        def generate(self, prompts, params, use_tqdm=True, lora_request=None):
            calls.update(prompts=prompts, params=params, lora=lora_request)
            return [types.SimpleNamespace(outputs=[types.SimpleNamespace(text=f"out{len(p['prompt_token_ids'])}",
                                                                         token_ids=p["prompt_token_ids"][::-1])])
                    for p in prompts]
    vllm = types.ModuleType("vllm")
    vllm.LLM, vllm.SamplingParams = LLM, lambda **kw: kw
    lora_mod = types.ModuleType("vllm.lora.request")
    lora_mod.LoRARequest = lambda name, id_, path: (name, id_, path)
    for name, mod in [("vllm", vllm), ("vllm.lora", types.ModuleType("vllm.lora")), ("vllm.lora.request", lora_mod)]:
        monkeypatch.setitem(sys.modules, name, mod)
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"r": 12}))  # vLLM wants 8, 16, 32, ...
    gen = ev.vllm_generator(str(path), str(adapter), tok, 33, seed=0)
    texts, stats = gen([[1, 2, 3], [4]], "test")
    assert texts == ["out3", "out1"]
    assert stats["new_tokens"] == 4 and stats["decode"] == "vllm"  # CompletionOutput.token_ids: the new tokens
    assert calls["prompts"] == [{"prompt_token_ids": [1, 2, 3]}, {"prompt_token_ids": [4]}]
    assert calls["params"]["temperature"] == 0.0 and calls["params"]["max_tokens"] == 33
    assert calls["params"]["repetition_penalty"] == 1.0 and tok.eos_token_id in calls["params"]["stop_token_ids"]
    assert calls["init"]["enable_lora"] is True and calls["init"]["max_lora_rank"] == 16  # rounded up
    assert calls["lora"] == ("adapter", 1, str(adapter.resolve()))
    assert calls["llm"]() is not None
    gen.close()  # the next row's engine needs the GPU memory: this one lets its LLM go
    assert calls["llm"]() is None


# ----------------------------------------------------------------------------------------------------
# End to end: mind.py trains the tiny student, evaluate.py puts it and its adapter into the table.
@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("e2e")
    lines = (HERE / "data" / "sample.jsonl").read_text(encoding="utf-8").splitlines()[:6]
    (tmp / "data.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    r = subprocess.run([sys.executable, str(HERE / "mind.py"), "--student", "tiny", "--data", str(tmp / "data.jsonl"),
                        "--out", str(tmp / "run"), "--epochs", "1"], capture_output=True, text=True, cwd=tmp)
    assert r.returncode == 0, r.stderr[-2000:]
    return tmp


def run_eval(tmp, *extra):
    cmd = [sys.executable, str(HERE / "evaluate.py"), "--student", str(tmp / "run" / "tiny-student"),
           "--adapter", str(tmp / "run" / "adapter"), "--with-base", "--bench", "all", "--local", str(FIX),
           "--max-new-tokens", "8", "--batch-size", "4", "--out", str(tmp / "eval"), *extra]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=tmp)


def test_end_to_end_tiny_student(trained):
    r = run_eval(trained)
    assert r.returncode == 0, r.stderr[-3000:]
    files = sorted((trained / "eval").glob("*.json"))
    assert len(files) == 2  # the base student and the student + adapter
    for f in files:
        res = json.loads(f.read_text(encoding="utf-8"))
        assert list(res["benchmarks"]) == list(ev.BENCHES)
        for bench, b in res["benchmarks"].items():
            raw = fixture_rows(bench)
            assert b["n"] == len(raw) == len(b["items"])  # every question, none dropped
            assert b["correct"] == sum(it["correct"] for it in b["items"])
            assert b["unparsed"] == sum(it["extracted"] is None for it in b["items"])
            assert b["accuracy"] == pytest.approx(100 * b["correct"] / b["n"])
            for it in b["items"]:
                assert eval_prompt(it["question"], ev.BENCHES[bench]["kind"]) in it["prompt"]
                assert isinstance(it["completion"], str)
                assert it["extracted"] == ev.extract_answer(bench, it["completion"])
                assert it["correct"] == ev.is_correct(bench, it["completion"], it["gold"])
            # how it was generated: one eos at most per question, at most --max-new-tokens
            assert (b["decode"], b["batch_size"], b["compiled"]) == ("fast", 4, False)
            assert b["n"] <= b["new_tokens"] <= 8 * b["n"] and b["gen_seconds"] > 0
            assert tokens_per_s_fits(b)
    assert r.stderr.count("new tok/s") >= 12  # a progress bar per benchmark and row
    table = (trained / "eval" / "table.md").read_text(encoding="utf-8").splitlines()
    assert table[0] == "| Model | MATH500 | GSM8K | SVAMP | ID Avg | CSQA | StrategyQA | GPQA-D | OOD Avg |"
    rows = [l for l in table[2:] if l.startswith("| ")][:2]
    assert rows[0].startswith(f"| {trained / 'run' / 'tiny-student'} | ")
    assert rows[1].startswith(f"| {trained / 'run' / 'tiny-student'} + {trained / 'run' / 'adapter'} | ")
    assert all(len(row.split("|")) == 11 for row in rows)  # model + 8 columns, between 10 bars
    assert all(any(a in c for a in "↑↓±") for c in rows[1].split("|")[2:-1])  # gains over the base row

    # A rerun with the same settings reuses every finished benchmark; other settings are refused.
    again = run_eval(trained)
    assert again.returncode == 0 and again.stdout.count("reused") == 12
    other = run_eval(trained, "--seed", "1")
    assert other.returncode == 2 and "other settings" in other.stderr and "Traceback" not in other.stderr

    # The decoding path of evaluate.py before issue 11 gives the same completions, with batches of other sizes.
    plain = run_eval(trained, "--decode", "plain", "--batch-size", "3", "--out", str(trained / "eval-plain"))
    assert plain.returncode == 0, plain.stderr[-3000:]
    for f in files:
        fast_run, plain_run = (json.loads((d / f.name).read_text(encoding="utf-8"))
                               for d in (f.parent, trained / "eval-plain"))
        assert list(plain_run["benchmarks"]) == list(ev.BENCHES)
        for bench, b in plain_run["benchmarks"].items():
            completions = [[it["completion"] for it in r["benchmarks"][bench]["items"]] for r in (fast_run, plain_run)]
            assert b["decode"] == "plain" and completions[0] == completions[1]


def test_skipped_rows_end_to_end(random_student, tmp_path, capsys):
    """main(): one warning per benchmark with skipped rows, the counts in the results file and the table,
    a rerun that reuses them, and a fixed row that is scored on the next run."""
    path, _, _ = random_student
    gpqa, math = write_skip_fixtures(tmp_path)
    argv = ["--student", str(path), "--bench", "math500,gpqa", "--local", str(tmp_path), "--max-new-tokens", "2",
            "--batch-size", "4", "--out", str(tmp_path / "eval")]
    [res] = ev.main(argv)
    out, err = capsys.readouterr()
    assert [l for l in err.splitlines() if l.startswith("warning:")] == [
        f"warning: math500: 3 of 5 rows skipped, not scored: empty field 'problem' in 1 row ({math}:2); "
        f"missing field 'answer' in 1 row ({math}:3); empty field 'answer' in 1 row ({math}:4)",
        f"warning: gpqa: 2 of 4 rows skipped, not scored: empty field 'Correct Answer' in 1 row ({gpqa}:3); "
        f"empty field 'Incorrect Answer 2' in 1 row ({gpqa}:4)"]
    assert "unparsed, 3 rows skipped)" in out and "unparsed, 2 rows skipped)" in out
    saved = json.loads(Path(res["path"]).read_text(encoding="utf-8"))
    for bench, total, skipped_ids in (("math500", 5, ["m2", "m3", "m4"]), ("gpqa", 4, ["r2", "r3"])):
        b = saved["benchmarks"][bench]
        n_skipped = len(skipped_ids)
        assert (b["n_total"], b["n_skipped"], b["n_scored"]) == (total, n_skipped, total - n_skipped)
        assert b["n"] == b["n_scored"] == len(b["items"]) and [s["id"] for s in b["skipped"]] == skipped_ids
        assert all(s["reason"].startswith(("empty field", "missing field")) for s in b["skipped"])
        assert b["accuracy"] == pytest.approx(100 * sum(it["correct"] for it in b["items"]) / b["n_scored"])
    table = (tmp_path / "eval" / "table.md").read_text(encoding="utf-8")
    counts = next(l for l in table.splitlines() if l.startswith(f"| {path} | ") and "/" in l.split("|")[2])
    cells = [c.strip() for c in counts.strip("|").split("|")]
    b = saved["benchmarks"]
    assert cells[1] == f"{b['math500']['correct']}/2 ({b['math500']['unparsed']}), 3 skipped"
    assert cells[6] == f"{b['gpqa']['correct']}/2 ({b['gpqa']['unparsed']}), 2 skipped"
    assert cells[2] == "–" and "Skipped: rows with an empty or missing field" in table

    ev.main(argv)  # the same files: both benchmarks reused, skipped rows and all
    assert capsys.readouterr().out.count("reused") == 2
    rows = [list(r) for r in GPQA_ROWS]
    rows[1][2] = "right2"  # the empty answer cell filled in: that question is asked now
    write_csv(gpqa, GPQA_HEADER, rows)
    [res] = ev.main(argv)
    assert capsys.readouterr().out.count("reused") == 1
    g = res["benchmarks"]["gpqa"]
    assert (g["n_total"], g["n_scored"], g["n_skipped"]) == (4, 3, 1)
    assert [s["id"] for s in g["skipped"]] == ["r3"]


def test_release_memory_collects_then_empties_the_cuda_cache(monkeypatch):
    calls = []
    monkeypatch.setattr(gc, "collect", lambda *a: calls.append("collect") or 0)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: calls.append("empty_cache"))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    ev.release_memory()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    ev.release_memory()
    assert calls == ["collect", "empty_cache", "collect"]


def test_each_row_frees_its_model_before_the_next_loads(trained, tmp_path, monkeypatch):
    """Two rows (the base student, then student + adapter). On CUDA, transformers keeps the compiled decoding
    step on the model (model._compiled_call = torch.compile(model.__call__)): a cycle through the model. The
    loader below makes that cycle on the CPU too, and records, when the second row loads its model, whether
    the first row's is still alive. Python's collector is off and evaluate.py's gc.collect() calls are
    recorded but do nothing: only letting go of every reference frees the model in time."""
    real_load, real_collect = ev.load_model, gc.collect
    student, adapter = trained / "run" / "tiny-student", trained / "run" / "adapter"

    probe = real_load(str(student), None)  # the cycle is real: reference counting alone does not free it
    probe.get_compiled_call(None)
    probe_ref = weakref.ref(probe)
    del probe
    assert probe_ref() is not None
    real_collect()
    assert probe_ref() is None

    models, seen, collects = [], [], []

    def load(student, adapter):
        seen.append(dict(adapter=adapter, alive=[m() is not None for m in models], collects=len(collects)))
        model = real_load(student, adapter)
        model.get_compiled_call(None)  # what generate() does on CUDA; nothing is compiled until it is called
        models.append(weakref.ref(model))
        return model
    monkeypatch.setattr(ev, "load_model", load)
    monkeypatch.setattr(gc, "collect", lambda *a, **k: collects.append(1) or 0)
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        ev.main(["--student", str(student), "--adapter", str(adapter), "--with-base", "--bench", "gsm8k",
                 "--local", f"gsm8k={FIX / 'gsm8k.jsonl'}", "--limit", "2", "--max-new-tokens", "2",
                 "--batch-size", "2", "--out", str(tmp_path / "eval")])
        alive_at_end = [m() is not None for m in models]
    finally:
        if was_enabled:
            gc.enable()
    assert [s["adapter"] for s in seen] == [None, str(adapter)]
    assert seen[1]["alive"] == [False]  # the base row's model was gone when the adapter row loaded its own
    assert seen[1]["collects"] >= 1     # and a collection was asked for in between (then the CUDA cache emptied)
    assert alive_at_end == [False, False]
