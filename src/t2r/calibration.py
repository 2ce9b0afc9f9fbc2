"""A short built-in English text that `t2r.quantize` runs through a model to find its activation outliers (which
input channels of each linear layer carry values far larger than the rest) when no calibration data is given.

Outlier channels are a property of the model, not of the text: they appear on ordinary prose, in every position.
The text mixes narrative, dialogue, numbers, a list and a little code so that most kinds of tokens pass through.
It was written for t2r.
"""

from __future__ import annotations

import torch

CALIBRATION_TEXT = """\
The morning train to the coast was late again, and the platform filled slowly with people who had long since stopped
complaining about it. A woman in a green coat read the timetable twice, as if the numbers might change if she looked
away. "It says 7:42," she told the man beside her, "but it said that yesterday too, and the train came at eight."

He laughed and folded his newspaper. The headline was about the harbour: after three years of work, the new bridge
would open on Friday, 14 June, carrying about 12,000 cars a day. Nobody on the platform believed the date.

Notes for the meeting:
1. Compare the costs of the two designs (steel: 4.1 million; concrete: 3.6 million).
2. Ask whether the river can still be used by small boats during construction.
3. Agree on who writes the summary, and send it before Monday.

def average(values):
    total = sum(values)
    return total / len(values) if values else 0.0

When the train finally arrived, the carriages were warm and quiet. Outside, fields gave way to small towns, then to
grey water and a line of white houses along the shore. Someone asked the conductor how long the journey would take;
he shrugged, smiled, and said that it depended on the weather, the signals, and a good deal of luck.
"""


def calibration_ids(tokenizer, max_tokens: int = 512) -> torch.Tensor:
    """The built-in text as a (1, T) tensor of token ids for `tokenizer`, at most `max_tokens` long."""
    ids = tokenizer(CALIBRATION_TEXT, return_tensors="pt")["input_ids"]
    return ids[:, :max_tokens]
