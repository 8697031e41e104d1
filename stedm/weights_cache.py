"""The weights cache: pretrained weights by name, fetched once by ``python -m stedm.weights fetch NAME``.

A ``weights_path`` value that is an existing file or folder is that path; any other value is a
cache name, ``<cache>/<NAME>.safetensors`` with its model card ``<NAME>.card.json``
(:mod:`stedm.models.cards`). The cache is ``$STEDM_WEIGHTS_DIR``, by default
``$XDG_CACHE_HOME/stedm/weights`` (``~/.cache/stedm/weights``). Nothing is ever downloaded
implicitly: only :func:`fetch` downloads, and only when the user runs the command. On a cluster
without internet, fetch on a login node and copy the cache folder (the cards' sha256 are checked
on every use, so an incomplete copy is refused).
"""

from __future__ import annotations

import logging
import os
import tempfile
import urllib.error
import urllib.request
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import Tensor

from stedm.fileio import file_digest
from stedm.models.cards import card_path, read_card, write_weights
from stedm.models.weights import extract_state_dict

log = logging.getLogger(__name__)

CONVERTER_VERSION = "stedm-convert/1"
FETCH_COMMAND = "python -m stedm.weights fetch {name}"
PARTIAL_DIR = ".partial"  # interrupted downloads, resumed by the next fetch; never a cache entry


def cache_dir() -> Path:
    env = os.environ.get("STEDM_WEIGHTS_DIR")
    if env:
        return Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "stedm" / "weights"


def entry_path(name: str) -> Path:
    return cache_dir() / f"{name}.safetensors"


@dataclass(frozen=True)
class Known:
    """Weights ``fetch`` knows: where they are published, their licence and what they become."""

    url: str
    published_at: str          # where the URL is published (so a user can check it)
    licence: str
    description: str
    convert: str               # "ldm_autoencoder" | "ldm_unet" | "state_dict"
    sha256: str | None = None  # of the downloaded file, where the source publishes one
    sha256_prefix: str | None = None  # torchvision publishes the first hex digits in the file name
    member: str | None = None  # the file inside a zip download
    model: dict[str, Any] = field(default_factory=dict)  # what rebuilds the network (goes into the card)
    use: str = ""              # the config key it is meant for


def model_of(known: Known) -> dict[str, Any]:
    """What rebuilds the network: ``known.model``, for LDM autoencoders by default vq-f4."""
    if known.model or known.convert != "ldm_autoencoder":
        return known.model
    from stedm.models.first_stage import VQ_F4_CONFIG

    return {"first_stage": {"kind": "vq_f4", "config": {k: list(v) if isinstance(v, tuple) else v
                                                         for k, v in VQ_F4_CONFIG.items()}}}


LDM_SCRIPTS = "https://github.com/CompVis/latent-diffusion, scripts/{}"
KNOWN: dict[str, Known] = {
    "ldm-vq-f4": Known(
        url="https://ommer-lab.com/files/latent-diffusion/vq-f4.zip", member="model.ckpt",
        published_at=LDM_SCRIPTS.format("download_first_stages.sh (and the README's first-stage table)"),
        licence="MIT (CompVis latent-diffusion); trained on OpenImages", convert="ldm_autoencoder",
        description="LDM vq-f4 autoencoder (the paper's first stage, 3 x H/4 x W/4 latents)",
        use="diffusion.first_stage.weights_path"),  # model: the vq-f4 architecture (model_of)
    "ldm-landscape-unet": Known(
        url="https://ommer-lab.com/files/latent-diffusion/semantic_synthesis256.zip", member="model.ckpt",
        published_at=LDM_SCRIPTS.format("download_models.sh (and the README's model table: Landscapes, LDM-VQ-4)"),
        licence="MIT (CompVis latent-diffusion); trained on Flickr landscapes", convert="ldm_unet",
        description="LDM semantic-synthesis (landscape) U-Net, the paper's denoiser initialisation",
        use="diffusion.denoiser.weights_path"),
    "swin-v2-t-imagenet": Known(
        url="https://download.pytorch.org/models/swin_v2_t-b137f0e2.pth", sha256_prefix="b137f0e2",
        published_at="https://github.com/pytorch/vision, torchvision/models/swin_transformer.py (Swin_V2_T_Weights)",
        licence="BSD-3-Clause (torchvision); trained on ImageNet-1k (its terms of use apply)", convert="state_dict",
        description="Swin-V2-T ImageNet weights for the paper's style encoder (style_backbone=swin_v2_t)",
        use="model.style.encoder.weights_path"),
}


def ways_forward(name: str, argument: str) -> str:
    return (f"either fetch them once: {FETCH_COMMAND.format(name=name)} (on a cluster: fetch on a login node and "
            f"copy {cache_dir()} to the same place, or set STEDM_WEIGHTS_DIR), or give a local file: "
            f"{argument}=/path/to/weights (.safetensors, or an LDM .ckpt), or train an autoencoder on your own "
            f"data: python -m stedm.train_first_stage data=... and set {argument}=<its run dir>/final.safetensors")


def resolve(value: str, argument: str) -> Path:
    """``value`` as a path: an existing file or folder, else the cache entry ``value``; a name
    the cache does not hold is refused with the ways forward."""
    path = Path(value).expanduser()
    if path.exists():
        return path
    if "/" in value or os.sep in value or path.suffix in (".safetensors", ".ckpt", ".pt", ".pth", ".bin"):
        raise FileNotFoundError(f"{argument}={value!r}: no such file (a value that is not an existing path is a "
                                f"weights-cache name; known names: {', '.join(KNOWN)})")
    entry = entry_path(value)
    if entry.is_file():
        return entry
    known = "" if value in KNOWN else f" ({value!r} is not a name fetch knows: {', '.join(KNOWN)})"
    raise FileNotFoundError(f"{argument}={value!r}: the weights cache {cache_dir()} holds no {value!r}{known}; "
                            + ways_forward(value, argument))


def is_available(value: str) -> bool:
    try:
        resolve(value, "weights_path")
    except FileNotFoundError:
        return False
    return True


# -- download ------------------------------------------------------------------------------------
def download(url: str, target: Path, progress: bool = True, chunk: int = 1 << 20) -> Path:
    """Download ``url`` to ``target``, resuming a partial ``target`` with an HTTP Range request (a
    server that ignores it sends the whole file, which then replaces the partial one)."""
    from tqdm import tqdm

    target.parent.mkdir(parents=True, exist_ok=True)
    have = target.stat().st_size if target.exists() else 0
    request = urllib.request.Request(url, headers={"Range": f"bytes={have}-"} if have else {})
    try:
        response = urllib.request.urlopen(request, timeout=60)
    except urllib.error.HTTPError as err:
        if err.code == 416 and have:  # nothing left to send: the partial file is complete
            return target
        raise ConnectionError(f"{url}: HTTP {err.code} {err.reason}") from None
    except urllib.error.URLError as err:
        raise ConnectionError(f"{url}: {err.reason} (no internet here? fetch on a machine that has it and copy "
                              f"{cache_dir()})") from None
    with response:
        resumed = have and response.status == 206
        if have and not resumed:
            log.info("%s: the server does not resume; downloading it whole", url)
        start = have if resumed else 0
        length = response.headers.get("Content-Length")
        total = start + int(length) if length is not None else None
        with target.open("ab" if resumed else "wb") as out, tqdm(
                total=total, initial=start, unit="B", unit_scale=True, desc=target.name, disable=not progress) as bar:
            while block := response.read(chunk):
                out.write(block)
                bar.update(len(block))
    if total is not None and target.stat().st_size != total:
        raise ConnectionError(f"{url}: download cut short at {target.stat().st_size} of {total} bytes; "
                              "run the same fetch again to resume")
    return target


# -- conversion ----------------------------------------------------------------------------------
def convert(known: Known, downloaded: Path, trusted: bool) -> dict[str, Tensor]:
    """The state dict our modules load, from a downloaded (verified) or user-named file. An LDM
    ``.ckpt`` is unpickled fully: only because ``trusted`` says this file was fetched and verified
    or the user passed ``--trust``."""
    import torch

    from stedm.models import ldm_convert

    if not trusted:
        raise PermissionError(f"{downloaded}: converting it unpickles it fully, which runs any code stored in it; "
                              "pass --trust if you trust where the file comes from")
    with tempfile.TemporaryDirectory() as tmp:
        source = downloaded
        if zipfile.is_zipfile(downloaded):
            with zipfile.ZipFile(downloaded) as archive:
                names = [n for n in archive.namelist() if Path(n).name == (known.member or "model.ckpt")]
                if not names:
                    raise ValueError(f"{downloaded}: the archive holds no {known.member}")
                source = Path(archive.extract(names[0], tmp))
        payload = torch.load(source, map_location="cpu", weights_only=known.convert == "state_dict")
        state = extract_state_dict(payload, str(source))
    if known.convert == "state_dict":
        return state
    if known.convert == "ldm_autoencoder":
        config = model_of(known)["first_stage"]["config"]
        return ldm_convert.ldm_autoencoder_to_diffusers(
            state, num_levels=len(config["block_out_channels"]), layers_per_block=config["layers_per_block"]).state_dict
    if known.convert == "ldm_unet":  # kept in LDM names: build_denoiser converts them (load_ldm_weights)
        unet = {k: v for k, v in state.items() if k.startswith(ldm_convert.LDM_UNET_PREFIX)}
        ldm_convert.ldm_unet_to_style_unet(unet)  # checks that it is the U-Net the converter knows
        return unet
    raise ValueError(f"unknown converter {known.convert!r}")


def check_digest(digest: str, known: Known, given: str | None, recorded: str | None, url: str) -> str:
    """Which check the download passed ('published', 'given', 'recorded', 'recorded on first fetch');
    a mismatch is refused."""
    for label, expected in (("published", known.sha256), ("given with --sha256", given),
                            ("recorded by the first fetch", recorded)):
        if expected and digest != expected.lower():
            raise ValueError(f"{url}: sha256 {digest} differs from the one {label} ({expected}); "
                             "the download is deleted and nothing was written to the cache")
    if known.sha256_prefix and not digest.startswith(known.sha256_prefix):
        raise ValueError(f"{url}: sha256 {digest} does not start with {known.sha256_prefix}, the prefix its source "
                         "publishes in the file name; the download is deleted and nothing was written to the cache")
    return "published" if known.sha256 else "given" if given else "recorded" if recorded else "recorded on first fetch"


def fetch(name: str, sha256: str | None = None, source_file: str | Path | None = None, trust: bool = False,
          force: bool = False, progress: bool = True, known: dict[str, Known] | None = None,
          say: Callable[[str], None] = print) -> Path:
    """Download (or take ``source_file``), verify, convert and write cache entry ``name`` atomically."""
    registry = KNOWN if known is None else known
    if name not in registry:
        raise KeyError(f"{name!r} is not a known weights name; python -m stedm.weights list shows them "
                       f"({', '.join(registry)})")
    entry = registry[name]
    target = entry_path(name)
    old_card = read_card(target) if card_path(target).exists() else None
    recorded = (old_card or {}).get("source", {}).get("sha256")
    if target.is_file() and old_card is not None and not force:
        say(f"{name}: already in the cache ({target}); --force fetches it again")
        return target
    if source_file is not None:
        downloaded, trusted = Path(source_file).expanduser(), trust
        if not downloaded.is_file():
            raise FileNotFoundError(f"--file {downloaded}: no such file")
        url = f"file:{downloaded.resolve()}"
    else:
        downloaded = cache_dir() / PARTIAL_DIR / f"{name}{Path(entry.url).suffix}.part"
        url = entry.url
        say(f"{name}: downloading {url}")
        download(url, downloaded, progress=progress)
        trusted = True  # we fetched it; it is verified next, before it is unpickled
    digest = file_digest(downloaded)
    try:
        how = check_digest(digest, entry, sha256, recorded, url)
    except ValueError:
        if source_file is None:
            downloaded.unlink(missing_ok=True)
        raise
    say(f"{name}: sha256 {digest} ({how})")
    state = convert(entry, downloaded, trusted)
    card = {"task": "weights-cache", "name": name, "description": entry.description, "model": model_of(entry),
            "use": entry.use, "licence": entry.licence,
            "source": {"url": entry.url, "file": url if source_file is not None else None,
                       "published_at": entry.published_at, "sha256": digest, "sha256_check": how,
                       "converter": CONVERTER_VERSION, "convert": entry.convert}}
    path, weights_digest = write_weights(target, state, card, overwrite=True)
    if source_file is None:
        downloaded.unlink(missing_ok=True)
        partial = cache_dir() / PARTIAL_DIR
        if partial.is_dir() and not any(partial.iterdir()):
            partial.rmdir()
    say(f"{name}: wrote {path} (sha256 {weights_digest}) and {card_path(path).name}")
    return path
