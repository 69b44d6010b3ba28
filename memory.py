"""The memory model of MIND's training step: the peak GPU memory of one mind.micro_step in passes of
at most --max-tokens-per-pass tokens (fast.bounded_paths), from a formula in the student's shapes.

mind.py reads it at run time for --max-tokens-per-pass 0 (auto_pass_budget: the largest budget that
the free GPU memory holds); bench.py --memory prints its table; test_memory.py holds every formula
against the bytes that autograd keeps, and the whole model against the peak of small steps, counted
on the CPU. It imports neither mind.py nor the benchmark.
"""
import math

from prompts import PERSPECTIVE_KEYS

K = len(PERSPECTIVE_KEYS)  # paths per problem

SHAPES = {  # from the published configs of Qwen2.5-1.5B and Qwen2.5-7B
    "1.5b": dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
                 num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True),
    "7b": dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
               num_key_value_heads=4, vocab_size=152064, tie_word_embeddings=False),
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=512, tie_word_embeddings=True),
}


# A written-down estimate of the peak GPU memory of one mind.micro_step: bf16 base weights, LoRA on
# all linear layers with fp32 adapters and AdamW, packed passes with varlen flash attention, every
# path selected and max_len tokens long. The activations come from a formula in the layer shapes,
# not from a measured constant; test_memory.py holds the formula against the bytes autograd keeps
# on the CPU, and the whole model against the peak of a small step on the CPU.
GiB = 2 ** 30
BF16, FP32, INT64 = 2, 4, 8
# The allowance on top of the estimated peak of allocated memory (what
# torch.cuda.max_memory_allocated would report): 1 GiB that the card loses outside PyTorch's
# counters (the CUDA context with its kernels, a few hundred MiB; cuBLAS/cuDNN workspaces; NCCL
# buffers under torchrun), and 10% of the peak for the caching allocator's blocks that are reserved
# but free (the passes vary in size, so freed blocks do not always fit the next request). Our
# figure, not a measurement: in training loops like this one reserved memory tends to exceed
# allocated by 5-15%; expandable segments lower it.
ALLOWANCE_FIXED, ALLOWANCE_SHARE = 1 * GiB, 0.10
LOGITS_CHUNK_BYTES = 16  # per row and vocabulary entry at the loss chunk's peak (see memory_model)


def dims(shape) -> dict:
    """The sizes the memory model reads, from a SHAPES key, a dict like those in SHAPES or a
    transformers config of a Qwen2/Llama-like decoder (RMSNorm, rotary positions, SwiGLU MLP)."""
    if isinstance(shape, str):
        shape = SHAPES[shape]
    get = shape.get if isinstance(shape, dict) else lambda key, default=None: getattr(shape, key,
                                                                                      default)
    h, heads = get("hidden_size"), get("num_attention_heads")
    return {"h": h, "i": get("intermediate_size"), "L": get("num_hidden_layers"), "H": heads,
            "Hkv": get("num_key_value_heads") or heads, "D": get("head_dim") or h // heads,
            "V": get("vocab_size"), "tied": bool(get("tie_word_embeddings", False)),
            "qwen2": get("model_type", "qwen2") == "qwen2",  # SHAPES are Qwen2 configs
            "attention_bias": bool(get("attention_bias", False)),
            "mlp_bias": bool(get("mlp_bias", False))}


def linear_shapes(c: dict) -> list[tuple[int, int]]:
    """(in, out) of the 7 linear layers of a decoder layer: q, k, v, o, gate, up, down."""
    q, kv, h, i = c["H"] * c["D"], c["Hkv"] * c["D"], c["h"], c["i"]
    return [(h, q), (h, kv), (h, kv), (q, h), (h, i), (h, i), (i, h)]


def param_count(c: dict) -> int:
    """Parameters of the base model: embeddings (and an untied LM head), layers, final norm."""
    q, kv, h, i = c["H"] * c["D"], c["Hkv"] * c["D"], c["h"], c["i"]
    bias = (q + 2 * kv) * (c["qwen2"] or c["attention_bias"]) + h * c["attention_bias"]
    bias += (2 * i + h) * c["mlp_bias"]
    layer = sum(a * b for a, b in linear_shapes(c)) + bias + 2 * h  # + the two RMSNorm weights
    return c["V"] * h * (1 if c["tied"] else 2) + c["L"] * layer + h


def layer_bytes_per_token(c: dict, lora_r: int = 16, attention: str = "flash",
                          path_len: int | None = None) -> int:
    """Bytes one decoder layer keeps for backward per token, bf16 activations (autocast) with LoRA
    of rank lora_r on its 7 linear layers. The frozen base matmuls keep nothing (their weights need
    no gradient, and weights are not counted); the LoRA A matmuls keep their inputs.
      RMSNorm x 2         its input in fp32 and 1/rms (4h + 4 each)
      linear inputs       the normed input shared by q/k/v, the one shared by gate/up, attention's
                          output for o, gate * up for down (2 bytes x (h + h + H*D + i))
      LoRA middles        the rank-r output of each A, kept by B (7 x 2r)
      MLP                 gate's output (SiLU keeps it), SiLU's output and up's (their product)
      attention "flash"   varlen flash attention (CUDA): q, k, v at the query heads (fast.py repeats
                          k, v for grouped-query attention before the call) and the fp32 logsumexp
      attention "sdpa-cpu" mind's CPU path, one SDPA per path on 3-D inputs, i.e. the math kernel
                          under autocast: fp32 q, k, v and the fp32 (heads, n, n) probabilities, so
                          4 * heads * n bytes per token for paths of n = path_len tokens
    The first layer keeps a little less (its input needs no gradient); that is not modelled."""
    h, i, H = c["h"], c["i"], c["H"]
    q = H * c["D"]
    norms = 2 * (FP32 * h + FP32)
    inputs = BF16 * (h + h + q + i)
    lora = 7 * BF16 * lora_r
    mlp = 3 * BF16 * i
    if attention == "flash":
        attn = 3 * BF16 * q + FP32 * H
    elif attention == "sdpa-cpu":
        attn = 3 * FP32 * q + FP32 * H * path_len
    else:
        raise ValueError(f"attention {attention!r}: 'flash' or 'sdpa-cpu'")
    return norms + inputs + lora + mlp + attn


def outside_bytes_per_token(c: dict) -> int:
    """Bytes per token kept outside the layers: the rotary cos and sin (bf16, one pair shared by all
    layers), the final RMSNorm (4h + 4), and for the loss the hidden rows at the label positions
    (bf16) with two int64 indices (the positions and the target ids). Every token counts as a
    label."""
    return 2 * BF16 * c["D"] + FP32 * c["h"] + FP32 + BF16 * c["h"] + 2 * INT64


def saved_bytes_per_token(c: dict, grad_checkpointing: bool, lora_r: int = 16,
                          attention: str = "flash", path_len: int | None = None) -> int:
    """Bytes per token a pass with gradients keeps until its backward: every layer's share, or with
    gradient checkpointing each layer's bf16 input only, plus what is kept outside the layers."""
    if grad_checkpointing:
        layer = BF16 * c["h"]
    else:
        layer = layer_bytes_per_token(c, lora_r, attention, path_len)
    return c["L"] * layer + outside_bytes_per_token(c)


def layer_backward_bytes_per_token(c: dict) -> int:
    """Gradients alive at once while a layer runs its backward, per token, over what it keeps: the
    larger of the MLP's, two bf16 (tokens, i) gradients (4i), and an RMSNorm's, whose backward runs
    in fp32 through five or six (tokens, h) temporaries (22h). Read off a CPU trace of the backward;
    test_memory.py checks it on two layers of the real shapes and within whole steps. Attention's
    gradients are smaller at these shapes (flash: dq, dk, dv and an fp32 dq accumulator, about
    10 x H*D bytes)."""
    return max(2 * BF16 * c["i"], 22 * c["h"])


def metanet_params(d_enc: int = 384, d: int = 256) -> int:
    """Parameters of mind.MetaNet for encoder embeddings of d_enc (384: all-MiniLM-L6-v2): MLP_align
    (2 linear layers), self-attention (q, k, v and out projections with biases), its LayerNorm,
    and K heads of 2 linear layers each."""
    align = 2 * d_enc * d + d + d * d + d
    attention = 4 * d * d + 4 * d + 2 * d
    return align + attention + K * (d * d + d + d + 1)


def loss_chunk_bytes(rows: int, vocab: int) -> int:
    """Peak of one loss chunk in the backward (fast.target_logprobs): the (rows, V) logits
    recomputed in fp32, logsumexp's gradient and its temporary, the gather's gradient, and the bf16
    gradient for the head's matmul: LOGITS_CHUNK_BYTES per entry, as a CPU run counts it
    (test_memory.py)."""
    return LOGITS_CHUNK_BYTES * rows * vocab


def eq4_bytes(problems: int, answer_len: int, vocab: int, selected: int = K) -> int:
    """Peak of Eq. 4's evaluation and its backward over the full answer log-probs (B, K, A, V),
    between pass 1 and pass 2, over what is already there: the gradients of the `selected` paths
    of each problem, (B, A, V) each, the (B, K, A, V) tensor that stacks them, and four (B, A, V)
    temporaries of one pair's recomputed JSD. The count of a CPU run (test_memory.py)."""
    return FP32 * answer_len * vocab * problems * (K + selected + 4)


def pass_answer_bytes(paths: int, answer_len: int, vocab: int) -> int:
    """Peak of the answer log-probs of one pass of pass 2 in its backward: the fp32 (n, A, V)
    log-probs, the gradient that Eq. 4 sent them, log-softmax's gradient, its bf16 copy for the
    LM head's matmul (14 bytes per entry)."""
    return 14 * paths * answer_len * vocab


def memory_model(shape, max_tokens_per_pass: int, grad_checkpointing: bool, batch: int = 4,
                 max_len: int = 1024, answer_len: int = 20, lora_r: int = 16,
                 loss_chunk: int = 1024, attention: str = "flash", d_enc: int = 384) -> dict:
    """Estimated peak memory of one micro_step (GiB) with the student in fast.bounded_paths, all B*K
    paths selected and max_len long.

    Alive before the step and all through it (static_gib): the bf16 weights; the LoRA weights in
    fp32 with their gradients and two AdamW states (16 bytes per parameter); MetaNet the same way.
    Then, all step: autocast's bf16 copies of the LoRA weights (2 bytes per parameter; in the
    "lora" part) and the (B*K, A, V) fp32 answer log-probs of pass 1, whose gradient takes their
    place in pass 2. On top, the largest of three phases, one after the other:
      pass 1 (no gradients), one of: a loss chunk's forward (bf16 logits, fp32 copy, logsumexp's
        temporary: 10 bytes per entry) or a pass's answer log-probs being made (the same three);
      Eq. 4 and its backward over the full answer log-probs (eq4_bytes);
      a pass of pass 2: what it keeps for backward (saved_bytes_per_token x the budget: a packed
        pass of shorter paths can fill it) plus the largest of three transients, which run one
        after another in the backward and never together: the loss chunk (loss_chunk_bytes); the
        pass's answer log-probs (pass_answer_bytes, n = budget // max_len paths); a layer's
        backward (layer_backward_bytes_per_token, plus with checkpointing the layer's recomputed
        activations, layer_bytes_per_token).
    peak_gib is the allocated peak (what torch.cuda.max_memory_allocated would say); need_gib adds
    the allowance (ALLOWANCE_FIXED + ALLOWANCE_SHARE of the peak): what the card must have."""
    c = dims(shape)
    B, A, V, N = batch, answer_len, c["V"], max_tokens_per_pass
    n = max(1, min(B * K, N // max_len))      # paths in a full pass
    rows = min(loss_chunk, N)
    lora_params = c["L"] * lora_r * sum(a + o for a, o in linear_shapes(c))
    per_token = saved_bytes_per_token(c, grad_checkpointing, lora_r, attention, max_len)
    layer_bwd = layer_backward_bytes_per_token(c)
    if grad_checkpointing:
        layer_bwd += layer_bytes_per_token(c, lora_r, attention, max_len)
    parts = {  # bytes
        "weights": BF16 * param_count(c),
        "lora": (4 * FP32 + BF16) * lora_params,  # weights, gradients, 2 AdamW states; bf16 copy
        "metanet": 4 * FP32 * metanet_params(d_enc),
        "answer_pass1": FP32 * B * K * A * V,
        "eq4": eq4_bytes(B, A, V),
        "activations": N * per_token,
        "logits_chunk": loss_chunk_bytes(rows, V),
        "answer_pass2": pass_answer_bytes(n, A, V),
        "layer_backward": N * layer_bwd,
    }
    transients = {k: parts[k] for k in ("logits_chunk", "answer_pass2", "layer_backward")}
    largest = max(transients, key=transients.get)
    phases = {"pass 1": max(10 * rows * V, 10 * n * A * V), "Eq. 4": parts["eq4"],
              f"pass 2, {largest.replace('_', ' ')}": parts["activations"] + transients[largest]}
    phase = max(phases, key=phases.get)
    all_step = sum(parts[k] for k in ("weights", "lora", "metanet", "answer_pass1"))
    peak = all_step + phases[phase]
    need = peak * (1 + ALLOWANCE_SHARE) + ALLOWANCE_FIXED
    static = parts["weights"] + 4 * FP32 * lora_params + parts["metanet"]
    out = {k: v / GiB for k, v in parts.items()}
    return out | {"peak_gib": peak / GiB, "allowance_gib": (need - peak) / GiB,
                  "need_gib": need / GiB, "static_gib": static / GiB, "phase": phase,
                  "saved_mib_per_token": per_token / 2 ** 20, "paths_per_pass": n,
                  "passes": 2 * math.ceil(B * K / n), "lora_params": lora_params,
                  "params": param_count(c)}


PASS_STEP, PASS_CAP = 256, 16384


def auto_pass_budget(free_bytes: float, config, grad_checkpointing: bool, batch: int = 4,
                     max_len: int = 1024, answer_len: int = 20, lora_r: int = 16,
                     loss_chunk: int = 1024, cap: int = PASS_CAP, **kw) -> int:
    """The largest --max-tokens-per-pass (a multiple of 256, at least max_len, at most cap) whose
    estimated need (memory_model's peak plus the allowance) fits in free_bytes: the memory the
    whole run may use on the card, weights included (e.g. torch.cuda.mem_get_info()[0] before the
    student is loaded). config: a transformers config (or a SHAPES key); kw goes to memory_model
    (attention, d_enc). Raises ValueError if even the smallest budget does not fit."""
    budgets = range(math.ceil(max_len / PASS_STEP) * PASS_STEP, cap + 1, PASS_STEP)
    need = lambda n: memory_model(config, n, grad_checkpointing, batch, max_len, answer_len, lora_r,
                                  loss_chunk, **kw)["need_gib"] * GiB
    fits = [n for n in budgets if need(n) <= free_bytes]
    if not fits:
        raise ValueError(f"even {budgets[0]} tokens per pass need about "
                         f"{need(budgets[0]) / GiB:.1f} GiB, more than {free_bytes / GiB:.1f}")
    return fits[-1]
