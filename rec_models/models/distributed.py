"""Training beyond one process: building the Lightning ``Trainer`` from a config's
``accelerator`` / ``devices`` / ``strategy`` / ``num_nodes``, sharding the training windows
over the ranks, and handing the results of a spawned rank 0 back to the calling process.

``train_sasrec`` is a library call (a Dagster asset, ``recsys evaluate``, a test), so the
processes are started in one of two ways:

* ``strategy="ddp_spawn"`` (and ``"auto"`` with several devices): Lightning spawns one fresh
  process per device, pickling the trainer, module and data into them, and ``fit`` returns in
  the caller once they have all finished. Nothing about the caller's command line matters.
  Lightning only sends the last weights back; ``HandoffCallback`` sends the rest (best
  weights, per-epoch history) from rank 0 through a file.
* an external launcher (``torchrun``, SLURM): every process runs the caller's script, so
  ``"ddp"`` works and every rank returns the same result.

Lightning's plain ``"ddp"`` without an external launcher starts the other ranks by re-running
``sys.argv`` (the pytest or Dagster command line), which cannot work from a library call:
``build_trainer`` refuses it with a clear error.

With N processes each trains on 1/N of the windows, ``batch_size // N`` per step (so the
optimisation does not depend on N), and every one validates on every user (validation is not
parallelised; rank 0's numbers are broadcast, so all ranks stop at the same epoch). The
callers' ``callbacks`` and ``logger`` run on every rank, in the spawned processes: whatever
writes must check ``trainer.is_global_zero`` and not rely on the caller's process state (an
MLflow callback must log to an explicit run id, not to ``mlflow.active_run()``).
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterator
from contextlib import contextmanager

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.strategies.launchers import _SubprocessScriptLauncher
from torch.utils.data import Dataset, DistributedSampler

SPAWN_STRATEGY = "ddp_spawn"


def _relaunches_script(trainer: L.Trainer) -> bool:
    """Whether ``fit`` would start this machine's other ranks by re-running ``sys.argv``."""
    launcher = trainer.strategy.launcher
    return (
        isinstance(launcher, _SubprocessScriptLauncher)
        and not launcher.cluster_environment.creates_processes_externally
        and launcher.num_processes > 1
    )


def build_trainer(config, **kwargs) -> L.Trainer:
    """``L.Trainer`` with the config's ``accelerator``, ``devices``, ``strategy`` and
    ``num_nodes`` (``config``: a ``SASRecConfig``) plus ``kwargs``.

    The training windows are sharded by ``SequenceDataModule`` itself (every rank validates on
    every user), so Lightning's automatic ``DistributedSampler`` is off. ``"auto"`` with
    several devices means ``"ddp_spawn"``; ``"ddp"`` is only accepted where an external
    launcher (``torchrun``, SLURM) already started the processes.
    """
    settings = dict(accelerator=config.accelerator, devices=config.devices, strategy=config.strategy,
                    num_nodes=config.num_nodes, use_distributed_sampler=False)
    trainer = L.Trainer(**settings, **kwargs)
    if _relaunches_script(trainer):
        if config.strategy != "auto":
            raise ValueError(
                f"strategy={config.strategy!r} with {config.devices!r} devices would start the other processes by "
                "re-running this command (sys.argv), which does not work inside a library call (Dagster, pytest, "
                f"a notebook). Use strategy={SPAWN_STRATEGY!r}, or launch the script with `torchrun "
                "--nproc-per-node N` (then 'ddp' works)."
            )
        trainer = L.Trainer(**{**settings, "strategy": SPAWN_STRATEGY}, **kwargs)
    return trainer


def train_sampler(dataset: Dataset, trainer: L.Trainer | None, seed: int) -> DistributedSampler | None:
    """This rank's shuffled shard of ``dataset`` when training on several processes, else None.

    Lightning calls ``set_epoch`` on it every epoch, so each epoch is a new shuffle."""
    if trainer is None or trainer.world_size <= 1:
        return None
    return DistributedSampler(dataset, num_replicas=trainer.world_size, rank=trainer.global_rank,
                              shuffle=True, seed=seed)


def from_rank_zero(trainer: L.Trainer | None, value):
    """``value`` as computed on rank 0, on every rank (itself with one process)."""
    if trainer is None or trainer.world_size <= 1:
        return value
    return trainer.strategy.broadcast(value, src=0)


def per_rank(trainer: L.Trainer, count: int) -> list[int]:
    """``count`` of every rank, in rank order (a collective: call it on every rank)."""
    if trainer.world_size <= 1 or not torch.distributed.is_initialized():
        return [int(count)]
    counts: list = [None] * trainer.world_size
    torch.distributed.all_gather_object(counts, int(count))
    return counts


class HandoffCallback(Callback):
    """A callback whose results reach the process that called ``fit``.

    ``fit_results`` runs on every rank at the end of ``fit`` (it may use collectives) and its
    dict becomes attributes of the callback. Where rank 0 is a spawned process, it also saves
    the dict to ``handoff_path``; ``recover`` loads it into the caller's copy. Values must be
    what ``torch.load(weights_only=True)`` reads: tensors, numbers, strings, lists, dicts.
    """

    def __init__(self) -> None:
        self._caller_pid = os.getpid()
        self.handoff_path: str | None = None

    def fit_results(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict:
        raise NotImplementedError

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        results = self.fit_results(trainer, pl_module)
        vars(self).update(results)
        if trainer.is_global_zero and os.getpid() != self._caller_pid and self.handoff_path:
            torch.save(results, self.handoff_path)

    def recover(self) -> bool:
        """In the caller: take over what a spawned rank 0 saved (False if nothing was)."""
        if not self.handoff_path or not os.path.exists(self.handoff_path):
            return False
        vars(self).update(torch.load(self.handoff_path, map_location="cpu", weights_only=True))
        return True


def quiet_warnings() -> None:
    """Ignore Lightning's warnings that do not apply here (batches built whole, short epochs)."""
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")
    warnings.filterwarnings("ignore", message=".*smaller than the logging interval.*")
    # streamed windows: each loader worker reads its own row groups, ``len`` counts them exactly
    warnings.filterwarnings("ignore", message=".*`IterableDataset` has `__len__` defined.*")
    # validation metrics are rank 0's on every rank (``from_rank_zero``): nothing to reduce
    warnings.filterwarnings("ignore", message=r".*sync_dist=True\)` when logging on epoch level.*")


@contextmanager
def restored_environment(*names: str) -> Iterator[None]:
    """Put back ``names`` in ``os.environ`` afterwards (the spawn launcher sets ``MASTER_PORT``
    in the caller; the next training must pick a fresh free port)."""
    saved = {name: os.environ.get(name) for name in names}
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
