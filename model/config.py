"""Frozen configs for every DC-AR component, and the named presets.

Each module's constructor takes only its own slice (``Encoder(cfg.encoder)``), in the style of
efficientvit's nested DC-AE configs. Full sizes are those of the official dc-ht and dc-ar-512 checkpoints;
their key lists and parameter counts in tests/golden/official-keys/ pin the structure.

Configs serialise to plain dicts (``to_dict``) and are rebuilt from them (``from_dict``), so a weights
directory carries its own architecture (the nanoGPT ``model_args`` pattern).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

from dcar.model.knobs import SamplingKnobs

BLOCK_TYPES = ("ResBlock", "EViT_GLU")
NORMS = ("ln2d", "bn2d")
ACTS = ("relu", "silu")


def _check_choice(name: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"{name}={value!r} is not supported; expected one of {list(allowed)}")


@dataclass(frozen=True)
class EncoderConfig:
    """DC-AE encoder: a stem, one stage per width (residual-autoencoding downsample after each), project-out."""

    width_list: tuple[int, ...] = (128, 256, 512, 512, 1024, 1024)
    depth_list: tuple[int, ...] = (0, 4, 8, 2, 2, 2)
    block_type: tuple[str, ...] = ("ResBlock", "ResBlock", "ResBlock", "EViT_GLU", "EViT_GLU", "EViT_GLU")
    norm: str = "ln2d"
    act: str = "silu"

    def __post_init__(self) -> None:
        _check_lists("encoder", self.width_list, self.depth_list, self.block_type)
        _check_choice("encoder.norm", self.norm, NORMS)
        _check_choice("encoder.act", self.act, ACTS)


@dataclass(frozen=True)
class DecoderConfig:
    """DC-AE decoder: project-in, stages from the deepest up (upsample first), LN + ReLU + conv out."""

    width_list: tuple[int, ...] = (128, 256, 512, 512, 1024, 1024)
    depth_list: tuple[int, ...] = (0, 5, 10, 2, 2, 2)
    block_type: tuple[str, ...] = ("ResBlock", "ResBlock", "ResBlock", "EViT_GLU", "EViT_GLU", "EViT_GLU")
    norm: tuple[str, ...] = ("bn2d", "bn2d", "bn2d", "ln2d", "ln2d", "ln2d")
    act: tuple[str, ...] = ("relu", "relu", "relu", "silu", "silu", "silu")
    out_norm: str = "ln2d"
    out_act: str = "relu"

    def __post_init__(self) -> None:
        _check_lists("decoder", self.width_list, self.depth_list, self.block_type)
        if len(self.norm) != len(self.width_list) or len(self.act) != len(self.width_list):
            raise ValueError(
                f"decoder.norm ({len(self.norm)}) and decoder.act ({len(self.act)}) need one entry per stage "
                f"({len(self.width_list)})"
            )
        for n in (*self.norm, self.out_norm):
            _check_choice("decoder.norm", n, NORMS)
        for a in (*self.act, self.out_act):
            _check_choice("decoder.act", a, ACTS)


def _check_lists(which: str, widths, depths, blocks) -> None:
    if not (len(widths) == len(depths) == len(blocks)):
        raise ValueError(
            f"{which}: width_list ({len(widths)}), depth_list ({len(depths)}) and block_type ({len(blocks)}) "
            "must have the same length"
        )
    for b in blocks:
        _check_choice(f"{which}.block_type", b, BLOCK_TYPES)
    if depths[0] != 0:
        # The official f32 builder only ever uses a depth-0 stage 0 (the stem does the first x2); the other
        # branch of the builder is not reproduced, so refuse rather than build something untested.
        raise ValueError(f"{which}.depth_list[0] must be 0 (stem does the first x2), got {depths[0]}")
    if any(d <= 0 for d in depths[1:]):
        raise ValueError(f"{which}.depth_list[1:] must be positive, got {list(depths)}")


@dataclass(frozen=True)
class TokenizerConfig:
    """DC-HT: a DC-AE-f32 autoencoder plus the l2-normalised hybrid vector quantizer."""

    in_channels: int = 3
    latent_channels: int = 32
    codebook_size: int = 16384
    codebook_l2_norm: bool = True
    commit_loss_beta: float = 0.25
    model_name: str = "dc-ae-f32-in-1.0"
    encoder: EncoderConfig = field(default_factory=EncoderConfig)
    decoder: DecoderConfig = field(default_factory=DecoderConfig)

    def __post_init__(self) -> None:
        if self.encoder.width_list[1:] != self.decoder.width_list[1:]:
            raise ValueError(
                f"encoder widths {self.encoder.width_list} and decoder widths {self.decoder.width_list} differ"
            )

    @property
    def spatial_compression(self) -> int:
        """Pixels per latent position along one side: the stem's x2 times one x2 per downsample."""
        return 2 ** (len(self.encoder.width_list) - 1)

    def to_dict(self) -> dict[str, Any]:
        return {"kind": "tokenizer", **dataclasses.asdict(self)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TokenizerConfig:
        d = {k: v for k, v in d.items() if k != "kind"}
        check_fields(cls, d)
        enc = _section(EncoderConfig, d, "encoder")
        dec = _section(DecoderConfig, d, "decoder")
        return cls(encoder=enc, decoder=dec, **d)

    @classmethod
    def from_official(cls, dcht: dict[str, Any], dc_ae: dict[str, Any] | None = None) -> TokenizerConfig:
        """Build from an official DC-HT ``config.json`` (and optionally the DC-AE structure it selects).

        The official code picks the structure from ``model_name``; only the two f32 names are accepted
        there, so anything else fails here too, naming the value.
        """
        name = dcht.get("model_name")
        if name not in ("dc-ae-f32-in-1.0", "dc-ae-f32-mix-1.0"):
            raise ValueError(
                f"DC-HT config model_name={name!r} is not supported; expected 'dc-ae-f32-in-1.0' or "
                "'dc-ae-f32-mix-1.0'"
            )
        qtype = dcht.get("quantizer_type", "hybrid_vq")
        if qtype != "hybrid_vq":
            raise ValueError(f"DC-HT config quantizer_type={qtype!r} is not supported; expected 'hybrid_vq'")
        enc, dec = EncoderConfig(), DecoderConfig()
        if dc_ae is not None:
            e, r = dc_ae["encoder"], dc_ae["decoder"]
            enc = EncoderConfig(
                width_list=tuple(e["width_list"]),
                depth_list=tuple(e["depth_list"]),
                block_type=tuple(e["block_type"]),
                norm=e["norm"],
                act=e["act"],
            )
            dec = DecoderConfig(
                width_list=tuple(r["width_list"]),
                depth_list=tuple(r["depth_list"]),
                block_type=tuple(r["block_type"]),
                norm=tuple(r["norm"]),
                act=tuple(r["act"]),
                out_norm=r["out_norm"],
                out_act=r["out_act"],
            )
        return cls(
            latent_channels=int(dcht.get("codebook_embed_dim", 32)),
            codebook_size=int(dcht.get("codebook_size", 16384)),
            codebook_l2_norm=bool(dcht.get("codebook_l2_norm", True)),
            commit_loss_beta=float(dcht.get("commit_loss_beta", 0.25)),
            model_name=name,
            encoder=enc,
            decoder=dec,
        )


@dataclass(frozen=True)
class DiffusionHeadConfig:
    """SimpleMLPAdaLN residual head and its iDDPM process (MAR's diffloss, as DC-AR uses it)."""

    width: int = 1024
    depth: int = 6
    num_sampling_steps: int = 32
    train_steps: int = 1000
    noise_schedule: str = "cosine"
    batch_mul: int = 4
    vae_scale: float = 0.107

    def __post_init__(self) -> None:
        _check_choice("diffusion.noise_schedule", self.noise_schedule, ("cosine", "linear"))
        if not 1 <= self.num_sampling_steps <= self.train_steps:
            raise ValueError(
                f"diffusion.num_sampling_steps={self.num_sampling_steps} must be in [1, {self.train_steps}]"
            )


@dataclass(frozen=True)
class GeneratorConfig:
    """The DC-AR transformer: PixArt blocks without adaLN, T5 cross-attention, MaskGIT logits + residual head."""

    hidden_size: int = 1152
    num_layers: int = 28
    num_heads: int = 16
    intermediate_size: int = 4608
    qk_norm: bool = True
    codebook_size: int = 16384
    token_size: int = 32
    image_seq_len: int = 256
    context_dim: int = 768
    text_token_length: int = 300
    class_label_dropout: float = 0.1
    # PixArt's position rule: grid coordinates are index / (grid / base_size). The official code keeps 16
    # for every grid (the goldens' 4x4 table uses coordinates 0, 4, 8, 12).
    pos_embed_base_size: int = 16
    head: DiffusionHeadConfig = field(default_factory=DiffusionHeadConfig)

    def __post_init__(self) -> None:
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size={self.hidden_size} is not divisible by num_heads={self.num_heads}")
        side = math.isqrt(self.image_seq_len)
        if side * side != self.image_seq_len:
            raise ValueError(f"image_seq_len={self.image_seq_len} must be a square number of tokens")

    @property
    def mask_token_id(self) -> int:
        """The [MASK] id is one past the codebook: the embedding has codebook_size + 1 rows."""
        return self.codebook_size

    @property
    def grid_size(self) -> int:
        """Side of the token grid the position table was built for (16 for 512 px)."""
        return math.isqrt(self.image_seq_len)

    def to_dict(self) -> dict[str, Any]:
        return {"kind": "generator", **dataclasses.asdict(self)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> GeneratorConfig:
        d = {k: v for k, v in d.items() if k != "kind"}
        check_fields(cls, d)
        return cls(head=_section(DiffusionHeadConfig, d, "head"), **d)

    @classmethod
    def from_official(cls, cfg: dict[str, Any]) -> GeneratorConfig:
        """Build from the official YAML layout (``model.generator``, ``model.vq_model``, ...)."""
        m = cfg["model"] if "model" in cfg else cfg
        g, vq, diff = m["generator"], m["vq_model"], m["generator"]["diffusion"]
        return cls(
            hidden_size=int(g["hidden_size"]),
            num_layers=int(g["num_hidden_layers"]),
            num_heads=int(g["num_attention_heads"]),
            intermediate_size=int(g["intermediate_size"]),
            qk_norm=bool(g.get("qk_norm", True)),
            codebook_size=int(vq["codebook_size"]),
            token_size=int(vq["token_size"]),
            image_seq_len=int(g["image_seq_len"]),
            context_dim=int(m["context_dim"]),
            text_token_length=int(m["text_token_length"]),
            class_label_dropout=float(g.get("class_label_dropout", 0.1)),
            head=DiffusionHeadConfig(
                width=int(diff["width"]),
                depth=int(diff["depth"]),
                num_sampling_steps=int(diff["num_sampling_steps"]),
                batch_mul=int(diff.get("batch_mul", 4)),
                vae_scale=float(diff["vae_scale"]),
            ),
        )


@dataclass(frozen=True)
class TextEncoderConfig:
    """T5 encoder settings. ``tokenizer`` is "t5" (sentencepiece vocab in the directory) or "byt5" (bytes).

    The layer sizes are only used to build a fresh encoder (tests, training); a weights directory's own
    ``config.json`` wins when loading.
    """

    tokenizer: str = "t5"
    max_length: int = 300
    d_model: int = 768
    num_layers: int = 12
    num_heads: int = 12
    d_kv: int = 64
    d_ff: int = 3072
    vocab_size: int = 32128

    def __post_init__(self) -> None:
        _check_choice("text_encoder.tokenizer", self.tokenizer, ("t5", "byt5"))


@dataclass(frozen=True, kw_only=True)
class SamplingDefaults(SamplingKnobs):
    """A model's own sampling defaults (stored in its model_index.json) and native image side.

    The knobs and their official defaults (the official sample.py / app.py) come from ``SamplingKnobs``.
    """

    size: int = 512


@dataclass(frozen=True)
class PipelineConfig:
    tokenizer: TokenizerConfig
    generator: GeneratorConfig
    text_encoder: TextEncoderConfig
    sampling: SamplingDefaults = field(default_factory=SamplingDefaults)

    def __post_init__(self) -> None:
        t, g = self.tokenizer, self.generator
        if g.codebook_size != t.codebook_size:
            raise ValueError(
                f"generator.codebook_size={g.codebook_size} != tokenizer.codebook_size={t.codebook_size}"
            )
        if g.token_size != t.latent_channels:
            raise ValueError(
                f"generator.token_size={g.token_size} != tokenizer.latent_channels={t.latent_channels}"
            )
        if g.context_dim != self.text_encoder.d_model:
            raise ValueError(
                f"generator.context_dim={g.context_dim} != text_encoder.d_model={self.text_encoder.d_model}"
            )


def _tuples(d: dict[str, Any]) -> dict[str, Any]:
    """JSON turns tuples into lists; frozen configs want tuples back so they stay hashable."""
    return {k: tuple(v) if isinstance(v, list) else v for k, v in d.items()}


# A field's annotation (a string: annotations are postponed) -> the JSON values it accepts, and their name.
_JSON_TYPES: dict[str, tuple[tuple[type, ...], str]] = {
    "int": ((int,), "an integer"),
    "float": ((int, float), "a number"),
    "bool": ((bool,), "true or false"),
    "str": ((str,), "a string"),
}


def _is(value: Any, kinds: tuple[type, ...]) -> bool:
    # JSON's true/false are Python bools, which are ints: an integer field must not take them, nor the reverse.
    return isinstance(value, kinds) and isinstance(value, bool) == (kinds == (bool,))


def check_fields(cls: type, d: dict[str, Any], where: str = "") -> None:
    """Refuse a key that config class ``cls`` lacks, or a value of the wrong JSON type, naming the key.

    ``d`` is a config as read from JSON (lists for tuples, dicts for nested configs, which their own
    ``from_dict`` checks); a key it leaves out keeps the field's default. ``where`` prefixes key names.
    """
    fields = {f.name: str(f.type) for f in dataclasses.fields(cls)}
    for key, value in d.items():
        if key not in fields:
            raise ValueError(f"unknown key {where + key!r}; expected some of {sorted(fields)}")
        kind = fields[key]
        if kind.startswith("tuple["):
            kinds, words = _JSON_TYPES[kind[len("tuple[") :].split(",")[0]]
            ok = isinstance(value, (list, tuple)) and all(_is(v, kinds) for v in value)
            words = f"a list of {words.split(' ', 1)[-1]}s"
        elif kind in _JSON_TYPES:
            kinds, words = _JSON_TYPES[kind]
            ok = _is(value, kinds)
        elif kind.endswith("Config"):  # a nested config, checked by its own from_dict
            ok, words = isinstance(value, dict), "an object"
        else:  # an annotation this check does not know (a union, say): the constructor decides
            continue
        if not ok:
            raise ValueError(f"{where}{key} must be {words}, got {value!r}")


def _section(cls: type, d: dict[str, Any], key: str) -> Any:
    """The nested config ``d[key]`` (removed from ``d``), checked; it has no default worth guessing."""
    if key not in d:
        raise ValueError(f"missing key {key!r}")
    sub = _tuples(d.pop(key))
    check_fields(cls, sub, f"{key}.")
    return cls(**sub)


# --- presets ------------------------------------------------------------------------------------------

DC_HT = TokenizerConfig()
DC_AR_512 = GeneratorConfig()
T5_BASE = TextEncoderConfig()

# Tests: every structural feature of the real models (all stage types, both norms, the qk-norm, CFG
# buffer, head) at a size that runs a full 12-step generation in well under a second on one CPU core.
TINY_HT = TokenizerConfig(
    codebook_size=64,
    encoder=EncoderConfig(width_list=(8, 16, 32, 32, 64, 64), depth_list=(0, 1, 1, 1, 1, 1)),
    decoder=DecoderConfig(width_list=(8, 16, 32, 32, 64, 64), depth_list=(0, 1, 1, 1, 1, 1)),
)
TINY_AR = GeneratorConfig(
    hidden_size=64,
    num_layers=2,
    num_heads=4,
    intermediate_size=256,
    codebook_size=64,
    image_seq_len=16,
    context_dim=32,
    text_token_length=32,
    head=DiffusionHeadConfig(width=64, depth=2, num_sampling_steps=8),
)
TINY_TEXT = TextEncoderConfig(
    tokenizer="byt5", max_length=32, d_model=32, num_layers=1, num_heads=2, d_kv=16, d_ff=64, vocab_size=384
)

PRESETS: dict[str, TokenizerConfig | GeneratorConfig] = {
    "dc-ht": DC_HT,
    "dc-ar-512": DC_AR_512,
    "tiny-ht": TINY_HT,
    "tiny-ar": TINY_AR,
}

PIPELINE_PRESETS: dict[str, PipelineConfig] = {
    "dc-ar-512": PipelineConfig(DC_HT, DC_AR_512, T5_BASE),
    "tiny": PipelineConfig(
        TINY_HT,
        TINY_AR,
        TINY_TEXT,
        SamplingDefaults(residual_steps=8, size=128),
    ),
}


def preset(name: str) -> TokenizerConfig | GeneratorConfig:
    """A component preset by name; unknown names fail with the list of known ones."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; expected one of {sorted(PRESETS)}")
    return PRESETS[name]


def pipeline_preset(name: str) -> PipelineConfig:
    if name not in PIPELINE_PRESETS:
        raise ValueError(f"unknown pipeline preset {name!r}; expected one of {sorted(PIPELINE_PRESETS)}")
    return PIPELINE_PRESETS[name]


PRESET_PREFIX = "preset:"


def weights_preset(spec: str) -> str | None:
    """``"preset:NAME"`` (a randomly initialised pipeline preset) -> NAME, checked; any other spec is a path: None.

    The one reading of the ``preset:`` form, for ``--weights``, ``DCAR_WEIGHTS`` and ``Pipeline.load``.
    """
    if not spec.startswith(PRESET_PREFIX):
        return None
    name = spec[len(PRESET_PREFIX) :]
    if not name:
        raise ValueError(f"weights={spec!r} needs a preset name, e.g. preset:tiny")
    pipeline_preset(name)  # unknown names fail here, listing the known ones
    return name
