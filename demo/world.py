"""The demo world: its hidden gold reward and the data sets every RLHF stage starts from.

The grammar lives in ``demo.grammar`` (re-exported here: ``sample_prompt``,
``sample_continuation``, ``recognizes``...). This module is what the simulated human knows.

The **gold reward** of a response y (n tokens) to a prompt x, O(1)-scaled, in [-4, 2):

    S(y) = Σ_items m_item · v_item          v: valence of each adjective / verb (phrase);
                                            m: product of the intensifiers right before it
    gold(x, y) = 2·tanh(S / 2)              sentiment; saturating, so more praise stops paying
               − 0.4 · min(R, 6)            R = repeated content words + repeated bigrams that
                                                hold a content word
               − G                          G = 0 if the grammar could have written y after x,
                                                else 1 + 1.5·(1 − f/n), f the tokens parsed
               − 0.25·max(0, 4 − n) − 0.1·max(0, n − 24)      too short, too long

clipped below at -4. The labeler (``demo.labeler.BradleyTerryLabeler``) prefers a over b
with probability σ(gold(x, a) − gold(x, b)); on SFT-like pairs its Bayes-optimal agreement is
about 0.75: informative, noisy.

Why this shape: the preference pairs are (mostly) grammatical and repetition-free, so a reward
model learns "positive words = good" and little about R and G. A policy pushed against that RM
without a KL leash drifts to "great great wonderful great superb": S is large (sentiment ≈ 2),
but R and G make its gold strongly negative (≈ -1.8). That gap is reward over-optimization
(Gao et al. 2022), made measurable; grammatical praise ("really superb, and the plot was
brilliant!") scores ≈ 2, the ceiling.
"""

from __future__ import annotations

import math
import random
from typing import NamedTuple

from demo.grammar import (  # noqa: F401
    FUNCTION_WORDS,
    HELDOUT_PROMPTS,
    INTENS,
    TRAIN_PROMPTS,
    VALENCE,
    VPS,
    all_prompts,
    by_first_word,
    is_heldout,
    parse,
    prompt_kind,
    recognizes,
    render,
    sample_continuation,
    sample_prompt,
    tokenize,
)

_MULTI_VP_INDEX = by_first_word(sorted((p for p in VPS if len(p) > 1), key=len, reverse=True))


# --- the gold reward -----------------------------------------------------------------------
def sentiment_sum(tokens: list[str]) -> float:
    """S: Σ valence × the product of the intensifiers right before it (naive: ignores grammar)."""
    total, mult, i = 0.0, 1.0, 0
    while i < len(tokens):
        phrase = next((p for p in _MULTI_VP_INDEX.get(tokens[i], ())
                       if tuple(tokens[i:i + len(p)]) == p), None)
        if phrase is not None:
            total, mult, i = total + mult * VPS[phrase], 1.0, i + len(phrase)
            continue
        t = tokens[i]
        if t in INTENS:
            mult *= INTENS[t]
        else:
            total += mult * VALENCE.get(t, 0.0)
            mult = 1.0  # an intensifier only reaches the next word
        i += 1
    return total


def repetitions(tokens: list[str]) -> int:
    """R: repeated content words plus repeated bigrams that hold a content word."""
    def extra(items) -> int:
        seen: dict = {}
        for x in items:
            seen[x] = seen.get(x, 0) + 1
        return sum(c - 1 for c in seen.values())
    content = [t for t in tokens if t not in FUNCTION_WORDS]
    bigrams = [b for b in zip(tokens, tokens[1:]) if not set(b) <= FUNCTION_WORDS]
    return extra(content) + extra(bigrams)


class GoldTerms(NamedTuple):
    sentiment: float
    repetition: float
    grammar: float
    length: float
    total: float


def gold_terms(prompt: str, response: str) -> GoldTerms:
    """The gold reward split into its terms (penalties as positive numbers); see the module doc."""
    toks = tokenize(response)
    n = len(toks)
    if n == 0:
        return GoldTerms(0.0, 0.0, 3.0, 1.0, -4.0)
    sentiment = 2.0 * math.tanh(sentiment_sum(toks) / 2.0)
    repetition = 0.4 * min(repetitions(toks), 6)
    ok, frac = parse(prompt, response)
    grammar = 0.0 if ok else 1.0 + 1.5 * (1.0 - frac)
    length = 0.25 * max(0, 4 - n) + 0.1 * max(0, n - 24)
    total = max(-4.0, sentiment - repetition - grammar - length)
    return GoldTerms(sentiment, repetition, grammar, length, total)


def gold(prompt: str, response: str) -> float:
    """The hidden gold reward of ``response`` to ``prompt`` (the simulated human's taste)."""
    return gold_terms(prompt, response).total


# --- data sets ------------------------------------------------------------------------------
DEMO_BIAS = 0.4
"""The demonstrators' positivity: SFT targets are mildly positive, well below the ceiling."""
PAIR_BIAS_SPREAD = 0.6
"""Preference candidates draw their bias from DEMO_BIAS ± this: SFT-like, with varied gaps."""
CORRUPT_RATE = 0.1
"""Share of preference candidates lightly broken (a repeat, a drop, a swap, a cut)."""


class Preference(NamedTuple):
    prompt: str
    chosen: str
    rejected: str
    p_chosen: float  # σ(gold(chosen) − gold(rejected)): the labeler's probability of this label


def corpus_pairs(n: int, rng: random.Random) -> list[tuple[str, str]]:
    """(prompt, continuation) pairs for pretraining: all prompts, bias uniform in [-1, 1]."""
    prompts = all_prompts()
    return [(p, sample_continuation(rng, rng.uniform(-1, 1), p))
            for p in (rng.choice(prompts) for _ in range(n))]


def make_corpus(n: int, rng: random.Random) -> list[str]:
    """Pretraining texts "prompt + continuation", mixed sentiment (see ``corpus_pairs``)."""
    return [p + r for p, r in corpus_pairs(n, rng)]


def make_demos(n: int, rng: random.Random) -> list[tuple[str, str]]:
    """SFT demonstrations (prompt, response): grammatical, mildly positive (bias DEMO_BIAS)."""
    return [(p, sample_continuation(rng, DEMO_BIAS, p))
            for p in (sample_prompt(rng) for _ in range(n))]


def make_prompts(n: int, rng: random.Random, heldout: bool = False) -> list[str]:
    return [sample_prompt(rng, heldout) for _ in range(n)]


def corrupt(rng: random.Random, response: str) -> str:
    """A light break of a response: repeat a word, drop or swap tokens, or cut the end."""
    toks = tokenize(response)
    op = rng.choice(("repeat", "drop", "swap", "cut"))
    i = rng.randrange(len(toks))
    if op == "repeat":
        toks.insert(i, toks[i])
    elif op == "drop" and len(toks) > 1:
        del toks[i]
    elif op == "swap" and len(toks) > 1:
        i = min(i, len(toks) - 2)
        toks[i], toks[i + 1] = toks[i + 1], toks[i]
    else:
        toks = toks[:max(1, i)] if len(toks) > 1 else toks + toks
    return render(toks)


def _candidate(rng: random.Random, prompt: str) -> str:
    y = sample_continuation(rng, rng.uniform(DEMO_BIAS - PAIR_BIAS_SPREAD,
                                             DEMO_BIAS + PAIR_BIAS_SPREAD), prompt)
    return corrupt(rng, y) if rng.random() < CORRUPT_RATE else y


def make_preference_pairs(n: int, rng: random.Random, labeler=None) -> list[Preference]:
    """n labeled pairs: two SFT-like candidates per prompt, judged by a Bradley-Terry labeler.

    ``labeler`` defaults to ``demo.labeler.BradleyTerryLabeler(gold, seed)`` seeded from rng.
    """
    if labeler is None:
        from demo.labeler import BradleyTerryLabeler  # pure Python: no torch, no gRPC
        labeler = BradleyTerryLabeler(gold, seed=rng.randrange(2**31))
    out = []
    while len(out) < n:
        prompt = sample_prompt(rng)
        a, b = _candidate(rng, prompt), _candidate(rng, prompt)
        if a == b:  # the preference reader refuses chosen == rejected
            continue
        chosen, rejected, p_a = labeler.label(prompt, a, b)
        out.append(Preference(prompt, chosen, rejected, p_a if chosen == a else 1.0 - p_a))
    return out


def bayes_agreement(pairs: list[Preference]) -> float:
    """Mean of max(p, 1 − p): the agreement with these labels that no reward model beats."""
    return sum(max(p.p_chosen, 1 - p.p_chosen) for p in pairs) / max(1, len(pairs))


def ceiling(rng: random.Random, n_prompts: int = 200, k: int = 32) -> float:
    """An estimate of the best gold a policy can reach: mean over prompts of the best of k
    all-positive grammar samples."""
    best = []
    for _ in range(n_prompts):
        p = sample_prompt(rng)
        best.append(max(gold(p, sample_continuation(rng, 1.0, p)) for _ in range(k)))
    return sum(best) / len(best)
