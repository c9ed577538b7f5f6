"""``speccascade bench``: decode speed against the peers, side by side in one run.

On one pair, the same prompts, block size gamma and greedy decoding, it measures tokens per
second of (a) the target alone with transformers' ``generate``, (b) transformers' assisted
generation with the same drafter as a standalone model (``num_assistant_tokens = gamma``, constant
schedule, no confidence early stop), and for reference with its defaults (up to 20 drafts, stopped
early where the drafter's confidence falls below 0.4), (c) speccascade's target alone and drafter
alone, (d) exact speculative decoding, (e) speculative cascades under OPT and TokenV3 at one alpha
(or the rules asked for), with ``--draft-stop`` also exact decoding whose blocks end where the
drafter is unsure, and (f) exact speculative decoding at each batch size; ``--no-transformers``
leaves out (a) and (b); (f) above batch 1 refills finished rows from the chunk's waiting prompts
(continuous batching). Configurations take turns on each chunk of prompts (``--chunk``, default one largest batch) in
``repeats`` rounds after a warm-up and are reported as medians, so machine noise hits them alike; a batch-1 configuration's speed-up carries a 95% bootstrap interval over
prompts (paired with the target alone, and for the cascades with exact decoding).

Derived numbers (docs/algorithms.md section 7): the cost ratio ``c`` = drafter step / target step
(single cached forwards, timed interleaved), per-token acceptance ``a``, the ideal speed-up
``(1 - a^(gamma+1)) / ((1 - a)(gamma c + 1))`` and efficiency = measured / ideal speed-up, and the
share of decode wall time spent outside the two models' forward passes, with each decoder step's
time split into drafter forwards, target forward and the rest (one extra timed run per
configuration, transformers' included, both models' forwards timed).
"""

from .command import bench
from .report import ideal_speedup, markdown

__all__ = ["bench", "ideal_speedup", "markdown"]
