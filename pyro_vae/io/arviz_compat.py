"""The one place that knows ArviZ 0.2x from ArviZ 1.x: building, writing and reading the export.

ArviZ 0.2x (the last on Python 3.11) wraps xarray Datasets in its own
``arviz.InferenceData``; ArviZ 1.x (arviz-base, arviz-stats, arviz-plots; pip
gives it on Python >= 3.12) works on xarray's own ``DataTree``, and its
``arviz.from_netcdf`` is ``xarray.open_datatree``. Both lay the groups out in
one netCDF4/HDF5 file the same way (one HDF5 group per ArviZ group, the
object's attrs on the root), so a file written under one opens under the
other. Files are written and read with h5netcdf, which both can use and which
pyproject.toml declares.

Nothing here imports ArviZ 1.x: its objects are xarray's, and importing
``arviz`` 1.x would load the plotting library too.
"""

from __future__ import annotations

import functools
import os
from importlib import metadata
from typing import Any

import xarray

__all__ = [
    "InferenceDataLike",
    "arviz_major_version",
    "group_names",
    "make_inference_data",
    "read_netcdf",
    "write_netcdf",
]

# arviz.InferenceData under ArviZ 0.2x, xarray.DataTree under 1.x; both index groups as obj[group].
InferenceDataLike = Any

# Both ArviZ versions read this engine, and h5netcdf is the lighter of the two netCDF4 libraries.
NETCDF_ENGINE = "h5netcdf"


@functools.cache
def arviz_major_version() -> int:
    """The installed ArviZ's major version (0 or 1), read from its metadata without importing it."""
    return int(metadata.version("arviz").split(".")[0])


def make_inference_data(groups: dict[str, xarray.Dataset], *, attrs: dict[str, Any]) -> InferenceDataLike:
    """The ArviZ object of the installed version holding ``groups`` {name: Dataset}, with ``attrs`` on it.

    ``arviz.InferenceData`` under 0.2x; under 1.x an ``xarray.DataTree`` whose
    root carries ``attrs`` and whose children are the groups.
    """
    if arviz_major_version() == 0:
        import arviz

        return arviz.InferenceData(attrs=attrs, **groups)
    return xarray.DataTree.from_dict({"/": xarray.Dataset(attrs=attrs), **groups})


def group_names(data: InferenceDataLike) -> list[str]:
    """The names of the groups of ``data`` ("posterior", ...), in their order, for either version."""
    if isinstance(data, xarray.DataTree):
        return list(data.children)
    return list(data.groups())


def write_netcdf(data: InferenceDataLike, path: str | os.PathLike[str]) -> None:
    """Write ``data`` to the netCDF4 file ``path``, numeric variables zlib-compressed as ArviZ 0.2x does."""
    if not isinstance(data, xarray.DataTree):
        data.to_netcdf(os.fspath(path), engine=NETCDF_ENGINE)
        return
    encoding = {
        node.path: {
            name: {"zlib": True}
            for name, variable in node.dataset.variables.items()
            if variable.dtype.kind in "biufc"
        }
        for node in data.subtree
        if node.has_data
    }
    data.to_netcdf(path, engine=NETCDF_ENGINE, encoding=encoding)


def read_netcdf(path: str | os.PathLike[str]) -> InferenceDataLike:
    """The ArviZ object in ``path``: what ``arviz.from_netcdf(path)`` of the installed version returns."""
    if arviz_major_version() == 0:
        import arviz

        return arviz.from_netcdf(os.fspath(path), engine=NETCDF_ENGINE)
    return xarray.open_datatree(path, engine=NETCDF_ENGINE)
