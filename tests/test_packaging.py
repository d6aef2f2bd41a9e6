"""Our `kernels` package shares its import name with the hub's `kernels` library, which
transformers and bitsandbytes probe. Loading a 4-bit model and building a LoRA on it must work with
ours installed, and transformers must not mistake ours for the hub library."""

import pytest
import torch

import rlhf_kernels as kernels

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")
bnb = pytest.importorskip("bitsandbytes")


def test_transformers_does_not_take_ours_for_the_hub_kernels():
    from transformers.utils import import_utils

    import_utils.is_kernels_available.cache_clear()
    assert kernels.logprobs is not None  # ours is the importable `kernels`
    assert import_utils.is_kernels_available() is False


def test_4bit_model_and_lora_with_our_kernels_installed(tmp_path):
    from transformers import BitsAndBytesConfig, LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=97, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
    )  # fmt: skip
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(tmp_path)
    quant = BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.float32,
    )  # fmt: skip
    model = LlamaForCausalLM.from_pretrained(tmp_path, quantization_config=quant, dtype=torch.float32)
    linear4 = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert linear4, "the base was not quantized"
    for m in linear4:
        m.support_avx512bf16_for_cpu = False  # DEVELOPERS.md: the CPU repack drops input gradients
    lora = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0)
    model = peft.get_peft_model(model, lora)
    ids = torch.randint(0, 97, (2, 9))
    out = model(input_ids=ids, output_hidden_states=True)
    # the fused op runs on the model's outputs and its gradient reaches the LoRA weights
    logp = kernels.logprobs(out.logits[:, :-1], ids[:, 1:])
    logp.sum().backward()
    grads = [p.grad for n, p in model.named_parameters() if "lora_B" in n]
    assert grads and all(g is not None and g.abs().sum() > 0 for g in grads)
