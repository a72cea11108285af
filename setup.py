"""Package layout that pyproject.toml cannot express alone (everything else is in pyproject.toml).

``plans/``, ``collaborator/`` and ``aggregator/`` stay at the top of the repository (the layout
operators read and copy), and ship in the wheel as the data packages ``fedsynth.plans``,
``fedsynth.collaborator`` and ``fedsynth.aggregator`` (read with :mod:`fedsynth.resources`).
"""

from setuptools import find_packages, setup

#: data package -> its folder at the top of the repository
DATA_PACKAGES = {"fedsynth.plans": "plans", "fedsynth.collaborator": "collaborator", "fedsynth.aggregator": "aggregator"}

setup(
    packages=[*find_packages(include=["fedsynth", "fedsynth.*"]), *DATA_PACKAGES],
    package_dir=DATA_PACKAGES,
    package_data={
        "fedsynth": ["py.typed"],
        # OpenFL workspaces, one per family (.workspace is hidden: name it, '*' skips it)
        "fedsynth.plans": ["*/.workspace", "*/requirements.txt", "*/plan/*.yaml", "*/src/*"],
        "fedsynth.collaborator": ["README.md", "flower/*"],
        "fedsynth.aggregator": ["README.md", "flower/*"],
    },
)
