"""What makes mind.py's training step fast and small on a GPU. None of it changes a number.

mind.py calls four things from here:
  student_forward   runs the student body over a few paths, packed back to back in one row (no
                    padding) or as the usual right-padded batch, and returns their hidden states;
  target_logprobs   log p(token) per label position, with only a chunk of (rows, V) logits alive;
  enable_packing    registers `packed_attention` with transformers, so a packed row attends per path;
  autocast, to_device, student_dtype, skip_lora_input_cast: precision and copies.

Each piece is ordinary PyTorch and can be read (or replaced by the plain version named in its
docstring) without the others.
"""
import itertools

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint


# ----------------------------------------------------------------------------------------------------
# Precision and copies.
def student_dtype(device) -> torch.dtype:
    """bf16 weights on GPUs that have bf16, fp32 elsewhere."""
    return torch.bfloat16 if device.type == "cuda" and torch.cuda.is_bf16_supported() else torch.float32


def autocast(device):
    """bf16 autocast where the weights are bf16 (student_dtype); a no-op elsewhere."""
    return torch.autocast(device.type, torch.bfloat16, enabled=student_dtype(device) == torch.bfloat16)


def to_device(device, *tensors):
    """CPU tensors to the device without stalling it: a plain .to("cuda") waits for all queued GPU
    work; a copy from pinned memory is queued like a kernel."""
    if device.type != "cuda":
        return list(tensors)
    return [t.pin_memory().to(device, non_blocking=True) for t in tensors]


def skip_lora_input_cast(peft_model) -> None:
    """peft casts each bf16 activation to the fp32 adapter weights and back; under autocast the
    adapter matmuls already run in bf16, so the round trip only costs memory and time."""
    for m in peft_model.modules():
        if hasattr(m, "cast_input_dtype_enabled"):
            m.cast_input_dtype_enabled = False


# ----------------------------------------------------------------------------------------------------
# Packed paths: several paths in one row, each attending only to itself.
PACKED = "mind_packed"  # our attention function's name in transformers' AttentionInterface
try:
    from torch.nn.attention.varlen import varlen_attn  # flash attention over packed rows (torch >= 2.10)
except ImportError:
    varlen_attn = None


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
    if "cu_seq_lens_q" not in kw:  # a plain padded batch (--no-packing, generation): transformers' SDPA
        from transformers.integrations.sdpa_attention import sdpa_attention_forward
        return sdpa_attention_forward(module, query, key, value, attention_mask,
                                      scaling=scaling, dropout=dropout, **kw)
    cu, longest = kw["cu_seq_lens_q"], kw["max_length_q"]
    q, k, v = (t[0].transpose(0, 1) for t in (query, key, value))              # (N, heads, D)
    # Grouped-query attention: each k/v head serves several query heads.
    if k.shape[1] != q.shape[1]:
        k, v = (t.repeat_interleave(q.shape[1] // t.shape[1], 1) for t in (k, v))
    flash = varlen_attn and q.is_cuda and q.dtype != torch.float32
    if flash and not torch.are_deterministic_algorithms_enabled():
        # window_size (-1, 0): every earlier token, no later one, i.e. causal
        out = varlen_attn(q, k, v, cu, cu, longest, longest, scale=scaling, window_size=(-1, 0))
    else:
        at = cu.tolist()
        out = torch.cat([_causal_sdpa(q[s:e], k[s:e], v[s:e], scaling) for s, e in zip(at, at[1:])])
    return out[None], None                                                     # (1, N, H, D)


def _causal_sdpa(q, k, v, scale):
    """One path's causal attention; q, k, v (n, heads, D) -> (n, heads, D)."""
    out = F.scaled_dot_product_attention(q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1),
                                         is_causal=True, scale=scale)
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
        out = body(input_ids=ids[None], position_ids=pos[None], cu_seq_lens_q=cu, cu_seq_lens_k=cu,
                   max_length_q=max(lens), max_length_k=max(lens))
        return out.last_hidden_state[0], ids, start[:-1]                       # (N, H), (N,)
    T = max(lens)
    ids = torch.zeros(len(seqs), T, dtype=torch.long)
    att = torch.zeros(len(seqs), T, dtype=torch.long)
    for n, s in enumerate(seqs):
        ids[n, : lens[n]] = torch.tensor(s)
        att[n, : lens[n]] = 1
    ids, att = to_device(device, ids, att)
    hidden = body(input_ids=ids, attention_mask=att).last_hidden_state         # (n, T, H)
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
