"""DDP communication hooks (``dist.comm_hook``): fp16 and bf16 compression train within their formats' rounding of
plain all-reduce; PowerSGD trains, keeps every rank's state in the checkpoint and resumes bit for bit (and provably
not without that state); the hooks see DDP's final buckets from their first call; the bytes each hook all-reduces;
the one-line refusals. Multi-process runs: 2 ranks, gloo on the CPU, the tiny ResNet-20 of conftest.TINY
(128 images, global batch 32: 4 steps per epoch).
"""
from __future__ import annotations

import json
import shutil
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
from torch import nn

from conftest import TINY, ok, run_train, weights
from ddp_resnet import bench, build, comm_hooks, config
from ddp_resnet import data as data_mod
from ddp_resnet.config import ConfigError

CPU = SimpleNamespace(distributed=False, device=torch.device("cpu"), rank=0, world_size=1, is_main=True)
# PowerSGD from step 2 on (after 2 plain all-reduce steps), with accumulation (no_sync on the first micro-step)
POWERSGD = ("dist.comm_hook=powersgd", "dist.powersgd_warmup_steps=2", "optim.accum_steps=2")
STOP_AT = 5  # the interrupted run stops mid-epoch 2, three compressed steps after the warm-up


def _trained(state: dict) -> list[str]:
    return [k for k, v in state.items() if v.is_floating_point() and "running" not in k]


def _norm(tensors) -> float:
    return sum(float(t.double().pow(2).sum()) for t in tensors) ** 0.5


@pytest.fixture(scope="module")
def compressed(tmp_path_factory):
    """One epoch (4 steps) on 2 ranks with each of none, fp16 and bf16, and the network's initial weights. A small
    learning rate keeps the 4 steps far from chaotic, so a gradient's rounding shows as such in the weights."""
    base = tmp_path_factory.mktemp("compressed")
    runs = {}
    for hook in ("none", "fp16", "bf16"):
        runs[hook] = base / hook
        ok(run_train(runs[hook], "train.epochs=1", "optim.lr=0.02", f"dist.comm_hook={hook}", nproc=2))
    cfg = config.load(None, TINY)
    build.seed_everything(cfg.train.seed, 0)  # the trainer's seeding; its loaders draw from their own generators
    initial = build.build_network(cfg, data_mod.describe(cfg.data), CPU).state_dict()
    return runs, initial


@pytest.mark.slow
def test_fp16_and_bf16_compression_end_within_their_rounding_of_plain_all_reduce(compressed):
    """The deviation from plain fp32 all-reduce, relative to how far the 4 steps moved the weights, is a few times
    the format's unit roundoff u (fp16 2^-11, bf16 2^-8; measured 4u for both) and not zero (the hook ran): bounded
    by 10u. bf16, 8 times coarser, deviates several times more than fp16 (measured 7.6x): each run really used its
    own format."""
    runs, initial = compressed
    plain = weights(runs["none"] / "checkpoints/last.pt")
    keys = _trained(plain)
    moved = _norm(plain[k] - initial[k] for k in keys)
    assert moved > 0.05  # the initial weights are the run's: its 4 steps moved them, a little
    deviation = {}
    for hook, unit in (("fp16", 2.0**-11), ("bf16", 2.0**-8)):
        mine = weights(runs[hook] / "checkpoints/last.pt")
        deviation[hook] = _norm(mine[k] - plain[k] for k in keys) / moved
        assert 0 < deviation[hook] < 10 * unit, (hook, deviation[hook])
    assert deviation["bf16"] > 2 * deviation["fp16"], deviation


@pytest.fixture(scope="module")
def powersgd(tmp_path_factory):
    """2 ranks, 8 steps of PowerSGD: uninterrupted; stopped at step 5 (train.run_steps); that run resumed; and a
    copy of it resumed from a checkpoint whose PowerSGD state was removed."""
    base = tmp_path_factory.mktemp("powersgd")
    whole, part, resumed, dropped = (base / name for name in ("whole", "part", "resumed", "dropped"))
    ok(run_train(whole, *POWERSGD, nproc=2))
    ok(run_train(part, *POWERSGD, f"train.run_steps={STOP_AT}", nproc=2))
    shutil.copytree(part, resumed)
    shutil.copytree(part, dropped)
    last = dropped / "checkpoints/last.pt"
    payload = torch.load(last, map_location="cpu", weights_only=True)
    del payload[comm_hooks.PAYLOAD_KEY]  # as a checkpoint written before the hook's state was saved
    torch.save(payload, last)
    procs = {name: ok(run_train(out, *POWERSGD, nproc=2)) for name, out in (("resumed", resumed), ("dropped", dropped))}
    return SimpleNamespace(whole=whole, part=part, resumed=resumed, dropped=dropped, procs=procs)


@pytest.mark.slow
def test_powersgd_resumed_after_its_warm_up_equals_the_uninterrupted_run_bit_for_bit(powersgd):
    uninterrupted = torch.load(powersgd.whole / "checkpoints/last.pt", map_location="cpu", weights_only=True)
    resumed = torch.load(powersgd.resumed / "checkpoints/last.pt", map_location="cpu", weights_only=True)
    assert resumed["step"] == uninterrupted["step"] == 8
    assert "resumed from" in powersgd.procs["resumed"].stdout and "note:" not in powersgd.procs["resumed"].stdout
    for key, value in uninterrupted["model"].items():
        assert torch.equal(value, resumed["model"][key]), key
    for a, b in zip(uninterrupted[comm_hooks.PAYLOAD_KEY]["ranks"], resumed[comm_hooks.PAYLOAD_KEY]["ranks"]):
        assert a["iter"] == b["iter"] == 8  # the hook counted the run's steps, not the settling passes
        for name in ("error_dict", "p_memory_dict", "q_memory_dict"):
            assert a[name].keys() == b[name].keys()  # the same buckets, fresh process or resumed
            assert all(torch.equal(a[name][i], b[name][i]) for i in a[name]), name


@pytest.mark.slow
def test_every_ranks_powersgd_state_is_in_the_checkpoint(powersgd):
    payload = torch.load(powersgd.part / "checkpoints/last.pt", map_location="cpu", weights_only=True)
    saved = payload[comm_hooks.PAYLOAD_KEY]
    assert (saved["name"], saved["matrix_rank"], saved["world_size"], len(saved["ranks"])) == ("powersgd", 1, 2, 2)
    assert payload["format"] == 2  # an optional key: the checkpoint format is unchanged
    gradients = sum(v.numel() for k, v in payload["model"].items() if k in _trained(payload["model"]))
    zero, one = saved["ranks"]
    for rank in saved["ranks"]:
        assert rank["iter"] == payload["step"] == STOP_AT
        assert sum(t.numel() for t in rank["error_dict"].values()) == gradients  # every bucket's error feedback
        assert all(t.device.type == "cpu" for t in rank["error_dict"].values())
        assert all(float(t.abs().sum()) > 0 for t in rank["error_dict"].values())
    assert len(zero["error_dict"]) >= 2  # DDP's buckets, more than one: the gloo path's ordering is exercised
    assert any(not torch.equal(zero["error_dict"][i], one["error_dict"][i]) for i in zero["error_dict"])  # per rank
    assert all(torch.equal(zero["q_memory_dict"][i], one["q_memory_dict"][i]) for i in zero["q_memory_dict"])


@pytest.mark.slow
def test_a_resume_without_the_powersgd_state_says_so_in_one_line_and_differs(powersgd):
    out = powersgd.procs["dropped"].stdout
    notes = [line for line in out.splitlines() if "PowerSGD starts afresh" in line]
    assert notes == [f"note: the checkpoint holds no PowerSGD state: PowerSGD starts afresh at step {STOP_AT} (no "
                     f"error feedback yet, new random projections); the run continues, but not bitwise as an "
                     f"uninterrupted one would"]
    uninterrupted = weights(powersgd.whole / "checkpoints/last.pt")
    fresh = weights(powersgd.dropped / "checkpoints/last.pt")
    assert not all(torch.equal(value, fresh[key]) for key, value in uninterrupted.items())


# --------------------------------------------------------------------------------------------- in one process
@pytest.fixture
def one_rank_group(tmp_path):
    """A 1-process gloo group: DDP's buckets and hooks are the same code as with more ranks."""
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/store", rank=0, world_size=1)
    yield SimpleNamespace(distributed=True, device=torch.device("cpu"), rank=0, world_size=1, is_main=True)
    dist.destroy_process_group()


@pytest.mark.parametrize("static_graph", [False, True])
def test_the_hook_sees_the_settled_buckets_from_its_first_call(one_rank_group, monkeypatch, static_graph):
    """Registered after settle_buckets: no call in the settling pass(es), iterations counted from 0, and every
    call's bucket layout the one the wrapper has right after wrap_ddp (static_graph settles in two passes: its first
    backward records the graph, not the gradients' order)."""
    from torch.distributed.algorithms.ddp_comm_hooks import powerSGD_hook

    seen = []
    real = powerSGD_hook.powerSGD_hook

    def recording(state, bucket):
        seen.append((state.iter, bucket.index(), bucket.buffer().numel()))
        return real(state, bucket)

    monkeypatch.setattr(powerSGD_hook, "powerSGD_hook", recording)
    cfg = config.load(None, [*TINY, *POWERSGD[:2], "dist.bucket_cap_mb=0.25", f"dist.static_graph={static_graph}",
                             "optim.accum_steps=1"])
    model = build.build_network(cfg, data_mod.describe(cfg.data), one_rank_group)
    ddp = build.wrap_ddp(model, cfg, one_rank_group, 16)
    settled = comm_hooks.bucket_sizes(ddp)
    assert not seen and len(settled) >= 3
    for _ in range(4):
        ddp(torch.randn(4, 3, 16, 16)).sum().backward()
        model.zero_grad(set_to_none=True)
    for step in range(4):
        assert [(i, n) for it, i, n in seen if it == step] == list(enumerate(settled)), step
    assert comm_hooks.hook_of(ddp).state.iter == 4
    assert [t.numel() for t in comm_hooks.hook_of(ddp).state.error_dict.values()] == settled


def test_a_saved_state_is_restored_exactly_or_replaced_by_a_fresh_one_with_a_note(one_rank_group):
    """Restore: this rank's own state, every field (error feedback, P, Q, the counter, the random stream); a state
    of another world size, rank or bucket layout is not used: a fresh one counts from the checkpoint's step."""
    cfg = config.load(None, [*TINY, *POWERSGD[:2]])
    model = build.build_network(cfg, data_mod.describe(cfg.data), one_rank_group)
    ddp = build.wrap_ddp(model, cfg, one_rank_group, 16)
    hook = comm_hooks.hook_of(ddp)
    for _ in range(3):
        ddp(torch.randn(4, 3, 16, 16)).sum().backward()
    saved = hook.state_dict()
    hook.state.rng.randint(10)  # the stream moves on; the restore must rewind it
    good = {"step": 3, comm_hooks.PAYLOAD_KEY: {"name": "powersgd", "matrix_rank": 1, "world_size": 1,
                                                "ranks": [saved]}}
    hook.state.error_dict, hook.state.iter = {}, 0
    notes = []
    comm_hooks.restore_state(ddp, good, one_rank_group, notes.append)
    assert not notes
    again = hook.state_dict()
    assert again["iter"] == 3 and again["stats"] == saved["stats"] and again["rng"]["pos"] == saved["rng"]["pos"]
    assert torch.equal(again["rng"]["keys"], saved["rng"]["keys"])
    for name in ("error_dict", "p_memory_dict", "q_memory_dict"):
        assert again[name].keys() == saved[name].keys() and len(saved[name]) >= 1
        assert all(torch.equal(again[name][i], saved[name][i]) for i in saved[name])
    other_layout = {i: torch.zeros(t.numel() + 1) for i, t in saved["error_dict"].items()}
    for change, why in (({"world_size": 2}, "PowerSGD's state (each rank's error feedback) was written by 2 processes"),
                        ({"matrix_rank": 2}, "PowerSGD's state was written with dist.powersgd_rank=2"),
                        ({"ranks": [{**saved, "error_dict": other_layout}]},
                         "the checkpoint's gradient buckets differ from this run's (dist.bucket_cap_mb changed?)"),
                        ({"name": "fp16"}, "the checkpoint holds no PowerSGD state")):
        notes.clear()
        comm_hooks.restore_state(ddp, {"step": 7, comm_hooks.PAYLOAD_KEY: {**good[comm_hooks.PAYLOAD_KEY], **change}},
                                 one_rank_group, notes.append)
        assert len(notes) == 1 and notes[0].startswith(f"note: {why}: PowerSGD starts afresh at step 7 ")
        assert hook.state.iter == 7 and not hook.state.error_dict  # the warm-up ends at the configured step


def test_bytes_per_step_fp16_halves_and_powersgd_sends_p_and_q_of_a_known_layer(tmp_path):
    """A 96 x 192 linear layer and its bias in one bucket: fp32 sends (18432 + 96) x 4 bytes; fp16 and bf16 half;
    PowerSGD at rank 1, after its warm-up, P (96) and Q (192) of the weight plus the bias uncompressed (a vector
    is not worth compressing): (96 + 192 + 96) x 4, 48 times fewer; rank 2 doubles P and Q."""
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 96))
    cfg = config.load(None, ["dist.powersgd_rank=1"])
    figures = comm_hooks.measure_bytes(model, cfg, CPU, 8, str(tmp_path))
    assert figures["none"] == {"buckets": 1, "bytes": [(18432 + 96) * 4] * 3, "collectives": [1, 1, 1]}
    assert figures["fp16"]["bytes"] == figures["bf16"]["bytes"] == [(18432 + 96) * 2] * 3
    assert figures["powersgd"]["bytes"] == [(18432 + 96) * 4] * 2 + [(96 + 192 + 96) * 4]  # warm-up, then P and Q
    assert figures["powersgd"]["collectives"] == [1, 1, 3]  # plain; then uncompressed, P, Q
    assert figures["none"]["bytes"][-1] / figures["powersgd"]["bytes"][-1] == pytest.approx(48.25)
    again = tmp_path / "again"
    again.mkdir()
    rank2 = comm_hooks.measure_bytes(model, config.load(None, ["dist.powersgd_rank=2"]), CPU, 8, str(again))
    assert rank2["powersgd"]["bytes"][-1] == (2 * (96 + 192) + 96) * 4
    assert not dist.is_initialized()  # the temporary group is gone


def test_bench_prints_each_hooks_bytes_per_step(capsys, tmp_path):
    out = tmp_path / "bench.json"
    code = bench.main(["--device", "cpu", "--model", "resnet20", "--res", "16", "--batch", "4", "--steps", "1",
                       "--warmup", "1", "--windows", "1", "--comm-bytes", "--comm-hook", "fp16", "--json", str(out)])
    text = capsys.readouterr().out
    assert code == 0
    assert "comm_hook=fp16" in text and "note: dist.comm_hook=fp16 has no effect in a single process" in text
    lines = {line.split(":")[0].strip(): line for line in text.splitlines() if line.startswith("  ")}
    assert set(lines) >= set(comm_hooks.HOOKS)
    assert "| 0.500 x none" in lines["fp16"] and "| 0.500 x none" in lines["bf16"]
    assert "after its warm-up (dist.powersgd_rank=1)" in lines["powersgd"]
    figures = json.loads(out.read_text())["results"]["comm_bytes"]
    assert figures["fp16"]["bytes"][-1] * 2 == figures["none"]["bytes"][-1]
    assert figures["powersgd"]["bytes"][0] == figures["none"]["bytes"][0] > 20 * figures["powersgd"]["bytes"][-1]
    assert ours_first_lines_kept(text)


def ours_first_lines_kept(text: str) -> bool:
    """The bench's own output stays: settings, work, the timed line."""
    return all(part in text for part in ("bench: resnet20", "settings: amp=none", "work: ", "ours        : "))


# --------------------------------------------------------------------------------------------- refusals and notes
@pytest.mark.parametrize("overrides, message", [
    (("dist.comm_hook=powersgd", "dist.powersgd_warmup_steps=1"),
     "dist.powersgd_warmup_steps: PowerSGD's error feedback needs at least 2 plain all-reduce steps first "
     "(PyTorch's start_powerSGD_iter > 1), got 1"),
    (("dist.comm_hook=powersgd", "train.amp=fp16"),
     "dist.comm_hook: powersgd cannot be combined with train.amp=fp16: the GradScaler's scaled (on an overflow "
     "infinite) gradients would enter PowerSGD's error feedback and keep every later step non-finite; use "
     "train.amp=bf16 or none"),
    (("dist.comm_hook=powersgd", "train.nonfinite=skip"),
     "dist.comm_hook: powersgd cannot be combined with train.nonfinite=skip: a skipped step's non-finite gradient "
     "would stay in PowerSGD's error feedback; use train.nonfinite=stop"),
    (("dist.powersgd_rank=0",), "dist.powersgd_rank: must be > 0, got 0"),
    (("dist.powersgd_warmup_steps=-1",), "dist.powersgd_warmup_steps: must be >= 0, got -1"),
])
def test_what_a_hook_cannot_do_is_refused_in_one_line(overrides, message):
    with pytest.raises(ConfigError) as refused:
        config.load(None, list(overrides))
    assert str(refused.value) == message


def test_bf16_is_refused_where_this_torch_builds_ddp_refuses_it(monkeypatch):
    config.load(None, ["dist.comm_hook=bf16"])  # this build: accepted (and trains on gloo, above)
    monkeypatch.setattr(torch.version, "cuda", None)
    monkeypatch.setattr(torch.version, "hip", None)
    with pytest.raises(ConfigError, match=r"^dist.comm_hook: this torch build's DDP refuses the bf16 hook \(it needs "
                                          r"a CUDA build with NCCL 2.10\+, whatever the backend\); use fp16$"):
        config.load(None, ["dist.comm_hook=bf16"])


def test_a_refused_hook_fails_before_anything_starts(tmp_path):
    proc = run_train(tmp_path / "bad", "dist.comm_hook=powersgd", "dist.powersgd_warmup_steps=0", nproc=1)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().count("\n") == 0 and "dist.powersgd_warmup_steps" in proc.stderr
    assert not (tmp_path / "bad").exists()


def test_changing_the_hook_on_resume_is_refused_in_one_line_unless_allowed():
    saved = config.to_dict(config.load(None, ["dist.comm_hook=none"]))
    with pytest.raises(ConfigError) as refused:
        config.check_resume(saved, config.load(None, ["dist.comm_hook=fp16"]), "last.pt")
    assert "\n" not in str(refused.value)
    assert "dist.comm_hook='fp16' (checkpoint: 'none')" in str(refused.value)
    allowed = config.load(None, ["dist.comm_hook=fp16", "ckpt.allow_changes=[dist.comm_hook]"])
    assert config.check_resume(saved, allowed, "last.pt") == [("dist.comm_hook", "none", "fp16")]


def test_a_hook_in_a_single_process_is_a_note_not_an_error():
    cfg = config.load(None, [*TINY, "dist.comm_hook=powersgd"])
    info = data_mod.describe(cfg.data)
    notes = []
    step = build.build_step(cfg, info, CPU, build.build_network(cfg, info, CPU), 8, 4, 2, note=notes.append)
    assert step.ddp is None
    assert notes == ["note: dist.comm_hook=powersgd has no effect in a single process (no gradients are "
                     "all-reduced); it applies when the run has more than one process"]
