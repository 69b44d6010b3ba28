"""Runs that cannot go silently wrong: bad flag values, resumes of another run, damaged checkpoints,
diverging losses, models that are not there. Offline, on the CPU, with the tiny student."""
import dataclasses, json, os, shutil, subprocess, sys, warnings
from pathlib import Path

import pytest
import torch

import infra, mind
from test_mind import SAMPLE, final_state, step_inputs, tiny, tiny_cfg  # noqa: F401 (tiny: a fixture)

HERE = Path(__file__).resolve().parent
OFFLINE = os.environ | {"HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "small.jsonl"
    path.write_text("".join(SAMPLE.read_text().splitlines(keepends=True)[:8]))
    return path


def cfg(out, data, **kw):
    return tiny_cfg(out, data, **({"epochs": 2, "max_len": 240} | kw))  # 1 warmup + 2 epochs of 2 steps: 6 in all


def same_state(a, b, atol=1e-6):
    (a1, m1), (a2, m2) = final_state(a), final_state(b)
    assert a1.keys() == a2.keys() and m1.keys() == m2.keys()
    for name in a1:
        assert torch.allclose(a1[name], a2[name], atol=atol), name
    for name in m1:
        assert torch.allclose(m1[name], m2[name], atol=atol), name


def steps_logged(out):
    return [r["step"] for r in map(json.loads, open(Path(out) / "metrics.jsonl")) if r["kind"] == "step"]


@pytest.fixture(scope="module")
def full(tmp_path_factory, data):
    """An uninterrupted run, for the resumed ones to match."""
    out = tmp_path_factory.mktemp("full")
    mind.main(cfg(out, data))
    assert sorted(p.name for p in out.glob("checkpoint-*")) == [f"checkpoint-00000{s}" for s in (2, 4, 6)]
    return out


@pytest.fixture(scope="module")
def cut(tmp_path_factory, data):
    """The same run stopped after step 3 (mid-epoch, MetaNet's gradients half accumulated)."""
    out = tmp_path_factory.mktemp("cut")
    assert mind.main(cfg(out, data, max_steps=3))["step"] == 3
    return out


def copy_of(run, tmp_path):
    shutil.copytree(run, tmp_path / "run")
    return tmp_path / "run"


def cli(*args, env=OFFLINE):
    r = subprocess.run([sys.executable, str(HERE / "mind.py"), *args], capture_output=True, text=True,
                       timeout=300, env=env)
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert "Traceback" not in r.stderr, r.stderr[-2000:]
    return r.returncode, errors


# ---------------------------------------------------------------- flag values
@pytest.mark.parametrize("args,line", [
    (["--lr", "-1"], "error: out of range: --lr -1.0 (see --help)"),
    (["--lr", "nan"], "error: out of range: --lr nan (see --help)"),
    (["--meta-lr", "0"], "error: out of range: --meta-lr 0.0 (see --help)"),
    (["--meta-lr-warmup=-1e-4"], "error: out of range: --meta-lr-warmup -0.0001 (see --help)"),
    (["--tau", "0"], "error: out of range: --tau 0.0 (see --help)"),
    (["--tau-student", "inf"], "error: out of range: --tau-student inf (see --help)"),
    (["--lambda", "inf"], "error: out of range: --lambda inf (see --help)"),
    (["--lora-r", "0"], "error: out of range: --lora-r 0 (see --help)"),
    (["--lora-alpha", "0"], "error: out of range: --lora-alpha 0 (see --help)"),
    (["--grad-accum", "0"], "error: out of range: --grad-accum 0 (see --help)"),
    (["--max-len", "8"], "error: out of range: --max-len 8 (see --help)"),
    (["--epochs", "0"], "error: out of range: --epochs 0 (see --help)"),
    (["--warmup-epochs", "-1"], "error: out of range: --warmup-epochs -1 (see --help)"),
    (["--log-every", "0"], "error: out of range: --log-every 0 (see --help)"),
    (["--max-steps", "-1"], "error: out of range: --max-steps -1 (see --help)"),
    (["--max-grad-norm", "0"], "error: out of range: --max-grad-norm 0.0 (see --help)"),
    (["--lr", "-1", "--epochs", "0"], "error: out of range: --lr -1.0, --epochs 0 (see --help)"),
    (["--meta-dim", "250"], "error: --meta-dim 250 is not a multiple of --meta-heads 4 (see --help)"),
    (["--lr", "abc"], "error: argument --lr: invalid float value: 'abc'"),
])
def test_a_flag_value_out_of_range_is_one_line_before_any_work(args, line, capsys):
    with pytest.raises(SystemExit) as e:
        mind.parse_args(args)
    assert e.value.code == 2 and capsys.readouterr().err.splitlines() == [line]


def test_every_numeric_flag_has_a_range():
    """-2 is out of range for every number Config takes (-1 means the plain step for
    --max-tokens-per-pass): a new field without a check fails here."""
    numeric = [f for f in dataclasses.fields(mind.Config) if {int, float} & set(getattr(f.type, "__args__", (f.type,)))]
    assert len(numeric) >= 24
    for f in numeric:
        with pytest.raises(ValueError, match=f"^out of range: --{infra.flag_name(f.name)} -2"):
            mind.Config(**{f.name: -2})


# ---------------------------------------------------------------- models that are not there
@pytest.mark.parametrize("name", ["./no-such-model", "../no/such", "/no/such/model", "~/no-such-model",
                                  "a/b/c", "models/qwen"])
def test_a_model_folder_that_is_not_there_says_so(name, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "models").mkdir()  # "models/qwen": the first part exists, so a folder was meant
    for flag in ("student", "encoder"):
        with pytest.raises(ValueError, match=f"^--{flag} {name}: no such folder$"):
            mind.Config(**{flag: name})
    with pytest.raises(SystemExit):
        mind.parse_args(["--student", name])
    assert capsys.readouterr().err.splitlines() == [f"error: --student {name}: no such folder"]
    (tmp_path / "weights.bin").write_text("")
    with pytest.raises(ValueError, match="--student weights.bin: not a folder"):
        mind.Config(student="weights.bin")
    mind.Config(student="Qwen/Qwen2.5-1.5B", encoder=str(tmp_path / "models"))  # a hub id; a folder that is there


def test_a_hub_model_that_cannot_be_fetched_offline_is_one_line(tmp_path, data):
    """HF_HUB_OFFLINE=1 and a made-up id: the real errors of transformers and sentence-transformers."""
    code, errors = cli("--student", "made-up-org/no-such-model", "--data", str(data), "--out", str(tmp_path / "a"))
    assert code == 2 and errors == [
        "error: --student made-up-org/no-such-model: not a local folder, HF_HUB_OFFLINE is set, and the model "
        "is not in the local cache: pass the folder of a downloaded model, or fetch it once where there is "
        "network (`hf download made-up-org/no-such-model`) and run with HF_HUB_OFFLINE=1"]
    code, errors = cli("--student", "tiny", "--encoder", "made-up-org/no-such-encoder", "--data", str(data),
                       "--out", str(tmp_path / "b"))
    assert code == 2 and len(errors) == 1
    assert errors[0].startswith("error: --encoder made-up-org/no-such-encoder: not a local folder, HF_HUB_OFFLINE")


def test_hub_errors_without_network_and_for_a_repository_that_does_not_exist(monkeypatch):
    from huggingface_hub import constants, errors
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)

    def fails_with(cause):
        def load(name):
            try:
                raise cause
            except Exception as e:
                raise OSError("transformers' own words") from e
        return load
    with pytest.raises(mind.DataError, match="^--student org/m: not a local folder, the Hugging Face Hub cannot be "
                                             "reached from here, and the model is not in the local cache"):
        infra.from_hub(fails_with(ConnectionError("no route")), "org/m", "--student")
    with pytest.raises(mind.DataError, match=r"^--encoder org/m: no such model on the Hugging Face Hub.*hf auth login"):
        not_found = errors.RepositoryNotFoundError.__new__(errors.RepositoryNotFoundError)  # no HTTP response at hand
        infra.from_hub(fails_with(not_found), "org/m", "--encoder")
    with pytest.raises(OSError, match="transformers' own words"):  # anything else is not ours to rename
        infra.from_hub(fails_with(ValueError("a broken config.json")), "org/m", "--student")


# ---------------------------------------------------------------- warnings and notes
def test_add_lora_gives_no_gradient_checkpointing_warning():
    rows = mind.load_data(SAMPLE)[:2]
    model, _, _ = mind.build_tiny([r["problem"] for r in rows] + [t for r in rows for t in r["rationales"].values()], 0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        peft_model = mind.add_lora(model, mind.Config(student="tiny"), torch.device("cpu"))
        assert not [w for w in caught if "is_gradient_checkpointing" in str(w.message)]
        model.is_gradient_checkpointing  # the same read outside add_lora still warns: the filter is local
    outside = [w for w in caught if issubclass(w.category, FutureWarning) and "is_gradient_checkpointing" in str(w.message)]
    # the old name warns only where transformers has the new one (5.24; not 5.0)
    assert bool(outside) == hasattr(type(model), "is_activation_checkpointing")
    assert peft_model.peft_config["default"].r == 16


def test_a_real_student_on_the_demo_sample_is_told_so(tmp_path, monkeypatch):
    said = []
    note = infra.demo_data_note("Qwen/Qwen2.5-1.5B", SAMPLE, 36, said.append)
    assert said == [note] and note == (
        f"note: {SAMPLE} is the 36-problem demo sample, not a training set of the paper's size; without --data "
        "a real student trains on the shipped 497-problem data/mind497.jsonl, or on data/mind_math.jsonl once "
        "data/build.py has written it")
    assert (HERE / "data" / "mind497.jsonl").exists()  # the file the note names
    monkeypatch.chdir(HERE)
    assert infra.demo_data_note("./local-model", Path("data/sample.jsonl"), 36, said.append)  # the same file
    assert infra.demo_data_note("tiny", SAMPLE, 36, said.append) is None  # the demo is what it is for
    shutil.copy(SAMPLE, tmp_path / "mine.jsonl")
    assert infra.demo_data_note("Qwen/Qwen2.5-1.5B", tmp_path / "mine.jsonl", 36, said.append) is None
    assert len(said) == 2


# ---------------------------------------------------------------- a resume is the same run
def test_the_run_identity_holds_exactly_the_settings_that_change_the_numbers(data):
    cost_only = {"max_tokens_per_pass", "packing", "loss_chunk", "log_every", "max_steps", "device",
                 "deterministic", "grad_checkpointing", "out", "resume"}
    fields = {f.name for f in dataclasses.fields(mind.Config)}
    assert {f for f in fields if mind.Config.__dataclass_fields__[f].metadata["group"] == "engineering"} | \
        infra.COST_ONLY == cost_only
    early = infra.run_identity(mind.Config(student="tiny"), data)
    assert set(early) == {"--" + infra.flag_name(f) for f in fields - cost_only - {"lr", "epochs", "encoder"}} | {"data file"}
    assert early["--data"] == f"sha256 {infra.file_sha256(data)}" and early["--seed"] == 0
    rows = mind.load_data(data)
    _, tok, _ = mind.build_tiny([r["problem"] for r in rows] + [t for r in rows for t in r["rationales"].values()], 0)
    full = infra.run_identity(mind.Config(student="tiny"), data, lr=3e-3, epochs=2, encoder="tiny", tokenizer=tok)
    assert set(full) - set(early) == {"--lr", "--epochs", "--encoder", "tokenizer"}
    assert full["tokenizer"].startswith(f"{len(tok)} tokens, sha256 ")


def test_a_resume_of_another_run_is_refused_in_one_line(cut, data, tmp_path):
    before = {p: p.read_bytes() for p in cut.rglob("*") if p.is_file()}
    other = tmp_path / "other.jsonl"
    other.write_text(data.read_text() + "\n")  # the same problems, another file: refused all the same
    for kw, says in [
            (dict(batch_size=4), "--batch-size saved 2, now 4"),
            (dict(seed=1, lora_r=8), "--seed saved 0, now 1; --lora-r saved 16, now 8"),
            (dict(variant="uniform"), "--variant saved mind, now uniform"),
            (dict(data=str(other)), f"--data saved sha256 {infra.file_sha256(data)}, now sha256 "
                                    f"{infra.file_sha256(other)} ({data} then, {other} now)"),
            (dict(lr=1e-2), "--lr saved 0.003, now 0.01"),  # known once the student is: refused after loading it
            (dict(epochs=3), "--epochs saved 2, now 3")]:
        with pytest.raises(mind.DataError) as e:
            mind.main(dataclasses.replace(cfg(cut, data, resume=True), **kw))
        msg = str(e.value)
        assert msg == f"{cut / 'checkpoint-000003'} is from another run: {says}. Resume with its settings, or start " \
                      f"afresh in another --out", msg
    assert {p: p.read_bytes() for p in cut.rglob("*") if p.is_file()} == before  # nothing touched, tiny-student included
    code, errors = cli("--student", "tiny", "--data", str(data), "--out", str(cut), "--batch-size", "2",
                       "--grad-accum", "2", "--meta-grad-accum", "3", "--epochs", "2", "--max-len", "240",
                       "--device", "cpu", "--resume", "--seed", "5")
    assert code == 2 and errors == [f"error: {cut / 'checkpoint-000003'} is from another run: --seed saved 0, now 5. "
                                    f"Resume with its settings, or start afresh in another --out"]


def test_a_resume_may_change_what_only_costs_and_matches_the_uninterrupted_run(full, cut, data, tmp_path, capsys):
    run = copy_of(cut, tmp_path)
    res = mind.main(cfg(run, data, resume=True, max_tokens_per_pass=300, packing=False, loss_chunk=7, log_every=2,
                        lr=3e-3))  # 3e-3 given, as the tiny student's default was: the same run
    assert res["step"] == 6 and f"resumed from {run / 'checkpoint-000003'} (step 3, epoch 1, micro-batch 2)" in \
        capsys.readouterr().out
    same_state(full, run, atol=1e-5)  # padded, smaller passes: float sums in another order
    assert steps_logged(run) == [1, 2, 3, 4, 6]  # --log-every 2 from step 4 on (and at each epoch end)


# ---------------------------------------------------------------- checkpoints
DAMAGE = {
    "truncated state.pt": (lambda c: (c / "state.pt").write_bytes((c / "state.pt").read_bytes()[:300]),
                           "state.pt is unreadable, truncated or damaged"),
    "missing state.pt": (lambda c: (c / "state.pt").unlink(), "state.pt is missing"),
    "missing adapter": (lambda c: shutil.rmtree(c / "adapter"), "adapter/adapter_model.safetensors is missing"),
    "truncated adapter": (lambda c: (c / "adapter" / "adapter_model.safetensors").write_bytes(b"\x08\x00"),
                          "adapter/adapter_model.safetensors is unreadable, truncated or damaged"),
    "missing rank file": (lambda c: (c / "rank0.pt").unlink(), "rank0.pt is missing"),
    "empty rank file": (lambda c: (c / "rank0.pt").write_bytes(b""), "rank0.pt is unreadable, truncated or damaged"),
}


@pytest.mark.parametrize("kind", DAMAGE)
def test_a_damaged_checkpoint_is_named_and_the_one_before_it_is_used(full, tmp_path, kind, capsys):
    run = copy_of(full, tmp_path)
    damage, says = DAMAGE[kind]
    damage(run / "checkpoint-000006")
    ck = infra.find_checkpoint(run, 1, torch.device("cpu"), {})
    assert ck["path"] == run / "checkpoint-000004" and ck["skipped"] == ["checkpoint-000006"]
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"warning: {run / 'checkpoint-000006'} cannot be resumed: {says}")


def test_resume_continues_from_the_newest_complete_checkpoint_and_says_so(full, data, tmp_path, capsys):
    run = copy_of(full, tmp_path)
    DAMAGE["truncated state.pt"][0](run / "checkpoint-000006")
    (run / "checkpoint.tmp").mkdir()  # what a crashed save leaves: it must not break the next one
    (run / "checkpoint.tmp" / "adapter").write_text("not a folder")
    res = mind.main(cfg(run, data, resume=True))
    out = capsys.readouterr().out
    assert f"resumed from {run / 'checkpoint-000004'} (step 4, epoch 2, micro-batch 0): the newest complete " \
           f"checkpoint (checkpoint-000006 cannot be resumed)" in out
    assert res["step"] == 6 and steps_logged(run) == [1, 2, 3, 4, 5, 6]  # 5 and 6 logged once, not twice
    same_state(full, run)
    assert infra.read_checkpoint(run / "checkpoint-000006", 1, torch.device("cpu"))["state"]["step"] == 6  # rewritten
    assert not (run / "checkpoint.tmp").exists()


def test_no_usable_checkpoint_is_one_clear_error(full, data, tmp_path):
    run = copy_of(full, tmp_path)
    for c in run.glob("checkpoint-*"):
        (c / "rank0.pt").unlink()
    with pytest.raises(mind.DataError) as e:
        mind.main(cfg(run, data, resume=True))
    assert str(e.value) == (f"{run}: none of its 3 checkpoint(s) can be resumed (see the warnings above); move them "
                            f"away to start afresh, or choose another --out")


def tiny_training_state(tiny):
    h_x, h_r, metanet = step_inputs(7)
    model = tiny["model"]
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    meta_opt = torch.optim.AdamW(metanet.parameters(), lr=1e-3)
    return h_x, h_r, metanet, model, opt, meta_opt


def test_a_checkpoint_between_optimizer_steps_restores_the_lora_gradients(tiny, tmp_path):
    """The student's gradients half accumulated (a window of grad_accum not yet stepped) come back exactly."""
    h_x, h_r, metanet, model, opt, meta_opt = tiny_training_state(tiny)
    model.zero_grad(set_to_none=True)
    c = mind.Config(student="tiny", max_len=16)
    l_meta, _ = mind.micro_step(c, tiny["short"][:2], h_x[:2], h_r[:2], metanet, tiny["body"], tiny["head"], False,
                                torch.device("cpu"), scale=0.5)
    lora = {n: p for n, p in model.named_parameters() if p.requires_grad}
    frozen = next(iter(lora))
    lora[frozen].grad = None  # a parameter without a gradient stays without one
    want = {n: p.grad.clone() for n, p in lora.items() if p.grad is not None}
    meta_want = [p.grad.clone() for p in metanet.parameters()]
    assert sum(g.abs().sum() for g in want.values()) > 0 and len(want) == len(lora) - 1
    identity = {"--variant": "mind"}
    path = infra.save_checkpoint(tmp_path, 1, 0, 1, model, metanet, opt, meta_opt, 1, identity)
    model.zero_grad(set_to_none=False)
    metanet.zero_grad(set_to_none=True)
    ck = infra.find_checkpoint(tmp_path, 1, torch.device("cpu"), identity)
    assert infra.load_checkpoint(ck, identity, model, metanet, opt, meta_opt) == (1, 0, 1)
    for n, p in lora.items():
        assert (p.grad is None) if n == frozen else torch.equal(p.grad, want[n]), n
    assert all(torch.equal(p.grad, g) for p, g in zip(metanet.parameters(), meta_want))
    assert path == tmp_path / "checkpoint-000001"
    model.zero_grad(set_to_none=True)


def test_checkpoints_load_onto_the_run_s_device(tiny, tmp_path, monkeypatch):
    """torch.load gets a map_location that brings a tensor saved from any GPU to the run's device and leaves CPU
    tensors (AdamW's step counts) on the CPU."""
    _, _, metanet, model, opt, meta_opt = tiny_training_state(tiny)
    infra.save_checkpoint(tmp_path, 2, 0, 0, model, metanet, opt, meta_opt, 1, {"--variant": "mind"})
    calls, load = [], torch.load
    monkeypatch.setattr(torch, "load", lambda *a, **kw: (calls.append(kw), load(*a, **kw))[1])
    infra.find_checkpoint(tmp_path, 1, torch.device("cpu"), {})
    assert len(calls) == 2 and all(kw["weights_only"] is True for kw in calls)
    for kw in calls:
        storage = torch.UntypedStorage(8)
        assert kw["map_location"](storage, "cpu") is storage
        assert kw["map_location"](storage, "cuda:1").device == torch.device("cpu")
    class Storage:  # stands in for a GPU storage: where would it go?
        def to(self, device):
            return device
    assert infra.onto(torch.device("cuda", 3))(Storage(), "cuda:0") == torch.device("cuda", 3)  # each rank its own


def test_an_interrupted_checkpoint_write_leaves_no_checkpoint(tiny, tmp_path, monkeypatch):
    _, _, metanet, model, opt, meta_opt = tiny_training_state(tiny)
    save = torch.save

    def crash_on_the_rank_file(obj, f, *a, **kw):
        if Path(f).name.startswith("rank"):
            raise KeyboardInterrupt  # killed mid-save
        save(obj, f, *a, **kw)
    monkeypatch.setattr(torch, "save", crash_on_the_rank_file)
    with pytest.raises(KeyboardInterrupt):
        infra.save_checkpoint(tmp_path, 5, 0, 0, model, metanet, opt, meta_opt, 1, {"--variant": "mind"})
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint.tmp"]
    assert infra.find_checkpoint(tmp_path, 1, torch.device("cpu"), {}) is None  # nothing to resume: not a checkpoint
    monkeypatch.setattr(torch, "save", save)
    infra.save_checkpoint(tmp_path, 5, 0, 0, model, metanet, opt, meta_opt, 1, {"--variant": "mind"})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-000005"]


# ---------------------------------------------------------------- a loss that diverges
def test_stop_if_diverged_names_the_step_and_the_loss(tmp_path):
    cpu, nan, inf, one = torch.device("cpu"), torch.tensor(float("nan")), torch.tensor(float("inf")), torch.tensor(1.0)
    infra.stop_if_diverged(3, one, {"sft": one, "cons": one}, cpu, tmp_path)  # finite: nothing happens
    infra.stop_if_diverged(3, None, {}, cpu, tmp_path)
    with pytest.raises(infra.Diverged, match="^step 7: L_meta is nan; the run stops here and saves nothing of this "
                                             "state; no checkpoint had been written yet$"):
        infra.stop_if_diverged(7, nan, {}, cpu, tmp_path)  # the warmup: L_meta alone
    (tmp_path / "checkpoint-000004").mkdir()
    with pytest.raises(infra.Diverged, match=f"^step 5: L_cons is inf; .* the last checkpoint, "
                                             f"{tmp_path / 'checkpoint-000004'}, is from before it"):
        infra.stop_if_diverged(5, one, {"sft": one, "cons": inf}, cpu, tmp_path)


def test_a_nan_loss_stops_the_run_saves_nothing_of_it_and_resume_works(full, data, tmp_path, monkeypatch):
    real, calls = mind.micro_step, []

    def poisoned(*args, **kw):  # micro-batch 5 = the first of step 3: its loss and its gradients turn NaN
        l_meta, info = real(*args, **kw)
        calls.append(1)
        if len(calls) == 5:
            info["sft"] = info["sft"] * float("nan")
            for p in args[5].parameters():
                if p.grad is not None:
                    p.grad.fill_(float("nan"))
        return l_meta, info
    monkeypatch.setattr(mind, "micro_step", poisoned)
    with pytest.raises(infra.Diverged) as e:
        mind.main(cfg(tmp_path, data))
    assert str(e.value) == (f"step 3: L_sft is nan; the run stops here and saves nothing of this state; the last "
                            f"checkpoint, {tmp_path / 'checkpoint-000002'}, is from before it: --resume continues "
                            f"from there")
    assert sorted(p.name for p in tmp_path.glob("checkpoint*")) == ["checkpoint-000002"]
    assert not (tmp_path / "adapter").exists() and not (tmp_path / "metanet.pt").exists()
    assert steps_logged(tmp_path) == [1, 2]
    monkeypatch.setattr(mind, "micro_step", real)
    assert mind.main(cfg(tmp_path, data, resume=True))["step"] == 6
    same_state(full, tmp_path)
    assert steps_logged(tmp_path) == [1, 2, 3, 4, 5, 6]


def test_a_diverging_run_exits_non_zero_with_one_line(data, tmp_path):
    """A learning rate far too large, on the command line: a real divergence, no injection."""
    code, errors = cli("--student", "tiny", "--data", str(data), "--out", str(tmp_path), "--batch-size", "2",
                       "--grad-accum", "2", "--epochs", "1", "--max-len", "240", "--warmup-epochs", "0",
                       "--lr", "1e30", "--device", "cpu")
    assert code == 2 and len(errors) == 1
    assert errors[0].startswith("error: step 2: L_sft is nan") and errors[0].endswith("no checkpoint had been written yet")
    assert not list(tmp_path.glob("checkpoint*")) and not (tmp_path / "adapter").exists()
