"""Time one MIND training step at the paper's scale, against the straightforward way to write it.

Both steps run the same batch through the same student, MetaNet, equations and optimizers; only the
way the student runs differs:
  mind   mind.micro_step with mind.py's defaults: all paths once without gradients, packed in passes
         of at most --max-tokens-per-pass tokens; the selected ones again with gradients, the same
         way, backpropagating Eq. 4 with one pass's paths live; losses from hidden states at label positions.
  naive  the straightforward step: every path through model(...) in one padded batch with gradients,
         full (paths, tokens, vocabulary) logits, the losses and answer log-probs read from them;
         peft's defaults (fp32 adapters fed fp32 copies of the activations).
Students are built from a config (random weights, nothing downloaded): Qwen2.5-1.5B and Qwen2.5-7B
shapes, bf16, LoRA r16 on all linear layers, AdamW; 4 problems x 8 paths. Reported per case: median
step time after warm-up, tokens/s (real tokens of all 32 paths, padding excluded), peak GPU memory,
two shares of the measured bf16 matmul peak, and the padding a single batch of the 32 paths would have:
  executed  the FLOPs PyTorch dispatched (FlopCounterMode over one extra step): padding, backward,
            recomputation and the second pass all count; attention by attention_flops (below), the
            same on every torch version and kernel, the rest as FlopCounterMode counts it;
  useful    the FLOPs the method needs, the same formula for both steps: a forward over every real
            token of every path, and a backward (activation gradients only: the base weights are
            frozen) over the selected paths; 2 * P per token and pass for the P weights of the
            linear layers, 2 * layers * hidden * n^2 per causal attention over a path of n tokens,
            2 * hidden * V per label token for the LM head.

Usage:
  python bench.py                      # one GPU: both shapes, 512 and 1024 tokens, mind and naive
  python bench.py --shapes 1.5b --lens 512 --steps 5
  python bench.py --tiny               # the same code on CPU in seconds (kept alive by the tests)
  python bench.py --memory             # the memory model's estimates per budget and card (no GPU)
  python bench.py --report R.md --steps-file S.tsv --bench-json A.json B.json   # gpu_check.sh's report
"""
import argparse, datetime, functools, json, math, platform, statistics, subprocess, time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

import fast, mind
from memory import (ALLOWANCE_FIXED, ALLOWANCE_SHARE, GiB, PASS_CAP, SHAPES, auto_pass_budget, dims,
                    memory_model, param_count)



def build(shape: str, cfg: mind.Config, device, dtype, method: str = "mind"):
    from peft import LoraConfig
    from transformers import Qwen2Config, Qwen2ForCausalLM
    torch.manual_seed(0)
    with torch.device(device):
        model = Qwen2ForCausalLM(Qwen2Config(**SHAPES[shape], max_position_embeddings=32768)).to(dtype)
    if method == "mind":
        return mind.add_lora(model, cfg, device)
    lora = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=0.0, target_modules="all-linear")
    return mind.get_peft_model(model, lora)  # peft's, less a FutureWarning that is not ours


def useful_flops(shape: str, problems, mask) -> float:
    """The FLOPs the step needs (see the docstring): forward of every path, backward of the selected."""
    c = SHAPES[shape]
    h, L = c["hidden_size"], c["num_hidden_layers"]
    kv = c["num_key_value_heads"] * h // c["num_attention_heads"]                # k and v widths
    P = L * (2 * h * h + 2 * h * kv + 3 * h * c["intermediate_size"])  # q, o; k, v; gate, up, down
    heads = c["num_attention_heads"]
    def fwd(p):
        n, labels = len(p.ids), len(p.ids) - p.prompt_len
        attention = L * attention_flops(n, n, heads, h // heads)
        return 2 * P * n + attention + 2 * h * c["vocab_size"] * labels
    sel = mask.flatten().tolist()
    flat = [p for pp in problems for p in pp]
    return sum(fwd(p) for p in flat) + sum(fwd(p) for p, s in zip(flat, sel) if s)


# ---------------------------------------------------------------- attention FLOPs, by closed form
# What FlopCounterMode says about attention depends on the torch version and on the kernel that ran:
# torch 2.11 has no formula for varlen attention (it counted 0 for mind's packed passes on CUDA), 2.13
# has none for the CPU flash kernel, the formulas it has count causal attention as dense, and SDPA's
# math kernel (3-D inputs on the CPU, for one) shows up as plain bmm. So the executed total takes
# every attention call from attention_flops and leaves out whatever the counter recorded for it.
ATTENTION_OPS = ("attention", "varlen_attn")  # in the names of the ops torch counts attention under


def is_attention_op(op) -> bool:
    return any(word in str(op) for word in ATTENTION_OPS)


def attention_flops(q_len: int, k_len: int, heads: int, d_qk: int, d_v: int | None = None,
                    causal: bool = True) -> int:
    """Forward FLOPs of one attention over one sequence: S = Q K^T and O = P V, two FLOPs per
    multiply-add, for each query head (key/value heads shared by GQA change nothing), halved when
    causal. The backward costs BACKWARD times the forward. This is the FlashAttention-2 paper's
    accounting (Dao 2023, Sec. 4.1; `flops()` in flash-attention's
    benchmarks/benchmark_flash_attention.py): forward 4 * n^2 * d * heads, divided by 2 if causal (a
    causal kernel skips the blocks above the diagonal), backward 2.5x: five n x n x d matmuls (S
    recomputed, then dV, dP, dQ, dK) against the forward's two. Softmax and scaling are not counted.
    A call with an explicit mask (the padded batches) counts dense: such kernels compute every score."""
    dense = 2 * q_len * k_len * (d_qk + (d_qk if d_v is None else d_v)) * heads
    return dense // 2 if causal else dense


BACKWARD = 2.5


def counted_flops(counter: FlopCounterMode, attention: bool) -> int:
    """The counter's total so far over the ops named like attention (attention=True) or the others."""
    counts = counter.get_flop_counts().get("Global", {})
    return sum(v for k, v in counts.items() if is_attention_op(k) == attention)


class AttentionCount:
    """Inside a FlopCounterMode: every attention call's FLOPs by attention_flops, and how many FLOPs the
    counter recorded as plain matmuls during such calls (`as_matmuls`), so that executed_flops can put
    the one in place of the other.

    While active it wraps F.scaled_dot_product_attention (transformers' SDPA, mind's per-path SDPA,
    MetaNet's nn.MultiheadAttention) and fast.varlen_attn (the packed passes on CUDA). A call's
    forward counts when it runs, checkpoint recomputation included, and its backward when autograd
    reaches its output (a hook): once per backward, and never for a recomputed output, whose graph
    autograd does not walk. That is how the counter sees the other ops too."""

    def __init__(self, counter: FlopCounterMode):
        self.counter, self.flops, self.as_matmuls = counter, 0, 0

    def __enter__(self):
        self.saved = sdpa, varlen = F.scaled_dot_product_attention, fast.varlen_attn

        def counted_sdpa(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, **kw):
            n, d, m = *query.shape[-2:], key.shape[-2]  # (..., n, d): batch and heads in front
            fwd = query.shape[:-2].numel() * attention_flops(n, m, 1, d, value.shape[-1], is_causal)
            return self.run(fwd, sdpa, query, key, value, attn_mask, dropout_p, is_causal, **kw)

        def counted_varlen(query, key, value, cu_seq_q, cu_seq_k, *args, **kw):  # (N, heads, d)
            causal = tuple(kw.get("window_size", (-1, -1)))[1] == 0  # mind asks for (-1, 0): causal
            q_at, k_at = cu_seq_q.tolist(), (cu_seq_q if cu_seq_k is None else cu_seq_k).tolist()
            _, heads, d = query.shape
            fwd = sum(attention_flops(q1 - q0, k1 - k0, heads, d, value.shape[2], causal)
                      for q0, q1, k0, k1 in zip(q_at, q_at[1:], k_at, k_at[1:]))
            return self.run(fwd, varlen, query, key, value, cu_seq_q, cu_seq_k, *args, **kw)

        F.scaled_dot_product_attention = counted_sdpa
        if varlen is not None:
            fast.varlen_attn = counted_varlen
        return self

    def __exit__(self, *exc):
        F.scaled_dot_product_attention, fast.varlen_attn = self.saved

    def run(self, fwd: int, fn, *args, **kw):
        before = counted_flops(self.counter, attention=False)
        out = fn(*args, **kw)
        plain = counted_flops(self.counter, attention=False) - before  # > 0: it ran as bmm (math kernel)
        self.flops, self.as_matmuls = self.flops + fwd, self.as_matmuls + plain
        if isinstance(out, torch.Tensor) and out.requires_grad:
            out.register_hook(lambda grad: self.backward(fwd, plain))
        return out

    def backward(self, fwd: int, plain: int) -> None:
        # the counter counts a matmul's backward as two matmuls of its size (q, k and v need gradients)
        self.flops, self.as_matmuls = self.flops + int(BACKWARD * fwd), self.as_matmuls + 2 * plain


def executed_flops(step) -> dict:
    """Runs step() once under FlopCounterMode -> {flops: everything executed, attention by formula;
    attention_flops: that formula's part; counter_attention_flops: what the counter itself recorded for
    attention (its attention ops plus the matmuls of math-kernel calls), left out of flops}."""
    with FlopCounterMode(display=False) as counter, AttentionCount(counter) as attention:
        step()
    by_counter = counted_flops(counter, attention=True) + attention.as_matmuls
    return {"flops": counter.get_total_flops() - by_counter + attention.flops,
            "attention_flops": attention.flops, "counter_attention_flops": by_counter}


def padding(problems, method: str, cfg: mind.Config) -> float:
    """Share of padded positions in the forward over all paths: one batch (naive), mind's passes."""
    lens = [len(p.ids) for pp in problems for p in pp]
    packed = method == "mind" and cfg.packing
    passes = fast.plan_passes(lens, cfg.max_tokens_per_pass, cfg.packing) if method == "mind" else [range(len(lens))]
    return 1 - sum(lens) / sum(sum(lens[i] for i in q) if packed else len(q) * max(lens[i] for i in q) for q in passes)


def make_problems(B: int, max_len: int, vocab: int, seed: int):
    """B problems x K paths in tokenize_paths' format. Prompts of 60-160 tokens, answers of 2-8 tokens,
    rationales log-normal around 45% of max_len (MATH-like: many short, a long tail), cut to fit."""
    g = torch.Generator().manual_seed(seed)
    problems = []
    for _ in range(B):
        prompt = torch.randint(5, vocab, (int(torch.randint(60, 160, (1,), generator=g)),), generator=g).tolist()
        answer = torch.randint(5, vocab, (int(torch.randint(2, 9, (1,), generator=g)),), generator=g).tolist()
        paths = []
        for _ in range(mind.K):
            n = int(torch.empty(1).log_normal_(0, 0.5, generator=g) * 0.4 * max_len)
            n = max(16, min(n, max_len - len(prompt) - len(answer) - 4))
            seq = prompt + torch.randint(5, vocab, (n,), generator=g).tolist() + [3, 4] + answer + [2]
            paths.append(mind.TokenPath(seq, len(prompt), len(seq) - 1 - len(answer), len(answer)))
        problems.append(paths)
    return problems


def naive_step(cfg, problems, h_x, h_r, metanet, model, device):
    """Eqs. 1-4 with every path through the full model: (B*K, T, V) logits, all with gradients."""
    B, A = len(problems), max(pp[0].answer_len for pp in problems)
    flat = [p for pp in problems for p in pp]
    T = max(len(p.ids) for p in flat)
    ids = torch.zeros(len(flat), T, dtype=torch.long)
    att = torch.zeros_like(ids)
    for n, p in enumerate(flat):
        ids[n, :len(p.ids)], att[n, :len(p.ids)] = torch.tensor(p.ids), 1
    ids, att = ids.to(device), att.to(device)
    logits = model(input_ids=ids, attention_mask=att).logits.float()                 # (B*K, T, V)
    labels = ids.masked_fill(att == 0, -100)
    for n, p in enumerate(flat):
        labels[n, :p.prompt_len] = -100
    tok_loss = F.cross_entropy(logits[:, :-1].transpose(1, 2), labels[:, 1:], reduction="none")  # (B*K, T-1)
    path_losses = (tok_loss.sum(1) / (labels[:, 1:] != -100).sum(1)).view(B, mind.K)
    at = torch.stack([p.answer_start - 1 + torch.arange(A).clamp(max=p.answer_len - 1) for p in flat]).to(device)
    answer_lp = F.log_softmax(logits.gather(1, at[..., None].expand(-1, -1, logits.shape[-1])), -1)
    scores = metanet(h_x, h_r)
    mask, alpha = mind.select_perspectives(scores, cfg.beta, cfg.tau_student)
    answer_mask = (torch.arange(A)[None] < torch.tensor([pp[0].answer_len for pp in problems])[:, None]).to(device)
    l_student = mind.sft_loss(alpha, path_losses) + cfg.lambda_ * mind.consistency_loss(
        answer_lp.view(B, mind.K, A, -1), alpha, answer_mask)
    return mind.metanet_loss(scores, path_losses, cfg.tau), l_student, {"selected": mask}


def matmul_peak(device, dtype) -> float:
    n = 8192 if device.type == "cuda" else 512
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    sync(device)
    t = time.perf_counter()
    for _ in range(10):
        a @ b
    sync(device)
    return 10 * 2 * n ** 3 / (time.perf_counter() - t)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def same_losses(shape: str, device, max_len: int = 128) -> float:
    """Largest difference between the (L_meta, L_student) of the two steps on one batch, same weights."""
    cfg = mind.Config(student="bench", beta=0.5)
    model = build(shape, cfg, device, torch.float32)
    for n, p in model.named_parameters():  # a non-zero adapter, so that the LoRA path matters too
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.02)
    metanet = mind.MetaNet(384).to(device)
    problems = make_problems(2, max_len, SHAPES[shape]["vocab_size"], seed=1)
    h_x, h_r = torch.randn(2, 384, device=device), torch.randn(2, mind.K, 384, device=device)
    body, head = model.get_base_model().base_model, model.get_base_model().get_output_embeddings()
    l_meta, info = mind.micro_step(cfg, problems, h_x, h_r, metanet, body, head, False, device)
    b = naive_step(cfg, problems, h_x, h_r, metanet, model, device)
    assert torch.equal(info["selected"], b[2]["selected"])
    return max(abs(l_meta.item() - b[0].item()), abs(info["student"].item() - b[1].item()))


def run_case(shape, max_len, method, beta, args, device, dtype, peak):
    cfg = mind.Config(student="bench", beta=beta, grad_checkpointing=args.grad_checkpointing, loss_chunk=args.loss_chunk,
                      max_tokens_per_pass=args.max_tokens_per_pass, packing=args.packing)
    model = build(shape, cfg, device, dtype, method)
    body, head = model.get_base_model().base_model, model.get_base_model().get_output_embeddings()
    metanet = mind.MetaNet(384).to(device)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-5)
    meta_opt = torch.optim.AdamW(metanet.parameters(), lr=5e-5)
    problems = make_problems(args.batch, max_len, SHAPES[shape]["vocab_size"], seed=max_len)
    h_x, h_r = torch.randn(args.batch, 384, device=device), torch.randn(args.batch, mind.K, 384, device=device)
    def step():
        if method == "naive":
            with fast.autocast(device):
                l_meta, l_student, info = naive_step(cfg, problems, h_x, h_r, metanet, model, device)
            (l_meta + l_student).backward()
        else:  # both backward calls (Eq. 1, Eq. 4) happen inside micro_step
            l_meta, info = mind.micro_step(cfg, problems, h_x, h_r, metanet, body, head, False, device)
        opt.step(), meta_opt.step(), opt.zero_grad(set_to_none=True), meta_opt.zero_grad(set_to_none=True)
        return info["selected"]

    times = []
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    try:
        for i in range(args.warmup + args.steps):
            sync(device)
            t = time.perf_counter()
            mask = step()
            sync(device)
            if i >= args.warmup:
                times.append(time.perf_counter() - t)
        flops = executed_flops(step)  # one more step, counting every matmul dispatched: backward and
                                      # checkpoint recomputation included
    except torch.cuda.OutOfMemoryError:
        return {"shape": shape, "len": max_len, "method": method, "beta": beta, "oom": True}
    finally:
        del model, body, head, opt
    real = sum(len(p.ids) for pp in problems for p in pp)
    step = statistics.median(times)
    peak_gib = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None
    return {"shape": shape, "len": max_len, "method": method, "beta": beta, "oom": False, "step_s": step,
            "tokens_per_s": real / step, "peak_gib": peak_gib, **flops,
            "mfu": flops["flops"] / step / peak,
            "useful_mfu": useful_flops(shape, problems, mask) / step / peak,
            "selected_per_problem": mask.sum().item() / args.batch,
            "padding": padding(problems, method, cfg), "mean_path_tokens": real / (mind.K * len(problems))}


def default_checkpointing(shape) -> bool:
    """mind.py's default: gradient checkpointing from 4B parameters (Config.LARGE_STUDENT)."""
    return param_count(dims(shape)) >= mind.Config.LARGE_STUDENT


MEMORY_HEAD = ("| student | grad ckpt | tokens/pass | weights | LoRA+Adam | MetaNet "
               "| answer lp, pass 1 | kept for backward | loss chunk | answer lp, pass 2 | layer backward "
               "| peak | allowance | needs |\n|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")


def memory_report(shapes, budgets, targets, grad_checkpointing=None, batch=4, max_len=1024,
                  answer_len=20, loss_chunk=1024, default_budget=None) -> str:
    """bench.py --memory: memory_model's breakdown (GiB) per student, checkpointing and budget, then
    the largest budget that fits each target; the row of mind.py's defaults is marked."""
    default_budget = default_budget or mind.Config.PASS_BUDGET
    out = [f"Estimated peak GPU memory of one micro_step (GiB): {batch} problems x {mind.K} paths "
           f"of {max_len} tokens, all selected; answers {answer_len} tokens; --loss-chunk "
           f"{loss_chunk}; LoRA r16, AdamW, bf16 weights, varlen flash attention. Of the three "
           f"transients (loss chunk, a pass's answer log-probs, layer backward) only the largest "
           f"adds to the peak. "
           f"Allowance: {ALLOWANCE_FIXED / GiB:g} GiB + {100 * ALLOWANCE_SHARE:g}% of the peak. "
           f"Estimates from the formula checked on the CPU, not GPU measurements.", "", MEMORY_HEAD]
    ckpts = [grad_checkpointing] if grad_checkpointing is not None else [False, True]
    for shape in shapes:
        for ckpt in ckpts:
            for n in budgets:
                m = memory_model(shape, n, ckpt, batch, max_len, answer_len, 16, loss_chunk)
                default = n == default_budget and ckpt == default_checkpointing(shape)
                mark = " (defaults)" if default else ""
                cells = [m[k] for k in ("weights", "lora", "metanet", "answer_pass1", "activations",
                                        "logits_chunk", "answer_pass2", "layer_backward", "peak_gib",
                                        "allowance_gib", "need_gib")]
                out.append(f"| {shape} | {'on' if ckpt else 'off'} | {n}{mark} | "
                           + " | ".join(f"{v:.2f}" for v in cells) + " |")
    out += ["", "Largest --max-tokens-per-pass (multiple of 256, at most "
            f"{PASS_CAP}) whose peak plus allowance fits:", "",
            "| student | grad ckpt | " + " | ".join(f"{t:g} GiB" for t in targets) + " |",
            "|---|---|" + "---|" * len(targets)]
    for shape in shapes:
        for ckpt in ckpts:
            cells = []
            for t in targets:
                try:
                    cells.append(str(auto_pass_budget(t * GiB, shape, ckpt, batch, max_len,
                                                      answer_len, 16, loss_chunk)))
                except ValueError:
                    cells.append("does not fit")
            out.append(f"| {shape} | {'on' if ckpt else 'off'} | " + " | ".join(cells) + " |")
    return "\n".join(out)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tiny", action="store_true", help="tiny shape on the CPU, for a smoke test")
    p.add_argument("--shapes", nargs="+", default=["1.5b", "7b"], choices=list(SHAPES))
    p.add_argument("--lens", nargs="+", type=int, default=[512, 1024], help="max tokens per path")
    p.add_argument("--methods", nargs="+", default=["mind", "mind-all8", "naive"], choices=["mind", "mind-all8", "naive"])
    p.add_argument("--batch", type=int, default=4, help="problems per step [Table 8]")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    d = mind.Config
    p.add_argument("--loss-chunk", type=int, default=d.loss_chunk)
    p.add_argument("--max-tokens-per-pass", type=int, default=mind.Config.PASS_BUDGET)
    p.add_argument("--packing", action=argparse.BooleanOptionalAction, default=d.packing)
    p.add_argument("--grad-checkpointing", action=argparse.BooleanOptionalAction, default=d.grad_checkpointing,
                   help="default: mind.py's (on for 7B, off for 1.5B)")
    p.add_argument("--out", default="bench.json")
    p.add_argument("--memory", action="store_true", help="print the memory model's estimates (for "
                   "--shapes, --budgets, --targets; both checkpointing settings unless "
                   "--[no-]grad-checkpointing) and exit; needs no GPU")
    p.add_argument("--budgets", nargs="+", type=int, default=[1024, 2048, 3072, 4096, 6144],
                   help="with --memory: tokens per pass")
    p.add_argument("--targets", nargs="+", type=float, default=[12, 16, 22, 24, 40, 80],
                   help="with --memory: GiB to fit")
    p.add_argument("--max-len", type=int, default=d.max_len, help="with --memory: tokens per path")
    p.add_argument("--answer-len", type=int, default=20, help="with --memory: answer tokens")
    p.add_argument("--report", metavar="MD", help="write gpu_check.sh's Markdown report (device, the "
                   "steps of --steps-file, the tables of --bench-json) to MD and exit; runs no benchmark")
    p.add_argument("--steps-file", metavar="TSV", help="with --report: one line per step, tab-separated: "
                   "name, exit status (or 'not run: why'), wall s, limit s, log file, command")
    p.add_argument("--bench-json", nargs="*", default=[], metavar="JSON",
                   help="with --report: --out files of bench.py")
    args = p.parse_args(argv)
    if args.report:
        steps = read_steps(args.steps_file) if args.steps_file else []
        text = gpu_report(device_info(), steps, {f: read_json(f) for f in args.bench_json})
        Path(args.report).parent.mkdir(parents=True, exist_ok=True)
        Path(args.report).write_text(text, encoding="utf-8")
        print(f"wrote {args.report}")
        return text
    if args.memory:
        text = memory_report(args.shapes, args.budgets, args.targets, args.grad_checkpointing,
                             args.batch, args.max_len, args.answer_len, args.loss_chunk)
        print(text)
        return text
    if args.tiny:
        args.shapes, args.lens, args.steps, args.warmup, args.batch = ["tiny"], [96], 1, 1, 2
    device = torch.device("cuda" if torch.cuda.is_available() and not args.tiny else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    peak = matmul_peak(device, dtype)
    print(f"device: {torch.cuda.get_device_name() if device.type == 'cuda' else 'cpu'}, "
          f"measured matmul peak {peak / 1e12:.3g} TFLOP/s ({dtype})")
    if args.tiny:
        diff = same_losses("tiny", device)
        print(f"mind and naive steps agree on the losses: max difference {diff:.2e}")
    name = torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or "cpu"
    print(TABLE_HEAD)
    beta = mind.Config.beta
    rows = []
    for shape in args.shapes:
        for max_len in args.lens:
            for method in args.methods:
                r = run_case(shape, max_len, "naive" if method == "naive" else "mind", 0.0 if method == "mind-all8" else beta,
                             args, device, dtype, peak)
                r["method"] = method
                rows.append(r)
                print(format_row(r), flush=True)
                with open(args.out, "w") as fh:  # after every case: a run cut short keeps its rows
                    json.dump({"device": str(device), "device_name": name, "dtype": str(dtype),
                               "peak_flops": peak, "rows": rows}, fh, indent=1)
    return rows


TABLE_HEAD = ("| shape | max len | step | s/step | tokens/s | peak GiB | executed FLOPs | useful FLOPs "
              "| paths selected | padding |\n|---|---|---|---|---|---|---|---|---|---|")


def format_row(r) -> str:
    head = f"| {r['shape']} | {r['len']} | {r['method']} (beta {r['beta']:g}) |"
    if r["oom"]:
        return head + " out of memory | | | | | | |"
    mem = "-" if r["peak_gib"] is None else f"{r['peak_gib']:.1f}"
    return (head + f" {r['step_s']:.3f} | {r['tokens_per_s']:,.0f} | {mem} | {100 * r['mfu']:.0f}% | {100 * r['useful_mfu']:.0f}% | "
            f"{r['selected_per_problem']:.1f} | {100 * r['padding']:.0f}% |")


# ---------------------------------------------------------------- gpu_check.sh's report
def device_info() -> dict:
    """The machine and the software versions, for the report's first lines."""
    import peft, transformers
    query = ["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"]
    try:
        smi = subprocess.run(query, capture_output=True, text=True, timeout=30)
        gpus = [line.strip() for line in smi.stdout.splitlines() if line.strip()]
        gpu = "; ".join(gpus) or f"nvidia-smi: exit {smi.returncode}"
    except (OSError, subprocess.TimeoutExpired) as e:
        gpu = f"nvidia-smi failed ({e.__class__.__name__}: {e})"
    seen = torch.cuda.get_device_name() if torch.cuda.is_available() else "no CUDA device"
    return {"gpu": gpu, "torch_sees": seen, "torch": torch.__version__, "cuda": torch.version.cuda or "none",
            "transformers": transformers.__version__, "peft": peft.__version__,
            "python": platform.python_version()}


def read_steps(path) -> list[dict]:
    """gpu_check.sh's steps file -> one dict per step, with the last lines of its log."""
    steps = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        name, status, seconds, limit, log, command = line.split("\t", 5)
        tail = None
        if log and Path(log).is_file():
            tail = "\n".join(Path(log).read_text(encoding="utf-8", errors="replace").splitlines()[-20:])
        steps.append({"name": name, "status": int(status) if status.lstrip("-").isdigit() else status,
                      "seconds": float(seconds) if seconds else None, "limit": limit, "log": log,
                      "command": command, "tail": tail})
    return steps


def read_json(path):
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def status_text(step: dict) -> str:
    status = step["status"]
    if isinstance(status, str):  # a step the script did not run says why
        return status
    if status == 0:
        return "ok"
    if status in (124, 137):  # timeout's exit status, and that of a process it had to kill
        return f"timed out (limit {step['limit']} s)"
    return f"failed (exit {status})"


def gpu_report(device: dict, steps: list[dict], benches: dict) -> str:
    """The Markdown report of gpu_check.sh: the device and versions, each step's status and wall
    time, bench.py's tables (benches: file -> its JSON, None where not written), the logs' last lines."""
    cell = lambda text: str(text).replace("|", "\\|")
    when = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    ok = sum(s["status"] == 0 for s in steps)
    out = [f"# GPU check, {when}", "",
           f"- device: {device['gpu']} (PyTorch sees: {device['torch_sees']})",
           f"- software: torch {device['torch']} (CUDA {device['cuda']}), "
           f"transformers {device['transformers']}, peft {device['peft']}, Python {device['python']}",
           f"- steps: {ok} of {len(steps)} ok", "",
           "## Steps", "", "| step | command | status | wall s |", "|---|---|---|---|"]
    for s in steps:
        wall = "-" if s["seconds"] is None else f"{s['seconds']:.1f}"
        out.append(f"| {cell(s['name'])} | `{cell(s['command'])}` | {cell(status_text(s))} | {wall} |")
    out += ["", "## bench.py", ""]
    for path, data in benches.items():
        if data is None:
            out += [f"`{path}`: not written (see its step's log below)", ""]
            continue
        out += [f"`{path}`: {data.get('device_name', data['device'])}, measured matmul peak "
                f"{data['peak_flops'] / 1e12:.3g} TFLOP/s ({data.get('dtype', '?')})", "", TABLE_HEAD,
                *map(format_row, data["rows"]), "",
                "GFLOP per step: executed (attention by formula), its attention part, and what "
                "FlopCounterMode itself recorded for attention (left out):", "",
                "| shape | max len | step | executed | attention | counter's attention |",
                "|---|---|---|---|---|---|"]
        for r in data["rows"]:
            gflop = [f"{r[k] / 1e9:,.1f}" if k in r else "-"
                     for k in ("flops", "attention_flops", "counter_attention_flops")]
            out.append(f"| {r['shape']} | {r['len']} | {r['method']} | " + " | ".join(gflop) + " |")
        out.append("")
    out += ["## Logs (last 20 lines of each step)", ""]
    for s in steps:
        body = s.get("tail")
        if body is None:
            body = f"(no log at {s.get('log') or '-'})"
        out += [f"### {s['name']}", "", "```", body, "```", ""]
    return "\n".join(out)


if __name__ == "__main__":
    main()
