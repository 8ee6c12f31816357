"""vLLM benchmark datasets: ``random`` lengths and ShareGPT JSON conversations.

Both follow ``vllm bench serve`` as vllm-project/vllm defines them in
``vllm/benchmarks/datasets.py`` (commit 0056b87f, vLLM >= 0.13; the same rules as
``benchmarks/benchmark_serving.py`` before the benchmark moved into the package), drawn with the
same generators, so the same ``--seed`` picks the same lengths or conversations.

* ``random:INPUT:OUTPUT[:RATIO]`` is ``--dataset-name random --random-input-len INPUT
  --random-output-len OUTPUT --random-range-ratio RATIO`` (RATIO in [0, 1), default 0: every
  request exactly INPUT / OUTPUT). Prompt lengths are uniform integers in
  ``[floor(INPUT*(1-RATIO)), ceil(INPUT*(1+RATIO))]``, output lengths in
  ``[max(1, floor(OUTPUT*(1-RATIO))), max(1, ceil(OUTPUT*(1+RATIO)))]``, drawn as vLLM's
  ``RandomDataset.get_sampling_params`` draws them: ``numpy.random.default_rng(seed).integers``,
  all prompt lengths then all output lengths. With ``num_requests`` = ``--num-prompts`` they are
  vLLM's lengths for that seed whenever the tokenizer adds no special tokens (Qwen's); vLLM first
  subtracts ``num_special_tokens_to_add()`` from INPUT (1 for Llama's BOS).
* ``random-legacy:INPUT:OUTPUT:RATIO`` is the same flags read by the older
  ``benchmarks/benchmark_serving.py`` (vLLM before the benchmark moved into the package) and by
  the copies public serving benchmarks still run (InferenceX's ``utils/bench_serving``, forked
  from ``kimbochen/bench_serving``): lengths uniform integers in ``[int(INPUT*RATIO), INPUT]`` and
  ``[int(OUTPUT*RATIO), OUTPUT]`` (RATIO in (0, 1]; 1: fixed lengths; a low end of 0 is refused),
  drawn with numpy's legacy
  ``np.random.seed(seed); np.random.randint``, all prompt lengths then all output lengths.
* A ShareGPT JSON file (``ShareGPT_V3_unfiltered_cleaned_split.json``: a list of
  ``{"id", "conversations": [{"from", "value"}, ...]}``) as vLLM's ``ShareGPTDataset`` reads it:
  conversations with fewer than two turns are dropped; the rest are shuffled with Python's
  ``random.seed(seed); random.shuffle``; the first turn's text is the prompt and the second's the
  output (whoever speaks them, as vLLM takes them); a pair is skipped unless ``is_valid_sequence``
  holds: prompt and output >= 4 tokens, prompt <= 1024 and prompt + output <= 2048; the first n
  valid pairs are used, and when fewer are valid vLLM's oversampling repeats
  ``random.choice`` of them (seeded again).

Token counts: vLLM tokenizes with the model's tokenizer; layersim has none and counts
``ceil(UTF-8 bytes / 4)``. Four characters a token is the usual figure for English with BPE
vocabularies (OpenAI's rule of thumb; Llama and Qwen tokenizers give 3.5-4.5 on ShareGPT's
English); counting bytes rather than characters gives CJK text (3 bytes a character) about 0.75
tokens a character, near what large-vocabulary tokenizers give, where a character or word count
would be far off. Expect about +-25% per text, less on totals; near the 4 / 1024 / 2048 bounds a
conversation may be kept here and skipped by vLLM or the other way round.

Malformed input (not JSON, not a list, an entry without ``conversations``, a first or second turn
without a text ``value``) is a one-line ``TraceError`` naming the file and the entry's 0-based
index in the list (vLLM silently drops entries without ``conversations``; a file that has them is
more likely not a ShareGPT file at all).
"""

from __future__ import annotations

import json
import math
import os
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from traces._checks import MAX_TOKENS, json_problem, shown
from traces._table import check_exists
from traces.errors import TraceError

MIN_LEN, MAX_PROMPT_LEN, MAX_TOTAL_LEN = 4, 1024, 2048  # vLLM's is_valid_sequence defaults
TOKENS_NOTE = "token counts ~ UTF-8 bytes / 4"


@dataclass(frozen=True)
class RandomLengths:
    """vLLM's ``random`` dataset: uniform integer lengths around INPUT and OUTPUT."""

    input_len: int
    output_len: int
    range_ratio: float = 0.0
    legacy: bool = False  # the older benchmark_serving.py's reading of the ratio (module note)

    def __post_init__(self) -> None:
        for label, value in (("input", self.input_len), ("output", self.output_len)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise TraceError(f"random {label} length must be a positive integer: "
                                 f"{shown(value)}")
            if value > MAX_TOKENS:
                raise TraceError(f"random {label} length must be at most {MAX_TOKENS:,} "
                                 f"tokens: {shown(value)}")
        r = self.range_ratio
        name = "random-legacy" if self.legacy else "random"
        if self.legacy:  # lengths in [int(L * r), L]: 1 is fixed lengths, 0 could draw none
            if isinstance(r, bool) or not isinstance(r, (int, float)) or not 0 < r <= 1:
                raise TraceError(f"random-legacy range ratio must be in (0, 1]: {r!r}")
        elif isinstance(r, bool) or not isinstance(r, (int, float)) or not 0 <= r < 1:
            raise TraceError(f"random range ratio must be in [0, 1), as vLLM's: {r!r}")
        in_lo, in_hi, out_lo, out_hi = self.bounds()
        fix = "raise the length or the ratio" if self.legacy else "raise the length or lower the ratio"
        if in_lo < 1:
            raise TraceError(f"{name} input length {self.input_len} with range ratio {r:g} can "
                             f"draw empty prompts: {fix}")
        if out_lo < 1:  # only the legacy reading can reach 0 (vLLM's clamps it at 1)
            raise TraceError(f"{name} output length {self.output_len} with range ratio {r:g} "
                             f"can draw empty outputs (max_tokens 0, which vLLM refuses): {fix}")
        if max(in_hi, out_hi) > MAX_TOKENS:
            raise TraceError(f"random lengths {self.input_len}:{self.output_len} with range "
                             f"ratio {r:g} can draw {max(in_hi, out_hi):,} tokens, over the "
                             f"{MAX_TOKENS:,} limit: lower the length or the ratio")

    def bounds(self) -> tuple[int, int, int, int]:
        """(input low, input high, output low, output high), both ends included."""
        r = float(self.range_ratio)
        if self.legacy:  # np.random.randint(int(L * r), L + 1): int() truncates, L included
            return (int(self.input_len * r), self.input_len,
                    int(self.output_len * r), self.output_len)
        return (math.floor(self.input_len * (1 - r)), math.ceil(self.input_len * (1 + r)),
                max(1, math.floor(self.output_len * (1 - r))),
                max(1, math.ceil(self.output_len * (1 + r))))

    def sample_seeded(self, n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
        in_lo, in_hi, out_lo, out_hi = self.bounds()
        if self.legacy:
            _check_legacy_seeds(seed, 1)
            old = np.random.RandomState(seed)  # what np.random.seed(seed) seeds
            return (old.randint(in_lo, in_hi + 1, size=n).astype(np.int64),
                    old.randint(out_lo, out_hi + 1, size=n).astype(np.int64))
        rng = np.random.default_rng(seed)
        prompt = rng.integers(in_lo, in_hi + 1, size=n).astype(np.int64)
        output = rng.integers(out_lo, out_hi + 1, size=n).astype(np.int64)
        return prompt, output

    def describe(self) -> str:
        if self.legacy:
            in_lo, in_hi, out_lo, out_hi = self.bounds()
            return (f"older benchmark_serving.py random (range ratio {self.range_ratio:g}): "
                    f"prompts uniform {in_lo}-{in_hi}, outputs {out_lo}-{out_hi} tokens")
        if self.range_ratio == 0:
            return f"vLLM random: {self.input_len} prompt / {self.output_len} output tokens"
        in_lo, in_hi, out_lo, out_hi = self.bounds()
        return (f"vLLM random (range ratio {self.range_ratio:g}): prompts uniform "
                f"{in_lo}-{in_hi}, outputs {out_lo}-{out_hi} tokens")


LEGACY_SEEDS = 2**32  # numpy's legacy generator (np.random.seed) takes seeds below this


def check_legacy_seeds(workload: str, first_seed: int, num_seeds: int) -> None:
    """A one-line TraceError if seeds first_seed .. first_seed + num_seeds - 1 cannot draw
    `workload` (random-legacy's generator): a multi-seed run checks before its first seed."""
    if workload.startswith("random-legacy:"):
        _check_legacy_seeds(first_seed, num_seeds)


def _check_legacy_seeds(first_seed: int, num_seeds: int) -> None:
    last = first_seed + num_seeds - 1
    if not 0 <= first_seed <= last < LEGACY_SEEDS:
        reach = f" with {num_seeds} seeds reaches {last}" if num_seeds > 1 else ""
        raise TraceError(f"random-legacy draws with numpy's legacy generator, whose seed must be "
                         f"in [0, 2**32): --seed {first_seed}{reach}")


def parse_random(spec: str) -> RandomLengths:
    """Parse ``'random:INPUT:OUTPUT[:RATIO]'`` (e.g. ``'random:1024:128:0.5'``) or
    ``'random-legacy:INPUT:OUTPUT:RATIO'``."""
    parts = spec.split(":")
    legacy = parts[0] == "random-legacy"
    if legacy and len(parts) != 4:
        raise TraceError(f"random-legacy workload must look like "
                         f"'random-legacy:INPUT:OUTPUT:RATIO', got {shown(spec)}")
    if parts[0] not in ("random", "random-legacy") or len(parts) not in (3, 4):
        raise TraceError(f"random workload must look like 'random:INPUT:OUTPUT[:RATIO]', "
                         f"got {shown(spec)}")
    try:  # int() and float() as vLLM's argparse flags read them
        input_len, output_len = int(parts[1]), int(parts[2])
        ratio = float(parts[3]) if len(parts) == 4 else 0.0
    except ValueError:
        raise TraceError(f"{parts[0]} workload needs integer lengths and a number ratio, "
                         f"got {shown(spec)}") from None
    return RandomLengths(input_len, output_len, ratio, legacy)


@dataclass(frozen=True, eq=False)
class ShareGPTLengths:
    """The (prompt, output) token counts of a ShareGPT file's conversations with two turns or
    more, in file order, and which of them pass vLLM's length filters."""

    prompt_tokens: np.ndarray
    output_tokens: np.ndarray
    valid: np.ndarray
    entries: int  # every entry of the file
    source: str

    def sample_seeded(self, n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
        order = list(range(len(self.valid)))
        random.Random(seed).shuffle(order)  # vLLM: random.seed(seed); random.shuffle(data)
        picked = [i for i in order if self.valid[i]][:n]
        if len(picked) < n:  # vLLM's maybe_oversample_requests
            again = random.Random(seed)
            picked += [again.choice(picked) for _ in range(n - len(picked))]
        rows = np.asarray(picked, dtype=np.int64)
        return self.prompt_tokens[rows], self.output_tokens[rows]

    def describe(self) -> str:
        kept = int(np.count_nonzero(self.valid))
        return (f"ShareGPT {self.source}: {kept} of {self.entries} conversations pass vLLM's "
                f"filters (two turns; prompt, output >= {MIN_LEN}, prompt <= {MAX_PROMPT_LEN}, "
                f"total <= {MAX_TOTAL_LEN} tokens; {TOKENS_NOTE})")


def approx_tokens(text: str) -> int:
    """layersim's stand-in for a tokenizer: ``ceil(UTF-8 bytes / 4)`` (see the module note)."""
    # surrogatepass: JSON's "\ud800" escapes decode to lone surrogates, which strict UTF-8
    # refuses; they count as the 3 bytes an encoder that lets them through writes
    return -(-len(text.encode("utf-8", "surrogatepass")) // 4)


def is_valid_sequence(prompt_len: int, output_len: int) -> bool:
    """vLLM's ``is_valid_sequence`` with its defaults."""
    return not (prompt_len < MIN_LEN or output_len < MIN_LEN or prompt_len > MAX_PROMPT_LEN
                or prompt_len + output_len > MAX_TOTAL_LEN)


def _turn_text(name: str, index: int, turns: list[object], j: int) -> str:
    turn = turns[j]
    value = turn.get("value") if isinstance(turn, dict) else None
    if not isinstance(value, str):
        raise TraceError(f"{name}: entry {index}: conversations[{j}] has no text 'value'")
    return value


def load_sharegpt(path: str | os.PathLike[str]) -> ShareGPTLengths:
    """Read a ShareGPT JSON file into the lengths vLLM's ShareGPT sampler would draw from."""
    p = Path(path)
    check_exists(p)
    name = p.name
    try:
        with p.open(encoding="utf-8-sig") as fh:
            data = json.load(fh)
    except json.JSONDecodeError as exc:
        raise TraceError(f"{name}:{exc.lineno}: invalid JSON ({json_problem(exc)})") from None
    except UnicodeDecodeError as exc:
        raise TraceError(f"{name}: not UTF-8 text ({exc.reason})") from None
    except (ValueError, RecursionError) as exc:  # a huge integer, nesting too deep
        raise TraceError(f"{name}: invalid JSON ({json_problem(exc)})") from None
    except OSError as exc:
        raise TraceError(f"{name}: cannot read ({exc.strerror or exc})") from None
    if not isinstance(data, list):
        raise TraceError(f"{name}: expected a JSON list of conversations (vLLM's ShareGPT "
                         "layout), got a JSON " + type(data).__name__)
    prompt: list[int] = []
    output: list[int] = []
    for index, entry in enumerate(data):
        if not isinstance(entry, dict):
            raise TraceError(f"{name}: entry {index}: expected an object with 'conversations'")
        turns = entry.get("conversations")
        if not isinstance(turns, list):
            what = "missing" if turns is None else "not a list"
            raise TraceError(f"{name}: entry {index}: 'conversations' is {what}")
        if len(turns) < 2:
            continue
        prompt.append(approx_tokens(_turn_text(name, index, turns, 0)))
        output.append(approx_tokens(_turn_text(name, index, turns, 1)))
    prompts = np.asarray(prompt, dtype=np.int64)
    outputs = np.asarray(output, dtype=np.int64)
    valid = np.fromiter((is_valid_sequence(a, b) for a, b in zip(prompt, output, strict=True)),
                        dtype=bool, count=len(prompt))
    if not valid.any():
        raise TraceError(f"{name}: none of its {len(data)} entries passes vLLM's ShareGPT filters "
                         f"(two turns, prompt and output >= {MIN_LEN}, prompt <= "
                         f"{MAX_PROMPT_LEN}, total <= {MAX_TOTAL_LEN} tokens; {TOKENS_NOTE})")
    for a in (prompts, outputs, valid):
        a.setflags(write=False)
    return ShareGPTLengths(prompts, outputs, valid, len(data), name)

