"""Multi-process training on CPU (gloo): DDP and FSDP2 against one process, distributed Muon/SOAP, resuming at
another world size, data sharding, the launcher.

Two processes share the CI machine's cores, so the models are tiny and every launch counts: the one-process
references are computed once per module.
"""

from __future__ import annotations

import copy
import gc
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from conftest import make_docs
from torch import nn

from lmsprint import distributed as D
from lmsprint.config import DataConfig, build_config
from lmsprint.optim import spread as S
from lmsprint.training.checkpointer import load_sharded, save_sharded
from lmsprint.training.metrics import read_metrics
from lmsprint.training.run import resume_config, train

SRC = Path(__file__).resolve().parents[1] / "src"
STEPS = 8
# 2 layers so FSDP2 shards blocks and root; micro-batches of 2 rows in every run: with 2 ranks each rank takes one,
# one process accumulates two, so both sum the same per-row gradients (SOAP's eigenbases amplify any rounding)
ARGS = ["--data.tokenizer=byte", "--data.seq_len=16", "--data.val_fraction=0.1", "--model.n_layer=2",
        "--model.n_head=2", "--model.n_embd=16", "--train.batch_size=4", "--train.micro_batch_size=2",
        f"--train.steps={STEPS}", "--train.log_every=1", "--train.eval_every=4", "--train.eval_tokens=128",
        "--train.ckpt_every=4", "--train.device=cpu", "--log.progress=false", "--log.plot=false",
        "--schedule.warmup_steps=2", "--train.peak_tflops=1"]
# Muon with its variants on (tests/test_optim.py holds each against its reference): NorMuon's whole (rows, 1) buffer
# is state that every rank keeps whole next to its momentum shards, through DCP and consolidated checkpoints
MUON = ["--optim.name=muon", "--optim.normuon=true", "--optim.ns_coefficients=polar_express",
        "--optim.cautious_wd=true"]
SOAP = ["--optim.name=soap", "--optim.lr=3e-3", "--optim.precondition_frequency=2"]


def losses(run_dir: Path) -> dict[int, float]:
    """The last logged loss of each step (a resumed run logs its steps again)."""
    return {r["step"]: r["loss"] for r in read_metrics(run_dir / "metrics.jsonl") if r["kind"] == "train"}


def resumed_losses(run_dir: Path, from_step: int) -> dict[int, float]:
    """The losses logged after the run's last resume, which must have loaded the checkpoint of ``from_step``."""
    records = read_metrics(run_dir / "metrics.jsonl")
    last = max(i for i, r in enumerate(records) if r["kind"] == "event" and r["event"] == "resume")
    assert records[last]["step"] == from_step, records[last]
    return {r["step"]: r["loss"] for r in records[last:] if r["kind"] == "train"}


def assert_same_losses(got: dict[int, float], want: dict[int, float], steps: range, tol: float = 1e-5) -> None:
    for step in steps:
        assert abs(got[step] - want[step]) <= tol, (step, got[step], want[step])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_lmsprint(args: list[str], cwd: Path, *, torchrun: bool = False) -> subprocess.CompletedProcess:
    """``python -m lmsprint ARGS``, or under ``torchrun --nproc-per-node 2`` on a free port."""
    env = {**os.environ, "PYTHONPATH": str(SRC), "OMP_NUM_THREADS": "1"}
    prefix = ["-m", "torch.distributed.run", "--nproc-per-node=2", f"--master-port={free_port()}"] if torchrun else []
    proc = subprocess.run([sys.executable, *prefix, "-m", "lmsprint", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A corpus and, trained in this process, the one-process reference runs (Muon and SOAP)."""
    root = tmp_path_factory.mktemp("dist")
    corpus = root / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": d}) + "\n" for d in make_docs(60)))
    threads = torch.get_num_threads()
    # one thread, as in the subprocesses (OMP_NUM_THREADS=1): another thread count sums in another order, and
    # SOAP's eigenbases turn that rounding difference into ~1e-3 in the loss
    torch.set_num_threads(1)
    try:
        for name, extra in (("muon", MUON), ("soap", SOAP)):
            train(build_config(None, [f"--data.source={corpus}", *ARGS, *extra]), run_dir=root / f"ref-{name}")
    finally:
        torch.set_num_threads(threads)
    return root


def test_ddp_two_ranks_match_one_process(workdir: Path, tmp_path: Path) -> None:
    """``lmsprint train --nproc 2`` (torchrun's launcher, DDP, SOAP's eigenbases spread over ranks) logs the same
    losses as one process at the same global batch; only rank 0 reports."""
    proc = run_lmsprint(["train", str(workdir / "corpus.jsonl"), *ARGS, *SOAP, "--nproc", "2", "--sample=0",
                         f"--train.out_dir={tmp_path}", "--train.run_name=ddp"], cwd=tmp_path)
    assert proc.stdout.count("final validation loss") == 1, proc.stdout
    records = read_metrics(tmp_path / "ddp" / "metrics.jsonl")
    assert sum(r["kind"] == "train" for r in records) == STEPS  # one writer
    assert next(r for r in records if r["kind"] == "config")["world"] == 2
    assert_same_losses(losses(tmp_path / "ddp"), losses(workdir / "ref-soap"), range(1, STEPS + 1))
    # MFU is per GPU: the same FLOPs per token as one process, against the peak of one of the two devices
    ref = [r for r in read_metrics(workdir / "ref-soap" / "metrics.jsonl") if r["kind"] == "train"]
    two = [r for r in records if r["kind"] == "train"]
    for a, b in zip(two, ref):
        assert a["mfu"] / a["tokens_per_s"] == pytest.approx(b["mfu"] / b["tokens_per_s"] / 2)


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_accumulation_on_two_ranks_matches_one_process(workdir: Path, tmp_path: Path, strategy: str) -> None:
    """Two micro-steps per rank: the gradient is synchronised only on the last one (no_sync / FSDP2's
    set_requires_gradient_sync), and the step equals one process accumulating all four micro-batches."""
    accum = [*ARGS, "--train.batch_size=8", "--optim.name=adamw"]
    one = train(build_config(None, [f"--data.source={workdir / 'corpus.jsonl'}", *accum, "--train.steps=4"]),
                run_dir=tmp_path / "one")
    run_lmsprint(["train", str(workdir / "corpus.jsonl"), *accum, "--train.steps=4", f"--dist.strategy={strategy}",
                  "--sample=0", f"--train.out_dir={tmp_path}", "--train.run_name=two"], cwd=tmp_path, torchrun=True)
    two = read_metrics(tmp_path / "two" / "metrics.jsonl")
    assert next(r for r in two if r["kind"] == "config")["accum"] == 2
    assert_same_losses(losses(tmp_path / "two"), losses(one.run_dir), range(1, 5))


def test_fsdp_two_ranks_match_one_process_and_resume_on_one(workdir: Path, tmp_path: Path) -> None:
    """torchrun + FSDP2 + Muon: same losses as one process; the sharded checkpoint (DCP shards, consolidated
    weights, checksums) resumes in one process and the run continues with the same losses."""
    run = tmp_path / "fsdp"
    run_lmsprint(["train", str(workdir / "corpus.jsonl"), *ARGS, *MUON, "--dist.strategy=fsdp", "--sample=0",
                  f"--train.out_dir={tmp_path}", "--train.run_name=fsdp"], cwd=tmp_path, torchrun=True)
    want = losses(workdir / "ref-muon")
    assert_same_losses(losses(run), want, range(1, STEPS + 1))

    from safetensors.torch import load_file

    from lmsprint.training import checkpoint as ckpt

    last = run / "checkpoints" / f"step_{STEPS:08d}"
    meta = ckpt.verify(last)
    files = {"model.safetensors", "state.pt", "dcp/.metadata", "dcp/__0_0.distcp", "dcp/__1_0.distcp"}
    assert files <= set(meta["files"])
    ref = load_file(workdir / "ref-muon" / "checkpoints" / f"step_{STEPS:08d}" / "model.safetensors")
    got = load_file(last / "model.safetensors")
    assert set(got) == set(ref) and all(torch.allclose(got[k], ref[k], atol=1e-5) for k in ref)

    shutil.rmtree(last)  # back to step 4, then one process continues the two-rank run
    train(resume_config(run, []), run_dir=run, resume=True)
    assert_same_losses(resumed_losses(run, STEPS // 2), want, range(STEPS // 2 + 1, STEPS + 1))


def test_one_process_checkpoint_resumes_on_two_fsdp_ranks(workdir: Path, tmp_path: Path) -> None:
    """The reverse: a one-copy checkpoint loads into FSDP2 shards (model and Muon/AdamW state) and continues."""
    run = tmp_path / "ref"
    shutil.copytree(workdir / "ref-muon", run)
    shutil.rmtree(run / "checkpoints" / f"step_{STEPS:08d}")
    run_lmsprint(["train", "--resume", str(run), "--dist.strategy=fsdp", "--sample=0"], cwd=tmp_path, torchrun=True)
    assert_same_losses(resumed_losses(run, STEPS // 2), losses(workdir / "ref-muon"), range(STEPS // 2 + 1, STEPS + 1))


# ----------------------------------------------------------------------------------------------------------
# optimizers on two ranks: whole tensors (DDP) and FSDP2 shards, against one process

SHAPES = [(5, 3), (8, 4), (8, 4), (6, 10), (3, 7), (1, 4), (8, 4)]  # uneven and empty shards on 2 ranks
OPT_STEPS = 4
OPTIMIZERS = ["muon", "muon:variants", "soap", "adamw:for", "adamw:foreach", "adamw:fused", "lion:for", "lion:foreach",
              "ademamix:for", "ademamix:foreach"]


def _tensors(shapes: list[tuple[int, ...]], seed: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=gen) for s in shapes]


def _optimizer(name: str, params: list[nn.Parameter], data_parallel: bool) -> torch.optim.Optimizer:
    from lmsprint.optim import SOAP, AdamW, AdEMAMix, Lion, Muon

    kind, _, impl = name.partition(":")
    if kind == "muon":  # muon:variants: Polar Express coefficients, NorMuon (row statistics gathered under FSDP2)
        variants = dict(ns_coefficients="polar_express", normuon=True, cautious_wd=True) if impl else {}
        return Muon(params, lr=0.02, weight_decay=0.1, momentum_warmup=3, ns_dtype=torch.float32,
                    data_parallel=data_parallel, **variants)  # type: ignore[arg-type]
    if kind == "soap":
        return SOAP(params, lr=3e-3, precondition_frequency=2, data_parallel=data_parallel)
    if kind == "adamw":
        return AdamW(params, lr=1e-2, impl=impl)  # type: ignore[arg-type]
    if kind == "lion":
        return Lion(params, lr=1e-3, weight_decay=0.1, impl=impl)  # type: ignore[arg-type]
    return AdEMAMix(params, lr=1e-2, alpha_warmup=3, beta3_warmup=3, impl=impl)  # type: ignore[arg-type]


def _train_params(name: str, layout: str) -> list[torch.Tensor]:
    """OPT_STEPS steps on fixed gradients; the whole parameters after them."""
    shapes = SHAPES + ([] if name.startswith("muon") else [(7,)])  # SOAP & co. also get a 1-D tensor
    init = _tensors(shapes, 0)
    if layout == "fsdp":
        from torch.distributed.fsdp import fully_shard
        from torch.distributed.tensor import distribute_tensor

        holder = nn.Module()
        holder.ps = nn.ParameterList([nn.Parameter(t.clone()) for t in init])
        fully_shard(holder)
        params = list(holder.parameters())  # DTensors sharded on dim 0
    else:
        params = [nn.Parameter(t.clone()) for t in init]
    opt = _optimizer(name, params, data_parallel=layout != "single")
    for step in range(OPT_STEPS):
        for p, g in zip(params, _tensors(shapes, 100 + step)):
            p.grad = distribute_tensor(g, p.device_mesh, p.placements) if layout == "fsdp" else g
        opt.step()
    return [S.full(p.detach()).clone() for p in params]


def _optimizer_worker(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    results = {}
    for name in OPTIMIZERS:
        for layout in ("ddp", "fsdp") if name.partition(":")[0] in ("muon", "soap") else ("fsdp",):
            results[f"{name}/{layout}"] = _train_params(name, layout)
    if rank == 0:
        torch.save(results, out)
    # free the models and DTensors that hold the process group before it goes (as train() does): gloo's worker
    # threads dying with them at exit can abort the process ("terminate called without an active exception")
    del results
    gc.collect()
    dist.barrier()
    dist.destroy_process_group()


def test_optimizers_on_two_ranks_equal_one_process(tmp_path: Path) -> None:
    """Distributed Muon (Newton-Schulz per matrix on its owner; with its variants, NorMuon's row statistics
    all-gathered) and SOAP (eigenbases on their owners), on whole tensors and on FSDP2 shards, and
    AdamW/Lion/AdEMAMix (every kernel path) on DTensor shards, give the one-process parameters."""
    import torch.multiprocessing as mp

    out = tmp_path / "results.pt"
    mp.spawn(_optimizer_worker, args=(2, free_port(), str(out)), nprocs=2)
    results = torch.load(out)
    assert len(results) == len(OPTIMIZERS) + 3
    for key, got in results.items():
        want = _train_params(key.split("/")[0], "single")
        for g, w in zip(got, want):
            torch.testing.assert_close(g, w, atol=1e-6, rtol=1e-6, msg=key)


# ----------------------------------------------------------------------------------------------------------
# single-process pieces


def test_ranks_read_disjoint_rows_with_one_shared_state(tmp_path: Path) -> None:
    """In every step rank 0 and rank 1 read disjoint token positions that together are the one-process batch,
    agree on the step's target count and end in the same loader state."""
    from lmsprint.data.batching import TokenStream
    from lmsprint.data.loader import Loader
    from lmsprint.data.prepare import prepared_data

    corpus = tmp_path / "c.jsonl"
    corpus.write_text("".join(json.dumps({"text": d}) + "\n" for d in make_docs(40)))
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LMSPRINT_CACHE", str(tmp_path / "cache"))
        data = prepared_data(DataConfig(str(corpus), tokenizer="byte", val_fraction=0.1), progress=False)
        stream = TokenStream(data.train)
    kw = dict(strategy="pack", seq_len=16, batch_rows=8, micro_rows=2, seed=3)
    one = Loader(stream, rank=0, world=1, **kw)
    ranks = [Loader(stream, rank=r, world=2, **kw) for r in range(2)]
    for step in range(12):  # several epochs' worth
        plan_loader = copy.deepcopy(ranks[0])
        plan = plan_loader._take_rows(8)
        spans = [{int(plan.span_start[j]) + k for j in range(plan.ptr[i], plan.ptr[i + 1])
                  for k in range(int(plan.span_len[j]))} for i in range(8)]
        # micro-batches of 2 rows dealt in snake order: rank 0 gets rows 0-1 and 6-7, rank 1 rows 2-5
        mine = [set().union(*spans[0:2], *spans[6:8]), set().union(*spans[2:6])]
        assert not mine[0] & mine[1], step
        whole = one.next(step)
        parts = [ld.next(step) for ld in ranks]
        assert parts[0].n_targets == parts[1].n_targets == whole.n_targets
        order = [parts[0].micro[0], parts[1].micro[0], parts[1].micro[1], parts[0].micro[1]]
        assert torch.equal(torch.cat([mb.inputs for mb in order]), torch.cat([mb.inputs for mb in whole.micro]))
        assert ranks[0].state_dict() == ranks[1].state_dict() == one.state_dict()


def test_map_matrices_in_one_process_is_the_plain_function() -> None:
    x = [torch.randn(3, 4), torch.randn(3, 4), torch.randn(2, 2, 2)]
    out = S.map_matrices(lambda m: 2 * m, x, x, dtype=torch.float32)
    assert all(torch.equal(o, 2 * t) for o, t in zip(out, x))
    assert S.assign_owners([(3, 4), (2, 2), (3, 4), (3, 4)], 2) == [0, 1, 1, 0]
    assert S.shard_rows(5, 2) == [3, 2] and S.shard_rows(1, 2) == [1, 0] and sum(S.shard_rows(7, 4)) == 7


def test_setup_without_torchrun_makes_no_process_group(monkeypatch: pytest.MonkeyPatch) -> None:
    """World size 1 (e.g. independent runs on one GPU each): no process group, NVLink multicast still off."""
    for key in ("WORLD_SIZE", "RANK", "LOCAL_RANK", *D.SAFE_ENV):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("NCCL_NVLS_ENABLE", "1")  # overridden, not kept
    info = D.setup("cpu")
    assert (info.rank, info.world, info.is_main) == (0, 1, True) and not dist.is_initialized()
    assert all(os.environ[k] == v for k, v in D.SAFE_ENV.items())
    assert D.mixed_precision("fsdp", "bf16", 2) == (torch.bfloat16, "fp32")  # FSDP casts; no autocast
    assert D.mixed_precision("ddp", "bf16", 2) == (None, "bf16")
    assert D.mixed_precision("fsdp", "bf16", 1) == (None, "bf16")  # one process is never wrapped


def test_launch_relaunches_through_torchrun_without_nproc(monkeypatch: pytest.MonkeyPatch) -> None:
    from lmsprint import launch as L

    assert L.strip_nproc(["train", "--nproc", "2", "x", "--nproc=4", "--train.steps=3"]) == \
        ["train", "x", "--train.steps=3"]
    for key in ("LOCAL_RANK", "TORCHELASTIC_RUN_ID", *D.SAFE_ENV):
        monkeypatch.delenv(key, raising=False)
    seen = {}

    def fake_run(args: object) -> None:
        seen["args"], seen["env"] = args, dict(os.environ)

    import torch.distributed.run as tdr

    monkeypatch.setattr(tdr, "run", fake_run)
    assert L.launch(3, ["train", "--nproc", "3", "data.txt"]) == 0
    args = seen["args"]
    assert args.nproc_per_node == "3" and args.module and args.training_script == "lmsprint"  # type: ignore[attr-defined]
    assert args.training_script_args == ["train", "data.txt"]  # type: ignore[attr-defined]
    assert all(seen["env"][k] == v for k, v in D.SAFE_ENV.items())  # workers inherit it
    monkeypatch.setenv("LOCAL_RANK", "0")
    with pytest.raises(Exception, match="under torchrun leave it out"):
        L.launch(2, ["train"])


def test_launch_exit_codes_are_the_first_failure_and_the_signal(monkeypatch: pytest.MonkeyPatch) -> None:
    """The root cause's exit code (not a rank torchrun terminated afterwards), 128 + N for a signal, as a shell."""
    import torch.distributed.run as tdr
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError, ProcessFailure

    from lmsprint import launch as L

    for key in ("LOCAL_RANK", "TORCHELASTIC_RUN_ID"):
        monkeypatch.delenv(key, raising=False)

    def failure(rank: int, code: int, when: float) -> ProcessFailure:
        f = ProcessFailure(local_rank=rank, pid=100 + rank, exitcode=code, error_file="")
        f.timestamp = int(when)
        return f

    def fails(*failures: ProcessFailure) -> None:
        raise ChildFailedError("lmsprint", {f.local_rank: f for f in failures})

    monkeypatch.setattr(tdr, "run", lambda args: fails(failure(0, -15, 2), failure(1, 2, 1)))
    assert L.launch(2, ["train"]) == 2  # rank 1 failed first; torchrun then terminated rank 0
    monkeypatch.setattr(tdr, "run", lambda args: fails(failure(0, -9, 1)))
    assert L.launch(2, ["train"]) == 128 + 9

    def interrupted(args: object) -> None:
        raise SignalException("got SIGINT", signal.SIGINT)

    monkeypatch.setattr(tdr, "run", interrupted)
    assert L.launch(2, ["train"]) == 130


def test_sharded_checkpoint_of_an_empty_optimizer_state_stays_empty(tmp_path: Path) -> None:
    """Saving right after a rollback to the initial weights: DCP would fill an empty optimizer state by a zero-lr
    step, which the continued run would then use (Adam's moments at step 1, Muon's warm-up one step on)."""
    torch.manual_seed(0)
    model = nn.Linear(4, 4)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    save_sharded(model, opt, tmp_path / "dcp")
    assert not opt.state
    other = nn.Linear(4, 4)
    opt2 = torch.optim.AdamW(other.parameters(), lr=1e-2)
    other(torch.randn(2, 4)).sum().backward()
    opt2.step()
    load_sharded(other, opt2, tmp_path / "dcp")
    assert not opt2.state and torch.equal(other.weight, model.weight)
