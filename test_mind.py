"""Tests for mind.py: offline, on the CPU, with a tiny GPT-2 built in the test. Run: pytest -q"""
import gc, itertools, json, math, os, random, subprocess, sys, weakref
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import fast, infra, mind
from prompts import PERSPECTIVE_KEYS, answer_suffix, last_boxed

HERE = Path(__file__).resolve().parent
SAMPLE = HERE / "data" / "sample.jsonl"
K = len(PERSPECTIVE_KEYS)


def softmax(xs):
    m = max(xs)
    e = [math.exp(x - m) for x in xs]
    return [v / sum(e) for v in e]


def kl(p, q):
    return sum(a * math.log(a / b) for a, b in zip(p, q) if a > 0)


def jsd(p, q):
    m = [(a + b) / 2 for a, b in zip(p, q)]
    return 0.5 * kl(p, m) + 0.5 * kl(q, m)


# ---------------------------------------------------------------- Eq. 1
def test_metanet_loss_closed_form_and_direction():
    s, L = torch.tensor([[math.log(3.0), 0.0]]), torch.tensor([[0.0, 0.0]])
    p, q = [0.75, 0.25], [0.5, 0.5]  # pi(s) and pi(-L) by hand
    assert mind.metanet_loss(s, L, 1.0).item() == pytest.approx(kl(p, q), abs=1e-6)
    assert kl(p, q) != pytest.approx(kl(q, p), abs=1e-3)  # so the test tells KL(p||q) from KL(q||p)
    # temperature divides both sides
    s2, L2 = torch.tensor([[0.2, 0.5, 0.1]]), torch.tensor([[1.0, 2.0, 0.5]])
    want = kl(softmax([x / 0.5 for x in [0.2, 0.5, 0.1]]), softmax([-x / 0.5 for x in [1.0, 2.0, 0.5]]))
    assert mind.metanet_loss(s2, L2, 0.5).item() == pytest.approx(want, abs=1e-6)


def test_metanet_loss_zero_when_scores_match_losses_and_mean_over_batch():
    L = torch.rand(5, K) * 3
    assert mind.metanet_loss(0.7 - L, L, 1.0).item() == pytest.approx(0.0, abs=1e-6)  # s = c - L
    a, b = torch.rand(1, K), torch.rand(1, K)
    both = mind.metanet_loss(torch.cat([a, a]), torch.cat([b, torch.zeros(1, K)]), 1.0)
    assert both.item() == pytest.approx((mind.metanet_loss(a, b, 1.0) + mind.metanet_loss(a, torch.zeros(1, K), 1.0)).item() / 2, abs=1e-6)


def test_metanet_loss_treats_student_losses_as_constant():
    s, L = torch.rand(3, K, requires_grad=True), torch.rand(3, K, requires_grad=True)
    mind.metanet_loss(s, L, 1.0).backward()
    assert s.grad.abs().sum() > 0 and L.grad is None


# ---------------------------------------------------------------- I_dyn and alpha
def test_select_perspectives_threshold_edges():
    s = torch.tensor([[0.5, 0.45, 0.3, 0.44999]])
    mask, alpha = mind.select_perspectives(s, 0.9, 0.1)  # threshold exactly 0.45: >= keeps it
    assert mask.tolist() == [[True, True, False, False]]
    a = softmax([0.5 / 0.1, 0.45 / 0.1])
    assert alpha[0].tolist() == pytest.approx([a[0], a[1], 0.0, 0.0], abs=1e-6)
    mask, alpha = mind.select_perspectives(torch.tensor([[0.2, 0.9, 0.9, 0.1]]), 1.0, 1.0)  # beta = 1: the ties at the max
    assert mask.tolist() == [[False, True, True, False]] and alpha[0, 1].item() == pytest.approx(0.5)
    mask, alpha = mind.select_perspectives(torch.full((2, K), 0.3), 0.9, 0.1)  # all equal: all kept, uniform
    assert mask.all() and torch.allclose(alpha, torch.full((2, K), 1 / K))
    mask, alpha = mind.select_perspectives(torch.tensor([[0.9, 0.1]]), 0.5, 1.0)  # only the argmax
    assert mask.tolist() == [[True, False]] and alpha.tolist() == [[1.0, 0.0]]


def test_select_perspectives_gives_constants():
    s = torch.rand(2, K, requires_grad=True)
    _, alpha = mind.select_perspectives(s, 0.5, 0.1)
    assert not alpha.requires_grad


# ---------------------------------------------------------------- Eq. 2
def test_sft_loss_closed_form_and_ignores_unselected_slots():
    alpha = torch.tensor([[0.25, 0.75, 0.0], [1.0, 0.0, 0.0]])
    losses = torch.tensor([[2.0, 1.0, float("nan")], [0.5, float("inf"), 3.0]])
    want = ((0.25 * 2 + 0.75 * 1) + 0.5) / 2
    assert mind.sft_loss(alpha, losses).item() == pytest.approx(want)


# ---------------------------------------------------------------- Eq. 3
def brute_consistency(logp, alpha, mask):
    """Eq. 3 with plain Python loops, from probabilities."""
    B, Kk, A, V = logp.shape
    total = 0.0
    for b in range(B):
        toks = [a for a in range(A) if mask[b][a]]
        for i, j in itertools.combinations(range(Kk), 2):
            w = float(alpha[b, i] * alpha[b, j])
            if w == 0:
                continue
            d = [jsd(logp[b, i, a].exp().tolist(), logp[b, j, a].exp().tolist()) for a in toks]
            total += w * sum(d) / len(d)
    return total / B


def test_consistency_loss_matches_brute_force():
    torch.manual_seed(0)
    logp = F.log_softmax(torch.randn(3, 4, 3, 5) * 2, -1)
    alpha = torch.tensor([[0.5, 0.3, 0.2, 0.0], [1.0, 0.0, 0.0, 0.0], [0.1, 0.2, 0.3, 0.4]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 0], [1, 1, 1]])
    got = mind.consistency_loss(logp, alpha, mask).item()
    assert got == pytest.approx(brute_consistency(logp, alpha, mask.tolist()), abs=1e-6)


def test_consistency_loss_known_values():
    one_hot = torch.log(torch.tensor([[1.0, 0.0], [0.0, 1.0]]))  # disjoint supports: JSD = ln 2 (with -inf)
    lp = one_hot[None, :, None, :]                              # (B=1, K=2, A=1, V=2)
    alpha = torch.tensor([[0.5, 0.5]])
    assert mind.consistency_loss(lp, alpha).item() == pytest.approx(0.25 * math.log(2), abs=1e-6)
    same = F.log_softmax(torch.randn(2, 1, 3, 7), -1).expand(2, 3, 3, 7)
    assert mind.consistency_loss(same, torch.full((2, 3), 1 / 3)).item() == pytest.approx(0.0, abs=1e-7)


def test_consistency_loss_ignores_garbage_in_unselected_slots_and_masked_tokens():
    torch.manual_seed(1)
    logp = F.log_softmax(torch.randn(2, 3, 4, 6), -1)
    alpha = torch.tensor([[0.6, 0.4, 0.0], [0.5, 0.5, 0.0]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    ref = mind.consistency_loss(logp, alpha, mask)
    dirty = logp.clone()
    dirty[:, 2] = 1e4                       # an unselected path: finite garbage
    dirty[0, :, 3] = -1e30                  # a masked answer token
    dirty.requires_grad_(True)
    got = mind.consistency_loss(dirty, alpha, mask)
    assert got.item() == pytest.approx(ref.item(), abs=1e-6)
    got.backward()
    assert torch.isfinite(dirty.grad).all() and dirty.grad[:, 2].abs().sum() == 0


def test_consistency_loss_in_bf16_is_finite_and_close():
    logp = F.log_softmax(torch.randn(2, K, 3, 50) * 3, -1)
    alpha = torch.softmax(torch.randn(2, K), -1)
    lo = mind.consistency_loss(logp.bfloat16(), alpha)
    assert torch.isfinite(lo) and lo.item() >= 0
    assert lo.item() == pytest.approx(mind.consistency_loss(logp, alpha).item(), rel=0.05)


# ---------------------------------------------------------------- the student and its paths
@pytest.fixture(scope="module")
def tiny():
    rows = mind.load_data(SAMPLE)[:6]
    texts = [r["problem"] for r in rows] + [t for r in rows for t in r["rationales"].values()]
    model, tok, encoder = mind.build_tiny(texts, seed=0)
    cfg = mind.Config(student="tiny", lora_r=4, lora_alpha=8)
    peft_model = mind.add_lora(model, cfg, torch.device("cpu"))
    torch.manual_seed(0)
    for n, p in peft_model.named_parameters():  # give LoRA B a non-zero value so the adapter matters
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.02)
    paths, _ = mind.tokenize_paths(tok, rows, 1024)
    short, _ = mind.tokenize_paths(tok, rows, 240)  # for the tests that run whole steps many times
    body, head = peft_model.get_base_model().base_model, peft_model.get_base_model().get_output_embeddings()
    return {"rows": rows, "tok": tok, "model": peft_model, "paths": paths, "encoder": encoder, "cfg": cfg,
            "body": body, "head": head, "short": short}


def test_answer_tokens_identical_across_paths(tiny):
    tok = tiny["tok"]
    for row, paths in zip(tiny["rows"], tiny["paths"]):
        spans = {tuple(seq[start: start + A]) for seq, _, start, A in paths}
        assert len(spans) == 1, row["id"]
        span = spans.pop()
        assert tok.decode(list(span)) == answer_suffix(row["answer"])[1]
        for seq, first, start, A in paths:
            assert seq[-1] == tok.eos_token_id and start + A == len(seq) - 1
            prompt = tok.decode(seq[:first])
            assert row["problem"] in prompt and "Final answer" not in prompt  # labels start after the prompt


def test_long_rationales_are_cut_but_keep_the_answer(tiny):
    paths, n_cut = mind.tokenize_paths(tiny["tok"], tiny["rows"][:1], 120)
    assert n_cut > 0
    for seq, first, start, A in paths[0]:
        assert len(seq) <= 120
        assert tiny["tok"].decode(seq[start: start + A]) == answer_suffix(tiny["rows"][0]["answer"])[1]


@pytest.mark.parametrize("packed", [True, False])
def test_pass_losses_match_full_logits_one_path_at_a_time(tiny, packed):
    model, paths = tiny["model"], [p for pp in tiny["paths"][:2] for p in pp[:3]]
    width = max(p.answer_len for p in paths)
    loss, ans_lp = mind.run_pass(tiny["body"], tiny["head"], paths, torch.device("cpu"), width, packed, chunk=7)
    for n, (seq, first, start, A) in enumerate(paths):  # one path at a time, the plain way
        ids = torch.tensor([seq])
        logits = model(input_ids=ids).logits[0]                               # (T, V)
        want = F.cross_entropy(logits[first - 1: -1], ids[0, first:])         # logit t predicts token t+1
        assert loss[n].item() == pytest.approx(want.item(), abs=1e-5)
        want_lp = F.log_softmax(logits[start - 1: start - 1 + A], -1)
        assert torch.allclose(ans_lp[n, :A], want_lp, atol=1e-5)


def test_packed_paths_do_not_see_each_other(tiny):
    """A path's hidden states must not change when other paths share its pass (a leak would change them)."""
    body, paths = tiny["body"], [p for pp in tiny["paths"][:2] for p in pp[:4]]
    alone = torch.stack([mind.run_pass(body, tiny["head"], [p], torch.device("cpu"))[0][0] for p in paths])
    together = mind.run_pass(body, tiny["head"], paths, torch.device("cpu"))[0]
    assert torch.allclose(alone, together, atol=1e-5)
    shuffled = mind.run_pass(body, tiny["head"], paths[::-1], torch.device("cpu"))[0]
    assert torch.allclose(shuffled.flip(0), together, atol=1e-5)


@pytest.mark.parametrize("lengths,budget,packed,want", [
    ([5, 3, 4, 2], 7, True, [[0, 3], [2, 1]]),            # longest first, real tokens: 5+2, 4+3
    ([5, 3, 4, 2], 12, False, [[0, 2], [1, 3]]),          # padded: 2 x 5 = 10 <= 12, a third would be 15
    ([9, 3], 4, True, [[0], [1]]),                        # a path over the budget runs alone
    ([2, 2, 2], 100, True, [[0, 1, 2]]),
])
def test_plan_passes(lengths, budget, packed, want):
    assert fast.plan_passes(lengths, budget, packed) == want


def test_a_student_that_cannot_pack_trains_in_padded_passes(tiny, monkeypatch, capsys):
    rows = tiny["rows"][:2]
    model, _, _ = mind.build_tiny([r["problem"] for r in rows] + [t for r in rows for t in r["rationales"].values()], 0)
    monkeypatch.setattr(type(model), "_can_set_attn_implementation", classmethod(lambda cls: False))
    cfg = mind.Config(student="tiny", max_len=16)
    peft_model = mind.add_lora(model, cfg, torch.device("cpu"))
    assert cfg.packing is False and "padded passes instead" in capsys.readouterr().out
    assert peft_model.config._attn_implementation != fast.PACKED
    h_x, h_r, metanet = step_inputs(5, B=1)
    body, head = peft_model.get_base_model().base_model, peft_model.get_base_model().get_output_embeddings()
    l_meta, info = mind.micro_step(cfg, tiny["short"][:1], h_x, h_r, metanet, body, head, False, torch.device("cpu"))
    assert math.isfinite(info["student"].item()) and any(p.grad is not None for p in peft_model.parameters())


def step_grads(tiny, problems, cfg, h_x, h_r, metanet):
    """(L_meta, info, LoRA gradients) of one micro_step from zero gradients."""
    tiny["model"].zero_grad(set_to_none=True)
    l_meta, info = mind.micro_step(cfg, problems, h_x, h_r, metanet, tiny["body"], tiny["head"], False, torch.device("cpu"))
    grads = {n: p.grad.clone() for n, p in tiny["model"].named_parameters() if p.grad is not None}
    tiny["model"].zero_grad(set_to_none=True)
    return l_meta, info, grads


def step_inputs(seed=0, B=3, d=8):
    torch.manual_seed(seed)
    return torch.randn(B, d), torch.randn(B, K, d), mind.MetaNet(d, 16, 2)


def assert_same_step(a, b, tol=1e-5):
    (m1, i1, g1), (m2, i2, g2) = a, b
    assert m1.item() == pytest.approx(m2.item(), abs=tol)
    for key in ("sft", "cons", "student"):
        assert i1[key].item() == pytest.approx(i2[key].item(), abs=tol), key
    assert torch.allclose(i1["l_real"], i2["l_real"], atol=tol)
    assert g1.keys() == g2.keys() and len(g1) > 0
    for n in g1:
        assert torch.allclose(g1[n], g2[n], atol=tol, rtol=1e-4), n


@pytest.mark.parametrize("beta", [0.0, 0.5])
def test_step_does_not_depend_on_the_pass_budget_or_packing(tiny, beta):
    h_x, h_r, metanet = step_inputs()
    problems = tiny["short"][:3]
    base = dict(student="tiny", beta=beta, tau_student=1.0, max_len=16)
    one_pass = step_grads(tiny, problems, mind.Config(**base, max_tokens_per_pass=10**6), h_x, h_r, metanet)
    assert 0 < one_pass[2]["base_model.model.transformer.h.0.attn.c_attn.lora_A.default.weight"].abs().sum()
    cases = ((16, True), (700, True), (10**6, False), (900, False), (-1, True), (-1, False))  # -1: plain
    for budget, packing in cases:
        cfg = mind.Config(**base, max_tokens_per_pass=budget, packing=packing)
        assert_same_step(step_grads(tiny, problems, cfg, h_x, h_r, metanet), one_pass)


def test_passes_give_the_gradient_of_the_plain_step(tiny):
    """micro_step's bounded passes against the plain step: every selected path through the
    full model with gradients, Eq. 2 + lambda * Eq. 3 from the pure functions, one backward."""
    h_x, h_r, metanet = step_inputs(1)
    problems, model = tiny["short"][:3], tiny["model"]
    cfg = mind.Config(student="tiny", beta=0.5, tau_student=0.5, lambda_=3.0, max_len=16, max_tokens_per_pass=16)
    l_meta, info, got = step_grads(tiny, problems, cfg, h_x, h_r, metanet)
    alpha, B, A = info["alpha"], len(problems), max(p[0][3] for p in problems)
    assert int(info["selected"].sum()) > B  # some problem has two selected paths, so L_cons has a gradient
    losses, answer_lp = torch.zeros(B, K), [[torch.zeros(A, len(tiny["tok"]))] * K for _ in range(B)]
    losses = [[torch.zeros(())] * K for _ in range(B)]
    for b, k in info["selected"].nonzero().tolist():
        seq, first, start, n_ans = problems[b][k]
        ids = torch.tensor([seq])
        logits = model(input_ids=ids).logits[0]
        losses[b][k] = F.cross_entropy(logits[first - 1: -1], ids[0, first:])
        answer_lp[b][k] = F.pad(F.log_softmax(logits[start - 1: start - 1 + n_ans], -1), (0, 0, 0, A - n_ans))
    answer_mask = torch.arange(A)[None] < torch.tensor([p[0][3] for p in problems])[:, None]
    eq4 = mind.sft_loss(alpha, torch.stack([torch.stack(r) for r in losses])) + cfg.lambda_ * mind.consistency_loss(
        torch.stack([torch.stack(r) for r in answer_lp]), alpha, answer_mask)
    assert eq4.item() == pytest.approx(info["student"].item(), abs=1e-5)
    model.zero_grad(set_to_none=True)
    eq4.backward()
    want = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    assert want.keys() == got.keys()
    for n in want:
        assert torch.allclose(got[n], want[n], atol=1e-6, rtol=1e-4), n


def test_the_student_trains_through_the_equation_functions(tiny, monkeypatch):
    """Pass 2 backpropagates sft_loss and consistency_loss themselves: scaling what one of them
    returns scales its share of the gradient, and nothing else changes."""
    h_x, h_r, metanet = step_inputs(1)
    problems = tiny["short"][:3]
    base = dict(student="tiny", beta=0.5, tau_student=0.5, max_len=16, max_tokens_per_pass=40)
    only_sft = step_grads(tiny, problems, mind.Config(**base, lambda_=0.0), h_x, h_r, metanet)[2]
    both = step_grads(tiny, problems, mind.Config(**base, lambda_=1.0), h_x, h_r, metanet)[2]
    sft, cons = mind.sft_loss, mind.consistency_loss
    monkeypatch.setattr(mind, "sft_loss", lambda *a: 3 * sft(*a))
    tripled = step_grads(tiny, problems, mind.Config(**base, lambda_=0.0), h_x, h_r, metanet)[2]
    monkeypatch.setattr(mind, "sft_loss", sft)
    monkeypatch.setattr(mind, "consistency_loss", lambda *a: 2 * cons(*a))
    cons_doubled = step_grads(tiny, problems, mind.Config(**base, lambda_=1.0), h_x, h_r, metanet)[2]
    for n in only_sft:
        assert torch.allclose(tripled[n], 3 * only_sft[n], atol=1e-7, rtol=1e-4), n
        eq3_share = both[n] - only_sft[n]
        assert torch.allclose(cons_doubled[n], only_sft[n] + 2 * eq3_share, atol=1e-7, rtol=1e-4), n
    assert any(not torch.allclose(both[n], only_sft[n]) for n in only_sft)  # Eq. 3 has a share


def test_add_lora_puts_a_loaded_student_in_training_mode(tiny, tmp_path):
    """from_pretrained returns a model in eval mode, where transformers skips gradient
    checkpointing: add_lora must leave every module training, or a 7B student silently trains
    without the checkpointing its memory needs."""
    from transformers import AutoModelForCausalLM
    tiny["model"].get_base_model().save_pretrained(tmp_path / "m")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "m")
    assert not model.training
    peft_model = mind.add_lora(model, mind.Config(student="x", grad_checkpointing=True), torch.device("cpu"))
    assert all(m.training for m in peft_model.modules())


def test_lora_dropout_is_refused_in_one_line():
    with pytest.raises(ValueError, match="--lora-dropout 0.1"):
        mind.Config(lora_dropout=0.1)
    r = subprocess.run([sys.executable, str(HERE / "mind.py"), "--lora-dropout", "0.05"],
                       capture_output=True, text=True, timeout=300)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and lines == ["error: out of range: --lora-dropout 0.05 (see --help)"]


class SavedBytes:
    """Bytes that autograd holds for backward, live and at their peak, weights excluded. Each saved tensor
    is wrapped in a box; when autograd frees the graph, the box goes and its storage is released. A
    storage saved several times (one input of several matmuls, views) counts once."""
    def __init__(self, model):
        self.weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
        self.held, self.live, self.peak = {}, 0, 0  # storage -> [saved references, bytes]

    def pack(self, t):
        box, key = type("Box", (), {})(), t.untyped_storage().data_ptr()
        box.t = t
        if key not in self.weights:
            if key not in self.held:
                self.held[key] = [0, t.untyped_storage().nbytes()]
                self.live += self.held[key][1]
                self.peak = max(self.peak, self.live)
            self.held[key][0] += 1
            weakref.finalize(box, self.release, key)
        return box

    def release(self, key):
        self.held[key][0] -= 1
        if self.held[key][0] == 0:
            self.live -= self.held.pop(key)[1]

    def unpack(self, box):
        return box.t


def test_memory_is_bounded_by_the_pass_budget_not_by_the_selection(tiny):
    h_x, h_r, metanet = step_inputs(2)
    problems = tiny["short"][:3]
    lengths = [len(p[0]) for pp in problems for p in pp]

    def peak(beta, budget):
        cfg = mind.Config(student="tiny", beta=beta, max_len=16, max_tokens_per_pass=budget)
        saved = SavedBytes(tiny["model"])
        with torch.autograd.graph.saved_tensors_hooks(saved.pack, saved.unpack):
            l_meta, info, _ = step_grads(tiny, problems, cfg, h_x, h_r, metanet)
        gc.collect()
        assert saved.live == 0  # every pass's graph was freed
        return saved.peak, info["selected"]

    budget = max(lengths)
    one, mask1 = peak(1.0, budget)       # the best path of each problem only
    eight, mask8 = peak(0.0, budget)     # all 8 paths of each problem
    assert mask1.sum() == len(problems) and mask8.sum() == K * len(problems)
    per_token = one / max(l for l, m in zip(lengths, mask1.flatten()) if m)  # measured on a one-path pass
    assert eight <= 1.25 * per_token * budget
    everything, _ = peak(0.0, 10**6)     # no budget: one pass holds every selected path at once
    assert everything >= 0.8 * per_token * sum(lengths) and sum(lengths) > 3 * budget


def test_gradient_isolation(tiny):
    model = tiny["model"]
    h_x, h_r, metanet = step_inputs(3)
    cfg = mind.Config(student="tiny", beta=0.0)  # every path selected, so both losses are non-trivial

    def grads():
        lora = [p.grad for n, p in model.named_parameters() if "lora_" in n]
        base = [p.grad for n, p in model.named_parameters() if "lora_" not in n]
        meta = [p.grad for p in metanet.parameters()]
        has = lambda gs: any(g is not None and g.abs().sum() > 0 for g in gs)
        return has(lora), has(base), has(meta)

    def step(scale, meta_scale):  # the two backward calls of micro_step, one of them scaled to 0
        model.zero_grad(set_to_none=True)
        metanet.zero_grad(set_to_none=True)
        mind.micro_step(cfg, tiny["paths"][:2], h_x[:2], h_r[:2], metanet, tiny["body"], tiny["head"], False,
                        torch.device("cpu"), scale, meta_scale)
        return grads()
    assert step(1.0, 0.0) == (True, False, False)  # Eq. 4 moves the LoRA weights only
    assert step(0.0, 1.0) == (False, False, True)  # Eq. 1 moves MetaNet only


# ---------------------------------------------------------------- data
def test_shipped_sample_is_valid_and_correct():
    rows = mind.load_data(SAMPLE)
    assert len(rows) >= 32
    assert {r["subject"] for r in rows} == {"algebra", "counting_and_probability", "geometry", "intermediate_algebra",
                                            "number_theory", "prealgebra", "precalculus"}
    assert {r["level"] for r in rows} == {1, 2, 3, 4, 5}
    for r in rows:
        for k in PERSPECTIVE_KEYS:
            assert last_boxed(r["rationales"][k]) == r["answer"], (r["id"], k)
    assert len({r["problem"] for r in rows}) == len(rows)


def good_row(i=0):
    return {"id": f"p{i}", "problem": "1+1?", "answer": "2",
            "rationales": {k: f"{k}: so \\boxed{{2}}" for k in PERSPECTIVE_KEYS}}


BAD = {
    "bad JSON": ('{"id": "p1", "problem": ', "not valid JSON"),
    "missing field": (lambda r: r.pop("answer"), "missing field 'answer'"),
    "missing perspective": (lambda r: r["rationales"].pop("analogy"), "missing the 'analogy' rationale"),
    "empty rationale": (lambda r: r["rationales"].update(socratic="  "), "the 'socratic' rationale is empty"),
    "unknown perspective": (lambda r: r["rationales"].update(poetic="x"), "unknown perspective 'poetic'"),
    "empty problem": (lambda r: r.update(problem=""), "field 'problem' must be a non-empty str"),
    "duplicate id": (lambda r: r.update(id="p0"), "(problem 'p0'): id already used on line 1"),
    "not an object": ("[1, 2]", "expected a JSON object"),
    "not UTF-8": (b'{"id": "p1", "problem": "caf\xe9"}', "not UTF-8 (byte 0xe9 at column 29)"),
    "answer not a string": (lambda r: r.update(answer=2), "field 'answer' must be a non-empty str"),
    "rationales not an object": (lambda r: r.update(rationales=["x"] * K), "field 'rationales' must be a non-empty dict"),
    "subject not a string": (lambda r: r.update(subject=3), "field 'subject' must be a non-empty str, got 3"),
    "level not an int": (lambda r: r.update(level="3"), "field 'level' must be an int, got '3'"),
    "level a bool": (lambda r: r.update(level=True), "field 'level' must be an int, got True"),
}


def write_bad(tmp_path, kind):
    spoil, _ = BAD[kind]
    r = good_row(1)
    line = spoil if isinstance(spoil, (str, bytes)) else (spoil(r), json.dumps(r))[1]
    line = line if isinstance(line, bytes) else line.encode()
    path = tmp_path / "bad.jsonl"
    path.write_bytes(json.dumps(good_row(0)).encode() + b"\n" + line + b"\n")
    return path


@pytest.mark.parametrize("kind", BAD)
def test_bad_input_is_one_clear_error(tmp_path, kind):
    path = write_bad(tmp_path, kind)
    with pytest.raises(mind.DataError) as e:
        mind.load_data(path)
    msg = str(e.value)
    assert msg.startswith(f"{path}:2") and BAD[kind][1] in msg
    if kind not in ("bad JSON", "not an object", "not UTF-8"):
        assert "problem 'p" in msg
    assert "\n" not in msg


def test_cli_reports_bad_input_without_traceback(tmp_path):
    path = write_bad(tmp_path, "missing perspective")
    r = subprocess.run([sys.executable, str(HERE / "mind.py"), "--student", "tiny", "--data", str(path),
                        "--out", str(tmp_path / "o")], capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert f"error: {path}:2 (problem 'p1'): missing the 'analogy' rationale" in r.stderr
    r = subprocess.run([sys.executable, str(HERE / "mind.py"), "--beta", "1.5"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and "--beta 1.5" in r.stderr and "Traceback" not in r.stderr


def test_help_lists_every_flag_with_its_source():
    r = subprocess.run([sys.executable, str(HERE / "mind.py"), "--help"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0
    for f in ("--student", "--data", "--encoder", "--out", "--epochs", "--max-steps", "--resume", "--seed",
              "--tau", "--tau-student", "--beta", "--lambda", "--lora-r", "--lora-alpha", "--lora-dropout"):
        assert f in r.stdout, f
    assert r.stdout.count("[Table 8") >= 6 and r.stdout.count("ours") >= 10
    groups = [r.stdout.index(title + ":") for title in mind.GROUPS.values()]  # Config's groups, in order
    assert groups == sorted(groups)
    table8 = r.stdout[groups[1]: groups[2]]
    assert all(f in table8 for f in ("--lr", "--epochs", "--batch-size", "--grad-accum", "--meta-lr"))
    assert "--beta" in r.stdout[groups[2]: groups[3]] and "--packing" in r.stdout[groups[3]:]


# ---------------------------------------------------------------- end to end
def tiny_cfg(tmp_path, data, **kw):
    base = dict(student="tiny", data=str(data), out=str(tmp_path), batch_size=2, grad_accum=2, meta_grad_accum=3,
                epochs=1, max_len=400, seed=0, device="cpu")
    return mind.Config(**(base | kw))


@pytest.fixture(scope="module")
def small_data(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "small.jsonl"
    path.write_text("".join(SAMPLE.read_text().splitlines(keepends=True)[:8]))
    return path


def final_state(out):
    from safetensors.torch import load_file
    return load_file(Path(out) / "adapter" / "adapter_model.safetensors"), torch.load(Path(out) / "metanet.pt", weights_only=True)


def test_end_to_end_and_reload(tmp_path, small_data):
    res = mind.main(tiny_cfg(tmp_path, small_data, epochs=2))
    recs = [json.loads(l) for l in open(tmp_path / "metrics.jsonl")]
    assert [r["kind"] for r in recs] == ["step"] * 4 + ["subjects"] + ["step"] * 2 + ["subjects"]  # after each joint epoch
    recs = [r for r in recs if r["kind"] == "step"]
    assert [r["stage"] for r in recs] == ["warmup"] * 2 + ["joint"] * 4 and res["step"] == 6
    assert all(r["peak_mem_gib"] is None for r in recs)  # on the CPU; the GPU's peak per interval otherwise
    assert "| 12.3 GiB" in infra.format_record({**recs[-1], "peak_mem_gib": 12.34}, 6)
    joint = [r for r in recs if r["stage"] == "joint"]
    for r in joint:
        assert all(math.isfinite(r[k]) for k in ("loss_sft", "loss_cons", "loss_meta"))
        assert 1 <= r["n_selected"] <= K and sum(r[f"alpha/{k}"] for k in PERSPECTIVE_KEYS) == pytest.approx(1.0, abs=1e-4)
    assert joint[-1]["loss_sft"] < joint[0]["loss_sft"]  # the student learns
    from peft import PeftModel
    from transformers import AutoModelForCausalLM
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tmp_path / "tiny-student"), tmp_path / "adapter")
    adapter, meta = final_state(tmp_path)
    loaded = {n: p for n, p in model.named_parameters() if "lora_" in n}
    assert len(loaded) == len(adapter) > 0
    assert any(p.abs().sum() > 0 for n, p in loaded.items() if "lora_B" in n)  # trained, not the zero init
    metanet = mind.MetaNet(32)
    metanet.load_state_dict(meta)
    assert len(list(Path(tmp_path).glob("checkpoint-*"))) == 3  # one per epoch (warmup + 2)


def test_resume_matches_uninterrupted_run(tmp_path, small_data):
    """On the GPU when there is one (device auto): --deterministic makes two runs repeat exactly there too."""
    run = dict(epochs=2, device="auto", deterministic=True)
    mind.main(tiny_cfg(tmp_path / "full", small_data, **run))
    # stop after step 3: mid-epoch, with MetaNet gradients half accumulated (meta_grad_accum 3)
    first = mind.main(tiny_cfg(tmp_path / "cut", small_data, max_steps=3, **run))
    assert first["step"] == 3 and Path(first["checkpoint"]).name == "checkpoint-000003"
    with pytest.raises(mind.DataError):  # a second run without --resume would overwrite: refused
        mind.main(tiny_cfg(tmp_path / "cut", small_data, **run))
    mind.main(tiny_cfg(tmp_path / "cut", small_data, resume=True, **run))
    assert not torch.are_deterministic_algorithms_enabled()  # global state restored after the run
    (a_full, m_full), (a_cut, m_cut) = final_state(tmp_path / "full"), final_state(tmp_path / "cut")
    for name in a_full:
        assert torch.allclose(a_full[name], a_cut[name], atol=1e-6), name
    for name in m_full:
        assert torch.allclose(m_full[name], m_cut[name], atol=1e-6), name
    steps = [r["step"] for r in map(json.loads, open(tmp_path / "cut" / "metrics.jsonl")) if r["kind"] == "step"]
    assert steps == list(range(1, 7))


def test_torchrun_two_processes_match_one(tmp_path, small_data):
    """Two gloo processes with batch 2 see the same problems per step as one process with batch 4
    (rank r takes every other problem), so DDP must give the same weights."""
    args = ["--student", "tiny", "--data", str(small_data), "--epochs", "1", "--max-len", "400", "--grad-accum", "1",
            "--meta-grad-accum", "2", "--device", "cpu"]  # gloo on the CPU, whatever GPUs exist
    env = os.environ | {"OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", str(HERE / "mind.py"),
                        *args, "--batch-size", "2", "--out", str(tmp_path / "two")], capture_output=True, text=True,
                       timeout=600, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    r = subprocess.run([sys.executable, str(HERE / "mind.py"), *args, "--batch-size", "4", "--out", str(tmp_path / "one")],
                       capture_output=True, text=True, timeout=600, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    (a2, m2), (a1, m1) = final_state(tmp_path / "two"), final_state(tmp_path / "one")
    # 1e-4: the passes group paths differently (16 vs 32 per micro-step), float sums differ in the last
    # bits, and Adam magnifies that where a gradient is near zero; a missing all-reduce moves weights ~1e-3
    for name in a1:
        assert torch.allclose(a1[name], a2[name], atol=1e-4), name
    for name in m1:
        assert torch.allclose(m1[name], m2[name], atol=1e-4), name
    recs = [r for r in map(json.loads, open(tmp_path / "two" / "metrics.jsonl")) if r["kind"] == "step"]
    assert len(recs) == 4 and all(math.isfinite(r["loss_meta"]) for r in recs)


def test_more_processes_than_gpus_is_one_clear_error(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    for k, v in {"RANK": "1", "LOCAL_RANK": "1", "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2"}.items():
        monkeypatch.setenv(k, v)
    with pytest.raises(mind.DataError, match="torchrun started 2 processes here but 1 GPU"):
        mind.setup_distributed(mind.Config(device="auto"))


# ---------------------------------------------------------------- behaviour
def test_metanet_learns_to_rank_learnable_paths_higher(tmp_path):
    """Four perspectives carry a fixed, learnable sentence; the other four random letters. The
    student learns the first kind, its losses there fall, and Eq. 1 must carry that into the scores."""
    rng = random.Random(0)
    learnable = set(PERSPECTIVE_KEYS[::2])
    rows = []
    for i in range(16):
        ans = str(i)
        rats = {k: ("We count the things and the count gives the answer. " * 2 if k in learnable else
                    " ".join("".join(rng.choice("qzxjkvwy") for _ in range(5)) for _ in range(12))) + f" \\boxed{{{ans}}}"
                for k in PERSPECTIVE_KEYS}
        rows.append({"id": f"q{i}", "problem": f"How many things are there in box {i}?", "answer": ans, "rationales": rats})
    data = tmp_path / "synthetic.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    res = mind.main(mind.Config(student="tiny", data=str(data), out=str(tmp_path / "run"), batch_size=4, grad_accum=1,
                                meta_grad_accum=1, epochs=6, lr=1e-2, meta_lr_warmup=3e-3, meta_lr=3e-3, max_len=256,
                                device="cpu"))
    last = res["metrics"]
    good = [last[f"score/{k}"] for k in PERSPECTIVE_KEYS if k in learnable]
    noise = [last[f"score/{k}"] for k in PERSPECTIVE_KEYS if k not in learnable]
    assert min(good) > max(noise), last
    assert sum(last[f"alpha/{k}"] for k in learnable) > 0.9  # the student now learns mostly from them


def planted(path, junk, n=16, seed=0):
    """The sample's first n problems with the perspectives `junk` made unlearnable: each of their
    rationales is its own words in a seeded random order, the boxed answer kept. A student cannot
    predict such text better than its word frequencies, whatever it learns; per token it stays
    hard (random letters would not: under a BPE tokenizer trained on them they are easy, token by
    token)."""
    rng, rows = random.Random(seed), []
    for line in SAMPLE.read_text().splitlines()[:n]:
        r = json.loads(line)
        for k in junk:
            words = r["rationales"][k][: r["rationales"][k].rfind("\\boxed{")].split()
            rng.shuffle(words)
            r["rationales"][k] = " ".join(words) + "\n\\boxed{" + r["answer"] + "}"
        rows.append(r)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_metanet_takes_the_weight_off_three_unlearnable_perspectives(tmp_path):
    """Section 3.3: MetaNet learns (Eq. 1) which paths the student can learn and I_dyn drops the
    others. Three perspectives made unlearnable end with under 5% of alpha in all and outside I_dyn
    for at least 90% of the problems; --variant uniform gives them their 3/8 regardless."""
    junk = ("analogy", "socratic", "counterfactual")
    data = planted(tmp_path / "planted.jsonl", junk)
    cfg = mind.Config(student="tiny", data=str(data), out=str(tmp_path / "mind"), epochs=4,
                      device="cpu")
    last = mind.main(cfg)["metrics"]
    assert sum(last[f"alpha/{k}"] for k in junk) < 0.05, last
    # I_dyn of every problem under the final MetaNet, on the run's own cached embeddings
    emb = torch.load(tmp_path / "mind" / "embeddings.pt", weights_only=True)
    metanet = mind.MetaNet(emb["h_x"].shape[-1], cfg.meta_dim, cfg.meta_heads)
    metanet.load_state_dict(torch.load(tmp_path / "mind" / "metanet.pt", weights_only=True))
    with torch.no_grad():
        scores = metanet(emb["h_x"], emb["h_r"])
        selected, _ = mind.select_perspectives(scores, cfg.beta, cfg.tau_student)
    none_selected = ~selected[:, [PERSPECTIVE_KEYS.index(k) for k in junk]].any(1)
    assert none_selected.float().mean() >= 0.9
    uniform = mind.main(mind.Config(student="tiny", data=str(data), out=str(tmp_path / "uniform"),
                                    epochs=1, variant="uniform", device="cpu"))["metrics"]
    assert sum(uniform[f"alpha/{k}"] for k in junk) == pytest.approx(3 / 8)


# ---------------------------------------------------------------- the paper's variants (--variant)
VARIANTS = ["single:analogy", "uniform", "topk:2", "no-synergy", "no-inertia"]


@pytest.fixture(scope="module")
def variant_runs(tmp_path_factory, small_data):
    """One tiny run per variant: 1 warmup epoch where MetaNet is used, then 1 joint epoch of 2 steps."""
    out = {}
    for v in VARIANTS:
        path = tmp_path_factory.mktemp(v.replace(":", "-"))
        mind.main(tiny_cfg(path, small_data, variant=v, beta=0.5))
        out[v] = (path, [json.loads(line) for line in open(path / "metrics.jsonl")])
    return out


def joint_steps(records):
    return [r for r in records if r.get("kind") == "step" and r["stage"] == "joint"]


def test_single_perspective_variant_learns_from_that_path_alone(variant_runs):
    _, recs = variant_runs["single:analogy"]
    assert [r["stage"] for r in recs if r["kind"] == "step"] == ["joint"] * 2  # no MetaNet, so no warmup
    for r in joint_steps(recs):
        assert r["variant"] == "single:analogy" and r["n_selected"] == 1 and r["alpha/analogy"] == 1.0
        assert r["loss_cons"] == 0 and r["loss_meta"] is None and r["score/analogy"] is None
        assert r["loss_sft"] == pytest.approx(r["loss_real/analogy"], abs=1e-5)  # Eq. 2 is that path's CE


def test_uniform_variant_weighs_all_paths_equally(variant_runs):
    for r in joint_steps(variant_runs["uniform"][1]):
        assert r["n_selected"] == K and all(r[f"alpha/{k}"] == pytest.approx(1 / K) for k in PERSPECTIVE_KEYS)
        assert r["loss_sft"] == pytest.approx(sum(r[f"loss_real/{k}"] for k in PERSPECTIVE_KEYS) / K, abs=1e-5)


def test_topk_variant_keeps_k_paths_at_every_step(variant_runs):
    recs = variant_runs["topk:2"][1]
    assert [r["stage"] for r in recs if r["kind"] == "step"] == ["warmup"] * 2 + ["joint"] * 2
    assert all(r["n_selected"] == 2 for r in joint_steps(recs))


def test_no_synergy_metanet_has_no_attention(variant_runs):
    meta = torch.load(variant_runs["no-synergy"][0] / "metanet.pt", weights_only=True)
    assert meta and not any("attn" in name or "norm" in name for name in meta)
    full = mind.MetaNet(32).state_dict()
    assert any("attn" in name for name in full) and set(meta) < set(full)


def test_no_inertia_alpha_is_a_softmax_of_the_current_losses(tiny):
    h_x, h_r, metanet = step_inputs(4)
    cfg = mind.Config(student="tiny", variant="no-inertia", beta=0.995, tau=0.5, max_len=16)
    l_meta, info, _ = step_grads(tiny, tiny["short"][:3], cfg, h_x, h_r, metanet)
    assert l_meta is None and info["scores"] is None
    L = info["l_real"].tolist()
    for b, row in enumerate(L):
        s = [math.exp(-x) for x in row]
        sel = [k for k in range(K) if s[k] >= 0.995 * max(s)]  # I_dyn by the beta rule on exp(-L_real)
        assert info["selected"][b].nonzero().flatten().tolist() == sel and 1 <= len(sel) < K
        want = softmax([-row[k] / 0.5 for k in sel])
        assert info["alpha"][b, sel].tolist() == pytest.approx(want, abs=1e-6)
        assert info["alpha"][b].sum().item() == pytest.approx(1.0)
    assert info["selected"].sum() > len(L)  # some problem keeps two or more paths: the softmax is tested


def test_variant_mind_is_the_default_run(tmp_path, small_data):
    assert mind.parse_args([]) == mind.parse_args(["--variant", "mind"])
    a = mind.main(tiny_cfg(tmp_path / "a", small_data, max_steps=3))
    b = mind.main(tiny_cfg(tmp_path / "b", small_data, max_steps=3, variant="mind"))
    assert a["metrics"] == {**b["metrics"], "tokens_per_s": a["metrics"]["tokens_per_s"]} and a["metrics"]["variant"] == "mind"
    (a1, m1), (a2, m2) = final_state(tmp_path / "a"), final_state(tmp_path / "b")
    assert all(torch.equal(a1[n], a2[n]) for n in a1) and all(torch.equal(m1[n], m2[n]) for n in m1)
    with pytest.raises(mind.DataError, match="from another run: --variant saved mind, now uniform"):
        mind.main(tiny_cfg(tmp_path / "a", small_data, resume=True, variant="uniform"))


@pytest.mark.parametrize("bad,says", [("single:poetic", "single:<perspective> takes one of symbolic"),
                                      ("topk:9", "topk:<K> takes K = 1 to 8"), ("topk:0", "K = 1 to 8"),
                                      ("fancy", "expected mind, single:<perspective>"), ("uniform:3", "expected mind")])
def test_bad_variant_is_one_line(bad, says):
    r = subprocess.run([sys.executable, str(HERE / "mind.py"), "--variant", bad], capture_output=True, text=True, timeout=300)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1 and lines[0].startswith(f"error: --variant {bad}: ") and says in lines[0]


def test_subject_records_hold_the_epoch_mean_alpha(variant_runs, small_data):
    path, recs = variant_runs["no-inertia"]
    subj = [r for r in recs if r["kind"] == "subjects"]
    rows = mind.load_data(small_data)
    assert len(subj) == 1 and subj[0]["epoch"] == 1 and subj[0]["variant"] == "no-inertia"
    assert subj[0]["count"] == {s: sum(r["subject"] == s for r in rows) for s in {r["subject"] for r in rows}}
    for s, alpha in subj[0]["alpha"].items():
        assert sum(alpha.values()) == pytest.approx(1.0, abs=1e-5)  # a mean of distributions over perspectives
    joint = joint_steps(recs)  # the same alphas, averaged by step records: both weigh every problem once
    for k in PERSPECTIVE_KEYS:
        by_subject = sum(subj[0]["alpha"][s][k] * n for s, n in subj[0]["count"].items()) / len(rows)
        assert by_subject == pytest.approx(sum(r[f"alpha/{k}"] for r in joint) / len(joint), abs=1e-5)


def test_plot_draws_every_figure_from_two_variants(variant_runs, tmp_path):
    import plot
    written = plot.main([str(variant_runs["topk:2"][0]), str(variant_runs["no-inertia"][0]), "--out", str(tmp_path)])
    names = {Path(p).name for p in written}
    assert {"loss.png", "n_selected.png", "meta_loss-topk_2.png", "alpha-topk_2.png", "alpha-no-inertia.png",
            "subjects-topk_2.png", "subjects-no-inertia.png", "loss_real-no-inertia.png"} <= names
    for p in written:
        assert Path(p).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and Path(p).stat().st_size > 5000


# ---------------------------------------------------------------- docs stay true
def test_readme_hyperparameters_match_config_and_ci_runs_readme_command():
    import dataclasses, re
    readme = (HERE / "README.md").read_text()
    defaults = {"--" + f.name.rstrip("_").replace("_", "-"): f.default for f in dataclasses.fields(mind.Config)}
    checked = 0
    for flags, values in re.findall(r"^\| ((?:`--[a-z-]+`(?:, )?)+) \| ([^|]+) \|", readme, re.M):
        names, vals = re.findall(r"`(--[a-z-]+)`", flags), [v.strip() for v in values.split(",")]
        if len(names) == len(vals) and all(re.fullmatch(r"[0-9.e-]+", v) for v in vals):
            for name, v in zip(names, vals):
                assert defaults[name] == pytest.approx(float(v)), name
                checked += 1
    assert checked >= 12
    test_cmd = re.search(r"^(python -m pytest[^\n#]*?)\s*$", readme, re.M).group(1)
    assert test_cmd in (HERE / ".ci" / "run").read_text()


# ---------------------------------------------------------------- bench.py stays alive
def test_bench_tiny_runs_and_both_steps_compute_the_same_losses(tmp_path):
    import bench
    assert bench.same_losses("tiny", torch.device("cpu")) < 1e-5  # mind's forward strategy changes no number
    rows = bench.main(["--tiny", "--out", str(tmp_path / "bench.json")])
    assert [r["method"] for r in rows] == ["mind", "mind-all8", "naive"]
    for r in rows:
        assert not r["oom"] and r["step_s"] > 0 and r["flops"] > 0 and r["mfu"] > r["useful_mfu"] > 0
    mind_row, all8, naive = rows
    assert all8["selected_per_problem"] == K and 1 <= mind_row["selected_per_problem"] <= K
    assert mind_row["padding"] == all8["padding"] == 0 < naive["padding"]  # packed passes: no padding at all
    useful = [r["useful_mfu"] * r["step_s"] for r in rows]  # the same work needed when the selection is the same
    assert mind_row["selected_per_problem"] == naive["selected_per_problem"] and useful[0] == pytest.approx(useful[2])
    assert useful[1] > useful[0]  # more selected paths, more backward work
    assert json.loads((tmp_path / "bench.json").read_text())["rows"] == json.loads(json.dumps(rows))
