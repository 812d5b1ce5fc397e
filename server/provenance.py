"""What made an image: the resolved sampling parameters, the weights digest, and the marks written into files.

A response carries every sampling parameter as resolved (the model's defaults, then the request's
overrides) and a digest of the weights, so an image can be reproduced and attributed. With
``mark_output`` (the default) the encoded file carries the same, plus the IPTC DigitalSourceType
``trainedAlgorithmicMedia`` (the term IPTC, Google and C2PA manifests use for images made by a trained
model): PNG as tEXt chunks and an XMP packet (iTXt ``XML:com.adobe.xmp``), JPEG and WebP as XMP. Prompts
are not written into files: an image travels further than the request that made it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from xml.sax.saxutils import quoteattr

import torch

from dcar.model.params import SamplingParams

DIGITAL_SOURCE_TYPE = "http://cv.iptc.org/newscodes/digitalsourcetype/trainedAlgorithmicMedia"
IPTC_EXT_NS = "http://iptc.org/std/Iptc4xmpExt/2008-02-29/"
XMP_NS = "http://ns.adobe.com/xap/1.0/"
DCAR_NS = "urn:dcar:ns:1.0/"
_CHUNK = 1 << 20


def software() -> str:
    try:
        return f"dcar {version('dcar')}"
    except PackageNotFoundError:  # a source tree that was never installed
        return "dcar"


def parameters(p: SamplingParams, seed: bool = False) -> dict:
    """Every resolved sampling parameter of one image; the prompt never, the seed only when asked."""
    out = dataclasses.asdict(p)
    del out["prompt"]
    if not seed:
        del out["seed"]
    return out


# --- the weights digest --------------------------------------------------------------------------------


def _file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def directory_digest(root: Path) -> str:
    """sha256 of ``sha256sum``'s lines for every file, in byte order of the relative paths; by hand:
    ``cd DIR && find . -type f -printf '%P\\n' | LC_ALL=C sort | xargs -d '\\n' sha256sum | sha256sum``."""
    h = hashlib.sha256()
    files = sorted((p.relative_to(root).as_posix(), p) for p in root.rglob("*") if p.is_file())
    for rel, path in files:
        h.update(f"{_file_digest(path)}  {rel}\n".encode())
    return "sha256:" + h.hexdigest()


def modules_digest(modules: dict[str, torch.nn.Module]) -> str:
    """sha256 over the state dicts as loaded (name, dtype, shape, bytes): for models without a directory."""
    h = hashlib.sha256()
    for prefix, module in sorted(modules.items()):
        for name, t in module.state_dict().items():
            t = t.detach().contiguous().cpu()
            h.update(f"{prefix}.{name} {t.dtype} {tuple(t.shape)}\n".encode())
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return "sha256:" + h.hexdigest()


def weights_digest(weights: str | None, pipe) -> str:
    """The digest of the weights directory ``weights``, else of the pipeline's modules (presets, injected)."""
    if weights is not None and Path(weights).is_dir():
        return directory_digest(Path(weights))
    return modules_digest(
        {"tokenizer": pipe.tokenizer, "generator": pipe.generator, "text_encoder": pipe.text_encoder}
    )


# --- marks in the file ---------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Mark:
    """What goes into one image file."""

    model: str
    weights_digest: str
    parameters: dict  # resolved, with the seed

    def text(self) -> dict[str, str]:
        """PNG tEXt chunks (keywords are Latin-1, so the JSON is ASCII-escaped)."""
        return {
            "Software": software(),
            "Source": self.model,
            "DigitalSourceType": DIGITAL_SOURCE_TYPE,
            "dcar:weights_digest": self.weights_digest,
            "dcar:parameters": json.dumps(self.parameters, separators=(",", ":")),
        }

    def xmp(self) -> bytes:
        """An XMP packet: IPTC DigitalSourceType, xmp:CreatorTool, and dcar's own properties."""
        attrs = {
            "Iptc4xmpExt:DigitalSourceType": DIGITAL_SOURCE_TYPE,
            "xmp:CreatorTool": software(),
            "dcar:model": self.model,
            "dcar:weightsDigest": self.weights_digest,
            "dcar:parameters": json.dumps(self.parameters, separators=(",", ":")),
        }
        body = "\n    ".join(f"{k}={quoteattr(v)}" for k, v in attrs.items())
        return (
            '<?xpacket begin="\ufeff" id="W5M0MpCehiHzreSzNTczkc9d"?>\n'
            '<x:xmpmeta xmlns:x="adobe:ns:meta/">\n'
            ' <rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#">\n'
            f'  <rdf:Description rdf:about="" xmlns:Iptc4xmpExt="{IPTC_EXT_NS}" xmlns:xmp="{XMP_NS}"\n'
            f'    xmlns:dcar="{DCAR_NS}"\n    {body}/>\n'
            " </rdf:RDF>\n"
            "</x:xmpmeta>\n"
            '<?xpacket end="r"?>'
        ).encode()
