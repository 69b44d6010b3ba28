"""Time one MIND training step at the paper's scale, against the straightforward way to write it.

Both steps run the same batch through the same student, MetaNet, equations and optimizers; only the
way the student runs differs:
  mind   mind.micro_step with mind.py's defaults: all paths once without gradients, packed in passes
         of at most --max-tokens-per-pass tokens; the selected ones again with gradients, the same
         way, backpropagating the surrogate of Eq. 4; losses from hidden states at label positions.
  naive  the straightforward step: every path through model(...) in one padded batch with gradients,
         full (paths, tokens, vocabulary) logits, the losses and answer log-probs read from them;
         peft's defaults (fp32 adapters fed fp32 copies of the activations).
Students are built from a config (random weights, nothing downloaded): Qwen2.5-1.5B and Qwen2.5-7B
shapes, bf16, LoRA r16 on all linear layers, AdamW; 4 problems x 8 paths. Reported per case: median
step time after warm-up, tokens/s (real tokens of all 32 paths, padding excluded), peak GPU memory,
two shares of the measured bf16 matmul peak, and the padding a single batch of the 32 paths would have:
  executed  the FLOPs PyTorch dispatched (FlopCounterMode over one extra step): padding, backward,
            recomputation and the second pass all count;
  useful    the FLOPs the method needs, the same formula for both steps: a forward over every real
            token of every path, and a backward (activation gradients only: the base weights are
            frozen) over the selected paths; 2 * P per token and pass for the P weights of the
            linear layers, 2 * layers * hidden * n^2 per causal attention over a path of n tokens,
            2 * hidden * V per label token for the LM head.

Usage:
  python bench.py                      # one GPU: both shapes, 512 and 1024 tokens, mind and naive
  python bench.py --shapes 1.5b --lens 512 --steps 5
  python bench.py --tiny               # the same code on CPU in seconds (kept alive by the tests)
"""
import argparse, json, statistics, time

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

import fast, mind

SHAPES = {  # from the published configs of Qwen2.5-1.5B and Qwen2.5-7B
    "1.5b": dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
                 num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True),
    "7b": dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
               num_key_value_heads=4, vocab_size=152064, tie_word_embeddings=False),
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=512, tie_word_embeddings=True),
}


def build(shape: str, cfg: mind.Config, device, dtype, method: str = "mind"):
    from peft import LoraConfig, get_peft_model
    from transformers import Qwen2Config, Qwen2ForCausalLM
    torch.manual_seed(0)
    with torch.device(device):
        model = Qwen2ForCausalLM(Qwen2Config(**SHAPES[shape], max_position_embeddings=32768)).to(dtype)
    if method == "mind":
        return mind.add_lora(model, cfg, device)
    lora = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=0.0, target_modules="all-linear")
    return get_peft_model(model, lora)


def useful_flops(shape: str, problems, mask) -> float:
    """The FLOPs the step needs (see the docstring): forward of every path, backward of the selected."""
    c = SHAPES[shape]
    h, L = c["hidden_size"], c["num_hidden_layers"]
    kv = c["num_key_value_heads"] * h // c["num_attention_heads"]                # k and v widths
    P = L * (2 * h * h + 2 * h * kv + 3 * h * c["intermediate_size"])  # q, o; k, v; gate, up, down
    def fwd(p):
        n, labels = len(p[0]), len(p[0]) - p[1]
        return 2 * P * n + 2 * L * h * n * n + 2 * h * c["vocab_size"] * labels
    sel = mask.flatten().tolist()
    flat = [p for pp in problems for p in pp]
    return sum(fwd(p) for p in flat) + sum(fwd(p) for p, s in zip(flat, sel) if s)


def padding(problems, method: str, cfg: mind.Config) -> float:
    """Share of padded positions in the forward over all paths: one batch (naive), mind's passes."""
    lens = [len(p[0]) for pp in problems for p in pp]
    packed = method == "mind" and cfg.packing
    passes = mind.plan_passes(lens, cfg.max_tokens_per_pass, cfg.packing) if method == "mind" else [range(len(lens))]
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
    B, A = len(problems), max(p[0][3] for p in problems)
    flat = [p for pp in problems for p in pp]
    T = max(len(p[0]) for p in flat)
    ids = torch.zeros(len(flat), T, dtype=torch.long)
    att = torch.zeros_like(ids)
    for n, (seq, *_) in enumerate(flat):
        ids[n, :len(seq)], att[n, :len(seq)] = torch.tensor(seq), 1
    ids, att = ids.to(device), att.to(device)
    logits = model(input_ids=ids, attention_mask=att).logits.float()                 # (B*K, T, V)
    labels = ids.masked_fill(att == 0, -100)
    for n, (seq, first, *_) in enumerate(flat):
        labels[n, :first] = -100
    tok_loss = F.cross_entropy(logits[:, :-1].transpose(1, 2), labels[:, 1:], reduction="none")  # (B*K, T-1)
    path_losses = (tok_loss.sum(1) / (labels[:, 1:] != -100).sum(1)).view(B, mind.K)
    at = torch.stack([p[2] - 1 + torch.arange(A).clamp(max=p[3] - 1) for p in flat]).to(device)
    answer_lp = F.log_softmax(logits.gather(1, at[..., None].expand(-1, -1, logits.shape[-1])), -1)
    scores = metanet(h_x, h_r)
    mask, alpha = mind.select_perspectives(scores, cfg.beta, cfg.tau_student)
    answer_mask = (torch.arange(A)[None] < torch.tensor([p[0][3] for p in problems])[:, None]).to(device)
    l_student = mind.sft_loss(alpha, path_losses) + cfg.lambda_ * mind.consistency_loss(
        answer_lp.view(B, mind.K, A, -1), alpha, answer_mask)
    return mind.metanet_loss(scores, path_losses, cfg.tau), l_student, {"mask": mask}


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
    assert torch.equal(info["mask"], b[2]["mask"])
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
        else:  # the student's backward passes happen inside micro_step
            l_meta, info = mind.micro_step(cfg, problems, h_x, h_r, metanet, body, head, False, device)
            l_meta.backward()
        opt.step(), meta_opt.step(), opt.zero_grad(set_to_none=True), meta_opt.zero_grad(set_to_none=True)
        return info["mask"]

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
        with FlopCounterMode(display=False) as counter:  # one more step, counting every matmul dispatched:
            step()                                        # backward and checkpoint recomputation included
    except torch.cuda.OutOfMemoryError:
        return {"shape": shape, "len": max_len, "method": method, "beta": beta, "oom": True}
    finally:
        del model, body, head, opt
    real = sum(len(p[0]) for pp in problems for p in pp)
    step = statistics.median(times)
    peak_gib = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None
    return {"shape": shape, "len": max_len, "method": method, "beta": beta, "oom": False, "step_s": step,
            "tokens_per_s": real / step, "peak_gib": peak_gib, "flops": counter.get_total_flops(),
            "mfu": counter.get_total_flops() / step / peak, "useful_mfu": useful_flops(shape, problems, mask) / step / peak,
            "selected_per_problem": mask.sum().item() / args.batch,
            "padding": padding(problems, method, cfg), "mean_path_tokens": real / (mind.K * len(problems))}


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
    p.add_argument("--max-tokens-per-pass", type=int, default=d.max_tokens_per_pass)
    p.add_argument("--packing", action=argparse.BooleanOptionalAction, default=d.packing)
    p.add_argument("--grad-checkpointing", action=argparse.BooleanOptionalAction, default=d.grad_checkpointing,
                   help="default: mind.py's (on for 7B, off for 1.5B)")
    p.add_argument("--out", default="bench.json")
    args = p.parse_args(argv)
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
    print("| shape | max len | step | s/step | tokens/s | peak GiB | executed FLOPs | useful FLOPs | paths selected | padding |")
    print("|---|---|---|---|---|---|---|---|---|---|")
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
    with open(args.out, "w") as fh:
        json.dump({"device": str(device), "peak_flops": peak, "rows": rows}, fh, indent=1)
    return rows


def format_row(r) -> str:
    head = f"| {r['shape']} | {r['len']} | {r['method']} (beta {r['beta']:g}) |"
    if r["oom"]:
        return head + " out of memory | | | | | | |"
    mem = "-" if r["peak_gib"] is None else f"{r['peak_gib']:.1f}"
    return (head + f" {r['step_s']:.3f} | {r['tokens_per_s']:,.0f} | {mem} | {100 * r['mfu']:.0f}% | {100 * r['useful_mfu']:.0f}% | "
            f"{r['selected_per_problem']:.1f} | {100 * r['padding']:.0f}% |")


if __name__ == "__main__":
    main()
