"""Package layout; everything else is in pyproject.toml.

Only ``qwenlite`` is installed. Two repository folders are mapped into it, so the source tree keeps
its top-level layout while the install has no generic top-level name:

* ``converters/`` is installed as ``qwenlite.converters``;
* ``models/`` (the known-model manifest) is installed as ``qwenlite.models_data``.

``packages.find`` in pyproject.toml cannot discover a mapped folder, hence this file: the
``qwenlite`` subpackages are found, so new ones need no change here.
"""

from setuptools import find_packages, setup

MAPPED = {"qwenlite.converters": "converters", "qwenlite.models_data": "models"}


def packages() -> list[str]:
    found = find_packages(include=["qwenlite", "qwenlite.*"])
    for name, folder in MAPPED.items():
        found += [name] + [f"{name}.{sub}" for sub in find_packages(folder)]
    return found


setup(
    packages=packages(),
    package_dir=MAPPED,
    package_data={"qwenlite": ["py.typed"], "qwenlite.server": ["page.html"], "qwenlite.models_data": ["manifest.json"]},
    include_package_data=False,
)
