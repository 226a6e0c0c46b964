"""boostpipe's library: BoostNet models, training, calibration, evaluation and tracking."""
