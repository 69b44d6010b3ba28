"""Tests for latent.py: offline, on the CPU, with tiny students and adapters trained here. Run: pytest -q test_latent.py"""
import json, math, subprocess, sys
from pathlib import Path

import numpy as np
import pytest
import torch

import evaluate
import latent
import mind
from prompts import PERSPECTIVE_KEYS

HERE = Path(__file__).resolve().parent
SAMPLE = HERE / "data" / "sample.jsonl"
K = len(PERSPECTIVE_KEYS)


def blobs(n_groups=4, per=40, dim=6, sep=10.0, seed=0):
    """Gaussian groups with unit variance whose means lie `sep` apart on the axes: known clusters."""
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(n_groups), per)
    means = sep * np.eye(max(n_groups, dim))[:n_groups, :dim]
    return means[labels] + rng.standard_normal((len(labels), dim)), labels


def nmi_by_hand(a, b):
    """Mutual information over the arithmetic mean of the two entropies (sklearn's default normalisation)."""
    a, b = np.asarray(a), np.asarray(b)
    n, mi = len(a), 0.0
    ent = lambda x: -sum((c / n) * math.log(c / n) for c in np.unique(x, return_counts=True)[1])
    for u in np.unique(a):
        for v in np.unique(b):
            nuv = np.sum((a == u) & (b == v))
            if nuv:
                mi += nuv / n * math.log(n * nuv / (np.sum(a == u) * np.sum(b == v)))
    return mi / ((ent(a) + ent(b)) / 2)


def silhouette_by_hand(X, labels):
    s = []
    for i in range(len(X)):
        d = np.linalg.norm(X - X[i], axis=1)
        same = (labels == labels[i]) & (np.arange(len(X)) != i)
        a = d[same].mean()
        b = min(d[labels == other].mean() for other in np.unique(labels) if other != labels[i])
        s.append((b - a) / max(a, b))
    return float(np.mean(s))


# ---------------------------------------------------------------- the measurement tells structure from chance
def test_dpmm_finds_known_groups_and_falls_to_chance_on_shuffled_labels():
    X, labels = blobs()
    fit = latent.dpmm_fit(X, max_components=12, seed=0)
    assert fit["n_active"] == 4 and not fit["cap_reached"]  # inferred: 12 were allowed
    real = latent.separability(X, labels, fit["clusters"], seed=0)
    assert real["nmi"] > 0.95 and real["ari"] > 0.95 and real["silhouette"] > 0.7
    shuffled = np.random.default_rng(1).permutation(labels)
    fake = latent.separability(X, shuffled, fit["clusters"], seed=0)
    assert abs(fake["ari"]) < 0.05 and fake["silhouette"] < 0.05
    for key in ("nmi", "ari", "silhouette"):  # at the chance level this sample has, far below the real labels
        assert abs(fake[key] - fake["chance"][key]) < 0.05 and real[key] - real["chance"][key] > 0.7
    assert real["chance"]["nmi"] < 0.05 and abs(real["chance"]["ari"]) < 0.05  # the reference itself is chance


def test_dpmm_at_the_sample_shape_infers_about_the_true_count():
    # 8 groups x 36 points in 8 dimensions, as the perspectives of data/sample.jsonl after --dim 8
    X, labels = blobs(n_groups=8, per=36, dim=8, sep=6.0)
    fit = latent.dpmm_fit(X, max_components=32, seed=0)
    assert 8 <= fit["n_active"] <= 10 and sum(fit["weights"]) == pytest.approx(1.0, abs=1e-3)
    assert latent.separability(X, labels, fit["clusters"], seed=0)["nmi"] > 0.95


def test_separability_against_hand_computation():
    X, labels = blobs(n_groups=3, per=7, dim=3, sep=2.0, seed=3)
    clusters = np.random.default_rng(4).integers(0, 4, len(X))
    f = latent.separability(X, labels, clusters, seed=0)
    assert f["nmi"] == pytest.approx(nmi_by_hand(labels, clusters), abs=1e-9)
    assert f["silhouette"] == pytest.approx(silhouette_by_hand(X, labels), abs=1e-9)
    assert f["n_labels"] == 3
    same = latent.separability(X, labels, labels, seed=0)
    assert same["nmi"] == pytest.approx(1.0) and same["ari"] == pytest.approx(1.0)
    one = latent.separability(X, np.zeros(len(X)), clusters, seed=0)
    assert one["silhouette"] is None  # undefined for a single label, not a crash


# ---------------------------------------------------------------- projection, centring, coverage
def test_projection_is_pca_of_the_standardised_data():
    rng = np.random.default_rng(0)
    X = rng.standard_normal((50, 6)) @ rng.standard_normal((6, 6)) * np.array([1, 1e3, 1, 1, 1, 1])  # one huge feature
    X[:, 5] = 7.0  # a constant feature must not turn into NaN
    proj = latent.fit_projection(X, 3)
    Z = latent.project(X, proj)
    assert np.isfinite(Z).all()
    Xs = (X - X.mean(0)) / np.where(X.std(0) > 0, X.std(0), 1)
    vals, vecs = np.linalg.eigh(np.cov(Xs.T, bias=True))                     # independent: eigenvectors
    top = vecs[:, ::-1][:, :3]
    assert np.allclose(np.abs(top.T @ proj["components"].T), np.eye(3), atol=1e-6)  # same axes, up to sign
    assert np.allclose(np.cov(Z.T, bias=True), np.diag(vals[::-1][:3]), atol=1e-6)
    new = rng.standard_normal((4, 6))
    assert np.allclose(latent.project(new, proj), ((new - X.mean(0)) / proj["scale"]) @ proj["components"].T)
    again = latent.fit_projection(X[::-1].copy(), 3)  # same data, other order: same signs
    assert np.allclose(again["components"], proj["components"], atol=1e-8)


def test_center_groups_and_nearest_and_coverage_closed_forms():
    X = np.arange(12, dtype=float).reshape(6, 2) ** 2
    g = np.array([0, 0, 1, 1, 1, 2])
    C = latent.center_groups(X, g)
    for k in range(3):
        assert np.allclose(C[g == k].mean(0), 0)
    assert np.allclose(C[:2], X[:2] - X[:2].mean(0))
    cent = np.array([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]])
    assert latent.nearest(np.array([[1.0, 1.0], [9.0, 2.0], [4.0, 6.0], [6.0, 4.0]]), cent).tolist() == [0, 1, 2, 1]
    uni = latent.coverage_of(np.arange(8), 8)
    assert uni["entropy"] == pytest.approx(math.log(8)) and uni["entropy_norm"] == pytest.approx(1.0)
    one = latent.coverage_of([3, 3, 3], 8)
    assert one["entropy"] == 0 and one["shares"][3] == 1 and sum(one["counts"]) == 3
    c = latent.coverage_of([0, 0, 0, 1], 2)
    assert c["entropy"] == pytest.approx(-(0.75 * math.log(0.75) + 0.25 * math.log(0.25)))


def test_parse_adapters():
    assert latent.parse_adapters(["a", "b"]) == [(PERSPECTIVE_KEYS[0], "a"), (PERSPECTIVE_KEYS[1], "b")]
    assert latent.parse_adapters(["socratic=x/y"]) == [("socratic", "x/y")]
    with pytest.raises(latent.LatentError, match="unknown perspective"):
        latent.parse_adapters(["nope=x"])


# ---------------------------------------------------------------- rationales (Figure 4(c)), offline encoder
def test_rationales_end_to_end_deterministic_and_cached(tmp_path):
    rows = [json.loads(line) for line in SAMPLE.read_text().splitlines()[:12]]
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    argv = ["rationales", "--data", str(data), "--encoder", "tiny", "--dim", "4", "--max-components", "12"]
    a = latent.main(argv + ["--out", str(tmp_path / "a")])
    b = latent.main(argv + ["--out", str(tmp_path / "b")])
    ja, jb = ((tmp_path / d / "latent.json").read_text() for d in "ab")
    assert json.loads(ja)["figures"] == json.loads(jb)["figures"]  # same seed, same figures
    assert (tmp_path / "a" / "tsne.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    f = a["figures"]
    assert a["n_points"] == 12 * K and f["perspective"]["n_labels"] == K and f["subject"]["n_labels"] == len({r["subject"] for r in rows})
    assert 1 <= f["mixture"]["n_active"] <= 12 and a["seed"] == 0
    # the cache is mind.py's: its embed() with mind.py's key finds it and returns the same tensors
    encoder = mind.build_tiny([r["problem"] for r in rows] + [t for r in rows for t in r["rationales"].values()], 0)[2]
    cache = tmp_path / "a" / "embeddings.pt"
    stamp = cache.stat().st_mtime_ns
    _, h_r = mind.embed(encoder, rows, cache, "tiny:0")
    assert cache.stat().st_mtime_ns == stamp  # reused, not rewritten
    assert torch.allclose(h_r, encoder.encode([r["rationales"][k] for r in rows for k in PERSPECTIVE_KEYS],
                                               convert_to_tensor=True).view(12, K, -1), atol=1e-6)


# ---------------------------------------------------------------- tiny specialists trained here
def train_adapter(student: Path, rows, k: int, out: Path, steps=3, seed=0):
    """A few LoRA steps on perspective k's paths only (prompt masked), as a single-perspective specialist."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer
    torch.manual_seed(seed)
    model, tok = AutoModelForCausalLM.from_pretrained(student), AutoTokenizer.from_pretrained(student)
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", fan_in_fan_out=True,
                                             task_type="CAUSAL_LM"))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-2)
    paths, _ = mind.tokenize_paths(tok, rows, 512)
    for _ in range(steps):
        for p in paths:
            ids, first = torch.tensor(p[k][0])[None], p[k][1]
            labels = ids.clone()
            labels[:, :first] = -100
            model(input_ids=ids, labels=labels).loss.backward()
        opt.step()
        opt.zero_grad()
    model.save_pretrained(out)
    return out


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models and small mixtures run faster on one thread; on a loaded 2-core machine 2 threads were 18x slower."""
    from threadpoolctl import threadpool_limits  # scikit-learn's own dependency: its BLAS and OpenMP pools
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    with threadpool_limits(1):
        yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("latent")
    rows = [json.loads(line) for line in SAMPLE.read_text().splitlines()[:8]]
    data = tmp / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    texts = [r["problem"] for r in rows] + [t for r in rows for t in r["rationales"].values()]
    model, tok, _ = mind.build_tiny(texts, 0, 512)
    model.save_pretrained(tmp / "student")
    tok.save_pretrained(tmp / "student")
    keys = ["symbolic", "intuitive", "socratic"]
    adapters = {k: train_adapter(tmp / "student", rows, PERSPECTIVE_KEYS.index(k), tmp / f"ad-{k}") for k in keys}
    return dict(tmp=tmp, rows=rows, data=data, student=tmp / "student", adapters=adapters, keys=keys)


def independent_state(student, adapter, ids, start, end):
    """The mean last-layer state over [start, end), computed another way: adapter merged into the weights,
    the full LM, one unpadded sequence, hidden_states[-1]."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(student)
    model = PeftModel.from_pretrained(model, adapter).merge_and_unload().eval()
    with torch.no_grad():
        h = model(input_ids=torch.tensor(ids)[None], output_hidden_states=True).hidden_states[-1][0]
    return h[start:end].mean(0).double().numpy()


def test_pooled_states_batched_with_padding_equals_one_by_one(tiny):
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(tiny["student"]).eval()
    seqs = [[5, 6, 7, 8, 9, 10, 11], [12, 13, 14], [15, 16, 17, 18, 19]]
    spans = [(2, 7), (0, 2), (1, 4)]
    got = latent.pooled_states(latent.trunk_of(model), seqs, spans, batch_size=3, device=torch.device("cpu"), desc="t")
    with torch.no_grad():
        for s, (a, b), g in zip(seqs, spans, got):
            h = model(input_ids=torch.tensor(s)[None], output_hidden_states=True).hidden_states[-1][0]
            assert torch.allclose(g, h[a:b].mean(0), atol=1e-5)


def test_specialists_and_coverage_end_to_end(tiny, tmp_path):
    t = tiny
    out = tmp_path / "spec"
    specs = [f"{k}={p}" for k, p in t["adapters"].items()]
    res = latent.main(["specialists", "--student", str(t["student"]), "--adapters", *specs, "--data", str(t["data"]),
                       "--out", str(out), "--dim", "4", "--max-components", "8", "--max-len", "512"])
    S, N = len(t["keys"]), len(t["rows"])
    assert res["n_points"] == S * N and res["figures"]["specialist"]["n_labels"] == S
    assert {p.name for p in out.iterdir()} >= {"latent.json", "centroids.pt", "tsne.png"}
    c = torch.load(out / "centroids.pt", weights_only=True)
    Z, lab = c["points"].numpy(), c["labels"].numpy()
    assert lab.tolist() == [i for _ in range(N) for i in range(S)]
    for i in range(S):  # a centroid is its specialist's mean point
        assert np.allclose(c["centroids"][i].numpy(), Z[lab == i].mean(0))
    proj = {k: c[k].numpy() for k in ("mean", "scale", "components")}
    # each point is the specialist's own state on its own perspective's path, computed independently
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(t["student"])
    paths, _ = mind.tokenize_paths(tok, t["rows"], 512)
    for n, i in [(0, 0), (3, 1), (7, 2)]:
        k = PERSPECTIVE_KEYS.index(t["keys"][i])
        ids, first, ans = paths[n][k][0], paths[n][k][1], paths[n][k][2]
        want = latent.project(independent_state(t["student"], t["adapters"][t["keys"][i]], ids, first, ans)[None], proj)[0]
        assert np.allclose(Z[n * S + i], want, atol=1e-4)
    assert not np.allclose(c["centroids"][0], c["centroids"][1])  # the specialists differ

    # coverage: an evaluate.py per-row JSON made with evaluate.py's own prompt and scoring code
    student, adapter = str(t["student"]), str(t["adapters"]["intuitive"])
    completions = [t["rows"][0]["rationales"]["symbolic"], t["rows"][1]["rationales"]["intuitive"], "",
                   "Two plus two is \\boxed{4}."]
    items = [{"question": r["problem"], "gold": "4"} for r in t["rows"][:4]]
    items = [dict(it, prompt=evaluate.format_prompt(tok, it["question"], "math")) for it in items]
    run = {"label": "tiny + intuitive", "settings": {"student": student, "adapter": adapter},
           "benchmarks": {"gsm8k": {"source": "test", **evaluate.score("gsm8k", items, completions)},
                          "svamp": {"source": "test", **evaluate.score("svamp", [dict(i) for i in items[:2]], completions[:2])}}}
    ev = tmp_path / "row.json"
    ev.write_text(json.dumps(run))
    cov_out = tmp_path / "cov"
    cov = latent.main(["coverage", "--eval", str(ev), "--centroids", str(out), "--out", str(cov_out)])
    g = cov["students"][0]["benchmarks"]["gsm8k"]
    assert g["n"] == 3 and g["skipped"] == 1 and sum(g["counts"]) == 3  # the empty completion has no state
    p = np.array(g["shares"])
    assert p.sum() == pytest.approx(1.0) and g["entropy"] == pytest.approx(-(p[p > 0] * np.log(p[p > 0])).sum())
    kept = [(it, comp) for it, comp in zip(items, completions) if comp]
    for (it, comp), a in zip(kept, g["assign"]):  # the same assignment, computed independently
        pids = evaluate.encode_prompts(tok, [it["prompt"]])[0]
        cids = tok(comp, add_special_tokens=False)["input_ids"]
        z = latent.project(independent_state(student, adapter, pids + cids, len(pids), len(pids) + len(cids))[None], proj)
        assert a == int(np.argmin(((c["centroids"].numpy() - z) ** 2).sum(1)))
    assert (cov_out / "table.md").read_text().count("| tiny + intuitive |") == 1
    assert (cov_out / "coverage_gsm8k.png").exists() and (cov_out / "coverage_svamp.png").exists()
    assert json.loads((cov_out / "latent.json").read_text())["specialists"] == [f"{i}:{k}" for i, k in enumerate(t["keys"])]


# ---------------------------------------------------------------- bad input: one clear message
def test_adapter_that_does_not_fit_the_student(tiny, tmp_path, capsys):
    from transformers import AutoModelForCausalLM, AutoTokenizer, GPT2Config, GPT2LMHeadModel
    base = GPT2LMHeadModel.from_pretrained(tiny["student"]).config.to_dict()
    tok = AutoTokenizer.from_pretrained(tiny["student"])
    for name, change in (("narrow", {"n_embd": 32}), ("wider_mlp", {"n_inner": 96}), ("deeper", {"n_layer": 3})):
        torch.manual_seed(0)
        GPT2LMHeadModel(GPT2Config(**{**base, **change})).save_pretrained(tmp_path / name)
        tok.save_pretrained(tmp_path / name)
    for name in ("narrow", "wider_mlp"):
        with pytest.raises(latent.LatentError, match=rf"{tiny['adapters']['symbolic']}: does not fit the student"):
            latent.main(["specialists", "--student", str(tmp_path / name), "--adapters", str(tiny["adapters"]["symbolic"]),
                         "--data", str(tiny["data"]), "--out", str(tmp_path / "o")])
    # weights that have no place in the student (peft loads the rest and only warns): refused
    import shutil
    from safetensors.torch import load_file, save_file
    extra = tmp_path / "extra"
    shutil.copytree(tiny["adapters"]["symbolic"], extra)
    w = load_file(extra / "adapter_model.safetensors")
    w["base_model.model.transformer.h.5.attn.c_attn.lora_A.weight"] = next(iter(w.values())).clone()
    save_file(w, extra / "adapter_model.safetensors")
    with pytest.raises(latent.LatentError, match="1 adapter weights have no place in it"):
        latent.attach_adapters(AutoModelForCausalLM.from_pretrained(tiny["student"]), [str(extra)], str(tiny["student"]))
    # same widths, one more layer: peft loads it into layers 0-1 without a word; we name the other base
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "deeper")
    latent.attach_adapters(model, [str(tiny["adapters"]["symbolic"])], str(tmp_path / "deeper"))
    assert f"was trained on {tiny['student']}" in capsys.readouterr().err


def test_bad_inputs_are_named(tiny, tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"label": "x", "settings": {}, "benchmarks": {"gsm8k": {"items": [{"prompt": "p"}]}}}))
    with pytest.raises(latent.LatentError, match=r"bad\.json: benchmark 'gsm8k', item 1: no prompt and completion"):
        latent.read_eval(str(bad))
    bad.write_text(json.dumps([{"id": 1}]))
    with pytest.raises(latent.LatentError, match="no 'benchmarks'"):
        latent.read_eval(str(bad))
    with pytest.raises(latent.LatentError, match="no centroids.pt"):
        latent.main(["coverage", "--eval", str(bad), "--centroids", str(tmp_path), "--out", str(tmp_path / "o")])
    with pytest.raises(latent.LatentError, match="not an adapter folder"):
        latent.main(["specialists", "--student", str(tiny["student"]), "--adapters", str(tmp_path), "--data",
                     str(tiny["data"]), "--out", str(tmp_path / "o")])


def test_command_line_bad_data_is_one_line_exit_2(tmp_path):
    bad = tmp_path / "other.jsonl"
    bad.write_text(json.dumps({"question": "1+1?", "answer": "2"}) + "\n")  # another schema
    r = subprocess.run([sys.executable, str(HERE / "latent.py"), "rationales", "--data", str(bad), "--encoder", "tiny",
                        "--out", str(tmp_path / "o")], capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines() == [f"error: {bad}:1 (problem '?'): missing field 'id'"]
