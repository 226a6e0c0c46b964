"""boostpipe's library: BoostNet models, training, calibration, evaluation and tracking."""

import os
from urllib.parse import urlparse

_ray_host = urlparse("//" + os.environ.get("RAY_ADDRESS", "").split("://")[-1]).hostname
if _ray_host in (None, "127.0.0.1", "localhost"):
    # Ray 2.60 starts (and addresses) a local cluster on the machine's routable address: it
    # rewrites 127.0.0.1, so a driver can't even reach a cluster started on loopback, unless it
    # treats the machine as single-node. This must be set before `ray` is imported; it keeps
    # every Ray server we start on loopback (check with `ss -ltnp`).
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
