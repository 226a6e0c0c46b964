"""Scaffolding shared by the test modules: tests import it from here, never from each other
(a test module imported by another runs its module-level code twice and drags its fixtures in).

- `project`: the repository's files, params edits, shrunk copies, subprocess runs.
- `servers`: real servers started for a test (an `mlflow server`, moto's S3) and stopped by PID.
- `cluster`: a real multi-node Ray cluster on loopback, and `dvc repro` joined to it.
- `nets`: small networks and image folders for the unit tests.
- `shared`: the one shrunk pipeline run a session trains and its read-only tests share.
"""

from helpers.cases import is_imagenet, slow_cases
from helpers.nets import grey_msdnet, grey_ranet, write_image_folder
from helpers.project import (
    PARAMS_FILES,
    ROOT,
    command_env,
    compose,
    needs_data,
    processes_in,
    queue_statuses,
    raw_params,
    run,
    set_params,
    sha,
    shrunk_copy,
    trained_run,
)
from helpers.servers import mlflow_server, s3_server, serving, stop

__all__ = [
    "PARAMS_FILES",
    "ROOT",
    "command_env",
    "compose",
    "grey_msdnet",
    "grey_ranet",
    "is_imagenet",
    "mlflow_server",
    "needs_data",
    "processes_in",
    "queue_statuses",
    "raw_params",
    "run",
    "s3_server",
    "serving",
    "set_params",
    "sha",
    "shrunk_copy",
    "slow_cases",
    "stop",
    "trained_run",
    "write_image_folder",
]
