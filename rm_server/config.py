"""``rm-server serve``'s configuration: one dataclass, a docstring per field (the CLI's help),
and the checks and derived settings that need no socket and no model."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Literal

from rm_server.batch_policy import BatchPolicy
from rm_server.ports import check_ports


@dataclass
class ServeConfig:
    model: str
    """Reward-model checkpoint: a directory (any HF *ForSequenceClassification), or a hub id
    org/name (see --revision; offline, it must be in the local hub cache)."""
    revision: str | None = None
    """Hub revision (branch, tag or commit) of a hub-id --model."""
    tokenizer: str | None = None
    """Tokenizer directory or hub id (default: the checkpoint's own)."""
    chat_template: str | None = None
    """A Jinja chat-template file replacing the tokenizer's (for Conversation inputs)."""
    trust_remote_code: bool = False
    """Run the checkpoint's own Python code (custom architectures, e.g. a gating head): only for
    checkpoints you trust."""
    recipe: str | None = None
    """Scoring recipe: how text becomes token ids (rm-server, trl, trl-grpo, openrlhf,
    encoder-pair, or a JSON file). Default: the one stored in the checkpoint (rm-server train
    writes it), encoder-pair for encoders (BERT, DeBERTa, ...), else rm-server."""
    reward_head: str | None = None
    """Multi-head RMs (num_labels > 1): the head whose score is the reward (default: the
    first); every head's score is returned either way."""
    head_weights: str | None = None
    """Multi-head RMs: reward = a weighted sum of heads, e.g. helpfulness=0.7,safety=0.3."""
    reward_aggregation: Literal["mean", "min", "uwo"] | None = None
    """Multi-head RMs, an ensemble's members: reward = their mean, min (worst case) or
    uwo = mean − λ·std (uncertainty-weighted). Default: an ensemble's own (config.json
    reward_ensemble), else the first head. A request may ask for another."""
    uncertainty_coef: float | None = None
    """λ of uwo (default: the ensemble's stored one, else 1)."""
    host: str = "127.0.0.1"
    """Address to bind; 127.0.0.1 unless told otherwise (use 0.0.0.0 in a container)."""
    port: int = 50051
    """gRPC port; 0 picks a free one (see --port-file)."""
    metrics_port: int | None = 50053
    """Prometheus /metrics port; 0 picks a free one; --metrics-port -1 disables it. Not 9090:
    that is Prometheus's own port (9091-9094: pushgateway, alertmanager), and the exporter
    range 9100-9999 is fully allocated in Prometheus's default port allocations (node exporter
    9100, NVIDIA DCGM 9400 on GPU nodes, ...). 50053 sits next to the server's other ports
    (gRPC 50051, health 50052 in the image)."""
    metrics_host: str | None = None
    """Address for /metrics (default: same as --host)."""
    http_port: int | None = None
    """HTTP/JSON door (OpenRLHF's /get_reward, vLLM-style /pooling and /classify, /v1/score):
    the same service, batcher, limits and auth as gRPC. Off unless given: a second scoring
    port is a second surface to secure and firewall. 50054 is the conventional choice (next to
    gRPC 50051, health 50052, metrics 50053); 0 picks a free one (see --port-file). HTTPS with
    --tls-cert."""
    http_host: str | None = None
    """Address for the HTTP door (default: same as --host)."""
    port_file: str | None = None
    """Write {"port", "metrics_port", "health_port", "http_port", "pid"} as JSON here once bound
    (for tests and scripts)."""
    model_name: str | None = None
    """Name reported by GetModelInfo and rm_build_info, for every version (default: each
    checkpoint directory's name)."""
    version_label: str | None = None
    """The operator's label of --model's version ("v1", a date, a run id): results name it
    beside the weights hash, and requests may pin it (ScoreRequest.version)."""
    max_versions: int = 2
    """Model versions kept resident (the default among them; the rest serve pinned requests
    and instant rollbacks). Older ones are unloaded, before a load so that one never holds
    more than max(N, 2) models. Each costs its weights' memory: size the pod for N (+1 while
    loading when N = 1)."""
    admin_token_file: str | None = None
    """File holding the admin bearer token: serves AdminService (load a version, change the
    default, unload) and the HTTP door's /v1/admin/ routes to callers presenting it. Not the
    scoring token. Without it there is no admin API: the served version is fixed."""
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    """Parameter dtype."""
    device: str = "cpu"
    """Torch device: cpu, cuda, cuda:N."""
    num_threads: int | None = None
    """torch.set_num_threads for the model thread (default: torch's choice)."""
    max_length: int | None = None
    """Longest input in tokens (default: the model's position limit / tokenizer max)."""
    truncation: Literal["left", "error"] = "left"
    """Over-long inputs: left = drop tokens from the start, keep the scored end
    (truncated=true); error = INVALID_ARGUMENT."""
    prefix_sharing: bool = True
    """Samples that share a token prefix (k responses to one prompt), within a request or
    across requests that meet in the queue, go into one batch, are charged the prefix once in
    --max-batch-tokens, and run it once (decoder RMs)."""
    compile: bool = False
    """torch.compile the model (inductor, dynamic shapes): faster serving, measured in
    bench/RESULTS.md. Needs a C++ compiler (CPU) or Triton (CUDA); compiles before SERVING
    (about a minute for a small model on one core, seconds on a restart: inductor's on-disk
    cache)."""
    max_batch_size: int | None = None
    """A batch closes at this many samples (default: 32 on CUDA, 16 on CPU)."""
    max_batch_tokens: int | None = None
    """A batch closes at this token cost: longest length x samples, a prefix that samples share
    counted once (rm_server/prefix_plan.py; default: 8192 on CUDA, 1024 on CPU, where larger
    batches gain nothing and pad more: bench/RESULTS.md)."""
    max_wait_ms: float = 5.0
    """A batch closes when its oldest sample has waited this long (model idle); not waited at
    all while calls arrive further apart than this on average (no company to wait for)."""
    max_queue: int = 4096
    """Queued samples at most; a request that does not fit is refused with UNAVAILABLE."""
    max_samples_per_request: int = 1024
    """Samples one ScoreRequest may carry."""
    stream_admission_timeout_ms: float = 10_000
    """On a stream, how long a request waits for room in a full queue (backpressure) before the
    stream ends UNAVAILABLE; unary calls are refused at once."""
    max_message_bytes: int = 16 * 1024 * 1024
    """Largest gRPC message received or sent (RESOURCE_EXHAUSTED above it), and largest HTTP
    request body (413)."""
    max_concurrent_rpcs: int | None = 1024
    """RPCs handled at once; grpc answers RESOURCE_EXHAUSTED above it (the HTTP door counts
    its own requests against the same number: 429)."""
    reflection: bool = True
    """Serve gRPC server reflection (--no-reflection to turn it off)."""
    grace_seconds: float = 30.0
    """On shutdown, how long in-flight calls may take to finish."""
    drain_delay_seconds: float = 0.0
    """On shutdown, how long to keep serving after NOT_SERVING before refusing new calls."""
    auth_token_file: str | None = None
    """File holding a bearer token; when set, RewardService calls need 'authorization: Bearer
    <token>' (health is exempt); so do HTTP door requests (Bearer, or Basic with the token as
    the password, for clients that only take a URL: http://rm:TOKEN@host:port/get_reward)."""
    tls_cert: str | None = None
    """PEM server certificate chain: serve TLS on the main port."""
    tls_key: str | None = None
    """PEM private key of --tls-cert."""
    tls_client_ca: str | None = None
    """PEM CA bundle: require client certificates signed by it (mTLS)."""
    health_port: int | None = None
    """Extra plaintext port serving only grpc.health.v1 (for Kubernetes probes when TLS is on)."""
    min_ping_interval_ms: int = 10_000
    """Shortest client keepalive ping interval accepted (faster pings earn GOAWAY
    too_many_pings); the client library pings every 30 s."""
    log_level: str = "info"
    """Logging level: debug, info, warning, error."""


# device type -> (max_batch_size, max_batch_tokens) when not given. On 2 CPU cores a 30M Llama
# peaks at batch 8-16 (64 tokens) and the padding of larger length-grouped batches costs more
# than they gain (bench/RESULTS.md "Serving"); a GPU wants big batches.
BATCH_DEFAULTS = {"cuda": (32, 8192), "cpu": (16, 1024)}


def model_options(cfg: ServeConfig) -> dict:
    """Keyword arguments of ``rm_server.model.RewardModel`` for this config."""
    names = ("dtype", "device", "max_length", "truncation", "prefix_sharing", "compile",
             "tokenizer", "chat_template", "trust_remote_code", "revision", "recipe",
             "reward_head", "head_weights")
    return {"path": cfg.model, "name": cfg.model_name, **{n: getattr(cfg, n) for n in names},
            "reward_aggregation": (cfg.reward_aggregation, cfg.uncertainty_coef)}


def batch_policy(cfg: ServeConfig, device_type: str) -> BatchPolicy:
    """The batching policy. RM_SERVER_BUDGET=padded (internal, for bench.prefix_served's
    baseline) charges every sample at full length, as before prefix-aware batching."""
    size, tokens = BATCH_DEFAULTS.get(device_type, BATCH_DEFAULTS["cuda"])
    padded = os.environ.get("RM_SERVER_BUDGET") == "padded"
    return BatchPolicy(cfg.max_batch_size or size, cfg.max_batch_tokens or tokens,
                       cfg.max_wait_ms / 1000, prefix_sharing=cfg.prefix_sharing and not padded)


def check_config(cfg: ServeConfig) -> None:
    """Reject nonsensical numbers before anything loads (one line, exit 1)."""
    for name in ("max_batch_size", "max_batch_tokens", "max_queue", "max_versions"):
        value = getattr(cfg, name)
        if value is not None and value < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1 (got {value})")
    if cfg.max_wait_ms < 0:
        raise ValueError(f"--max-wait-ms must be >= 0 (got {cfg.max_wait_ms})")
    check_ports(cfg)
