"""Real servers a test starts on 127.0.0.1, each in a process group of its own, so that the test
can stop it (or lose it) by PID and nothing of it outlives the test."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

from pipeline.cluster import free_port


@contextlib.contextmanager
def serving(
    command: list[str], url: str, cwd: Path, stop: int = signal.SIGTERM, log: Path | None = None
) -> Iterator[subprocess.Popen]:
    """A server we start (in its own process group) until `url` answers; `stop` is sent to that
    group afterwards, as a terminal sends Ctrl-C to its foreground job, unless it is gone. What
    it prints goes to `log` when given."""
    env = dict(os.environ, MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false")
    output = log.open("w") if log else subprocess.DEVNULL
    server = subprocess.Popen(
        command,
        cwd=cwd,
        env=env,
        start_new_session=True,
        stdout=output,
        stderr=output,
    )
    try:
        deadline = time.monotonic() + 120
        while True:
            assert server.poll() is None, f"{command[:4]} exited with {server.returncode}"
            assert time.monotonic() < deadline, f"{url} did not answer"
            with contextlib.suppress(OSError), urllib.request.urlopen(url, timeout=2):
                break
            time.sleep(0.5)
        yield server
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(server.pid, stop)
        try:
            server.wait(timeout=60)
        except subprocess.TimeoutExpired:  # the test fails, but leaves nothing running
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()
            raise
        if log:
            output.close()


@contextlib.contextmanager
def mlflow_server(folder: Path, port: int | None = None) -> Iterator[tuple[str, subprocess.Popen]]:
    """A real `mlflow server` on 127.0.0.1 (one worker; on `port`, else a free one) with its
    store in `folder`: its URI and process, stopped by its PID when the block ends, if the
    test has not stopped it already."""
    uri = f"http://127.0.0.1:{port or free_port()}"
    command = [
        *(sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--workers", "1"),
        *("--port", uri.rsplit(":", 1)[1], "--backend-store-uri", f"sqlite:///{folder}/db.sqlite"),
        *("--artifacts-destination", str(folder / "artifacts")),
    ]
    with serving(command, f"{uri}/health", folder) as server:
        yield uri, server


def stop(server: subprocess.Popen) -> None:
    """Stop a server as its process manager would (SIGTERM to its group), and reap it."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(server.pid, signal.SIGTERM)
    server.wait(timeout=30)


@contextlib.contextmanager
def s3_server(folder: Path, bucket: str) -> Iterator[dict[str, str]]:
    """moto's S3 server on 127.0.0.1 with `bucket` created: the AWS variables a client needs
    (credentials come from the environment, never from params or the repository)."""
    import pyarrow.fs as pafs

    folder.mkdir(parents=True, exist_ok=True)
    port = free_port()
    env = {
        "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}",
        "AWS_ACCESS_KEY_ID": "boostpipe-test",
        "AWS_SECRET_ACCESS_KEY": "boostpipe-test-secret",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_EC2_METADATA_DISABLED": "true",
    }
    command = [str(Path(sys.executable).parent / "moto_server"), "-H", "127.0.0.1", "-p", str(port)]
    with serving(command, f"{env['AWS_ENDPOINT_URL']}/moto-api/", folder):
        s3 = pafs.S3FileSystem(
            endpoint_override=env["AWS_ENDPOINT_URL"],
            access_key=env["AWS_ACCESS_KEY_ID"],
            secret_key=env["AWS_SECRET_ACCESS_KEY"],
            region=env["AWS_DEFAULT_REGION"],
            allow_bucket_creation=True,
        )
        s3.create_dir(bucket)
        yield env
