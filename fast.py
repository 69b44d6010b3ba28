"""What makes mind.py's training step fast and small on a GPU. None of it changes a number.

mind.py calls five things from here:
  bounded_paths     the drop-in for the student over all of a micro-batch's paths at once: the
                    same values and gradients, with at most --max-tokens-per-pass tokens per pass;
  student_forward   runs the student body over a few paths, packed back to back in one row (no
                    padding) or as the usual right-padded batch, and returns their hidden states;
  target_logprobs   log p(token) per label position, with only a chunk of (rows, V) logits alive;
  enable_packing    registers `packed_attention` with transformers, so a packed row attends per path;
  autocast, to_device, student_dtype, skip_lora_input_cast: precision and copies.

Each piece is ordinary PyTorch and can be read (or replaced by the plain version named in its
docstring) without the others.
"""
import functools, gc, inspect, itertools

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint


# ----------------------------------------------------------------------------------------------------
# Precision: what the GPU really has.
def precision(device) -> str:
    """The student's compute precision on `device`: "bf16", "fp16" or "fp32".

    bf16 on GPUs that have it natively, compute capability 8.0 or more (A100, RTX 30xx and newer).
    Older GPUs (T4, V100) have fast fp16 tensor cores and no bf16 units; torch.cuda.is_bf16_supported()
    can still answer True there, through slow emulation. They get fp16 autocast with loss scaling
    (torch.amp.GradScaler), which keeps small gradients from flushing to zero in fp16. fp32 on the CPU."""
    if device.type != "cuda":
        return "fp32"
    return "bf16" if torch.cuda.get_device_capability(device)[0] >= 8 else "fp16"


DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def student_dtype(device) -> torch.dtype:
    """The dtype to load the student's frozen weights in: its compute precision."""
    return DTYPES[precision(device)]


def autocast(device):
    """Autocast to the compute precision (bf16 or fp16); a no-op in fp32."""
    p = precision(device)
    return torch.autocast(device.type, DTYPES[p], enabled=p != "fp32")


def grad_scaler(device):
    """Loss scaling for fp16; an inert scaler (scale() returns the loss, step() steps) otherwise."""
    return torch.amp.GradScaler(device.type, enabled=precision(device) == "fp16")


def to_device(device, *tensors):
    """CPU tensors to the device without stalling it: a plain .to("cuda") waits for all queued GPU
    work; a copy from pinned memory is queued like a kernel."""
    if device.type != "cuda":
        return list(tensors)
    return [t.pin_memory().to(device, non_blocking=True) for t in tensors]


def enable_checkpointing(model) -> None:
    """Gradient checkpointing: each layer's activations are recomputed in the backward pass."""
    if hasattr(model, "activation_checkpointing_enable"):  # its name from transformers 5.24
        model.activation_checkpointing_enable({"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def skip_lora_input_cast(peft_model) -> None:
    """peft casts each bf16 activation to the fp32 adapter weights and back; under autocast the
    adapter matmuls already run in bf16, so the round trip only costs memory and time."""
    for m in peft_model.modules():
        if hasattr(m, "cast_input_dtype_enabled"):
            m.cast_input_dtype_enabled = False


# ----------------------------------------------------------------------------------------------------
# Passes of bounded size: how micro_step groups paths (any grouping gives the same numbers).
def plan_passes(lengths: list[int], budget: int, packed: bool) -> list[list[int]]:
    """Groups path indices into passes of at most `budget` tokens: real tokens when packed, padded
    ones (paths x longest) otherwise. First fit, longest first, so a pass's first path is its
    longest; a path longer than the budget runs alone."""
    passes = []
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        for p in passes:
            tokens = sum(lengths[j] for j in p) + lengths[i] if packed else (len(p) + 1) * lengths[p[0]]
            if tokens <= budget:
                p.append(i)
                break
        else:
            passes.append([i])
    return passes


def bounded_paths(student, lengths: list[int], budget: int, packed: bool, device):
    """The student over many paths in passes of at most `budget` tokens: a drop-in for `student`.

    student(ids) -> (L_real (n,), answer log-probs (n, A, V) or None) for the paths `ids`, with
    gradients when autograd is on: mind.micro_step's one pass over all B*K paths, whose memory grows
    with them. bounded_paths(...)(ids) returns the same two tensors in two passes over the paths:
      pass 1, at once: every path, in passes of at most `budget` tokens, without gradients;
      pass 2, when the caller backpropagates a loss L of these tensors (mind.py: Eq. 4): the paths
        that L depends on run again with gradients, one pass at a time, and each pass
        backpropagates the gradient that L sends to its paths' values.
    Why that is exactly the gradient of the plain step: L depends on the weights only through the
    per-path values v_k (L_real,k and the answer log-probs), so by the chain rule
        dL/dtheta = sum over paths k of <dL/dv_k, dv_k/dtheta>.
    Autograd evaluates L once, on the full (B, K) values, and delivers every dL/dv_k here (the
    backward of _PathValues); a pass over a group of paths adds its terms of the sum; summed over
    the passes, that is every term. A path with dL/dv_k = 0 (outside I_dyn) is not run again. This
    holds because both passes compute the same function of the weights (mind.Config refuses LoRA
    dropout, add_lora zeroes every other dropout). "Exactly" is mathematical: the passes group
    paths differently, so sums round differently (in bf16 on a GPU, about 1e-3 relative);
    test_mind.py holds the two steps equal in fp32. docs/performance.md counts the memory."""
    def run(ids):
        if not torch.is_grad_enabled():  # the warmup: values only, no second pass
            return _PathValues.measure(student, lengths, budget, packed, ids)
        anchor = torch.zeros((), device=device, requires_grad=True)  # makes autograd call pass 2
        return _PathValues.apply(anchor, student, lengths, budget, packed, list(ids))
    return run


class _PathValues(torch.autograd.Function):
    """Pass 1 in forward, pass 2 in backward (bounded_paths)."""

    @staticmethod
    def measure(student, lengths, budget, packed, ids):
        """Pass 1: L_real (n,) and answer log-probs (n, A, V) or None, without gradients."""
        l_real, answer_lp = None, None
        with torch.no_grad():
            for part in plan_passes([lengths[i] for i in ids], budget, packed):
                loss, lp = student([ids[n] for n in part])
                if l_real is None:
                    l_real = loss.new_zeros(len(ids), dtype=torch.float32)
                    answer_lp = None if lp is None else lp.new_zeros(len(ids), *lp.shape[1:])
                at, = to_device(loss.device, torch.tensor(part))
                l_real[at] = loss.float()
                if lp is not None:
                    answer_lp[at] = lp
        return l_real, answer_lp

    @staticmethod
    def forward(ctx, anchor, student, lengths, budget, packed, ids):
        ctx.args, ctx.device = (student, lengths, budget, packed, ids), anchor.device
        ctx.autocast = torch.get_autocast_dtype(anchor.device.type), torch.is_autocast_enabled(
            anchor.device.type)
        return _PathValues.measure(student, lengths, budget, packed, ids)

    @staticmethod
    def backward(ctx, grad_loss, grad_lp):
        student, lengths, budget, packed, ids = ctx.args
        if grad_loss is None:  # L does not read L_real (a loss of the answer log-probs alone)
            grad_loss = torch.zeros(len(ids), device=ctx.device)
        used = grad_loss != 0                                       # dL/dv_k: (n,), (n, A, V)
        if grad_lp is not None:
            used |= grad_lp.flatten(1).ne(0).any(1)
        live = used.nonzero().flatten().tolist()                    # the paths L depends on
        dtype, enabled = ctx.autocast
        for part in plan_passes([lengths[ids[n]] for n in live], budget, packed):
            rows = [live[n] for n in part]                          # positions in ids
            at, = to_device(grad_loss.device, torch.tensor(rows))
            with torch.enable_grad(), torch.autocast(grad_loss.device.type, dtype, enabled=enabled):
                loss, lp = student([ids[n] for n in rows])
            values, grads = [loss.float()], [grad_loss[at]]
            if lp is not None and grad_lp is not None:
                values, grads = values + [lp], grads + [grad_lp[at]]
            torch.autograd.backward(values, grads)                  # this pass's terms of dL/dtheta
        return None, None, None, None, None, None


def auto_pass_budget(cfg, model_config, n_params: int, free_bytes: int | None) -> int:
    """--max-tokens-per-pass 0: the largest budget whose estimated peak (memory.memory_model, with
    its allowance) fits `free_bytes`, the GPU memory free before the student was loaded; without a
    GPU, the default (mind.Config.PASS_BUDGET)."""
    if free_bytes is None:
        return cfg.PASS_BUDGET
    import memory
    checkpointing = cfg.grad_checkpointing or (cfg.grad_checkpointing is None
                                               and n_params >= cfg.LARGE_STUDENT)
    return memory.auto_pass_budget(free_bytes, model_config, bool(checkpointing), cfg.batch_size,
                                   cfg.max_len, lora_r=cfg.lora_r, loss_chunk=cfg.loss_chunk)


# ----------------------------------------------------------------------------------------------------
# Packed paths: several paths in one row, each attending only to itself.
PACKED = "mind_packed"  # our attention function's name in transformers' AttentionInterface
try:
    from torch.nn.attention.varlen import varlen_attn  # flash attention over packed rows (torch >= 2.10)
except ImportError:
    varlen_attn = None
PACKED_PASS = False  # True while student_forward runs a packed row (packed_attention checks it)


def flash_varlen_ok(fn, capability: tuple[int, int], dtype) -> bool:
    """Whether varlen flash attention can run: torch has it with the keywords we call (2.10 has
    neither `scale` nor `window_size`), the GPU is Ampere or newer (FlashAttention's requirement)
    and the tensors are half precision."""
    if fn is None:
        return False
    params = inspect.signature(fn).parameters
    return ("scale" in params and "window_size" in params and capability[0] >= 8
            and dtype in (torch.bfloat16, torch.float16))


@functools.lru_cache
def _capability(index: int) -> tuple[int, int]:
    return torch.cuda.get_device_capability(index)


def enable_packing(model) -> bool:
    """Makes `model` use packed_attention; False if the model cannot take a custom attention
    function (it then keeps its own, and mind.py falls back to padded passes)."""
    from transformers import AttentionInterface
    AttentionInterface.register(PACKED, packed_attention)
    model.set_attn_implementation(PACKED)  # a model that cannot take it warns and keeps its own
    return model.config._attn_implementation == PACKED


def packed_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kw):
    """Attention over paths packed back to back in one row: each path attends, causally, to itself.

    query (1, H, N, D), key and value (1, H_kv, N, D); kw["cu_seq_lens_q"] (n + 1,) holds where each
    of the n paths starts. No padding and no (N, N) mask exist. On CUDA in bf16 this is PyTorch's
    varlen flash attention; elsewhere one causal SDPA per path, which computes the same thing."""
    if "cu_seq_lens_q" not in kw:
        # Without the boundaries, a packed row would be one long sequence: the paths would attend
        # to each other, silently. Only a plain padded batch may come here.
        if PACKED_PASS:
            raise RuntimeError(f"{type(module).__name__} did not pass the sequence boundaries "
                               f"(cu_seq_lens_q) to its attention: packed paths would see each "
                               f"other; train this model with --no-packing")
        from transformers.integrations.sdpa_attention import sdpa_attention_forward
        return sdpa_attention_forward(module, query, key, value, attention_mask,
                                      scaling=scaling, dropout=dropout, **kw)
    cu, longest = kw["cu_seq_lens_q"], kw["max_length_q"]
    q, k, v = (t[0].transpose(0, 1) for t in (query, key, value))              # (N, heads, D)
    flash = q.is_cuda and flash_varlen_ok(varlen_attn, _capability(q.device.index or 0), q.dtype)
    if flash and not torch.are_deterministic_algorithms_enabled():
        # Grouped-query attention: each k/v head serves several query heads. Where the kernel
        # takes enable_gqa (torch 2.13) it reads the shared heads; else we repeat them, and the
        # repeats are saved for backward.
        gqa = {"enable_gqa": True} if GQA_KW else {}
        if k.shape[1] != q.shape[1] and not GQA_KW:
            k, v = (t.repeat_interleave(q.shape[1] // t.shape[1], 1) for t in (k, v))
        # window_size (-1, 0): every earlier token, no later one, i.e. causal
        out = varlen_attn(q, k, v, cu, cu, longest, longest, scale=scaling, window_size=(-1, 0),
                          **gqa)
    else:
        at = cu.tolist()
        out = torch.cat([_causal_sdpa(q[s:e], k[s:e], v[s:e], scaling) for s, e in zip(at, at[1:])])
    return out[None], None                                                     # (1, N, H, D)


GQA_KW = varlen_attn is not None and "enable_gqa" in inspect.signature(varlen_attn).parameters


def _causal_sdpa(q, k, v, scale):
    """One path's causal attention; q (n, H, D), k and v (n, H_kv, D) -> (n, H, D). enable_gqa
    lets SDPA read shared k/v heads without repeating them (nothing repeated is saved)."""
    out = F.scaled_dot_product_attention(q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1),
                                         is_causal=True, scale=scale,
                                         enable_gqa=k.shape[1] != q.shape[1])
    return out.transpose(0, 1)


def student_forward(body, seqs: list[list[int]], packed: bool, device):
    """The student body (the model without its LM head) over a few token sequences.

    Returns hidden (N, H), ids (N,) and start: sequence n occupies rows start[n] .. start[n] +
    len(seqs[n]) of both. Packed: one row, sequence after sequence, positions restarting at 0, so
    there is no padding at all. Otherwise the usual (n, T) right-padded batch, flattened; the padding
    rows are there but never read. The plain version: one body(input_ids=...) call per sequence."""
    lens = [len(s) for s in seqs]
    if packed:
        start = [0, *itertools.accumulate(lens)]
        ids, pos, cu = to_device(device, torch.tensor([t for s in seqs for t in s]),
                                 torch.cat([torch.arange(n) for n in lens]),
                                 torch.tensor(start, dtype=torch.int32))
        global PACKED_PASS
        PACKED_PASS = True
        try:  # use_cache=False: a training pass needs no KV cache (88 MB at 3072 tokens, 1.5B)
            out = body(input_ids=ids[None], position_ids=pos[None], cu_seq_lens_q=cu,
                       cu_seq_lens_k=cu, max_length_q=max(lens), max_length_k=max(lens),
                       use_cache=False)
        finally:
            PACKED_PASS = False
        return out.last_hidden_state[0], ids, start[:-1]                       # (N, H), (N,)
    T = max(lens)
    ids = torch.zeros(len(seqs), T, dtype=torch.long)
    att = torch.zeros(len(seqs), T, dtype=torch.long)
    for n, s in enumerate(seqs):
        ids[n, : lens[n]] = torch.tensor(s)
        att[n, : lens[n]] = 1
    ids, att = to_device(device, ids, att)
    hidden = body(input_ids=ids, attention_mask=att, use_cache=False).last_hidden_state  # (n, T, H)
    return hidden.flatten(0, 1), ids.flatten(), [n * T for n in range(len(seqs))]


# ----------------------------------------------------------------------------------------------------
# The LM head without (N, V) logits.
def target_logprobs(head, hidden, targets, chunk: int):
    """log p(target_i) for each row of hidden (M, H) -> (M,). Only `chunk` rows of (chunk, V) fp32
    logits are alive at a time; under autograd each chunk is recomputed in the backward pass.
    The plain version: F.log_softmax(head(hidden).float(), -1).gather(1, targets[:, None])[:, 0]."""
    def one(h, t):
        logits = head(h).float()                                                   # (c, V)
        return logits.gather(1, t[:, None]).squeeze(1) - logits.logsumexp(-1)     # (c,)
    grad = torch.is_grad_enabled()
    parts = [checkpoint(one, h, t, use_reentrant=False) if grad else one(h, t)
             for h, t in zip(hidden.split(chunk), targets.split(chunk))]
    return torch.cat(parts)


# ----------------------------------------------------------------------------------------------------
# Out of memory: the pass budget never changes a number, so a micro-step that does not fit is redone
# with smaller passes.
class OutOfMemory(Exception):
    """Even passes of one path each do not fit; the message names the flags that would help."""


OOM_ERROR = getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError)  # the generic name


def free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def retry_on_oom(step, params, cfg, longest: int, say=print):
    """Runs step() (one micro-step) and returns what it returns. On torch.OutOfMemoryError, from
    any device, what step() had already added to the gradients of `params` is undone, the pass
    budget cfg.max_tokens_per_pass is halved for the rest of the run, and step() runs again. Once
    the budget is below the micro-batch's longest path (so each of those runs alone), another
    error raises OutOfMemory."""
    saved = [None if p.grad is None else p.grad.clone() for p in params]
    while True:
        try:
            return step()
        except OOM_ERROR:
            pass  # leave the except block first: its traceback holds the failed pass's tensors
        for p, g in zip(params, saved):
            p.grad = None if g is None else g.clone()
        free_memory()
        budget = cfg.max_tokens_per_pass
        if budget < 0:  # the plain step holds every path at once: the bounded one is the remedy
            raise OutOfMemory("out of memory in the plain step (--max-tokens-per-pass -1), which "
                              "holds every path at once; try --max-tokens-per-pass 2048 or 0")
        if budget < longest:
            raise OutOfMemory(f"out of memory with passes of {budget} tokens: a path of {longest} "
                              f"tokens does not fit alone; try a smaller --max-len, "
                              f"--grad-checkpointing, or a smaller --batch-size")
        cfg.max_tokens_per_pass = budget // 2
        say(f"out of memory with passes of {budget} tokens: micro-step redone with "
            f"--max-tokens-per-pass {budget // 2}, kept from now on (the numbers do not change)")
