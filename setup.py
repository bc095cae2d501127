from setuptools import find_packages, setup

VERSION = "0.1.0"  # timm_l2w/version.py's; the runtime (runtime/pyproject.toml) moves with it

setup(
    name="timm_l2w",
    version=VERSION,
    description="Learning to Weight Samples for Dynamic Early-exiting Networks (L2W, ECCV 2022) as a timm plugin",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    # the torch-free runtime is its own distribution (runtime/, `pip install ./runtime`): requirements*.txt
    # install it from the clone before this package
    packages=find_packages(include=["timm_l2w", "timm_l2w.*"]),
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
        f"timm-l2w-runtime=={VERSION}",  # the policy file and package format; numpy, onnxruntime, pillow
    ],
    extras_require={
        "dev": ["pytest", "pytest-timeout", "hypothesis"],
        # timm-l2w export: the ONNX exporter (onnx + onnxscript); the runtime (timm-l2w-runtime) is always there
        "deploy": ["onnx>=1.16", "onnxscript>=0.2"],
    },
    entry_points={"console_scripts": ["timm-l2w=timm_l2w.cli:main"]},
)
