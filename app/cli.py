"""The ``recsys`` command line: parses flags into typed configs and calls library functions.

    recsys data prepare --dataset synthetic-ctr --out data/ctr --rows 100000
    recsys data download movielens-100k
    recsys data summary data/ctr
    recsys data candidates --retrieval RUN --data data/ml --out data/ml-candidates
    recsys index --run-id RUN [--index hnsw32]
    recsys recommend --retrieval RUN [--ranking RUN] --user 196
    recsys recommend --retrieval RUN [--ranking RUN] --all-users --out DIR --backend ray --num-workers 2

Flags may be written with dashes or underscores (``--val-frac`` or ``--val_frac``). Every user-facing
problem ends as one line on stderr and exit status 2; a command stopped by SIGINT, SIGTERM or SIGHUP
exits with 128 + the signal's number and one line (``core.signals``). ``--verbose`` (anywhere) shows
the libraries' warnings and info lines.
"""

from __future__ import annotations

import dataclasses
import os
import re
import sys
from collections.abc import Sequence
from typing import Any, TypeVar

from app.candidate_data import CandidatesConfig
from app.config import RunConfig, TrackingConfig, TrainerConfig
from cluster.config import ClusterConfig
from core.errors import RecsysError, printable, require
from core.logs import setup_logging
from core.signals import Interrupted, interruption, stop_signals
from datamodules.config import DataConfig, PrepareConfig
from modules.config import ModelConfig, OptimConfig

T = TypeVar("T")


# Short flags of `recsys train` for the most used dotted options.
TRAIN_ALIASES = {
    "--data": "--data.path",
    "--batch_size": "--data.batch_size",
    "--max_epochs": "--trainer.max_epochs",
    "--max_steps": "--trainer.max_steps",
    "--seed": "--trainer.seed",
    "--backend": "--cluster.backend",
    "--num_workers": "--cluster.num_workers",
    "--accelerator": "--cluster.accelerator",
    "--ray_address": "--cluster.ray_address",
    "--spark_master": "--cluster.spark_master",
    "--tracking_uri": "--tracking.tracking_uri",
    "--experiment": "--tracking.experiment",
    "--run_name": "--tracking.run_name",
    "--resume_from": "--trainer.resume_from",
}
RUN_SECTIONS = (DataConfig, ModelConfig, OptimConfig, TrainerConfig, TrackingConfig, ClusterConfig)
# Short flags of `recsys evaluate` for where it runs.
EVALUATE_ALIASES = {k: v for k, v in TRAIN_ALIASES.items() if v.startswith("--cluster.")}

BOOL_WORDS = {"true", "false", "yes", "no", "1", "0"}
VERBOSE_FLAGS = ("--verbose", "-v")


def bool_flags(*classes: type) -> set[str]:
    """``--name`` of every bool field of the config dataclasses (nested ones dotted)."""
    flags: set[str] = set()
    for cls in classes:
        for f in dataclasses.fields(cls):  # type: ignore[arg-type]
            if f.type in (bool, "bool"):
                flags.add(f"--{f.name}")
    return flags


def normalize_flags(argv: Sequence[str], switches: set[str] = frozenset()) -> list[str]:  # type: ignore[assignment]
    """``--val-frac=0.1`` -> ``--val_frac=0.1`` (jsonargparse names follow the dataclass fields), and a
    bare boolean switch (``--overwrite``) -> ``--overwrite=true``."""
    out: list[str] = []
    for i, arg in enumerate(argv):
        if arg.startswith("--") and len(arg) > 2:
            name, eq, value = arg[2:].partition("=")
            arg = "--" + name.replace("-", "_") + eq + value
            nxt = argv[i + 1] if i + 1 < len(argv) else None
            if not eq and "--" + arg[2:].split(".")[-1] in switches and (nxt is None or nxt.lower() not in BOOL_WORDS):
                arg += "=true"
        out.append(arg)
    return out


def expand_aliases(argv: list[str], aliases: dict[str, str]) -> list[str]:
    """Short flags -> dotted ones; ``--config FILE`` first, so that flags after it override it."""
    out: list[str] = []
    config: list[str] = []
    i = 0
    while i < len(argv):
        name, eq, value = argv[i].partition("=")
        if name == "--config":
            config += [name, value] if eq else argv[i : i + 2]
            i += 1 if eq else 2
            continue
        out.append(aliases.get(name, name) + eq + value)
        i += 1
    return config + out


def split_tags(argv: list[str]) -> tuple[list[str], list[str]]:
    """``--tag KEY=VALUE`` (repeatable; also ``--tag=KEY=VALUE``) taken out of ``argv``: (the rest, the
    values)."""
    rest: list[str] = []
    tags: list[str] = []
    i = 0
    while i < len(argv):
        name, eq, value = argv[i].partition("=")
        if name != "--tag":
            rest.append(argv[i])
            i += 1
        elif eq:
            tags.append(value)
            i += 1
        elif i + 1 < len(argv):
            tags.append(argv[i + 1])
            i += 2
        else:
            raise RecsysError("--tag: expected KEY=VALUE (e.g. --tag team=search)")
    return rest, tags


def preset_of(argv: list[str]) -> str | None:
    """The first ``--config FILE`` of ``argv`` (the preset a run starts from)."""
    for i, arg in enumerate(argv):
        name, eq, value = arg.partition("=")
        if name == "--config":
            return value if eq else (argv[i + 1] if i + 1 < len(argv) else None)
    return None


def with_preset_and_tags(cfg: RunConfig, preset: str | None, tags: list[str]) -> RunConfig:
    """The run's tracking section with the preset it started from (its file name a tag, its leading
    comment the run's description unless --tracking.description says otherwise) and the ``--tag``s."""
    from app.tracking import parse_tags, preset_description

    tracking = cfg.tracking
    if preset:
        description = tracking.description or preset_description(preset)
        tracking = dataclasses.replace(tracking, preset=preset, description=description)
    if tags:
        tracking = dataclasses.replace(tracking, tags={**tracking.tags, **parse_tags(tags)})
    return dataclasses.replace(cfg, tracking=tracking)


def add_run_arguments(parser: Any) -> None:
    from jsonargparse import ActionConfigFile

    parser.add_argument("--config", action=ActionConfigFile, help="YAML preset (configs/*.yaml); flags override it")
    parser.add_class_arguments(RunConfig, as_group=False)


def build_parser() -> Any:
    """The full parser tree (subcommands built level by level, as jsonargparse requires)."""
    from jsonargparse import ArgumentParser

    root = ArgumentParser(prog="recsys", description="Deep recommendation models at scale.", exit_on_error=False)
    commands = root.add_subcommands(dest="command")
    data = ArgumentParser(description="Prepare and inspect datasets.", exit_on_error=False)
    commands.add_subcommand("data", data, help="prepare and inspect datasets")
    data_commands = data.add_subcommands(dest="action")

    prepare = ArgumentParser(description="Turn a source into MDS shards + metadata.json.", exit_on_error=False)
    prepare.add_class_arguments(PrepareConfig, as_group=False)
    data_commands.add_subcommand("prepare", prepare, help="raw source -> prepared dataset directory")

    download = ArgumentParser(description="Fetch a public dataset into the local cache.", exit_on_error=False)
    download.add_argument("name", type=str, help="movielens-100k or sets2019")
    download.add_argument("--dest", type=str, default=None, help="target directory")
    data_commands.add_subcommand("download", download, help="fetch a public dataset")

    candidates = ArgumentParser(
        description="A ranking dataset from a retrieval run's candidates, labelled by its dataset's val split.",
        exit_on_error=False,
    )
    candidates.add_class_arguments(CandidatesConfig, as_group=False)
    candidates.add_class_arguments(ClusterConfig, "cluster", as_group=False)  # where the users' blocks run
    data_commands.add_subcommand("candidates", candidates, help="retrieval run + dataset -> the ranker's dataset")

    summary = ArgumentParser(description="Print the summary of a prepared dataset.", exit_on_error=False)
    summary.add_argument("path", type=str)
    data_commands.add_subcommand("summary", summary, help="print a prepared dataset's summary")

    train = ArgumentParser(description="Train a model (two-tower, dlrm, dcn, deepfm).", exit_on_error=False)
    add_run_arguments(train)
    commands.add_subcommand("train", train, help="train a model and track it in MLflow")

    evaluate = ArgumentParser(description="Score a finished run or a checkpoint.", exit_on_error=False)
    evaluate.add_argument("--run_id", type=str, default=None, help="MLflow run to evaluate")
    evaluate.add_argument("--checkpoint", type=str, default=None, help="checkpoint directory")
    evaluate.add_argument("--config_file", type=str, default=None, help="the run's config.yaml")
    evaluate.add_argument("--split", type=str, default="test", help="val or test")
    evaluate.add_argument("--tracking_uri", type=str, default=None)
    evaluate.add_argument("--data", type=str, default=None, help="evaluate on another prepared copy")
    # where it runs: its own choice (default one local process), not the training's; any world size
    # and sharding plan loads the checkpoint
    evaluate.add_class_arguments(ClusterConfig, "cluster", as_group=False)
    commands.add_subcommand("evaluate", evaluate, help="score a run or checkpoint on a split")

    index = ArgumentParser(
        description="Index a two-tower run's item vectors (FAISS) and log the index to it.", exit_on_error=False
    )
    index.add_argument("--run_id", type=str, help="MLflow run of a two-tower model")
    index.add_argument("--index", type=str, default="flat", help="index spec: flat, hnsw32, ivf,pq16x4fs,rflat, ...")
    index.add_argument("--out", type=str, default=None, help="also write the index into this new directory")
    index.add_argument("--overwrite", type=bool, default=False, help="--out may replace an index directory")
    index.add_argument("--tracking_uri", type=str, default=None)
    add_store_arguments(index, publish=True)
    index.add_argument("--add_items", type=str, default=None, help="--store: CSV of new items (item + side features)")
    index.add_argument("--remove_items", type=str, default=None, help="--store: item ids to delete, comma-separated")
    commands.add_subcommand("index", index, help="build a run's item index (FAISS) and log it, or publish it (--store)")

    recommend = ArgumentParser(
        description="Recommend items: retrieval run -> index candidates -> rerank with a ranking run -> top K.",
        exit_on_error=False,
    )
    recommend.add_argument("--retrieval", type=str, help="MLflow run of the two-tower (retrieval) model")
    recommend.add_argument("--ranking", type=str, default=None, help="MLflow run of a ranking model")
    recommend.add_argument("--user", type=str, nargs="+", default=None, help="raw user id(s)")
    recommend.add_argument("--users", type=str, default=None, help="file of raw user ids (.txt/.csv/.parquet)")
    recommend.add_argument("--history", type=str, default=None, help="raw item ids, comma-separated")
    recommend.add_argument("--k", type=int, default=10, help="recommendations per user")
    recommend.add_argument("--candidates", type=int, default=200, help="candidates retrieved for the ranking stage")
    recommend.add_argument("--out", type=str, default=None, help="write a new Parquet file instead of printing")
    recommend.add_argument(
        "--overwrite", type=bool, default=False, help="--out may replace a Parquet file (--all-users: DIR's settings)"
    )
    recommend.add_argument("--index", type=str, default=None, help="a saved index directory (default: the run's)")
    recommend.add_argument("--tracking_uri", type=str, default=None)
    add_store_arguments(recommend)
    recommend.add_argument(
        "--filter", type=str, default=None, help="only items this Milvus expression accepts, e.g. 'item_year >= 1995'"
    )
    recommend.add_argument(
        "--all_users", type=bool, default=False, help="every user of the vocabulary -> partitioned Parquet in --out DIR"
    )
    recommend.add_argument("--partitions", type=int | None, default=None, help="--all-users: output partitions")
    recommend.add_class_arguments(ClusterConfig, "cluster", as_group=False)  # --all-users: where it runs
    commands.add_subcommand("recommend", recommend, help="top-K raw item ids for users or an item history")

    package = ArgumentParser(
        description="Log the recommender (both models, index, tables) as an MLflow pyfunc; --register names it.",
        exit_on_error=False,
    )
    package.add_argument("--retrieval", type=str, help="MLflow run of the two-tower (retrieval) model")
    package.add_argument("--ranking", type=str, default=None, help="MLflow run of a ranking model")
    package.add_argument("--index", type=str, default=None, help="a saved index directory (default: the run's)")
    package.add_argument("--register", type=str, default=None, help="register it under this model name")
    package.add_argument("--tracking_uri", type=str, default=None)
    add_store_arguments(package)
    commands.add_subcommand("package", package, help="package a recommender for mlflow models serve")

    submit = ArgumentParser(
        description="Run a recsys command as a Ray job on a running cluster: recsys submit [options] -- train ...",
        exit_on_error=False,
    )
    submit.add_argument("--address", type=str, default=None, help="Ray dashboard URL (default $RAY_ADDRESS)")
    submit.add_argument("--working_dir", type=str | None, default=".", help="directory uploaded with the job")
    submit.add_argument("--no_wait", type=bool, default=False, help="submit and return without following the logs")
    commands.add_subcommand("submit", submit, help="run a command as a Ray job (streams its logs)")
    return root


def add_store_arguments(parser: Any, publish: bool = False) -> None:
    """``--store URI [--alias NAME]`` (and ``--keep N`` where a command publishes)."""
    from modules.vector_store import DEFAULT_ALIAS, DEFAULT_KEEP

    what = "publish the item vectors to" if publish else "retrieve from"
    parser.add_argument(
        "--store",
        type=str,
        default=None,
        help=f"{what} a vector database: PATH.db (Milvus Lite) or http(s)://HOST:PORT",
    )
    parser.add_argument("--alias", type=str, default=DEFAULT_ALIAS, help="--store: the collection alias")
    if publish:
        parser.add_argument("--keep", type=int, default=DEFAULT_KEEP, help="--store: collections kept (roll-back)")


def store_config(ns: Any) -> Any:
    """The ``StoreConfig`` of ``--store``/``--alias``/``--keep`` (None without ``--store``), its token from
    ``RECSYS_MILVUS_TOKEN``; checked here, before any work."""
    from app.bundle import TOKEN_ENV
    from modules.vector_store import DEFAULT_ALIAS, DEFAULT_KEEP, StoreConfig

    keep = getattr(ns, "keep", DEFAULT_KEEP)
    if ns.store is None:
        require(ns.alias == DEFAULT_ALIAS and keep == DEFAULT_KEEP, "--alias and --keep go with --store URI")
        return None
    require(ns.store.strip() != "", "--store: empty (PATH.db for Milvus Lite, or http(s)://HOST:PORT)")
    return StoreConfig(ns.store, ns.alias, keep, token=os.environ.get(TOKEN_ENV, "")).check()


def to_config(cls: type[T], ns: Any) -> T:
    """Build the frozen dataclass ``cls`` from a parsed namespace (sub-dataclasses already built)."""
    values = {f.name: getattr(ns, f.name) for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    return cls(**values)


def load_run_config(path: str | Any, overrides: Sequence[str] = ()) -> RunConfig:
    """A RunConfig from a YAML file (a preset or a run's config.yaml) plus flag overrides."""
    import argparse

    from jsonargparse import ArgumentParser

    parser = ArgumentParser(exit_on_error=False)
    add_run_arguments(parser)
    argv = expand_aliases(
        normalize_flags(["--config", str(path), *overrides], bool_flags(*RUN_SECTIONS)), TRAIN_ALIASES
    )
    try:
        ns = parser.instantiate(parser.parse_args(argv))
    except argparse.ArgumentError as e:
        text = argument_problem(str(e), ["--config", str(path)])
        raise RecsysError(text if text.startswith("--config") else f"{path}: {text}") from None
    return to_config(RunConfig, ns)


def show(text: object) -> None:
    """Print a command's result (its ids come from user data: control characters escaped)."""
    print(printable(str(text)))


def argument_problem(message: str, args: Sequence[str]) -> str:
    """argparse's and jsonargparse's message as one line that says what to do: a YAML error names the
    ``--config`` file instead of ``<unicode string>``; a value starting with a dash (read as a flag) says
    to write ``--flag=VALUE``."""
    text = " ".join(message.split())
    preset = preset_of(list(args))
    if preset and "Problems parsing config" in text:
        text = text.replace("Problems parsing config: ", "").replace('"<unicode string>"', preset)
        return f"--config {preset}: not a valid YAML preset: {text}"
    flag = re.match(r"argument (--[\w.]+): expected one argument", text)
    if flag:
        name = flag.group(1)
        return f"{text} (a value that starts with '-' is read as a flag: write {name}=VALUE, e.g. {name}=-1)"
    return text


def parse_command(argv: Sequence[str]) -> tuple[Any, list[str], list[str], list[str]]:
    """Parse a command line as ``recsys`` does, without running it: (the namespace, the normalized
    arguments, the ``--tag`` values of ``train``, the command after ``submit ... --``). RecsysError
    for a bad command line."""
    import argparse

    parser = build_parser()
    rest: list[str] = []
    if argv[:1] == ["submit"]:  # ``recsys submit [options] -- COMMAND``: COMMAND goes to the job as is
        argv = list(argv)
        if "--" in argv:
            cut = argv.index("--")
            argv, rest = argv[:cut], argv[cut + 1 :]
    # bare boolean switches of the command at hand only (``recommend --history 1,2`` is not ``--arch.history``)
    switches = {
        "train": bool_flags(*RUN_SECTIONS),
        "evaluate": bool_flags(ClusterConfig),
        "data": bool_flags(PrepareConfig, CandidatesConfig, ClusterConfig),
        "submit": {"--no_wait"},
        "index": {"--overwrite"},
        "recommend": {"--all_users", "--overwrite", *bool_flags(ClusterConfig)},
    }.get(argv[0] if argv else "", set())
    args = normalize_flags(argv, switches)
    tags: list[str] = []
    if args[:1] == ["train"]:
        flags, tags = split_tags(args[1:])
        args = ["train", *expand_aliases(flags, TRAIN_ALIASES)]
    elif args[:1] in (["evaluate"], ["recommend"]) or args[:2] == ["data", "candidates"]:
        head = 2 if args[0] == "data" else 1
        args = [*args[:head], *expand_aliases(args[head:], EVALUATE_ALIASES)]
    try:
        ns = parser.instantiate(parser.parse_args(args))
    except argparse.ArgumentError as e:
        raise RecsysError(argument_problem(str(e), args)) from None
    return ns, args, tags, rest


def run(argv: Sequence[str], verbose: bool = False) -> int:
    """Parse ``argv`` and run the command; raises RecsysError for user-facing problems."""
    ns, args, tags, rest = parse_command(argv)
    if ns.command == "data":
        sub = ns.data
        if sub.action == "prepare":
            from datamodules.prepare import prepare, summarize

            prep = to_config(PrepareConfig, sub.prepare)
            show(summarize(prepare(prep), prep.out))
        elif sub.action == "candidates":
            from app.candidate_data import build_candidates, summarize_candidates

            c = sub.candidates
            cluster = c.cluster if isinstance(c.cluster, ClusterConfig) else to_config(ClusterConfig, c.cluster)
            made = to_config(CandidatesConfig, c)
            show(summarize_candidates(build_candidates(made, cluster), made.out))
        elif sub.action == "download":
            from datamodules.download import download_dataset

            show(download_dataset(sub.download.name, sub.download.dest))
        elif sub.action == "summary":
            from datamodules.prepare import summarize
            from datamodules.schema import read_metadata

            show(summarize(read_metadata(sub.summary.path), sub.summary.path))
    elif ns.command == "train":
        from app.evaluate import format_metrics
        from app.train import run_training

        cfg = dataclasses.replace(to_config(RunConfig, ns.train), verbose=verbose)
        cfg = with_preset_and_tags(cfg, preset_of(args[1:]), tags)
        metrics = run_training(cfg)
        show(format_metrics(metrics))
        if "run_id" in metrics:
            show(f"MLflow run {metrics['run_id']}: mlflow ui --backend-store-uri {tracking_uri_of(cfg)}")
    elif ns.command == "evaluate":
        run_evaluate(ns.evaluate)
    elif ns.command == "index":
        from app.recommend import index_run

        i = ns.index
        require(bool(i.run_id), "index: --run-id is required")
        store = store_config(i)
        if store is None:
            given = [f for f, v in (("--add-items", i.add_items), ("--remove-items", i.remove_items)) if v is not None]
            require(not given, f"{given[0] if given else ''}: changes a published collection; pass --store URI")
            show(index_run(i.run_id, i.index, i.out, i.tracking_uri, i.overwrite))
        else:
            from app.publish import publish_run

            require(
                i.out is None, "index --store: publishes to the store; --out writes a FAISS index (one or the other)"
            )
            show(publish_run(i.run_id, i.index, store, i.tracking_uri, i.add_items, i.remove_items))
    elif ns.command == "recommend":
        from app.recommend import recommend

        r = ns.recommend
        require(bool(r.retrieval), "recommend: --retrieval RUN is required")
        cluster = r.cluster if isinstance(r.cluster, ClusterConfig) else to_config(ClusterConfig, r.cluster)
        store = store_config(r)
        if r.all_users:
            from app.batch import all_users_config, recommend_all_users

            show(recommend_all_users(all_users_config(r, cluster, store)))
            return 0
        require(cluster == ClusterConfig(), "recommend: --backend, --num-workers and --cluster.* go with --all-users")
        show(
            recommend(
                r.retrieval,
                r.ranking,
                r.user,
                r.users,
                r.history,
                r.k,
                r.candidates,
                r.out,
                r.index,
                r.tracking_uri,
                r.overwrite,
                store,
                r.filter,
            )
        )
    elif ns.command == "package":
        from app.serving import package

        r = ns.package
        require(bool(r.retrieval), "package: --retrieval RUN is required")
        show(package(r.retrieval, r.ranking, r.index, r.register, r.tracking_uri, store_config(r)))
    elif ns.command == "submit":
        from cluster.ray_jobs import submit

        return submit(rest, ns.submit.address, ns.submit.working_dir, wait=not ns.submit.no_wait)
    return 0


def tracking_uri_of(cfg: RunConfig) -> str:
    from app.tracking import resolve_tracking_uri

    return resolve_tracking_uri(cfg.tracking.tracking_uri)


def run_evaluate(ns: Any) -> None:
    """``recsys evaluate``: --run-id (config and checkpoint from MLflow) or --checkpoint + --config-file,
    on the processes its own --num-workers/--backend/--cluster.* flags name."""
    from app.evaluate import evaluate, evaluate_run, format_metrics

    overrides = ["--data", ns.data] if ns.data else []
    cluster = ns.cluster if isinstance(ns.cluster, ClusterConfig) else to_config(ClusterConfig, ns.cluster)

    def load(path: Any) -> RunConfig:
        return dataclasses.replace(load_run_config(path, overrides), cluster=cluster)

    if ns.run_id:
        metrics = evaluate_run(ns.run_id, ns.tracking_uri, ns.split, load)
    elif ns.checkpoint and ns.config_file:
        metrics = evaluate(load(ns.config_file), ns.checkpoint, ns.split)
    else:
        raise RecsysError("evaluate: pass --run-id, or --checkpoint with --config-file")
    print(format_metrics(metrics))


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``recsys`` script."""
    args = list(sys.argv[1:] if argv is None else argv)
    cut = args.index("--") if "--" in args else len(args)  # after --: a submitted command's own flags
    verbose = any(a in VERBOSE_FLAGS for a in args[:cut])
    args = [a for a in args[:cut] if a not in VERBOSE_FLAGS] + args[cut:]
    if not verbose:  # torch's C++ warnings (gloo, c10d) bypass Python's warnings; set before torch loads
        os.environ.setdefault("TORCH_CPP_LOG_LEVEL", "ERROR")
        os.environ.setdefault("TORCH_LOGS", "-torch")  # torch's own Python loggers (handler of their own): errors only
    setup_logging(verbose)
    if not args or args[0] in ("-h", "--help"):
        build_parser().print_help()
        return 0
    try:
        # SIGINT/SIGTERM/SIGHUP: unwind (children stopped, run KILLED), 128 + signal; the script itself
        # (no argv given) keeps that answer until the process exits
        with stop_signals(whole_process=argv is None):
            try:
                return run(args, verbose)
            except BaseException as e:  # whatever a stop signal turned into on its way out is that signal
                stop = interruption(e)
                if stop is None or stop is e:
                    raise
                raise stop from None
    except RecsysError as e:
        print(f"recsys: error: {printable(str(e))}", file=sys.stderr)
        return int(getattr(e, "exit_code", 2))
    except Interrupted as e:
        print(f"recsys: {printable(str(e))}", file=sys.stderr, flush=True)
        return e.exit_code


if __name__ == "__main__":
    sys.exit(main())
