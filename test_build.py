"""Tests of data/build.py, offline: a small OpenAI-compatible server on 127.0.0.1 plays the teacher (and
the judge) with scripted replies, and data/fixtures/math_train_sample.jsonl (MATH's layout) replaces
the Hub.

    pytest -q test_build.py
    python test_build.py serve --port 8000     # the same fake teacher, to try build.py by hand

Every expectation is computed here independently of build.py: gold answers by our own brace matcher,
quotas by hand from Tables 6-7, request counts from the scripts below.
"""
import argparse, collections, importlib.util, json, os, re, signal, socket, subprocess, sys, threading, time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from prompts import PERSPECTIVE_KEYS, PERSPECTIVES

ROOT = Path(__file__).resolve().parent
FIXTURE = ROOT / "data" / "fixtures" / "math_train_sample.jsonl"
BUILD = ROOT / "data" / "build.py"
spec = importlib.util.spec_from_file_location("build", BUILD)
build = importlib.util.module_from_spec(spec)
spec.loader.exec_module(build)


def gold_of(solution: str) -> str:
    """The last \\boxed{...} of a solution, by a brace matcher of our own (not prompts.last_boxed)."""
    i = [m.end() for m in re.finditer(r"\\boxed\{", solution)][-1]
    depth = 1
    for j, ch in enumerate(solution[i:], i):
        depth += (ch == "{") - (ch == "}")
        if depth == 0:
            return solution[i:j].strip()
    raise AssertionError("unbalanced")


def fixture_rows():
    return [json.loads(line) for line in FIXTURE.read_text().splitlines() if line.strip()]


# ----------------------------------------------------------------------------------------------------
# The fake teacher. A script maps (problem, perspective, kind) to a list of behaviours, one per request
# (the last repeats); kind is "teacher" or "judge". Teacher behaviours: right, equiv (an equivalent but
# different form), wrong, nobox, length (finish_reason 'length'), empty, think (<think> block with a
# wrong box, then the right answer), dollar ('$\boxed{..}$.' plus trailing text), and the HTTP troubles
# 429 (Retry-After: 0), 429wait (Retry-After: 1), 500, 400, badjson (a 200 with a cut body).
# Judge behaviours: PASS, FAIL, none (no verdict line).
def equivalent_form(gold: str) -> str:
    if re.fullmatch(r"-?\d+", gold):
        return gold + ".0"
    if "\\frac" in gold:
        return gold.replace("\\frac", "\\dfrac")
    return "1 \\cdot " + gold


class FakeTeacher:
    def __init__(self, rows, script=None, delay=0.0, key=None, models=("fake-teacher", "fake-judge"),
                 models_route=True, port=0):
        self.gold = {r["problem"].strip(): gold_of(r["solution"]) for r in rows}
        self.script = script or (lambda problem, key, kind: ["PASS"] if kind == "judge" else ["right"])
        self.delay, self.key, self.models, self.models_route = delay, key, list(models), models_route
        self.requests = []                       # (kind, problem, perspective key, behaviour), in order
        self.seen = collections.Counter()
        self.lock = threading.Lock()
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def reply(self, code, body, headers=()):
                data = body if isinstance(body, bytes) else json.dumps(body).encode()
                self.send_response(code)
                for k, v in headers:
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                try:
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client is gone (a build killed on purpose)

            def authorized(self):
                if fake.key and self.headers.get("Authorization") != f"Bearer {fake.key}":
                    self.reply(401, {"error": {"message": "invalid API key"}})
                    return False
                return True

            def do_GET(self):
                if not self.authorized():
                    return
                if self.path == "/v1/models" and fake.models_route:
                    return self.reply(200, {"object": "list", "data": [{"id": m} for m in fake.models]})
                self.reply(404, {"error": {"message": "no such route"}})

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                if not self.authorized():
                    return
                if body["model"] not in fake.models:
                    return self.reply(404, {"error": {"message": f"model {body['model']} does not exist"}})
                time.sleep(fake.delay)
                code, out, headers = fake.answer(body["messages"][-1]["content"])
                self.reply(code, out, headers)

        self.server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()

    def answer(self, prompt):
        kind = "judge" if "VERDICT" in prompt else "teacher"
        problem = max((p for p in self.gold if p in prompt), key=len, default=None)
        key = next((k for k, (name, _) in PERSPECTIVES.items() if f"the {name} perspective" in prompt), None)
        if problem is None or key is None:  # e.g. the preflight's one-token probe
            return 200, {"choices": [{"message": {"content": "OK"}, "finish_reason": "stop"}]}, ()
        with self.lock:
            n = self.seen[problem, key, kind]
            self.seen[problem, key, kind] += 1
            steps = self.script(problem, key, kind)
            what = steps[min(n, len(steps) - 1)]
            self.requests.append((kind, problem, key, what))
        gold, name = self.gold[problem], PERSPECTIVES[key][0]
        if what in ("429", "429wait", "500", "400"):
            wait = [("Retry-After", "1" if what == "429wait" else "0")] if what.startswith("429") else []
            return int(what[:3]), {"error": {"message": f"scripted {what}"}}, wait
        if what == "badjson":
            return 200, b'{"choices": [{"message": {"content": "trunc', ()
        finish = "stop"
        content = {
            "right": f"{name} reasoning about the problem, step by step.\nSo the result is \\boxed{{{gold}}}",
            "equiv": f"{name} reasoning.\nThe result is \\boxed{{{equivalent_form(gold)}}}",
            "wrong": f"{name} reasoning with a slip.\nThe result is \\boxed{{987654321}}",
            "nobox": f"{name} reasoning that never states a boxed result.",
            "length": f"{name} reasoning that runs on and on \\boxed{{{gold}}}",
            "empty": "",
            "think": f"<think>draft: maybe \\boxed{{987654321}}</think>\n{name} reasoning.\nHence \\boxed{{{gold}}}",
            "dollar": f"{name} reasoning.\nThe answer is $\\boxed{{{gold}}}$.\nI hope this helps!",
            "PASS": "Every step holds and the perspective is followed.\nVERDICT: PASS",
            "FAIL": "Step 2 is unjustified.\nVERDICT: FAIL",
            "none": "I am not sure.",
        }[what]
        if what == "length":
            finish = "length"
        return 200, {"choices": [{"message": {"role": "assistant", "content": content}, "finish_reason": finish}]}, ()

    def count(self, kind=None, problem=None, key=None):
        return sum(1 for k, p, q, _ in self.requests
                   if (kind is None or k == kind) and (problem is None or p == problem) and (key is None or q == key))


@pytest.fixture
def make_server():
    servers = []

    def make(*args, **kw):
        servers.append(FakeTeacher(*args, **kw))
        return servers[-1]
    yield make
    for s in servers:
        s.close()


def run_build(server, out, *extra, model="fake-teacher"):
    """build.main in this process; returns its exit code."""
    return build.main(["--source", str(FIXTURE), "--out", str(out), "--teacher-url", server.url,
                       "--teacher-model", model, "--retry-wait", "0.01", "--workers", "4", *map(str, extra)])


def build_cmd(url, out, *extra):
    return [sys.executable, str(BUILD), "--source", str(FIXTURE), "--out", str(out), "--teacher-url", url,
            "--teacher-model", "fake-teacher", "--retry-wait", "0.01", *map(str, extra)]


def read_jsonl(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


# Hand-computed from Tables 6-7 for --n 10 (largest remainders: 10 * 187/497 = 3.76 -> 4, ...).
N10_SUBJECTS = {"algebra": 4, "counting_and_probability": 1, "geometry": 0, "intermediate_algebra": 1,
                "number_theory": 1, "prealgebra": 2, "precalculus": 1}
N10_LEVELS = {1: 1, 2: 3, 3: 3, 4: 2, 5: 1}


# ----------------------------------------------------------------------------------------------------
def test_scale_targets_matches_the_tables_and_sums_to_n():
    table6 = {"algebra": 187, "counting_and_probability": 31, "geometry": 25, "intermediate_algebra": 43,
              "number_theory": 59, "prealgebra": 122, "precalculus": 30}  # the paper, appendix A.2
    table7 = {1: 74, 2: 137, 3: 124, 4: 112, 5: 50}
    assert build.SUBJECT_TARGETS == table6 and build.LEVEL_TARGETS == table7
    assert build.scale_targets(table6, 497) == table6 and build.scale_targets(table7, 497) == table7
    assert build.scale_targets(build.SUBJECT_TARGETS, 10) == N10_SUBJECTS
    assert build.scale_targets(build.LEVEL_TARGETS, 10) == N10_LEVELS
    for n in (1, 3, 50, 100, 250, 1000, 2000):
        for table in (build.SUBJECT_TARGETS, build.LEVEL_TARGETS):
            got = build.scale_targets(table, n)
            assert sum(got.values()) == n
            assert all(abs(got[k] - n * v / 497) < 1 for k, v in table.items())


def test_load_source_reads_math_layout(tmp_path):
    cands, skipped = build.load_source(str(FIXTURE))
    rows = fixture_rows()
    assert len(cands) == len(rows) == 70 and not skipped
    subject_of = {r["problem"]: r["type"].lower().replace(" & ", "_and_").replace(" ", "_") for r in rows}
    for c in cands:
        src = next(r for r in rows if r["problem"] == c["problem"])
        assert c["answer"] == gold_of(src["solution"])
        assert c["subject"] == subject_of[c["problem"]] and f"Level {c['level']}" == src["level"]
    assert len({c["id"] for c in cands}) == 70

    edge = tmp_path / "edge.jsonl"
    lines = [{"problem": "P1", "level": "Level 2", "type": "Algebra",
              "solution": "First \\boxed{x = 3}, then $x^2 = \\boxed{\\frac{9}{\\sqrt{1}}}$."},
             {"problem": "P2", "level": "Level ?", "type": "Geometry", "solution": "\\boxed{4}"},
             {"problem": "P3", "level": "Level 1", "type": "Prealgebra", "solution": "It is 4."},
             {"problem": "P1", "level": "Level 2", "type": "Algebra", "solution": "\\boxed{9}"}]
    edge.write_text("\n".join(json.dumps(r) for r in lines) + "\n\n")
    cands, skipped = build.load_source(str(edge))
    assert [(c["problem"], c["answer"], c["subject"], c["level"]) for c in cands] == \
        [("P1", "\\frac{9}{\\sqrt{1}}", "algebra", 2)]
    assert sum(skipped.values()) == 3

    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(lines[0]) + "\n" + json.dumps({**lines[0], "type": "Topology"}) + "\n")
    with pytest.raises(build.BuildError, match=r"bad\.jsonl:2: unknown type 'Topology'"):
        build.load_source(str(bad))
    bad.write_text(json.dumps(lines[0]) + "\n{oops\n")
    with pytest.raises(build.BuildError, match=r"bad\.jsonl:2: not valid JSON"):
        build.load_source(str(bad))


# Bad lines in the files build.py reads (the source, the output it resumes, the side log): one message
# naming file:line and what is wrong, then the way out.
MATH_ROW = {"problem": "P1", "level": "Level 2", "type": "Algebra", "solution": "So \\boxed{3}."}
DONE = {"id": "math-000000000001", "problem": "P1", "answer": "3", "subject": "algebra", "level": 2,
        "rationales": {k: f"{k} reasoning. \\boxed{{3}}" for k in PERSPECTIVE_KEYS}}
TEACHER = {"event": "teacher", "id": DONE["id"], "key": "symbolic", "try": 1, "model": "fake-teacher",
           "finish_reason": "stop", "content": "So \\boxed{3}", "answer": "3", "reason": None, "rationale": "So"}
JUDGE = {"event": "judge", "id": DONE["id"], "key": "symbolic", "try": 1, "model": "fake-judge",
         "content": "VERDICT: PASS", "verdict": "PASS"}
DROPPED = {"event": "dropped", "id": "math-000000000002", "model": "fake-teacher", "reason": "symbolic: wrong"}
OUT_HINT = "fix or delete that line, or choose another --out"
LOG_HINT = "fix or delete that line (what it recorded is then asked for again), or pass another --log"


def jsonl_bytes(*lines) -> bytes:
    """Records as JSON lines; bytes and str are written as they are."""
    return b"".join((x if isinstance(x, bytes) else x.encode() if isinstance(x, str)
                     else json.dumps(x, ensure_ascii=False).encode()) + b"\n" for x in lines)


def without(record, key):
    return {k: v for k, v in record.items() if k != key}


PREFIX = '{"problem": "Où '  # 16 characters (17 bytes) before the bad byte: columns count characters
CUT = '{"id": "x",'  # a record cut short: JSON's column of the error is the character after it
BAD_LINES = [  # (reader, the file's lines, the line at fault, what the message says of it)
    ("source", [MATH_ROW, PREFIX.encode() + b'\xc3(", "level": "Level 1"}'], 2,
     f"not valid UTF-8 (byte 0xc3 at column {len(PREFIX) + 1})"),
    ("source", [MATH_ROW, "", "[1, 2]"], 3, "expected a JSON object, got list"),
    ("source", [MATH_ROW, {**MATH_ROW, "level": 2}], 2, "field 'level' must be a string, got int"),
    ("source", [without(MATH_ROW, "solution")], 1,
     "missing field 'solution' (MATH rows have problem, level, type, solution)"),
    ("output", [DONE, b"\xff"], 2, f"not valid UTF-8 (byte 0xff at column 1); {OUT_HINT}"),
    ("output", [DONE, CUT, DONE], 2,
     f"not valid JSON (Expecting property name enclosed in double quotes, column {len(CUT) + 1}); {OUT_HINT}"),
    ("output", [{**DONE, "id": 7}], 1, f"field 'id' must be a non-empty string, got int; {OUT_HINT}"),
    ("output", [{**DONE, "rationales": list(PERSPECTIVE_KEYS)}], 1,
     f"field 'rationales' must be an object with the 8 perspectives, got list; {OUT_HINT}"),
    ("output", [DONE, {**DONE, "rationales": without(DONE["rationales"], "socratic")}], 2,
     f"not a finished problem: 'rationales' lacks socratic; {OUT_HINT}"),
    ("output", [{**DONE, "rationales": {**DONE["rationales"], "symbolic": None}}], 1,
     f"the 'symbolic' rationale must be a string, got null; {OUT_HINT}"),
    ("output", [{**DONE, "level": "2"}], 1, f"field 'level' must be an integer, got str; {OUT_HINT}"),
    ("log", [TEACHER, b"\xfe\xff"], 2, f"not valid UTF-8 (byte 0xfe at column 1); {LOG_HINT}"),
    ("log", [TEACHER, '"a string"'], 2, f"expected a JSON object, got str; {LOG_HINT}"),
    ("log", [JUDGE, {**TEACHER, "try": "1"}], 2,
     f"field 'try' of a 'teacher' record must be an integer, got str; {LOG_HINT}"),
    ("log", [without(TEACHER, "reason")], 1, f"missing field 'reason' in a 'teacher' record; {LOG_HINT}"),
    ("log", [{**TEACHER, "rationale": None}], 1,
     f"a passing 'teacher' record (reason null) needs its 'rationale'; {LOG_HINT}"),
    ("log", [{**JUDGE, "verdict": 1}], 1,
     f"field 'verdict' of a 'judge' record must be a string or null, got int; {LOG_HINT}"),
    ("log", [{**DROPPED, "id": None}], 1,
     f"field 'id' of a 'dropped' record must be a string, got null; {LOG_HINT}"),
]


@pytest.mark.parametrize("reader, lines, line, message", BAD_LINES,
                         ids=[f"{c[0]}-{c[3].split(' (')[0].split(';')[0]}" for c in BAD_LINES])
def test_bad_lines_name_file_and_line(tmp_path, reader, lines, line, message):
    path = tmp_path / f"{reader}.jsonl"
    path.write_bytes(jsonl_bytes(*lines))
    read = {"source": lambda: build.load_source(str(path)), "output": lambda: build.read_output(path),
            "log": lambda: build.read_log(path)}[reader]
    with pytest.raises(build.BuildError) as e:
        read()
    assert str(e.value) == f"{path}:{line}: {message}"


def test_good_lines_still_read(tmp_path):
    src = tmp_path / "src.jsonl"  # U+2028 inside a string is no line break; a blank problem is skipped
    src.write_bytes(jsonl_bytes({**MATH_ROW, "problem": "P1\u2028on two lines"}, {**MATH_ROW, "problem": "  "}))
    cands, skipped = build.load_source(str(src))
    assert [c["problem"] for c in cands] == ["P1\u2028on two lines"] and skipped == {"empty problem": 1}
    out = tmp_path / "out.jsonl"
    out.write_bytes(jsonl_bytes(DONE, "", without(without(DONE, "subject"), "level")))  # both are optional
    assert build.read_output(out) == [DONE, without(without(DONE, "subject"), "level")]
    log = tmp_path / "log.jsonl"  # records a resume does not read back are not checked
    other = [{"event": "retry", "id": 3, "error": None}, {"event": ["?"]}, {"no": "event"}]
    failed = {**TEACHER, "reason": "wrong answer", "rationale": None}
    log.write_bytes(jsonl_bytes(TEACHER, JUDGE, DROPPED, failed, *other))
    assert build.read_log(log) == [TEACHER, JUDGE, DROPPED, failed, *other]
    assert build.read_output(tmp_path / "none.jsonl") == [] == build.read_log(tmp_path / "none.jsonl")


def test_bad_files_stop_the_cli_in_one_line_before_any_request(tmp_path, make_server):
    srv = make_server(fixture_rows())
    bad_source = tmp_path / "math.jsonl"
    bad_source.write_bytes(jsonl_bytes(MATH_ROW, MATH_ROW, b'{"problem": "\xff"}'))
    out, log = tmp_path / "out.jsonl", tmp_path / "out.raw.jsonl"
    cases = [(["--source", bad_source], {}, f"{bad_source}:3: not valid UTF-8 (byte 0xff at column 14)"),
             ([], {out: jsonl_bytes(DONE, [DONE])}, f"{out}:2: expected a JSON object, got list; {OUT_HINT}"),
             ([], {out: jsonl_bytes(DONE), log: jsonl_bytes(TEACHER, {**TEACHER, "key": 3})},
              f"{log}:2: field 'key' of a 'teacher' record must be a string, got int; {LOG_HINT}")]
    for extra, files, message in cases:
        for f in (out, log):
            f.unlink(missing_ok=True)
        for f, data in files.items():
            f.write_bytes(data)
        r = subprocess.run(build_cmd(srv.url, out, *extra), capture_output=True, text=True, timeout=60)
        assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
        assert r.stderr.strip().splitlines() == [f"error: {message}"]
        assert all(f.read_bytes() == data for f, data in files.items())  # finished work untouched
    assert srv.count() == 0  # not one problem was sent to the teacher


def test_hub_source_reads_the_train_split_of_each_subject_config(monkeypatch):
    import datasets
    rows, calls = fixture_rows(), []

    def fake_load_dataset(name, config, split):  # stands in for the Hub: no network in tests
        calls.append((name, config, split))
        return [{k: r[k] for k in ("problem", "level", "type", "solution")} for r in rows
                if r["type"].lower().replace(" & ", "_and_").replace(" ", "_") == config]
    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    cands, _ = build.load_source("EleutherAI/hendrycks_math")
    assert sorted(calls) == sorted(("EleutherAI/hendrycks_math", s, "train") for s in build.SUBJECT_TARGETS)
    assert len(cands) == 70 and collections.Counter(c["subject"] for c in cands) == {s: 10 for s in build.SUBJECT_TARGETS}

    def offline(*a, **k):
        raise ConnectionError("no network")
    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(build.BuildError, match="cannot load the 'train' split of 'EleutherAI/hendrycks_math'"):
        build.load_source("EleutherAI/hendrycks_math")


def test_answer_check_rationale_cleanup_and_verdicts():
    ok = lambda gold, text, finish="stop": build.check_answer(text, finish, gold)[1]
    assert ok("\\frac{1}{2}", "so \\boxed{0.5}") is None
    assert ok("\\frac{1}{2}", "so \\boxed{\\dfrac12}") is None
    assert ok("3\\sqrt{2}", "so \\boxed{\\sqrt{18}}") is None
    assert ok("16\\pi", "so \\boxed{1 \\cdot 16\\pi}") is None
    assert ok("5", "so \\boxed{6}") == "wrong answer"
    assert ok("5", "\\boxed{6} no wait, \\boxed{5}") is None        # the last box counts
    assert ok("5", "\\boxed{5} no wait, \\boxed{6}") == "wrong answer"
    assert ok("5", "the answer is 5") == "no \\boxed{} answer"
    assert ok("5", "  ") == "empty response"
    assert ok("5", "so \\boxed{5}", "length").startswith("truncated")
    assert ok("5", "<think>\\boxed{6}</think> so \\boxed{5}") is None
    assert ok("5", "<think>\\boxed{5}</think> so \\boxed{6}") == "wrong answer"

    clean = build.clean_rationale("Half of it: $\\boxed{0.5}$.\nHope that helps!", "\\frac{1}{2}")
    assert clean == "Half of it: \\boxed{\\frac{1}{2}}"
    clean = build.clean_rationale("We get $x = \\boxed{3}$ and we are done.", "3")
    assert clean.endswith("\\boxed{3}") and clean.count("$") % 2 == 0
    assert build.clean_rationale("<think>hmm</think>\nSo \\boxed{7}", "7") == "So \\boxed{7}"

    assert build.parse_verdict("fine.\nVERDICT: PASS") == "PASS"
    assert build.parse_verdict("VERDICT: PASS?\nOn reflection, no.\nverdict: fail") == "FAIL"
    assert build.parse_verdict("no idea") is None


# The script of the filtering test: per perspective, the replies in order, how many tries the build
# should count (a try is one teacher reply that it judged), and how many HTTP requests that takes.
GOOD = {  # key: (replies, tries, requests)
    "symbolic": (["wrong", "right"], 2, 2),
    "intuitive": (["400", "nobox", "right"], 3, 3),
    "decomposition": (["equiv"], 1, 1),
    "planning": (["length", "think"], 2, 2),
    "analogy": (["429", "500", "right"], 1, 3),
    "socratic": (["badjson", "right"], 1, 2),
    "contrastive": (["empty", "right"], 2, 2),
    "counterfactual": (["dollar"], 1, 1),
}


def test_filtering_retries_and_the_all_eight_rule(tmp_path, make_server):
    rows = fixture_rows()
    bad = {r["problem"] for r in rows[::2]}  # the first problem of every cell never gets counterfactual right

    def script(problem, key, kind):
        return ["wrong"] if problem in bad and key == "counterfactual" else GOOD[key][0]
    srv = make_server(rows, script)
    out = tmp_path / "out.jsonl"
    assert run_build(srv, out, "--n", 10, "--max-tries", 3) == 0

    kept = read_jsonl(out)
    log = read_jsonl(out.with_suffix(".raw.jsonl"))
    gold = {r["problem"]: gold_of(r["solution"]) for r in rows}
    asked = {p for _, p, _, _ in srv.requests}
    dropped = {e["id"] for e in log if e["event"] == "dropped"}
    assert len(kept) == 10 and len({r["id"] for r in kept}) == 10
    assert {r["problem"] for r in kept}.isdisjoint(bad)
    assert dropped and len(asked) == len(kept) + len(dropped)  # no problem paid for beyond those two sets
    for r in kept:
        assert list(r["rationales"]) == list(PERSPECTIVE_KEYS)
        for key, (_, tries, requests) in GOOD.items():
            text = r["rationales"][key]
            assert text.endswith(f"\\boxed{{{gold[r['problem']]}}}"), (key, text)
            assert "987654321" not in text and "<think>" not in text and "hope" not in text.lower()
            assert srv.count("teacher", r["problem"], key) == requests, key
            recs = [e for e in log if e["event"] == "teacher" and e["id"] == r["id"] and e["key"] == key]
            assert [e["try"] for e in recs] == list(range(1, tries + 1)), key
            assert [e["reason"] is None for e in recs] == [False] * (tries - 1) + [True]
        assert r["rationales"]["counterfactual"].count("$") % 2 == 0
    for e in (e for e in log if e["event"] == "dropped"):
        problem = next(p for p in asked if build.problem_id(p) == e["id"])
        assert problem in bad and e["reason"] == "counterfactual: wrong answer"
        assert srv.count("teacher", problem, "counterfactual") == 3  # exactly --max-tries
    reasons = {e["reason"] for e in log if e["event"] == "teacher" and e["reason"]}
    assert {"wrong answer", "no \\boxed{} answer", "truncated (finish_reason=length)", "empty response"} <= reasons
    assert any(r.startswith("request rejected (HTTP 400") for r in reasons)
    assert sum(e["event"] == "retry" for e in log) >= 3 * len(kept)  # 429, 500 and the bad body, per problem


def test_stratified_quotas_on_a_small_n(tmp_path, make_server):
    rows = fixture_rows()
    bad = {r["problem"] for r in rows[1::4]}
    srv = make_server(rows, lambda p, k, kind: ["wrong"] if p in bad and k == "planning" else ["right"])
    out = tmp_path / "out.jsonl"
    assert run_build(srv, out, "--n", 10, "--max-tries", 2, "--seed", 3) == 0
    kept = read_jsonl(out)
    assert collections.Counter(r["subject"] for r in kept) == {k: v for k, v in N10_SUBJECTS.items() if v}
    assert collections.Counter(r["level"] for r in kept) == N10_LEVELS
    # every problem the teacher saw was either kept or dropped for its scripted failure: none wasted
    asked = {p for _, p, _, _ in srv.requests}
    assert asked - {r["problem"] for r in kept} <= bad
    # a different seed draws a different set of problems to the same quotas
    out2 = tmp_path / "out2.jsonl"
    assert run_build(srv, out2, "--n", 10, "--max-tries", 2, "--seed", 4) == 0
    kept2 = read_jsonl(out2)
    assert collections.Counter(r["level"] for r in kept2) == N10_LEVELS
    assert {r["id"] for r in kept2} != {r["id"] for r in kept}


def test_llm_judge_second_pass(tmp_path, make_server):
    rows = fixture_rows()
    bad = {r["problem"] for r in rows[::2]}

    def script(problem, key, kind):
        if kind == "teacher":
            return ["right"]
        if problem in bad and key == "socratic":
            return ["FAIL"]
        return {"symbolic": ["FAIL", "PASS"], "intuitive": ["none", "PASS"]}.get(key, ["PASS"])
    srv = make_server(rows, script)
    out = tmp_path / "out.jsonl"
    assert run_build(srv, out, "--n", 3, "--judge-model", "fake-judge") == 0
    kept = read_jsonl(out)
    assert len(kept) == 3 and not {r["problem"] for r in kept} & bad
    for r in kept:
        p = r["problem"]
        assert srv.count("teacher", p, "symbolic") == 2 and srv.count("judge", p, "symbolic") == 2
        assert srv.count("teacher", p, "intuitive") == 2 and srv.count("judge", p, "intuitive") == 2
        assert srv.count("teacher", p, "planning") == 1 and srv.count("judge", p, "planning") == 1
    dropped = [p for p in {q for _, q, _, _ in srv.requests} if p in bad]
    for p in dropped:
        assert srv.count("teacher", p, "socratic") == 3 == srv.count("judge", p, "socratic")
    log = read_jsonl(out.with_suffix(".raw.jsonl"))
    assert dropped and all(e["reason"] == "socratic: judge: FAIL" for e in log if e["event"] == "dropped")


def test_judge_resume_reuses_logged_answers(tmp_path, make_server):
    rows = fixture_rows()
    first = {}

    def script(problem, key, kind):  # the judge breaks down on the first problem: its answers are logged unjudged
        first.setdefault("problem", problem)
        return ["right"] if kind == "teacher" else ["500"] if problem == first["problem"] else ["PASS"]
    srv = make_server(rows, script)
    out = tmp_path / "out.jsonl"
    args = ["--n", 2, "--judge-model", "fake-judge", "--workers", 8]
    # in a subprocess: its requests still in flight end with it (in this process they would run on)
    # (--retry-wait 0.2: the judge gives up well after the eight answers are back and logged)
    r = subprocess.run(build_cmd(srv.url, out, *args, "--http-retries", 1, "--retry-wait", 0.2),
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 1 and "attempts in a row failed" in r.stderr and "Traceback" not in r.stderr
    assert srv.count("teacher", first["problem"]) == 8
    srv.script = lambda p, k, kind: ["right"] if kind == "teacher" else ["PASS"]
    n_judge = srv.count("judge", first["problem"])
    assert run_build(srv, out, *args) == 0
    assert srv.count("teacher", first["problem"]) == 8                 # no answer asked for twice
    assert srv.count("judge", first["problem"]) - n_judge == 8         # each logged answer judged once
    assert build.problem_id(first["problem"]) in {r["id"] for r in read_jsonl(out)}


def test_plan_cells_is_a_maximum_plan():
    import itertools, random
    rng = random.Random(0)
    for _ in range(200):  # against brute force on small tables
        rows = {r: rng.randint(0, 3) for r in "abc"}
        cols = {c: rng.randint(0, 3) for c in (1, 2)}
        cap = {(r, c): rng.randint(0, 2) for r in rows for c in cols}
        x = build.plan_cells(rows, cols, cap)
        assert all(0 <= x[k] <= cap[k] for k in cap)
        assert all(sum(x[r, c] for c in cols) <= rows[r] for r in rows)
        assert all(sum(x[r, c] for r in rows) <= cols[c] for c in cols)
        best = 0
        for y in itertools.product(*(range(cap[k] + 1) for k in cap)):
            t = dict(zip(cap, y))
            if all(sum(t[r, c] for c in cols) <= rows[r] for r in rows) and \
                    all(sum(t[r, c] for r in rows) <= cols[c] for c in cols):
                best = max(best, sum(y))
        assert sum(x.values()) == best
    # the trap it exists for: room left only in (geometry, level 1), whose cell is empty, is avoided
    x = build.plan_cells({"algebra": 1, "geometry": 1}, {1: 1, 2: 1},
                         {("algebra", 1): 5, ("algebra", 2): 5, ("geometry", 1): 0, ("geometry", 2): 5})
    assert x == {("algebra", 1): 1, ("geometry", 2): 1}


def test_endpoint_errors_are_one_clear_line_before_any_work(tmp_path, make_server):
    rows = fixture_rows()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}/v1"  # closed again below: nothing listens there
    locked = make_server(rows, key="sesame")
    plain = make_server(rows, models_route=False)
    env = {k: v for k, v in os.environ.items() if k != "OPENAI_API_KEY"}
    cases = [(dead, [], "cannot reach"), (locked.url, [], "refused no key ($OPENAI_API_KEY is not set)"),
             (plain.url, ["--judge-model", "no-such-judge"], "HTTP 404")]
    for url, extra, message in cases:
        out = tmp_path / "never.jsonl"
        r = subprocess.run(build_cmd(url, out, *extra), capture_output=True, text=True, env=env, timeout=60)
        assert r.returncode == 2, r.stderr
        assert message in r.stderr and "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1
        assert not out.exists()
    assert locked.count() == plain.count("teacher") == 0  # no problem was sent anywhere
    # the right key passes the preflight; a model the server lacks is named in the error
    r = subprocess.run(build_cmd(locked.url, tmp_path / "o.jsonl", "--n", 1), capture_output=True, text=True,
                       env={**env, "OPENAI_API_KEY": "sesame"}, timeout=60)
    assert r.returncode == 0 and len(read_jsonl(tmp_path / "o.jsonl")) == 1, r.stderr
    r = subprocess.run([*build_cmd(locked.url, tmp_path / "o.jsonl"), "--teacher-model", "gpt-none"],
                       capture_output=True, text=True, env={**env, "OPENAI_API_KEY": "sesame"}, timeout=60)
    assert r.returncode == 2 and "does not serve model 'gpt-none'" in r.stderr and "Traceback" not in r.stderr


def test_endpoint_failing_midway_stops_keeps_the_work_and_reuses_the_log(tmp_path, make_server):
    rows = fixture_rows()
    srv = make_server(rows)
    out = tmp_path / "out.jsonl"
    assert run_build(srv, out, "--n", 3) == 0
    first = {}  # the server breaks down for good on one perspective of the next problem it sees

    def broken(problem, key, kind):
        first.setdefault("problem", problem)
        return ["500"] if problem == first["problem"] and key == "counterfactual" else ["right"]
    srv.script = broken
    assert run_build(srv, out, "--n", 6, "--http-retries", 2, "--workers", 1) == 1
    kept = read_jsonl(out)
    assert len(kept) >= 3 and first["problem"] not in {r["problem"] for r in kept}  # finished work intact
    pid = build.problem_id(first["problem"])
    logged = [e for e in read_jsonl(out.with_suffix(".raw.jsonl")) if e["event"] == "teacher" and e["id"] == pid]
    assert sorted(e["key"] for e in logged) == sorted(k for k in PERSPECTIVE_KEYS if k != "counterfactual")
    srv.script = lambda p, k, kind: ["right"]  # back up: the same command finishes the job
    n_before = srv.count("teacher", first["problem"])
    assert run_build(srv, out, "--n", 6) == 0
    assert len({r["id"] for r in read_jsonl(out)}) == len(read_jsonl(out)) == 6
    assert pid in {r["id"] for r in read_jsonl(out)}
    # the seven answers in the log were reused: only the missing perspective was asked again
    assert srv.count("teacher", first["problem"]) - n_before == 1


def test_backoff_waits_and_honours_retry_after(make_server):
    from prompts import teacher_prompt
    rows = fixture_rows()
    problem = rows[0]["problem"]
    steps = {"now": ["500", "500", "right"]}
    srv = make_server(rows, lambda p, k, kind: steps["now"])
    prompt = teacher_prompt(problem, "symbolic")
    ep = build.Endpoint(srv.url, "NO_SUCH_KEY_VAR", 10, 3, 0.2, {})
    t0 = time.time()
    content, finish, notes = ep.chat("fake-teacher", prompt, 100, 0.0)
    assert time.time() - t0 >= 0.2 * 0.5 + 0.4 * 0.5  # two waits, 0.2 s then 0.4 s, each jittered down to half
    assert len(notes) == 2 and gold_of(rows[0]["solution"]) in content and finish == "stop"
    srv.seen.clear()
    steps["now"] = ["429wait", "right"]  # Retry-After: 1 overrides the 0.01 s backoff
    t0 = time.time()
    build.Endpoint(srv.url, "NO_SUCH_KEY_VAR", 10, 3, 0.01, {}).chat("fake-teacher", prompt, 100, 0.0)
    assert time.time() - t0 >= 1.0
    srv.seen.clear()
    steps["now"] = ["400"]
    with pytest.raises(build.Rejected, match="HTTP 400"):
        ep.chat("fake-teacher", prompt, 100, 0.0)
    steps["now"] = ["badjson"]
    with pytest.raises(build.Fatal, match="2 attempts in a row failed, the last with malformed response"):
        build.Endpoint(srv.url, "NO_SUCH_KEY_VAR", 10, 1, 0.01, {}).chat("fake-teacher", prompt, 100, 0.0)


def test_files_are_repaired_only_where_a_write_was_cut_and_never_shared(tmp_path, make_server):
    f = tmp_path / "f.jsonl"
    f.write_text('{"a": 1}\n{"b": 2}')              # complete record, newline lost: kept
    assert build.repair_tail(f) is False and f.read_text() == '{"a": 1}\n{"b": 2}\n'
    f.write_text('{"a": 1}\n{"b": ')                # cut mid-record: the fragment goes
    assert build.repair_tail(f) is True and f.read_text() == '{"a": 1}\n'
    srv = make_server(fixture_rows())
    out = tmp_path / "out.jsonl"
    holder = build.Appender(out, sync=False, lock=True)  # as if another build were running on this file
    try:
        r = subprocess.run(build_cmd(srv.url, out, "--n", 2), capture_output=True, text=True, timeout=60)
    finally:
        holder.close()
    assert r.returncode == 2 and "being written by another build.py" in r.stderr and "Traceback" not in r.stderr
    assert srv.count("teacher") == 0 and out.read_text() == ""


def wait_for_lines(path, n, proc, limit=60):
    t0 = time.time()
    while time.time() - t0 < limit:
        if path.exists() and path.read_text().count("\n") >= n:
            return
        assert proc.poll() is None, "the build ended before it could be interrupted"
        time.sleep(0.02)
    raise AssertionError(f"{path} did not reach {n} lines")


def test_resume_after_a_kill_loses_nothing_and_duplicates_nothing(tmp_path, make_server):
    import mind
    rows = fixture_rows()
    srv = make_server(rows, delay=0.05)
    out, log = tmp_path / "out.jsonl", tmp_path / "out.raw.jsonl"
    proc = subprocess.Popen(build_cmd(srv.url, out, "--n", 10, "--workers", 3), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    wait_for_lines(out, 3, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    before = [line for line in out.read_text().splitlines(keepends=True) if line.endswith("\n")]
    n_logged = sum(1 for e in read_jsonl(log) if e["event"] == "teacher") if log.read_text().endswith("\n") else None
    assert 3 <= len(before) < 10
    with open(out, "a") as fh:  # as if the kill had landed in the middle of a write
        fh.write('{"id": "math-half-writ')
    with open(log, "a") as fh:
        fh.write('{"event": "teacher", "id": "math-half')
    srv.delay = 0.0
    r = subprocess.run(build_cmd(srv.url, out, "--n", 10, "--workers", 3), capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "cut an incomplete last line" in r.stdout
    after = out.read_text().splitlines(keepends=True)
    assert after[: len(before)] == before                                   # nothing lost
    ids = [json.loads(line)["id"] for line in after]
    assert len(ids) == len(set(ids)) == 10                                  # nothing duplicated
    assert len(mind.load_data(out)) == 10
    # logged replies were reused: only requests outstanding at the kill, whose replies never reached the
    # log, were asked twice (fewer than --workers + 8: a new problem is started while under --workers)
    assert srv.count("teacher") < 10 * 8 + 3 + 8
    assert n_logged is None or n_logged >= 3 * 8


def test_ctrl_c_leaves_valid_files_and_the_rerun_finishes(tmp_path, make_server):
    import mind
    rows = fixture_rows()
    srv = make_server(rows, delay=0.1)
    out, log = tmp_path / "out.jsonl", tmp_path / "out.raw.jsonl"
    proc = subprocess.Popen(build_cmd(srv.url, out, "--n", 10, "--workers", 2), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    wait_for_lines(out, 2, proc)
    t0 = time.time()
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=30)
    assert proc.returncode == 130 and time.time() - t0 < 5, stderr
    assert "interrupted" in stdout and "Traceback" not in stderr
    assert out.read_text().endswith("\n") and log.read_text().endswith("\n")
    n_before = len(mind.load_data(out))
    assert 2 <= n_before < 10
    assert all(isinstance(e, dict) for e in read_jsonl(log))
    srv.delay = 0.0
    r = subprocess.run(build_cmd(srv.url, out, "--n", 10), capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert f"{n_before} already in" in r.stdout
    assert len({row["id"] for row in mind.load_data(out)}) == 10


def test_mind_trains_on_the_output(tmp_path, make_server):
    import mind
    srv = make_server(fixture_rows())
    out = tmp_path / "mind_math.jsonl"
    assert run_build(srv, out, "--n", 8) == 0
    rows = mind.load_data(out)
    assert len(rows) == 8 and all(set(r) == {"id", "problem", "answer", "subject", "level", "rationales"} for r in rows)
    r = subprocess.run([sys.executable, str(ROOT / "mind.py"), "--student", "tiny", "--data", str(out),
                        "--out", str(tmp_path / "run"), "--epochs", "1"], capture_output=True, text=True,
                       timeout=300, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "data: 8 problems" in r.stdout
    assert (tmp_path / "run" / "adapter" / "adapter_config.json").exists()


# ----------------------------------------------------------------------------------------------------
if __name__ == "__main__":  # python test_build.py serve: the fake teacher, for trying build.py by hand
    ap = argparse.ArgumentParser(description="Serve the fake teacher on 127.0.0.1 (for trying data/build.py).")
    ap.add_argument("command", choices=["serve"])
    ap.add_argument("--port", type=int, default=8000)
    ap.add_argument("--delay", type=float, default=0.2, help="seconds per reply")
    ap.add_argument("--wrong-every", type=int, default=5, help="every Nth problem gets one perspective wrong")
    a = ap.parse_args()
    rows = fixture_rows()
    bad = {r["problem"] for r in rows[:: a.wrong_every]}
    srv = FakeTeacher(rows, lambda p, k, kind: (["wrong"] if p in bad and k == "analogy" else ["429", "right"])
                      if kind == "teacher" else ["PASS"], delay=a.delay, port=a.port)
    print(f"fake teacher on {srv.url} (models: {', '.join(srv.models)}); Ctrl-C to stop", flush=True)
    try:
        threading.Event().wait()
    except KeyboardInterrupt:
        srv.close()
