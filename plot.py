"""The training-dynamics figures of MIND (Cui et al., ACL 2026) from the metrics.jsonl of mind.py runs.

Usage:
  python plot.py runs/mind runs/no-synergy --out figures          # runs overlaid where a figure compares
  python plot.py runs/mind --out figures --smooth 25              # moving-average window of the loss curve

One PNG per figure in --out (matplotlib, Agg backend: no display needed); <run> is the run's label with
every other character than letters, digits and ._- made "_" (the label "mind (a)" gives alpha-mind_a.png):
  loss.png               L_SFT (Eq. 2) per joint step, raw and moving average, all runs   (Figure 7(a) and (b))
  n_selected.png         |I_dyn|, the paths the student learns from, per step, all runs
  meta_loss-<run>.png    L_meta (Eq. 1) beside L_SFT, one run                              (Figure 8(a))
  alpha-<run>.png        mean alpha_k per perspective per step, stacked                   (Figure 8)
  loss_real-<run>.png    the student's loss on each perspective's path, L_real^(k)
  subjects-<run>.png     subject x perspective mean alpha at the last epoch               (Section 5)
Section 5 cites the subject preferences as Figure 7(b), which Section 4.4 and the caption of Figure 7 give to
the synergy ablation; Figure 8(b) is the likelier home. Figure 6 (ablation results) is not drawn here.
A run is labelled by its variant, plus its folder's name where two runs share a variant. Bad input is one
line "error: PATH:LINE: what is wrong" on stderr and exit code 2. Nothing here imports torch.
"""
import argparse, itertools, json, re, sys
from dataclasses import dataclass, field
from pathlib import Path

from prompts import PERSPECTIVES, PERSPECTIVE_KEYS

NUMBER_KEYS = ("epoch", "n_selected") + tuple(f"alpha/{k}" for k in PERSPECTIVE_KEYS)  # a number, always
NULLABLE_KEYS = ("loss_sft", "loss_meta")                       # a number or null, always present
OPTIONAL_KEYS = tuple(f"{p}/{k}" for p in ("score", "loss_real") for k in PERSPECTIVE_KEYS)  # absent in older runs


class RunError(Exception):
    """Bad input; its message is "PATH:LINE: what is wrong", printed as one line."""


@dataclass
class Run:
    path: Path                                    # the metrics.jsonl
    variant: str = "mind"
    steps: list = field(default_factory=list)     # step records, in step order
    subjects: list = field(default_factory=list)  # subject records, in epoch order


# ----------------------------------------------------------------------------------------------------
# 1. Reading: one validated Run per folder.
def is_number(v, kind=(int, float)) -> bool:
    return isinstance(v, kind) and not isinstance(v, bool)  # JSON true/false are no numbers


def check_record(r) -> str | None:
    """What is wrong with one parsed line, or None. A record without "kind" is a step record (older runs)."""
    if not isinstance(r, dict):
        return f"expected a JSON object, got {type(r).__name__}"
    kind = r.get("kind", "step")
    if not isinstance(r.get("variant", ""), str):
        return "'variant' is not a string"
    if kind == "subjects":
        if not is_number(r.get("epoch"), int):
            return "subject record without an integer 'epoch'"
        if not isinstance(r.get("alpha"), dict) or not r["alpha"]:
            return "subject record without an 'alpha' object of subjects"
        for subject, row in r["alpha"].items():
            if not isinstance(row, dict) or not all(is_number(row.get(k)) for k in PERSPECTIVE_KEYS):
                return f"alpha of subject {subject!r} lacks a number for some of {', '.join(PERSPECTIVE_KEYS)}"
        return None if isinstance(r.get("count", {}), dict) else "'count' is not an object"
    if kind != "step":
        return f"unknown record kind {kind!r} (expected 'step' or 'subjects')"
    if not is_number(r.get("step"), int):
        return "step record without an integer 'step'"
    if r.get("stage") not in ("warmup", "joint"):
        return f"'stage' must be 'warmup' or 'joint', got {r.get('stage')!r}"
    if missing := [k for k in NUMBER_KEYS + NULLABLE_KEYS if k not in r]:
        return f"step record without {', '.join(map(repr, missing[:3]))}{' ...' if len(missing) > 3 else ''}"
    for k in NUMBER_KEYS + NULLABLE_KEYS + OPTIONAL_KEYS:
        if k in r and not (is_number(r[k]) or r[k] is None and k not in NUMBER_KEYS):
            return f"{k!r} is {r[k]!r}, not a number"
    return None


def load_run(path) -> Run:
    """RUN_DIR (or its metrics.jsonl) -> Run. A resumed run appends to the same file: where the step (or
    epoch) count goes back, the records it repeats are replaced by the later ones."""
    path = Path(path) if str(path).endswith(".jsonl") else Path(path) / "metrics.jsonl"
    if not path.is_file():
        raise RunError(f"{path}: no such file (is {path.parent} a mind.py run folder?)")
    try:
        text = path.read_text(errors="replace")  # an undecodable byte fails below, as a line that is not JSON
    except OSError as e:
        raise RunError(f"{path}: {e.strerror}") from None
    run = Run(path)
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            r = json.loads(line)
        except json.JSONDecodeError as e:
            raise RunError(f"{path}:{n}: not JSON ({e.msg})") from None
        if problem := check_record(r):
            raise RunError(f"{path}:{n}: {problem}")
        variant = r.get("variant", "mind")  # older runs: no variant, all MIND
        if (run.steps or run.subjects) and variant != run.variant:  # mind.py appends: a reused --out folder
            raise RunError(f"{path}:{n}: variant {variant!r} after {run.variant!r}: one run folder per variant")
        run.variant = variant
        if r.get("kind", "step") == "step":
            run.steps = [s for s in run.steps if s["step"] < r["step"]] + [r]
        else:
            run.subjects = [s for s in run.subjects if s["epoch"] < r["epoch"]] + [r]
    if not run.steps:
        raise RunError(f"{path}: {'no step records' if run.subjects else 'empty file, no records'}")
    return run


def labels(runs: list[Run]) -> list[str]:
    """The variant; with the folder's name where variants repeat; with the whole path where that repeats too."""
    out = [r.variant for r in runs]
    for fmt in (lambda r: f"{r.variant} ({r.path.parent.name})", lambda r: f"{r.variant} ({r.path.parent})"):
        out = [fmt(r) if out.count(lab) > 1 else lab for r, lab in zip(runs, out)]
    return out


# ----------------------------------------------------------------------------------------------------
# 2. The series each figure draws: plain lists, no matplotlib.
def moving_average(ys: list, window: int) -> list:
    """Trailing mean over the last `window` values (fewer at the start, so the curve begins with the data)."""
    sums = [0.0, *itertools.accumulate(ys)]
    return [(sums[i + 1] - sums[max(0, i + 1 - window)]) / min(i + 1, window) for i in range(len(ys))]


def series(run: Run, key: str, stage: str | None = None) -> tuple[list, list]:
    """(steps, values) of one key over the step records, nulls dropped; only one stage if given."""
    pts = [(r["step"], r[key]) for r in run.steps if r.get(key) is not None and stage in (None, r["stage"])]
    return [s for s, _ in pts], [v for _, v in pts]


def loss_series(run: Run, window: int) -> tuple[list, list, list]:
    """Figure 7: (steps, raw L_SFT, its moving average) over the joint stage."""
    steps, ys = series(run, "loss_sft", "joint")
    return steps, ys, moving_average(ys, window)


def alpha_series(run: Run) -> tuple[list, dict]:
    """Figure 8: (steps, {k: mean alpha_k per step}) over all step records, warmup included."""
    return [r["step"] for r in run.steps], {k: [r[f"alpha/{k}"] for r in run.steps] for k in PERSPECTIVE_KEYS}


def loss_real_series(run: Run) -> dict:
    """{k: (steps, L_real^(k))} for the perspectives the run logged a loss for."""
    return {k: xy for k in PERSPECTIVE_KEYS if (xy := series(run, f"loss_real/{k}"))[0]}


def subject_matrix(run: Run) -> tuple[int, list, list, list] | None:
    """Section 5's task-specific preferences: (epoch, subjects sorted, their counts, rows of mean alpha per
    perspective) from the last subject record; None if the run has none."""
    if not run.subjects:
        return None
    last = run.subjects[-1]
    names = sorted(last["alpha"])
    return (last["epoch"], names, [last.get("count", {}).get(s) for s in names],
            [[last["alpha"][s][k] for k in PERSPECTIVE_KEYS] for s in names])


# ----------------------------------------------------------------------------------------------------
# 3. One function per figure. Perspective k always has colour Ck; grey marks the warmup.
def canvas(run: Run | None = None, size=(7, 4)):
    """A new figure; with a run, its warmup steps shaded."""
    import matplotlib
    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=size)
    if ends := [r["step"] for r in (run.steps if run else []) if r["stage"] == "warmup"]:
        ax.axvspan(0, max(ends), color="0.9", zorder=0, label="warmup")
    return fig, ax


def save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    import matplotlib.pyplot as plt
    plt.close(fig)
    return path


def fig_loss(runs, labs, window: int, path: Path) -> Path:
    fig, ax = canvas()
    for i, (run, lab) in enumerate(zip(runs, labs)):
        steps, raw, smooth = loss_series(run, window)  # empty for a run that stopped in warmup
        ax.plot(steps, raw, color=f"C{i}", lw=0.8, alpha=0.3)
        ax.plot(steps, smooth, color=f"C{i}", lw=2, label=f"{lab} (moving average, {window})")
    ax.set(xlabel="step", ylabel="L_SFT (Eq. 2)", title="Student training loss, joint stage (cf. Figure 7)")
    ax.legend()
    return save(fig, path)


def fig_selected(runs, labs, path: Path) -> Path:
    fig, ax = canvas()
    for i, (run, lab) in enumerate(zip(runs, labs)):
        ax.plot(*series(run, "n_selected"), color=f"C{i}", label=lab)
    ax.set(xlabel="step", ylabel="mean |I_dyn| per problem", ylim=(0, len(PERSPECTIVE_KEYS) + 0.5),
           title="Selected perspectives per problem")
    ax.legend()
    return save(fig, path)


def fig_meta(run, lab, path: Path) -> Path:
    fig, ax = canvas(run)
    ax.plot(*series(run, "loss_sft"), color="C0", label="student L_SFT (Eq. 2)")
    right = ax.twinx()
    right.plot(*series(run, "loss_meta"), color="C3", label="MetaNet L_meta (Eq. 1)")
    ax.set(xlabel="step", ylabel="L_SFT", title=f"{lab}: student and MetaNet losses (cf. Figure 8(a))")
    right.set_ylabel("L_meta")
    ax.legend(*[a + b for a, b in zip(ax.get_legend_handles_labels(), right.get_legend_handles_labels())])
    return save(fig, path)


def fig_alpha(run, lab, path: Path) -> Path:
    fig, ax = canvas(run)
    steps, alpha = alpha_series(run)
    ax.stackplot(steps, *alpha.values(), labels=[PERSPECTIVES[k][0] for k in alpha],
                 colors=[f"C{j}" for j in range(len(alpha))])
    ax.set(xlabel="step", ylabel="mean alpha_k", title=f"{lab}: fusion weight per perspective (cf. Figure 8)")
    ax.legend(loc="center left", bbox_to_anchor=(1, 0.5), fontsize=8)
    return save(fig, path)


def fig_loss_real(run, lab, path: Path) -> Path:
    fig, ax = canvas(run)
    for k, (steps, ys) in loss_real_series(run).items():
        ax.plot(steps, ys, color=f"C{PERSPECTIVE_KEYS.index(k)}", label=PERSPECTIVES[k][0])
    ax.set(xlabel="step", ylabel="L_real^(k), mean token CE", title=f"{lab}: student loss per perspective")
    ax.legend(loc="center left", bbox_to_anchor=(1, 0.5), fontsize=8)
    return save(fig, path)


def fig_subjects(run, lab, path: Path) -> Path:
    epoch, names, counts, rows = subject_matrix(run)
    fig, ax = canvas(size=(8, 1.5 + 0.45 * len(names)))
    im, top = ax.imshow(rows, cmap="viridis", aspect="auto", vmin=0), max(map(max, rows))
    for i, row in enumerate(rows):
        for j, v in enumerate(row):
            ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=7, color="w" if v < top / 2 else "k")
    ax.set_xticks(range(len(PERSPECTIVE_KEYS)), [PERSPECTIVES[k][0] for k in PERSPECTIVE_KEYS],
                  rotation=30, ha="right")
    ax.set_yticks(range(len(names)), [s if c is None else f"{s} (n={c})" for s, c in zip(names, counts)])
    ax.set_title(f"{lab}: mean alpha per subject after epoch {epoch} (cf. Section 5)")
    fig.colorbar(im, ax=ax, label="mean alpha_k")
    return save(fig, path)


# ----------------------------------------------------------------------------------------------------
# 4. Command line.
def main(argv=None) -> list[Path]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("runs", nargs="+", metavar="RUN_DIR", help="folders that mind.py wrote metrics.jsonl into")
    ap.add_argument("--out", required=True, help="folder for the PNG files (created if missing)")
    ap.add_argument("--smooth", type=int, default=10, help="moving-average window of the loss curve, in log records")
    args = ap.parse_args(argv)
    if args.smooth < 1:
        ap.error("--smooth must be at least 1")
    runs = [load_run(p) for p in dict.fromkeys(args.runs)]  # a folder named twice is drawn once
    labs, out = labels(runs), Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    written = [fig_selected(runs, labs, out / "n_selected.png")]
    if any(loss_series(r, 1)[0] for r in runs):
        written.append(fig_loss(runs, labs, args.smooth, out / "loss.png"))
    for run, lab in zip(runs, labs):
        name = re.sub(r"[^A-Za-z0-9._-]+", "_", lab).strip("_")
        written.append(fig_alpha(run, lab, out / f"alpha-{name}.png"))
        if series(run, "loss_meta")[0]:
            written.append(fig_meta(run, lab, out / f"meta_loss-{name}.png"))
        if loss_real_series(run):
            written.append(fig_loss_real(run, lab, out / f"loss_real-{name}.png"))
        if run.subjects:
            written.append(fig_subjects(run, lab, out / f"subjects-{name}.png"))
    return written


if __name__ == "__main__":
    try:
        files = main()
    except RunError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    print("\n".join(map(str, files)))
