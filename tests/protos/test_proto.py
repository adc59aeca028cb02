"""The wire contract: stubs are fresh, the names clients outside this repository rely on are
there (service, methods, field numbers: add fields freely, never renumber), and the contract
package stays light enough for the client library."""

import subprocess
import sys
from pathlib import Path

from protos import generate as protogen
from protos import reward_pb2 as pb
from protos.service_name import METHOD_PREFIX, SERVICE_NAME


def test_stubs_are_fresh(tmp_path):
    """Regenerate into a temp dir: the committed stubs must be byte-identical (`make protos`)."""
    for generated in protogen.generate(tmp_path):
        committed = protogen.REPO_ROOT / "protos" / generated.name
        assert committed.read_bytes() == generated.read_bytes(), (
            f"{committed} is stale: run `make protos`")


def fields(message: str) -> dict[str, int]:
    return {f.name: f.number for f in pb.DESCRIPTOR.message_types_by_name[message].fields}


def test_contract_names():
    svc = pb.DESCRIPTOR.services_by_name["RewardService"]
    assert svc.full_name == "rlhf.reward.v1.RewardService"
    assert SERVICE_NAME == svc.full_name and METHOD_PREFIX == "/rlhf.reward.v1.RewardService/"
    methods = {m.name: m for m in svc.methods}
    assert set(methods) >= {"Score", "ScoreStream", "GetModelInfo"}
    assert methods["ScoreStream"].client_streaming and methods["ScoreStream"].server_streaming
    assert not methods["Score"].client_streaming
    assert fields("ScoreRequest").items() >= {"samples": 1}.items()
    # the fixed names keep their numbers; fields added since keep theirs (never renumbered)
    assert fields("Sample") == {"id": 1, "text": 2, "conversation": 3, "tokens": 4,
                                "full_text": 5}
    assert fields("TextPair") == {"prompt": 1, "response": 2}
    assert fields("Conversation") == {"messages": 1}
    assert fields("ChatMessage") == {"role": 1, "content": 2}
    assert fields("TokenIds") == {"ids": 1, "prompt_length": 2, "token_type_ids": 3}
    assert fields("FullText") == {"text": 1}
    assert fields("ScoreResponse") == {"results": 1}
    assert fields("ScoreResult").items() >= {"id": 1, "reward": 2, "num_tokens": 3,
                                             "truncated": 4, "head_scores": 5}.items()
    assert fields("ModelInfo").items() >= {"recipe": 22, "recipe_reason": 23, "head_names": 24,
                                           "reward_aggregation": 25,
                                           "accepts_token_type_ids": 26}.items()
    assert fields("ScoringRecipe") == {"name": 1, "join": 2, "special_tokens": 3, "eos": 4,
                                       "chat": 5, "position": 6, "summary": 7}
    info = fields("ModelInfo")
    for name in ("name", "version", "architecture", "max_length", "tokenizer_fingerprint"):
        assert name in info


def test_every_field_has_a_comment():
    """The proto documents every field: each field line is preceded by a // comment line."""
    lines = (protogen.REPO_ROOT / protogen.PROTO).read_text().splitlines()
    import re
    field_re = re.compile(r"^\s+(repeated\s+)?[\w.]+\s+\w+\s*=\s*\d+;")
    for i, line in enumerate(lines):
        if field_re.match(line):
            j = i - 1
            while j >= 0 and field_re.match(lines[j]):  # grouped fields share one comment
                j -= 1
            assert lines[j].strip().startswith("//"), f"no comment above: {line.strip()}"
    assert Path(protogen.REPO_ROOT / "protos" / "reward_pb2.pyi").exists()


def test_the_contract_imports_nothing_heavy():
    """The client library depends on protos: importing it loads no torch or transformers, and
    nothing of this repository outside protos."""
    code = ("import sys, protos.encoding, protos.recipes, protos.service_name, "
            "protos.reward_pb2_grpc; "
            "print(sorted({m.split('.')[0] for m in sys.modules}))")
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            check=True, cwd=protogen.REPO_ROOT).stdout
    for heavy in ("torch", "transformers", "rm_server", "rm_client", "policy_trainer", "kernels"):
        assert f"'{heavy}'" not in loaded, heavy
