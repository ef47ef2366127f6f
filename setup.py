"""Builds the C implementation of the change-tracked containers (`workers.prevalence._tracked`).

Everything else is declared in pyproject.toml. The extension is optional: without a C
compiler (or Python headers) the build warns and goes on, and `workers.prevalence.tracked`
falls back to the pure-Python implementation (`tracked.IMPLEMENTATION` says which runs).
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "workers.prevalence._tracked",
            sources=["workers/prevalence/_tracked.c"],
            optional=True,
        ),
    ],
)
