from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ScoreRequest(_message.Message):
    __slots__ = ("samples", "version", "aggregation")
    SAMPLES_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    AGGREGATION_FIELD_NUMBER: _ClassVar[int]
    samples: _containers.RepeatedCompositeFieldContainer[Sample]
    version: str
    aggregation: RewardAggregation
    def __init__(self, samples: _Optional[_Iterable[_Union[Sample, _Mapping]]] = ..., version: _Optional[str] = ..., aggregation: _Optional[_Union[RewardAggregation, _Mapping]] = ...) -> None: ...

class RewardAggregation(_message.Message):
    __slots__ = ("kind", "uncertainty_coef")
    KIND_FIELD_NUMBER: _ClassVar[int]
    UNCERTAINTY_COEF_FIELD_NUMBER: _ClassVar[int]
    kind: str
    uncertainty_coef: float
    def __init__(self, kind: _Optional[str] = ..., uncertainty_coef: _Optional[float] = ...) -> None: ...

class Sample(_message.Message):
    __slots__ = ("id", "text", "conversation", "tokens", "full_text")
    ID_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    CONVERSATION_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    FULL_TEXT_FIELD_NUMBER: _ClassVar[int]
    id: str
    text: TextPair
    conversation: Conversation
    tokens: TokenIds
    full_text: FullText
    def __init__(self, id: _Optional[str] = ..., text: _Optional[_Union[TextPair, _Mapping]] = ..., conversation: _Optional[_Union[Conversation, _Mapping]] = ..., tokens: _Optional[_Union[TokenIds, _Mapping]] = ..., full_text: _Optional[_Union[FullText, _Mapping]] = ...) -> None: ...

class TextPair(_message.Message):
    __slots__ = ("prompt", "response")
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    RESPONSE_FIELD_NUMBER: _ClassVar[int]
    prompt: str
    response: str
    def __init__(self, prompt: _Optional[str] = ..., response: _Optional[str] = ...) -> None: ...

class Conversation(_message.Message):
    __slots__ = ("messages",)
    MESSAGES_FIELD_NUMBER: _ClassVar[int]
    messages: _containers.RepeatedCompositeFieldContainer[ChatMessage]
    def __init__(self, messages: _Optional[_Iterable[_Union[ChatMessage, _Mapping]]] = ...) -> None: ...

class ChatMessage(_message.Message):
    __slots__ = ("role", "content")
    ROLE_FIELD_NUMBER: _ClassVar[int]
    CONTENT_FIELD_NUMBER: _ClassVar[int]
    role: str
    content: str
    def __init__(self, role: _Optional[str] = ..., content: _Optional[str] = ...) -> None: ...

class TokenIds(_message.Message):
    __slots__ = ("ids", "prompt_length", "token_type_ids")
    IDS_FIELD_NUMBER: _ClassVar[int]
    PROMPT_LENGTH_FIELD_NUMBER: _ClassVar[int]
    TOKEN_TYPE_IDS_FIELD_NUMBER: _ClassVar[int]
    ids: _containers.RepeatedScalarFieldContainer[int]
    prompt_length: int
    token_type_ids: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, ids: _Optional[_Iterable[int]] = ..., prompt_length: _Optional[int] = ..., token_type_ids: _Optional[_Iterable[int]] = ...) -> None: ...

class FullText(_message.Message):
    __slots__ = ("text",)
    TEXT_FIELD_NUMBER: _ClassVar[int]
    text: str
    def __init__(self, text: _Optional[str] = ...) -> None: ...

class ScoreResponse(_message.Message):
    __slots__ = ("results",)
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    results: _containers.RepeatedCompositeFieldContainer[ScoreResult]
    def __init__(self, results: _Optional[_Iterable[_Union[ScoreResult, _Mapping]]] = ...) -> None: ...

class ScoreResult(_message.Message):
    __slots__ = ("id", "reward", "num_tokens", "truncated", "head_scores", "version", "version_label", "head_mean", "head_std")
    ID_FIELD_NUMBER: _ClassVar[int]
    REWARD_FIELD_NUMBER: _ClassVar[int]
    NUM_TOKENS_FIELD_NUMBER: _ClassVar[int]
    TRUNCATED_FIELD_NUMBER: _ClassVar[int]
    HEAD_SCORES_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    VERSION_LABEL_FIELD_NUMBER: _ClassVar[int]
    HEAD_MEAN_FIELD_NUMBER: _ClassVar[int]
    HEAD_STD_FIELD_NUMBER: _ClassVar[int]
    id: str
    reward: float
    num_tokens: int
    truncated: bool
    head_scores: _containers.RepeatedScalarFieldContainer[float]
    version: str
    version_label: str
    head_mean: float
    head_std: float
    def __init__(self, id: _Optional[str] = ..., reward: _Optional[float] = ..., num_tokens: _Optional[int] = ..., truncated: _Optional[bool] = ..., head_scores: _Optional[_Iterable[float]] = ..., version: _Optional[str] = ..., version_label: _Optional[str] = ..., head_mean: _Optional[float] = ..., head_std: _Optional[float] = ...) -> None: ...

class GetModelInfoRequest(_message.Message):
    __slots__ = ("version",)
    VERSION_FIELD_NUMBER: _ClassVar[int]
    version: str
    def __init__(self, version: _Optional[str] = ...) -> None: ...

class ModelInfo(_message.Message):
    __slots__ = ("name", "version", "architecture", "max_length", "tokenizer_fingerprint", "has_reward_stats", "reward_mean", "reward_std", "model_type", "vocab_size", "dtype", "device", "truncation", "has_chat_template", "bos_token_id", "eos_token_id", "pad_token_id", "max_samples_per_request", "scoring_path", "num_parameters", "server_version", "recipe", "recipe_reason", "head_names", "reward_aggregation", "accepts_token_type_ids", "version_label", "resident_versions", "default_version", "ensemble_members", "uncertainty_coef")
    NAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    ARCHITECTURE_FIELD_NUMBER: _ClassVar[int]
    MAX_LENGTH_FIELD_NUMBER: _ClassVar[int]
    TOKENIZER_FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    HAS_REWARD_STATS_FIELD_NUMBER: _ClassVar[int]
    REWARD_MEAN_FIELD_NUMBER: _ClassVar[int]
    REWARD_STD_FIELD_NUMBER: _ClassVar[int]
    MODEL_TYPE_FIELD_NUMBER: _ClassVar[int]
    VOCAB_SIZE_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    TRUNCATION_FIELD_NUMBER: _ClassVar[int]
    HAS_CHAT_TEMPLATE_FIELD_NUMBER: _ClassVar[int]
    BOS_TOKEN_ID_FIELD_NUMBER: _ClassVar[int]
    EOS_TOKEN_ID_FIELD_NUMBER: _ClassVar[int]
    PAD_TOKEN_ID_FIELD_NUMBER: _ClassVar[int]
    MAX_SAMPLES_PER_REQUEST_FIELD_NUMBER: _ClassVar[int]
    SCORING_PATH_FIELD_NUMBER: _ClassVar[int]
    NUM_PARAMETERS_FIELD_NUMBER: _ClassVar[int]
    SERVER_VERSION_FIELD_NUMBER: _ClassVar[int]
    RECIPE_FIELD_NUMBER: _ClassVar[int]
    RECIPE_REASON_FIELD_NUMBER: _ClassVar[int]
    HEAD_NAMES_FIELD_NUMBER: _ClassVar[int]
    REWARD_AGGREGATION_FIELD_NUMBER: _ClassVar[int]
    ACCEPTS_TOKEN_TYPE_IDS_FIELD_NUMBER: _ClassVar[int]
    VERSION_LABEL_FIELD_NUMBER: _ClassVar[int]
    RESIDENT_VERSIONS_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_VERSION_FIELD_NUMBER: _ClassVar[int]
    ENSEMBLE_MEMBERS_FIELD_NUMBER: _ClassVar[int]
    UNCERTAINTY_COEF_FIELD_NUMBER: _ClassVar[int]
    name: str
    version: str
    architecture: str
    max_length: int
    tokenizer_fingerprint: str
    has_reward_stats: bool
    reward_mean: float
    reward_std: float
    model_type: str
    vocab_size: int
    dtype: str
    device: str
    truncation: str
    has_chat_template: bool
    bos_token_id: int
    eos_token_id: int
    pad_token_id: int
    max_samples_per_request: int
    scoring_path: str
    num_parameters: int
    server_version: str
    recipe: ScoringRecipe
    recipe_reason: str
    head_names: _containers.RepeatedScalarFieldContainer[str]
    reward_aggregation: str
    accepts_token_type_ids: bool
    version_label: str
    resident_versions: _containers.RepeatedCompositeFieldContainer[ModelVersion]
    default_version: str
    ensemble_members: int
    uncertainty_coef: float
    def __init__(self, name: _Optional[str] = ..., version: _Optional[str] = ..., architecture: _Optional[str] = ..., max_length: _Optional[int] = ..., tokenizer_fingerprint: _Optional[str] = ..., has_reward_stats: _Optional[bool] = ..., reward_mean: _Optional[float] = ..., reward_std: _Optional[float] = ..., model_type: _Optional[str] = ..., vocab_size: _Optional[int] = ..., dtype: _Optional[str] = ..., device: _Optional[str] = ..., truncation: _Optional[str] = ..., has_chat_template: _Optional[bool] = ..., bos_token_id: _Optional[int] = ..., eos_token_id: _Optional[int] = ..., pad_token_id: _Optional[int] = ..., max_samples_per_request: _Optional[int] = ..., scoring_path: _Optional[str] = ..., num_parameters: _Optional[int] = ..., server_version: _Optional[str] = ..., recipe: _Optional[_Union[ScoringRecipe, _Mapping]] = ..., recipe_reason: _Optional[str] = ..., head_names: _Optional[_Iterable[str]] = ..., reward_aggregation: _Optional[str] = ..., accepts_token_type_ids: _Optional[bool] = ..., version_label: _Optional[str] = ..., resident_versions: _Optional[_Iterable[_Union[ModelVersion, _Mapping]]] = ..., default_version: _Optional[str] = ..., ensemble_members: _Optional[int] = ..., uncertainty_coef: _Optional[float] = ...) -> None: ...

class ModelVersion(_message.Message):
    __slots__ = ("version", "label", "is_default", "name", "tokenizer_fingerprint", "loaded_at", "load_seconds")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    LABEL_FIELD_NUMBER: _ClassVar[int]
    IS_DEFAULT_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    TOKENIZER_FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    LOADED_AT_FIELD_NUMBER: _ClassVar[int]
    LOAD_SECONDS_FIELD_NUMBER: _ClassVar[int]
    version: str
    label: str
    is_default: bool
    name: str
    tokenizer_fingerprint: str
    loaded_at: float
    load_seconds: float
    def __init__(self, version: _Optional[str] = ..., label: _Optional[str] = ..., is_default: _Optional[bool] = ..., name: _Optional[str] = ..., tokenizer_fingerprint: _Optional[str] = ..., loaded_at: _Optional[float] = ..., load_seconds: _Optional[float] = ...) -> None: ...

class LoadVersionRequest(_message.Message):
    __slots__ = ("path", "label", "make_default")
    PATH_FIELD_NUMBER: _ClassVar[int]
    LABEL_FIELD_NUMBER: _ClassVar[int]
    MAKE_DEFAULT_FIELD_NUMBER: _ClassVar[int]
    path: str
    label: str
    make_default: bool
    def __init__(self, path: _Optional[str] = ..., label: _Optional[str] = ..., make_default: _Optional[bool] = ...) -> None: ...

class SetDefaultVersionRequest(_message.Message):
    __slots__ = ("version",)
    VERSION_FIELD_NUMBER: _ClassVar[int]
    version: str
    def __init__(self, version: _Optional[str] = ...) -> None: ...

class UnloadVersionRequest(_message.Message):
    __slots__ = ("version",)
    VERSION_FIELD_NUMBER: _ClassVar[int]
    version: str
    def __init__(self, version: _Optional[str] = ...) -> None: ...

class VersionsResponse(_message.Message):
    __slots__ = ("version", "resident", "default_version", "unloaded")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    RESIDENT_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_VERSION_FIELD_NUMBER: _ClassVar[int]
    UNLOADED_FIELD_NUMBER: _ClassVar[int]
    version: ModelVersion
    resident: _containers.RepeatedCompositeFieldContainer[ModelVersion]
    default_version: str
    unloaded: _containers.RepeatedCompositeFieldContainer[ModelVersion]
    def __init__(self, version: _Optional[_Union[ModelVersion, _Mapping]] = ..., resident: _Optional[_Iterable[_Union[ModelVersion, _Mapping]]] = ..., default_version: _Optional[str] = ..., unloaded: _Optional[_Iterable[_Union[ModelVersion, _Mapping]]] = ...) -> None: ...

class ScoringRecipe(_message.Message):
    __slots__ = ("name", "join", "special_tokens", "eos", "chat", "position", "summary")
    NAME_FIELD_NUMBER: _ClassVar[int]
    JOIN_FIELD_NUMBER: _ClassVar[int]
    SPECIAL_TOKENS_FIELD_NUMBER: _ClassVar[int]
    EOS_FIELD_NUMBER: _ClassVar[int]
    CHAT_FIELD_NUMBER: _ClassVar[int]
    POSITION_FIELD_NUMBER: _ClassVar[int]
    SUMMARY_FIELD_NUMBER: _ClassVar[int]
    name: str
    join: str
    special_tokens: bool
    eos: str
    chat: str
    position: str
    summary: str
    def __init__(self, name: _Optional[str] = ..., join: _Optional[str] = ..., special_tokens: _Optional[bool] = ..., eos: _Optional[str] = ..., chat: _Optional[str] = ..., position: _Optional[str] = ..., summary: _Optional[str] = ...) -> None: ...
