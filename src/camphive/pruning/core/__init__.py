"""What both pruning modes share: calibration statistics, curvature seen by output units, checks,
BatchNorm re-estimation, the result record and the sharpness report."""
