"""Tests for memory.py's model of the step's memory (memory_model, auto_pass_budget; bench.py --memory) against what the
CPU counts: the bytes autograd keeps for backward in decoder layers of the real Qwen2.5-1.5B and 7B
shapes, and the peak of live tensor memory in a layer's backward, the loss chunk, Eq. 3's pass-2
copies and whole small steps. Run: pytest -q test_memory.py

The bytes depend on shapes and dtypes, never on values. So at the real shapes the half-precision
matrix products are not computed (HalfMatmulsSkipped): each returns zeros of the shape, dtype and
strides the kernel would give. On a CPU without bf16 instructions (AVX2 only) torch emulates bf16
and one 7B layer's products take minutes; skipped, a test takes seconds there.
test_skipping_the_products_changes_no_count holds every kind of count equal with and without it."""
import contextlib, weakref

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten, tree_map

import bench, fast, memory, mind
from test_mind import SavedBytes  # bytes autograd holds for backward, weights excluded

CPU = torch.device("cpu")
SMALL_VOCAB = 512  # the body keeps the same bytes whatever the vocabulary; the tests run faster


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One CPU thread: most operations here are small, and on a shared machine a second thread
    waiting for its share made them hundreds of times slower. No count depends on it."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class LiveBytes(TorchDispatchMode):
    """Bytes of all live tensor storages, and their peak, on the CPU: the tensors given at the start
    and every tensor an operation returns while the mode is on (autograd's backward, checkpoint
    recomputation and autocast's casts included: on the CPU they run in this thread). A storage
    counts from the first time it is seen until its Python object goes, which PyTorch keeps alive for
    as long as anything holds the storage."""

    def __init__(self, *tensors):
        super().__init__()
        self.live = self.peak = 0
        self.bytes, self.refs = {}, {}  # id(storage) -> bytes, weak reference
        self.add(*tensors)
        self.start = self.live

    def add(self, *tensors):
        for t in tensors:
            if isinstance(t, torch.Tensor):
                st = t.untyped_storage()
                key, n = id(st), st.nbytes()
                if key not in self.bytes:
                    self.refs[key] = weakref.ref(st, lambda _, key=key: self.drop(key))
                    self.bytes[key] = 0
                self.live += n - self.bytes[key]  # a storage seen before counts at its new size
                self.bytes[key] = n
                self.peak = max(self.peak, self.live)

    def drop(self, key):
        self.live -= self.bytes.pop(key)
        del self.refs[key]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.add(*tree_flatten(out)[0])
        return out


class HalfMatmulsSkipped(TorchDispatchMode):
    """Matrix products on bf16/fp16 tensors return zeros instead of being computed. The output's
    shape, strides and dtype come from the operation's meta kernel, so every tensor that exists,
    and every byte a counter sees, is the same as with the real kernel (the counters above this
    mode see its outputs like any other). fp32 products (MetaNet, Eq. 3) still run."""
    PRODUCTS = {torch.ops.aten.mm.default, torch.ops.aten.addmm.default,
                torch.ops.aten.bmm.default, torch.ops.aten.baddbmm.default}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        half = any(t.dtype in (torch.bfloat16, torch.float16) for t in tree_flatten(args)[0]
                   if isinstance(t, torch.Tensor))
        if func not in self.PRODUCTS or not half:
            return func(*args, **kwargs)
        meta = lambda t: t.to("meta") if isinstance(t, torch.Tensor) else t
        out = func(*tree_map(meta, args), **tree_map(meta, kwargs))
        return torch.zeros_like(out, device="cpu")  # zeros_like keeps the meta output's strides


def build_student(shape: dict, grad_checkpointing: bool = False):
    """A Qwen2 student in bf16 with mind's LoRA (r16 on all linear layers, mind.add_lora). Weights:
    a random block repeated (drawing every weight of two 7B layers takes seconds; what autograd keeps
    does not depend on the values), norms 1."""
    from transformers import Qwen2Config, Qwen2ForCausalLM
    from transformers.initialization import no_init_weights
    with no_init_weights():
        model = Qwen2ForCausalLM._from_config(Qwen2Config(**shape), dtype=torch.bfloat16)
    model.tie_weights()  # no_init_weights skips it too
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.fill_(1.0)
                continue
            n = 4093
            block = (torch.randn(n, generator=g) * 0.02).to(p.dtype)
            flat = p.view(-1)
            rows = flat.numel() // n
            flat[: rows * n].view(rows, n).copy_(block.expand(rows, n))
            flat[rows * n:].copy_(block[: flat.numel() - rows * n])
    torch.manual_seed(0)
    cfg = mind.Config(student="bench", grad_checkpointing=grad_checkpointing)
    peft_model = mind.add_lora(model, cfg, CPU)
    return peft_model, peft_model.get_base_model().base_model, peft_model.get_base_model().lm_head


def set_checkpointing(peft_model, on: bool):
    base = peft_model.get_base_model()
    if on:
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    else:
        base.gradient_checkpointing_disable()


def token_path(length: int, vocab: int, g, prompt: int = 8, answer: int = 3):
    ids = torch.randint(5, vocab, (length,), generator=g).tolist()
    return mind.TokenPath(ids, prompt, length - 1 - answer, answer)


def lora_params(peft_model, where: str = "") -> int:
    return sum(p.numel() for n, p in peft_model.named_parameters() if p.requires_grad and where in n)


# ---------------------------------------------------------------- saved bytes per token and layer
@pytest.fixture(scope="module", params=["1.5b", "7b"])
def two_layers(request):
    """Two decoder layers of the real shape and a small vocabulary. The second layer is measured: it
    is a middle layer (its input carries a gradient; the first layer's does not), and the rotary
    cos/sin it reads were already kept by the first."""
    shape = dict(bench.SHAPES[request.param], num_hidden_layers=2, vocab_size=SMALL_VOCAB)
    return (request.param, shape, *build_student(shape))


def count_pass(peft_model, body, head, length: int, skip: bool):
    """(bytes the second layer adds, bytes the whole pass holds) for backward, in a pass with
    gradients as micro_step runs it (packed, per-path SDPA on the CPU) over two paths of `length`
    tokens, in bf16 autocast."""
    g = torch.Generator().manual_seed(0)
    vocab = peft_model.get_base_model().config.vocab_size
    paths = [token_path(length, vocab, g) for _ in range(2)]
    saved, at = SavedBytes(peft_model), {}
    layer = body.layers[1]
    hooks = [layer.register_forward_pre_hook(lambda m, a: at.update(before=saved.live)),
             layer.register_forward_hook(lambda m, a, o: at.update(after=saved.live))]
    body.train()
    try:
        with HalfMatmulsSkipped() if skip else contextlib.nullcontext(), \
                torch.autocast("cpu", torch.bfloat16), \
                torch.autograd.graph.saved_tensors_hooks(saved.pack, saved.unpack):
            loss, _ = mind.run_pass(body, head, paths, CPU, 0, True, 1024)
            whole = saved.live
    finally:
        for h in hooks:
            h.remove()
    del loss
    return at["after"] - at["before"], whole


@pytest.mark.parametrize("grad_checkpointing", [False, True])
def test_saved_bytes_per_token_match_the_formula(two_layers, grad_checkpointing):
    name, shape, peft_model, body, head = two_layers
    set_checkpointing(peft_model, grad_checkpointing)
    length = 96  # not the head dim (128), so that (n, n) and (n, head dim) differ
    one_layer, whole = count_pass(peft_model, body, head, length, skip=True)
    tokens = 2 * length
    c = memory.dims(shape)
    # without checkpointing the layer also keeps autocast's bf16 copies of its LoRA weights
    copies = 0 if grad_checkpointing else memory.BF16 * lora_params(peft_model, "layers.1.")
    want_layer = tokens * (memory.BF16 * c["h"] if grad_checkpointing else
                           memory.layer_bytes_per_token(c, 16, "sdpa-cpu", length)) + copies
    per_token = memory.saved_bytes_per_token(c, grad_checkpointing, 16, "sdpa-cpu", length)
    want_whole = tokens * per_token + 2 * copies
    print(f"{name}, checkpointing {grad_checkpointing}: layer {one_layer / tokens:,.0f} bytes per "
          f"token counted, {want_layer / tokens:,.0f} modelled; pass {whole / tokens:,.0f} counted, "
          f"{want_whole / tokens:,.0f} modelled")
    assert one_layer == pytest.approx(want_layer, rel=0.05)
    # the whole pass: the first layer keeps less than the model says (its input needs no gradient)
    assert whole == pytest.approx(want_whole, rel=0.10)
    assert whole <= want_whole


def count_layer_backward(peft_model, body, tokens: int, length: int, skip: bool):
    """(live bytes after the forward of the body's layers, the peak during their backward)."""
    hidden = peft_model.get_base_model().config.hidden_size
    x = torch.randn(1, tokens, hidden, dtype=torch.bfloat16, requires_grad=True)
    cu = torch.arange(0, tokens + 1, length, dtype=torch.int32)
    pos = torch.arange(length).repeat(tokens // length)[None]
    body.train()
    with HalfMatmulsSkipped() if skip else contextlib.nullcontext(), \
            LiveBytes(*peft_model.parameters(), *peft_model.buffers(), x) as live:
        with torch.autocast("cpu", torch.bfloat16):
            out = body(inputs_embeds=x, position_ids=pos, cu_seq_lens_q=cu, cu_seq_lens_k=cu,
                       max_length_q=length, max_length_k=length).last_hidden_state
        grad = torch.ones_like(out)
        kept = live.peak = live.live
        out.backward(grad)
    return kept, live.peak


@pytest.mark.parametrize("grad_checkpointing", [False, True])
def test_layer_backward_peak_matches_the_formula(two_layers, grad_checkpointing):
    """What the backward of the two layers adds, at its peak, to what their forward kept: the
    gradients of one layer (and with checkpointing that layer's recomputed activations). Short
    paths (32 tokens), so that the CPU attention's (heads, n, n) gradients stay small, as on a GPU."""
    name, shape, peft_model, body, head = two_layers
    set_checkpointing(peft_model, grad_checkpointing)
    c, tokens, length = memory.dims(shape), 256, 32
    kept, peak = count_layer_backward(peft_model, body, tokens, length, skip=True)
    want = memory.layer_backward_bytes_per_token(c)
    if grad_checkpointing:
        want += memory.layer_bytes_per_token(c, 16, "sdpa-cpu", length)
    print(f"{name}, checkpointing {grad_checkpointing}: the backward adds "
          f"{(peak - kept) / tokens:,.0f} bytes per token, {want:,} modelled")
    assert peak - kept == pytest.approx(want * tokens, rel=0.10)


def test_parameter_counts(two_layers):
    name, shape, peft_model, body, head = two_layers
    c = memory.dims(shape)
    base = peft_model.get_base_model().num_parameters() - lora_params(peft_model)
    assert memory.param_count(c) == base
    want_lora = c["L"] * 16 * sum(a + b for a, b in memory.linear_shapes(c))
    assert lora_params(peft_model) == want_lora
    assert memory.memory_model(shape, 1024, False)["lora_params"] == want_lora


@pytest.mark.parametrize("arch", ["qwen2-1.5b", "qwen2-7b", "llama-8b", "llama-small"])
def test_parameter_count_of_full_configs(arch):
    """param_count against transformers' own count of the whole model, built on the meta device."""
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM
    if arch.startswith("qwen2"):
        cfg, cls = Qwen2Config(**bench.SHAPES[arch.split("-")[1]]), Qwen2ForCausalLM
    elif arch == "llama-8b":  # Llama-3.1-8B's shape
        cls = LlamaForCausalLM
        cfg = LlamaConfig(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                          num_attention_heads=32, num_key_value_heads=8, vocab_size=128256)
    else:  # a head dim that is not hidden / heads, biases on attention and MLP
        cfg, cls = LlamaConfig(hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                               num_attention_heads=4, num_key_value_heads=2, vocab_size=300,
                               head_dim=32, attention_bias=True, mlp_bias=True), LlamaForCausalLM
    with torch.device("meta"):
        model = cls(cfg)
    assert memory.param_count(memory.dims(cfg)) == model.num_parameters()
    if arch == "llama-small":
        assert memory.dims(cfg)["D"] == 32


# ---------------------------------------------------------------- the transients, and whole steps
def test_loss_chunk_peak():
    rows, V, h = 256, 16384, 64
    head = torch.nn.Linear(h, V, bias=False).to(torch.bfloat16).requires_grad_(False)
    x = torch.randn(rows, h, dtype=torch.bfloat16, requires_grad=True)
    t = torch.randint(0, V, (rows,))
    with LiveBytes(head.weight, x, t) as live:
        with torch.autocast("cpu", torch.bfloat16):
            lp = fast.target_logprobs(head, x, t, rows)
        lp.sum().backward()
    assert live.peak - live.start == pytest.approx(memory.loss_chunk_bytes(rows, V), rel=0.05)


@pytest.mark.parametrize("B, A, V, selected", [(1, 4, 4096, 8), (2, 4, 4096, 8), (4, 2, 8192, 8),
                                                (2, 8, 2048, 3)])
def test_eq4_peak(B, A, V, selected):
    """Eq. 4 over the full answer log-probs and its backward, as micro_step runs it between the
    passes of the bounded step: the values come from pass 1 (a leaf here), their gradient goes to
    pass 2. `selected` paths of each problem are in I_dyn."""
    K = mind.K
    g = torch.Generator().manual_seed(0)
    answer_lp = torch.log_softmax(torch.randn(B * K, A, V, generator=g), -1).requires_grad_()
    l_real = torch.rand(B * K, generator=g, requires_grad=True)
    alpha = torch.zeros(B, K)
    alpha[:, :selected] = 1 / selected
    mask = torch.ones(B, A, dtype=torch.bool)
    with LiveBytes(answer_lp, l_real, alpha, mask) as live:
        loss = mind.total_loss(alpha, l_real.view(B, K), answer_lp.view(B, K, A, V), mask, 1.0)[0]
        loss.backward()
    assert live.peak - live.start == pytest.approx(memory.eq4_bytes(B, A, V, selected), rel=0.05)


SMALL = dict(hidden_size=256, intermediate_size=1024, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, vocab_size=8192, tie_word_embeddings=False)


@pytest.fixture(scope="module")
def small():
    return build_student(SMALL)


# Each case makes a different transient the largest: Eq. 3 in pass 2, the loss chunk, the
# recomputed layer's backward under checkpointing.
def count_step(small, grad_checkpointing: bool, chunk: int, budget: int, skip: bool, A: int = 4):
    """(live bytes before, the peak during one micro_step with its two backward calls, its info)
    on the CPU in bf16 autocast with per-path SDPA: B = 2 problems, all 16 paths selected."""
    peft_model, body, head = small
    set_checkpointing(peft_model, grad_checkpointing)
    B, max_len, d_enc = 2, 64, 8
    torch.manual_seed(0)
    metanet = mind.MetaNet(d_enc)
    lora = [p for p in peft_model.parameters() if p.requires_grad]
    opts = [torch.optim.AdamW(lora), torch.optim.AdamW(metanet.parameters())]
    for p in [*lora, *metanet.parameters()]:  # a step inside an accumulation window: gradients and
        p.grad = torch.zeros_like(p)          # AdamW's states exist
    for o in opts:
        o.step()
    g = torch.Generator().manual_seed(0)
    # path k of every problem max_len - k tokens: plan_passes, longest first, then takes paths of
    # both problems into each pass (b = min(B, n), as the model assumes); prompts of 1 token
    problems = [[token_path(max_len - k, SMALL["vocab_size"], g, 1, A) for k in range(mind.K)]
                for b in range(B)]
    h_x, h_r = torch.randn(B, d_enc), torch.randn(B, mind.K, d_enc)
    cfg = mind.Config(student="bench", beta=0.0, max_len=max_len, max_tokens_per_pass=budget,
                      loss_chunk=chunk)
    held = [*peft_model.parameters(), *peft_model.buffers(), *metanet.parameters(),
            *(p.grad for p in [*lora, *metanet.parameters()]),
            *(t for o in opts for s in o.state.values() for t in s.values())]
    with HalfMatmulsSkipped() if skip else contextlib.nullcontext(), LiveBytes(*held) as live:
        l_meta, info = mind.micro_step(cfg, problems, h_x, h_r, metanet, body, head, False, CPU)
    for p in [*lora, *metanet.parameters()]:
        p.grad = None
    return live.start, live.peak, info


# Each case makes a different transient the largest: the loss chunk, the recomputed layer's
# backward under checkpointing, a pass's answer log-probs (answers of 16 tokens).
@pytest.mark.parametrize("grad_checkpointing, chunk, budget, A", [
    (False, 64, 512, 4), (False, 256, 512, 4), (True, 32, 1024, 4), (False, 16, 512, 16)])
def test_step_peak_matches_the_model(small, monkeypatch, grad_checkpointing, chunk, budget, A):
    """The peak of live memory in one micro_step on the CPU (bf16 autocast, per-path SDPA) against
    memory_model with the CPU attention: all 16 paths selected, in passes of 8 or 16. Compared:
    what the step adds to what existed before it (weights, LoRA and MetaNet with gradients and
    AdamW). This checks how the parts add up; the tests above check the parts."""
    monkeypatch.setattr(fast, "precision", lambda device: "bf16")  # bf16 autocast on the CPU
    start, peak, info = count_step(small, grad_checkpointing, chunk, budget, skip=True, A=A)
    assert bool(info["selected"].all())
    B, max_len, d_enc = 2, 64, 8
    want = memory.memory_model(SMALL, budget, grad_checkpointing, B, max_len, A, 16, chunk,
                              attention="sdpa-cpu", d_enc=d_enc)
    step, want_step = peak - start, (want["peak_gib"] - want["static_gib"]) * memory.GiB
    print(f"checkpointing {grad_checkpointing}, chunk {chunk}: the step adds {step / 2**20:.2f} MiB "
          f"counted, {want_step / 2**20:.2f} modelled ({want['phase']}); before it "
          f"{start / 2**20:.2f} counted, {want['static_gib'] * 1024:.2f} modelled")
    assert start == pytest.approx(want["static_gib"] * memory.GiB, rel=0.02)
    assert step == pytest.approx(want_step, rel=0.10)


@pytest.mark.parametrize("grad_checkpointing", [False, True])
def test_skipping_the_products_changes_no_count(small, monkeypatch, grad_checkpointing):
    """HalfMatmulsSkipped, which the tests above use at the real shapes, against the real kernels
    at a small shape: every count is the same to the byte, for each kind of count."""
    peft_model, body, head = small
    set_checkpointing(peft_model, grad_checkpointing)
    counts = [count_pass(peft_model, body, head, 48, skip) for skip in (False, True)]
    assert counts[0] == counts[1] and counts[0][0] > 0
    counts = [count_layer_backward(peft_model, body, 128, 32, skip) for skip in (False, True)]
    assert counts[0] == counts[1] and counts[0][1] > counts[0][0]
    monkeypatch.setattr(fast, "precision", lambda device: "bf16")
    counts = [count_step(small, grad_checkpointing, 64, 512, skip)[:2] for skip in (False, True)]
    assert counts[0] == counts[1] and counts[0][1] > counts[0][0]


# ---------------------------------------------------------------- the budget from free memory
@pytest.mark.parametrize("shape, grad_checkpointing, free_gib", [
    ("1.5b", False, 12), ("1.5b", False, 24), ("1.5b", True, 9), ("7b", True, 22), ("7b", False, 40),
    ("7b", True, 200)])
def test_auto_pass_budget_is_the_largest_that_fits(shape, grad_checkpointing, free_gib):
    from transformers import Qwen2Config
    config = Qwen2Config(**bench.SHAPES[shape])  # as a loaded student's config
    free = free_gib * memory.GiB
    n = memory.auto_pass_budget(free, config, grad_checkpointing)
    need = lambda n: memory.memory_model(shape, n, grad_checkpointing)["need_gib"] * memory.GiB
    assert n % 256 == 0 and 1024 <= n <= memory.PASS_CAP
    assert need(n) <= free
    assert n == memory.PASS_CAP or need(n + 256) > free
    assert memory.auto_pass_budget(free, shape, grad_checkpointing) == n  # a SHAPES key, the same
    if n < memory.PASS_CAP:
        assert memory.auto_pass_budget(free + memory.GiB, config, grad_checkpointing) > n


def test_auto_pass_budget_refuses_what_cannot_fit():
    with pytest.raises(ValueError, match="GiB"):
        memory.auto_pass_budget(16 * memory.GiB, "7b", True)  # the bf16 weights alone are 14.2 GiB
    # a max_len that is not a multiple of 256: the smallest budget is the next multiple
    assert memory.auto_pass_budget(80 * memory.GiB, "1.5b", False, max_len=1000, cap=1024) == 1024


def test_memory_cli_prints_the_breakdown_and_the_fits(capsys):
    default_budget = mind.Config.PASS_BUDGET
    text = bench.main(["--memory", "--shapes", "1.5b", "7b", "--budgets", "1024", str(default_budget),
                       "--targets", "12", "22"])
    assert text == capsys.readouterr().out.strip()
    rows = [line for line in text.splitlines() if line.startswith(("| 1.5b", "| 7b"))]
    assert len(rows) == 2 * 2 * 2 + 2 * 2  # breakdowns, then the fits
    default = [r for r in rows if "(defaults)" in r]
    assert [r.split(" | ")[:2] for r in default] == [["| 1.5b", "off"], ["| 7b", "on"]]
    m = memory.memory_model("7b", default_budget, True)
    assert default[1].split(" | ")[-1].rstrip(" |") == f"{m['need_gib']:.2f}"
    fits = rows[-1].split(" | ")  # 7b, checkpointing on: 12 GiB cannot, 22 GiB can
    assert fits[2] == "does not fit"
    assert fits[3].rstrip(" |") == str(memory.auto_pass_budget(22 * memory.GiB, "7b", True))


def test_the_defaults_fit_the_targets_by_the_model():
    """mind.py's default pass budget, Table 8's batch, 1024 tokens and all 8 paths selected: a
    peak of at most 12 GiB at 1.5B (a 16 GB card, allowance included) and 22 GiB at 7B."""
    budget, max_len = mind.Config.PASS_BUDGET, mind.Config.max_len
    small = memory.memory_model("1.5b", budget, bench.default_checkpointing("1.5b"), max_len=max_len)
    large = memory.memory_model("7b", budget, bench.default_checkpointing("7b"), max_len=max_len)
    assert small["peak_gib"] <= 12 and small["need_gib"] <= 16
    assert large["peak_gib"] <= 22
    assert memory.memory_model("1.5b", 3072, False)["peak_gib"] > 12  # the old default did not
