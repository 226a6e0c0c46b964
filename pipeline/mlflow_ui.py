"""`boostpipe ui`: MLflow's UI server for a store on this machine, on loopback, opened on the
runs' charts, stopped with us."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from collections.abc import Callable

import click

from pipeline import interrupts, verbosity
from pipeline.paths import UI_LOG
from pipeline.tracking.store import project_root

# The runs' charts in the model-training view: without `workflowType` MLflow 3 opens the GenAI
# one (a browser's stored choice, GenAI unless the user switched) whatever the experiment's kind
# tag says. The charts' sections are the metric names' prefixes (tracking/names.py).
VIEW = "workflowType=machine_learning&compareRunsMode=CHART"


def serve(uri: str, port: int, experiment_id: Callable[[], str]) -> None:
    """Serve `uri` on 127.0.0.1:`port` with one worker until Ctrl-C or SIGTERM; `experiment_id`
    (called once the port is known to be free) names the experiment whose address is printed."""
    command = [
        *(sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", uri),
        *("--host", "127.0.0.1", "--port", str(port), "--workers", "1"),
        "--uvicorn-opts=--no-access-log",  # a line per browser request is not for people
    ]
    if uri.startswith("sqlite:"):
        command += ["--default-artifact-root", (project_root() / "mlruns").as_uri()]
    _require_free_port(port)
    charts = f"#/experiments/{experiment_id()}/runs?{VIEW}"
    click.echo(f"MLflow UI for {uri}: http://127.0.0.1:{port}/{charts}  (Ctrl-C to stop)")
    signal.signal(signal.SIGTERM, interrupts.as_ctrl_c)  # SIGTERM stops the server too
    # The server runs in its own session: Ctrl-C reaches only us and we stop it with SIGTERM,
    # which uvicorn takes quietly (a SIGINT of its own prints a CancelledError traceback). Its
    # start-up notices and deprecation warnings go to a log unless `boostpipe -v ui`.
    log = None
    if not verbosity.verbose():
        path = project_root() / UI_LOG
        path.parent.mkdir(parents=True, exist_ok=True)
        log = path.open("a")
        print(f"the server's log: {log.name}", file=sys.stderr)
    server = subprocess.Popen(
        command,
        env=dict(os.environ, MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false"),
        preexec_fn=interrupts.sigterm_when_parent_dies,
        start_new_session=True,
        stdout=log,
        stderr=log,
    )
    try:
        code = server.wait()
    except KeyboardInterrupt:
        server.terminate()
        server.wait(timeout=30)
        return
    if code != 0:
        raise click.ClickException(f"the MLflow UI server exited with {code}")


def _require_free_port(port: int) -> None:
    """Bind as the server will (SO_REUSEADDR), so a taken port fails before the URL banner."""
    with socket.socket() as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            raise click.ClickException(
                f"127.0.0.1:{port} is in use; stop what listens there or pick --port"
            ) from None
