"""Packages of the one `allocator` namespace, found under the folders that pyproject.toml's package-dir maps."""
from pathlib import Path

from setuptools import find_packages, setup

FOLDERS = {"allocator": "allocator", "allocator.evaluators": "evaluators", "allocator.kernels": "kernels",
           "allocator.conf": "conf"}


def packages():
    found = []
    for name, folder in FOLDERS.items():
        if not Path(folder).is_dir():
            continue
        found.append(name)
        found += [f"{name}.{sub}" for sub in find_packages(folder) if not (name == "allocator" and sub == "tests")]
    return sorted(set(found))


setup(packages=packages())
