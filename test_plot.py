"""Tests of plot.py on synthetic metrics.jsonl files with known values (no torch, no training run)."""
import json, subprocess, sys
from pathlib import Path

import numpy as np
import pytest

import plot
from prompts import PERSPECTIVE_KEYS

HERE = Path(__file__).resolve().parent
K = len(PERSPECTIVE_KEYS)
SUBJECTS = ("Algebra", "Geometry", "Number Theory")


def alpha_at(step: int) -> list:
    w = [1.0 + (j * step) % 5 for j in range(K)]
    return [x / sum(w) for x in w]


def step_record(step: int, warmup: bool, variant: str | None = "mind", meta=True, real=True) -> dict:
    """A step record of the issue's format; loss_sft is a jagged descent, so smoothing changes it."""
    r = {"step": step, "epoch": step / 4, "stage": "warmup" if warmup else "joint",
         "loss_sft": None if warmup else 3.0 - 0.05 * step + 0.4 * (-1) ** step,
         "loss_cons": None if warmup else 0.01 * step, "loss_meta": 0.5 / step if meta else None,
         "n_selected": 8.0 if warmup else 2.0 + step % 4, "tokens_per_s": 1000.0, "lr": 1e-4, "meta_lr": 1e-5,
         "peak_mem_gib": None}
    r |= {f"alpha/{k}": 0.0 if warmup else a for k, a in zip(PERSPECTIVE_KEYS, alpha_at(step))}
    r |= {f"score/{k}": 0.1 * j for j, k in enumerate(PERSPECTIVE_KEYS)}
    if real:
        r |= {f"loss_real/{k}": (None if k == "analogy" else 2.0 + j / 10 - step / 100)
              for j, k in enumerate(PERSPECTIVE_KEYS)}
    if variant is not None:
        r |= {"kind": "step", "variant": variant}
    return r


def subject_record(epoch: int, variant="mind") -> dict:
    alpha = {s: {k: round(0.01 * epoch + 0.1 * i + 0.01 * j, 4) for j, k in enumerate(PERSPECTIVE_KEYS)}
             for i, s in enumerate(SUBJECTS)}
    return {"kind": "subjects", "variant": variant, "epoch": epoch, "alpha": alpha,
            "count": {s: 10 * (i + 1) for i, s in enumerate(SUBJECTS)}}


def write_run(folder: Path, variant="mind", steps=24, warmup=4, subjects=True, **kw) -> Path:
    folder.mkdir(parents=True)
    lines = [step_record(s, s <= warmup, variant, **kw) for s in range(1, steps + 1)]
    if subjects:  # after epochs 2 and 3, in the order mind.py writes them
        lines.insert(8, subject_record(2, variant))
        lines.append(subject_record(3, variant))
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    return folder


def test_moving_average_matches_numpy():
    ys = list(np.random.default_rng(0).normal(size=37))
    for w in (1, 4, 10, 50):
        got = np.array(plot.moving_average(ys, w))
        n = min(w - 1, len(ys))  # the first points average what there is so far
        np.testing.assert_allclose(got[:n], np.cumsum(ys)[:n] / np.arange(1, n + 1), rtol=1e-12)
        if w <= len(ys):  # then every complete window
            np.testing.assert_allclose(got[w - 1:], np.convolve(ys, np.ones(w) / w, mode="valid"), rtol=1e-12)
        assert len(got) == len(ys)


def test_series_are_the_logged_values(tmp_path):
    run = plot.load_run(write_run(tmp_path / "a"))
    assert run.variant == "mind" and len(run.steps) == 24 and [s["epoch"] for s in run.subjects] == [2, 3]
    steps, raw, smooth = plot.loss_series(run, 5)
    assert steps == list(range(5, 25))  # joint stage only
    np.testing.assert_allclose(raw, [3.0 - 0.05 * s + 0.4 * (-1) ** s for s in steps])
    np.testing.assert_allclose(smooth[4:], np.convolve(raw, np.ones(5) / 5, mode="valid"))
    assert np.std(np.diff(smooth)) < np.std(np.diff(raw)) / 3  # the smoothing removes the jag
    steps, alpha = plot.alpha_series(run)
    assert steps == list(range(1, 25)) and list(alpha) == list(PERSPECTIVE_KEYS)
    np.testing.assert_allclose(np.array(list(alpha.values())).T[4:], [alpha_at(s) for s in range(5, 25)])
    assert not np.any(np.array(list(alpha.values()))[:, :4])  # alpha is 0 in warmup
    run.steps[0]["loss_sft"] = 9.0  # a warmup record with a loss is still no part of the joint-stage curve
    assert plot.loss_series(run, 5)[0][0] == 5
    assert plot.series(run, "n_selected") == (list(range(1, 25)), [8.0] * 4 + [2.0 + s % 4 for s in range(5, 25)])
    real = plot.loss_real_series(run)
    assert "analogy" not in real and len(real) == K - 1  # an all-null perspective is left out
    assert real["planning"] == (list(range(1, 25)), [2.3 - s / 100 for s in range(1, 25)])


def test_heatmap_is_the_last_epoch(tmp_path):
    epoch, names, counts, rows = plot.subject_matrix(plot.load_run(write_run(tmp_path / "a")))
    last = subject_record(3)
    assert epoch == 3 and names == sorted(SUBJECTS) and counts == [last["count"][s] for s in names]
    np.testing.assert_array_equal(rows, [[last["alpha"][s][k] for k in PERSPECTIVE_KEYS] for s in names])
    assert plot.subject_matrix(plot.load_run(write_run(tmp_path / "b", subjects=False))) is None


def test_resumed_run_replaces_repeated_steps(tmp_path):
    folder = write_run(tmp_path / "a", steps=10, subjects=False)
    later = [step_record(s, False) | {"loss_sft": 100.0 + s} for s in range(7, 13)]  # resumed from step 6
    with open(folder / "metrics.jsonl", "a") as f:
        f.write("".join(json.dumps(r) + "\n" for r in later))
    steps, raw, _ = plot.loss_series(plot.load_run(folder), 1)
    assert steps == list(range(5, 13)) and raw[2:] == [100.0 + s for s in range(7, 13)]


def test_older_runs_and_variants_without_metanet(tmp_path):
    old = plot.load_run(write_run(tmp_path / "old", variant=None, real=False, subjects=False))
    assert old.variant == "mind" and plot.loss_real_series(old) == {}
    files = plot.main([str(tmp_path / "old"), str(write_run(tmp_path / "u", "uniform", meta=False, subjects=False)),
                       "--out", str(tmp_path / "fig")])
    assert sorted(f.name for f in files) == ["alpha-mind.png", "alpha-uniform.png", "loss.png", "loss_real-uniform.png",
                                             "meta_loss-mind.png", "n_selected.png"]


def test_labels_tell_duplicates_apart(tmp_path):
    runs = [plot.load_run(write_run(tmp_path / p, v, steps=6, subjects=False))
            for p, v in (("a", "mind"), ("b", "mind"), ("c", "no-synergy"), ("x/d", "uniform"), ("y/d", "uniform"))]
    assert plot.labels(runs) == ["mind (a)", "mind (b)", "no-synergy",
                                 f"uniform ({tmp_path / 'x/d'})", f"uniform ({tmp_path / 'y/d'})"]


def test_every_figure_is_written(tmp_path):
    dirs = [write_run(tmp_path / "r1", "mind"), write_run(tmp_path / "r3", "mind", steps=12)]  # one variant twice
    out = tmp_path / "figures"
    res = subprocess.run([sys.executable, str(HERE / "plot.py"), *map(str, dirs), "--out", str(out), "--smooth", "3"],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    names = {f"{kind}-{run}.png" for kind in ("alpha", "meta_loss", "loss_real") for run in ("mind_r1", "mind_r3")}
    names |= {"loss.png", "n_selected.png", "subjects-mind_r1.png", "subjects-mind_r3.png"}
    printed = [Path(p) for p in res.stdout.splitlines()]  # the list of files written, one a line
    assert {p.parent for p in printed} == {out} and len(printed) == len(names)
    assert {p.name for p in printed} == names == {p.name for p in out.iterdir()}
    import matplotlib.image
    for name in names:
        data = (out / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000, name
        pixels = matplotlib.image.imread(out / name)
        assert pixels.shape[0] > 300 and pixels[..., :3].std() > 0.05, name  # not a blank canvas


def test_figures_draw_the_series(tmp_path, monkeypatch):
    """What each figure holds when it is saved: its lines, stacked areas and image, against the synthetic values."""
    drawn, save = {}, plot.save
    def spy(fig, path):
        drawn[path.name] = [({l.get_label(): (list(l.get_xdata()), list(l.get_ydata())) for l in ax.get_lines()},
                             ax.collections, [im.get_array() for im in ax.images]) for ax in fig.axes]
        return save(fig, path)
    monkeypatch.setattr(plot, "save", spy)
    plot.main([str(write_run(tmp_path / "m", "mind")), str(write_run(tmp_path / "n", "no-synergy", subjects=False)),
               "--out", str(tmp_path / "f"), "--smooth", "4"])
    joint = list(range(5, 25))
    raw = [3.0 - 0.05 * s + 0.4 * (-1) ** s for s in joint]
    lines = drawn["loss.png"][0][0]
    for lab in ("mind", "no-synergy"):
        steps, ys = lines[f"{lab} (moving average, 4)"]
        assert steps == joint
        np.testing.assert_allclose(ys[3:], np.convolve(raw, np.ones(4) / 4, mode="valid"))
    assert sum(xy == (joint, raw) for xy in lines.values()) == 2  # the raw curves, one per run
    assert drawn["n_selected.png"][0][0]["no-synergy"][1] == [8.0] * 4 + [2.0 + s % 4 for s in joint]
    (sft, _, _), (meta, _, _) = drawn["meta_loss-mind.png"][:2]  # two y axes, one per loss
    assert sft["student L_SFT (Eq. 2)"] == (joint, raw)
    assert meta["MetaNet L_meta (Eq. 1)"] == (list(range(1, 25)), [0.5 / s for s in range(1, 25)])
    _, areas, _ = drawn["alpha-mind.png"][0]
    assert len(areas) == K  # one band per perspective, stacked up to sum(alpha) = 1 in the joint stage
    np.testing.assert_allclose(max(v[1] for v in areas[-1].get_paths()[0].vertices), 1.0)
    curves = drawn["loss_real-no-synergy.png"][0][0]
    assert curves["Planning"] == (list(range(1, 25)), [2.3 - s / 100 for s in range(1, 25)]) and len(curves) == K - 1
    last = subject_record(3)
    np.testing.assert_array_equal(drawn["subjects-mind.png"][0][2][0],
                                  [[last["alpha"][s][k] for k in PERSPECTIVE_KEYS] for s in sorted(SUBJECTS)])
    assert "subjects-no-synergy.png" not in drawn


BAD = {  # name -> (lines of metrics.jsonl or None for no file, line number named in the error, words in it)
    "no file": (None, None, "no such file"),
    "empty": ([], None, "empty"),
    "not json": ([step_record(1, False), "step 3 | L_sft 2.1"], 2, "not JSON"),
    "not an object": (["[1, 2]"], 1, "JSON object"),
    "no step": ([{k: v for k, v in step_record(1, False).items() if k != "step"}], 1, "'step'"),
    "no stage": ([{k: v for k, v in step_record(1, False).items() if k != "stage"}], 1, "'stage'"),
    "no alpha": ([step_record(1, False), {k: v for k, v in step_record(2, False).items() if k != "alpha/socratic"}],
                 2, "'alpha/socratic'"),
    "string loss": ([step_record(1, False) | {"loss_sft": "2.0"}], 1, "not a number"),
    "other kind": ([{"kind": "eval", "step": 3, "acc": 0.5}], 1, "'eval'"),
    "bad subjects": ([step_record(1, False), {"kind": "subjects", "epoch": 2, "alpha": {"Algebra": {"symbolic": 1}}}],
                     2, "Algebra"),
    "two variants": ([step_record(1, False), step_record(2, False, "uniform")], 2, "variant"),
}


@pytest.mark.parametrize("case", BAD)
def test_bad_input_is_one_line_and_exit_2(tmp_path, case):
    lines, line_no, words = BAD[case]
    good, bad = write_run(tmp_path / "good"), tmp_path / "bad"
    bad.mkdir()
    if lines is not None:
        (bad / "metrics.jsonl").write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines))
    res = subprocess.run([sys.executable, str(HERE / "plot.py"), str(good), str(bad), "--out", str(tmp_path / "f")],
                         capture_output=True, text=True, timeout=60)
    where = f"{bad / 'metrics.jsonl'}:{line_no}:" if line_no else f"{bad / 'metrics.jsonl'}:"
    assert res.returncode == 2 and res.stdout == ""
    assert len(res.stderr.splitlines()) == 1 and res.stderr.startswith(f"error: {where}"), res.stderr
    assert words in res.stderr and not (tmp_path / "f").exists()
