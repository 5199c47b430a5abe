"""The ``recsys`` command line: parses flags into typed configs and calls library functions.

    recsys data prepare --dataset synthetic-ctr --out data/ctr --rows 100000
    recsys data download movielens-100k
    recsys data summary data/ctr

Flags may be written with dashes or underscores (``--val-frac`` or ``--val_frac``). Every user-facing
problem ends as one line on stderr and exit status 2.
"""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Sequence
from typing import Any, TypeVar

from app.config import PrepareConfig
from app.errors import RecsysError

T = TypeVar("T")


BOOL_WORDS = {"true", "false", "yes", "no", "1", "0"}


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
            if not eq and arg in switches and (nxt is None or nxt.lower() not in BOOL_WORDS):
                arg += "=true"
        out.append(arg)
    return out


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
    download.add_argument("--dest", type=str | None, default=None, help="target directory")
    data_commands.add_subcommand("download", download, help="fetch a public dataset")

    summary = ArgumentParser(description="Print the summary of a prepared dataset.", exit_on_error=False)
    summary.add_argument("path", type=str)
    data_commands.add_subcommand("summary", summary, help="print a prepared dataset's summary")
    return root


def to_config(cls: type[T], ns: Any) -> T:
    """Build the frozen dataclass ``cls`` from a parsed namespace (sub-dataclasses already built)."""
    values = {f.name: getattr(ns, f.name) for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    return cls(**values)


def run(argv: Sequence[str]) -> int:
    """Parse ``argv`` and run the command; raises RecsysError for user-facing problems."""
    import argparse

    parser = build_parser()
    try:
        ns = parser.parse_args(normalize_flags(argv, bool_flags(PrepareConfig)))
        ns = parser.instantiate(ns)
    except argparse.ArgumentError as e:
        raise RecsysError(" ".join(str(e).split())) from None
    if ns.command == "data":
        sub = ns.data
        if sub.action == "prepare":
            from datamodules.prepare import prepare, summarize

            cfg = to_config(PrepareConfig, sub.prepare)
            meta = prepare(cfg)
            print(summarize(meta, cfg.out))
        elif sub.action == "download":
            from datamodules.download import download_dataset

            print(download_dataset(sub.download.name, sub.download.dest))
        elif sub.action == "summary":
            from datamodules.prepare import summarize
            from datamodules.schema import read_metadata

            print(summarize(read_metadata(sub.summary.path), sub.summary.path))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``recsys`` script."""
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help"):
        build_parser().print_help()
        return 0
    try:
        return run(args)
    except RecsysError as e:
        print(f"recsys: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("recsys: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
