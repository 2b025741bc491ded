"""terngrad_hook under real DDP: gloo workers on loopback, tiny models, a few steps.

One start per world size runs every distributed scenario in turn (a process start costs seconds);
each scenario reports "ok" or its traceback per rank, and each test checks its own scenario.
"""

from __future__ import annotations

import copy
import json
import math
import time
import traceback
from collections import OrderedDict
from datetime import timedelta
from functools import partial
from pathlib import Path
from typing import Callable

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from torchslim.comm import hooks
from torchslim.comm.hooks import TernGradState, terngrad_hook
from torchslim.comm.state import _COUNTERS, _OPTIONS, _REQUANTIZE, _stream_seed
from torchslim.comm.ternary import scaler, ternarize
from torchslim.errors import CheckpointError, ConfigError
from torchslim.train.checkpoint import load_checkpoint, save_checkpoint

SPAWN_TIMEOUT_S = 120
# fork: the workers inherit the imported torch (spawn re-imports it: ~4x slower on a busy 2-core box)
START_METHOD = "fork" if "fork" in mp.get_all_start_methods() else "spawn"
BUCKET_CAP_MB = 0.004                # ~1,000 fp32 gradients per bucket: several buckets after the rebuild


# --------------------------------------------------------------------------------------------------
# helpers that run inside the workers


def _tiny_model() -> nn.Module:
    torch.manual_seed(0)                                     # same initial weights on every worker
    return nn.Sequential(nn.Linear(8, 64), nn.ReLU(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 4))


def _ddp(model: nn.Module, state: TernGradState, hook: Callable = terngrad_hook) -> DistributedDataParallel:
    ddp = DistributedDataParallel(model, bucket_cap_mb=BUCKET_CAP_MB)
    ddp.register_comm_hook(state, hook)
    return ddp


def _train(ddp: DistributedDataParallel, steps: int, rank: int, lr: float = 0.1) -> None:
    """SGD with momentum on rank-dependent random data (so the workers' gradients differ)."""
    opt = torch.optim.SGD(ddp.parameters(), lr=lr, momentum=0.9)
    data = torch.Generator().manual_seed(100 + rank)
    for _ in range(steps):
        x, y = torch.randn(16, 8, generator=data), torch.randint(0, 4, (16,), generator=data)
        opt.zero_grad()
        nn.functional.cross_entropy(ddp(x), y).backward()
        opt.step()


def _one_backward(ddp: DistributedDataParallel, rank: int, same_data: bool = False) -> None:
    data = torch.Generator().manual_seed(7 if same_data else 100 + rank)
    dtype = next(ddp.parameters()).dtype
    ddp(torch.randn(16, 8, generator=data).to(dtype)).float().square().sum().backward()


def _assert_replicas_identical(model: nn.Module, world: int) -> None:
    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    copies = [torch.empty_like(flat) for _ in range(world)]
    dist.all_gather(copies, flat)
    for r, other in enumerate(copies):
        assert torch.equal(other, flat), f"rank {r}'s parameters differ from this rank's"


def _recording_hook(records: list[dict], inject: Callable[[dict, Tensor], None] | None = None) -> Callable:
    """terngrad_hook that keeps each bucket's input, layout and averaged output in ``records``."""

    def hook(state, bucket):            # unannotated: DDP rejects the string annotations of this module
        record = {"index": bucket.index(), "step": state.step, "params": bucket.parameters()}
        if inject is not None:
            inject(record, bucket.buffer())
        record["input"] = bucket.buffer().clone()
        records.append(record)
        return terngrad_hook(state, bucket).then(partial(_keep_output, record))

    return hook


def _keep_output(record: dict, fut: torch.futures.Future) -> Tensor:
    record["output"] = fut.value().clone()
    return fut.value()


def _mean_allreduce(flat: Tensor, world: int, group: dist.ProcessGroup | None = None) -> Tensor:
    out = flat / world
    dist.all_reduce(out, group=group)
    return out


def _reference_average(state: TernGradState, record: dict) -> Tensor:
    """The hook's average recomputed from the same gradients, scalers and random streams.

    Per layer: ``s = max_i scaler(g_i)``, codes from the generator seeded by (seed, rank, step, parameter),
    all-gathered unpacked, ``Σ_i t_i · (s / N)``; full-precision layers: the all-reduced mean.
    """
    group = state.process_group
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    grads, full, offset = [], [], 0
    for p in record["params"]:
        grads.append(record["input"][offset:offset + p.numel()])
        full.append(state._in_full_precision(p))
        offset += p.numel()
    out = torch.empty_like(record["input"])
    views = [out[o:o + g.numel()] for o, g in zip(_offsets(grads), grads)]
    tern = [i for i, f in enumerate(full) if not f]
    if tern:
        s = torch.stack([scaler(grads[i], state.clip_sigma) for i in tern])
        dist.all_reduce(s, op=dist.ReduceOp.MAX, group=group)
        keys = [state._key(record["params"][i]) for i in tern]
        codes = torch.cat([ternarize(grads[i], s_l, _stream(state.seed, rank, record["step"], key))
                           for i, s_l, key in zip(tern, s, keys)])
        gathered = [torch.empty_like(codes) for _ in range(world)]
        dist.all_gather(gathered, codes, group=group)
        total = torch.stack(gathered).to(torch.int32).sum(0)                 # (n,) in [-N, N]
        if state.collective_for(codes.numel(), world) == "twophase":
            total = _requantized_sums(state, total, world, record["step"], keys, [grads[i].numel() for i in tern])
        for i, s_l, start in zip(tern, s, _offsets([grads[i] for i in tern])):
            views[i].copy_(total[start:start + grads[i].numel()].float() * (s_l / world))
    fp = [i for i, f in enumerate(full) if f]
    if fp:
        mean = _mean_allreduce(torch.cat([grads[i] for i in fp]), world, group)
        for i, start in zip(fp, _offsets([grads[i] for i in fp])):
            views[i].copy_(mean[start:start + grads[i].numel()])
    return out


def _stream(*values: int) -> torch.Generator:
    return torch.Generator().manual_seed(_stream_seed(*values))


def _requantized_sums(state: TernGradState, total: Tensor, world: int, step: int, keys: list[int],
                      sizes: list[int]) -> Tensor:
    """Two-phase, shard by shard or not: N · the mean re-ternarized per parameter block of B elements,
    each block with its own rank-free stream (seed, -1, step, parameter, block)."""
    mean, out, start = total.float() / world, [], 0
    for key, size in zip(keys, sizes):
        for block, b0 in enumerate(range(0, size, hooks._BLOCK)):
            part = mean[start + b0:start + min(b0 + hooks._BLOCK, size)]
            out.append(ternarize(part, torch.tensor(1.0), _stream(state.seed, _REQUANTIZE, step, key, block)))
        start += size
    return torch.cat(out).float() * world


def _offsets(tensors: list[Tensor]) -> list[int]:
    starts, total = [], 0
    for t in tensors:
        starts.append(total)
        total += t.numel()
    return starts


# --------------------------------------------------------------------------------------------------
# scenarios: run on every rank, raise on failure


def scenario_replicas_identical(rank: int, world: int) -> None:
    """(a) After several TernGrad steps the replicas are bit-identical (and did train)."""
    model = _tiny_model()
    before = [p.detach().clone() for p in model.parameters()]
    state = TernGradState.for_model(model, full_precision_last=True)
    _train(_ddp(model, state), steps=4, rank=rank)
    _assert_replicas_identical(model, world)
    assert any(not torch.equal(b, p) for b, p in zip(before, model.parameters())), "no parameter changed"
    assert state.step == 4


def _check_reference(rank: int, world: int, dtype: torch.dtype = torch.float32, **options) -> None:
    model = _tiny_model().to(dtype)
    state = TernGradState.for_model(model, **options)
    records: list[dict] = []
    ddp = _ddp(model, state, _recording_hook(records))
    for _ in range(2):                                       # iteration 1 runs on the rebuilt buckets
        records.clear()
        _one_backward(ddp, rank)
    assert records and all("output" in r for r in records)
    for record in records:
        expected = _reference_average(state, record)
        assert torch.equal(record["output"], expected), f"bucket {record['index']} differs from the reference"


def scenario_reference_allgather(rank: int, world: int) -> None:
    """(b) All-gather of base3 codes: equal to s·Σt/N recomputed from the same codes."""
    _check_reference(rank, world, reduce="allgather", scheme="base3", full_precision_last=True, seed=3)


def scenario_reference_allgather_2bit(rank: int, world: int) -> None:
    _check_reference(rank, world, reduce="allgather", scheme="2bit", clip_sigma=None)


def scenario_reference_allreduce(rank: int, world: int) -> None:
    """(b) Integer SUM all-reduce of int8 codes: the same average."""
    _check_reference(rank, world, reduce="allreduce", full_precision_last=True)


def scenario_reference_twophase(rank: int, world: int) -> None:
    """Two-phase: the re-ternarized shard means, recomputed from the same codes and streams."""
    _check_reference(rank, world, reduce="twophase", full_precision_last=True, seed=5)


def scenario_twophase_unbiased(rank: int, world: int) -> None:
    """Two-phase rounds twice and stays unbiased: the mean of 300 averages ≈ the exact average."""
    state = TernGradState(reduce="twophase", clip_sigma=None)
    torch.manual_seed(0)
    base = torch.randn(400)
    grads = [base + 0.5 * torch.randn(400) for _ in range(world)]       # the same on every rank
    model = nn.Linear(400, 1, bias=False)
    ddp = _ddp(model, state)
    total = torch.zeros(400)
    for _ in range(300):
        model.weight.grad = None
        x = grads[rank].view(1, 400)
        ddp(x).sum().backward()                                          # the gradient of w·x is x
        total += model.weight.grad.view(-1)
    exact = torch.stack(grads).mean(0)
    s = torch.stack([g.abs().max() for g in grads]).max()
    # per element, the average is s·u with Var ≤ s²: the mean of 300 is within ~4 standard errors
    mean = total / 300
    assert (mean - exact).abs().max() < 4 * s / math.sqrt(300)
    assert abs(mean @ exact / (exact @ exact) - 1) < 0.05              # no scale bias (std ≈ 0.012)
    assert state.bytes_sent > 0


def scenario_reference_bf16(rank: int, world: int) -> None:
    """A bf16 model gives bf16 buckets: codes from bf16 gradients, the average rounded to bf16."""
    _check_reference(rank, world, dtype=torch.bfloat16, full_precision_last=True)


def scenario_subgroups(rank: int, world: int) -> None:
    """Two DDP jobs side by side in process groups {0, …, N/2-1} and {N/2, …}: the hook uses its group."""
    halves = [dist.new_group(list(range(0, world // 2))), dist.new_group(list(range(world // 2, world)))]
    group = halves[rank // (world // 2)]
    model = _tiny_model()
    state = TernGradState.for_model(model, process_group=group, full_precision_last=True)
    records: list[dict] = []
    ddp = DistributedDataParallel(model, bucket_cap_mb=BUCKET_CAP_MB, process_group=group)
    ddp.register_comm_hook(state, _recording_hook(records))
    _one_backward(ddp, rank)
    for record in records:
        assert torch.equal(record["output"], _reference_average(state, record))


def scenario_streams_independent(rank: int, world: int) -> None:
    """Identical gradients on all workers still get independent codes: some sums Σ_i t_i are odd.

    (With one shared stream every worker would draw the same codes and every sum would be 0 or ±N.)
    """
    model = _tiny_model()
    state = TernGradState(reduce="allreduce", clip_sigma=None)         # s = max|g|, the same on every rank
    records: list[dict] = []
    _one_backward(_ddp(model, state, _recording_hook(records)), rank, same_data=True)
    odd = 0
    for record in records:
        s = _layer_scalers(record)                                      # (n,) each element's layer s
        sums = torch.round(record["output"][s > 0] * world / s[s > 0])  # Σ_i t_i
        assert sums.abs().max() <= world
        odd += int((torch.remainder(sums, 2) != 0).sum())
    assert odd > 0, "all workers drew the same codes: their random streams are not independent"


def _layer_scalers(record: dict) -> Tensor:
    """Each element's layer scaler max|g| (identical gradients on all ranks, no clipping)."""
    parts, offset = [], 0
    for p in record["params"]:
        g = record["input"][offset:offset + p.numel()]
        parts.append(g.abs().max().expand(p.numel()))
        offset += p.numel()
    return torch.cat(parts)


def scenario_nonfinite(rank: int, world: int) -> None:
    """(c) NaN on rank 1 and inf on rank 0 reach every rank; the rest is the exact fp mean."""

    def inject(record: dict, buffer: Tensor) -> None:
        if record["step"] == 0 and record["index"] == 0:
            buffer[0] = float("nan") if rank == 1 else buffer[0]
            buffer[1] = float("inf") if rank == 0 else buffer[1]

    model = _tiny_model()
    records: list[dict] = []
    _one_backward(_ddp(model, TernGradState(), _recording_hook(records, inject)), rank)
    out = records[0]["output"]
    assert math.isnan(out[0]) and out[1] == float("inf"), f"non-finite values lost: {out[:2]}"
    exact = _mean_allreduce(records[0]["input"], world)
    assert torch.equal(out[2:], exact[2:]), "a non-finite bucket must be averaged in full precision"


def scenario_bucket_rebuild(rank: int, world: int) -> None:
    """(d) DDP rebuilds its buckets after iteration 0; training goes on and replicas stay identical."""
    model = _tiny_model()
    state = TernGradState(min_numel=16)
    layouts: list[list[int]] = []

    def hook(st, bucket):
        if bucket.index() == 0:
            layouts.append([])
        layouts[-1].append(bucket.buffer().numel())
        return terngrad_hook(st, bucket)

    _train(_ddp(model, state, hook), steps=4, rank=rank)
    assert len(layouts) == 4 and layouts[1] != layouts[0], f"no rebuild seen: {layouts}"
    assert len(layouts[-1]) > 1, "expected several buckets"
    assert state.step == 4
    _assert_replicas_identical(model, world)


def _run_resumable(rank: int, steps: int, stop_at: int | None, bound: bool, **options) -> list[Tensor]:
    """SGD on per-step data; with ``stop_at``, everything is rebuilt there from saved state dicts, as a
    restarted process would (a fresh DDP starts on its initial bucket layout, rebuilt after a step)."""
    data = torch.Generator().manual_seed(100 + rank)
    batches = [(torch.randn(16, 8, generator=data), torch.randint(0, 4, (16,), generator=data)) for _ in range(steps)]
    saved: dict = {}
    for step, (x, y) in enumerate(batches):
        if step in (0, stop_at):
            model = _tiny_model()
            state = TernGradState.for_model(model, **options) if bound else TernGradState(**options)
            opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
            if saved:
                model.load_state_dict(saved["model"])
                opt.load_state_dict(saved["optimizer"])
                state.load_state_dict(saved["terngrad"])
            ddp = _ddp(model, state)
        opt.zero_grad()
        nn.functional.cross_entropy(ddp(x), y).backward()
        opt.step()
        if step + 1 == stop_at:
            saved = copy.deepcopy({"model": model.state_dict(), "optimizer": opt.state_dict(),
                                   "terngrad": state.state_dict()})
    return [p.detach().clone() for p in model.parameters()]


def _check_resume_bits(rank: int, fp_layers: bool, unbound: bool, **options) -> None:
    """Bound (streams keyed by model.parameters() order) and unbound (keyed in first-met order)."""
    fp = ({"full_precision_last": True}, {"min_numel": 100}) if fp_layers else ({}, {})
    for bound, opts in ((True, {**options, **fp[0]}), (False, {**options, **fp[1]}))[:2 if unbound else 1]:
        whole = _run_resumable(rank, 4, None, bound, **opts)
        resumed = _run_resumable(rank, 4, 2, bound, **opts)
        for a, b in zip(whole, resumed):
            assert torch.equal(a, b), f"resumed run differs (bound={bound}) by {(a - b).abs().max():.3g}"


def scenario_resume_same_bits(rank: int, world: int) -> None:
    """Stopped after 2 steps and resumed on fresh DDP buckets: bit-identical to 4 uninterrupted steps."""
    _check_resume_bits(rank, fp_layers=True, unbound=True, seed=11)


def scenario_resume_same_bits_twophase(rank: int, world: int) -> None:
    """The same for the two-phase reduce, whose shards follow the bucket layout. Every layer ternary: from
    3 workers on, gloo's fp all-reduce sums in an order that follows the bucket layout (as without a hook)."""
    _check_resume_bits(rank, fp_layers=False, unbound=False, seed=11, reduce="twophase")


def scenario_warmup(rank: int, world: int) -> None:
    """(e) The first warmup_steps iterations are plain fp averaging; ternary afterwards."""
    model = _tiny_model()
    state = TernGradState(warmup_steps=2)
    records: list[dict] = []
    ddp = _ddp(model, state, _recording_hook(records))
    for _ in range(3):
        _one_backward(ddp, rank)
    for record in records:
        exact = _mean_allreduce(record["input"], world)
        if record["step"] < 2:
            assert torch.equal(record["output"], exact), f"warm-up step {record['step']} is not plain fp averaging"
        else:
            assert torch.equal(record["output"], _reference_average(state, record))
    assert any(not torch.equal(r["output"], _mean_allreduce(r["input"], world)) for r in records if r["step"] == 2)


def scenario_min_numel(rank: int, world: int) -> None:
    """(e) Layers below min_numel are averaged exactly; larger ones are ternary."""
    model = _tiny_model()
    state = TernGradState(min_numel=100)
    records: list[dict] = []
    _one_backward(_ddp(model, state, _recording_hook(records)), rank)
    small = large = 0
    for record in records:
        offset = 0
        for p in record["params"]:
            got = record["output"][offset:offset + p.numel()]
            exact = _mean_allreduce(record["input"][offset:offset + p.numel()], world)
            if p.numel() < 100:
                assert torch.equal(got, exact), f"a {p.numel()}-element layer was not kept exact"
                small += 1
            else:
                assert not torch.equal(got, exact)
                large += 1
            offset += p.numel()
    assert small == 3 and large == 3


def scenario_byte_counts(rank: int, world: int) -> None:
    """Counters follow the ring model: scalers + packed codes + fp layers, per bucket."""
    model = _tiny_model()
    state = TernGradState.for_model(model, full_precision_last=True, reduce="allgather", scheme="base3")
    records: list[dict] = []
    _one_backward(_ddp(model, state, _recording_hook(records)), rank)
    expected = 0
    for record in records:
        tern = [p.numel() for p in record["params"] if not state._in_full_precision(p)]
        full = [p.numel() for p in record["params"] if state._in_full_precision(p)]
        if tern:
            expected += 2 * (world - 1) * 4 * (len(tern) + 1) // world              # MAX of scalers + flag
            expected += (world - 1) * math.ceil(sum(tern) / 5)                      # all-gather, 5 codes/byte
        if full:
            expected += 2 * (world - 1) * 4 * sum(full) // world                    # fp all-reduce
    assert state.bytes_sent == state.bytes_received == expected
    assert state.numel_reduced == sum(p.numel() for p in model.parameters())


def _glob_excluded_outputs(rank: int, world: int, **options) -> list[dict]:
    """One backward of the tiny model with its biases kept in fp by a glob; the recorded buckets."""
    model = _tiny_model()
    state = TernGradState.for_model(model, **options)
    assert state.full_precision_names() == ("0.bias", "2.bias", "4.bias")
    records: list[dict] = []
    _one_backward(_ddp(model, state, _recording_hook(records)), rank)
    for record in records:
        assert torch.equal(record["output"], _reference_average(state, record))
    return records


def scenario_exclude_glob(rank: int, world: int) -> None:
    """exclude=("*.bias",): every bias is the exact fp mean, every weight ternary; the old keyword
    full_precision_params warns and gives the same bits."""
    records = _glob_excluded_outputs(rank, world, exclude=("*.bias",))
    exact = ternary = 0
    for record in records:
        offset = 0
        for p in record["params"]:
            got = record["output"][offset:offset + p.numel()]
            mean = _mean_allreduce(record["input"][offset:offset + p.numel()], world)
            if p.dim() == 1:
                assert torch.equal(got, mean), f"a {p.numel()}-element bias was not kept exact"
                exact += 1
            else:
                assert not torch.equal(got, mean), "a weight was not ternarized"
                ternary += 1
            offset += p.numel()
    assert exact == 3 and ternary == 3
    with pytest.warns(DeprecationWarning, match="full_precision_params"):
        old = _glob_excluded_outputs(rank, world, full_precision_params=("*.bias",))
    assert [r["index"] for r in old] == [r["index"] for r in records]
    assert all(torch.equal(a["output"], b["output"]) for a, b in zip(old, records))


SCENARIOS: dict[str, Callable[[int, int], None]] = {
    name.removeprefix("scenario_"): fn for name, fn in globals().items() if name.startswith("scenario_")
}
WORLD2 = tuple(name for name in SCENARIOS if name not in ("subgroups", "resume_same_bits_twophase"))
WORLD4 = ("replicas_identical", "reference_allgather", "reference_allreduce", "reference_twophase",
          "twophase_unbiased", "nonfinite", "subgroups", "resume_same_bits_twophase")


def _worker(rank: int, world: int, names: tuple[str, ...], out: str) -> None:
    torch.set_num_threads(1)        # a forked child must not enter the parent's OpenMP pool: it would hang
    # rendezvous through a file in this run's folder: no port to race for with other jobs
    dist.init_process_group("gloo", init_method=f"file://{out}/store", rank=rank, world_size=world,
                            timeout=timedelta(seconds=60))
    results = {}
    try:
        for name in names:
            try:
                SCENARIOS[name](rank, world)
                results[name] = "ok"
            except Exception:                                # reported per scenario, checked by its test
                results[name] = traceback.format_exc()
            dist.barrier()
    finally:
        Path(out, f"rank{rank}.json").write_text(json.dumps(results))
        dist.destroy_process_group()


def _spawn(world: int, names: tuple[str, ...], out: Path) -> dict[str, list[str]]:
    """Run ``names`` on ``world`` gloo workers; per scenario, each rank's "ok" or traceback."""
    ctx = mp.start_processes(_worker, args=(world, names, str(out)), nprocs=world, join=False,
                             start_method=START_METHOD)
    deadline = time.monotonic() + SPAWN_TIMEOUT_S
    try:
        while not ctx.join(timeout=1):
            if time.monotonic() > deadline:
                pytest.fail(f"{world} workers did not finish {names} within {SPAWN_TIMEOUT_S} s (hang?)")
    finally:
        for proc in ctx.processes:
            if proc.is_alive():
                proc.kill()
    ranks = [json.loads(Path(out, f"rank{r}.json").read_text()) for r in range(world)]
    return {name: [r.get(name, "not run") for r in ranks] for name in names}


@pytest.fixture(scope="module")
def world2(tmp_path_factory) -> dict[str, list[str]]:
    return _spawn(2, WORLD2, tmp_path_factory.mktemp("world2"))


@pytest.fixture(scope="module")
def world4(tmp_path_factory) -> dict[str, list[str]]:
    return _spawn(4, WORLD4, tmp_path_factory.mktemp("world4"))


def _ok(results: dict[str, list[str]], name: str) -> None:
    failures = [f"rank {r}:\n{text}" for r, text in enumerate(results[name]) if text != "ok"]
    assert not failures, "\n".join(failures)


# --------------------------------------------------------------------------------------------------
# tests


@pytest.mark.parametrize("name", WORLD2)
def test_two_workers(world2, name):
    _ok(world2, name)


@pytest.mark.parametrize("name", WORLD4)
def test_four_workers(world4, name):
    _ok(world4, name)


def test_unknown_scheme_says_which_exist():
    with pytest.raises(ConfigError, match=r"unknown scheme '3bit'.*'base3'.*'2bit'"):
        TernGradState(scheme="3bit")


@pytest.mark.parametrize("options, match", [
    ({"reduce": "ring"}, "unknown reduce"),
    ({"sum_dtype": "int16"}, "unknown sum_dtype"),
    ({"clip_sigma": 0.0}, "clip_sigma must be > 0"),
    ({"clip_sigma": float("nan")}, "clip_sigma must be > 0"),
    ({"min_numel": -1}, "min_numel must be an integer >= 0"),
    ({"warmup_steps": 1.5}, "warmup_steps must be an integer"),
    ({"exclude": "fc2"}, r"exclude must be a sequence.*write \('fc2',\)"),
    ({"include": "fc2"}, r"include must be a sequence.*write \('fc2',\)"),
    ({"exclude": ("fc2", 3)}, "exclude must hold parameter or module names"),
])
def test_bad_options_raise_config_error(options, match):
    with pytest.raises(ConfigError, match=match):
        TernGradState(**options)


def test_world_too_large_for_int8_sums():
    state = TernGradState(reduce="allreduce")
    assert state.collective_for(10_000, 127) == "allreduce"
    with pytest.raises(ConfigError, match=r"128 workers overflow int8.*sum_dtype='int32'"):
        state.collective_for(10_000, 128)
    assert TernGradState(reduce="allreduce", sum_dtype="int32").collective_for(10_000, 128) == "allreduce"
    with pytest.raises(ConfigError, match="overflow int8"):          # auto would pick the all-reduce
        TernGradState(reduce="auto").collective_for(10_000, 200)


def test_twophase_is_opt_in_and_needs_three_workers():
    assert TernGradState(reduce="twophase").collective_for(10_000, 2) == "allgather"    # same bytes, one rounding
    assert TernGradState(reduce="twophase").collective_for(10_000, 4) == "twophase"
    assert all(TernGradState().collective_for(10_000, n) != "twophase" for n in (2, 4, 64))


@pytest.mark.parametrize("scheme, int8_limit, int32_limit", [("base3", 10, 40), ("2bit", 8, 32)])
def test_auto_picks_allgather_while_it_moves_fewer_bytes(scheme, int8_limit, int32_limit):
    numel = 100_000                                                  # a multiple of 4 and 5: no padding
    for sum_dtype, limit in (("int8", int8_limit), ("int32", int32_limit)):
        state = TernGradState(scheme=scheme, sum_dtype=sum_dtype)
        assert state.collective_for(numel, limit) == "allgather"
        assert state.collective_for(numel, limit + 1) == "allreduce"
    assert TernGradState(reduce="allgather").collective_for(numel, 10_000) == "allgather"


def test_names_need_a_bound_model():
    state = TernGradState(full_precision_last=True)
    with pytest.raises(ConfigError, match="for_model"):
        state._in_full_precision(nn.Parameter(torch.zeros(3)))


def test_bind_resolves_names_and_suggests_close_ones():
    model = _tiny_model()
    ddp_like = nn.Module()
    ddp_like.module = model                                          # DDP's "module." prefix is dropped
    state = TernGradState.for_model(ddp_like, exclude=("0",), full_precision_last=True)
    assert state.full_precision_names() == ("0.bias", "0.weight", "4.bias", "4.weight")
    assert state._in_full_precision(model[0].weight) and not state._in_full_precision(model[2].weight)
    with pytest.raises(ConfigError, match=r"exclude pattern 'fc2' matches no layer; did you mean 'fc1'"):
        TernGradState.for_model(nn.Sequential(OrderedDict(fc1=nn.Linear(2, 2))), exclude=("fc2",))


def _named_model() -> nn.Module:
    """layer1 and layer2 (each conv1, conv2), fc: names for include/exclude patterns."""
    torch.manual_seed(0)
    return nn.Sequential(OrderedDict(layer1=_block(), layer2=_block(), fc=nn.Linear(2, 3)))


def _block() -> nn.Module:
    return nn.Sequential(OrderedDict(conv1=nn.Conv2d(2, 2, 3), conv2=nn.Conv2d(2, 2, 1)))


def test_exclude_glob_may_name_modules_or_parameters():
    model = _named_model()
    by_module = TernGradState.for_model(model, exclude=("*.conv2",))      # a module: all its parameters
    assert by_module.full_precision_names() == ("layer1.conv2.bias", "layer1.conv2.weight",
                                                "layer2.conv2.bias", "layer2.conv2.weight")
    by_param = TernGradState.for_model(model, exclude=("layer2.*.weight", "fc"))
    assert by_param.full_precision_names() == ("fc.bias", "fc.weight", "layer2.conv1.weight", "layer2.conv2.weight")
    assert by_param._in_full_precision(model.fc.bias) and not by_param._in_full_precision(model.layer2.conv1.bias)


def test_include_ternarizes_only_those_less_exclude_and_last():
    model = _named_model()
    state = TernGradState.for_model(model, include=("layer2", "fc"), exclude=("*.bias",), full_precision_last=True)
    ternarized = sorted(n for n, p in model.named_parameters() if not state._in_full_precision(p))
    assert ternarized == ["layer2.conv1.weight", "layer2.conv2.weight"]
    assert TernGradState.for_model(model, include=()).full_precision_names() == tuple(
        sorted(n for n, _ in model.named_parameters()))
    with pytest.raises(ConfigError, match="for_model"):
        TernGradState(include=("fc",))._in_full_precision(model.fc.weight)


@pytest.mark.parametrize("keyword, pattern, match", [
    ("exclude", "layer3", r"exclude pattern 'layer3' matches no layer; did you mean 'layer2' or 'layer1'"),
    ("exclude", "*.conv3", r"exclude pattern '\*.conv3' matches no layer.*Layers: fc, fc.bias"),
    ("include", "layer2.conv1.wieght", r"include pattern 'layer2.conv1.wieght'.*did you mean 'layer2.conv1.weight'"),
])
def test_pattern_matching_nothing_raises_with_close_matches(keyword, pattern, match):
    with pytest.raises(ConfigError, match=match):
        TernGradState.for_model(_named_model(), **{keyword: (pattern,)})


def test_full_precision_params_is_deprecated_exclude():
    model = _named_model()
    with pytest.warns(DeprecationWarning, match=r"TernGradState\(full_precision_params=...\).*use exclude="):
        old = TernGradState(full_precision_params=["layer1"])
    assert old.exclude == ("layer1",) and old == TernGradState(exclude=("layer1",))
    with pytest.warns(DeprecationWarning, match=r"for_model\(full_precision_params=...\)"):
        bound = TernGradState.for_model(model, full_precision_params=("layer1",))
    assert bound.full_precision_names() == TernGradState.for_model(model, exclude=("layer1",)).full_precision_names()
    with pytest.raises(TypeError, match="both"):
        TernGradState(full_precision_params=("fc",), exclude=("fc",))


def test_version_1_state_dict_with_full_precision_params_loads(tmp_path):
    model = _tiny_model()
    state = TernGradState.for_model(model, exclude=("4",), seed=3)
    state.step = 5
    saved = state.state_dict()
    options = {k: v for k, v in saved["options"].items() if k not in ("include", "exclude")}
    old = {**saved, "version": 1, "options": {**options, "full_precision_params": ("4",)}}
    save_checkpoint(tmp_path / "old.pt", {"terngrad": old})
    restored = TernGradState.for_model(model)
    restored.load_state_dict(load_checkpoint(tmp_path / "old.pt")["terngrad"])
    assert restored.state_dict() == saved
    assert restored.full_precision_names() == ("4.bias", "4.weight")
    with pytest.raises(CheckpointError, match=r"lacks \['options.exclude'\]"):
        TernGradState().load_state_dict({**old, "options": options})


def test_single_element_layers_stay_exact_under_clipping():
    assert TernGradState()._in_full_precision(torch.zeros(1))        # σ = 0 would decode it to 0
    assert not TernGradState(clip_sigma=None)._in_full_precision(torch.zeros(1))


def test_state_dict_round_trip(tmp_path):
    model = _tiny_model()
    state = TernGradState.for_model(model, scheme="2bit", clip_sigma=None, seed=5, min_numel=10,
                                    exclude=("4",), warmup_steps=3, reduce="allreduce")
    state.step, state.bytes_sent, state.bytes_received, state.numel_reduced = 7, 100, 100, 999
    save_checkpoint(tmp_path / "ckpt.pt", {"terngrad": state.state_dict()})       # weights-only loadable
    saved = load_checkpoint(tmp_path / "ckpt.pt")["terngrad"]
    assert "process_group" not in saved["options"]
    restored = TernGradState.for_model(model)
    restored.load_state_dict(saved)
    for name in _OPTIONS + _COUNTERS:
        assert getattr(restored, name) == getattr(state, name), name
    assert restored.full_precision_names() == ("4.bias", "4.weight")


def test_load_state_dict_rejects_damaged_or_newer():
    good = TernGradState().state_dict()
    with pytest.raises(CheckpointError, match="newer"):
        TernGradState().load_state_dict({**good, "version": 99})
    with pytest.raises(CheckpointError, match="lacks.*step"):
        TernGradState().load_state_dict({k: v for k, v in good.items() if k != "step"})
    with pytest.raises(ConfigError, match="unknown scheme"):
        TernGradState().load_state_dict({**good, "options": {**good["options"], "scheme": "4bit"}})


def test_stream_seeds_differ_by_rank_step_and_parameter():
    seeds = {_stream_seed(0, r, k, p) for r in range(4) for k in range(4) for p in range(4)}
    seeds |= {_stream_seed(0, _REQUANTIZE, k, p, b) for k in range(4) for p in range(4) for b in range(2)}
    assert len(seeds) == 96 and all(0 <= s < 2**63 for s in seeds)


def test_stream_keys_follow_parameter_order_not_buckets():
    """Bound: the index in model.parameters(); unbound: the order the hook first meets them."""
    model = _tiny_model()
    params = list(model.parameters())
    assert [TernGradState.for_model(model)._key(p) for p in params] == list(range(6))
    unbound = TernGradState()
    assert [unbound._key(p) for p in reversed(params)] == list(range(6))
    assert [unbound._key(p) for p in params] == list(range(5, -1, -1))     # fixed once met


def test_shard_lanes_do_not_depend_on_the_shards(monkeypatch):
    """Two-phase lanes of an element come from its parameter's block stream, however the codes are cut."""
    monkeypatch.setattr(hooks, "_BLOCK", 8)
    state = TernGradState(seed=4)
    layers = (hooks._Layer(0, 13, 0), hooks._Layer(13, 30, 1), hooks._Layer(43, 5, 2))
    whole = hooks._shard_lanes(state, layers, 0, 60, 3, torch.device("cpu"))               # (60,)
    for size in (1, 7, 20):
        cut = torch.cat([hooks._shard_lanes(state, layers, a, size, 3, torch.device("cpu"))
                         for a in range(0, 60, size)])[:60]
        assert torch.equal(cut, whole), f"shards of {size} draw other lanes"
    assert torch.equal(whole[48:], torch.zeros(12, dtype=torch.int16))                     # padding
    moved = (hooks._Layer(0, 30, 1), hooks._Layer(30, 13, 0), hooks._Layer(43, 5, 2))       # reordered bucket
    again = hooks._shard_lanes(state, moved, 0, 48, 3, torch.device("cpu"))
    assert torch.equal(again[:30], whole[13:43]) and torch.equal(again[30:43], whole[:13])
