"""``m3d-edge listen`` (the DICOM node), ``listen-status`` and ``listen-retry``; needs the [dicom-net] extra."""

from __future__ import annotations

import json
import logging
import sys
import time
from pathlib import Path

import typer
from rich.table import Table

from m3d_edge.cli.common import console, handle_errors, note, open_pipeline
from m3d_edge.cli.options import epilog
from m3d_edge.errors import PromptError

commands = typer.Typer()  # merged into the main app by m3d_edge.cli.app

ConfigOpt = typer.Option(..., "--config", "-c", help="Node config file (TOML).", show_default=False)


def _need_pynetdicom() -> None:
    try:
        import pynetdicom  # noqa: F401
    except ImportError:
        raise PromptError("the DICOM node needs pynetdicom: pip install 'm3d-edge[dicom-net]'") from None


def _logging(state_dir: Path, verbose: bool) -> None:
    """Node log lines on stderr and in STATE/node.log (UIDs, AE titles, addresses; never patient data)."""
    fmt = logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%Y-%m-%dT%H:%M:%S")
    log = logging.getLogger("m3d_edge.node")
    log.setLevel(logging.DEBUG if verbose else logging.INFO)
    state_dir.mkdir(parents=True, exist_ok=True)
    for h in (
        logging.StreamHandler(sys.stderr),
        logging.FileHandler(state_dir / "node.log", encoding="utf-8"),
    ):
        h.setFormatter(fmt)
        log.addHandler(h)
    logging.getLogger("pynetdicom").setLevel(logging.ERROR)  # its INFO lines are per association noise


@commands.command(
    "listen",
    epilog=epilog(
        "m3d-edge listen ./bundle --config node.toml",
        "python -m pynetdicom storescu 127.0.0.1 11112 ./ct_folder -r -aet PACS -aec M3D_EDGE",
    ),
)
@handle_errors
def listen(
    bundle: Path = typer.Argument(
        ..., help="Bundle folder written by `m3d-edge export`.", show_default=False
    ),
    config: Path = ConfigOpt,
    port: int | None = typer.Option(None, "--port", help="Override \\[node] port."),
    threads: int = typer.Option(0, "--threads", help="Intra-op threads per graph (0: \\[model] threads)."),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Log every stored instance."),
) -> None:
    """Run a DICOM node: receive series (C-STORE), answer them with the configured tasks, send SEG and SR back.

    State lives under \\[node] state_dir; a killed listener resumes where it stopped. Stop with Ctrl-C or
    SIGTERM.
    """
    import dataclasses

    from m3d_edge.serve.dicom_config import load_config
    from m3d_edge.serve.dicom_node import DicomNode

    _need_pynetdicom()
    cfg = load_config(config)
    if port is not None:
        cfg = dataclasses.replace(cfg, port=port)
    _logging(cfg.state_dir, verbose)
    pipe = open_pipeline(bundle, None, threads or cfg.threads, "cpu")
    DicomNode(cfg, pipe).serve_forever()


@commands.command("listen-status", epilog=epilog("m3d-edge listen-status --config node.toml --json"))
@handle_errors
def listen_status(
    config: Path = ConfigOpt,
    as_json: bool = typer.Option(False, "--json", help="Print the status as JSON."),
) -> None:
    """List the node's series by state (incoming, processing, failed, done, ignored) and its outbox."""
    from m3d_edge.serve.dicom_config import load_config
    from m3d_edge.serve.dicom_node import node_status
    from m3d_edge.serve.dicom_spool import Spool

    status = node_status(Spool(load_config(config).state_dir))
    if as_json:
        sys.stdout.write(json.dumps(status, indent=2) + "\n")
        return
    table = Table(title="series")
    for col in ("state", "run (SeriesInstanceUID)", "modality", "instances", "detail"):
        table.add_column(col, overflow="fold")
    for state in ("incoming", "processing", "failed", "done", "ignored"):
        for row in status[state]:
            detail = row.get("error") or (f"quiet {row['quiet_seconds']} s" if "quiet_seconds" in row else "")
            detail = detail or row.get("finished") or ""
            style = "red" if state == "failed" else None
            table.add_row(state, row["run"], row.get("modality") or "", str(row.get("instances") or ""), detail,
                          style=style)  # fmt: skip
    console.print(table)
    box = Table(title=f"outbox ({status['sent']} sent, {status['corrupt']} corrupt instance(s) kept)")
    for col in ("id", "kind", "attempts", "next try", "last error"):
        box.add_column(col, overflow="fold")
    for e in status["outbox"]:
        wait = max(0.0, float(e["next_try"] or 0) - time.time())
        box.add_row(e["id"], e["kind"] or "", str(e["attempts"]), f"in {wait:.0f} s", e["last_error"] or "")
    console.print(box)


@commands.command("listen-retry", epilog=epilog("m3d-edge listen-retry --config node.toml"))
@handle_errors
def listen_retry(
    config: Path = ConfigOpt,
    runs: list[str] | None = typer.Argument(
        None, help="Failed runs to retry (default: all).", show_default=False
    ),
) -> None:
    """Retry failed series (tasks already done are kept) and make every outbox entry due now.

    Works while the listener runs (it picks them up) or before starting it.
    """
    from m3d_edge.serve.dicom_config import load_config
    from m3d_edge.serve.dicom_outbox import Outbox
    from m3d_edge.serve.dicom_spool import Spool

    spool = Spool(load_config(config).state_dir)
    moved = spool.retry_failed(list(runs) if runs else None)
    if runs and len(moved) < len(runs):
        missing = sorted(set(runs) - set(moved))
        note(f"not in failed/: {', '.join(missing)}", "red")
    n = Outbox(spool).retry_now()
    console.print(f"{len(moved)} failed series back to processing; {n} outbox object(s) due now")
