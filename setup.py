"""Builds the C implementation of the change-tracked containers (`workers.prevalence._tracked`).

Everything else is declared in pyproject.toml. The extension is optional: without a C
compiler (or Python headers) the build warns and goes on, and `workers.prevalence.tracked`
falls back to the pure-Python implementation (`tracked.IMPLEMENTATION` says which runs).
"""

import hashlib
from pathlib import Path

from setuptools import Extension, setup

SOURCE = "workers/prevalence/_tracked.c"
# The build records which source it was made from: `_tracked_c` refuses a stale build
# (the source changed since), and `tracked` then falls back to Python with a warning.
DIGEST = hashlib.sha256((Path(__file__).parent / SOURCE).read_bytes()).hexdigest()

setup(
    ext_modules=[
        Extension(
            "workers.prevalence._tracked",
            sources=[SOURCE],
            define_macros=[("TRACKED_SOURCE_SHA256", f'"{DIGEST}"')],
            optional=True,
        ),
    ],
)
