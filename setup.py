"""What pyproject.toml cannot say: the top-level configs/ ship inside the wheel as
fedimb/configs, where fedimb.config.CONFIGS_DIR finds them after a `pip install .`."""

from setuptools import find_namespace_packages, find_packages, setup

CONFIG_FOLDERS = [
    "fedimb.configs",
    *(f"fedimb.configs.{p}" for p in find_namespace_packages("configs")),
]

setup(
    packages=[*find_packages(include=["fedimb*", "strategies*", "clients*"]), *CONFIG_FOLDERS],
    package_dir={"fedimb.configs": "configs"},
)
