"""Package discovery, the one thing pyproject.toml cannot say alone.

Every subpackage of kl_autoencoder/ is found automatically (a new one cannot fall out of the wheel), and
the presets, which live at the top level in configs/, travel inside the package as kl_autoencoder.configs.
Everything else is in pyproject.toml.
"""

from setuptools import find_packages, setup

setup(
    packages=find_packages(include=["kl_autoencoder", "kl_autoencoder.*"]) + ["kl_autoencoder.configs"],
    package_dir={"kl_autoencoder.configs": "configs"},  # package data (*.yaml): pyproject.toml
)
