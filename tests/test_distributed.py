"""LARS under DDP, FSDP2, HSDP and hand-placed DTensors, on 4 gloo ranks on the CPU.

All cases run in one set of processes (``_distributed_worker.py``), started once for the
module; each test checks its case's result on every rank. Four ranks, so that both
dimensions of the 2 x 2 meshes are larger than 1. The reference is the same training
in a single process without sharding, computed by each rank itself.
"""

import json
import time
import warnings

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

if not (dist.is_available() and dist.is_gloo_available()):
    pytest.skip("torch.distributed with the gloo backend is not available", allow_module_level=True)

import _distributed_worker  # noqa: E402  (needs torch.distributed)

WORLD_SIZE = 4
TIMEOUT_S = 120


def _launch(directory) -> tuple[str | None, bool]:
    """Run the worker on WORLD_SIZE ranks; return (what went wrong or None, whether a rank died by a signal)."""
    # A file store: nothing to collide with other test runs on the same machine.
    context = mp.start_processes(
        _distributed_worker.run,
        args=(WORLD_SIZE, str(directory / "store"), str(directory)),
        nprocs=WORLD_SIZE,
        join=False,
        start_method="spawn",
    )
    deadline = time.monotonic() + TIMEOUT_S
    try:
        # join() returns as soon as any rank exits, True once all have.
        while not context.join(timeout=max(deadline - time.monotonic(), 0)):
            if time.monotonic() >= deadline:
                for process in context.processes:
                    process.kill()
                return f"the {WORLD_SIZE} ranks did not finish within {TIMEOUT_S} s", False
    except mp.ProcessExitedException as error:
        return str(error), error.signal_name is not None
    except mp.ProcessRaisedException as error:
        return str(error), False
    return None, False


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    for attempt in (1, 2):
        directory = tmp_path_factory.mktemp("distributed")
        failure, by_signal = _launch(directory)
        files = [directory / f"rank{rank}.json" for rank in range(WORLD_SIZE)]
        if all(file.exists() for file in files):
            # Each rank wrote every case's result before tearing gloo down.
            if failure is not None:
                warnings.warn(f"a rank failed after writing its results: {failure}")
            return [json.loads(file.read_text()) for file in files]
        # gloo has been seen to abort a rank natively (SIGABRT, 'terminate called without an
        # active exception'), a crash in torch.distributed rather than in LARS: one more try.
        if not (by_signal and attempt == 1):
            pytest.fail(f"the distributed worker failed: {failure}")
        warnings.warn(f"retrying the distributed worker once: {failure}")


def _case(results, name):
    for rank, rank_results in enumerate(results):
        error = rank_results[name]["error"]
        assert error is None, f"rank {rank}:\n{error}"
    return [rank_results[name]["collectives"] for rank_results in results]


def _all_reduces(collectives):
    assert all("allreduce" in op or "all_reduce" in op for op in collectives), collectives
    return sum(collectives.values())


@pytest.mark.parametrize("clip", [False, True], ids=["no_clip", "clip"])
def test_fsdp2_matches_single_process(results, clip):
    for collectives in _case(results, f"fsdp2_{'clip' if clip else 'no_clip'}"):
        # Both FSDP2 layers' norms, in one all-reduce per step.
        assert _all_reduces(collectives) == 1, collectives


def test_fsdp2_lamb_matches_single_process_with_one_collective(results):
    # trust_ratio="update" around AdamW: the norms of the weights and of the steps, whole
    # across the shards, in one all-reduce per step.
    for collectives in _case(results, "fsdp2_lamb"):
        assert _all_reduces(collectives) == 1, collectives


@pytest.mark.parametrize("clip", [False, True], ids=["no_clip", "clip"])
def test_ddp_matches_single_process(results, clip):
    for collectives in _case(results, f"ddp_{'clip' if clip else 'no_clip'}"):
        assert collectives == {}, "under DDP the parameters are replicated: no collective is needed"


def test_mixed_placements_and_plain_parameters(results):
    for collectives in _case(results, "dtensors_mixed"):
        # Three param groups with Shard(0), Shard(1), Replicate and fp64 DTensors on one mesh.
        assert _all_reduces(collectives) == 1, collectives


def test_2d_meshes(results):
    for collectives in _case(results, "dtensors_two_meshes"):
        assert _all_reduces(collectives) == 2, f"expected one all-reduce per mesh: {collectives}"


def test_hsdp_matches_single_process(results):
    for collectives in _case(results, "hsdp"):
        # Norms summed over the shard dimension only, in one all-reduce per step.
        assert _all_reduces(collectives) == 1, collectives


def test_fsdp1_flat_parameters_are_refused(results):
    _case(results, "fsdp1_refused")


def test_partial_and_mismatched_gradients_are_refused(results):
    _case(results, "unsupported_placements")


def test_zero_redundancy_optimizer_builds_larssgd(results):
    # kakaobrain/torchlars#7: tools that take an optimizer class can build LARS.
    for collectives in _case(results, "zero_lars_sgd"):
        assert collectives == {}


def test_runs_on_the_meta_device_without_distributed():
    # The plain path is untouched: no process group needed, and nothing synchronises.
    from torchlars import LARS

    param = torch.nn.Parameter(torch.randn(4, 3, device="meta"))
    param.grad = torch.randn(4, 3, device="meta")
    LARS(torch.optim.SGD([param], lr=0.1, weight_decay=1e-4)).step()
    assert not dist.is_initialized()


def test_worker_cases_are_all_tested():
    tested = {"fsdp2_no_clip", "fsdp2_clip", "fsdp2_lamb", "ddp_no_clip", "ddp_clip", "dtensors_mixed",
              "dtensors_two_meshes", "unsupported_placements", "zero_lars_sgd", "fsdp1_refused", "hsdp"}
    assert set(_distributed_worker.CASES) == tested
