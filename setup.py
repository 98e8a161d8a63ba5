"""Only the C fast path of the Criteo reader; everything else is in pyproject.toml.
``optional``: without a compiler the reader still works, through its strict path."""
from setuptools import Extension, setup

setup(ext_modules=[Extension("data._criteo_parse", ["data/_criteo_parse.c"], optional=True,
                             extra_compile_args=["-O3"])])
