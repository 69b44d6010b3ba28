"""What a MIND training run needs besides the method: mind.py imports all of it from here.

Bad input, the tiny offline student, several processes (torchrun), checkpoints that resume exactly,
and the log lines. None of it is in the paper; each piece is ordinary PyTorch and can be read alone.
"""
import argparse, dataclasses, hashlib, json, math, os, shutil, signal, sys, time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

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


def validate_row(row, where: str) -> None:
    """A DataError naming `where` (file:line) unless `row` has the shape mind.py trains on: id,
    problem, answer (non-empty strings), the K rationales, and optionally subject (str) and level
    (int)."""
    if not isinstance(row, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(row).__name__}")
    where += f" (problem {row.get('id', '?')!r})"
    for key, typ in (("id", str), ("problem", str), ("answer", str), ("rationales", dict)):
        if key not in row:
            raise DataError(f"{where}: missing field '{key}'")
        if not isinstance(row[key], typ) or (typ is str and not row[key].strip()):
            raise DataError(f"{where}: field '{key}' must be a non-empty {typ.__name__}")
    if "subject" in row and not (isinstance(row["subject"], str) and row["subject"].strip()):
        raise DataError(f"{where}: field 'subject' must be a non-empty str, got {row['subject']!r}")
    if "level" in row and type(row["level"]) is not int:  # 3, not "3", 3.0 or true
        raise DataError(f"{where}: field 'level' must be an int, got {row['level']!r}")
    rationales = row["rationales"]
    for key in rationales:
        if key not in PERSPECTIVE_KEYS:
            raise DataError(f"{where}: unknown perspective {key!r} (expected: "
                            f"{', '.join(PERSPECTIVE_KEYS)})")
    for key in PERSPECTIVE_KEYS:
        if key not in rationales:
            raise DataError(f"{where}: missing the {key!r} rationale (every problem needs all {K})")
        if not isinstance(rationales[key], str) or not rationales[key].strip():
            raise DataError(f"{where}: the {key!r} rationale is empty")


def demo_data_note(student: str, data: Path, n_problems: int, log=print) -> str | None:
    """Logs (and returns) a line when a real student trains on the shipped sample: that file is
    there for the tiny demo and the tests, and results on it say nothing about the paper's."""
    sample = Path(__file__).resolve().parent / "data" / "sample.jsonl"
    if student == "tiny" or not (sample.exists() and Path(data).resolve() == sample):
        return None
    note = (f"note: {data} is the {n_problems}-problem demo sample, not a training set of the "
            f"paper's size; without --data a real student trains on the shipped 497-problem "
            f"data/mind497.jsonl, or on data/mind_math.jsonl once data/build.py has written it")
    log(note)
    return note


# ----------------------------------------------------------------------------------------------------
# The command line: one flag per field of a dataclass, grouped, each help saying where it comes from.
def flag_name(field_name: str) -> str:
    return field_name.rstrip("_").replace("_", "-")  # lambda_ -> lambda


def check_config(c) -> None:
    """mind.Config's checks, run when it is made, so before any work: a ValueError of one line
    naming every flag out of range, a --variant that does not exist, or a model folder that is not
    there."""
    checks = {"lr": c.lr is None or c.lr > 0, "meta_lr": c.meta_lr > 0,
              "meta_lr_warmup": c.meta_lr_warmup > 0, "max_grad_norm": c.max_grad_norm > 0,
              "tau": c.tau > 0, "tau_student": c.tau_student > 0, "beta": 0 <= c.beta <= 1,
              "lambda_": c.lambda_ >= 0, "epochs": c.epochs is None or c.epochs >= 1,
              "warmup_epochs": c.warmup_epochs >= 0, "batch_size": c.batch_size >= 1,
              "grad_accum": c.grad_accum >= 1, "meta_grad_accum": c.meta_grad_accum >= 1,
              "lora_r": c.lora_r >= 1, "lora_alpha": c.lora_alpha >= 1,
              "lora_dropout": c.lora_dropout == 0, "meta_dim": c.meta_dim >= 1,
              "meta_heads": c.meta_heads >= 1, "max_len": c.max_len >= 16,
              "max_tokens_per_pass": c.max_tokens_per_pass in (None, -1, 0)
                                     or c.max_tokens_per_pass >= c.max_len,
              "loss_chunk": c.loss_chunk >= 1, "log_every": c.log_every >= 1,
              "max_steps": c.max_steps >= 0, "seed": 0 <= c.seed < 2**32,
              "device": c.device in ("auto", "cpu", "cuda")}
    bad = [f"--{flag_name(k)} {getattr(c, k)}" for k, ok in checks.items()
           if not ok or (isinstance(getattr(c, k), float) and not math.isfinite(getattr(c, k)))]
    if bad:
        raise ValueError(f"out of range: {', '.join(bad)} (see --help)")
    if c.meta_dim % c.meta_heads:
        raise ValueError(f"--meta-dim {c.meta_dim} is not a multiple of --meta-heads "
                         f"{c.meta_heads} (see --help)")
    name, _, arg = c.variant.partition(":")
    if name == "single" and arg not in PERSPECTIVE_KEYS:
        raise ValueError(f"--variant {c.variant}: single:<perspective> takes one of "
                         f"{', '.join(PERSPECTIVE_KEYS)}")
    if name == "topk" and arg not in [str(k) for k in range(1, K + 1)]:
        raise ValueError(f"--variant {c.variant}: topk:<K> takes K = 1 to {K}")
    plain = ("mind", "uniform", "no-inertia", "no-synergy")
    if name not in ("single", "topk") and (arg or name not in plain):
        raise ValueError(f"--variant {c.variant}: expected mind, single:<perspective>, "
                         f"uniform, no-inertia, no-synergy or topk:<K>")
    check_model_path(c.student, "--student")
    if c.encoder is not None:
        check_model_path(c.encoder, "--encoder")


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
    p.error = fail  # argparse's own errors (a flag that is not a number...) in the same one line
    try:
        return cls(**vars(p.parse_args(argv)))
    except ValueError as e:
        fail(e)


def fail(message) -> None:
    """One line on stderr, no usage text and no traceback (under torchrun from rank 0 only); exit
    status 2."""
    if os.environ.get("RANK", "0") == "0":
        print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


# ----------------------------------------------------------------------------------------------------
# Models by name: a folder, or a Hugging Face Hub id. Each way of not being there is one line.
def check_model_path(name: str, flag: str) -> None:
    """A ValueError if `name` is meant as a folder (it starts with '.', '/' or '~', has more than
    the one '/' of org/model, or a folder named by its first parts exists) and is not one."""
    path = Path(name).expanduser()
    if name == "tiny" or path.is_dir():
        return
    if path.exists():
        raise ValueError(f"{flag} {name}: not a folder (a model is a folder with config.json)")
    meant = (name.startswith((".", "/", "~")) or name.count("/") > 1  # never so in a hub id
             or any(sep and sep != "/" and sep in name for sep in (os.sep, os.altsep))
             or (path.parent != Path(".") and path.parent.exists()))
    if meant or not name.strip():
        raise ValueError(f"{flag} {name}: no such folder")


def from_hub(load, name: str, flag: str, **kwargs):
    """load(name, **kwargs), e.g. AutoTokenizer.from_pretrained; a model that is neither a folder
    nor on the Hub, or that cannot be fetched here, is a DataError of one line saying what to do.
    Any other error passes through as it is."""
    from huggingface_hub import constants, errors
    try:
        return load(name, **kwargs)
    except OSError as e:
        chain, c = [], e
        while c is not None and len(chain) < 20:
            chain, c = chain + [c], c.__cause__ or c.__context__
        if any(isinstance(c, errors.RepositoryNotFoundError) for c in chain):
            raise DataError(f"{flag} {name}: no such model on the Hugging Face Hub, and no such "
                            f"folder (a private or gated model needs `hf auth login`)") from None
        if not any(isinstance(c, (errors.LocalEntryNotFoundError, errors.OfflineModeIsEnabled,
                                  ConnectionError)) for c in chain):
            raise
        why = ("HF_HUB_OFFLINE is set" if constants.HF_HUB_OFFLINE
               else "the Hugging Face Hub cannot be reached from here")
        raise DataError(f"{flag} {name}: not a local folder, {why}, and the model is not in the "
                        f"local cache: pass the folder of a downloaded model, or fetch it once "
                        f"where there is network (`hf download {name}`) and run with "
                        f"HF_HUB_OFFLINE=1") from None


# ----------------------------------------------------------------------------------------------------
# 1. The tiny student of `python mind.py --student tiny` and of the tests.
def build_tiny(texts: list[str], seed: int, max_len: int = 1024, save_to: Path | None = None,
               pretrain: tuple[int, float] = (0, 0.0)):
    """A 2-layer GPT-2 and a static-embedding Sentence-Transformer over one byte-level BPE tokenizer
    trained on `texts`: the whole method runs offline, on a CPU, in seconds. pretrain = (steps, lr):
    the GPT-2 first learns the language of `texts` as a plain language model (all its weights,
    batches of 16 random 128-token windows), so that it starts as a student that can read the
    data, not from random weights. With `save_to`, the model and tokenizer are also saved there
    (from_pretrained format)."""
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
    steps, lr = pretrain
    if steps:
        ids = torch.tensor([t for text in texts for t in tok(text)["input_ids"] + [eos]])
        opt, g = torch.optim.AdamW(model.parameters(), lr=lr), torch.Generator().manual_seed(seed)
        for _ in range(steps):
            starts = torch.randint(0, len(ids) - 129, (16,), generator=g).tolist()
            batch = torch.stack([ids[s: s + 128] for s in starts])                   # (16, 128)
            logits = model(input_ids=batch, attention_mask=torch.ones_like(batch)).logits
            F.cross_entropy(logits[:, :-1].flatten(0, 1), batch[:, 1:].flatten()).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
    if save_to is not None:
        model.save_pretrained(save_to)
        tok.save_pretrained(save_to)
    return model, tok, encoder


def get_peft_model(model, lora_config):
    """peft.get_peft_model, less one warning. peft reads `model.is_gradient_checkpointing`, which
    transformers 5 keeps as a deprecated alias that warns (FutureWarning) on every read; the read
    is peft's, not ours, so only that warning is silenced, and only here."""
    import warnings
    from peft import get_peft_model as peft_get_peft_model
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.* is deprecated",
                                category=FutureWarning)
        return peft_get_peft_model(model, lora_config)


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


def broadcast_from_rank0(tensors) -> None:
    if dist.is_initialized():
        for t in tensors:
            dist.broadcast(t.data, 0)


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
# 3. Checkpoints: LoRA adapter (save_pretrained), MetaNet, both optimizers, progress, what defines
# the run, and per rank its RNG states and the gradients accumulated so far (LoRA's and MetaNet's),
# so that --resume continues exactly, even from between two optimizer steps.
#
# A resumed run must be the run that wrote the checkpoint: every Config value that changes the
# numbers, the data's content and the tokenizer are saved, and --resume refuses any difference. The
# values below change only the cost (or where things go), and a resume may change them freely.
COST_ONLY = {"out", "resume", "max_steps", "log_every"}  # and Config's "engineering" group


def run_identity(cfg, data, **resolved) -> dict:
    """{setting: value} for what defines the run: the Config values that change the numbers, the
    data file by its content, and `resolved` (lr, epochs, encoder: defaults that depend on the
    student; tokenizer), which prepare() knows only once the student is loaded."""
    out = {"--data": f"sha256 {file_sha256(data)}", "data file": str(data)}
    for f in dataclasses.fields(cfg):
        if f.metadata["group"] != "engineering" and f.name not in COST_ONLY | {"data"}:
            out["--" + flag_name(f.name)] = getattr(cfg, f.name)
    for name, value in resolved.items():
        out["--" + name if name != "tokenizer" else name] = value
    if "tokenizer" in out:
        out["tokenizer"] = tokenizer_id(out["tokenizer"])
    for flag in ("--student", "--encoder"):  # a folder by its full path: ./m and /abs/m alike
        if isinstance(out.get(flag), str) and Path(out[flag]).expanduser().is_dir():
            out[flag] = str(Path(out[flag]).expanduser().resolve())
    if not resolved:  # before the student is loaded: only what is known for sure
        for flag in ("--lr", "--epochs", "--encoder"):
            out.pop(flag)
    return out


def file_sha256(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(1 << 20):
            h.update(block)
    return h.hexdigest()[:16]


def tokenizer_id(tok) -> str:
    vocab = json.dumps(sorted(tok.get_vocab().items()), ensure_ascii=False)
    return f"{len(tok)} tokens, sha256 {hashlib.sha256(vocab.encode()).hexdigest()[:16]}"


def saved_identity(state: dict) -> dict:
    return state.get("run", {"--variant": state.get("variant", "mind")})  # older checkpoints


def check_same_run(path: Path, saved: dict, now: dict) -> None:
    """A DataError of one line listing each setting whose saved value differs from this run's;
    only the settings both know are compared (`now` is partial before the student is loaded)."""
    diff = [f"{k} saved {saved[k]}, now {now[k]}" for k in now
            if k in saved and saved[k] != now[k] and k != "data file"]
    diff = [d + f" ({saved['data file']} then, {now['data file']} now)" * d.startswith("--data ")
            for d in diff]
    if diff:
        raise DataError(f"{path} is from another run: {'; '.join(diff)}. Resume with its "
                        f"settings, or start afresh in another --out")


def save_checkpoint(out: Path, step, epoch, micro, peft_model, metanet, opt, meta_opt, world,
                    identity: dict):
    tmp, final = out / "checkpoint.tmp", out / f"checkpoint-{step:06d}"
    if rank() == 0:
        shutil.rmtree(tmp, ignore_errors=True)  # what a save that crashed left behind
        tmp.mkdir(parents=True)
        peft_model.save_pretrained(tmp / "adapter")
        torch.save({"step": step, "epoch": epoch, "micro": micro, "world": world,
                    "variant": identity["--variant"], "run": identity,
                    "metanet": metanet.state_dict(), "opt": opt.state_dict(),
                    "meta_opt": meta_opt.state_dict()}, tmp / "state.pt")
    barrier()
    torch.save({"cpu_rng": torch.get_rng_state(),
                "cuda_rng": torch.cuda.get_rng_state() if torch.cuda.is_available() else torch.empty(0),
                "meta_grads": [p.grad if p.grad is not None else torch.zeros_like(p)
                               for p in metanet.parameters()],
                "lora_grads": {n: p.grad for n, p in peft_model.named_parameters()
                               if p.grad is not None}},
               tmp / f"rank{rank()}.pt")
    barrier()
    if rank() == 0:
        if final.exists():  # a damaged checkpoint of this step, which --resume skipped
            shutil.rmtree(final)
        os.replace(tmp, final)  # atomic: a checkpoint folder exists only when complete
    barrier()
    return final


def claim_out(out: Path, resume: bool) -> None:
    """Makes the output folder, refusing one that holds checkpoints unless the run resumes them."""
    if not resume and any(out.glob("checkpoint-[0-9]*")):
        raise DataError(f"{out} already holds checkpoints: pass --resume to continue, or choose "
                        f"another --out")
    out.mkdir(parents=True, exist_ok=True)


def save_final(out: Path, peft_model, metanet, checkpoint: Path) -> None:
    """The run's latest adapter and MetaNet beside its checkpoints (rank 0); the adapter folder is
    replaced whole, so it is never a mix of two saves."""
    if rank() == 0:
        shutil.rmtree(out / "adapter.tmp", ignore_errors=True)
        peft_model.save_pretrained(out / "adapter.tmp")
        shutil.rmtree(out / "adapter", ignore_errors=True)
        os.replace(out / "adapter.tmp", out / "adapter")
        torch.save(metanet.state_dict(), out / "metanet.tmp")
        os.replace(out / "metanet.tmp", out / "metanet.pt")
        print(f"saved {checkpoint}; latest adapter in {out / 'adapter'}")


class Damaged(Exception):
    """What is wrong with a checkpoint folder: a file missing or unreadable."""


def onto(device):
    """torch.load's map_location for a run on `device`: a tensor saved from any GPU comes to this
    run's device (so a checkpoint written on a GPU resumes on a CPU, and under torchrun each rank
    reads onto its own GPU); one saved from the CPU stays there, as AdamW keeps its step counts."""
    return lambda storage, saved_on: storage if saved_on == "cpu" else storage.to(device=device)


def read_checkpoint(path: Path, world: int, device) -> dict:
    """One checkpoint's files as this rank needs them, read onto `device`; Damaged, saying what is
    wrong, if one is missing or cannot be read."""
    from safetensors.torch import load_file

    def read(name, reader):
        if not (path / name).is_file():
            raise Damaged(f"{name} is missing")
        try:
            return reader(path / name)
        except Exception as e:  # truncated, or not what we wrote: the readers' errors vary
            why = str(e).strip().splitlines()[0][:120] if str(e).strip() else type(e).__name__
            raise Damaged(f"{name} is unreadable, truncated or damaged ({why})") from None

    torch_load = lambda f: torch.load(f, map_location=onto(device), weights_only=True)
    state = read("state.pt", torch_load)
    if not isinstance(state, dict) or not {"step", "epoch", "micro", "world", "metanet", "opt",
                                           "meta_opt"} <= state.keys():
        raise Damaged("state.pt does not hold what save_checkpoint writes")
    if state.get("world") != world:  # before the rank files: another number of them is expected
        raise DataError(f"{path}: saved by {state.get('world')} process(es), resumed with {world}; "
                        f"use the same number")
    return {"path": path, "state": state, "rank": read(f"rank{rank()}.pt", torch_load),
            "adapter": read("adapter/adapter_model.safetensors",
                            lambda f: load_file(f, device=str(device)))}


def find_checkpoint(out: Path, world: int, device, identity: dict, log=print) -> dict | None:
    """The newest checkpoint in `out` that can be read (by every rank), checked against the
    run's identity as far as it is known; a line for each damaged one on the way."""
    ckpts = sorted(out.glob("checkpoint-[0-9]*"), reverse=True)
    if not ckpts:
        log(f"--resume: no checkpoint in {out} yet, so the run starts from the beginning")
    skipped = []
    for path in ckpts:
        try:
            ck, bad = read_checkpoint(path, world, device), 0.0
        except Damaged as e:  # said once, or by the rank whose own file it is
            if rank() == 0 or str(e).startswith(f"rank{rank()}.pt"):
                print(f"warning: {path} cannot be resumed: {e}", flush=True)
            ck, bad = None, 1.0
        if not all_sum(torch.tensor([bad], device=device)).item():  # readable on every rank
            check_same_run(path, saved_identity(ck["state"]), identity)
            return ck | {"skipped": skipped}
        skipped.append(path.name)
    if ckpts:
        raise DataError(f"{out}: none of its {len(ckpts)} checkpoint(s) can be resumed (see the "
                        f"warnings above); move them away to start afresh, or choose another --out")
    return None


def load_checkpoint(ck: dict, identity: dict, peft_model, metanet, opt, meta_opt, log=print):
    """Puts a checkpoint from find_checkpoint into the run, after checking that the now complete
    identity matches; returns (step, epoch, micro-batch) to continue from."""
    from peft import set_peft_model_state_dict
    path, state, mine = ck["path"], ck["state"], ck["rank"]
    check_same_run(path, saved_identity(state), identity)
    set_peft_model_state_dict(peft_model, ck["adapter"])
    metanet.load_state_dict(state["metanet"])
    opt.load_state_dict(state["opt"])
    meta_opt.load_state_dict(state["meta_opt"])
    for p, g in zip(metanet.parameters(), mine["meta_grads"]):
        p.grad = g.to(p.device).clone()
    lora_grads = mine.get("lora_grads", {})
    for n, p in peft_model.named_parameters():
        if p.requires_grad:
            p.grad = lora_grads[n].to(p.device).clone() if n in lora_grads else None
    torch.set_rng_state(mine["cpu_rng"].cpu())
    if torch.cuda.is_available() and mine["cuda_rng"].numel():
        torch.cuda.set_rng_state(mine["cuda_rng"].cpu())
    trim_metrics(path.parent / "metrics.jsonl", state["step"], state["epoch"])
    older = f": the newest complete checkpoint ({', '.join(ck['skipped'])} cannot be resumed)"
    log(f"resumed from {path} (step {state['step']}, epoch {state['epoch']}, micro-batch "
        f"{state['micro']}){older if ck['skipped'] else ''}")
    return state["step"], state["epoch"], state["micro"]


def trim_metrics(path: Path, step: int, epoch: int) -> None:
    """Drops the records that a run wrote after the checkpoint it is resumed from (it stopped on a
    NaN, was killed, or its newer checkpoint was damaged), so that each step is logged once."""
    if rank() != 0 or not path.exists():
        return
    keep = []
    for line in path.read_text().splitlines(keepends=True):
        try:
            r = json.loads(line)
        except json.JSONDecodeError:  # a line cut short by a crash
            continue
        done = r.get("epoch", 0) <= epoch if r.get("kind") == "subjects" else r.get("step", 0) <= step
        if done:
            keep.append(line if line.endswith("\n") else line + "\n")
    path.with_suffix(".tmp").write_text("".join(keep))
    os.replace(path.with_suffix(".tmp"), path)


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


class Diverged(Exception):
    """A loss became NaN or infinite. The run stops before the optimizer step that would spread it,
    and nothing of the broken state is saved: the last checkpoint stays the last good one."""


def stop_if_diverged(step: int, l_meta, info: dict, device, out: Path) -> None:
    """Raises Diverged on every process if L_sft, L_cons or L_meta of this micro-batch is not
    finite on any of them, naming the step (the optimizer step it belongs to) and the loss."""
    losses = {"L_sft": info.get("sft"), "L_cons": info.get("cons"), "L_meta": l_meta}
    losses = {k: v.detach().float().reshape(()) for k, v in losses.items() if v is not None}
    if not losses:
        return
    bad = all_sum((~torch.isfinite(torch.stack(list(losses.values())))).float().to(device))
    if not bad.any():
        return
    named = [f"{k} is {v.item()}" if not math.isfinite(v.item()) else f"{k} is not finite on "
             f"another process" for (k, v), b in zip(losses.items(), bad.tolist()) if b]
    ckpts = sorted(out.glob("checkpoint-[0-9]*"))
    last = (f"the last checkpoint, {ckpts[-1]}, is from before it: --resume continues from there"
            if ckpts else "no checkpoint had been written yet")
    raise Diverged(f"step {step}: {', '.join(named)}; the run stops here and saves nothing of this "
                   f"state; {last}")


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
        """Adds one micro-batch of B problems: the losses (means) x B, and per-problem sums. In the
        warmup the student neither selects nor learns: the log reads L_sft = L_cons = 0, |I| = K
        and alpha = 0."""
        warmup, zero = info.get("warmup", False), torch.tensor(0.0)
        scores = info["scores"] if info["scores"] is not None else torch.zeros_like(info["alpha"])
        sft, cons = (zero, zero) if warmup else (info.get("sft", zero), info.get("cons", zero))
        parts = {"sft": sft.item() * B, "cons": cons.item() * B,
                 "meta": 0.0 if l_meta is None else l_meta.item() * B,
                 "selected": K * B if warmup else info["selected"].sum().item(), "problems": B,
                 "tokens": info["tokens"], "alpha": info["alpha"] * (not warmup), "score": scores,
                 "loss_real": info["l_real"]}
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

    def event(self, line: str, **record) -> None:
        """A line on the progress bar and the same event as one metrics.jsonl record."""
        self.print(line)
        if self.writer:
            self.metrics.write(json.dumps(record | {"message": line}) + "\n")
            self.metrics.flush()

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
