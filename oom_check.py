"""The out-of-memory retry of fast.retry_on_oom on a real GPU (gpu_check.sh runs it).

A Qwen2.5-1.5B-shaped student (random weights, bf16, LoRA r16) takes one MIND micro-step with all
8 paths of 4 problems selected, first under a memory cap (torch.cuda.set_per_process_memory_fraction)
that the starting pass budget does not fit, so that real CUDA out-of-memory errors halve it until
it fits; then again without the cap, at the budget the retries ended with. Both gradients must
agree: the retry undid everything the failed attempts had accumulated.

  python oom_check.py                 # one GPU, about a minute
  python oom_check.py --tiny          # the same code on the CPU, the error injected (the tests)
"""
import argparse, sys

import torch

import bench, fast, mind


def one_step(cfg, model, problems, h_x, h_r, metanet, device):
    """LoRA gradients of one micro-step, through the retry."""
    body, head = model.get_base_model().base_model, model.get_base_model().get_output_embeddings()
    lora = [p for p in model.parameters() if p.requires_grad]
    model.zero_grad(set_to_none=True)
    longest = max(len(p.ids) for pp in problems for p in pp)
    step = lambda: mind.micro_step(cfg, problems, h_x, h_r, metanet, body, head, False, device)
    fast.retry_on_oom(step, [*lora, *metanet.parameters()], cfg, longest)
    return [p.grad.float().clone() for p in lora]


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tiny", action="store_true", help="tiny shape on the CPU, error injected")
    p.add_argument("--start-budget", type=int, default=32768, help="first pass budget (tokens)")
    p.add_argument("--max-len", type=int, default=1024)
    args = p.parse_args(argv)
    shape, device = ("tiny", torch.device("cpu")) if args.tiny else ("1.5b", torch.device("cuda"))
    dtype = torch.float32 if args.tiny else torch.bfloat16
    cfg = mind.Config(student="bench", beta=0.0, max_len=args.max_len,
                      max_tokens_per_pass=args.start_budget)
    model = bench.build(shape, cfg, device, dtype)
    for n, w in model.named_parameters():  # a non-zero adapter, so every LoRA weight gets a gradient
        if "lora_B" in n:
            torch.nn.init.normal_(w, std=0.02)
    problems = bench.make_problems(4, args.max_len, bench.SHAPES[shape]["vocab_size"], seed=0)
    torch.manual_seed(0)
    metanet = mind.MetaNet(384).to(device)
    h_x, h_r = torch.randn(4, 384, device=device), torch.randn(4, mind.K, 384, device=device)
    tokens = sum(len(p.ids) for pp in problems for p in pp)
    if args.tiny:  # what a small card does to passes of more than a third of the batch
        forward, limit = fast.student_forward, tokens // 3

        def capped(body, seqs, packed, dev):
            if sum(map(len, seqs)) > limit:
                raise torch.OutOfMemoryError("injected")
            return forward(body, seqs, packed, dev)
        fast.student_forward = capped
    else:  # room for the weights and a few thousand tokens of activations, not for 32k
        total = torch.cuda.get_device_properties(device).total_memory
        cap = torch.cuda.memory_allocated(device) + 8 * 2**30
        torch.cuda.set_per_process_memory_fraction(cap / total, device)
    try:
        capped_grads = one_step(cfg, model, problems, h_x, h_r, metanet, device)
    finally:
        if args.tiny:
            fast.student_forward = forward
        else:
            torch.cuda.set_per_process_memory_fraction(1.0, device)
    budget = cfg.max_tokens_per_pass
    free_grads = one_step(cfg, model, problems, h_x, h_r, metanet, device)  # no cap, same budget
    err = max(((a - b).norm() / b.norm().clamp(min=1e-12)).item()
              for a, b in zip(capped_grads, free_grads))
    result = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
              "tokens": tokens, "start_budget": args.start_budget, "final_budget": budget,
              "retries": (args.start_budget // budget).bit_length() - 1, "max_rel_error": err}
    ok = budget < args.start_budget and err < 1e-3
    print(f"oom_check: {result['device']}: {tokens} tokens, pass budget {args.start_budget} -> "
          f"{budget} after {result['retries']} out-of-memory retries; gradients vs an undisturbed "
          f"step at {budget}: max relative error {err:.2e} -> {'ok' if ok else 'FAILED'}")
    if not ok:
        sys.exit(1)
    return result


if __name__ == "__main__":
    main()
