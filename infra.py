"""What a MIND training run needs besides the method: mind.py imports all of it from here.

Bad input, the tiny offline student, several processes (torchrun), checkpoints that resume exactly,
and the log lines. None of it is in the paper; each piece is ordinary PyTorch and can be read alone.
"""
import argparse, dataclasses, json, os, signal, sys, time
from pathlib import Path

import torch
import torch.distributed as dist

from prompts import PERSPECTIVE_KEYS

K = len(PERSPECTIVE_KEYS)


class DataError(ValueError):
    """Bad input (the data, the output folder); the message names the file and, for data, the line
    and the problem. The command line prints it alone and exits with status 2."""


def read_jsonl(path):
    """(line number, object) for each non-blank line of a JSON-lines file; a line that is not
    UTF-8 or not JSON is a DataError naming file:line."""
    with open(path, "rb") as fh:
        for n, raw in enumerate(fh, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise DataError(f"{path}:{n}: not UTF-8 (byte 0x{raw[e.start]:02x} at column "
                                f"{e.start + 1})") from None
            if not line.strip():
                continue
            try:
                yield n, json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{n}: not valid JSON ({e.msg}, column {e.colno})") from None


# ----------------------------------------------------------------------------------------------------
# The command line: one flag per field of a dataclass, grouped, each help saying where it comes from.
def flag_name(field_name: str) -> str:
    return field_name.rstrip("_").replace("_", "-")  # lambda_ -> lambda


def parse_config(cls, groups: dict, argv, description: str):
    """An instance of the dataclass `cls` from the command line; a ValueError from its checks is
    one line on stderr and exit status 2."""
    p = argparse.ArgumentParser(description=description,
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    sections = {name: p.add_argument_group(title) for name, title in groups.items()}
    for f in dataclasses.fields(cls):
        g, flag = sections[f.metadata["group"]], "--" + flag_name(f.name)
        typ = next(t for t in getattr(f.type, "__args__", (f.type,)) if t is not type(None))
        if typ is bool:
            g.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction,
                           default=f.default, help=f.metadata["help"])
        else:
            g.add_argument(flag, dest=f.name, type=typ, default=f.default,
                           help=f.metadata["help"], metavar=flag_name(f.name).upper())
    try:
        return cls(**vars(p.parse_args(argv)))
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)  # one line, no usage text
        sys.exit(2)


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
# 4. Stopping: Ctrl-C or SIGTERM asks for a stop at the next optimizer step, with a checkpoint.
class StopOnSignal:
    """A context in which SIGINT/SIGTERM set `asked` instead of killing the run; a second signal
    aborts at once. The previous handlers come back on exit."""
    def __enter__(self):
        self.asked = False
        self.previous = {s: signal.signal(s, self._ask) for s in (signal.SIGINT, signal.SIGTERM)}
        return self

    def _ask(self, *_):
        if self.asked:
            raise KeyboardInterrupt
        self.asked = True

    def asked_anywhere(self, device) -> bool:
        """True if any process was asked to stop (so that all of them stop at the same step)."""
        return bool(all_sum(torch.tensor([float(self.asked)], device=device)))

    def __exit__(self, *exc):
        for s, h in self.previous.items():
            signal.signal(s, h)


# ----------------------------------------------------------------------------------------------------
# 5. Logging: one line per interval on the progress bar, every value in metrics.jsonl.
class Tally:
    """Sums of the logged values over one log interval, in one tensor on the device, so that a
    single all-reduce adds up every process. LAYOUT names each slice; nothing else knows it."""
    LAYOUT = {"sft": 1, "cons": 1, "meta": 1, "selected": 1, "problems": 1, "tokens": 1,
              "alpha": K, "score": K, "loss_real": K}

    def __init__(self, device):
        self.sums = torch.zeros(sum(self.LAYOUT.values()), device=device)

    def add(self, l_meta, info, B: int) -> None:
        """Adds one micro-batch of B problems: the losses (means) x B, and per-problem sums."""
        zero = torch.tensor(0.0)
        scores = info["scores"] if info["scores"] is not None else torch.zeros_like(info["alpha"])
        parts = {"sft": info.get("sft", zero).item() * B, "cons": info.get("cons", zero).item() * B,
                 "meta": 0.0 if l_meta is None else l_meta.item() * B,
                 "selected": info["mask"].sum().item(), "problems": B, "tokens": info["tokens"],
                 "alpha": info["alpha"], "score": scores, "loss_real": info["l_real"]}
        flat = [torch.tensor([float(parts[name])]) if n == 1 else parts[name].float().cpu().sum(0)
                for name, n in self.LAYOUT.items()]
        self.sums += torch.cat(flat).to(self.sums.device)

    def take(self) -> dict:
        """The sums of all processes by name (floats, or lists of K), and a fresh interval."""
        values = all_sum(self.sums.clone()).tolist()
        self.sums.zero_()
        out, at = {}, 0
        for name, n in self.LAYOUT.items():
            out[name] = values[at] if n == 1 else values[at: at + n]
            at += n
        return out


class RunLog:
    """The run's progress bar, its metrics.jsonl (rank 0 writes) and the sums behind each line:
    a Tally per log interval, and alpha per (subject, perspective) per epoch."""
    def __init__(self, out: Path, writer: bool, total: int, step: int, variant: str, metanet: bool,
                 subjects: list[str], device):
        from tqdm.auto import tqdm
        self.writer, self.total, self.variant, self.metanet = writer, total, variant, metanet
        self.subjects, self.device = subjects, device
        self.tally, self.t0, self.last = Tally(device), time.time(), {}
        self.by_subject = torch.zeros(max(len(subjects), 1), K + 1, device=device)  # alpha, count
        self.metrics = open(out / "metrics.jsonl", "a") if writer else None
        self.bar = tqdm(total=total, initial=step, disable=not writer, dynamic_ncols=True)

    def add(self, l_meta, info, subjects: list) -> None:
        B = len(subjects)
        self.tally.add(l_meta, info, B)
        at = torch.tensor([self.subjects.index(s) if self.subjects else 0 for s in subjects])
        counted = torch.cat([info["alpha"], torch.ones(B, 1, device=info["alpha"].device)], 1)
        self.by_subject.index_add_(0, at.to(self.device), counted.to(self.device))  # (B, K + 1)

    def write_step(self, step: int, epoch: float, warmup: bool, lr: float, meta_lr: float) -> None:
        """One optimizer step done: the bar moves; at a log interval, one record and one line."""
        seconds = time.time() - self.t0
        self.last = make_record(self.tally.take(), step, epoch, warmup, lr, meta_lr, seconds,
                                peak_memory_gib(self.device), self.variant, self.metanet)
        self.t0 = time.time()
        if self.writer:
            self.metrics.write(json.dumps(self.last) + "\n")
            self.metrics.flush()
            self.bar.write(format_record(self.last, self.total))

    def step_done(self) -> None:
        self.bar.update(1)

    def end_epoch(self, epoch: int, write: bool) -> None:
        """An epoch ends: if `write` (and rows have subjects), one record of the mean alpha per
        (subject, perspective) over it; the sums start again either way."""
        sums = all_sum(self.by_subject.clone()).cpu().tolist() if write else None
        self.by_subject.zero_()
        if not (write and self.writer and self.subjects):
            return
        alpha = {s: {k: row[j] / max(row[K], 1) for j, k in enumerate(PERSPECTIVE_KEYS)}
                 for s, row in zip(self.subjects, sums)}
        count = {s: int(row[K]) for s, row in zip(self.subjects, sums)}
        record = {"kind": "subjects", "variant": self.variant, "epoch": epoch, "alpha": alpha,
                  "count": count}
        self.metrics.write(json.dumps(record) + "\n")
        self.metrics.flush()

    def print(self, line: str) -> None:
        if self.writer:
            self.bar.write(line)

    def close(self) -> None:
        self.bar.close()
        if self.metrics:
            self.metrics.close()


def peak_memory_gib(device):
    """The peak GPU memory since the last call, the largest over the processes; None on the CPU."""
    if device.type != "cuda":
        return None
    peak = torch.tensor([torch.cuda.max_memory_allocated(device) / 2**30], device=device)
    torch.cuda.reset_peak_memory_stats(device)
    if dist.is_initialized():
        dist.all_reduce(peak, op=dist.ReduceOp.MAX)
    return round(peak.item(), 2)


def make_record(s: dict, step, epoch, warmup, lr, meta_lr, seconds, peak_gib, variant="mind",
                metanet=True) -> dict:
    """One metrics.jsonl record from the named sums of a Tally (means per problem)."""
    n = s["problems"]
    r = {"kind": "step", "variant": variant, "step": step, "epoch": round(epoch, 3),
         "stage": "warmup" if warmup else "joint",
         "loss_sft": None if warmup else s["sft"] / n, "loss_cons": None if warmup else s["cons"] / n,
         "loss_meta": s["meta"] / n if metanet else None, "n_selected": s["selected"] / n,
         "tokens_per_s": s["tokens"] / seconds, "lr": 0.0 if warmup else lr, "meta_lr": meta_lr,
         "peak_mem_gib": peak_gib}
    for j, k in enumerate(PERSPECTIVE_KEYS):
        r[f"alpha/{k}"] = s["alpha"][j] / n
    for j, k in enumerate(PERSPECTIVE_KEYS):
        r[f"score/{k}"] = s["score"][j] / n if metanet else None
    for j, k in enumerate(PERSPECTIVE_KEYS):
        r[f"loss_real/{k}"] = s["loss_real"][j] / n
    return r


def format_record(r: dict, total: int) -> str:
    parts = [f"step {r['step']}/{total}", f"ep {r['epoch']:.2f}", r["stage"]]
    parts += [f"{name} {r[key]:.4f}" for name, key in (("L_sft", "loss_sft"), ("L_cons", "loss_cons"),
                                                      ("L_meta", "loss_meta")) if r[key] is not None]
    parts += [f"|I| {r['n_selected']:.2f}", f"{r['tokens_per_s']:,.0f} tok/s"]
    if r["peak_mem_gib"] is not None:
        parts.append(f"{r['peak_mem_gib']:.1f} GiB")
    return " | ".join(parts)
