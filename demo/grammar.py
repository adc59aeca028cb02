"""The grammar of the demo world: short lowercase movie-review continuations (pure Python).

In the spirit of Ziegler et al. 2019's sentiment continuation: a prompt opens a review ("the
movie was", "honestly the acting", "overall i") and the policy writes the rest ("really
superb, but the ending was weak."). The response starts with a space and is rendered
canonically (one space between words, none before , . !), so prompt + response reads as one
text and tokenizes the same whether the two are tokenized apart or together.

The grammar (T: the prompt's kind, read off its last word; see ``prompt_kind``):

    RESPONSE_T := HEAD_T (CONN CLAUSE){0,3} END          HEAD_adj := ADJP   (prompt ends "was")
    CLAUSE     := SUBJ PRED | "i" IPRED                  HEAD_i   := IPRED  (prompt ends "i")
    SUBJ, OBJ  := "it" | ("the" | "this") NOUN           HEAD_pred:= PRED   (anything else)
    PRED       := COPULA ADJP | VERB_PHRASE
    ADJP       := [INTENS] ADJ ["and" [INTENS] ADJ]
    IPRED      := ["really" | "truly"] IVERB OBJ
    CONN       := ", and" | ", but" | "and" | "but" | ", although" | "because" | "."
    END        := "." | "!"

Each adjective, verb and verb phrase carries a valence (positive, negative or ~0 for neutral):
the gold reward in ``demo.world`` reads sentiment from them.
"""

from __future__ import annotations

import random
import re
import zlib

# --- the lexicon: valences in roughly [-1.3, 1.3] -------------------------------------------
POS_ADJ = {"great": 1.0, "wonderful": 1.2, "superb": 1.3, "brilliant": 1.3, "good": 0.7,
           "fun": 0.8, "charming": 0.9, "moving": 0.9, "enjoyable": 0.8, "beautiful": 1.0,
           "fresh": 0.7, "clever": 0.8}
NEG_ADJ = {"terrible": -1.2, "awful": -1.2, "boring": -1.0, "bad": -0.8, "dull": -0.9,
           "weak": -0.7, "predictable": -0.6, "messy": -0.7, "painful": -1.1, "bland": -0.8,
           "silly": -0.6, "forgettable": -0.8}
NEU_ADJ = {"long": 0.0, "short": 0.0, "slow": -0.1, "okay": 0.1, "average": 0.0, "simple": 0.0,
           "quiet": 0.0, "different": 0.0, "strange": 0.0, "familiar": 0.0}
POS_VP = {("made", "me", "smile"): 1.0, ("kept", "me", "hooked"): 1.1, ("won", "me", "over"): 1.0,
          ("held", "my", "attention"): 0.9, ("works",): 0.6, ("shines",): 1.0}
NEG_VP = {("fell", "flat"): -1.0, ("dragged", "on"): -0.9, ("bored", "me"): -1.0,
          ("made", "me", "cringe"): -1.1, ("falls", "apart"): -1.0, ("misses", "the", "mark"): -1.0}
NEU_VP = {("ran", "long"): -0.1, ("moves", "along"): 0.0, ("takes", "its", "time"): 0.0,
          ("goes", "on"): 0.0}
POS_IVERB = {"loved": 1.2, "enjoyed": 1.0, "liked": 0.7, "adored": 1.3}
NEG_IVERB = {"hated": -1.2, "disliked": -0.8, "regretted": -1.0}
NEU_IVERB = {"watched": 0.0, "saw": 0.0, "finished": 0.0}
INTENS = {"really": 1.5, "very": 1.5, "truly": 1.6, "incredibly": 1.8, "quite": 1.2,
          "fairly": 0.8, "somewhat": 0.6, "rather": 0.9}
VERB_INTENS = ("really", "truly")
NOUNS = ("movie", "film", "plot", "acting", "story", "soundtrack", "ending", "cast", "script",
         "dialogue", "pacing", "music", "direction", "humor", "cinematography")
COPULAS = ("was", "is", "felt", "seemed")
CONNS = ((",", "and"), (",", "but"), ("and",), ("but",), (",", "although"), ("because",), (".",))
ENDS = (".", "!")
MAX_TAILS = 3  # the recognizer accepts up to 3 tails; the sampler writes at most 2

ADJ = {**POS_ADJ, **NEG_ADJ, **NEU_ADJ}
VPS = {**POS_VP, **NEG_VP, **NEU_VP}
IVERBS = {**POS_IVERB, **NEG_IVERB, **NEU_IVERB}
VALENCE = {**ADJ, **IVERBS, **{p: v for p, v in VPS.items() if len(p) == 1}}


def by_first_word(phrases) -> dict[str, list[tuple[str, ...]]]:
    """Phrases indexed by their first word (the recognizer and the gold reward run per token)."""
    index: dict[str, list[tuple[str, ...]]] = {}
    for p in phrases:
        index.setdefault(p[0], []).append(p)
    return index


VP_INDEX, CONN_INDEX = by_first_word(VPS), by_first_word(CONNS)
# Words whose repetition is normal English; repeating anything else costs gold.
FUNCTION_WORDS = frozenset(("the this it i me my its on and but although because was is felt "
                            "seemed , . !").split())

# --- prompts -----------------------------------------------------------------------------
OPENERS = ("", "honestly", "overall", "to be honest", "i think", "in my opinion",
           "after all the hype", "as a fan", "for me")
I_PROMPTS = ("overall i", "honestly i", "to be honest i", "as a fan i", "in the end i",
             "after the first scene i", "i have to say i", "for the record i")
IT_PROMPTS = ("i watched this film and it", "i saw it last night and it",
              "we went in with low hopes and it")


def _join(*parts: str) -> str:
    return " ".join(p for p in parts if p)


def all_prompts() -> list[str]:
    """The prompt universe (~300 openings), in a fixed order."""
    out = []
    for noun in NOUNS:
        for op in OPENERS:
            out.append(_join(op, "the", noun, "was"))   # -> ADJP
            out.append(_join(op, "the", noun))          # -> PRED
        out.append(_join("i thought the", noun, "was"))
    return out + list(I_PROMPTS) + list(IT_PROMPTS)


def is_heldout(prompt: str) -> bool:
    """A stable 1-in-5 split of the prompt universe: held-out prompts never reach SFT, RM or PPO."""
    return zlib.crc32(prompt.encode()) % 5 == 0


TRAIN_PROMPTS = [p for p in all_prompts() if not is_heldout(p)]
HELDOUT_PROMPTS = [p for p in all_prompts() if is_heldout(p)]


def prompt_kind(prompt: str) -> str:
    """What the response must start with: "adj" after a copula, "i" after "i", else "pred"."""
    last = prompt.split()[-1] if prompt.split() else ""
    return "adj" if last in COPULAS else "i" if last == "i" else "pred"


def sample_prompt(rng: random.Random, heldout: bool = False) -> str:
    return rng.choice(HELDOUT_PROMPTS if heldout else TRAIN_PROMPTS)


# --- tokens and surface ------------------------------------------------------------------
_TOKEN = re.compile(r"[a-z']+|[^\sa-z']")


def tokenize(text: str) -> list[str]:
    return _TOKEN.findall(text)


def render(tokens: list[str]) -> str:
    """Canonical surface: " w1 w2, w3." (leading space, so prompt + response reads as one text)."""
    out = ""
    for t in tokens:
        out += t if t in (",", ".", "!") else " " + t
    return out


# --- the sampler ---------------------------------------------------------------------------
class _Writer:
    """Samples one response; content words are not reused, so grammar samples never repeat."""

    def __init__(self, rng: random.Random, bias: float, prompt: str = ""):
        # The prompt's own nouns count as said: "the plot was dull, but the plot..." reads badly.
        self.rng, self.used = rng, set(tokenize(prompt)) - FUNCTION_WORDS
        p_neu = 0.2  # the share of neutral words whatever the bias
        p_pos = (1 - p_neu) * (1 + max(-1.0, min(1.0, bias))) / 2
        self.weights = (p_pos, 1 - p_neu - p_pos, p_neu)

    def pick(self, pools, weights=None, optional: bool = False):
        """A word (or phrase) from one of (positive, negative, neutral) pools, sharing no content
        word with what this response already said. The pools are larger than the slots of one
        response; should one run dry, an optional slot is left out (None), else a word repeats."""
        pool = self.rng.choices(pools, weights=weights or self.weights)[0]
        words = lambda w: set(w if isinstance(w, tuple) else (w,)) - FUNCTION_WORDS  # noqa: E731
        fresh = [w for w in pool if not words(w) & self.used]
        if not fresh:
            if optional:
                return None
            fresh = list(pool)
        w = self.rng.choice(fresh)
        self.used |= words(w)
        return w

    def modifier(self, options, p: float) -> list[str]:
        """An optional intensifier: [word] with probability p while a fresh one is left."""
        w = self.pick((options,), (1,), optional=True) if self.rng.random() < p else None
        return [w] if w else []

    def adjp(self) -> list[str]:
        toks = []
        for k in range(1 + (self.rng.random() < 0.3)):
            if k:
                toks.append("and")
            toks += self.modifier(INTENS, 0.4)
            toks.append(self.pick((POS_ADJ, NEG_ADJ, NEU_ADJ)))
        return toks

    def pred(self) -> list[str]:
        if self.rng.random() < 0.3:
            return list(self.pick((POS_VP, NEG_VP, NEU_VP)))
        return [self.rng.choice(COPULAS)] + self.adjp()

    def noun_phrase(self) -> list[str]:
        if self.rng.random() < 0.2:
            return ["it"]
        return [self.rng.choice(("the", "the", "this")), self.pick((NOUNS,), (1,))]

    def ipred(self) -> list[str]:
        verb = self.pick((POS_IVERB, NEG_IVERB, NEU_IVERB))
        return self.modifier(VERB_INTENS, 0.3) + [verb] + self.noun_phrase()

    def clause(self) -> list[str]:
        if self.rng.random() < 0.15:
            return ["i"] + self.ipred()
        return self.noun_phrase() + self.pred()

    def response(self, kind: str) -> list[str]:
        toks = {"adj": self.adjp, "i": self.ipred, "pred": self.pred}[kind]()
        for _ in range(self.rng.choices((0, 1, 2), weights=(0.35, 0.4, 0.25))[0]):
            toks += list(self.rng.choice(CONNS)) + self.clause()
        return toks + [self.rng.choice(ENDS)]


def sample_continuation(rng: random.Random, sentiment_bias: float = 0.0,
                        prompt: str = "the movie was") -> str:
    """A grammatical response to ``prompt``; bias in [-1, 1] shifts word choice toward praise.

    P(positive word) = 0.8·(1 + bias)/2, P(negative) = 0.8·(1 − bias)/2, P(neutral) = 0.2.
    """
    return render(_Writer(rng, sentiment_bias, prompt).response(prompt_kind(prompt)))


# --- the recognizer ------------------------------------------------------------------------
class _Recognizer:
    """Runs the grammar over tokens; each rule maps a start index to the set of end indices.

    ``far`` is the furthest token any rule matched: how much of a broken response still parsed.
    """

    def __init__(self, toks: list[str]):
        self.t, self.far = toks, 0

    def tok(self, i: int, options) -> set[int]:
        if i < len(self.t) and self.t[i] in options:
            self.far = max(self.far, i + 1)
            return {i + 1}
        return set()

    def phrase(self, i: int, index) -> set[int]:
        ends = set()
        for p in index.get(self.t[i], ()) if i < len(self.t) else ():
            k = 0
            while k < len(p) and i + k < len(self.t) and self.t[i + k] == p[k]:
                k += 1
            self.far = max(self.far, i + k)
            if k == len(p):
                ends.add(i + k)
        return ends

    def opt(self, i: int, options) -> set[int]:
        return {i} | self.tok(i, options)

    def adjp(self, i: int) -> set[int]:
        ends = set()
        for j in self.opt(i, INTENS):
            for k in self.tok(j, ADJ):
                ends.add(k)
                for m in self.tok(k, ("and",)):
                    for j2 in self.opt(m, INTENS):
                        ends |= self.tok(j2, ADJ)
        return ends

    def noun_phrase(self, i: int) -> set[int]:
        ends = self.tok(i, ("it",))
        for j in self.tok(i, ("the", "this")):
            ends |= self.tok(j, NOUNS)
        return ends

    def pred(self, i: int) -> set[int]:
        ends = self.phrase(i, VP_INDEX)
        for j in self.tok(i, COPULAS):
            ends |= self.adjp(j)
        return ends

    def ipred(self, i: int) -> set[int]:
        return {e for j in self.opt(i, VERB_INTENS) for k in self.tok(j, IVERBS)
                for e in self.noun_phrase(k)}

    def clause(self, i: int) -> set[int]:
        ends = {e for j in self.noun_phrase(i) for e in self.pred(j)}
        return ends | {e for j in self.tok(i, ("i",)) for e in self.ipred(j)}

    def response(self, kind: str) -> bool:
        frontier = {"adj": self.adjp, "i": self.ipred, "pred": self.pred}[kind](0)
        reached = set(frontier)
        for _ in range(MAX_TAILS):
            frontier = {e for i in frontier for j in self.phrase(i, CONN_INDEX)
                        for e in self.clause(j)}
            reached |= frontier
        return len(self.t) in {e for i in reached for e in self.tok(i, ENDS)}


def parse(prompt: str, response: str) -> tuple[bool, float]:
    """(could the grammar have written ``response`` after ``prompt``?, the fraction that parsed)."""
    toks = tokenize(response)
    if not toks:
        return False, 0.0
    rec = _Recognizer(toks)
    ok = rec.response(prompt_kind(prompt)) and render(toks) == response
    return ok, (1.0 if ok else rec.far / len(toks))


def recognizes(prompt: str, response: str) -> bool:
    return parse(prompt, response)[0]
