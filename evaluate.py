"""Put a base or MIND-distilled student into the paper's Table 1 (Cui et al., ACL 2026, Section 4).

Six benchmarks, zero-shot, greedy: MATH500, GSM8K, SVAMP (in distribution) and CommonsenseQA,
StrategyQA, GPQA-Diamond (out of distribution). The prompt is prompts.eval_prompt inside the
student's chat template; the final answer is read from the last \\boxed{} and scored as follows
(``extract_answer`` and ``is_correct`` below can be imported and reused):
  math500           math-verify equivalence with the gold LaTeX (\\frac{1}{2} = 0.5, 10\\% = 10, ...)
  gsm8k, svamp      the boxed answer, else the last number; commas, $ and % dropped; compared as numbers
  csqa, gpqa        the boxed letter, else "Answer: X" / "answer is X", else the last standalone letter
  strategyqa        the boxed yes/no, else the last "yes" or "no" in the text
Accuracy is over every question scored: an answer that cannot be parsed counts as wrong, and how many
were unparsed is reported beside it. A row that cannot be asked, because a field it needs is missing or
empty (an empty GPQA option cell, a blank problem), is skipped: said on stderr, counted in the table and
listed with its reason in the results (n_total rows read = n_scored + n_skipped). A field of another type
or a file that is not UTF-8 or not JSON stops the run instead, naming file:line. Nothing is tuned on
these splits.

Choices of ours, where the paper says nothing: the final answer is the LAST \\boxed{} (two boxes: the
second wins); GPQA's four options are shuffled per question by random.Random(f"{seed}:{index}"), the
seed and the order are saved; decoding is pure greedy (the model's own repetition penalty or sampling
defaults are not applied, on either backend); the hf backend merges an adapter into the weights.

Speed (issue 11): the hf backend decodes with a static KV cache and fixed shapes, so that transformers compiles
the decoding step (CUDA only), in large batches sized to the free GPU memory (make_decoder). Its greedy
completions are those of the plain path (--decode plain, the dynamic cache used before), token for token in fp32.

Usage:
  python evaluate.py --student Qwen/Qwen2.5-1.5B-Instruct --bench all                 # the base row
  python evaluate.py --student Qwen/Qwen2.5-1.5B-Instruct --adapter runs/mind/adapter --with-base
  python evaluate.py --student ... --backend vllm                   # if vllm is installed
  python evaluate.py --student runs/tiny/tiny-student --local data/fixtures/eval --max-new-tokens 32
  python evaluate.py --table runs/eval/*.json                       # one table from saved results
  python evaluate.py --speed-test                                   # plain vs fast decoding, one table
Each row writes OUT/<row>.json (every prompt, completion, extracted answer and verdict, and the generation
time and new tokens/s) after every benchmark, and a rerun with the same settings reuses the benchmarks
already done; OUT/table.md holds the table. Rows run one after another, and each row's model is freed
before the next one loads.
"""
import argparse, csv, gc, io, json, math, os, random, re, sys, threading, time
from pathlib import Path

from prompts import eval_prompt, last_boxed, plain_prompt

# ----------------------------------------------------------------------------------------------------
# The six benchmarks of Table 1: Hub id, config, split, expected size, prompt kind, fields a row needs.
BENCHES = {
    "math500": dict(name="MATH500", hub="HuggingFaceH4/MATH-500", config=None, split="test", size=500,
                    kind="math", fields=("problem", "answer"), id="unique_id"),
    "gsm8k": dict(name="GSM8K", hub="openai/gsm8k", config="main", split="test", size=1319,
                  kind="math", fields=("question", "answer"), id=None),
    "svamp": dict(name="SVAMP", hub="ChilleD/SVAMP", config=None, split="test", size=300,
                  kind="math", fields=("Body", "Question", "Answer"), id="ID"),
    "csqa": dict(name="CSQA", hub="tau/commonsense_qa", config=None, split="validation", size=1221,
                 kind="choice", fields=("question", "choices", "answerKey"), id="id"),  # test labels are hidden
    "strategyqa": dict(name="StrategyQA", hub="ChilleD/StrategyQA", config=None, split="test", size=687,
                       kind="yesno", fields=("question", "answer"), id="qid"),
    "gpqa": dict(name="GPQA-D", hub="Idavidrein/gpqa", config="gpqa_diamond", split="train", size=198,
                 kind="choice", fields=("Question", "Correct Answer", "Incorrect Answer 1",
                                        "Incorrect Answer 2", "Incorrect Answer 3"), id="Record ID"),
}
# The types each needed field may have: (types, in words). Another type stops the run (file:line);
# a field that is missing, null or blank only skips its row (make_item).
_TEXT, _TEXT_OR_NUMBER = ((str,), "a string"), ((str, int, float), "a string or a number")
FIELD_TYPES = {
    "math500": {"problem": _TEXT, "answer": _TEXT_OR_NUMBER},
    "gsm8k": {"question": _TEXT, "answer": _TEXT},
    "svamp": {"Body": _TEXT, "Question": _TEXT, "Answer": _TEXT_OR_NUMBER},
    "csqa": {"question": _TEXT, "choices": ((dict,), "an object {'label': [...], 'text': [...]}"),
             "answerKey": _TEXT},
    "strategyqa": {"question": _TEXT, "answer": ((bool, str), "true/false or yes/no")},
    "gpqa": {f: _TEXT if f == "Question" else _TEXT_OR_NUMBER for f in BENCHES["gpqa"]["fields"]},
}
IN_DIST, OUT_DIST = ("math500", "gsm8k", "svamp"), ("csqa", "strategyqa", "gpqa")
LETTERS = {"csqa": "ABCDE", "gpqa": "ABCD"}


class EvalError(Exception):
    """Bad input or setup; main() prints the message alone and exits with status 2."""


class SkipRow(Exception):
    """A benchmark row that cannot be asked (a needed field is missing or empty): the question is left
    out of the scoring, and the results say which row and why."""


# ----------------------------------------------------------------------------------------------------
# 1. Scoring. extract_answer(bench, completion) -> str or None (None = unparsed, counted wrong);
#    is_correct(bench, completion, gold) -> bool, with gold as the loaders below give it.
def _mv_timeout():
    """math-verify bounds its work with signal.alarm, which Python allows on the main thread only.
    Elsewhere (a thread pool, a web server) we switch its timeouts off instead of letting it raise."""
    return 5 if threading.current_thread() is threading.main_thread() else None


def _math_parse(completion: str):
    """(math-verify's parse of the final answer, the answer as text). The final answer is the last
    \\boxed{}; without one, math-verify looks for an answer anywhere in the text."""
    from math_verify import parse
    box = last_boxed(completion)
    parsed = parse(completion if box is None else "\\boxed{" + box + "}", parsing_timeout=_mv_timeout())
    if box is not None:
        return parsed, box.strip()
    return parsed, (str(parsed[0]) if parsed else None)  # the value math-verify read (or its raw match)


_FRAC = re.compile(r"\\[dt]?frac\s*\{\s*(-?\d+(?:\.\d+)?)\s*\}\s*\{\s*(-?\d+(?:\.\d+)?)\s*\}"  # \frac{a}{b}
                   r"|\\[dt]?frac\s*(\d)(\d)"                                                # \frac12
                   r"|(?<![\d.])(-?\d+(?:\.\d+)?)\s*/\s*(\d+(?:\.\d+)?)(?![\d.])")           # a/b
_NUMBER = re.compile(r"(?<![\d.])-?\d+(?:\.\d+)?")  # a minus sign right after a digit is subtraction


def _last_number(text: str) -> float | None:
    """The last number in `text`, after thousands separators are dropped and fractions evaluated."""
    text = text.replace("{,}", ",").replace("\\,", ",").replace("\\!", "")
    text = re.sub(r"(?<=\d),(?=\d{3}(?!\d))", "", text)  # 1,000,000 -> 1000000 ($, \% and units are ignored)

    def value(m):  # one of the three alternatives matched: its two groups are numerator and denominator
        a, b = (float(g) for g in m.groups() if g is not None)
        return repr(a / b) if b else m.group(0)
    found = _NUMBER.findall(_FRAC.sub(value, text))
    return float(found[-1]) if found else None


def _fmt_number(x: float) -> str:
    return str(int(x)) if x.is_integer() else repr(x)


def _letter(completion: str, letters: str) -> str | None:
    box = last_boxed(completion)
    if box is not None:  # \boxed{C}, \boxed{(C)}, \boxed{\text{C. Paris}}
        inner = re.sub(r"\\(?:text|textbf|mathrm|mathbf)\s*\{([^{}]*)\}", r"\1", box).strip(" $*")
        m = re.match(rf"\(?([{letters}])\)?(?![A-Za-z0-9])", inner)
        if m:
            return m.group(1)
    said = re.findall(rf"(?i:answer)(?:\s+(?i:is))?\s*[:：]?\s*\**\s*\(?([{letters}])\)?(?![A-Za-z0-9])", completion)
    if said:  # "Answer: C", "The answer is (C)"
        return said[-1]
    # A letter in parentheses, or alone; a capital "A" starting a phrase ("A cat ...") is an article.
    alone = re.findall(rf"\(([{letters}])\)|(?<![A-Za-z0-9(])([{letters}])(?![A-Za-z0-9)])(?!\s+[a-z])", completion)
    return (alone[-1][0] or alone[-1][1]) if alone else None


def _yes_no(completion: str) -> str | None:
    box = last_boxed(completion)
    if box is not None:  # \boxed{Yes.}, \boxed{\text{no}}
        m = re.match(r"\W*(?:\\text\w*\s*\{\s*)?(yes|no|true|false)\b", box.strip(), re.I)
        if m:
            return {"true": "yes", "false": "no"}.get(m.group(1).lower(), m.group(1).lower())
    found = re.findall(r"\b(yes|no)\b", completion, re.I)
    return found[-1].lower() if found else None


def extract_answer(bench: str, completion: str) -> str | None:
    """The final answer a completion gives, normalised, or None when none can be read."""
    if bench == "math500":
        return _math_parse(completion)[1]
    if bench in ("gsm8k", "svamp"):
        box = last_boxed(completion)
        x = _last_number(box) if box is not None else None
        x = _last_number(completion) if x is None else x  # no box, or a box without a number
        return None if x is None else _fmt_number(x)
    if bench in LETTERS:
        return _letter(completion, LETTERS[bench])
    if bench == "strategyqa":
        return _yes_no(completion)
    raise ValueError(f"unknown benchmark {bench!r}; expected one of {', '.join(BENCHES)}")


def is_correct(bench: str, completion: str, gold) -> bool:
    """gold: LaTeX (math500), a number (gsm8k, svamp), a letter (csqa, gpqa), yes/no or bool (strategyqa)."""
    if bench == "math500":
        from math_verify import parse, verify
        parsed, _ = _math_parse(completion)
        gold_parsed = parse("\\boxed{" + str(gold) + "}", parsing_timeout=_mv_timeout())
        return bool(parsed) and verify(gold_parsed, parsed, timeout_seconds=_mv_timeout())
    pred = extract_answer(bench, completion)
    if pred is None:
        return False
    if bench in ("gsm8k", "svamp"):
        g = _last_number(str(gold))
        return g is not None and math.isclose(float(pred), g, rel_tol=1e-6, abs_tol=1e-6)
    if bench == "strategyqa":
        return pred == ({True: "yes", False: "no"}[gold] if isinstance(gold, bool) else str(gold).strip().lower())
    return pred == str(gold).strip().strip("()")  # a letter


# ----------------------------------------------------------------------------------------------------
# 2. Benchmarks: Hub rows or a local file in the same layout -> items {index, id, question, gold, ...}.
def decode_utf8(path, data: bytes) -> str:
    """data as text; bytes that are not UTF-8 are an EvalError naming path:line and the column."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:  # all before e.start decodes: the decoder stops at the first bad byte
        line, start = data.count(b"\n", 0, e.start) + 1, data.rfind(b"\n", 0, e.start) + 1
        column = len(data[start:e.start].decode("utf-8")) + 1
        raise EvalError(f"{path}:{line}: not valid UTF-8 (byte 0x{data[e.start]:02x} at column {column})"
                        ) from None


def read_jsonl(path: Path, text: str) -> list[tuple[str, object]]:
    """(path:line, value) for each non-blank line of JSON Lines text. Lines end at \\n only (a U+2028
    inside a JSON string is no line break, as str.splitlines would have it)."""
    rows = []
    for n, line in enumerate(text.split("\n"), 1):
        if line.strip():
            try:
                rows.append((f"{path}:{n}", json.loads(line)))
            except json.JSONDecodeError as e:
                raise EvalError(f"{path}:{n}: not valid JSON ({e.msg}, column {e.colno})") from None
    return rows


def read_local(path: Path) -> list[tuple[str, dict]]:
    """Rows of a .jsonl, .json, .csv or .parquet file, each with where it came from (file:line)."""
    if not path.is_file():
        raise EvalError(f"{path}: no such file")
    suffix = path.suffix.lower()
    rows = []
    if suffix in (".jsonl", ".json"):
        text = decode_utf8(path, path.read_bytes())
        if suffix == ".json" and text.lstrip().startswith("["):
            try:
                rows = [(f"{path}: item {i + 1}", r) for i, r in enumerate(json.loads(text))]
            except json.JSONDecodeError as e:
                raise EvalError(f"{path}:{e.lineno}: not valid JSON ({e.msg}, column {e.colno})") from None
        else:
            rows = read_jsonl(path, text)
    elif suffix == ".csv":
        data = path.read_bytes()  # a spreadsheet's byte order mark is no part of the first column's name
        text = decode_utf8(path, data[3:] if data.startswith(b"\xef\xbb\xbf") else data)
        reader, start = csv.DictReader(io.StringIO(text, newline="")), 2
        try:
            for row in reader:
                rows.append((f"{path}:{start}", row))
                start = reader.line_num + 1
        except csv.Error as e:
            raise EvalError(f"{path}:{reader.line_num}: not valid CSV ({e})") from None
    elif suffix == ".parquet":
        from datasets import Dataset
        try:
            ds = Dataset.from_parquet(str(path))
        except Exception as e:  # pyarrow's errors for a file that is not Parquet, or a cut one
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise EvalError(f"{path}: not a readable Parquet file ({first})") from None
        rows = [(f"{path}: row {i + 1}", r) for i, r in enumerate(ds)]
    else:
        raise EvalError(f"{path}: unknown file type (use .jsonl, .json, .csv or .parquet)")
    for where, row in rows:
        if not isinstance(row, dict):
            raise EvalError(f"{where}: expected a JSON object, got {type(row).__name__}")
    return rows


def load_hub(bench: str) -> list[tuple[str, dict]]:
    spec = BENCHES[bench]
    from datasets import load_dataset
    where = f"{spec['hub']}" + (f" ({spec['config']})" if spec["config"] else "") + f", split {spec['split']}"
    try:
        ds = load_dataset(spec["hub"], spec["config"], split=spec["split"])
    except Exception as e:  # network, authentication, a renamed split: one line, then the way out
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        hint = (" GPQA is gated: accept its terms on https://huggingface.co/datasets/Idavidrein/gpqa, then run "
                "`hf auth login` or set HF_TOKEN." if bench == "gpqa" else "")
        raise EvalError(f"{bench}: could not load {where}: {first}.{hint} Or pass --local {bench}=FILE.") from None
    if len(ds) != spec["size"]:
        print(f"warning: {bench}: {where} has {len(ds)} rows, Table 1 uses {spec['size']}", file=sys.stderr)
    return [(f"{spec['hub']} row {i + 1}", r) for i, r in enumerate(ds)]


def _blank(value) -> bool:
    """null, a string of nothing but white space, or an empty list or object (False and 0 are answers)."""
    return value is None or (isinstance(value, str) and not value.strip()) or (
        isinstance(value, (list, dict)) and not value)


def _fields(kind: str, names: list[str]) -> str:
    return f"{kind} field{'s' if len(names) > 1 else ''} {', '.join(map(repr, names))}"


def make_item(bench: str, row: dict, where: str, index: int, seed: int) -> dict:
    """One question in a common form; `where` names the row in messages. A needed field that is missing,
    null or blank raises SkipRow (the row is left out and reported); a field of another type than
    FIELD_TYPES allows, or a value that cannot be read (a GSM8K answer without '####'), is an EvalError."""
    spec = BENCHES[bench]
    for f, (types, what) in FIELD_TYPES[bench].items():
        v = row.get(f)
        if v is not None and (not isinstance(v, types) or (isinstance(v, bool) and bool not in types)):
            raise EvalError(f"{where}: field {f!r} must be {what}, got {type(v).__name__}")
    missing = [f for f in spec["fields"] if f not in row]
    empty = [f for f in spec["fields"] if f in row and _blank(row[f])]
    if missing or empty:
        reasons = [_fields("missing", missing)] if missing else []
        raise SkipRow("; ".join(reasons + ([_fields("empty", empty)] if empty else [])))

    def bad(what):
        return EvalError(f"{where}: {what}")
    if bench == "math500":
        return dict(id=row.get("unique_id", index), question=row["problem"], gold=str(row["answer"]))
    if bench == "gsm8k":
        if "####" not in str(row["answer"]):
            raise bad("field 'answer' has no '#### <number>' line")
        gold = str(row["answer"]).rsplit("####", 1)[1].strip().replace(",", "")
        if _last_number(gold) is None:
            raise bad(f"no number after '####' in field 'answer' ({gold!r})")
        return dict(id=index, question=row["question"], gold=gold)
    if bench == "svamp":
        if _last_number(str(row["Answer"])) is None:
            raise bad(f"field 'Answer' is not a number ({row['Answer']!r})")
        return dict(id=row.get("ID", index), question=f"{str(row['Body']).strip()} {str(row['Question']).strip()}",
                    gold=row["Answer"])
    if bench == "csqa":
        choices = row["choices"]
        if not (isinstance(choices, dict) and isinstance(choices.get("label"), list)
                and isinstance(choices.get("text"), list) and len(choices["label"]) == len(choices["text"])):
            raise bad("field 'choices' must be {'label': [...], 'text': [...]} of equal length")
        if not all(isinstance(x, str) for x in choices["label"] + choices["text"]):
            raise bad("field 'choices' must hold strings in 'label' and 'text'")
        if not choices["label"]:
            raise SkipRow("no choices in field 'choices'")
        blank = [l if l.strip() else "(no label)" for l, t in zip(choices["label"], choices["text"])
                 if not (l.strip() and t.strip())]
        if blank:
            raise SkipRow(f"empty choice {', '.join(blank)} in field 'choices'")
        if row["answerKey"] not in choices["label"]:
            raise bad(f"answerKey {row['answerKey']!r} is not one of the labels {choices['label']}")
        options = "\n".join(f"({l}) {t}" for l, t in zip(choices["label"], choices["text"]))
        return dict(id=row.get("id", index), question=f"{row['question'].strip()}\n\n{options}", gold=row["answerKey"])
    if bench == "strategyqa":
        ans = row["answer"]
        gold = {True: "yes", False: "no", "true": "yes", "false": "no", "yes": "yes", "no": "no"}.get(
            ans.strip().lower() if isinstance(ans, str) else ans) if isinstance(ans, (bool, str)) else None
        if gold is None:
            raise bad(f"field 'answer' must be true/false or yes/no, got {ans!r}")
        return dict(id=row.get("qid", index), question=row["question"].strip(), gold=gold)
    if bench == "gpqa":  # the correct option is first in the data: shuffle, with a seed per question
        texts = [str(row[f]).strip() for f in spec["fields"][1:]]
        shuffle_seed = f"{seed}:{index}"
        order = list(range(4))
        random.Random(shuffle_seed).shuffle(order)
        options = [texts[j] for j in order]
        lines = "\n".join(f"({l}) {t}" for l, t in zip("ABCD", options))
        return dict(id=row.get("Record ID", index), question=f"{str(row['Question']).strip()}\n\n{lines}",
                    gold="ABCD"[order.index(0)], options=options, shuffle_seed=shuffle_seed)
    raise ValueError(bench)


def load_bench(bench: str, local: dict, seed: int, limit: int = 0) -> tuple[list[dict], str, list[dict]]:
    """(items, source, skipped). local: bench -> file path; other benchmarks come from the Hub. --limit
    takes the first `limit` rows, skipped ones included. A skipped row is {index, where, id, reason}; an
    item keeps its row's index, so GPQA's shuffle of the other questions does not move."""
    spec, source = BENCHES[bench], str(local.get(bench, BENCHES[bench]["hub"]))
    rows = read_local(Path(local[bench])) if bench in local else load_hub(bench)
    rows = rows[:limit] if limit else rows
    items, skipped = [], []
    for i, (where, row) in enumerate(rows):
        try:
            items.append({"index": i, **make_item(bench, row, where, i, seed)})
        except SkipRow as e:
            skipped.append(dict(index=i, where=where, id=row.get(spec["id"], i), reason=str(e)))
    if not items and skipped:  # every row: more likely a file in another layout than bad rows
        raise EvalError(f"{bench}: no question to score in {source}, all {len(rows)} rows skipped: "
                        f"{skip_summary(skipped)} ({bench} rows follow {spec['hub']}: "
                        f"{', '.join(spec['fields'])})")
    if not items:
        raise EvalError(f"{bench}: no questions in {source}")
    return items, source, skipped


def skip_summary(skipped: list[dict], shown: int = 3) -> str:
    """The skipped rows grouped by reason, each with its count and the first `shown` rows."""
    by_reason = {}
    for s in skipped:
        by_reason.setdefault(s["reason"], []).append(str(s["where"]))
    parts = []
    for reason, rows in by_reason.items():
        more = f", {len(rows) - shown} more" if len(rows) > shown else ""
        plural = "s" if len(rows) > 1 else ""
        parts.append(f"{reason} in {len(rows)} row{plural} ({', '.join(rows[:shown])}{more})")
    return "; ".join(parts)


def parse_local(specs: list[str]) -> dict:
    """--local entries: BENCH=FILE, or a folder holding BENCH.jsonl/.json/.csv/.parquet files."""
    local = {}
    for spec in specs:
        if "=" in spec:
            bench, path = spec.split("=", 1)
            if bench not in BENCHES:
                raise EvalError(f"--local {spec}: unknown benchmark {bench!r} (one of {', '.join(BENCHES)})")
            local[bench] = path
        elif Path(spec).is_dir():
            for bench in BENCHES:
                found = [p for p in (Path(spec) / f"{bench}{s}" for s in (".jsonl", ".json", ".csv", ".parquet"))
                         if p.is_file()]
                if found and bench not in local:
                    local[bench] = str(found[0])
        else:
            raise EvalError(f"--local {spec}: neither a folder nor BENCH=FILE")
    return local


# ----------------------------------------------------------------------------------------------------
# 3. Generation: prompts in the chat template, greedy, batched with left padding.
def format_prompt(tok, question: str, kind: str) -> str:
    """The exact text the student sees: eval_prompt in its chat template, or as mind.py trains without one."""
    text = eval_prompt(question, kind)
    if tok.chat_template:
        return tok.apply_chat_template([{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True)
    return plain_prompt(text)


def encode_prompts(tok, prompts: list[str]) -> list[list[int]]:
    # A chat template writes its own special tokens (BOS included); mind.py adds them for plain prompts.
    return tok(prompts, add_special_tokens=not tok.chat_template)["input_ids"]


def load_tokenizer(student: str):
    from transformers import AutoTokenizer
    try:
        tok = AutoTokenizer.from_pretrained(student)
    except (OSError, ValueError) as e:
        raise EvalError(f"--student {student}: cannot load a tokenizer ({str(e).strip().splitlines()[0]})") from None
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def check_adapter(adapter: str):
    if not (Path(adapter) / "adapter_config.json").is_file():
        raise EvalError(f"--adapter {adapter}: no adapter_config.json there (expected mind.py's OUT/adapter)")


# The fast path's fixed shapes. Issue 11 measured a Qwen2.5-1.5B-shaped student on one H200 (256 new tokens): 1,350
# new tok/s on the plain path at batch 64; with a static cache and a compiled step, 7,642 at batch 64 and 11,931 at 256.
WIDTH_STEP = 64        # prompts are left-padded to a multiple of this many tokens
MAX_AUTO_BATCH = 256   # the largest batch that --batch-size picks by itself (the largest measured)
CPU_BATCH = 16         # --batch-size on a CPU, and everywhere before issue 11


def plan_batches(lengths: list[int], batch_size: int, fill: bool) -> list[list[int]]:
    """Prompt indices in batches, longest prompts first (similar lengths share a batch: little padding).
    fill: top the last batch up with copies of its last prompt, so that every batch has the same shape and
    the compiled decoding step is reused. A copy stops when its original does: it adds no decoding steps."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    batches = [order[s:s + batch_size] for s in range(0, len(order), batch_size)]
    if fill and batches:
        batches[-1] += batches[-1][-1:] * (batch_size - len(batches[-1]))
    return batches


def left_pad(rows: list[list[int]], width: int, pad_id: int):
    """(input_ids, attention_mask), both (B, width), every prompt ending at the right edge: each row's first
    new token follows its own last prompt token. Positions are counted from the mask, so extra padding on
    the left does not move them."""
    import torch
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for r, row in enumerate(rows):
        ids[r, width - len(row):] = torch.tensor(row, dtype=torch.long)
        mask[r, width - len(row):] = 1
    return ids, mask


def row_bytes(config, width: int, cache_len: int, itemsize: int) -> int:
    """GPU memory one prompt takes while it is decoded: its KV cache (layers x 2 x kv_heads x head_dim x
    cache_len values), one layer's activations during the prefill, its rows of the attention mask and its
    last logits (fp32). Weights are not included: they are already on the GPU when this is asked."""
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    inter = getattr(config, "intermediate_size", None) or 4 * config.hidden_size  # GPT-2: 4 x hidden
    kv = config.num_hidden_layers * 2 * kv_heads * head_dim * cache_len * itemsize
    prefill = width * (4 * config.hidden_size + 3 * inter) * itemsize + width * cache_len * itemsize
    return kv + prefill + 2 * config.vocab_size * 4


def auto_batch_size(config, itemsize: int, free_bytes: int, width: int, max_new_tokens: int) -> int:
    """As many prompts as 80% of the free GPU memory holds (row_bytes), a multiple of 8, at most MAX_AUTO_BATCH."""
    per_row = row_bytes(config, width, round_up(width) + max_new_tokens, itemsize)
    n = int(0.8 * free_bytes) // per_row
    if n < 1:
        raise EvalError(f"one prompt of {width} tokens plus {max_new_tokens} new ones needs about "
                        f"{per_row / 2**30:.1f} GiB and {free_bytes / 2**30:.1f} GiB are free; lower --max-new-tokens")
    return min(MAX_AUTO_BATCH, n if n < 8 else n // 8 * 8)


def round_up(n: int, step: int = WIDTH_STEP) -> int:
    return -(-n // step) * step


def make_decoder(model, max_new_tokens: int, batch_size: int, fast: bool, eos, pad_id: int,
                 longest_prompt: int = 0, compile: bool = True):
    """decode(prompt_ids, on_batch=None) -> (completions as token ids, without eos; new tokens generated).
    Greedy; a row stops at its first `eos` (an id, a list of ids, or None: never). on_batch(rows, new tokens)
    is called after each batch.
      plain: evaluate.py's path before issue 11. model.generate with a dynamic KV cache, each batch padded to
             its own longest prompt. Every decoding step runs the model's Python and launches every kernel
             anew: on a GPU a step takes about as long for a 135M model as for a 1.5B one (~47 ms, issue 11).
      fast:  one static KV cache (batch_size rows x cache_len), zeroed and reused by every batch. With a static
             cache, transformers compiles the decoding step (torch.compile with CUDA graphs, on CUDA only), once
             per shape. One shape: every batch has batch_size rows (plan_batches fills the last), prompts are
             padded to a multiple of WIDTH_STEP and the cache holds the longest prompt + max_new_tokens (it is
             rebuilt, and the step recompiled, only if a later call brings a longer prompt). The GPU is then
             kept busy by large batches (auto_batch_size). Prompts and positions are as in plain, so greedy
             completions are the same (test_evaluate.py checks this token for token in fp32)."""
    import torch
    import transformers
    from packaging.version import Version
    from transformers import GenerationConfig, StaticCache
    # Every value set here overrides the model's generation_config (Qwen's asks for sampling and a repetition
    # penalty of 1.05); the others are filled from it, but greedy search does not read them.
    greedy = GenerationConfig(do_sample=False, num_beams=1, repetition_penalty=1.0, max_new_tokens=max_new_tokens,
                              eos_token_id=eos, pad_token_id=pad_id, disable_compile=not compile)
    stop = set([] if eos is None else [eos] if isinstance(eos, int) else eos)
    max_pos = getattr(model.config, "max_position_embeddings", None)
    cache_kw = "cache" if Version(transformers.__version__) >= Version("5.24") else "past_key_values"  # renamed in 5.24
    cache = {"len": 0, "cache": None}

    def static_cache(width: int):
        if width + max_new_tokens > cache["len"]:  # the first batch, or a longer prompt than announced
            cache["len"] = round_up(max(width, longest_prompt)) + max_new_tokens
            cache["cache"] = None  # free the old one first
            cache["cache"] = StaticCache(config=model.config, max_cache_len=cache["len"])
        cache["cache"].reset()  # zeroed in place: the compiled step keeps its buffers
        return {cache_kw: cache["cache"]}

    def decode(prompt_ids: list[list[int]], on_batch=None) -> tuple[list[list[int]], int]:
        out, total, cut = [None] * len(prompt_ids), 0, 0
        for idx in plan_batches([len(p) for p in prompt_ids], batch_size, fill=fast):
            longest = len(prompt_ids[idx[0]])
            width = round_up(longest) if fast else longest
            room = max_new_tokens if max_pos is None else min(max_new_tokens, max_pos - longest)
            if room < 1:
                raise EvalError(f"a prompt of {longest} tokens fills the student's context ({max_pos})")
            cut += room < max_new_tokens
            greedy.max_new_tokens = room
            input_ids, mask = left_pad([prompt_ids[i] for i in idx], width, pad_id)
            try:
                with torch.no_grad():  # (not inference_mode: the static cache's tensors outlive this call)
                    seqs = model.generate(input_ids=input_ids.to(model.device), attention_mask=mask.to(model.device),
                                          generation_config=greedy, **(static_cache(width) if fast else {}))
            except torch.cuda.OutOfMemoryError:
                raise EvalError(f"out of GPU memory with batches of {batch_size} prompts ({width} tokens wide, up to "
                                f"{room} new): pass a smaller --batch-size, e.g. --batch-size {max(1, batch_size // 2)}"
                                ) from None
            new = 0
            for row, i in enumerate(dict.fromkeys(idx)):  # the copies that fill a batch come last: skipped
                ids = seqs[row, width:].tolist()
                end = next((k for k, t in enumerate(ids) if t in stop), None)
                out[i] = ids if end is None else ids[:end]
                new += len(ids) if end is None else end + 1  # after its eos a row only holds padding
            total += new
            if on_batch:
                on_batch(len(set(idx)), new)
        if cut:
            print(f"warning: {cut} batch(es) had less than --max-new-tokens left in the context", file=sys.stderr)
        return out, total
    return decode


def load_model(student: str, adapter: str | None):
    """The student (with the adapter merged into its weights) on the GPU if there is one, bf16 where supported."""
    import torch
    from transformers import AutoModelForCausalLM
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    # bf16 where the GPU has it natively (Ampere, compute capability 8, and newer); fp16 on older
    # GPUs (T4, V100), which emulate bf16 slowly though torch.cuda.is_bf16_supported() says True
    dtype = torch.float32
    if device.type == "cuda":
        dtype = torch.bfloat16 if torch.cuda.get_device_capability()[0] >= 8 else torch.float16
    try:
        model = AutoModelForCausalLM.from_pretrained(student, dtype=dtype)
    except (OSError, ValueError) as e:
        raise EvalError(f"--student {student}: cannot load the model ({str(e).strip().splitlines()[0]})") from None
    if adapter:
        import warnings
        from peft import PeftModel
        with warnings.catch_warnings():  # peft reads transformers' deprecated is_gradient_checkpointing
            warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.* is deprecated",
                                    category=FutureWarning)
            model = PeftModel.from_pretrained(model, adapter).merge_and_unload()  # plain weights: faster decoding
    return model.to(device).eval()


def pick_batch_size(model, batch_size: int | None, longest_prompt: int, max_new_tokens: int) -> int:
    """--batch-size if given; else CPU_BATCH on a CPU and auto_batch_size on a GPU (said on stderr)."""
    import torch
    if batch_size:
        return batch_size
    if model.device.type != "cuda":
        return CPU_BATCH
    free = torch.cuda.mem_get_info(model.device)[0]
    n = auto_batch_size(model.config, model.dtype.itemsize, free, longest_prompt, max_new_tokens)
    print(f"batch size {n} (from {free / 2**30:.1f} GiB free, prompts up to {longest_prompt} tokens and "
          f"{max_new_tokens} new; --batch-size N to choose)", file=sys.stderr)
    return n


class Progress:
    """A tqdm bar of questions done, with new tokens/s and the time left; stats() for the results file."""
    def __init__(self, total: int, desc: str):
        from tqdm.auto import tqdm
        self.bar, self.tokens, self.start = tqdm(total=total, desc=desc, dynamic_ncols=True), 0, time.perf_counter()

    def __call__(self, rows: int, new_tokens: int):
        self.tokens += new_tokens
        self.bar.set_postfix_str(f"{self.tokens / (time.perf_counter() - self.start):,.0f} new tok/s", refresh=False)
        self.bar.update(rows)  # tqdm's own estimate of the time left follows the questions done

    def stats(self) -> dict:
        self.bar.close()
        seconds = time.perf_counter() - self.start
        return dict(gen_seconds=round(seconds, 3), new_tokens=self.tokens, tokens_per_s=round(self.tokens / seconds, 1))


def hf_generator(student: str, adapter: str | None, tok, max_new_tokens: int, batch_size: int | None,
                 decode: str = "fast", compile: bool = True, longest_prompt: int = 0):
    """A function (prompt ids, description) -> (completions, generation stats), on the GPU if there is one."""
    model = load_model(student, adapter)
    eos = model.generation_config.eos_token_id  # may be a list (Qwen: <|im_end|> and <|endoftext|>)
    batch_size = pick_batch_size(model, batch_size, longest_prompt, max_new_tokens)
    fast = decode == "fast"
    decoder = make_decoder(model, max_new_tokens, batch_size, fast, tok.eos_token_id if eos is None else eos,
                           tok.pad_token_id, longest_prompt, compile)
    how = dict(decode=decode, batch_size=batch_size, compiled=fast and compile and model.device.type == "cuda")

    def generate(prompt_ids: list[list[int]], desc: str) -> tuple[list[str], dict]:
        progress = Progress(len(prompt_ids), desc)
        try:
            ids, _ = decoder(prompt_ids, progress)
        except EvalError as e:
            raise EvalError(f"{desc}: {e}") from None
        return tok.batch_decode(ids, skip_special_tokens=True), {**progress.stats(), **how}

    def close():
        """Lets go of the model, so that reference counting alone frees it. Once transformers has
        compiled the decoding step (CUDA, --decode fast), the model keeps torch.compile(model.__call__)
        as model._compiled_call: a cycle through the model's own bound method, which would hold the
        weights, and the static cache reached through the decoder, until a gc.collect()."""
        nonlocal model, decoder
        if model is None:
            return
        compiled = "_compiled_call" in vars(model)
        for name in ("_compiled_call", "_last_compile_config"):
            vars(model).pop(name, None)
        model = decoder = None
        if compiled:  # the compiled graphs and their CUDA graph memory pool outlive the model otherwise
            import torch
            torch._dynamo.reset()
    generate.close = close
    return generate


def release_memory():
    """After a row's model is let go: collect what cycles still hold, then give the blocks PyTorch's
    allocator caches back to CUDA, so that the next row's automatic batch size (pick_batch_size, from
    torch.cuda.mem_get_info) sees the memory that is really free."""
    gc.collect()
    import torch
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def vllm_generator(student: str, adapter: str | None, tok, max_new_tokens: int, seed: int):
    """The same prompts (as token ids) and the same greedy decoding, through vLLM's offline LLM API."""
    try:
        from vllm import LLM, SamplingParams
        from vllm.lora.request import LoRARequest
    except ImportError:
        raise EvalError("--backend vllm: vllm is not installed (pip install vllm, on a CUDA machine); "
                        "or use the default --backend hf") from None
    lora_args = {}
    if adapter:  # vLLM accepts max_lora_rank among 8, 16, 32, ...: the smallest that holds the adapter's rank
        rank = json.loads((Path(adapter) / "adapter_config.json").read_text())["r"]
        lora_args = dict(enable_lora=True, max_lora_rank=max(8, 1 << (rank - 1).bit_length()))
    llm = LLM(model=student, tokenizer=student, seed=seed, **lora_args)
    lora = LoRARequest("adapter", 1, str(Path(adapter).resolve())) if adapter else None
    from transformers import GenerationConfig
    try:
        eos = GenerationConfig.from_pretrained(student).eos_token_id
    except OSError:
        eos = None
    eos = [eos] if isinstance(eos, int) else list(eos or []) or [tok.eos_token_id]
    params = SamplingParams(temperature=0.0, max_tokens=max_new_tokens, repetition_penalty=1.0, stop_token_ids=eos,
                            skip_special_tokens=True)

    def generate(prompt_ids: list[list[int]], desc: str) -> tuple[list[str], dict]:
        print(f"{desc}: {len(prompt_ids)} prompts", file=sys.stderr)
        start = time.perf_counter()
        outs = llm.generate([{"prompt_token_ids": ids} for ids in prompt_ids], params, use_tqdm=True, lora_request=lora)
        seconds, new = time.perf_counter() - start, sum(len(o.outputs[0].token_ids) for o in outs)
        stats = dict(gen_seconds=round(seconds, 3), new_tokens=new, tokens_per_s=round(new / seconds, 1), decode="vllm")
        return [o.outputs[0].text for o in outs], stats  # vLLM returns outputs in the order of the prompts

    def close():  # the engine shuts down when its LLM object goes
        nonlocal llm
        llm = None
    generate.close = close
    return generate


# ----------------------------------------------------------------------------------------------------
# 4. Results: one JSON per row (student + adapter), and a Markdown table in Table 1's layout.
def score(bench: str, items: list[dict], completions: list[str], skipped: list[dict] = ()) -> dict:
    """One benchmark's results. accuracy = correct / n_scored: an unparsed answer is scored (as wrong),
    a skipped row is not. n is n_scored (the name of earlier results files); n_total = rows read."""
    for item, completion in zip(items, completions, strict=True):
        item.update(completion=completion, extracted=extract_answer(bench, completion),
                    correct=is_correct(bench, completion, item["gold"]))
    n, correct = len(items), sum(it["correct"] for it in items)
    return dict(name=BENCHES[bench]["name"], n=n, correct=correct, accuracy=100.0 * correct / n,
                unparsed=sum(it["extracted"] is None for it in items), n_total=n + len(skipped), n_scored=n,
                n_skipped=len(skipped), skipped=list(skipped), items=items)


def markdown_table(results: list[dict]) -> str:
    """Rows in Table 1's layout; rows after the first also show their gain over it (as Table 1 does
    over the base model). An average needs all three of its benchmarks."""
    def accs(r):
        a = {b: r["benchmarks"][b]["accuracy"] for b in BENCHES if b in r["benchmarks"]}
        for key, group in (("id", IN_DIST), ("ood", OUT_DIST)):
            if all(b in a for b in group):
                a[key] = sum(a[b] for b in group) / 3
        return a
    cols = list(IN_DIST) + ["id"] + list(OUT_DIST) + ["ood"]
    names = {**{b: BENCHES[b]["name"] for b in BENCHES}, "id": "ID Avg", "ood": "OOD Avg"}
    lines = ["| Model | " + " | ".join(names[c] for c in cols) + " |", "|---" * (len(cols) + 1) + "|"]
    ref = accs(results[0])
    for n, r in enumerate(results):
        a, cells = accs(r), []
        for c in cols:
            cell = f"{a[c]:.2f}" if c in a else "–"
            if n and c in a and c in ref:
                d = a[c] - ref[c]
                cell += f" {'↑' if d > 0 else '↓' if d < 0 else '±'}{abs(d):.2f}"
            cells.append(cell)
        lines.append(f"| {r['label']} | " + " | ".join(cells) + " |")
    lines += ["", "Correct / questions (unparsed answers, counted wrong):", "",
              "| Model | " + " | ".join(BENCHES[b]["name"] for b in BENCHES) + " |", "|---" * (len(BENCHES) + 1) + "|"]
    def counts(b):
        cell = f"{b['correct']}/{b['n']} ({b['unparsed']})"
        return cell + (f", {b['n_skipped']} skipped" if b.get("n_skipped") else "")
    for r in results:
        bs = r["benchmarks"]
        cells = [counts(bs[b]) if b in bs else "–" for b in BENCHES]
        lines.append(f"| {r['label']} | " + " | ".join(cells) + " |")
    if any(b.get("n_skipped") for r in results for b in r["benchmarks"].values()):
        lines += ["", "Skipped: rows with an empty or missing field, neither scored nor counted in the "
                      "accuracy; the results files list them with the reason."]
    limits = {r["settings"].get("limit", 0) for r in results} - {0}
    if limits:
        lines += ["", f"Only the first {', '.join(map(str, sorted(limits)))} questions of each benchmark "
                      "(--limit): not comparable with Table 1."]
    return "\n".join(lines) + "\n"


def results_problem(res) -> str | None:
    """What keeps `res` from being a results file of evaluate.py, as far as --table and a rerun read
    it; None if nothing does."""
    if not isinstance(res, dict):
        return f"expected a JSON object, got {type(res).__name__}"
    for key, typ, what in (("label", str, "a string"), ("settings", dict, "an object"),
                           ("benchmarks", dict, "an object")):
        if not isinstance(res.get(key), typ):
            return f"field {key!r} is missing or not {what}"
    for bench, b in res["benchmarks"].items():
        if bench not in BENCHES:
            return f"benchmarks: unknown benchmark {bench!r}"
        if not isinstance(b, dict):
            return f"benchmarks.{bench}: expected an object, got {type(b).__name__}"
        for key, typ, what in (("source", str, "a string"), ("n", int, "an integer"),
                               ("correct", int, "an integer"), ("unparsed", int, "an integer"),
                               ("accuracy", (int, float), "a number"), ("items", list, "a list"),
                               ("n_skipped", int, "an integer"), ("skipped", list, "a list")):
            if key in ("n_skipped", "skipped") and key not in b:
                continue  # results files from before rows could be skipped
            if not isinstance(b.get(key), typ):
                return f"benchmarks.{bench}: field {key!r} is missing or not {what}"
        for k, it in enumerate(b["items"]):
            if not isinstance(it, dict) or not isinstance(it.get("question"), str):
                return f"benchmarks.{bench}.items[{k}]: not an object with a 'question' string"
    return None


def read_results(path: Path, hint: str = "") -> dict:
    """A results file (OUT/<row>.json), for --table and for a rerun that reuses it; a file that is
    not one is an EvalError naming it (path:line where JSON says where), then `hint`."""
    hint = f"; {hint}" if hint else ""
    try:
        data = path.read_bytes()
    except OSError as e:
        raise EvalError(f"{path}: cannot read it ({e.strerror}){hint}") from None
    try:
        res = json.loads(decode_utf8(path, data))
    except EvalError as e:
        raise EvalError(f"{e}{hint}") from None
    except json.JSONDecodeError as e:
        raise EvalError(f"{path}:{e.lineno}: not valid JSON ({e.msg}, column {e.colno}); "
                        f"not a results file of evaluate.py{hint}") from None
    problem = results_problem(res)
    if problem:
        raise EvalError(f"{path}: {problem}; not a results file of evaluate.py (OUT/<row>.json){hint}")
    return res


def write_json(path: Path, data: dict):
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(data, indent=1, ensure_ascii=False), encoding="utf-8")
    os.replace(tmp, path)  # never a half-written results file


def evaluate_row(args, adapter: str | None, data: dict, tok) -> dict:
    """Generate and score every benchmark in `data` (bench -> (items, source, skipped)) for one table
    row. Its model is released before this returns (release_memory), so the next row loads onto a card
    that holds nothing of this one."""
    label = args.student + (f" + {adapter}" if adapter else "")
    settings = dict(student=args.student, adapter=adapter, backend=args.backend, max_new_tokens=args.max_new_tokens,
                    seed=args.seed, limit=args.limit, chat_template=bool(tok.chat_template))
    path = Path(args.out) / (re.sub(r"[^A-Za-z0-9._-]+", "_", label).strip("_") + ".json")
    result = dict(label=label, settings=settings, benchmarks={})
    if path.exists():  # an earlier run of this row: keep what it finished
        old = read_results(path, "move that file away or choose another --out")
        if old.get("settings") != settings:
            raise EvalError(f"{path} holds results with other settings ({old.get('settings')}); "
                            "choose another --out or move that file away")
        result["benchmarks"] = old["benchmarks"]
    todo = {}  # the benchmarks still to generate: their items with the exact prompt, and its token ids
    for bench, (items, source, skipped) in data.items():
        done, questions = result["benchmarks"].get(bench), [q["question"] for q in items]
        if done and done["source"] == source and [q["question"] for q in done["items"]] == questions \
                and done.get("skipped", []) == skipped:
            print(f"{label} | {bench}: reused from {path}")
            continue
        items = [dict(it, prompt=format_prompt(tok, it["question"], BENCHES[bench]["kind"])) for it in items]
        todo[bench] = items, source, skipped, encode_prompts(tok, [it["prompt"] for it in items])
    if not todo:
        result["path"] = str(path)
        return result
    longest = max(len(ids) for *_, prompt_ids in todo.values() for ids in prompt_ids)  # sizes the static cache
    if args.backend == "vllm":
        generate = vllm_generator(args.student, adapter, tok, args.max_new_tokens, args.seed)
    else:
        generate = hf_generator(args.student, adapter, tok, args.max_new_tokens, args.batch_size, args.decode,
                                args.compile, longest)
    try:
        for bench, (items, source, skipped, prompt_ids) in todo.items():
            completions, stats = generate(prompt_ids, f"{bench} ({len(items)})")
            scored = score(bench, items, completions, skipped)
            result["benchmarks"][bench] = {"source": source, **scored, **stats}
            result["benchmarks"] = {b: result["benchmarks"][b] for b in BENCHES if b in result["benchmarks"]}
            write_json(path, result)  # after every benchmark: an interruption loses one benchmark at most
            r = result["benchmarks"][bench]
            skips = f", {r['n_skipped']} rows skipped" if r["n_skipped"] else ""
            print(f"{label} | {bench}: {r['correct']}/{r['n']} = {r['accuracy']:.2f}% ({r['unparsed']} unparsed"
                  f"{skips}); {r['new_tokens']:,} new tokens in {r['gen_seconds']:,.0f} s "
                  f"({r['tokens_per_s']:,.0f} tok/s)")
    finally:  # this row's model goes before the next row's loads
        getattr(generate, "close", lambda: None)()
        del generate
        release_memory()
    result["path"] = str(path)
    return result


# ----------------------------------------------------------------------------------------------------
# 5. Speed test: the plain decoding path against the fast one, on a student built from a config (no download).
SPEED_SHAPES = {  # Qwen2 models; "1.5b" has the shape of Qwen2.5-1.5B-Instruct (its config.json), the paper's student
    "tiny": dict(vocab_size=1024, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2),
    "1.5b": dict(vocab_size=151936, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                 num_attention_heads=12, num_key_value_heads=2, tie_word_embeddings=True, rope_theta=1e6),
}


def speed_test(args) -> list[dict]:
    """Greedy decoding of --speed-prompts random prompts (80-300 tokens), exactly --speed-new-tokens new tokens each
    (no eos), by the --speed-paths: plain at batch 16 (evaluate.py before issue 11) and at the fast path's batch
    size, fast, and vLLM (if installed; continuous batching, no batch size). Each path first decodes one batch
    alone (the fast path compiles then; vLLM's time includes its start), then all prompts, timed. The last
    column: Table 1's six benchmarks (4,225 questions) if every answer ran all --speed-new-tokens tokens, from
    the measured time per batch (vLLM: per token), plus the first batch's extra time (compilation) once."""
    if "vllm" in args.speed_paths:  # before any work
        try:
            import vllm  # noqa: F401
        except ImportError:
            raise EvalError("--speed-paths vllm: vllm is not installed (pip install vllm, on a CUDA machine)") from None
    import torch
    from transformers import AutoModelForCausalLM, Qwen2Config
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    dtype = torch.bfloat16 if cuda and torch.cuda.is_bf16_supported() else torch.float32
    shape = {"auto": "1.5b" if cuda else "tiny"}.get(args.speed_shape, args.speed_shape)
    torch.manual_seed(args.seed)
    with device:  # random weights, made where they are used
        model = AutoModelForCausalLM.from_config(Qwen2Config(**SPEED_SHAPES[shape], max_position_embeddings=32768),
                                                 dtype=dtype).eval()
    rng = random.Random(args.seed)
    prompts = [[rng.randrange(model.config.vocab_size) for _ in range(rng.randint(80, 300))]
               for _ in range(args.speed_prompts)]
    longest, new_tokens = max(map(len, prompts)), args.speed_new_tokens
    batch = pick_batch_size(model, args.batch_size, longest, new_tokens)
    runs = list(dict.fromkeys((path, b) for path in args.speed_paths
                              for b in ((CPU_BATCH, batch) if path == "plain" else (batch,))))
    print(f"{shape} student ({sum(p.numel() for p in model.parameters()):,} parameters, {dtype}, "
          f"{torch.cuda.get_device_name() if cuda else 'CPU'}), {len(prompts)} prompts of 80-300 tokens, "
          f"{new_tokens} new tokens each", file=sys.stderr)
    rows = []
    for path, bs in runs:
        if cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        if path == "vllm":  # last: the weights go to a temporary folder and leave this process's GPU memory
            first, wall, new = vllm_speed(model, prompts, new_tokens, args.seed)
            model = None
            per_batch, bs = wall / len(prompts), None  # per question: vLLM has no batches
        else:
            decoder = make_decoder(model, new_tokens, bs, path == "fast", None, 0, longest, args.compile)
            times = []
            for part in (prompts[:bs], prompts):  # one batch alone (compiles the fast path), then all, timed
                start = time.perf_counter()
                _, new = decoder(part)
                if cuda:
                    torch.cuda.synchronize()
                times.append(time.perf_counter() - start)
            first, wall, per_batch = times[0], times[1], times[1] / math.ceil(len(prompts) / bs)
            del decoder
        table1 = (sum(math.ceil(b["size"] / (bs or 1)) for b in BENCHES.values()) * per_batch
                  + max(0.0, first - per_batch))
        peak = torch.cuda.max_memory_allocated() / 2**30 if cuda and path != "vllm" else None
        rows.append(dict(path=path, batch=bs, tokens_per_s=new / wall, wall_s=wall, first_batch_s=first,
                         peak_gib=peak, table1_min=table1 / 60))
        print(f"{path} @ {bs or 'continuous batching'}: {new / wall:,.0f} new tok/s", file=sys.stderr)
    print(f"| path | batch | new tokens/s | wall s | first batch (compile) s | peak GPU GiB | x row 1 "
          f"| Table 1 at {new_tokens} new tokens, min |\n|---|---|---|---|---|---|---|---|")
    for r in rows:
        peak = "–" if r["peak_gib"] is None else f"{r['peak_gib']:.1f}"
        print(f"| {r['path']} | {r['batch'] or '–'} | {r['tokens_per_s']:,.0f} | {r['wall_s']:.1f} "
              f"| {r['first_batch_s']:.1f} | {peak} | {r['tokens_per_s'] / rows[0]['tokens_per_s']:.1f} "
              f"| {r['table1_min']:,.1f} |")
    return rows


def vllm_speed(model, prompts: list[list[int]], new_tokens: int, seed: int) -> tuple[float, float, int]:
    """(start + first prompt s, all prompts s, new tokens) for vLLM on the same weights and prompts."""
    from vllm import LLM, SamplingParams
    import tempfile
    import torch
    with tempfile.TemporaryDirectory() as folder:
        model.save_pretrained(folder)
        model.to("cpu")  # vLLM sizes its KV cache from the free GPU memory
        torch.cuda.empty_cache()
        params = SamplingParams(temperature=0.0, max_tokens=new_tokens, ignore_eos=True)
        start = time.perf_counter()
        llm = LLM(model=folder, skip_tokenizer_init=True, seed=seed,
                  max_model_len=round_up(max(map(len, prompts))) + new_tokens)
        llm.generate([{"prompt_token_ids": prompts[0]}], params, use_tqdm=False)
        first, start = time.perf_counter() - start, time.perf_counter()
        outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
        return first, time.perf_counter() - start, sum(len(o.outputs[0].token_ids) for o in outs)


def batch_size_arg(text: str) -> int | None:
    """--batch-size: a number, or auto (None)."""
    if text == "auto":
        return None
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is neither a number nor auto") from None


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--student", default="Qwen/Qwen2.5-1.5B-Instruct", help="hub id or folder of the base causal LM")
    p.add_argument("--adapter", nargs="*", default=[], help="LoRA adapter folder(s) from mind.py; one table row each")
    p.add_argument("--with-base", action="store_true", help="also evaluate the student without adapter (first row)")
    p.add_argument("--bench", default="all", help=f"'all' or a comma-separated list of: {', '.join(BENCHES)}")
    p.add_argument("--local", nargs="*", default=[], help="BENCH=FILE, or a folder of BENCH.jsonl/.json/.csv/.parquet "
                   "files in the Hub layout; other benchmarks load from the Hub")
    p.add_argument("--backend", choices=("hf", "vllm"), default="hf",
                   help="transformers generate, or vLLM if installed")
    p.add_argument("--max-new-tokens", type=int, default=2048, help="longest completion [ours: room for a full MATH "
                   "solution; a cut answer counts as wrong]")
    p.add_argument("--batch-size", type=batch_size_arg, default="auto",
                   help=f"prompts per batch (hf backend); auto: as many as fit in the free GPU memory, at most "
                   f"{MAX_AUTO_BATCH}, and {CPU_BATCH} on a CPU")
    p.add_argument("--decode", choices=("fast", "plain"), default="fast", help="hf backend: fast = a static KV cache "
                   "and fixed shapes, decoding step compiled on CUDA; plain = the dynamic cache of evaluate.py before "
                   "issue 11 (the same greedy completions, slower)")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True, help="compile the fast path's "
                   "decoding step on CUDA (--no-compile: if compiling fails on this machine; much slower on a GPU)")
    p.add_argument("--seed", type=int, default=0, help="seed of the per-question GPQA option shuffle (and of vLLM)")
    p.add_argument("--limit", type=int, default=0, help="only the first N questions of each benchmark (smoke tests; "
                   "such numbers are not Table 1's); 0 = all")
    p.add_argument("--out", default="runs/eval", help="folder for the per-row JSON files and table.md")
    p.add_argument("--table", nargs="+", metavar="JSON", help="print the table of saved result files and exit")
    p.add_argument("--speed-test", action="store_true", help="time the decoding paths on a student built from a "
                   "config with random weights (no download), print one table and exit")
    p.add_argument("--speed-shape", choices=("auto", *SPEED_SHAPES), default="auto",
                   help="the student of --speed-test; auto: 1.5b on a GPU, tiny on a CPU")
    p.add_argument("--speed-prompts", type=int, default=256, help="prompts of --speed-test (random ids, 80-300 tokens)")
    p.add_argument("--speed-new-tokens", type=int, default=256, help="new tokens per prompt in --speed-test (no eos)")
    p.add_argument("--speed-paths", default="plain,fast", help="paths of --speed-test: plain (at batch 16, as before "
                   "issue 11, and at the fast path's batch size), fast, vllm (if installed)")
    args = p.parse_args(argv)
    if min(args.max_new_tokens, 1 if args.batch_size is None else args.batch_size, args.speed_prompts,
           args.speed_new_tokens) < 1 or args.limit < 0:
        p.error("--max-new-tokens, --batch-size, --speed-prompts and --speed-new-tokens must be >= 1, --limit >= 0")
    args.speed_paths = [s.strip() for s in args.speed_paths.split(",") if s.strip()]
    if not args.speed_paths or set(args.speed_paths) - {"plain", "fast", "vllm"}:
        p.error(f"--speed-paths {','.join(args.speed_paths)}: a comma-separated list of plain, fast, vllm")
    args.speed_paths.sort(key=lambda path: path == "vllm")  # vLLM last: it needs the GPU memory for itself
    return args


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    if args.speed_test:
        return speed_test(args)
    if args.table:
        results = [read_results(Path(f)) for f in args.table]
        print(markdown_table(results), end="")
        return results
    benches = list(BENCHES) if args.bench == "all" else [b.strip() for b in args.bench.split(",") if b.strip()]
    unknown = [b for b in benches if b not in BENCHES]
    if unknown or not benches:
        raise EvalError(f"--bench {args.bench}: unknown {', '.join(unknown) or 'empty list'}; use 'all' or some of "
                        f"{', '.join(BENCHES)}")
    for adapter in args.adapter:
        check_adapter(adapter)
    local = parse_local(args.local)
    data = {b: load_bench(b, local, args.seed, args.limit) for b in benches}  # bad data stops us before any model
    for b, (items, source, skipped) in data.items():
        print(f"{b}: {len(items)} questions from {source}")
        if skipped:
            print(f"warning: {b}: {len(skipped)} of {len(items) + len(skipped)} rows skipped, not scored: "
                  f"{skip_summary(skipped)}", file=sys.stderr)
    rows = ([None] if args.with_base or not args.adapter else []) + args.adapter
    Path(args.out).mkdir(parents=True, exist_ok=True)
    tok = load_tokenizer(args.student)
    results = [evaluate_row(args, adapter, data, tok) for adapter in rows]
    table = markdown_table(results)
    (Path(args.out) / "table.md").write_text(table, encoding="utf-8")
    print("\n" + table + f"\nsaved {', '.join(r['path'] for r in results)} and {Path(args.out) / 'table.md'}")
    return results


if __name__ == "__main__":
    try:
        main()
    except EvalError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted: the benchmarks finished so far are saved; rerun the same command to go on", file=sys.stderr)
        sys.exit(130)
