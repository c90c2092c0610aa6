"""Loading models and tokenizers: a Hugging Face folder or hub name, or the embedded small Llama.

The embedded default needs no download: a byte-level tokenizer (ByT5's, which builds from no
files; `align.embedded_tokenizer` gives it its chat format) and a Llama built from
`model.embedded`. A peft adapter folder (a LoRA run's `final/`)
loads as its base model with the adapter merged in, so any stage's `final/` can start the
next. LoRA wrapping (peft) is here too, so every stage gets the same model whatever it trains.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Literal

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    LlamaConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from align.config import EMBEDDED, LoraConfig, ModelConfig
from align.embedded_tokenizer import embedded_tokenizer
from align.errors import ConfigError, ModelError
from align.hub import require_hub

ModelKind = Literal["causal_lm", "sequence_classification"]

ADAPTER_CONFIG = "adapter_config.json"
MAX_ADAPTER_DEPTH = 32  # adapters over adapters, each stage's final/ over the one before


def is_embedded(name_or_path: str) -> bool:
    return name_or_path == EMBEDDED


def adapter_base(name_or_path: str) -> str | None:
    """The model a peft adapter folder was trained over (its `base_model_name_or_path`, itself
    possibly an adapter folder), or None when `name_or_path` is not an adapter folder.

    Raises:
        ModelError: the adapter's config names no base model.
    """
    folder = Path(name_or_path).expanduser()
    adapter = folder / ADAPTER_CONFIG
    if (folder / "config.json").is_file() or not adapter.is_file():
        return None
    base = json.loads(adapter.read_text()).get("base_model_name_or_path")
    if not base:
        raise ModelError(f"{adapter} names no base model (base_model_name_or_path); set it to "
                         "the folder or hub name the adapter was trained on")
    return base


def config_source(name_or_path: str) -> str:
    """Where the architecture of `name_or_path` is defined: the folder or hub name itself, or,
    for an adapter folder, the full model under its chain of adapters (config.json and
    generation_config.json are read there).

    Raises:
        ModelError: adapters that name each other in a loop.
    """
    name = name_or_path
    for _ in range(MAX_ADAPTER_DEPTH):
        base = adapter_base(name)
        if base is None:
            return name
        name = base
    raise ModelError(f"model.name_or_path: '{name_or_path}' is an adapter over more than "
                     f"{MAX_ADAPTER_DEPTH} adapters (do their base_model_name_or_path values "
                     "form a loop?)")


def load_tokenizer(cfg: ModelConfig) -> PreTrainedTokenizerBase:
    """The tokenizer named by `model.tokenizer` (default: the model's), with a pad token."""
    name = cfg.tokenizer or cfg.name_or_path
    if is_embedded(name):
        tok = embedded_tokenizer(cfg.embedded.chat_format)
    else:
        _check_model_source(name, "model.tokenizer" if cfg.tokenizer else "model.name_or_path")
        try:
            tok = AutoTokenizer.from_pretrained(name, trust_remote_code=cfg.trust_remote_code)
        except (OSError, ValueError) as exc:
            raise ModelError(f"model.tokenizer: cannot load tokenizer '{name}': {exc}") from None
    if cfg.chat_template is not None:
        tok.chat_template = read_chat_template(cfg.chat_template)
    if tok.pad_token_id is None:
        # Reusing EOS as pad is safe here because losses mask padding by attention/labels,
        # never by comparing ids with pad_token_id.
        tok.pad_token = tok.eos_token
    return tok


def read_chat_template(value: str) -> str:
    """`model.chat_template`: the template itself, or the path of a file holding one.

    Raises:
        ConfigError: a value that is neither a readable file nor a valid Jinja template (the
            message gives the template error).
    """
    path = Path(value).expanduser()
    template = value
    if "{" not in value:
        if not path.is_file():
            raise ConfigError(f"model.chat_template: {value!r} is neither a file nor a Jinja "
                              "template (a template holds {% ... %} or {{ ... }})")
        template = path.read_text()
    try:
        import jinja2

        jinja2.Environment().parse(template)
    except jinja2.TemplateSyntaxError as exc:
        where = f"{path}: " if template is not value else ""
        raise ConfigError(f"model.chat_template: {where}invalid Jinja template: {exc}") from None
    return template


def resolve_dtype(name: str) -> torch.dtype:
    """`auto` means bf16 where a GPU supports it and fp32 otherwise (CPU bf16 is slow here)."""
    if name == "auto":
        if torch.cuda.is_available() and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def embedded_config(cfg: ModelConfig, tokenizer: PreTrainedTokenizerBase) -> LlamaConfig:
    e = cfg.embedded
    return LlamaConfig(
        vocab_size=len(tokenizer),  # ByT5: vocab_size is 256 but ids reach len(tok)
        hidden_size=e.hidden_size,
        num_hidden_layers=e.num_layers,
        num_attention_heads=e.num_heads,
        num_key_value_heads=e.num_heads,
        intermediate_size=e.intermediate_size,
        max_position_embeddings=e.max_position_embeddings,
        initializer_range=e.initializer_range,
        tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
    )


def load_model(cfg: ModelConfig, tokenizer: PreTrainedTokenizerBase,
               kind: ModelKind = "causal_lm") -> PreTrainedModel:
    """Build or load the model; a `sequence_classification` model has one output (a score)."""
    auto = AutoModelForCausalLM if kind == "causal_lm" else AutoModelForSequenceClassification
    dtype = resolve_dtype(cfg.dtype)
    extra = {"num_labels": 1} if kind == "sequence_classification" else {}
    if cfg.attn_implementation:
        extra["attn_implementation"] = cfg.attn_implementation
    base = adapter_base(cfg.name_or_path)
    if base is not None:
        config_source(cfg.name_or_path)  # a loop of adapters fails here, not by recursion
        model = _merged_adapter(cfg, tokenizer, kind, base)
    elif is_embedded(cfg.name_or_path):
        config = embedded_config(cfg, tokenizer)
        for key, value in extra.items():
            setattr(config, key, value)
        with _seeded(cfg.embedded.seed):
            model = auto.from_config(config, dtype=dtype)
    else:
        _check_model_source(cfg.name_or_path)
        try:
            model = auto.from_pretrained(cfg.name_or_path, dtype=dtype,
                                         trust_remote_code=cfg.trust_remote_code,
                                         use_safetensors=_prefers_safetensors(cfg.name_or_path),
                                         **extra)
        except (OSError, ValueError) as exc:
            raise ModelError(f"model.name_or_path: cannot load '{cfg.name_or_path}': "
                             f"{exc}") from None
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(
            gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    return model


def _merged_adapter(cfg: ModelConfig, tokenizer: PreTrainedTokenizerBase, kind: ModelKind,
                    base: str) -> PreTrainedModel:
    """The adapter folder `cfg.name_or_path` merged into `base` (loaded like any model, so an
    adapter over an adapter works too). The model is named after the adapter folder, so a new
    adapter trained on it records that folder as its base."""
    from peft import PeftConfig, PeftModel

    inner = dataclasses.replace(cfg, name_or_path=base, gradient_checkpointing=False)
    model = load_model(inner, tokenizer, kind)
    try:
        settings = PeftConfig.from_pretrained(cfg.name_or_path)
        if kind == "sequence_classification" and settings.task_type == "CAUSAL_LM":
            # A policy's adapter under a new score head (a critic, a reward model): only the
            # backbone's layers are adapted, which peft's causal-LM wrapper cannot hold.
            settings.task_type = None
        model = PeftModel.from_pretrained(model, cfg.name_or_path, config=settings)
        model = model.merge_and_unload()
    except (OSError, ValueError, RuntimeError) as exc:
        raise ModelError(f"model.name_or_path: cannot apply the adapter '{cfg.name_or_path}' "
                         f"to its base '{base}': {exc}") from None
    model.name_or_path = model.config.name_or_path = cfg.name_or_path
    return model


def apply_lora(model: PreTrainedModel, cfg: LoraConfig, kind: ModelKind = "causal_lm"):
    """Wrap `model` with fresh LoRA adapters; only adapter (and score head) weights train."""
    from peft import LoraConfig as PeftLoraConfig
    from peft import TaskType, get_peft_model

    task = TaskType.CAUSAL_LM if kind == "causal_lm" else TaskType.SEQ_CLS
    peft_cfg = PeftLoraConfig(r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout,
                              target_modules=cfg.target_modules, task_type=task)
    try:
        return get_peft_model(model, peft_cfg)
    except ValueError as exc:
        raise ModelError(f"model.lora.target_modules={cfg.target_modules!r} does not fit "
                         f"this model: {exc}") from None


def check_lora_targets(cfg: ModelConfig, tokenizer: PreTrainedTokenizerBase,
                       kind: ModelKind = "causal_lm") -> None:
    """Fail early (on the driver, before any output is written) if LoRA fits no layer.

    The model is built on the meta device: no weights are read or allocated.
    """
    if not cfg.lora.enabled:
        return
    auto = AutoModelForCausalLM if kind == "causal_lm" else AutoModelForSequenceClassification
    if is_embedded(cfg.name_or_path):
        config = embedded_config(cfg, tokenizer)
    else:
        _check_model_source(cfg.name_or_path)
        try:
            config = AutoConfig.from_pretrained(config_source(cfg.name_or_path),
                                                trust_remote_code=cfg.trust_remote_code)
        except (OSError, ValueError) as exc:
            raise ModelError(f"model.name_or_path: cannot load '{cfg.name_or_path}': "
                             f"{exc}") from None
    if kind == "sequence_classification":
        config.num_labels = 1
    with torch.device("meta"):
        model = auto.from_config(config, trust_remote_code=cfg.trust_remote_code)
    apply_lora(model, cfg.lora, kind)


def _check_model_source(name: str, key: str = "model.name_or_path") -> None:
    """A local path must be a model folder (or a peft adapter folder over one); a hub id
    (`name` or `org/name`) must be reachable or cached (align.hub)."""
    path = Path(name).expanduser()
    looks_local = name.startswith((".", "/", "~")) or path.exists() or name.count("/") > 1
    if not looks_local:
        require_hub(name, key)
        return
    if not path.exists():
        raise ModelError(f"{key}: '{name}' does not exist (if it is an earlier stage's "
                         "output, run that stage first, e.g. `align sft "
                         "configs/arithmetic/sft.yaml`)")
    if key != "model.name_or_path" or (path / "config.json").is_file():
        return
    base = adapter_base(name)
    if base is None:
        raise ModelError(f"{key}: '{name}' is not a model folder (no config.json or "
                         f"{ADAPTER_CONFIG} there)")
    config_source(name)  # adapters naming each other in a loop fail here
    try:
        _check_model_source(base, key)
    except ModelError as exc:
        raise ModelError(f"{key}: '{name}' is an adapter over '{base}' (its {ADAPTER_CONFIG}), "
                         f"which cannot be loaded: {exc}") from None


def _prefers_safetensors(name: str) -> bool | None:
    """Read weights through safetensors when a local folder has them (no pickle)."""
    path = Path(name).expanduser()
    if path.is_dir():
        return any(path.glob("*.safetensors")) or None
    return None


class _seeded:
    """Seed torch's global RNG for a block and restore it after (deterministic init)."""

    def __init__(self, seed: int) -> None:
        self.seed = seed

    def __enter__(self) -> None:
        self.state = torch.random.get_rng_state()
        torch.manual_seed(self.seed)

    def __exit__(self, *exc: object) -> None:
        torch.random.set_rng_state(self.state)


def disable_dropout(model: torch.nn.Module) -> None:
    """Set every dropout rate of `model` to 0, as TRL's `disable_dropout_in_model` does.

    Besides `nn.Dropout` modules (and LoRA's), attention layers keep their rate as a float
    (Llama's `attention_dropout`, OPT's `dropout`) and a few models read it from their config
    during forward (Falcon, GPT-Neo): all are zeroed, so a train-mode forward computes exactly
    what an eval-mode one does. The saved config therefore records rate 0.
    """
    for module in model.modules():
        if isinstance(module, torch.nn.modules.dropout._DropoutNd):
            module.p = 0.0
        _zero_dropout_rates(module)
    configs = [getattr(m, "config", None) for m in model.modules()]
    for config in {id(c): c for c in configs if c is not None}.values():
        _zero_dropout_rates(config)


def _zero_dropout_rates(obj: object) -> None:
    """Zero the float attributes of `obj` named like a dropout rate (`*dropout*`, `*pdrop`)."""
    for name, value in list(vars(obj).items()):
        if isinstance(value, float) and ("dropout" in name or name.endswith("pdrop")
                                         or name == "layerdrop"):
            setattr(obj, name, 0.0)
