"""One checkpointer for a run's stateful objects: the model, the optimizer and everything else that resumes
(scheduler, loss scaler, loader, guard, random generators, trainer counters), saved as one checkpoint in the
atomic, checksummed format of :mod:`lmsprint.training.checkpoint`, whole or sharded (torch.distributed.checkpoint).

Resume and rollback both go through :meth:`Checkpointer.load`; a rollback loads a subset of the objects.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable, Collection
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor, nn

from lmsprint import distributed as D
from lmsprint.errors import CheckpointError
from lmsprint.model import GPT, GPTConfig
from lmsprint.training import checkpoint as ckpt

OptimizerLoad = Literal["load", "fresh", "fit"]


class Checkpointer:
    """Saves and loads a run's state as one checkpoint.

    The model and optimizer are saved whole (one process, DDP), or as every rank's DCP shards beside the
    consolidated weights (FSDP2 on several processes). Every other object of ``states`` is saved by its
    ``state_dict()`` under its name in ``state.pt``. Loading reverses it whatever the world size and strategy
    that saved: DCP reshards, and whole tensors are split over the ranks of an FSDP2 run.

    Args:
        root: the run's checkpoints directory.
        model: the unwrapped model (its parameters are DTensors under FSDP2).
        optimizer: its optimizer.
        states: name -> object with ``state_dict``/``load_state_dict`` (None: saved as None, never loaded).
        info: saved with every checkpoint for reference and never loaded back (the run's config).
        model_config: the model's shape, written to meta.json; a checkpoint of another shape is refused.
        optimizer_name: names the optimizer in every checkpoint; one that holds another's state is refused.
        files: written into every checkpoint by name, checksummed (the run's tokenizer.json).
        keep: how many checkpoints to keep.
        sharded: FSDP2 on several processes (DTensor parameters, DCP files).
        is_main: this process writes the files (rank 0).
        warn: reports corrupt checkpoints that are skipped.
    """

    def __init__(self, root: Path, *, model: GPT, optimizer: torch.optim.Optimizer, states: dict[str, Any],
                 info: dict[str, Any], model_config: GPTConfig, keep: int, sharded: bool, is_main: bool,
                 warn: Callable[[str], None], optimizer_name: str | None = None,
                 files: dict[str, bytes] | None = None) -> None:
        self.root, self.model, self.optimizer, self.states, self.info = root, model, optimizer, states, info
        self.model_config, self.keep, self.sharded, self.is_main, self.warn = model_config, keep, sharded, is_main, warn
        self.optimizer_name = optimizer_name or type(optimizer).__name__
        self.files = files or {}
        # the start of the run: a checkpoint never written (the weights are made again when needed)
        self.initial = copy.deepcopy({"optimizer": optimizer.state_dict(),
                                      **{name: obj.state_dict() for name, obj in states.items() if obj is not None}})

    def save(self, step: int, *, protect_step: int | None = None) -> Path | None:
        """Checkpoint ``step`` (rank 0 writes; every rank waits for it); returns its directory on rank 0.

        FSDP: first every rank writes its model and optimizer shards into the temporary directory and the whole
        weights are gathered to rank 0, which completes and renames it. ``protect_step``: the newest checkpoint at
        most this step is never pruned (the guard's last judged-good one).
        """
        path = tmp = None
        full_sd = None
        if self.sharded:
            tmp = ckpt.sharded_temp_dir(self.root, step) if self.is_main else None
            tmp = Path(str(D.broadcast_object(str(tmp))))
            save_sharded(self.model, self.optimizer, tmp / "dcp")
            full_sd = full_model_state(self.model)  # collective: rank 0 gets the whole weights on its CPU
        if self.is_main:
            state = {"optimizer": None if self.sharded else self.optimizer.state_dict(),  # FSDP: in the DCP shards
                     "optimizer_name": self.optimizer_name}
            state.update({name: None if obj is None else obj.state_dict() for name, obj in self.states.items()})
            path = ckpt.save_checkpoint(self.root, step, model_sd=ckpt.model_state(self.model, full_sd),
                                        state={**state, **self.info}, model_config=self.model_config,
                                        keep=self.keep, tmp=tmp, protect_step=protect_step, files=self.files)
        D.barrier()
        return path

    def latest(self, max_step: int | None = None) -> Path | None:
        """The newest valid checkpoint (at most ``max_step``), as rank 0 finds it (one rank reads the checksums;
        all load the same one)."""
        path = ckpt.latest_valid(self.root, warn=self.warn, max_step=max_step) if self.is_main else None
        found = D.broadcast_object(None if path is None else str(path))
        return None if found is None else Path(str(found))

    def resume(self, *, optimizer: OptimizerLoad = "load") -> Path | None:
        """Load the newest valid checkpoint (every part; ``optimizer`` as :meth:`load` takes it); None when the run
        has none yet (it starts over).

        Raises:
            CheckpointError: every checkpoint is corrupt or incomplete, or it holds another optimizer's state.
        """
        path = self.latest()
        if path is None and ckpt.list_checkpoints(self.root):
            raise CheckpointError(f"no valid checkpoint in {self.root} to resume from (every one is corrupt or "
                                  f"incomplete, as the warnings say); delete {self.root} to train this run again "
                                  "from step 0, or start a new run")
        if path is not None:
            self.load(path, optimizer=optimizer)
        return path

    def load(self, path: Path, *, parts: Collection[str] | None = None, optimizer: OptimizerLoad = "load"
             ) -> dict[str, Any]:
        """Load the model, the optimizer and the ``parts`` of ``states`` (all by default) from a checkpoint.

        ``optimizer``: "load" its state (refused when the checkpoint holds another optimizer's), "fresh" (the
        optimizer as built, without state) or "fit" (loaded if it is this optimizer's, else fresh).

        Returns:
            The checkpoint's saved state, for the parts a caller restores in its own way.
        """
        meta, weights, state = ckpt.load_checkpoint(path)
        # compared as GPTConfig: a checkpoint written before an architecture option existed has its default
        if GPTConfig(**meta["model_config"]) != self.model_config:
            raise CheckpointError(f"checkpoint {path} holds a different model shape than the run's config; resume "
                                  "with the settings the run was started with")
        other = self._other_optimizer(state)
        if other is not None and optimizer == "load":
            raise CheckpointError(f"checkpoint {path} holds the state of another optimizer ({other}) than this "
                                  f"run's ({self.optimizer_name}); resume with the optimizer it was trained with, "
                                  "or pass --resume-fresh-optimizer to continue with a fresh optimizer state")
        with_optimizer = optimizer == "load" or (optimizer == "fit" and other is None)
        if ckpt.is_sharded(meta):  # saved by FSDP: DCP reshards to this run's world size and strategy
            load_sharded(self.model, self.optimizer, path / "dcp", with_optimizer=with_optimizer)
        else:
            self.load_weights(weights, state["optimizer"] if with_optimizer else None)
        if not with_optimizer:  # the optimizer as built: no state, the groups' first settings
            self.optimizer.load_state_dict(copy.deepcopy(self.initial["optimizer"]))
        for name in self.states if parts is None else parts:
            if self.states[name] is not None and state[name] is not None:
                self.states[name].load_state_dict(state[name])
        return state

    def _other_optimizer(self, state: dict[str, Any]) -> str | None:
        """The optimizer whose state a checkpoint holds when it is not this one (None when it is, or cannot be told:
        a sharded checkpoint of an earlier version). Earlier checkpoints name none: told by their param groups."""
        saved = state.get("optimizer_name")
        groups = (state.get("optimizer") or {}).get("param_groups")
        if groups is not None:
            mine = self.initial["optimizer"]["param_groups"]
            if len(groups) != len(mine) or any(len(a["params"]) != len(b["params"]) for a, b in zip(groups, mine)):
                return saved or "another layout of parameter groups"
            if saved is None and any(set(a) != set(b) for a, b in zip(groups, mine)):
                return "one with other settings"
        return saved if saved not in (None, self.optimizer_name) else None

    def load_initial(self, weights: dict[str, Tensor], *, parts: Collection[str]) -> dict[str, Any]:
        """Back to the start of the run: ``weights`` (the initial ones), the optimizer as built (no state, the
        groups' first hyperparameters) and ``parts`` of ``states`` as they were when the checkpointer was made.

        Returns:
            The initial state of every part, as :meth:`load` returns a checkpoint's.
        """
        self.load_weights(weights, None)
        self.optimizer.load_state_dict(copy.deepcopy(self.initial["optimizer"]))  # no state: nothing to shard
        for name in parts:
            self.states[name].load_state_dict(copy.deepcopy(self.initial[name]))
        return copy.deepcopy(self.initial)

    def load_weights(self, weights: dict[str, Tensor], optim_state: dict[str, Any] | None) -> None:
        """Whole weights (as :func:`~lmsprint.training.checkpoint.model_state` saves them) and optionally an
        optimizer state into the model and optimizer, each rank keeping its rows when they are sharded."""
        if self.sharded:
            load_full(self.model, self.optimizer, weights, optim_state)
            return
        device = self.model.lm_head.weight.device
        ckpt.load_model_state(self.model, {k: v.to(device) for k, v in weights.items()})
        if optim_state is not None:
            self.optimizer.load_state_dict(optim_state)


# ----------------------------------------------------------------------------------------------------------
# checkpoints of sharded (FSDP2) runs: torch.distributed.checkpoint


def save_sharded(model: nn.Module, optimizer: torch.optim.Optimizer, path: Path) -> None:
    """Every rank writes its shards of the model and optimizer state (Distributed Checkpoint) under ``path``."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    state: dict[str, Any] = {"model": get_model_state_dict(model)}
    if optimizer.state:  # an empty state would be materialised by a zero-lr optimizer step (DCP's _init_optim_state)
        state["optim"] = get_optimizer_state_dict(model, optimizer)
    try:
        dcp.save(state, checkpoint_id=str(path))
    except (Exception, CheckpointException) as e:  # raised on every rank (DCP gathers the write results)
        raise CheckpointError(f"could not write the sharded checkpoint {path} ({e.__class__.__name__}: {e}); check "
                              "free space and that every node sees the run directory") from None


def load_sharded(model: nn.Module, optimizer: torch.optim.Optimizer, path: Path, *, with_optimizer: bool = True
                 ) -> None:
    """Load a Distributed Checkpoint into this run's layout, whatever the world size and strategy that saved it
    (DCP reshards: FSDP2 shards of any size, or whole tensors for one process / DDP). A checkpoint saved with an
    empty optimizer state (see :func:`save_sharded`) leaves it empty, as does ``with_optimizer=False``. Nothing
    in it is unpickled but DCP's metadata classes and plain values (:mod:`lmsprint.training.safe_dcp`)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException
    from torch.distributed.checkpoint.state_dict import (
        get_model_state_dict,
        get_optimizer_state_dict,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    from lmsprint.training.safe_dcp import SafeLoadPlanner, SafeReader, read_metadata

    unreadable = f"checkpoint {path} cannot be read ({{}}); delete it to fall back to an earlier one"
    try:
        keys = read_metadata(path).state_dict_metadata
    except Exception as e:
        raise CheckpointError(unreadable.format(e.__class__.__name__)) from None
    state: dict[str, Any] = {"model": get_model_state_dict(model)}
    if with_optimizer and any(k.startswith("optim.") for k in keys):
        state["optim"] = get_optimizer_state_dict(model, optimizer)  # also materialises the state to load into
    try:
        with warnings.catch_warnings():  # one process: DCP warns that it assumes so, which is right
            warnings.filterwarnings("ignore", message="torch.distributed is .*single process")
            dcp.load(state, storage_reader=SafeReader(str(path)), planner=SafeLoadPlanner(),
                     no_dist=D.world_size() == 1)
    except (Exception, CheckpointException) as e:  # DCP's CheckpointException is a BaseException
        raise CheckpointError(unreadable.format(e.__class__.__name__)) from None
    set_model_state_dict(model, state["model"])
    if "optim" in state:
        set_optimizer_state_dict(model, optimizer, state["optim"])
    else:
        optimizer.state.clear()


def full_model_state(model: nn.Module) -> dict[str, Tensor]:
    """The whole model state on rank 0's CPU (an empty dict on the other ranks); every rank must call it."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def _materialize_optimizer_state(optimizer: torch.optim.Optimizer) -> None:
    """Create the lazily built optimizer state with one step on zero gradients at lr 0 (as DCP's state_dict does)."""
    if optimizer.state:
        return
    params = [p for g in optimizer.param_groups for p in g["params"] if p.requires_grad]
    for p in params:
        p.grad = torch.zeros_like(p)
    lrs = [g["lr"] for g in optimizer.param_groups]
    for g in optimizer.param_groups:
        g["lr"] = 0.0
    optimizer.step()
    for g, lr in zip(optimizer.param_groups, lrs):
        g["lr"] = lr
    optimizer.zero_grad(set_to_none=True)


def load_full(model: nn.Module, optimizer: torch.optim.Optimizer | None, weights: dict[str, Tensor],
              optim_state: dict[str, Any] | None) -> None:
    """Load whole tensors (a one-copy checkpoint, present on every rank) into a sharded model and its optimizer.

    ``weights`` may leave out tied parameters; ``optim_state`` is ``optimizer.state_dict()`` of an optimizer built
    the same way on the unsharded model. Each rank keeps its rows; state that this rank's optimizer keeps whole
    (SOAP's) stays whole.
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
    from torch.distributed.tensor import distribute_tensor

    set_model_state_dict(model, weights, options=StateDictOptions(full_state_dict=True, strict=False))
    if optimizer is None or optim_state is None:
        return
    _materialize_optimizer_state(optimizer)
    saved_ids = [pid for g in optim_state["param_groups"] for pid in g["params"]]
    params = [p for g in optimizer.param_groups for p in g["params"]]
    state: dict[Any, Any] = {}
    for pid, p in zip(saved_ids, params):
        if pid not in optim_state["state"]:
            continue
        entry = dict(optim_state["state"][pid])
        for key, value in entry.items():
            template = optimizer.state[p].get(key)
            if isinstance(value, Tensor) and D.is_dtensor(template):
                value = value.to(template.device, template.dtype)
                try:  # every rank holds the whole value: no communication needed
                    entry[key] = distribute_tensor(value, template.device_mesh, template.placements,
                                                   src_data_rank=None)
                except TypeError:  # torch < 2.6
                    entry[key] = distribute_tensor(value, template.device_mesh, template.placements)
        state[pid] = entry
    optimizer.load_state_dict({"state": state, "param_groups": optim_state["param_groups"]})
