"""What a MIND training run needs besides the method: mind.py imports all of it from here.

Bad input, the tiny offline student, several processes (torchrun), checkpoints that resume exactly,
and the log lines. None of it is in the paper; each piece is ordinary PyTorch and can be read alone.
"""
import json, os
from pathlib import Path

import torch
import torch.distributed as dist

from prompts import PERSPECTIVE_KEYS

K = len(PERSPECTIVE_KEYS)


class DataError(ValueError):
    """Bad input (the data, the output folder); the message names the file and, for data, the line
    and the problem. The command line prints it alone and exits with status 2."""


# ----------------------------------------------------------------------------------------------------
# 1. The tiny student of `python mind.py --student tiny` and of the tests.
def build_tiny(texts: list[str], seed: int, max_len: int = 1024):
    """A 2-layer GPT-2 and a static-embedding Sentence-Transformer over one byte-level BPE tokenizer
    trained on `texts`: the whole method runs offline, on a CPU, in seconds."""
    from sentence_transformers import SentenceTransformer
    try:
        from sentence_transformers.sentence_transformer.modules import StaticEmbedding
    except ImportError:  # sentence-transformers < 6
        from sentence_transformers.models import StaticEmbedding
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer, bpe.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
    bpe.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=512, special_tokens=["<|endoftext|>"],
                            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|endoftext|>", pad_token="<|endoftext|>")
    torch.manual_seed(seed)
    eos = tok.eos_token_id
    model = GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_positions=max_len, n_embd=64, n_layer=2,
                                       n_head=4, bos_token_id=eos, eos_token_id=eos, pad_token_id=eos,
                                       attn_pdrop=0.0, resid_pdrop=0.0, embd_pdrop=0.0))  # as Qwen/Llama: none
    encoder = SentenceTransformer(modules=[StaticEmbedding(bpe, embedding_dim=32)], device="cpu")
    return model, tok, encoder


# ----------------------------------------------------------------------------------------------------
# 2. Multi-GPU: torchrun sets RANK/WORLD_SIZE; without it this is one process, same code path.
def rank():
    return dist.get_rank() if dist.is_initialized() else 0


def setup_distributed(cfg):
    """(rank, world size, device). Under torchrun: NCCL between GPUs, one per process, or gloo on CPUs."""
    cuda = cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available())
    if cuda and not torch.cuda.is_available():
        raise DataError("--device cuda: no GPU is visible")
    if cfg.deterministic:  # cuBLAS repeats its matmuls only with this workspace setting, read at its start
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
    if "RANK" not in os.environ:
        return 0, 1, torch.device("cuda" if cuda else "cpu")
    local, n_local = int(os.environ["LOCAL_RANK"]), int(os.environ["LOCAL_WORLD_SIZE"])
    if cuda and n_local > torch.cuda.device_count():
        raise DataError(f"torchrun started {n_local} processes here but {torch.cuda.device_count()} GPU(s) are "
                        f"visible: use --nproc_per_node {torch.cuda.device_count()}, or --device cpu")
    dist.init_process_group("nccl" if cuda else "gloo")
    if cuda:
        torch.cuda.set_device(local)
    return dist.get_rank(), dist.get_world_size(), torch.device("cuda", local) if cuda else torch.device("cpu")


def all_mean_grads(params):
    """Averages gradients over the processes before an optimizer step, as DDP would; by hand, because
    DDP's hooks would fire on every backward pass, and micro_step makes several."""
    if dist.is_initialized():
        params = list(params)
        flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).flatten() for p in params])
        dist.all_reduce(flat)
        for p, g in zip(params, (flat / dist.get_world_size()).split([p.numel() for p in params])):
            p.grad = g.view_as(p)


def all_sum(t):
    if dist.is_initialized():
        dist.all_reduce(t)
    return t


def epoch_batches(n: int, batch_size: int, seed: int, epoch: int, rank: int, world: int):
    """A seeded shuffle per epoch, padded so every rank gets the same number of batches."""
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 10_007 + epoch)).tolist()
    order += order[: (-n) % world]
    mine = order[rank::world]
    return [mine[i: i + batch_size] for i in range(0, len(mine), batch_size)]


# ----------------------------------------------------------------------------------------------------
# 3. Checkpoints: LoRA adapter (save_pretrained), MetaNet, both optimizers, progress, RNG states and the
# MetaNet gradients accumulated so far on each rank, so that --resume continues exactly.
def save_checkpoint(out: Path, step, epoch, micro, peft_model, metanet, opt, meta_opt, world, variant="mind"):
    tmp, final = out / "checkpoint.tmp", out / f"checkpoint-{step:06d}"
    if rank() == 0:
        tmp.mkdir(parents=True, exist_ok=True)
        peft_model.save_pretrained(tmp / "adapter")
        torch.save({"step": step, "epoch": epoch, "micro": micro, "world": world, "variant": variant, "metanet": metanet.state_dict(),
                    "opt": opt.state_dict(), "meta_opt": meta_opt.state_dict()}, tmp / "state.pt")
    barrier()
    torch.save({"cpu_rng": torch.get_rng_state(),
                "cuda_rng": torch.cuda.get_rng_state() if torch.cuda.is_available() else torch.empty(0),
                "meta_grads": [p.grad if p.grad is not None else torch.zeros_like(p) for p in metanet.parameters()]},
               tmp / f"rank{rank()}.pt")
    barrier()
    if rank() == 0:
        os.replace(tmp, final)  # atomic: a checkpoint folder exists only when complete
    barrier()
    return final


def load_checkpoint(path: Path, peft_model, metanet, opt, meta_opt, world, variant="mind"):
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file
    state = torch.load(path / "state.pt", weights_only=True)
    if state["world"] != world:
        raise DataError(f"{path}: saved by {state['world']} process(es), resumed with {world}; use the same number")
    if state.get("variant", "mind") != variant:
        raise DataError(f"{path}: a --variant {state.get('variant', 'mind')} run, resumed as --variant {variant}; "
                        f"use the same variant, or another --out")
    set_peft_model_state_dict(peft_model, load_file(path / "adapter" / "adapter_model.safetensors"))
    metanet.load_state_dict(state["metanet"])
    opt.load_state_dict(state["opt"])
    meta_opt.load_state_dict(state["meta_opt"])
    mine = torch.load(path / f"rank{rank()}.pt", weights_only=True)
    for p, g in zip(metanet.parameters(), mine["meta_grads"]):
        p.grad = g.to(p.device).clone()
    torch.set_rng_state(mine["cpu_rng"])
    if torch.cuda.is_available() and mine["cuda_rng"].numel():
        torch.cuda.set_rng_state(mine["cuda_rng"])
    return state["step"], state["epoch"], state["micro"]


def barrier():
    if dist.is_initialized():
        dist.barrier()


# ----------------------------------------------------------------------------------------------------
# 4. Logging: one line per interval on the progress bar, every value in metrics.jsonl.
def log_stats(l_meta, info, B: int, device):
    """Sums over the micro-batch of: L_SFT, L_cons, L_meta (x B), |I_dyn|, problems, tokens, and per
    perspective alpha_k, s_k, L_real_k. Without MetaNet (some variants) L_meta and s count as 0."""
    zero = torch.tensor(0.0)
    head = [info.get("sft", zero).item() * B, info.get("cons", zero).item() * B,
            0.0 if l_meta is None else l_meta.item() * B, info["mask"].sum().item(), B, info["tokens"]]
    scores = info["scores"] if info["scores"] is not None else torch.zeros_like(info["alpha"])
    per_k = [t.float().cpu().sum(0) for t in (info["alpha"], scores, info["l_real"])]
    return torch.cat([torch.tensor(head), *per_k]).to(device)


def peak_memory_gib(device):
    """The peak GPU memory since the last call, the largest over the processes; None on the CPU."""
    if device.type != "cuda":
        return None
    peak = torch.tensor([torch.cuda.max_memory_allocated(device) / 2**30], device=device)
    torch.cuda.reset_peak_memory_stats(device)
    if dist.is_initialized():
        dist.all_reduce(peak, op=dist.ReduceOp.MAX)
    return round(peak.item(), 2)


def make_record(s, step, epoch, warmup, lr, meta_lr, seconds, peak_gib, variant="mind", metanet=True) -> dict:
    n = s[4]
    r = {"kind": "step", "variant": variant, "step": step, "epoch": round(epoch, 3), "stage": "warmup" if warmup else "joint",
         "loss_sft": None if warmup else s[0] / n, "loss_cons": None if warmup else s[1] / n,
         "loss_meta": s[2] / n if metanet else None,
         "n_selected": s[3] / n, "tokens_per_s": s[5] / seconds, "lr": 0.0 if warmup else lr, "meta_lr": meta_lr,
         "peak_mem_gib": peak_gib}
    r |= {f"alpha/{k}": s[6 + j] / n for j, k in enumerate(PERSPECTIVE_KEYS)}
    r |= {f"score/{k}": s[6 + K + j] / n if metanet else None for j, k in enumerate(PERSPECTIVE_KEYS)}
    return r | {f"loss_real/{k}": s[6 + 2 * K + j] / n for j, k in enumerate(PERSPECTIVE_KEYS)}


def record_subjects(metrics, sums, subjects: list[str], epoch: int, variant: str):
    """One metrics.jsonl line: mean alpha per (subject, perspective) over an epoch, from sums (S, K + 1)
    of alpha and of the problem count (rank 0 writes; metrics is None elsewhere)."""
    if metrics is None:
        return
    sums = sums.cpu().tolist()
    alpha = {s: {k: row[j] / max(row[K], 1) for j, k in enumerate(PERSPECTIVE_KEYS)} for s, row in zip(subjects, sums)}
    metrics.write(json.dumps({"kind": "subjects", "variant": variant, "epoch": epoch, "alpha": alpha,
                              "count": {s: int(row[K]) for s, row in zip(subjects, sums)}}) + "\n")
    metrics.flush()


def format_record(r: dict, total: int) -> str:
    parts = [f"step {r['step']}/{total}", f"ep {r['epoch']:.2f}", r["stage"]]
    parts += [f"{name} {r[key]:.4f}" for name, key in (("L_sft", "loss_sft"), ("L_cons", "loss_cons"),
                                                      ("L_meta", "loss_meta")) if r[key] is not None]
    parts += [f"|I| {r['n_selected']:.2f}", f"{r['tokens_per_s']:,.0f} tok/s"]
    return " | ".join(parts + ([] if r["peak_mem_gib"] is None else [f"{r['peak_mem_gib']:.1f} GiB"]))
