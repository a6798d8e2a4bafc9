"""interformer-kernels: the InterFormer CTR model with fused Triton kernels.

`interformer.kernels` is installed from the top-level folder `kernels/` so that the
distribution never installs a top-level module called `kernels` (that name belongs to
another PyPI distribution).
"""

from setuptools import setup

setup(
    name="interformer-kernels",
    version="0.1.0",
    description="InterFormer (arXiv 2411.09852) for click-through-rate prediction, with fused Triton kernels",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    packages=["interformer", "interformer.kernels"],
    package_dir={"interformer": "interformer", "interformer.kernels": "kernels"},
    install_requires=["torch>=2.4", "numpy", "tqdm"],
    extras_require={
        "triton": ["triton>=3.0"],
        "train": ["pyyaml", "pyarrow", "matplotlib"],
        "test": ["pytest>=7", "triton>=3.0", "scikit-learn", "pyyaml", "pyarrow", "onnxscript", "onnxruntime"],
        "onnx": ["onnxscript"],
        "bench": ["pytest-benchmark>=4", "matplotlib", "triton>=3.0"],
        "profile": ["nvtx"],
    },
    entry_points={"console_scripts": ["interformer=interformer.__main__:cli"]},
)
