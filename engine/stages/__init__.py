"""The stages, one `<stage>_config.py` (pure Python: the config, its presets, its command line) beside
one `<stage>.py` (the trainer: numbered steps over core / model / datasets / algos): rm, sft, dpo, ppo
(+ grpo / drgrpo / rloo), eval, cai (revise, label).

A stage imports core/, model/, datasets/ and algos/, never another stage (configs may share a base:
supervised_config.py for sft and dpo).
"""
