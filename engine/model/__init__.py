"""The model layer: one base (a preset built locally, a named release, or a save_pretrained directory),
quantised to NF4 or not, with LoRA adapters for every role (stack.ModelStack); its tokenizers, KV-cached
sampling (generation), and hidden states -> log-probs / entropy / KL through rlhf_kernels (logprobs).

Imports core/ and errors only (config.py imports no torch); never datasets/, algos/, stages/ or
pipeline/ (the demo world's tokenizer ships as a file in engine/data/tokenizers).
"""
