"""draftadapt: keep a speculative-decoding draft matched to a policy while the policy trains with RL."""
import os as _os

# Measured on 2 cores: with the other core busy, torch's OpenMP threads spin at barriers and
# 2 threads train 5-10x slower than 1 ("active" waiting); passive waiting keeps 2 threads
# ~1.6x faster than 1. It only takes effect if set before torch loads, hence here.
_os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

__version__ = "0.1.0"
