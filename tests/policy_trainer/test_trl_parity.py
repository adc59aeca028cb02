"""An RM trained here by TRL's own ``RewardTrainer`` (a few CPU steps on a tiny Llama) and served
by us with the "trl" recipe scores, over gRPC, exactly what TRL's scoring of the same text gives:
TRL's ``_prepare_dataset`` (add_eos, then prompt + completion tokenized with special tokens),
its ``DataCollatorForPreference`` and its ``compute_loss`` forward (1e-5). With pad == eos (TRL
sets pad = eos when the tokenizer has none) HF's rule skips the appended EOS: that too is TRL's
scoring. The model card TRL writes with its checkpoints makes the server pick "trl" unasked.
"""

from __future__ import annotations

import grpc
import pytest
import torch

from protos import reward_pb2 as pb
from protos import reward_pb2_grpc as pb_grpc
from protos.encoding import TextInput
from rm_client.samples import text_sample
from rm_server.launch import start_server
from rm_server.model import RewardModel
from tests import tiny

trl = pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")

TRAIN = [{"prompt": "the movie was", "chosen": " great fun and wonderful",
          "rejected": " boring and awful"},
         {"prompt": "i think it", "chosen": " was really good", "rejected": " was really bad"},
         {"prompt": "the acting", "chosen": " was the best", "rejected": " was the worst"},
         {"prompt": "this film", "chosen": " is loved", "rejected": " is hated"}] * 2
HELD_OUT = [{"prompt": "the music was", "chosen": " wonderful", "rejected": " dull"},
            {"prompt": "", "chosen": "a great story", "rejected": "a terrible plot"},
            {"prompt": "we", "chosen": " loved it</s>", "rejected": " hated it\n"}]


def train_with_trl(out, pad: str):
    """A tiny Llama trained by TRL's RewardTrainer for 3 steps on the CPU, saved to ``out``."""
    from transformers import AutoModelForSequenceClassification
    from trl import RewardConfig, RewardTrainer

    tok = tiny.train_tokenizer(pad=pad)
    base = tiny.make_reward_model("llama", tok, out.parent / f"base-{pad}", seed=5)
    model = AutoModelForSequenceClassification.from_pretrained(base)
    args = RewardConfig(output_dir=str(out), max_steps=3, per_device_train_batch_size=4,
                        learning_rate=5e-3, bf16=False, use_cpu=True, report_to=[],
                        save_strategy="steps", save_steps=3, logging_steps=1,
                        dataset_num_proc=None, seed=0)
    trainer = RewardTrainer(model=model, args=args, processing_class=tok,
                            train_dataset=datasets.Dataset.from_list(TRAIN))
    trainer.train()
    trainer.save_model(str(out))
    return trainer


def trl_scores(trainer) -> list[float]:
    """TRL's own scoring of HELD_OUT's chosen texts: _prepare_dataset -> its collator ->
    compute_loss's forward (outputs.logits, chosen half)."""
    ds = trainer._prepare_dataset(datasets.Dataset.from_list(HELD_OUT), trainer.processing_class,
                                  trainer.args, "held_out")
    batch = trainer.data_collator([ds[i] for i in range(len(ds))])
    trainer.model.eval()
    with torch.no_grad():
        _, outputs = trainer.compute_loss(trainer.model, batch, return_outputs=True)
    return outputs.logits[: len(HELD_OUT), 0].tolist()


@pytest.mark.parametrize("pad", ["own", "eos"])
def test_trl_trained_rm_served_with_the_trl_recipe_scores_as_trl(tmp_path, pad):
    out = tmp_path / f"trl-rm-{pad}"
    trainer = train_with_trl(out, pad)
    want = trl_scores(trainer)
    assert max(want) - min(want) > 0.05, "scores must differ across inputs for parity to matter"
    samples = [text_sample(str(i), r["prompt"], r["chosen"]) for i, r in enumerate(HELD_OUT)]
    args = [] if pad == "own" else ["--recipe", "trl"]
    if pad == "own":  # TRL's checkpoint model card (tags: trl, reward-trainer) says "trl"
        assert "- reward-trainer" in (out / "README.md").read_text()
    server = start_server(out, *args)
    try:
        with grpc.insecure_channel(server.address) as ch:
            stub = pb_grpc.RewardServiceStub(ch)
            info = stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=30)
            got = [r.reward for r in stub.Score(pb.ScoreRequest(samples=samples),
                                                timeout=60).results]
    finally:
        server.stop()
    assert info.recipe.name == "trl"
    assert info.recipe_reason == ("--recipe" if args else
                                  "detected: the model card's reward-trainer tag (TRL)")
    assert max(abs(a - b) for a, b in zip(got, want)) <= 1e-5, (got, want)
    # This project's own layout (no EOS) scores another token, except with pad == eos: there
    # HF's rule skips TRL's appended EOS and reads the token before it, which is ours.
    ours = RewardModel(out, recipe="rm-server")
    mine = ours.score([ours.encoder.encode(TextInput(r["prompt"], r["chosen"])).ids
                       for r in HELD_OUT])
    same = max(abs(a - b) for a, b in zip(mine, want)) <= 1e-5
    assert same == (pad == "eos")
