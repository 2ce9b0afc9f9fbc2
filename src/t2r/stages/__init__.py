"""Training stages built on `t2r.train`: attention transfer (distill.py), finetuning (finetune.py), and the pipeline
that runs them from one recipe (pipeline.py)."""
