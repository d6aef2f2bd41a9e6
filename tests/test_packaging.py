"""Installed names: the source folders kernels/ and engine/ install as rlhf_kernels and rlhf_engine,
because `kernels` is the import name of Hugging Face's hub package, which transformers and
bitsandbytes import (bitsandbytes calls `kernels.get_kernel` on avx512_bf16 CPUs). Ours must install
beside the hub package without sharing a file with it, neither may shadow the other, and a 4-bit
model with a LoRA must work with ours installed."""

import glob
import os
import subprocess
import sys
import zipfile

import pytest
import torch

import rlhf_kernels as kernels

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")
bnb = pytest.importorskip("bitsandbytes")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The hub package's wheel, downloaded by `make test` (Makefile: HUB_KERNELS); absent offline.
HUB_WHEELS = glob.glob(os.path.join(ROOT, ".venv", "hub-wheels", "kernels-*.whl"))


def run_python(code, *, cwd, path=(), safe_path=True):
    """`code` in a fresh interpreter. With `path` (a site directory holding installed copies) the
    interpreter starts without `site` (-S), so the editable install's import hook (a .pth file) stays
    out, and sees `path` and then the venv's packages."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "TRITON_INTERPRET")}
    env["HF_HUB_OFFLINE"] = "1"  # bitsandbytes' get_kernel must not reach the network from a test
    flags = ["-P"] if safe_path else []
    if path:
        import site

        env["PYTHONPATH"] = os.pathsep.join([*path, *site.getsitepackages()])
        flags.append("-S")
    args = [sys.executable, *flags, "-c", code]
    return subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def test_transformers_does_not_take_ours_for_the_hub_kernels():
    from transformers.utils import import_utils

    import_utils.is_kernels_available.cache_clear()
    assert kernels.logprobs is not None
    assert import_utils.is_kernels_available() is False  # no hub package in the test venv


def test_the_checkout_folder_never_answers_to_kernels():
    # From the checkout's root (on sys.path there) our folder must not pass for the hub package: an
    # empty module without file or version, which transformers reads as "not installed" (raising on
    # import would break transformers' own import: it imports `kernels` to probe it) ...
    code = (
        "from transformers import LlamaModel\n"  # imports transformers' hub-kernels probe
        "from transformers.utils import import_utils\n"
        "import kernels\n"
        "print(import_utils._is_package_available('kernels', return_version=True), kernels.__file__,"
        " hasattr(kernels, 'logprobs'), hasattr(kernels, 'get_kernel'))\n"
    )
    out = run_python(code, cwd=ROOT, safe_path=False)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip() == "(False, 'N/A') None False False", out.stdout
    # ... and bitsandbytes never reports our folder as a broken hub package
    out = run_python("import bitsandbytes", cwd=ROOT, safe_path=False)
    assert out.returncode == 0, out.stderr[-2000:]
    assert ROOT not in out.stderr and "rlhf" not in out.stderr, out.stderr[-2000:]


@pytest.mark.skipif(not HUB_WHEELS, reason="hub `kernels` wheel not downloaded (make test fetches it; offline?)")
def test_installs_beside_the_hub_kernels_package(tmp_path):
    # our wheel (an incremental build: the extension is already compiled in build/) and the hub's,
    # installed into one site directory
    wheels = tmp_path / "wheels"
    built = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-build-isolation", "--no-deps", "-w", str(wheels), ROOT],
        capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert built.returncode == 0, built.stderr[-3000:]
    ours = glob.glob(str(wheels / "rlhf_engine-*.whl"))
    assert len(ours) == 1, os.listdir(wheels)
    names = zipfile.ZipFile(ours[0]).namelist()
    tops = {name.split("/")[0] for name in names}
    # the data files the engine reads at run time ship with it (the default constitution, templates)
    for data in ("constitution.jsonl", "critique.txt", "judge.txt"):
        assert f"rlhf_engine/data/cai/{data}" in names, data
    hub_tops = {name.split("/")[0] for name in zipfile.ZipFile(HUB_WHEELS[0]).namelist()}
    assert {"rlhf_kernels", "rlhf_engine"} <= tops and not (tops & hub_tops), (tops, hub_tops)
    site = tmp_path / "site"
    installed = subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-index", "--target", str(site),
         ours[0], HUB_WHEELS[0]], capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert installed.returncode == 0, installed.stderr[-3000:]
    check = f"""
import torch, kernels, rlhf_kernels, rlhf_engine
assert kernels.__file__.startswith({str(site)!r}) and hasattr(kernels, "get_kernel"), kernels.__file__
assert rlhf_kernels.__file__.startswith({str(site)!r}), rlhf_kernels.__file__
assert rlhf_kernels.backends()["cpp"] == "yes", rlhf_kernels.backends()
x = torch.tensor([[0.0, 1.0]])
assert abs(float(rlhf_kernels.logprobs(x, torch.tensor([1]))) - float(torch.log_softmax(x, -1)[0, 1])) < 1e-6
from transformers.utils import import_utils
print("transformers sees:", import_utils._is_package_available("kernels", return_version=True))
import bitsandbytes
"""
    for cwd, safe in ((tmp_path, True), (ROOT, False)):  # also from the checkout's root: hand-over to the hub
        out = run_python(check, cwd=cwd, path=[str(site)], safe_path=safe)
        assert out.returncode == 0, f"cwd={cwd}: {out.stderr[-3000:]}"
        hub_version = os.path.basename(HUB_WHEELS[0]).split("-")[1]
        assert f"transformers sees: (True, '{hub_version}')" in out.stdout, out.stdout
        assert "rlhf" not in out.stderr and "cannot import name 'get_kernel'" not in out.stderr, out.stderr[-2000:]


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
        m.support_avx512bf16_for_cpu = False  # the CPU repack drops input gradients (tests/test_stack.py)
    lora = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0)
    model = peft.get_peft_model(model, lora)
    ids = torch.randint(0, 97, (2, 9))
    out = model(input_ids=ids, output_hidden_states=True)
    # the fused op runs on the model's outputs and its gradient reaches the LoRA weights
    logp = kernels.logprobs(out.logits[:, :-1], ids[:, 1:])
    logp.sum().backward()
    grads = [p.grad for n, p in model.named_parameters() if "lora_B" in n]
    assert grads and all(g is not None and g.abs().sum() > 0 for g in grads)
