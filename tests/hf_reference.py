"""The Hugging Face reference model shared by the parity tests."""

import torch
import transformers


def random_hf_llama(hf_cfg: transformers.LlamaConfig, seed: int = 0) -> transformers.LlamaForCausalLM:
    """A random transformers Llama whose norm scales are randomised too, so that their mapping is tested."""
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(hf_cfg).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.uniform_(0.5, 1.5)
    return model
