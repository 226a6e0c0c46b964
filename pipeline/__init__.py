"""boostpipe's library: BoostNet models, training, calibration, evaluation and tracking."""

import os

if not os.environ.get("RAY_ADDRESS"):
    # Ray 2.60 starts a local cluster on the machine's routable address (it rewrites 127.0.0.1)
    # unless it treats the machine as single-node. This must be set before `ray` is imported;
    # it keeps every Ray server we start on loopback (check with `ss -ltnp`).
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
