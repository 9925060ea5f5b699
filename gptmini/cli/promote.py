"""`gptmini promote VERSION [--alias production]` and `gptmini promote --list`: the registry's aliases."""
from __future__ import annotations

import argparse

from gptmini import registry
from gptmini.cli import run


def promote(args: argparse.Namespace) -> None:
    if not args.alias.isidentifier():
        raise registry.RegistryError(f"alias {args.alias!r} is not a valid alias name; use letters, digits and _")
    mc = registry.client(args.tracking_uri)
    with registry.mlflow_errors(mc.tracking_uri):
        if args.list:
            print("\n".join(registry.list_versions(mc, args.name)) or f"registered model {args.name!r} has no versions")
            return
        previous = registry.promote(mc, args.version, args.alias, args.name, reason="gptmini promote")
    moved = f" (was v{previous})" if previous else ""
    print(f"{args.name}@{args.alias} -> v{args.version}{moved}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="gptmini promote",
        description="Point a registry alias (default: production, which also moves champion) at a version "
                    "of the registered model. MLflow server from --tracking-uri or $MLFLOW_TRACKING_URI.",
    )
    p.add_argument("version", nargs="?", help="the version number to promote, e.g. 3")
    p.add_argument("--alias", default=registry.PRODUCTION, help="alias to move (default: production)")
    p.add_argument("--name", default=registry.MODEL_NAME, help="registered model name (default: gptmini)")
    p.add_argument("--tracking-uri", default=None, help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI)")
    p.add_argument("--list", action="store_true", help="list the versions with their aliases and exit")
    args = p.parse_args(argv)
    if not args.list and (args.version is None or not args.version.isdigit()):
        p.error(f"give the version number to promote (got {args.version!r}); see `gptmini promote --list`")
    return run("gptmini promote", lambda: promote(args))
