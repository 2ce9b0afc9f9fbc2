"""Functions the `t2r_text` task YAML names (lm-eval loads this file by path, next to the YAML)."""

from t2r.lm_eval_bridge import doc_to_target, load_dataset  # noqa: F401
