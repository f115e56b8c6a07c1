"""tf_backsmooth: efficient adversarial robust training for Keras 3 / TensorFlow.

TensorFlow itself comes from an extra, so that a user picks the build:
  pip install "tf_backsmooth[cpu]"   # tensorflow-cpu (~250 MB; CI and laptops)
  pip install "tf_backsmooth[gpu]"   # tensorflow[and-cuda] (GPU machines)
  pip install tf_backsmooth          # keep the TensorFlow >= 2.16 you already have
(see BUILD_NOTES.md, "Packaging", for the reason).
"""

import pathlib
import re

from setuptools import find_packages, setup

HERE = pathlib.Path(__file__).parent
VERSION = re.search(r'__version__ = "([^"]+)"',
                    (HERE / "tf_backsmooth" / "__init__.py").read_text()).group(1)

setup(
    name="tf_backsmooth",
    version=VERSION,
    description="Backward Smoothing and baseline adversarial training for Keras 3 on TensorFlow",
    long_description=(HERE / "README.md").read_text(),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    packages=find_packages(include=["tf_backsmooth", "tf_backsmooth.*"]),
    scripts=["bin/train", "bin/evaluate"],
    install_requires=[
        "keras>=3.3",
        "numpy>=1.26",
        "absl-py>=2.0",
        "tensorflow-datasets>=4.9",
        "importlib_resources",  # needed by tensorflow-datasets, undeclared there
        "matplotlib>=3.7",
        "tensorboard",  # not pulled in by tensorflow-cpu 2.21; needed for tf.summary
    ],
    extras_require={
        "cpu": ["tensorflow-cpu>=2.16"],
        "gpu": ["tensorflow[and-cuda]>=2.16"],
        "test": ["pytest>=7", "pytest-timeout>=2", "foolbox>=3.3", "scipy", "pdoc>=14"],
        # The API reference: python -m pdoc -o docs/api tf_backsmooth
        "docs": ["pdoc>=14"],
    },
    classifiers=[
        "Programming Language :: Python :: 3",
        "Topic :: Scientific/Engineering :: Artificial Intelligence",
    ],
)
