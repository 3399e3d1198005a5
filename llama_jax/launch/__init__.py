"""Launchers: start the supervised trainer (`python -m llama_jax.supervise -- python -m llama_jax.train ...`) where
it is to run, and keep it running there.

- `python -m llama_jax.launch tpu ...`: Cloud TPU slices, one or several (multislice), through the gcloud CLI: ask
  for the slice, install, start, follow, and start over on a new slice after a preemption (tpu.py).
- `python -m llama_jax.launch slurm ...`: a SLURM batch job on GPU nodes, one task per node (slurm.py, which also
  documents the XLA and NCCL settings for H100 clusters); `... local ...`: one process on this machine, every GPU.

Every outside command goes through one `Executor` (executor.py), so tests fake gcloud instead of a cloud; the
commands themselves are pure functions (gcloud.py, remote.py), and --dry-run prints them. launch/README.md is the
user's guide.
"""
