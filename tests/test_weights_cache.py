"""The weights cache and ``python -m stedm.weights list|fetch``, against a loopback HTTP server
started here (never a real URL): Range resume, sha256 checks, atomic entries, name -> path."""

import hashlib
import http.server
import io
import threading
import zipfile

import pytest
import torch
from diffusers import VQModel

from stedm import weights, weights_cache
from stedm.models.cards import card_path, read_card
from stedm.models.first_stage import build_first_stage
from stedm.models.ldm_convert import diffusers_to_ldm_autoencoder
from stedm.weights_cache import Known

TINY_VQ = dict(block_out_channels=[8, 16], layers_per_block=1, norm_num_groups=4, num_vq_embeddings=16,
               down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2)


class Server:
    """Serves ``self.body`` at /w.zip with Range support; ``cut_after`` bytes sends a truncated
    response once (a dropped connection); ``ranges`` records every Range header seen."""

    def __init__(self, body: bytes):
        self.body, self.cut_after, self.ranges = body, None, []
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                header = self.headers.get("Range")
                outer.ranges.append(header)
                start = int(header.removeprefix("bytes=").split("-")[0]) if header else 0
                part = outer.body[start:]
                self.send_response(206 if header else 200)
                self.send_header("Content-Length", str(len(part)))
                if header:
                    self.send_header("Content-Range", f"bytes {start}-{len(outer.body) - 1}/{len(outer.body)}")
                self.end_headers()
                if outer.cut_after is not None:
                    part, outer.cut_after = part[:outer.cut_after], None
                self.wfile.write(part)

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_port}/w.zip"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("STEDM_WEIGHTS_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture
def served():
    """A tiny vq autoencoder released the LDM way (a zip holding model.ckpt) and its server."""
    torch.manual_seed(0)
    model = VQModel(**TINY_VQ)
    ldm = diffusers_to_ldm_autoencoder(model.state_dict(), num_levels=2, layers_per_block=1).state_dict
    ckpt = io.BytesIO()
    torch.save({"state_dict": {f"first_stage_model.{k}": v for k, v in ldm.items()}, "epoch": 3}, ckpt)
    archive = io.BytesIO()
    with zipfile.ZipFile(archive, "w") as z:
        z.writestr("vq-tiny/model.ckpt", ckpt.getvalue())
    server = Server(archive.getvalue())
    yield model, server
    server.httpd.shutdown()


def known(server, sha256=None):
    return {"tiny-vq": Known(url=server.url, published_at="this test", licence="test", description="tiny",
                             convert="ldm_autoencoder", member="model.ckpt", sha256=sha256,
                             model={"first_stage": {"kind": "vq_f4", "config": TINY_VQ}},
                             use="diffusion.first_stage.weights_path")}


def entries(cache):
    return sorted(p.name for p in cache.iterdir() if p.is_file()) if cache.is_dir() else []


def test_fetch_converts_verifies_and_the_name_resolves(cache, served):
    model, server = served
    digest = hashlib.sha256(server.body).hexdigest()
    path = weights_cache.fetch("tiny-vq", known=known(server, sha256=digest), progress=False, say=lambda _: None)
    assert entries(cache) == ["tiny-vq.card.json", "tiny-vq.safetensors"] and not (cache / ".partial").exists()
    card = read_card(path)
    assert card["source"]["sha256"] == digest and card["source"]["sha256_check"] == "published"
    assert card["source"]["converter"] == weights_cache.CONVERTER_VERSION and card["source"]["url"] == server.url
    assert torch.__version__.startswith(card["provenance"]["packages"]["torch"])
    # the cache name is what a config names: build_first_stage loads the converted weights
    loaded = build_first_stage("vq_f4", weights_path="tiny-vq")
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.model.state_dict()[key], value), key
    # a damaged copy of the cache is refused by its card's sha256
    path.write_bytes(path.read_bytes()[:-8] + b"\0" * 8)
    with pytest.raises(ValueError, match="sha256 differs"):
        build_first_stage("vq_f4", weights_path="tiny-vq")


def test_interrupted_download_resumes_with_range(cache, served):
    _, server = served
    server.cut_after = len(server.body) // 3
    with pytest.raises(ConnectionError, match="cut short"):
        weights_cache.fetch("tiny-vq", known=known(server), progress=False, say=lambda _: None)
    assert entries(cache) == []  # no entry, only the partial download
    partial = cache / ".partial" / "tiny-vq.zip.part"
    assert partial.stat().st_size == len(server.body) // 3
    weights_cache.fetch("tiny-vq", known=known(server), progress=False, say=lambda _: None)
    assert server.ranges == [None, f"bytes={len(server.body) // 3}-"]
    card = read_card(cache / "tiny-vq.safetensors")
    assert card["source"]["sha256"] == hashlib.sha256(server.body).hexdigest()  # the resumed file is whole
    assert card["source"]["sha256_check"] == "recorded on first fetch"


def test_sha256_mismatch_leaves_nothing(cache, served):
    _, server = served
    with pytest.raises(ValueError, match="differs from the one given with --sha256"):
        weights_cache.fetch("tiny-vq", sha256="0" * 64, known=known(server), progress=False, say=lambda _: None)
    assert entries(cache) == [] and not any((cache / ".partial").glob("*"))
    with pytest.raises(ValueError, match="differs from the one published"):
        weights_cache.fetch("tiny-vq", known=known(server, sha256="1" * 64), progress=False, say=lambda _: None)
    assert entries(cache) == []
    # the first fetch records the hash; a later fetch of changed bytes is refused, the entry kept
    weights_cache.fetch("tiny-vq", known=known(server), progress=False, say=lambda _: None)
    before = (cache / "tiny-vq.safetensors").read_bytes()
    server.body = server.body[:-1] + bytes([server.body[-1] ^ 1])
    with pytest.raises(ValueError, match="recorded by the first fetch"):
        weights_cache.fetch("tiny-vq", force=True, known=known(server), progress=False, say=lambda _: None)
    assert (cache / "tiny-vq.safetensors").read_bytes() == before and card_path(cache / "tiny-vq.safetensors").is_file()


def test_cli_fetch_and_list(cache, served, monkeypatch, capsys):
    _, server = served
    monkeypatch.setattr(weights_cache, "KNOWN", known(server))
    assert weights.main(["fetch", "tiny-vq", "--sha256", "f" * 64, "--no-progress"]) == 2
    assert "--sha256" in capsys.readouterr().err and entries(cache) == []
    assert weights.main(["fetch", "nope"]) == 2 and "python -m stedm.weights list" in capsys.readouterr().err
    assert weights.main(["fetch", "tiny-vq", "--no-progress"]) == 0
    assert weights.main(["list"]) == 0
    out = capsys.readouterr().out
    assert server.url in out and "in the cache" in out and str(cache) in out


def test_local_file_needs_trust(cache, served, tmp_path):
    _, server = served
    local = tmp_path / "vq.zip"
    local.write_bytes(server.body)
    with pytest.raises(PermissionError, match="--trust"):
        weights_cache.fetch("tiny-vq", source_file=local, known=known(server), say=lambda _: None)
    assert entries(cache) == [] and server.ranges == []
    weights_cache.fetch("tiny-vq", source_file=local, trust=True, known=known(server), say=lambda _: None)
    assert server.ranges == [] and entries(cache) == ["tiny-vq.card.json", "tiny-vq.safetensors"]


def test_names_and_paths(cache, tmp_path):
    with pytest.raises(FileNotFoundError) as err:
        build_first_stage("vq_f4", weights_path="ldm-vq-f4")
    message = str(err.value)
    assert "python -m stedm.weights fetch ldm-vq-f4" in message and "diffusion.first_stage.weights_path=/path" in message
    assert "python -m stedm.train_first_stage" in message and str(cache) in message
    with pytest.raises(FileNotFoundError, match="no such file"):
        build_first_stage("vq_f4", weights_path=str(tmp_path / "missing.safetensors"))
    random = build_first_stage("vq_f4", weights_path="ldm-vq-f4", allow_random=True, **dict(TINY_VQ))
    assert random.latent_channels == 3
