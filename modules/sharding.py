"""A TorchRec-aware Lightning strategy: DistributedModelParallel instead of Lightning's DDP.

Lightning's stock DDP around a TorchRec model would densify embedding updates and wrap the model
twice. Here the strategy shards the LightningModule's ``model`` with a plan from
``EmbeddingShardingPlanner`` (topology from the world size and device kind), with embedding tables
trained by a fused in-backward optimizer; DMP itself data-parallelises the dense part. Checkpoints go
through ``torch.distributed.checkpoint``: every rank writes its own shards.

The same strategy serves one process (CPU or one GPU) and many (gloo on CPU, NCCL on GPU).
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from lightning.pytorch.strategies import DDPStrategy
from torch import nn

from core.errors import RecsysError
from core.rendezvous import is_loopback_host, loopback_store
from modules.safe_checkpoint import TRAINER_STATE, dcp_load, load_trainer_state

log = logging.getLogger(__name__)


def sparse_optimizer_class(name: str) -> type[torch.optim.Optimizer]:
    """The optimizer class FBGEMM's fused kernels implement for ``name``."""
    from torchrec.optim import RowWiseAdagrad

    classes: dict[str, type[torch.optim.Optimizer]] = {
        "rowwise_adagrad": RowWiseAdagrad,
        "adagrad": torch.optim.Adagrad,
        "sgd": torch.optim.SGD,
        "adam": torch.optim.Adam,
    }
    return classes[name]


def shard_model(
    model: nn.Module,
    device: torch.device,
    sparse_optimizer: tuple[type[torch.optim.Optimizer], dict[str, Any]],
    local_world_size: int,
    memory_per_worker: int | None = None,
    batch_size: int | None = None,
    sharding: Mapping[str, str] | None = None,
) -> tuple[nn.Module, Any]:
    """Wrap ``model`` (tables on ``meta``) in DistributedModelParallel over the default process group.

    ``memory_per_worker`` (bytes) is each rank's budget for its tables and their optimizer state
    (GPU memory on a GPU, host memory on a CPU): a table larger than one budget is split row- or
    column-wise over ranks, and a model no plan fits is refused with one line. ``sharding`` names the
    sharding type of some tables (table name -> ``data_parallel``, ``row_wise``, ...).
    """
    from torchrec.distributed import DistributedModelParallel
    from torchrec.distributed.planner import EmbeddingShardingPlanner
    from torchrec.distributed.planner.types import PlannerError
    from torchrec.distributed.types import ShardingEnv
    from torchrec.modules.embedding_modules import EmbeddingBagCollection
    from torchrec.optim.apply_optimizer_in_backward import apply_optimizer_in_backward

    cls, kwargs = sparse_optimizer
    for module in model.modules():
        if isinstance(module, EmbeddingBagCollection):
            apply_optimizer_in_backward(cls, module.parameters(), kwargs)
    pg = dist.group.WORLD
    world = dist.get_world_size()
    topology = topology_of(world, device.type, min(local_world_size, world), memory_per_worker)
    sharders = sharders_of(sharding)
    try:
        planner = EmbeddingShardingPlanner(
            topology=topology, batch_size=batch_size, constraints=sharding_constraints(model, sharding)
        )
        plan = planner.collective_plan(model, sharders, pg)
    except PlannerError as e:
        raise RecsysError(no_plan_message(model, world, memory_per_worker, e, sharding)) from None
    dmp = DistributedModelParallel(
        module=model, device=device, plan=plan, sharders=sharders, env=ShardingEnv.from_process_group(pg)
    )
    return dmp, plan


ROW_WISE_TYPES = ("row_wise", "table_row_wise")


def sharders_of(sharding: Mapping[str, str] | None) -> list[Any]:
    """TorchRec's default sharders; with row-wise sharding of EmbeddingBagCollections allowed on CPU
    when ``sharding`` asks for it.

    TorchRec offers row_wise and table_row_wise only on CUDA, but their CPU path (FBGEMM's CPU
    bucketize, gloo's all-to-all and reduce-scatter) trains; it is enabled only on request, so that
    the planner's own choices on CPU stay what they were.
    """
    from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder
    from torchrec.distributed.sharding_plan import get_default_sharders

    defaults = get_default_sharders()
    if not any(kind in ROW_WISE_TYPES for kind in (sharding or {}).values()):
        return defaults

    class CpuRowWiseSharder(EmbeddingBagCollectionSharder):
        def sharding_types(self, compute_device_type: str) -> list[str]:
            types = list(super().sharding_types(compute_device_type))
            if compute_device_type == "cpu":
                types += [t for t in ROW_WISE_TYPES if t not in types]
            return types

    return [CpuRowWiseSharder() if type(s) is EmbeddingBagCollectionSharder else s for s in defaults]


def topology_of(world: int, device_type: str, local_world_size: int, memory_per_worker: int | None) -> Any:
    """The planner's view of the workers: how many, which device kind, and each one's memory budget."""
    from torchrec.distributed.planner import Topology

    caps: dict[str, int] = {}
    if memory_per_worker is not None:
        caps["hbm_cap" if device_type == "cuda" else "ddr_cap"] = memory_per_worker
    return Topology(world_size=world, compute_device=device_type, local_world_size=local_world_size, **caps)


def check_plan(
    model: nn.Module,
    world: int,
    device_type: str,
    memory_per_worker: int | None,
    batch_size: int | None,
    sharding: Mapping[str, str] | None = None,
) -> Any:
    """Plan ``model`` (tables on ``meta``) for ``world`` workers without a process group: run in the
    launching process, so that a model no plan fits is refused before any worker starts."""
    from torchrec.distributed.planner import EmbeddingShardingPlanner
    from torchrec.distributed.planner.types import PlannerError

    topology = topology_of(world, device_type, world, memory_per_worker)
    constraints = sharding_constraints(model, sharding)
    try:
        planner = EmbeddingShardingPlanner(topology=topology, batch_size=batch_size, constraints=constraints)
        return planner.plan(model, sharders_of(sharding))
    except PlannerError as e:
        raise RecsysError(no_plan_message(model, world, memory_per_worker, e, sharding)) from None


def sharding_constraints(model: nn.Module, sharding: Mapping[str, str] | None) -> dict[str, Any] | None:
    """The planner's ``ParameterConstraints`` for tables whose sharding type is chosen (``--cluster.sharding``);
    a table the model does not have is one line naming the tables it has."""
    if not sharding:
        return None
    from torchrec.distributed.planner.types import ParameterConstraints

    tables = table_bytes(model)
    unknown = sorted(set(sharding) - set(tables))
    if unknown:
        raise RecsysError(
            f"--cluster.sharding: no table {', '.join(unknown)} in this model (tables: {', '.join(sorted(tables))})"
        )
    return {name: ParameterConstraints(sharding_types=[kind]) for name, kind in sharding.items()}


def parse_bytes(text: str, flag: str = "--cluster.memory_per_worker") -> int:
    """``512MB``, ``2GiB``, ``1.5G`` or a plain number of bytes."""
    import re

    m = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([kmgt]?)(i?b)?\s*", text.lower())
    if not m:
        raise RecsysError(f"{flag}: {text!r} is not a size (e.g. 512MB, 2GiB)")
    scale = 1024 ** "_kmgt".index(m.group(2) or "_") if m.group(2) else 1
    return int(float(m.group(1)) * scale)


def table_bytes(model: nn.Module) -> dict[str, int]:
    """Bytes of each embedding table's weights (from the configs, so it works on ``meta`` too)."""
    from torchrec.modules.embedding_modules import EmbeddingBagCollection

    out: dict[str, int] = {}
    for module in model.modules():
        if isinstance(module, EmbeddingBagCollection):
            for c in module.embedding_bag_configs():
                out[c.name] = c.num_embeddings * c.embedding_dim * 4
    return out


def no_plan_message(
    model: nn.Module, world: int, budget: int | None, error: Exception, sharding: Mapping[str, str] | None = None
) -> str:
    """Why no sharding plan fits: the largest table against the budget per worker (or the sharding
    types asked for, when there is no budget)."""
    if sharding and budget is None:
        first = (str(error).strip().splitlines() or [type(error).__name__])[0]
        return f"--cluster.sharding: no plan on {world} worker(s) shards the tables as asked ({first[:200]})"
    sizes = table_bytes(model)
    name, size = max(sizes.items(), key=lambda kv: kv[1]) if sizes else ("?", 0)
    limit = f"the budget of {budget / 2**20:.1f} MiB per worker" if budget else "the workers' memory"
    return (
        f"--cluster.memory_per_worker: no sharding plan fits {limit} on {world} worker(s) "
        f"(largest table {name}: {size / 2**20:.1f} MiB of weights, plus optimizer state; "
        f"all tables {sum(sizes.values()) / 2**20:.1f} MiB); add workers or raise the budget"
    )


def plan_rows(plan: Any) -> list[dict[str, Any]]:
    """One row per table of a sharding plan: sharding type, ranks, bytes of weights per rank."""
    rows = []
    for module_plan in plan.plan.values():
        for table, spec in module_plan.items():
            per_rank: dict[int, int] = {}
            shards = getattr(getattr(spec, "sharding_spec", None), "shards", None)
            if shards:
                for shard in shards:
                    rank = shard.placement.rank()
                    per_rank[rank] = per_rank.get(rank, 0) + math.prod(shard.shard_sizes) * 4
            rows.append(
                {
                    "table": table,
                    "sharding": str(spec.sharding_type),
                    "ranks": sorted(spec.ranks or []),
                    "bytes": per_rank,
                }
            )
    return rows


def format_plan(rows: list[dict[str, Any]]) -> str:
    """The sharding plan as a text table (data-parallel tables are replicated whole on every rank)."""
    lines = [f"{'table':<28} {'sharding':<14} {'ranks':<12} bytes per rank"]
    for r in rows:
        ranks = ",".join(map(str, r["ranks"])) or "all"
        per = ", ".join(f"{k}: {v:,}" for k, v in sorted(r["bytes"].items())) or "replicated"
        lines.append(f"{r['table']:<28} {r['sharding']:<14} {ranks:<12} {per}")
    return "\n".join(lines)


def table_placement(plan: Any) -> dict[str, list[int]]:
    """table name -> ranks holding a shard of it (from a ShardingPlan)."""
    out: dict[str, list[int]] = {}
    for module_plan in plan.plan.values():
        for table, spec in module_plan.items():
            ranks = set()
            if spec.ranks:
                ranks.update(spec.ranks)
            out[table] = sorted(ranks)
    return out


def table_of(key: str) -> str:
    """The table an optimizer-state key of a checkpoint belongs to (``...embedding_bags.t_C1.weight.x``)."""
    parts = key.split(".")
    return parts[parts.index("embedding_bags") + 1] if "embedding_bags" in parts[:-1] else key


def read_trainer_state(checkpoint: str | Path) -> dict[str, Any]:
    """The non-tensor part of a checkpoint directory (epoch, loops, callbacks, MLflow run id), loaded as
    plain data only: a checkpoint from elsewhere must never run code (see ``modules.safe_checkpoint``)."""
    return load_trainer_state(checkpoint)


class TorchRecMixin:
    """Turns a DDP strategy (Lightning's, or a backend's subclass of it such as Ray's) into one whose
    model wrapping is TorchRec's DistributedModelParallel.

    The LightningModule must expose ``model`` (a plain TorchRec module, tables on ``meta``) and
    ``sparse_optimizer()`` -> (optimizer class, kwargs) for the fused embedding update.
    """

    plan: Any = None
    memory_per_worker: int | None = None
    batch_size: int | None = None
    """Rows per batch per process: the planner sizes each table's input and output buffers from it."""
    sharding: Mapping[str, str] | None = None
    """Sharding type of named tables (``--cluster.sharding``)."""
    lightning_module: Any
    root_device: torch.device
    num_processes: int
    is_global_zero: bool
    optimizers: Any
    _timeout: Any
    set_world_ranks: Any
    _get_process_group_backend: Any

    def setup_distributed(self) -> None:
        """Lightning's, with the process group's rendezvous store on loopback when the main address is
        (``--backend local``, Spark on one host): torch's own ``env://`` rendezvous makes rank 0's
        TCPStore listen on every interface whatever MASTER_ADDR says, so rank 0 binds the socket itself
        and hands it over. A group someone else made (Ray Train's), or a store torchrun's agent serves
        (Spark's TorchDistributor), is left alone."""
        env: Any = getattr(self, "cluster_environment", None)
        under_torchrun = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"  # its agent holds the store
        if env is not None and not dist.is_initialized() and not under_torchrun and is_loopback_host(env.main_address):
            self.set_world_ranks()
            backend = self._get_process_group_backend()
            rank, world = env.global_rank(), env.world_size()
            store = loopback_store(env.main_address, env.main_port, world, rank == 0, self._timeout)
            device = self.root_device if self.root_device.type != "cpu" else None
            dist.init_process_group(
                backend, store=store, rank=rank, world_size=world, timeout=self._timeout, device_id=device
            )
        super().setup_distributed()  # type: ignore[misc]  # Lightning skips its own init when a group exists

    def model_to_device(self) -> None:
        lm: Any = self.lightning_module
        from torchrec.distributed import DistributedModelParallel

        if not isinstance(lm.model, DistributedModelParallel):
            lm.model, self.plan = shard_model(
                lm.model,
                self.root_device,
                lm.sparse_optimizer(),
                self.num_processes or 1,
                self.memory_per_worker,
                self.batch_size,
                self.sharding,
            )
        for name, child in lm.named_children():
            if name != "model":
                child.to(self.root_device)
        # Outside fitting, Lightning's DDPStrategy.setup broadcasts every parameter and buffer of the
        # LightningModule from rank 0 (``_sync_module_states``). The sharded tables differ per rank,
        # so that would overwrite (or, with different shapes, break) them; DMP already synced the
        # dense part when it was built. Exclude everything owned by the DMP model, found by identity
        # so that the check does not depend on how DMP names its sharded modules.
        owned = {id(t) for t in lm.model.parameters()} | {id(t) for t in lm.model.buffers()}
        named = [*lm.named_parameters(), *lm.named_buffers()]
        lm._ddp_params_and_buffers_to_ignore = [n for n, t in named if id(t) in owned or n.startswith("model.")]

    def teardown(self) -> None:
        lm: Any = self.lightning_module
        if lm is not None and any(p.is_meta for p in lm.parameters()):
            lm.model = nn.Module()  # never sharded (setup failed): nothing to move off the meta device
        super().teardown()  # type: ignore[misc]

    def _setup_model(self, model: nn.Module) -> Any:
        return model  # DMP already data-parallelises the dense part; no second DDP wrapper

    @property
    def restore_checkpoint_after_setup(self) -> bool:
        return True  # the sharded model and the optimizers must exist before a checkpoint loads

    def batch_to_device(self, batch: Any, device: torch.device | None = None, dataloader_idx: int = 0) -> Any:
        return batch.to(device or self.root_device, non_blocking=True)

    # -- checkpoints: each rank writes and reads its own shards ------------------------------------

    def save_checkpoint(self, checkpoint: dict[str, Any], filepath: Any, storage_options: Any = None) -> None:
        path = Path(filepath)
        lm: Any = self.lightning_module
        state = {
            "model": checkpoint.pop("state_dict"),
            "optimizers": checkpoint.pop("optimizer_states", []),
            "fused": lm.model.fused_optimizer.state_dict(),
        }
        dcp.save(state, checkpoint_id=str(path))
        if self.is_global_zero:
            torch.save(checkpoint, path / TRAINER_STATE)

    def load_checkpoint(self, checkpoint_path: Any, weights_only: bool | None = None) -> dict[str, Any]:
        path = Path(checkpoint_path)
        checkpoint = read_trainer_state(path)
        lm: Any = self.lightning_module
        optimizers = list(self.optimizers)
        for opt in optimizers:
            if hasattr(opt, "init_state"):
                opt.init_state()  # optimizer state is lazy: create it so the loader has targets
        state: dict[str, Any] = {"model": lm.state_dict(), "fused": lm.model.fused_optimizer.state_dict()}
        if optimizers:  # fitting resumes them; testing or evaluating loads the weights only
            state["optimizers"] = [opt.state_dict() for opt in optimizers]
        # .metadata and byte items through allow-lists, unlike dcp.load. Weights load under any plan
        # and world size (DCP reads each saved chunk's overlap with each local shard); optimizer state
        # may be absent: a data-parallel table's state is the dense optimizer's and a sharded table's the
        # fused optimizer's, so a table that is one in the checkpoint and the other here starts afresh
        fresh = dcp_load(state, path, optional=("optimizers.", "fused."))
        if optimizers and dist.is_initialized() and dist.get_world_size() > 1:
            everyone: list[Any] = [None] * dist.get_world_size()
            dist.all_gather_object(everyone, fresh)  # each rank knows only the tables it holds
            fresh = [key for keys in everyone for key in keys]
        if fresh and optimizers and self.is_global_zero:
            tables = sorted({table_of(key) for key in fresh})
            log.warning(
                "%s: no optimizer state for %s in it, which starts afresh (a data-parallel table's state "
                "is the dense optimizer's, a sharded one's the fused optimizer's)",
                path.name,
                ", ".join(tables),
            )
        lm.model.fused_optimizer.load_state_dict(state["fused"])
        checkpoint["state_dict"] = state["model"]
        checkpoint["optimizer_states"] = state.get("optimizers", [])
        return checkpoint

    def load_model_state_dict(self, checkpoint: Any, strict: bool = True) -> None:
        """Nothing to do: ``load_checkpoint`` already loaded the weights in place, shard by shard."""

    def remove_checkpoint(self, filepath: Any) -> None:
        if self.is_global_zero:
            import shutil

            shutil.rmtree(filepath, ignore_errors=True)


class TorchRecStrategy(TorchRecMixin, DDPStrategy):
    """Lightning's DDPStrategy with DistributedModelParallel in place of DDP."""

    strategy_name = "torchrec"


def make_strategy(
    base: type | None = None,
    memory_per_worker: int | None = None,
    batch_size: int | None = None,
    sharding: Mapping[str, str] | None = None,
    **kwargs: Any,
) -> Any:
    """The TorchRec strategy on ``base`` (a DDPStrategy subclass; default Lightning's own)."""
    if base is None or base is DDPStrategy:
        strategy: Any = TorchRecStrategy(**kwargs)
    else:
        strategy = type(f"TorchRec{base.__name__}", (TorchRecMixin, base), {})(**kwargs)
    strategy.memory_per_worker = memory_per_worker
    strategy.batch_size = batch_size
    strategy.sharding = dict(sharding) if sharding else None
    return strategy


def gather_full_state(dmp: nn.Module) -> dict[str, torch.Tensor] | None:
    """The unsharded state dict of a DMP model on rank 0 (None elsewhere); a collective call."""
    from torch.distributed._shard.sharded_tensor import ShardedTensor

    full: dict[str, torch.Tensor] = {}
    rank = dist.get_rank()
    for key, value in dmp.state_dict().items():
        if isinstance(value, ShardedTensor):
            out = torch.empty(value.size(), dtype=value.dtype) if rank == 0 else None
            value.gather(dst=0, out=out)
            if out is not None:
                full[key] = out
        elif hasattr(value, "full_tensor"):  # DTensor
            full[key] = value.full_tensor().cpu()
        else:
            full[key] = value.detach().cpu()
    return full if rank == 0 else None
