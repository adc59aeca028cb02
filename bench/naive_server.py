"""The naive baseline: a reward server that runs one forward per request, as it arrives.

This is the design of the simple RM servers in today's RLHF frameworks (an HTTP or gRPC
endpoint that takes a request, runs ``AutoModelForSequenceClassification`` on it, answers):
no queue shared across requests, no cross-request batching, no length grouping, no fused
last-token head. It speaks the same contract as ``rm-server`` (``rlhf.reward.v1.RewardService``
``Score`` and ``ScoreStream``, from protos/reward_pb2*.py), so the same load generator drives
both.

Each request's samples (token ids; text pairs are tokenized as rm-server does) are right-padded
into one batch and run through the HF model's own forward (final norm and score head over every
position, then HF's pick of the last non-pad token) on a single worker thread: forwards run one
at a time, in arrival order (a thread pool would run several forwards at once and thrash the
cores). torch.inference_mode, ``torch.set_num_threads(--num-threads)``; on a GPU
(``--device cuda --dtype bfloat16``) the weights are loaded in that dtype, as such servers do.

    python -m bench.naive_server --model DIR --port 0 --port-file ports.json --num-threads 1

The port file ({"port", "pid"}) is written once the model is loaded and warmed up.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import torch

from protos import reward_pb2 as pb

SERVICE = "rlhf.reward.v1.RewardService"


class NaiveRewardServer:
    def __init__(self, model_dir: str, device: str = "cpu", dtype: str = "float32"):
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        self.device = torch.device(device)
        self.model = AutoModelForSequenceClassification.from_pretrained(
            model_dir, dtype=getattr(torch, dtype)).to(self.device).eval()
        self.pad = self.model.config.pad_token_id
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="naive-model")

    def _ids(self, s: pb.Sample) -> list[int]:
        kind = s.WhichOneof("input")
        if kind == "tokens":
            return list(s.tokens.ids)
        if kind == "text":
            p = self.tokenizer(s.text.prompt)["input_ids"] if s.text.prompt else []
            r = self.tokenizer(s.text.response, add_special_tokens=False)["input_ids"]
            return list(p) + list(r)
        raise ValueError(f"sample {s.id}: only tokens and text inputs are supported here")

    @torch.inference_mode()
    def forward(self, seqs: list[list[int]]) -> list[float]:
        """One padded forward over one request's samples."""
        t = max(len(s) for s in seqs)
        fill = self.pad if self.pad is not None else 0
        ids = torch.full((len(seqs), t), fill, dtype=torch.long)
        mask = torch.zeros((len(seqs), t), dtype=torch.long)
        for b, s in enumerate(seqs):
            ids[b, : len(s)] = torch.tensor(s)
            mask[b, : len(s)] = 1
        ids, mask = ids.to(self.device), mask.to(self.device)
        return self.model(input_ids=ids, attention_mask=mask).logits[:, 0].float().tolist()

    async def _score(self, request: pb.ScoreRequest) -> pb.ScoreResponse:
        seqs = [self._ids(s) for s in request.samples]
        loop = asyncio.get_running_loop()
        rewards = await loop.run_in_executor(self.executor, self.forward, seqs)
        return pb.ScoreResponse(results=[
            pb.ScoreResult(id=s.id, reward=r, num_tokens=len(x))
            for s, r, x in zip(request.samples, rewards, seqs)])

    async def Score(self, request, context):
        return await self._score(request)

    async def ScoreStream(self, request_iterator, context):
        async for request in request_iterator:
            yield await self._score(request)


async def serve(args) -> None:
    torch.set_num_threads(args.num_threads)
    svc = NaiveRewardServer(args.model, args.device, args.dtype)
    await asyncio.get_running_loop().run_in_executor(svc.executor, svc.forward, [[5, 6, 7]])
    server = grpc.aio.server(options=[("grpc.max_receive_message_length", 16 << 20),
                                      ("grpc.max_send_message_length", 16 << 20)])
    handlers = {
        "Score": grpc.unary_unary_rpc_method_handler(
            svc.Score, request_deserializer=pb.ScoreRequest.FromString,
            response_serializer=pb.ScoreResponse.SerializeToString),
        "ScoreStream": grpc.stream_stream_rpc_method_handler(
            svc.ScoreStream, request_deserializer=pb.ScoreRequest.FromString,
            response_serializer=pb.ScoreResponse.SerializeToString),
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))
    port = server.add_insecure_port(f"{args.host}:{args.port}")
    await server.start()
    if args.port_file:
        tmp = Path(args.port_file + ".tmp")
        tmp.write_text(json.dumps({"port": port, "pid": os.getpid()}))
        os.replace(tmp, args.port_file)
    print(f"naive server on {args.host}:{port}", file=sys.stderr, flush=True)
    await server.wait_for_termination()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--port-file")
    ap.add_argument("--num-threads", type=int, default=1)
    ap.add_argument("--device", default="cpu", help="torch device: cpu, cuda, cuda:N")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    args = ap.parse_args()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        asyncio.run(serve(args))
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
