"""lm-evaluation-harness task configs shipped with t2r (pass this folder as lm-eval's include_path), and the names
`t2r lm-eval` shows in its help (here, not in `t2r.lm_eval_bridge`, so that the help does not import transformers)."""

from pathlib import Path

TASKS_DIR = Path(__file__).parent
TEXT_TASK = "t2r_text"
AUSTEN_BLOCKS = 16  # held-out blocks of 512 tokens in the default text: about 8k tokens
