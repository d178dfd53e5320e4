"""The banded log-probability matrix of a run and the window dissimilarities it yields.

Sample sets are indexed by probe index j; ``logp[(j, k)]`` holds log-probs of probe j's
samples under checkpoint k. Window dissimilarity D(t_i) for window w needs
|j - k| < 2w for every pair involved, so only a band of the matrix is ever kept.
Pure numpy: no torch, no I/O.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .divergence import DissimilarityResult, combine_prompts, one_sided_tv, window_dissimilarity

__all__ = ["ProbeHistory", "WindowResult"]


@dataclass
class WindowResult:
    """D(t_i) for one measure: combined over prompts plus the per-prompt results."""

    probe_index: int  # i: the last probe of the left window
    measure: str
    combined: DissimilarityResult
    per_prompt: dict[str, DissimilarityResult]
    left: tuple[int, ...]
    right: tuple[int, ...]


@dataclass
class ProbeHistory:
    """Samples' prompt labels and cross log-probs for the probes still inside the band."""

    window: int = 1
    # probe index -> array of prompt ids (one per sample, in the probe's sample order)
    prompt_ids: dict[int, np.ndarray] = field(default_factory=dict)
    logp: dict[tuple[int, int], np.ndarray] = field(default_factory=dict)

    @property
    def band(self) -> int:
        return 2 * self.window - 1

    def add_samples(self, probe_index: int, prompt_ids: np.ndarray) -> None:
        self.prompt_ids[probe_index] = np.asarray(prompt_ids)

    def add_logp(self, sample_probe: int, checkpoint_probe: int, values: np.ndarray) -> None:
        values = np.asarray(values, dtype=float)
        if len(values) != len(self.prompt_ids[sample_probe]):
            raise ValueError("log-prob vector does not match the probe's samples")
        self.logp[(sample_probe, checkpoint_probe)] = values

    def prune(self, current: int) -> None:
        """Forget what no future window can use."""
        oldest_needed = current - 2 * self.window + 1
        for j in [j for j in self.prompt_ids if j < oldest_needed]:
            del self.prompt_ids[j]
        for key in [key for key in self.logp if key[0] < oldest_needed or key[1] < oldest_needed]:
            del self.logp[key]

    def windows_for(self, i: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
        w = self.window
        return tuple(range(i - w + 1, i + 1)), tuple(range(i + 1, i + w + 1))

    def computable(self, i: int, two_sided: bool) -> bool:
        left, right = self.windows_for(i)
        if left[0] < 0:
            return False
        samples = left + right if two_sided else left
        return all((j, k) in self.logp for j in samples for k in left + right)

    def _matrix(self, samples: tuple[int, ...], checkpoints: tuple[int, ...], mask_of: dict[int, np.ndarray]) -> np.ndarray:
        """(n, len(checkpoints)) log-probs of the selected samples of ``samples`` probes."""
        blocks = []
        for j in samples:
            cols = [self.logp[(j, k)][mask_of[j]] for k in checkpoints]
            blocks.append(np.stack(cols, axis=1))
        return np.concatenate(blocks, axis=0)

    def window_dissimilarity(self, i: int, measure: str, two_sided: bool = True) -> WindowResult:
        """D(t_i): per prompt, left-window mixture vs right-window mixture, then averaged."""
        left, right = self.windows_for(i)
        prompts = [p for p in dict.fromkeys(self.prompt_ids[left[0]].tolist())]
        per_prompt: dict[str, DissimilarityResult] = {}
        for pid in prompts:
            masks = {j: self.prompt_ids[j] == pid for j in left + right}
            left_on_left = self._matrix(left, left, masks)
            right_on_left = self._matrix(left, right, masks)
            if two_sided:
                left_on_right = self._matrix(right, left, masks)
                right_on_right = self._matrix(right, right, masks)
                per_prompt[pid] = window_dissimilarity(left_on_left, right_on_left, left_on_right, right_on_right, measure)
            else:
                if measure != "tv" or self.window != 1:
                    raise ValueError("the one-sided estimator exists for TV with window 1 only")
                per_prompt[pid] = one_sided_tv(left_on_left[:, 0], right_on_left[:, 0])
        return WindowResult(i, measure, combine_prompts(list(per_prompt.values())), per_prompt, left, right)
