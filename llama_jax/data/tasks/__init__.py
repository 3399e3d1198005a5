"""Multiple-choice task files shipped with the package (see llama_jax/evaluate.py), and the script that writes them."""
