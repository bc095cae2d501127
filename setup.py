from setuptools import find_packages, setup

setup(
    name="timm_l2w",
    version="0.1.0",
    description="Learning to Weight Samples for Dynamic Early-exiting Networks (L2W, ECCV 2022) as a timm plugin",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    packages=find_packages(include=["timm_l2w", "timm_l2w.*", "timm_l2w_runtime", "timm_l2w_runtime.*"]),
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
    ],
    extras_require={
        "dev": ["pytest", "pytest-timeout", "hypothesis"],
        # timm-l2w export / predict: the ONNX exporter (onnx + onnxscript) and the runtime (onnxruntime)
        "deploy": ["onnx>=1.16", "onnxscript>=0.2", "onnxruntime>=1.17", "numpy", "pillow"],
    },
    entry_points={"console_scripts": ["timm-l2w=timm_l2w.cli:main"]},
)
