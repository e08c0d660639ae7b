"""A two-node SLURM job on this machine: two slurmd daemons, each in its own network namespace with its own host
name (node1 and node2, see .ci/slurm_setup.sh), one controller. Two tasks per node, gloo over the namespaces'
virtual network; rank 0's node is the rendezvous host, as on a real cluster.
"""
from __future__ import annotations

import re
import time

import pytest

try:
    import slurm_cluster as sc
except ImportError:  # tests/ imported as a package
    from tests import slurm_cluster as sc

from test_slurm_integration import TINY, assert_same_weights, interrupt_once, logs, metrics, sc_records, weights

pytestmark = pytest.mark.slurm

EPOCHS = 3
SMALL = [*TINY, "data.synthetic_train_size=128", f"train.epochs={EPOCHS}"]  # 4 steps per epoch at world size 4
TWO_NODE_JOB = ["--gpus-per-node", "0", "--nodes", "2", "--tasks-per-node", "2", "--partition", sc.TWO_NODES,
                "--time", "60"]


@pytest.fixture(scope="module", autouse=True)
def two_nodes():
    why = sc.two_nodes_reason()
    if why:
        pytest.skip(why)


def launch(*args, env=None):
    res = sc.launcher(["--config", "configs/cpu_smoke.yaml", *SMALL, *TWO_NODE_JOB, *args], env=env)
    assert "Traceback" not in res.stderr, res.stderr
    return res


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    out = tmp_path_factory.mktemp("nodes") / "reference"
    start = time.time()
    res = launch(f"output_dir={out}", "--wait")
    ids = sc.job_ids(res.stdout)
    return {"out": out, "res": res, "job_id": ids[0] if ids else None, "seconds": time.time() - start}


def test_two_node_job_forms_one_group_across_the_nodes(reference):
    res, out, job_id = reference["res"], reference["out"], reference["job_id"]
    assert res.returncode == 0, res.stdout + res.stderr + "".join(logs(out, job_id, task) for task in range(4))
    assert "2 node(s) x 2 task(s)" in res.stdout and "world size 4" in res.stdout
    assert re.search(rf"^{job_id}\s+COMPLETED$", res.stdout, flags=re.MULTILINE), res.stdout
    text = logs(out, job_id)
    assert "world 4 (slurm, gloo, cpu)" in text, text
    # rank 0's start-up table: rank, local rank, host, device, pid; ranks 0-1 on node1, 2-3 on node2
    table = re.findall(r"^(\d)\s+(\d)\s+(node\d)\s+cpu\s+\d+$", text, flags=re.MULTILINE)
    assert table == [("0", "0", "node1"), ("1", "1", "node1"), ("2", "0", "node2"), ("3", "1", "node2")], text
    for task in range(4):  # every task's own log: each ran on its node (submitit names the host)
        assert f"hostname=node{task // 2 + 1}" in logs(out, job_id, task)
    assert [r["epoch"] for r in metrics(out)] == list(range(EPOCHS))
    assert weights(out)["step"] == EPOCHS * 4


@pytest.mark.parametrize("how", ["usr2", "scontrol_requeue"])
def test_a_requeued_two_node_job_resumes_exactly(reference, tmp_path, how):
    """usr2: the time-limit warning reaches all four tasks; they stop with a checkpoint and rank 0 requeues.
    scontrol_requeue: the scheduler ends the job at once. Each node's slurmd sends SIGTERM, but srun, already told
    that its step is aborted, may SIGKILL the tasks first ("forcing job termination"): then the requeued job
    resumes from the newest checkpoint (here the first epoch's). Either way the job ends with the weights of the
    uninterrupted one."""
    out = tmp_path / how
    res = launch(f"output_dir={out}", env={"DDP_RESNET_TEST_STEP_DELAY_S": "1.0"})
    assert res.returncode == 0, res.stderr
    job_id, text = interrupt_once(res, out, how)
    assert "resumed from" in text, text
    if how == "usr2":
        assert "stop signal: checkpoint written" in text, text
        (record,) = sc_records(out, job_id)
        assert record["reason"] == "preemption" and record["requeue"] is True
    assert [r["epoch"] for r in metrics(out)] == list(range(EPOCHS))
    assert_same_weights(out, reference["out"])
