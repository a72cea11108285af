"""Package layout that pyproject.toml cannot express alone (everything else is in pyproject.toml).

``plans/``, ``collaborator/flower/`` and ``aggregator/flower/`` stay where they are in the
repository (the layout operators read and copy) and ship in the wheel as the data packages below,
read with :mod:`fedsynth.resources`. Only folders that no tool imports by a bare name may hold an
``__init__.py`` here: a top-level ``aggregator`` or ``collaborator`` package would shadow OpenFL's
own ``fx`` command modules of those names whenever the checkout is on ``sys.path``.
"""

from setuptools import find_packages, setup

#: data package -> its folder in the repository
DATA_PACKAGES = {
    "fedsynth.plans": "plans",
    "fedsynth.templates.flower_site": "collaborator/flower",
    "fedsynth.templates.flower_aggregator": "aggregator/flower",
}

setup(
    packages=[*find_packages(include=["fedsynth", "fedsynth.*"]), *DATA_PACKAGES],
    package_dir=DATA_PACKAGES,
    package_data={
        "fedsynth": ["py.typed"],
        # the OpenFL workspace template, one for every family (.workspace is hidden: name it, '*' skips it)
        "fedsynth.plans": ["*/.workspace", "*/requirements.txt", "*/plan/*.yaml", "*/src/*"],
        "fedsynth.templates.flower_site": ["*.sh", "*.yaml"],
        "fedsynth.templates.flower_aggregator": ["*.sh"],
    },
)
