"""Speculative-decoding statistics under the names dashboards already use (vLLM-style).

Both sides count rounds the same way, so the device's summary and the edge's Done
message can be read side by side.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class RoundStats:
    rounds: int = 0  # spec_decode_num_drafts
    draft_tokens: int = 0  # spec_decode_num_draft_tokens
    accepted_tokens: int = 0  # spec_decode_num_accepted_tokens
    accepted_per_position: list[int] = field(default_factory=list)  # ..._per_pos
    drafted_per_position: list[int] = field(default_factory=list)
    round_s: float = 0.0
    prefill_s: float = 0.0
    more_requests: int = 0  # candidate downlinks that needed a second trip

    def record_round(self, gamma: int, n_accepted: int, seconds: float) -> None:
        self.rounds += 1
        self.draft_tokens += gamma
        self.accepted_tokens += n_accepted
        while len(self.drafted_per_position) < gamma:
            self.drafted_per_position.append(0)
            self.accepted_per_position.append(0)
        for i in range(gamma):
            self.drafted_per_position[i] += 1
            if i < n_accepted:
                self.accepted_per_position[i] += 1
        self.round_s += seconds

    @property
    def acceptance_rate(self) -> float:
        return self.accepted_tokens / self.draft_tokens if self.draft_tokens else 0.0

    @property
    def mean_accepted_length(self) -> float:
        """Tokens committed per round, the bonus/correction included."""
        return (self.accepted_tokens + self.rounds) / self.rounds if self.rounds else 0.0

    def acceptance_per_position(self) -> list[float]:
        return [a / d for a, d in zip(self.accepted_per_position, self.drafted_per_position)]

    def as_dict(self) -> dict[str, Any]:
        return {
            "spec_decode_num_drafts": self.rounds,
            "spec_decode_num_draft_tokens": self.draft_tokens,
            "spec_decode_num_accepted_tokens": self.accepted_tokens,
            "spec_decode_num_accepted_tokens_per_pos": list(self.accepted_per_position),
            "acceptance_rate": round(self.acceptance_rate, 4),
            "mean_accepted_length": round(self.mean_accepted_length, 4),
            "round_s": round(self.round_s, 6),
            "prefill_s": round(self.prefill_s, 6),
            "more_requests": self.more_requests,
        }
