"""The main job (`python -m engine pipeline`, `make run`): every stage wired in order on one base
(pipeline.py), its config (pipeline_config.py), the embedded world with its hidden score and simulated
labelers (world.py), and the report (report.py).

Imports the stages and everything below them; nothing imports the pipeline except the CLI.
"""
