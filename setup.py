"""Only the C fast paths (Criteo reader, id map of dynamic tables, OptEmbed's masks, the
fused sparse update, DIN's Dice, first attention layer and pooling, the graph models' sparse
product); everything else is in pyproject.toml.  ``optional``: without a compiler all still
work, through their pure-Python/torch/fbgemm paths, which give the same results."""
from setuptools import Extension, setup

setup(ext_modules=[
    Extension("data._criteo_parse", ["data/_criteo_parse.c"], optional=True, extra_compile_args=["-O3"]),
    Extension("rectables._idmap", ["rectables/_idmap.c", "rectables/_evict.c"], depends=["rectables/_idmap.h"],
              optional=True, extra_compile_args=["-O3", "-fopenmp"],
              extra_link_args=["-fopenmp"]),  # torch's OpenMP runtime: see run_threads
    Extension("rectables._masks", ["rectables/_masks.c"], optional=True, extra_compile_args=["-O3", "-fopenmp"],
              extra_link_args=["-fopenmp"]),
    Extension("models._din", ["models/_din.c", "models/_din_query.c", "models/_din_hidden.c", "models/_din_weights.c"], depends=["models/_din.h"], optional=True, extra_compile_args=["-O3", "-fopenmp"],
              extra_link_args=["-fopenmp"]),
    Extension("models._graph", ["models/_graph.c"], optional=True, extra_compile_args=["-O3", "-fopenmp"],
              extra_link_args=["-fopenmp"]),
    Extension("rectables._rowupdate", ["rectables/_rowupdate.c"], optional=True, extra_compile_args=["-O3", "-fopenmp"],
              extra_link_args=["-fopenmp"]),
])
