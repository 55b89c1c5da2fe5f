"""``precog-db local up|down|status|url``: the throwaway local cluster (`precog_db.local.cluster`)."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from precog_db.cli._context import EXIT_OK, PROG, Context, add_actions, add_command
from precog_db.environment import Environment
from precog_db.settings import resolve_config_dir

__all__ = ["register"]


def register(commands: Any, parents: Sequence[argparse.ArgumentParser]) -> None:
    """Add this group's commands to ``commands``."""
    parents = list(parents)
    p = add_command(commands, "local", "a throwaway local PostgreSQL cluster under .precog/", parents=parents)
    local = add_actions(p, "local_command")
    local_parents = [*parents, _root_option()]
    q = add_command(
        local,
        "up",
        "start (or reuse) the cluster, create precog_dev and precog_test, write config/.env.dev and .env.test",
        parents=local_parents,
    )
    q.set_defaults(handler=cmd_local_up)
    q = add_command(local, "down", "stop the cluster (its data stays for the next `local up`)", parents=local_parents)
    q.set_defaults(handler=cmd_local_down)
    q = add_command(local, "status", "is the cluster initialized and running, and where", parents=local_parents)
    q.set_defaults(handler=cmd_local_status)
    q = add_command(
        local, "url", "the connection URL of precog_<env> (dev or test) on the cluster", parents=local_parents
    )
    q.set_defaults(handler=cmd_local_url)


def _root_option() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--root", type=Path, default=Path(".precog"), help="where the cluster lives (default .precog)")
    return p


def cmd_local_up(ctx: Context) -> int:
    from precog_db.local.cluster import local_up

    config_dir = resolve_config_dir(ctx.args.config_dir)
    # Creates and stamps precog_dev and precog_test, so that opening them does not warn.
    cluster, done = local_up(Path(ctx.args.root), config_dir)
    ctx.emit({"actions": done, "status": cluster.status(), "url": cluster.url("precog_dev")}, done)
    return EXIT_OK


def cmd_local_down(ctx: Context) -> int:
    from precog_db.local.cluster import LocalCluster

    cluster = LocalCluster(Path(ctx.args.root))
    if not cluster.initialized():
        message = f"no local cluster under {ctx.args.root}; nothing to stop"
    elif not cluster.running():
        message = f"the local cluster under {ctx.args.root} is not running"
    else:
        cluster.stop()
        message = f"stopped the local cluster under {ctx.args.root} (its data stays for the next `local up`)"
    ctx.emit({"message": message, "status": cluster.status()}, [message])
    return EXIT_OK


def cmd_local_status(ctx: Context) -> int:
    from precog_db.local.cluster import LocalCluster

    status = LocalCluster(Path(ctx.args.root)).status()
    ctx.emit(status, [f"{k:<12} {v}" for k, v in status.items()])
    return EXIT_OK


def cmd_local_url(ctx: Context) -> int:
    from precog_db.errors import EnvironmentNotAllowedError, LocalClusterError
    from precog_db.local.cluster import LocalCluster

    env = ctx.environment()
    if env not in (Environment.DEV, Environment.TEST):
        # Name what chose the environment: telling someone who typed --env to set PRECOG_ENV misleads.
        if ctx.env_source == "--env":
            fix = "use --env dev or --env test"
        else:
            fix = "pass --env dev or --env test, or set PRECOG_ENV to dev or test"
        raise EnvironmentNotAllowedError(
            f"`local url` works in dev, test only (the local cluster holds precog_dev and precog_test), "
            f"but the environment is {env.value} ({ctx.env_source}); {fix}"
        )
    cluster = LocalCluster(Path(ctx.args.root))
    if not cluster.initialized():
        raise LocalClusterError(f"no local cluster under {ctx.args.root}; start one with `{PROG} local up`")
    url = cluster.url(f"precog_{env.value}")
    ctx.emit({"environment": env.value, "url": url}, [url])
    return EXIT_OK
