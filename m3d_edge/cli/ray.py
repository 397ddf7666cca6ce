"""``m3d-edge batch --ray``: a progress bar (done, failed, remaining, studies/s) over the Ray Data batch."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import typer
from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.text import Text

from m3d_edge.cli.common import console, note, preview
from m3d_edge.errors import PromptError

RayOpt = typer.Option(
    None,
    "--ray",
    help="Run on Ray Data: 'local' starts a local cluster, 'auto' joins the running one, or ray://HOST:PORT "
    "(needs the [ray] extra).",
    show_default=False,
)
WorkersOpt = typer.Option(1, "--workers", min=1, help="With --ray: inference actors (one model each).")
WorkerGpusOpt = typer.Option(0.0, "--worker-gpus", min=0.0, help="With --ray: GPUs per inference actor.")
WorkerCpusOpt = typer.Option(1.0, "--worker-cpus", min=0.01, help="With --ray: CPUs per inference actor.")


class RayProgress:
    """Turns batch events into one bar: done, failed, remaining and studies/s."""

    def __init__(self) -> None:
        self.progress = Progress(
            SpinnerColumn(),
            TextColumn("[bold]ray batch"),
            BarColumn(),
            TextColumn(
                "{task.fields[done]} done, {task.fields[failed]} failed, {task.fields[left]} remaining"
            ),
            TextColumn("{task.fields[rate]}"),
            TimeElapsedColumn(),
            console=console,
            transient=False,
        )
        self.task: Any = None
        self.total = self.done = self.failed = 0
        self.t0 = time.perf_counter()

    def __call__(self, e) -> None:
        if e.kind == "note":
            note(e.message)
        elif e.kind == "begin":
            self.total, self.t0 = e.total, time.perf_counter()
            self.task = self.progress.add_task("", total=e.total, done=0, failed=0, left=e.total, rate="")
        elif e.kind in ("ok", "skipped", "failed"):
            if e.kind == "failed":
                self.failed += 1
                line = Text("failed ", style="red").append(f"{e.name}: {e.message}", style="")
                self.progress.console.print(line, soft_wrap=True)
            else:
                self.done += 1
            n = self.done + self.failed
            rate = n / max(time.perf_counter() - self.t0, 1e-9)
            self.progress.update(
                self.task,
                completed=n,
                done=self.done,
                failed=self.failed,
                left=self.total - n,
                rate=f"{rate:.2f} studies/s",
            )


def run_ray_batch_cli(
    pipe,
    root: Path,
    out: Path,
    ask_kwargs: dict[str, Any],
    formats: tuple[str, ...],
    want_preview: bool,
    private: bool,
    address: str,
    workers: int,
    worker_cpus: float = 1.0,
    worker_gpus: float = 0.0,
    precision: str | None = None,
    threads: int = 0,
    provider: str = "cpu",
) -> dict[str, Any]:
    """:func:`m3d_edge.serve.ray_batch.run_ray_batch` with a progress bar; ``pipe`` fixes the run key."""
    try:
        from m3d_edge.serve.ray_batch import RayBatchOptions, run_ray_batch
    except ImportError as e:
        raise PromptError(
            f"--ray needs the [ray] extra: pip install 'm3d-edge[ray]' ({e.name} missing)"
        ) from None
    from m3d_edge.jobs.privacy import private_enabled
    from m3d_edge.jobs.resume import request_key

    options = RayBatchOptions(
        address=address,
        workers=workers,
        num_cpus=worker_cpus,
        num_gpus=worker_gpus,
        precision=precision,
        threads=threads,
        provider=provider,
    )
    bar = RayProgress()
    with bar.progress:
        return run_ray_batch(
            pipe.bundle,
            root,
            out,
            ask_kwargs,
            formats,
            options,
            on_event=bar,
            private=private_enabled(private),
            previewer=preview if want_preview else None,
            run_key=request_key(pipe, ask_kwargs, formats),
        )


# ------------------------------------------------------------------------------------------ serve --ray

ReplicasOpt = typer.Option(1, "--replicas", min=1, help="With --ray: replicas, each with its own model.")
MinReplicasOpt = typer.Option(None, "--min-replicas", min=0, help="With --ray: autoscale from this many.")
MaxReplicasOpt = typer.Option(None, "--max-replicas", min=1, help="With --ray: autoscale up to this many.")


def serve_on_ray(
    config,
    address: str,
    replicas: int,
    min_replicas: int | None,
    max_replicas: int | None,
    worker_cpus: float = 1.0,
    worker_gpus: float = 0.0,
) -> None:
    """``m3d-edge serve --ray``: the same app on Ray Serve replicas, until Ctrl-C."""
    import shutil

    try:
        from m3d_edge.serve.ray_serve import AFFINITY_HEADER, serve_app, shared_config, start
    except ImportError as e:
        raise PromptError(
            f"--ray needs the [ray] extra: pip install 'm3d-edge[ray]' ({e.name} missing)"
        ) from None
    if config.tls_cert is not None:
        raise PromptError(
            "--tls-cert with --ray: Ray Serve's proxy speaks plain HTTP; terminate TLS in front of it"
        )
    from m3d_edge.bundle import read_manifest

    read_manifest(config.bundle, verify=False)  # not a bundle: exit 4 here, not in every replica
    config, tmp = shared_config(config)
    app = serve_app(config, replicas, min_replicas, max_replicas, worker_cpus, worker_gpus)
    note(
        f"Ray Serve on http://{config.host}:{config.port} ({replicas} replica(s)); send the study id in "
        f"the {AFFINITY_HEADER} header to reach the replica that has it cached"
    )
    try:
        start(app, config, address, blocking=True)
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
