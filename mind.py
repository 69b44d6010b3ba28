"""MIND: capability-aware, multi-perspective chain-of-thought distillation, in one file.

Cui et al., "MIND: From Passive Mimicry to Active Reasoning through Capability-Aware
Multi-Perspective CoT Distillation", ACL 2026. The method (Section 3) in four lines:
  every problem x has K=8 teacher rationales r_k, one per reasoning perspective (3.1, prompts.py);
  MetaNet (3.3.1) scores how learnable each r_k is for the student right now, calibrated on the
  student's real losses (Eq. 1); the student learns from the paths scoring within beta of the best,
  weighted by alpha (Eq. 2), while their answer distributions are pulled together (Eq. 3); Eq. 4
  sums the two.

The file follows the paper: 1 data, 2 frozen Sentence-BERT, 3 MetaNet, 4 the equations, 5 the
student and its paths, 6 the training step, 7 the schedule (warmup, then calibration + student).
Section 3.2's latent-space analysis is latent.py.

Where we go beyond or against the letter of the paper (every value it leaves open is "ours" in
Config):
  1. Scores pass through a sigmoid into (0, 1): the threshold beta * max(s) needs positive
     scores. Eq. 1 cannot fix their level (adding a constant to s changes no softmax), so how
     many paths lie within beta of the best depends on where in (0, 1) MetaNet puts them.
  2. L_real is the mean token cross-entropy of path k (rationale + answer suffix, prompt masked),
     and so is L_CE in Eq. 2: every path weighs the same, whatever its length.
  3. A fixed answer suffix closes every rationale (prompts.answer_suffix), so P(y | x, r_i) in
     Eq. 3 is read at the same answer token ids on every path; JSD is averaged over those tokens.
     The teacher's rationales already end in the boxed answer, so under teacher forcing these
     distributions are close and L_cons is small (about 1e-3 nats in the tiny demo).
  4. MetaNet gets a residual connection and LayerNorm around its self-attention (common practice).
  5. The paper gives no schedule: learning rates are constant, gradients clipped at 1.0.
  6. Table 8 gives MetaNet and a 1.5B student the same LR (5e-5), though 3.3.2 says MetaNet's is
     lower; we follow the table. Its slower rhythm comes from accumulating over more micro-batches.
  7. "Warm up the MetaNet" (Table 8: 1 epoch) we read as: Eq. 1 against the losses of the frozen
     initial student, which does not train in that epoch.
  8. Sentence-BERT reads at most its max_seq_length (256 word pieces for all-MiniLM-L6-v2): of a
     longer rationale, MetaNet sees the opening only.

Speed engineering that changes no number (passes of bounded size, packed paths, chunked logits,
precision, the out-of-memory retry) is in fast.py.
The step runs the student in passes of bounded size; micro_step explains why that is still exactly
Eq. 4's gradient.

Usage:
  python mind.py --student tiny                                     # offline CPU demo, minutes
  python mind.py --student Qwen/Qwen2.5-1.5B                        # one GPU, Table 8 settings
  torchrun --nproc_per_node 2 mind.py --student Qwen/Qwen2.5-1.5B   # two GPUs, as in the paper
  python mind.py --student Qwen/Qwen2.5-1.5B --variant no-inertia   # an ablation (README)
"""
import hashlib, itertools, math, os
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar, NamedTuple

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

import fast
from infra import (DataError, Diverged, RunLog, StopOnSignal, broadcast_from_rank0, build_tiny,
                   check_config, claim_out, demo_data_note, epoch_batches, fail, find_checkpoint,
                   from_hub, get_peft_model, load_checkpoint, parse_config, rank,
                   read_jsonl, run_identity, save_checkpoint, save_final, setup_distributed,
                   stop_if_diverged, validate_row)
from prompts import PERSPECTIVE_KEYS, answer_suffix, plain_prompt, student_prompt

K = len(PERSPECTIVE_KEYS)
HERE = Path(__file__).resolve().parent


# ----------------------------------------------------------------------------------------------
# Configuration. Every default says where it comes from: [Table 8] / [paper] or [ours: why].
GROUPS = {"run": "what to train, and where",
          "paper": "the paper's settings (Table 8)",
          "ours": "the method's choices that the paper leaves open (ours)",
          "engineering": "engineering: cost only, the numbers stay the same"}


def flag(group, default, help):
    return field(default=default, metadata={"group": group, "help": help})


@dataclass
class Config:
    student: str = flag("run", "Qwen/Qwen2.5-1.5B", "hub id or folder of a causal LM, or 'tiny' "
                        "for the offline demo [paper 4.1: Qwen2.5-1.5B, Qwen2.5-7B, Llama3.1-8B]")
    data: str | None = flag("run", None, "JSONL of problems with 8 rationales [default: "
                            "data/mind_math.jsonl (data/build.py) if present, else the shipped "
                            "data/mind497.jsonl; data/sample.jsonl with --student tiny]")
    encoder: str | None = flag("run", None, "frozen Sentence-BERT, hub id or folder [3.3.1 names "
                               "none; ours: all-MiniLM-L6-v2, 'tiny' with --student tiny]")
    out: str = flag("run", "runs/mind", "output folder: checkpoints, metrics.jsonl, final adapter")
    variant: str = flag("run", "mind", "mind, or an ablation: single:<perspective> (Table 1 'w/o "
                        "fusion'), uniform (8 paths, alpha 1/8), no-inertia (Fig. 7a: alpha from "
                        "the losses), no-synergy (Fig. 7b: no self-attention), topk:<1-8> (Fig. 6)")
    seed: int = flag("run", 0, "random seed")
    resume: bool = flag("run", False, "continue from the newest complete checkpoint in --out, with "
                        "the same settings but for those that change only the cost")
    max_steps: int = flag("run", 0, "stop (and checkpoint) after this many optimizer steps in all; "
                          "0 = no limit")
    log_every: int = flag("run", 1, "optimizer steps between log lines")

    epochs: int | None = flag("paper", None, "student epochs after the warmup [Table 8: 8 for "
                              "1.5B, 6 for 7B/8B; ours: counted after the warmup epoch, which "
                              "Table 8 lists apart]")
    lr: float | None = flag("paper", None, "student learning rate [Table 8: 5e-5 for 1.5B, 1e-4 "
                            "for 7B/8B; ours: 3e-3 for the tiny demo]")
    batch_size: int = flag("paper", 4, "problems per device per micro-step, each with K=8 paths "
                           "[Table 8]")
    grad_accum: int = flag("paper", 4, "student gradient accumulation [Table 8]")
    warmup_epochs: int = flag("paper", 1, "MetaNet-only epochs before joint training [Table 8]")
    meta_lr_warmup: float = flag("paper", 1e-4, "MetaNet learning rate during warmup [Table 8]")
    meta_lr: float = flag("paper", 5e-5, "MetaNet learning rate during calibration [Table 8]")

    meta_grad_accum: int = flag("ours", 16, "MetaNet gradient accumulation while calibrating "
                                "[ours: 3.3.2 asks for more than the student's; 4x]")
    tau: float = flag("ours", 1.0, "temperature of Eq. 1 [ours: neutral; where scores can reach s "
                      "= c - L_real, that minimiser does not depend on it]")
    tau_student: float = flag("ours", 0.1, "temperature of alpha [ours: scores lie in (0,1), so "
                              "1.0 would give near-uniform alpha]")
    beta: float = flag("ours", 0.9, "tolerance of I_dyn: keep s_k >= beta*max(s) [ours: paths "
                       "within 10%% of the best]")
    lambda_: float = flag("ours", 1.0, "weight of L_cons in Eq. 4 [ours: JSD <= ln 2 keeps the "
                          "term at the scale of a cross-entropy]")
    lora_r: int = flag("ours", 16, "LoRA rank [ours: common default]")
    lora_alpha: int = flag("ours", 32, "LoRA alpha [ours: 2 x rank]")
    lora_dropout: float = flag("ours", 0.0, "LoRA dropout; only 0 is accepted [ours: the paper "
                               "gives none; micro_step's exact gradient needs both passes over a "
                               "path to compute the same function, and dropout draws new masks "
                               "each time]")
    meta_dim: int = flag("ours", 256, "MetaNet width [ours]")
    meta_heads: int = flag("ours", 4, "MetaNet self-attention heads [ours]")
    max_len: int = flag("ours", 1024, "max tokens per path; longer rationales are cut, the answer "
                        "suffix kept [ours]")
    max_grad_norm: float = flag("ours", 1.0, "clip the student's gradient norm [ours: the paper "
                                "gives no schedule; a common safeguard]")

    max_tokens_per_pass: int | None = flag("engineering", None, "tokens in one forward pass of the "
                                           "student (fast.bounded_paths), at least --max-len; 0: "
                                           "the most that the GPU's free memory holds (memory.py); "
                                           "-1: no bound, the plain step, one pass over all paths "
                                           "[ours: 2048 for a real student, which keeps a 1.5B "
                                           "student under 12 GiB and a 7B one under 22 GiB by the "
                                           "memory model (docs/performance.md); -1 for --student "
                                           "tiny]")
    packing: bool = flag("engineering", True, "a pass's paths back to back in one row (no padding; "
                         "varlen attention on CUDA) [ours: speed]")
    loss_chunk: int = flag("engineering", 1024, "rows of logits alive at once in the per-path loss "
                           "[ours: memory]")
    grad_checkpointing: bool | None = flag("engineering", None, "recompute activations in the "
                                           "backward pass: less memory, about a third more compute "
                                           "[ours: default on for students of 4B+ parameters]")
    device: str = flag("engineering", "auto", "auto (CUDA if there is one), cpu or cuda")
    deterministic: bool = flag("engineering", False, "deterministic kernels: GPU runs repeat bit "
                               "for bit, slower [ours]")

    # ours, not flags: a random 2-layer demo student learns visibly in minutes only with a large LR,
    # and it first reads the data as a plain language model (120 steps of 16 x 128 tokens at LR
    # 1e-2, seconds on a CPU), so that its losses on the perspectives differ within the demo's
    # minute, as a real student's do; Table 8 has two rows of students, 1.5B and 7B/8B, and we
    # split them at 4B parameters.
    TINY_LR: ClassVar[float] = 3e-3
    TINY_PRETRAIN: ClassVar[tuple[int, float]] = (120, 1e-2)
    LARGE_STUDENT: ClassVar[float] = 4e9
    PASS_BUDGET: ClassVar[int] = 2048  # --max-tokens-per-pass of a real student (see its help)

    def __post_init__(self):  # every value in range, before any work (infra.check_config)
        check_config(self)
        if self.max_tokens_per_pass is None:  # the demo runs the plain step, real students passes
            self.max_tokens_per_pass = -1 if self.student == "tiny" else self.PASS_BUDGET

    @property
    def metanet_used(self) -> bool:  # the variants without MetaNet skip its warmup and Eq. 1
        return not self.variant.startswith("single:") and self.variant not in ("uniform", "no-inertia")


def parse_args(argv=None) -> Config:
    return parse_config(Config, GROUPS, argv, __doc__.split("\n\n")[0])


# ----------------------------------------------------------------------------------------------
# 1. Data (Section 3.1): one JSON object per line, {"id", "problem", "answer", "rationales"}.
# The teacher's rationales were filtered when the file was built (data/build.py); here we only
# check that each line has the shape the method needs.
def data_file(cfg) -> Path:
    """--data if given; else data/mind_math.jsonl once data/build.py has written it; else a shipped
    set: data/mind497.jsonl, written for this repository in the paper's shape (data/README.md), or
    for --student tiny the 36-problem data/sample.jsonl, which keeps the offline demo short."""
    built = HERE / "data" / "mind_math.jsonl"
    if cfg.data or built.exists():
        return Path(cfg.data) if cfg.data else built
    return HERE / "data" / ("sample.jsonl" if cfg.student == "tiny" else "mind497.jsonl")


def load_data(path) -> list[dict]:
    rows, seen = [], {}
    for n, row in read_jsonl(path):  # one line, file:line, if the file is not UTF-8 JSON lines
        validate_row(row, f"{path}:{n}")  # the fields and their types (infra.py)
        if row["id"] in seen:
            raise DataError(f"{path}:{n} (problem {row['id']!r}): id already used on line "
                            f"{seen[row['id']]}")
        seen[row["id"]] = n
        rows.append(row)
    if not rows:
        raise DataError(f"{path}: no problems in the file")
    return rows


# ----------------------------------------------------------------------------------------------
# 2. Frozen Sentence-BERT (3.3.1, "Feature Alignment"): h_x and h_{r_k}, computed once and cached.
@torch.no_grad()
def embed(encoder, rows, cache: Path, encoder_id: str):
    """Returns h_x (N, D) and h_r (N, K, D) in fp32 on the CPU; reuses `cache` if it holds these
    texts embedded by this encoder."""
    texts = [r["problem"] for r in rows]
    texts += [r["rationales"][k] for r in rows for k in PERSPECTIVE_KEYS]
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


# ----------------------------------------------------------------------------------------------
# 3. MetaNet, the "teaching assistant" (3.3.1): align -> synergy -> K score heads.
class MetaNet(nn.Module):
    def __init__(self, d_enc: int, d: int = 256, heads: int = 4, k: int = K, synergy: bool = True):
        super().__init__()
        # MLP_align over [h_x; h_rk]
        self.align = nn.Sequential(nn.Linear(2 * d_enc, d), nn.GELU(), nn.Linear(d, d))
        # SelfAttn across the K perspectives; --variant no-synergy (Fig. 7b) drops it, and each
        # head then scores its path alone
        self.synergy = synergy
        if synergy:
            self.attn = nn.MultiheadAttention(d, heads, batch_first=True)
            self.norm = nn.LayerNorm(d)
        # K independent heads phi_k: the "inertia matrix"
        self.phi = nn.ModuleList(nn.Sequential(nn.Linear(d, d), nn.GELU(), nn.Linear(d, 1))
                                   for _ in range(k))

    def forward(self, h_x, h_r):                                    # h_x (B, D), h_r (B, K, D)
        e = self.align(torch.cat([h_x[:, None].expand_as(h_r), h_r], -1))        # E (B, K, d)
        z = e
        if self.synergy:
            z = self.norm(e + self.attn(e, e, e, need_weights=False)[0])        # Z = SelfAttn(E)
        s = torch.cat([phi_k(z[:, k]) for k, phi_k in enumerate(self.phi)], -1)  # (B, K)
        return torch.sigmoid(s)  # in (0, 1): the threshold beta * max(s) needs positive scores


# ----------------------------------------------------------------------------------------------
# 4. The equations, as pure functions (B problems, K paths, A answer tokens, V vocabulary).
def metanet_loss(scores, student_losses, tau: float):
    """Eq. 1: KL(pi_tau(s) || pi_tau(-L_real)), mean over B. scores, student_losses: (B, K).

    Written out rather than with F.kl_div, whose (input, target) order is the reverse of the
    paper's. L_real is a target: it is detached, so Eq. 1 moves MetaNet only."""
    log_p = F.log_softmax(scores.float() / tau, -1)                     # pi_tau(s)        (B, K)
    log_q = F.log_softmax(-student_losses.detach().float() / tau, -1)   # pi_tau(-L_real)  (B, K)
    return (log_p.exp() * (log_p - log_q)).sum(-1).mean()


def select_perspectives(scores, beta: float, tau_student: float):
    """I_dyn = {k : s_k >= beta * max(s)} and alpha = softmax(s / tau_student) over I_dyn, 0
    elsewhere (the paper's normaliser sums over "I_top"; we read it as I_dyn). scores (B, K) ->
    selected (B, K) bool, alpha (B, K). The argmax is always selected.

    Both are constants: MetaNet learns from Eq. 1 only, never through the student's loss."""
    scores = scores.detach()
    selected = scores >= beta * scores.max(-1, keepdim=True).values
    alpha = torch.softmax((scores / tau_student).masked_fill(~selected, float("-inf")), -1)
    return selected, alpha


def variant_weights(variant: str, scores, l_real, beta: float, tau: float, tau_student: float):
    """I_dyn and alpha (B, K) for the paper's ablations (--variant); MIND itself is
    select_perspectives. scores: MetaNet's (None without MetaNet); l_real (B, K): the student's
    current losses."""
    name, _, arg = variant.partition(":")
    if name == "single":  # Table 1 "w/o fusion": one perspective, alpha = 1
        selected = torch.zeros_like(l_real, dtype=torch.bool)
        selected[:, PERSPECTIVE_KEYS.index(arg)] = True
        return selected, selected.float()
    if name == "uniform":  # every path, one weight: multi-path distillation without the capability
        return torch.ones_like(l_real, dtype=torch.bool), torch.full_like(l_real, 1 / K)
    if name == "no-inertia":  # Fig. 7a: the instantaneous losses decide (the beta filter is ours)
        l_real = l_real.detach()  # alpha is a constant here too
        s = torch.exp(-l_real)
        selected = s >= beta * s.max(-1, keepdim=True).values
        alpha = torch.softmax((-l_real / tau).masked_fill(~selected, float("-inf")), -1)
        return selected, alpha  # alpha ~ exp(-L / tau): Eq. 1's temperature, on the losses' scale
    if name == "topk":  # Fig. 6: the K best scores instead of the beta threshold
        s = scores.detach()
        top = s.topk(int(arg), -1).indices
        selected = torch.zeros_like(s, dtype=torch.bool).scatter(-1, top, True)
        return selected, torch.softmax((s / tau_student).masked_fill(~selected, float("-inf")), -1)
    return select_perspectives(scores, beta, tau_student)  # mind, no-synergy


def sft_loss(alpha, path_losses):
    """Eq. 2: sum_{k in I_dyn} alpha_k * L_CE(r_k | x), mean over B. alpha, path_losses: (B, K).
    Paths outside I_dyn (alpha = 0) contribute nothing, whatever their loss slot holds."""
    return torch.where(alpha > 0, alpha * path_losses, 0.0).sum(-1).mean()


def consistency_loss(answer_logprobs, alpha, answer_mask=None):
    """Eq. 3: sum over the pairs i < j in I_dyn of alpha_i alpha_j JSD(P_i || P_j), mean over B.

    answer_logprobs (B, K, A, V): log P(y_a | x, r_k, y_<a) at the answer tokens; alpha (B, K), zero
    outside I_dyn; answer_mask (B, A) marks real answer tokens (answers differ in length). JSD is in
    nats, averaged over a problem's answer tokens (answer_jsd)."""
    B, k, A, _ = answer_logprobs.shape
    if answer_mask is None:
        answer_mask = torch.ones(B, A, dtype=torch.bool, device=alpha.device)
    P = answer_logprobs.unbind(1)                                    # K tensors (B, A, V): P_k
    loss = torch.zeros(B, device=alpha.device)
    for i, j in itertools.combinations(range(k), 2):                              # pairs i < j
        w = alpha[:, i] * alpha[:, j]                          # (B,): 0 unless both are in I_dyn
        if bool((w > 0).any()):  # a pair outside I_dyn in every problem adds 0: not computed
            tokens = answer_mask.bool() & (w > 0)[:, None]                               # (B, A)
            loss = loss + w * answer_jsd(P[i], P[j], tokens)
    return loss.mean()


def answer_jsd(p, q, tokens):
    """JSD(P || Q) in nats per problem, the mean over its answer tokens: p, q (B, A, V) are
    log-probabilities, tokens (B, A) the positions that count. The formula is _jsd; around it:
      the NaN guard: positions that do not count (padding, or a problem where the pair is outside
        I_dyn) become uniform distributions before any arithmetic, and log-probs are clamped at
        -1e4, so whatever they hold (garbage, -inf) cannot make 0 * inf = NaN, forward or backward;
      the recompute: under autograd the (B, A, V) temporaries are recomputed in the backward pass
        rather than kept; the 28 pairs would otherwise hold gigabytes at a 150k vocabulary."""
    def guarded(p, q, tokens):
        p, q = (torch.where(tokens[..., None], t.float(), -math.log(t.shape[-1])).clamp(min=-1e4)
                for t in (p, q))
        return (_jsd(p, q) * tokens).sum(-1) / tokens.sum(-1).clamp(min=1)               # (B,)
    if p.requires_grad or q.requires_grad:
        return checkpoint(guarded, p, q, tokens, use_reentrant=False)
    return guarded(p, q, tokens)


def _jsd(p, q):
    """JSD(P || Q) in nats over the last axis, from log-probabilities p, q (..., V)."""
    m = torch.logaddexp(p, q) - math.log(2.0)                                     # log((P+Q)/2)
    return 0.5 * ((p.exp() * (p - m)).sum(-1) + (q.exp() * (q - m)).sum(-1))


def total_loss(alpha, path_losses, answer_logprobs, answer_mask, lam: float):
    """Eq. 4: L_total = L_SFT + lambda * L_cons, the student's objective, from the per-path values
    of B problems: path_losses (B, K) and answer_logprobs (B, K, A, V), or None where Eq. 3 is not
    computed (lambda = 0). Returns (L_total, L_SFT, L_cons); the two terms are for the log."""
    l_sft = sft_loss(alpha, path_losses)                                                 # Eq. 2
    l_cons = torch.zeros((), device=alpha.device)
    if answer_logprobs is not None:
        l_cons = consistency_loss(answer_logprobs, alpha, answer_mask)                   # Eq. 3
    return l_sft + lam * l_cons, l_sft, l_cons


# ----------------------------------------------------------------------------------------------
# 5. The student: a causal LM with LoRA on all linear layers (Table 8), its paths as token ids.
class TokenPath(NamedTuple):
    """One (problem, perspective) path as the student reads it:
    ids = prompt | rationale | lead-in | answer | eos. The labels are ids[prompt_len:]; the answer
    tokens are ids[answer_start : answer_start + answer_len], the same ids on all K paths."""
    ids: list[int]
    prompt_len: int
    answer_start: int
    answer_len: int


def load_student(name: str, cfg: Config, texts: list[str], device):
    """(peft model, tokenizer, parameter count of the base model, encoder or None)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    encoder = None
    if name == "tiny":
        tiny = Path(cfg.out) / "tiny-student"  # saved there: the base of the run's adapter
        model, tok, encoder = build_tiny(texts, cfg.seed, cfg.max_len, tiny, Config.TINY_PRETRAIN)
    else:
        tok = from_hub(AutoTokenizer.from_pretrained, name, "--student")  # or one clear line
        model = from_hub(AutoModelForCausalLM.from_pretrained, name, "--student",
                         dtype=fast.student_dtype(device))
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    n_params = model.num_parameters()
    return add_lora(model, cfg, device), tok, n_params, encoder


def add_lora(model, cfg: Config, device):
    """LoRA on all linear layers [Table 8]; no dropout anywhere in the student, so that the two
    passes of micro_step compute the same function; packed attention unless the model refuses."""
    from peft import LoraConfig
    for m in model.modules():
        if isinstance(m, nn.Dropout):
            m.p = 0.0
        if isinstance(getattr(m, "attention_dropout", None), float):  # Qwen2/Llama attention
            m.attention_dropout = 0.0
    large = model.num_parameters() >= Config.LARGE_STUDENT
    if cfg.grad_checkpointing or (cfg.grad_checkpointing is None and large):
        fast.enable_checkpointing(model)
    if cfg.packing and not fast.enable_packing(model):  # it still trains, in padded passes
        print(f"warning: {model.name_or_path or 'the student'} cannot take packed paths: "
              f"padded passes instead")
        cfg.packing = False
    lora = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                      target_modules="all-linear", task_type="CAUSAL_LM",  # not the LM head
                      fan_in_fan_out=model.config.model_type == "gpt2")  # GPT-2: transposed linears
    peft_model = get_peft_model(model, lora).to(device)  # infra.py: without a FutureWarning
    fast.skip_lora_input_cast(peft_model)
    # training mode for every module (from_pretrained leaves eval): gradient checkpointing acts
    # only in it, and with no dropout left it changes nothing else
    return peft_model.train()


def tokenize_paths(tok, rows, max_len: int) -> tuple[list[list[TokenPath]], int]:
    """The K TokenPaths of every problem, and how many rationales were cut to fit max_len.

    The answer part is tokenized on its own, so it is the same ids on all K paths; a rationale that
    does not fit is cut at its end, never the answer."""
    def ids(texts, special=False):
        return tok(texts, add_special_tokens=special)["input_ids"]
    if tok.chat_template:
        chats = [[{"role": "user", "content": student_prompt(r["problem"])}] for r in rows]
        prompts = [tok.apply_chat_template(c, tokenize=False, add_generation_prompt=True)
                   for c in chats]
        prompt_ids = ids(prompts)
    else:
        prompt_ids = ids([plain_prompt(student_prompt(r["problem"])) for r in rows], special=True)
    rationale_ids = ids([r["rationales"][k] for r in rows for k in PERSPECTIVE_KEYS])
    suffixes = [answer_suffix(r["answer"]) for r in rows]                # (lead-in, answer)
    lead_ids, answer_ids = ids([s[0] for s in suffixes]), ids([s[1] for s in suffixes])
    out, n_cut = [], 0
    for n, r in enumerate(rows):
        fixed = len(prompt_ids[n]) + len(lead_ids[n]) + len(answer_ids[n]) + 1   # + eos
        room = max_len - fixed
        if room < 1:
            raise DataError(f"problem {r['id']!r}: prompt and answer take {fixed} tokens, over "
                            f"--max-len {max_len}")
        paths = []
        for k in range(K):
            rationale = rationale_ids[n * K + k]
            n_cut += len(rationale) > room
            seq = prompt_ids[n] + rationale[:room] + lead_ids[n] + answer_ids[n] + [tok.eos_token_id]
            answer_start = len(seq) - 1 - len(answer_ids[n])
            paths.append(TokenPath(seq, len(prompt_ids[n]), answer_start, len(answer_ids[n])))
        out.append(paths)
    return out, n_cut


def real_answer_tokens(problems, A: int, device):
    """(B, A) bool: which of the A answer positions hold a real answer token of each problem
    (answers differ in length; run_pass repeats a shorter answer's last position)."""
    n_answer = torch.tensor([pp[0].answer_len for pp in problems])
    return (torch.arange(A)[None] < n_answer[:, None]).to(device)


def run_pass(body, head, paths: list[TokenPath], device, answer_width: int = 0,
             packed: bool = True, chunk: int = 1024):
    """One forward pass of the student over a few paths -> L_real (n,) and, if answer_width > 0,
    the answer log-probs (n, answer_width, V), else None.

    `body` is the model without its LM head (e.g. Qwen2Model): the full model would materialise
    (n, T, V) logits; we apply the head only where a loss needs it (fast.target_logprobs)."""
    # hidden (N, H) and ids (N,) for the N tokens of the pass; path n starts at row start[n]
    hidden, ids, start = fast.student_forward(body, [p.ids for p in paths], packed, device)
    # L_real: mean cross-entropy over the labels, all tokens after the prompt. The trap: the
    # hidden state at position t predicts token t + 1, so label position t reads hidden[t - 1].
    label_pos = torch.cat([torch.arange(s + p.prompt_len, s + len(p.ids))
                           for s, p in zip(start, paths)])
    label_pos, = fast.to_device(device, label_pos)                                      # (M,)
    token_lp = fast.target_logprobs(head, hidden[label_pos - 1], ids[label_pos], chunk)  # (M,)
    n_labels = [len(p.ids) - p.prompt_len for p in paths]
    l_real = -torch.stack([lp.mean() for lp in token_lp.split(n_labels)])               # (n,)
    if not answer_width:
        return l_real, None
    # log P(y_a | x, r_k, y_<a) over the vocabulary, at the answer tokens only. A shorter answer
    # repeats its last position up to answer_width; consistency_loss masks those slots.
    a = torch.arange(answer_width)
    answer_pos = torch.stack([s + p.answer_start - 1 + a.clamp(max=p.answer_len - 1)
                              for s, p in zip(start, paths)])
    answer_pos, = fast.to_device(device, answer_pos)                                    # (n, A)
    return l_real, F.log_softmax(head(hidden[answer_pos]).float(), -1)                  # (n, A, V)


# ----------------------------------------------------------------------------------------------
# 6. The training step (3.3.2 and 3.4): MetaNet's scores, Eq. 1, I_dyn and alpha, Eq. 4.
def micro_step(cfg: Config, problems, h_x, h_r, metanet, body, head, warmup: bool, device,
               scale: float = 1.0, meta_scale: float = 1.0, scaler=None):
    """One micro-batch of B problems (B lists of K TokenPaths); h_x (B, D), h_r (B, K, D); body and
    head: the student without its LM head, and the head. Backpropagates Eq. 1 into MetaNet (times
    meta_scale) and, after the warmup, Eq. 4 into the student's LoRA weights (times scale, and the
    loss scale of `scaler`, a torch.amp.GradScaler, in fp16). Returns L_meta (detached; None
    without MetaNet) and a dict for the logs.

    This is the plain step: one forward pass over all B*K paths, with gradients, so its memory grows
    with the paths. With --max-tokens-per-pass (on by default for real students) the student runs
    through fast.bounded_paths instead: the same values and gradients in passes of bounded size."""
    B, A = len(problems), max(pp[0].answer_len for pp in problems)
    paths = [p for pp in problems for p in pp]                                  # path b * K + k
    width = 0 if warmup or cfg.lambda_ == 0 else A  # answer tokens to read: Eq. 3 needs them
    student = lambda ids: run_pass(body, head, [paths[i] for i in ids], device, width,
                                   cfg.packing, cfg.loss_chunk)  # L_real (n,), log-probs (n, A, V)
    if cfg.max_tokens_per_pass > 0:  # the same step in passes of bounded memory (fast.py)
        student = fast.bounded_paths(student, [len(p.ids) for p in paths],
                                     cfg.max_tokens_per_pass, cfg.packing, device)
    with torch.set_grad_enabled(not warmup), fast.autocast(device):
        l_real, answer_lp = student(range(B * K))                              # every path
    l_real = l_real.view(B, K)                                                         # (B, K)
    answer_lp = answer_lp.view(B, K, A, -1) if width else None                  # (B, K, A, V)
    scores = metanet(h_x.to(device), h_r.to(device)) if cfg.metanet_used else None     # (B, K)
    l_meta = metanet_loss(scores, l_real, cfg.tau) if scores is not None else None    # Eq. 1
    selected, alpha = variant_weights(cfg.variant, scores, l_real, cfg.beta, cfg.tau,
                                      cfg.tau_student)                          # I_dyn, alpha
    l_student, l_sft, l_cons = total_loss(alpha, l_real, answer_lp,
                                          real_answer_tokens(problems, A, device), cfg.lambda_)
    del answer_lp  # (B, K, A, V): in the bounded step, its gradient takes its place in pass 2
    # The two backward calls. Eq. 1 moves MetaNet only: L_real is its target, detached. Eq. 4
    # moves the student only: MetaNet reaches it through I_dyn and alpha, which are constants.
    if l_meta is not None:
        (l_meta * meta_scale).backward()
    if not warmup:
        (scaler.scale(l_student * scale) if scaler else l_student * scale).backward()
    info = {"scores": scores, "l_real": l_real, "selected": selected, "alpha": alpha, "sft": l_sft,
            "cons": l_cons, "student": l_student, "meta": l_meta}
    info = {k: v if v is None else v.detach() for k, v in info.items()}
    return info.pop("meta"), info | {"tokens": sum(len(p.ids) for p in paths), "warmup": warmup}


# ----------------------------------------------------------------------------------------------
# 7. The schedule (3.3.2, 3.4): warmup (MetaNet alone, against the frozen student), then MetaNet's
# calibration and the student's training together; a log line per interval, a checkpoint per epoch.
@dataclass
class Training:
    """What a training run holds; prepare() builds it, train_epoch() advances it."""
    cfg: Config
    device: torch.device
    world: int                  # processes (torchrun)
    out: Path
    rows: list[dict]            # the problems
    paths: list                 # per problem, its K TokenPaths
    h_x: torch.Tensor           # (N, D) Sentence-BERT embeddings of the problems
    h_r: torch.Tensor           # (N, K, D) and of their rationales
    peft_model: nn.Module
    metanet: MetaNet
    student_opt: torch.optim.Optimizer  # the student's LoRA weights
    meta_opt: torch.optim.Optimizer   # MetaNet's
    lr: float
    epochs: int                 # the student's, after the warmup
    warmup_epochs: int
    steps_per_epoch: int
    subjects: list[str]         # for the per-subject alpha records (Section 5)
    identity: dict              # what defines the run, saved in each checkpoint (infra.py)
    step: int = 0               # optimizer steps done
    epoch: int = 0              # where to start (after --resume: where the checkpoint was)
    micro: int = 0
    checkpoint: Path | None = None
    scaler: torch.amp.GradScaler | None = None  # loss scaling in fp16 (fast.precision)
    saved_at: tuple[int, int] | None = None     # (epoch, micro) of the latest checkpoint

    @property
    def body(self):  # the student without its LM head
        return self.peft_model.get_base_model().base_model

    @property
    def head(self):
        return self.peft_model.get_base_model().get_output_embeddings()

    @property
    def lora(self):  # the student's trained weights
        return self.student_opt.param_groups[0]["params"]


def prepare(cfg: Config) -> Training:
    """Data, student, encoder embeddings, tokenized paths, MetaNet, optimizers; a resumed run's
    state from its latest checkpoint."""
    rnk, world, device = setup_distributed(cfg)
    torch.manual_seed(cfg.seed)
    out = Path(cfg.out)
    claim_out(out, cfg.resume)  # one that holds checkpoints only with --resume: nothing overwritten
    data_path = data_file(cfg)
    rows = load_data(data_path)
    log = print if rnk == 0 else (lambda *a, **k: None)
    log(f"data: {len(rows)} problems x {K} perspectives from {data_path}")
    demo_data_note(cfg.student, data_path, len(rows), log)  # a real student on the demo sample
    identity = run_identity(cfg, data_path)  # what defines the run; --resume refuses any other
    saved = find_checkpoint(out, world, device, identity, log) if cfg.resume else None

    texts = [r["problem"] for r in rows] + [t for r in rows for t in r["rationales"].values()]
    free = torch.cuda.mem_get_info(device)[0] if device.type == "cuda" else None  # before loading
    peft_model, tok, n_params, encoder = load_student(cfg.student, cfg, texts, device)
    if cfg.max_tokens_per_pass == 0:  # the largest pass budget that the card holds
        cfg.max_tokens_per_pass = fast.auto_pass_budget(cfg, peft_model.config, n_params, free)
        log(f"passes of up to {cfg.max_tokens_per_pass} tokens (--max-tokens-per-pass 0: from "
            f"the free GPU memory)")
    small = n_params < Config.LARGE_STUDENT  # Table 8's two rows: 1.5B-class and 7B/8B-class
    lr = cfg.lr or (Config.TINY_LR if cfg.student == "tiny" else 5e-5 if small else 1e-4)
    epochs = cfg.epochs or (8 if small else 6)
    default_encoder = "tiny" if cfg.student == "tiny" else "sentence-transformers/all-MiniLM-L6-v2"
    encoder_id = cfg.encoder or default_encoder
    if encoder is None or encoder_id != "tiny":
        from sentence_transformers import SentenceTransformer
        encoder = from_hub(SentenceTransformer, encoder_id, "--encoder", device=str(device))
    # the seed is part of the cache key: the tiny encoder's weights are drawn from it
    h_x, h_r = embed(encoder, rows, out / "embeddings.pt", f"{encoder_id}:{cfg.seed}")
    del encoder
    paths, n_cut = tokenize_paths(tok, rows, cfg.max_len)
    if n_cut:
        log(f"warning: {n_cut} of {len(rows) * K} rationales exceed --max-len {cfg.max_len}: cut")

    synergy = cfg.variant != "no-synergy"
    metanet = MetaNet(h_x.shape[-1], cfg.meta_dim, cfg.meta_heads, synergy=synergy).to(device)
    lora_params = [p for p in peft_model.parameters() if p.requires_grad]
    student_opt = torch.optim.AdamW(lora_params, lr=lr, weight_decay=0.0)
    meta_opt = torch.optim.AdamW(metanet.parameters(), lr=cfg.meta_lr_warmup, weight_decay=0.0)
    n_micro = len(epoch_batches(len(rows), cfg.batch_size, cfg.seed, 0, rnk, world))
    have = all("subject" in r for r in rows)
    identity = run_identity(cfg, data_path, lr=lr, epochs=epochs, encoder=encoder_id, tokenizer=tok)
    run = Training(cfg, device, world, out, rows, paths, h_x, h_r, peft_model, metanet, student_opt,
                   meta_opt,
              lr, epochs, cfg.warmup_epochs if cfg.metanet_used else 0,  # no MetaNet, no warmup
              math.ceil(n_micro / cfg.grad_accum), sorted({r["subject"] for r in rows}) if have else [],
              identity)
    if saved:
        run.step, run.epoch, run.micro = load_checkpoint(saved, identity, peft_model, metanet,
                                                         student_opt, meta_opt, log)
        run.checkpoint, run.saved_at = saved, (run.epoch, run.micro)
    run.scaler = fast.grad_scaler(device)  # loss scaling where the student computes in fp16
    broadcast_from_rank0([*lora_params, *metanet.parameters()])  # one start for all processes
    log(f"student: {cfg.student} ({n_params / 1e6:,.1f}M), lr {lr:g}, {run.warmup_epochs} warmup + "
        f"{epochs} epochs, {planned_steps(run)} optimizer steps, {world} process(es) on {device}")
    return run


def planned_steps(run: Training) -> int:
    total = (run.warmup_epochs + run.epochs) * run.steps_per_epoch
    return min(total, run.cfg.max_steps) if run.cfg.max_steps else total


def accumulation_window(i: int, n: int, every: int) -> tuple[int, bool]:
    """Micro-batch i of an epoch's n, with an optimizer step after every `every` of them and after
    the last: (the size of i's window, whether the step follows i). The epoch's last window can be
    shorter; each gradient is divided by its window's real size, so every step averages."""
    return min(every, n - i // every * every), (i + 1) % every == 0 or i == n - 1


def optimizer_step(opt, params, max_norm: float | None = None, scaler=None) -> None:
    """Mean of the accumulated gradients over the processes, clip, step, zero. With a GradScaler
    (fp16), the gradients are unscaled before clipping, and a step with inf/NaN is skipped.

    The all-reduce is done here, not by DDP: DDP all-reduces in hooks on every backward, and
    micro_step runs one backward per pass, so several per micro-batch."""
    params = list(params)
    if dist.is_initialized():
        flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).flatten()
                          for p in params])
        dist.all_reduce(flat)
        for p, g in zip(params, (flat / dist.get_world_size()).split([p.numel() for p in params])):
            p.grad = g.view_as(p)
    if scaler:
        scaler.unscale_(opt)
    if max_norm is not None:
        torch.nn.utils.clip_grad_norm_(params, max_norm)
    if scaler:
        scaler.step(opt)
        scaler.update()
    else:
        opt.step()
    opt.zero_grad(set_to_none=True)


def save(run: Training, epoch: int, micro: int) -> None:
    """A checkpoint of the run as it is before micro-batch `micro` of `epoch`."""
    run.checkpoint = save_checkpoint(run.out, run.step, epoch, micro, run.peft_model, run.metanet,
                                     run.student_opt, run.meta_opt, run.world, run.identity)
    run.saved_at = (epoch, micro)


def train_epoch(run: Training, epoch: int, warmup: bool, log: RunLog, stop: StopOnSignal) -> bool:
    """One epoch of micro-batches; True if the run stops here (a signal, or --max-steps)."""
    cfg = run.cfg
    # MetaNet's hysteresis (3.3.2): while calibrating, it accumulates over more micro-batches than
    # the student. In the warmup (ours: the paper gives no accumulation) it takes the student's.
    meta_accum = cfg.grad_accum if warmup else cfg.meta_grad_accum
    for group in run.meta_opt.param_groups:
        group["lr"] = cfg.meta_lr_warmup if warmup else cfg.meta_lr
    batches = epoch_batches(len(run.rows), cfg.batch_size, cfg.seed, epoch, rank(), run.world)
    first = run.micro if epoch == run.epoch else 0
    for i in range(first, len(batches)):
        idx, last = batches[i], i == len(batches) - 1
        n_acc, student_due = accumulation_window(i, len(batches), cfg.grad_accum)
        n_meta, meta_due = accumulation_window(i, len(batches), meta_accum)
        l_meta, info = guarded_step(run, epoch, i, idx, warmup, 1 / n_acc, 1 / n_meta, log)
        if meta_due and cfg.metanet_used:
            optimizer_step(run.meta_opt, run.metanet.parameters())
        log.add(l_meta, info, [run.rows[b].get("subject") for b in idx])
        if not student_due:
            continue
        if not warmup:  # the warmup leaves the student as it was
            optimizer_step(run.student_opt, run.lora, cfg.max_grad_norm, run.scaler)
        run.step += 1
        log.step_done()
        if run.step % cfg.log_every == 0 or last:
            meta_lr = run.meta_opt.param_groups[0]["lr"]
            log.write_step(run.step, epoch + (i + 1) / len(batches), warmup, run.lr, meta_lr)
        if last:  # the mean alpha per (subject, perspective) over a joint epoch: Section 5
            log.end_epoch(epoch + 1, write=not warmup)
        halt = run.step == cfg.max_steps or stop.asked_anywhere(run.device)
        if last or halt:  # a checkpoint at every epoch end, and wherever the run stops early
            save(run, *((epoch + 1, 0) if last else (epoch, i + 1)))
        if halt:
            return True
    return False


def guarded_step(run: Training, epoch: int, i: int, idx: list[int], warmup: bool, scale: float,
                 meta_scale: float, log: RunLog):
    """micro_step on micro-batch i of the epoch (problems idx), with what a long run needs around
    it: an out-of-memory error redoes it in smaller passes (the numbers do not change), and where
    even one path cannot fit, the run ends with a checkpoint from before it; a NaN or inf loss stops
    the run before any optimizer step (infra.stop_if_diverged)."""
    cfg = run.cfg
    problems = [run.paths[b] for b in idx]
    attempt = lambda: micro_step(cfg, problems, run.h_x[idx], run.h_r[idx], run.metanet, run.body,
                                 run.head, warmup, run.device, scale, meta_scale, run.scaler)
    longest = max(len(p.ids) for pp in problems for p in pp)
    say = lambda line: log.event(line, kind="oom", step=run.step,
                                 max_tokens_per_pass=cfg.max_tokens_per_pass)
    try:
        l_meta, info = fast.retry_on_oom(attempt, [*run.lora, *run.metanet.parameters()], cfg,
                                         longest, say)
    except fast.OutOfMemory as e:  # nothing is lost: a checkpoint from before this micro-batch
        if (epoch, i) != run.saved_at:
            save(run, epoch, i)
        raise DataError(f"{e}; the run so far is in {run.checkpoint} (--resume)") from None
    stop_if_diverged(run.step + 1, l_meta, info, run.device, run.out)  # NaN: stop, save nothing
    return l_meta, info


def main(cfg: Config) -> dict:
    """Trains a student as Section 3.3.2 schedules it; returns where the results went."""
    run = prepare(cfg)
    n_epochs, total = run.warmup_epochs + run.epochs, planned_steps(run)
    log = RunLog(run.out, rank() == 0, total, run.step, cfg.variant, cfg.metanet_used,
                 run.subjects, run.device)
    try:
        with StopOnSignal() as stop:
            for epoch in range(run.epoch, n_epochs):
                # 3.3.2: MetaNet alone against the frozen student, then MetaNet and student together
                warmup = epoch < run.warmup_epochs
                if train_epoch(run, epoch, warmup, log, stop):
                    if run.step < n_epochs * run.steps_per_epoch:  # not the very last step
                        log.print(f"stopped at step {run.step}; continue with the same command "
                                  f"plus --resume")
                    break
    finally:
        torch.use_deterministic_algorithms(False)  # global state: leave it as found
        log.close()
    if run.checkpoint is not None:  # out/adapter (for PeftModel.from_pretrained), out/metanet.pt
        save_final(run.out, run.peft_model, run.metanet, run.checkpoint)
    if dist.is_initialized():
        dist.destroy_process_group()
    return {"out": str(run.out), "step": run.step, "metrics": log.last,
            "checkpoint": str(run.checkpoint) if run.checkpoint else None,
            "lr": run.lr, "epochs": run.epochs}


if __name__ == "__main__":
    try:
        main(parse_args())
    except (DataError, OSError, Diverged) as e:  # bad data or model, a missing file, a NaN loss
        fail(e)  # one line on stderr (rank 0), exit status 2
