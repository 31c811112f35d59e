"""Data-path faults (issue 14, items 3, 4, 6 and 12): a shard cut at a tar header is
counted against index.json (``truncated_shard``); images that fail their format's
integrity checks are ``bad_image`` even when they still decode; a sample's
``max_dynamic_patch`` cannot crash, hang or raise the tile limit (``bad_field``); and
``pipe:`` shard sources need ``data.allow_pipe_sources`` while http(s) never starts a
process."""

from __future__ import annotations

import contextlib
import functools
import http.server
import io
import json
import shutil
import signal
import tarfile
import threading
import warnings
import zlib
from pathlib import Path

import pytest
from PIL import Image, ImageFile

from megatron_mpo.config import from_dict
from megatron_mpo.data import DataConfig, build_loader, load_tokenizer
from megatron_mpo.data.synthetic import draw_image
from megatron_mpo.data.tiling import candidate_grids, choose_grid
from megatron_mpo.errors import UserError
from megatron_mpo.training import data_setup, model_setup
from tests.conftest import base_config, loader_settings, resumed_loader
from tests.test_data import _tar_bytes


# ----------------------------------------------------------------------------- helpers
@pytest.fixture(scope="module")
def tok(workspace):
    return load_tokenizer(str(workspace / "tok"))


def _cfg(shards, **kw) -> tuple:
    base = dict(shards=shards, image_size=56, tokens_per_tile=4, max_tiles=4, max_length=2048, num_workers=0,
                micro_batch=1, shuffle_buffer=0, shuffle_shards=False, seed=3, epochs=1, template="internvl2_5")
    base.update(kw)
    return loader_settings(**base)


def _tiles(loader) -> dict:
    """``{key: tiles}`` of every pair the loader yields (micro_batch 1)."""
    return {b.keys[0].split("/")[1]: int(b.pixel_values.shape[0]) for b in loader}


def _sample(key: str, image: bytes, ext: str = "png", json_text: str = "") -> list:
    meta = json_text or json.dumps(_meta(ext))
    return [(f"{key}.json", meta.encode()), (f"{key}.img0.{ext}", image)]


def _meta(ext: str = "png", **extra) -> dict:
    return {"question": "<image>\nWhat color?", "chosen": "Red.", "rejected": "Blue.", "images": [f"img0.{ext}"], **extra}


def _encode(img: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt)
    return buf.getvalue()


@contextlib.contextmanager
def _deadline(seconds: float):
    """TimeoutError instead of a hang (the old tile search never returned)."""
    def fire(*_):
        raise TimeoutError(f"still running after {seconds} s")

    old = signal.signal(signal.SIGALRM, fire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


# ----------------------------------------------------------------------------- item 3
def _cut_copy(workspace: Path, dst: Path, keep: int) -> tuple[str, int]:
    """Copy the workspace shards; cut the first shard 300 bytes into the tar header that
    opens sample ``keep``. Returns (shard name, samples lost)."""
    shutil.copytree(workspace / "shards", dst)
    index = json.loads((dst / "index.json").read_text())
    name, samples = index["shards"][0]["name"], index["shards"][0]["samples"]
    with tarfile.open(dst / name) as tar:
        members = tar.getmembers()
    starts, keys = [], []
    for m in members:
        key = m.name.split(".")[0]
        if not keys or keys[-1] != key:
            keys.append(key)
            starts.append(m.offset)  # header offset, a multiple of 512
    assert len(keys) == samples and starts[keep] % 512 == 0
    data = (dst / name).read_bytes()
    (dst / name).write_bytes(data[: starts[keep] + 300])
    return name, samples - keep


def _without(counts: dict, reason: str) -> dict:
    return {k: v for k, v in counts.items() if k != reason}


def test_shard_cut_at_a_header_counts_the_missing_samples(workspace, tok, tmp_path, capfd):
    baseline = build_loader(*_cfg(str(workspace / "shards")), tok)
    full_keys = set(_tiles(baseline))
    name, lost = _cut_copy(workspace, tmp_path / "shards", keep=5)
    capfd.readouterr()
    loader = build_loader(*_cfg(str(tmp_path / "shards")), tok)
    keys = set(_tiles(loader))
    assert len(full_keys - keys) == lost == 11
    assert loader.skip_counts.get("truncated_shard") == lost, loader.skip_counts
    assert _without(loader.skip_counts, "truncated_shard") == baseline.skip_counts
    warnings = [line for line in capfd.readouterr().err.splitlines() if name in line]
    assert len(warnings) == 1 and "truncated_shard" in warnings[0], warnings


def test_truncated_shard_is_counted_once_across_workers_ranks_and_resume(workspace, tok, tmp_path):
    _, lost = _cut_copy(workspace, tmp_path / "shards", keep=5)
    folder = str(tmp_path / "shards")
    # whole shards per worker, two epochs; resumed loaders end with the same totals
    cfg = _cfg(folder, num_workers=2, micro_batch=2, epochs=2, shuffle_buffer=3, shuffle_shards=True)
    full = build_loader(*cfg, tok)
    batches = len(list(full))
    assert full.skip_counts["truncated_shard"] == 2 * lost
    for k in (1, batches // 2, batches - 1):
        resumed = resumed_loader(cfg, tok, k)
        list(resumed)
        assert resumed.skip_counts == full.skip_counts, k
    # one shard, more streams than shards: every stream reads it, one counts it
    single = tmp_path / "single"
    single.mkdir()
    index = json.loads((tmp_path / "shards" / "index.json").read_text())
    first_shard = index["shards"][0]
    shutil.copy(tmp_path / "shards" / first_shard["name"], single)
    (single / "index.json").write_text(json.dumps({"shards": [first_shard]}))
    two_workers = build_loader(*_cfg(str(single), num_workers=2), tok)
    list(two_workers)
    assert two_workers.skip_counts.get("truncated_shard") == lost
    per_rank = []
    for rank in range(2):
        loader = build_loader(*_cfg(str(single)), tok, dp_rank=rank, dp_size=2)
        list(loader)
        per_rank.append(loader.skip_counts.get("truncated_shard", 0))
    assert sum(per_rank) == lost


# ----------------------------------------------------------------------------- item 4
def _png_with_decodable_flip() -> bytes:
    """A PNG with one flipped byte inside IDAT that PIL still decodes (CRC now wrong)."""
    png = _encode(Image.new("RGB", (60, 40), (10, 200, 30)), "PNG")
    start = png.find(b"IDAT") + 4
    length = int.from_bytes(png[start - 8: start - 4], "big")
    for offset in range(2, length):
        flipped = bytearray(png)
        flipped[start + offset] ^= 0x01
        try:
            Image.open(io.BytesIO(bytes(flipped))).load()
        except Exception:
            continue
        return bytes(flipped)
    raise AssertionError("no decodable single-byte flip found")


def test_corrupt_images_that_still_decode_are_counted(tok, tmp_path, monkeypatch):
    intact = _encode(draw_image(112, 56, seed=1)[0], "PNG")
    jpeg = _encode(draw_image(112, 56, seed=2)[0], "JPEG")
    members = (_sample("intact", intact) + _sample("flipped", _png_with_decodable_flip())
               + _sample("cutjpg", jpeg[: len(jpeg) * 2 // 3], "jpg", json.dumps(_meta("jpg")))
               + _sample("okjpg", jpeg, "jpg", json.dumps(_meta("jpg"))))
    (tmp_path / "s.tar").write_bytes(_tar_bytes(members))
    # another library in the process turned truncated-image loading on
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)
    loader = build_loader(*_cfg(str(tmp_path / "s.tar")), tok)
    assert sorted(_tiles(loader)) == ["intact", "okjpg"]
    assert loader.skip_counts == {"bad_image": 2}
    assert ImageFile.LOAD_TRUNCATED_IMAGES is True  # left as the process had it


def test_importing_the_package_leaves_truncated_images_off():
    import megatron_mpo.data.pipeline  # noqa: F401
    import megatron_mpo.train  # noqa: F401

    assert ImageFile.LOAD_TRUNCATED_IMAGES is False


# ----------------------------------------------------------------------------- item 6
BAD_PATCH = {"text": "abc", "list": [3], "bool": True, "zero": 0, "negative": -1, "fraction": 2.5, "empty": ""}


def test_max_dynamic_patch_is_validated_and_clamped_end_to_end(tok, tmp_path):
    wide = _encode(draw_image(448, 56, seed=4)[0], "PNG")  # 8:1, wants 8 tiles
    members = _sample("default", wide)
    for key, value in BAD_PATCH.items():
        members += _sample(key, wide, json_text=json.dumps(_meta(max_dynamic_patch=value)))
    members += _sample("two", wide, json_text=json.dumps(_meta(max_dynamic_patch=2)))
    members += _sample("forty", wide, json_text=json.dumps(_meta(max_dynamic_patch=40)))
    members += _sample("huge", wide, json_text=json.dumps(_meta(max_dynamic_patch=10**12)))
    members += _sample("float", wide, json_text=json.dumps(_meta()).replace("}", ', "max_dynamic_patch": 1e9}'))
    (tmp_path / "s.tar").write_bytes(_tar_bytes(members))
    loader = build_loader(*_cfg(str(tmp_path / "s.tar"), max_tiles=4), tok)
    with _deadline(60):
        tiles = _tiles(loader)
    # data.max_tiles=4: a 4x1 grid plus the thumbnail; max_dynamic_patch=2 lowers it to 2x1 + 1
    assert tiles == {"default": 5, "two": 3, "forty": 5, "huge": 5, "float": 5}
    assert loader.skip_counts == {"bad_field": len(BAD_PATCH)}


def test_tile_grid_search_is_bounded_and_unchanged():
    with _deadline(30), pytest.raises(ValueError, match="max_num"):  # old: never returned
        choose_grid(1000, 10, 56, 1, 10**9)
    for min_num in (1, 2, 3):
        for max_num in range(min_num, 41):
            assert candidate_grids(min_num, max_num) == _internvl_grids(min_num, max_num), (min_num, max_num)
    with pytest.raises(UserError, match="max_tiles"):
        DataConfig(shards="x", max_tiles=10**6).validate()


def _internvl_grids(min_num: int, max_num: int) -> tuple:
    """InternVL's ``target_ratios`` (dynamic_preprocess), written as it writes it."""
    target_ratios = set(
        (i, j) for n in range(min_num, max_num + 1) for i in range(1, n + 1) for j in range(1, n + 1)
        if i * j <= max_num and i * j >= min_num)
    return tuple(sorted(target_ratios, key=lambda x: x[0] * x[1]))


# ----------------------------------------------------------------------------- item 12
def _one_line(exc: pytest.ExceptionInfo) -> str:
    text = str(exc.value)
    assert "\n" not in text
    return text


def test_pipe_sources_need_the_opt_in(workspace, tok, tmp_path):
    local = list(_tiles(build_loader(*_cfg(str(workspace / "shards")), tok)))
    index = json.loads((workspace / "shards" / "index.json").read_text())
    pwned = tmp_path / "pwned"
    pipes = [f"pipe:touch {pwned}; cat {workspace / 'shards' / s['name']}" for s in index["shards"]]
    folder = tmp_path / "hostile"
    folder.mkdir()
    (folder / "index.json").write_text(json.dumps(
        {"shards": [{"name": p, "samples": s["samples"]} for p, s in zip(pipes, index["shards"])]}))
    for spec in (pipes, str(folder), str(folder / "index.json")):
        with pytest.raises(UserError, match="allow_pipe_sources") as exc:
            list(build_loader(*_cfg(spec), tok))
        assert "pipe:" in _one_line(exc)
        assert not pwned.exists(), spec
        assert sorted(_tiles(build_loader(*_cfg(spec, allow_pipe_sources=True), tok))) == sorted(local)
        assert pwned.exists()
        pwned.unlink()


def test_index_entries_stay_in_the_index_folder_unless_allowed(workspace, tok, tmp_path):
    from megatron_mpo.data.shardlist import list_shards

    index = json.loads((workspace / "shards" / "index.json").read_text())
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    first = index["shards"][0]
    shutil.copy(workspace / "shards" / first["name"], outside / first["name"])
    folder = tmp_path / "crafted"
    folder.mkdir()
    (folder / "inside").mkdir()
    shutil.copy(workspace / "shards" / first["name"], folder / "inside" / first["name"])
    (folder / "link").symlink_to(outside)
    escapes = {
        str(outside / first["name"]): "absolute path",
        f"../elsewhere/{first['name']}": "'..'",
        f"link/{first['name']}": "symlink",
        f"file://{outside / first['name']}": "file: URL",
    }
    for name, why in escapes.items():
        (folder / "index.json").write_text(json.dumps({"shards": [{"name": name, "samples": first["samples"]}]}))
        with pytest.raises(UserError, match="allow_outside_index") as exc:
            list(build_loader(*_cfg(str(folder)), tok))
        assert why in _one_line(exc) and "index.json" in _one_line(exc), name
        assert len(list(build_loader(*_cfg(str(folder), allow_outside_index=True), tok))) == first["samples"]
    # Inside the folder (a sub-folder included) needs no opt-in.
    (folder / "index.json").write_text(json.dumps({"shards": [{"name": f"inside/{first['name']}"}]}))
    assert [s.url for s in list_shards(str(folder))] == [str(folder / "inside" / first["name"])]


def test_run_config_maps_allow_pipe_sources(workspace):
    for value in (False, True):
        cfg = from_dict(base_config(workspace, data={"allow_pipe_sources": value}))
        assert data_setup.loader_data(cfg, model_setup.model_config(cfg)).allow_pipe_sources is value
    assert from_dict(base_config(workspace)).data.allow_pipe_sources is False


class _Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


def test_http_shards_are_fetched_without_a_process(workspace, tok, monkeypatch):
    import importlib
    import subprocess

    gopen_module = importlib.import_module("webdataset.gopen")  # the package re-exports a function of that name
    local = _tiles(build_loader(*_cfg(str(workspace / "shards")), tok))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_Quiet, directory=str(workspace / "shards")))
    threading.Thread(target=server.serve_forever, daemon=True).start()

    def no_process(*args, **kwargs):
        raise AssertionError(f"a process was started for an http shard: {args}")

    monkeypatch.setattr(subprocess, "Popen", no_process)
    monkeypatch.setattr(gopen_module, "Popen", no_process)
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/index.json"
        loader = build_loader(*_cfg(url), tok)
        assert _tiles(loader) == local and "bad_tar" not in loader.skip_counts
    finally:
        server.shutdown()
        server.server_close()


# ----------------------------------------------------------------------------- repeated sample keys
def test_make_shards_keys_are_unique_whatever_the_dataset_names(tmp_path):
    """Datasets `a3`, `a`, `b`, `a.`: the cleaned name of `a.` plus its index once gave a second
    `a3-L1-r0`, and a pair trained against another pair's reference value."""
    from megatron_mpo.data.shard_writer import MakeShardsConfig, make_shards

    (tmp_path / "img.png").write_bytes(_encode(Image.new("RGB", (56, 56), (200, 0, 0)), "PNG"))
    meta = {}
    for name in ("a3", "a", "b", "a."):
        fname = f"ds_{len(meta)}.jsonl"
        (tmp_path / fname).write_text(json.dumps({"image": "img.png", "question": "What?", "chosen": "A",
                                                  "rejected": "B"}) + "\n")
        meta[name] = {"root": ".", "annotation": fname}
    (tmp_path / "meta.json").write_text(json.dumps(meta))
    make_shards(MakeShardsConfig(meta=str(tmp_path / "meta.json"), out=str(tmp_path / "shards"), workers=1), log=lambda _m: None)
    keys = []
    for shard in sorted((tmp_path / "shards").glob("*.tar")):
        with tarfile.open(shard) as tar:
            keys += [m.name.split(".")[0] for m in tar.getmembers() if m.name.endswith(".json")]
    assert len(keys) == 4 and len(set(keys)) == 4, keys


@pytest.mark.parametrize("adjacent", [False, True])
def test_a_shard_with_a_repeated_key_is_refused_naming_it(tmp_path, tok, adjacent):
    image = _encode(Image.new("RGB", (56, 56), (0, 0, 200)), "PNG")
    samples = [_sample("x-L1-r0", image), _sample("y-L1-r0", image), _sample("x-L1-r0", image)]
    order = [samples[0], samples[2], samples[1]] if adjacent else samples
    (tmp_path / "s.tar").write_bytes(_tar_bytes([m for s in order for m in s]))
    with pytest.raises(UserError, match="x-L1-r0") as err:
        list(build_loader(*_cfg(str(tmp_path / "s.tar")), tok, dp_rank=0, dp_size=1))
    assert "rebuild the shards" in str(err.value) and "\n" not in str(err.value)


# ----------------------------------------------------------------------------- issue 25, item 10
def _bilevel_png(width: int, height: int) -> bytes:
    """An all-black 1-bit PNG written chunk by chunk (valid CRCs): a few KiB on disk for
    any size, and nothing here decodes it."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return len(body).to_bytes(4, "big") + kind + body + zlib.crc32(kind + body).to_bytes(4, "big")

    row = bytes(1 + (width + 7) // 8)  # filter byte 0, then the packed bits
    packer = zlib.compressobj(9)
    idat = b"".join(packer.compress(row) for _ in range(height)) + packer.flush()
    header = width.to_bytes(4, "big") + height.to_bytes(4, "big") + bytes([1, 0, 0, 0, 0])  # 1-bit grey
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def test_an_image_over_the_pixel_budget_is_refused_from_its_header():
    """12000 x 12000 (144 megapixels, PIL warns from 89.5): our budget says no, by the header,
    before PIL's DecompressionBomb check; a raised budget governs past PIL's error limit."""
    from megatron_mpo.data.samples import SampleError, open_image

    huge = _bilevel_png(12000, 12000)
    assert len(huge) < 150_000
    pil_limit = Image.MAX_IMAGE_PIXELS
    with warnings.catch_warnings(record=True) as caught, _deadline(5):
        warnings.simplefilter("always")
        with pytest.raises(SampleError) as err:
            open_image(huge)
    assert err.value.reason == "bad_image"
    assert "12000 x 12000 = 144.0 megapixels is over data.max_image_pixels=64000000" in str(err.value)
    assert not [w for w in caught if issubclass(w.category, Image.DecompressionBombWarning)], caught
    assert Image.MAX_IMAGE_PIXELS == pil_limit  # PIL's own limit left as the process had it
    # 400 megapixels is over PIL's error limit (2 x 89.5): a budget raised past it is what counts
    assert open_image(_bilevel_png(20000, 20000), max_pixels=400_000_000).size == (20000, 20000)
    small = _encode(Image.new("RGB", (30, 20)), "PNG")
    assert open_image(small, max_pixels=600).size == (30, 20)
    with pytest.raises(SampleError, match="30 x 20 .* over data.max_image_pixels=599"):
        open_image(small, max_pixels=599)


def test_loader_counts_images_over_the_pixel_budget_as_bad_image(workspace, tok, tmp_path):
    small = _encode(draw_image(112, 56, seed=1)[0], "PNG")  # 6272 pixels
    members = _sample("small", small) + _sample("huge", _bilevel_png(12000, 12000))
    (tmp_path / "s.tar").write_bytes(_tar_bytes(members))
    with _deadline(20):
        loader = build_loader(*_cfg(str(tmp_path / "s.tar")), tok)
        assert list(_tiles(loader)) == ["small"]
        assert loader.skip_counts == {"bad_image": 1}
        loader = build_loader(*_cfg(str(tmp_path / "s.tar"), max_image_pixels=6271), tok)
        assert list(_tiles(loader)) == []
        assert loader.skip_counts == {"bad_image": 2}
    cfg = from_dict(base_config(workspace, data={"max_image_pixels": 6271}))
    assert data_setup.loader_data(cfg, model_setup.model_config(cfg)).max_image_pixels == 6271
    with pytest.raises(UserError, match="data.max_image_pixels must be a positive number"):
        from_dict(base_config(workspace, data={"max_image_pixels": 0})).validate()
