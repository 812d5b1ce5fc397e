"""``Pipeline``: DC-HT + DC-AR + T5 loaded once, with the sampler on top. The one entry point of model/.

Two weight layouts go through the same code (weights/README.md):

* ours: ``model_index.json`` + ``tokenizer/``, ``generator/`` (config.json + model.safetensors each) and
  ``text_encoder/`` (a transformers T5 directory);
* the official one, unchanged: ``dc-ht/`` (config.json with model_type dc_ht + weights),
  ``dc-ar-512/pytorch_model.bin`` (a bare state dict; architecture from the ``dc-ar-512`` preset) and
  ``t5-base/``. Both are loaded strictly.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable, Sequence
from dataclasses import asdict, replace
from pathlib import Path
from typing import TypeVar

import torch
from PIL import Image
from safetensors.torch import save_file

from dcar.model.config import (
    DC_AR_512,
    T5_BASE,
    GeneratorConfig,
    PipelineConfig,
    SamplingDefaults,
    TextEncoderConfig,
    TokenizerConfig,
    check_fields,
    pipeline_preset,
    weights_preset,
)
from dcar.model.images import mask_to_tensor, pil_to_tensor
from dcar.model.knobs import knob_values
from dcar.model.loading import (
    LoadError,
    default_dtype,
    find_weights,
    load_strict,
    parse_device,
    parse_dtype,
    read_state_dict,
)
from dcar.model.params import EditSpec, RowResult, SamplingParams
from dcar.model.sampler import Sampler, SamplerOptions
from dcar.model.text_encoder import TextEncoder
from dcar.model.tokenizer import DCHT
from dcar.model.transformer import DCARTransformer

OFFICIAL_DIRS = {"tokenizer": "dc-ht", "generator": "dc-ar-512", "text_encoder": "t5-base"}
INDEX = "model_index.json"
T = TypeVar("T")


def _json(path: Path) -> dict:
    """A JSON object from ``path``; LoadError names the file when it is missing, not JSON or not an object."""
    try:
        obj = json.loads(path.read_text())
    except FileNotFoundError as e:
        raise LoadError(f"{path}: file not found") from e
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise LoadError(f"{path}: not valid JSON: {e}") from e
    if not isinstance(obj, dict):
        raise LoadError(f"{path}: expected a JSON object, found {type(obj).__name__}")
    return obj


def _parse(source: Path, build: Callable[[], T]) -> T:
    """``build()``, a config from ``source``'s values: a missing key, a wrong type or value names the file."""
    try:
        return build()
    except LoadError:
        raise
    except KeyError as e:
        raise LoadError(f"{source}: missing key {e.args[0]!r}") from e
    except (TypeError, ValueError) as e:
        raise LoadError(f"{source}: {e}") from e


def official_tokenizer_config(tdir: Path, dc_ae: dict | None = None) -> TokenizerConfig:
    """The TokenizerConfig of an official DC-HT folder's config.json (``dc_ae`` overrides the DC-AE
    structure); LoadError names the file when it is missing, not JSON, not DC-HT's or not supported."""
    source = tdir / "config.json"
    dcht = _json(source)
    if dcht.get("model_type") != "dc_ht":
        raise LoadError(f"{source}: model_type={dcht.get('model_type')!r}, expected 'dc_ht'")
    return _parse(source, lambda: TokenizerConfig.from_official(dcht, dc_ae))


def build_tokenizer(cfg: TokenizerConfig, state: dict | None, source: str | Path = "") -> DCHT:
    if state is None:
        return DCHT(cfg)
    with torch.device("meta"):
        model = DCHT(cfg)
    return load_strict(model, state, source)


def build_generator(cfg: GeneratorConfig, state: dict | None, source: str | Path = "") -> DCARTransformer:
    if state is None:
        return DCARTransformer(cfg)
    with torch.device("meta"):
        model = DCARTransformer(cfg)
    return load_strict(model, state, source)


def _config(cls: Callable[..., T], values: object, key: str) -> T:
    """The config ``cls`` from ``values``, the JSON object under ``key``, its keys and value types checked."""
    if not isinstance(values, dict):
        raise TypeError(f"{key} must be an object, got {values!r}")
    check_fields(cls, values, f"{key}.")  # type: ignore[arg-type]
    return cls(**values)


def _image_tensor(image: object) -> torch.Tensor:
    """An edit's input image given as a tensor, checked: (3, H, W) floats in [-1, 1]."""
    if not isinstance(image, torch.Tensor):
        raise TypeError(
            f"image must be a PIL image or a tensor (3, H, W) in [-1, 1], got {type(image).__name__}"
        )
    if image.ndim != 3 or image.shape[0] != 3:
        raise ValueError(f"image tensor must have shape (3, H, W), got {tuple(image.shape)}")
    # A uint8 image (0..255) or one in [0, 1] scaled by 255 was tokenized as it stood: no error, a wrong edit.
    if not image.is_floating_point():
        raise ValueError(f"image tensor must hold floats in [-1, 1], got dtype {image.dtype}")
    if image.numel() and not (torch.isfinite(image).all() and image.min() >= -1 and image.max() <= 1):
        raise ValueError(
            f"image tensor values must lie in [-1, 1], got {image.min().item():g}..{image.max().item():g}"
        )
    return image.float()


def _mask_tensor(mask: object) -> torch.Tensor:
    """An edit's mask given as a tensor, checked: (H, W) or (1, H, W), values in [0, 1] -> (1, H, W) float."""
    if not isinstance(mask, torch.Tensor):
        raise TypeError(
            f"mask must be a PIL image or a tensor (1, H, W) in [0, 1], got {type(mask).__name__}"
        )
    if not (mask.ndim == 2 or (mask.ndim == 3 and mask.shape[0] == 1)):
        raise ValueError(f"mask tensor must have shape (H, W) or (1, H, W), got {tuple(mask.shape)}")
    m = mask.float()
    # A 0/255 mask marked the right tokens, then blended as 255 * generated - 254 * input: pixels far
    # outside [0, 1] in a result documented to lie there.
    if m.numel() and not (torch.isfinite(m).all() and m.min() >= 0 and m.max() <= 1):
        raise ValueError(
            f"mask tensor values must lie in [0, 1] (1 = regenerate), got {m.min().item():g}..{m.max().item():g}"
        )
    return m.reshape(1, *m.shape[-2:])


class Pipeline:
    """Text-to-image and inpainting with DC-AR. Build with ``from_pretrained`` or ``from_config``."""

    def __init__(
        self,
        config: PipelineConfig,
        tokenizer: DCHT,
        generator: DCARTransformer,
        text_encoder: TextEncoder,
        name: str = "dcar",
        device: str | torch.device = "cpu",
        dtype: str | torch.dtype | None = None,
        options: SamplerOptions | None = None,
    ):
        self.config = config
        self.name = name
        self.device = parse_device(device)
        self.dtype = parse_dtype(dtype) or default_dtype(self.device)
        self.tokenizer = tokenizer.to(self.device, self.dtype).eval().requires_grad_(False)
        self.generator = generator.to(self.device, self.dtype).eval().requires_grad_(False)
        # T5 overflows in fp16 (known for the T5 family); it is small, so fp16 pipelines keep it in fp32.
        text_dtype = torch.float32 if self.dtype == torch.float16 else self.dtype
        self.text_encoder = text_encoder.to(self.device, text_dtype).eval().requires_grad_(False)
        self.sampler = Sampler(self.generator, self.tokenizer, self.text_encoder, options)

    # --- construction ------------------------------------------------------------------------------

    @classmethod
    def from_config(
        cls,
        config: PipelineConfig,
        device: str | torch.device = "cpu",
        dtype: str | torch.dtype | None = None,
        seed: int = 0,
        name: str = "random",
        options: SamplerOptions | None = None,
    ) -> Pipeline:
        """Randomly initialised modules (tests, training). The global RNG is left as it was."""
        device, _ = parse_device(device), parse_dtype(dtype)  # refused before the modules are built
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)  # module initialisers only know the global generator
            tok, gen = DCHT(config.tokenizer), DCARTransformer(config.generator)
            text = TextEncoder.from_config(config.text_encoder)
        return cls(config, tok, gen, text, name=name, device=device, dtype=dtype, options=options)

    @classmethod
    def load(
        cls,
        spec: str | Path,
        device: str | torch.device = "cpu",
        dtype: str | torch.dtype | None = None,
        options: SamplerOptions | None = None,
    ) -> Pipeline:
        """``preset:NAME`` builds a randomly initialised preset (e.g. ``preset:tiny``); anything else is a path."""
        name = weights_preset(str(spec))
        if name is not None:
            return cls.from_config(
                pipeline_preset(name), device=device, dtype=dtype, name=f"{name}-random", options=options
            )
        return cls.from_pretrained(spec, device=device, dtype=dtype, options=options)

    @classmethod
    def from_pretrained(
        cls,
        path: str | Path,
        device: str | torch.device = "cpu",
        dtype: str | torch.dtype | None = None,
        official_generator: GeneratorConfig = DC_AR_512,
        official_autoencoder: dict | None = None,
        options: SamplerOptions | None = None,
    ) -> Pipeline:
        """Load a weights directory in our layout or the official one (detected by its files).

        The official layout carries no generator architecture (the official code takes it from its YAML):
        ``official_generator`` supplies it (the dc-ar-512 preset by default). ``official_autoencoder``
        overrides the DC-AE structure that DC-HT's ``model_name`` selects (small official-format test models).
        """
        device, _ = parse_device(device), parse_dtype(dtype)  # refused before the weights are read
        path = Path(path)
        if not path.is_dir():
            raise LoadError(f"{path}: weights directory not found")
        if (path / INDEX).is_file():
            pipe = cls._from_ours(path, device, dtype)
        elif (path / OFFICIAL_DIRS["tokenizer"] / "config.json").is_file():
            pipe = cls._from_official(path, device, dtype, official_generator, official_autoencoder)
        else:
            raise LoadError(
                f"{path}: neither {INDEX} (dcar layout) nor {OFFICIAL_DIRS['tokenizer']}/config.json "
                "(official layout) found; see weights/README.md"
            )
        if options is not None:
            pipe.sampler = Sampler(pipe.generator, pipe.tokenizer, pipe.text_encoder, options)
        return pipe

    @classmethod
    def _from_ours(cls, path: Path, device, dtype) -> Pipeline:
        index = _json(path / INDEX)
        if index.get("format") != "dcar":
            raise LoadError(f"{path / INDEX}: format={index.get('format')!r}, expected 'dcar'")
        for key in ("tokenizer", "generator", "text_encoder"):
            if not isinstance(index.get(key), str):
                raise LoadError(f"{path / INDEX}: {key} must name a subfolder, got {index.get(key)!r}")
        tdir, gdir, xdir = (path / index[k] for k in ("tokenizer", "generator", "text_encoder"))
        tcfg = _parse(tdir / "config.json", lambda: TokenizerConfig.from_dict(_json(tdir / "config.json")))
        gcfg = _parse(gdir / "config.json", lambda: GeneratorConfig.from_dict(_json(gdir / "config.json")))
        xcfg = _parse(
            path / INDEX,
            lambda: _config(TextEncoderConfig, index["text_encoder_config"], "text_encoder_config"),
        )
        sampling = _parse(
            path / INDEX, lambda: _config(SamplingDefaults, index.get("sampling", {}), "sampling")
        )
        config = _parse(path, lambda: PipelineConfig(tcfg, gcfg, xcfg, sampling))
        tw, gw = find_weights(tdir), find_weights(gdir)
        tok = build_tokenizer(tcfg, read_state_dict(tw), tw)
        gen = build_generator(gcfg, read_state_dict(gw), gw)
        text = TextEncoder.from_pretrained(xdir, xcfg.max_length)
        return cls(config, tok, gen, text, name=index.get("name", path.name), device=device, dtype=dtype)

    @classmethod
    def _from_official(cls, path: Path, device, dtype, gcfg: GeneratorConfig, dc_ae: dict | None) -> Pipeline:
        tdir = path / OFFICIAL_DIRS["tokenizer"]
        tcfg = official_tokenizer_config(tdir, dc_ae)
        gdir = path / OFFICIAL_DIRS["generator"]
        tw, gw = find_weights(tdir), find_weights(gdir)
        tok = build_tokenizer(tcfg, read_state_dict(tw), tw)
        gen = build_generator(gcfg, read_state_dict(gw), gw)
        text = TextEncoder.from_pretrained(path / OFFICIAL_DIRS["text_encoder"], gcfg.text_token_length)
        xcfg = replace(T5_BASE, d_model=text.d_model, max_length=gcfg.text_token_length)
        sampling = SamplingDefaults(size=gcfg.grid_size * tcfg.spatial_compression)
        config = PipelineConfig(tcfg, gcfg, xcfg, sampling)
        return cls(config, tok, gen, text, name=path.name or "dc-ar-512", device=device, dtype=dtype)

    def save_pretrained(self, path: str | Path, name: str | None = None) -> None:
        """Write our layout (fp32 safetensors under the official key names)."""
        path = Path(path)
        for sub, module, cfg in (
            ("tokenizer", self.tokenizer, self.config.tokenizer),
            ("generator", self.generator, self.config.generator),
        ):
            (path / sub).mkdir(parents=True, exist_ok=True)
            (path / sub / "config.json").write_text(json.dumps(cfg.to_dict(), indent=1))
            state = {
                k: v.detach().float().contiguous().cpu() if v.is_floating_point() else v.contiguous().cpu()
                for k, v in module.state_dict().items()
            }
            save_file(state, str(path / sub / "model.safetensors"))
        # A float32 copy: Module.float() converts in place, and a half-precision pipeline went on with a
        # float32 T5 after it was saved (other caption states, so other images for the same seed).
        copy.deepcopy(self.text_encoder).float().save_pretrained(path / "text_encoder")
        index = {
            "format": "dcar",
            "version": 1,
            "name": name or self.name,
            "tokenizer": "tokenizer",
            "generator": "generator",
            "text_encoder": "text_encoder",
            "text_encoder_config": asdict(self.config.text_encoder),
            "sampling": asdict(self.config.sampling),
        }
        (path / INDEX).write_text(json.dumps(index, indent=1))

    def with_options(self, options: SamplerOptions, name: str | None = None) -> Pipeline:
        """The same modules (shared, not copied) with another ``SamplerOptions``, e.g. eager vs compiled."""
        return Pipeline(
            self.config,
            self.tokenizer,
            self.generator,
            self.text_encoder,
            name=name or self.name,
            device=self.device,
            dtype=self.dtype,
            options=options,
        )

    # --- use ---------------------------------------------------------------------------------------

    def params(self, prompt: str, **overrides) -> SamplingParams:
        """SamplingParams with this model's defaults (its native size, head steps, ...) and overrides."""
        d = self.config.sampling
        base = {**knob_values(d), "height": d.size, "width": d.size, **overrides}
        return SamplingParams(prompt=prompt, **base)

    def generate(
        self, params: Sequence[SamplingParams], edits: Sequence[EditSpec | None] | None = None, callback=None
    ) -> list[RowResult]:
        return self.sampler.generate(params, edits, callback=callback)

    @torch.inference_mode()
    def prepare_edit(
        self, image: Image.Image | torch.Tensor, mask: Image.Image | torch.Tensor, blend: bool = True
    ) -> EditSpec:
        """Tokenize the input image and map the pixel mask (1 = regenerate) to tokens.

        ``image``: a PIL image, or a float tensor (3, H, W) in [-1, 1] (a ``RowResult.image`` is in [0, 1]:
        pass ``res.image * 2 - 1``). ``mask``: a PIL image (white = regenerate, see ``mask_to_tensor``), or
        a tensor (H, W) or (1, H, W) in [0, 1], 1 = regenerate; fractions blend the input back partially.
        A token is regenerated when any pixel of its patch is marked.
        """
        x = pil_to_tensor(image) if isinstance(image, Image.Image) else _image_tensor(image)
        m = mask_to_tensor(mask) if isinstance(mask, Image.Image) else _mask_tensor(mask)
        if x.shape[-2:] != m.shape[-2:]:
            raise ValueError(f"mask size {tuple(m.shape[-2:])} differs from image size {tuple(x.shape[-2:])}")
        q = self.tokenizer.encode(x.unsqueeze(0).to(self.device, self.dtype))
        f = self.tokenizer.compression
        token_mask = torch.nn.functional.max_pool2d(m.unsqueeze(0), f).flatten() > 0
        return EditSpec(
            tokens=q.tokens[0].cpu(),
            residual=q.residual[0].float().cpu(),
            token_mask=token_mask,
            image=x.cpu(),
            pixel_mask=m.cpu(),
            blend=blend,
        )

    def info(self) -> dict:
        g = self.config.generator
        return {
            "name": self.name,
            "device": str(self.device),
            "dtype": str(self.dtype).replace("torch.", ""),
            "generator_parameters": sum(p.numel() for p in self.generator.parameters()),
            "tokenizer_parameters": sum(p.numel() for p in self.tokenizer.parameters()),
            "native_size": g.grid_size * self.tokenizer.compression,
            "compression": self.tokenizer.compression,
            "codebook_size": g.codebook_size,
            "compute": {
                k: getattr(self.sampler.options, k)
                for k in ("compile", "cuda_graphs", "pad_buckets", "channels_last_decoder")
            },
        }
