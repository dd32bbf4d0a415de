"""The one compiled part of the project, data_prep._native (the alias matcher's scan: data_prep/_native.c).
Everything else is in pyproject.toml. The extension is optional: where it cannot be built (no C compiler or
Python headers), the install goes on and the matcher uses NumPy alone, slower (data_prep/kg_index.py)."""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension("data_prep._native", ["data_prep/_native.c"], optional=True, extra_compile_args=["-O2"])
    ]
)
