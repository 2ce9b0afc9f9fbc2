"""lm-evaluation-harness task configs shipped with t2r (pass this folder as lm-eval's include_path)."""
