"""Tests for bench.py's FLOP accounting and gpu_check.sh (its report, its refusal without a GPU), on the
CPU: pytest -q test_bench.py"""
import json, os, subprocess
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils import flop_counter
from torch.utils.flop_counter import FlopCounterMode

import bench
import fast, mind

HERE = Path(__file__).resolve().parent
CPU = torch.device("cpu")
aten = torch.ops.aten


# ---------------------------------------------------------------- attention FLOPs, closed form
def test_attention_flops_by_hand_and_against_the_counters_matmuls():
    # one sequence of n = 8 tokens, 2 heads of d = 4: Q K^T is 8 x 8 dot products of 4 terms (2 FLOPs
    # each) = 512 per head, P V the same, so 2 x 1024 = 2048 dense; causal counts half: 1024
    assert bench.attention_flops(8, 8, 2, 4, causal=False) == 2048
    assert bench.attention_flops(8, 8, 2, 4) == 1024
    assert int(bench.BACKWARD * bench.attention_flops(8, 8, 2, 4)) == 2560  # 5 matmuls to the forward's 2
    # 5 queries, 7 keys, 3 heads, d_qk 4, d_v 6: Q K^T 5*7*4*2*3 = 840, P V 5*7*6*2*3 = 1260
    assert bench.attention_flops(5, 7, 3, 4, 6, causal=False) == 2100
    # independently: SDPA's math kernel is plain bmm, which FlopCounterMode counts by its own formula
    q, k, v = (torch.randn(1, 2, 8, 4, requires_grad=True) for _ in range(3))
    with sdpa_kernel(SDPBackend.MATH):
        with FlopCounterMode(display=False) as fwd:
            out = F.scaled_dot_product_attention(q, k, v)
        with FlopCounterMode(display=False) as both:
            F.scaled_dot_product_attention(q, k, v).sum().backward()
    assert fwd.get_total_flops() == bench.attention_flops(8, 8, 2, 4, causal=False)
    # what AttentionCount relies on to take a math-kernel call's backward out: two bmm per bmm
    assert both.get_total_flops() == 3 * fwd.get_total_flops()
    assert out.shape == q.shape


# ---------------------------------------------------------------- the executed total
def tiny_steps():
    """One mind micro-step and one naive step on the tiny student, with fixed weights and batch: the
    same computation each time they run (gradients accumulate, nothing else changes)."""
    cfg = mind.Config(student="bench")
    model = bench.build("tiny", cfg, CPU, torch.float32)  # mind's attention (packed passes)
    body, head = model.get_base_model().base_model, model.get_base_model().get_output_embeddings()
    plain_model = bench.build("tiny", cfg, CPU, torch.float32, "naive")  # transformers' SDPA, as in bench
    torch.manual_seed(1)
    metanet = mind.MetaNet(384)
    problems = bench.make_problems(2, 96, bench.SHAPES["tiny"]["vocab_size"], seed=3)
    h_x, h_r = torch.randn(2, 384), torch.randn(2, mind.K, 384)
    masks = []

    def mind_step():
        l_meta, info = mind.micro_step(cfg, problems, h_x, h_r, metanet, body, head, False, CPU)
        masks.append(info["selected"])

    def naive_step():
        l_meta, l_student, info = bench.naive_step(cfg, problems, h_x, h_r, metanet, plain_model, CPU)
        (l_meta + l_student).backward()
        masks.append(info["selected"])
    return problems, masks, {"mind": mind_step, "naive": naive_step}


def expected_attention(problems, mask, method: str) -> int:
    """Attention FLOPs of one step, from the path lengths and the selection alone: mind runs every path
    once without gradients, causal, and the selected ones again with forward and backward; naive runs
    every path padded to the longest, with a mask (dense), forward and backward; MetaNet's attention
    over the K paths of each problem is dense, forward and backward, in both."""
    c = bench.SHAPES["tiny"]
    L, H = c["num_hidden_layers"], c["num_attention_heads"]
    d = c["hidden_size"] // H
    lens = [len(p[0]) for pp in problems for p in pp]
    fb = 1 + bench.BACKWARD
    if method == "mind":
        student = sum(L * 2 * n * n * d * H * (1 + fb * s) for n, s in zip(lens, mask.flatten().tolist()))
    else:
        assert len(set(lens)) > 1  # so there is padding, and transformers passes SDPA a mask
        student = L * len(lens) * 4 * max(lens) ** 2 * d * H * fb
    B, K, width = len(problems), mind.K, 256  # MetaNet: d = 256 over 4 heads
    return int(student + 4 * B * K * K * width * fb)


def test_executed_flops_do_not_depend_on_what_the_counter_knows_about_attention(monkeypatch):
    problems, masks, steps = tiny_steps()
    registry = dict(flop_counter.flop_registry)
    without = {k: v for k, v in registry.items() if not bench.is_attention_op(k)}  # torch 2.11 and varlen
    assert len(without) < len(registry)
    # a torch that knew the CPU flash kernel, with the formulas it has for the CUDA one
    fwd, bwd = aten._scaled_dot_product_flash_attention, aten._scaled_dot_product_flash_attention_backward
    knows_cpu = {**registry, aten._scaled_dot_product_flash_attention_for_cpu: registry[fwd],
                 aten._scaled_dot_product_flash_attention_for_cpu_backward: registry[bwd]}
    for method, step in steps.items():
        with FlopCounterMode(display=False) as plain:  # the counter alone, as bench.py counted before
            step()
        seen = {}
        variants = ("as is", registry), ("no attention formulas", without), ("knows cpu", knows_cpu)
        for variant, reg in variants:
            monkeypatch.setattr(flop_counter, "flop_registry", reg)
            seen[variant] = bench.executed_flops(step)
        monkeypatch.setattr(flop_counter, "flop_registry", registry)
        with sdpa_kernel(SDPBackend.MATH):  # every attention as plain bmm
            seen["math kernel"] = bench.executed_flops(step)
        assert all(torch.equal(m, masks[0]) for m in masks)  # the same selection every time
        first = seen["as is"]
        assert first["attention_flops"] == expected_attention(problems, masks[0], method)
        for variant, r in seen.items():
            assert r["flops"] == first["flops"], (method, variant)
            assert r["attention_flops"] == first["attention_flops"], (method, variant)
        # the counter's own view did change from variant to variant ("as is" and "no attention formulas"
        # agree on the CPU, where torch has no formula for the kernels that ran), and only attention is
        # swapped: the rest is what the counter alone measures
        assert len({r["counter_attention_flops"] for r in seen.values()}) >= 3, (method, seen)
        rest = first["flops"] - first["attention_flops"]
        assert plain.get_total_flops() == rest + first["counter_attention_flops"]
        assert first["flops"] > first["attention_flops"] > 0


def test_varlen_calls_count_by_formula_from_the_sequence_starts(monkeypatch):
    def fake_varlen(q, k, v, cu_q, cu_k, max_q, max_k, *, scale=None, window_size=(-1, -1)):
        """Causal attention per sequence in plain matmuls; the counter sees them as bmm."""
        at, out = cu_q.tolist(), []
        for s, e in zip(at, at[1:]):
            qq, kk, vv = (t[s:e].transpose(0, 1) for t in (q, k, v))  # (heads, n, d)
            above = torch.ones(e - s, e - s).triu(1).bool()
            scores = (qq @ kk.transpose(1, 2)).masked_fill(above, float("-inf"))
            out.append((scores.softmax(-1) @ vv).transpose(0, 1))
        return torch.cat(out)
    monkeypatch.setattr(fast, "varlen_attn", fake_varlen)
    H, d, lens = 2, 4, [3, 5]
    cu = torch.tensor([0, 3, 8], dtype=torch.int32)
    q, k, v = (torch.randn(sum(lens), H, d, requires_grad=True) for _ in range(3))
    call = lambda: fast.varlen_attn(q, k, v, cu, cu, 5, 5, window_size=(-1, 0))
    # by hand, causal: 2 * n^2 * d * heads per sequence = 2*9*4*2 + 2*25*4*2 = 144 + 400 = 544
    r = bench.executed_flops(lambda: call().sum().backward())
    assert r["flops"] == r["attention_flops"] == 544 + 1360  # backward: 2.5 x 544
    assert r["counter_attention_flops"] > 0  # the counter saw the matmuls, and they were left out
    with torch.no_grad():
        assert bench.executed_flops(call)["flops"] == 544  # no backward, no backward FLOPs
    assert fast.varlen_attn is fake_varlen  # put back on exit


# ---------------------------------------------------------------- gpu_check.sh and its report
def test_gpu_report_names_the_device_and_has_each_steps_status_and_the_bench_rows(tmp_path):
    rows = bench.main(["--tiny", "--methods", "mind", "naive", "--out", str(tmp_path / "bench.json")])
    assert json.loads((tmp_path / "bench.json").read_text())["rows"] == json.loads(json.dumps(rows))
    logs = {name: tmp_path / f"{name}.log" for name in ("tests", "bench-1.5b", "bench-7b", "speed-test")}
    for name, log in logs.items():
        log.write_text("".join(f"{name} line {i}\n" for i in range(30)))
    lines = [("tests", "0", "12.5", "170", "python -m pytest -q"),
             ("bench-1.5b", "0", "80.0", "140", "python bench.py --shapes 1.5b"),
             ("bench-7b", "1", "20.3", "80", "python bench.py --shapes 7b"),
             ("oom-check", "not run: oom_check.py missing", "", "40", "python oom_check.py"),
             ("speed-test", "124", "100.0", "100", "python evaluate.py --speed-test")]
    tsv = tmp_path / "steps.tsv"  # as gpu_check.sh writes it: name, status, wall, limit, log, command
    tsv.write_text("".join(f"{n}\t{st}\t{w}\t{lim}\t{logs[n] if n in logs else ''}\t{c}\n"
                           for n, st, w, lim, c in lines))
    device = {"gpu": "NVIDIA H200, 143771 MiB, 570.86", "torch_sees": "NVIDIA H200",
              "torch": "2.13.0+cu128", "cuda": "12.8", "transformers": "5.24.0", "peft": "0.21.2",
              "python": "3.11.7"}
    missing = str(tmp_path / "bench_7b.json")
    md = bench.gpu_report(device, bench.read_steps(tsv), {str(tmp_path / "bench.json"): bench.read_json(
        tmp_path / "bench.json"), missing: bench.read_json(missing)})
    assert "- device: NVIDIA H200, 143771 MiB, 570.86 (PyTorch sees: NVIDIA H200)" in md
    assert "torch 2.13.0+cu128 (CUDA 12.8), transformers 5.24.0, peft 0.21.2" in md
    assert "- steps: 2 of 5 ok" in md
    for want in ("| tests | `python -m pytest -q` | ok | 12.5 |",
                 "| bench-7b | `python bench.py --shapes 7b` | failed (exit 1) | 20.3 |",
                 "| oom-check | `python oom_check.py` | not run: oom_check.py missing | - |",
                 "| speed-test | `python evaluate.py --speed-test` | timed out (limit 100 s) | 100.0 |",
                 f"`{missing}`: not written"):
        assert want in md, want
    for r in rows:  # bench's table row and the FLOP row of each case
        cells = f"{r['method']} (beta 0.9) | {r['step_s']:.3f} | {r['tokens_per_s']:,.0f}"
        assert f"| tiny | 96 | {cells} |" in md
        gflop = [f"{r[k] / 1e9:,.1f}" for k in ("flops", "attention_flops", "counter_attention_flops")]
        assert f"| tiny | 96 | {r['method']} | {' | '.join(gflop)} |" in md
    assert "speed-test line 29" in md and "speed-test line 10" in md  # the last 20 lines of a log
    assert "speed-test line 9" not in md
    # the command line: the same report, with this machine's versions
    text = bench.main(["--report", str(tmp_path / "r.md"), "--steps-file", str(tsv), "--bench-json",
                       str(tmp_path / "bench.json")])
    assert (tmp_path / "r.md").read_text() == text
    assert f"torch {torch.__version__} " in text and "PyTorch sees: no CUDA device" in text
    assert "| bench-1.5b | `python bench.py --shapes 1.5b` | ok | 80.0 |" in text


def test_gpu_check_refuses_at_once_without_a_cuda_device(tmp_path):
    script = HERE / "gpu_check.sh"
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0  # the whole script parses
    report = tmp_path / "out" / "report.md"
    done = subprocess.run(["bash", str(script), str(report)], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "CUDA_VISIBLE_DEVICES": ""}, cwd=tmp_path)
    assert done.returncode == 1
    assert done.stdout == "" and len(done.stderr.splitlines()) == 1 and "no CUDA device" in done.stderr
    assert not (tmp_path / "out").exists()  # no step ran, nothing was written
