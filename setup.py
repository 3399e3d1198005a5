"""Installs llama_jax. Accelerator builds of JAX come from the `tpu` / `gpu` extras."""

from setuptools import find_packages, setup

setup(
    name="llama_jax",
    version="0.1.0",
    description="Pretrain and post-train Llama 3 models in JAX / Flax NNX.",
    packages=find_packages(include=["llama_jax", "llama_jax.*"]),
    package_data={"llama_jax.data.tasks": ["*.jsonl"]},  # the built-in multiple-choice task
    python_requires=">=3.11",
    install_requires=[
        "jax>=0.10.2",
        "flax>=0.12.8; python_version<'3.12'",
        "flax>=0.12.12; python_version>='3.12'",  # 0.12.8 does not import with JAX 0.11+, which Python 3.12 gets
        "optax>=0.2.8",
        "orbax-checkpoint>=0.12.8",
        "grain>=0.2.18",
        "numpy",
        "ml-collections",
        "absl-py",
        "sentencepiece",
        "protobuf",  # reads SentencePiece model protos
        "tiktoken",
        "tokenizers",
        "jinja2>=3.1.6",  # chat templates, rendered in its sandbox as transformers does
        "safetensors",
        "tensorboardX",
        "tqdm",
        "etils[epath]",  # local and remote (gs://, s3://) paths, as grain and Orbax read them
        "array_record",  # prepared shards
        "pyarrow",  # Parquet sources
        "zstandard",  # .jsonl.zst sources (SlimPajama, DCLM)
    ],
    extras_require={
        # References used only by the tests: the CPU build of torch and Hugging Face transformers.
        # gcp-storage-emulator: a local stand-in for a gs:// bucket.
        # matplotlib: the scaling-law plots (llama_jax/scaling.py).
        # nbclient, nbformat, ipykernel: the notebook's test runs it; scipy: the accuracy fit of the scaling laws.
        # pytest-xdist: pytest.ini runs the suite in two processes.
        "test": ["pytest", "pytest-xdist>=3.2", "torch==2.13.0", "transformers>=4.45", "gcp-storage-emulator", "gcsfs",
                 "matplotlib", "scipy", "nbclient", "nbformat", "ipykernel"],
        # Running notebooks/scaling_laws.ipynb.
        "notebook": ["matplotlib", "jupyter", "nbconvert", "ipykernel"],
        # gs:// workdirs without TensorFlow: epath reaches Cloud Storage through gcsfs (Orbax's arrays and TensorBoard
        # have their own clients).
        "gcs": ["gcsfs"],
        # Accelerator builds of jaxlib; install one of these on TPU VMs / CUDA 12 hosts.
        "tpu": ["jax[tpu]>=0.10.2"],
        "gpu": ["jax[cuda12]>=0.10.2"],
    },
)
