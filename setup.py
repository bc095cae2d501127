from setuptools import find_packages, setup

VERSION = "0.1.0"  # timm_l2w/version.py's; the runtime (runtime/pyproject.toml) moves with it

setup(
    name="timm_l2w",
    version=VERSION,
    description="Learning to Weight Samples for Dynamic Early-exiting Networks (L2W, ECCV 2022) as a timm plugin",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    # the runtime's code ships here too (timm_l2w writes and checks its policy and package format); on a
    # machine without torch, `pip install ./runtime` installs it alone (runtime/pyproject.toml)
    packages=find_packages(include=["timm_l2w", "timm_l2w.*"]) + ["timm_l2w_runtime"],
    package_dir={"timm_l2w_runtime": "runtime/timm_l2w_runtime"},
    python_requires=">=3.9",
    install_requires=[
        "torch>=2.1",
        "timm>=1.0",
        "higher>=0.2.1",
        "accelerate>=0.30",
        "safetensors>=0.4",
        "tqdm",
        "matplotlib",
        "scikit-learn",
        "scipy",  # the risk bounds (timm_l2w.evaluation.risk) and the study statistics
        "numpy",
        "pillow",
    ],
    extras_require={
        "dev": ["pytest", "pytest-timeout", "hypothesis"],
        # timm-l2w export / predict: the ONNX exporter (onnx + onnxscript) and onnxruntime
        "deploy": ["onnx>=1.16", "onnxscript>=0.2", "onnxruntime>=1.17"],
    },
    entry_points={"console_scripts": [
        "timm-l2w=timm_l2w.cli:main",
        "timm-l2w-predict=timm_l2w_runtime.predict:console",
    ]},
)
