"""The latent-space analysis of MIND (Cui et al., ACL 2026, Sections 3.2 and 4.3, Figures 4 and 5), in one file.

The paper's measurement: embed reasoning paths, cluster them with a Dirichlet-process mixture (DPMM: the
number of clusters is inferred, not given), draw them with t-SNE, and ask whether the clusters follow the
perspective that wrote each path. Three subcommands, one per figure:
  rationales   Fig. 4(c): the teacher's rationales, embedded by the frozen Sentence-BERT of mind.py.
  specialists  Fig. 4(d): last-layer states of students distilled on one perspective each (the adapters of
               `mind.py --variant single:<k>`), reading their own
               perspective's rationales; writes the specialist centroids that `coverage` needs.
  coverage     Fig. 5: a student's states on the completions evaluate.py saved, each assigned to the nearest
               specialist centroid; per benchmark the share of each perspective and its entropy.

Usage:
  python latent.py rationales --data data/sample.jsonl --encoder sentence-transformers/all-MiniLM-L6-v2 \\
      --out runs/latent/rationales                               # --encoder tiny: mind.py's offline encoder
  python latent.py specialists --student runs/tiny/tiny-student --adapters symbolic=runs/sym/adapter \\
      intuitive=runs/int/adapter ... --data data/sample.jsonl --out runs/latent/specialists
  python latent.py coverage --eval runs/eval/vanilla.json runs/eval/mind.json \\
      --centroids runs/latent/specialists --out runs/latent/coverage
Every subcommand writes OUT/latent.json (every figure, the settings, the seed) and PNGs; `specialists` also
writes OUT/centroids.pt, `coverage` OUT/table.md. A fixed --seed gives the same files.

How a figure is read (all of them in latent.json, per label set: perspective or specialist, subject, problem):
  n_active    mixture components that own at least one point (upper bound --max-components; `cap_reached`
              says the bound was hit, i.e. the count was not really inferred)
  nmi, ari    agreement between the mixture's clusters and the labels (1 = the same partition)
  silhouette  how well the labels themselves separate in the projected space (-1..1, 0 = no structure)
  chance      the same three figures averaged over 5 seeded shuffles of the labels. NMI is biased upwards
              when there are many clusters (well above 0 for random labels): compare nmi with chance.nmi.
  coverage    share of each specialist and entropy H = -sum p ln p (nats), also divided by ln S
              (1 = every specialist equally often, 0 = collapse onto one).

Choices of ours (the paper leaves them open):
  1. Projection: per-feature standardisation then PCA to --dim dimensions, not the paper's trained encoder.
     PCA is unsupervised (a projection trained with the specialist labels would make them separate by
     construction), closed-form and deterministic, and it maps new states (coverage) the same way.
     Standardising first matters: a few hidden dimensions of an LLM carry activations orders of magnitude
     larger than the rest, and unscaled PCA would mostly return those dimensions.
  2. A path's state is the mean of the last-layer hidden states over its rationale tokens and the fixed
     lead-in that follows (mind.TokenPath: prompt_len to answer_start); for coverage, over the completion
     tokens. The prompt is the same for every path and the answer too, so neither says anything about the perspective.
  3. DPMM: scikit-learn's BayesianGaussianMixture, dirichlet_process prior, diagonal covariances (full ones
     over-split at the shipped sample's size, see dpmm_fit), best of 5 starts, at most --max-components
     (default 4K = 32) components, in --dim 8 dimensions (K-1 = 7 are needed to tell 8 groups apart).
  4. Centroids are the mean projected state of each specialist; assignment is by Euclidean distance to the
     nearest one (Section 4.3).
Traps: different specialists differ both in their weights and in the text they read, so their separation
mixes the two (--same-text KEY lets every specialist read one perspective's rationales: what still separates
comes from the weights alone). Retokenizing a saved completion may not give back the generated ids exactly
(merges across the prompt boundary, dropped special tokens); the states are those of the saved text.
--center-problems subtracts each problem's mean over its paths, so that what is left is how the paths differ
and not what the problem is about (generic sentence embeddings are dominated by the latter).
"""
import argparse, json, math, re, sys, warnings
from pathlib import Path

import numpy as np
import torch

import fast, mind
from prompts import PERSPECTIVE_KEYS

K = len(PERSPECTIVE_KEYS)


class LatentError(ValueError):
    """Bad input; main() prints the message alone and exits with status 2."""


# ----------------------------------------------------------------------------------------------------
# 1. Pure functions: projection, mixture, separability, coverage. Arrays are numpy float64.
def fit_projection(X, dim: int) -> dict:
    """Standardise each feature, then PCA to `dim` dimensions. X (n, D) -> {mean (D,), scale (D,), components (d, D)}.

    A constant feature has scale 1, not 0 (else 0/0 = NaN). SVD signs are arbitrary: each component is
    turned so that its largest loading is positive, so the same data give the same map everywhere."""
    X = np.asarray(X, dtype=np.float64)
    mean, scale = X.mean(0), X.std(0)
    scale = np.where(scale > 1e-12, scale, 1.0)
    _, _, vt = np.linalg.svd((X - mean) / scale, full_matrices=False)
    vt = vt[: min(dim, len(vt))]                                                  # (d, D)
    vt *= np.sign(vt[np.arange(len(vt)), np.abs(vt).argmax(1)])[:, None]
    return {"mean": mean, "scale": scale, "components": vt}


def project(X, proj: dict):
    """(n, D) -> (n, d) with a projection from fit_projection (also for states it was not fit on)."""
    return ((np.asarray(X, dtype=np.float64) - proj["mean"]) / proj["scale"]) @ proj["components"].T


def center_groups(X, groups):
    """Subtracts from each row the mean of the rows in its group (e.g. the 8 paths of one problem)."""
    X, groups = np.asarray(X, dtype=np.float64), np.asarray(groups)
    out = X.copy()
    for g in np.unique(groups):
        out[groups == g] -= X[groups == g].mean(0)
    return out


def dpmm_fit(Z, max_components: int, seed: int, covariance: str = "diag", n_init: int = 5) -> dict:
    """Dirichlet-process Gaussian mixture (Section 3.2). Z (n, d) -> clusters (n,), weights, n_active.

    Traps, both measured on Gaussian groups of known number: variational inference stops in local optima
    that split a true cluster (four well-separated blobs: six clusters from one start in three), so we keep
    the best lower bound of n_init starts; and with about 36 points per group in 8 dimensions (the shipped
    sample's shape) full covariances (36 numbers each) over-split 8 true groups into 21-24 clusters, while
    diagonal ones find 8-9 (also for rotated, correlated groups: 10-12). Hence diag by default."""
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.mixture import BayesianGaussianMixture
    n = min(max_components, len(Z))
    gm = BayesianGaussianMixture(n_components=n, weight_concentration_prior_type="dirichlet_process",
                                 covariance_type=covariance, max_iter=1000, n_init=n_init, random_state=seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)  # reported as `converged` instead
        clusters = gm.fit(Z).predict(Z)
    used = np.unique(clusters)
    return {"clusters": clusters, "n_active": int(len(used)), "cap": n, "cap_reached": bool(len(used) == n),
            "converged": bool(gm.converged_), "weights": sorted((round(float(w), 4) for w in gm.weights_), reverse=True)}


def separability(Z, labels, clusters, seed: int, n_shuffles: int = 5) -> dict:
    """NMI and ARI of the clusters against the labels, silhouette of the labels in Z, and the same three
    averaged over `n_shuffles` seeded permutations of the labels (the chance level of this very sample)."""
    from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score, silhouette_score
    labels = np.asarray(labels)

    def figures(lab):
        n_lab = len(np.unique(lab))
        sil = float(silhouette_score(Z, lab)) if 2 <= n_lab <= len(Z) - 1 else None  # defined for 2..n-1 labels
        return {"nmi": float(normalized_mutual_info_score(lab, clusters)), "ari": float(adjusted_rand_score(lab, clusters)),
                "silhouette": sil}
    rng = np.random.default_rng(seed)
    chance = [figures(rng.permutation(labels)) for _ in range(n_shuffles)]
    mean = {k: None if chance[0][k] is None else float(np.mean([c[k] for c in chance])) for k in chance[0]}
    return {**figures(labels), "n_labels": int(len(np.unique(labels))), "chance": mean}


def tsne_map(Z, seed: int):
    """(n, d) -> (n, 2). Perplexity 30 (the usual value), lowered for small n, where t-SNE needs n > 3 * perplexity."""
    from sklearn.manifold import TSNE
    if len(Z) < 4:
        return np.zeros((len(Z), 2))
    return TSNE(2, perplexity=min(30.0, (len(Z) - 1) / 3), init="pca", random_state=seed).fit_transform(Z)


def nearest(Z, centroids):
    """Index of the nearest centroid (Euclidean) for each row. Z (n, d), centroids (S, d) -> (n,)."""
    return ((Z[:, None, :] - centroids[None]) ** 2).sum(-1).argmin(1)


def coverage_of(assign, S: int) -> dict:
    """Share of each of S specialists and the entropy of that distribution, in nats and divided by ln S."""
    counts = np.bincount(np.asarray(assign, dtype=np.int64), minlength=S)
    p = counts / max(1, counts.sum())
    h = float(-(p[p > 0] * np.log(p[p > 0])).sum()) + 0.0  # + 0.0: no "-0.000" for a collapse
    return {"counts": counts.tolist(), "shares": p.tolist(), "entropy": h, "entropy_norm": h / math.log(S) if S > 1 else 0.0}


def analyse(Z, label_sets: dict, seed: int, max_components: int, covariance: str = "diag"):
    """The mixture and the separability figures for every label set. label_sets: name -> (n,) labels.
    Returns ({"mixture": ..., name: separability}, the mixture's clusters (n,))."""
    fit = dpmm_fit(Z, max_components, seed, covariance)
    out = {"mixture": {k: v for k, v in fit.items() if k != "clusters"}}
    out |= {name: separability(Z, lab, fit["clusters"], seed) for name, lab in label_sets.items()}
    return out, fit["clusters"]


# ----------------------------------------------------------------------------------------------------
# 2. Plots (matplotlib, Agg: no display needed).
def plt_():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def plot_maps(Y, panels, title: str, path: Path):
    """t-SNE map, one panel per (panel title, labels (n,), names) colouring."""
    plt = plt_()
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 5.5), squeeze=False)
    for ax, (name, labels, names) in zip(axes[0], panels):
        cmap = plt.get_cmap("tab10" if len(names) <= 10 else "tab20")
        for j, nm in enumerate(names):
            m = np.asarray(labels) == j
            if m.any():
                ax.scatter(Y[m, 0], Y[m, 1], s=12, color=cmap(j % cmap.N), label=nm if len(names) <= 20 else None)
        ax.set_title(name)
        ax.set_xticks([]), ax.set_yticks([])
        if len(names) <= 20:
            ax.legend(fontsize=7, markerscale=1.5, loc="best")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_coverage(shares: dict, names: list[str], title: str, path: Path):
    """Grouped bars: for each student (shares: label -> (S,) shares), the share of each specialist."""
    plt = plt_()
    fig, ax = plt.subplots(figsize=(max(6, 1.1 * len(names) * max(1, len(shares)) ** 0.5), 4))
    w = 0.8 / max(1, len(shares))
    for i, (label, p) in enumerate(shares.items()):
        ax.bar(np.arange(len(names)) + i * w - 0.4 + w / 2, p, w, label=label)
    ax.set_xticks(np.arange(len(names)), names, rotation=30, ha="right")
    ax.set_ylabel("share of completions")
    ax.set_title(title)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ----------------------------------------------------------------------------------------------------
# 3. Students: hidden states, batched.
def device_():
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def load_student(name: str, device):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    try:
        tok = AutoTokenizer.from_pretrained(name)
        model = AutoModelForCausalLM.from_pretrained(name, dtype=fast.student_dtype(device))  # bf16/fp16/fp32
    except (OSError, ValueError) as e:
        raise LatentError(f"{name}: cannot load the student ({str(e).strip().splitlines()[0]})") from None
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return model.to(device).eval(), tok


def attach_adapters(model, adapters: list[str], student: str):
    """A PeftModel holding every adapter as 'a0', 'a1', ...; each must fit the student exactly: every
    weight in its file finds its place, and every LoRA slot gets a weight (peft only warns otherwise).
    Trap: peft stores the adapted modules by name, so an adapter of a 2-layer model loads without a word
    into layers 0-1 of a 3-layer one with the same widths; we can only warn when the adapter names
    another base model than --student."""
    from peft import PeftModel, get_peft_model_state_dict
    from safetensors.torch import load_file
    peft_model = None
    for i, a in enumerate(adapters):
        f = Path(a) / "adapter_model.safetensors"
        if not (Path(a) / "adapter_config.json").is_file() or not f.is_file():
            raise LatentError(f"{a}: not an adapter folder (no adapter_config.json / adapter_model.safetensors)")
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                if peft_model is None:
                    peft_model = PeftModel.from_pretrained(model, a, adapter_name=f"a{i}")
                else:
                    peft_model.load_adapter(a, adapter_name=f"a{i}")
        except (RuntimeError, ValueError, KeyError) as e:
            raise LatentError(f"{a}: does not fit the student {student} ({str(e).strip().splitlines()[0][:200]})") from None
        trained_on = json.loads((Path(a) / "adapter_config.json").read_text()).get("base_model_name_or_path")
        if trained_on and Path(trained_on).resolve() != Path(student).resolve() and trained_on != student:
            print(f"warning: {a} was trained on {trained_on}, used here on {student}", file=sys.stderr)
        want, have = set(load_file(f)), set(get_peft_model_state_dict(peft_model, adapter_name=f"a{i}"))
        if want != have:
            raise LatentError(f"{a}: does not fit the student {student} ({len(want - have)} adapter weights have no "
                              f"place in it, {len(have - want)} of its LoRA weights are not in the adapter)")
    peft_model.eval()
    return peft_model


def trunk_of(model):
    """The transformer without its LM head (GPT2Model, Qwen2Model, ...): we need hidden states, and the
    full model would also compute (B, T, V) logits. Trap: a PeftModel has its own `.base_model` (the
    LoRA wrapper), so unwrap it first; the LoRA layers stay in place inside the transformer."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    return inner.base_model


@torch.no_grad()
def pooled_states(trunk, seqs: list[list[int]], spans: list[tuple[int, int]], batch_size: int, device, desc: str):
    """Mean last-layer hidden state over positions [s, e) of each token sequence -> (n, H) float32 (CPU).

    Sequences are batched longest first, right-padded with an attention mask; padding never enters a mean
    (it comes after every real token, and a causal model's real positions do not see it)."""
    from tqdm.auto import tqdm
    order = sorted(range(len(seqs)), key=lambda i: -len(seqs[i]))
    out = [None] * len(seqs)
    amp = torch.autocast(device.type, torch.bfloat16, enabled=device.type == "cuda" and torch.cuda.is_bf16_supported())
    for b in tqdm(range(0, len(order), batch_size), desc=desc, dynamic_ncols=True, leave=False):
        idx = order[b: b + batch_size]
        T = len(seqs[idx[0]])
        ids, att = torch.zeros(len(idx), T, dtype=torch.long), torch.zeros(len(idx), T, dtype=torch.long)
        for r, i in enumerate(idx):
            ids[r, : len(seqs[i])], att[r, : len(seqs[i])] = torch.tensor(seqs[i]), 1
        with amp:
            h = trunk(input_ids=ids.to(device), attention_mask=att.to(device)).last_hidden_state.float()  # (B, T, H)
        for r, i in enumerate(idx):
            s, e = spans[i]
            out[i] = h[r, s:e].mean(0).cpu()
    return torch.stack(out) if out else torch.zeros(0, 0)


# ----------------------------------------------------------------------------------------------------
# 4. The three subcommands. Each returns what it writes to OUT/latent.json.
def _fit_points(X, problem, args):
    """--center-problems (each problem's mean removed), then the projection fitted on these points:
    (the points it was fitted on, the projection, the projected points)."""
    if args.center_problems:
        X = center_groups(X, problem)
    proj = fit_projection(X, args.dim)
    return X, proj, project(X, proj)


def _labels(rows, per_row_k):
    """Problem, subject labels for points laid out problem-major (problem n, then its per_row_k points)."""
    subjects = [r.get("subject") or "unknown" for r in rows]
    names = sorted(set(subjects))
    return (np.repeat(np.arange(len(rows)), per_row_k), np.repeat([names.index(s) for s in subjects], per_row_k), names)


def _report(Z, labels: dict, args) -> tuple[dict, np.ndarray]:
    print(f"mixture on {len(Z)} points in {Z.shape[1]} dimensions ...", file=sys.stderr)
    figs, clusters = analyse(Z, {k: v[0] for k, v in labels.items()}, args.seed, args.max_components, args.covariance)
    for name in labels:
        f = figs[name]
        print(f"{name:>12}: NMI {f['nmi']:.3f} (chance {f['chance']['nmi']:.3f}) | ARI {f['ari']:.3f} "
              f"(chance {f['chance']['ari']:.3f}) | silhouette {f['silhouette'] if f['silhouette'] is None else round(f['silhouette'], 3)}",
              file=sys.stderr)
    m = figs["mixture"]
    print(f"active components: {m['n_active']} of at most {m['cap']}" + (" (the bound: raise --max-components)"
          if m["cap_reached"] else ""), file=sys.stderr)
    return figs, clusters


def _write(out: Path, result: dict):
    (out / "latent.json").write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
    print(f"wrote {out / 'latent.json'}", file=sys.stderr)


def cmd_rationales(args) -> dict:
    """Figure 4(c): the teacher's rationales in the frozen Sentence-BERT space of mind.py."""
    rows = mind.load_data(args.data)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.encoder == "tiny":  # mind.py's offline encoder, built from the same texts and seed as mind.py builds it
        texts = [r["problem"] for r in rows] + [t for r in rows for t in r["rationales"].values()]
        encoder = mind.build_tiny(texts, args.seed)[2]
    else:
        from sentence_transformers import SentenceTransformer
        try:
            encoder = SentenceTransformer(args.encoder, device=str(device_()))
        except (OSError, ValueError) as e:
            raise LatentError(f"{args.encoder}: cannot load the encoder ({str(e).strip().splitlines()[0]})") from None
    cache = Path(args.cache) if args.cache else out / "embeddings.pt"
    print(f"embedding {len(rows)} problems x {K} rationales ...", file=sys.stderr)
    _, h_r = mind.embed(encoder, rows, cache, f"{args.encoder}:{args.seed}")  # mind.py's key: same cache file
    X = h_r.reshape(len(rows) * K, -1).double().numpy()                        # point n * K + k   (N*K, D)
    problem, subject, subjects = _labels(rows, K)
    X, proj, Z = _fit_points(X, problem, args)
    perspective = np.tile(np.arange(K), len(rows))
    labels = {"perspective": (perspective, list(PERSPECTIVE_KEYS)), "subject": (subject, subjects),
              "problem": (problem, [r["id"] for r in rows])}
    figs, clusters = _report(Z, labels, args)
    print("t-SNE ...", file=sys.stderr)
    Y = tsne_map(Z, args.seed)
    plot_maps(Y, [("perspective", perspective, list(PERSPECTIVE_KEYS)), ("subject", subject, subjects),
                  (f"DPMM clusters ({figs['mixture']['n_active']})", clusters, [str(c) for c in range(clusters.max() + 1)])],
              f"rationales of {Path(args.data).name}, encoder {Path(args.encoder).name}", out / "tsne.png")
    result = {"figure": "4(c) rationales", "figures": figs, "n_points": len(Z), "embedding_dim": int(X.shape[1]),
              "settings": {k: v for k, v in vars(args).items() if k != "func"}, "seed": args.seed,
              "explained_variance": _explained(X, proj), "pngs": ["tsne.png"]}
    _write(out, result)
    return result


def _explained(X, proj) -> float:
    """Share of the (standardised) variance that the projection keeps."""
    Xs = (X - proj["mean"]) / proj["scale"]
    return float((((Xs @ proj["components"].T) ** 2).sum()) / max((Xs ** 2).sum(), 1e-30))


def parse_adapters(specs: list[str]) -> list[tuple[str, str]]:
    """KEY=PATH, or PATH alone for the i-th perspective in prompts.PERSPECTIVE_KEYS order."""
    out = []
    for i, spec in enumerate(specs):
        key, sep, path = spec.partition("=")
        if not sep:
            if i >= K:
                raise LatentError(f"{spec}: more than {K} adapters; name each one's perspective as KEY=PATH")
            key, path = PERSPECTIVE_KEYS[i], spec
        if key not in PERSPECTIVE_KEYS:
            raise LatentError(f"{spec}: unknown perspective {key!r} (expected one of {', '.join(PERSPECTIVE_KEYS)})")
        out.append((key, path))
    return out


def cmd_specialists(args) -> dict:
    """Figure 4(d): each specialist's states on its own perspective's rationales; writes the centroids."""
    specs = parse_adapters(args.adapters)
    if args.same_text and args.same_text not in PERSPECTIVE_KEYS:
        raise LatentError(f"--same-text {args.same_text}: not a perspective ({', '.join(PERSPECTIVE_KEYS)})")
    rows = mind.load_data(args.data)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(args.seed)
    device = device_()
    model, tok = load_student(args.student, device)
    peft_model = attach_adapters(model, [p for _, p in specs], args.student)
    paths, n_cut = mind.tokenize_paths(tok, rows, args.max_len)  # the exact ids mind.py trains on
    if n_cut:
        print(f"warning: {n_cut} rationales exceed --max-len {args.max_len} and were cut", file=sys.stderr)
    trunk, states = trunk_of(peft_model), []
    for i, (key, path) in enumerate(specs):
        k = PERSPECTIVE_KEYS.index(args.same_text or key)
        seqs = [pp[k].ids for pp in paths]
        spans = [(pp[k].prompt_len, pp[k].answer_start) for pp in paths]  # rationale + lead-in
        peft_model.set_adapter(f"a{i}")
        states.append(pooled_states(trunk, seqs, spans, args.batch_size, device, f"specialist {i + 1}/{len(specs)} ({key})"))
    H = torch.stack(states, 1)                                                     # (N, S, hidden)
    S = len(specs)
    X = H.reshape(len(rows) * S, -1).double().numpy()                             # point n * S + i
    problem, subject, subjects = _labels(rows, S)
    X, proj, Z = _fit_points(X, problem, args)
    specialist = np.tile(np.arange(S), len(rows))
    names = [f"{i}:{key}" for i, (key, _) in enumerate(specs)]
    labels = {"specialist": (specialist, names), "subject": (subject, subjects), "problem": (problem, [r["id"] for r in rows])}
    figs, clusters = _report(Z, labels, args)
    centroids = np.stack([Z[specialist == i].mean(0) for i in range(S)])          # (S, d)
    torch.save({"mean": torch.from_numpy(proj["mean"]), "scale": torch.from_numpy(proj["scale"]),
                "components": torch.from_numpy(proj["components"]), "centroids": torch.from_numpy(centroids),
                "points": torch.from_numpy(Z), "labels": torch.from_numpy(specialist), "names": names,
                "hidden_size": int(X.shape[1]), "student": args.student, "center_problems": bool(args.center_problems)},
               out / "centroids.pt")
    print("t-SNE ...", file=sys.stderr)
    Y = tsne_map(Z, args.seed)
    plot_maps(Y, [("specialist", specialist, names),
                  (f"DPMM clusters ({figs['mixture']['n_active']})", clusters, [str(c) for c in range(clusters.max() + 1)])],
              f"specialists of {args.student}", out / "tsne.png")
    result = {"figure": "4(d) specialists", "figures": figs, "n_points": len(Z), "hidden_size": int(X.shape[1]),
              "adapters": [{"name": n, "perspective": k, "path": p} for n, (k, p) in zip(names, specs)],
              "rationales_cut": n_cut, "explained_variance": _explained(X, proj),
              "settings": {k: v for k, v in vars(args).items() if k != "func"}, "seed": args.seed,
              "files": ["centroids.pt", "tsne.png"]}
    _write(out, result)
    return result


def read_eval(path: str) -> dict:
    """evaluate.py's per-row JSON: {"label", "settings": {"student", "adapter", ...}, "benchmarks": {bench:
    {"items": [{"prompt", "completion", ...}]}}}; anything else is one clear error."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise LatentError(f"{path}: not JSON ({e.msg}, line {e.lineno}); expected evaluate.py's OUT/<row>.json") from None
    benches = data.get("benchmarks") if isinstance(data, dict) else None
    if not isinstance(benches, dict) or not benches:
        raise LatentError(f"{path}: no 'benchmarks' in it; expected evaluate.py's per-row JSON (OUT/<row>.json)")
    for b, block in benches.items():
        items = block.get("items") if isinstance(block, dict) else None
        if not isinstance(items, list) or not items:
            raise LatentError(f"{path}: benchmark {b!r} has no items")
        for n, it in enumerate(items, 1):
            if not isinstance(it, dict) or not isinstance(it.get("prompt"), str) or not isinstance(it.get("completion"), str):
                raise LatentError(f"{path}: benchmark {b!r}, item {n}: no prompt and completion text "
                                  "(evaluate.py saves both for every question)")
    return data


def cmd_coverage(args) -> dict:
    """Figure 5: where a student's completions fall among the specialists' centroids, per benchmark."""
    cfile = Path(args.centroids) / "centroids.pt"
    if not cfile.is_file():
        raise LatentError(f"{args.centroids}: no centroids.pt (run `latent.py specialists --out {args.centroids}` first)")
    c = torch.load(cfile, weights_only=True)
    proj = {k: c[k].numpy() for k in ("mean", "scale", "components")}
    centroids, names, S = c["centroids"].numpy(), list(c["names"]), len(c["names"])
    if c["center_problems"]:  # a completion has no sibling paths whose mean could be subtracted
        raise LatentError(f"{cfile}: made with --center-problems, which completions cannot follow; rerun "
                          "`latent.py specialists` without it for coverage")
    runs = [(f, read_eval(f)) for f in args.eval]  # every file checked before any model is loaded
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    device, results = device_(), []
    for f, run in runs:
        student = args.student or run.get("settings", {}).get("student")
        adapter = args.adapter or run.get("settings", {}).get("adapter")
        if not student:
            raise LatentError(f"{f}: its settings name no student; pass --student")
        model, tok = load_student(student, device)
        if adapter:
            model = attach_adapters(model, [adapter], student)
        trunk, label = trunk_of(model), run.get("label") or f
        row = {"label": label, "eval": f, "student": student, "adapter": adapter, "benchmarks": {}}
        for bench, block in run["benchmarks"].items():
            seqs, spans, skipped, cut = [], [], 0, 0
            for it in block["items"]:
                # As evaluate.py encodes prompts: a chat template writes its own special tokens.
                p = tok(it["prompt"], add_special_tokens=not tok.chat_template)["input_ids"]
                comp = tok(it["completion"], add_special_tokens=False)["input_ids"]
                room = args.max_len - len(p)
                cut += len(comp) > room
                comp = comp[: max(0, room)]
                if not comp:  # nothing written (or no room left): no state to place
                    skipped += 1
                    continue
                seqs.append(p + comp)
                spans.append((len(p), len(p) + len(comp)))
            if not seqs:
                row["benchmarks"][bench] = {"n": 0, "skipped": skipped}
                continue
            Hs = pooled_states(trunk, seqs, spans, args.batch_size, device, f"{label} | {bench} ({len(seqs)})")
            if Hs.shape[1] != c["hidden_size"]:
                raise LatentError(f"{f}: student {student} has hidden size {Hs.shape[1]}, the centroids in {cfile} were "
                                  f"made from one with {c['hidden_size']} ({c['student']})")
            assign = nearest(project(Hs.double().numpy(), proj), centroids)
            cov = coverage_of(assign, S)
            row["benchmarks"][bench] = {"n": len(seqs), "skipped": skipped, "cut": cut, **cov, "assign": assign.tolist()}
            top = int(np.argmax(cov["shares"]))
            print(f"{label} | {bench}: entropy {cov['entropy_norm']:.3f} of max, top {names[top]} "
                  f"{100 * cov['shares'][top]:.0f}%", file=sys.stderr)
        results.append(row)
        del model, trunk
    benches = list(dict.fromkeys(b for r in results for b in r["benchmarks"]))
    pngs = []
    for bench in benches:
        shares = {r["label"]: r["benchmarks"][bench]["shares"] for r in results if r["benchmarks"].get(bench, {}).get("n")}
        if shares:
            png = f"coverage_{re.sub(r'[^A-Za-z0-9._-]+', '_', bench)}.png"
            plot_coverage(shares, names, f"{bench}: nearest specialist centroid", out / png)
            pngs.append(png)
    table = coverage_table(results, benches, names)
    (out / "table.md").write_text(table, encoding="utf-8")
    print("\n" + table, file=sys.stderr)
    result = {"figure": "5 coverage", "specialists": names, "centroids": str(cfile), "students": results,
              "settings": {k: v for k, v in vars(args).items() if k != "func"}, "seed": args.seed,
              "files": ["table.md", *pngs]}
    _write(out, result)
    return result


def coverage_table(results: list[dict], benches: list[str], names: list[str]) -> str:
    """Markdown: one row per student, per benchmark the normalised entropy and the most chosen specialist."""
    lines = ["Coverage: entropy of the specialist shares / ln S (1 = all equally, 0 = one only); top specialist and share.", "",
             "| Student | " + " | ".join(benches) + " |", "|---" * (len(benches) + 1) + "|"]
    for r in results:
        cells = []
        for b in benches:
            x = r["benchmarks"].get(b)
            if not x or not x.get("n"):
                cells.append("–")
                continue
            top = int(np.argmax(x["shares"]))
            cells.append(f"{x['entropy_norm']:.2f} ({names[top]} {100 * x['shares'][top]:.0f}%)")
        lines.append(f"| {r['label']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------------------------------
# 5. Command line.
def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)

    def common(s, projection=True):
        s.add_argument("--out", required=True, help="output folder (latent.json, PNGs)")
        s.add_argument("--seed", type=int, default=0, help="seed of the mixture, t-SNE, the chance shuffle (and the tiny encoder)")
        if projection:
            s.add_argument("--dim", type=int, default=8, help="PCA dimensions the mixture and t-SNE see [ours: >= K-1]")
            s.add_argument("--max-components", type=int, default=4 * K, help="upper bound of the DPMM's components [ours: 4K]")
            s.add_argument("--covariance", choices=("diag", "full"), default="diag", help="covariance of the DPMM's "
                           "components [ours: diag; full over-splits at ~36 points per group, see dpmm_fit]")
            s.add_argument("--center-problems", action="store_true", help="subtract each problem's mean over its paths first")
    r = sub.add_parser("rationales", help="Figure 4(c): teacher rationales in Sentence-BERT space")
    r.add_argument("--data", required=True, help="JSONL in mind.py's schema")
    r.add_argument("--encoder", default="sentence-transformers/all-MiniLM-L6-v2",
                   help="Sentence-BERT hub id or folder (mind.py's default), or 'tiny' (mind.py's offline encoder)")
    r.add_argument("--cache", help="embedding cache [default: OUT/embeddings.pt; a mind.py run's OUT/embeddings.pt "
                   "with the same --encoder and --seed is reused]")
    common(r)
    r.set_defaults(func=cmd_rationales)
    s = sub.add_parser("specialists", help="Figure 4(d): specialist students' last-layer states; writes centroids")
    s.add_argument("--student", required=True, help="base model (hub id or folder, e.g. a mind.py run's tiny-student)")
    s.add_argument("--adapters", nargs="+", required=True, help="KEY=ADAPTER per specialist (KEY a perspective), or "
                   "ADAPTER alone for the perspectives in prompts.py order")
    s.add_argument("--data", required=True, help="JSONL in mind.py's schema: the problems and rationales read")
    s.add_argument("--same-text", metavar="KEY", help="control: every specialist reads perspective KEY's rationales")
    s.add_argument("--max-len", type=int, default=1024, help="max tokens per path, as mind.py --max-len")
    s.add_argument("--batch-size", type=int, default=8, help="paths per forward pass")
    common(s)
    s.set_defaults(func=cmd_specialists)
    c = sub.add_parser("coverage", help="Figure 5: a student's completions among the specialists' centroids")
    c.add_argument("--eval", nargs="+", required=True, help="evaluate.py per-row JSON file(s): one student each")
    c.add_argument("--centroids", required=True, help="OUT folder of `latent.py specialists`")
    c.add_argument("--student", help="base model [default: each JSON's settings.student]")
    c.add_argument("--adapter", help="adapter [default: each JSON's settings.adapter]")
    c.add_argument("--max-len", type=int, default=4096, help="max tokens of prompt + completion (the completion is cut)")
    c.add_argument("--batch-size", type=int, default=8, help="completions per forward pass")
    common(c, projection=False)
    c.set_defaults(func=cmd_coverage)
    args = p.parse_args(argv)
    if getattr(args, "dim", 1) < 1 or getattr(args, "max_components", 1) < 1 or getattr(args, "batch_size", 1) < 1:
        p.error("--dim, --max-components and --batch-size must be >= 1")
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    try:
        main()
    except (LatentError, mind.DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except OSError as e:  # a missing file or folder
        print(f"error: {e.filename or ''}: {e.strerror or e}", file=sys.stderr)
        sys.exit(2)
