"""Check the shipped training set, data/mind497.jsonl, and rerun its answer verification.

Every problem of the set has a gold answer written by its author (with the computation that settles
it) and a second answer from a blind solver who saw only the problem; the blind answers are kept
beside the data in data/mind497.blind.jsonl. This script checks, with the same math-verify rule as
the paper's filter (data/build.py's check_answer):
  1. the schema of every row (that of data/sample.jsonl) and unique ids;
  2. that all eight rationales of every problem end in \\boxed{} with the gold answer;
  3. that every blind answer equals the gold one (the agreement figures of data/README.md);
  4. with --full, the subject and level counts of the paper's Tables 6 and 7.
It prints the statistics of the card: the subject x level table and rationale lengths in words, per
perspective and per level. Exit status 0 when everything holds, 1 otherwise.

Usage:
  python data/verify.py                                   # the shipped set, counts included
  python data/verify.py BLOCK.jsonl --blind ANSWERS.jsonl --partial   # one block while it is written
"""
import argparse, collections, statistics, sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from build import LEVEL_TARGETS, SUBJECT_TARGETS, BuildError, check_answer, read_jsonl  # noqa: E402
from prompts import PERSPECTIVE_KEYS  # noqa: E402  (build.py put the repository root on the path)

DATA, BLIND = HERE / "mind497.jsonl", HERE / "mind497.blind.jsonl"


def schema_errors(where: str, row: dict) -> list[str]:
    """What is wrong with one row's fields, each message starting with file:line."""
    fields = {"id": str, "problem": str, "answer": str, "subject": str, "level": int, "rationales": dict}
    bad = [f"{where}: '{k}' missing or not {t.__name__}" for k, t in fields.items()
           if not isinstance(row.get(k), t) or (t is str and not row[k].strip())]
    if bad:
        return bad
    if row["subject"] not in SUBJECT_TARGETS:
        bad.append(f"{where}: subject '{row['subject']}' is not one of MATH's seven")
    if row["level"] not in LEVEL_TARGETS:
        bad.append(f"{where}: level {row['level']} is not 1-5")
    if set(row["rationales"]) != set(PERSPECTIVE_KEYS):
        bad.append(f"{where}: rationales must have exactly the keys {', '.join(PERSPECTIVE_KEYS)}")
    return bad


def answer_errors(where: str, row: dict) -> list[str]:
    """The paper's filter on all eight rationales: the last \\boxed{} equals the gold answer by
    math-verify. As data/build.py leaves its rationales, each must also end in exactly
    \\boxed{gold}, the gold answer's own text, with nothing after it."""
    bad, end = [], f"\\boxed{{{row['answer']}}}"
    for k in PERSPECTIVE_KEYS:
        text = row["rationales"][k]
        boxed, why = check_answer(text, "stop", row["answer"]) if isinstance(text, str) else (None, "")
        if why is None and not text.rstrip().endswith(end):
            why = f"does not end in {end}"
        if why is not None:
            bad.append(f"{where} ({row['id']}, {k}): {why or 'not a string'} (boxed {boxed!r}, "
                       f"gold {row['answer']!r})")
    return bad


def compare_blind(rows: dict, blind: list) -> tuple[int, list[str]]:
    """(agreeing problems, messages) for the blind answers against the gold ones, by math-verify."""
    agree, bad, seen = 0, [], set()
    for where, b in blind:
        pid, answer = b.get("id"), b.get("answer")
        if pid not in rows or not isinstance(answer, str):
            bad.append(f"{where}: no problem with id {pid!r} in the data, or no answer string")
            continue
        seen.add(pid)
        _, why = check_answer(f"\\boxed{{{answer}}}", "stop", rows[pid]["answer"])
        if why:
            bad.append(f"{where} ({pid}): blind answer {answer!r}, gold {rows[pid]['answer']!r}")
        else:
            agree += 1
    bad += [f"{pid}: no blind answer" for pid in rows if pid not in seen]
    return agree, bad


def words(text: str) -> int:
    return len(text.split())


def markdown_stats(rows: list[dict]) -> str:
    """The card's tables: subject x level counts, then rationale words per perspective and level."""
    cells = collections.Counter((r["subject"], r["level"]) for r in rows)
    levels = sorted(LEVEL_TARGETS)
    out = ["| subject | " + " | ".join(f"L{n}" for n in levels) + " | total |",
           "|---" * (len(levels) + 2) + "|"]
    for s in SUBJECT_TARGETS:
        counts = [cells[s, n] for n in levels]
        out.append(f"| {s} | " + " | ".join(map(str, counts)) + f" | {sum(counts)} |")
    totals = [sum(cells[s, n] for s in SUBJECT_TARGETS) for n in levels]
    out += ["| **total** | " + " | ".join(map(str, totals)) + f" | **{len(rows)}** |", ""]

    def line(name, lengths):
        return (f"| {name} | {len(lengths)} | {min(lengths)} | {statistics.median(lengths):.0f} | "
                f"{statistics.mean(lengths):.0f} | {max(lengths)} |")
    out += ["| rationales | n | min words | median | mean | max |", "|---|---|---|---|---|---|"]
    out += [line(k, [words(r["rationales"][k]) for r in rows]) for k in PERSPECTIVE_KEYS]
    out += [line(f"level {n}", [words(t) for r in rows if r["level"] == n
                                for t in r["rationales"].values()]) for n in levels
            if any(r["level"] == n for r in rows)]
    return "\n".join(out)


def count_errors(rows: list[dict]) -> list[str]:
    """The paper's Table 6 (subjects) and Table 7 (levels), exactly."""
    bad = []
    for name, key, want in (("subject", "subject", SUBJECT_TARGETS), ("level", "level", LEVEL_TARGETS)):
        got = collections.Counter(r[key] for r in rows)
        bad += [f"{name} {v}: {got[v]} problems, the paper has {n}" for v, n in want.items()
                if got[v] != n]
    return bad


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("data", nargs="?", default=str(DATA), help="the data file (JSON Lines)")
    ap.add_argument("--blind", default=None, help="the blind answers (default: beside the data)")
    ap.add_argument("--partial", action="store_true", help="skip the Table 6/7 counts")
    args = ap.parse_args(argv)
    data = Path(args.data)
    blind_path = Path(args.blind) if args.blind else data.with_suffix(".blind.jsonl")
    try:
        records, blind = read_jsonl(data), read_jsonl(blind_path)
    except (BuildError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    bad, rows, n_wrong = [], {}, 0
    for where, row in records:
        errors = schema_errors(where, row)
        if not errors and row["id"] in rows:
            errors = [f"{where}: id {row['id']!r} appears twice"]
        wrong = [] if errors else answer_errors(where, row)
        n_wrong += len(wrong)
        bad += errors + wrong
        if not errors:
            rows[row["id"]] = row
    agree, blind_bad = compare_blind(rows, blind)
    bad += blind_bad
    if not args.partial:
        bad += count_errors(list(rows.values()))
    print(markdown_stats(list(rows.values())))
    print(f"\n{len(rows)} problems; {8 * len(rows) - n_wrong} of {8 * len(rows)} rationales end in the gold answer; "
          f"blind answers agree on {agree} of {len(rows)}")
    for m in bad:
        print(m, file=sys.stderr)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
