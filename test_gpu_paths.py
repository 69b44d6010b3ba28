"""The GPU-only choices of fast.py, and the out-of-memory retry, checked on the CPU: capabilities
and torch versions are monkeypatched, out-of-memory errors injected. Run: pytest -q"""
import json, math

import pytest
import torch

import fast, mind
from test_mind import SAMPLE, SavedBytes, step_grads, step_inputs, tiny  # noqa: F401 (fixture)

K = mind.K


# ---------------------------------------------------------------- kernel and precision
def varlen_2_10(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, return_aux=None):
    """torch 2.10's varlen_attn signature: no scale, no window_size."""


def varlen_2_11(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, return_aux=None,
                scale=None, window_size=(-1, -1)):
    """torch 2.11's: scale and window_size, no enable_gqa."""


@pytest.mark.parametrize("fn,capability,dtype,ok", [
    (varlen_2_11, (9, 0), torch.bfloat16, True),     # H100/H200
    (varlen_2_11, (8, 0), torch.float16, True),      # A100 in fp16
    (varlen_2_10, (9, 0), torch.bfloat16, False),    # torch 2.10: would be a TypeError
    (varlen_2_11, (7, 5), torch.float16, False),     # T4: FlashAttention needs Ampere
    (varlen_2_11, (7, 0), torch.float16, False),     # V100
    (varlen_2_11, (9, 0), torch.float32, False),     # fp32 is not a flash dtype
    (None, (9, 0), torch.bfloat16, False),           # torch < 2.10: no varlen at all
])
def test_flash_varlen_only_where_torch_and_the_gpu_have_it(fn, capability, dtype, ok):
    assert fast.flash_varlen_ok(fn, capability, dtype) is ok
    assert fast.flash_varlen_ok(getattr(torch.nn.attention, "varlen", None) and fast.varlen_attn,
                                (9, 0), torch.bfloat16) is (fast.varlen_attn is not None)


@pytest.mark.parametrize("capability,want", [((9, 0), "bf16"), ((8, 6), "bf16"), ((8, 0), "bf16"),
                                             ((7, 5), "fp16"), ((7, 0), "fp16"), ((6, 1), "fp16")])
def test_precision_follows_native_bf16_not_is_bf16_supported(monkeypatch, capability, want):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)  # emulated: True
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: capability)
    cuda = torch.device("cuda")
    assert fast.precision(cuda) == want
    assert fast.student_dtype(cuda) == {"bf16": torch.bfloat16, "fp16": torch.float16}[want]
    assert fast.precision(torch.device("cpu")) == "fp32"


def test_fp16_autocast_with_loss_scaling_matches_the_fp32_step(tiny, monkeypatch):
    """The fp16 path of an older GPU, run on the CPU (CPU autocast has fp16): micro_step's
    gradients, unscaled, agree with the fp32 step within fp16's precision."""
    h_x, h_r, metanet = step_inputs(5)
    cfg = mind.Config(student="tiny", beta=0.5, tau_student=0.5, max_len=16, max_tokens_per_pass=64)
    problems = tiny["short"][:3]
    _, _, want = step_grads(tiny, problems, cfg, h_x, h_r, metanet)
    monkeypatch.setattr(fast, "precision", lambda device: "fp16")
    scaler = fast.grad_scaler(torch.device("cpu"))
    assert scaler.is_enabled() and scaler.get_scale() == 2.0 ** 16
    model = tiny["model"]
    model.zero_grad(set_to_none=True)
    mind.micro_step(cfg, problems, h_x, h_r, metanet, tiny["body"], tiny["head"], False,
                    torch.device("cpu"), scaler=scaler)
    got = {n: p.grad / scaler.get_scale() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    assert got.keys() == want.keys()
    scaled = sum(g.abs().sum() for g in got.values()) * scaler.get_scale()
    assert scaled > 1000 * sum(g.abs().sum() for g in got.values())  # the loss really was scaled
    for n in want:
        err = (got[n] - want[n]).norm() / want[n].norm().clamp(min=1e-12)
        assert err < 2e-2, (n, err.item())  # fp16 keeps ~3 significant digits


def test_fp16_optimizer_step_unscales_before_clipping_and_skips_inf(monkeypatch):
    w = torch.nn.Parameter(torch.ones(3))
    opt = torch.optim.SGD([w], lr=1.0)
    monkeypatch.setattr(fast, "precision", lambda device: "fp16")
    scaler = fast.grad_scaler(torch.device("cpu"))
    scaler.scale((w * torch.tensor([1.0, 2.0, 3.0])).sum()).backward()
    mind.optimizer_step(opt, [w], max_norm=100.0, scaler=scaler)
    assert torch.allclose(w.detach(), torch.tensor([0.0, -1.0, -2.0]))  # the unscaled gradient
    w.grad = torch.tensor([float("inf"), 0.0, 0.0])
    mind.optimizer_step(opt, [w], max_norm=100.0, scaler=scaler)
    assert torch.allclose(w.detach(), torch.tensor([0.0, -1.0, -2.0]))  # step skipped
    assert scaler.get_scale() < 2.0 ** 16                                 # and the scale lowered


# ---------------------------------------------------------------- packed passes
def test_a_packed_pass_without_sequence_boundaries_raises(tiny, monkeypatch):
    """A model that drops cu_seq_lens_q on the way to attention would let packed paths attend to
    each other; that must be an error, not a silent wrong result."""
    from transformers import AttentionInterface
    paths = [p for pp in tiny["paths"][:1] for p in pp[:3]]
    cpu = torch.device("cpu")
    good = mind.run_pass(tiny["body"], tiny["head"], paths, cpu)[0]

    def forgetful(module, q, k, v, mask, **kw):  # a model that does not pass the boundaries on
        kw = {n: x for n, x in kw.items() if not n.startswith(("cu_seq", "max_length"))}
        return fast.packed_attention(module, q, k, v, mask, **kw)
    AttentionInterface.register(fast.PACKED, forgetful)
    try:
        with pytest.raises(RuntimeError, match="did not pass the sequence boundaries"):
            mind.run_pass(tiny["body"], tiny["head"], paths, cpu)
        assert fast.PACKED_PASS is False  # reset after the error
        padded = mind.run_pass(tiny["body"], tiny["head"], paths, cpu, packed=False)[0]
    finally:
        AttentionInterface.register(fast.PACKED, fast.packed_attention)
    assert torch.allclose(padded, good, atol=1e-5)  # a padded batch still goes through


def test_training_passes_build_no_kv_cache(tiny, monkeypatch):
    seen = []
    forward = type(tiny["body"]).forward

    def spy(self, *a, **kw):
        out = forward(self, *a, **kw)
        seen.append((kw.get("use_cache"), out.past_key_values))
        return out
    monkeypatch.setattr(type(tiny["body"]), "forward", spy)
    paths = [p for pp in tiny["paths"][:1] for p in pp[:2]]
    for packed in (True, False):
        mind.run_pass(tiny["body"], tiny["head"], paths, torch.device("cpu"), 4, packed)
    assert seen == [(False, None), (False, None)]


class FlashLike(torch.autograd.Function):
    """A stand-in for varlen flash attention (CUDA only): per-path causal attention that, like the
    real kernel, saves its inputs and output for backward, and reads shared k/v heads itself."""
    @staticmethod
    def forward(ctx, q, k, v, cu, gqa):
        ctx.save_for_backward(q, k, v, cu)
        return FlashLike.attend(q, k, v, cu)

    @staticmethod
    def attend(q, k, v, cu):
        at = cu.tolist()
        return torch.cat([fast._causal_sdpa(q[s:e], k[s:e], v[s:e], None) for s, e in zip(at, at[1:])])

    @staticmethod
    def backward(ctx, grad):  # recomputes, as flash attention does, from what it saved
        q, k, v, cu = ctx.saved_tensors
        with torch.enable_grad():
            q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
            return (*torch.autograd.grad(FlashLike.attend(q, k, v, cu), (q, k, v), grad), None, None)


def test_grouped_query_attention_is_not_repeated_and_gives_the_same_numbers(monkeypatch):
    """fast.packed_attention on 2 k/v heads for 4 query heads, through the flash branch (with a
    stand-in kernel): where the kernel takes enable_gqa, the k/v heads are not repeated, so fewer
    bytes are saved for backward, and output and gradients are the same."""
    calls = []

    def fake_varlen(q, k, v, cu_q, cu_k, max_q, max_k, *, scale=None, window_size=(-1, -1),
                    enable_gqa=False):
        assert window_size == (-1, 0)
        calls.append((k.shape[1], enable_gqa))
        return FlashLike.apply(q, k, v, cu_q, enable_gqa)
    monkeypatch.setattr(fast, "varlen_attn", fake_varlen)
    monkeypatch.setattr(fast, "flash_varlen_ok", lambda *a: True)
    monkeypatch.setattr(torch.Tensor, "is_cuda", property(lambda self: True))
    monkeypatch.setattr(fast, "_capability", lambda index: (9, 0))
    torch.manual_seed(0)
    H, H_kv, D, N = 4, 2, 8, 12
    q = torch.randn(1, H, N, D, requires_grad=True)
    k, v = (torch.randn(1, H_kv, N, D, requires_grad=True) for _ in range(2))
    cu = torch.tensor([0, 5, 12], dtype=torch.int32)

    def run(gqa_kw):
        monkeypatch.setattr(fast, "GQA_KW", gqa_kw)
        saved = SavedBytes(torch.nn.Linear(1, 1))
        with torch.autograd.graph.saved_tensors_hooks(saved.pack, saved.unpack):
            out = fast.packed_attention(None, q, k, v, None, cu_seq_lens_q=cu, max_length_q=7)[0]
        return out, torch.autograd.grad(out.square().sum(), (q, k, v)), saved.peak
    out, grads, peak = run(True)
    out_r, grads_r, peak_r = run(False)
    monkeypatch.undo()
    assert calls == [(H_kv, True), (H, False)]  # shared heads read in place / repeated
    assert torch.allclose(out, out_r, atol=1e-6)
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(grads, grads_r))
    assert peak < peak_r
    # each path attends causally to itself only, as one SDPA per path does
    rep = lambda t, s, e: t[:, :, s:e].repeat_interleave(H // H_kv, 1)
    want = [torch.nn.functional.scaled_dot_product_attention(q[:, :, s:e], rep(k, s, e),
                                                             rep(v, s, e), is_causal=True)
            for s, e in ((0, 5), (5, 12))]
    assert torch.allclose(out[0], torch.cat(want, 2)[0].transpose(0, 1), atol=1e-6)


# ---------------------------------------------------------------- out of memory
def inject_oom(monkeypatch, above: int):
    """The student's forward raises torch.OutOfMemoryError on passes of more than `above` tokens."""
    forward, calls = fast.student_forward, {"oom": 0}

    def flaky(body, seqs, packed, device):
        tokens = sum(map(len, seqs)) if packed else len(seqs) * max(map(len, seqs))
        if tokens > above:
            calls["oom"] += 1
            raise torch.OutOfMemoryError("injected: CUDA out of memory")
        return forward(body, seqs, packed, device)
    monkeypatch.setattr(fast, "student_forward", flaky)
    return calls


def test_out_of_memory_redoes_the_micro_step_with_half_the_budget(tiny, monkeypatch, capsys):
    h_x, h_r, metanet = step_inputs(6)
    problems = tiny["short"][:3]
    cfg = mind.Config(student="tiny", beta=0.0, max_len=16, max_tokens_per_pass=10**6)
    lora = [p for p in tiny["model"].parameters() if p.requires_grad]
    _, info, want = step_grads(tiny, problems, cfg, h_x, h_r, metanet)  # undisturbed, one pass
    longest = max(len(p.ids) for pp in problems for p in pp)
    calls = inject_oom(monkeypatch, above=3 * longest)
    tiny["model"].zero_grad(set_to_none=True)
    for p in lora:  # gradients from an earlier micro-step of the window must survive the retries
        p.grad = torch.full_like(p, 0.5)
    cfg = mind.Config(student="tiny", beta=0.0, max_len=16, max_tokens_per_pass=16 * longest)
    step = lambda: mind.micro_step(cfg, problems, h_x, h_r, metanet, tiny["body"], tiny["head"],
                                   False, torch.device("cpu"))
    l_meta, got_info = fast.retry_on_oom(step, lora, cfg, longest, print)
    assert calls["oom"] >= 2 and cfg.max_tokens_per_pass == 2 * longest  # 16 -> 8 -> 4 -> 2
    assert capsys.readouterr().out.count("micro-step redone with --max-tokens-per-pass") == 3
    assert got_info["student"].item() == pytest.approx(info["student"].item(), abs=1e-6)
    for n, p in tiny["model"].named_parameters():
        if n in want:
            assert torch.allclose(p.grad - 0.5, want[n], atol=1e-5, rtol=1e-4), n
    tiny["model"].zero_grad(set_to_none=True)


def test_out_of_memory_run_ends_where_an_undisturbed_run_ends(tmp_path, monkeypatch):
    from test_mind import final_state, small_data, tiny_cfg  # noqa: F401
    data = tmp_path / "small.jsonl"
    data.write_text("".join(SAMPLE.read_text().splitlines(keepends=True)[:8]))
    # The undisturbed run uses the budget that the disturbed one ends with (4000 -> 2000 -> 1000),
    # so that both group their paths alike and agree to the last bits, not only to rounding
    mind.main(tiny_cfg(tmp_path / "calm", data, epochs=1, max_tokens_per_pass=1000))
    calls = inject_oom(monkeypatch, above=1500)
    res = mind.main(tiny_cfg(tmp_path / "oom", data, epochs=1, max_tokens_per_pass=4000))
    assert calls["oom"] == 2 and res["step"] == 4
    events = [json.loads(l) for l in open(tmp_path / "oom" / "metrics.jsonl")]
    events = [e for e in events if e["kind"] == "oom"]  # the smaller budget is logged
    assert [(e["step"], e["max_tokens_per_pass"]) for e in events] == [(0, 2000), (0, 1000)]
    assert "micro-step redone with --max-tokens-per-pass 1000" in events[-1]["message"]
    (a1, m1), (a2, m2) = final_state(tmp_path / "calm"), final_state(tmp_path / "oom")
    for n in a1:
        assert torch.allclose(a1[n], a2[n], atol=1e-6), n
    for n in m1:
        assert torch.allclose(m1[n], m2[n], atol=1e-6), n


def test_a_path_that_cannot_fit_alone_is_one_line_a_checkpoint_and_exit_2(tmp_path, monkeypatch):
    from test_mind import tiny_cfg
    data = tmp_path / "small.jsonl"
    data.write_text("".join(SAMPLE.read_text().splitlines(keepends=True)[:8]))
    inject_oom(monkeypatch, above=10**9)
    bounded = dict(epochs=1, max_tokens_per_pass=1000)
    mind.main(tiny_cfg(tmp_path / "run", data, max_steps=3, **bounded))  # steps 1-3 run fine
    inject_oom(monkeypatch, above=50)                                    # now nothing fits
    with pytest.raises(mind.DataError) as e:
        mind.main(tiny_cfg(tmp_path / "run", data, resume=True, **bounded))
    msg = str(e.value)
    assert "does not fit alone" in msg and "--max-len" in msg and "--grad-checkpointing" in msg
    assert "--batch-size" in msg and "checkpoint-000003" in msg and "--resume" in msg
    assert (tmp_path / "run" / "checkpoint-000003" / "state.pt").exists()
    with pytest.raises(mind.DataError) as e:  # the plain step, which holds every path at once
        mind.main(tiny_cfg(tmp_path / "plain", data, epochs=1, max_tokens_per_pass=-1))
    assert "plain step" in str(e.value) and "--max-tokens-per-pass 2048" in str(e.value)


def test_oom_check_script_runs_its_retry_on_the_cpu():
    """oom_check.py is what gpu_check.sh runs on a GPU; --tiny runs the same code here."""
    import oom_check
    r = oom_check.main(["--tiny", "--max-len", "256", "--start-budget", "8192"])
    assert r["final_budget"] < 8192 and r["retries"] >= 1 and r["max_rel_error"] < 1e-5
    assert fast.student_forward.__name__ == "student_forward"  # the injection is undone


def test_pass_budget_from_the_free_gpu_memory():
    """--max-tokens-per-pass 0: the largest budget the memory model fits in the free memory."""
    from transformers import Qwen2Config
    import memory
    config = Qwen2Config(**memory.SHAPES["1.5b"])
    cfg = mind.Config(student="x", max_tokens_per_pass=0)
    GiB = 2 ** 30
    assert fast.auto_pass_budget(cfg, config, 1.5e9, None) == 2048  # no GPU: the default
    for card in (16, 24, 80):
        n = fast.auto_pass_budget(cfg, config, 1.5e9, card * GiB)
        need = lambda b: memory.memory_model(config, b, False)["need_gib"]
        assert n % 256 == 0 and need(n) <= card and (n == 16384 or need(n + 256) > card), card
    assert fast.auto_pass_budget(cfg, config, 1.5e9, 24 * GiB) > 2 * 2048
    with pytest.raises(ValueError, match="--max-tokens-per-pass 1000"):
        mind.Config(max_tokens_per_pass=1000)  # neither 0 nor at least --max-len 1024
