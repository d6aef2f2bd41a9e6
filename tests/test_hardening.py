"""Hardening of inputs, files and the run machinery (issue 21, part A): a bad config value, a damaged
safetensors file, a model directory of the wrong kind, an OUT that cannot be written and a user's reward
function that misbehaves are each one `error:` line on EVERY stage; a full disk mid-run keeps the last
checkpoint and the rerun repeats the uninterrupted run; a resume checks every input it reads; a refused
rerun leaves OUT as it was; final saves are atomic.

The tables run `rlhf_engine.cli.main` in this process on errors found before a model loads (a few ms a
case); the cases that need a model (the reward function, a full disk, a resume) run the tiny presets for a
few steps. Each stage of the table is named as the CLI names it; "grpo" is `ppo --advantage grpo`."""

import dataclasses
import errno
import json
import os
import shutil
import zipfile

import pytest
import torch
from safetensors.torch import save_file

import rlhf_engine as rl
from rlhf_engine.cli import main
from rlhf_engine.errors import ConfigError
from util import REWARD, ROOT, rows, untimed

EXAMPLES = os.path.join(ROOT, "examples", "feedback_ranked.jsonl")
STAGES = ("rm", "sft", "dpo", "ppo", "grpo", "eval", "revise", "label", "pipeline")
WITH_MODEL = tuple(s for s in STAGES if s != "eval")  # the stages that take --model
WITH_INIT = ("sft", "dpo", "ppo", "grpo", "revise", "label")  # ... and --init-adapter
WITH_RUN = tuple(s for s in STAGES if s not in ("eval", "pipeline"))  # the stages that are a core.run.Run


def one_error_line(stderr: str) -> str:
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr
    return lines[0]


def fake_stack(path, roles=("policy",), model="tiny-llama", tensors=None):
    """A saved stack directory as far as the checks before a model load see it: stack.json and one small
    safetensors file per role (and heads for value / reward)."""
    os.makedirs(path, exist_ok=True)
    stack = dataclasses.asdict(rl.StackConfig(model=model, adapters=tuple(roles)))
    with open(os.path.join(path, "stack.json"), "w") as f:
        json.dump({"stack": stack, "roles": list(roles)}, f)
    for role in roles:
        save_file(tensors or {"w": torch.zeros(4)}, os.path.join(path, f"adapter_{role}.safetensors"))
    if set(roles) & {"value", "reward"}:
        save_file({"heads.reward.proj.weight": torch.zeros(1, 4)}, os.path.join(path, "heads.safetensors"))
    return str(path)


def stage_args(stage: str, tmp_path, out=None) -> list[str]:
    """A valid command line of `stage` writing to `out` (default tmp_path/out)."""
    out = str(out or tmp_path / "out")
    common = ["--out", out, "--no-progress"]
    if stage == "eval":
        policy = fake_stack(tmp_path / "policy")
        return ["eval", "--policy", policy, "--reward-fn", REWARD, "--out", os.path.join(out, "eval.json"),
                "--no-progress"]  # fmt: skip
    return {
        "rm": ["rm", "--preset", "tiny", "--data", EXAMPLES],
        "sft": ["sft", "--preset", "tiny"],
        "dpo": ["dpo", "--preset", "tiny", "--data", EXAMPLES],
        "ppo": ["ppo", "--preset", "tiny", "--reward-fn", REWARD],
        "grpo": ["ppo", "--preset", "tiny", "--advantage", "grpo", "--group-size", "2", "--reward-fn", REWARD],
        "revise": ["cai", "revise", "--preset", "tiny"],
        "label": ["cai", "label", "--preset", "tiny"],
        "pipeline": ["pipeline", "--quick"],
    }[stage] + common


def fails_with(args, capsys, status=2) -> str:
    """Run the command in this process; it must exit with `status` (argparse's usage errors exit through
    SystemExit) and print exactly one error line."""
    try:
        code = main(args)
    except SystemExit as e:
        code = e.code
    assert code == status
    return one_error_line(capsys.readouterr().err)


# ---- 1. config values of the wrong type, in a config file (JSON and YAML), in flags, from Python ------------

STACK = {"rm", "sft", "dpo", "ppo", "grpo", "revise", "label"}
SAMPLING = {"ppo", "grpo", "eval", "revise", "label"}
# an integer field and a float field of each stage's own config
INT_FIELD = {"rm": "max_steps", "sft": "max_steps", "dpo": "max_steps", "ppo": "max_steps", "grpo": "max_steps",
             "eval": "max_prompts", "revise": "rounds", "label": "samples_per_prompt", "pipeline": "sft_steps"}
FLOAT_FIELD = {"rm": "lr", "sft": "lr", "dpo": "beta", "ppo": "lr", "grpo": "lr", "label": "margin_scale",
               "pipeline": "sft_lr"}  # fmt: skip


def type_cases(stage: str) -> dict[str, tuple[dict, str]]:
    """case -> (config file data, the error line's start) for `stage`; a case the stage has no field for is
    absent."""
    i = INT_FIELD[stage]
    cases = {
        "float_for_int": ({i: 2.5}, f"{i}=2.5: expected an integer"),
        "bool_for_int": ({i: True}, f"{i}=True: expected an integer"),
    }
    if stage in FLOAT_FIELD:
        cases["string_for_float"] = ({FLOAT_FIELD[stage]: "fast"}, f"{FLOAT_FIELD[stage]}='fast': expected a number")
    if stage in STACK:
        cases["string_for_list"] = ({"stack": {"adapters": "policy"}}, "stack.adapters='policy': expected a list")
        cases["nested_int"] = ({"stack": {"lora_r": "8"}}, "stack.lora_r='8': expected an integer")
        cases["nested_not_an_object"] = ({"stack": "tiny-llama"}, "stack='tiny-llama': expected an object")
    if stage in SAMPLING:
        cases["nested_float"] = ({"sampling": {"temperature": "hot"}}, "sampling.temperature='hot': expected a number")
        cases["string_for_nested_list"] = ({"sampling": {"stop_strings": "\n"}}, "sampling.stop_strings='\\n': "
                                           "expected a list of strings")  # fmt: skip
    if stage == "eval":
        cases["int_for_string"] = ({"reward_classifier": 3}, "reward_classifier=3: expected a string")
        cases["nested_not_an_object"] = ({"sampling": 3}, "sampling=3: expected an object")
    if stage == "pipeline":
        cases["string_for_float"] = ({"temperature": "hot"}, "temperature='hot': expected a number")
        cases["nested_int"] = ({"lora_r": "8"}, "lora_r='8': expected an integer")
        cases["bool_for_string"] = ({"model": False}, "model=False: expected a string")
    return cases


TYPE_TABLE = [(stage, case, fmt) for stage in STAGES for case in type_cases(stage) for fmt in ("json", "yaml")]


@pytest.mark.parametrize("stage, case, fmt", TYPE_TABLE, ids=[f"{s}-{c}-{f}" for s, c, f in TYPE_TABLE])
def test_a_config_value_of_the_wrong_type_is_one_line_naming_the_field(tmp_path, capsys, stage, case, fmt):
    data, message = type_cases(stage)[case]
    path = tmp_path / f"config.{fmt}"
    if fmt == "json":
        path.write_text(json.dumps(data))
    else:
        import yaml

        path.write_text(yaml.safe_dump(data))
    err = fails_with(stage_args(stage, tmp_path) + ["--config", str(path)], capsys)
    assert err.startswith(f"error: {message}"), err
    assert not (tmp_path / "out").exists()  # refused before anything was created


@pytest.mark.parametrize("stage", STAGES)
def test_a_flag_of_the_wrong_type_is_one_line(tmp_path, capsys, stage):
    field = INT_FIELD[stage]
    err = fails_with(stage_args(stage, tmp_path) + ["--" + field.replace("_", "-"), "2.5"], capsys)
    assert "invalid int value: '2.5'" in err, err


PRESETS = [("sft_preset", "max_steps"), ("reward_preset", "max_steps"), ("dpo_preset", "max_steps"),
           ("ppo_preset", "max_steps")]  # fmt: skip


@pytest.mark.parametrize("name, field", PRESETS)
def test_python_callers_get_the_same_config_error(name, field):
    with pytest.raises(ConfigError, match=rf"^{field}=2\.5: expected an integer"):
        getattr(rl, name)("tiny", **{field: 2.5})
    with pytest.raises(ConfigError, match=r"^stack\.lora_r='8': expected an integer$"):
        getattr(rl, name)("tiny", stack={"lora_r": "8"})


def test_python_callers_of_eval_cai_and_the_pipeline_get_the_config_error(tmp_path):
    with pytest.raises(ConfigError, match=r"^max_prompts=2\.5: expected an integer$"):
        rl.evaluate(rl.EvalConfig(policy=fake_stack(tmp_path / "p"), reward_fn=(REWARD,), max_prompts=2.5))
    config = dataclasses.replace(rl.CAI_PRESETS["revise"]["tiny"], out=str(tmp_path / "cai"), rounds=2.5)
    with pytest.raises(ConfigError, match=r"^rounds=2\.5: expected an integer$"):
        rl.cai_revise(config)
    with pytest.raises(ConfigError, match=r"^sft_steps=2\.5: expected an integer$"):
        rl.run_pipeline(rl.PipelineConfig(out=str(tmp_path / "pipe"), sft_steps=2.5))
    with pytest.raises(ConfigError, match=r"^max_steps=2\.5: expected an integer$"):
        rl.train_ppo(rl.PPOConfig(out=str(tmp_path / "ppo"), reward_fn=(REWARD,), max_steps=2.5))


# ---- 2. a truncated or corrupt safetensors file: one line naming it ---------------------------------------


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    """Tiny model directories built from configs (no hub), each with the byte tokenizer: the tiny-llama
    preset's, a BERT masked LM, a Llama sequence classifier (num_labels=1) and a copy of the first whose
    weights are cut short."""
    from transformers import BertConfig, BertForMaskedLM, LlamaConfig, LlamaForSequenceClassification

    from rlhf_engine.model.loading import build_preset
    from rlhf_engine.model.tokenizers import TOKENIZERS

    root = tmp_path_factory.mktemp("models")
    dirs = {name: str(root / name) for name in ("llama", "bert", "classifier", "truncated")}
    build_preset("tiny-llama", 0, dirs["llama"])
    tok = TOKENIZERS["byte"]()
    bert = BertForMaskedLM(BertConfig(vocab_size=259, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                      intermediate_size=64, pad_token_id=tok.pad_token_id))  # fmt: skip
    classifier = LlamaForSequenceClassification(LlamaConfig(
        vocab_size=259, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1, num_labels=1, pad_token_id=tok.pad_token_id))  # fmt: skip
    for name, model in (("bert", bert), ("classifier", classifier)):
        model.save_pretrained(dirs[name])
        tok.save_pretrained(dirs[name])
    shutil.copytree(dirs["llama"], dirs["truncated"])
    weights = os.path.join(dirs["truncated"], "model.safetensors")
    with open(weights, "r+b") as f:
        f.truncate(os.path.getsize(weights) // 2)
    return dirs


def truncate(path, keep=0.5):
    with open(path, "r+b") as f:
        f.truncate(int(os.path.getsize(path) * keep))
    return path


@pytest.mark.parametrize("stage", WITH_MODEL)
def test_a_truncated_model_directory_is_one_line_naming_the_file(tmp_path, capsys, model_dirs, stage):
    err = fails_with(stage_args(stage, tmp_path) + ["--model", model_dirs["truncated"]], capsys)
    weights = os.path.join(model_dirs["truncated"], "model.safetensors")
    assert err.startswith(f"error: {weights}: truncated or corrupt safetensors file ("), err


@pytest.mark.parametrize("stage", WITH_INIT)
@pytest.mark.parametrize("keep", [0.5, 0.0005])  # the tensors cut short; the header itself cut short
def test_a_truncated_init_adapter_is_one_line_naming_the_file(tmp_path, capsys, stage, keep):
    adapter = fake_stack(tmp_path / "sft", tensors={"w": torch.zeros(4096)})
    weights = truncate(os.path.join(adapter, "adapter_policy.safetensors"), keep)
    err = fails_with(stage_args(stage, tmp_path) + ["--model", "tiny-llama", "--init-adapter", adapter], capsys)
    assert err.startswith(f"error: {weights}: truncated or corrupt safetensors file ("), err


@pytest.mark.parametrize("stage, file", [("ppo", "adapter_reward.safetensors"), ("grpo", "heads.safetensors"),
                                         ("eval", "adapter_reward.safetensors"), ("eval", "heads.safetensors")])
def test_a_truncated_reward_model_is_one_line_naming_the_file(tmp_path, capsys, stage, file):
    rm_dir = fake_stack(tmp_path / "rm", roles=("reward",), tensors={"w": torch.zeros(4096)})
    weights = truncate(os.path.join(rm_dir, file))
    args = stage_args(stage, tmp_path) + ["--reward-model", rm_dir]
    err = fails_with(args + (["--model", "tiny-llama"] if stage != "eval" else []), capsys)
    assert err.startswith(f"error: {weights}: truncated or corrupt safetensors file ("), err


def test_a_truncated_policy_for_eval_and_for_the_python_api(tmp_path, capsys, model_dirs):
    policy = fake_stack(tmp_path / "ppo", tensors={"w": torch.zeros(4096)})
    weights = truncate(os.path.join(policy, "adapter_policy.safetensors"))
    err = fails_with(["eval", "--policy", policy, "--reward-fn", REWARD, "--no-progress"], capsys)
    assert err.startswith(f"error: {weights}: truncated or corrupt safetensors file ("), err
    with pytest.raises(ConfigError, match="truncated or corrupt safetensors file"):
        rl.ModelStack.build(rl.StackConfig(model=model_dirs["truncated"]))


def test_a_corrupt_resume_checkpoint_is_one_line(tmp_path, capsys, finished_rm):
    # torch.load reads a zip member whose bytes were flipped without noticing (no CRC check): the weights
    # would resume silently wrong
    args, out = copy_run(finished_rm, tmp_path)
    checkpoint = out / "checkpoint.pt"
    with zipfile.ZipFile(checkpoint) as z:
        member = max(z.infolist(), key=lambda i: i.file_size)  # the largest tensor's storage
    with open(checkpoint, "r+b") as f:
        f.seek(member.header_offset + 26)  # the local header: name and extra-field lengths, then the data
        n, m = int.from_bytes(f.read(2), "little"), int.from_bytes(f.read(2), "little")
        f.seek(member.header_offset + 30 + n + m + member.file_size // 2)
        byte = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte[0] ^ 0xFF]))
    err = fails_with(args + ["--max-steps", "3"], capsys)
    assert err == (f"error: {checkpoint}: corrupt checkpoint ({member.filename} fails its CRC check); delete it "
                   "or rerun with --no-resume"), err  # fmt: skip


# ---- 3. a model directory that is not a causal LM: one line naming what it holds ----------------------------


@pytest.mark.parametrize("quantization", ["nf4", "none"])
@pytest.mark.parametrize("stage", WITH_MODEL)
def test_a_bert_model_directory_is_one_line(tmp_path, capsys, model_dirs, stage, quantization):
    args = stage_args(stage, tmp_path) + ["--model", model_dirs["bert"], "--quantization", quantization]
    err = fails_with(args, capsys)
    assert err.startswith(f"error: model {model_dirs['bert']!r} holds BertForMaskedLM (config.json); this role "
                          "needs a causal language model (...ForCausalLM)"), err  # fmt: skip


@pytest.mark.parametrize("stage", [s for s in WITH_MODEL if s != "rm"])
def test_a_sequence_classifier_is_no_policy(tmp_path, capsys, model_dirs, stage):
    err = fails_with(stage_args(stage, tmp_path) + ["--model", model_dirs["classifier"]], capsys)
    assert err.startswith(f"error: model {model_dirs['classifier']!r} holds LlamaForSequenceClassification "
                          "(config.json); this role needs a causal language model"), err  # fmt: skip
    assert "--reward-classifier" in err


def test_the_rm_stage_still_trains_a_classifier_directory(tmp_path, capsys, model_dirs):
    out = tmp_path / "rm"
    args = stage_args("rm", tmp_path, out) + ["--model", model_dirs["classifier"], "--max-steps", "1"]
    assert main(args) == 0, capsys.readouterr().err
    assert (out / "classifier" / "model.safetensors").is_file()
    mode = os.stat(out / "classifier" / "model.safetensors").st_mode & 0o777
    assert mode == 0o666 & ~current_umask()  # the usual mode, not safetensors' 0600
    assert not [n for n in os.listdir(out) if n.endswith(".tmp")]


@pytest.mark.parametrize("stage", ["ppo", "grpo", "eval"])
def test_a_causal_lm_is_no_reward_classifier(tmp_path, capsys, model_dirs, stage):
    err = fails_with(stage_args(stage, tmp_path) + ["--reward-classifier", model_dirs["llama"]], capsys)
    assert err.startswith(f"error: reward_classifier {model_dirs['llama']!r} holds LlamaForCausalLM (config.json); "
                          "this role needs a sequence classifier"), err  # fmt: skip


def current_umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


# ---- 5. an OUT that cannot be written: one line before any work ---------------------------------------------


def unwritable_outs(tmp_path) -> list[str]:
    """Directories no run can write: one that cannot be created (under /proc), an existing one that takes
    no file (/sys: sysfs, even for root), and, when not root (root ignores modes), a read-only one."""
    outs = ["/proc/rlhf-engine-out", "/sys"]
    if os.geteuid() != 0:
        ro = tmp_path / "read-only"
        ro.mkdir()
        (ro / "run.lock").write_text("")  # the lock file alone would open: only a new file finds out
        ro.chmod(0o555)
        outs.append(str(ro))
    return outs


@pytest.mark.parametrize("stage", STAGES)
def test_an_unwritable_out_is_one_line_before_any_work(tmp_path, capsys, stage, monkeypatch):
    import rlhf_engine.model.stack

    def no_model(*args, **kwargs):
        raise AssertionError("a model was loaded before OUT was checked")

    monkeypatch.setattr(rlhf_engine.model.stack, "load_causal_lm", no_model)  # the name ModelStack.build calls
    args = stage_args(stage, tmp_path)  # eval: its policy directory must exist, in a writable place
    for out in unwritable_outs(tmp_path):
        target = os.path.join(out, "eval.json") if stage == "eval" else out
        err = fails_with([a if a != args[args.index("--out") + 1] else target for a in args], capsys)
        assert err.startswith(f"error: out {out!r}: ") and ("cannot write there" in err or "cannot create" in err), err


# ---- 7. an explicit `none` on the command line overrides the preset and the config file ---------------------

NONE_CASES = [  # stage, config file data, flags, where in OUT/config.json's config the value must be None
    ("sft", {}, ["--quantization", "none"], ("stack", "quantization")),
    ("sft", {"max_steps": 3}, ["--max-steps", "none"], ("max_steps",)),
    ("rm", {"max_steps": 3, "stack": {"quantization": "nf4"}}, ["--max-steps", "none", "--quantization", "none"],
     ("stack", "quantization")),
    ("dpo", {"max_steps": 3}, ["--max-steps", "none"], ("max_steps",)),
    ("ppo", {"reward_threshold": 0.5}, ["--reward-threshold", "none"], ("reward_threshold",)),
    ("ppo", {"missing_eos_penalty": -1.0}, ["--missing-eos-penalty", "null"], ("missing_eos_penalty",)),
    ("grpo", {"kl_coef": 0.1, "reward_clip": 1.0}, ["--kl-coef", "none", "--reward-clip", "none"], ("kl_coef",)),
    ("revise", {}, ["--quantization", "none"], ("stack", "quantization")),
    ("label", {"stack": {"quantization": "nf4"}}, ["--quantization", "None"], ("stack", "quantization")),
]  # fmt: skip


@pytest.mark.parametrize("stage, data, flags, key", NONE_CASES, ids=[f"{c[0]}-{c[2][0]}" for c in NONE_CASES])
def test_an_explicit_none_flag_reaches_out_config_json(tmp_path, capsys, monkeypatch, stage, data, flags, key):
    saved = run_until_model_load(tmp_path, capsys, monkeypatch, stage_args(stage, tmp_path), data, flags)
    value = saved["config"]
    for k in key:
        value = value[k]
    assert value is None, saved["config"]


def test_an_explicit_none_reaches_every_pipeline_stage(tmp_path, capsys, monkeypatch):
    run_until_model_load(tmp_path, capsys, monkeypatch, stage_args("pipeline", tmp_path), {}, ["--quantization", "none"])
    with open(tmp_path / "out" / "sft" / "config.json") as f:
        assert json.load(f)["config"]["stack"]["quantization"] is None


def run_until_model_load(tmp_path, capsys, monkeypatch, args, data, flags) -> dict:
    """Run the command until its first model load (OUT/config.json is written when the run opens, before
    it), stop it there (a KeyboardInterrupt: exit 130) and return OUT/config.json."""
    import rlhf_engine.model.stack

    def interrupt(*a, **kw):
        raise KeyboardInterrupt

    monkeypatch.setattr(rlhf_engine.model.stack, "load_causal_lm", interrupt)  # the name ModelStack.build calls
    config = tmp_path / "config.json"
    config.write_text(json.dumps(data))
    assert main(args + ["--config", str(config)] + flags) == 130, capsys.readouterr().err
    path = tmp_path / "out" / "config.json"
    if not path.is_file():
        return {}
    with open(path) as f:
        return json.load(f)


# ---- 9. a refused rerun leaves OUT as it was -----------------------------------------------------------------


def snapshot(out) -> dict:
    """name -> (bytes, mtime) of every file in OUT but the lock."""
    return {n: ((out / n).read_bytes(), os.stat(out / n).st_mtime_ns) for n in sorted(os.listdir(out))
            if (out / n).is_file() and n != "run.lock"}  # fmt: skip


@pytest.fixture(scope="module")
def finished_rm(tmp_path_factory):
    """A finished 2-step rm run (args, OUT) that tests copy before they change anything."""
    root = tmp_path_factory.mktemp("finished")
    out = root / "rm"
    args = stage_args("rm", root, out) + ["--max-steps", "2", "--checkpoint-every", "1", "--eval-fraction", "0.25"]
    assert main(args) == 0
    return args, out


def copy_run(finished, tmp_path):
    args, out = finished
    shutil.copytree(out, tmp_path / "rm")
    return [str(tmp_path / "rm") if a == str(out) else a for a in args], tmp_path / "rm"


@pytest.mark.parametrize("change, refusal", [
    (["--lr", "0.5"], "written with a different config (lr 0.003 -> 0.5)"),
    (["--data", "CHANGED"], "data file"),
])  # fmt: skip
def test_a_refused_rerun_of_a_finished_run_leaves_out_untouched(tmp_path, capsys, finished_rm, change, refusal):
    args, out = copy_run(finished_rm, tmp_path)
    if change[-1] == "CHANGED":
        changed = tmp_path / "feedback.jsonl"
        changed.write_text(open(EXAMPLES).read().replace("Gracias", "Muchas gracias"))
        args, change = [str(changed) if a == EXAMPLES else a for a in args], []
    before = snapshot(out)
    assert {"result.json", "metrics.jsonl", "config.json", "checkpoint.pt", "adapter_reward.safetensors"} <= set(before)
    err = fails_with(args + change, capsys)
    assert refusal in err and "use another --out or --no-resume" in err, err
    assert snapshot(out) == before


# ---- 10. final adapters, heads and stack.json: atomic, with the usual mode ------------------------------------


def test_the_final_save_is_atomic_with_the_usual_mode(tmp_path, monkeypatch):
    from rlhf_engine.core import files
    from rlhf_engine.model.stack import build_policy_stack

    stack = rl.ModelStack.build(rl.StackConfig(model="tiny-llama", adapters=("policy", "reward")))
    out = tmp_path / "saved"
    written = stack.save(str(out))
    assert sorted(os.path.basename(p) for p in written) == ["adapter_policy.safetensors",
                                                            "adapter_reward.safetensors", "heads.safetensors",
                                                            "stack.json"]  # fmt: skip
    for path in written:
        assert os.stat(path).st_mode & 0o777 == 0o666 & ~current_umask(), path
    before = snapshot(out)
    with torch.no_grad():  # the next save has other weights, and the disk fills at its third file
        for p in stack.role_parameters("policy") + stack.role_parameters("reward"):
            p.add_(1.0)
    real, calls = files._write_temp, []

    def fill_up(path, write):
        calls.append(path)
        if len(calls) == 3:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(path, write)

    monkeypatch.setattr(files, "_write_temp", fill_up)
    with pytest.raises(OSError, match="No space left"):
        stack.save(str(out))
    assert snapshot(out) == before and sorted(os.listdir(out)) == sorted(before)  # no temp file left either
    monkeypatch.setattr(files, "_write_temp", real)
    stack.save(str(out))
    reloaded = build_policy_stack(rl.StackConfig(model="tiny-llama"), str(out))
    for (name, p), q in zip(stack.named_role_parameters("policy"), reloaded.role_parameters("policy")):
        assert torch.equal(p, q), name


# ---- 4. the disk filling during a checkpoint or a metrics write ------------------------------------------------

ENOSPC = OSError(errno.ENOSPC, "No space left on device")
RM_STEPS = ["--max-steps", "4", "--checkpoint-every", "2", "--eval-every", "2", "--eval-fraction", "0.25"]


@pytest.fixture(scope="module")
def uninterrupted_rm(tmp_path_factory):
    """The reference: the 4-step rm run without a full disk (its metrics rows and weights)."""
    root = tmp_path_factory.mktemp("uninterrupted")
    assert main(stage_args("rm", root) + RM_STEPS) == 0
    return untimed(rows(root / "out")), saved(root / "out")


def saved(out) -> dict:
    from util import saved_weights

    return saved_weights(out, ("adapter_reward.safetensors", "heads.safetensors"))


def assert_resumes_exactly(args, out, reference, capsys):
    """The rerun with room on the disk resumes from the step-2 checkpoint and ends where the uninterrupted
    run ended: the same metrics rows and bit-identical weights."""
    assert main(args) == 0, capsys.readouterr().err
    assert json.loads((out / "result.json").read_text())["resumed_from"] == 2
    ref_rows, ref_weights = reference
    assert untimed(rows(out)) == ref_rows
    weights = saved(out)
    assert weights.keys() == ref_weights.keys() and all(torch.equal(weights[k], ref_weights[k]) for k in weights)


def test_a_full_disk_during_a_checkpoint_keeps_the_last_one(tmp_path, capsys, monkeypatch, uninterrupted_rm):
    from rlhf_engine.core import files

    class FullFile:
        """The checkpoint's temp file on a disk that fills after 4 KiB (torch.save turns the OSError of
        its write into a RuntimeError; core.files.save_through must give the OSError back)."""

        def __init__(self, f):
            self.f, self.n = f, 0

        def write(self, data):
            self.n += len(data)
            if self.n > 4096:
                raise ENOSPC
            return self.f.write(data)

        def __getattr__(self, name):
            return getattr(self.f, name)

    real, checkpoints = files._write_temp, []

    def write_temp(path, write):
        if os.path.basename(path) == "checkpoint.pt":
            checkpoints.append(path)
            if len(checkpoints) == 2:  # the step-4 checkpoint
                return real(path, lambda f: write(FullFile(f)))
        return real(path, write)

    monkeypatch.setattr(files, "_write_temp", write_temp)
    out = tmp_path / "out"
    args = stage_args("rm", tmp_path) + RM_STEPS
    err = fails_with(args, capsys, status=4)
    assert err == (f"error: cannot write to {out}: No space left on device; stopped; the last good checkpoint is "
                   f"{out / 'checkpoint.pt'} (step 2); the same command resumes once it can write")  # fmt: skip
    assert len(checkpoints) == 2 and torch.load(out / "checkpoint.pt", weights_only=True)["step"] == 2
    assert not [n for n in os.listdir(out) if n.endswith(".tmp")] and not (out / "result.json").exists()
    monkeypatch.undo()
    assert_resumes_exactly(args, out, uninterrupted_rm, capsys)


def test_a_full_disk_during_a_metrics_write_keeps_the_last_checkpoint(tmp_path, capsys, monkeypatch,
                                                                     uninterrupted_rm):  # fmt: skip
    import rlhf_engine.core.run

    class FullAtStep3:
        """OUT/metrics.jsonl whose write fails once the step-3 row comes (the disk filled after step 2)."""

        def __init__(self, f):
            self.f = f

        def write(self, text):
            if text.startswith('{"step": 3'):
                self.f.write(text[:10])  # a partial row reaches the disk, as a real ENOSPC can leave
                self.f.flush()
                raise ENOSPC
            return self.f.write(text)

        def __getattr__(self, name):
            return getattr(self.f, name)

    def opener(path, *args, **kwargs):
        f = open(path, *args, **kwargs)
        return FullAtStep3(f) if os.path.basename(path) == "metrics.jsonl" else f

    monkeypatch.setattr(rlhf_engine.core.run, "open", opener, raising=False)  # core.run's own `open` only
    out = tmp_path / "out"
    args = stage_args("rm", tmp_path) + RM_STEPS
    err = fails_with(args, capsys, status=4)
    assert err.startswith(f"error: cannot write to {out}: No space left on device; stopped; the last good "
                          f"checkpoint is {out / 'checkpoint.pt'} (step 2)"), err  # fmt: skip
    monkeypatch.undo()
    assert_resumes_exactly(args, out, uninterrupted_rm, capsys)


# ---- 6. a user's reward function that raises or returns what is not one finite number per response -----------

REWARD_FNS = '''
import math

CALLS = []


def raises(prompts, responses):
    return [1.0 / 0 for r in responses]


def nan(prompts, responses):
    return [math.nan] + [0.0] * (len(responses) - 1)


def inf(prompts, responses):
    return [0.0] * (len(responses) - 1) + [math.inf]


def short(prompts, responses):
    return [0.0] * (len(responses) - 1)


def long(prompts, responses):
    return [0.0] * (len(responses) + 1)


def nothing(prompts, responses):
    pass


def text(prompts, responses):
    return "0.5"


def strings(prompts, responses):
    return ["0.5"] * len(responses)


def mapping(prompts, responses):
    return {r: 0.0 for r in responses}


def nan_from_the_second_step(prompts, responses):
    CALLS.append(len(responses))  # call 1: the step-0 evaluation, 2: step 1's rollout, 3: step 2's
    return [math.nan if len(CALLS) >= 3 else 0.5] * len(responses)
'''

REWARD_CASES = [  # function, the error line after "reward function PATH:FUNCTION "
    ("raises", r"raised ZeroDivisionError: float division by zero \(at .*rewards_under_test\.py:\d+\)$"),
    ("nan", r"returned a non-finite score nan for response 0 \(1 of \d+\); a reward must be a finite number$"),
    ("inf", r"returned a non-finite score inf for response \d+ \(1 of \d+\)"),
    ("short", r"returned (\d+) scores for (\d+) responses$"),
    ("long", r"returned (\d+) scores for (\d+) responses$"),
    ("nothing", r"returned None; expected a list of \d+ numbers, one per response$"),
    ("text", r"returned str '0\.5'; expected a list of \d+ numbers, one per response$"),
    ("strings", r"returned str '0\.5' for response 0; expected a number$"),
    ("mapping", r"returned dict \{.*; expected a list of \d+ numbers, one per response$"),
]
PPO_SMALL = ["--max-steps", "2", "--rollout-batch-size", "2", "--minibatch-size", "2", "--micro-batch-size", "2",
             "--max-new-tokens", "4", "--eval-prompts", "2", "--checkpoint-every", "1"]  # fmt: skip


@pytest.mark.parametrize("fn, message", REWARD_CASES, ids=[c[0] for c in REWARD_CASES])
def test_a_bad_reward_function_is_one_line_naming_it(tmp_path, capsys, fn, message):
    import re

    path = tmp_path / "rewards_under_test.py"
    path.write_text(REWARD_FNS)
    spec = f"{path}:{fn}"
    args = [a if a != REWARD else spec for a in stage_args("ppo", tmp_path)] + PPO_SMALL
    err = fails_with(args, capsys)
    assert err.startswith(f"error: reward function {spec} "), err
    m = re.search(message, err[len(f"error: reward function {spec} "):])
    assert m, err
    if fn in ("short", "long"):
        assert int(m.group(1)) == int(m.group(2)) + (1 if fn == "long" else -1)
    out = tmp_path / "out"  # it failed on the step-0 evaluation: no update, no checkpoint, no adapter
    assert not (out / "checkpoint.pt").exists() and not (out / "adapter_policy.safetensors").exists()


def test_a_raise_keeps_the_users_traceback_for_python_callers(tmp_path):
    from rlhf_engine.algos.rewards import FunctionReward
    from rlhf_engine.errors import RewardError

    path = tmp_path / "rewards_under_test.py"
    path.write_text(REWARD_FNS)
    with pytest.raises(RewardError, match="raised ZeroDivisionError") as info:
        FunctionReward(f"{path}:raises").score(["p"], ["r"])
    cause = info.value.__cause__
    assert isinstance(cause, ZeroDivisionError) and cause.__traceback__ is not None
    frames = []
    tb = cause.__traceback__
    while tb is not None:
        frames.append(tb.tb_frame.f_code.co_name)
        tb = tb.tb_next
    assert frames[-1] == "<listcomp>" or frames[-1] == "raises", frames  # the user's own frame is kept


def test_a_nan_reward_never_reaches_an_update(tmp_path, capsys):
    path = tmp_path / "rewards_under_test.py"
    path.write_text(REWARD_FNS)
    spec = f"{path}:nan_from_the_second_step"
    args = [a if a != REWARD else spec for a in stage_args("ppo", tmp_path)] + PPO_SMALL
    err = fails_with(args, capsys)
    assert err.startswith(f"error: reward function {spec} returned a non-finite score nan for response 0"), err
    out = tmp_path / "out"
    checkpoint = torch.load(out / "checkpoint.pt", weights_only=True)
    assert checkpoint["step"] == 1  # step 1 trained on finite rewards; step 2 stopped before its update
    assert all(torch.isfinite(t).all() for t in checkpoint["state"]["weights"].values())
    assert [r["step"] for r in rows(out)] == [0, 1]


# ---- 8. a resume checks every input the stage reads ----------------------------------------------------------


@pytest.fixture(scope="module")
def trained_sft(tmp_path_factory):
    root = tmp_path_factory.mktemp("sft")
    assert main(stage_args("sft", root) + ["--max-steps", "1"]) == 0
    return root / "out"


def perturb(path):
    """Other weights in the same safetensors file (what a longer upstream run leaves)."""
    from safetensors.torch import load_file

    save_file({k: v + 1 for k, v in load_file(path).items()}, path)


def append(text):
    def change(path):
        with open(path, "a") as f:
            f.write(text)

    return change


def constitution_copy(tmp_path):
    from rlhf_engine.datasets.constitution import DEFAULT_CONSTITUTION

    return str(shutil.copy(DEFAULT_CONSTITUTION, tmp_path / "constitution.jsonl"))


def template_copy(tmp_path):
    from rlhf_engine.datasets.constitution import DEFAULT_TEMPLATES

    return str(shutil.copy(DEFAULT_TEMPLATES["judge"], tmp_path / "judge.txt"))


def edit_principle(path):
    text = open(path).read()
    with open(path, "w") as f:
        f.write(text.replace("harmful", "hurtful", 1))


CAI_SMALL = ["--max-prompts", "2", "--batch-size", "2", "--max-new-tokens", "2"]
INPUT_CASES = {  # stage -> (flags(tmp_path, fixtures) -> (flags, the changed file), how it changes, its label)
    "ppo-init_adapter": ("ppo", lambda t, f: (["--init-adapter", f["sft"]], os.path.join(f["sft"], "adapter_policy.safetensors")),
                         perturb, "init_adapter/adapter_policy.safetensors"),
    "ppo-reward_model": ("ppo", lambda t, f: (["--reward-model", f["rm"]], os.path.join(f["rm"], "heads.safetensors")),
                         perturb, "reward_model/heads.safetensors"),
    "ppo-reward_fn": ("ppo", lambda t, f: (["--reward-fn", f["fn"]], f["fn"].split(":")[0]), append("\n# edited\n"),
                      "reward_fn[0]"),
    "grpo-reward_classifier": ("grpo", lambda t, f: (["--reward-classifier", f["classifier"]],
                                                     os.path.join(f["classifier"], "model.safetensors")),
                               perturb, "reward_classifier/model.safetensors"),
    "dpo-init_adapter": ("dpo", lambda t, f: (["--init-adapter", f["sft"]], os.path.join(f["sft"], "adapter_policy.safetensors")),
                         perturb, "init_adapter/adapter_policy.safetensors"),
    "revise-constitution": ("revise", lambda t, f: (["--constitution", constitution_copy(t)] + CAI_SMALL,
                                                    str(t / "constitution.jsonl")), edit_principle, "constitution"),
    "label-judge_template": ("label", lambda t, f: (["--judge-template", template_copy(t)] + CAI_SMALL,
                                                    str(t / "judge.txt")), append("\n"), "judge_template"),
    # no --constitution: the shipped one (here a copy the test may edit, as a package upgrade would)
    "revise-shipped_constitution": ("revise", lambda t, f: (CAI_SMALL, str(t / "constitution.jsonl")),
                                    edit_principle, "constitution"),
}  # fmt: skip


@pytest.mark.parametrize("case", INPUT_CASES)
def test_a_resume_refuses_any_changed_input(tmp_path, capsys, monkeypatch, case, trained_sft, finished_rm,
                                            model_dirs):  # fmt: skip
    stage, flags, change, label = INPUT_CASES[case]
    if case == "revise-shipped_constitution":
        import rlhf_engine.datasets.constitution
        import rlhf_engine.stages.cai_config

        shipped = constitution_copy(tmp_path)
        monkeypatch.setattr(rlhf_engine.datasets.constitution, "DEFAULT_CONSTITUTION", shipped)
        monkeypatch.setattr(rlhf_engine.stages.cai_config, "DEFAULT_CONSTITUTION", shipped)
    fixtures = {"sft": str(shutil.copytree(trained_sft, tmp_path / "sft")),
                "rm": str(shutil.copytree(finished_rm[1], tmp_path / "rm")),
                "classifier": str(shutil.copytree(model_dirs["classifier"], tmp_path / "classifier")),
                "fn": str(shutil.copy(REWARD.split(":")[0], tmp_path / "fns.py")) + ":lowercase_share"}  # fmt: skip
    extra, changed = flags(tmp_path, fixtures)
    small = {"ppo": PPO_SMALL, "grpo": PPO_SMALL, "dpo": ["--max-steps", "2", "--checkpoint-every", "1"]}.get(stage, [])
    args = stage_args(stage, tmp_path) + extra + small
    if stage in ("ppo", "grpo", "dpo"):
        args += ["--model", "tiny-llama"]
    first = [a if a != "2" or args[i - 1] != "--max-steps" else "1" for i, a in enumerate(args)]
    assert main(first) == 0, capsys.readouterr().err
    capsys.readouterr()
    change(changed)
    err = fails_with(args, capsys)
    assert f": {label} file {changed!r} changed since the checkpoint" in err, err


# ---- 13. the README's Python API block runs as written from any directory -------------------------------------


def readme_python_api_block() -> str:
    text = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
    section = text.split("## Python API", 1)[1]
    return section.split("```python\n", 1)[1].split("```", 1)[0]


def test_the_readme_python_api_block_runs_from_another_directory(tmp_path, monkeypatch, capsys):
    block = readme_python_api_block()
    lines = block.splitlines()
    assert lines[-1].startswith("rl.run_pipeline(")  # the quick pipeline is test_pipeline.py's
    outs = [line.split('out="', 1)[1].split('"', 1)[0] for line in lines if 'out="' in line]
    assert len(outs) == len(set(outs)) == 7 and all(o.startswith("runs/api/") for o in outs)  # one OUT per run
    monkeypatch.chdir(tmp_path)  # not the checkout: nothing may be read relative to it
    namespace = {}
    exec(compile("\n".join(lines[:-1]), "README.md (Python API)", "exec"), namespace)
    assert namespace["report"]["after"] and "base" in namespace["stack"].memory_report()
    assert (tmp_path / "runs" / "api" / "eval.json").is_file()
