"""Tests for keras_cspine.stage1.models.pretrained: the weights table, `weights list / fetch / add`, checks.

Every download goes to a local HTTP server on 127.0.0.1; KERAS_HOME, KERAS_CSPINE_WEIGHTS and
HOME point into tmp_path, so the user's caches are never touched.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import socket
import subprocess
import sys
import tarfile
import threading
import urllib.error
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
from helpers_cli import run_cli

from keras_cspine.cli.weights import main as weights_cli
from keras_cspine.stage1.models import pretrained as P
from keras_cspine.stage1.models.weights import WeightsFileError, imagenet_candidates

PAYLOAD = b"keras_cspine test weights\n" * 5000  # 130 kB


# ----------------------------------------------------------------------------------------------
# Fixtures and helpers
# ----------------------------------------------------------------------------------------------


@pytest.fixture
def caches(tmp_path, monkeypatch) -> dict[str, Path]:
    """Empty Keras and keras_cspine caches (and HOME) under tmp_path."""
    dirs = {"keras_home": tmp_path / "keras_home", "cspine": tmp_path / "cspine",
            "home": tmp_path / "home"}  # fmt: skip
    for d in dirs.values():
        d.mkdir()
    monkeypatch.setenv("KERAS_HOME", str(dirs["keras_home"]))
    monkeypatch.setenv("KERAS_CSPINE_WEIGHTS", str(dirs["cspine"]))
    monkeypatch.setenv("HOME", str(dirs["home"]))
    dirs["keras"] = dirs["keras_home"] / "models"
    return dirs


class _Handler(BaseHTTPRequestHandler):
    def do_GET(self):  # noqa: N802 - http.server's name
        self.server.hits.append(self.path)
        route = self.server.routes.get(self.path)
        if route is None:
            self.send_error(404, "Not Found")
            return
        body, announced = route
        self.send_response(200)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(announced))
        self.end_headers()
        self.wfile.write(body)  # HTTP/1.0: the connection closes after this

    def log_message(self, *args):
        pass


@pytest.fixture
def server():
    """A local HTTP server: ``serve(path, body, announced=None)`` -> URL."""
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    httpd.routes, httpd.hits = {}, []
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05},
                              daemon=True)  # fmt: skip
    thread.start()
    base = f"http://127.0.0.1:{httpd.server_address[1]}"

    def serve(path: str, body: bytes, announced: int | None = None) -> str:
        httpd.routes[path] = (body, len(body) if announced is None else announced)
        return base + path

    serve.base, serve.hits = base, httpd.hits
    yield serve
    httpd.shutdown()
    httpd.server_close()
    thread.join(5)


def _add_entry(monkeypatch, **fields) -> P.WeightsEntry:
    defaults = dict(name="tiny_test", file_name="tiny_test.bin", url="http://127.0.0.1:9/none",
                    hash=hashlib.sha256(PAYLOAD).hexdigest(), cache="keras_cspine",
                    models=("tiny",), licence="test licence", description="test entry")  # fmt: skip
    e = P.WeightsEntry(**{**defaults, **fields})
    monkeypatch.setattr(P, "ENTRIES", (*P.ENTRIES, e))
    return e


def _files(folder: Path) -> list[str]:
    """Every file and folder below ``folder`` (hidden temporaries included)."""
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*")) if folder.exists() else []


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _safetensors(tensors: dict[str, tuple[int, ...]]) -> bytes:
    """A small float32 safetensors file, written by hand (8-byte length, JSON header, data)."""
    header, data, offset = {}, b"", 0
    for name, shape in tensors.items():
        array = np.arange(int(np.prod(shape)), dtype="<f4").reshape(shape)
        header[name] = {"dtype": "F32", "shape": list(shape),
                        "data_offsets": [offset, offset + array.nbytes]}  # fmt: skip
        data += array.tobytes()
        offset += array.nbytes
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    return len(text).to_bytes(8, "little") + text + data


TINY_TENSORS = {"stem.weight": (4, 3), "head.weight": (2, 4)}


# ----------------------------------------------------------------------------------------------
# The table
# ----------------------------------------------------------------------------------------------


def test_table_is_well_formed():
    names = [e.name for e in P.ENTRIES]
    assert len(names) == len(set(names))
    assert {"resnet152v2", "inceptionv3", "convnext_small", "convnext_tiny", "vgg19",
            "densenet121", "gcvit_tiny"} <= set(names)  # fmt: skip
    for e in P.ENTRIES:
        assert e.licence and e.description and e.models, e.name
        assert e.url.startswith("https://"), e.name
        if e.cache == "keras":
            assert e.url.startswith(P._KERAS_APPS) and e.file_name.endswith(".h5"), e.name
    assert P.entry("gcvit_tiny").licence.startswith("CC-BY-NC-SA-4.0")
    assert P.entries_for_model("resnet152v2") == (P.entry("resnet152v2"),)
    assert P.entries_for_model("metadata_only") == ()


@pytest.mark.parametrize(
    ("fields", "match"),
    [
        ({"hash_algorithm": "sha1"}, "hash_algorithm"),
        ({"hash": "abc"}, "hex digits"),
        ({"hash": "A" * 64}, "hex digits"),
        ({"hash": "0" * 64, "hash_algorithm": "md5"}, "md5 hash is 32"),
        ({"cache": "elsewhere"}, "cache"),
        ({"kind": "zip"}, "kind"),
        ({"size": 0}, "size"),
        ({"models": ["a"]}, "tuple"),
    ],
)
def test_illegal_entries(fields, match):
    base = dict(name="x", file_name="x.bin", url="https://x", hash=None)
    with pytest.raises(ValueError, match=match):
        P.WeightsEntry(**{**base, **fields})


def test_unknown_entry_lists_known_names():
    with pytest.raises(ValueError, match="unknown weights 'nope'.*gcvit_tiny"):
        P.entry("nope")


def _keras_get_file_calls(module) -> dict[str, tuple[str, str]]:
    """``{file name: (origin, file_hash)}`` of get_file calls with literal names in a module."""
    import ast
    import inspect

    calls = {}
    for node in ast.walk(ast.parse(inspect.getsource(module))):
        if not (isinstance(node, ast.Call) and getattr(node.func, "attr", "") == "get_file"):
            continue
        if len(node.args) < 2 or not isinstance(node.args[0], ast.Constant):
            continue
        origin = node.args[1]
        origin = origin.value if isinstance(origin, ast.Constant) else getattr(module, origin.id)
        digest = next(k.value.value for k in node.keywords if k.arg == "file_hash")
        calls[node.args[0].value] = (origin, digest)
    return calls


def test_keras_applications_entries_match_installed_keras():
    """Our file names, URLs and hashes are those of the installed keras.applications."""
    try:
        from keras.src.applications import convnext, densenet, inception_v3, resnet, vgg19

        expected = {
            "resnet152v2": (resnet.BASE_WEIGHTS_PATH, resnet.WEIGHTS_HASHES["resnet152v2"][1]),
            "convnext_small": (convnext.BASE_WEIGHTS_PATH,
                               convnext.WEIGHTS_HASHES["convnext_small"][1]),
            "convnext_tiny": (convnext.BASE_WEIGHTS_PATH,
                              convnext.WEIGHTS_HASHES["convnext_tiny"][1]),
        }  # fmt: skip
        literal = {}
        for module in (inception_v3, vgg19, densenet):
            literal.update(_keras_get_file_calls(module))
    except (ImportError, AttributeError, KeyError, OSError, TypeError, StopIteration) as err:
        pytest.skip(f"keras.applications internals moved: {err!r}")
    for name, (base, digest) in expected.items():
        e = P.entry(name)
        assert e.url == base + e.file_name, name
        assert e.hash == digest, name
    for name in ("inceptionv3", "vgg19", "densenet121"):
        e = P.entry(name)
        assert e.file_name in literal, name
        assert (e.url, e.hash) == literal[e.file_name], name
    for e in P.ENTRIES:
        if e.cache == "keras":
            assert e.hash_algorithm == ("md5" if len(e.hash) == 32 else "sha256")


def test_baseline_registry_file_names_are_in_the_table():
    """The notop names baselines.py reads from the Keras cache are the table's names."""
    source = (Path(P.__file__).parent / "baselines.py").read_text(encoding="utf-8")
    for e in P.ENTRIES:
        if e.cache == "keras" and e.name in source:
            assert e.file_name in source, e.name


@pytest.mark.slow
def test_gcvit_entry_matches_timm_state_dict():
    """gcvit_tiny's tensor signature fits timm's gcvit_tiny (in a subprocess: torch after TF)."""
    code = ("import json, timm; sd = timm.create_model('gcvit_tiny', pretrained=False)"
            ".state_dict(); print(json.dumps({k: list(v.shape) for k, v in sd.items()}))")  # fmt: skip
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=300)  # fmt: skip
    if result.returncode != 0:
        pytest.skip(f"timm unavailable: {result.stderr.strip()[-200:]}")
    shapes = json.loads(result.stdout.strip().splitlines()[-1])
    header = {k: {"dtype": "F32", "shape": s, "data_offsets": [0, 0]} for k, s in shapes.items()}
    e = P.entry("gcvit_tiny")
    P._check_header(header, e, "timm")  # no error
    del header["stages.3.norm.weight"]
    with pytest.raises(WeightsFileError, match=r"no tensor 'stages\.3\.norm\.weight'"):
        P._check_header(header, e, "timm")


def test_cache_paths_follow_the_environment(caches):
    assert P.cache_path("vgg19") == caches["keras"] / P.entry("vgg19").file_name
    gcvit = P.cache_path("gcvit_tiny")
    assert gcvit == caches["cspine"] / "gcvit_tiny.in1k.safetensors"
    assert gcvit in imagenet_candidates("gcvit_tiny")  # what GCViT weights="imagenet" finds


# ----------------------------------------------------------------------------------------------
# find / require
# ----------------------------------------------------------------------------------------------


def test_require_missing_names_file_folder_and_command(caches):
    assert P.find("vgg19") is None
    with pytest.raises(WeightsFileError) as info:
        P.require("vgg19")
    message = str(info.value)
    assert "vgg19_weights_tf_dim_ordering_tf_kernels_notop.h5" in message
    assert str(caches["keras"]) in message
    assert "keras-cspine weights fetch vgg19" in message
    assert "weights add FILE --name vgg19" in message


def test_require_bad_file_says_so(caches):
    caches["keras"].mkdir()
    (caches["keras"] / P.entry("vgg19").file_name).write_text("<html>Not found</html>")
    assert P.find("vgg19") is None
    with pytest.raises(WeightsFileError, match="not an HDF5 file.*weights fetch vgg19"):
        P.require("vgg19")


def test_find_and_require_check_hash_when_asked(caches, monkeypatch):
    e = _add_entry(monkeypatch)
    path = caches["cspine"] / e.file_name
    path.write_bytes(PAYLOAD)
    assert P.find(e.name) == path == P.require(e.name, verify_hash=True)
    assert P.status(e.name) == ("present, sha256 ok", path)
    path.write_bytes(PAYLOAD[:-1] + b"?")
    assert P.find(e.name) == path  # cheap checks only
    assert P.find(e.name, verify_hash=True) is None
    with pytest.raises(WeightsFileError, match="sha256 mismatch"):
        P.require(e.name, verify_hash=True)


def test_file_hash(tmp_path):
    path = tmp_path / "w.bin"
    path.write_bytes(PAYLOAD)
    assert P.file_hash(path, "md5") == hashlib.md5(PAYLOAD).hexdigest()
    assert P.file_hash(path) == hashlib.sha256(PAYLOAD).hexdigest()
    with pytest.raises(ValueError, match="algorithm"):
        P.file_hash(path, "sha1")


def test_weights_status_for_configs(caches, monkeypatch, tmp_path):
    random = P.weights_status("vgg19", None)
    assert random["weights_present"] is None and random["weights_command"] is None
    missing = P.weights_status("vgg19", "imagenet")
    assert missing["weights_present"] is False
    assert missing["weights_source"] == str(P.cache_path("vgg19"))
    assert missing["weights_command"] == "keras-cspine weights fetch vgg19"
    assert P.weights_status("vit", "imagenet")["weights_present"] is False  # no entry (yet)
    assert P.weights_status("vgg19", str(tmp_path))["weights_present"] is True
    assert P.weights_status("vgg19", str(tmp_path / "no.h5"))["weights_present"] is False
    e = _add_entry(monkeypatch, models=("vgg19",))  # second entry of vgg19: the first one counts
    (caches["cspine"] / e.file_name).write_bytes(PAYLOAD)
    assert P.weights_status("vgg19", e.name)["weights_present"] is True
    # GCViT: a file under another name that weights="imagenet" finds also counts
    (caches["cspine"] / "gcvit_tiny.safetensors").write_bytes(b"x")
    found = P.weights_status("gcvit_tiny", "imagenet")
    assert found["weights_present"] is True and found["weights_source"].endswith(
        "gcvit_tiny.safetensors")
    assert found["weights_licence"].startswith("CC-BY-NC-SA-4.0")


# ----------------------------------------------------------------------------------------------
# fetch
# ----------------------------------------------------------------------------------------------


def test_fetch_right_hash_lands_in_the_cache(caches, server, monkeypatch):
    url = server("/tiny.bin", PAYLOAD)
    e = _add_entry(monkeypatch, url=url)
    path = P.fetch(e.name, progress=False)
    assert path == caches["cspine"] / e.file_name
    assert path.read_bytes() == PAYLOAD
    assert _files(caches["cspine"]) == [e.file_name]  # no temporary left
    assert P.find(e.name, verify_hash=True) == path
    hits = len(server.hits)
    assert P.fetch(e.name, progress=False) == path  # present and sound: no download
    assert len(server.hits) == hits


def test_fetch_keras_entry_goes_to_keras_home(caches, server, monkeypatch):
    url = server("/app_notop.h5", P._H5_MAGIC + PAYLOAD)
    e = _add_entry(monkeypatch, name="app", file_name="app_notop.h5", cache="keras", url=url,
                   hash=hashlib.md5(P._H5_MAGIC + PAYLOAD).hexdigest(), hash_algorithm="md5")
    assert P.fetch(e.name, progress=False) == caches["keras"] / "app_notop.h5"
    assert P.status(e.name)[0] == "present, md5 ok"


def test_fetch_wrong_hash_leaves_nothing(caches, server, monkeypatch):
    url = server("/tiny.bin", PAYLOAD + b"tampered")
    e = _add_entry(monkeypatch, url=url)
    with pytest.raises(WeightsFileError) as info:
        P.fetch(e.name, progress=False)
    message = str(info.value)
    assert url in message and e.hash in message
    assert hashlib.sha256(PAYLOAD + b"tampered").hexdigest() in message
    assert _files(caches["cspine"]) == []


def test_fetch_truncated_transfer_leaves_nothing(caches, server, monkeypatch):
    url = server("/tiny.bin", PAYLOAD[:50_000], announced=len(PAYLOAD))
    e = _add_entry(monkeypatch, url=url)
    with pytest.raises(WeightsFileError, match="truncated transfer"):
        P.fetch(e.name, progress=False)
    assert _files(caches["cspine"]) == []


def test_fetch_announced_size_must_fit_a_known_size(caches, server, monkeypatch):
    url = server("/tiny.bin", PAYLOAD)
    e = _add_entry(monkeypatch, url=url, size=len(PAYLOAD) + 1)
    with pytest.raises(WeightsFileError, match="not this file"):
        P.fetch(e.name, progress=False)
    assert _files(caches["cspine"]) == []


def test_fetch_http_error(caches, server, monkeypatch):
    e = _add_entry(monkeypatch, url=server.base + "/missing.bin")
    with pytest.raises(WeightsFileError, match="missing.bin: download failed: HTTP 404"):
        P.fetch(e.name, progress=False)
    assert _files(caches["cspine"]) == []


def test_fetch_unreachable_url_is_one_clear_cli_line(caches, monkeypatch, capsys):
    e = _add_entry(monkeypatch)
    url = f"http://127.0.0.1:{_free_port()}/tiny.bin"
    assert weights_cli(["fetch", e.name, "--url", url, "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert err.startswith(f"error: {url}: download failed: connection")
    assert "no network" in err
    assert _files(caches["cspine"]) == []


def test_fetch_unresolved_host_says_so(caches, monkeypatch):
    e = _add_entry(monkeypatch, url="https://weights.example.invalid/tiny.bin")

    def no_dns(*args, **kwargs):
        raise urllib.error.URLError(socket.gaierror(-2, "Name or service not known"))

    monkeypatch.setattr("urllib.request.urlopen", no_dns)
    with pytest.raises(WeightsFileError,
                       match=r"weights\.example\.invalid.* did not resolve \(no network\?\)"):
        P.fetch(e.name, progress=False)  # fmt: skip
    assert _files(caches["cspine"]) == []


def test_fetch_unpinned_safetensors_checks_structure_and_prints_sha256(
    caches, server, monkeypatch, capsys
):
    body = _safetensors(TINY_TENSORS)
    url = server("/model.safetensors", body)
    e = _add_entry(monkeypatch, file_name="tiny.safetensors", url=url, hash=None,
                   tensors=tuple(TINY_TENSORS.items()), n_values=20)  # fmt: skip
    assert weights_cli(["fetch", e.name, "--quiet"]) == 0
    out = capsys.readouterr().out
    assert f"sha256 {hashlib.sha256(body).hexdigest()}" in out
    assert "not pinned" in out
    assert P.status(e.name)[0].startswith("present, structure ok")


@pytest.mark.parametrize(
    ("tensors", "cut", "match"),
    [
        ({"stem.weight": (4, 3)}, 0, "no tensor 'head.weight'"),
        ({"stem.weight": (4, 3), "head.weight": (2, 5)}, 0, r"head.weight has shape \(2, 5\)"),
        ({**TINY_TENSORS, "extra": (3,)}, 0, "23 values, expected 20"),
        (TINY_TENSORS, 8, "truncated or damaged"),
    ],
)
def test_fetch_unpinned_safetensors_of_the_wrong_structure(caches, server, monkeypatch, tensors,
                                                           cut, match):  # fmt: skip
    body = _safetensors(tensors)
    url = server("/model.safetensors", body[: len(body) - cut])
    e = _add_entry(monkeypatch, file_name="tiny.safetensors", url=url, hash=None,
                   tensors=tuple(TINY_TENSORS.items()), n_values=20)  # fmt: skip
    with pytest.raises(WeightsFileError, match=match):
        P.fetch(e.name, progress=False)
    assert _files(caches["cspine"]) == []


# ----------------------------------------------------------------------------------------------
# add
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("how", ["name", "hash"])
def test_add_right_hash(caches, monkeypatch, tmp_path, how):
    e = _add_entry(monkeypatch)
    source = tmp_path / "download.bin"
    source.write_bytes(PAYLOAD)
    path = P.add(source, e.name if how == "name" else None)
    assert path == caches["cspine"] / e.file_name
    assert path.read_bytes() == PAYLOAD
    assert _files(caches["cspine"]) == [e.file_name]
    assert source.read_bytes() == PAYLOAD  # copied, not moved
    assert P.add(path) == path  # the cached copy itself: verified in place


def test_add_identifies_by_file_name(caches, monkeypatch, tmp_path):
    e = _add_entry(monkeypatch, hash=None)
    source = tmp_path / e.file_name
    source.write_bytes(PAYLOAD)
    assert P.add(source) == caches["cspine"] / e.file_name


def test_add_wrong_hash_writes_nothing(caches, monkeypatch, tmp_path, capsys):
    e = _add_entry(monkeypatch)
    source = tmp_path / "download.bin"
    source.write_bytes(PAYLOAD + b"x")
    assert weights_cli(["add", str(source), "--name", e.name]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert err.startswith(f"error: {source}: sha256 mismatch")
    assert e.hash in err and hashlib.sha256(PAYLOAD + b"x").hexdigest() in err
    assert _files(caches["cspine"]) == []


def test_add_unidentified_file_asks_for_a_name(caches, tmp_path):
    source = tmp_path / "mystery.bin"
    source.write_bytes(b"nothing we know")
    with pytest.raises(WeightsFileError, match="cannot tell which weights.*--name"):
        P.add(source)
    with pytest.raises(WeightsFileError, match="file not found"):
        P.add(tmp_path / "absent.bin", "vgg19")


def test_add_identifies_safetensors_by_structure(caches, monkeypatch, tmp_path, capsys):
    e = _add_entry(monkeypatch, file_name="tiny.safetensors", hash=None,
                   tensors=tuple(TINY_TENSORS.items()), n_values=20)  # fmt: skip
    source = tmp_path / "model.safetensors"
    source.write_bytes(_safetensors(TINY_TENSORS))
    assert weights_cli(["add", str(source)]) == 0
    assert f"{e.name}: {source} -> {caches['cspine'] / e.file_name}" in capsys.readouterr().out


def test_list_add_and_require_open_no_connection(caches, monkeypatch, tmp_path, capsys):
    e = _add_entry(monkeypatch)
    source = tmp_path / "w.bin"
    source.write_bytes(PAYLOAD)

    def refuse(*args, **kwargs):
        raise AssertionError("a network connection was attempted")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    assert weights_cli(["add", str(source), "--name", e.name]) == 0
    assert weights_cli(["list"]) == 0
    out = capsys.readouterr().out
    row = next(line for line in out.splitlines() if line.startswith("tiny_test "))
    assert "present, sha256 ok" in row and str(caches["cspine"] / e.file_name) in row
    assert P.require(e.name, verify_hash=True).is_file()


# ----------------------------------------------------------------------------------------------
# Folder entries (keras-hub presets)
# ----------------------------------------------------------------------------------------------


def _preset_archive(files: dict[str, bytes], top: str = "preset") -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(f"{top}/{name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


PRESET = {"config.json": b"{}", "metadata.json": b"{}", "model.weights.h5": b"weights"}


def test_folder_entry_fetch_and_add(caches, server, monkeypatch, tmp_path):
    archive = _preset_archive(PRESET)
    url = server("/preset.tar.gz", archive)
    e = _add_entry(monkeypatch, name="preset_test", file_name="preset_test", url=url,
                   hash=hashlib.sha256(archive).hexdigest(), kind="folder",
                   members=tuple(PRESET))  # fmt: skip
    with pytest.raises(WeightsFileError, match="not found"):
        P.require(e.name)
    path = P.fetch(e.name, progress=False)
    assert path == caches["cspine"] / "preset_test" and path.is_dir()
    assert {p.name for p in path.iterdir()} == set(PRESET)
    assert _files(caches["cspine"]) == ["preset_test", *sorted(f"preset_test/{n}" for n in PRESET)]
    assert P.require(e.name) == path and P.status(e.name)[0] == "present (folder)"
    # add a folder by hand: replaces the old one
    folder = tmp_path / "by_hand"
    folder.mkdir()
    for name, data in {**PRESET, "model.weights.h5": b"new"}.items():
        (folder / name).write_bytes(data)
    assert P.add(folder, e.name) == path
    assert (path / "model.weights.h5").read_bytes() == b"new"
    (folder / "config.json").unlink()
    with pytest.raises(WeightsFileError, match="missing config.json"):
        P.add(folder, e.name)
    assert (path / "config.json").is_file()  # the old copy stays


def test_folder_entry_wrong_archive_leaves_nothing(caches, server, monkeypatch):
    url = server("/preset.tar.gz", _preset_archive(PRESET))
    e = _add_entry(monkeypatch, name="preset_test", file_name="preset_test", url=url,
                   hash="0" * 64, kind="folder", members=tuple(PRESET))  # fmt: skip
    with pytest.raises(WeightsFileError, match="sha256 mismatch"):
        P.fetch(e.name, progress=False)
    assert _files(caches["cspine"]) == []


# ----------------------------------------------------------------------------------------------
# The command line in a fresh interpreter
# ----------------------------------------------------------------------------------------------


def test_cli_list_shows_absent_and_bad_files(tmp_path):
    keras_home, cspine = tmp_path / "keras_home", tmp_path / "cspine"
    (keras_home / "models").mkdir(parents=True)
    bad = keras_home / "models" / P.entry("vgg19").file_name
    bad.write_bytes(P._H5_MAGIC + b"not the real weights")
    env = {"KERAS_HOME": str(keras_home), "KERAS_CSPINE_WEIGHTS": str(cspine),
           "HOME": str(tmp_path / "home")}  # fmt: skip
    result = run_cli("weights", "list", env=env, timeout=120)
    assert result.returncode == 0, result.stderr
    rows = {line.split()[0]: line for line in result.stdout.splitlines()[1:]}
    assert set(rows) == {e.name for e in P.ENTRIES}
    assert "md5 mismatch" in rows["vgg19"] and str(bad) in rows["vgg19"]
    assert " absent " in rows["gcvit_tiny"]
    assert str(cspine / "gcvit_tiny.in1k.safetensors") in rows["gcvit_tiny"]
    assert "CC-BY-NC-SA-4.0" in rows["gcvit_tiny"]
    assert " absent " in rows["resnet152v2"] and str(keras_home / "models") in rows["resnet152v2"]


def test_weights_command_imports_no_tensorflow():
    code = ("import sys; from keras_cspine.cli import main; main(['weights', 'list', "
            "'--no-hash']); heavy = [m for m in ('tensorflow', 'keras', 'torch') "
            "if m in sys.modules]; sys.exit(1 if heavy else 0)")  # fmt: skip
    env = {**os.environ, "KERAS_HOME": "/nonexistent/keras", "KERAS_CSPINE_WEIGHTS": "/nonexistent"}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                            timeout=120)  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr


# ----------------------------------------------------------------------------------------------
# check_keras_h5
# ----------------------------------------------------------------------------------------------


def _write_legacy_h5(path: Path, model, drop: str | None = None,
                     reshape: tuple[str, tuple[int, ...]] | None = None) -> None:  # fmt: skip
    """Write ``model``'s weight layout as a Keras Applications legacy notop .h5 (shapes only)."""
    import h5py

    with h5py.File(path, "w") as f:
        layers = [layer for layer in model.layers if layer.name != drop]
        f.attrs["layer_names"] = np.array([layer.name.encode() for layer in layers])
        f.attrs["backend"] = b"tensorflow"
        f.attrs["keras_version"] = b"2.2.4"
        for layer in layers:
            group = f.create_group(layer.name)
            variables = layer.trainable_weights + layer.non_trainable_weights
            names = [f"{layer.name}/{v.name}:0" for v in variables]
            group.attrs["weight_names"] = np.array([n.encode() for n in names])
            for i, (name, variable) in enumerate(zip(names, variables)):
                shape = tuple(variable.shape)
                if reshape and layer.name == reshape[0] and i == 0:
                    shape = reshape[1]
                group.create_dataset(name, shape=shape, dtype="float32")


@pytest.fixture(scope="module")
def small_app():
    keras = pytest.importorskip("keras")
    return keras.applications.MobileNetV3Small(include_top=False, weights=None,
                                               input_shape=(32, 32, 3))  # fmt: skip


def test_check_keras_h5_accepts_the_notop_layout(small_app, tmp_path):
    path = tmp_path / "mobilenet_v3_small_notop.h5"
    _write_legacy_h5(path, small_app)
    P.check_keras_h5(path, small_app)
    small_app.load_weights(str(path))  # Keras agrees that the layout fits


def test_check_keras_h5_names_the_first_misfit(small_app, tmp_path):
    with_weights = [layer for layer in small_app.layers if layer.weights]
    conv = next(layer for layer in with_weights if len(layer.weights[0].shape) == 4)
    shape = tuple(conv.weights[0].shape)
    wrong = (*shape[:-1], shape[-1] + 1)
    path = tmp_path / "reshaped_notop.h5"
    _write_legacy_h5(path, small_app, reshape=(conv.name, wrong))
    with pytest.raises(WeightsFileError) as info:
        P.check_keras_h5(path, small_app)
    message = str(info.value)
    assert str(path) in message and repr(conv.name) in message
    assert str(wrong) in message and str(shape) in message

    dropped = with_weights[3].name
    path = tmp_path / "dropped_notop.h5"
    _write_legacy_h5(path, small_app, drop=dropped)
    with pytest.raises(WeightsFileError, match=f"layer #3 '{dropped}' .* has no weights in the file"):
        P.check_keras_h5(path, small_app)

    path = tmp_path / "not_legacy.h5"
    import h5py

    with h5py.File(path, "w") as f:
        f.create_group("layers")
    with pytest.raises(WeightsFileError, match="no layer_names"):
        P.check_keras_h5(path, small_app)
    path.write_text("html")
    with pytest.raises(WeightsFileError, match="not a readable HDF5 file"):
        P.check_keras_h5(path, small_app)

