"""Training the on-board anomaly model (`fleetgw model train`): offline, on a workstation.

Where this sits: before the data path. It generates a seeded synthetic driving data set
(`dataset`), featurises it with the runtime's own code (actors/model_runner/features.py),
trains a numpy autoencoder on normal windows (`autoencoder`), writes it as an OpenVINO IR
(`graph`), measures it against the deterministic rules on held-out devices (`evaluate`) and
signs the model directory (`train`). The runtime only ever loads the result, through
actors/model_runner/manifest.py and actors/model_runner/inference.py.

Importing this package first in a process pins the BLAS libraries to one thread (it sets the
variables only while numpy is not imported yet, the only time they count, so it leaves the
environment of other processes alone): multithreaded sums can change the order of additions,
and so the weights' last bits, from one run to the next.
"""

from __future__ import annotations

import os
import sys

#: Environment of a deterministic training process (see `train.run_training_subprocess`).
BLAS_THREADS_ENV = {
    "OPENBLAS_NUM_THREADS": "1",
    "OMP_NUM_THREADS": "1",
    "MKL_NUM_THREADS": "1",
}

if "numpy" not in sys.modules:
    os.environ.update(BLAS_THREADS_ENV)
