"""Rollouts: sample responses from the policy, cut them at EOS or a stop token, pad them.

Layout of a batch of B rollouts (what every later step indexes):

    query            (B, P)  prompt ids, LEFT-padded (generation continues from the last column)
    response         (B, R)  sampled ids, RIGHT-padded
    response_mask    (B, R)  1 on real response tokens: up to and including the first EOS or
                             stop token, which the policy chose and is credited for
    query_responses  (B, P + R)  the two side by side; response token t sits at column P + t
                             and is predicted by the hidden state at column P - 1 + t

Sampling is HF ``generate`` with our own ``GenerationConfig`` and nothing else (the
checkpoint's generation_config.json or HF's global top_k = 50 would silently change the
behaviour policy). PPO's
ratio π/π_old assumes the tokens were drawn from π at ``temperature``; top-k / top-p sample
from a truncated π, so they are off by default. Each ``generate`` call runs under its own seed
(from (seed, step, rank, chunk)) inside ``torch.random.fork_rng``: a resumed run samples the
same tokens as one that ran through, and nothing else's RNG stream is disturbed.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import GenerationConfig

from policy_trainer.data import pad
from protos.encoding import Encoder


def encode_prompts(encoder: Encoder, prompts: list[str], max_length: int
                   ) -> tuple[list[list[int]], int]:
    """Prompt ids (with the tokenizer's special tokens, as the RM's Encoder does) and the
    number cut from the left to ``max_length`` (the end of a prompt, next to the response,
    matters most)."""
    out, cut = [], 0
    for p in prompts:
        ids, _ = encoder.encode_text(p, "")
        if len(ids) > max_length:
            ids, cut = ids[len(ids) - max_length:], cut + 1
        out.append(ids)
    return out, cut


def truncate_at_stop(response: torch.Tensor, stop_ids: list[int]
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """(response_mask (B, R) long, ended (B,) bool): valid up to and including the first stop
    id. A row with no stop id ran to the length limit: all of it is valid and ended is False
    (``generate`` only pads rows that finished, so such a row holds no padding)."""
    R = response.size(1)
    is_stop = torch.isin(response, torch.tensor(stop_ids, device=response.device))  # (B, R)
    ended = is_stop.any(1)
    first = torch.where(ended, is_stop.int().argmax(1), R - 1)  # (B,) argmax: first max
    mask = torch.arange(R, device=response.device)[None, :] <= first[:, None]
    return mask.long(), ended


# The per-token tensors a PPO step attaches to its rollouts, each (B, R) like the response.
PER_TOKEN = ("logprobs", "ref_logprobs", "values", "rewards", "advantages", "returns",
             "train_mask")


@dataclass
class Rollouts:
    """B rollouts in one padded layout (module docstring), and what the PPO step attaches to
    them, per response token (B, R), None until it does (the step numbers of ``ppo_loop``)."""

    query: torch.Tensor          # (B, P) left-padded
    query_mask: torch.Tensor     # (B, P)
    response: torch.Tensor       # (B, R) right-padded
    response_mask: torch.Tensor  # (B, R)
    ended: torch.Tensor          # (B,) bool: stopped at EOS / a stop token
    prompt_index: list[int]      # row -> index into the prompt set
    logprobs: torch.Tensor | None = None      # 3. log π_old(y_t): the policy that sampled
    ref_logprobs: torch.Tensor | None = None  # 3. log π_ref(y_t): the frozen reference
    values: torch.Tensor | None = None        # 3. V_old(s_t): the critic at rollout time
    rewards: torch.Tensor | None = None       # 4. R_t = -β·KL_t (+ the score at the end)
    advantages: torch.Tensor | None = None    # 5-6. GAE advantages, whitened
    returns: torch.Tensor | None = None       # 5. advantages + values: the value targets
    train_mask: torch.Tensor | None = None    # 4. response_mask, 0 on rows the RM failed on

    @property
    def context_length(self) -> int:
        return self.query.size(1)

    @property
    def query_responses(self) -> torch.Tensor:
        return torch.cat([self.query, self.response], 1)  # (B, P + R)

    @property
    def attention_mask(self) -> torch.Tensor:
        return torch.cat([self.query_mask, self.response_mask], 1)  # (B, P + R)

    @property
    def lengths(self) -> torch.Tensor:
        return self.response_mask.sum(1)  # (B,)

    def __len__(self) -> int:
        return self.query.size(0)

    def per_token(self) -> dict[str, torch.Tensor]:
        """The per-token tensors attached so far, by name."""
        return {k: getattr(self, k) for k in PER_TOKEN if getattr(self, k) is not None}

    def subset(self, idx: torch.Tensor) -> Rollouts:
        """Rows ``idx``, trimmed to their own padding: leading query columns that are padding in
        every row and response columns past the longest response are dropped (less compute
        per micro-batch; per-token tensors stay aligned at response column 0)."""
        qm, rm = self.query_mask[idx], self.response_mask[idx]
        lead = int((qm.sum(1)).max())  # CPU sync: a shape
        R = max(1, int(rm.sum(1).max()))
        return Rollouts(self.query[idx][:, -lead:], qm[:, -lead:], self.response[idx][:, :R],
                        rm[:, :R], self.ended[idx], [self.prompt_index[i] for i in idx.tolist()],
                        **{k: v[idx][:, :R] for k, v in self.per_token().items()})

    def to(self, device) -> Rollouts:
        return Rollouts(self.query.to(device), self.query_mask.to(device),
                        self.response.to(device), self.response_mask.to(device),
                        self.ended.to(device), self.prompt_index,
                        **{k: v.to(device) for k, v in self.per_token().items()})


def concat(chunks: list[Rollouts], pad_id: int) -> Rollouts:
    """One batch from generation chunks of different widths: queries re-left-padded to the
    widest, responses and per-token tensors right-padded (with pad_id / 0) to the longest."""
    P = max(c.query.size(1) for c in chunks)
    R = max(c.response.size(1) for c in chunks)

    def widen(t: torch.Tensor, width: int, value, left: bool = False) -> torch.Tensor:
        extra = width - t.size(1)
        if extra == 0:
            return t
        fill = torch.full((t.size(0), extra), value, dtype=t.dtype, device=t.device)
        return torch.cat([fill, t] if left else [t, fill], 1)

    return Rollouts(
        torch.cat([widen(c.query, P, pad_id, left=True) for c in chunks]),
        torch.cat([widen(c.query_mask, P, 0, left=True) for c in chunks]),
        torch.cat([widen(c.response, R, pad_id) for c in chunks]),
        torch.cat([widen(c.response_mask, R, 0) for c in chunks]),
        torch.cat([c.ended for c in chunks]),
        [i for c in chunks for i in c.prompt_index],
        **{k: torch.cat([widen(getattr(c, k), R, 0) for c in chunks])
           for k in chunks[0].per_token()})


def sampling_config(max_new_tokens: int, temperature: float, top_k: int, top_p: float,
                    stop_ids: list[int], pad_id: int) -> GenerationConfig:
    """Pure sampling from π / temperature (top_k = 0 and top_p = 1 turn truncation off);
    generation stops early once every row has produced EOS or a stop token."""
    return GenerationConfig(do_sample=True, max_new_tokens=max_new_tokens,
                            temperature=temperature, top_k=top_k, top_p=top_p,
                            eos_token_id=list(stop_ids), pad_token_id=pad_id, use_cache=True,
                            return_dict_in_generate=False)


@torch.no_grad()
def generate(policy, prompt_ids: list[list[int]], prompt_index: list[int],
             gen_config: GenerationConfig, stop_ids: list[int], pad_id: int, seed: int,
             device) -> Rollouts:
    """Sample one response per prompt under ``seed``; cut at the first EOS / stop token."""
    query, query_mask = pad(prompt_ids, pad_id, side="left")  # (B, P) each
    query, query_mask = query.to(device), query_mask.to(device)
    devices = [device] if device.type == "cuda" else []
    # generate() fills every field we leave unset from the checkpoint's generation_config
    # (a saved top_k or repetition_penalty would change the behaviour policy): make ours the
    # model's for the call; HF's global defaults then only fill neutral values.
    saved, policy.generation_config = policy.generation_config, gen_config
    try:
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(seed)
            out = policy.generate(input_ids=query, attention_mask=query_mask,
                                  generation_config=gen_config)  # (B, P + R')
    finally:
        policy.generation_config = saved
    response = out[:, query.size(1):]
    if response.size(1) == 0:  # max_new_tokens >= 1 is validated; belt and braces
        raise RuntimeError("generate returned no new tokens")
    response_mask, ended = truncate_at_stop(response, stop_ids)
    response = torch.where(response_mask.bool(), response, pad_id)  # (B, R')
    return Rollouts(query, query_mask, response, response_mask, ended, list(prompt_index))


def step_seed(seed: int, step: int, rank: int, chunk: int) -> int:
    """A distinct 63-bit seed per (run seed, PPO step, rank, chunk)."""
    x = (((seed * 1_000_003 + step) * 65_537 + rank) * 8_191 + chunk) & ((1 << 63) - 1)
    return x or 1
