"""The pruning methods by name: which sampler each uses on which score, and the seeds allowed.

Pure: no Ray or Zarr, so settings can be checked before any work starts.
"""

from __future__ import annotations

from dataclasses import dataclass

from streamprune.errors import SettingsError
from streamprune.scoring.scores import SCORES

METHOD_SCORE = {
    "dual-beta": "dual",
    "dual": "dual",
    "dyn-unc": "dyn_unc",
    "el2n": "el2n",
    "forgetting": "forgetting",
    "entropy": "entropy",
    "aum": "aum",
    "random": None,
}
LOWER_IS_HARDER = {"aum"}
SEED_LIMIT = 1 << 63  # seeds are hashed modulo 2^64: [0, 2^63) keeps every seed distinct and non-negative


@dataclass(frozen=True)
class Method:
    """A parsed method name: the sampler and the score it works on."""

    name: str
    sampler: str  # topk | beta | ccs | random
    score: str | None

    @classmethod
    def parse(cls, text: str) -> Method:
        if not isinstance(text, str):
            raise SettingsError(f"method must be a name such as 'dual-beta', not {text!r}")
        if text.startswith("ccs:"):
            score = text[4:].replace("-", "_")
            if score not in SCORES or score == "mean_p":
                raise SettingsError(
                    f"method {text!r}: CCS needs a score among {[s.replace('_', '-') for s in SCORES if s != 'mean_p']}"
                )
            return cls(text, "ccs", score)
        if text not in METHOD_SCORE:
            raise SettingsError(f"unknown method {text!r}: choose one of {sorted(METHOD_SCORE)} or ccs:SCORE")
        sampler = {"dual-beta": "beta", "random": "random"}.get(text, "topk")
        return cls(text, sampler, METHOD_SCORE[text])
