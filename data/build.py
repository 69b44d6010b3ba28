"""Build MIND's multi-perspective training set from MATH with a teacher LLM (Cui et al., ACL 2026).

The paper (Section 3.1, Figure 2, appendix A.2) trains on 497 MATH problems, each with eight teacher
rationales (Qwen3-235B), one per reasoning perspective, all reaching the right answer. This script makes
that set:
  1. source: the MATH *training* split (never test: MATH500 is drawn from it), from the Hub
     (EleutherAI/hendrycks_math, one config per subject) or from a local JSONL with the same fields
     (problem, level "Level N", type, solution). The gold answer is the last \\boxed{} of the solution.
  2. teacher: any OpenAI-compatible chat-completions endpoint (vLLM, SGLang, a hosted API) gets
     prompts.teacher_prompt(problem, k) for the eight perspectives k.
  3. judge: a rationale is kept when its last \\boxed{} answer is equivalent to the gold answer
     (math-verify); with --judge-model a second LLM pass (prompts.judge_prompt) must also say PASS.
     A failed perspective is asked again, up to --max-tries; a problem is kept only if all eight pass.
  4. stratification: the kept set is filled to the subject and level counts of Tables 6 and 7 (scaled
     to --n). Candidates are drawn in a seeded order, one (subject, level) cell at a time, only while
     both quotas have room and only from cells that can still lead to full quotas (plan_cells), so no
     problem is paid for that could not be used. The paper's "levels 1-2 downsampled" is what
     Table 7's level quotas do.

Our choices where the paper is silent: the final \\boxed{} of a kept rationale is rewritten to the gold
answer's exact text (math-verify has said they are equal) and anything after it is cut, so every
rationale ends with \\boxed{answer} as mind.py's answer suffix expects; any <think> block is removed.

Nothing is lost: each finished problem is appended to --out (data/mind_math.jsonl, the schema of
data/sample.jsonl) as soon as it is done, every raw response goes to the side log (--log), and running
the same command again resumes: kept and dropped problems are skipped, and rationales already in the
log are reused instead of asked for again. Ctrl-C stops at once and leaves both files valid.

Usage:
  python data/build.py --teacher-url http://localhost:8000/v1 --teacher-model Qwen/Qwen3-235B-A22B
  python data/build.py --source data/fixtures/math_train_sample.jsonl --n 8 ...   # local MATH-format file
"""
import argparse, collections, hashlib, http.client, json, os, random, re, signal, sys, time
import urllib.error, urllib.request
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # prompts.py lives in the repository root
from prompts import PERSPECTIVE_KEYS, judge_prompt, last_boxed, teacher_prompt  # noqa: E402

# Tables 6 and 7 of the paper (appendix A.2): the 497 problems by subject (MATH config name) and level.
SUBJECT_TARGETS = {"algebra": 187, "counting_and_probability": 31, "geometry": 25, "intermediate_algebra": 43,
                   "number_theory": 59, "prealgebra": 122, "precalculus": 30}
LEVEL_TARGETS = {1: 74, 2: 137, 3: 124, 4: 112, 5: 50}
# MATH's "type" field spells the subjects as display names; the Hub configs use these keys.
SUBJECT_OF_TYPE = {"Algebra": "algebra", "Counting & Probability": "counting_and_probability",
                   "Geometry": "geometry", "Intermediate Algebra": "intermediate_algebra",
                   "Number Theory": "number_theory", "Prealgebra": "prealgebra", "Precalculus": "precalculus"}


class BuildError(Exception):
    """A problem the user must fix (bad input, unreachable endpoint...): printed as one line, exit 2."""


class Fatal(BuildError):
    """The endpoint failed in a way that retrying one request will not fix: stop the run, keep the work."""


class Rejected(Exception):
    """The endpoint refused this one request (HTTP 400, 413, 422...): a failed try, not a crash."""


def scale_targets(table: dict, n: int) -> dict:
    """Scales a count table to sum to n by largest remainders (n = 497 gives the table itself)."""
    total = sum(table.values())
    exact = {k: v * n / total for k, v in table.items()}
    out = {k: int(x) for k, x in exact.items()}
    by_remainder = sorted(table, key=lambda k: exact[k] - out[k], reverse=True)  # stable: ties keep table order
    for k in by_remainder[: n - sum(out.values())]:
        out[k] += 1
    return out


def plan_cells(rows: dict, cols: dict, cap: dict) -> collections.Counter:
    """A largest integer table x[r, c] <= cap[r, c] whose row sums stay within `rows` and column sums within
    `cols` (a max-flow on the small subject x level graph, by augmenting paths).

    Filling the subject quotas and the level quotas greedily can strand one: room left only in
    geometry and only in level 1, with no geometry level-1 problem left. Drawing only from cells this
    plan uses avoids that: a plan for the rest exists after every draw."""
    x, used_r, used_c = collections.Counter(), collections.Counter(), collections.Counter()
    while True:
        prev = {("r", r): None for r in rows if used_r[r] < rows[r]}
        queue, end = collections.deque(prev), None
        while queue and end is None:  # breadth-first search for a path from a row with room to a column with room
            side, v = queue.popleft()
            nxt = [(("c", c), cap.get((v, c), 0) - x[v, c]) for c in cols] if side == "r" else \
                  [(("r", r), x[r, v]) for r in rows]  # forward along spare capacity, back along used flow
            for node, spare in nxt:
                if spare > 0 and node not in prev:
                    prev[node] = (side, v)
                    queue.append(node)
                    if node[0] == "c" and used_c[node[1]] < cols[node[1]]:
                        end = node
                        break
        if end is None:
            return x
        path, node = [], end
        while prev[node] is not None:
            path.append((prev[node], node))
            node = prev[node]
        amount = min([rows[node[1]] - used_r[node[1]], cols[end[1]] - used_c[end[1]]]
                     + [cap.get((a[1], b[1]), 0) - x[a[1], b[1]] if a[0] == "r" else x[b[1], a[1]] for a, b in path])
        for a, b in path:
            if a[0] == "r":
                x[a[1], b[1]] += amount
            else:
                x[b[1], a[1]] -= amount
        used_r[node[1]] += amount
        used_c[end[1]] += amount


# ----------------------------------------------------------------------------------------------------
# 1. Source problems: the MATH training split, from the Hub or a local JSONL in the same layout.
def problem_id(problem: str) -> str:
    """A stable id from the problem text: independent of the source's row order, equal for duplicates."""
    return "math-" + hashlib.sha256(problem.strip().encode()).hexdigest()[:12]


def load_source(source: str):
    """-> (candidates [{id, problem, answer, subject, level}], Counter of skipped rows by reason)."""
    records = []  # (where, subject or None, record)
    if Path(source).suffix in (".json", ".jsonl") or Path(source).exists():
        path = Path(source)
        if not path.is_file():
            raise BuildError(f"{source}: no such file")
        records = [(where, None, rec) for where, rec in read_jsonl(path)]
    else:
        try:
            import datasets
        except ImportError:
            raise BuildError("the datasets library is needed to read MATH from the Hub: pip install datasets") from None
        datasets.logging.set_verbosity_error()
        for subject in SUBJECT_TARGETS:  # one config per subject; the training split only
            try:
                ds = datasets.load_dataset(source, subject, split="train")
            except Exception as e:  # network, unknown name, missing config: all end the same way
                raise BuildError(f"cannot load the 'train' split of {source!r}, config {subject!r} "
                                 f"from the Hub: {type(e).__name__}: {e}") from None
            records += [(f"{source}/{subject} row {i}", subject, r) for i, r in enumerate(ds)]

    candidates, skipped, seen = [], collections.Counter(), set()
    for where, subject, rec in records:
        if not isinstance(rec, dict):
            raise BuildError(f"{where}: expected a JSON object, got {type(rec).__name__}")
        for key in ("problem", "level", "type", "solution"):
            if key not in rec:
                raise BuildError(f"{where}: missing field {key!r} "
                                 "(MATH rows have problem, level, type, solution)")
            if not isinstance(rec[key], str):
                raise BuildError(f"{where}: field {key!r} must be a string, got {type(rec[key]).__name__}")
        if subject is None:
            subject = SUBJECT_OF_TYPE.get(rec["type"].strip())
            if subject is None:
                raise BuildError(f"{where}: unknown type {rec['type']!r} (expected one of: {', '.join(SUBJECT_OF_TYPE)})")
        level = re.fullmatch(r"Level (\d)", rec["level"].strip())
        answer = last_boxed(rec["solution"])
        if not rec["problem"].strip():
            skipped["empty problem"] += 1  # nothing to ask the teacher
        elif not level or not 1 <= int(level[1]) <= 5:
            skipped["level is not 'Level 1'..'Level 5'"] += 1  # MATH has a few 'Level ?' problems
        elif not answer or not answer.strip():
            skipped["no \\boxed{} answer in the solution"] += 1
        elif problem_id(rec["problem"]) in seen:
            skipped["duplicate problem text"] += 1
        else:
            pid = problem_id(rec["problem"])
            seen.add(pid)
            candidates.append({"id": pid, "problem": rec["problem"].strip(), "answer": answer.strip(),
                               "subject": subject, "level": int(level[1])})
    return candidates, skipped


# ----------------------------------------------------------------------------------------------------
# 2. The teacher: an OpenAI-compatible /chat/completions endpoint, called from worker threads.
class Endpoint:
    def __init__(self, url, key_env, timeout, retries, retry_wait, extra_body):
        self.url, self.key_env, self.key = url.rstrip("/"), key_env, os.environ.get(key_env)
        self.timeout, self.retries, self.retry_wait, self.extra = timeout, retries, retry_wait, extra_body

    def _call(self, path, body=None, timeout=None):
        headers = {"Content-Type": "application/json"}
        if self.key:
            headers["Authorization"] = f"Bearer {self.key}"
        req = urllib.request.Request(self.url + path, headers=headers, method="POST" if body else "GET",
                                     data=json.dumps(body).encode() if body else None)
        with urllib.request.urlopen(req, timeout=timeout or self.timeout) as r:
            return r.read()

    def _http_fatal(self, code, text, model):
        if code in (401, 403):
            who = f"the key in ${self.key_env}" if self.key else f"no key (${self.key_env} is not set)"
            return Fatal(f"{self.url} refused {who}: HTTP {code} {text}")
        if code == 404:
            return Fatal(f"{self.url}: HTTP 404 (wrong URL, or model {model!r} not served there): {text}")
        return None

    def chat(self, model, prompt, max_tokens, temperature, retries=None):
        """-> (content, finish_reason, notes). Rate limits, timeouts, 5xx and unreadable bodies are retried
        with exponential backoff (notes lists them, for the side log); other 4xx raise Rejected."""
        body = {"model": model, "messages": [{"role": "user", "content": prompt}],
                "max_tokens": max_tokens, "temperature": temperature, **self.extra}
        notes, retries = [], self.retries if retries is None else retries
        for attempt in range(retries + 1):
            wait_s = min(60.0, self.retry_wait * 2 ** attempt) * random.uniform(0.5, 1.0)
            try:
                data = json.loads(self._call("/chat/completions", body))
                choice = data["choices"][0]
                return choice["message"].get("content") or "", choice.get("finish_reason"), notes
            except urllib.error.HTTPError as e:
                text = e.read()[:300].decode("utf-8", "replace")
                if (err := self._http_fatal(e.code, text, model)) is not None:
                    raise err from None
                if e.code not in (408, 409, 429) and e.code < 500:
                    raise Rejected(f"HTTP {e.code}: {text}") from None
                if e.code == 429 and (e.headers.get("Retry-After") or "").strip().isdigit():
                    wait_s = min(60.0, float(e.headers["Retry-After"]))  # the server says how long
                notes.append(f"HTTP {e.code}: {text}")
            except (urllib.error.URLError, OSError, http.client.HTTPException) as e:  # refused, reset, timeout
                notes.append(f"{type(e).__name__}: {getattr(e, 'reason', e)}")
            except (ValueError, KeyError, IndexError, TypeError, AttributeError) as e:  # 200 with a bad body
                notes.append(f"malformed response: {type(e).__name__}: {e}")
            if attempt < retries:
                time.sleep(wait_s)
        raise Fatal(f"{self.url}: {retries + 1} attempts in a row failed, the last with {notes[-1]}")

    def preflight(self, models):
        """One clear error now, before any work, if the endpoint is down, refuses the key or lacks a model."""
        try:
            listing = json.loads(self._call("/models", timeout=30))
            served = [m.get("id") for m in listing.get("data", [])]
        except urllib.error.HTTPError as e:
            if e.code in (401, 403):
                raise self._http_fatal(e.code, e.read()[:300].decode("utf-8", "replace"), models[0]) from None
            served = None  # no /models route here: probe each model with a one-token request below
        except (urllib.error.URLError, OSError, http.client.HTTPException) as e:
            raise Fatal(f"cannot reach {self.url} ({getattr(e, 'reason', e)}); is the server running, "
                        "and does the URL end in /v1?") from None
        except (ValueError, AttributeError):
            served = None
        for model in models:
            if served is not None and model not in served:
                raise Fatal(f"{self.url} does not serve model {model!r}; it serves: {', '.join(map(str, served))}")
            if served is None:
                try:
                    self.chat(model, "Say OK.", 1, 0.0, retries=1)
                except Rejected:
                    pass  # the model exists; it just did not like this tiny request


# ----------------------------------------------------------------------------------------------------
# 3. The judge: math-verify on the final answer, optionally an LLM on the reasoning.
def strip_think(text: str) -> str:
    """Drops a reasoning model's <think>...</think> block if the server left it in the content."""
    return text.rsplit("</think>", 1)[-1].strip()


def check_answer(content: str, finish_reason, gold: str):
    """-> (the response's final answer or None, why it fails or None). Runs on the main thread only:
    math-verify bounds its work with signal.alarm, which Python allows there and nowhere else."""
    from math_verify import parse, verify
    text = strip_think(content)
    if not text:
        return None, "empty response"
    if finish_reason == "length":
        return None, "truncated (finish_reason=length)"
    answer = last_boxed(text)
    if answer is None:
        return None, "no \\boxed{} answer"
    ok = verify(parse(f"\\boxed{{{gold}}}"), parse(f"\\boxed{{{answer}}}"))
    return answer, None if ok else "wrong answer"


def clean_rationale(content: str, gold: str) -> str:
    """The response with its last \\boxed{...} rewritten to \\boxed{gold} and nothing after it; a math-mode
    opener just before the box ('$\\boxed{7}$') is dropped so no '$' is left unpaired."""
    text = strip_think(content)
    start = text.rfind("\\boxed{")
    head = re.sub(r"(\$\$|\$|\\\[|\\\()\s*$", "", text[:start])
    if len(re.findall(r"(?<!\\)\$", head)) % 2:  # the box sat inside '$ ... $': close the math first
        head = head.rstrip() + "$ "
    return head + f"\\boxed{{{gold}}}"


def parse_verdict(text: str):
    """'PASS', 'FAIL' or None, from the last 'VERDICT: ...' in a judge reply."""
    found = re.findall(r"VERDICT:\s*(PASS|FAIL)", strip_think(text or ""), re.IGNORECASE)
    return found[-1].upper() if found else None


# ----------------------------------------------------------------------------------------------------
# 4. Files. Only the main thread writes; each record is one os.write of a whole line, so an
# interrupted process leaves at most one incomplete last line, which the next run cuts off.
def repair_tail(path: Path) -> bool:
    """Cuts an incomplete last line (a write killed half-way). True if something was cut; a complete
    record that merely lacks its newline (a hand edit) gets the newline instead."""
    if not path.exists() or path.stat().st_size == 0:
        return False
    with open(path, "rb+") as fh:
        data = fh.read()
        if data.endswith(b"\n"):
            return False
        try:
            json.loads(data[data.rfind(b"\n") + 1:])
            fh.write(b"\n")
            return False
        except ValueError:
            fh.truncate(data.rfind(b"\n") + 1)
            return True


class Appender:
    def __init__(self, path: Path, sync: bool, lock: bool = False):
        path.parent.mkdir(parents=True, exist_ok=True)
        self.fd, self.sync = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644), sync
        if lock:  # two builds appending to one file would duplicate problems; the lock dies with the process
            import fcntl
            try:
                fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(self.fd)
                raise BuildError(f"{path} is being written by another build.py; let it finish or stop it first") from None

    def write(self, record: dict):
        data = (json.dumps(record, ensure_ascii=False) + "\n").encode()
        while data:
            data = data[os.write(self.fd, data):]
        if self.sync:
            os.fsync(self.fd)

    def close(self):
        os.close(self.fd)


def read_jsonl(path: Path, hint: str = "") -> list[tuple[str, dict]]:
    """(path:line, record) for each non-blank line of a JSON Lines file. A line that is not UTF-8, not
    JSON, or JSON but not an object is a BuildError naming path:line and what is wrong, then `hint`.
    Lines end at \\n only: a U+2028 inside a JSON string does not split a record."""
    data, hint = path.read_bytes(), f"; {hint}" if hint else ""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:  # all before e.start decodes: the decoder stops at the first bad byte
        line, start = data.count(b"\n", 0, e.start) + 1, data.rfind(b"\n", 0, e.start) + 1
        column = len(data[start:e.start].decode("utf-8")) + 1
        raise BuildError(f"{path}:{line}: not valid UTF-8 (byte 0x{data[e.start]:02x} at column {column})"
                         + hint) from None
    records = []
    for n, line in enumerate(text.split("\n"), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise BuildError(f"{path}:{n}: not valid JSON ({e.msg}, column {e.colno}){hint}") from None
        if not isinstance(record, dict):
            raise BuildError(f"{path}:{n}: expected a JSON object, got {type(record).__name__}{hint}")
        records.append((f"{path}:{n}", record))
    return records


def _type_name(value) -> str:
    return "null" if value is None else type(value).__name__


def read_output(path: Path) -> list[dict]:
    """Rows already built (resume). A bad line is the user's to fix: we never delete finished work."""
    if not path.exists():
        return []
    hint = "fix or delete that line, or choose another --out"
    rows = []
    for where, row in read_jsonl(path, hint):
        def bad(what):
            return BuildError(f"{where}: {what}; {hint}")
        if not isinstance(row.get("id"), str) or not row["id"]:
            raise bad(f"field 'id' must be a non-empty string, got {_type_name(row.get('id'))}")
        rationales = row.get("rationales")
        if not isinstance(rationales, dict):
            raise bad(f"field 'rationales' must be an object with the {len(PERSPECTIVE_KEYS)} "
                      f"perspectives, got {_type_name(rationales)}")
        missing = [k for k in PERSPECTIVE_KEYS if k not in rationales]
        unknown = [k for k in rationales if k not in PERSPECTIVE_KEYS]
        if missing:
            raise bad(f"not a finished problem: 'rationales' lacks {', '.join(missing)}")
        if unknown:
            raise bad(f"'rationales' has unknown perspective(s) {', '.join(map(repr, unknown))}")
        for key, text in rationales.items():
            if not isinstance(text, str):
                raise bad(f"the {key!r} rationale must be a string, got {_type_name(text)}")
        # Not needed to resume, but counted in the quotas (subject, level) or read by mind.py.
        for key, types, what in (("problem", str, "a string"), ("answer", str, "a string"),
                                 ("subject", str, "a string"), ("level", int, "an integer")):
            if key in row and (not isinstance(row[key], types) or isinstance(row[key], bool)):
                raise bad(f"field {key!r} must be {what}, got {_type_name(row[key])}")
        rows.append(row)
    return rows


# The fields of the side log that a resume reads back, by event: (field, type, what, may be null).
# Each must be there; those marked may be null.
_TRY = (("id", str, "a string", False), ("key", str, "a string", False), ("try", int, "an integer", False))
LOG_FIELDS = {
    "teacher": _TRY + (("reason", str, "a string", True), ("rationale", str, "a string", True)),
    "judge": _TRY + (("verdict", str, "a string", True),),
    "dropped": (("id", str, "a string", False),),
}


def read_log(path: Path) -> list[dict]:
    """The side log (resume): tries already paid for are replayed from it, so a line it cannot read is
    named rather than guessed at. Records of other events (retries) are kept but not checked."""
    if not path.exists():
        return []
    hint = "fix or delete that line (what it recorded is then asked for again), or pass another --log"
    records = []
    for where, rec in read_jsonl(path, hint):
        event = rec.get("event")
        for key, types, what, nullable in LOG_FIELDS.get(event, ()) if isinstance(event, str) else ():
            if key not in rec:
                raise BuildError(f"{where}: missing field {key!r} in a {event!r} record; {hint}")
            value = rec[key]
            if (value is None and not nullable) or (value is not None and (not isinstance(value, types)
                                                                          or isinstance(value, bool))):
                raise BuildError(f"{where}: field {key!r} of a {event!r} record must be {what}"
                                 f"{' or null' if nullable else ''}, got {_type_name(value)}; {hint}")
        if event == "teacher" and rec["reason"] is None and rec["rationale"] is None:
            raise BuildError(f"{where}: a passing 'teacher' record (reason null) needs its "
                             f"'rationale'; {hint}")
        records.append(rec)
    return records


# ----------------------------------------------------------------------------------------------------
# 5. The run: stratified admission, eight requests per problem, retries, judging, writing. One thread
# (the main one) owns all of this state; worker threads only wait on HTTP.
class Problem:
    """A candidate in flight and where each of its eight perspectives stands."""
    def __init__(self, cand):
        self.c = cand
        self.passed = {}                                # key -> cleaned rationale that passed every check
        self.tries = collections.Counter()              # key -> teacher requests made (logged or in flight)
        self.unjudged = collections.defaultdict(list)   # key -> [(try, rationale)] waiting for the judge
        self.last_reason = {}                           # key -> why its last try failed
        self.status = "active"                          # -> "kept" or "dropped"


class Run:
    def __init__(self, args, teacher, judge, out, side, rows, log, cells):
        self.args, self.teacher, self.judge, self.out, self.side, self.cells = args, teacher, judge, out, side, cells
        self.targets_s, self.targets_l = scale_targets(SUBJECT_TARGETS, args.n), scale_targets(LEVEL_TARGETS, args.n)
        self.kept_s = collections.Counter(r.get("subject") for r in rows)
        self.kept_l = collections.Counter(r.get("level") for r in rows)
        self.active_s, self.active_l = collections.Counter(), collections.Counter()
        # Resume: every try the log holds for this teacher (and judge), to be replayed instead of re-asked.
        self.cached = collections.defaultdict(list)     # (id, key) -> teacher records
        self.verdicts = {}                              # (id, key, try) -> judge verdict
        for r in log:
            if r.get("event") == "teacher" and r.get("model") == args.teacher_model:
                self.cached[r["id"], r["key"]].append(r)
            elif r.get("event") == "judge" and judge and r.get("model") == args.judge_model:
                self.verdicts[r["id"], r["key"], r["try"]] = r.get("verdict")
        self.futures, self.active = {}, {}              # future -> (kind, problem, key, try, text); id -> Problem
        self.counts = collections.Counter()             # requests made, tries reused
        self.drop_reasons, self.try_failures = collections.Counter(), collections.Counter()
        self.pool = ThreadPoolExecutor(args.workers)
        self.stop = None                                # why the run stops early: "interrupted" or an error
        self.bar = None

    # --- which problem next (3.1, A.2) ---
    def room(self, s, lvl):
        """Places still free in subject s's quota and in level lvl's quota (problems in flight hold one)."""
        return (max(0, self.targets_s.get(s, 0) - self.kept_s[s] - self.active_s[s]),
                max(0, self.targets_l.get(lvl, 0) - self.kept_l[lvl] - self.active_l[lvl]))

    def pick(self):
        """The next candidate: from a cell that a complete plan for the open places uses (so taking it
        cannot strand a quota), preferring the cell whose subject and level quotas are the least filled."""
        plan = plan_cells({s: self.room(s, None)[0] for s in SUBJECT_TARGETS},
                          {lvl: self.room(None, lvl)[1] for lvl in LEVEL_TARGETS},
                          {cell: len(pool) for cell, pool in self.cells.items()})
        fill = lambda c: self.room(*c)[0] / self.targets_s[c[0]] * self.room(*c)[1] / self.targets_l[c[1]]
        best = max((c for c in plan if plan[c] > 0), key=fill, default=None)
        return self.cells[best].popleft() if best else None

    def admit(self, cand):
        p = self.active[cand["id"]] = Problem(cand)
        self.active_s[cand["subject"]] += 1
        self.active_l[cand["level"]] += 1
        for key in PERSPECTIVE_KEYS:  # replay what the log already holds: those tries are paid for
            for r in self.cached.get((cand["id"], key), []):
                p.tries[key] = max(p.tries[key], r["try"])
                self.counts["tries reused from the log"] += 1
                verdict = self.verdicts.get((cand["id"], key, r["try"]), "unjudged")
                if r["reason"]:
                    p.last_reason[key] = r["reason"]
                elif not self.judge or verdict == "PASS":
                    p.passed.setdefault(key, r["rationale"])
                elif verdict == "unjudged":
                    p.unjudged[key].append((r["try"], r["rationale"]))
                else:
                    p.last_reason[key] = "judge: FAIL" if verdict == "FAIL" else "judge: no verdict"
        for key in PERSPECTIVE_KEYS:
            self.advance(p, key)
        self.finish_if_complete(p)

    # --- one perspective at a time ---
    def submit(self, kind, p, key, t, text=None):
        if self.stop:
            return  # stopping: ask for nothing new
        a = self.args
        if kind == "teacher":
            call = (self.teacher.chat, a.teacher_model, teacher_prompt(p.c["problem"], key), a.max_tokens, a.temperature)
        else:
            call = (self.judge.chat, a.judge_model, judge_prompt(p.c["problem"], p.c["answer"], key, text),
                    a.max_tokens, 0.0)
        self.futures[self.pool.submit(*call)] = (kind, p, key, t, text)
        self.counts[f"{kind} requests"] += 1

    def advance(self, p, key):
        """Next step for one perspective: nothing (passed), judge a waiting rationale, ask the teacher
        again, or, with all tries spent, drop the whole problem (the all-eight rule)."""
        if p.status != "active" or key in p.passed:
            return
        if p.unjudged[key]:
            t, text = p.unjudged[key].pop(0)
            self.submit("judge", p, key, t, text)
        elif p.tries[key] < self.args.max_tries:
            p.tries[key] += 1
            self.submit("teacher", p, key, p.tries[key])
        else:
            self.finish(p, f"{key}: {p.last_reason.get(key, '?')}")

    def handle(self, f):
        """A response is in: log it raw, judge it, and move its perspective on."""
        kind, p, key, t, text = self.futures.pop(f)
        try:
            content, finish_reason, notes = f.result()  # Fatal propagates: the run stops
            reason = None
        except Rejected as e:
            content, finish_reason, notes, reason = "", None, [], f"request rejected ({e})"
        for note in notes:
            self.side.write({"event": "retry", "kind": kind, "id": p.c["id"], "key": key, "try": t, "error": note})
        if kind == "teacher":
            answer = None
            if reason is None:
                answer, reason = check_answer(content, finish_reason, p.c["answer"])
            rationale = None if reason else clean_rationale(content, p.c["answer"])
            self.side.write({"event": "teacher", "id": p.c["id"], "key": key, "try": t, "model": self.args.teacher_model,
                             "finish_reason": finish_reason, "content": content, "answer": answer, "reason": reason,
                             "rationale": rationale})
            if reason is None and self.judge:
                p.unjudged[key].append((t, rationale))
            elif reason is None:
                p.passed[key] = rationale
        else:
            verdict = parse_verdict(content)
            self.side.write({"event": "judge", "id": p.c["id"], "key": key, "try": t, "model": self.args.judge_model,
                             "content": content, "verdict": verdict})
            if verdict == "PASS":
                p.passed[key] = text
            else:
                reason = reason or ("judge: FAIL" if verdict == "FAIL" else "judge: no verdict")
        if p.status != "active":
            return  # dropped meanwhile: the response is logged, nothing more to do
        if reason:
            p.last_reason[key] = reason
            self.try_failures[reason.split(" (")[0]] += 1
        self.advance(p, key)
        self.finish_if_complete(p)

    # --- the end of a problem ---
    def finish_if_complete(self, p):
        if p.status == "active" and len(p.passed) == len(PERSPECTIVE_KEYS):
            self.finish(p)

    def finish(self, p, drop_reason=None):
        p.status = "dropped" if drop_reason else "kept"
        del self.active[p.c["id"]]
        self.active_s[p.c["subject"]] -= 1
        self.active_l[p.c["level"]] -= 1
        if drop_reason:
            for f, (_, q, *_) in list(self.futures.items()):
                if q is p and f.cancel():  # not started yet: do not pay for it
                    del self.futures[f]
            self.side.write({"event": "dropped", "id": p.c["id"], "model": self.args.teacher_model, "reason": drop_reason})
            self.drop_reasons[drop_reason.split(": ", 1)[1].split(" (")[0]] += 1
        else:
            self.out.write({**p.c, "rationales": {k: p.passed[k] for k in PERSPECTIVE_KEYS}})
            self.kept_s[p.c["subject"]] += 1
            self.kept_l[p.c["level"]] += 1
            self.bar.update(1)

    # --- the loop ---
    def handle_done(self, done):
        for f in done:
            if f in self.futures:  # not cancelled meanwhile by a drop
                try:
                    self.handle(f)
                except Fatal as e:
                    self.stop = self.stop or str(e)

    def loop(self, n_kept):
        from tqdm.auto import tqdm
        self.bar = tqdm(total=self.args.n, initial=min(n_kept, self.args.n), unit="problem", dynamic_ncols=True)
        try:
            while True:
                while not self.stop and len(self.futures) < self.args.workers and (cand := self.pick()):
                    self.admit(cand)
                if not self.futures or self.stop:
                    break
                self.handle_done(wait(list(self.futures), timeout=0.2, return_when=FIRST_COMPLETED)[0])
                n_requests = self.counts["teacher requests"] + self.counts["judge requests"]
                self.bar.set_postfix(kept=sum(self.kept_s.values()), dropped=sum(self.drop_reasons.values()),
                                     active=len(self.active), requests=n_requests)
            # Stopping: responses that have already arrived are logged (and may still complete a problem).
            self.handle_done([f for f in self.futures if f.done() and not f.cancelled()])
        finally:
            self.bar.close()
            self.pool.shutdown(wait=False, cancel_futures=True)  # requests in flight are abandoned, not awaited


class _Help(argparse.ArgumentDefaultsHelpFormatter):
    def _get_help_string(self, action):  # no "(default: None)" where the help says what None means
        return action.help if action.default is None else super()._get_help_string(action)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=_Help)
    p.add_argument("--source", default="EleutherAI/hendrycks_math",
                   help="Hub dataset with MATH's seven subject configs (train split), or a local .jsonl in MATH's layout")
    p.add_argument("--out", default=None, help="output JSONL, the data/sample.jsonl schema [default: data/mind_math.jsonl]")
    p.add_argument("--log", default=None, help="side log of every raw response [default: OUT with .raw.jsonl]")
    p.add_argument("--n", type=int, default=497, help="problems to keep [paper: 497, Tables 6-7]")
    p.add_argument("--seed", type=int, default=0, help="seed of the candidate order")
    p.add_argument("--teacher-url", default="http://localhost:8000/v1", help="OpenAI-compatible base URL")
    p.add_argument("--teacher-model", default="Qwen/Qwen3-235B-A22B", help="teacher model name [paper: Qwen3-235B]")
    p.add_argument("--api-key-env", default="OPENAI_API_KEY",
                   help="environment variable holding the API key (unset: none sent)")
    p.add_argument("--judge-model", default=None,
                   help="also ask this model whether each rationale is sound and follows its perspective")
    p.add_argument("--judge-url", default=None, help="endpoint of the judge [default: --teacher-url]")
    p.add_argument("--max-tries", type=int, default=3, help="teacher requests per perspective before a problem is dropped")
    p.add_argument("--workers", type=int, default=16, help="requests in flight at once")
    p.add_argument("--temperature", type=float, default=0.7, help="teacher sampling temperature (the judge uses 0)")
    p.add_argument("--max-tokens", type=int, default=4096, help="teacher max_tokens; a longer answer is a failed try")
    p.add_argument("--timeout", type=float, default=600, help="seconds to wait for one response")
    p.add_argument("--http-retries", type=int, default=8, help="retries of a request on 429, 5xx, timeouts, bad bodies")
    p.add_argument("--retry-wait", type=float, default=1.0,
                   help="first backoff in seconds, doubled at each retry (at most 60)")
    p.add_argument("--extra-body", default="{}", help="JSON merged into every request, e.g. "
                   "'{\"chat_template_kwargs\": {\"enable_thinking\": false}}' for Qwen3 on vLLM/SGLang")
    a = p.parse_args(argv)
    try:
        a.extra_body = json.loads(a.extra_body)
        assert isinstance(a.extra_body, dict)
    except (ValueError, AssertionError):
        p.error(f"--extra-body must be a JSON object, got {a.extra_body!r}")
    for name in ("n", "max_tries", "workers", "max_tokens"):
        if getattr(a, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1")
    a.out = Path(a.out) if a.out else HERE / "mind_math.jsonl"
    a.log = Path(a.log) if a.log else a.out.with_suffix(".raw.jsonl")
    return a


SHIPPED = ("mind497.jsonl", "mind497.blind.jsonl", "sample.jsonl")  # written for this repository


def refuse_shipped(*paths) -> None:
    """The shipped sets are never a build's output or side log: they are not the teacher's."""
    for path in paths:
        if path.resolve() in {(HERE / name).resolve() for name in SHIPPED}:
            raise BuildError(f"{path} is a set shipped with this repository; data/build.py does not "
                             f"write or append to it: choose another --out or --log")


def main(argv=None) -> int:
    args = parse_args(argv)
    refuse_shipped(args.out, args.log)
    try:
        import math_verify  # noqa: F401  (used by check_answer; missing it should fail now, not mid-run)
    except ImportError:
        raise BuildError("math-verify is needed to check answers: pip install math-verify") from None
    teacher = Endpoint(args.teacher_url, args.api_key_env, args.timeout, args.http_retries, args.retry_wait, args.extra_body)
    judge = None
    if args.judge_model:
        judge = Endpoint(args.judge_url or args.teacher_url, args.api_key_env, args.timeout, args.http_retries,
                         args.retry_wait, args.extra_body)
    if judge and judge.url != teacher.url:
        teacher.preflight([args.teacher_model])
        judge.preflight([args.judge_model])
    else:
        teacher.preflight([args.teacher_model] + ([args.judge_model] if judge else []))
    source = load_source(args.source)
    out = Appender(args.out, sync=True, lock=True)
    try:
        return run(args, teacher, judge, source, out)
    finally:
        out.close()


def run(args, teacher, judge, source, out) -> int:
    for path in (args.out, args.log):
        if repair_tail(path):
            print(f"note: cut an incomplete last line from {path} (a write was interrupted)")
    rows = read_output(args.out)
    log = read_log(args.log)
    candidates, skipped = source
    kept_ids = {r["id"] for r in rows}
    dropped_ids = {r["id"] for r in log if r.get("event") == "dropped" and r.get("model") == args.teacher_model}
    # The candidate order: a seeded shuffle inside each (subject, level) cell.
    rng, cells = random.Random(args.seed), {}
    for s in SUBJECT_TARGETS:
        for lvl in LEVEL_TARGETS:
            pool = sorted((c for c in candidates if c["subject"] == s and c["level"] == lvl
                           and c["id"] not in kept_ids and c["id"] not in dropped_ids), key=lambda c: c["id"])
            rng.shuffle(pool)
            cells[s, lvl] = collections.deque(pool)
    print(f"source: {len(candidates)} usable problems from {args.source}"
          + "".join(f"; skipped {v} ({k})" for k, v in skipped.items()))
    print(f"target: {args.n} problems; {len(rows)} already in {args.out}, {len(dropped_ids)} dropped before")

    side = Appender(args.log, sync=False)
    r = Run(args, teacher, judge, out, side, rows, log, cells)

    def on_sigint(*_):
        if r.stop == "interrupted":
            os._exit(130)  # a second Ctrl-C: leave now (a cut line is repaired by the next run)
        r.stop = "interrupted"
    old_handler = signal.signal(signal.SIGINT, on_sigint)
    try:
        r.loop(len(rows))
    finally:
        signal.signal(signal.SIGINT, old_handler)
        side.close()

    print_summary(args, r)
    if r.stop == "interrupted":
        print(f"interrupted: {args.out} holds every finished problem; run the same command to resume")
        return 130
    if r.stop:
        print(f"error: {r.stop}\n{args.out} holds every finished problem; run the same command to resume", file=sys.stderr)
        return 1
    short = [s for s, t in r.targets_s.items() if r.kept_s[s] < t] + \
            [f"level {lvl}" for lvl, t in r.targets_l.items() if r.kept_l[lvl] < t]
    if short:
        print(f"warning: kept {sum(r.kept_l[lvl] for lvl in r.targets_l)} of {args.n}: no candidate left in the "
              f"source fits the quotas still open ({', '.join(short)}); a larger source or another --seed would fill them")
    print(f"wrote {args.out}")
    return 0


def print_summary(args, r):
    """The achieved subject and level tables beside their targets, why problems were dropped, what was asked."""
    lines = [f"{'subject':<26}{'kept':>6}{'target':>8}"]
    lines += [f"{s:<26}{r.kept_s[s]:>6}{t:>8}" for s, t in r.targets_s.items()]
    lines += [f"{'level':<26}{'kept':>6}{'target':>8}"]
    lines += [f"{'Level ' + str(lvl):<26}{r.kept_l[lvl]:>6}{t:>8}" for lvl, t in r.targets_l.items()]
    lines += [f"{'total':<26}{sum(r.kept_l[lvl] for lvl in r.targets_l):>6}{args.n:>8}"]
    print("\n".join(lines))
    if r.drop_reasons:
        print("dropped problems, by why their failing perspective ran out of tries: "
              + ", ".join(f"{k} {v}" for k, v in r.drop_reasons.most_common()))
    if r.try_failures:
        print("failed tries: " + ", ".join(f"{k} {v}" for k, v in r.try_failures.most_common()))
    print("this run: " + (", ".join(f"{k} {v}" for k, v in sorted(r.counts.items())) or "no requests"))


if __name__ == "__main__":
    try:
        code = main()
    except BuildError as e:
        print(f"error: {e}", file=sys.stderr)
        code = 2
    except KeyboardInterrupt:  # before the run loop starts: nothing has been written yet
        print("interrupted", file=sys.stderr)
        code = 130
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)  # not sys.exit: it would wait for worker threads stuck in requests nobody needs any more
