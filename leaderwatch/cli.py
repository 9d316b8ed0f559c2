"""The ``leaderwatch`` command line: watch, join and inspect elections from a shell.

Data goes to stdout, logs and errors to stderr; an error is one line and a
non-zero exit status, never a traceback. Exit statuses: 0 success, 1 the
election or a service could not be used, 2 bad usage (option, URL,
endpoint), 3 no leader known (``observe --once``, ``status``), 130
interrupted before it could stop cleanly (``demo``: interrupted by Ctrl-C,
after stopping its nodes; 143 after SIGTERM).
"""

from __future__ import annotations

import json
import logging
import os
import sys
import traceback
from collections.abc import Callable, Sequence
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any, Final, TextIO, TypeVar
from urllib.parse import quote, urlencode

import anyio
import click

from leaderwatch._status import InvalidServiceURL, ServiceStatus, fetch_statuses, status_url
from leaderwatch._transitions import TransitionPrinter, error_leaves, print_transitions
from leaderwatch.drivers._base import DriverBase
from leaderwatch.drivers._url import InvalidElectionURL, driver_from_url, redacted
from leaderwatch.errors import LeaderwatchError
from leaderwatch.logs import JSONFormatter, structlog_fields
from leaderwatch.state import Follower, InvalidEndpoint, Leader, LeaderState, parse_endpoint

__all__ = [
    "EXIT_FAILURE",
    "EXIT_INTERRUPTED",
    "EXIT_NO_LEADER",
    "EXIT_OK",
    "EXIT_USAGE",
    "configure_logging",
    "main",
]

EXIT_OK: Final = 0
"""Success (``observe --once``: a leader is known)."""
EXIT_FAILURE: Final = 1
"""The election backend or every asked service could not be used."""
EXIT_USAGE: Final = 2
"""Bad usage: an unknown option, a bad election URL, an invalid endpoint."""
EXIT_NO_LEADER: Final = 3
"""No leader is known (``observe --once``, ``status``)."""
EXIT_INTERRUPTED: Final = 130
"""Ctrl-C before the command could stop cleanly."""

_LEVELS: Final = ("debug", "info", "warning", "error", "critical")
_HANDLER_NAME: Final = "leaderwatch-cli"
_META_LEVEL: Final = "leaderwatch.log_level"
_META_FORMAT: Final = "leaderwatch.log_format"

_F = TypeVar("_F", bound=Callable[..., Any])


# --- logging -------------------------------------------------------------------------------


def configure_logging(level: int, *, json_lines: bool = False) -> None:
    """Send leaderwatch's log events at ``level`` and above to stderr (applications only).

    ``json_lines`` writes one JSON object per event
    (:class:`~leaderwatch.logs.JSONFormatter`); otherwise structlog's console
    renderer prints ``time [level] event key=value``, in colour on a
    terminal unless ``NO_COLOR`` is set. Calling it again replaces the
    handler it installed. The CLI is an application, so it may configure
    logging; the library never does.
    """
    handler = logging.StreamHandler(sys.stderr)
    handler.set_name(_HANDLER_NAME)
    handler.setFormatter(JSONFormatter() if json_lines else _console_formatter(sys.stderr))
    logger = logging.getLogger("leaderwatch")
    for previous in [h for h in logger.handlers if h.get_name() == _HANDLER_NAME]:
        logger.removeHandler(previous)
    logger.addHandler(handler)
    logger.setLevel(level)


def _console_formatter(stream: TextIO) -> logging.Formatter:
    import structlog

    colors = stream.isatty() and "NO_COLOR" not in os.environ
    return structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=[
            structlog.stdlib.add_log_level,
            structlog.stdlib.add_logger_name,
            structlog.processors.TimeStamper(fmt="%H:%M:%S.%f", utc=False),
            structlog_fields,
        ],
        processors=[
            structlog.stdlib.ProcessorFormatter.remove_processors_meta,
            structlog.dev.ConsoleRenderer(colors=colors),
        ],
    )


def _remember(ctx: click.Context, param: click.Parameter, value: str | None) -> None:
    # Given before or after the command name; the command's own value wins.
    if value is not None:
        ctx.find_root().meta[f"leaderwatch.{param.name}"] = value


def _log_options(command: _F) -> _F:
    command = click.option(
        "--log-level",
        type=click.Choice(_LEVELS, case_sensitive=False),
        default=None,
        expose_value=False,
        callback=_remember,
        help="Library log events at this level and above go to stderr [default: warning].",
    )(command)
    return click.option(
        "--log-format",
        type=click.Choice(("console", "json")),
        default=None,
        expose_value=False,
        callback=_remember,
        help="Log lines for people (console) or one JSON object per event [default: console].",
    )(command)


def _setup_logging(ctx: click.Context, default_level: str = "warning") -> None:
    meta = ctx.find_root().meta
    level = str(meta.get(_META_LEVEL, default_level)).upper()
    configure_logging(
        logging.getLevelNamesMapping()[level], json_lines=meta.get(_META_FORMAT) == "json"
    )


# --- errors --------------------------------------------------------------------------------


class _Failed(click.ClickException):
    """A command could not do its job; shown as one line, with its exit status."""

    def __init__(self, message: str, status: int = EXIT_FAILURE) -> None:
        super().__init__(message)
        self.status = status
        self.ctx = click.get_current_context(silent=True)


def _one_line(text: str) -> str:
    return "; ".join(line.strip() for line in text.splitlines() if line.strip()) or "failed"


def _say_error(ctx: click.Context | None, message: str) -> None:
    where = ctx.command_path if ctx is not None else "leaderwatch"
    click.echo(f"{where}: error: {_one_line(message)}", err=True)


def _describe_error(error: BaseException) -> str:
    if isinstance(error, LeaderwatchError | ImportError):
        return str(error)
    return f"{type(error).__name__}: {error}"


def _debugging(ctx: click.Context) -> bool:
    return str(ctx.find_root().meta.get(_META_LEVEL, "")).lower() == "debug"


def _run(ctx: click.Context, function: Callable[..., Any], *args: Any, backend: str) -> int:
    """Run ``function`` on anyio; turn what it raises into one line per error and status 1."""
    try:
        code = anyio.run(function, *args, backend=backend)
        return code if isinstance(code, int) else EXIT_OK
    except Exception as error:
        leaves = error_leaves(error)
        if all(isinstance(leaf, BrokenPipeError) for leaf in leaves):
            _silence_stdout()
            return EXIT_OK
        if _debugging(ctx):
            traceback.print_exception(error)
        for leaf in leaves:
            if not isinstance(leaf, BrokenPipeError):
                _say_error(ctx, _describe_error(leaf))
        return EXIT_FAILURE


def _silence_stdout() -> None:
    # The reader went away (``| head``): drop what is still buffered, quietly.
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)


# --- parameter types -----------------------------------------------------------------------


def _endpoint(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    if value is None:
        return None
    try:
        return parse_endpoint(value)
    except InvalidEndpoint as error:
        raise click.BadParameter(str(error), ctx, param) from None


def _endpoints(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    if value is None:
        return None
    endpoints = []
    for item in value.split(","):
        try:
            endpoints.append(parse_endpoint(item.strip()))
        except InvalidEndpoint as error:
            raise click.BadParameter(f"{item.strip()!r}: {error}", ctx, param) from None
    return ",".join(endpoints)


_SECONDS = click.FloatRange(min=0, min_open=True)


# --- naming the election -------------------------------------------------------------------


def _election_options(command: _F) -> _F:
    """The election as a URL argument, or as the flag forms that build the same URL."""
    decorators = [
        click.argument("url", required=False, metavar="[URL]"),
        click.option(
            "--local",
            "local_dir",
            metavar="DIR",
            help="File-lock election in DIR on this host (same as URL local:///DIR).",
        ),
        click.option(
            "--etcd",
            "etcd_endpoints",
            callback=_endpoints,
            metavar="HOST:PORT[,...]",
            help="Election on these etcd endpoints, tried in order (needs --election).",
        ),
        click.option(
            "--postgres",
            "postgres_dsn",
            metavar="DSN",
            help="Election in this PostgreSQL database, a postgres:// URL (needs --election).",
        ),
        click.option("--election", metavar="NAME", help="Election name (--etcd, --postgres)."),
        click.option(
            "--ttl",
            type=click.IntRange(min=1),
            metavar="SECONDS",
            help="Lease time-to-live, whole seconds (etcd, postgres).",
        ),
        click.option(
            "--margin",
            type=_SECONDS,
            metavar="SECONDS",
            help="Step down this long before the ttl (etcd, postgres).",
        ),
        click.option(
            "--connect-timeout",
            type=_SECONDS,
            metavar="SECONDS",
            help="Start-up deadline per etcd endpoint.",
        ),
        click.option(
            "--poll-interval",
            type=_SECONDS,
            metavar="SECONDS",
            help="Time between lock probes (--local).",
        ),
        click.option("--schema", metavar="NAME", help="Schema of the election table (--postgres)."),
        click.option("--tls", is_flag=True, default=False, help="Talk TLS to etcd."),
        click.option(
            "--ca-cert",
            type=click.Path(exists=True, dir_okay=False),
            help="CA bundle that signs etcd's certificate (implies --tls).",
        ),
        click.option(
            "--client-cert",
            type=click.Path(exists=True, dir_okay=False),
            help="Client certificate for etcd (with --client-key; implies --tls).",
        ),
        click.option(
            "--client-key",
            type=click.Path(exists=True, dir_okay=False),
            help="Client private key for etcd (with --client-cert).",
        ),
        click.option("--user", metavar="NAME", help="etcd user name (with --password)."),
        click.option(
            "--password",
            envvar="LEADERWATCH_ETCD_PASSWORD",
            show_envvar=True,
            metavar="TEXT",
            help="etcd password (prefer the environment variable).",
        ),
    ]
    for decorator in reversed(decorators):
        command = decorator(command)
    return command


# Each tuning parameter: its flag and the flag forms it applies to.
_TUNING: Final = {
    "election": ("--election", ("etcd", "postgres")),
    "ttl": ("--ttl", ("etcd", "postgres")),
    "margin": ("--margin", ("etcd", "postgres")),
    "connect_timeout": ("--connect-timeout", ("etcd",)),
    "poll_interval": ("--poll-interval", ("local",)),
    "schema": ("--schema", ("postgres",)),
    "tls": ("--tls", ("etcd",)),
    "ca_cert": ("--ca-cert", ("etcd",)),
    "client_cert": ("--client-cert", ("etcd",)),
    "client_key": ("--client-key", ("etcd",)),
    "user": ("--user", ("etcd",)),
    "password": ("--password", ("etcd",)),
}


def _election_url(
    url: str | None,
    local_dir: str | None,
    etcd_endpoints: str | None,
    postgres_dsn: str | None,
    **tuning: Any,
) -> str:
    """The election URL the command line names, built from the flag forms if need be."""
    sources = {
        "a URL": url,
        "--local": local_dir,
        "--etcd": etcd_endpoints,
        "--postgres": postgres_dsn,
    }
    chosen = [name for name, value in sources.items() if value is not None]
    if not chosen:
        raise click.UsageError(
            "name the election: a URL (local:///DIR, etcd://HOST:PORT/NAME, "
            "postgres://HOST/DB?election=NAME) or --local DIR, --etcd HOST:PORT --election NAME, "
            "--postgres DSN --election NAME"
        )
    if len(chosen) > 1:
        raise click.UsageError(f"name the election once (got {' and '.join(chosen)})")
    backend = {"a URL": "url", "--local": "local", "--etcd": "etcd", "--postgres": "postgres"}[
        chosen[0]
    ]
    given = {
        key: value for key, value in tuning.items() if value is not None and value is not False
    }
    for key in given:
        flag, backends = _TUNING[key]
        if backend == "url":
            raise click.UsageError(
                f"{flag} goes with --local/--etcd/--postgres; with a URL put it in the URL "
                "(e.g. etcd://HOST:PORT/NAME?ttl=10, etcds://USER:PASSWORD@HOST:PORT/NAME)"
            )
        if backend not in backends:
            raise click.UsageError(f"{flag} does not apply to --{backend}")
    if url is not None:
        return url
    if local_dir is not None:
        directory = quote(str(Path(local_dir).absolute()))
        return f"local://{directory}{_query(given, 'poll_interval')}"
    if "election" not in given:
        raise click.UsageError(f"{chosen[0]} needs --election NAME")
    election = quote(given["election"], safe="/")
    if etcd_endpoints is not None:
        if ("user" in given) != ("password" in given):
            raise click.UsageError("--user and --password go together")
        userinfo = ""
        if "user" in given:
            userinfo = f"{quote(given['user'], safe='')}:{quote(given['password'], safe='')}@"
        certificates = {"ca_cert", "client_cert", "client_key"} & given.keys()
        scheme = "etcds" if given.get("tls") or certificates else "etcd"
        options = _query(
            given, "ttl", "margin", "connect_timeout", "ca_cert", "client_cert", "client_key"
        )
        return f"{scheme}://{userinfo}{etcd_endpoints}/{election}{options}"
    assert postgres_dsn is not None
    if not postgres_dsn.startswith(("postgres://", "postgresql://")):
        raise click.UsageError(
            "--postgres takes a URL DSN (postgres://USER@HOST/DATABASE); "
            "key=value DSNs are not supported"
        )
    options = _query(given, "ttl", "margin", "schema")
    options = f"election={election}" + (f"&{options[1:]}" if options else "")
    return postgres_dsn + ("&" if "?" in postgres_dsn else "?") + options


def _query(given: dict[str, Any], *keys: str) -> str:
    chosen = {key: str(given[key]) for key in keys if key in given}
    return "?" + urlencode(chosen, quote_via=quote) if chosen else ""


def _driver(url: str, *, node_endpoint: str | None, **overrides: Any) -> DriverBase:
    """Build the URL's driver; a bad URL or endpoint is a usage error, a missing extra a failure."""
    try:
        return driver_from_url(url, node_endpoint=node_endpoint, **overrides)
    except (InvalidElectionURL, InvalidEndpoint) as error:
        raise _Failed(str(error), EXIT_USAGE) from None
    except (ImportError, LeaderwatchError) as error:
        raise _Failed(str(error)) from None
    except ValueError as error:
        raise _Failed(f"election URL {redacted(url)!r}: {error}", EXIT_USAGE) from None


# --- printing leadership -------------------------------------------------------------------


def _leader_known(state: LeaderState) -> bool:
    if isinstance(state, Follower):
        return state.leader_endpoint is not None or state.leader_epoch is not None
    return isinstance(state, Leader)


async def _follow(driver: DriverBase, printer: TransitionPrinter, once: bool) -> int:
    """Print each transition until SIGINT/SIGTERM (or the current state, ``once``)."""
    if once:
        async with driver:
            state = driver.current
            printer.emit(driver.node_id, state, timestamp=False)
            return EXIT_OK if _leader_known(state) else EXIT_NO_LEADER
    await print_transitions(driver, printer)
    return EXIT_OK


# --- commands ------------------------------------------------------------------------------


def _version() -> str:
    try:
        return version("leaderwatch")
    except PackageNotFoundError:
        return "unknown"


_BACKEND_OPTION = click.option(
    "--backend",
    type=click.Choice(("asyncio", "trio")),
    default="asyncio",
    show_default=True,
    help="anyio backend to run on (etcd and PostgreSQL need asyncio).",
)
_FORMAT_OPTION = click.option(
    "--format",
    "output",
    type=click.Choice(("text", "json")),
    default="text",
    show_default=True,
    help="Lines for people, or JSON lines {node, pid, t, wall, state}.",
)
_ELECTION_HELP: Final = """
The election is a URL (the same as leaderwatch.driver_from_url takes):

\b
  local:///var/run/myapp                  file lock on this host
  etcd://h1:2379,h2:2379/myapp?ttl=10     etcd v3 (etcds:// for TLS)
  postgres://user@host/db?election=myapp  PostgreSQL

or the flag forms --local DIR, --etcd HOST:PORT[,...] --election NAME,
--postgres DSN --election NAME.
"""


@click.group(
    context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100},
    help="Watch, join and inspect leaderwatch elections. Data goes to stdout, logs and errors "
    "to stderr.",
)
@click.version_option(
    _version(), "--version", prog_name="leaderwatch", message="%(prog)s %(version)s"
)
@_log_options
def cli() -> None:
    """The ``leaderwatch`` command group."""


@cli.command(
    help="""Watch real node processes fail over while a client keeps getting served.

Starts --nodes processes electing a leader through a file lock in a temporary
directory, each serving fenced tickets over HTTP on a loopback port behind
LeaderRedirectMiddleware; a client asks random nodes through
LeaderAwareTransport. Each round kills the leader (SIGKILL), then stops the
next one gracefully (SIGTERM), and measures the client-visible outage. Prints a
live timeline and a summary table (or JSON lines with --json). Needs the http
extra: pip install 'leaderwatch[http]'.

Exit status: 0 when every request was served and every check held, 1
otherwise, 130 on Ctrl-C (143 on SIGTERM); every process it started is
stopped and the directory removed in all cases.
""",
    short_help="Real node processes fail over under client traffic.",
)
@click.option(
    "--nodes",
    type=click.IntRange(2, 9),
    default=3,
    show_default=True,
    help="Node processes to start.",
)
@click.option(
    "--rounds",
    type=click.IntRange(1, 50),
    default=2,
    show_default=True,
    help="Rounds of one SIGKILL and one SIGTERM failover each.",
)
@click.option(
    "--json",
    "json_lines",
    is_flag=True,
    help="One JSON object per event on stdout (no colours, no progress line).",
)
@click.option(
    "--no-color",
    is_flag=True,
    help="No colours (also off when stdout is not a terminal or NO_COLOR is set).",
)
@click.option("-v", "--verbose", is_flag=True, help="Show the nodes' info log events on stderr.")
@_log_options
@click.pass_context
def demo(
    ctx: click.Context, nodes: int, rounds: int, json_lines: bool, no_color: bool, verbose: bool
) -> int:
    try:
        from leaderwatch._demo import DemoOptions, run_demo
    except ImportError as error:
        raise _Failed(
            f"the demo needs the http extra ({error.name or error} is missing): "
            "pip install 'leaderwatch[http]'"
        ) from None

    _setup_logging(ctx, "info" if verbose else "error")
    meta = ctx.find_root().meta
    terminal = sys.stdout.isatty()
    options = DemoOptions(
        nodes=nodes,
        rounds=rounds,
        json_lines=json_lines,
        color=terminal and not no_color and "NO_COLOR" not in os.environ,
        progress=terminal,
        log_level=str(meta.get(_META_LEVEL, "info" if verbose else "error")).lower(),
        log_format=str(meta.get(_META_FORMAT, "console")),
    )
    return _run(ctx, run_demo, options, sys.stdout, backend="asyncio")


@cli.command(
    help=f"""Print each leadership transition of an election, as an observer.

An observer never campaigns. Stops on Ctrl-C or SIGTERM (exit 0). With
--once it prints the current state and exits: 0 when a leader is known,
3 when none is.
{_ELECTION_HELP}""",
    short_help="Print who leads an election, at each change.",
)
@_election_options
@_FORMAT_OPTION
@click.option("--once", is_flag=True, help="Print the current state and exit (0 leader, 3 none).")
@_BACKEND_OPTION
@_log_options
@click.pass_context
def observe(ctx: click.Context, /, output: str, once: bool, backend: str, **election: Any) -> int:
    _setup_logging(ctx)
    url = _election_url(**election)
    driver = _driver(url, node_endpoint=None)
    printer = TransitionPrinter(output, observer=True, stream=sys.stdout)
    return _run(ctx, _follow, driver, printer, once, backend=backend)


@cli.command(
    help=f"""Campaign in an election and print each leadership transition.

The node advertises --endpoint while it leads. Ctrl-C, SIGINT or SIGTERM
hands over gracefully: it resigns, so a successor takes over at once,
prints its last state and exits 0. --format json prints one JSON line
per transition with node, pid, t (time.monotonic(), one clock for every
process of a Linux host), wall and state: this command is the process
runner of leaderwatch's multi-process tests and benchmarks.
{_ELECTION_HELP}""",
    short_help="Campaign in an election; resign on Ctrl-C.",
)
@_election_options
@click.option(
    "--endpoint",
    required=True,
    callback=_endpoint,
    metavar="HOST:PORT",
    help="host:port this node advertises while it leads (no scheme).",
)
@click.option("--node-id", help="Name in logs and JSON lines [default: the endpoint].")
@_FORMAT_OPTION
@_BACKEND_OPTION
@_log_options
@click.pass_context
def campaign(
    ctx: click.Context,
    /,
    endpoint: str,
    node_id: str | None,
    output: str,
    backend: str,
    **election: Any,
) -> int:
    _setup_logging(ctx)
    url = _election_url(**election)
    overrides = {} if node_id is None else {"node_id": node_id}
    driver = _driver(url, node_endpoint=endpoint, **overrides)
    printer = TransitionPrinter(output, observer=False, stream=sys.stdout)
    return _run(ctx, _follow, driver, printer, False, backend=backend)


@cli.command(
    help="""Ask running services who leads and print a table.

Each URL is a service's base URL (http:// is assumed) where
leaderwatch.asgi.leader_status_app is mounted; GET URL/status is asked.
Unreachable services are listed as such. Exit status: 0 when a leader is
known, 3 when services answered but none knows a leader, 1 when none
answered.
""",
    short_help="Ask running services who leads.",
)
@click.argument("urls", nargs=-1, required=True, metavar="URL...")
@click.option(
    "--format",
    "output",
    type=click.Choice(("text", "json")),
    default="text",
    show_default=True,
    help="A table for people, or one JSON object {services: [...]}.",
)
@click.option(
    "--timeout",
    type=_SECONDS,
    default=2.0,
    show_default=True,
    metavar="SECONDS",
    help="How long each service gets to answer.",
)
@_log_options
@click.pass_context
def status(ctx: click.Context, urls: tuple[str, ...], output: str, timeout: float) -> int:
    _setup_logging(ctx)
    try:
        targets = [status_url(url) for url in urls]
    except InvalidServiceURL as error:
        raise _Failed(str(error), EXIT_USAGE) from None
    results: list[ServiceStatus] = anyio.run(_fetch, targets, timeout)
    if output == "json":
        click.echo(json.dumps({"services": [r.model_dump(mode="json") for r in results]}))
    else:
        click.echo(_table(results))
    for result in results:
        if not result.reachable:
            click.echo(f"{ctx.command_path}: {result.url}: {result.error}", err=True)
    reachable = [result for result in results if result.reachable]
    if not reachable:
        return EXIT_FAILURE
    if not any(result.role == "leader" or result.leader for result in reachable):
        return EXIT_NO_LEADER
    return EXIT_OK


async def _fetch(urls: Sequence[str], seconds_each: float) -> list[ServiceStatus]:
    return await fetch_statuses(urls, seconds_each=seconds_each)


def _table(results: Sequence[ServiceStatus]) -> str:
    rows = [("NODE", "ROLE", "EPOCH", "GATE", "LEADER")]
    for result in results:
        node = result.node or result.url.removesuffix("/status")
        if not result.reachable:
            rows.append((node, "unreachable", "-", "-", "-"))
            continue
        epoch = "-" if result.epoch is None else str(result.epoch)
        gate = (result.gate or "-").replace("_", " ")
        rows.append((node, result.role or "-", epoch, gate, result.leader or "-"))
    widths = [max(len(row[column]) for row in rows) for column in range(len(rows[0]))]
    return "\n".join(
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        for row in rows
    )


# --- entry point ---------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``leaderwatch`` command; returns the process exit status."""
    try:
        code = cli.main(
            args=list(argv) if argv is not None else None,
            prog_name="leaderwatch",
            standalone_mode=False,
        )
    except click.exceptions.NoArgsIsHelpError as error:
        click.echo(error.ctx.get_help(), err=True)
        return EXIT_USAGE
    except click.UsageError as error:
        hint = ""
        if error.ctx is not None:
            hint = f" (see '{error.ctx.command_path} --help')"
        _say_error(error.ctx, error.format_message() + hint)
        return error.exit_code
    except _Failed as error:
        _say_error(error.ctx, error.format_message())
        return error.status
    except click.ClickException as error:
        _say_error(None, error.format_message())
        return error.exit_code
    except (click.Abort, KeyboardInterrupt):
        click.echo("leaderwatch: interrupted", err=True)
        return EXIT_INTERRUPTED
    return code if isinstance(code, int) else EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
