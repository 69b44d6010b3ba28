"""MIND: capability-aware, multi-perspective chain-of-thought distillation, in one file.

Cui et al., "MIND: From Passive Mimicry to Active Reasoning through Capability-Aware Multi-Perspective
CoT Distillation", ACL 2026. The method (Section 3) in four lines:
  every problem x has K=8 teacher rationales r_k, one per reasoning perspective (3.1, prompts.py);
  MetaNet (3.3.1) scores how learnable each r_k is for the student right now, calibrated on the
  student's real losses (Eq. 1); the student learns from the paths scoring within beta of the best,
  weighted by alpha (Eq. 2), while their answer distributions are pulled together (Eq. 3); Eq. 4 sums them.

Where we go beyond or against the letter of the paper (every value it leaves open is "ours" in Config):
  1. Scores are squashed by a sigmoid into (0, 1) so that the threshold s_k >= beta * max(s) is meaningful.
  2. L_real is the mean token cross-entropy of path k (rationale + answer suffix, prompt masked).
  3. A fixed answer suffix closes every rationale (prompts.answer_suffix), so P(y | x, r_i) in Eq. 3 is
     read at the same answer token ids on every path; JSD is averaged over those answer tokens.
  4. MetaNet gets a residual connection and LayerNorm around its self-attention (standard practice).
  5. The paper gives no schedule: learning rates are constant, gradients clipped at 1.0.
Engineering that changes no number: the student runs in passes of bounded size with paths packed
back to back, and Eq. 4's gradient is assembled pass by pass, exactly (micro_step explains how).

Usage:
  python mind.py --student tiny                                     # offline CPU demo, about a minute
  python mind.py --student Qwen/Qwen2.5-1.5B                        # one GPU, Table 8 settings
  torchrun --nproc_per_node 2 mind.py --student Qwen/Qwen2.5-1.5B   # two GPUs, as in the paper
  python mind.py --student Qwen/Qwen2.5-1.5B --variant no-inertia   # an ablation of the paper (README)
"""
import argparse, dataclasses, hashlib, itertools, json, math, os, signal, sys, time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from infra import (DataError, all_mean_grads, all_sum, build_tiny, epoch_batches, format_record, load_checkpoint,
                   log_stats, make_record, peak_memory_gib, rank, record_subjects, save_checkpoint, setup_distributed)
from prompts import PERSPECTIVE_KEYS, answer_suffix, plain_prompt, student_prompt

K = len(PERSPECTIVE_KEYS)
HERE = Path(__file__).resolve().parent
TINY_LR = 3e-3  # ours: the random 2-layer demo student learns visibly in a minute only with a large LR


# ----------------------------------------------------------------------------------------------------
# Configuration. Every default says where it comes from: [Table 8] / [paper] or [ours: why].
def opt(default, help):
    return field(default=default, metadata={"help": help})


@dataclass
class Config:
    student: str = opt("Qwen/Qwen2.5-1.5B", "hub id or folder of a causal LM, or 'tiny' for the offline "
                       "demo [paper 4.1: Qwen2.5-1.5B, Qwen2.5-7B, Llama3.1-8B]")
    data: str | None = opt(None, "JSONL of problems with 8 rationales [default: data/mind_math.jsonl from "
                           "data/build.py if present, else the shipped data/sample.jsonl]")
    encoder: str | None = opt(None, "frozen Sentence-BERT, hub id or folder [paper 3.3.1 names no checkpoint; "
                              "ours: sentence-transformers/all-MiniLM-L6-v2, 'tiny' with --student tiny]")
    out: str = opt("runs/mind", "output folder: checkpoints, metrics.jsonl, final adapter")
    epochs: int | None = opt(None, "student epochs after the warmup [Table 8: 8 for 1.5B, 6 for 7B/8B]")
    lr: float | None = opt(None, "student learning rate [Table 8: 5e-5 for 1.5B, 1e-4 for 7B/8B; ours: 3e-3 "
                           "for the tiny demo]")
    batch_size: int = opt(4, "problems per device per micro-step, each with K=8 paths [Table 8]")
    grad_accum: int = opt(4, "student gradient accumulation [Table 8]")
    warmup_epochs: int = opt(1, "MetaNet-only epochs before joint training [Table 8]")
    meta_lr_warmup: float = opt(1e-4, "MetaNet learning rate during warmup [Table 8]")
    meta_lr: float = opt(5e-5, "MetaNet learning rate during calibration [Table 8]")
    meta_grad_accum: int = opt(16, "MetaNet gradient accumulation while calibrating [ours: the paper asks "
                               "for more than the student's; 4x]")
    tau: float = opt(1.0, "temperature of Eq. 1 [ours: neutral; the minimiser s = c - L_real does not depend on it]")
    tau_student: float = opt(0.1, "temperature of alpha [ours: scores lie in (0,1), so 1.0 would give "
                             "near-uniform alpha]")
    beta: float = opt(0.9, "tolerance of I_dyn: keep s_k >= beta*max(s) [ours: paths within 10%% of the best]")
    lambda_: float = opt(1.0, "weight of L_cons in Eq. 4 [ours: JSD <= ln 2 keeps the term at CE scale]")
    lora_r: int = opt(16, "LoRA rank [ours: common default]")
    lora_alpha: int = opt(32, "LoRA alpha [ours: 2 x rank]")
    lora_dropout: float = opt(0.0, "LoRA dropout [ours: the paper gives none; 0 was faster and smaller on an H200 "
                              "(1.5B, 512 tokens: 0.401 -> 0.394 s/step, 25.2 -> 22.5 GiB) and keeps micro_step's "
                              "two passes over a path identical, which its exact gradient relies on]")
    meta_dim: int = opt(256, "MetaNet width [ours]")
    meta_heads: int = opt(4, "MetaNet self-attention heads [ours]")
    max_len: int = opt(1024, "max tokens per path; longer rationales are cut, the answer suffix kept [ours]")
    max_tokens_per_pass: int = opt(3072, "tokens in one forward pass of the student, at least --max-len: bounds GPU "
                                   "memory whatever MetaNet selects; the result does not depend on it [ours: "
                                   "Qwen2.5-1.5B keeps 3.4 MiB per token for backward, so about 17 GiB in all]")
    packing: bool = opt(True, "put a pass's paths back to back in one row (no padding; varlen attention on CUDA) "
                        "[ours: speed]")
    loss_chunk: int = opt(1024, "rows of logits alive at once in the per-path loss [ours: memory]")
    grad_checkpointing: bool | None = opt(None, "recompute activations in the backward pass: less memory, about a "
                                          "third more compute on the paths with gradients [ours: default on for "
                                          "students of 4B+ parameters (7B/8B), off below]")
    device: str = opt("auto", "auto (CUDA if there is one), cpu or cuda")
    deterministic: bool = opt(False, "deterministic kernels (torch.use_deterministic_algorithms): runs repeat "
                              "bit for bit on a GPU too, slower [ours]")
    max_steps: int = opt(0, "stop (and checkpoint) after this many optimizer steps in all; 0 = no limit")
    log_every: int = opt(1, "optimizer steps between log lines")
    seed: int = opt(0, "random seed")
    resume: bool = opt(False, "continue from the latest checkpoint in --out")
    variant: str = opt("mind", "mind, or an ablation of the paper: single:<perspective> (Table 1 'w/o fusion'), "
                       "uniform (all 8 paths, alpha 1/8), no-inertia (Fig. 7a: alpha from the student's losses), "
                       "no-synergy (Fig. 7b: MetaNet without self-attention), topk:<1-8> (Fig. 6)")

    def __post_init__(self):
        checks = {"beta": 0 <= self.beta <= 1, "tau": self.tau > 0, "tau_student": self.tau_student > 0,
                  "batch_size": self.batch_size >= 1, "grad_accum": self.grad_accum >= 1,
                  "meta_grad_accum": self.meta_grad_accum >= 1, "lambda_": self.lambda_ >= 0,
                  "max_len": self.max_len >= 16, "loss_chunk": self.loss_chunk >= 1,
                  "max_tokens_per_pass": self.max_tokens_per_pass >= self.max_len,
                  "device": self.device in ("auto", "cpu", "cuda")}
        bad = [f"--{k.rstrip('_').replace('_', '-')} {getattr(self, k)}" for k, ok in checks.items() if not ok]
        if bad:
            raise ValueError(f"out of range: {', '.join(bad)} (see --help)")
        name, _, arg = self.variant.partition(":")
        if name == "single" and arg not in PERSPECTIVE_KEYS:
            raise ValueError(f"--variant {self.variant}: single:<perspective> takes one of {', '.join(PERSPECTIVE_KEYS)}")
        if name == "topk" and arg not in [str(k) for k in range(1, K + 1)]:
            raise ValueError(f"--variant {self.variant}: topk:<K> takes K = 1 to {K}")
        if name not in ("single", "topk") and (arg or name not in ("mind", "uniform", "no-inertia", "no-synergy")):
            raise ValueError(f"--variant {self.variant}: expected mind, single:<perspective>, uniform, no-inertia, "
                             f"no-synergy or topk:<K>")

    @property
    def metanet_used(self) -> bool:  # the variants without MetaNet skip its warmup and Eq. 1
        return not self.variant.startswith("single:") and self.variant not in ("uniform", "no-inertia")


def parse_args(argv=None) -> Config:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    for f in dataclasses.fields(Config):
        flag = "--" + f.name.rstrip("_").replace("_", "-")  # lambda_ -> --lambda
        typ = next(t for t in getattr(f.type, "__args__", (f.type,)) if t is not type(None))
        if typ is bool:
            p.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=f.default, help=f.metadata["help"])
        else:
            p.add_argument(flag, dest=f.name, type=typ, default=f.default, help=f.metadata["help"],
                           metavar=f.name.rstrip("_").upper())
    try:
        return Config(**vars(p.parse_args(argv)))
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)  # one line, no usage text
        sys.exit(2)


# ----------------------------------------------------------------------------------------------------
# 1. Data (Section 3.1): one JSON object per line, {"id", "problem", "answer", "rationales": {key: text}}.
def load_data(path) -> list[dict]:
    rows, seen = [], {}
    with open(path, encoding="utf-8") as fh:
        for n, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{n}: not valid JSON ({e.msg}, column {e.colno})") from None
            validate_row(row, f"{path}:{n}")
            if row["id"] in seen:
                raise DataError(f"{path}:{n} (problem {row['id']!r}): id already used on line {seen[row['id']]}")
            seen[row["id"]] = n
            rows.append(row)
    if not rows:
        raise DataError(f"{path}: no problems in the file")
    return rows


def validate_row(row, where: str) -> None:
    if not isinstance(row, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(row).__name__}")
    where += f" (problem {row.get('id', '?')!r})"
    for key, typ in (("id", str), ("problem", str), ("answer", str), ("rationales", dict)):
        if key not in row:
            raise DataError(f"{where}: missing field '{key}'")
        if not isinstance(row[key], typ) or (typ is str and not row[key].strip()):
            raise DataError(f"{where}: field '{key}' must be a non-empty {typ.__name__}")
    rationales = row["rationales"]
    for key in rationales:
        if key not in PERSPECTIVE_KEYS:
            raise DataError(f"{where}: unknown perspective {key!r} (expected: {', '.join(PERSPECTIVE_KEYS)})")
    for key in PERSPECTIVE_KEYS:
        if key not in rationales:
            raise DataError(f"{where}: missing the {key!r} rationale (every problem needs all {K})")
        if not isinstance(rationales[key], str) or not rationales[key].strip():
            raise DataError(f"{where}: the {key!r} rationale is empty")


# ----------------------------------------------------------------------------------------------------
# 2. Frozen Sentence-BERT (3.3.1, "Feature Alignment"): h_x and h_{r_k}, computed once and cached.
@torch.no_grad()
def embed(encoder, rows, cache: Path, encoder_id: str):
    """Returns h_x (N, D) and h_r (N, K, D) in fp32 on the CPU; reuses `cache` if it holds these texts."""
    texts = [r["problem"] for r in rows] + [r["rationales"][k] for r in rows for k in PERSPECTIVE_KEYS]
    key = hashlib.sha256("\0".join([encoder_id, *texts]).encode()).hexdigest()
    if cache.exists() and (c := torch.load(cache, weights_only=True))["key"] == key:
        return c["h_x"], c["h_r"]
    emb = encoder.encode(texts, batch_size=64, convert_to_tensor=True).float().cpu()
    h_x, h_r = emb[: len(rows)], emb[len(rows):].view(len(rows), K, -1)
    if rank() == 0:
        cache.parent.mkdir(parents=True, exist_ok=True)
        torch.save({"key": key, "h_x": h_x, "h_r": h_r}, cache.with_suffix(".tmp"))
        os.replace(cache.with_suffix(".tmp"), cache)
    return h_x, h_r


# ----------------------------------------------------------------------------------------------------
# 3. MetaNet, the "teaching assistant" (3.3.1): align -> synergy -> K score heads.
class MetaNet(nn.Module):
    def __init__(self, d_enc: int, d: int = 256, heads: int = 4, k: int = K, synergy: bool = True):
        super().__init__()
        self.align = nn.Sequential(nn.Linear(2 * d_enc, d), nn.GELU(), nn.Linear(d, d))  # MLP_align
        if synergy:  # --variant no-synergy (Fig. 7b) drops it: each head then scores its path alone
            self.attn = nn.MultiheadAttention(d, heads, batch_first=True)                # SelfAttn
            self.norm = nn.LayerNorm(d)
        self.heads = nn.ModuleList(nn.Sequential(nn.Linear(d, d), nn.GELU(), nn.Linear(d, 1)) for _ in range(k))

    def forward(self, h_x, h_r):                                    # h_x (B, D), h_r (B, K, D)
        e = self.align(torch.cat([h_x[:, None].expand_as(h_r), h_r], -1))  # e_k = MLP([h_x; h_rk]) (B, K, d)
        z = self.norm(e + self.attn(e, e, e, need_weights=False)[0]) if hasattr(self, "attn") else e  # Z = SelfAttn(E)
        s = torch.cat([head(z[:, k]) for k, head in enumerate(self.heads)], -1)  # phi_k heads     (B, K)
        return torch.sigmoid(s)  # in (0, 1): the threshold beta * max(s) needs positive scores


# ----------------------------------------------------------------------------------------------------
# 4. The equations, as pure functions (B problems, K paths, A answer tokens, V vocabulary).
def metanet_loss(scores, student_losses, tau: float):
    """Eq. 1: KL(pi_tau(s) || pi_tau(-L_real)), mean over B. scores, student_losses: (B, K).

    Written out rather than with F.kl_div, whose (input, target) order is the reverse of the paper's.
    L_real is a target: it is detached, so Eq. 1 moves MetaNet only."""
    log_p = F.log_softmax(scores.float() / tau, -1)                          # pi_tau(s)        (B, K)
    log_q = F.log_softmax(-student_losses.detach().float() / tau, -1)        # pi_tau(-L_real)  (B, K)
    return (log_p.exp() * (log_p - log_q)).sum(-1).mean()


def select_perspectives(scores, beta: float, tau_student: float):
    """I_dyn = {k : s_k >= beta * max(s)} and alpha = softmax(s / tau_student) over I_dyn, 0 elsewhere.

    scores (B, K) -> mask (B, K) bool, alpha (B, K), both constants. The argmax is always selected."""
    scores = scores.detach()  # alpha is a weight, not a path for gradients: MetaNet learns from Eq. 1 only
    mask = scores >= beta * scores.max(-1, keepdim=True).values
    alpha = torch.softmax((scores / tau_student).masked_fill(~mask, float("-inf")), -1)
    return mask, alpha


def variant_weights(variant: str, scores, l_real, beta: float, tau: float, tau_student: float):
    """I_dyn and alpha (B, K) for the paper's ablations (--variant); MIND itself is select_perspectives.
    scores: MetaNet's (None without MetaNet); l_real (B, K): the student's current losses."""
    name, _, arg = variant.partition(":")
    if name == "single":  # Table 1 "w/o fusion": one perspective, alpha = 1
        mask = torch.zeros_like(l_real, dtype=torch.bool)
        mask[:, PERSPECTIVE_KEYS.index(arg)] = True
        return mask, mask.float()
    if name == "uniform":  # every path, the same weight: multi-path distillation without capability awareness
        return torch.ones_like(l_real, dtype=torch.bool), torch.full_like(l_real, 1 / K)
    if name == "no-inertia":  # Fig. 7a: the instantaneous losses decide, s_k = exp(-L_real_k)
        s = torch.exp(-l_real)
        mask = s >= beta * s.max(-1, keepdim=True).values
        return mask, torch.softmax((-l_real / tau).masked_fill(~mask, float("-inf")), -1)  # alpha ~ exp(-L/tau)
    if name == "topk":  # Fig. 6: the K best scores instead of the beta threshold
        s = scores.detach()
        mask = torch.zeros_like(s, dtype=torch.bool).scatter(-1, s.topk(int(arg), -1).indices, True)
        return mask, torch.softmax((s / tau_student).masked_fill(~mask, float("-inf")), -1)
    return select_perspectives(scores, beta, tau_student)  # mind, no-synergy


def sft_loss(alpha, path_losses):
    """Eq. 2: sum_{k in I_dyn} alpha_k * L_CE(r_k | x), mean over B. alpha, path_losses: (B, K).
    Paths outside I_dyn (alpha = 0) contribute nothing, whatever their loss slot holds."""
    return torch.where(alpha > 0, alpha * path_losses, 0.0).sum(-1).mean()


def consistency_loss(answer_logprobs, alpha, answer_mask=None):
    """Eq. 3: sum over selected pairs i<j of alpha_i alpha_j JSD(P_i || P_j), mean over B.

    answer_logprobs (B, K, A, V): log P(y_a | x, r_k, y_<a) at the answer tokens; alpha (B, K);
    answer_mask (B, A) marks real answer tokens (answers differ in length). JSD is in nats, averaged
    over the answer tokens, computed in fp32 with the mixture taken in log space. Slots with alpha = 0
    and masked tokens are replaced by a uniform distribution first, so whatever they hold cannot
    turn into NaN (0 * inf) in the forward or the backward pass."""
    B, k, A, V = answer_logprobs.shape
    mask = torch.ones(B, A, dtype=torch.bool, device=alpha.device) if answer_mask is None else answer_mask.bool()
    keep = (alpha > 0)[:, :, None, None] & mask[:, None, :, None]                       # (B, K, A, 1)
    lp = torch.where(keep, answer_logprobs.float(), -math.log(V)).clamp(min=-1e4)      # -inf -> finite
    i, j = torch.triu_indices(k, k, 1, device=lp.device)                               # all pairs i < j
    loss = lp.new_zeros(B)
    for a, b in zip(i.tolist(), j.tolist()):
        w = alpha[:, a] * alpha[:, b]                                                   # (B,)
        if not bool((w > 0).any()):
            continue
        # Recomputed in the backward pass: otherwise autograd would keep several (B, A, V) tensors alive
        # for each of the 28 pairs, gigabytes at a 150k vocabulary.
        jsd = checkpoint(_jsd, lp[:, a], lp[:, b], use_reentrant=False) if lp.requires_grad else _jsd(lp[:, a], lp[:, b])
        loss = loss + w * (jsd * mask).sum(-1) / mask.sum(-1).clamp(min=1)
    return loss.mean()


def _jsd(p, q):
    """JSD(P || Q) in nats over the last axis, from log-probabilities p, q (..., V)."""
    m = torch.logaddexp(p, q) - math.log(2.0)                                           # log((P+Q)/2)
    return 0.5 * ((p.exp() * (p - m)).sum(-1) + (q.exp() * (q - m)).sum(-1))


# ----------------------------------------------------------------------------------------------------
# 5. Student: a causal LM with LoRA on all linear layers (Table 8), its paths as token ids.
def load_student(name: str, cfg: Config, texts: list[str], device):
    """(peft model, tokenizer, parameter count of the base model, encoder or None)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    encoder = None
    if name == "tiny":
        model, tok, encoder = build_tiny(texts, cfg.seed, cfg.max_len)
        model.save_pretrained(Path(cfg.out) / "tiny-student")  # so the saved adapter has its base on disk
        tok.save_pretrained(Path(cfg.out) / "tiny-student")
    else:
        tok = AutoTokenizer.from_pretrained(name)
        bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
        model = AutoModelForCausalLM.from_pretrained(name, dtype=torch.bfloat16 if bf16 else torch.float32)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    n_params = model.num_parameters()
    return add_lora(model, cfg, device), tok, n_params, encoder


def add_lora(model, cfg: Config, device):
    """LoRA on all linear layers [Table 8], plus what makes the step fast: packed attention, gradient
    checkpointing where the model is large, no fp32 round trip of the activations in the adapters."""
    from peft import LoraConfig, get_peft_model
    if cfg.grad_checkpointing or (cfg.grad_checkpointing is None and model.num_parameters() >= 4e9):
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if cfg.packing:
        from transformers import AttentionInterface
        AttentionInterface.register(PACKED, packed_attention)
        model.set_attn_implementation(PACKED)  # a model that cannot take it warns and keeps its own
        if model.config._attn_implementation != PACKED:  # it still trains, in padded passes
            print(f"warning: {model.name_or_path or 'the student'} cannot take packed paths: padded passes instead")
            cfg.packing = False
    lora = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                      target_modules="all-linear", task_type="CAUSAL_LM",   # all-linear excludes the LM head
                      fan_in_fan_out=model.config.model_type == "gpt2")   # GPT-2 stores its linears transposed
    peft_model = get_peft_model(model, lora).to(device)
    for m in peft_model.modules():  # peft would cast each bf16 activation to the fp32 adapter and back;
        if hasattr(m, "cast_input_dtype_enabled"):  # autocast already runs the adapter matmuls in bf16
            m.cast_input_dtype_enabled = False
    return peft_model


def tokenize_paths(tok, rows, max_len: int):
    """Token ids of every (problem, path): prompt | rationale | lead-in | answer | eos.

    Returns a list over problems of K tuples (ids, first_label, answer_start, answer_len). The answer
    part is tokenized on its own, so it is the same ids on all K paths; rationales that do not fit in
    max_len are cut at the end, never the answer. Also returns how many rationales were cut."""
    def ids(texts, special=False):
        return tok(texts, add_special_tokens=special)["input_ids"]
    if tok.chat_template:
        prompts = [tok.apply_chat_template([{"role": "user", "content": student_prompt(r["problem"])}],
                                           tokenize=False, add_generation_prompt=True) for r in rows]
        prompt_ids = ids(prompts)
    else:
        prompt_ids = ids([plain_prompt(student_prompt(r["problem"])) for r in rows], special=True)
    rationale_ids = ids([r["rationales"][k] for r in rows for k in PERSPECTIVE_KEYS])
    lead_ids, answer_ids = (ids(list(part)) for part in zip(*(answer_suffix(r["answer"]) for r in rows)))
    out, n_cut = [], 0
    for n, r in enumerate(rows):
        fixed = len(prompt_ids[n]) + len(lead_ids[n]) + len(answer_ids[n]) + 1
        room = max_len - fixed
        if room < 1:
            raise DataError(f"problem {r['id']!r}: prompt and answer take {fixed} tokens, over --max-len {max_len}")
        paths = []
        for k in range(K):
            rat = rationale_ids[n * K + k]
            n_cut += len(rat) > room
            seq = prompt_ids[n] + rat[:room] + lead_ids[n] + answer_ids[n] + [tok.eos_token_id]
            paths.append((seq, len(prompt_ids[n]), len(seq) - 1 - len(answer_ids[n]), len(answer_ids[n])))
        out.append(paths)
    return out, n_cut


# ----------------------------------------------------------------------------------------------------
# 6. The student on many paths: passes of bounded size, paths packed without padding.
def plan_passes(lengths: list[int], budget: int, packed: bool) -> list[list[int]]:
    """Groups path indices into passes of at most `budget` tokens: real tokens when packed, padded ones
    (paths x longest) otherwise. First fit, longest first, so a pass's first path is its longest."""
    passes = []
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        for p in passes:
            if (sum(lengths[j] for j in p) + lengths[i] if packed else (len(p) + 1) * lengths[p[0]]) <= budget:
                p.append(i)
                break
        else:  # no pass has room (a path longer than the budget runs alone)
            passes.append([i])
    return passes


PACKED = "mind_packed"  # our attention function's name in transformers' AttentionInterface
try:
    from torch.nn.attention.varlen import varlen_attn  # flash attention over packed sequences (torch >= 2.10)
except ImportError:
    varlen_attn = None


def packed_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kw):
    """Attention over paths packed back to back in one row: each path attends, causally, to itself only.

    query (1, H, N, D), key and value (1, H_kv, N, D); kw["cu_seq_lens_q"] (n + 1,) holds where each of
    the n paths starts. No padding and no (N, N) mask exist. On CUDA in bf16 this is PyTorch's varlen
    flash attention; elsewhere one causal SDPA per path, which computes the same thing."""
    if "cu_seq_lens_q" not in kw:  # a plain padded batch (--no-packing, generation): transformers' SDPA
        from transformers.integrations.sdpa_attention import sdpa_attention_forward
        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kw)
    cu, longest = kw["cu_seq_lens_q"], kw["max_length_q"]
    q, k, v = (t[0].transpose(0, 1) for t in (query, key, value))              # (N, heads, D)
    if k.shape[1] != q.shape[1]:  # grouped-query attention: each k/v head serves several query heads
        k, v = (t.repeat_interleave(q.shape[1] // t.shape[1], 1) for t in (k, v))
    if varlen_attn and q.is_cuda and q.dtype != torch.float32 and not torch.are_deterministic_algorithms_enabled():
        out = varlen_attn(q, k, v, cu, cu, longest, longest, scale=scaling, window_size=(-1, 0))  # (-1, 0): causal
    else:
        at = cu.tolist()
        out = torch.cat([F.scaled_dot_product_attention(*(t[s:e].transpose(0, 1) for t in (q, k, v)), is_causal=True,
                                                        scale=scaling).transpose(0, 1) for s, e in zip(at, at[1:])])
    return out[None], None                                                     # (1, N, H, D)


def target_logprobs(head, hidden, targets, chunk: int):
    """log p(target_i) for each row of hidden (M, H) -> (M,), with only `chunk` rows of (chunk, V) fp32
    logits alive at a time; under autograd each chunk is recomputed in the backward pass."""
    def one(h, t):
        logits = head(h).float()                                                   # (c, V)
        return logits.gather(1, t[:, None]).squeeze(1) - logits.logsumexp(-1)     # (c,)
    parts = [checkpoint(one, h, t, use_reentrant=False) if torch.is_grad_enabled() else one(h, t)
             for h, t in zip(hidden.split(chunk), targets.split(chunk))]
    return torch.cat(parts)


def run_pass(body, head, paths, chunk: int, answers: bool, packed: bool, device):
    """One forward pass of the student over a few paths -> L_real per path (n,), answer log-probs (n, A, V).

    `body` is the model without its LM head (e.g. Qwen2Model): we never let the full model materialise
    (n, T, V) logits. L_real is the mean cross-entropy over the path's labels (all tokens after the
    prompt). The trap: the hidden state at position t predicts token t+1, so label t reads hidden[t-1]."""
    lens = [len(p[0]) for p in paths]
    if packed:  # one row, path after path, positions restarting at 0: no padding at all
        start = [0, *itertools.accumulate(lens)]
        ids, pos, cu = to_device(device, torch.tensor([t for p in paths for t in p[0]]),
                                 torch.cat([torch.arange(n) for n in lens]), torch.tensor(start, dtype=torch.int32))
        hidden = body(input_ids=ids[None], position_ids=pos[None], cu_seq_lens_q=cu, cu_seq_lens_k=cu,
                      max_length_q=max(lens), max_length_k=max(lens)).last_hidden_state[0]   # (N, H)
    else:  # the usual (n, T) batch, right-padded
        ids, att = torch.zeros(len(paths), max(lens), dtype=torch.long), torch.zeros(len(paths), max(lens), dtype=torch.long)
        for n, p in enumerate(paths):
            ids[n, : lens[n]], att[n, : lens[n]] = torch.tensor(p[0]), 1
        ids, att = to_device(device, ids, att)
        hidden = body(input_ids=ids, attention_mask=att).last_hidden_state.flatten(0, 1)  # (n * T, H)
        ids, start = ids.flatten(), [n * max(lens) for n in range(len(paths))]
    at, = to_device(device, torch.cat([torch.arange(s + p[1], s + len(p[0])) for s, p in zip(start, paths)]))  # labels
    lp = target_logprobs(head, hidden[at - 1], ids[at], chunk)                                               # (M,)
    loss = -torch.stack([x.mean() for x in lp.split([n - p[1] for n, p in zip(lens, paths)])])        # (n,)
    if not answers:
        return loss, None
    A = max(p[3] for p in paths)  # log P(y_a | x, r_k, y_<a) over the vocabulary, at the answer tokens only
    at, = to_device(device, torch.stack([s + p[2] - 1 + torch.arange(A).clamp(max=p[3] - 1) for s, p in zip(start, paths)]))
    return loss, F.log_softmax(head(hidden[at]).float(), -1)                           # (n,), (n, A, V)


def to_device(device, *tensors):
    """CPU tensors to the device without stalling it: a plain .to("cuda") waits for all queued GPU work;
    from pinned memory the copy is queued like a kernel."""
    return [t.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else t for t in tensors]


# ----------------------------------------------------------------------------------------------------
# 7. Training: warmup (MetaNet only), then calibration + student together (3.3.2, 3.4).
def micro_step(cfg: Config, problems, h_x, h_r, metanet, body, head, warmup: bool, device, scale: float = 1.0):
    """One micro-batch. problems: B lists of K paths (tokenize_paths); h_x (B, D), h_r (B, K, D); body and
    head: the student without its LM head, and the head. Returns L_meta (Eq. 1) for the caller's
    backward and a dict for the logs; the gradient of Eq. 4 (times `scale`) is already accumulated in
    the LoRA weights, because it is computed in passes of at most cfg.max_tokens_per_pass tokens:

    Eq. 2 is a sum over paths, so each path's part can be backpropagated alone. Eq. 3 couples the
    selected paths of a problem through their answer log-probs l_k, and only through them, so by the
    chain rule its gradient is sum_k <g_k, dl_k/dtheta> with g_k = dL_cons/dl_k. Hence:
      pass 1, no gradients: every path's L_real (Eq. 1 needs all K) and l_k; then I_dyn and alpha;
      g_k: autograd through Eq. 3 on detached copies of the l_k, a (B, K, A, V) tensor, cheap;
      pass 2, the selected paths again, a few at a time, each backpropagating
          alpha_k * L_CE_k / B + lambda * <g_k, l_k>,
    a surrogate whose value means nothing and whose gradient is exactly Eq. 4's. Only one pass's
    activations are alive at a time, however many paths MetaNet selects; the price is one more forward
    over the selected paths."""
    B, A = len(problems), max(p[0][3] for p in problems)
    paths = [p for pp in problems for p in pp]                                     # path b * K + k
    scores = metanet(h_x.to(device), h_r.to(device)) if cfg.metanet_used else None  # s (B, K)
    answers = not warmup and cfg.lambda_ > 0  # of every path: no-inertia picks I_dyn after this pass
    l_real, answer_lp = torch.zeros(B * K, device=device), None
    body.eval()  # pass 1: no dropout, no gradients, nothing kept
    with torch.no_grad(), autocast(device):
        for idx in plan_passes([len(p[0]) for p in paths], cfg.max_tokens_per_pass, cfg.packing):
            loss, ans = run_pass(body, head, [paths[i] for i in idx], cfg.loss_chunk, answers, cfg.packing, device)
            at, = to_device(device, torch.tensor(idx))
            l_real[at] = loss.float()
            if answers:
                answer_lp = ans.new_zeros(B * K, A, ans.shape[-1]) if answer_lp is None else answer_lp
                answer_lp[at, : ans.shape[1]] = ans
    l_real = l_real.view(B, K)
    l_meta = metanet_loss(scores, l_real, cfg.tau) if scores is not None else None  # Eq. 1
    if warmup:  # the frozen initial student: all K losses, for Eq. 1 only
        mask, alpha = torch.ones(B, K, dtype=torch.bool, device=device), torch.zeros(B, K, device=device)
    else:  # I_dyn, alpha (B, K)
        mask, alpha = variant_weights(cfg.variant, scores, l_real, cfg.beta, cfg.tau, cfg.tau_student)
    info = {"scores": scores.detach() if scores is not None else None, "mask": mask, "alpha": alpha,
            "l_real": l_real, "tokens": sum(len(p[0]) for p in paths)}  # real tokens, counted without a GPU sync
    if warmup:
        return l_meta, info
    sel = mask.flatten().nonzero().flatten().tolist()
    l_sft, l_cons, g = sft_loss(alpha, l_real), torch.zeros((), device=device), None     # Eq. 2
    if answer_lp is not None:
        answer_lp = answer_lp.view(B, K, A, -1).requires_grad_()
        answer_mask = torch.arange(A)[None] < torch.tensor([p[0][3] for p in problems])[:, None]  # (B, A)
        l_cons = consistency_loss(answer_lp, alpha, answer_mask.to(device))                 # Eq. 3
        if l_cons.requires_grad:  # some problem has two selected paths
            g = torch.autograd.grad(l_cons, answer_lp)[0].view(B * K, A, -1)               # g_k (B*K, A, V)
    weight = alpha.flatten() / B
    body.train()  # pass 2: the selected paths, with gradients
    for part in plan_passes([len(paths[i][0]) for i in sel], cfg.max_tokens_per_pass, cfg.packing):
        idx, = to_device(device, torch.tensor([sel[n] for n in part]))
        with autocast(device):
            loss, ans = run_pass(body, head, [paths[sel[n]] for n in part], cfg.loss_chunk, g is not None, cfg.packing, device)
            surrogate = (weight[idx] * loss).sum()
            if g is not None:
                surrogate = surrogate + cfg.lambda_ * (g[idx, : ans.shape[1]] * ans).sum()
        (surrogate * scale).backward()
    info |= {"sft": l_sft, "cons": l_cons.detach(), "student": l_sft + cfg.lambda_ * l_cons.detach()}  # Eq. 4
    return l_meta, info


def autocast(device):
    """bf16 autocast on GPUs that have it (the model's weights are bf16 there); a no-op elsewhere."""
    return torch.autocast(device.type, torch.bfloat16, enabled=device.type == "cuda" and torch.cuda.is_bf16_supported())


def main(cfg: Config) -> dict:
    rnk, world, device = setup_distributed(cfg)
    torch.manual_seed(cfg.seed)
    out = Path(cfg.out)
    ckpts = sorted(out.glob("checkpoint-[0-9]*"))
    if ckpts and not cfg.resume:  # checked before any work, so that nothing in `out` is overwritten
        raise DataError(f"{out} already holds checkpoints: pass --resume to continue, or choose another --out")
    out.mkdir(parents=True, exist_ok=True)
    built = HERE / "data" / "mind_math.jsonl"  # made by data/build.py; else the shipped sample
    data_path = Path(cfg.data) if cfg.data else built if built.exists() else HERE / "data" / "sample.jsonl"
    rows = load_data(data_path)
    log = print if rnk == 0 else (lambda *a, **k: None)
    log(f"data: {len(rows)} problems x {K} perspectives from {data_path}")

    texts = [r["problem"] for r in rows] + [t for r in rows for t in r["rationales"].values()]
    peft_model, tok, n_params, encoder = load_student(cfg.student, cfg, texts, device)
    small = n_params < 4e9  # Table 8 has two rows: 1.5B-class and 7B/8B-class students
    lr = cfg.lr or (TINY_LR if cfg.student == "tiny" else 5e-5 if small else 1e-4)
    epochs = cfg.epochs or (8 if small else 6)
    encoder_id = cfg.encoder or ("tiny" if cfg.student == "tiny" else "sentence-transformers/all-MiniLM-L6-v2")
    if encoder is None or encoder_id != "tiny":
        from sentence_transformers import SentenceTransformer
        encoder = SentenceTransformer(encoder_id, device=str(device))
    h_x, h_r = embed(encoder, rows, out / "embeddings.pt", f"{encoder_id}:{cfg.seed}")
    del encoder
    paths, n_cut = tokenize_paths(tok, rows, cfg.max_len)
    if n_cut:
        log(f"warning: {n_cut} of {len(rows) * K} rationales exceed --max-len {cfg.max_len} and were cut")

    metanet = MetaNet(h_x.shape[-1], cfg.meta_dim, cfg.meta_heads, synergy=cfg.variant != "no-synergy").to(device)
    lora_params = [p for p in peft_model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(lora_params, lr=lr, weight_decay=0.0)
    meta_opt = torch.optim.AdamW(metanet.parameters(), lr=cfg.meta_lr_warmup, weight_decay=0.0)
    step, start_epoch, start_micro = 0, 0, 0
    if cfg.resume and ckpts:
        step, start_epoch, start_micro = load_checkpoint(ckpts[-1], peft_model, metanet, opt, meta_opt, world, cfg.variant)
        log(f"resumed from {ckpts[-1]} (step {step}, epoch {start_epoch}, micro-batch {start_micro})")
    for p in [*lora_params, *metanet.parameters()] if world > 1 else []:  # one start for all processes
        dist.broadcast(p.data, 0)
    body, head = peft_model.get_base_model().base_model, peft_model.get_base_model().get_output_embeddings()

    warmup_epochs = cfg.warmup_epochs if cfg.metanet_used else 0  # the warmup trains MetaNet only
    n_epochs = warmup_epochs + epochs
    subjects = sorted({r["subject"] for r in rows}) if all("subject" in r for r in rows) else []
    subject_of = torch.tensor([subjects.index(r["subject"]) for r in rows] if subjects else [0] * len(rows))
    n_micro = len(epoch_batches(len(rows), cfg.batch_size, cfg.seed, 0, rnk, world))
    total = n_epochs * math.ceil(n_micro / cfg.grad_accum)
    total = min(total, cfg.max_steps) if cfg.max_steps else total
    log(f"student: {cfg.student} ({n_params / 1e6:,.1f}M), lr {lr:g}, {warmup_epochs} warmup + {epochs} epochs, "
        f"{total} optimizer steps, {world} process(es) on {device}")
    stop = {"asked": False}  # Ctrl-C (or SIGTERM) stops at the next optimizer step, with a checkpoint

    def ask_stop(*_):
        if stop["asked"]:
            raise KeyboardInterrupt
        stop["asked"] = True
    handlers = {sig: signal.signal(sig, ask_stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    metrics = open(out / "metrics.jsonl", "a") if rnk == 0 else None
    from tqdm.auto import tqdm
    bar = tqdm(total=total, initial=step, disable=rnk != 0, dynamic_ncols=True)
    stats, t0, record, ckpt = torch.zeros(6 + 3 * K, device=device), time.time(), {}, None
    by_subject = torch.zeros(max(len(subjects), 1), K + 1, device=device)  # alpha sums and counts, this epoch
    try:
        for epoch in range(start_epoch, n_epochs):
            warmup = epoch < warmup_epochs
            meta_accum = cfg.grad_accum if warmup else cfg.meta_grad_accum
            if not warmup:  # calibration: lower LR and more accumulation than the student (the hysteresis)
                for g in meta_opt.param_groups:
                    g["lr"] = cfg.meta_lr
            batches = epoch_batches(len(rows), cfg.batch_size, cfg.seed, epoch, rnk, world)
            for i in range(start_micro if epoch == start_epoch else 0, len(batches)):
                last = i == len(batches) - 1
                step_now, meta_now = (i + 1) % cfg.grad_accum == 0 or last, (i + 1) % meta_accum == 0 or last
                n_acc = min(cfg.grad_accum, len(batches) - i // cfg.grad_accum * cfg.grad_accum)  # this window's size
                n_meta = min(meta_accum, len(batches) - i // meta_accum * meta_accum)
                idx = batches[i]
                l_meta, info = micro_step(cfg, [paths[b] for b in idx], h_x[idx], h_r[idx], metanet, body, head,
                                          warmup, device, scale=1 / n_acc)  # Eq. 4's gradient: done inside
                if l_meta is not None:
                    (l_meta / n_meta).backward()
                if meta_now and cfg.metanet_used:
                    all_mean_grads(metanet.parameters())
                    meta_opt.step()
                    meta_opt.zero_grad(set_to_none=True)
                stats += log_stats(l_meta, info, len(idx), device)
                counted = torch.cat([info["alpha"], torch.ones(len(idx), 1, device=device)], 1)  # (B, K + 1)
                by_subject.index_add_(0, subject_of[idx].to(device), counted)
                if not step_now:
                    continue
                if not warmup:
                    all_mean_grads(lora_params)
                    torch.nn.utils.clip_grad_norm_(lora_params, 1.0)
                    opt.step()
                    opt.zero_grad(set_to_none=True)
                step += 1
                bar.update(1)
                if step % cfg.log_every == 0 or last:
                    record = make_record(all_sum(stats.clone()).tolist(), step, epoch + (i + 1) / len(batches),
                                         warmup, lr, meta_opt.param_groups[0]["lr"], time.time() - t0,
                                         peak_memory_gib(device), cfg.variant, cfg.metanet_used)
                    if rnk == 0:
                        metrics.write(json.dumps(record) + "\n")
                        metrics.flush()
                        bar.write(format_record(record, total))
                    stats.zero_()
                    t0 = time.time()
                if last and not warmup and subjects:  # mean alpha per (subject, perspective) this epoch: Sec. 5
                    record_subjects(metrics, all_sum(by_subject), subjects, epoch + 1, cfg.variant)
                if last:
                    by_subject.zero_()
                halt = step == cfg.max_steps or bool(all_sum(torch.tensor([float(stop["asked"])], device=device)))
                if last or halt:  # a checkpoint at every epoch end, and wherever we stop early
                    ckpt = save_checkpoint(out, step, *((epoch + 1, 0) if last else (epoch, i + 1)),
                                           peft_model, metanet, opt, meta_opt, world, cfg.variant)
                if halt:
                    break
            else:
                continue
            if not (last and epoch == n_epochs - 1):  # a stop asked for during the very last step is no stop
                log(f"stopped at step {step}; continue with the same command plus --resume")
            break
    finally:
        torch.use_deterministic_algorithms(False)  # global state: leave it as found (cfg.deterministic sets it)
        for sig, h in handlers.items():
            signal.signal(sig, h)
        bar.close()
        if metrics:
            metrics.close()
    if rnk == 0 and ckpt is not None:
        peft_model.save_pretrained(out / "adapter")  # the latest student, for PeftModel.from_pretrained
        torch.save(metanet.state_dict(), out / "metanet.pt")
        log(f"saved {ckpt}; latest adapter in {out / 'adapter'}")
    if dist.is_initialized():
        dist.destroy_process_group()
    return {"out": str(out), "step": step, "checkpoint": str(ckpt) if ckpt else None, "metrics": record,
            "lr": lr, "epochs": epochs}


if __name__ == "__main__":
    try:
        main(parse_args())
    except (DataError, OSError) as e:  # bad data, a missing file, a model that cannot be loaded
        if os.environ.get("RANK", "0") == "0":  # under torchrun, every process would say it
            print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
