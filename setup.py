"""kdjax: knowledge distillation in JAX/Flax."""

from setuptools import find_packages, setup

setup(
    name="kdjax",
    version="0.1.0",
    description="Knowledge distillation in JAX/Flax: logit, feature and self-distillation.",
    long_description=open("README.md").read(),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["kdjax", "kdjax.*", "configs", "experiments"]),
    # The LM quickstart's teacher (configs/lm_teacher.py, experiments/export_model.py).
    package_data={"kdjax": ["assets/*.msgpack"]},
    python_requires=">=3.10",
    install_requires=[
        "jax>=0.10.2",
        "flax>=0.12.8",
        "optax>=0.2.8",
        "orbax-checkpoint>=0.12.8",
        "tensorflow-datasets>=4.9.10",
        "importlib_resources",  # tfds's dataset builders need it and do not declare it.
        "chex>=0.1.92",
        "ml-collections>=1.1.0",
        "grain>=0.2.18",  # Index shuffling / random-access pipelines, no TensorFlow.
        "mnist1d>=0.0.2",  # Generates MNIST-1D offline: the embedded default dataset.
        "tokenizers>=0.20",  # Byte-level BPE for language models, trained offline.
        "safetensors>=0.4",  # Pretrained checkpoints in and out (numpy API, no torch).
        "jinja2>=3.1.6",  # Chat templates (3.1.6: the sandbox fixes transformers requires).
        "tensorboardX>=2.6",  # TensorBoard event files without TensorFlow.
        "matplotlib>=3.8",  # results.png
        "pillow",  # ImageNet crops and resizes (bilinear, as torchvision).
        "filelock",  # JAX's size-bounded persistent compilation cache (experiments.main).
        "absl-py",
        "numpy",
        "scikit-learn>=1.3",  # kdjax.diffusion.digits: the bundled 8x8 digits (no download).
    ],
    extras_require={
        "test": ["pytest>=8", "pytest-xdist>=3.5", "nbclient>=0.10", "nbformat>=5.10", "ipykernel>=6"],
        "torch": ["torch==2.13.0"],  # Only for benchmarks/torch_reference.py.
        # The slow tests of kdjax.models.pretrained compare against transformers.
        "hf": ["torch==2.13.0", "transformers==5.23.0"],
        "notebook": ["jupyter"],
        "tensorboard": ["tensorboard"],  # The viewer for the runs' tensorboard/ event files.
    },
)
