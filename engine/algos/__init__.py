"""The RL and preference math between the model and the optimizer: losses (reward model, SFT, the DPO
family, the clipped PPO objective), advantage estimators chosen by name from one registry (gae, grpo,
drgrpo, rloo), KL control and per-token rewards, reward sources and their shaping, and the rollout
container every RL stage fills step by step.

Imports core/, model/, datasets/ and errors; never stages/ or pipeline/. `choices.py` (the names of
every choice) is pure Python: configs import it.
"""
