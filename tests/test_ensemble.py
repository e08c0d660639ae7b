"""`python -m ddp_resnet.evaluate --checkpoint a.pt b.pt`: an exact ensemble, on 1 and 2 processes, equal to a hand
computation of the averaged probabilities, with every member's numbers equal to its own evaluation."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from conftest import REPO, child_env, ok, run_train
from ddp_resnet import build, config, evaluate
from ddp_resnet import data as data_mod


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Two tiny runs of different seeds, 101 test images (uneven shards on 2 ranks), a small eval batch."""
    root = tmp_path_factory.mktemp("ensemble")
    outs = [root / f"seed{seed}" for seed in (0, 1)]
    for seed, out in enumerate(outs):
        ok(run_train(out, "train.epochs=1", f"train.seed={seed}", "data.synthetic_test_size=101",
                     "data.eval_batch_size=16"))
    return [str(out / "checkpoints/last.pt") for out in outs]


def _network(cfg, info, path: str) -> torch.nn.Module:
    return build.network_from_weights(cfg, info, torch.load(path, weights_only=True)["model"], path,
                                      torch.device("cpu"))


def _hand_ensemble(paths: list[str]) -> tuple[float, float]:
    """(top-1 %, loss) of the averaged softmax probabilities over the whole test set, computed directly."""
    cfg = config.from_dict(torch.load(paths[0], weights_only=True)["config"])
    info = data_mod.describe(cfg.data)
    batches = list(data_mod.build_eval_loader(cfg.data, info, 0, 1, "cpu"))
    images, labels = torch.cat([x for x, _ in batches]), torch.cat([y for _, y in batches])
    nets = [_network(cfg, info, p) for p in paths]
    with torch.no_grad():
        mean = torch.stack([net(images).softmax(1) for net in nets]).mean(0)
    hits = int((mean.argmax(1) == labels).sum())
    return 100 * hits / labels.numel(), -mean[torch.arange(labels.numel()), labels].log().mean().item()


def _single(path: str, out) -> dict:
    assert evaluate.main(["--checkpoint", path, "--json", str(out)]) == 0
    return json.loads(out.read_text())


def test_ensemble_prints_members_beside_the_ensemble_and_equals_a_hand_computation(runs, tmp_path, capsys):
    singles = [_single(p, tmp_path / f"single{i}.json") for i, p in enumerate(runs)]
    capsys.readouterr()
    out = tmp_path / "ensemble.json"
    assert evaluate.main(["--checkpoint", *runs, "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    for member, single in zip(result["members"], singles):
        assert (member["top1"], member["top5"], member["count"]) == (single["top1"], single["top5"], 101)
        assert member["loss"] == pytest.approx(single["loss"], rel=1e-6)
    top1, loss = _hand_ensemble(runs)
    assert result["ensemble"] is True and result["count"] == 101 and result["checkpoint"] == runs
    assert result["top1"] == top1 and result["loss"] == pytest.approx(loss, rel=1e-5)
    printed = capsys.readouterr().out
    assert printed.count("member ") == 2 and "ensemble of 2 (averaged softmax probabilities)" in printed
    assert f"top-1 {result['top1']:.4f}%" in printed and f"top-1 {singles[1]['top1']:.4f}%" in printed


def test_ensemble_of_one_checkpoint_is_the_single_evaluation(runs, tmp_path):
    """A single --checkpoint keeps the single-model output; the engine's ensemble of one equals it."""
    single = _single(runs[0], tmp_path / "one.json")
    assert "members" not in single and single["checkpoint"] == runs[0]
    from ddp_resnet.engine import evaluate as engine_evaluate
    from ddp_resnet.engine import evaluate_ensemble

    cfg = config.from_dict(torch.load(runs[0], weights_only=True)["config"])
    info = data_mod.describe(cfg.data)
    model = _network(cfg, info, runs[0])
    loader = data_mod.build_eval_loader(cfg.data, info, 0, 1, "cpu")
    (member,), alone = evaluate_ensemble([model], loader, info.num_classes, torch.device("cpu"))
    assert member == engine_evaluate(model, loader, info.num_classes, torch.device("cpu"))
    assert alone["top1"] == member["top1"] == single["top1"] and alone["confusion"] == single["confusion"]


def test_two_process_ensemble_equals_one_process(runs, tmp_path):
    one, two = tmp_path / "one.json", tmp_path / "two.json"
    assert evaluate.main(["--checkpoint", *runs, "--json", str(one)]) == 0
    proc = ok(subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m",
         "ddp_resnet.evaluate", "--checkpoint", *runs, "--batch-size", "6", "--json", str(two)],
        cwd=REPO, env=child_env(), capture_output=True, text=True, timeout=300))
    a, b = json.loads(one.read_text()), json.loads(two.read_text())
    assert b["world_size"] == 2 and b["count"] == 101 and proc.stdout.count("ensemble of 2") == 1
    assert (b["top1"], b["top5"], b["confusion"]) == (a["top1"], a["top5"], a["confusion"])
    assert [m["top1"] for m in b["members"]] == [m["top1"] for m in a["members"]]
    assert b["loss"] == pytest.approx(a["loss"], rel=1e-6)  # float32 batches of another size


def test_an_ensemble_across_datasets_is_refused_in_one_line(runs, tmp_path, capsys):
    payload = torch.load(runs[1], weights_only=True)
    payload["config"]["data"]["dataset"] = "cifar10"
    torch.save(payload, tmp_path / "relabelled.pt")
    assert evaluate.main(["--checkpoint", runs[0], str(tmp_path / "relabelled.pt")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "an ensemble needs one dataset" in err
