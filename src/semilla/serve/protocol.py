"""Request and response schemas: OpenAI's chat and completions API, robo-poet's /v1/generate and
simpleIA's /predict. Requests are validated here, so a route receives native, checked values.

Unknown request fields are ignored (OpenAI clients send options a local model has no use
for); a known field with a bad value is a 400 naming it. Every request body of the server
(these and the accounts routes') is a `Body`: strict types (`"64"` or `true` is not a number)
and text that is valid Unicode.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, StrictBool, StrictStr, field_validator

from semilla.retrieval.fusion import FUSIONS
from semilla.serve.errors import APIError
from semilla.serve.structured import OutputFormat, check_schema

MAX_N = 8
MAX_STOP = 4
MAX_LOGPROBS = 20

# Sampling settings reach the model as float32 tensors: a positive value too small for it (a
# top_p or repetition_penalty of 1e-300 rounds to 0, a temperature of 1e-39 overflows the
# logits) turns the probabilities into NaN and fails every request in the batch, so it is refused.
SMALLEST = 1e-6


def zero_or_at_least_smallest(value: float) -> float:
    if 0 < value < SMALLEST:
        raise ValueError(f"must be 0 (greedy) or at least {SMALLEST}")
    return value


Temperature = Annotated[float, Field(ge=0.0, le=2.0), AfterValidator(zero_or_at_least_smallest)]
TopP = Annotated[float, Field(ge=SMALLEST, le=1.0)]
# integers become int64 tensors and torch generators: bounded so none overflows in the engine
TopK = Annotated[int, Field(ge=0, le=2**31 - 1)]  # >= the vocabulary: keep every token
Seed = Annotated[int, Field(ge=-(2**63), le=2**63 - 1)]
Penalty = Annotated[float, Field(ge=-2.0, le=2.0)]
# OpenAI's logit_bias: {"token id": bias}, at most 300 entries, each within [-100, 100]
LogitBias = Annotated[dict[StrictStr, Annotated[float, Field(ge=-100.0, le=100.0)]], Field(max_length=300)]
Name = Annotated[str, Field(pattern=r"^[a-zA-Z0-9_-]{1,64}$")]  # a schema's or function's name


def refuse_lone_surrogates(value: Any) -> Any:
    """`value` unchanged, unless some text in it cannot be UTF-8 (a lone surrogate such as JSON's
    "\\ud800": tokenizers, the database and the response encoder would all fail on it)."""
    if isinstance(value, str):
        if not value.isascii():
            try:
                value.encode("utf-8")
            except UnicodeEncodeError:
                raise ValueError("must be valid Unicode text (it holds a lone surrogate)") from None
    elif isinstance(value, list | tuple):
        for item in value:
            refuse_lone_surrogates(item)
    elif isinstance(value, dict):
        for key, item in value.items():
            refuse_lone_surrogates(key)
            refuse_lone_surrogates(item)
    return value


class Body(BaseModel):
    """A request body: strict types, and every text field valid Unicode (400 naming the field)."""

    model_config = ConfigDict(strict=True)

    @field_validator("*")
    @classmethod
    def _valid_text(cls, value: Any) -> Any:
        return refuse_lone_surrogates(value)


class Request(Body):
    model_config = ConfigDict(extra="ignore")  # merged with Body's: still strict


class ContentPart(Body):
    """A part of a message's content: text reaches the model; images and audio are a 400 naming them."""

    type: StrictStr
    text: StrictStr | None = None


class FunctionCallIn(Body):
    name: StrictStr
    arguments: StrictStr = "{}"  # JSON text


class ToolCallIn(Body):
    """A call an earlier assistant turn made, sent back with the conversation."""

    id: StrictStr
    type: Literal["function"] = "function"
    function: FunctionCallIn


class ChatMessage(Body):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: StrictStr | list[ContentPart] | None = None
    name: StrictStr | None = None
    tool_calls: list[ToolCallIn] | None = None  # assistant turns
    tool_call_id: StrictStr | None = None  # tool turns: the call this is the result of

    def text(self, param: str = "content") -> str:
        """The content's text; a 400 naming a part semilla cannot read (`param`: where it is)."""
        if not isinstance(self.content, list):
            return self.content or ""
        for j, part in enumerate(self.content):
            if part.type != "text" or part.text is None:
                raise APIError(400, f"{param}.{j}: content parts of type {part.type!r} are not supported "
                               "(only text)", param=f"{param}.{j}.type")  # fmt: skip
        return "".join(part.text or "" for part in self.content)


class StreamOptions(Body):
    include_usage: StrictBool = False


class SamplingFields(Request):
    """The sampling knobs chat and completions share (OpenAI's, then semilla's extensions)."""

    model: StrictStr | None = None  # None: the only (or first) served model
    max_tokens: Annotated[int, Field(ge=1)] | None = None
    temperature: Temperature = 1.0
    top_p: TopP = 1.0
    n: Annotated[int, Field(ge=1, le=MAX_N)] = 1
    stop: StrictStr | Annotated[list[StrictStr], Field(max_length=MAX_STOP)] | None = None
    seed: Seed | None = None
    frequency_penalty: Penalty = 0.0
    presence_penalty: Penalty = 0.0
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    user: StrictStr | None = None
    # semilla extensions (llama.cpp and vLLM accept the same names)
    top_k: TopK = 0
    min_p: Annotated[float, Field(ge=0.0, lt=1.0)] = 0.0
    repetition_penalty: Annotated[float, Field(ge=SMALLEST, le=10.0)] = 1.0
    min_tokens: Annotated[int, Field(ge=0)] = 0
    logit_bias: LogitBias | None = None

    def stop_list(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)


class RagOptions(Request):
    """semilla: ground the answer in a collection's passages (see semilla.retrieval.rag)."""

    collection: StrictStr
    k: Annotated[int, Field(ge=1, le=20)] = 4
    mode: Literal["hybrid", "dense", "bm25"] = "hybrid"
    fusion: Literal["relative_score", "rrf"] = FUSIONS[0]  # how hybrid fuses BM25 and dense
    expand: StrictBool = False  # BM25 again with the first answer's best terms (bm25, hybrid)


class JsonSchemaSpec(Body):
    name: Name
    description: StrictStr | None = None
    schema_: dict[str, Any] = Field(default_factory=dict, alias="schema")
    strict: StrictBool | None = None


class ResponseFormat(Body):
    """OpenAI's response_format: free text, any JSON object, or JSON of a schema."""

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaSpec | None = None

    def output(self, param: str = "response_format") -> OutputFormat | None:
        """What the answer must be; a 400 naming the field for a schema that is not one."""
        if self.type == "text":
            return None
        if self.type == "json_object":
            return OutputFormat({"type": "object"}, param)
        if self.json_schema is None:
            raise APIError(400, f"{param}.json_schema is required when type is 'json_schema'", param=param)
        where = f"{param}.json_schema.schema"
        return OutputFormat(check_schema(self.json_schema.schema_, where), where)


class FunctionSpec(Body):
    name: Name
    description: StrictStr = ""
    parameters: dict[str, Any] | None = None  # a JSON Schema; checked by serve/tools.checked_tools
    strict: StrictBool | None = None


class ToolSpec(Body):
    type: Literal["function"]
    function: FunctionSpec


class NamedFunction(Body):
    name: StrictStr


class NamedToolChoice(Body):
    type: Literal["function"]
    function: NamedFunction


ToolChoice = Literal["none", "auto", "required"] | NamedToolChoice


def tool_choice_name(choice: ToolChoice | None) -> str | None:
    """'none', 'auto', 'required', a function's name, or None when not given."""
    return choice.function.name if isinstance(choice, NamedToolChoice) else choice


class ChatCompletionRequest(SamplingFields):
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_completion_tokens: Annotated[int, Field(ge=1)] | None = None
    logprobs: StrictBool = False
    top_logprobs: Annotated[int, Field(ge=0, le=MAX_LOGPROBS)] | None = None
    conversation_id: StrictStr | None = None  # semilla: append this turn to a stored conversation
    rag: RagOptions | None = None  # semilla: answer from these passages; the response lists `sources`
    response_format: ResponseFormat | None = None
    tools: Annotated[list[ToolSpec], Field(max_length=128)] | None = None
    tool_choice: ToolChoice | None = None
    parallel_tool_calls: StrictBool = True


class CompletionRequest(SamplingFields):
    prompt: (
        StrictStr
        | Annotated[list[StrictStr], Field(min_length=1, max_length=64)]
        | Annotated[list[int], Field(min_length=1)]
        | Annotated[list[Annotated[list[int], Field(min_length=1)]], Field(min_length=1, max_length=64)]
    ) = ""
    echo: StrictBool = False  # with logprobs: the prompt's tokens scored too (the first one null)
    logprobs: Annotated[int, Field(ge=0, le=MAX_LOGPROBS)] | None = None
    suffix: StrictStr | None = None
    max_tokens: Annotated[int, Field(ge=0)] | None = 16  # OpenAI's default; 0: score the prompt only


class GenerateRequest(Request):
    """robo-poet's /v1/generate."""

    text: StrictStr = ""
    model: StrictStr | None = None
    max_length: Annotated[int, Field(ge=1)] = 200
    temperature: Temperature = 0.8
    top_p: TopP = 0.9
    top_k: TopK = 50
    num_samples: Annotated[int, Field(ge=1, le=MAX_N)] = 1
    stop_tokens: Annotated[list[StrictStr], Field(max_length=MAX_STOP)] = Field(default_factory=list)
    seed: Seed | None = None


class PredictRequest(Request):
    """simpleIA's /predict."""

    prompt: StrictStr
    model: StrictStr | None = None
    max_length: Annotated[int, Field(ge=1)] = 100
    num_return_sequences: Annotated[int, Field(ge=1, le=MAX_N)] = 1
    temperature: Temperature = 1.0
    stream: StrictBool = False
    seed: Seed | None = None
